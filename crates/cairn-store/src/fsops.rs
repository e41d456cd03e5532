//! File system side of NARs: restoring one into canonical files, dumping a tree as one, and
//! removing read-only trees.
//!
//! Canonical means what Nix makes of every store path: mtime 1 (one second after the epoch, so
//! that tools that treat 0 as "unknown" still work), mode 0444 for files, 0555 for executables
//! and directories, no setuid, setgid or sticky bits, owned by the daemon (which created them).
//! Restoring writes files directly in canonical form — no second pass over the tree.

use std::fs::{self, File, FileTimes, OpenOptions, Permissions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cairn_nix::nar::{NarEvent, NarReader, NarWriter};
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

use crate::{Result, StoreError};

/// The modification time of every store object.
pub const CANONICAL_MTIME: Duration = Duration::from_secs(1);
/// Copy buffer size for file contents.
pub const COPY_BUF: usize = 1 << 20;
/// Files at least this large have their writeback started as soon as they are written.
const WRITEBACK_KICK: u64 = 64 * 1024;

/// Starts writing a file's dirty pages to disk without waiting. A store path must be durable
/// before it is registered; starting early lets the disk work while the rest of the path still
/// arrives, so the final `syncfs` mostly finds the work done. (On Linux, `POSIX_FADV_DONTNEED`
/// starts asynchronous writeback of dirty pages and drops only pages that are already clean.)
pub(crate) fn start_writeback(f: &File) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    let _ = posix_fadvise(f, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

pub(crate) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { op, path: path.to_owned(), source }
}

fn canonical_times() -> FileTimes {
    let t = SystemTime::UNIX_EPOCH + CANONICAL_MTIME;
    FileTimes::new().set_accessed(t).set_modified(t)
}

pub(crate) fn set_canonical_dir(path: &Path) -> Result<()> {
    fs::set_permissions(path, Permissions::from_mode(0o555)).map_err(io_err("chmod", path))?;
    File::open(path).and_then(|f| f.set_times(canonical_times())).map_err(io_err("set times of", path))
}

fn set_symlink_times(path: &Path) -> Result<()> {
    let t = TimeSpec::from_duration(CANONICAL_MTIME);
    utimensat(nix::fcntl::AT_FDCWD, path, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(|e| StoreError::Io {
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
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&p)
                    .map_err(io_err("create", &p))?;
                // No pre-allocation: `size` comes from untrusted input, and the contents arrive anyway.
                let written = nar.copy_contents(&mut f, buf)?;
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
    dump_node(path, None, &mut w)?;
    w.finish()
        .map_err(|e| StoreError::NarWrite { path: path.to_owned(), source: e })?
        .flush()
        .map_err(io_err("write NAR of", path))
}

fn dump_node<W: Write>(path: &Path, name: Option<&[u8]>, w: &mut NarWriter<W>) -> Result<()> {
    let nar_err = |source| StoreError::NarWrite { path: path.to_owned(), source };
    let meta = fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    let ft = meta.file_type();
    if ft.is_file() {
        let mut f = File::open(path).map_err(io_err("open", path))?;
        let executable = meta.mode() & 0o100 != 0;
        w.regular(name, executable, meta.len(), &mut f).map_err(nar_err)
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
            dump_node(&path.join(std::ffi::OsStr::from_bytes(n)), Some(n), w)?;
        }
        w.end_directory().map_err(nar_err)
    } else {
        Err(StoreError::UnsupportedFileType(path.to_owned()))
    }
}

/// Renames a finished tree to its place in another directory. Moving a directory to another
/// parent rewrites its `..` entry, which needs write access to the directory itself; a canonical
/// directory is read-only (0555), which only root gets past. So, for anyone else, the directory
/// is made writable for the move and read-only again at its new place.
pub(crate) fn rename_tree(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            let meta = fs::symlink_metadata(from)?;
            if !meta.is_dir() || meta.permissions().mode() & 0o200 != 0 {
                return Err(e);
            }
            fs::set_permissions(from, fs::Permissions::from_mode(0o755))?;
            if let Err(e) = fs::rename(from, to) {
                let _ = fs::set_permissions(from, fs::Permissions::from_mode(meta.permissions().mode()));
                return Err(e);
            }
            fs::set_permissions(to, fs::Permissions::from_mode(meta.permissions().mode()))
        }
        other => other,
    }
}

/// Removes a tree even where it is read-only (store paths are), tolerating its absence.
pub fn remove_tree(path: &Path) -> Result<()> {
    remove_tree_counting(path).map(drop)
}

/// [`remove_tree`], returning the bytes freed: the sizes of the files removed that had no other
/// hard link (as Nix counts them).
pub fn remove_tree_counting(path: &Path) -> Result<u64> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err("stat", path)(e)),
    };
    if meta.is_dir() {
        if meta.mode() & 0o700 != 0o700 {
            fs::set_permissions(path, Permissions::from_mode(0o755)).map_err(io_err("chmod", path))?;
        }
        let mut bytes = 0;
        for entry in fs::read_dir(path).map_err(io_err("list", path))? {
            bytes += remove_tree_counting(&entry.map_err(io_err("list", path))?.path())?;
        }
        fs::remove_dir(path).map_err(io_err("remove", path))?;
        Ok(bytes)
    } else {
        fs::remove_file(path).map_err(io_err("remove", path))?;
        Ok(if meta.nlink() == 1 { meta.size() } else { 0 })
    }
}

/// Makes everything written under the file system of `path` durable (one `syncfs`, instead of
/// an `fsync` per file).
pub fn sync_filesystem(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(io_err("open", path))?;
    nix::unistd::syncfs(&f).map_err(|e| StoreError::Io { op: "sync", path: path.to_owned(), source: e.into() })
}

/// Makes a directory's entries (renames into it) durable.
pub fn sync_dir(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io_err("sync", path))
}

/// Writes a single canonical regular file and fsyncs it.
pub fn write_canonical_file(path: &Path, contents: &[u8], executable: bool) -> Result<()> {
    let mode = if executable { 0o555 } else { 0o444 };
    let mut f =
        OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io_err("create", path))?;
    f.write_all(contents).map_err(io_err("write", path))?;
    f.set_permissions(Permissions::from_mode(mode)).map_err(io_err("chmod", path))?;
    f.set_times(canonical_times()).map_err(io_err("set times of", path))?;
    f.sync_all().map_err(io_err("sync", path))
}
