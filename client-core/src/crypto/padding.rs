//! Padding lengths with PADMÉ (Nikitin, Barman, Lueks, Underwood, Hubaux and Ford,
//! "Reducing Metadata Leakage from Encrypted Files and Communication with PURBs",
//! PETS 2019), so the relay and the network see a coarse length, not the exact one.
//!
//! [`padme`] rounds a length `L` up to a multiple of `2^(E−S)`, where
//! `E = ⌊log2 L⌋` and `S = ⌊log2 E⌋ + 1`: the padded length keeps the top `S + 1`
//! significant bits of `L`. It costs less than `2^−S` of `L` (under 1/16 from 256
//! bytes, under 12% everywhere) and leaves `2^S` possible lengths between two powers
//! of two, so a padded length tells `O(log log L)` bits of `L`.
//!
//! Message bodies: the encoded plaintext, a 0x80 byte, then zeros up to
//! `max(256, padme(len + 1))` (ISO/IEC 7816-4 style, so [`unpad`] needs no length).
//! Attachments are padded to `padme(len)` by `crypto::attachment`, their length
//! travelling inside the encrypted pointer.

/// The smallest padded body: a short message shows nothing of its length.
pub const FLOOR: usize = 256;

/// The largest padded body, 128 KiB: a power of two, so itself a PADMÉ length (the
/// largest of the power-of-two buckets this replaced). Larger content goes as an
/// attachment.
pub const MAX_PADDED: usize = 128 * 1024;

/// The largest plaintext that pads to at most [`MAX_PADDED`] (one byte goes to the
/// 0x80 marker).
pub const MAX_PLAINTEXT: usize = MAX_PADDED - 1;

/// PADMÉ: `len` rounded up to the next length with at most `⌊log2 E⌋ + 1` significant
/// bits after the leading one (`E = ⌊log2 len⌋`). Lengths 0 and 1 stay as they are;
/// `None` only where the rounding would pass `u64::MAX`.
pub fn padme(len: u64) -> Option<u64> {
    if len < 2 {
        return Some(len);
    }
    let e = len.ilog2();
    let s = e.ilog2() + 1;
    let mask = (1u64 << (e - s)) - 1;
    Some(len.checked_add(mask)? & !mask)
}

/// The padded length of a body whose encoded plaintext is `len` bytes: PADMÉ of
/// `len + 1` (the marker), at least [`FLOOR`]; `None` past [`MAX_PADDED`].
pub fn padded_len(len: usize) -> Option<usize> {
    let marked = u64::try_from(len).ok()?.checked_add(1)?;
    let padded = usize::try_from(padme(marked)?).ok()?.max(FLOOR);
    (padded <= MAX_PADDED).then_some(padded)
}

/// Pads `msg` to [`padded_len`]; `None` if it is longer than [`MAX_PLAINTEXT`].
pub fn pad(msg: &[u8]) -> Option<Vec<u8>> {
    let padded = padded_len(msg.len())?;
    let mut out = Vec::with_capacity(padded);
    out.extend_from_slice(msg);
    out.push(0x80);
    out.resize(padded, 0);
    Some(out)
}

/// Removes padding; `None` if `padded` is not validly padded. The length is not
/// checked against [`padded_len`]: the ciphertext already authenticated it, and an
/// older sender's power-of-two length opens too.
pub fn unpad(padded: &[u8]) -> Option<&[u8]> {
    let end = padded.iter().rposition(|b| *b != 0)?;
    (padded[end] == 0x80).then(|| &padded[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn p(len: u64) -> u64 {
        padme(len).expect("small")
    }

    #[test]
    fn padme_at_its_edges() {
        // Hand-computed: L → (E, S, z) → padded.
        let table: &[(u64, u64)] = &[
            (0, 0),
            (1, 1),
            (2, 2),
            (7, 7),     // E=2, S=2, z=0: exact
            (9, 10),    // E=3, S=2, z=1
            (17, 18),   // E=4, S=3, z=1
            (33, 36),   // E=5, S=3, z=2
            (129, 144), // E=7, S=3, z=4: the worst case, 11.6%
            (255, 256),
            (256, 256),
            (257, 272),   // E=8, S=4, z=4
            (700, 704),   // E=9, S=4, z=5
            (1025, 1088), // E=10, S=4, z=6
            (65_535, 65_536),
            (65_536, 65_536),
            (65_537, 67_584), // E=16, S=5, z=11
            (131_071, 131_072),
            (131_072, 131_072),
            ((1 << 30) + 1, (1 << 30) + (1 << 25)), // E=30, S=5, z=25
        ];
        for &(len, want) in table {
            assert_eq!(padme(len), Some(want), "padme({len})");
        }
        // Below 16 PADMÉ keeps every bit (z = 0 up to 7, and 2^k − 1 = 7 stays).
        for k in 4..63u32 {
            let two = 1u64 << k;
            assert_eq!(p(two), two, "2^{k} is a PADMÉ length");
            assert_eq!(p(two - 1), two, "2^{k}-1 rounds up to 2^{k}");
            assert!(p(two + 1) > two + 1, "2^{k}+1 rounds up");
        }
        assert_eq!(padme(u64::MAX), None);
        assert_eq!(padme(u64::MAX - 5), None);
        assert_eq!(padme(1 << 63), Some(1 << 63));
    }

    #[test]
    fn padme_never_shrinks_is_idempotent_and_monotone() {
        let mut last = 0;
        for len in 0..=70_000u64 {
            let padded = p(len);
            assert!(padded >= len, "{len}");
            assert_eq!(p(padded), padded, "{len}: a padded length pads to itself");
            assert!(padded >= last, "{len}: monotone");
            last = padded;
        }
        // Sampled up to the largest body and far past it (attachments).
        let mut len = 70_000u64;
        while len < 1 << 40 {
            let padded = p(len);
            assert!(padded >= len && p(padded) == padded, "{len}");
            len = len * 9 / 8 + 7;
        }
    }

    #[test]
    fn overhead_is_under_one_over_log2_and_twelve_percent() {
        // padme(L) − L ≤ 2^(E−S) − 1 < L / 2^S, and 2^S > E.
        let check = |len: u64| {
            let over = p(len) - len;
            let e = u64::from(len.ilog2());
            assert!(over * e < len, "{len}: under 1/⌊log2 L⌋");
            assert!(over * 100 <= 12 * len, "{len}: at most 12%");
            if len >= 256 {
                assert!(over * 16 < len, "{len}: under 1/16 from 256");
            }
            if len >= 1 << 16 {
                assert!(over * 32 < len, "{len}: under 1/32 from 64 KiB");
            }
        };
        (2..=70_000).for_each(check);
        let mut len = 70_000u64;
        while len < 1 << 40 {
            check(len);
            len = len * 9 / 8 + 3;
        }
        // The worst case overall: L = 129 pads to 144.
        let worst = (2..=1 << 16)
            .max_by(|a: &u64, b: &u64| ((p(*a) - a) * b).cmp(&((p(*b) - b) * a)))
            .expect("some");
        assert_eq!(worst, 129);
    }

    #[test]
    fn distinct_lengths_per_power_of_two() {
        // Padded lengths in [2^k, 2^(k+1)) from the definition: 2^S of them, with
        // S = ⌊log2 k⌋ + 1 (hand-checked: 16 for k = 8..15, 32 for k = 16..31).
        let table: [(u32, usize); 10] = [
            (4, 8),
            (7, 8),
            (8, 16),
            (9, 16),
            (10, 16),
            (11, 16),
            (12, 16),
            (15, 16),
            (16, 32),
            (17, 32),
        ];
        for (k, want) in table {
            let (lo, hi) = (1u64 << k, 1u64 << (k + 1));
            let sizes: BTreeSet<u64> = (lo..hi).map(p).filter(|s| *s < hi).collect();
            assert_eq!(sizes.len(), want, "k = {k}");
            // The last step of the range rounds up to the next power of two.
            assert_eq!(p(hi - 1), hi);
        }
    }

    #[test]
    fn bodies_pad_to_padme_with_a_floor() {
        let cases: &[(usize, usize)] = &[
            (0, 256),
            (254, 256),
            (255, 256),
            (256, 272), // 257 → 272
            (257, 272),
            (271, 272),
            (272, 288),
            (511, 512),
            (512, 544),
            (699, 704),
            (700, 704),
            (1023, 1024),
            (1024, 1088),
            (2047, 2048),
            (2048, 2176),
            (65_535, 65_536),
            (65_536, 67_584),
            (MAX_PLAINTEXT - 1, MAX_PADDED),
            (MAX_PLAINTEXT, MAX_PADDED),
        ];
        for &(len, want) in cases {
            let msg: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
            let padded = pad(&msg).expect("fits");
            assert_eq!(padded.len(), want, "{len}");
            assert_eq!(padded_len(len), Some(want));
            assert_eq!(unpad(&padded), Some(&msg[..]), "{len}");
        }
        assert_eq!(padded_len(MAX_PLAINTEXT + 1), None);
        assert_eq!(pad(&[1; MAX_PLAINTEXT + 1]), None);
        assert_eq!(padded_len(usize::MAX), None);
        assert_eq!(p(MAX_PADDED as u64), MAX_PADDED as u64);
    }

    #[test]
    fn every_body_length_pads_within_bounds() {
        for len in 0..=70_000usize {
            let padded = padded_len(len).expect("fits");
            assert!(padded > len, "{len}: room for the marker");
            assert!(padded >= FLOOR);
            if padded > FLOOR {
                // The marker included: at most 12% over the plaintext.
                assert!((padded - len) * 100 <= 12 * len, "{len}");
            }
        }
        let mut len = 70_000;
        while len <= MAX_PLAINTEXT {
            let padded = padded_len(len).expect("fits");
            assert!(padded > len && padded <= MAX_PADDED, "{len}");
            assert!((padded - len) * 100 <= 12 * len, "{len}");
            len += 997;
        }
    }

    #[test]
    fn bad_padding_is_refused() {
        assert_eq!(unpad(&[]), None);
        assert_eq!(unpad(&[0; 16]), None);
        assert_eq!(unpad(&[1, 2, 3, 0, 0]), None);
        assert_eq!(unpad(&[0x80]), Some(&[][..]));
        assert_eq!(unpad(&[1, 0x80, 0, 0]), Some(&[1u8][..]));
    }

    proptest! {
        #[test]
        fn round_trip(msg in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let padded = pad(&msg).expect("fits");
            prop_assert_eq!(padded.len(), padded_len(msg.len()).expect("fits"));
            prop_assert_eq!(padme(padded.len() as u64), Some(padded.len() as u64));
            prop_assert_eq!(unpad(&padded), Some(&msg[..]));
        }

        #[test]
        fn unpad_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = unpad(&bytes);
        }
    }
}
