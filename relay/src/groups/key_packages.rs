//! Key packages: publish by an authenticated device, fetch with the target account's
//! delivery token (any connection, so the relay does not learn who adds whom).
//!
//! A wrong token and an account that does not exist both get `UNAUTHORIZED`, as for
//! `FetchKeys`, and fetches count against `fetch_keys_per_requester` like `FetchKeys`.
//! Each device gives out at most `key_packages_per_device` one-time packages; past
//! that, and when its pool is empty, a fetch gets its last-resort package, so a
//! flood of fetches neither drains a pool nor stops others from adding the device.

use bytes::Bytes;
use tern_proto::{AccountId, DeviceAddress, DeviceId, FetchedKeyPackage};

use super::{Groups, MAX_KEY_PACKAGES};
use crate::accounts::check_delivery_token;
use crate::core::auth::AuthenticatedDevice;
use crate::core::rate::{AddressPrefix, SenderKey};
use crate::error::{Error, Result};

/// Who fetches key packages: anyone showing the target account's delivery token,
/// counted against the connection's authenticated account if there is one, else
/// its address prefix.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PackageRequester<'a> {
    /// The token shown.
    pub(crate) token: &'a [u8],
    /// The connection's device, if authenticated.
    pub(crate) device: Option<&'a AuthenticatedDevice>,
    /// The connection's address prefix.
    pub(crate) from: AddressPrefix,
}

impl PackageRequester<'_> {
    fn key(&self) -> SenderKey {
        match self.device {
            Some(d) => SenderKey::Account(d.address().account),
            None => SenderKey::Prefix(self.from),
        }
    }
}

impl Groups {
    /// Stores key packages the device publishes: `one_time` added to its pool (after
    /// emptying it with `replace`), `last_resort` replacing its last-resort package.
    /// Returns the pool's size once durable.
    pub(crate) async fn publish_key_packages(
        &self,
        device: &AuthenticatedDevice,
        one_time: &[Bytes],
        last_resort: Option<&Bytes>,
        replace: bool,
    ) -> Result<u32> {
        self.budget.check_reserve()?;
        let addr = device.address();
        // A device removed (here or on another node) whose connection is not yet closed.
        let record = self
            .accounts
            .get(&addr.account)?
            .ok_or(Error::Unauthorized)?;
        if record.device_key(addr.device).is_none() || self.tombstones.contains_device(addr) {
            return Err(Error::Unauthorized);
        }
        let held = if replace {
            0
        } else {
            self.packages.key_package_counts(addr)?.one_time
        };
        let total = held.saturating_add(one_time.len() as u64);
        if total > MAX_KEY_PACKAGES {
            return Err(Error::TooLarge {
                what: "key package pool",
                size: usize::try_from(total).unwrap_or(usize::MAX),
                max: MAX_KEY_PACKAGES as usize,
            });
        }
        let n = (self.packages).publish_key_packages(addr, one_time, last_resort, replace)?;
        self.commit.commit().await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// One key package of each of `account`'s devices (or of one device) that has
    /// one, taken as the module docs say. Answers once the taking is durable, so a
    /// crash cannot hand a package out again.
    pub(crate) async fn fetch_key_packages(
        &self,
        requester: PackageRequester<'_>,
        account: &AccountId,
        device: Option<DeviceId>,
    ) -> Result<Vec<FetchedKeyPackage>> {
        self.rates.fetch_keys(&requester.key())?;
        check_delivery_token(self.accounts.as_ref(), account, requester.token)?;
        let record = self.accounts.get(account)?.ok_or(Error::Unauthorized)?;
        let devices: Vec<DeviceId> = record
            .devices
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| device.is_none_or(|d| d == *id))
            .filter(|id| {
                !self.tombstones.contains_device(&DeviceAddress {
                    account: *account,
                    device: *id,
                })
            })
            .collect();
        if device.is_some() && devices.is_empty() {
            return Err(Error::UnknownRecipient);
        }
        let mut out = Vec::with_capacity(devices.len());
        let mut took = false;
        for id in devices {
            let addr = DeviceAddress {
                account: *account,
                device: id,
            };
            let one_time = self.rates.take_key_package(&addr);
            if let Some(p) = self.packages.take_key_package(&addr, one_time)? {
                took |= !p.last_resort;
                out.push(FetchedKeyPackage {
                    device: id,
                    key_package: p.key_package,
                    last_resort: p.last_resort,
                });
            }
        }
        if took {
            self.commit.commit().await?;
        }
        Ok(out)
    }
}
