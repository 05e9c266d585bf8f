//! Rate limits that must hold across nodes, in `rate_buckets` (scope, key, GCRA
//! theoretical arrival time): the verification starts per address prefix, account
//! and number ([`PgStartLimits`]). The other limits (sends, connections, lookups)
//! stay in each node's memory and are per node.
//!
//! One charge is one statement per bucket, the GCRA in SQL:
//! `INSERT … ON CONFLICT DO UPDATE SET tat = greatest(tat, now) + interval WHERE
//! greatest(tat, now) + interval - burst × interval <= now RETURNING tat` (no row:
//! refused). The buckets of one start are charged in one transaction, always in
//! scope order (so two never wait on each other), and rolled back if any refuses.
//! Times are the charging node's clock (Unix ms): nodes whose clocks differ by `d`
//! move a limit by at most `d`.

use std::sync::Arc;

use tern_proto::AccountId;

use super::rows::col;
use super::rows::db_time;
use super::PgBackend;
use crate::config::VerificationConfig;
use crate::core::rate::Rate;
use crate::error::{Error, Result};
use crate::store::StoreResult;
use crate::verification::{StartKeys, StartLimiter};

/// `rate_buckets.scope` of the verification starts per address prefix (keyed by an
/// HMAC of the prefix).
pub const SCOPE_START_PREFIX: i16 = 1;
/// … per account.
pub const SCOPE_START_ACCOUNT: i16 = 2;
/// … per number (keyed by an HMAC of the number).
pub const SCOPE_START_NUMBER: i16 = 3;

/// Buckets removed per sweep at most.
const SWEEP_MAX: i64 = 10_000;

/// One rate as GCRA parameters (ms): the interval between units, and the burst's span.
#[derive(Debug, Clone, Copy)]
pub struct Gcra {
    interval: i64,
    span: i64,
}

impl Gcra {
    /// `rate`'s parameters, as the in-memory limiter computes them.
    pub fn of(rate: Rate) -> Gcra {
        let interval = rate.period / rate.burst.get();
        let interval = i64::try_from(interval.as_millis())
            .unwrap_or(i64::MAX / 4)
            .clamp(1, i64::MAX / 4);
        let span = interval.saturating_mul(i64::from(rate.burst.get()));
        Gcra { interval, span }
    }
}

impl PgBackend {
    /// Charges one unit at `now` to every `(scope, key, rate)` of `charges`, or to
    /// none: `Ok(Err(wait_ms))` with the longest wait among those refusing.
    pub fn charge_rates(
        &self,
        charges: &[(i16, &[u8], Gcra)],
        now: u64,
    ) -> StoreResult<std::result::Result<(), u64>> {
        let now = db_time(now);
        self.run(async {
            let mut client = self.client().await?;
            let db = |e: tokio_postgres::Error| self.classify(&e);
            let tx = client.transaction().await.map_err(db)?;
            let mut wait = 0i64;
            for (scope, key, g) in charges {
                let charged = tx
                    .query_opt(
                        "INSERT INTO rate_buckets (scope, key, tat) VALUES ($1, $2, $3::bigint + $4::bigint) \
                         ON CONFLICT (scope, key) DO UPDATE \
                           SET tat = greatest(rate_buckets.tat, $3) + $4 \
                           WHERE greatest(rate_buckets.tat, $3) + $4 - $5::bigint <= $3 \
                         RETURNING tat",
                        &[scope, key, &now, &g.interval, &g.span],
                    )
                    .await
                    .map_err(db)?;
                if charged.is_none() {
                    let row = tx
                        .query_one(
                            "SELECT tat FROM rate_buckets WHERE scope = $1 AND key = $2",
                            &[scope, key],
                        )
                        .await
                        .map_err(db)?;
                    let tat: i64 = col(&row, 0)?;
                    let over = tat.max(now) + g.interval - (now + g.span);
                    wait = wait.max(over.max(1));
                }
            }
            if wait > 0 {
                tx.rollback().await.map_err(db)?;
                Ok(Err(u64::try_from(wait).unwrap_or(1)))
            } else {
                tx.commit().await.map_err(db)?;
                Ok(Ok(()))
            }
        })
    }

    /// Forgets one bucket.
    pub fn forget_rate(&self, scope: i16, key: &[u8]) -> StoreResult<()> {
        self.run(self.exec(
            "DELETE FROM rate_buckets WHERE scope = $1 AND key = $2",
            &[&scope, &key],
        ))
        .map(drop)
    }

    /// Removes buckets full again at `now` (as good as new), at most 10,000; returns
    /// how many. Any node may run it; two at once skip each other's rows.
    pub fn sweep_rates(&self, now: u64) -> StoreResult<u64> {
        let now = db_time(now);
        self.run(self.exec(
            "DELETE FROM rate_buckets WHERE (scope, key) IN ( \
               SELECT scope, key FROM rate_buckets WHERE tat <= $1 \
               LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&now, &SWEEP_MAX],
        ))
    }
}

/// The verification start limits in `rate_buckets`, shared by every node.
#[derive(Debug)]
pub struct PgStartLimits {
    backend: Arc<PgBackend>,
    prefix: Gcra,
    account: Gcra,
    number: Gcra,
}

impl PgStartLimits {
    /// The limits of `config` (`starts_per_prefix`, `_account`, `_number`) on `backend`.
    pub fn new(backend: Arc<PgBackend>, config: &VerificationConfig) -> Self {
        PgStartLimits {
            backend,
            prefix: Gcra::of(config.starts_per_prefix),
            account: Gcra::of(config.starts_per_account),
            number: Gcra::of(config.starts_per_number),
        }
    }
}

impl StartLimiter for PgStartLimits {
    fn charge(&self, keys: &StartKeys, now: u64) -> Result<()> {
        let charges = [
            (SCOPE_START_PREFIX, &keys.prefix_key[..], self.prefix),
            (
                SCOPE_START_ACCOUNT,
                &keys.account.as_bytes()[..],
                self.account,
            ),
            (SCOPE_START_NUMBER, &keys.number_key[..], self.number),
        ];
        match self.backend.charge_rates(&charges, now)? {
            Ok(()) => Ok(()),
            Err(retry_after_ms) => Err(Error::RateLimited { retry_after_ms }),
        }
    }

    fn forget_account(&self, account: &AccountId) -> Result<()> {
        Ok(self
            .backend
            .forget_rate(SCOPE_START_ACCOUNT, account.as_bytes())?)
    }

    fn sweep(&self, now: u64) -> Result<()> {
        self.backend.sweep_rates(now)?;
        Ok(())
    }
}
