//! X3DH key agreement (Signal's "The X3DH Key Agreement Protocol", revision 1), adapted
//! to Tern's keys: the account identity is Ed25519 and signs, for each device, an X25519
//! identity agreement key (IK) and the signed prekey (SPK); one-time prekeys (OPK) are
//! unsigned. The initiator A computes, with an ephemeral key EK:
//!
//! DH1 = DH(IK_A, SPK_B), DH2 = DH(EK_A, IK_B), DH3 = DH(EK_A, SPK_B), DH4 = DH(EK_A, OPK_B)
//! SK = HKDF-SHA256(salt = 0^32, ikm = 0xFF^32 || DH1 || DH2 || DH3 [|| DH4], info)
//!
//! and the associated data binds both Ed25519 identities and both agreement keys.

use ed25519_dalek::{Signature, VerifyingKey};
use hkdf::Hkdf;
use rand::{CryptoRng, RngCore};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use tern_proto::DeviceId;

use super::devices::VerifiedDeviceList;
use super::CryptoError;

const INFO: &[u8] = b"tern x3dh v1";
/// Encoded length of an [`InitialHeader`].
pub const HEADER_LEN: usize = 32 + 32 + 32 + 4 + 1 + 4;

/// An X25519 key pair whose secret is wiped on drop.
#[derive(Clone)]
pub struct AgreementKeyPair {
    secret: StaticSecret,
    public: [u8; 32],
}

impl AgreementKeyPair {
    /// A fresh key pair.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        Self::from_secret(StaticSecret::random_from_rng(rng).to_bytes())
    }

    /// The key pair for stored secret bytes.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret).to_bytes();
        AgreementKeyPair { secret, public }
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The secret, for storage (the store encrypts it).
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    /// The secret as an X25519 static secret.
    pub fn secret(&self) -> &StaticSecret {
        &self.secret
    }

    fn dh(&self, public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
        contributory(
            self.secret
                .diffie_hellman(&PublicKey::from(*public))
                .to_bytes(),
        )
    }
}

impl std::fmt::Debug for AgreementKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgreementKeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// Refuses the all-zero output a low-order public key produces.
fn contributory(out: [u8; 32]) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    let out = Zeroizing::new(out);
    if out.iter().all(|b| *b == 0) {
        return Err(CryptoError::InvalidKey);
    }
    Ok(out)
}

/// A device's keys as fetched from the relay. Nothing here is trusted until
/// [`PreKeyBundle::verify`] turns it into a [`VerifiedBundle`], the only form
/// [`initiate`] takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreKeyBundle {
    /// The account's Ed25519 identity key.
    pub identity_key: [u8; 32],
    /// The device's X25519 identity agreement key.
    pub identity_dh: [u8; 32],
    /// The identity's signature over it.
    pub identity_dh_signature: [u8; 64],
    /// Signed prekey id.
    pub signed_prekey_id: u32,
    /// Signed prekey.
    pub signed_prekey: [u8; 32],
    /// The identity's signature over it.
    pub signed_prekey_signature: [u8; 64],
    /// A one-time prekey, when the relay had one.
    pub one_time_prekey: Option<(u32, [u8; 32])>,
}

/// A [`PreKeyBundle`] whose signatures verified against its identity key. Only
/// [`PreKeyBundle::verify`] makes one (its field is private), so holding one proves
/// the check ran on exactly these keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBundle(PreKeyBundle);

impl VerifiedBundle {
    /// The verified keys.
    pub fn bundle(&self) -> &PreKeyBundle {
        &self.0
    }
}

impl PreKeyBundle {
    /// Checks both signatures against the bundle's identity key.
    pub fn verify(&self) -> Result<VerifiedBundle, CryptoError> {
        self.check_signatures()?;
        Ok(VerifiedBundle(self.clone()))
    }

    fn check_signatures(&self) -> Result<(), CryptoError> {
        let identity =
            VerifyingKey::from_bytes(&self.identity_key).map_err(|_| CryptoError::InvalidKey)?;
        let check = |msg: Vec<u8>, sig: &[u8; 64]| {
            identity
                .verify_strict(&msg, &Signature::from_bytes(sig))
                .map_err(|_| CryptoError::InvalidSignature)
        };
        check(
            tern_proto::auth::identity_agreement_key(&self.identity_dh),
            &self.identity_dh_signature,
        )?;
        check(
            tern_proto::auth::signed_prekey(self.signed_prekey_id, &self.signed_prekey),
            &self.signed_prekey_signature,
        )
    }
}

/// Which key signed a bundle's signed prekey (the wire's `signer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrekeySigner {
    /// The account's identity key (every device before linked devices; the primary).
    #[default]
    Identity,
    /// The device's own key, bound to the identity by the signed device list.
    Device,
}

impl PreKeyBundle {
    /// Checks a bundle of device `device` against the account's verified device list:
    /// the device is listed, its identity agreement key is the listed one (and
    /// identity-signed), and the signed prekey verifies under the identity key
    /// ([`PrekeySigner::Identity`]) or the listed device key ([`PrekeySigner::Device`]).
    /// Without a list only [`PrekeySigner::Identity`] passes (a relay cannot add a
    /// device the identity never listed).
    pub fn verify_listed(
        &self,
        signer: PrekeySigner,
        listed: Option<(&VerifiedDeviceList, DeviceId)>,
    ) -> Result<VerifiedBundle, CryptoError> {
        let Some((list, device)) = listed else {
            return match signer {
                PrekeySigner::Identity => self.verify(),
                PrekeySigner::Device => Err(CryptoError::InvalidSignature),
            };
        };
        if *list.identity_key() != self.identity_key {
            return Err(CryptoError::InvalidSignature);
        }
        let entry = list.entry(device).ok_or(CryptoError::InvalidKey)?;
        if entry.identity_dh != self.identity_dh {
            return Err(CryptoError::InvalidKey);
        }
        match signer {
            PrekeySigner::Identity => self.check_signatures()?,
            PrekeySigner::Device => {
                verify_identity_dh(
                    &self.identity_key,
                    &self.identity_dh,
                    &self.identity_dh_signature,
                )?;
                let key = VerifyingKey::from_bytes(&entry.device_key)
                    .map_err(|_| CryptoError::InvalidKey)?;
                key.verify_strict(
                    &tern_proto::auth::signed_prekey(self.signed_prekey_id, &self.signed_prekey),
                    &Signature::from_bytes(&self.signed_prekey_signature),
                )
                .map_err(|_| CryptoError::InvalidSignature)?;
            }
        }
        Ok(VerifiedBundle(self.clone()))
    }
}

/// Checks that `identity_key` vouches for a device's identity agreement key.
pub fn verify_identity_dh(
    identity_key: &[u8; 32],
    identity_dh: &[u8; 32],
    signature: &[u8],
) -> Result<(), CryptoError> {
    let identity = VerifyingKey::from_bytes(identity_key).map_err(|_| CryptoError::InvalidKey)?;
    let signature = Signature::from_slice(signature).map_err(|_| CryptoError::InvalidSignature)?;
    identity
        .verify_strict(
            &tern_proto::auth::identity_agreement_key(identity_dh),
            &signature,
        )
        .map_err(|_| CryptoError::InvalidSignature)
}

/// What the initiator sends so the responder can compute the same secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialHeader {
    /// The initiator's Ed25519 identity key.
    pub identity_key: [u8; 32],
    /// The initiator's identity agreement key.
    pub identity_dh: [u8; 32],
    /// The initiator's ephemeral key.
    pub ephemeral: [u8; 32],
    /// Which signed prekey was used.
    pub signed_prekey_id: u32,
    /// Which one-time prekey was used, if any.
    pub one_time_prekey_id: Option<u32>,
}

impl InitialHeader {
    /// Fixed layout: keys, SPK id, a flag and the OPK id.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..32].copy_from_slice(&self.identity_key);
        out[32..64].copy_from_slice(&self.identity_dh);
        out[64..96].copy_from_slice(&self.ephemeral);
        out[96..100].copy_from_slice(&self.signed_prekey_id.to_be_bytes());
        if let Some(id) = self.one_time_prekey_id {
            out[100] = 1;
            out[101..].copy_from_slice(&id.to_be_bytes());
        }
        out
    }

    /// Parses [`InitialHeader::to_bytes`]; never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let b: &[u8; HEADER_LEN] = bytes.try_into().map_err(|_| CryptoError::MalformedHeader)?;
        let key = |r: std::ops::Range<usize>| -> Result<[u8; 32], CryptoError> {
            b[r].try_into().map_err(|_| CryptoError::MalformedHeader)
        };
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let one_time_prekey_id = match b[100] {
            0 if b[101..] == [0; 4] => None,
            1 => Some(u32_at(101)),
            _ => return Err(CryptoError::MalformedHeader),
        };
        Ok(InitialHeader {
            identity_key: key(0..32)?,
            identity_dh: key(32..64)?,
            ephemeral: key(64..96)?,
            signed_prekey_id: u32_at(96),
            one_time_prekey_id,
        })
    }
}

/// The agreed secret and the associated data both sides bind to every message.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SharedSecret {
    /// SK, 32 bytes.
    pub key: [u8; 32],
    /// Initiator identity || responder identity || initiator IK || responder IK.
    pub associated_data: Vec<u8>,
}

fn derive(dhs: &[&[u8; 32]], ad: Vec<u8>) -> Result<SharedSecret, CryptoError> {
    let mut ikm = Zeroizing::new(vec![0xffu8; 32]);
    for dh in dhs {
        ikm.extend_from_slice(&dh[..]);
    }
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(&[0u8; 32]), &ikm)
        .expand(INFO, &mut key)
        .map_err(|_| CryptoError::InvalidKey)?;
    Ok(SharedSecret {
        key,
        associated_data: ad,
    })
}

fn associated_data(a_id: &[u8; 32], b_id: &[u8; 32], a_dh: &[u8; 32], b_dh: &[u8; 32]) -> Vec<u8> {
    [&a_id[..], b_id, a_dh, b_dh].concat()
}

/// The initiator's side: agrees on a secret with a verified bundle.
pub fn initiate(
    rng: &mut (impl RngCore + CryptoRng),
    our_identity_key: &[u8; 32],
    our_identity_dh: &AgreementKeyPair,
    bundle: &VerifiedBundle,
) -> Result<(InitialHeader, SharedSecret), CryptoError> {
    let bundle = bundle.bundle();
    // The ephemeral takes part in three DHs, so it is a static secret used once and
    // wiped when dropped at the end of this function.
    let ek = AgreementKeyPair::generate(rng);
    let ek_pub = ek.public();
    let dh1 = our_identity_dh.dh(&bundle.signed_prekey)?;
    let dh2 = ek.dh(&bundle.identity_dh)?;
    let dh3 = ek.dh(&bundle.signed_prekey)?;
    let dh4 = bundle.one_time_prekey.map(|(_, k)| ek.dh(&k)).transpose()?;
    let mut dhs = vec![&*dh1, &*dh2, &*dh3];
    if let Some(d) = &dh4 {
        dhs.push(d);
    }
    let ad = associated_data(
        our_identity_key,
        &bundle.identity_key,
        &our_identity_dh.public(),
        &bundle.identity_dh,
    );
    let header = InitialHeader {
        identity_key: *our_identity_key,
        identity_dh: our_identity_dh.public(),
        ephemeral: ek_pub,
        signed_prekey_id: bundle.signed_prekey_id,
        one_time_prekey_id: bundle.one_time_prekey.map(|(id, _)| id),
    };
    Ok((header, derive(&dhs, ad)?))
}

/// The responder's side, with the prekeys the header names (looked up by the caller).
pub fn respond(
    our_identity_key: &[u8; 32],
    our_identity_dh: &AgreementKeyPair,
    signed_prekey: &AgreementKeyPair,
    one_time_prekey: Option<&AgreementKeyPair>,
    header: &InitialHeader,
) -> Result<SharedSecret, CryptoError> {
    if header.one_time_prekey_id.is_some() != one_time_prekey.is_some() {
        return Err(CryptoError::InvalidKey);
    }
    let dh1 = signed_prekey.dh(&header.identity_dh)?;
    let dh2 = our_identity_dh.dh(&header.ephemeral)?;
    let dh3 = signed_prekey.dh(&header.ephemeral)?;
    let dh4 = one_time_prekey
        .map(|k| k.dh(&header.ephemeral))
        .transpose()?;
    let mut dhs = vec![&*dh1, &*dh2, &*dh3];
    if let Some(d) = &dh4 {
        dhs.push(d);
    }
    let ad = associated_data(
        &header.identity_key,
        our_identity_key,
        &header.identity_dh,
        &our_identity_dh.public(),
    );
    derive(&dhs, ad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use rand::rngs::OsRng;

    struct Device {
        identity: SigningKey,
        dh: AgreementKeyPair,
        spk: AgreementKeyPair,
        opk: AgreementKeyPair,
    }

    fn device() -> Device {
        Device {
            identity: SigningKey::generate(&mut OsRng),
            dh: AgreementKeyPair::generate(&mut OsRng),
            spk: AgreementKeyPair::generate(&mut OsRng),
            opk: AgreementKeyPair::generate(&mut OsRng),
        }
    }

    fn bundle(d: &Device, with_opk: bool) -> PreKeyBundle {
        PreKeyBundle {
            identity_key: d.identity.verifying_key().to_bytes(),
            identity_dh: d.dh.public(),
            identity_dh_signature: d
                .identity
                .sign(&tern_proto::auth::identity_agreement_key(&d.dh.public()))
                .to_bytes(),
            signed_prekey_id: 7,
            signed_prekey: d.spk.public(),
            signed_prekey_signature: d
                .identity
                .sign(&tern_proto::auth::signed_prekey(7, &d.spk.public()))
                .to_bytes(),
            one_time_prekey: with_opk.then(|| (9, d.opk.public())),
        }
    }

    #[test]
    fn both_sides_agree_with_and_without_a_one_time_prekey() {
        let (alice, bob) = (device(), device());
        for with_opk in [true, false] {
            let b = bundle(&bob, with_opk);
            let a_id = alice.identity.verifying_key().to_bytes();
            let (header, sk_a) = b
                .verify()
                .and_then(|b| initiate(&mut OsRng, &a_id, &alice.dh, &b))
                .expect("initiate");
            assert_eq!(header.one_time_prekey_id.is_some(), with_opk);
            let header = InitialHeader::from_bytes(&header.to_bytes()).expect("round trip");
            let opk = with_opk.then_some(&bob.opk);
            let sk_b = respond(&b.identity_key, &bob.dh, &bob.spk, opk, &header).expect("respond");
            assert_eq!(sk_a.key, sk_b.key);
            assert_eq!(sk_a.associated_data, sk_b.associated_data);
            assert_eq!(sk_a.associated_data.len(), 128);
        }
    }

    #[test]
    fn wrong_prekeys_give_another_secret() {
        let (alice, bob) = (device(), device());
        let b = bundle(&bob, true);
        let a_id = alice.identity.verifying_key().to_bytes();
        let (header, sk_a) = b
            .verify()
            .and_then(|b| initiate(&mut OsRng, &a_id, &alice.dh, &b))
            .expect("initiate");
        let other = AgreementKeyPair::generate(&mut OsRng);
        let sk =
            respond(&b.identity_key, &bob.dh, &other, Some(&bob.opk), &header).expect("respond");
        assert_ne!(sk.key, sk_a.key);
        assert!(
            respond(&b.identity_key, &bob.dh, &bob.spk, None, &header).is_err(),
            "the named OPK is required"
        );
    }

    #[test]
    fn tampered_bundles_are_refused() {
        let (alice, bob) = (device(), device());
        let a_id = alice.identity.verifying_key().to_bytes();
        let mut b = bundle(&bob, true);
        b.signed_prekey_id = 8;
        assert_eq!(
            b.verify()
                .and_then(|b| initiate(&mut OsRng, &a_id, &alice.dh, &b))
                .err(),
            Some(CryptoError::InvalidSignature)
        );
        let mut b = bundle(&bob, true);
        b.identity_dh = AgreementKeyPair::generate(&mut OsRng).public();
        assert_eq!(
            b.verify()
                .and_then(|b| initiate(&mut OsRng, &a_id, &alice.dh, &b))
                .err(),
            Some(CryptoError::InvalidSignature)
        );
        let mut b = bundle(&bob, true);
        b.identity_key = alice.identity.verifying_key().to_bytes();
        assert!(
            b.verify()
                .and_then(|b| initiate(&mut OsRng, &a_id, &alice.dh, &b))
                .is_err(),
            "signed by another identity"
        );
    }

    #[test]
    fn low_order_keys_and_malformed_headers_are_errors() {
        let (alice, bob) = (device(), device());
        let mut b = bundle(&bob, false);
        b.signed_prekey = [0; 32];
        b.signed_prekey_signature = bob
            .identity
            .sign(&tern_proto::auth::signed_prekey(7, &[0; 32]))
            .to_bytes();
        let a_id = alice.identity.verifying_key().to_bytes();
        assert_eq!(
            b.verify()
                .and_then(|b| initiate(&mut OsRng, &a_id, &alice.dh, &b))
                .err(),
            Some(CryptoError::InvalidKey)
        );
        assert!(InitialHeader::from_bytes(&[0; HEADER_LEN - 1]).is_err());
        let mut bad = [0u8; HEADER_LEN];
        bad[100] = 2;
        assert!(InitialHeader::from_bytes(&bad).is_err());
        bad[100] = 0;
        bad[103] = 1;
        assert!(
            InitialHeader::from_bytes(&bad).is_err(),
            "no OPK id without the flag"
        );
    }

    /// `d`'s account lists device 1 (`d`'s agreement key, its own device key) and
    /// device 2 with `device2`'s key and agreement key.
    fn listed(d: &Device, device2: &SigningKey, dh2: &[u8; 32]) -> VerifiedDeviceList {
        use crate::crypto::devices::{sign_device_list, DeviceEntry, DeviceList};
        let account = tern_proto::AccountId([5; 16]);
        let entry = |id, key: &SigningKey, dh: [u8; 32]| DeviceEntry {
            id: DeviceId::new(id).expect("id"),
            device_key: key.verifying_key().to_bytes(),
            identity_dh: dh,
        };
        let list = DeviceList {
            account,
            version: 2,
            entries: vec![
                entry(1, &SigningKey::generate(&mut OsRng), d.dh.public()),
                entry(2, device2, *dh2),
            ],
        };
        let (bytes, sig) = sign_device_list(&d.identity, &list).expect("sign");
        let key = d.identity.verifying_key().to_bytes();
        VerifiedDeviceList::verify(&key, &account, &bytes, &sig, None).expect("list")
    }

    /// A linked device's bundle: identity-signed agreement key, device-signed prekey.
    fn device_signed(d: &Device, device_key: &SigningKey, dh: &AgreementKeyPair) -> PreKeyBundle {
        let mut b = bundle(d, true);
        b.identity_dh = dh.public();
        b.identity_dh_signature = d
            .identity
            .sign(&tern_proto::auth::identity_agreement_key(&dh.public()))
            .to_bytes();
        b.signed_prekey_signature = device_key
            .sign(&tern_proto::auth::signed_prekey(7, &d.spk.public()))
            .to_bytes();
        b
    }

    #[test]
    fn a_device_signed_prekey_needs_its_entry_in_a_verified_list() {
        let (alice, bob) = (device(), device());
        let a_id = alice.identity.verifying_key().to_bytes();
        let key2 = SigningKey::generate(&mut OsRng);
        let dh2 = AgreementKeyPair::generate(&mut OsRng);
        let list = listed(&bob, &key2, &dh2.public());
        let two = DeviceId::new(2).expect("id");
        let b = device_signed(&bob, &key2, &dh2);
        let v = b
            .verify_listed(PrekeySigner::Device, Some((&list, two)))
            .expect("listed device key");
        assert!(initiate(&mut OsRng, &a_id, &alice.dh, &v).is_ok());
        // Without a list only the identity signer passes.
        assert_eq!(
            b.verify_listed(PrekeySigner::Device, None).err(),
            Some(CryptoError::InvalidSignature)
        );
        assert_eq!(b.verify().err(), Some(CryptoError::InvalidSignature));
        // Another id than the entry's, or a device the list does not hold.
        assert!(b
            .verify_listed(PrekeySigner::Device, Some((&list, DeviceId::PRIMARY)))
            .is_err());
        let nine = DeviceId::new(9).expect("id");
        assert_eq!(
            b.verify_listed(PrekeySigner::Device, Some((&list, nine)))
                .err(),
            Some(CryptoError::InvalidKey)
        );
        // A device key the list does not name signed the prekey (a relay's device).
        let stranger = SigningKey::generate(&mut OsRng);
        let forged = device_signed(&bob, &stranger, &dh2);
        assert_eq!(
            forged
                .verify_listed(PrekeySigner::Device, Some((&list, two)))
                .err(),
            Some(CryptoError::InvalidSignature)
        );
        // The right device key, but another agreement key than the listed one.
        let other_dh = AgreementKeyPair::generate(&mut OsRng);
        let swapped = device_signed(&bob, &key2, &other_dh);
        assert_eq!(
            swapped
                .verify_listed(PrekeySigner::Device, Some((&list, two)))
                .err(),
            Some(CryptoError::InvalidKey)
        );
        // A list verified under another identity than the bundle's.
        let carol = device();
        let carols = listed(&carol, &key2, &dh2.public());
        assert_eq!(
            b.verify_listed(PrekeySigner::Device, Some((&carols, two)))
                .err(),
            Some(CryptoError::InvalidSignature)
        );
    }

    #[test]
    fn an_identity_signed_prekey_passes_with_or_without_a_list() {
        let bob = device();
        let key2 = SigningKey::generate(&mut OsRng);
        let list = listed(&bob, &key2, &[9; 32]);
        let b = bundle(&bob, true);
        assert!(b.verify_listed(PrekeySigner::Identity, None).is_ok());
        assert!(b
            .verify_listed(PrekeySigner::Identity, Some((&list, DeviceId::PRIMARY)))
            .is_ok());
        // Identity-signed but claimed as device-signed: the device key did not sign it.
        assert_eq!(
            b.verify_listed(PrekeySigner::Device, Some((&list, DeviceId::PRIMARY)))
                .err(),
            Some(CryptoError::InvalidSignature)
        );
    }
}
