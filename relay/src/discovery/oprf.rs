//! The relay's OPRF (RFC 9497, ristretto255-SHA512, OPRF mode) through the `voprf`
//! crate, and its key file.
//!
//! The key is 32 bytes (`OprfServer::serialize`) in `<data>/discovery-oprf-key`, mode
//! 0600, written to a temporary file, renamed, and the directory synced, so a crash
//! never leaves half a key. It is never rotated: the relay keeps no numbers, so a new
//! key would mean re-verifying every account. Whoever holds both this file and the
//! tags in `db/` can test every plausible number (about 10^10, a few core-days), so
//! the key lives apart from `db/` and never goes into an export or a backup of `db/`.

use std::fs;
use std::io::Write;
use std::path::Path;

use rand::{CryptoRng, RngCore};
use tern_proto::discovery::{split_output, FilterKey, Tag, OUTPUT_LEN, POINT_LEN};
use voprf::{BlindedElement, OprfServer, Ristretto255};

use super::DiscoveryError;
use crate::error::{Error, Result};

/// The key file's name in the data directory.
pub const KEY_FILE: &str = "discovery-oprf-key";

/// A batch whose every point decoded: what may be charged and evaluated.
pub struct CheckedBatch(Vec<BlindedElement<Ristretto255>>);

impl CheckedBatch {
    /// How many points.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The relay's OPRF key. Its `Debug` never shows the key.
pub struct Oprf {
    server: OprfServer<Ristretto255>,
}

impl std::fmt::Debug for Oprf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Oprf(..)")
    }
}

impl Oprf {
    /// A fresh key from `rng`.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Result<Self> {
        let server = OprfServer::new(rng)
            .map_err(|e| Error::Config(format!("making the OPRF key: {e:?}")))?;
        Ok(Oprf { server })
    }

    /// The key from its 32 bytes; refuses zero and non-canonical scalars.
    pub fn from_key(bytes: &[u8]) -> Result<Self> {
        let server = OprfServer::new_with_key(bytes)
            .map_err(|_| Error::Config(format!("{KEY_FILE} is not a ristretto255 scalar")))?;
        Ok(Oprf { server })
    }

    /// The key in `data_dir`, made with `rng` and written there if there is none.
    /// A key file others may read is refused ([`DiscoveryError::KeyMode`]).
    pub fn load_or_create<R: RngCore + CryptoRng>(data_dir: &Path, rng: &mut R) -> Result<Self> {
        Self::open(data_dir, false, rng)
    }

    /// As [`Oprf::load_or_create`], but when `store_holds_tags` a missing key is
    /// [`DiscoveryError::KeyMissing`] instead of a new key: the relay's start.
    pub fn open<R: RngCore + CryptoRng>(
        data_dir: &Path,
        store_holds_tags: bool,
        rng: &mut R,
    ) -> Result<Self> {
        let path = data_dir.join(KEY_FILE);
        match fs::read(&path) {
            Ok(bytes) => {
                check_mode(&path)?;
                return Self::from_key(&bytes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if store_holds_tags {
            return Err(DiscoveryError::KeyMissing { key: path }.into());
        }
        let oprf = Self::generate(rng)?;
        write_key(data_dir, &oprf.server.serialize())?;
        Ok(oprf)
    }

    /// A number's tag and filter key: the full OPRF on the relay's side, for the
    /// number just verified (its E.164 bytes). The number is not kept.
    pub fn tag_of(&self, number: &[u8]) -> Result<(Tag, FilterKey)> {
        let out = self
            .server
            .evaluate(number)
            .map_err(|_| DiscoveryError::NumberRejected)?;
        let mut bytes = [0u8; OUTPUT_LEN];
        bytes.copy_from_slice(&out);
        Ok(split_output(&bytes))
    }

    /// A 32-byte key for `label`, derived from this OPRF key (HKDF-SHA256, the key
    /// as input, `label` as info): the same on every node holding the key file, and
    /// telling nothing of the OPRF key. Verification keys its limiter and its code
    /// MACs with such keys.
    pub fn derive_key(&self, label: &[u8]) -> zeroize::Zeroizing<[u8; 32]> {
        use zeroize::Zeroize;
        let mut ikm = self.server.serialize();
        let mut out = zeroize::Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's limit (255 × 32): expand cannot fail.
        let _ = hkdf::Hkdf::<sha2::Sha256>::new(None, ikm.as_slice()).expand(label, &mut out[..]);
        ikm.as_mut_slice().zeroize();
        out
    }

    /// Decodes every point of a batch (32 bytes each), before anything is charged:
    /// the first that is not a canonical ristretto255 encoding, or is the identity,
    /// is [`DiscoveryError::InvalidPoint`].
    pub fn check_batch(&self, blinded: &[u8]) -> Result<CheckedBatch, DiscoveryError> {
        if blinded.len() % POINT_LEN != 0 {
            return Err(DiscoveryError::InvalidPoint {
                index: blinded.len() / POINT_LEN,
            });
        }
        blinded
            .chunks_exact(POINT_LEN)
            .enumerate()
            .map(|(index, p)| {
                BlindedElement::deserialize(p).map_err(|_| DiscoveryError::InvalidPoint { index })
            })
            .collect::<Result<_, _>>()
            .map(CheckedBatch)
    }

    /// Evaluates checked points, 32 bytes out per point, in order. CPU-bound: about
    /// 40 µs a point, so callers run it on a blocking thread.
    pub fn evaluate_checked(&self, batch: &CheckedBatch) -> Vec<u8> {
        let mut out = Vec::with_capacity(batch.len() * POINT_LEN);
        for p in &batch.0 {
            out.extend_from_slice(&self.server.blind_evaluate(p).serialize());
        }
        out
    }

    /// [`Oprf::check_batch`] then [`Oprf::evaluate_checked`]: every point is decoded
    /// before any is evaluated.
    pub fn evaluate_batch(&self, blinded: &[u8]) -> Result<Vec<u8>, DiscoveryError> {
        let batch = self.check_batch(blinded)?;
        Ok(self.evaluate_checked(&batch))
    }
}

/// Refuses a key file with any permission for group or others.
fn check_mode(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(DiscoveryError::KeyMode {
                key: path.to_owned(),
                mode,
            }
            .into());
        }
    }
    Ok(())
}

/// Writes the key: a 0600 temporary file, synced, renamed, then the directory synced.
fn write_key(dir: &Path, key: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{KEY_FILE}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(key)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(KEY_FILE))?;
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}
