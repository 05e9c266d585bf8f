//! Prekeys as devices publish them and as the relay hands them out (X3DH).

use bytes::Bytes;

use crate::code::ErrorCode;
use crate::error::{array, bad_id, Malformed, Problem};
use crate::ids::DeviceId;
use crate::limits::{AGREEMENT_KEY_LEN, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use crate::v1;

/// A public key with the account identity's signature over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedKey {
    /// Signed prekey id. An identity agreement key has no id on the wire: 0.
    pub id: u32,
    /// X25519 public key.
    pub key: [u8; AGREEMENT_KEY_LEN],
    /// The identity's Ed25519 signature (over `tern_proto::auth::identity_agreement_key`
    /// or `tern_proto::auth::signed_prekey`).
    pub signature: [u8; SIGNATURE_LEN],
}

/// Keys a device publishes (`PublishKeysRequest`); every part optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUpload {
    /// The device's identity agreement key, signed by the identity (its `id` is not
    /// sent: 0).
    pub identity_dh: Option<SignedKey>,
    /// A new signed prekey, replacing the current one.
    pub signed_prekey: Option<SignedKey>,
    /// One-time prekeys to add: (id, X25519 public key).
    pub one_time: Vec<(u32, [u8; AGREEMENT_KEY_LEN])>,
}

/// One device's prekey bundle as the relay hands it out (`PreKeyBundle`). Only its
/// form is checked: verify the signatures before use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBundle {
    /// The device.
    pub device: DeviceId,
    /// The account's Ed25519 identity key.
    pub identity_key: [u8; PUBLIC_KEY_LEN],
    /// The device's identity agreement key (`id` 0).
    pub identity_dh: SignedKey,
    /// Its signed prekey.
    pub signed_prekey: SignedKey,
    /// A one-time prekey, now consumed on the relay; `None` when none were left.
    pub one_time_prekey: Option<(u32, [u8; AGREEMENT_KEY_LEN])>,
}

fn copy(bytes: &[u8]) -> Bytes {
    Bytes::copy_from_slice(bytes)
}

impl From<&SignedKey> for v1::SignedPreKey {
    fn from(k: &SignedKey) -> Self {
        v1::SignedPreKey {
            id: k.id,
            public_key: copy(&k.key),
            signature: copy(&k.signature),
        }
    }
}

fn one_time_to_wire((id, key): &(u32, [u8; AGREEMENT_KEY_LEN])) -> v1::OneTimePreKey {
    v1::OneTimePreKey {
        id: *id,
        public_key: copy(key),
    }
}

impl From<&KeyUpload> for v1::PublishKeysRequest {
    fn from(upload: &KeyUpload) -> Self {
        v1::PublishKeysRequest {
            identity_dh: upload.identity_dh.map_or_else(Bytes::new, |k| copy(&k.key)),
            identity_dh_signature: upload
                .identity_dh
                .map_or_else(Bytes::new, |k| copy(&k.signature)),
            signed_prekey: upload.signed_prekey.as_ref().map(v1::SignedPreKey::from),
            one_time_prekeys: upload.one_time.iter().map(one_time_to_wire).collect(),
        }
    }
}

/// Checks a publish request the way a relay answers it: a vouched key of the wrong
/// length is a bad request, a signature of the wrong length a failed authentication.
/// An empty `identity_dh` means "unchanged" (its signature is then ignored).
impl TryFrom<&v1::PublishKeysRequest> for KeyUpload {
    type Error = Malformed;
    fn try_from(r: &v1::PublishKeysRequest) -> Result<Self, Malformed> {
        let identity_dh = if r.identity_dh.is_empty() {
            None
        } else {
            Some(SignedKey {
                id: 0,
                key: array(
                    &r.identity_dh,
                    "publish_keys.identity_dh",
                    "an identity agreement key",
                    ErrorCode::BadRequest,
                )?,
                signature: array(
                    &r.identity_dh_signature,
                    "publish_keys.identity_dh_signature",
                    "a signature",
                    ErrorCode::Unauthorized,
                )?,
            })
        };
        let signed_prekey = r
            .signed_prekey
            .as_ref()
            .map(|k| -> Result<SignedKey, Malformed> {
                Ok(SignedKey {
                    id: k.id,
                    key: array(
                        &k.public_key,
                        "publish_keys.signed_prekey.public_key",
                        "a signed prekey",
                        ErrorCode::BadRequest,
                    )?,
                    signature: array(
                        &k.signature,
                        "publish_keys.signed_prekey.signature",
                        "a signature",
                        ErrorCode::Unauthorized,
                    )?,
                })
            })
            .transpose()?;
        let one_time = r
            .one_time_prekeys
            .iter()
            .map(|k| {
                let key = array(
                    &k.public_key,
                    "publish_keys.one_time_prekeys.public_key",
                    "a one-time prekey",
                    ErrorCode::BadRequest,
                )?;
                Ok((k.id, key))
            })
            .collect::<Result<_, Malformed>>()?;
        Ok(KeyUpload {
            identity_dh,
            signed_prekey,
            one_time,
        })
    }
}

impl From<&DeviceBundle> for v1::PreKeyBundle {
    fn from(b: &DeviceBundle) -> Self {
        v1::PreKeyBundle {
            device_id: b.device.get(),
            identity_key: copy(&b.identity_key),
            identity_dh: copy(&b.identity_dh.key),
            identity_dh_signature: copy(&b.identity_dh.signature),
            signed_prekey: Some(v1::SignedPreKey::from(&b.signed_prekey)),
            one_time_prekey: b.one_time_prekey.as_ref().map(one_time_to_wire),
        }
    }
}

/// Checks a bundle from a relay: every key and signature of its length, a device id,
/// a signed prekey present.
impl TryFrom<&v1::PreKeyBundle> for DeviceBundle {
    type Error = Malformed;
    fn try_from(b: &v1::PreKeyBundle) -> Result<Self, Malformed> {
        const BAD: ErrorCode = ErrorCode::BadRequest;
        let spk = b.signed_prekey.as_ref().ok_or(Malformed::new(
            "pre_key_bundle.signed_prekey",
            Problem::Missing("bundle without a signed prekey"),
            BAD,
        ))?;
        Ok(DeviceBundle {
            device: DeviceId::try_from(b.device_id).map_err(bad_id("pre_key_bundle.device_id"))?,
            identity_key: array(
                &b.identity_key,
                "pre_key_bundle.identity_key",
                "an identity key",
                BAD,
            )?,
            identity_dh: SignedKey {
                id: 0,
                key: array(
                    &b.identity_dh,
                    "pre_key_bundle.identity_dh",
                    "an identity agreement key",
                    BAD,
                )?,
                signature: array(
                    &b.identity_dh_signature,
                    "pre_key_bundle.identity_dh_signature",
                    "a signature",
                    BAD,
                )?,
            },
            signed_prekey: SignedKey {
                id: spk.id,
                key: array(
                    &spk.public_key,
                    "pre_key_bundle.signed_prekey.public_key",
                    "a signed prekey",
                    BAD,
                )?,
                signature: array(
                    &spk.signature,
                    "pre_key_bundle.signed_prekey.signature",
                    "a signature",
                    BAD,
                )?,
            },
            one_time_prekey: b
                .one_time_prekey
                .as_ref()
                .map(|o| -> Result<_, Malformed> {
                    Ok((
                        o.id,
                        array(
                            &o.public_key,
                            "pre_key_bundle.one_time_prekey.public_key",
                            "a one-time prekey",
                            BAD,
                        )?,
                    ))
                })
                .transpose()?,
        })
    }
}
