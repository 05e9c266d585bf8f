//! One warning per database outage, not one per failed call: during an outage every
//! request, delivery read and sweep fails, each with the same cause. The first call
//! that finds the database unreachable logs it at warn; the rest of the streak at
//! debug; the first call that succeeds again logs at info how many failed between.
//! The pool's own per-connection warnings (target `deadpool.postgres`) are filtered
//! to errors by the relay's default log filter ([`crate::logging::filter`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tracing::{debug, info, warn};

use crate::store::{StoreError, StoreResult};

/// Whether the database is failing now, and how many calls failed in this streak.
#[derive(Debug, Default)]
pub(crate) struct Outage {
    failing: AtomicBool,
    failures: AtomicU64,
}

impl Outage {
    /// Notes how a call ended.
    pub(crate) fn observe<T>(&self, result: &StoreResult<T>) {
        match result {
            Ok(_) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    let failed = self.failures.swap(0, Ordering::Relaxed);
                    info!(failed_calls = failed, "PostgreSQL is back");
                }
            }
            // The message names the database's hosts and the driver's reason, never
            // a password, an account or a request's data.
            Err(e @ StoreError::Unavailable(_)) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, "PostgreSQL unreachable: requests fail with UNAVAILABLE until it answers again");
                } else {
                    debug!(error = %e, "PostgreSQL still unreachable");
                }
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    pub(crate) struct Captured(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `f` logs at info and above through the relay's default filter.
    pub(crate) fn logged(f: impl FnOnce()) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(crate::logging::filter("info").expect("filter"))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn an_outage_warns_once_per_streak_and_says_when_it_ended() {
        let o = Outage::default();
        let down: StoreResult<()> = Err(StoreError::Unavailable("PostgreSQL at /tmp: gone".into()));
        let text = logged(|| {
            for _ in 0..100 {
                o.observe(&down);
            }
            o.observe(&Ok(()));
            o.observe(&Ok(()));
            o.observe(&down);
        });
        assert_eq!(text.matches("unreachable").count(), 2, "{text}");
        assert_eq!(text.matches("is back").count(), 1, "{text}");
        assert!(text.contains("failed_calls=100"), "{text}");
        // Other errors are the callers' to report.
        let text = logged(|| o.observe(&Err::<(), _>(StoreError::Corrupt("x"))));
        assert!(text.is_empty(), "{text}");
    }

    #[test]
    fn the_pools_per_connection_warnings_are_filtered() {
        let text = logged(|| {
            tracing::warn!(target: "deadpool.postgres", "Connection error: db error");
            tracing::error!(target: "deadpool.postgres", "kept");
            tracing::warn!(target: "tern_relay::x", "ours");
        });
        assert!(!text.contains("Connection error"), "{text}");
        assert!(text.contains("kept") && text.contains("ours"), "{text}");
        // An operator who names the pool's target decides for it.
        let out = crate::logging::filter("info,deadpool.postgres=warn").expect("filter");
        assert!(out.to_string().contains("deadpool.postgres=warn"), "{out}");
    }

    #[test]
    fn calls_to_a_database_that_died_warn_once() {
        let (pg, opts) = crate::store::pg::testdb::db();
        let backend = crate::store::pg::testdb::node(&opts, "a");
        backend.run(backend.rows("SELECT 1", &[])).expect("up");
        pg.kill();
        let text = logged(|| {
            for _ in 0..5 {
                assert!(backend.run(backend.rows("SELECT 1", &[])).is_err());
            }
        });
        assert_eq!(text.matches("unreachable").count(), 1, "{text}");
        assert!(!text.contains("password"), "{text}");
        pg.restart();
        let text = logged(|| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while backend.run(backend.rows("SELECT 1", &[])).is_err() {
                assert!(std::time::Instant::now() < deadline, "never back");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        assert!(text.contains("is back"), "{text}");
    }
}
