//! This device's keys on the relay: signed prekey rotation, one-time prekey batches,
//! and the delivery token (its rotation and publication).

use rand::{CryptoRng, RngCore};

use super::group_records::{LastResortRecord, RetiredKeyPackage, LAST_RESORT_KEY};
use super::state::{fixed32, random32, State};
use super::SEEN_RETENTION_MS;
use crate::crypto::x3dh::AgreementKeyPair;
use crate::groups::GroupDevice;
use crate::store::records::{PreKeyKind, PreKeyRecord};
use crate::store::{Batch, Namespace, PreKeyStore};
use crate::Result;
use tern_proto::{KeyUpload, SignedKey};

/// Encoded one-time key packages and a last-resort one, for `PublishKeyPackages`.
pub(crate) type KeyPackageUpload = (Vec<Vec<u8>>, Vec<u8>);

/// MLS key packages generated per upload.
pub(crate) const KEY_PACKAGE_BATCH: usize = 100;
/// Below this many key packages on the relay, upload another batch.
pub(crate) const KEY_PACKAGE_LOW: u32 = 25;
/// One-time prekeys generated per upload.
pub(crate) const PREKEY_BATCH: u32 = 100;
/// Below this many one-time prekeys on the relay, upload another batch.
pub(crate) const PREKEY_LOW: u32 = 25;
/// A signed prekey is replaced after this long...
pub(crate) const SIGNED_PREKEY_ROTATION_MS: u64 = 7 * 24 * 3600 * 1000;
/// ...and its secret kept this long after, for prekey messages still in flight
/// (the relay keeps messages at most 30 days).
pub(crate) const SIGNED_PREKEY_GRACE_MS: u64 = 30 * 24 * 3600 * 1000;

impl State {
    /// The primary signs its signed prekeys with the identity key, a linked device
    /// with its device key (which the signed device list binds to the identity).
    fn certify_signed_prekey(&self, id: u32, key: &[u8; 32]) -> [u8; 64] {
        match &self.keys.identity {
            Some(identity) => identity.certify_signed_prekey(id, key),
            None => self.keys.device.certify_signed_prekey(id, key),
        }
    }

    fn next_prekey_id(&mut self) -> u32 {
        let id = self.local.next_prekey_id;
        self.local.next_prekey_id = id.wrapping_add(1).max(1);
        id
    }

    /// A fresh prekey: its id, key pair and record; its secret is stored by `batch`.
    fn new_prekey(
        &mut self,
        kind: PreKeyKind,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
        batch: &mut Batch,
    ) -> (u32, AgreementKeyPair, PreKeyRecord) {
        let id = self.next_prekey_id();
        let pair = AgreementKeyPair::generate(rng);
        let record = PreKeyRecord {
            secret: pair.secret_bytes().to_vec(),
            created_ms: now_ms,
            replaced_ms: 0,
        };
        batch.put_prekey(kind, id, &record);
        (id, pair, record)
    }

    /// A new signed prekey becomes current; the previous one stays for the grace period.
    pub(super) fn rotate_signed_prekey(
        &mut self,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> (Batch, SignedKey) {
        let mut batch = Batch::new();
        if let Some((_, old)) = self.signed_prekeys.get_mut(&self.local.signed_prekey_id) {
            old.replaced_ms = now_ms;
            batch.put_prekey(PreKeyKind::Signed, self.local.signed_prekey_id, old);
        }
        let (id, pair, record) = self.new_prekey(PreKeyKind::Signed, now_ms, rng, &mut batch);
        let signed = SignedKey {
            id,
            key: pair.public(),
            signature: self.certify_signed_prekey(id, &pair.public()),
        };
        self.signed_prekeys.insert(id, (pair, record));
        self.local.signed_prekey_id = id;
        batch.put_local(&self.local);
        (batch, signed)
    }

    pub(super) fn new_one_time_prekeys(
        &mut self,
        n: u32,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> (Batch, Vec<(u32, [u8; 32])>) {
        let mut batch = Batch::new();
        let mut public = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let (id, pair, _) = self.new_prekey(PreKeyKind::OneTime, now_ms, rng, &mut batch);
            public.push((id, pair.public()));
        }
        batch.put_local(&self.local);
        (batch, public)
    }

    fn current_signed_prekey(&self) -> Option<SignedKey> {
        let id = self.local.signed_prekey_id;
        self.signed_prekeys.get(&id).map(|(pair, _)| SignedKey {
            id,
            key: pair.public(),
            signature: self.certify_signed_prekey(id, &pair.public()),
        })
    }

    /// Everything the relay should hold that it may not: the whole set after
    /// registering, a new signed prekey when the current one is due, more one-time
    /// prekeys when `relay_count` is low. Stored (durably) before it is returned, so
    /// the relay never hands out a key whose secret we lost. `None`: nothing to do.
    pub(crate) fn key_upload(
        &mut self,
        relay_count: Option<u32>,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Option<KeyUpload>> {
        let mut batch = Batch::new();
        let mut upload = KeyUpload::default();
        if !self.local.keys_published {
            upload.identity_dh = Some(SignedKey {
                id: 0,
                key: self.keys.identity_dh.public(),
                signature: self.keys.identity_dh_signature,
            });
            upload.signed_prekey = self.current_signed_prekey();
            upload.one_time = self.one_time_publics()?;
        }
        let due = self
            .signed_prekeys
            .get(&self.local.signed_prekey_id)
            .is_none_or(|(_, r)| r.created_ms + SIGNED_PREKEY_ROTATION_MS <= now_ms);
        if due {
            let (mut b, signed) = self.rotate_signed_prekey(now_ms, rng);
            batch.append(&mut b);
            upload.signed_prekey = Some(signed);
        }
        if relay_count.is_some_and(|c| c < PREKEY_LOW) {
            let (mut b, keys) = self.new_one_time_prekeys(PREKEY_BATCH, now_ms, rng);
            batch.append(&mut b);
            upload.one_time.extend(keys);
        }
        // Signed prekeys past their grace period go.
        let expired: Vec<u32> = self
            .signed_prekeys
            .iter()
            .filter(|(_, (_, r))| {
                r.replaced_ms != 0 && r.replaced_ms + SIGNED_PREKEY_GRACE_MS < now_ms
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.signed_prekeys.remove(&id);
            batch.delete_prekey(PreKeyKind::Signed, id);
        }
        if !batch.is_empty() {
            self.commit(batch, true)?;
        }
        let nothing = upload.identity_dh.is_none()
            && upload.signed_prekey.is_none()
            && upload.one_time.is_empty();
        Ok((!nothing).then_some(upload))
    }

    fn one_time_publics(&self) -> Result<Vec<(u32, [u8; 32])>> {
        self.kv
            .prekeys(PreKeyKind::OneTime)?
            .into_iter()
            .map(|(id, record)| {
                Ok((
                    id,
                    AgreementKeyPair::from_secret(fixed32(&record.secret)?).public(),
                ))
            })
            .collect()
    }

    /// Records that the relay holds everything [`State::key_upload`] returned.
    pub(crate) fn keys_published(&mut self) -> Result<()> {
        if !self.local.keys_published {
            self.local.keys_published = true;
            let mut batch = Batch::new();
            batch.put_local(&self.local);
            self.commit(batch, true)?;
        }
        Ok(())
    }

    /// A delivery token the relay does not have yet: ours after registering, or a
    /// rotated one.
    pub(crate) fn unpublished_token(&self) -> Option<[u8; 32]> {
        if !self.local.token_published {
            return Some(self.keys.delivery_token);
        }
        self.local.pending_delivery_token[..].try_into().ok()
    }

    /// Records that the relay has `token`; a rotated token takes over from here.
    pub(crate) fn token_published(&mut self, token: &[u8; 32]) -> Result<()> {
        let mut local = self.local.clone();
        if self.keys.delivery_token == *token {
            local.token_published = true;
        } else if local.pending_delivery_token == token {
            local.delivery_token = token.to_vec();
            local.pending_delivery_token.clear();
            local.token_published = true;
        } else {
            return Ok(());
        }
        let mut batch = Batch::new();
        batch.put_local(&local);
        self.commit(batch, true)?;
        self.local = local;
        self.keys.delivery_token = *token;
        Ok(())
    }

    /// A new delivery token: once the relay has it, contacts holding the old one can no
    /// longer send sealed and fall back to identified sends until a message from us
    /// brings the new one.
    pub(crate) fn rotate_delivery_token(
        &mut self,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<()> {
        let mut local = self.local.clone();
        local.pending_delivery_token = random32(rng).to_vec();
        let mut batch = Batch::new();
        batch.put_local(&local);
        self.commit(batch, true)?;
        self.local = local;
        Ok(())
    }

    /// Fresh MLS key packages and a new last-resort one when the relay holds fewer
    /// than [`KEY_PACKAGE_LOW`]: their secrets stored (durably) before they are
    /// returned. `None`: enough are there, or this device has no group credential.
    pub(crate) fn key_package_upload(
        &mut self,
        relay_count: u32,
        now_ms: u64,
    ) -> Result<Option<KeyPackageUpload>> {
        if self.group_device.is_none() {
            return Ok(None);
        }
        // Replaced last-resort secrets go once no welcome made with them can wait
        // in the mailbox any more (a relay replaying one then finds nothing).
        let mut record = self.last_resort_record()?;
        let mut batch = Batch::new();
        let before = record.retired.len();
        record.retired.retain(|r| {
            let gone = r.retired_at_ms.saturating_add(SEEN_RETENTION_MS) <= now_ms;
            if gone {
                batch.extend_ops(vec![GroupDevice::forget_key_package_id(&r.id)]);
            }
            !gone
        });
        if relay_count >= KEY_PACKAGE_LOW {
            if record.retired.len() != before {
                batch.put(
                    Namespace::GroupCredential,
                    LAST_RESORT_KEY.to_vec(),
                    &record,
                );
                self.commit(batch, true)?;
            }
            return Ok(None);
        }
        let Some(device) = self.group_device.as_ref() else {
            return Ok(None);
        };
        let packages = device
            .key_packages(KEY_PACKAGE_BATCH, now_ms)
            .map_err(crate::Error::group)?;
        let last_resort = device
            .last_resort_key_package(now_ms)
            .map_err(crate::Error::group)?;
        let id = GroupDevice::key_package_id(&last_resort.value).map_err(crate::Error::group)?;
        let replaced = std::mem::replace(&mut record.current, id);
        if !replaced.is_empty() {
            record.retired.push(RetiredKeyPackage {
                id: replaced,
                retired_at_ms: now_ms,
            });
        }
        batch.extend_ops(packages.ops);
        batch.extend_ops(last_resort.ops);
        batch.put(
            Namespace::GroupCredential,
            LAST_RESORT_KEY.to_vec(),
            &record,
        );
        self.commit(batch, true)?;
        Ok(Some((packages.value, last_resort.value)))
    }

    fn last_resort_record(&self) -> Result<LastResortRecord> {
        use prost::Message;
        match self.kv.get(Namespace::GroupCredential, LAST_RESORT_KEY)? {
            Some(v) => LastResortRecord::decode(&v[..]).map_err(|_| super::state::corrupt()),
            None => Ok(LastResortRecord::default()),
        }
    }
}
