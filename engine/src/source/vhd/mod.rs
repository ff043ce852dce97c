//! VHD sources: fixed, dynamic and differencing VHDs (Microsoft's Virtual Hard Disk format,
//! version 1.0), presented as the guest disk they contain.
//!
//! A [`VhdDisk`] is a chain of [`VhdImage`]s: the opened file first, then for a differencing
//! disk its parent, grandparent... down to a fixed or dynamic base. Each range of the virtual
//! disk is resolved through the chain ([`image::Place`]): a sector the child holds (its
//! bitmap bit set) is read from the child, one it leaves out comes from the parent, and an
//! unallocated block of a dynamic base is a hole, reported as [`ExtentKind::Zero`] and never
//! read. The virtual size is the footer's current size, never the CHS geometry.
//!
//! Invariants: the chain is validated when it is built (each parent's unique id is the one
//! its child names, no image appears twice, only the last is not differencing), and every
//! image was validated when it was opened, so reads never go outside a file. The parser runs
//! over [`io::ReadAt`], so the fuzz target drives it from a byte slice.

pub mod dynamic;
pub mod image;
pub mod io;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::format::vhd_footer as footer;
pub use footer::DiskType;
pub use image::{has_vhd_cookie, sniff, vhdx_unsupported, Place, Sniffed, VhdImage};
pub use io::{FileAt, ReadAt};

use super::{DiskSource, ExtentKind, SourceChanges, SourceExtent};
use crate::changes::{ChangeKind, ChangeList, ChangedRange};
use crate::error::{Error, Result};
use crate::format::manifest::{ContainerFormat, SourceInfo, VhdInfo, VhdParentInfo};
use footer::{format_uuid, fourcc, vhd_time};

/// Longest parent chain followed.
pub const MAX_CHAIN: usize = 64;

/// Where a piece of the virtual disk comes from: `(layer, file offset)`, or zeros.
type Piece = (u64, Option<(usize, u64)>);

/// A VHD and its parents, read as one virtual disk.
#[derive(Debug)]
pub struct VhdDisk<R> {
    layers: Vec<VhdImage<R>>,
}

impl<R: ReadAt> VhdDisk<R> {
    /// Builds a disk from an opened chain, child first, checking that it links up.
    pub fn from_chain(layers: Vec<VhdImage<R>>) -> Result<Self> {
        let Some(top) = layers.first() else {
            return Err(Error::InvalidArgument("empty VHD chain".into()));
        };
        let mut ids = HashSet::new();
        for (i, img) in layers.iter().enumerate() {
            if !ids.insert(img.footer.unique_id) {
                return Err(Error::source_damaged(
                    &img.location,
                    img.footer_at + footer::off::UNIQUE_ID as u64,
                    format!(
                        "parent chain of {} is a cycle: unique id {} appears twice",
                        top.location,
                        format_uuid(&img.footer.unique_id)
                    ),
                ));
            }
            let next = layers.get(i + 1);
            match (&img.dynamic, img.footer.disk_type, next) {
                (Some(d), DiskType::Differencing, Some(parent))
                    if d.header.parent_unique_id != parent.footer.unique_id =>
                {
                    return Err(Error::source_damaged(
                        &img.location,
                        d.header_at + dynamic::off::PARENT_UNIQUE_ID as u64,
                        format!(
                            "parent unique id {} does not match {} (unique id {})",
                            format_uuid(&d.header.parent_unique_id),
                            parent.location,
                            format_uuid(&parent.footer.unique_id)
                        ),
                    ));
                }
                (_, DiskType::Differencing, Some(_)) => {}
                (_, DiskType::Differencing, None) => {
                    return Err(Error::InvalidArgument(format!(
                        "differencing VHD {} has no parent",
                        img.location
                    )))
                }
                (_, _, Some(_)) => {
                    return Err(Error::InvalidArgument(format!(
                        "{} is a {} VHD and cannot have a parent",
                        img.location,
                        img.footer.disk_type.as_str()
                    )))
                }
                _ => {}
            }
        }
        Ok(VhdDisk { layers })
    }

    /// The opened file (child of the chain).
    pub fn top(&self) -> &VhdImage<R> {
        &self.layers[0]
    }

    /// Every image, child first.
    pub fn layers(&self) -> &[VhdImage<R>] {
        &self.layers
    }

    /// Warnings of all images.
    pub fn warnings(&self) -> Vec<String> {
        self.layers
            .iter()
            .flat_map(|l| l.warnings.iter().cloned())
            .collect()
    }

    /// The footer metadata kept in the snapshot.
    pub fn vhd_info(&self) -> VhdInfo {
        let top = self.top();
        VhdInfo {
            block_size: top.dynamic.as_ref().map(|d| d.header.block_size),
            parents: self.layers[1..]
                .iter()
                .map(|l| VhdParentInfo {
                    path: l.location.clone(),
                    unique_id: format_uuid(&l.footer.unique_id),
                    disk_type: l.footer.disk_type,
                })
                .collect(),
            ..footer_info(&top.footer, self.warnings())
        }
    }

    /// Resolves `[offset, offset + len)` through the chain into pieces, merging neighbours.
    pub fn resolve(&self, offset: u64, len: u64) -> Result<Vec<Piece>> {
        let mut out = Vec::new();
        self.resolve_layer(0, offset, len, &mut out)?;
        Ok(out)
    }

    fn resolve_layer(
        &self,
        layer: usize,
        offset: u64,
        len: u64,
        out: &mut Vec<Piece>,
    ) -> Result<()> {
        let mut places = Vec::new();
        self.layers[layer].map(offset, len, &mut places)?;
        let mut pos = offset;
        for (n, place) in places {
            match place {
                Place::Here(at) => push_piece(out, n, Some((layer, at))),
                Place::Zero => push_piece(out, n, None),
                // from_chain guarantees a differencing layer has a parent.
                Place::Parent if layer + 1 < self.layers.len() => {
                    self.resolve_layer(layer + 1, pos, n, out)?
                }
                Place::Parent => push_piece(out, n, None),
            }
            pos += n;
        }
        Ok(())
    }

    /// Allocation map in the form the backup wants.
    pub fn extent_map(&self, offset: u64, len: u64) -> Result<Vec<SourceExtent>> {
        let mut out: Vec<SourceExtent> = Vec::new();
        let mut pos = offset;
        let push = |out: &mut Vec<SourceExtent>, offset: u64, len: u64, kind| match out.last_mut() {
            Some(last) if last.kind == kind => last.len += len,
            _ => out.push(SourceExtent { offset, len, kind }),
        };
        for (n, src) in self.resolve(offset, len)? {
            match src {
                // Holes of the container file read as zeros: never read them.
                Some((layer, at)) => {
                    let mut covered = 0;
                    for e in self.layers[layer].reader.extents(at, n) {
                        push(&mut out, pos + (e.offset - at), e.len, e.kind);
                        covered += e.len;
                    }
                    // Past the file's end (it shrank): data, so that reading reports it.
                    if covered < n {
                        push(&mut out, pos + covered, n - covered, ExtentKind::Data);
                    }
                }
                None => push(&mut out, pos, n, ExtentKind::Zero),
            }
            pos += n;
        }
        Ok(out)
    }

    /// Reads virtual disk bytes.
    pub fn read_virtual(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        for (n, src) in self.resolve(offset, buf.len() as u64)? {
            let part = &mut buf[done..done + n as usize];
            match src {
                Some((layer, at)) => self.layers[layer].read(part, at, "block data")?,
                None => part.fill(0),
            }
            done += n as usize;
        }
        Ok(())
    }
}

fn push_piece(out: &mut Vec<Piece>, n: u64, src: Option<(usize, u64)>) {
    if n == 0 {
        return;
    }
    if let Some((len, last)) = out.last_mut() {
        let merged = match (*last, src) {
            (None, None) => true,
            (Some((la, a)), Some((lb, b))) => la == lb && a + *len == b,
            _ => false,
        };
        if merged {
            *len += n;
            return;
        }
    }
    out.push((n, src));
}

/// What a footer alone says about a disk, as kept in snapshots.
fn footer_info(f: &footer::Footer, warnings: Vec<String>) -> VhdInfo {
    VhdInfo {
        disk_type: f.disk_type,
        unique_id: format_uuid(&f.unique_id),
        creator_application: fourcc(&f.creator_app),
        creator_version: format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xffff),
        creator_host_os: fourcc(&f.creator_host_os),
        current_size: f.current_size,
        original_size: f.original_size,
        geometry: f.geometry,
        timestamp: f.timestamp,
        time: vhd_time(f.timestamp),
        block_size: None,
        parents: Vec::new(),
        warnings,
    }
}

/// The metadata of a fixed VHD known only by its footer (a page blob), as kept in snapshots.
pub fn fixed_footer_info(
    bytes: &[u8; footer::FOOTER_LEN],
    location: &str,
    at: u64,
) -> Result<VhdInfo> {
    let (f, warning) = footer::Footer::decode(bytes, location, at)?;
    Ok(footer_info(&f, warning.into_iter().collect()))
}

impl VhdDisk<FileAt> {
    /// Opens the VHD at `path` and its parent chain. `parent` overrides where the first
    /// parent is looked for (its locators are ignored then).
    pub fn open(path: &Path, parent: Option<&Path>) -> Result<Self> {
        let mut layers = Vec::new();
        let mut seen = HashSet::new();
        let mut next = Some(path.to_path_buf());
        let mut parent_override = parent.map(Path::to_path_buf);
        while let Some(p) = next.take() {
            let canonical = std::fs::canonicalize(&p).map_err(|e| Error::io("open", &p, e))?;
            if !seen.insert(canonical) {
                return Err(Error::InvalidArgument(format!(
                    "parent chain of {} is a cycle: it comes back to {}",
                    path.display(),
                    p.display()
                )));
            }
            if layers.len() == MAX_CHAIN {
                return Err(Error::InvalidArgument(format!(
                    "parent chain of {} is longer than {MAX_CHAIN} disks",
                    path.display()
                )));
            }
            let image = VhdImage::open(FileAt::open(&p)?, &p.display().to_string())?;
            if image.footer.disk_type == DiskType::Differencing {
                next = Some(match parent_override.take() {
                    Some(o) => o,
                    None => find_parent(&image, &p)?,
                });
            }
            layers.push(image);
        }
        let disk = VhdDisk::from_chain(layers)?;
        // Tolerated damage (a wrong checksum, a footer read from its copy) is told as it is
        // found; it is also kept in the snapshot's source information.
        for w in disk.warnings() {
            crate::progress::notice(&format!("warning: {w}"));
        }
        Ok(disk)
    }
}

/// Finds a differencing disk's parent from its locators, in the order W2ru (relative), W2ku
/// (absolute), MacX (file URL); relative paths are taken from the child's directory, and a
/// Windows path that does not exist here is also tried by its file name next to the child.
fn find_parent<R: ReadAt>(image: &VhdImage<R>, child: &Path) -> Result<PathBuf> {
    let dir = child.parent().unwrap_or(Path::new("."));
    let mut tried = Vec::new();
    if let Some(d) = &image.dynamic {
        for code in [b"W2ru", b"W2ku", b"MacX"] {
            for (i, l) in d.header.locators.iter().enumerate() {
                if &l.code != code {
                    continue;
                }
                let entry_at =
                    d.header_at + (dynamic::off::LOCATORS + i * dynamic::LOCATOR_LEN) as u64;
                if l.data_length > dynamic::MAX_LOCATOR_LEN {
                    return Err(Error::source_damaged(
                        &image.location,
                        entry_at,
                        format!("parent locator is {} bytes long", l.data_length),
                    ));
                }
                let mut data = vec![0u8; l.data_length as usize];
                image.read(&mut data, l.data_offset, "parent locator")?;
                let Some(text) = dynamic::locator_path(code, &data) else {
                    continue;
                };
                let mut candidates = vec![dir.join(&text)];
                if let Some(name) = Path::new(&text).file_name() {
                    candidates.push(dir.join(name));
                }
                for c in candidates {
                    if c.is_file() {
                        return Ok(c);
                    }
                    tried.push(format!("{} ({})", c.display(), fourcc(code)));
                }
            }
        }
        if !d.header.parent_name.is_empty() {
            let c = dir.join(d.header.parent_name.replace('\\', "/"));
            if let Some(name) = c.file_name().map(|n| dir.join(n)) {
                if name.is_file() {
                    return Ok(name);
                }
                tried.push(format!("{} (parent name)", name.display()));
            }
        }
    }
    Err(Error::InvalidArgument(format!(
        "parent of differencing VHD {} not found (tried {}); pass --parent-vhd PATH",
        child.display(),
        if tried.is_empty() {
            "no usable locator".to_string()
        } else {
            tried.join(", ")
        }
    )))
}

impl<R: ReadAt> DiskSource for VhdDisk<R> {
    fn virtual_size(&self) -> u64 {
        self.top().virtual_size()
    }

    fn info(&self) -> SourceInfo {
        SourceInfo {
            path: self.top().location.clone(),
            format: ContainerFormat::Vhd(self.top().footer.disk_type),
            vhd: Some(self.vhd_info()),
            blob: None,
        }
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<SourceExtent>> {
        let len = len.min(self.virtual_size().saturating_sub(offset));
        self.extent_map(offset, len)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_virtual(offset, buf)
    }

    /// A differencing chain knows what changed since any of its ancestors: the sectors
    /// present in the layers above it. The parent snapshot names its disk by VHD unique id.
    fn changes_since(&self, parent: &SourceInfo) -> Result<SourceChanges> {
        if self.top().footer.disk_type != DiskType::Differencing {
            return Ok(SourceChanges::Unknown);
        }
        let wanted = parent.vhd.as_ref().map(|v| v.unique_id.as_str());
        let found = self
            .layers
            .iter()
            .skip(1)
            .position(|l| Some(format_uuid(&l.footer.unique_id).as_str()) == wanted);
        let Some(depth) = found.map(|i| i + 1) else {
            let ancestors: Vec<String> = self.layers[1..]
                .iter()
                .map(|l| format!("{} ({})", l.location, format_uuid(&l.footer.unique_id)))
                .collect();
            return Ok(SourceChanges::Mismatch(format!(
                "differencing VHD {} does not descend from the disk of the parent snapshot \
                 ({}); its ancestors are {}",
                self.top().location,
                match wanted {
                    Some(id) => format!("VHD unique id {id}"),
                    None => format!("{}, not a VHD", parent.path),
                },
                ancestors.join(", ")
            )));
        };
        let size = self.virtual_size();
        let mut ranges: Vec<ChangedRange> = Vec::new();
        for layer in &self.layers[..depth] {
            let mut places = Vec::new();
            layer.map(0, size, &mut places)?;
            let mut pos = 0;
            for (n, place) in places {
                if matches!(place, Place::Here(_)) {
                    ranges.push(ChangedRange {
                        offset: pos,
                        len: n,
                        kind: ChangeKind::Written,
                    });
                }
                pos += n;
            }
        }
        Ok(SourceChanges::Changes(ChangeList::new(
            Some(size),
            ranges,
            &self.top().location,
        )?))
    }
}

#[cfg(test)]
mod tests;
