//! Targets over the client's cryptography: everything a client parses or decrypts
//! from what a relay (or a stored record) hands it.

use sha2::{Digest, Sha256};
use tern_client::crypto::attachment::{Decryptor, HEADER_LEN as ATTACHMENT_HEADER_LEN};
use tern_client::crypto::padding::padme;
use tern_client::crypto::ratchet::{Header, Session};
use tern_client::crypto::sealed::{self, SenderCertificate};
use tern_client::crypto::sessions::SessionSet;
use tern_client::crypto::x3dh::{self, InitialHeader};

use crate::fixture::{rng, split_message, Fixture, FIXTURE};

/// The X3DH header of a prekey message, and Bob's side of the agreement on it. Rule:
/// a header that parses encodes back to itself; answering it never panics.
pub fn x3dh_header(data: &[u8]) {
    let Ok(header) = InitialHeader::from_bytes(data) else {
        return;
    };
    assert_eq!(&header.to_bytes()[..], data);
    let bob = &FIXTURE.bob;
    let _ = x3dh::respond(&bob.id(), &bob.dh, &bob.spk, None, &header);
}

/// The ratchet header and session record, and a decryption in Bob's fixed session:
/// `header (40 bytes) || ciphertext`. Rules: a header or session that parses encodes
/// back to the same bytes; a failed decryption leaves the session as it was.
pub fn ratchet(data: &[u8]) {
    if let Some(head) = data.get(..tern_client::crypto::ratchet::HEADER_LEN) {
        if let Ok(header) = Header::from_bytes(head) {
            assert_eq!(&header.to_bytes()[..], head);
        }
    }
    if let Some((header, ciphertext)) = split_message(data) {
        let mut session = FIXTURE.bob_session.clone();
        let before = session.to_bytes();
        if session.decrypt(&mut rng(), &header, ciphertext).is_err() {
            assert!(
                *session.to_bytes() == *before,
                "a failed decrypt changed the session"
            );
        }
    }
    if let Ok(session) = Session::from_bytes(data) {
        assert!(
            *session.to_bytes() == *data,
            "a session record re-encodes differently"
        );
    }
}

/// A stored session set, as the device store hands it back. Rule: what parses
/// encodes to bytes that parse to the same encoding again.
pub fn session_record(data: &[u8]) {
    let Ok(set) = SessionSet::from_bytes(data) else {
        return;
    };
    let bytes = set.to_bytes();
    let again = SessionSet::from_bytes(&bytes).expect("our own encoding parses");
    assert!(
        *again.to_bytes() == *bytes,
        "a session set re-encodes differently"
    );
}

/// Sealed sender, opened with Bob's fixed identity agreement key; and a sender
/// certificate parsed directly (first byte: the certificate's length; the rest after
/// it: the signature). Rule: no panic; what opens validates or is refused.
pub fn sealed_open(data: &[u8]) {
    let trusted = FIXTURE.relay.verifying_key().to_bytes();
    if let Ok((certificate, _content)) = sealed::open(&FIXTURE.bob.dh, data) {
        let _ = certificate.validate(&trusted, Fixture::NOW);
    }
    if let Some((&len, rest)) = data.split_first() {
        if let Some((encoded, signature)) = rest.split_at_checked(usize::from(len)) {
            if let Ok(certificate) = SenderCertificate::parse(encoded, signature) {
                let (e, s) = certificate.as_issued();
                assert_eq!((e, &s[..]), (encoded, signature));
                let _ = certificate.validate(&trusted, Fixture::NOW);
            }
        }
    }
}

/// The attachment key every attachment seed is encrypted under.
pub(crate) const ATTACHMENT_KEY: [u8; 32] = [7; 32];

/// Attachment decryption over a fuzzed ciphertext, as a download hands it over. The
/// first byte is the chunk size (in units of 257 bytes, plus one); the blob id is the
/// ciphertext's own SHA-256, so a valid ciphertext decrypts in full. Rules: the
/// outcome does not depend on the chunking; a resumed decryption (header given, no
/// digest) yields the same plaintext as a whole one; told a file size whose PADMÉ
/// length is the plaintext's, it yields the file alone, and only if the rest is zeros.
pub fn attachment(data: &[u8]) {
    let Some((&control, ciphertext)) = data.split_first() else {
        return;
    };
    let chunk = 1 + usize::from(control) * 257;
    let blob_id: [u8; 32] = Sha256::digest(ciphertext).into();
    let whole = decrypt(
        Decryptor::new(&ATTACHMENT_KEY, blob_id),
        ciphertext,
        usize::MAX,
    );
    let chunked = decrypt(Decryptor::new(&ATTACHMENT_KEY, blob_id), ciphertext, chunk);
    assert_eq!(whole, chunked, "chunks of {chunk} decrypt differently");
    if let (Ok(plaintext), Some((header, rest))) =
        (&whole, ciphertext.split_at_checked(ATTACHMENT_HEADER_LEN))
    {
        let resumed = decrypt(Decryptor::resume(&ATTACHMENT_KEY, header, 0), rest, chunk);
        assert_eq!(
            resumed.as_ref(),
            Ok(plaintext),
            "a resumed decryption differs"
        );
        // Where the trailing zeros start: the smallest size the padding allows.
        let len = plaintext.len();
        let file = plaintext.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        for size in [len, file, file.saturating_sub(1)] {
            let fits = size == len || padme(size as u64) == Some(len as u64);
            let sized = Decryptor::new(&ATTACHMENT_KEY, blob_id).with_size(size as u64);
            let got = decrypt(sized, ciphertext, chunk);
            if fits && size >= file {
                assert_eq!(got.as_deref(), Ok(&plaintext[..size]), "size {size}");
            } else {
                assert!(got.is_err(), "size {size} of {len} passed");
            }
        }
    }
}

fn decrypt(mut decryptor: Decryptor, ciphertext: &[u8], chunk: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for piece in ciphertext.chunks(chunk.max(1)) {
        decryptor
            .update(piece, &mut out)
            .map_err(|e| format!("{e:?}"))?;
    }
    let written = decryptor.finish(&mut out).map_err(|e| format!("{e:?}"))?;
    assert_eq!(written, out.len() as u64, "written bytes miscounted");
    Ok(out)
}
