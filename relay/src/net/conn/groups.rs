//! The delivery service's requests on a connection. `PublishKeyPackages` needs the
//! connection's authenticated device; the others work on any connection and, when
//! they succeed, count as anonymous requests (as a sealed send does), saying nothing
//! of who asks.

use bytes::Bytes;
use tern_proto::{AccountId, DeviceId, GroupCommit, GroupHandle, Reply, Request};

use super::Session;
use crate::groups::PackageRequester;

impl Session {
    /// Serves one of the delivery service's requests (any other is ignored).
    pub(super) async fn groups_request(&mut self, id: u64, request: Request) {
        match request {
            Request::PublishKeyPackages {
                key_packages,
                last_resort,
                replace,
            } => (self.publish_key_packages(id, key_packages, last_resort, replace)).await,
            Request::FetchKeyPackages {
                account,
                device,
                delivery_token,
            } => (self.fetch_key_packages(id, account, device, delivery_token)).await,
            Request::CreateGroup { handle, token_hash } => {
                self.create_group(id, handle, token_hash).await
            }
            Request::GroupCommit(commit) => self.group_commit(id, commit).await,
            _ => {
                let e = crate::error::Error::BadRequest("not a group request".into());
                self.reply(id, Err(e)).await
            }
        }
    }

    async fn publish_key_packages(
        &mut self,
        id: u64,
        key_packages: Vec<Bytes>,
        last_resort: Option<Bytes>,
        replace: bool,
    ) {
        let reply = match self.authenticated() {
            Ok(device) => {
                let groups = self.services.groups();
                (groups.publish_key_packages(device, &key_packages, last_resort.as_ref(), replace))
                    .await
                    .map(|stored| Reply::PublishKeyPackages { stored })
            }
            Err(e) => Err(e),
        };
        self.reply(id, reply).await
    }

    async fn fetch_key_packages(
        &mut self,
        id: u64,
        account: AccountId,
        device: Option<DeviceId>,
        token: Bytes,
    ) {
        if !self.take_place(id).await {
            return;
        }
        let requester = PackageRequester {
            token: &token,
            device: self.device.get(),
            from: self.prefix,
        };
        let groups = self.services.groups();
        let reply = (groups.fetch_key_packages(requester, &account, device).await)
            .map(Reply::FetchKeyPackages);
        self.anonymous_reply(id, reply).await
    }

    async fn create_group(&mut self, id: u64, handle: GroupHandle, hash: [u8; 32]) {
        if !self.take_place(id).await {
            return;
        }
        let groups = self.services.groups();
        let reply = (groups.create(&handle, &hash, self.prefix).await).map(|()| Reply::CreateGroup);
        self.anonymous_reply(id, reply).await
    }

    /// Runs in the reader: a commit may wait for its handle's lock and two flushes,
    /// and requests after it on this connection wait for it (commits are rare).
    async fn group_commit(&mut self, id: u64, commit: GroupCommit) {
        if !self.take_place(id).await {
            return;
        }
        let services = self.services.clone();
        let reply = (services
            .groups()
            .commit(&services, &commit, self.prefix)
            .await)
            .map(|(epoch, results)| Reply::GroupCommit { epoch, results });
        self.anonymous_reply(id, reply).await
    }
}
