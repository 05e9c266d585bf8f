//! The attachment pointer: what a message carries so that its recipient can fetch
//! and decrypt an attachment.

use prost::Message;
use tern_proto::e2e;

use crate::crypto::attachment;
use crate::error::{Error, Result};

/// Everything needed to fetch and decrypt an attachment. Travels inside end-to-end
/// encrypted messages only: it holds the attachment's key.
#[derive(Clone, PartialEq, Eq)]
pub struct AttachmentPointer {
    /// SHA-256 of the encrypted blob: its name on the relay.
    pub blob_id: [u8; 32],
    /// The attachment's key.
    pub key: [u8; 32],
    /// Plaintext bytes: the file's exact size, which the relay never sees.
    pub size: u64,
    /// Encrypted bytes (what the relay stores): the file padded to its PADMÉ length,
    /// then encrypted.
    pub sealed_size: u64,
    /// SHA-256 of the plaintext, checked after every download.
    pub digest: [u8; 32],
    /// For the app, e.g. "image/jpeg".
    pub content_type: String,
    /// For the app.
    pub file_name: String,
}

impl std::fmt::Debug for AttachmentPointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachmentPointer")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl AttachmentPointer {
    /// The pointer's wire form (`tern.e2e.v1.AttachmentPointer`).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_wire().encode_to_vec()
    }

    /// The pointer as its protobuf message.
    pub(crate) fn to_wire(&self) -> e2e::AttachmentPointer {
        e2e::AttachmentPointer {
            blob_id: self.blob_id.to_vec().into(),
            key: self.key.to_vec().into(),
            size: self.size,
            sealed_size: self.sealed_size,
            digest: self.digest.to_vec().into(),
            content_type: self.content_type.clone(),
            file_name: self.file_name.clone(),
        }
    }

    /// Parses [`AttachmentPointer::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = || Error::Media("not an attachment pointer".into());
        let p = e2e::AttachmentPointer::decode(bytes).map_err(|_| bad())?;
        // Padded to the size's PADMÉ length, or (a blob from before attachments were
        // padded) not at all.
        let sealed = Some(p.sealed_size);
        if attachment::sealed_len(p.size) != sealed && attachment::stream_len(p.size) != sealed {
            return Err(bad());
        }
        Ok(AttachmentPointer {
            blob_id: p.blob_id[..].try_into().map_err(|_| bad())?,
            key: p.key[..].try_into().map_err(|_| bad())?,
            size: p.size,
            sealed_size: p.sealed_size,
            digest: p.digest[..].try_into().map_err(|_| bad())?,
            content_type: p.content_type,
            file_name: p.file_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_round_trip_and_hide_their_key() {
        let p = AttachmentPointer {
            blob_id: [1; 32],
            key: [2; 32],
            size: 10,
            sealed_size: attachment::sealed_len(10).expect("small"),
            digest: [3; 32],
            content_type: "text/plain".into(),
            file_name: "a.txt".into(),
        };
        assert_eq!(
            AttachmentPointer::from_bytes(&p.to_bytes()).expect("parses"),
            p
        );
        assert!(!format!("{p:?}").contains("2, 2"));
        let mut wrong = p.clone();
        wrong.sealed_size += 1;
        assert!(AttachmentPointer::from_bytes(&wrong.to_bytes()).is_err());
        // 1,000 bytes pad to 1,024: the unpadded length of an older blob still parses,
        // nothing in between does.
        let mut padded = p.clone();
        padded.size = 1000;
        padded.sealed_size = attachment::sealed_len(1000).expect("small");
        assert_eq!(padded.sealed_size, 8 + 1024 + 16);
        let mut older = padded.clone();
        older.sealed_size = 8 + 1000 + 16;
        for ok in [&padded, &older] {
            assert_eq!(
                &AttachmentPointer::from_bytes(&ok.to_bytes()).expect("parses"),
                ok
            );
        }
        let mut between = padded.clone();
        between.sealed_size -= 1;
        assert!(AttachmentPointer::from_bytes(&between.to_bytes()).is_err());
        assert!(AttachmentPointer::from_bytes(&[0xff, 0xff]).is_err());
    }
}
