//! Assembles a running relay: stores, hub, QUIC endpoint, sweeper, and an orderly
//! shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tern_proto::RelayAddress;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use tern_platform::clock::Clock;
use crate::commit::GroupCommit;
use crate::config::Config;
use crate::config::MailboxBackend;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::hub::Stores;
use crate::media::BlobStore;
use crate::net::{self, tls, ConnSettings};
use crate::store::{LogOptions, LogStore, SledStore};

/// A running relay. Dropping it without [`Relay::shutdown`] stops it abruptly.
#[derive(Debug)]
pub struct Relay {
    address: RelayAddress,
    local_addr: SocketAddr,
    hub: Arc<Hub>,
    blobs: Arc<BlobStore>,
    endpoint: quinn::Endpoint,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay on its stores in `config.data_dir`: the sled database in `db/`
    /// and, by default, the mailbox log in `mailboxes/`.
    pub async fn start(config: &Config, clock: Arc<dyn Clock>) -> Result<Relay> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| Error::Config(format!("creating {}: {e}", config.data_dir.display())))?;
        let sled = Arc::new(SledStore::open(
            &config.data_dir.join("db"),
            config.storage.cache_mb << 20,
        )?);
        let stores = match config.storage.mailboxes {
            MailboxBackend::Log => {
                let options = LogOptions {
                    segment_bytes: config.storage.segment_mb << 20,
                    ..LogOptions::default()
                };
                let log = LogStore::open(&config.data_dir.join("mailboxes"), options)?;
                Stores::split(Arc::new(log), sled)
            }
            MailboxBackend::Sled => Stores::all(sled),
        };
        Self::start_with(config, stores, clock).await
    }

    /// Starts a relay on the given stores (the certificate still lives in
    /// `config.data_dir`).
    pub async fn start_with(
        config: &Config,
        stores: Stores,
        clock: Arc<dyn Clock>,
    ) -> Result<Relay> {
        config.validate()?;
        let ttl = config
            .message_ttl()
            .ok_or_else(|| Error::Config("invalid message_ttl".into()))?;
        std::fs::create_dir_all(&config.data_dir)?;
        let identity = tls::load_or_create(&config.tls, &config.data_dir)?;
        let fingerprint = identity.fingerprint();
        let mut server_config = tls::server_config(identity)?;
        server_config.transport_config(Arc::new(net::transport_config()));
        let signer = tls::load_or_create_signing_key(&config.data_dir)?;
        let endpoint = quinn::Endpoint::new(
            tls::endpoint_config(&signer),
            Some(server_config),
            std::net::UdpSocket::bind(config.listen)?,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local_addr = endpoint.local_addr()?;

        let blobs = Arc::new(
            BlobStore::open(
                &config.data_dir,
                stores.blobs.clone(),
                clock.clone(),
                config.blob_limits(),
            )
            .map_err(Error::from)?,
        );
        let commit = GroupCommit::start(stores.flush.clone(), config.durability)?;
        let hub = Arc::new(Hub::new(
            stores,
            clock,
            config.mailbox_limits(),
            ttl,
            commit,
            signer,
        ));
        let settings = Arc::new(ConnSettings {
            max_frame: config.limits.max_frame_bytes,
            max_requests: config.limits.max_requests_per_connection,
            delivery_window: config.limits.delivery_window,
            blobs: blobs.clone(),
            registrations: Arc::new(crate::core::rate::RateLimiter::new(
                u64::from(config.limits.registrations_per_address_per_minute),
                60_000,
            )),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let accept = tokio::spawn(net::accept_loop(
            endpoint.clone(),
            hub.clone(),
            settings,
            config.limits.max_connections,
            shutdown_rx.clone(),
        ));
        let sweeper = tokio::spawn(sweep_loop(
            hub.clone(),
            blobs.clone(),
            config.expiry.sweep_interval,
            config.expiry.sweep_batch,
            shutdown_rx,
        ));
        let host = config
            .advertise_host
            .clone()
            .unwrap_or_else(|| local_addr.ip().to_string());
        Ok(Relay {
            address: RelayAddress {
                fingerprint,
                host,
                port: local_addr.port(),
            },
            local_addr,
            hub,
            blobs,
            endpoint,
            shutdown,
            tasks: vec![accept, sweeper],
        })
    }

    /// The address clients use, with the certificate fingerprint they pin.
    pub fn address(&self) -> &RelayAddress {
        &self.address
    }

    /// The bound UDP address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The shared state, for operators' tools and tests.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The media store, for operators' tools and tests (its received-bytes counter).
    pub fn blobs(&self) -> &Arc<BlobStore> {
        &self.blobs
    }

    /// Stops accepting, lets open connections finish the requests they are handling,
    /// scrubs acknowledged messages from disk, flushes the stores and closes the endpoint.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.endpoint
            .close(tern_proto::close::SHUTTING_DOWN.into(), b"shutting down");
        let flushed = self.hub.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        flushed
    }
}

async fn sweep_loop(
    hub: Arc<Hub>,
    blobs: Arc<BlobStore>,
    every: Duration,
    batch: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let hub = hub.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let mut total = 0;
            loop {
                let n = hub.sweep(batch)?;
                total += n;
                if n < batch as u64 {
                    return Ok::<_, Error>(total);
                }
            }
        })
        .await;
        match swept {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(messages = n, "deleted expired messages"),
            Ok(Err(e)) => warn!(error = %e, "expiry sweep failed"),
            Err(e) => warn!(error = %e, "expiry sweep panicked"),
        }
        let blobs = blobs.clone();
        let swept = tokio::task::spawn_blocking(move || blobs.sweep(batch)).await;
        match swept {
            Ok(Ok(s)) if s.blobs + s.uploads > 0 => {
                info!(
                    blobs = s.blobs,
                    uploads = s.uploads,
                    "deleted expired media"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "media sweep failed"),
            Err(e) => warn!(error = %e, "media sweep panicked"),
        }
    }
}
