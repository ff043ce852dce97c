//! Shared Key signing and SAS generation for the Blob service.
//!
//! Shared Key: HMAC-SHA256, keyed with the base64-decoded account key, over the canonical
//! string of a request (verb, the standard headers that the service signs, the `x-ms-*`
//! headers sorted by name, and the canonical resource `/account/path` followed by the sorted,
//! URL-decoded query parameters). The path is the URL path as sent, so Azurite's path-style
//! URLs (`/devstoreaccount1/container/blob`) canonicalize to
//! `/devstoreaccount1/devstoreaccount1/container/blob`, as the service expects.
//!
//! Keys and signatures never leave this module except in the `Authorization` header or a SAS
//! query string; nothing here logs or formats them into errors.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

/// An account name with its decoded key.
#[derive(Clone)]
pub struct SharedKey {
    pub account: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedKey({}, <key>)", self.account)
    }
}

impl SharedKey {
    /// `key_b64` is the account key as the portal shows it (base64).
    pub fn new(account: &str, key_b64: &str) -> Result<Self> {
        let key = B64.decode(key_b64.trim()).map_err(|_| {
            Error::InvalidArgument(format!(
                "the account key of {account} is not valid base64 (check the variable that holds it)"
            ))
        })?;
        if account.is_empty() {
            return Err(Error::InvalidArgument("empty storage account name".into()));
        }
        Ok(SharedKey {
            account: account.to_string(),
            key,
        })
    }

    /// base64(HMAC-SHA256(key, text)).
    pub fn sign(&self, text: &str) -> String {
        // HMAC accepts keys of any length; new_from_slice cannot fail for it.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => return String::new(),
        };
        mac.update(text.as_bytes());
        B64.encode(mac.finalize().into_bytes())
    }

    /// The `Authorization` header value of a request.
    pub fn authorization(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        headers: &[(String, String)],
    ) -> String {
        let text = string_to_sign(&self.account, method, path, query, headers);
        format!("SharedKey {}:{}", self.account, self.sign(&text))
    }

    /// An account SAS (service blob, resource types service/container/object) valid until
    /// `expiry` (`2030-01-01T00:00:00Z`) with `permissions` such as `racwdl`; signed version
    /// 2019-02-02. Returns the query string without `?`.
    pub fn account_sas(&self, permissions: &str, expiry: &str) -> String {
        let version = "2019-02-02";
        let text = format!(
            "{}\n{permissions}\nb\nsco\n\n{expiry}\n\n\n{version}\n",
            self.account
        );
        let sig = self.sign(&text);
        format!(
            "sv={version}&ss=b&srt=sco&sp={permissions}&se={}&sig={}",
            encode(expiry),
            encode(&sig)
        )
    }
}

/// Standard headers in the order the service signs them.
const SIGNED_HEADERS: [&str; 11] = [
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
];

/// The canonical string of a request (version 2009-09-19 and later).
pub fn string_to_sign(
    account: &str,
    method: &str,
    path: &str,
    query: &[(String, String)],
    headers: &[(String, String)],
) -> String {
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    let mut s = String::with_capacity(256);
    s.push_str(method);
    s.push('\n');
    for h in SIGNED_HEADERS {
        let v = find(h);
        // Since 2015-02-21 a zero Content-Length signs as empty.
        if h == "content-length" && v == "0" {
            s.push('\n');
            continue;
        }
        s.push_str(v);
        s.push('\n');
    }
    let mut ms: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| k.to_ascii_lowercase().starts_with("x-ms-"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    ms.sort();
    for (k, v) in ms {
        s.push_str(&k);
        s.push(':');
        s.push_str(&v);
        s.push('\n');
    }
    s.push('/');
    s.push_str(account);
    s.push_str(path);
    let mut params: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (decode(k).to_ascii_lowercase(), decode(v)))
        .collect();
    params.sort();
    let mut i = 0;
    while i < params.len() {
        let name = params[i].0.clone();
        let mut values = Vec::new();
        while i < params.len() && params[i].0 == name {
            values.push(params[i].1.clone());
            i += 1;
        }
        s.push('\n');
        s.push_str(&name);
        s.push(':');
        s.push_str(&values.join(","));
    }
    s
}

/// Characters a query component keeps as they are: RFC 3986's unreserved set.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

/// Decodes `%XX` escapes (and `+` as a space, as query strings do); malformed escapes stay.
pub fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    #[test]
    fn canonical_string_path_style() {
        let q = vec![("comp".to_string(), "pagelist".to_string())];
        let h = vec![
            ("x-ms-version".to_string(), "2021-08-06".to_string()),
            (
                "x-ms-date".to_string(),
                "Mon, 01 Jan 2024 00:00:00 GMT".to_string(),
            ),
            ("Content-Length".to_string(), "0".to_string()),
        ];
        let s = string_to_sign("devstoreaccount1", "GET", "/devstoreaccount1/c/b", &q, &h);
        assert_eq!(
            s,
            "GET\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:Mon, 01 Jan 2024 00:00:00 GMT\n\
             x-ms-version:2021-08-06\n/devstoreaccount1/devstoreaccount1/c/b\ncomp:pagelist"
        );
    }

    #[test]
    fn signature_is_deterministic_and_keyed() -> Result<()> {
        let a = SharedKey::new("devstoreaccount1", KEY)?;
        let b = SharedKey::new("devstoreaccount1", "AAAA")?;
        assert_eq!(a.sign("x"), a.sign("x"));
        assert_ne!(a.sign("x"), b.sign("x"));
        assert_eq!(a.sign("x").len(), 44);
        assert!(SharedKey::new("a", "not base64!").is_err());
        assert!(!format!("{a:?}").contains("Eby8"));
        Ok(())
    }

    #[test]
    fn percent_coding_round_trips() {
        let s = "a+b/c=d&e f:2030-01-01T00:00:00Z";
        assert_eq!(decode(&encode(s)), s);
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }
}
