//! Push target registration on a connection (authenticated devices only). Handled
//! in the request loop: a UnifiedPush endpoint's discovery GET (bounded by
//! `[push] timeout`) holds up only this connection's own requests, one at a time.

use tern_proto::{PushTarget, Reply};

use super::Session;

impl Session {
    pub(super) async fn set_push_target(&mut self, id: u64, target: PushTarget) {
        let push = self.settings.push.clone();
        let result = match self.authenticated() {
            Ok(device) => push.set(device, target).await,
            Err(e) => Err(e),
        };
        self.reply(id, result.map(|()| Reply::SetPushTarget)).await
    }

    pub(super) async fn clear_push_target(&mut self, id: u64) {
        let push = self.settings.push.clone();
        let result = match self.authenticated() {
            Ok(device) => push.clear(device).await,
            Err(e) => Err(e),
        };
        self.reply(id, result.map(|()| Reply::ClearPushTarget))
            .await
    }
}
