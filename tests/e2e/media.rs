//! Encrypted media end to end: real QUIC, sled and blob files on disk. The relay runs
//! in-process here so a test can read its received-bytes counter and move its clock.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tern_client::media::{self, AttachmentPointer};
use tern_client::net::RelayConnection;
use tern_client::ErrorCode;
use tern_platform::clock::{Clock, ManualClock, SystemClock};
use tern_relay::config::Config;
use tern_relay::Relay;

use crate::support::digest;
use crate::support::{files_under, register, within};

/// Resumes an upload once the relay has settled the stream cut before (until then
/// it answers `RATE_LIMITED`).
pub(crate) async fn resume_once_settled(
    conn: &RelayConnection,
    pointer: &AttachmentPointer,
    sealed: &Path,
) -> tern_client::Result<tern_client::net::Uploaded> {
    loop {
        match media::resume_upload(conn, pointer, sealed).await {
            Err(e) if e.relay_code() == Some(ErrorCode::RateLimited) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// A relay on the system clock whose blobs live a day.
async fn day_relay(dir: &Path) -> Relay {
    relay(dir, Arc::new(SystemClock), Duration::from_secs(86_400)).await
}

async fn relay(dir: &Path, clock: Arc<dyn Clock>, ttl: Duration) -> Relay {
    let mut config = Config {
        data_dir: dir.to_owned(),
        listen: "127.0.0.1:0".parse().expect("address"),
        ..Config::default()
    };
    config.media.blob_ttl = ttl;
    config.expiry.sweep_interval = Duration::from_millis(50);
    Relay::start(&config, clock).await.expect("relay")
}

/// A file of `len` bytes with `marker` at its start.
fn plain_file(dir: &Path, name: &str, len: usize, marker: &[u8]) -> PathBuf {
    let mut bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
    let n = marker.len().min(len);
    bytes[..n].copy_from_slice(&marker[..n]);
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write");
    path
}

/// A new file `in{i}` of `len` bytes, uploaded by `conn` (sealed beside it as
/// `sealed{i}`).
async fn upload_new(
    conn: &RelayConnection,
    dir: &Path,
    i: usize,
    len: usize,
) -> (PathBuf, AttachmentPointer, tern_client::net::Uploaded) {
    let src = plain_file(dir, &format!("in{i}"), len, b"");
    let (pointer, up) = within_size(
        len,
        media::upload(conn, &src, &dir.join(format!("sealed{i}"))),
    )
    .await
    .expect("upload");
    (src, pointer, up)
}

/// [`within`], with a second more per MiB: a 50 MiB transfer streams through our own
/// unoptimised crates, and on a loaded machine that alone can take the whole step.
async fn within_size<F: std::future::Future>(len: usize, f: F) -> F::Output {
    let step = super::support::STEP + Duration::from_secs((len >> 20) as u64);
    tokio::time::timeout(step, f).await.expect("step timed out")
}

/// Downloads what `pointer` names to `out{i}` (carried as bytes, as in a message) and
/// checks it is `src` to the byte.
async fn download_checked(
    conn: &RelayConnection,
    pointer: &AttachmentPointer,
    src: &Path,
    dir: &Path,
    i: usize,
) {
    let carried = AttachmentPointer::from_bytes(&pointer.to_bytes()).expect("pointer");
    let out = dir.join(format!("out{i}"));
    assert_eq!(
        within_size(pointer.size as usize, media::download(conn, &carried, &out))
            .await
            .expect("download"),
        pointer.size
    );
    assert_eq!(digest(&out), digest(src), "{} bytes", pointer.size);
}

#[tokio::test]
async fn attachments_round_trip_at_the_edges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = day_relay(&dir.path().join("relay")).await;
    let alice = register(relay.address()).await;
    // Downloads need no account: a fresh connection that never authenticates.
    let (anon, _) = RelayConnection::connect(relay.address())
        .await
        .expect("connect");
    let segment = tern_client::crypto::attachment::SEGMENT;
    for (i, len) in [0, 1, segment, segment + 1, 50 << 20]
        .into_iter()
        .enumerate()
    {
        let (src, pointer, up) = upload_new(&alice.conn, dir.path(), i, len).await;
        assert_eq!((pointer.size, up.existed), (len as u64, false));
        download_checked(&anon, &pointer, &src, dir.path(), i).await;
    }
    relay.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_forwarded_attachment_is_stored_and_uploaded_once_along_a_chain_of_ten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay_dir = dir.path().join("relay");
    let relay = day_relay(&relay_dir).await;
    let mut users = Vec::new();
    for _ in 0..10 {
        users.push(register(relay.address()).await);
    }
    let src = plain_file(dir.path(), "photo", 3 << 20, b"");
    let (pointer, _) = within(media::upload(
        &users[0].conn,
        &src,
        &dir.path().join("sealed"),
    ))
    .await
    .expect("upload");
    // Each user receives the pointer (in a message), downloads, and forwards it on.
    let mut carried = pointer.to_bytes();
    for (i, user) in users.iter().enumerate().skip(1) {
        let pointer = AttachmentPointer::from_bytes(&carried).expect("pointer");
        let out = dir.path().join(format!("got{i}"));
        within(media::download(&user.conn, &pointer, &out))
            .await
            .expect("download");
        assert_eq!(digest(&out), digest(&src));
        within(media::forward(&user.conn, &pointer))
            .await
            .expect("forward");
        carried = pointer.to_bytes();
    }
    // Someone re-sending the same sealed file uploads nothing either.
    let again = within(media::resume_upload(
        &users[9].conn,
        &pointer,
        &dir.path().join("sealed"),
    ))
    .await
    .expect("upload again");
    assert!(again.existed && again.sent == 0);
    assert_eq!(
        files_under(&relay_dir.join("blobs")).len(),
        1,
        "one blob file"
    );
    assert_eq!(
        relay.blobs().received_bytes(),
        pointer.sealed_size,
        "uploaded once"
    );
    relay.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn files_in_one_padme_step_are_stored_at_one_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay_dir = dir.path().join("relay");
    let relay = day_relay(&relay_dir).await;
    let (alice, bob) = (
        register(relay.address()).await,
        register(relay.address()).await,
    );
    // 100,000 and 100,200 bytes both pad to 100,352 bytes (PADMÉ): the relay stores,
    // and reports, the same length for both.
    let mut pointers = Vec::new();
    for (i, len) in [100_000usize, 100_200].into_iter().enumerate() {
        let (src, pointer, _) = upload_new(&alice.conn, dir.path(), i, len).await;
        let status = within(bob.conn.blob_status(&pointer.blob_id))
            .await
            .expect("status")
            .expect("the relay has it");
        assert_eq!(status.size, pointer.sealed_size);
        pointers.push((src, pointer));
    }
    let stored: Vec<u64> = files_under(&relay_dir.join("blobs"))
        .iter()
        .map(|p| std::fs::metadata(p).expect("blob").len())
        .collect();
    let sealed = 8 + 100_352 + 2 * 16;
    assert_eq!(stored, vec![sealed, sealed], "two blobs, one length");
    // Bob forwards each (nothing moves) and downloads the exact bytes: the size comes
    // from the pointer, inside the message.
    for (i, (src, pointer)) in pointers.iter().enumerate() {
        assert_eq!(pointer.sealed_size, sealed);
        within(media::forward(&bob.conn, pointer))
            .await
            .expect("forward");
        download_checked(&bob.conn, pointer, src, dir.path(), i).await;
    }
    assert_eq!(
        relay.blobs().received_bytes(),
        2 * sealed,
        "each uploaded once"
    );
    relay.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_corrupt_upload_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay_dir = dir.path().join("relay");
    let relay = day_relay(&relay_dir).await;
    let alice = register(relay.address()).await;
    let claimed: [u8; 32] = Sha256::digest(b"the bytes I claim").into();
    let mut other = std::io::Cursor::new(b"different bytes!!".to_vec());
    let err = within(alice.conn.upload_blob(&claimed, 17, &mut other))
        .await
        .expect_err("refused");
    assert_eq!(err.relay_code(), Some(ErrorCode::BadRequest));
    assert!(within(alice.conn.blob_status(&claimed))
        .await
        .expect("status")
        .is_none());
    assert!(files_under(&relay_dir.join("blobs")).is_empty());
    assert!(files_under(&relay_dir.join("uploads")).is_empty());
    // Uploads need an account; downloads of what is not there are NOT_FOUND.
    let (anon, _) = RelayConnection::connect(relay.address())
        .await
        .expect("connect");
    let mut src = std::io::Cursor::new(b"x".to_vec());
    let err = within(anon.upload_blob(&[1; 32], 1, &mut src))
        .await
        .expect_err("no account");
    assert_eq!(err.relay_code(), Some(ErrorCode::Unauthorized));
    let err = within(anon.download_blob(&[1; 32], 0, &mut Vec::new()))
        .await
        .expect_err("absent");
    assert_eq!(err.relay_code(), Some(ErrorCode::NotFound));
    relay.shutdown().await.expect("shutdown");
}

/// Yields the first `stop` bytes of a file, then fails: a connection cut mid-upload.
pub(crate) struct Interrupted {
    pub(crate) inner: std::io::Cursor<Vec<u8>>,
    pub(crate) stop: u64,
}

impl tokio::io::AsyncRead for Interrupted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let pos = self.inner.position();
        if pos >= self.stop {
            return std::task::Poll::Ready(Err(std::io::Error::other("cut")));
        }
        let n = usize::try_from(self.stop - pos)
            .unwrap_or(usize::MAX)
            .min(buf.remaining());
        let mut tmp = vec![0u8; n];
        let got = std::io::Read::read(&mut self.inner, &mut tmp)?;
        buf.put_slice(&tmp[..got]);
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncSeek for Interrupted {
    fn start_seek(
        mut self: std::pin::Pin<&mut Self>,
        pos: std::io::SeekFrom,
    ) -> std::io::Result<()> {
        std::io::Seek::seek(&mut self.inner, pos).map(|_| ())
    }
    fn poll_complete(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<u64>> {
        std::task::Poll::Ready(Ok(self.inner.position()))
    }
}

#[tokio::test]
async fn an_interrupted_upload_resumes_and_sends_each_byte_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = day_relay(&dir.path().join("relay")).await;
    let alice = register(relay.address()).await;
    let src = plain_file(dir.path(), "video", 4 << 20, b"");
    let sealed = dir.path().join("sealed");
    let pointer = media::encrypt_file(&src, &sealed).await.expect("encrypt");
    let bytes = std::fs::read(&sealed).expect("read");
    let mut cut = Interrupted {
        inner: std::io::Cursor::new(bytes),
        stop: 1 << 20,
    };
    within(
        alice
            .conn
            .upload_blob(&pointer.blob_id, pointer.sealed_size, &mut cut),
    )
    .await
    .expect_err("cut off");
    // The relay settles what reached it; the retry then picks up from there.
    let uploaded = within(resume_once_settled(&alice.conn, &pointer, &sealed))
        .await
        .expect("resume");
    assert!(!uploaded.existed);
    assert!(
        uploaded.sent < pointer.sealed_size,
        "resumed, not restarted"
    );
    assert_eq!(
        relay.blobs().received_bytes(),
        pointer.sealed_size,
        "each byte once"
    );
    let out = dir.path().join("out");
    within(media::download(&alice.conn, &pointer, &out))
        .await
        .expect("download");
    assert_eq!(digest(&out), digest(&src));
    relay.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn expiry_deletes_blobs_and_a_forward_moves_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay_dir = dir.path().join("relay");
    let clock = Arc::new(ManualClock::starting_now());
    let hour = Duration::from_secs(3600);
    let relay = relay(&relay_dir, clock.clone(), hour).await;
    let alice = register(relay.address()).await;
    let kept_src = plain_file(dir.path(), "kept", 1000, b"");
    let gone_src = plain_file(dir.path(), "gone", 2000, b"");
    let (kept, _) = media::upload(&alice.conn, &kept_src, &dir.path().join("s1"))
        .await
        .expect("up");
    let (gone, _) = media::upload(&alice.conn, &gone_src, &dir.path().join("s2"))
        .await
        .expect("up");
    clock.advance(Duration::from_secs(40 * 60));
    media::forward(&alice.conn, &kept).await.expect("forward");
    clock.advance(Duration::from_secs(30 * 60));
    // The sweeper runs every 50 ms: the unforwarded blob's file and record go.
    within(async {
        loop {
            if files_under(&relay_dir.join("blobs")).len() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(alice
        .conn
        .blob_status(&gone.blob_id)
        .await
        .expect("status")
        .is_none());
    assert!(alice
        .conn
        .blob_status(&kept.blob_id)
        .await
        .expect("status")
        .is_some());
    let err = media::forward(&alice.conn, &gone)
        .await
        .expect_err("expired");
    assert_eq!(err.relay_code(), Some(ErrorCode::NotFound));
    relay.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn the_relay_disk_holds_no_attachment_plaintext() {
    const MARKER: &[u8] = b"TERN-ATTACHMENT-MARKER-91b3";
    let dir = tempfile::tempdir().expect("tempdir");
    let relay_dir = dir.path().join("relay");
    let relay = day_relay(&relay_dir).await;
    let alice = register(relay.address()).await;
    // The marker at the start and again at a segment boundary.
    let src = plain_file(dir.path(), "secret", 200_000, MARKER);
    let mut bytes = std::fs::read(&src).expect("read");
    let at = tern_client::crypto::attachment::SEGMENT;
    bytes[at..at + MARKER.len()].copy_from_slice(MARKER);
    std::fs::write(&src, &bytes).expect("write");
    media::upload(&alice.conn, &src, &dir.path().join("sealed"))
        .await
        .expect("upload");
    relay.shutdown().await.expect("shutdown");
    let found = files_under(&relay_dir)
        .into_iter()
        .filter(|f| {
            let data = std::fs::read(f).expect("read");
            data.windows(MARKER.len()).any(|w| w == MARKER)
        })
        .collect::<Vec<_>>();
    assert!(found.is_empty(), "marker found in {found:?}");
    assert_eq!(
        files_under(&relay_dir.join("blobs")).len(),
        1,
        "the blob is there"
    );
}

#[tokio::test]
async fn an_interrupted_download_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = day_relay(&dir.path().join("relay")).await;
    let alice = register(relay.address()).await;
    let src = plain_file(dir.path(), "doc", 1 << 20, b"");
    let sealed = dir.path().join("sealed");
    let (pointer, _) = media::upload(&alice.conn, &src, &sealed)
        .await
        .expect("upload");
    // A first download stopped five segments in: those are on disk, authenticated,
    // with the blob's header beside them.
    let out = dir.path().join("out");
    let sealed_bytes = std::fs::read(&sealed).expect("read");
    let plain = std::fs::read(&src).expect("read");
    let segment = tern_client::crypto::attachment::SEGMENT;
    std::fs::write(dir.path().join("out.part"), &plain[..5 * segment + 100]).expect("write");
    // The resume record: header, blob id, and the whole segments vouched for.
    let record = |segments: u64| {
        [
            &sealed_bytes[..8],
            &pointer.blob_id[..],
            &segments.to_be_bytes(),
        ]
        .concat()
    };
    let saved_header = record(5);
    std::fs::write(dir.path().join("out.part-header"), &saved_header).expect("write");
    let (anon, _) = RelayConnection::connect(relay.address())
        .await
        .expect("connect");
    within(media::download(&anon, &pointer, &out))
        .await
        .expect("resumed");
    assert_eq!(digest(&out), digest(&src));
    assert!(
        !dir.path().join("out.part").exists(),
        "the partial file became the file"
    );
    assert!(!dir.path().join("out.part-header").exists());
    // After a crash the file may hold more (possibly torn) than the record vouches
    // for: only the recorded segments are kept.
    let torn = dir.path().join("torn");
    let mut garbage = plain[..3 * segment].to_vec();
    garbage[2 * segment + 10] ^= 0xff;
    std::fs::write(dir.path().join("torn.part"), &garbage).expect("write");
    std::fs::write(dir.path().join("torn.part-header"), record(2)).expect("write");
    within(media::download(&anon, &pointer, &torn))
        .await
        .expect("resumed");
    assert_eq!(digest(&torn), digest(&src));
    // Plaintext on disk that the record vouches for but that changed since (a disk
    // fault, a meddling app) is caught by the plaintext digest, and removed.
    let changed = dir.path().join("changed");
    let mut bad = plain[..3 * segment].to_vec();
    bad[segment + 5] ^= 1;
    std::fs::write(dir.path().join("changed.part"), &bad).expect("write");
    std::fs::write(dir.path().join("changed.part-header"), record(3)).expect("write");
    let err = within(media::download(&anon, &pointer, &changed))
        .await
        .expect_err("digest mismatch");
    assert!(err.to_string().contains("digest"), "{err}");
    assert!(!changed.exists() && !dir.path().join("changed.part").exists());
    // Cut off inside the first segment: resumes from just after the header.
    let early = dir.path().join("early");
    std::fs::write(dir.path().join("early.part"), &plain[..100]).expect("write");
    std::fs::write(dir.path().join("early.part-header"), record(0)).expect("write");
    within(media::download(&anon, &pointer, &early))
        .await
        .expect("resumed early");
    assert_eq!(digest(&early), digest(&src));
    // A resume state that does not fit the blob fails its checks and is removed.
    let out2 = dir.path().join("out2");
    std::fs::write(dir.path().join("out2.part"), &plain[..2 * segment]).expect("write");
    let mut header = record(2);
    header[3] ^= 1;
    std::fs::write(dir.path().join("out2.part-header"), &header).expect("write");
    assert!(within(media::download(&anon, &pointer, &out2))
        .await
        .is_err());
    assert!(!out2.exists() && !dir.path().join("out2.part").exists());
    relay.shutdown().await.expect("shutdown");
}
