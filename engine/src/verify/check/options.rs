//! What a [`check`](super::check) is asked to do: [`CheckOptions`], and which stored chunks
//! it reads back ([`ReadData`]: none, all, or a [`Subset`] of the packs given as `N/M`, `P%`
//! or a size). Parsing a subset refuses anything it cannot read back by `Display`; choosing
//! the packs of a subset is the read-data stage's job (`read_data::select`).

use serde::Serialize;

use crate::error::{Error, Result};

/// Which stored chunks `check` reads back.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ReadData {
    /// Structure only.
    #[default]
    None,
    /// Every pack.
    All,
    /// Part of the packs; see [`Subset`].
    Subset(Subset),
}

/// Which stored chunks a `check` read back, as reported (`none`, `all`, `subset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadDataKind {
    None,
    All,
    Subset,
}

/// A part of the packs to scrub, so that a large repository can be read over several runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Subset {
    /// `N/M`: the N-th of M slices of the packs in name order (deterministic: running 1/M to
    /// M/M reads every pack once).
    Slice { n: u64, of: u64 },
    /// `P%`: a random choice of that share of the packs.
    Percent(f64),
    /// `2GiB`: a random choice of packs adding up to at least that many bytes.
    Bytes(u64),
}

impl std::fmt::Display for Subset {
    /// The form `parse` reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subset::Slice { n, of } => write!(f, "{n}/{of}"),
            Subset::Percent(p) => write!(f, "{p}%"),
            Subset::Bytes(b) => write!(f, "{b}"),
        }
    }
}

impl Subset {
    /// Parses `1/5`, `10%`, `2GiB` (units B, K/KiB, M/MiB, G/GiB, T/TiB; binary).
    pub fn parse(s: &str) -> Result<Subset> {
        let bad = |why: &str| {
            Error::Usage(format!(
                "read-data subset {s:?}: {why} (expected N/M, P% or a size like 2GiB)"
            ))
        };
        let s = s.trim();
        if let Some((n, of)) = s.split_once('/') {
            let n: u64 = n.trim().parse().map_err(|_| bad("bad N"))?;
            let of: u64 = of.trim().parse().map_err(|_| bad("bad M"))?;
            if n == 0 || of == 0 || n > of {
                return Err(bad("need 1 <= N <= M"));
            }
            return Ok(Subset::Slice { n, of });
        }
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad("bad percentage"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(bad("percentage must be above 0 and at most 100"));
            }
            return Ok(Subset::Percent(p));
        }
        let digits = s
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(digits);
        let num: f64 = num.parse().map_err(|_| bad("bad size"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" | "kb" => 1 << 10,
            "m" | "mib" | "mb" => 1 << 20,
            "g" | "gib" | "gb" => 1 << 30,
            "t" | "tib" | "tb" => 1 << 40,
            _ => return Err(bad("unknown unit")),
        };
        let bytes = num * mult as f64;
        if !(1.0..1e19).contains(&bytes) {
            return Err(bad("size out of range"));
        }
        Ok(Subset::Bytes(bytes as u64))
    }
}

/// Options of [`check`](super::check).
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    pub read_data: ReadData,
    /// Age after which orphans (packs no snapshot needs, deltas without a pack) are a
    /// warning rather than a run in flight; `None`: prune's default grace period.
    pub grace: Option<std::time::Duration>,
}

impl ReadData {
    /// The kind reported in [`CheckReport::read_data`](super::CheckReport::read_data).
    pub(super) fn kind(&self) -> ReadDataKind {
        match self {
            ReadData::None => ReadDataKind::None,
            ReadData::All => ReadDataKind::All,
            ReadData::Subset(_) => ReadDataKind::Subset,
        }
    }

    /// The subset as typed, for the report; `None` unless a subset was asked for.
    pub(super) fn subset_text(&self) -> Option<String> {
        match self {
            ReadData::Subset(s) => Some(s.to_string()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_parsing() {
        assert_eq!(
            Subset::parse("1/5").ok(),
            Some(Subset::Slice { n: 1, of: 5 })
        );
        assert_eq!(Subset::parse("10%").ok(), Some(Subset::Percent(10.0)));
        assert_eq!(Subset::parse("2GiB").ok(), Some(Subset::Bytes(2 << 30)));
        assert_eq!(Subset::parse("512M").ok(), Some(Subset::Bytes(512 << 20)));
        for bad in ["0/5", "6/5", "x/5", "0%", "101%", "2XB", "", "-1G"] {
            assert!(Subset::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
