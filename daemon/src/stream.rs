//! Every streaming, blocking and range helper the routes share.
//!
//! Store calls block (file system, SQLite), so each runs on tokio's blocking pool. Request
//! bodies reach them as `std::io::Read` through `SyncIoBridge`; streamed answers leave through a
//! bounded channel, so a slow client applies back-pressure instead of the daemon buffering a NAR.
//! A failure half-way through a streamed answer aborts the HTTP response, so the client sees an
//! error and never a silently truncated NAR.

use std::io::{self, BufReader, Write};

use axum::body::Body;
use axum::response::{IntoResponse, Response as HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::error::{ApiError, ApiResult};

/// One JSON line of a streamed answer.
pub(crate) fn json_line(v: &impl serde::Serialize) -> Bytes {
    let mut out = serde_json::to_vec(v).expect("events serialise");
    out.push(b'\n');
    out.into()
}

/// Runs `work` in its own task and answers with JSON lines: `progress()` five times a second
/// while it runs and once more at the end, then the event `work` ends with. A tick the client has
/// no room for is skipped, never waited for: the next one says more, and a client that stops
/// reading must not stop the work (until `send-timeout` disconnects it).
pub(crate) fn progress_lines<E: serde::Serialize + Send + 'static>(
    progress: impl Fn() -> E + Send + 'static,
    work: impl std::future::Future<Output = E> + Send + 'static,
) -> HttpResponse {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        tokio::pin!(work);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        let last = loop {
            tokio::select! {
                e = &mut work => break e,
                _ = tick.tick() => { let _ = tx.try_send(json_line(&progress())); }
            }
        };
        let _ = tx.send(json_line(&progress())).await;
        let _ = tx.send(json_line(&last)).await;
    });
    json_lines(rx)
}

/// A streamed answer of JSON lines, one per message received on `rx`, ending when its senders
/// are gone.
pub(crate) fn json_lines(rx: mpsc::Receiver<Bytes>) -> HttpResponse {
    let body =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx)) },
        );
    ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(body)).into_response()
}

/// Runs a blocking store call on the blocking pool. The one helper for the API and the
/// listeners alike: a worker that panics becomes the caller's error type (`From<JoinError>`).
pub(crate) async fn blocking<T: Send + 'static, E: From<tokio::task::JoinError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    tokio::task::spawn_blocking(f).await?
}

/// A request body as a blocking reader.
///
/// A body that sends nothing for `body-read-timeout` ([`set_body_read_timeout`]) ends with a
/// `TimedOut` error: a client that stops sending part-way would otherwise hold the blocking
/// thread reading its upload, and what that upload held (a temporary copy, path locks), for as
/// long as it kept the connection open.
pub(crate) fn body_reader(body: Body) -> impl io::Read + Send + 'static {
    let idle = BODY_READ_TIMEOUT.get().copied().flatten();
    let stream = futures_util::stream::unfold(Some(body.into_data_stream()), move |s| async move {
        let mut s = s?;
        let next = match idle {
            Some(t) => match tokio::time::timeout(t, s.next()).await {
                Ok(next) => next,
                Err(_) => {
                    let e = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client sent nothing of its upload for {} s (body-read-timeout)", t.as_secs()),
                    );
                    return Some((Err(e), None));
                }
            },
            None => s.next().await,
        };
        next.map(|item| (item.map_err(io::Error::other), Some(s)))
    });
    BufReader::with_capacity(1 << 20, SyncIoBridge::new(StreamReader::new(Box::pin(stream))))
}

/// `body-read-timeout`, set once when the daemon starts serving (the first setting wins).
static BODY_READ_TIMEOUT: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();

/// Sets how long [`body_reader`]'s uploads may send nothing.
pub(crate) fn set_body_read_timeout(t: Option<std::time::Duration>) {
    let _ = BODY_READ_TIMEOUT.set(t);
}

/// How much of a refused upload is read and discarded before answering. An HTTP/1.1 client
/// that is still sending when the answer comes may see its write fail before it reads the
/// answer; draining lets it read why it was refused. Past this bound the connection is closed.
const DRAIN_LIMIT: u64 = 1 << 30;

/// Runs `consume` over an upload on the blocking pool, then drains what is left of the upload
/// (up to [`DRAIN_LIMIT`]: after a failure, so that the client receives the error; after a
/// success, the body's end) before answering.
pub(crate) async fn upload<T: Send + 'static>(
    body: Body,
    consume: impl FnOnce(&mut dyn io::Read) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let mut input = body_reader(body);
    blocking(move || {
        let result = consume(&mut input);
        // Read to the body's end even after a stream that ended itself (an export stream's
        // last marker): until hyper has seen the body's own end (the last chunk), answering
        // makes it close the connection, and a client still sending that end reads "broken
        // pipe" instead of the answer.
        let _ = io::copy(&mut io::Read::take(&mut input, DRAIN_LIMIT), &mut io::sink());
        result
    })
    .await
}

/// Refuses an upload without looking at it, but drains it first (see [`DRAIN_LIMIT`]).
pub(crate) async fn refuse_upload<T>(body: Body, e: ApiError) -> ApiResult<T> {
    let mut input = body_reader(body);
    blocking::<_, ApiError>(move || {
        let _ = io::copy(&mut io::Read::take(&mut input, DRAIN_LIMIT), &mut io::sink());
        Ok(())
    })
    .await?;
    Err(e)
}

/// A `Write` whose bytes become a streamed response body. When the producer fails
/// ([`stream_response`]), the error is sent as the body's last item, so the client sees the
/// answer cut off rather than complete.
pub(crate) struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
}

const CHUNK: usize = 256 * 1024;

impl ChannelWriter {
    fn new() -> (ChannelWriter, Body) {
        let (tx, rx) = mpsc::channel(8);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        (ChannelWriter { tx, buf: BytesMut::with_capacity(CHUNK) }, Body::from_stream(stream))
    }

    fn send(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = self.buf.split().freeze();
            self.tx
                .blocking_send(Ok(chunk))
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))?;
            self.buf.reserve(CHUNK);
        }
        Ok(())
    }

    fn fail(self, message: String) {
        let _ = self.tx.blocking_send(Err(io::Error::other(message)));
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Streams what `produce` writes; checks done before it are reported with a status code.
///
/// A producer holds a thread of the blocking pool (512 in all) for as long as its client takes
/// to read, so producers are counted: at most [`SOCKET_STREAMS`] for the API socket's answers
/// and [`LISTENER_STREAMS`] for the network listener's (see [`stream_response_for_listener`]),
/// together well under the pool, so that clients that open many downloads and read none of
/// them (until `send-timeout` ends them) make other answers wait, but never starve the threads
/// every other request needs. An answer past the count starts when one ends.
pub(crate) fn stream_response(
    produce: impl FnOnce(&mut ChannelWriter) -> Result<(), cairn_store::StoreError> + Send + 'static,
) -> HttpResponse {
    stream_within(&SOCKET_PRODUCERS, produce)
}

/// [`stream_response`] for the network listener's answers (binary cache, registry), counted
/// apart from the API socket's: what anyone on the network does leaves the local users' room.
pub(crate) fn stream_response_for_listener(
    produce: impl FnOnce(&mut ChannelWriter) -> Result<(), cairn_store::StoreError> + Send + 'static,
) -> HttpResponse {
    stream_within(&LISTENER_PRODUCERS, produce)
}

/// Streamed answers of the API socket producing at once.
pub(crate) const SOCKET_STREAMS: usize = 192;
/// Streamed answers of the network listener producing at once.
pub(crate) const LISTENER_STREAMS: usize = 64;

static SOCKET_PRODUCERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(SOCKET_STREAMS);
static LISTENER_PRODUCERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(LISTENER_STREAMS);

fn stream_within(
    producers: &'static tokio::sync::Semaphore,
    produce: impl FnOnce(&mut ChannelWriter) -> Result<(), cairn_store::StoreError> + Send + 'static,
) -> HttpResponse {
    let (mut w, body) = ChannelWriter::new();
    tokio::spawn(async move {
        // (The semaphores are never closed.)
        let Ok(permit) = producers.acquire().await else { return };
        let _ = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            match produce(&mut w).and_then(|_| w.flush().map_err(|e| e.into_store())) {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!("streamed answer failed: {e}");
                    w.fail(e.to_string());
                }
            }
        })
        .await;
    });
    HttpResponse::new(body)
}

pub(crate) trait IntoStoreError {
    fn into_store(self) -> cairn_store::StoreError;
}

impl IntoStoreError for io::Error {
    fn into_store(self) -> cairn_store::StoreError {
        cairn_store::StoreError::Io { op: "send", path: "response".into(), source: self }
    }
}

/// A single byte range of a body of `len` bytes: `(start, end exclusive)`, never empty; `Err`
/// when it cannot be satisfied (RFC 9110: an empty body satisfies no range, not even a suffix).
pub fn parse_range(value: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // several ranges: answer the whole body, as the RFC allows
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        (len.saturating_sub(n), len)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() { len } else { b.parse::<u64>().ok()?.saturating_add(1).min(len) };
        if start >= len || end <= start {
            return Some(Err(()));
        }
        (start, end)
    };
    Some(Ok(range))
}

/// Skips the first `skip` bytes written to it and stops (with an error that ends the dump)
/// after `take` more.
pub(crate) struct Window<'a> {
    pub(crate) inner: &'a mut ChannelWriter,
    pub(crate) skip: u64,
    pub(crate) take: u64,
}

impl Write for Window<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut data = buf;
        let dropped = self.skip.min(data.len() as u64) as usize;
        self.skip -= dropped as u64;
        data = &data[dropped..];
        if self.take == 0 && !data.is_empty() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "range sent"));
        }
        let n = (self.take.min(data.len() as u64)) as usize;
        self.inner.write_all(&data[..n])?;
        self.take -= n as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    /// Downloads nobody reads hold at most [`super::LISTENER_STREAMS`] threads of the blocking
    /// pool; the others wait for a place, and all run once places free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unread_downloads_hold_at_most_their_share_of_the_blocking_threads() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let (running, most, done) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = Arc::new(std::sync::Mutex::new(wait));
        let mut bodies = Vec::new();
        for _ in 0..super::LISTENER_STREAMS + 36 {
            let (running, most, done, wait) = (running.clone(), most.clone(), done.clone(), wait.clone());
            bodies.push(super::stream_response_for_listener(move |_| {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Blocked as on a client that reads nothing, until released.
                let _ = wait.lock().unwrap().recv();
                running.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let at_once = most.load(Ordering::SeqCst);
        assert!(at_once <= super::LISTENER_STREAMS && at_once > 0, "{at_once} producers at once");
        drop(release);
        let start = std::time::Instant::now();
        while done.load(Ordering::SeqCst) < super::LISTENER_STREAMS + 36 {
            assert!(start.elapsed() < std::time::Duration::from_secs(10), "the waiting answers did not start");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(most.load(Ordering::SeqCst) <= super::LISTENER_STREAMS);
        drop(bodies);
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 10))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 100))));
        assert_eq!(parse_range("bytes=-5", 100), Some(Ok((95, 100))));
        assert_eq!(parse_range("bytes=50-1000", 100), Some(Ok((50, 100))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=9-3", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=x-1", 100), None);
    }

    /// A suffix range of an empty body was `Ok((0, 0))`, and its `Content-Range` end (`end - 1`)
    /// underflowed in the registry's and the cache's answers.
    #[test]
    fn no_range_of_an_empty_body_is_satisfiable() {
        for value in ["bytes=-99", "bytes=-1", "bytes=0-", "bytes=0-0"] {
            assert_eq!(parse_range(value, 0), Some(Err(())), "{value}");
        }
    }
}
