//! Attachment encryption's tests: round trips at the edges, PADMÉ lengths, and
//! every way a ciphertext can be wrong.

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

fn open_all(
    blob: &[u8],
    key: &[u8; 32],
    id: [u8; 32],
    size: u64,
) -> Result<Vec<u8>, AttachmentError> {
    let mut d = Decryptor::new(key, id).with_size(size);
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
            open_all(&blob, &key, e.blob_id, e.size).expect("opens"),
            expected,
            "{len}"
        );
    }
}

#[test]
fn fifty_mebibytes_stream_through() {
    // One byte past a PADMÉ length: the stream carries padding the decryptor drops.
    let len = (50 << 20) + 1;
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
    let mut pipe = Pipe(
        Decryptor::resume(&key, &[], 0).with_size(len),
        Sink::default(),
    );
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
        open_all(&tampered, &key, e.blob_id, e.size),
        Err(AttachmentError::Tampered(1))
    ));

    let mut last_tampered = blob.clone();
    let end = last_tampered.len() - 1;
    last_tampered[end] ^= 1;
    assert!(matches!(
        open_all(&last_tampered, &key, e.blob_id, e.size),
        Err(AttachmentError::Tampered(3))
    ));

    // Cut at a segment boundary, and cut mid-segment.
    assert!(matches!(
        open_all(&blob[..seg(2)], &key, e.blob_id, e.size),
        Err(AttachmentError::Truncated)
    ));
    assert!(open_all(&blob[..seg(2) + 500], &key, e.blob_id, e.size).is_err());
    assert!(matches!(
        open_all(&blob[..5], &key, e.blob_id, e.size),
        Err(AttachmentError::Truncated)
    ));

    let mut reordered = blob.clone();
    let (a, b) = (seg(0), seg(1));
    let first: Vec<u8> = blob[a..b].to_vec();
    reordered[a..b].copy_from_slice(&blob[b..seg(2)]);
    reordered[b..seg(2)].copy_from_slice(&first);
    assert!(matches!(
        open_all(&reordered, &key, e.blob_id, e.size),
        Err(AttachmentError::Tampered(0))
    ));

    assert!(matches!(
        open_all(&blob, &[8u8; 32], e.blob_id, e.size),
        Err(AttachmentError::Tampered(0))
    ));
    assert!(matches!(
        open_all(&blob, &key, [0; 32], e.size),
        Err(AttachmentError::WrongDigest)
    ));
    let mut version = blob.clone();
    version[0] = 9;
    assert!(matches!(
        open_all(&version, &key, e.blob_id, e.size),
        Err(AttachmentError::BadHeader)
    ));
}

#[test]
fn a_download_resumes_at_a_segment() {
    let (blob, key, e) = sealed(5 * SEGMENT as u64 + 3);
    let mut first = Vec::new();
    let mut d = Decryptor::new(&key, e.blob_id).with_size(e.size);
    // Two segments arrive, then the connection drops mid-third.
    d.update(&blob[..Decryptor::offset_of(2) as usize + 100], &mut first)
        .expect("update");
    let done = first.len() as u64 / SEGMENT as u64;
    assert_eq!(done, 2);
    let mut rest = Vec::new();
    let mut d = Decryptor::resume(&key, &blob[..HEADER_LEN], done).with_size(e.size);
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

#[test]
fn files_in_one_padme_step_seal_to_one_length() {
    // 100,000 and 100,200 bytes both pad to 100,352 (49 · 2^11).
    let (a, key_a, ea) = sealed(100_000);
    let (b, key_b, eb) = sealed(100_200);
    assert_eq!(a.len(), b.len());
    assert_eq!(Some(a.len() as u64), stream_len(100_352));
    assert_eq!(
        (ea.sealed_size, eb.sealed_size),
        (a.len() as u64, b.len() as u64)
    );
    // Each opens to its own exact bytes; the digest covers the file alone.
    for (blob, key, e) in [(&a, key_a, ea), (&b, key_b, eb)] {
        let mut want = Vec::new();
        source(e.size, e.size).read_to_end(&mut want).expect("read");
        assert_eq!(
            open_all(blob, &key, e.blob_id, e.size).expect("opens"),
            want
        );
        assert_eq!(e.digest, <[u8; 32]>::from(Sha256::digest(&want)));
    }
    // Without the size the padding shows: zeros up to the PADMÉ length.
    let mut raw = Vec::new();
    let mut d = Decryptor::new(&key_a, ea.blob_id);
    d.update(&a, &mut raw).expect("update");
    assert_eq!(d.finish(&mut raw).expect("finish"), 100_352);
    assert_eq!(raw.len(), 100_352);
    assert!(raw[100_000..].iter().all(|b| *b == 0));
}

#[test]
fn sealed_lengths_follow_padme() {
    let s = SEGMENT as u64;
    for len in [
        0,
        1,
        2,
        255,
        256,
        257,
        1000,
        1024,
        1025,
        s - 1,
        s,
        s + 1,
        2 * s - 1,
        2 * s,
        2 * s + 1,
    ] {
        let (blob, key, e) = sealed(len);
        let padded = padme(len).expect("small");
        assert_eq!(Some(blob.len() as u64), stream_len(padded), "{len}");
        assert_eq!(Some(e.sealed_size), sealed_len(len), "{len}");
        assert_eq!(
            open_all(&blob, &key, e.blob_id, len).expect("opens").len() as u64,
            len
        );
    }
    assert_eq!(sealed_len(1000), Some(8 + 1024 + 16));
    assert_eq!(sealed_len(u64::MAX - 3), None);
}

#[test]
fn padding_whole_segments_is_skipped_and_resumes_past_the_file() {
    // 4 MiB + 1 pads to 4 MiB + 128 KiB: a segment with one byte of the file, then one
    // of nothing but padding.
    let len = (4 << 20) + 1;
    let (blob, key, e) = sealed(len);
    assert_eq!(Some(blob.len() as u64), stream_len((4 << 20) + (128 << 10)));
    let mut want = Vec::new();
    source(len, len).read_to_end(&mut want).expect("read");
    assert_eq!(open_all(&blob, &key, e.blob_id, len).expect("opens"), want);
    // Resumed at the segment holding the last byte, and after the file.
    for (segments, tail) in [(64u64, 1usize), (65, 0)] {
        let mut out = Vec::new();
        let mut d = Decryptor::resume(&key, &blob[..HEADER_LEN], segments).with_size(len);
        d.update(&blob[Decryptor::offset_of(segments) as usize..], &mut out)
            .expect("update");
        assert_eq!(
            d.finish(&mut out).expect("finish"),
            tail as u64,
            "{segments}"
        );
        assert_eq!(out, want[want.len() - tail..], "{segments}");
    }
}

#[test]
fn padding_that_is_not_zeros_or_has_the_wrong_length_is_refused() {
    let key = [5u8; 32];
    let seal_raw = |plain: &[u8]| {
        let mut blob = Vec::new();
        let (id, _) = seal(&mut OsRng, &key, plain, &mut blob).expect("seal");
        (blob, id)
    };
    // 1,000 bytes pad to 1,024.
    let mut plain = vec![1u8; 1000];
    plain.resize(1024, 0);
    let (blob, id) = seal_raw(&plain);
    assert_eq!(
        open_all(&blob, &key, id, 1000).expect("opens"),
        vec![1u8; 1000]
    );
    // A byte of the padding that is not zero.
    let mut dirty = plain.clone();
    dirty[1010] = 1;
    let (blob, id) = seal_raw(&dirty);
    assert!(matches!(
        open_all(&blob, &key, id, 1000),
        Err(AttachmentError::BadPadding)
    ));
    // Padded past the PADMÉ length, or short of it.
    for wrong in [1056, 1023] {
        let mut other = plain.clone();
        other.resize(wrong, 0);
        let (blob, id) = seal_raw(&other);
        assert!(
            matches!(
                open_all(&blob, &key, id, 1000),
                Err(AttachmentError::BadPadding)
            ),
            "{wrong}"
        );
    }
    // Shorter than the size the pointer says.
    let (blob, id) = seal_raw(&plain);
    assert!(matches!(
        open_all(&blob, &key, id, 1025),
        Err(AttachmentError::Truncated)
    ));
    // Not padded at all: a blob from before attachments were padded still opens.
    let (blob, id) = seal_raw(&plain[..1000]);
    assert_eq!(Some(blob.len() as u64), stream_len(1000));
    assert_eq!(
        open_all(&blob, &key, id, 1000).expect("opens"),
        vec![1u8; 1000]
    );
}
