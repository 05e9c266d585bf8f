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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    /// The device's mailbox has new messages (sent after their commit).
    Mail(DeviceAddress),
    /// The device connected to a node (its row in `device_sessions` names which):
    /// any other connection of it is displaced.
    Claimed(DeviceAddress),
    /// The device's mailbox has these new messages, committed by one batch right
    /// after seq `after` (made by the mailbox writer's send statement): a node whose
    /// delivery read up to `after` pushes them without reading the mailbox.
    Carried(DeviceAddress, Carried),
}

pub use crate::mailboxes::Carried;

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

    /// What starts this node's NOTIFY payloads: its origin (`<8 hex>;`), which its own
    /// listener skips.
    pub fn origin_prefix(&self) -> String {
        format!("{:08x};", self.origin)
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
            Hint::Mail(a) | Hint::Carried(a, _) => ('m', a),
            Hint::Claimed(a) => ('c', a),
        };
        out.push(kind);
        for b in addr_bytes(addr) {
            out.push_str(&format!("{b:02x}"));
        }
    }
    out
}

/// The hints of a payload (its origin: [`origin_of`]); entries that do not parse are
/// skipped (a newer node's kinds, say), and carried rows that do not parse leave a
/// [`Hint::Mail`].
pub fn decode(payload: &str) -> Vec<Hint> {
    let Some((_, list)) = payload.split_once(';') else {
        return Vec::new();
    };
    let mut hints: Vec<Hint> = Vec::new();
    for h in list.split(',').filter_map(entry) {
        // A carried entry comes right after a mail entry for the same mailbox, which
        // nodes from before carried rows act on; here the carried one stands for both.
        if let (Hint::Carried(a, _), Some(Hint::Mail(m))) = (&h, hints.last()) {
            if a == m {
                hints.pop();
            }
        }
        hints.push(h);
    }
    hints
}

/// The origin of a payload, read before the rest.
pub fn origin_of(payload: &str) -> Option<u32> {
    u32::from_str_radix(payload.split_once(';')?.0, 16).ok()
}

/// One entry: `m<address>`, `c<address>`, or `r<address>:<after>:<rows>` (see the
/// mailbox writer's `notes_sql`), addresses in hex.
fn entry(entry: &str) -> Option<Hint> {
    let kind = entry.get(..1)?;
    let rest = entry.get(1..)?;
    let (hex, carried) = match rest.split_once(':') {
        Some((hex, carried)) => (hex, Some(carried)),
        None => (rest, None),
    };
    let addr = parse_addr(&unhex::<ADDR_LEN>(hex)?).ok()?;
    match (kind, carried) {
        ("m", None) => Some(Hint::Mail(addr)),
        ("c", None) => Some(Hint::Claimed(addr)),
        ("r", Some(carried)) => Some(match rows(carried) {
            Some(c) => Hint::Carried(addr, c),
            None => Hint::Mail(addr),
        }),
        _ => None,
    }
}

/// `<after>:<row>~<row>…`, each row `<seq>.<message id>.<accepted>.<expires>.<payload>`
/// (the id in hex, the payload in base64; times as the database keeps them).
fn rows(text: &str) -> Option<Carried> {
    use base64::Engine as _;
    let (after, list) = text.split_once(':')?;
    let mut rows = Vec::new();
    for row in list.split('~') {
        let mut f = row.split('.');
        let seq = f.next()?.parse::<u64>().ok()?;
        let id = unhex::<16>(f.next()?)?;
        let accepted = f.next()?.parse::<i64>().ok()?;
        let expires = f.next()?.parse::<i64>().ok()?;
        // PostgreSQL's base64 breaks lines every 76 characters.
        let text: Vec<u8> = f.next()?.bytes().filter(|&b| b != b'\n').collect();
        let payload = base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?;
        if f.next().is_some() {
            return None;
        }
        rows.push(crate::store::StoredMessage {
            seq,
            message_id: tern_proto::MessageId(id),
            payload: bytes::Bytes::from(payload),
            accepted_at: crate::store::pg::from_db(accepted),
            expires_at: crate::store::pg::from_db(expires),
            shared_body: None,
        });
    }
    let ordered = rows.windows(2).all(|w| w[0].seq < w[1].seq);
    let after = after.parse::<u64>().ok()?;
    (ordered && rows.first().is_some_and(|r| r.seq > after)).then_some(Carried { after, rows })
}

/// `N` bytes from `2N` hex digits.
fn unhex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    if hex.len() != 2 * N {
        return None;
    }
    let mut bytes = [0u8; N];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(bytes)
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
                // This node's own notes are skipped before their rows are decoded.
                if n.channel() != CHANNEL || origin_of(n.payload()) == Some(origin) {
                    return;
                }
                let hints = decode(n.payload());
                if !hints.is_empty() && tx.try_send(Event::Hints(hints)).is_err() {
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
        assert_eq!((origin_of(&text), decode(&text)), (Some(7), hints));
        assert_eq!((origin_of(""), decode("")), (None, vec![]));
        assert!(decode("00000001;x00,m12,mzz").is_empty());
        let full: Vec<Hint> = (0..HINTS_PER_NOTIFY as u32)
            .map(|i| Hint::Mail(addr(3, i + 1)))
            .collect();
        assert!(encode(u32::MAX, &full).len() < 8000, "fits one NOTIFY");
    }

    /// Carried rows as the mailbox writer's send statement writes them; rows that do
    /// not parse, or that do not follow `after` in order, leave a plain mail hint.
    #[test]
    fn carried_rows_parse_and_bad_ones_leave_a_mail_hint() {
        let a = addr(4, 2);
        let hex: String = addr_bytes(&a).iter().map(|b| format!("{b:02x}")).collect();
        let id = "11".repeat(16);
        let text = format!(
            "0000002a;m{hex},r{hex}:6:7.{id}.1000.{never}.c2Vh\nbGVk~9.{id}.1001.5.",
            never = i64::MAX
        );
        let hints = decode(&text);
        assert_eq!(origin_of(&text), Some(42));
        let row = |seq, at, until, payload: &'static [u8]| crate::store::StoredMessage {
            seq,
            message_id: tern_proto::MessageId([0x11; 16]),
            payload: bytes::Bytes::from_static(payload),
            accepted_at: at,
            expires_at: until,
            shared_body: None,
        };
        let rows = vec![row(7, 1000, u64::MAX, b"sealed"), row(9, 1001, 5, b"")];
        // The mail entry for the same mailbox (for older nodes) is the carried one's.
        assert_eq!(hints, [Hint::Carried(a, Carried { after: 6, rows })]);
        for bad in [
            format!("r{hex}:7:7.{id}.1.2.AA"), // not after `after`
            format!("r{hex}:1:7.{id}.1.2.AA~7.{id}.1.2.AA"), // not in order
            format!("r{hex}:1:7.{id}.1.2.!!"), // not base64
            format!("r{hex}:1:7.{id}.1.2"),    // a field short
            format!("r{hex}:x:7.{id}.1.2.AA"), // no `after`
        ] {
            assert_eq!(decode(&format!("00000001;{bad}")), [Hint::Mail(a)], "{bad}");
        }
    }
}
