//! Transfer progress: a reader or writer that counts the sealed bytes passing
//! through it and tells a callback, so an app can draw a progress bar.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

/// Called with (sealed bytes done, sealed bytes in all) as a transfer moves; a
/// resumed transfer starts at what was done before. Called on the transfer's task:
/// keep it quick (post to the UI thread, say).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

/// A progress callback that ignores every call.
pub(crate) fn no_progress(_done: u64, _total: u64) {}

/// `inner`, counting: the position (reads and seeks) or the bytes written after `at`.
pub(super) struct Counted<'p, T> {
    pub(super) inner: T,
    pub(super) at: u64,
    pub(super) total: u64,
    pub(super) progress: Progress<'p>,
}

impl<T> Counted<'_, T> {
    fn advance(&mut self, n: usize) {
        self.at = self.at.saturating_add(n as u64);
        (self.progress)(self.at.min(self.total), self.total);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let n = buf.filled().len() - before;
            self.advance(n);
        }
        polled
    }
}

impl<T: AsyncSeek + Unpin> AsyncSeek for Counted<'_, T> {
    fn start_seek(mut self: Pin<&mut Self>, position: std::io::SeekFrom) -> std::io::Result<()> {
        Pin::new(&mut self.inner).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        let polled = Pin::new(&mut self.inner).poll_complete(cx);
        if let Poll::Ready(Ok(position)) = polled {
            self.at = position;
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.advance(n);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn reads_after_a_seek_report_the_position_and_writes_count_from_the_start() {
        let seen = Mutex::new(Vec::new());
        let record = |done, total| {
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((done, total))
        };
        let mut reader = Counted {
            inner: std::io::Cursor::new(vec![1u8; 100]),
            at: 0,
            total: 100,
            progress: &record,
        };
        reader
            .seek(std::io::SeekFrom::Start(40))
            .await
            .expect("seek");
        let mut buf = [0u8; 25];
        reader.read_exact(&mut buf).await.expect("read");
        let mut writer = Counted {
            inner: Vec::new(),
            at: 90,
            total: 100,
            progress: &record,
        };
        writer.write_all(&[0; 10]).await.expect("write");
        let seen = seen.into_inner().unwrap_or_else(|e| e.into_inner());
        assert_eq!(seen.first(), Some(&(65, 100)), "{seen:?}");
        assert_eq!(seen.last(), Some(&(100, 100)), "{seen:?}");
        assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
    }
}
