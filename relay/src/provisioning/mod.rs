//! Provisioning slots: how a new device receives its link payload from the primary.
//!
//! - The new device opens a slot on any connection (`OpenProvisioning`): a random
//!   16-byte slot id and the SHA-256 of a reader secret only it knows. A slot lives
//!   [`PROVISIONING_TTL`]; at most `max_provisioning_slots` are open relay-wide, and
//!   opens are limited per address prefix (`provisioning_per_prefix`).
//! - A device of the account deposits the payload once (`DepositProvisioning`, on an
//!   authenticated connection): the device id it names must be a device of the
//!   caller's account. A slot that is missing, expired or already filled is
//!   `NOT_FOUND`.
//! - The new device takes it with the reader secret (`TakeProvisioning`): the payload
//!   (the slot is then gone), or an empty answer while nothing is deposited. A wrong
//!   reader secret, an unknown or expired slot are all `NOT_FOUND`, alike. Takes and
//!   deposits share a per-prefix limit (`provisioning_takes_per_prefix`).
//! - The sweeper deletes expired slots.
//!
//! The payload is HPKE ciphertext the relay cannot open. No slot id, reader hash or
//! payload is ever logged (P9).

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tern_platform::clock::Clock;
use tern_proto::limits::{MAX_LINK_PAYLOAD, MIN_LINK_PAYLOAD, PROVISIONING_TTL_MS};
use tern_proto::{AccountId, DeviceId};

use crate::config::RateLimitsConfig;
use crate::core::auth::AuthenticatedDevice;
use crate::core::rate::{AddressPrefix, KeyedLimit};
use crate::error::{Error, Result};
use crate::store::{AccountStore, ProvisioningStore, SlotOpen, SlotTake};
use tern_proto::SlotId;

/// How long a slot lives after it is opened.
pub const PROVISIONING_TTL: Duration = Duration::from_millis(PROVISIONING_TTL_MS);

/// The provisioning service. See the module docs.
pub struct Provisioning {
    store: Arc<dyn ProvisioningStore>,
    /// The accounts as the services see them (a deleted account is absent).
    accounts: Arc<dyn AccountStore>,
    clock: Arc<dyn Clock>,
    max_slots: usize,
    opens: KeyedLimit<AddressPrefix>,
    takes: KeyedLimit<AddressPrefix>,
}

impl std::fmt::Debug for Provisioning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioning")
            .field("max_slots", &self.max_slots)
            .finish_non_exhaustive()
    }
}

impl Provisioning {
    /// Slots kept in `store`, under the `[rate_limits]` in `rates`; deposits are
    /// checked against `accounts`; time from `clock`.
    pub fn new(
        store: Arc<dyn ProvisioningStore>,
        accounts: Arc<dyn AccountStore>,
        rates: &RateLimitsConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Provisioning {
            store,
            accounts,
            max_slots: rates.max_provisioning_slots,
            opens: KeyedLimit::new(rates.provisioning_per_prefix, rates.max_keys, clock.clone()),
            takes: KeyedLimit::new(
                rates.provisioning_takes_per_prefix,
                rates.max_keys,
                clock.clone(),
            ),
            clock,
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.now()
    }

    /// Opens `slot` for the holder of the reader secret hashing to `reader_hash`;
    /// returns when it expires (ms since the Unix epoch). A slot id already open is
    /// [`Error::BadRequest`]; a full table is [`Error::Unavailable`].
    pub fn open(&self, from: AddressPrefix, slot: &SlotId, reader_hash: &[u8; 32]) -> Result<u64> {
        self.opens.check(&from)?;
        let now_ms = self.now_ms();
        let expires_at_ms = now_ms.saturating_add(PROVISIONING_TTL_MS);
        match self
            .store
            .open(&slot.0, reader_hash, expires_at_ms, now_ms, self.max_slots)?
        {
            SlotOpen::Opened => Ok(expires_at_ms),
            SlotOpen::Exists => Err(Error::BadRequest("the slot id is in use".into())),
            SlotOpen::Full => Err(Error::Unavailable("too many provisioning slots open")),
        }
    }

    /// Deposits `payload` into `slot` for `device`, a device of the caller's
    /// account (else [`Error::Unauthorized`]). A slot missing, expired or already
    /// filled is [`Error::NotFound`].
    pub fn deposit(
        &self,
        by: &AuthenticatedDevice,
        from: AddressPrefix,
        slot: &SlotId,
        device: DeviceId,
        payload: &[u8],
    ) -> Result<()> {
        check_payload(payload)?;
        self.takes.check(&from)?;
        let account: AccountId = by.address().account;
        let record = self.accounts.get(&account)?.ok_or(Error::Unauthorized)?;
        if record.device_key(device).is_none() {
            return Err(Error::Unauthorized);
        }
        if self
            .store
            .deposit(&slot.0, &account, device, payload, self.now_ms())?
        {
            Ok(())
        } else {
            Err(Error::NotFound)
        }
    }

    /// Takes `slot`'s payload with the reader secret: the payload (the slot is then
    /// gone), or an empty one while nothing is deposited. A wrong secret, an unknown
    /// or an expired slot is [`Error::NotFound`].
    pub fn take(
        &self,
        from: AddressPrefix,
        slot: &SlotId,
        reader_secret: &[u8; 32],
    ) -> Result<Vec<u8>> {
        self.takes.check(&from)?;
        let reader_hash: [u8; 32] = Sha256::digest(reader_secret).into();
        match self.store.take(&slot.0, &reader_hash, self.now_ms())? {
            SlotTake::Payload(payload) => Ok(payload),
            SlotTake::Pending => Ok(Vec::new()),
            SlotTake::Missing => Err(Error::NotFound),
        }
    }

    /// Deletes up to `max` expired slots; returns how many.
    pub fn sweep(&self, max: usize) -> Result<usize> {
        Ok(self.store.sweep(self.now_ms(), max)?)
    }

    /// Forgets rate buckets that refilled.
    pub fn housekeep(&self) {
        self.opens.housekeep();
        self.takes.housekeep();
    }

    /// Drops the slots deposited for `account` (account deletion, P7).
    pub(crate) fn forget_account(&self, account: &AccountId) -> Result<()> {
        Ok(self.store.forget_account(account)?)
    }
}

/// A payload's size: at least an HPKE encapsulated key and a tag, at most
/// [`MAX_LINK_PAYLOAD`].
fn check_payload(payload: &[u8]) -> Result<()> {
    if payload.len() > MAX_LINK_PAYLOAD {
        return Err(Error::TooLarge {
            what: "link payload",
            size: payload.len(),
            max: MAX_LINK_PAYLOAD,
        });
    }
    if payload.len() < MIN_LINK_PAYLOAD {
        return Err(Error::BadRequest("the link payload is too short".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
