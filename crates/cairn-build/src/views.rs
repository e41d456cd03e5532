//! Store directories of finished builds' roots, kept for the next build: views.
//!
//! A root's store directory holds the build's input closure, an entry per path: a hard link to
//! the store's file (or to a shared copy of it), or an empty mount point for a directory. Builds
//! that follow each other mostly share their closures — the next build of a chain needs all
//! the last one did and its output, every build of one toolchain needs that toolchain — and
//! placing a path is most of what making a root costs (`perf`: a look-up of the store's file, a
//! link, and its removal afterwards). So the store directory of a root whose build succeeded is
//! cleared of what the builder made there (its outputs, registered by then, and anything else)
//! and kept as a view; the next root whose closure overlaps it takes it whole (one rename),
//! removes what it does not need and places only what is missing ([`crate::root::create`]).
//!
//! A view is kept only where the builder cannot have changed what it holds: the builder ran as
//! a build user, not as the daemon's user; the store directory is the daemon's and sticky; and
//! every input entry is the daemon's and read-only — the builder could only add entries, and
//! those go by name. A view remembers the store's count of removals
//! ([`cairn_store::LocalStore::removals`]) when it was kept: once any contents have left the
//! store since, it is dropped, so that a path deleted and made again is never shown with the
//! contents it had.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::sandbox::under;

/// How many views are kept: one per build that may run at once would do, but the memory of a
/// view (its entries' names) and its links are worth keeping only for the builds likely next.
const KEPT: usize = 2;

/// A store directory kept from a finished build's root.
#[derive(Debug)]
pub struct View {
    /// Where it is kept (in [`Views`]'s directory), or, once taken, where it was.
    dir: PathBuf,
    /// Its entries: input store paths' base names, and whether each is a mount point.
    entries: HashMap<String, bool>,
    /// The store's removals when it was kept.
    removals: u64,
    /// The group it belongs to (the builds' group).
    group: u32,
}

impl View {
    /// The view, taken, as the store directory `store` of a new root.
    pub fn into_kept(self, store: &str) -> crate::root::KeptStore<'_> {
        crate::root::KeptStore { store, dir: self.dir, entries: self.entries, group: self.group }
    }
}

/// The views of one daemon's roots in one build directory.
pub struct Views {
    /// A directory of the daemon's alone, named as a build directory (so that the sweep of a
    /// later daemon removes it once this process is gone).
    dir: PathBuf,
    kept: Mutex<Vec<View>>,
    counter: AtomicU64,
}

impl Views {
    pub fn new(build_dir: &Path) -> Views {
        Views {
            dir: build_dir.join(crate::root::top_name("@views", 0)),
            kept: Mutex::new(Vec::new()),
            counter: AtomicU64::new(0),
        }
    }

    /// The kept view that saves the most work for a root whose inputs are `wanted` (base
    /// names), in group `group`, if one saves any; views the store's `removals` have outdated
    /// are dropped.
    pub fn take(&self, wanted: &HashSet<&str>, removals: u64, group: u32) -> Option<View> {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let (fresh, stale): (Vec<View>, Vec<View>) = kept.drain(..).partition(|v| v.removals == removals);
        *kept = fresh;
        let best = kept
            .iter()
            .enumerate()
            .filter(|(_, v)| v.group == group)
            .map(|(i, v)| {
                let shared = v.entries.keys().filter(|n| wanted.contains(n.as_str())).count() as i64;
                (i, shared - (v.entries.len() as i64 - shared))
            })
            .filter(|(_, saved)| *saved > 0)
            .max_by_key(|(_, saved)| *saved)
            .map(|(i, _)| i);
        let taken = best.map(|i| kept.remove(i));
        drop(kept);
        for v in stale {
            remove(&v.dir);
        }
        taken
    }

    /// Keeps the store directory `store` of `root` (whose build succeeded and ran as a build
    /// user of group `group`) as a view holding `inputs` (base name, whether a mount point):
    /// everything else in it — the outputs, collected already, and whatever the builder left —
    /// goes first. Returns the directory of a view no longer kept, for the caller to remove
    /// (in the background: it holds a closure's worth of entries).
    pub fn keep(
        &self,
        root: &Path,
        store: &str,
        inputs: HashMap<String, bool>,
        removals: u64,
        group: u32,
    ) -> io::Result<Option<PathBuf>> {
        let dir = under(root, store);
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let name = e.file_name();
            if name.to_str().is_some_and(|n| inputs.contains_key(n)) {
                continue;
            }
            cairn_store::remove_tree(&e.path()).map_err(|e| io::Error::other(e.to_string()))?;
        }
        let views = crate::root::open_private(&self.dir)
            .ok_or_else(|| io::Error::other(format!("'{}' is not the daemon's alone", self.dir.display())))?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("v{n}");
        nix::fcntl::renameat(nix::fcntl::AT_FDCWD, &dir, views.as_fd(), name.as_str()).map_err(io::Error::from)?;
        let view = View { dir: self.dir.join(&name), entries: inputs, removals, group };
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        kept.push(view);
        Ok((kept.len() > KEPT).then(|| kept.remove(0).dir))
    }
}

impl Views {
    /// Removes every kept view (the builder goes).
    pub fn clear(&self) {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner).clear();
        remove(&self.dir);
    }
}

fn remove(dir: &Path) {
    if let Err(e) = cairn_store::remove_tree(dir) {
        tracing::warn!("cannot remove the kept sandbox store directory '{}': {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::create_from;
    use crate::sandbox::{Node, Owner, Skeleton};
    use std::os::unix::fs::MetadataExt;

    /// A store of small files, and a skeleton placing `inputs` of it.
    fn setup() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let store = t.path().join("store");
        fs::create_dir_all(&store).unwrap();
        for n in ["a", "b", "c", "d"] {
            fs::write(store.join(n), n).unwrap();
            fs::set_permissions(store.join(n), std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
        }
        fs::create_dir(store.join("tree")).unwrap();
        (t, store)
    }

    fn skeleton(store: &Path, inputs: &[&str]) -> Skeleton {
        let mut sk = vec![
            Node::Dir { path: "/nix".into(), mode: 0o755, owner: Owner::Daemon },
            Node::Dir { path: "/nix/store".into(), mode: 0o1775, owner: Owner::BuildGroup },
        ];
        for n in inputs {
            sk.push(Node::Input { path: format!("/nix/store/{n}"), source: store.join(n), link: true });
        }
        sk
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    fn wanted<'a>(names: &[&'a str]) -> HashSet<&'a str> {
        names.iter().copied().collect()
    }

    const GID: u32 = 4242;
    const BUILDER: Option<(u32, u32)> = Some((4242, GID));

    #[test]
    fn a_kept_store_directory_loses_what_the_builder_made_and_the_next_root_places_only_what_it_lacks() {
        let (t, store) = setup();
        let views = Views::new(t.path());
        let one = t.path().join("one");
        let placed = create_from(&one, &skeleton(&store, &["a", "b", "tree"]), BUILDER, None, None).unwrap();
        // What a builder leaves: its output, a directory of its own, a symlink out.
        let at = one.join("nix/store");
        fs::write(at.join("out"), "built").unwrap();
        fs::create_dir_all(at.join("junk/deep")).unwrap();
        std::os::unix::fs::symlink("/etc", at.join("escape")).unwrap();
        assert_eq!(views.keep(&one, "/nix/store", placed.inputs, 0, GID).unwrap(), None);
        assert!(!at.exists(), "the store directory went to the view");

        // The next root needs b, c and the tree, not a: it takes the view.
        let view = views.take(&wanted(&["b", "c", "tree"]), 0, GID).expect("a view that saves work");
        let kept_at = view.dir.clone();
        let two = t.path().join("two");
        let placed = create_from(
            &two,
            &skeleton(&store, &["b", "c", "tree"]),
            BUILDER,
            None,
            Some(view.into_kept("/nix/store")),
        )
        .unwrap();
        let at = two.join("nix/store");
        assert_eq!(entries(&at), ["b", "c", "tree"], "exactly the inputs: the builder's entries and 'a' are gone");
        assert!(!kept_at.exists());
        assert_eq!(fs::metadata(at.join("b")).unwrap().ino(), fs::metadata(store.join("b")).unwrap().ino());
        assert_eq!(fs::read(at.join("c")).unwrap(), b"c");
        assert!(fs::metadata(at.join("tree")).unwrap().is_dir(), "a directory's mount point, still one");
        assert_eq!(placed.bound, ["tree".to_owned()].into_iter().collect());
        assert_eq!(placed.inputs.len(), 3);
        assert_eq!(fs::metadata(&at).unwrap().mode() & 0o7777, 0o1775, "the store directory as the skeleton has it");
        assert!(views.take(&wanted(&["b"]), 0, GID).is_none(), "a view is taken once");
    }

    #[test]
    fn a_view_is_dropped_once_contents_left_the_store_and_never_given_to_another_group() {
        let (t, store) = setup();
        let views = Views::new(t.path());
        for (i, removals) in [(0, 7), (1, 7)] {
            let root = t.path().join(format!("r{i}"));
            let placed = create_from(&root, &skeleton(&store, &["a", "b"]), BUILDER, None, None).unwrap();
            views.keep(&root, "/nix/store", placed.inputs, removals, GID).unwrap();
        }
        assert!(views.take(&wanted(&["a", "b"]), 7, GID + 1).is_none(), "another group's builds");
        assert!(views.take(&wanted(&["c", "d"]), 7, GID).is_none(), "nothing in common: nothing saved");
        assert!(views.take(&wanted(&["a", "b"]), 8, GID).is_none(), "a path was removed since: both dropped");
        assert_eq!(entries(&views.dir), Vec::<String>::new(), "and their directories removed");
    }

    #[test]
    fn only_the_latest_views_are_kept_and_the_oldest_is_handed_back_for_removal() {
        let (t, store) = setup();
        let views = Views::new(t.path());
        let mut unkept = Vec::new();
        for i in 0..KEPT + 1 {
            let root = t.path().join(format!("r{i}"));
            let placed = create_from(&root, &skeleton(&store, &["a"]), BUILDER, None, None).unwrap();
            unkept.push(views.keep(&root, "/nix/store", placed.inputs, 0, GID).unwrap());
        }
        assert!(unkept[..KEPT].iter().all(Option::is_none));
        assert_eq!(unkept[KEPT], Some(views.dir.join("v0")), "the oldest");
        views.clear();
        assert!(!views.dir.exists());
    }
}
