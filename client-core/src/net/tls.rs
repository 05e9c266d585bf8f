//! TLS for relay connections: TLS 1.3 only, ALPN `tern/1`, and the relay's certificate
//! pinned by fingerprint instead of checked against a CA.
//!
//! During a certificate rotation ([`Pins`]) two fingerprints are pinned: the
//! current one and the next one the relay announced over a connection verified
//! under the current one. A connection made under the next one retires the old.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tern_proto::{Fingerprint, NextCertificate};

/// Accepts exactly the certificates with the pinned fingerprints; still checks that
/// the relay holds the key (the TLS 1.3 handshake signature).
#[derive(Debug)]
pub(crate) struct PinnedVerifier {
    fingerprints: Vec<Fingerprint>,
    provider: Arc<CryptoProvider>,
    /// Set when a handshake failed on the pin, so the caller can say so.
    pub(crate) mismatch: Arc<AtomicBool>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if self.fingerprints.iter().any(|f| f.0 == seen) {
            Ok(ServerCertVerified::assertion())
        } else {
            self.mismatch.store(true, Ordering::Release);
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A QUIC client configuration pinned to `fingerprint`, and the flag its verifier sets
/// on a mismatch.
pub fn pinned_client_config(
    fingerprint: Fingerprint,
) -> Result<(quinn::ClientConfig, Arc<AtomicBool>), String> {
    client_config_pinned_to(&[fingerprint])
}

/// [`pinned_client_config`] accepting any of `fingerprints` (a rotation's two).
pub fn client_config_pinned_to(
    fingerprints: &[Fingerprint],
) -> Result<(quinn::ClientConfig, Arc<AtomicBool>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mismatch = Arc::new(AtomicBool::new(false));
    let verifier = Arc::new(PinnedVerifier {
        fingerprints: fingerprints.to_vec(),
        provider: provider.clone(),
        mismatch: mismatch.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tern_proto::ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(15)));
    config.transport_config(Arc::new(transport));
    Ok((config, mismatch))
}

/// The fingerprint of the certificate a connection's relay presented.
pub fn presented(conn: &quinn::Connection) -> Option<Fingerprint> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let first = chain.first()?;
    Some(Fingerprint(Sha256::digest(first.as_ref()).into()))
}

/// What a client pins for its relay: the current certificate and, while the relay
/// rotates, the next one it announced.
#[derive(Debug)]
pub struct Pins(Mutex<PinState>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PinState {
    current: Fingerprint,
    next: Option<NextCertificate>,
}

/// What [`Pins::connected_under`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    /// The current pin.
    Current,
    /// The announced next one, which is now current (the old one is dropped).
    Next,
    /// Neither (the handshake would have failed; a connection not made here).
    Other,
}

impl Pins {
    /// `current`, with `next` if one was announced before.
    pub fn new(current: Fingerprint, next: Option<NextCertificate>) -> Pins {
        let next = next.filter(|n| n.fingerprint != current);
        Pins(Mutex::new(PinState { current, next }))
    }

    fn state(&self) -> PinState {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current pin.
    pub fn current(&self) -> Fingerprint {
        self.state().current
    }

    /// The announced next certificate, if any.
    pub fn next(&self) -> Option<NextCertificate> {
        self.state().next
    }

    /// Every fingerprint a handshake may present: the current one, then the next.
    pub fn accepted(&self) -> Vec<Fingerprint> {
        let s = self.state();
        std::iter::once(s.current)
            .chain(s.next.map(|n| n.fingerprint))
            .collect()
    }

    /// Takes an announcement received over a connection verified under one of
    /// these pins (the caller's duty: that is what makes it trustworthy). Returns
    /// whether the pins changed.
    pub fn announce(&self, next: NextCertificate) -> bool {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if next.fingerprint == s.current || s.next == Some(next) {
            return false;
        }
        s.next = Some(next);
        true
    }

    /// Records which pin a connection was verified under; under the next one it
    /// becomes the only pin.
    pub fn connected_under(&self, presented: Fingerprint) -> Presented {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if presented == s.current {
            return Presented::Current;
        }
        match s.next {
            Some(n) if n.fingerprint == presented => {
                s.current = presented;
                s.next = None;
                Presented::Next
            }
            _ => Presented::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(pins: &[Fingerprint]) -> PinnedVerifier {
        PinnedVerifier {
            fingerprints: pins.to_vec(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            mismatch: Arc::new(AtomicBool::new(false)),
        }
    }

    fn cert() -> (CertificateDer<'static>, Fingerprint) {
        let made =
            rcgen::generate_simple_self_signed(vec!["tern-relay".to_owned()]).expect("rcgen");
        let der = made.cert.der().clone();
        let f = Fingerprint(Sha256::digest(der.as_ref()).into());
        (der, f)
    }

    fn accepts(v: &PinnedVerifier, der: &CertificateDer<'_>) -> bool {
        let name = ServerName::try_from("tern-relay").expect("name");
        v.verify_server_cert(der, &[], &name, &[], UnixTime::now())
            .is_ok()
    }

    #[test]
    fn the_verifier_accepts_the_current_or_the_next_pin_and_nothing_else() {
        let ((a, fa), (b, fb), (c, _)) = (cert(), cert(), cert());
        let both = verifier(&[fa, fb]);
        assert!(accepts(&both, &a));
        assert!(accepts(&both, &b));
        assert!(!both.mismatch.load(Ordering::Acquire));
        assert!(!accepts(&both, &c));
        assert!(both.mismatch.load(Ordering::Acquire), "a pin error, typed");
        let one = verifier(&[fa]);
        assert!(!accepts(&one, &b));
    }

    #[test]
    fn an_announced_pin_is_added_and_retires_the_old_once_connected_under() {
        let (a, b, c) = (
            Fingerprint([1; 32]),
            Fingerprint([2; 32]),
            Fingerprint([3; 32]),
        );
        let pins = Pins::new(a, None);
        assert_eq!(pins.accepted(), vec![a]);
        // The current one announced again is nothing new.
        assert!(!pins.announce(NextCertificate {
            fingerprint: a,
            switch_at_ms: 1
        }));
        let next = NextCertificate {
            fingerprint: b,
            switch_at_ms: 5,
        };
        assert!(pins.announce(next));
        assert!(!pins.announce(next));
        assert_eq!(pins.accepted(), vec![a, b]);
        assert_eq!(pins.connected_under(a), Presented::Current);
        assert_eq!(pins.accepted(), vec![a, b]);
        assert_eq!(pins.connected_under(c), Presented::Other);
        assert_eq!(pins.connected_under(b), Presented::Next);
        assert_eq!((pins.current(), pins.next()), (b, None));
        assert_eq!(pins.accepted(), vec![b]);
    }
}
