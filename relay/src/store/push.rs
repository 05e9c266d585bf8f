//! [`PushStore`]: each device's push target (where its content-free wake-ups go).
//!
//! # Contract
//! - One target per device, per (account, device): a put replaces the device's
//!   earlier target.
//! - A target is what the device registered, whole: the URL and, for a gateway, the
//!   device token. These address one phone: stores never log them, and `Debug` of
//!   [`PushTarget`] shows the kind only (P9).
//! - Removal by device (device removal), by account (account deletion: a scan by
//!   account, so a device no record names loses its target too), and a
//!   compare-and-delete for a target the gateway declared gone (404/410), which
//!   leaves a target the device registered since in place.

use tern_proto::{AccountId, DeviceAddress, PushTarget};

use super::{StoreError, StoreResult};

/// Devices' push targets. See the module docs for the contract.
pub trait PushStore: Send + Sync + 'static {
    /// Stores `target` as the device's, replacing any earlier one.
    fn put_push_target(&self, of: &DeviceAddress, target: &PushTarget) -> StoreResult<()>;

    /// The device's target, if it has one.
    fn push_target(&self, of: &DeviceAddress) -> StoreResult<Option<PushTarget>>;

    /// Deletes the device's target; with `only`, only while the stored target is
    /// exactly that one. Whether a target was deleted.
    fn remove_push_target(
        &self,
        of: &DeviceAddress,
        only: Option<&PushTarget>,
    ) -> StoreResult<bool>;

    /// Deletes the target of every device of the account, in one atomic change.
    fn remove_account_push_targets(&self, account: &AccountId) -> StoreResult<()>;
}

const UNIFIED_PUSH: u8 = 1;
const GATEWAY: u8 = 2;

/// A target as the embedded stores keep it: a kind byte, then the URL's length (u16
/// BE) and bytes, then (a gateway) the token's bytes.
pub(crate) fn encode(target: &PushTarget) -> Vec<u8> {
    let (kind, url, token) = match target {
        PushTarget::UnifiedPush { endpoint } => (UNIFIED_PUSH, endpoint, ""),
        PushTarget::Gateway { url, device_token } => (GATEWAY, url, device_token.as_str()),
    };
    let mut v = Vec::with_capacity(3 + url.len() + token.len());
    v.push(kind);
    // URLs are at most 1000 bytes (checked when the request is decoded).
    v.extend_from_slice(&u16::try_from(url.len()).unwrap_or(u16::MAX).to_be_bytes());
    v.extend_from_slice(url.as_bytes());
    v.extend_from_slice(token.as_bytes());
    v
}

/// The target [`encode`] wrote.
pub(crate) fn decode(v: &[u8]) -> StoreResult<PushTarget> {
    let corrupt = || StoreError::Corrupt("push target");
    let (&kind, rest) = v.split_first().ok_or_else(corrupt)?;
    let len = rest
        .get(..2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or_else(corrupt)?;
    let url = rest.get(2..2 + len).ok_or_else(corrupt)?;
    let token = rest.get(2 + len..).ok_or_else(corrupt)?;
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| corrupt());
    match kind {
        UNIFIED_PUSH if token.is_empty() => Ok(PushTarget::UnifiedPush {
            endpoint: text(url)?,
        }),
        GATEWAY => Ok(PushTarget::Gateway {
            url: text(url)?,
            device_token: text(token)?,
        }),
        _ => Err(corrupt()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_and_damage_is_corrupt() {
        for t in [
            PushTarget::UnifiedPush {
                endpoint: "https://up.example/abc?x=1".into(),
            },
            PushTarget::Gateway {
                url: "https://gw.example/push".into(),
                device_token: "tok".into(),
            },
        ] {
            let bytes = encode(&t);
            assert_eq!(decode(&bytes).expect("decodes"), t);
            for cut in 0..3 {
                assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
        }
        assert!(decode(&[9, 0, 0]).is_err(), "unknown kind");
        assert!(
            decode(&[UNIFIED_PUSH, 0, 1, b'a', b'x']).is_err(),
            "a token on an endpoint"
        );
    }
}
