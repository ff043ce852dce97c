//! The unfinished multipart uploads under a repository's prefix: what a writer killed between
//! CreateMultipartUpload and its completion leaves (its own failures abort the upload). S3
//! never lists them with the objects and no reader sees them, but their parts are stored and
//! billed until an AbortMultipartUpload (or a bucket lifecycle rule) removes them, so `check`
//! lists them as leftovers and `prune` aborts the ones too old to belong to a running writer.
//! ListMultipartUploads pages by key and upload id markers; each page is checked for progress.

use std::time::SystemTime;

use super::{Call, Kind, S3Backend};
use crate::error::Result;
use crate::store::UnfinishedUpload;

/// One page of a ListMultipartUploads answer.
#[derive(Debug, Default)]
struct UploadsPage {
    /// Full key (prefix included), upload id and start of each upload.
    uploads: Vec<(String, String, Option<SystemTime>)>,
    /// The markers of the next page, when the listing is truncated.
    next: Option<(String, String)>,
}

impl S3Backend {
    /// Every unfinished multipart upload under the repository's prefix (ListMultipartUploads,
    /// one request per 1000 uploads).
    pub(super) fn list_uploads(&self) -> Result<Vec<UnfinishedUpload>> {
        let mut out = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut call = Call::new(Kind::List, "GET", None);
            call.query.push(("uploads", String::new()));
            call.query.push(("prefix", self.prefix.clone()));
            if let Some((key, id)) = &markers {
                call.query.push(("key-marker", key.clone()));
                call.query.push(("upload-id-marker", id.clone()));
            }
            let r = self.execute(&call)?;
            match r.status {
                200 => {}
                404 => return Err(self.no_bucket()),
                _ => return Err(self.http_error(None, &r)),
            }
            let page = parse_uploads(&r.body).map_err(|why| {
                self.protocol(None, &format!("ListMultipartUploads answer: {why}"))
            })?;
            out.extend(page.uploads.into_iter().filter_map(|(key, id, started)| {
                Some(UnfinishedUpload {
                    key: key.strip_prefix(&self.prefix)?.to_string(),
                    id,
                    started,
                })
            }));
            match page.next {
                Some(next) if markers.as_ref() == Some(&next) => {
                    return Err(
                        self.protocol(None, "ListMultipartUploads repeated its page markers")
                    )
                }
                Some(next) => markers = Some(next),
                None => return Ok(out),
            }
        }
    }

    /// Aborts the multipart upload `upload` (AbortMultipartUpload); one already gone
    /// (`NoSuchUpload`) is fine.
    pub(super) fn abort_upload(&self, upload: &UnfinishedUpload) -> Result<()> {
        let full = self.full_key(&upload.key);
        let mut abort = Call::new(Kind::AbortMultipart, "DELETE", Some(&full));
        abort.query.push(("uploadId", upload.id.clone()));
        let r = self.execute(&abort)?;
        match r.status {
            200 | 204 => Ok(()),
            404 if super::service_error(&r).0 == "NoSuchUpload" => Ok(()),
            404 => Err(self.not_found(&upload.key, &r)),
            _ => Err(self.http_error(Some(&full), &r)),
        }
    }

    /// Starts a multipart upload of `key` and stores `part` as its first part, without
    /// completing it: what a writer killed mid-upload leaves, for tests of the leftovers.
    /// Returns the upload id.
    #[cfg(feature = "testing")]
    pub fn start_unfinished_upload(&self, key: &str, part: &[u8]) -> Result<String> {
        let full = self.full_key(key);
        let mut create = Call::new(Kind::CreateMultipart, "POST", Some(&full));
        create.query.push(("uploads", String::new()));
        let r = self.execute(&create)?;
        if r.status != 200 {
            return Err(self.http_error(Some(&full), &r));
        }
        let id = super::xml_text(&r.body, "UploadId").ok_or_else(|| {
            self.protocol(
                Some(&full),
                "CreateMultipartUpload answer without an UploadId",
            )
        })?;
        let mut put = Call::new(Kind::UploadPart, "PUT", Some(&full));
        put.query.push(("partNumber", "1".into()));
        put.query.push(("uploadId", id.clone()));
        put.body = part;
        let r = self.execute(&put)?;
        if r.status != 200 {
            return Err(self.http_error(Some(&full), &r));
        }
        Ok(id)
    }
}

fn parse_uploads(body: &[u8]) -> std::result::Result<UploadsPage, String> {
    let text = std::str::from_utf8(body).map_err(|_| "not UTF-8".to_string())?;
    let doc = roxmltree::Document::parse(text).map_err(|e| e.to_string())?;
    let root = doc.root_element();
    if root.tag_name().name() != "ListMultipartUploadsResult" {
        return Err(format!("root element {}", root.tag_name().name()));
    }
    let child_text = |n: roxmltree::Node<'_, '_>, name: &str| {
        n.children()
            .find(|c| c.tag_name().name() == name)
            .map(|c| c.text().unwrap_or("").to_string())
    };
    let mut page = UploadsPage::default();
    for u in root.children().filter(|c| c.tag_name().name() == "Upload") {
        let key = child_text(u, "Key").ok_or("an upload without a Key")?;
        let id = child_text(u, "UploadId")
            .filter(|i| !i.is_empty())
            .ok_or_else(|| format!("upload of {key} without an UploadId"))?;
        // ISO 8601; absent or odd, the age is unknown (and the upload never old enough).
        let started = child_text(u, "Initiated").and_then(|t| {
            time::OffsetDateTime::parse(t.trim(), &time::format_description::well_known::Rfc3339)
                .ok()
                .map(SystemTime::from)
        });
        page.uploads.push((key, id, started));
    }
    if child_text(root, "IsTruncated").is_some_and(|t| t.trim() == "true") {
        let key = child_text(root, "NextKeyMarker").unwrap_or_default();
        let id = child_text(root, "NextUploadIdMarker").unwrap_or_default();
        if key.is_empty() {
            return Err("truncated without a NextKeyMarker".into());
        }
        page.next = Some((key, id));
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upload_pages() -> std::result::Result<(), String> {
        let body = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>b</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
  <NextKeyMarker>repo/snapshots/x</NextKeyMarker><NextUploadIdMarker>u2</NextUploadIdMarker>
  <IsTruncated>true</IsTruncated>
  <Upload><Key>repo/packs/ab/ab01</Key><UploadId>u1</UploadId>
    <Initiated>2026-11-30T03:45:47.000Z</Initiated></Upload>
  <Upload><Key>repo/snapshots/x</Key><UploadId>u2</UploadId></Upload>
</ListMultipartUploadsResult>"#;
        let page = parse_uploads(body)?;
        assert_eq!(page.uploads.len(), 2);
        assert_eq!(page.uploads[0].0, "repo/packs/ab/ab01");
        assert!(page.uploads[0].2.is_some());
        assert!(page.uploads[1].2.is_none());
        assert_eq!(
            page.next,
            Some(("repo/snapshots/x".to_string(), "u2".to_string()))
        );
        let last = parse_uploads(
            b"<ListMultipartUploadsResult><IsTruncated>false</IsTruncated>\
              </ListMultipartUploadsResult>",
        )?;
        assert!(last.uploads.is_empty() && last.next.is_none());
        assert!(parse_uploads(b"<ListBucketResult/>").is_err());
        assert!(parse_uploads(
            b"<ListMultipartUploadsResult><IsTruncated>true</IsTruncated>\
              </ListMultipartUploadsResult>"
        )
        .is_err());
        Ok(())
    }
}
