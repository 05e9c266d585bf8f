//! Blob bytes in an S3-compatible object store: a real relay process configured with
//! `[objects]` against a real `s3s-fs` server.

use tern_client::media;
use tern_client::net::RelayConnection;
use tern_relay::testing::TestS3;

use crate::support::digest;
use crate::support::{files_under, register, within, RelayProcess};

#[tokio::test]
async fn an_attachment_goes_to_the_object_store_and_comes_back() {
    let s3 = TestS3::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, s3.objects_toml()).expect("config");
    let data = dir.path().join("relay");
    let relay = RelayProcess::start_with_env(
        &data,
        "127.0.0.1:0",
        &["--config", config.to_str().expect("utf-8")],
        &s3.key_env(),
    )
    .expect("relay");
    let alice = register(&relay.address).await;
    // Over two parts.
    let src = dir.path().join("photo");
    let plain: Vec<u8> = (0..(11usize << 20)).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(&src, &plain).expect("write");
    let (pointer, up) = within(media::upload(&alice.conn, &src, &dir.path().join("sealed")))
        .await
        .expect("upload");
    assert!(!up.existed);
    let blobs = s3.objects("blobs/");
    assert_eq!(blobs.len(), 1, "one object per blob: {:?}", s3.files());
    assert!(
        s3.objects("uploads/").is_empty(),
        "staging deleted: {:?}",
        s3.files()
    );
    assert!(
        files_under(&data.join("blobs")).is_empty(),
        "no blob bytes on the relay's disk"
    );
    // Downloaded without an account; uploaded again, nothing moves.
    let (anon, _) = within(RelayConnection::connect(&relay.address))
        .await
        .expect("connect");
    let out = dir.path().join("out");
    let n = within(media::download(&anon, &pointer, &out))
        .await
        .expect("download");
    assert_eq!(n, plain.len() as u64);
    assert_eq!(digest(&out), digest(&src));
    let again = within(media::resume_upload(
        &alice.conn,
        &pointer,
        &dir.path().join("sealed"),
    ))
    .await
    .expect("again");
    assert!(again.existed && again.sent == 0);
}
