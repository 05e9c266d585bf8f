//! Mailbox limits. A send that would break one is refused whole, and refusing it
//! changes nothing already stored.

use crate::error::{Error, Result};
use crate::store::Usage;

/// Per-device and per-envelope limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest envelope payload.
    pub max_envelope_bytes: usize,
    /// Most envelopes in one send.
    pub max_batch: usize,
    /// Most messages queued for one device.
    pub max_queued_messages: u64,
    /// Most payload bytes queued for one device.
    pub max_queued_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_envelope_bytes: tern_proto::limits::DEFAULT_MAX_ENVELOPE,
            max_batch: 1024,
            max_queued_messages: 20_000,
            max_queued_bytes: 256 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// Checks a batch on its own: count and each envelope's size.
    pub fn check_batch<'a>(&self, sizes: impl ExactSizeIterator<Item = usize> + 'a) -> Result<()> {
        let count = sizes.len();
        if count == 0 {
            return Err(Error::BadRequest(
                "a send needs at least one envelope".into(),
            ));
        }
        if count > self.max_batch {
            return Err(Error::TooLarge {
                what: "batch",
                size: count,
                max: self.max_batch,
            });
        }
        for size in sizes {
            if size > self.max_envelope_bytes {
                return Err(Error::TooLarge {
                    what: "envelope",
                    size,
                    max: self.max_envelope_bytes,
                });
            }
        }
        Ok(())
    }

    /// Checks that a mailbox holding `usage` can take `count` more messages of `bytes`.
    pub fn check_enqueue(&self, usage: Usage, count: u64, bytes: u64) -> Result<()> {
        if usage.messages.saturating_add(count) > self.max_queued_messages {
            return Err(Error::MailboxFull("too many queued messages"));
        }
        if usage.bytes.saturating_add(bytes) > self.max_queued_bytes {
            return Err(Error::MailboxFull("too many queued bytes"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_envelope_bytes: 100,
            max_batch: 3,
            max_queued_messages: 5,
            max_queued_bytes: 250,
        }
    }

    #[test]
    fn batch_rules() {
        let l = limits();
        assert!(l.check_batch([100, 1, 0].into_iter()).is_ok());
        assert!(matches!(
            l.check_batch([101].into_iter()),
            Err(Error::TooLarge {
                what: "envelope",
                size: 101,
                max: 100
            })
        ));
        assert!(matches!(
            l.check_batch([1, 1, 1, 1].into_iter()),
            Err(Error::TooLarge { what: "batch", .. })
        ));
        assert!(matches!(
            l.check_batch([].into_iter()),
            Err(Error::BadRequest(_))
        ));
    }

    #[test]
    fn mailbox_rules() {
        let l = limits();
        let usage = Usage {
            messages: 4,
            bytes: 200,
        };
        assert!(
            l.check_enqueue(usage, 1, 50).is_ok(),
            "exactly at both limits"
        );
        assert!(matches!(
            l.check_enqueue(usage, 2, 0),
            Err(Error::MailboxFull(_))
        ));
        assert!(matches!(
            l.check_enqueue(usage, 1, 51),
            Err(Error::MailboxFull(_))
        ));
        let huge = Usage {
            messages: u64::MAX,
            bytes: u64::MAX,
        };
        assert!(l.check_enqueue(huge, 1, 1).is_err(), "no overflow");
    }
}
