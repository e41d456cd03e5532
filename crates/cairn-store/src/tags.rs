//! Named groups of roots: named, permanent garbage-collector roots (image tags, automata).
//!
//! A root link is a symlink `<state>/gcroots/<group>/<name>` to a store path, so the collector's
//! ordinary link roots keep the path (and its closure) while the link exists, `gc --print-roots`
//! shows it, and removing it is removing one symlink. Groups and names are chosen by the caller
//! (`cairn-oci`'s `tag::ROOT_GROUP` and `TagName::file_name` for image tags); the store knows
//! none of them. This module only keeps them to one directory level each and writes each link
//! atomically (a temporary link renamed over the old one), so a crash leaves either the old link
//! or the new.

use std::fs;
use std::io;
use std::path::PathBuf;

use cairn_nix::StorePath;

use crate::{LocalStore, Result, StoreError};

impl LocalStore {
    /// A root link `gcroots/<group>/<name>`; both must be single, visible path components.
    fn root_link(&self, group: &str, name: &str) -> Result<PathBuf> {
        for part in [group, name] {
            if part.is_empty()
                || part.len() > 255
                || part.starts_with('.')
                || part.contains('/')
                || part.contains('\0')
                || part == "auto"
            {
                return Err(StoreError::BadTagName(part.to_owned()));
            }
        }
        Ok(self.gc_roots_dir().join(group).join(name))
    }

    /// Makes `gcroots/<group>/<name>` a root of `path` (which must be valid), replacing what it
    /// pointed at. Tags and automata keep their paths this way.
    pub fn set_root_link(&self, group: &str, name: &str, path: &StorePath) -> Result<()> {
        let link = self.root_link(group, name)?;
        let _root = self.temp.add([path.clone()]);
        if !self.is_valid(path)? {
            return Err(StoreError::NotValid(self.store_dir().display(path)));
        }
        let dir = link.parent().expect("links have a group directory").to_owned();
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
        if let Err(source) = fs::rename(&tmp, &link) {
            // Left, it would be a root of `path` that nothing ever removes.
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Io { op: "rename", path: link, source });
        }
        crate::fsops::sync_dir(&dir)
    }

    /// Removes the root link `gcroots/<group>/<name>`; `false` if there was none.
    pub fn remove_root_link(&self, group: &str, name: &str) -> Result<bool> {
        let link = self.root_link(group, name)?;
        match fs::remove_file(&link) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StoreError::Io { op: "remove", path: link, source }),
        }
    }

    /// The root link `gcroots/<group>/<name>`'s path, if it exists and points into the store.
    pub fn root_link_target(&self, group: &str, name: &str) -> Result<Option<StorePath>> {
        let link = self.root_link(group, name)?;
        match fs::read_link(&link) {
            Ok(t) => Ok(crate::roots::store_path_of(&self.layout, &t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { op: "read", path: link, source }),
        }
    }

    /// Every root link of `group` and the path it points at, sorted by name.
    pub fn root_links(&self, group: &str) -> Result<Vec<(String, StorePath)>> {
        let dir = self.root_link(group, "x")?.parent().expect("a group directory").to_owned();
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

    /// Removes the root links of `group` made (or last replaced) longer than `age` ago; returns
    /// how many went. Links that expire stand for a grace period rather than a lasting root.
    pub fn remove_root_links_older_than(&self, group: &str, age: std::time::Duration) -> Result<usize> {
        let dir = self.root_link(group, "x")?.parent().expect("a group directory").to_owned();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(StoreError::Io { op: "list", path: dir, source }),
        };
        let mut removed = 0;
        for e in entries.flatten() {
            if e.file_name().to_str().is_none_or(|n| n.starts_with('.')) {
                continue;
            }
            let old = fs::symlink_metadata(e.path())
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|a| a > age));
            if old && fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use cairn_nix::StoreDir;

    use crate::{GcOptions, LocalStore, StoreLayout};

    /// A group as `cairn-oci` names image tags' (`tag::ROOT_GROUP`).
    const TAGS: &str = "oci-tags";

    #[test]
    fn tags_are_roots_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(StoreLayout::under_root(dir.path(), StoreDir::new("/store").unwrap())).unwrap();
        let p = store.add_text("image", b"x", &BTreeSet::new()).unwrap().path;
        store.set_root_link(TAGS, "app:v1", &p).unwrap();
        assert_eq!(store.root_link_target(TAGS, "app:v1").unwrap(), Some(p.clone()));
        assert_eq!(store.root_links(TAGS).unwrap(), vec![("app:v1".to_owned(), p.clone())]);
        let r = store.collect_garbage(&GcOptions::default()).unwrap();
        assert!(r.deleted.is_empty());
        assert!(store.remove_root_link(TAGS, "app:v1").unwrap());
        assert!(!store.remove_root_link(TAGS, "app:v1").unwrap());
        let r = store.collect_garbage(&GcOptions::default()).unwrap();
        assert_eq!(r.deleted, vec![p]);
        for bad in ["", ".x", "a/b"] {
            assert!(store.set_root_link(TAGS, bad, &r.deleted[0]).is_err());
        }
    }
}
