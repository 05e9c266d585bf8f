//! Contact discovery as bytes: tags, filter keys, the batches a client sends, and the
//! published filter's two encodings (a snapshot and a daily delta) with decoders that
//! check every field before use.
//!
//! An OPRF output (RFC 9497, ristretto255-SHA512: 64 bytes) is split by
//! [`split_output`] into a [`Tag`] (bytes 0..16, what a lookup names) and a
//! [`FilterKey`] (bytes 16..24, what the published filter holds). The two come from
//! separate bytes, so the published keys never let anyone make a lookup.
//!
//! The OPRF's input is the number in E.164 with its `+`, as ASCII bytes
//! (`b"+15550000001"`): client and relay must agree on it byte for byte.
//!
//! No cryptography here: whether a point is a valid ristretto255 encoding is the
//! relay's check.

use bytes::Bytes;
use xorf::{BinaryFuse32, Descriptor, Filter};

use crate::code::ErrorCode;
use crate::error::{Malformed, Problem};

/// Length of a compressed ristretto255 point (blinded or evaluated element).
pub const POINT_LEN: usize = 32;
/// Length of a discovery tag.
pub const TAG_LEN: usize = 16;
/// Length of an OPRF output (SHA-512).
pub const OUTPUT_LEN: usize = 64;
/// Most points in one evaluation batch; a larger batch is `TOO_LARGE`.
pub const MAX_DISCOVERY_BATCH: usize = 4096;
/// Most tags in one lookup; more is `TOO_LARGE`.
pub const MAX_LOOKUP_TAGS: usize = 256;
/// Largest `data` of one filter part: fits an unauthenticated frame with room to spare.
pub const MAX_FILTER_PART: usize = 192 * 1024;
/// Most slots a decoded snapshot may have (1 GiB of fingerprints; ~230M users).
pub const MAX_FILTER_SLOTS: u32 = 1 << 28;

const SNAPSHOT_MAGIC: &[u8; 4] = b"TDF1";
const DELTA_MAGIC: &[u8; 4] = b"TDD1";
const SNAPSHOT_HEADER: usize = 36;
const DELTA_HEADER: usize = 20;
const MAX_SEGMENT_LENGTH: u32 = 1 << 18;

/// A discovery tag: the first 16 bytes of a number's OPRF output. The relay keeps
/// tags, never numbers.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(pub [u8; TAG_LEN]);

impl std::fmt::Debug for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A tag names a person's number to anyone holding the OPRF key: never printed.
        f.write_str("Tag(..)")
    }
}

/// A published filter key: bytes 16..24 of an OPRF output, little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FilterKey(pub u64);

/// Splits an OPRF output into its tag and its filter key.
pub fn split_output(out: &[u8; OUTPUT_LEN]) -> (Tag, FilterKey) {
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&out[..TAG_LEN]);
    let mut key = [0u8; 8];
    key.copy_from_slice(&out[TAG_LEN..TAG_LEN + 8]);
    (Tag(tag), FilterKey(u64::from_le_bytes(key)))
}

/// A client's blinded points: a non-zero power of two of them, at most
/// [`MAX_DISCOVERY_BATCH`], 32 bytes each (not yet checked to be points).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlindedBatch(Bytes);

impl BlindedBatch {
    /// Checks the length: a multiple of 32, a power of two of points, at most 4096
    /// (`TOO_LARGE` above, `BAD_REQUEST` otherwise).
    pub fn new(bytes: Bytes) -> Result<Self, Malformed> {
        const FIELD: &str = "discovery_evaluate.blinded";
        let points = bytes.len() / POINT_LEN;
        if points > MAX_DISCOVERY_BATCH {
            return Err(Malformed::new(
                FIELD,
                Problem::TooMany {
                    what: "blinded points",
                    got: points,
                    max: MAX_DISCOVERY_BATCH,
                },
                ErrorCode::TooLarge,
            ));
        }
        if bytes.len() % POINT_LEN != 0 || !points.is_power_of_two() {
            return Err(Malformed::new(
                FIELD,
                Problem::Missing("a power of two of 32-byte points"),
                ErrorCode::BadRequest,
            ));
        }
        Ok(BlindedBatch(bytes))
    }

    /// The raw bytes, 32 per point.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// How many points (the padded batch size the relay charges).
    pub fn len(&self) -> usize {
        self.0.len() / POINT_LEN
    }

    /// Never true for a checked batch; here for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

/// Tags from wire bytes: a multiple of 16, 1..=[`MAX_LOOKUP_TAGS`] of them.
pub fn tags_from_bytes(bytes: &[u8], field: &'static str) -> Result<Vec<Tag>, Malformed> {
    let count = bytes.len() / TAG_LEN;
    if count > MAX_LOOKUP_TAGS {
        return Err(Malformed::new(
            field,
            Problem::TooMany {
                what: "tags",
                got: count,
                max: MAX_LOOKUP_TAGS,
            },
            ErrorCode::TooLarge,
        ));
    }
    if bytes.len() % TAG_LEN != 0 || count == 0 {
        return Err(Malformed::new(
            field,
            Problem::Missing("one or more 16-byte tags"),
            ErrorCode::BadRequest,
        ));
    }
    Ok(bytes
        .chunks_exact(TAG_LEN)
        .map(|c| {
            let mut t = [0u8; TAG_LEN];
            t.copy_from_slice(c);
            Tag(t)
        })
        .collect())
}

/// Tags as wire bytes.
pub fn tags_to_bytes(tags: &[Tag]) -> Bytes {
    tags.iter().flat_map(|t| t.0).collect::<Vec<u8>>().into()
}

/// Which artefact a filter part belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilterKind {
    /// A whole filter ([`FilterSnapshot`]).
    Snapshot,
    /// Concatenated daily deltas ([`FilterDelta`]), oldest first.
    Deltas,
}

/// One part of a published artefact, as a relay serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterPart {
    /// The day of the artefact (the snapshot's day, or the last delta's).
    pub day: u32,
    /// Snapshot or deltas.
    pub kind: FilterKind,
    /// How many parts the artefact has (at least 1).
    pub parts: u32,
    /// This part, from 0.
    pub part: u32,
    /// At most [`MAX_FILTER_PART`] bytes of the artefact.
    pub data: Bytes,
}

/// An account found by a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredAccount {
    /// The tag asked for.
    pub tag: Tag,
    /// The account holding it.
    pub account: crate::ids::AccountId,
    /// Its Ed25519 identity key.
    pub identity_key: [u8; crate::limits::PUBLIC_KEY_LEN],
}

/// Why a published filter file does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FilterDecodeError {
    /// Shorter than its header or than the lengths it states.
    #[error("truncated filter data")]
    Truncated,
    /// Bytes left over after the stated content.
    #[error("trailing bytes after the filter data")]
    Trailing,
    /// Not a Tern filter of this version.
    #[error("unknown filter magic")]
    Magic,
    /// The descriptor cannot belong to a filter (it would index out of bounds).
    #[error("inconsistent filter descriptor")]
    Descriptor,
    /// More slots than [`MAX_FILTER_SLOTS`].
    #[error("filter too large")]
    TooLarge,
    /// The bitmap marks a slot whose value is zero, or the counts disagree.
    #[error("bitmap and values disagree")]
    Bitmap,
    /// A delta's key lists are not sorted and distinct, or share a key.
    #[error("delta keys not sorted and distinct")]
    Unsorted,
    /// Consecutive deltas do not chain (a day missing).
    #[error("deltas do not follow one another")]
    Chain,
}

/// A day's whole filter of discoverable filter keys.
#[derive(Debug, Clone)]
pub struct FilterSnapshot {
    /// Days since the Unix epoch (UTC) of the key set.
    pub day: u32,
    /// How many keys went in.
    pub keys: u32,
    /// The filter.
    pub filter: BinaryFuse32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The most slots a BinaryFuse32 of `keys` keys has. xorf (arity 3) makes
/// `(max(⌈capacity / L⌉, 3) − 2 + 2) · L` slots, capacity = round(keys · factor) with
/// factor ≤ 5.86 (at 2 keys; less for more) and segment length
/// L = 2^⌊log₃.₃₃ keys + 2.25⌋ ≤ 4.76 · keys^0.58: below 21 · keys + 12. From 2^16
/// keys the factor is at most 1.19 and L at most 2^18, so the slots are below
/// 1.19 · keys + 1 + 3 · 2^18: the bound there is 1.3 · keys + 3 · 2^18, which keeps
/// what a hostile snapshot can make a client allocate near the bytes it sent (4 per
/// key) rather than 8 times them. The bounds leave room for the formula to change a
/// little.
pub fn max_slots(keys: usize) -> usize {
    if keys < 1 << 16 {
        keys.max(1).saturating_mul(32).saturating_add(64)
    } else {
        (keys / 10)
            .saturating_mul(13)
            .saturating_add(13)
            .saturating_add(3 * MAX_SEGMENT_LENGTH as usize)
    }
}

/// How many of a built filter's keys may have a zero value (left out of the
/// encoding): each has odds of 2^-32, so this many never happens by chance.
fn zero_values_allowed(keys: usize) -> usize {
    4 + keys / (1 << 16)
}

impl FilterSnapshot {
    /// Builds the filter of `keys` (sorted and deduplicated here; any order in).
    pub fn build(day: u32, mut keys: Vec<u64>) -> Result<Self, &'static str> {
        keys.sort_unstable();
        keys.dedup();
        let n = u32::try_from(keys.len()).map_err(|_| "too many keys")?;
        let filter = BinaryFuse32::try_from(&keys)?;
        Ok(FilterSnapshot {
            day,
            keys: n,
            filter,
        })
    }

    /// Whether `key` may be in the set (false positives at about 2^-32).
    pub fn contains(&self, key: FilterKey) -> bool {
        self.filter.contains(&key.0)
    }

    /// `"TDF1" | day | n | seed u64 | seg_len | seg_mask | seg_count_len | slots |
    /// bitmap of non-zero slots (LSB first) | non-zero values`, all little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let d = &self.filter.descriptor;
        let fp = &self.filter.fingerprints;
        let nonzero = fp.iter().filter(|v| **v != 0).count();
        let mut out = Vec::with_capacity(SNAPSHOT_HEADER + fp.len().div_ceil(8) + 4 * nonzero);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&self.day.to_le_bytes());
        out.extend_from_slice(&self.keys.to_le_bytes());
        out.extend_from_slice(&d.seed.to_le_bytes());
        out.extend_from_slice(&d.segment_length.to_le_bytes());
        out.extend_from_slice(&d.segment_length_mask.to_le_bytes());
        out.extend_from_slice(&d.segment_count_length.to_le_bytes());
        // Slots fit u32: xorf sizes the array in u32 arithmetic.
        out.extend_from_slice(&(fp.len() as u32).to_le_bytes());
        let mut bitmap = vec![0u8; fp.len().div_ceil(8)];
        for (i, v) in fp.iter().enumerate() {
            if *v != 0 {
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        out.extend_from_slice(&bitmap);
        for v in fp.iter().filter(|v| **v != 0) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Decodes and checks a snapshot: a descriptor that keeps every lookup in
    /// bounds, a bitmap whose popcount is the number of (non-zero) values, nothing
    /// left over.
    pub fn decode(b: &[u8]) -> Result<Self, FilterDecodeError> {
        if b.len() < SNAPSHOT_HEADER {
            return Err(FilterDecodeError::Truncated);
        }
        if &b[..4] != SNAPSHOT_MAGIC {
            return Err(FilterDecodeError::Magic);
        }
        let day = u32_at(b, 4);
        let keys = u32_at(b, 8);
        let seed = u64_at(b, 12);
        let seg_len = u32_at(b, 20);
        let seg_mask = u32_at(b, 24);
        let seg_count_len = u32_at(b, 28);
        let slots = u32_at(b, 32);
        if slots > MAX_FILTER_SLOTS {
            return Err(FilterDecodeError::TooLarge);
        }
        // h0 < seg_count_len, h1 and h2 one and two aligned segments on: in bounds
        // exactly when the array is seg_count_len + 2 segments, segment-aligned, with
        // at least one segment counted (with none, xorf's hashes index past the end).
        let descriptor_ok = seg_len.is_power_of_two()
            && seg_len <= MAX_SEGMENT_LENGTH
            && seg_mask == seg_len - 1
            && seg_count_len >= seg_len
            && seg_count_len % seg_len == 0
            && u64::from(seg_count_len) + 2 * u64::from(seg_len) == u64::from(slots)
            && keys <= slots;
        if !descriptor_ok {
            return Err(FilterDecodeError::Descriptor);
        }
        let slots = slots as usize;
        let bitmap_len = slots.div_ceil(8);
        let rest = &b[SNAPSHOT_HEADER..];
        if rest.len() < bitmap_len {
            return Err(FilterDecodeError::Truncated);
        }
        let (bitmap, values) = rest.split_at(bitmap_len);
        if slots % 8 != 0 && bitmap[bitmap_len - 1] >> (slots % 8) != 0 {
            return Err(FilterDecodeError::Bitmap);
        }
        let nonzero: usize = bitmap.iter().map(|x| x.count_ones() as usize).sum();
        match values.len().cmp(&(4 * nonzero)) {
            std::cmp::Ordering::Less => return Err(FilterDecodeError::Truncated),
            std::cmp::Ordering::Greater => return Err(FilterDecodeError::Trailing),
            std::cmp::Ordering::Equal => {}
        }
        // Before the slot array is allocated (4 bytes a slot), the slots must be what
        // the values present can justify: a built filter gives a value to exactly one
        // slot per key (zero, so left out, with odds 2^-32 each), and has at most
        // `max_slots(keys)` slots. Without this, a header and a zero bitmap of 32 MiB
        // would cost a 1 GiB allocation.
        let keys_us = keys as usize;
        if nonzero > keys_us || keys_us - nonzero > zero_values_allowed(keys_us) {
            return Err(FilterDecodeError::Bitmap);
        }
        if slots > max_slots(keys_us) {
            return Err(FilterDecodeError::Descriptor);
        }
        let mut fingerprints = vec![0u32; slots].into_boxed_slice();
        let mut next = values.chunks_exact(4);
        for (i, slot) in fingerprints.iter_mut().enumerate() {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                let v = next
                    .next()
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .ok_or(FilterDecodeError::Bitmap)?;
                if v == 0 {
                    return Err(FilterDecodeError::Bitmap);
                }
                *slot = v;
            }
        }
        Ok(FilterSnapshot {
            day,
            keys,
            filter: BinaryFuse32 {
                descriptor: Descriptor {
                    seed,
                    segment_length: seg_len,
                    segment_length_mask: seg_mask,
                    segment_count_length: seg_count_len,
                },
                fingerprints,
            },
        })
    }
}

/// One day's change of the key set: keys added and removed since `base_day`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FilterDelta {
    /// The day the delta applies to.
    pub base_day: u32,
    /// The day it brings the set to.
    pub day: u32,
    /// Keys added, sorted and distinct.
    pub added: Vec<u64>,
    /// Keys removed, sorted and distinct.
    pub removed: Vec<u64>,
}

fn sorted_distinct(keys: &[u64]) -> bool {
    keys.windows(2).all(|w| w[0] < w[1])
}

fn disjoint(a: &[u64], b: &[u64]) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => return false,
        }
    }
    true
}

impl FilterDelta {
    /// The delta between two sorted, distinct key lists, in one merge.
    pub fn between(base_day: u32, old: &[u64], day: u32, new: &[u64]) -> Self {
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            match (old.get(i), new.get(j)) {
                (Some(o), Some(n)) if o == n => {
                    i += 1;
                    j += 1;
                }
                (Some(o), Some(n)) if o < n => {
                    removed.push(*o);
                    i += 1;
                }
                (Some(_), Some(n)) | (None, Some(n)) => {
                    added.push(*n);
                    j += 1;
                }
                (Some(o), None) => {
                    removed.push(*o);
                    i += 1;
                }
                (None, None) => break,
            }
        }
        FilterDelta {
            base_day,
            day,
            added,
            removed,
        }
    }

    /// `"TDD1" | base_day | day | added count | removed count | added u64… |
    /// removed u64…`, little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// The length of [`FilterDelta::encode`].
    pub fn encoded_len(&self) -> usize {
        DELTA_HEADER + 8 * (self.added.len() + self.removed.len())
    }

    /// Appends the encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(DELTA_MAGIC);
        out.extend_from_slice(&self.base_day.to_le_bytes());
        out.extend_from_slice(&self.day.to_le_bytes());
        out.extend_from_slice(&(self.added.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.removed.len() as u32).to_le_bytes());
        for k in self.added.iter().chain(&self.removed) {
            out.extend_from_slice(&k.to_le_bytes());
        }
    }

    /// Decodes one delta from the front of `b`; returns it and the rest.
    pub fn decode_prefix(b: &[u8]) -> Result<(Self, &[u8]), FilterDecodeError> {
        if b.len() < DELTA_HEADER {
            return Err(FilterDecodeError::Truncated);
        }
        if &b[..4] != DELTA_MAGIC {
            return Err(FilterDecodeError::Magic);
        }
        let base_day = u32_at(b, 4);
        let day = u32_at(b, 8);
        let added_n = u32_at(b, 12) as usize;
        let removed_n = u32_at(b, 16) as usize;
        let body = added_n
            .checked_add(removed_n)
            .and_then(|n| n.checked_mul(8))
            .ok_or(FilterDecodeError::Truncated)?;
        let rest = &b[DELTA_HEADER..];
        if rest.len() < body {
            return Err(FilterDecodeError::Truncated);
        }
        let keys: Vec<u64> = rest[..body].chunks_exact(8).map(|c| u64_at(c, 0)).collect();
        let (added, removed) = keys.split_at(added_n);
        if !sorted_distinct(added) || !sorted_distinct(removed) || !disjoint(added, removed) {
            return Err(FilterDecodeError::Unsorted);
        }
        let delta = FilterDelta {
            base_day,
            day,
            added: added.to_vec(),
            removed: removed.to_vec(),
        };
        Ok((delta, &rest[body..]))
    }

    /// Decodes exactly one delta.
    pub fn decode(b: &[u8]) -> Result<Self, FilterDecodeError> {
        match Self::decode_prefix(b)? {
            (d, []) => Ok(d),
            _ => Err(FilterDecodeError::Trailing),
        }
    }

    /// Decodes concatenated deltas, each starting on the day the one before ends.
    pub fn decode_all(mut b: &[u8]) -> Result<Vec<Self>, FilterDecodeError> {
        let mut out: Vec<FilterDelta> = Vec::new();
        while !b.is_empty() {
            let (d, rest) = Self::decode_prefix(b)?;
            if out.last().is_some_and(|p| p.day != d.base_day) {
                return Err(FilterDecodeError::Chain);
            }
            out.push(d);
            b = rest;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
