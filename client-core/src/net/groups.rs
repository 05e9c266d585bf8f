//! The group and multi-recipient requests: MLS key packages, group epochs on the
//! relay (the delivery service's only group state), and one upload for many
//! recipients. Only [`RelayConnection::publish_key_packages`] needs an authenticated
//! connection; everything else works (and is meant to run) on one that identifies no
//! one.

use std::future::Future;

use bytes::Bytes;
use tern_proto::{
    AccountId, DeviceId, FetchedKeyPackage, GroupCommit, GroupHandle, MultiSend, MultiSendResult,
    Reply, Request,
};

use super::{unexpected, RelayConnection};
use crate::error::Result;

impl RelayConnection {
    /// Publishes this device's MLS key packages (and its last-resort package);
    /// `replace` drops the ones the relay held first. Returns how many one-time
    /// packages the relay now holds; publishing none asks only that.
    pub async fn publish_key_packages(
        &self,
        key_packages: Vec<Bytes>,
        last_resort: Option<Bytes>,
        replace: bool,
    ) -> Result<u32> {
        let request = Request::PublishKeyPackages {
            key_packages,
            last_resort,
            replace,
        };
        match self.request(request).await? {
            Reply::PublishKeyPackages { stored } => Ok(stored),
            _ => Err(unexpected("publish_key_packages")),
        }
    }

    /// One key package of each of `account`'s devices (or of one device), each
    /// handed out once; a device with none left gives its last-resort package. Needs
    /// the account's delivery token; on a connection that never authenticates the
    /// relay does not learn who asks.
    pub async fn fetch_key_packages(
        &self,
        account: &AccountId,
        device: Option<DeviceId>,
        delivery_token: &[u8],
    ) -> Result<Vec<FetchedKeyPackage>> {
        let request = Request::FetchKeyPackages {
            account: *account,
            device,
            delivery_token: Bytes::copy_from_slice(delivery_token),
        };
        match self.request(request).await? {
            Reply::FetchKeyPackages(packages) => Ok(packages),
            _ => Err(unexpected("fetch_key_packages")),
        }
    }

    /// Registers a group handle at epoch 0 with the hash of its first epoch token;
    /// `GROUP_EXISTS` if the handle is taken.
    pub async fn create_group(&self, handle: GroupHandle, token_hash: [u8; 32]) -> Result<()> {
        match self
            .request(Request::CreateGroup { handle, token_hash })
            .await?
        {
            Reply::CreateGroup => Ok(()),
            _ => Err(unexpected("create_group")),
        }
    }

    /// Commits a group's epoch: the relay appends the sends (the commit to the
    /// members, the welcome to new devices) and moves the handle to the next epoch.
    /// Returns the new epoch and each send's result. Refused with `STALE_EPOCH` (its
    /// current epoch in the error) when another commit won, `UNKNOWN_GROUP` for an
    /// unknown handle or a wrong epoch token.
    pub async fn group_commit(&self, commit: GroupCommit) -> Result<(u64, Vec<MultiSendResult>)> {
        match self.request(Request::GroupCommit(commit)).await? {
            Reply::GroupCommit { epoch, results } => Ok((epoch, results)),
            _ => Err(unexpected("group_commit")),
        }
    }

    /// One body for many recipient devices, each checked like a sealed send (the
    /// account's delivery token and device-list version); refused devices are in the
    /// result. The request leaves when this is called, as for sends.
    pub fn multi_send(
        &self,
        send: MultiSend,
    ) -> impl Future<Output = Result<MultiSendResult>> + Send + 'static {
        let reply = self.issue(Request::MultiSend(send));
        async move {
            match reply.await? {
                Reply::MultiSend(result) => Ok(result),
                _ => Err(unexpected("multi_send")),
            }
        }
    }
}
