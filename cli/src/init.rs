//! `stackvault init`

use std::path::PathBuf;

use anyhow::Context as _;
use stackvault::{ChunkerParams, InitOptions, Repo};

use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory of the new repository (must not exist, or be empty).
    repo: PathBuf,
    /// Chunker: `aligned` (cuts between 4 KiB blocks, 4K/16K/64K), `aligned:MIN:AVG:MAX`,
    /// `fastcdc` (cuts anywhere, 4K/16K/64K), `fastcdc:MIN:AVG:MAX` or `fixed:SIZE`.
    #[arg(long, default_value = "aligned")]
    chunker: String,
    /// zstd compression level for stored chunks (1-22).
    #[arg(long, default_value_t = 3)]
    zstd_level: i32,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(_ctx: &Context, args: Args) -> anyhow::Result<()> {
    let options = InitOptions {
        chunker: ChunkerParams::parse(&args.chunker)?,
        zstd_level: args.zstd_level,
    };
    let repo = Repo::init(&args.repo, &options)
        .with_context(|| format!("cannot create repository {}", args.repo.display()))?;
    let c = repo.config();
    if args.json {
        output::json(&serde_json::json!({
            "repository": args.repo.display().to_string(),
            "repository_id": stackvault::format::hex(&c.repository_id),
            "chunker": c.chunker.describe(),
            "segment_size": c.segment_size,
            "zstd_level": c.zstd_level,
        }))
    } else {
        output::line(format!(
            "created repository {} (chunker {}, segments {}, zstd {})",
            args.repo.display(),
            c.chunker.describe(),
            output::bytes(u64::from(c.segment_size)),
            c.zstd_level
        ))
    }
}
