//! The client's background task: one authenticated connection to receive on and for
//! its own keys, and the anonymous link (`anonymous.rs`) for sealed sends, device
//! lists and contacts' prekey bundles, reconnecting with backoff whenever either drops.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::OsRng;
use rand::Rng;
use tern_proto::DeviceId;

use super::anonymous::AnonymousLink;
use super::devices::ListChange;
use super::linking;
use super::send;
use super::state::Outcome;
use super::{Event, Shared};
use crate::net::{Inbox, Incoming, KeyUpload, RelayConnection};
use crate::{Error, ErrorCode, Result};

/// Deliveries handled per durable write and acknowledgement.
const RECEIVE_BATCH: usize = 256;
/// The most a ping after an anonymous connection's loss waits to go out.
const LOSS_PING_JITTER_MS: u64 = 1000;
/// How long that ping may take before the authenticated connection is given up.
const LOSS_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a long-lived connection checks its keys (signed prekey rotation).
pub(super) const MAINTENANCE: Duration = Duration::from_secs(3600);

/// Exponential backoff with jitter.
pub(super) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(15);

    pub(super) fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    pub(super) fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    pub(super) fn step(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // ±25%, so many clients cut off at once do not come back at once.
        base.mul_f64(OsRng.gen_range(0.75..1.25))
    }
}

pub(super) async fn run(shared: std::sync::Arc<Shared>) {
    let mut stop = shared.stop.subscribe();
    let mut backoff = Backoff::new();
    loop {
        if *stop.borrow() {
            break;
        }
        let result = tokio::select! {
            r = connected(&shared, &mut backoff) => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        if let Err(Error::Store(_)) = &result {
            // A failed write may have left the caches ahead of the store.
            if let Err(e) = shared.state.lock().await.reload(shared.now_ms()) {
                tracing::warn!(error = %e, "the device store cannot be read");
            }
        }
        if shared.removed.load(Ordering::Relaxed) {
            // Removed from the account: nothing to reconnect to (and media calls
            // waiting for a connection are told at once).
            shared.stop.send_replace(true);
            shared.emit(Event::Removed);
            break;
        }
        let reason = match result {
            Ok(()) => "closed".to_string(),
            Err(e) => e.to_string(),
        };
        tracing::debug!(%reason, "relay connection lost");
        shared.emit(Event::Disconnected { reason });
        tokio::select! {
            () = tokio::time::sleep(backoff.step()) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    // Stopped mid-connection: close what media transfers could still be holding.
    if let Some((conn, _)) = shared.conns.send_replace(None) {
        conn.close_now();
    }
    shared.anon.close_now().await;
}

async fn connected(shared: &Shared, backoff: &mut Backoff) -> Result<()> {
    let (address, device_key) = {
        let state = shared.state.lock().await;
        (state.keys.address, state.keys.device.clone())
    };
    shared.drained.store(false, Ordering::Relaxed);
    let (conn, inbox) = RelayConnection::connect_pinned(&shared.relay, &shared.pins).await?;
    pinned_under(shared, &conn).await?;
    match conn.authenticate(&address, &device_key).await {
        // A linked device the relay no longer knows was removed (the primary never is).
        Err(e)
            if e.relay_code() == Some(ErrorCode::Unauthorized)
                && address.device != DeviceId::PRIMARY =>
        {
            shared.removed.store(true, Ordering::Relaxed);
            return Err(e);
        }
        other => other?,
    };
    maintain_keys(shared, &conn).await?;
    maintain_devices(shared, &conn).await?;
    super::push::maintain_push(shared, &conn).await?;
    backoff.reset();
    // Sealed sends go over a connection that never authenticates (`shared.anon`),
    // so the relay cannot tie them to this device by connection.
    let (conn, anon) = (Arc::new(conn), shared.anon.clone());
    // Media transfers share these connections, on streams of their own.
    shared
        .conns
        .send_replace(Some((conn.clone(), anon.clone())));
    shared.emit(Event::Connected);
    let result = tokio::select! {
        r = receive_loop(shared, &conn, inbox) => r,
        r = send::send_loop(shared, &conn, &anon) => r,
        r = check_when_anonymous_lost(&conn, &anon) => r,
        r = follow_announcements(shared, &conn) => r,
    };
    shared.conns.send_replace(None);
    if conn.device_removed() {
        shared.removed.store(true, Ordering::Relaxed);
    }
    match Arc::try_unwrap(conn) {
        Ok(c) => c.close().await,
        // A transfer still holds it: close it under the transfer.
        Err(c) => c.close_now(),
    }
    result
}

/// A connection verified under the announced next pin makes it the only pin (the
/// relay switched its certificate), durably.
async fn pinned_under(shared: &Shared, conn: &RelayConnection) -> Result<()> {
    let Some(presented) = conn.presented() else {
        return Ok(());
    };
    if shared.pins.next().map(|n| n.fingerprint) != Some(presented) {
        return Ok(());
    }
    shared.state.lock().await.promote_pin(presented)?;
    shared.pins.connected_under(presented);
    tracing::info!("the relay switched to its announced certificate; the old pin is dropped");
    Ok(())
}

/// Pins the certificate the relay announces it serves next (in the authentication
/// reply or pushed later), durably. Taken only here: this connection was verified
/// under a pin already held, which is what makes the announcement trustworthy.
async fn follow_announcements(shared: &Shared, conn: &RelayConnection) -> Result<()> {
    let mut announced = conn.next_certificate();
    loop {
        let next = *announced.borrow_and_update();
        if let Some(next) = next {
            if shared.pins.next() != Some(next) && shared.pins.current() != next.fingerprint {
                shared.state.lock().await.store_next_pin(&next)?;
                shared.pins.announce(next);
                tracing::info!(
                    switch_at_ms = next.switch_at_ms,
                    "the relay announced its next certificate; pinned beside the current one"
                );
            }
        }
        if announced.changed().await.is_err() {
            // The connection's reader ended; the other branches see why.
            std::future::pending::<()>().await;
        }
    }
}

/// Whenever the anonymous link loses a connection (reset, as by a relay that
/// restarted, or timed out), pings the authenticated connection: a restarted relay has
/// forgotten it too, and it is then found dead in a round trip instead of at its next
/// keep-alive. The ping waits a random moment first, so its timing pairs the two
/// connections less exactly; an error (or no answer) ends the connection.
async fn check_when_anonymous_lost(conn: &RelayConnection, anon: &AnonymousLink) -> Result<()> {
    loop {
        anon.lost().await;
        let pause = Duration::from_millis(OsRng.gen_range(0..LOSS_PING_JITTER_MS));
        tokio::time::sleep(pause).await;
        match tokio::time::timeout(LOSS_PING_TIMEOUT, conn.ping()).await {
            Ok(answer) => answer?,
            Err(_) => return Err(Error::Closed("no answer to a ping".into())),
        }
    }
}

/// Sets a rotated delivery token on the relay.
pub(super) async fn publish_token(shared: &Shared, conn: &RelayConnection) -> Result<()> {
    let token = shared.state.lock().await.unpublished_token();
    if let Some(token) = token {
        conn.set_delivery_token(&token).await?;
        let mut state = shared.state.lock().await;
        state.token_published(&token)?;
        // The account's other devices hand out the new token from now on too.
        if state.is_primary() {
            let sync = state.own_token_sync();
            state.sync_now(sync, shared.now_ms(), &mut OsRng)?;
        }
    }
    Ok(())
}

/// Uploads whatever keys the relay is missing: everything if a previous upload never
/// finished, a new signed prekey when due, one-time prekeys when few are left.
pub(super) async fn maintain_keys(shared: &Shared, conn: &RelayConnection) -> Result<()> {
    publish_token(shared, conn).await?;
    let held = conn.publish_keys(&KeyUpload::default()).await?;
    let now = shared.now_ms();
    let upload = shared
        .state
        .lock()
        .await
        .key_upload(Some(held), now, &mut OsRng)?;
    if let Some(upload) = upload {
        conn.publish_keys(&upload).await?;
        shared.state.lock().await.keys_published()?;
    }
    maintain_key_packages(shared, conn).await
}

/// Tops up this device's MLS key packages on the relay (and its last-resort one).
/// A relay's refusal waits for the next round.
pub(super) async fn maintain_key_packages(shared: &Shared, conn: &RelayConnection) -> Result<()> {
    if shared.state.lock().await.group_device.is_none() {
        return Ok(());
    }
    let held = match conn.publish_key_packages(Vec::new(), None, false).await {
        Ok(held) => held,
        Err(e) if e.relay_code().is_some() => {
            tracing::debug!(error = %e, "key packages not counted");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let now = shared.now_ms();
    let upload = shared.state.lock().await.key_package_upload(held, now)?;
    if let Some((packages, last_resort)) = upload {
        let packages = packages.into_iter().map(Into::into).collect();
        match conn
            .publish_key_packages(packages, Some(last_resort.into()), false)
            .await
        {
            Err(e) if e.relay_code().is_some() => {
                tracing::debug!(error = %e, "key packages not published");
            }
            other => drop(other?),
        }
    }
    Ok(())
}

/// The primary's first signed list if it never published one (so contacts hold a
/// version to be told is stale). A relay's refusal waits for the next round.
pub(super) async fn maintain_devices(shared: &Shared, conn: &RelayConnection) -> Result<()> {
    let (primary, listed) = {
        let state = shared.state.lock().await;
        (state.is_primary(), state.own_list().is_some())
    };
    if primary && !listed {
        match linking::publish_list(shared, conn, ListChange::Same).await {
            Err(e) if e.relay_code().is_some() => {
                tracing::debug!(error = %e, "the first device list was not published");
            }
            other => drop(other?),
        }
    }
    Ok(())
}

/// Removes links never joined by their deadline. Called only once the mailbox is
/// read (at a `QueueEmpty`), so a `DeviceJoined` waiting there settles its link
/// first. A relay's refusal waits for the next round.
async fn remove_expired_links(shared: &Shared, conn: &RelayConnection) -> Result<()> {
    let expired = shared.state.lock().await.expired_links(shared.now_ms());
    for device in expired {
        match linking::remove_device(shared, conn, device).await {
            Err(e) if e.relay_code().is_some() => {
                tracing::debug!(error = %e, "a device never joined and was not removed");
                if e.relay_code() == Some(ErrorCode::NotFound) {
                    shared.state.lock().await.settle_link(device)?;
                }
            }
            other => other?,
        }
    }
    Ok(())
}

async fn receive_loop(shared: &Shared, conn: &RelayConnection, mut inbox: Inbox) -> Result<()> {
    // Group envelopes held for an epoch whose commit was applied just before a
    // crash (its retry lost with it) apply now.
    {
        let mut state = shared.state.lock().await;
        state.settle_tree_uploads()?;
        let events = state.retry_held(shared.now_ms())?;
        if !events.is_empty() {
            state.flush()?;
            shared.outbox.notify_one();
            for e in events {
                shared.emit(e);
            }
        }
    }
    loop {
        let first = inbox
            .recv()
            .await
            .ok_or_else(|| Error::Closed("relay".into()))?;
        let mut items = vec![first];
        while items.len() < RECEIVE_BATCH {
            match inbox.try_recv() {
                Some(item) => items.push(item),
                None => break,
            }
        }
        let mut acks = Vec::with_capacity(items.len());
        let mut failure = None;
        let drained = items.iter().any(|i| matches!(i, Ok(Incoming::QueueEmpty)));
        let consumed = {
            let mut state = shared.state.lock().await;
            let now = shared.now_ms();
            let mut events = Vec::new();
            for item in items {
                let delivery = match item {
                    Ok(Incoming::Delivery(d)) => d,
                    Ok(Incoming::QueueEmpty) => continue,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                };
                match state.receive(&delivery, now, &mut OsRng) {
                    Ok(Outcome::Message(m)) => events.push(Event::Message(m)),
                    Ok(Outcome::Held { contact, first }) => {
                        if first {
                            events.push(Event::IdentityChanged { contact });
                        }
                    }
                    Ok(Outcome::Duplicate) => {}
                    Ok(Outcome::Synced(synced)) => events.extend(synced),
                    Ok(Outcome::Dropped(reason)) => {
                        tracing::debug!(%reason, "discarded an envelope");
                        events.push(Event::Dropped { reason });
                    }
                    // A local failure: this one is not acknowledged (the relay will
                    // deliver it again); what came before still is.
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
                acks.push(delivery.seq);
            }
            // Stored durably before the relay may delete anything.
            state.flush()?;
            // A commit applied may unblock a group's queued op or messages.
            // So may a welcome held for its tree, which the group round fetches.
            if !acks.is_empty() && (!state.groups.is_empty() || state.has_held_welcomes()?) {
                shared.outbox.notify_one();
            }
            // Emitted under the lock, so an identity acceptance cannot interleave.
            for e in events {
                shared.emit(e);
            }
            std::mem::take(&mut state.consumed_prekeys)
        };
        if !acks.is_empty() {
            // Sent now; the reply is not waited for: a lost ack only means the relay
            // delivers again, and the copy is recognised as a duplicate.
            let ack = conn.ack(&acks);
            tokio::spawn(async move {
                if let Err(e) = ack.await {
                    tracing::debug!(error = %e, "acknowledgement not confirmed");
                }
            });
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if consumed > 0 {
            maintain_keys(shared, conn).await?;
        }
        if drained {
            remove_expired_links(shared, conn).await?;
            // A group epoch still awaited now may never come: the send round times it.
            if !shared.drained.swap(true, Ordering::Relaxed) {
                shared.outbox.notify_one();
            }
        }
    }
}
