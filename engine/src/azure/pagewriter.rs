//! The page blob writer: turns aligned windows of a disk into few, large Put Page requests
//! and keeps several of them in flight.
//!
//! Job: given a window (its blob offset, its bytes, and the ranges the blob already has
//! written there), plan the requests that make the blob hold exactly those bytes, send them
//! from a pool of threads, and report each window once the service confirmed all of its
//! requests. `restore` to a page blob writes through it; anything else that writes disk
//! windows into a page blob (a standby-disk sync) can use [`PageWriter::run`] the same way.
//!
//! Planning ([`plan_window`]): pages (512 bytes, 4 KiB on Azure Stack Hub) that hold data are
//! sent with Put Page; data runs separated by a zero gap of at most the coalescing gap go in
//! one request, zeros included, up to [`MAX_PUT_PAGE`] bytes. A page blob accepts about 500
//! requests/s and 60 MiB/s, so one request costs as much service time as ≈ 120 KiB of body:
//! sending a shorter gap is cheaper than another request. The zeros sent count as written
//! pages (billed, and reported by Get Page Ranges), hence the default of 64 KiB, below the
//! break-even, and the option. Zero runs the blob has written (stale pages) are cleared, one
//! clear per zero run, which leaves the window byte-identical to the bytes given; a stale zero
//! run at the window's edge no longer than the gap is sent as zeros inside its neighbouring
//! Put Page instead (one request fewer for at most the gap in bytes).
//!
//! Invariants:
//! - Requests never cross a window and are aligned to the profile's page size.
//! - Memory: the windows handed over and not yet confirmed hold at most
//!   [`DEFAULT_BYTES_IN_FLIGHT`] bytes (one window alone may exceed it): [`Submitter::submit`]
//!   waits until enough earlier windows are freed. A window's bytes are freed when its last
//!   request returns, and the queue to the senders holds nothing (a rendezvous), so at most
//!   `parallel` requests are in flight. Without the byte bound, `parallel` windows of up to
//!   4 MiB each plus one per producer were held: 72 MiB at 16 in flight, reached whenever the
//!   changes are large, so a sync's memory followed the size of its changes.
//! - A window is confirmed (the callback runs) only after every request of it succeeded; after
//!   the first failure no further request is sent and [`PageWriter::run`] returns that error.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};

use serde::Serialize;

use super::{BlobClient, PageRange, MAX_PUT_PAGE};
use crate::error::{Error, Result};

/// Default coalescing gap: zero runs up to this long inside a request are sent as zeros.
pub const DEFAULT_COALESCE_GAP: u64 = 64 << 10;
/// Default requests in flight: at 20 ms of round trip, 16 restored the bench disk in 1.01 s,
/// 8 in 1.40 s, 32 in 1.09 s (benches/RESULTS.md).
pub const DEFAULT_PARALLEL: usize = 16;
/// Bytes of submitted windows not yet confirmed: four full 4 MiB requests, or 16 requests of
/// 1 MiB, keep a page blob (≈ 60 MiB/s, ≈ 500 requests/s) busy at tens of ms of round trip.
pub const DEFAULT_BYTES_IN_FLIGHT: u64 = 16 << 20;

/// One planned request, in bytes relative to the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRequest {
    /// Put Page of `[start, end)` from the window's bytes; `zero_bytes` of it are zero pages
    /// inside the request (coalesced gaps).
    Put {
        start: usize,
        end: usize,
        zero_bytes: u64,
    },
    /// Put Page `clear` of `[start, end)`.
    Clear { start: usize, end: usize },
}

/// Plans the requests for `buf` at blob offset `offset`: Put Page for data, coalescing zero
/// gaps of at most `gap` bytes, requests of at most `max` bytes; clears for the parts of
/// `stale` (written ranges of the blob, sorted, end exclusive) that fall in zero runs.
/// `buf.len()` must be a multiple of `align` (itself a multiple of 512).
pub fn plan_window(
    buf: &[u8],
    offset: u64,
    align: u64,
    gap: u64,
    max: usize,
    stale: &[PageRange],
) -> Result<Vec<PageRequest>> {
    let page = usize::try_from(align).unwrap_or(usize::MAX);
    if page == 0 || !page.is_multiple_of(512) || !buf.len().is_multiple_of(page) || max < page {
        return Err(Error::Internal(format!(
            "window of {} bytes at {offset} cannot be cut in pages of {align} bytes \
             (requests of at most {max})",
            buf.len()
        )));
    }
    let gap = usize::try_from(gap).unwrap_or(usize::MAX);
    let mut puts: Vec<(usize, usize, u64)> = Vec::new();
    // The request being grown: start, end of its last data page, zero bytes inside.
    let mut open: Option<(usize, usize, u64)> = None;
    for (i, chunk) in buf.chunks_exact(page).enumerate() {
        if is_zero(chunk) {
            continue;
        }
        let (pos, end) = (i * page, (i + 1) * page);
        open = match open {
            Some((s, last, z)) if pos - last <= gap && end - s <= max => {
                Some((s, end, z + (pos - last) as u64))
            }
            Some(done) => {
                puts.push(done);
                Some((pos, end, 0))
            }
            None => Some((pos, end, 0)),
        };
    }
    puts.extend(open);
    // A zero run at the window's edge that the blob has written must be made zero too: up to
    // the gap long, it goes inside the neighbouring Put Page (as zeros) rather than in a
    // clear request of its own. A standby sync's regions start and end on changed chunks
    // whose first or last pages are often zero: 640 of 2,170 requests of a 4 GiB sync were
    // such clears, of 3.4 KiB each on average.
    let needs_clear = |from: usize, to: usize| {
        from < to && !overlaps(stale, offset + from as u64, offset + to as u64).is_empty()
    };
    if let Some(first) = puts.first_mut() {
        if first.0 <= gap && first.1 <= max && needs_clear(0, first.0) {
            first.2 += first.0 as u64;
            first.0 = 0;
        }
    }
    if let Some(last) = puts.last_mut() {
        let tail = buf.len() - last.1;
        if tail <= gap && buf.len() - last.0 <= max && needs_clear(last.1, buf.len()) {
            last.2 += tail as u64;
            last.1 = buf.len();
        }
    }

    let mut out = Vec::with_capacity(puts.len() + 1);
    let mut zero_from = 0usize;
    let window_end = offset + buf.len() as u64;
    let clear_zero_run = |out: &mut Vec<PageRequest>, from: usize, to: usize| {
        if from >= to {
            return;
        }
        let (abs_from, abs_to) = (offset + from as u64, offset + to as u64);
        let hits = overlaps(stale, abs_from, abs_to.min(window_end));
        if let (Some(first), Some(last)) = (hits.first(), hits.last()) {
            // The whole span between the first and last stale page is zero in the window:
            // one clear covers it. Rounded out to pages, which stay inside the zero run.
            let s = (first.0 - offset) as usize;
            let e = (last.1 - offset) as usize;
            let s = s - s % page;
            let e = e.div_ceil(page).saturating_mul(page).min(to);
            out.push(PageRequest::Clear { start: s, end: e });
        }
    };
    for &(start, end, zero_bytes) in &puts {
        clear_zero_run(&mut out, zero_from, start);
        out.push(PageRequest::Put {
            start,
            end,
            zero_bytes,
        });
        zero_from = end;
    }
    clear_zero_run(&mut out, zero_from, buf.len());
    Ok(out)
}

/// Changed byte ranges (sorted, end exclusive) cut out to whole pages of `align` bytes and
/// merged where the rounding makes them touch, clipped at `end`: the windows a partial update
/// of a page blob (a standby sync) hands to [`Submitter::submit`].
pub fn page_regions(ranges: &[(u64, u64)], align: u64, end: u64) -> Vec<(u64, u64)> {
    let align = align.max(1);
    let mut regions: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in ranges {
        let (rs, re) = (
            s - s % align,
            e.div_ceil(align).saturating_mul(align).min(end),
        );
        match regions.last_mut() {
            Some(last) if last.1 >= rs => last.1 = last.1.max(re),
            _ => regions.push((rs, re)),
        }
    }
    regions
}

/// Parts of `ranges` (sorted, end exclusive) inside `[start, end)`.
pub fn overlaps(ranges: &[PageRange], start: u64, end: u64) -> Vec<PageRange> {
    let first = ranges.partition_point(|&(_, e)| e <= start);
    ranges
        .get(first..)
        .unwrap_or_default()
        .iter()
        .take_while(|&&(s, _)| s < end)
        .map(|&(s, e)| (s.max(start), e.min(end)))
        .filter(|(s, e)| s < e)
        .collect()
}

/// True when every byte is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(16);
    blocks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

/// How the writer cuts and sends.
#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    /// Zero gaps up to this many bytes are sent inside a request rather than splitting it.
    pub coalesce_gap: u64,
    /// Requests in flight.
    pub parallel: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            coalesce_gap: DEFAULT_COALESCE_GAP,
            parallel: DEFAULT_PARALLEL,
        }
    }
}

/// What the writer sent.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct WriterStats {
    pub put_requests: u64,
    pub clear_requests: u64,
    /// Bytes sent with Put Page (data, coalesced zeros, anything sent with [`PageWriter::put`]).
    pub put_bytes: u64,
    /// Zero bytes sent inside coalesced Put Page requests.
    pub coalesced_zero_bytes: u64,
    /// Windows confirmed.
    pub windows: u64,
    /// Most bytes of windows submitted and not yet freed at any time (see the module
    /// documentation: at most [`DEFAULT_BYTES_IN_FLIGHT`] unless one window is larger).
    pub peak_bytes_in_flight: u64,
}

#[derive(Default)]
struct Counters {
    puts: AtomicU64,
    clears: AtomicU64,
    put_bytes: AtomicU64,
    zero_bytes: AtomicU64,
    windows: AtomicU64,
}

/// Bytes of windows in flight, and a limit [`Budget::take`] waits for.
struct Budget {
    limit: u64,
    /// Bytes held now, and the most ever held.
    held: Mutex<(u64, u64)>,
    freed: Condvar,
}

impl Budget {
    /// Waits until `n` more bytes fit (or nothing is held: a window larger than the limit
    /// goes alone), then holds them.
    fn take(&self, n: u64) -> Result<()> {
        let poisoned = || Error::Internal("page writer budget lock poisoned".into());
        let mut held = self.held.lock().map_err(|_| poisoned())?;
        while held.0 > 0 && held.0.saturating_add(n) > self.limit {
            held = self.freed.wait(held).map_err(|_| poisoned())?;
        }
        held.0 = held.0.saturating_add(n);
        held.1 = held.1.max(held.0);
        Ok(())
    }

    fn give(&self, n: u64) {
        if let Ok(mut held) = self.held.lock() {
            held.0 = held.0.saturating_sub(n);
        }
        self.freed.notify_all();
    }

    fn peak(&self) -> u64 {
        self.held.lock().map(|h| h.1).unwrap_or(0)
    }
}

/// A window of the blob to be made equal to `data`.
pub struct Window {
    /// Blob offset, a multiple of the page size.
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Writes page blob windows; see the module documentation.
pub struct PageWriter<'a> {
    client: &'a BlobClient,
    align: u64,
    options: WriterOptions,
    /// Written ranges of the blob before this writer started (sorted): what to clear.
    stale: Vec<PageRange>,
    counters: Counters,
    budget: Budget,
}

/// A window in flight: freed, and confirmed, when its last request returns; its bytes go back
/// to the budget when the last job holding it is dropped (sent, or drained after a failure).
struct InFlight<'b> {
    offset: u64,
    data: Vec<u8>,
    pending: AtomicUsize,
    budget: &'b Budget,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.budget.give(self.data.len() as u64);
    }
}

struct Job<'b> {
    window: Arc<InFlight<'b>>,
    request: PageRequest,
}

/// Hands windows to a running writer ([`PageWriter::run`]).
pub struct Submitter<'w, 'a> {
    writer: &'w PageWriter<'a>,
    jobs: SyncSender<Job<'w>>,
    failed: &'w Mutex<Option<Error>>,
    confirm: &'w (dyn Fn(u64) -> Result<()> + Sync),
}

impl<'a> PageWriter<'a> {
    /// A writer to `client`'s blob with the profile's page alignment. `stale` are the ranges
    /// the blob has written (empty for a new blob); zero runs over them are cleared.
    pub fn new(client: &'a BlobClient, options: WriterOptions, stale: Vec<PageRange>) -> Self {
        PageWriter {
            client,
            align: client.profile().page_align(),
            options: WriterOptions {
                parallel: options.parallel.max(1),
                ..options
            },
            stale,
            counters: Counters::default(),
            budget: Budget {
                limit: DEFAULT_BYTES_IN_FLIGHT,
                held: Mutex::new((0, 0)),
                freed: Condvar::new(),
            },
        }
    }

    /// The same writer holding at most `bytes` of windows in flight (see the module
    /// documentation).
    pub fn with_bytes_in_flight(mut self, bytes: u64) -> Self {
        self.budget.limit = bytes.max(1);
        self
    }

    /// Page size of the requests.
    pub fn align(&self) -> u64 {
        self.align
    }

    /// The requests [`Submitter::submit`] sends for `data` at `offset`.
    pub fn plan(&self, offset: u64, data: &[u8]) -> Result<Vec<PageRequest>> {
        plan_window(
            data,
            offset,
            self.align,
            self.options.coalesce_gap,
            MAX_PUT_PAGE,
            &self.stale,
        )
    }

    /// Runs `produce` with a [`Submitter`] while `parallel` threads send the requests;
    /// `confirm(offset)` runs once per window whose requests all succeeded. Returns what
    /// `produce` returned, or the first error of either side.
    pub fn run<R>(
        &self,
        confirm: &(dyn Fn(u64) -> Result<()> + Sync),
        produce: impl FnOnce(&Submitter<'_, 'a>) -> Result<R>,
    ) -> Result<R> {
        let failed = Mutex::new(None);
        // Capacity 0: a window waits in its producer until a sender takes its request.
        let (tx, rx) = sync_channel::<Job<'_>>(0);
        let rx = Mutex::new(rx);
        std::thread::scope(|scope| {
            let senders: Vec<_> = (0..self.options.parallel)
                .map(|_| scope.spawn(|| self.send_loop(&rx, &failed, confirm)))
                .collect();
            let submitter = Submitter {
                writer: self,
                jobs: tx,
                failed: &failed,
                confirm,
            };
            let produced = produce(&submitter);
            drop(submitter);
            for s in senders {
                if s.join().is_err() {
                    record(
                        &failed,
                        Error::Internal("a page blob sender panicked".into()),
                    );
                }
            }
            let failure = failed.lock().ok().and_then(|mut f| f.take());
            match (produced, failure) {
                (_, Some(e)) => Err(e),
                (r, None) => r,
            }
        })
    }

    /// One Put Page of `data` at `offset`, counted (the VHD footer).
    pub fn put(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.client.put_pages(offset, data)?;
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.counters
            .put_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// One clear of `[offset, offset + len)`, counted.
    pub fn clear(&self, offset: u64, len: u64) -> Result<()> {
        self.client.clear_pages(offset, len)?;
        self.counters.clears.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn stats(&self) -> WriterStats {
        let c = &self.counters;
        WriterStats {
            put_requests: c.puts.load(Ordering::Relaxed),
            clear_requests: c.clears.load(Ordering::Relaxed),
            put_bytes: c.put_bytes.load(Ordering::Relaxed),
            coalesced_zero_bytes: c.zero_bytes.load(Ordering::Relaxed),
            windows: c.windows.load(Ordering::Relaxed),
            peak_bytes_in_flight: self.budget.peak(),
        }
    }

    fn send_loop(
        &self,
        rx: &Mutex<Receiver<Job<'_>>>,
        failed: &Mutex<Option<Error>>,
        confirm: &(dyn Fn(u64) -> Result<()> + Sync),
    ) {
        loop {
            let next = match rx.lock() {
                Ok(r) => r.recv(),
                Err(_) => return,
            };
            let Ok(job) = next else { return };
            if has_failed(failed) {
                continue; // drain, so producers never block on a dead pool
            }
            if let Err(e) = self.send(&job).and_then(|()| {
                if job.window.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                    self.counters.windows.fetch_add(1, Ordering::Relaxed);
                    confirm(job.window.offset)
                } else {
                    Ok(())
                }
            }) {
                record(failed, e);
            }
        }
    }

    fn send(&self, job: &Job<'_>) -> Result<()> {
        let w = &job.window;
        match job.request {
            PageRequest::Put {
                start,
                end,
                zero_bytes,
            } => {
                let body = w.data.get(start..end).ok_or_else(|| {
                    Error::Internal(format!("request {start}..{end} outside its window"))
                })?;
                self.put(w.offset + start as u64, body)?;
                self.counters
                    .zero_bytes
                    .fetch_add(zero_bytes, Ordering::Relaxed);
                Ok(())
            }
            PageRequest::Clear { start, end } => {
                self.clear(w.offset + start as u64, (end - start) as u64)
            }
        }
    }
}

impl Submitter<'_, '_> {
    /// Plans `window` and queues its requests; blocks while the windows in flight hold the
    /// writer's byte budget, and while all senders are busy. A window that needs no request is
    /// confirmed at once.
    pub fn submit(&self, window: Window) -> Result<()> {
        if let Some(e) = self.failed.lock().ok().and_then(|f| {
            f.as_ref()
                .map(|e| Error::Cancelled(format!("a page blob request failed: {e}")))
        }) {
            return Err(e);
        }
        let requests = self.writer.plan(window.offset, &window.data)?;
        if requests.is_empty() {
            self.writer.counters.windows.fetch_add(1, Ordering::Relaxed);
            return (self.confirm)(window.offset);
        }
        self.writer.budget.take(window.data.len() as u64)?;
        let in_flight = Arc::new(InFlight {
            offset: window.offset,
            data: window.data,
            pending: AtomicUsize::new(requests.len()),
            budget: &self.writer.budget,
        });
        for request in requests {
            self.jobs
                .send(Job {
                    window: in_flight.clone(),
                    request,
                })
                .map_err(|_| Error::Internal("the page blob senders are gone".into()))?;
        }
        Ok(())
    }
}

fn record(failed: &Mutex<Option<Error>>, e: Error) {
    if let Ok(mut f) = failed.lock() {
        if f.is_none() {
            *f = Some(e);
        }
    }
}

fn has_failed(failed: &Mutex<Option<Error>>) -> bool {
    failed.lock().map(|f| f.is_some()).unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_ranges_become_whole_merged_pages() {
        let ranges = [(100, 200), (4000, 4100), (9000, 9001), (20_000, 20_480)];
        // Pages that touch merge: one region up to 12 KiB, one for the last page.
        assert_eq!(
            page_regions(&ranges, 4096, 20_480),
            vec![(0, 12_288), (16_384, 20_480)]
        );
        assert_eq!(page_regions(&[(513, 514)], 512, 1 << 20), vec![(512, 1024)]);
        assert!(page_regions(&[], 4096, 1 << 20).is_empty());
    }

    const K: usize = 1024;

    fn window(len: usize, data: &[(usize, usize)]) -> Vec<u8> {
        let mut b = vec![0u8; len];
        for &(s, e) in data {
            b[s..e].fill(0xAB);
        }
        b
    }

    fn puts(plan: &[PageRequest]) -> Vec<(usize, usize, u64)> {
        plan.iter()
            .filter_map(|r| match *r {
                PageRequest::Put {
                    start,
                    end,
                    zero_bytes,
                } => Some((start, end, zero_bytes)),
                PageRequest::Clear { .. } => None,
            })
            .collect()
    }

    #[test]
    fn short_gaps_coalesce_long_gaps_split() -> Result<()> {
        let b = window(
            4096 * K,
            &[
                (0, 1),
                (8 * K, 40 * K),
                (104 * K, 105 * K),
                (400 * K, 512 * K),
            ],
        );
        // Gap 64 KiB: 0..512 and 8K..40K join (gap 7.5 KiB), 104K joins (gap 64 KiB), 400K
        // does not (gap 295 KiB).
        let plan = plan_window(&b, 0, 512, 64 * 1024, MAX_PUT_PAGE, &[])?;
        assert_eq!(
            puts(&plan),
            vec![
                (0, 105 * K, (105 * K - 512 - 32 * K - K) as u64),
                (400 * K, 512 * K, 0)
            ]
        );
        // Gap 0: one request per run of data pages.
        let plan = plan_window(&b, 0, 512, 0, MAX_PUT_PAGE, &[])?;
        assert_eq!(puts(&plan).len(), 4);
        // Stack Hub pages: the single byte makes a 4 KiB page.
        let plan = plan_window(&b, 0, 4096, 0, MAX_PUT_PAGE, &[])?;
        assert_eq!(puts(&plan)[0], (0, 4 * K, 0));
        Ok(())
    }

    #[test]
    fn requests_stay_within_max() -> Result<()> {
        let b = window(8192 * K, &[(0, 8192 * K)]);
        let plan = plan_window(&b, 0, 512, 64 * 1024, MAX_PUT_PAGE, &[])?;
        assert_eq!(puts(&plan), vec![(0, 4096 * K, 0), (4096 * K, 8192 * K, 0)]);
        let plan = plan_window(&b, 0, 512, 64 * 1024, 1000 * K, &[])?;
        assert!(puts(&plan).iter().all(|&(s, e, _)| e - s <= 1000 * K));
        Ok(())
    }

    #[test]
    fn stale_pages_in_zero_runs_are_cleared_once_per_run() -> Result<()> {
        let base = 4u64 << 20;
        let b = window(1024 * K, &[(512 * K, 516 * K)]);
        let stale = [
            (base + 1000, base + 2000),
            (base + 100 * 1024, base + 101 * 1024),
            (base + 514 * 1024, base + 515 * 1024),
            (base + 900 * 1024, base + 2048 * 1024),
        ];
        let plan = plan_window(&b, base, 512, 0, MAX_PUT_PAGE, &stale)?;
        assert_eq!(
            plan,
            vec![
                PageRequest::Clear {
                    start: 512,
                    end: 101 * K
                },
                PageRequest::Put {
                    start: 512 * K,
                    end: 516 * K,
                    zero_bytes: 0
                },
                PageRequest::Clear {
                    start: 900 * K,
                    end: 1024 * K
                },
            ]
        );
        Ok(())
    }

    #[test]
    fn the_budget_waits_for_freed_bytes_and_lets_a_large_window_go_alone() -> Result<()> {
        let budget = Budget {
            limit: 16,
            held: Mutex::new((0, 0)),
            freed: Condvar::new(),
        };
        budget.take(10)?;
        std::thread::scope(|s| -> Result<()> {
            let waiter = s.spawn(|| budget.take(10));
            std::thread::sleep(std::time::Duration::from_millis(50));
            // 20 bytes would exceed the limit: the second take waits for the first's give.
            assert_eq!(budget.peak(), 10);
            budget.give(10);
            waiter
                .join()
                .map_err(|_| Error::Internal("waiter panicked".into()))??;
            Ok(())
        })?;
        assert_eq!(budget.peak(), 10);
        budget.give(10);
        // Larger than the limit: goes when nothing else is held.
        budget.take(40)?;
        assert_eq!(budget.peak(), 40);
        Ok(())
    }

    #[test]
    fn stale_zero_edges_within_the_gap_ride_in_the_put() -> Result<()> {
        // Zeros, data, zeros: 8 KiB at each edge.
        let b = window(64 * K, &[(8 * K, 56 * K)]);
        let whole = [(0u64, 1u64 << 30)];
        // The blob has written everything: the edges go out inside the one Put Page.
        let plan = plan_window(&b, 0, 512, 64 * 1024, MAX_PUT_PAGE, &whole)?;
        assert_eq!(
            plan,
            vec![PageRequest::Put {
                start: 0,
                end: 64 * K,
                zero_bytes: 16 * K as u64
            }]
        );
        // Edges longer than the gap are cleared.
        let plan = plan_window(&b, 0, 512, 4 * 1024, MAX_PUT_PAGE, &whole)?;
        assert_eq!(plan.len(), 3, "{plan:?}");
        // A fresh blob: nothing to clear, the zeros are not sent.
        let plan = plan_window(&b, 0, 512, 64 * 1024, MAX_PUT_PAGE, &[])?;
        assert_eq!(puts(&plan), vec![(8 * K, 56 * K, 0)]);
        // The maximum request size holds.
        let plan = plan_window(&b, 0, 512, 64 * 1024, 50 * K, &whole)?;
        assert!(
            puts(&plan).iter().all(|&(s, e, _)| e - s <= 50 * K),
            "{plan:?}"
        );
        Ok(())
    }

    #[test]
    fn bad_windows_are_refused() {
        assert!(plan_window(&[0u8; 1000], 0, 512, 0, MAX_PUT_PAGE, &[]).is_err());
        assert!(plan_window(&[0u8; 4096], 0, 0, 0, MAX_PUT_PAGE, &[]).is_err());
        assert!(plan_window(&[0u8; 4096], 0, 4096, 0, 512, &[]).is_err());
    }

    #[test]
    fn overlap_and_zero_helpers() {
        let r = [(0, 512), (4096, 8192), (10_000, 20_000)];
        assert_eq!(overlaps(&r, 100, 5000), vec![(100, 512), (4096, 5000)]);
        assert_eq!(overlaps(&r, 8192, 10_000), vec![]);
        assert!(is_zero(&[0u8; 4096]));
        let mut b = [0u8; 4099];
        assert!(is_zero(&b));
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[1] = 1;
        assert!(!is_zero(&b));
    }
}
