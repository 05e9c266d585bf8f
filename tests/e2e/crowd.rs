//! One node over PostgreSQL, whose connections run on the relay's own runtime (two
//! workers, as on a two-core machine), under a crowd: many senders to one mailbox,
//! its recipient acking, sends to accounts deleted under the traffic, exports
//! running. Each of these takes a lock that a database call may hold; a worker that
//! waited for one on its core would leave none to drive that call (a hang). Every
//! call is answered, nothing acknowledged is lost, and the node serves as before.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tern_client::net::Incoming;
use tern_client::Error as ClientError;
use tern_proto::ErrorCode;

use crate::support::{envelope, number, pg_node, register, within, PgNodes, RelayProcess};

/// Senders, each on a connection of its own.
const SENDERS: u32 = 16;
/// Sends each makes to the one busy mailbox (one message each, four in flight).
const EACH: u32 = 30;
/// Accounts that also receive, deleted once a third of the sends are acknowledged.
const DOOMED: usize = 4;
/// Senders that export their account in the middle of it.
const EXPORTERS: u32 = 4;
/// How long one request is retried while `UNAVAILABLE`, at most.
const RETRYING: Duration = Duration::from_secs(10);
/// Everything must be done by then; a hang shows as this running out.
const DEADLINE: Duration = Duration::from_secs(90);

/// `op`'s answer once it is not `UNAVAILABLE` (a relay at capacity, or a batch that
/// shared a failed commit), which is retried as clients do: after the relay's retry
/// advice (at most a second; 50 ms without), for at most [`RETRYING`] in all.
async fn unless_unavailable<T, F, Fut>(mut op: F, retried: &AtomicU64) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let until = tokio::time::Instant::now() + RETRYING;
    loop {
        match op().await {
            Err(e)
                if e.relay_code() == Some(ErrorCode::Unavailable)
                    && tokio::time::Instant::now() < until =>
            {
                retried.fetch_add(1, Ordering::SeqCst);
                let pause = e.retry_after().unwrap_or(Duration::from_millis(50));
                tokio::time::sleep(pause.min(Duration::from_secs(1))).await;
            }
            answer => return answer,
        }
    }
}

fn start(nodes: &PgNodes) -> RelayProcess {
    let extra = "[rate_limits]\nregistrations_per_prefix = \"1000/1m\"\n\
                 sends_per_account = \"100000/1m\"\nintake_per_sender_per_mailbox = \"100000/1m\"";
    let dir = nodes.data_dir("a");
    let env = [("TOKIO_WORKER_THREADS", "2")];
    pg_node(&dir, &nodes.url(), extra, None, &[], None, &env).expect("node starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_on_one_mailbox_with_deletions_and_exports_is_answered_in_full() {
    let nodes = PgNodes::start(&[("fsync", "on")]);
    let relay = start(&nodes);
    let address = relay.address.clone();
    let mut bob = register(&address).await;
    assert_eq!(bob.next().await, Incoming::QueueEmpty);
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        senders.push(Arc::new(register(&address).await));
    }
    let mut doomed = Vec::new();
    for _ in 0..DOOMED {
        doomed.push(register(&address).await);
    }
    let doomed_addrs: Vec<_> = doomed.iter().map(|d| d.address).collect();
    let acked = Arc::new(AtomicU64::new(0));
    let (retried, exported) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let bob_addr = bob.address;

    let crowd = async {
        let sending = senders.iter().enumerate().map(|(i, s)| {
            let (s, acked, doomed) = (s.clone(), acked.clone(), doomed_addrs.clone());
            let (retried, exported) = (retried.clone(), exported.clone());
            async move {
                let i = u32::try_from(i).expect("few");
                for chunk in (0..EACH).collect::<Vec<_>>().chunks(4) {
                    let conn = &s.conn;
                    let sends = chunk.iter().map(|n| {
                        let n = i * 1000 + n;
                        unless_unavailable(move || conn.send(&bob_addr, [envelope(n)]), &retried)
                    });
                    for r in futures::future::join_all(sends).await {
                        r.expect("a send to the busy mailbox is stored");
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    // One to an account that may be gone by now: stored, or refused as
                    // one that never existed.
                    let to = doomed[(i as usize + chunk[0] as usize / 4) % DOOMED];
                    let sent =
                        unless_unavailable(|| s.conn.send(&to, [envelope(chunk[0])]), &retried);
                    if let Err(e) = sent.await {
                        assert_eq!(e.relay_code(), Some(ErrorCode::UnknownRecipient), "{e}");
                    }
                    if i < EXPORTERS && chunk.contains(&(EACH / 2)) {
                        let export = || async {
                            let mut out = Vec::new();
                            let len = s.conn.export_account(true, &mut out).await?;
                            Ok((len, out))
                        };
                        let (len, out) =
                            unless_unavailable(export, &retried).await.expect("export");
                        assert_eq!(len, out.len() as u64);
                        serde_json::from_slice::<serde_json::Value>(&out).expect("JSON");
                        exported.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        let deleting = async {
            while acked.load(Ordering::SeqCst) < u64::from(SENDERS * EACH / 3) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let deletions = doomed
                .iter()
                .map(|d| d.conn.delete_account(&d.identity, &d.address));
            for r in futures::future::join_all(deletions).await {
                r.expect("deleted under the traffic");
            }
        };
        let receiving = async {
            let (mut seen, mut again) = (HashSet::new(), 0u32);
            while seen.len() < (SENDERS * EACH) as usize {
                let d = bob.next_delivery().await;
                // Acks take the ordering lock too.
                unless_unavailable(|| bob.conn.ack(&[d.seq]), &retried)
                    .await
                    .expect("ack");
                if !seen.insert(number(&d)) {
                    again += 1;
                }
            }
            (seen, again)
        };
        let (_, _, seen) = tokio::join!(futures::future::join_all(sending), deleting, receiving);
        seen
    };
    let Ok((seen, again)) = tokio::time::timeout(DEADLINE, crowd).await else {
        let log = std::fs::read_to_string(&relay.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!("the crowd was not answered within {DEADLINE:?}; the relay's log ends:\n{tail:#?}");
    };
    let want: HashSet<u32> = (0..SENDERS)
        .flat_map(|i| (0..EACH).map(move |n| i * 1000 + n))
        .collect();
    assert_eq!(seen, want, "every acknowledged send delivered");
    assert_eq!(exported.load(Ordering::SeqCst), u64::from(EXPORTERS));
    // Only a retried send (UNAVAILABLE, yet committed after all) may come twice.
    let retried_sends = retried.load(Ordering::SeqCst);
    assert!(again == 0 || retried_sends > 0, "{again} delivered twice");
    println!(
        "crowd: {} sends, {} requests retried after UNAVAILABLE",
        SENDERS * EACH,
        retried.load(Ordering::SeqCst)
    );

    // The node serves as before: a new send is pushed, a deleted account is unknown.
    within(senders[0].conn.send(&bob_addr, [envelope(99_999)]))
        .await
        .expect("send after the crowd");
    // (After any duplicate of a retried send.)
    while number(&bob.next_delivery().await) != 99_999 {}
    let gone = within(senders[0].conn.send(&doomed_addrs[0], [envelope(1)]))
        .await
        .expect_err("a deleted account");
    assert_eq!(gone.relay_code(), Some(ErrorCode::UnknownRecipient));
}
