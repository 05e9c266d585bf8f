//! The admin listener: HTTP/1.1 on (by default) loopback, served with hyper.
//!
//! - `GET /metrics`: Prometheus text (aggregates only, P9); `GET /healthz`: the
//!   process serves; `GET /readyz`: the stores flush and the disk is above its
//!   reserve. These three need no credential (they say nothing about anyone).
//! - `/admin/...`: the admin commands, each refused (401, and counted in
//!   `tern_admin_refused_total`) without `Authorization: Bearer <admin.token>`, and
//!   (403) from a peer off loopback unless `[admin] allow_remote_admin`.
//!
//! `GET /admin/stats`, `GET /admin/accounts/<id>/devices`,
//! `GET /admin/accounts/<id>/export[?ciphertexts=true]`,
//! `POST /admin/accounts/<id>/delete`, `POST /admin/reload`,
//! `POST /admin/backup` (body `{"dir": "/absolute/new/directory"}`),
//! `POST /admin/rotate-cert` (a JSON body: `super::rotate`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

use super::reload::{plan, Plan};
use super::token::Token;
use super::ConfigSource;
use crate::config::Config;
use crate::deletion::{AccountDeletion, DeletionAuthority, Operator};
use crate::error::Error;
use crate::export::ExportOptions;
use crate::server::Services;
use crate::verification::Verification;

pub(super) type Body = BoxBody<Bytes, std::io::Error>;

/// Admin connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/readyz` waits for the stores to flush.
const READY_WITHIN: Duration = Duration::from_secs(5);
/// How long a `/readyz` answer is given again without a new probe.
const READY_FRESH: Duration = Duration::from_secs(1);
/// How often the state gauges are set and histogram samples drained into their
/// buckets, scraped or not.
pub(crate) const UPKEEP: Duration = Duration::from_secs(2);
/// The bytes a request body may have (a backup's path).
const MAX_BODY: usize = 64 * 1024;
/// Export bytes gathered before they are handed to the response.
const CHUNK: usize = 64 * 1024;

/// What the admin handlers work on.
pub(crate) struct Admin {
    pub(crate) services: Arc<Services>,
    pub(crate) deletion: Arc<AccountDeletion>,
    pub(crate) verification: Arc<Verification>,
    pub(crate) data_dir: PathBuf,
    pub(crate) token: Token,
    pub(crate) metrics: Option<&'static PrometheusHandle>,
    /// The configuration in force (its reloadable keys change with a reload).
    pub(crate) running: Mutex<Config>,
    pub(crate) source: Mutex<Option<ConfigSource>>,
    /// The relay's certificates (`rotate-cert`).
    pub(crate) certificates: Arc<crate::net::rotation::Certificates>,
    /// `[admin] allow_remote_admin`: `/admin/` answers peers off loopback.
    pub(crate) allow_remote: bool,
    /// The last `/readyz` answer (`Err`: why not ready).
    pub(crate) readiness: Fresh<std::result::Result<(), String>>,
    /// Set while a backup runs.
    pub(crate) backing_up: Arc<AtomicBool>,
    /// Set when the relay stops: a running backup is cancelled (and leaves nothing
    /// behind) rather than waited for or cut off.
    stopping: AtomicBool,
}

impl Admin {
    /// The admin state of a relay over `services`, with a new token.
    pub(crate) fn new(
        services: Arc<Services>,
        deletion: Arc<AccountDeletion>,
        verification: Arc<Verification>,
        config: &Config,
        metrics: Option<&'static PrometheusHandle>,
        certificates: Arc<crate::net::rotation::Certificates>,
    ) -> Admin {
        Admin {
            services,
            certificates,
            deletion,
            verification,
            data_dir: config.data_dir.clone(),
            token: Token::generate(),
            metrics,
            running: Mutex::new(config.clone()),
            source: Mutex::new(None),
            allow_remote: config.admin.allow_remote_admin,
            readiness: Fresh::new(READY_FRESH),
            backing_up: Arc::new(AtomicBool::new(false)),
            stopping: AtomicBool::new(false),
        }
    }

    /// The relay is stopping: a new backup is refused, and a running one cancelled
    /// and waited for (it stops at its next step and removes what it wrote), so
    /// that it answers its caller and leaves no partial directory behind.
    pub(crate) async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        while self.backing_up.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A value computed at most once per `fresh_for`, by one computation at a time:
/// callers meanwhile wait for it and take it. The computation runs as a task of its
/// own, so a caller that leaves (a dropped `/readyz` request) neither cancels it nor
/// lets the next caller start a second one beside it; its value is kept for them.
pub(crate) struct Fresh<T> {
    state: Arc<Mutex<FreshState<T>>>,
    fresh_for: Duration,
}

/// The computation under way, shared by its callers (`None`: it panicked).
type Running<T> = futures::future::Shared<futures::future::BoxFuture<'static, Option<T>>>;

struct FreshState<T> {
    last: Option<(Instant, T)>,
    running: Option<Running<T>>,
}

impl<T: Clone + Send + Sync + 'static> Fresh<T> {
    pub(crate) fn new(fresh_for: Duration) -> Self {
        Fresh {
            state: Arc::new(Mutex::new(FreshState {
                last: None,
                running: None,
            })),
            fresh_for,
        }
    }

    /// The last value if still fresh, else that of the computation under way, else
    /// `compute`'s, spawned (and kept when done); `None` if the computation panicked.
    pub(crate) async fn get(&self, compute: impl Future<Output = T> + Send + 'static) -> Option<T> {
        use futures::FutureExt;
        let running = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, value)) = &state.last {
                if at.elapsed() < self.fresh_for {
                    return Some(value.clone());
                }
            }
            match &state.running {
                Some(r) => r.clone(),
                None => {
                    let kept = self.state.clone();
                    let task = tokio::spawn(async move {
                        let value = compute.await;
                        let mut state = kept.lock().unwrap_or_else(|e| e.into_inner());
                        state.last = Some((Instant::now(), value.clone()));
                        state.running = None;
                        value
                    });
                    let shared = async move { task.await.ok() }.boxed().shared();
                    state.running = Some(shared.clone());
                    shared
                }
            }
        };
        let value = running.clone().await;
        if value.is_none() {
            // Panicked: the next caller starts a new one.
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.running.as_ref().is_some_and(|r| r.ptr_eq(&running)) {
                state.running = None;
            }
        }
        value
    }
}

/// The one backup that runs; cleared when dropped (the backup's blocking thread
/// holds it, so a client that leaves does not let a second one start meanwhile).
struct BackupRunning(Arc<AtomicBool>);

impl BackupRunning {
    fn start(flag: &Arc<AtomicBool>) -> Option<BackupRunning> {
        flag.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| BackupRunning(flag.clone()))
    }
}

impl Drop for BackupRunning {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Where the loopback twin of an admin listener bound at `bound` listens: none for
/// one on loopback; else loopback of the same family, port 0 (`admin.addr` names
/// it, so the local `tern-relay admin` reaches `/admin/` as a loopback peer).
pub(crate) fn local_twin(bound: SocketAddr) -> Option<SocketAddr> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = bound.ip().to_canonical();
    if ip.is_loopback() {
        return None;
    }
    let local: IpAddr = match ip {
        IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
    };
    Some(SocketAddr::new(local, 0))
}

/// Whether `/admin/` refuses `peer`: off loopback, without `allow_remote_admin`.
fn remote_refused(peer: SocketAddr, allow_remote: bool) -> bool {
    !allow_remote && !peer.ip().to_canonical().is_loopback()
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

/// Serves admin connections on `listener` and its loopback twin, if any, until
/// `shutdown`; then removes `admin.addr`, so commands run after the relay stops work
/// offline.
pub(crate) async fn serve(
    (listener, twin): (tokio::net::TcpListener, Option<tokio::net::TcpListener>),
    admin: Arc<Admin>,
    shutdown: watch::Receiver<bool>,
) {
    let upkeep = tokio::spawn(upkeep_loop(admin.clone(), UPKEEP, shutdown.clone()));
    // Each listener has its own connections: peers off loopback holding every slot of
    // the configured listener cannot lock the local commands out of the twin.
    let main = accept_loop(listener, MAX_CONNECTIONS, &admin, shutdown.clone());
    match twin {
        Some(twin) => {
            let local = accept_loop(twin, TWIN_CONNECTIONS, &admin, shutdown);
            tokio::join!(main, local);
        }
        None => main.await,
    }
    upkeep.abort();
    let _ = std::fs::remove_file(admin.data_dir.join(super::token::ADDR_FILE));
}

/// Connections the loopback twin serves at once (the local commands).
const TWIN_CONNECTIONS: usize = 4;

/// Serves `listener`, at most `max` connections at once, until `shutdown`.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    max: usize,
    admin: &Arc<Admin>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(max));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        conns.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, peer, req).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(error = %e, "admin connection ended");
            }
            drop(permit);
        });
        while conns.try_join_next().is_some() {}
    }
    conns.abort_all();
}

/// Sets the state gauges and drains histogram samples every `every`, so a relay
/// nobody scrapes neither gathers samples without bound nor shows stale gauges to
/// a recorder an embedder reads.
pub(crate) async fn upkeep_loop(
    admin: Arc<Admin>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(handle) = admin.metrics else { return };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticks.tick() => {}
        }
        let state = state(&admin).await;
        crate::metrics::upkeep(handle, state);
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

pub(super) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut body = value.to_string();
    body.push('\n');
    respond(status, "application/json", body)
}

fn respond(status: StatusCode, kind: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let body = Full::new(body.into())
        .map_err(|never| match never {})
        .boxed();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    r
}

/// An error as an answer: its message, under the status it means.
pub(super) fn failed(e: &Error) -> Response<Body> {
    let status = match e {
        Error::UnknownRecipient => StatusCode::NOT_FOUND,
        Error::BadRequest(_) => StatusCode::BAD_REQUEST,
        Error::Config(_) => StatusCode::CONFLICT,
        Error::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        warn!(error = %e, "admin command failed");
    }
    let mut r = json(status, &serde_json::json!({ "error": e.to_string() }));
    if let Error::Busy { retry_after_ms, .. } = e {
        // Whole seconds, rounded up (RFC 9110 §10.2.3).
        let secs = retry_after_ms.div_ceil(1000).max(1);
        r.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from(secs),
        );
    }
    r
}

async fn route(admin: &Arc<Admin>, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (method.clone(), path.as_str()) {
        (Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n"),
        (Method::GET, "/readyz") => return ready(admin).await,
        (Method::GET, "/metrics") => return metrics(admin).await,
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/admin/") else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    if remote_refused(peer, admin.allow_remote) {
        crate::metrics::admin_refused(crate::metrics::AdminRefused::Remote);
        debug!("admin request from off loopback refused");
        return text(
            StatusCode::FORBIDDEN,
            "admin commands are answered only on loopback ([admin] allow_remote_admin = true to change that)\n",
        );
    }
    if let Some(refused) = check_token(admin, &req) {
        return refused;
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    let parts: Vec<&str> = rest.split('/').collect();
    match (method, parts.as_slice()) {
        (Method::GET, ["stats"]) => stats(admin).await,
        (Method::POST, ["reload"]) => reload(admin),
        (Method::POST, ["backup"]) => backup(admin, req).await,
        (Method::GET, ["accounts", id, "devices"]) => match crate::admin::parse_account(id) {
            Ok(account) => list_devices(admin, account).await,
            Err(e) => failed(&e),
        },
        (Method::POST, ["accounts", id, "delete"]) => match crate::admin::parse_account(id) {
            Ok(account) => delete(admin, account).await,
            Err(e) => failed(&e),
        },
        (Method::GET, ["accounts", id, "export"]) => match crate::admin::parse_account(id) {
            Ok(account) => {
                let options = ExportOptions {
                    include_ciphertexts: query.split('&').any(|p| p == "ciphertexts=true"),
                };
                export(admin, account, options).await
            }
            Err(e) => failed(&e),
        },
        // rotate-cert (engineer cert): one block, kept last.
        (Method::POST, ["rotate-cert"]) => super::rotate::route(admin, req).await,
        _ => text(StatusCode::NOT_FOUND, "no such admin command\n"),
    }
}

/// `None` when the request carries the token; else its refusal (counted).
fn check_token(admin: &Admin, req: &Request<Incoming>) -> Option<Response<Body>> {
    use crate::metrics::{admin_refused, AdminRefused};
    let presented = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    let refused = match presented {
        None => AdminRefused::Missing,
        Some(t) if admin.token.matches(t) => return None,
        Some(_) => AdminRefused::Wrong,
    };
    admin_refused(refused);
    // Debug: anyone who reaches the port could otherwise fill the log; counted above.
    debug!(reason = ?refused, "admin request refused");
    // No data-directory path: the body goes to whoever asked.
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        format!(
            "admin requests need the token in the data directory's {} (Authorization: Bearer <token>)\n",
            super::token::TOKEN_FILE
        ),
    );
    r.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("Bearer"),
    );
    Some(r)
}

/// Whether the relay can take a send: the disk above its reserve, the stores
/// flushing, and a file written in the data directory. One probe at a time, its
/// answer given again for a second: a probe flushes the stores, and probes that
/// come faster (several checkers, a tight loop) need not each make one.
async fn ready(admin: &Arc<Admin>) -> Response<Body> {
    if admin.services.budget().below_reserve() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: free disk space is at the reserve\n",
        );
    }
    let answer = admin.readiness.get(probe(admin.clone())).await;
    match answer.unwrap_or_else(|| Err("the probe failed".into())) {
        Ok(()) => text(StatusCode::OK, "ready\n"),
        Err(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn probe(admin: Arc<Admin>) -> std::result::Result<(), String> {
    let (services, dir) = (admin.services.clone(), admin.data_dir.clone());
    let probe = tokio::task::spawn_blocking(move || -> std::result::Result<(), String> {
        services
            .commit()
            .flush_now()
            .map_err(|e| format!("the stores do not flush: {e}"))?;
        write_probe(&dir).map_err(|e| format!("the data directory is not writable: {e}"))
    });
    match tokio::time::timeout(READY_WITHIN, probe).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err("the probe failed".into()),
        Err(_) => Err("the stores did not flush within 5 s".into()),
    }
}

/// Writes, syncs and removes a file of its own name in `dir`: a probe that outlived
/// its answer's timeout never meets the next one's file.
fn write_probe(dir: &Path) -> std::io::Result<()> {
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let n = PROBES.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!(".readyz.{n}"));
    super::token::write_private(&path, b"ok").and_then(|()| std::fs::remove_file(&path))
}

/// The state the gauges show, read now (the totals may ask the database).
async fn state(admin: &Arc<Admin>) -> crate::metrics::State {
    let services = admin.services.clone();
    tokio::task::spawn_blocking(move || {
        let totals = services.stores().mailboxes.totals();
        crate::metrics::State {
            queued_messages: totals.messages,
            queued_bytes: totals.bytes,
            blob_bytes: services.budget().blob_bytes(),
            below_reserve: services.budget().below_reserve(),
        }
    })
    .await
    .unwrap_or_default()
}

/// The scrape's text, with the state gauges read now.
async fn rendered(admin: &Arc<Admin>) -> Option<String> {
    let handle = admin.metrics?;
    let state = state(admin).await;
    Some(crate::metrics::render(handle, state))
}

async fn metrics(admin: &Arc<Admin>) -> Response<Body> {
    match rendered(admin).await {
        Some(text) => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            text,
        ),
        None => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no metrics: another metrics recorder was installed in this process\n",
        ),
    }
}

async fn stats(admin: &Arc<Admin>) -> Response<Body> {
    crate::metrics::admin_request("stats");
    let samples = rendered(admin)
        .await
        .map(|t| crate::metrics::parse(&t))
        .unwrap_or_default();
    json(StatusCode::OK, &serde_json::json!({ "samples": samples }))
}

fn reload(admin: &Arc<Admin>) -> Response<Body> {
    crate::metrics::admin_request("reload");
    let source = admin.source.lock().unwrap_or_else(|e| e.into_inner());
    let Some(read) = source.as_ref() else {
        return failed(&Error::Config(
            "this relay was started without a configuration file: nothing to reload".into(),
        ));
    };
    let new = match read() {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    let mut running = admin.running.lock().unwrap_or_else(|e| e.into_inner());
    match plan(&running, &new) {
        Plan::Restart(keys) => failed(&Error::Config(format!(
            "not reloaded: changing {} needs a restart (nothing was changed)",
            keys.join(", ")
        ))),
        Plan::Apply(keys) => {
            admin.services.rate_limits().reload(&new.rate_limits);
            running.rate_limits = new.rate_limits;
            info!(keys = keys.len(), "configuration reloaded");
            json(StatusCode::OK, &serde_json::json!({ "reloaded": keys }))
        }
    }
}

/// `{"dir": ...}`, the body of a backup request.
#[derive(serde::Deserialize)]
struct BackupTo {
    dir: PathBuf,
}

/// Writes a backup into the new directory the body names, on a blocking thread;
/// answers once it is complete (synced). One at a time.
async fn backup(admin: &Arc<Admin>, req: Request<Incoming>) -> Response<Body> {
    use crate::store::backup::{backup_new, BackupError};
    crate::metrics::admin_request("backup");
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return failed(&Error::BadRequest(format!("the request body: {e}"))),
    };
    let to: BackupTo = match serde_json::from_slice(&body) {
        Ok(t) => t,
        Err(e) => {
            return failed(&Error::BadRequest(format!(
                "expected {{\"dir\": \"/a/new/directory\"}}: {e}"
            )))
        }
    };
    let Some(running) = BackupRunning::start(&admin.backing_up) else {
        return json(
            StatusCode::CONFLICT,
            &serde_json::json!({ "error": "a backup is already running: wait for it to finish" }),
        );
    };
    // Checked after the place is taken (both sequentially consistent): a stop that
    // began meanwhile either waits for this backup or is seen here.
    if admin.stopping.load(Ordering::SeqCst) {
        drop(running);
        return stopping();
    }
    let stores = admin.services.stores().clone();
    // The relay's own disk reserve, kept on the destination too (often the same
    // file system).
    let reserve = admin
        .running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .budget
        .min_free_disk_bytes;
    let began = Instant::now();
    let state = admin.clone();
    let done = tokio::task::spawn_blocking(move || {
        // Cancelled by a stop of the relay (its partial directory removed); only a
        // relay killed meanwhile leaves that directory beside `to.dir`.
        let done = backup_new(&stores, &to.dir, &state.stopping, reserve);
        drop(running);
        if let Err(BackupError::Failed(e)) = &done {
            // The reason names paths (blob ids among them): it goes to the caller only.
            warn!(cause = failure_class(e), "backup failed");
        }
        done
    })
    .await;
    match done {
        Ok(Ok(b)) => {
            info!(
                records = b.records,
                segments = b.segments,
                blobs = b.blobs,
                ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
                "backup written"
            );
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "records": b.records, "segments": b.segments,
                    "blobs": b.blobs, "linked": b.linked,
                }),
            )
        }
        Ok(Err(BackupError::Cancelled)) => stopping(),
        Ok(Err(BackupError::Refused(why))) => {
            json(StatusCode::CONFLICT, &serde_json::json!({ "error": why }))
        }
        Ok(Err(e @ BackupError::NoSpace { .. })) => json(
            StatusCode::INSUFFICIENT_STORAGE,
            &serde_json::json!({ "error": e.to_string() }),
        ),
        Ok(Err(e)) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({ "error": e.to_string() }),
        ),
        Err(_) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({ "error": "the backup's thread failed" }),
        ),
    }
}

/// A backup's answer when the relay stopped before or during it.
const STOPPING: &str = "the relay is stopping: no backup was written";

fn stopping() -> Response<Body> {
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({ "error": STOPPING }),
    )
}

/// What kind of failure `e` is, naming no path.
fn failure_class(e: &crate::store::StoreError) -> &'static str {
    use crate::store::StoreError as E;
    match e {
        E::NoSpace => "no space left on the device",
        E::Corrupt(_) => "a corrupt record",
        E::Locked => "the store is locked",
        E::Unavailable(_) => "storage unavailable",
        _ => "an I/O or store error (the caller was told which)",
    }
}

async fn list_devices(admin: &Arc<Admin>, account: tern_proto::AccountId) -> Response<Body> {
    crate::metrics::admin_request("list_devices");
    let services = admin.services.clone();
    let listed = tokio::task::spawn_blocking(move || super::devices(&services, &account)).await;
    match listed {
        Ok(Ok(devices)) => json(StatusCode::OK, &serde_json::json!({ "devices": devices })),
        Ok(Err(e)) => failed(&e),
        Err(_) => failed(&Error::Config("listing failed".into())),
    }
}

async fn delete(admin: &Arc<Admin>, account: tern_proto::AccountId) -> Response<Body> {
    crate::metrics::admin_request("delete_account");
    let authority = DeletionAuthority::Operator(Operator::offline(), account);
    match admin.deletion.delete(authority).await {
        Ok(d) => {
            info!(
                devices = d.devices,
                messages = d.messages,
                "account deleted by the operator"
            );
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "devices": d.devices, "messages": d.messages, "uploads": d.uploads
                }),
            )
        }
        Err(e) => failed(&e),
    }
}

/// Hands what the export writer writes to the response, in chunks; fails once the
/// response is gone (the client left) or takes nothing for
/// [`crate::export::WRITE_TIMEOUT`] (it stopped reading), which stops the writer and
/// frees its thread and its place among the exports.
#[derive(Clone)]
struct ToBody {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, Error>>,
    runtime: tokio::runtime::Handle,
    within: Duration,
    /// Set once a hand-over failed: every later one (the buffer's flush on drop, the
    /// error's report) fails at once instead of waiting again.
    broken: Arc<AtomicBool>,
}

impl ToBody {
    /// Hands `item` over; whether the response took it in time.
    fn hand_over(&self, item: Result<Bytes, Error>) -> bool {
        if self.broken.load(Ordering::Acquire) {
            return false;
        }
        let sent = self.tx.send_timeout(item, self.within);
        let ok = self.runtime.block_on(sent).is_ok();
        if !ok {
            self.broken.store(true, Ordering::Release);
        }
        ok
    }
}

impl std::io::Write for ToBody {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.hand_over(Ok(Bytes::copy_from_slice(buf))) {
            return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Streams the export as the writer makes it. An unknown (or deleted) account is a
/// 404 before anything is sent; a failure after the JSON began cuts the response
/// short, so a client never takes a cut document for a whole one.
async fn export(
    admin: &Arc<Admin>,
    account: tern_proto::AccountId,
    options: ExportOptions,
) -> Response<Body> {
    crate::metrics::admin_request("export_account");
    let place = match admin.services.exports().enter() {
        Ok(p) => p,
        Err(e) => return failed(&e),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let (services, verification) = (admin.services.clone(), admin.verification.clone());
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _place = place;
        let out = ToBody {
            tx,
            runtime,
            within: crate::export::WRITE_TIMEOUT,
            broken: Arc::default(),
        };
        // Deleted, or being deleted (here, or by another node): no export.
        match super::being_deleted(&services, &account) {
            Ok(false) => {}
            Ok(true) => {
                out.hand_over(Err(Error::UnknownRecipient));
                return;
            }
            Err(e) => {
                out.hand_over(Err(e));
                return;
            }
        }
        let errors = out.clone();
        let mut out = std::io::BufWriter::with_capacity(CHUNK, out);
        let now = services.clock().now();
        let pending = |a: &tern_proto::AccountId| verification.pending(a).ok().flatten();
        let live = crate::export::Live {
            verification_pending: Some(&pending),
        };
        let written =
            crate::export::write_with(services.stores(), &account, now, options, live, &mut out)
                .and_then(|_| {
                    out.into_inner()
                        .map(drop)
                        .map_err(|e| Error::Io(e.into_error()))
                });
        if let Err(e) = written {
            errors.hand_over(Err(e));
        }
    });
    let first = match rx.recv().await {
        None => Bytes::new(),
        Some(Ok(bytes)) => bytes,
        Some(Err(e)) => return failed(&e),
    };
    let rest = futures::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        let frame = item
            .map(Frame::data)
            .map_err(|e| std::io::Error::other(e.to_string()));
        Some((frame, rx))
    });
    let stream = futures::stream::StreamExt::chain(
        futures::stream::once(async move { Ok(Frame::data(first)) }),
        rest,
    );
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response that takes nothing more (its client stopped reading) fails the
    /// export's next write after the timeout, ending the writer and its thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_export_whose_reader_stopped_fails_its_next_write_in_time() {
        use std::io::Write as _;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let runtime = tokio::runtime::Handle::current();
        let within = Duration::from_millis(200);
        let wrote = tokio::task::spawn_blocking(move || {
            let mut out = ToBody {
                tx,
                runtime,
                within,
                broken: Arc::default(),
            };
            let first = out.write(b"taken into the channel");
            let started = std::time::Instant::now();
            let second = out.write(b"no room, and nobody reads");
            let timed_out = started.elapsed();
            // Once broken, at once: the buffer's flush on drop, the error's report.
            let third = out.hand_over(Err(Error::UnknownRecipient));
            let after = started.elapsed() - timed_out;
            (
                first.is_ok(),
                second.map_err(|e| e.kind()),
                timed_out,
                third,
                after,
            )
        })
        .await
        .expect("writer");
        assert!(wrote.0);
        assert_eq!(wrote.1, Err(std::io::ErrorKind::BrokenPipe));
        assert!(
            wrote.2 >= within && wrote.2 < Duration::from_secs(10),
            "{:?}",
            wrote.2
        );
        assert!(!wrote.3, "a broken body takes nothing more");
        assert!(wrote.4 < within, "{:?}", wrote.4);
        drop(rx);
    }

    #[tokio::test]
    async fn a_fresh_value_is_computed_once_for_concurrent_callers_and_again_when_stale() {
        let fresh = Arc::new(Fresh::new(Duration::from_millis(300)));
        let computed = Arc::new(AtomicU64::new(0));
        let compute = |computed: Arc<AtomicU64>| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            computed.fetch_add(1, Ordering::SeqCst) + 1
        };
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let (fresh, computed) = (fresh.clone(), computed.clone());
                tokio::spawn(async move { fresh.get(compute(computed)).await })
            })
            .collect();
        for c in callers {
            assert_eq!(c.await.expect("caller"), Some(1));
        }
        assert_eq!(computed.load(Ordering::SeqCst), 1, "one probe at a time");
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(fresh.get(compute(computed.clone())).await, Some(2));
    }

    #[tokio::test]
    async fn a_caller_that_leaves_neither_cancels_the_computation_nor_starts_a_second() {
        let fresh = Fresh::new(Duration::from_secs(60));
        let computed = Arc::new(AtomicU64::new(0));
        let (open, gate) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let computed = computed.clone();
            async move {
                let _ = gate.await;
                computed.fetch_add(1, Ordering::SeqCst) + 1
            }
        };
        // Polled once (the computation starts), then dropped: a request that left.
        tokio::select! {
            biased;
            _ = fresh.get(first) => panic!("computed before the gate opened"),
            () = std::future::ready(()) => {}
        }
        open.send(()).expect("the computation still waits");
        let second = {
            let computed = computed.clone();
            async move { computed.fetch_add(100, Ordering::SeqCst) + 100 }
        };
        assert_eq!(fresh.get(second).await, Some(1), "the first one's value");
        assert_eq!(
            computed.load(Ordering::SeqCst),
            1,
            "one computation, run to its end"
        );
    }

    #[tokio::test]
    async fn a_computation_that_panics_lets_the_next_caller_start_another() {
        let fresh = Fresh::new(Duration::from_secs(60));
        let panicked = fresh.get(async { panic!("a probe that panics") }).await;
        assert_eq!(panicked, None::<u8>);
        assert_eq!(fresh.get(async { 7 }).await, Some(7));
    }

    #[test]
    fn readiness_probes_at_once_use_files_of_their_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..20 {
                        write_probe(dir.path()).expect("a probe collided with another");
                    }
                });
            }
        });
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn the_upkeep_sets_the_gauges_when_nobody_scrapes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data_dir: dir.path().join("relay"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..Config::default()
        };
        let clock = Arc::new(tern_platform::clock::SystemClock);
        let relay = crate::Relay::start(&config, clock).await.expect("relay");
        let handle = crate::metrics::install().expect("the recorder");
        let services = relay.services();
        let accounts = services.accounts();
        let alice = accounts
            .register(crate::testing::registration(1))
            .await
            .expect("register");
        let bob = accounts
            .register(crate::testing::registration(2))
            .await
            .expect("register");
        let to = accounts.recipient(&alice, *bob.address()).expect("bob");
        services
            .mailboxes()
            .append(&to, &crate::testing::msgs(0..3, 100))
            .expect("append")
            .commit()
            .await
            .expect("commit");
        // The handle's own rendering sets nothing: only the upkeep does.
        let deadline = Instant::now() + UPKEEP * 4;
        loop {
            let samples = crate::metrics::parse(&handle.render());
            let value = |name: &str| samples.iter().find(|s| s.name == name).map(|s| s.value);
            let queued = value("tern_queued_messages");
            let bytes = value("tern_queued_bytes").unwrap_or(0.0);
            let uptime = value("tern_uptime_seconds").unwrap_or(0.0);
            if queued == Some(3.0) && bytes >= 300.0 && uptime > 0.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no upkeep: queued {queued:?}, {bytes} bytes, uptime {uptime}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        relay.shutdown().await.expect("shutdown");
    }

    /// A relay with its admin listener, and the listener's client.
    async fn with_admin(dir: &Path) -> (crate::Relay, Arc<Admin>, super::super::client::Online) {
        let config = Config {
            data_dir: dir.join("relay"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..Config::default()
        };
        let clock = Arc::new(tern_platform::clock::SystemClock);
        let relay = crate::Relay::start(&config, clock).await.expect("relay");
        let admin = relay.admin_state().expect("an admin listener");
        let online = super::super::client::Online::locate(&config.data_dir, None, None)
            .expect("locate")
            .expect("the relay's admin address");
        (relay, admin, online)
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_backup_asked_for_once_the_stop_began_is_refused_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (relay, admin, online) = with_admin(dir.path()).await;
        online
            .backup(&dir.path().join("before"))
            .await
            .expect("a backup while running");
        // The stop's first step (`Relay::shutdown`): no backup runs, nothing to wait for.
        admin.stop().await;
        match online.backup(&dir.path().join("during")).await {
            Err(super::super::client::ClientError::Answered { status, message }) => {
                assert_eq!((status, message.as_str()), (503, STOPPING));
            }
            other => panic!("not refused: {other:?}"),
        }
        assert_eq!(names(dir.path()), ["before", "relay"]);
        relay.shutdown().await.expect("shutdown");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relays_stop_cancels_a_running_backup_which_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (relay, admin, online) = with_admin(dir.path()).await;
        // Enough files that the copy takes a while, so the stop comes while it runs.
        let many = dir.path().join("relay").join("uploads");
        std::fs::create_dir_all(&many).expect("mkdir");
        for i in 0..20_000 {
            std::fs::write(many.join(format!("f{i:05}")), [7u8; 256]).expect("write");
        }
        let dest = dir.path().join("during");
        let backup = tokio::spawn(async move { online.backup(&dest).await });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !names(dir.path())
            .iter()
            .any(|n| n.starts_with("during.partial-"))
        {
            assert!(!backup.is_finished(), "the backup ended before it was seen");
            assert!(Instant::now() < deadline, "no backup under way");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        relay.shutdown().await.expect("shutdown");
        assert!(admin.stopping.load(Ordering::SeqCst));
        // Its caller heard 503, or saw the listener close: either way, not a backup.
        let answer = backup.await.expect("the request's task");
        assert!(answer.is_err(), "cancelled, not completed: {answer:?}");
        assert_eq!(
            names(dir.path()),
            ["relay"],
            "nothing at its name or beside it"
        );
    }

    #[test]
    fn one_backup_at_a_time() {
        let flag = Arc::new(AtomicBool::new(false));
        let first = BackupRunning::start(&flag).expect("first");
        assert!(BackupRunning::start(&flag).is_none(), "a second at once");
        drop(first);
        assert!(BackupRunning::start(&flag).is_some(), "after the first");
    }

    #[test]
    fn a_listener_off_loopback_gets_a_loopback_twin_for_the_local_commands() {
        let at = |s: &str| s.parse::<SocketAddr>().expect("addr");
        for local in [
            "127.0.0.1:9090",
            "127.0.0.2:0",
            "[::1]:9090",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert_eq!(local_twin(at(local)), None, "{local}");
        }
        for (bound, twin) in [
            ("0.0.0.0:9090", "127.0.0.1:0"),
            ("192.0.2.7:9090", "127.0.0.1:0"),
            ("[::]:9090", "[::1]:0"),
            ("[2001:db8::1]:9090", "[::1]:0"),
            ("[::ffff:10.0.0.1]:9090", "127.0.0.1:0"),
        ] {
            assert_eq!(local_twin(at(bound)), Some(at(twin)), "{bound}");
            // What the twin answers is answered to the commands run beside it.
            assert!(!remote_refused(at(twin), false), "{bound}");
        }
    }

    #[test]
    fn admin_commands_answer_loopback_peers_unless_remote_ones_are_allowed() {
        let at = |s: &str| s.parse::<SocketAddr>().expect("addr");
        for local in [
            "127.0.0.1:5",
            "127.8.9.1:5",
            "[::1]:5",
            "[::ffff:127.0.0.1]:5",
        ] {
            assert!(!remote_refused(at(local), false), "{local}");
        }
        for remote in [
            "10.0.0.1:5",
            "192.0.2.7:5",
            "[2001:db8::1]:5",
            "[::ffff:10.0.0.1]:5",
        ] {
            assert!(remote_refused(at(remote), false), "{remote}");
            assert!(!remote_refused(at(remote), true), "{remote} allowed");
        }
    }
}
