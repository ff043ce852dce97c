//! Where passwords come from: the engine asks (through the provider registered here) only when
//! it opens or creates an encrypted repository.
//!
//! The password that unlocks a repository comes from `--password-file`, else
//! `--password-command`, else `STACKVAULT_PASSWORD`, else a prompt on the terminal (no echo).
//! `init` takes the new repository's password from the same places (a prompt asks twice).
//! `key add` and `key passwd` take the new key's password from `--new-password-file`,
//! `--new-password-command`, `STACKVAULT_NEW_PASSWORD`, or a prompt. With none of these and no
//! terminal, the command fails as a usage error saying how to give one.
//!
//! Invariants: a password is read at most once per process and use (then kept in a zeroizing
//! buffer); no password, and no output of a password command, appears in any message.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use stackvault::crypto::unlock::{PasswordUse, PASSWORD_ENV};
use stackvault::Error;
use zeroize::Zeroizing;

/// Environment variable holding the password of a new key (`key add`, `key passwd`).
pub const NEW_PASSWORD_ENV: &str = "STACKVAULT_NEW_PASSWORD";

/// One place a password may come from.
#[derive(Clone, Debug)]
pub struct Source {
    pub file: Option<PathBuf>,
    pub command: Option<String>,
    /// The environment variable consulted when neither option is given.
    pub env: &'static str,
    /// The options' names, for messages.
    pub file_flag: &'static str,
    pub command_flag: &'static str,
}

impl Source {
    /// The sources of the unlock password (global options).
    pub fn unlock(file: Option<PathBuf>, command: Option<String>) -> Source {
        Source {
            file,
            command,
            env: PASSWORD_ENV,
            file_flag: "--password-file",
            command_flag: "--password-command",
        }
    }

    /// The sources of a new key's password (`key add`, `key passwd`).
    pub fn new_key(file: Option<PathBuf>, command: Option<String>) -> Source {
        Source {
            file,
            command,
            env: NEW_PASSWORD_ENV,
            file_flag: "--new-password-file",
            command_flag: "--new-password-command",
        }
    }

    fn read(
        &self,
        what: &str,
        repository: &str,
        confirm: bool,
    ) -> stackvault::Result<Zeroizing<String>> {
        if let Some(path) = &self.file {
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                Error::Usage(format!(
                    "cannot read the password file {} given by {} ({e})",
                    path.display(),
                    self.file_flag
                ))
            })?);
            return non_empty(
                first_line(&text),
                &format!("the password file {}", path.display()),
            );
        }
        if let Some(command) = &self.command {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(command)
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .output()
                .map_err(|e| Error::Usage(format!("cannot run the {} ({e})", self.command_flag)))?;
            let stdout = Zeroizing::new(out.stdout);
            if !out.status.success() {
                return Err(Error::Usage(format!(
                    "the {} failed ({}); it must print the password on stdout and exit 0",
                    self.command_flag, out.status
                )));
            }
            let text = Zeroizing::new(String::from_utf8(stdout.to_vec()).map_err(|_| {
                Error::Usage(format!(
                    "the {} printed something that is not UTF-8",
                    self.command_flag
                ))
            })?);
            return non_empty(first_line(&text), &format!("the {}", self.command_flag));
        }
        if let Ok(value) = std::env::var(self.env) {
            return non_empty(Zeroizing::new(value), self.env);
        }
        if !std::io::stdin().is_terminal() {
            return Err(Error::Usage(format!(
                "{repository} needs {what} and none was given: set {}, pass {} FILE or {} \
                 COMMAND, or run the command on a terminal to be asked",
                self.env, self.file_flag, self.command_flag
            )));
        }
        let prompt = |p: &str| {
            rpassword::prompt_password(p)
                .map(Zeroizing::new)
                .map_err(|e| {
                    Error::Usage(format!("cannot read the password from the terminal ({e})"))
                })
        };
        let first = prompt(&format!("Enter {what} for {repository}: "))?;
        if confirm {
            let again = prompt(&format!("Enter {what} again: "))?;
            if *first != *again {
                return Err(Error::Usage(
                    "the two passwords differ; nothing was changed".into(),
                ));
            }
        }
        non_empty(first, "the password typed")
    }
}

/// The text up to the first line end (a password file's or command's trailing newline is not
/// part of the password).
fn first_line(text: &str) -> Zeroizing<String> {
    Zeroizing::new(text.lines().next().unwrap_or_default().to_string())
}

fn non_empty(p: Zeroizing<String>, from: &str) -> stackvault::Result<Zeroizing<String>> {
    if p.is_empty() {
        return Err(Error::Usage(format!("{from} gives an empty password")));
    }
    Ok(p)
}

/// The provider registered with the engine: unlock and new-key passwords, each read once.
pub struct Provider {
    unlock: Source,
    new_key: Mutex<Source>,
    /// `init`: the new repository's password comes from the unlock sources.
    init: std::sync::atomic::AtomicBool,
    /// Passwords read so far, by use and repository (`copy` opens two repositories).
    cached: Mutex<HashMap<(bool, String), Zeroizing<String>>>,
}

impl Provider {
    pub fn new(unlock: Source) -> Arc<Provider> {
        Arc::new(Provider {
            unlock,
            new_key: Mutex::new(Source::new_key(None, None)),
            init: std::sync::atomic::AtomicBool::new(false),
            cached: Mutex::new(HashMap::new()),
        })
    }

    /// For `init`: the new repository's password comes from the unlock sources.
    pub fn for_init(&self) {
        self.init.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// For `key add|passwd`: where the new key's password comes from.
    pub fn set_new_key_source(&self, source: Source) {
        *self.new_key.lock().unwrap_or_else(|p| p.into_inner()) = source;
    }

    pub fn password(
        &self,
        purpose: PasswordUse,
        repository: &str,
    ) -> stackvault::Result<Zeroizing<String>> {
        let init = self.init.load(std::sync::atomic::Ordering::Relaxed);
        // `init`'s new password comes from the unlock sources and then unlocks the new
        // repository: one entry for both.
        let new_key = purpose == PasswordUse::NewKey && !init;
        let (source, what, confirm) = match purpose {
            PasswordUse::Unlock => (self.unlock.clone(), "the password", false),
            PasswordUse::NewKey if init => (self.unlock.clone(), "a new password", true),
            PasswordUse::NewKey => (
                self.new_key
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
                "the new password",
                true,
            ),
        };
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let slot = (new_key, repository.to_string());
        if let Some(p) = cached.get(&slot) {
            return Ok(p.clone());
        }
        let p = source.read(what, repository, confirm)?;
        cached.insert(slot, p.clone());
        Ok(p)
    }
}
