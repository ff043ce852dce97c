//! Reading many frames of packs with few requests: a reader that knows ahead which frames it
//! will need (a restore walking its manifest in disk order) hands them to [`plan_spans`],
//! which groups them by pack and coalesces frames that are adjacent or separated by at most
//! [`FetchLimits::gap`] bytes into spans of at most [`FetchLimits::max_span`] bytes, each one
//! ranged GET. [`fetch_frames`] reads the spans with up to [`FetchLimits::in_flight`] requests
//! at once and decodes (authenticates, checks the crc32, decompresses) every wanted frame
//! from its span, exactly as a single-frame read does; bytes between wanted frames are
//! fetched but never interpreted.
//!
//! Invariants: a frame is only ever served after [`decode_frame_into`] accepted it; memory
//! held by one call is at most `in_flight × max_span` of fetched bytes plus the decoded
//! frames asked for (the caller bounds those by how much it plans at once). A frame whose
//! span fails with damage or a missing pack is simply absent from the result, so the caller
//! reads it again on its own (single-frame) path, which names the pack and offset of the
//! damage and looks the chunk up once more in case prune moved it; any other failure (the
//! store unreachable after its retries, cancellation) fails the whole call.
//!
//! Not tied to restore: the snapshot reader (`read/`) can plan its read-ahead with it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

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
}

/// Why these numbers: a request costs one round trip, which on a link of 100 MiB/s with
/// 20 ms of latency is the time to transfer 2 MiB; reading through a gap of up to 1 MiB is
/// therefore cheaper than a second request, while a larger gap would mostly move unwanted
/// bytes on faster, nearer stores (moto, Azurite, a LAN). One connection carries about a
/// window per round trip, so a restore's speed on a far store grows with the requests in
/// flight, not their size (benches/remote.py: 4 GETs of 8 MiB in flight restored at 0.37×
/// restic's speed at 20 ms); 8 spans of 4 MiB keep the same 32 MiB of fetched bytes, a
/// quarter of the 128 MiB budget, at twice the parallelism and about 300 requests
/// per GiB (a GET per frame was 6192).
impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            gap: 1024 * 1024,
            max_span: 4 * 1024 * 1024,
            in_flight: 8,
        }
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
    let next = AtomicUsize::new(0);
    let out = Mutex::new(DecodedFrames::default());
    let workers = limits.in_flight.clamp(1, spans.len().max(1));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(span) = spans.get(i) else {
                            return Ok(());
                        };
                        let decoded = match fetch_span(backend, protection, span) {
                            Ok(d) => d,
                            Err(Error::NotFound { .. }) => Vec::new(),
                            Err(e) if e.is_corruption() => Vec::new(),
                            Err(e) => return Err(e),
                        };
                        let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
                        out.requests += 1;
                        for (offset, frame) in decoded {
                            out.frames.insert((span.pack.clone(), offset), frame);
                        }
                    }
                })
            })
            .collect();
        let mut first = Ok(());
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(Error::Internal("a frame fetcher panicked".into())));
            if first.is_ok() {
                first = r;
            }
        }
        first
    })?;
    Ok(out.into_inner().unwrap_or_else(|p| p.into_inner()))
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
