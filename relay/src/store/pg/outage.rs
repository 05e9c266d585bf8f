//! One warning per database outage, not one per failed call: during an outage every
//! request, delivery read and sweep fails, each with the same cause. The first call
//! that finds the database unreachable logs it at warn; the rest of the outage at
//! debug. An outage ends once calls succeed with no failure for [`SETTLE`]: the
//! first success after that logs at info how many calls failed in all. So a partial
//! outage, where some calls fail and others succeed (one host of several, a pool
//! half broken), logs one warning and one info, not a pair per flip.
//! The pool's own per-connection warnings (target `deadpool.postgres`) are filtered
//! to errors by the relay's default log filter ([`crate::logging::filter`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::store::{StoreError, StoreResult};

/// How long calls must go without a failure for an outage to have ended.
pub(crate) const SETTLE: Duration = Duration::from_secs(5);

/// Whether an outage is on, and its failures so far.
#[derive(Debug, Default)]
pub(crate) struct Outage {
    // Read by every call: a success outside an outage takes no lock.
    on: AtomicBool,
    streak: Mutex<Streak>,
}

#[derive(Debug, Default)]
struct Streak {
    /// The outage's last failure; `None` outside an outage.
    last_failure: Option<Instant>,
    failures: u64,
}

impl Outage {
    /// Notes how a call ended.
    pub(crate) fn observe<T>(&self, result: &StoreResult<T>) {
        match result {
            Ok(_) if !self.on.load(Ordering::Relaxed) => {}
            Ok(_) | Err(StoreError::Unavailable(_)) => self.observe_at(result, Instant::now()),
            Err(_) => {}
        }
    }

    /// [`Outage::observe`] of a call that ended at `now`.
    pub(crate) fn observe_at<T>(&self, result: &StoreResult<T>, now: Instant) {
        let mut streak = self.streak.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(_) => {
                let settled = streak
                    .last_failure
                    .is_some_and(|at| now.saturating_duration_since(at) >= SETTLE);
                if settled {
                    info!(failed_calls = streak.failures, "PostgreSQL is back");
                    *streak = Streak::default();
                    self.on.store(false, Ordering::Relaxed);
                }
            }
            // The message names the database's hosts and the driver's reason, never
            // a password, an account or a request's data.
            Err(e @ StoreError::Unavailable(_)) => {
                streak.failures += 1;
                // Calls end out of order across threads: the latest failure counts.
                let last = streak.last_failure.map_or(now, |at| at.max(now));
                if streak.last_failure.replace(last).is_none() {
                    self.on.store(true, Ordering::Relaxed);
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
pub(crate) mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

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

    /// A new outage log, and the instant `ms` after a start common to its calls.
    fn clocked() -> (Outage, impl Fn(u64) -> Instant) {
        let t0 = Instant::now();
        (Outage::default(), move |ms| t0 + Duration::from_millis(ms))
    }

    fn down() -> StoreResult<()> {
        Err(StoreError::Unavailable("PostgreSQL at /tmp: gone".into()))
    }

    #[test]
    fn an_outage_warns_once_and_says_when_calls_succeeded_for_a_settled_period() {
        let (o, at) = clocked();
        let text = logged(|| {
            for i in 0..100 {
                o.observe_at(&down(), at(i));
            }
            // Succeeding, but not yet for the settled period.
            o.observe_at(&Ok(()), at(100));
            o.observe_at(&Ok(()), at(99 + SETTLE.as_millis() as u64 - 1));
        });
        assert_eq!(text.matches("unreachable").count(), 1, "{text}");
        assert!(!text.contains("is back"), "{text}");
        let text = logged(|| {
            o.observe_at(&Ok(()), at(99) + SETTLE);
            o.observe_at(&Ok(()), at(99) + SETTLE * 2);
        });
        assert_eq!(text.matches("is back").count(), 1, "{text}");
        assert!(text.contains("failed_calls=100"), "{text}");
        // A new outage warns again.
        let text = logged(|| o.observe_at(&down(), at(99) + SETTLE * 3));
        assert_eq!(text.matches("unreachable").count(), 1, "{text}");
        // Other errors are the callers' to report.
        let text = logged(|| o.observe(&Err::<(), _>(StoreError::Corrupt("x"))));
        assert!(text.is_empty(), "{text}");
    }

    #[test]
    fn a_partial_outage_that_flips_warns_once_not_per_flip() {
        let (o, at) = clocked();
        // Every other call fails, for a minute.
        let text = logged(|| {
            for i in 0..600 {
                let r = if i % 2 == 0 { down() } else { Ok(()) };
                o.observe_at(&r, at(i * 100));
            }
        });
        assert_eq!(text.matches("unreachable").count(), 1, "{text}");
        assert!(!text.contains("is back"), "{text}");
        // Then no failure for the settled period.
        let text = logged(|| o.observe_at(&Ok(()), at(59_800) + SETTLE));
        assert_eq!(text.matches("is back").count(), 1, "{text}");
        assert!(text.contains("failed_calls=300"), "{text}");
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
        assert!(!text.contains("is back"), "not yet settled: {text}");
        // A success once the settled period has passed since the last failure.
        let text = logged(|| backend.outage.observe_at(&Ok(()), Instant::now() + SETTLE));
        assert!(text.contains("is back"), "{text}");
    }
}
