//! How the backends are put together for a relay: which store holds what, and one
//! [`Flush`] that makes all of them durable.

use std::sync::Arc;

use super::pg::PgBackend;
use super::{
    AccountStore, BlobIndex, DiscoveryStore, Flush, GroupStore, KeyPackageStore, KeyStore,
    MailboxStore, MemorySlots, ProvisioningStore, PushStore, StoreResult,
};

mod marked;

use self::marked::Marked;

/// The stores a relay works on.
#[derive(Clone)]
pub struct Stores {
    /// Queued envelopes.
    pub mailboxes: Arc<dyn MailboxStore>,
    /// Accounts, device keys, delivery tokens.
    pub accounts: Arc<dyn AccountStore>,
    /// Published prekeys.
    pub keys: Arc<dyn KeyStore>,
    /// Published MLS key packages.
    pub key_packages: Arc<dyn KeyPackageStore>,
    /// Group handles and their epochs.
    pub groups: Arc<dyn GroupStore>,
    /// Devices' push targets.
    pub push: Arc<dyn PushStore>,
    /// Media metadata.
    pub blobs: Arc<dyn BlobIndex>,
    /// Discovery tags and evaluation buckets. Tag changes flush themselves (they are
    /// rare); bucket charges are made durable by the group commit.
    pub discovery: Arc<dyn DiscoveryStore>,
    /// Provisioning slots for devices being linked: in memory on an embedded relay
    /// (ciphertext that lives ten minutes), in the shared database across nodes.
    pub provisioning: Arc<dyn ProvisioningStore>,
    /// Makes every change to any of them durable.
    pub flush: Arc<dyn Flush>,
    /// The shared database when every store is on it (a relay of several nodes):
    /// leases, cross-node hints and the cluster's facts go through it.
    pub shared: Option<Arc<PgBackend>>,
    /// The embedded stores by their own types, for a backup
    /// ([`super::backup::backup_new`]); set when opened from a data directory.
    pub embedded: Option<Arc<super::backup::Embedded>>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

impl Stores {
    /// Every store on one backend.
    pub fn all<S>(store: Arc<S>) -> Self
    where
        S: MailboxStore
            + AccountStore
            + KeyStore
            + KeyPackageStore
            + GroupStore
            + BlobIndex
            + DiscoveryStore
            + PushStore,
    {
        Stores {
            discovery: store.clone(),
            mailboxes: store.clone(),
            accounts: store.clone(),
            keys: store.clone(),
            key_packages: store.clone(),
            groups: store.clone(),
            push: store.clone(),
            blobs: store.clone(),
            provisioning: Arc::new(MemorySlots::new()),
            flush: store,
            shared: None,
            embedded: None,
        }
    }

    /// Every store on the shared PostgreSQL database, for a relay of several nodes.
    pub fn postgres(pg: Arc<PgBackend>) -> Self {
        let mut stores = Stores::all(pg.clone());
        // Slots too: a slot opened through one node is taken through another.
        stores.provisioning = pg.clone();
        stores.shared = Some(pg);
        stores
    }

    /// Mailboxes on one backend, everything else on another (which holds no
    /// mailboxes, so it need not be a [`MailboxStore`]).
    ///
    /// The flush flushes only the backends written since the last flush, so mailbox
    /// acks and sends do not wait for sled when nothing was written to it. A backend
    /// whose flush failed is flushed again by every later flush until one succeeds
    /// (see `Marked::flush_if_written`), and fails every commit that may have written
    /// to it: sled latches an I/O error until it is opened again, so after one,
    /// registrations and key uploads fail until a restart while mailbox sends and
    /// acks ([`super::GroupCommit::commit_mailboxes`]) go on.
    pub fn split<M, S>(mailboxes: Arc<M>, rest: Arc<S>) -> Self
    where
        M: MailboxStore,
        S: AccountStore
            + KeyStore
            + KeyPackageStore
            + GroupStore
            + BlobIndex
            + DiscoveryStore
            + PushStore
            + Flush,
    {
        let mailboxes = Arc::new(Marked::new(mailboxes));
        let rest = Arc::new(Marked::new(rest));
        Stores {
            mailboxes: mailboxes.clone(),
            accounts: rest.clone(),
            keys: rest.clone(),
            key_packages: rest.clone(),
            groups: rest.clone(),
            push: rest.clone(),
            blobs: rest.clone(),
            discovery: rest.clone(),
            provisioning: Arc::new(MemorySlots::new()),
            flush: Arc::new(FlushBoth(mailboxes, rest)),
            shared: None,
            embedded: None,
        }
    }
}

/// Flushes the mailboxes, then the rest, each only if written since its last flush;
/// both are tried, and the first error is returned.
struct FlushBoth<M: ?Sized, S: ?Sized>(Arc<Marked<M>>, Arc<Marked<S>>);

impl<M: Flush + ?Sized, S: Flush + ?Sized> Flush for FlushBoth<M, S> {
    fn flush(&self) -> StoreResult<()> {
        let (mailboxes, rest) = self.flush_parts();
        mailboxes.and(rest)
    }

    fn flush_parts(&self) -> (StoreResult<()>, StoreResult<()>) {
        (self.0.flush_if_written(), self.1.flush_if_written())
    }
}

#[cfg(test)]
mod tests;
