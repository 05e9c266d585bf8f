//! The exact bytes that identity and device keys sign. Every signed value starts with
//! its own context string, so a signature made for one purpose is never valid for
//! another.

use crate::ids::{AccountId, DeviceId};
use crate::limits::{ACCOUNT_ID_LEN, EXPORTER_LEN, PUBLIC_KEY_LEN};

/// Label for the TLS keying-material exporter (RFC 8446 §7.5) whose output a device
/// signs to authenticate a connection.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tern-device-auth-v1";

const DEVICE_CERT_CONTEXT: &[u8] = b"tern device certificate v1\0";
const SESSION_PROOF_CONTEXT: &[u8] = b"tern session proof v1\0";
const IDENTITY_DH_CONTEXT: &[u8] = b"tern x3dh identity-dh v1\0";
const SIGNED_PREKEY_CONTEXT: &[u8] = b"tern x3dh signed-prekey v1\0";
const SENDER_CERT_CONTEXT: &[u8] = b"tern sender certificate v1\0";
const ACCOUNT_DELETION_CONTEXT: &[u8] = b"tern delete account v1\0";
/// How an account's signed device list begins (see [`crate::device_list`]).
pub const DEVICE_LIST_CONTEXT: &[u8] = b"tern device list v1\0";

/// What the identity key signs to vouch for a device's X25519 identity agreement key.
pub fn identity_agreement_key(key: &[u8; PUBLIC_KEY_LEN]) -> Vec<u8> {
    [IDENTITY_DH_CONTEXT, key].concat()
}

/// What the identity key signs to vouch for a signed prekey.
pub fn signed_prekey(id: u32, key: &[u8; PUBLIC_KEY_LEN]) -> Vec<u8> {
    [SIGNED_PREKEY_CONTEXT, &id.to_be_bytes()[..], key].concat()
}

/// What a relay signs to issue a sender certificate: the encoded `SenderCertificate`.
pub fn sender_certificate(encoded: &[u8]) -> Vec<u8> {
    [SENDER_CERT_CONTEXT, encoded].concat()
}

/// What the identity key signs to vouch for a device key. For the first device the
/// account id is all zeros, since the relay has not chosen it yet.
pub fn device_certificate(
    account: Option<&AccountId>,
    device_key: &[u8; PUBLIC_KEY_LEN],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(DEVICE_CERT_CONTEXT.len() + ACCOUNT_ID_LEN + PUBLIC_KEY_LEN);
    out.extend_from_slice(DEVICE_CERT_CONTEXT);
    out.extend_from_slice(account.map_or(&[0u8; ACCOUNT_ID_LEN], |a| a.as_bytes()));
    out.extend_from_slice(device_key);
    out
}

/// The TLS exporter context for a device's session proof: binds the exporter output
/// to the claimed (account, device) as well as to the TLS session.
pub fn exporter_context(
    account: Option<&AccountId>,
    device: Option<DeviceId>,
) -> [u8; ACCOUNT_ID_LEN + 4] {
    let mut out = [0u8; ACCOUNT_ID_LEN + 4];
    out[..ACCOUNT_ID_LEN].copy_from_slice(account.map_or(&[0u8; ACCOUNT_ID_LEN], |a| a.as_bytes()));
    out[ACCOUNT_ID_LEN..].copy_from_slice(&device.map_or(0, DeviceId::get).to_be_bytes());
    out
}

/// What a device key signs to prove it holds this connection: the context string and
/// the exporter output for `exporter_context`.
pub fn session_proof(exporter: &[u8; EXPORTER_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SESSION_PROOF_CONTEXT.len() + EXPORTER_LEN);
    out.extend_from_slice(SESSION_PROOF_CONTEXT);
    out.extend_from_slice(exporter);
    out
}

/// What the account's identity key signs to delete the account: the context string,
/// the account id and the exporter output of this connection (for
/// `exporter_context(Some(account), Some(device))`), so the signature deletes only
/// this account and cannot be replayed on another connection.
pub fn account_deletion(account: &AccountId, exporter: &[u8; EXPORTER_LEN]) -> Vec<u8> {
    [ACCOUNT_DELETION_CONTEXT, account.as_bytes(), exporter].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_values_are_domain_separated() {
        let key = [9u8; 32];
        let cert = device_certificate(None, &key);
        let proof = session_proof(&[9u8; 32]);
        assert_ne!(cert[..20], proof[..20]);
        let key = [9u8; 32];
        assert_ne!(
            identity_agreement_key(&key)[..20],
            signed_prekey(0, &key)[..20]
        );
        assert_ne!(signed_prekey(1, &key), signed_prekey(2, &key));
        assert_ne!(sender_certificate(&key)[..20], cert[..20]);
        let acct = AccountId([1; 16]);
        assert_ne!(device_certificate(Some(&acct), &key), cert);
        let deletion = account_deletion(&acct, &key);
        for other in [
            &cert,
            &proof,
            &identity_agreement_key(&key),
            &signed_prekey(0, &key),
            &sender_certificate(&key),
            &device_certificate(Some(&acct), &key),
        ] {
            assert_ne!(deletion[..20], other[..20]);
        }
        assert_ne!(deletion, account_deletion(&AccountId([2; 16]), &key));
        assert_ne!(deletion, account_deletion(&acct, &[8; 32]));
        assert_ne!(
            exporter_context(Some(&acct), DeviceId::new(2)),
            exporter_context(Some(&acct), DeviceId::new(3))
        );
    }
}
