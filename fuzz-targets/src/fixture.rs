//! Fixed keys and sessions the crypto targets run against, built once per process
//! from fixed secrets and a seeded generator, so the seeds made from them stay valid.

use std::sync::LazyLock;

use ed25519_dalek::{Signer, SigningKey};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tern_client::crypto::ratchet::{Header, Session};
use tern_client::crypto::sealed::SenderCertificate;
use tern_client::crypto::x3dh::{self, AgreementKeyPair, InitialHeader, PreKeyBundle};
use tern_proto::{AccountId, DeviceId};

/// The generator every body uses: the same input always takes the same path.
pub(crate) fn rng() -> StdRng {
    StdRng::seed_from_u64(0x7e57)
}

/// One side: identity key, identity agreement key, signed prekey (id 1).
pub(crate) struct Party {
    pub(crate) identity: SigningKey,
    pub(crate) dh: AgreementKeyPair,
    pub(crate) spk: AgreementKeyPair,
}

impl Party {
    pub(crate) fn new(seed: u8) -> Self {
        Party {
            identity: SigningKey::from_bytes(&[seed; 32]),
            dh: AgreementKeyPair::from_secret([seed.wrapping_add(1); 32]),
            spk: AgreementKeyPair::from_secret([seed.wrapping_add(2); 32]),
        }
    }

    pub(crate) fn id(&self) -> [u8; 32] {
        self.identity.verifying_key().to_bytes()
    }

    pub(crate) fn bundle(&self) -> PreKeyBundle {
        PreKeyBundle {
            identity_key: self.id(),
            identity_dh: self.dh.public(),
            identity_dh_signature: self.vouch(),
            signed_prekey_id: 1,
            signed_prekey: self.spk.public(),
            signed_prekey_signature: self
                .identity
                .sign(&tern_proto::auth::signed_prekey(1, &self.spk.public()))
                .to_bytes(),
            one_time_prekey: None,
        }
    }

    /// The identity key's signature over the identity agreement key.
    pub(crate) fn vouch(&self) -> [u8; 64] {
        self.identity
            .sign(&tern_proto::auth::identity_agreement_key(&self.dh.public()))
            .to_bytes()
    }
}

/// Alice started a session with Bob and sent one message, which Bob read.
pub(crate) struct Fixture {
    pub(crate) alice: Party,
    pub(crate) bob: Party,
    /// The X3DH header Alice sent Bob.
    pub(crate) initial: InitialHeader,
    /// Alice's side, after her first message.
    pub(crate) alice_session: Session,
    /// Bob's side, after reading it.
    pub(crate) bob_session: Session,
    /// The relay that signs sender certificates.
    pub(crate) relay: SigningKey,
    /// Alice's sender certificate, valid until [`Fixture::NOW`] + 1 day.
    pub(crate) certificate: SenderCertificate,
}

impl Fixture {
    /// The time the certificate is checked at.
    pub(crate) const NOW: u64 = 1_800_000_000_000;
}

pub(crate) static FIXTURE: LazyLock<Fixture> = LazyLock::new(build);

fn build() -> Fixture {
    let mut rng = rng();
    let (alice, bob) = (Party::new(1), Party::new(11));
    let verified = bob
        .bundle()
        .verify()
        .expect("a bundle of fixed keys verifies");
    let (initial, alice_shared) =
        x3dh::initiate(&mut rng, &alice.id(), &alice.dh, &verified).expect("initiate");
    let bob_shared = x3dh::respond(&bob.id(), &bob.dh, &bob.spk, None, &initial).expect("respond");
    let mut alice_session =
        Session::init_initiator(&mut rng, &alice_shared, bob.spk.public()).expect("initiator");
    let mut bob_session = Session::init_responder(&bob_shared, bob.spk.clone());
    let (header, ciphertext) = alice_session.encrypt(b"first").expect("encrypt");
    bob_session
        .decrypt(&mut rng, &header, &ciphertext)
        .expect("the first message opens");

    let relay = SigningKey::from_bytes(&[42; 32]);
    let encoded = tern_proto::SenderCertificate {
        account: AccountId([1; 16]),
        device: DeviceId::PRIMARY,
        identity_key: alice.id(),
        expires_at_ms: Fixture::NOW + 86_400_000,
        relay_key: relay.verifying_key().to_bytes(),
    }
    .encode();
    let signature = relay.sign(&tern_proto::auth::sender_certificate(&encoded));
    let certificate =
        SenderCertificate::parse(&encoded, &signature.to_bytes()).expect("a certificate");
    Fixture {
        alice,
        bob,
        initial,
        alice_session,
        bob_session,
        relay,
        certificate,
    }
}

/// Alice's next messages to Bob as `header || ciphertext`, for seeds.
pub(crate) fn next_messages(n: usize) -> Vec<Vec<u8>> {
    let mut alice = FIXTURE.alice_session.clone();
    (0..n)
        .map(|i| {
            let (header, ciphertext) = alice
                .encrypt(format!("message {i}").as_bytes())
                .expect("encrypt");
            [&header.to_bytes()[..], &ciphertext].concat()
        })
        .collect()
}

/// Splits `header || ciphertext`.
pub(crate) fn split_message(data: &[u8]) -> Option<(Header, &[u8])> {
    let (header, ciphertext) = data.split_at_checked(tern_client::crypto::ratchet::HEADER_LEN)?;
    Some((Header::from_bytes(header).ok()?, ciphertext))
}
