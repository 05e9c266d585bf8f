//! Leases on database time: the work that must run once across nodes (sweeps, the
//! daily discovery publication) runs on the node holding its lease. Times come from
//! the database's clock, so nodes whose clocks disagree still agree on the holder.

use super::{PgBackend, StoreResult};

/// Now on the database's clock, Unix ms, as SQL (inline: a function would be one more
/// object to create on every shard of a distributed engine).
pub const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

impl PgBackend {
    /// Takes or renews the lease `name` for `ttl`: true when this process holds it
    /// now (it held it, or the holder let it lapse); the holder is named by its
    /// [`PgBackend::incarnation`]. One statement, so two nodes asking
    /// at once never both get it.
    pub fn try_hold(&self, name: &str, ttl: std::time::Duration) -> StoreResult<bool> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let sql = format!(
            "INSERT INTO leases (name, holder, until_ms) VALUES ($1, $2, {NOW_MS} + $3) \
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until_ms = EXCLUDED.until_ms \
             WHERE leases.holder = EXCLUDED.holder OR leases.until_ms < {NOW_MS} \
             RETURNING holder"
        );
        self.run(async {
            let client = self.client().await?;
            let rows = self
                .retrying(|| async {
                    client
                        .query(&sql, &[&name, &self.incarnation(), &ttl_ms])
                        .await
                })
                .await?;
            Ok(!rows.is_empty())
        })
    }

    /// Gives the lease up at once (a clean stop), if this process holds it.
    pub fn release(&self, name: &str) -> StoreResult<()> {
        self.run(async {
            let client = self.client().await?;
            self.retrying(|| async {
                client
                    .execute(
                        "DELETE FROM leases WHERE name = $1 AND holder = $2",
                        &[&name, &self.incarnation()],
                    )
                    .await
            })
            .await
            .map(drop)
        })
    }
}
