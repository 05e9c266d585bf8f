//! Deadlines on a big blob's object-store calls: each request (a part, a window of a
//! read, a server-side copy scaled by its size) has its own, so a blob that takes
//! longer in all than one deadline still finishes, while a server that stops
//! answering fails the call in bounded time. The server is a real `s3s-fs` behind a
//! TCP relay that slows its answers down (or swallows them).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tern_platform::clock::ManualClock;

use super::tests::{id_of, pattern, read_all, ALICE};
use super::*;
use crate::store::MemoryStore;
use crate::testing::TestS3;

use crate::media::bytes::s3::TEST_PART as PART;
/// Bytes the slow relay passes on per pause.
const SLICE: usize = 64 << 10;

/// A TCP relay in front of `upstream` that passes the server's answers on at about
/// `SLICE` per `pause`, or not at all while `hung`.
struct SlowRelay {
    addr: SocketAddr,
    hung: Arc<AtomicBool>,
}

impl SlowRelay {
    fn start(upstream: SocketAddr, pause: Duration) -> SlowRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hung = Arc::new(AtomicBool::new(false));
        let h = hung.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    return;
                };
                let (mut c_in, mut s_out) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                });
                let (mut s_in, mut c_out, hung) = (server, client, h.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0; SLICE];
                    while let Ok(n) = s_in.read(&mut buf) {
                        if n == 0 || hung.load(Ordering::SeqCst) {
                            return;
                        }
                        std::thread::sleep(pause);
                        if c_out.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SlowRelay { addr, hung }
    }
}

fn store_on(
    s3: &TestS3,
    endpoint: String,
    timeout: Duration,
    index: Arc<MemoryStore>,
) -> BlobStore {
    let mut settings = S3Settings::for_test(s3, timeout);
    settings.endpoint = Some(endpoint);
    let bytes = S3Bytes::open(&settings).expect("client");
    BlobStore::with_bytes(
        Arc::new(bytes),
        index,
        Arc::new(ManualClock::new(1_800_000_000_000)),
        BlobLimits::default(),
        Arc::default(),
    )
    .expect("open")
}

#[test]
fn a_blob_slower_than_one_deadline_finishes_and_a_hung_server_fails_in_bounded_time() {
    let s3 = TestS3::start();
    let upstream: SocketAddr = s3
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .expect("endpoint");
    // About 6.4 MiB/s: the 20 MiB blob takes ~3 s to read back, each request far
    // less than the 1.5 s deadline.
    let slow = SlowRelay::start(upstream, Duration::from_millis(10));
    let timeout = Duration::from_millis(1500);
    let index = Arc::new(MemoryStore::new());
    // Node A uploads every part; node B, behind the slow relay, finishes: it saw
    // none of the bytes, so it hashes them by reading the object back.
    let a = store_on(&s3, s3.endpoint().to_owned(), timeout, index.clone());
    let b = store_on(&s3, format!("http://{}", slow.addr), timeout, index);
    let bytes = pattern(4 * PART);
    let id = id_of(&bytes);
    let Begin::Upload { offset: 0, running } =
        a.begin(&ALICE, &id, bytes.len() as u64).expect("begin")
    else {
        panic!("fresh")
    };
    for (i, piece) in bytes.chunks(1 << 20).enumerate() {
        a.append(&ALICE, &id, (i << 20) as u64, piece)
            .expect("append");
    }
    drop(running);
    let t = Instant::now();
    let meta = b
        .finish(&ALICE, &id)
        .expect("finished through the slow server");
    assert!(
        t.elapsed() > timeout,
        "slower than one deadline: {:?}",
        t.elapsed()
    );
    assert_eq!(meta.size, bytes.len() as u64);
    let mut r = a.open_read(&id, 0, 256 * 1024).expect("read");
    assert!(read_all(&mut r) == bytes);

    // A server that stops answering mid-download: the read fails within about one
    // deadline, not after the whole blob's.
    let mut r = b.open_read(&id, 0, 256 * 1024).expect("open");
    r.next_chunk().expect("first chunk");
    slow.hung.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let mut failed = false;
    for _ in 0..bytes.len() / (256 * 1024) {
        if r.next_chunk().is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "the hung server failed the read");
    assert!(
        t.elapsed() < 2 * timeout + Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
}
