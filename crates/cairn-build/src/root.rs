//! Creating a build's directory on the host: the sandbox root's [`Skeleton`], made by the daemon
//! before the helper starts (inside the user namespace the helper could not create files owned
//! by anyone), and removed after the build.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstatat, FileStat, Mode, SFlag};

use crate::sandbox::{under, Node, Owner, Skeleton, COPY_MAX};

/// What [`create`] placed.
#[derive(Debug, Default)]
pub struct Placed {
    /// The inputs (store path base names) given a mount point, which the sandbox must bind
    /// ([`crate::sandbox::SandboxSpec::bind_only`]).
    pub bound: BTreeSet<String>,
    /// Entries of the root that are hard links to files outside the build (inputs, `shared`
    /// files): what a root kept for its user must lose ([`forget`]).
    pub linked: Vec<PathBuf>,
    /// Every input's base name, and whether it was given a mount point: what the store
    /// directory holds, as a view ([`crate::views`]) keeps it.
    pub inputs: std::collections::HashMap<String, bool>,
}

/// Creates `skeleton` under `root` (which must not exist; its parent must). Entries owned by
/// [`Owner::Builder`] are given to `builder` (uid, gid) when it is set, those of
/// [`Owner::BuildGroup`] to its group.
///
/// With `shared` (a directory of the daemon's on the root's file system, given when the builder
/// cannot write to the daemon's files), the daemon's files, symlinks and file mount points —
/// the same in every root — are made there once and hard-linked into each root: a link
/// allocates no inode, and on a file system without a journal allocating one is most of what
/// making a root costs.
pub fn create(
    root: &Path,
    skeleton: &Skeleton,
    builder: Option<(u32, u32)>,
    shared: Option<&Path>,
) -> io::Result<Placed> {
    create_from(root, skeleton, builder, shared, None)
}

/// A store directory kept from an earlier root (a view, see [`crate::views`]), for
/// [`create_from`] to take.
pub struct KeptStore<'a> {
    /// The skeleton's path of the store directory (`/nix/store`).
    pub store: &'a str,
    /// Where it is kept.
    pub dir: PathBuf,
    /// Its entries: inputs' base names, and whether each is a mount point.
    pub entries: std::collections::HashMap<String, bool>,
    /// The group it belongs to.
    pub group: u32,
}

/// [`create`], the store directory taken from `kept` when given: its entries that are inputs
/// stay, the others go, and only the inputs it lacks are placed.
pub fn create_from(
    root: &Path,
    skeleton: &Skeleton,
    builder: Option<(u32, u32)>,
    shared: Option<&Path>,
    kept: Option<KeptStore<'_>>,
) -> io::Result<Placed> {
    fs::DirBuilder::new().mode(0o755).create(root)?;
    let store = kept.as_ref().map(|k| k.store);
    let mut view = kept;
    let give = |path: &Path, owner: Owner| -> io::Result<()> {
        match (owner, builder) {
            (Owner::Builder, Some((uid, gid))) => std::os::unix::fs::lchown(path, Some(uid), Some(gid))?,
            (Owner::BuildGroup, Some((_, gid))) => std::os::unix::fs::lchown(path, None, Some(gid))?,
            _ => {}
        }
        Ok(())
    };
    let (mut targets, mut sources) = (Dirs::default(), Dirs::default());
    let mut placed = Placed::default();
    let shared = shared.and_then(open_private);
    for node in skeleton {
        if let (Some(shared), Some((key, file))) = (&shared, SharedFile::of(node)) {
            let p = under(root, node_path(node));
            let (to, name) = targets.split(&p)?;
            if link_shared(shared.as_fd(), &key, to, name, &file).is_ok() {
                placed.linked.push(p);
                continue;
            }
        }
        match node {
            Node::Dir { path, .. } if Some(path.as_str()) == store => {
                let (Some(v), Some((_, gid))) = (&view, builder) else {
                    return Err(io::Error::other("a kept store directory without a build user"));
                };
                let p = under(root, path);
                fs::rename(&v.dir, &p)?;
                if v.group != gid {
                    std::os::unix::fs::lchown(&p, None, Some(gid))?;
                }
            }
            Node::Dir { path, mode, owner } => {
                let p = under(root, path);
                fs::DirBuilder::new().create(&p)?;
                // Set explicitly: the umask would clear the sticky or group bits of `mode`.
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode))?;
                give(&p, *owner)?;
            }
            Node::File { path, contents, mode, owner } => {
                let p = under(root, path);
                fs::OpenOptions::new().write(true).create_new(true).mode(*mode).open(&p)?;
                fs::write(&p, contents).or_else(|_| {
                    // A read-only mode: write through a temporary permission.
                    fs::set_permissions(&p, fs::Permissions::from_mode(0o600))?;
                    fs::write(&p, contents)?;
                    fs::set_permissions(&p, fs::Permissions::from_mode(*mode))
                })?;
                give(&p, *owner)?;
            }
            Node::Symlink { path, target } => symlink(target, under(root, path))?,
            Node::MountPoint { path, dir } => {
                let target = under(root, path);
                let (at, name) = targets.split(&target)?;
                mount_point(at, name, *dir)?;
            }
            Node::Input { path, source, link } => {
                let target = under(root, path);
                if let Some(bound) = view.as_mut().and_then(|v| v.entries.remove(input_name(&target))) {
                    let name = input_name(&target).to_owned();
                    if bound {
                        placed.bound.insert(name.clone());
                    } else {
                        placed.linked.push(target);
                    }
                    placed.inputs.insert(name, bound);
                    continue;
                }
                let (to, name) = targets.split(&target)?;
                let (from, source_name) = sources.split(source)?;
                let st = fstatat(from, source_name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| {
                    io::Error::new(io::Error::from(e).kind(), format!("input '{}': {e}", source.display()))
                })?;
                let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
                // Never a link to what the builder could write: a store file is read-only and
                // the daemon's, but check rather than trust it.
                let linkable = *link
                    && kind != SFlag::S_IFDIR
                    && st.st_mode & 0o222 == 0
                    && builder.is_none_or(|(uid, _)| uid != st.st_uid);
                // A link fails where the file has too many links already (EMLINK) or is on
                // another mount of the same device (EXDEV): copied then if small, as Nix's
                // `linkOrCopy` copies, else bound.
                let linked = linkable && nix::unistd::linkat(from, source_name, to, name, AtFlags::empty()).is_ok();
                if !linked && (kind == SFlag::S_IFDIR || st.st_size as u64 > COPY_MAX) {
                    mount_point(to, name, kind == SFlag::S_IFDIR)?;
                    placed.bound.insert(name.to_string_lossy().into_owned());
                    placed.inputs.insert(name.to_string_lossy().into_owned(), true);
                    continue;
                }
                if !linked {
                    // Another file system than the store's: a copy made once in the shared
                    // directory and linked into each root that needs it, where there is one.
                    // Only what no one may write or run as another: every root shares the copy.
                    let shareable = st.st_mode & 0o7222 == 0;
                    let shared_link = shared.as_ref().filter(|_| shareable).is_some_and(|d| {
                        let (key, file) = SharedFile::input(from, source_name, &st);
                        link_shared(d.as_fd(), &key, to, name, &file).is_ok()
                    });
                    if !shared_link {
                        copy_input(from, source_name, &st, to, name)?;
                    }
                }
                placed.inputs.insert(name.to_string_lossy().into_owned(), false);
                placed.linked.push(target);
            }
        }
    }
    // What the view held that this build does not need (only the daemon's entries: a view
    // holds nothing else).
    if let (Some(store), Some(v)) = (store, view) {
        let dir = under(root, store);
        for name in v.entries.keys() {
            cairn_store::remove_tree(&dir.join(name)).map_err(|e| io::Error::other(e.to_string()))?;
        }
    }
    Ok(placed)
}

/// The base name of an input's place in the root.
fn input_name(target: &Path) -> &str {
    target.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// An empty directory or file `name` in `at`, for a bind mount to cover.
fn mount_point(at: BorrowedFd<'_>, name: &std::ffi::OsStr, dir: bool) -> io::Result<()> {
    if dir {
        Ok(nix::sys::stat::mkdirat(at, name, Mode::from_bits_truncate(0o555))?)
    } else {
        openat(at, name, OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC, 0o444).map(drop)
    }
}

fn node_path(node: &Node) -> &str {
    match node {
        Node::Dir { path, .. }
        | Node::File { path, .. }
        | Node::Symlink { path, .. }
        | Node::MountPoint { path, .. }
        | Node::Input { path, .. } => path,
    }
}

/// A skeleton entry that may be a link to a shared file: its kind, mode and contents.
enum SharedFile<'a> {
    File {
        contents: &'a [u8],
        mode: u32,
    },
    Symlink {
        target: &'a str,
    },
    MountPoint,
    /// A copy of a small input (a file or symlink of the store, `source` in `from`, whose status
    /// is `st`) on another file system than the store's, made once for every root that needs
    /// it.
    Input {
        from: BorrowedFd<'a>,
        source: &'a std::ffi::OsStr,
        st: &'a FileStat,
    },
}

impl<'a> SharedFile<'a> {
    /// The shared file `node` may be (only the daemon's: a builder's file is its own), named by
    /// what it holds.
    fn of(node: &'a Node) -> Option<(String, SharedFile<'a>)> {
        let (tag, bytes, file) = match node {
            Node::File { contents, mode, owner: Owner::Daemon, .. } => {
                (format!("file-{mode:o}"), &contents[..], SharedFile::File { contents, mode: *mode })
            }
            Node::Symlink { target, .. } => ("symlink".to_owned(), target.as_bytes(), SharedFile::Symlink { target }),
            Node::MountPoint { dir: false, .. } => ("mount-point".to_owned(), &b""[..], SharedFile::MountPoint),
            _ => return None,
        };
        let digest = cairn_nix::hash::Hash::digest(cairn_nix::hash::HashAlgo::Sha256, bytes);
        Some((format!("{tag}-{}", digest.encode(cairn_nix::hash::Encoding::Nix32)), file))
    }

    /// The shared copy of an input, named by the identity of the store's file (device, inode,
    /// change time, size, mode, name): a path deleted and made again is another file, and is
    /// copied again.
    fn input(from: BorrowedFd<'a>, source: &'a std::ffi::OsStr, st: &'a FileStat) -> (String, SharedFile<'a>) {
        use std::os::unix::ffi::OsStrExt;
        let id = format!(
            "{}:{}:{}.{}:{}:{:o}:",
            st.st_dev, st.st_ino, st.st_ctime, st.st_ctime_nsec, st.st_size, st.st_mode
        );
        let mut bytes = id.into_bytes();
        bytes.extend_from_slice(source.as_bytes());
        let digest = cairn_nix::hash::Hash::digest(cairn_nix::hash::HashAlgo::Sha256, &bytes);
        (
            format!("{INPUT_PREFIX}{}", digest.encode(cairn_nix::hash::Encoding::Nix32)),
            SharedFile::Input { from, source, st },
        )
    }

    /// Makes the file as `name` in `dir` (which must not hold that name), at its final mode.
    fn make(&self, dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
        use std::io::Write;
        let create = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let (contents, mode) = match self {
            SharedFile::Symlink { target } => return Ok(nix::unistd::symlinkat(*target, dir, name)?),
            SharedFile::File { contents, mode } => (*contents, *mode),
            SharedFile::MountPoint => (&b""[..], 0o444),
            SharedFile::Input { from, source, st } => {
                prune_inputs(dir);
                return copy_input(*from, source, st, dir, name.as_ref());
            }
        };
        let mut f = openat(dir, name.as_ref(), create, 0o600)?;
        f.write_all(contents)?;
        // Through the descriptor: nothing named can be swapped in between.
        f.set_permissions(fs::Permissions::from_mode(mode))
    }
}

/// What the names of shared copies of inputs start with.
const INPUT_PREFIX: &str = "input-";

/// Every this many copies of inputs made in the shared directory, those no root links to any
/// more (one link: the shared directory's own) are removed, so that a long-lived daemon's
/// shared directory (on a tmpfs, memory) holds about what its current builds use.
const PRUNE_EVERY: u64 = 1024;

fn prune_inputs(dir: BorrowedFd<'_>) {
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % PRUNE_EVERY != PRUNE_EVERY - 1 {
        return;
    }
    let Ok(d) = nix::dir::Dir::openat(dir, ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
    else {
        return;
    };
    let names: Vec<std::ffi::CString> = d
        .into_iter()
        .flatten()
        .filter(|e| e.file_name().to_bytes().starts_with(INPUT_PREFIX.as_bytes()))
        .map(|e| e.file_name().to_owned())
        .collect();
    for name in names {
        let unused = fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|st| st.st_nlink == 1);
        if unused {
            // A build linking it meanwhile finds it gone and makes it again.
            let _ = nix::unistd::unlinkat(dir, name.as_c_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Opens a directory of this daemon's at `path` (the shared files', the views'), making it
/// (0700) if it is not there: only a real directory (not a symlink) that is the daemon's and no
/// one else's may be used, since the build directory (`/tmp` by default) is anyone's to write
/// in, and anyone may guess its name.
pub(crate) fn open_private(path: &Path) -> Option<OwnedFd> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(_) => return None,
    }
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::open(path, flags, Mode::empty()).ok()?;
    let st = nix::sys::stat::fstat(&fd).ok()?;
    let ours = st.st_uid == nix::unistd::geteuid().as_raw() && st.st_mode & 0o077 == 0;
    if !ours {
        tracing::warn!("not using '{}' for the sandbox roots: it is not the daemon's alone", path.display());
    }
    ours.then_some(fd)
}

/// Hard-links `name` in `to` to the file of the shared directory `shared` named `key`, which the
/// first build to need it makes (under a temporary name, then renamed into place: builds run
/// side by side).
fn link_shared(
    shared: BorrowedFd<'_>,
    key: &str,
    to: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    file: &SharedFile<'_>,
) -> io::Result<()> {
    match nix::unistd::linkat(shared, key, to, name, AtFlags::empty()) {
        Err(nix::errno::Errno::ENOENT) => {}
        other => return Ok(other?),
    }
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = format!(".{key}.{}.{n}", std::process::id());
    file.make(shared, &tmp)?;
    if let Err(e) = nix::fcntl::renameat(shared, tmp.as_str(), shared, key) {
        let _ = nix::unistd::unlinkat(shared, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        return Err(e.into());
    }
    Ok(nix::unistd::linkat(shared, key, to, name, AtFlags::empty())?)
}

/// The directory of files shared by the roots of this process's builds, in `build_dir`: named
/// as a build directory, so that [`sweep_orphans`] removes it once the process is gone, but
/// with a `@`, which no derivation's name holds.
pub fn shared_dir(build_dir: &Path) -> PathBuf {
    build_dir.join(top_name("@shared", 0))
}

/// The directory last opened for entries created or read in it: a sandbox has hundreds of
/// inputs in one store directory, and resolving that directory's path once instead of for each
/// of them is most of what placing an input costs.
#[derive(Default)]
struct Dirs(Option<(std::path::PathBuf, OwnedFd)>);

impl Dirs {
    /// The directory of `path` (opened, or the one kept) and `path`'s last component.
    fn split<'p>(&mut self, path: &'p Path) -> io::Result<(BorrowedFd<'_>, &'p std::ffi::OsStr)> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("no parent: {}", path.display())));
        };
        if self.0.as_ref().is_none_or(|(p, _)| p != parent) {
            let fd = nix::fcntl::open(parent, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
            self.0 = Some((parent.to_owned(), fd));
        }
        let fd = self.0.as_ref().map(|(_, fd)| fd.as_fd()).ok_or_else(|| io::Error::other("no directory"))?;
        Ok((fd, name))
    }
}

fn openat(at: BorrowedFd<'_>, name: &std::ffi::OsStr, flags: OFlag, mode: u32) -> io::Result<fs::File> {
    Ok(fs::File::from(nix::fcntl::openat(at, name, flags, Mode::from_bits_truncate(mode))?))
}

/// Copies an input that is not a directory (its status `st`): a symlink as a symlink, a file
/// with its mode; either with the store's modification time, so that the builder sees what a
/// link or a bind mount would show it.
fn copy_input(
    from: BorrowedFd<'_>,
    source: &std::ffi::OsStr,
    st: &FileStat,
    to: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
) -> io::Result<()> {
    use nix::sys::stat::{futimens, utimensat, UtimensatFlags};
    use std::io::{Read, Write};
    let mtime = nix::sys::time::TimeSpec::new(st.st_mtime, st.st_mtime_nsec);
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFLNK {
        let target = nix::fcntl::readlinkat(from, source)?;
        nix::unistd::symlinkat(target.as_os_str(), to, name)?;
        utimensat(to, name, &mtime, &mtime, UtimensatFlags::NoFollowSymlink)?;
        return Ok(());
    }
    let mode = st.st_mode & 0o7777;
    let mut input = openat(from, source, OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, 0)?;
    let mut copy = openat(to, name, OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC, mode)?;
    if st.st_size as u64 <= COPY_MAX {
        // Read and written whole: the kernel's copy calls cost more than such a file.
        let mut buf = Vec::with_capacity(st.st_size as usize + 1);
        input.read_to_end(&mut buf)?;
        copy.write_all(&buf)?;
    } else {
        io::copy(&mut input, &mut copy)?;
    }
    // Set explicitly: the umask may have cleared bits of `mode`.
    copy.set_permissions(fs::Permissions::from_mode(mode))?;
    futimens(&copy, &mtime, &mtime)?;
    Ok(())
}

/// Removes from the root of a build kept for its user (`keep-failed`) what [`create`] linked
/// ([`Placed::linked`]) and the inputs' mount points (`bound`, in the root's store directory
/// `store`): a linked input is the store's own file, a shared file every build's, which a kept
/// directory must not offer to change. With a build user (`builder`, whose files alone the
/// builder made), every other file left in the root goes too: where the kernel lets anyone link
/// anyone's file (`fs.protected_hardlinks = 0`), the builder may have linked an input into
/// `/build` or its outputs. The builder's own files and directories stay.
pub fn forget(root: &Path, store: &str, placed: &Placed, builder: Option<u32>) {
    for p in &placed.linked {
        let _ = fs::remove_file(p);
    }
    for name in &placed.bound {
        let at = under(root, &format!("{store}/{name}"));
        if fs::remove_file(&at).is_err() {
            let _ = fs::remove_dir(&at);
        }
    }
    if let Some(uid) = builder {
        // Through descriptors: on a timeout the build's processes may still be dying.
        if let Err(e) = cairn_store::remove_files_not_owned_by(root, uid) {
            tracing::warn!("cannot clear the kept build root '{}': {e}", root.display());
        }
    }
}

/// Opens a kept build directory `top` to everyone (0755 on the way down to its `root/build`), as
/// Nix makes a kept build directory 0755: the user who asked to keep it is seldom the daemon's
/// or the build's user, and must be able to read what the builder left. Called once the build's
/// processes are gone and [`forget`] has taken out what was not the builder's.
pub fn open_kept(top: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for dir in [top.to_owned(), top.join("root"), top.join("root/build")] {
        if let Err(e) = fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)) {
            tracing::warn!("cannot open the kept build directory '{}' to its user: {e}", dir.display());
        }
    }
}

/// What every build directory's name starts with: `cairn-build-NAME-PID-N` ([`top_name`]).
const TOP_PREFIX: &str = "cairn-build-";

/// The name of this process's `n`th build directory, for the derivation named `name`: the pid
/// in it tells [`sweep_orphans`] whose it is.
pub fn top_name(name: &str, n: u64) -> String {
    format!("{TOP_PREFIX}{name}-{}-{n}", std::process::id())
}

/// The file that marks a build directory kept on purpose (`keep-failed`): never swept.
pub const KEPT: &str = ".kept";

/// Removes, from `build_dir`, the build directories (`cairn-build-NAME-PID-N`, this user's) of
/// cairnd processes that are gone: a daemon removes a finished build's directory in the
/// background, and one stopped or killed right after a build leaves it behind. Directories of
/// live processes (another cairnd sharing the directory) are left alone, except this process's
/// own: run before it builds anything, any with its pid are an earlier process's. Returns how
/// many went.
pub fn sweep_orphans(build_dir: &Path) -> usize {
    let me = nix::unistd::geteuid().as_raw();
    let own = std::process::id() as i32;
    let Ok(entries) = fs::read_dir(build_dir) else { return 0 };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(TOP_PREFIX) else { continue };
        // NAME may hold dashes: the pid is the second field from the end.
        let mut fields = rest.rsplitn(3, '-');
        let (Some(n), Some(pid), Some(_)) = (fields.next(), fields.next(), fields.next()) else { continue };
        let (Ok(_), Ok(pid)) = (n.parse::<u64>(), pid.parse::<i32>()) else { continue };
        let mine = std::os::unix::fs::MetadataExt::uid(&match e.metadata() {
            Ok(m) => m,
            Err(_) => continue,
        }) == me;
        let alive = pid != own && Path::new(&format!("/proc/{pid}")).exists();
        let kept = e.path().join(KEPT).exists();
        if mine && !alive && !kept && remove(&e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Removes a build directory, whatever the builder left in it (read-only directories included).
pub fn remove(dir: &Path) -> io::Result<()> {
    match cairn_store::remove_tree(dir) {
        Ok(()) => Ok(()),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn build_directories_of_processes_that_are_gone_are_swept_and_others_kept() {
        let t = tempfile::tempdir().unwrap();
        let gone = t.path().join("cairn-build-some-name-2147483646-3");
        let live = t.path().join("cairn-build-x-1-0"); // init: a live process, not this one
        let other = t.path().join("not-a-build-2147483646-1");
        for d in [&gone, &live, &other] {
            fs::create_dir_all(d.join("root/nix/store")).unwrap();
        }
        // A read-only directory inside, as a builder may leave.
        fs::set_permissions(gone.join("root/nix"), fs::Permissions::from_mode(0o555)).unwrap();
        let own = t.path().join(top_name("y", 0));
        fs::create_dir_all(&own).unwrap();
        let kept = t.path().join("cairn-build-z-2147483646-4");
        fs::create_dir_all(&kept).unwrap();
        fs::write(kept.join(KEPT), b"").unwrap();
        assert_eq!(sweep_orphans(t.path()), 2);
        assert!(!gone.exists() && !own.exists() && live.exists() && other.exists());
        assert!(kept.exists(), "a directory kept for the user (keep-failed) stays");
    }

    #[test]
    fn inputs_are_linked_copied_or_given_a_mount_point_by_kind_and_size() {
        let t = tempfile::tempdir().unwrap();
        let store = t.path().join("store");
        fs::create_dir_all(store.join("a-dir/sub")).unwrap();
        fs::write(store.join("b-file"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(store.join("b-file"), fs::Permissions::from_mode(0o555)).unwrap();
        symlink("b-file", store.join("c-link")).unwrap();
        fs::write(store.join("d-big"), vec![7u8; COPY_MAX as usize + 1]).unwrap();
        fs::set_permissions(store.join("d-big"), fs::Permissions::from_mode(0o444)).unwrap();
        let one = nix::sys::time::TimeSpec::new(1, 0);
        for n in ["b-file", "c-link", "d-big"] {
            let flag = nix::sys::stat::UtimensatFlags::NoFollowSymlink;
            nix::sys::stat::utimensat(nix::fcntl::AT_FDCWD, &store.join(n), &one, &one, flag).unwrap();
        }
        let skeleton = |link: bool| -> Skeleton {
            let mut sk = vec![
                Node::Dir { path: "/nix".into(), mode: 0o755, owner: Owner::Daemon },
                Node::Dir { path: "/nix/store".into(), mode: 0o1775, owner: Owner::Daemon },
            ];
            for n in ["a-dir", "b-file", "c-link", "d-big"] {
                sk.push(Node::Input { path: format!("/nix/store/{n}"), source: store.join(n), link });
            }
            sk
        };
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();

        let copied = t.path().join("copied");
        assert_eq!(create(&copied, &skeleton(false), None, None).unwrap().bound, names(&["a-dir", "d-big"]));
        let at = copied.join("nix/store");
        let (dir, big) = (fs::metadata(at.join("a-dir")).unwrap(), fs::metadata(at.join("d-big")).unwrap());
        assert!(dir.is_dir() && fs::read_dir(at.join("a-dir")).unwrap().next().is_none(), "an empty mount point");
        assert_eq!(big.len(), 0, "a large file gets a mount point, not a copy");
        let (file, orig) =
            (fs::symlink_metadata(at.join("b-file")).unwrap(), fs::metadata(store.join("b-file")).unwrap());
        assert_eq!(fs::read(at.join("b-file")).unwrap(), b"#!/bin/sh\n");
        assert_eq!((file.mode() & 0o7777, file.mtime()), (0o555, 1));
        assert_ne!(file.ino(), orig.ino(), "a copy");
        assert_eq!(fs::read_link(at.join("c-link")).unwrap(), Path::new("b-file"), "a symlink stays one");
        assert_eq!(fs::symlink_metadata(at.join("c-link")).unwrap().mtime(), 1);

        let linked = t.path().join("linked");
        assert_eq!(create(&linked, &skeleton(true), None, None).unwrap().bound, names(&["a-dir"]));
        let at = linked.join("nix/store");
        assert_eq!(fs::metadata(at.join("b-file")).unwrap().ino(), orig.ino());
        assert_eq!(fs::metadata(at.join("d-big")).unwrap().ino(), fs::metadata(store.join("d-big")).unwrap().ino());
        remove(&linked).unwrap();
        assert_eq!(fs::read(store.join("b-file")).unwrap(), b"#!/bin/sh\n", "removing the root leaves the store");

        // An input that is not there is named.
        let mut sk = skeleton(true);
        sk.push(Node::Input { path: "/nix/store/e-gone".into(), source: store.join("e-gone"), link: true });
        let e = create(&t.path().join("gone"), &sk, None, None).unwrap_err().to_string();
        assert!(e.contains("e-gone") && e.contains("No such file"), "{e}");
    }

    #[test]
    fn small_inputs_from_another_file_system_are_copied_once_and_linked_into_each_root() {
        let t = tempfile::tempdir().unwrap();
        let store = t.path().join("store");
        fs::create_dir_all(&store).unwrap();
        let make = |name: &str, contents: &[u8], mode: u32| {
            let p = store.join(name);
            let _ = fs::remove_file(&p);
            fs::write(&p, contents).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        };
        make("b-file", b"one\n", 0o444);
        make("w-writable", b"mine\n", 0o644);
        // `link: false`: as when the store is on another file system than the roots.
        let sk = || -> Skeleton {
            let mut sk = vec![
                Node::Dir { path: "/nix".into(), mode: 0o755, owner: Owner::Daemon },
                Node::Dir { path: "/nix/store".into(), mode: 0o1775, owner: Owner::Daemon },
            ];
            for n in ["b-file", "w-writable"] {
                sk.push(Node::Input { path: format!("/nix/store/{n}"), source: store.join(n), link: false });
            }
            sk
        };
        let shared = shared_dir(t.path());
        let builder = Some((4242, 4242));
        let ino = |root: &str, n: &str| fs::metadata(t.path().join(root).join("nix/store").join(n)).unwrap().ino();
        for root in ["r1", "r2"] {
            create(&t.path().join(root), &sk(), builder, Some(&shared)).unwrap();
        }
        assert_eq!(ino("r1", "b-file"), ino("r2", "b-file"), "one copy, linked into both roots");
        assert_ne!(ino("r1", "b-file"), fs::metadata(store.join("b-file")).unwrap().ino(), "a copy, not the store's");
        assert_ne!(ino("r1", "w-writable"), ino("r2", "w-writable"), "a file someone may write is never shared");
        assert_eq!(fs::read(t.path().join("r2/nix/store/b-file")).unwrap(), b"one\n");
        // The store's file made again (deleted, then built anew) is another file: copied again.
        make("b-file", b"two\n", 0o444);
        create(&t.path().join("r3"), &sk(), builder, Some(&shared)).unwrap();
        assert_ne!(ino("r3", "b-file"), ino("r1", "b-file"));
        assert_eq!(fs::read(t.path().join("r3/nix/store/b-file")).unwrap(), b"two\n");
        // Without a shared directory (the builder could write the daemon's files): a copy each.
        create(&t.path().join("r4"), &sk(), None, None).unwrap();
        assert_ne!(ino("r4", "b-file"), ino("r3", "b-file"));
    }

    #[test]
    fn the_daemons_files_are_shared_between_roots_and_a_kept_root_loses_its_links() {
        let t = tempfile::tempdir().unwrap();
        let shared = shared_dir(t.path());
        let sk = vec![
            Node::Dir { path: "/etc".into(), mode: 0o755, owner: Owner::Daemon },
            Node::File {
                path: "/etc/passwd".into(),
                contents: b"root:x:0:0\n".to_vec(),
                mode: 0o444,
                owner: Owner::Daemon,
            },
            Node::File {
                path: "/etc/group".into(),
                contents: b"root:x:0:\n".to_vec(),
                mode: 0o444,
                owner: Owner::Daemon,
            },
            Node::Dir { path: "/build".into(), mode: 0o700, owner: Owner::Daemon },
            Node::File {
                path: "/build/.attr-x".into(),
                contents: b"mine".to_vec(),
                mode: 0o644,
                owner: Owner::Builder,
            },
            Node::Dir { path: "/dev".into(), mode: 0o755, owner: Owner::Daemon },
            Node::Symlink { path: "/dev/fd".into(), target: "/proc/self/fd".into() },
            Node::MountPoint { path: "/dev/null".into(), dir: false },
            Node::MountPoint { path: "/dev/shm".into(), dir: true },
        ];
        let (one, two) = (t.path().join("one"), t.path().join("two"));
        let first = create(&one, &sk, None, Some(&shared)).unwrap();
        create(&two, &sk, None, Some(&shared)).unwrap();
        let ino = |r: &Path, p: &str| fs::symlink_metadata(r.join(p)).unwrap().ino();
        for p in ["etc/passwd", "etc/group", "dev/fd", "dev/null"] {
            assert_eq!(ino(&one, p), ino(&two, p), "{p} is one shared file");
        }
        assert_ne!(ino(&one, "etc/passwd"), ino(&one, "etc/group"), "files are shared by contents");
        assert_ne!(ino(&one, "build/.attr-x"), ino(&two, "build/.attr-x"), "a builder's file is its own");
        assert_eq!(fs::read(one.join("etc/passwd")).unwrap(), b"root:x:0:0\n");
        assert_eq!(fs::metadata(one.join("etc/passwd")).unwrap().mode() & 0o7777, 0o444);
        assert_eq!(fs::metadata(one.join("dev/null")).unwrap().mode() & 0o7777, 0o444);
        assert_eq!(fs::read_link(one.join("dev/fd")).unwrap(), Path::new("/proc/self/fd"));
        assert!(fs::metadata(one.join("dev/shm")).unwrap().is_dir());

        forget(&one, "/nix/store", &first, None);
        for p in ["etc/passwd", "etc/group", "dev/fd", "dev/null"] {
            assert!(fs::symlink_metadata(one.join(p)).is_err(), "{p} is gone from the kept root");
            assert!(fs::symlink_metadata(two.join(p)).is_ok(), "{p} stays in the other");
        }
        assert!(one.join("build/.attr-x").exists());
    }

    #[test]
    fn a_shared_directory_someone_else_could_write_or_a_symlink_is_not_used() {
        let t = tempfile::tempdir().unwrap();
        let sk = vec![
            Node::Dir { path: "/etc".into(), mode: 0o755, owner: Owner::Daemon },
            Node::File { path: "/etc/passwd".into(), contents: b"x\n".to_vec(), mode: 0o444, owner: Owner::Daemon },
        ];
        // Made first by someone else, open to all.
        let open = t.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        create(&t.path().join("a"), &sk, None, Some(&open)).unwrap();
        assert_eq!(fs::read_dir(&open).unwrap().count(), 0, "nothing is made in it");
        assert_eq!(fs::read(t.path().join("a/etc/passwd")).unwrap(), b"x\n", "the root is made all the same");
        // A symlink to a directory elsewhere.
        let elsewhere = t.path().join("elsewhere");
        fs::DirBuilder::new().mode(0o700).create(&elsewhere).unwrap();
        symlink(&elsewhere, t.path().join("link")).unwrap();
        create(&t.path().join("b"), &sk, None, Some(&t.path().join("link"))).unwrap();
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0, "a symlink is not followed");
        assert_eq!(fs::read(t.path().join("b/etc/passwd")).unwrap(), b"x\n");
    }

    #[test]
    fn an_input_the_builder_could_write_is_copied_not_linked() {
        let t = tempfile::tempdir().unwrap();
        let store = t.path().join("store");
        fs::create_dir(&store).unwrap();
        fs::write(store.join("w-file"), b"writable").unwrap();
        fs::set_permissions(store.join("w-file"), fs::Permissions::from_mode(0o644)).unwrap();
        let sk = vec![
            Node::Dir { path: "/nix".into(), mode: 0o755, owner: Owner::Daemon },
            Node::Dir { path: "/nix/store".into(), mode: 0o1775, owner: Owner::Daemon },
            Node::Input { path: "/nix/store/w-file".into(), source: store.join("w-file"), link: true },
        ];
        let root = t.path().join("root");
        create(&root, &sk, None, None).unwrap();
        let (copy, orig) =
            (fs::metadata(root.join("nix/store/w-file")).unwrap(), fs::metadata(store.join("w-file")).unwrap());
        assert_ne!(copy.ino(), orig.ino(), "a store file with a write bit is not linked");
        assert_eq!(fs::read(root.join("nix/store/w-file")).unwrap(), b"writable");
    }

    #[test]
    fn a_kept_root_keeps_only_the_builders_files() {
        if !nix::unistd::geteuid().is_root() {
            return; // needs files of two owners
        }
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir_all(root.join("build/sub")).unwrap();
        fs::write(root.join("build/mine"), b"m").unwrap();
        fs::write(root.join("build/sub/linked-in"), b"l").unwrap();
        std::os::unix::fs::lchown(root.join("build/mine"), Some(30123), Some(30123)).unwrap();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("theirs"), b"t").unwrap();
        symlink(&outside, root.join("build/to-outside")).unwrap();
        forget(&root, "/nix/store", &Placed::default(), Some(30123));
        assert!(outside.join("theirs").exists(), "a symlink is not followed");
        assert!(fs::symlink_metadata(root.join("build/to-outside")).is_err(), "the symlink itself goes");
        assert!(root.join("build/mine").exists(), "the builder's file stays");
        assert!(!root.join("build/sub/linked-in").exists(), "another's file goes");
        assert!(root.join("build/sub").is_dir(), "directories stay");
    }

    #[test]
    fn creates_every_kind_of_entry_with_its_mode() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let sk = vec![
            Node::Dir { path: "/nix".into(), mode: 0o755, owner: Owner::Daemon },
            Node::Dir { path: "/nix/store".into(), mode: 0o1775, owner: Owner::Builder },
            Node::Dir { path: "/etc".into(), mode: 0o755, owner: Owner::Daemon },
            Node::File { path: "/etc/passwd".into(), contents: b"x\n".to_vec(), mode: 0o444, owner: Owner::Daemon },
            Node::Symlink { path: "/etc/fd".into(), target: "/proc/self/fd".into() },
            Node::MountPoint { path: "/nix/store/a".into(), dir: true },
            Node::MountPoint { path: "/etc/hosts".into(), dir: false },
        ];
        create(&root, &sk, None, None).unwrap();
        let m = fs::metadata(root.join("nix/store")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o1775);
        assert_eq!(fs::read(root.join("etc/passwd")).unwrap(), b"x\n");
        assert_eq!(fs::metadata(root.join("etc/passwd")).unwrap().mode() & 0o777, 0o444);
        assert_eq!(fs::read_link(root.join("etc/fd")).unwrap(), Path::new("/proc/self/fd"));
        assert!(root.join("nix/store/a").is_dir() && root.join("etc/hosts").is_file());
        assert!(create(&root, &sk, None, None).is_err(), "an existing root is refused");
        remove(&root).unwrap();
        assert!(!root.exists());
    }
}
