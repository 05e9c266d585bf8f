//! How a commit's sends are refused once the epoch is bound to move.

use std::sync::Arc;

use tern_platform::clock::UnixMillis;
use tern_proto::{DeviceAddress, Envelope, ErrorCode, Refused};

use super::tests::{bob, commit_with_welcome, created, from, queued};
use crate::store::{
    Expired, Flush, MailboxStore, MemoryStore, SharedAppend, StoreError, StoreResult,
    StoredMessage, Stores, Totals, Usage,
};

/// Mailboxes in memory whose shared appends of a body starting `0xEE` (the test's
/// welcome) fail as for an account deleted under the store.
struct DeletedUnderWelcome(Arc<MemoryStore>);

impl Flush for DeletedUnderWelcome {
    fn flush(&self) -> StoreResult<()> {
        self.0.flush()
    }
}

impl MailboxStore for DeletedUnderWelcome {
    fn append_shared(&self, append: &SharedAppend<'_>) -> StoreResult<Vec<u64>> {
        if append.body.first() == Some(&0xEE) {
            return Err(StoreError::Deleted);
        }
        self.0.append_shared(append)
    }
    fn append(
        &self,
        to: &DeviceAddress,
        msgs: &[Envelope],
        accepted_at: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Vec<u64>> {
        self.0.append(to, msgs, accepted_at, expires_at)
    }
    fn read(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<StoredMessage>> {
        self.0.read(of, after, max)
    }
    fn remove(&self, of: &DeviceAddress, seqs: &[u64]) -> StoreResult<Usage> {
        self.0.remove(of, seqs)
    }
    fn usage(&self, of: &DeviceAddress) -> StoreResult<Usage> {
        self.0.usage(of)
    }
    fn totals(&self) -> Totals {
        self.0.totals()
    }
    fn expired(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<Expired>> {
        self.0.expired(now, max)
    }
    fn expire(&self, of: &DeviceAddress, entries: &[Expired]) -> StoreResult<Usage> {
        self.0.expire(of, entries)
    }
}

#[tokio::test]
async fn a_send_refused_whole_after_the_commit_was_stored_is_unavailable_whatever_the_error() {
    let memory = Arc::new(MemoryStore::new());
    let mut stores = Stores::all(memory.clone());
    stores.mailboxes = Arc::new(DeletedUnderWelcome(memory.clone()));
    let f = crate::testing::fixture_on(stores, memory);
    let bob = bob(&f).await;
    let at = from([10, 0, 0, 7]);
    created(&f, at).await;
    let (epoch, results) = f
        .services
        .groups()
        .commit(&f.services, &commit_with_welcome(&bob, 0, 1, 50), at)
        .await
        .expect("the commit is stored, so the epoch moves");
    assert_eq!((epoch, results[0].accepted), (1, 1));
    // Not UNAUTHORIZED (the client would drop Bob's token) nor anything permanent:
    // the committer resends the welcome.
    assert_eq!(
        results[1].refused,
        vec![Refused {
            recipient: 0,
            device: None,
            code: ErrorCode::Unavailable,
        }]
    );
    assert_eq!(queued(&f, &bob), 1);
}
