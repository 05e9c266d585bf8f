//! Writing a download's plaintext to its file, on a thread of its own, with direct
//! I/O where the system takes it.

use std::sync::mpsc::{Receiver, SyncSender};

use tern_platform::direct_io::{self, AlignedBuf};

/// Writes a file on a thread of its own, 256 KiB at a time, with at most
/// [`FileWriter::QUEUED`] chunks waiting: the caller goes on decrypting while the
/// last chunk is written. Chunks are recycled, so the steady state allocates nothing.
///
/// Where the system allows, whole aligned chunks are written with direct I/O,
/// bypassing the page cache: copying new data into freshly allocated page-cache
/// pages cost more than the decryption did on the VM the benchmarks run on. The last,
/// short chunk goes through the page cache.
pub(super) struct FileWriter {
    buf: AlignedBuf,
    full: Option<SyncSender<AlignedBuf>>,
    empty: Receiver<AlignedBuf>,
    /// The file, and how many bytes went to it with direct I/O.
    thread: Option<std::thread::JoinHandle<std::io::Result<(std::fs::File, u64)>>>,
    direct_bytes: u64,
}

impl FileWriter {
    const CHUNK: usize = 256 * 1024;
    const QUEUED: usize = 4;

    /// Writes from `file`'s current position on.
    pub(super) fn new(mut file: std::fs::File) -> std::io::Result<Self> {
        let (full, full_rx) = std::sync::mpsc::sync_channel::<AlignedBuf>(Self::QUEUED);
        let (empty_tx, empty) = std::sync::mpsc::channel();
        let mut at = std::io::Seek::stream_position(&mut file)?;
        let thread = std::thread::Builder::new()
            .name("tern-download-writer".into())
            .spawn(move || {
                let mut direct = direct_io::set_direct(&file, true);
                let mut direct_bytes = 0;
                for mut chunk in full_rx {
                    // Direct while aligned; the first odd chunk (or a refusal) turns
                    // direct I/O off for good.
                    if direct_io::write_all_at(&file, at, chunk.as_slice(), &mut direct)? {
                        direct_bytes += chunk.len() as u64;
                    }
                    at += chunk.len() as u64;
                    chunk.clear();
                    let _ = empty_tx.send(chunk);
                }
                if direct && !direct_io::set_direct(&file, false) {
                    return Err(std::io::Error::other("could not turn direct I/O off"));
                }
                // Handed back standing after the last byte written.
                std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(at))?;
                Ok((file, direct_bytes))
            })?;
        Ok(FileWriter {
            buf: AlignedBuf::new(Self::CHUNK),
            full: Some(full),
            empty,
            thread: Some(thread),
            direct_bytes: 0,
        })
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = self
            .empty
            .try_recv()
            .unwrap_or_else(|_| AlignedBuf::new(Self::CHUNK));
        let chunk = std::mem::replace(&mut self.buf, next);
        let sent = self.full.as_ref().map(|tx| tx.send(chunk));
        match sent {
            Some(Ok(())) => Ok(()),
            // The thread stopped on an error; `finish` reports it.
            _ => Err(std::io::Error::other("the file writer stopped")),
        }
    }

    /// Writes out everything, ends the thread and hands back the file.
    pub(super) fn finish(&mut self) -> std::io::Result<std::fs::File> {
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
        if self.buf.is_full() {
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

#[cfg(test)]
mod tests {
    use super::*;

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
            let expected = if head == 0 && direct_io::supported_in(dir.path()) {
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
