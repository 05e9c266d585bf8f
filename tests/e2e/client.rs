//! The async `Client` end to end: real relay process, real QUIC, sled device stores.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tern_client::store::SledKv;
use tern_client::{Client, ClientOptions, Event, Events, ReceivedMessage};
use tern_platform::clock::{Clock, ManualClock};
use tern_proto::address::RelayAddress;

use crate::support::{files_under, within, RelayProcess};

pub(crate) fn store(dir: &Path, name: &str) -> Arc<SledKv> {
    Arc::new(SledKv::open(&dir.join(name), &[7u8; 32]).expect("device store"))
}

/// Waits for the next event matching `pick`, skipping the rest.
pub(crate) async fn next_match<T>(
    events: &mut Events,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> T {
    within(async {
        loop {
            let e = events.recv().await.expect("events ended");
            if let Some(t) = pick(e) {
                return t;
            }
        }
    })
    .await
}

/// Waits until the relay has everything `client` sent (its outbox is empty).
pub(crate) async fn drained(client: &Client) {
    within(async {
        while client.outbox_len().await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

pub(crate) async fn next_message(events: &mut Events) -> ReceivedMessage {
    next_match(events, |e| match e {
        Event::Message(m) => Some(m),
        _ => None,
    })
    .await
}

pub(crate) async fn pair(relay: &RelayAddress, dir: &Path) -> ((Client, Events), (Client, Events)) {
    let alice = Client::register(relay, store(dir, "alice"))
        .await
        .expect("alice");
    let bob = Client::register(relay, store(dir, "bob"))
        .await
        .expect("bob");
    (alice, bob)
}

#[tokio::test]
async fn two_clients_talk_sealed_and_survive_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let ((alice, mut alice_events), (bob, mut bob_events)) = pair(&relay.address, dir.path()).await;

    // Alice has Bob's card: sealed from the first message.
    alice
        .add_contact(&bob.contact_card().await)
        .await
        .expect("add");
    alice
        .send(&bob.account(), b"hello bob")
        .await
        .expect("send");
    let m = next_message(&mut bob_events).await;
    assert_eq!(m.body, b"hello bob");
    assert_eq!(m.sender, alice.account());
    bob.confirm(m.seq).await.expect("confirm");

    // Bob writes back without a card: Alice's token came inside her message.
    bob.send(&alice.account(), b"hi alice").await.expect("send");
    let m = next_message(&mut alice_events).await;
    assert_eq!(m.body, b"hi alice");
    alice.confirm(m.seq).await.expect("confirm");
    assert_eq!(
        alice.safety_number(&bob.account()).await,
        bob.safety_number(&alice.account()).await
    );

    // Bob restarts; Alice writes while he is away; nothing is lost or doubled.
    let bob_account = bob.account();
    bob.shutdown().await;
    drop(bob);
    for i in 0..5 {
        alice
            .send(&bob_account, format!("while away {i}").as_bytes())
            .await
            .expect("send");
    }
    let (bob, mut bob_events) = Client::open(store_reopen(dir.path(), "bob"))
        .await
        .expect("reopen");
    for i in 0..5 {
        let m = next_message(&mut bob_events).await;
        assert_eq!(m.body, format!("while away {i}").as_bytes());
        bob.confirm(m.seq).await.expect("confirm");
    }
    bob.send(&alice.account(), b"back").await.expect("send");
    assert_eq!(next_message(&mut alice_events).await.body, b"back");
    alice.shutdown().await;
    bob.shutdown().await;
}

fn store_reopen(dir: &Path, name: &str) -> Arc<SledKv> {
    store(dir, name)
}

/// One side of the long conversation: a client that comes and goes, and what its
/// app has received from the other side, in order.
struct Side {
    name: &'static str,
    dir: std::path::PathBuf,
    account: tern_proto::AccountId,
    online: Option<(Client, tokio::task::JoinHandle<()>)>,
    received: Arc<std::sync::Mutex<Vec<u32>>>,
    sent: u32,
}

impl Side {
    /// The app: records each message, then confirms it.
    fn attach(&mut self, client: Client, mut events: Events) {
        let received = self.received.clone();
        let confirmer = client.clone();
        let app = tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if let Event::Message(m) = e {
                    let text = String::from_utf8(m.body).expect("utf-8");
                    let n = text.rsplit('#').next().expect("#").parse().expect("number");
                    received.lock().expect("lock").push(n);
                    confirmer.confirm(m.seq).await.expect("confirm");
                }
            }
        });
        self.online = Some((client, app));
    }

    async fn go_offline(&mut self) {
        if let Some((client, app)) = self.online.take() {
            client.shutdown().await;
            within(app).await.expect("app task");
            drop(client);
        }
    }

    async fn go_online(&mut self) {
        if self.online.is_none() {
            let (client, events) = Client::open(store_reopen(&self.dir, self.name))
                .await
                .expect("reopen");
            self.attach(client, events);
        }
    }
}

#[tokio::test]
async fn a_thousand_messages_arrive_exactly_once_in_order_through_offline_spells_and_restarts() {
    use rand::{Rng, SeedableRng};
    const TOTAL: u32 = 1000;
    let seed: u64 = std::env::var("TERN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (TERN_TEST_SEED to repeat)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let mut sides = Vec::new();
    for name in ["alice", "bob"] {
        let (client, events) = Client::register(&relay.address, store(dir.path(), name))
            .await
            .expect("register");
        let mut side = Side {
            name,
            dir: dir.path().to_path_buf(),
            account: client.account(),
            online: None,
            received: Arc::default(),
            sent: 0,
        };
        side.attach(client, events);
        sides.push(side);
    }
    // Alice knows Bob's card; Bob learns of Alice from her first message.
    let card = sides[1]
        .online
        .as_ref()
        .expect("online")
        .0
        .contact_card()
        .await;
    sides[0]
        .online
        .as_ref()
        .expect("online")
        .0
        .add_contact(&card)
        .await
        .expect("add");
    let first = sides[0].online.as_ref().expect("online").0.clone();
    first
        .send(&sides[1].account, b"alice#0")
        .await
        .expect("send");
    sides[0].sent = 1;
    drop(first);
    while sides[1].received.lock().expect("lock").is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut restarted_both = false;
    while sides[0].sent + sides[1].sent < TOTAL {
        let i = rng.gen_range(0..2);
        match rng.gen_range(0..10) {
            // A burst from whoever is online.
            0..=6 => {
                let to = sides[1 - i].account;
                let side = &mut sides[i];
                if let Some((client, _)) = &side.online {
                    for _ in 0..rng.gen_range(1..=25) {
                        if side.sent >= TOTAL / 2 {
                            break;
                        }
                        let body = format!("{}#{}", side.name, side.sent);
                        within(client.send(&to, body.as_bytes()))
                            .await
                            .expect("send");
                        side.sent += 1;
                    }
                }
            }
            // Offline for a while (often with messages still in the outbox).
            7 | 8 => sides[i].go_offline().await,
            _ => sides[i].go_online().await,
        }
        if !restarted_both && sides[0].sent + sides[1].sent >= TOTAL / 2 {
            restarted_both = true;
            for side in sides.iter_mut() {
                side.go_offline().await;
            }
            for side in sides.iter_mut() {
                side.go_online().await;
            }
        }
        // Let the network breathe now and then.
        if rng.gen_range(0..4) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..30))).await;
        }
    }
    for side in sides.iter_mut() {
        side.go_online().await;
    }
    let expect_from = |side: &Side| -> Vec<u32> { (0..side.sent).collect() };
    let (want_bob, want_alice) = (expect_from(&sides[0]), expect_from(&sides[1]));
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let bob_has = sides[1].received.lock().expect("lock").len();
            let alice_has = sides[0].received.lock().expect("lock").len();
            if bob_has >= want_bob.len() && alice_has >= want_alice.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every message arrives");
    // A moment for any stray duplicate to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        *sides[1].received.lock().expect("lock"),
        want_bob,
        "bob got alice's messages once each, in order"
    );
    assert_eq!(
        *sides[0].received.lock().expect("lock"),
        want_alice,
        "alice got bob's messages once each, in order"
    );
    for side in sides.iter_mut() {
        let (client, _) = side.online.as_ref().expect("online");
        assert_eq!(client.outbox_len().await, 0);
        side.go_offline().await;
    }
}

fn positions(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test]
async fn the_relay_disk_holds_no_plaintext_and_no_sender_beside_an_envelope() {
    const MARKER: &[u8] = b"TERN-PLAINTEXT-MARKER-5d1c";
    let dir = tempfile::tempdir().expect("tempdir");
    let relay_dir = dir.path().join("relay");
    let mut relay = RelayProcess::start(&relay_dir, &[]).expect("relay");
    let ((carol, mut carol_events), (bob, _bob_events)) = pair(&relay.address, dir.path()).await;
    // Bob is offline: what Carol sends stays on the relay's disk. Carol never
    // receives anything, so her account id has no business anywhere near a mailbox.
    let card = bob.contact_card().await;
    bob.shutdown().await;
    carol.add_contact(&card).await.expect("add");
    let mut ids = Vec::new();
    for i in 0..20 {
        let body = [MARKER, format!(" {i}").as_bytes()].concat();
        ids.push(carol.send(&card.account, &body).await.expect("send"));
    }
    let mut sent = 0;
    while sent < ids.len() {
        if let Event::Sent { .. } = within(carol_events.recv()).await.expect("event") {
            sent += 1;
        }
    }
    carol.shutdown().await;
    relay.stop().expect("stop");

    // No file holds the plaintext.
    for file in files_under(&relay_dir) {
        let bytes = std::fs::read(&file).expect("read");
        assert!(
            positions(&bytes, MARKER).is_empty(),
            "marker in {}",
            file.display()
        );
    }
    // Envelopes live in the mailbox log, and no byte of it names the sender.
    let sender = carol.account();
    let mut log = Vec::new();
    for file in files_under(&relay_dir.join("mailboxes")) {
        log.extend(std::fs::read(&file).expect("read"));
    }
    for id in &ids {
        assert_eq!(
            positions(&log, id.as_bytes()).len(),
            1,
            "each envelope once"
        );
    }
    assert!(
        positions(&log, sender.as_bytes()).is_empty(),
        "the mailbox log names the sender"
    );
    // Nor does any record of the relay's database beside an envelope: every record
    // of every tree, read back.
    let db = sled::open(relay_dir.join("db")).expect("open the relay's database");
    let (mut envelopes, mut sender_records) = (0, 0);
    for name in db.tree_names() {
        for record in db.open_tree(&name).expect("tree").iter() {
            let (k, v) = record.expect("record");
            let has = |needle: &[u8]| {
                !positions(&k, needle).is_empty() || !positions(&v, needle).is_empty()
            };
            let envelope = ids.iter().any(|id| has(id.as_bytes()));
            let names_sender = has(sender.as_bytes());
            envelopes += usize::from(envelope);
            sender_records += usize::from(names_sender);
            assert!(
                !(envelope && names_sender),
                "an envelope record names its sender"
            );
        }
    }
    assert_eq!(envelopes, 0, "envelopes are in the log, not the database");
    assert!(
        sender_records > 0,
        "the sender's own account record was found"
    );
    // The device stores are encrypted at rest too.
    for name in ["alice", "bob"] {
        for file in files_under(&dir.path().join(name)) {
            let bytes = std::fs::read(&file).expect("read");
            assert!(
                positions(&bytes, MARKER).is_empty(),
                "marker in {}",
                file.display()
            );
        }
    }
}

#[tokio::test]
async fn clients_reconnect_after_a_relay_crash_and_the_outbox_catches_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay_dir = dir.path().join("relay");
    let mut relay = RelayProcess::start(&relay_dir, &[]).expect("relay");
    let ((alice, mut alice_events), (bob, mut bob_events)) = pair(&relay.address, dir.path()).await;
    alice
        .add_contact(&bob.contact_card().await)
        .await
        .expect("add");
    alice.send(&bob.account(), b"before").await.expect("send");
    assert_eq!(next_message(&mut bob_events).await.body, b"before");
    // Bob can have it before Alice has the relay's answer: wait until her outbox is
    // empty, so that what it holds after the crash is what was sent during it.
    drained(&alice).await;

    relay.crash().expect("crash");
    // Sent while the relay is down: held in the outbox.
    for i in 0..3 {
        alice
            .send(&bob.account(), format!("during {i}").as_bytes())
            .await
            .expect("send");
    }
    assert_eq!(alice.outbox_len().await, 3);
    let listen = format!("{}:{}", relay.address.host, relay.address.port);
    let _relay = RelayProcess::start_at(&relay_dir, &listen, &[]).expect("restart");
    // The restarted relay answers packets of the lost connections with stateless
    // resets, so a client notices as soon as it sends anything (an idle one at its
    // next keep-alive) rather than after its idle timeout, and reconnects.
    bob.send(&alice.account(), b"after").await.expect("send");
    for i in 0..3 {
        assert_eq!(
            next_message(&mut bob_events).await.body,
            format!("during {i}").as_bytes()
        );
    }
    // Alice's authenticated connection is idle. Her anonymous connection was reset by
    // the restarted relay (its sealed sends were in flight), and that loss makes her
    // client ping the authenticated one, which is reset too: she reconnects in a round
    // trip (plus up to a second of jitter), not at her next keep-alive (every 15 s,
    // about 14 s from here): 8 s leaves room for a loaded machine.
    let after = tokio::time::timeout(Duration::from_secs(8), next_message(&mut alice_events))
        .await
        .expect("alice reconnects well before her next keep-alive");
    assert_eq!(after.body, b"after");
    alice.shutdown().await;
    bob.shutdown().await;
}

#[tokio::test]
async fn after_a_token_rotation_contacts_fall_back_then_learn_the_new_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let ((alice, _alice_events), (bob, mut bob_events)) = pair(&relay.address, dir.path()).await;
    let old_card = bob.contact_card().await;
    alice.add_contact(&old_card).await.expect("add");
    alice.send(&bob.account(), b"sealed").await.expect("send");
    assert_eq!(next_message(&mut bob_events).await.body, b"sealed");

    bob.rotate_delivery_token().await.expect("rotate");
    // The card shows the new token once the relay has it.
    within(async {
        while bob.contact_card().await.delivery_token == old_card.delivery_token {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The old token is refused at the relay once Bob's client has set the new one.
    let (conn, _inbox) = tern_client::net::RelayConnection::connect(&relay.address)
        .await
        .expect("connect");
    let to = tern_proto::DeviceAddress {
        account: bob.account(),
        device: tern_proto::DeviceId::PRIMARY,
    };
    within(async {
        loop {
            let refused = conn
                .sealed_send(&to, &old_card.delivery_token, [crate::support::envelope(1)])
                .await;
            if refused.is_err_and(|e| e.relay_code() == Some(tern_client::ErrorCode::Unauthorized))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Alice still holds the old token: her client falls back and the message arrives.
    alice
        .send(&bob.account(), b"after rotation")
        .await
        .expect("send");
    assert_eq!(next_message(&mut bob_events).await.body, b"after rotation");
    alice.shutdown().await;
    bob.shutdown().await;
}

/// A client process, killed when dropped (a failing test must not leave it behind).
struct ClientProcess(std::process::Child);

impl ClientProcess {
    /// SIGKILL: no shutdown, no flush, as when a phone kills an app.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The test app in `tests/src/bin/tern-client-e2e.rs`, on `store`, its stdout in lines.
fn client_process(store: &Path) -> (ClientProcess, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tern-client-e2e"))
        .arg(store)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the client");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (ClientProcess(child), rx)
}

fn next_number(lines: &std::sync::mpsc::Receiver<String>) -> u32 {
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(15))
            .expect("the client printed nothing");
        if let Some(body) = line.strip_prefix("msg ") {
            return body.rsplit('#').next().expect("#").parse().expect("number");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_stream_loses_nothing() {
    const TOTAL: u32 = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let ((alice, _alice_events), (bob, _bob_events)) = pair(&relay.address, dir.path()).await;
    alice
        .add_contact(&bob.contact_card().await)
        .await
        .expect("add");
    let bob_account = bob.account();
    bob.shutdown().await;
    drop(bob);
    for i in 0..TOTAL {
        alice
            .send(&bob_account, format!("m#{i}").as_bytes())
            .await
            .expect("send");
    }

    // Bob's app takes some messages and is killed without warning.
    let (mut child, lines) = client_process(&dir.path().join("bob"));
    let mut shown = Vec::new();
    while shown.len() < 100 {
        shown.push(tokio::task::block_in_place(|| next_number(&lines)));
    }
    child.kill();
    // Every line it printed before it died: the reader ends at the pipe's end (a
    // `try_recv` here raced the reader thread on a busy machine).
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
        if let Some(n) = line.strip_prefix("msg m#") {
            shown.push(n.parse().expect("number"));
        }
    }
    let before_crash = shown.len();

    // Started again, it picks up where the device's store says, with nothing missing.
    let (mut child, lines) = client_process(&dir.path().join("bob"));
    let first_after = tokio::task::block_in_place(|| next_number(&lines));
    shown.push(first_after);
    while *shown.last().expect("some") < TOTAL - 1 {
        shown.push(tokio::task::block_in_place(|| next_number(&lines)));
    }
    child.kill();

    let expected_first: Vec<u32> = (0..u32::try_from(before_crash).expect("small")).collect();
    assert_eq!(
        shown[..before_crash],
        expected_first[..],
        "in order before the crash"
    );
    // Only messages shown but not yet confirmed when the app died may be shown again.
    let last_before = u32::try_from(before_crash).expect("small") - 1;
    assert!(
        first_after <= last_before + 1,
        "a message was lost across the crash"
    );
    assert!(
        last_before + 1 - first_after <= 1,
        "more than the one unconfirmed message was shown again"
    );
    let expected_after: Vec<u32> = (first_after..TOTAL).collect();
    assert_eq!(
        shown[before_crash..],
        expected_after[..],
        "in order after the crash"
    );
    alice.shutdown().await;
}

#[tokio::test]
async fn clients_send_download_and_forward_attachments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let ((alice, _alice_events), (bob, mut bob_events)) = pair(&relay.address, dir.path()).await;
    let carol = Client::register(&relay.address, store(dir.path(), "carol"))
        .await
        .expect("carol");
    let (carol, mut carol_events) = carol;
    alice
        .add_contact(&bob.contact_card().await)
        .await
        .expect("add");
    bob.add_contact(&carol.contact_card().await)
        .await
        .expect("add");

    let photo = dir.path().join("photo.bin");
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(&photo, &content).expect("write");
    let pointer = within(alice.upload_attachment(&photo, &dir.path().join("photo.sealed")))
        .await
        .expect("upload");
    alice
        .send_with_attachments(&bob.account(), b"look", std::slice::from_ref(&pointer))
        .await
        .expect("send");
    let m = next_message(&mut bob_events).await;
    assert_eq!((m.body.as_slice(), m.attachments.len()), (&b"look"[..], 1));
    let got = dir.path().join("bob.bin");
    within(bob.download_attachment(&m.attachments[0], &got))
        .await
        .expect("download");
    assert_eq!(std::fs::read(&got).expect("read"), content);

    // Bob forwards it to Carol: the same pointer, no upload.
    within(bob.forward_attachment(&carol.account(), b"fwd", &m.attachments[0]))
        .await
        .expect("forward");
    let m = next_message(&mut carol_events).await;
    assert_eq!(m.attachments[0], pointer);
    let got = dir.path().join("carol.bin");
    within(carol.download_attachment(&m.attachments[0], &got))
        .await
        .expect("download");
    assert_eq!(std::fs::read(&got).expect("read"), content);
    assert_eq!(
        files_under(&dir.path().join("relay").join("blobs")).len(),
        1,
        "stored once"
    );
    for c in [alice, bob, carol] {
        c.shutdown().await;
    }
}

/// A client reads the time from the clock its options give it, not from the system:
/// two clients an hour ahead stamp and receive messages at that hour.
#[tokio::test]
async fn clients_take_their_time_from_the_clock_they_are_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let clock = Arc::new(ManualClock::starting_now());
    clock.advance(Duration::from_secs(3600));
    let options = ClientOptions::new().clock(clock.clone());
    let (alice, _alice_events) =
        Client::register_with(&relay.address, store(dir.path(), "alice"), options.clone())
            .await
            .expect("alice");
    let (bob, mut bob_events) =
        Client::register_with(&relay.address, store(dir.path(), "bob"), options)
            .await
            .expect("bob");
    alice
        .add_contact(&bob.contact_card().await)
        .await
        .expect("add");
    alice.send(&bob.account(), b"later").await.expect("send");
    let m = next_message(&mut bob_events).await;
    assert_eq!(m.body, b"later");
    assert_eq!(m.sent_at_ms, clock.now());
    assert_eq!(m.received_at_ms, clock.now());
    alice.shutdown().await;
    bob.shutdown().await;
}

#[tokio::test]
async fn an_idle_client_is_not_disconnected_by_the_deadline_for_strangers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[connections]\nauth_deadline = \"1s\"\nanonymous_idle = \"1s\"\n",
    )
    .expect("config");
    let flags = [
        "--config",
        config.to_str().expect("path"),
        "--log",
        "info,tern_relay=debug",
    ];
    let mut relay = RelayProcess::start(&dir.path().join("relay"), &flags).expect("relay");
    let ((alice, mut alice_events), (bob, mut bob_events)) = pair(&relay.address, dir.path()).await;
    alice
        .add_contact(&bob.contact_card().await)
        .await
        .expect("add");
    alice.send(&bob.account(), b"first").await.expect("send");
    assert_eq!(next_message(&mut bob_events).await.body, b"first");
    // Idle for three of the relay's deadlines: it closes the anonymous connection the
    // sealed send used, which must cost no reconnect of the authenticated one.
    let quiet = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(event) = tokio::time::timeout_at(quiet, alice_events.recv()).await {
        match event {
            Some(Event::Disconnected { reason }) => panic!("alice reconnected: {reason}"),
            Some(_) => {}
            None => panic!("alice's events ended"),
        }
    }
    // The next sealed send opens a new anonymous connection on its own.
    alice.send(&bob.account(), b"second").await.expect("send");
    assert_eq!(next_message(&mut bob_events).await.body, b"second");
    alice.shutdown().await;
    bob.shutdown().await;
    relay.stop().expect("stop");
    // The relay's idle close is not a loss: no client pinged its authenticated
    // connection over it (a lost anonymous connection makes them ping).
    let log = std::fs::read_to_string(&relay.log).expect("log");
    assert!(log.contains("kind=sealed_send"), "requests logged at debug");
    assert!(
        !log.contains("kind=ping standing=Authenticated"),
        "a ping after an idle close"
    );
}

#[tokio::test]
async fn identified_session_start_leaves_no_relay_side_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay_dir = dir.path().join("relay");
    // Debug lines name each request's kind and the standing of its connection.
    let mut relay =
        RelayProcess::start(&relay_dir, &["--log", "info,tern_relay=debug"]).expect("relay");
    let ((alice, _alice_events), (bob, mut bob_events)) = pair(&relay.address, dir.path()).await;
    // Alice has Bob's card, so his delivery token: she starts a session with him.
    alice
        .add_contact(&bob.contact_card().await)
        .await
        .expect("add");
    alice
        .send(&bob.account(), b"hello bob")
        .await
        .expect("send");
    let m = next_message(&mut bob_events).await;
    assert_eq!(
        (m.body.as_slice(), m.sender),
        (&b"hello bob"[..], alice.account())
    );
    bob.confirm(m.seq).await.expect("confirm");
    let (a, b) = (alice.account(), bob.account());
    alice.shutdown().await;
    bob.shutdown().await;
    relay.stop().expect("stop");

    // The bundle was fetched, and never on an authenticated connection.
    let log = std::fs::read_to_string(&relay.log).expect("log");
    let fetches: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("kind=fetch_keys"))
        .collect();
    assert!(!fetches.is_empty(), "no fetch logged at debug:\n{log}");
    assert!(
        fetches
            .iter()
            .all(|l| !l.contains("standing=Authenticated")),
        "an authenticated fetch: {fetches:#?}"
    );
    // Nothing about it above debug (P9).
    assert!(
        !log.lines()
            .any(|l| !l.contains(" DEBUG ") && l.contains("fetch")),
        "a fetch logged above debug:\n{log}"
    );
    // No log line names both accounts, in any form an id is written.
    let forms = |id: &tern_proto::AccountId| {
        let hex: String = id.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        [hex.clone(), hex.to_uppercase(), format!("{id:?}")]
    };
    for line in log.lines() {
        let names = |id| forms(id).iter().any(|f| line.contains(f.as_str()));
        assert!(!(names(&a) && names(&b)), "a line names both: {line}");
    }

    // No record of the relay's database holds both ids: every record of every tree.
    let db = sled::open(relay_dir.join("db")).expect("open the relay's database");
    let mut trees_with = std::collections::BTreeSet::new();
    for name in db.tree_names() {
        for record in db.open_tree(&name).expect("tree").iter() {
            let (k, v) = record.expect("record");
            let has = |id: &tern_proto::AccountId| {
                !positions(&k, id.as_bytes()).is_empty() || !positions(&v, id.as_bytes()).is_empty()
            };
            let tree = String::from_utf8_lossy(&name).into_owned();
            assert!(!(has(&a) && has(&b)), "a record of tree {tree} holds both");
            if has(&a) || has(&b) {
                trees_with.insert(tree);
            }
        }
    }
    drop(db);
    // Each id only where the account itself lives: its record, token and keys (its
    // prekeys and its MLS key packages).
    let allowed = [
        "accounts",
        "delivery_tokens",
        "device_lists",
        "key_packages",
        "keys",
    ];
    assert!(
        trees_with.iter().all(|t| allowed.contains(&t.as_str())),
        "{trees_with:?}"
    );
    // Nor does any other file (mailbox segments, blobs): a file counts as one record.
    for file in files_under(&relay_dir) {
        if file.starts_with(relay_dir.join("db")) {
            continue;
        }
        let bytes = std::fs::read(&file).expect("read");
        let has = |id: &tern_proto::AccountId| !positions(&bytes, id.as_bytes()).is_empty();
        assert!(!(has(&a) && has(&b)), "{} holds both", file.display());
    }
}
