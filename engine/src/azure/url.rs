//! Addresses of blobs and containers: parsing the forms a user types, and redaction.
//!
//! Job: turn `https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB?SAS`, a path-style
//! `http://127.0.0.1:PORT/ACCOUNT/CONTAINER/BLOB` (Azurite, some Stack Hub set-ups) or
//! `azure://ACCOUNT/CONTAINER/BLOB` plus an endpoint into what a request needs: the origin,
//! the URL path as sent, the path of the container, the account name (for Shared Key) and the
//! SAS query, using the `url` crate for the splitting.
//!
//! Invariants: the SAS is kept only in [`BlobAddress::sas`] and never in any string meant to be
//! shown; [`redact`] drops every query string, so a URL that went through it can be printed,
//! logged or stored in a manifest.

use crate::error::{Error, Result};

/// True when `s` names a blob rather than a local path.
pub fn is_blob_url(s: &str) -> bool {
    s.starts_with("https://") || s.starts_with("http://") || s.starts_with("azure://")
}

/// `url` with its query string (SAS) replaced by `?<redacted>`. Works on any string, even one
/// that does not parse as a URL, so an error about a malformed URL cannot leak its SAS.
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

/// Where a blob (or a container) is, split for requests.
#[derive(Clone)]
pub(crate) struct BlobAddress {
    /// `scheme://host[:port]`.
    pub origin: String,
    /// The URL path as sent (percent-encoded), starting with `/`.
    pub path: String,
    /// Path of the container, starting with `/` (`/ACCOUNT/CONTAINER` in path style).
    pub container_path: String,
    /// Storage account, for Shared Key.
    pub account: String,
    /// Query string of the URL without `?` (a SAS), if any.
    pub sas: Option<String>,
}

impl std::fmt::Debug for BlobAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobAddress({}{})", self.origin, self.path)
    }
}

/// Parses a blob URL (see the module doc); `endpoint` is the account's blob endpoint for
/// `azure://` URLs (default `https://ACCOUNT.blob.core.windows.net`). `min_segments` is how
/// many path segments after the container the address must have (1 for a blob, 0 for a
/// container with an optional prefix).
pub(crate) fn parse(raw: &str, endpoint: Option<&str>, min_segments: usize) -> Result<BlobAddress> {
    let bad = |why: &str| Error::Usage(format!("blob URL {}: {why}", redact(raw)));
    let shape = if min_segments == 0 {
        "azure://ACCOUNT/CONTAINER[/PREFIX]"
    } else {
        "azure://ACCOUNT/CONTAINER/BLOB"
    };
    let parsed = url::Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
    let segments: Vec<String> = parsed
        .path_segments()
        .map(|s| s.filter(|s| !s.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    match parsed.scheme() {
        "azure" => {
            let account = parsed.host_str().unwrap_or_default().to_string();
            if account.is_empty() || segments.len() < 1 + min_segments {
                return Err(bad(&format!("expected {shape}")));
            }
            let default_endpoint = format!("https://{account}.blob.core.windows.net");
            let endpoint = endpoint.unwrap_or(&default_endpoint);
            let base = url::Url::parse(endpoint)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                .ok_or_else(|| bad("--endpoint must be an http:// or https:// URL"))?;
            let base_path = base.path().trim_end_matches('/').to_string();
            let container_path = format!("{base_path}/{}", segments[0]);
            Ok(BlobAddress {
                origin: base.origin().ascii_serialization(),
                path: join(&base_path, &segments),
                container_path,
                account,
                sas: None,
            })
        }
        "http" | "https" => {
            let host = parsed.host().ok_or_else(|| bad("no host"))?;
            // Path style (an IP or localhost) puts the account first: /ACCOUNT/CONTAINER/BLOB.
            let path_style = match &host {
                url::Host::Domain(d) => *d == "localhost",
                url::Host::Ipv4(_) | url::Host::Ipv6(_) => true,
            };
            let skip = usize::from(path_style);
            if segments.len() < 1 + skip + min_segments {
                return Err(bad(&format!(
                    "expected …/CONTAINER{}",
                    if min_segments == 0 {
                        "[/PREFIX]"
                    } else {
                        "/BLOB"
                    }
                )));
            }
            let account = if path_style {
                segments[0].clone()
            } else {
                host.to_string()
                    .split('.')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            };
            Ok(BlobAddress {
                origin: parsed.origin().ascii_serialization(),
                path: join("", &segments),
                container_path: join("", &segments[..1 + skip]),
                account,
                sas: parsed.query().filter(|q| !q.is_empty()).map(str::to_string),
            })
        }
        _ => Err(bad("scheme must be https, http or azure")),
    }
}

/// `base/seg1/seg2…`; segments stay as the URL parser left them (percent-encoded).
fn join(base: &str, segments: &[String]) -> String {
    segments
        .iter()
        .fold(base.to_string(), |acc, s| acc + "/" + s)
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
        assert_eq!(without_query("http://h/c/b?sig=S"), "http://h/c/b");
    }

    #[test]
    fn parses_the_forms_of_a_blob_url() -> Result<()> {
        let a = parse(
            "https://acct.blob.core.windows.net/vhds/d.vhd?sv=x&sig=S",
            None,
            1,
        )?;
        assert_eq!(a.origin, "https://acct.blob.core.windows.net");
        assert_eq!(
            (a.path.as_str(), a.container_path.as_str()),
            ("/vhds/d.vhd", "/vhds")
        );
        assert_eq!(
            (a.account.as_str(), a.sas.as_deref()),
            ("acct", Some("sv=x&sig=S"))
        );

        let a = parse(
            "http://127.0.0.1:10000/devstoreaccount1/c/dir/b.vhd",
            None,
            1,
        )?;
        assert_eq!(a.origin, "http://127.0.0.1:10000");
        assert_eq!(a.container_path, "/devstoreaccount1/c");
        assert_eq!(a.account, "devstoreaccount1");

        let ep = Some("http://127.0.0.1:10000/devstoreaccount1/");
        let a = parse("azure://devstoreaccount1/c/b.vhd", ep, 1)?;
        assert_eq!(a.path, "/devstoreaccount1/c/b.vhd");
        assert_eq!(a.container_path, "/devstoreaccount1/c");
        let a = parse("azure://acct/vault", None, 0)?;
        assert_eq!(a.origin, "https://acct.blob.core.windows.net");
        assert_eq!(
            (a.path.as_str(), a.container_path.as_str()),
            ("/vault", "/vault")
        );

        assert!(parse("azure://acct", None, 0).is_err());
        assert!(parse("azure://acct/c", None, 1).is_err());
        assert!(parse("https://host/onlycontainer", None, 1).is_err());
        assert!(parse("ftp://x/c/b", None, 1).is_err());
        assert!(parse("azure://a/c/b", Some("ftp://x"), 1).is_err());
        let e = parse("ftp://x/c/b?sig=SECRET", None, 1).err();
        assert!(!format!("{e:?}").contains("SECRET"));
        Ok(())
    }
}
