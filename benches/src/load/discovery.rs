//! `discovery`: contact discovery at scale. N discoverable accounts are seeded
//! offline into the relay's data directory (`tern_relay::discovery::seed`: the
//! book's users with the tags of their numbers, the rest with random tags, which
//! the relay cannot tell apart), then one verified account syncs a book of numbers
//! (a share of them users) exactly as `Client::discover` does, over one connection:
//! blind, evaluate (pipelined), download the filter, test it, look up the hits. A
//! run that does not find exactly the book's users fails.
//!
//! Reported: the relay's CPU per evaluated point (from /proc, around repeated
//! evaluations of the padded book), filter bytes per user, the delta at 1% churn
//! against the snapshot, the filter build time for N keys on one core (the same
//! code the relay's publication runs, measured in this process), and the request
//! and reply bytes of the sync's two round trips, evaluation and lookups (whole
//! frames, as encoded on the wire).

use std::time::{Duration, Instant};

use prost::Message;
use rand::{Rng, SeedableRng};
use tern_client::discovery::{blind, LocalFilter};
use tern_client::identity::{DeviceKeyPair, IdentityKeyPair};
use tern_client::net::RelayConnection;
use tern_proto::discovery::{
    DiscoveredAccount, FilterDelta, FilterKind, FilterPart, FilterSnapshot, Tag, MAX_LOOKUP_TAGS,
};
use tern_proto::{v1, ClientRequest, Reply, Request, ServerMessage};

use super::relay::{RelaySettings, RelayUnderTest};
use super::{LoadError, Report};

/// `discovery` settings.
#[derive(Debug, Clone)]
pub struct DiscoveryArgs {
    /// Discoverable accounts on the relay.
    pub users: usize,
    /// Numbers in the synced address book.
    pub book: usize,
    /// Share of the book that are users.
    pub hits: f64,
    /// Evaluations of the whole book repeated for the CPU figure.
    pub rounds: usize,
}

/// The book's i-th number: UK London numbers, valid for libphonenumber.
fn number(i: usize) -> String {
    format!("+4420{:08}", 70_000_000 + i)
}

fn request_bytes(request: Request) -> usize {
    v1::ClientFrame::from(ClientRequest { id: 1, request }).encoded_len()
}

fn reply_bytes(reply: Reply) -> usize {
    v1::ServerFrame::from(ServerMessage::Response {
        id: 1,
        result: Ok(reply),
    })
    .encoded_len()
}

/// `discovery`: see the module docs. `settings.dir` must be set (the seed and both
/// starts use it).
pub async fn discovery(
    settings: &RelaySettings<'_>,
    args: &DiscoveryArgs,
) -> Result<Report, LoadError> {
    let dir = settings.dir.ok_or("discovery needs a data directory")?;
    let hits = ((args.book as f64) * args.hits).round() as usize;
    if hits > args.users || args.book == 0 {
        return Err("the book holds more users than the relay has, or nothing".into());
    }
    // The syncing account registers over the wire (its keys are its own).
    let mut relay = RelayUnderTest::spawn(settings)?;
    let (identity, device) = (IdentityKeyPair::generate(), DeviceKeyPair::generate());
    let (conn, _inbox) = RelayConnection::connect(&relay.address).await?;
    let address = conn.register(&identity, &device).await?;
    conn.close().await;
    relay.terminate(Duration::from_secs(60))?;

    let config = tern_relay::config::Config {
        data_dir: dir.join("data"),
        ..tern_relay::config::Config::default()
    };
    let seeding = Instant::now();
    let fillers = args.users - hits;
    eprintln!("seeding {} discoverable accounts", args.users);
    let filler_numbers: Vec<String> = (0..fillers).map(|i| format!("+1555{i:07}")).collect();
    let user_numbers: Vec<String> = (0..hits).map(number).collect();
    for (numbers, seed) in [(&filler_numbers, 1), (&user_numbers, 2)] {
        let numbers: Vec<&str> = numbers.iter().map(String::as_str).collect();
        tern_relay::discovery::seed::synthetic_accounts(&config.data_dir, &numbers, seed)?;
    }
    tern_relay::discovery::seed::attach_numbers(
        &config.data_dir,
        &[(address.account, "+442079460000")],
    )?;
    let seed_s = seeding.elapsed().as_secs_f64();
    eprintln!("seeded in {seed_s:.1} s");

    let relay = RelayUnderTest::spawn(settings)?;
    let (conn, _inbox) = RelayConnection::connect(&relay.address).await?;
    conn.authenticate(&address, &device).await?;

    // The filter (the relay publishes it just after it starts listening).
    let mut first = None;
    for _ in 0..600 {
        match conn.discovery_filter(0, 0, 0).await {
            Ok(p) => {
                first = Some(p);
                break;
            }
            Err(e) if e.relay_code() == Some(tern_client::ErrorCode::Unavailable) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let first: FilterPart = first.ok_or("no filter published within a minute")?;
    let mut request_total = request_bytes(Request::DiscoveryFilter {
        since_day: 0,
        day: 0,
        part: 0,
    });
    let mut reply_total = reply_bytes(Reply::DiscoveryFilterPart(first.clone()));
    let mut snapshot = first.data.to_vec();
    for part in 1..first.parts {
        let p = conn.discovery_filter(0, first.day, part).await?;
        request_total += request_bytes(Request::DiscoveryFilter {
            since_day: 0,
            day: first.day,
            part,
        });
        reply_total += reply_bytes(Reply::DiscoveryFilterPart(p.clone()));
        snapshot.extend_from_slice(&p.data);
    }
    if first.kind != FilterKind::Snapshot {
        return Err("asked for a snapshot, got deltas".into());
    }
    let filter_bytes = snapshot.len();
    let filter = LocalFilter::new(FilterSnapshot::decode(&snapshot)?);
    let (filter_request, filter_reply) = (request_total, reply_total);

    // The sync: half the book users, half not.
    let book: Vec<String> = (0..hits)
        .map(number)
        .chain((0..args.book - hits).map(|i| number(5_000_000 + i)))
        .collect();
    let mut sync_request = 0;
    let mut sync_reply = 0;
    let cpu_before = relay.cpu_seconds();
    let evaluating = Instant::now();
    let mut outputs = Vec::new();
    let mut points = 0;
    for round in 0..args.rounds.max(1) {
        let chunks = blind(&book, &mut rand::rngs::OsRng)?;
        let replies: Vec<_> = chunks
            .iter()
            .map(|c| conn.discovery_evaluate(c.blinded.clone()))
            .collect();
        for (chunk, reply) in chunks.iter().zip(replies) {
            let evaluated = reply.await?;
            points += chunk.blinded.len() / 32;
            if round == 0 {
                sync_request += request_bytes(Request::DiscoveryEvaluate {
                    blinded: tern_proto::discovery::BlindedBatch::new(chunk.blinded.clone())?,
                });
                sync_reply += reply_bytes(Reply::DiscoveryEvaluated(evaluated.clone()));
                outputs.extend(chunk.finalize(&evaluated, 0)?);
            }
        }
    }
    let evaluate_s = evaluating.elapsed().as_secs_f64();
    let cpu = match (cpu_before, relay.cpu_seconds()) {
        (Some(a), Some(b)) => b - a,
        _ => f64::NAN,
    };
    let (evaluate_request, evaluate_reply) = (sync_request, sync_reply);
    let tags: Vec<Tag> = outputs
        .iter()
        .filter(|(_, o)| filter.contains(o.key))
        .map(|(_, o)| o.tag)
        .collect();
    let mut found: Vec<DiscoveredAccount> = Vec::new();
    let lookups: Vec<_> = tags
        .chunks(MAX_LOOKUP_TAGS)
        .map(|c| {
            sync_request += request_bytes(Request::DiscoveryLookup { tags: c.to_vec() });
            conn.discovery_lookup(c.to_vec())
        })
        .collect();
    for l in lookups {
        let answer = l.await?;
        sync_reply += reply_bytes(Reply::DiscoveryFound(answer.clone()));
        found.extend(answer);
    }
    if found.len() != hits {
        return Err(format!("found {} users of {hits} in the book", found.len()).into());
    }

    // Publication costs, in this process: the relay's code on N random keys.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let keys: Vec<u64> = (0..args.users).map(|_| rng.gen()).collect();
    let building = Instant::now();
    let built = FilterSnapshot::build(1, keys.clone())?;
    let encoded = built.encode();
    let build_s = building.elapsed().as_secs_f64();
    let churn = (args.users / 100).max(1);
    let mut old = keys.clone();
    old.sort_unstable();
    old.dedup();
    let mut new: Vec<u64> = old[churn..].to_vec();
    new.extend((0..churn).map(|_| rng.gen::<u64>()));
    new.sort_unstable();
    new.dedup();
    let delta = FilterDelta::between(1, &old, 2, &new).encoded_len();

    drop(conn);
    let mut report = Report {
        mode: "discovery".into(),
        messages: args.book as u64,
        relay_cpu_s: cpu,
        ..Report::default()
    };
    let e = &mut report.extra;
    e.insert("users".into(), args.users as f64);
    e.insert("book_hits".into(), hits as f64);
    e.insert("seed_s".into(), seed_s);
    e.insert("evaluated_points".into(), points as f64);
    e.insert("relay_cpu_us_per_point".into(), cpu * 1e6 / points as f64);
    e.insert(
        "evaluate_wall_us_per_point".into(),
        evaluate_s * 1e6 / points as f64,
    );
    e.insert("filter_bytes".into(), filter_bytes as f64);
    e.insert(
        "filter_bytes_per_user".into(),
        filter_bytes as f64 / args.users as f64,
    );
    e.insert(
        "filter_download_request_bytes".into(),
        filter_request as f64,
    );
    e.insert("filter_download_reply_bytes".into(), filter_reply as f64);
    e.insert("delta_bytes_1pct_churn".into(), delta as f64);
    e.insert(
        "delta_share_of_filter".into(),
        delta as f64 / encoded.len() as f64,
    );
    e.insert("filter_build_s".into(), build_s);
    e.insert("evaluate_request_bytes".into(), evaluate_request as f64);
    e.insert("evaluate_reply_bytes".into(), evaluate_reply as f64);
    e.insert(
        "lookup_request_bytes".into(),
        (sync_request - evaluate_request) as f64,
    );
    e.insert(
        "lookup_reply_bytes".into(),
        (sync_reply - evaluate_reply) as f64,
    );
    Ok(report)
}
