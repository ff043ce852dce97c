//! Page blobs: the REST calls a disk backup and restore make on one blob.
//!
//! Job: Get Blob Properties, ranged Get Blob, Get Page Ranges (optionally a diff against a
//! blob snapshot), Create Container, Create Page Blob, Put Page (update and clear), each one
//! [`Client::request`] with the blob's path.
//!
//! Invariants: Get Page Ranges is asked in windows of [`PAGE_RANGE_WINDOW`] bytes, never
//! relying on continuation markers alone, which older service versions lack; a Put Page is
//! checked for alignment and size before it is sent.

use super::client::{Auth, Client, Method, Request, RequestCounter, RequestKind, Response};
use super::sign::SharedKey;
use super::url::{parse, redact};
use super::{BlobOptions, BlobProperties, PageRange, Profile, MAX_PUT_PAGE, PAGE_RANGE_WINDOW};
use crate::error::{Error, Result};
use crate::format::page_list::{self, ChangeKind, ChangedRange};

/// One blob and how to talk to it. Cheap to share between threads (`&BlobClient` is `Sync`);
/// connections are pooled.
pub struct BlobClient {
    pub(super) client: Client,
    /// URL path as sent, starting with `/`.
    pub(super) path: String,
    /// Path of the blob's container.
    pub(super) container_path: String,
    /// Redacted URL, the only form shown to anyone.
    pub(super) shown: String,
    /// The lease this client holds on the blob (see `lease.rs`): sent with every write.
    pub(super) lease: std::sync::RwLock<Option<String>>,
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
        let address = parse(url, options.endpoint.as_deref(), 1)?;
        let auth = match (&options.account_key, &address.sas) {
            (Some(key), _) => Auth::SharedKey(SharedKey::new(&address.account, key)?),
            (None, Some(q)) => Auth::Sas(q.clone()),
            _ => Auth::Anonymous,
        };
        let shown = redact(&format!(
            "{}{}{}",
            address.origin,
            address.path,
            if matches!(auth, Auth::Sas(_)) {
                "?sas"
            } else {
                ""
            }
        ));
        Ok(BlobClient {
            client: Client::new(
                address.origin,
                auth,
                options.profile,
                options.api_version.clone(),
                options.retry,
            ),
            path: address.path,
            container_path: address.container_path,
            shown,
            lease: std::sync::RwLock::new(None),
        })
    }

    /// The URL as it may be shown: no query string.
    pub fn display_url(&self) -> &str {
        &self.shown
    }

    /// The blob's URL without query: identifies it independently of any SAS.
    pub fn identity(&self) -> String {
        format!("{}{}", self.client.origin(), self.path)
    }

    pub fn profile(&self) -> Profile {
        self.client.profile()
    }

    /// The service version in use (after any step-down).
    pub fn api_version(&self) -> String {
        self.client.api_version()
    }

    /// Things worth telling the operator (a service version step-down).
    pub fn notes(&self) -> Vec<String> {
        self.client.notes()
    }

    /// Requests sent so far, by kind.
    pub fn requests(&self) -> &RequestCounter {
        &self.client.counter
    }

    /// Get Blob Properties; `None` when the blob does not exist.
    pub fn properties(&self) -> Result<Option<BlobProperties>> {
        Ok(self.properties_and_metadata()?.map(|(p, _)| p))
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
        let r = self.execute(
            RequestKind::GetBlob,
            Method::Get,
            &[],
            &headers,
            None,
            &[200, 206],
        )?;
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
                let r = self.execute(
                    RequestKind::GetPageRanges,
                    Method::Get,
                    &query,
                    &headers,
                    None,
                    &[200],
                )?;
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
        self.client.request(&Request {
            kind: RequestKind::CreateContainer,
            method: Method::Put,
            path: &self.container_path,
            query: &query,
            headers: &[],
            body: Some(&[]),
            ok: &[201, 409],
        })?;
        Ok(())
    }

    /// Create Page Blob of `size` bytes (a multiple of 512), replacing any blob there.
    pub fn create_page_blob(&self, size: u64) -> Result<()> {
        let headers = [
            ("x-ms-blob-type".to_string(), "PageBlob".to_string()),
            ("x-ms-blob-content-length".to_string(), size.to_string()),
        ];
        self.execute(
            RequestKind::PutBlob,
            Method::Put,
            &[],
            &headers,
            Some(&[]),
            &[201],
        )?;
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
        self.execute(
            RequestKind::PutPage,
            Method::Put,
            &query,
            &headers,
            Some(data),
            &[201],
        )?;
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
        self.execute(
            RequestKind::PutPage,
            Method::Put,
            &query,
            &headers,
            Some(&[]),
            &[201],
        )?;
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

    pub(super) fn protocol(&self, what: &str) -> Error {
        Error::Http {
            url: self.shown.clone(),
            status: 0,
            code: "UnexpectedAnswer".into(),
            message: what.to_string(),
        }
    }

    pub(super) fn execute(
        &self,
        kind: RequestKind,
        method: Method,
        query: &[(String, String)],
        headers: &[(String, String)],
        body: Option<&[u8]>,
        ok: &[u16],
    ) -> Result<Response> {
        // A leased blob refuses writes that do not name its lease; a blob snapshot has no
        // lease of its own and refuses one.
        let on_snapshot = query.iter().any(|(k, _)| k == "snapshot");
        let lease = match method {
            Method::Put | Method::Delete if !on_snapshot => {
                self.lease.read().ok().and_then(|l| l.clone())
            }
            _ => None,
        };
        let with_lease: Vec<(String, String)>;
        let headers = match lease {
            Some(id) => {
                with_lease = headers
                    .iter()
                    .cloned()
                    .chain(std::iter::once(("x-ms-lease-id".to_string(), id)))
                    .collect();
                &with_lease[..]
            }
            None => headers,
        };
        self.client.request(&Request {
            kind,
            method,
            path: &self.path,
            query,
            headers,
            body,
            ok,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
