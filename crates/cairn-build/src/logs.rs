//! Build logs, kept as Nix keeps its own: bzip2-compressed at `drvs/<first two characters of
//! the .drv's base name>/<the rest>.bz2`, so that `cairn log` prints a past build's output and
//! Nix's own `nix log` reads the same files (given the log directory, `?log=` on a `unix://`
//! store). Logs written by earlier cairn versions (zstd, `.zst`) are still read.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use cairn_nix::StorePath;

/// The directory of build logs.
#[derive(Debug, Clone)]
pub struct LogStore {
    dir: PathBuf,
}

impl LogStore {
    pub fn new(dir: impl Into<PathBuf>) -> LogStore {
        LogStore { dir: dir.into() }
    }

    fn file(&self, drv: &StorePath, ext: &str) -> PathBuf {
        let base = drv.base_name();
        self.dir.join(&base[..2]).join(format!("{}.{ext}", &base[2..]))
    }

    /// A writer for the log of a build of `drv`, replacing an earlier one when finished.
    ///
    /// Nothing is made on disk until the log has grown past [`SMALL_LOG`] or is finished: a
    /// new file (and often a new directory) costs a build on a slow file system as much as
    /// its sandbox, and most builds print little.
    pub fn writer(&self, drv: &StorePath) -> LogWriter {
        let file = self.file(drv, "bz2");
        let tmp = file.with_extension("bz2.tmp");
        LogWriter { made: false, pending: Vec::new(), enc: None, tmp, file, old: self.file(drv, "zst") }
    }

    /// Whether a log of `drv` is kept.
    pub fn exists(&self, drv: &StorePath) -> bool {
        ["bz2", "zst"].iter().any(|ext| self.file(drv, ext).exists())
    }

    /// The log of the last build of `drv`, if any.
    pub fn read(&self, drv: &StorePath) -> io::Result<Option<Vec<u8>>> {
        let Some(mut r) = self.open(drv)? else { return Ok(None) };
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(Some(out))
    }

    /// The log of the last build of `drv` as a reader that decompresses as it goes, if any: a
    /// log of a talkative build can be gigabytes once decompressed, more than one answer should
    /// hold in memory.
    pub fn open(&self, drv: &StorePath) -> io::Result<Option<Box<dyn Read + Send>>> {
        match fs::File::open(self.file(drv, "bz2")) {
            Ok(f) => return Ok(Some(Box::new(bzip2::read::MultiBzDecoder::new(io::BufReader::new(f))))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match fs::File::open(self.file(drv, "zst")) {
            Ok(f) => Ok(Some(Box::new(zstd::stream::read::Decoder::new(f)?))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// What bzip2 makes of no input at all (the stream header and its end-of-stream block): the
/// log of a silent build, written without an encoder.
const EMPTY_BZ2: [u8; 14] = [b'B', b'Z', b'h', b'6', 0x17, 0x72, 0x45, 0x38, 0x50, 0x90, 0, 0, 0, 0];

/// A log up to this long is kept in memory and compressed at the end with bzip2's smallest
/// block (100 kB), which compresses it exactly as well as the largest and sets up a fifth of
/// the tables. Past it, the default encoder takes over and the log streams to its file.
const SMALL_LOG: usize = 96 << 10;

/// A log being written; [`LogWriter::finish`] puts it in place.
///
/// The encoder's tables are megabytes, set up and touched when it is made, which for a build
/// that prints little would cost more than the build's own sandbox: so no encoder (nor file) is
/// made until the log has grown past [`SMALL_LOG`], or until the end.
pub struct LogWriter {
    /// Whether the temporary file was made.
    made: bool,
    pending: Vec<u8>,
    enc: Option<bzip2::write::BzEncoder<fs::File>>,
    tmp: PathBuf,
    file: PathBuf,
    /// A log of an earlier cairn (zstd), replaced by this one.
    old: PathBuf,
}

impl LogWriter {
    /// Appends one line and its newline.
    pub fn line(&mut self, line: &[u8]) -> io::Result<()> {
        self.part(line, true)
    }

    /// Appends `bytes`, then a newline if `newline`: a builder's output kept as it wrote it
    /// (a line too long to show whole, or a last one without its newline, kept so).
    pub fn part(&mut self, bytes: &[u8], newline: bool) -> io::Result<()> {
        let nl: &[u8] = if newline { b"\n" } else { b"" };
        if let Some(enc) = &mut self.enc {
            enc.write_all(bytes)?;
            return enc.write_all(nl);
        }
        self.pending.extend_from_slice(bytes);
        self.pending.extend_from_slice(nl);
        if self.pending.len() > SMALL_LOG {
            let out = self.create()?;
            let mut enc = bzip2::write::BzEncoder::new(out, bzip2::Compression::default());
            enc.write_all(&std::mem::take(&mut self.pending))?;
            self.enc = Some(enc);
        }
        Ok(())
    }

    /// Makes the temporary file (and its directory).
    fn create(&mut self) -> io::Result<fs::File> {
        if let Some(parent) = self.tmp.parent() {
            fs::create_dir_all(parent)?;
        }
        let out = fs::File::create(&self.tmp)?;
        self.made = true;
        Ok(out)
    }

    pub fn finish(mut self) -> io::Result<()> {
        let written = match self.enc.take() {
            Some(enc) => enc.finish().map(drop),
            None => self.create().and_then(|mut out| {
                if self.pending.is_empty() {
                    return out.write_all(&EMPTY_BZ2);
                }
                let mut enc = bzip2::write::BzEncoder::new(out, bzip2::Compression::fast());
                enc.write_all(&self.pending).and_then(|()| enc.finish().map(drop))
            }),
        };
        let kept = written.and_then(|()| fs::rename(&self.tmp, &self.file));
        if kept.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        self.made = false;
        let _ = fs::remove_file(&self.old);
        kept
    }

    /// Where the log will be.
    pub fn path(&self) -> &Path {
        &self.file
    }
}

impl Drop for LogWriter {
    /// A log never finished leaves no temporary file behind.
    fn drop(&mut self) {
        if self.made {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_absent() {
        let t = tempfile::tempdir().unwrap();
        let logs = LogStore::new(t.path());
        let drv = StorePath::from_base_name("00000000000000000000000000000000-x.drv").unwrap();
        assert_eq!(logs.read(&drv).unwrap(), None);
        let mut w = logs.writer(&drv);
        w.line(b"one").unwrap();
        w.line(b"two").unwrap();
        assert_eq!(logs.read(&drv).unwrap(), None, "not visible before it is finished");
        w.finish().unwrap();
        assert_eq!(logs.read(&drv).unwrap().unwrap(), b"one\ntwo\n");
        assert!(t.path().join("00/000000000000000000000000000000-x.drv.bz2").exists(), "where and as Nix keeps it");
    }

    #[test]
    fn a_silent_build_s_log_is_the_empty_bzip2_stream() {
        let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        enc.flush().unwrap();
        assert_eq!(enc.finish().unwrap(), EMPTY_BZ2, "what the encoder makes of nothing");
        let t = tempfile::tempdir().unwrap();
        let logs = LogStore::new(t.path());
        let drv = StorePath::from_base_name("00000000000000000000000000000000-x.drv").unwrap();
        logs.writer(&drv).finish().unwrap();
        assert_eq!(logs.read(&drv).unwrap().unwrap(), b"");
        let file = t.path().join("00/000000000000000000000000000000-x.drv.bz2");
        assert_eq!(std::fs::read(file).unwrap(), EMPTY_BZ2);
    }

    #[test]
    fn short_and_long_logs_read_back_whole() {
        let t = tempfile::tempdir().unwrap();
        let logs = LogStore::new(t.path());
        let drv = StorePath::from_base_name("00000000000000000000000000000000-x.drv").unwrap();
        for lines in [1usize, 1000, 5000, 40_000] {
            let mut w = logs.writer(&drv);
            let mut expect = Vec::new();
            for i in 0..lines {
                let line = format!("line {i} of a build that talks");
                w.line(line.as_bytes()).unwrap();
                expect.extend_from_slice(line.as_bytes());
                expect.push(b'\n');
            }
            w.finish().unwrap();
            assert_eq!(logs.read(&drv).unwrap().unwrap(), expect, "{lines} lines");
        }
    }

    #[test]
    fn pieces_of_a_long_line_and_an_unterminated_last_line_are_kept_as_written() {
        let t = tempfile::tempdir().unwrap();
        let logs = LogStore::new(t.path());
        let drv = StorePath::from_base_name("00000000000000000000000000000000-x.drv").unwrap();
        let mut w = logs.writer(&drv);
        w.part(b"abc", false).unwrap();
        w.part(b"def", true).unwrap();
        w.part(b"\xff\rno newline", false).unwrap();
        w.finish().unwrap();
        assert_eq!(logs.read(&drv).unwrap().unwrap(), b"abcdef\n\xff\rno newline");
    }

    #[test]
    fn logs_of_earlier_versions_are_read() {
        let t = tempfile::tempdir().unwrap();
        let logs = LogStore::new(t.path());
        let drv = StorePath::from_base_name("00000000000000000000000000000000-x.drv").unwrap();
        std::fs::create_dir_all(t.path().join("00")).unwrap();
        let old = zstd::encode_all(&b"old\n"[..], 3).unwrap();
        std::fs::write(t.path().join("00/000000000000000000000000000000-x.drv.zst"), old).unwrap();
        assert_eq!(logs.read(&drv).unwrap().unwrap(), b"old\n");
    }
}
