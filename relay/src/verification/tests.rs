use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use rand::SeedableRng;
use tern_platform::clock::ManualClock;
use tern_proto::{ErrorCode, Request};

use super::*;
use crate::config::DiscoveryConfig;
use crate::discovery::Oprf;
use crate::store::{AccountRecord, AccountStore, MemoryStore, DAY_MS};
use std::sync::Mutex;

const START: u64 = 20_000 * DAY_MS + 3_600_000;

/// Records every code it is asked to send, by session; fails on demand.
#[derive(Default)]
struct Recording {
    codes: Mutex<HashMap<VerificationId, (String, String)>>,
    ended: Mutex<Vec<VerificationId>>,
    fail: std::sync::atomic::AtomicBool,
}

impl Verifier for Recording {
    fn send_code<'a>(
        &'a self,
        number: &'a E164,
        code: &'a Code,
        session: &'a VerificationId,
    ) -> SendFuture<'a> {
        Box::pin(async move {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(VerifierError::Rejected(500));
            }
            let mut codes = self.codes.lock().expect("lock");
            codes.insert(*session, (number.as_str().into(), code.as_str().into()));
            Ok(())
        })
    }

    fn session_ended(&self, session: &VerificationId) {
        self.ended.lock().expect("lock").push(*session);
    }
}

struct Fx {
    v: Verification,
    sent: Arc<Recording>,
    clock: Arc<ManualClock>,
    discovery: Arc<Discovery>,
    store: Arc<MemoryStore>,
    _dir: tempfile::TempDir,
}

fn fx_with(config: &VerificationConfig) -> Fx {
    fx_with_seed(config, 9)
}

fn fx_with_seed(config: &VerificationConfig, seed: u64) -> Fx {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(START));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let discovery = Arc::new(
        Discovery::new(
            Oprf::load_or_create(dir.path(), &mut rng).expect("key"),
            store.clone(),
            store.clone(),
            clock.clone(),
            &DiscoveryConfig::default(),
            dir.path().join("discovery"),
        )
        .expect("discovery"),
    );
    let sent = Arc::new(Recording::default());
    let v = Verification::new(config, Some(sent.clone()), discovery.clone(), clock.clone());
    Fx {
        v,
        sent,
        clock,
        discovery,
        store,
        _dir: dir,
    }
}

fn fx() -> Fx {
    fx_with(&VerificationConfig::default())
}

fn account(n: u8) -> AccountId {
    AccountId([n; 16])
}

fn prefix(last: u8) -> AddressPrefix {
    AddressPrefix::from(IpAddr::from([192, 0, 2, last]))
}

fn number(s: &str) -> E164 {
    E164::parse(s).expect("E.164")
}

impl Fx {
    async fn start(&self, a: u8, n: &str) -> Result<VerificationId> {
        self.v
            .start(&account(a), prefix(a), number(n))
            .await
            .map(|(id, _)| id)
    }

    fn code_of(&self, id: &VerificationId) -> Code {
        let codes = self.sent.codes.lock().expect("lock");
        Code::parse(&codes.get(id).expect("sent").1).expect("6 digits")
    }

    fn wrong_code_of(&self, id: &VerificationId) -> Code {
        let right = self.code_of(id);
        let n: u32 = right.as_str().parse().expect("digits");
        Code::from_number((n + 1) % 1_000_000).expect("below 10^6")
    }

    fn tag_of(&self, a: u8) -> Option<tern_proto::discovery::Tag> {
        let found = self.discovery.store().of_account(&account(a));
        found.expect("store").map(|(tag, _)| tag)
    }
}

fn code_of(e: &Error) -> ErrorCode {
    e.code()
}

#[test]
fn malformed_numbers_are_invalid_number_before_any_service() {
    for bad in [
        "0123",
        "+0123456789",
        "+1234567890123456",
        "+1555abc0123",
        "",
        "+",
    ] {
        let frame = tern_proto::v1::ClientFrame {
            request_id: 5,
            body: Some(tern_proto::v1::client_frame::Body::StartVerification(
                tern_proto::v1::StartVerificationRequest { number: bad.into() },
            )),
        };
        let e = tern_proto::ClientRequest::try_from(frame).expect_err("refused");
        assert_eq!(e.code(), ErrorCode::InvalidNumber, "{bad:?}");
        assert!(!e.client_message().contains("123"), "no digits echoed");
    }
    let ok = Request::StartVerification {
        number: number("+15550100123"),
    };
    assert_eq!(ok.kind().as_str(), "start_verification");
}

#[tokio::test]
async fn a_right_code_attaches_the_tag_and_ends_the_session() {
    let f = fx();
    let id = f.start(1, "+15550100123").await.expect("started");
    let (sent_to, _) = f.sent.codes.lock().expect("lock")[&id].clone();
    assert_eq!(sent_to, "+15550100123");
    assert_eq!(f.tag_of(1), None);
    let discoverable = f.v.check(&account(1), &id, &f.code_of(&id), None).await;
    assert!(discoverable.expect("verified"), "discoverable by default");
    let (want, _) = f.discovery.oprf().tag_of(b"+15550100123").expect("tag");
    assert_eq!(f.tag_of(1), Some(want));
    assert_eq!(f.v.open_sessions().expect("sessions"), 0);
    assert_eq!(*f.sent.ended.lock().expect("lock"), vec![id]);
    let again = f.v.check(&account(1), &id, &f.code_of(&id), None).await;
    assert_eq!(again.map_err(|e| code_of(&e)), Err(ErrorCode::NotFound));
}

#[tokio::test]
async fn the_check_can_attach_a_hidden_tag() {
    let f = fx();
    for (n, number) in [(1, "+15550100123"), (2, "+15550100124")] {
        let record = AccountRecord {
            identity_key: [n; 32],
            devices: vec![],
        };
        f.store.create(&account(n), &record).expect("create");
        let id = f.start(n, number).await.expect("started");
        let choice = (n == 2).then_some(false);
        let discoverable = f.v.check(&account(n), &id, &f.code_of(&id), choice).await;
        assert_eq!(
            discoverable.expect("verified"),
            n == 1,
            "the answer says the choice"
        );
    }
    let (hidden, hidden_key) = f.discovery.oprf().tag_of(b"+15550100124").expect("tag");
    let (shown, shown_key) = f.discovery.oprf().tag_of(b"+15550100123").expect("tag");
    assert_eq!(f.tag_of(2), Some(hidden), "verified, only not findable");
    let found = f
        .discovery
        .lookup(&account(1), &[hidden, shown])
        .expect("lookup");
    let found: Vec<_> = found.iter().map(|d| (d.tag, d.account)).collect();
    assert_eq!(
        found,
        vec![(shown, account(1))],
        "the hidden tag is not found"
    );
    let keys = f.discovery.store().discoverable_keys().expect("keys");
    assert!(keys.contains(&shown_key.0) && !keys.contains(&hidden_key.0));
}

#[tokio::test]
async fn wrong_codes_count_down_then_the_session_is_gone() {
    let f = fx();
    let id = f.start(1, "+15550100123").await.expect("started");
    let wrong = f.wrong_code_of(&id);
    for left in (0..5).rev() {
        let e =
            f.v.check(&account(1), &id, &wrong, None)
                .await
                .expect_err("wrong");
        assert_eq!(e.code(), ErrorCode::WrongCode);
        assert_eq!(e.to_reply().attempts_left, left);
    }
    // Even the right code is too late now.
    let e = f.v.check(&account(1), &id, &f.code_of(&id), None).await;
    assert_eq!(e.map_err(|e| code_of(&e)), Err(ErrorCode::NotFound));
    assert_eq!(f.tag_of(1), None);
}

#[tokio::test]
async fn a_code_expires_after_ten_minutes() {
    let f = fx();
    let id = f.start(1, "+15550100123").await.expect("started");
    f.clock.advance(Duration::from_secs(599));
    let wrong = f.wrong_code_of(&id);
    let e =
        f.v.check(&account(1), &id, &wrong, None)
            .await
            .expect_err("wrong");
    assert_eq!(e.to_reply().attempts_left, 4, "still open at 9:59");
    f.clock.advance(Duration::from_secs(1));
    let e = f.v.check(&account(1), &id, &f.code_of(&id), None).await;
    assert_eq!(e.map_err(|e| code_of(&e)), Err(ErrorCode::Expired));
    let e = f.v.check(&account(1), &id, &f.code_of(&id), None).await;
    assert_eq!(e.map_err(|e| code_of(&e)), Err(ErrorCode::NotFound));
}

#[tokio::test]
async fn the_sweep_drops_expired_sessions() {
    let f = fx();
    let a = f.start(1, "+15550100123").await.expect("started");
    f.clock.advance(Duration::from_secs(300));
    let _b = f.start(2, "+15550100124").await.expect("started");
    f.clock.advance(Duration::from_secs(300));
    assert_eq!(f.v.sweep().expect("sweep"), 1);
    assert_eq!(f.v.open_sessions().expect("sessions"), 1);
    assert_eq!(*f.sent.ended.lock().expect("lock"), vec![a]);
}

#[tokio::test]
async fn a_failed_verification_of_a_new_number_keeps_the_existing_tag() {
    let f = fx();
    let id = f.start(1, "+15550100123").await.expect("started");
    f.v.check(&account(1), &id, &f.code_of(&id), None)
        .await
        .expect("verified");
    let before = f.tag_of(1).expect("tag");
    // A new number: wrong five times, then another one expires.
    let id = f.start(1, "+447700900123").await.expect("started");
    let wrong = f.wrong_code_of(&id);
    for _ in 0..5 {
        let _ = f.v.check(&account(1), &id, &wrong, None).await;
    }
    let id = f.start(1, "+447700900124").await.expect("started");
    f.clock.advance(Duration::from_secs(601));
    let _ = f.v.check(&account(1), &id, &f.code_of(&id), None).await;
    assert_eq!(f.tag_of(1), Some(before));
}

#[tokio::test]
async fn one_session_per_account_a_new_start_replaces_the_old() {
    let f = fx();
    let first = f.start(1, "+15550100123").await.expect("started");
    let second = f.start(1, "+15550100124").await.expect("started");
    assert_eq!(f.v.open_sessions().expect("sessions"), 1);
    let e =
        f.v.check(&account(1), &first, &f.code_of(&first), None)
            .await;
    assert_eq!(e.map_err(|e| code_of(&e)), Err(ErrorCode::NotFound));
    assert!(f.sent.ended.lock().expect("lock").contains(&first));
    f.v.check(&account(1), &second, &f.code_of(&second), None)
        .await
        .expect("the new one works");
}

#[tokio::test]
async fn another_accounts_session_is_not_found() {
    let f = fx();
    let id = f.start(1, "+15550100123").await.expect("started");
    let e = f.v.check(&account(2), &id, &f.code_of(&id), None).await;
    assert_eq!(e.map_err(|e| code_of(&e)), Err(ErrorCode::NotFound));
    // ...and cost the owner nothing.
    f.v.check(&account(1), &id, &f.code_of(&id), None)
        .await
        .expect("verified");
}

#[tokio::test]
async fn a_verifier_failure_is_unavailable_and_leaves_no_session() {
    let f = fx();
    f.sent.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = f.start(1, "+15550100123").await.expect_err("not sent");
    assert_eq!(e.code(), ErrorCode::Unavailable);
    assert_eq!(
        e.retry_after_ms(),
        60_000,
        "a gateway's 5xx: retry in a minute"
    );
    assert_eq!(f.v.open_sessions().expect("sessions"), 0);
    // A gateway that refuses the request itself: not worth retrying soon.
    assert_eq!(
        VerificationError::from(VerifierError::Rejected(400)),
        VerificationError::NotSent {
            retry_after_ms: 3_600_000
        }
    );
    assert_eq!(
        VerificationError::from(VerifierError::Timeout),
        VerificationError::NotSent {
            retry_after_ms: 30_000
        }
    );
}

#[tokio::test]
async fn a_deleted_account_can_neither_start_nor_check() {
    let f = fx();
    let tombstones = Arc::new(crate::deletion::Tombstones::default());
    let v = Verification::new(
        &VerificationConfig::default(),
        Some(f.sent.clone()),
        f.discovery.clone(),
        f.clock.clone(),
    )
    .with_tombstones(tombstones.clone());
    let (id, _) = (v.start(&account(1), prefix(1), number("+15550100123")))
        .await
        .expect("start");
    let code = f.code_of(&id);
    // Deleted while its session is open: the right code attaches nothing.
    tombstones.insert(account(1));
    let e = v
        .check(&account(1), &id, &code, None)
        .await
        .expect_err("deleted");
    assert_eq!(e.code(), ErrorCode::Unauthorized);
    assert_eq!(f.tag_of(1), None);
    let e = (v.start(&account(1), prefix(1), number("+15550100124")))
        .await
        .expect_err("deleted");
    assert_eq!(e.code(), ErrorCode::Unauthorized);
    // Another account is unaffected.
    let (id, _) = (v.start(&account(2), prefix(2), number("+15550100125")))
        .await
        .expect("start");
    v.check(&account(2), &id, &f.code_of(&id), None)
        .await
        .expect("verified");
    assert!(f.tag_of(2).is_some());
}

#[tokio::test]
async fn without_a_verifier_starts_are_unavailable() {
    let f = fx();
    let v = Verification::new(
        &VerificationConfig::default(),
        None,
        f.discovery.clone(),
        f.clock.clone(),
    );
    let e = v
        .start(&account(1), prefix(1), number("+15550100123"))
        .await
        .expect_err("off");
    assert_eq!(e.code(), ErrorCode::Unavailable);
}

#[tokio::test]
async fn starts_are_limited_per_number_prefix_and_account() {
    let f = fx();
    // Per number (3/1h), from different accounts and addresses.
    for a in 1..=3 {
        f.start(a, "+15550100123").await.expect("within the rate");
    }
    let e = f.start(4, "+15550100123").await.expect_err("limited");
    assert_eq!(e.code(), ErrorCode::RateLimited);
    assert!(e.retry_after_ms() > 0 && e.retry_after_ms() <= 20 * 60 * 1000);
    f.start(4, "+15550100999").await.expect("another number");
    // Per prefix (10/1h): one address, ten accounts, ten numbers.
    let from = prefix(200);
    for i in 0..10u8 {
        let n = number(&format!("+1555020{i:04}"));
        f.v.start(&account(100 + i), from, n).await.expect("within");
    }
    let e = (f.v)
        .start(&account(120), from, number("+15550300000"))
        .await
        .expect_err("limited");
    assert_eq!(e.code(), ErrorCode::RateLimited);
    // A second address is limited separately.
    (f.v)
        .start(&account(120), prefix(201), number("+15550300000"))
        .await
        .expect("another address");
    // Per account (5/1day), from different addresses.
    for i in 0..4u8 {
        let n = number(&format!("+1555040{i:04}"));
        f.v.start(&account(120), prefix(210 + i), n)
            .await
            .expect("within");
    }
    let e = (f.v)
        .start(&account(120), prefix(220), number("+15550500000"))
        .await
        .expect_err("limited");
    assert_eq!(e.code(), ErrorCode::RateLimited);
    // Refilled after the clock moves past the advice.
    f.clock.advance(Duration::from_millis(e.retry_after_ms()));
    (f.v)
        .start(&account(120), prefix(220), number("+15550500000"))
        .await
        .expect("refilled");
}

#[tokio::test]
async fn a_refused_start_spends_none_of_the_other_limits() {
    let f = fx();
    // The number's limit (3/1h) spent by three others.
    for a in 1..=3 {
        f.start(a, "+15550100123").await.expect("within the rate");
    }
    // Account 4 is refused five times for that number from one address...
    for _ in 0..5 {
        let e = f
            .start(4, "+15550100123")
            .await
            .expect_err("number limited");
        assert_eq!(e.code(), ErrorCode::RateLimited);
    }
    // ...and still has its five starts a day, and the address its ten an hour.
    for i in 0..5u8 {
        f.start(4, &format!("+1555060{i:04}"))
            .await
            .expect("account not charged");
    }
    // The account's limit refuses now: the number and the address are not charged.
    for _ in 0..5 {
        let e = f
            .start(4, "+15550700000")
            .await
            .expect_err("account limited");
        assert_eq!(e.code(), ErrorCode::RateLimited);
    }
    for a in 5..=7u8 {
        (f.v)
            .start(&account(a), prefix(4), number("+15550700000"))
            .await
            .expect("number and address not charged");
    }
}

#[test]
fn the_dev_file_verifier_refuses_a_symlinked_directory() {
    let data = tempfile::tempdir().expect("tempdir");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let kept = elsewhere.path().join("keep");
    std::fs::write(&kept, b"x").expect("file");
    std::os::unix::fs::symlink(elsewhere.path(), data.path().join(file::DIR)).expect("link");
    file::FileVerifier::new(data.path()).expect_err("a symlink");
    assert!(kept.exists(), "the target is not emptied");
    // A data directory without it gets a fresh 0700 directory.
    let fresh = tempfile::tempdir().expect("tempdir");
    file::FileVerifier::new(fresh.path()).expect("created");
    let mode = std::fs::metadata(fresh.path().join(file::DIR)).expect("dir");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o700
    );
}

#[test]
fn the_number_limiter_key_is_not_the_number_and_the_same_on_every_node() {
    let f = fx();
    let n = number("+15550100123");
    let k = f.v.number_limit_key(&n);
    assert_eq!(k, f.v.number_limit_key(&n), "stable");
    assert_ne!(k, f.v.number_limit_key(&number("+15550100124")));
    assert!(!k.windows(4).any(|w| w == &b"1555"[..]));
    // Another node with the same OPRF key file (fx seeds its key alike).
    let node = fx();
    assert_eq!(k, node.v.number_limit_key(&n), "derived from the key file");
    // A relay with another key: another limiter key.
    let other = fx_with_seed(&VerificationConfig::default(), 10);
    assert_ne!(k, other.v.number_limit_key(&n));
    assert_ne!(
        f.v.prefix_limit_key(&prefix(1)),
        f.v.prefix_limit_key(&prefix(2))
    );
}

#[test]
fn webhook_urls_need_https_or_loopback_http_when_allowed() {
    let url = |s: &str| reqwest::Url::parse(s).expect("url");
    assert!(webhook::check_url(&url("https://sms.example/send"), false).is_ok());
    assert!(webhook::check_url(&url("http://sms.example/send"), false).is_err());
    assert!(webhook::check_url(&url("http://sms.example/send"), true).is_err());
    assert!(webhook::check_url(&url("http://127.0.0.1:8080/send"), false).is_err());
    for ok in [
        "http://127.0.0.1:8080/",
        "http://[::1]:80/",
        "http://localhost/x",
    ] {
        assert!(webhook::check_url(&url(ok), true).is_ok(), "{ok}");
    }
    assert!(webhook::check_url(&url("ftp://127.0.0.1/"), true).is_err());
}

#[tokio::test]
async fn the_dev_file_verifier_names_files_by_session_and_deletes_them() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let leftover = dir.path().join(file::DIR);
    std::fs::create_dir_all(&leftover).expect("dir");
    std::fs::write(leftover.join("old"), b"123456").expect("write");
    let v = file::FileVerifier::new(dir.path()).expect("verifier");
    assert!(!leftover.join("old").exists(), "a previous run's codes go");
    let id = VerificationId([0xab; 16]);
    let code = Code::parse("042042").expect("code");
    v.send_code(&number("+15550100123"), &code, &id)
        .await
        .expect("written");
    let path = v.path_of(&id);
    assert_eq!(
        path.file_name().and_then(|n| n.to_str()),
        Some(&*id.to_hex())
    );
    assert_eq!(std::fs::read(&path).expect("read"), b"042042");
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    v.session_ended(&id);
    assert!(!path.exists());
}

#[test]
fn the_dev_file_verifier_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = VerificationConfig {
        verifier: VerifierKind::DevFile,
        ..VerificationConfig::default()
    };
    assert!(verifier_from_config(&config, dir.path()).is_err());
    assert!(!dir.path().join(file::DIR).exists());
    config.allow_dev_verifier = true;
    assert!(verifier_from_config(&config, dir.path())
        .expect("allowed")
        .is_some());
}
