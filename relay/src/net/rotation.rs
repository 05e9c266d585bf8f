//! Certificate rotation (`tern-relay admin rotate-cert`): the next certificate is
//! staged beside the current one in the data directory with the time it becomes
//! current; until then the relay serves the current one and tells authenticated
//! clients the next one's fingerprint, so they pin both.
//!
//! Files (data directory):
//! - `relay-cert.next.pem`, `relay-key.next.pem` (0600): the staged pair;
//! - `relay-cert-rotation.json`: its fingerprint and switch time. Written last (and
//!   renamed into place), so it is the commit point: staged files without it are
//!   left-overs of an interrupted `rotate-cert` and are replaced by the next one.
//! - after the switch, a self-signed relay's staged pair replaces
//!   `relay-cert.pem`/`relay-key.pem`; an operator's (`[tls] cert`) becomes
//!   `relay-cert.rotated.pem`/`relay-key.rotated.pem`, served instead of `[tls]
//!   cert` until the configuration names a certificate with the same fingerprint.
//!
//! The switch is idempotent (each staged file is renamed if it is still there, the
//! record removed last), so a crash part way is finished by the next start.
//!
//! A second `rotate-cert` while one is staged is refused unless it says `replace`:
//! clients may already pin the staged certificate, and replacing it strands those
//! that learned it and do not connect again before the switch.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tern_platform::clock::Clock;
use tern_proto::{Fingerprint, NextCertificate};
use tokio::sync::watch;
use tracing::{info, warn};

use super::tls::{self, write_private, CERT_FILE, KEY_FILE};
use crate::config::TlsConfig;
use crate::error::{Error, Result};
use crate::media::bytes::hex;

pub(crate) const NEXT_CERT_FILE: &str = "relay-cert.next.pem";
pub(crate) const NEXT_KEY_FILE: &str = "relay-key.next.pem";
pub(crate) const ROTATION_FILE: &str = "relay-cert-rotation.json";
pub(crate) const ROTATED_CERT_FILE: &str = "relay-cert.rotated.pem";
pub(crate) const ROTATED_KEY_FILE: &str = "relay-key.rotated.pem";

/// The overlap `rotate-cert` gives clients when none is named.
pub(crate) const DEFAULT_OVERLAP: Duration = Duration::from_secs(14 * 24 * 3600);

/// The staged certificate's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// Hex SHA-256 of the staged certificate.
    fingerprint: String,
    /// When it becomes current (Unix ms).
    switch_at_ms: u64,
}

/// A certificate with its signing key, ready to serve.
#[derive(Debug, Clone)]
struct Served {
    key: Arc<CertifiedKey>,
    fingerprint: Fingerprint,
}

impl Served {
    fn new(identity: tls::Identity) -> Result<Served> {
        let fingerprint = identity.fingerprint();
        let provider = rustls::crypto::ring::default_provider();
        let key = CertifiedKey::from_der(identity.chain, identity.key, &provider)
            .map_err(|e| Error::Tls(format!("the certificate and its key: {e}")))?;
        Ok(Served {
            key: Arc::new(key),
            fingerprint,
        })
    }
}

#[derive(Debug)]
struct State {
    current: Served,
    next: Option<(Served, u64)>,
}

impl State {
    /// The certificate to serve at `now`: the staged one from its switch time on.
    fn serving(&self, now: u64) -> &Served {
        match &self.next {
            Some((next, at)) if now >= *at => next,
            _ => &self.current,
        }
    }
}

/// The relay's certificates: the one it serves and the staged next one. Resolves
/// each handshake's certificate, so a switch needs no restart.
pub(crate) struct Certificates {
    data_dir: PathBuf,
    /// Whether the current certificate is the operator's (`[tls] cert`).
    operator: bool,
    state: Mutex<State>,
    /// Held while the files change (a stage and a switch do not interleave).
    files: Mutex<()>,
    announced: watch::Sender<Option<NextCertificate>>,
    clock: Arc<dyn Clock>,
    /// Whether the start made the staged certificate current.
    switched_at_open: bool,
    /// What was served when the relay started (what the shared database was checked
    /// against).
    opened_with: Fingerprint,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// What `rotate-cert` stages: a new self-signed pair, or the operator's files.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// A new self-signed certificate with the same names as the first.
    Generate,
    /// The operator's PEM certificate chain and key.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
}

/// What `rotate-cert` staged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Staged {
    /// The certificate served now.
    pub current: Fingerprint,
    /// The staged one, and when it is served.
    pub next: NextCertificate,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn remove_if_there(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// Renames `from` over `to` if `from` is still there.
fn rename_if_there(from: &Path, to: &Path) -> Result<()> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn read_record(data_dir: &Path) -> Result<Option<Record>> {
    let path = data_dir.join(ROTATION_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Tls(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Makes the staged pair current if its time has come. Idempotent.
fn switch_files(data_dir: &Path, operator: bool) -> Result<()> {
    let (cert, key) = if operator {
        (ROTATED_CERT_FILE, ROTATED_KEY_FILE)
    } else {
        (CERT_FILE, KEY_FILE)
    };
    rename_if_there(&data_dir.join(NEXT_KEY_FILE), &data_dir.join(key))?;
    rename_if_there(&data_dir.join(NEXT_CERT_FILE), &data_dir.join(cert))?;
    sync_dir(data_dir)?;
    remove_if_there(&data_dir.join(ROTATION_FILE))?;
    sync_dir(data_dir)
}

/// The operator's certificate, or the one a rotation put in its place (until
/// `[tls] cert` names one with the same fingerprint).
fn operator_current(cert: &Path, key: &Path, data_dir: &Path) -> Result<tls::Identity> {
    let configured = tls::load(cert, key)?;
    let (rc, rk) = (
        data_dir.join(ROTATED_CERT_FILE),
        data_dir.join(ROTATED_KEY_FILE),
    );
    if !rc.exists() {
        return Ok(configured);
    }
    let rotated = tls::load(&rc, &rk)?;
    if rotated.fingerprint() == configured.fingerprint() {
        // The configuration caught up: its files are the ones to serve.
        fs::remove_file(&rc)?;
        let _ = fs::remove_file(&rk);
        return Ok(configured);
    }
    warn!(
        "[tls] cert names the certificate a rotation replaced: serving {} until [tls] cert and key name the new files",
        rc.display()
    );
    Ok(rotated)
}

impl Certificates {
    /// The certificates of a relay starting on `data_dir`: a staged pair whose time
    /// has come is made current first; a self-signed pair is made if there is none.
    pub(crate) fn open(
        config: &TlsConfig,
        data_dir: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Certificates> {
        let operator = config.cert.is_some() && config.key.is_some();
        let now = clock.now();
        let record = read_record(data_dir)?;
        // Due, or under way when the relay stopped: `stage` removes an old record
        // before it moves files in, so a record without the staged key can only be a
        // switch that moved the key and stopped (then the clock may have stepped back).
        let switched_at_open = record
            .as_ref()
            .is_some_and(|r| now >= r.switch_at_ms || !data_dir.join(NEXT_KEY_FILE).exists());
        if switched_at_open {
            switch_files(data_dir, operator)?;
        }
        let current = Served::new(match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => operator_current(cert, key, data_dir)?,
            _ => tls::load_or_create(config, data_dir)?,
        })?;
        let next = match read_record(data_dir)? {
            Some(r) => Some((Self::load_staged(data_dir, &r)?, r.switch_at_ms)),
            None => None,
        };
        if let Some((staged, at)) = &next {
            if staged.fingerprint == current.fingerprint {
                // Served now, it would reach clients before they were told of it.
                return Err(Error::Config(format!(
                    "[tls] cert names the staged certificate, not due until {at} ms \
                     (Unix): point [tls] cert and key at the current files until then"
                )));
            }
        }
        let announced = next.as_ref().map(|(s, at)| NextCertificate {
            fingerprint: s.fingerprint,
            switch_at_ms: *at,
        });
        let opened_with = current.fingerprint;
        Ok(Certificates {
            data_dir: data_dir.to_path_buf(),
            operator,
            state: Mutex::new(State { current, next }),
            files: Mutex::new(()),
            announced: watch::channel(announced).0,
            clock,
            switched_at_open,
            opened_with,
        })
    }

    fn load_staged(data_dir: &Path, record: &Record) -> Result<Served> {
        let staged = Served::new(tls::load(
            &data_dir.join(NEXT_CERT_FILE),
            &data_dir.join(NEXT_KEY_FILE),
        )?)?;
        if hex(&staged.fingerprint.0) != record.fingerprint {
            return Err(Error::Tls(format!(
                "{NEXT_CERT_FILE} is not the certificate {ROTATION_FILE} names: \
                 run rotate-cert again with --replace, or remove both"
            )));
        }
        Ok(staged)
    }

    /// The fingerprint of the certificate served now.
    pub(crate) fn current(&self) -> Fingerprint {
        lock(&self.state).serving(self.clock.now()).fingerprint
    }

    /// What was served when the relay started.
    pub(crate) fn opened_with(&self) -> Fingerprint {
        self.opened_with
    }

    /// Whether this start made a staged certificate current.
    pub(crate) fn switched_at_open(&self) -> bool {
        self.switched_at_open
    }

    /// The staged certificate, while there is one (what clients are told).
    pub(crate) fn announced(&self) -> watch::Receiver<Option<NextCertificate>> {
        self.announced.subscribe()
    }

    /// Stages `source` to become current at `switch_at_ms`. Refused while another
    /// is staged, unless `replace`.
    pub(crate) fn stage(
        &self,
        source: &Source,
        switch_at_ms: u64,
        replace: bool,
    ) -> Result<Staged> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        // A staged certificate whose time has come may already be served (and
        // pinned): it becomes current before anything else is staged.
        self.switch_locked(&files)?;
        let current = self.current();
        if let Some(r) = read_record(&self.data_dir)? {
            if !replace {
                return Err(Error::Config(format!(
                    "a certificate is already staged (sha256 {}, switching at {} ms): \
                     pass --replace to stage another in its place",
                    r.fingerprint, r.switch_at_ms
                )));
            }
        }
        let (cert_pem, key_pem) = match source {
            Source::Generate => {
                let made = rcgen::generate_simple_self_signed(tls::subject_names())
                    .map_err(|e| Error::Tls(format!("generating a certificate: {e}")))?;
                (
                    made.cert.pem().into_bytes(),
                    made.signing_key.serialize_pem().into_bytes(),
                )
            }
            Source::Files { cert, key } => (
                fs::read(cert).map_err(|e| Error::Tls(format!("{}: {e}", cert.display())))?,
                fs::read(key).map_err(|e| Error::Tls(format!("{}: {e}", key.display())))?,
            ),
        };
        let staged = Served::new(parse(&cert_pem, &key_pem)?)?;
        if staged.fingerprint == current {
            return Err(Error::Config(
                "that is the certificate the relay serves now".into(),
            ));
        }
        let dir = &self.data_dir;
        // Written aside first, so a failure leaves what was staged before as it
        // was; then the old record goes, the files move in, the new record last.
        let record = Record {
            fingerprint: hex(&staged.fingerprint.0),
            switch_at_ms,
        };
        let json = serde_json::to_vec_pretty(&record).map_err(|e| Error::Tls(e.to_string()))?;
        let moves = [
            (NEXT_KEY_FILE, key_pem.as_slice()),
            (NEXT_CERT_FILE, cert_pem.as_slice()),
            (ROTATION_FILE, json.as_slice()),
        ];
        let aside = |name: &str| dir.join(format!("{name}.tmp"));
        for (name, bytes) in moves {
            remove_if_there(&aside(name))?;
            write_private(&aside(name), bytes)?;
        }
        remove_if_there(&dir.join(ROTATION_FILE))?;
        sync_dir(dir)?;
        for (name, _) in moves {
            fs::rename(aside(name), dir.join(name))?;
        }
        sync_dir(dir)?;
        let next = NextCertificate {
            fingerprint: staged.fingerprint,
            switch_at_ms,
        };
        lock(&self.state).next = Some((staged, switch_at_ms));
        self.announced.send_replace(Some(next));
        info!(switch_at_ms, "next certificate staged");
        Ok(Staged { current, next })
    }

    /// Makes the staged certificate current once its time has come: the files
    /// (so a restart serves it) and the announcement (nothing is staged any more).
    pub(crate) fn switch_if_due(&self) -> Result<bool> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        self.switch_locked(&files)
    }

    /// The switch, with the files lock held, so "due" is decided on the staged
    /// certificate whose files are moved (a stage cannot replace it in between).
    fn switch_locked(&self, _files: &std::sync::MutexGuard<'_, ()>) -> Result<bool> {
        let now = self.clock.now();
        let due = lock(&self.state)
            .next
            .as_ref()
            .is_some_and(|(_, at)| now >= *at);
        if !due {
            return Ok(false);
        }
        switch_files(&self.data_dir, self.operator)?;
        let mut state = lock(&self.state);
        if let Some((next, _)) = state.next.take() {
            state.current = next;
        }
        self.announced.send_replace(None);
        info!("the staged certificate is now the relay's certificate");
        Ok(true)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(lock(&self.state).serving(self.clock.now()).key.clone())
    }
}

/// A certificate chain and key from PEM bytes.
fn parse(cert: &[u8], key: &[u8]) -> Result<tls::Identity> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("the certificate: {e}")))?;
    if chain.is_empty() {
        return Err(Error::Tls(
            "the certificate file holds no certificate".into(),
        ));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key).map_err(|e| Error::Tls(format!("the key: {e}")))?;
    Ok(tls::Identity { chain, key })
}

/// How often a running relay checks whether the staged certificate is due (the
/// handshakes switch exactly on time; this moves the files and the announcement).
const SWITCH_CHECK: Duration = Duration::from_secs(1);

/// Called with the fingerprint served before and the one served now after a switch
/// (a node of several records it in the shared database, if it still records the
/// one before).
pub(crate) type OnSwitch = Box<dyn Fn(Fingerprint, Fingerprint) -> Result<()> + Send + Sync>;

/// Switches the staged certificate in when due, until `shutdown`.
pub(crate) async fn switch_loop(
    certs: Arc<Certificates>,
    on_switch: Option<OnSwitch>,
    mut shutdown: watch::Receiver<bool>,
) {
    let on_switch = on_switch.map(Arc::new);
    // What was last recorded: the loop records whatever is served now whenever that
    // differs, so a switch made by `stage` (a due one) is recorded too, and a failed
    // recording is retried each tick.
    let recorded = Arc::new(Mutex::new(certs.opened_with()));
    let mut tick = tokio::time::interval(SWITCH_CHECK);
    // Each failure is logged once per streak: both retry every tick.
    let (mut moving_failed, mut recording_failed) = (false, false);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => {}
        }
        let (c, then, recorded) = (certs.clone(), on_switch.clone(), recorded.clone());
        let step = tokio::task::spawn_blocking(move || {
            let switched = c.switch_if_due();
            let mut recorded = recorded.lock().unwrap_or_else(|e| e.into_inner());
            let now = c.current();
            let record = match then {
                Some(then) if now != *recorded => then(*recorded, now).map(|()| *recorded = now),
                _ => Ok(()),
            };
            (switched, record)
        });
        let Ok((switched, record)) = step.await else {
            continue;
        };
        match switched {
            Err(e) if !moving_failed => {
                moving_failed = true;
                warn!(error = %e, "moving the staged certificate in failed; retrying each second");
            }
            Ok(_) => moving_failed = false,
            Err(_) => {}
        }
        match record {
            Err(e) if !recording_failed => {
                recording_failed = true;
                warn!(error = %e, "recording the new certificate in the shared database failed; retrying each second");
            }
            Ok(()) if recording_failed => {
                recording_failed = false;
                info!("the new certificate is recorded in the shared database");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_platform::clock::ManualClock;

    const START: u64 = 1_800_000_000_000;

    fn open(dir: &Path, clock: &Arc<ManualClock>) -> Certificates {
        Certificates::open(&TlsConfig::default(), dir, clock.clone()).expect("open")
    }

    fn served(c: &Certificates) -> Fingerprint {
        lock(&c.state).serving(c.clock.now()).fingerprint
    }

    #[test]
    fn a_staged_certificate_is_announced_then_served_from_its_switch_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(START));
        let certs = open(dir.path(), &clock);
        let first = certs.current();
        let announced = certs.announced();
        assert_eq!(*announced.borrow(), None);
        let staged = certs
            .stage(&Source::Generate, START + 60_000, false)
            .expect("stage");
        assert_eq!(staged.current, first);
        assert_ne!(staged.next.fingerprint, first);
        assert_eq!(*announced.borrow(), Some(staged.next));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(NEXT_KEY_FILE))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key readable by owner only");
        }
        clock.advance(Duration::from_secs(59));
        assert!(!certs.switch_if_due().expect("not yet"));
        assert_eq!(served(&certs), first);
        clock.advance(Duration::from_secs(1));
        // Handshakes switch on time, before the files move.
        assert_eq!(served(&certs), staged.next.fingerprint);
        assert!(certs.switch_if_due().expect("switch"));
        assert_eq!(certs.current(), staged.next.fingerprint);
        assert_eq!(*announced.borrow(), None);
        assert!(!dir.path().join(ROTATION_FILE).exists());
        assert!(!dir.path().join(NEXT_CERT_FILE).exists());
        // A restart serves the new one.
        let again = open(dir.path(), &clock);
        assert_eq!(again.current(), staged.next.fingerprint);
        assert_eq!(*again.announced().borrow(), None);
    }

    #[test]
    fn a_restart_before_the_switch_keeps_both_and_one_after_it_switches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(START));
        let first = open(dir.path(), &clock).current();
        let staged = open(dir.path(), &clock)
            .stage(&Source::Generate, START + 1_000, false)
            .expect("stage");
        let before = open(dir.path(), &clock);
        assert_eq!(before.current(), first);
        assert_eq!(*before.announced().borrow(), Some(staged.next));
        drop(before);
        clock.advance(Duration::from_secs(2));
        // Stopped across the switch time: the start switches.
        let after = open(dir.path(), &clock);
        assert_eq!(after.current(), staged.next.fingerprint);
        assert_eq!(*after.announced().borrow(), None);
        assert!(!dir.path().join(ROTATION_FILE).exists());
    }

    #[test]
    fn a_switch_interrupted_part_way_is_finished_by_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(START));
        let staged = open(dir.path(), &clock)
            .stage(&Source::Generate, START, false)
            .expect("stage");
        // The crash came after the key moved, before the certificate did.
        fs::rename(dir.path().join(NEXT_KEY_FILE), dir.path().join(KEY_FILE)).expect("rename");
        let after = open(dir.path(), &clock);
        assert_eq!(after.current(), staged.next.fingerprint);
    }

    #[test]
    fn a_switch_interrupted_part_way_is_finished_even_with_the_clock_stepped_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(START));
        let staged = open(dir.path(), &clock)
            .stage(&Source::Generate, START + 1_000, false)
            .expect("stage");
        // The key moved at the switch, the certificate not; now the clock is earlier.
        fs::rename(dir.path().join(NEXT_KEY_FILE), dir.path().join(KEY_FILE)).expect("rename");
        let after = open(dir.path(), &clock);
        assert_eq!(after.current(), staged.next.fingerprint);
        assert!(after.switched_at_open());
        assert_eq!(*after.announced().borrow(), None);
    }

    #[test]
    fn an_operator_switch_interrupted_part_way_is_finished_with_the_clock_stepped_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let own = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(START));
        // The operator's pair, made the way a self-signed relay makes its own.
        let first = open(own.path(), &clock).current();
        let config = TlsConfig {
            cert: Some(own.path().join(CERT_FILE)),
            key: Some(own.path().join(KEY_FILE)),
        };
        let certs = Certificates::open(&config, dir.path(), clock.clone()).expect("open");
        assert_eq!(certs.current(), first);
        let staged = certs
            .stage(&Source::Generate, START + 1_000, false)
            .expect("stage");
        drop(certs);
        // The key moved aside at the switch, the certificate not; the clock is earlier.
        fs::rename(
            dir.path().join(NEXT_KEY_FILE),
            dir.path().join(ROTATED_KEY_FILE),
        )
        .expect("rename");
        let after = Certificates::open(&config, dir.path(), clock.clone()).expect("reopen");
        assert_eq!(after.current(), staged.next.fingerprint);
        assert!(after.switched_at_open());
        assert!(!dir.path().join(ROTATION_FILE).exists());
    }

    #[test]
    fn a_second_rotation_is_refused_unless_it_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(START));
        let certs = open(dir.path(), &clock);
        let one = certs
            .stage(&Source::Generate, START + 10_000, false)
            .expect("stage");
        let refused = certs.stage(&Source::Generate, START + 20_000, false);
        match refused {
            Err(Error::Config(m)) => assert!(m.contains("--replace"), "{m}"),
            other => panic!("not refused: {other:?}"),
        }
        assert_eq!(*certs.announced().borrow(), Some(one.next));
        let two = certs
            .stage(&Source::Generate, START + 20_000, true)
            .expect("replace");
        assert_ne!(two.next.fingerprint, one.next.fingerprint);
        assert_eq!(*certs.announced().borrow(), Some(two.next));
        let reopened = open(dir.path(), &clock);
        assert_eq!(*reopened.announced().borrow(), Some(two.next));
    }

    #[test]
    fn a_replace_after_the_switch_time_keeps_the_certificate_already_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(START));
        let certs = open(dir.path(), &clock);
        let one = certs
            .stage(&Source::Generate, START + 1_000, false)
            .expect("stage");
        // Served from its switch time on, before the loop has moved the files.
        clock.advance(Duration::from_millis(1_500));
        assert_eq!(served(&certs), one.next.fingerprint);
        let two = certs
            .stage(&Source::Generate, START + 60_000, true)
            .expect("replace");
        assert_eq!(two.current, one.next.fingerprint);
        assert_eq!(served(&certs), one.next.fingerprint);
        assert_eq!(*certs.announced().borrow(), Some(two.next));
        let reopened = open(dir.path(), &clock);
        assert_eq!(reopened.current(), one.next.fingerprint);
        assert_eq!(*reopened.announced().borrow(), Some(two.next));
    }

    #[tokio::test]
    async fn a_failed_recording_of_the_switch_is_retried_until_it_succeeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(START));
        let certs = Arc::new(open(dir.path(), &clock));
        let staged = certs
            .stage(&Source::Generate, START + 1_000, false)
            .expect("stage");
        clock.advance(Duration::from_secs(1));
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let seen = recorded.clone();
        let on_switch: OnSwitch = Box::new(move |_, f| {
            let mut seen = seen.lock().expect("seen");
            seen.push(f);
            if seen.len() == 1 {
                return Err(Error::Config("the database is away".into()));
            }
            Ok(())
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(switch_loop(certs.clone(), Some(on_switch), stopped));
        for _ in 0..100 {
            if recorded.lock().expect("recorded").len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        stop.send_replace(true);
        task.await.expect("loop");
        // Failed once, written on the next tick, then no more.
        let recorded = recorded.lock().expect("recorded").clone();
        assert_eq!(recorded, vec![staged.next.fingerprint; 2]);
    }

    #[tokio::test]
    async fn a_switch_made_by_a_later_stage_is_recorded_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(START));
        let certs = Arc::new(open(dir.path(), &clock));
        let first = certs
            .stage(&Source::Generate, START + 1_000, false)
            .expect("stage");
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let seen = recorded.clone();
        let on_switch: OnSwitch = Box::new(move |_, f| {
            seen.lock().expect("seen").push(f);
            Ok(())
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(switch_loop(certs.clone(), Some(on_switch), stopped));
        // Past the switch time, a new stage moves the first pair in before the loop.
        clock.advance(Duration::from_secs(2));
        certs
            .stage(&Source::Generate, START + 60_000, false)
            .expect("second stage");
        for _ in 0..100 {
            if !recorded.lock().expect("recorded").is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.send_replace(true);
        task.await.expect("loop");
        assert_eq!(
            *recorded.lock().expect("recorded"),
            vec![first.next.fingerprint]
        );
    }

    #[test]
    fn a_config_naming_the_staged_certificate_before_its_time_stops_the_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(START));
        open(dir.path(), &clock)
            .stage(&Source::Generate, START + 10_000, false)
            .expect("stage");
        let early = TlsConfig {
            cert: Some(dir.path().join(NEXT_CERT_FILE)),
            key: Some(dir.path().join(NEXT_KEY_FILE)),
        };
        match Certificates::open(&early, dir.path(), clock.clone()) {
            Err(Error::Config(m)) => assert!(m.contains("staged"), "{m}"),
            other => panic!("started: {other:?}"),
        }
    }

    #[test]
    fn staged_files_that_do_not_match_the_record_stop_the_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(START));
        open(dir.path(), &clock)
            .stage(&Source::Generate, START + 10_000, false)
            .expect("stage");
        // Another pair (the current one) where the staged one was.
        fs::copy(dir.path().join(CERT_FILE), dir.path().join(NEXT_CERT_FILE)).expect("copy");
        fs::copy(dir.path().join(KEY_FILE), dir.path().join(NEXT_KEY_FILE)).expect("copy");
        match Certificates::open(&TlsConfig::default(), dir.path(), clock.clone()) {
            Err(Error::Tls(m)) => assert!(m.contains(ROTATION_FILE), "{m}"),
            other => panic!("started: {other:?}"),
        }
    }

    #[test]
    fn an_operator_certificate_is_staged_from_files_and_served_until_the_config_names_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(START));
        let write = |name: &str| {
            let made = rcgen::generate_simple_self_signed(tls::subject_names()).expect("rcgen");
            let (c, k) = (
                files.path().join(format!("{name}.pem")),
                files.path().join(format!("{name}.key")),
            );
            fs::write(&c, made.cert.pem()).expect("cert");
            fs::write(&k, made.signing_key.serialize_pem()).expect("key");
            (c, k)
        };
        let (old_cert, old_key) = write("old");
        let (new_cert, new_key) = write("new");
        let config = TlsConfig {
            cert: Some(old_cert.clone()),
            key: Some(old_key.clone()),
        };
        let certs = Certificates::open(&config, dir.path(), clock.clone()).expect("open");
        let first = certs.current();
        // A key that is not the certificate's is refused.
        let mismatched = Source::Files {
            cert: new_cert.clone(),
            key: old_key.clone(),
        };
        assert!(matches!(
            certs.stage(&mismatched, START + 1_000, false),
            Err(Error::Tls(_))
        ));
        let staged = certs
            .stage(
                &Source::Files {
                    cert: new_cert.clone(),
                    key: new_key.clone(),
                },
                START + 1_000,
                false,
            )
            .expect("stage");
        clock.advance(Duration::from_secs(1));
        assert!(certs.switch_if_due().expect("switch"));
        assert_ne!(certs.current(), first);
        // Restarted with the old [tls] cert: the rotated copy is served.
        let restarted = Certificates::open(&config, dir.path(), clock.clone()).expect("open");
        assert_eq!(restarted.current(), staged.next.fingerprint);
        // The configuration now names the new files: they are served, the copy goes.
        let updated = TlsConfig {
            cert: Some(new_cert),
            key: Some(new_key),
        };
        let caught_up = Certificates::open(&updated, dir.path(), clock.clone()).expect("open");
        assert_eq!(caught_up.current(), staged.next.fingerprint);
        assert!(!dir.path().join(ROTATED_CERT_FILE).exists());
    }
}
