//! `stackvault init`

use std::path::PathBuf;

use anyhow::Context as _;
use stackvault::azure::Profile;
use stackvault::{ChunkerParams, InitOptions, Repo};

use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory of the new repository (must not exist, or be empty); or -r REPO.
    #[arg(value_name = "REPO")]
    repo: Option<PathBuf>,
    /// Chunker: `aligned` (cuts between 4 KiB blocks, 4K/16K/64K), `aligned:MIN:AVG:MAX`,
    /// `fastcdc` (cuts anywhere, 4K/16K/64K), `fastcdc:MIN:AVG:MAX` or `fixed:SIZE`.
    #[arg(long, default_value = "aligned", value_parser = crate::args::chunker)]
    chunker: ChunkerParams,
    /// zstd compression level for stored chunks (1-22).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=22))]
    zstd_level: i32,
    /// Take the chunker and zstd level of this existing repository (a new id), so that
    /// `copy` between the two sends each chunk once and keeps snapshot ids. When both are
    /// encrypted, the new one shares SRC's naming keys (chunk and snapshot ids) and seals with
    /// its own; SRC is opened with the password as any repository is, and the new one's
    /// password is asked for as by any `init`.
    #[arg(long, value_name = "SRC", conflicts_with_all = ["chunker", "zstd_level"])]
    like: Option<PathBuf>,
    /// Endpoint of the `--like` repository when it is on an object store (remembered for that
    /// location); with two remote locations each takes its own (`--endpoint` then names the
    /// new repository's), and a single `--endpoint` is refused.
    #[arg(long, value_name = "URL", requires = "like")]
    like_endpoint: Option<String>,
    /// Endpoint of the object store for an `azure://` or `s3://` repository (Azure Stack Hub:
    /// `https://ACCOUNT.blob.REGION.example`; Azurite: `http://127.0.0.1:10000/devstoreaccount1`;
    /// MinIO: `http://host:9000`). Remembered on this host for the repository.
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// Cloud of an `azure://` repository: `azure`, or `azurestack` (Azure Stack Hub: an older
    /// service version). Remembered on this host for the repository.
    #[arg(long = "target-profile", value_name = "PROFILE", value_parser = crate::args::target_profile)]
    target_profile: Option<Profile>,
    /// Encryption at rest: `password` (the default: every object sealed, the key wrapped under
    /// the password from STACKVAULT_PASSWORD, --password-file, --password-command or a prompt)
    /// or `none` (plain; every command that opens the repository says so).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = EncryptionMode::Password)]
    encryption: EncryptionMode,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// `init --encryption`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EncryptionMode {
    // Every object sealed under keys wrapped by a password.
    Password,
    // Plain objects.
    None,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let (path, []) = ctx.split_repo([args.repo.map(Into::into)], [])?;
    if args.endpoint.is_some() || args.target_profile.is_some() {
        stackvault::repo::set_store_options(stackvault::repo::StoreOptions {
            endpoint: args.endpoint.clone(),
            profile: args.target_profile,
        });
    }
    if let Some(like) = &args.like {
        like_endpoint(like, args.like_endpoint.clone(), &path)?;
    }
    stackvault::repo::request_encryption(args.encryption == EncryptionMode::Password);
    let mut shares_naming_with = None;
    let repo = match &args.like {
        Some(like) => {
            let src = Repo::open(like)
                .with_context(|| format!("cannot open repository {}", like.display()))?;
            let made = stackvault::init_like(&path, &src);
            if let Ok(repo) = &made {
                if repo.protection().is_encrypted()
                    && repo.protection().same_naming(src.protection())
                {
                    shares_naming_with = Some(src.location());
                }
            }
            made
        }
        None => Repo::init(
            &path,
            &InitOptions {
                chunker: args.chunker,
                zstd_level: args.zstd_level,
            },
        ),
    };
    let repo = match repo {
        Ok(repo) => repo,
        // A store's answer already names the URL and says what to do (create the bucket or
        // container, fix the credential): one line, not that line under a generic one.
        Err(e @ stackvault::Error::Http { .. }) => return Err(e.into()),
        Err(e) => {
            return Err(anyhow::Error::from(e)
                .context(format!("cannot create repository {}", path.display())))
        }
    };
    let c = repo.config();
    if args.json {
        output::json(&InitReport {
            repository: path.display().to_string(),
            repository_id: stackvault::format::hex(&c.repository_id),
            chunker: c.chunker.describe(),
            segment_size_bytes: c.segment_size,
            zstd_level: c.zstd_level,
            encrypted: c.is_encrypted(),
            key_id: repo.key_in_use().map(str::to_string),
            shares_naming_with,
        })
    } else {
        output::line(format!(
            "created repository {} ({}, chunker {}, segments {}, zstd {})",
            path.display(),
            if c.is_encrypted() {
                "encrypted"
            } else {
                "NOT encrypted"
            },
            c.chunker.describe(),
            output::bytes(u64::from(c.segment_size)),
            c.zstd_level
        ))?;
        match &shares_naming_with {
            Some(like) => output::line(format!(
                "shares its naming keys with {like}: copies between the two keep chunk and \
                 snapshot ids; each seals its data with its own keys"
            )),
            None => Ok(()),
        }
    }
}

/// Gives the `--like` repository its own endpoint, as `copy --from-endpoint` does: with
/// `--like-endpoint` it is reached there (and the endpoint given for all, `--endpoint`, names
/// only the new repository's); without it, an `--endpoint` given while both locations are
/// remote is refused, since it would silently send one of them to the wrong service.
fn like_endpoint(
    like: &std::path::Path,
    endpoint: Option<String>,
    new: &std::path::Path,
) -> anyhow::Result<()> {
    use stackvault::repo::{RepoLocation, StoreOptions};
    let like = RepoLocation::from_path(like)?;
    let new = RepoLocation::from_path(new)?;
    let given = stackvault::repo::given_store_options();
    match endpoint {
        Some(endpoint) => {
            if !like.is_remote() {
                return Err(stackvault::Error::Usage(format!(
                    "--like-endpoint {endpoint}: {like} is a local directory, which has no \
                     endpoint"
                ))
                .into());
            }
            stackvault::repo::set_store_options_for(
                &like,
                StoreOptions {
                    endpoint: Some(endpoint),
                    profile: None,
                },
            );
        }
        None if like.is_remote() && new.is_remote() && given.endpoint.is_some() => {
            return Err(stackvault::Error::Usage(format!(
                "init {new} --like {like}: --endpoint would apply to both stores; give the \
                 source its own with --like-endpoint (--endpoint then names the new \
                 repository's; each is remembered for its location)"
            ))
            .into());
        }
        None => {}
    }
    Ok(())
}

/// `init --json`.
#[derive(serde::Serialize)]
struct InitReport {
    repository: String,
    repository_id: String,
    chunker: String,
    segment_size_bytes: u32,
    zstd_level: i32,
    /// Whether the repository is encrypted (`init --encryption`).
    encrypted: bool,
    /// Id of its first key object (encrypted repositories), as `key list` shows it.
    key_id: Option<String>,
    /// `init --like` of an encrypted repository: the repository whose naming keys (chunk,
    /// chunker, object ids) this one shares.
    shares_naming_with: Option<String>,
}
