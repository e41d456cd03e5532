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
