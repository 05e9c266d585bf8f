//! The push task: takes wake-ups off a bounded queue, coalesces them
//! ([`super::coalesce`]), and posts each in a task of its own, so nothing here waits
//! on a gateway, and nothing the relay's connections do waits on this task.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tern_proto::{DeviceAddress, PushTarget};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use super::coalesce::{Coalescer, Decision};
use super::{Event, Stats, GATEWAY_BODY_TYPE, UNIFIED_PUSH_BODY};
use crate::config::PushConfig;
use crate::mailboxes::ActiveMailboxes;
use crate::store::PushStore;

/// The longest a 429's Retry-After is honoured before a retry; a longer one gives
/// the wake-up up (the device reads its mail at its next connection anyway).
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What one POST's answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// 2xx: the gateway took it.
    Sent,
    /// 404 or 410: the target is gone; forget it.
    Gone,
    /// 429: wait (Retry-After, when it says), then try again.
    SlowDown(Option<Duration>),
    /// A redirect: never followed, not retried (it would redirect again).
    Redirected,
    /// Another 4xx (a bad request, too large): not retried.
    Refused,
    /// A 5xx, a timeout, no connection: retried with backoff.
    Failed,
}

/// The outcome of an answer with `status` and, for a 429, its Retry-After value.
pub(crate) fn classify(status: StatusCode, retry_after: Option<&str>) -> Outcome {
    match status.as_u16() {
        200..=299 => Outcome::Sent,
        404 | 410 => Outcome::Gone,
        429 => Outcome::SlowDown(retry_after.and_then(parse_retry_after)),
        300..=399 => Outcome::Redirected,
        400..=499 => Outcome::Refused,
        _ => Outcome::Failed,
    }
}

/// Retry-After as delay-seconds (RFC 9110 §10.2.3); an HTTP-date is not read (the
/// backoff applies instead).
fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The wait before try number `attempt + 1` (from 1): `base` doubled per earlier
/// retry, or what a 429 asked for.
pub(crate) fn backoff(base: Duration, attempt: u32, asked: Option<Duration>) -> Duration {
    let doubled = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    asked.map_or(doubled, |a| a.max(base))
}

/// What the task needs.
pub(crate) struct Worker {
    pub(crate) store: Arc<dyn PushStore>,
    pub(crate) clients: super::Clients,
    pub(crate) config: PushConfig,
    /// The operator's allowlist, parsed.
    pub(crate) gateways: Vec<reqwest::Url>,
    pub(crate) active: Arc<ActiveMailboxes>,
    pub(crate) stats: Arc<Stats>,
    /// POSTs in flight per UnifiedPush endpoint host; an entry lives while a POST
    /// to its host runs or waits.
    pub(crate) hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A POST's place among those to its endpoint's host.
struct HostSlot<'a> {
    hosts: &'a Mutex<HashMap<String, Arc<Semaphore>>>,
    key: String,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for HostSlot<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        // Only the table holds it: no POST to this host runs or waits.
        if hosts
            .get(&self.key)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            hosts.remove(&self.key);
        }
    }
}

/// A finished wake-up: the device and, after a 429, when it may be woken again.
type Done = (DeviceAddress, Option<Instant>);

impl Worker {
    /// Runs until `shutdown` or until every sender of `events` is gone.
    pub(crate) async fn run(
        self,
        mut events: mpsc::Receiver<Event>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let me = Arc::new(self);
        let mut coalescer = Coalescer::new(me.config.coalesce, me.config.max_tracked);
        let slots = Arc::new(Semaphore::new(me.config.max_in_flight));
        // Unbounded, but at most one message per device in the table.
        let (done_tx, mut done) = mpsc::unbounded_channel::<Done>();
        let mut posts = tokio::task::JoinSet::new();
        loop {
            let deadline = coalescer.next_deadline();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Mail(addr)) => {
                        match coalescer.on_mail(addr, Instant::now()) {
                            Decision::Send => {
                                posts.spawn(me.clone().wake(addr, slots.clone(), done_tx.clone()));
                            }
                            Decision::Coalesced => {
                                me.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                            }
                            Decision::Full => me.stats.count_dropped("table_full"),
                        }
                    }
                    Some(Event::Seen(addr)) => coalescer.on_seen(&addr),
                    None => break,
                },
                Some((addr, not_before)) = done.recv() => coalescer.on_done(&addr, not_before),
                () = sleep => {
                    for addr in coalescer.due(Instant::now()) {
                        if me.active.has_subscriber(&addr) {
                            coalescer.on_done(&addr, None);
                        } else {
                            posts.spawn(me.clone().wake(addr, slots.clone(), done_tx.clone()));
                        }
                    }
                }
                // Reap finished posts so the set does not grow.
                Some(_) = posts.join_next(), if !posts.is_empty() => {}
                _ = shutdown.changed() => break,
            }
            me.stats
                .tracked
                .store(coalescer.len() as u64, Ordering::Relaxed);
        }
        // Wake-ups are best effort: those still running end with the relay.
        posts.abort_all();
    }

    /// One wake-up: the target, then POSTs until one is answered or the tries run out.
    async fn wake(
        self: Arc<Self>,
        addr: DeviceAddress,
        slots: Arc<Semaphore>,
        done: mpsc::UnboundedSender<Done>,
    ) {
        let not_before = self.wake_inner(&addr, &slots).await;
        let _ = done.send((addr, not_before));
    }

    async fn wake_inner(&self, addr: &DeviceAddress, slots: &Semaphore) -> Option<Instant> {
        let store = self.store.clone();
        let a = *addr;
        let target = match tokio::task::spawn_blocking(move || store.push_target(&a)).await {
            Ok(Ok(Some(t))) => t,
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                debug!(error = %e, "push target unreadable");
                self.stats.count("failed");
                return None;
            }
            Err(_) => return None,
        };
        // Stored under older rules or before the operator shortened the list: a
        // target the registration checks would refuse now is forgotten, not posted to.
        if !super::still_allowed(&target, &self.gateways, self.config.allow_http_loopback) {
            self.stats.count("refused");
            self.forget(addr, target).await;
            return None;
        }
        let mut attempt = 1;
        loop {
            let outcome = {
                // The host's slot first: a POST waiting for a slow host holds none
                // of the slots every other target shares.
                let _host = match &target {
                    PushTarget::UnifiedPush { endpoint } => Some(self.host_slot(endpoint).await?),
                    PushTarget::Gateway { .. } => None,
                };
                let Ok(_slot) = slots.acquire().await else {
                    return None;
                };
                self.post(&target).await
            };
            match outcome {
                Outcome::Sent => {
                    self.stats.count("sent");
                    return None;
                }
                Outcome::Gone => {
                    self.stats.count("gone");
                    self.forget(addr, target).await;
                    return None;
                }
                Outcome::Redirected => {
                    self.stats.count("redirected");
                    return None;
                }
                Outcome::Refused => {
                    self.stats.count("refused");
                    return None;
                }
                Outcome::SlowDown(asked) => {
                    self.stats.count("rate_limited");
                    let wait = backoff(self.config.retry_backoff, attempt, asked);
                    if wait > MAX_RETRY_AFTER || attempt >= self.config.max_attempts {
                        self.stats.count("given_up");
                        return Some(Instant::now() + wait.min(MAX_RETRY_AFTER));
                    }
                    tokio::time::sleep(wait).await;
                }
                Outcome::Failed => {
                    self.stats.count("failed");
                    if attempt >= self.config.max_attempts {
                        self.stats.count("given_up");
                        return None;
                    }
                    tokio::time::sleep(backoff(self.config.retry_backoff, attempt, None)).await;
                }
            }
            attempt += 1;
        }
    }

    /// One POST: the constant body (a gateway's carries the device token), urgent.
    async fn post(&self, target: &PushTarget) -> Outcome {
        let (url, body) = match target {
            PushTarget::UnifiedPush { endpoint } => (endpoint.as_str(), UNIFIED_PUSH_BODY.to_vec()),
            PushTarget::Gateway { url, device_token } => {
                let body = serde_json::json!({
                    "type": GATEWAY_BODY_TYPE,
                    "v": 1,
                    "token": device_token,
                });
                (url.as_str(), body.to_string().into_bytes())
            }
        };
        let request = (self.clients.of(target).post(url))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            // RFC 8030: delivered at once, even to a phone saving power; kept a day.
            .header("Urgency", "high")
            .header("TTL", "86400")
            .body(body);
        match request.send().await {
            Ok(r) => {
                let retry_after = (r.headers().get(reqwest::header::RETRY_AFTER))
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                classify(r.status(), retry_after.as_deref())
            }
            // Never the error's text: it holds the URL.
            Err(_) => Outcome::Failed,
        }
    }

    /// A slot among the POSTs to `endpoint`'s host (`None` if the semaphore
    /// closed, which it never does).
    async fn host_slot(&self, endpoint: &str) -> Option<HostSlot<'_>> {
        let key = reqwest::Url::parse(endpoint)
            .map(|u| u.origin().ascii_serialization())
            .unwrap_or_default();
        let semaphore = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            hosts
                .entry(key.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.config.max_in_flight_per_host)))
                .clone()
        };
        let mut slot = HostSlot {
            hosts: &self.hosts,
            key,
            permit: None,
        };
        slot.permit = Some(semaphore.acquire_owned().await.ok()?);
        Some(slot)
    }

    /// Forgets a target its gateway declared gone, unless the device registered
    /// another since.
    async fn forget(&self, addr: &DeviceAddress, target: PushTarget) {
        let store = self.store.clone();
        let a = *addr;
        let removed =
            tokio::task::spawn_blocking(move || store.remove_push_target(&a, Some(&target))).await;
        if !matches!(removed, Ok(Ok(_))) {
            debug!("a gone push target could not be removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_as_the_unifiedpush_spec_says() {
        let s = |c: u16| StatusCode::from_u16(c).expect("status");
        assert_eq!(classify(s(201), None), Outcome::Sent);
        assert_eq!(classify(s(200), None), Outcome::Sent);
        assert_eq!(classify(s(404), None), Outcome::Gone);
        assert_eq!(classify(s(410), None), Outcome::Gone);
        assert_eq!(
            classify(s(429), Some("7")),
            Outcome::SlowDown(Some(Duration::from_secs(7)))
        );
        assert_eq!(
            classify(s(429), Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            Outcome::SlowDown(None)
        );
        for c in [301, 302, 307, 308] {
            assert_eq!(classify(s(c), None), Outcome::Redirected, "{c}");
        }
        assert_eq!(classify(s(400), None), Outcome::Refused);
        assert_eq!(classify(s(413), None), Outcome::Refused);
        for c in [500, 502, 503] {
            assert_eq!(classify(s(c), None), Outcome::Failed, "{c}");
        }
    }

    #[test]
    fn backoff_doubles_and_a_429_is_honoured_but_never_below_the_base() {
        let base = Duration::from_secs(1);
        assert_eq!(backoff(base, 1, None), Duration::from_secs(1));
        assert_eq!(backoff(base, 2, None), Duration::from_secs(2));
        assert_eq!(backoff(base, 4, None), Duration::from_secs(8));
        assert_eq!(
            backoff(base, 1, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(backoff(base, 3, Some(Duration::ZERO)), base);
        assert!(backoff(base, u32::MAX, None) >= Duration::from_secs(1 << 16));
    }
}
