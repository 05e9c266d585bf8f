//! Attachments: encrypt a file once with its own key, upload it once, send its
//! [`AttachmentPointer`] in a message; recipients download and decrypt it, and anyone
//! who has the pointer forwards it without uploading anything: the relay only keeps
//! the blob longer.
//!
//! Memory stays bounded whatever the size: encryption holds two 64 KiB segments,
//! transfers move 256 KiB at a time, decryption holds one segment. Uploads and
//! downloads resume after a dropped connection: call them again with the same files.
//!
//! ```no_run
//! # async fn run(conn: tern_client::net::RelayConnection) -> tern_client::Result<()> {
//! use std::path::Path;
//! use tern_client::media;
//!
//! let (pointer, _) =
//!     media::upload(&conn, Path::new("photo.jpg"), Path::new("cache/photo.sealed")).await?;
//! let bytes = pointer.to_bytes(); // put these in a message
//! // The recipient, with the pointer from the message:
//! let pointer = media::AttachmentPointer::from_bytes(&bytes)?;
//! media::download(&conn, &pointer, Path::new("downloads/photo.jpg")).await?;
//! media::forward(&conn, &pointer).await?; // then send the same bytes to someone else
//! # Ok(()) }
//! ```

use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use prost::Message;
use rand::rngs::OsRng;
use rand::RngCore;
use tern_proto::e2e;

use crate::crypto::attachment::{self, Decryptor};
use crate::error::{Error, Result};
use crate::net::{RelayConnection, Uploaded};

/// Everything needed to fetch and decrypt an attachment. Travels inside end-to-end
/// encrypted messages only: it holds the attachment's key.
#[derive(Clone, PartialEq, Eq)]
pub struct AttachmentPointer {
    /// SHA-256 of the encrypted blob: its name on the relay.
    pub blob_id: [u8; 32],
    /// The attachment's key.
    pub key: [u8; 32],
    /// Plaintext bytes.
    pub size: u64,
    /// Encrypted bytes (what the relay stores).
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
        e2e::AttachmentPointer {
            blob_id: self.blob_id.to_vec().into(),
            key: self.key.to_vec().into(),
            size: self.size,
            sealed_size: self.sealed_size,
            digest: self.digest.to_vec().into(),
            content_type: self.content_type.clone(),
            file_name: self.file_name.clone(),
        }
        .encode_to_vec()
    }

    /// Parses [`AttachmentPointer::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = || Error::Media("not an attachment pointer".into());
        let p = e2e::AttachmentPointer::decode(bytes).map_err(|_| bad())?;
        if attachment::sealed_len(p.size) != Some(p.sealed_size) {
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

fn media_err(e: impl std::fmt::Display) -> Error {
    Error::Media(e.to_string())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Error::Media("worker stopped".into()))?
}

/// Encrypts the file at `plaintext` with a fresh key into `sealed` (a file the app
/// keeps until the upload is done, so a resumed upload sends the same bytes), then
/// uploads it. Returns the pointer and how the upload went.
pub async fn upload(
    conn: &RelayConnection,
    plaintext: &Path,
    sealed: &Path,
) -> Result<(AttachmentPointer, Uploaded)> {
    let pointer = encrypt_file(plaintext, sealed).await?;
    let uploaded = resume_upload(conn, &pointer, sealed).await?;
    Ok((pointer, uploaded))
}

/// Encrypts a file for upload: the pointer to send and the sealed file to upload.
pub async fn encrypt_file(plaintext: &Path, sealed: &Path) -> Result<AttachmentPointer> {
    let (src, dst) = (plaintext.to_path_buf(), sealed.to_path_buf());
    blocking(move || {
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut key[..]);
        let input = BufReader::new(std::fs::File::open(&src).map_err(media_err)?);
        let file = std::fs::File::create(&dst).map_err(media_err)?;
        let mut out = BufWriter::new(&file);
        let e = attachment::encrypt(&mut OsRng, &key, input, &mut out).map_err(media_err)?;
        drop(out);
        file.sync_all().map_err(media_err)?;
        Ok(AttachmentPointer {
            blob_id: e.blob_id,
            key: *key,
            size: e.size,
            sealed_size: e.sealed_size,
            digest: e.digest,
            content_type: String::new(),
            file_name: src
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        })
    })
    .await
}

/// Uploads (or finishes uploading) the sealed file of `pointer`: nothing if the relay
/// has it, only the rest if an earlier upload was cut off.
pub async fn resume_upload(
    conn: &RelayConnection,
    pointer: &AttachmentPointer,
    sealed: &Path,
) -> Result<Uploaded> {
    let mut file = tokio::fs::File::open(sealed).await.map_err(media_err)?;
    conn.upload_blob(&pointer.blob_id, pointer.sealed_size, &mut file)
        .await
}

/// A forward: the relay keeps the blob another full term, and the same pointer goes
/// into the message to the next person; no bytes move. Fails with the relay's
/// `NOT_FOUND` if the blob expired (the sender must upload it again).
pub async fn forward(conn: &RelayConnection, pointer: &AttachmentPointer) -> Result<u64> {
    conn.touch_blob(&pointer.blob_id).await
}

/// `<dest><suffix>`, beside `dest`.
fn beside(dest: &Path, suffix: &str) -> PathBuf {
    let mut name = dest
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    dest.with_file_name(name)
}

/// Decrypts a download as it arrives: the ciphertext never touches the disk, and
/// the plaintext file only ever holds authenticated segments, so an interrupted
/// download resumes at the first segment it lacks. Decryption and the digest run
/// inline (about 0.35 ms per 256 KiB here); writing the file runs on a thread of its
/// own ([`FileWriter`]), so the two overlap.
struct DecryptingSink {
    decryptor: Option<Decryptor>,
    out: Hashing,
    /// The blob's first bytes, kept beside the partial file for a resume.
    header: Vec<u8>,
    header_path: PathBuf,
    blob_id: [u8; 32],
}

impl DecryptingSink {
    fn write_chunk(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if self.header.len() < attachment::HEADER_LEN {
            let n = (attachment::HEADER_LEN - self.header.len()).min(buf.len());
            self.header.extend_from_slice(&buf[..n]);
            if self.header.len() == attachment::HEADER_LEN {
                // Tied to the blob: a leftover of another download is never resumed.
                // No segment is vouched for yet (see `record_progress`).
                write_resume_record(&self.header_path, &self.header, &self.blob_id, 0)?;
            }
        }
        let d = self
            .decryptor
            .as_mut()
            .ok_or_else(|| std::io::Error::other("download finished"))?;
        d.update(buf, &mut self.out).map_err(std::io::Error::other)
    }
}

impl tokio::io::AsyncWrite for DecryptingSink {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(self.write_chunk(buf).map(|()| buf.len()))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(std::io::Write::flush(&mut self.out))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.poll_flush(cx)
    }
}

/// header (8) || blob id (32) || whole segments vouched for (u64).
const RECORD_LEN: usize = attachment::HEADER_LEN + 32 + 8;

fn write_resume_record(
    path: &Path,
    header: &[u8],
    blob_id: &[u8; 32],
    segments: u64,
) -> std::io::Result<()> {
    std::fs::write(path, [header, blob_id, &segments.to_be_bytes()].concat())
}

/// After an interruption: the plaintext so far is made durable, then recorded as the
/// point a resume may start from.
fn record_progress(sink: &mut DecryptingSink) -> std::io::Result<()> {
    let file = sink.out.file.finish()?;
    file.sync_all()?;
    let segments = file.metadata()?.len() / attachment::SEGMENT as u64;
    if sink.header.len() == attachment::HEADER_LEN {
        write_resume_record(&sink.header_path, &sink.header, &sink.blob_id, segments)?;
    }
    Ok(())
}

/// Feeds a hash, writes nothing.
struct HashOnly<'a>(&'a mut sha2::Sha256);

impl std::io::Write for HashOnly<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        sha2::Digest::update(self.0, buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A file that hashes what is written to it: the plaintext's digest, checked at the end.
struct Hashing {
    file: FileWriter,
    hash: sha2::Sha256,
}

impl std::io::Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        sha2::Digest::update(&mut self.hash, &buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Writes a file on a thread of its own, 256 KiB at a time, with at most
/// [`FileWriter::QUEUED`] chunks waiting: the caller goes on decrypting while the
/// last chunk is written. Chunks are recycled, so the steady state allocates nothing.
///
/// Where the system allows, whole aligned chunks are written with direct I/O,
/// bypassing the page cache: copying new data into freshly allocated page-cache
/// pages cost more than the decryption did on the VM the benchmarks run on. The last,
/// short chunk goes through the page cache.
struct FileWriter {
    buf: Chunk,
    full: Option<std::sync::mpsc::SyncSender<Chunk>>,
    empty: std::sync::mpsc::Receiver<Chunk>,
    /// The file, and how many bytes went to it with direct I/O.
    thread: Option<std::thread::JoinHandle<std::io::Result<(std::fs::File, u64)>>>,
    direct_bytes: u64,
}

/// What direct I/O needs lined up: memory address, file offset and length.
const DIRECT_ALIGN: usize = 4096;

/// A chunk of a file's bytes, in memory aligned for direct I/O.
struct Chunk {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Chunk {
    fn new() -> Self {
        let raw = vec![0u8; FileWriter::CHUNK + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        Chunk { raw, start, len: 0 }
    }

    /// Copies in as much of `bytes` as fits; returns how much.
    fn fill(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(FileWriter::CHUNK - self.len);
        let at = self.start + self.len;
        self.raw[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        n
    }

    fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

/// Sets or clears direct I/O on `file`; whether the system took it.
fn set_direct(file: &std::fs::File, on: bool) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
        fcntl_getfl(file)
            .and_then(|f| {
                let f = if on {
                    f | OFlags::DIRECT
                } else {
                    f - OFlags::DIRECT
                };
                fcntl_setfl(file, f)
            })
            .is_ok()
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = (file, on);
        false
    }
}

/// Writes `chunk` at `at`: directly if `direct` and it is aligned, else through the
/// page cache (turning direct I/O off for good the first time). Direct I/O refused
/// (`EINVAL`) falls back too; a part written before the refusal is written over.
/// Returns whether the write was direct.
fn write_chunk(
    file: &mut std::fs::File,
    direct: &mut bool,
    chunk: &[u8],
    at: u64,
) -> std::io::Result<bool> {
    use std::io::{Seek, SeekFrom, Write};
    let aligned = at % DIRECT_ALIGN as u64 == 0
        && chunk.len() % DIRECT_ALIGN == 0
        && (chunk.as_ptr() as usize) % DIRECT_ALIGN == 0;
    if *direct && aligned {
        match file.write_all(chunk) {
            // EINVAL: not for this file after all.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                file.seek(SeekFrom::Start(at))?;
            }
            r => return r.map(|()| true),
        }
    }
    if *direct {
        *direct = false;
        if !set_direct(file, false) {
            return Err(std::io::Error::other("could not turn direct I/O off"));
        }
    }
    file.write_all(chunk).map(|()| false)
}

impl FileWriter {
    const CHUNK: usize = 256 * 1024;
    const QUEUED: usize = 4;

    /// Writes from `file`'s current position on.
    fn new(mut file: std::fs::File) -> std::io::Result<Self> {
        let (full, full_rx) = std::sync::mpsc::sync_channel::<Chunk>(Self::QUEUED);
        let (empty_tx, empty) = std::sync::mpsc::channel();
        let mut at = std::io::Seek::stream_position(&mut file)?;
        let thread = std::thread::Builder::new()
            .name("tern-download-writer".into())
            .spawn(move || {
                let mut direct = set_direct(&file, true);
                let mut direct_bytes = 0;
                for mut chunk in full_rx {
                    if write_chunk(&mut file, &mut direct, chunk.as_slice(), at)? {
                        direct_bytes += chunk.len as u64;
                    }
                    at += chunk.len as u64;
                    chunk.len = 0;
                    let _ = empty_tx.send(chunk);
                }
                if direct && !set_direct(&file, false) {
                    return Err(std::io::Error::other("could not turn direct I/O off"));
                }
                Ok((file, direct_bytes))
            })?;
        Ok(FileWriter {
            buf: Chunk::new(),
            full: Some(full),
            empty,
            thread: Some(thread),
            direct_bytes: 0,
        })
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.len == 0 {
            return Ok(());
        }
        let next = self.empty.try_recv().unwrap_or_else(|_| Chunk::new());
        let chunk = std::mem::replace(&mut self.buf, next);
        let sent = self.full.as_ref().map(|tx| tx.send(chunk));
        match sent {
            Some(Ok(())) => Ok(()),
            // The thread stopped on an error; `finish` reports it.
            _ => Err(std::io::Error::other("the file writer stopped")),
        }
    }

    /// Writes out everything, ends the thread and hands back the file.
    fn finish(&mut self) -> std::io::Result<std::fs::File> {
        let sent = self.send();
        self.full = None;
        let thread = self
            .thread
            .take()
            .ok_or_else(|| std::io::Error::other("the file writer already finished"))?;
        let (file, direct_bytes) = thread
            .join()
            .map_err(|_| std::io::Error::other("the file writer panicked"))??;
        self.direct_bytes = direct_bytes;
        sent.map(|()| file)
    }
}

impl std::io::Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.buf.fill(buf);
        if self.buf.len == Self::CHUNK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        self.full = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Downloads and decrypts an attachment into `dest`, authenticating every segment as
/// it arrives (under the attachment's own key, so no other ciphertext passes) and the
/// whole plaintext against the pointer's digest. Plaintext goes to `<dest>.part` and
/// is renamed to `dest` only once complete and checked; if the connection drops, call
/// this again and it resumes after the last whole segment. Returns the plaintext size.
pub async fn download(
    conn: &RelayConnection,
    pointer: &AttachmentPointer,
    dest: &Path,
) -> Result<u64> {
    let (part, header_path) = (beside(dest, ".part"), beside(dest, ".part-header"));
    let resumable = match (std::fs::metadata(&part), std::fs::read(&header_path)) {
        (Ok(m), Ok(saved)) if saved.len() == RECORD_LEN && saved[8..40] == pointer.blob_id => {
            // Only segments both on disk and vouched for by the record (written after
            // an fsync) count: after a crash the file's tail may be torn.
            let recorded = u64::from_be_bytes(saved[40..48].try_into().unwrap_or([0; 8]));
            let on_disk = m.len() / attachment::SEGMENT as u64;
            Some((
                on_disk.min(recorded),
                saved[..attachment::HEADER_LEN].to_vec(),
            ))
        }
        _ => None,
    };
    let (decryptor, file, hash, header, segments) = match resumable {
        Some((segments, header)) => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&part)
                .map_err(media_err)?;
            // Only whole segments count; anything after them is written again.
            file.set_len(segments * attachment::SEGMENT as u64)
                .map_err(media_err)?;
            // The plaintext so far goes into the digest, read back once.
            let mut hash = <sha2::Sha256 as sha2::Digest>::new();
            let mut file = file;
            std::io::copy(
                &mut std::io::Read::take(&mut file, segments * attachment::SEGMENT as u64),
                &mut HashOnly(&mut hash),
            )
            .map_err(media_err)?;
            std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(media_err)?;
            let d = Decryptor::resume(&pointer.key, &header, segments);
            (d, file, hash, header, segments)
        }
        None => {
            let file = std::fs::File::create(&part).map_err(media_err)?;
            let hash = <sha2::Sha256 as sha2::Digest>::new();
            // The blob id is not hashed again here: a segment under the pointer's key
            // and the plaintext digest pin the content already, and the hash would
            // cost a third of the decryption's time.
            let d = Decryptor::resume(&pointer.key, &[], 0);
            (d, file, hash, Vec::new(), 0)
        }
    };
    let file = FileWriter::new(file).map_err(media_err)?;
    let mut sink = DecryptingSink {
        decryptor: Some(decryptor),
        out: Hashing { file, hash },
        header,
        header_path: header_path.clone(),
        blob_id: pointer.blob_id,
    };
    let resuming = sink.header.len() == attachment::HEADER_LEN;
    // A resume starts after the header it already has, at its first missing segment.
    let offset = if resuming {
        Decryptor::offset_of(segments)
    } else {
        0
    };
    let cleanup = |result: Result<u64>| {
        // Anything but a dropped connection: the partial state is not kept (a resume
        // that the relay refused, or that failed its checks, starts over next time).
        if matches!(&result, Err(e) if !matches!(e, Error::Closed(_))) {
            // A blob that fails its checks is not kept for a resume.
            let _ = std::fs::remove_file(&part);
            let _ = std::fs::remove_file(&header_path);
        }
        result
    };
    let fetched = conn
        .download_blob(&pointer.blob_id, offset, &mut sink)
        .await;
    match fetched {
        Ok(size) if size == pointer.sealed_size => {}
        Ok(_) => {
            return cleanup(Err(Error::Media(
                "the relay's blob has another size".into(),
            )))
        }
        // Interrupted: what was authenticated stays for the next call.
        Err(e) => {
            let _ = record_progress(&mut sink);
            return cleanup(Err(e));
        }
    }
    let finished = (|| {
        let d = sink
            .decryptor
            .take()
            .ok_or_else(|| media_err("download finished"))?;
        d.finish(&mut sink.out).map_err(media_err)?;
        let Hashing { mut file, hash } = sink.out;
        let file = file.finish().map_err(media_err)?;
        file.sync_all().map_err(media_err)?;
        let size = file.metadata().map_err(media_err)?.len();
        if size != pointer.size {
            return Err(media_err(
                "the attachment has another size than its pointer says",
            ));
        }
        if <[u8; 32]>::from(sha2::Digest::finalize(hash)) != pointer.digest {
            return Err(media_err("the attachment does not match its digest"));
        }
        std::fs::rename(&part, dest).map_err(media_err)?;
        let _ = std::fs::remove_file(&header_path);
        Ok(size)
    })();
    cleanup(finished)
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
        assert!(AttachmentPointer::from_bytes(&[0xff, 0xff]).is_err());
    }

    /// Whether the file system under `dir` takes direct I/O (asked with `open`, not
    /// with the code under test).
    fn direct_io_here(dir: &Path) -> bool {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let probe = dir.join("direct-probe");
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(&probe);
            let mut chunk = Chunk::new();
            chunk.fill(&[0; DIRECT_ALIGN]);
            let direct = opened.is_ok_and(|mut f| f.write_all(chunk.as_slice()).is_ok());
            let _ = std::fs::remove_file(&probe);
            direct
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = dir;
            false
        }
    }

    #[test]
    fn the_file_writer_writes_every_byte_from_an_aligned_or_odd_start() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("dir");
        let bytes: Vec<u8> = (0..3 * FileWriter::CHUNK + 777)
            .map(|i| (i % 251) as u8)
            .collect();
        // From 0 (direct where allowed, then a short tail), and from an odd offset
        // (through the page cache throughout).
        for (name, head) in [("aligned", 0usize), ("odd", 100)] {
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes[..head]).expect("head");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open");
            std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).expect("seek");
            let mut w = FileWriter::new(file).expect("writer");
            // Odd-sized writes, as decryption hands them over.
            for piece in bytes[head..].chunks(10_007) {
                w.write_all(piece).expect("write");
            }
            let mut file = w.finish().expect("finish");
            assert_eq!(
                std::io::Seek::stream_position(&mut file).expect("position"),
                bytes.len() as u64
            );
            // The three whole chunks go direct from an aligned start, where the file
            // system allows it; from an odd start nothing does.
            let expected = if head == 0 && direct_io_here(dir.path()) {
                3 * FileWriter::CHUNK as u64
            } else {
                0
            };
            assert_eq!(w.direct_bytes, expected, "{name}");
            drop(file);
            assert_eq!(std::fs::read(&path).expect("read"), bytes, "{name}");
        }
    }
}
