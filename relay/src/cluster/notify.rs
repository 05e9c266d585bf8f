//! Hints between relay nodes: "this mailbox has new mail", "this device connected
//! here". A hint only saves time: a node that misses one still finds the change at its
//! next re-check (`recheck_interval`), so correctness never depends on delivery of
//! hints. [`Notifier`] is the seam; [`PgNotifier`] carries hints over PostgreSQL
//! LISTEN/NOTIFY, and a message bus (NATS core) could replace it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tern_proto::DeviceAddress;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::store::codec::{addr_bytes, parse_addr, ADDR_LEN};
use crate::store::pg::PgBackend;

/// The channel every node listens on.
pub const CHANNEL: &str = "tern";

/// Hints in one NOTIFY at most: 41 bytes each, under PostgreSQL's 8,000-byte payload.
const HINTS_PER_NOTIFY: usize = 180;

/// Hints waiting to be published, at most; past it new ones are dropped (the
/// re-check finds their changes).
const QUEUE: usize = 65_536;

/// Something another node should know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// The device's mailbox has new messages (sent after their commit).
    Mail(DeviceAddress),
    /// The device connected to a node (its row in `device_sessions` names which):
    /// any other connection of it is displaced.
    Claimed(DeviceAddress),
}

/// What a node's listener receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Hints from the other nodes (a node's own hints are not echoed back to it: it
    /// woke its own subscribers already).
    Hints(Vec<Hint>),
    /// Hints may have been lost (the listener reconnected, or fell behind): re-check
    /// every connected device now.
    Resync,
}

/// Carries hints between nodes. Best effort by contract: `publish` never blocks and
/// never fails its caller.
pub trait Notifier: Send + Sync + 'static {
    /// Queues a hint for every node.
    fn publish(&self, hint: Hint);
    /// The events for this node; `None` after the first call.
    fn events(&self) -> Option<mpsc::Receiver<Event>>;
}

/// No hints at all: every cross-node change is found by the re-check (for
/// PostgreSQL-compatible engines without LISTEN/NOTIFY, such as CockroachDB; set
/// `[postgres] notify = false` and a short `recheck_interval`).
#[derive(Debug, Default)]
pub struct NoHints;

impl Notifier for NoHints {
    fn publish(&self, _hint: Hint) {}

    fn events(&self) -> Option<mpsc::Receiver<Event>> {
        None
    }
}

/// [`Notifier`] over PostgreSQL's LISTEN/NOTIFY. A NOTIFY is a transaction of its
/// own, after the change it announces committed: inside that change's transaction it
/// would hold PostgreSQL's notification lock through the commit and serialise every
/// node's commits, and a full notification queue would fail the change. Mail hints go
/// right behind the mailbox writer's batch on its connection (see
/// `Cluster::notify_after_commits`); the publisher here sends the rest (claims) on a
/// connection of its own.
pub struct PgNotifier {
    publish: mpsc::Sender<Hint>,
    origin: u32,
    events: std::sync::Mutex<Option<mpsc::Receiver<Event>>>,
    /// The publisher and the listener.
    tasks: super::Tasks,
}

impl PgNotifier {
    /// Starts the publisher and the listener on the backend's runtime; both stop when
    /// `stop` turns true (or the backend goes).
    pub fn start(pg: Arc<PgBackend>, stop: tokio::sync::watch::Receiver<bool>) -> Arc<Self> {
        let (publish, hints) = mpsc::channel(QUEUE);
        let (events_tx, events) = mpsc::channel(1024);
        let origin = rand::random::<u32>();
        let tasks = super::Tasks::default();
        tasks.add(pg.spawn(publisher(pg.clone(), origin, hints, stop.clone())));
        tasks.add(pg.spawn(listener(pg.clone(), origin, events_tx, stop)));
        Arc::new(PgNotifier {
            publish,
            origin,
            events: std::sync::Mutex::new(Some(events)),
            tasks,
        })
    }

    /// The NOTIFY payloads telling the other nodes of new mail to `to` (180 hints at
    /// most in each, under PostgreSQL's payload limit).
    pub fn mail_payloads(&self, to: &[DeviceAddress]) -> Vec<String> {
        to.chunks(HINTS_PER_NOTIFY)
            .map(|chunk| {
                let hints: Vec<Hint> = chunk.iter().map(|a| Hint::Mail(*a)).collect();
                encode(self.origin, &hints)
            })
            .collect()
    }

    /// Awaits the publisher and the listener (with its LISTEN connection) after the
    /// stop signal, at most `within`; false if they did not end.
    pub(crate) async fn stopped(&self, within: Duration) -> bool {
        self.tasks.join(within).await
    }
}

impl Notifier for PgNotifier {
    fn publish(&self, hint: Hint) {
        // Full: dropped, as the contract allows (the re-check finds the change).
        let _ = self.publish.try_send(hint);
    }

    fn events(&self) -> Option<mpsc::Receiver<Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl std::fmt::Debug for PgNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgNotifier")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// Hints as text (a NOTIFY payload is text): the sending node's random origin in hex
/// and `;`, then per hint a kind letter and the address in hex, `,` between.
pub fn encode(origin: u32, hints: &[Hint]) -> String {
    let mut out = String::with_capacity(9 + hints.len() * (2 * ADDR_LEN + 2));
    out.push_str(&format!("{origin:08x};"));
    for (i, h) in hints.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let (kind, addr) = match h {
            Hint::Mail(a) => ('m', a),
            Hint::Claimed(a) => ('c', a),
        };
        out.push(kind);
        for b in addr_bytes(addr) {
            out.push_str(&format!("{b:02x}"));
        }
    }
    out
}

/// The origin and hints of a payload; entries that do not parse are skipped (a newer
/// node's kinds, say).
pub fn decode(payload: &str) -> (Option<u32>, Vec<Hint>) {
    let Some((origin, list)) = payload.split_once(';') else {
        return (None, Vec::new());
    };
    let hints = list
        .split(',')
        .filter_map(|entry| {
            let kind = entry.get(..1)?;
            let hex = entry.get(1..)?;
            if hex.len() != 2 * ADDR_LEN {
                return None;
            }
            let mut bytes = [0u8; ADDR_LEN];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            let addr = parse_addr(&bytes).ok()?;
            match kind {
                "m" => Some(Hint::Mail(addr)),
                "c" => Some(Hint::Claimed(addr)),
                _ => None,
            }
        })
        .collect();
    (u32::from_str_radix(origin, 16).ok(), hints)
}

async fn publisher(
    pg: Arc<PgBackend>,
    origin: u32,
    mut hints: mpsc::Receiver<Hint>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(HINTS_PER_NOTIFY);
    let mut conn: Option<Publishing> = None;
    loop {
        batch.clear();
        tokio::select! {
            _ = stop.changed() => return,
            first = hints.recv() => match first {
                Some(h) => batch.push(h),
                None => return,
            },
        }
        while batch.len() < HINTS_PER_NOTIFY {
            match hints.try_recv() {
                Ok(h) if !batch.contains(&h) => batch.push(h),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let payload = encode(origin, &batch);
        let sent = async {
            if conn.as_ref().is_none_or(|c| c.driver.is_finished()) {
                conn = Some(Publishing::connect(&pg).await?);
            }
            let Some(c) = &conn else {
                return Ok(());
            };
            c.client
                .execute(&c.notify, &[&CHANNEL, &payload])
                .await
                .map(drop)
                .map_err(|e| pg.classify(&e))
        };
        let failed = match tokio::time::timeout(Duration::from_secs(2), sent).await {
            Ok(Ok(())) => false,
            Ok(Err(e)) => {
                debug!(error = %e, "a cross-node hint was not sent (the re-check covers it)");
                true
            }
            Err(_) => {
                debug!("a cross-node hint timed out (the re-check covers it)");
                true
            }
        };
        if failed {
            conn = None;
        }
    }
}

/// The publisher's connection: its own, outside the pool, so that its session can
/// commit without waiting for the WAL flush (or a standby): a NOTIFY takes a
/// transaction id, and a hint need not be durable. One statement per hint batch.
struct Publishing {
    client: tokio_postgres::Client,
    driver: tokio::task::JoinHandle<()>,
    notify: tokio_postgres::Statement,
}

impl Drop for Publishing {
    // The connection closes with its driver (a statement stuck on it included).
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Publishing {
    async fn connect(pg: &PgBackend) -> crate::store::StoreResult<Self> {
        let (client, driver) = pg.dedicated(|_| {}).await?;
        let ready = async {
            client.batch_execute("SET synchronous_commit = off").await?;
            client.prepare("SELECT pg_notify($1, $2)").await
        };
        let notify = ready.await.map_err(|e| pg.classify(&e))?;
        Ok(Publishing {
            client,
            driver,
            notify,
        })
    }
}

async fn listener(
    pg: Arc<PgBackend>,
    origin: u32,
    events: mpsc::Sender<Event>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let lagged = Arc::new(AtomicBool::new(false));
        let (tx, lag) = (events.clone(), lagged.clone());
        let on_message = move |m| {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let (from, hints) = decode(n.payload());
                if n.channel() == CHANNEL
                    && from != Some(origin)
                    && !hints.is_empty()
                    && tx.try_send(Event::Hints(hints)).is_err()
                {
                    lag.store(true, Ordering::Relaxed);
                }
            }
        };
        let connected = async {
            let (client, driver) = pg.dedicated(on_message).await?;
            client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .map_err(|e| pg.classify(&e))?;
            Ok::<_, crate::store::StoreError>((client, driver))
        };
        match tokio::time::timeout(Duration::from_secs(5), connected).await {
            Ok(Ok((client, mut driver))) => {
                backoff = Duration::from_millis(100);
                // Whatever happened while not listening is found by a re-check.
                if events.send(Event::Resync).await.is_err() {
                    return;
                }
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = &mut driver => break,
                        _ = tick.tick() => {
                            if lagged.swap(false, Ordering::Relaxed)
                                && events.send(Event::Resync).await.is_err()
                            {
                                return;
                            }
                        }
                    }
                }
                drop(client);
                warn!("lost the database's notification channel; reconnecting");
            }
            Ok(Err(e)) => debug!(error = %e, "listening for cross-node hints failed"),
            Err(_) => debug!("listening for cross-node hints timed out"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(a: u8, d: u32) -> DeviceAddress {
        DeviceAddress::from_wire(&[a; 16], d).expect("valid address")
    }

    #[test]
    fn hints_round_trip_and_junk_is_skipped() {
        let hints = vec![Hint::Mail(addr(1, 1)), Hint::Claimed(addr(2, 7))];
        let text = encode(7, &hints);
        assert_eq!(decode(&text), (Some(7), hints));
        assert_eq!(decode(""), (None, vec![]));
        assert!(decode("00000001;x00,m12,mzz").1.is_empty());
        let full: Vec<Hint> = (0..HINTS_PER_NOTIFY as u32)
            .map(|i| Hint::Mail(addr(3, i + 1)))
            .collect();
        assert!(encode(u32::MAX, &full).len() < 8000, "fits one NOTIFY");
    }
}
