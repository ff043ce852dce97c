//! What a failed request means, in the engine's error terms.
//!
//! Job: read the service's error code and message out of an answer (the `x-ms-error-code`
//! header, or the `<Error><Code>…<Message>…` body), add what the operator should do for the
//! common ones (bad credentials, a missing container), and sort a transport failure of the
//! HTTP client into "no answer, try again" or "cannot work".
//!
//! Invariant: nothing built here carries a secret. Service messages are cut to their first
//! line and anything from `sig=` on is dropped; ureq errors that could quote the URL (and so
//! its SAS) are replaced by a fixed text.

use super::client::Response;

/// The outcome of one attempt.
pub(crate) enum Attempt {
    Answer(Response),
    /// No whole answer: the connection failed, was reset, timed out, or the body was cut
    /// short. Worth another attempt.
    Failed(String),
    /// No point retrying (a malformed request).
    Fatal(String),
}

/// Sorts a ureq failure into retryable (no answer) or not; the message carries no URL.
pub(crate) fn classify(e: ureq::Error) -> Attempt {
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

/// The service's error code and message from an error answer, scrubbed of signatures, with
/// a hint on what to do for the answers an operator can fix.
pub(crate) fn service_error(r: &Response) -> (String, String) {
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
            403 => "access denied".into(),
            404 => "not found".into(),
            s => format!("HTTP status {s}"),
        };
    }
    if let Some(i) = message.find("sig=") {
        message.truncate(i);
        message.push_str("<redacted>");
    }
    let hint = match (r.status, code.as_str()) {
        (403, "AuthorizationPermissionMismatch") => Some(
            "the credential may not do this: a SAS for backup, init, prune and forget must \
             grant create (c), write (w) and delete (d) besides read (r) and list (l); with a \
             read+list SAS only reading commands work",
        ),
        (403, _) => Some(
            "check the credential (AZURE_STORAGE_KEY must be the account's key; a SAS must \
             grant the needed permissions and not have expired)",
        ),
        (404, "ContainerNotFound") => {
            Some("the container does not exist: create it or check the name in the URL")
        }
        _ => None,
    };
    if let Some(hint) = hint {
        message = format!("{message}; {hint}");
    }
    (code, message)
}
