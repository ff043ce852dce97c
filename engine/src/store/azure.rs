//! A repository in an Azure Blob container: [`AzureBlobBackend`].
//!
//! Job: honour the [`Backend`] contract with block blobs in one container, under an optional
//! prefix (`azure://ACCOUNT/CONTAINER/PREFIX`): object key `K` is blob `PREFIX/K`. Objects up
//! to [`PUT_BLOB_MAX`] bytes (every pack of the default 18 MiB target, every delta and
//! manifest) are one Put Blob: one request per object, as on S3. Larger ones are staged as
//! blocks of [`BLOCK_SIZE`] bytes, several in flight, and made visible by one Put Block List;
//! a writer killed between the two leaves uncommitted blocks, which `uploads.rs` lists and
//! discards as unfinished uploads. A streamed object (a manifest, [`Backend::writer`]) is
//! spooled until its name is known; at its commit one up to [`DEFAULT_PARALLEL_BLOCKS`] ×
//! [`SPOOLED_BLOCK_SIZE`] (32 MiB) is one Put Blob, a larger one is staged in blocks read from
//! the spool's file as their uploads start, so the commit holds the blocks in flight, never the
//! object, whatever the disk's size. The exact requests and headers are specified in
//! `format-spec/remote.md`, section "Azure Blob".
//!
//! Invariants:
//! - Create-only: every Put Blob and Put Block List that creates an object carries
//!   `If-None-Match: *`, so of two writers of one key exactly one succeeds and the other gets
//!   [`Error::AlreadyExists`] (the service answers 409 or 412), and nothing is ever
//!   overwritten. A commit is atomic on the service: the blob appears whole or not at all;
//!   staged blocks are invisible to reads and listings and expire on their own.
//! - A create that had to be retried and then finds the key taken compares the stored bytes
//!   with its own: equal means the earlier attempt landed (success), different means
//!   another writer won (`AlreadyExists`).
//! - Mutable objects change only with `If-Match: <ETag>` ([`Backend::replace`],
//!   [`Backend::delete_if`]); the ETag is the [`Version`].
//! - Credentials come from the environment ([`AzureCredential::from_env`]) or the caller,
//!   never from the location, and appear in no error or listing.
//! - 404 is "not found" only for a missing blob; a missing container is an error that says so.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use super::spool::{read_error, Spooled, SpooledFile};
use super::{Backend, ObjectInfo, ObjectWriter, SpooledObject, Version};
use crate::azure::client::{Auth, Client, Method, Request, RequestCounter, RequestKind, Response};
use crate::azure::error::service_error;
use crate::azure::sign::SharedKey;
use crate::azure::{url, Profile, RetryPolicy};
use crate::error::{Error, Result};

mod uploads;

/// Largest object sent as a single Put Blob by default; larger ones go as blocks. Four packs
/// of the default target size: a pack is one request (issue 14: at most one PUT per 8 MiB of
/// packed data), while a failed attempt resends at most 64 MiB. The service's own limit,
/// [`put_blob_limit`], is higher for every service version this client sends.
pub const PUT_BLOB_MAX: usize = 64 << 20;
/// Size of one staged block of a large object (the last may be shorter): at most 100 MiB from
/// service version 2016-05-31 on.
pub const BLOCK_SIZE: usize = 16 << 20;
/// Size of one staged block of a streamed object (a large manifest), read from its spool when
/// its upload starts and dropped once it is stored: the blocks in flight are all its commit
/// holds, [`DEFAULT_PARALLEL_BLOCKS`] × 8 MiB = 32 MiB whatever the object's size. Smaller than
/// [`BLOCK_SIZE`], whose objects are in memory already and where fewer requests are all a larger
/// block buys; 8 MiB keeps issue 14's one PUT per 8 MiB.
pub const SPOOLED_BLOCK_SIZE: usize = 8 << 20;
/// Blocks of one object uploaded at once.
pub const DEFAULT_PARALLEL_BLOCKS: usize = 4;
/// Most blocks one blob may commit (the service's limit).
const MAX_BLOCKS: u64 = 50_000;
/// Names per List Blobs page (the service's maximum).
const LIST_PAGE: &str = "5000";

/// Characters of a blob name sent as they are in the URL path (unreserved and `/`).
const PATH_KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// The variable holding the account key (base64) for Shared Key.
pub const KEY_VARIABLE: &str = "AZURE_STORAGE_KEY";
/// The variable holding a SAS token (with or without the leading `?`).
pub const SAS_VARIABLE: &str = "AZURE_STORAGE_SAS_TOKEN";

/// How requests to the container are authorised.
#[derive(Clone)]
pub enum AzureCredential {
    /// The storage account's key (base64), for Shared Key signatures.
    SharedKey(String),
    /// A SAS token: the query string, without `?`.
    Sas(String),
}

impl std::fmt::Debug for AzureCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AzureCredential::SharedKey(_) => f.write_str("SharedKey(<redacted>)"),
            AzureCredential::Sas(_) => f.write_str("Sas(<redacted>)"),
        }
    }
}

impl AzureCredential {
    /// [`KEY_VARIABLE`] if set, else [`SAS_VARIABLE`]; neither is a usage error naming both.
    pub fn from_env() -> Result<Self> {
        let var = |name| {
            std::env::var(name)
                .ok()
                .filter(|v: &String| !v.trim().is_empty())
        };
        if let Some(key) = var(KEY_VARIABLE) {
            return Ok(AzureCredential::SharedKey(key));
        }
        if let Some(sas) = var(SAS_VARIABLE) {
            return Ok(AzureCredential::Sas(
                sas.trim().trim_start_matches('?').to_string(),
            ));
        }
        Err(Error::Usage(format!(
            "no credential: set {KEY_VARIABLE} or {SAS_VARIABLE}"
        )))
    }
}

/// How to reach the container.
#[derive(Clone, Debug)]
pub struct AzureStoreOptions {
    /// Blob endpoint of the account (Azurite and Stack Hub need one); default
    /// `https://ACCOUNT.blob.core.windows.net`.
    pub endpoint: Option<String>,
    pub profile: Profile,
    /// Service version instead of the profile's.
    pub api_version: Option<String>,
    pub credential: AzureCredential,
    pub retry: RetryPolicy,
    /// Blocks of one large object uploaded at once (at least 1).
    pub parallel_blocks: usize,
    /// Largest object sent as one Put Blob ([`PUT_BLOB_MAX`]); never more than the service
    /// version in use allows ([`put_blob_limit`]).
    pub put_blob_max: usize,
    /// Block size of a streamed object committed from its spool ([`SPOOLED_BLOCK_SIZE`]; at
    /// least 1). With `parallel_blocks` it bounds that commit's memory, and their product is
    /// the largest such object sent as one Put Blob.
    pub spooled_block_size: usize,
}

impl AzureStoreOptions {
    /// Options with `credential` and defaults for the rest.
    pub fn new(credential: AzureCredential) -> Self {
        AzureStoreOptions {
            endpoint: None,
            profile: Profile::Azure,
            api_version: None,
            credential,
            retry: RetryPolicy::default(),
            parallel_blocks: DEFAULT_PARALLEL_BLOCKS,
            put_blob_max: PUT_BLOB_MAX,
            spooled_block_size: SPOOLED_BLOCK_SIZE,
        }
    }
}

/// The largest block blob one Put Blob may create under service version `version`
/// (`YYYY-MM-DD`, compared as text): 64 MiB before 2016-05-31, 256 MiB from then (so also for
/// the azurestack profile's 2019-07-07 and its 2017-11-09 fallback), 5000 MiB from 2019-12-12.
pub fn put_blob_limit(version: &str) -> usize {
    match version {
        v if v < "2016-05-31" => 64 << 20,
        v if v < "2019-12-12" => 256 << 20,
        _ => 5000 << 20,
    }
}

/// Repository objects as block blobs in an Azure container (see the module doc).
pub struct AzureBlobBackend {
    client: Client,
    /// Path of the container as sent (`/CONTAINER`, or `/ACCOUNT/CONTAINER` in path style).
    container_path: String,
    /// Blob-name prefix of every object, empty or ending in `/` (decoded).
    prefix: String,
    /// The location as it may be shown.
    shown: String,
    parallel_blocks: usize,
    put_blob_max: usize,
    spooled_block_size: usize,
    /// Bytes read back from spools that commits hold now, and at most.
    held: Held,
}

impl std::fmt::Debug for AzureBlobBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AzureBlobBackend({})", self.shown)
    }
}

impl AzureBlobBackend {
    /// Opens the container named by `location`, `azure://ACCOUNT/CONTAINER[/PREFIX]`, with
    /// the credential from the environment (see [`AzureCredential::from_env`]).
    pub fn from_env(location: &str, endpoint: Option<&str>, profile: Profile) -> Result<Self> {
        let options = AzureStoreOptions {
            endpoint: endpoint.map(str::to_string),
            profile,
            ..AzureStoreOptions::new(AzureCredential::from_env()?)
        };
        Self::open(location, &options)
    }

    /// Opens the container named by `location`, `azure://ACCOUNT/CONTAINER[/PREFIX]`. Sends
    /// nothing: a missing container or a wrong credential shows at the first request.
    pub fn open(location: &str, options: &AzureStoreOptions) -> Result<Self> {
        if !location.starts_with("azure://") {
            return Err(Error::Usage(format!(
                "{}: an Azure repository location is azure://ACCOUNT/CONTAINER[/PREFIX]",
                url::redact(location)
            )));
        }
        let address = url::parse(location, options.endpoint.as_deref(), 0)?;
        let auth = match &options.credential {
            AzureCredential::SharedKey(key) => {
                Auth::SharedKey(SharedKey::new(&address.account, key)?)
            }
            AzureCredential::Sas(sas) => Auth::Sas(sas.trim_start_matches('?').to_string()),
        };
        let below = address
            .path
            .strip_prefix(&address.container_path)
            .unwrap_or("")
            .trim_matches('/');
        let prefix = match percent_encoding::percent_decode_str(below).decode_utf8_lossy() {
            p if p.is_empty() => String::new(),
            p => format!("{p}/"),
        };
        Ok(AzureBlobBackend {
            shown: format!("{}{}", address.origin, address.path),
            client: Client::new(
                address.origin,
                auth,
                options.profile,
                options.api_version.clone(),
                options.retry,
            ),
            container_path: address.container_path,
            prefix,
            parallel_blocks: options.parallel_blocks.max(1),
            put_blob_max: options.put_blob_max,
            spooled_block_size: options.spooled_block_size.max(1),
            held: Held::default(),
        })
    }

    /// The container and prefix as they may be shown (no credential).
    pub fn location(&self) -> &str {
        &self.shown
    }

    /// Requests sent so far, by kind (for `--json` reports and benches).
    pub fn requests(&self) -> &RequestCounter {
        &self.client.counter
    }

    /// The most bytes read back from a spool that streamed commits held in memory at once
    /// (for tests of their bound).
    #[cfg(any(test, feature = "testing"))]
    pub fn peak_spool_bytes_held(&self) -> usize {
        self.held.peak.load(Ordering::Relaxed)
    }

    /// Requests sent so far as a name → count map.
    pub fn request_counts(&self) -> BTreeMap<&'static str, u64> {
        self.client.counter.snapshot()
    }

    /// The service version in use (after any step-down).
    pub fn api_version(&self) -> String {
        self.client.api_version()
    }

    /// Things worth telling the operator (a service version step-down).
    pub fn notes(&self) -> Vec<String> {
        self.client.notes()
    }

    /// Create Container; returns false when it existed already.
    pub fn create_container(&self) -> Result<bool> {
        let query = [q("restype", "container")];
        let request = Request::new(
            RequestKind::CreateContainer,
            Method::Put,
            &self.container_path,
        )
        .query(&query)
        .body(&[])
        .ok(&[201, 409]);
        let r = self.client.request(&request)?;
        Ok(r.status == 201)
    }

    /// URL path of object `key`.
    fn path_of(&self, key: &str) -> String {
        let name = format!("{}{key}", self.prefix);
        format!(
            "{}/{}",
            self.container_path,
            percent_encoding::utf8_percent_encode(&name, PATH_KEEP)
        )
    }

    /// Sends `req` (built with an empty path) to the blob of `key`.
    fn send(&self, key: &str, req: Request<'_>) -> Result<Response> {
        let path = self.path_of(key);
        self.client.request(&Request { path: &path, ..req })
    }

    /// The error for a 404 answer about `key`: [`Error::NotFound`] for a missing blob, a
    /// plain error with advice for a missing container.
    fn missing(&self, r: &Response, key: &str) -> Error {
        let (code, message) = service_error(r);
        if code == "ContainerNotFound" {
            return Error::Http {
                url: self.shown.clone(),
                status: 404,
                code,
                message,
            };
        }
        Error::NotFound {
            object: key.to_string(),
        }
    }

    /// After a refused create: did an earlier attempt of ours land (same bytes stored), or
    /// did another writer win?
    fn resolve_conflict(&self, key: &str, data: Source<'_>, retried: bool) -> Result<()> {
        if retried && self.holds(key, data)? {
            return Ok(());
        }
        Err(Error::AlreadyExists {
            object: key.to_string(),
        })
    }

    /// Whether `key` holds exactly `data`: read whole beside bytes in memory, else compared a
    /// block at a time with the spool.
    fn holds(&self, key: &str, data: Source<'_>) -> Result<bool> {
        let file = match data {
            Source::Memory(data) => {
                return match self.get(key) {
                    Ok(stored) => Ok(stored == data),
                    Err(Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Source::Spooled(file) => file,
        };
        match self.size(key) {
            Ok(size) if size == file.len() => {}
            Ok(_) | Err(Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e),
        }
        let mut stored = self.open_range(key, 0, file.len())?;
        let mut theirs = Vec::new();
        for (offset, len) in pieces(file.len(), self.spooled_block_size) {
            let ours = self.held.hold(data.piece(offset, len)?);
            theirs.resize(len, 0);
            stored.read_exact(&mut theirs).map_err(|e| {
                super::range_read::range_error(e, &format!("{}/{key}", self.shown), offset)
            })?;
            if *ours != *theirs {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The largest object sent as one Put Blob. The version can step down while running
    /// (Stack Hub): this asks for the one in use.
    fn single_put_max(&self) -> usize {
        self.put_blob_max
            .min(put_blob_limit(&self.client.api_version()))
    }

    fn put_blob(&self, key: &str, data: &[u8]) -> Result<()> {
        let r = self.put_blob_if_absent(key, data)?;
        match r.status {
            201 => Ok(()),
            404 => Err(self.missing(&r, key)),
            _ => self.resolve_conflict(key, Source::Memory(data), r.attempts > 1),
        }
    }

    /// One create-only (`If-None-Match: *`) Put Blob of `data`; the answer is 201 (created),
    /// 404 (no container), or 409/412 (the name exists).
    fn put_blob_if_absent(&self, key: &str, data: &[u8]) -> Result<Response> {
        let headers = [
            h("x-ms-blob-type", "BlockBlob"),
            h("Content-Type", "application/octet-stream"),
            h("If-None-Match", "*"),
        ];
        self.send(
            key,
            Request::new(RequestKind::PutBlob, Method::Put, "")
                .headers(&headers)
                .body(data)
                .ok(&[201, 404, 409, 412]),
        )
    }

    /// Stages `data` as blocks of `block_size` bytes (several at once) and commits them with
    /// one Put Block List.
    fn put_blocks(&self, key: &str, data: Source<'_>, block_size: usize) -> Result<()> {
        let ids = self.stage_blocks(key, data, block_size)?;
        self.commit_blocks(key, data, &ids)
    }

    /// Put Block of every `block_size` piece of `data`,
    /// [`AzureStoreOptions::parallel_blocks`] at once, each piece read when its upload starts
    /// and dropped once it is stored (a retry resends it); returns the block ids in order.
    /// Until they are committed the blocks are an uncommitted blob: invisible to reads and
    /// plain listings (see `uploads.rs`).
    fn stage_blocks(&self, key: &str, data: Source<'_>, block_size: usize) -> Result<Vec<String>> {
        if data.len().div_ceil(block_size.max(1) as u64) > MAX_BLOCKS {
            return Err(Error::InvalidArgument(format!(
                "object {key} needs more than {MAX_BLOCKS} blocks of {block_size} bytes"
            )));
        }
        let blocks: Vec<(u64, usize)> = pieces(data.len(), block_size).collect();
        // Block ids are random per upload, so two writers of one key never share a block.
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce)
            .map_err(|e| Error::Internal(format!("no random numbers for block ids: {e}")))?;
        let nonce = u64::from_le_bytes(nonce);
        let ids: Vec<String> = (0..blocks.len())
            .map(|i| B64.encode(format!("{nonce:016x}-{i:08}")))
            .collect();
        let stage = |(offset, len): (u64, usize), id: &str| -> Result<()> {
            let block = self.held.hold(data.piece(offset, len)?);
            let query = [q("comp", "block"), q("blockid", id)];
            let headers = [h("Content-Type", "application/octet-stream")];
            let request = Request::new(RequestKind::PutBlock, Method::Put, "")
                .query(&query)
                .headers(&headers)
                .body(&block)
                .ok(&[201, 404]);
            let r = self.send(key, request)?;
            match r.status {
                201 => Ok(()),
                _ => Err(self.missing(&r, key)),
            }
        };
        let next = AtomicUsize::new(0);
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let workers = self.parallel_blocks.min(blocks.len()).max(1);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let (Some(&block), Some(id)) = (blocks.get(i), ids.get(i)) else {
                        break;
                    };
                    if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        break;
                    }
                    if let Err(e) = stage(block, id) {
                        if let Ok(mut f) = failure.lock() {
                            f.get_or_insert(e);
                        }
                        break;
                    }
                });
            }
        });
        let failure = failure
            .into_inner()
            .map_err(|_| Error::Internal("a block upload thread panicked".into()))?;
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(ids)
    }

    /// Put Block List of the staged blocks `ids` (of `data`), create-only.
    fn commit_blocks(&self, key: &str, data: Source<'_>, ids: &[String]) -> Result<()> {
        let mut list = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?><BlockList>");
        for id in ids {
            list.push_str("<Latest>");
            list.push_str(id);
            list.push_str("</Latest>");
        }
        list.push_str("</BlockList>");
        let headers = [
            h("x-ms-blob-content-type", "application/octet-stream"),
            h("Content-Type", "application/xml"),
            h("If-None-Match", "*"),
        ];
        let query = [q("comp", "blocklist")];
        let request = Request::new(RequestKind::PutBlockList, Method::Put, "")
            .query(&query)
            .headers(&headers)
            .body(list.as_bytes())
            .ok(&[201, 400, 404, 409, 412]);
        let r = self.send(key, request)?;
        match r.status {
            201 => Ok(()),
            404 => Err(self.missing(&r, key)),
            // Another writer committed first, which drops the blocks we staged; the service
            // then reports our list as invalid rather than the key as taken.
            400 if service_error(&r).0 == "InvalidBlockList" => {
                if self.exists(key)? {
                    return self.resolve_conflict(key, data, true);
                }
                // Nobody committed the name, yet our blocks are gone: discarded as an
                // unfinished upload (what a prune does to one older than its grace period).
                let (_, message) = service_error(&r);
                Err(Error::Locked(format!(
                    "{}/{key}: the blocks staged for it are gone before their commit \
                     (InvalidBlockList: {message}): a prune discards uploads left unfinished \
                     for longer than its grace period. It was not stored; run it again",
                    self.shown
                )))
            }
            400 => {
                let (code, message) = service_error(&r);
                Err(Error::Http {
                    url: format!("{}/{key}", self.shown),
                    status: 400,
                    code,
                    message,
                })
            }
            _ => self.resolve_conflict(key, data, r.attempts > 1),
        }
    }

    /// HEAD of `key`: `None` when there is no such blob.
    /// Runs List Blobs over the container with `query` (beside the listing's own parameters)
    /// page by page; `page` reads one answer and returns its `NextMarker`, if any.
    fn list_pages(
        &self,
        query: &[(String, String)],
        mut page: impl FnMut(&[u8]) -> Result<Option<String>>,
    ) -> Result<()> {
        let mut marker: Option<String> = None;
        loop {
            let mut all = vec![
                q("restype", "container"),
                q("comp", "list"),
                q("maxresults", LIST_PAGE),
            ];
            all.extend_from_slice(query);
            if let Some(m) = &marker {
                all.push(q("marker", m));
            }
            let request =
                Request::new(RequestKind::ListBlobs, Method::Get, &self.container_path).query(&all);
            let r = self.client.request(&request)?;
            match page(&r.body)? {
                Some(m) if marker.as_deref() == Some(m.as_str()) => {
                    return Err(Error::Http {
                        url: self.shown.clone(),
                        status: 200,
                        code: "UnexpectedAnswer".into(),
                        message: format!("List Blobs repeats its NextMarker {m}"),
                    })
                }
                Some(m) => marker = Some(m),
                None => return Ok(()),
            }
        }
    }

    fn head(&self, key: &str) -> Result<Option<Response>> {
        let r = self.send(
            key,
            Request::new(RequestKind::GetBlobProperties, Method::Head, "").ok(&[200, 404]),
        )?;
        match r.status {
            200 => Ok(Some(r)),
            _ => match self.missing(&r, key) {
                Error::NotFound { .. } => Ok(None),
                e => Err(e),
            },
        }
    }

    /// A refused conditional request: the object changed, or it is gone.
    fn changed_or_gone(&self, key: &str) -> Error {
        match self.head(key) {
            Ok(Some(_)) => Error::VersionMismatch {
                object: key.to_string(),
            },
            Ok(None) => Error::NotFound {
                object: key.to_string(),
            },
            Err(e) => e,
        }
    }
}

fn q(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

fn h(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

fn etag(r: &Response, key: &str) -> Result<Version> {
    r.header("etag")
        .map(|e| Version(e.to_string()))
        .ok_or_else(|| Error::Http {
            url: key.to_string(),
            status: r.status,
            code: "UnexpectedAnswer".into(),
            message: "the answer has no ETag".into(),
        })
}

impl AzureBlobBackend {
    /// The error for a blob that holds only `got` of the `len` bytes asked at `offset`.
    fn short(&self, key: &str, offset: u64, len: u64, got: u64) -> Error {
        Error::corrupt(
            format!("{}/{key}", self.shown),
            offset,
            format!("asked for {len} bytes, the object holds {got} from there"),
        )
    }
}

impl super::range_read::RangeSource for AzureBlobBackend {
    fn open_at(&self, key: &str, pos: u64, end: u64) -> Result<super::range_read::RangeBody> {
        let len = end.saturating_sub(pos);
        let last = end.checked_sub(1).filter(|_| len > 0).ok_or_else(|| {
            Error::Internal(format!("an empty range of {key} at {pos} was opened"))
        })?;
        let headers = [h("x-ms-range", &format!("bytes={pos}-{last}"))];
        let path = self.path_of(key);
        let mut r = self.client.request_streamed(
            &Request::new(RequestKind::GetBlob, Method::Get, &path)
                .headers(&headers)
                .ok(&[200, 206, 404, 416]),
        )?;
        // What the answer says it holds: a 206's Content-Length is the range's part it has.
        let declared = r
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        match (r.status, r.stream.take()) {
            (404, _) => Err(self.missing(&r, key)),
            (416, _) => Err(self.short(key, pos, len, 0)),
            (206, Some(stream)) => {
                // The part answered must start at the byte asked: bytes from elsewhere in the
                // blob would be handed out as these (pack headers and manifests are read this
                // way, not only authenticated frames).
                let answered = r
                    .header("content-range")
                    .and_then(super::range_read::content_range);
                match (answered, declared) {
                    (Some((first, _, _)), _) if first != pos => Err(Error::corrupt(
                        format!("{}/{key}", self.shown),
                        pos,
                        format!("the answer holds the bytes from {first}, not from here"),
                    )),
                    (Some(_), Some(n)) if n >= len => Ok(Box::new(stream.into_reader().take(len))),
                    (None, _) => Err(Error::corrupt(
                        format!("{}/{key}", self.shown),
                        pos,
                        "a partial answer came without its Content-Range",
                    )),
                    (Some(_), n) => Err(self.short(key, pos, len, n.unwrap_or(0))),
                }
            }
            // A 200 is the whole blob (a service that ignored the range): read through to
            // `pos`.
            (200, Some(stream)) => {
                let mut body = stream.into_reader();
                let skipped = std::io::copy(&mut (&mut body).take(pos), &mut std::io::sink())
                    .map_err(|e| Error::Network {
                        url: format!("{}/{key}", self.shown),
                        tries: 1,
                        message: format!("reading the answer up to offset {pos}: {e}"),
                    })?;
                let held = declared.map_or(len, |n| n.saturating_sub(pos));
                if skipped < pos || held < len {
                    return Err(self.short(key, pos, len, held.min(len)));
                }
                Ok(Box::new(body.take(len)))
            }
            (status, _) => Err(Error::Internal(format!(
                "{}/{key}: answer {status} to a ranged read came without its body",
                self.shown
            ))),
        }
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.client.retry_policy()
    }

    fn count_resume(&self) {
        self.client.count_resume();
    }

    fn shown(&self, key: &str) -> String {
        format!("{}/{key}", self.shown)
    }
}

impl Backend for AzureBlobBackend {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        if data.len() <= self.single_put_max() {
            self.put_blob(key, data)
        } else {
            self.put_blocks(key, Source::Memory(data), BLOCK_SIZE)
        }
    }

    fn put_versioned(&self, key: &str, data: &[u8]) -> Result<Version> {
        if data.len() > self.single_put_max() {
            self.put_blocks(key, Source::Memory(data), BLOCK_SIZE)?;
            return self.version(key);
        }
        // Put Blob answers with the new blob's ETag: no Get Blob Properties needed.
        let r = self.put_blob_if_absent(key, data)?;
        match r.status {
            201 => etag(&r, key),
            404 => Err(self.missing(&r, key)),
            _ => {
                self.resolve_conflict(key, Source::Memory(data), r.attempts > 1)?;
                self.version(key)
            }
        }
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let r = self.send(
            key,
            Request::new(RequestKind::GetBlob, Method::Get, "").ok(&[200, 404]),
        )?;
        match r.status {
            200 => Ok(r.body),
            _ => Err(self.missing(&r, key)),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        self.get_range_into(key, offset, len, &mut body)?;
        Ok(body)
    }

    fn get_range_into(&self, key: &str, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()> {
        super::range_read::read_range_into(self, key, offset, len, buf)
    }

    fn open_range<'a>(
        &'a self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn std::io::Read + Send + 'a>> {
        if len == 0 {
            // Nothing to read; the object must still exist and reach `offset`.
            return match self.size(key)? {
                size if size >= offset => Ok(Box::new(std::io::empty())),
                _ => Err(self.short(key, offset, len, 0)),
            };
        }
        Ok(Box::new(super::range_read::ResumingRange::new(
            self, key, offset, len,
        )?))
    }

    fn size(&self, key: &str) -> Result<u64> {
        let r = self.head(key)?.ok_or_else(|| Error::NotFound {
            object: key.to_string(),
        })?;
        r.header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| Error::Http {
                url: format!("{}/{key}", self.shown),
                status: r.status,
                code: "UnexpectedAnswer".into(),
                message: "HEAD answer without a Content-Length".into(),
            })
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.head(key)?.is_some())
    }

    fn list_with_sizes(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let full = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        self.list_pages(&[q("prefix", &full)], |body| {
            let (listed, next) = parse_listing(body, &self.shown)?;
            out.extend(listed.into_iter().filter_map(|blob| {
                Some(ObjectInfo {
                    key: blob.name.strip_prefix(&self.prefix)?.to_string(),
                    size: blob.size,
                    modified: blob.modified,
                })
            }));
            Ok(next)
        })?;
        Ok(out)
    }

    fn remove(&self, key: &str) -> Result<()> {
        let r = self.send(
            key,
            Request::new(RequestKind::DeleteBlob, Method::Delete, "").ok(&[202, 404]),
        )?;
        match r.status {
            202 => Ok(()),
            _ => match self.missing(&r, key) {
                Error::NotFound { .. } => Ok(()),
                e => Err(e),
            },
        }
    }

    fn version(&self, key: &str) -> Result<Version> {
        let r = self.head(key)?.ok_or_else(|| Error::NotFound {
            object: key.to_string(),
        })?;
        etag(&r, key)
    }

    fn replace(&self, key: &str, data: &[u8], expected: &Version) -> Result<Version> {
        let headers = [
            h("x-ms-blob-type", "BlockBlob"),
            h("Content-Type", "application/octet-stream"),
            h("If-Match", &expected.0),
        ];
        let r = self.send(
            key,
            Request::new(RequestKind::PutBlob, Method::Put, "")
                .headers(&headers)
                .body(data)
                .ok(&[201, 404, 412]),
        )?;
        match r.status {
            201 => etag(&r, key),
            404 => Err(self.missing(&r, key)),
            _ => Err(self.changed_or_gone(key)),
        }
    }

    fn delete_if(&self, key: &str, expected: &Version) -> Result<()> {
        let headers = [h("If-Match", &expected.0)];
        let request = Request::new(RequestKind::DeleteBlob, Method::Delete, "")
            .headers(&headers)
            .ok(&[202, 404, 412]);
        let r = self.send(key, request)?;
        match r.status {
            202 => Ok(()),
            404 => Err(self.missing(&r, key)),
            _ => Err(self.changed_or_gone(key)),
        }
    }

    fn request_counts(&self) -> Option<BTreeMap<&'static str, u64>> {
        Some(AzureBlobBackend::request_counts(self))
    }

    fn unfinished_uploads(&self) -> Result<Vec<super::UnfinishedUpload>> {
        self.list_uncommitted()
    }

    fn discard_upload(&self, upload: &super::UnfinishedUpload) -> Result<()> {
        self.discard_uncommitted(upload)
    }

    fn writer<'a>(&'a self, dir: &str) -> Result<Box<dyn ObjectWriter + 'a>> {
        Ok(Box::new(SpooledObject::new(
            self,
            dir,
            AzureBlobBackend::store_spooled,
        )))
    }
}

impl AzureBlobBackend {
    /// Stores a streamed object ([`Backend::writer`]: a manifest), spooled until its name was
    /// known. Up to what the blocks in flight would hold it is one Put Blob, as a `put` (one
    /// request costs no more memory); a larger one is staged from the spool's file a block at
    /// a time, so the commit holds the blocks in flight, never the object.
    fn store_spooled(&self, key: &str, bytes: Spooled) -> Result<()> {
        let in_flight = self.parallel_blocks.saturating_mul(self.spooled_block_size);
        let single = self.single_put_max().min(in_flight);
        match bytes {
            Spooled::File(file) if file.len() > single as u64 => {
                self.put_blocks(key, Source::Spooled(&file), self.spooled_block_size)
            }
            small @ Spooled::File(_) => {
                let bytes = Cow::Owned(small.into_bytes().map_err(read_error)?);
                self.put(key, &self.held.hold(bytes))
            }
            // Small, or no temporary file could be made: in memory already.
            Spooled::Memory(bytes) => self.put(key, &bytes),
        }
    }
}

/// The bytes of an object stored as blocks: in memory (a `put`), or a spooled object (a
/// streamed commit), read a piece at a time.
#[derive(Clone, Copy)]
enum Source<'d> {
    Memory(&'d [u8]),
    Spooled(&'d SpooledFile),
}

impl<'d> Source<'d> {
    fn len(self) -> u64 {
        match self {
            Source::Memory(data) => data.len() as u64,
            Source::Spooled(file) => file.len(),
        }
    }

    /// The `len` bytes at `offset`: borrowed from memory, or read from the spool's file.
    fn piece(self, offset: u64, len: usize) -> Result<Cow<'d, [u8]>> {
        match self {
            Source::Memory(data) => usize::try_from(offset)
                .ok()
                .and_then(|at| data.get(at..at.checked_add(len)?))
                .map(Cow::Borrowed)
                .ok_or_else(|| {
                    Error::Internal(format!(
                        "{len} bytes at {offset} of an object of {} bytes",
                        data.len()
                    ))
                }),
            Source::Spooled(file) => file
                .read_at(offset, len)
                .map(Cow::Owned)
                .map_err(read_error),
        }
    }
}

/// The `(offset, length)` of each piece of `piece` bytes (the last may be shorter) of an
/// object of `len` bytes; none for an empty one.
fn pieces(len: u64, piece: usize) -> impl Iterator<Item = (u64, usize)> {
    let piece = piece.max(1);
    (0..len).step_by(piece).map(move |offset| {
        (
            offset,
            usize::try_from(len - offset).map_or(piece, |left| left.min(piece)),
        )
    })
}

/// Bytes read back from spools that commits hold in memory now, and the most they held at
/// once (what the memory bound's test reads: `peak_spool_bytes_held`).
#[derive(Debug, Default)]
struct Held {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Held {
    /// `piece` counted while it lives, if it was read from a spool (owned).
    fn hold<'d>(&self, piece: Cow<'d, [u8]>) -> HeldPiece<'d, '_> {
        let bytes = match &piece {
            Cow::Owned(bytes) => bytes.len(),
            Cow::Borrowed(_) => 0,
        };
        let now = self
            .now
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes);
        self.peak.fetch_max(now, Ordering::Relaxed);
        HeldPiece { piece, held: self }
    }
}

/// A piece of an object, counted in [`Held`] until it is dropped.
struct HeldPiece<'d, 'h> {
    piece: Cow<'d, [u8]>,
    held: &'h Held,
}

impl std::ops::Deref for HeldPiece<'_, '_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.piece
    }
}

impl Drop for HeldPiece<'_, '_> {
    fn drop(&mut self) {
        if let Cow::Owned(bytes) = &self.piece {
            self.held.now.fetch_sub(bytes.len(), Ordering::Relaxed);
        }
    }
}

/// A blob as List Blobs lists it.
#[derive(Debug, PartialEq, Eq)]
struct Listed {
    /// Full blob name (prefix included).
    name: String,
    size: u64,
    etag: Option<String>,
    /// Its `Last-Modified` (else `Creation-Time`); absent or not a date, the age is unknown.
    modified: Option<std::time::SystemTime>,
}

/// Reads one List Blobs answer: every blob with its size, ETag and last change, and the
/// marker of the next page, if any.
fn parse_listing(body: &[u8], shown: &str) -> Result<(Vec<Listed>, Option<String>)> {
    let bad = |what: String| Error::Http {
        url: shown.to_string(),
        status: 200,
        code: "UnexpectedAnswer".into(),
        message: what,
    };
    let text =
        std::str::from_utf8(body).map_err(|_| bad("List Blobs answer is not UTF-8".into()))?;
    let doc = roxmltree::Document::parse(text)
        .map_err(|e| bad(format!("List Blobs answer is not XML: {e}")))?;
    let mut next = None;
    let mut out = Vec::new();
    for n in doc.root_element().children().filter(|n| n.is_element()) {
        match n.tag_name().name() {
            "NextMarker" => next = n.text().map(str::to_string).filter(|m| !m.is_empty()),
            "Blobs" => {
                for blob in n.children().filter(|b| b.has_tag_name("Blob")) {
                    let child = |name: &str| {
                        blob.descendants()
                            .find(|d| d.has_tag_name(name))
                            .and_then(|d| d.text())
                    };
                    let name =
                        child("Name").ok_or_else(|| bad("a listed blob has no Name".into()))?;
                    let size = child("Content-Length")
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .ok_or_else(|| bad(format!("listed blob {name} has no Content-Length")))?;
                    // RFC 1123, as every Azure date; the later of the two is the safer age.
                    let modified = child("Last-Modified")
                        .or_else(|| child("Creation-Time"))
                        .and_then(|t| httpdate::parse_http_date(t.trim()).ok());
                    out.push(Listed {
                        name: name.to_string(),
                        size,
                        etag: child("Etag").map(str::to_string).filter(|e| !e.is_empty()),
                        modified,
                    });
                }
            }
            _ => {}
        }
    }
    Ok((out, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_pages_are_read_with_sizes_etags_ages_and_markers() -> Result<()> {
        let page = br#"<?xml version="1.0" encoding="utf-8"?>
<EnumerationResults ContainerName="vault"><Prefix>erp/</Prefix><Blobs>
<Blob><Name>erp/packs/ab/abcd</Name><Properties><Creation-Time>Mon, 30 Nov 2026 03:45:40 GMT</Creation-Time><Last-Modified>Mon, 30 Nov 2026 03:45:47 GMT</Last-Modified><Etag>0x8D1</Etag><Content-Length>0</Content-Length></Properties></Blob>
<Blob><Name>erp/config</Name><Properties><Content-Length>12</Content-Length></Properties></Blob>
</Blobs><NextMarker>2!abc</NextMarker></EnumerationResults>"#;
        let (listed, next) = parse_listing(page, "x")?;
        assert_eq!(next.as_deref(), Some("2!abc"));
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_010_347);
        assert_eq!(
            listed,
            [
                Listed {
                    name: "erp/packs/ab/abcd".into(),
                    size: 0,
                    etag: Some("0x8D1".into()),
                    modified: Some(when),
                },
                Listed {
                    name: "erp/config".into(),
                    size: 12,
                    etag: None,
                    modified: None,
                }
            ]
        );
        let last = b"<EnumerationResults><Blobs/><NextMarker/></EnumerationResults>";
        assert_eq!(parse_listing(last, "x")?, (Vec::new(), None));
        let nameless = b"<x><Blobs><Blob><Name>n</Name></Blob></Blobs></x>";
        assert!(parse_listing(nameless, "x").is_err());
        assert!(parse_listing(b"<nope", "x").is_err());
        Ok(())
    }

    #[test]
    fn pieces_cover_an_object_in_order_the_last_one_short() {
        let all = |len, piece| pieces(len, piece).collect::<Vec<_>>();
        assert_eq!(all(10, 4), [(0, 4), (4, 4), (8, 2)]);
        assert_eq!(all(8, 4), [(0, 4), (4, 4)]);
        assert_eq!(all(3, 4), [(0, 3)]);
        assert_eq!(all(0, 4), []);
        assert_eq!(all(2, 0), [(0, 1), (1, 1)]);
        // No overflow at the end of the offsets.
        let quarter = 1u64 << 62;
        let last = (3 * quarter, (quarter - 1) as usize);
        assert_eq!(pieces(u64::MAX, quarter as usize).nth(3), Some(last));
        assert_eq!(pieces(u64::MAX, quarter as usize).count(), 4);
    }

    #[test]
    fn one_put_blob_holds_a_pack_under_every_version_sent() {
        // Global Azure, the azurestack profile and its fallback, and an old override.
        assert_eq!(put_blob_limit("2021-08-06"), 5000 << 20);
        assert_eq!(put_blob_limit("2019-07-07"), 256 << 20);
        assert_eq!(put_blob_limit("2017-11-09"), 256 << 20);
        assert_eq!(put_blob_limit("2016-05-31"), 256 << 20);
        assert_eq!(put_blob_limit("2015-12-11"), 64 << 20);
        for v in ["2021-08-06", "2019-07-07", "2017-11-09", "2009-09-19", ""] {
            assert!(PUT_BLOB_MAX <= put_blob_limit(v), "{v}");
        }
        const { assert!(BLOCK_SIZE <= 100 << 20) };
    }

    #[test]
    fn locations_name_container_and_prefix() -> Result<()> {
        let options = AzureStoreOptions {
            endpoint: Some("http://127.0.0.1:10000/devstoreaccount1".into()),
            ..AzureStoreOptions::new(AzureCredential::Sas("sv=1&sig=SECRET".into()))
        };
        let b = AzureBlobBackend::open("azure://devstoreaccount1/vault/erp/a b", &options)?;
        assert_eq!(b.container_path, "/devstoreaccount1/vault");
        assert_eq!(b.prefix, "erp/a b/");
        assert_eq!(
            b.path_of("packs/ab/x"),
            "/devstoreaccount1/vault/erp/a%20b/packs/ab/x"
        );
        assert!(!format!("{b:?} {:?}", options.credential).contains("SECRET"));
        let b = AzureBlobBackend::open("azure://acct/vault", &options)?;
        assert_eq!(b.prefix, "");
        assert!(AzureBlobBackend::open("azure://acct", &options).is_err());
        assert!(AzureBlobBackend::open("s3://bucket/x", &options).is_err());
        Ok(())
    }
}
