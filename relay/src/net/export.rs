//! A client's account export, on a transfer stream of its own (like a download):
//! `ExportReady`, then the JSON as the writer (`crate::export`) makes it, then the
//! end of the stream. The writer runs on a blocking thread and hands its output over
//! in chunks through a small channel, so a large export never sits in memory.

use std::io::Write;
use std::sync::Arc;

use tern_proto::BlobStreamResponse;
use tracing::debug;

use super::media::respond;
use crate::core::auth::AuthenticatedDevice;
use crate::error::Error;
use crate::export::{ExportOptions, WRITE_TIMEOUT};
use crate::server::Services;

/// Bytes the writer gathers before handing them over.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the writer and the stream.
const IN_FLIGHT: usize = 4;
/// The stream's reset code when an export fails after it began.
const FAILED: u32 = 1;

/// Hands what is written to the stream's task; fails once that task is gone (the
/// client left), which stops the writer.
struct ToStream(tokio::sync::mpsc::Sender<Vec<u8>>);

impl Write for ToStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(buf.to_vec())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Streams the export of `device`'s account. Before anything is sent, an account
/// being deleted is refused as unauthenticated, one past the relay's
/// [`crate::export::EXPORTS_AT_ONCE`] as unavailable (using up none of the account's
/// rate), one past `exports_per_account` as rate limited. A client that reads nothing
/// for `WRITE_TIMEOUT` ends it; a failure once the JSON has begun resets the stream,
/// so the client never takes a cut document for a whole one.
pub(super) async fn stream(
    send: &mut quinn::SendStream,
    services: &Arc<Services>,
    verification: &Arc<crate::verification::Verification>,
    device: &AuthenticatedDevice,
    options: ExportOptions,
) -> Result<(), Error> {
    let account = device.address().account;
    if services.tombstones().contains(&account) {
        return Err(Error::Unauthorized);
    }
    let place = services.exports().enter()?;
    services.rate_limits().export(&account)?;
    if !respond(send, BlobStreamResponse::ExportReady).await {
        return Ok(());
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
    let s = services.clone();
    let v = verification.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let _place = place;
        let mut out = std::io::BufWriter::with_capacity(CHUNK, ToStream(tx));
        let now = s.clock().now();
        // A session that cannot be read (its database just failed) is left out: it
        // lasts minutes, and the stores read next fail the export anyway.
        let pending = |a: &tern_proto::AccountId| v.pending(a).ok().flatten();
        let live = crate::export::Live {
            verification_pending: Some(&pending),
        };
        crate::export::write_with(s.stores(), &account, now, options, live, &mut out)
    });
    let mut sent = true;
    while let Some(chunk) = rx.recv().await {
        let wrote = tokio::time::timeout(WRITE_TIMEOUT, send.write_all(&chunk)).await;
        if !matches!(wrote, Ok(Ok(()))) {
            sent = false;
            break;
        }
    }
    drop(rx);
    let written = writer
        .await
        .map_err(|_| Error::Unavailable("export task failed"))
        .and_then(|r| r);
    match written {
        Ok(exported) if sent => {
            debug!(
                devices = exported.devices,
                messages = exported.messages,
                "account exported"
            );
        }
        Ok(_) => {
            // The client stopped reading (or left): it must not take the cut
            // document for a whole one.
            let _ = send.reset(FAILED.into());
        }
        Err(e) => {
            debug!(error = %e, "export failed part way");
            let _ = send.reset(FAILED.into());
        }
    }
    Ok(())
}
