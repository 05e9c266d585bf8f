//! Provisioning slots in PostgreSQL (`provisioning_slots`, V11), shared by the nodes:
//! a slot opened through one node is deposited into and taken through any other.
//!
//! Opens are serialised by a transaction-scoped advisory lock and count the table
//! first, so it never holds more than `max` rows, whichever nodes open at once; an
//! open that finds it full deletes the expired slots before it answers `Full`. A deposit fills an open, live,
//! empty slot once; a take deletes the filled slot in the statement that returns
//! its payload, so two takes never both get it. Wrong reader, expired and unknown
//! all read as `Missing`. No slot id is logged (P9).

use tern_proto::{AccountId, DeviceId};

use super::rows::{col, db_time, exec_in, one_in, opt_in, transaction};
use super::PgBackend;
use crate::store::{ProvisioningStore, SlotOpen, SlotTake, StoreResult};

/// The advisory lock key that serialises opens (the digits name issue 16).
const OPEN_LOCK: i64 = 7263_0016;

impl ProvisioningStore for PgBackend {
    fn open(
        &self,
        slot: &[u8; 16],
        reader_hash: &[u8; 32],
        expires_at_ms: u64,
        now_ms: u64,
        max: usize,
    ) -> StoreResult<SlotOpen> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let (expires, now) = (db_time(expires_at_ms), db_time(now_ms));
        let count = "SELECT count(*) FROM provisioning_slots";
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                exec_in(&tx, "SELECT pg_advisory_xact_lock($1)", &[&OPEN_LOCK]).await?;
                let live = opt_in(
                    &tx,
                    "SELECT 1 FROM provisioning_slots WHERE slot = $1 AND expires_at_ms > $2",
                    &[&&slot[..], &now],
                )
                .await?;
                let mut rows: i64 = col(&one_in(&tx, count, &[]).await?, 0)?;
                if live.is_none() && rows >= max {
                    // Full of rows: the expired ones go first (the sweep's work).
                    exec_in(
                        &tx,
                        "DELETE FROM provisioning_slots WHERE expires_at_ms <= $1",
                        &[&now],
                    )
                    .await?;
                    rows = col(&one_in(&tx, count, &[]).await?, 0)?;
                }
                if live.is_some() {
                    SlotOpen::Exists
                } else if rows >= max {
                    SlotOpen::Full
                } else {
                    // An expired slot with this id is replaced, empty.
                    exec_in(
                        &tx,
                        "INSERT INTO provisioning_slots (slot, reader_hash, expires_at_ms) \
                         VALUES ($1, $2, $3) ON CONFLICT (slot) DO UPDATE SET \
                         reader_hash = EXCLUDED.reader_hash, expires_at_ms = \
                         EXCLUDED.expires_at_ms, account = NULL, device = NULL, payload = NULL",
                        &[&&slot[..], &&reader_hash[..], &expires],
                    )
                    .await?;
                    SlotOpen::Opened
                }
            })
        })
    }

    fn deposit(
        &self,
        slot: &[u8; 16],
        account: &AccountId,
        device: DeviceId,
        payload: &[u8],
        now_ms: u64,
    ) -> StoreResult<bool> {
        let n = self.run(self.exec(
            "UPDATE provisioning_slots SET account = $2, device = $3, payload = $4 \
             WHERE slot = $1 AND payload IS NULL AND expires_at_ms > $5",
            &[
                &&slot[..],
                &&account.as_bytes()[..],
                &i64::from(device.get()),
                &payload,
                &db_time(now_ms),
            ],
        ))?;
        Ok(n > 0)
    }

    fn take(&self, slot: &[u8; 16], reader_hash: &[u8; 32], now_ms: u64) -> StoreResult<SlotTake> {
        let now = db_time(now_ms);
        self.run(async {
            let taken = self
                .rows(
                    "DELETE FROM provisioning_slots WHERE slot = $1 AND reader_hash = $2 \
                     AND expires_at_ms > $3 AND payload IS NOT NULL RETURNING payload",
                    &[&&slot[..], &&reader_hash[..], &now],
                )
                .await?;
            if let Some(row) = taken.first() {
                return Ok(SlotTake::Payload(self.col::<Vec<u8>>(row, 0)?));
            }
            let pending = self
                .rows(
                    "SELECT 1 FROM provisioning_slots WHERE slot = $1 AND reader_hash = $2 \
                     AND expires_at_ms > $3",
                    &[&&slot[..], &&reader_hash[..], &now],
                )
                .await?;
            Ok(if pending.is_empty() {
                SlotTake::Missing
            } else {
                SlotTake::Pending
            })
        })
    }

    fn sweep(&self, now_ms: u64, max: usize) -> StoreResult<usize> {
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let n = self.run(self.exec(
            "DELETE FROM provisioning_slots WHERE slot IN (SELECT slot FROM provisioning_slots \
             WHERE expires_at_ms <= $1 ORDER BY expires_at_ms LIMIT $2)",
            &[&db_time(now_ms), &limit],
        ))?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn forget_account(&self, account: &AccountId) -> StoreResult<()> {
        self.run(self.exec(
            "DELETE FROM provisioning_slots WHERE account = $1",
            &[&&account.as_bytes()[..]],
        ))
        .map(drop)
    }
}
