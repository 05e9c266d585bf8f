//! Push wake-ups: where the relay sends this device's content-free wake-ups while
//! it holds no connection (an app in the background).
//!
//! A phone app registers one [`PushTarget`] per device: the UnifiedPush endpoint its
//! distributor gave it, or its publisher's gateway URL with the APNs/FCM token the
//! platform gave it. A wake-up says only "there is mail" (a constant body; a
//! gateway's also carries the token); the app then opens its [`Client`], which
//! connects and receives what is queued.
//!
//! The target is kept in the device store too, and sent again each time the client
//! authenticates: a relay that lost it (restored from an older backup, moved to
//! another backend) gets it back at the device's next connection. The relay answers
//! a target it already holds without checking it again, so this costs one request.

use prost::Message as _;
use tern_proto::{v1, PushTarget};

use super::{Client, Shared};
use crate::net::RelayConnection;
use crate::store::{Namespace, Op};
use crate::{Error, ErrorCode, Result};

/// The device store's record of the registered target (`Namespace::Local`).
const PUSH_KEY: &[u8] = b"push target";

impl Client {
    /// Registers `target` as this device's wake-up target with the relay, replacing
    /// any earlier one, and keeps it in the device store (sent again at each
    /// connection). A malformed target is [`Error::InvalidPushTarget`]; the relay
    /// refuses a gateway that is not on its operator's list, an endpoint that is
    /// not https or a relay that sends no wake-ups with
    /// [`ErrorCode::PushTargetRefused`], and a UnifiedPush endpoint that does not
    /// answer the specification's discovery request with
    /// [`ErrorCode::PushEndpointUnverified`] (see [`Error::relay_code`]). Needs a
    /// connection to the relay (waits up to 30 s for one).
    pub async fn set_push_target(&self, target: PushTarget) -> Result<()> {
        target
            .check()
            .map_err(|e| Error::InvalidPushTarget(e.to_string()))?;
        let (conn, _) = self.connections().await?;
        conn.set_push_target(target.clone()).await?;
        let record = v1::SetPushTargetRequest::from(target).encode_to_vec();
        let kv = self.shared.state.lock().await.kv.clone();
        kv.apply(
            vec![Op::Put(Namespace::Local, PUSH_KEY.to_vec(), record)],
            true,
        )?;
        Ok(())
    }

    /// Tells the relay to send this device no more wake-ups, and forgets the target
    /// here. Needs a connection to the relay.
    pub async fn clear_push_target(&self) -> Result<()> {
        let (conn, _) = self.connections().await?;
        conn.clear_push_target().await?;
        let kv = self.shared.state.lock().await.kv.clone();
        kv.apply(vec![Op::Delete(Namespace::Local, PUSH_KEY.to_vec())], true)?;
        Ok(())
    }

    /// The target this device registered, if any.
    pub async fn push_target(&self) -> Result<Option<PushTarget>> {
        let kv = self.shared.state.lock().await.kv.clone();
        stored(kv.as_ref())
    }
}

fn stored(kv: &dyn crate::store::KvStore) -> Result<Option<PushTarget>> {
    let Some(bytes) = kv.get(Namespace::Local, PUSH_KEY)? else {
        return Ok(None);
    };
    let wire = v1::SetPushTargetRequest::decode(&bytes[..])
        .map_err(|_| Error::Store(crate::store::StoreError::Corrupt))?;
    PushTarget::try_from(wire)
        .map(Some)
        .map_err(|_| Error::Store(crate::store::StoreError::Corrupt))
}

/// Sends the stored target again after authenticating. A refusal (the operator
/// took the gateway off the list, the endpoint stopped answering) does not end the
/// connection: the app learns of it at its next [`Client::set_push_target`].
pub(super) async fn maintain_push(shared: &Shared, conn: &RelayConnection) -> Result<()> {
    let kv = shared.state.lock().await.kv.clone();
    let Some(target) = stored(kv.as_ref())? else {
        return Ok(());
    };
    match conn.set_push_target(target).await {
        Ok(()) => Ok(()),
        Err(e) if e.relay_code().is_some_and(|c| c != ErrorCode::Unavailable) => {
            tracing::debug!(code = ?e.relay_code(), "the relay refused the stored push target");
            Ok(())
        }
        Err(e) => Err(e),
    }
}
