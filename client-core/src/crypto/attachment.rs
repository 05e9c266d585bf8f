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
//! padded   = file || zeros up to padme(len(file)) bytes
//! segment  = ChaCha20-Poly1305(key, prefix || counter || last, 64 KiB of padded)
//! blob     = header || segment 0 || ... || segment n-1                every segment is
//!            64 KiB + 16 but the last, which holds 0 ..= 64 KiB + 16 (an empty file
//!            is one empty last segment)
//! blob id  = SHA-256(blob)
//! ```
//!
//! The padding is PADMÉ ([`padme`]): the blob's length depends only on the file's
//! length rounded up to its PADMÉ length (under 12% more, under 1/16 more from 256
//! bytes), so the relay does not learn a file's exact size. The exact size travels in
//! the encrypted pointer; a decryptor told it ([`Decryptor::with_size`]) writes only
//! the file and checks that the rest is zeros. The padding is deterministic, so a blob
//! is the same bytes however often it is forwarded.
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

use super::padding::padme;

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
    /// The plaintext past the file's size is not PADMÉ padding (zeros up to the
    /// file's PADMÉ length).
    #[error("attachment padding is malformed")]
    BadPadding,
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The ciphertext's length for a file of `len` bytes, padded to its PADMÉ length
/// (`None` past `u64`).
pub fn sealed_len(len: u64) -> Option<u64> {
    stream_len(padme(len)?)
}

/// The ciphertext's length for exactly `len` bytes of (already padded) plaintext:
/// also the length of a blob from before attachments were padded.
pub fn stream_len(len: u64) -> Option<u64> {
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
    /// Plaintext bytes (the file, without its padding).
    pub size: u64,
    /// Ciphertext bytes: [`sealed_len`] of `size`.
    pub sealed_size: u64,
    /// SHA-256 of the file (without its padding): travels in the pointer (never to the
    /// relay), so a recipient checks the whole file, resumed downloads included.
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

/// What `encrypt` reads: the file, hashed as it goes by, then zeros up to the file's
/// PADMÉ length (known only once the file has ended).
struct Padded<R> {
    file: R,
    hash: Sha256,
    size: u64,
    /// Once the file has ended: zeros still to come.
    zeros: Option<u64>,
}

impl<R: Read> Read for Padded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let left = match self.zeros {
            Some(left) => left,
            None => {
                let n = self.file.read(buf)?;
                if n > 0 {
                    self.hash.update(&buf[..n]);
                    self.size += n as u64;
                    return Ok(n);
                }
                let padded = padme(self.size)
                    .ok_or_else(|| std::io::Error::other("attachment too large"))?;
                padded - self.size
            }
        };
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        buf[..n].fill(0);
        self.zeros = Some(left - n as u64);
        Ok(n)
    }
}

/// Encrypts everything `plaintext` yields under `key` into `out`, padded to its PADMÉ
/// length, holding two segments in memory whatever the size.
pub fn encrypt(
    rng: &mut (impl RngCore + CryptoRng),
    key: &[u8; 32],
    plaintext: impl Read,
    out: impl Write,
) -> Result<Encrypted, AttachmentError> {
    let mut padded = Padded {
        file: plaintext,
        hash: Sha256::new(),
        size: 0,
        zeros: None,
    };
    let (blob_id, sealed_size) = seal(rng, key, &mut padded, out)?;
    Ok(Encrypted {
        blob_id,
        digest: padded.hash.finalize().into(),
        size: padded.size,
        sealed_size,
    })
}

/// Encrypts exactly what `plaintext` yields (padding included) into `out`: the blob
/// id and the ciphertext's length.
fn seal(
    rng: &mut (impl RngCore + CryptoRng),
    key: &[u8; 32],
    mut plaintext: impl Read,
    mut out: impl Write,
) -> Result<([u8; 32], u64), AttachmentError> {
    let mut header = [0u8; HEADER_LEN];
    header[0] = VERSION;
    rng.fill_bytes(&mut header[1..]);
    let stream = stream(key, &header);
    let mut hash = Sha256::new();
    out.write_all(&header)?;
    hash.update(header);
    let mut sealed_size = HEADER_LEN as u64;
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
        sealed_size += segment.len() as u64;
        if last {
            break;
        }
        std::mem::swap(&mut current, &mut next);
        n = m;
        index += 1;
    }
    out.flush()?;
    Ok((hash.finalize().into(), sealed_size))
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
    /// The file's size, when known: plaintext past it is padding.
    size: Option<u64>,
    /// Plaintext bytes up to the end of the last segment opened.
    end: u64,
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
            size: None,
            end: segments.saturating_mul(SEGMENT as u64),
        };
        d.take_header(header);
        d
    }

    /// The file's size, from its pointer: only the file is written out, and
    /// [`Decryptor::finish`] checks that the rest is zeros up to its PADMÉ length (or
    /// nothing, for a blob from before attachments were padded). Without it, the
    /// whole padded plaintext is written.
    pub fn with_size(mut self, size: u64) -> Self {
        self.size = Some(size);
        self
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
        let start = self.end;
        self.end += self.pending.len() as u64;
        let keep = match self.size {
            Some(size) => self
                .pending
                .len()
                .min(usize::try_from(size.saturating_sub(start)).unwrap_or(usize::MAX)),
            None => self.pending.len(),
        };
        if self.pending[keep..].iter().any(|b| *b != 0) {
            return Err(AttachmentError::BadPadding);
        }
        out.write_all(&self.pending[..keep])?;
        self.written += keep as u64;
        self.pending.clear();
        self.index += 1;
        Ok(())
    }

    /// The ciphertext has ended: the held segment must be the last one. Returns the
    /// plaintext bytes written by this decryptor (without padding, given a size).
    pub fn finish(mut self, out: &mut impl Write) -> Result<u64, AttachmentError> {
        if self.stream.is_none() || self.pending.len() < TAG {
            return Err(AttachmentError::Truncated);
        }
        self.open(true, out)?;
        out.flush()?;
        if let Some(size) = self.size {
            if self.end < size {
                return Err(AttachmentError::Truncated);
            }
            if self.end != size && Some(self.end) != padme(size) {
                return Err(AttachmentError::BadPadding);
            }
        }
        if let (Some(hash), Some(expected)) = (self.hash.take(), self.expected) {
            if <[u8; 32]>::from(hash.finalize()) != expected {
                return Err(AttachmentError::WrongDigest);
            }
        }
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests;
