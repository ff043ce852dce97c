//! The uncommitted blobs under a repository's prefix: what a writer killed between staging an
//! object's blocks (Put Block) and committing them (Put Block List) leaves. Azure has no abort
//! call: the blocks stay, invisible to reads and plain listings but stored (and billed), until
//! a commit of that name discards them or the service drops them a week after the last block.
//! `check` lists them as unfinished uploads and `prune` discards the ones too old to belong to
//! a running writer (`maintain::uploads`).
//!
//! Finding them: List Blobs with `include=uncommittedblobs` lists committed and uncommitted
//! blobs alike, with no flag between them; an uncommitted blob has no committed content, so
//! only names listed with a `Content-Length` of 0 are candidates, and a Get Blob Properties
//! (404 for a name with only uncommitted blocks) tells which. The upload's id is the ETag the
//! listing gives the uncommitted blob.
//!
//! Discarding one: Delete Blob with `If-Unmodified-Since: <listed Last-Modified>`. The
//! service treats a name with only uncommitted blocks as absent in conditions (an `If-Match`
//! on the listed ETag always fails), so the condition must be one an absent blob passes and a
//! blob committed since the listing fails: only uploads older than the grace period are
//! discarded, so such a commit is modified well after the listed time. Where the service does
//! not delete a name with only uncommitted blocks (404), a create-only (`If-None-Match: *`)
//! empty Put Blob commits the name, which discards the blocks, or fails because someone
//! committed it meanwhile (which discarded them too); a Delete Blob with the empty blob's own
//! ETag then removes exactly that, and for one round trip an empty object is visible under the
//! key, which a concurrent `check` would report and a later prune would remove.

use super::{h, parse_listing, q, AzureBlobBackend};
use crate::azure::client::{Method, Request, RequestKind};
use crate::error::{Error, Result};
use crate::store::UnfinishedUpload;

impl AzureBlobBackend {
    /// Every blob under the repository's prefix that has only uncommitted blocks (see the
    /// module doc): one List Blobs per 5000 names, and one Get Blob Properties per empty name.
    pub(super) fn list_uncommitted(&self) -> Result<Vec<UnfinishedUpload>> {
        let mut out = Vec::new();
        let query = [q("include", "uncommittedblobs"), q("prefix", &self.prefix)];
        self.list_pages(&query, |body| {
            let (listed, next) = parse_listing(body, &self.shown)?;
            for blob in listed.into_iter().filter(|b| b.size == 0) {
                let Some(key) = blob.name.strip_prefix(&self.prefix) else {
                    continue;
                };
                // Without an ETag it cannot be removed safely: left to the service's expiry.
                let Some(etag) = blob.etag else { continue };
                if self.head(key)?.is_none() {
                    out.push(UnfinishedUpload {
                        key: key.to_string(),
                        id: etag,
                        started: blob.modified,
                    });
                }
            }
            Ok(next)
        })?;
        Ok(out)
    }

    /// Removes the uncommitted blob `upload` (see the module doc). A name committed meanwhile
    /// (another writer of the same content, whose commit already discarded the blocks) is
    /// left as it is.
    pub(super) fn discard_uncommitted(&self, upload: &UnfinishedUpload) -> Result<()> {
        let key = upload.key.as_str();
        if let Some(started) = upload.started {
            let since = httpdate::fmt_http_date(started);
            let headers = [h("If-Unmodified-Since", &since)];
            let request = Request::new(RequestKind::DeleteBlob, Method::Delete, "")
                .headers(&headers)
                .ok(&[202, 404, 412]);
            let r = self.send(key, request)?;
            match r.status {
                202 => return Ok(()),
                // Committed since the listing (that commit discarded the blocks); or a service
                // that fails the condition on an absent blob, handled below.
                412 if self.head(key)?.is_some() => return Ok(()),
                412 => {}
                _ => match self.missing(&r, key) {
                    Error::NotFound { .. } => {}
                    e => return Err(e),
                },
            }
        }
        // A service that does not delete a name with only uncommitted blocks (or one gone
        // meanwhile). Commit an empty blob over it, create-only, then delete exactly that.
        let r = self.put_blob_if_absent(key, &[])?;
        match r.status {
            201 => {}
            404 => return Err(self.missing(&r, key)),
            // Refused as existing: committed by someone else, which discarded the blocks.
            // A service that refused it for the uncommitted blocks alone would leave them:
            // that is an error to report, never a removal to count.
            _ if self.head(key)?.is_some() => return Ok(()),
            status => {
                return Err(Error::Http {
                    url: self.shown.clone(),
                    status,
                    code: "UncommittedBlobKept".into(),
                    message: format!(
                        "the store refused to commit over the unfinished upload {key}: its \
                         blocks stay until the service drops them (a week after the last one)"
                    ),
                })
            }
        }
        let empty = super::etag(&r, key)?;
        let headers = [h("If-Match", &empty.0)];
        let request = Request::new(RequestKind::DeleteBlob, Method::Delete, "")
            .headers(&headers)
            .ok(&[202, 404, 412]);
        // 404/412: deleted or replaced meanwhile by another writer; either way the blocks
        // are gone and no object of ours was removed.
        self.send(key, request)?;
        Ok(())
    }

    /// Stages `data` as the blocks of `key` and leaves them uncommitted: what a writer killed
    /// between its Put Blocks and its Put Block List leaves, for tests of the leftovers.
    #[cfg(feature = "testing")]
    pub fn stage_unfinished_upload(&self, key: &str, data: &[u8]) -> Result<()> {
        self.stage_blocks(key, super::Source::Memory(data), super::BLOCK_SIZE)
            .map(|_| ())
    }

    /// Writes `key` as blocks and one Put Block List, as a writer commits a pack above the
    /// Put Blob limit: for tests of a commit racing the discarding of the same name.
    #[cfg(feature = "testing")]
    pub fn put_as_blocks(&self, key: &str, data: &[u8]) -> Result<()> {
        self.put_blocks(key, super::Source::Memory(data), super::BLOCK_SIZE)
    }
}
