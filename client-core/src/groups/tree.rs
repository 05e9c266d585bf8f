//! A welcome's ratchet tree, always encrypted: under a fresh key drawn for the
//! commit and carried only inside the welcome's encrypted GroupInfo (extension
//! [`TREE_KEY_EXTENSION`]), so the relay, which stores the welcome body, never
//! reads the tree (every leaf's credential: the group's membership), inline or
//! as an attachment.
//!
//! The ciphertext is an attachment blob ([`attachment`]) of `len (u64 BE) ‖ tree`:
//! the key cannot name the tree's size (it is drawn before the tree exists), so
//! the plaintext carries it, and PADMÉ hides it from the relay.

use mls_rs::extension::ExtensionType;
use mls_rs::ExtensionList;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::GroupError;
use crate::crypto::attachment;
use crate::crypto::padding::padme;

/// The welcome's GroupInfo extension holding the ratchet tree's key (32 bytes).
pub const TREE_KEY_EXTENSION: u16 = 0xF004;

/// A fresh tree key.
pub(crate) fn new_tree_key() -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(&mut key[..]);
    key
}

/// The tree key in a welcome's GroupInfo extensions.
pub(crate) fn tree_key_of(ext: &ExtensionList) -> Result<Zeroizing<[u8; 32]>, GroupError> {
    let e = ext
        .get(ExtensionType::new(TREE_KEY_EXTENSION))
        .ok_or(GroupError::NoTreeKey)?;
    let key: [u8; 32] = e
        .extension_data()
        .try_into()
        .map_err(|_| GroupError::NoTreeKey)?;
    Ok(Zeroizing::new(key))
}

/// `tree` encrypted under `key`: the ciphertext and its blob id.
pub(crate) fn seal_tree(key: &[u8; 32], tree: &[u8]) -> Result<(Vec<u8>, [u8; 32]), GroupError> {
    let mut plain = Zeroizing::new(Vec::with_capacity(8 + tree.len()));
    plain.extend_from_slice(&(tree.len() as u64).to_be_bytes());
    plain.extend_from_slice(tree);
    let mut sealed = Vec::new();
    let e = attachment::encrypt(&mut OsRng, key, &plain[..], &mut sealed)
        .map_err(|e| GroupError::Rejected(format!("sealing the ratchet tree: {e}")))?;
    Ok((sealed, e.blob_id))
}

/// The tree in `sealed` (checked: every segment under `key`, the whole against
/// its blob id, the padding zeros).
pub(crate) fn open_tree(key: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>, GroupError> {
    let blob_id: [u8; 32] = Sha256::digest(sealed).into();
    let mut plain = Vec::new();
    let mut d = attachment::Decryptor::new(key, blob_id);
    d.update(sealed, &mut plain)
        .and_then(|()| d.finish(&mut plain))
        .map_err(|_| GroupError::BadTree)?;
    let (len, rest) = plain.split_first_chunk::<8>().ok_or(GroupError::BadTree)?;
    let len = usize::try_from(u64::from_be_bytes(*len)).map_err(|_| GroupError::BadTree)?;
    if len > rest.len()
        || rest[len..].iter().any(|&b| b != 0)
        || padme(8 + len as u64) != Some(plain.len() as u64)
    {
        return Err(GroupError::BadTree);
    }
    Ok(rest[..len].to_vec())
}
