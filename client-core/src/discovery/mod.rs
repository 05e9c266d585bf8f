//! Contact discovery, the device's side (issue 13, P5/P6): which address-book
//! numbers belong to users, without the relay learning the address book.
//!
//! 1. Numbers are normalised to E.164 ([`normalise`]) and deduplicated.
//! 2. A number already evaluated has its OPRF output cached in the device store
//!    (namespace `Discovery`, whose record names the encrypted store hashes): it
//!    costs nothing again. New numbers are blinded ([`blind`], RFC 9497
//!    ristretto255-SHA512 through `voprf`, as the relay) in chunks of at most
//!    4096; the last chunk is padded to the next power of two with blinded random
//!    inputs, which look like any other point, so the relay sees only the padded
//!    sizes ([`chunk_sizes`]), which depend only on how many numbers are new.
//! 3. The relay evaluates blind; each output is split into a tag and a filter key
//!    and cached, users or not.
//! 4. Each key is tested against the local copy of the relay's published filter
//!    ([`LocalFilter`]); only hits are looked up by tag.
//!
//! `Client::forget_discovery` deletes every record of the namespace (outputs, filter) at once.

mod filter;
mod normalise;
#[cfg(test)]
mod tests;

use bytes::Bytes;
use rand::{CryptoRng, RngCore};
use tern_proto::discovery::{
    split_output, FilterKey, Tag, MAX_DISCOVERY_BATCH, OUTPUT_LEN, POINT_LEN, TAG_LEN,
};
use voprf::{EvaluationElement, OprfClient, Ristretto255};

use crate::store::{KvStore, Namespace, Op, StoreError, StoreResult};

pub use self::filter::{LocalFilter, LocalFilterError};
pub use self::normalise::{is_e164, normalise};

/// Record names in the `Discovery` namespace. Outputs are `o` + the E.164 string.
const SNAPSHOT_RECORD: &[u8] = b"filter-snapshot";
const DELTA_RECORD: &[u8] = b"filter-delta";
const OUTPUT_PREFIX: &[u8] = b"o";
const OUTPUT_RECORD_LEN: usize = TAG_LEN + 8 + 4;

/// A number's cached OPRF output, as much of it as discovery uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedOutput {
    /// What a lookup names.
    pub tag: Tag,
    /// What the filter holds.
    pub key: FilterKey,
    /// The UTC day it was evaluated.
    pub day: u32,
}

impl CachedOutput {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(OUTPUT_RECORD_LEN);
        b.extend_from_slice(&self.tag.0);
        b.extend_from_slice(&self.key.0.to_le_bytes());
        b.extend_from_slice(&self.day.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> StoreResult<Self> {
        if b.len() != OUTPUT_RECORD_LEN {
            return Err(StoreError::Corrupt);
        }
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&b[..TAG_LEN]);
        let mut key = [0u8; 8];
        key.copy_from_slice(&b[TAG_LEN..TAG_LEN + 8]);
        let mut day = [0u8; 4];
        day.copy_from_slice(&b[TAG_LEN + 8..]);
        Ok(CachedOutput {
            tag: Tag(tag),
            key: FilterKey(u64::from_le_bytes(key)),
            day: u32::from_le_bytes(day),
        })
    }
}

fn output_record(e164: &str) -> Vec<u8> {
    [OUTPUT_PREFIX, e164.as_bytes()].concat()
}

/// The cached output of `e164`, if it was evaluated before.
pub(crate) fn cached(kv: &dyn KvStore, e164: &str) -> StoreResult<Option<CachedOutput>> {
    kv.get(Namespace::Discovery, &output_record(e164))?
        .map(|b| CachedOutput::decode(&b))
        .transpose()
}

/// Caches outputs, in one batch.
pub(crate) fn cache(kv: &dyn KvStore, outputs: &[(String, CachedOutput)]) -> StoreResult<()> {
    let ops = outputs
        .iter()
        .map(|(n, o)| Op::Put(Namespace::Discovery, output_record(n), o.encode()))
        .collect();
    kv.apply(ops, false)
}

/// The stored filter, if any. A damaged one reads as none (it is downloaded again).
pub(crate) fn load_filter(kv: &dyn KvStore) -> StoreResult<Option<LocalFilter>> {
    let Some(snapshot) = kv.get(Namespace::Discovery, SNAPSHOT_RECORD)? else {
        return Ok(None);
    };
    let delta = kv.get(Namespace::Discovery, DELTA_RECORD)?;
    Ok(LocalFilter::decode(&snapshot, delta.as_deref()).ok())
}

/// Stores the filter: its snapshot too if `new_snapshot`, else only the deltas.
pub(crate) fn store_filter(
    kv: &dyn KvStore,
    filter: &LocalFilter,
    new_snapshot: bool,
) -> StoreResult<()> {
    let mut ops = vec![Op::Put(
        Namespace::Discovery,
        DELTA_RECORD.to_vec(),
        filter.encode_delta(),
    )];
    if new_snapshot {
        ops.push(Op::Put(
            Namespace::Discovery,
            SNAPSHOT_RECORD.to_vec(),
            filter.encode_snapshot(),
        ));
    }
    kv.apply(ops, false)
}

/// Deletes every discovery record (cached outputs, the filter) in one durable batch.
pub(crate) fn forget(kv: &dyn KvStore) -> StoreResult<()> {
    let ops = kv
        .scan(Namespace::Discovery)?
        .into_iter()
        .map(|(k, _)| Op::Delete(Namespace::Discovery, k))
        .collect();
    kv.apply(ops, true)
}

/// The batch sizes the relay sees for `new` numbers to evaluate: chunks of 4096,
/// the last padded up to the next power of two. Depends on nothing but `new`.
pub fn chunk_sizes(new: usize) -> Vec<usize> {
    let mut sizes = vec![MAX_DISCOVERY_BATCH; new / MAX_DISCOVERY_BATCH];
    let rest = new % MAX_DISCOVERY_BATCH;
    if rest > 0 {
        sizes.push(rest.next_power_of_two());
    }
    sizes
}

/// Why an evaluation could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlindError {
    /// The OPRF library refused an input (not expected for phone numbers).
    #[error("a number could not be blinded")]
    Blind,
    /// The relay answered a different number of points than it was sent.
    #[error("the relay evaluated {got} points of {sent}")]
    Count {
        /// Points sent.
        sent: usize,
        /// Points answered.
        got: usize,
    },
    /// An evaluated point is not a ristretto255 point.
    #[error("the relay's evaluation {index} is not a point")]
    Point {
        /// Its position in the batch.
        index: usize,
    },
}

/// Why a relay's discovery answer could not be used: the relay broke the protocol
/// (or, for [`BlindError::Blind`], the OPRF library refused an input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// An evaluation's points are missing or not points.
    #[error(transparent)]
    Evaluation(#[from] BlindError),
    /// The filter does not decode, or its deltas do not follow (after a fresh
    /// snapshot was tried).
    #[error(transparent)]
    Filter(#[from] LocalFilterError),
    /// The relay announced more filter parts than a filter can have.
    #[error("the relay's filter has {parts} parts, more than {max}")]
    TooManyParts {
        /// Parts announced.
        parts: u32,
        /// The most a filter can have.
        max: u32,
    },
    /// A filter part's day, kind, count or number differs from what was asked or
    /// from the first part, or it is larger than a part can be.
    #[error("filter part {part} does not belong to the filter being downloaded")]
    PartMismatch {
        /// The part asked for.
        part: u32,
    },
    /// Deltas were sent to a device that asked for a snapshot.
    #[error("the relay sent deltas for no snapshot")]
    DeltasWithoutSnapshot,
}

/// One batch of blinded numbers with what unblinds them; the padding's states are
/// dropped (their outputs are never used).
pub struct BlindedChunk {
    /// The real numbers, in batch order (padding follows them).
    pub numbers: Vec<String>,
    states: Vec<OprfClient<Ristretto255>>,
    /// The batch as sent: 32 bytes per point, a power of two of points.
    pub blinded: Bytes,
}

impl std::fmt::Debug for BlindedChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlindedChunk")
            .field("points", &(self.blinded.len() / POINT_LEN))
            .finish_non_exhaustive()
    }
}

/// Blinds `numbers` (E.164) into the chunks of [`chunk_sizes`], padding the last
/// with blinded random 16-byte inputs. Real and padding points are shuffled
/// nowhere: every point is uniformly random to the relay either way.
pub fn blind<R: RngCore + CryptoRng>(
    numbers: &[String],
    rng: &mut R,
) -> Result<Vec<BlindedChunk>, BlindError> {
    let mut chunks = Vec::new();
    let mut rest = numbers;
    for size in chunk_sizes(numbers.len()) {
        let take = size.min(rest.len());
        let (now, later) = rest.split_at(take);
        rest = later;
        let mut blinded = Vec::with_capacity(size * POINT_LEN);
        let mut states = Vec::with_capacity(take);
        for n in now {
            let r = OprfClient::<Ristretto255>::blind(n.as_bytes(), rng)
                .map_err(|_| BlindError::Blind)?;
            blinded.extend_from_slice(&r.message.serialize());
            states.push(r.state);
        }
        for _ in take..size {
            let mut dummy = [0u8; 16];
            rng.fill_bytes(&mut dummy);
            let r =
                OprfClient::<Ristretto255>::blind(&dummy, rng).map_err(|_| BlindError::Blind)?;
            blinded.extend_from_slice(&r.message.serialize());
        }
        chunks.push(BlindedChunk {
            numbers: now.to_vec(),
            states,
            blinded: Bytes::from(blinded),
        });
    }
    Ok(chunks)
}

impl BlindedChunk {
    /// Unblinds the relay's answer: each real number's output (the padding's are
    /// ignored), split into tag and key, dated `day`.
    pub fn finalize(
        &self,
        evaluated: &[u8],
        day: u32,
    ) -> Result<Vec<(String, CachedOutput)>, BlindError> {
        let sent = self.blinded.len() / POINT_LEN;
        if evaluated.len() != self.blinded.len() {
            return Err(BlindError::Count {
                sent,
                got: evaluated.len() / POINT_LEN,
            });
        }
        let mut out = Vec::with_capacity(self.numbers.len());
        for (index, ((number, state), point)) in self
            .numbers
            .iter()
            .zip(&self.states)
            .zip(evaluated.chunks_exact(POINT_LEN))
            .enumerate()
        {
            let element = EvaluationElement::<Ristretto255>::deserialize(point)
                .map_err(|_| BlindError::Point { index })?;
            let output = state
                .finalize(number.as_bytes(), &element)
                .map_err(|_| BlindError::Point { index })?;
            let mut full = [0u8; OUTPUT_LEN];
            full.copy_from_slice(&output);
            let (tag, key) = split_output(&full);
            out.push((number.clone(), CachedOutput { tag, key, day }));
        }
        Ok(out)
    }
}
