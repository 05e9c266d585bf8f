//! The device's copy of the relay's discovery filter: the last snapshot downloaded
//! plus every delta applied since, folded into two exact key sets (added, removed),
//! so a key is in the set iff `(snapshot ∋ k ∧ k ∉ removed) ∨ k ∈ added`. The sets
//! are exact, so the false-positive rate stays the snapshot's (about 2^-32).
//!
//! Persisted as two records: the snapshot in its wire encoding (written only when
//! replaced) and the folded sets as one [`FilterDelta`] from the snapshot's day to
//! the day reached (small, rewritten at each refresh).

use std::collections::BTreeSet;

use tern_proto::discovery::{FilterDecodeError, FilterDelta, FilterKey, FilterSnapshot};

/// Above this share of the snapshot's keys, the folded deltas cost more to keep
/// than a fresh snapshot: download one instead.
const RESNAPSHOT_PERCENT: usize = 5;

/// Why a filter refresh could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LocalFilterError {
    /// The bytes do not decode.
    #[error("discovery filter does not decode: {0}")]
    Decode(#[from] FilterDecodeError),
    /// A delta does not start on the day this filter has reached.
    #[error("discovery delta from day {got} does not follow day {have}")]
    Gap {
        /// The day this filter is at.
        have: u32,
        /// The delta's base day.
        got: u32,
    },
}

/// A snapshot with the deltas applied since.
pub struct LocalFilter {
    snapshot: FilterSnapshot,
    day: u32,
    added: BTreeSet<u64>,
    removed: BTreeSet<u64>,
}

impl std::fmt::Debug for LocalFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalFilter")
            .field("snapshot_day", &self.snapshot.day)
            .field("day", &self.day)
            .field("added", &self.added.len())
            .field("removed", &self.removed.len())
            .finish()
    }
}

impl LocalFilter {
    /// A filter from a fresh snapshot.
    pub fn new(snapshot: FilterSnapshot) -> Self {
        LocalFilter {
            day: snapshot.day,
            snapshot,
            added: BTreeSet::new(),
            removed: BTreeSet::new(),
        }
    }

    /// The filter from its two records (see [`LocalFilter::encode_delta`]).
    pub fn decode(snapshot: &[u8], delta: Option<&[u8]>) -> Result<Self, LocalFilterError> {
        let mut f = LocalFilter::new(FilterSnapshot::decode(snapshot)?);
        if let Some(d) = delta {
            f.apply(&FilterDelta::decode(d)?)?;
        }
        Ok(f)
    }

    /// The day the filter has reached.
    pub fn day(&self) -> u32 {
        self.day
    }

    /// The snapshot's day.
    pub fn snapshot_day(&self) -> u32 {
        self.snapshot.day
    }

    /// Whether `key` may be a discoverable user's.
    pub fn contains(&self, key: FilterKey) -> bool {
        if self.added.contains(&key.0) {
            return true;
        }
        !self.removed.contains(&key.0) && self.snapshot.contains(key)
    }

    /// Applies the day's change; `delta.base_day` must be the day reached. Nothing
    /// changes on an error.
    pub fn apply(&mut self, delta: &FilterDelta) -> Result<(), LocalFilterError> {
        if delta.base_day != self.day {
            return Err(LocalFilterError::Gap {
                have: self.day,
                got: delta.base_day,
            });
        }
        for k in &delta.added {
            if !self.removed.remove(k) {
                self.added.insert(*k);
            }
        }
        for k in &delta.removed {
            if !self.added.remove(k) {
                self.removed.insert(*k);
            }
        }
        self.day = delta.day;
        Ok(())
    }

    /// Whether the folded deltas have grown past 5% of the snapshot, so the next
    /// refresh should take a new snapshot.
    pub fn wants_snapshot(&self) -> bool {
        let held = self.added.len() + self.removed.len();
        held * 100 > (self.snapshot.keys as usize).max(1) * RESNAPSHOT_PERCENT
    }

    /// The snapshot's record.
    pub fn encode_snapshot(&self) -> Vec<u8> {
        self.snapshot.encode()
    }

    /// The folded deltas' record: one delta from the snapshot's day to the day
    /// reached (sorted, distinct, disjoint by construction).
    pub fn encode_delta(&self) -> Vec<u8> {
        FilterDelta {
            base_day: self.snapshot.day,
            day: self.day,
            added: self.added.iter().copied().collect(),
            removed: self.removed.iter().copied().collect(),
        }
        .encode()
    }
}
