//! The shared backend (#15): every store in one PostgreSQL database, so any number of
//! relay nodes can serve the same accounts (ARCHITECTURE.md "Beyond one machine").
//!
//! The store traits are synchronous and the relay calls them from its runtime's
//! workers: the pool's connections run on a small runtime of the backend's own
//! (`tern-pg`), or on the multi-thread runtime [`PgOptions::runtime`] names, and
//! every call waits on them through [`PgBackend::run`] with a deadline: a
//! database that is down or slow makes a call fail as [`StoreError::Unavailable`] in
//! bounded time, never hang a worker.
//!
//! - `migrate`: versioned schema migrations under an advisory lock.
//! - `lease`: leases on database time, so one node runs each sweep.
//! - `cluster`: the facts every node must share (certificate, signing key).
//! - `accounts`, `keys`, `blobs`: accounts and devices, prekeys, the blob index
//!   (`rows`: what they share).
//! - `provisioning`: the slots that carry a linked device's sealed payload.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;

use super::{Durability, StoreError, StoreResult};

mod bodies;
pub mod cluster;
mod discovery;
mod groups;
pub mod lease;
mod mailboxes;
pub mod migrate;
mod published;
pub mod writer;

// Package B1: accounts, keys, the blob index.
mod accounts;
mod blobs;
pub mod import;
mod keys;
mod outage;
mod rows;

// Issue 16: provisioning slots (device lists and removals are in `accounts`).
mod provisioning;

// Issue 19: push targets.
mod push;

// Package B2: discovery, verification sessions, start limits.
pub mod rates;
mod verification;

pub(crate) use mailboxes::from_db;
pub use rates::PgStartLimits;

/// The longest a start waits for the schema's migrations (its own or another node's).
const MIGRATION_DEADLINE: Duration = Duration::from_secs(600);

/// How to reach the database (from `[postgres]`).
#[derive(Clone)]
pub struct PgOptions {
    /// libpq keywords or a URL; several hosts are tried in order.
    pub url: String,
    /// The password, when kept apart from the URL.
    pub password: Option<Vec<u8>>,
    /// Pool size.
    pub pool_size: usize,
    /// Connect (and pool wait) deadline.
    pub connect_timeout: Duration,
    /// Per-statement deadline.
    pub statement_timeout: Duration,
    /// PEM roots for TLS; TLS is required when set.
    pub ca_file: Option<PathBuf>,
    /// This node's name.
    pub node_id: String,
    /// `Fsync`: a commit returns once durable (`synchronous_commit = on`, and on a
    /// synchronous standby too when the primary names one). `Os`: once written.
    pub durability: Durability,
    /// Mailboxes take messages only for accounts with an `accounts` row (the relay);
    /// off for the mailbox store on its own (its conformance tests).
    pub require_accounts: bool,
    /// The multi-thread runtime to run the connections and the node's background
    /// work on: the relay's own, so that a database answer wakes the task waiting for
    /// it on the same threads (a runtime of its own costs a cross-thread wake-up each
    /// way, and two more threads on the cores). It must outlive the backend, the
    /// backend's async calls are awaited on it, and its blocking pool should have room
    /// for the waits the relay bounds (1,024 threads, as `tern-relay serve` builds it).
    /// `None` (or a current-thread runtime): the backend starts one of its own.
    pub runtime: Option<tokio::runtime::Handle>,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("node_id", &self.node_id)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

impl PgOptions {
    /// Options with the defaults of `[postgres]` for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        PgOptions {
            url: url.into(),
            password: None,
            pool_size: 16,
            connect_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(2),
            ca_file: None,
            node_id: default_node_id(),
            durability: Durability::Fsync,
            require_accounts: true,
            runtime: None,
        }
    }
}

/// The host name and a random suffix: unique per start, readable in `nodes`.
pub fn default_node_id() -> String {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect::<String>();
    format!("{host}-{:08x}", rand::random::<u32>())
}

/// Every store on one PostgreSQL database.
pub struct PgBackend {
    // `None` only while dropping (a runtime may not be dropped on a runtime thread).
    runtime: Option<Runtime>,
    pool: Pool,
    /// Whether commits wait for the WAL flush (`durability = "fsync"`).
    durable: bool,
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    deadline: Duration,
    /// Each statement's limit (the sessions' `statement_timeout`).
    statement_timeout: Duration,
    // When a call last got no answer at all (a database that hangs).
    hung: Hung,
    node_id: String,
    // See `incarnation()`.
    incarnation: String,
    hosts: String,
    require_accounts: bool,
    /// One warning per outage (see `outage.rs`).
    outage: outage::Outage,
    /// A permit per blocking call waiting on the relay's runtime (see [`BLOCKED_MAX`]).
    blocked: tokio::sync::Semaphore,
    // The mailbox writer and totals cache, started once the schema is in place.
    mail: Option<mailboxes::MailState>,
}

/// Where the backend's connections and tasks run (see [`PgOptions::runtime`]).
enum Runtime {
    Own(tokio::runtime::Runtime),
    Shared(tokio::runtime::Handle),
}

/// Blocking calls ([`PgBackend::run`]) waiting at once on the relay's runtime, at most.
/// Each holds a thread of that runtime's blocking pool (`tern-relay serve` gives it
/// 1,024, room for these, the waits for mailboxes' ordering locks and exports), directly or
/// as the thread a worker handed its core to: were the pool full, a worker entering
/// `block_in_place` could not hand its core on, and with every core so stuck nothing
/// would drive the connections or the deadlines, and the node would never recover
/// (a database that hangs under load). Past this a call fails at once, `Unavailable`.
const BLOCKED_MAX: usize = 256;

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackend")
            .field("node_id", &self.node_id)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl PgBackend {
    /// Connects, applies the migrations this binary has (once, whichever node gets
    /// there first), and returns the backend. A database that cannot be reached is
    /// [`StoreError::Unavailable`] naming its hosts (never the password).
    pub fn open(opts: &PgOptions) -> StoreResult<PgBackend> {
        let mut config: tokio_postgres::Config = opts
            .url
            .parse()
            .map_err(|e| StoreError::Backend(format!("postgres.url does not parse: {e}")))?;
        if let Some(password) = &opts.password {
            config.password(password);
        }
        let hosts = describe_hosts(&config);
        config.connect_timeout(opts.connect_timeout);
        config.application_name("tern-relay");
        let commit = match opts.durability {
            Durability::Fsync => "on",
            Durability::Os => "off",
        };
        // Session settings ride in the start-up packet: no round trip per connection.
        config.options(format!(
            "-c synchronous_commit={commit} -c statement_timeout={} \
             -c idle_in_transaction_session_timeout={}",
            opts.statement_timeout.as_millis(),
            opts.statement_timeout.as_millis().saturating_mul(5),
        ));
        let tls = match &opts.ca_file {
            Some(path) => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(tls_connector(path)?)
            }
            None => None,
        };
        let runtime = match &opts.runtime {
            Some(handle)
                if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread =>
            {
                Runtime::Shared(handle.clone())
            }
            _ => Runtime::Own(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("tern-pg")
                    .enable_all()
                    .build()
                    .map_err(|e| StoreError::Backend(format!("database runtime: {e}")))?,
            ),
        };
        let pool = build_pool(&config, &tls, opts.pool_size)?;
        let mut backend = PgBackend {
            runtime: Some(runtime),
            pool,
            durable: opts.durability == Durability::Fsync,
            config,
            tls,
            deadline: opts.connect_timeout + opts.statement_timeout,
            statement_timeout: opts.statement_timeout,
            hung: Hung::new(opts.connect_timeout + opts.statement_timeout),
            node_id: opts.node_id.clone(),
            incarnation: format!("{}#{:016x}", opts.node_id, rand::random::<u64>()),
            hosts,
            require_accounts: opts.require_accounts,
            outage: outage::Outage::default(),
            blocked: tokio::sync::Semaphore::new(BLOCKED_MAX),
            mail: None,
        };
        // A migration (and the wait for another node's) may take long: neither the
        // statement timeout nor the call deadline applies to it.
        backend.run_within(MIGRATION_DEADLINE, async {
            let mut client = backend.client().await?;
            client
                .batch_execute("SET statement_timeout = 0")
                .await
                .map_err(|e| backend.classify(&e))?;
            let migrated = migrate::migrate(&mut client).await;
            // Its session has no statement timeout now: never back to the pool.
            drop(deadpool_postgres::Object::take(client));
            migrated
                .map_err(|e| match e {
                    migrate::MigrateError::Database(e) => backend.classify(&e),
                    migrate::MigrateError::Migration(e) => {
                        StoreError::Backend(format!("PostgreSQL migration failed: {e}"))
                    }
                })
                .map(drop)
        })?;
        backend.mail = Some(mailboxes::MailState::start(&backend)?);
        Ok(backend)
    }

    /// A pool of `size` connections whose sessions commit without waiting for the
    /// WAL flush (the writer's batches, made durable by a barrier before they are
    /// answered), planned as `plans` says. Each connection takes a seq epoch as it
    /// connects ([`take_epoch`]).
    fn lazy_commit_pool(&self, size: usize, plans: writer::Plans) -> StoreResult<Pool> {
        let mut config = self.config.clone();
        let options = config.get_options().unwrap_or_default().to_owned();
        let plans = plans.options();
        config.options(format!("{options} -c synchronous_commit=off{plans}"));
        let take_epoch = deadpool_postgres::Hook::async_fn(|client, _| {
            Box::pin(async move {
                take_epoch(client)
                    .await
                    .map_err(deadpool_postgres::HookError::Backend)
            })
        });
        build_pool_with(&config, &self.tls, size, Some(take_epoch))
    }

    /// This node's name.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// This process's name in the rows it holds (its device claims, leases and
    /// heartbeat): the node id and a random 64-bit number drawn at start,
    /// `<node id>#<16 hex digits>`. A process started under the same node id (a
    /// replacement, while this one stops) thus never takes over, renews or deletes
    /// what this one holds, nor this one its.
    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }

    /// The database's hosts, for messages (`host:port`, or socket directories).
    pub fn hosts(&self) -> &str {
        &self.hosts
    }

    /// Runs `fut` on the database runtime and waits for it, at most the deadline
    /// (connect plus statement timeout). Callable from anywhere: a plain thread, a
    /// blocking task, a multi-thread runtime's worker (which it hands over to the
    /// runtime's other tasks while it waits), or a current-thread runtime (through a
    /// scoped thread, as that runtime cannot lend its only worker).
    pub fn run<T, F>(&self, fut: F) -> StoreResult<T>
    where
        F: Future<Output = StoreResult<T>> + Send,
        T: Send,
    {
        self.run_within(self.deadline, fut)
    }

    /// [`PgBackend::run`] with another deadline (migrations).
    pub fn run_within<T, F>(&self, deadline: Duration, fut: F) -> StoreResult<T>
    where
        F: Future<Output = StoreResult<T>> + Send,
        T: Send,
    {
        let handle = self.handle()?;
        let _slot = match self.runtime {
            Some(Runtime::Shared(_)) => match self.blocked.try_acquire() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let full = Err(StoreError::Unavailable(format!(
                        "PostgreSQL at {}: all {BLOCKED_MAX} calls it may wait for are waiting",
                        self.hosts
                    )));
                    self.outage.observe(&full);
                    return full;
                }
            },
            _ => None,
        };
        let bounded = self.bounded(deadline, fut);
        let result = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Err(_) => handle.block_on(bounded),
            Ok(tokio::runtime::RuntimeFlavor::CurrentThread) => std::thread::scope(|s| {
                s.spawn(|| handle.block_on(bounded))
                    .join()
                    .unwrap_or_else(|_| Err(StoreError::Backend("database call panicked".into())))
            }),
            Ok(_) => tokio::task::block_in_place(|| handle.block_on(bounded)),
        };
        self.outage.observe(&result);
        result
    }

    /// [`PgBackend::run_within`] for async callers (the cluster's tasks): `fut` runs
    /// as a task on the database runtime, awaited from any runtime.
    pub async fn call_within<T, F>(self: &Arc<Self>, deadline: Duration, fut: F) -> StoreResult<T>
    where
        F: Future<Output = StoreResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        let this = self.clone();
        let Some(task) = self.spawn(async move { this.bounded(deadline, fut).await }) else {
            return Err(StoreError::Backend("database runtime stopped".into()));
        };
        let result = task
            .await
            .unwrap_or_else(|_| Err(StoreError::Backend("database task failed".into())));
        self.outage.observe(&result);
        result
    }

    /// Fails at once while the database is taken for hanging (see [`Hung`]).
    fn not_hung(&self) -> StoreResult<()> {
        match self.hung.recently() {
            Some(ago) => Err(StoreError::Unavailable(format!(
                "PostgreSQL at {}: a call got no answer {ago:?} ago",
                self.hosts
            ))),
            None => Ok(()),
        }
    }

    /// `fut` awaited by an async caller (which it does not block) within the
    /// deadline, as [`PgBackend::run`] would bound it, and dropped if the deadline
    /// passes or the caller stops waiting: in the caller's task on the relay's runtime,
    /// else as a task on the backend's own. `fut` owns what it needs (clones of the
    /// pool and such). Unlike `run`'s calls through [`PgBackend::client`], a connect
    /// that gets no start-up reply does not mark the database as hanging here, and
    /// nothing is retried.
    pub(super) async fn detached<T, F>(&self, fut: F) -> StoreResult<T>
    where
        F: Future<Output = StoreResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        use futures::FutureExt;
        self.not_hung()?;
        let result = match &self.runtime {
            // On the caller's own thread: no hand-off to another and back. A panic
            // fails the call, as it fails a spawned task, not the caller's task.
            Some(Runtime::Shared(_)) => {
                let caught = std::panic::AssertUnwindSafe(fut).catch_unwind();
                let fut = async {
                    caught.await.unwrap_or_else(|_| {
                        Err(StoreError::Backend("database call panicked".into()))
                    })
                };
                self.bounded(self.deadline, fut).await
            }
            _ => {
                let task = self.handle()?.spawn(fut);
                let _abort = AbortOnDrop(task.abort_handle());
                let joined = async {
                    task.await
                        .unwrap_or_else(|_| Err(StoreError::Backend("database task failed".into())))
                };
                self.bounded(self.deadline, joined).await
            }
        };
        self.outage.observe(&result);
        result
    }

    /// `fut` with a deadline: a call left without an answer marks the database as
    /// hanging (see [`Hung`]), an answered one clears that.
    async fn bounded<T>(
        &self,
        deadline: Duration,
        fut: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        match tokio::time::timeout(deadline, fut).await {
            Ok(result) => {
                if result.is_ok() {
                    self.hung.clear();
                }
                result
            }
            Err(_) => {
                self.hung.mark();
                Err(StoreError::Unavailable(format!(
                    "PostgreSQL at {}: no answer within {deadline:?}",
                    self.hosts
                )))
            }
        }
    }

    /// The database runtime's handle.
    fn handle(&self) -> StoreResult<&tokio::runtime::Handle> {
        self.runtime
            .as_ref()
            .map(|r| match r {
                Runtime::Own(own) => own.handle(),
                Runtime::Shared(handle) => handle,
            })
            .ok_or_else(|| StoreError::Backend("database runtime stopped".into()))
    }

    /// A pooled connection; a pool that cannot connect is `Unavailable`. So is a
    /// database that just left a call without an answer: for one deadline after
    /// that, calls fail at once instead of each waiting a deadline of its own.
    pub async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        self.not_hung()?;
        self.pool.get().await.map_err(|e| {
            // A connect that got no start-up reply; not a full pool (a busy node).
            if matches!(
                e,
                deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Create)
            ) {
                self.hung.mark();
            }
            pool_error(e, &self.hosts)
        })
    }

    /// Runs `fut` as a task on the database runtime (the node's background work on
    /// the database: notifications, re-checks, heartbeats).
    pub fn spawn<F>(&self, fut: F) -> Option<tokio::task::JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        Some(self.handle().ok()?.spawn(fut))
    }

    /// A connection of its own, outside the pool (LISTEN, which a pooled connection
    /// cannot keep). Its driver task runs on the database runtime until the client
    /// is dropped or the connection breaks (then the returned handle finishes);
    /// `on_message` sees what arrives unasked (notifications, notices).
    pub async fn dedicated(
        &self,
        on_message: impl FnMut(tokio_postgres::AsyncMessage) + Send + 'static,
    ) -> StoreResult<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
        use futures::StreamExt;
        async fn drive<S, T>(
            mut conn: tokio_postgres::Connection<S, T>,
            mut on_message: impl FnMut(tokio_postgres::AsyncMessage) + Send + 'static,
        ) where
            S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
            T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        {
            let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(m)) = messages.next().await {
                on_message(m);
            }
        }
        let handle = self.handle()?;
        match &self.tls {
            Some(tls) => {
                let (client, conn) = self
                    .config
                    .connect(tls.clone())
                    .await
                    .map_err(|e| self.classify(&e))?;
                Ok((client, handle.spawn(drive(conn, on_message))))
            }
            None => {
                let (client, conn) = self
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| self.classify(&e))?;
                Ok((client, handle.spawn(drive(conn, on_message))))
            }
        }
    }

    /// A database error as a store error: the connection's failures, a read-only
    /// primary (a standby after failover), timeouts and overload are `Unavailable`.
    pub fn classify(&self, e: &tokio_postgres::Error) -> StoreError {
        classify(e, &self.hosts)
    }

    /// Runs `op` again once when it failed on a serialization failure or a deadlock
    /// (the database chose it as the victim; a retry then usually succeeds).
    pub async fn retrying<T, F, Fut>(&self, op: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        retried(op).await.map_err(|e| self.classify(&e))
    }
}

/// [`PgBackend::retrying`] without the backend, for futures that own what they need
/// ([`PgBackend::detached`]): the database's error as it came.
pub(super) async fn retried<T, F, Fut>(mut op: F) -> Result<T, tokio_postgres::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tokio_postgres::Error>>,
{
    match op().await {
        Err(e) if is_retryable(&e) => op().await,
        r => r,
    }
}

/// When a call last got no answer within its deadline (a partition, a stopped host:
/// connections stay open, connects hang). Until one deadline has passed since, new
/// calls fail `Unavailable` at once: a connection's pipelined requests, each served in
/// turn, would otherwise wait a deadline each (300 sends, 450 s at 1.5 s). Then calls
/// try again, and the first that succeeds clears it. A connect that times out marks it
/// too; a refusal (a database that is down, answering) and a full pool do not.
#[derive(Debug)]
struct Hung {
    epoch: std::time::Instant,
    // Milliseconds after `epoch` plus one; 0 while the database answers.
    at: std::sync::atomic::AtomicU64,
    cooldown: Duration,
}

impl Hung {
    fn new(cooldown: Duration) -> Hung {
        Hung {
            epoch: std::time::Instant::now(),
            at: std::sync::atomic::AtomicU64::new(0),
            cooldown,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn mark(&self) {
        self.at
            .store(self.now(), std::sync::atomic::Ordering::Relaxed);
    }

    fn clear(&self) {
        if self.at.load(std::sync::atomic::Ordering::Relaxed) != 0 {
            self.at.store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// How long ago a call got no answer, if less than the cooldown.
    fn recently(&self) -> Option<Duration> {
        let at = self.at.load(std::sync::atomic::Ordering::Relaxed);
        if at == 0 {
            return None;
        }
        let ago = Duration::from_millis(self.now().saturating_sub(at));
        (ago < self.cooldown).then_some(ago)
    }
}

// Every call commits before it returns (under `synchronous_commit`, so durably, and on
// a synchronous standby when one is named): there is nothing left to flush.
impl super::Flush for PgBackend {
    fn flush(&self) -> StoreResult<()> {
        Ok(())
    }
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        // The relay may drop the backend on one of its own runtime's threads, where
        // dropping a runtime (which blocks) is refused.
        if let Some(Runtime::Own(runtime)) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A pool that could not hand out a connection, as a store error: the database's own
/// refusal classified, a timeout or a closed pool `Unavailable`.
pub(super) fn pool_error(e: deadpool_postgres::PoolError, hosts: &str) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e)
        | deadpool_postgres::PoolError::PostCreateHook(deadpool_postgres::HookError::Backend(e)) => {
            classify(&e, hosts)
        }
        e => StoreError::Unavailable(format!("PostgreSQL at {hosts}: {e}")),
    }
}

/// Run by every connection that takes seqs as it connects (V16): keeps `(epoch - 1)
/// << 40` as the session's `tern.seq_floor`, below which its sends never number, where
/// `epoch` is the live one (`seq_epoch_live`, an unlogged table: crash recovery empties
/// it, a promoted standby has it empty) or, when there is none, the next one, taken
/// from `seq_epochs` and committed synchronously (the session's own commits do not
/// wait for the flush), one connection at a time (the row lock), so that connections
/// made together share it. A crash or failover that loses unflushed commits thus moves
/// every later seq above every seq handed out before it, also those of lost commits
/// that a recipient was already given; without one, seqs stay dense. A connection
/// that cannot take an epoch (2^23 are used up) is not used.
async fn take_epoch(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    const FLOOR: &str = "SELECT set_config('tern.seq_floor', (($1::int8 - 1) << 40)::text, false)";
    // Nearly always: the live one, read without a lock or a write.
    let live = client
        .query("SELECT epoch FROM seq_epoch_live WHERE id = 0", &[])
        .await?;
    if let Some(row) = live.first() {
        let epoch: i64 = row.try_get(0)?;
        return client.query_one(FLOOR, &[&epoch]).await.map(drop);
    }
    client
        .batch_execute(
            "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL synchronous_commit = on; \
             SELECT 1 FROM seq_epochs WHERE id = 0 FOR UPDATE",
        )
        .await?;
    // Under the lock, in a snapshot taken after it: the live epoch a connection made
    // meanwhile recorded, or the next one.
    let row = client
        .query_one(
            "WITH live AS (SELECT epoch FROM seq_epoch_live WHERE id = 0), \
             next AS (UPDATE seq_epochs SET epoch = epoch + 1 \
               WHERE id = 0 AND NOT EXISTS (SELECT 1 FROM live) RETURNING epoch), \
             kept AS (INSERT INTO seq_epoch_live SELECT 0, epoch FROM next) \
             SELECT coalesce((SELECT epoch FROM live), (SELECT epoch FROM next))",
            &[],
        )
        .await?;
    // NULL (no `seq_epochs` row) fails here, and the connection is not used.
    let epoch: i64 = row.try_get(0)?;
    client.query_one(FLOOR, &[&epoch]).await?;
    client.batch_execute("COMMIT").await
}

/// A pool of up to `size` connections made with `config`.
fn build_pool(
    config: &tokio_postgres::Config,
    tls: &Option<tokio_postgres_rustls::MakeRustlsConnect>,
    size: usize,
) -> StoreResult<Pool> {
    build_pool_with(config, tls, size, None)
}

/// [`build_pool`], running `post_create` on every new connection before its first use.
fn build_pool_with(
    config: &tokio_postgres::Config,
    tls: &Option<tokio_postgres_rustls::MakeRustlsConnect>,
    size: usize,
    post_create: Option<deadpool_postgres::Hook>,
) -> StoreResult<Pool> {
    let manager_config = ManagerConfig {
        // A connection that broke (failover, restart) is dropped on its way back
        // and the pool connects afresh, to whichever host is the primary now.
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match tls {
        Some(tls) => Manager::from_config(config.clone(), tls.clone(), manager_config),
        None => Manager::from_config(config.clone(), tokio_postgres::NoTls, manager_config),
    };
    let timeout = config.get_connect_timeout().copied();
    let mut builder = Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(timeout)
        .create_timeout(timeout)
        .recycle_timeout(timeout);
    if let Some(hook) = post_create {
        builder = builder.post_create(hook);
    }
    builder
        .build()
        .map_err(|e| StoreError::Backend(format!("database pool: {e}")))
}

/// Aborts a task when dropped (a no-op once it has finished).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether `e` is a serialization failure or deadlock worth one retry.
pub fn is_retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// See [`PgBackend::classify`].
pub fn classify(e: &tokio_postgres::Error, hosts: &str) -> StoreError {
    let text = detailed(e);
    let unavailable = || StoreError::Unavailable(format!("PostgreSQL at {hosts}: {text}"));
    match e.code() {
        // No SQLSTATE: the connection itself failed (refused, reset, closed, TLS).
        None => unavailable(),
        Some(code) => {
            let c = code.code();
            if c.starts_with("08") // connection exception
                || c.starts_with("53") // insufficient resources (too many connections)
                || c.starts_with("57P") // shutdown, crash recovery, cannot connect now
                || *code == SqlState::READ_ONLY_SQL_TRANSACTION // a standby, after failover
                || *code == SqlState::QUERY_CANCELED // statement_timeout
                || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
            {
                unavailable()
            } else if *code == SqlState::UNIQUE_VIOLATION {
                StoreError::Exists
            } else {
                StoreError::Backend(format!("PostgreSQL: {text}"))
            }
        }
    }
}

/// `e` with what caused it: tokio-postgres says only "db error" or "error connecting
/// to server" and keeps the rest as the error's source. Of a database error, its
/// message only: its detail may quote key values (account ids, P9).
fn detailed(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    match (e.as_db_error(), e.source()) {
        (Some(db), _) => format!("{e}: {}", db.message()),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

/// The hosts of `config` for messages: `host:port` or socket directories.
fn describe_hosts(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let mut out = Vec::new();
    for (i, host) in config.get_hosts().iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        out.push(match host {
            Host::Tcp(h) => format!("{h}:{port}"),
            Host::Unix(p) => format!("{}:{port}", p.display()),
        });
    }
    if out.is_empty() {
        "localhost:5432".to_owned()
    } else {
        out.join(",")
    }
}

/// rustls (ring) trusting only the certificates in `ca_file`.
fn tls_connector(
    ca_file: &std::path::Path,
) -> StoreResult<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bad =
        |m: String| StoreError::Backend(format!("postgres.ca_file {}: {m}", ca_file.display()));
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file).map_err(|e| bad(e.to_string()))?;
    for cert in certs {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod mailbox_tests;
#[cfg(test)]
pub(crate) mod testdb;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_bodies;
#[cfg(test)]
mod tests_closed;
#[cfg(test)]
mod tests_discovery;
#[cfg(test)]
mod tests_epochs;
#[cfg(test)]
mod tests_partition;
#[cfg(test)]
mod tests_published;
#[cfg(test)]
mod tests_verification;
