//! Phone verification over one PostgreSQL database: two `Verification` services,
//! each on its own backend (a relay node), sharing sessions and tries; and what the
//! database holds after a start.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tern_platform::clock::ManualClock;
use tern_proto::{AccountId, Code, VerificationId, E164};

use super::testdb::{db, node};
use super::{PgBackend, PgOptions};
use crate::config::{DiscoveryConfig, VerificationConfig};
use crate::core::rate::AddressPrefix;
use crate::discovery::{Discovery, Oprf};
use crate::error::Error;
use crate::store::{MemoryStore, DAY_MS};
use crate::testing::TestPostgres;
use crate::verification::{
    SendFuture, Verification, VerificationError, VerificationSessions, Verifier,
};

const START: u64 = 20_000 * DAY_MS + 3_600_000;
const NUMBER: &str = "+15550100123";

/// Records the codes sent, by session, for every node.
#[derive(Default)]
struct Recording {
    codes: Mutex<HashMap<VerificationId, String>>,
}

impl Verifier for Recording {
    fn send_code<'a>(
        &'a self,
        _number: &'a E164,
        code: &'a Code,
        session: &'a VerificationId,
    ) -> SendFuture<'a> {
        Box::pin(async move {
            let mut codes = self.codes.lock().expect("lock");
            codes.insert(*session, code.as_str().into());
            Ok(())
        })
    }
}

/// Two relay nodes over one database, with one OPRF key file and one clock.
pub(super) struct Cluster {
    pub(super) a: Verification,
    pub(super) b: Verification,
    pub(super) backend_a: Arc<PgBackend>,
    sent: Arc<Recording>,
    pub(super) pg: TestPostgres,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

/// A node: its own backend, discovery service and verification service.
fn node_v(
    opts: &PgOptions,
    name: &str,
    dir: &std::path::Path,
    config: &VerificationConfig,
    sent: &Arc<Recording>,
    clock: &Arc<ManualClock>,
    limiter: bool,
) -> (Verification, Arc<PgBackend>) {
    let backend = Arc::new(node(opts, name));
    let oprf = Oprf::load_or_create(dir, &mut rand::rngs::OsRng).expect("key");
    let discovery = Discovery::new(
        oprf,
        backend.clone(),
        Arc::new(MemoryStore::new()),
        clock.clone(),
        &DiscoveryConfig::default(),
        dir.join(format!("discovery-{name}")),
    )
    .expect("discovery");
    let mut v = Verification::new(
        config,
        Some(sent.clone()),
        Arc::new(discovery),
        clock.clone(),
    )
    .with_sessions(backend.clone());
    if limiter {
        v = v.with_start_limiter(Arc::new(super::PgStartLimits::new(backend.clone(), config)));
    }
    (v, backend)
}

pub(super) fn cluster_with(config: &VerificationConfig, limiter: bool) -> Cluster {
    let (pg, opts) = db();
    let dir = tempfile::tempdir().expect("dir");
    let sent = Arc::new(Recording::default());
    let clock = Arc::new(ManualClock::new(START));
    let (a, backend_a) = node_v(&opts, "a", dir.path(), config, &sent, &clock, limiter);
    let (b, _) = node_v(&opts, "b", dir.path(), config, &sent, &clock, limiter);
    Cluster {
        a,
        b,
        backend_a,
        sent,
        pg,
        clock,
        _dir: dir,
    }
}

fn cluster() -> Cluster {
    cluster_with(&VerificationConfig::default(), false)
}

pub(super) fn account(n: u8) -> AccountId {
    AccountId([n; 16])
}

pub(super) fn number(s: &str) -> E164 {
    E164::parse(s).expect("E.164")
}

pub(super) fn prefix(last: u8) -> AddressPrefix {
    AddressPrefix::from(IpAddr::from([192, 0, 2, last]))
}

impl Cluster {
    fn code(&self, id: &VerificationId) -> Code {
        let codes = self.sent.codes.lock().expect("lock");
        Code::parse(codes.get(id).expect("sent")).expect("6 digits")
    }

    fn wrong(&self, id: &VerificationId) -> Code {
        let n: u32 = self.code(id).as_str().parse().expect("digits");
        Code::from_number((n + 1) % 1_000_000).expect("below 10^6")
    }
}

fn wrong_code(r: Result<bool, Error>) -> Option<u32> {
    match r {
        Err(Error::Verification(VerificationError::WrongCode { attempts_left })) => {
            Some(attempts_left)
        }
        Err(Error::Verification(VerificationError::NotFound)) => None,
        r => panic!("want WRONG_CODE or NOT_FOUND, got {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_started_on_a_checked_on_b() {
    let c = cluster();
    let (id, _) =
        c.a.start(&account(1), prefix(1), number(NUMBER))
            .await
            .expect("started on a");
    assert_eq!(
        c.b.pending(&account(1)).expect("pending").map(|p| p.1),
        Some(5)
    );
    let wrong = c.b.check(&account(1), &id, &c.wrong(&id), None).await;
    assert_eq!(wrong_code(wrong), Some(4));
    // Another account cannot use the session.
    let other = c.b.check(&account(2), &id, &c.code(&id), None).await;
    assert_eq!(wrong_code(other), None);
    let on = c.b.check(&account(1), &id, &c.code(&id), None).await;
    assert!(on.expect("verified on b"), "discoverable by default");
    let (want, _) =
        c.a.discovery()
            .oprf()
            .tag_of(NUMBER.as_bytes())
            .expect("tag");
    let found =
        c.a.discovery()
            .store()
            .of_account(&account(1))
            .expect("store");
    assert_eq!(found.map(|(t, _)| t), Some(want), "a sees b's attach");
    assert_eq!(c.a.open_sessions().expect("count"), 0);
    let again = c.a.check(&account(1), &id, &c.code(&id), None).await;
    assert_eq!(wrong_code(again), None, "a right code is taken once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_are_shared_across_nodes() {
    let c = cluster();
    let (id, _) = (c.a.start(&account(1), prefix(1), number(NUMBER)).await).expect("start");
    for (i, want) in [4, 3, 2].into_iter().enumerate() {
        let v = if i % 2 == 0 { &c.a } else { &c.b };
        let r = v.check(&account(1), &id, &c.wrong(&id), None).await;
        assert_eq!(wrong_code(r), Some(want));
    }
    // The last two tries, spent by ten wrong checks at once on both nodes: two
    // count, the rest find no session; none finds a try that was not there.
    let results: Vec<Option<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let v = if i % 2 == 0 { &c.a } else { &c.b };
                let code = c.wrong(&id);
                s.spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("rt");
                    wrong_code(rt.block_on(v.check(&account(1), &id, &code, None)))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("check"))
            .collect()
    });
    let mut counted: Vec<u32> = results.iter().flatten().copied().collect();
    counted.sort_unstable();
    assert_eq!(counted, vec![0, 1], "{results:?}");
    let right = c.b.check(&account(1), &id, &c.code(&id), None).await;
    assert_eq!(wrong_code(right), None, "out of tries: the session is gone");
    assert_eq!(c.a.open_sessions().expect("count"), 0);
    assert_eq!(
        c.a.discovery()
            .store()
            .of_account(&account(1))
            .expect("store"),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire_replace_and_end_with_the_account_on_every_node() {
    let c = cluster();
    let (first, _) = (c.a.start(&account(1), prefix(1), number(NUMBER)).await).expect("start");
    let (second, _) =
        (c.b.start(&account(1), prefix(1), number("+15550100124"))
            .await)
            .expect("a new start replaces the first");
    let r = c.a.check(&account(1), &first, &c.code(&first), None).await;
    assert_eq!(wrong_code(r), None, "replaced");
    assert_eq!(c.a.open_sessions().expect("count"), 1);
    c.b.start(&account(2), prefix(2), number("+15550100125"))
        .await
        .expect("start");
    c.a.forget_account(&account(2)).expect("forget");
    assert_eq!(c.b.pending(&account(2)).expect("pending"), None);
    // Expired: the sweep on either node ends it, once.
    let sessions: &dyn VerificationSessions = &*c.backend_a;
    assert_eq!(sessions.sweep(START + 600_000, 10).expect("sweep").len(), 1);
    assert_eq!(sessions.sweep(START + 600_000, 10).expect("sweep").len(), 0);
    let r =
        c.b.check(&account(1), &second, &c.code(&second), None)
            .await;
    assert_eq!(wrong_code(r), None);
}

/// Every text and bytea value in the database's tables, raw, and every row as text.
pub(super) fn dump(backend: &PgBackend) -> (Vec<Vec<u8>>, String) {
    backend
        .run(async {
            let c = backend.client().await?;
            let db = |e: tokio_postgres::Error| backend.classify(&e);
            let columns = c
                .query(
                    "SELECT table_name::text, column_name::text, data_type::text \
                     FROM information_schema.columns WHERE table_schema = 'public'",
                    &[],
                )
                .await
                .map_err(db)?;
            let (mut values, mut text) = (Vec::new(), String::new());
            let mut tables = Vec::new();
            for col in &columns {
                let (table, column, kind): (String, String, String) =
                    (col.get(0), col.get(1), col.get(2));
                if !tables.contains(&table) {
                    tables.push(table.clone());
                }
                let sql = format!("SELECT \"{column}\" FROM \"{table}\"");
                match kind.as_str() {
                    "bytea" => {
                        for r in c.query(&sql, &[]).await.map_err(db)? {
                            values.extend(r.get::<_, Option<Vec<u8>>>(0));
                        }
                    }
                    "text" | "character varying" => {
                        for r in c.query(&sql, &[]).await.map_err(db)? {
                            values.extend(r.get::<_, Option<String>>(0).map(String::into_bytes));
                        }
                    }
                    _ => {}
                }
            }
            for table in tables {
                let sql = format!("SELECT t::text FROM \"{table}\" t");
                for r in c.query(&sql, &[]).await.map_err(db)? {
                    text.push_str(&r.get::<_, String>(0));
                    text.push('\n');
                }
            }
            Ok((values, text))
        })
        .expect("dump")
}

/// Asserts the digits of `number` appear nowhere in the database nor its log.
pub(super) fn assert_number_absent(c: &Cluster, number: &str) {
    let digits = number.trim_start_matches('+');
    let hex: String = digits.bytes().map(|b| format!("{b:02x}")).collect();
    let (values, text) = dump(&c.backend_a);
    assert!(
        !values.is_empty() && text.contains("\\x"),
        "the dump saw rows"
    );
    for v in &values {
        assert!(
            !v.windows(digits.len()).any(|w| w == digits.as_bytes()),
            "the number's digits are in a stored value"
        );
    }
    for needle in [digits, hex.as_str()] {
        assert!(!text.contains(needle), "the number is in a row");
    }
    assert!(
        !c.pg.log_text().contains(digits),
        "the number is in the server log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_never_holds_the_number() {
    let c = cluster_with(&VerificationConfig::default(), true);
    let (id, _) = (c.a.start(&account(1), prefix(1), number(NUMBER)).await).expect("start");
    let wrong = c.b.check(&account(1), &id, &c.wrong(&id), None).await;
    assert_eq!(wrong_code(wrong), Some(4));
    let (values, _) = dump(&c.backend_a);
    assert!(
        values.len() >= 5,
        "session, pointer and rate rows: {}",
        values.len()
    );
    // The scan sees what is there: the session's tag.
    let (tag, _) =
        c.a.discovery()
            .oprf()
            .tag_of(NUMBER.as_bytes())
            .expect("tag");
    assert!(
        values.contains(&tag.0.to_vec()),
        "the scan sees bytea columns"
    );
    assert_number_absent(&c, NUMBER);
    c.b.check(&account(1), &id, &c.code(&id), None)
        .await
        .expect("verified");
    assert_number_absent(&c, NUMBER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn number_limit_is_cluster_wide() {
    // Three starts an hour per number (the default), counted over both nodes.
    let c = cluster_with(&VerificationConfig::default(), true);
    for (i, v) in [&c.a, &c.b, &c.a].into_iter().enumerate() {
        let n = u8::try_from(i).expect("small") + 1;
        v.start(&account(n), prefix(n), number(NUMBER))
            .await
            .expect("within the limit");
    }
    let refused = c.b.start(&account(4), prefix(4), number(NUMBER)).await;
    match refused {
        Err(Error::RateLimited { retry_after_ms }) => assert_eq!(retry_after_ms, 1_200_000),
        r => panic!("want RATE_LIMITED, got {r:?}"),
    }
    // Nothing was charged to account 4 or its prefix: another number goes through.
    for i in 0..5 {
        c.a.start(&account(4), prefix(4), number(&format!("+1555010019{i}")))
            .await
            .map(drop)
            .or_else(|e| match e {
                Error::RateLimited { .. } => Err(e),
                _ => Ok(()),
            })
            .expect("account 4 has its starts");
    }
    let sixth =
        c.b.start(&account(4), prefix(4), number("+15550100189"))
            .await;
    assert!(
        matches!(sixth, Err(Error::RateLimited { .. })),
        "five a day per account"
    );
    c.clock.advance(std::time::Duration::from_millis(1_200_000));
    c.b.start(&account(5), prefix(5), number(NUMBER))
        .await
        .expect("one start refilled");
    // A refilled bucket is swept; an account's is forgotten with it.
    c.a.forget_account(&account(4)).expect("forget");
    c.clock.advance(std::time::Duration::from_secs(86_400));
    c.b.sweep().expect("sweep");
    let (values, _) = dump(&c.backend_a);
    assert!(!values.contains(&account(4).as_bytes().to_vec()));
    let rows: i64 = c
        .backend_a
        .run(async {
            let cl = c.backend_a.client().await?;
            let r = cl
                .query_one("SELECT count(*) FROM rate_buckets", &[])
                .await
                .map_err(|e| c.backend_a.classify(&e))?;
            Ok(r.get(0))
        })
        .expect("count");
    assert_eq!(rows, 0, "every bucket refilled a day later");
}
