//! An S3 (or S3-compatible: MinIO, moto, Ceph RGW) bucket as a repository [`Backend`].
//!
//! Job: map the backend contract onto the S3 REST API over the blocking `ureq` client, every
//! request signed with SigV4 in its headers (the body's SHA-256 included, or for an object's
//! single PUT its CRC-32 in a signed `x-amz-checksum-crc32` header: see `payload`; either way
//! the service refuses a body damaged in transit). Objects live under `s3://BUCKET/PREFIX/<key>`; the object layout
//! and the headers relied on are specified in `format-spec/remote-s3.md`.
//!
//! Invariants:
//! - **Create-only writes.** `put` and the completion of a multipart upload carry
//!   `If-None-Match: *`; 412 and 409 become [`Error::AlreadyExists`]. A write retried after an
//!   attempt that got no answer is told apart from a real conflict by the random
//!   `x-amz-meta-stackvault-write` tag it carries: if the object now there has our tag, the
//!   earlier attempt landed and the write succeeded.
//! - **Nothing half-visible.** An object is one PUT, or a multipart upload that becomes visible
//!   only at its completion; a failed multipart upload is aborted.
//! - **Secrets stay out.** Credentials travel only in signed headers, never in URLs; errors show
//!   the endpoint, bucket and key, and the service's code and first message line.
//! - **Retries** with exponential backoff and full jitter on 408/429/500/502/503/504, on answers
//!   cut short and on connection failures, honouring `Retry-After`; 403, 404 and other answers
//!   are reported at once, with what to do.
//! - Every request sent (retries included) is counted by kind in [`S3Backend::request_counts`].

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use sha2::Digest as _;

mod payload;
mod uploads;

use super::range_read::content_range;
use super::spool::{read_error, Spooled};
use super::{Backend, ObjectInfo, ObjectWriter, SpooledObject, Version};
use crate::azure::RetryPolicy;
use crate::error::{Error, Result};
use crate::http_error::{self, is_transient, NoAnswer};

/// Size of each part of a multipart upload (the last may be smaller).
pub const DEFAULT_PART_SIZE: usize = 8 << 20;
/// Objects larger than this go up in parts; smaller ones in one PUT.
pub const DEFAULT_MULTIPART_THRESHOLD: usize = 64 << 20;
/// S3's smallest part (all but the last).
pub const MIN_PART_SIZE: usize = 5 << 20;
/// S3's most parts in one upload.
pub const MAX_PARTS: u32 = 10_000;
/// The user-metadata header naming the write that stored an object.
const WRITE_TAG_HEADER: &str = "x-amz-meta-stackvault-write";

/// How to address the bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Addressing {
    /// Virtual-host style on AWS's own endpoint, path style on a custom endpoint (MinIO and
    /// most S3-compatible servers expect that).
    #[default]
    Auto,
    /// `https://ENDPOINT/BUCKET/KEY`.
    Path,
    /// `https://BUCKET.ENDPOINT/KEY`.
    VirtualHost,
}

/// Where the bucket is and how to talk to it.
#[derive(Clone, Debug)]
pub struct S3Options {
    /// `http(s)://host[:port]`; default `https://s3.REGION.amazonaws.com`.
    pub endpoint: Option<String>,
    pub region: String,
    pub addressing: Addressing,
    pub retry: RetryPolicy,
    /// Part size of multipart uploads, at least [`MIN_PART_SIZE`].
    pub part_size: usize,
    /// Objects above this many bytes go up as multipart uploads.
    pub multipart_threshold: usize,
    /// Keys per ListObjectsV2 page (the service's default, 1000, when `None`).
    pub list_page_size: Option<u32>,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint: None,
            region: "us-east-1".into(),
            addressing: Addressing::Auto,
            retry: RetryPolicy::default(),
            part_size: DEFAULT_PART_SIZE,
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            list_page_size: None,
        }
    }
}

impl S3Options {
    /// Options for `endpoint` (if any) with the region from `AWS_REGION` (default
    /// `us-east-1`).
    pub fn from_env(endpoint: Option<&str>) -> Self {
        S3Options {
            endpoint: endpoint.map(str::to_string),
            region: std::env::var("AWS_REGION")
                .ok()
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "us-east-1".into()),
            ..S3Options::default()
        }
    }
}

/// An access key, read from the environment; never shown.
#[derive(Clone)]
pub struct S3Credentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl S3Credentials {
    pub fn new(access_key_id: &str, secret_access_key: &str, session_token: Option<&str>) -> Self {
        S3Credentials {
            access_key_id: access_key_id.to_string(),
            secret_access_key: secret_access_key.to_string(),
            session_token: session_token.map(str::to_string),
        }
    }

    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and, if set, `AWS_SESSION_TOKEN`.
    pub fn from_env() -> Result<Self> {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => Ok(S3Credentials {
                access_key_id: id,
                secret_access_key: secret,
                session_token: var("AWS_SESSION_TOKEN"),
            }),
            _ => Err(Error::Usage(
                "no credential: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
            )),
        }
    }
}

/// The kinds of request counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Put,
    Get,
    Head,
    List,
    Delete,
    CreateMultipart,
    UploadPart,
    CompleteMultipart,
    AbortMultipart,
}

const KINDS: usize = 9;

/// Requests sent so far, by kind; retries are counted as requests and also in `retries`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RequestCounts {
    pub put: u64,
    pub get: u64,
    pub head: u64,
    pub list: u64,
    pub delete: u64,
    pub create_multipart: u64,
    pub upload_part: u64,
    pub complete_multipart: u64,
    pub abort_multipart: u64,
    pub retries: u64,
}

impl RequestCounts {
    /// The counts as a name → count map (the shape every backend reports).
    pub fn to_map(&self) -> std::collections::BTreeMap<&'static str, u64> {
        [
            ("put", self.put),
            ("get", self.get),
            ("head", self.head),
            ("list", self.list),
            ("delete", self.delete),
            ("create_multipart", self.create_multipart),
            ("upload_part", self.upload_part),
            ("complete_multipart", self.complete_multipart),
            ("abort_multipart", self.abort_multipart),
            ("retries", self.retries),
        ]
        .into_iter()
        .collect()
    }

    /// All requests sent.
    pub fn total(&self) -> u64 {
        self.put
            + self.get
            + self.head
            + self.list
            + self.delete
            + self.create_multipart
            + self.upload_part
            + self.complete_multipart
            + self.abort_multipart
    }
}

/// One request to make: the object (or the bucket), and what to send.
struct Call<'a> {
    kind: Kind,
    method: &'static str,
    /// Full object key (prefix included); `None` addresses the bucket.
    key: Option<&'a str>,
    query: Vec<(&'static str, String)>,
    headers: Vec<(&'static str, String)>,
    body: &'a [u8],
    /// The body is vouched for by a signed CRC-32 header, not by its SHA-256 in the
    /// signature (see `payload`).
    unsigned_payload: bool,
}

impl<'a> Call<'a> {
    fn new(kind: Kind, method: &'static str, key: Option<&'a str>) -> Self {
        Call {
            kind,
            method,
            key,
            query: Vec::new(),
            headers: Vec::new(),
            body: &[],
            unsigned_payload: false,
        }
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body of a ranged read's 200 or 206, left unread for its reader to stream.
    stream: Option<ureq::Body>,
    /// An earlier attempt of this request got no answer (or a server error), so it may have
    /// been carried out.
    ambiguous: bool,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

enum Attempt {
    Answer(Response),
    /// No usable answer: the connection failed, was reset or timed out, or the body was cut.
    Failed(String),
    /// An answer whose body is shorter than its own headers say.
    Short(String),
    /// No point retrying.
    Fatal(String),
}

/// An S3 bucket (and key prefix) holding one repository. `&S3Backend` is `Sync`: connections
/// are pooled and requests from several threads run side by side.
pub struct S3Backend {
    agent: ureq::Agent,
    /// `http` or `https`.
    scheme: String,
    /// `host[:port]` of the endpoint (without the bucket).
    host: String,
    bucket: String,
    /// Empty, or ending in `/`.
    prefix: String,
    path_style: bool,
    region: String,
    credentials: aws_credential_types::Credentials,
    options: S3Options,
    counts: [AtomicU64; KINDS],
    retries: AtomicU64,
    /// The bucket answered a HEAD once, so a 404 without a body means a missing object.
    bucket_seen: AtomicBool,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Backend({})", self.location())
    }
}

impl S3Backend {
    /// Opens `s3://BUCKET/PREFIX` with credentials and region from the environment, at
    /// `endpoint` (`http(s)://host[:port]`) or AWS's own.
    pub fn open(location: &str, endpoint: Option<&str>) -> Result<Self> {
        Self::new(
            location,
            S3Options::from_env(endpoint),
            S3Credentials::from_env()?,
        )
    }

    /// Addresses `s3://BUCKET/PREFIX`. Does no I/O; [`S3Backend::check_bucket`] does.
    pub fn new(location: &str, options: S3Options, credentials: S3Credentials) -> Result<Self> {
        let (bucket, prefix) = parse_location(location)?;
        if options.part_size < MIN_PART_SIZE {
            return Err(Error::InvalidArgument(format!(
                "S3 part size {} is below S3's minimum of {MIN_PART_SIZE} bytes",
                options.part_size
            )));
        }
        let custom = options.endpoint.is_some();
        let endpoint = options
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", options.region));
        let (scheme, rest) = endpoint
            .split_once("://")
            .filter(|(s, _)| *s == "http" || *s == "https")
            .ok_or_else(|| {
                Error::Usage(format!(
                    "S3 endpoint {endpoint}: expected http://HOST[:PORT] or https://HOST[:PORT]"
                ))
            })?;
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') || host.contains('?') || host.contains('@') {
            return Err(Error::Usage(format!(
                "S3 endpoint {endpoint}: expected http://HOST[:PORT] or https://HOST[:PORT], \
                 without a path"
            )));
        }
        let path_style = match options.addressing {
            Addressing::Path => true,
            Addressing::VirtualHost => false,
            // A bucket name with dots breaks the TLS wildcard certificate of virtual hosts.
            Addressing::Auto => custom || bucket.contains('.'),
        };
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(options.retry.timeout))
            .max_idle_connections_per_host(64)
            .user_agent(concat!("stackvault/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(S3Backend {
            agent: ureq::Agent::new_with_config(config),
            scheme: scheme.to_string(),
            host: host.to_string(),
            bucket,
            prefix,
            path_style,
            region: options.region.clone(),
            credentials: aws_credential_types::Credentials::new(
                credentials.access_key_id,
                credentials.secret_access_key,
                credentials.session_token,
                None,
                "stackvault",
            ),
            options,
            counts: Default::default(),
            retries: AtomicU64::new(0),
            bucket_seen: AtomicBool::new(false),
        })
    }

    /// `s3://BUCKET/PREFIX at ENDPOINT`, as shown to people.
    pub fn location(&self) -> String {
        format!(
            "s3://{}/{} at {}://{}",
            self.bucket, self.prefix, self.scheme, self.host
        )
    }

    /// Requests sent so far, by kind.
    pub fn request_counts(&self) -> RequestCounts {
        let n = |k: Kind| self.counts[k as usize].load(Ordering::Relaxed);
        RequestCounts {
            put: n(Kind::Put),
            get: n(Kind::Get),
            head: n(Kind::Head),
            list: n(Kind::List),
            delete: n(Kind::Delete),
            create_multipart: n(Kind::CreateMultipart),
            upload_part: n(Kind::UploadPart),
            complete_multipart: n(Kind::CompleteMultipart),
            abort_multipart: n(Kind::AbortMultipart),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }

    /// Checks that the bucket exists and the credentials may use it (HeadBucket).
    pub fn check_bucket(&self) -> Result<()> {
        let r = self.execute(&Call::new(Kind::Head, "HEAD", None))?;
        match r.status {
            200 => {
                self.bucket_seen.store(true, Ordering::Relaxed);
                Ok(())
            }
            404 => Err(self.no_bucket()),
            _ => Err(self.http_error(None, &r)),
        }
    }

    /// Creates the bucket (tests and `init` on a fresh server); an existing one of ours is fine.
    pub fn create_bucket(&self) -> Result<()> {
        let body = if self.region == "us-east-1" {
            String::new()
        } else {
            format!(
                "<CreateBucketConfiguration><LocationConstraint>{}</LocationConstraint>\
                 </CreateBucketConfiguration>",
                xml_escape(&self.region)
            )
        };
        let mut call = Call::new(Kind::Put, "PUT", None);
        call.body = body.as_bytes();
        let r = self.execute(&call)?;
        match (r.status, service_error(&r).0.as_str()) {
            (200, _) | (409, "BucketAlreadyOwnedByYou") => Ok(()),
            _ => Err(self.http_error(None, &r)),
        }
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn shown_url(&self, key: Option<&str>) -> String {
        format!(
            "{}://{}/{}/{}",
            self.scheme,
            self.host,
            self.bucket,
            key.unwrap_or("")
        )
    }

    fn url(&self, call: &Call<'_>) -> String {
        let path = match call.key {
            Some(k) => format!("/{}", uri_encode(k, false)),
            None => "/".to_string(),
        };
        let mut url = if self.path_style {
            let path = if call.key.is_some() {
                path
            } else {
                String::new()
            };
            format!(
                "{}://{}/{}{path}",
                self.scheme,
                self.host,
                uri_encode(&self.bucket, true)
            )
        } else {
            format!("{}://{}.{}{path}", self.scheme, self.bucket, self.host)
        };
        if !call.query.is_empty() {
            let q: Vec<String> = call
                .query
                .iter()
                .map(|(k, v)| {
                    if v.is_empty() {
                        uri_encode(k, true)
                    } else {
                        format!("{}={}", uri_encode(k, true), uri_encode(v, true))
                    }
                })
                .collect();
            url.push('?');
            url.push_str(&q.join("&"));
        }
        url
    }

    /// The SigV4 headers (`authorization`, `x-amz-date`, `x-amz-content-sha256`, a session
    /// token) for one attempt.
    fn signature_headers(
        &self,
        method: &str,
        url: &str,
        headers: &[(&'static str, String)],
        payload_sha256: &str,
    ) -> Result<Vec<(&'static str, String)>> {
        let identity = self.credentials.clone().into();
        let mut settings = SigningSettings::default();
        // S3 takes the path as sent: encoded once, never normalised.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| Error::Internal(format!("S3 signing parameters: {e}")))?
            .into();
        let request = SignableRequest::new(
            method,
            url,
            headers.iter().map(|(k, v)| (*k, v.as_str())),
            SignableBody::Precomputed(payload_sha256.to_string()),
        )
        .map_err(|e| Error::Internal(format!("S3 request to sign: {e}")))?;
        let (instructions, _) = sign(request, &params)
            .map_err(|e| Error::Internal(format!("S3 signing: {e}")))?
            .into_parts();
        let (signed, _) = instructions.into_parts();
        Ok(signed
            .into_iter()
            .map(|h| (h.name(), h.value().to_string()))
            .collect())
    }

    /// Runs `call` with retries. Returns the answer for any status that is not retried (the
    /// caller decides what it means); retried statuses and failures that persist are errors.
    fn execute(&self, call: &Call<'_>) -> Result<Response> {
        self.execute_checked(call, None)
    }

    /// [`S3Backend::execute`], or for a ranged read starting at `range_start`: the body of a
    /// 200 or 206 answer is left unread in [`Response::stream`], and a 206 whose
    /// `Content-Range` does not start at `range_start` is retried, then reported as
    /// [`Error::Corrupt`].
    fn execute_checked(&self, call: &Call<'_>, range_start: Option<u64>) -> Result<Response> {
        let url = self.url(call);
        let payload_sha256 = if call.unsigned_payload {
            payload::UNSIGNED_PAYLOAD.to_string()
        } else {
            hex(&sha2::Sha256::digest(call.body))
        };
        let mut attempt = 0u32;
        let mut ambiguous = false;
        loop {
            attempt += 1;
            self.counts[call.kind as usize].fetch_add(1, Ordering::Relaxed);
            if attempt > 1 {
                self.retries.fetch_add(1, Ordering::Relaxed);
            }
            let last = attempt >= self.options.retry.tries;
            let mut wait = None;
            match self.attempt(call, &url, &payload_sha256, range_start)? {
                Attempt::Answer(mut r) if is_transient(r.status) => {
                    if last {
                        r.ambiguous = ambiguous;
                        let mut e = self.http_error(call.key, &r);
                        if let Error::Http { message, .. } = &mut e {
                            message.push_str(&format!(" (after {attempt} tries)"));
                        }
                        return Err(e);
                    }
                    wait = retry_after(&r).map(|d| d.min(self.options.retry.max_delay));
                    // A 503/429 is a refusal; other server errors may have done the work.
                    ambiguous |= !matches!(r.status, 429 | 503);
                }
                Attempt::Answer(mut r) => {
                    r.ambiguous = ambiguous;
                    return Ok(r);
                }
                Attempt::Failed(why) if last => {
                    return Err(Error::Network {
                        url: self.shown_url(call.key),
                        tries: attempt,
                        message: why,
                    })
                }
                Attempt::Failed(_) => ambiguous = true,
                Attempt::Short(why) if last => {
                    return Err(Error::corrupt(
                        self.shown_url(call.key),
                        range_start.unwrap_or(0),
                        format!("{why} in each of {attempt} tries"),
                    ))
                }
                Attempt::Short(_) => {}
                Attempt::Fatal(why) => {
                    return Err(Error::Network {
                        url: self.shown_url(call.key),
                        tries: attempt,
                        message: why,
                    })
                }
            }
            let backoff = self.backoff(attempt);
            std::thread::sleep(wait.map_or(backoff, |w| w.max(backoff)));
        }
    }

    /// Full jitter: uniform in [0, min(max, base * 2^(attempt-1))].
    fn backoff(&self, attempt: u32) -> Duration {
        let retry = &self.options.retry;
        let cap = retry
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(retry.max_delay);
        let mut r = [0u8; 8];
        let frac = match getrandom::fill(&mut r) {
            Ok(()) => (u64::from_le_bytes(r) >> 11) as f64 / (1u64 << 53) as f64,
            Err(_) => 0.5,
        };
        cap.mul_f64(frac)
    }

    fn attempt(
        &self,
        call: &Call<'_>,
        url: &str,
        payload_sha256: &str,
        range_start: Option<u64>,
    ) -> Result<Attempt> {
        let mut headers = call.headers.clone();
        headers.extend(self.signature_headers(call.method, url, &call.headers, payload_sha256)?);
        fn with<B>(
            mut rb: ureq::RequestBuilder<B>,
            headers: &[(&'static str, String)],
        ) -> ureq::RequestBuilder<B> {
            for (k, v) in headers {
                rb = rb.header(*k, v.as_str());
            }
            rb
        }
        let result = match call.method {
            "PUT" => with(self.agent.put(url), &headers).send(call.body),
            "POST" => with(self.agent.post(url), &headers).send(call.body),
            "HEAD" => with(self.agent.head(url), &headers).call(),
            "DELETE" => with(self.agent.delete(url), &headers).call(),
            _ => with(self.agent.get(url), &headers).call(),
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => return Ok(classify(e)),
        };
        let status = resp.status().as_u16();
        let headers: Vec<(String, String)> = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let mut body = Vec::new();
        let mut stream = None;
        if range_start.is_some() && matches!(status, 200 | 206) {
            stream = Some(resp.into_body());
        } else if call.method != "HEAD" {
            if let Err(e) = resp.body_mut().as_reader().read_to_end(&mut body) {
                return Ok(Attempt::Failed(format!("reading the answer: {e}")));
            }
        }
        let r = Response {
            status,
            headers,
            body,
            stream,
            ambiguous: false,
        };
        if let (Some(start), 206) = (range_start, status) {
            let declared = r.header("content-range").and_then(content_range);
            match declared {
                Some((first, end, _)) if first == start && end >= first => {}
                _ => {
                    return Ok(Attempt::Short(format!(
                        "the answer's Content-Range {:?} does not match the range asked",
                        r.header("content-range").unwrap_or("")
                    )))
                }
            }
        }
        Ok(Attempt::Answer(r))
    }

    /// The error for an answer that the operation did not expect.
    fn http_error(&self, key: Option<&str>, r: &Response) -> Error {
        let (code, message) = service_error(r);
        let hint = match (r.status, code.as_str()) {
            // The key is good but its policy does not allow the request (a 403 without a body,
            // the answer to a HEAD, says nothing of why).
            (403, "AccessDenied") if xml_text(&r.body, "Code").is_some() => {
                " (this key's policy does not allow it: backup, init, prune, forget and copy \
                 into the repository need s3:PutObject and s3:DeleteObject besides s3:GetObject \
                 and s3:ListBucket; with only those two, reading commands work)"
            }
            (403, _) => {
                " (check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, and that \
                 this key may use the bucket)"
            }
            (301, _) | (400, "AuthorizationHeaderMalformed") => {
                " (the bucket is in another region: set AWS_REGION to it)"
            }
            (404, "NoSuchBucket") => return self.no_bucket(),
            _ => "",
        };
        Error::Http {
            url: self.shown_url(key),
            status: r.status,
            code,
            message: format!("{message}{hint}"),
        }
    }

    fn no_bucket(&self) -> Error {
        Error::Http {
            url: self.shown_url(None),
            status: 404,
            code: "NoSuchBucket".into(),
            message: format!(
                "bucket {} does not exist at {}://{}: create it, or correct the location, \
                 endpoint or AWS_REGION",
                self.bucket, self.scheme, self.host
            ),
        }
    }

    /// What a 404 on `key` means: a missing object, or (said by the body, or found by a
    /// HeadBucket when a HEAD answer has no body) a missing bucket.
    fn not_found(&self, key: &str, r: &Response) -> Error {
        match service_error(r).0.as_str() {
            "NoSuchBucket" => self.no_bucket(),
            "NoSuchKey" => Error::NotFound {
                object: key.to_string(),
            },
            _ if self.bucket_seen.load(Ordering::Relaxed) => Error::NotFound {
                object: key.to_string(),
            },
            _ => match self.check_bucket() {
                Ok(()) => Error::NotFound {
                    object: key.to_string(),
                },
                Err(e) => e,
            },
        }
    }

    /// HEAD of an object; `None` when it does not exist.
    fn head(&self, key: &str) -> Result<Option<Response>> {
        let full = self.full_key(key);
        let r = self.execute(&Call::new(Kind::Head, "HEAD", Some(&full)))?;
        match r.status {
            200 => Ok(Some(r)),
            404 => match self.not_found(key, &r) {
                Error::NotFound { .. } => Ok(None),
                e => Err(e),
            },
            _ => Err(self.http_error(Some(&full), &r)),
        }
    }

    /// True when the object under `key` was stored by the write tagged `tag`.
    fn written_by(&self, key: &str, tag: &str) -> Result<bool> {
        Ok(self
            .head(key)?
            .is_some_and(|r| r.header(WRITE_TAG_HEADER) == Some(tag)))
    }

    fn single_put(
        &self,
        key: &str,
        data: &[u8],
        condition: (&'static str, String),
    ) -> Result<Response> {
        let full = self.full_key(key);
        let mut call = Call::new(Kind::Put, "PUT", Some(&full));
        call.headers.push(condition);
        call.headers.push(payload::crc32_header(data));
        call.unsigned_payload = true;
        call.body = data;
        let tag = write_tag();
        call.headers.push((WRITE_TAG_HEADER, tag.clone()));
        let mut r = self.execute(&call)?;
        // An attempt that got no answer may have stored the object: then it is ours.
        if r.ambiguous && matches!(r.status, 412 | 409 | 404) && self.written_by(key, &tag)? {
            r.status = 200;
            if let Some(h) = self.head(key)? {
                r.headers = h.headers;
            }
        }
        Ok(r)
    }

    fn create_only_outcome(&self, key: &str, r: &Response) -> Result<()> {
        match r.status {
            200 => Ok(()),
            409 | 412 => Err(Error::AlreadyExists {
                object: key.to_string(),
            }),
            404 => Err(self.not_found(key, r)),
            _ => Err(self.http_error(Some(&self.full_key(key)), r)),
        }
    }

    /// Stores an object in parts read by `next_part` (which fills the buffer with up to
    /// `part_size` bytes, none at the end), completing the upload only if `key` is still free.
    fn multipart_put(
        &self,
        key: &str,
        next_part: &mut dyn FnMut(&mut Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let full = self.full_key(key);
        let tag = write_tag();
        let mut create = Call::new(Kind::CreateMultipart, "POST", Some(&full));
        create.query.push(("uploads", String::new()));
        create.headers.push((WRITE_TAG_HEADER, tag.clone()));
        let r = self.execute(&create)?;
        if r.status != 200 {
            return Err(if r.status == 404 {
                self.not_found(key, &r)
            } else {
                self.http_error(Some(&full), &r)
            });
        }
        let upload_id = xml_text(&r.body, "UploadId").ok_or_else(|| {
            self.protocol(
                Some(&full),
                "CreateMultipartUpload answer without an UploadId",
            )
        })?;
        let outcome = self.upload_parts(key, &full, &upload_id, &tag, next_part);
        if outcome.is_err() {
            // Best effort: an upload never completed is never visible, and a bucket lifecycle
            // rule removes what an abort could not.
            let mut abort = Call::new(Kind::AbortMultipart, "DELETE", Some(&full));
            abort.query.push(("uploadId", upload_id));
            let _ = self.execute(&abort);
        }
        outcome
    }

    fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        tag: &str,
        next_part: &mut dyn FnMut(&mut Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let mut etags: Vec<String> = Vec::new();
        let mut buf = Vec::with_capacity(self.options.part_size);
        loop {
            buf.clear();
            next_part(&mut buf)?;
            if buf.is_empty() && !etags.is_empty() {
                break;
            }
            let number = u32::try_from(etags.len() + 1).unwrap_or(u32::MAX);
            if number > MAX_PARTS {
                return Err(Error::InvalidArgument(format!(
                    "object {key} needs more than {MAX_PARTS} parts of {} bytes",
                    self.options.part_size
                )));
            }
            let mut part = Call::new(Kind::UploadPart, "PUT", Some(full));
            part.query.push(("partNumber", number.to_string()));
            part.query.push(("uploadId", upload_id.to_string()));
            part.body = &buf;
            let r = self.execute(&part)?;
            if r.status != 200 {
                return Err(self.http_error(Some(full), &r));
            }
            let etag = r
                .header("etag")
                .ok_or_else(|| self.protocol(Some(full), "UploadPart answer without an ETag"))?;
            etags.push(etag.to_string());
            if buf.is_empty() {
                break;
            }
        }
        let mut body = String::from("<CompleteMultipartUpload>");
        for (i, etag) in etags.iter().enumerate() {
            body.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                i + 1,
                xml_escape(etag)
            ));
        }
        body.push_str("</CompleteMultipartUpload>");
        let mut complete = Call::new(Kind::CompleteMultipart, "POST", Some(full));
        complete.query.push(("uploadId", upload_id.to_string()));
        complete.headers.push(("if-none-match", "*".into()));
        complete.body = body.as_bytes();
        let mut r = self.execute(&complete)?;
        // S3 may answer 200 and put an error in the body when completion failed late.
        if r.status == 200 && xml_text(&r.body, "Code").is_some() {
            r.status = 500;
            return Err(self.http_error(Some(full), &r));
        }
        if r.ambiguous && matches!(r.status, 404 | 409 | 412) && self.written_by(key, tag)? {
            return Ok(());
        }
        self.create_only_outcome(key, &r)
    }

    fn protocol(&self, key: Option<&str>, what: &str) -> Error {
        Error::Http {
            url: self.shown_url(key),
            status: 0,
            code: "UnexpectedAnswer".into(),
            message: what.to_string(),
        }
    }

    fn etag(&self, key: &str, r: &Response) -> Result<Version> {
        r.header("etag")
            .map(|e| Version(e.to_string()))
            .ok_or_else(|| self.protocol(Some(&self.full_key(key)), "answer without an ETag"))
    }
}

/// The error for an object that ends before `len` bytes at `offset` could be read.
fn short_object(key: &str, offset: u64, len: u64, size: u64) -> Error {
    Error::corrupt(
        key,
        offset,
        format!("object is {size} bytes, ends before {len} bytes could be read (truncated?)"),
    )
}

impl super::range_read::RangeSource for S3Backend {
    fn open_at(&self, key: &str, pos: u64, end: u64) -> Result<super::range_read::RangeBody> {
        let len = end.saturating_sub(pos);
        let last = end.checked_sub(1).filter(|_| len > 0).ok_or_else(|| {
            Error::Internal(format!("an empty range of {key} at {pos} was opened"))
        })?;
        let full = self.full_key(key);
        let mut call = Call::new(Kind::Get, "GET", Some(&full));
        call.headers.push(("range", format!("bytes={pos}-{last}")));
        let mut r = self.execute_checked(&call, Some(pos))?;
        let stream = r.stream.take();
        match (r.status, stream) {
            (206, Some(stream)) => {
                let declared = r.header("content-range").and_then(content_range);
                match declared {
                    Some((_, answered_end, _)) if answered_end >= end => {
                        Ok(Box::new(stream.into_reader().take(len)))
                    }
                    _ => {
                        let size = declared
                            .and_then(|(_, answered_end, total)| total.or(Some(answered_end)))
                            .unwrap_or(pos);
                        Err(short_object(key, pos, len, size))
                    }
                }
            }
            // A server that ignores Range sends the whole object: read through to `pos`.
            (200, Some(stream)) => {
                let mut body = stream.into_reader();
                let skipped = std::io::copy(&mut (&mut body).take(pos), &mut std::io::sink())
                    .map_err(|e| Error::Network {
                        url: self.shown_url(Some(&full)),
                        tries: 1,
                        message: format!("reading the answer up to offset {pos}: {e}"),
                    })?;
                if skipped < pos {
                    return Err(short_object(key, pos, len, skipped));
                }
                Ok(Box::new(body.take(len)))
            }
            (416, _) => {
                let size = self.size(key)?;
                Err(short_object(key, pos, len, size))
            }
            (404, _) => Err(self.not_found(key, &r)),
            _ => Err(self.http_error(Some(&full), &r)),
        }
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.options.retry
    }

    fn count_resume(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    fn shown(&self, key: &str) -> String {
        self.shown_url(Some(&self.full_key(key)))
    }
}

impl Backend for S3Backend {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        if data.len() > self.options.multipart_threshold {
            let mut rest = data;
            let part_size = self.options.part_size;
            return self.multipart_put(key, &mut |buf| {
                let (part, tail) = rest.split_at(part_size.min(rest.len()));
                buf.extend_from_slice(part);
                rest = tail;
                Ok(())
            });
        }
        let r = self.single_put(key, data, ("if-none-match", "*".into()))?;
        self.create_only_outcome(key, &r)
    }

    fn put_versioned(&self, key: &str, data: &[u8]) -> Result<Version> {
        if data.len() > self.options.multipart_threshold {
            self.put(key, data)?;
            return self.version(key);
        }
        // PutObject answers with the new object's ETag: no HEAD needed.
        let r = self.single_put(key, data, ("if-none-match", "*".into()))?;
        self.create_only_outcome(key, &r)?;
        self.etag(key, &r)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let full = self.full_key(key);
        let r = self.execute(&Call::new(Kind::Get, "GET", Some(&full)))?;
        match r.status {
            200 => Ok(r.body),
            404 => Err(self.not_found(key, &r)),
            _ => Err(self.http_error(Some(&full), &r)),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        self.get_range_into(key, offset, len, &mut body)?;
        Ok(body)
    }

    fn get_range_into(&self, key: &str, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()> {
        super::range_read::read_range_into(self, key, offset, len, buf)
    }

    fn open_range<'a>(
        &'a self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn std::io::Read + Send + 'a>> {
        if len == 0 {
            // Nothing to read; the object must still exist and reach `offset`.
            let size = self.size(key)?;
            return if offset <= size {
                Ok(Box::new(std::io::empty()))
            } else {
                Err(short_object(key, offset, len, size))
            };
        }
        Ok(Box::new(super::range_read::ResumingRange::new(
            self, key, offset, len,
        )?))
    }

    fn size(&self, key: &str) -> Result<u64> {
        let r = self.head(key)?.ok_or_else(|| Error::NotFound {
            object: key.to_string(),
        })?;
        r.header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                self.protocol(
                    Some(&self.full_key(key)),
                    "HEAD answer without a Content-Length",
                )
            })
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.head(key)?.is_some())
    }

    fn list_with_sizes(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let full_prefix = self.full_key(prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut call = Call::new(Kind::List, "GET", None);
            call.query.push(("list-type", "2".into()));
            call.query.push(("prefix", full_prefix.clone()));
            if let Some(n) = self.options.list_page_size {
                call.query.push(("max-keys", n.to_string()));
            }
            if let Some(t) = &token {
                call.query.push(("continuation-token", t.clone()));
            }
            let r = self.execute(&call)?;
            match r.status {
                // The bucket answered: a later HEAD's bodiless 404 is a missing object, with
                // no HeadBucket to tell (see `not_found`).
                200 => self.bucket_seen.store(true, Ordering::Relaxed),
                404 => return Err(self.not_found(prefix, &r)),
                _ => return Err(self.http_error(None, &r)),
            }
            let page = parse_list(&r.body)
                .map_err(|why| self.protocol(None, &format!("ListObjectsV2 answer: {why}")))?;
            out.extend(
                page.objects
                    .into_iter()
                    .filter_map(|(key, size, modified)| {
                        Some(ObjectInfo {
                            key: key.strip_prefix(&self.prefix)?.to_string(),
                            size,
                            modified,
                        })
                    }),
            );
            match page.next {
                Some(next) if token.as_deref() == Some(next.as_str()) => {
                    return Err(self.protocol(None, "ListObjectsV2 repeated its continuation token"))
                }
                Some(next) => token = Some(next),
                None => break,
            }
        }
        Ok(out)
    }

    fn remove(&self, key: &str) -> Result<()> {
        let full = self.full_key(key);
        let r = self.execute(&Call::new(Kind::Delete, "DELETE", Some(&full)))?;
        match r.status {
            200 | 204 => Ok(()),
            404 => match self.not_found(key, &r) {
                Error::NotFound { .. } => Ok(()),
                e => Err(e),
            },
            _ => Err(self.http_error(Some(&full), &r)),
        }
    }

    fn version(&self, key: &str) -> Result<Version> {
        let r = self.head(key)?.ok_or_else(|| Error::NotFound {
            object: key.to_string(),
        })?;
        self.etag(key, &r)
    }

    fn replace(&self, key: &str, data: &[u8], expected: &Version) -> Result<Version> {
        let r = self.single_put(key, data, ("if-match", expected.0.clone()))?;
        match r.status {
            200 => self.etag(key, &r),
            412 | 409 => Err(Error::VersionMismatch {
                object: key.to_string(),
            }),
            404 => Err(self.not_found(key, &r)),
            _ => Err(self.http_error(Some(&self.full_key(key)), &r)),
        }
    }

    fn delete_if(&self, key: &str, expected: &Version) -> Result<()> {
        let full = self.full_key(key);
        let mut call = Call::new(Kind::Delete, "DELETE", Some(&full));
        call.headers.push(("if-match", expected.0.clone()));
        let r = self.execute(&call)?;
        match r.status {
            200 | 204 => Ok(()),
            412 | 409 => Err(Error::VersionMismatch {
                object: key.to_string(),
            }),
            404 => match self.not_found(key, &r) {
                // An earlier attempt that got no answer deleted it.
                Error::NotFound { .. } if r.ambiguous => Ok(()),
                e => Err(e),
            },
            _ => Err(self.http_error(Some(&full), &r)),
        }
    }

    fn unfinished_uploads(&self) -> Result<Vec<super::UnfinishedUpload>> {
        self.list_uploads()
    }

    fn discard_upload(&self, upload: &super::UnfinishedUpload) -> Result<()> {
        self.abort_upload(upload)
    }

    fn request_counts(&self) -> Option<std::collections::BTreeMap<&'static str, u64>> {
        Some(S3Backend::request_counts(self).to_map())
    }

    fn writer<'a>(&'a self, dir: &str) -> Result<Box<dyn ObjectWriter + 'a>> {
        Ok(Box::new(SpooledObject::new(
            self,
            dir,
            S3Backend::store_spooled,
        )))
    }
}

impl S3Backend {
    /// Stores a streamed object ([`Backend::writer`]): S3 names a multipart upload when it
    /// starts, so its bytes were spooled until its key was known. Up to the multipart
    /// threshold in one PUT, else in parts read from the spool's file one at a time (memory
    /// stays at one part).
    fn store_spooled(&self, key: &str, bytes: Spooled) -> Result<()> {
        let file = match bytes {
            Spooled::File(file) if file.len() > self.options.multipart_threshold as u64 => file,
            small => return self.put(key, &small.into_bytes().map_err(read_error)?),
        };
        let part_size = self.options.part_size;
        let mut at = 0u64;
        self.multipart_put(key, &mut |buf| {
            let left = file.len().saturating_sub(at);
            let len = usize::try_from(left).map_or(part_size, |left| left.min(part_size));
            file.read_into(at, len, buf).map_err(read_error)?;
            at += len as u64;
            Ok(())
        })
    }
}

/// `s3://BUCKET[/PREFIX]` → (bucket, prefix ending in `/` or empty).
fn parse_location(location: &str) -> Result<(String, String)> {
    let bad = |why: &str| {
        Error::Usage(format!(
            "S3 location {location:?}: {why}; expected s3://BUCKET/PREFIX"
        ))
    };
    let rest = location
        .strip_prefix("s3://")
        .ok_or_else(|| bad("not an s3:// URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !valid_bucket {
        return Err(bad(
            "a bucket name is 3 to 63 lower-case letters, digits, dots and hyphens",
        ));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|s| s == "." || s == "..") || prefix.contains("//") {
        return Err(bad("the prefix may not hold empty, . or .. segments"));
    }
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.to_string(), prefix))
}

/// S3's URI encoding: unreserved characters as they are, `/` too in paths, all else `%XX`.
fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh random tag naming one write (128 bits, hex).
fn write_tag() -> String {
    let mut r = [0u8; 16];
    if getrandom::fill(&mut r).is_err() {
        // Only tells our write from another's: uniqueness per process and instant suffices.
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        r = (t ^ u128::from(std::process::id())).to_le_bytes();
    }
    hex(&r)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Text of the first element named `name` in an XML body.
fn xml_text(body: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let doc = roxmltree::Document::parse(text).ok()?;
    doc.descendants()
        .find(|n| n.tag_name().name() == name)
        .map(|n| n.text().unwrap_or("").to_string())
}

/// `Retry-After` in seconds (the HTTP-date form is left to the backoff).
fn retry_after(r: &Response) -> Option<Duration> {
    r.header("retry-after")?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

#[derive(Debug)]
struct ListPage {
    /// Key, size and last modification of each object.
    objects: Vec<(String, u64, Option<std::time::SystemTime>)>,
    next: Option<String>,
}

fn parse_list(body: &[u8]) -> std::result::Result<ListPage, String> {
    let text = std::str::from_utf8(body).map_err(|_| "not UTF-8".to_string())?;
    let doc = roxmltree::Document::parse(text).map_err(|e| e.to_string())?;
    let root = doc.root_element();
    if root.tag_name().name() != "ListBucketResult" {
        return Err(format!("root element {}", root.tag_name().name()));
    }
    let child_text = |n: roxmltree::Node<'_, '_>, name: &str| {
        n.children()
            .find(|c| c.tag_name().name() == name)
            .map(|c| c.text().unwrap_or("").to_string())
    };
    let mut objects = Vec::new();
    for c in root
        .children()
        .filter(|c| c.tag_name().name() == "Contents")
    {
        let key = child_text(c, "Key").ok_or("an entry without a Key")?;
        let size = child_text(c, "Size")
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| format!("entry {key} without a valid Size"))?;
        // ISO 8601 (`2026-11-30T03:45:47.000Z`); absent or odd, the age is unknown.
        let modified = child_text(c, "LastModified").and_then(|t| {
            time::OffsetDateTime::parse(t.trim(), &time::format_description::well_known::Rfc3339)
                .ok()
                .map(std::time::SystemTime::from)
        });
        objects.push((key, size, modified));
    }
    let truncated = child_text(root, "IsTruncated").is_some_and(|t| t.trim() == "true");
    let next = child_text(root, "NextContinuationToken").filter(|t| !t.is_empty());
    if truncated && next.is_none() {
        return Err("truncated without a NextContinuationToken".into());
    }
    Ok(ListPage {
        objects,
        next: if truncated { next } else { None },
    })
}

/// The service's error code and first message line (a HEAD answer has neither: the status
/// stands in for the code, as S3 names it).
fn service_error(r: &Response) -> (String, String) {
    let (code, message) = http_error::error_body(r.status, &r.body);
    let code = if code.is_empty() {
        match r.status {
            403 => "AccessDenied".into(),
            404 => "NotFound".into(),
            412 => "PreconditionFailed".into(),
            s => format!("Http{s}"),
        }
    } else {
        code
    };
    (code, message)
}

/// Sorts a ureq failure into retryable (no answer) or not; the message carries no URL.
fn classify(e: ureq::Error) -> Attempt {
    match http_error::classify(e) {
        NoAnswer::Retry(why) => Attempt::Failed(why),
        NoAnswer::Fatal(why) => Attempt::Fatal(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(location: &str, options: S3Options) -> Result<S3Backend> {
        S3Backend::new(
            location,
            options,
            S3Credentials::new("AKID", "SECRET", None),
        )
    }

    #[test]
    fn parses_locations() -> Result<()> {
        assert_eq!(
            parse_location("s3://bucket/a/b/")?,
            ("bucket".to_string(), "a/b/".to_string())
        );
        assert_eq!(
            parse_location("s3://my.bucket")?,
            ("my.bucket".to_string(), String::new())
        );
        for bad in [
            "s3://",
            "s3://B/x",
            "azure://a/b",
            "s3://ab",
            "s3://b-/x",
            "s3://bkt/a/../b",
        ] {
            assert!(
                matches!(parse_location(bad), Err(Error::Usage(_))),
                "{bad} accepted"
            );
        }
        Ok(())
    }

    #[test]
    fn addresses_path_and_virtual_host_style() -> Result<()> {
        let key = "pre/packs/ab/x y";
        let aws = backend("s3://bkt/pre", S3Options::default())?;
        let call = Call::new(Kind::Get, "GET", Some(key));
        assert_eq!(
            aws.url(&call),
            "https://bkt.s3.us-east-1.amazonaws.com/pre/packs/ab/x%20y"
        );
        let custom = S3Options {
            endpoint: Some("http://127.0.0.1:9000".into()),
            ..S3Options::default()
        };
        let minio = backend("s3://bkt/pre", custom.clone())?;
        assert_eq!(
            minio.url(&call),
            "http://127.0.0.1:9000/bkt/pre/packs/ab/x%20y"
        );
        let mut list = Call::new(Kind::List, "GET", None);
        list.query.push(("prefix", "pre/packs/".into()));
        assert_eq!(
            minio.url(&list),
            "http://127.0.0.1:9000/bkt?prefix=pre%2Fpacks%2F"
        );
        let forced = backend(
            "s3://bkt",
            S3Options {
                addressing: Addressing::VirtualHost,
                ..custom
            },
        )?;
        assert_eq!(
            forced.url(&list),
            "http://bkt.127.0.0.1:9000/?prefix=pre%2Fpacks%2F"
        );
        // Dots in a bucket name break virtual-host TLS certificates.
        let dotted = backend("s3://my.bkt", S3Options::default())?;
        assert_eq!(
            dotted.url(&call),
            "https://s3.us-east-1.amazonaws.com/my.bkt/pre/packs/ab/x%20y"
        );
        Ok(())
    }

    #[test]
    fn credentials_never_show() {
        let c = S3Credentials::new("AKID", "TOPSECRET", Some("TOKEN"));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("TOPSECRET") && !shown.contains("TOKEN"),
            "{shown}"
        );
    }

    #[test]
    fn parses_content_range_and_lists() {
        assert_eq!(content_range("bytes 3-4/5"), Some((3, 5, Some(5))));
        assert_eq!(content_range("bytes 0-9/*"), Some((0, 10, None)));
        assert_eq!(content_range("bytes x-9/5"), None);
        let page = parse_list(
            b"<ListBucketResult><IsTruncated>true</IsTruncated>\
              <Contents><Key>p/a</Key><Size>5</Size>\
              <LastModified>2026-11-30T03:45:47.000Z</LastModified></Contents>\
              <NextContinuationToken>t1</NextContinuationToken></ListBucketResult>",
        );
        let page = page.map_err(|e| e.to_string());
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_010_347);
        assert!(
            matches!(&page, Ok(p) if p.objects == vec![("p/a".to_string(), 5, Some(when))]
            && p.next.as_deref() == Some("t1")),
            "{page:?}"
        );
        assert!(parse_list(
            b"<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>"
        )
        .is_err());
        assert!(parse_list(b"<Error/>").is_err());
    }
}
