//! The crash loop: a real relay process under concurrent senders and recipients,
//! killed with SIGKILL and restarted again and again. It must lose no acknowledged
//! send (P10) and deliver no message again once its ack was answered (P2).
//!
//! The suite runs [`DEFAULT_KILLS`] kills on each mailbox backend (a few seconds each).
//! For a long run set `TERN_CRASH_KILLS`, e.g.
//! `TERN_CRASH_KILLS=100 cargo test -p tern-tests --test e2e crash -- --nocapture`;
//! the figures are printed.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use rand::{Rng, SeedableRng};
use tern_client::identity::DeviceKeyPair;
use tern_client::net::{Envelope, Inbox, Incoming, RelayConnection};
use tern_proto::{DeviceAddress, MessageId, RelayAddress};
use tokio::sync::watch;

use crate::support::{register, RelayProcess, STEP};

/// Kills in the suite's run; `TERN_CRASH_KILLS` raises it.
const DEFAULT_KILLS: u32 = 10;
/// Sender/recipient pairs.
const PAIRS: usize = 4;
/// Sends each sender keeps in flight.
const IN_FLIGHT: usize = 16;
/// Most deliveries a recipient acks in one request.
const ACK_BATCH: usize = 16;
const PAYLOAD: usize = 512;

/// What the clients saw, by message id (a unique number in each payload).
#[derive(Default)]
struct Ledger {
    /// Sends the relay answered as stored.
    acked_sends: HashSet<u64>,
    delivered: HashSet<u64>,
    /// Messages whose ack the relay answered.
    ack_confirmed: HashSet<u64>,
    deliveries: u64,
    /// Delivered again before the client saw its ack answered: allowed.
    redelivered_before_ack: u64,
    /// Delivered again after its ack was answered: a broken P2.
    redelivered_after_ack: Vec<u64>,
}

impl Ledger {
    fn delivered(&mut self, id: u64) {
        self.deliveries += 1;
        if self.ack_confirmed.contains(&id) {
            self.redelivered_after_ack.push(id);
        } else if !self.delivered.insert(id) {
            self.redelivered_before_ack += 1;
        }
    }
}

struct Shared {
    relay: RelayAddress,
    ledger: Mutex<Ledger>,
    /// Bumped at each restart: clients drop their connection and reconnect.
    epoch: watch::Sender<u64>,
    stop_sending: AtomicBool,
    stop_receiving: AtomicBool,
    next_id: AtomicU64,
}

impl Shared {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap()
    }
}

fn envelope(id: u64) -> Envelope {
    let mut payload = vec![0xC5u8; PAYLOAD];
    payload[..8].copy_from_slice(&id.to_be_bytes());
    let mut message_id = [0u8; 16];
    message_id[..8].copy_from_slice(&id.to_be_bytes());
    Envelope {
        message_id: MessageId(message_id),
        payload: Bytes::from(payload),
    }
}

fn id_of(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload[..8].try_into().unwrap())
}

/// Connects and authenticates, retrying with backoff while the relay is down; `None`
/// once `give_up` is set. Fails the test if the relay stays unreachable.
async fn connect(
    shared: &Shared,
    address: &DeviceAddress,
    key: &DeviceKeyPair,
    give_up: &AtomicBool,
) -> Option<(RelayConnection, Inbox)> {
    let deadline = Instant::now() + STEP * 2;
    let mut backoff = Duration::from_millis(20);
    loop {
        if give_up.load(Ordering::Acquire) {
            return None;
        }
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            let (conn, inbox) = RelayConnection::connect(&shared.relay).await?;
            conn.authenticate(address, key).await?;
            Ok::<_, tern_client::Error>((conn, inbox))
        })
        .await;
        if let Ok(Ok(connected)) = attempt {
            return Some(connected);
        }
        assert!(Instant::now() < deadline, "the relay stayed unreachable");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(300));
    }
}

async fn sender(
    shared: Arc<Shared>,
    address: DeviceAddress,
    key: DeviceKeyPair,
    to: DeviceAddress,
) {
    let mut epoch = shared.epoch.subscribe();
    while let Some((conn, _inbox)) = connect(&shared, &address, &key, &shared.stop_sending).await {
        epoch.borrow_and_update();
        let mut in_flight = FuturesUnordered::new();
        loop {
            while in_flight.len() < IN_FLIGHT && !shared.stop_sending.load(Ordering::Acquire) {
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                let sent = conn.send(&to, [envelope(id)]);
                in_flight.push(async move { (id, sent.await) });
            }
            if in_flight.is_empty() {
                return;
            }
            tokio::select! {
                _ = epoch.changed() => break,
                done = tokio::time::timeout(Duration::from_secs(2), in_flight.next()) => {
                    match done {
                        Ok(Some((id, Ok(1)))) => {
                            shared.ledger().acked_sends.insert(id);
                        }
                        // Refused, or the connection is gone: not acknowledged.
                        _ => break,
                    }
                }
            }
        }
        conn.close_now();
    }
}

/// Receives and acks until told to stop; with `drain`, until the relay says the
/// queue is empty and every ack is answered.
async fn recipient(shared: Arc<Shared>, address: DeviceAddress, key: DeviceKeyPair, drain: bool) {
    let mut epoch = shared.epoch.subscribe();
    let never = AtomicBool::new(false);
    let give_up = if drain {
        &never
    } else {
        &shared.stop_receiving
    };
    while let Some((conn, mut inbox)) = connect(&shared, &address, &key, give_up).await {
        epoch.borrow_and_update();
        let mut batch: Vec<(u64, u64)> = Vec::new();
        let mut acks = FuturesUnordered::new();
        let mut emptied = false;
        let done = loop {
            if drain && emptied && batch.is_empty() && acks.is_empty() {
                break true;
            }
            tokio::select! {
                _ = epoch.changed(), if !drain => break false,
                Some((ids, answered)) = acks.next(), if !acks.is_empty() => {
                    match answered {
                        Ok(_) => shared.ledger().ack_confirmed.extend(ids),
                        Err(_) => break false,
                    }
                }
                got = tokio::time::timeout(Duration::from_millis(200), inbox.recv()) => {
                    let first = match got {
                        Ok(Some(item)) => item,
                        Ok(None) => break false,
                        Err(_) if !drain && shared.stop_receiving.load(Ordering::Acquire) => {
                            break true;
                        }
                        Err(_) => continue,
                    };
                    // Whatever else has arrived goes into the same acks.
                    let mut items = vec![first];
                    while let Some(item) = inbox.try_recv() {
                        items.push(item);
                    }
                    let mut broken = false;
                    for item in items {
                        match item {
                            Ok(Incoming::Delivery(d)) => {
                                let id = id_of(&d.payload);
                                shared.ledger().delivered(id);
                                batch.push((d.seq, id));
                            }
                            Ok(Incoming::QueueEmpty) => emptied = true,
                            Err(_) => broken = true,
                        }
                    }
                    for chunk in batch.chunks(ACK_BATCH) {
                        let (seqs, ids): (Vec<u64>, Vec<u64>) = chunk.iter().copied().unzip();
                        let answer = conn.ack(&seqs);
                        acks.push(async move { (ids, answer.await) });
                    }
                    batch.clear();
                    if broken {
                        break false;
                    }
                }
            }
        };
        conn.close_now();
        if done {
            return;
        }
    }
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn config(dir: &Path, backend: &str) -> String {
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        format!("durability = \"fsync\"\n[storage]\nmailboxes = \"{backend}\"\nsegment_mb = 1\n"),
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

async fn crash_loop(backend: &str) {
    let kills: u32 = std::env::var("TERN_CRASH_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(DEFAULT_KILLS);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let flags = vec!["--config".to_owned(), config(dir.path(), backend)];
    let mut relay = RelayProcess::start(&data, &as_strs(&flags)).unwrap();
    let listen = format!("{}:{}", relay.address.host, relay.address.port);

    let mut pairs = Vec::new();
    for _ in 0..PAIRS {
        let s = register(&relay.address).await.go_offline().await;
        let r = register(&relay.address).await.go_offline().await;
        pairs.push((s, r));
    }
    let shared = Arc::new(Shared {
        relay: relay.address.clone(),
        ledger: Mutex::default(),
        epoch: watch::channel(0).0,
        stop_sending: AtomicBool::new(false),
        stop_receiving: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
    });
    let mut senders = Vec::new();
    let mut recipients = Vec::new();
    for ((s_addr, s_key, _), (r_addr, r_key, _)) in &pairs {
        senders.push(tokio::spawn(sender(
            shared.clone(),
            *s_addr,
            s_key.clone(),
            *r_addr,
        )));
        recipients.push(tokio::spawn(recipient(
            shared.clone(),
            *r_addr,
            r_key.clone(),
            false,
        )));
    }

    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    for kill in 1..=kills {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(150..400))).await;
        relay = tokio::task::spawn_blocking({
            let (data, listen, flags) = (data.clone(), listen.clone(), flags.clone());
            move || {
                relay.crash().unwrap();
                RelayProcess::start_at(&data, &listen, &as_strs(&flags)).unwrap()
            }
        })
        .await
        .unwrap();
        shared.epoch.send_replace(u64::from(kill));
    }

    // Stop sending, then a clean restart, then drain every mailbox.
    shared.stop_sending.store(true, Ordering::Release);
    for s in senders {
        tokio::time::timeout(STEP, s).await.unwrap().unwrap();
    }
    shared.stop_receiving.store(true, Ordering::Release);
    shared.epoch.send_modify(|e| *e += 1);
    for r in recipients {
        tokio::time::timeout(STEP, r).await.unwrap().unwrap();
    }
    let relay = tokio::task::spawn_blocking(move || {
        let mut relay = relay;
        relay.stop().unwrap();
        RelayProcess::start_at(&data, &listen, &as_strs(&flags)).unwrap()
    })
    .await
    .unwrap();
    for (_, (r_addr, r_key, _)) in &pairs {
        tokio::time::timeout(
            STEP * 2,
            recipient(shared.clone(), *r_addr, r_key.clone(), true),
        )
        .await
        .unwrap();
    }

    let ledger = shared.ledger();
    let lost: Vec<u64> = ledger
        .acked_sends
        .difference(&ledger.delivered)
        .copied()
        .collect();
    println!(
        "crash loop ({backend}): {kills} kills in {:.1} s; {} sends acknowledged; {} deliveries; \
         {} redelivered before their ack was answered; {} after; {} acknowledged sends lost",
        started.elapsed().as_secs_f64(),
        ledger.acked_sends.len(),
        ledger.deliveries,
        ledger.redelivered_before_ack,
        ledger.redelivered_after_ack.len(),
        lost.len(),
    );
    let log = || relay.log_text();
    assert!(
        !ledger.acked_sends.is_empty(),
        "nothing was sent; log:\n{}",
        log()
    );
    let first = |ids: &[u64]| ids.iter().take(20).copied().collect::<Vec<_>>();
    assert!(
        lost.is_empty(),
        "acknowledged sends lost, e.g. {:?}",
        first(&lost)
    );
    assert!(
        ledger.redelivered_after_ack.is_empty(),
        "delivered again after the ack was answered, e.g. {:?}",
        first(&ledger.redelivered_after_ack)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_loses_and_repeats_nothing() {
    crash_loop("log").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_loses_and_repeats_nothing_on_sled() {
    crash_loop("sled").await;
}
