//! Change knowledge: which byte ranges of a disk changed since a parent snapshot.
//!
//! An incremental backup reads only the segments a change list touches and copies every other
//! segment's extents from the parent snapshot. Change lists come from Azure's Get Page Ranges
//! with `prevsnapshot` (XML with `PageRange` and `ClearRange` elements), from a JSON list of
//! `{offset, length}` objects (optionally in a document naming the disk size and the base the
//! list is relative to), or from `stackvault diff --json`. Every form becomes one validated
//! [`ChangeList`]: every number went through checked arithmetic, ranges are sorted, merged and
//! never overlap, and they lie inside the disk size the list names. A list that cannot be all
//! of that (a range ending past 2^64, written and cleared ranges that overlap, an incomplete
//! Azure answer) is refused as damaged input, never reinterpreted. A list is trusted only
//! after checking it against the parent too: it must describe a disk of the parent's size,
//! its ranges must lie inside it, and a list that names its base must name the parent.
//! This module parses and plans; it reads no disk.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::format::page_list::{self, damaged};
pub use crate::format::page_list::{ChangeKind, ChangedRange};

/// A validated change list: ranges sorted by offset, non-empty, never overlapping (adjacent
/// or overlapping ranges of one kind are merged), every end computed without overflow and
/// inside `disk_size` when the list names one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeList {
    disk_size: Option<u64>,
    base: Option<String>,
    ranges: Vec<ChangedRange>,
}

/// What to do with one segment in an incremental backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentPlan {
    /// Read it from the source.
    Read,
    /// Unchanged: copy the parent snapshot's extents without reading.
    CopyParent,
    /// Entirely cleared: a zero run, without reading.
    Zero,
}

/// `{"offset": N, "length": N, "cleared": bool}`, also the shape of `diff --json`'s ranges.
#[derive(Deserialize)]
struct JsonRange {
    offset: u64,
    length: u64,
    #[serde(default)]
    cleared: bool,
}

/// `{"disk_size": N, "base": "...", "ranges": [...]}`.
#[derive(Deserialize)]
struct JsonDocument {
    #[serde(default)]
    disk_size: Option<u64>,
    #[serde(default)]
    base: Option<String>,
    ranges: Vec<JsonRange>,
}

/// The parts of `stackvault diff --json` that make a change list: the ranges changed from
/// snapshot `from` to the disk of `to_virtual_size` bytes. The names are those of JSON
/// format 2 (`docs/json.md`); format 1's (`from`, `to_virtual_size`) are accepted too.
#[derive(Deserialize)]
struct DiffDocument {
    #[serde(rename = "from_snapshot_id", alias = "from")]
    from: String,
    #[serde(rename = "to_virtual_size_bytes", alias = "to_virtual_size")]
    to_virtual_size: u64,
    changed_ranges: Vec<JsonRange>,
}

impl ChangeList {
    /// Validates `ranges` into a change list of a disk of `disk_size` bytes (when known).
    /// `location` names the input in errors.
    pub fn new(
        disk_size: Option<u64>,
        ranges: Vec<ChangedRange>,
        location: &str,
    ) -> Result<ChangeList> {
        Ok(ChangeList {
            disk_size,
            base: None,
            ranges: page_list::normalize(ranges, disk_size, location)?,
        })
    }

    /// Size of the disk (or blob) the list describes, when the list says.
    pub fn disk_size(&self) -> Option<u64> {
        self.disk_size
    }

    /// What the list is relative to, when it says: a snapshot id (or a prefix of one) or a
    /// blob snapshot time.
    pub fn base(&self) -> Option<&str> {
        self.base.as_deref()
    }

    /// The ranges: sorted, merged, non-overlapping.
    pub fn ranges(&self) -> &[ChangedRange] {
        &self.ranges
    }

    /// The same list, said to describe a disk (or blob) of `size` bytes; refused when a
    /// range lies beyond it.
    pub fn with_disk_size(self, size: u64, location: &str) -> Result<ChangeList> {
        let base = self.base;
        let mut list = ChangeList::new(Some(size), self.ranges, location)?;
        list.base = base;
        Ok(list)
    }

    /// The same list, said to be relative to `base`.
    pub fn with_base(mut self, base: impl Into<String>) -> ChangeList {
        self.base = Some(base.into());
        self
    }

    /// Parses a change list: Azure Get Page Ranges XML (starts with `<`) or JSON: a list
    /// `[{"offset": N, "length": N}]`, a document `{"disk_size": N, "base": "...", "ranges":
    /// [...]}` (a range may carry `"cleared": true`; `base` names the snapshot id or blob
    /// snapshot time the list is relative to), or the output of `stackvault diff --json`
    /// (relative to its `from` snapshot). `location` names the input in errors.
    pub fn parse(text: &str, location: &str) -> Result<ChangeList> {
        let trimmed = text.trim_start_matches('\u{feff}').trim_start();
        if trimmed.starts_with('<') {
            parse_xml(trimmed, location)
        } else {
            parse_json(trimmed, location)
        }
    }

    /// Plans an incremental backup of a disk of `virtual_size` bytes cut into `segment_size`
    /// segments against a parent of `parent_size` bytes. Refuses a list that does not fit.
    ///
    /// A list over a fixed-VHD page blob also covers the 512-byte footer after the disk;
    /// ranges there are ignored.
    pub fn plan(
        &self,
        virtual_size: u64,
        parent_size: u64,
        segment_size: u32,
    ) -> Result<Vec<SegmentPlan>> {
        if virtual_size != parent_size {
            return Err(Error::InvalidArgument(format!(
                "change list refused: the disk is {virtual_size} bytes but the parent snapshot's \
                 disk was {parent_size} bytes"
            )));
        }
        // Room for the footer of a VHD page blob after the disk.
        let with_footer = virtual_size.checked_add(512).ok_or_else(|| {
            Error::InvalidArgument(format!("disk size {virtual_size} is out of range"))
        })?;
        if let Some(size) = self.disk_size {
            if size != virtual_size && size != with_footer {
                return Err(Error::InvalidArgument(format!(
                    "change list refused: it describes a disk of {size} bytes, the parent \
                     snapshot's disk is {virtual_size} bytes"
                )));
            }
        }
        let seg = u64::from(segment_size.max(1));
        let count = usize::try_from(virtual_size.div_ceil(seg)).map_err(|_| {
            Error::InvalidArgument(format!("disk size {virtual_size} is out of range"))
        })?;
        let mut plan = vec![SegmentPlan::CopyParent; count];
        // Bytes of each segment cleared, to find segments cleared entirely.
        let mut cleared = vec![0u64; count];
        let mut written = vec![false; count];
        for r in &self.ranges {
            let end = r.end();
            if end > with_footer {
                return Err(Error::InvalidArgument(format!(
                    "change list refused: range {}..{end} lies beyond the disk ({virtual_size} bytes)",
                    r.offset
                )));
            }
            let end = end.min(virtual_size);
            if r.offset >= end {
                continue; // footer of a VHD page blob
            }
            // Both below count: offset < end <= virtual_size.
            let (first, last) = ((r.offset / seg) as usize, ((end - 1) / seg) as usize);
            for (i, p) in plan.iter_mut().enumerate().take(last + 1).skip(first) {
                match r.kind {
                    ChangeKind::Written => {
                        *p = SegmentPlan::Read;
                        written[i] = true;
                    }
                    ChangeKind::Cleared => {
                        let s = i as u64 * seg;
                        let e = s.saturating_add(seg).min(virtual_size);
                        cleared[i] += end.min(e) - r.offset.max(s);
                        if *p == SegmentPlan::CopyParent {
                            *p = SegmentPlan::Read;
                        }
                    }
                }
            }
        }
        // A segment cleared entirely and not written is a hole; the ranges of a validated
        // list never overlap, so the cleared byte count is exact.
        for i in 0..count {
            let s = i as u64 * seg;
            let len = s.saturating_add(seg).min(virtual_size) - s;
            if cleared[i] >= len && !written[i] {
                plan[i] = SegmentPlan::Zero;
            }
        }
        Ok(plan)
    }

    /// The changed bytes of a disk of `virtual_size` bytes, written or cleared, widened to
    /// whole 4 KiB blocks, sorted and merged: what an incremental backup must re-read. Call
    /// after [`ChangeList::plan`] accepted the list.
    pub fn changed_blocks(&self, virtual_size: u64) -> Vec<(u64, u64)> {
        let block = u64::from(crate::format::config::ZERO_BLOCK);
        let mut blocks: Vec<(u64, u64)> = self
            .ranges
            .iter()
            .filter(|r| r.offset < virtual_size)
            .map(|r| {
                let end = r.end().min(virtual_size);
                (
                    r.offset / block * block,
                    end.div_ceil(block).saturating_mul(block).min(virtual_size),
                )
            })
            .collect();
        blocks.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(blocks.len());
        for (s, e) in blocks {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
    }
}

fn json_ranges(ranges: Vec<JsonRange>) -> Vec<ChangedRange> {
    ranges
        .into_iter()
        .map(|r| ChangedRange {
            offset: r.offset,
            len: r.length,
            kind: if r.cleared {
                ChangeKind::Cleared
            } else {
                ChangeKind::Written
            },
        })
        .collect()
}

fn parse_json(text: &str, location: &str) -> Result<ChangeList> {
    let bad = |e: serde_json::Error| {
        damaged(
            location,
            0,
            format!(
                "not a change list (expected JSON [{{\"offset\":N,\"length\":N}}], \
                 {{\"base\":\"...\",\"ranges\":[...]}}, `stackvault diff --json` output or Azure \
                 page range XML): {e}"
            ),
        )
    };
    let value: serde_json::Value = serde_json::from_str(text).map_err(bad)?;
    if value.is_array() {
        let ranges: Vec<JsonRange> = serde_json::from_value(value).map_err(bad)?;
        return ChangeList::new(None, json_ranges(ranges), location);
    }
    if value.get("changed_ranges").is_some() {
        let diff: DiffDocument = serde_json::from_value(value).map_err(bad)?;
        let list = ChangeList::new(
            Some(diff.to_virtual_size),
            json_ranges(diff.changed_ranges),
            location,
        )?;
        return Ok(list.with_base(diff.from));
    }
    let doc: JsonDocument = serde_json::from_value(value).map_err(bad)?;
    let list = ChangeList::new(doc.disk_size, json_ranges(doc.ranges), location)?;
    Ok(match doc.base {
        Some(base) if !base.trim().is_empty() => list.with_base(base.trim()),
        _ => list,
    })
}

/// Parses the body of Get Page Ranges: `<PageList>` with `<PageRange>` and `<ClearRange>`
/// children, each with inclusive `<Start>` and `<End>` byte offsets. An answer with a
/// non-empty `<NextMarker>` is one page of a longer answer and is refused: a change list
/// missing its later pages would leave changed data unread.
pub fn parse_xml(text: &str, location: &str) -> Result<ChangeList> {
    let (list, marker) = parse_xml_page(text, location)?;
    match marker {
        None => Ok(list),
        Some(m) => Err(damaged(
            location,
            0,
            format!(
                "the page range answer is incomplete: it ends with <NextMarker>{m}</NextMarker> \
                 (the service paginated it); ask again with marker={m} and join the pages, or \
                 let stackvault ask the service itself with --since-snapshot"
            ),
        )),
    }
}

/// Parses one page of a Get Page Ranges answer: its ranges as a change list, and the
/// `NextMarker` to ask for the next page with (`None` when this page is the last).
pub fn parse_xml_page(text: &str, location: &str) -> Result<(ChangeList, Option<String>)> {
    let (ranges, marker) = page_list::parse_page(text, location)?;
    Ok((ChangeList::new(None, ranges, location)?, marker))
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<PageList><PageRange><Start>0</Start><End>511</End></PageRange>
<ClearRange><Start>8388608</Start><End>12582911</End></ClearRange>
<PageRange><Start>4194304</Start><End>4198399</End></PageRange><NextMarker/></PageList>"#;

    fn range(offset: u64, len: u64, kind: ChangeKind) -> ChangedRange {
        ChangedRange { offset, len, kind }
    }

    #[test]
    fn parses_azure_xml() -> Result<()> {
        let l = ChangeList::parse(XML, "x")?;
        assert_eq!(l.ranges().len(), 3);
        // Sorted by offset.
        assert_eq!(l.ranges()[2], range(8 << 20, 4 << 20, ChangeKind::Cleared));
        let plan = l.plan(16 << 20, 16 << 20, 4 << 20)?;
        assert_eq!(
            plan,
            vec![
                SegmentPlan::Read,
                SegmentPlan::Read,
                SegmentPlan::Zero,
                SegmentPlan::CopyParent
            ]
        );
        Ok(())
    }

    #[test]
    fn parses_json_forms() -> Result<()> {
        let a = ChangeList::parse(r#"[{"offset": 4096, "length": 512}]"#, "j")?;
        assert_eq!(a.ranges()[0].len, 512);
        assert_eq!(a.base(), None);
        let b = ChangeList::parse(
            r#"{"disk_size": 1024, "base": "abc123", "ranges": [{"offset": 0, "length": 1, "cleared": true}]}"#,
            "j",
        )?;
        assert_eq!(b.disk_size(), Some(1024));
        assert_eq!(b.base(), Some("abc123"));
        assert_eq!(b.ranges()[0].kind, ChangeKind::Cleared);
        assert!(ChangeList::parse("{oops", "j").is_err());
        assert!(ChangeList::parse("<Other/>", "x").is_err());
        assert!(ChangeList::parse(
            "<PageList><PageRange><Start>9</Start><End>1</End></PageRange></PageList>",
            "x"
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn diff_json_is_a_change_list_relative_to_its_from_snapshot() -> Result<()> {
        let v2 = r#"{"from_snapshot_id": "aaaa", "to_snapshot_id": "bbbb",
            "from_virtual_size_bytes": 8192, "to_virtual_size_bytes": 8192,
            "changed_bytes": 4096, "changed_segments": 1, "format_version": 2,
            "changed_ranges": [{"offset": 4096, "length": 4096}]}"#;
        let v1 = r#"{"from": "aaaa", "to": "bbbb", "from_virtual_size": 8192,
            "to_virtual_size": 8192, "changed_bytes": 4096, "changed_segments": 1,
            "changed_ranges": [{"offset": 4096, "length": 4096}]}"#;
        for diff in [v2, v1] {
            let l = ChangeList::parse(diff, "d")?;
            assert_eq!(l.base(), Some("aaaa"));
            assert_eq!(l.disk_size(), Some(8192));
            assert_eq!(l.ranges(), [range(4096, 4096, ChangeKind::Written)]);
        }
        Ok(())
    }

    #[test]
    fn xml_and_json_of_the_same_ranges_are_the_same_list() -> Result<()> {
        // Out of order, adjacent and overlapping pieces: both forms normalise alike.
        let xml = "<PageList>\
            <PageRange><Start>1048576</Start><End>1052671</End></PageRange>\
            <ClearRange><Start>4194304</Start><End>8388607</End></ClearRange>\
            <PageRange><Start>0</Start><End>4095</End></PageRange>\
            <PageRange><Start>4096</Start><End>8191</End></PageRange>\
            </PageList>";
        let json = r#"[{"offset": 1048576, "length": 4096},
            {"offset": 4194304, "length": 4194304, "cleared": true},
            {"offset": 0, "length": 4096}, {"offset": 4096, "length": 4096}]"#;
        let (x, j) = (ChangeList::parse(xml, "x")?, ChangeList::parse(json, "j")?);
        assert_eq!(x, j);
        assert_eq!(
            x.ranges(),
            [
                range(0, 8192, ChangeKind::Written),
                range(1 << 20, 4096, ChangeKind::Written),
                range(4 << 20, 4 << 20, ChangeKind::Cleared),
            ]
        );
        assert_eq!(
            x.plan(12 << 20, 12 << 20, 4 << 20)?,
            j.plan(12 << 20, 12 << 20, 4 << 20)?
        );
        assert_eq!(x.changed_blocks(12 << 20), j.changed_blocks(12 << 20));
        Ok(())
    }

    #[test]
    fn numbers_that_overflow_are_refused() {
        // End = 2^64 - 1: the inclusive length is 2^64, which wrapped to an empty range.
        let xml = "<PageList><PageRange><Start>0</Start><End>18446744073709551615</End>\
            </PageRange></PageList>";
        let e = ChangeList::parse(xml, "x").err();
        assert!(
            matches!(&e, Some(Error::SourceDamaged { what, .. }) if what.contains("18446744073709551615")),
            "{e:?}"
        );
        let json = r#"[{"offset": 18446744073709551615, "length": 2}]"#;
        assert!(matches!(
            ChangeList::parse(json, "j"),
            Err(Error::SourceDamaged { .. })
        ));
        assert!(ChangeList::parse(r#"[{"offset": -1, "length": 2}]"#, "j").is_err());
        assert!(ChangeList::parse(r#"[{"offset": 1e30, "length": 2}]"#, "j").is_err());
        // A range beyond the disk the list itself names.
        assert!(ChangeList::parse(
            r#"{"disk_size": 4096, "ranges": [{"offset": 4096, "length": 1}]}"#,
            "j"
        )
        .is_err());
        // Written and cleared at once.
        assert!(ChangeList::parse(
            r#"[{"offset": 0, "length": 8192}, {"offset": 4096, "length": 8192, "cleared": true}]"#,
            "j"
        )
        .is_err());
    }

    #[test]
    fn next_marker_makes_an_answer_incomplete() -> Result<()> {
        let page = "<PageList><PageRange><Start>0</Start><End>511</End></PageRange>\
            <NextMarker>2!84!MDAwMDE2</NextMarker></PageList>";
        let e = ChangeList::parse(page, "x").err();
        assert!(
            matches!(&e, Some(Error::SourceDamaged { what, .. })
                if what.contains("incomplete") && what.contains("2!84!MDAwMDE2")),
            "{e:?}"
        );
        let (l, m) = parse_xml_page(page, "x")?;
        assert_eq!((l.ranges().len(), m.as_deref()), (1, Some("2!84!MDAwMDE2")));
        // An empty marker ends the answer.
        assert!(ChangeList::parse(XML, "x").is_ok());
        Ok(())
    }

    #[test]
    fn overlapping_cleared_ranges_do_not_clear_more_than_they_say() -> Result<()> {
        // The first half of a segment cleared twice: counted once, the segment is read.
        let json = r#"[{"offset": 0, "length": 2097152, "cleared": true},
            {"offset": 0, "length": 2097152, "cleared": true}]"#;
        let l = ChangeList::parse(json, "j")?;
        assert_eq!(l.plan(4 << 20, 4 << 20, 4 << 20)?, [SegmentPlan::Read]);
        Ok(())
    }

    #[test]
    fn refuses_lists_that_do_not_fit() -> Result<()> {
        let l = ChangeList::new(Some(999), vec![], "t")?;
        assert!(l.plan(1 << 20, 1 << 20, 1 << 16).is_err());
        let l = ChangeList::new(None, vec![range(1 << 20, 4096, ChangeKind::Written)], "t")?;
        assert!(l.plan(1 << 20, 1 << 20, 1 << 16).is_err());
        assert!(l.plan(2 << 20, 1 << 20, 1 << 16).is_err());
        // The footer of a VHD page blob is ignored.
        let footer = ChangeList::new(
            Some((1 << 20) + 512),
            vec![range(1 << 20, 512, ChangeKind::Written)],
            "t",
        )?;
        assert!(footer
            .plan(1 << 20, 1 << 20, 1 << 16)
            .is_ok_and(|p| p.iter().all(|s| *s == SegmentPlan::CopyParent)));
        // A disk size at the end of the number range.
        assert!(footer.plan(u64::MAX, u64::MAX, 1 << 16).is_err());
        Ok(())
    }
}
