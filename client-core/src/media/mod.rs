//! Attachments: encrypt a file once with its own key, upload it once, send its
//! [`AttachmentPointer`] in a message; recipients download and decrypt it, and anyone
//! who has the pointer forwards it without uploading anything: the relay only keeps
//! the blob longer.
//!
//! Memory stays bounded whatever the size: encryption holds two 64 KiB segments,
//! transfers move 256 KiB at a time, decryption holds one segment. Uploads and
//! downloads resume after a dropped connection: call them again with the same files.
//!
//! # Layout
//! - this module: encrypting a file ([`encrypt_file`]), uploading it ([`upload`],
//!   [`resume_upload`]) and forwarding it ([`forward`]).
//! - `pointer`: the [`AttachmentPointer`] a message carries.
//! - `download`: [`download`], resumable, checked before the file is renamed into place.
//! - `sink`: the decrypting sink a download streams into, and its resume record.
//! - `writer`: the file writer on a thread of its own, with direct I/O where the system
//!   takes it (through [`tern_platform::direct_io`]).
//! - The wire side is `net::media` ([`RelayConnection::upload_blob`] and friends).
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
use std::path::Path;

use rand::rngs::OsRng;
use rand::RngCore;

use crate::crypto::attachment;
use crate::error::{Error, Result};
use crate::net::{RelayConnection, Uploaded};

mod download;
mod pointer;
mod progress;
mod sink;
mod writer;

pub use download::{download, download_with_progress};
pub use pointer::AttachmentPointer;
pub(crate) use progress::no_progress;
pub use progress::Progress;

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
    resume_upload_with_progress(conn, pointer, sealed, &no_progress).await
}

/// [`resume_upload`], telling `progress` the sealed bytes sent so far (counted from
/// where a resumed upload starts).
pub async fn resume_upload_with_progress(
    conn: &RelayConnection,
    pointer: &AttachmentPointer,
    sealed: &Path,
    progress: Progress<'_>,
) -> Result<Uploaded> {
    let file = tokio::fs::File::open(sealed).await.map_err(media_err)?;
    let mut file = progress::Counted {
        inner: file,
        at: 0,
        total: pointer.sealed_size,
        progress,
    };
    conn.upload_blob(&pointer.blob_id, pointer.sealed_size, &mut file)
        .await
}

/// A forward: the relay keeps the blob another full term, and the same pointer goes
/// into the message to the next person; no bytes move. Fails with the relay's
/// `NOT_FOUND` if the blob expired (the sender must upload it again).
pub async fn forward(conn: &RelayConnection, pointer: &AttachmentPointer) -> Result<u64> {
    conn.touch_blob(&pointer.blob_id).await
}
