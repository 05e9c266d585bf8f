//! Blob bytes in an S3-compatible object store: a real relay process configured with
//! `[objects]` against a real `s3s-fs` server.

use std::path::Path;

use tern_client::media;
use tern_client::net::RelayConnection;
use tern_relay::testing::TestS3;

use crate::support::digest;
use crate::support::{files_under, register, within, RelayProcess};

/// A relay process keeping its blob bytes in `s3` (with `extra` keys of `[objects]`),
/// its data directory `relay` in `dir`.
fn relay_on(s3: &TestS3, dir: &Path, extra: &str) -> RelayProcess {
    let config = dir.join("relay.toml");
    std::fs::write(&config, s3.objects_toml() + extra).expect("config");
    RelayProcess::start_with_env(
        &dir.join("relay"),
        "127.0.0.1:0",
        &["--config", config.to_str().expect("utf-8")],
        &s3.key_env(),
    )
    .expect("relay")
}

#[tokio::test]
async fn an_attachment_goes_to_the_object_store_and_comes_back() {
    let s3 = TestS3::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("relay");
    let relay = relay_on(&s3, dir.path(), "");
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

/// A relay told to stop while its object store hangs (every request unanswered, as
/// with a stalled server) exits within its shutdown grace, not after the hanging
/// calls' deadline: the upload waiting on the store is abandoned (the client
/// resumes it later) rather than waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stops_while_its_object_store_hangs() {
    let s3 = TestS3::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // Each call may wait a minute for the store.
    let mut relay = relay_on(&s3, dir.path(), "timeout = \"60s\"\n");
    let alice = register(&relay.address).await;
    let src = dir.path().join("photo");
    std::fs::write(&src, vec![7u8; 1 << 20]).expect("write");
    let pointer = media::encrypt_file(&src, &dir.path().join("sealed"))
        .await
        .expect("encrypt");
    s3.freeze();
    let sealed = dir.path().join("sealed");
    let upload =
        tokio::spawn(async move { media::resume_upload(&alice.conn, &pointer, &sealed).await });
    // The upload's first call to the store is out, and hangs.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(
        !upload.is_finished(),
        "the upload waits on the frozen store"
    );
    let began = std::time::Instant::now();
    let status = tokio::task::block_in_place(|| relay.stop()).expect("the relay stops");
    let took = began.elapsed();
    s3.thaw();
    assert!(status.success(), "a clean exit: {status}");
    // The connections' drain (5 s at most) and the blocking work's 2 s, not a minute.
    assert!(
        took < std::time::Duration::from_secs(12),
        "stopped in {took:?}, as if it had waited for the store's deadline"
    );
    upload.abort();
}
