//! Mailboxes in an append-only log: the delivery hot path's store.
//!
//! Envelopes are appended to segment files in `dir` ([`record`] has the format): one
//! `write` per send, or with [`LogOptions::write_behind`] one per group commit for
//! every send since the last, and one `fdatasync` per group commit. The index (where each
//! queued message is, and the expiry order) lives in memory and is rebuilt by one scan
//! of the segments at start. Compared with keeping envelopes in sled, a message costs
//! one copy into a buffer and a few map updates instead of several copy-on-write B-tree
//! updates, and a drain reads whole runs of records with one `pread`.
//!
//! Deletion (P2): a removed message leaves the index at once, so it is never read
//! again, and before `remove` (an ack) returns its record is overwritten in place with
//! a dead-span header ([`remove`]), which a restart's scan skips. The next flush fsyncs
//! the segments written, so an ack answered after its group commit survives any crash;
//! without that commit (`durability = "os"`), a process crash cannot bring the message
//! back and a machine crash can bring back the last [`SCRUB_INTERVAL`]. A background
//! pass then punches a hole over the ciphertext (`fallocate`), so the bytes leave the
//! disk within about [`SCRUB_INTERVAL`]; a segment whose messages are all gone is
//! deleted whole.
//!
//! Expiry (P3): a start does not index what has expired by then, and a segment kept for
//! damage is deleted 30 days after it was first found ([`pinned`]).

mod bodies;
mod dump;
mod files;
mod holes;
mod mailboxes;
mod pinned;
mod record;
mod remove;
mod scan;
mod snapshot;
mod totals;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::Duration;

use tern_proto::DeviceAddress;
use tracing::{info, warn};

use self::files::{create_segment, remove_segment, segment_id, segment_path, sync_dir};
use self::holes::{erase, write_zeros};
use self::record::{HEADER_LEN, PEEK_LEN};
use super::seq::{self, SeqCounters}; // per-mailbox seqs, in an epoch above every seq found
use super::{ExpiryIndex, StoreError, StoreResult, Usage};
use tern_platform::clock::UnixMillis;

/// How often removed messages are scrubbed from disk, and, for durability "os", how
/// often the log is fsynced.
pub const SCRUB_INTERVAL: Duration = Duration::from_millis(500);

/// Segment size at which a new segment starts.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// Mailboxes in an append-only segment log; see the module docs.
#[derive(Debug)]
pub struct LogStore {
    shared: Arc<Shared>,
    background: Option<(mpsc::Sender<()>, thread::JoinHandle<()>)>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    segment_bytes: u64,
    writer: Mutex<Writer>,
    index: Mutex<Index>,
    /// Held for a whole flush, so a flush that finds nothing dirty knows an earlier
    /// one has finished.
    flushing: Mutex<()>,
    /// Writes over existing records (dead headers, scrubs) hold it shared; a backup
    /// holds it alone while it copies a segment, so no copy holds a torn record.
    copying: std::sync::RwLock<()>,
    /// While a backup copies a segment without `copying` held: that segment's id
    /// and the spans written over in it since (see `snapshot.rs`). Noted under
    /// `copying` held shared, so a backup that takes it alone sees every one.
    overwritten: Mutex<Option<(u64, Vec<Span>)>>,
    /// Held for a whole snapshot: `overwritten` follows one copy at a time.
    snapshotting: Mutex<()>,
    /// The next segment, zero-filled ahead of time (see [`Shared::prepare_spare`]).
    spare: Mutex<Option<File>>,
    /// A segment was deleted since the last flush: the directory needs an fsync.
    unlinked: AtomicBool,
    /// Segments that removals wrote dead headers into since the last flush.
    ack_dirty: Mutex<Vec<Arc<Segment>>>,
    /// Set by a failed fsync, and never cleared: after a failed fsync the kernel may
    /// have dropped the dirty pages, and a later fsync would succeed without them, so
    /// every later flush fails too (nothing more is acknowledged as durable).
    failed: Mutex<Option<String>>,
    /// Appends wait in [`Shared::pending`] for the next flush, which writes them with
    /// one `pwrite` ([`LogOptions::write_behind`]).
    write_behind: bool,
    /// The active segment's bytes appended but not yet written (write-behind). Taken
    /// after the writer's lock, and before no other.
    pending: Mutex<Pending>,
}

/// Appended bytes not yet written: `bytes` belong at `start` in segment `segment`.
/// Reads and in-place writes (an ack's dead header) go through it
/// ([`Shared::read_at`], [`Shared::write_over`]), and bytes leave it only once they
/// are in the file.
#[derive(Debug, Default)]
struct Pending {
    segment: u64,
    start: u64,
    bytes: Vec<u8>,
}

impl Pending {
    /// Where `offset..end` of `segment` meets the bytes pending: where that part
    /// starts in the segment (it runs to `end`), and its indexes into `bytes`. They
    /// are the segment's tail, so a record that meets them ends within them, and the
    /// part before is in the file. A range past the tail (nothing was appended there)
    /// is left to the file.
    fn overlap(
        &self,
        segment: u64,
        offset: u64,
        end: u64,
    ) -> Option<(u64, std::ops::Range<usize>)> {
        let tail = self.start + self.bytes.len() as u64;
        if self.bytes.is_empty() || self.segment != segment || end <= self.start || end > tail {
            return None;
        }
        let from = offset.max(self.start);
        let at = usize::try_from(from - self.start).ok()?;
        let to = usize::try_from(end - self.start).ok()?;
        Some((from, at..to))
    }
}

/// Pending bytes at which an append writes them at once instead of waiting for a
/// flush (none comes under `durability = "os"` but the background pass's).
const MAX_PENDING: usize = 4 << 20;

/// Bytes of a segment: offset and length.
type Span = (u64, u64);

/// Sorts `spans` and merges those that overlap or touch.
fn merge_spans(spans: &mut Vec<Span>) {
    spans.sort_unstable();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for &(offset, len) in spans.iter() {
        match out.last_mut() {
            Some((o, l)) if offset <= o.saturating_add(*l) => {
                *l = (*l).max(offset.saturating_add(len) - *o);
            }
            _ => out.push((offset, len)),
        }
    }
    *spans = out;
}

#[derive(Debug)]
struct Segment {
    id: u64,
    file: File,
}

#[derive(Debug)]
struct Writer {
    seqs: SeqCounters,
    active: Arc<Segment>,
    /// Bytes in the active segment.
    len: u64,
    buf: Vec<u8>,
    /// Written since the last flush.
    dirty: bool,
    /// Earlier active segments written since the last flush.
    unsynced: Vec<Arc<Segment>>,
    /// The active segment started as an empty file, not a zero-filled spare, so it
    /// grows with every append (see [`EARLY_SPARE`]).
    grows: bool,
}

impl Writer {
    /// Bytes in the active segment at which the background pass prepares a spare.
    fn spare_due(&self, segment_bytes: u64) -> u64 {
        let half = segment_bytes / 2;
        if self.grows {
            half.min(EARLY_SPARE)
        } else {
            half
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
    expires_at: UnixMillis,
    /// An entry's body record in the same segment: its offset and length.
    body: Option<(u64, u32)>,
}

impl Loc {
    /// What the mailbox counts: the payload, or an entry's part and body.
    fn payload_len(&self) -> u64 {
        match self.body {
            None => self.own_len(),
            Some((_, len)) => self.own_len() + u64::from(len) - record::BODY_OVERHEAD as u64,
        }
    }

    /// The bytes of this record alone: the payload, or an entry's part.
    fn own_len(&self) -> u64 {
        let overhead = match self.body {
            None => record::MESSAGE_OVERHEAD,
            Some(_) => record::ENTRY_OVERHEAD,
        };
        u64::from(self.len) - overhead as u64
    }
}

#[derive(Debug, Default)]
struct Mailbox {
    entries: BTreeMap<u64, Loc>,
    usage: Usage,
}

#[derive(Debug)]
struct SegmentState {
    segment: Arc<Segment>,
    live: u64,
    /// Records removed but not yet scrubbed.
    dead: Vec<Dead>,
    /// Its scan stopped at damage it could not step over: the rest of the file may
    /// hold records, so it is never deleted (an operator can look at it).
    pinned: bool,
}

impl SegmentState {
    fn new(segment: Arc<Segment>) -> Self {
        SegmentState {
            segment,
            live: 0,
            dead: Vec::new(),
            pinned: false,
        }
    }
}

/// A removed record, or a run of adjacent ones, waiting to be scrubbed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Dead {
    offset: u64,
    len: u64,
    /// The highest seq in it, kept in its dead-span header.
    seq: u64,
}

impl Dead {
    /// `spans` (in file order) joined where one ends where the next begins, each with
    /// how many of `spans` it covers: one dead header marks a whole run, with its
    /// highest seq (an ack's write, the scrub's).
    fn join(spans: impl IntoIterator<Item = Dead>) -> Vec<(Dead, usize)> {
        let mut out: Vec<(Dead, usize)> = Vec::new();
        for d in spans {
            match out.last_mut() {
                Some((m, n)) if m.offset + m.len == d.offset => {
                    m.len += d.len;
                    m.seq = m.seq.max(d.seq);
                    *n += 1;
                }
                _ => out.push((d, 1)),
            }
        }
        out
    }
}

#[derive(Debug, Default)]
struct Index {
    mailboxes: HashMap<DeviceAddress, Mailbox>,
    expiry: ExpiryIndex,
    segments: HashMap<u64, SegmentState>,
    active: u64,
    /// Segments kept for damage, with the time they are deleted at (see [`pinned`]).
    deadlines: Vec<(u64, UnixMillis)>,
    /// The sum of every record's own bytes (each shared body once), kept beside
    /// the mailboxes.
    totals: Usage,
    /// Shared bodies, by (segment, offset): the entries that point at each. Not
    /// stored: the scan at open counts them.
    bodies: HashMap<(u64, u64), bodies::Body>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every method finishes its updates before it can fail, so a poisoned lock still
    // guards consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io(context: &str, e: std::io::Error) -> StoreError {
    StoreError::from_io(&format!("mailbox log: {context}"), &e)
}

/// The file a spare segment is prepared in.
const SPARE: &str = "spare.tmp";
/// Room in a spare beyond the segment size, for the send that crosses it.
const SPARE_SLACK: u64 = 4 << 20;
/// A segment that starts as an empty file (at open, or when no spare was ready)
/// grows with every append, and then each fdatasync writes its inode too: a single
/// fsynced send took 222 µs instead of 171 here (criterion `mailbox`). Once such a
/// segment holds this much (traffic, not a test or an idle relay) a spare is prepared
/// and the log moves to it at the next append.
const EARLY_SPARE: u64 = 1 << 20;

impl Index {
    /// Indexes a message or entry (an entry's body is indexed first).
    fn insert(&mut self, to: DeviceAddress, seq: u64, loc: Loc) {
        let mailbox = self.mailboxes.entry(to).or_default();
        mailbox.entries.insert(seq, loc);
        mailbox.usage.messages += 1;
        mailbox.usage.bytes += loc.payload_len();
        self.count(1, loc.own_len());
        if let Some((offset, _)) = loc.body {
            self.hold_body(loc.segment, offset);
        }
        self.expiry.insert((loc.expires_at, to, seq));
        if let Some(s) = self.segments.get_mut(&loc.segment) {
            s.live += 1;
        }
    }

    /// Queues spans for the scrub again (a pass that could not finish them).
    fn requeue(&mut self, work: impl IntoIterator<Item = (Arc<Segment>, Vec<Dead>)>) {
        for (segment, spans) in work {
            if let Some(state) = self.segments.get_mut(&segment.id) {
                state.dead.extend(spans);
            }
        }
    }

    /// Takes a segment out of the index if it may be deleted: nothing live, not the
    /// active one, not kept for damage. Its queued scrubs go with it.
    fn take_if_empty(&mut self, id: u64) -> Option<Arc<Segment>> {
        let s = self.segments.get(&id)?;
        if s.live > 0 || s.pinned || id == self.active {
            return None;
        }
        self.segments.remove(&id).map(|s| s.segment)
    }
}

/// Options for [`LogStore::open`].
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// A new segment starts once the active one holds this many bytes.
    pub segment_bytes: u64,
    /// Run the background pass (preparing spare segments, scrubbing removed
    /// messages, periodic fsync). Off only in tests that drive [`LogStore::scrub`]
    /// themselves.
    pub background: bool,
    /// The time at open, from the relay's clock: messages expired by then are not
    /// indexed, and segments kept for damage are deleted 30 days after it.
    pub now: UnixMillis,
    /// Appends are written by the next flush, all of them with one `pwrite`, instead
    /// of one each at once: for `durability = "fsync"`, where every send waits for a
    /// flush anyway (at saturation the appends' writes were a quarter of the relay's
    /// time). Reads, acks, the scrub, a roll and a backup see them meanwhile.
    pub write_behind: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            background: true,
            now: 0,
            write_behind: false,
        }
    }
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, rebuilding the index from its segments.
    pub fn open(dir: &Path, options: LogOptions) -> StoreResult<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the directory", e))?;
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io("listing", e))? {
            let entry = entry.map_err(|e| io("listing", e))?;
            if let Some(id) = entry.file_name().to_str().and_then(segment_id) {
                ids.push(id);
            }
        }
        ids.sort_unstable();

        let mut index = Index::default();
        let now = options.now;
        let mut counts = scan::Counts {
            next_seq: 1,
            ..scan::Counts::default()
        };
        let mut deleted = false;
        // The newest segment with a floor, as (id, epoch), and those with none.
        let (mut known, mut headless) = ((0, 0), Vec::new());
        for &id in &ids {
            let path = segment_path(dir, id);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io("opening a segment", e))?;
            let segment = Arc::new(Segment { id, file });
            let scanned = scan::scan(&segment, &mut index, now, &mut counts)?;
            let kept = index.segments.get(&id).is_none_or(|s| s.pinned);
            let deadline = if kept {
                pinned::deadline(dir, id, now)?
            } else {
                UnixMillis::MAX
            };
            let Some(floor) = scanned else {
                headless.push(id);
                if deadline <= now {
                    remove_segment(dir, id);
                    pinned::remove_sidecar(dir, id);
                    deleted = true;
                } else {
                    warn!(
                        segment = id,
                        "mailbox log segment with a damaged header kept until its deadline"
                    );
                    index.deadlines.push((id, deadline));
                }
                continue;
            };
            if kept {
                if deadline <= now {
                    if let Some(s) = index.segments.get_mut(&id) {
                        s.pinned = false;
                    }
                } else {
                    index.deadlines.push((id, deadline));
                }
            }
            counts.next_seq = counts.next_seq.max(floor);
            known = (id, floor >> seq::EPOCH_SHIFT);
        }
        // A damaged header hides its segment's epoch; every open starts a segment, so
        // it is at most the nearest earlier floor's plus the segment ids between.
        for id in headless.into_iter().filter(|&id| id > known.0) {
            let bound = known.1.saturating_add(id - known.0);
            counts.next_seq = counts.next_seq.max(seq::floor(bound.min(seq::MAX_EPOCH)));
        }
        if counts.damaged > 0 {
            warn!(
                damaged = counts.damaged,
                "damaged mailbox log records skipped"
            );
        }
        if counts.orphans > 0 {
            info!(
                bodies = counts.orphans,
                "shared bodies with no entry left dropped at start"
            );
        }
        if counts.expired > 0 {
            info!(
                expired = counts.expired,
                "expired mailbox log records dropped at start"
            );
        }
        let seqs = SeqCounters::new(seq::epoch_after(counts.next_seq))?;

        let active_id = match ids.last() {
            None => 1,
            Some(id) => id
                .checked_add(1)
                .ok_or(StoreError::Corrupt("segment ids exhausted"))?,
        };
        let active = Arc::new(create_segment(dir, active_id, seq::floor(seqs.epoch()))?);
        sync_dir(dir)?;
        index.active = active_id;
        index
            .segments
            .insert(active_id, SegmentState::new(active.clone()));
        let ids: Vec<u64> = index.segments.keys().copied().collect();
        for id in ids {
            if index.take_if_empty(id).is_some() {
                remove_segment(dir, id);
                pinned::remove_sidecar(dir, id);
                deleted = true;
            }
        }

        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            segment_bytes: options.segment_bytes.max(HEADER_LEN + 1),
            writer: Mutex::new(Writer {
                seqs,
                active,
                len: HEADER_LEN,
                buf: Vec::new(),
                dirty: false,
                unsynced: Vec::new(),
                grows: true,
            }),
            index: Mutex::new(index),
            flushing: Mutex::new(()),
            copying: std::sync::RwLock::new(()),
            overwritten: Mutex::new(None),
            snapshotting: Mutex::new(()),
            spare: Mutex::new(None),
            unlinked: AtomicBool::new(deleted),
            ack_dirty: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
            write_behind: options.write_behind,
            pending: Mutex::default(),
        });
        let _ = std::fs::remove_file(dir.join(SPARE));
        let background = if options.background {
            let (stop, stopped) = mpsc::channel();
            let weak = Arc::downgrade(&shared);
            let handle = thread::Builder::new()
                .name("tern-mailbox-log".into())
                .spawn(move || background(&weak, &stopped))
                .map_err(|e| io("starting the background thread", e))?;
            Some((stop, handle))
        } else {
            None
        };
        Ok(LogStore { shared, background })
    }

    /// Messages queued across every mailbox.
    pub fn count_messages(&self) -> u64 {
        let index = lock(&self.shared.index);
        index.mailboxes.values().map(|m| m.usage.messages).sum()
    }

    /// Segment files on disk.
    pub fn segments(&self) -> usize {
        lock(&self.shared.index).segments.len()
    }

    /// Scrubs removed messages from disk now (the background pass does this every
    /// [`SCRUB_INTERVAL`]).
    pub fn scrub(&self) -> StoreResult<()> {
        self.shared.scrub()
    }
}

impl Drop for LogStore {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.background.take() {
            drop(stop);
            let _ = handle.join();
        }
        // A clean shutdown leaves nothing removed on disk.
        for done in [self.shared.scrub(), self.shared.flush()] {
            if let Err(e) = done {
                warn!(error = %e, "mailbox log: final scrub or flush failed");
            }
        }
    }
}

/// Runs every [`SCRUB_INTERVAL`], and at once when woken (a spare is due);
/// ends when the store's sender is dropped.
fn background(shared: &Weak<Shared>, wake: &mpsc::Receiver<()>) {
    loop {
        match wake.recv_timeout(SCRUB_INTERVAL) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // Each step on its own: a scrub that a full disk refuses must not skip the
        // flush, which under `durability = "os"` is the only one.
        for (step, done) in [
            ("preparing a segment", shared.prepare_spare()),
            ("scrubbing", shared.scrub()),
            ("flushing", shared.flush()),
        ] {
            if let Err(e) = done {
                warn!(step, error = %e, "mailbox log background pass failed");
            }
        }
    }
}

impl Shared {
    /// Zero-fills the next segment's file ahead of time, if none is ready. Appends
    /// into a file whose size does not change need no inode write at each fdatasync:
    /// measured here, 130 us per write+fdatasync instead of 200.
    /// Only once the active segment is half full (or holds [`EARLY_SPARE`], if it
    /// grows), so an idle relay writes nothing.
    fn prepare_spare(&self) -> StoreResult<()> {
        // One lock at a time: a roll takes the writer's, then the spare's.
        let ready = lock(&self.spare).is_some();
        let (used, due) = {
            let w = lock(&self.writer);
            (w.len, w.spare_due(self.segment_bytes))
        };
        // On a nearly full disk the next segment grows instead: zeros written ahead
        // would take the last free blocks, every pass.
        let room = super::disk_sample(&self.dir).map_or(u64::MAX, |d| d.free);
        if ready || used < due || room < 2 * (self.segment_bytes + SPARE_SLACK) {
            return Ok(());
        }
        let path = self.dir.join(SPARE);
        let prepared = (|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?;
            write_zeros(&file, 0, self.segment_bytes + SPARE_SLACK)?;
            file.sync_all()?;
            Ok(file)
        })();
        match prepared {
            Ok(file) => {
                *lock(&self.spare) = Some(file);
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(io("preparing a segment", e))
            }
        }
    }

    /// The next segment: the spare if one is ready, else a new empty file (and
    /// whether it is that, which grows).
    fn next_segment(&self, id: u64, seq_floor: u64) -> StoreResult<(Segment, bool)> {
        let Some(file) = lock(&self.spare).take() else {
            return Ok((create_segment(&self.dir, id, seq_floor)?, true));
        };
        file.write_all_at(&record::header(seq_floor), 0)
            .and_then(|()| file.sync_data())
            .map_err(|e| io("writing a segment header", e))?;
        std::fs::rename(self.dir.join(SPARE), segment_path(&self.dir, id))
            .map_err(|e| io("naming a segment", e))?;
        Ok((Segment { id, file }, false))
    }

    /// Deletes an emptied segment; the next flush makes that durable.
    fn delete_segment(&self, id: u64) {
        remove_segment(&self.dir, id);
        pinned::remove_sidecar(&self.dir, id);
        self.unlinked.store(true, Ordering::Release);
    }

    /// Starts the next segment.
    fn roll(&self, w: &mut Writer) -> StoreResult<()> {
        // The old segment whole before the log leaves it.
        self.write_pending(w)?;
        let id = w.active.id + 1;
        let (segment, grows) = self.next_segment(id, seq::floor(w.seqs.epoch()))?;
        // The new segment's header (its seq floor) is on disk, and named, before the
        // old segment can be deleted: otherwise a crash could lose every record of
        // the highest seqs and numbers would start again lower.
        if let Err(e) = sync_dir(&self.dir) {
            // Not in use and holding no records: removed, so the next roll can retry.
            drop(segment);
            remove_segment(&self.dir, id);
            return Err(e);
        }
        let segment = Arc::new(segment);
        let old = std::mem::replace(&mut w.active, segment.clone());
        w.len = HEADER_LEN;
        w.grows = grows;
        w.unsynced.push(old.clone());
        let mut index = lock(&self.index);
        index.segments.insert(id, SegmentState::new(segment));
        index.active = id;
        let emptied = index.take_if_empty(old.id);
        drop(index);
        if emptied.is_some() {
            self.delete_segment(old.id);
        }
        Ok(())
    }

    /// Notes spans just written over (segment id, span) of the segment a backup is
    /// copying, if one is (call with `copying` held shared). One lock per call: an
    /// ack notes its whole batch at once.
    fn note_overwritten(&self, spans: impl IntoIterator<Item = (u64, Span)>) {
        let mut overwritten = lock(&self.overwritten);
        let Some((id, noted)) = overwritten.as_mut() else {
            return;
        };
        let before = noted.len();
        noted.extend(
            spans
                .into_iter()
                .filter(|(s, _)| s == id)
                .map(|(_, span)| span),
        );
        // Merged each time the list reaches a power of two: memory and the patch
        // under the lock stay within the segment's size, however many acks and
        // scrub retries come.
        if noted.len() >= 1024 && (before + 1).next_power_of_two() <= noted.len() {
            merge_spans(noted);
        }
    }

    /// Writes the pending appends into the active segment (with the writer's lock
    /// held, so that it is the segment they belong to), and marks it for the next
    /// flush's fsync: a flush that cleared the mark meanwhile did not cover these
    /// bytes. A failure latches as a failed fsync does (see `Shared::failed`): it is
    /// an I/O error, not a full disk (the bytes go into a zero-filled spare), and some
    /// of those appends' senders may yet wait for a later flush, which must not tell
    /// them they are stored.
    fn write_pending(&self, w: &mut Writer) -> StoreResult<()> {
        let mut pending = lock(&self.pending);
        if pending.bytes.is_empty() {
            return Ok(());
        }
        let written = if pending.segment == w.active.id {
            w.active
                .file
                .write_all_at(&pending.bytes, pending.start)
                .map_err(|e| io("writing appends", e))
        } else {
            Err(StoreError::Corrupt("appends pending for a segment left"))
        };
        if let Err(e) = written {
            self.fail(&e);
            return Err(e);
        }
        w.dirty = true;
        pending.start += pending.bytes.len() as u64;
        pending.bytes.clear();
        if pending.bytes.capacity() > MAX_PENDING {
            pending.bytes = Vec::new();
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of `segment`, the pending ones from memory.
    fn read_at(&self, segment: &Segment, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        let pending = lock(&self.pending);
        let Some((from, part)) = pending.overlap(segment.id, offset, end) else {
            drop(pending);
            return segment.file.read_exact_at(buf, offset);
        };
        let (head, tail) = buf.split_at_mut((from - offset) as usize);
        tail.copy_from_slice(&pending.bytes[part]);
        // The rest left `pending` only once written.
        drop(pending);
        segment.file.read_exact_at(head, offset)
    }

    /// Writes `bytes` over what lies at `offset` of `segment` (an ack's dead header):
    /// into memory where that is still pending, so the flush writes it with the rest.
    fn write_over(&self, segment: &Segment, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        let end = offset + bytes.len() as u64;
        let mut pending = lock(&self.pending);
        let Some((from, part)) = pending.overlap(segment.id, offset, end) else {
            drop(pending);
            return segment.file.write_all_at(bytes, offset);
        };
        let (head, tail) = bytes.split_at((from - offset) as usize);
        pending.bytes[part].copy_from_slice(tail);
        drop(pending);
        if head.is_empty() {
            return Ok(());
        }
        segment.file.write_all_at(head, offset)
    }

    /// After a failed fsync every later flush fails (see `Shared::failed`).
    fn fail(&self, e: &StoreError) {
        *lock(&self.failed) = Some(format!("an earlier fsync failed: {e}"));
    }

    fn flush(&self) -> StoreResult<()> {
        let _flushing = lock(&self.flushing);
        if let Some(e) = lock(&self.failed).as_ref() {
            return Err(StoreError::Backend(e.clone()));
        }
        // First, so that a failure leaves the marks below (though it latches): every
        // append whose writer waits for this flush is pending or written by now, and
        // whatever wrote it marked the segment for the fsync below or a later one.
        self.write_pending(&mut lock(&self.writer))?;
        let unlinked = self.unlinked.swap(false, Ordering::AcqRel);
        let acked = std::mem::take(&mut *lock(&self.ack_dirty));
        let mut files = {
            let mut w = lock(&self.writer);
            if !w.dirty && w.unsynced.is_empty() && !unlinked && acked.is_empty() {
                return Ok(());
            }
            let mut files = std::mem::take(&mut w.unsynced);
            // An ack alone leaves the active segment as it was.
            if w.dirty || !files.is_empty() || unlinked {
                files.push(w.active.clone());
            }
            w.dirty = false;
            files
        };
        for s in acked {
            if files.iter().all(|f| f.id != s.id) {
                files.push(s);
            }
        }
        let began = std::time::Instant::now();
        let synced = files
            .iter()
            .try_for_each(|s| s.file.sync_data())
            .map_err(|e| io("fsync", e))
            .and_then(|()| {
                if unlinked {
                    sync_dir(&self.dir)
                } else {
                    Ok(())
                }
            });
        if !files.is_empty() {
            crate::metrics::fsync(began.elapsed());
        }
        if let Err(e) = &synced {
            self.fail(e);
        }
        synced
    }

    fn scrub(&self) -> StoreResult<()> {
        let work: Vec<(Arc<Segment>, Vec<Dead>)> = {
            let mut index = lock(&self.index);
            index
                .segments
                .values_mut()
                .filter(|s| !s.dead.is_empty())
                .map(|s| (s.segment.clone(), std::mem::take(&mut s.dead)))
                .collect()
        };
        // Every record taken above was appended before: once this is written, none
        // is only in memory, so no later write brings its ciphertext back over a hole.
        if let Err(e) = self.write_pending(&mut lock(&self.writer)) {
            lock(&self.index).requeue(work);
            return Err(e);
        }
        let mut first = None;
        let mut work = work.into_iter();
        while let Some((segment, mut spans)) = work.next() {
            spans.sort_unstable();
            let merged: Vec<Dead> = Dead::join(spans).into_iter().map(|(d, _)| d).collect();
            let file = &segment.file;
            let copying = self.copying.read().unwrap_or_else(|e| e.into_inner());
            // Only a failed fsync latches (the kernel may have dropped dirty pages);
            // a failed header write or hole punch (a full disk can refuse to split
            // an extent) leaves the spans queued for the next pass.
            let sync = |file: &File| file.sync_data().map_err(|e| (e, true));
            let scrubbed = merged
                .iter()
                .try_for_each(|d| {
                    let header = record::dead_header(d.len, d.seq)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    file.write_all_at(&header, d.offset)
                })
                .map_err(|e| (e, false))
                // The dead headers are on disk before the holes: a crash between
                // leaves records that are dead, never ones that look torn.
                .and_then(|()| sync(file))
                .and_then(|()| {
                    merged
                        .iter()
                        .try_for_each(|d| {
                            let skip = PEEK_LEN as u64;
                            erase(file, d.offset + skip, d.len - skip)
                        })
                        .map_err(|e| (e, false))
                })
                .and_then(|()| sync(file));
            self.note_overwritten(merged.iter().map(|d| (segment.id, (d.offset, d.len))));
            drop(copying);
            if let Err((e, latch)) = scrubbed {
                // Queued again (scrubbing a span twice is harmless); the other
                // segments go on.
                let mut index = lock(&self.index);
                // After a failed fsync nothing more is tried: the rest is queued too.
                let rest = if latch {
                    work.by_ref().collect()
                } else {
                    Vec::new()
                };
                index.requeue(std::iter::once((segment, merged)).chain(rest));
                drop(index);
                let e = io("scrubbing removed messages", e);
                if latch {
                    self.fail(&e);
                    return Err(e);
                }
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests;
