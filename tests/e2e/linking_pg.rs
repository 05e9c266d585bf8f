//! Linked devices on two relay nodes over one real PostgreSQL database: a
//! provisioning slot opened on one node is filled on the other and taken on the
//! first; a device removed through one node can no longer authenticate on the
//! other, and its rows are gone from the database.
//!
//! The nodes run in-process (as `Relay::start` on PostgreSQL), so the test reaches
//! the provisioning and removal services directly; clients still register, add the
//! device and authenticate over QUIC.

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};
use tern_client::identity::{DeviceKeyPair, IdentityKeyPair};
use tern_client::net::RelayConnection;
use tern_platform::clock::SystemClock;
use tern_proto::{
    DeviceAddress, DeviceEntry, DeviceId, DeviceList, ErrorCode, KeyUpload, SignedDeviceList,
    SignedKey, SlotId,
};
use tern_relay::config::{Config, StorageBackend};
use tern_relay::core::auth::AuthenticatedDevice;
use tern_relay::core::rate::AddressPrefix;
use tern_relay::Relay;

use crate::support::{envelope, within, PgNodes};

/// A node of `nodes` named `name`, in-process; `peer` is a data directory whose
/// shared files (certificate, keys) it copies first.
async fn node(nodes: &PgNodes, name: &str, peer: Option<&std::path::Path>) -> Relay {
    let dir = nodes.data_dir(name);
    if let Some(peer) = peer {
        crate::support::copy_shared_files(peer, &dir);
    }
    let mut config = Config {
        data_dir: dir,
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Config::default()
    };
    config.storage.backend = StorageBackend::Postgres;
    config.postgres.url = Some(nodes.url());
    Relay::start(&config, std::sync::Arc::new(SystemClock))
        .await
        .expect("node starts")
}

/// `at` authenticated on `relay` as a connection would (a session proof by `key`).
fn authenticated(relay: &Relay, at: DeviceAddress, key: &SigningKey) -> AuthenticatedDevice {
    let exporter = [5u8; 32];
    let proof = key.sign(&tern_proto::auth::session_proof(&exporter));
    relay
        .services()
        .accounts()
        .authenticate(at, &exporter, &proof.to_bytes())
        .expect("authenticated")
}

#[tokio::test]
async fn a_slot_and_a_removal_work_across_nodes_and_the_rows_go() {
    let nodes = PgNodes::start(&[("fsync", "on")]);
    let a = node(&nodes, "a", None).await;
    let b = node(&nodes, "b", Some(&nodes.data_dir("a"))).await;

    // Alice registers on A and adds her laptop (its key made here, so the test can
    // sign for it).
    let (identity_secret, primary_secret, laptop_secret) = ([11u8; 32], [12u8; 32], [13u8; 32]);
    let identity = IdentityKeyPair::from_secret(&identity_secret);
    let (conn, _inbox) = within(RelayConnection::connect(a.address()))
        .await
        .expect("connect");
    let primary = within(conn.register(&identity, &DeviceKeyPair::from_secret(&primary_secret)))
        .await
        .expect("register");
    let account = primary.account;
    let laptop_key = SigningKey::from_bytes(&laptop_secret);
    let laptop_id =
        within(conn.add_device(&identity, &account, &laptop_key.verifying_key().to_bytes()))
            .await
            .expect("add device");
    let laptop = DeviceAddress {
        account,
        device: laptop_id,
    };

    // The slot: opened on A by the new device, filled on B by the primary, taken on A.
    let from = AddressPrefix::from(std::net::IpAddr::from([127, 0, 0, 1]));
    let (slot, reader) = (SlotId([7; 16]), [8u8; 32]);
    let reader_hash: [u8; 32] = Sha256::digest(reader).into();
    let on_a = a.services().provisioning();
    on_a.open(from, &slot, &reader_hash).expect("open on a");
    assert_eq!(
        on_a.take(from, &slot, &reader).expect("pending"),
        Vec::<u8>::new()
    );
    let primary_on_b = authenticated(&b, primary, &SigningKey::from_bytes(&primary_secret));
    let payload = vec![0x5a; 200];
    (b.services().provisioning())
        .deposit(&primary_on_b, from, &slot, laptop_id, &payload)
        .expect("deposit on b");
    assert_eq!(on_a.take(from, &slot, &reader).expect("take on a"), payload);
    let again = on_a.take(from, &slot, &reader).map_err(|e| e.code());
    assert_eq!(again, Err(ErrorCode::NotFound), "taken once");
    assert_eq!(
        nodes.count("SELECT count(*) FROM provisioning_slots").await,
        0
    );

    // The laptop signs in on A (and so has rows), then the primary removes it on B.
    let (laptop_conn, _laptop_inbox) = within(RelayConnection::connect(a.address()))
        .await
        .expect("connect");
    let laptop_pair = DeviceKeyPair::from_secret(&laptop_secret);
    within(laptop_conn.authenticate(&laptop, &laptop_pair))
        .await
        .expect("the laptop authenticates on a");
    // Its keys: the agreement key vouched for by the identity, the signed prekey
    // signed by its own device key (a linked device has no identity key).
    let (dh, spk) = ([21u8; 32], [22u8; 32]);
    let spk_sig = laptop_key.sign(&tern_proto::auth::signed_prekey(1, &spk));
    let upload = KeyUpload {
        identity_dh: Some(SignedKey {
            id: 0,
            key: dh,
            signature: identity.certify_agreement_key(&dh),
        }),
        signed_prekey: Some(SignedKey {
            id: 1,
            key: spk,
            signature: spk_sig.to_bytes(),
        }),
        one_time: vec![(1, [23; 32]), (2, [24; 32])],
    };
    within(laptop_conn.publish_keys(&upload))
        .await
        .expect("keys published");
    laptop_conn.close().await;
    // Mail for it, queued while it is offline.
    within(conn.send(&laptop, [envelope(1), envelope(2)]))
        .await
        .expect("sent");
    let account_hex = crate::support::hex(account.as_bytes());
    let rows = |table: &str, device: u32| {
        format!(
            "SELECT count(*) FROM {table} WHERE account = '\\x{account_hex}'::bytea AND device = {device}"
        )
    };
    let list = DeviceList {
        account,
        version: 1,
        entries: vec![DeviceEntry {
            id: DeviceId::PRIMARY,
            device_key: DeviceKeyPair::from_secret(&primary_secret).public(),
            identity_dh: [1; 32],
        }],
    };
    let bytes = list.encode().expect("valid");
    let signature = SigningKey::from_bytes(&identity_secret)
        .sign(&bytes)
        .to_bytes();
    let signed = SignedDeviceList::parse(bytes.into(), &signature).expect("parses");
    for table in ["devices", "device_keys", "one_time_keys", "messages"] {
        assert!(
            nodes.count(&rows(table, laptop_id.get())).await > 0,
            "{table} before"
        );
    }
    (b.device_removal())
        .remove_signed(&primary_on_b, laptop_id, Some(&signed))
        .await
        .expect("removed on b");

    // A finds no such device: Auth fails there.
    let (retry, _retry_inbox) = within(RelayConnection::connect(a.address()))
        .await
        .expect("connect");
    let refused = within(retry.authenticate(&laptop, &laptop_pair)).await;
    assert!(refused.is_err(), "the removed laptop cannot sign in on a");
    // And nothing of it is in the database; the primary's row stays.
    for table in [
        "devices",
        "device_keys",
        "one_time_keys",
        "messages",
        "device_removals",
    ] {
        assert_eq!(
            nodes.count(&rows(table, laptop_id.get())).await,
            0,
            "{table}"
        );
    }
    assert_eq!(
        nodes.count(&rows("devices", 1)).await,
        1,
        "the primary stays"
    );
    let version = format!(
        "SELECT device_list_version FROM accounts WHERE account = '\\x{account_hex}'::bytea"
    );
    assert_eq!(nodes.count(&version).await, 1, "the list is stored");
    b.shutdown().await.expect("b stops");
    a.shutdown().await.expect("a stops");
}
