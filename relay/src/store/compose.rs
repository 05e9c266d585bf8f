//! How the backends are put together for a relay: which store holds what, and one
//! [`Flush`] that makes all of them durable.

use std::sync::Arc;

use super::{AccountStore, BlobIndex, Flush, KeyStore, MailboxStore, StoreResult};

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
    pub fn split<M, S>(mailboxes: Arc<M>, rest: Arc<S>) -> Self
    where
        M: MailboxStore,
        S: AccountStore + KeyStore + BlobIndex + Flush,
    {
        Stores {
            mailboxes: mailboxes.clone(),
            accounts: rest.clone(),
            keys: rest.clone(),
            blobs: rest.clone(),
            flush: Arc::new(FlushBoth(mailboxes, rest)),
        }
    }
}

/// Flushes the mailboxes, then the rest.
struct FlushBoth(Arc<dyn Flush>, Arc<dyn Flush>);

impl Flush for FlushBoth {
    fn flush(&self) -> StoreResult<()> {
        self.0.flush()?;
        self.1.flush()
    }
}
