//! Reading many frames of packs with few requests: a reader that knows ahead which frames it
//! will need hands them to [`plan_spans`], which groups them by pack and coalesces frames that
//! are adjacent or separated by at most [`FetchLimits::gap`] bytes into spans of at most
//! [`FetchLimits::max_span`] bytes, each one ranged GET. A remote restore
//! ([`super::by_pack`]) plans its spans here and streams them
//! ([`Backend::open_range`](crate::store::Backend::open_range)) with
//! [`FetchLimits::in_flight`] requests at once, frame by frame: a span is never held whole,
//! so its length is a request size, not memory. Bytes between wanted frames are read and
//! dropped, never interpreted, and a frame is only used after it decoded.
//!
//! Invariant: every wanted frame lies in exactly one span, whole; a single frame larger than
//! `max_span` is a span of its own.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::format::pack::RecordLocation;

/// How frames are gathered into requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchLimits {
    /// Largest run of unwanted bytes between two wanted frames of a pack that is read through
    /// rather than split into two requests.
    pub gap: u64,
    /// Largest span (one ranged GET), in bytes: a cap on a request's size (a span is
    /// streamed, never held). A single frame larger than this is still read, alone.
    pub max_span: u64,
    /// Requests in flight at once.
    pub in_flight: usize,
}

/// Why these numbers (benches/remote.py, 4 GiB gen2 restore, ratios from one run on the
/// shared 2-core machine). A span is streamed, so its length costs no memory: the wanted part
/// of a pack is one GET per region (`max_span` only caps a request at four packs' worth), and
/// the gap is 16 MiB, about a whole pack, because a second GET costs a round trip, a request billed,
/// and on stores that read the whole object to serve a range (moto) the whole pack again:
/// 27 GETs per GiB against 36 with a 1 MiB gap and 90 with the old 4 MiB spans, for 15% more
/// bytes received, and 0 ms restores from moto took 13.5 s against 20.2 s (1 MiB gap) and
/// 15.7 s (old spans). One connection carries about a window per round trip, so at 20 ms
/// speed grows with the GETs in flight: 8, 16, 24 and 32 restored in 60.0, 32.7, 23.5 and
/// 20.8 s from moto (16.9 to 15.2 s at 0 ms, no loss), all at a peak RSS of 73 MiB, since a
/// fetcher holds about 1 MiB whatever its span; 64 were faster still at 20 ms (17.3 s) but
/// slower at 0 ms and peaked at 98 MiB. Against the 4 MiB spans and 8 GETs before, in one run:
/// 2.8× (moto) and 2.5× (Azurite) faster at 20 ms, 1.3× and 1.6× at 0 ms.
impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            gap: 16 << 20,
            max_span: 64 << 20,
            in_flight: 32,
        }
    }
}

/// The environment variable that sets [`FetchLimits::in_flight`] of a remote restore (1 to
/// [`MAX_IN_FLIGHT`]); each request in flight holds a frame or two, not its span.
pub const IN_FLIGHT_ENV: &str = "STACKVAULT_RESTORE_GETS_IN_FLIGHT";

/// Most requests in flight [`IN_FLIGHT_ENV`] may ask for: each fetcher holds about 1 MiB (a
/// stored and a decoded frame, a write run, the HTTP client's buffer), so 64 stay well within
/// the 128 MiB budget.
pub const MAX_IN_FLIGHT: usize = 64;

/// The environment variable that sets [`FetchLimits::gap`] of a remote restore, in bytes (0
/// to [`MAX_GAP`]): for measuring, see `benches/remote.py --sweep-gap-kib`.
pub const GAP_ENV: &str = "STACKVAULT_RESTORE_GAP_BYTES";

/// Largest gap [`GAP_ENV`] may ask for: a span never exceeds [`FetchLimits::max_span`] anyway.
pub const MAX_GAP: u64 = 64 << 20;

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
