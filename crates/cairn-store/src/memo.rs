//! Memos of work whose result is a store path: a cache, not a root.
//!
//! Some results depend only on their inputs and are expensive to make again (`cairn-image`'s
//! unpacked root filesystems, layers made from store paths, streamed layers' descriptions). A
//! caller remembers, per [`Memo`] kind and key, the store path it produced: a symlink
//! `<state>/<kind>/<key hex>` to that path. The kinds are named by their callers — the store
//! knows nothing of what they hold — and each name is checked when the kind is declared (a
//! `const`), so it is one visible directory of the state directory. The directories are deliberately outside
//! `gcroots/`: a cached rootfs is garbage
//! like any other path once nothing else roots it, and a link left dangling (or pointing at a
//! path that is no longer valid) reads as "not cached", so the next unpack rebuilds it and
//! writes the link again. The key is a [`Hash`], whose base-16 form is the file name, so no
//! caller can name a file outside the directory. Links are written as tags are (a temporary
//! link renamed over the old one), so a crash leaves either the old entry or the new.

use std::fs;
use std::io;
use std::path::PathBuf;

use cairn_nix::hash::Encoding;
use cairn_nix::{Hash, StorePath};

use crate::{LocalStore, Result, StoreError, TempRootGuard};

/// A kind of memo: the name of its directory under the state directory, chosen by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memo(&'static str);

impl Memo {
    /// The kind kept in `<state>/<dir>`. `dir` is one path component, not hidden, not `gcroots`
    /// (memos are not roots); declared as a `const`, a bad name fails the build.
    pub const fn named(dir: &'static str) -> Memo {
        let b = dir.as_bytes();
        assert!(!b.is_empty() && b[0] != b'.', "a memo directory is a visible name");
        let mut i = 0;
        while i < b.len() {
            assert!(b[i] != b'/' && b[i] != 0, "a memo directory is one path component");
            i += 1;
        }
        assert!(!matches!(b, b"gcroots"), "memos are not roots");
        Memo(dir)
    }

    fn dir(self) -> &'static str {
        self.0
    }
}

impl LocalStore {
    /// The directory of a kind of memo.
    pub fn memo_dir(&self, kind: Memo) -> PathBuf {
        self.layout.state_dir.join(kind.dir())
    }

    fn memo_link(&self, kind: Memo, key: &Hash) -> PathBuf {
        self.memo_dir(kind).join(key.encode(Encoding::Base16))
    }

    /// The path remembered under `key`, rooted by the guard, if its link exists and points at a
    /// valid path (it is rooted before the check, so a collection cannot take it in between).
    pub fn memo(&self, kind: Memo, key: &Hash) -> Result<Option<(StorePath, TempRootGuard)>> {
        let link = self.memo_link(kind, key);
        let target = match fs::read_link(&link) {
            Ok(t) => t,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::InvalidInput) => return Ok(None),
            Err(source) => return Err(StoreError::Io { op: "read", path: link, source }),
        };
        let Some(path) = crate::roots::store_path_of(&self.layout, &target) else { return Ok(None) };
        let root = self.temp.add([path.clone()]);
        if !self.is_valid(&path)? {
            return Ok(None);
        }
        Ok(Some((path, root)))
    }

    /// Remembers `path` (which must be valid) under `key`, replacing any old entry.
    pub fn remember(&self, kind: Memo, key: &Hash, path: &StorePath) -> Result<()> {
        let link = self.memo_link(kind, key);
        let _root = self.temp.add([path.clone()]);
        if !self.is_valid(path)? {
            return Err(StoreError::NotValid(self.store_dir().display(path)));
        }
        let dir = self.memo_dir(kind);
        fs::create_dir_all(&dir).map_err(|source| StoreError::Io { op: "create", path: dir.clone(), source })?;
        let n = self.tmp_counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".new-{}-{n}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(self.real_path(path), &tmp).map_err(|source| StoreError::Io {
            op: "create symlink",
            path: tmp.clone(),
            source,
        })?;
        if let Err(source) = fs::rename(&tmp, &link) {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Io { op: "rename", path: link, source });
        }
        crate::fsops::sync_dir(&dir)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use cairn_nix::{Hash, HashAlgo, StoreDir};

    use crate::{GcOptions, LocalStore, Memo, StoreLayout};

    /// A kind as `cairn-image` declares its memos.
    const ROOTFS: Memo = Memo::named("oci-rootfs");

    #[test]
    fn cached_rootfs_is_a_memo_not_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(StoreLayout::under_root(dir.path(), StoreDir::new("/store").unwrap())).unwrap();
        let key = Hash::digest(HashAlgo::Sha256, b"manifest");
        assert!(store.memo(ROOTFS, &key).unwrap().is_none());

        let p = store.add_text("oci-rootfs-x", b"x", &BTreeSet::new()).unwrap().path;
        store.remember(ROOTFS, &key, &p).unwrap();
        let (cached, guard) = store.memo(ROOTFS, &key).unwrap().expect("cached");
        assert_eq!(cached, p);
        let link = store.memo_dir(ROOTFS).join(key.encode(cairn_nix::hash::Encoding::Base16));
        assert_eq!(std::fs::read_link(&link).unwrap(), store.real_path(&p));
        drop(guard);

        // Not a root: the collector takes the path, and the entry then reads as absent.
        let r = store.collect_garbage(&GcOptions::default()).unwrap();
        assert_eq!(r.deleted, vec![p.clone()]);
        assert!(store.memo(ROOTFS, &key).unwrap().is_none());

        // Rebuilt: the entry is written again over the dangling one.
        let p = store.add_text("oci-rootfs-x", b"x", &BTreeSet::new()).unwrap().path;
        store.remember(ROOTFS, &key, &p).unwrap();
        assert_eq!(store.memo(ROOTFS, &key).unwrap().map(|(q, _)| q), Some(p));
    }

    #[test]
    fn only_valid_paths_are_cached() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(StoreLayout::under_root(dir.path(), StoreDir::new("/store").unwrap())).unwrap();
        let key = Hash::digest(HashAlgo::Sha256, b"m");
        let missing = cairn_nix::StorePath::from_base_name("00000000000000000000000000000000-oci-rootfs-x").unwrap();
        assert!(store.remember(ROOTFS, &key, &missing).is_err());
        // A link pointing somewhere else than the store is ignored.
        std::fs::create_dir_all(store.memo_dir(ROOTFS)).unwrap();
        let link = store.memo_dir(ROOTFS).join(key.encode(cairn_nix::hash::Encoding::Base16));
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        assert!(store.memo(ROOTFS, &key).unwrap().is_none());
    }
}
