//! What a group send does with the relay's refusals, for a commit's answer and a
//! queued message alike: refused for now is tried again (at most
//! [`GIVE_UP_MS`] from the first attempt), a refused delivery token is not used
//! again (the account waits for another one, see `next_group_step`), and a device
//! the relay does not know is removed.

use tern_proto::{AccountId, DeviceId, ErrorCode, MessageId, MultiSend, Refused};

use super::group_commit::dedup_ops;
use super::group_records::{
    GroupOpRecord, GroupRecipient, GroupRecord, MemberTokenRecord, OP_REMOVE_DEVICE,
};
use super::state::State;
use crate::store::records::seq_key;
use crate::store::{Batch, Namespace};
use crate::Result;

/// How long a queued group message (or resent commit) is tried for a device that
/// keeps refusing it for now: the relay's message lifetime. Past it, a message is
/// given up (`Event::SendFailed`), and a commit's devices are removed (they can
/// no longer follow the group).
pub(crate) const GIVE_UP_MS: u64 = 30 * 24 * 3600 * 1000;

/// A member without a usable delivery token, and since when (Unix ms).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TokenWaitRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) account: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub(crate) since_ms: u64,
}

/// A queued group message that is being resent.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ResendRecord {
    /// Its outbox seq.
    #[prost(uint64, tag = "1")]
    pub(crate) seq: u64,
    /// When (Unix ms) it was first refused for now.
    #[prost(uint64, tag = "2")]
    pub(crate) first_ms: u64,
    /// Whether it is a commit or welcome: sent before the group's other messages,
    /// kept for members whose token is not known yet, and its devices removed
    /// when given up.
    #[prost(bool, tag = "3")]
    pub(crate) commit: bool,
}

/// What to do about one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Refused for now (a full mailbox, a rate, a stale device list, or this
    /// account's own token changing in flight): the devices are tried again.
    Retry,
    /// The account refused the token (a tombstone, or a token no longer theirs,
    /// which the relay cannot tell apart): the token is not used again and the
    /// devices are tried again with another one, once known.
    TokenRefused,
    /// The relay does not know the device: it is removed from the group.
    DeviceGone,
}

/// The verdict on `f`, a refusal of a send to `to` (`own`: this account).
pub(crate) fn verdict(f: &Refused, to: &AccountId, own: &AccountId) -> Verdict {
    match f.code {
        ErrorCode::MailboxFull
        | ErrorCode::RateLimited
        | ErrorCode::Unavailable
        | ErrorCode::StaleDeviceList => Verdict::Retry,
        // Our own token is always the current one when the resend goes out.
        _ if to == own => match f.device {
            None => Verdict::Retry,
            Some(_) => Verdict::DeviceGone,
        },
        _ if f.device.is_none() => Verdict::TokenRefused,
        _ => Verdict::DeviceGone,
    }
}

/// The devices of `send`'s recipient a refusal covers.
pub(crate) fn refused_devices(send: &MultiSend, f: &Refused) -> Vec<DeviceId> {
    match (f.device, send.recipients.get(f.recipient as usize)) {
        (Some(d), _) => vec![d],
        (None, Some(r)) => r.devices.clone(),
        (None, None) => Vec::new(),
    }
}

/// The removal of `account`'s `device`.
pub(crate) fn device_removal(account: &AccountId, device: DeviceId) -> GroupOpRecord {
    GroupOpRecord {
        kind: OP_REMOVE_DEVICE,
        accounts: vec![account.as_bytes().to_vec()],
        device: device.get(),
        ..GroupOpRecord::default()
    }
}

/// What one attempt at a queued group message came to.
#[derive(Debug, Default)]
pub(crate) struct SendOutcome {
    /// The devices to try again (refused for now, a token refused, or, for a
    /// commit, no token known yet).
    pub(crate) keep: Vec<GroupRecipient>,
    /// Tokens the relay refused, per account.
    pub(crate) refused_tokens: Vec<(AccountId, Vec<u8>)>,
    /// Ops to queue (removals of devices the relay does not know).
    pub(crate) removals: Vec<GroupOpRecord>,
}

/// A queued group message given up: its id and the accounts it did not reach.
pub(crate) type GivenUp = (MessageId, Vec<AccountId>);

impl State {
    /// Records the outcome of an attempt at the queued group message `seq` at
    /// `now_ms`, in one batch: it leaves the outbox when nobody is left to try,
    /// else it keeps the devices to try again, until [`GIVE_UP_MS`] after its
    /// first refusal. Then an app message is given up (returned, for
    /// `Event::SendFailed`), and a commit's remaining devices are queued for
    /// removal.
    pub(crate) fn settle_group_send(
        &mut self,
        seq: u64,
        outcome: SendOutcome,
        now_ms: u64,
    ) -> Result<Option<GivenUp>> {
        let Some(mut out) = self.group_outbox.get(&seq).cloned() else {
            return Ok(None);
        };
        let SendOutcome {
            mut keep,
            refused_tokens,
            removals,
        } = outcome;
        keep.retain(|r| !r.devices.is_empty());
        let mut given_up = None;
        let mut batch = Batch::new();
        let mut sync = false;
        if let Some(old) = self.groups.get(&out.group_id).cloned() {
            let mut record = old.clone();
            for (account, token) in &refused_tokens {
                refuse_token(&mut record, account, token);
            }
            record.ops.extend(removals);
            let at = record.resends.iter().position(|r| r.seq == seq);
            let commit = at.is_some_and(|i| record.resends[i].commit);
            let first = at.map_or(now_ms.max(1), |i| record.resends[i].first_ms);
            if let Some(i) = at {
                record.resends.remove(i);
            }
            if !keep.is_empty() && now_ms.saturating_sub(first) >= GIVE_UP_MS {
                let accounts: Vec<AccountId> = keep
                    .iter()
                    .filter_map(|r| AccountId::try_from(&r.account[..]).ok())
                    .collect();
                if commit {
                    // They can no longer follow the group.
                    for r in &keep {
                        let Ok(account) = AccountId::try_from(&r.account[..]) else {
                            continue;
                        };
                        for d in r.devices.iter().filter_map(|d| DeviceId::try_from(*d).ok()) {
                            record.ops.push(device_removal(&account, d));
                        }
                    }
                } else if !out.control {
                    if let Ok(id) = <[u8; 16]>::try_from(&out.message_id[..]) {
                        given_up = Some((MessageId(id), accounts));
                    }
                }
                keep.clear();
            } else if !keep.is_empty() {
                record.resends.push(ResendRecord {
                    seq,
                    first_ms: first,
                    commit,
                });
            }
            dedup_ops(&mut record.ops);
            if record != old {
                let id = out.group_id.clone();
                self.put_group(&id, record, &mut batch);
                sync = true;
            }
        }
        if keep.is_empty() {
            batch.delete(Namespace::GroupOutbox, seq_key(seq));
            self.group_outbox.remove(&seq);
        } else {
            out.to = keep;
            batch.put(Namespace::GroupOutbox, seq_key(seq), &out);
            self.group_outbox.insert(seq, out);
        }
        self.commit(batch, sync)?;
        Ok(given_up)
    }

    /// Whether the queued group message `seq` is a resent commit or welcome.
    pub(crate) fn is_commit_resend(&self, seq: u64) -> bool {
        self.group_outbox.get(&seq).is_some_and(|o| {
            self.groups
                .get(&o.group_id)
                .is_some_and(|g| g.resends.iter().any(|r| r.seq == seq && r.commit))
        })
    }

    /// The delivery token to use for `account` in `group`: the one the member
    /// announced in the group (`MemberInfo`, sent again on every change), else the
    /// contact's; tokens the relay refused are skipped.
    pub(crate) fn member_token(&self, group: &[u8], account: &AccountId) -> Option<[u8; 32]> {
        if *account == self.keys.address.account {
            return Some(self.keys.delivery_token);
        }
        let record = self.groups.get(group);
        let announced = record.and_then(|r| {
            r.tokens
                .iter()
                .find(|t| t.account == account.as_bytes())
                .and_then(|t| <[u8; 32]>::try_from(&t.token[..]).ok())
        });
        [announced, self.token_of(account)]
            .into_iter()
            .flatten()
            .find(|t| {
                !record.is_some_and(|r| {
                    r.refused_tokens
                        .iter()
                        .any(|x| x.account == account.as_bytes() && x.token == t)
                })
            })
    }
}

/// Notes in `record` that the relay refused `token` for `account`.
pub(crate) fn refuse_token(record: &mut GroupRecord, account: &AccountId, token: &[u8]) {
    let known = record
        .refused_tokens
        .iter()
        .any(|x| x.account == account.as_bytes() && x.token == token);
    if !known {
        record.refused_tokens.push(MemberTokenRecord {
            account: account.as_bytes().to_vec(),
            token: token.to_vec(),
        });
    }
}
