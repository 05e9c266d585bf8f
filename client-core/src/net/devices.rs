//! Linked-device requests: provisioning slots (a new device opens and takes one, the
//! primary deposits into it) and the account's signed device list.

use bytes::Bytes;
use tern_proto::{AccountId, DeviceId, Reply, Request, SignedDeviceList, SlotId};

use super::{unexpected, RelayConnection};
use crate::error::{Error, Result};

/// What the relay says about an account's devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceListing {
    /// The device ids it holds.
    pub devices: Vec<DeviceId>,
    /// The account's signed device list and the identity's signature over it (not
    /// verified here); `None` if it never published one.
    pub list: Option<(Bytes, [u8; 64])>,
}

fn signed(list: &[u8], signature: &[u8; 64]) -> Result<SignedDeviceList> {
    SignedDeviceList::parse(Bytes::copy_from_slice(list), signature)
        .map_err(|e| Error::Protocol(format!("device list: {e}")))
}

impl RelayConnection {
    /// The device ids of `account` and its signed device list, shown its delivery
    /// token (so this works on a connection that identifies no one).
    pub async fn device_listing(
        &self,
        account: &AccountId,
        delivery_token: &[u8],
    ) -> Result<DeviceListing> {
        match self
            .request(Request::ListDevices {
                account: *account,
                delivery_token: Bytes::copy_from_slice(delivery_token),
            })
            .await?
        {
            Reply::ListDevices { devices, list } => Ok(DeviceListing {
                devices,
                list: list.map(|l| (l.bytes, l.signature)),
            }),
            _ => Err(unexpected("list_devices")),
        }
    }

    /// Opens provisioning slot `slot` for a new device, takeable with the secret
    /// whose SHA-256 is `reader_hash`. Returns when it expires (Unix ms).
    pub async fn open_provisioning(&self, slot: [u8; 16], reader_hash: [u8; 32]) -> Result<u64> {
        let request = Request::OpenProvisioning {
            slot: SlotId(slot),
            reader_hash,
        };
        match self.request(request).await? {
            Reply::OpenProvisioning { expires_at_ms } => Ok(expires_at_ms),
            _ => Err(unexpected("open_provisioning")),
        }
    }

    /// Deposits the sealed link payload for `device` (of this connection's account)
    /// in slot `slot`, once. A slot that is gone, expired or filled is `NOT_FOUND`.
    pub async fn deposit_provisioning(
        &self,
        slot: [u8; 16],
        device: DeviceId,
        payload: Vec<u8>,
    ) -> Result<()> {
        let request = Request::DepositProvisioning {
            slot: SlotId(slot),
            device,
            payload: payload.into(),
        };
        match self.request(request).await? {
            Reply::DepositProvisioning => Ok(()),
            _ => Err(unexpected("deposit_provisioning")),
        }
    }

    /// Takes slot `slot`'s payload with the reader secret; `None` while nothing is
    /// deposited. The relay drops the slot once taken.
    pub async fn take_provisioning(
        &self,
        slot: [u8; 16],
        reader_secret: [u8; 32],
    ) -> Result<Option<Bytes>> {
        let request = Request::TakeProvisioning {
            slot: SlotId(slot),
            reader_secret,
        };
        match self.request(request).await? {
            Reply::TakeProvisioning(payload) => Ok(payload),
            _ => Err(unexpected("take_provisioning")),
        }
    }

    /// Publishes a new version of this connection's account's device list (the
    /// exact signed bytes and the identity's signature).
    pub async fn publish_device_list(&self, list: &[u8], signature: &[u8; 64]) -> Result<()> {
        let request = Request::PublishDeviceList(signed(list, signature)?);
        match self.request(request).await? {
            Reply::PublishDeviceList => Ok(()),
            _ => Err(unexpected("publish_device_list")),
        }
    }

    /// Removes `device` from this connection's account, with the new signed list
    /// that leaves it out (`None`: a linked device removing itself). Returns once the
    /// relay has removed it durably.
    pub async fn remove_device(
        &self,
        device: DeviceId,
        list: Option<(&[u8], &[u8; 64])>,
    ) -> Result<()> {
        let list = list.map(|(l, s)| signed(l, s)).transpose()?;
        match self.request(Request::RemoveDevice { device, list }).await? {
            Reply::RemoveDevice => Ok(()),
            _ => Err(unexpected("remove_device")),
        }
    }
}
