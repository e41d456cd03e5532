//! Progress display for long transfers: a byte counter with a rate on stderr, drawn only when
//! stderr is a terminal (indicatif hides itself otherwise), so scripts and logs stay clean.

use std::io::{self, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A spinner counting bytes for `what`.
pub fn bytes(what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {bytes} ({binary_bytes_per_sec}, {elapsed})")
            .expect("valid template"),
    );
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A bar for a transfer whose total is known, or becomes known as it goes (set its length and
/// position): bytes of the total and the percentage done.
pub fn transfer(what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {percent}% ({binary_bytes_per_sec}, {elapsed})",
        )
        .expect("valid template"),
    );
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A spinner with elapsed time, for work the daemon does without reporting progress.
pub fn spinner(what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("valid template"));
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A writer that advances a progress bar.
pub struct Counting<W> {
    pub inner: W,
    pub bar: ProgressBar,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that advances a progress bar.
pub struct CountingRead<R> {
    pub inner: R,
    pub bar: ProgressBar,
}

impl<R: io::Read> io::Read for CountingRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// An async reader that advances a progress bar.
pub struct CountingAsync<R> {
    pub inner: R,
    pub bar: ProgressBar,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountingAsync<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.bar.inc(n as u64);
        r
    }
}
