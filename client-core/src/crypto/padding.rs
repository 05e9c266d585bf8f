//! Padding plaintexts to size buckets before encryption, so the relay and the network
//! see which bucket a message falls in, not its length.
//!
//! The padding is ISO/IEC 7816-4 style: a 0x80 byte, then zeros up to the bucket
//! size. Buckets double from 256 bytes to 128 KiB; larger content goes as an
//! attachment.

/// Bucket sizes, smallest first.
pub const BUCKETS: [usize; 10] = [
    256,
    512,
    1024,
    2048,
    4096,
    8192,
    16 * 1024,
    32 * 1024,
    64 * 1024,
    128 * 1024,
];

/// The largest plaintext that fits the largest bucket.
pub const MAX_PLAINTEXT: usize = BUCKETS[BUCKETS.len() - 1] - 1;

/// Pads `msg` to its bucket; `None` if it is longer than [`MAX_PLAINTEXT`].
pub fn pad(msg: &[u8]) -> Option<Vec<u8>> {
    let bucket = *BUCKETS.iter().find(|b| **b > msg.len())?;
    let mut out = Vec::with_capacity(bucket);
    out.extend_from_slice(msg);
    out.push(0x80);
    out.resize(bucket, 0);
    Some(out)
}

/// Removes padding; `None` if `padded` is not validly padded.
pub fn unpad(padded: &[u8]) -> Option<&[u8]> {
    let end = padded.iter().rposition(|b| *b != 0)?;
    (padded[end] == 0x80).then(|| &padded[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lengths_land_in_buckets() {
        assert_eq!(pad(b"").map(|p| p.len()), Some(256));
        assert_eq!(pad(&[1; 255]).map(|p| p.len()), Some(256));
        assert_eq!(pad(&[1; 256]).map(|p| p.len()), Some(512));
        assert_eq!(pad(&[1; MAX_PLAINTEXT]).map(|p| p.len()), Some(128 * 1024));
        assert_eq!(pad(&[1; MAX_PLAINTEXT + 1]), None);
    }

    #[test]
    fn bad_padding_is_refused() {
        assert_eq!(unpad(&[]), None);
        assert_eq!(unpad(&[0; 16]), None);
        assert_eq!(unpad(&[1, 2, 3, 0, 0]), None);
        assert_eq!(unpad(&[1, 0x80, 0, 0]), Some(&[1u8][..]));
    }

    proptest! {
        #[test]
        fn round_trip(msg in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let padded = pad(&msg).expect("fits");
            prop_assert!(BUCKETS.contains(&padded.len()));
            prop_assert_eq!(unpad(&padded), Some(&msg[..]));
        }
    }
}
