//! Enumeration for `tern-relay admin migrate`: what the store traits cannot list
//! (every account, every device with keys, every blob, charge and upload, the raw
//! discovery records, every mailbox). Read on a stopped relay's store.

use tern_proto::discovery::Tag;
use tern_proto::{AccountId, DeviceAddress};

use super::blobs::{decode_blob, decode_charge, decode_upload, parse_upload_key};
use super::{backend, fixed, parse_addr, tagged, SledStore, ADDR_LEN, USAGE};
use crate::store::{
    codec, seq, BlobId, BlobMeta, OneTimeKey, SignedKey, StoreError, StoreResult, TagRecord,
    UploadMeta,
};

/// The keys one device published, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceKeysDump {
    /// Its identity agreement key.
    pub identity_dh: Option<SignedKey>,
    /// Its signed prekey.
    pub signed_prekey: Option<SignedKey>,
    /// Its one-time prekeys, by id.
    pub one_time: Vec<OneTimeKey>,
}

/// The discovery tree's records, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryDump {
    /// Tags and their records.
    pub tags: Vec<(Tag, TagRecord)>,
    /// Per account: the tag it holds (`None` once the number moved on) and its
    /// evaluation bucket's TAT.
    pub accounts: Vec<(AccountId, Option<Tag>, Option<u64>)>,
    /// Number buckets by their hashed key: TAT and, when detached, the sweep's
    /// deadline (0 until a sweep saw it).
    pub numbers: Vec<([u8; 16], u64, Option<u64>)>,
}

fn le(v: &[u8]) -> StoreResult<u64> {
    Ok(u64::from_le_bytes(fixed(v)?))
}

impl SledStore {
    /// Every account id with a record, in id order.
    pub fn dump_account_ids(&self) -> StoreResult<Vec<AccountId>> {
        keys_as_accounts(&self.accounts)
    }

    /// Every account id with a delivery token hash (with or without a record).
    pub fn dump_token_ids(&self) -> StoreResult<Vec<AccountId>> {
        keys_as_accounts(&self.tokens)
    }

    /// Every device that published any key, in address order.
    pub fn dump_key_devices(&self) -> StoreResult<Vec<DeviceAddress>> {
        // Keys sort by kind, then address: one set across the kinds.
        let mut seen = std::collections::BTreeSet::new();
        for k in self.keys.iter().keys() {
            let k = k.map_err(backend)?;
            let addr: [u8; ADDR_LEN] =
                fixed(k.get(1..1 + ADDR_LEN).ok_or(StoreError::Corrupt("key"))?)?;
            seen.insert(addr);
        }
        seen.iter().map(|a| parse_addr(a)).collect()
    }

    /// What `of` published, one-time keys included (none taken).
    pub fn dump_keys(&self, of: &DeviceAddress) -> StoreResult<DeviceKeysDump> {
        let get = |tag| -> StoreResult<Option<SignedKey>> {
            self.keys
                .get(tagged(tag, of))
                .map_err(backend)?
                .map(|v| codec::decode_signed(&v))
                .transpose()
        };
        let mut one_time = Vec::new();
        for kv in self.keys.scan_prefix(tagged(b'O', of)) {
            let (k, v) = kv.map_err(backend)?;
            one_time.push(OneTimeKey {
                id: u32::from_be_bytes(fixed(&k[1 + ADDR_LEN..])?),
                key: fixed(&v)?,
            });
        }
        Ok(DeviceKeysDump {
            identity_dh: get(b'I')?,
            signed_prekey: get(b'S')?,
            one_time,
        })
    }

    /// Every blob record.
    pub fn dump_blobs(&self) -> StoreResult<Vec<(BlobId, BlobMeta)>> {
        let mut out = Vec::new();
        for kv in self.blobs.scan_prefix([b'B']) {
            let (k, v) = kv.map_err(backend)?;
            out.push((fixed(&k[1..])?, decode_blob(&v)?));
        }
        Ok(out)
    }

    /// Every charge: account, UTC day, bytes.
    pub fn dump_charges(&self) -> StoreResult<Vec<(AccountId, u64, u64)>> {
        let mut out = Vec::new();
        for kv in self.blob_quota.scan_prefix([b'Q']) {
            let (k, v) = kv.map_err(backend)?;
            if k.len() != 1 + 16 + 8 {
                return Err(StoreError::Corrupt("charge key"));
            }
            let account =
                AccountId::try_from(&k[1..17]).map_err(|_| StoreError::Corrupt("charge key"))?;
            out.push((
                account,
                u64::from_be_bytes(fixed(&k[17..])?),
                decode_charge(&v)?,
            ));
        }
        Ok(out)
    }

    /// Every upload in progress.
    pub fn dump_uploads(&self) -> StoreResult<Vec<(AccountId, BlobId, UploadMeta)>> {
        let mut out = Vec::new();
        for kv in self.blob_quota.scan_prefix([b'P']) {
            let (k, v) = kv.map_err(backend)?;
            let (account, id) = parse_upload_key(&k)?;
            out.push((account, id, decode_upload(&v)?));
        }
        Ok(out)
    }

    /// The discovery tree, decoded.
    pub fn dump_discovery(&self) -> StoreResult<DiscoveryDump> {
        let mut dump = DiscoveryDump::default();
        let bad = || StoreError::Corrupt("discovery record");
        for kv in self.discovery.scan_prefix([b'T']) {
            let (k, v) = kv.map_err(backend)?;
            dump.tags
                .push((Tag(fixed(&k[1..])?), super::discovery::decode(&v)?));
        }
        let mut accounts: std::collections::BTreeMap<[u8; 16], (Option<Tag>, Option<u64>)> =
            Default::default();
        for kv in self.discovery.scan_prefix([b'A']) {
            let (k, v) = kv.map_err(backend)?;
            accounts.entry(fixed(&k[1..])?).or_default().0 = Some(Tag(fixed(&v)?));
        }
        for kv in self.discovery.scan_prefix([b'B']) {
            let (k, v) = kv.map_err(backend)?;
            accounts.entry(fixed(&k[1..])?).or_default().1 = Some(le(&v)?);
        }
        for (a, (tag, tat)) in accounts {
            let account = AccountId::try_from(&a[..]).map_err(|_| bad())?;
            dump.accounts.push((account, tag, tat));
        }
        for kv in self.discovery.scan_prefix([b'N']) {
            let (k, v) = kv.map_err(backend)?;
            let hashed: [u8; 16] = fixed(&k[1..])?;
            let mut d = k.to_vec();
            d[0] = b'D';
            let detached = match self.discovery.get(d).map_err(backend)? {
                Some(v) => Some(le(&v)?),
                None => None,
            };
            dump.numbers.push((hashed, le(&v)?, detached));
        }
        Ok(dump)
    }

    /// Every mailbox holding messages (when sled holds the mailboxes).
    pub fn dump_mailboxes(&self) -> StoreResult<Vec<DeviceAddress>> {
        let mut out = Vec::new();
        for kv in self.mailboxes.scan_prefix([USAGE]) {
            let (k, _) = kv.map_err(backend)?;
            out.push(parse_addr(&k[1..])?);
        }
        Ok(out)
    }

    /// A seq above every seq this store ever handed out (its open's epoch floor).
    pub fn seq_floor(&self) -> u64 {
        let seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
        seq::floor(seqs.epoch())
    }
}

fn keys_as_accounts(tree: &sled::Tree) -> StoreResult<Vec<AccountId>> {
    let mut out = Vec::new();
    for k in tree.iter().keys() {
        let k = k.map_err(backend)?;
        out.push(AccountId::try_from(&k[..]).map_err(|_| StoreError::Corrupt("account id"))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;
    use crate::store::conformance::{addr, msg};
    use crate::store::{KeyStore, MailboxStore};

    #[test]
    fn every_device_with_keys_and_every_mailbox_is_listed_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), 1 << 20).expect("open");
        let k = SignedKey {
            id: 1,
            key: [1; 32],
            signature: [1; 64],
        };
        let otk = OneTimeKey {
            id: 4,
            key: [4; 32],
        };
        store
            .publish(&addr(2, 1), Some(&k), Some(&k), &[otk])
            .expect("all kinds");
        store
            .publish(&addr(1, 3), None, None, &[otk])
            .expect("one-time only");
        assert_eq!(
            store.dump_key_devices().expect("devices"),
            vec![addr(1, 3), addr(2, 1)]
        );
        let keys = store.dump_keys(&addr(2, 1)).expect("keys");
        assert_eq!(
            (keys.identity_dh, keys.signed_prekey, keys.one_time),
            (Some(k), Some(k), vec![otk])
        );
        let kept = store
            .append(&addr(3, 1), &[msg(1, 5), msg(2, 5)], 1, 2)
            .expect("append");
        let emptied = store
            .append(&addr(4, 1), &[msg(3, 5)], 1, 2)
            .expect("append");
        store.remove(&addr(4, 1), &emptied).expect("ack");
        assert_eq!(store.dump_mailboxes().expect("mailboxes"), vec![addr(3, 1)]);
        // After a restart the floor is above every seq handed out, emptied or not.
        drop(store);
        let store = SledStore::open(dir.path(), 1 << 20).expect("reopen");
        let top = kept.iter().chain(&emptied).max().copied().expect("seqs");
        assert!(store.seq_floor() > top, "{} > {top}", store.seq_floor());
    }
}
