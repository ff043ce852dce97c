//! The regions an incremental page blob sync writes, and the coalescing gap that keeps the
//! unchanged bytes they rewrite within a budget.
//!
//! A sync cuts every changed range out to whole pages and merges regions that lie at most the
//! coalescing gap apart (see [`super::coalesce`]), across segment boundaries too: a change
//! that runs over the end of a segment goes out as one request, not two. Which gap? Each
//! merge saves one request and costs its gap in rewritten unchanged bytes; issue 16 allows
//! the bytes sent to exceed the changed extents by [`GAP_BUDGET_PERCENT`] at most. So a first
//! pass over the manifests (no chunk is read) counts the gaps between neighbouring regions by
//! size, and [`choose_gap`] takes the largest gap at which merging every gap up to it stays
//! within the budget: the smallest gaps first, as they save a request for the fewest bytes.
//! The gap never exceeds [`MAX_ADAPTIVE_GAP`] (past it a request costs less service time than
//! the bytes that would replace it, `docs/pageblobs.md`).
//!
//! Invariants:
//! - Memory is flat in the disk size: both passes walk the segments in order, in batches of
//!   [`BATCH_SEGMENTS`], holding one batch's regions and a histogram of
//!   `MAX_ADAPTIVE_GAP / page` counters; nothing is kept per segment of the whole disk. The
//!   bytes of the regions being written are bounded by the page writer's budget
//!   ([`crate::azure::pagewriter::DEFAULT_BYTES_IN_FLIGHT`]) plus one region per thread.
//! - The regions handed out are sorted, disjoint, page-aligned, inside the data area, and
//!   cover every changed range; a region is at most [`MAX_PUT_PAGE`] long unless one changed
//!   run already was.
//! - The gap bytes the merge adds are at most the budget when the gap was chosen here (the
//!   4 MiB cap only ever prevents merges).

use rayon::prelude::*;

use super::changes::changed_in_segment;
use super::coalesce::merge_near;
use super::Counts;
use crate::azure::pagewriter::page_regions;
use crate::azure::MAX_PUT_PAGE;
use crate::error::Result;
use crate::format::manifest::Manifest;
use crate::progress::Progress;
use crate::read::FrameCache;

/// Share of the changed bytes that rewritten unchanged bytes (gaps and page rounding) may add
/// to what a sync sends: issue 16's "bytes written ≤ 1.1× the changed extents".
pub const GAP_BUDGET_PERCENT: u64 = 10;
/// Largest gap the budget may choose: 64 KiB of body costs about half the service time of the
/// request it saves (a page blob takes ≈ 500 requests/s and 60 MiB/s).
pub const MAX_ADAPTIVE_GAP: u64 = 64 << 10;
/// Segments whose regions are computed together (in parallel) before they are merged in
/// order: 64 segments of 4 MiB are 256 MiB of disk.
pub const BATCH_SEGMENTS: u64 = 64;

/// What the first pass found and the gap it chose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GapChoice {
    /// Bytes of the changed ranges (chunk granularity, data and zeros).
    pub changed_bytes: u64,
    /// The same ranges rounded out to whole pages.
    pub page_bytes: u64,
    /// Unchanged bytes the merge may add: the budget less the page rounding.
    pub budget_bytes: u64,
    /// The coalescing gap chosen.
    pub gap: u64,
    /// Gap bytes merging at `gap` adds if no merge hits the 4 MiB cap.
    pub expected_gap_bytes: u64,
}

/// Where the sync writes: the manifests to compare, the page size and the data area's end.
pub struct RegionSource<'a, 'r> {
    pub new: &'a Manifest<'r>,
    pub olds: &'a [Manifest<'r>],
    pub align: u64,
    pub data_size: u64,
}

/// One segment's page regions and what they hold.
struct SegmentRegions {
    regions: Vec<(u64, u64)>,
    counts: Counts,
    changed: u64,
}

impl RegionSource<'_, '_> {
    fn segment(&self, index: u64) -> Result<SegmentRegions> {
        let extents = self.new.segment(index)?;
        let ranges = changed_in_segment(self.olds, self.new, index, &extents)?;
        let base = index * u64::from(self.new.segment_size);
        Ok(SegmentRegions {
            regions: page_regions(&ranges, self.align, self.data_size),
            counts: super::tally(&extents, base, &ranges),
            changed: ranges.iter().map(|&(s, e)| e - s).sum(),
        })
    }

    /// Runs `each` on the segments' regions in disk order, computed a batch at a time in
    /// parallel; `each` gets the segment's regions, counts and changed bytes.
    fn in_order(
        &self,
        progress: &dyn Progress,
        checkpoint: bool,
        mut each: impl FnMut(SegmentRegions) -> Result<()>,
    ) -> Result<()> {
        let count = self.new.segment_count();
        let seg = u64::from(self.new.segment_size);
        let mut first = 0;
        while first < count {
            let last = first.saturating_add(BATCH_SEGMENTS).min(count);
            let batch = (first..last)
                .into_par_iter()
                .map(|i| {
                    if checkpoint {
                        crate::progress::checkpoint(progress, "standby-segment")?;
                    }
                    self.segment(i)
                })
                .collect::<Result<Vec<_>>>()?;
            for s in batch {
                each(s)?;
            }
            if checkpoint {
                let done = (last * seg).min(self.new.virtual_size);
                progress.advance(done.saturating_sub(first * seg));
            }
            first = last;
        }
        Ok(())
    }

    /// The first pass: counts the gaps between neighbouring regions and chooses the gap
    /// (see the module documentation).
    pub fn choose_gap(&self, progress: &dyn Progress) -> Result<GapChoice> {
        let buckets = (MAX_ADAPTIVE_GAP / self.align.max(1)) as usize + 1;
        let mut histogram = vec![0u64; buckets];
        let (mut changed, mut pages) = (0u64, 0u64);
        let mut last_end: Option<u64> = None;
        self.in_order(progress, false, |s| {
            changed += s.changed;
            for &(start, end) in &s.regions {
                pages += end - start;
                if let Some(prev) = last_end {
                    let bucket = (start.saturating_sub(prev) / self.align.max(1)) as usize;
                    if let Some(n) = histogram.get_mut(bucket) {
                        *n += 1;
                    }
                }
                last_end = Some(end);
            }
            Ok(())
        })?;
        Ok(choose_gap(&histogram, self.align, changed, pages))
    }

    /// The second pass: merges the regions of the whole disk at `gap` (carrying the last
    /// region of a batch into the next) and runs `write` on every merged region, a batch's
    /// regions in parallel, each thread with its own frame cache. Returns the counts of the
    /// changed ranges, with `gap_bytes` the unchanged bytes the merge added.
    pub fn write_merged<F>(&self, gap: u64, progress: &dyn Progress, write: F) -> Result<Counts>
    where
        F: Fn(&mut FrameCache, (u64, u64)) -> Result<()> + Sync,
    {
        let max = MAX_PUT_PAGE as u64;
        let mut counts = Counts::default();
        let mut pending: Vec<(u64, u64)> = Vec::new();
        let flush = |regions: &[(u64, u64)]| -> Result<()> {
            regions
                .par_iter()
                .try_for_each_init(FrameCache::default, |frames, &r| write(frames, r))
        };
        progress.start("standby", self.new.virtual_size);
        let mut segments_in_batch = 0u64;
        self.in_order(progress, true, |s| {
            counts = counts + s.counts;
            pending.extend_from_slice(&s.regions);
            segments_in_batch += 1;
            if segments_in_batch == BATCH_SEGMENTS {
                segments_in_batch = 0;
                let (mut merged, added) = merge_near(&pending, gap, max);
                counts.gap_bytes += added;
                // The last region may still merge with the next batch's first.
                let carry = merged.pop();
                flush(&merged)?;
                pending.clear();
                pending.extend(carry);
            }
            Ok(())
        })?;
        let (merged, added) = merge_near(&pending, gap, max);
        counts.gap_bytes += added;
        flush(&merged)?;
        progress.finish();
        Ok(counts)
    }
}

/// The largest gap (a multiple of `align`, at most [`MAX_ADAPTIVE_GAP`]) such that the gaps
/// up to it, `histogram[k]` of `k × align` bytes each, add at most the budget:
/// [`GAP_BUDGET_PERCENT`] of `changed` less what rounding to pages added (`pages - changed`).
pub fn choose_gap(histogram: &[u64], align: u64, changed: u64, pages: u64) -> GapChoice {
    let budget = (changed / 100)
        .saturating_mul(GAP_BUDGET_PERCENT)
        .saturating_sub(pages.saturating_sub(changed));
    let (mut gap, mut spent) = (0u64, 0u64);
    for (k, &n) in histogram.iter().enumerate().skip(1) {
        let size = (k as u64).saturating_mul(align);
        let cost = n.saturating_mul(size);
        if size > MAX_ADAPTIVE_GAP || spent.saturating_add(cost) > budget {
            break;
        }
        spent += cost;
        gap = size;
    }
    GapChoice {
        changed_bytes: changed,
        page_bytes: pages,
        budget_bytes: budget,
        gap,
        expected_gap_bytes: spent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;

    #[test]
    fn the_gap_spends_the_budget_on_the_smallest_gaps_first() {
        let mut h = vec![0u64; 129];
        h[1] = 10; // 10 gaps of 512 bytes: 5 KiB
        h[8] = 4; // 4 of 4 KiB: 16 KiB
        h[64] = 3; // 3 of 32 KiB: 96 KiB
                   // 1 MiB changed, exactly on pages: a budget of 100 KiB (rounded down to 1 % units)
                   // takes the first two sizes (21 KiB), not the third (117 KiB).
        let c = choose_gap(&h, 512, 1024 * KIB, 1024 * KIB);
        assert_eq!(c.budget_bytes, 10 * (1024 * KIB / 100));
        // Empty buckets above 4 KiB cost nothing: the gap rises to just below 32 KiB.
        assert_eq!((c.gap, c.expected_gap_bytes), (63 * 512, 21 * KIB));
        // Page rounding eats the budget first: 12,690 bytes left take the 512-byte gaps only.
        let c = choose_gap(&h, 512, 1024 * KIB, 1024 * KIB + 90 * KIB);
        assert_eq!((c.gap, c.expected_gap_bytes), (7 * 512, 5 * KIB));
        // A budget for everything stops at the cap.
        let c = choose_gap(&h, 512, 100 << 20, 100 << 20);
        assert_eq!((c.gap, c.expected_gap_bytes), (MAX_ADAPTIVE_GAP, 117 * KIB));
        // Nothing changed: no gap.
        assert_eq!(choose_gap(&h, 512, 0, 0).gap, 0);
    }
}
