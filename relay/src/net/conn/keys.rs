//! `FetchKeys` on a connection: by its authenticated device, or with the target
//! account's delivery token on any connection, where it counts as an anonymous
//! request (like a sealed send) and says nothing of who asks.

use bytes::Bytes;
use tern_proto::{AccountId, DeviceId, Reply};

use super::Session;
use crate::keys::Requester;

impl Session {
    pub(super) async fn fetch_keys(
        &mut self,
        id: u64,
        account: AccountId,
        device: Option<DeviceId>,
        token: Option<Bytes>,
    ) {
        let Some(token) = token else {
            // Older clients: an authenticated device, no token.
            let reply = self.authenticated().and_then(|requester| {
                let found = self.services.keys().fetch(requester, &account, device)?;
                Ok(Reply::FetchKeys(found.into_bundles()))
            });
            return self.reply(id, reply).await;
        };
        if !self.take_place(id).await {
            return;
        }
        let requester = Requester::Token {
            token: &token,
            device: self.device.get(),
            from: self.prefix,
        };
        let reply = (self.services.keys().fetch(requester, &account, device))
            .map(|found| Reply::FetchKeys(found.into_bundles()));
        self.anonymous_reply(id, reply).await
    }
}
