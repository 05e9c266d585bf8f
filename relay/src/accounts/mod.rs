//! Accounts and their devices: registration, added devices, session proofs, and the
//! delivery tokens that let unidentified senders reach an account.
//!
//! Every check that fails for want of a key or a token gets the same opaque
//! [`Error::Unauthorized`], so the relay does not confirm who has an account.
//!
//! Devices are added only by a device of the same account, at most
//! `max_devices_per_account` of them ([`Error::TooManyDevices`]) and at the
//! `add_device_per_account` rate. A [`Recipient`] carries who sends, for the send and
//! intake limits that [`crate::mailboxes::Mailboxes::append`] applies.

mod cache;

use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tern_proto::{AccountId, DeviceAddress, DeviceId, SignedDeviceList};

use crate::core::auth::{self, AuthenticatedDevice, VerifiedRegistration};
use crate::core::budget::Budget;
use crate::core::rate::{AddressPrefix, RateLimits, SenderKey};
use crate::error::{Error, Result};
use crate::store::{utc_day, AccountRecord, AccountStore, GroupCommit, StoreError, StoredList};
use cache::{Known, RecipientCache, RELOAD_AFTER};
use tern_platform::clock::Clock;

/// Proof that a device address belongs to a registered device, and that the sender
/// may queue messages for it. Only [`Accounts::recipient`] and
/// [`Accounts::sealed_recipient`] make one; appending to a mailbox requires it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipient {
    address: DeviceAddress,
    from: SenderKey,
}

impl Recipient {
    /// The recipient's mailbox address.
    pub fn address(&self) -> &DeviceAddress {
        &self.address
    }

    /// Who sends, as the rate limits count it.
    pub fn sender(&self) -> &SenderKey {
        &self.from
    }
}

/// The accounts service. See the module docs.
pub struct Accounts {
    store: Arc<dyn AccountStore>,
    commit: Arc<GroupCommit>,
    rates: Arc<RateLimits>,
    budget: Arc<Budget>,
    /// For the created and last-seen days.
    clock: Arc<dyn Clock>,
    /// What sends check about their recipients' accounts.
    recipients: RecipientCache,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts").finish_non_exhaustive()
    }
}

impl Accounts {
    /// Accounts kept in `store`, under `rates`; changes are made durable through
    /// `commit`; days are those of `clock`.
    pub fn new(
        store: Arc<dyn AccountStore>,
        commit: Arc<GroupCommit>,
        rates: Arc<RateLimits>,
        budget: Arc<Budget>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Accounts {
            store,
            commit,
            rates,
            budget,
            clock,
            recipients: RecipientCache::default(),
        }
    }

    /// Today, as the account records count days.
    fn today(&self) -> u32 {
        u32::try_from(utc_day(self.clock.now())).unwrap_or(u32::MAX - 1)
    }

    /// Creates an account for a verified registration; the connection becomes its
    /// first device. Durable before it returns.
    pub async fn register(&self, reg: VerifiedRegistration) -> Result<AuthenticatedDevice> {
        // sled must not meet a full disk (see ARCHITECTURE.md, "Budgets and a full disk").
        self.budget.check_reserve()?;
        let record = AccountRecord {
            identity_key: *reg.identity_key(),
            devices: vec![(DeviceId::PRIMARY, *reg.device_key())],
        };
        let account = loop {
            let id = AccountId(rand::random());
            match self.store.create_on(&id, &record, Some(self.today())) {
                Ok(()) => break id,
                Err(StoreError::Exists) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        self.commit.commit().await?;
        self.recipients.forget(&account);
        Ok(reg.into_device(DeviceAddress {
            account,
            device: DeviceId::PRIMARY,
        }))
    }

    /// Adds a device vouched for by the account's identity key, for a device of that
    /// account (else [`Error::Unauthorized`]). A key already on the account gets its
    /// id again; a new one needs room ([`Error::TooManyDevices`]) and the account's
    /// `AddDevice` rate ([`Error::RateLimited`]).
    pub async fn add_device(
        &self,
        by: &AuthenticatedDevice,
        account: &AccountId,
        device_key: &[u8; 32],
        signature: &[u8; 64],
    ) -> Result<DeviceId> {
        if by.address().account != *account {
            return Err(Error::Unauthorized);
        }
        let record = self.store.get(account)?.ok_or(Error::Unauthorized)?;
        let key = auth::verify_new_device(&record.identity_key, account, device_key, signature)?;
        if let Some((id, _)) = record.devices.iter().find(|(_, k)| k == device_key) {
            return Ok(*id);
        }
        // Concurrent adds may pass this check together; the rate bounds by how much.
        let max = self.rates.max_devices();
        if record.devices.len() >= max {
            return Err(Error::TooManyDevices { max });
        }
        self.rates.add_device(account)?;
        let id = self
            .store
            .add_device(account, &key, self.today())?
            .ok_or(Error::Unauthorized)?;
        self.commit.commit().await?;
        self.recipients.forget(account);
        Ok(id)
    }

    /// Checks a device's session proof; on success moves the device's last-seen
    /// day on (one write per device per day at most, none on later sessions that
    /// day).
    pub fn authenticate(
        &self,
        address: DeviceAddress,
        exporter: &[u8; 32],
        signature: &[u8; 64],
    ) -> Result<AuthenticatedDevice> {
        let record = self
            .store
            .get(&address.account)?
            .ok_or(Error::Unauthorized)?;
        let key = record
            .device_key(address.device)
            .ok_or(Error::Unauthorized)?;
        let device = auth::authenticate(address, key, exporter, signature)?;
        // The day is a courtesy for the export; failing to store it fails no session.
        if let Err(e) = self.store.touch_device(&address, self.today()) {
            tracing::debug!(error = %e, "last-seen day not stored");
        }
        Ok(device)
    }

    /// Sets the device's account's delivery token hash (SHA-256 of the token).
    pub async fn set_delivery_token(
        &self,
        device: &AuthenticatedDevice,
        token_hash: &[u8; 32],
    ) -> Result<()> {
        let account = &device.address().account;
        self.store.set_delivery_token(account, token_hash)?;
        self.commit.commit().await?;
        self.recipients.forget(account);
        Ok(())
    }

    /// An account's device ids and its signed device list (if it published one),
    /// for a holder of its delivery token. A missing account and a wrong token get
    /// the same answer, as for sealed sends. The list is read from the store, not
    /// the cache: a sender asks for it after a `STALE_DEVICE_LIST`.
    pub fn list_devices(&self, account: &AccountId, token: &[u8]) -> Result<Listing> {
        let known = self.known(account, None)?.ok_or(Error::Unauthorized)?;
        check_token_hash(known.token.as_ref(), token)?;
        let list = self.store.device_list(account)?;
        Ok(Listing {
            devices: known.devices.clone(),
            list,
        })
    }

    /// Stores the account's new device list, signed by its identity key: newer than
    /// the stored one ([`Error::StaleDeviceList`]), and naming only devices the
    /// account has, each with its key ([`Error::BadRequest`]). Any device of the
    /// account may publish it; the signature is the authority.
    pub async fn publish_device_list(
        &self,
        by: &AuthenticatedDevice,
        list: &SignedDeviceList,
    ) -> Result<()> {
        let account = &by.address().account;
        let record = self.store.get(account)?.ok_or(Error::Unauthorized)?;
        let verified = auth::verify_device_list(&record.identity_key, account, list)?;
        for (id, key) in verified.devices() {
            if record.device_key(*id) != Some(key) {
                return Err(Error::BadRequest(
                    "the list names a device the account does not have".into(),
                ));
            }
        }
        let stored = StoredList {
            version: verified.version(),
            list: list.bytes.to_vec(),
            signature: *verified.signature(),
        };
        if !self.store.put_device_list(account, &stored)? {
            return Err(Error::StaleDeviceList);
        }
        self.commit.commit().await?;
        self.recipients.forget(account);
        Ok(())
    }

    /// Moves an authenticated device's last-seen day on, as `Auth` does: a
    /// connection calls it on its first request of each UTC day, so a device that
    /// stays connected is not taken for idle. Returns the day.
    pub(crate) fn touch_seen(&self, device: &AuthenticatedDevice) -> u32 {
        let today = self.today();
        if let Err(e) = self.store.touch_device(device.address(), today) {
            tracing::debug!(error = %e, "last-seen day not stored");
        }
        today
    }

    /// Today, as the account records count days (for a connection's daily touch).
    pub(crate) fn day(&self) -> u32 {
        self.today()
    }

    /// `to` as the recipient of an authenticated sender's messages, if it is a
    /// registered device (the device list version unchecked).
    pub fn recipient(&self, sender: &AuthenticatedDevice, to: DeviceAddress) -> Result<Recipient> {
        self.listed_recipient(sender, to, 0)
    }

    /// [`Accounts::recipient`], where `list_version` is the recipient's device list
    /// version the sender holds (0: not checked): an older one than the account's is
    /// [`Error::StaleDeviceList`], checked before the device, so a sender naming a
    /// removed device learns to refresh.
    pub fn listed_recipient(
        &self,
        sender: &AuthenticatedDevice,
        to: DeviceAddress,
        list_version: u64,
    ) -> Result<Recipient> {
        // The sender's device may have been removed (on another node, whose
        // tombstone this node never saw) while its connection here stayed open.
        let me = sender.address();
        // The cache (reloaded at most every 100 ms when the device is missing); only
        // when it still lacks the device, the store itself, so a device added on
        // another node moments ago is not refused.
        let sender_listed = self.known(&me.account, Some(me.device))?.is_some()
            || self
                .store
                .get(&me.account)?
                .is_some_and(|r| r.device_key(me.device).is_some());
        if !sender_listed {
            return Err(Error::Unauthorized);
        }
        let known = self
            .known(&to.account, None)?
            .ok_or(Error::UnknownRecipient)?;
        check_list_version(&known, list_version)?;
        if !known.devices.contains(&to.device)
            && self.known(&to.account, Some(to.device))?.is_none()
        {
            return Err(Error::UnknownRecipient);
        }
        Ok(Recipient {
            address: to,
            from: SenderKey::Account(sender.address().account),
        })
    }

    /// `to` as the recipient of a sender the relay does not know, who shows the
    /// recipient account's delivery token. A missing account and a wrong token get the
    /// same answer, so the relay does not confirm who has an account. `from` is the
    /// address prefix the send came from: the sealed send limits count it.
    pub fn sealed_recipient(
        &self,
        to: DeviceAddress,
        token: &[u8],
        from: AddressPrefix,
    ) -> Result<Recipient> {
        self.listed_sealed_recipient(to, token, from, 0)
    }

    /// [`Accounts::sealed_recipient`] with the sender's `list_version` checked as
    /// for [`Accounts::listed_recipient`], after the token.
    pub fn listed_sealed_recipient(
        &self,
        to: DeviceAddress,
        token: &[u8],
        from: AddressPrefix,
        list_version: u64,
    ) -> Result<Recipient> {
        let mut checked = self.sealed_recipients(&to.account, token, list_version, &[to.device])?;
        let address = checked.pop().ok_or(Error::UnknownRecipient)??;
        Ok(Recipient {
            address,
            from: SenderKey::Prefix(from),
        })
    }

    /// The devices of one account in a multi-recipient send (or a sealed send's one
    /// device), checked with the token and the list version once for the account:
    /// `Err` refuses all of them ([`Error::Unauthorized`] for a missing account or a
    /// wrong token, [`Error::StaleDeviceList`]); else each device in order,
    /// `Err(UnknownRecipient)` for one the account does not have.
    pub fn sealed_recipients(
        &self,
        account: &AccountId,
        token: &[u8],
        list_version: u64,
        devices: &[DeviceId],
    ) -> Result<Vec<Result<DeviceAddress>>> {
        let known = self.known(account, None)?.ok_or(Error::Unauthorized)?;
        check_token_hash(known.token.as_ref(), token)?;
        check_list_version(&known, list_version)?;
        devices
            .iter()
            .map(|&device| {
                let address = DeviceAddress {
                    account: *account,
                    device,
                };
                if known.devices.contains(&device) {
                    return Ok(Ok(address));
                }
                // A device added on another node since the entry was loaded (and the
                // token checked again against what was loaded with it).
                Ok(match self.known(account, Some(device))? {
                    Some(reloaded) => {
                        check_token_hash(reloaded.token.as_ref(), token)?;
                        Ok(address)
                    }
                    None => Err(Error::UnknownRecipient),
                })
            })
            .collect()
    }

    /// Drops what sends checked about `account` (deleted through this node), so the
    /// next send to it answers as to an account that never existed.
    pub(crate) fn forget(&self, account: &AccountId) {
        self.recipients.forget(account);
    }

    /// What a send checks about `account`, from the cache when fresh. With `device`,
    /// `None` unless the account has that device: a fresh entry without it is loaded
    /// again (unless loaded within [`RELOAD_AFTER`]).
    fn known(&self, account: &AccountId, device: Option<DeviceId>) -> Result<Option<Arc<Known>>> {
        let has = |k: &Option<Arc<Known>>| match device {
            Some(d) => k.as_ref().is_some_and(|k| k.devices.contains(&d)),
            None => k.is_some(),
        };
        if let Some((known, at)) = self.recipients.get(account) {
            // Without a device asked, an absent account is answered from the cache
            // as long as a present one: a probe cannot tell them apart by time.
            if device.is_none() || has(&known) {
                return Ok(known);
            }
            if at.elapsed() < RELOAD_AFTER {
                return Ok(None);
            }
        }
        let (at, changes) = (Instant::now(), self.recipients.changes());
        // Both read on every load, so a load takes as long whether or not the
        // account exists.
        let token = self.store.delivery_token(account)?;
        let list_version = self.store.device_list_version(account)?;
        let known = self.store.get(account)?.map(|record| {
            Arc::new(Known {
                token,
                devices: record.devices.iter().map(|(id, _)| *id).collect(),
                list_version,
            })
        });
        self.recipients.put(*account, known.clone(), at, changes);
        Ok(if has(&known) { known } else { None })
    }
}

/// Whether `token` is `account`'s delivery token: its hash is compared with the
/// stored one in constant time, so the time taken tells nothing of how much of a
/// guess was right. An account without a token (or none at all) gets the same
/// [`Error::Unauthorized`] as a wrong token.
pub(crate) fn check_delivery_token(
    store: &dyn AccountStore,
    account: &AccountId,
    token: &[u8],
) -> Result<()> {
    check_token_hash(store.delivery_token(account)?.as_ref(), token)
}

/// What [`Accounts::list_devices`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The account's device ids, as the relay holds them.
    pub devices: Vec<DeviceId>,
    /// Its signed device list, if it published one.
    pub list: Option<StoredList>,
}

/// Refuses a send whose sender holds an older device list than the account's (0:
/// the sender does not check).
fn check_list_version(known: &Known, list_version: u64) -> Result<()> {
    if list_version != 0 && list_version < known.list_version {
        return Err(Error::StaleDeviceList);
    }
    Ok(())
}

/// Whether `token` hashes to `expected` (compared in constant time).
/// Checks `token` against the stored SHA-256 `expected` in constant time; a missing
/// hash and a wrong token both answer [`Error::Unauthorized`].
pub(crate) fn check_token_hash(expected: Option<&[u8; 32]>, token: &[u8]) -> Result<()> {
    let expected = expected.ok_or(Error::Unauthorized)?;
    let presented: [u8; 32] = Sha256::digest(token).into();
    if !bool::from(presented.ct_eq(expected)) {
        return Err(Error::Unauthorized);
    }
    Ok(())
}

#[cfg(test)]
mod device_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimitsConfig;
    use crate::core::delivery::DeliveryWindow;
    use crate::core::limits::Limits;
    use crate::testing::{device, fixture, fixture_with, ids, msgs};
    use ed25519_dalek::Signer;
    use std::time::Duration;

    fn device_key(i: u8) -> [u8; 32] {
        ed25519_dalek::SigningKey::from_bytes(&[i; 32])
            .verifying_key()
            .to_bytes()
    }

    #[tokio::test]
    async fn devices_are_added_by_the_account_itself_up_to_the_cap() {
        let rates = RateLimitsConfig {
            max_devices_per_account: 3,
            ..RateLimitsConfig::default()
        };
        let f = fixture_with(Limits::default(), &rates);
        let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
        // Bob's identity signed it, but Alice's connection asks: refused.
        let bob_account = bob.address().account;
        let signature = crate::testing::identity_of(2)
            .sign(&tern_proto::auth::device_certificate(
                Some(&bob_account),
                &device_key(50),
            ))
            .to_bytes();
        let foreign = f
            .services
            .accounts()
            .add_device(&alice, &bob_account, &device_key(50), &signature)
            .await;
        assert!(matches!(foreign, Err(Error::Unauthorized)), "{foreign:?}");

        let second = f.add_device(&bob, 2, device_key(50)).await.expect("second");
        assert_eq!(
            f.add_device(&bob, 2, device_key(50)).await.expect("again"),
            second,
            "a key already there keeps its id"
        );
        f.add_device(&bob, 2, device_key(51)).await.expect("third");
        let full = f.add_device(&bob, 2, device_key(52)).await;
        assert!(
            matches!(full, Err(Error::TooManyDevices { max: 3 })),
            "{full:?}"
        );
        assert_eq!(
            full.map_err(|e| e.code()).unwrap_err(),
            tern_proto::ErrorCode::QuotaExceeded
        );
        assert_eq!(
            f.store
                .get(&bob_account)
                .expect("get")
                .expect("bob")
                .devices
                .len(),
            3,
            "nothing was added past the cap"
        );
        // A signature by another identity is still refused before anything else.
        let forged = f.add_device(&bob, 9, device_key(53)).await;
        assert!(matches!(forged, Err(Error::Unauthorized)), "{forged:?}");
    }

    #[tokio::test]
    async fn add_device_is_rate_limited_per_account_and_recovers() {
        let rates = RateLimitsConfig {
            add_device_per_account: "2/1day".parse().expect("rate"),
            ..RateLimitsConfig::default()
        };
        let f = fixture_with(Limits::default(), &rates);
        let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
        f.add_device(&bob, 2, device_key(50)).await.expect("first");
        f.add_device(&bob, 2, device_key(51)).await.expect("second");
        let retry_after_ms = match f.add_device(&bob, 2, device_key(52)).await {
            Err(Error::RateLimited { retry_after_ms }) => retry_after_ms,
            other => panic!("expected RATE_LIMITED, got {other:?}"),
        };
        assert_eq!(retry_after_ms, 43_200_000, "one add refills in half a day");
        f.add_device(&alice, 1, device_key(60))
            .await
            .expect("another account has its own rate");
        f.clock.advance(Duration::from_millis(retry_after_ms));
        f.add_device(&bob, 2, device_key(52))
            .await
            .expect("after the wait");
    }

    #[tokio::test]
    async fn sealed_sends_need_the_recipients_delivery_token() {
        let f = fixture(Limits::default());
        let bob = device(&f, 2).await;
        let to = *bob.address();
        let token = [3u8; 32];
        // No token set yet: refused, exactly like an unknown account.
        assert!(matches!(
            f.sealed_send(to, &token, &msgs(0..1, 4)).await,
            Err(Error::Unauthorized)
        ));
        let nobody = DeviceAddress::from_wire(&[0xee; 16], 1).expect("addr");
        assert!(matches!(
            f.sealed_send(nobody, &token, &msgs(0..1, 4)).await,
            Err(Error::Unauthorized)
        ));

        // A hash of another length no longer reaches the service: the request layer
        // refuses it (tern-proto's request tests), and the type says 32 bytes.
        f.set_token(&bob, &token).await;
        assert_eq!(
            f.sealed_send(to, &token, &msgs(0..2, 4))
                .await
                .expect("sealed send"),
            2
        );
        assert!(matches!(
            f.sealed_send(to, &[4u8; 32], &msgs(2..3, 4)).await,
            Err(Error::Unauthorized)
        ));
        let no_device = DeviceAddress {
            account: to.account,
            device: DeviceId::new(7).expect("id"),
        };
        assert!(matches!(
            f.sealed_send(no_device, &token, &msgs(2..3, 4)).await,
            Err(Error::UnknownRecipient)
        ));

        // Rotation: the old token stops working.
        f.set_token(&bob, &[5u8; 32]).await;
        assert!(matches!(
            f.sealed_send(to, &token, &msgs(2..3, 4)).await,
            Err(Error::Unauthorized)
        ));
        assert_eq!(
            f.sealed_send(to, &[5u8; 32], &msgs(2..3, 4))
                .await
                .expect("new token"),
            1
        );
        let got = f
            .services
            .mailboxes()
            .pull(&bob, &mut DeliveryWindow::new(10))
            .expect("pull");
        assert_eq!(ids(&got), vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn another_nodes_changes_reach_sends_within_the_cache_ttl() {
        let f = fixture(Limits::default());
        let bob = device(&f, 2).await;
        let to = *bob.address();
        let accounts = f.services.stores().accounts.clone();
        f.set_token(&bob, &[3u8; 32]).await;
        assert_eq!(
            f.sealed_send(to, &[3u8; 32], &msgs(0..1, 4)).await.ok(),
            Some(1)
        );

        // Another node adds a device: straight into the store.
        let added = accounts
            .add_device(&to.account, &device_key(60), 1)
            .expect("add")
            .expect("a device id");
        let second = DeviceAddress {
            account: to.account,
            device: added,
        };
        tokio::time::sleep(RELOAD_AFTER).await;
        assert_eq!(
            f.sealed_send(second, &[3u8; 32], &msgs(0..1, 4)).await.ok(),
            Some(1),
            "a device missing from the entry reloads it"
        );
        // Another node rotates the token: the old one opens sends until the entry
        // expires, and a reload for a device checks the token again.
        let new: [u8; 32] = Sha256::digest([5u8; 32]).into();
        accounts
            .set_delivery_token(&to.account, &new)
            .expect("rotate");
        assert_eq!(
            f.sealed_send(to, &[3u8; 32], &msgs(1..2, 4)).await.ok(),
            Some(1)
        );
        let third = DeviceAddress {
            account: to.account,
            device: accounts
                .add_device(&to.account, &device_key(61), 1)
                .expect("add")
                .expect("a device id"),
        };
        tokio::time::sleep(RELOAD_AFTER).await;
        assert!(matches!(
            f.sealed_send(third, &[3u8; 32], &msgs(0..1, 4)).await,
            Err(Error::Unauthorized)
        ));
        tokio::time::sleep(cache::TTL).await;
        assert!(matches!(
            f.sealed_send(to, &[3u8; 32], &msgs(2..3, 4)).await,
            Err(Error::Unauthorized)
        ));
        assert_eq!(
            f.sealed_send(to, &[5u8; 32], &msgs(2..3, 4)).await.ok(),
            Some(1)
        );
    }
}
