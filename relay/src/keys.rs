//! The key directory: devices publish their identity agreement key, signed prekey and
//! one-time prekeys; others fetch them to start sessions. Signatures are checked
//! before anything is stored, and each one-time prekey is handed out once. The
//! identity agreement key is always identity-signed; the signed prekey is signed by
//! the identity key or, on a linked device (which has no identity key), by the
//! publishing device's own key.
//!
//! A fetch comes from an authenticated device, or from anyone who shows the target
//! account's delivery token ([`Requester`]): a contact's client fetches on a
//! connection that identifies no one, so the relay does not learn who starts a
//! session with whom. A wrong token, and an account that does not exist, both get
//! `UNAUTHORIZED`, as for a sealed send.
//!
//! Fetches are limited per requester (its account, or its address prefix when it has
//! no authenticated device), and one-time prekeys per target device
//! (`one_time_prekeys_per_device`, below what a device replenishes), so nobody drains
//! a device's pool. Past the device's rate a fetch by default gets the bundle without
//! a one-time prekey rather than a refusal: X3DH works without one, so a flood of
//! fetches cannot stop others from starting sessions (`over_prekey_limit`).

use std::sync::Arc;

use tern_proto::{AccountId, DeviceAddress, DeviceBundle, DeviceId, KeyUpload};

use crate::accounts::check_delivery_token;
use crate::core::auth::{self, AuthenticatedDevice};
use crate::core::budget::Budget;
use crate::core::rate::{AddressPrefix, RateLimits, SenderKey};
use crate::error::{Error, Result};
use crate::store::{AccountStore, FetchedKeys, GroupCommit, KeyStore, OneTimeKey};

/// Most one-time prekeys a device may hold on the relay.
pub(crate) const MAX_ONE_TIME_PREKEYS: u64 = 1000;

/// Prekey bundles of an account's devices.
#[derive(Debug, Clone)]
pub(crate) struct AccountKeys {
    /// The account's Ed25519 identity key.
    pub(crate) identity_key: [u8; 32],
    /// One bundle per device that has published keys.
    pub(crate) devices: Vec<(DeviceId, FetchedKeys)>,
}

/// Who fetches keys, and what speaks for it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Requester<'a> {
    /// An authenticated device, with no token (the fetch of older clients).
    Device(&'a AuthenticatedDevice),
    /// Anyone showing the target account's delivery token: counted against the
    /// authenticated device's account if there is one, else the address prefix.
    Token {
        token: &'a [u8],
        device: Option<&'a AuthenticatedDevice>,
        from: AddressPrefix,
    },
}

impl<'a> From<&'a AuthenticatedDevice> for Requester<'a> {
    fn from(device: &'a AuthenticatedDevice) -> Self {
        Requester::Device(device)
    }
}

impl Requester<'_> {
    /// Who the per-requester limit counts.
    fn key(&self) -> SenderKey {
        match self {
            Requester::Device(d)
            | Requester::Token {
                device: Some(d), ..
            } => SenderKey::Account(d.address().account),
            Requester::Token {
                device: None, from, ..
            } => SenderKey::Prefix(*from),
        }
    }
}

/// The key directory service. See the module docs.
pub(crate) struct KeyDirectory {
    accounts: Arc<dyn AccountStore>,
    keys: Arc<dyn KeyStore>,
    commit: Arc<GroupCommit>,
    rates: Arc<RateLimits>,
    budget: Arc<Budget>,
}

impl std::fmt::Debug for KeyDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyDirectory").finish_non_exhaustive()
    }
}

impl AccountKeys {
    /// The bundles as a fetch answers them.
    pub(crate) fn into_bundles(self) -> Vec<DeviceBundle> {
        let identity_key = self.identity_key;
        self.devices
            .into_iter()
            .map(|(device, k)| DeviceBundle {
                device,
                identity_key,
                identity_dh: k.identity_dh,
                signed_prekey: k.signed_prekey,
                one_time_prekey: k.one_time.map(|o| (o.id, o.key)),
            })
            .collect()
    }
}

impl KeyDirectory {
    /// Keys kept in `keys`, checked against the identity keys in `accounts`, handed
    /// out under `rates`.
    pub(crate) fn new(
        accounts: Arc<dyn AccountStore>,
        keys: Arc<dyn KeyStore>,
        commit: Arc<GroupCommit>,
        rates: Arc<RateLimits>,
        budget: Arc<Budget>,
    ) -> Self {
        KeyDirectory {
            accounts,
            keys,
            commit,
            rates,
            budget,
        }
    }

    /// Checks and stores keys a device publishes; returns its one-time pool size.
    /// Nothing is stored unless every signature verifies.
    pub(crate) async fn publish(
        &self,
        device: &AuthenticatedDevice,
        keys: &KeyUpload,
    ) -> Result<u64> {
        self.budget.check_reserve()?;
        let addr = device.address();
        let record = self
            .accounts
            .get(&addr.account)?
            .ok_or(Error::Unauthorized)?;
        // A device removed on another node, its connection here not yet closed.
        let device_key = record.device_key(addr.device).ok_or(Error::Unauthorized)?;
        if let Some(k) = &keys.identity_dh {
            auth::verify_vouched_key(
                &record.identity_key,
                &k.key,
                tern_proto::auth::identity_agreement_key,
                &k.signature,
            )?;
        }
        if let Some(k) = &keys.signed_prekey {
            let layout = |key: &[u8; 32]| tern_proto::auth::signed_prekey(k.id, key);
            let by_identity =
                auth::verify_vouched_key(&record.identity_key, &k.key, layout, &k.signature);
            // A linked device has no identity key: it signs its signed prekey with
            // its own device key, which the account's signed device list binds to
            // the identity (senders check that binding, not the relay).
            if by_identity.is_err() {
                auth::verify_vouched_key(device_key, &k.key, layout, &k.signature)?;
            }
        }
        let one_time: Vec<OneTimeKey> = keys
            .one_time
            .iter()
            .map(|&(id, key)| OneTimeKey { id, key })
            .collect();
        let held = self.keys.one_time_count(addr)?;
        if held.saturating_add(one_time.len() as u64) > MAX_ONE_TIME_PREKEYS {
            return Err(Error::TooLarge {
                what: "one-time prekey pool",
                size: (held as usize).saturating_add(one_time.len()),
                max: MAX_ONE_TIME_PREKEYS as usize,
            });
        }
        let count = self.keys.publish(
            addr,
            keys.identity_dh.as_ref(),
            keys.signed_prekey.as_ref(),
            &one_time,
        )?;
        self.commit.commit().await?;
        Ok(count)
    }

    /// Prekey bundles of `account`'s devices (or of one device), each consuming one
    /// one-time prekey while the device's rate allows. Returns the account's identity
    /// key with them. Devices that have not published keys are left out.
    pub(crate) fn fetch<'a>(
        &self,
        requester: impl Into<Requester<'a>>,
        account: &AccountId,
        device: Option<DeviceId>,
    ) -> Result<AccountKeys> {
        let requester = requester.into();
        self.rates.fetch_keys(&requester.key())?;
        if let Requester::Token { token, .. } = requester {
            check_delivery_token(self.accounts.as_ref(), account, token)?;
        }
        let record = self.accounts.get(account)?.ok_or(Error::UnknownRecipient)?;
        // Every device's decision first: a refusal must not follow a key handed out.
        let mut wanted = Vec::new();
        for (id, _) in record
            .devices
            .iter()
            .filter(|(id, _)| device.is_none_or(|d| d == *id))
        {
            let addr = DeviceAddress {
                account: *account,
                device: *id,
            };
            wanted.push((addr, self.rates.take_one_time_prekey(&addr)?));
        }
        let mut bundles = Vec::new();
        for (addr, one_time) in wanted {
            if let Some(keys) = self.keys.fetch(&addr, one_time)? {
                bundles.push((addr.device, keys));
            }
        }
        if bundles.is_empty() {
            return Err(Error::UnknownRecipient);
        }
        Ok(AccountKeys {
            identity_key: record.identity_key,
            devices: bundles,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimitsConfig;
    use crate::core::limits::Limits;
    use crate::store::KeyStore;
    use crate::testing::{device, fixture, fixture_with, identity_of};
    use ed25519_dalek::Signer;
    use std::time::Duration;
    use tern_proto::SignedKey;

    fn signed(id: u32, key: &[u8; 32], signature: &[u8; 64]) -> Option<SignedKey> {
        Some(SignedKey {
            id,
            key: *key,
            signature: *signature,
        })
    }

    #[tokio::test]
    async fn prekeys_are_checked_and_each_one_time_key_handed_out_once() {
        let f = fixture(Limits::default());
        let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
        let id = identity_of(2);
        let dh = [5u8; 32];
        let dh_sig = id
            .sign(&tern_proto::auth::identity_agreement_key(&dh))
            .to_bytes();
        let spk = [6u8; 32];
        let spk_sig = id
            .sign(&tern_proto::auth::signed_prekey(1, &spk))
            .to_bytes();
        let otk = [[7u8; 32], [8u8; 32]];

        // A signed prekey signed for another id is refused, and nothing is stored.
        let bad = KeyUpload {
            signed_prekey: signed(2, &spk, &spk_sig),
            ..Default::default()
        };
        assert!(matches!(
            f.services.keys().publish(&bob, &bad).await,
            Err(Error::Unauthorized)
        ));
        // Signed by someone else's identity.
        let foreign = identity_of(9)
            .sign(&tern_proto::auth::identity_agreement_key(&dh))
            .to_bytes();
        let bad = KeyUpload {
            identity_dh: signed(0, &dh, &foreign),
            ..Default::default()
        };
        assert!(f.services.keys().publish(&bob, &bad).await.is_err());
        assert!(matches!(
            f.services
                .keys()
                .fetch(&alice, &bob.address().account, None),
            Err(Error::UnknownRecipient)
        ));

        let good = KeyUpload {
            identity_dh: signed(0, &dh, &dh_sig),
            signed_prekey: signed(1, &spk, &spk_sig),
            one_time: vec![(10, otk[0]), (11, otk[1])],
        };
        assert_eq!(
            f.services
                .keys()
                .publish(&bob, &good)
                .await
                .expect("publish"),
            2
        );
        let fetch = || {
            f.services
                .keys()
                .fetch(&alice, &bob.address().account, None)
                .expect("fetch")
        };
        let AccountKeys {
            identity_key,
            devices: first,
        } = fetch();
        assert_eq!(identity_key, id.verifying_key().to_bytes());
        assert_eq!(first[0].1.identity_dh.key, dh);
        assert_eq!(first[0].1.signed_prekey.key, spk);
        let second = fetch().devices;
        let third = fetch().devices;
        let one_time: Vec<_> = [&first, &second, &third]
            .iter()
            .map(|b| b[0].1.one_time.map(|k| k.id))
            .collect();
        assert_eq!(
            one_time,
            vec![Some(10), Some(11), None],
            "once each, then the signed prekey alone"
        );
        let unknown = AccountId([0xee; 16]);
        assert!(matches!(
            f.services.keys().fetch(&alice, &unknown, None),
            Err(Error::UnknownRecipient)
        ));
    }

    /// Publishes a bundle with `n` one-time prekeys for `dev`, registered with `seed`.
    async fn publish(f: &crate::testing::Fixture, dev: &AuthenticatedDevice, seed: u8, n: u32) {
        let id = identity_of(seed);
        let (dh, spk) = ([5u8; 32], [6u8; 32]);
        let upload = KeyUpload {
            identity_dh: signed(
                0,
                &dh,
                &id.sign(&tern_proto::auth::identity_agreement_key(&dh))
                    .to_bytes(),
            ),
            signed_prekey: signed(
                1,
                &spk,
                &id.sign(&tern_proto::auth::signed_prekey(1, &spk))
                    .to_bytes(),
            ),
            one_time: (0..n).map(|i| (i, [i as u8; 32])).collect(),
        };
        f.services
            .keys()
            .publish(dev, &upload)
            .await
            .expect("publish");
    }

    fn one_time_of(keys: &AccountKeys) -> Option<u32> {
        keys.devices[0].1.one_time.map(|k| k.id)
    }

    #[tokio::test]
    async fn fetches_are_limited_per_requester() {
        let rates = RateLimitsConfig {
            fetch_keys_per_requester: "3/1h".parse().expect("rate"),
            ..RateLimitsConfig::default()
        };
        let f = fixture_with(Limits::default(), &rates);
        let (alice, bob, carol) = (
            device(&f, 1).await,
            device(&f, 2).await,
            device(&f, 3).await,
        );
        publish(&f, &bob, 2, 10).await;
        let bob_account = bob.address().account;
        for _ in 0..3 {
            f.services
                .keys()
                .fetch(&alice, &bob_account, None)
                .expect("within");
        }
        let refused = f.services.keys().fetch(&alice, &bob_account, None);
        let Err(Error::RateLimited { retry_after_ms }) = refused else {
            panic!("expected RATE_LIMITED, got {refused:?}");
        };
        assert_eq!(retry_after_ms, 1_200_000);
        f.services
            .keys()
            .fetch(&carol, &bob_account, None)
            .expect("Carol's own rate");
        f.clock.advance(Duration::from_millis(retry_after_ms));
        f.services
            .keys()
            .fetch(&alice, &bob_account, None)
            .expect("after the wait");
    }

    fn from(ip: [u8; 4]) -> AddressPrefix {
        AddressPrefix::from(std::net::IpAddr::from(ip))
    }

    fn with_token<'a>(token: &'a [u8], ip: [u8; 4]) -> Requester<'a> {
        Requester::Token {
            token,
            device: None,
            from: from(ip),
        }
    }

    /// Bob, with keys and the delivery token `token`.
    async fn bob_with_token(f: &crate::testing::Fixture, token: &[u8]) -> AuthenticatedDevice {
        let bob = device(f, 2).await;
        publish(f, &bob, 2, 10).await;
        f.set_token(&bob, token).await;
        bob
    }

    #[tokio::test]
    async fn a_delivery_token_fetches_without_a_device_and_a_wrong_one_is_refused() {
        let f = fixture(Limits::default());
        let bob = bob_with_token(&f, b"bob's token").await;
        let account = bob.address().account;
        let keys = f.services.keys();
        let got = (keys.fetch(with_token(b"bob's token", [10, 0, 0, 1]), &account, None))
            .expect("with the token");
        assert_eq!(got.identity_key, identity_of(2).verifying_key().to_bytes());
        assert_eq!(
            one_time_of(&got),
            Some(0),
            "a one-time prekey, as for a device"
        );
        for wrong in [&b"bob's tokeN"[..], b"", &[0u8; 32]] {
            let refused = keys.fetch(with_token(wrong, [10, 0, 0, 1]), &account, None);
            assert!(matches!(refused, Err(Error::Unauthorized)), "{refused:?}");
        }
        // An account that does not exist answers as a wrong token does.
        let nobody = keys.fetch(
            with_token(b"bob's token", [10, 0, 0, 1]),
            &AccountId([0xee; 16]),
            None,
        );
        assert!(matches!(nobody, Err(Error::Unauthorized)), "{nobody:?}");
        // An authenticated device showing a token is checked too.
        let alice = device(&f, 1).await;
        let shown = Requester::Token {
            token: b"wrong",
            device: Some(&alice),
            from: from([10, 0, 0, 1]),
        };
        assert!(matches!(
            keys.fetch(shown, &account, None),
            Err(Error::Unauthorized)
        ));
        // Refusals took no one-time prekey.
        assert_eq!(f.store.one_time_count(bob.address()).expect("count"), 9);
    }

    #[tokio::test]
    async fn token_fetches_are_limited_per_address_prefix() {
        let rates = RateLimitsConfig {
            fetch_keys_per_requester: "3/1h".parse().expect("rate"),
            ..RateLimitsConfig::default()
        };
        let f = fixture_with(Limits::default(), &rates);
        let bob = bob_with_token(&f, b"t").await;
        let account = bob.address().account;
        let keys = f.services.keys();
        for _ in 0..3 {
            keys.fetch(with_token(b"t", [10, 0, 0, 1]), &account, None)
                .expect("within");
        }
        let refused = keys.fetch(with_token(b"t", [10, 0, 0, 1]), &account, None);
        let Err(Error::RateLimited { retry_after_ms }) = refused else {
            panic!("expected RATE_LIMITED, got {refused:?}");
        };
        assert_eq!(retry_after_ms, 1_200_000);
        // Wrong tokens count too: guessing costs the same rate.
        let guess = keys.fetch(with_token(b"guess", [10, 0, 0, 1]), &account, None);
        assert!(matches!(guess, Err(Error::RateLimited { .. })), "{guess:?}");
        // Another address, and an authenticated device, have rates of their own.
        keys.fetch(with_token(b"t", [10, 0, 0, 2]), &account, None)
            .expect("another address");
        let alice = device(&f, 1).await;
        keys.fetch(&alice, &account, None)
            .expect("a device's own rate");
        f.clock.advance(Duration::from_millis(retry_after_ms));
        keys.fetch(with_token(b"t", [10, 0, 0, 1]), &account, None)
            .expect("after the wait");
    }

    #[tokio::test]
    async fn one_time_prekeys_are_withheld_past_the_device_rate() {
        let rates = RateLimitsConfig {
            one_time_prekeys_per_device: "2/1day".parse().expect("rate"),
            ..RateLimitsConfig::default()
        };
        let f = fixture_with(Limits::default(), &rates);
        let (alice, bob, carol) = (
            device(&f, 1).await,
            device(&f, 2).await,
            device(&f, 3).await,
        );
        publish(&f, &bob, 2, 10).await;
        let bob_account = bob.address().account;
        let fetch = |by| {
            f.services
                .keys()
                .fetch(by, &bob_account, None)
                .expect("fetch")
        };
        assert_eq!(one_time_of(&fetch(&alice)), Some(0));
        assert_eq!(one_time_of(&fetch(&carol)), Some(1));
        // The drain stops here for everyone, but sessions can still start.
        let third = fetch(&carol);
        assert_eq!(one_time_of(&third), None, "withheld");
        assert_eq!(
            third.devices[0].1.signed_prekey.id, 1,
            "the rest of the bundle"
        );
        assert_eq!(one_time_of(&fetch(&alice)), None);
        assert_eq!(f.store.one_time_count(bob.address()).expect("count"), 8);
        f.clock.advance(Duration::from_secs(12 * 3600));
        assert_eq!(
            one_time_of(&fetch(&alice)),
            Some(2),
            "half a day refills one"
        );
        assert_eq!(one_time_of(&fetch(&alice)), None);
    }

    #[tokio::test]
    async fn one_time_prekey_fetches_may_be_refused_instead() {
        let rates = RateLimitsConfig {
            one_time_prekeys_per_device: "2/1day".parse().expect("rate"),
            over_prekey_limit: crate::config::PrekeyLimit::Refuse,
            ..RateLimitsConfig::default()
        };
        let f = fixture_with(Limits::default(), &rates);
        let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
        publish(&f, &bob, 2, 10).await;
        let bob_account = bob.address().account;
        for _ in 0..2 {
            f.services
                .keys()
                .fetch(&alice, &bob_account, None)
                .expect("within");
        }
        let refused = f.services.keys().fetch(&alice, &bob_account, None);
        let Err(Error::RateLimited { retry_after_ms }) = refused else {
            panic!("expected RATE_LIMITED, got {refused:?}");
        };
        assert_eq!(retry_after_ms, 43_200_000);
        assert_eq!(
            f.store.one_time_count(bob.address()).expect("count"),
            8,
            "none taken"
        );
        f.clock.advance(Duration::from_millis(retry_after_ms));
        let keys = f
            .services
            .keys()
            .fetch(&alice, &bob_account, None)
            .expect("after");
        assert_eq!(one_time_of(&keys), Some(2));
    }

    #[tokio::test]
    async fn the_one_time_pool_is_capped() {
        let f = fixture(Limits::default());
        let bob = device(&f, 2).await;
        let keys: Vec<[u8; 32]> = (0..=MAX_ONE_TIME_PREKEYS)
            .map(|i| [(i % 250) as u8; 32])
            .collect();
        let too_many = KeyUpload {
            one_time: keys
                .iter()
                .enumerate()
                .map(|(i, k)| (i as u32, *k))
                .collect(),
            ..Default::default()
        };
        assert!(matches!(
            f.services.keys().publish(&bob, &too_many).await,
            Err(Error::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn a_linked_device_signs_its_signed_prekey_with_its_own_device_key() {
        let f = fixture(Limits::default());
        let alice = device(&f, 1).await;
        let laptop_key = ed25519_dalek::SigningKey::from_bytes(&[61; 32]);
        let id = f
            .add_device(&alice, 1, laptop_key.verifying_key().to_bytes())
            .await
            .expect("linked");
        let at = DeviceAddress {
            account: alice.address().account,
            device: id,
        };
        let exporter = [3u8; 32];
        let proof = laptop_key.sign(&tern_proto::auth::session_proof(&exporter));
        let laptop = f
            .services
            .accounts()
            .authenticate(at, &exporter, &proof.to_bytes())
            .expect("auth");
        let (dh, spk) = ([5u8; 32], [6u8; 32]);
        let dh_sig = identity_of(1).sign(&tern_proto::auth::identity_agreement_key(&dh));
        let upload = |signer: &ed25519_dalek::SigningKey| {
            let spk_sig = signer.sign(&tern_proto::auth::signed_prekey(1, &spk));
            KeyUpload {
                identity_dh: signed(0, &dh, &dh_sig.to_bytes()),
                signed_prekey: signed(1, &spk, &spk_sig.to_bytes()),
                ..Default::default()
            }
        };
        let keys = f.services.keys();
        // The primary's device key is not the laptop's: refused.
        let primary_device = ed25519_dalek::SigningKey::from_bytes(&[101; 32]);
        let refused = keys.publish(&laptop, &upload(&primary_device)).await;
        assert!(matches!(refused, Err(Error::Unauthorized)), "{refused:?}");
        keys.publish(&laptop, &upload(&identity_of(1)))
            .await
            .expect("signed by the identity, as before");
        keys.publish(&laptop, &upload(&laptop_key))
            .await
            .expect("or by its own device key");
        let fetched = keys.fetch(&alice, &at.account, Some(id)).expect("fetch");
        assert_eq!(fetched.devices[0].1.signed_prekey.key, spk);
        // Its identity agreement key still needs the identity.
        let by_device = laptop_key.sign(&tern_proto::auth::identity_agreement_key(&dh));
        let dh_upload = KeyUpload {
            identity_dh: signed(0, &dh, &by_device.to_bytes()),
            ..Default::default()
        };
        assert!(matches!(
            keys.publish(&laptop, &dh_upload).await,
            Err(Error::Unauthorized)
        ));
    }
}
