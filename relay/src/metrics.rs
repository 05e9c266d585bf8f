//! The relay's metrics: aggregates only (P9), served in Prometheus text format on
//! the admin listener (`crate::admin::server`).
//!
//! The services record at their choke points through the functions here, each into
//! a series with a static name and, at most, one label from a small fixed set (a
//! request kind, an error code, a cause): never an account, device, token, address
//! or blob id. Every series the services record into is registered once, when the
//! recorder is installed, so a record is an atomic add on a handle; without an
//! installed recorder (no admin listener) every call is a no-op. Gauges of state
//! (queued messages, stored blob bytes, uptime) are set by the admin listener's
//! upkeep every few seconds and by each scrape, not on the hot path.
//!
//! The recorder is the process's: relays started in one process (tests) share it.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Every metric's name; ARCHITECTURE.md "Metrics and the admin interface" says what
/// each means, and deploy/grafana/tern-relay.json charts them.
pub mod names {
    /// Gauge, 1, labelled with the relay's version.
    pub const BUILD_INFO: &str = "tern_build_info";
    /// Gauge: seconds since the relay started.
    pub const UPTIME: &str = "tern_uptime_seconds";
    /// Counter, `kind`: connections that authenticated, or made an anonymous request.
    pub const CONNECTIONS: &str = "tern_connections_total";
    /// Gauge: QUIC connections open now (past admission).
    pub const CONNECTIONS_OPEN: &str = "tern_connections_open";
    /// Counter, `cause`: connections refused or closed before they were of use.
    pub const CONNECTIONS_REFUSED: &str = "tern_connections_refused_total";
    /// Counter, `kind` (direct, sealed, multi): sends stored.
    pub const SENDS: &str = "tern_sends_total";
    /// Counter, `kind`: envelopes those sends stored.
    pub const SENT_ENVELOPES: &str = "tern_sent_envelopes_total";
    /// Counter: messages pushed to connected devices.
    pub const DELIVERIES: &str = "tern_deliveries_total";
    /// Counter: messages taken from the rows a cross-node hint carried (pushed
    /// without reading the mailbox), as many as fit the window.
    pub const CARRIED: &str = "tern_carried_deliveries_total";
    /// Counter: messages deleted by acknowledgements.
    pub const ACKS: &str = "tern_acked_messages_total";
    /// Gauge: messages queued in every mailbox.
    pub const QUEUED_MESSAGES: &str = "tern_queued_messages";
    /// Gauge: bytes those messages take.
    pub const QUEUED_BYTES: &str = "tern_queued_bytes";
    /// Histogram: commits answered by one flush of the group commit.
    pub const GROUP_COMMIT_SIZE: &str = "tern_group_commit_size";
    /// Histogram: seconds a writer waits for its group commit.
    pub const GROUP_COMMIT_SECONDS: &str = "tern_group_commit_seconds";
    /// Histogram: seconds of one flush of the stores (the mailbox log's fdatasync
    /// and the database's flush).
    pub const FLUSH_SECONDS: &str = "tern_flush_seconds";
    /// Histogram: seconds of the mailbox log's fdatasync calls in one flush.
    pub const FSYNC_SECONDS: &str = "tern_fsync_seconds";
    /// Counter: expiry sweeps run.
    pub const SWEEPS: &str = "tern_sweeps_total";
    /// Counter, `what` (messages, blobs, uploads): deleted by expiry.
    pub const EXPIRED: &str = "tern_expired_total";
    /// Gauge: bytes of finished blobs stored.
    pub const BLOB_BYTES: &str = "tern_blob_bytes";
    /// Counter, `direction` (upload, download): blob bytes transferred.
    pub const BLOB_TRANSFER_BYTES: &str = "tern_blob_transfer_bytes_total";
    /// Counter, `direction`: uploads finished, downloads served to their end.
    pub const BLOB_TRANSFERS: &str = "tern_blob_transfers_total";
    /// Counter, `kind`: requests refused by a rate limit.
    pub const RATE_LIMITED: &str = "tern_rate_limited_total";
    /// Counter, `code`: requests answered with an error.
    pub const ERRORS: &str = "tern_errors_total";
    /// Counter: blinded numbers evaluated for contact discovery.
    pub const DISCOVERY_EVALUATIONS: &str = "tern_discovery_evaluations_total";
    /// Gauge, 0 or 1: free disk space is at the reserve (sends are refused).
    pub const DISK_BELOW_RESERVE: &str = "tern_disk_below_reserve";
    /// Counter, `command`: admin requests served.
    pub const ADMIN_REQUESTS: &str = "tern_admin_requests_total";
    /// Counter, `reason` (missing, wrong): admin requests refused for their token.
    pub const ADMIN_REFUSED: &str = "tern_admin_refused_total";

    /// Every name above.
    pub const ALL: &[&str] = &[
        BUILD_INFO,
        UPTIME,
        CONNECTIONS,
        CONNECTIONS_OPEN,
        CONNECTIONS_REFUSED,
        SENDS,
        SENT_ENVELOPES,
        DELIVERIES,
        CARRIED,
        ACKS,
        QUEUED_MESSAGES,
        QUEUED_BYTES,
        GROUP_COMMIT_SIZE,
        GROUP_COMMIT_SECONDS,
        FLUSH_SECONDS,
        FSYNC_SECONDS,
        SWEEPS,
        EXPIRED,
        BLOB_BYTES,
        BLOB_TRANSFER_BYTES,
        BLOB_TRANSFERS,
        RATE_LIMITED,
        ERRORS,
        DISCOVERY_EVALUATIONS,
        DISK_BELOW_RESERVE,
        ADMIN_REQUESTS,
        ADMIN_REFUSED,
    ];
}

use names::*;

/// Group commit sizes: 1 to 4096 commits.
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];
/// Latencies, seconds: 50 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

struct Installed {
    handle: PrometheusHandle,
    started: Instant,
    handles: Handles,
}

/// Every series the services record into, registered once when the recorder is
/// installed: a `counter!(NAME, "kind" => kind)` call builds its key (a label
/// vector) and looks it up in the registry each time, on the hot path.
struct Handles {
    /// One pair per [`SendKind`]: sends, and envelopes they stored.
    sends: [(Counter, Counter); 3],
    /// One per [`ConnKind`].
    connections: [Counter; 2],
    connections_open: Gauge,
    /// One per [`Refused`].
    refused: [Counter; 3],
    deliveries: Counter,
    carried: Counter,
    acks: Counter,
    group_commit_size: Histogram,
    flush_seconds: Histogram,
    commit_wait: Histogram,
    fsync: Histogram,
    sweeps: Counter,
    /// One per [`Expired`].
    expired: [Counter; 3],
    /// One pair per [`Direction`]: bytes, transfers.
    blobs: [(Counter, Counter); 2],
    /// One per [`RATE_KINDS`] entry.
    rate_limited: Vec<Counter>,
    /// One per [`ERROR_LABELS`] entry.
    errors: Vec<Counter>,
    discovery: Counter,
}

impl Handles {
    fn register() -> Handles {
        let sends = [SendKind::Direct, SendKind::Sealed, SendKind::Multi].map(|k| {
            let kind = k.label();
            (
                counter!(SENDS, "kind" => kind),
                counter!(SENT_ENVELOPES, "kind" => kind),
            )
        });
        let blobs = [Direction::Upload, Direction::Download].map(|d| {
            let direction = d.label();
            (
                counter!(BLOB_TRANSFER_BYTES, "direction" => direction),
                counter!(BLOB_TRANSFERS, "direction" => direction),
            )
        });
        Handles {
            sends,
            connections: [ConnKind::Authenticated, ConnKind::Anonymous]
                .map(|k| counter!(CONNECTIONS, "kind" => k.label())),
            connections_open: gauge!(CONNECTIONS_OPEN),
            refused: [Refused::PerAddress, Refused::Full, Refused::AuthDeadline]
                .map(|c| counter!(CONNECTIONS_REFUSED, "cause" => c.label())),
            deliveries: counter!(DELIVERIES),
            carried: counter!(CARRIED),
            acks: counter!(ACKS),
            group_commit_size: histogram!(GROUP_COMMIT_SIZE),
            flush_seconds: histogram!(FLUSH_SECONDS),
            commit_wait: histogram!(GROUP_COMMIT_SECONDS),
            fsync: histogram!(FSYNC_SECONDS),
            sweeps: counter!(SWEEPS),
            expired: [Expired::Messages, Expired::Blobs, Expired::Uploads]
                .map(|w| counter!(EXPIRED, "what" => w.label())),
            blobs,
            rate_limited: RATE_KINDS
                .iter()
                .map(|k| counter!(RATE_LIMITED, "kind" => *k))
                .collect(),
            errors: ERROR_LABELS
                .iter()
                .map(|c| counter!(ERRORS, "code" => *c))
                .collect(),
            discovery: counter!(DISCOVERY_EVALUATIONS),
        }
    }
}

static INSTALLED: OnceLock<Option<Installed>> = OnceLock::new();

/// The registered series; `None` without a recorder (every record is then a no-op).
fn handles() -> Option<&'static Handles> {
    INSTALLED.get()?.as_ref().map(|i| &i.handles)
}

/// Installs the process's recorder (once; later calls return the same handle).
/// `None` if another recorder was installed first, by an embedder.
pub fn install() -> Option<&'static PrometheusHandle> {
    INSTALLED
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(GROUP_COMMIT_SIZE.into()), SIZE_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                });
            let handle = match builder {
                Ok(b) => b.install_recorder().ok()?,
                Err(_) => return None,
            };
            describe();
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            Some(Installed {
                handle,
                started: Instant::now(),
                handles: Handles::register(),
            })
        })
        .as_ref()
        .map(|i| &i.handle)
}

/// Seconds since [`install`].
pub(crate) fn uptime() -> Duration {
    INSTALLED
        .get()
        .and_then(Option::as_ref)
        .map_or(Duration::ZERO, |i| i.started.elapsed())
}

fn describe() {
    use metrics::{describe_counter as c, describe_gauge as g, describe_histogram as h};
    g!(BUILD_INFO, "The relay's version (value 1)");
    g!(UPTIME, Unit::Seconds, "Seconds since the relay started");
    c!(
        CONNECTIONS,
        "Connections that authenticated or made an anonymous request"
    );
    g!(CONNECTIONS_OPEN, "QUIC connections open now");
    c!(CONNECTIONS_REFUSED, "Connections refused, by cause");
    c!(SENDS, "Sends stored, by kind");
    c!(SENT_ENVELOPES, "Envelopes stored by sends, by kind");
    c!(DELIVERIES, "Messages pushed to connected devices");
    c!(ACKS, "Messages deleted by acknowledgements");
    g!(QUEUED_MESSAGES, "Messages queued in every mailbox");
    g!(QUEUED_BYTES, Unit::Bytes, "Bytes of queued messages");
    h!(
        GROUP_COMMIT_SIZE,
        "Commits answered by one group-commit flush"
    );
    h!(
        GROUP_COMMIT_SECONDS,
        Unit::Seconds,
        "Time a writer waits for its group commit"
    );
    h!(
        FLUSH_SECONDS,
        Unit::Seconds,
        "Time of one flush of the stores"
    );
    h!(
        FSYNC_SECONDS,
        Unit::Seconds,
        "Time of the mailbox log's fdatasync in one flush"
    );
    c!(SWEEPS, "Expiry sweeps run");
    c!(EXPIRED, "Messages, blobs and uploads deleted by expiry");
    g!(BLOB_BYTES, Unit::Bytes, "Bytes of finished blobs stored");
    c!(
        BLOB_TRANSFER_BYTES,
        Unit::Bytes,
        "Blob bytes transferred, by direction"
    );
    c!(
        BLOB_TRANSFERS,
        "Blob uploads finished and downloads served, by direction"
    );
    c!(RATE_LIMITED, "Requests refused by a rate limit, by limit");
    c!(ERRORS, "Requests answered with an error, by code");
    c!(
        DISCOVERY_EVALUATIONS,
        "Blinded numbers evaluated for contact discovery"
    );
    g!(
        DISK_BELOW_RESERVE,
        "1 while free disk space is at the reserve"
    );
    c!(ADMIN_REQUESTS, "Admin requests served, by command");
    c!(
        ADMIN_REFUSED,
        "Admin requests refused for a missing or wrong token"
    );
}

/// How a connection came to be of use.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ConnKind {
    Authenticated,
    Anonymous,
}

impl ConnKind {
    fn label(self) -> &'static str {
        match self {
            ConnKind::Authenticated => "authenticated",
            ConnKind::Anonymous => "anonymous",
        }
    }
}

pub(crate) fn connection(kind: ConnKind) {
    if let Some(h) = handles() {
        h.connections[kind as usize].increment(1);
    }
}

/// A connection open from its handshake to its close.
pub(crate) struct OpenConnection(());

impl OpenConnection {
    pub(crate) fn new() -> Self {
        if let Some(h) = handles() {
            h.connections_open.increment(1.0);
        }
        OpenConnection(())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(h) = handles() {
            h.connections_open.decrement(1.0);
        }
    }
}

/// Why a connection was refused or closed before it was of use.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refused {
    /// Its address (or /64) holds its share of connections or handshakes.
    PerAddress,
    /// The unauthenticated pool or `max_connections` is full.
    Full,
    /// Neither authenticated nor an anonymous request by the deadline.
    AuthDeadline,
}

impl Refused {
    fn label(self) -> &'static str {
        match self {
            Refused::PerAddress => "per_address",
            Refused::Full => "full",
            Refused::AuthDeadline => "auth_deadline",
        }
    }
}

pub(crate) fn refused(cause: Refused) {
    if let Some(h) = handles() {
        h.refused[cause as usize].increment(1);
    }
}

/// What kind of send.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SendKind {
    Direct,
    Sealed,
    Multi,
}

impl SendKind {
    fn label(self) -> &'static str {
        match self {
            SendKind::Direct => "direct",
            SendKind::Sealed => "sealed",
            SendKind::Multi => "multi",
        }
    }
}

/// A send of `kind` whose `envelopes` are durable (counted once its commit is done).
pub(crate) fn sent(kind: SendKind, envelopes: usize) {
    if let Some(h) = handles() {
        let (sends, sent) = &h.sends[kind as usize];
        sends.increment(1);
        sent.increment(envelopes as u64);
    }
}

pub(crate) fn delivered(n: usize) {
    if let (Some(h), true) = (handles(), n > 0) {
        h.deliveries.increment(n as u64);
    }
}

pub(crate) fn carried(n: usize) {
    if let (Some(h), true) = (handles(), n > 0) {
        h.carried.increment(n as u64);
    }
}

pub(crate) fn acked(n: u64) {
    if let Some(h) = handles() {
        h.acks.increment(n);
    }
}

pub(crate) fn group_commit(size: usize, flush: Duration) {
    if let Some(h) = handles() {
        h.group_commit_size.record(size as f64);
        h.flush_seconds.record(flush.as_secs_f64());
    }
}

pub(crate) fn commit_wait(waited: Duration) {
    if let Some(h) = handles() {
        h.commit_wait.record(waited.as_secs_f64());
    }
}

pub(crate) fn fsync(took: Duration) {
    if let Some(h) = handles() {
        h.fsync.record(took.as_secs_f64());
    }
}

pub(crate) fn sweep() {
    if let Some(h) = handles() {
        h.sweeps.increment(1);
    }
}

/// What expiry deleted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Expired {
    Messages,
    Blobs,
    Uploads,
}

impl Expired {
    fn label(self) -> &'static str {
        match self {
            Expired::Messages => "messages",
            Expired::Blobs => "blobs",
            Expired::Uploads => "uploads",
        }
    }
}

pub(crate) fn expired(what: Expired, n: u64) {
    if let (Some(h), true) = (handles(), n > 0) {
        h.expired[what as usize].increment(n);
    }
}

/// Which way blob bytes went.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Direction {
    Upload,
    Download,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::Upload => "upload",
            Direction::Download => "download",
        }
    }
}

pub(crate) fn blob_bytes(direction: Direction, n: usize) {
    if let Some(h) = handles() {
        h.blobs[direction as usize].0.increment(n as u64);
    }
}

pub(crate) fn blob_transfer(direction: Direction) {
    if let Some(h) = handles() {
        h.blobs[direction as usize].1.increment(1);
    }
}

/// The `[rate_limits]` keys whose refusals are counted (`core::rate::rules`).
const RATE_KINDS: &[&str] = &[
    "registrations_per_prefix",
    "add_device_per_account",
    "sends_per_account",
    "sealed_sends_per_token",
    "sealed_sends_per_prefix",
    "intake_per_sender_per_mailbox",
    "fetch_keys_per_requester",
    "one_time_prekeys_per_device",
    "group_commits_per_device",
    "create_groups_per_prefix",
    "exports_per_account",
];

/// A refusal by the rate limit `kind` (a `[rate_limits]` key).
pub(crate) fn rate_limited(kind: &'static str) {
    let Some(h) = handles() else { return };
    match RATE_KINDS.iter().position(|k| *k == kind) {
        Some(i) => h.rate_limited[i].increment(1),
        // A kind added without its entry above: counted all the same.
        None => counter!(RATE_LIMITED, "kind" => kind).increment(1),
    }
}

/// A request answered with `code`.
pub(crate) fn error(code: tern_proto::ErrorCode) {
    if let Some(h) = handles() {
        h.errors[error_slot(code)].increment(1);
    }
}

/// Every error code's label: snake case, no spaces.
const ERROR_LABELS: &[&str] = &[
    "unspecified",
    "bad_request",
    "unauthorized",
    "unknown_recipient",
    "mailbox_full",
    "too_large",
    "rate_limited",
    "expired",
    "internal",
    "unavailable",
    "not_found",
    "quota_exceeded",
    "invalid_number",
    "wrong_code",
    "not_verified",
    "stale_device_list",
    "stale_epoch",
    "unknown_group",
    "group_exists",
    "push_target_refused",
    "push_endpoint_unverified",
];

/// A code's place in [`ERROR_LABELS`].
fn error_slot(code: tern_proto::ErrorCode) -> usize {
    use tern_proto::ErrorCode as C;
    match code {
        C::BadRequest => 1,
        C::Unauthorized => 2,
        C::UnknownRecipient => 3,
        C::MailboxFull => 4,
        C::TooLarge => 5,
        C::RateLimited => 6,
        C::Expired => 7,
        C::Internal => 8,
        C::Unavailable => 9,
        C::NotFound => 10,
        C::QuotaExceeded => 11,
        C::InvalidNumber => 12,
        C::WrongCode => 13,
        C::NotVerified => 14,
        C::StaleDeviceList => 15,
        C::StaleEpoch => 16,
        C::UnknownGroup => 17,
        C::GroupExists => 18,
        C::PushTargetRefused => 19,
        C::PushEndpointUnverified => 20,
        _ => 0,
    }
}

pub(crate) fn discovery_evaluations(n: usize) {
    if let Some(h) = handles() {
        h.discovery.increment(n as u64);
    }
}

pub(crate) fn admin_request(command: &'static str) {
    counter!(ADMIN_REQUESTS, "command" => command).increment(1);
}

/// Why an admin request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdminRefused {
    Missing,
    Wrong,
    /// From a peer off loopback, without `[admin] allow_remote_admin`.
    Remote,
}

pub(crate) fn admin_refused(reason: AdminRefused) {
    let reason = match reason {
        AdminRefused::Missing => "missing",
        AdminRefused::Wrong => "wrong",
        AdminRefused::Remote => "remote",
    };
    counter!(ADMIN_REFUSED, "reason" => reason).increment(1);
}

/// The state the gauges report, read by the admin listener's upkeep and by each scrape.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct State {
    pub(crate) queued_messages: u64,
    pub(crate) queued_bytes: u64,
    pub(crate) blob_bytes: u64,
    pub(crate) below_reserve: bool,
}

/// Sets the gauges of `state` and uptime, and drains histogram samples into their
/// buckets (they wait in the recorder until drained).
pub(crate) fn upkeep(handle: &PrometheusHandle, state: State) {
    gauge!(UPTIME).set(uptime().as_secs_f64());
    gauge!(QUEUED_MESSAGES).set(state.queued_messages as f64);
    gauge!(QUEUED_BYTES).set(state.queued_bytes as f64);
    gauge!(BLOB_BYTES).set(state.blob_bytes as f64);
    gauge!(DISK_BELOW_RESERVE).set(if state.below_reserve { 1.0 } else { 0.0 });
    handle.run_upkeep();
}

/// The text a scrape answers: [`upkeep`] with `state`, then the rendering.
pub(crate) fn render(handle: &PrometheusHandle, state: State) -> String {
    upkeep(handle, state);
    handle.render()
}

/// One sample of a rendered scrape: `name{labels} value`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sample {
    /// The metric's name (with `_bucket`, `_sum`, `_count` for histograms).
    pub name: String,
    /// Its labels, as written (`kind="sealed"`), empty for none.
    pub labels: String,
    /// Its value.
    pub value: f64,
}

/// The samples of Prometheus text (comments and malformed lines skipped).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            Some(Sample {
                name: name.to_owned(),
                labels: labels.to_owned(),
                value,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_with_and_without_labels() {
        let text = "# HELP x y\n# TYPE x counter\ntern_sends_total{kind=\"sealed\"} 3\ntern_uptime_seconds 1.5\nbroken\n\n";
        assert_eq!(
            parse(text),
            vec![
                Sample {
                    name: "tern_sends_total".into(),
                    labels: "kind=\"sealed\"".into(),
                    value: 3.0
                },
                Sample {
                    name: "tern_uptime_seconds".into(),
                    labels: String::new(),
                    value: 1.5
                },
            ]
        );
    }

    /// The `tern_...` names in `text`, histogram suffixes taken off.
    fn mentioned(text: &str) -> std::collections::BTreeSet<String> {
        let mut found = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(i) = rest.find("tern_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            let name = ["_bucket", "_count", "_sum"].iter().fold(name, |n, s| {
                n.strip_suffix(s).map_or(n.clone(), str::to_owned)
            });
            found.insert(name);
        }
        found
    }

    #[test]
    fn the_dashboard_and_the_manual_name_exactly_these_metrics() {
        let all: std::collections::BTreeSet<String> =
            names::ALL.iter().map(|n| (*n).to_owned()).collect();
        let dashboard = include_str!("../../deploy/grafana/tern-relay.json");
        let charted = mentioned(dashboard);
        assert_eq!(charted, all, "deploy/grafana/tern-relay.json");
        let manual = include_str!("../../ARCHITECTURE.md");
        let start = manual.find("## 12a.").expect("section 12a");
        let end = manual[start..]
            .find("\n## ")
            .map_or(manual.len(), |e| start + e);
        let table: std::collections::BTreeSet<String> = mentioned(&manual[start..end])
            .into_iter()
            .filter(|n| all.contains(n) || n.ends_with("_total") || n.ends_with("_seconds"))
            .collect();
        assert_eq!(table, all, "ARCHITECTURE.md section 12a");
    }

    #[test]
    fn labels_are_distinct_and_every_counted_rate_is_a_rate_limits_key() {
        let distinct: std::collections::BTreeSet<_> = ERROR_LABELS.iter().collect();
        assert_eq!(distinct.len(), ERROR_LABELS.len());
        let distinct: std::collections::BTreeSet<_> = RATE_KINDS.iter().collect();
        assert_eq!(distinct.len(), RATE_KINDS.len());
        for kind in RATE_KINDS {
            assert!(crate::core::rate::RELOADABLE.contains(kind), "{kind}");
        }
        // Every key the rules name after `counted` is defined is one they count.
        let rules = include_str!("core/rate/rules.rs");
        let after = &rules[rules.find("fn counted(").expect("counted")..];
        for kind in crate::core::rate::RELOADABLE {
            if after.contains(&format!("\"{kind}\"")) {
                assert!(RATE_KINDS.contains(kind), "{kind} is counted: add it");
            }
        }
    }

    #[test]
    fn every_error_code_has_a_label_without_spaces() {
        for wire in 0..64 {
            let label = ERROR_LABELS[error_slot(tern_proto::ErrorCode::from_wire(wire))];
            assert!(
                label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{label}"
            );
        }
    }
}
