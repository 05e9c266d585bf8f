//! How the backends are put together for a relay: which store holds what, and one
//! [`Flush`] that makes all of them durable.

use std::sync::Arc;

use super::{AccountStore, BlobIndex, Flush, KeyStore, MailboxStore, StoreResult};

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
    /// Media metadata.
    pub blobs: Arc<dyn BlobIndex>,
    /// Makes every change to any of them durable.
    pub flush: Arc<dyn Flush>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

impl Stores {
    /// Every store on one backend.
    pub fn all<S: MailboxStore + AccountStore + KeyStore + BlobIndex>(store: Arc<S>) -> Self {
        Stores {
            mailboxes: store.clone(),
            accounts: store.clone(),
            keys: store.clone(),
            blobs: store.clone(),
            flush: store,
        }
    }

    /// Mailboxes on one backend, everything else on another (which holds no
    /// mailboxes, so it need not be a [`MailboxStore`]).
    ///
    /// The flush flushes only the backends written since the last flush, so a
    /// backend that fails (sled after a full disk) fails only the commits that wrote
    /// to it: mailbox acks and sends still commit while no registration, key upload
    /// or blob record was written since. A flush that writes both fails if either
    /// fails.
    pub fn split<M, S>(mailboxes: Arc<M>, rest: Arc<S>) -> Self
    where
        M: MailboxStore,
        S: AccountStore + KeyStore + BlobIndex + Flush,
    {
        let mailboxes = Arc::new(Marked::new(mailboxes));
        let rest = Arc::new(Marked::new(rest));
        Stores {
            mailboxes: mailboxes.clone(),
            accounts: rest.clone(),
            keys: rest.clone(),
            blobs: rest.clone(),
            flush: Arc::new(FlushBoth(mailboxes, rest)),
        }
    }
}

/// Flushes the mailboxes, then the rest, each only if written since its last flush;
/// both are tried, and the first error is returned.
struct FlushBoth<M: ?Sized, S: ?Sized>(Arc<Marked<M>>, Arc<Marked<S>>);

impl<M: Flush + ?Sized, S: Flush + ?Sized> Flush for FlushBoth<M, S> {
    fn flush(&self) -> StoreResult<()> {
        let mailboxes = self.0.flush_if_written();
        let rest = self.1.flush_if_written();
        mailboxes.and(rest)
    }
}

#[cfg(test)]
mod tests;
