//! Downloading an attachment: streamed through decryption into a partial file,
//! checked against its pointer, then renamed into place; resumed after a drop.

use std::path::{Path, PathBuf};

use super::progress::{no_progress, Counted, Progress};
use super::sink::{record_progress, DecryptingSink, HashOnly, Hashing, RECORD_LEN};
use super::writer::FileWriter;
use super::{media_err, AttachmentPointer};
use crate::crypto::attachment::{self, Decryptor};
use crate::error::{Error, Result};
use crate::net::RelayConnection;

/// `<dest><suffix>`, beside `dest`.
fn beside(dest: &Path, suffix: &str) -> PathBuf {
    let mut name = dest
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    dest.with_file_name(name)
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
    download_with_progress(conn, pointer, dest, &no_progress).await
}

/// [`download`], telling `progress` the sealed bytes received so far (counted from
/// where a resumed download starts).
pub async fn download_with_progress(
    conn: &RelayConnection,
    pointer: &AttachmentPointer,
    dest: &Path,
    progress: Progress<'_>,
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
        // The file alone is written: the padding after `size` only checked.
        decryptor: Some(decryptor.with_size(pointer.size)),
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
    let mut counted = Counted {
        inner: &mut sink,
        at: offset,
        total: pointer.sealed_size,
        progress,
    };
    let fetched = conn
        .download_blob(&pointer.blob_id, offset, &mut counted)
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
