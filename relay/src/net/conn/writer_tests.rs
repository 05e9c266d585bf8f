//! The connection's writer over a real QUIC connection on loopback.

#![allow(clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tern_proto::v1;
use tokio::sync::mpsc;

use super::{write_frames, Frame, Out};

/// A server and a client connected on loopback; the client's stream receive window is
/// `window` bytes, so a larger write waits for the client to read.
async fn pair(window: u32) -> (quinn::Endpoint, quinn::Connection, quinn::Connection) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let cert = made.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
    let server_config =
        quinn::ServerConfig::with_single_cert(vec![cert.clone()], key).expect("server config");
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().expect("addr"))
        .expect("server");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let mut client_config =
        quinn::ClientConfig::with_root_certificates(Arc::new(roots)).expect("client config");
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(window.into());
    client_config.transport_config(Arc::new(transport));
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    client.set_default_client_config(client_config);
    let to = server.local_addr().expect("server address");
    let (accepted, connected) = tokio::join!(
        async {
            server
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("accept")
        },
        async {
            client
                .connect(to, "localhost")
                .expect("connect")
                .await
                .expect("handshake")
        },
    );
    (server, accepted, connected)
}

fn delivery(size: usize) -> Frame {
    Box::new(v1::ServerFrame {
        body: Some(v1::server_frame::Body::Delivery(v1::Delivery {
            payload: vec![7; size].into(),
            ..Default::default()
        })),
    })
}

/// An answer handed to the writer while a write waits for a client that does not
/// read, when the client then stops the stream: the answer still runs to its end
/// (its commit's wake-ups happen), though no one will read it.
#[tokio::test]
async fn answers_queued_when_the_stream_breaks_still_run() {
    let (_server, accepted, connected) = pair(1024).await;
    let mut send = accepted.open_uni().await.expect("open");
    send.write_all(b"\0").await.expect("announce the stream");
    let mut recv = connected.accept_uni().await.expect("accept the stream");
    let (tx, rx) = mpsc::channel(8);
    let writer = tokio::spawn(write_frames(send, rx));
    tx.send(Out::Frame(delivery(64 * 1024)))
        .await
        .expect("a frame past the client's window");
    // The writer takes the frame and waits in its write before the answer comes, so
    // the answer stays in the channel.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    tx.send(Out::Later(Box::pin(async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        flag.store(true, Ordering::SeqCst);
        delivery(1)
    })))
    .await
    .expect("an answer");
    recv.stop(0u32.into()).expect("stop");
    tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the writer ends when the stream breaks")
        .expect("the writer");
    for _ in 0..500 {
        if ran.load(Ordering::SeqCst) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the answer queued when the stream broke never ran");
}
