//! Changed byte ranges, and the Get Page Ranges XML that carries them.
//!
//! Azure's Get Page Ranges answers (with `prevsnapshot`: what was written and cleared since
//! a blob snapshot) and change-list files in the same XML are parsed here into plain
//! [`ChangedRange`]s, and any list of ranges is normalised the one way every consumer relies
//! on ([`normalize`]): ranges sorted by offset, empty ones dropped, adjacent or overlapping
//! ranges of one kind merged, every end computed without overflow and inside the disk size
//! when one is known; a written range overlapping a cleared one is refused as damaged input.
//! Pure functions, no I/O: both the Azure transport and `changes` (which builds the
//! validated `ChangeList`) use this module, and it uses neither.

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

impl ChangedRange {
    /// End of the range (exclusive). Exact for normalised ranges (see [`normalize`]), which were
    /// checked not to overflow.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// An error in change list `location` (exit code 4: the change knowledge is the source's).
pub(crate) fn damaged(location: &str, offset: u64, what: String) -> Error {
    Error::source_damaged(format!("change list {location}"), offset, what)
}

fn kind_name(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Written => "written",
        ChangeKind::Cleared => "cleared",
    }
}

/// Normalises `ranges` of a disk of `disk_size` bytes (when known); see the module doc.
/// `location` names the input in errors.
pub fn normalize(
    ranges: Vec<ChangedRange>,
    disk_size: Option<u64>,
    location: &str,
) -> Result<Vec<ChangedRange>> {
    let mut ranges: Vec<ChangedRange> = ranges.into_iter().filter(|r| r.len > 0).collect();
    for r in &ranges {
        let Some(end) = r.offset.checked_add(r.len) else {
            return Err(damaged(
                location,
                r.offset,
                format!(
                    "the range at offset {} of {} bytes ends past 2^64: the list is damaged",
                    r.offset, r.len
                ),
            ));
        };
        if let Some(size) = disk_size {
            if end > size {
                return Err(damaged(
                    location,
                    r.offset,
                    format!(
                        "range {}..{end} lies beyond the disk of {size} bytes the list \
                         describes",
                        r.offset
                    ),
                ));
            }
        }
    }
    ranges.sort_by_key(|r| (r.offset, r.end()));
    let mut merged: Vec<ChangedRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.offset <= last.end() && last.kind == r.kind => {
                let end = last.end().max(r.end());
                last.len = end - last.offset;
            }
            Some(last) if r.offset < last.end() => {
                return Err(damaged(
                    location,
                    r.offset,
                    format!(
                        "{} range {}..{} overlaps {} range {}..{}: the list contradicts \
                         itself",
                        kind_name(r.kind),
                        r.offset,
                        r.end(),
                        kind_name(last.kind),
                        last.offset,
                        last.end()
                    ),
                ))
            }
            _ => merged.push(r),
        }
    }
    Ok(merged)
}

/// Parses one page of a Get Page Ranges answer: its ranges (normalised, see [`normalize`]),
/// and the `NextMarker` to ask for the next page with (`None` when this page is the last).
pub fn parse_page(text: &str, location: &str) -> Result<(Vec<ChangedRange>, Option<String>)> {
    let bad = |why: String| damaged(location, 0, format!("page range XML: {why}"));
    let text = text.trim_start_matches('\u{feff}').trim_start();
    let doc = roxmltree::Document::parse(text).map_err(|e| bad(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "PageList" {
        return Err(bad(format!(
            "root element is <{}>, expected <PageList>",
            root.tag_name().name()
        )));
    }
    let mut ranges = Vec::new();
    let mut marker = None;
    for node in root.children().filter(|n| n.is_element()) {
        let kind = match node.tag_name().name() {
            "PageRange" => ChangeKind::Written,
            "ClearRange" => ChangeKind::Cleared,
            "NextMarker" => {
                let m = node.text().map(str::trim).unwrap_or_default();
                if !m.is_empty() {
                    marker = Some(m.to_string());
                }
                continue;
            }
            _ => continue, // future elements
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
        // End is inclusive: the length is end - start + 1, which must not wrap.
        let len = end
            .checked_sub(start)
            .and_then(|l| l.checked_add(1))
            .ok_or_else(|| {
                bad(format!(
                    "range <Start>{start}</Start><End>{end}</End> ends before it starts or \
                     past 2^64"
                ))
            })?;
        ranges.push(ChangedRange {
            offset: start,
            len,
            kind,
        });
    }
    Ok((normalize(ranges, None, location)?, marker))
}
