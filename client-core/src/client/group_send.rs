//! The worker's group round, on the anonymous link: registers new handles, runs
//! each group's commit pipeline (fetch key packages, plan, `GroupCommit`, apply or
//! rebase), then sends the queued group messages, one `MultiSend` each.

use rand::rngs::OsRng;
use tern_proto::e2e::{self, group_content::Control};
use tern_proto::{AccountId, DeviceId, MessageId, MultiSend, RecipientAccount};

use super::anonymous::AnonymousLink;
use super::group_commit::{add_devices, GroupStep};
use super::group_records::GroupRecipient;
use super::group_retry::{device_removal, refused_devices, verdict, SendOutcome, Verdict};
use super::group_tree;
use super::groups::{GroupChange, GroupId};
use super::send::Round;
use super::{Event, Shared};
use crate::net::RelayConnection;
use crate::store::Batch;
use crate::{ErrorCode, Result};

/// Merges a step's outcome into the round's.
pub(super) async fn group_round(
    shared: &Shared,
    conn: &RelayConnection,
    anon: &AnonymousLink,
) -> Result<Round> {
    let mut round = Round::Idle;
    let interval = shared.group_settings.update_interval_ms;
    let busy = {
        let mut state = shared.state.lock().await;
        state.queue_due_updates(shared.now_ms(), interval, &mut OsRng)?;
        state.busy_groups()
    };
    for group in busy {
        let step = commit_step(shared, conn, anon, &group).await?;
        round.merge(step);
    }
    announce(shared).await?;
    let step = send_messages(shared, anon).await?;
    round.merge(step);
    // Welcomes waiting for their trees last: a slow download holds up no commit
    // or message (their groups go on next round).
    let step = group_tree::fetch_trees(shared, anon).await?;
    round.merge(step);
    Ok(round)
}

/// Queues this device's `MemberInfo` in groups it joined, so members that are not
/// its contacts learn its delivery token.
async fn announce(shared: &Shared) -> Result<()> {
    let mut state = shared.state.lock().await;
    let due: Vec<Vec<u8>> = state
        .groups
        .iter()
        .filter(|(_, r)| r.announce)
        .map(|(id, _)| id.clone())
        .collect();
    let now = shared.now_ms();
    for id in due {
        let Ok(gid) = <[u8; 32]>::try_from(&id[..]) else {
            continue;
        };
        let content = e2e::GroupContent {
            sent_at_ms: now,
            control: Some(Control::MemberInfo(e2e::MemberInfo {
                delivery_token: state.keys.delivery_token.to_vec().into(),
                device_list_version: 0,
            })),
            ..e2e::GroupContent::default()
        };
        let Some(mut record) = state.groups.get(&id).cloned() else {
            continue;
        };
        // The message and the cleared flag in one write.
        let mut batch = Batch::new();
        let (seq, queued, _) =
            state.stage_group_message(&GroupId(gid), content, &mut OsRng, &mut batch)?;
        record.announce = false;
        record.announced_token = state.keys.delivery_token.to_vec();
        state.put_group(&id, record, &mut batch);
        state.commit(batch, true)?;
        state.group_outbox.insert(seq, queued);
        state.prepare_group(&id)?;
    }
    Ok(())
}

/// One step of `group`'s commit pipeline.
async fn commit_step(
    shared: &Shared,
    conn: &RelayConnection,
    anon: &AnonymousLink,
    group: &[u8],
) -> Result<Round> {
    let now = shared.now_ms();
    let wait = shared.group_settings.token_wait_ms;
    let step = {
        let mut state = shared.state.lock().await;
        // The tree of a commit settled since the last step goes.
        state.settle_tree_upload(group)?;
        state.next_group_step(group, now, wait)?
    };
    let commit = match step {
        GroupStep::Idle => return Ok(Round::Idle),
        GroupStep::Wait => return Ok(Round::Wait),
        GroupStep::Register { handle, token_hash } => {
            let handle = tern_proto::GroupHandle(handle);
            match anon
                .run(|c| async move { c.create_group(handle, token_hash).await })
                .await
            {
                // Created before a restart lost the answer: handles are random.
                Ok(()) => {}
                Err(e) if e.relay_code() == Some(ErrorCode::GroupExists) => {}
                Err(e) if e.relay_code().is_some() => return Ok(Round::Wait),
                Err(e) => return Err(e),
            }
            shared.state.lock().await.group_registered(group)?;
            return Ok(Round::Progress);
        }
        GroupStep::Send(commit) => commit,
        GroupStep::Plan | GroupStep::Fetch(..) => {
            let (accounts, device) = match step {
                GroupStep::Fetch(a, d) => (a, d),
                _ => (Vec::new(), None),
            };
            let packages = fetch_packages(shared, anon, group, &accounts, device).await?;
            let planned = shared.state.lock().await.plan_commit(
                group,
                packages,
                shared.now_ms(),
                &mut OsRng,
            )?;
            match planned {
                Some(commit) => commit,
                None => return Ok(Round::Progress),
            }
        }
    };
    // Never a welcome whose tree the relay does not have.
    match group_tree::upload_tree(shared, conn, group).await? {
        group_tree::Upload::Done => {}
        group_tree::Upload::Wait(round) => return Ok(round),
        group_tree::Upload::GaveUp(reason) => {
            // As a refused commit (dropped already): the app hears why.
            tracing::debug!(%reason, "a group commit given up");
            shared.emit(Event::Dropped {
                reason: format!("a group change given up: {reason}"),
            });
            return Ok(Round::Progress);
        }
    }
    // From here the relay may hold it, answer or not: never given up.
    shared.state.lock().await.commit_sending(group)?;
    let sent = anon
        .run(|c| {
            let commit = commit.clone();
            async move { c.group_commit(commit).await }
        })
        .await;
    let mut state = shared.state.lock().await;
    match sent {
        Ok((_, results)) => {
            for e in state.commit_answered(group, &results, shared.now_ms())? {
                shared.emit(e);
            }
            Ok(Round::Progress)
        }
        Err(e) if e.relay_code() == Some(ErrorCode::StaleEpoch) => {
            let current = e.current_epoch().unwrap_or(commit.epoch + 1);
            tracing::debug!("a group commit lost its epoch; rebasing");
            state.commit_stale(group, current)?;
            Ok(Round::Wait)
        }
        Err(e) if e.relay_code() == Some(ErrorCode::UnknownGroup) => {
            state.commit_refused(group)?;
            Ok(Round::Progress)
        }
        Err(e) if e.relay_code().is_some() => Ok(Round::Wait),
        Err(e) => Err(e),
    }
}

/// One key package per device of each account (of `device` only, when given),
/// through its token on the anonymous link, checked against the identity key we
/// hold for it.
async fn fetch_packages(
    shared: &Shared,
    anon: &AnonymousLink,
    group: &[u8],
    accounts: &[AccountId],
    device: Option<DeviceId>,
) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for account in accounts {
        let Some(token) = shared.state.lock().await.member_token(group, account) else {
            continue;
        };
        let fetched = anon
            .run(|c| async move { c.fetch_key_packages(account, device, &token).await })
            .await;
        let packages = match fetched {
            Ok(p) => p,
            Err(e) if e.relay_code().is_some() => {
                tracing::debug!(error = %e, "key packages not fetched");
                continue;
            }
            Err(e) => return Err(e),
        };
        let state = shared.state.lock().await;
        for p in packages {
            if state.acceptable_key_package(account, &p.key_package) {
                out.push(p.key_package.to_vec());
            } else {
                tracing::debug!("a key package was refused");
            }
        }
    }
    Ok(out)
}

/// A group message ready to leave.
struct Ready {
    seq: u64,
    send: MultiSend,
    /// A resent commit or welcome: it goes first, and waits for tokens.
    commit: bool,
    /// Recipients this device has no usable token for.
    tokenless: Vec<GroupRecipient>,
}

/// Sends every encrypted group message: resent commits and welcomes first (so
/// their devices can read what follows), then the others, oldest first.
async fn send_messages(shared: &Shared, anon: &AnonymousLink) -> Result<Round> {
    let mut ready: Vec<Ready> = {
        let mut state = shared.state.lock().await;
        state.prepare_groups()?;
        let mut ready = Vec::new();
        for (seq, r) in state.group_outbox.iter() {
            if r.envelope.is_empty() {
                continue;
            }
            let Ok(id) = <[u8; 16]>::try_from(&r.message_id[..]) else {
                continue;
            };
            let mut recipients = Vec::new();
            let mut tokenless = Vec::new();
            for to in &r.to {
                let Ok(account) = AccountId::try_from(&to.account[..]) else {
                    continue;
                };
                let devices: Vec<DeviceId> = to
                    .devices
                    .iter()
                    .filter_map(|d| DeviceId::try_from(*d).ok())
                    .collect();
                match state.member_token(&r.group_id, &account) {
                    Some(token) => recipients.push(RecipientAccount {
                        account,
                        delivery_token: token.to_vec().into(),
                        device_list_version: 0,
                        devices,
                        parts: Vec::new(),
                    }),
                    None => tokenless.push(to.clone()),
                }
            }
            ready.push(Ready {
                seq: *seq,
                send: MultiSend {
                    message_id: MessageId(id),
                    body: r.envelope.clone().into(),
                    recipients,
                },
                commit: state.is_commit_resend(*seq),
                tokenless,
            });
        }
        ready
    };
    ready.sort_by_key(|r| (!r.commit, r.seq));
    let own = shared.state.lock().await.keys.address.account;
    let mut round = Round::Idle;
    for r in ready {
        // A commit waits for its members' tokens (or their removal past the
        // bound); a message is not held for them.
        let mut outcome = SendOutcome::default();
        if r.commit {
            outcome.keep = r.tokenless.clone();
        }
        if r.send.recipients.is_empty() {
            let mut state = shared.state.lock().await;
            settle(shared, &mut state, r.seq, outcome)?;
            continue;
        }
        let result = anon.run(|c| c.multi_send(r.send.clone())).await;
        let mut state = shared.state.lock().await;
        let result = match result {
            Ok(result) => result,
            Err(e) => match e.relay_code() {
                Some(ErrorCode::TooLarge | ErrorCode::BadRequest) => {
                    tracing::debug!(error = %e, "a group message was refused");
                    state.group_sent(r.seq)?;
                    round = Round::Progress;
                    continue;
                }
                Some(_) => return Ok(Round::Wait),
                None => return Err(e),
            },
        };
        let mut retry = false;
        for f in &result.refused {
            let Some(to) = r.send.recipients.get(f.recipient as usize) else {
                continue;
            };
            let devices = refused_devices(&r.send, f);
            match verdict(f, &to.account, &own) {
                Verdict::Retry => {
                    retry = true;
                    add_devices(&mut outcome.keep, &to.account, &devices);
                }
                Verdict::TokenRefused => {
                    retry = true;
                    outcome
                        .refused_tokens
                        .push((to.account, to.delivery_token.to_vec()));
                    add_devices(&mut outcome.keep, &to.account, &devices);
                }
                Verdict::DeviceGone if r.commit => {
                    for d in devices {
                        outcome.removals.push(device_removal(&to.account, d));
                    }
                }
                Verdict::DeviceGone => {}
            }
        }
        round.merge(if retry { Round::Wait } else { Round::Progress });
        settle(shared, &mut state, r.seq, outcome)?;
    }
    Ok(round)
}

/// Records an attempt's outcome; a message given up is told to the app.
fn settle(
    shared: &Shared,
    state: &mut super::state::State,
    seq: u64,
    outcome: SendOutcome,
) -> Result<()> {
    if let Some((message_id, accounts)) = state.settle_group_send(seq, outcome, shared.now_ms())? {
        for to in accounts {
            shared.emit(Event::SendFailed {
                message_id,
                to,
                reason: "refused by the relay for 30 days (a full mailbox)".into(),
            });
        }
    }
    settle_leave(shared, state)
}

/// Groups this device is leaving whose last message is out: deleted here.
fn settle_leave(shared: &Shared, state: &mut super::state::State) -> Result<()> {
    let done: Vec<Vec<u8>> = state
        .groups
        .iter()
        .filter(|(id, r)| r.leaving && !state.group_outbox.values().any(|o| o.group_id == **id))
        .map(|(id, _)| id.clone())
        .collect();
    for id in done {
        let mut batch = Batch::new();
        state.stage_forget_group(&id, &mut batch)?;
        state.commit(batch, true)?;
        state.forget_group_cache(&id);
        if let Ok(gid) = <[u8; 32]>::try_from(&id[..]) {
            shared.emit(Event::GroupChanged {
                group: GroupId(gid),
                change: GroupChange::Left,
            });
        }
    }
    Ok(())
}
