//! [`VerificationSessions`] on PostgreSQL (`verification_sessions`, and
//! `verification_by_account` for one session per account; `V4__discovery.sql`), so
//! a check on one node finds a start made on another.
//!
//! A check reads the session and compares the code's MAC in constant time here, then
//! spends it in one statement: a right code deletes the session only while it still
//! has tries (`attempts_left > 0`), a wrong one takes a try with `attempts_left =
//! attempts_left - 1 … WHERE attempts_left > 0 RETURNING`. Checks racing on several
//! nodes are therefore ordered by the row's lock, and together never get more tries
//! than the session had; a right code is taken by one of them only.

use tern_platform::clock::UnixMillis;
use tern_proto::discovery::FilterKey;
use tern_proto::{AccountId, VerificationId};

use super::rows::col;
use super::rows::{body, db_time, tag_of, time_of, TxError};
use super::PgBackend;
use crate::store::{StoreError, StoreResult};
use crate::verification::{Checked, StoredSession, VerificationSessions};

/// Deletes session `$1` and its account's pointer to it, returning what the
/// statement's `WHERE` (spliced in) let through.
fn delete_session(condition: &str, returning: &str) -> String {
    format!(
        "WITH s AS (DELETE FROM verification_sessions WHERE session_id = $1 {condition} \
           RETURNING account, session_id, {returning}), \
         b AS (DELETE FROM verification_by_account v USING s \
           WHERE v.account = s.account AND v.session_id = s.session_id) \
         SELECT {returning} FROM s"
    )
}

fn id_of(bytes: &[u8]) -> StoreResult<VerificationId> {
    let id: [u8; 16] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("verification session id"))?;
    Ok(VerificationId(id))
}

impl VerificationSessions for PgBackend {
    fn open(
        &self,
        id: &VerificationId,
        session: &StoredSession,
    ) -> StoreResult<Option<VerificationId>> {
        let (sid, a) = (id.0.to_vec(), session.account.as_bytes().to_vec());
        let tag = session.tag.0.to_vec();
        let key = session.key.0 as i64; // bit for bit
        let mac = session.code_mac.to_vec();
        let tries = i16::try_from(session.attempts_left).unwrap_or(i16::MAX);
        let expires = db_time(session.expires_at);
        let run = body(|tx| {
            let (sid, a, tag, mac) = (sid.clone(), a.clone(), tag.clone(), mac.clone());
            Box::pin(async move {
                let old = tx
                    .query_opt(
                        "SELECT session_id FROM verification_by_account WHERE account = $1 \
                         FOR UPDATE",
                        &[&a],
                    )
                    .await?;
                let replaced = match &old {
                    Some(row) => {
                        let old: Vec<u8> = col(row, 0)?;
                        tx.execute(
                            "DELETE FROM verification_sessions WHERE session_id = $1",
                            &[&old],
                        )
                        .await?;
                        tx.execute(
                            "UPDATE verification_by_account SET session_id = $2 \
                             WHERE account = $1",
                            &[&a, &sid],
                        )
                        .await?;
                        Some(id_of(&old)?)
                    }
                    // A start for the account on another node meanwhile makes this
                    // insert fail; the transaction runs again and replaces it.
                    None => {
                        tx.execute(
                            "INSERT INTO verification_by_account (account, session_id) \
                             VALUES ($1, $2)",
                            &[&a, &sid],
                        )
                        .await?;
                        None
                    }
                };
                tx.execute(
                    "INSERT INTO verification_sessions (session_id, account, tag, filter_key, \
                     code_mac, attempts_left, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[&sid, &a, &tag, &key, &mac, &tries, &expires],
                )
                .await?;
                Ok::<_, TxError>(replaced)
            })
        });
        self.run(self.tx_retrying(run))
    }

    fn remove(&self, id: &VerificationId) -> StoreResult<()> {
        let sql = delete_session("", "1");
        self.run(self.rows(&sql, &[&id.0.as_slice()])).map(drop)
    }

    fn check(
        &self,
        id: &VerificationId,
        account: &AccountId,
        code_mac: &[u8; 32],
        now: UnixMillis,
    ) -> StoreResult<Checked> {
        use subtle::ConstantTimeEq;
        let (sid, a) = (id.0.as_slice(), account.as_bytes().as_slice());
        self.run(async {
            let client = self.client().await?;
            let db = |e: tokio_postgres::Error| self.classify(&e);
            let row = client
                .query_opt(
                    "SELECT code_mac, expires_at FROM verification_sessions \
                     WHERE session_id = $1 AND account = $2",
                    &[&sid, &a],
                )
                .await
                .map_err(db)?;
            let Some(row) = row else {
                return Ok(Checked::NotFound);
            };
            let (mac, expires): (&[u8], i64) = (col(&row, 0)?, col(&row, 1)?);
            if time_of(expires) <= now {
                client
                    .query(&delete_session("", "1"), &[&sid])
                    .await
                    .map_err(db)?;
                return Ok(Checked::Expired);
            }
            if bool::from(mac.ct_eq(&code_mac[..])) {
                let row = client
                    .query_opt(
                        &delete_session("AND attempts_left > 0", "tag, filter_key"),
                        &[&sid],
                    )
                    .await
                    .map_err(db)?;
                return match row {
                    Some(r) => Ok(Checked::Verified {
                        tag: tag_of(col(&r, 0)?)?,
                        key: FilterKey(col::<i64>(&r, 1)? as u64), // bit for bit
                    }),
                    // Another node's check took it, or its last try, first.
                    None => Ok(Checked::NotFound),
                };
            }
            let row = client
                .query_opt(
                    "UPDATE verification_sessions SET attempts_left = attempts_left - 1 \
                     WHERE session_id = $1 AND attempts_left > 0 RETURNING attempts_left",
                    &[&sid],
                )
                .await
                .map_err(db)?;
            let Some(row) = row else {
                return Ok(Checked::NotFound);
            };
            let left = u32::try_from(col::<i16>(&row, 0)?).unwrap_or(0);
            if left == 0 {
                client
                    .query(&delete_session("AND attempts_left = 0", "1"), &[&sid])
                    .await
                    .map_err(db)?;
            }
            Ok(Checked::Wrong {
                attempts_left: left,
            })
        })
    }

    fn remove_account(&self, account: &AccountId) -> StoreResult<Option<VerificationId>> {
        let rows = self.run(self.rows(
            "WITH b AS (DELETE FROM verification_by_account WHERE account = $1 \
               RETURNING session_id), \
             s AS (DELETE FROM verification_sessions v USING b \
               WHERE v.session_id = b.session_id) \
             SELECT session_id FROM b",
            &[&account.as_bytes().as_slice()],
        ))?;
        rows.first().map(|r| id_of(col(r, 0)?)).transpose()
    }

    fn sweep(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<VerificationId>> {
        let (now, max) = (db_time(now), i64::try_from(max).unwrap_or(i64::MAX));
        // SKIP LOCKED: nodes sweeping at once end each session once.
        let rows = self.run(self.rows(
            "WITH s AS (DELETE FROM verification_sessions WHERE session_id IN ( \
                 SELECT session_id FROM verification_sessions WHERE expires_at <= $1 \
                 LIMIT $2 FOR UPDATE SKIP LOCKED) \
               RETURNING account, session_id), \
             b AS (DELETE FROM verification_by_account v USING s \
               WHERE v.account = s.account AND v.session_id = s.session_id) \
             SELECT session_id FROM s",
            &[&now, &max],
        ))?;
        rows.iter().map(|r| id_of(col(r, 0)?)).collect()
    }

    fn count(&self) -> StoreResult<usize> {
        let rows = self.run(self.rows("SELECT count(*) FROM verification_sessions", &[]))?;
        rows.first().map_or(Ok(0), |r| {
            Ok(usize::try_from(col::<i64>(r, 0)?).unwrap_or(0))
        })
    }

    fn of_account(&self, account: &AccountId) -> StoreResult<Option<(UnixMillis, u32)>> {
        let rows = self.run(self.rows(
            "SELECT s.expires_at, s.attempts_left FROM verification_by_account b \
             JOIN verification_sessions s ON s.session_id = b.session_id \
             WHERE b.account = $1",
            &[&account.as_bytes().as_slice()],
        ))?;
        rows.first()
            .map(|r| {
                Ok((
                    time_of(col(r, 0)?),
                    u32::try_from(col::<i16>(r, 1)?).unwrap_or(0),
                ))
            })
            .transpose()
    }
}
