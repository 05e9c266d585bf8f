//! Account export (P8): everything the relay holds about an account, as one JSON
//! document in the shape of `relay/schema/account-export-v1.schema.json`.
//!
//! [`write()`] streams it: queued messages are read a page at a time and written one
//! by one, so a large mailbox never sits in memory whole. It holds no phone number
//! and no delivery token (only whether one is set), and message ciphertexts only
//! when asked for. It reads the stores as they are; the caller decides who may ask
//! (the offline admin command, or the account's own request over a transfer stream:
//! `net/export.rs`, limited by `rate_limits.exports_per_account`).

pub mod model;
#[cfg(test)]
mod tests;

use std::io::Write;

use base64::Engine as _;
use tern_platform::clock::UnixMillis;
use tern_proto::{AccountId, DeviceAddress};

use crate::error::{Error, Result};
use crate::media::bytes::hex;
use crate::store::{AccountDays, Stores, DAY_MS};
use model::{
    Charge, Discovery, EvaluationBuckets, KeyPackages, Media, Prekeys, QueueItem, RateLimits,
    Session, Upload, Verification,
};

/// The export format's version; the schema's `version` is this constant.
pub const EXPORT_VERSION: u32 = 1;

/// The export's `schema` field.
pub const EXPORT_SCHEMA: &str = "tern-account-export";

/// The JSON Schema (2020-12) of version [`EXPORT_VERSION`].
pub const SCHEMA_V1: &str = include_str!("../../schema/account-export-v1.schema.json");

/// Exports written at once, over the network and the admin API together. Each holds a
/// blocking thread while its client reads (up to [`WRITE_TIMEOUT`] a chunk):
/// unbounded, slow readers could take the blocking pool that store calls and
/// `block_in_place` hand-offs need.
pub const EXPORTS_AT_ONCE: usize = 16;

/// The retry advice of an export refused at [`EXPORTS_AT_ONCE`]: an export lasts
/// seconds to minutes.
pub const EXPORT_RETRY_MS: u64 = 10_000;

/// How long one chunk may wait for the client to read it: a client that stops
/// reading ends its export, and the writer's blocking thread with it.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Places among the exports written at once ([`EXPORTS_AT_ONCE`] on a relay).
#[derive(Debug, Clone)]
pub struct ExportGate(std::sync::Arc<tokio::sync::Semaphore>, u32);

impl ExportGate {
    /// A gate with `places` places.
    pub fn new(places: usize) -> Self {
        let places =
            u32::try_from(places.min(tokio::sync::Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        ExportGate(
            std::sync::Arc::new(tokio::sync::Semaphore::new(places as usize)),
            places,
        )
    }

    /// Waits until no export is running, at most `within`, and keeps every place
    /// taken from then on (a relay stopping starts none): an export's writer runs
    /// on a blocking thread and waits on the runtime's timers, which must outlive
    /// it. False if some were still running at the end.
    pub async fn close(&self, within: std::time::Duration) -> bool {
        match tokio::time::timeout(within, self.0.acquire_many(self.1)).await {
            Ok(Ok(all)) => {
                all.forget();
                true
            }
            _ => false,
        }
    }

    /// A place, held until the export's writer is done; `Busy` (`UNAVAILABLE`, retry
    /// after [`EXPORT_RETRY_MS`]) when every place is taken.
    pub fn enter(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().map_err(|_| Error::Busy {
            what: "as many exports as the relay writes at once are running",
            retry_after_ms: EXPORT_RETRY_MS,
        })
    }
}

impl Default for ExportGate {
    fn default() -> Self {
        Self::new(EXPORTS_AT_ONCE)
    }
}

/// Messages read from a mailbox at a time. The store reads payloads too, so a page
/// holds at most this many envelopes (4 MiB at the default 256 KiB envelope limit).
const PAGE: usize = 16;

/// What to put in an export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// Include each queued message's ciphertext (base64).
    pub include_ciphertexts: bool,
}

/// An account's open verification session: (expiry in Unix ms, checks left).
pub type PendingSession<'a> = dyn Fn(&AccountId) -> Option<(u64, u32)> + Sync + 'a;

/// State the stores do not hold, from the services that keep it in memory.
#[derive(Clone, Copy, Default)]
pub struct Live<'a> {
    /// An account's open phone verification session: its expiry (Unix ms) and the
    /// code checks it has left; none given: no session.
    pub verification_pending: Option<&'a PendingSession<'a>>,
}

impl std::fmt::Debug for Live<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("verification_pending", &self.verification_pending.is_some())
            .finish()
    }
}

/// Counts of what an export held (no identifiers), for the operator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exported {
    /// Devices.
    pub devices: u64,
    /// Queued messages.
    pub messages: u64,
}

/// A day as JSON: its number, or `null` when unknown.
fn day(d: Option<u32>) -> String {
    d.map_or_else(|| "null".to_owned(), |d| d.to_string())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn json<T: serde::Serialize>(out: &mut dyn Write, value: &T) -> Result<()> {
    serde_json::to_writer(&mut *out, value).map_err(|e| Error::Io(e.into()))
}

/// [`write_with`] without live state: no verification session is reported open.
pub fn write(
    stores: &Stores,
    account: &AccountId,
    now: UnixMillis,
    options: ExportOptions,
    out: &mut dyn Write,
) -> Result<Exported> {
    write_with(stores, account, now, options, Live::default(), out)
}

/// Writes the export of `account` to `out`; an account that does not exist is
/// [`Error::UnknownRecipient`] (and nothing is written).
pub fn write_with(
    stores: &Stores,
    account: &AccountId,
    now: UnixMillis,
    options: ExportOptions,
    live: Live<'_>,
    out: &mut dyn Write,
) -> Result<Exported> {
    let record = stores
        .accounts
        .get(account)?
        .ok_or(Error::UnknownRecipient)?;
    let token_set = stores.accounts.delivery_token(account)?.is_some();
    // The list as stored (verified when published); its devices, for `listed`.
    let list = stores.accounts.device_list(account)?;
    let list_version = list.as_ref().map_or(0, |l| l.version);
    let listed: Vec<tern_proto::DeviceId> = list
        .and_then(|l| tern_proto::DeviceList::parse(&l.list).ok())
        .map(|l| l.entries.iter().map(|e| e.id).collect())
        .unwrap_or_default();
    let days = stores
        .accounts
        .days(account)?
        .unwrap_or_else(|| AccountDays::unknown(&record));
    let tag = stores.discovery.of_account(account)?;
    let full_at = |tat: Option<u64>| tat.filter(|&t| t > now);
    let rate_limits = RateLimits {
        discovery_evaluations: EvaluationBuckets {
            account_full_at_ms: full_at(stores.discovery.bucket(account)?),
            number_full_at_ms: match &tag {
                Some((tag, _)) => full_at(stores.discovery.number_bucket(tag)?),
                None => None,
            },
        },
    };
    let session =
        live.verification_pending
            .and_then(|f| f(account))
            .map(|(expires_at_ms, attempts_left)| Session {
                expires_at_ms,
                attempts_left,
            });
    let verification = Verification {
        verified_at_day: tag.as_ref().map(|(_, r)| r.verified_at / DAY_MS),
        pending: session.is_some(),
        session,
    };
    let discovery = tag.map(|(tag, r)| Discovery {
        tag: hex(&tag.0),
        discoverable: r.discoverable,
        verified_at_day: r.verified_at / DAY_MS,
    });
    let mut exported = Exported::default();
    write!(
        out,
        r#"{{"schema":"{EXPORT_SCHEMA}","version":{EXPORT_VERSION},"generated_at_ms":{now},"account":{{"id":"{}","identity_key":"{}","created_day":{},"delivery_token_set":{token_set},"device_list_version":{list_version},"devices":["#,
        hex(account.as_bytes()),
        b64(&record.identity_key),
        day(days.created),
    )?;
    for (i, (device, key)) in record.devices.iter().enumerate() {
        let addr = DeviceAddress {
            account: *account,
            device: *device,
        };
        let published = stores.keys.published(&addr)?;
        let usage = stores.mailboxes.usage(&addr)?;
        let prekeys = Prekeys {
            identity_dh: published.identity_dh,
            signed_prekey_id: published.signed_prekey_id,
            one_time: published.one_time,
        };
        if i > 0 {
            out.write_all(b",")?;
        }
        write!(
            out,
            r#"{{"id":{},"key":"{}","primary":{},"listed":{},"created_day":{},"last_seen_day":{},"prekeys":"#,
            device.get(),
            b64(key),
            *device == tern_proto::DeviceId::PRIMARY,
            listed.contains(device),
            day(days.of(*device).created),
            day(days.of(*device).last_seen),
        )?;
        json(out, &prekeys)?;
        let counts = stores.key_packages.key_package_counts(&addr)?;
        out.write_all(br#","key_packages":"#)?;
        json(
            out,
            &KeyPackages {
                one_time: counts.one_time,
                last_resort: counts.last_resort,
            },
        )?;
        let push = stores.push.push_target(&addr)?;
        out.write_all(br#","push_target":"#)?;
        json(out, &push.map(model::PushTargetExport::from))?;
        write!(
            out,
            r#","queue":{{"messages":{},"bytes":{},"items":["#,
            usage.messages, usage.bytes
        )?;
        exported.messages += write_queue(stores, &addr, options, out)?;
        out.write_all(b"]}}")?;
        exported.devices += 1;
    }
    out.write_all(br#"]},"discovery":"#)?;
    json(out, &discovery)?;
    out.write_all(br#","verification":"#)?;
    json(out, &verification)?;
    out.write_all(br#","rate_limits":"#)?;
    json(out, &rate_limits)?;
    out.write_all(br#","media":"#)?;
    json(out, &media(stores, account)?)?;
    out.write_all(b"}")?;
    out.flush()?;
    Ok(exported)
}

/// Streams a mailbox's messages, a page at a time; returns how many.
fn write_queue(
    stores: &Stores,
    addr: &DeviceAddress,
    options: ExportOptions,
    out: &mut dyn Write,
) -> Result<u64> {
    let (mut after, mut written) = (0u64, 0u64);
    // Each page moves `after` past its last seq, so the loop ends with the mailbox.
    loop {
        let page = stores.mailboxes.read(addr, after, PAGE)?;
        let Some(last) = page.last() else {
            return Ok(written);
        };
        after = last.seq;
        for m in &page {
            if written > 0 {
                out.write_all(b",")?;
            }
            json(
                out,
                &QueueItem {
                    seq: m.seq.to_string(),
                    message_id: hex(m.message_id.as_bytes()),
                    bytes: m.payload.len() as u64,
                    accepted_at_ms: m.accepted_at,
                    expires_at_ms: m.expires_at,
                    ciphertext: options.include_ciphertexts.then(|| b64(&m.payload)),
                },
            )?;
            written += 1;
        }
    }
}

fn media(stores: &Stores, account: &AccountId) -> Result<Media> {
    let charges = stores
        .blobs
        .charges_of(account)?
        .into_iter()
        .map(|(utc_day, bytes)| Charge { utc_day, bytes })
        .collect();
    let mut uploads = Vec::new();
    for (id, size) in stores.blobs.uploads_of(account)? {
        // Finished or abandoned since the listing: not in progress any more.
        if let Some(meta) = stores.blobs.upload(account, &id)? {
            uploads.push(Upload {
                blob_id: hex(&id),
                size,
                started_at_ms: meta.started_at,
                last_progress_ms: meta.touched_at,
            });
        }
    }
    Ok(Media {
        charges,
        uploads_in_progress: uploads,
        owned_blobs: Vec::new(),
    })
}
