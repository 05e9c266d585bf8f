//! Contact discovery for the app (issue 13): which address-book numbers belong to
//! users, learnt through the relay's OPRF without it seeing the numbers; whether
//! this account can be found; forgetting what discovery cached. The rules are in
//! [`crate::discovery`]; this is the async shell over the authenticated connection.

use std::sync::Arc;

use tern_proto::AccountId;

use super::state::State;
use super::{Client, Event};
use crate::discovery;
use crate::net::RelayConnection;
use crate::store::Batch;
use crate::{Error, Result};

mod sync;
#[cfg(test)]
mod tests;

/// Reruns of a sync whose connection dropped (a relay restart, say).
const CLOSED_ATTEMPTS: u32 = 5;
const DAY_MS: u64 = 24 * 3600 * 1000;

/// What [`Client::discover`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiscoveryReport {
    /// Numbers (E.164) of discoverable users, with their accounts; each is now a
    /// contact. This account's own number is left out.
    pub found: Vec<(String, AccountId)>,
    /// Entries of the book that are not valid phone numbers, as given.
    pub invalid: Vec<String>,
    /// How many numbers were new to this device and went to the relay (blinded) to
    /// be evaluated; 0 when every number was evaluated before.
    pub evaluated: usize,
}

impl Client {
    /// Finds which of `numbers` (an address book, in any format; national formats
    /// are read in `default_region`, ISO 3166 alpha-2) belong to discoverable
    /// users, and adds each as a contact known by account id, with the identity
    /// key the relay gave (sends are identified until its first message brings its
    /// delivery token; a key different from one already trusted raises
    /// [`Event::IdentityChanged`]).
    ///
    /// Numbers are normalised to E.164 and deduplicated. Only numbers this device
    /// has never evaluated go to the relay, blinded, in padded batches (the relay
    /// sees how many, rounded up to a power of two, and nothing of which); their
    /// outputs are cached, users or not, so the next sync of the same book
    /// evaluates nothing. The relay's filter is refreshed (deltas since the last
    /// sync, or a snapshot), and only the numbers it holds are looked up, 256 per
    /// request: the relay learns those contacts, as it would at a first message.
    /// Needs a verified number (`NOT_VERIFIED`); evaluations are rate limited
    /// (`RATE_LIMITED` with a retry time). Every batch the relay answered is cached
    /// before an error returns (another batch's, the filter's or a lookup's), so a
    /// retry sends only what was not answered. A relay that breaks the protocol
    /// gives [`Error::Discovery`].
    pub async fn discover<S: AsRef<str>>(
        &self,
        numbers: &[S],
        default_region: &str,
    ) -> Result<DiscoveryReport> {
        self.on_connection(|conn| self.discover_on(conn, numbers, default_region))
            .await
    }

    /// Runs `step` on the authenticated connection, again on the next one if the
    /// connection drops meanwhile (what it did is cached, so a rerun repeats
    /// nothing it finished). Other errors, `RATE_LIMITED` included, go to the app.
    async fn on_connection<T, F, Fut>(&self, mut step: F) -> Result<T>
    where
        F: FnMut(Arc<RelayConnection>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut attempt = 0;
        loop {
            let (conn, _) = self.connections().await?;
            match step(conn.clone()).await {
                Err(Error::Closed(_)) if attempt < CLOSED_ATTEMPTS => {
                    attempt += 1;
                    // The worker notices the drop and reconnects; wait for it.
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_millis(200 << attempt),
                        conn.closed(),
                    )
                    .await;
                    tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
                }
                other => return other,
            }
        }
    }

    async fn discover_on<S: AsRef<str>>(
        &self,
        conn: Arc<RelayConnection>,
        numbers: &[S],
        default_region: &str,
    ) -> Result<DiscoveryReport> {
        let kv = self.shared.state.lock().await.kv.clone();
        let day = u32::try_from(self.shared.now_ms() / DAY_MS).unwrap_or(u32::MAX);
        let synced = sync::sync(&*conn, &*kv, numbers, default_region, day, self.account()).await?;
        let changed = self
            .shared
            .state
            .lock()
            .await
            .add_discovered(&synced.found)?;
        for contact in changed {
            self.shared.emit(Event::IdentityChanged { contact });
        }
        self.shared.outbox.notify_one();
        Ok(synced.report)
    }

    /// Sets whether this account's verified number can be found by others' address
    /// books: lookups follow at once, the published filter from the relay's next
    /// day. Needs a verified number (`NOT_VERIFIED`).
    pub async fn set_discoverable(&self, discoverable: bool) -> Result<()> {
        self.on_connection(|conn| async move { conn.set_discoverable(discoverable).await })
            .await
    }

    /// Deletes everything discovery cached on this device (every number's OPRF
    /// output and the filter) in one durable write: the next [`Client::discover`]
    /// evaluates every number again. Contacts already added stay.
    ///
    /// Call it when the relay's discovery key changed (its operator says so, or
    /// its data directory was rebuilt): cached outputs and the filter are tied to
    /// the old key and nothing on the wire tells the device, so until then known
    /// numbers are looked up under tags the relay no longer holds.
    pub async fn forget_discovery(&self) -> Result<()> {
        let kv = self.shared.state.lock().await.kv.clone();
        Ok(discovery::forget(&*kv)?)
    }
}

impl State {
    /// Adds accounts found by discovery as contacts known by account id and
    /// identity key, in one durable write. A contact already trusted under another
    /// key gets the new key as a change waiting for the user; returns those whose
    /// change is new.
    fn add_discovered(&mut self, found: &[(AccountId, [u8; 32])]) -> Result<Vec<AccountId>> {
        let mut batch = Batch::new();
        let mut changed = Vec::new();
        for (account, key) in found {
            let mut record = self.contacts.get(account).cloned().unwrap_or_default();
            if record.identity_key.is_empty() {
                record.identity_key = key.to_vec();
            } else if record.identity_key != key && record.changed_identity_key != key {
                if record.changed_identity_key.is_empty() {
                    changed.push(*account);
                }
                record.changed_identity_key = key.to_vec();
            } else {
                continue;
            }
            self.put_contact(*account, record, &mut batch);
        }
        self.commit(batch, true)?;
        Ok(changed)
    }
}
