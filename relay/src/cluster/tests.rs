//! Nodes on a real PostgreSQL: what a clean stop gives up.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tern_proto::{AccountId, DeviceAddress, DeviceId};
use tokio::sync::watch;

use super::notify::{Event, Hint, NoHints, Notifier};
use super::{Cluster, HEARTBEAT};
use crate::mailboxes::ActiveMailboxes;
use crate::store::pg::{testdb, PgBackend};

fn device(n: u8) -> DeviceAddress {
    DeviceAddress {
        account: AccountId([n; 16]),
        device: DeviceId::PRIMARY,
    }
}

/// A node's cluster part on `pg`, and the sender that stops its tasks.
fn join(pg: &Arc<PgBackend>) -> (Arc<Cluster>, watch::Sender<bool>) {
    let (stop, stopped) = watch::channel(false);
    let cluster = Cluster::start(
        pg.clone(),
        Arc::new(ActiveMailboxes::default()),
        Arc::new(NoHints),
        Duration::from_secs(60),
        stopped,
    );
    (cluster, stop)
}

fn count(pg: &PgBackend, sql: &str, name: &str) -> i64 {
    testdb::query(pg, sql, &[&name])[0].get(0)
}

#[test]
fn a_process_leaving_keeps_what_its_replacement_under_the_same_node_id_holds() {
    let (_db, opts) = testdb::db();
    // The old process is stopping while its replacement, under the same node id,
    // already serves.
    let old = Arc::new(testdb::node(&opts, "node-a"));
    let new = Arc::new(testdb::node(&opts, "node-a"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (old_cluster, stop_old) = join(&old);
        let (new_cluster, _stop_new) = join(&new);
        // Each holds a claim (with the same connection id), a lease and a heartbeat.
        let old_claim = old_cluster.claim(device(1), 1).await;
        let new_claim = new_cluster.claim(device(2), 1).await;
        let (o, n) = (old.clone(), new.clone());
        tokio::task::spawn_blocking(move || {
            assert!(o.try_hold("old-lease", Duration::from_secs(60)).unwrap());
            assert!(n.try_hold("new-lease", Duration::from_secs(60)).unwrap());
        })
        .await
        .unwrap();
        let beats = "SELECT count(*) FROM nodes WHERE node = $1";
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for pg in [&old, &new] {
            while count(pg, beats, pg.incarnation()) == 0 {
                assert!(std::time::Instant::now() < deadline, "no heartbeat");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // The old one's connection claim outlives its connection (its withdrawal
        // failed): `leave` withdraws it.
        std::mem::forget(old_claim);
        stop_old.send(true).unwrap();
        old_cluster.leave(Duration::from_secs(5)).await;
        let mine = new.incarnation();
        let new_lease = "SELECT count(*) FROM leases WHERE name = 'new-lease' AND holder = $1";
        let claims = "SELECT count(*) FROM device_sessions WHERE node = $1";
        assert_eq!(count(&new, claims, mine), 1, "new's claim");
        assert_eq!(count(&new, new_lease, mine), 1, "new's lease");
        assert_eq!(count(&new, beats, mine), 1, "new's heartbeat");
        // Nothing of the old one's is left.
        for others in [
            "SELECT count(*) FROM device_sessions WHERE node <> $1",
            "SELECT count(*) FROM leases WHERE holder <> $1",
            "SELECT count(*) FROM nodes WHERE node <> $1",
        ] {
            assert_eq!(count(&new, others, mine), 0, "{others}");
        }
        drop(new_claim);
    });
}

#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<Hint>>);

impl Notifier for Recorder {
    fn publish(&self, hint: Hint) {
        self.0.lock().expect("hints").push(hint);
    }
    fn events(&self) -> Option<tokio::sync::mpsc::Receiver<Event>> {
        None
    }
}

#[test]
fn a_node_alone_publishes_no_mail_hints_and_one_with_peers_does() {
    let (_pg, opts) = testdb::db();
    let (_stop_tx, stop) = watch::channel(false);
    let start = |id: &str, hints: Arc<Recorder>| {
        let pg = Arc::new(testdb::node(&opts, id));
        let active = Arc::new(ActiveMailboxes::default());
        let cluster = Cluster::start(pg.clone(), active, hints, HEARTBEAT, stop.clone());
        (pg, cluster)
    };
    let hints = Arc::new(Recorder::default());
    let (pg, a) = start("a", hints.clone());
    let to = DeviceAddress::from_wire(&[7; 16], 1).expect("address");
    pg.run(a.beat()).expect("beat");
    a.mail(&to);
    assert!(hints.0.lock().expect("hints").is_empty(), "alone");

    let (pg_b, b) = start("b", Arc::new(Recorder::default()));
    pg_b.run(b.beat()).expect("b beats");
    pg.run(a.beat()).expect("beat");
    a.mail(&to);
    assert_eq!(*hints.0.lock().expect("hints"), vec![Hint::Mail(to)]);
}

#[test]
fn a_hint_from_another_node_turns_mail_hints_on_whatever_the_heartbeat_read() {
    let (_pg, opts) = testdb::db();
    let (_stop_tx, stop) = watch::channel(false);
    let pg = Arc::new(testdb::node(&opts, "a"));
    let hints = Arc::new(Recorder::default());
    let (events_tx, events) = tokio::sync::mpsc::channel(8);
    struct Feed(
        std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Event>>>,
        Arc<Recorder>,
    );
    impl Notifier for Feed {
        fn publish(&self, hint: Hint) {
            self.1.publish(hint);
        }
        fn events(&self) -> Option<tokio::sync::mpsc::Receiver<Event>> {
            self.0.lock().expect("events").take()
        }
    }
    let feed = Arc::new(Feed(std::sync::Mutex::new(Some(events)), hints.clone()));
    let a = Cluster::start(
        pg.clone(),
        Arc::new(ActiveMailboxes::default()),
        feed,
        HEARTBEAT,
        stop,
    );
    pg.run(a.beat()).expect("beat");
    let to = device(9);
    a.mail(&to);
    assert!(hints.0.lock().expect("hints").is_empty(), "alone");
    // Another node's device connects: its claim's hint arrives.
    pg.run(async {
        events_tx
            .send(Event::Hints(vec![Hint::Claimed(device(8))]))
            .await
            .map_err(|_| crate::store::StoreError::Backend("closed".into()))
    })
    .expect("hint");
    for _ in 0..500 {
        a.mail(&to);
        if !hints.0.lock().expect("hints").is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // A heartbeat that read no other node (its row is not there) does not undo it.
    pg.run(a.beat()).expect("beat");
    hints.0.lock().expect("hints").clear();
    a.mail(&to);
    assert_eq!(*hints.0.lock().expect("hints"), vec![Hint::Mail(to)]);
}

/// A node whose mailbox writer notifies right behind its commits tells the others of
/// new mail from the batch that stored it, with the rows when they are small (exactly
/// what a read of the mailbox returns), and its publisher sends no second hint. A
/// batch to many mailboxes is told in notes that each fit a NOTIFY.
#[test]
fn mail_hints_go_out_right_behind_the_batch_that_stored_the_mail() {
    use crate::store::{Envelope, MailboxStore};
    let (_pg, opts) = testdb::db();
    let a = Arc::new(testdb::node(&opts, "a"));
    let b = Arc::new(testdb::node(&opts, "b"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (_stop_tx, stop) = watch::channel(false);
        let wait = Duration::from_secs(10);
        let tells = super::notify::PgNotifier::start(a.clone(), stop.clone());
        let hears = super::notify::PgNotifier::start(b.clone(), stop.clone());
        let mut events = hears.events().expect("b's events");
        let listening = tokio::time::timeout(wait, events.recv()).await;
        assert_eq!(listening, Ok(Some(Event::Resync)), "b listens");
        let active = Arc::new(ActiveMailboxes::default());
        let cluster = Cluster::start(a.clone(), active, tells.clone(), HEARTBEAT, stop);
        assert!(cluster.notify_after_commits(&tells));
        assert!(!cluster.notify_after_commits(&tells), "one writer hook");
        // b is a peer a knows of (alone, a would tell nobody).
        let (b_cluster, _stop_b) = join(&b);
        let (pa, pb, ca) = (a.clone(), b.clone(), cluster.clone());
        tokio::task::spawn_blocking(move || {
            pb.run(b_cluster.beat()).expect("b beats");
            pa.run(ca.beat()).expect("a beats");
        })
        .await
        .expect("no panic");
        let to = device(9);
        let m = Envelope {
            message_id: tern_proto::MessageId([9; 16]),
            payload: bytes::Bytes::from_static(b"sealed"),
        };
        let store = a.clone();
        tokio::task::spawn_blocking(move || store.append(&to, &[m], 1_000, 9_000))
            .await
            .expect("no panic")
            .expect("append");
        let heard = tokio::time::timeout(wait, events.recv()).await;
        let store = a.clone();
        let read = tokio::task::spawn_blocking(move || store.read(&to, 0, 10))
            .await
            .expect("no panic")
            .expect("read");
        let carried = super::notify::Carried {
            after: read[0].seq - 1,
            rows: read,
        };
        assert_eq!(
            heard,
            Ok(Some(Event::Hints(vec![Hint::Carried(to, carried)])))
        );
        // What the mailboxes layer calls after the commit publishes nothing more.
        cluster.mail(&to);
        let more = tokio::time::timeout(Duration::from_millis(500), events.recv()).await;
        assert!(more.is_err(), "a second hint: {more:?}");

        // Too large to carry: the mailbox alone.
        let big = Envelope {
            message_id: tern_proto::MessageId([10; 16]),
            payload: bytes::Bytes::from(vec![1u8; 4000]),
        };
        let store = a.clone();
        tokio::task::spawn_blocking(move || store.append(&to, &[big], 1_000, 9_000))
            .await
            .expect("no panic")
            .expect("append");
        let heard = tokio::time::timeout(wait, events.recv()).await;
        assert_eq!(heard, Ok(Some(Event::Hints(vec![Hint::Mail(to)]))));

        // 300 mailboxes in one batch (queued before any is answered), rows of 600
        // bytes: many notes, each under the NOTIFY limit, and every mailbox told once.
        let store = a.clone();
        let queued = tokio::task::spawn_blocking(move || {
            (0..300u32)
                .map(|i| {
                    let to = DeviceAddress {
                        account: AccountId([7; 16]),
                        device: DeviceId::new(i + 1).expect("device"),
                    };
                    let m = Envelope {
                        message_id: tern_proto::MessageId([i as u8; 16]),
                        payload: bytes::Bytes::from(vec![i as u8; 600]),
                    };
                    store.queue_append(&to, &[m], 1_000, 9_000).expect("queue")
                })
                .collect::<Vec<_>>()
        })
        .await
        .expect("no panic");
        for rx in queued {
            rx.await.expect("answered").expect("stored");
        }
        let mut told = std::collections::HashSet::new();
        while told.len() < 300 {
            let heard = tokio::time::timeout(wait, events.recv()).await;
            let Ok(Some(Event::Hints(hints))) = heard else {
                panic!("{} of 300 told, then {heard:?}", told.len());
            };
            for h in hints {
                let (Hint::Carried(a, _) | Hint::Mail(a)) = h else {
                    panic!("{h:?}");
                };
                assert!(told.insert(a), "told twice: {a:?}");
            }
        }
    });
}
