//! Safety numbers: a 60-digit number two users compare (read aloud, or by QR code) to
//! check that each holds the other's real identity key, so that a relay that swapped
//! keys would be caught.
//!
//! Built like Signal's numeric fingerprint: for each side, SHA-512 iterated 5200 times
//! over a version, the identity key and the account id, the first 30 bytes read as six
//! 5-byte numbers mod 100000, giving 30 digits; the two halves are ordered so both
//! users see the same 60 digits.

use sha2::{Digest, Sha512};
use tern_proto::AccountId;

const VERSION: u16 = 0;
const ITERATIONS: usize = 5200;

fn half(identity_key: &[u8; 32], account: &AccountId) -> String {
    let mut hash = Sha512::new()
        .chain_update(VERSION.to_be_bytes())
        .chain_update(identity_key)
        .chain_update(account.as_bytes())
        .finalize();
    for _ in 1..ITERATIONS {
        hash = Sha512::new()
            .chain_update(hash)
            .chain_update(identity_key)
            .finalize();
    }
    hash[..30]
        .chunks_exact(5)
        .map(|c| {
            let n = c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", n % 100_000)
        })
        .collect()
}

/// The safety number between two accounts: the same 60 digits on both sides.
pub fn safety_number(ours: (&[u8; 32], &AccountId), theirs: (&[u8; 32], &AccountId)) -> String {
    let (a, b) = (half(ours.0, ours.1), half(theirs.0, theirs.1));
    if a <= b {
        a + &b
    } else {
        b + &a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_see_the_same_sixty_digits() {
        let (alice, bob) = (
            ([1u8; 32], AccountId([1; 16])),
            ([2u8; 32], AccountId([2; 16])),
        );
        let from_alice = safety_number((&alice.0, &alice.1), (&bob.0, &bob.1));
        let from_bob = safety_number((&bob.0, &bob.1), (&alice.0, &alice.1));
        assert_eq!(from_alice, from_bob);
        assert_eq!(from_alice.len(), 60);
        assert!(from_alice.bytes().all(|c| c.is_ascii_digit()));
    }

    #[test]
    fn a_changed_key_changes_the_number() {
        let (alice, bob) = (
            ([1u8; 32], AccountId([1; 16])),
            ([2u8; 32], AccountId([2; 16])),
        );
        let before = safety_number((&alice.0, &alice.1), (&bob.0, &bob.1));
        let after = safety_number((&alice.0, &alice.1), (&[3u8; 32], &bob.1));
        assert_ne!(before, after);
        assert!(
            before[..30] == after[..30] || before[30..] == after[30..],
            "one half stays"
        );
    }
}
