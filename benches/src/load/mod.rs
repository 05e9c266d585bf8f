//! `tern-load`: drives a real `tern-relay` process over QUIC with real end-to-end
//! encrypted messages, and reports what it held.
//!
//! - [`online`]: senders and recipients all connected; throughput and end-to-end
//!   latency, from the send call (before encryption) to the decrypted message; with
//!   `presealed`, every envelope is sealed before the clock and recipients check and
//!   acknowledge without opening: the relay alone.
//! - [`offline`]: recipients offline while senders enqueue (accept rate), then they
//!   connect and drain with acknowledgements (drain rate); then every message is
//!   decrypted and checked: exactly once, in order per sender.
//! - [`connections`]: idle authenticated connections held; relay memory per connection.
//! - [`media`]: one attachment up and down; MB/s each way and peak memory on both sides.
//! - [`restart()`]: N messages queued, the relay stopped (SIGTERM) and started again on
//!   the same data: the time until it serves, and its memory.
//!
//! - [`group()`]: one message to `devices` recipient devices by multi-recipient
//!   send: upload per message and per device, relay data growth, fan-out latency.
//!
//! [`pin`]: the relay and the load generator on CPUs of their own.
//!
//! Devices here are [`peer::Peer`]s: tern-client's keys, connection and message crypto
//! without the device store.

pub mod discovery;
mod group;
mod modes;
pub mod peer;
pub mod pg;
pub mod pin;
pub mod relay;
mod restart;

use std::collections::BTreeMap;

pub use self::group::{group, GroupArgs};
pub use self::modes::{
    connections, media, offline, online, online_across, ConnectionsArgs, MediaArgs, OfflineArgs,
    OnlineArgs, OnlineNodes,
};
pub use self::restart::{restart, RestartArgs};

/// Any failure of a run; the run fails loudly with it.
pub type LoadError = Box<dyn std::error::Error + Send + Sync>;

/// The JSON fields every run prints (issue #5), beside its mode's own.
pub const COMMON_FIELDS: [&str; 10] = [
    "mode",
    "messages",
    "size",
    "msgs_per_sec",
    "mb_per_sec",
    "p50_us",
    "p99_us",
    "p999_us",
    "relay_cpu_s",
    "relay_peak_rss_kib",
];

/// What a run measured: printed as a table, or as one JSON object.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// `online`, `offline`, `connections` or `media`.
    pub mode: String,
    /// Messages moved (all of them, every pair or recipient together).
    pub messages: u64,
    /// Application bytes per message.
    pub size: usize,
    /// The headline rate: delivered (online) or accepted (offline) messages per second.
    pub msgs_per_sec: f64,
    /// `msgs_per_sec` in application megabytes (10^6 bytes) per second.
    pub mb_per_sec: f64,
    /// Latency percentiles in µs: end to end (online) or per send request (offline).
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// CPU seconds the relay used during the run.
    pub relay_cpu_s: f64,
    /// The relay's peak resident memory.
    pub relay_peak_rss_kib: u64,
    /// `connections`: relay memory per idle authenticated connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_per_conn_kib: Option<f64>,
    /// This process's peak resident memory.
    pub client_peak_rss_kib: u64,
    /// `online` and `offline`: `end-to-end` (messages sealed and opened while the
    /// clock runs) or `presealed` (sealed before it starts: the relay alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealing: Option<String>,
    /// Where the relay and this process ran: `none`, or `relay=0 load=1` (`--pin`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinning: Option<String>,
    /// Everything else the mode measured.
    #[serde(flatten)]
    pub extra: BTreeMap<String, f64>,
}

impl Report {
    /// A report for `messages` of `size` bytes moved in `seconds`.
    pub fn rate(mode: &str, messages: u64, size: usize, seconds: f64) -> Report {
        Report {
            mode: mode.into(),
            messages,
            size,
            msgs_per_sec: messages as f64 / seconds,
            mb_per_sec: messages as f64 * size as f64 / seconds / 1e6,
            ..Report::default()
        }
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = vec![
            ("mode".into(), self.mode.clone()),
            ("messages".into(), self.messages.to_string()),
            ("size (bytes)".into(), self.size.to_string()),
            ("messages/s".into(), format!("{:.0}", self.msgs_per_sec)),
            ("MB/s".into(), format!("{:.1}", self.mb_per_sec)),
            ("p50 (µs)".into(), format!("{:.0}", self.p50_us)),
            ("p99 (µs)".into(), format!("{:.0}", self.p99_us)),
            ("p99.9 (µs)".into(), format!("{:.0}", self.p999_us)),
            ("relay CPU (s)".into(), format!("{:.2}", self.relay_cpu_s)),
            (
                "relay peak RSS (KiB)".into(),
                self.relay_peak_rss_kib.to_string(),
            ),
            (
                "tern-load peak RSS (KiB)".into(),
                self.client_peak_rss_kib.to_string(),
            ),
        ];
        for (k, v) in [("sealing", &self.sealing), ("pinning", &self.pinning)] {
            if let Some(v) = v {
                rows.insert(1, (k.into(), v.clone()));
            }
        }
        if let Some(r) = self.rss_per_conn_kib {
            rows.push(("relay KiB per connection".into(), format!("{r:.1}")));
        }
        for (k, v) in &self.extra {
            rows.push((k.clone(), format!("{v:.2}")));
        }
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<width$}  {v}\n"))
            .collect()
    }
}

/// Percentiles of samples in µs: (p50, p99, p99.9).
pub fn percentiles(samples: &mut [u64]) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i.min(samples.len() - 1)] as f64
    };
    (at(0.50), at(0.99), at(0.999))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let mut v: Vec<u64> = (1..=1000).rev().collect();
        let (p50, p99, p999) = percentiles(&mut v);
        assert_eq!((p50, p99, p999), (501.0, 990.0, 999.0));
        assert_eq!(percentiles(&mut []), (0.0, 0.0, 0.0));
    }

    #[test]
    fn reports_print_every_field() {
        let mut r = Report {
            mode: "offline".into(),
            messages: 10,
            ..Report::default()
        };
        r.extra.insert("drain_msgs_per_sec".into(), 5.0);
        let json = serde_json::to_value(&r).expect("json");
        for field in COMMON_FIELDS.iter().chain(&["drain_msgs_per_sec"]) {
            assert!(json.get(field).is_some(), "{field}");
        }
        assert!(r.table().contains("drain_msgs_per_sec"));
    }
}
