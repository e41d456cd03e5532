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
///
/// Below `path`, everything goes through descriptors of directories opened without following
/// symlinks: a tree may be a build's root while a process of the build is still dying, and a
/// directory it swaps for a symlink meanwhile must not lead the daemon to change or remove
/// anything outside the tree.
pub fn remove_tree_counting(path: &Path) -> Result<u64> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err("stat", path)(e)),
    };
    if !meta.is_dir() {
        fs::remove_file(path).map_err(io_err("remove", path))?;
        return Ok(if meta.nlink() == 1 { meta.size() } else { 0 });
    }
    let dir = open_dir(None, path.as_os_str(), path, true)?;
    let bytes = empty_dir(dir, path, None)?;
    fs::remove_dir(path).map_err(io_err("remove", path))?;
    Ok(bytes)
}

/// Removes, below the directory `path`, every entry but directories that is not `uid`'s,
/// through descriptors as [`remove_tree_counting`] does (and for the same reason: the tree may
/// be a build's root whose processes are still dying). Directories, and `uid`'s files, stay as
/// they are.
pub fn remove_files_not_owned_by(path: &Path, uid: u32) -> Result<()> {
    let dir = open_dir(None, path.as_os_str(), path, false)?;
    empty_dir(dir, path, Some(uid)).map(drop)
}

/// Opens the directory `name` (in `at`, else the path itself) without following a symlink; with
/// `opened_up`, first made readable and writable by its owner if it is not (a read-only store
/// directory, a builder's mode 000 directory) — through the descriptor, so that the directory
/// changed is the one opened. Returns a descriptor to list it by.
fn open_dir(
    at: Option<std::os::fd::BorrowedFd<'_>>,
    name: &std::ffi::OsStr,
    shown: &Path,
    opened_up: bool,
) -> Result<std::os::fd::OwnedFd> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    use std::os::fd::AsRawFd;
    let errno =
        |op: &'static str| move |e: nix::errno::Errno| StoreError::Io { op, path: shown.to_owned(), source: e.into() };
    let open = |flags: OFlag| match at {
        Some(at) => nix::fcntl::openat(
            at,
            name,
            flags | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ),
        None => {
            nix::fcntl::open(name, flags | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
        }
    };
    let owner_can = |fd: &std::os::fd::OwnedFd| {
        nix::sys::stat::fstat(fd).map(|st| st.st_mode & 0o700 == 0o700).map_err(errno("stat"))
    };
    match open(OFlag::O_RDONLY) {
        Ok(fd) => {
            if opened_up && !owner_can(&fd)? {
                nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(0o755)).map_err(errno("chmod"))?;
            }
            Ok(fd)
        }
        // Not readable by its owner, who is not root: changed through a path descriptor (which
        // fchmod refuses; its name in /proc is the directory itself), then opened.
        Err(nix::errno::Errno::EACCES) if opened_up => {
            let handle = open(OFlag::O_PATH).map_err(errno("open"))?;
            let by_fd = format!("/proc/self/fd/{}", handle.as_raw_fd());
            fs::set_permissions(by_fd, Permissions::from_mode(0o755)).map_err(io_err("chmod", shown))?;
            nix::fcntl::openat(&handle, ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(errno("open"))
        }
        Err(e) => Err(errno("open")(e)),
    }
}

/// Removes everything in the directory `dir` (shown as `shown`) — or, with `keep_owner`, every
/// entry but directories and that user's files; returns the bytes freed.
fn empty_dir(dir: std::os::fd::OwnedFd, shown: &Path, keep_owner: Option<u32>) -> Result<u64> {
    use nix::errno::Errno;
    use nix::fcntl::AtFlags;
    use nix::sys::stat::{fstatat, SFlag};
    use nix::unistd::{unlinkat, UnlinkatFlags};
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;
    let mut dir = nix::dir::Dir::from_fd(dir).map_err(|e| StoreError::Io {
        op: "list",
        path: shown.to_owned(),
        source: e.into(),
    })?;
    let names: Vec<std::ffi::OsString> = dir
        .iter()
        .filter_map(|e| e.ok())
        .map(|e| std::ffi::OsStr::from_bytes(e.file_name().to_bytes()).to_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
    let fd = dir.as_fd();
    let mut bytes = 0;
    for name in names {
        let here = shown.join(&name);
        let errno = |op: &'static str| {
            let here = here.clone();
            move |e: Errno| StoreError::Io { op, path: here, source: e.into() }
        };
        let st = match fstatat(fd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(errno("stat")(e)),
        };
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR {
            match open_dir(Some(fd), &name, &here, keep_owner.is_none()) {
                Ok(sub) => {
                    bytes += empty_dir(sub, &here, keep_owner)?;
                    if keep_owner.is_none() {
                        unlinkat(fd, name.as_os_str(), UnlinkatFlags::RemoveDir).map_err(errno("remove"))?;
                    }
                    continue;
                }
                // Swapped for something else since: removed as what it is now.
                Err(StoreError::Io { source, .. })
                    if matches!(source.raw_os_error(), Some(nix::libc::ELOOP | nix::libc::ENOTDIR)) => {}
                Err(e) => return Err(e),
            }
        }
        if keep_owner == Some(st.st_uid) {
            continue;
        }
        unlinkat(fd, name.as_os_str(), UnlinkatFlags::NoRemoveDir).map_err(errno("remove"))?;
        if st.st_nlink == 1 {
            bytes += st.st_size as u64;
        }
    }
    Ok(bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_of_closed_directories_and_symlinks_is_removed_and_nothing_outside_it() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"keep").unwrap();
        let tree = t.path().join("tree");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        fs::write(tree.join("a/b/f"), b"12345").unwrap();
        fs::write(tree.join("a/shared"), b"xy").unwrap();
        fs::hard_link(tree.join("a/shared"), t.path().join("other-name")).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("a/to-outside")).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("top-link")).unwrap();
        // Closed to everyone, read-only: as a builder or the store leaves them.
        fs::set_permissions(tree.join("a/b"), Permissions::from_mode(0o000)).unwrap();
        fs::set_permissions(tree.join("a"), Permissions::from_mode(0o555)).unwrap();
        // The file's 5 bytes and the two symlinks' (their target's length); the linked file none.
        let symlinks = 2 * outside.as_os_str().len() as u64;
        assert_eq!(remove_tree_counting(&tree).unwrap(), 5 + symlinks);
        assert!(!tree.exists());
        assert_eq!(fs::read(outside.join("keep")).unwrap(), b"keep", "a symlink is not followed");
        assert_eq!(remove_tree_counting(&tree).unwrap(), 0, "an absent tree is no error");
    }
}
