//! The optional backends of this build: cargo features `azure` (page blobs as sources,
//! restore, verify and standby targets; block-blob repositories; the Blob REST transport) and
//! `s3` (S3-compatible repositories). Both are on by default and in the CLI; without them the
//! engine builds without any HTTP or TLS crate.
//!
//! A build without a backend still parses every location and URL, so the same inputs mean the
//! same thing in every build; only reaching the store or blob fails, with
//! [`Error::Unsupported`] naming the feature to rebuild with ([`Feature::missing`]), never a
//! panic. The `#[cfg(feature = …)]` lines sit on `mod` declarations and on the few dispatch
//! arms that choose a backend (`repo::location`, `source::open_page_blob`, `standby`, `vm`).

use crate::error::Error;

/// An optional part of the engine, named as its cargo feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// Azure Blob Storage (and Azure Stack Hub, Azurite).
    Azure,
    /// S3-compatible object stores.
    S3,
}

impl Feature {
    /// Every optional part, in the order `--version` lists them.
    pub const ALL: [Feature; 2] = [Feature::Azure, Feature::S3];

    /// The cargo feature's name.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Azure => "azure",
            Feature::S3 => "s3",
        }
    }

    /// Whether this build has it.
    pub fn enabled(self) -> bool {
        match self {
            Feature::Azure => cfg!(feature = "azure"),
            Feature::S3 => cfg!(feature = "s3"),
        }
    }

    /// The error for something only a build with this feature can do.
    pub fn missing(self) -> Error {
        let service = match self {
            Feature::Azure => "Azure",
            Feature::S3 => "S3",
        };
        Error::unsupported(format!(
            "this build has no {service} support; rebuild with --features {}",
            self.name()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;
    use crate::repo::RepoLocation;

    #[test]
    fn a_missing_backend_is_unsupported_and_says_how_to_rebuild() {
        let e = Feature::Azure.missing();
        assert_eq!(e.class(), ErrorClass::Unsupported);
        assert_eq!(
            e.to_string(),
            "this build has no Azure support; rebuild with --features azure"
        );
    }

    /// Parsing a location never depends on the build; connecting to a store the build lacks is
    /// `Unsupported`, before any credential or network is looked at.
    #[test]
    fn connecting_without_the_backend_is_unsupported() -> crate::error::Result<()> {
        for (url, feature) in [
            ("azure://account/container/prefix", Feature::Azure),
            ("s3://bucket/prefix", Feature::S3),
        ] {
            let location = RepoLocation::parse(url)?;
            assert!(location.is_remote());
            if feature.enabled() {
                continue;
            }
            match location.connect() {
                Err(e) => {
                    assert_eq!(e.class(), ErrorClass::Unsupported, "{url}: {e}");
                    assert!(e.to_string().contains(feature.name()), "{url}: {e}");
                }
                Ok(_) => panic!("{url} connected in a build without {}", feature.name()),
            }
        }
        Ok(())
    }

    /// Page blobs as a backup source or a standby target: `Unsupported` in a build without
    /// `azure`, before anything is sent.
    #[test]
    #[cfg(not(feature = "azure"))]
    fn page_blobs_without_azure_are_unsupported() {
        let url = "https://account.blob.core.windows.net/disks/d.vhd";
        let options = crate::azure::BlobOptions::default();
        let opened = crate::source::open_page_blob(url, &options).map(|_| ());
        let status = crate::standby::status(url, &Default::default()).map(|_| ());
        for result in [opened, status] {
            match result {
                Err(e) => assert_eq!(e.class(), ErrorClass::Unsupported, "{e}"),
                Ok(()) => panic!("a page blob opened in a build without azure"),
            }
        }
    }
}
