//! `restart`: how long a relay holding N queued messages takes to serve again after a
//! clean stop, and how much memory it holds then.
//!
//! The messages are opaque bytes sent as sealed envelopes (the relay never looks
//! inside one), so a run of ten million costs the relay's work, not the client's
//! crypto. After the restart every recipient authenticates and the relay must report
//! exactly what it was given: a restart that loses a message fails the run.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt, TryStreamExt};
use tern_client::net::{Envelope, RelayConnection};

use super::modes::{drain, message_id, pairs, progress, share};
use super::relay::{own_peak_rss_kib, RelaySettings, RelayUnderTest};
use super::{LoadError, Report};

/// `restart` settings.
#[derive(Debug, Clone)]
pub struct RestartArgs {
    /// Messages queued before the restart, in all.
    pub messages: u64,
    /// Recipients (each with its own sender).
    pub recipients: usize,
    /// Bytes per envelope (opaque; the relay stores them as they are).
    pub size: usize,
    /// Envelopes per send request.
    pub batch: usize,
    /// Send requests in flight per sender.
    pub inflight: usize,
    /// Recipients (the first ones) that drain and acknowledge all of theirs before the
    /// restart: with the others' messages between theirs in every segment, the restart
    /// then scans segments mostly made of removed records.
    pub drained: usize,
}

/// How long a clean stop may take before the run calls it a failure.
const STOP_TIMEOUT: Duration = Duration::from_secs(600);

/// `restart`: starts a relay with `settings` (whose `dir` must be set: both starts use
/// it), queues the messages, stops it with SIGTERM, starts it again and measures the
/// time until it prints its address and until it answers a `Ping` on a new connection,
/// and its memory then.
pub async fn restart(
    settings: &RelaySettings<'_>,
    args: &RestartArgs,
) -> Result<Report, LoadError> {
    let dir = settings
        .dir
        .ok_or("restart needs a directory kept across starts")?;
    let first_start = Instant::now();
    let mut relay = RelayUnderTest::spawn(settings)?;
    let first_start_s = first_start.elapsed().as_secs_f64();
    let setup = pairs(&relay, args.recipients).await?;

    let done = Arc::new(AtomicU64::new(0));
    let ticker = progress("queued", done.clone(), args.messages);
    let queue_start = Instant::now();
    let mut senders = Vec::new();
    let mut wants = Vec::new();
    let mut recipients = Vec::new();
    for (i, pair) in setup.into_iter().enumerate() {
        let want = share(args.messages, args.recipients, i);
        wants.push(want);
        recipients.push(pair.recipient);
        let (to, token, anon) = (pair.link.to, pair.link.token, pair.anon);
        let (batch, inflight, size, done) = (
            args.batch.max(1) as u64,
            args.inflight.max(1),
            args.size,
            done.clone(),
        );
        senders.push(tokio::spawn(async move {
            let conn = &anon;
            let done = &done;
            stream::iter((0..want).step_by(batch as usize))
                .map(|first| async move {
                    let n = batch.min(want - first);
                    let chunk: Vec<Envelope> = (first..first + n)
                        .map(|k| {
                            let mut payload = vec![0x5a; size.max(8)];
                            payload[..8].copy_from_slice(&k.to_be_bytes());
                            Envelope {
                                message_id: message_id(),
                                payload: payload.into(),
                            }
                        })
                        .collect();
                    let accepted = conn.sealed_send(&to, &token, chunk).await?;
                    if u64::from(accepted) != n {
                        return Err::<(), LoadError>(
                            format!("relay accepted {accepted} of {n}").into(),
                        );
                    }
                    done.fetch_add(n, Ordering::Relaxed);
                    Ok(())
                })
                .buffered(inflight)
                .try_collect::<Vec<()>>()
                .await?;
            anon.close().await;
            Ok::<_, LoadError>(())
        }));
    }
    for s in senders {
        s.await??;
    }
    let queue_s = queue_start.elapsed().as_secs_f64();
    ticker.abort();
    let (queued_rss, queued_peak) = relay.rss_kib().unwrap_or((0, 0));

    let drained = args.drained.min(recipients.len());
    let drained_total: u64 = wants[..drained].iter().sum();
    let done = Arc::new(AtomicU64::new(0));
    let ticker = progress("drained", done.clone(), drained_total);
    for (recipient, want) in recipients.iter().zip(&mut wants).take(drained) {
        let (conn, mut inbox, _) = recipient.connect(&relay.address).await?;
        drain(&conn, &mut inbox, *want, &done, |_| Ok(())).await?;
        conn.close().await;
        *want = 0;
    }
    ticker.abort();

    eprintln!("  stopping the relay (SIGTERM)");
    let stop_s = relay.terminate(STOP_TIMEOUT)?;
    let disk = allocated_bytes(&dir.join("data").join("mailboxes"))?;

    eprintln!("  starting it again on the same data");
    let start = Instant::now();
    let mut relay = RelayUnderTest::spawn(settings)?;
    let to_address_s = start.elapsed().as_secs_f64();
    let (conn, _inbox) = RelayConnection::connect(&relay.address).await?;
    conn.ping().await?;
    let to_ping_s = start.elapsed().as_secs_f64();
    let (rss, peak) = relay.rss_kib().unwrap_or((0, 0));
    let cpu_s = relay.cpu_seconds().unwrap_or(0.0);
    conn.close().await;

    // Nothing lost: every recipient's queue is what it was given.
    for (recipient, want) in recipients.iter().zip(&wants) {
        let (conn, _inbox, queued) = recipient.connect(&relay.address).await?;
        conn.close().await;
        if queued != *want {
            return Err(format!("after the restart the relay held {queued} of {want}").into());
        }
    }
    relay.stop();

    let mut report = Report::rate("restart", args.messages, args.size, queue_s);
    report.relay_cpu_s = cpu_s;
    report.relay_peak_rss_kib = peak;
    report.client_peak_rss_kib = own_peak_rss_kib().unwrap_or(0);
    let extra = [
        ("recipients", args.recipients as f64),
        ("drained_before_restart", drained_total as f64),
        ("first_start_s", first_start_s),
        ("queue_s", queue_s),
        ("queued_relay_rss_kib", queued_rss as f64),
        ("queued_relay_peak_rss_kib", queued_peak as f64),
        ("stop_s", stop_s),
        ("mailbox_disk_mib", disk as f64 / f64::from(1 << 20)),
        ("restart_to_address_s", to_address_s),
        ("restart_to_ping_s", to_ping_s),
        ("restart_relay_rss_kib", rss as f64),
    ];
    for (k, v) in extra {
        report.extra.insert(k.into(), v);
    }
    Ok(report)
}

/// Bytes the files directly in `dir` take on disk (punched holes excluded).
fn allocated_bytes(dir: &Path) -> Result<u64, LoadError> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            total += meta.blocks() * 512;
        }
    }
    Ok(total)
}
