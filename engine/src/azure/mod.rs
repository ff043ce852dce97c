//! A small blocking client for the Azure Blob REST API, enough for page blob disks.
//!
//! Job: address one blob (SAS URL, or account + Shared Key), and run the few operations a disk
//! backup and restore need: properties, ranged reads, Get Page Ranges (optionally a diff
//! against a blob snapshot), Create Page Blob, Put Page (update and clear). Every request is
//! retried with exponential backoff and full jitter on 408/429/500/502/503/504 and on
//! connection failures, resets and timeouts, a bounded number of times.
//!
//! Invariants:
//! - Secrets never leave the request: URLs shown anywhere (errors, reports, manifests) go
//!   through [`redact`], which drops the query string; service error bodies are reduced to
//!   their `Code` and `Message`, with any `sig=` scrubbed.
//! - The service version is chosen by the [`Profile`]: current Azure, or Azure Stack Hub
//!   (2019-02-02 unless overridden). On Stack Hub, a `400 InvalidHeaderValue` naming
//!   `x-ms-version` steps down once to 2017-11-09 and records a note saying so.
//! - Get Page Ranges is asked in windows of [`PAGE_RANGE_WINDOW`] bytes, never relying on
//!   continuation markers, which older service versions lack.

pub mod pagewriter;
pub mod sign;

use std::io::Read as _;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::format::page_list::{self, ChangeKind, ChangedRange};
use sign::SharedKey;

/// Service version sent to Azure.
pub const AZURE_API_VERSION: &str = "2021-08-06";
/// Service version sent to Azure Stack Hub by default.
pub const AZURESTACK_API_VERSION: &str = "2019-02-02";
/// What an older Azure Stack Hub accepts when it refuses [`AZURESTACK_API_VERSION`].
pub const AZURESTACK_FALLBACK_VERSION: &str = "2017-11-09";
/// Bytes of the blob covered by one Get Page Ranges request.
pub const PAGE_RANGE_WINDOW: u64 = 1 << 30;
/// Largest Put Page body.
pub const MAX_PUT_PAGE: usize = 4 << 20;
/// Azure Stack Hub: largest page blob (1 TB, taken as 1 TiB), and largest managed disk.
pub const AZURESTACK_MAX_PAGE_BLOB: u64 = 1 << 40;
pub const AZURESTACK_MAX_MANAGED_DISK: u64 = 1023 << 30;
/// Azure: largest page blob.
pub const AZURE_MAX_PAGE_BLOB: u64 = 8 << 40;

/// Which cloud the blob lives in; decides the service version and limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Profile {
    #[default]
    Azure,
    AzureStack,
}

impl Profile {
    /// Parses `azure` or `azurestack`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "azure" => Ok(Profile::Azure),
            "azurestack" | "azurestackhub" => Ok(Profile::AzureStack),
            other => Err(Error::Usage(format!(
                "--target-profile {other:?}: use azure or azurestack"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Azure => "azure",
            Profile::AzureStack => "azurestack",
        }
    }

    /// The service version sent unless overridden.
    pub fn default_api_version(self) -> &'static str {
        match self {
            Profile::Azure => AZURE_API_VERSION,
            Profile::AzureStack => AZURESTACK_API_VERSION,
        }
    }

    /// Alignment of data written with Put Page.
    pub fn page_align(self) -> u64 {
        match self {
            Profile::Azure => 512,
            Profile::AzureStack => 4096,
        }
    }
}

/// How hard to try.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub tries: u32,
    /// First backoff; doubles per retry, with full jitter.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Time limit of one attempt (connect, send, receive).
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            tries: 6,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            timeout: Duration::from_secs(120),
        }
    }
}

/// How to reach a blob.
#[derive(Clone, Default)]
pub struct BlobOptions {
    pub profile: Profile,
    /// Service version instead of the profile's.
    pub api_version: Option<String>,
    /// Blob endpoint of the account for `azure://account/container/blob`
    /// (default `https://ACCOUNT.blob.core.windows.net`).
    pub endpoint: Option<String>,
    /// Account key (base64) for Shared Key; read by the caller from an environment variable.
    pub account_key: Option<String>,
    pub retry: RetryPolicy,
}

impl std::fmt::Debug for BlobOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobOptions")
            .field("profile", &self.profile)
            .field("api_version", &self.api_version)
            .field("endpoint", &self.endpoint)
            .field(
                "account_key",
                &self.account_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// True when `s` names a blob rather than a local path.
pub fn is_blob_url(s: &str) -> bool {
    s.starts_with("https://") || s.starts_with("http://") || s.starts_with("azure://")
}

/// `url` with its query string (SAS) replaced by `?<redacted>`.
pub fn redact(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?<redacted>"),
        None => url.to_string(),
    }
}

/// `url` without its query string: identifies the blob independently of its SAS.
pub fn without_query(url: &str) -> &str {
    url.split_once('?').map_or(url, |(b, _)| b)
}

/// What Get Blob Properties said.
#[derive(Clone, Debug)]
pub struct BlobProperties {
    pub size: u64,
    pub blob_type: String,
    pub etag: Option<String>,
}

/// A written (or cleared) byte range of a page blob, end exclusive.
pub type PageRange = (u64, u64);

enum Auth {
    /// The query string of a SAS URL (without `?`).
    Sas(String),
    SharedKey(SharedKey),
    /// Public blob or a stub in tests.
    Anonymous,
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
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
    /// No answer: the connection failed, was reset or timed out.
    Failed(String),
    /// No point retrying (a malformed request).
    Fatal(String),
}

/// One blob and how to talk to it. Cheap to share between threads (`&BlobClient` is `Sync`);
/// connections are pooled.
pub struct BlobClient {
    agent: ureq::Agent,
    /// `scheme://host[:port]`
    origin: String,
    /// URL path as sent, starting with `/`.
    path: String,
    /// Path of the blob's container.
    container_path: String,
    auth: Auth,
    /// Redacted URL, the only form shown to anyone.
    shown: String,
    profile: Profile,
    version: Mutex<String>,
    retry: RetryPolicy,
    notes: Mutex<Vec<String>>,
}

impl std::fmt::Debug for BlobClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobClient({})", self.shown)
    }
}

impl BlobClient {
    /// Addresses the blob at `url`: `https://…/container/blob?SAS`, `http://127.0.0.1:P/account/
    /// container/blob` (path style, as Azurite serves), or `azure://account/container/blob`
    /// with `options.endpoint`. Shared Key is used when `options.account_key` is set.
    pub fn new(url: &str, options: &BlobOptions) -> Result<Self> {
        let bad = |why: &str| Error::InvalidArgument(format!("blob URL {}: {why}", redact(url)));
        let (full, account_hint) = if let Some(rest) = url.strip_prefix("azure://") {
            let (account, path) = rest
                .split_once('/')
                .ok_or_else(|| bad("expected azure://ACCOUNT/CONTAINER/BLOB"))?;
            if account.is_empty() || !path.contains('/') {
                return Err(bad("expected azure://ACCOUNT/CONTAINER/BLOB"));
            }
            let endpoint = options
                .endpoint
                .clone()
                .unwrap_or_else(|| format!("https://{account}.blob.core.windows.net"));
            if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
                return Err(bad("--endpoint must be an http:// or https:// URL"));
            }
            (
                format!("{}/{path}", endpoint.trim_end_matches('/')),
                Some(account.to_string()),
            )
        } else {
            (url.to_string(), None)
        };
        let (scheme, rest) = full.split_once("://").ok_or_else(|| bad("not a URL"))?;
        if scheme != "http" && scheme != "https" {
            return Err(bad("scheme must be https, http or azure"));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q.to_string())),
            None => (rest, None),
        };
        let (host, path) = before_query
            .split_once('/')
            .ok_or_else(|| bad("no container and blob in the path"))?;
        if host.is_empty() || path.split('/').filter(|s| !s.is_empty()).count() < 2 {
            return Err(bad("expected …/CONTAINER/BLOB"));
        }
        let path = format!("/{path}");
        let origin = format!("{scheme}://{host}");
        let hostname = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let path_style = hostname == "localhost"
            || hostname.parse::<std::net::IpAddr>().is_ok()
            || hostname.starts_with('[');
        let account = match account_hint {
            Some(a) => a,
            None if path_style => path
                .split('/')
                .find(|s| !s.is_empty())
                .unwrap_or_default()
                .to_string(),
            None => hostname.split('.').next().unwrap_or_default().to_string(),
        };
        // Path style puts the account first: /account/container/blob.
        let container_path: String = path
            .split('/')
            .filter(|s| !s.is_empty())
            .take(1 + usize::from(path_style))
            .fold(String::new(), |acc, s| acc + "/" + s);
        let auth = match (&options.account_key, query) {
            (Some(key), _) => Auth::SharedKey(SharedKey::new(&account, key)?),
            (None, Some(q)) if !q.is_empty() => Auth::Sas(q),
            _ => Auth::Anonymous,
        };
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(options.retry.timeout))
            .max_idle_connections_per_host(64)
            .user_agent(concat!("stackvault/", env!("CARGO_PKG_VERSION")))
            .build();
        let version = options
            .api_version
            .clone()
            .unwrap_or_else(|| options.profile.default_api_version().to_string());
        Ok(BlobClient {
            agent: ureq::Agent::new_with_config(config),
            shown: redact(&format!(
                "{origin}{path}{}",
                if matches!(auth, Auth::Sas(_)) {
                    "?sas"
                } else {
                    ""
                }
            )),
            origin,
            path,
            container_path,
            auth,
            profile: options.profile,
            version: Mutex::new(version),
            retry: options.retry,
            notes: Mutex::new(Vec::new()),
        })
    }

    /// The URL as it may be shown: no query string.
    pub fn display_url(&self) -> &str {
        &self.shown
    }

    /// The blob's URL without query: identifies it independently of any SAS.
    pub fn identity(&self) -> String {
        format!("{}{}", self.origin, self.path)
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// The service version in use (after any step-down).
    pub fn api_version(&self) -> String {
        self.version.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Things worth telling the operator (a service version step-down).
    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().map(|n| n.clone()).unwrap_or_default()
    }

    /// Get Blob Properties; `None` when the blob does not exist.
    pub fn properties(&self) -> Result<Option<BlobProperties>> {
        let r = self.execute("HEAD", &[], &[], None, &[200, 404])?;
        if r.status == 404 {
            return Ok(None);
        }
        let size = r
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| self.protocol("HEAD answer without a Content-Length"))?;
        Ok(Some(BlobProperties {
            size,
            blob_type: r.header("x-ms-blob-type").unwrap_or("").to_string(),
            etag: r.header("etag").map(str::to_string),
        }))
    }

    /// Reads `buf.len()` bytes at `offset`; with `if_match`, fails if the blob changed.
    pub fn read_range(&self, offset: u64, buf: &mut [u8], if_match: Option<&str>) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut headers = vec![(
            "x-ms-range".to_string(),
            format!("bytes={offset}-{}", offset + buf.len() as u64 - 1),
        )];
        if let Some(etag) = if_match {
            headers.push(("If-Match".to_string(), etag.to_string()));
        }
        let r = self.execute("GET", &[], &headers, None, &[200, 206])?;
        if r.body.len() != buf.len() {
            return Err(self.protocol(&format!(
                "asked for {} bytes at offset {offset}, got {}",
                buf.len(),
                r.body.len()
            )));
        }
        buf.copy_from_slice(&r.body);
        Ok(())
    }

    /// Written page ranges in `[start, end)`, or with `prev_snapshot` the ranges written and
    /// cleared since that blob snapshot, asked in windows of [`PAGE_RANGE_WINDOW`] bytes and
    /// clipped to the window. `end` is rounded up to 512 bytes.
    pub fn page_ranges(
        &self,
        start: u64,
        end: u64,
        prev_snapshot: Option<&str>,
    ) -> Result<Vec<ChangedRange>> {
        let end = end.div_ceil(512).saturating_mul(512);
        let mut ranges: Vec<ChangedRange> = Vec::new();
        let mut pos = start;
        while pos < end {
            let wend = (pos - pos % PAGE_RANGE_WINDOW)
                .saturating_add(PAGE_RANGE_WINDOW)
                .min(end);
            // A large answer comes in pages: each names the marker to ask for the next one.
            let mut marker: Option<String> = None;
            loop {
                let mut query = vec![("comp".to_string(), "pagelist".to_string())];
                if let Some(p) = prev_snapshot {
                    query.push(("prevsnapshot".to_string(), p.to_string()));
                }
                if let Some(m) = &marker {
                    query.push(("marker".to_string(), m.clone()));
                }
                let headers = [(
                    "x-ms-range".to_string(),
                    format!("bytes={pos}-{}", wend - 1),
                )];
                let r = self.execute("GET", &query, &headers, None, &[200])?;
                let text = String::from_utf8_lossy(&r.body);
                let (list, next) = page_list::parse_page(&text, &self.shown)?;
                for c in &list {
                    let (s, e) = (c.offset.max(pos), c.end().min(wend));
                    if s >= e {
                        continue;
                    }
                    // Adjacent ranges split by the window boundary (or a page) join again.
                    match ranges.last_mut() {
                        Some(last) if last.kind == c.kind && last.end() == s => last.len += e - s,
                        _ => ranges.push(ChangedRange {
                            offset: s,
                            len: e - s,
                            kind: c.kind,
                        }),
                    }
                }
                match next {
                    Some(m) if marker.as_deref() == Some(m.as_str()) => {
                        return Err(Error::source_damaged(
                            &self.shown,
                            pos,
                            format!("Get Page Ranges repeats its NextMarker {m}"),
                        ))
                    }
                    Some(m) => marker = Some(m),
                    None => break,
                }
            }
            pos = wend;
        }
        page_list::normalize(ranges, None, &self.shown)
    }

    /// Written ranges of `[start, end)` as `(start, end)` pairs.
    pub fn written_ranges(&self, start: u64, end: u64) -> Result<Vec<PageRange>> {
        Ok(self
            .page_ranges(start, end, None)?
            .iter()
            .filter(|r| r.kind == ChangeKind::Written)
            .map(|r| (r.offset, r.end()))
            .collect())
    }

    /// Create Container for the blob's container; one that exists already is fine.
    pub fn create_container(&self) -> Result<()> {
        let query = [("restype".to_string(), "container".to_string())];
        self.execute_at(
            &self.container_path,
            "PUT",
            &query,
            &[],
            Some(&[]),
            &[201, 409],
        )?;
        Ok(())
    }

    /// Create Page Blob of `size` bytes (a multiple of 512), replacing any blob there.
    pub fn create_page_blob(&self, size: u64) -> Result<()> {
        let headers = [
            ("x-ms-blob-type".to_string(), "PageBlob".to_string()),
            ("x-ms-blob-content-length".to_string(), size.to_string()),
        ];
        self.execute("PUT", &[], &headers, Some(&[]), &[201])?;
        Ok(())
    }

    /// Put Page: writes `data` (a multiple of 512 bytes, at most 4 MiB) at `offset`.
    pub fn put_pages(&self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.check_page_range(offset, data.len() as u64)?;
        let query = [("comp".to_string(), "page".to_string())];
        let headers = [
            ("x-ms-page-write".to_string(), "update".to_string()),
            (
                "x-ms-range".to_string(),
                format!("bytes={offset}-{}", offset + data.len() as u64 - 1),
            ),
            (
                "Content-Type".to_string(),
                "application/octet-stream".to_string(),
            ),
        ];
        self.execute("PUT", &query, &headers, Some(data), &[201])?;
        Ok(())
    }

    /// Put Page with `clear`: `[offset, offset + len)` reads as zeros afterwards.
    pub fn clear_pages(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
            return Err(Error::InvalidArgument(format!(
                "page range {offset}+{len} is not 512-byte aligned"
            )));
        }
        let query = [("comp".to_string(), "page".to_string())];
        let headers = [
            ("x-ms-page-write".to_string(), "clear".to_string()),
            (
                "x-ms-range".to_string(),
                format!("bytes={offset}-{}", offset + len - 1),
            ),
        ];
        self.execute("PUT", &query, &headers, Some(&[]), &[201])?;
        Ok(())
    }

    fn check_page_range(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(512) || !len.is_multiple_of(512) || len as usize > MAX_PUT_PAGE {
            return Err(Error::InvalidArgument(format!(
                "Put Page of {len} bytes at {offset}: must be 512-byte aligned and at most 4 MiB"
            )));
        }
        Ok(())
    }

    fn protocol(&self, what: &str) -> Error {
        Error::Http {
            url: self.shown.clone(),
            status: 0,
            code: "UnexpectedAnswer".into(),
            message: what.to_string(),
        }
    }

    fn execute(
        &self,
        method: &'static str,
        query: &[(String, String)],
        headers: &[(String, String)],
        body: Option<&[u8]>,
        ok: &[u16],
    ) -> Result<Response> {
        self.execute_at(&self.path, method, query, headers, body, ok)
    }

    /// Runs a request on `path` with retries; answers with a status in `ok` are returned.
    fn execute_at(
        &self,
        path: &str,
        method: &'static str,
        query: &[(String, String)],
        headers: &[(String, String)],
        body: Option<&[u8]>,
        ok: &[u16],
    ) -> Result<Response> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let version = self.api_version();
            let retry_reason = match self.attempt(path, method, query, headers, body, &version) {
                Attempt::Answer(r) if ok.contains(&r.status) => return Ok(r),
                Attempt::Answer(r) => {
                    let (code, message) = service_error(&r);
                    if self.should_step_down(&r, &code, &version) {
                        let note = format!(
                            "Azure Stack Hub refused x-ms-version {version}; stepped down to \
                             {AZURESTACK_FALLBACK_VERSION}"
                        );
                        eprintln!("stackvault: {note}");
                        if let Ok(mut v) = self.version.lock() {
                            *v = AZURESTACK_FALLBACK_VERSION.to_string();
                        }
                        if let Ok(mut n) = self.notes.lock() {
                            n.push(note);
                        }
                        attempt -= 1;
                        continue;
                    }
                    if !matches!(r.status, 408 | 429 | 500 | 502 | 503 | 504)
                        || attempt >= self.retry.tries
                    {
                        return Err(Error::Http {
                            url: self.shown.clone(),
                            status: r.status,
                            code,
                            message: if attempt > 1 {
                                format!("{message} (after {attempt} tries)")
                            } else {
                                message
                            },
                        });
                    }
                    format!("HTTP {}", r.status)
                }
                Attempt::Failed(why) if attempt < self.retry.tries => why,
                Attempt::Failed(why) => {
                    return Err(Error::Network {
                        url: self.shown.clone(),
                        tries: attempt,
                        message: why,
                    })
                }
                Attempt::Fatal(why) => {
                    return Err(Error::Network {
                        url: self.shown.clone(),
                        tries: attempt,
                        message: why,
                    })
                }
            };
            let _ = retry_reason;
            std::thread::sleep(self.backoff(attempt));
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

    /// Full jitter: uniform in [0, min(max, base * 2^(attempt-1))].
    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .retry
            .base_delay
            .saturating_mul(1u32 << (attempt - 1).min(16))
            .min(self.retry.max_delay);
        let mut r = [0u8; 8];
        let frac = match getrandom::fill(&mut r) {
            Ok(()) => (u64::from_le_bytes(r) >> 11) as f64 / (1u64 << 53) as f64,
            Err(_) => 0.5,
        };
        cap.mul_f64(frac)
    }

    fn attempt(
        &self,
        path: &str,
        method: &'static str,
        query: &[(String, String)],
        headers: &[(String, String)],
        body: Option<&[u8]>,
        version: &str,
    ) -> Attempt {
        let mut all: Vec<(String, String)> = headers.to_vec();
        all.push(("x-ms-version".into(), version.to_string()));
        all.push(("x-ms-date".into(), http_date(SystemTime::now())));
        let mut q: Vec<(String, String)> = query.to_vec();
        if let Auth::SharedKey(key) = &self.auth {
            if let Some(b) = body {
                all.push(("Content-Length".into(), b.len().to_string()));
            }
            let auth = key.authorization(method, path, &q, &all);
            // Content-Length is set by the HTTP client from the body; it was only signed.
            all.retain(|(k, _)| k != "Content-Length");
            all.push(("Authorization".into(), auth));
        }
        let mut url = format!("{}{}", self.origin, path);
        let mut parts: Vec<String> = q
            .drain(..)
            .map(|(k, v)| format!("{}={}", sign::encode(&k), sign::encode(&v)))
            .collect();
        if let Auth::Sas(sas) = &self.auth {
            parts.push(sas.clone());
        }
        if !parts.is_empty() {
            url.push('?');
            url.push_str(&parts.join("&"));
        }
        let result = match (method, body) {
            ("PUT", b) => {
                let mut rb = self.agent.put(&url);
                for (k, v) in &all {
                    rb = rb.header(k.as_str(), v.as_str());
                }
                rb.send(b.unwrap_or(&[]))
            }
            ("HEAD", _) => {
                let mut rb = self.agent.head(&url);
                for (k, v) in &all {
                    rb = rb.header(k.as_str(), v.as_str());
                }
                rb.call()
            }
            _ => {
                let mut rb = self.agent.get(&url);
                for (k, v) in &all {
                    rb = rb.header(k.as_str(), v.as_str());
                }
                rb.call()
            }
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
        if method != "HEAD" {
            let mut reader = resp.body_mut().as_reader();
            if let Err(e) = reader.read_to_end(&mut body) {
                return Attempt::Failed(format!("reading the answer: {e}"));
            }
        }
        Attempt::Answer(Response {
            status,
            headers,
            body,
        })
    }
}

/// Sorts a ureq failure into retryable (no answer) or not; the message carries no URL.
fn classify(e: ureq::Error) -> Attempt {
    match e {
        ureq::Error::Io(_)
        | ureq::Error::Timeout(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::Protocol(_)
        | ureq::Error::HostNotFound => Attempt::Failed(e.to_string()),
        // Its text would carry the URL, SAS included.
        ureq::Error::BadUri(_) => Attempt::Fatal("malformed URL".into()),
        other => Attempt::Fatal(other.to_string()),
    }
}

/// The service's error code and message from an error answer, scrubbed of signatures.
fn service_error(r: &Response) -> (String, String) {
    let text = String::from_utf8_lossy(&r.body);
    let mut code = r.header("x-ms-error-code").unwrap_or("").to_string();
    let mut message = String::new();
    if let Ok(doc) = roxmltree::Document::parse(&text) {
        for n in doc.descendants() {
            match n.tag_name().name() {
                "Code" if code.is_empty() => code = n.text().unwrap_or("").trim().to_string(),
                "Message" => {
                    message = n
                        .text()
                        .unwrap_or("")
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_string()
                }
                _ => {}
            }
        }
    }
    if message.is_empty() {
        message = match r.status {
            403 => "access denied (check the SAS or key)".into(),
            404 => "not found".into(),
            s => format!("HTTP status {s}"),
        };
    }
    if let Some(i) = message.find("sig=") {
        message.truncate(i);
        message.push_str("<redacted>");
    }
    (code, message)
}

/// An RFC 1123 date (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn http_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dt = time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[dt.weekday().number_days_from_monday() as usize],
        dt.day(),
        MONTHS[dt.month() as usize - 1],
        dt.year(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_queries() {
        assert_eq!(
            redact("https://a.blob.core.windows.net/c/b.vhd?sv=1&sig=SECRET"),
            "https://a.blob.core.windows.net/c/b.vhd?<redacted>"
        );
        assert_eq!(redact("azure://a/c/b"), "azure://a/c/b");
    }

    #[test]
    fn parses_url_forms() -> Result<()> {
        let o = BlobOptions::default();
        let c = BlobClient::new(
            "https://acct.blob.core.windows.net/vhds/d.vhd?sv=x&sig=S",
            &o,
        )?;
        assert_eq!(
            c.identity(),
            "https://acct.blob.core.windows.net/vhds/d.vhd"
        );
        assert!(!c.display_url().contains('S'));
        let o = BlobOptions {
            endpoint: Some("http://127.0.0.1:10000/devstoreaccount1".into()),
            account_key: Some("AAAA".into()),
            ..Default::default()
        };
        let c = BlobClient::new("azure://devstoreaccount1/c/b.vhd", &o)?;
        assert_eq!(
            c.identity(),
            "http://127.0.0.1:10000/devstoreaccount1/c/b.vhd"
        );
        assert!(BlobClient::new("azure://acct", &o).is_err());
        assert!(BlobClient::new("https://host/onlycontainer", &BlobOptions::default()).is_err());
        assert!(BlobClient::new("ftp://x/c/b", &BlobOptions::default()).is_err());
        Ok(())
    }

    #[test]
    fn http_date_format() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
    }
}
