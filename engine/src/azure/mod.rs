//! The Azure Blob service: addresses, the HTTP client, retries, and the REST calls built on it.
//!
//! Job: everything stackvault says to Azure Blob storage (global Azure, Azure Stack Hub,
//! Azurite), in layers that depend one way:
//! - [`url`]: blob and container addresses, and [`redact`] for anything shown;
//! - [`sign`]: Shared Key signatures and SAS generation;
//! - [`retry`]: which outcomes are retried and how long to wait (`Retry-After` honoured);
//! - `client`: the blocking HTTP client on `ureq` (auth, service version, step-down, request
//!   counts), with one generic `request` method every REST call goes through;
//! - [`BlobClient`] (page blobs, for disk sources and restore targets), [`pagewriter`],
//!   [`pagereader`] and [`lease`] (one writer per blob) on top of it; the block-blob repository backend lives in `store::azure`.
//!
//! Without the `azure` feature (see [`crate::features`]) only what parsing a URL, a plan or a
//! command line needs is built: [`url`], the [`RetryPolicy`], [`Profile`], [`BlobOptions`] and
//! the service limits; nothing here then speaks HTTP.
//!
//! Invariants:
//! - Secrets never leave the request: URLs shown anywhere (errors, reports, manifests) carry
//!   no query string; service error bodies are reduced to their `Code` and `Message`, with any
//!   `sig=` scrubbed.
//! - The service version is chosen by the [`Profile`]: current Azure, or Azure Stack Hub
//!   (2019-07-07 unless overridden). On Stack Hub, a `400 InvalidHeaderValue` naming
//!   `x-ms-version` steps down once to 2017-11-09 and records a note saying so.

#[cfg(feature = "azure")]
mod blob;
#[cfg(feature = "azure")]
pub(crate) mod client;
#[cfg(feature = "azure")]
pub(crate) mod error;
#[cfg(feature = "azure")]
pub mod lease;
#[cfg(feature = "azure")]
pub mod metadata;
#[cfg(feature = "azure")]
pub mod pagereader;
#[cfg(feature = "azure")]
pub mod pagewriter;
pub mod retry;
#[cfg(feature = "azure")]
pub mod sign;
// Without `azure`, only the address helpers shown to users are needed of it.
#[cfg_attr(not(feature = "azure"), allow(dead_code))]
pub mod url;

#[cfg(feature = "azure")]
pub use blob::BlobClient;
#[cfg(feature = "azure")]
pub use client::{RequestCounter, RequestKind};
pub use retry::RetryPolicy;
pub use url::{is_blob_url, redact, without_query};

use crate::error::{Error, Result};

/// Service version sent to Azure.
pub const AZURE_API_VERSION: &str = "2021-08-06";
/// Service version sent to Azure Stack Hub by default.
pub const AZURESTACK_API_VERSION: &str = "2019-07-07";
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

/// Which cloud the blob lives in; decides the service version and limits. Named `azure` and
/// `azurestack` on the command line and in the per-user cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Azure,
    #[serde(alias = "azurestackhub")]
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

/// What Get Blob Properties said.
#[cfg(feature = "azure")]
#[derive(Clone, Debug)]
pub struct BlobProperties {
    pub size: u64,
    pub blob_type: String,
    pub etag: Option<String>,
    /// The blob's lease as the service reports it.
    pub lease: lease::LeaseState,
}

/// A written (or cleared) byte range of a page blob, end exclusive.
pub type PageRange = (u64, u64);

/// An RFC 1123 date (`Sun, 06 Nov 1994 08:49:37 GMT`).
#[cfg(feature = "azure")]
pub fn http_date(t: std::time::SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

#[cfg(all(test, feature = "azure"))]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn http_date_format() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
    }
}
