//! Framed streams: how a client sends data of unknown length in the middle of a request.
//!
//! `AddToStore` (≥ 1.25), `AddToStoreNar` (≥ 1.23), `AddMultipleToStore` and `AddBuildLog`
//! carry their payload as chunks — a `u64` length, then that many bytes, *unpadded* — ended
//! by a zero-length chunk (Nix 2.8: `FramedSource` and `FramedSink` in
//! `src/libutil/serialise.hh`). Before framing, a NAR was sent bare and the daemon had to
//! parse it to find its end; framing lets it stop reading at any point and still find the
//! next request.
//!
//! That is what [`FramedReader::drain`] is for: when the daemon gives up on a payload halfway
//! (a store error, a hash mismatch), it must skip the rest of the frames before it sends its
//! error, or it would read NAR bytes as the next op. Nix does this in `~FramedSource`; here it
//! is explicit, since a drop cannot report an I/O error. Draining reads into a fixed buffer
//! and never allocates what a chunk's length claims.

use std::io::{self, Read, Write};

/// Reads the payload of a framed stream; `read` returns 0 at the terminating empty chunk.
pub struct FramedReader<R> {
    inner: R,
    /// Bytes left in the current chunk.
    remaining: u64,
    eof: bool,
    /// Largest chunk accepted (Nix accepts any; a hostile length fails here, not in memory).
    max_chunk: u64,
    /// The stream broke (a refused frame, a short read): every later read fails too, so that
    /// a [`Self::drain`] after an error never reads payload bytes as frame lengths.
    broken: bool,
}

impl<R: Read> FramedReader<R> {
    /// Chunks of up to 4 GiB are accepted: Nix's `FramedSink` sends at most 32 KiB at once,
    /// and the reader never buffers a chunk.
    pub fn new(inner: R) -> Self {
        FramedReader { inner, remaining: 0, eof: false, max_chunk: u64::from(u32::MAX), broken: false }
    }

    /// Whether the terminating chunk has been read.
    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// Skips the rest of the payload up to and including its terminator; returns the number
    /// of payload bytes skipped. Call this before reporting an error for a framed request.
    pub fn drain(&mut self) -> io::Result<u64> {
        let mut buf = [0u8; 8192];
        let mut skipped = 0u64;
        loop {
            let n = self.read(&mut buf)?;
            if n == 0 {
                return Ok(skipped);
            }
            skipped += n as u64;
        }
    }

    /// The underlying reader; only in sync with the protocol after [`Self::is_eof`].
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        let mut len = [0u8; 8];
        self.inner.read_exact(&mut len)?;
        let len = u64::from_le_bytes(len);
        if len > self.max_chunk {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes over limit")));
        }
        if len == 0 {
            self.eof = true;
        }
        self.remaining = len;
        Ok(())
    }
}

impl<R: Read> Read for FramedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the framed stream is broken"));
        }
        let r = self.read_frames(buf);
        self.broken = matches!(&r, Err(e) if e.kind() != io::ErrorKind::Interrupted);
        r
    }
}

impl<R: Read> FramedReader<R> {
    fn read_frames(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.remaining == 0 {
            if self.eof {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let want = buf.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Writes a payload as frames; [`FramedWriter::finish`] sends the terminator.
///
/// Writes are gathered into chunks of `chunk_size` bytes (Nix's `BufferedSink` sends 32 KiB),
/// and an empty write never produces a chunk, which would end the stream early.
pub struct FramedWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
    chunk_size: usize,
}

impl<W: Write> FramedWriter<W> {
    /// Chunks of 32 KiB, as Nix sends.
    pub fn new(inner: W) -> Self {
        Self::with_chunk_size(inner, 32 * 1024)
    }

    pub fn with_chunk_size(inner: W, chunk_size: usize) -> Self {
        let chunk_size = chunk_size.max(1);
        FramedWriter { inner, buf: Vec::with_capacity(chunk_size), chunk_size }
    }

    fn send_chunk(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.inner.write_all(&(self.buf.len() as u64).to_le_bytes())?;
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Sends what is buffered and the terminating empty chunk, flushes, and returns the
    /// underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.send_chunk()?;
        self.inner.write_all(&0u64.to_le_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for FramedWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.chunk_size - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk_size {
            self.send_chunk()?;
        }
        Ok(n)
    }

    /// Sends the buffered bytes as a chunk (never an empty one) and flushes.
    fn flush(&mut self) -> io::Result<()> {
        self.send_chunk()?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_frame_breaks_the_stream_so_draining_reads_no_further() {
        let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
        // What follows would be read as frame lengths by a drain that went on.
        bytes.extend_from_slice(&[0xff; 64]);
        let mut input = &bytes[..];
        let mut r = FramedReader::new(&mut input);
        assert!(r.read(&mut [0u8; 16]).is_err());
        assert!(r.drain().is_err(), "a broken stream cannot be drained");
        assert_eq!(input.len(), 64, "nothing after the refused length was read");
    }

    #[test]
    fn frames_and_terminator() {
        let mut w = FramedWriter::with_chunk_size(Vec::new(), 4);
        w.write_all(b"hello").unwrap();
        w.write_all(b"").unwrap();
        let out = w.finish().unwrap();
        let mut want = Vec::new();
        for chunk in [&b"hell"[..], b"o"] {
            want.extend_from_slice(&(chunk.len() as u64).to_le_bytes());
            want.extend_from_slice(chunk);
        }
        want.extend_from_slice(&[0; 8]);
        assert_eq!(out, want);

        want.extend_from_slice(b"next op");
        let mut r = FramedReader::new(&want[..]);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello");
        assert_eq!(r.into_inner(), b"next op");
    }

    #[test]
    fn drain_leaves_the_stream_at_the_next_op() {
        let mut w = FramedWriter::with_chunk_size(Vec::new(), 3);
        w.write_all(b"abcdefgh").unwrap();
        let mut bytes = w.finish().unwrap();
        bytes.extend_from_slice(b"rest");
        let mut r = FramedReader::new(&bytes[..]);
        let mut first = [0u8; 2];
        r.read_exact(&mut first).unwrap();
        assert_eq!(r.drain().unwrap(), 6);
        assert!(r.is_eof());
        assert_eq!(r.into_inner(), b"rest");
    }

    #[test]
    fn truncated_frames_are_errors() {
        let bytes = [5u8, 0, 0, 0, 0, 0, 0, 0, b'a', b'b'];
        let mut r = FramedReader::new(&bytes[..]);
        assert_eq!(r.drain().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let huge = u64::MAX.to_le_bytes();
        assert_eq!(FramedReader::new(&huge[..]).drain().unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
