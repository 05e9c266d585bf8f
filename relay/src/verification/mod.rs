//! Phone verification (issue 13, item 1): an account proves it holds an E.164
//! number by returning a 6-digit code the relay sent to it, and the relay keeps only
//! the number's discovery tag ([`Discovery::attach_verified`]), never the number.
//!
//! - Sessions live behind [`VerificationSessions`] (`session.rs`): in memory for an
//!   embedded relay, in PostgreSQL for nodes sharing a database. The start evaluates
//!   the number's tag and sends the code; from then on the session holds the tag,
//!   never the number, and an HMAC of the code, never the code.
//! - Codes are uniform in `0..10^6` (OS randomness), valid `code_ttl` (10 minutes),
//!   at most `max_attempts` (5) tries, compared (as MACs) in constant time.
//! - Starts are limited per address prefix (IPv4, IPv6 /64), per account, and per
//!   number, charged to all three or none, behind [`StartLimiter`] (`limits.rs`; in
//!   memory, or shared by the nodes in PostgreSQL). The number's and the prefix's
//!   limiter keys are HMAC-SHA256s under a key derived from the OPRF key file (HKDF,
//!   label `tern verification limiter v1`), so every node holding the file derives
//!   the same keys, and even the limiter holds no number or address. (Before #15
//!   the key was drawn at random per process.)
//! - A deleted account (tombstoned) can neither start nor check, and a check holds
//!   the tombstones' write guard across the attach, so a deletion cannot slip
//!   between its check and the tag it writes.
//! - Codes go out through a [`Verifier`]: [`webhook::WebhookVerifier`] or, for
//!   development, [`file::FileVerifier`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use rand::{Rng, RngCore};
use sha2::Sha256;
use tern_platform::clock::Clock;
use tern_proto::{AccountId, Code, VerificationId, E164};
use tracing::debug;
use zeroize::Zeroizing;

use crate::config::{VerificationConfig, VerifierKind};
use crate::core::rate::AddressPrefix;
use crate::deletion::Tombstones;
use crate::discovery::Discovery;
use crate::error::{Error, Result};

pub mod file;
mod limits;
pub mod session;
#[cfg(test)]
mod tests;
pub mod webhook;

use limits::StartLimits;
pub use limits::{StartKeys, StartLimiter};
pub use session::{Checked, MemorySessions, StoredSession, VerificationSessions};

/// What [`Verifier::send_code`] returns.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<(), VerifierError>> + Send + 'a>>;

/// Delivers codes to numbers.
pub trait Verifier: Send + Sync + 'static {
    /// Delivers `code` for `number`; the relay forgets `number` when the session ends.
    fn send_code<'a>(
        &'a self,
        number: &'a E164,
        code: &'a Code,
        session: &'a VerificationId,
    ) -> SendFuture<'a>;

    /// The session ended (verified, closed, replaced, expired): forget what was kept
    /// for it.
    fn session_ended(&self, _session: &VerificationId) {}
}

/// Why a code could not be sent. Never carries the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifierError {
    /// The gateway answered with this non-2xx status.
    #[error("the verifier refused the code (status {0})")]
    Rejected(u16),
    /// The gateway could not be reached.
    #[error("the verifier is unreachable")]
    Unreachable,
    /// The gateway did not answer in time.
    #[error("the verifier timed out")]
    Timeout,
}

/// Why a check was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerificationError {
    /// No such session for this account (never started, closed, or verified).
    #[error("no such verification session")]
    NotFound,
    /// The code expired; start again.
    #[error("the verification code expired")]
    Expired,
    /// The code is wrong; this many tries remain (0: the session is closed).
    #[error("wrong code")]
    WrongCode {
        /// Tries left.
        attempts_left: u32,
    },
    /// The verifier could not deliver the code; `UNAVAILABLE`, retry after
    /// `retry_after_ms` (an hour when the gateway refused the request itself).
    #[error("the verifier could not send a code")]
    NotSent {
        /// When a retry may succeed.
        retry_after_ms: u64,
    },
}

impl From<VerifierError> for VerificationError {
    fn from(e: VerifierError) -> Self {
        let retry_after_ms = match e {
            // The gateway refused this request (a destination it does not serve,
            // its credentials): soon again would fail the same way.
            VerifierError::Rejected(s) if (400..500).contains(&s) && s != 429 => 3_600_000,
            VerifierError::Rejected(_) => 60_000,
            VerifierError::Unreachable | VerifierError::Timeout => 30_000,
        };
        VerificationError::NotSent { retry_after_ms }
    }
}

/// Keys remembered per start limiter.
const MAX_LIMIT_KEYS: usize = 1_000_000;

/// Sessions ended per sweep at most.
const SWEEP_MAX: usize = 10_000;

/// The HKDF label of the start limiter's key.
pub const LIMITER_KEY_LABEL: &[u8] = b"tern verification limiter v1";

/// The HKDF label of the key of the codes' MACs.
pub const CODE_KEY_LABEL: &[u8] = b"tern verification code v1";

/// The verification service.
pub struct Verification {
    verifier: Option<Arc<dyn Verifier>>,
    sessions: Arc<dyn VerificationSessions>,
    discovery: Arc<Discovery>,
    clock: Arc<dyn Clock>,
    code_ttl_ms: u64,
    max_attempts: u32,
    limits: Arc<dyn StartLimiter>,
    tombstones: Option<Arc<Tombstones>>,
    /// Keys the number's and the prefix's limiter keys; derived from the OPRF key.
    limiter_key: Zeroizing<[u8; 32]>,
    /// Keys the codes' MACs; derived from the OPRF key.
    code_key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Verification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verification")
            .field("enabled", &self.verifier.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds the verifier `config` names (`None` for `"none"`).
pub fn verifier_from_config(
    config: &VerificationConfig,
    data_dir: &std::path::Path,
) -> Result<Option<Arc<dyn Verifier>>> {
    Ok(match config.verifier {
        VerifierKind::None => None,
        VerifierKind::Webhook => {
            let w = (config.webhook.as_ref())
                .ok_or_else(|| Error::Config("verification.webhook is missing".into()))?;
            Some(Arc::new(webhook::WebhookVerifier::new(w)?))
        }
        VerifierKind::DevFile => {
            if !config.allow_dev_verifier {
                return Err(Error::Config(
                    "verification.verifier = \"dev-file\" is for development: set \
                     verification.allow_dev_verifier = true or pass --allow-dev-verifier"
                        .into(),
                ));
            }
            Some(Arc::new(file::FileVerifier::new(data_dir)?))
        }
    })
}

impl Verification {
    /// The service; `verifier` `None` answers every start `UNAVAILABLE`.
    pub fn new(
        config: &VerificationConfig,
        verifier: Option<Arc<dyn Verifier>>,
        discovery: Arc<Discovery>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Verification {
            verifier,
            sessions: Arc::new(MemorySessions::default()),
            limiter_key: discovery.oprf().derive_key(LIMITER_KEY_LABEL),
            code_key: discovery.oprf().derive_key(CODE_KEY_LABEL),
            discovery,
            code_ttl_ms: u64::try_from(config.code_ttl.as_millis()).unwrap_or(u64::MAX),
            max_attempts: config.max_attempts,
            limits: Arc::new(StartLimits::new(
                config.starts_per_prefix,
                config.starts_per_account,
                config.starts_per_number,
                MAX_LIMIT_KEYS,
            )),
            tombstones: None,
            clock,
        }
    }

    /// Keeps sessions in `sessions` instead of memory (relay nodes sharing a
    /// database: `Arc<PgBackend>`).
    pub fn with_sessions(mut self, sessions: Arc<dyn VerificationSessions>) -> Self {
        self.sessions = sessions;
        self
    }

    /// Charges starts to `limits` instead of this process's memory (relay nodes
    /// sharing a database: `store::pg::PgStartLimits`).
    pub fn with_start_limiter(mut self, limits: Arc<dyn StartLimiter>) -> Self {
        self.limits = limits;
        self
    }

    /// Refuses deleted accounts (`UNAUTHORIZED`), as the relay's other services do.
    pub fn with_tombstones(mut self, tombstones: Arc<Tombstones>) -> Self {
        self.tombstones = Some(tombstones);
        self
    }

    fn deleted(&self, account: &AccountId) -> bool {
        self.tombstones
            .as_ref()
            .is_some_and(|t| t.contains(account))
    }

    /// HMAC-SHA256 under `key` of `parts` (each after its length, so no two inputs
    /// run together).
    fn mac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
        let mut out = [0u8; 32];
        if let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key[..]) {
            for p in parts {
                mac.update(&u64::try_from(p.len()).unwrap_or(u64::MAX).to_le_bytes());
                mac.update(p);
            }
            out.copy_from_slice(&mac.finalize().into_bytes());
        }
        out
    }

    /// The per-number limiter's key: HMAC-SHA256(limiter key, number), 16 bytes.
    fn number_limit_key(&self, number: &E164) -> [u8; 16] {
        let mut out = [0u8; 16];
        out.copy_from_slice(&Self::mac(&self.limiter_key, &[b"number", number.as_bytes()])[..16]);
        out
    }

    /// The per-prefix limiter's key in a shared limiter: an HMAC, not the address.
    fn prefix_limit_key(&self, prefix: &AddressPrefix) -> [u8; 16] {
        let bytes = match prefix {
            AddressPrefix::V4(p) => [&[4u8][..], &p.to_be_bytes()[..]].concat(),
            AddressPrefix::V6(p) => [&[6u8][..], &p.to_be_bytes()[..]].concat(),
        };
        let mut out = [0u8; 16];
        out.copy_from_slice(&Self::mac(&self.limiter_key, &[b"prefix", &bytes])[..16]);
        out
    }

    /// What a session keeps of its code: HMAC-SHA256(code key, session id ‖ code).
    fn code_mac(&self, id: &VerificationId, code: &Code) -> [u8; 32] {
        Self::mac(&self.code_key, &[&id.0[..], &code.as_bytes()[..]])
    }

    /// Starts a session for `account` from `prefix`: refuses a deleted account,
    /// charges the start limits (prefix, account, number: all or none), replaces the account's earlier session, and sends a new code.
    /// Returns the session and when its code expires (Unix ms).
    pub async fn start(
        &self,
        account: &AccountId,
        prefix: AddressPrefix,
        number: E164,
    ) -> Result<(VerificationId, u64)> {
        let Some(verifier) = self.verifier.clone() else {
            return Err(Error::Unavailable("phone verification is not offered"));
        };
        if self.deleted(account) {
            return Err(Error::Unauthorized);
        }
        let now = self.clock.now();
        let keys = StartKeys {
            prefix,
            prefix_key: self.prefix_limit_key(&prefix),
            account: *account,
            number_key: self.number_limit_key(&number),
        };
        self.limits.charge(&keys, now)?;
        // The tag now, so that the session never holds the number (~0.1 ms of CPU).
        let (tag, key) = self.discovery.oprf().tag_of(number.as_bytes())?;
        let (id, code) = {
            let mut rng = rand::rngs::OsRng;
            let mut id = [0u8; 16];
            rng.fill_bytes(&mut id);
            let code = Code::from_number(rng.gen_range(0..1_000_000))
                .ok_or(Error::Unavailable("no code"))?;
            (VerificationId(id), code)
        };
        let expires_at = self.clock.now().saturating_add(self.code_ttl_ms);
        let replaced = self.sessions.open(
            &id,
            &StoredSession {
                account: *account,
                tag,
                key,
                code_mac: self.code_mac(&id, &code),
                expires_at,
                attempts_left: self.max_attempts,
            },
        )?;
        if let Some(old) = replaced {
            verifier.session_ended(&old);
        }
        let sent = verifier.send_code(&number, &code, &id).await;
        drop(number);
        if let Err(e) = sent {
            self.sessions.remove(&id)?;
            verifier.session_ended(&id);
            debug!(error = %e, "verification code not sent");
            return Err(VerificationError::from(e).into());
        }
        Ok((id, expires_at))
    }

    /// Checks `code` for `account`'s session. Right: the number's tag is attached to
    /// the account (durably, before this returns), discoverable as `discoverable`
    /// says (`None`: `discovery.default_discoverable`), the session ends, and the
    /// answer is whether the account is now discoverable. Wrong: `WRONG_CODE` with the tries
    /// left; an account's existing tag is untouched by any failure. A deleted
    /// account is `UNAUTHORIZED`, and no deletion lands between that check and the
    /// tag's write.
    pub async fn check(
        &self,
        account: &AccountId,
        session: &VerificationId,
        code: &Code,
        discoverable: Option<bool>,
    ) -> Result<bool> {
        if self.deleted(account) {
            return Err(Error::Unauthorized);
        }
        let now = self.clock.now();
        let checked =
            (self.sessions).check(session, account, &self.code_mac(session, code), now)?;
        let (tag, key) = match checked {
            Checked::Verified { tag, key } => (tag, key),
            Checked::Wrong { attempts_left } => {
                if attempts_left == 0 {
                    self.ended(session);
                }
                return Err(VerificationError::WrongCode { attempts_left }.into());
            }
            Checked::NotFound => return Err(VerificationError::NotFound.into()),
            Checked::Expired => {
                self.ended(session);
                return Err(VerificationError::Expired.into());
            }
        };
        self.ended(session);
        let discovery = self.discovery.clone();
        let tombstones = self.tombstones.clone();
        let account = *account;
        // attach_verified_as flushes the tag store: keep the fsync off the runtime.
        let discoverable = tokio::task::spawn_blocking(move || -> Result<bool> {
            // Held across the write: a deletion marks the account only after it, and
            // its detach then removes the tag.
            let live = match &tombstones {
                Some(t) => Some(t.live(&account).ok_or(Error::Unauthorized)?),
                None => None,
            };
            let moved = discovery.attach_tag_as(&account, &tag, key, discoverable)?;
            drop(live);
            if moved.is_some() {
                debug!("a verified number moved from another account");
            }
            Ok(discovery
                .store()
                .of_account(&account)?
                .is_some_and(|(_, rec)| rec.discoverable))
        })
        .await
        .map_err(|_| Error::Unavailable("verification interrupted"))??;
        Ok(discoverable)
    }

    fn ended(&self, session: &VerificationId) {
        if let Some(v) = &self.verifier {
            v.session_ended(session);
        }
    }

    /// Drops expired sessions (at most 10,000 a call) and forgets refilled limiter
    /// keys; returns how many sessions ended. With shared sessions any node may
    /// sweep: two sweeping at once end each session once.
    pub fn sweep(&self) -> Result<usize> {
        let expired = self.sessions.sweep(self.clock.now(), SWEEP_MAX)?;
        for id in &expired {
            self.ended(id);
        }
        self.limits.sweep(self.clock.now())?;
        Ok(expired.len())
    }

    /// Ends the account's open session, if any, and forgets its start bucket
    /// (account deletion).
    pub fn forget_account(&self, account: &AccountId) -> Result<()> {
        let removed = self.sessions.remove_account(account)?;
        if let Some(id) = removed {
            self.ended(&id);
        }
        self.limits.forget_account(account)
    }

    /// Whether the account has a start bucket (for tests).
    #[cfg(test)]
    pub(crate) fn holds_start_limit(&self, account: &AccountId) -> bool {
        self.limits.holds_account(account)
    }

    /// The discovery service verified numbers attach their tags to.
    pub fn discovery(&self) -> &Arc<Discovery> {
        &self.discovery
    }

    /// The account's open session: when its code expires and the tries left.
    pub fn pending(&self, account: &AccountId) -> Result<Option<(u64, u32)>> {
        Ok(self.sessions.of_account(account)?)
    }

    /// Open sessions.
    pub fn open_sessions(&self) -> Result<usize> {
        Ok(self.sessions.count()?)
    }
}

/// Sweeps every `interval` until `shutdown`.
pub async fn sweep_loop(
    verification: Arc<Verification>,
    interval: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = verification.sweep() {
                    debug!(error = %e, "verification sweep failed; the next one retries");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}
