//! `send-timeout`: a connection whose client takes none of its answer for that long is closed.
//!
//! Answers leave through bounded buffers (a streamed NAR, blob or export through
//! `stream::ChannelWriter`, a realisation's events through its outbox), so a client that stops
//! reading costs the daemon no memory beyond them. It did cost it everything else the answer's
//! producer held, for as long as the client kept the connection open: a thread of the blocking
//! pool parked on the full channel, the temporary roots of the path or blob being sent (which
//! `gc` then could not collect), a connection slot. A few hundred such downloads would have
//! taken the whole blocking pool, and with it every store operation.
//!
//! hyper has a timeout for reading a request head but none for writing an answer, so the
//! connection's stream is wrapped in [`SendDeadline`]: while a write (or flush) makes no progress
//! — the client's receive buffer and the socket's send buffer are full — a timer runs; any write
//! that goes through stops it; when it fires, the write fails with `TimedOut`. hyper then drops
//! the connection, the answer's body and with it the channel's receiver, and the producer's next
//! send fails: it stops and releases what it held. As nginx's `send_timeout`, it bounds the time
//! between two writes, not the whole answer, so a slow reader that keeps reading is never cut.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A stream whose writes fail with `TimedOut` after waiting `limit` for the peer without
/// progress.
pub struct SendDeadline<S> {
    inner: S,
    limit: Option<Duration>,
    /// Running while a write waits for the peer.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S> SendDeadline<S> {
    /// `inner` with writes bounded by `limit` (`None`: unbounded, `inner` as it is).
    pub fn new(inner: S, limit: Option<Duration>) -> SendDeadline<S> {
        SendDeadline { inner, limit, timer: None }
    }

    /// Passes on a write's result: progress stops the timer, waiting starts (or checks) it.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.timer = None;
            return r;
        }
        let Some(limit) = self.limit else { return r };
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.timer = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client took nothing of the answer for {limit:?} (send-timeout)"),
                )))
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendDeadline<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendDeadline<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
    }

    const LIMIT: Duration = Duration::from_millis(300);

    #[test]
    fn a_peer_that_reads_nothing_times_the_write_out() {
        block_on(async {
            let (a, _b) = tokio::io::duplex(1024);
            let mut a = SendDeadline::new(a, Some(LIMIT));
            let start = std::time::Instant::now();
            let e = a.write_all(&[0u8; 4096]).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            assert!(start.elapsed() >= LIMIT, "{:?}", start.elapsed());
        });
    }

    #[test]
    fn a_peer_that_keeps_reading_is_never_cut() {
        block_on(async {
            let (a, mut b) = tokio::io::duplex(1024);
            let mut a = SendDeadline::new(a, Some(LIMIT));
            let reader = tokio::spawn(async move {
                let mut buf = [0u8; 512];
                let mut total = 0;
                while total < 8 * 1024 {
                    // A read every 100 ms: within the limit, though the whole answer takes
                    // several times it.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    total += b.read(&mut buf).await.unwrap();
                }
                total
            });
            a.write_all(&[0u8; 8 * 1024]).await.unwrap();
            assert_eq!(reader.await.unwrap(), 8 * 1024);
        });
    }

    #[test]
    fn without_a_limit_writes_wait() {
        block_on(async {
            let (a, _b) = tokio::io::duplex(1024);
            let mut a = SendDeadline::new(a, None);
            let r = tokio::time::timeout(LIMIT * 3, a.write_all(&[0u8; 4096])).await;
            assert!(r.is_err(), "the write waited");
        });
    }
}
