//! Protocol constants and the default limits a relay starts with.

/// Length of an account id.
pub const ACCOUNT_ID_LEN: usize = 16;
/// Length of a message id.
pub const MESSAGE_ID_LEN: usize = 16;
/// Length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Length of the TLS exporter value a device signs to authenticate.
pub const EXPORTER_LEN: usize = 32;

/// Default largest envelope payload a relay accepts: 256 KiB.
pub const DEFAULT_MAX_ENVELOPE: usize = 256 * 1024;
/// Default largest frame: room for a batch of envelopes plus framing.
pub const DEFAULT_MAX_FRAME: usize = 4 * 1024 * 1024;
/// No relay keeps a message longer than this: 30 days, in milliseconds.
pub const MAX_MESSAGE_TTL_MS: u64 = 30 * 24 * 60 * 60 * 1000;
/// Length of an X25519 public key (identity agreement keys and prekeys).
pub const AGREEMENT_KEY_LEN: usize = 32;
/// Length of a blob id: the SHA-256 of the blob's bytes.
pub const BLOB_ID_LEN: usize = 32;
/// Length of a delivery token hash: the SHA-256 of the token.
pub const TOKEN_HASH_LEN: usize = 32;
/// Most sequence numbers in one ack; a relay refuses a longer ack with `TOO_LARGE`.
pub const MAX_ACK_SEQS: usize = 4096;
/// Length of a provisioning slot id (chosen by the new device).
pub const SLOT_ID_LEN: usize = 16;
/// Length of a provisioning reader secret, and of its SHA-256.
pub const READER_SECRET_LEN: usize = 32;
/// Smallest link payload: an HPKE encapsulated key (32) and an AEAD tag (16).
pub const MIN_LINK_PAYLOAD: usize = 48;
/// Largest link payload a slot holds: 64 KiB.
pub const MAX_LINK_PAYLOAD: usize = 64 * 1024;
/// How long a provisioning slot lives: 10 minutes.
pub const PROVISIONING_TTL_MS: u64 = 10 * 60 * 1000;
/// Length of a group handle (chosen by the group's creator).
pub const GROUP_HANDLE_LEN: usize = 16;
/// Length of a group commit's id (chosen by the committer).
pub const COMMIT_ID_LEN: usize = 16;
/// Length of a group epoch token, and of its SHA-256.
pub const EPOCH_TOKEN_LEN: usize = 32;
/// Largest key package a relay stores: 4 KiB.
pub const MAX_KEY_PACKAGE: usize = 4096;
/// Most key packages in one publish, and most one-time packages a relay keeps per
/// device.
pub const MAX_KEY_PACKAGES_PER_PUBLISH: usize = 200;
/// Most recipient devices of one multi-recipient send.
pub const MAX_RECIPIENT_DEVICES: usize = 1000;
/// Most sends in one group commit: the commit, then the welcome.
pub const MAX_COMMIT_SENDS: usize = 2;
/// Longest push URL (a UnifiedPush endpoint or a gateway URL), bytes: the UnifiedPush
/// server specification's bound on endpoints.
pub const MAX_PUSH_URL: usize = 1000;
/// Longest device token a push gateway target carries, bytes (APNs tokens are 64 hex
/// digits, FCM registration tokens about 160 characters).
pub const MAX_PUSH_TOKEN: usize = 512;
