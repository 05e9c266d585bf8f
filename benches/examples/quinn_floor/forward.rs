//! The floor under the relay's CPU per message at an everyday rate (issue 20, item 3):
//! the least a QUIC store-and-forward server does per message, with nothing of
//! Tern's (no frames to decode, no accounts, mailboxes, windows or wake-ups to
//! settle).
//!
//! Each pair has a sender and a recipient connection, one bidirectional stream each
//! (as a Tern client's control stream). A message goes as Tern's does: the sender
//! writes a length-prefixed envelope; the server writes it straight to the
//! recipient's stream (from the sender's connection task, no hand-off), and answers
//! the sender with 8 bytes; the recipient answers the server with 8 bytes (its ack).
//! That is the same four stream writes and datagrams per message as the relay's
//! send, answer, delivery and ack. With `--fsync` the server also appends every
//! envelope to a file and answers only once a flusher thread has written and
//! `fdatasync`ed it (one `pwrite` and one flush per batch of whatever arrived
//! meanwhile: a group commit without the relay's delay), as the relay answers a send
//! only once it is durable.
//!
//! Senders are paced and staggered as `tern-load online --rate` paces them (each on a
//! thread of its own, latency from when a message was due), or with `--rate 0` send
//! as fast as a window of unanswered sends allows (the peak). Prints one JSON line:
//! the rate reached, the server's CPU per message and context switches per message
//! over the run, and the latency from due (or sent) to received.
//!
//! ```sh
//! target/release/examples/quinn_floor forward --pairs 4 --messages 30000 --size 999 \
//!     --rate 3000 --fsync --pin relay=0,load=1
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use tern_benches::load::pin::{pin_this_thread, Pinning};
use tern_benches::load::relay::{process_cpu_seconds, process_switches, switches_since};
use tokio::sync::oneshot;

use super::{server_endpoint, spawn_server, stdin_closed, Error};

/// An envelope longer than this ends its connection (the server's only check).
const MAX_ENVELOPE: usize = 1 << 16;

/// `quinn_floor forward`'s options.
#[derive(Parser, Debug)]
#[command(name = "quinn_floor forward")]
struct Args {
    /// Sender and recipient pairs.
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// Messages in all.
    #[arg(long, default_value_t = 30_000)]
    messages: usize,
    /// Envelope bytes (999: a 513-byte body sealed by Tern, as `tern-load` reports
    /// `envelope_bytes`).
    #[arg(long, default_value_t = 999)]
    size: usize,
    /// Messages per second, all pairs together (0: as fast as the window allows).
    #[arg(long, default_value_t = 3000.0)]
    rate: f64,
    /// Unanswered sends per sender at most, when unpaced (`tern-load`'s default).
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// Answer a send only once it is written and flushed to a file.
    #[arg(long)]
    fsync: bool,
    /// `relay=<cpus>,load=<cpus>`: the server and this process on separate CPUs.
    #[arg(long)]
    pin: Option<String>,
}

/// Runs the server in a process of its own and measures it.
pub(crate) fn measure(args: impl Iterator<Item = String>) -> Result<(), Error> {
    let args = Args::try_parse_from(args)?;
    if args.pairs == 0 || args.messages < args.pairs || args.size < 8 || args.inflight == 0 {
        return Err("need pairs > 0, messages >= pairs, size >= 8, inflight > 0".into());
    }
    if args.size > MAX_ENVELOPE {
        return Err(format!("size at most {MAX_ENVELOPE}").into());
    }
    let pinning = match &args.pin {
        Some(p) => Pinning::parse(p)?,
        None => Pinning::default(),
    };
    if let Some(cpus) = &pinning.load {
        pin_this_thread(cpus)?;
    }
    let runtime = tokio::runtime::Runtime::new()?;
    // The client endpoint binds its socket on this runtime.
    let _runtime = runtime.enter();
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let mut server_args = vec!["serve-forward"];
    if args.fsync {
        server_args.push(log.to_str().ok_or("temp path not UTF-8")?);
    }
    let (mut server, target, endpoint) =
        spawn_server(&server_args, pinning.relay_list().as_deref())?;
    let result = runtime.block_on(run(&args, &pinning, server.id(), target, &endpoint));
    endpoint.close(0u32.into(), b"done");
    drop(server.stdin.take());
    server.wait()?;
    result
}

/// Connects every pair, sends, and prints the report.
async fn run(
    args: &Args,
    pinning: &Pinning,
    pid: u32,
    target: std::net::SocketAddr,
    endpoint: &quinn::Endpoint,
) -> Result<(), Error> {
    let per_pair = args.messages / args.pairs;
    let total = per_pair * args.pairs;
    let open = |role: u8, pair: u32| {
        let endpoint = endpoint.clone();
        async move {
            let conn = endpoint.connect(target, "localhost")?.await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            let mut head = [role, 0, 0, 0, 0];
            head[1..].copy_from_slice(&pair.to_le_bytes());
            send.write_all(&head).await?;
            let mut ready = [0u8; 1];
            recv.read_exact(&mut ready).await?;
            Ok::<_, Error>((conn, send, recv))
        }
    };
    let start = Instant::now();
    let mut recipients = Vec::new();
    let mut senders = Vec::new();
    for pair in 0..args.pairs {
        let pair = u32::try_from(pair)?;
        recipients.push(open(b'R', pair).await?);
        senders.push(open(b'S', pair).await?);
    }
    let cpu_before = process_cpu_seconds(pid).ok_or("server gone")?;
    let switches_before = process_switches(pid).ok_or("server gone")?;
    let began = Instant::now();
    let mut receiving = Vec::new();
    for (_conn, mut send, mut recv) in recipients {
        receiving.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_pair);
            let mut len = [0u8; 4];
            let mut envelope = vec![0u8; MAX_ENVELOPE];
            for k in 0..per_pair {
                recv.read_exact(&mut len).await?;
                let n = usize::try_from(u32::from_le_bytes(len))?;
                let envelope = envelope.get_mut(..n).ok_or("envelope too long")?;
                recv.read_exact(envelope).await?;
                let now = u64::try_from(start.elapsed().as_nanos())?;
                let due = u64::from_le_bytes(envelope.get(..8).ok_or("short")?.try_into()?);
                latencies.push(now.saturating_sub(due) / 1000);
                send.write_all(&(k as u64).to_le_bytes()).await?;
            }
            Ok::<_, Error>(latencies)
        }));
    }
    let mut sending = Vec::new();
    let every = (args.rate > 0.0).then(|| Duration::from_secs_f64(args.pairs as f64 / args.rate));
    for (i, (conn, mut send, mut recv)) in senders.into_iter().enumerate() {
        // Unpaced, a sender keeps `inflight` sends unanswered at most.
        let window = Arc::new(tokio::sync::Semaphore::new(args.inflight));
        // The answers, read beside the sends.
        let answered = window.clone();
        let answers = tokio::spawn(async move {
            let mut answer = [0u8; 8];
            for _ in 0..per_pair {
                recv.read_exact(&mut answer).await?;
                answered.add_permits(1);
            }
            Ok::<_, Error>(conn)
        });
        let mut frame = vec![7u8; 4 + args.size];
        frame[..4].copy_from_slice(&u32::try_from(args.size)?.to_le_bytes());
        let stamp = move |frame: &mut [u8], due: Instant| -> Result<(), Error> {
            let at = u64::try_from(due.saturating_duration_since(start).as_nanos())?;
            frame[4..12].copy_from_slice(&at.to_le_bytes());
            Ok(())
        };
        sending.push(match every {
            // Paced on a thread of its own (staggered, latency from when a message
            // was due), as `tern-load online --rate` paces.
            Some(every) => {
                let first = began + every.mul_f64(i as f64 / args.pairs as f64);
                tokio::task::spawn_blocking(move || {
                    let handle = tokio::runtime::Handle::current();
                    for k in 0..per_pair {
                        let due = first + every.mul_f64(k as f64);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        stamp(&mut frame, due)?;
                        handle.block_on(send.write_all(&frame))?;
                    }
                    Ok::<_, Error>((send, answers))
                })
            }
            // As fast as the window allows, from a task, as `tern-load online
            // --presealed --rate 0` sends.
            None => tokio::spawn(async move {
                for _ in 0..per_pair {
                    window.acquire().await?.forget();
                    stamp(&mut frame, Instant::now())?;
                    send.write_all(&frame).await?;
                }
                Ok::<_, Error>((send, answers))
            }),
        });
    }
    let mut open_streams = Vec::new();
    for sender in sending {
        let (send, answers) = sender.await??;
        open_streams.push((send, answers.await??));
    }
    let mut latencies = Vec::with_capacity(total);
    for r in receiving {
        latencies.extend(r.await??);
    }
    let elapsed = began.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds(pid).ok_or("server gone")? - cpu_before;
    let switches = switches_since(
        &switches_before,
        &process_switches(pid).ok_or("server gone")?,
    );
    drop(open_streams);
    let (p50, p99, p999) = tern_benches::load::percentiles(&mut latencies);
    println!(
        "{}",
        serde_json::json!({
            "mode": "quinn-floor-forward",
            "pairs": args.pairs,
            "messages": total,
            "envelope_bytes": args.size,
            "target_rate": args.rate,
            "msgs_per_sec": total as f64 / elapsed,
            "fsync": args.fsync,
            "pinning": pinning.describe(),
            "server_cpu_us_per_msg": cpu * 1e6 / total as f64,
            "server_switches_per_msg": switches as f64 / total as f64,
            "p50_us": p50,
            "p99_us": p99,
            "p999_us": p999,
        })
    );
    Ok(())
}

/// The server: prints its port and fingerprint, then forwards until its input closes;
/// with `log`, every envelope is appended there and flushed before it is answered.
pub(crate) async fn serve(log: Option<PathBuf>) -> Result<(), Error> {
    let (endpoint, _) = server_endpoint()?;
    let log = match log {
        Some(path) => Some(GroupLog::start(File::create(path)?)?),
        None => None,
    };
    let recipients: Recipients = Arc::default();
    let accept = async {
        while let Some(incoming) = endpoint.accept().await {
            let (recipients, log) = (recipients.clone(), log.clone());
            tokio::spawn(async move {
                // A connection that fails ends alone; the client sees it.
                let _ = connection(incoming, recipients, log).await;
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

/// Each pair's recipient stream, written to by its sender's connection task.
type Recipients = Arc<Mutex<HashMap<u32, Arc<tokio::sync::Mutex<quinn::SendStream>>>>>;

/// One connection: a role byte (`R` recipient, `S` sender) and a pair number, then a
/// ready byte back; a recipient's acks are read, a sender's envelopes forwarded.
async fn connection(
    incoming: quinn::Incoming,
    recipients: Recipients,
    log: Option<Arc<GroupLog>>,
) -> Result<(), Error> {
    let conn = incoming.await?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut head = [0u8; 5];
    recv.read_exact(&mut head).await?;
    let pair = u32::from_le_bytes(head[1..].try_into()?);
    if head[0] == b'R' {
        // Known before it hears it is ready, so its sender finds it.
        let send = Arc::new(tokio::sync::Mutex::new(send));
        recipients
            .lock()
            .map_err(|_| "poisoned")?
            .insert(pair, send.clone());
        send.lock().await.write_all(&[1]).await?;
        let mut ack = [0u8; 8];
        while recv.read_exact(&mut ack).await.is_ok() {}
        return Ok(());
    }
    let to = recipients
        .lock()
        .map_err(|_| "poisoned")?
        .get(&pair)
        .cloned()
        .ok_or("a sender before its recipient")?;
    send.write_all(&[1]).await?;
    // Under --fsync the answers wait for their flush in order, beside the reads (as
    // the relay's writer task holds them), so a send is not held up by the one before.
    let (answers, mut waiting) = tokio::sync::mpsc::channel::<(u64, oneshot::Receiver<()>)>(1024);
    let answering = async move {
        while let Some((seq, durable)) = waiting.recv().await {
            durable.await?;
            send.write_all(&seq.to_le_bytes()).await?;
        }
        Ok::<_, Error>(send)
    };
    let log = log.clone();
    let forwarding = async move {
        let mut frame = vec![0u8; 4 + MAX_ENVELOPE];
        let mut seq = 0u64;
        loop {
            if recv.read_exact(&mut frame[..4]).await.is_err() {
                return Ok::<_, Error>(());
            }
            let n = usize::try_from(u32::from_le_bytes(frame[..4].try_into()?))?;
            let frame = frame.get_mut(..4 + n).ok_or("envelope too long")?;
            recv.read_exact(&mut frame[4..]).await?;
            seq += 1;
            let durable = match &log {
                Some(log) => log.append(&frame[4..])?,
                None => {
                    let (done, durable) = oneshot::channel();
                    let _ = done.send(());
                    durable
                }
            };
            // Delivered at once, as the relay delivers at append; answered once durable.
            to.lock().await.write_all(frame).await?;
            answers.send((seq, durable)).await?;
        }
    };
    let (forwarded, answered) = tokio::join!(forwarding, answering);
    forwarded?;
    drop(answered?);
    Ok(())
}

/// An append-only file and a flusher thread: appends wait together, and each pass
/// writes all of them with one `pwrite` and one `fdatasync`.
struct GroupLog {
    pending: Mutex<Pending>,
    arrived: Condvar,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    waiting: Vec<oneshot::Sender<()>>,
}

impl GroupLog {
    fn start(file: File) -> Result<Arc<GroupLog>, Error> {
        let log = Arc::new(GroupLog {
            pending: Mutex::default(),
            arrived: Condvar::new(),
        });
        let flusher = log.clone();
        std::thread::Builder::new()
            .name("floor-flusher".into())
            .spawn(move || flusher.flush_forever(file))?;
        Ok(log)
    }

    /// Queues `bytes`; the receiver hears once they are on disk.
    fn append(&self, bytes: &[u8]) -> Result<oneshot::Receiver<()>, Error> {
        let (done, durable) = oneshot::channel();
        let mut pending = self.pending.lock().map_err(|_| "poisoned")?;
        pending.bytes.extend_from_slice(bytes);
        pending.waiting.push(done);
        drop(pending);
        self.arrived.notify_one();
        Ok(durable)
    }

    fn flush_forever(&self, file: File) {
        let mut at = 0u64;
        let mut batch = Pending::default();
        loop {
            {
                let Ok(mut pending) = self.pending.lock() else {
                    return;
                };
                while pending.waiting.is_empty() {
                    pending = match self.arrived.wait(pending) {
                        Ok(p) => p,
                        Err(_) => return,
                    };
                }
                std::mem::swap(&mut *pending, &mut batch);
            }
            // A failed write or flush answers nobody: the senders' answers never come.
            if file.write_all_at(&batch.bytes, at).is_err() || file.sync_data().is_err() {
                return;
            }
            at += batch.bytes.len() as u64;
            batch.bytes.clear();
            for done in batch.waiting.drain(..) {
                let _ = done.send(());
            }
        }
    }
}
