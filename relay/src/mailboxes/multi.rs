//! Multi-recipient sends: one body stored once, one entry per accepted device.
//!
//! [`append_multi`] checks each recipient account as a sealed send checks its one
//! recipient (token and device list version once per account, then each device),
//! then, holding every accepted device's ordering lock at once (taken in address
//! order, so two fan-outs never deadlock), checks each mailbox's room and stores the
//! body and its entries in one store call: under one flush, each mailbox's order and
//! append-then-commit as for any send. What it refuses is answered per account or
//! per device; when every device is refused nothing is stored.
//!
//! What the relay learns: the set of recipient mailboxes of one message (as the same
//! message sent pairwise would show), never a sender (the anonymous link) nor a group.

use std::sync::Arc;

use tern_proto::{DeviceAddress, DeviceId, ErrorCode, MultiSend, MultiSendResult, Refused};

use super::{refused, settle, tell, ActiveMailboxes, Mailboxes};
use crate::accounts::Accounts;
use crate::cluster::Cluster;
use crate::core::limits::Limits;
use crate::core::rate::{AddressPrefix, SenderKey};
use crate::error::{Error, Result};
use crate::server::Services;
use crate::store::{GroupCommit, SharedAppend, SharedEntry, Staged};

/// How far past `max_queued_messages` a commit or welcome may fill a mailbox, so a
/// device offline through several epochs still gets every commit.
pub const COMMIT_RESERVE: u64 = 64;

/// Checks and stores a multi-recipient send from a sender at `from` (see the module
/// docs); `reserve` for a group commit's or welcome's send, which may pass
/// `max_queued_messages` by [`COMMIT_RESERVE`] and is under none of the send rates
/// (the caller takes the prefix's once per commit; the reserve bounds the rest).
/// Errors refuse the whole send (a body too large, the sender's rate, the relay's
/// budget, a store failure); what one recipient cannot take is in the result. Await [`MultiAppended::commit`] before
/// answering.
pub fn append_multi(
    services: &Services,
    send: &MultiSend,
    from: AddressPrefix,
    reserve: bool,
) -> Result<MultiAppended> {
    services
        .mailboxes()
        .append_multi(services.accounts(), send, from, reserve)
}

/// A multi-recipient send stored or queued: its entries are visible and durable once
/// [`MultiAppended::commit`] resolves (the embedded stores show them at once).
#[derive(Debug)]
#[must_use = "the entries are not known to be durable until `commit` is awaited"]
pub struct MultiAppended {
    /// `None` when every device was refused: nothing was stored.
    staged: Option<Staged<Vec<u64>>>,
    /// The entries stored or queued: each device, and the index of its recipient.
    to: Vec<(DeviceAddress, u32)>,
    refused: Vec<Refused>,
    commit: Arc<GroupCommit>,
    active: Arc<ActiveMailboxes>,
    cluster: Option<Arc<Cluster>>,
    push: Option<crate::push::Waker>,
    /// Whether the store tells of its appends as they become readable
    /// ([`crate::store::MailboxStore::on_visible`]).
    early: bool,
}

impl MultiAppended {
    /// Devices whose entry is stored or queued (a shared backend may yet refuse some:
    /// [`MultiAppended::commit`]).
    pub fn accepted(&self) -> usize {
        self.to.len()
    }

    /// Waits until the body and its entries are durable as configured (the group
    /// commit every send shares, or the shared backend's transaction); returns what
    /// was accepted and refused.
    ///
    /// A shared backend may refuse entries the checks let through (PostgreSQL: an
    /// account another node is deleting, before this node holds its tombstone): it
    /// stores none for them and answers seq 0, and each such device is refused on its
    /// own: seq 0 does not say whether the account is being deleted or only the device
    /// was removed (its mailbox closed), so a recipient is never refused whole here.
    pub async fn commit(self) -> Result<MultiSendResult> {
        let mut refused = self.refused;
        let mut accepted = 0;
        if let Some(staged) = self.staged {
            let (seqs, seen) = settle(staged, &self.commit, true, self.early).await?;
            let entries = || self.to.iter().zip(&seqs);
            let kept = || entries().filter(|(_, &seq)| seq != 0).map(|((a, _), _)| a);
            accepted = kept().count();
            if accepted < self.to.len() {
                for (&(a, recipient), _) in entries().filter(|(_, &seq)| seq == 0) {
                    let r = Refused {
                        recipient,
                        device: Some(a.device),
                        code: ErrorCode::Unauthorized,
                    };
                    if !refused.contains(&r) {
                        refused.push(r);
                    }
                }
                refused.sort_by_key(|r| (r.recipient, r.device));
            }
            let hints = (self.cluster.as_deref(), self.push.as_ref());
            tell(&self.active, hints, kept(), seen);
        }
        Ok(MultiSendResult {
            accepted: u32::try_from(accepted).unwrap_or(u32::MAX),
            refused,
        })
    }
}

/// What [`Mailboxes::stage_multi`] stored (`None`: nothing) and for whom (each device
/// with the index of its recipient).
type Stored = (Option<Staged<Vec<u64>>>, Vec<(DeviceAddress, u32)>);

/// A device the account checks let through, waiting for its mailbox's.
struct Candidate {
    recipient: u32,
    to: DeviceAddress,
    part: bytes::Bytes,
}

/// The code a refusal of one recipient carries; `None` for an error that refuses
/// the whole send (a store failure).
fn refusal_code(e: &Error) -> Option<ErrorCode> {
    match e {
        Error::Unauthorized
        | Error::UnknownRecipient
        | Error::StaleDeviceList
        | Error::MailboxFull(_)
        | Error::RateLimited { .. } => Some(e.code()),
        _ => None,
    }
}

impl Mailboxes {
    /// The checks of a multi-recipient send that read no store: a body, the body and
    /// each part within `max_envelope_bytes`, as many parts as devices (or none).
    pub fn check_multi(&self, send: &MultiSend) -> Result<()> {
        let max = self.limits.max_envelope_bytes;
        let too_large = |what, size: usize| Error::TooLarge { what, size, max };
        if send.body.is_empty() {
            return Err(Error::BadRequest(
                "a multi-recipient send needs a body".into(),
            ));
        }
        if send.body.len() > max {
            return Err(too_large("body", send.body.len()));
        }
        for r in &send.recipients {
            if !r.parts.is_empty() && r.parts.len() != r.devices.len() {
                return Err(Error::BadRequest("parts do not match devices".into()));
            }
            if let Some(p) = r.parts.iter().find(|p| p.len() > max) {
                return Err(too_large("part", p.len()));
            }
        }
        Ok(())
    }

    /// [`append_multi`], with the accounts service that checks the recipients.
    pub fn append_multi(
        &self,
        accounts: &Accounts,
        send: &MultiSend,
        from: AddressPrefix,
        reserve: bool,
    ) -> Result<MultiAppended> {
        self.check_multi(send)?;
        if !reserve {
            self.rates.multi_send(&from)?;
        }
        let mut refusals = Vec::new();
        let mut candidates = Vec::with_capacity(send.device_count());
        for (i, r) in send.recipients.iter().enumerate() {
            let recipient = u32::try_from(i).unwrap_or(u32::MAX);
            let refuse = |device: Option<DeviceId>, code| Refused {
                recipient,
                device,
                code,
            };
            let devices = if self.tombstones.contains(&r.account) {
                Err(Error::Unauthorized)
            } else {
                accounts
                    .sealed_recipients(
                        &r.account,
                        &r.delivery_token,
                        r.device_list_version,
                        &r.devices,
                    )
                    .and_then(|d| {
                        // A commit's sends are bounded by the reserve instead.
                        if !reserve {
                            self.rates.multi_send_to(&r.account)?;
                        }
                        Ok(d)
                    })
            };
            let devices = match devices {
                Ok(d) => d,
                Err(e) => {
                    refusals.push(refuse(None, refusal_code(&e).ok_or(e)?));
                    continue;
                }
            };
            for (j, checked) in devices.into_iter().enumerate() {
                match checked {
                    Ok(to) => candidates.push(Candidate {
                        recipient,
                        to,
                        part: r.part(j),
                    }),
                    Err(e) => {
                        let device = r.devices.get(j).copied();
                        refusals.push(refuse(device, refusal_code(&e).ok_or(e)?));
                    }
                }
            }
        }
        let mut appended = MultiAppended {
            staged: None,
            to: Vec::new(),
            refused: Vec::new(),
            commit: self.commit.clone(),
            active: self.active.clone(),
            cluster: self.cluster.get().cloned(),
            push: self.push.get().cloned(),
            early: self.early,
        };
        if !candidates.is_empty() {
            let addrs: Vec<DeviceAddress> = candidates.iter().map(|c| c.to).collect();
            // A shared backend's reads happen here, not under the device locks.
            for a in &addrs {
                self.store.prefetch_usage(a);
            }
            let (staged, to) = self.active.ordered_many(&addrs, || {
                self.stage_multi(send, candidates, from, reserve, &mut refusals)
            })?;
            if matches!(staged, Some(Staged::Applied(_))) {
                for (a, _) in &to {
                    self.active.wake(a);
                }
            }
            appended.staged = staged;
            appended.to = to;
        }
        refusals.sort_by_key(|r| (r.recipient, r.device));
        appended.refused = refusals;
        Ok(appended)
    }

    /// Under every candidate's ordering lock: the checks that read its mailbox, then
    /// the body and the entries of those that passed, in one store call.
    fn stage_multi(
        &self,
        send: &MultiSend,
        candidates: Vec<Candidate>,
        from: AddressPrefix,
        reserve: bool,
        refusals: &mut Vec<Refused>,
    ) -> Result<Stored> {
        let sender = SenderKey::Prefix(from);
        let extra = if reserve { COMMIT_RESERVE } else { 0 };
        let limits = Limits {
            max_queued_messages: self.limits.max_queued_messages.saturating_add(extra),
            ..self.limits.clone()
        };
        let mut entries = Vec::with_capacity(candidates.len());
        let mut stored = Vec::with_capacity(candidates.len());
        let mut totals = None;
        for c in candidates {
            let bytes = SharedEntry::bytes(&c.part, &send.body);
            let checked = (|| {
                // Checked under the device lock, which a deletion's purge takes too.
                if self.tombstones.contains(&c.to.account) || self.tombstones.contains_device(&c.to)
                {
                    return Err(Error::Unauthorized);
                }
                let (usage, t) = self.store.usage_and_totals(&c.to)?;
                totals = Some(t);
                limits.check_enqueue(usage, 1, bytes)?;
                if reserve {
                    return self.rates.group_commit_to(&c.to, usage.messages);
                }
                self.rates.intake(&sender, &c.to, usage.messages, 1)
            })();
            match checked {
                Ok(()) => {
                    stored.push((c.to, c.recipient));
                    entries.push(SharedEntry {
                        to: c.to,
                        part: c.part,
                    });
                }
                Err(e) => {
                    // An account deleted meanwhile is refused whole, as one found
                    // deleted before the locks.
                    let gone = self.tombstones.contains(&c.to.account);
                    let refusal = Refused {
                        recipient: c.recipient,
                        device: (!gone).then_some(c.to.device),
                        code: refusal_code(&e).ok_or(e)?,
                    };
                    if !refusals.contains(&refusal) {
                        refusals.push(refusal);
                    }
                }
            }
        }
        let (Some(totals), false) = (totals, entries.is_empty()) else {
            return Ok((None, Vec::new()));
        };
        let now = self.clock.now();
        let append = SharedAppend {
            message_id: send.message_id,
            body: &send.body,
            entries: &entries,
            accepted_at: now,
            expires_at: self.ttl.expires_at(now),
        };
        self.budget
            .check_enqueue(totals, entries.len() as u64, append.stored_bytes())?;
        let staged = self
            .store
            .stage_append_shared(&append)
            .map_err(|e| refused(e, true))?;
        Ok((Some(staged), stored))
    }
}
