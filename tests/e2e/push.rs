//! Push wake-ups on a real relay process, with a real HTTP server (hyper, on
//! 127.0.0.1) standing in for UnifiedPush endpoints and an app publisher's gateway:
//! one wake-up per window for an offline device's burst and another after it, the
//! constant body, none for a connected device; 410 forgets the target, a redirect is
//! not followed, 429 waits as asked; a connection that ends with mail unacknowledged
//! owes a wake-up; registration refusals; a hanging endpoint host holds only its own
//! slots; and sends at full speed while the gateway hangs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tern_client::{Client, PushTarget};
use tern_proto::{DeviceAddress, ErrorCode};
use tokio::net::TcpListener;

use crate::support::{envelope, register, within, Device, RelayProcess};
use crate::verification::relay_with;

/// What the relay posts to a UnifiedPush endpoint (`tern_relay::push::UNIFIED_PUSH_BODY`).
const BODY: &[u8] = br#"{"type":"tern.wake","v":1}"#;

/// One request as the server got it.
#[derive(Debug, Clone)]
struct Hit {
    method: String,
    path: String,
    urgency: Option<String>,
    body: Vec<u8>,
    at: Instant,
}

/// How the server answers POSTs under a path prefix.
#[derive(Debug, Clone)]
enum Answer {
    Status(u16),
    /// 429 with `Retry-After: <secs>`.
    SlowDown(u64),
    /// 307 to this URL.
    Redirect(String),
    /// Never answers (until the test ends).
    Hang,
}

#[derive(Default)]
struct State {
    hits: Mutex<Vec<Hit>>,
    /// (path prefix, answer); the first match wins; 201 otherwise.
    answers: Mutex<Vec<(String, Answer)>>,
}

/// A push server: GETs under `/up/` answer the UnifiedPush discovery JSON, others an
/// empty object; POSTs are recorded and answered as set.
struct Gateway {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Gateway {
    async fn start() -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        let serving = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| answer(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Gateway { addr, state, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn set(&self, prefix: &str, answer: Answer) {
        let mut answers = self.state.answers.lock().expect("lock");
        answers.retain(|(p, _)| p != prefix);
        answers.push((prefix.to_owned(), answer));
    }

    /// POSTs to exactly `path`.
    fn posts(&self, path: &str) -> Vec<Hit> {
        (self.state.hits.lock().expect("lock").iter())
            .filter(|h| h.method == "POST" && h.path == path)
            .cloned()
            .collect()
    }

    fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().expect("lock").clone()
    }

    /// Waits (bounded) until `path` got `n` POSTs; returns them.
    async fn until_posts(&self, path: &str, n: usize) -> Vec<Hit> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let posts = self.posts(path);
            if posts.len() >= n {
                return posts;
            }
            assert!(
                Instant::now() < deadline,
                "{path}: {} of {n} POSTs",
                posts.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let urgency = (req.headers().get("urgency"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    };
    state.hits.lock().expect("lock").push(Hit {
        method: method.clone(),
        path: path.clone(),
        urgency,
        body,
        at: Instant::now(),
    });
    let reply = |status: u16, body: &'static [u8]| {
        let mut r = Response::new(Full::new(Bytes::from_static(body)));
        *r.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
        r
    };
    if method == "GET" {
        return Ok(if path.starts_with("/up/") {
            reply(200, br#"{"unifiedpush":{"version":1}}"#)
        } else {
            reply(200, b"{}")
        });
    }
    let chosen = (state.answers.lock().expect("lock").iter())
        .find(|(p, _)| path.starts_with(p.as_str()))
        .map(|(_, a)| a.clone());
    Ok(match chosen {
        None => reply(201, b""),
        Some(Answer::Status(s)) => reply(s, b""),
        Some(Answer::SlowDown(secs)) => {
            let mut r = reply(429, b"");
            r.headers_mut()
                .insert("retry-after", secs.to_string().parse().expect("header"));
            r
        }
        Some(Answer::Redirect(to)) => {
            let mut r = reply(307, b"");
            r.headers_mut()
                .insert("location", to.parse().expect("header"));
            r
        }
        Some(Answer::Hang) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            reply(201, b"")
        }
    })
}

/// A relay whose `[push]` table is `push` (loopback http allowed), with the
/// gateway's `/gw` on its list; durability `os` so bursts are quick.
fn relay(dir: &std::path::Path, gateway: &Gateway, push: &str) -> RelayProcess {
    let toml = format!(
        "durability = \"os\"\n[push]\nallow_http_loopback = true\ngateways = [\"{}\"]\n{push}",
        gateway.url("/gw")
    );
    relay_with(&dir.join("relay"), &toml, &[]).expect("relay")
}

fn unified(gateway: &Gateway, path: &str) -> PushTarget {
    PushTarget::UnifiedPush {
        endpoint: gateway.url(path),
    }
}

fn gateway_target(gateway: &Gateway, path: &str, token: &str) -> PushTarget {
    PushTarget::Gateway {
        url: gateway.url(path),
        device_token: token.into(),
    }
}

/// Registers a device with `target`, then takes it offline; returns its address.
async fn offline_with(relay: &RelayProcess, target: PushTarget) -> DeviceAddress {
    let device = register(&relay.address).await;
    within(device.conn.set_push_target(target))
        .await
        .expect("push target");
    let (address, _, _) = device.go_offline().await;
    address
}

/// Sends `n` messages to `to` at once (pipelined), all stored.
async fn burst(from: &Device, to: &DeviceAddress, first: u32, n: u32) {
    let sends: Vec<_> = (first..first + n)
        .map(|i| from.conn.send(to, [envelope(i)]))
        .collect();
    for s in sends {
        within(s).await.expect("stored");
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, tern_client::Error>) -> Option<ErrorCode> {
    r.expect_err("refused").relay_code()
}

#[tokio::test]
async fn an_offline_device_is_woken_once_per_window_and_a_connected_one_never() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start().await;
    let relay = relay(dir.path(), &gw, "coalesce = \"2s\"\n");
    let alice = register(&relay.address).await;

    // Bob: a UnifiedPush endpoint (checked with a GET first), then offline.
    let bob = offline_with(&relay, unified(&gw, "/up/bob")).await;
    let discovery = gw.hits();
    assert_eq!(discovery.len(), 1, "one discovery request: {discovery:?}");
    assert_eq!(
        (discovery[0].method.as_str(), discovery[0].path.as_str()),
        ("GET", "/up/bob")
    );

    // A burst of 100: one wake-up, urgent, within a second, the constant body.
    let start = Instant::now();
    burst(&alice, &bob, 0, 100).await;
    let posts = gw.until_posts("/up/bob", 1).await;
    assert!(
        posts[0].at.duration_since(start) < Duration::from_secs(1),
        "woken in {:?}",
        posts[0].at.duration_since(start)
    );
    assert_eq!(posts[0].body, BODY, "the constant body");
    assert_eq!(posts[0].urgency.as_deref(), Some("high"));
    // More mail in the window, and the rest of the window: still one.
    burst(&alice, &bob, 100, 5).await;
    let window_end = posts[0].at + Duration::from_secs(2);
    tokio::time::sleep_until((window_end + Duration::from_millis(300)).into()).await;
    assert_eq!(gw.posts("/up/bob").len(), 1, "one wake-up per window");

    // After the window: another.
    let again = Instant::now();
    burst(&alice, &bob, 200, 1).await;
    let posts = gw.until_posts("/up/bob", 2).await;
    assert!(posts[1].at.duration_since(again) < Duration::from_secs(1));
    assert_eq!(posts[1].body, BODY);

    // A gateway target: the constant fields and the device token.
    let dave = offline_with(&relay, gateway_target(&gw, "/gw/wake", "dave-token")).await;
    burst(&alice, &dave, 0, 3).await;
    let posts = gw.until_posts("/gw/wake", 1).await;
    let json: serde_json::Value = serde_json::from_slice(&posts[0].body).expect("json");
    assert_eq!(
        json,
        serde_json::json!({"type": "tern.wake", "v": 1, "token": "dave-token"})
    );

    // Carol stays connected: her messages are delivered, and no wake-up is sent.
    let mut carol = register(&relay.address).await;
    within(
        carol
            .conn
            .set_push_target(gateway_target(&gw, "/gw/carol", "c")),
    )
    .await
    .expect("push target");
    burst(&alice, &carol.address, 0, 20).await;
    let mut got = 0;
    while got < 20 {
        carol.next_delivery().await;
        got += 1;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        gw.posts("/gw/carol").is_empty(),
        "a connected device is not woken"
    );

    // Once she is gone, her next message wakes her.
    let (carol, _, _) = carol.go_offline().await;
    // The relay notices the closed connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    burst(&alice, &carol, 20, 1).await;
    gw.until_posts("/gw/carol", 1).await;
    // P9: no endpoint, path or token in the relay's log.
    let log = relay.log_text();
    for secret in ["/up/bob", "/gw/wake", "dave-token", "/gw/carol"] {
        assert!(!log.contains(secret), "{secret} logged");
    }
}

#[tokio::test]
async fn a_connection_that_ends_with_mail_unacknowledged_owes_a_wake_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start().await;
    let relay = relay(dir.path(), &gw, "coalesce = \"1s\"\n");
    let alice = register(&relay.address).await;

    // Erin is pushed three messages and acknowledges none (the phone went to sleep
    // with them in flight): when her connection ends she is woken.
    let mut erin = register(&relay.address).await;
    within(
        erin.conn
            .set_push_target(gateway_target(&gw, "/gw/erin", "e")),
    )
    .await
    .expect("push target");
    burst(&alice, &erin.address, 0, 3).await;
    for _ in 0..3 {
        erin.next_delivery().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(gw.posts("/gw/erin").is_empty(), "not while connected");
    let _ = erin.go_offline().await;
    gw.until_posts("/gw/erin", 1).await;

    // Frank acknowledges everything before he goes: he owes nothing.
    let mut frank = register(&relay.address).await;
    within(
        frank
            .conn
            .set_push_target(gateway_target(&gw, "/gw/frank", "f")),
    )
    .await
    .expect("push target");
    burst(&alice, &frank.address, 0, 2).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(frank.next_delivery().await.seq);
    }
    within(frank.conn.ack(&got)).await.expect("acked");
    let _ = frank.go_offline().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(gw.posts("/gw/frank").is_empty(), "nothing owed");
}

#[tokio::test]
async fn refusals_gone_targets_and_redirects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start().await;
    let trap = Gateway::start().await;
    let relay = relay(dir.path(), &gw, "coalesce = \"1s\"\n");
    let alice = register(&relay.address).await;
    let bob = register(&relay.address).await;

    // Outside the allowlist, not https (and not loopback), not a UnifiedPush
    // endpoint: typed refusals, and nothing stored or posted.
    let outside = gateway_target(&trap, "/gw/wake", "t");
    assert_eq!(
        code(within(bob.conn.set_push_target(outside)).await),
        Some(ErrorCode::PushTargetRefused)
    );
    let plain = PushTarget::UnifiedPush {
        endpoint: "http://push.example.invalid/up/x".into(),
    };
    assert_eq!(
        code(within(bob.conn.set_push_target(plain)).await),
        Some(ErrorCode::PushTargetRefused)
    );
    assert_eq!(
        code(within(bob.conn.set_push_target(unified(&gw, "/nope/bob"))).await),
        Some(ErrorCode::PushEndpointUnverified)
    );
    assert!(
        trap.hits().is_empty(),
        "nothing reached a host off the list"
    );
    let (bob, _, _) = bob.go_offline().await;
    burst(&alice, &bob, 0, 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        gw.hits().iter().all(|h| h.method == "GET"),
        "a refused target is never posted to"
    );

    // 410: one POST, the target is forgotten, later mail posts nothing.
    gw.set("/up/gone", Answer::Status(410));
    let erin = offline_with(&relay, unified(&gw, "/up/gone/erin")).await;
    burst(&alice, &erin, 0, 1).await;
    gw.until_posts("/up/gone/erin", 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    burst(&alice, &erin, 1, 1).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        gw.posts("/up/gone/erin").len(),
        1,
        "the target was forgotten"
    );

    // A redirect is not followed, nor retried.
    gw.set("/up/moved", Answer::Redirect(trap.url("/trap")));
    let frank = offline_with(&relay, unified(&gw, "/up/moved/frank")).await;
    burst(&alice, &frank, 0, 1).await;
    gw.until_posts("/up/moved/frank", 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(trap.hits().is_empty(), "the redirect was followed");
    assert_eq!(gw.posts("/up/moved/frank").len(), 1, "not retried");
}

#[tokio::test]
async fn a_429_is_waited_out_and_mail_meanwhile_sends_nothing_more() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start().await;
    let relay = relay(
        dir.path(),
        &gw,
        "coalesce = \"500ms\"\nretry_backoff = \"100ms\"\nmax_attempts = 3\n",
    );
    let alice = register(&relay.address).await;
    gw.set("/up/slow", Answer::SlowDown(2));
    let bob = offline_with(&relay, unified(&gw, "/up/slow/bob")).await;
    burst(&alice, &bob, 0, 1).await;
    let first = gw.until_posts("/up/slow/bob", 1).await[0].at;
    // Mail while the relay waits: no extra POST.
    tokio::time::sleep(Duration::from_millis(700)).await;
    burst(&alice, &bob, 1, 3).await;
    gw.set("/up/slow", Answer::Status(201));
    let posts = gw.until_posts("/up/slow/bob", 2).await;
    let gap = posts[1].at.duration_since(first);
    assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}");
    assert!(gap < Duration::from_secs(4), "retried after {gap:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(gw.posts("/up/slow/bob").len(), 2, "answered: no more tries");
}

#[tokio::test]
async fn a_hanging_endpoint_host_holds_only_its_own_slots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let slow = Gateway::start().await;
    let fast = Gateway::start().await;
    let relay = relay(
        dir.path(),
        &slow,
        "timeout = \"20s\"\nmax_in_flight = 2\nmax_in_flight_per_host = 1\ncoalesce = \"100ms\"\n",
    );
    slow.set("/up/", Answer::Hang);
    let alice = register(&relay.address).await;
    let mut stuck = Vec::new();
    for i in 0..3 {
        stuck.push(offline_with(&relay, unified(&slow, &format!("/up/{i}"))).await);
    }
    let fine = offline_with(&relay, unified(&fast, "/up/fine")).await;
    for (i, to) in stuck.iter().enumerate() {
        burst(&alice, to, 0, 1).await;
        if i == 0 {
            slow.until_posts("/up/0", 1).await;
        }
    }
    // Three wake-ups for the hanging host, one POST to it at a time: the other
    // host still has a slot and is woken at once (not after the 20 s timeout).
    burst(&alice, &fine, 0, 1).await;
    fast.until_posts("/up/fine", 1).await;
    let to_slow = (slow.hits().iter()).filter(|h| h.method == "POST").count();
    assert_eq!(to_slow, 1, "one POST at a time to one host");
}

#[tokio::test]
async fn sends_keep_their_speed_while_the_gateway_hangs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start().await;
    let relay = relay(
        dir.path(),
        &gw,
        "timeout = \"20s\"\nmax_in_flight = 4\nqueue = 16\ncoalesce = \"100ms\"\n",
    );
    gw.set("/gw/hang", Answer::Hang);
    let alice = register(&relay.address).await;
    let quiet = register(&relay.address).await;
    let (quiet, _, _) = quiet.go_offline().await;
    let mut hung = Vec::new();
    for i in 0..8 {
        let target = gateway_target(&gw, &format!("/gw/hang/{i}"), "t");
        hung.push(offline_with(&relay, target).await);
    }

    // Sequential sends: to a device without a target, then to devices whose
    // gateway never answers (every one a wake-up: the window is short).
    let timed = |to: DeviceAddress, base: u32| {
        let conn = &alice.conn;
        async move {
            let mut worst = Duration::ZERO;
            let started = Instant::now();
            for i in 0..60 {
                let t = Instant::now();
                within(conn.send(&to, [envelope(base + i)]))
                    .await
                    .expect("stored");
                worst = worst.max(t.elapsed());
                if i % 10 == 9 {
                    tokio::time::sleep(Duration::from_millis(110)).await;
                }
            }
            (started.elapsed(), worst)
        }
    };
    let (baseline, _) = timed(quiet, 0).await;
    let mut total = Duration::ZERO;
    let mut worst = Duration::ZERO;
    for (n, to) in hung.iter().enumerate() {
        let (took, w) = timed(*to, 1000 * (n as u32 + 1)).await;
        total += took;
        worst = worst.max(w);
    }
    let per_run = total / hung.len() as u32;
    assert!(
        worst < Duration::from_secs(1),
        "a send waited {worst:?} (the POST timeout is 20 s)"
    );
    assert!(
        per_run < baseline * 3 + Duration::from_millis(500),
        "60 sends took {per_run:?} with the gateway hanging, {baseline:?} without"
    );
    // The hanging POSTs are bounded by max_in_flight.
    let posts = gw.hits().into_iter().filter(|h| h.method == "POST").count();
    assert!((1..=4).contains(&posts), "{posts} POSTs in flight");
}

#[tokio::test]
async fn the_client_registers_clears_and_keeps_its_push_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start().await;
    let relay = relay(dir.path(), &gw, "");
    let store = crate::client::store(dir.path(), "alice");
    let (alice, _events) = Client::register(&relay.address, store.clone())
        .await
        .expect("alice");
    let refused = alice
        .set_push_target(gateway_target(&gw, "/elsewhere", "t"))
        .await;
    assert_eq!(code(refused), Some(ErrorCode::PushTargetRefused));
    let bad = alice
        .set_push_target(gateway_target(&gw, "/gw/wake", "a token"))
        .await;
    assert!(matches!(bad, Err(tern_client::Error::InvalidPushTarget(_))));
    assert_eq!(alice.push_target().await.expect("read"), None);

    let target = unified(&gw, "/up/alice");
    alice.set_push_target(target.clone()).await.expect("set");
    assert_eq!(
        alice.push_target().await.expect("read"),
        Some(target.clone())
    );
    alice.shutdown().await;
    drop(alice);

    // Reopened, the client sends its target again; the relay, which holds it, does
    // not check it again (one discovery GET in all).
    let (alice, _events) = Client::open(store).await.expect("open");
    assert_eq!(alice.push_target().await.expect("read"), Some(target));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gets = gw.hits().iter().filter(|h| h.method == "GET").count();
    assert_eq!(gets, 1);
    alice.clear_push_target().await.expect("clear");
    assert_eq!(alice.push_target().await.expect("read"), None);
    alice.shutdown().await;
}
