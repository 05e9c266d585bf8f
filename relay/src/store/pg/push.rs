//! Push targets in PostgreSQL (`migrations/V14__push_targets.sql`): one row per
//! device, the contract of [`PushStore`].

use tern_proto::{AccountId, DeviceAddress, PushTarget};

use super::keys::params;
use super::PgBackend;
use crate::store::{PushStore, StoreError, StoreResult};

const UNIFIED_PUSH: i16 = 1;
const GATEWAY: i16 = 2;

fn columns(t: &PushTarget) -> (i16, &str, &str) {
    match t {
        PushTarget::UnifiedPush { endpoint } => (UNIFIED_PUSH, endpoint, ""),
        PushTarget::Gateway { url, device_token } => (GATEWAY, url, device_token),
    }
}

impl PushStore for PgBackend {
    fn put_push_target(&self, of: &DeviceAddress, target: &PushTarget) -> StoreResult<()> {
        let (account, device) = params(of);
        let (kind, url, token) = columns(target);
        self.run(async {
            self.exec(
                "INSERT INTO push_targets (account, device, kind, url, token) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account, device) \
                 DO UPDATE SET kind = EXCLUDED.kind, url = EXCLUDED.url, token = EXCLUDED.token",
                &[&account, &device, &kind, &url, &token],
            )
            .await?;
            Ok(())
        })
    }

    fn push_target(&self, of: &DeviceAddress) -> StoreResult<Option<PushTarget>> {
        let (account, device) = params(of);
        self.run(async {
            let rows = self
                .rows(
                    "SELECT kind, url, token FROM push_targets WHERE account = $1 AND device = $2",
                    &[&account, &device],
                )
                .await?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            let (kind, url, token): (i16, String, String) =
                (self.col(row, 0)?, self.col(row, 1)?, self.col(row, 2)?);
            match kind {
                UNIFIED_PUSH => Ok(Some(PushTarget::UnifiedPush { endpoint: url })),
                GATEWAY => Ok(Some(PushTarget::Gateway {
                    url,
                    device_token: token,
                })),
                _ => Err(StoreError::Corrupt("push target kind")),
            }
        })
    }

    fn remove_push_target(
        &self,
        of: &DeviceAddress,
        only: Option<&PushTarget>,
    ) -> StoreResult<bool> {
        let (account, device) = params(of);
        self.run(async {
            let n = match only {
                None => {
                    self.exec(
                        "DELETE FROM push_targets WHERE account = $1 AND device = $2",
                        &[&account, &device],
                    )
                    .await?
                }
                Some(t) => {
                    let (kind, url, token) = columns(t);
                    self.exec(
                        "DELETE FROM push_targets WHERE account = $1 AND device = $2 \
                         AND kind = $3 AND url = $4 AND token = $5",
                        &[&account, &device, &kind, &url, &token],
                    )
                    .await?
                }
            };
            Ok(n > 0)
        })
    }

    fn remove_account_push_targets(&self, account: &AccountId) -> StoreResult<()> {
        self.delete_account_rows(&["push_targets"], account)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use crate::store::conformance;
    use crate::store::pg::testdb::{db, node, sql};

    #[test]
    fn conformance_on_postgres_and_what_the_table_holds() {
        let (_pg, opts) = db();
        let a = node(&opts, "a");
        conformance::push_rules(&a);
        // A second node sees the first one's writes (one shared table).
        let b = node(&opts, "b");
        let dev = conformance::addr(50, 3);
        crate::store::PushStore::put_push_target(&a, &dev, &conformance::gateway("g1"))
            .expect("put");
        assert_eq!(
            crate::store::PushStore::push_target(&b, &dev).expect("read"),
            Some(conformance::gateway("g1"))
        );
        // The rules removed what they put: this device's row is the table's only one.
        let rows = sql(&a, "SELECT count(*) FROM push_targets");
        assert_eq!(rows[0].get::<_, i64>(0), 1);
    }
}
