//! Argument handling shared by the subcommands: where the repository comes from, and the clap
//! value parsers that turn a bad option value into a usage error (exit 2) before anything runs.
//!
//! The repository comes from `-r/--repo`, else `STACKVAULT_REPOSITORY`, else the first
//! positional argument. The positional form stays because scripts written before `-r` existed
//! pass it; a command therefore takes REPO as an optional first positional and decides from the
//! number of positionals whether it was given (see [`Context::split_repo`]).

use std::ffi::OsString;
use std::path::PathBuf;

use stackvault::verify::Subset;
use stackvault::{ChunkerParams, Error, OutputFormat, SourceFormat};

use crate::output::Context;

/// Environment variable naming the repository, as `RESTIC_REPOSITORY` does for restic.
pub const REPO_ENV: &str = "STACKVAULT_REPOSITORY";

fn usage(what: String) -> anyhow::Error {
    Error::Usage(what).into()
}

impl Context {
    /// Splits a command's positionals (REPO first when given) into the repository and the
    /// `N` arguments named by `names`. REPO is taken from the positionals when all `N + 1` are
    /// there, else from `-r` or `STACKVAULT_REPOSITORY`.
    pub fn split_repo<const N: usize>(
        &self,
        given: impl IntoIterator<Item = Option<OsString>>,
        names: [&str; N],
    ) -> anyhow::Result<(PathBuf, [OsString; N])> {
        let mut given: Vec<OsString> = given.into_iter().flatten().collect();
        let repo = if given.len() > N {
            let positional = PathBuf::from(given.remove(0));
            if let Some(flag) = &self.repo_flag {
                return Err(usage(format!(
                    "the repository is given twice, as -r {} and as {}: keep one",
                    flag.display(),
                    positional.display()
                )));
            }
            positional
        } else {
            self.repo_from_option()?
        };
        let missing = names.get(given.len()..).unwrap_or_default();
        let rest: [OsString; N] = given.try_into().map_err(|_| {
            usage(format!(
                "missing {}: see `--help` for the arguments",
                missing.join(" and ")
            ))
        })?;
        Ok((repo, rest))
    }

    /// For a command whose positionals after REPO are a list (`forget REPO SNAPSHOT...`): with
    /// `-r` every positional belongs to the list; with only `STACKVAULT_REPOSITORY` the first
    /// positional is REPO when it names an existing directory (scripts from before `-r`);
    /// otherwise the first positional is REPO.
    pub fn split_repo_list(
        &self,
        mut given: Vec<OsString>,
    ) -> anyhow::Result<(PathBuf, Vec<OsString>)> {
        if let Some(flag) = &self.repo_flag {
            return Ok((flag.clone(), given));
        }
        let first_is_repo = match given.first() {
            None => false,
            Some(first) => self.repo_env.is_none() || PathBuf::from(first).is_dir(),
        };
        if first_is_repo {
            let repo = PathBuf::from(given.remove(0));
            return Ok((repo, given));
        }
        Ok((self.repo_from_option()?, given))
    }

    fn repo_from_option(&self) -> anyhow::Result<PathBuf> {
        self.repo_flag
            .clone()
            .or_else(|| self.repo_env.clone())
            .ok_or_else(|| {
                usage(format!(
                    "no repository given: pass -r REPO (or --repo REPO), or set {REPO_ENV} \
                     (see `--help` for the other arguments)"
                ))
            })
    }
}

/// A positional argument that must be UTF-8 text (snapshot ids, `latest`).
pub fn text(arg: OsString, name: &str) -> anyhow::Result<String> {
    arg.into_string()
        .map_err(|a| usage(format!("{name} {}: not valid UTF-8", a.to_string_lossy())))
}

/// The repository argument as it reads in every subcommand's help.
pub const REPO_HELP: &str = "Repository directory; prefer -r REPO or STACKVAULT_REPOSITORY (the \
                             positional form is kept for existing scripts)";

/// `--disk`: a disk name as the engine accepts it (so a filter that can never match is
/// refused instead of silently matching nothing).
pub fn disk_name(s: &str) -> Result<String, String> {
    stackvault::backup::validate_disk_name(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

/// `check --read-data-subset`.
pub fn subset(s: &str) -> Result<Subset, String> {
    Subset::parse(s).map_err(|e| e.to_string())
}

/// `forget --keep-within`.
pub fn duration(s: &str) -> Result<time::Duration, String> {
    stackvault::maintain::forget::parse_duration(s).map_err(|e| e.to_string())
}

/// `prune --max-unused`, as a fraction.
pub fn max_unused(s: &str) -> Result<f64, String> {
    stackvault::prune::parse_max_unused(s).map_err(|e| e.to_string())
}

/// `init --chunker`: parsed, then checked against a new repository's config (sizes that do not
/// fit the segment are refused here, before the directory is created).
pub fn chunker(s: &str) -> Result<ChunkerParams, String> {
    let params = ChunkerParams::parse(s).map_err(|e| e.to_string())?;
    stackvault::RepoConfig::new([0; 16], 0, params)
        .validate()
        .map_err(|why| format!("chunker {s:?}: {why}"))?;
    Ok(params)
}

/// `--target-profile`: `azure` or `azurestack`.
pub fn target_profile(s: &str) -> Result<stackvault::azure::Profile, String> {
    stackvault::azure::Profile::parse(s).map_err(|e| e.to_string())
}

/// `backup --format`.
pub fn source_format(s: &str) -> Result<SourceFormat, String> {
    SourceFormat::parse(s).map_err(|e| e.to_string())
}

/// `restore --output-format`.
pub fn output_format(s: &str) -> Result<OutputFormat, String> {
    OutputFormat::parse(s).map_err(|e| e.to_string())
}
