//! What every node of one relay must share: the TLS certificate (clients pin its
//! fingerprint), the sender-certificate signing key and the discovery OPRF key. The
//! operator copies these files to each node; the database remembers a fingerprint of
//! each from the first node that started, and a node whose files differ refuses to
//! start, naming the file. The keys themselves never enter the database (the OPRF key
//! and the tags it holds together would let a reader test phone numbers).

use super::{PgBackend, StoreError, StoreResult};

/// One shared fact: its name in the `cluster` table, a fingerprint of the local file
/// (a hash or public key, never a secret), and the file, for the message.
#[derive(Debug, Clone)]
pub struct Fact {
    /// Its key in `cluster`.
    pub name: &'static str,
    /// What this node has.
    pub value: Vec<u8>,
    /// Where this node read it from.
    pub file: String,
}

impl PgBackend {
    /// Records the facts on the first start and checks them on every later one.
    /// `Err(Backend)` names the first file that differs from the cluster's.
    pub fn check_cluster(&self, facts: &[Fact]) -> StoreResult<()> {
        self.run(async {
            let client = self.client().await?;
            for fact in facts {
                let insert = client
                    .execute(
                        "INSERT INTO cluster (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                        &[&fact.name, &fact.value],
                    )
                    .await;
                insert.map_err(|e| self.classify(&e))?;
                let row = client
                    .query_one("SELECT value FROM cluster WHERE name = $1", &[&fact.name])
                    .await
                    .map_err(|e| self.classify(&e))?;
                let stored: Vec<u8> = super::rows::col(&row, 0)?;
                if stored != fact.value {
                    return Err(StoreError::Backend(format!(
                        "{} differs from the one the other nodes of this relay use \
                         ({}); copy it from a running node",
                        fact.file, fact.name
                    )));
                }
            }
            Ok(())
        })
    }

    /// Replaces fact `name` with `new` if the cluster records `old` (or `new`
    /// already, or nothing): a node that switched from `old` moves the cluster with
    /// it. `Ok(false)` if it records something else: another node switched to a
    /// different value (two nodes each staged their own certificate).
    pub fn replace_cluster_fact(&self, name: &str, old: &[u8], new: &[u8]) -> StoreResult<bool> {
        self.run(async {
            let client = self.client().await?;
            let rows = client
                .execute(
                    "INSERT INTO cluster (name, value) VALUES ($1, $3) ON CONFLICT (name) \
                     DO UPDATE SET value = EXCLUDED.value \
                     WHERE cluster.value = $2 OR cluster.value = $3",
                    &[&name, &old, &new],
                )
                .await
                .map_err(|e| self.classify(&e))?;
            Ok(rows == 1)
        })
    }

    /// Replaces a fact the nodes agreed on: a rotated TLS certificate switched in
    /// on every node at one time (`tern-relay admin rotate-cert --at`).
    pub fn set_cluster_fact(&self, name: &str, value: &[u8]) -> StoreResult<()> {
        self.run(async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO cluster (name, value) VALUES ($1, $2) \
                     ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                    &[&name, &value],
                )
                .await
                .map_err(|e| self.classify(&e))?;
            Ok(())
        })
    }
}
