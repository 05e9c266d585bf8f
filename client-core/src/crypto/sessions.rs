//! The sessions with one contact device, as Signal keeps them: the current session,
//! used to send, and a few previous ones still accepted for receiving.
//!
//! - An initiator repeats its X3DH header with every message until it hears back, so
//!   whichever of its messages arrives first can open the session.
//! - A prekey message whose header already opened a session is decrypted in that
//!   session instead of opening another.
//! - A message that decrypts in a previous session makes that session current again.
//!   When both sides initiate at once, each first adopts the other's session, then the
//!   first reply moves both onto the same one: they converge without losing a message.

use prost::Message;
use rand::{CryptoRng, RngCore};
use zeroize::{Zeroize, Zeroizing};

use super::ratchet::{Header, Session};
use super::x3dh::{self, AgreementKeyPair, InitialHeader, VerifiedBundle};
use super::CryptoError;

/// Previous sessions kept for receiving.
pub const MAX_PREVIOUS: usize = 4;

/// An encrypted message for the contact device.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Present until the contact has answered our session: opens it on their side.
    pub prekey: Option<InitialHeader>,
    /// The ratchet header.
    pub header: Header,
    /// The ciphertext.
    pub ciphertext: Vec<u8>,
}

/// Our keys that a prekey message may name.
pub struct OurKeys<'a> {
    /// Our Ed25519 identity key (public).
    pub identity_key: &'a [u8; 32],
    /// Our identity agreement key pair.
    pub identity_dh: &'a AgreementKeyPair,
    /// The signed prekey with the id the header names, if we still have it.
    pub signed_prekey: Option<&'a AgreementKeyPair>,
    /// The one-time prekey with the id the header names, if we still have it.
    pub one_time_prekey: Option<&'a AgreementKeyPair>,
}

/// How a [`SessionSet`] is stored (the device store encrypts it).
#[derive(Clone, PartialEq, prost::Message)]
struct StoredSessionSet {
    #[prost(bytes = "vec", optional, tag = "1")]
    current: Option<Vec<u8>>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    previous: Vec<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pending: Option<Vec<u8>>,
    #[prost(bytes = "vec", repeated, tag = "4")]
    opened_by: Vec<Vec<u8>>,
}

/// The sessions with one contact device.
#[derive(Debug, Default, Clone)]
pub struct SessionSet {
    current: Option<Session>,
    previous: Vec<Session>,
    pending: Option<InitialHeader>,
    opened_by: Vec<[u8; 32]>,
    /// The last identity agreement key whose signature checked out: identity key,
    /// agreement key, signature. A contact repeats them in every prekey message until
    /// we answer. Not stored: after a restart the first one is checked again.
    vouched: Option<([u8; 32], [u8; 32], [u8; 64])>,
}

impl SessionSet {
    /// Whether a session exists to send with.
    pub fn has_session(&self) -> bool {
        self.current.is_some()
    }

    /// The state, for storage (the device store encrypts it).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let stored = StoredSessionSet {
            current: self.current.as_ref().map(|s| s.to_bytes().to_vec()),
            previous: self
                .previous
                .iter()
                .map(|s| s.to_bytes().to_vec())
                .collect(),
            pending: self.pending.as_ref().map(|h| h.to_bytes().to_vec()),
            opened_by: self.opened_by.iter().map(|e| e.to_vec()).collect(),
        };
        let out = Zeroizing::new(stored.encode_to_vec());
        // The intermediate copies hold key material too.
        let mut stored = stored;
        stored.current.zeroize();
        stored.previous.zeroize();
        out
    }

    /// Parses [`SessionSet::to_bytes`]; [`CryptoError::InvalidState`] on anything else.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let mut stored = StoredSessionSet::decode(bytes).map_err(|_| CryptoError::InvalidState)?;
        let parsed = (|| {
            if stored.previous.len() > MAX_PREVIOUS || stored.opened_by.len() > MAX_PREVIOUS + 1 {
                return Err(CryptoError::InvalidState);
            }
            Ok(SessionSet {
                current: stored
                    .current
                    .as_deref()
                    .map(Session::from_bytes)
                    .transpose()?,
                previous: stored
                    .previous
                    .iter()
                    .map(|b| Session::from_bytes(b))
                    .collect::<Result<_, _>>()?,
                pending: stored
                    .pending
                    .as_deref()
                    .map(InitialHeader::from_bytes)
                    .transpose()
                    .map_err(|_| CryptoError::InvalidState)?,
                opened_by: stored
                    .opened_by
                    .iter()
                    .map(|e| <[u8; 32]>::try_from(&e[..]).map_err(|_| CryptoError::InvalidState))
                    .collect::<Result<_, _>>()?,
                vouched: None,
            })
        })();
        stored.current.zeroize();
        stored.previous.zeroize();
        parsed
    }

    fn make_current(&mut self, session: Session) {
        if let Some(old) = self.current.replace(session) {
            self.previous.insert(0, old);
            self.previous.truncate(MAX_PREVIOUS);
        }
    }

    /// Checks that `identity_key` signed `identity_dh`, unless these exact bytes were
    /// checked before (an Ed25519 verification is a third of what opening a prekey
    /// message costs).
    pub fn verify_identity_dh(
        &mut self,
        identity_key: &[u8; 32],
        identity_dh: &[u8; 32],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        let signature: [u8; 64] = signature
            .try_into()
            .map_err(|_| CryptoError::InvalidSignature)?;
        if self.vouched == Some((*identity_key, *identity_dh, signature)) {
            return Ok(());
        }
        x3dh::verify_identity_dh(identity_key, identity_dh, &signature)?;
        self.vouched = Some((*identity_key, *identity_dh, signature));
        Ok(())
    }

    /// Whether the X3DH header with this ephemeral key already opened a session here
    /// (so a prekey message carrying it needs no one-time prekey).
    pub fn opened_by(&self, ephemeral: &[u8; 32]) -> bool {
        self.opened_by.contains(ephemeral)
    }

    /// Starts a session from a contact device's verified bundle.
    pub fn initiate(
        &mut self,
        rng: &mut (impl RngCore + CryptoRng),
        our_identity_key: &[u8; 32],
        our_identity_dh: &AgreementKeyPair,
        bundle: &VerifiedBundle,
    ) -> Result<(), CryptoError> {
        let (header, shared) = x3dh::initiate(rng, our_identity_key, our_identity_dh, bundle)?;
        let session = Session::init_initiator(rng, &shared, bundle.bundle().signed_prekey)?;
        self.make_current(session);
        self.pending = Some(header);
        Ok(())
    }

    /// Encrypts with the current session.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<Outgoing, CryptoError> {
        let session = self.current.as_mut().ok_or(CryptoError::InvalidState)?;
        let (header, ciphertext) = session.encrypt(plaintext)?;
        Ok(Outgoing {
            prekey: self.pending.clone(),
            header,
            ciphertext,
        })
    }

    /// Decrypts a message of an existing session; on failure nothing changes.
    pub fn decrypt(
        &mut self,
        rng: &mut (impl RngCore + CryptoRng),
        header: &Header,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let mut last = CryptoError::InvalidState;
        if let Some(current) = self.current.as_mut() {
            match current.decrypt(rng, header, ciphertext) {
                Ok(p) => {
                    self.pending = None;
                    return Ok(p);
                }
                Err(e) => last = e,
            }
        }
        for i in 0..self.previous.len() {
            match self.previous[i].decrypt(rng, header, ciphertext) {
                Ok(p) => {
                    let session = self.previous.remove(i);
                    self.make_current(session);
                    self.pending = None;
                    return Ok(p);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Decrypts a message that carries an X3DH header: in the session that header
    /// opened, if any, or else in a new session that becomes current.
    pub fn decrypt_prekey(
        &mut self,
        rng: &mut (impl RngCore + CryptoRng),
        ours: &OurKeys<'_>,
        initial: &InitialHeader,
        header: &Header,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        if self.opened_by.contains(&initial.ephemeral) {
            return self.decrypt(rng, header, ciphertext);
        }
        let spk = ours.signed_prekey.ok_or(CryptoError::InvalidKey)?;
        let shared = x3dh::respond(
            ours.identity_key,
            ours.identity_dh,
            spk,
            ours.one_time_prekey,
            initial,
        )?;
        let mut session = Session::init_responder(&shared, spk.clone());
        let plaintext = session.decrypt(rng, header, ciphertext)?;
        self.make_current(session);
        self.pending = None;
        self.opened_by.insert(0, initial.ephemeral);
        self.opened_by.truncate(MAX_PREVIOUS + 1);
        Ok(plaintext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::x3dh::PreKeyBundle;
    use ed25519_dalek::{Signer, SigningKey};
    use rand::rngs::OsRng;

    struct Party {
        identity: SigningKey,
        dh: AgreementKeyPair,
        spk: AgreementKeyPair,
        sessions: SessionSet,
    }

    impl Party {
        fn new() -> Self {
            Party {
                identity: SigningKey::generate(&mut OsRng),
                dh: AgreementKeyPair::generate(&mut OsRng),
                spk: AgreementKeyPair::generate(&mut OsRng),
                sessions: SessionSet::default(),
            }
        }
        fn id(&self) -> [u8; 32] {
            self.identity.verifying_key().to_bytes()
        }
        fn bundle(&self) -> PreKeyBundle {
            PreKeyBundle {
                identity_key: self.id(),
                identity_dh: self.dh.public(),
                identity_dh_signature: self
                    .identity
                    .sign(&tern_proto::auth::identity_agreement_key(&self.dh.public()))
                    .to_bytes(),
                signed_prekey_id: 1,
                signed_prekey: self.spk.public(),
                signed_prekey_signature: self
                    .identity
                    .sign(&tern_proto::auth::signed_prekey(1, &self.spk.public()))
                    .to_bytes(),
                one_time_prekey: None,
            }
        }
        fn vouch(&self) -> [u8; 64] {
            self.identity
                .sign(&tern_proto::auth::identity_agreement_key(&self.dh.public()))
                .to_bytes()
        }
        fn start(&mut self, other: &Party) {
            let (id, dh) = (self.id(), self.dh.clone());
            self.sessions
                .initiate(
                    &mut OsRng,
                    &id,
                    &dh,
                    &other.bundle().verify().expect("verify"),
                )
                .expect("initiate");
        }
        fn receive(&mut self, m: &Outgoing) -> Result<Vec<u8>, CryptoError> {
            let (id, dh, spk) = (self.id(), self.dh.clone(), self.spk.clone());
            match &m.prekey {
                Some(initial) => {
                    let ours = OurKeys {
                        identity_key: &id,
                        identity_dh: &dh,
                        signed_prekey: Some(&spk),
                        one_time_prekey: None,
                    };
                    self.sessions.decrypt_prekey(
                        &mut OsRng,
                        &ours,
                        initial,
                        &m.header,
                        &m.ciphertext,
                    )
                }
                None => self.sessions.decrypt(&mut OsRng, &m.header, &m.ciphertext),
            }
        }
    }

    #[test]
    fn the_initiator_repeats_its_header_until_answered() {
        let (mut a, mut b) = (Party::new(), Party::new());
        a.start(&b);
        let m1 = a.sessions.encrypt(b"1").expect("encrypt");
        let m2 = a.sessions.encrypt(b"2").expect("encrypt");
        assert!(m1.prekey.is_some() && m2.prekey.is_some());
        // The second arrives first and opens the session; the first then joins it.
        assert_eq!(b.receive(&m2).expect("opens"), b"2");
        assert_eq!(b.receive(&m1).expect("same session"), b"1");
        assert_eq!(b.sessions.previous.len(), 0, "one session, not two");
        let reply = b.sessions.encrypt(b"r").expect("encrypt");
        assert!(reply.prekey.is_none());
        assert_eq!(a.receive(&reply).expect("reply"), b"r");
        assert!(
            a.sessions.encrypt(b"3").expect("encrypt").prekey.is_none(),
            "answered: no header"
        );
    }

    #[test]
    fn simultaneous_initiation_converges_without_losing_a_message() {
        let (mut a, mut b) = (Party::new(), Party::new());
        a.start(&b);
        b.start(&a);
        let from_a = a.sessions.encrypt(b"hi from a").expect("encrypt");
        let from_b = b.sessions.encrypt(b"hi from b").expect("encrypt");
        assert_eq!(
            b.receive(&from_a).expect("b opens a's session"),
            b"hi from a"
        );
        assert_eq!(
            a.receive(&from_b).expect("a opens b's session"),
            b"hi from b"
        );
        // Each now sends in the other's session; the replies cross, yet all decrypt.
        for round in 0..5 {
            let x = a
                .sessions
                .encrypt(format!("a{round}").as_bytes())
                .expect("encrypt");
            let y = b
                .sessions
                .encrypt(format!("b{round}").as_bytes())
                .expect("encrypt");
            assert_eq!(
                b.receive(&x).expect("decrypts"),
                format!("a{round}").as_bytes()
            );
            assert_eq!(
                a.receive(&y).expect("decrypts"),
                format!("b{round}").as_bytes()
            );
        }
        // One side speaks twice in a row: both end on the same session.
        let x = a.sessions.encrypt(b"settle").expect("encrypt");
        b.receive(&x).expect("decrypts");
        let y = b.sessions.encrypt(b"settled").expect("encrypt");
        a.receive(&y).expect("decrypts");
        let (ad_a, ad_b) = (
            a.sessions
                .current
                .as_ref()
                .expect("current")
                .associated_data()
                .to_vec(),
            b.sessions
                .current
                .as_ref()
                .expect("current")
                .associated_data()
                .to_vec(),
        );
        assert_eq!(
            ad_a, ad_b,
            "both current sessions are the same X3DH session"
        );
    }

    #[test]
    fn a_stored_set_carries_on_after_a_restart() {
        let (mut a, mut b) = (Party::new(), Party::new());
        a.start(&b);
        let m1 = a.sessions.encrypt(b"1").expect("encrypt");
        let m2 = a.sessions.encrypt(b"2").expect("encrypt");
        b.receive(&m2).expect("opens");
        // Both sides restart from their stored state.
        a.sessions = SessionSet::from_bytes(&a.sessions.to_bytes()).expect("parses");
        b.sessions = SessionSet::from_bytes(&b.sessions.to_bytes()).expect("parses");
        assert_eq!(b.receive(&m1).expect("skipped key survived"), b"1");
        assert!(b.receive(&m2).is_err(), "replay still refused");
        let reply = b.sessions.encrypt(b"r").expect("encrypt");
        assert_eq!(a.receive(&reply).expect("reply"), b"r");
        assert!(a.sessions.encrypt(b"3").expect("encrypt").prekey.is_none());
        assert!(SessionSet::from_bytes(&[0xff, 0x01]).is_err());
        let empty = SessionSet::from_bytes(&SessionSet::default().to_bytes()).expect("empty");
        assert!(!empty.has_session());
    }

    #[test]
    fn failures_change_nothing() {
        let (mut a, mut b) = (Party::new(), Party::new());
        a.start(&b);
        let m = a.sessions.encrypt(b"x").expect("encrypt");
        let mut bad = m.clone();
        bad.ciphertext[0] ^= 1;
        assert!(b.receive(&bad).is_err());
        assert!(
            !b.sessions.has_session(),
            "a failed prekey message opens nothing"
        );
        assert_eq!(b.receive(&m).expect("the real one"), b"x");
        assert!(b.receive(&m).is_err(), "replay");
    }

    #[test]
    fn a_remembered_identity_key_signature_skips_only_the_same_bytes() {
        let (alice, mallory) = (Party::new(), Party::new());
        let mut set = SessionSet::default();
        let good = alice.vouch();
        let (id, dh) = (alice.id(), alice.dh.public());
        assert_eq!(set.vouched, None);
        set.verify_identity_dh(&id, &dh, &good).expect("valid");
        let remembered = Some((id, dh, good));
        assert_eq!(set.vouched, remembered);
        set.verify_identity_dh(&id, &dh, &good).expect("remembered");
        let mut bad = good;
        bad[0] ^= 1;
        for (id, dh, sig) in [
            (id, dh, &bad[..]),
            (id, mallory.dh.public(), &good[..]),
            (mallory.id(), dh, &good[..]),
            (id, dh, &good[..63]),
        ] {
            assert!(
                set.verify_identity_dh(&id, &dh, sig).is_err(),
                "only the exact bytes that verified are remembered"
            );
            assert_eq!(set.vouched, remembered, "a failure changes nothing");
        }
        set.verify_identity_dh(&id, &dh, &good)
            .expect("still valid");
    }
}
