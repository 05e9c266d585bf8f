//! Signature checks. Each successful check returns a proof value that only this module
//! can build, and the mailbox API asks for those values: code that forgot to verify
//! does not compile.
//!
//! Every check fails with the same opaque [`Error::Unauthorized`], whatever was wrong.

use ed25519_dalek::{Signature, VerifyingKey};
use tern_proto::limits::EXPORTER_LEN;
use tern_proto::{auth, AccountId, DeviceAddress, SignedDeviceList};

use crate::error::{Error, Result};

/// Proof that this connection belongs to a device: it signed the connection's TLS
/// exporter value with its registered key. Only this module's `authenticate` and the accounts
/// service (from a [`VerifiedRegistration`]) make one; code outside this crate cannot:
///
/// ```compile_fail,E0451
/// use tern_proto::{AccountId, DeviceAddress, DeviceId};
/// use tern_relay::core::auth::AuthenticatedDevice;
///
/// let address = DeviceAddress { account: AccountId([1; 16]), device: DeviceId::PRIMARY };
/// let forged = AuthenticatedDevice { address }; // the field is private
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedDevice {
    address: DeviceAddress,
}

impl AuthenticatedDevice {
    /// The device's mailbox address.
    pub fn address(&self) -> &DeviceAddress {
        &self.address
    }
}

/// A registration whose two signatures verified: the identity vouches for the device
/// key, and the device key signed this connection. Only [`verify_registration`] makes
/// one, and only the accounts service turns it into an [`AuthenticatedDevice`].
#[derive(Debug)]
pub struct VerifiedRegistration {
    identity_key: [u8; 32],
    device_key: [u8; 32],
}

impl VerifiedRegistration {
    /// The account's identity key.
    pub fn identity_key(&self) -> &[u8; 32] {
        &self.identity_key
    }

    /// The first device's key.
    pub fn device_key(&self) -> &[u8; 32] {
        &self.device_key
    }

    /// Once the accounts service has stored the account at `address`, this
    /// connection is that device.
    pub(crate) fn into_device(self, address: DeviceAddress) -> AuthenticatedDevice {
        AuthenticatedDevice { address }
    }
}

/// Proof that the account's identity key asked, on this connection, for the
/// account's deletion. Only [`verify_deletion`] makes one; the deletion service asks
/// for it (or for the operator's offline authority). It carries the key the
/// signature was checked with: the deletion service compares it with the account's
/// stored identity key, so a proof under any other key deletes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedDeletion {
    account: AccountId,
    identity_key: [u8; 32],
}

impl VerifiedDeletion {
    /// The account to delete.
    pub fn account(&self) -> &AccountId {
        &self.account
    }

    /// The key the signature was checked with (not yet known to be the account's).
    pub fn identity_key(&self) -> &[u8; 32] {
        &self.identity_key
    }
}

/// Checks a deletion request: `signature` by `identity_key` over
/// `tern_proto::auth::account_deletion(account, exporter)`, where `exporter` is this
/// connection's exporter output for the authenticated device's address.
pub fn verify_deletion(
    identity_key: &[u8; 32],
    account: &AccountId,
    exporter: &[u8; EXPORTER_LEN],
    signature: &[u8],
) -> Result<VerifiedDeletion> {
    verify(
        &key(identity_key)?,
        &auth::account_deletion(account, exporter),
        signature,
    )?;
    Ok(VerifiedDeletion {
        account: *account,
        identity_key: *identity_key,
    })
}

/// Proof that a device list is the account's: it parses (`tern_proto::device_list`:
/// ids ascending, device 1 present), names the account, and the identity key signed
/// its exact bytes. Only [`verify_device_list`] makes one; the accounts service
/// stores only a verified list. Whether it is newer than the stored one, and whether
/// its devices are the account's, is for the caller to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedDeviceList {
    version: u64,
    /// (id, device key), ids ascending.
    devices: Vec<(tern_proto::DeviceId, [u8; 32])>,
    signature: [u8; 64],
}

impl VerifiedDeviceList {
    /// The list's version (only grows).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The listed devices and their keys, ids ascending.
    pub fn devices(&self) -> &[(tern_proto::DeviceId, [u8; 32])] {
        &self.devices
    }

    /// The identity key's signature over the list's bytes.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }
}

/// Checks a device list (already parsed by the request layer: ids ascending,
/// device 1 present): it names `account`, and its signature is the identity key's
/// over its exact bytes. A list naming another account is [`Error::BadRequest`]; a
/// bad signature is [`Error::Unauthorized`].
pub fn verify_device_list(
    identity_key: &[u8; 32],
    account: &AccountId,
    list: &SignedDeviceList,
) -> Result<VerifiedDeviceList> {
    if list.list.account != *account {
        return Err(Error::BadRequest(
            "the device list names another account".into(),
        ));
    }
    verify(&key(identity_key)?, &list.bytes, &list.signature)?;
    Ok(VerifiedDeviceList {
        version: list.list.version,
        devices: list
            .list
            .entries
            .iter()
            .map(|e| (e.id, e.device_key))
            .collect(),
        signature: list.signature,
    })
}

fn key(bytes: &[u8]) -> Result<VerifyingKey> {
    let arr: &[u8; 32] = bytes.try_into().map_err(|_| Error::Unauthorized)?;
    VerifyingKey::from_bytes(arr).map_err(|_| Error::Unauthorized)
}

fn verify(key: &VerifyingKey, msg: &[u8], sig: &[u8]) -> Result<()> {
    let sig = Signature::from_slice(sig).map_err(|_| Error::Unauthorized)?;
    key.verify_strict(msg, &sig)
        .map_err(|_| Error::Unauthorized)
}

/// Checks a registration: `device_signature` by the identity over the device
/// certificate (no account yet), and `session_proof` by the device over `exporter`.
pub fn verify_registration(
    identity_key: &[u8],
    device_key: &[u8],
    device_signature: &[u8],
    session_proof: &[u8],
    exporter: &[u8; EXPORTER_LEN],
) -> Result<VerifiedRegistration> {
    let identity = key(identity_key)?;
    let device = key(device_key)?;
    let device_bytes = device.to_bytes();
    verify(
        &identity,
        &auth::device_certificate(None, &device_bytes),
        device_signature,
    )?;
    verify(&device, &auth::session_proof(exporter), session_proof)?;
    Ok(VerifiedRegistration {
        identity_key: identity.to_bytes(),
        device_key: device_bytes,
    })
}

/// Checks that `identity_key` vouches for `device_key` joining `account`; returns the
/// device key.
pub(crate) fn verify_new_device(
    identity_key: &[u8; 32],
    account: &AccountId,
    device_key: &[u8],
    signature: &[u8],
) -> Result<[u8; 32]> {
    let identity = key(identity_key)?;
    let device = key(device_key)?.to_bytes();
    verify(
        &identity,
        &auth::device_certificate(Some(account), &device),
        signature,
    )?;
    Ok(device)
}

/// Checks the account identity's signature over a key it vouches for (an identity
/// agreement key or a signed prekey, laid out by `tern_proto::auth`); returns the key.
pub(crate) fn verify_vouched_key(
    identity_key: &[u8; 32],
    key: &[u8],
    layout: impl FnOnce(&[u8; 32]) -> Vec<u8>,
    signature: &[u8],
) -> Result<[u8; 32]> {
    let key: [u8; 32] = key
        .try_into()
        .map_err(|_| Error::BadRequest("keys are 32 bytes".into()))?;
    verify(&self::key(identity_key)?, &layout(&key), signature)?;
    Ok(key)
}

/// Checks a device's signature over this connection's exporter value.
pub(crate) fn authenticate(
    address: DeviceAddress,
    device_key: &[u8; 32],
    exporter: &[u8; EXPORTER_LEN],
    signature: &[u8],
) -> Result<AuthenticatedDevice> {
    verify(&key(device_key)?, &auth::session_proof(exporter), signature)?;
    Ok(AuthenticatedDevice { address })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use tern_proto::DeviceId;

    fn keys() -> (SigningKey, SigningKey) {
        (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        )
    }

    #[test]
    fn registration_needs_both_signatures() {
        let (identity, device) = keys();
        let dev_pub = device.verifying_key().to_bytes();
        let cert = identity
            .sign(&auth::device_certificate(None, &dev_pub))
            .to_bytes();
        let exporter = [5u8; 32];
        let proof = device.sign(&auth::session_proof(&exporter)).to_bytes();
        let id_pub = identity.verifying_key().to_bytes();
        assert!(verify_registration(&id_pub, &dev_pub, &cert, &proof, &exporter).is_ok());
        // Proof from another connection.
        assert!(verify_registration(&id_pub, &dev_pub, &cert, &proof, &[6; 32]).is_err());
        // Certificate signed by the device itself.
        let self_cert = device
            .sign(&auth::device_certificate(None, &dev_pub))
            .to_bytes();
        assert!(verify_registration(&id_pub, &dev_pub, &self_cert, &proof, &exporter).is_err());
        // Garbage lengths are errors, not panics.
        assert!(verify_registration(&[1; 3], &dev_pub, &cert, &proof, &exporter).is_err());
        assert!(verify_registration(&id_pub, &dev_pub, &cert[..10], &proof, &exporter).is_err());
    }

    #[test]
    fn session_proof_is_bound_to_the_exporter() {
        let (_, device) = keys();
        let addr = DeviceAddress {
            account: AccountId([1; 16]),
            device: DeviceId::PRIMARY,
        };
        let exporter = [7u8; 32];
        let sig = device.sign(&auth::session_proof(&exporter)).to_bytes();
        let dev_pub = device.verifying_key().to_bytes();
        assert_eq!(
            authenticate(addr, &dev_pub, &exporter, &sig)
                .map(|a| *a.address())
                .ok(),
            Some(addr)
        );
        assert!(matches!(
            authenticate(addr, &dev_pub, &[8; 32], &sig),
            Err(Error::Unauthorized)
        ));
        let other = SigningKey::from_bytes(&[3; 32]).verifying_key().to_bytes();
        assert!(authenticate(addr, &other, &exporter, &sig).is_err());
    }

    #[test]
    fn vouched_keys_need_the_identity_signature_for_that_key_and_purpose() {
        let (identity, device) = keys();
        let id_pub = identity.verifying_key().to_bytes();
        let spk = [9u8; 32];
        let sig = identity.sign(&auth::signed_prekey(4, &spk)).to_bytes();
        let check = |id: u32, key: &[u8], sig: &[u8]| {
            verify_vouched_key(&id_pub, key, |k| auth::signed_prekey(id, k), sig)
        };
        assert_eq!(check(4, &spk, &sig).ok(), Some(spk));
        assert!(check(5, &spk, &sig).is_err(), "other id");
        assert!(check(4, &[8; 32], &sig).is_err(), "other key");
        assert!(matches!(
            check(4, &spk[..31], &sig),
            Err(Error::BadRequest(_))
        ));
        let by_device = device.sign(&auth::signed_prekey(4, &spk)).to_bytes();
        assert!(
            check(4, &spk, &by_device).is_err(),
            "signed by the device, not the identity"
        );
        let as_dh = verify_vouched_key(&id_pub, &spk, auth::identity_agreement_key, &sig);
        assert!(
            as_dh.is_err(),
            "a prekey signature is no identity-key signature"
        );
    }

    #[test]
    fn new_device_is_bound_to_the_account() {
        let (identity, device) = keys();
        let acct = AccountId([4; 16]);
        let dev_pub = device.verifying_key().to_bytes();
        let sig = identity
            .sign(&auth::device_certificate(Some(&acct), &dev_pub))
            .to_bytes();
        let id_pub = identity.verifying_key().to_bytes();
        assert_eq!(
            verify_new_device(&id_pub, &acct, &dev_pub, &sig).ok(),
            Some(dev_pub)
        );
        assert!(verify_new_device(&id_pub, &AccountId([5; 16]), &dev_pub, &sig).is_err());
    }

    fn signed_list(identity: &SigningKey, account: AccountId, ids: &[u32]) -> SignedDeviceList {
        let entries = ids
            .iter()
            .map(|&i| tern_proto::DeviceEntry {
                id: DeviceId::new(i).expect("id"),
                device_key: [i as u8; 32],
                identity_dh: [i as u8 + 50; 32],
            })
            .collect();
        let list = tern_proto::DeviceList {
            account,
            version: 7,
            entries,
        };
        let bytes = list.encode().expect("valid");
        let signature = identity.sign(&bytes).to_bytes();
        SignedDeviceList::parse(bytes.into(), &signature).expect("parses")
    }

    #[test]
    fn a_device_list_needs_the_identity_over_its_exact_bytes_and_this_account() {
        let (identity, device) = keys();
        let (acct, id_pub) = (AccountId([4; 16]), identity.verifying_key().to_bytes());
        let good = signed_list(&identity, acct, &[1, 3]);
        let v = verify_device_list(&id_pub, &acct, &good).expect("verified");
        assert_eq!(v.version(), 7);
        assert_eq!(
            v.devices(),
            &[
                (DeviceId::PRIMARY, [1; 32]),
                (DeviceId::new(3).expect("3"), [3; 32])
            ]
        );
        assert_eq!(v.signature(), &good.signature);
        assert!(matches!(
            verify_device_list(&id_pub, &AccountId([5; 16]), &good),
            Err(Error::BadRequest(_))
        ));
        let by_device = signed_list(&device, acct, &[1, 3]);
        assert!(matches!(
            verify_device_list(&id_pub, &acct, &by_device),
            Err(Error::Unauthorized)
        ));
        // Another list's signature over these bytes.
        let other = signed_list(&identity, acct, &[1]);
        let swapped = SignedDeviceList {
            signature: other.signature,
            ..good.clone()
        };
        assert!(matches!(
            verify_device_list(&id_pub, &acct, &swapped),
            Err(Error::Unauthorized)
        ));
    }

    #[test]
    fn deletion_needs_the_identity_over_this_account_and_connection() {
        let (identity, device) = keys();
        let (acct, exporter) = (AccountId([4; 16]), [7u8; 32]);
        let id_pub = identity.verifying_key().to_bytes();
        let sig = identity
            .sign(&auth::account_deletion(&acct, &exporter))
            .to_bytes();
        assert_eq!(
            verify_deletion(&id_pub, &acct, &exporter, &sig)
                .map(|v| *v.account())
                .ok(),
            Some(acct)
        );
        let refused = |r: Result<VerifiedDeletion>| matches!(r, Err(Error::Unauthorized));
        assert!(
            refused(verify_deletion(&id_pub, &acct, &[8; 32], &sig)),
            "other connection"
        );
        assert!(refused(verify_deletion(
            &id_pub,
            &AccountId([5; 16]),
            &exporter,
            &sig
        )));
        let by_device = device
            .sign(&auth::account_deletion(&acct, &exporter))
            .to_bytes();
        assert!(refused(verify_deletion(
            &id_pub, &acct, &exporter, &by_device
        )));
        let proof = identity.sign(&auth::session_proof(&exporter)).to_bytes();
        assert!(refused(verify_deletion(&id_pub, &acct, &exporter, &proof)));
        assert!(refused(verify_deletion(
            &id_pub,
            &acct,
            &exporter,
            &sig[..10]
        )));
    }
}
