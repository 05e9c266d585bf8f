//! What the services' unit tests share: services over a memory store on a manual
//! clock, registered devices, and sends.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::{Signer, SigningKey};
use tern_platform::clock::ManualClock;
use tern_proto::{DeviceAddress, MessageId};

use crate::config::RateLimitsConfig;
use crate::core::auth::{self, AuthenticatedDevice};
use crate::core::budget::Budget;
use crate::core::expiry::Ttl;
use crate::core::limits::Limits;
use crate::core::rate::AddressPrefix;
use crate::error::Result;
use crate::mailboxes::Pull;
use crate::server::Services;
use crate::store::{Durability, Envelope, MemoryStore, Stores};

pub(crate) struct Fixture {
    pub(crate) services: Arc<Services>,
    pub(crate) clock: Arc<ManualClock>,
    pub(crate) store: Arc<MemoryStore>,
}

pub(crate) fn fixture(limits: Limits) -> Fixture {
    fixture_with(limits, &RateLimitsConfig::default())
}

/// A fixture under the given rate limits.
pub(crate) fn fixture_with(limits: Limits, rates: &RateLimitsConfig) -> Fixture {
    fixture_with_budget(limits, rates, Arc::default())
}

/// A fixture over `stores` (default limits); `store` is only carried along.
pub(crate) fn fixture_on(stores: Stores, store: Arc<MemoryStore>) -> Fixture {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let ttl = Ttl::new(Duration::from_secs(3600)).expect("ttl");
    let services = Services::with_budget(
        stores,
        clock.clone(),
        Limits::default(),
        ttl,
        Durability::Fsync,
        SigningKey::from_bytes(&[42; 32]),
        &RateLimitsConfig::default(),
        Arc::default(),
    )
    .expect("services");
    Fixture {
        services: Arc::new(services),
        clock,
        store,
    }
}

/// A fixture under the given rate limits and relay-wide budget.
pub(crate) fn fixture_with_budget(
    limits: Limits,
    rates: &RateLimitsConfig,
    budget: Arc<Budget>,
) -> Fixture {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(1_000_000));
    let ttl = Ttl::new(Duration::from_secs(3600)).expect("ttl");
    let services = Services::with_budget(
        Stores::all(store.clone()),
        clock.clone(),
        limits,
        ttl,
        Durability::Fsync,
        SigningKey::from_bytes(&[42; 32]),
        rates,
        budget,
    )
    .expect("services");
    Fixture {
        services: Arc::new(services),
        clock,
        store,
    }
}

impl Fixture {
    /// A send from an authenticated device, as a connection makes it.
    pub(crate) async fn send(
        &self,
        sender: &AuthenticatedDevice,
        to: DeviceAddress,
        msgs: &[Envelope],
    ) -> Result<usize> {
        let to = self.services.accounts().recipient(sender, to)?;
        self.services.mailboxes().append(&to, msgs)?.commit().await
    }

    /// A sealed send from 127.0.0.1, as a connection makes it.
    pub(crate) async fn sealed_send(
        &self,
        to: DeviceAddress,
        token: &[u8],
        msgs: &[Envelope],
    ) -> Result<usize> {
        self.sealed_send_from([127, 0, 0, 1], to, token, msgs).await
    }

    /// A sealed send from the IPv4 address `from`.
    pub(crate) async fn sealed_send_from(
        &self,
        from: [u8; 4],
        to: DeviceAddress,
        token: &[u8],
        msgs: &[Envelope],
    ) -> Result<usize> {
        let from = AddressPrefix::from(std::net::IpAddr::from(from));
        let to = self.services.accounts().sealed_recipient(to, token, from)?;
        self.services.mailboxes().append(&to, msgs)?.commit().await
    }

    /// Sets `device`'s account's delivery token to `token` (the relay keeps its hash).
    pub(crate) async fn set_token(&self, device: &AuthenticatedDevice, token: &[u8]) {
        let hash: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(token).into();
        self.services
            .accounts()
            .set_delivery_token(device, &hash)
            .await
            .expect("token");
    }

    /// Adds a device with key `key` to `by`'s account, signed by the identity of
    /// `seed` (the seed `by` was registered with).
    pub(crate) async fn add_device(
        &self,
        by: &AuthenticatedDevice,
        seed: u8,
        key: [u8; 32],
    ) -> Result<tern_proto::DeviceId> {
        let account = by.address().account;
        let signature = identity_of(seed)
            .sign(&tern_proto::auth::device_certificate(Some(&account), &key))
            .to_bytes();
        self.services
            .accounts()
            .add_device(by, &account, &key, &signature)
            .await
    }
}

pub(crate) async fn device(f: &Fixture, seed: u8) -> AuthenticatedDevice {
    f.services
        .accounts()
        .register(registration(seed))
        .await
        .expect("register")
}

/// A verified registration of a new account from `seed`.
pub(crate) fn registration(seed: u8) -> auth::VerifiedRegistration {
    let identity = SigningKey::from_bytes(&[seed; 32]);
    let dev = SigningKey::from_bytes(&[seed.wrapping_add(100); 32]);
    let dev_pub = dev.verifying_key().to_bytes();
    let exporter = [seed; 32];
    auth::verify_registration(
        &identity.verifying_key().to_bytes(),
        &dev_pub,
        &identity
            .sign(&tern_proto::auth::device_certificate(None, &dev_pub))
            .to_bytes(),
        &dev.sign(&tern_proto::auth::session_proof(&exporter))
            .to_bytes(),
        &exporter,
    )
    .expect("valid registration")
}

pub(crate) fn msgs(range: std::ops::Range<u8>, len: usize) -> Vec<Envelope> {
    range
        .map(|i| Envelope {
            message_id: MessageId([i; 16]),
            payload: Bytes::from(vec![i; len]),
        })
        .collect()
}

pub(crate) fn ids(pull: &Pull) -> Vec<u8> {
    pull.messages.iter().map(|m| m.message_id.0[0]).collect()
}

pub(crate) fn identity_of(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}
