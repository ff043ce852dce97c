//! HTTP answers and transport failures in the engine's error terms, one mapping for both
//! object-store services: the Azure Blob client (`azure/`) and the S3 backend (`store::s3`).
//!
//! Job: which statuses are worth another attempt ([`is_transient`]), how a failure of the
//! HTTP client sorts into "no answer, try again" or "cannot work" ([`classify`]), and the
//! code and message of an error answer ([`error_body`]: the `<Error><Code>…<Message>…`
//! document both services send, or words for the status when an answer has no body). Each
//! service adds its own codes and advice on top (`azure::error::service_error`: the
//! `x-ms-error-code` header, SAS permissions, a missing container; `store::s3`: credentials,
//! regions, a missing bucket), and decides per operation what a 404, 409 or 412 means
//! ([`Error::NotFound`](crate::Error::NotFound), `AlreadyExists`, `VersionMismatch`).
//!
//! Invariant: nothing built here carries a secret. A service message is cut to its first
//! line and anything from `sig=` on is dropped; client errors whose text could quote the URL
//! (and so a SAS) are replaced by a fixed text.

/// A request that got no usable answer.
pub(crate) enum NoAnswer {
    /// The connection failed, was reset or timed out: worth another attempt.
    Retry(String),
    /// No point retrying (a malformed request).
    Fatal(String),
}

/// True for the statuses that say "not now" rather than "no": worth another attempt.
pub fn is_transient(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// Sorts a failure of the HTTP client into retryable or not; the message carries no URL.
pub(crate) fn classify(e: ureq::Error) -> NoAnswer {
    match e {
        ureq::Error::Io(_)
        | ureq::Error::Timeout(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::Protocol(_)
        | ureq::Error::HostNotFound => NoAnswer::Retry(e.to_string()),
        // Its text would carry the URL, SAS included.
        ureq::Error::BadUri(_) => NoAnswer::Fatal("malformed URL".into()),
        other => NoAnswer::Fatal(other.to_string()),
    }
}

/// The error code (empty when the body names none) and the first line of the message of an
/// error answer with status `status`; without a message in the body, words for the status.
/// The message is scrubbed of signatures.
pub(crate) fn error_body(status: u16, body: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(body);
    let mut code = String::new();
    let mut message = String::new();
    if let Ok(doc) = roxmltree::Document::parse(&text) {
        for n in doc.descendants() {
            match n.tag_name().name() {
                "Code" if code.is_empty() => code = n.text().unwrap_or("").trim().to_string(),
                "Message" if message.is_empty() => {
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
        message = match status {
            403 => "access denied".into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_give_code_and_first_line() {
        let body = b"<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code>\
                     <Message>The key does not exist.\nRequestId:1</Message></Error>";
        assert_eq!(
            error_body(404, body),
            ("NoSuchKey".into(), "The key does not exist.".into())
        );
        assert_eq!(
            error_body(403, b""),
            (String::new(), "access denied".into())
        );
        assert_eq!(
            error_body(404, b"not xml"),
            (String::new(), "not found".into())
        );
        assert_eq!(
            error_body(500, b""),
            (String::new(), "HTTP status 500".into())
        );
        let signed = b"<Error><Code>AuthenticationFailed</Code>\
                       <Message>Signature did not match: sv=2020&amp;sig=SECRET</Message></Error>";
        let (_, message) = error_body(403, signed);
        assert!(
            !message.contains("SECRET") && message.ends_with("<redacted>"),
            "{message}"
        );
    }

    #[test]
    fn only_refusals_and_server_errors_are_retried() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(is_transient(s), "{s}");
        }
        for s in [200, 400, 403, 404, 409, 412, 501] {
            assert!(!is_transient(s), "{s}");
        }
    }
}
