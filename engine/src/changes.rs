//! Change knowledge: which byte ranges of a disk changed since a parent snapshot.
//!
//! An incremental backup reads only the segments a change list touches and copies every other
//! segment's extents from the parent snapshot. Change lists come from Azure's Get Page Ranges
//! with `prevsnapshot` (XML with `PageRange` and `ClearRange` elements) or from a JSON list of
//! `{offset, length}` objects. A change list is trusted only after checking it against the
//! parent: it must describe a disk of the parent's size, and its ranges must lie inside it.
//! This module parses and plans; it reads no disk.

use serde::Deserialize;

use crate::error::{Error, Result};

/// What happened to a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// Written since the parent: must be read.
    Written,
    /// Cleared since the parent: reads as zeros.
    Cleared,
}

/// A changed byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangedRange {
    pub offset: u64,
    pub len: u64,
    pub kind: ChangeKind,
}

/// A parsed change list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeList {
    /// Size of the disk (or blob) the list describes, when the list says.
    pub disk_size: Option<u64>,
    pub ranges: Vec<ChangedRange>,
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

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonList {
    Ranges(Vec<JsonRange>),
    Document {
        #[serde(default)]
        disk_size: Option<u64>,
        ranges: Vec<JsonRange>,
    },
}

#[derive(Deserialize)]
struct JsonRange {
    offset: u64,
    length: u64,
    #[serde(default)]
    cleared: bool,
}

impl ChangeList {
    /// Parses a change list: Azure Get Page Ranges XML (starts with `<`) or JSON, either a list
    /// `[{"offset": N, "length": N}]` or `{"disk_size": N, "ranges": [...]}` (a range may carry
    /// `"cleared": true`). `location` names the input in errors.
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
        if let Some(size) = self.disk_size {
            if size != virtual_size && size != virtual_size + 512 {
                return Err(Error::InvalidArgument(format!(
                    "change list refused: it describes a disk of {size} bytes, the parent \
                     snapshot's disk is {virtual_size} bytes"
                )));
            }
        }
        let seg = u64::from(segment_size);
        let count = virtual_size.div_ceil(seg) as usize;
        let mut plan = vec![SegmentPlan::CopyParent; count];
        // Bytes of each segment cleared, to find segments cleared entirely.
        let mut cleared = vec![0u64; count];
        let mut written = vec![false; count];
        for r in &self.ranges {
            let end = r
                .offset
                .checked_add(r.len)
                .ok_or_else(|| Error::InvalidArgument("change list range overflows".into()))?;
            if end > virtual_size + 512 {
                return Err(Error::InvalidArgument(format!(
                    "change list refused: range {}..{end} lies beyond the disk ({virtual_size} bytes)",
                    r.offset
                )));
            }
            let end = end.min(virtual_size);
            if r.offset >= end {
                continue; // footer of a VHD page blob, or empty
            }
            let (first, last) = ((r.offset / seg) as usize, ((end - 1) / seg) as usize);
            for (i, p) in plan.iter_mut().enumerate().take(last + 1).skip(first) {
                match r.kind {
                    ChangeKind::Written => {
                        *p = SegmentPlan::Read;
                        written[i] = true;
                    }
                    ChangeKind::Cleared => {
                        let s = i as u64 * seg;
                        let e = (s + seg).min(virtual_size);
                        cleared[i] += end.min(e) - r.offset.max(s);
                        if *p == SegmentPlan::CopyParent {
                            *p = SegmentPlan::Read;
                        }
                    }
                }
            }
        }
        // A segment cleared entirely and not written is a hole; ranges of a page list do not
        // overlap, so the cleared byte count is exact.
        for i in 0..count {
            let len = ((i as u64 + 1) * seg).min(virtual_size) - i as u64 * seg;
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
            .filter(|r| r.len > 0 && r.offset < virtual_size)
            .map(|r| {
                let end = r.offset.saturating_add(r.len).min(virtual_size);
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

fn parse_json(text: &str, location: &str) -> Result<ChangeList> {
    let list: JsonList = serde_json::from_str(text).map_err(|e| {
        Error::InvalidArgument(format!(
            "{location}: not a change list (expected JSON [{{\"offset\":N,\"length\":N}}] or \
             Azure page range XML): {e}"
        ))
    })?;
    let (disk_size, ranges) = match list {
        JsonList::Ranges(r) => (None, r),
        JsonList::Document { disk_size, ranges } => (disk_size, ranges),
    };
    Ok(ChangeList {
        disk_size,
        ranges: ranges
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
            .collect(),
    })
}

/// Parses the body of Get Page Ranges: `<PageList>` with `<PageRange>` and `<ClearRange>`
/// children, each with inclusive `<Start>` and `<End>` byte offsets.
pub fn parse_xml(text: &str, location: &str) -> Result<ChangeList> {
    let bad = |why: String| Error::InvalidArgument(format!("{location}: page range XML: {why}"));
    let doc = roxmltree::Document::parse(text).map_err(|e| bad(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "PageList" {
        return Err(bad(format!(
            "root element is <{}>, expected <PageList>",
            root.tag_name().name()
        )));
    }
    let mut ranges = Vec::new();
    for node in root.children().filter(|n| n.is_element()) {
        let kind = match node.tag_name().name() {
            "PageRange" => ChangeKind::Written,
            "ClearRange" => ChangeKind::Cleared,
            _ => continue, // NextMarker and future elements
        };
        let field = |name: &str| -> Result<u64> {
            let text = node
                .children()
                .find(|c| c.has_tag_name(name))
                .and_then(|c| c.text())
                .ok_or_else(|| bad(format!("<{}> without <{name}>", node.tag_name().name())))?;
            text.trim()
                .parse::<u64>()
                .map_err(|_| bad(format!("<{name}>{text}</{name}> is not a byte offset")))
        };
        let (start, end) = (field("Start")?, field("End")?);
        if end < start {
            return Err(bad(format!("range {start}..={end} ends before it starts")));
        }
        ranges.push(ChangedRange {
            offset: start,
            len: end - start + 1,
            kind,
        });
    }
    Ok(ChangeList {
        disk_size: None,
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<PageList><PageRange><Start>0</Start><End>511</End></PageRange>
<ClearRange><Start>8388608</Start><End>12582911</End></ClearRange>
<PageRange><Start>4194304</Start><End>4198399</End></PageRange><NextMarker/></PageList>"#;

    #[test]
    fn parses_azure_xml() -> Result<()> {
        let l = ChangeList::parse(XML, "x")?;
        assert_eq!(l.ranges.len(), 3);
        assert_eq!(
            l.ranges[1],
            ChangedRange {
                offset: 8 << 20,
                len: 4 << 20,
                kind: ChangeKind::Cleared
            }
        );
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
        assert_eq!(a.ranges[0].len, 512);
        let b = ChangeList::parse(
            r#"{"disk_size": 1024, "ranges": [{"offset": 0, "length": 1, "cleared": true}]}"#,
            "j",
        )?;
        assert_eq!(b.disk_size, Some(1024));
        assert_eq!(b.ranges[0].kind, ChangeKind::Cleared);
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
    fn refuses_lists_that_do_not_fit() {
        let l = ChangeList {
            disk_size: Some(999),
            ranges: vec![],
        };
        assert!(l.plan(1 << 20, 1 << 20, 1 << 16).is_err());
        let l = ChangeList {
            disk_size: None,
            ranges: vec![ChangedRange {
                offset: 1 << 20,
                len: 4096,
                kind: ChangeKind::Written,
            }],
        };
        assert!(l.plan(1 << 20, 1 << 20, 1 << 16).is_err());
        assert!(l.plan(2 << 20, 1 << 20, 1 << 16).is_err());
        // The footer of a VHD page blob is ignored.
        let footer = ChangeList {
            disk_size: Some((1 << 20) + 512),
            ranges: vec![ChangedRange {
                offset: 1 << 20,
                len: 512,
                kind: ChangeKind::Written,
            }],
        };
        assert!(footer
            .plan(1 << 20, 1 << 20, 1 << 16)
            .is_ok_and(|p| p.iter().all(|s| *s == SegmentPlan::CopyParent)));
    }
}
