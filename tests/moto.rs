//! A moto S3 server for the tests: started from `.ci/moto/bin/moto_server` (installed by
//! `.ci/moto.sh`), `$MOTO_SERVER` or `moto_server` on the PATH, on a free loopback port, and
//! killed on drop.
//!
//! moto checks no signature unless IAM authentication is on, so [`Moto::start`] turns it on:
//! it creates an IAM user allowed everything, takes a fresh access key for it, and then asks
//! moto to verify every request. Every S3 request a test makes is thereby checked by an
//! independent SigV4 implementation (botocore's), and a wrong secret gets a real 403.
//!
//! Listings are checked too since moto 5.2.5 (pinned in `.ci/moto.sh`): 5.2.1 verified a
//! signature over the query string as werkzeug had *decoded* it, so a ListObjectsV2 `prefix`
//! holding `/` (every repository listing) failed its check even when boto3 signed it (moto
//! issue 5948). [`Moto::start_unchecked`] remains for tests that want no IAM at all.
//!
//! [`Moto::start_with_users`] also creates users with policies of the test's choosing (a
//! read-only principal: `s3:GetObject` and `s3:ListBucket`), before checking starts: moto
//! then refuses what their policies do not allow with a real 403 `AccessDenied`.
//!
//! Under `CI=true` a missing moto is a test failure; elsewhere [`Moto::start`] says why it
//! skips and returns `None`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use stackvault::store::s3::{S3Credentials, S3Options};
use stackvault::store::S3Backend;

/// Where `.ci/moto.sh` installs moto's server.
pub fn moto_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/moto/bin/moto_server")
}

/// A running moto server with IAM authentication on, killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
    /// An access key moto accepts (of a user allowed everything).
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Users made by [`Moto::start_with_users`]: name, access key id, secret.
    users: Vec<(String, String, String)>,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The moto server to run: `$MOTO_SERVER`, the project's venv, or the PATH.
fn find_moto() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    let local = moto_bin();
    if local.exists() {
        return Some(local);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("moto_server"))
        .find(|p| p.exists())
}

impl Moto {
    /// Starts moto checking every signature; `None` (after saying why) when it is not
    /// installed and this is not CI.
    pub fn start() -> Option<Moto> {
        Self::launch(true, &[])
    }

    /// Starts moto without signature checks or IAM policies.
    pub fn start_unchecked() -> Option<Moto> {
        Self::launch(false, &[])
    }

    /// Starts moto checking every signature, with one more user per `(name, actions)`, each
    /// allowed exactly `actions` on every resource; their keys are in [`Moto::users`].
    pub fn start_with_users(users: &[(&str, &[&str])]) -> Option<Moto> {
        Self::launch(true, users)
    }

    /// The access key id and secret of the user `name` made by [`Moto::start_with_users`].
    pub fn user(&self, name: &str) -> anyhow::Result<(String, String)> {
        self.users
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, id, secret)| (id.clone(), secret.clone()))
            .with_context(|| format!("moto has no user {name}"))
    }

    fn launch(check_signatures: bool, users: &[(&str, &[&str])]) -> Option<Moto> {
        let Some(bin) = find_moto() else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "{} missing under CI=true: run .ci/moto.sh",
                    moto_bin().display()
                );
            }
            eprintln!("skipping: moto_server not found (run .ci/moto.sh or set MOTO_SERVER)");
            return None;
        };
        match Self::start_at(&bin, check_signatures, users) {
            Ok(m) => Some(m),
            Err(e) => panic!("starting {}: {e:#}", bin.display()),
        }
    }

    fn start_at(
        bin: &Path,
        check_signatures: bool,
        users: &[(&str, &[&str])],
    ) -> anyhow::Result<Moto> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut moto = Moto {
            child,
            port,
            access_key_id: String::new(),
            secret_access_key: String::new(),
            users: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = moto.request("GET", "/moto-api/", "", "") {
                break;
            }
            if Instant::now() > deadline {
                bail!("moto_server did not answer on port {port} within 60 s");
            }
            if let Some(status) = moto.child.try_wait()? {
                bail!("moto_server exited with {status}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (id, secret) = moto.create_user("stackvault", &["*"])?;
        moto.access_key_id = id;
        moto.secret_access_key = secret;
        for (name, actions) in users {
            let (id, secret) = moto.create_user(name, actions)?;
            moto.users.push((name.to_string(), id, secret));
        }
        if check_signatures {
            let (status, body) = moto.request("POST", "/moto-api/reset-auth", "", "0")?;
            if status != 200 {
                bail!("moto reset-auth: HTTP {status}: {body}");
            }
        }
        Ok(moto)
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Options for this server, with quick retries (tests inject faults on purpose).
    pub fn options(&self) -> S3Options {
        let mut o = S3Options {
            endpoint: Some(self.endpoint()),
            ..S3Options::default()
        };
        o.retry.base_delay = Duration::from_millis(10);
        o.retry.max_delay = Duration::from_secs(5);
        o.retry.timeout = Duration::from_secs(30);
        o
    }

    pub fn credentials(&self) -> S3Credentials {
        S3Credentials::new(&self.access_key_id, &self.secret_access_key, None)
    }

    /// A backend on `s3://BUCKET/PREFIX` of this server, creating the bucket.
    pub fn backend(&self, location: &str) -> anyhow::Result<S3Backend> {
        let b = S3Backend::new(location, self.options(), self.credentials())?;
        b.create_bucket()?;
        Ok(b)
    }

    /// Creates the IAM user `name` allowed `actions` on every resource, with an access key;
    /// returns its id and secret.
    fn create_user(&self, name: &str, actions: &[&str]) -> anyhow::Result<(String, String)> {
        let iam = |params: &str| -> anyhow::Result<String> {
            let (status, body) = self.request(
                "POST",
                "/",
                // Only routes the request to IAM: moto checks nothing yet.
                "AWS4-HMAC-SHA256 Credential=AKIASETUP/20250101/us-east-1/iam/aws4_request, \
                 SignedHeaders=host, Signature=0",
                &format!("Version=2010-05-08&{params}"),
            )?;
            if status != 200 {
                bail!("moto IAM {params}: HTTP {status}: {body}");
            }
            Ok(body)
        };
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        });
        let policy = form_encode(&policy.to_string());
        iam(&format!("Action=CreateUser&UserName={name}"))?;
        iam(&format!(
            "Action=PutUserPolicy&UserName={name}&PolicyName=policy&PolicyDocument={policy}"
        ))?;
        let key = iam(&format!("Action=CreateAccessKey&UserName={name}"))?;
        let between = |tag: &str| -> anyhow::Result<String> {
            let open = format!("<{tag}>");
            let start = key.find(&open).context("no access key in moto's answer")? + open.len();
            let len = key[start..]
                .find('<')
                .context("no access key in moto's answer")?;
            Ok(key[start..start + len].to_string())
        };
        Ok((between("AccessKeyId")?, between("SecretAccessKey")?))
    }

    /// A plain HTTP/1.1 request to moto (setup only); returns status and body.
    fn request(
        &self,
        method: &str,
        path: &str,
        authorization: &str,
        body: &str,
    ) -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\
             Content-Length: {}\r\n",
            self.port,
            body.len()
        );
        if !authorization.is_empty() {
            // IAM reads its parameters from a form; moto's own API reads the raw body.
            head.push_str(&format!(
                "Authorization: {authorization}\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\n"
            ));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())?;
        s.write_all(body.as_bytes())?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)?;
        let text = String::from_utf8_lossy(&answer);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no HTTP status from moto")?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        Ok((status, body))
    }
}

/// `s` percent-encoded for a form body (every byte but unreserved ones).
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
