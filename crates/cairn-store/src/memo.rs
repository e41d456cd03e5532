//! Memos of work whose result is a store path: a cache, not a root.
//!
//! Some results depend only on their inputs and are expensive to make again: an image's
//! unpacked root filesystem (keyed by its manifest digest), a layer made from store paths (keyed
//! by the paths and the tar format), a streamed layer's description (keyed by the layer's
//! digest). `cairn-image` remembers, per [`Memo`] kind and key, the store path it produced: a
//! symlink `<state>/<kind dir>/<key hex>` to that path. The directories are deliberately outside
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

/// What a memo remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memo {
    /// An image's unpacked root filesystem, by manifest digest.
    Rootfs,
    /// A layer made from store paths (its description), by the paths and the tar format.
    Layer,
    /// A streamed layer's description, by the layer's digest.
    StreamedLayer,
}

impl Memo {
    fn dir(self) -> &'static str {
        match self {
            Memo::Rootfs => "oci-rootfs",
            Memo::Layer => "oci-layers",
            Memo::StreamedLayer => "oci-streamed-layers",
        }
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

    #[test]
    fn cached_rootfs_is_a_memo_not_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(StoreLayout::under_root(dir.path(), StoreDir::new("/store").unwrap())).unwrap();
        let key = Hash::digest(HashAlgo::Sha256, b"manifest");
        assert!(store.memo(Memo::Rootfs, &key).unwrap().is_none());

        let p = store.add_text("oci-rootfs-x", b"x", &BTreeSet::new()).unwrap().path;
        store.remember(Memo::Rootfs, &key, &p).unwrap();
        let (cached, guard) = store.memo(Memo::Rootfs, &key).unwrap().expect("cached");
        assert_eq!(cached, p);
        let link = store.memo_dir(Memo::Rootfs).join(key.encode(cairn_nix::hash::Encoding::Base16));
        assert_eq!(std::fs::read_link(&link).unwrap(), store.real_path(&p));
        drop(guard);

        // Not a root: the collector takes the path, and the entry then reads as absent.
        let r = store.collect_garbage(&GcOptions::default()).unwrap();
        assert_eq!(r.deleted, vec![p.clone()]);
        assert!(store.memo(Memo::Rootfs, &key).unwrap().is_none());

        // Rebuilt: the entry is written again over the dangling one.
        let p = store.add_text("oci-rootfs-x", b"x", &BTreeSet::new()).unwrap().path;
        store.remember(Memo::Rootfs, &key, &p).unwrap();
        assert_eq!(store.memo(Memo::Rootfs, &key).unwrap().map(|(q, _)| q), Some(p));
    }

    #[test]
    fn only_valid_paths_are_cached() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(StoreLayout::under_root(dir.path(), StoreDir::new("/store").unwrap())).unwrap();
        let key = Hash::digest(HashAlgo::Sha256, b"m");
        let missing = cairn_nix::StorePath::from_base_name("00000000000000000000000000000000-oci-rootfs-x").unwrap();
        assert!(store.remember(Memo::Rootfs, &key, &missing).is_err());
        // A link pointing somewhere else than the store is ignored.
        std::fs::create_dir_all(store.memo_dir(Memo::Rootfs)).unwrap();
        let link = store.memo_dir(Memo::Rootfs).join(key.encode(cairn_nix::hash::Encoding::Base16));
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        assert!(store.memo(Memo::Rootfs, &key).unwrap().is_none());
    }
}
