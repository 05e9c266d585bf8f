//! Relay nodes sharing one database (`storage.backend = "postgres"`): what a node
//! does so that the others' work reaches its connected devices at once.
//!
//! - Mail: after a send commits, its node publishes a [`Hint::Mail`]; the node holding
//!   the recipient's connection wakes it, and the delivery reads the mailbox.
//! - Displacement: a device's delivery stream is claimed in `device_sessions` (node,
//!   connection); a newer claim on any node displaces the older connection, told by a
//!   [`Hint::Claimed`].
//! - Re-check: hints are best effort, so every `recheck_interval` (and whenever hints
//!   may have been lost) a node reads the head of every mailbox it has a connection for
//!   and the claim of each, wakes what moved and displaces what another node claimed.
//!   A lost hint delays a delivery by at most the interval; it never loses one.
//! - Heartbeat: each node writes `nodes.heartbeat_ms` every few seconds; claims of a
//!   node silent for a minute are swept by whichever node holds the sweep lease.
//! - Leaving: on a clean stop the node waits (bounded) for these tasks to end, then
//!   deletes its claims, its heartbeat and the leases it holds (`Cluster::leave`),
//!   so a node started at once neither waits for them to lapse nor is displaced by
//!   them.
//! - Incarnations: those rows name this process, not just its node id
//!   ([`PgBackend::incarnation`]), so a replacement already running under the same
//!   node id keeps its own when the old process leaves.

pub mod notify;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The files in a data directory that every node of one relay must share: the TLS
/// certificate and key (clients pin one certificate), the sender-certificate signing
/// key and the discovery OPRF key. The operator copies them from the first node.
pub const SHARED_FILES: [&str; 4] = [
    crate::net::tls::CERT_FILE,
    crate::net::tls::KEY_FILE,
    crate::net::tls::SIGNING_KEY_FILE,
    crate::discovery::oprf::KEY_FILE,
];

/// Copies [`SHARED_FILES`] from one node's data directory into another's (created if
/// missing), as an operator does; a file already there is kept. Returns how many were
/// copied.
pub fn copy_shared_files(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(to)?;
    let mut copied = 0;
    for name in SHARED_FILES {
        let (src, dest) = (from.join(name), to.join(name));
        if src.exists() && !dest.exists() {
            std::fs::copy(src, dest)?;
            copied += 1;
        }
    }
    Ok(copied)
}

use tern_proto::DeviceAddress;
use tokio::sync::{mpsc, watch};
use tracing::debug;

use self::notify::{Event, Hint, Notifier};
use crate::mailboxes::ActiveMailboxes;
use crate::store::codec::addr_bytes;
use crate::store::pg::lease::NOW_MS;
use crate::store::pg::writer::CommitNotes;
use crate::store::pg::PgBackend;
use crate::store::{StoreError, StoreResult};

/// Devices re-checked per statement.
const RECHECK_CHUNK: usize = 5_000;
/// How often a node writes its heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// A node silent this long is gone: its claims are swept.
const NODE_SILENT_MS: i64 = 60_000;
/// A node silent this long is not sent mail hints.
const PEER_SILENT: Duration = Duration::from_secs(3 * HEARTBEAT.as_secs());
/// The longest a node's own background call to the database may take.
const DB_DEADLINE: Duration = Duration::from_secs(5);

/// This node's part in a cluster of relay nodes. See the module docs.
pub struct Cluster {
    pg: Arc<PgBackend>,
    active: Arc<ActiveMailboxes>,
    notifier: Arc<dyn Notifier>,
    /// Subscriptions here whose claim has committed, by device. Only these are
    /// displaced by another node's claim: one not yet committed would read the
    /// older connection's row and close itself.
    claimed: std::sync::Mutex<HashMap<DeviceAddress, u64>>,
    /// Whether another node beat within [`PEER_SILENT`] at this node's last
    /// heartbeat (true until the first beat). With this false and no hint from
    /// another node within [`PEER_SILENT`] (`hinted_ms`), a node is alone and
    /// publishes no mail hints: nobody would read them. Mail matters to another node
    /// only for a device connected there, and a connection's claim is announced by a
    /// hint; should that hint be lost, the next heartbeat sees the node, and the
    /// re-check delivers meanwhile.
    peers: std::sync::atomic::AtomicBool,
    /// When a hint from another node last came, in ms after `started` (0: never): a
    /// heartbeat whose count was read before it does not clear `peers`' news.
    hinted_ms: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
    /// Set when the mailbox writer tells the other nodes of new mail itself, right
    /// after each batch's commit ([`Cluster::notify_after_commits`]).
    mail_after_commits: std::sync::atomic::AtomicBool,
    /// The re-check and heartbeat tasks.
    tasks: Tasks,
}

/// Background tasks that end when their stop signal turns true; awaited on a clean
/// stop.
#[derive(Debug, Default)]
pub(crate) struct Tasks(std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>);

impl Tasks {
    /// Keeps `task` (if it was spawned) to await it later.
    pub(crate) fn add(&self, task: Option<tokio::task::JoinHandle<()>>) {
        if let Some(t) = task {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(t);
        }
    }

    /// Awaits every task, at most `within` in all; false if some did not end.
    pub(crate) async fn join(&self, within: Duration) -> bool {
        let tasks = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        tokio::time::timeout(within, futures::future::join_all(tasks))
            .await
            .is_ok()
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.pg.node_id())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts following the other nodes: hints, the re-check every `recheck`, and the
    /// heartbeat, until `stop` turns true.
    pub(crate) fn start(
        pg: Arc<PgBackend>,
        active: Arc<ActiveMailboxes>,
        notifier: Arc<dyn Notifier>,
        recheck: Duration,
        stop: watch::Receiver<bool>,
    ) -> Arc<Cluster> {
        let cluster = Arc::new(Cluster {
            pg: pg.clone(),
            active,
            notifier: notifier.clone(),
            claimed: std::sync::Mutex::new(HashMap::new()),
            peers: std::sync::atomic::AtomicBool::new(true),
            hinted_ms: std::sync::atomic::AtomicU64::new(0),
            started: std::time::Instant::now(),
            mail_after_commits: std::sync::atomic::AtomicBool::new(false),
            tasks: Tasks::default(),
        });
        cluster.tasks.add(
            pg.spawn(
                cluster
                    .clone()
                    .follow(notifier.events(), recheck, stop.clone()),
            ),
        );
        cluster.tasks.add(pg.spawn(cluster.clone().heartbeat(stop)));
        cluster
    }

    /// A clean stop, after the stop signal and once connections closed: awaits the
    /// re-check and heartbeat tasks, then deletes this process's claims, its
    /// heartbeat row and the leases it holds (by its incarnation, never another
    /// process's under the same node id); `within` bounds it all (a database that is gone
    /// leaves them to lapse, as after a crash).
    pub(crate) async fn leave(&self, within: Duration) {
        let started = tokio::time::Instant::now();
        if !self.tasks.join(within).await {
            debug!("cluster tasks still running at shutdown");
        }
        let pg = self.pg.clone();
        let left = within.saturating_sub(started.elapsed());
        let withdrawn = tokio::time::timeout(
            left,
            self.on_db(async move {
                let client = pg.client().await?;
                for sql in [
                    "DELETE FROM device_sessions WHERE node = $1",
                    "DELETE FROM leases WHERE holder = $1",
                    "DELETE FROM nodes WHERE node = $1",
                ] {
                    client
                        .execute(sql, &[&pg.incarnation()])
                        .await
                        .map_err(|e| pg.classify(&e))?;
                }
                Ok(())
            }),
        )
        .await;
        match withdrawn {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "withdrawing this node's claims failed"),
            Err(_) => debug!("withdrawing this node's claims timed out"),
        }
    }

    /// Tells the other nodes that `to` has new mail (call after the commit), unless
    /// the commit told them already (see `Cluster::notify_after_commits`).
    pub fn mail(&self, to: &DeviceAddress) {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.mail_after_commits.load(Relaxed) && self.has_peers() {
            self.notifier.publish(Hint::Mail(*to));
        }
    }

    /// Has the mailbox writer tell the other nodes of new mail with a NOTIFY right
    /// behind each batch's `COMMIT`, on the batch's own connection and in the same
    /// round trip, in place of a hint per send through `notifier`'s publisher (a
    /// transaction and a round trip on a connection of its own, after a hand-off to
    /// its task). Hints stay best effort: a NOTIFY that fails is found by the
    /// re-check. Returns whether the writer took it.
    pub(crate) fn notify_after_commits(
        self: &Arc<Self>,
        notifier: &Arc<notify::PgNotifier>,
    ) -> bool {
        // Weak: the backend holds this hook.
        let (cluster, notifier) = (Arc::downgrade(self), Arc::downgrade(notifier));
        let taken = self.pg.notify_after_commits(CommitNotes {
            channel: notify::CHANNEL,
            origin: Box::new(move || match (cluster.upgrade(), notifier.upgrade()) {
                (Some(c), Some(n)) if c.has_peers() => Some(n.origin_prefix()),
                _ => None,
            }),
        });
        if taken {
            self.mail_after_commits
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        taken
    }

    /// Whether another node may be listening (see `peers`).
    fn has_peers(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let hinted = self.hinted_ms.load(Relaxed);
        self.peers.load(Relaxed)
            || (hinted > 0
                && (self.started.elapsed().as_millis() as u64).saturating_sub(hinted)
                    < PEER_SILENT.as_millis() as u64)
    }

    /// Claims `addr`'s deliveries for this node's subscription `id`, displacing any
    /// connection of the device on another node. The claim is withdrawn on drop.
    pub(crate) async fn claim(self: &Arc<Self>, addr: DeviceAddress, id: u64) -> Claim {
        let this = self.clone();
        let claimed = self
            .on_db(async move {
                let client = this.pg.client().await?;
                let a = addr_bytes(&addr);
                client
                    .execute(
                        &format!(
                            "INSERT INTO device_sessions (account, device, node, conn, since_ms) \
                             VALUES ($1, $2, $3, $4, {NOW_MS}) ON CONFLICT (account, device) DO UPDATE \
                             SET node = EXCLUDED.node, conn = EXCLUDED.conn, since_ms = EXCLUDED.since_ms"
                        ),
                        &[
                            &&a[..16],
                            &i64::from(addr.device.get()),
                            &this.pg.incarnation(),
                            &(id as i64),
                        ],
                    )
                    .await
                    .map_err(|e| this.pg.classify(&e))
            })
            .await;
        match claimed {
            Ok(_) => {
                self.claims().insert(addr, id);
                self.notifier.publish(Hint::Claimed(addr));
            }
            // The re-check cannot displace the other connection without the row; it
            // goes when that connection ends or this device reconnects.
            Err(e) => debug!(error = %e, "claiming a device's deliveries failed"),
        }
        Claim {
            cluster: self.clone(),
            addr,
            id,
        }
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceAddress, u64>> {
        self.claimed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `fut` on the database runtime and awaits it from any runtime, at most
    /// [`DB_DEADLINE`] (a database host that vanished answers nothing at all).
    async fn on_db<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = StoreResult<T>> + Send + 'static,
    ) -> StoreResult<T> {
        self.pg.call_within(DB_DEADLINE, fut).await
    }

    async fn follow(
        self: Arc<Self>,
        events: Option<mpsc::Receiver<Event>>,
        recheck: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut heads: HashMap<DeviceAddress, i64> = HashMap::new();
        let mut tick = tokio::time::interval(recheck);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listening = events.is_some();
        let (_none, idle) = mpsc::channel(1);
        let mut events = events.unwrap_or(idle);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                ev = events.recv(), if listening => match ev {
                    Some(Event::Hints(hints)) => {
                        // Another node is here: a device that connects there says
                        // so, before it needs this node's hints.
                        let now = (self.started.elapsed().as_millis() as u64).max(1);
                        self.hinted_ms.store(now, std::sync::atomic::Ordering::Relaxed);
                        let mut claimed = Vec::new();
                        for h in hints {
                            match h {
                                Hint::Mail(a) => {
                                    self.active.wake(&a);
                                }
                                Hint::Carried(a, rows) => {
                                    self.active.wake_with(&a, rows);
                                }
                                // Only a device whose delivery this node claims can
                                // be displaced here: the others cost no read.
                                Hint::Claimed(a) if self.claims().contains_key(&a) => {
                                    claimed.push(a)
                                }
                                Hint::Claimed(_) => {}
                            }
                        }
                        if !claimed.is_empty() {
                            let local = self.local();
                            self.recheck(&claimed, &local, &mut heads, false).await;
                        }
                    }
                    Some(Event::Resync) => self.recheck_all(&mut heads, true).await,
                    None => listening = false,
                },
                _ = tick.tick() => self.recheck_all(&mut heads, false).await,
            }
        }
    }

    /// The devices subscribed on this node, with their subscription ids: one walk of
    /// the device table (which every send locks) per re-check.
    fn local(&self) -> HashMap<DeviceAddress, u64> {
        self.active.subscribed().into_iter().collect()
    }

    async fn recheck_all(&self, heads: &mut HashMap<DeviceAddress, i64>, wake_all: bool) {
        let local = self.local();
        heads.retain(|a, _| local.contains_key(a));
        let addrs: Vec<DeviceAddress> = local.keys().copied().collect();
        for chunk in addrs.chunks(RECHECK_CHUNK) {
            self.recheck(chunk, &local, heads, wake_all).await;
        }
    }

    /// Reads the mailbox heads and claims of `addrs` (those subscribed here): wakes
    /// each whose head moved since the last look (all of them with `wake_all`), and
    /// displaces each that another connection claimed.
    async fn recheck(
        &self,
        addrs: &[DeviceAddress],
        local: &HashMap<DeviceAddress, u64>,
        heads: &mut HashMap<DeviceAddress, i64>,
        wake_all: bool,
    ) {
        let accounts: Vec<Vec<u8>> = addrs
            .iter()
            .map(|a| a.account.as_bytes().to_vec())
            .collect();
        let devices: Vec<i64> = addrs.iter().map(|a| i64::from(a.device.get())).collect();
        let pg = self.pg.clone();
        let rows = self
            .on_db(async move {
                let client = pg.client().await?;
                let rows = client
                    .query(
                        "SELECT u.a, u.d, h.last_seq, s.node, s.conn \
                         FROM unnest($1::bytea[], $2::int8[]) AS u(a, d) \
                         LEFT JOIN mailbox_heads h ON h.account = u.a AND h.device = u.d \
                         LEFT JOIN device_sessions s ON s.account = u.a AND s.device = u.d",
                        &[&accounts, &devices],
                    )
                    .await
                    .map_err(|e| pg.classify(&e))?;
                Ok(rows
                    .into_iter()
                    // A row that does not decode (a drifted schema) is skipped: the
                    // next re-check or a hint finds the device again.
                    .filter_map(|r| {
                        let a: Vec<u8> = r.try_get(0).ok()?;
                        let d: i64 = r.try_get(1).ok()?;
                        let seq: Option<i64> = r.try_get(2).ok()?;
                        let claim: Option<(String, i64)> = r
                            .try_get::<_, Option<String>>(3)
                            .ok()?
                            .zip(r.try_get::<_, Option<i64>>(4).ok()?);
                        Some((a, d, seq, claim))
                    })
                    .collect::<Vec<_>>())
            })
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                debug!(error = %e, "re-checking connected mailboxes failed");
                return;
            }
        };
        for (account, device, seq, claim) in rows {
            let Ok(addr) = DeviceAddress::from_wire(&account, device as u32) else {
                continue;
            };
            let Some(&id) = local.get(&addr) else {
                continue;
            };
            if let Some((node, conn)) = claim {
                let ours = node == self.pg.incarnation() && conn == id as i64;
                if !ours && self.claims().get(&addr) == Some(&id) {
                    self.active.displace(&addr, id);
                    continue;
                }
            }
            let seq = seq.unwrap_or(0);
            // Also when first seen: a message committed between the subscription's
            // first read and now, whose hint was lost, is found here.
            let moved = heads.insert(addr, seq) != Some(seq);
            if wake_all || moved {
                self.active.wake(&addr);
            }
        }
    }

    async fn heartbeat(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                // What it held is withdrawn by `leave`, after the connections.
                _ = stop.changed() => return,
                _ = tick.tick() => {
                    if let Err(e) = self.beat().await {
                        debug!(error = %e, "node heartbeat failed");
                    }
                }
            }
        }
    }

    async fn beat(&self) -> StoreResult<()> {
        let pg = self.pg.clone();
        let peers = self
            .on_db(async move {
                let client = pg.client().await?;
                let row = client
                    .query_one(
                        &format!(
                            "WITH beat AS (INSERT INTO nodes (node, started_ms, heartbeat_ms) \
                             VALUES ($1, {NOW_MS}, {NOW_MS}) \
                             ON CONFLICT (node) DO UPDATE SET heartbeat_ms = EXCLUDED.heartbeat_ms \
                             RETURNING 1) \
                             SELECT count(*) FROM nodes WHERE node <> $1 AND heartbeat_ms >= {NOW_MS} - $2"
                        ),
                        &[&pg.incarnation(), &(PEER_SILENT.as_millis() as i64)],
                    )
                    .await
                    .map_err(|e| pg.classify(&e))?;
                row.try_get::<_, i64>(0).map_err(|e| pg.classify(&e))
            })
            .await?;
        self.peers
            .store(peers > 0, std::sync::atomic::Ordering::Relaxed);
        // The sweep of silent nodes runs on one node at a time.
        let pg = self.pg.clone();
        let held = tokio::task::spawn_blocking(move || pg.try_hold("sweep:nodes", 3 * HEARTBEAT))
            .await
            .map_err(|_| StoreError::Backend("lease task failed".into()))??;
        if !held {
            return Ok(());
        }
        let pg = self.pg.clone();
        self.on_db(async move {
            let client = pg.client().await?;
            let silent = format!("SELECT node FROM nodes WHERE heartbeat_ms < {NOW_MS} - $1");
            for sql in [
                format!("DELETE FROM device_sessions WHERE node IN ({silent})"),
                format!("DELETE FROM nodes WHERE node IN ({silent})"),
            ] {
                client
                    .execute(&sql, &[&NODE_SILENT_MS])
                    .await
                    .map_err(|e| pg.classify(&e))?;
            }
            Ok(())
        })
        .await
    }
}

/// A device's claim on its deliveries on this node; withdrawn on drop (if still this
/// connection's: a newer claim elsewhere stays).
#[derive(Debug)]
pub(crate) struct Claim {
    cluster: Arc<Cluster>,
    addr: DeviceAddress,
    id: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let (addr, id) = (self.addr, self.id);
        {
            let mut claims = self.cluster.claims();
            if claims.get(&addr) == Some(&id) {
                claims.remove(&addr);
            }
        }
        let pg = self.cluster.pg.clone();
        pg.clone().spawn(async move {
            let Ok(client) = pg.client().await else {
                return;
            };
            let a = addr_bytes(&addr);
            let _ = client
                .execute(
                    "DELETE FROM device_sessions WHERE account = $1 AND device = $2 AND node = $3 AND conn = $4",
                    &[&&a[..16], &i64::from(addr.device.get()), &pg.incarnation(), &(id as i64)],
                )
                .await;
        });
    }
}
