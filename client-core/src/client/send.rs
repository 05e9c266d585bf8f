//! The sending half of the worker: each round goes through the outbox recipient by
//! recipient, checks the recipient's devices and signed device list (daily, and at
//! once when the relay says the list is stale), starts sessions with devices that
//! have none, encrypts what is unprepared, and sends the sealed copies, in bounded
//! batches, over the anonymous link (or, without the recipient's token, over the
//! authenticated connection).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use rand::rngs::OsRng;
use tern_proto::{AccountId, DeviceAddress, DeviceBundle, DeviceId};

use super::anonymous::AnonymousLink;
use super::contacts::StartError;
use super::outbox::{DeviceSends, SealedCopy};
use super::state::State;
use super::worker::{maintain_devices, maintain_keys, publish_token, Backoff, MAINTENANCE};
use super::{Event, Shared};
use crate::crypto::sealed::SenderCertificate;
use crate::net::{Envelope, RelayConnection};
use crate::store::StoreError;
use crate::{Error, ErrorCode, Result};

/// Envelopes per send request.
const SEND_BATCH: usize = 64;
/// Content bytes per send request: sealed sends go on a connection that never
/// authenticates, where the relay's frames are 264 KiB by default (a larger single
/// envelope still goes alone).
pub(super) const SEND_BYTES: usize = 256 * 1024 - 4096;
/// Copies sealed for one recipient per send round (four full requests).
pub(super) const SEAL_PER_ROUND: usize = 4 * SEND_BATCH;
/// A sender certificate is replaced this long before it expires.
const CERTIFICATE_MARGIN_MS: u64 = 3600 * 1000;

/// Sends refused as `STALE_DEVICE_LIST` in a row, by recipient, and (once past
/// [`STALE_RETRIES`]) the time before which that recipient is not tried again.
type Stale = HashMap<AccountId, (u32, u64)>;
/// How many times in a row a stale send refreshes the list and goes again before
/// the recipient waits out a pause of its own.
const STALE_RETRIES: u32 = 3;
/// The longest such pause: a list that cannot be refreshed (the relay refuses the
/// token, or the list does not verify) is tried again hourly, and by the daily check.
const STALE_PAUSE_MAX_MS: u64 = 3600 * 1000;

/// The pause after the `tries`-th stale refusal in a row: none for the first
/// [`STALE_RETRIES`], then doubling from 1 s up to [`STALE_PAUSE_MAX_MS`].
fn stale_pause_ms(tries: u32) -> u64 {
    match tries.checked_sub(STALE_RETRIES + 1) {
        None => 0,
        Some(n) => 1000u64
            .saturating_mul(1u64 << n.min(20))
            .min(STALE_PAUSE_MAX_MS),
    }
}

pub(super) enum Round {
    /// Nothing left to send.
    Idle,
    /// Something was sent; go again.
    Progress,
    /// The relay refused for now (full mailbox, say); retry after a pause.
    Wait,
}

impl Round {
    /// Folds one step's outcome into this round's: a wait wins, then progress.
    pub(super) fn merge(&mut self, step: Round) {
        match (&*self, step) {
            (_, Round::Wait) => *self = Round::Wait,
            (Round::Idle, Round::Progress) => *self = Round::Progress,
            _ => {}
        }
    }
}

pub(super) async fn send_loop(
    shared: &Shared,
    conn: &RelayConnection,
    anon: &AnonymousLink,
) -> Result<()> {
    let mut certificate: Option<SenderCertificate> = None;
    let mut stale = Stale::new();
    let mut retry = Backoff::new();
    let mut maintenance = tokio::time::interval(MAINTENANCE);
    maintenance.tick().await;
    loop {
        let notified = shared.outbox.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        publish_token(shared, conn).await?;
        match send_round(shared, conn, anon, &mut certificate, &mut stale).await? {
            Round::Progress => {
                retry.reset();
                continue;
            }
            Round::Idle => tokio::select! {
                () = &mut notified => {}
                _ = maintenance.tick() => {
                    maintain_keys(shared, conn).await?;
                    maintain_devices(shared, conn).await?;
                }
            },
            Round::Wait => tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(retry.step()) => {}
            },
        }
    }
}

/// Once a day per contact we send to: asks the relay (anonymously, with the
/// contact's token) which devices it has, drops the ones gone and starts sessions
/// with new ones, so their copies go out too. Refusals only postpone the check.
async fn refresh_devices(
    shared: &Shared,
    conn: &RelayConnection,
    anon: &AnonymousLink,
    recipient: &AccountId,
) -> Result<()> {
    let now = shared.now_ms();
    let Some(token) = shared.state.lock().await.devices_due(recipient, now) else {
        return Ok(());
    };
    let Some(new) = check_list(shared, anon, recipient, token).await? else {
        return Ok(());
    };
    let mut bundles = Vec::new();
    for &device in &new {
        let Ok(device) = DeviceId::try_from(device) else {
            continue;
        };
        match fetch_bundles(conn, anon, recipient, Some(device), Some(token)).await {
            Ok(b) => bundles.extend(b),
            Err(e) if e.relay_code().is_some() => {}
            Err(e) => return Err(e),
        }
    }
    let mut state = shared.state.lock().await;
    if bundles.len() < new.len() {
        state.recheck_soon(recipient, now)?;
    }
    if bundles.is_empty() {
        return Ok(());
    }
    match state.start_sessions(*recipient, &bundles, &mut OsRng) {
        Ok(()) => state.reprepare(recipient),
        Err(StartError::IdentityChanged { first }) => {
            if first {
                shared.emit(Event::IdentityChanged {
                    contact: *recipient,
                });
            }
            Ok(())
        }
        Err(StartError::NoDevices) => Ok(()),
        Err(StartError::Fatal(e)) => Err(e),
    }
}

/// Asks the relay (anonymously, with the account's token) for `recipient`'s devices
/// and signed list, and applies them under the device-list rules (a refused list
/// is reported as dropped; the cached one stays). Returns the devices to encrypt to
/// that have no session yet; `None` if the relay refused (a rotated token, say: the
/// check is recorded and made again tomorrow, and sends handle the rest).
async fn check_list(
    shared: &Shared,
    anon: &AnonymousLink,
    recipient: &AccountId,
    token: [u8; 32],
) -> Result<Option<Vec<u32>>> {
    let now = shared.now_ms();
    let listing = anon.run(|c| async move { c.device_listing(recipient, &token).await });
    let listing = match listing.await {
        Ok(listing) => listing,
        Err(e) if e.relay_code().is_some() => {
            let mut state = shared.state.lock().await;
            let known: Vec<u32> = state
                .contact(recipient)
                .map(|c| c.devices.iter().map(|d| d.device_id).collect())
                .unwrap_or_default();
            state.update_devices(recipient, &known, now)?;
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let ids: Vec<u32> = listing.devices.iter().map(|d| d.get()).collect();
    let (list, signature) = listing
        .list
        .as_ref()
        .map_or((&[][..], &[][..]), |(l, s)| (&l[..], &s[..]));
    let checked = shared
        .state
        .lock()
        .await
        .apply_device_list(recipient, &ids, list, signature, now)?;
    if let Some(reason) = checked.refused {
        tracing::debug!(%reason, "a device list was refused");
        shared.emit(Event::Dropped { reason });
    }
    Ok(Some(checked.new))
}

/// A contact's prekey bundles (one device, or all). With its delivery token they are
/// fetched on the anonymous link, so the relay does not learn who starts a session
/// with whom. Without one (a contact added by account id alone, or one whose token
/// was rotated, until its next message brings the new one) only the authenticated
/// connection can fetch, and the relay sees who asks.
async fn fetch_bundles(
    conn: &RelayConnection,
    anon: &AnonymousLink,
    recipient: &AccountId,
    device: Option<DeviceId>,
    token: Option<[u8; 32]>,
) -> Result<Vec<DeviceBundle>> {
    match token {
        Some(token) => {
            let fetch = |c: Arc<RelayConnection>| async move {
                c.fetch_keys_with_token(recipient, device, &token).await
            };
            anon.run(fetch).await
        }
        None => conn.fetch_keys(recipient, device).await,
    }
}

/// A fresh sender certificate, fetched when the current one is about to expire.
pub(super) async fn certificate<'a>(
    conn: &RelayConnection,
    cached: &'a mut Option<SenderCertificate>,
    now_ms: u64,
) -> Result<&'a SenderCertificate> {
    let fresh = cached
        .as_ref()
        .is_some_and(|c| c.expires_at_ms > now_ms + CERTIFICATE_MARGIN_MS);
    if !fresh {
        let issued = conn.sender_certificate().await?;
        let cert = SenderCertificate::parse(&issued.certificate, &issued.signature)
            .map_err(|e| Error::Protocol(format!("sender certificate: {e}")))?;
        *cached = Some(cert);
    }
    cached
        .as_ref()
        .ok_or_else(|| Error::Protocol("no sender certificate".into()))
}

async fn send_round(
    shared: &Shared,
    conn: &RelayConnection,
    anon: &AnonymousLink,
    cached: &mut Option<SenderCertificate>,
    stale: &mut Stale,
) -> Result<Round> {
    let recipients: Vec<AccountId> = {
        let state = shared.state.lock().await;
        let mut seen = HashSet::new();
        state
            .outbox()
            .filter_map(|(_, r)| AccountId::try_from(&r.recipient[..]).ok())
            .filter(|a| seen.insert(*a))
            .filter(|a| !state.contact(a).is_some_and(|c| c.blocked()))
            .collect()
    };
    let mut round = Round::Idle;
    for recipient in recipients {
        refresh_devices(shared, conn, anon, &recipient).await?;
        let (needs_bundles, token) = {
            let mut state = shared.state.lock().await;
            (state.needs_bundles(&recipient)?, state.token_of(&recipient))
        };
        if needs_bundles {
            // The signed list first, so the bundles are checked against it.
            if let Some(token) = token {
                check_list(shared, anon, &recipient, token).await?;
            }
            let fetched = match fetch_bundles(conn, anon, &recipient, None, token).await {
                // A rotated token, or a relay from before token fetches (which
                // refuses them on a connection that has not authenticated): fetch as
                // ourselves rather than not at all. The token is kept; a refused
                // sealed send is what drops it.
                Err(e) if token.is_some() && e.relay_code() == Some(ErrorCode::Unauthorized) => {
                    conn.fetch_keys(&recipient, None).await
                }
                other => other,
            };
            let bundles = match fetched {
                Ok(b) => b,
                Err(e) if e.relay_code() == Some(ErrorCode::UnknownRecipient) => {
                    fail_all(shared, &recipient, "no such account").await?;
                    round = Round::Progress;
                    continue;
                }
                Err(e) if e.relay_code().is_some() => {
                    round = Round::Wait;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let started = shared
                .state
                .lock()
                .await
                .start_sessions(recipient, &bundles, &mut OsRng);
            match started {
                Ok(()) => {}
                Err(StartError::IdentityChanged { first }) => {
                    if first {
                        shared.emit(Event::IdentityChanged { contact: recipient });
                    }
                    continue;
                }
                Err(StartError::NoDevices) => {
                    // Our own other devices may not have published keys yet (one
                    // still joining): their syncs wait, unless none is left.
                    let own = shared.state.lock().await.keys.address.account;
                    if recipient == own && shared.state.lock().await.has_other_devices() {
                        round = Round::Wait;
                        continue;
                    }
                    fail_all(shared, &recipient, "the account has no devices with keys").await?;
                    round = Round::Progress;
                    continue;
                }
                Err(StartError::Fatal(e)) => return Err(e),
            }
        }
        let unsent = {
            let mut state = shared.state.lock().await;
            let now = shared.now_ms();
            let seqs: Vec<u64> = state
                .outbox()
                .filter(|(_, r)| r.recipient == recipient.as_bytes() && !r.prepared)
                .map(|(s, _)| *s)
                .collect();
            let prepared_any = !seqs.is_empty();
            for seq in seqs {
                match state.prepare(seq, now) {
                    Ok(()) => {}
                    Err(e @ Error::Store(StoreError::Backend(_))) => return Err(e),
                    // This message cannot be encrypted (a damaged session record, say):
                    // it fails alone instead of stopping the outbox.
                    Err(e) => fail_one(shared, &mut state, seq, recipient, &e.to_string())?,
                }
                // Copies all sent already (a device dropped since): it is done.
                if let Some((id, to)) = state.mark_sent(seq, &[])? {
                    shared.emit(Event::Sent { message_id: id, to });
                }
            }
            // The new session state is on disk before any ciphertext leaves (messages
            // prepared at `send` were flushed there).
            if prepared_any {
                state.flush()?;
            }
            let unsent = state.outbox().any(|(_, r)| {
                r.recipient == recipient.as_bytes() && r.copies.iter().any(|c| !c.sent)
            });
            unsent
        };
        if !unsent {
            continue;
        }
        // Sealing happens in the outbox, under a certificate checked here; what comes
        // back are the bytes to send. A bounded batch per round: a backlog goes out
        // over several rounds, each under a certificate checked again.
        let cert = certificate(conn, cached, shared.now_ms()).await?;
        let (plans, token) =
            shared
                .state
                .lock()
                .await
                .sealed_sends(&recipient, cert, SEAL_PER_ROUND, &mut OsRng)?;
        for plan in plans {
            round.merge(send_device(shared, (conn, anon), &recipient, &plan, token, stale).await?);
        }
    }
    round.merge(super::group_send::group_round(shared, conn, anon).await?);
    round.merge(super::broadcast::send_broadcasts(shared, conn, anon, cached).await?);
    round.merge(super::group_rejoin::ask_due(shared).await?);
    Ok(round)
}

async fn send_device(
    shared: &Shared,
    (conn, anon): (&RelayConnection, &AnonymousLink),
    recipient: &AccountId,
    plan: &DeviceSends,
    token: Option<[u8; 32]>,
    stale: &mut Stale,
) -> Result<Round> {
    let to = DeviceAddress {
        account: *recipient,
        device: plan.device,
    };
    let now = shared.now_ms();
    if stale.get(recipient).is_some_and(|&(_, until)| until > now) {
        return Ok(Round::Wait);
    }
    // Without the contact's token this device cannot fetch its list, so it cannot act
    // on a stale refusal: such sends go unchecked (version 0), to the devices it knows.
    let version = match token {
        Some(_) => shared.state.lock().await.list_version(recipient),
        None => 0,
    };
    for chunk in chunks(&plan.copies) {
        let envelopes = || {
            chunk.iter().map(|c| Envelope {
                message_id: c.message_id,
                payload: c.payload.clone().into(),
            })
        };
        let result = match &token {
            Some(token) => {
                anon.run(|c| c.sealed_send_for(&to, token, version, envelopes()))
                    .await
            }
            // No token yet: this first message identifies its sender to the relay.
            None => conn.send_for(&to, version, envelopes()).await,
        };
        match result {
            Ok(_) => {
                stale.remove(recipient);
            }
            Err(e) => match e.relay_code() {
                Some(ErrorCode::StaleDeviceList) => {
                    // The account's devices changed: check its list now and send
                    // again, a few times in a row at once, then after growing pauses
                    // for this recipient alone (until a send to it succeeds).
                    let entry = stale.entry(*recipient).or_default();
                    entry.0 = entry.0.saturating_add(1);
                    entry.1 = now.saturating_add(stale_pause_ms(entry.0));
                    shared.state.lock().await.check_list_now(recipient)?;
                    return Ok(if entry.0 > STALE_RETRIES {
                        Round::Wait
                    } else {
                        Round::Progress
                    });
                }
                Some(ErrorCode::Unauthorized) if token.is_some() => {
                    // The contact rotated its token: fall back until it sends the new one.
                    shared.state.lock().await.drop_token(recipient)?;
                    return Ok(Round::Progress);
                }
                Some(ErrorCode::UnknownRecipient) => {
                    // The device is gone: its copies go; the messages wait for the
                    // contact's other devices, or fail if it has none left.
                    shared
                        .state
                        .lock()
                        .await
                        .drop_device(recipient, plan.device.get())?;
                    return Ok(Round::Progress);
                }
                Some(ErrorCode::TooLarge | ErrorCode::BadRequest) => {
                    let mut state = shared.state.lock().await;
                    for c in chunk {
                        fail_one(shared, &mut state, c.seq, *recipient, &e.to_string())?;
                    }
                    return Ok(Round::Progress);
                }
                Some(_) => return Ok(Round::Wait),
                None => return Err(e),
            },
        }
        let mut state = shared.state.lock().await;
        for c in chunk {
            if let Some((id, to)) = state.mark_sent(c.seq, &[plan.device.get()])? {
                shared.emit(Event::Sent { message_id: id, to });
            }
        }
    }
    Ok(if plan.copies.is_empty() {
        Round::Idle
    } else {
        Round::Progress
    })
}

/// Consecutive runs of copies for one request: at most [`SEND_BATCH`] envelopes and
/// [`SEND_BYTES`] of payload, so a request stays far below the relay's frame limit.
fn chunks(copies: &[SealedCopy]) -> Vec<&[SealedCopy]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, copy) in copies.iter().enumerate() {
        if i > start && (i - start == SEND_BATCH || bytes + copy.payload.len() > SEND_BYTES) {
            out.push(&copies[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += copy.payload.len();
    }
    if start < copies.len() {
        out.push(&copies[start..]);
    }
    out
}

/// Gives up on message `seq` and tells the app why.
pub(super) fn fail_one(
    shared: &Shared,
    state: &mut State,
    seq: u64,
    to: AccountId,
    reason: &str,
) -> Result<()> {
    if let Some(message_id) = state.fail(seq)? {
        shared.emit(Event::SendFailed {
            message_id,
            to,
            reason: reason.to_string(),
        });
    }
    Ok(())
}

async fn fail_all(shared: &Shared, recipient: &AccountId, reason: &str) -> Result<()> {
    let mut state = shared.state.lock().await;
    let seqs: Vec<u64> = state
        .outbox()
        .filter(|(_, r)| r.recipient == recipient.as_bytes())
        .map(|(s, _)| *s)
        .collect();
    for seq in seqs {
        fail_one(shared, &mut state, seq, *recipient, reason)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::MessageId;

    #[test]
    fn requests_are_bounded_by_count_and_bytes() {
        let copy = |n: usize| SealedCopy {
            seq: 0,
            message_id: MessageId([0; 16]),
            payload: vec![0u8; n],
        };
        let small: Vec<_> = (0..130).map(|_| copy(10)).collect();
        let sizes: Vec<usize> = chunks(&small).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![64, 64, 2]);
        let big: Vec<_> = (0..40).map(|_| copy(100_000)).collect();
        let sizes: Vec<usize> = chunks(&big).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![2; 20], "fits a frame before authentication");
        let huge = vec![copy(2 << 20)];
        assert_eq!(
            chunks(&huge).len(),
            1,
            "one oversized copy still goes alone"
        );
        assert!(chunks(&[]).is_empty());
    }

    #[test]
    fn stale_refusals_pause_a_recipient_longer_each_time_up_to_an_hour() {
        let pauses: Vec<u64> = (1..=8).map(stale_pause_ms).collect();
        assert_eq!(pauses, [0, 0, 0, 1000, 2000, 4000, 8000, 16_000]);
        assert_eq!(stale_pause_ms(100), STALE_PAUSE_MAX_MS);
        assert_eq!(stale_pause_ms(u32::MAX), STALE_PAUSE_MAX_MS);
    }
}
