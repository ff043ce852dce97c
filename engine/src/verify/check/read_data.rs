//! The read-data stage of a check (`--read-data`): the packs whose structure is sound, or a
//! [`Subset`] of them, read back whole and in parallel; per frame the crc32 of the stored
//! bytes first (cheap), then the frame's own chunk list against the pack table, decompression
//! (once per frame) and the BLAKE3 id of every chunk. Damage of a frame is damage of every
//! chunk in it. A pack that changed since the structure stages read it is damage, never a
//! panic. Reading only: a cancelled check has nothing to clean up.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::pack::{
    chunk_in_frame, decode_footer, decode_frame_header, decode_frame_into, decode_frame_list,
    decode_header, decode_table, frames, open_sealed_frame_in_place, unpack_opened_frame,
    RecordLocation, FRAME_HEADER_LEN, PACK_FOOTER_LEN, PACK_HEADER_LEN, PACK_VERSION_SEALED,
    PACK_VERSION_V1,
};
use crate::format::ChunkId;
use crate::repo::Repo;
use crate::store::pack_key;

use super::{CheckRun, Damage, DamageKind, ReadData, Subset};

/// What the read-data stage read.
#[derive(Default)]
pub(super) struct DataRead {
    pub(super) packs_read: u64,
    pub(super) chunks_read: u64,
    pub(super) bytes_read: u64,
}

/// Reads back the packs [`CheckOptions::read_data`](super::CheckOptions::read_data) selects
/// among `sound` (name and size of every pack whose structure is sound), adding what it finds
/// to the run's findings.
pub(super) fn read_data(run: &mut CheckRun<'_>, mut sound: Vec<(String, u64)>) -> Result<DataRead> {
    let (repo, progress) = (run.repo, run.progress);
    sound.sort();
    let selected = select(sound, &run.options.read_data)?;
    let total: u64 = selected.iter().map(|(_, size)| size).sum();
    progress.start("check", total);
    let scrubbed: Vec<Result<Scrubbed>> = selected
        .par_iter()
        .map(|(name, size)| {
            // Reading only: an interrupted check has nothing to clean up.
            crate::progress::checkpoint(progress, "check-pack")
                .map_err(|_| Error::Cancelled("check stopped before the end".into()))?;
            let r = scrub_pack(repo, name);
            progress.advance(*size);
            r
        })
        .collect();
    progress.finish();
    let mut read = DataRead {
        packs_read: selected.len() as u64,
        ..DataRead::default()
    };
    let f = &mut run.findings;
    for r in scrubbed {
        let (c, b, damage) = r?;
        read.chunks_read += c;
        read.bytes_read += b;
        for (d, id) in damage {
            f.damaged_chunks.extend(id);
            f.push(d);
        }
    }
    Ok(read)
}

/// Reads a whole pack and checks every frame: crc32 of the stored bytes first (cheap), then
/// its chunk list, decompression (once per frame) and the BLAKE3 id of every chunk.
fn scrub_pack(repo: &Repo, name: &str) -> Result<Scrubbed> {
    let location = format!("pack {name}");
    let keys = repo.protection();
    let mut bytes = repo.backend().get(&pack_key(name)?)?;
    let len = bytes.len() as u64;
    let mut damage = Vec::new();
    let table = bytes
        .len()
        .checked_sub(PACK_FOOTER_LEN)
        .ok_or_else(|| Error::corrupt(&location, 0, "pack shorter than its footer"))
        .and_then(|at| {
            let version = decode_header(bytes.get(..PACK_HEADER_LEN).unwrap_or(&[]), &location)?;
            let footer = decode_footer(&bytes[at..], len, &location)?;
            if footer.version != version {
                return Err(Error::corrupt(
                    &location,
                    at as u64,
                    "footer and header versions differ",
                ));
            }
            let start = footer.table_offset as usize;
            decode_table(&bytes[start..at], &footer, keys, name, &location).map(|t| (version, t))
        });
    let (version, table) = match table {
        Ok(t) => t,
        // The pack changed since the structure phase read it.
        Err(e) => {
            let d = Damage {
                kind: DamageKind::PackStructure,
                location: location.clone(),
                pack: Some(name.into()),
                offset: None,
                chunk: None,
                what: e.to_string(),
            };
            return Ok((0, len, vec![(d, None)]));
        }
    };
    let chunk_damage = |err: &Error, e: &crate::format::pack::PackEntry| {
        let offset = match err {
            Error::Corrupt { offset, .. } => *offset,
            _ => e.offset,
        };
        (
            Damage {
                kind: DamageKind::ChunkData,
                location: location.clone(),
                pack: Some(name.into()),
                offset: Some(offset),
                chunk: Some(e.id.to_hex()),
                what: err.to_string(),
            },
            Some(e.id),
        )
    };
    // Each frame is decompressed into the same buffer; chunks are checked where they lie.
    let mut raw = Vec::new();
    for frame in frames(&table) {
        let first = frame[0].location(version);
        let start = first.offset as usize;
        let end = start.saturating_add(first.read_len() as usize);
        let decoded = if version == PACK_VERSION_SEALED {
            // Opened once, where it lies in the pack's bytes (this pass owns them).
            match bytes.get_mut(start..end) {
                Some(record) => {
                    scrub_sealed_frame(record, frame, &first, keys, name, &location, &mut raw)
                }
                None => Err(outside(&location, first.offset)),
            }
        } else {
            match bytes.get(start..end) {
                Some(record) => {
                    check_frame_list(&bytes, version, frame, &location).and_then(|()| {
                        decode_frame_into(record, &first, keys, name, &location, &mut raw)
                    })
                }
                None => Err(outside(&location, first.offset)),
            }
        };
        match decoded {
            Ok(()) => {
                for e in frame {
                    if let Err(err) = chunk_in_frame(&raw, &e.location(version), keys, &location) {
                        damage.push(chunk_damage(&err, e));
                    }
                }
            }
            // Damage of the frame is damage of every chunk in it.
            Err(err) => damage.extend(frame.iter().map(|e| chunk_damage(&err, e))),
        }
    }
    Ok((table.len() as u64, len, damage))
}

/// A frame the pack's table places past the pack's end (decode_table refuses such tables, so
/// only a pack that changed under the check gets here).
fn outside(location: &str, offset: u64) -> Error {
    Error::corrupt(location, offset, "frame lies past the end of the pack")
}

/// A sealed frame, opened once where it lies: its chunk list (inside the seal) checked
/// against the table's entries of the frame, then its stored bytes decompressed into `raw`.
fn scrub_sealed_frame(
    record: &mut [u8],
    frame: &[crate::format::pack::PackEntry],
    first: &RecordLocation,
    protection: &crate::crypto::Protection,
    pack: &str,
    location: &str,
    raw: &mut Vec<u8>,
) -> Result<()> {
    let (plain, header) =
        open_sealed_frame_in_place(protection, pack, first.offset, record, location)?;
    if header.chunk_count as usize != frame.len() {
        return Err(Error::corrupt(
            location,
            first.offset,
            "frame header disagrees with the pack table",
        ));
    }
    // open_sealed_frame_in_place checked that the record is header, stored bytes and list.
    let list = plain
        .get(FRAME_HEADER_LEN + header.stored_len as usize..)
        .unwrap_or_default();
    let list = decode_frame_list(list, &header, first.offset, location)?;
    same_chunks(&list, frame, first.offset, location)?;
    unpack_opened_frame(plain, &header, first, location, raw)
}

/// Checks that a plain version 2 frame's own chunk list (after its stored bytes) agrees with
/// the table entries of the frame.
fn check_frame_list(
    bytes: &[u8],
    version: u32,
    frame: &[crate::format::pack::PackEntry],
    location: &str,
) -> Result<()> {
    if version == PACK_VERSION_V1 {
        return Ok(());
    }
    let first = &frame[0];
    let start = first.offset as usize;
    let header = decode_frame_header(
        bytes
            .get(start..start + FRAME_HEADER_LEN)
            .ok_or_else(|| outside(location, first.offset))?,
        first.offset,
        location,
    )?;
    let list_at = start + FRAME_HEADER_LEN + header.stored_len as usize;
    let list_len = frame.len() * crate::format::pack::FRAME_LIST_ENTRY_LEN;
    let list = bytes
        .get(list_at..list_at + list_len)
        .ok_or_else(|| Error::corrupt(location, list_at as u64, "frame list truncated"))?;
    if header.chunk_count as usize != frame.len() || header.stored_len != first.stored_len {
        return Err(Error::corrupt(
            location,
            first.offset,
            "frame header disagrees with the pack table",
        ));
    }
    let list = decode_frame_list(list, &header, list_at as u64, location)?;
    same_chunks(&list, frame, list_at as u64, location)
}

/// Checks that a frame's chunk list names the table's chunks of the frame.
fn same_chunks(
    list: &[(ChunkId, u32)],
    frame: &[crate::format::pack::PackEntry],
    list_at: u64,
    location: &str,
) -> Result<()> {
    if list
        .iter()
        .zip(frame)
        .any(|((id, len), e)| *id != e.id || *len != e.raw_len)
    {
        return Err(Error::corrupt(
            location,
            list_at,
            "frame chunk list disagrees with the pack table",
        ));
    }
    Ok(())
}

/// What reading one pack found: chunks read, bytes read, damage (with the damaged chunk).
type Scrubbed = (u64, u64, Vec<(Damage, Option<ChunkId>)>);

/// Picks the packs to read back.
fn select(packs: Vec<(String, u64)>, read: &ReadData) -> Result<Vec<(String, u64)>> {
    let subset = match read {
        ReadData::None => return Ok(Vec::new()),
        ReadData::All => return Ok(packs),
        ReadData::Subset(s) => s,
    };
    let count = packs.len() as u128;
    let mut chosen = match *subset {
        Subset::Slice { n, of } => packs
            .into_iter()
            .enumerate()
            .filter(|(j, _)| (*j as u128 * u128::from(of) / count.max(1)) as u64 + 1 == n)
            .map(|(_, p)| p)
            .collect(),
        Subset::Percent(p) => {
            let want = ((count as f64) * p / 100.0).ceil() as usize;
            let mut packs = shuffled(packs)?;
            packs.truncate(want);
            packs
        }
        Subset::Bytes(limit) => {
            let mut total = 0;
            shuffled(packs)?
                .into_iter()
                .take_while(|(_, size)| {
                    let take = total < limit;
                    total += size;
                    take
                })
                .collect()
        }
    };
    chosen.sort();
    Ok(chosen)
}

/// A random permutation (Fisher-Yates with a splitmix64 stream seeded by the OS).
fn shuffled<T>(mut items: Vec<T>) -> Result<Vec<T>> {
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| {
        Error::io(
            "draw a random seed",
            "/dev/urandom",
            std::io::Error::other(e.to_string()),
        )
    })?;
    let mut state = u64::from_le_bytes(seed);
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_every_pack_once() -> Result<()> {
        let packs: Vec<(String, u64)> = (0..13).map(|i| (format!("{i:02}"), 10)).collect();
        let mut seen = Vec::new();
        for n in 1..=5 {
            let read = ReadData::Subset(Subset::Slice { n, of: 5 });
            seen.extend(select(packs.clone(), &read)?);
        }
        seen.sort();
        assert_eq!(seen, packs);
        let some = select(packs.clone(), &ReadData::Subset(Subset::Percent(30.0)))?;
        assert_eq!(some.len(), 4);
        let some = select(packs.clone(), &ReadData::Subset(Subset::Bytes(25)))?;
        assert_eq!(some.len(), 3);
        Ok(())
    }
}
