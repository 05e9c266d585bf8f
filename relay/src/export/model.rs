//! The parts of an account export that are written whole (serde); the writer in
//! `export/mod.rs` puts them together and streams the queued messages one by one.
//! The document's shape is `relay/schema/account-export-v1.schema.json`.

use serde::Serialize;

/// A device's published keys: what is stored, not the keys themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Prekeys {
    /// Whether an identity agreement key is stored.
    pub identity_dh: bool,
    /// The id of the stored signed prekey.
    pub signed_prekey_id: Option<u32>,
    /// One-time prekeys left.
    pub one_time: u64,
}

/// A device's MLS key packages, as counts (the packages are not exported).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyPackages {
    /// One-time key packages left.
    pub one_time: u64,
    /// Whether a last-resort key package is stored.
    pub last_resort: bool,
}

/// A device's push target, whole: what the relay holds is the user's to see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PushTargetExport {
    /// A UnifiedPush endpoint.
    UnifiedPush {
        /// The endpoint URL.
        endpoint: String,
    },
    /// An app publisher's gateway and the device's token there.
    Gateway {
        /// The gateway URL.
        url: String,
        /// The device's token.
        device_token: String,
    },
}

impl From<tern_proto::PushTarget> for PushTargetExport {
    fn from(t: tern_proto::PushTarget) -> Self {
        match t {
            tern_proto::PushTarget::UnifiedPush { endpoint } => {
                PushTargetExport::UnifiedPush { endpoint }
            }
            tern_proto::PushTarget::Gateway { url, device_token } => {
                PushTargetExport::Gateway { url, device_token }
            }
        }
    }
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueItem {
    /// Its place in the device's mailbox, in decimal: a string because seqs pass
    /// 2^53, past which JSON readers that use doubles lose digits.
    pub seq: String,
    /// The sender's id for it (hex, 32 digits).
    pub message_id: String,
    /// Ciphertext length.
    pub bytes: u64,
    /// When the relay accepted it (Unix ms).
    pub accepted_at_ms: u64,
    /// When it expires (Unix ms).
    pub expires_at_ms: u64,
    /// The ciphertext (base64), only when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext: Option<String>,
}

/// A media quota charge: bytes uploaded on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Charge {
    /// Days since the Unix epoch.
    pub utc_day: u64,
    /// Bytes charged.
    pub bytes: u64,
}

/// An upload not yet finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Upload {
    /// The blob id (hex, 64 digits).
    pub blob_id: String,
    /// The size announced.
    pub size: u64,
    /// When it started (Unix ms).
    pub started_at_ms: u64,
    /// When bytes last arrived (Unix ms).
    pub last_progress_ms: u64,
}

/// The account's media: charges and unfinished uploads. Finished blobs name no
/// account on the relay, so `owned_blobs` is always empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Media {
    /// Charges not yet expired, by day.
    pub charges: Vec<Charge>,
    /// Uploads in progress.
    pub uploads_in_progress: Vec<Upload>,
    /// Always empty (see the type's docs).
    pub owned_blobs: Vec<String>,
}

/// The account's discovery tag and setting (never a number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Discovery {
    /// The tag (hex, 32 digits): an OPRF output, useless without the relay's key.
    pub tag: String,
    /// Whether lookups find the account and the published filter holds its key.
    pub discoverable: bool,
    /// The UTC day (since the Unix epoch) the number was verified.
    pub verified_at_day: u64,
}

/// Phone verification state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// The UTC day a number was verified; `None` without a verified number.
    pub verified_at_day: Option<u64>,
    /// Whether a verification session is open (sessions are held in memory only).
    pub pending: bool,
    /// The open session, `None` without one.
    pub session: Option<Session>,
}

/// An open phone verification session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Session {
    /// When its code expires (Unix ms).
    pub expires_at_ms: u64,
    /// Code checks it has left.
    pub attempts_left: u32,
}

/// A stored bucket, as the time it is full again; `None` when it is full now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EvaluationBuckets {
    /// The account's bucket (Unix ms).
    pub account_full_at_ms: Option<u64>,
    /// The bucket of the account's verified number (Unix ms).
    pub number_full_at_ms: Option<u64>,
}

/// Rate-limit state the relay stores for the account (media charges are under
/// `media`; other limits are kept in memory only and expire on their own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RateLimits {
    /// The discovery evaluation buckets.
    pub discovery_evaluations: EvaluationBuckets,
}
