//! Linked devices on a connection: provisioning slots (open and take on any
//! connection, as anonymous requests; deposit by an authenticated device), device
//! lists and device removal (authenticated), and the daily last-seen touch.

use bytes::Bytes;
use tern_proto::{DeviceId, Reply, SignedDeviceList, SlotId};

use super::{End, Session};
use crate::error::Result;

impl Session {
    pub(super) async fn open_provisioning(&mut self, id: u64, slot: SlotId, reader_hash: [u8; 32]) {
        if !self.take_place(id).await {
            return;
        }
        let reply = (self.services.provisioning())
            .open(self.prefix, &slot, &reader_hash)
            .map(|expires_at_ms| Reply::OpenProvisioning { expires_at_ms });
        self.anonymous_reply(id, reply).await
    }

    pub(super) async fn take_provisioning(
        &mut self,
        id: u64,
        slot: SlotId,
        reader_secret: [u8; 32],
    ) {
        if !self.take_place(id).await {
            return;
        }
        let reply = (self.services.provisioning())
            .take(self.prefix, &slot, &reader_secret)
            .map(|p| Reply::TakeProvisioning((!p.is_empty()).then(|| Bytes::from(p))));
        self.anonymous_reply(id, reply).await
    }

    pub(super) async fn deposit_provisioning(
        &mut self,
        id: u64,
        slot: SlotId,
        device: DeviceId,
        payload: Bytes,
    ) {
        let reply = self.authenticated().and_then(|by| {
            (self.services.provisioning()).deposit(by, self.prefix, &slot, device, &payload)
        });
        self.reply(id, reply.map(|()| Reply::DepositProvisioning))
            .await
    }

    pub(super) async fn publish_device_list(&mut self, id: u64, list: SignedDeviceList) {
        let result = match self.authenticated() {
            Ok(by) => {
                self.services
                    .accounts()
                    .publish_device_list(by, &list)
                    .await
            }
            Err(e) => Err(e),
        };
        self.reply(id, result.map(|()| Reply::PublishDeviceList))
            .await
    }

    /// Removes a device of this connection's account; a device that removed itself
    /// then closes with `DEVICE_REMOVED`.
    pub(super) async fn remove_device(
        &mut self,
        id: u64,
        device: DeviceId,
        list: Option<SignedDeviceList>,
    ) {
        let result = self.remove(device, list.as_ref()).await;
        if result.is_ok() && self.device.get().map(|d| d.address().device) == Some(device) {
            self.ending = Some(End::Removed);
        }
        self.reply(id, result.map(|()| Reply::RemoveDevice)).await
    }

    async fn remove(&self, device: DeviceId, list: Option<&SignedDeviceList>) -> Result<()> {
        let by = self.authenticated()?;
        (self.settings.removal)
            .remove_signed(by, device, list)
            .await
    }

    /// On an authenticated connection's first request of each UTC day, moves the
    /// device's last-seen day on (as `Auth` does), so a device that stays connected
    /// for weeks is not taken for idle: one check of the day per request, one write
    /// per device per day at most.
    pub(super) fn touch_daily(&mut self) {
        let Some(device) = self.device.get() else {
            return;
        };
        let accounts = self.services.accounts();
        if accounts.day() != self.touched_day {
            self.touched_day = accounts.touch_seen(device);
        }
    }
}
