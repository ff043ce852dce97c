//! What a failed request means, in the engine's error terms.
//!
//! Job: the Azure side of [`crate::http_error`] (shared with S3): the error code from the
//! `x-ms-error-code` header before the body's, what the operator should do for the common
//! answers (bad credentials, a SAS without the needed permissions, a missing container), and
//! the client's attempt outcome.
//!
//! Invariant: nothing built here carries a secret. Service messages are cut to their first
//! line and anything from `sig=` on is dropped; ureq errors that could quote the URL (and so
//! its SAS) are replaced by a fixed text.

use super::client::Response;
use crate::http_error::{self, NoAnswer};

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
    match http_error::classify(e) {
        NoAnswer::Retry(why) => Attempt::Failed(why),
        NoAnswer::Fatal(why) => Attempt::Fatal(why),
    }
}

/// The service's error code (the `x-ms-error-code` header, else the body's) and message from
/// an error answer, scrubbed of signatures, with a hint on what to do for the answers an
/// operator can fix.
pub(crate) fn service_error(r: &Response) -> (String, String) {
    let (body_code, mut message) = http_error::error_body(r.status, &r.body);
    let code = match r.header("x-ms-error-code") {
        Some(c) if !c.is_empty() => c.to_string(),
        _ => body_code,
    };
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
