//! The floors under the relay's costs (issue 20): a bare quinn server with the relay's
//! transport settings and nothing of Tern's.
//!
//! **Memory per idle connection** (item 4, the default mode). Each client connection
//! opens one bidirectional stream, sends a request and reads the answer (as a
//! client's authentication does), then idles (each is asked once more after the
//! measurement, so none was lost); the server keeps the connection and the stream
//! open, one task each, as the relay keeps its control stream. Prints the server
//! process's resident memory per connection, to compare with `tern-load connections`
//! at the same count. `QUINN_FLOOR` (comma-separated) tries transport settings the
//! relay does not use: `no-datagrams`, `no-mtud` (no MTU discovery), `streams2` (2
//! concurrent streams, not 8), `small-send` (64 KiB send window).
//!
//! **CPU per forwarded message** (item 3, `forward`): the least a QUIC store and
//! forward server does per message, to compare with `tern-load online --presealed`
//! at the same rate (see `forward.rs`).
//!
//! ```sh
//! cargo run --release -p tern-benches --example quinn_floor -- 10000
//! QUINN_FLOOR=no-mtud,streams2 target/release/examples/quinn_floor 10000
//! target/release/examples/quinn_floor forward --rate 3000 --fsync --pin relay=0,load=1
//! ```

use std::io::BufRead;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::{stream, StreamExt, TryStreamExt};
use sha2::Digest;
use tern_proto::Fingerprint;

mod forward;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let first = args.next().unwrap_or_else(|| "10000".into());
    match first.as_str() {
        // Pins this thread before any runtime starts.
        "forward" => return forward::measure(std::env::args().skip(1)),
        "serve-forward" => {
            let log = args.next().map(std::path::PathBuf::from);
            return tokio::runtime::Runtime::new()?.block_on(forward::serve(log));
        }
        _ => {}
    }
    let runtime = tokio::runtime::Runtime::new()?;
    if first == "serve" {
        return runtime.block_on(serve());
    }
    let count: usize = first.parse()?;
    runtime.block_on(measure(count.max(2)))
}

/// A server endpoint on loopback with the relay's transport settings (and the
/// `QUINN_FLOOR` ones), and its certificate's fingerprint.
fn server_endpoint() -> Result<(quinn::Endpoint, Fingerprint), Error> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)?;
    tls.alpn_protocols = vec![tern_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // The relay's settings (relay/src/net/mod.rs `transport_config`, default windows).
    let mut t = quinn::TransportConfig::default();
    t.receive_window((512u32 * 1024).into());
    t.max_concurrent_bidi_streams(8u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Some(quinn::VarInt::from_u32(60_000).into()));
    for knob in std::env::var("QUINN_FLOOR").unwrap_or_default().split(',') {
        match knob {
            "no-datagrams" => {
                t.datagram_receive_buffer_size(None);
                t.datagram_send_buffer_size(0);
            }
            "no-mtud" => {
                t.mtu_discovery_config(None);
            }
            "streams2" => {
                t.max_concurrent_bidi_streams(2u32.into());
            }
            "small-send" => {
                t.send_window(64 * 1024);
            }
            "" => {}
            other => eprintln!("quinn_floor: unknown setting {other}, ignored"),
        }
    }
    config.transport_config(Arc::new(t));
    let endpoint = quinn::Endpoint::server(config, (Ipv4Addr::LOCALHOST, 0).into())?;
    let fingerprint: [u8; 32] = sha2::Sha256::digest(der.as_ref()).into();
    println!(
        "{} {}",
        endpoint.local_addr()?.port(),
        Fingerprint(fingerprint)
    );
    Ok((endpoint, Fingerprint(fingerprint)))
}

/// Waits until this process's input closes (its parent went or let it go).
async fn stdin_closed() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin()
            .read_line(&mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await;
}

/// The server: prints its port and its certificate's fingerprint, then serves until
/// its input closes.
async fn serve() -> Result<(), Error> {
    let (endpoint, _) = server_endpoint()?;
    let accept = async {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                // Each request answered, the stream held (idle) until the client goes;
                // after the first, the window is raised as authentication raises it.
                let mut request = [0u8; 64];
                while recv.read_exact(&mut request).await.is_ok() {
                    conn.set_receive_window((16u32 << 20).into());
                    if send.write_all(&request).await.is_err() {
                        return;
                    }
                }
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = stdin_closed() => {}
    }
    endpoint.close(0u32.into(), b"done");
    Ok(())
}

/// One request on a held stream, and its answer.
async fn ask(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream) -> Result<(), Error> {
    send.write_all(&[7u8; 64]).await?;
    let mut answer = [0u8; 64];
    recv.read_exact(&mut answer).await?;
    Ok(())
}

/// The server process's resident memory, KiB.
fn rss_kib(pid: u32) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
}

/// A server process of this example (`args`, under `taskset -c <cpus>` if given), its
/// address, and a client endpoint that trusts its certificate. The server runs until
/// its input is closed.
fn spawn_server(
    args: &[&str],
    cpus: Option<&str>,
) -> Result<(std::process::Child, SocketAddr, quinn::Endpoint), Error> {
    let exe = std::env::current_exe()?;
    let mut command = match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let mut server = command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut first = String::new();
    std::io::BufReader::new(server.stdout.take().ok_or("no stdout")?).read_line(&mut first)?;
    let (port, fingerprint) = first.trim().split_once(' ').ok_or("no port")?;
    let target: SocketAddr = (Ipv4Addr::LOCALHOST, port.parse()?).into();
    let fingerprint: Fingerprint = fingerprint.parse().map_err(|e| format!("{e:?}"))?;
    let (config, _) = tern_client::net::tls::client_config_pinned_to(&[fingerprint])?;
    let mut endpoint = quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into())?;
    endpoint.set_default_client_config(config);
    Ok((server, target, endpoint))
}

async fn measure(count: usize) -> Result<(), Error> {
    let (mut server, target, endpoint) = spawn_server(&["serve"], None)?;
    let pid = server.id();
    let open = |endpoint: quinn::Endpoint| async move {
        let conn = endpoint.connect(target, "localhost")?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        ask(&mut send, &mut recv).await?;
        Ok::<_, Error>((conn, send, recv))
    };
    // A first connection and a pause: what every connection shares is already there.
    let one = open(endpoint.clone()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid)?;
    let held: Vec<_> = stream::iter(1..count)
        .map(|_| open(endpoint.clone()))
        .buffer_unordered(32)
        .try_collect()
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    // Every connection still answers (none was dropped while idle).
    let mut held = held;
    stream::iter(held.iter_mut())
        .map(|(_, send, recv)| ask(send, recv))
        .buffer_unordered(64)
        .try_collect::<Vec<()>>()
        .await?;
    let per = after.saturating_sub(before) as f64 / (count - 1) as f64;
    println!(
        "{{\"connections\": {count}, \"server_rss_before_kib\": {before}, \
         \"server_rss_after_kib\": {after}, \"rss_per_conn_kib\": {per:.1}}}"
    );
    drop(held);
    drop(one);
    endpoint.close(0u32.into(), b"done");
    drop(server.stdin.take());
    server.wait()?;
    Ok(())
}
