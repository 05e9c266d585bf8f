//! [`SharedPublication`] on PostgreSQL: the table `discovery_published`
//! (`V8__discovery_published.sql`), artefacts in chunks of [`CHUNK`] bytes keyed by
//! (day, kind, seq). A day is stored in one transaction whose first row is the
//! snapshot's chunk 0, inserted `ON CONFLICT DO NOTHING`: a second publisher of the
//! same day waits for the first to commit, finds its row, and writes nothing.

use std::time::Duration;

use tokio_postgres::IsolationLevel;

use super::lease::NOW_MS;
use super::rows::col;
use super::rows::{body, TxError};
use super::PgBackend;
use crate::discovery::shared::{
    ArtefactKind, NewPublication, SharedPublication, StoredPublication, Version, PUBLISH_LEASE,
};
use crate::store::{StoreError, StoreResult};

/// Largest `data` of one row.
const CHUNK: usize = 1 << 20;
/// Kinds of artefact (the `kind` column).
const SNAPSHOT: i16 = 1;
const DELTA: i16 = 2;
const KEYS: i16 = 3;
/// Snapshots and key lists kept (the newest two, as the files).
const KEEP_SNAPSHOTS: i64 = 2;
/// Deadline of a whole publication's write or load (many chunks at a large scale);
/// each statement still has the pool's `statement_timeout`.
const BULK_DEADLINE: Duration = Duration::from_secs(120);

const LATEST: &str = "SELECT day, created_ms FROM discovery_published \
     WHERE kind = 1 AND seq = 0 ORDER BY day DESC LIMIT 1";

fn kind_of(kind: ArtefactKind) -> i16 {
    match kind {
        ArtefactKind::Snapshot => SNAPSHOT,
        ArtefactKind::Delta => DELTA,
        ArtefactKind::Keys => KEYS,
    }
}

/// An artefact's rows: (seq, data), at least one (empty) chunk.
fn chunks(bytes: &[u8]) -> StoreResult<Vec<(i32, &[u8])>> {
    if bytes.is_empty() {
        return Ok(vec![(0, bytes)]);
    }
    bytes
        .chunks(CHUNK)
        .enumerate()
        .map(|(seq, data)| {
            i32::try_from(seq)
                .map(|seq| (seq, data))
                .map_err(|_| StoreError::Backend("artefact too large".into()))
        })
        .collect()
}

fn day_of(v: i32) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt("discovery publication day"))
}

fn db_day(day: u32) -> StoreResult<i32> {
    i32::try_from(day).map_err(|_| StoreError::Backend("day out of range".into()))
}

/// Appends a query's `data` column (chunks in `seq` order) into one artefact.
fn joined(rows: &[tokio_postgres::Row], i: usize) -> StoreResult<Vec<u8>> {
    let mut out = Vec::new();
    for r in rows {
        out.extend_from_slice(col::<&[u8]>(r, i)?);
    }
    Ok(out)
}

impl SharedPublication for PgBackend {
    fn latest(&self) -> StoreResult<Option<Version>> {
        self.run(async {
            let client = self.client().await?;
            let row = self
                .retrying(|| async { client.query_opt(LATEST, &[]).await })
                .await?;
            row.map(|r| {
                Ok(Version {
                    day: day_of(col(&r, 0)?)?,
                    created_ms: col(&r, 1)?,
                })
            })
            .transpose()
        })
    }

    fn load(&self) -> StoreResult<Option<StoredPublication>> {
        self.run_within(BULK_DEADLINE, async {
            let mut client = self.client().await?;
            let db = |e: tokio_postgres::Error| self.classify(&e);
            // One view: a publication committed meanwhile, or its pruning, is not
            // half seen.
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(db)?;
            let Some(latest) = tx.query_opt(LATEST, &[]).await.map_err(db)? else {
                return Ok(None);
            };
            let (day, created_ms): (i32, i64) = (col(&latest, 0)?, col(&latest, 1)?);
            let snapshot = tx
                .query(
                    "SELECT data FROM discovery_published WHERE day = $1 AND kind = 1 \
                     ORDER BY seq",
                    &[&day],
                )
                .await
                .map_err(db)?;
            let rows = tx
                .query(
                    "SELECT day, data FROM discovery_published WHERE kind = 2 AND day <= $1 \
                     ORDER BY day, seq",
                    &[&day],
                )
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            let mut deltas: Vec<(i32, Vec<u8>)> = Vec::new();
            for r in &rows {
                let (d, data): (i32, &[u8]) = (col(r, 0)?, col(r, 1)?);
                match deltas.last_mut() {
                    Some((last, bytes)) if *last == d => bytes.extend_from_slice(data),
                    _ => deltas.push((d, data.to_vec())),
                }
            }
            Ok(Some(StoredPublication {
                version: Version {
                    day: day_of(day)?,
                    created_ms,
                },
                snapshot: joined(&snapshot, 0)?,
                deltas: deltas.into_iter().map(|(_, b)| b).collect(),
            }))
        })
    }

    fn keys_before(&self, day: u32) -> StoreResult<Option<(u32, Vec<u8>)>> {
        let day = db_day(day)?;
        self.run_within(BULK_DEADLINE, async {
            let client = self.client().await?;
            let sql = "SELECT day, data FROM discovery_published WHERE kind = 3 AND day = \
                 (SELECT max(day) FROM discovery_published WHERE kind = 3 AND day < $1) \
                 ORDER BY seq";
            let rows = self
                .retrying(|| async { client.query(sql, &[&day]).await })
                .await?;
            let Some(first) = rows.first() else {
                return Ok(None);
            };
            Ok(Some((day_of(col(first, 0)?)?, joined(&rows, 1)?)))
        })
    }

    fn store(&self, new: &NewPublication<'_>) -> StoreResult<bool> {
        let day = db_day(new.day)?;
        let keep = i64::from(new.keep_deltas.max(1));
        // Owned, as each run of the transaction takes its own copy (cheap clones).
        let artefacts: Vec<(i16, bytes::Bytes)> = [
            (SNAPSHOT, Some(new.snapshot)),
            (DELTA, new.delta),
            (KEYS, Some(new.keys)),
        ]
        .into_iter()
        .filter_map(|(k, b)| b.map(|b| (k, bytes::Bytes::copy_from_slice(b))))
        .collect();
        let write = body(|tx| {
            let artefacts = artefacts.clone();
            Box::pin(async move {
                let later = tx
                    .query_opt(
                        "SELECT 1 FROM discovery_published WHERE kind = 1 AND day > $1 LIMIT 1",
                        &[&day],
                    )
                    .await?;
                if later.is_some() {
                    return Ok(false);
                }
                let mut created: Option<i64> = None;
                for (kind, bytes) in &artefacts {
                    for (seq, data) in chunks(bytes)? {
                        match created {
                            None => {
                                // The day's claim: nothing if another publisher has it.
                                let sql = format!(
                                    "INSERT INTO discovery_published \
                                     (day, kind, seq, data, created_ms) \
                                     VALUES ($1, $2, $3, $4, {NOW_MS}) \
                                     ON CONFLICT DO NOTHING RETURNING created_ms"
                                );
                                let row = tx.query_opt(&sql, &[&day, kind, &seq, &data]).await?;
                                let Some(row) = row else {
                                    return Ok(false);
                                };
                                created = Some(col::<i64>(&row, 0)?);
                            }
                            Some(at) => {
                                tx.execute(
                                    "INSERT INTO discovery_published \
                                     (day, kind, seq, data, created_ms) \
                                     VALUES ($1, $2, $3, $4, $5)",
                                    &[&day, kind, &seq, &data, &at],
                                )
                                .await?;
                            }
                        }
                    }
                }
                // Keep the newest `keep` deltas and two snapshots and key lists.
                for (kind, keep) in [
                    (DELTA, keep),
                    (SNAPSHOT, KEEP_SNAPSHOTS),
                    (KEYS, KEEP_SNAPSHOTS),
                ] {
                    tx.execute(
                        "DELETE FROM discovery_published WHERE kind = $1 AND day < \
                         (SELECT min(day) FROM (SELECT DISTINCT day FROM discovery_published \
                          WHERE kind = $1 ORDER BY day DESC LIMIT $2) AS kept)",
                        &[&kind, &keep],
                    )
                    .await?;
                }
                Ok::<_, TxError>(true)
            })
        });
        self.run_within(BULK_DEADLINE, self.tx_retrying(write))
    }

    fn hold_publisher(&self, ttl: Duration) -> StoreResult<bool> {
        self.try_hold(PUBLISH_LEASE, ttl)
    }

    fn release_publisher(&self) -> StoreResult<()> {
        self.release(PUBLISH_LEASE)
    }
}

impl PgBackend {
    /// Copies an embedded relay's published files (`admin migrate`, from
    /// [`crate::discovery::publish::whole_files`]) in one transaction, so the nodes
    /// serve what it served and the next day's delta starts from its key list.
    /// Artefacts the table holds already are kept. Returns how many were copied.
    pub fn import_published(&self, files: &[(u32, ArtefactKind, Vec<u8>)]) -> StoreResult<u64> {
        let rows: Vec<(i32, i16, bytes::Bytes)> = files
            .iter()
            .map(|(day, kind, bytes)| {
                Ok((
                    db_day(*day)?,
                    kind_of(*kind),
                    bytes::Bytes::copy_from_slice(bytes),
                ))
            })
            .collect::<StoreResult<_>>()?;
        let write = body(|tx| {
            let rows = rows.clone();
            Box::pin(async move {
                let mut copied = 0;
                let now: i64 = col(&tx.query_one(&format!("SELECT {NOW_MS}"), &[]).await?, 0)?;
                for (day, kind, bytes) in &rows {
                    // Never chunks of two artefacts under one key.
                    let there = tx
                        .query_opt(
                            "SELECT 1 FROM discovery_published WHERE day = $1 AND kind = $2 LIMIT 1",
                            &[day, kind],
                        )
                        .await?;
                    if there.is_some() {
                        continue;
                    }
                    for (seq, data) in chunks(bytes)? {
                        tx.execute(
                            "INSERT INTO discovery_published (day, kind, seq, data, created_ms) \
                             VALUES ($1, $2, $3, $4, $5)",
                            &[day, kind, &seq, &data, &now],
                        )
                        .await?;
                    }
                    copied += 1;
                }
                Ok::<_, TxError>(copied)
            })
        });
        self.run_within(BULK_DEADLINE, self.tx_retrying(write))
    }
}
