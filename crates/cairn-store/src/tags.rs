//! Image tags: named, permanent garbage-collector roots.
//!
//! A tag is a symlink `<state>/gcroots/oci-tags/<name>` to an image layout's store path, so the
//! collector's ordinary link roots keep an image (and, through the layout's references, every
//! blob of it) while it is tagged, `gc --print-roots` shows the tag, and untagging is removing
//! one symlink. The names are chosen by the caller (`cairn-oci`'s `TagName::file_name`); this
//! module only keeps them to one directory level and writes each link atomically (a temporary
//! link renamed over the old one), so a crash leaves either the old tag or the new.

use std::fs;
use std::io;
use std::path::PathBuf;

use cairn_nix::StorePath;

use crate::{LocalStore, Result, StoreError};

impl LocalStore {
    /// The directory of tag roots.
    pub fn tags_dir(&self) -> PathBuf {
        self.gc_roots_dir().join("oci-tags")
    }

    fn tag_link(&self, name: &str) -> Result<PathBuf> {
        if name.is_empty() || name.starts_with('.') || name.contains('/') || name.contains('\0') {
            return Err(StoreError::BadTagName(name.to_owned()));
        }
        Ok(self.tags_dir().join(name))
    }

    /// Points tag `name` at `path` (which must be valid), replacing what it pointed at.
    pub fn set_tag(&self, name: &str, path: &StorePath) -> Result<()> {
        let link = self.tag_link(name)?;
        let _root = self.temp.add([path.clone()]);
        if !self.is_valid(path)? {
            return Err(StoreError::NotValid(self.store_dir().display(path)));
        }
        let dir = self.tags_dir();
        fs::create_dir_all(&dir).map_err(|source| StoreError::Io { op: "create", path: dir.clone(), source })?;
        let n = self.tmp_counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".new-{}-{n}", std::process::id()));
        let target = self.layout.real_store_dir.join(path.base_name());
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp).map_err(|source| StoreError::Io {
            op: "create symlink",
            path: tmp.clone(),
            source,
        })?;
        fs::rename(&tmp, &link).map_err(|source| StoreError::Io { op: "rename", path: link.clone(), source })?;
        crate::fsops::sync_dir(&dir)
    }

    /// Removes tag `name`; `false` if there was none.
    pub fn remove_tag(&self, name: &str) -> Result<bool> {
        let link = self.tag_link(name)?;
        match fs::remove_file(&link) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StoreError::Io { op: "remove", path: link, source }),
        }
    }

    /// The path tag `name` points at, if it exists and points into the store.
    pub fn tag(&self, name: &str) -> Result<Option<StorePath>> {
        let link = self.tag_link(name)?;
        match fs::read_link(&link) {
            Ok(t) => Ok(crate::roots::store_path_of(&self.layout, &t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { op: "read", path: link, source }),
        }
    }

    /// Every tag and the path it points at, sorted by name.
    pub fn tags(&self) -> Result<Vec<(String, StorePath)>> {
        let dir = self.tags_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Io { op: "list", path: dir, source }),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(|source| StoreError::Io { op: "list", path: dir.clone(), source })?;
            let Some(name) = e.file_name().to_str().map(str::to_owned) else { continue };
            if name.starts_with('.') {
                continue;
            }
            if let Ok(t) = fs::read_link(e.path()) {
                if let Some(p) = crate::roots::store_path_of(&self.layout, &t) {
                    out.push((name, p));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use cairn_nix::StoreDir;

    use crate::{GcOptions, LocalStore, StoreLayout};

    #[test]
    fn tags_are_roots_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(StoreLayout::under_root(dir.path(), StoreDir::new("/store").unwrap())).unwrap();
        let p = store.add_text("image", b"x", &BTreeSet::new()).unwrap().path;
        store.set_tag("app:v1", &p).unwrap();
        assert_eq!(store.tag("app:v1").unwrap(), Some(p.clone()));
        assert_eq!(store.tags().unwrap(), vec![("app:v1".to_owned(), p.clone())]);
        let r = store.collect_garbage(&GcOptions::default()).unwrap();
        assert!(r.deleted.is_empty());
        assert!(store.remove_tag("app:v1").unwrap());
        assert!(!store.remove_tag("app:v1").unwrap());
        let r = store.collect_garbage(&GcOptions::default()).unwrap();
        assert_eq!(r.deleted, vec![p]);
        for bad in ["", ".x", "a/b"] {
            assert!(store.set_tag(bad, &r.deleted[0]).is_err());
        }
    }
}
