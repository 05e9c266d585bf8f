//! Checks of the linked-device requests: provisioning slots and device lists.

use bytes::Bytes;

use super::{Request, SlotId, BAD, UNAUTHORIZED};
use crate::code::ErrorCode;
use crate::device_list::SignedDeviceList;
use crate::error::{array, bad_id, Malformed, Problem};
use crate::ids::DeviceId;
use crate::limits::{MAX_LINK_PAYLOAD, MIN_LINK_PAYLOAD, READER_SECRET_LEN, SIGNATURE_LEN};
use crate::v1;

fn slot(bytes: &[u8], field: &'static str) -> Result<SlotId, Malformed> {
    array(bytes, field, "a provisioning slot id", BAD).map(SlotId)
}

fn list(
    bytes: Bytes,
    signature: &[u8],
    field: &'static str,
) -> Result<SignedDeviceList, Malformed> {
    array::<SIGNATURE_LEN>(signature, field, "a device list signature", UNAUTHORIZED)?;
    SignedDeviceList::parse(bytes, signature).map_err(|e| Malformed::new(field, e, BAD))
}

pub(super) fn open(r: v1::OpenProvisioningRequest) -> Result<Request, Malformed> {
    Ok(Request::OpenProvisioning {
        slot: slot(&r.slot_id, "open_provisioning.slot_id")?,
        reader_hash: array::<READER_SECRET_LEN>(
            &r.reader_hash,
            "open_provisioning.reader_hash",
            "a reader hash",
            BAD,
        )?,
    })
}

pub(super) fn deposit(r: v1::DepositProvisioningRequest) -> Result<Request, Malformed> {
    let slot = slot(&r.slot_id, "deposit_provisioning.slot_id")?;
    let device =
        DeviceId::try_from(r.device_id).map_err(bad_id("deposit_provisioning.device_id"))?;
    let n = r.payload.len();
    if n > MAX_LINK_PAYLOAD {
        let problem = Problem::TooMany {
            what: "link payload bytes",
            got: n,
            max: MAX_LINK_PAYLOAD,
        };
        let field = "deposit_provisioning.payload";
        return Err(Malformed::new(field, problem, ErrorCode::TooLarge));
    }
    if n < MIN_LINK_PAYLOAD {
        let problem = Problem::Missing("a link payload of at least 48 bytes");
        return Err(Malformed::new("deposit_provisioning.payload", problem, BAD));
    }
    Ok(Request::DepositProvisioning {
        slot,
        device,
        payload: r.payload,
    })
}

pub(super) fn take(r: v1::TakeProvisioningRequest) -> Result<Request, Malformed> {
    Ok(Request::TakeProvisioning {
        slot: slot(&r.slot_id, "take_provisioning.slot_id")?,
        reader_secret: array::<READER_SECRET_LEN>(
            &r.reader_secret,
            "take_provisioning.reader_secret",
            "a reader secret",
            BAD,
        )?,
    })
}

pub(super) fn publish(r: v1::PublishDeviceListRequest) -> Result<Request, Malformed> {
    Ok(Request::PublishDeviceList(list(
        r.device_list,
        &r.signature,
        "publish_device_list.device_list",
    )?))
}

pub(super) fn remove(r: v1::RemoveDeviceRequest) -> Result<Request, Malformed> {
    let device = DeviceId::try_from(r.device_id).map_err(bad_id("remove_device.device_id"))?;
    let list = if r.device_list.is_empty() && r.signature.is_empty() {
        None
    } else {
        Some(list(
            r.device_list,
            &r.signature,
            "remove_device.device_list",
        )?)
    };
    Ok(Request::RemoveDevice { device, list })
}
