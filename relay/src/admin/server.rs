//! The admin listener: HTTP/1.1 on (by default) loopback, served with hyper.
//!
//! - `GET /metrics`: Prometheus text (aggregates only, P9); `GET /healthz`: the
//!   process serves; `GET /readyz`: the stores flush and the disk is above its
//!   reserve. These three need no credential (they say nothing about anyone).
//! - `/admin/...`: the admin commands, each refused (401, and counted in
//!   `tern_admin_refused_total`) without `Authorization: Bearer <admin.token>`.
//!
//! `GET /admin/stats`, `GET /admin/accounts/<id>/devices`,
//! `GET /admin/accounts/<id>/export[?ciphertexts=true]`,
//! `POST /admin/accounts/<id>/delete`, `POST /admin/reload`,
//! `POST /admin/rotate-cert` (a JSON body: `super::rotate`).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
/// How often histogram samples are drained into their buckets.
const UPKEEP: Duration = Duration::from_secs(5);
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
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

/// Serves admin connections on `listener` until `shutdown`; then removes
/// `admin.addr`, so commands run after the relay stops work offline.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    admin: Arc<Admin>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    // Histogram samples wait in the recorder until drained: drained here too, so a
    // relay nobody scrapes does not gather them without bound.
    let mut upkeep = tokio::time::interval(UPKEEP);
    loop {
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            _ = upkeep.tick() => {
                if let Some(handle) = admin.metrics {
                    handle.run_upkeep();
                }
                continue;
            }
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
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
                async move { Ok::<_, Infallible>(route(&admin, req).await) }
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
    let _ = std::fs::remove_file(admin.data_dir.join(super::token::ADDR_FILE));
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
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        warn!(error = %e, "admin command failed");
    }
    json(status, &serde_json::json!({ "error": e.to_string() }))
}

async fn route(admin: &Arc<Admin>, req: Request<Incoming>) -> Response<Body> {
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
    if let Some(refused) = check_token(admin, &req) {
        return refused;
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    let parts: Vec<&str> = rest.split('/').collect();
    match (method, parts.as_slice()) {
        (Method::GET, ["stats"]) => stats(admin).await,
        (Method::POST, ["reload"]) => reload(admin),
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
/// flushing, and a file written in the data directory.
async fn ready(admin: &Arc<Admin>) -> Response<Body> {
    if admin.services.budget().below_reserve() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: free disk space is at the reserve\n",
        );
    }
    let (services, dir) = (admin.services.clone(), admin.data_dir.clone());
    let probe = tokio::task::spawn_blocking(move || -> Result<(), String> {
        services
            .commit()
            .flush_now()
            .map_err(|e| format!("the stores do not flush: {e}"))?;
        let path = dir.join(".readyz");
        super::token::write_private(&path, b"ok")
            .and_then(|()| std::fs::remove_file(&path))
            .map_err(|e| format!("the data directory is not writable: {e}"))
    });
    match tokio::time::timeout(READY_WITHIN, probe).await {
        Ok(Ok(Ok(()))) => text(StatusCode::OK, "ready\n"),
        Ok(Ok(Err(why))) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
        Ok(Err(_)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the probe failed\n",
        ),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the stores did not flush within 5 s\n",
        ),
    }
}

/// The scrape's text, with the state gauges read now.
async fn rendered(admin: &Arc<Admin>) -> Option<String> {
    let handle = admin.metrics?;
    let services = admin.services.clone();
    let state = tokio::task::spawn_blocking(move || {
        let totals = services.stores().mailboxes.totals();
        crate::metrics::State {
            queued_messages: totals.messages,
            queued_bytes: totals.bytes,
            blob_bytes: services.budget().blob_bytes(),
            below_reserve: services.budget().below_reserve(),
        }
    })
    .await
    .unwrap_or_default();
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
/// response is gone (the client left), which stops the writer.
struct ToBody(tokio::sync::mpsc::Sender<Result<Bytes, Error>>);

impl std::io::Write for ToBody {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
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
    if admin.services.tombstones().contains(&account) {
        return failed(&Error::UnknownRecipient);
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let (services, verification) = (admin.services.clone(), admin.verification.clone());
    tokio::task::spawn_blocking(move || {
        let errors = tx.clone();
        let mut out = std::io::BufWriter::with_capacity(CHUNK, ToBody(tx));
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
            let _ = errors.blocking_send(Err(e));
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
