//! The blocking HTTP client every Blob service call goes through.
//!
//! Job: send one REST request to an account (origin) with its authentication (a SAS in the
//! query, or a Shared Key `Authorization` header), the service version of the [`Profile`], a
//! fresh `x-ms-date`; retry it as [`super::retry`] says; step down the service version once
//! on Azure Stack Hub; count the requests made by kind. Page-blob calls
//! ([`super::BlobClient`]) and the block-blob repository backend
//! ([`crate::store::AzureBlobBackend`]) are built on [`Client::request`], and a new REST call
//! is one more call of it in the file that needs it.
//!
//! Invariants:
//! - The URL shown in errors is `origin + path`, never the query (which holds the SAS); the
//!   account key only ever enters the `Authorization` header.
//! - An answer whose status is not in the request's `ok` list is an error carrying that
//!   status and the service's code; only transient ones are retried.
//! - A body shorter than its `Content-Length` is never returned as an answer: it is a failed
//!   attempt, retried like a reset connection.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use super::error::{classify, service_error, Attempt};
use super::retry::{retry_after, RetryPolicy};
use super::sign::{self, SharedKey};
use super::{Profile, AZURESTACK_FALLBACK_VERSION};
use crate::error::{Error, Result};
use crate::http_error::is_transient;

/// How requests are authorised.
pub(crate) enum Auth {
    /// The query string of a SAS (without `?`).
    Sas(String),
    SharedKey(SharedKey),
    /// Public blob or a stub in tests.
    Anonymous,
}

/// HTTP methods the Blob service calls use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Head,
    Put,
    Delete,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

/// Which REST operation a request is, for the request counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    GetBlob,
    GetBlobProperties,
    PutBlob,
    PutBlock,
    PutBlockList,
    ListBlobs,
    DeleteBlob,
    CreateContainer,
    GetPageRanges,
    PutPage,
    SetBlobMetadata,
    SetBlobProperties,
    SnapshotBlob,
    LeaseBlob,
}

impl RequestKind {
    const ALL: [RequestKind; 14] = [
        RequestKind::GetBlob,
        RequestKind::GetBlobProperties,
        RequestKind::PutBlob,
        RequestKind::PutBlock,
        RequestKind::PutBlockList,
        RequestKind::ListBlobs,
        RequestKind::DeleteBlob,
        RequestKind::CreateContainer,
        RequestKind::GetPageRanges,
        RequestKind::PutPage,
        RequestKind::SetBlobMetadata,
        RequestKind::SetBlobProperties,
        RequestKind::SnapshotBlob,
        RequestKind::LeaseBlob,
    ];

    /// The name used in reports (`put_block_list`).
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::GetBlob => "get_blob",
            RequestKind::GetBlobProperties => "get_blob_properties",
            RequestKind::PutBlob => "put_blob",
            RequestKind::PutBlock => "put_block",
            RequestKind::PutBlockList => "put_block_list",
            RequestKind::ListBlobs => "list_blobs",
            RequestKind::DeleteBlob => "delete_blob",
            RequestKind::CreateContainer => "create_container",
            RequestKind::GetPageRanges => "get_page_ranges",
            RequestKind::PutPage => "put_page",
            RequestKind::SetBlobMetadata => "set_blob_metadata",
            RequestKind::SetBlobProperties => "set_blob_properties",
            RequestKind::SnapshotBlob => "snapshot_blob",
            RequestKind::LeaseBlob => "lease_blob",
        }
    }
}

/// Requests sent, by kind, retries included (each attempt is a request the service bills).
#[derive(Debug, Default)]
pub struct RequestCounter {
    by_kind: [AtomicU64; RequestKind::ALL.len()],
    retries: AtomicU64,
}

impl RequestCounter {
    fn count(&self, kind: RequestKind) {
        if let Some(i) = RequestKind::ALL.iter().position(|k| *k == kind) {
            self.by_kind[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests of one kind so far.
    pub fn get(&self, kind: RequestKind) -> u64 {
        RequestKind::ALL
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.by_kind[i].load(Ordering::Relaxed))
    }

    /// Attempts that were repeats of an earlier failed one.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Every kind with its count (zeros included, so a report's shape is stable), plus
    /// `retries`; serialises as a JSON object.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let mut m: BTreeMap<&'static str, u64> = RequestKind::ALL
            .iter()
            .map(|k| (k.as_str(), self.get(*k)))
            .collect();
        m.insert("retries", self.retries());
        m
    }
}

/// One request: where, what, and which statuses are answers rather than errors.
pub(crate) struct Request<'a> {
    pub kind: RequestKind,
    pub method: Method,
    /// URL path as sent, starting with `/`.
    pub path: &'a str,
    pub query: &'a [(String, String)],
    pub headers: &'a [(String, String)],
    pub body: Option<&'a [u8]>,
    pub ok: &'a [u16],
}

impl<'a> Request<'a> {
    /// A request without query, headers or body whose only `ok` answer is 200.
    pub fn new(kind: RequestKind, method: Method, path: &'a str) -> Self {
        Request {
            kind,
            method,
            path,
            query: &[],
            headers: &[],
            body: None,
            ok: &[200],
        }
    }

    pub fn query(self, query: &'a [(String, String)]) -> Self {
        Request { query, ..self }
    }

    pub fn headers(self, headers: &'a [(String, String)]) -> Self {
        Request { headers, ..self }
    }

    pub fn body(self, body: &'a [u8]) -> Self {
        Request {
            body: Some(body),
            ..self
        }
    }

    pub fn ok(self, ok: &'a [u16]) -> Self {
        Request { ok, ..self }
    }
}

/// An answer with a status the caller listed as `ok`.
pub(crate) struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The unread body of a 200 or 206 answer to [`Client::request_streamed`].
    pub stream: Option<ureq::Body>,
    /// Attempts it took (1 = first try); >1 means an earlier attempt may have taken effect.
    pub attempts: u32,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One storage account endpoint and how to talk to it. `&Client` is `Sync`; connections are
/// pooled.
pub(crate) struct Client {
    agent: ureq::Agent,
    /// `scheme://host[:port]`
    origin: String,
    auth: Auth,
    profile: Profile,
    version: Mutex<String>,
    retry: RetryPolicy,
    notes: Mutex<Vec<String>>,
    pub counter: RequestCounter,
}

impl Client {
    pub fn new(
        origin: String,
        auth: Auth,
        profile: Profile,
        api_version: Option<String>,
        retry: RetryPolicy,
    ) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(retry.timeout))
            .max_idle_connections_per_host(64)
            .user_agent(concat!("stackvault/", env!("CARGO_PKG_VERSION")))
            .build();
        Client {
            agent: ureq::Agent::new_with_config(config),
            origin,
            auth,
            profile,
            version: Mutex::new(
                api_version.unwrap_or_else(|| profile.default_api_version().to_string()),
            ),
            retry,
            notes: Mutex::new(Vec::new()),
            counter: RequestCounter::default(),
        }
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// The service version in use (after any step-down).
    pub fn api_version(&self) -> String {
        self.version.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The retry policy requests are sent under (resumes of a streamed body follow it too).
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// Counts a resumed body (a new ranged GET after one cut off) as a retry.
    pub fn count_resume(&self) {
        self.counter.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Things worth telling the operator (a service version step-down).
    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().map(|n| n.clone()).unwrap_or_default()
    }

    /// Runs `req` with retries (see [`super::retry`]); an answer with a status in `req.ok` is
    /// returned, any other is an [`Error::Http`] with the service's code and message.
    pub fn request(&self, req: &Request<'_>) -> Result<Response> {
        self.request_with(req, false)
    }

    /// [`Client::request`] for a ranged read: the body of a 200 or 206 answer is left unread,
    /// in [`Response::stream`], for the caller to stream (and to hold to its length).
    pub fn request_streamed(&self, req: &Request<'_>) -> Result<Response> {
        self.request_with(req, true)
    }

    fn request_with(&self, req: &Request<'_>, streamed: bool) -> Result<Response> {
        let shown = format!("{}{}", self.origin, req.path);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let version = self.api_version();
            self.counter.count(req.kind);
            if attempt > 1 {
                self.counter.retries.fetch_add(1, Ordering::Relaxed);
            }
            let asked = match self.attempt(req, &version, streamed) {
                Attempt::Answer(mut r) if req.ok.contains(&r.status) => {
                    r.attempts = attempt;
                    return Ok(r);
                }
                Attempt::Answer(r) => {
                    let (code, message) = service_error(&r);
                    if self.should_step_down(&r, &code, &version) {
                        self.step_down(&version);
                        attempt -= 1;
                        continue;
                    }
                    if !is_transient(r.status) || attempt >= self.retry.tries {
                        return Err(Error::Http {
                            url: shown,
                            status: r.status,
                            code,
                            message: if attempt > 1 {
                                format!("{message} (after {attempt} tries)")
                            } else {
                                message
                            },
                        });
                    }
                    retry_after(r.header("retry-after"), SystemTime::now())
                }
                Attempt::Failed(_) if attempt < self.retry.tries => None,
                Attempt::Failed(why) => {
                    return Err(Error::Network {
                        url: shown,
                        tries: attempt,
                        message: why,
                    })
                }
                Attempt::Fatal(why) => {
                    return Err(Error::InvalidArgument(format!(
                        "{shown}: the request cannot be sent: {why}"
                    )))
                }
            };
            std::thread::sleep(self.retry.delay(attempt, asked));
        }
    }

    fn step_down(&self, refused: &str) {
        let note = format!(
            "Azure Stack Hub refused x-ms-version {refused}; stepped down to \
             {AZURESTACK_FALLBACK_VERSION}"
        );
        eprintln!("stackvault: {note}");
        if let Ok(mut v) = self.version.lock() {
            *v = AZURESTACK_FALLBACK_VERSION.to_string();
        }
        if let Ok(mut n) = self.notes.lock() {
            n.push(note);
        }
    }

    fn should_step_down(&self, r: &Response, code: &str, version: &str) -> bool {
        if self.profile != Profile::AzureStack
            || r.status != 400
            || code != "InvalidHeaderValue"
            || version == AZURESTACK_FALLBACK_VERSION
        {
            return false;
        }
        // The error names the header it refused; without a name, the version is the suspect.
        let body = String::from_utf8_lossy(&r.body).to_ascii_lowercase();
        !body.contains("<headername>") || body.contains("<headername>x-ms-version</headername>")
    }

    fn attempt(&self, req: &Request<'_>, version: &str, streamed: bool) -> Attempt {
        let method = req.method.as_str();
        let mut all: Vec<(String, String)> = req.headers.to_vec();
        all.push(("x-ms-version".into(), version.to_string()));
        all.push((
            "x-ms-date".into(),
            httpdate::fmt_http_date(SystemTime::now()),
        ));
        if let Auth::SharedKey(key) = &self.auth {
            if let Some(b) = req.body {
                all.push(("Content-Length".into(), b.len().to_string()));
            }
            let auth = key.authorization(method, req.path, req.query, &all);
            // Content-Length is set by the HTTP client from the body; it was only signed.
            all.retain(|(k, _)| k != "Content-Length");
            all.push(("Authorization".into(), auth));
        }
        let mut url = format!("{}{}", self.origin, req.path);
        let mut parts: Vec<String> = req
            .query
            .iter()
            .map(|(k, v)| format!("{}={}", sign::encode(k), sign::encode(v)))
            .collect();
        if let Auth::Sas(sas) = &self.auth {
            parts.push(sas.clone());
        }
        if !parts.is_empty() {
            url.push('?');
            url.push_str(&parts.join("&"));
        }
        macro_rules! with_headers {
            ($rb:expr) => {{
                let mut rb = $rb;
                for (k, v) in &all {
                    rb = rb.header(k.as_str(), v.as_str());
                }
                rb
            }};
        }
        let result = match req.method {
            Method::Put => with_headers!(self.agent.put(&url)).send(req.body.unwrap_or(&[])),
            Method::Head => with_headers!(self.agent.head(&url)).call(),
            Method::Delete => with_headers!(self.agent.delete(&url)).call(),
            Method::Get => with_headers!(self.agent.get(&url)).call(),
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => return classify(e),
        };
        let status = resp.status().as_u16();
        let headers: Vec<(String, String)> = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let mut body = Vec::new();
        let mut stream = None;
        if streamed && matches!(status, 200 | 206) {
            stream = Some(resp.into_body());
        } else if req.method != Method::Head {
            let expected = resp
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let mut reader = resp.body_mut().as_reader();
            if let Err(e) = reader.read_to_end(&mut body) {
                return Attempt::Failed(format!("reading the answer: {e}"));
            }
            if let Some(n) = expected {
                if body.len() as u64 != n {
                    return Attempt::Failed(format!(
                        "the answer was cut short: {} of {n} bytes",
                        body.len()
                    ));
                }
            }
        }
        Attempt::Answer(Response {
            status,
            headers,
            body,
            stream,
            attempts: 1,
        })
    }
}
