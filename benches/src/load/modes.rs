//! The run modes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt, TryStreamExt};
use rand::RngCore;
use tern_client::net::{Envelope, Inbox, Incoming, RelayConnection};
use tern_proto::MessageId;

use super::peer::{Link, Peer};
use super::pg::PgProbe;
use super::relay::{own_peak_rss_kib, switches_since, RelayUnderTest};
use super::{now_ms, percentiles, LoadError, Report};

/// `online` settings.
#[derive(Debug, Clone)]
pub struct OnlineArgs {
    /// Sender/recipient pairs.
    pub pairs: usize,
    /// Messages in all.
    pub messages: u64,
    /// Application bytes per message (at least 16).
    pub size: usize,
    /// Messages per second in all; 0 for as fast as the senders go.
    pub rate: f64,
    /// Send requests in flight per sender.
    pub inflight: usize,
    /// Every envelope sealed before the clock starts; recipients check each delivery
    /// against what was sent (bytes, order) and acknowledge it without opening it.
    pub presealed: bool,
}

/// Where an `online` run goes: the node every sender connects to, the node every
/// recipient connects to (the same relay, or a second node of its cluster), and the
/// database under them, for its costs per message.
pub struct OnlineNodes<'a> {
    /// Senders connect here (and every device registers here).
    pub sending: &'a RelayUnderTest,
    /// Recipients connect here.
    pub receiving: &'a RelayUnderTest,
    /// The PostgreSQL database the nodes use, when they use one.
    pub pg: Option<&'a PgProbe>,
}

/// `offline` settings.
#[derive(Debug, Clone)]
pub struct OfflineArgs {
    /// Recipients, each with its own sender.
    pub recipients: usize,
    /// Messages in all.
    pub messages: u64,
    /// Application bytes per message (at least 16).
    pub size: usize,
    /// Envelopes per send request.
    pub batch: usize,
    /// Send requests in flight per sender.
    pub inflight: usize,
}

/// `media` settings.
#[derive(Debug, Clone)]
pub struct MediaArgs {
    /// Attachment bytes.
    pub size: u64,
}

/// `connections` settings.
#[derive(Debug, Clone)]
pub struct ConnectionsArgs {
    /// Idle authenticated connections to hold.
    pub count: usize,
}

/// A message body: its index and the send time (ns since `start`), then filler.
fn body(index: u64, start: Instant, sent_at: Instant, size: usize) -> Vec<u8> {
    let mut b = vec![0x5a; size.max(16)];
    b[..8].copy_from_slice(&index.to_be_bytes());
    let ns = u64::try_from(sent_at.saturating_duration_since(start).as_nanos()).unwrap_or(u64::MAX);
    b[8..16].copy_from_slice(&ns.to_be_bytes());
    b
}

fn parse_body(b: &[u8]) -> Result<(u64, u64), LoadError> {
    let index = u64::from_be_bytes(b.get(..8).ok_or("short body")?.try_into()?);
    let ns = u64::from_be_bytes(b.get(8..16).ok_or("short body")?.try_into()?);
    Ok((index, ns))
}

pub(super) fn message_id() -> MessageId {
    let mut id = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut id);
    MessageId(id)
}

/// Splits `total` over `n` as evenly as possible.
pub(super) fn share(total: u64, n: usize, i: usize) -> u64 {
    let n = n as u64;
    total / n + u64::from((i as u64) < total % n)
}

/// Prints progress on stderr about once a second until `done` reaches `total`.
pub(super) fn progress(
    label: &'static str,
    done: Arc<AtomicU64>,
    total: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let n = done.load(Ordering::Relaxed);
            eprintln!(
                "  {label}: {n}/{total} ({:.0}/s)",
                n as f64 / start.elapsed().as_secs_f64()
            );
            if n >= total {
                return;
            }
        }
    })
}

/// Drained payloads kept for checking after the drain, copied into memory touched
/// before the clock starts. Holding each received buffer instead had the load
/// generator fault in fresh memory through the whole drain (a third of its CPU on the
/// VM the benchmarks run on), which is the harness's cost, not the relay's.
struct Kept {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Kept {
    /// Room for `n` payloads of `bytes` in all, every page of it written once.
    fn touched(bytes: usize, n: usize) -> Self {
        let mut b = vec![1u8; bytes];
        b.clear();
        Kept {
            bytes: b,
            ends: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, payload: &[u8]) {
        self.bytes.extend_from_slice(payload);
        self.ends.push(self.bytes.len());
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(a, b)| &self.bytes[a..b])
    }
}

pub(super) struct Pair {
    pub(super) link: Link,
    /// Unauthenticated: sealed sends carry no sender.
    pub(super) anon: RelayConnection,
    pub(super) recipient: Peer,
}

pub(super) async fn pairs(relay: &RelayUnderTest, n: usize) -> Result<Vec<Pair>, LoadError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (conn, _) = RelayConnection::connect(&relay.address).await?;
        let recipient = Peer::register(&conn, 4).await?;
        conn.close().await;
        let (conn, _) = RelayConnection::connect(&relay.address).await?;
        let sender = Peer::register(&conn, 0).await?;
        let link = sender.link(&conn, &recipient).await?;
        conn.close().await;
        let (anon, _) = RelayConnection::connect(&relay.address).await?;
        out.push(Pair {
            link,
            anon,
            recipient,
        });
    }
    Ok(out)
}

/// The relay's CPU time and context switches at the start of a measured phase.
pub(super) struct RelayBefore {
    cpu_s: f64,
    switches: Option<HashMap<u32, u64>>,
}

impl RelayBefore {
    pub(super) fn now(relay: &RelayUnderTest) -> Self {
        RelayBefore {
            cpu_s: relay.cpu_seconds().unwrap_or(0.0),
            switches: relay.context_switches(),
        }
    }
}

/// The relay's CPU time, memory and context switches since `before`; per message
/// too, for `messages` handled.
pub(super) fn relay_stats(
    relay: &RelayUnderTest,
    before: &RelayBefore,
    messages: u64,
    report: &mut Report,
) {
    report.relay_cpu_s = relay.cpu_seconds().map_or(0.0, |c| c - before.cpu_s);
    report.relay_peak_rss_kib = relay.rss_kib().map_or(0, |(_, peak)| peak);
    report.client_peak_rss_kib = own_peak_rss_kib().unwrap_or(0);
    if messages == 0 {
        return;
    }
    let per = |x: f64| x / messages as f64;
    if report.relay_cpu_s > 0.0 {
        let us = per(report.relay_cpu_s * 1e6);
        report.extra.insert("relay_cpu_us_per_msg".into(), us);
    }
    if let (Some(start), Some(end)) = (&before.switches, relay.context_switches()) {
        let switches = per(switches_since(start, &end) as f64);
        report
            .extra
            .insert("relay_switches_per_msg".into(), switches);
    }
}

/// Receives deliveries until `want` arrived, acknowledging in batches; returns the
/// payloads in arrival order. A message id seen twice fails the run.
pub(super) async fn drain(
    conn: &RelayConnection,
    inbox: &mut Inbox,
    want: u64,
    done: &AtomicU64,
    mut on_payload: impl FnMut(&[u8]) -> Result<(), LoadError>,
) -> Result<(), LoadError> {
    let mut ids = HashSet::with_capacity(usize::try_from(want).unwrap_or(0));
    let mut got = 0u64;
    let mut acks = Vec::new();
    let mut acks_in_flight = futures::stream::FuturesUnordered::new();
    let mut last_seq = 0;
    while got < want {
        let first = tokio::select! {
            // An answered ack lets the gathered ones go at once, even when no delivery
            // comes: the relay's window may be full of exactly the messages they ack.
            // (Checking only when a delivery arrives once deadlocked the drain.)
            Some(r) = acks_in_flight.next(), if !acks_in_flight.is_empty() => {
                r?;
                if !acks.is_empty() {
                    acks_in_flight.push(conn.ack(&acks));
                    acks.clear();
                }
                continue;
            }
            item = tokio::time::timeout(Duration::from_secs(30), inbox.recv()) => item,
        };
        let Ok(first) = first else {
            // Enough state to tell a relay that stopped pushing from one waiting for acks.
            let ping = tokio::time::timeout(Duration::from_secs(5), conn.ping()).await;
            return Err(format!(
                "stalled: {got} of {want} delivered (last seq {last_seq}); {} acks gathered, \
                 {} ack requests out; ping: {ping:?}",
                acks.len(),
                acks_in_flight.len(),
            )
            .into());
        };
        let mut next = Some(first.ok_or("connection closed")??);
        while let Some(item) = next {
            if let Incoming::Delivery(d) = item {
                if !ids.insert(d.message_id) {
                    return Err("a message was delivered twice".into());
                }
                on_payload(&d.payload)?;
                last_seq = d.seq;
                acks.push(d.seq);
                got += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            next = if acks.len() < 256 {
                inbox.try_recv().transpose()?
            } else {
                None
            };
        }
        // One acknowledgement in flight at a time, not waited for: deliveries keep
        // being handled, and acks gather into big batches (each costs the relay a
        // write) while one is out.
        if !acks.is_empty() && (acks_in_flight.is_empty() || acks.len() >= 1024) {
            acks_in_flight.push(conn.ack(&acks));
            acks.clear();
        }
    }
    if !acks.is_empty() {
        acks_in_flight.push(conn.ack(&acks));
    }
    while let Some(r) = acks_in_flight.next().await {
        r?;
    }
    Ok(())
}

/// `online`: every device connected; senders seal and send one message per request,
/// recipients open and decrypt as deliveries arrive.
pub async fn online(relay: &RelayUnderTest, args: &OnlineArgs) -> Result<Report, LoadError> {
    let nodes = OnlineNodes {
        sending: relay,
        receiving: relay,
        pg: None,
    };
    online_across(&nodes, args).await
}

/// `online` with senders on one node and recipients on another (or the same), and
/// the database's costs when `nodes.pg` is given.
pub async fn online_across(
    nodes: &OnlineNodes<'_>,
    args: &OnlineArgs,
) -> Result<Report, LoadError> {
    let relay = nodes.sending;
    let two = !std::ptr::eq(nodes.sending, nodes.receiving);
    let setup = pairs(relay, args.pairs).await?;
    // Every recipient is connected before the clock starts, so no sender begins
    // behind its schedule.
    let mut connected = Vec::with_capacity(setup.len());
    for pair in setup {
        let (conn, inbox, _) = pair.recipient.connect(&nodes.receiving.address).await?;
        connected.push((pair, conn, inbox));
    }
    // `--presealed`: every pair's envelopes, sealed on all cores before the clock.
    let mut sealed = Vec::with_capacity(connected.len());
    let seal_start = Instant::now();
    if args.presealed {
        eprintln!("  sealing {} messages", args.messages);
        let mut handles = Vec::new();
        for (i, (pair, conn, inbox)) in connected.into_iter().enumerate() {
            let (want, size) = (share(args.messages, args.pairs, i), args.size);
            handles.push(tokio::task::spawn_blocking(move || {
                let mut pair = pair;
                let envelopes = seal_ahead(&mut pair.link, want, size)?;
                Ok::<_, LoadError>(((pair, conn, inbox), Some(Arc::new(envelopes))))
            }));
        }
        for h in handles {
            sealed.push(h.await??);
        }
    } else {
        sealed.extend(connected.into_iter().map(|c| (c, None)));
    }
    let seal_s = seal_start.elapsed().as_secs_f64();
    let pg_before = match nodes.pg {
        Some(pg) => Some(pg.read().await?),
        None => None,
    };
    let relay_before = RelayBefore::now(relay);
    let receiving_before = RelayBefore::now(nodes.receiving);
    let start = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    // Set when a pair fails, so the other senders stop instead of running on.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Envelope payload bytes sent, for the mean envelope size.
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let ticker = progress("delivered", done.clone(), args.messages);
    let mut tasks = Vec::new();
    for (i, ((pair, conn, mut inbox), presealed)) in sealed.into_iter().enumerate() {
        let want = share(args.messages, args.pairs, i);
        // When each message was sent (or due), in ns since `start`: written by the
        // sender before the send, read by the recipient of a presealed message, whose
        // time is inside the seal.
        let sent_ns: Arc<Vec<AtomicU64>> = Arc::new(
            (0..if presealed.is_some() { want } else { 0 })
                .map(|_| AtomicU64::new(0))
                .collect(),
        );
        let Pair {
            mut link,
            anon,
            mut recipient,
        } = pair;
        let done = done.clone();
        let (expected, sent_at_ns) = (presealed.clone(), sent_ns.clone());
        let receiver = tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(want as usize);
            let mut next = 0u64;
            drain(&conn, &mut inbox, want, &done, |payload| {
                let (index, sent_ns) = match &expected {
                    // The bytes sent k-th and nothing else: exactly once and in order,
                    // without opening (every seal has a fresh ephemeral key).
                    Some(envelopes) => {
                        let k = usize::try_from(next)?;
                        if envelopes.get(k).map(|e| &e.payload[..]) != Some(payload) {
                            return Err(format!("delivery {next} is not envelope {next}").into());
                        }
                        (next, sent_at_ns[k].load(Ordering::Acquire))
                    }
                    None => {
                        let (_, plaintext) = recipient.open(payload, now_ms())?;
                        parse_body(&plaintext.body)?
                    }
                };
                if index != next {
                    return Err(format!("out of order: got {index}, expected {next}").into());
                }
                next += 1;
                let now_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                latencies.push(now_ns.saturating_sub(sent_ns) / 1000);
                Ok(())
            })
            .await?;
            conn.close().await;
            Ok::<_, LoadError>(latencies)
        });
        let (size, inflight) = (args.size, args.inflight.max(1));
        // Sends are paced on a thread of their own: tokio's timers tick in whole
        // milliseconds, which would release the pairs' sends in bursts. The pairs are
        // staggered so that together they send evenly, and a message's latency runs
        // from when it was due, so a sender that falls behind is not hidden
        // (coordinated omission).
        let schedule = (args.rate > 0.0).then(|| {
            let every = Duration::from_secs_f64(args.pairs as f64 / args.rate);
            (start + every.mul_f64(i as f64 / args.pairs as f64), every)
        });
        // Presealed and unpaced, the sender is a task like any other: a thread of its
        // own would cost a wake-up across threads per answer (the peers' load
        // generator sends from a task too). Paced, or sealing as it goes, it keeps a
        // thread: to sleep precisely, and not to hold a worker while it seals.
        let on_a_task = schedule.is_none() && presealed.is_some();
        let (stop, sent_bytes) = (stop.clone(), sent_bytes.clone());
        let send_all = async move {
            let (to, token) = (link.to, link.token);
            let mut pending = futures::stream::FuturesOrdered::new();
            for k in 0..want {
                if stop.load(Ordering::Relaxed) {
                    return Err("another pair failed".into());
                }
                let sent_at = match schedule {
                    Some((first, every)) => {
                        let due = first + every.mul_f64(k as f64);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        due
                    }
                    None => Instant::now(),
                };
                let envelope = match &presealed {
                    Some(envelopes) => {
                        let k = usize::try_from(k)?;
                        let ns = sent_at.saturating_duration_since(start).as_nanos();
                        sent_ns[k].store(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::Release);
                        envelopes
                            .get(k)
                            .ok_or("fewer envelopes than messages")?
                            .clone()
                    }
                    None => Envelope {
                        message_id: message_id(),
                        payload: link.seal(&body(k, start, sent_at, size), now_ms())?.into(),
                    },
                };
                sent_bytes.fetch_add(envelope.payload.len() as u64, Ordering::Relaxed);
                pending.push_back(anon.sealed_send(&to, &token, [envelope]));
                while pending.len() >= inflight {
                    if let Some(r) = pending.next().await {
                        r?;
                    }
                }
            }
            while let Some(r) = pending.next().await {
                r?;
            }
            anon.close().await;
            Ok::<_, LoadError>(())
        };
        let sender = if on_a_task {
            tokio::spawn(send_all)
        } else {
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || runtime.block_on(send_all))
        };
        tasks.push((sender, receiver));
    }
    let mut latencies = Vec::new();
    for (sender, receiver) in tasks {
        let pair = async { Ok::<_, LoadError>((sender.await??, receiver.await??)) }.await;
        match pair {
            Ok(((), l)) => latencies.extend(l),
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    ticker.abort();
    let (p50, p99, p999) = percentiles(&mut latencies);
    let max = latencies.iter().copied().max().unwrap_or(0);
    let mut report = Report {
        p50_us: p50,
        p99_us: p99,
        p999_us: p999,
        ..Report::rate("online", args.messages, args.size, elapsed)
    };
    report.extra.insert("max_us".into(), max as f64);
    report.extra.insert(
        "envelope_bytes".into(),
        sent_bytes.load(Ordering::Relaxed) as f64 / args.messages.max(1) as f64,
    );
    report.sealing = Some(sealing(args.presealed).into());
    if args.presealed {
        report
            .extra
            .insert("seal_msgs_per_sec".into(), args.messages as f64 / seal_s);
    }
    report.extra.insert("pairs".into(), args.pairs as f64);
    report.extra.insert("target_rate".into(), args.rate);
    report.extra.insert("elapsed_s".into(), elapsed);
    report
        .extra
        .insert("nodes".into(), if two { 2.0 } else { 1.0 });
    relay_stats(relay, &relay_before, args.messages, &mut report);
    if two {
        // Each node's own CPU, and the relays' together in the common fields.
        let mut b = Report::default();
        relay_stats(nodes.receiving, &receiving_before, args.messages, &mut b);
        let per_msg = |cpu_s: f64| cpu_s * 1e6 / args.messages.max(1) as f64;
        let extra = &mut report.extra;
        extra.insert("node_a_cpu_us_per_msg".into(), per_msg(report.relay_cpu_s));
        extra.insert("node_b_cpu_us_per_msg".into(), per_msg(b.relay_cpu_s));
        report.relay_cpu_s += b.relay_cpu_s;
        extra.insert("relay_cpu_us_per_msg".into(), per_msg(report.relay_cpu_s));
        report.relay_peak_rss_kib = report.relay_peak_rss_kib.max(b.relay_peak_rss_kib);
    }
    if let (Some(pg), Some(before)) = (nodes.pg, &pg_before) {
        report.extra.extend(pg.since(before, args.messages).await?);
    }
    Ok(report)
}

/// What a report's `sealing` says: whether the clock ran over the message crypto.
fn sealing(presealed: bool) -> &'static str {
    if presealed {
        "presealed"
    } else {
        "end-to-end"
    }
}

/// `want` envelopes sealed in `link`'s session, bodies numbered from 0.
fn seal_ahead(link: &mut Link, want: u64, size: usize) -> Result<Vec<Envelope>, LoadError> {
    let now = Instant::now();
    (0..want)
        .map(|k| {
            Ok(Envelope {
                message_id: message_id(),
                payload: link.seal(&body(k, now, now, size), now_ms())?.into(),
            })
        })
        .collect()
}

/// `offline`: enqueue everything while recipients are away, then drain.
pub async fn offline(relay: &RelayUnderTest, args: &OfflineArgs) -> Result<Report, LoadError> {
    let setup = pairs(relay, args.recipients).await?;

    // Encrypt ahead, so phase 1 measures the relay's accept rate.
    eprintln!("  encrypting {} messages", args.messages);
    let encrypt_start = Instant::now();
    let mut prepared = Vec::new();
    let mut handles = Vec::new();
    for (i, pair) in setup.into_iter().enumerate() {
        let want = share(args.messages, args.recipients, i);
        let size = args.size;
        handles.push(tokio::task::spawn_blocking(move || {
            let mut pair = pair;
            let envelopes = seal_ahead(&mut pair.link, want, size)?;
            Ok::<_, LoadError>((pair, envelopes))
        }));
    }
    for h in handles {
        prepared.push(h.await??);
    }
    let encrypt_s = encrypt_start.elapsed().as_secs_f64();

    // Phase 1: accept.
    let relay_before = RelayBefore::now(relay);
    let done = Arc::new(AtomicU64::new(0));
    let ticker = progress("accepted", done.clone(), args.messages);
    let accept_start = Instant::now();
    let mut senders = Vec::new();
    let mut recipients = Vec::new();
    let envelope_bytes = prepared
        .iter()
        .flat_map(|(_, envelopes)| envelopes.iter().map(|e| e.payload.len() as f64))
        .sum::<f64>()
        / args.messages.max(1) as f64;
    for (pair, envelopes) in prepared {
        let (batch, inflight, done) = (args.batch.max(1), args.inflight.max(1), done.clone());
        let (to, token, anon) = (pair.link.to, pair.link.token, pair.anon);
        let bytes = envelopes.iter().map(|e| e.payload.len()).sum::<usize>();
        recipients.push((pair.recipient, envelopes.len() as u64, bytes));
        senders.push(tokio::spawn(async move {
            let conn = &anon;
            let done = &done;
            let mut request_us = stream::iter(envelopes.chunks(batch).map(<[Envelope]>::to_vec))
                .map(|chunk| async move {
                    let n = chunk.len() as u64;
                    let t = Instant::now();
                    let accepted = conn.sealed_send(&to, &token, chunk).await?;
                    if u64::from(accepted) != n {
                        return Err::<u64, LoadError>(
                            format!("relay accepted {accepted} of {n}").into(),
                        );
                    }
                    done.fetch_add(n, Ordering::Relaxed);
                    Ok(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX))
                })
                .buffered(inflight)
                .try_collect::<Vec<u64>>()
                .await?;
            anon.close().await;
            request_us.shrink_to_fit();
            Ok::<_, LoadError>(request_us)
        }));
    }
    let mut request_us = Vec::new();
    for s in senders {
        request_us.extend(s.await??);
    }
    let accept_s = accept_start.elapsed().as_secs_f64();
    ticker.abort();

    // Phase 2: recipients come back and drain, acknowledging everything.
    let done = Arc::new(AtomicU64::new(0));
    let ticker = progress("drained", done.clone(), args.messages);
    // Memory for the payloads is touched before the clock starts (see `Kept`).
    let recipients: Vec<_> = recipients
        .into_iter()
        .map(|(recipient, want, bytes)| (recipient, want, Kept::touched(bytes, want as usize)))
        .collect();
    let drain_start = Instant::now();
    let mut drains = Vec::new();
    for (recipient, want, mut payloads) in recipients {
        let (relay_address, done) = (relay.address.clone(), done.clone());
        drains.push(tokio::spawn(async move {
            let (conn, mut inbox, queued) = recipient.connect(&relay_address).await?;
            if queued != want {
                return Err::<_, LoadError>(format!("relay held {queued} of {want}").into());
            }
            // Kept and opened after the drain.
            drain(&conn, &mut inbox, want, &done, |p| {
                payloads.push(p);
                Ok(())
            })
            .await?;
            conn.close().await;
            Ok((recipient, payloads))
        }));
    }
    let mut drained = Vec::new();
    for d in drains {
        drained.push(d.await??);
    }
    let drain_s = drain_start.elapsed().as_secs_f64();
    ticker.abort();
    let mut report = Report::rate("offline", args.messages, args.size, accept_s);
    report.sealing = Some(sealing(true).into());
    // Per message: its accept and its drain together.
    relay_stats(relay, &relay_before, args.messages, &mut report);

    // Phase 3: every message decrypts, once, in order.
    let decrypt_start = Instant::now();
    let mut checks = Vec::new();
    for (mut recipient, payloads) in drained {
        checks.push(tokio::task::spawn_blocking(move || {
            for (expected, payload) in payloads.iter().enumerate() {
                let (_, plaintext) = recipient.open(payload, now_ms())?;
                let (index, _) = parse_body(&plaintext.body)?;
                if index != expected as u64 {
                    return Err::<(), LoadError>(
                        format!("out of order: got {index}, expected {expected}").into(),
                    );
                }
            }
            Ok(())
        }));
    }
    for c in checks {
        c.await??;
    }
    let decrypt_s = decrypt_start.elapsed().as_secs_f64();

    let (p50, p99, p999) = percentiles(&mut request_us);
    report.p50_us = p50;
    report.p99_us = p99;
    report.p999_us = p999;
    let n = args.messages as f64;
    report
        .extra
        .insert("recipients".into(), args.recipients as f64);
    report.extra.insert("batch".into(), args.batch as f64);
    report.extra.insert("envelope_bytes".into(), envelope_bytes);
    report.extra.insert("accept_s".into(), accept_s);
    report.extra.insert("drain_s".into(), drain_s);
    report
        .extra
        .insert("drain_msgs_per_sec".into(), n / drain_s);
    report
        .extra
        .insert("encrypt_msgs_per_sec".into(), n / encrypt_s);
    report
        .extra
        .insert("decrypt_msgs_per_sec".into(), n / decrypt_s);
    Ok(report)
}

/// `connections`: idle authenticated connections; the relay's memory per connection.
pub async fn connections(
    relay: &RelayUnderTest,
    args: &ConnectionsArgs,
) -> Result<Report, LoadError> {
    use tern_client::identity::{DeviceKeyPair, IdentityKeyPair};
    let relay_before = RelayBefore::now(relay);
    let open_one = |address: tern_proto::RelayAddress| async move {
        let (conn, inbox) = RelayConnection::connect(&address).await?;
        conn.register(&IdentityKeyPair::generate(), &DeviceKeyPair::generate())
            .await?;
        Ok::<_, LoadError>((conn, inbox))
    };
    // A first connection and a pause: what every connection shares is already there.
    let first = open_one(relay.address.clone()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, _) = relay.rss_kib().unwrap_or((0, 0));
    let done = Arc::new(AtomicU64::new(1));
    let total = args.count as u64;
    let ticker = progress("connected", done.clone(), total);
    let start = Instant::now();
    let held: Vec<(RelayConnection, Inbox)> = stream::iter(1..args.count)
        .map(|_| {
            let (address, done) = (relay.address.clone(), done.clone());
            async move {
                let c = open_one(address).await?;
                done.fetch_add(1, Ordering::Relaxed);
                Ok::<_, LoadError>(c)
            }
        })
        .buffer_unordered(32)
        .try_collect()
        .await?;
    let connect_s = start.elapsed().as_secs_f64();
    ticker.abort();
    // Idle: let the relay settle, then check every connection still answers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, _) = relay.rss_kib().unwrap_or((0, 0));
    stream::iter(held.iter())
        .map(|(c, _)| c.ping())
        .buffer_unordered(64)
        .try_collect::<Vec<()>>()
        .await?;
    let mut report = Report {
        mode: "connections".into(),
        rss_per_conn_kib: Some(
            after.saturating_sub(before) as f64 / (args.count.max(2) - 1) as f64,
        ),
        ..Report::default()
    };
    relay_stats(relay, &relay_before, 0, &mut report);
    report.extra.insert("connections".into(), args.count as f64);
    report.extra.insert(
        "connect_per_sec".into(),
        (args.count - 1) as f64 / connect_s,
    );
    report
        .extra
        .insert("relay_rss_before_kib".into(), before as f64);
    report
        .extra
        .insert("relay_rss_after_kib".into(), after as f64);
    drop(held);
    drop(first);
    Ok(report)
}

/// `media`: one attachment encrypted, uploaded and downloaded (and decrypted and
/// verified) through the relay; MB/s each way and both sides' peak memory.
pub async fn media(relay: &RelayUnderTest, args: &MediaArgs) -> Result<Report, LoadError> {
    use std::io::Write;
    use tern_client::media;
    let dir = tempfile::tempdir()?;
    let plain = dir.path().join("attachment");
    {
        // Pseudo-random content, written in pieces: never all in memory.
        let mut file = std::io::BufWriter::new(std::fs::File::create(&plain)?);
        let mut rng = rand::rngs::OsRng;
        let mut piece = vec![0u8; 1 << 20];
        let mut left = args.size;
        while left > 0 {
            let n = usize::try_from(left.min(piece.len() as u64))?;
            rng.fill_bytes(&mut piece[..n]);
            file.write_all(&piece[..n])?;
            left -= n as u64;
        }
        file.flush()?;
    }
    let (conn, _inbox) = RelayConnection::connect(&relay.address).await?;
    let _me = Peer::register(&conn, 0).await?;
    let relay_before = RelayBefore::now(relay);
    eprintln!("  encrypting {} bytes", args.size);
    let sealed = dir.path().join("sealed");
    let t = Instant::now();
    let pointer = media::encrypt_file(&plain, &sealed).await?;
    let encrypt_s = t.elapsed().as_secs_f64();
    eprintln!("  uploading");
    let t = Instant::now();
    let up = media::resume_upload(&conn, &pointer, &sealed).await?;
    let upload_s = t.elapsed().as_secs_f64();
    if up.sent != pointer.sealed_size {
        return Err("the upload did not send every byte".into());
    }
    eprintln!("  downloading");
    let out = dir.path().join("downloaded");
    let t = Instant::now();
    let got = media::download(&conn, &pointer, &out).await?;
    let download_s = t.elapsed().as_secs_f64();
    if got != args.size {
        return Err("the download has another size".into());
    }
    conn.close().await;
    let mb = pointer.sealed_size as f64 / 1e6;
    let mut report = Report {
        mode: "media".into(),
        messages: 1,
        size: usize::try_from(args.size).unwrap_or(usize::MAX),
        ..Report::default()
    };
    relay_stats(relay, &relay_before, 0, &mut report);
    report.msgs_per_sec = 1.0 / (upload_s + download_s);
    report.mb_per_sec = 2.0 * mb / (upload_s + download_s);
    report
        .extra
        .insert("upload_mb_per_sec".into(), mb / upload_s);
    report
        .extra
        .insert("download_mb_per_sec".into(), mb / download_s);
    report.extra.insert(
        "encrypt_mb_per_sec".into(),
        args.size as f64 / 1e6 / encrypt_s,
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::Kept;

    #[test]
    fn kept_payloads_come_back_in_order_even_past_the_room_made() {
        let mut kept = Kept::touched(5, 2);
        for p in [&b"abc"[..], b"", b"defgh", b"i"] {
            kept.push(p);
        }
        let back: Vec<&[u8]> = kept.iter().collect();
        assert_eq!(back, [&b"abc"[..], b"", b"defgh", b"i"]);
    }
}
