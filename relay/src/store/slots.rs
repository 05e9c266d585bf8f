//! Provisioning slots in memory: what an embedded relay uses. A slot holds only
//! HPKE ciphertext for at most ten minutes, so none of it needs to reach the disk; a
//! restart just means the new device links again. The rules are tested by the
//! conformance suite (`conformance::slot_rules`), on these slots and on PostgreSQL.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use subtle::ConstantTimeEq;
use tern_proto::{AccountId, DeviceId};

use super::StoreResult;

/// What opening a provisioning slot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotOpen {
    /// The slot is open.
    Opened,
    /// A live slot has this id.
    Exists,
    /// The store holds its maximum of live slots.
    Full,
}

/// What taking from a provisioning slot found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotTake {
    /// The payload; the slot is gone.
    Payload(Vec<u8>),
    /// The slot is open and not deposited yet.
    Pending,
    /// No live slot with this id and reader (unknown, expired, taken, or another
    /// reader's).
    Missing,
}

/// Provisioning slots: where a primary leaves a sealed payload for a device being
/// linked. Each holds ciphertext only, is filled once, taken once, and lives
/// `tern_proto::limits::PROVISIONING_TTL_MS`.
pub trait ProvisioningStore: Send + Sync + 'static {
    /// Opens a slot expiring at `expires_at_ms`, unless one with this id is live or
    /// `max` live slots exist.
    fn open(
        &self,
        slot: &[u8; 16],
        reader_hash: &[u8; 32],
        expires_at_ms: u64,
        now_ms: u64,
        max: usize,
    ) -> StoreResult<SlotOpen>;

    /// Fills a live, empty slot for `device` of `account`; `false` if the slot is
    /// missing, expired or already filled.
    fn deposit(
        &self,
        slot: &[u8; 16],
        account: &AccountId,
        device: DeviceId,
        payload: &[u8],
        now_ms: u64,
    ) -> StoreResult<bool>;

    /// Takes a filled slot's payload (deleting the slot) if `reader_hash` is the one
    /// it was opened with.
    fn take(&self, slot: &[u8; 16], reader_hash: &[u8; 32], now_ms: u64) -> StoreResult<SlotTake>;

    /// Deletes up to `max` expired slots; how many.
    fn sweep(&self, now_ms: u64, max: usize) -> StoreResult<usize>;

    /// Deletes every slot deposited for `account` (its deletion).
    fn forget_account(&self, account: &AccountId) -> StoreResult<()>;
}

struct Slot {
    reader_hash: [u8; 32],
    expires_at_ms: u64,
    deposit: Option<(AccountId, Vec<u8>)>,
}

/// Slots in a bounded map; expired ones are dropped by [`ProvisioningStore::sweep`]
/// and whenever the map is full.
#[derive(Default)]
pub struct MemorySlots {
    slots: Mutex<HashMap<[u8; 16], Slot>>,
}

impl MemorySlots {
    /// No slots.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 16], Slot>> {
        // A panic while holding the map leaves it consistent (every change is one
        // map operation).
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for MemorySlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySlots").finish_non_exhaustive()
    }
}

impl ProvisioningStore for MemorySlots {
    fn open(
        &self,
        slot: &[u8; 16],
        reader_hash: &[u8; 32],
        expires_at_ms: u64,
        now_ms: u64,
        max: usize,
    ) -> StoreResult<SlotOpen> {
        let mut slots = self.lock();
        if slots.get(slot).is_some_and(|s| s.expires_at_ms > now_ms) {
            return Ok(SlotOpen::Exists);
        }
        if slots.len() >= max {
            slots.retain(|_, s| s.expires_at_ms > now_ms);
            if slots.len() >= max {
                return Ok(SlotOpen::Full);
            }
        }
        slots.insert(
            *slot,
            Slot {
                reader_hash: *reader_hash,
                expires_at_ms,
                deposit: None,
            },
        );
        Ok(SlotOpen::Opened)
    }

    fn deposit(
        &self,
        slot: &[u8; 16],
        account: &AccountId,
        _device: DeviceId,
        payload: &[u8],
        now_ms: u64,
    ) -> StoreResult<bool> {
        let mut slots = self.lock();
        match slots.get_mut(slot) {
            Some(s) if s.expires_at_ms > now_ms && s.deposit.is_none() => {
                s.deposit = Some((*account, payload.to_vec()));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn take(&self, slot: &[u8; 16], reader_hash: &[u8; 32], now_ms: u64) -> StoreResult<SlotTake> {
        let mut slots = self.lock();
        let Some(s) = slots.get(slot) else {
            return Ok(SlotTake::Missing);
        };
        if s.expires_at_ms <= now_ms || !bool::from(s.reader_hash.ct_eq(reader_hash)) {
            return Ok(SlotTake::Missing);
        }
        if s.deposit.is_none() {
            return Ok(SlotTake::Pending);
        }
        Ok(slots
            .remove(slot)
            .and_then(|s| s.deposit)
            .map_or(SlotTake::Missing, |(_, payload)| SlotTake::Payload(payload)))
    }

    fn sweep(&self, now_ms: u64, max: usize) -> StoreResult<usize> {
        let mut slots = self.lock();
        let expired: Vec<[u8; 16]> = slots
            .iter()
            .filter(|(_, s)| s.expires_at_ms <= now_ms)
            .map(|(id, _)| *id)
            .take(max)
            .collect();
        for id in &expired {
            slots.remove(id);
        }
        Ok(expired.len())
    }

    fn forget_account(&self, account: &AccountId) -> StoreResult<()> {
        self.lock()
            .retain(|_, s| s.deposit.as_ref().is_none_or(|(a, _)| a != account));
        Ok(())
    }
}
