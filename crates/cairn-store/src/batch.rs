//! Batches: many paths placed in parallel, made durable by one `syncfs` and registered by one
//! transaction.
//!
//! Substitution fetches a closure of often thousands of small paths. Adding them one by one would
//! cost a `syncfs`, a directory fsync and a SQLite commit per path — more than the transfer
//! itself. A [`Batch`] restores each NAR (from any number of threads at once) into its own
//! temporary directory, checking its NAR hash and size and whatever else the caller checks (a
//! binary cache's file hash) before accepting it. [`Batch::commit`] then locks every accepted
//! path in one call (sorted, so two batches cannot deadlock), renames them into place, syncs
//! the file system once and registers them in one transaction.
//!
//! A batch registers only paths whose closure is complete: a path whose reference neither is
//! valid nor is in the batch (its download failed, say) is left out, and so is everything that
//! needs it. Nothing of a path that failed a check is ever renamed into place. Dropping a batch
//! without committing removes everything it restored.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use cairn_nix::{HashAlgo, StorePath};

use crate::{fsops, now, remove_tree, LocalStore, PathInfo, Result, StoreError, TempDir, TempRootGuard};

/// Paths being added together; see the module documentation.
pub struct Batch {
    store: Arc<LocalStore>,
    dir: TempDir,
    state: Mutex<State>,
    /// Replace the contents of valid paths instead of adding new ones (`verify --repair`).
    repair: bool,
    /// The paths were built here: registered as `ultimate`, as Nix marks what it built.
    built: bool,
}

struct State {
    /// Temporary roots on every path and reference of the batch, so that a collection cannot
    /// take a reference between the closure check and the registration.
    roots: TempRootGuard,
    accepted: BTreeMap<StorePath, (PathInfo, PathBuf)>,
}

/// What [`Batch::commit`] did.
#[derive(Debug, Default)]
pub struct Committed {
    /// Newly registered paths, references first.
    pub added: Vec<PathInfo>,
    /// Paths left out because something of their closure is missing: (path, missing reference).
    pub incomplete: Vec<(StorePath, StorePath)>,
}

impl LocalStore {
    /// Starts a batch of adds (see `batch.rs`).
    pub fn batch(self: &Arc<Self>) -> Result<Batch> {
        Ok(Batch {
            store: self.clone(),
            dir: self.temp_dir()?,
            state: Mutex::new(State { roots: self.temp.add([]), accepted: BTreeMap::new() }),
            repair: false,
            built: false,
        })
    }

    /// Starts a batch of a build's outputs, registered as built by this store (`ultimate`).
    pub fn build_batch(self: &Arc<Self>) -> Result<Batch> {
        Ok(Batch { built: true, ..self.batch()? })
    }

    /// Starts a batch that repairs valid paths: each NAR must have the NAR hash registered for
    /// its path, and the commit swaps it in for the broken contents (moved to the trash) without
    /// touching the database.
    pub fn repair_batch(self: &Arc<Self>) -> Result<Batch> {
        Ok(Batch { repair: true, ..self.batch()? })
    }
}

impl Batch {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Restores a NAR whose metadata someone vouches for (a substituter's narinfo, checked by
    /// the caller). The NAR must hash to `info.nar_hash` and be `info.nar_size` bytes, and its
    /// contents to `info.ca` if it has a content address (which must yield the path); `check`
    /// then gets the input back (to finish reading it and check what the caller hashes on the
    /// way, such as a compressed file's hash). Returns false if the path is valid already, in
    /// which case the input is not read. Safe to call from many threads at once.
    pub fn add_nar_with_info<R: Read, E: From<StoreError>>(
        &self,
        info: PathInfo,
        mut input: R,
        check: impl FnOnce(R) -> std::result::Result<(), E>,
    ) -> std::result::Result<bool, E> {
        self.state().roots.extend(info.references.iter().cloned().chain([info.path.clone()]));
        // A content address that cannot yield the path is refused before a byte is read.
        crate::ca::check_claim(self.store.store_dir(), &info)?;
        if self.repair {
            let registered = self.store.valid_path_info(&info.path)?;
            if registered.nar_hash != info.nar_hash {
                return Err(StoreError::HashMismatch {
                    path: self.store.store_dir().display(&info.path),
                    expected: registered.nar_hash.to_string(),
                    actual: info.nar_hash.to_string(),
                }
                .into());
            }
        } else if self.store.is_valid(&info.path)? {
            return Ok(false);
        }
        let n = self.store.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let copy = self.dir.0.join(n.to_string());
        // Large NARs are hashed for peers in the same pass (small ones when a peer asks).
        let offered = self.store.offered.get().filter(|_| info.nar_hash.algo() == HashAlgo::Sha256);
        let mut blake3 = None;
        let received = if info.nar_size <= SMALL_NAR {
            receive_small(&mut input, info.nar_size, &copy)
        } else {
            LocalStore::receive_nar(&mut input, &copy, offered.map(|_| info.nar_size)).map(|(h, size, b3)| {
                blake3 = b3;
                (h, size)
            })
        };
        let received = received.and_then(|(nar_hash, nar_size)| {
            if nar_hash != info.nar_hash {
                return Err(StoreError::HashMismatch {
                    path: self.store.store_dir().display(&info.path),
                    expected: info.nar_hash.to_string(),
                    actual: nar_hash.to_string(),
                });
            }
            if nar_size != info.nar_size {
                return Err(StoreError::SizeMismatch { expected: info.nar_size, actual: nar_size });
            }
            // Whoever wrote the NAR hash also wrote the content address: the contents must
            // prove it (see `ca.rs`).
            crate::ca::check_contents(self.store.store_dir(), &info, &copy)
        });
        let outcome = received.map_err(E::from).and_then(|()| check(input));
        if let Err(e) = outcome {
            let _ = remove_tree(&copy);
            return Err(e);
        }
        if let (Some(to), Some((b3, outboard))) = (offered, blake3) {
            let wanted = crate::peers::Wanted::Nar {
                path: info.path.clone(),
                nar_hash: info.nar_hash.clone(),
                nar_size: info.nar_size,
            };
            to.hashed(wanted, b3, outboard);
        }
        // A registration time given with the path (a copy from another store) is kept, as Nix
        // keeps it; none (0) is now.
        let registration_time = if info.registration_time > 0 { info.registration_time } else { now() };
        let info = PathInfo { registration_time, ultimate: self.built, ..info };
        if let Some((_, old)) = self.state().accepted.insert(info.path.clone(), (info, copy)) {
            let _ = remove_tree(&old); // the same path twice: the later copy wins
        }
        Ok(true)
    }

    /// Places and registers every accepted path whose closure is complete (see the module
    /// documentation).
    pub fn commit(self) -> Result<Committed> {
        self.commit_as(crate::Flush::Now)
    }

    /// [`commit`](Self::commit), without waiting for the disk: neither the contents nor the
    /// registration are synced; the paths are marked as registered before their contents were
    /// (see `cairn_db::Db::register_unsynced`) until [`LocalStore::flush_registrations`],
    /// which the caller makes before telling anyone of these paths. A crash before it may lose
    /// them — a store opened after one checks every marked path and forgets those it lost, with
    /// whatever refers to them — but never leaves a valid path without its contents. A chain
    /// of builds then waits for no flush a build, only for one at its end (and one a
    /// [`crate::FLUSH_EVERY`] on the way).
    pub fn commit_unflushed(self) -> Result<Committed> {
        self.commit_as(crate::Flush::Later)
    }

    fn commit_as(self, flush: crate::Flush) -> Result<Committed> {
        let mut state = self.state.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        let store = &*self.store;
        let mut out = Committed::default();
        if state.accepted.is_empty() {
            return Ok(out);
        }
        let started = std::time::Instant::now();
        let locks = store.locks.lock(state.accepted.keys().cloned());
        if self.repair {
            let added = swap_in(store, std::mem::take(&mut state.accepted))?;
            return Ok(Committed { added, incomplete: Vec::new() });
        }
        // Someone may have registered some of them meanwhile.
        let mut pending: BTreeMap<StorePath, (PathInfo, PathBuf)> = BTreeMap::new();
        for (p, v) in std::mem::take(&mut state.accepted) {
            if !store.is_valid(&p)? {
                pending.insert(p, v);
            }
        }
        // Leave out what misses a reference, until nothing changes.
        loop {
            let mut missing: Vec<(StorePath, StorePath)> = Vec::new();
            for (p, (info, _)) in &pending {
                for r in info.references.iter().filter(|r| *r != p) {
                    if !pending.contains_key(r) && !store.is_valid(r)? {
                        missing.push((p.clone(), r.clone()));
                        break;
                    }
                }
            }
            if missing.is_empty() {
                break;
            }
            for (p, r) in missing {
                pending.remove(&p);
                out.incomplete.push((p, r));
            }
        }
        let order = cairn_nix::references_first(pending.keys(), |p| pending.get(p).map(|(i, _)| &i.references));
        let checked = started.elapsed();
        let mut placed: Vec<PathBuf> = Vec::new();
        let result = (|| -> Result<()> {
            cairn_fault::point("contents-written");
            for p in &order {
                let (_, copy) = &pending[p];
                store.install(copy, p)?;
                placed.push(store.real_path(p));
            }
            let renamed = started.elapsed();
            cairn_fault::point("after-rename");
            if flush == crate::Flush::Now {
                fsops::sync_filesystem(&store.layout.real_store_dir)?;
            }
            let synced = started.elapsed();
            cairn_fault::point("after-syncfs");
            let infos: Vec<PathInfo> = order.iter().map(|p| pending[p].0.clone()).collect();
            store.register_as(&infos, flush)?;
            tracing::debug!(
                paths = infos.len(),
                checked = ?checked,
                renamed = ?(renamed - checked),
                synced = ?(synced - renamed),
                registered = ?(started.elapsed() - synced),
                "batch commit phases"
            );
            out.added = infos;
            Ok(())
        })();
        if let Err(e) = result {
            for dest in &placed {
                if let Err(e) = remove_tree(dest) {
                    tracing::warn!("cannot remove an unregistered substitute: {e}");
                }
            }
            return Err(e);
        }
        drop(locks);
        store.optimise_registered(out.added.iter().map(|i| i.path.clone()));
        drop(state.roots);
        Ok(out)
    }
}

/// Repair: replaces the contents of still-valid paths (locked by the caller) with the checked
/// copies; the broken contents go to the trash, which the reclaimer empties.
fn swap_in(store: &LocalStore, accepted: BTreeMap<StorePath, (PathInfo, PathBuf)>) -> Result<Vec<PathInfo>> {
    {
        let trash = store.layout.trash_dir();
        let mut repaired = Vec::new();
        for (p, (info, copy)) in accepted {
            if !store.is_valid(&p)? {
                continue; // collected meanwhile: nothing to repair
            }
            let real = store.real_path(&p);
            if std::fs::symlink_metadata(&real).is_ok() {
                store.count_removal();
                let n = store.tmp_counter.fetch_add(1, Ordering::Relaxed);
                let aside = trash.join(format!("repair-{}-{n}", std::process::id()));
                fsops::rename_tree(&real, &aside).map_err(|source| StoreError::Io {
                    op: "move aside",
                    path: real.clone(),
                    source,
                })?;
            }
            fsops::rename_tree(&copy, &real).map_err(|source| StoreError::Io {
                op: "move into place",
                path: real,
                source,
            })?;
            store.reclaimer.added(info.nar_size);
            repaired.push(info);
        }
        fsops::sync_filesystem(&store.layout.real_store_dir)?;
        Ok(repaired)
    }
}

/// NARs up to this size are read into memory, hashed and restored on the calling thread: for
/// the many small paths of a closure, a hashing thread per path costs more than it saves.
const SMALL_NAR: u64 = 256 * 1024;

/// [`LocalStore::receive_nar`] for a NAR said to be `expected` bytes (at most [`SMALL_NAR`]):
/// reads at most one byte more, so a longer input fails the size check.
fn receive_small(input: &mut impl Read, expected: u64, copy: &std::path::Path) -> Result<(cairn_nix::Hash, u64)> {
    let mut bytes = Vec::with_capacity(expected as usize + 1);
    input.take(expected + 1).read_to_end(&mut bytes).map_err(|e| StoreError::Nar(cairn_nix::nar::NarError::Io(e)))?;
    let hash = cairn_nix::Hash::digest(cairn_nix::HashAlgo::Sha256, &bytes);
    let mut cursor = std::io::Cursor::new(&bytes[..]);
    let mut nar = cairn_nix::nar::NarReader::new(&mut cursor, cairn_nix::nar::Limits::default())?;
    crate::restore_with_buffer(&mut nar, copy, crate::RestoreMode::Canonical, &mut [0u8; 64 * 1024])?;
    drop(nar);
    if cursor.position() != bytes.len() as u64 {
        return Err(StoreError::TrailingData);
    }
    Ok((hash, bytes.len() as u64))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use cairn_nix::strategies::Tree;
    use cairn_nix::{Hash, HashAlgo, StoreDir, StorePath};

    use crate::{LocalStore, PathInfo, StoreError, StoreLayout};

    fn store(root: &std::path::Path) -> Arc<LocalStore> {
        Arc::new(LocalStore::open(StoreLayout::under_root(root, StoreDir::new("/nix/store").unwrap())).unwrap())
    }

    /// A NAR of a file, and metadata for an input-addressed path named `name` holding it.
    fn item(name: &str, refs: &[&StorePath]) -> (PathInfo, Vec<u8>) {
        let nar = Tree::File { executable: false, contents: format!("contents of {name}").into_bytes() }.to_nar();
        let path = StoreDir::new("/nix/store")
            .unwrap()
            .make_store_path("output:out", &Hash::digest(HashAlgo::Sha256, name.as_bytes()), name)
            .unwrap();
        let info = PathInfo {
            path,
            nar_hash: Hash::digest(HashAlgo::Sha256, &nar),
            nar_size: nar.len() as u64,
            references: refs.iter().map(|r| (*r).clone()).collect::<BTreeSet<_>>(),
            deriver: None,
            registration_time: 0,
            ultimate: false,
            signatures: BTreeSet::new(),
            ca: None,
        };
        (info, nar)
    }

    fn ok(_: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }

    fn entries(store: &LocalStore) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&store.layout.real_store_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".cairn-"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn commits_what_is_complete_in_any_order_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let st = store(root.path());
        let (a, nar_a) = item("a", &[]);
        let (b, nar_b) = item("b", &[&a.path]);
        let (c, _) = item("c", &[]);
        let (d, nar_d) = item("d", &[&c.path]);
        let batch = st.batch().unwrap();
        // Referrer before reference, from two threads; c never arrives, so d cannot be added.
        std::thread::scope(|s| {
            s.spawn(|| assert!(batch.add_nar_with_info(b.clone(), &nar_b[..], ok).unwrap()));
            s.spawn(|| assert!(batch.add_nar_with_info(a.clone(), &nar_a[..], ok).unwrap()));
        });
        assert!(batch.add_nar_with_info(d.clone(), &nar_d[..], ok).unwrap());
        assert!(entries(&st).is_empty(), "nothing is in place before the commit");
        let done = batch.commit().unwrap();
        assert_eq!(done.added.iter().map(|i| &i.path).collect::<Vec<_>>(), vec![&a.path, &b.path]);
        assert_eq!(done.incomplete, vec![(d.path.clone(), c.path.clone())]);
        assert!(st.is_valid(&a.path).unwrap() && st.is_valid(&b.path).unwrap());
        assert!(!st.is_valid(&d.path).unwrap());
        assert_eq!(entries(&st).len(), 2, "only the committed paths are in the store");
        assert_eq!(st.temp_leftovers(), 0);
    }

    /// Adds `items` in one batch committed without waiting for the disk.
    fn add_unflushed(st: &Arc<LocalStore>, items: &[&(PathInfo, Vec<u8>)]) {
        let batch = st.build_batch().unwrap();
        for (info, nar) in items {
            assert!(batch.add_nar_with_info(info.clone(), &nar[..], ok).unwrap());
        }
        assert_eq!(batch.commit_unflushed().unwrap().added.len(), items.len());
    }

    #[test]
    fn paths_registered_before_a_crash_that_lost_their_contents_are_forgotten_with_their_referrers() {
        let root = tempfile::tempdir().unwrap();
        let st = store(root.path());
        let a = item("a", &[]);
        let b = item("b", &[&a.0.path]);
        let c = item("c", &[&b.0.path]);
        let d = item("d", &[]);
        add_unflushed(&st, &[&a]);
        add_unflushed(&st, &[&b]);
        add_unflushed(&st, &[&c]);
        add_unflushed(&st, &[&d]);
        assert!([&a, &b, &c, &d].iter().all(|p| st.is_valid(&p.0.path).unwrap()), "valid at once");
        // The crash: b's contents never reached the disk (the others did).
        let real_b = st.real_path(&b.0.path);
        std::fs::set_permissions(&real_b, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        std::fs::write(&real_b, "half").unwrap();
        drop(st);
        let st = store(root.path());
        assert!(st.is_valid(&a.0.path).unwrap() && st.is_valid(&d.0.path).unwrap(), "intact: kept");
        assert!(!st.is_valid(&b.0.path).unwrap(), "lost contents: forgotten");
        assert!(!st.is_valid(&c.0.path).unwrap(), "and what refers to it");
        assert!(!real_b.exists() && !st.real_path(&c.0.path).exists(), "their contents removed");
        assert!(st.verify(Default::default()).unwrap().problems.is_empty());
        // Checked once: the marks are gone.
        drop(st);
        let st = store(root.path());
        assert!(st.is_valid(&a.0.path).unwrap() && st.db().unsynced().unwrap().is_empty());
    }

    #[test]
    fn a_flush_syncs_and_unmarks_what_was_registered_before_it() {
        let root = tempfile::tempdir().unwrap();
        let st = store(root.path());
        let (a, b) = (item("a", &[]), item("b", &[]));
        add_unflushed(&st, &[&a]);
        assert_eq!(st.db().unsynced().unwrap(), std::slice::from_ref(&a.0.path));
        st.flush_registrations().unwrap();
        assert!(st.db().unsynced().unwrap().is_empty());
        add_unflushed(&st, &[&b]);
        // Within FLUSH_EVERY of the last flush: nothing to do yet.
        st.flush_registrations_if_due().unwrap();
        assert_eq!(st.db().unsynced().unwrap(), std::slice::from_ref(&b.0.path));
        // A committed, synchronous add is never marked.
        let (e, nar_e) = item("e", &[]);
        let batch = st.batch().unwrap();
        batch.add_nar_with_info(e.clone(), &nar_e[..], ok).unwrap();
        batch.commit().unwrap();
        assert_eq!(st.db().unsynced().unwrap(), std::slice::from_ref(&b.0.path));
    }

    #[test]
    fn a_failed_check_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let st = store(root.path());
        let (a, nar_a) = item("a", &[]);
        let batch = st.batch().unwrap();
        let mut wrong = a.clone();
        wrong.nar_hash = Hash::digest(HashAlgo::Sha256, b"other");
        let e = batch.add_nar_with_info(wrong, &nar_a[..], ok).unwrap_err();
        assert!(matches!(e, StoreError::HashMismatch { .. }), "{e}");
        let e = batch
            .add_nar_with_info(a.clone(), &nar_a[..], |_| Err(StoreError::NotAFile("the caller's check".into())))
            .unwrap_err();
        assert!(e.to_string().contains("the caller's check"), "{e}");
        let mut short = a.clone();
        short.nar_size -= 1;
        assert!(batch.add_nar_with_info(short, &nar_a[..], ok).is_err());
        let done = batch.commit().unwrap();
        assert!(done.added.is_empty());
        assert!(entries(&st).is_empty());
        assert_eq!(st.temp_leftovers(), 0);
    }

    #[test]
    fn dropping_a_batch_removes_what_it_restored() {
        let root = tempfile::tempdir().unwrap();
        let st = store(root.path());
        let (a, nar_a) = item("a", &[]);
        let batch = st.batch().unwrap();
        batch.add_nar_with_info(a.clone(), &nar_a[..], ok).unwrap();
        drop(batch);
        assert!(!st.is_valid(&a.path).unwrap());
        assert!(entries(&st).is_empty());
        assert_eq!(st.temp_leftovers(), 0);
    }
}
