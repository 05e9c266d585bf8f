//! Taking a removed record's bytes off the disk: a hole where the filesystem has
//! them, zeros where it does not.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Deallocates `len` bytes at `offset` (they read back as zeros); where holes are not
/// supported, overwrites them with zeros. Any other failure (ENOSPC) is returned:
/// writing zeros over a span already punched would allocate blocks on a full disk.
pub(super) fn erase(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::{fallocate, FallocateFlags};
        use rustix::io::Errno;
        match fallocate(
            file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => return Ok(()),
            Err(Errno::OPNOTSUPP) => {}
            Err(e) => return Err(e.into()),
        }
    }
    write_zeros(file, offset, len)
}

pub(super) fn write_zeros(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; (1 << 20).min(usize::try_from(len).unwrap_or(1 << 20))];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}
