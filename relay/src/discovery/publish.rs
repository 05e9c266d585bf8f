//! The published filter: once a UTC day, the relay builds a BinaryFuse32 of every
//! discoverable filter key and writes, under `<data>/discovery/`:
//! - `snapshot-<day>.tf`: the whole filter ([`FilterSnapshot`], "TDF1");
//! - `keys-<day>.bin`: the sorted keys (u64 LE), the base of the next delta;
//! - `delta-<day>.td`: keys added and removed since the last published day
//!   ([`FilterDelta`], "TDD1").
//!
//! It keeps `keep_deltas` deltas and the last two snapshots and key lists. The files
//! hold filter keys only: no tags, no account ids, no numbers. A key that left the
//! store (an account deleted, or no longer discoverable) leaves the next day's files.
//!
//! A relay restarted during a day serves that day's files as they are, unless a
//! `stale` file says the tags changed behind its back ([`mark_stale`]), if they are
//! there and whole (the snapshot decodes, is that day's and holds exactly the day's
//! key list, and the delta to it decodes and starts from the last earlier key list):
//! the day's artefacts never change once published, so clients that fetched part of
//! them before the restart can finish. Only missing or damaged files are rebuilt
//! from the store.
//!
//! Serving: `since_day = 0`, or a day older than the deltas kept (or not a day the
//! relay published), gets the latest snapshot; otherwise the deltas after
//! `since_day`, concatenated, oldest first, unless they are at least as large as
//! the snapshot, which is then served instead (the reply's `kind` says which). An artefact is served in parts of at
//! most [`MAX_FILTER_PART`] bytes; `day` pins it while its parts download.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::Path;

use bytes::Bytes;
use tern_proto::discovery::{
    FilterDelta, FilterKey, FilterKind, FilterPart, FilterSnapshot, MAX_FILTER_PART,
};

use super::shared::ArtefactKind;
use super::DiscoveryError;
use crate::error::{Error, Result};

/// What a request before the first publication is advised: the publisher checks
/// every minute.
const NOT_PUBLISHED_RETRY_MS: u64 = 60_000;

/// What the relay serves until the next publication.
#[derive(Debug, Default)]
pub struct Published {
    day: u32,
    snapshot: Bytes,
    /// The chain of kept deltas that ends at `day`, encoded and concatenated,
    /// oldest first: what a client at the chain's first base day needs.
    pub(super) chain: Bytes,
    /// Where in `chain` the deltas after each base day start. Memory is linear in
    /// the days kept: every `since_day` is a slice of the one `chain`.
    starts: HashMap<u32, usize>,
}

impl Published {
    /// Nothing published yet.
    pub fn empty() -> Self {
        Published::default()
    }

    /// The day of the snapshot (0: none).
    pub fn day(&self) -> u32 {
        self.day
    }

    /// What to serve for `day`: its snapshot, and of `deltas` (encoded, by the day
    /// they bring the set to, with their base day) the chain that ends at `day`.
    pub(super) fn new(day: u32, snapshot: Bytes, deltas: &BTreeMap<u32, (u32, Bytes)>) -> Self {
        let mut links = Vec::new();
        let mut at = day;
        // Each step goes to an earlier day, so this ends within `deltas.len()` steps.
        while let Some((base, bytes)) = deltas.get(&at) {
            if *base >= at {
                break;
            }
            links.push((*base, bytes));
            at = *base;
        }
        links.reverse();
        let mut chain = Vec::with_capacity(links.iter().map(|(_, b)| b.len()).sum());
        let mut starts = HashMap::with_capacity(links.len());
        for (base, bytes) in links {
            starts.insert(base, chain.len());
            chain.extend_from_slice(bytes);
        }
        Published {
            day,
            snapshot,
            chain: Bytes::from(chain),
            starts,
        }
    }

    /// The deltas from `since_day` to today, if they are all kept, chain, and are
    /// smaller than the snapshot (else the snapshot is the cheaper answer).
    fn deltas_since(&self, since_day: u32) -> Option<Bytes> {
        self.starts
            .get(&since_day)
            .filter(|&&from| self.chain.len() - from < self.snapshot.len())
            .map(|&from| self.chain.slice(from..))
    }

    /// Part `part` of what a client at `since_day` needs, for the artefact of `day`
    /// (0: today's).
    pub fn part(&self, since_day: u32, day: u32, part: u32) -> Result<FilterPart> {
        if self.day == 0 {
            return Err(DiscoveryError::NotPublished {
                retry_after_ms: NOT_PUBLISHED_RETRY_MS,
            }
            .into());
        }
        if day != 0 && day != self.day {
            return Err(DiscoveryError::Gone.into());
        }
        let (kind, data) = match since_day {
            0 => (FilterKind::Snapshot, self.snapshot.clone()),
            s if s >= self.day => (FilterKind::Deltas, Bytes::new()),
            s => match self.deltas_since(s) {
                Some(d) => (FilterKind::Deltas, d),
                None => (FilterKind::Snapshot, self.snapshot.clone()),
            },
        };
        let parts = data.len().div_ceil(MAX_FILTER_PART).max(1);
        let parts = u32::try_from(parts).unwrap_or(u32::MAX);
        if part >= parts {
            return Err(DiscoveryError::NoSuchPart { part, parts }.into());
        }
        let from = part as usize * MAX_FILTER_PART;
        let to = (from + MAX_FILTER_PART).min(data.len());
        Ok(FilterPart {
            day: self.day,
            kind,
            parts,
            part,
            data: data.slice(from..to),
        })
    }
}

/// A file whose presence says the tags changed behind the relay's back (seeding,
/// [`super::seed`]): the next publication builds from the store even if the day's
/// files are whole, then removes it.
const STALE: &str = "stale";

/// Marks the published files stale: the next publication builds from the store
/// even if the day's files are whole (see [`load_day`]).
pub fn mark_stale(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    fs::File::create(dir.join(STALE))?.sync_all()?;
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn name(kind: &str, day: u32, ext: &str) -> String {
    format!("{kind}-{day}.{ext}")
}

/// The days of the files `<kind>-<day>.<ext>` in `dir`, ascending.
fn days(dir: &Path, kind: &str, ext: &str) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let file = entry?.file_name();
        let Some(file) = file.to_str() else { continue };
        let day = file
            .strip_prefix(kind)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.strip_suffix(ext))
            .and_then(|r| r.strip_suffix('.'))
            .and_then(|d| d.parse::<u32>().ok())
            // Only names the relay writes: "keys-05.bin" is not day 5's.
            .filter(|d| name(kind, *d, ext) == file);
        out.extend(day);
    }
    out.sort_unstable();
    Ok(out)
}

/// Writes `bytes` to `dir/file` through a temporary file and a rename.
fn write_atomic(dir: &Path, file: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{file}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(file))?;
    Ok(())
}

fn read_keys(path: &Path) -> Result<Vec<u64>> {
    let bytes = fs::read(path)?;
    parse_keys(&bytes).map_err(|why| Error::Config(format!("{} {why}", path.display())))
}

/// A key list's bytes (u64 LE, strictly ascending) as keys.
pub(super) fn parse_keys(bytes: &[u8]) -> std::result::Result<Vec<u64>, &'static str> {
    if bytes.len() % 8 != 0 {
        return Err("is not a key list");
    }
    let keys: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    if keys.windows(2).any(|w| w[0] >= w[1]) {
        return Err("is not sorted");
    }
    Ok(keys)
}

/// `day`'s files as published before (a restart during the day), if they are all
/// there and whole (see the module docs); `None` if they must be built (missing,
/// damaged, or marked stale). Any other I/O error is returned: the day's files are
/// not rebuilt under the same day because a read failed.
pub fn load_day(dir: &Path, day: u32) -> Result<Option<Published>> {
    if dir.join(STALE).exists() {
        return Ok(None);
    }
    let snapshot_bytes = match fs::read(dir.join(name("snapshot", day, "tf"))) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Ok(snapshot) = FilterSnapshot::decode(&snapshot_bytes) else {
        return Ok(None);
    };
    let keys = match read_keys(&dir.join(name("keys", day, "bin"))) {
        Ok(keys) => keys,
        Err(Error::Io(e)) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        Err(_) => return Ok(None),
    };
    let whole = snapshot.day == day
        && snapshot.keys as usize == keys.len()
        && keys.iter().all(|k| snapshot.contains(FilterKey(*k)));
    if !whole {
        return Ok(None);
    }
    if let Some(base) = days(dir, "keys", "bin")?.into_iter().rfind(|d| *d < day) {
        let delta = match fs::read(dir.join(name("delta", day, "td"))) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let chained = delta
            .as_deref()
            .map(FilterDelta::decode)
            .is_some_and(|d| d.is_ok_and(|d| d.base_day == base && d.day == day));
        if !chained {
            return Ok(None);
        }
    }
    load_deltas(dir, day, Bytes::from(snapshot_bytes)).map(Some)
}

/// A day's publication, encoded: the filter snapshot, the delta from the last earlier
/// day (when there is one), and the sorted key list the next day's delta starts from.
pub(super) struct Built {
    pub(super) snapshot: Vec<u8>,
    pub(super) delta: Option<Vec<u8>>,
    pub(super) keys: Vec<u8>,
}

/// Builds `day`'s publication from `keys` (any order, duplicates allowed) and, when
/// given, the keys of the last earlier day (`base`), as files and as the shared
/// table both hold it.
pub(super) fn build(day: u32, mut keys: Vec<u64>, base: Option<(u32, &[u64])>) -> Result<Built> {
    keys.sort_unstable();
    keys.dedup();
    let snapshot = FilterSnapshot::build(day, keys.clone())
        .map_err(|e| Error::Config(format!("building the discovery filter: {e}")))?
        .encode();
    let delta = base.map(|(b, old)| FilterDelta::between(b, old, day, &keys).encode());
    let keys = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
    Ok(Built {
        snapshot,
        delta,
        keys,
    })
}

/// Builds and writes `day`'s files from `keys` (any order, duplicates allowed),
/// prunes old ones, and returns what to serve. Called for a day already published
/// (when [`load_day`] found its files damaged), it rewrites that day's files
/// against the last earlier day.
pub fn publish_day(dir: &Path, day: u32, keys: Vec<u64>, keep_deltas: u32) -> Result<Published> {
    fs::create_dir_all(dir)?;
    let base = days(dir, "keys", "bin")?.into_iter().rfind(|d| *d < day);
    let old = match base {
        Some(base) => Some((base, read_keys(&dir.join(name("keys", base, "bin")))?)),
        None => None,
    };
    let built = build(day, keys, old.as_ref().map(|(b, k)| (*b, k.as_slice())))?;
    if let Some(delta) = &built.delta {
        write_atomic(dir, &name("delta", day, "td"), delta)?;
    }
    write_atomic(dir, &name("snapshot", day, "tf"), &built.snapshot)?;
    write_atomic(dir, &name("keys", day, "bin"), &built.keys)?;
    let snapshot_bytes = built.snapshot;
    fs::File::open(dir)?.sync_all()?;
    prune(dir, day, keep_deltas)?;
    match fs::remove_file(dir.join(STALE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    load_deltas(dir, day, Bytes::from(snapshot_bytes))
}

/// What to serve for `day`: its snapshot and the kept deltas in `dir`.
fn load_deltas(dir: &Path, day: u32, snapshot: Bytes) -> Result<Published> {
    let mut deltas = BTreeMap::new();
    for d in days(dir, "delta", "td")? {
        let bytes = fs::read(dir.join(name("delta", d, "td")))?;
        match FilterDelta::decode(&bytes) {
            Ok(delta) if delta.day == d => {
                deltas.insert(d, (delta.base_day, Bytes::from(bytes)));
            }
            // A damaged delta breaks the chain there: clients behind it get the snapshot.
            _ => {}
        }
    }
    Ok(Published::new(day, snapshot, &deltas))
}

/// Keeps the newest `keep_deltas` deltas up to `day`, and the two newest snapshots
/// and key lists.
fn prune(dir: &Path, day: u32, keep_deltas: u32) -> Result<()> {
    let drop_old = |kind: &str, ext: &str, keep: usize| -> Result<()> {
        let all: Vec<u32> = days(dir, kind, ext)?
            .into_iter()
            .filter(|d| *d <= day)
            .collect();
        for d in &all[..all.len().saturating_sub(keep)] {
            match fs::remove_file(dir.join(name(kind, *d, ext))) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    };
    drop_old("delta", "td", keep_deltas as usize)?;
    drop_old("snapshot", "tf", 2)?;
    drop_old("keys", "bin", 2)
}

/// The whole published files in `dir`, oldest day first (snapshots that decode as
/// their day's, deltas that decode, key lists that parse), for a move to a shared
/// database: none if the directory is missing or marked stale (the next
/// publication rebuilds then).
pub fn whole_files(dir: &Path) -> Result<Vec<(u32, ArtefactKind, Vec<u8>)>> {
    if !dir.exists() || dir.join(STALE).exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (kind, file, ext) in [
        (ArtefactKind::Snapshot, "snapshot", "tf"),
        (ArtefactKind::Delta, "delta", "td"),
        (ArtefactKind::Keys, "keys", "bin"),
    ] {
        for day in days(dir, file, ext)? {
            let bytes = fs::read(dir.join(name(file, day, ext)))?;
            let whole = match kind {
                ArtefactKind::Snapshot => {
                    FilterSnapshot::decode(&bytes).is_ok_and(|s| s.day == day)
                }
                ArtefactKind::Delta => FilterDelta::decode(&bytes).is_ok_and(|d| d.day == day),
                ArtefactKind::Keys => parse_keys(&bytes).is_ok(),
            };
            if whole {
                out.push((day, kind, bytes));
            }
        }
    }
    out.sort_by_key(|(day, _, _)| *day);
    Ok(out)
}
