//! Creating a build's directory on the host: the sandbox root's [`Skeleton`], made by the daemon
//! before the helper starts (inside the user namespace the helper could not create files owned
//! by anyone), and removed after the build.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::sandbox::{under, Node, Owner, Skeleton};

/// Creates `skeleton` under `root` (which must not exist; its parent must). Entries owned by
/// [`Owner::Builder`] are given to `builder` (uid, gid) when it is set.
pub fn create(root: &Path, skeleton: &Skeleton, builder: Option<(u32, u32)>) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o755).create(root)?;
    let give = |path: &Path, owner: Owner| -> io::Result<()> {
        if let (Owner::Builder, Some((uid, gid))) = (owner, builder) {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
        }
        Ok(())
    };
    for node in skeleton {
        match node {
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
                let p = under(root, path);
                if *dir {
                    fs::DirBuilder::new().mode(0o555).create(&p)?;
                } else {
                    fs::OpenOptions::new().write(true).create_new(true).mode(0o444).open(&p)?;
                }
            }
        }
    }
    Ok(())
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
        create(&root, &sk, None).unwrap();
        let m = fs::metadata(root.join("nix/store")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o1775);
        assert_eq!(fs::read(root.join("etc/passwd")).unwrap(), b"x\n");
        assert_eq!(fs::metadata(root.join("etc/passwd")).unwrap().mode() & 0o777, 0o444);
        assert_eq!(fs::read_link(root.join("etc/fd")).unwrap(), Path::new("/proc/self/fd"));
        assert!(root.join("nix/store/a").is_dir() && root.join("etc/hosts").is_file());
        assert!(create(&root, &sk, None).is_err(), "an existing root is refused");
        remove(&root).unwrap();
        assert!(!root.exists());
    }
}
