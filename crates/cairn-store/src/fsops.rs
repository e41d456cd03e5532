//! File system side of the store: NARs restored into canonical files and trees dumped as NARs
//! (the work itself is `cairn-nar-fs`'s, shared with the CLI and builds; here its errors become
//! [`StoreError`]s), renames into place, syncs, and removing read-only trees.
//!
//! Canonical means what Nix makes of every store path: mtime 1, mode 0444 for files, 0555 for
//! executables and directories, no setuid, setgid or sticky bits, owned by the daemon (see
//! `cairn_nar_fs`).

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use cairn_nar_fs::{canonical_times, FsError};
use cairn_nix::nar::NarReader;

use crate::{Result, StoreError};

pub(crate) use cairn_nar_fs::start_writeback;
pub use cairn_nar_fs::{RestoreMode, CANONICAL_MTIME, COPY_BUF};

impl From<FsError> for StoreError {
    fn from(e: FsError) -> StoreError {
        match e {
            FsError::Io { op, path, source } => StoreError::Io { op, path, source },
            FsError::Nar(e) => StoreError::Nar(e),
            FsError::NarWrite { path, source } => StoreError::NarWrite { path, source },
            FsError::UnsupportedFileType(path) => StoreError::UnsupportedFileType(path),
        }
    }
}

pub(crate) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { op, path: path.to_owned(), source }
}

pub(crate) fn set_canonical_dir(path: &Path) -> Result<()> {
    Ok(cairn_nar_fs::set_canonical_dir(path)?)
}

/// Restores the NAR read by `nar` at `target` (which must not exist). Consumes the NAR to its end.
pub fn restore<R: Read>(nar: &mut NarReader<R>, target: &Path, mode: RestoreMode) -> Result<()> {
    Ok(cairn_nar_fs::restore(nar, target, mode)?)
}

/// [`restore`] with a caller's copy buffer, so that restoring many small NARs (an import)
/// does not allocate and clear a buffer per path.
pub fn restore_with_buffer<R: Read>(
    nar: &mut NarReader<R>,
    target: &Path,
    mode: RestoreMode,
    buf: &mut [u8],
) -> Result<()> {
    Ok(cairn_nar_fs::restore_with_buffer(nar, target, mode, buf)?)
}

/// Writes the NAR of the file system object at `path` to `out`, as `nix-store --dump` does.
pub fn dump(path: &Path, out: impl Write) -> Result<()> {
    Ok(cairn_nar_fs::dump(path, out)?)
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
