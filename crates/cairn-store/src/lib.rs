//! cairn's on-disk store.
//!
//! A [`LocalStore`] owns a physical store directory (the logical store directory placed under a
//! root, as Nix's chroot stores do) and the SQLite reference graph beside it. It adds objects
//! from streams, dumps them as NARs, and exchanges them with Nix as export streams.
//!
//! Every addition follows one protocol, which is what makes a crash at any moment harmless:
//!
//! 1. stream the contents into a private temporary directory inside the store directory
//!    (`.cairn-tmp`, same file system), canonical as they are written, hashing as they pass;
//! 2. compute the store path from the hash, and lock it;
//! 3. if the path is already valid, throw the copy away (concurrent adds of the same contents do
//!    the registration once);
//! 4. otherwise `syncfs` the copy, rename it into place, fsync the store directory, and commit
//!    its row in one SQLite transaction.
//!
//! A path is valid only once its row is committed, and its row is committed only after its
//! contents are durable. What a crash leaves — temporary directories, or a renamed but
//! unregistered path — is removed at the next open or overwritten by the next add of that path.
//!
//! **Architecture invariant:** only this crate writes to the store directory and the database,
//! and only while holding the store lock (`<state>/daemon.lock`), so one process owns a store.

mod access;
mod batch;
mod blobs;
mod ca;
mod drv_hashes;
mod files;
mod fsops;
mod gc;
mod import;
mod locks;
mod memo;
mod optimise;
pub mod peers;
mod reclaim;
pub mod roots;
pub mod tags;
mod transfer;
mod verify;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use cairn_db::{Db, DbError, Graph};
use cairn_nar_fs::WritebackWriter;
use cairn_nix::content_address::FileIngestionMethod;
use cairn_nix::export::ExportError;
use cairn_nix::nar::{Limits, NarError, NarReader, NarWriteError, NarWriter};
use cairn_nix::store_path::{validate_name, StorePathError};
use cairn_nix::{ContentAddress, Hash, HashAlgo, Hasher, StoreDir, StorePath};
use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

pub use access::{Entry, EntryKind};
pub use batch::{Batch, Committed};
pub use cairn_db::{Direction, PathInfo};
pub use files::{ChunkReader, FileMethod};
pub use fsops::{dump, remove_files_not_owned_by, remove_tree, restore, restore_with_buffer, RestoreMode};
pub use gc::{GcOptions, GcReport, GcSettings};
pub use locks::PathLocks;
pub use memo::Memo;
pub use optimise::OptimiseReport;
pub use roots::{ClientId, ClientScope, Root, RootSource, TempRootGuard};
pub use verify::{Problem, VerifyOptions, VerifyReport};

/// When a registration and its contents reach the disk: the contents synced, then the
/// registration committed synchronously (`Now`); or neither waited for (`Later`), the paths
/// marked as registered before their contents were synced until
/// [`LocalStore::flush_registrations`] syncs both, and checked when the store opens if a crash
/// came first ([`LocalStore::open`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flush {
    Now,
    Later,
}

/// A realisation flushes its registrations ([`LocalStore::flush_registrations`]) at least this
/// often, however long it runs: what a crash can make the store rebuild is bounded by it, and
/// so is what the store checks when it opens after one.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a store operation failed.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot {op} '{}': {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Nar(#[from] NarError),
    #[error("writing the NAR of '{}': {source}", path.display())]
    NarWrite {
        path: PathBuf,
        #[source]
        source: NarWriteError,
    },
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    StorePath(#[from] StorePathError),
    #[error("path '{0}' is not valid in this store")]
    NotValid(String),
    #[error("'{}' is not a regular file, directory or symlink", .0.display())]
    UnsupportedFileType(PathBuf),
    #[error("expected {expected} bytes of input, got {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("input continues after the end of the NAR")]
    TrailingData,
    #[error("NAR hash mismatch for '{path}': recorded {expected}, got {actual}")]
    HashMismatch { path: String, expected: String, actual: String },
    #[error("'{name}' does not have the digest that names it: expected {expected}, got {actual}")]
    ContentMismatch { name: String, expected: String, actual: String },
    #[error(
        "content address mismatch for '{path}': its content address is '{ca}', but its contents hash to '{actual}'"
    )]
    ContentAddressMismatch { path: String, ca: String, actual: String },
    #[error("content address '{ca}' of '{path}' is for a regular file, and the path is not one")]
    ContentAddressNotAFile { path: String, ca: String },
    #[error("'{path}': {source}")]
    ContentAddressClaim {
        path: String,
        #[source]
        source: cairn_nix::store_path::ContentAddressClaimError,
    },
    #[error("invalid tag root name '{0}' (no '/', not starting with '.')")]
    BadTagName(String),
    #[error("'{path}' references '{reference}', which is neither valid nor earlier in the stream")]
    MissingReference { path: String, reference: String },
    #[error("'{0}' is not a path inside a store path (no '.', '..' or symlinks on the way)")]
    BadInnerPath(String),
    #[error("'{0}' is not a regular file")]
    NotAFile(String),
    /// A path named `.drv` that is not a derivation, or one whose outputs contradict it.
    #[error("{0}")]
    BadDerivation(String),
    #[error("'{0}' was handed over without read access (open it for reading)")]
    NotReadable(String),
    #[error("'{name}' changed while it was being added: it had {expected} bytes, then {actual}; add it again once it stops changing")]
    FileChanged { name: String, expected: u64, actual: u64 },
    #[error("cannot delete '{path}': {why}")]
    Alive { path: String, why: String },
    #[error("another process holds the store lock '{}' (another cairnd runs on this store, or is stopping: try again once it is gone)", .0.display())]
    Locked(PathBuf),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Where a store lives on disk.
#[derive(Debug, Clone)]
pub struct StoreLayout {
    /// The logical store directory, part of every path's hash.
    pub store_dir: StoreDir,
    /// Where the store directory really is (`<root><store_dir>`).
    pub real_store_dir: PathBuf,
    /// Database, locks and other state (`<root>/var/lib/cairn` by default).
    pub state_dir: PathBuf,
}

impl StoreLayout {
    /// The layout of a store under physical root `root`.
    pub fn under_root(root: &Path, store_dir: StoreDir) -> StoreLayout {
        let rel = |p: &str| root.join(p.trim_start_matches('/'));
        StoreLayout { real_store_dir: rel(store_dir.as_str()), state_dir: rel("var/lib/cairn"), store_dir }
    }

    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("db/db.sqlite")
    }

    fn tmp_root(&self) -> PathBuf {
        self.real_store_dir.join(".cairn-tmp")
    }

    /// Where the collector moves directories before removing them.
    fn trash_dir(&self) -> PathBuf {
        self.real_store_dir.join(".cairn-trash")
    }

    /// `optimise`'s content-keyed hard links.
    fn links_dir(&self) -> PathBuf {
        self.real_store_dir.join(".links")
    }
}

/// A private directory for work in progress (in the store's temporary area): left empty when
/// dropped, kept for the next one ([`SpareDirs`]) or removed.
struct TempDir(PathBuf, Arc<SpareDirs>);

impl Drop for TempDir {
    fn drop(&mut self) {
        // What was committed was renamed out: an empty directory is kept for the next one.
        let empty = fs::read_dir(&self.0).is_ok_and(|mut d| d.next().is_none());
        if empty && self.1.keep(&self.0) {
            return;
        }
        if let Err(e) = remove_tree(&self.0) {
            tracing::warn!("cannot remove temporary directory: {e}");
        }
    }
}

/// Empty temporary directories kept for reuse. Every build's outputs and every substituted
/// batch pass through one; on a file system without a journal, allocating a directory's
/// inode skips over those freed in the last seconds, and making and removing a directory for
/// each build cost more than anything else in registering its outputs (measured with
/// `perf`). Only empty directories are kept, a few: the temporary area is emptied when the
/// store is opened, so none outlives its daemon.
#[derive(Default)]
struct SpareDirs(Mutex<Vec<PathBuf>>);

impl SpareDirs {
    /// At most this many are kept: as many as batches usually run at once.
    const MAX: usize = 8;

    fn take(&self) -> Option<PathBuf> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop()
    }

    /// Keeps `dir` (empty) unless enough are kept already.
    fn keep(&self, dir: &Path) -> bool {
        let mut spare = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if spare.len() >= Self::MAX {
            return false;
        }
        spare.push(dir.to_owned());
        true
    }
}

/// What the store's caches hold in memory ([`LocalStore::memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// SQLite's page cache now, and its limit.
    pub page_cache_bytes: u64,
    pub page_cache_limit: u64,
    /// Paths in the reference graph (0 until the first closure query loads it).
    pub graph_paths: u64,
    /// Slots in the graph's tables: one past the largest row id.
    pub graph_rows: u64,
}

/// The store: contents on disk, metadata in SQLite, an in-memory graph for closure queries.
pub struct LocalStore {
    layout: StoreLayout,
    db: Mutex<Db>,
    /// Loaded on the first graph query, then kept in step with every registration.
    graph: RwLock<Option<Graph>>,
    locks: PathLocks,
    /// Imports run one at a time (see `import.rs`).
    import_lock: Mutex<()>,
    /// Paths operations are working on; its mutex is the collector's deletion lock.
    temp: roots::TempRoots,
    /// Collections run one at a time.
    gc_lock: Mutex<()>,
    /// Serialises writing indirect roots with removing stale ones.
    auto_roots_lock: Mutex<()>,
    root_sources: RwLock<Vec<std::sync::Arc<dyn RootSource>>>,
    gc_settings: GcSettings,
    /// Empties `.cairn-trash`; declared before the store lock so it stops before the lock goes.
    reclaimer: reclaim::Reclaimer,
    tmp_counter: AtomicU64,
    spare_dirs: Arc<SpareDirs>,
    /// How many times contents have left the store directory (see [`LocalStore::removals`]).
    removals: AtomicU64,
    /// When registrations were last flushed.
    flushed: Mutex<std::time::Instant>,
    /// Told the BLAKE3 hashes made while adding (for peers), if a p2p node serves this store.
    offered: std::sync::OnceLock<std::sync::Arc<dyn peers::Offered>>,
    /// Derivations' modulo hashes, for checking new derivations' output paths.
    drv_hashes: drv_hashes::DrvHashes,
    /// `auto-optimise-store`: what is registered is hard-linked with identical files.
    auto_optimise: std::sync::atomic::AtomicBool,
    _lock: Flock<File>,
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl LocalStore {
    /// Opens a store, creating its directories and database as needed, taking the store lock,
    /// and removing what an earlier crash left in the temporary area.
    pub fn open(layout: StoreLayout) -> Result<LocalStore> {
        let mkdir = |p: &Path| {
            fs::create_dir_all(p).map_err(|source| StoreError::Io { op: "create", path: p.to_owned(), source })
        };
        mkdir(&layout.real_store_dir)?;
        mkdir(&layout.state_dir.join("db"))?;
        let lock_path = layout.state_dir.join("daemon.lock");
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StoreError::Io { op: "open", path: lock_path.clone(), source })?;
        let lock =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| StoreError::Locked(lock_path))?;
        let tmp = layout.tmp_root();
        remove_tree(&tmp)?;
        mkdir(&tmp)?;
        // What an earlier run left in the trash is emptied by the reclaimer, in the background.
        mkdir(&layout.trash_dir())?;
        let reclaimer = reclaim::Reclaimer::start(layout.trash_dir());
        let db = Db::open(&layout.db_path())?;
        let store = LocalStore {
            layout,
            db: Mutex::new(db),
            graph: RwLock::new(None),
            locks: PathLocks::default(),
            import_lock: Mutex::new(()),
            temp: Default::default(),
            gc_lock: Mutex::new(()),
            auto_roots_lock: Mutex::new(()),
            root_sources: RwLock::new(Vec::new()),
            gc_settings: GcSettings::default(),
            reclaimer,
            tmp_counter: AtomicU64::new(0),
            spare_dirs: Default::default(),
            removals: AtomicU64::new(0),
            flushed: Mutex::new(std::time::Instant::now()),
            offered: std::sync::OnceLock::new(),
            drv_hashes: Default::default(),
            auto_optimise: Default::default(),
            _lock: lock,
        };
        store.recover_unsynced()?;
        Ok(store)
    }

    /// Hashes what it adds with BLAKE3 too (in the same pass) where peers ask by a hash known
    /// at the add (blobs), and tells `to`. Set once, by the p2p node that serves this store.
    pub fn offer_to(&self, to: std::sync::Arc<dyn peers::Offered>) {
        let _ = self.offered.set(to);
    }

    /// Sets how the collector decides what is live.
    pub fn with_gc_settings(mut self, settings: GcSettings) -> LocalStore {
        self.gc_settings = settings;
        self
    }

    /// Roots `paths` for as long as the guard lives (see `roots.rs`). Root a path before
    /// checking that it is valid, and keep the guard while using it.
    pub fn temp_root(&self, paths: impl IntoIterator<Item = StorePath>) -> TempRootGuard {
        self.temp.add(paths)
    }

    pub fn layout(&self) -> &StoreLayout {
        &self.layout
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.layout.store_dir
    }

    /// Where a store path's contents are on disk.
    pub fn real_path(&self, path: &StorePath) -> PathBuf {
        self.layout.real_store_dir.join(path.base_name())
    }

    fn db(&self) -> MutexGuard<'_, Db> {
        // A panic while the connection was held rolled its transaction back when it unwound;
        // the connection itself is sound, so a poisoned lock is not everyone's failure.
        self.db.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many times contents have left the store directory (a path deleted or collected, the
    /// leftovers of an invalid one removed, a repaired path's old contents set aside), counted
    /// before they go. Whoever keeps links to store files outside the store (the build roots'
    /// views) compares it to know that every path it saw valid still has the contents it saw.
    pub fn removals(&self) -> u64 {
        self.removals.load(Ordering::SeqCst)
    }

    /// Counts a removal, before it happens (see [`LocalStore::removals`]).
    fn count_removal(&self) {
        self.removals.fetch_add(1, Ordering::SeqCst);
    }

    /// What the temporary area holds besides empty directories kept for reuse: what a
    /// finished operation left behind.
    #[cfg(test)]
    fn temp_leftovers(&self) -> usize {
        fs::read_dir(self.layout.tmp_root())
            .map(|d| {
                d.flatten()
                    .map(|e| match fs::read_dir(e.path()) {
                        Ok(inner) => inner.count(),
                        Err(_) => 1,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    fn temp_dir(&self) -> Result<TempDir> {
        if let Some(p) = self.spare_dirs.take() {
            return Ok(TempDir(p, self.spare_dirs.clone()));
        }
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let p = self.layout.tmp_root().join(format!("{}-{n}", std::process::id()));
        fs::create_dir(&p).map_err(|source| StoreError::Io { op: "create", path: p.clone(), source })?;
        Ok(TempDir(p, self.spare_dirs.clone()))
    }

    /// What the store's caches hold in memory now, for `cairn daemon status`: a long-running
    /// daemon's resident memory is judged against them.
    pub fn memory(&self) -> Memory {
        let page_cache_bytes = self.db().page_cache_bytes();
        let graph = self.graph.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (graph_paths, graph_rows) = graph.as_ref().map_or((0, 0), |g| (g.len() as u64, g.id_bound() as u64));
        Memory { page_cache_bytes, page_cache_limit: cairn_db::PAGE_CACHE_LIMIT, graph_paths, graph_rows }
    }

    /// The metadata of a valid path.
    pub fn path_info(&self, path: &StorePath) -> Result<Option<PathInfo>> {
        Ok(self.db().path_info(path)?)
    }

    /// The valid path with this hash part, if any.
    pub fn path_from_hash_part(&self, hash_part: &str) -> Result<Option<StorePath>> {
        Ok(self.db().path_from_hash_part(hash_part)?)
    }

    /// The metadata of a valid path, or [`StoreError::NotValid`].
    pub fn valid_path_info(&self, path: &StorePath) -> Result<PathInfo> {
        self.path_info(path)?.ok_or_else(|| StoreError::NotValid(self.store_dir().display(path)))
    }

    pub fn is_valid(&self, path: &StorePath) -> Result<bool> {
        Ok(self.db().is_valid(path)?)
    }

    /// Adds signatures (`keyname:base64`) to a valid path. They are not checked: a signature
    /// only matters to whoever trusts its key, and each reader checks it against the path's
    /// fingerprint (as Nix's `addSignatures` stores them unchecked).
    pub fn add_signatures(&self, path: &StorePath, sigs: &BTreeSet<String>) -> Result<()> {
        self.valid_path_info(path)?;
        Ok(self.db().add_signatures(path, sigs)?)
    }

    /// Adds to each valid path of `paths` its signatures by `keys` (Nix's `signPathInfo`, for
    /// what was just built). A path that cannot be signed is only logged: it stays valid.
    pub fn sign_paths<'p>(
        &self,
        paths: impl IntoIterator<Item = &'p StorePath>,
        keys: &[cairn_nix::signing::SecretKey],
    ) {
        if keys.is_empty() {
            return;
        }
        for p in paths {
            let Ok(Some(info)) = self.path_info(p) else { continue };
            let signed = info.signatures_by(self.store_dir(), keys).map_err(|e| e.to_string());
            if let Err(e) = signed.and_then(|sigs| self.add_signatures(p, &sigs).map_err(|e| e.to_string())) {
                tracing::warn!(path = %self.store_dir().display(p), "cannot sign a built path: {e}");
            }
        }
    }

    /// The valid derivations that have `path` as an output.
    pub fn valid_derivers(&self, path: &StorePath) -> Result<BTreeSet<StorePath>> {
        Ok(self.db().valid_derivers(path)?)
    }

    /// Valid paths that reference `path`.
    pub fn referrers(&self, path: &StorePath) -> Result<BTreeSet<StorePath>> {
        self.valid_path_info(path)?;
        Ok(self.db().referrers(path)?)
    }

    /// Recorded outputs of a derivation.
    pub fn derivation_outputs(&self, drv: &StorePath) -> Result<std::collections::BTreeMap<String, StorePath>> {
        Ok(self.db().derivation_outputs(drv)?)
    }

    /// Number of valid paths.
    pub fn count(&self) -> Result<u64> {
        Ok(self.db().count()?)
    }

    /// Loads the in-memory reference graph now rather than at the first query that needs it.
    /// The daemon calls this in the background right after it starts listening.
    pub fn preload_graph(&self) -> Result<()> {
        self.with_graph(|_| ())
    }

    fn with_graph<T>(&self, f: impl FnOnce(&Graph) -> T) -> Result<T> {
        {
            let g = self.graph_read();
            if let Some(g) = g.as_ref() {
                return Ok(f(g));
            }
        }
        let mut g = self.graph_write();
        let graph: &Graph = match &mut *g {
            Some(graph) => graph,
            empty => {
                let started = std::time::Instant::now();
                let loaded = self.db().load_graph()?;
                tracing::info!(paths = loaded.len(), elapsed = ?started.elapsed(), "reference graph loaded");
                empty.insert(loaded)
            }
        };
        Ok(f(graph))
    }

    /// Everything reachable from `paths` along references (the closure, dependencies first) or
    /// against them (every path that needs one of `paths`, referrers last).
    pub fn walk(&self, paths: &[StorePath], dir: Direction) -> Result<Vec<StorePath>> {
        self.walk_map(paths, dir, StorePath::clone)
    }

    /// [`walk`](Self::walk), handing each path to `f` in place instead of cloning it (printing a
    /// 100k-path closure straight from the graph saves 100k allocations).
    pub fn walk_map<T>(
        &self,
        paths: &[StorePath],
        dir: Direction,
        mut f: impl FnMut(&StorePath) -> T,
    ) -> Result<Vec<T>> {
        self.with_graph(|g| {
            let start = paths
                .iter()
                .map(|p| g.id(p).ok_or_else(|| StoreError::NotValid(self.store_dir().display(p))))
                .collect::<Result<Vec<u32>>>()?;
            Ok(g.walk(&start, dir).into_iter().map(|i| f(g.path(i).expect("walk yields nodes"))).collect())
        })?
    }

    /// Commits paths whose contents are in place, and updates the graph if it is loaded.
    ///
    /// Every invariant is checked before the transaction commits — content addresses yield
    /// their paths (here), references are valid or in the batch and form no cycle between
    /// distinct paths (`cairn-db`) — so a bad batch is an error for its caller, never a row in
    /// the database. Nothing after the commit can panic.
    fn register(&self, infos: &[PathInfo]) -> Result<()> {
        self.register_as(infos, Flush::Now)
    }

    /// [`register`](Self::register), on disk now or with the next flush (see [`Flush`]).
    fn register_as(&self, infos: &[PathInfo], flush: Flush) -> Result<()> {
        for info in infos {
            ca::check_claim(self.store_dir(), info)?;
        }
        let mut outputs = Vec::new();
        for info in infos {
            if let Some(o) = self.read_drv_outputs(&info.path)? {
                outputs.push(o);
            }
        }
        let ids = match flush {
            Flush::Now => self.db().register_with_outputs(infos, &outputs)?,
            Flush::Later => self.db().register_unsynced(infos, &outputs)?,
        };
        cairn_fault::point("after-commit");
        let mut g = self.graph_write();
        if let Some(graph) = g.as_mut() {
            let batch: std::collections::HashMap<&StorePath, u32> =
                infos.iter().map(|i| &i.path).zip(ids.iter().map(|&id| id as u32)).collect();
            for (info, &id) in infos.iter().zip(&ids) {
                let refs: Option<Vec<u32>> =
                    info.references.iter().map(|r| batch.get(r).copied().or_else(|| graph.id(r))).collect();
                match refs {
                    Some(refs) => graph.insert_path(id as u32, &info.path, refs),
                    None => {
                        // The database checked every reference; the graph disagreeing with it
                        // is a bug. Drop the graph: it is loaded again from the database.
                        tracing::error!(path = %info.path, "a reference is missing from the in-memory graph; reloading it");
                        *g = None;
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Puts on disk every registration made with [`Flush::Later`] and the contents of its
    /// paths: the file system synced, then the marks of those registered before the sync
    /// cleared in a synchronous commit. Call it before telling anyone those paths are
    /// registered.
    pub fn flush_registrations(&self) -> Result<()> {
        let bound = self.db().unsynced_bound()?;
        if let Some(bound) = bound {
            fsops::sync_filesystem(&self.layout.real_store_dir)?;
            cairn_fault::point("flush-after-syncfs");
            self.db().clear_unsynced(bound)?;
        }
        *self.flushed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = std::time::Instant::now();
        Ok(self.db().flush()?)
    }

    /// [`flush_registrations`](Self::flush_registrations), if the last was longer ago than
    /// [`FLUSH_EVERY`].
    pub fn flush_registrations_if_due(&self) -> Result<()> {
        let last = *self.flushed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.elapsed() < FLUSH_EVERY {
            return Ok(());
        }
        self.flush_registrations()
    }

    /// After a crash: the paths registered before their contents were synced (the marks
    /// [`Flush::Later`] left) are checked against their NAR hashes, once whatever the page
    /// cache still holds is synced; those whose contents did not all reach the disk are
    /// forgotten with every path that refers to them, and their contents removed, to be built
    /// or fetched again. Returns how many went.
    fn recover_unsynced(&self) -> Result<usize> {
        let marked = self.db().unsynced()?;
        if marked.is_empty() {
            return Ok(0);
        }
        fsops::sync_filesystem(&self.layout.real_store_dir)?;
        let broken: Vec<StorePath> =
            self.verify_paths(&marked)?.into_iter().filter_map(|problem| problem.path).collect();
        let forgotten = if broken.is_empty() { Vec::new() } else { self.db().forget_with_referrers(&broken)? };
        for p in &forgotten {
            self.count_removal();
            if let Err(e) = remove_tree(&self.real_path(p)) {
                tracing::warn!("cannot remove '{}': {e}", self.store_dir().display(p));
            }
        }
        let bound = self.db().unsynced_bound()?;
        if let Some(bound) = bound {
            self.db().clear_unsynced(bound)?;
        }
        if !forgotten.is_empty() {
            tracing::warn!(
                checked = marked.len(),
                forgotten = forgotten.len(),
                "paths registered just before a crash had lost contents; they (and what refers to them) are no longer valid"
            );
        }
        Ok(forgotten.len())
    }

    /// The in-memory graph, write-locked. A panic while it was held (a bug) leaves the lock
    /// poisoned and the graph perhaps half updated: it is dropped, to be loaded again from the
    /// database, which is the truth — one bug must not fail every later request.
    fn graph_write(&self) -> std::sync::RwLockWriteGuard<'_, Option<Graph>> {
        match self.graph.write() {
            Ok(g) => g,
            Err(poisoned) => {
                self.graph.clear_poison();
                let mut g = poisoned.into_inner();
                *g = None;
                tracing::error!("the in-memory graph was dropped after a panic; it is loaded again from the database");
                g
            }
        }
    }

    /// The in-memory graph, read-locked (see [`Self::graph_write`] for a poisoned lock).
    fn graph_read(&self) -> std::sync::RwLockReadGuard<'_, Option<Graph>> {
        if self.graph.is_poisoned() {
            drop(self.graph_write());
        }
        self.graph.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The output paths a `.drv` path names, read from its contents (in place, not yet
    /// registered). Anything that does not parse as a derivation records nothing.
    /// The outputs a derivation about to be registered declares — refused, as Nix refuses it
    /// (`registerValidPaths`), if a path named `.drv` is not a derivation, or names outputs its
    /// own fields contradict: an output whose environment variable says another path, a fixed
    /// output not at the path its hash gives, an input-addressed output not at the path its
    /// derivation's hash gives ([`drv_hashes`]; its input derivations are valid or in the same
    /// registration, so in place).
    fn read_drv_outputs(
        &self,
        path: &StorePath,
    ) -> Result<Option<(StorePath, std::collections::BTreeMap<String, StorePath>)>> {
        if !path.name().ends_with(".drv") {
            return Ok(None);
        }
        let shown = self.store_dir().display(path);
        // In Nix's words.
        let parse_error = |why: String| StoreError::BadDerivation(format!("error parsing derivation '{shown}': {why}"));
        let bad = |why: String| StoreError::BadDerivation(format!("derivation '{shown}' has {why}"));
        let real = self.real_path(path);
        let bytes = fs::read(&real).map_err(|e| parse_error(e.to_string()))?;
        let drv = cairn_nix::derivation::Derivation::parse(&bytes).map_err(|e| parse_error(e.to_string()))?;
        let name = path.name().trim_end_matches(".drv");
        let fixed = drv.fixed_output().map_err(|e| parse_error(e.to_string()))?;
        let input_addressed =
            fixed.is_none() && drv.outputs.values().any(|o| !o.path.is_empty() && o.hash_algo.is_empty());
        let computed: std::collections::BTreeMap<String, StorePath> = if input_addressed {
            self.input_addressed_outputs(path, &drv, name)?.into_iter().collect()
        } else {
            Default::default()
        };
        let mut outputs = std::collections::BTreeMap::new();
        for (out, o) in &drv.outputs {
            if o.path.is_empty() {
                continue; // content-addressed (floating): known once built
            }
            let declared = self.store_dir().parse(&o.path).map_err(|e| parse_error(e.to_string()))?;
            if let Some((method, hash)) = &fixed {
                let at = self
                    .store_dir()
                    .make_fixed_output_path(name, *method, hash, &BTreeSet::new(), false)
                    .map_err(|e| parse_error(e.to_string()))?;
                // Stricter than Nix 2.8, which ignores the path written for a fixed output and
                // uses the one its hash gives: here the written path is what is used.
                if at != declared {
                    return Err(bad(format!(
                        "incorrect output '{}', should be '{}'",
                        o.path,
                        self.store_dir().display(&at)
                    )));
                }
            }
            if let Some(at) = computed.get(out).filter(|at| **at != declared && o.hash_algo.is_empty()) {
                return Err(bad(format!(
                    "incorrect output '{}', should be '{}'",
                    o.path,
                    self.store_dir().display(at)
                )));
            }
            // As Nix: the variable must be there, and say the output's path.
            if drv.env.get(out) != Some(&o.path) {
                return Err(bad(format!("incorrect environment variable '{out}', should be '{}'", o.path)));
            }
            outputs.insert(out.clone(), declared);
        }
        Ok(Some((path.clone(), outputs)))
    }

    /// Moves a finished copy to its store path, replacing any unregistered leftover there.
    /// Callers hold the path's lock and have checked that it is not valid.
    fn install(&self, from: &Path, path: &StorePath) -> Result<()> {
        let dest = self.real_path(path);
        // Try the rename first: a leftover is rare, and checking for one costs a stat per path.
        // rename(2) replaces a leftover file or empty directory itself, and fails on a
        // non-empty directory or a type mismatch, after which the leftover is removed.
        if fsops::rename_tree(from, &dest).is_ok() {
            return Ok(());
        }
        if fs::symlink_metadata(&dest).is_ok() {
            tracing::warn!(path = %path, "replacing an unregistered leftover");
            remove_tree(&dest)?;
        }
        fsops::rename_tree(from, &dest).map_err(|source| StoreError::Io { op: "move into place", path: dest, source })
    }

    /// Steps 2–4 of the add protocol for one finished copy at `copy`.
    fn finish_add(&self, copy: &Path, info: PathInfo) -> Result<PathInfo> {
        let _root = self.temp.add([info.path.clone()]);
        let _lock = self.locks.lock([info.path.clone()]);
        if let Some(existing) = self.path_info(&info.path)? {
            return Ok(existing);
        }
        let started = std::time::Instant::now();
        cairn_fault::point("contents-written");
        // Sync through the containing directory: the copy itself may be a dangling symlink.
        fsops::sync_filesystem(copy.parent().unwrap_or(copy))?;
        let synced = started.elapsed();
        cairn_fault::point("after-syncfs");
        self.install(copy, &info.path)?;
        fsops::sync_dir(&self.layout.real_store_dir)?;
        cairn_fault::point("after-rename");
        if let Err(e) = self.register(std::slice::from_ref(&info)) {
            // Refused (a derivation that is not one, say): nothing stays behind.
            let _ = remove_tree(&self.real_path(&info.path));
            return Err(e);
        }
        tracing::debug!(path = %info.path, ?synced, total = ?started.elapsed(), "registered");
        drop(_lock);
        self.optimise_registered([info.path.clone()]);
        Ok(info)
    }

    /// Adds the tree serialised by a NAR as a `source` path, as `nix-store --add` does.
    ///
    /// The NAR is hashed on a second thread while this one parses and writes it: on a large
    /// tree, hashing is a third of the work, and the two run in parallel.
    pub fn add_nar(&self, name: &str, input: impl Read) -> Result<PathInfo> {
        self.add_nar_with_references(name, input, &BTreeSet::new())
    }

    /// Restores a NAR at `copy` (canonical), hashing it on a second thread; returns its SHA-256
    /// and size, and with `blake3_size` (the size the NAR should have) its BLAKE3 hash and
    /// outboard for peers, made on the same thread in the same pass (none if the size differs).
    /// Refuses anything after the NAR's end.
    fn receive_nar(input: impl Read, copy: &Path, blake3_size: Option<u64>) -> Result<Received> {
        std::thread::scope(|scope| -> Result<_> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(HASH_QUEUE);
            // Hashed chunks go back to the reader to be filled again: no allocation, and no
            // fresh pages to fault in, per chunk.
            let (spare_tx, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(HASH_QUEUE + 2);
            let hasher = scope.spawn(move || {
                let mut chunks = HashingChunks {
                    rx,
                    spare: spare_tx,
                    sha256: Hasher::new(HashAlgo::Sha256),
                    size: 0,
                    chunk: Vec::new(),
                    at: 0,
                };
                let blake3 = blake3_size.and_then(|size| peers::blake3_outboard(&mut chunks, size).ok());
                // Whatever the outboard did not read (a NAR longer than expected) is hashed too.
                io::copy(&mut chunks, &mut io::sink()).ok();
                let got = chunks.size;
                (chunks.sha256.finish(), got, blake3.filter(|_| Some(got) == blake3_size))
            });
            let mut input = HashOnTheSide { inner: input, tx, spare, pending: Vec::new() };
            let mut nar = NarReader::new(&mut input, Limits::default())?;
            restore(&mut nar, copy, RestoreMode::Canonical)?;
            drop(nar);
            if input.read(&mut [0u8; 1]).map_err(|e| StoreError::Nar(cairn_nix::nar::NarError::Io(e)))? != 0 {
                return Err(StoreError::TrailingData);
            }
            input.flush_pending();
            drop(input);
            Ok(hasher.join().expect("hasher thread panicked"))
        })
    }

    /// Adds a regular file of `size` bytes as a flat SHA-256 fixed-output path, as
    /// `nix-store --add-fixed sha256` does (which keeps the file's executable bit).
    pub fn add_flat(&self, name: &str, input: impl Read, size: u64, executable: bool) -> Result<PathInfo> {
        validate_name(name)?;
        let tmp = self.temp_dir()?;
        let copy = tmp.0.join("x");
        let mut file = CopyToFile::new(&copy, executable)?;
        let c = files::copy_hashing(input, size, executable, Some(HashAlgo::Sha256), false, &mut file, &copy)?;
        file.finish()?;
        let hash = c.flat.ok_or_else(|| StoreError::NotAFile(name.to_owned()))?;
        let info = flat_info(self.flat_path(name, &hash)?, hash, c.nar, nar_size_of_file(size, executable));
        self.finish_add(&copy, info)
    }

    /// Adds a text file with references, as `builtins.toFile` does. Every reference must be
    /// valid; a text path cannot refer to itself.
    pub fn add_text(&self, name: &str, contents: &[u8], references: &BTreeSet<StorePath>) -> Result<PathInfo> {
        validate_name(name)?;
        let mut _roots = self.temp.add(references.iter().cloned());
        for r in references {
            if !self.is_valid(r)? {
                return Err(StoreError::NotValid(self.store_dir().display(r)));
            }
        }
        let hash = Hash::digest(HashAlgo::Sha256, contents);
        let path = self.store_dir().make_text_path(name, &hash, references)?;
        _roots.extend([path.clone()]);
        if let Some(info) = self.path_info(&path)? {
            return Ok(info);
        }
        let tmp = self.temp_dir()?;
        let copy = tmp.0.join("x");
        fsops::write_canonical_file(&copy, contents, false)?;
        let mut nar = NarWriter::new(Hasher::new(HashAlgo::Sha256)).map_err(|source| StoreError::Io {
            op: "hash",
            path: copy.clone(),
            source,
        })?;
        nar.regular(None, false, contents.len() as u64, &mut &contents[..])
            .map_err(|source| StoreError::NarWrite { path: copy.clone(), source })?;
        let nar_hash = nar.finish().map_err(|source| StoreError::NarWrite { path: copy.clone(), source })?.finish();
        let nar_size = nar_size_of_file(contents.len() as u64, false);
        let info = content_addressed(path, nar_hash, nar_size, references.clone(), ContentAddress::Text(hash));
        self.finish_add(&copy, info)
    }

    /// Writes the NAR of a valid path.
    pub fn dump_path(&self, path: &StorePath, out: impl io::Write) -> Result<()> {
        let _root = self.temp.add([path.clone()]);
        self.valid_path_info(path)?;
        dump(&self.real_path(path), out)
    }
}

/// The metadata of a path this store computed from its contents. Not `ultimate`: that marks
/// what was built here, and Nix leaves it unset on what it adds.
fn content_addressed(
    path: StorePath,
    nar_hash: Hash,
    nar_size: u64,
    references: BTreeSet<StorePath>,
    ca: ContentAddress,
) -> PathInfo {
    PathInfo {
        path,
        nar_hash,
        nar_size,
        references,
        deriver: None,
        registration_time: now(),
        ultimate: false,
        signatures: BTreeSet::new(),
        ca: Some(ca),
    }
}

/// The metadata of a `source` path (a tree added by its NAR's SHA-256, as `nix-store --add` does)
/// with `references`.
fn source_info(
    dir: &cairn_nix::StoreDir,
    name: &str,
    nar_hash: Hash,
    nar_size: u64,
    references: &BTreeSet<StorePath>,
) -> Result<PathInfo> {
    let path = dir.make_fixed_output_path(name, FileIngestionMethod::Recursive, &nar_hash, references, false)?;
    let ca = ContentAddress::Fixed { method: FileIngestionMethod::Recursive, hash: nar_hash.clone() };
    Ok(content_addressed(path, nar_hash, nar_size, references.clone(), ca))
}

/// The metadata of a flat fixed-output path (a lone file added by its bytes' hash, as
/// `nix-store --add-fixed` does).
fn flat_info(path: StorePath, hash: Hash, nar_hash: Hash, nar_size: u64) -> PathInfo {
    let ca = ContentAddress::Fixed { method: FileIngestionMethod::Flat, hash };
    content_addressed(path, nar_hash, nar_size, BTreeSet::new(), ca)
}

/// Size of the NAR of a lone regular file of `size` bytes.
fn nar_size_of_file(size: u64, executable: bool) -> u64 {
    // magic(8+16) "("(8+8) "type"(8+8) "regular"(8+8) ["executable"(8+16) ""(8)] "contents"(8+8)
    // size(8) data+pad ")"(8+8)
    24 + 16 + 16 + 16 + if executable { 32 } else { 0 } + 16 + 8 + size.div_ceil(8) * 8 + 16
}

/// What [`LocalStore::receive_nar`] hashed: SHA-256, size and (if asked) BLAKE3 and outboard.
type Received = (Hash, u64, Option<([u8; 32], Vec<u8>)>);

/// The hashing thread's chunks as a reader that hashes them with SHA-256 as they are taken and
/// hands them back to be filled again.
struct HashingChunks {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    spare: std::sync::mpsc::SyncSender<Vec<u8>>,
    sha256: Hasher,
    size: u64,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for HashingChunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            let Ok(next) = self.rx.recv() else { return Ok(0) };
            let mut done = std::mem::replace(&mut self.chunk, next);
            done.clear();
            let _ = self.spare.try_send(done);
            self.sha256.update(&self.chunk);
            self.size += self.chunk.len() as u64;
            self.at = 0;
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A reader that sends copies of what passes through it to a hashing thread, in chunks of at
/// least [`HASH_CHUNK`] bytes (NAR tags are read eight bytes at a time).
struct HashOnTheSide<R> {
    inner: R,
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    /// Chunks the hasher is done with.
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    pending: Vec<u8>,
}

const HASH_CHUNK: usize = 256 * 1024;
/// Chunks on their way to the hasher.
const HASH_QUEUE: usize = 16;

impl<R> HashOnTheSide<R> {
    fn flush_pending(&mut self) {
        if !self.pending.is_empty() {
            // The receiver lives until this reader is dropped; a send cannot fail before.
            let _ = self.tx.send(std::mem::take(&mut self.pending));
        }
    }
}

impl<R: Read> Read for HashOnTheSide<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.pending.capacity() == 0 {
            self.pending = self.spare.try_recv().unwrap_or_else(|_| Vec::with_capacity(HASH_CHUNK));
        }
        self.pending.extend_from_slice(&buf[..n]);
        if self.pending.len() >= HASH_CHUNK {
            self.flush_pending();
        }
        Ok(n)
    }
}

/// A new canonical file being written (with its writeback started as it grows).
struct CopyToFile {
    path: PathBuf,
    file: WritebackWriter<File>,
    mode: u32,
}

impl CopyToFile {
    fn new(path: &Path, executable: bool) -> Result<CopyToFile> {
        let mode = if executable { 0o555 } else { 0o444 };
        use std::os::unix::fs::OpenOptionsExt;
        let file = File::options()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|source| StoreError::Io { op: "create", path: path.to_owned(), source })?;
        Ok(CopyToFile { path: path.to_owned(), file: WritebackWriter::new(file), mode })
    }

    /// Sets the canonical mode and times and starts the writeback of what is left.
    fn finish(self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let file = self.file.file();
        fsops::start_writeback(file);
        let t = std::time::SystemTime::UNIX_EPOCH + fsops::CANONICAL_MTIME;
        file.set_permissions(fs::Permissions::from_mode(self.mode))
            .and_then(|_| file.set_times(fs::FileTimes::new().set_accessed(t).set_modified(t)))
            .map_err(|source| StoreError::Io { op: "finish", path: self.path, source })
    }
}

impl io::Write for CopyToFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod gc_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_support {
    /// A store in a temporary directory (store directory `/store`).
    pub fn open_temp_store() -> (tempfile::TempDir, crate::LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let layout = crate::StoreLayout::under_root(dir.path(), cairn_nix::StoreDir::new("/store").unwrap());
        (dir, crate::LocalStore::open(layout).unwrap())
    }

    /// The NAR of a small tree: an executable script and a text file.
    pub fn sample_nar() -> Vec<u8> {
        use cairn_nix::strategies::Tree;
        Tree::Directory(
            [
                (b"run".to_vec(), Tree::File { executable: true, contents: b"#!/bin/sh\n".to_vec() }),
                (b"readme".to_vec(), Tree::File { executable: false, contents: b"hello\n".to_vec() }),
            ]
            .into(),
        )
        .to_nar()
    }
}
