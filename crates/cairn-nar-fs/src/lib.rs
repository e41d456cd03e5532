//! NARs and the local file system: [`dump`] writes the NAR of a tree (as `nix-store --dump`),
//! [`restore`] makes a tree of a NAR (as `nix-store --restore`, or directly in canonical store
//! form).
//!
//! A crate of its own, between the pure formats of `cairn-nix` (which do no I/O) and the store
//! (`cairn-store`, which adds locks, the database and durability): the CLI dumps the user's
//! files and restores NARs it is sent without linking the store or SQLite, and builds, image
//! unpacking and the store all share the one implementation. It knows nothing of store paths,
//! signatures or derivations.
//!
//! Canonical means what Nix makes of every store path: mtime 1 (one second after the epoch, so
//! that tools that treat 0 as "unknown" still work), mode 0444 for files, 0555 for executables
//! and directories, no setuid, setgid or sticky bits, owned by whoever restores them. Restoring
//! writes files directly in canonical form — no second pass over the tree — and starts the
//! writeback of large files as soon as they are written, so that the store's final `syncfs`
//! finds little left to do.
//!
//! **Architecture Invariant:** no database, no locks, no store layout: a path in, bytes out, or
//! bytes in, a tree out. Entry names come from the NAR reader, which refuses `.`, `..`, `/` and
//! NUL, so a restore writes only under its target.

use std::fs::{self, File, FileTimes, OpenOptions, Permissions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cairn_nix::nar::{NarError, NarEvent, NarReader, NarWriteError, NarWriter};
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// Why a dump or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("cannot {op} '{}': {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The NAR being restored is malformed (or its reader failed).
    #[error(transparent)]
    Nar(#[from] NarError),
    #[error("writing the NAR of '{}': {source}", path.display())]
    NarWrite {
        path: PathBuf,
        #[source]
        source: NarWriteError,
    },
    #[error("'{}' is not a regular file, directory or symlink", .0.display())]
    UnsupportedFileType(PathBuf),
}

pub type Result<T, E = FsError> = std::result::Result<T, E>;

/// The error of an I/O operation `op` on `path`.
pub fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |source| FsError::Io { op, path: path.to_owned(), source }
}

/// The modification time of every store object.
pub const CANONICAL_MTIME: Duration = Duration::from_secs(1);
/// Copy buffer size for file contents.
pub const COPY_BUF: usize = 1 << 20;
/// Files at least this large have their writeback started as soon as they are written.
const WRITEBACK_KICK: u64 = 64 * 1024;
/// A file being written has the writeback of what it got started every this many bytes.
pub const WRITEBACK_EVERY: u64 = 8 << 20;

/// Starts writing a file's dirty pages to disk without waiting. A store path must be durable
/// before it is registered; starting early lets the disk work while the rest of the path still
/// arrives, so the final `syncfs` mostly finds the work done. (On Linux, `POSIX_FADV_DONTNEED`
/// starts asynchronous writeback of dirty pages and drops only pages that are already clean.)
pub fn start_writeback(f: &File) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    let _ = posix_fadvise(f, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

/// A file being written whose dirty pages are sent to the disk as it grows: every
/// [`WRITEBACK_EVERY`] bytes, writeback of the range just written is started. Without it a large
/// file reaches the disk only at the final `syncfs`, after the whole copy, so the copy and the
/// disk take turns; with it they overlap, and the `syncfs` finds the work nearly done. (On Linux,
/// `POSIX_FADV_DONTNEED` over a range starts asynchronous writeback of its dirty pages and drops
/// only pages already clean, which a range just written has none of.)
///
/// It owns the file or borrows it (`F` is `File` or `&File`).
pub struct WritebackWriter<F> {
    file: F,
    written: u64,
    started: u64,
}

impl<F: std::borrow::Borrow<File>> WritebackWriter<F> {
    /// Writes at the file's current offset, which must be its start.
    pub fn new(file: F) -> WritebackWriter<F> {
        WritebackWriter { file, written: 0, started: 0 }
    }

    pub fn file(&self) -> &File {
        self.file.borrow()
    }
}

impl<F: std::borrow::Borrow<File>> Write for WritebackWriter<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = self.file.borrow();
        let n = (&*file).write(buf)?;
        self.written += n as u64;
        if self.written - self.started >= WRITEBACK_EVERY {
            use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
            let len = (self.written - self.started) as i64;
            let _ = posix_fadvise(file, self.started as i64, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
            self.started = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Access and modification times of 1 s after the epoch.
pub fn canonical_times() -> FileTimes {
    let t = SystemTime::UNIX_EPOCH + CANONICAL_MTIME;
    FileTimes::new().set_accessed(t).set_modified(t)
}

/// Makes a directory canonical: mode 0555, mtime 1.
pub fn set_canonical_dir(path: &Path) -> Result<()> {
    fs::set_permissions(path, Permissions::from_mode(0o555)).map_err(io_err("chmod", path))?;
    File::open(path).and_then(|f| f.set_times(canonical_times())).map_err(io_err("set times of", path))
}

fn set_symlink_times(path: &Path) -> Result<()> {
    let t = TimeSpec::from_duration(CANONICAL_MTIME);
    utimensat(nix::fcntl::AT_FDCWD, path, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(|e| FsError::Io {
        op: "set times of",
        path: path.to_owned(),
        source: e.into(),
    })
}

/// How restored files are left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// Store form: read-only, mtime 1.
    Canonical,
    /// As `nix-store --restore` leaves them outside a store: writable by the user (modes 0666,
    /// 0777 for executables and directories, less the umask), times left alone.
    Plain,
}

/// Restores the NAR read by `nar` at `target` (which must not exist). Consumes the NAR to its end.
pub fn restore<R: Read>(nar: &mut NarReader<R>, target: &Path, mode: RestoreMode) -> Result<()> {
    restore_with_buffer(nar, target, mode, &mut vec![0u8; COPY_BUF])
}

/// [`restore`] with a caller's copy buffer, so that restoring many small NARs (an import)
/// does not allocate and clear a buffer per path.
pub fn restore_with_buffer<R: Read>(
    nar: &mut NarReader<R>,
    target: &Path,
    mode: RestoreMode,
    buf: &mut [u8],
) -> Result<()> {
    let canonical = mode == RestoreMode::Canonical;
    let mut dirs: Vec<PathBuf> = Vec::new();
    while let Some(ev) = nar.next_event()? {
        let place = |name: &Option<Vec<u8>>, dirs: &[PathBuf]| match (name, dirs.last()) {
            (Some(n), Some(d)) => d.join(std::ffi::OsStr::from_bytes(n)),
            _ => target.to_owned(),
        };
        match ev {
            NarEvent::Regular { name, executable, size } => {
                let p = place(&name, &dirs);
                let mode = match (canonical, executable) {
                    (true, true) => 0o555,
                    (true, false) => 0o444,
                    (false, true) => 0o777,
                    (false, false) => 0o666,
                };
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&p)
                    .map_err(io_err("create", &p))?;
                // No pre-allocation: `size` comes from untrusted input, and the contents arrive anyway.
                // Into the store, the file's writeback starts as it grows (see WritebackWriter).
                let written = if canonical {
                    nar.copy_contents(&mut WritebackWriter::new(&f), buf)?
                } else {
                    nar.copy_contents(&mut &f, buf)?
                };
                debug_assert_eq!(written, size);
                if canonical {
                    f.set_permissions(Permissions::from_mode(mode)).map_err(io_err("chmod", &p))?;
                    f.set_times(canonical_times()).map_err(io_err("set times of", &p))?;
                    if size >= WRITEBACK_KICK {
                        start_writeback(&f);
                    }
                }
            }
            NarEvent::Symlink { name, target: t } => {
                let p = place(&name, &dirs);
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&t), &p)
                    .map_err(io_err("create symlink", &p))?;
                if canonical {
                    set_symlink_times(&p)?;
                }
            }
            NarEvent::Directory { name } => {
                let p = place(&name, &dirs);
                fs::create_dir(&p).map_err(io_err("create directory", &p))?;
                dirs.push(p);
            }
            NarEvent::EndDirectory => {
                let d = dirs.pop().expect("NarReader balances directories");
                if canonical {
                    set_canonical_dir(&d)?;
                }
            }
        }
    }
    Ok(())
}

/// Writes the NAR of the file system object at `path` to `out`, as `nix-store --dump` does.
/// Files are streamed; only one directory listing at a time is held in memory per level.
pub fn dump(path: &Path, out: impl Write) -> Result<()> {
    let mut w = NarWriter::new(BufWriter::with_capacity(256 * 1024, out)).map_err(io_err("write NAR of", path))?;
    dump_node(path, None, &mut w, &mut |w, file, name, executable, size| {
        let mut f = File::open(file).map_err(io_err("open", file))?;
        w.regular(name, executable, size, &mut f).map_err(|source| FsError::NarWrite { path: file.to_owned(), source })
    })?;
    w.finish()
        .map_err(|e| FsError::NarWrite { path: path.to_owned(), source: e })?
        .flush()
        .map_err(io_err("write NAR of", path))
}

/// What a walk does with a regular file: `(writer, file, entry name, executable, size)`.
type OnFile<'a, W> = dyn FnMut(&mut NarWriter<W>, &Path, Option<&[u8]>, bool, u64) -> Result<()> + 'a;

/// Walks the tree at `path` in NAR order, writing all but regular files' nodes to `w`;
/// `on_file` writes those (with their contents, or recording where they go).
fn dump_node<W: Write>(path: &Path, name: Option<&[u8]>, w: &mut NarWriter<W>, on_file: &mut OnFile<W>) -> Result<()> {
    let nar_err = |source| FsError::NarWrite { path: path.to_owned(), source };
    let meta = fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    let ft = meta.file_type();
    if ft.is_file() {
        on_file(w, path, name, meta.mode() & 0o100 != 0, meta.len())
    } else if ft.is_symlink() {
        let target = fs::read_link(path).map_err(io_err("read symlink", path))?;
        w.symlink(name, target.as_os_str().as_bytes()).map_err(nar_err)
    } else if ft.is_dir() {
        let mut names: Vec<Vec<u8>> = fs::read_dir(path)
            .map_err(io_err("list", path))?
            .map(|e| e.map(|e| e.file_name().into_vec()))
            .collect::<io::Result<_>>()
            .map_err(io_err("list", path))?;
        names.sort_unstable();
        w.begin_directory(name).map_err(nar_err)?;
        for n in &names {
            dump_node(&path.join(std::ffi::OsStr::from_bytes(n)), Some(n), w, on_file)?;
        }
        w.end_directory().map_err(nar_err)
    } else {
        Err(FsError::UnsupportedFileType(path.to_owned()))
    }
}

mod layout;
mod spliced;
pub use layout::{NarLayout, NarLayoutReader};
pub use spliced::{Spliced, HAND_OVER_FROM, MAX_HANDED};

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_nix::nar::Limits;
    use cairn_nix::strategies::{tree, Tree};
    use proptest::prelude::*;

    fn restored(nar: &[u8], mode: RestoreMode) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x");
        let mut r = NarReader::new(nar, Limits::default()).unwrap();
        restore(&mut r, &target, mode).unwrap();
        (dir, target)
    }

    fn dumped(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        dump(path, &mut out).unwrap();
        out
    }

    /// Makes a canonical (read-only) tree removable again.
    fn writable(path: &Path) {
        if fs::symlink_metadata(path).unwrap().is_dir() {
            fs::set_permissions(path, Permissions::from_mode(0o755)).unwrap();
            for e in fs::read_dir(path).unwrap() {
                writable(&e.unwrap().path());
            }
        }
    }

    #[test]
    fn canonical_restores_are_read_only_with_mtime_1() {
        let nar = Tree::Directory(
            [
                (b"bin".to_vec(), Tree::File { executable: true, contents: b"#!/bin/sh\n".to_vec() }),
                (b"link".to_vec(), Tree::Symlink { target: b"bin".to_vec() }),
            ]
            .into(),
        )
        .to_nar();
        let (_dir, target) = restored(&nar, RestoreMode::Canonical);
        for (p, mode) in [(target.clone(), 0o555), (target.join("bin"), 0o555)] {
            let m = fs::symlink_metadata(&p).unwrap();
            assert_eq!(m.mode() & 0o7777, mode, "{}", p.display());
            assert_eq!(m.mtime(), 1, "{}", p.display());
        }
        assert_eq!(fs::symlink_metadata(target.join("link")).unwrap().mtime(), 1);
        assert_eq!(dumped(&target), nar);
        writable(&target);
    }

    #[test]
    fn special_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(dump(&fifo, io::sink()), Err(FsError::UnsupportedFileType(_))));
        assert!(matches!(dump(&dir.path().join("absent"), io::sink()), Err(FsError::Io { op: "stat", .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Restoring a NAR and dumping the tree gives the NAR back, in either mode.
        #[test]
        fn restore_then_dump_is_the_identity(t in tree(), canonical: bool) {
            let nar = t.to_nar();
            let mode = if canonical { RestoreMode::Canonical } else { RestoreMode::Plain };
            let (_dir, target) = restored(&nar, mode);
            prop_assert_eq!(dumped(&target), nar);
            writable(&target);
        }
    }
}
