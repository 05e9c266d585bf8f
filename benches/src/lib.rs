//! Tern benchmarks. `cargo bench -p tern-benches` runs the criterion benches in
//! `benches/`; this library holds what they share.

pub mod load;

use std::sync::Arc;

use ed25519_dalek::{Signer, SigningKey};
use tern_relay::clock::SystemClock;
use tern_relay::commit::{Durability, GroupCommit};
use tern_relay::core::auth::{self, AuthenticatedDevice};
use tern_relay::core::expiry::Ttl;
use tern_relay::core::limits::Limits;
use tern_relay::hub::{Hub, Stores};
use tern_relay::store::SledStore;

/// A hub over a sled store in a temporary directory, as the relay runs it.
pub struct SledHub {
    /// The hub.
    pub hub: Arc<Hub>,
    /// The store under it, for setting up state without going through sends.
    pub store: Arc<SledStore>,
    _dir: tempfile::TempDir,
}

impl SledHub {
    /// A fresh store with the given durability and generous limits.
    pub fn new(durability: Durability) -> std::io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let store =
            Arc::new(SledStore::open(dir.path(), 256 << 20).map_err(std::io::Error::other)?);
        let stores = Stores::all(store.clone());
        let commit = GroupCommit::start(stores.flush.clone(), durability)?;
        let limits = Limits {
            max_queued_messages: u64::MAX,
            max_queued_bytes: u64::MAX,
            ..Limits::default()
        };
        let signer = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let hub = Hub::new(
            stores,
            Arc::new(SystemClock),
            limits,
            Ttl::MAX,
            commit,
            signer,
        );
        Ok(SledHub {
            hub: Arc::new(hub),
            store,
            _dir: dir,
        })
    }

    /// Registers a device, as a connection's registration would.
    pub async fn device(&self, seed: u8) -> AuthenticatedDevice {
        let identity = SigningKey::from_bytes(&[seed; 32]);
        let device = SigningKey::from_bytes(&[seed ^ 0xff; 32]);
        let device_pub = device.verifying_key().to_bytes();
        let exporter = [seed; 32];
        let verified = auth::verify_registration(
            &identity.verifying_key().to_bytes(),
            &device_pub,
            &identity
                .sign(&tern_proto::auth::device_certificate(None, &device_pub))
                .to_bytes(),
            &device
                .sign(&tern_proto::auth::session_proof(&exporter))
                .to_bytes(),
            &exporter,
        )
        .unwrap_or_else(|e| panic!("bench keys are valid: {e}"));
        self.hub
            .register(verified)
            .await
            .unwrap_or_else(|e| panic!("register: {e}"))
    }
}
