//! Removal of one linked device (never device 1, the primary), asked for by the
//! primary with a new signed device list, by the device itself (self-unlink), or by
//! the sweeper once the device has been idle for `linked_device_idle_days`.
//!
//! [`DeviceRemoval`] runs these steps, each idempotent, as account deletion does:
//! 1. A signed list is checked against the stored identity key: newer than the
//!    stored one, and exactly the record's devices without the removed one. It is
//!    stored, then the removal intent `(account, device)` is written and flushed.
//! 2. The device address joins the [`super::Tombstones`]: its mailbox takes no more
//!    messages, no key is published for it, its connections close with
//!    `DEVICE_REMOVED` and its `Auth` is refused.
//! 3. The removals: the device row (so other nodes refuse it within the recipient
//!    cache's TTL), this node's recipient cache entry, the device's published keys
//!    and MLS key packages,
//!    its mailbox.
//! 4. A flush, the mailbox store's settle (the log punches the purged bytes), a
//!    flush, then the intent is removed and flushed.
//! 5. At start, [`DeviceRemoval::resume`] re-runs every intent left by a crash; the
//!    sweeper retries one that failed ([`DeviceRemoval::sweep`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tracing::warn;

use tern_proto::{DeviceAddress, DeviceId, SignedDeviceList};

use super::{blocking, Retried, Running};
use crate::core::auth::{verify_device_list, AuthenticatedDevice};
use crate::error::{Error, Result};
use crate::server::Services;
use crate::store::{utc_day, StoredList};

/// The device removal service. See the module docs.
pub struct DeviceRemoval {
    services: Arc<Services>,
    /// Devices whose removal runs now: a retry leaves them alone.
    running: Mutex<HashSet<DeviceAddress>>,
    /// A removal failed (or was left) since the last retry: the sweeper retries.
    failed: AtomicBool,
    /// Days without a connection after which a linked device goes; 0 never.
    idle_days: u32,
}

impl std::fmt::Debug for DeviceRemoval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRemoval")
            .field("idle_days", &self.idle_days)
            .finish_non_exhaustive()
    }
}

impl DeviceRemoval {
    /// Removal over the relay's services; a linked device idle for `idle_days`
    /// (0: never) is removed by [`DeviceRemoval::remove_idle`].
    pub fn new(services: Arc<Services>, idle_days: u32) -> Self {
        DeviceRemoval {
            services,
            running: Mutex::default(),
            failed: AtomicBool::new(false),
            idle_days,
        }
    }

    /// Removes device `device` of the caller's account, with the primary's new
    /// `list` (signed by the identity key) that no longer names it; or, without a
    /// list and `device` the caller itself, a linked device unlinking itself (the
    /// primary then publishes a list without it). Returns once the removal is
    /// durable and scrubbed.
    ///
    /// Device 1 is never removed ([`Error::BadRequest`]); only the primary removes
    /// another device ([`Error::Unauthorized`]); a device the account does not have
    /// is [`Error::UnknownRecipient`]; a list not newer than the stored one is
    /// [`Error::StaleDeviceList`]; a list that does not verify, or that is not the
    /// account's devices without `device`, is [`Error::Unauthorized`] or
    /// [`Error::BadRequest`].
    pub async fn remove_signed(
        &self,
        by: &AuthenticatedDevice,
        device: DeviceId,
        list: Option<&SignedDeviceList>,
    ) -> Result<()> {
        let account = by.address().account;
        if device == DeviceId::PRIMARY {
            return Err(Error::BadRequest(
                "device 1 is the primary; delete the account instead".into(),
            ));
        }
        match list {
            None if by.address().device != device => {
                return Err(Error::BadRequest(
                    "without a list a device removes only itself".into(),
                ))
            }
            Some(_) if by.address().device != DeviceId::PRIMARY => return Err(Error::Unauthorized),
            _ => {}
        }
        let addr = DeviceAddress { account, device };
        if self.services.tombstones().contains_device(&addr) {
            return Err(Error::UnknownRecipient);
        }
        let stores = self.services.stores();
        let record = stores.accounts.get(&account)?.ok_or(Error::Unauthorized)?;
        if record.device_key(device).is_none() {
            return Err(Error::UnknownRecipient);
        }
        if let Some(list) = list {
            let verified = verify_device_list(&record.identity_key, &account, list)?;
            let stored = stores.accounts.device_list(&account)?;
            if stored.is_some_and(|s| s.version >= verified.version()) {
                return Err(Error::StaleDeviceList);
            }
            let mut wanted: Vec<(DeviceId, [u8; 32])> = record
                .devices
                .iter()
                .copied()
                .filter(|(id, _)| *id != device)
                .collect();
            wanted.sort_unstable();
            if verified.devices() != wanted.as_slice() {
                return Err(Error::BadRequest(
                    "the list must name exactly the account's other devices".into(),
                ));
            }
            let stored = StoredList {
                version: verified.version(),
                list: list.bytes.to_vec(),
                signature: *verified.signature(),
            };
            // The intent before the list: once the list no longer names the device, a
            // failure from here on is finished by the sweeper, never left half done.
            stores.accounts.put_device_removal(&addr)?;
            if !stores.accounts.put_device_list(&account, &stored)? {
                // Another list won the race: this removal did not happen.
                stores.accounts.remove_device_removal(&addr)?;
                return Err(Error::StaleDeviceList);
            }
        }
        self.remove(addr).await
    }

    /// Removes up to `max` linked devices last seen more than `idle_days` ago (none
    /// when it is 0); the sweeper calls it under its lease. Device 1 never expires.
    /// Returns how many it removed; one that fails is logged and left to
    /// [`DeviceRemoval::sweep`].
    pub async fn remove_idle(&self, max: usize) -> Result<usize> {
        if self.idle_days == 0 {
            return Ok(0);
        }
        let today = u32::try_from(utc_day(self.services.clock().now())).unwrap_or(u32::MAX);
        let Some(before) = today.checked_sub(self.idle_days) else {
            return Ok(0);
        };
        let idle = self.services.stores().accounts.idle_devices(before, max)?;
        let mut removed = 0;
        for addr in idle {
            // The store never offers device 1; checked again, as the promise is ours.
            if addr.device == DeviceId::PRIMARY {
                continue;
            }
            match self.remove(addr).await {
                Ok(()) => removed += 1,
                Err(e) => {
                    warn!(error = %e, "an idle device's removal failed part way; it is retried at the next sweep")
                }
            }
        }
        Ok(removed)
    }

    /// For the sweeper: retries up to `max` recorded removals if one failed since
    /// the last call (else reads nothing).
    pub async fn sweep(&self, max: usize) -> Result<Retried> {
        if !self.failed.swap(false, Ordering::Relaxed) {
            return Ok(Retried::default());
        }
        let retried = self.retry_pending(max).await;
        if retried
            .as_ref()
            .map_or(true, |r| r.failed > 0 || r.finished >= max)
        {
            self.failed.store(true, Ordering::Relaxed);
        }
        retried
    }

    /// Finishes every removal a crash interrupted; called at start, before the
    /// relay serves. Returns how many it finished.
    pub async fn resume(&self) -> Result<usize> {
        Ok(self.retry_pending(usize::MAX).await?.finished)
    }

    /// Re-runs up to `max` recorded removals that are not running now. Every
    /// recorded device is tombstoned first, retried now or not. A failure is logged
    /// at warn, without the address, and retried next time.
    pub async fn retry_pending(&self, max: usize) -> Result<Retried> {
        let intents = self.services.stores().accounts.device_removals()?;
        let tombstones = self.services.tombstones().clone();
        let all = intents.clone();
        blocking(move || {
            for addr in all {
                if !tombstones.contains_device(&addr) {
                    tombstones.insert_device(addr);
                }
            }
            Ok(())
        })
        .await?;
        let mut retried = Retried::default();
        for addr in intents.iter().take(max) {
            let Some(_running) = self.running(addr) else {
                continue;
            };
            match self.run(*addr).await {
                Ok(()) => retried.finished += 1,
                Err(e) => {
                    retried.failed += 1;
                    self.failed.store(true, Ordering::Relaxed);
                    warn!(error = %e, "a device removal failed part way; it is retried at the next sweep");
                }
            }
        }
        Ok(retried)
    }

    /// Steps 1 (the intent) to 5 for `addr`, whose list (if any) is stored.
    async fn remove(&self, addr: DeviceAddress) -> Result<()> {
        let Some(_running) = self.running(&addr) else {
            // Already running here: that removal answers for it.
            return Ok(());
        };
        let intent = self.services.stores().accounts.put_device_removal(&addr);
        let done = match intent {
            Ok(()) => match self.durable().await {
                Ok(()) => {
                    let tombstones = self.services.tombstones().clone();
                    blocking(move || {
                        tombstones.insert_device(addr);
                        Ok(())
                    })
                    .await?;
                    self.run(addr).await
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e.into()),
        };
        if done.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        done
    }

    fn running(&self, addr: &DeviceAddress) -> Option<Running<'_, DeviceAddress>> {
        Running::start(&self.running, addr)
    }

    /// The removals (step 3) and the settle (step 4).
    async fn run(&self, addr: DeviceAddress) -> Result<()> {
        if addr.device == DeviceId::PRIMARY {
            // Only a damaged intent names it: drop the intent, remove nothing.
            self.services
                .stores()
                .accounts
                .remove_device_removal(&addr)?;
            return Ok(());
        }
        let services = self.services.clone();
        blocking(move || {
            let stores = services.stores();
            // The row first: other nodes stop taking sends for it once their cache
            // entry (at most a second old) goes.
            stores.accounts.remove_device_record(&addr)?;
            services.accounts().forget(&addr.account);
            stores.keys.remove_device(&addr)?;
            stores.key_packages.remove_key_packages(&addr)?;
            stores.push.remove_push_target(&addr, None)?;
            services.mailboxes().purge(&addr)?;
            Ok(())
        })
        .await?;
        self.durable().await?;
        let services = self.services.clone();
        blocking(move || services.mailboxes().settle()).await?;
        self.durable().await?;
        self.services
            .stores()
            .accounts
            .remove_device_removal(&addr)?;
        self.durable().await?;
        Ok(())
    }

    /// Makes every change so far durable, as account deletion does.
    async fn durable(&self) -> Result<()> {
        super::durable(&self.services).await
    }
}

#[cfg(test)]
mod tests;
