//! The rows a batch inserts: messages and entries, numbered per mailbox in queue
//! order, and the shared bodies.

use std::collections::{BTreeMap, HashMap, HashSet};

use tern_proto::DeviceAddress;

use super::super::bodies::{kept, BodyRow};
use super::sql::{InsertCols, Row};
use super::{Op, Part};

/// The rows of `ops` for the mailboxes not refused (their heads after the upsert:
/// last seq, messages, bytes), the bodies (each counted by the entries written), and
/// what the bodies change in the relay's bytes besides the heads' sums (which count a
/// body once per entry).
pub(super) fn inserts<'a>(
    ops: &'a [Op],
    parts: &'a BTreeMap<DeviceAddress, Part>,
    heads: &HashMap<DeviceAddress, (i64, i64, i64)>,
    refused: &HashSet<DeviceAddress>,
) -> (InsertCols<'a>, Vec<BodyRow<'a>>, i64) {
    let mut ins = InsertCols::default();
    for (to, part) in parts.iter().filter(|(to, _)| !refused.contains(*to)) {
        let Some(&(last, _, _)) = heads.get(to) else {
            continue;
        };
        let mut seq = last - part.appended.0;
        for &(i, j) in &part.appends {
            let Some(op) = ops.get(i) else {
                continue;
            };
            match op {
                Op::Append {
                    msgs,
                    accepted_at,
                    expires_at,
                    ..
                } => {
                    for m in msgs {
                        seq += 1;
                        ins.push(
                            to,
                            Row {
                                seq,
                                id: &m.message_id,
                                payload: &m.payload,
                                at: *accepted_at,
                                until: *expires_at,
                                body: None,
                            },
                        );
                    }
                }
                Op::AppendShared {
                    id,
                    message_id,
                    body,
                    entries,
                    accepted_at,
                    expires_at,
                    ..
                } => {
                    seq += 1;
                    if let Some(e) = entries.get(j) {
                        ins.push(
                            to,
                            Row {
                                seq,
                                id: message_id,
                                payload: &e.part,
                                at: *accepted_at,
                                until: *expires_at,
                                body: Some((id, body.len() as i64)),
                            },
                        );
                    }
                }
                Op::Remove { .. } => {}
            }
        }
    }
    // Each shared append's body, counted by the entries written; the totals count
    // it once (the heads' sums counted it per entry).
    let mut bodies: Vec<BodyRow<'_>> = Vec::new();
    let mut shared_bytes = 0i64;
    for op in ops {
        if let Op::AppendShared {
            id,
            body,
            entries,
            expires_at,
            ..
        } = op
        {
            let refs = kept(entries, refused);
            if refs > 0 {
                shared_bytes -= (refs - 1) * body.len() as i64;
                bodies.push(BodyRow {
                    id,
                    payload: body,
                    expires_at: *expires_at,
                    refs,
                });
            }
        }
    }
    (ins, bodies, shared_bytes)
}
