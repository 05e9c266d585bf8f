//! One discovery sync over any transport (the relay connection, or a fake in
//! tests): evaluate what is new, refresh the filter, look up the hits. Every
//! evaluation the relay answered is cached before any error is returned: the relay
//! charged it, so a retry must not pay for it again.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use rand::rngs::OsRng;
use tern_proto::discovery::{
    DiscoveredAccount, FilterDelta, FilterKind, FilterPart, FilterSnapshot, Tag, MAX_FILTER_PART,
    MAX_FILTER_SLOTS, MAX_LOOKUP_TAGS,
};
use tern_proto::AccountId;

use super::DiscoveryReport;
use crate::discovery::{self, BlindedChunk, CachedOutput, DiscoveryError, LocalFilter};
use crate::net::RelayConnection;
use crate::store::KvStore;
use crate::{Error, ErrorCode, Result};

/// Filter downloads restarted when the relay publishes a new day mid-download (or
/// its deltas do not follow the stored filter).
const FILTER_ATTEMPTS: u32 = 3;
/// Filter part requests in flight at once.
const PARTS_IN_FLIGHT: usize = 8;
/// Most parts an artefact can have: a snapshot of [`MAX_FILTER_SLOTS`] 4-byte
/// fingerprints plus its header (deltas larger than the snapshot are never sent),
/// in parts of [`MAX_FILTER_PART`]: 5,462. More is a broken or hostile relay.
pub(crate) const MAX_FILTER_PARTS: u32 =
    ((MAX_FILTER_SLOTS as usize * 4 + 4096).div_ceil(MAX_FILTER_PART)) as u32;

/// A reply on its way; the request left when the method was called.
pub(crate) type Pending<T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'static>>;

/// The discovery requests a sync makes.
pub(crate) trait Transport {
    /// Evaluates a batch of blinded points.
    fn evaluate(&self, blinded: Bytes) -> Pending<Bytes>;
    /// One part of the published filter.
    fn filter(&self, since_day: u32, day: u32, part: u32) -> Pending<FilterPart>;
    /// Looks up tags.
    fn lookup(&self, tags: Vec<Tag>) -> Pending<Vec<DiscoveredAccount>>;
}

impl Transport for RelayConnection {
    fn evaluate(&self, blinded: Bytes) -> Pending<Bytes> {
        Box::pin(self.discovery_evaluate(blinded))
    }
    fn filter(&self, since_day: u32, day: u32, part: u32) -> Pending<FilterPart> {
        Box::pin(self.discovery_filter(since_day, day, part))
    }
    fn lookup(&self, tags: Vec<Tag>) -> Pending<Vec<DiscoveredAccount>> {
        Box::pin(self.discovery_lookup(tags))
    }
}

/// What a sync found: the report, and the accounts to add as contacts.
pub(crate) struct Synced {
    pub(crate) report: DiscoveryReport,
    pub(crate) found: Vec<(AccountId, [u8; 32])>,
}

/// Syncs `numbers` (see `Client::discover`); `me` is left out of what is found.
pub(crate) async fn sync<T: Transport + ?Sized, S: AsRef<str>>(
    t: &T,
    kv: &dyn KvStore,
    numbers: &[S],
    default_region: &str,
    day: u32,
    me: AccountId,
) -> Result<Synced> {
    let mut report = DiscoveryReport::default();
    let mut book = BTreeMap::new();
    for n in numbers {
        match discovery::normalise(n.as_ref(), default_region) {
            Some(e164) => {
                book.insert(e164, ());
            }
            None => report.invalid.push(n.as_ref().to_owned()),
        }
    }
    let mut outputs: HashMap<String, CachedOutput> = HashMap::new();
    let mut new = Vec::new();
    for e164 in book.into_keys() {
        match discovery::cached(kv, &e164)? {
            Some(o) => {
                outputs.insert(e164, o);
            }
            None => new.push(e164),
        }
    }
    report.evaluated = new.len();
    let chunks = tokio::task::spawn_blocking(move || discovery::blind(&new, &mut OsRng))
        .await
        .map_err(|_| Error::Protocol("blinding stopped".into()))?
        .map_err(DiscoveryError::from)?;
    // Batches and the filter leave together (one round trip); both run to their
    // end, so a filter failure loses no answered evaluation.
    let ((fresh, failed), filter) =
        tokio::join!(evaluate(t, kv, &chunks, day), refresh_filter(t, kv));
    if let Some(e) = failed {
        return Err(e);
    }
    let filter = filter?;
    outputs.extend(fresh);
    let hits: HashMap<Tag, String> = outputs
        .into_iter()
        .filter(|(_, o)| filter.contains(o.key))
        .map(|(n, o)| (o.tag, n))
        .collect();
    let tags: Vec<Tag> = hits.keys().copied().collect();
    let lookups: Vec<_> = tags
        .chunks(MAX_LOOKUP_TAGS)
        .map(|c| t.lookup(c.to_vec()))
        .collect();
    let mut found = Vec::new();
    for lookup in lookups {
        for a in lookup.await? {
            if a.account == me {
                continue;
            }
            if let Some(number) = hits.get(&a.tag) {
                report.found.push((number.clone(), a.account));
                found.push((a.account, a.identity_key));
            }
        }
    }
    report.found.sort();
    Ok(Synced { report, found })
}

/// Sends every batch, then awaits every reply and caches each answered one; the
/// outputs, and the first error if any.
async fn evaluate<T: Transport + ?Sized>(
    t: &T,
    kv: &dyn KvStore,
    chunks: &[BlindedChunk],
    day: u32,
) -> (HashMap<String, CachedOutput>, Option<Error>) {
    let replies: Vec<_> = chunks
        .iter()
        .map(|c| t.evaluate(c.blinded.clone()))
        .collect();
    let mut outputs = HashMap::new();
    let mut first = None;
    for (chunk, reply) in chunks.iter().zip(replies) {
        let done = match reply.await {
            Ok(points) => chunk
                .finalize(&points, day)
                .map_err(|e| Error::from(DiscoveryError::from(e)))
                .and_then(|out| {
                    discovery::cache(kv, &out)?;
                    Ok(out)
                }),
            Err(e) => Err(e),
        };
        match done {
            Ok(out) => outputs.extend(out),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    (outputs, first)
}

/// Brings the stored filter up to the relay's latest day (deltas if it keeps them
/// back to ours and they stay small, else a snapshot), stores it and returns it.
/// Deltas that do not follow the stored filter drop it for a snapshot.
pub(crate) async fn refresh_filter<T: Transport + ?Sized>(
    t: &T,
    kv: &dyn KvStore,
) -> Result<LocalFilter> {
    let mut local = discovery::load_filter(kv)?;
    let mut attempt = 0;
    loop {
        let since = match &local {
            Some(f) if !f.wants_snapshot() => f.day(),
            _ => 0,
        };
        let data = match download(t, since).await {
            Ok(d) => d,
            // A new day was published meanwhile: start again.
            Err(e)
                if attempt + 1 < FILTER_ATTEMPTS && e.relay_code() == Some(ErrorCode::NotFound) =>
            {
                attempt += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        let (kind, data) = data;
        let filter = match (kind, local.take()) {
            (FilterKind::Deltas, Some(mut f)) => {
                if !data.is_empty() {
                    let deltas = FilterDelta::decode_all(&data)
                        .map_err(|e| DiscoveryError::Filter(e.into()))?;
                    let mut gap = None;
                    for d in &deltas {
                        if let Err(e) = f.apply(d) {
                            gap = Some(e);
                            break;
                        }
                    }
                    if let Some(e) = gap {
                        if attempt + 1 < FILTER_ATTEMPTS {
                            // `local` is now None: the next round takes a snapshot.
                            attempt += 1;
                            continue;
                        }
                        return Err(DiscoveryError::Filter(e).into());
                    }
                    discovery::store_filter(kv, &f, false)?;
                }
                f
            }
            (FilterKind::Deltas, None) => return Err(DiscoveryError::DeltasWithoutSnapshot.into()),
            (FilterKind::Snapshot, _) => {
                let snapshot =
                    FilterSnapshot::decode(&data).map_err(|e| DiscoveryError::Filter(e.into()))?;
                let f = LocalFilter::new(snapshot);
                discovery::store_filter(kv, &f, true)?;
                f
            }
        };
        return Ok(filter);
    }
}

/// Downloads one artefact: its kind and bytes. The part count is bounded and every
/// part must match the first's day, kind and count; at most [`PARTS_IN_FLIGHT`]
/// requests are out at once.
async fn download<T: Transport + ?Sized>(t: &T, since: u32) -> Result<(FilterKind, Vec<u8>)> {
    let first = t.filter(since, 0, 0).await?;
    if first.parts > MAX_FILTER_PARTS {
        return Err(DiscoveryError::TooManyParts {
            parts: first.parts,
            max: MAX_FILTER_PARTS,
        }
        .into());
    }
    let fits = |p: &FilterPart, part: u32| {
        p.day == first.day
            && p.kind == first.kind
            && p.parts == first.parts
            && p.part == part
            && p.data.len() <= MAX_FILTER_PART
    };
    if !fits(&first, 0) {
        return Err(DiscoveryError::PartMismatch { part: 0 }.into());
    }
    let mut data = first.data.to_vec();
    let mut pending = VecDeque::new();
    let mut next = 1;
    loop {
        while next < first.parts && pending.len() < PARTS_IN_FLIGHT {
            pending.push_back((next, t.filter(since, first.day, next)));
            next += 1;
        }
        let Some((part, reply)) = pending.pop_front() else {
            break;
        };
        let p = reply.await?;
        if !fits(&p, part) {
            return Err(DiscoveryError::PartMismatch { part }.into());
        }
        data.extend_from_slice(&p.data);
    }
    Ok((first.kind, data))
}
