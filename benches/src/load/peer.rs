//! A load-generating device: tern-client's keys, connection and end-to-end crypto
//! (X3DH, Double Ratchet, sealed sender, padding), without the device store, so a run
//! measures the relay and the message crypto rather than a phone's disk.

use std::collections::HashMap;

use rand::rngs::OsRng;
use rand::RngCore;
use tern_client::crypto::message::{self, PreKeyId};
use tern_client::crypto::sealed::{self, CertificateCache, SenderCertificate};
use tern_client::crypto::sessions::SessionSet;
use tern_client::crypto::x3dh::{AgreementKeyPair, PreKeyBundle};
use tern_client::identity::{DeviceKeyPair, IdentityKeyPair};
use tern_client::net::{Inbox, KeyUpload, RelayConnection, SignedKey};
use tern_proto::{e2e, AccountId, DeviceAddress, DeviceId, RelayAddress};

use super::LoadError;

/// A registered device with its keys, able to seal messages to others and open
/// messages sealed to it.
pub struct Peer {
    /// Its address on the relay.
    pub address: DeviceAddress,
    /// Its delivery token (contacts need it to send sealed).
    pub token: [u8; 32],
    identity: IdentityKeyPair,
    device: DeviceKeyPair,
    identity_dh: AgreementKeyPair,
    identity_dh_signature: [u8; 64],
    signed_prekey: AgreementKeyPair,
    one_time: HashMap<u32, AgreementKeyPair>,
    relay_key: [u8; 32],
    certificate: SenderCertificate,
    certificates: CertificateCache,
    /// Receiving sessions by sender device.
    sessions: HashMap<(AccountId, DeviceId), SessionSet>,
}

const SIGNED_PREKEY_ID: u32 = 1;

impl Peer {
    /// Registers a new account on `conn`, publishes its keys and delivery token.
    pub async fn register(conn: &RelayConnection, one_time: u32) -> Result<Peer, LoadError> {
        let identity = IdentityKeyPair::generate();
        let device = DeviceKeyPair::generate();
        let address = conn.register(&identity, &device).await?;
        let identity_dh = AgreementKeyPair::generate(&mut OsRng);
        let identity_dh_signature = identity.certify_agreement_key(&identity_dh.public());
        let signed_prekey = AgreementKeyPair::generate(&mut OsRng);
        let one_time: HashMap<u32, AgreementKeyPair> = (1..=one_time)
            .map(|id| (id, AgreementKeyPair::generate(&mut OsRng)))
            .collect();
        conn.publish_keys(&KeyUpload {
            identity_dh: Some(SignedKey {
                id: 0,
                key: identity_dh.public(),
                signature: identity_dh_signature,
            }),
            signed_prekey: Some(SignedKey {
                id: SIGNED_PREKEY_ID,
                key: signed_prekey.public(),
                signature: identity
                    .certify_signed_prekey(SIGNED_PREKEY_ID, &signed_prekey.public()),
            }),
            one_time: one_time.iter().map(|(id, k)| (*id, k.public())).collect(),
        })
        .await?;
        let mut token = [0u8; 32];
        OsRng.fill_bytes(&mut token);
        conn.set_delivery_token(&token).await?;
        let issued = conn.sender_certificate().await?;
        let certificate = SenderCertificate::parse(&issued.certificate, &issued.signature)?;
        Ok(Peer {
            address,
            token,
            relay_key: conn.relay_signing_key().await?,
            identity,
            device,
            identity_dh,
            identity_dh_signature,
            signed_prekey,
            one_time,
            certificate,
            certificates: CertificateCache::default(),
            sessions: HashMap::new(),
        })
    }

    /// A new connection authenticated as this device; the relay starts pushing.
    pub async fn connect(
        &self,
        relay: &RelayAddress,
    ) -> Result<(RelayConnection, Inbox, u64), LoadError> {
        let (conn, inbox) = RelayConnection::connect(relay).await?;
        let queued = conn.authenticate(&self.address, &self.device).await?;
        Ok((conn, inbox, queued))
    }

    /// Starts a session to `to` from the bundle the relay hands out.
    pub async fn link(&self, conn: &RelayConnection, to: &Peer) -> Result<Link, LoadError> {
        let bundle = conn
            .fetch_keys(&to.address.account, Some(to.address.device))
            .await?
            .into_iter()
            .next()
            .ok_or("the recipient has no keys")?;
        let mut sessions = SessionSet::default();
        sessions.initiate(
            &mut OsRng,
            &self.identity.public(),
            &self.identity_dh,
            &PreKeyBundle {
                identity_key: bundle.identity_key,
                identity_dh: bundle.identity_dh.key,
                identity_dh_signature: bundle.identity_dh.signature,
                signed_prekey_id: bundle.signed_prekey.id,
                signed_prekey: bundle.signed_prekey.key,
                signed_prekey_signature: bundle.signed_prekey.signature,
                one_time_prekey: bundle.one_time_prekey,
            }
            .verify()?,
        )?;
        Ok(Link {
            to: to.address,
            to_identity_dh: bundle.identity_dh.key,
            token: to.token,
            from: self.address,
            identity_dh_signature: self.identity_dh_signature,
            certificate: self.certificate.clone(),
            sessions,
        })
    }

    /// Opens a delivered payload: the seal, the sender certificate, the ratchet.
    pub fn open(
        &mut self,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<(AccountId, e2e::Plaintext), LoadError> {
        let (cert, content) = sealed::open(&self.identity_dh, payload)?;
        self.certificates.validate(&cert, &self.relay_key, now_ms)?;
        let sessions = self
            .sessions
            .entry((cert.account, cert.device))
            .or_default();
        let (signed, one_time) = (&self.signed_prekey, &mut self.one_time);
        let mut prekeys = |id: PreKeyId| match id {
            PreKeyId::Signed(SIGNED_PREKEY_ID) => Some(signed.clone()),
            PreKeyId::Signed(_) => None,
            PreKeyId::OneTime(id) => one_time.get(&id).cloned(),
        };
        let opened = message::decrypt(
            &mut OsRng,
            sessions,
            (&self.identity.public(), &self.identity_dh),
            &cert.identity_key,
            &mut prekeys,
            &content,
        )?;
        if let Some(id) = opened.one_time_prekey {
            self.one_time.remove(&id);
        }
        if opened.plaintext.sender_account != cert.account.as_bytes()[..] {
            return Err("the sender inside differs from its certificate".into());
        }
        Ok((cert.account, opened.plaintext))
    }
}

/// The sending side of a session to one recipient device.
pub struct Link {
    /// The recipient.
    pub to: DeviceAddress,
    /// The recipient's delivery token.
    pub token: [u8; 32],
    to_identity_dh: [u8; 32],
    from: DeviceAddress,
    identity_dh_signature: [u8; 64],
    certificate: SenderCertificate,
    sessions: SessionSet,
}

impl Link {
    /// Encrypts `body` in the session and seals it: an envelope payload.
    pub fn seal(&mut self, body: &[u8], now_ms: u64) -> Result<Vec<u8>, LoadError> {
        let padded = message::pad_plaintext(&e2e::Plaintext {
            body: body.to_vec().into(),
            delivery_token: Default::default(),
            sent_at_ms: now_ms,
            sender_account: self.from.account.as_bytes().to_vec().into(),
            sender_device: self.from.device.get(),
            attachments: Vec::new(),
            sync: None,
            broadcast: None,
            group_rejoin: None,
        })
        .ok_or("message too large")?;
        let content = message::encrypt(&mut self.sessions, &self.identity_dh_signature, &padded)?;
        Ok(sealed::seal(
            &mut OsRng,
            &self.to_identity_dh,
            &self.certificate,
            &content,
        )?)
    }
}
