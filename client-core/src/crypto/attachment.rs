//! Attachment encryption: a file of any size, streamed through constant memory.
//!
//! The format is the STREAM construction (Hoang, Reyhanitabar, Rogaway and Vizár,
//! "Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", 2015) over
//! ChaCha20-Poly1305, as the `aead` crate implements it (`StreamBE32`): each segment's
//! nonce is a random 7-byte prefix, a 32-bit big-endian segment counter and a flag
//! that is 1 only on the last segment. So a segment moved elsewhere fails (its counter
//! is wrong), and a stream cut at a segment boundary fails (its last segment does not
//! carry the flag).
//!
//! ```text
//! header   = version (1) || nonce prefix (7)                          8 bytes
//! segment  = ChaCha20-Poly1305(key, prefix || counter || last, 64 KiB of plaintext)
//! blob     = header || segment 0 || ... || segment n-1                every segment is
//!            64 KiB + 16 but the last, which holds 0 ..= 64 KiB + 16 (an empty file
//!            is one empty last segment)
//! blob id  = SHA-256(blob)
//! ```
//!
//! The blob id is SHA-256 of the ciphertext: the relay can check an upload against it
//! without any key, forwards name the same blob, and SHA-256 is already in every
//! client and relay (hardware-accelerated on current CPUs) where BLAKE3, though faster
//! in software, would be one more dependency for a hash that runs at disk speed anyway.
//! Each attachment has its own random key, so the relay cannot tell that two users
//! uploaded the same file; dedup comes from forwarding the pointer.

use std::io::{Read, Write};

use chacha20poly1305::aead::stream::{NewStream, StreamBE32, StreamPrimitive};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};

/// Plaintext bytes per segment.
pub const SEGMENT: usize = 64 * 1024;
/// Authentication tag per segment.
pub const TAG: usize = 16;
/// Ciphertext bytes per full segment.
pub const SEALED_SEGMENT: usize = SEGMENT + TAG;
/// Header bytes before the first segment.
pub const HEADER_LEN: usize = 8;
const VERSION: u8 = 1;

/// What can go wrong with an attachment's ciphertext.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachmentError {
    /// The header is not a version this client reads.
    #[error("not an attachment this client can read")]
    BadHeader,
    /// A segment failed authentication: changed, moved, or under another key.
    #[error("attachment segment {0} failed authentication (tampered, reordered or wrong key)")]
    Tampered(u64),
    /// The ciphertext ends early, or does not end where it says it does.
    #[error("attachment truncated")]
    Truncated,
    /// The ciphertext does not hash to the blob id.
    #[error("attachment does not match its id")]
    WrongDigest,
    /// More segments than the format counts.
    #[error("attachment too large")]
    TooLarge,
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The ciphertext's length for a plaintext of `len` bytes (`None` past `u64`).
pub fn sealed_len(len: u64) -> Option<u64> {
    let segments = len.div_ceil(SEGMENT as u64).max(1);
    (HEADER_LEN as u64)
        .checked_add(len)?
        .checked_add(segments.checked_mul(TAG as u64)?)
}

/// What [`encrypt`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encrypted {
    /// SHA-256 of the ciphertext: the blob id.
    pub blob_id: [u8; 32],
    /// Plaintext bytes.
    pub size: u64,
    /// Ciphertext bytes.
    pub sealed_size: u64,
    /// SHA-256 of the plaintext: travels in the pointer (never to the relay), so a
    /// recipient checks the whole file, resumed downloads included.
    pub digest: [u8; 32],
}

fn stream(key: &[u8; 32], header: &[u8; HEADER_LEN]) -> StreamBE32<ChaCha20Poly1305> {
    StreamBE32::from_aead(ChaCha20Poly1305::new(key.into()), (&header[1..]).into())
}

fn position(index: u64) -> Result<u32, AttachmentError> {
    u32::try_from(index).map_err(|_| AttachmentError::TooLarge)
}

/// Reads up to `buf.len()` bytes, stopping early only at the end of `r`.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Encrypts everything `plaintext` yields under `key` into `out`, holding two
/// segments in memory whatever the size.
pub fn encrypt(
    rng: &mut (impl RngCore + CryptoRng),
    key: &[u8; 32],
    mut plaintext: impl Read,
    mut out: impl Write,
) -> Result<Encrypted, AttachmentError> {
    let mut header = [0u8; HEADER_LEN];
    header[0] = VERSION;
    rng.fill_bytes(&mut header[1..]);
    let stream = stream(key, &header);
    let mut hash = Sha256::new();
    let mut plain_hash = Sha256::new();
    out.write_all(&header)?;
    hash.update(header);
    let (mut size, mut sealed_size) = (0u64, HEADER_LEN as u64);
    // One segment ahead: a segment is the last only if nothing follows it.
    let mut current = vec![0u8; SEGMENT];
    let mut n = fill(&mut plaintext, &mut current)?;
    let mut next = vec![0u8; SEGMENT];
    let mut index = 0u64;
    loop {
        let m = if n == SEGMENT {
            fill(&mut plaintext, &mut next)?
        } else {
            0
        };
        let last = m == 0;
        let mut segment = Vec::with_capacity(n + TAG);
        segment.extend_from_slice(&current[..n]);
        stream
            .encrypt_in_place(position(index)?, last, &header, &mut segment)
            .map_err(|_| AttachmentError::TooLarge)?;
        out.write_all(&segment)?;
        hash.update(&segment);
        plain_hash.update(&current[..n]);
        size += n as u64;
        sealed_size += segment.len() as u64;
        if last {
            break;
        }
        std::mem::swap(&mut current, &mut next);
        n = m;
        index += 1;
    }
    out.flush()?;
    Ok(Encrypted {
        blob_id: hash.finalize().into(),
        digest: plain_hash.finalize().into(),
        size,
        sealed_size,
    })
}

/// Decrypts a ciphertext as it arrives, in constant memory: feed bytes with
/// [`Decryptor::update`], then call [`Decryptor::finish`]. Plaintext is written out
/// segment by segment, each only once it authenticated.
pub struct Decryptor {
    key: zeroize::Zeroizing<[u8; 32]>,
    header: Vec<u8>,
    stream: Option<StreamBE32<ChaCha20Poly1305>>,
    pending: Vec<u8>,
    index: u64,
    hash: Option<Sha256>,
    expected: Option<[u8; 32]>,
    written: u64,
}

impl Decryptor {
    /// Decrypts from the start; [`Decryptor::finish`] also checks the whole
    /// ciphertext against `blob_id`.
    pub fn new(key: &[u8; 32], blob_id: [u8; 32]) -> Self {
        let mut d = Decryptor::resume(key, &[], 0);
        d.hash = Some(Sha256::new());
        d.expected = Some(blob_id);
        d
    }

    /// Carries on after `segments` whole segments were decrypted (a resumed
    /// download), given the blob's header. Every remaining segment is still
    /// authenticated, but the blob id is not checked (the hash needs every byte).
    pub fn resume(key: &[u8; 32], header: &[u8], segments: u64) -> Self {
        let mut d = Decryptor {
            key: zeroize::Zeroizing::new(*key),
            header: Vec::with_capacity(HEADER_LEN),
            stream: None,
            pending: Vec::with_capacity(SEALED_SEGMENT + 1),
            index: segments,
            hash: None,
            written: 0,
            expected: None,
        };
        d.take_header(header);
        d
    }

    fn take_header(&mut self, bytes: &[u8]) -> usize {
        let n = (HEADER_LEN - self.header.len()).min(bytes.len());
        self.header.extend_from_slice(&bytes[..n]);
        n
    }

    /// Where a resumed download starts: the byte offset of segment `segments`.
    pub fn offset_of(segments: u64) -> u64 {
        HEADER_LEN as u64 + segments * SEALED_SEGMENT as u64
    }

    /// Feeds ciphertext; writes out every segment that is certainly not the last.
    pub fn update(
        &mut self,
        mut bytes: &[u8],
        out: &mut impl Write,
    ) -> Result<(), AttachmentError> {
        if let Some(h) = self.hash.as_mut() {
            h.update(bytes);
        }
        if self.stream.is_none() {
            let n = self.take_header(bytes);
            bytes = &bytes[n..];
            if self.header.len() < HEADER_LEN {
                return Ok(());
            }
            let header: [u8; HEADER_LEN] = self.header[..]
                .try_into()
                .map_err(|_| AttachmentError::BadHeader)?;
            if header[0] != VERSION {
                return Err(AttachmentError::BadHeader);
            }
            self.stream = Some(stream(&self.key, &header));
        }
        while !bytes.is_empty() {
            // Keep one byte beyond a full segment before deciding it is not the last.
            let room = SEALED_SEGMENT + 1 - self.pending.len();
            let n = room.min(bytes.len());
            self.pending.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.pending.len() > SEALED_SEGMENT {
                let rest = self.pending.split_off(SEALED_SEGMENT);
                self.open(false, out)?;
                self.pending = rest;
            }
        }
        Ok(())
    }

    fn open(&mut self, last: bool, out: &mut impl Write) -> Result<(), AttachmentError> {
        let stream = self.stream.as_ref().ok_or(AttachmentError::Truncated)?;
        let index = self.index;
        let at = position(index)?;
        // For the last segment keep a copy: if it fails as the last, it tells a cut
        // stream (it opens as a middle segment) from a tampered one.
        let copy = last.then(|| self.pending.clone());
        if stream
            .decrypt_in_place(at, last, &self.header, &mut self.pending)
            .is_err()
        {
            let cut = copy.is_some_and(|mut c| {
                stream
                    .decrypt_in_place(at, false, &self.header, &mut c)
                    .is_ok()
            });
            return Err(if cut {
                AttachmentError::Truncated
            } else {
                AttachmentError::Tampered(index)
            });
        }
        out.write_all(&self.pending)?;
        self.written += self.pending.len() as u64;
        self.pending.clear();
        self.index += 1;
        Ok(())
    }

    /// The ciphertext has ended: the held segment must be the last one. Returns the
    /// plaintext bytes written by this decryptor.
    pub fn finish(mut self, out: &mut impl Write) -> Result<u64, AttachmentError> {
        if self.stream.is_none() || self.pending.len() < TAG {
            return Err(AttachmentError::Truncated);
        }
        self.open(true, out)?;
        out.flush()?;
        if let (Some(hash), Some(expected)) = (self.hash.take(), self.expected) {
            if <[u8; 32]>::from(hash.finalize()) != expected {
                return Err(AttachmentError::WrongDigest);
            }
        }
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::{OsRng, StdRng};
    use rand::SeedableRng;

    /// `len` pseudo-random bytes, generated as they are read.
    struct Source {
        rng: StdRng,
        left: u64,
    }

    impl Read for Source {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf
                .len()
                .min(usize::try_from(self.left).unwrap_or(usize::MAX));
            self.rng.fill_bytes(&mut buf[..n]);
            self.left -= n as u64;
            Ok(n)
        }
    }

    fn source(len: u64, seed: u64) -> Source {
        Source {
            rng: StdRng::seed_from_u64(seed),
            left: len,
        }
    }

    /// Hashes what it is given: checks content without keeping it.
    #[derive(Default)]
    struct Sink(Sha256, u64);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            self.1 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn sealed(len: u64) -> (Vec<u8>, [u8; 32], Encrypted) {
        let key = [7u8; 32];
        let mut blob = Vec::new();
        let e = encrypt(&mut OsRng, &key, source(len, len), &mut blob).expect("encrypt");
        (blob, key, e)
    }

    fn open_all(blob: &[u8], key: &[u8; 32], id: [u8; 32]) -> Result<Vec<u8>, AttachmentError> {
        let mut d = Decryptor::new(key, id);
        let mut out = Vec::new();
        // Odd-sized pieces, to cross every boundary.
        for piece in blob.chunks(7919) {
            d.update(piece, &mut out)?;
        }
        d.finish(&mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_the_edges() {
        let s = SEGMENT as u64;
        for len in [0, 1, s - 1, s, s + 1, 3 * s + 5] {
            let (blob, key, e) = sealed(len);
            assert_eq!(e.size, len);
            assert_eq!(
                Some(blob.len() as u64),
                sealed_len(len),
                "length formula for {len}"
            );
            assert_eq!(e.sealed_size, blob.len() as u64);
            assert_eq!(e.blob_id, <[u8; 32]>::from(Sha256::digest(&blob)));
            let mut plain = Vec::new();
            source(len, len).read_to_end(&mut plain).expect("read");
            assert_eq!(e.digest, <[u8; 32]>::from(Sha256::digest(&plain)));
            let mut expected = Vec::new();
            source(len, len).read_to_end(&mut expected).expect("read");
            assert_eq!(
                open_all(&blob, &key, e.blob_id).expect("opens"),
                expected,
                "{len}"
            );
        }
    }

    #[test]
    fn fifty_mebibytes_stream_through() {
        let len = 50 << 20;
        let key = [9u8; 32];
        // Encrypt into a decryptor directly: neither side holds the file.
        struct Pipe(Decryptor, Sink);
        impl Write for Pipe {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0
                    .update(buf, &mut self.1)
                    .map_err(std::io::Error::other)?;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        // The id is only known at the end; hash separately and compare after.
        let mut pipe = Pipe(Decryptor::resume(&key, &[], 0), Sink::default());
        let e = encrypt(&mut OsRng, &key, source(len, 1), &mut pipe).expect("encrypt");
        let Pipe(d, mut sink) = pipe;
        assert_eq!(d.finish(&mut sink).expect("finish"), len);
        let mut want = Sink::default();
        std::io::copy(&mut source(len, 1), &mut want).expect("copy");
        assert_eq!(sink.0.finalize(), want.0.finalize());
        assert_eq!(Some(e.sealed_size), sealed_len(len));
        assert_eq!(sealed_len(u64::MAX - 3), None);
    }

    #[test]
    fn tampering_truncation_and_reordering_fail_clearly() {
        let (blob, key, e) = sealed(3 * SEGMENT as u64 + 100);
        let seg = |i: usize| HEADER_LEN + i * SEALED_SEGMENT;

        let mut tampered = blob.clone();
        tampered[seg(1) + 10] ^= 1;
        assert!(matches!(
            open_all(&tampered, &key, e.blob_id),
            Err(AttachmentError::Tampered(1))
        ));

        let mut last_tampered = blob.clone();
        let end = last_tampered.len() - 1;
        last_tampered[end] ^= 1;
        assert!(matches!(
            open_all(&last_tampered, &key, e.blob_id),
            Err(AttachmentError::Tampered(3))
        ));

        // Cut at a segment boundary, and cut mid-segment.
        assert!(matches!(
            open_all(&blob[..seg(2)], &key, e.blob_id),
            Err(AttachmentError::Truncated)
        ));
        assert!(open_all(&blob[..seg(2) + 500], &key, e.blob_id).is_err());
        assert!(matches!(
            open_all(&blob[..5], &key, e.blob_id),
            Err(AttachmentError::Truncated)
        ));

        let mut reordered = blob.clone();
        let (a, b) = (seg(0), seg(1));
        let first: Vec<u8> = blob[a..b].to_vec();
        reordered[a..b].copy_from_slice(&blob[b..seg(2)]);
        reordered[b..seg(2)].copy_from_slice(&first);
        assert!(matches!(
            open_all(&reordered, &key, e.blob_id),
            Err(AttachmentError::Tampered(0))
        ));

        assert!(matches!(
            open_all(&blob, &[8u8; 32], e.blob_id),
            Err(AttachmentError::Tampered(0))
        ));
        assert!(matches!(
            open_all(&blob, &key, [0; 32]),
            Err(AttachmentError::WrongDigest)
        ));
        let mut version = blob.clone();
        version[0] = 9;
        assert!(matches!(
            open_all(&version, &key, e.blob_id),
            Err(AttachmentError::BadHeader)
        ));
    }

    #[test]
    fn a_download_resumes_at_a_segment() {
        let (blob, key, e) = sealed(5 * SEGMENT as u64 + 3);
        let mut first = Vec::new();
        let mut d = Decryptor::new(&key, e.blob_id);
        // Two segments arrive, then the connection drops mid-third.
        d.update(&blob[..Decryptor::offset_of(2) as usize + 100], &mut first)
            .expect("update");
        let done = first.len() as u64 / SEGMENT as u64;
        assert_eq!(done, 2);
        let mut rest = Vec::new();
        let mut d = Decryptor::resume(&key, &blob[..HEADER_LEN], done);
        d.update(&blob[Decryptor::offset_of(done) as usize..], &mut rest)
            .expect("update");
        d.finish(&mut rest).expect("finish");
        first.extend(rest);
        let mut expected = Vec::new();
        source(5 * SEGMENT as u64 + 3, 5 * SEGMENT as u64 + 3)
            .read_to_end(&mut expected)
            .expect("read");
        assert_eq!(first, expected);
    }
}
