//! The relay's certificate: the operator's, or a self-signed one made on first start
//! and kept in the data directory, so the fingerprint clients pin stays the same
//! across restarts.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tern_proto::Fingerprint;

use crate::config::TlsConfig;
use crate::error::{Error, Result};

pub(crate) const CERT_FILE: &str = "relay-cert.pem";
pub(crate) const KEY_FILE: &str = "relay-key.pem";

/// A certificate chain with its key.
#[derive(Debug)]
pub(crate) struct Identity {
    /// The chain, end-entity first.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub(crate) key: PrivateKeyDer<'static>,
}

impl Identity {
    /// The fingerprint clients pin: SHA-256 of the end-entity certificate.
    pub(crate) fn fingerprint(&self) -> Fingerprint {
        fingerprint(&self.chain[0])
    }
}

/// SHA-256 of a certificate's DER.
pub(crate) fn fingerprint(cert: &CertificateDer<'_>) -> Fingerprint {
    Fingerprint(Sha256::digest(cert.as_ref()).into())
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tls(format!("{what}: {e}"))
}

pub(crate) fn load(cert: &Path, key: &Path) -> Result<Identity> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_err(&format!("reading {}", cert.display()), e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_err(&format!("parsing {}", cert.display()), e))?;
    if chain.is_empty() {
        return Err(Error::Tls(format!(
            "{} holds no certificate",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| tls_err(&format!("reading {}", key.display()), e))?;
    Ok(Identity { chain, key })
}

/// The names of the relay's self-signed certificates (clients check the pin, not
/// the names; a rotated certificate keeps them).
pub(crate) fn subject_names() -> Vec<String> {
    vec!["tern-relay".to_owned(), "localhost".to_owned()]
}

/// The configured certificate, or the self-signed one in `data_dir` (made now if
/// there is none yet).
pub(crate) fn load_or_create(tls: &TlsConfig, data_dir: &Path) -> Result<Identity> {
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        return load(cert, key);
    }
    let (cert, key) = (data_dir.join(CERT_FILE), data_dir.join(KEY_FILE));
    if cert.exists() && key.exists() {
        return load(&cert, &key);
    }
    let made = rcgen::generate_simple_self_signed(subject_names())
        .map_err(|e| tls_err("generating a certificate", e))?;
    write_private(&key, made.signing_key.serialize_pem().as_bytes())?;
    fs::write(&cert, made.cert.pem())?;
    load(&cert, &key)
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

pub(crate) const SIGNING_KEY_FILE: &str = "relay-signing-key";

/// The Ed25519 key the relay signs sender certificates with, kept in `data_dir` (made
/// on first start), so certificates stay verifiable across restarts.
pub(crate) fn load_or_create_signing_key(data_dir: &Path) -> Result<ed25519_dalek::SigningKey> {
    let path = data_dir.join(SIGNING_KEY_FILE);
    if path.exists() {
        let bytes = fs::read(&path)?;
        let secret: [u8; 32] = bytes
            .try_into()
            .map_err(|_| Error::Tls(format!("{} is not a 32-byte key", path.display())))?;
        return Ok(ed25519_dalek::SigningKey::from_bytes(&secret));
    }
    let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    write_private(&path, &key.to_bytes())?;
    Ok(key)
}

/// The QUIC endpoint configuration, with the keys behind stateless resets and
/// connection ids derived from the signing key so they survive restarts: packets of a
/// connection the relay lost in a crash or restart carry ids the new process
/// recognises as its own, and are answered with a valid reset, so clients reconnect at
/// once instead of waiting out their idle timeout.
pub(crate) fn endpoint_config(signer: &ed25519_dalek::SigningKey) -> quinn::EndpointConfig {
    let mut okm = zeroize::Zeroizing::new([0u8; 40]);
    // 40 bytes is within HKDF-SHA256's output limit, so expand cannot fail.
    let _ = hkdf::Hkdf::<sha2::Sha256>::new(None, &signer.to_bytes())
        .expand(b"tern relay quic endpoint keys v1", &mut okm[..]);
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &okm[..32]);
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&okm[32..]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// The QUIC server configuration: TLS 1.3 only, ALPN `tern/1`; each handshake's
/// certificate from `certs` (so a rotation's switch needs no restart).
pub(crate) fn server_config(
    certs: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("protocol versions", e))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    tls.alpn_protocols = vec![tern_proto::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| tls_err("QUIC TLS config", e))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificate_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_create(&TlsConfig::default(), dir.path()).expect("create");
        let again = load_or_create(&TlsConfig::default(), dir.path()).expect("load");
        assert_eq!(first.fingerprint(), again.fingerprint());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(KEY_FILE))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key readable by owner only");
        }
        let other = tempfile::tempdir().expect("tempdir");
        let fresh = load_or_create(&TlsConfig::default(), other.path()).expect("create");
        assert_ne!(fresh.fingerprint(), first.fingerprint());
    }

    #[test]
    fn signing_key_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create_signing_key(dir.path()).expect("create");
        let b = load_or_create_signing_key(dir.path()).expect("load");
        assert_eq!(a.verifying_key(), b.verifying_key());
        fs::write(dir.path().join(SIGNING_KEY_FILE), b"short").expect("write");
        assert!(load_or_create_signing_key(dir.path()).is_err());
    }

    #[test]
    fn operator_certificate_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let made = load_or_create(&TlsConfig::default(), dir.path()).expect("create");
        let tls = TlsConfig {
            cert: Some(dir.path().join(CERT_FILE)),
            key: Some(dir.path().join(KEY_FILE)),
        };
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let loaded = load_or_create(&tls, elsewhere.path()).expect("load");
        assert_eq!(loaded.fingerprint(), made.fingerprint());
        let missing = TlsConfig {
            cert: Some(dir.path().join("nope.pem")),
            key: tls.key.clone(),
        };
        assert!(matches!(
            load_or_create(&missing, elsewhere.path()),
            Err(Error::Tls(_))
        ));
    }
}
