//! One publication for every node of a relay on a shared database.
//!
//! Embedded relays publish into files ([`super::publish`]). On a shared backend every
//! node must serve the same bytes (a client may fetch a snapshot from one node and
//! its deltas from another the next day), so the artefacts live in the database
//! ([`SharedPublication`]):
//! - the holder of the lease [`PUBLISH_LEASE`] builds a day's snapshot, its delta
//!   from the newest earlier key list the store holds (whoever wrote it), and the
//!   day's key list, and stores them in one transaction; a day already stored is
//!   never built again, by this node or another, so a node taking the lease over
//!   continues the chain;
//! - every node serves the newest stored publication, reloaded whole when its
//!   [`Version`] (day and creation time) differs from the one it serves, so parts
//!   of two publications are never mixed in one node's answers.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use tern_proto::discovery::{FilterDelta, FilterSnapshot};
use tracing::warn;

use super::publish::{parse_keys, Published};
use crate::error::{Error, Result};
use crate::store::{StoreError, StoreResult};

/// The lease whose holder publishes the day's filter.
pub const PUBLISH_LEASE: &str = "publish:discovery";

/// Which publication a node serves: its day and its creation time on the
/// database's clock (a day published again, after an operator removed it, is a
/// new version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// The UTC day of the snapshot.
    pub day: u32,
    /// When it was stored, Unix ms (database time).
    pub created_ms: i64,
}

/// A publication as a shared store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPublication {
    /// Which one.
    pub version: Version,
    /// The snapshot ("TDF1").
    pub snapshot: Vec<u8>,
    /// Every kept delta ("TDD1") up to the snapshot's day, oldest first.
    pub deltas: Vec<Vec<u8>>,
}

/// One day's artefacts, to be stored.
#[derive(Debug)]
pub struct NewPublication<'a> {
    /// Its UTC day.
    pub day: u32,
    /// The snapshot ("TDF1").
    pub snapshot: &'a [u8],
    /// The delta from the newest earlier key list ("TDD1"), if there was one.
    pub delta: Option<&'a [u8]>,
    /// The day's sorted keys (u64 LE): the base of the next day's delta.
    pub keys: &'a [u8],
    /// How many deltas to keep (older ones are removed; snapshots and key lists:
    /// the newest two).
    pub keep_deltas: u32,
}

/// What a stored artefact is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtefactKind {
    /// A snapshot ("TDF1").
    Snapshot,
    /// A delta ("TDD1").
    Delta,
    /// A day's sorted key list (u64 LE).
    Keys,
}

/// Where the nodes of one relay keep the publication they all serve.
pub trait SharedPublication: Send + Sync + std::fmt::Debug {
    /// The newest publication's version; `None` before the first.
    fn latest(&self) -> StoreResult<Option<Version>>;
    /// The newest publication, read in one consistent view.
    fn load(&self) -> StoreResult<Option<StoredPublication>>;
    /// The newest key list of a day before `day`, with its day.
    fn keys_before(&self, day: u32) -> StoreResult<Option<(u32, Vec<u8>)>>;
    /// Stores a day's artefacts and prunes old ones in one transaction. False (and
    /// nothing written) when that day, or a later one, is already stored.
    fn store(&self, new: &NewPublication<'_>) -> StoreResult<bool>;
    /// Takes or renews the publisher's lease for `ttl`: true when held.
    fn hold_publisher(&self, ttl: Duration) -> StoreResult<bool>;
    /// Gives the publisher's lease up, if held (a clean stop).
    fn release_publisher(&self) -> StoreResult<()>;
}

/// Publishes `day` when the store holds no publication that new and this node
/// holds the lease (for `ttl`): builds from `keys` (any order, duplicates allowed),
/// with a delta from the store's newest earlier key list. Returns whether this
/// call stored it (false: not due, not the holder, or another node got there first).
pub(super) fn publish_if_due(
    store: &dyn SharedPublication,
    day: u32,
    keys: impl FnOnce() -> Result<Vec<u64>>,
    keep_deltas: u32,
    ttl: Duration,
) -> Result<bool> {
    if store.latest()?.is_some_and(|v| v.day >= day) {
        return Ok(false);
    }
    if !store.hold_publisher(ttl)? {
        return Ok(false);
    }
    let keys = keys()?;
    let old = match store.keys_before(day)? {
        Some((base, bytes)) => match parse_keys(&bytes) {
            Ok(old) => Some((base, old)),
            Err(why) => {
                // The chain breaks here: clients behind it get the snapshot.
                warn!(
                    base,
                    why, "the stored discovery key list is damaged; no delta"
                );
                None
            }
        },
        None => None,
    };
    let built = super::publish::build(day, keys, old.as_ref().map(|(b, k)| (*b, k.as_slice())))?;
    Ok(store.store(&NewPublication {
        day,
        snapshot: &built.snapshot,
        delta: built.delta.as_deref(),
        keys: &built.keys,
        keep_deltas,
    })?)
}

/// The newest stored publication, ready to serve, unless its version is `have`.
/// A snapshot that does not decode as its day's is an error (the node keeps what
/// it serves); a damaged delta breaks the chain there.
pub(super) fn load_if_newer(
    store: &dyn SharedPublication,
    have: Option<Version>,
) -> Result<Option<(Version, Published)>> {
    match store.latest()? {
        None => return Ok(None),
        Some(v) if Some(v) == have => return Ok(None),
        Some(_) => {}
    }
    let Some(stored) = store.load()? else {
        return Ok(None);
    };
    let day = stored.version.day;
    match FilterSnapshot::decode(&stored.snapshot) {
        Ok(s) if s.day == day => {}
        _ => {
            return Err(Error::Store(StoreError::Corrupt(
                "published discovery snapshot",
            )))
        }
    }
    let mut deltas = BTreeMap::new();
    for bytes in stored.deltas {
        if let Ok(d) = FilterDelta::decode(&bytes) {
            if d.day <= day {
                deltas.insert(d.day, (d.base_day, Bytes::from(bytes)));
            }
        }
    }
    let published = Published::new(day, Bytes::from(stored.snapshot), &deltas);
    Ok(Some((stored.version, published)))
}
