//! The blob index in sled, in two trees.
//!
//! `blobs` holds what a download or the sweeper needs, and no account id:
//!
//! | key | value |
//! |---|---|
//! | `B` id | size, created, last used, expires (u64 each) |
//! | `X` expires id | (empty): the expiry index |
//! | `V` | format version (u32), [`FORMAT`] |
//!
//! `blob_quota` holds what ties an account to media, each entry short-lived:
//!
//! | key | value |
//! |---|---|
//! | `P` account id | upload in progress: size, started, touched (u64 each) |
//! | `Q` account day | bytes charged, due until the end of that UTC day |
//! | `R` day account | (empty): the charges' expiry index |
//!
//! Format 1 (before the version key) kept the uploader in each `B` record (48 bytes),
//! a running total per account (`A` account) and uploads in `blobs`.
//! [`SledStore::migrate_blobs`] rewrites it at open.

use sled::transaction::{abort, ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tern_platform::clock::UnixMillis;
use tern_proto::AccountId;

use super::{backend, SledStore};
use crate::store::codec::fixed;
use crate::store::{utc_day, BlobId, BlobIndex, BlobMeta, StoreError, StoreResult, UploadMeta};

const BLOB: u8 = b'B';
const BLOB_EXPIRY: u8 = b'X';
const VERSION: u8 = b'V';
const UPLOAD: u8 = b'P';
const CHARGE: u8 = b'Q';
const CHARGE_EXPIRY: u8 = b'R';
/// Format 1's per-account totals.
const V1_TOTAL: u8 = b'A';

/// The current format of the blob trees.
pub(super) const FORMAT: u32 = 2;

fn blob_key(id: &BlobId) -> Vec<u8> {
    [&[BLOB][..], id].concat()
}

fn blob_expiry_key(expires_at: UnixMillis, id: &BlobId) -> Vec<u8> {
    [&[BLOB_EXPIRY][..], &expires_at.to_be_bytes(), id].concat()
}

fn upload_key(account: &AccountId, id: &BlobId) -> Vec<u8> {
    [&[UPLOAD][..], account.as_bytes(), id].concat()
}

fn charge_key(account: &AccountId, day: u64) -> Vec<u8> {
    [&[CHARGE][..], account.as_bytes(), &day.to_be_bytes()].concat()
}

fn charge_expiry_key(day: u64, account: &AccountId) -> Vec<u8> {
    [&[CHARGE_EXPIRY][..], &day.to_be_bytes(), account.as_bytes()].concat()
}

fn encode_blob(m: &BlobMeta) -> Vec<u8> {
    [
        m.size.to_be_bytes(),
        m.created_at.to_be_bytes(),
        m.last_used_at.to_be_bytes(),
        m.expires_at.to_be_bytes(),
    ]
    .concat()
}

fn u64_at(v: &[u8], i: usize) -> StoreResult<u64> {
    Ok(u64::from_be_bytes(fixed(
        v.get(i..i + 8).ok_or(StoreError::Corrupt("field length"))?,
    )?))
}

pub(super) fn decode_blob(v: &[u8]) -> StoreResult<BlobMeta> {
    if v.len() != 32 {
        return Err(StoreError::Corrupt("blob record"));
    }
    Ok(BlobMeta {
        size: u64_at(v, 0)?,
        created_at: u64_at(v, 8)?,
        last_used_at: u64_at(v, 16)?,
        expires_at: u64_at(v, 24)?,
    })
}

/// A format 1 record: the record and the account that uploaded it.
pub(super) fn decode_blob_v1(v: &[u8]) -> StoreResult<(BlobMeta, AccountId)> {
    if v.len() != 48 {
        return Err(StoreError::Corrupt("format 1 blob record"));
    }
    let owner = AccountId::try_from(&v[32..48]).map_err(|_| StoreError::Corrupt("blob owner"))?;
    Ok((decode_blob(&v[..32])?, owner))
}

fn encode_upload(m: &UploadMeta) -> Vec<u8> {
    [
        m.size.to_be_bytes(),
        m.started_at.to_be_bytes(),
        m.touched_at.to_be_bytes(),
    ]
    .concat()
}

pub(super) fn decode_upload(v: &[u8]) -> StoreResult<UploadMeta> {
    if v.len() != 24 {
        return Err(StoreError::Corrupt("upload record"));
    }
    Ok(UploadMeta {
        size: u64_at(v, 0)?,
        started_at: u64_at(v, 8)?,
        touched_at: u64_at(v, 16)?,
    })
}

pub(super) fn decode_charge(v: &[u8]) -> StoreResult<u64> {
    Ok(u64::from_be_bytes(fixed(v)?))
}

/// An upload key's account and blob id.
pub(super) fn parse_upload_key(k: &[u8]) -> StoreResult<(AccountId, BlobId)> {
    let account = AccountId::try_from(k.get(1..17).ok_or(StoreError::Corrupt("upload key"))?)
        .map_err(|_| StoreError::Corrupt("upload key"))?;
    Ok((
        account,
        fixed(k.get(17..).ok_or(StoreError::Corrupt("upload key"))?)?,
    ))
}

/// A charge expiry key's day and account.
fn parse_charge_expiry_key(k: &[u8]) -> StoreResult<(u64, AccountId)> {
    let day = u64_at(k, 1)?;
    let account = AccountId::try_from(k.get(9..).ok_or(StoreError::Corrupt("charge key"))?)
        .map_err(|_| StoreError::Corrupt("charge key"))?;
    Ok((day, account))
}

fn transaction_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend(e),
    }
}

impl SledStore {
    /// Brings the blob trees to [`FORMAT`]: format 1 records lose their uploader,
    /// who gets a charge instead, in one transaction with the version key, so a
    /// crash leaves either format whole. A newer format is refused.
    pub(super) fn migrate_blobs(&self) -> StoreResult<()> {
        match self.blobs.get([VERSION]).map_err(backend)? {
            Some(v) if u32::from_be_bytes(fixed(&v)?) == FORMAT => return Ok(()),
            Some(_) => return Err(StoreError::Corrupt("blob index of a newer format")),
            None => {}
        }
        let mut blobs = sled::Batch::default();
        let mut quota = sled::Batch::default();
        let mut charges = std::collections::BTreeMap::<(AccountId, u64), u64>::new();
        for kv in self.blobs.iter() {
            let (k, v) = kv.map_err(backend)?;
            match k.first() {
                Some(&BLOB) if v.len() == 48 => {
                    let (meta, owner) = decode_blob_v1(&v)?;
                    blobs.insert(k, encode_blob(&meta));
                    let charge = charges
                        .entry((owner, utc_day(meta.expires_at)))
                        .or_default();
                    *charge = charge.saturating_add(meta.size);
                }
                Some(&V1_TOTAL) => blobs.remove(k),
                Some(&UPLOAD) => {
                    quota.insert(k.clone(), v);
                    blobs.remove(k);
                }
                _ => {}
            }
        }
        blobs.insert(&[VERSION][..], &FORMAT.to_be_bytes()[..]);
        (&self.blobs, &self.blob_quota)
            .transaction(|(b, q)| {
                b.apply_batch(&blobs)?;
                q.apply_batch(&quota)?;
                for ((account, day), bytes) in &charges {
                    let key = charge_key(account, *day);
                    let before = match q.get(&key)? {
                        Some(v) => decode_charge(&v).or_else(abort)?,
                        None => 0,
                    };
                    q.insert(key, &before.saturating_add(*bytes).to_be_bytes())?;
                    q.insert(charge_expiry_key(*day, account), &[][..])?;
                }
                Ok(())
            })
            .map_err(transaction_error)?;
        self.db.flush().map_err(backend)?;
        Ok(())
    }
}

/// Callers serialise blob index changes (the relay's blob store holds a lock); a
/// change that spans both trees is one sled transaction.
impl BlobIndex for SledStore {
    fn blob(&self, id: &BlobId) -> StoreResult<Option<BlobMeta>> {
        self.blobs
            .get(blob_key(id))
            .map_err(backend)?
            .map(|v| decode_blob(&v))
            .transpose()
    }

    fn insert_blob(&self, id: &BlobId, meta: &BlobMeta, uploader: &AccountId) -> StoreResult<()> {
        let day = utc_day(meta.expires_at);
        let charge = charge_key(uploader, day);
        (&self.blobs, &self.blob_quota)
            .transaction(|(b, q)| {
                if let Some(old) = b.get(blob_key(id))? {
                    let old = decode_blob(&old).or_else(abort)?;
                    b.remove(blob_expiry_key(old.expires_at, id))?;
                }
                b.insert(blob_key(id), encode_blob(meta))?;
                b.insert(blob_expiry_key(meta.expires_at, id), &[][..])?;
                let before = match q.get(&charge)? {
                    Some(v) => decode_charge(&v).or_else(abort)?,
                    None => 0,
                };
                q.insert(
                    charge.as_slice(),
                    &before.saturating_add(meta.size).to_be_bytes(),
                )?;
                q.insert(charge_expiry_key(day, uploader), &[][..])?;
                q.remove(upload_key(uploader, id))?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(transaction_error)
    }

    fn touch_blob(
        &self,
        id: &BlobId,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Option<BlobMeta>> {
        let Some(mut meta) = self.blob(id)? else {
            return Ok(None);
        };
        let mut batch = sled::Batch::default();
        batch.remove(blob_expiry_key(meta.expires_at, id));
        meta.last_used_at = now;
        meta.expires_at = meta.expires_at.max(expires_at);
        batch.insert(blob_key(id), encode_blob(&meta));
        batch.insert(blob_expiry_key(meta.expires_at, id), &[][..]);
        self.blobs.apply_batch(batch).map_err(backend)?;
        Ok(Some(meta))
    }

    fn remove_blob(&self, id: &BlobId) -> StoreResult<Option<BlobMeta>> {
        let Some(meta) = self.blob(id)? else {
            return Ok(None);
        };
        let mut batch = sled::Batch::default();
        batch.remove(blob_key(id));
        batch.remove(blob_expiry_key(meta.expires_at, id));
        self.blobs.apply_batch(batch).map_err(backend)?;
        Ok(Some(meta))
    }

    fn expired_blobs(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<BlobId>> {
        let mut out = Vec::new();
        for kv in self.blobs.scan_prefix([BLOB_EXPIRY]).take(max) {
            let (k, _) = kv.map_err(backend)?;
            if u64_at(&k, 1)? > now {
                break;
            }
            out.push(fixed(k.get(9..).ok_or(StoreError::Corrupt("expiry key"))?)?);
        }
        Ok(out)
    }

    fn account_bytes(&self, account: &AccountId, now: UnixMillis) -> StoreResult<u64> {
        let mut sum = 0u64;
        let from = charge_key(account, utc_day(now));
        for kv in self.blob_quota.range(from..=charge_key(account, u64::MAX)) {
            let (_, v) = kv.map_err(backend)?;
            sum = sum.saturating_add(decode_charge(&v)?);
        }
        Ok(sum)
    }

    fn expire_charges(&self, now: UnixMillis, max: usize) -> StoreResult<usize> {
        let today = utc_day(now);
        let mut batch = sled::Batch::default();
        let mut n = 0;
        let first_live = [&[CHARGE_EXPIRY][..], &today.to_be_bytes()].concat();
        for kv in self
            .blob_quota
            .range(&[CHARGE_EXPIRY][..]..first_live.as_slice())
            .take(max)
        {
            let (k, _) = kv.map_err(backend)?;
            let (day, account) = parse_charge_expiry_key(&k)?;
            batch.remove(k);
            batch.remove(charge_key(&account, day));
            n += 1;
        }
        self.blob_quota.apply_batch(batch).map_err(backend)?;
        Ok(n)
    }

    fn upload(&self, account: &AccountId, id: &BlobId) -> StoreResult<Option<UploadMeta>> {
        self.blob_quota
            .get(upload_key(account, id))
            .map_err(backend)?
            .map(|v| decode_upload(&v))
            .transpose()
    }

    fn put_upload(&self, account: &AccountId, id: &BlobId, meta: &UploadMeta) -> StoreResult<()> {
        self.blob_quota
            .insert(upload_key(account, id), encode_upload(meta))
            .map_err(backend)?;
        Ok(())
    }

    fn remove_upload(&self, account: &AccountId, id: &BlobId) -> StoreResult<()> {
        self.blob_quota
            .remove(upload_key(account, id))
            .map_err(backend)?;
        Ok(())
    }

    fn uploads_of(&self, account: &AccountId) -> StoreResult<Vec<(BlobId, u64)>> {
        let mut out = Vec::new();
        let prefix = [&[UPLOAD][..], account.as_bytes()].concat();
        for kv in self.blob_quota.scan_prefix(prefix) {
            let (k, v) = kv.map_err(backend)?;
            out.push((parse_upload_key(&k)?.1, decode_upload(&v)?.size));
        }
        Ok(out)
    }

    fn flush_blobs(&self) -> StoreResult<()> {
        crate::store::Flush::flush(self)
    }

    fn stale_uploads(
        &self,
        before: UnixMillis,
        max: usize,
    ) -> StoreResult<Vec<(AccountId, BlobId)>> {
        let mut out = Vec::new();
        for kv in self.blob_quota.scan_prefix([UPLOAD]) {
            if out.len() >= max {
                break;
            }
            let (k, v) = kv.map_err(backend)?;
            if decode_upload(&v)?.touched_at < before {
                out.push(parse_upload_key(&k)?);
            }
        }
        Ok(out)
    }

    fn charges_of(&self, account: &AccountId) -> StoreResult<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for kv in self
            .blob_quota
            .scan_prefix([&[CHARGE][..], account.as_bytes()].concat())
        {
            let (k, v) = kv.map_err(backend)?;
            let day = k.get(17..).ok_or(StoreError::Corrupt("charge key"))?;
            out.push((u64::from_be_bytes(fixed(day)?), decode_charge(&v)?));
        }
        Ok(out)
    }

    fn remove_account_media(&self, account: &AccountId) -> StoreResult<Vec<BlobId>> {
        // One batch in one tree: the charges, their expiry entries and the uploads go
        // together or not at all.
        let mut batch = sled::Batch::default();
        for (day, _) in self.charges_of(account)? {
            batch.remove(charge_key(account, day));
            batch.remove(charge_expiry_key(day, account));
        }
        let mut uploads = Vec::new();
        for kv in self
            .blob_quota
            .scan_prefix([&[UPLOAD][..], account.as_bytes()].concat())
        {
            let (k, _) = kv.map_err(backend)?;
            uploads.push(parse_upload_key(&k)?.1);
            batch.remove(k);
        }
        self.blob_quota.apply_batch(batch).map_err(backend)?;
        Ok(uploads)
    }

    fn blob_bytes(&self) -> StoreResult<Option<u64>> {
        let mut total = 0u64;
        for kv in self.blobs.scan_prefix([BLOB]) {
            let (_, v) = kv.map_err(backend)?;
            total = total.saturating_add(decode_blob(&v)?.size);
        }
        Ok(Some(total))
    }
}
