//! Where a repository is: a local directory, or a container / bucket on an object store.
//!
//! [`RepoLocation::parse`] is the one place that decides what a repository string means, so
//! that `init s3:x` or `init https://…` is a usage error rather than a local directory of
//! that name. The rule: a string is a URL when it starts with a scheme (a letter, then
//! letters, digits, `+`, `-`, `.`) followed by `://`, or when that scheme is one a user could
//! mean as a URL (`azure`, `s3`, `http`, `https`, `file`, …) followed by `:` alone. Every
//! other string, including anything starting with `/` or `.`, is a local path (a directory
//! named `backups:2024` stays possible). Of URLs, `azure://ACCOUNT/CONTAINER[/PREFIX]` and
//! `s3://BUCKET[/PREFIX]` are repositories; any other scheme is refused, saying which forms
//! are accepted. No credential is ever part of a location: they come from the environment.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::azure::Profile;
use crate::error::{Error, Result};
use crate::store::Backend;

/// How this host reaches a remote store: not part of the location, since hosts in different
/// places reach one container through different endpoints (Azurite, an Azure Stack Hub
/// region, a MinIO or S3 endpoint). Remembered per host and location in the per-user cache
/// (`$XDG_CACHE_HOME/stackvault/locations/`) once given, so later commands need only the
/// location. Holds no secret.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreOptions {
    /// Endpoint URL (`https://ACCOUNT.blob.REGION.example`, `http://127.0.0.1:9000`).
    pub endpoint: Option<String>,
    /// Azure service profile (`azure`, `azurestack`).
    pub profile: Option<Profile>,
}

static STORE_OPTIONS: Mutex<StoreOptions> = Mutex::new(StoreOptions {
    endpoint: None,
    profile: None,
});

/// Options given for one location (`copy --from-endpoint`, `--to-endpoint`), by the
/// location's canonical string; they take the place of [`STORE_OPTIONS`] for it.
static LOCATION_OPTIONS: Mutex<Vec<(String, StoreOptions)>> = Mutex::new(Vec::new());

/// Sets the store options the command line gave, for every remote location this process
/// opens (`--endpoint`, `--target-profile`).
pub fn set_store_options(options: StoreOptions) {
    if let Ok(mut o) = STORE_OPTIONS.lock() {
        *o = options;
    }
}

/// The store options the command line gave for every location ([`set_store_options`]).
pub fn given_store_options() -> StoreOptions {
    STORE_OPTIONS.lock().map(|o| o.clone()).unwrap_or_default()
}

/// Sets the store options given for `location` alone: a command that opens two remote
/// locations (`copy`) reaches each through its own endpoint. They replace, for that location,
/// the options given for all ([`set_store_options`]), and are remembered for it like those.
pub fn set_store_options_for(location: &RepoLocation, options: StoreOptions) {
    if let Ok(mut all) = LOCATION_OPTIONS.lock() {
        let key = location.to_string();
        all.retain(|(k, _)| *k != key);
        all.push((key, options));
    }
}

/// Writes `options` to `file` whole (temporary name, then rename).
#[cfg_attr(not(any(feature = "azure", feature = "s3")), allow(dead_code))]
fn remember(file: &Path, options: &StoreOptions) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(
        &tmp,
        serde_json::to_vec(options).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, file)
}

/// Schemes a user may type meaning a URL even without `//`: `s3:bucket` is a typo of
/// `s3://bucket`, never a directory name anyone wants.
const URL_LIKE_SCHEMES: &[&str] = &[
    "azure", "s3", "http", "https", "file", "gs", "gcs", "ftp", "sftp", "ssh", "b2", "swift",
];

const ACCEPTED: &str = "a local directory, azure://ACCOUNT/CONTAINER[/PREFIX] or \
                        s3://BUCKET[/PREFIX]";

/// A repository's place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepoLocation {
    /// A local directory (or a mounted share): the index lives inside it.
    Local(PathBuf),
    /// Azure Blob Storage: block blobs under `prefix` in `container` of `account` (the
    /// endpoint comes from the command line or the environment, never from here).
    Azure {
        account: String,
        container: String,
        prefix: String,
    },
    /// An S3-compatible bucket, objects under `prefix`.
    S3 { bucket: String, prefix: String },
}

impl RepoLocation {
    /// Parses a repository string (see the module doc). Unknown schemes and malformed URLs
    /// are [`Error::Usage`].
    pub fn parse(s: &str) -> Result<RepoLocation> {
        let Some((scheme, rest)) = split_scheme(s) else {
            return Ok(RepoLocation::Local(PathBuf::from(s)));
        };
        let lower = scheme.to_ascii_lowercase();
        let Some(after) = rest.strip_prefix("//") else {
            return Err(Error::Usage(format!(
                "repository {s:?} looks like a URL without `//` after `{scheme}:`; write \
                 {lower}://{rest} (accepted: {ACCEPTED}; a local directory whose name has a \
                 colon can be given as ./{s})"
            )));
        };
        let parts = |what: &str| -> Result<(String, String)> {
            let (first, prefix) = after.split_once('/').unwrap_or((after, ""));
            if first.is_empty() {
                return Err(Error::Usage(format!(
                    "repository {s:?} names no {what}: write {ACCEPTED}"
                )));
            }
            Ok((first.to_string(), prefix.trim_matches('/').to_string()))
        };
        match lower.as_str() {
            "azure" => {
                let (account, rest) = parts("storage account")?;
                let (container, prefix) = rest.split_once('/').unwrap_or((&rest, ""));
                if container.is_empty() {
                    return Err(Error::Usage(format!(
                        "repository {s:?} names no container: write \
                         azure://ACCOUNT/CONTAINER[/PREFIX]"
                    )));
                }
                Ok(RepoLocation::Azure {
                    account,
                    container: container.to_string(),
                    prefix: prefix.to_string(),
                })
            }
            "s3" => {
                let (bucket, prefix) = parts("bucket")?;
                Ok(RepoLocation::S3 { bucket, prefix })
            }
            "http" | "https" => Err(Error::Usage(format!(
                "repository {s:?}: a repository is not an {lower}:// URL; for Azure Blob \
                 Storage write azure://ACCOUNT/CONTAINER[/PREFIX] (and --endpoint for Azure \
                 Stack Hub), for S3 s3://BUCKET[/PREFIX] (and --endpoint for other services)"
            ))),
            _ => Err(Error::Usage(format!(
                "repository {s:?}: unknown scheme `{scheme}://`; accepted: {ACCEPTED}"
            ))),
        }
    }

    /// Parses a repository given as a path (the CLI's argument type): a path that is not
    /// UTF-8 is always local.
    pub fn from_path(path: &Path) -> Result<RepoLocation> {
        match path.to_str() {
            Some(s) => RepoLocation::parse(s),
            None => Ok(RepoLocation::Local(path.to_path_buf())),
        }
    }

    /// Whether the repository is on an object store.
    pub fn is_remote(&self) -> bool {
        !matches!(self, RepoLocation::Local(_))
    }

    /// The backend serving this location. A remote store is reached with the [`StoreOptions`]
    /// the command line gave ([`set_store_options`]), else those this host remembered for the
    /// location when they were last given, else the defaults (global Azure, AWS S3);
    /// credentials come from the environment only.
    pub fn connect(&self) -> Result<Arc<dyn Backend>> {
        match self {
            RepoLocation::Local(p) => Ok(Arc::new(crate::store::LocalDir::new(p))),
            #[cfg(feature = "azure")]
            RepoLocation::Azure { .. } => {
                let options = self.store_options()?;
                let profile = options.profile.unwrap_or_default();
                Ok(Arc::new(crate::store::AzureBlobBackend::from_env(
                    &self.to_string(),
                    options.endpoint.as_deref(),
                    profile,
                )?))
            }
            #[cfg(feature = "s3")]
            RepoLocation::S3 { .. } => {
                let options = self.store_options()?;
                Ok(Arc::new(crate::store::S3Backend::open(
                    &self.to_string(),
                    options.endpoint.as_deref(),
                )?))
            }
            // Refused before any option is remembered or credential read.
            #[cfg(not(feature = "azure"))]
            RepoLocation::Azure { .. } => Err(crate::features::Feature::Azure.missing()),
            #[cfg(not(feature = "s3"))]
            RepoLocation::S3 { .. } => Err(crate::features::Feature::S3.missing()),
        }
    }

    /// The options to reach this (remote) location: given ones are remembered for next time.
    #[cfg_attr(not(any(feature = "azure", feature = "s3")), allow(dead_code))]
    fn store_options(&self) -> Result<StoreOptions> {
        if !self.is_remote() {
            return Ok(StoreOptions::default());
        }
        let key = self.to_string();
        let for_this = LOCATION_OPTIONS
            .lock()
            .map_err(|_| Error::Internal("store options lock poisoned".into()))?
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, o)| o.clone());
        let given = match for_this {
            Some(o) => o,
            None => STORE_OPTIONS
                .lock()
                .map_err(|_| Error::Internal("store options lock poisoned".into()))?
                .clone(),
        };
        let file = super::cache_root()?
            .join("stackvault")
            .join("locations")
            .join(format!(
                "{}.json",
                &blake3::hash(self.to_string().as_bytes()).to_hex()[..32]
            ));
        let remembered: StoreOptions = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let options = StoreOptions {
            endpoint: given.endpoint.clone().or(remembered.endpoint.clone()),
            profile: given.profile.or(remembered.profile),
        };
        if options != remembered {
            // Best effort: a host that cannot remember simply needs the options again.
            let _ = remember(&file, &options);
        }
        Ok(options)
    }
}

impl fmt::Display for RepoLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with_prefix = |f: &mut fmt::Formatter<'_>, prefix: &str| {
            if prefix.is_empty() {
                Ok(())
            } else {
                write!(f, "/{prefix}")
            }
        };
        match self {
            RepoLocation::Local(p) => write!(f, "{}", p.display()),
            RepoLocation::Azure {
                account,
                container,
                prefix,
            } => {
                write!(f, "azure://{account}/{container}")?;
                with_prefix(f, prefix)
            }
            RepoLocation::S3 { bucket, prefix } => {
                write!(f, "s3://{bucket}")?;
                with_prefix(f, prefix)
            }
        }
    }
}

/// `(scheme, rest)` when `s` starts with something that is meant as a URL scheme.
fn split_scheme(s: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = s.split_once(':')?;
    let mut bytes = scheme.bytes();
    let well_formed = bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    let meant = rest.starts_with("//")
        || URL_LIKE_SCHEMES
            .iter()
            .any(|k| k.eq_ignore_ascii_case(scheme));
    (well_formed && meant).then_some((scheme, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(s: &str) -> bool {
        matches!(RepoLocation::parse(s), Err(Error::Usage(_)))
    }

    #[test]
    fn local_paths_stay_local() -> Result<()> {
        for s in [
            "/srv/backups",
            "repo",
            "./s3:x",
            "backups:2024",
            "rel/dir",
            "a/b://c",
        ] {
            assert_eq!(
                RepoLocation::parse(s)?,
                RepoLocation::Local(PathBuf::from(s)),
                "{s}"
            );
        }
        Ok(())
    }

    #[test]
    fn remote_locations_parse() -> Result<()> {
        assert_eq!(
            RepoLocation::parse("azure://acct/vault/erp/db")?,
            RepoLocation::Azure {
                account: "acct".into(),
                container: "vault".into(),
                prefix: "erp/db".into()
            }
        );
        assert_eq!(
            RepoLocation::parse("S3://bucket")?,
            RepoLocation::S3 {
                bucket: "bucket".into(),
                prefix: String::new()
            }
        );
        let s3 = RepoLocation::parse("s3://bucket/pre/fix/")?;
        assert_eq!(s3.to_string(), "s3://bucket/pre/fix");
        assert!(s3.is_remote());
        Ok(())
    }

    #[test]
    fn unknown_and_malformed_urls_are_usage_errors() {
        for s in [
            "s3:bucket",
            "azure:acct/c",
            "https://acct.blob.core.windows.net/c",
            "http://x",
            "foo://bar",
            "s3://",
            "s3:///prefix",
            "azure://acct",
            "azure://acct/",
            "file:///srv",
        ] {
            assert!(usage(s), "{s}");
        }
    }
}
