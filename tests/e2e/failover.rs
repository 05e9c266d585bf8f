//! Failover: two relay nodes over a primary and a synchronous standby. The primary
//! is killed (SIGKILL) under load and the standby promoted; every send a sender saw
//! acknowledged is delivered, and the nodes find the new primary by themselves
//! through their multi-host URL (`target_session_attrs=read-write`).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use tern_client::net::{Incoming, RelayConnection};
use tern_proto::{DeviceAddress, ErrorCode, RelayAddress};
use tern_relay::testing::TestPostgres;

use crate::support::{envelope, number, register, within, Device, RelayProcess, STEP};

const SENDERS: u32 = 4;
const PER_SENDER: u32 = 500;
/// Sends each sender keeps in flight.
const WINDOW: usize = 16;
/// The primary is killed once this many sends were acknowledged.
const KILL_AFTER: u64 = 300;
/// Everything (sends, retries, deliveries) must be done within this.
const DEADLINE: Duration = Duration::from_secs(45);
/// From the kill to the promotion.
const PROMOTE_AFTER: Duration = Duration::from_secs(1);
/// One connection attempt, one request.
const ATTEMPT: Duration = Duration::from_secs(5);

fn start_node(dir: &Path, url: &str, peer: Option<&RelayProcess>) -> RelayProcess {
    let extra = "connect_timeout = \"500ms\"\nstatement_timeout = \"1s\"\n\
         recheck_interval = \"1s\"\n\
         [rate_limits]\nsends_per_account = \"100000/1m\"\n\
         intake_per_sender_per_mailbox = \"100000/1m\"";
    let peer = peer.map(|p| p.data_dir.as_path());
    crate::support::pg_node(dir, url, extra, peer, &[], None, &[]).expect("node starts")
}

/// What the senders saw and when.
#[derive(Default)]
struct Tally {
    acked: AtomicU64,
    /// Set once the standby was promoted.
    promoted: Mutex<Option<Instant>>,
    /// The first acknowledgement after the promotion.
    first_after: Mutex<Option<Instant>>,
}

impl Tally {
    fn ack(&self) {
        self.acked.fetch_add(1, Ordering::SeqCst);
        let promoted = *self.promoted.lock().unwrap();
        if promoted.is_some() {
            self.first_after
                .lock()
                .unwrap()
                .get_or_insert_with(Instant::now);
        }
    }
}

/// An authenticated connection, retried until `deadline` (the database may be down).
async fn reconnect(
    relay: &RelayAddress,
    device: &(DeviceAddress, tern_client::identity::DeviceKeyPair),
    deadline: Instant,
) -> Option<RelayConnection> {
    while Instant::now() < deadline {
        let attempt = async {
            let (conn, _inbox) = RelayConnection::connect(relay).await.ok()?;
            conn.authenticate(&device.0, &device.1).await.ok()?;
            Some(conn)
        };
        if let Ok(Some(conn)) = tokio::time::timeout(ATTEMPT, attempt).await {
            return Some(conn);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Sends `numbers` to `to`, `WINDOW` at a time, retrying each until acknowledged or
/// the deadline; returns the numbers acknowledged.
async fn sender(
    relay: RelayAddress,
    me: Device,
    to: DeviceAddress,
    numbers: Vec<u32>,
    tally: Arc<Tally>,
    deadline: Instant,
    label: usize,
) -> Vec<u32> {
    let device = (me.address, me.key.clone());
    let mut conn = Some(me.conn);
    let mut todo: Vec<u32> = numbers.into_iter().rev().collect();
    let mut acked = Vec::new();
    let mut codes: HashMap<String, u32> = HashMap::new();
    while (!todo.is_empty()) && Instant::now() < deadline {
        let c = match conn.take().filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => match reconnect(&relay, &device, deadline).await {
                Some(c) => c,
                None => break,
            },
        };
        let mut flight = FuturesUnordered::new();
        let mut broken = false;
        loop {
            while !broken && flight.len() < WINDOW {
                let Some(n) = todo.pop() else { break };
                let send = c.send(&to, [envelope(n)]);
                flight.push(async move { (n, tokio::time::timeout(ATTEMPT, send).await) });
            }
            let Some((n, result)) = flight.next().await else {
                break;
            };
            match result {
                Ok(Ok(_)) => {
                    acked.push(n);
                    tally.ack();
                }
                Ok(Err(e)) => {
                    todo.push(n);
                    let key = match e.relay_code() {
                        Some(code) => format!("{code:?}"),
                        None => "transport".into(),
                    };
                    *codes.entry(key).or_default() += 1;
                    if e.relay_code() == Some(ErrorCode::Unavailable) {
                        // Back off a little while the database is away.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    } else {
                        broken = true;
                    }
                }
                Err(_) => {
                    todo.push(n);
                    broken = true;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        if !broken {
            conn = Some(c);
        } else {
            c.close_now();
        }
    }
    println!("sender {label}: errors seen {codes:?}");
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_loses_nothing_acknowledged() {
    let started = Instant::now();
    let deadline = started + DEADLINE;
    let primary = TestPostgres::start_with(&[("fsync", "on")]);
    primary.create_db("tern");
    let standby = primary.standby("tern_standby");
    let url = format!(
        "host={},{} port=5432,5432 user=tern dbname=tern target_session_attrs=read-write",
        primary.dir().display(),
        standby.dir().display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start_node(&dir.path().join("a"), &url, None);
    let b = start_node(&dir.path().join("b"), &url, Some(&a));

    let (bob_addr, bob_key, bob_id) = register(&a.address).await.go_offline().await;
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        senders.push(register(&a.address).await);
    }

    // The recipient on b: every delivery counted by message number, acked as it
    // comes, reconnecting whenever its connection ends.
    let delivered: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let recipient = {
        let delivered = delivered.clone();
        let relay = b.address.clone();
        let device = (bob_addr, bob_key.clone());
        tokio::spawn(async move {
            let mut reconnects = 0u32;
            while Instant::now() < deadline && !*stop_rx.borrow() {
                let attempt = async {
                    let (conn, inbox) = RelayConnection::connect(&relay).await.ok()?;
                    conn.authenticate(&device.0, &device.1).await.ok()?;
                    Some((conn, inbox))
                };
                let Ok(Some((conn, mut inbox))) = tokio::time::timeout(ATTEMPT, attempt).await
                else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                reconnects += 1;
                loop {
                    tokio::select! {
                        _ = stop_rx.changed() => break,
                        next = inbox.recv() => match next {
                            Some(Ok(Incoming::Delivery(d))) => {
                                *delivered.lock().unwrap().entry(number(&d)).or_default() += 1;
                                // Acks may fail while the database is away; what is
                                // not deleted comes again (a duplicate, never a loss).
                                drop(tokio::spawn(conn.ack(&[d.seq])));
                            }
                            Some(Ok(Incoming::QueueEmpty)) => {}
                            Some(Err(_)) | None => break,
                        },
                    }
                }
                conn.close_now();
            }
            reconnects
        })
    };
    let _ = bob_id;

    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for (i, s) in senders.into_iter().enumerate() {
        let numbers: Vec<u32> = (0..PER_SENDER).map(|k| i as u32 * PER_SENDER + k).collect();
        tasks.push(tokio::spawn(sender(
            a.address.clone(),
            s,
            bob_addr,
            numbers,
            tally.clone(),
            deadline,
            i,
        )));
    }

    // Kill the primary under load, then promote the standby.
    while tally.acked.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(
            Instant::now() < deadline,
            "no {KILL_AFTER} acks before the kill"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    primary.kill();
    let at_kill = tally.acked.load(Ordering::SeqCst);
    // As long as an operator (or a failover manager) takes to decide: meanwhile the
    // nodes find no read-write host and sends fail UNAVAILABLE.
    tokio::time::sleep(PROMOTE_AFTER).await;
    let before_promotion = tally.acked.load(Ordering::SeqCst);
    let standby = tokio::task::spawn_blocking(move || {
        standby.promote();
        standby
    })
    .await
    .expect("promote");
    *tally.promoted.lock().unwrap() = Some(Instant::now());
    let promoted = Instant::now();

    let mut acked: HashSet<u32> = HashSet::new();
    for t in tasks {
        acked.extend(t.await.expect("sender"));
    }
    // Every acknowledged send must arrive at the recipient.
    let missing = loop {
        let missing: Vec<u32> = {
            let got = delivered.lock().unwrap();
            acked
                .iter()
                .filter(|n| !got.contains_key(n))
                .copied()
                .collect()
        };
        if missing.is_empty() || Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = stop_tx.send(true);
    let reconnects = recipient.await.expect("recipient");
    let got = delivered.lock().unwrap().clone();
    let duplicates: u32 = got.values().map(|c| c - 1).sum();
    let first_after = tally
        .first_after
        .lock()
        .unwrap()
        .map(|t| t.duration_since(promoted));
    println!(
        "failover: {} acked ({at_kill} before the kill) of {}, {} delivered, {duplicates} \
         duplicates, {} missing, recipient connections {reconnects}; first send acked \
         {first_after:?} after promotion ({} acked between kill and promotion); test {:?}",
        acked.len(),
        SENDERS * PER_SENDER,
        got.len(),
        missing.len(),
        before_promotion - at_kill,
        started.elapsed()
    );
    let warnings = |log: String| log.lines().filter(|l| l.contains("WARN")).count();
    println!(
        "warnings: node a {}, node b {}",
        warnings(a.log_text()),
        warnings(b.log_text())
    );
    if !missing.is_empty() {
        println!(
            "node a log:\n{}\nnode b log:\n{}\nstandby log:\n{}",
            a.log_text(),
            b.log_text(),
            standby.log_text()
        );
    }
    assert!(
        missing.is_empty(),
        "acknowledged but never delivered: {missing:?}"
    );
    assert_eq!(
        acked.len() as u32,
        SENDERS * PER_SENDER,
        "every send acknowledged in the end"
    );
    let first_after = first_after.expect("a send succeeded after the promotion");
    assert!(first_after <= Duration::from_secs(30), "{first_after:?}");
    // Nothing was delivered that nobody sent.
    assert!(got.keys().all(|n| *n < SENDERS * PER_SENDER));
}

/// A delivery's read that fails (a database failing over, say) is retried by the
/// delivery task itself: the send's wake-up was spent on the failed read, and on one
/// node nothing else would come to push the message.
#[tokio::test]
async fn a_failed_mailbox_read_is_retried_without_another_wake_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = dir.path().join("faults");
    std::fs::write(&faults, "").expect("faults");
    let plan = format!("file:{}", faults.display());
    let relay = RelayProcess::start_with_env(
        &dir.path().join("relay"),
        "127.0.0.1:0",
        &[],
        &[("TERN_FAULTS", plan.as_str())],
    )
    .expect("relay starts");
    let alice = register(&relay.address).await;
    let (bob_addr, bob_key, bob_id) = register(&relay.address).await.go_offline().await;
    let (mut bob, _) = Device::connect(&relay.address, bob_addr, bob_key, bob_id).await;
    assert_eq!(bob.next().await, Incoming::QueueEmpty);

    std::fs::write(&faults, "mailbox_read=enospc").expect("arm");
    within(alice.conn.send(&bob.address, [envelope(1)]))
        .await
        .expect("send");
    let failed = Instant::now();
    while !relay.log_text().contains("reading a mailbox failed") {
        assert!(failed.elapsed() < STEP, "the read never failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&faults, "").expect("clear");
    let d = tokio::time::timeout(Duration::from_secs(5), bob.next_delivery())
        .await
        .expect("the failed read is retried");
    assert_eq!(number(&d), 1);
}
