//! Build logs, kept zstd-compressed under the state directory as Nix keeps its own
//! (`drvs/<first two characters of the .drv's base name>/<the rest>.zst`), so that `cairn log`
//! can print a past build's output.

use std::fs;
use std::io::{self, Write};
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

    fn file(&self, drv: &StorePath) -> PathBuf {
        let base = drv.base_name();
        self.dir.join(&base[..2]).join(format!("{}.zst", &base[2..]))
    }

    /// A writer for the log of a build of `drv`, replacing an earlier one when finished.
    pub fn writer(&self, drv: &StorePath) -> io::Result<LogWriter> {
        let file = self.file(drv);
        fs::create_dir_all(file.parent().expect("log files have a parent"))?;
        let tmp = file.with_extension("zst.tmp");
        let enc = zstd::Encoder::new(fs::File::create(&tmp)?, 3)?;
        Ok(LogWriter { enc, tmp, file })
    }

    /// The log of the last build of `drv`, if any.
    pub fn read(&self, drv: &StorePath) -> io::Result<Option<Vec<u8>>> {
        match fs::File::open(self.file(drv)) {
            Ok(f) => Ok(Some(zstd::decode_all(f)?)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// An open log; [`LogWriter::finish`] puts it in place.
pub struct LogWriter {
    enc: zstd::Encoder<'static, fs::File>,
    tmp: PathBuf,
    file: PathBuf,
}

impl LogWriter {
    pub fn line(&mut self, line: &[u8]) -> io::Result<()> {
        self.enc.write_all(line)?;
        self.enc.write_all(b"\n")
    }

    pub fn finish(self) -> io::Result<()> {
        self.enc.finish()?;
        fs::rename(&self.tmp, &self.file)
    }

    /// Where the log will be.
    pub fn path(&self) -> &Path {
        &self.file
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
        let mut w = logs.writer(&drv).unwrap();
        w.line(b"one").unwrap();
        w.line(b"two").unwrap();
        assert_eq!(logs.read(&drv).unwrap(), None, "not visible before it is finished");
        w.finish().unwrap();
        assert_eq!(logs.read(&drv).unwrap().unwrap(), b"one\ntwo\n");
        assert!(t.path().join("00/000000000000000000000000000000-x.drv.zst").exists());
    }
}
