//! Records in sled, encrypted at rest with a key the app supplies.
//!
//! On disk, a record's key is its namespace byte and the first 16 bytes of
//! HMAC-SHA256(index key, namespace || key), so contact ids never appear in clear and
//! scanning a namespace is a prefix scan. The value is a random 12-byte nonce and
//! ChaCha20-Poly1305(value key, nonce, key length || key || value) with the on-disk key
//! as associated data, so a record cannot be moved to another key unnoticed. Both keys
//! come from the app's storage key through HKDF-SHA256.

use std::path::Path;

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{KvStore, Namespace, Op, StoreError, StoreResult};

const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 12;

/// A [`KvStore`] in a sled database, encrypted at rest.
pub struct SledKv {
    db: sled::Db,
    tree: sled::Tree,
    cipher: ChaCha20Poly1305,
    index_key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for SledKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledKv").finish_non_exhaustive()
    }
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn is_lock_conflict(e: &std::io::Error) -> bool {
    e.to_string().contains("could not acquire lock")
}

impl SledKv {
    /// Opens (or creates) the store in `dir`, encrypted under `storage_key`, which the
    /// app keeps outside this store (the platform keystore, say). The wrong key is
    /// detected on the first read: records fail with [`StoreError::Corrupt`].
    ///
    /// A store closed a moment ago may still be locked by sled's background flusher
    /// (it lets go asynchronously); opening waits up to a second for it.
    pub fn open(dir: &Path, storage_key: &[u8; 32]) -> StoreResult<Self> {
        let config = sled::Config::new().path(dir).cache_capacity(16 << 20);
        let mut attempts = 0;
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e)) if attempts < 50 && is_lock_conflict(&e) => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(backend(e)),
            }
        };
        let tree = db.open_tree("device").map_err(backend)?;
        let hk = Hkdf::<Sha256>::new(Some(b"tern device store v1"), storage_key);
        let mut value_key = Zeroizing::new([0u8; 32]);
        let mut index_key = Zeroizing::new([0u8; 32]);
        hk.expand(b"value encryption", &mut value_key[..])
            .and_then(|()| hk.expand(b"key index", &mut index_key[..]))
            .map_err(|_| StoreError::Backend("key derivation".into()))?;
        Ok(SledKv {
            db,
            tree,
            cipher: ChaCha20Poly1305::new(value_key.as_ref().into()),
            index_key,
        })
    }

    fn disk_key(&self, ns: Namespace, key: &[u8]) -> StoreResult<[u8; 17]> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.index_key[..])
            .map_err(|_| StoreError::Backend("index key".into()))?;
        mac.update(&[ns as u8]);
        mac.update(key);
        let digest = mac.finalize().into_bytes();
        let mut out = [0u8; 17];
        out[0] = ns as u8;
        out[1..].copy_from_slice(&digest[..16]);
        Ok(out)
    }

    fn seal(&self, disk_key: &[u8], key: &[u8], value: &[u8]) -> StoreResult<Vec<u8>> {
        let key_len = u16::try_from(key.len())
            .map_err(|_| StoreError::Backend("record key too long".into()))?;
        let mut plain = Zeroizing::new(Vec::with_capacity(2 + key.len() + value.len()));
        plain.extend_from_slice(&key_len.to_be_bytes());
        plain.extend_from_slice(key);
        plain.extend_from_slice(value);
        let nonce: [u8; NONCE_LEN] = rand::random();
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: disk_key,
                },
            )
            .map_err(|_| StoreError::Backend("encryption".into()))?;
        Ok([&nonce[..], &sealed].concat())
    }

    /// Decrypts a stored value into (key, value).
    fn open_value(&self, disk_key: &[u8], stored: &[u8]) -> StoreResult<(Vec<u8>, Vec<u8>)> {
        if stored.len() < NONCE_LEN + TAG_LEN {
            return Err(StoreError::Corrupt);
        }
        let (nonce, sealed) = stored.split_at(NONCE_LEN);
        let plain = Zeroizing::new(
            self.cipher
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: disk_key,
                    },
                )
                .map_err(|_| StoreError::Corrupt)?,
        );
        let (len, rest) = plain.split_first_chunk::<2>().ok_or(StoreError::Corrupt)?;
        let len = usize::from(u16::from_be_bytes(*len));
        if rest.len() < len {
            return Err(StoreError::Corrupt);
        }
        let (key, value) = rest.split_at(len);
        Ok((key.to_vec(), value.to_vec()))
    }
}

impl KvStore for SledKv {
    fn get(&self, ns: Namespace, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let disk_key = self.disk_key(ns, key)?;
        let Some(stored) = self.tree.get(disk_key).map_err(backend)? else {
            return Ok(None);
        };
        let (stored_key, value) = self.open_value(&disk_key, &stored)?;
        if stored_key != key {
            return Err(StoreError::Corrupt);
        }
        Ok(Some(value))
    }

    fn scan(&self, ns: Namespace) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        self.tree
            .scan_prefix([ns as u8])
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                self.open_value(&k, &v)
            })
            .collect()
    }

    fn apply(&self, ops: Vec<Op>, durable: bool) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                Op::Put(ns, k, v) => {
                    let disk_key = self.disk_key(ns, &k)?;
                    batch.insert(&disk_key[..], self.seal(&disk_key, &k, &v)?);
                }
                Op::Delete(ns, k) => batch.remove(&self.disk_key(ns, &k)?[..]),
            }
        }
        self.tree.apply_batch(batch).map_err(backend)?;
        if durable {
            self.db.flush().map_err(backend)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kv = SledKv::open(dir.path(), &[7; 32]).expect("open");
        super::super::conformance::rules(&kv);
    }

    #[test]
    fn records_survive_reopen_and_need_the_right_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let kv = SledKv::open(dir.path(), &[7; 32]).expect("open");
            let op = Op::Put(
                Namespace::Sessions,
                b"bob".to_vec(),
                b"secret state".to_vec(),
            );
            kv.apply(vec![op], true).expect("apply");
        }
        {
            let kv = SledKv::open(dir.path(), &[7; 32]).expect("reopen");
            assert_eq!(
                kv.get(Namespace::Sessions, b"bob").expect("get"),
                Some(b"secret state".to_vec())
            );
        }
        let wrong = SledKv::open(dir.path(), &[8; 32]).expect("open");
        // With the wrong key the record cannot even be found by name, and a scan
        // finds it but cannot read it.
        assert_eq!(wrong.get(Namespace::Sessions, b"bob").expect("get"), None);
        assert!(matches!(
            wrong.scan(Namespace::Sessions),
            Err(StoreError::Corrupt)
        ));
    }

    #[test]
    fn nothing_readable_reaches_the_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kv = SledKv::open(dir.path(), &[7; 32]).expect("open");
        let marker = b"MARKER-7f3a9c-plaintext";
        let ops = (0..50u8)
            .map(|i| {
                Op::Put(
                    Namespace::Inbox,
                    [&marker[..], &[i]].concat(),
                    marker.repeat(20),
                )
            })
            .collect();
        kv.apply(ops, true).expect("apply");
        drop(kv);
        for entry in walk(dir.path()) {
            let bytes = std::fs::read(&entry).expect("read");
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker),
                "plaintext in {}",
                entry.display()
            );
        }
    }

    #[test]
    fn a_record_moved_to_another_key_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kv = SledKv::open(dir.path(), &[7; 32]).expect("open");
        kv.apply(
            vec![Op::Put(Namespace::Contacts, b"a".to_vec(), b"1".to_vec())],
            true,
        )
        .expect("apply");
        let from = kv.disk_key(Namespace::Contacts, b"a").expect("key");
        let to = kv.disk_key(Namespace::Contacts, b"b").expect("key");
        let stored = kv.tree.get(from).expect("get").expect("present");
        kv.tree.insert(to, stored).expect("insert");
        assert!(matches!(
            kv.get(Namespace::Contacts, b"b"),
            Err(StoreError::Corrupt)
        ));
    }

    fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
