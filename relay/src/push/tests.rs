//! Registration rules without a network: URLs, the allowlist, the switch.

#![allow(clippy::expect_used)]

use super::*;

fn url(s: &str) -> Url {
    Url::parse(s).expect("url")
}

#[test]
fn the_allowlist_matches_scheme_host_port_and_whole_path_segments() {
    let entry = url("https://push.example.org/tern");
    assert!(allowed(&entry, &url("https://push.example.org/tern")));
    assert!(allowed(
        &entry,
        &url("https://push.example.org/tern/wake?x=1")
    ));
    assert!(allowed(&entry, &url("https://push.example.org:443/tern/a")));
    assert!(!allowed(&entry, &url("https://push.example.org/ternx")));
    assert!(!allowed(&entry, &url("https://push.example.org/")));
    assert!(!allowed(&entry, &url("https://push.example.org:8443/tern")));
    assert!(!allowed(&entry, &url("https://evil.example/tern")));
    assert!(!allowed(&entry, &url("http://push.example.org/tern")));
    assert!(!allowed(
        &entry,
        &url("https://push.example.org.evil.example/tern")
    ));
    let root = url("https://gw.example/");
    assert!(allowed(&root, &url("https://gw.example/anything")));
}

#[test]
fn only_https_or_loopback_http_when_allowed() {
    assert!(check_url(&url("https://up.example/x"), false).is_ok());
    assert!(check_url(&url("http://up.example/x"), false).is_err());
    assert!(
        check_url(&url("http://up.example/x"), true).is_err(),
        "not loopback"
    );
    assert!(check_url(&url("http://127.0.0.1:9/x"), false).is_err());
    assert!(check_url(&url("http://127.0.0.1:9/x"), true).is_ok());
    assert!(check_url(&url("http://[::1]:9/x"), true).is_ok());
    assert!(check_url(&url("https://up.example/x#frag"), false).is_err());
    assert!(check_url(&url("ftp://up.example/x"), true).is_err());
}

mod service {
    use std::sync::Arc;

    use ed25519_dalek::{Signer, SigningKey};
    use tern_platform::clock::SystemClock;
    use tern_proto::{ErrorCode, PushTarget};

    use crate::core::auth::{self, AuthenticatedDevice};
    use crate::core::expiry::Ttl;
    use crate::core::limits::Limits;
    use crate::push::Push;
    use crate::server::Services;
    use crate::store::{Durability, MemoryStore, PushStore, Stores};

    pub(super) async fn device(services: &Services) -> AuthenticatedDevice {
        let (identity, device) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let exporter = [7; 32];
        let key = device.verifying_key().to_bytes();
        let verified = auth::verify_registration(
            &identity.verifying_key().to_bytes(),
            &key,
            &identity
                .sign(&tern_proto::auth::device_certificate(None, &key))
                .to_bytes(),
            &device
                .sign(&tern_proto::auth::session_proof(&exporter))
                .to_bytes(),
            &exporter,
        )
        .expect("verified");
        services
            .accounts()
            .register(verified)
            .await
            .expect("register")
    }

    pub(super) fn services(memory: &Arc<MemoryStore>) -> Services {
        Services::new(
            Stores::all(memory.clone()),
            Arc::new(SystemClock),
            Limits::default(),
            Ttl::MAX,
            Durability::Os,
            SigningKey::from_bytes(&[9; 32]),
        )
        .expect("services")
    }

    fn gateway(url: &str) -> PushTarget {
        PushTarget::Gateway {
            url: url.into(),
            device_token: "tok".into(),
        }
    }

    #[tokio::test]
    async fn a_gateway_is_taken_only_from_the_list_and_refusals_are_typed() {
        let memory = Arc::new(MemoryStore::new());
        let services = services(&memory);
        let alice = device(&services).await;
        let mut config = crate::config::PushConfig {
            gateways: vec!["https://gw.example/tern".into()],
            ..Default::default()
        };
        let push = Push::new(
            memory.clone(),
            services.commit().clone(),
            services.tombstones().clone(),
            &config,
        )
        .expect("push");

        push.set(&alice, gateway("https://gw.example/tern/wake"))
            .await
            .expect("listed");
        assert_eq!(
            memory.push_target(alice.address()).expect("read"),
            Some(gateway("https://gw.example/tern/wake"))
        );
        let refused = push
            .set(&alice, gateway("https://other.example/tern"))
            .await
            .expect_err("not listed");
        assert_eq!(refused.code(), ErrorCode::PushTargetRefused);
        let refused = push
            .set(&alice, gateway("http://gw.example/tern"))
            .await
            .expect_err("http");
        assert_eq!(refused.code(), ErrorCode::PushTargetRefused);
        let bad = push
            .set(&alice, gateway("not a url"))
            .await
            .expect_err("malformed");
        assert_eq!(bad.code(), ErrorCode::BadRequest);
        // The refusals left the registered target alone; clearing removes it.
        assert!(memory.push_target(alice.address()).expect("read").is_some());
        push.clear(&alice).await.expect("clear");
        push.clear(&alice).await.expect("clear again");
        assert_eq!(memory.push_target(alice.address()).expect("read"), None);

        config.enabled = false;
        let off = Push::new(
            memory.clone(),
            services.commit().clone(),
            services.tombstones().clone(),
            &config,
        )
        .expect("push");
        let refused = off
            .set(&alice, gateway("https://gw.example/tern"))
            .await
            .expect_err("disabled");
        assert_eq!(refused.code(), ErrorCode::PushTargetRefused);
    }
}

mod ssrf {
    use std::sync::Arc;

    use tern_proto::{ErrorCode, PushTarget};

    use super::service::{device, services};
    use crate::push::Push;
    use crate::store::MemoryStore;

    fn endpoint(url: String) -> PushTarget {
        PushTarget::UnifiedPush { endpoint: url }
    }

    #[tokio::test]
    async fn endpoints_at_internal_addresses_are_refused_and_never_connected_to() {
        let memory = Arc::new(MemoryStore::new());
        let services = services(&memory);
        let alice = device(&services).await;
        let push = Push::new(
            memory.clone(),
            services.commit().clone(),
            services.tombstones().clone(),
            &crate::config::PushConfig::default(),
        )
        .expect("push");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        // IP literals never reach the resolver: refused at once.
        for literal in [
            format!("https://127.0.0.1:{port}/up"),
            format!("https://[::ffff:127.0.0.1]:{port}/up"),
            "https://169.254.169.254/latest".into(),
            "https://10.0.0.1/up".into(),
            "https://[fd00::1]/up".into(),
        ] {
            let e = push
                .set(&alice, endpoint(literal.clone()))
                .await
                .expect_err(&literal);
            assert_eq!(e.code(), ErrorCode::PushTargetRefused, "{literal}");
        }
        // A name resolving to loopback only: the resolver drops it, and the message
        // is the one every failed discovery gets.
        let e = (push.set(&alice, endpoint(format!("https://localhost:{port}/up"))))
            .await
            .expect_err("loopback name");
        assert_eq!(e.code(), ErrorCode::PushEndpointUnverified);
        let closed = (push.set(&alice, endpoint("https://unknown.invalid/up".into())))
            .await
            .expect_err("unknown name");
        assert_eq!(closed.to_string(), e.to_string(), "no oracle");
        let accepted =
            tokio::time::timeout(std::time::Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "the relay connected to a loopback port");
    }
}
