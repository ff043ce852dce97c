//! `stackvault key list|add|remove|passwd`: the passwords of an encrypted repository.

use std::path::PathBuf;

use stackvault::crypto::keyfile::KeyObject;
use stackvault::Repo;

use crate::output::{self, Context};
use crate::password::{Provider, Source};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// List the key objects (one per password), marking the one that unlocked the repository.
    List {
        /// Print the keys as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a password: a new key object wrapping the same secrets (no data is rewritten).
    Add {
        /// A name for the key, shown by `key list` (not secret; at most 255 bytes).
        #[arg(long, default_value = "")]
        label: String,
        #[command(flatten)]
        new: NewPassword,
        /// Print the new key as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a key object by the id `key list` shows; the last key is never removed.
    Remove {
        /// The key's id, as `stackvault key list` shows it.
        id: String,
        /// Print the removed key as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the password of the key in use (a new key object replaces it; no data is rewritten).
    Passwd {
        #[command(flatten)]
        new: NewPassword,
        /// Print the old and new key ids as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Where the new key's password comes from (else $STACKVAULT_NEW_PASSWORD, else a prompt).
#[derive(clap::Args, Debug)]
pub struct NewPassword {
    /// Read the new password from the first line of this file.
    #[arg(long, value_name = "FILE", conflicts_with = "new_password_command")]
    new_password_file: Option<PathBuf>,
    /// Run this shell command and take the first line it prints as the new password.
    #[arg(long, value_name = "COMMAND")]
    new_password_command: Option<String>,
}

impl NewPassword {
    fn source(self) -> Source {
        Source::new_key(self.new_password_file, self.new_password_command)
    }
}

/// One key in `--json` output: public metadata only.
#[derive(serde::Serialize)]
struct KeyJson {
    id: String,
    label: String,
    host: String,
    created: String,
    kdf: String,
    argon2_m_kib: u32,
    argon2_t: u32,
    argon2_p: u32,
    in_use: bool,
    /// Key object version: 1 (one master secret: its naming keys cannot be shared by
    /// `init --like`) or 2 (naming and sealing secret).
    key_object_version: u32,
}

fn key_json(k: &KeyObject, in_use: Option<&str>) -> KeyJson {
    KeyJson {
        id: k.id_hex(),
        label: k.label.clone(),
        host: k.host.clone(),
        created: created(k),
        kdf: "argon2id".into(),
        argon2_m_kib: k.kdf.m_kib,
        argon2_t: k.kdf.t,
        argon2_p: k.kdf.p,
        in_use: in_use == Some(k.id_hex().as_str()),
        key_object_version: k.version,
    }
}

fn created(k: &KeyObject) -> String {
    time::OffsetDateTime::from_unix_timestamp(k.created_unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| k.created_unix.to_string())
}

pub fn run(ctx: &Context, passwords: &Provider, command: Command) -> anyhow::Result<()> {
    let (path, []) = ctx.split_repo([None], [])?;
    let repo = Repo::open(&path)?;
    match command {
        Command::List { json } => {
            let keys = repo.keys()?;
            let in_use = repo.key_in_use();
            if json {
                #[derive(serde::Serialize)]
                struct List {
                    keys: Vec<KeyJson>,
                }
                return output::json(&List {
                    keys: keys.iter().map(|k| key_json(k, in_use)).collect(),
                });
            }
            output::line(format!(
                "  {:<32}  {:<20}  {:<20}  {:<16}  label",
                "id", "created", "host", "argon2id m/t/p"
            ))?;
            for k in &keys {
                let mark = if in_use == Some(k.id_hex().as_str()) {
                    '*'
                } else {
                    ' '
                };
                output::line(format!(
                    "{mark} {:<32}  {:<20}  {:<20}  {:<16}  {}",
                    k.id_hex(),
                    created(k),
                    k.host,
                    format!("{}K/{}/{}", k.kdf.m_kib, k.kdf.t, k.kdf.p),
                    k.label
                ))?;
            }
            output::line(format!("{} key(s); * unlocked this run", keys.len()))
        }
        Command::Add { label, new, json } => {
            passwords.set_new_key_source(new.source());
            let key = repo.add_key(&label)?;
            if json {
                return output::json(&key_json(&key, repo.key_in_use()));
            }
            output::line(format!("added key {}", key.id_hex()))
        }
        Command::Remove { id, json } => {
            let key = repo.remove_key(&id)?;
            if json {
                return output::json(&key_json(&key, repo.key_in_use()));
            }
            output::line(format!("removed key {}", key.id_hex()))
        }
        Command::Passwd { new, json } => {
            passwords.set_new_key_source(new.source());
            let (old, new) = repo.change_password()?;
            if json {
                #[derive(serde::Serialize)]
                struct Changed {
                    removed_key_id: String,
                    new_key_id: String,
                }
                return output::json(&Changed {
                    removed_key_id: old.id_hex(),
                    new_key_id: new.id_hex(),
                });
            }
            output::line(format!(
                "changed the password: key {} replaces key {}",
                new.id_hex(),
                old.id_hex()
            ))
        }
    }
}
