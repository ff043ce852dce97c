//! Reading many frames of packs with few requests: a reader that knows ahead which frames it
//! will need (a restore walking its manifest in disk order) hands them to [`plan_spans`],
//! which groups them by pack and coalesces frames that are adjacent or separated by at most
//! [`FetchLimits::gap`] bytes into spans of at most [`FetchLimits::max_span`] bytes, each one
//! ranged GET. [`fetch_pipelined`] reads the spans of window after window with up to
//! [`FetchLimits::in_flight`] requests at once, from one queue, so the next windows are
//! fetched while one is consumed ([`fetch_frames`]: one window), and decodes (authenticates,
//! checks the crc32, decompresses) every wanted frame from its span, exactly as a
//! single-frame read does; bytes between wanted frames are fetched but never interpreted.
//!
//! Invariants: a frame is only ever served after [`decode_frame_into`] accepted it; windows
//! are handed over in the order they were planned, each only once all its spans are in;
//! memory held is at most `in_flight × max_span` of fetched bytes plus the decoded frames of
//! the windows planned and not yet consumed, which planning keeps within
//! [`FetchLimits::ahead`] (a single window larger than that is still read, alone). A frame
//! whose span fails with damage or a missing pack is simply absent from the result, so the
//! caller reads it again on its own (single-frame) path, which names the pack and offset of
//! the damage and looks the chunk up once more in case prune moved it; any other failure
//! (the store unreachable after its retries, cancellation) stops the whole read.
//!
//! A remote restore plans its spans with [`plan_spans`] and fetches them itself, in pack order
//! ([`super::by_pack`]); [`fetch_pipelined`] serves readers that must consume frames in disk
//! order. Not tied to restore: the snapshot reader (`read/`) can plan its read-ahead with it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::crypto::Protection;
use crate::error::{Error, Result};
use crate::format::pack::{decode_frame_into, RecordLocation};
use crate::store::{pack_key, Backend};

/// How frames are gathered into requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchLimits {
    /// Largest run of unwanted bytes between two wanted frames of a pack that is read through
    /// rather than split into two requests.
    pub gap: u64,
    /// Largest span (one ranged GET), in bytes. A single frame larger than this is still
    /// read, alone.
    pub max_span: u64,
    /// Requests in flight at once.
    pub in_flight: usize,
    /// Raw bytes of decoded frames that [`fetch_pipelined`] may hold for windows planned and
    /// not yet consumed (the one being consumed included): how far reading runs ahead.
    pub ahead: u64,
}

/// Why these numbers: a request costs one round trip, which on a link of 100 MiB/s with
/// 20 ms of latency is the time to transfer 2 MiB; reading through a gap of up to 1 MiB is
/// therefore cheaper than a second request, while a larger gap would mostly move unwanted
/// bytes on faster, nearer stores (moto, Azurite, a LAN). One connection carries about a
/// window per round trip, so a restore's speed on a far store grows with the requests in
/// flight, not their size (benches/remote.py: 4 GETs of 8 MiB in flight restored at 0.37×
/// restic's speed at 20 ms); 8 spans of 4 MiB keep the same 32 MiB of fetched bytes, a
/// quarter of the 128 MiB budget, at twice the parallelism and about 300 requests
/// per GiB (a GET per frame was 6192). With windows pipelined (S24, same bench at 20 ms),
/// 4, 8 and 16 in flight restored alike from moto (CPU-bound on a loaded machine), and 16
/// restored 1.7× faster than 8 from Azurite but peaked at 129 MiB: 8 stays the default,
/// `ahead` at 48 MiB (three 16 MiB windows).
impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            gap: 1024 * 1024,
            max_span: 4 * 1024 * 1024,
            in_flight: 8,
            ahead: 48 * 1024 * 1024,
        }
    }
}

/// The environment variable that sets [`FetchLimits::in_flight`] of a remote restore (1 to
/// [`MAX_IN_FLIGHT`]); each request in flight holds up to [`FetchLimits::max_span`] bytes.
pub const IN_FLIGHT_ENV: &str = "STACKVAULT_RESTORE_GETS_IN_FLIGHT";

/// Most requests in flight [`IN_FLIGHT_ENV`] may ask for: each holds a span buffer of up to
/// [`FetchLimits::max_span`] bytes, so 32 of 4 MiB are the whole 128 MiB budget.
pub const MAX_IN_FLIGHT: usize = 32;

/// The environment variable that sets [`FetchLimits::gap`] of a remote restore, in bytes (0
/// to [`MAX_GAP`]): for measuring, see `benches/remote.py --sweep-gap-kib`.
pub const GAP_ENV: &str = "STACKVAULT_RESTORE_GAP_BYTES";

/// Largest gap [`GAP_ENV`] may ask for: a span never exceeds [`FetchLimits::max_span`] anyway.
pub const MAX_GAP: u64 = 4 * 1024 * 1024;

impl FetchLimits {
    /// The defaults, with the requests in flight [`IN_FLIGHT_ENV`] asks for, if set.
    pub fn from_env() -> Result<Self> {
        let mut limits = FetchLimits::default();
        if let Ok(value) = std::env::var(IN_FLIGHT_ENV) {
            limits.in_flight = value
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=MAX_IN_FLIGHT).contains(n))
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "{IN_FLIGHT_ENV}={value:?}: give a number of requests from 1 to \
                         {MAX_IN_FLIGHT}, or unset it for the default ({})",
                        limits.in_flight
                    ))
                })?;
        }
        if let Ok(value) = std::env::var(GAP_ENV) {
            limits.gap = value
                .trim()
                .parse()
                .ok()
                .filter(|n| *n <= MAX_GAP)
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "{GAP_ENV}={value:?}: give a number of bytes from 0 to {MAX_GAP}, or \
                         unset it for the default ({})",
                        limits.gap
                    ))
                })?;
        }
        Ok(limits)
    }
}

/// One ranged GET: `len` bytes at `offset` of pack `pack`, holding `frames` (by their
/// record offset, ascending).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub pack: String,
    pub offset: u64,
    pub len: u64,
    pub frames: Vec<RecordLocation>,
}

/// Groups the frames of `wanted` (pack, a chunk's record location; many chunks of one frame
/// name it once) by pack and coalesces them into spans under `limits`. Spans come in pack
/// name order, then offset order.
pub fn plan_spans<'a>(
    wanted: impl IntoIterator<Item = (&'a str, &'a RecordLocation)>,
    limits: &FetchLimits,
) -> Vec<Span> {
    let mut by_pack: BTreeMap<&str, BTreeMap<u64, RecordLocation>> = BTreeMap::new();
    for (pack, record) in wanted {
        by_pack
            .entry(pack)
            .or_default()
            .entry(record.offset)
            .or_insert(*record);
    }
    let mut spans = Vec::new();
    for (pack, frames) in by_pack {
        let mut current: Option<Span> = None;
        for record in frames.into_values() {
            let start = record.offset;
            let Some(end) = start.checked_add(record.read_len()) else {
                // Nonsense from the index: left out, the caller's own read reports it.
                continue;
            };
            if let Some(span) = current.as_mut() {
                let span_end = span.offset + span.len;
                let joins = start >= span_end
                    && start - span_end <= limits.gap
                    && end - span.offset <= limits.max_span;
                if joins {
                    span.len = end - span.offset;
                    span.frames.push(record);
                    continue;
                }
            }
            spans.extend(current.replace(Span {
                pack: pack.to_string(),
                offset: start,
                len: end - start,
                frames: vec![record],
            }));
        }
        spans.extend(current);
    }
    spans
}

/// Decoded frames by (pack, record offset), as [`fetch_frames`] returns them.
#[derive(Debug, Default)]
pub struct DecodedFrames {
    frames: HashMap<(String, u64), Vec<u8>>,
    /// Ranged GETs sent.
    pub requests: u64,
}

impl DecodedFrames {
    /// The decoded frame at `offset` of `pack`, if it was fetched and accepted.
    pub fn get(&self, pack: &str, offset: u64) -> Option<&[u8]> {
        // A borrowed key would need a second map type; packs per call are few.
        self.frames
            .get(&(pack.to_string(), offset))
            .map(Vec::as_slice)
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// Fetches `spans` from `backend`, `limits.in_flight` at a time, and decodes their frames
/// (see the module doc for what is absent and what fails).
pub fn fetch_frames(
    backend: &dyn Backend,
    protection: &Protection,
    spans: &[Span],
    limits: &FetchLimits,
) -> Result<DecodedFrames> {
    let mut once = Some(Planned {
        work: (),
        spans: spans.to_vec(),
        frame_bytes: 0,
    });
    let mut out = DecodedFrames::default();
    let requests = fetch_pipelined(
        backend,
        protection,
        limits,
        || Ok(once.take()),
        |(), frames| {
            out = frames;
            Ok(())
        },
    )?;
    out.requests = requests;
    Ok(out)
}

/// One window of a pipelined read ([`fetch_pipelined`]): what its consumer needs to use it,
/// the spans holding its frames, and what holding its decoded frames costs.
#[derive(Debug)]
pub struct Planned<W> {
    pub work: W,
    pub spans: Vec<Span>,
    /// Raw bytes of the distinct frames its spans decode to.
    pub frame_bytes: u64,
}

/// Reads windows planned one after the other by `plan` (on a thread of its own, until it
/// returns `None`) and hands each to `consume` (on the calling thread) in plan order, with
/// its decoded frames, once all of its spans are fetched. The spans of every planned window
/// go into one queue that `limits.in_flight` fetchers work through, so the fetches of the
/// next windows run while a window is consumed and a window's slowest span never leaves the
/// other connections idle. `plan` runs ahead of `consume` only while the frames of the
/// windows planned and not yet consumed (the one being consumed included) stay within
/// `limits.ahead` (one window is always admitted), so memory is bounded by `limits.ahead`
/// plus the spans in flight, whatever the disk size. Returns the ranged GETs sent.
///
/// The first failure (of `plan`, a fetch or `consume`) stops everything and is returned;
/// frames lost to damage are simply absent (see the module doc).
pub fn fetch_pipelined<W: Send>(
    backend: &dyn Backend,
    protection: &Protection,
    limits: &FetchLimits,
    mut plan: impl FnMut() -> Result<Option<Planned<W>>> + Send,
    mut consume: impl FnMut(W, DecodedFrames) -> Result<()>,
) -> Result<u64> {
    let shared = Pipeline {
        state: Mutex::new(PipelineState {
            queue: VecDeque::new(),
            windows: VecDeque::new(),
            first_window: 0,
            held: 0,
            planned_all: false,
            failure: None,
            requests: 0,
        }),
        moved: Condvar::new(),
    };
    let shared = &shared;
    let ahead = limits.ahead;
    std::thread::scope(|scope| {
        let mut threads = Vec::with_capacity(limits.in_flight.max(1) + 1);
        threads.push(scope.spawn(move || {
            let _stop = StopOnPanic(shared);
            let mut sequence = 0u64;
            loop {
                if shared.lock().failure.is_some() {
                    return;
                }
                let planned = match plan() {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => return shared.fail(e),
                };
                let mut s = shared.lock();
                while s.failure.is_none() && s.held > 0 && s.held + planned.frame_bytes > ahead {
                    s = shared.wait(s);
                }
                if s.failure.is_some() {
                    return;
                }
                s.held += planned.frame_bytes;
                s.windows.push_back(WindowSlot {
                    work: Some(planned.work),
                    frame_bytes: planned.frame_bytes,
                    pending: planned.spans.len(),
                    frames: DecodedFrames::default(),
                });
                s.queue
                    .extend(planned.spans.into_iter().map(|span| (sequence, span)));
                sequence += 1;
                shared.moved.notify_all();
            }
            shared.lock().planned_all = true;
            shared.moved.notify_all();
        }));
        for _ in 0..limits.in_flight.max(1) {
            threads.push(scope.spawn(move || {
                let _stop = StopOnPanic(shared);
                loop {
                    let (window, span) = {
                        let mut s = shared.lock();
                        loop {
                            if s.failure.is_some() {
                                return;
                            }
                            if let Some(next) = s.queue.pop_front() {
                                break next;
                            }
                            if s.planned_all {
                                return;
                            }
                            s = shared.wait(s);
                        }
                    };
                    let decoded = match fetch_span(backend, protection, &span) {
                        Ok(d) => d,
                        Err(Error::NotFound { .. }) => Vec::new(),
                        Err(e) if e.is_corruption() => Vec::new(),
                        Err(e) => return shared.fail(e),
                    };
                    let mut s = shared.lock();
                    s.requests += 1;
                    let first = s.first_window;
                    let Some(slot) = window
                        .checked_sub(first)
                        .and_then(|i| usize::try_from(i).ok())
                        .and_then(|i| s.windows.get_mut(i))
                    else {
                        drop(s);
                        return shared.fail(Error::Internal(format!(
                            "span of window {window} fetched after the window was consumed"
                        )));
                    };
                    for (offset, frame) in decoded {
                        slot.frames
                            .frames
                            .insert((span.pack.clone(), offset), frame);
                    }
                    slot.pending = slot.pending.saturating_sub(1);
                    shared.moved.notify_all();
                }
            }));
        }
        let consumed = (|| -> Result<()> {
            loop {
                let (work, frames, frame_bytes) = {
                    let mut s = shared.lock();
                    loop {
                        if s.failure.is_some() {
                            // Stopped: the failure is returned below.
                            return Ok(());
                        }
                        if s.windows.front().is_some_and(|w| w.pending == 0) {
                            break;
                        }
                        if s.windows.is_empty() && s.planned_all {
                            return Ok(());
                        }
                        s = shared.wait(s);
                    }
                    let Some(mut slot) = s.windows.pop_front() else {
                        return Err(Error::Internal("planned window vanished".into()));
                    };
                    s.first_window += 1;
                    let Some(work) = slot.work.take() else {
                        return Err(Error::Internal("planned window consumed twice".into()));
                    };
                    (work, std::mem::take(&mut slot.frames), slot.frame_bytes)
                };
                consume(work, frames)?;
                let mut s = shared.lock();
                s.held = s.held.saturating_sub(frame_bytes);
                shared.moved.notify_all();
            }
        })();
        if let Err(e) = consumed {
            shared.fail(e);
        }
        for t in threads {
            if t.join().is_err() {
                shared.fail(Error::Internal("a frame fetcher panicked".into()));
            }
        }
    });
    let mut s = shared.lock();
    match s.failure.take() {
        Some(e) => Err(e),
        None => Ok(s.requests),
    }
}

/// The state [`fetch_pipelined`]'s planner, fetchers and consumer share.
struct Pipeline<W> {
    state: Mutex<PipelineState<W>>,
    /// Notified whenever anything in the state moves.
    moved: Condvar,
}

struct PipelineState<W> {
    /// Spans not yet taken by a fetcher, with the sequence number of their window.
    queue: VecDeque<(u64, Span)>,
    /// Windows planned and not yet consumed, in plan order; the first has sequence number
    /// `first_window`.
    windows: VecDeque<WindowSlot<W>>,
    first_window: u64,
    /// Frame bytes of `windows` and of the window being consumed.
    held: u64,
    /// The planner is done: no more windows come.
    planned_all: bool,
    /// The first failure; once set, every thread stops.
    failure: Option<Error>,
    requests: u64,
}

/// Stops the pipeline when its thread unwinds, so that no one waits for it forever.
struct StopOnPanic<'a, W>(&'a Pipeline<W>);

impl<W> Drop for StopOnPanic<'_, W> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .fail(Error::Internal("a frame fetcher panicked".into()));
        }
    }
}

struct WindowSlot<W> {
    work: Option<W>,
    frame_bytes: u64,
    /// Spans of the window not yet fetched.
    pending: usize,
    frames: DecodedFrames,
}

impl<W> Pipeline<W> {
    fn lock(&self) -> MutexGuard<'_, PipelineState<W>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(
        &self,
        guard: MutexGuard<'a, PipelineState<W>>,
    ) -> MutexGuard<'a, PipelineState<W>> {
        self.moved.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    /// Records `e` unless a failure came first, and wakes everyone to stop.
    fn fail(&self, e: Error) {
        self.lock().failure.get_or_insert(e);
        self.moved.notify_all();
    }
}

/// One span's GET, and its frames decoded; a frame that does not decode is left out.
fn fetch_span(
    backend: &dyn Backend,
    protection: &Protection,
    span: &Span,
) -> Result<Vec<(u64, Vec<u8>)>> {
    let location = format!("pack {}", span.pack);
    let len = usize::try_from(span.len)
        .map_err(|_| Error::corrupt(&location, span.offset, "span too large"))?;
    let bytes = backend.get_range(&pack_key(&span.pack), span.offset, len)?;
    let mut decoded = Vec::with_capacity(span.frames.len());
    for record in &span.frames {
        let Some(record_bytes) = record
            .offset
            .checked_sub(span.offset)
            .and_then(|from| usize::try_from(from).ok())
            .and_then(|from| {
                let to = from.checked_add(usize::try_from(record.read_len()).ok()?)?;
                bytes.get(from..to)
            })
        else {
            continue;
        };
        let mut frame = Vec::new();
        match decode_frame_into(
            record_bytes,
            record,
            protection,
            &span.pack,
            &location,
            &mut frame,
        ) {
            Ok(()) => decoded.push((record.offset, frame)),
            Err(e) if e.is_corruption() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ChunkId;
    use crate::store::pack::{compress, PackWriter};
    use crate::store::LocalDir;
    use std::sync::atomic::{AtomicU64, Ordering};

    const FRAME: usize = 64 * 1024;

    /// Each frame's location and bytes.
    type Frames = Vec<(RecordLocation, Vec<u8>)>;

    /// A pack of `n` frames of one chunk each (distinct bytes), stored in a local directory:
    /// (its directory, its name, its frames).
    fn frames_in_a_pack(n: usize) -> Result<(tempfile::TempDir, String, Frames)> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let keys = Protection::Plain;
        let mut w = PackWriter::new(n * FRAME + 4096, &keys)?;
        let mut chunks = Vec::new();
        for i in 0..n {
            let chunk: Vec<u8> = (0..FRAME).map(|b| (b * 7 + i * 13) as u8).collect();
            let (comp, stored) = compress(&chunk, 1)?;
            w.add_frame(
                &keys,
                &[(keys.chunk_id(&chunk), FRAME as u32)],
                &stored,
                comp,
            )?;
            chunks.push(chunk);
        }
        let p = w.finish(&keys)?;
        LocalDir::new(dir.path()).put(&pack_key(&p.name), &p.bytes)?;
        let frames = p
            .entries
            .iter()
            .map(|e| e.location(p.version))
            .zip(chunks)
            .collect();
        Ok((dir, p.name, frames))
    }

    #[test]
    fn windows_come_in_plan_order_and_planning_stays_within_the_budget() -> Result<()> {
        let (dir, pack, frames) = frames_in_a_pack(12)?;
        let backend = LocalDir::new(dir.path());
        // Room for two windows of one frame: the planner may hold one more in hand.
        let limits = FetchLimits {
            gap: 0,
            max_span: FRAME as u64,
            in_flight: 3,
            ahead: 2 * FRAME as u64,
        };
        let planned = AtomicU64::new(0);
        let mut next = 0usize;
        let mut consumed = Vec::new();
        let requests = fetch_pipelined(
            &backend,
            &Protection::Plain,
            &limits,
            || {
                let Some((record, _)) = frames.get(next) else {
                    return Ok(None);
                };
                next += 1;
                planned.fetch_add(1, Ordering::SeqCst);
                Ok(Some(Planned {
                    work: next - 1,
                    spans: plan_spans([(pack.as_str(), record)], &limits),
                    frame_bytes: FRAME as u64,
                }))
            },
            |window, decoded| {
                let ahead = planned.load(Ordering::SeqCst) - consumed.len() as u64;
                assert!(ahead <= 3, "{ahead} windows planned ahead of the consumer");
                let (record, chunk) = &frames[window];
                assert_eq!(decoded.get(&pack, record.offset), Some(chunk.as_slice()));
                assert_eq!(decoded.len(), 1);
                consumed.push(window);
                Ok(())
            },
        )?;
        assert_eq!(consumed, (0..12).collect::<Vec<_>>());
        assert_eq!(requests, 12);
        Ok(())
    }

    #[test]
    fn a_failure_stops_the_pipeline_and_is_returned() -> Result<()> {
        let (dir, pack, frames) = frames_in_a_pack(6)?;
        let backend = LocalDir::new(dir.path());
        let limits = FetchLimits::default();
        let mut next = 0usize;
        let mut consumed = Vec::new();
        let r = fetch_pipelined(
            &backend,
            &Protection::Plain,
            &limits,
            || {
                if next == 3 {
                    return Err(Error::Cancelled("stopped at window 3".into()));
                }
                next += 1;
                Ok(Some(Planned {
                    work: next - 1,
                    spans: plan_spans([(pack.as_str(), &frames[next - 1].0)], &limits),
                    frame_bytes: FRAME as u64,
                }))
            },
            |window, _| {
                consumed.push(window);
                Ok(())
            },
        );
        assert!(matches!(r, Err(Error::Cancelled(_))), "{r:?}");
        assert!(consumed.len() <= 3, "{consumed:?}");
        // The consumer's own failure too.
        let mut next = 0usize;
        let r = fetch_pipelined(
            &backend,
            &Protection::Plain,
            &limits,
            || {
                next += 1;
                Ok(frames.get(next - 1).map(|(record, _)| Planned {
                    work: next - 1,
                    spans: plan_spans([(pack.as_str(), record)], &limits),
                    frame_bytes: FRAME as u64,
                }))
            },
            |window, _| match window {
                2 => Err(Error::Internal("the target refused window 2".into())),
                _ => Ok(()),
            },
        );
        assert!(matches!(r, Err(Error::Internal(m)) if m.contains("window 2")));
        Ok(())
    }

    fn frame(offset: u64, stored_len: u32) -> RecordLocation {
        RecordLocation {
            version: crate::format::pack::PACK_VERSION_SEALED,
            id: ChunkId([0; 32]),
            offset,
            in_frame: 0,
            raw_len: 1,
            stored_len,
            frame_raw_len: 1,
        }
    }

    #[test]
    fn frames_coalesce_within_gap_and_span() {
        let limits = FetchLimits {
            gap: 100,
            max_span: 1000,
            in_flight: 2,
            ahead: 0,
        };
        let (a, b, c, d, e) = (
            frame(10, 100),
            frame(110, 100),
            frame(300, 100),
            frame(900, 200),
            frame(5000, 3000),
        );
        let wanted = [
            ("p", &c),
            ("p", &a),
            ("p", &b),
            ("p", &a),
            ("p", &d),
            ("q", &a),
            ("p", &e),
        ];
        let spans = plan_spans(wanted.iter().map(|(p, r)| (*p, *r)), &limits);
        let shape: Vec<(&str, u64, u64, usize)> = spans
            .iter()
            .map(|s| (s.pack.as_str(), s.offset, s.len, s.frames.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                // a and b adjacent, c 90 bytes on: one span.
                ("p", 10, 390, 3),
                // d is 500 bytes past c: too far; e alone though larger than max_span.
                ("p", 900, 200, 1),
                ("p", 5000, 3000, 1),
                ("q", 10, 100, 1),
            ]
        );
    }
}
