//! Push wake-ups (issue 19): a device that is not connected is told, with a
//! content-free POST, that its mailbox has mail.
//!
//! - Registration ([`Push::set`]): an authenticated device names a UnifiedPush
//!   endpoint (https; checked with the discovery GET the UnifiedPush server
//!   specification asks for before it is used) or its app publisher's gateway (a URL
//!   on the operator's `[push] gateways` allowlist) with an opaque device token. The
//!   target is stored per device ([`crate::store::PushStore`]).
//! - Wake-ups (`Waker::mail`): after a send's commit, each recipient device with no
//!   connection here is put on a bounded queue (a full queue drops the wake-up and
//!   counts it: a send never waits). The push task (`worker.rs`) coalesces them to at
//!   most one per device per `[push] coalesce` (`coalesce.rs`) and posts each in a
//!   task of its own, never following redirects, with a timeout; 404/410 forget the
//!   target, 429 waits as asked, other failures are retried with backoff and then
//!   given up quietly.
//! - What a POST carries: [`UNIFIED_PUSH_BODY`] to an endpoint; to a gateway the same
//!   constant fields and the device token. No sender, count or message id.
//! - P9: URLs and tokens are never logged (not even at debug: a request error's text
//!   holds the URL) and metrics count outcomes only.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use reqwest::Url;
use tern_proto::{DeviceAddress, PushTarget};
use tokio::sync::{mpsc, watch};

use crate::config::PushConfig;
use crate::core::auth::AuthenticatedDevice;
use crate::deletion::Tombstones;
use crate::error::{Error, Result};
use crate::mailboxes::ActiveMailboxes;
use crate::store::{GroupCommit, PushStore};

pub(crate) mod coalesce;
pub(crate) mod global;
pub(crate) mod worker;

/// The body of every POST to a UnifiedPush endpoint: constant, so it says nothing
/// but "there is mail".
pub const UNIFIED_PUSH_BODY: &[u8] = br#"{"type":"tern.wake","v":1}"#;

/// The `type` field of a gateway's body, `{"type":"tern.wake","v":1,"token":"..."}`:
/// the token is its only varying part.
pub const GATEWAY_BODY_TYPE: &str = "tern.wake";

/// The most of a discovery answer read (the answer is 28 bytes).
const MAX_DISCOVERY_ANSWER: usize = 4096;

/// The reason given for every failed discovery.
const UNVERIFIED: &str = "the endpoint did not answer as a UnifiedPush endpoint";

/// Why a push target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// Not a target this relay posts to (`PUSH_TARGET_REFUSED`): the phrase says why.
    #[error("push target refused: {0}")]
    Refused(&'static str),
    /// The UnifiedPush endpoint did not answer its discovery request as the
    /// specification asks (`PUSH_ENDPOINT_UNVERIFIED`).
    #[error("push endpoint unverified: {0}")]
    Unverified(&'static str),
}

/// What the push task is told.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    /// Mail was queued for a device with no connection here.
    Mail(DeviceAddress),
    /// The device connected.
    Seen(DeviceAddress),
}

/// Counts of wake-ups by outcome, for tests and the metrics (aggregates only).
#[derive(Debug, Default)]
pub struct Stats {
    /// POSTs answered 2xx.
    pub sent: AtomicU64,
    /// Wake-ups covered by another in the same window.
    pub coalesced: AtomicU64,
    /// Wake-ups dropped: the queue or the table was full.
    pub dropped: AtomicU64,
    /// Targets forgotten after a 404 or 410.
    pub gone: AtomicU64,
    /// 429 answers.
    pub rate_limited: AtomicU64,
    /// Redirects (never followed).
    pub redirected: AtomicU64,
    /// Failed POSTs (5xx, timeouts, no connection, other 4xx).
    pub failed: AtomicU64,
    /// Devices in the coalescing table now.
    pub tracked: AtomicU64,
}

/// The metric every outcome is counted in, labelled `outcome`.
pub const WAKEUPS_METRIC: &str = "tern_push_wakeups_total";

impl Stats {
    pub(crate) fn count(&self, outcome: &'static str) {
        let n = match outcome {
            "sent" => Some(&self.sent),
            "gone" => Some(&self.gone),
            "rate_limited" => Some(&self.rate_limited),
            "redirected" => Some(&self.redirected),
            "failed" | "refused" => Some(&self.failed),
            _ => None,
        };
        if let Some(n) = n {
            n.fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!(WAKEUPS_METRIC, "outcome" => outcome).increment(1);
    }

    pub(crate) fn count_dropped(&self, why: &'static str) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(WAKEUPS_METRIC, "outcome" => why).increment(1);
    }
}

/// The hook the mailboxes call: never blocks, never fails the caller.
#[derive(Debug, Clone)]
pub struct Waker {
    tx: mpsc::Sender<Event>,
    stats: Arc<Stats>,
}

impl Waker {
    /// Mail was queued (and committed) for `to`, which has no connection here.
    pub(crate) fn mail(&self, to: &DeviceAddress) {
        if self.tx.try_send(Event::Mail(*to)).is_err() {
            self.stats.count_dropped("queue_full");
        }
    }

    /// `device` connected: mail it misses after it leaves is owed a wake-up.
    pub(crate) fn seen(&self, device: &DeviceAddress) {
        // A lost one (queue full) leaves the device's entry as not seen: mail in
        // the rest of its window is taken as covered by the earlier wake-up and gets
        // none (the device reads it at its next connection); mail after the window
        // wakes it as usual.
        let _ = self.tx.try_send(Event::Seen(*device));
    }
}

/// The push service: registration, and the handle of the push task.
pub struct Push {
    store: Arc<dyn PushStore>,
    commit: Arc<GroupCommit>,
    tombstones: Arc<Tombstones>,
    config: PushConfig,
    gateways: Vec<Url>,
    clients: Clients,
    waker: Waker,
    stats: Arc<Stats>,
    /// Taken by [`Push::start`].
    events: std::sync::Mutex<Option<mpsc::Receiver<Event>>>,
}

impl std::fmt::Debug for Push {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Push").finish_non_exhaustive()
    }
}

/// The HTTP clients: UnifiedPush endpoints (named by devices) reach only global
/// addresses ([`global::GlobalOnly`]); gateways on the operator's allowlist are
/// trusted as configured (they may be internal).
#[derive(Debug, Clone)]
pub(crate) struct Clients {
    pub(crate) endpoints: reqwest::Client,
    pub(crate) gateways: reqwest::Client,
}

impl Clients {
    fn new(config: &PushConfig) -> Result<Self> {
        let builder = || {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                // The URL registered is the only hop: proxy variables would send a
                // loopback target's traffic elsewhere.
                .no_proxy()
                .timeout(config.timeout)
                .connect_timeout(config.timeout)
        };
        let resolver = global::GlobalOnly {
            allow_loopback: config.allow_http_loopback,
        };
        let build =
            |b: reqwest::ClientBuilder| b.build().map_err(|e| Error::Config(format!("push: {e}")));
        Ok(Clients {
            endpoints: build(builder().dns_resolver(Arc::new(resolver)))?,
            gateways: build(builder())?,
        })
    }

    /// The client for `target`.
    pub(crate) fn of(&self, target: &PushTarget) -> &reqwest::Client {
        match target {
            PushTarget::UnifiedPush { .. } => &self.endpoints,
            PushTarget::Gateway { .. } => &self.gateways,
        }
    }
}

/// Whether a UnifiedPush endpoint's host may be connected to: an IP literal (which
/// the resolver never sees) must be global, or loopback under `allow_http_loopback`.
fn check_endpoint_host(
    url: &Url,
    allow_http_loopback: bool,
) -> std::result::Result<(), &'static str> {
    let host = url.host_str().unwrap_or_default();
    let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    else {
        return Ok(());
    };
    if global::literal_allowed(ip, allow_http_loopback) {
        Ok(())
    } else {
        Err("the endpoint's address is not a public one")
    }
}

/// Whether a stored target would still be accepted by [`Push::set`]'s checks (but
/// the UnifiedPush discovery, done once): its URL, an endpoint's address literal, a
/// gateway's place on the list.
pub(crate) fn still_allowed(
    target: &PushTarget,
    gateways: &[Url],
    allow_http_loopback: bool,
) -> bool {
    let Ok(url) = Url::parse(target.url()) else {
        return false;
    };
    check_url(&url, allow_http_loopback).is_ok()
        && match target {
            PushTarget::UnifiedPush { .. } => {
                check_endpoint_host(&url, allow_http_loopback).is_ok()
            }
            PushTarget::Gateway { .. } => gateways.iter().any(|g| allowed(g, &url)),
        }
}

/// Whether `url` may be posted to: https, or http to a loopback host when
/// `allow_http_loopback`; no fragment.
fn check_url(url: &Url, allow_http_loopback: bool) -> std::result::Result<(), &'static str> {
    let Some(host) = url.host_str() else {
        return Err("the URL has no host");
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|a| a.is_loopback());
    if url.fragment().is_some() {
        return Err("the URL has a fragment");
    }
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_http_loopback && loopback => Ok(()),
        _ => Err("the URL must be https"),
    }
}

/// Checks one `[push] gateways` entry (for the configuration's validation).
pub(crate) fn check_gateway_entry(
    entry: &str,
    allow_http_loopback: bool,
) -> std::result::Result<(), String> {
    let url = Url::parse(entry).map_err(|e| format!("{entry:?}: {e}"))?;
    check_url(&url, allow_http_loopback).map_err(|m| format!("{entry:?}: {m}"))
}

/// Whether `url` falls under the allowlist `entry`: the same scheme, host and port,
/// and a path under the entry's (a whole segment: `/tern` covers `/tern/x`, not
/// `/ternx`).
fn allowed(entry: &Url, url: &Url) -> bool {
    if entry.scheme() != url.scheme()
        || entry.host_str() != url.host_str()
        || entry.port_or_known_default() != url.port_or_known_default()
    {
        return false;
    }
    let (base, path) = (entry.path(), url.path());
    path == base
        || base.ends_with('/') && path.starts_with(base)
        || path
            .strip_prefix(base)
            .is_some_and(|rest| rest.starts_with('/'))
}

impl Push {
    /// The service over `store` under `config`; `Push::start` runs its task.
    pub fn new(
        store: Arc<dyn PushStore>,
        commit: Arc<GroupCommit>,
        tombstones: Arc<Tombstones>,
        config: &PushConfig,
    ) -> Result<Self> {
        let gateways = (config.gateways.iter())
            .map(|g| {
                check_gateway_entry(g, config.allow_http_loopback)
                    .map_err(|m| Error::Config(format!("push.gateways: {m}")))?;
                Url::parse(g).map_err(|e| Error::Config(format!("push.gateways: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let clients = Clients::new(config)?;
        let (tx, rx) = mpsc::channel(config.queue);
        let stats = Arc::new(Stats::default());
        Ok(Push {
            store,
            commit,
            tombstones,
            config: config.clone(),
            gateways,
            clients,
            waker: Waker {
                tx,
                stats: stats.clone(),
            },
            stats,
            events: std::sync::Mutex::new(Some(rx)),
        })
    }

    /// The hook for the mailboxes.
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Counts by outcome.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Starts the push task (once; `None` after the first call), which ends at
    /// `shutdown`.
    pub(crate) fn start(
        &self,
        active: Arc<ActiveMailboxes>,
        shutdown: watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let events = (self.events.lock().unwrap_or_else(|e| e.into_inner())).take()?;
        let worker = worker::Worker {
            store: self.store.clone(),
            clients: self.clients.clone(),
            config: self.config.clone(),
            gateways: self.gateways.clone(),
            active,
            stats: self.stats.clone(),
            hosts: Default::default(),
        };
        Some(tokio::spawn(worker.run(events, shutdown)))
    }

    /// Stores `target` as the device's wake-up target, replacing any earlier one,
    /// after checking it: a gateway must be on the allowlist; a UnifiedPush endpoint
    /// must be https and answer its discovery GET with `{"unifiedpush":{"version":1}}`
    /// (skipped when the device registers the target it already has). Durable when
    /// this returns.
    pub async fn set(&self, device: &AuthenticatedDevice, target: PushTarget) -> Result<()> {
        if !self.config.enabled {
            return Err(PushError::Refused("this relay sends no wake-ups").into());
        }
        target
            .check()
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        let addr = *device.address();
        let url = Url::parse(target.url())
            .map_err(|_| Error::BadRequest("set_push_target: not a URL".into()))?;
        check_url(&url, self.config.allow_http_loopback).map_err(PushError::Refused)?;
        match &target {
            PushTarget::Gateway { .. } => {
                if !self.gateways.iter().any(|g| allowed(g, &url)) {
                    return Err(
                        PushError::Refused("the gateway is not on this relay's list").into(),
                    );
                }
            }
            PushTarget::UnifiedPush { .. } => {
                check_endpoint_host(&url, self.config.allow_http_loopback)
                    .map_err(PushError::Refused)?;
            }
        }
        let store = self.store.clone();
        let stored = self.blocking(move || Ok(store.push_target(&addr)?)).await?;
        if stored.as_ref() == Some(&target) {
            return Ok(());
        }
        if let PushTarget::UnifiedPush { .. } = &target {
            self.discover(url).await?
        }
        let store = self.store.clone();
        let tombstones = self.tombstones.clone();
        self.blocking(move || {
            // Held from the check to the write: a deletion (of the account or the
            // device) either comes after and removes the target, or before and the
            // target is never written.
            let Some(_live) = tombstones.live_device(&addr) else {
                return Err(Error::Unauthorized);
            };
            Ok(store.put_push_target(&addr, &target)?)
        })
        .await?;
        self.commit.commit().await?;
        Ok(())
    }

    /// Forgets the device's target (none is no error). Durable when this returns.
    pub async fn clear(&self, device: &AuthenticatedDevice) -> Result<()> {
        let addr = *device.address();
        let store = self.store.clone();
        self.blocking(move || Ok(store.remove_push_target(&addr, None)?))
            .await?;
        self.commit.commit().await?;
        Ok(())
    }

    /// The device's target (the account's export).
    pub fn target(&self, of: &DeviceAddress) -> Result<Option<PushTarget>> {
        Ok(self.store.push_target(of)?)
    }

    /// The UnifiedPush discovery request: GET the endpoint, expect 2xx and
    /// `{"unifiedpush":{"version":1}}` (UnifiedPush server specification: application
    /// servers check it at registration, against SSRF). No redirect is followed.
    async fn discover(&self, url: Url) -> Result<()> {
        // One message for every failure: a distinct one per cause would tell a
        // device what answers at an address (an oracle for probing).
        let unverified = || Error::from(PushError::Unverified(UNVERIFIED));
        let mut r = (self.clients.endpoints.get(url))
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|_| unverified())?;
        if !r.status().is_success() {
            return Err(unverified());
        }
        let mut body = Vec::new();
        while let Some(chunk) = r.chunk().await.map_err(|_| unverified())? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_DISCOVERY_ANSWER {
                return Err(unverified());
            }
        }
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|_| unverified())?;
        if v["unifiedpush"]["version"] != 1 {
            return Err(unverified());
        }
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|_| Error::Unavailable("push store call"))?
    }
}

#[cfg(test)]
mod tests;
