//! Phone verification on a real relay process: through the webhook (the test reads
//! the code from the request its HTTP server recorded) and through the dev-file
//! verifier; the dev-file verifier refused without its allowance; start limits per
//! number and per address; and the webhook verifier itself against 200, 500 and a
//! gateway that does not answer in time.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tern_client::Error;
use tern_proto::{Code, ErrorCode, VerificationId, E164};
use tern_relay::config::WebhookConfig;
use tern_relay::verification::webhook::WebhookVerifier;
use tern_relay::verification::{Verifier, VerifierError};

use crate::http::TestHttpServer;
use crate::support::{register, register_from, within, RelayProcess};

/// Writes `toml` beside `data_dir` and starts a relay with it.
pub(crate) fn relay_with(
    data_dir: &Path,
    toml: &str,
    extra: &[&str],
) -> anyhow::Result<RelayProcess> {
    let config = data_dir.with_extension("toml");
    std::fs::write(&config, toml)?;
    let config = config.to_string_lossy().into_owned();
    let mut args = vec!["--config", config.as_str()];
    args.extend_from_slice(extra);
    RelayProcess::start_with_env(data_dir, "127.0.0.1:0", &args, PROXIES)
}

/// Proxy variables pointing at a closed port: the webhook must not follow them
/// (a plain-http gateway on loopback would otherwise get numbers via the proxy).
const PROXIES: &[(&str, &str)] = &[
    ("HTTP_PROXY", "http://127.0.0.1:9"),
    ("http_proxy", "http://127.0.0.1:9"),
    ("HTTPS_PROXY", "http://127.0.0.1:9"),
    ("ALL_PROXY", "http://127.0.0.1:9"),
];

/// The `[verification]` block for a webhook to `server`.
pub(crate) fn webhook_toml(server: &TestHttpServer, rates: &str) -> String {
    format!(
        "[verification]\nverifier = \"webhook\"\n{rates}\n[verification.webhook]\nurl = \"{}\"\nallow_http = true\ntimeout = \"2s\"\n",
        server.url("/sms")
    )
}

/// The code the gateway received for `number` last.
pub(crate) fn code_sent(server: &TestHttpServer, number: &str) -> Code {
    let requests = server.requests();
    let last = (requests.iter().rev())
        .filter_map(|r| r.json())
        .find(|j| j["to"] == number)
        .expect("the gateway got the number");
    Code::parse(last["code"].as_str().expect("a code")).expect("6 digits")
}

fn other_code(code: &Code) -> Code {
    let n: u32 = code.as_str().parse().expect("digits");
    Code::from_number((n + 1) % 1_000_000).expect("below 10^6")
}

fn e164(s: &str) -> E164 {
    E164::parse(s).expect("E.164")
}

fn code_of<T>(r: &Result<T, Error>) -> Option<ErrorCode> {
    r.as_ref().err().and_then(Error::relay_code)
}

#[tokio::test]
async fn a_number_is_verified_through_the_webhook() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestHttpServer::start().await.expect("http");
    let toml = webhook_toml(&server, "");
    let relay = relay_with(&dir.path().join("relay"), &toml, &[]).expect("relay");
    let alice = register(&relay.address).await;

    let (session, expires_at_ms) = within(alice.conn.start_verification(e164("+15550100123")))
        .await
        .expect("started");
    assert!(expires_at_ms > 0);
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!((sent.method.as_str(), sent.path.as_str()), ("POST", "/sms"));
    assert_eq!(sent.header("content-type"), Some("application/json"));
    let body = sent.json().expect("JSON");
    assert_eq!(body["to"], "+15550100123");
    let code = code_sent(&server, "+15550100123");
    assert!(body["message"]
        .as_str()
        .expect("text")
        .contains(code.as_str()));

    let wrong = within(alice.conn.check_verification(session, other_code(&code))).await;
    assert_eq!(code_of(&wrong), Some(ErrorCode::WrongCode));
    assert_eq!(wrong.expect_err("wrong").attempts_left(), Some(4));
    let unknown = within(
        alice
            .conn
            .check_verification(VerificationId([1; 16]), code.clone()),
    )
    .await;
    assert_eq!(code_of(&unknown), Some(ErrorCode::NotFound));
    let discoverable = within(alice.conn.check_verification(session, code.clone()))
        .await
        .expect("verified");
    assert!(discoverable, "discoverable by default");
    let again = within(alice.conn.check_verification(session, code)).await;
    assert_eq!(
        code_of(&again),
        Some(ErrorCode::NotFound),
        "the session ended"
    );

    // A gateway that fails: the start is UNAVAILABLE.
    server.set_status(500);
    let failed = within(alice.conn.start_verification(e164("+15550100124"))).await;
    assert_eq!(code_of(&failed), Some(ErrorCode::Unavailable));
}

#[tokio::test]
async fn a_number_is_verified_through_the_dev_file_and_the_file_goes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("relay");
    let toml = "[verification]\nverifier = \"dev-file\"\n";
    let relay = relay_with(&data, toml, &["--allow-dev-verifier"]).expect("relay");
    let alice = register(&relay.address).await;
    let (session, _) = within(alice.conn.start_verification(e164("+15550100123")))
        .await
        .expect("started");
    let file = data.join("dev-verification").join(session.to_hex());
    let digits = std::fs::read_to_string(&file).expect("the code file");
    let code = Code::parse(&digits).expect("6 digits");
    assert!(within(alice.conn.check_verification(session, code))
        .await
        .expect("verified"));
    assert!(!file.exists(), "deleted when the session ends");
    assert!(
        relay.log_text().contains("development only"),
        "a warning at start"
    );
}

#[tokio::test]
async fn the_check_carries_the_choice_to_stay_hidden() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("relay");
    let toml = "[verification]\nverifier = \"dev-file\"\n";
    let relay = relay_with(&data, toml, &["--allow-dev-verifier"]).expect("relay");
    for (number, choice, want) in [
        ("+15550100123", Some(false), false),
        ("+15550100124", None, true),
        ("+15550100125", Some(true), true),
    ] {
        let user = register(&relay.address).await;
        let (session, _) = within(user.conn.start_verification(e164(number)))
            .await
            .expect("started");
        let file = data.join("dev-verification").join(session.to_hex());
        let digits = std::fs::read_to_string(&file).expect("the code file");
        let code = Code::parse(&digits).expect("6 digits");
        let discoverable = within(user.conn.check_verification_as(session, code, choice))
            .await
            .expect("verified");
        assert_eq!(discoverable, want, "{choice:?}");
    }
}

#[tokio::test]
async fn the_dev_file_verifier_is_refused_without_its_allowance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("relay");
    let toml = "[verification]\nverifier = \"dev-file\"\n";
    let refused = relay_with(&data, toml, &[]);
    assert!(refused.is_err(), "the relay must not start");
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
    assert!(log.contains("allow_dev_verifier"), "{log}");
    // Allowed in the file instead of by flag: it starts.
    let toml = "[verification]\nverifier = \"dev-file\"\nallow_dev_verifier = true\n";
    relay_with(&dir.path().join("relay2"), toml, &[]).expect("allowed");
}

fn local(ip: &str) -> SocketAddr {
    format!("{ip}:0").parse().expect("address")
}

#[tokio::test]
async fn starts_are_limited_per_number_and_per_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestHttpServer::start().await.expect("http");
    let rates = "starts_per_number = \"2/1h\"\nstarts_per_prefix = \"4/1h\"";
    let relay = relay_with(
        &dir.path().join("relay"),
        &webhook_toml(&server, rates),
        &[],
    )
    .expect("relay");
    let mut devices = Vec::new();
    for _ in 0..3 {
        devices.push(register_from(&relay.address, Some(local("127.0.0.1"))).await);
    }
    // Per number: two starts, from two accounts; the third is refused.
    for d in &devices[..2] {
        within(d.conn.start_verification(e164("+15550100123")))
            .await
            .expect("within the rate");
    }
    let third = within(devices[2].conn.start_verification(e164("+15550100123"))).await;
    assert_eq!(code_of(&third), Some(ErrorCode::RateLimited));
    let wait = third.expect_err("limited").retry_after().expect("advice");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1800),
        "{wait:?}"
    );

    // Per address: 4 starts from 127.0.0.1 (the refused one above spent nothing).
    within(devices[2].conn.start_verification(e164("+15550100200")))
        .await
        .expect("the third charged");
    within(devices[1].conn.start_verification(e164("+15550100202")))
        .await
        .expect("the fourth charged");
    let fifth = within(devices[2].conn.start_verification(e164("+15550100201"))).await;
    assert_eq!(code_of(&fifth), Some(ErrorCode::RateLimited));
    assert!(fifth.expect_err("limited").retry_after().is_some());
    // Another address is counted apart.
    let other = register_from(&relay.address, Some(local("127.0.0.2"))).await;
    within(other.conn.start_verification(e164("+15550100201")))
        .await
        .expect("a second address");
}

fn webhook(server: &TestHttpServer, timeout: Duration) -> WebhookVerifier {
    WebhookVerifier::new(&WebhookConfig {
        url: server.url("/send"),
        bearer_token_file: None,
        timeout,
        allow_http: true,
    })
    .expect("verifier")
}

#[tokio::test]
async fn the_webhook_answers_ok_rejected_and_timeout() {
    let server = TestHttpServer::start().await.expect("http");
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("token");
    let v = WebhookVerifier::new(&WebhookConfig {
        url: server.url("/send"),
        bearer_token_file: Some(token),
        timeout: Duration::from_secs(5),
        allow_http: true,
    })
    .expect("verifier");
    let (number, code, id) = (
        e164("+447700900123"),
        Code::parse("123456").expect("code"),
        VerificationId([3; 16]),
    );
    within(v.send_code(&number, &code, &id)).await.expect("200");
    let r = &server.requests()[0];
    assert_eq!(r.header("authorization"), Some("Bearer s3cret"));
    let body = r.json().expect("json");
    assert_eq!(
        (body["to"].as_str(), body["code"].as_str()),
        (Some("+447700900123"), Some("123456"))
    );

    server.set_status(500);
    let v = webhook(&server, Duration::from_secs(5));
    assert_eq!(
        within(v.send_code(&number, &code, &id)).await,
        Err(VerifierError::Rejected(500))
    );
    server.set_status(302);
    assert_eq!(
        within(v.send_code(&number, &code, &id)).await,
        Err(VerifierError::Rejected(302)),
        "redirects are not followed"
    );

    server.set_status(200);
    server.set_delay(Duration::from_secs(3));
    let v = webhook(&server, Duration::from_millis(300));
    assert_eq!(
        within(v.send_code(&number, &code, &id)).await,
        Err(VerifierError::Timeout)
    );
}
