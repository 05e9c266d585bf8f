//! Direct file I/O (`O_DIRECT`): the aligned buffers it needs, and turning it on and
//! off with its fallback to the page cache. The relay's media files and the client's
//! downloads both write (and the relay reads) through these; why direct I/O pays for
//! media is written in the relay's `media` module docs.
//!
//! Direct I/O asks that the memory address, the file offset and the length all be
//! multiples of [`DIRECT_ALIGN`]. A file system that does not take it refuses with
//! `EINVAL`, when the flag is set or at the first read or write; then the page cache
//! does the work, for that file from then on. Only Linux and Android have it here;
//! elsewhere [`set_direct`] answers `false` and everything goes through the page cache.

use std::fs::File;
use std::io;
use std::path::Path;

/// What direct I/O needs lined up: memory address, file offset and length. 4 KiB
/// covers 512-byte and 4 KiB logical blocks.
pub const DIRECT_ALIGN: usize = 4096;

/// `n` (at least 1) rounded up to a multiple of [`DIRECT_ALIGN`].
pub fn align_up(n: usize) -> usize {
    n.div_ceil(DIRECT_ALIGN).max(1) * DIRECT_ALIGN
}

/// Whether writing `bytes` at file offset `at` meets direct I/O's alignment (see
/// [`DIRECT_ALIGN`]).
pub fn is_aligned(at: u64, bytes: &[u8]) -> bool {
    at % DIRECT_ALIGN as u64 == 0
        && bytes.len() % DIRECT_ALIGN == 0
        && (bytes.as_ptr() as usize) % DIRECT_ALIGN == 0
}

/// Turns direct I/O on or off for `file`; whether the system took it.
pub fn set_direct(file: &File, on: bool) -> bool {
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

/// `EINVAL`, which is how direct I/O is refused.
pub fn is_einval(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidInput
}

/// Writes all of `bytes` at file offset `at`. `direct` says whether direct I/O is on
/// for `file` (as [`set_direct`] left it): then an aligned write goes direct. An
/// unaligned write, or one the file system refuses (`EINVAL`), goes through the page
/// cache, after direct I/O is turned off for the file and `direct` set to `false`; a
/// part written before a refusal is written over. Returns whether the write was direct.
pub fn write_all_at(file: &File, at: u64, bytes: &[u8], direct: &mut bool) -> io::Result<bool> {
    if *direct && !bytes.is_empty() && is_aligned(at, bytes) {
        match positional::write_all_at(file, bytes, at) {
            Ok(()) => return Ok(true),
            // Not for this file after all: the page cache will do.
            Err(e) if is_einval(&e) => {
                *direct = false;
                if !set_direct(file, false) {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    if *direct {
        *direct = false;
        if !set_direct(file, false) {
            return Err(io::Error::other("could not turn direct I/O off"));
        }
    }
    positional::write_all_at(file, bytes, at)?;
    Ok(false)
}

/// Whether the file system under `dir` takes direct I/O, asked by opening a file there
/// with `O_DIRECT` and writing one aligned block (not with [`set_direct`]): tests use
/// it to know what the code under test should have done. Linux's ext4 and xfs take
/// it; tmpfs before Linux 6.6 does not. Exported for tests; the probe file is removed.
pub fn supported_in(dir: &Path) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let probe = dir.join("direct-probe");
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&probe);
        let mut block = AlignedBuf::new(DIRECT_ALIGN);
        block.fill(&[0; DIRECT_ALIGN]);
        let direct =
            opened.is_ok_and(|f| positional::write_all_at(&f, block.as_slice(), 0).is_ok());
        let _ = std::fs::remove_file(&probe);
        direct
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = dir;
        false
    }
}

/// A buffer whose bytes start at an address aligned for direct I/O, reused from
/// write to write (or read to read): it never grows, so its start stays aligned.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
    room: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `capacity` bytes, rounded up to [`DIRECT_ALIGN`].
    pub fn new(capacity: usize) -> Self {
        let capacity = align_up(capacity);
        let raw = vec![0u8; capacity + DIRECT_ALIGN];
        // (Were the start not found, the buffer would be unaligned: direct writes
        // would not be tried, and direct reads would be refused and fall back.)
        let start = match raw.as_ptr().align_offset(DIRECT_ALIGN) {
            s if s < DIRECT_ALIGN => s,
            _ => 0,
        };
        AlignedBuf {
            raw,
            start,
            len: 0,
            room: capacity,
        }
    }

    /// The most bytes it holds.
    pub fn capacity(&self) -> usize {
        self.raw.len() - DIRECT_ALIGN
    }

    /// Bytes it holds now.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the buffer; it will take at most `room` bytes (at most the capacity),
    /// so that a write can end on an aligned file offset.
    pub fn reset(&mut self, room: usize) {
        self.len = 0;
        self.room = room.min(self.capacity());
    }

    /// Empties the buffer; it will take up to its capacity.
    pub fn clear(&mut self) {
        self.reset(usize::MAX);
    }

    /// Copies in as much of `bytes` as there is room for; returns how much.
    pub fn fill(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.room - self.len);
        let at = self.start + self.len;
        self.raw[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        n
    }

    /// Whether it holds as many bytes as it may take.
    pub fn is_full(&self) -> bool {
        self.len == self.room
    }

    /// The bytes it holds.
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// Replaces the contents with up to `want` bytes (at most the capacity) of `file`
    /// from offset `at`; returns how many it holds, fewer at the end of the file.
    /// With `direct` (direct I/O on for `file`), `at` must be aligned: whole blocks
    /// are read, and a short read ends the file.
    pub fn read_at(
        &mut self,
        file: &File,
        at: u64,
        want: usize,
        direct: bool,
    ) -> io::Result<usize> {
        self.clear();
        let want = want.min(self.capacity());
        let align = if direct { DIRECT_ALIGN } else { 1 };
        let io_len = want.div_ceil(align) * align;
        let (from, to) = (self.start, self.start + io_len);
        let mut got = 0;
        while got < want {
            let n = positional::read_at(file, &mut self.raw[from + got..to], at + got as u64)?;
            got += n;
            // A short direct read ends the file (another read would be misaligned).
            if n == 0 || (direct && n % DIRECT_ALIGN != 0) {
                break;
            }
        }
        self.len = got.min(want);
        Ok(self.len)
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("room", &self.room)
            .finish()
    }
}

/// Reads and writes at an offset: `pread`/`pwrite` on Unix, seek then read or write
/// elsewhere.
mod positional {
    use std::fs::File;
    use std::io;

    #[cfg(unix)]
    pub(super) fn write_all_at(file: &File, bytes: &[u8], at: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(file, bytes, at)
    }

    #[cfg(unix)]
    pub(super) fn read_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(file, buf, at)
    }

    #[cfg(not(unix))]
    pub(super) fn write_all_at(mut file: &File, bytes: &[u8], at: u64) -> io::Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        file.seek(SeekFrom::Start(at))?;
        file.write_all(bytes)
    }

    #[cfg(not(unix))]
    pub(super) fn read_at(mut file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
        use std::io::{Read, Seek, SeekFrom};
        file.seek(SeekFrom::Start(at))?;
        file.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_buffer_is_aligned_and_stops_where_told() {
        let mut buf = AlignedBuf::new(10_000);
        assert_eq!(buf.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(
            buf.fill(&[1; 20_000]),
            3 * DIRECT_ALIGN,
            "rounded up to 12 KiB"
        );
        assert!(buf.is_full());
        buf.reset(100);
        assert!(buf.as_slice().is_empty());
        assert_eq!(buf.fill(&[2; 60]), 60);
        assert_eq!(buf.fill(&[3; 60]), 40);
        assert!(buf.is_full());
        assert_eq!(buf.as_slice(), [[2; 60].as_slice(), &[3; 40]].concat());
        buf.reset(usize::MAX);
        assert_eq!(
            buf.fill(&[4; 20_000]),
            3 * DIRECT_ALIGN,
            "never past capacity"
        );
    }

    #[test]
    fn sizes_round_up_to_whole_blocks() {
        assert_eq!(align_up(0), DIRECT_ALIGN);
        assert_eq!(align_up(1), DIRECT_ALIGN);
        assert_eq!(align_up(DIRECT_ALIGN), DIRECT_ALIGN);
        assert_eq!(align_up(DIRECT_ALIGN + 1), 2 * DIRECT_ALIGN);
        let mut buf = AlignedBuf::new(DIRECT_ALIGN);
        buf.fill(&[0; DIRECT_ALIGN]);
        assert!(is_aligned(0, buf.as_slice()));
        assert!(!is_aligned(1, buf.as_slice()));
        assert!(!is_aligned(0, &buf.as_slice()[1..]));
    }

    /// `n` bytes that differ from block to block, so a misplaced block shows.
    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn aligned_writes_go_direct_where_the_file_system_takes_it_and_odd_ones_do_not() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("file");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let bytes = pattern(3 * DIRECT_ALIGN + 100);
        let mut direct = set_direct(&file, true);
        let supported = supported_in(dir.path());
        let mut buf = AlignedBuf::new(2 * DIRECT_ALIGN);
        buf.fill(&bytes[..2 * DIRECT_ALIGN]);
        assert_eq!(
            write_all_at(&file, 0, buf.as_slice(), &mut direct).expect("write"),
            supported
        );
        buf.clear();
        buf.fill(&bytes[2 * DIRECT_ALIGN..]);
        assert!(
            !write_all_at(&file, 2 * DIRECT_ALIGN as u64, buf.as_slice(), &mut direct)
                .expect("odd write")
        );
        assert!(!direct, "an odd write turns direct I/O off for good");
        assert_eq!(std::fs::read(&path).expect("read"), bytes);
        // Read back in whole blocks from an aligned start, directly where it is taken.
        let direct = supported && set_direct(&file, true);
        let mut got = Vec::new();
        let mut buf = AlignedBuf::new(DIRECT_ALIGN);
        loop {
            let n = match buf.read_at(&file, got.len() as u64, DIRECT_ALIGN, direct) {
                Err(e) if is_einval(&e) => {
                    assert!(set_direct(&file, false));
                    buf.read_at(&file, got.len() as u64, DIRECT_ALIGN, false)
                }
                r => r,
            }
            .expect("read");
            got.extend_from_slice(buf.as_slice());
            if n < DIRECT_ALIGN {
                break;
            }
        }
        assert_eq!(got, bytes);
    }
}
