//! Merging the nearby changed regions of an incremental page blob sync, so that many small
//! changes a few KiB apart go out in few Put Page requests (the gap: [`super::regions`]).
//!
//! A page blob takes about 500 requests/s, so a sync of many small scattered changes is
//! bound by its request count, not its bytes. Two changed regions at most the coalescing gap
//! apart become one region covering the unchanged bytes between them; the sync fills those
//! bytes from the new snapshot. They equal what the target holds (the target holds, there,
//! every snapshot it may hold, and all of them equal the new one: that is what "unchanged"
//! means in [`super::changes`]), so rewriting them is harmless.
//!
//! Invariants:
//! - The result is sorted, disjoint, covers every input region, and its added parts lie only
//!   between two input regions (never before the first or after the last), so page alignment
//!   and the data area's end carry over from the input.
//! - A merge never makes a region longer than `max` (the service's 4 MiB per Put Page); an
//!   input region already longer stays as it is.

/// Merges sorted, disjoint `regions` whose distance is at most `gap` into one region, as long
/// as the merged region stays within `max` bytes. Returns the merged regions and the bytes
/// they cover outside `regions` (the unchanged bytes that will be rewritten).
pub fn merge_near(regions: &[(u64, u64)], gap: u64, max: u64) -> (Vec<(u64, u64)>, u64) {
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(regions.len());
    let mut gap_bytes = 0u64;
    for &(start, end) in regions {
        match merged.last_mut() {
            Some(last)
                if start >= last.1
                    && start - last.1 <= gap
                    && end.saturating_sub(last.0) <= max =>
            {
                gap_bytes = gap_bytes.saturating_add(start - last.1);
                last.1 = end;
            }
            _ => merged.push((start, end)),
        }
    }
    (merged, gap_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;

    #[test]
    fn merges_within_the_gap_and_the_maximum() {
        let regions = [
            (0, 4 * KIB),
            (12 * KIB, 16 * KIB),
            (100 * KIB, 104 * KIB),
            (108 * KIB, 112 * KIB),
        ];
        // 8 KiB apart merge, 84 KiB apart do not (gap 64 KiB).
        let (m, gap) = merge_near(&regions, 64 * KIB, 4096 * KIB);
        assert_eq!(m, vec![(0, 16 * KIB), (100 * KIB, 112 * KIB)]);
        assert_eq!(gap, 12 * KIB);
        // A gap of 0 keeps them apart.
        let (m, gap) = merge_near(&regions, 0, 4096 * KIB);
        assert_eq!(m, regions.to_vec());
        assert_eq!(gap, 0);
        // The maximum stops a merge: both pairs would span 12 KiB > 8 KiB.
        let (m, _) = merge_near(&regions, 64 * KIB, 8 * KIB);
        assert_eq!(m.len(), 4);
        let (m, _) = merge_near(&regions, 1 << 30, 112 * KIB);
        assert_eq!(m, vec![(0, 112 * KIB)]);
    }

    #[test]
    fn a_long_region_stays_whole() {
        let regions = [(0, 8192 * KIB), (8196 * KIB, 8200 * KIB)];
        let (m, gap) = merge_near(&regions, 64 * KIB, 4096 * KIB);
        assert_eq!(m, regions.to_vec());
        assert_eq!(gap, 0);
        assert_eq!(merge_near(&[], 64 * KIB, 4096 * KIB), (Vec::new(), 0));
    }
}
