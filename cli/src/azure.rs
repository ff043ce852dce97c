//! Page blob addresses on the command line: `https://…?SAS`, `http://…` (Azurite) or
//! `azure://ACCOUNT/CONTAINER/BLOB` with `--endpoint` and `--account-key-env`. Secrets come
//! only from the environment or the SAS URL, and URLs are shown redacted.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use stackvault::azure::{self, BlobOptions, Profile};
use stackvault::source::PageBlobSource;

/// Options of a page blob source or target.
#[derive(clap::Args, Debug, Default)]
pub struct BlobArgs {
    /// Blob endpoint of the account for `azure://ACCOUNT/CONTAINER/BLOB` (default
    /// `https://ACCOUNT.blob.core.windows.net`; Azurite: `http://127.0.0.1:10000/devstoreaccount1`).
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// Environment variable holding the storage account key (Shared Key). Never pass a key on
    /// the command line.
    #[arg(long, value_name = "VAR")]
    account_key_env: Option<String>,
    /// Cloud of the blob: `azure`, or `azurestack` (Azure Stack Hub: older service version,
    /// 4 KiB page alignment, its size limits).
    #[arg(long = "target-profile", alias = "profile", default_value = "azure",
          value_parser = crate::args::target_profile)]
    profile: Profile,
    /// Service version (`x-ms-version`) instead of the profile's.
    #[arg(long, value_name = "VERSION")]
    api_version: Option<String>,
}

/// Restore-only options of a page blob target.
#[derive(clap::Args, Debug, Default)]
pub struct BlobRestoreArgs {
    /// Write into an existing page blob of the right size instead of creating it (e.g. a
    /// managed disk's upload SAS).
    #[arg(long)]
    existing: bool,
    /// Continue an interrupted restore to a page blob, skipping windows already confirmed.
    #[arg(long)]
    resume: bool,
    /// Directory of page blob resume journals (default ~/.cache/stackvault/resume).
    #[arg(long, value_name = "DIR")]
    journal_dir: Option<PathBuf>,
    /// Page blob: zero gaps up to SIZE between data runs are sent inside one Put Page request
    /// (up to 4 MiB) instead of starting another. A page blob takes about 500 requests/s and
    /// 60 MiB/s, so a request costs as much as ~120 KiB of data; but the zeros sent count as
    /// written pages (billed, and listed by Get Page Ranges). 0 sends data pages only.
    /// Bytes, or with KiB/MiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    coalesce_gap: Option<u64>,
    /// Page blob: Put Page requests in flight (default 16; memory about N × 4 MiB).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    parallel: Option<u16>,
}

/// `65536`, `64KiB`, `64K`, `4MiB`, `4M`: a size in bytes, at most 4 MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 65536, 64KiB or 1MiB"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        _ => return Err(format!("{s:?}: the unit must be KiB or MiB")),
    };
    match n.checked_mul(scale) {
        Some(v) if v <= 4 << 20 => Ok(v),
        _ => Err(format!("{s:?}: at most 4MiB (the largest Put Page)")),
    }
}

/// What a disk argument (a backup source, a restore or verify target) names. The one place
/// that decides between a page blob and a local file or device.
#[derive(Clone, Copy, Debug)]
pub enum DiskArg<'a> {
    /// A page blob, by URL (`https://…?SAS`, `http://…` for Azurite, `azure://…`).
    Blob(&'a str),
    /// A file or block device.
    Local(&'a Path),
}

impl<'a> DiskArg<'a> {
    pub fn of(arg: &'a Path) -> Self {
        match arg.to_str().filter(|s| azure::is_blob_url(s)) {
            Some(url) => DiskArg::Blob(url),
            None => DiskArg::Local(arg),
        }
    }

    /// How the argument is shown: paths as they are, URLs without their query string.
    pub fn shown(&self) -> String {
        match self {
            DiskArg::Blob(url) => azure::redact(url),
            DiskArg::Local(path) => path.display().to_string(),
        }
    }
}

impl BlobArgs {
    /// Opens the page blob at `url` as a disk source; `shown` names it in the error.
    pub fn open_source(&self, url: &str, shown: &str) -> anyhow::Result<PageBlobSource> {
        PageBlobSource::open(url, &self.options()?)
            .with_context(|| format!("cannot open page blob {shown}"))
    }

    pub fn options(&self) -> anyhow::Result<BlobOptions> {
        let account_key = match &self.account_key_env {
            Some(var) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Some(v),
                _ => bail!("--account-key-env {var}: the variable is not set or empty"),
            },
            None => None,
        };
        Ok(BlobOptions {
            profile: self.profile,
            api_version: self.api_version.clone(),
            endpoint: self.endpoint.clone(),
            account_key,
            retry: Default::default(),
        })
    }
}

impl BlobRestoreArgs {
    pub fn options(
        &self,
        blob: &BlobArgs,
        force: bool,
    ) -> anyhow::Result<stackvault::PageBlobRestoreOptions> {
        if self.existing && force {
            return Err(stackvault::Error::Usage(
                "--existing writes into the blob; --force would replace it: pick one".into(),
            )
            .into());
        }
        Ok(stackvault::PageBlobRestoreOptions {
            blob: blob.options().context("page blob options")?,
            force,
            existing: self.existing,
            resume: self.resume,
            journal_dir: self.journal_dir.clone(),
            coalesce_gap: self.coalesce_gap,
            parallel: self.parallel.map_or(0, usize::from),
            ..Default::default()
        })
    }

    pub fn any(&self) -> bool {
        self.existing
            || self.resume
            || self.journal_dir.is_some()
            || self.coalesce_gap.is_some()
            || self.parallel.is_some()
    }
}

/// Prints a page blob restore report.
pub fn print_restore(r: &stackvault::PageBlobRestoreReport, json: bool) -> anyhow::Result<()> {
    if json {
        return crate::output::json(r);
    }
    for note in &r.notes {
        crate::output::line(format!("note: {note}"))?;
    }
    let b = &r.restore;
    crate::output::line(format!(
        "restored snapshot {} of disk {} to {} (fixed VHD page blob, {} disk, {} blob)",
        b.snapshot_id.short(),
        b.disk,
        b.target,
        crate::output::bytes(b.virtual_size),
        crate::output::bytes(r.blob_size)
    ))?;
    crate::output::line(format!(
        "  {} requests ({} Put Page, {} clears) of {} in flight, uploaded {} ({} of them zeros \
         inside coalesced requests, gap {}), {} windows resumed, x-ms-version {} ({}), \
         {:.2} s, uploaded at {}",
        r.requests,
        r.put_requests,
        r.clear_requests,
        r.parallel,
        crate::output::bytes(r.uploaded_bytes),
        crate::output::bytes(r.coalesced_zero_bytes),
        crate::output::bytes(r.coalesce_gap_bytes),
        r.windows_resumed,
        r.api_version,
        r.profile.as_str(),
        b.duration_ms as f64 / 1000.0,
        crate::output::rate(r.uploaded_bytes, b.duration_ms)
    ))
}
