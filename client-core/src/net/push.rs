//! Push target registration on the authenticated connection.

use tern_proto::{PushTarget, Reply, Request};

use super::{unexpected, RelayConnection};
use crate::error::Result;

impl RelayConnection {
    /// Registers this device's wake-up target, replacing any earlier one.
    pub async fn set_push_target(&self, target: PushTarget) -> Result<()> {
        match self.request(Request::SetPushTarget(target)).await? {
            Reply::SetPushTarget => Ok(()),
            _ => Err(unexpected("set_push_target")),
        }
    }

    /// Forgets this device's wake-up target.
    pub async fn clear_push_target(&self) -> Result<()> {
        match self.request(Request::ClearPushTarget).await? {
            Reply::ClearPushTarget => Ok(()),
            _ => Err(unexpected("clear_push_target")),
        }
    }
}
