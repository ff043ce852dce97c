//! Blob metadata, conditional updates, resizing and blob snapshots: what a standby page blob
//! needs beyond reading and writing pages (see `format-spec/standby.md`).
//!
//! Invariants: a metadata update is always conditional (`If-Match` on the ETag the caller
//! read), so two writers of one blob's record cannot both succeed; a refused condition is
//! [`Error::VersionMismatch`], never retried here. Metadata names are lower-cased as the
//! service returns them; values are never shown in errors (they are ours, but the rule is
//! simple: only the redacted URL is).

use std::collections::BTreeMap;

use super::client::{Method, Request, RequestKind, Response};
use super::{BlobClient, BlobProperties};
use crate::error::{Error, Result};

/// Prefix of user metadata headers.
const META: &str = "x-ms-meta-";

/// A blob snapshot of this blob: its timestamp and its metadata (as of the snapshot).
#[derive(Clone, Debug)]
pub struct BlobSnapshot {
    pub snapshot: String,
    pub metadata: BTreeMap<String, String>,
}

impl BlobClient {
    /// Get Blob Properties with the blob's user metadata; `None` when the blob is absent.
    pub fn properties_and_metadata(
        &self,
    ) -> Result<Option<(BlobProperties, BTreeMap<String, String>)>> {
        let r = self.execute(
            RequestKind::GetBlobProperties,
            Method::Head,
            &[],
            &[],
            None,
            &[200, 404],
        )?;
        if r.status == 404 {
            return Ok(None);
        }
        let size = r
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| self.protocol("HEAD answer without a Content-Length"))?;
        let metadata = r
            .headers
            .iter()
            .filter_map(|(k, v)| {
                let k = k.to_ascii_lowercase();
                k.strip_prefix(META).map(|n| (n.to_string(), v.clone()))
            })
            .collect();
        Ok(Some((
            BlobProperties {
                size,
                blob_type: r.header("x-ms-blob-type").unwrap_or("").to_string(),
                etag: r.header("etag").map(str::to_string),
                lease: super::lease::LeaseState {
                    state: r.header("x-ms-lease-state").map(str::to_string),
                    status: r.header("x-ms-lease-status").map(str::to_string),
                    duration: r.header("x-ms-lease-duration").map(str::to_string),
                },
            },
            metadata,
        )))
    }

    /// Set Blob Metadata (replacing all of it) only if the blob's ETag is still `if_match`;
    /// returns the new ETag. A blob changed meanwhile gives [`Error::VersionMismatch`].
    pub fn set_metadata_if_match(
        &self,
        metadata: &BTreeMap<String, String>,
        if_match: &str,
    ) -> Result<String> {
        let query = [("comp".to_string(), "metadata".to_string())];
        let mut headers: Vec<(String, String)> = metadata
            .iter()
            .map(|(k, v)| (format!("{META}{k}"), v.clone()))
            .collect();
        headers.push(("If-Match".to_string(), if_match.to_string()));
        let r = self.execute(
            RequestKind::SetBlobMetadata,
            Method::Put,
            &query,
            &headers,
            Some(&[]),
            &[200, 412],
        )?;
        self.etag_or_mismatch(&r)
    }

    /// Set Blob Properties with a new size (a multiple of 512): pages past it are dropped,
    /// new pages read as zeros.
    pub fn resize(&self, size: u64) -> Result<()> {
        if !size.is_multiple_of(512) {
            return Err(Error::Internal(format!(
                "page blob size {size} is not a multiple of 512"
            )));
        }
        let query = [("comp".to_string(), "properties".to_string())];
        let headers = [("x-ms-blob-content-length".to_string(), size.to_string())];
        self.execute(
            RequestKind::SetBlobProperties,
            Method::Put,
            &query,
            &headers,
            Some(&[]),
            &[200],
        )?;
        Ok(())
    }

    /// Snapshot Blob: a read-only copy of the blob as it is now (metadata included); returns
    /// the snapshot's timestamp, which names it (`?snapshot=`).
    pub fn snapshot_blob(&self) -> Result<String> {
        let query = [("comp".to_string(), "snapshot".to_string())];
        let r = self.execute(
            RequestKind::SnapshotBlob,
            Method::Put,
            &query,
            &[],
            Some(&[]),
            &[201],
        )?;
        r.header("x-ms-snapshot")
            .map(str::to_string)
            .ok_or_else(|| self.protocol("Snapshot Blob answer without x-ms-snapshot"))
    }

    /// This blob's snapshots with their metadata (List Blobs of the container, by prefix,
    /// following `NextMarker`), oldest first. Needs list permission on the container.
    pub fn list_snapshots(&self) -> Result<Vec<BlobSnapshot>> {
        let name = self.blob_name()?;
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let mut query = vec![
                ("restype".to_string(), "container".to_string()),
                ("comp".to_string(), "list".to_string()),
                ("prefix".to_string(), name.clone()),
                ("include".to_string(), "snapshots,metadata".to_string()),
            ];
            if let Some(m) = &marker {
                query.push(("marker".to_string(), m.clone()));
            }
            let r = self.client.request(
                &Request::new(RequestKind::ListBlobs, Method::Get, &self.container_path)
                    .query(&query),
            )?;
            let text = String::from_utf8_lossy(&r.body);
            let doc = roxmltree::Document::parse(&text)
                .map_err(|e| self.protocol(&format!("List Blobs answer is not XML: {e}")))?;
            for blob in doc.descendants().filter(|n| n.has_tag_name("Blob")) {
                let child = |tag: &str| {
                    blob.children()
                        .find(|c| c.has_tag_name(tag))
                        .and_then(|c| c.text())
                        .map(str::to_string)
                };
                let Some(snapshot) = child("Snapshot") else {
                    continue;
                };
                if child("Name").as_deref() != Some(name.as_str()) {
                    continue;
                }
                let metadata = blob
                    .children()
                    .find(|c| c.has_tag_name("Metadata"))
                    .map(|m| {
                        m.children()
                            .filter(|c| c.is_element())
                            .map(|c| {
                                (
                                    c.tag_name().name().to_ascii_lowercase(),
                                    c.text().unwrap_or("").to_string(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(BlobSnapshot { snapshot, metadata });
            }
            let next = doc
                .descendants()
                .find(|n| n.has_tag_name("NextMarker"))
                .and_then(|n| n.text())
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            match next {
                Some(m) if marker.as_deref() != Some(m.as_str()) => marker = Some(m),
                _ => break,
            }
        }
        // Snapshot timestamps are ISO 8601 with fixed width: text order is time order.
        out.sort_by(|a, b| a.snapshot.cmp(&b.snapshot));
        Ok(out)
    }

    /// Deletes the blob snapshot named by its timestamp; one already gone is fine.
    pub fn delete_snapshot(&self, snapshot: &str) -> Result<()> {
        let query = [("snapshot".to_string(), snapshot.to_string())];
        self.execute(
            RequestKind::DeleteBlob,
            Method::Delete,
            &query,
            &[],
            None,
            &[202, 404],
        )?;
        Ok(())
    }

    /// The blob's name inside its container, decoded from the URL path.
    fn blob_name(&self) -> Result<String> {
        let rest = self
            .path
            .strip_prefix(&self.container_path)
            .and_then(|r| r.strip_prefix('/'))
            .filter(|r| !r.is_empty())
            .ok_or_else(|| self.protocol("the URL names no blob inside its container"))?;
        Ok(percent_decode(rest))
    }

    fn etag_or_mismatch(&self, r: &Response) -> Result<String> {
        if r.status == 412 {
            return Err(Error::VersionMismatch {
                object: self.shown.clone(),
            });
        }
        r.header("etag")
            .map(str::to_string)
            .ok_or_else(|| self.protocol("answer without an ETag"))
    }
}

/// Decodes `%XX` escapes of a URL path (invalid escapes stay as they are).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_path_escapes() {
        assert_eq!(percent_decode("a%20b/c%2"), "a b/c%2");
        assert_eq!(percent_decode("web01-os.vhd"), "web01-os.vhd");
    }
}
