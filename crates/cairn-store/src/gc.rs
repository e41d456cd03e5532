//! Garbage collection: mark from the roots, sweep referrers first.
//!
//! **Mark.** The roots (see `roots.rs`) are read, then the in-memory graph is walked from them
//! along references — plus, with `keep-derivations`, from an output to the derivation that
//! built it, and with `keep-outputs`, from a derivation to its outputs, as Nix does. No SQL runs
//! per path: 100k paths mark in milliseconds.
//!
//! **Sweep.** Dead paths are taken referrers first, in batches. For each batch, under the
//! temporary-roots mutex (the deletion lock) and the graph's write lock, a path is dropped from
//! the batch if it is temporarily rooted now or has gained a referrer since the mark (a path
//! registered meanwhile); the rest leave the graph and are invalidated in one SQLite
//! transaction. Only then are their contents removed — directories renamed into `.cairn-trash`
//! first, so that nobody ever sees half of one at its store path. A crash at any moment leaves
//! valid paths whose contents and references are all there, plus at worst unregistered
//! contents, which the next collection removes, and a trash directory, emptied at start-up.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_db::{Direction, GcMetadata, Graph};
use cairn_nix::StorePath;

use crate::roots::{auto_root_name, LinkRoots, Root, RootSource, RuntimeRoots};
use crate::{LocalStore, Result, StoreError};

/// Paths invalidated per transaction.
const BATCH: usize = 4096;

/// How the collector decides what is live (Nix's settings of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcSettings {
    /// Keep the derivation that built a live path.
    pub keep_derivations: bool,
    /// Keep the outputs of a live derivation.
    pub keep_outputs: bool,
    /// Treat store paths used by running processes as roots.
    pub runtime_roots: bool,
}

impl Default for GcSettings {
    fn default() -> Self {
        GcSettings { keep_derivations: true, keep_outputs: false, runtime_roots: true }
    }
}

/// What to collect.
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Only report what would be deleted.
    pub dry_run: bool,
    /// Stop once more than this many bytes are freed, counted as Nix counts them: the sizes of
    /// the deleted paths' files that have at most two names (a second one being, likely,
    /// `optimise`'s link). In a dry run, NAR sizes.
    pub max_freed: Option<u64>,
}

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Paths deleted (or, in a dry run, that would be), referrers first.
    pub deleted: Vec<StorePath>,
    /// Bytes of files removed (sizes of files with no other hard link, as Nix counts them); in a
    /// dry run, the NAR sizes of the paths.
    pub bytes_freed: u64,
    /// Unregistered entries (left by crashes) removed from the store directory.
    pub unregistered: usize,
    /// The collection stopped because more than `max_freed` bytes were freed (Nix's "deleted
    /// more than N bytes; stopping").
    pub limit_reached: bool,
}

/// The live set of one mark phase.
struct Marked {
    live: Vec<bool>,
    meta: GcMetadata,
}

impl Marked {
    fn is_live(&self, id: u32) -> bool {
        self.live.get(id as usize).copied().unwrap_or(false)
    }
}

impl LocalStore {
    /// The gcroots directory (`<state>/gcroots`); `auto/` in it holds indirect roots.
    pub fn gc_roots_dir(&self) -> PathBuf {
        self.layout.state_dir.join("gcroots")
    }

    /// Registers another kind of root (image tags, running automata …).
    pub fn add_root_source(&self, source: Arc<dyn RootSource>) {
        self.root_sources.write().unwrap_or_else(std::sync::PoisonError::into_inner).push(source);
    }

    /// Another directory of links read as the gcroots directory is (Nix's `gcroots` and
    /// `profiles` of a store Nix kept before): its roots count, and nothing in it is changed
    /// (its stale indirect roots are not this store's to remove).
    pub fn add_link_roots(&self, dir: PathBuf) {
        self.add_root_source(Arc::new(LinkRoots { dir }));
    }

    /// Every root that points at a valid path, sorted by origin.
    pub fn roots(&self) -> Result<Vec<Root>> {
        let mut roots = self.read_roots()?;
        self.with_graph(|g| roots.retain(|r| g.id(&r.path).is_some()))?;
        roots.sort();
        roots.dedup();
        Ok(roots)
    }

    /// Roots from every source, valid or not. Prunes temporary roots of exited clients.
    ///
    /// Temporary roots are read first: a client roots a path temporarily, then links it, then
    /// exits; read in this order, every moment of that sequence shows the path in one of the
    /// two reads.
    fn read_roots(&self) -> Result<Vec<Root>> {
        let mut roots = {
            let mut temp = self.temp.lock();
            temp.prune();
            temp.roots()
        };
        let (links, stale) = LinkRoots { dir: self.gc_roots_dir() }.roots_and_stale(&self.layout)?;
        roots.extend(links);
        self.remove_stale_roots(stale);
        if self.gc_settings.runtime_roots {
            roots.extend(RuntimeRoots.roots(&self.layout)?);
        }
        let sources = self.root_sources.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        for s in sources {
            let found = s.roots(&self.layout)?;
            tracing::debug!(source = s.name(), roots = found.len(), "roots");
            roots.extend(found);
        }
        Ok(roots)
    }

    /// Removes indirect roots whose link is gone. Under the lock `add_indirect_root` writes
    /// under, and only if the link is still gone: a client re-creating the link and registering
    /// it again meanwhile must not lose its fresh registration.
    fn remove_stale_roots(&self, stale: Vec<PathBuf>) {
        if stale.is_empty() {
            return;
        }
        let _auto = self.auto_roots_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for entry in stale {
            let Ok(link) = fs::read_link(&entry) else { continue };
            if fs::symlink_metadata(entry.parent().unwrap_or(Path::new("/")).join(&link)).is_err() {
                tracing::info!(root = %entry.display(), link = %link.display(), "removing stale indirect root");
                let _ = fs::remove_file(&entry);
            }
        }
    }

    /// Registers `link` (an absolute path, which the caller has already made a symlink to
    /// `path`, as Nix's `addPermRoot` does) as an indirect root: `path` stays live while the link
    /// exists. A registration whose link does not exist yet would be removed as stale by a
    /// concurrent collection. The path is rooted before its validity is checked, so a
    /// collection cannot take it in between.
    pub fn add_indirect_root(&self, link: &Path, path: &StorePath) -> Result<()> {
        let _root = self.temp.add([path.clone()]);
        self.valid_path_info(path)?;
        let auto = self.gc_roots_dir().join("auto");
        fs::create_dir_all(&auto).map_err(|source| StoreError::Io { op: "create", path: auto.clone(), source })?;
        let name = auto.join(auto_root_name(link));
        let _auto = self.auto_roots_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = self.tmp_counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = auto.join(format!(".tmp-{}-{n}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(link, &tmp).and_then(|_| fs::rename(&tmp, &name)).map_err(|source| StoreError::Io {
            op: "create root",
            path: name,
            source,
        })
    }

    fn mark(&self, g: &Graph, roots: &[Root]) -> Result<Marked> {
        let meta = self.db().gc_metadata()?;
        // Extra edges: output → deriver (keep-derivations), derivation → outputs (keep-outputs).
        let mut keep: HashMap<u32, Vec<u32>> = HashMap::new();
        if self.gc_settings.keep_derivations {
            for (&out, drv) in &meta.deriver {
                let Some(d) = g.id(drv) else { continue };
                let out_path = g.path(out);
                // Only a deriver that records this path as its output, as Nix checks.
                if meta.outputs.get(&d).is_some_and(|outs| out_path.is_some_and(|o| outs.contains(o))) {
                    keep.entry(out).or_default().push(d);
                }
            }
        }
        if self.gc_settings.keep_outputs {
            for (&d, outs) in &meta.outputs {
                keep.entry(d).or_default().extend(outs.iter().filter_map(|o| g.id(o)));
            }
        }
        let mut live = vec![false; g.id_bound()];
        let mut stack: Vec<u32> = roots.iter().filter_map(|r| g.id(&r.path)).collect();
        while let Some(id) = stack.pop() {
            if std::mem::replace(&mut live[id as usize], true) {
                continue;
            }
            let next = g.neighbours(id, Direction::References).iter().chain(keep.get(&id).into_iter().flatten());
            stack.extend(next.filter(|&&n| !live[n as usize]));
        }
        Ok(Marked { live, meta })
    }

    /// Marks from the current roots; hands the graph, the marking and the dead paths (referrers
    /// first) to `f`.
    fn with_marking<T>(&self, f: impl FnOnce(&Graph, &Marked, Vec<u32>) -> T) -> Result<T> {
        let roots = self.read_roots()?;
        let started = std::time::Instant::now();
        self.with_graph(|g| {
            let marked = self.mark(g, &roots)?;
            let dead: Vec<u32> = g.node_ids().filter(|&id| !marked.is_live(id)).collect();
            // Post-order puts references first; reversed, referrers first. The walk also
            // reaches live paths that dead ones reference: those stay.
            let mut order = g.walk(&dead, Direction::References);
            order.retain(|&id| !marked.is_live(id));
            order.reverse();
            tracing::info!(live = g.len() - order.len(), dead = order.len(), elapsed = ?started.elapsed(), "marked");
            Ok(f(g, &marked, order))
        })?
    }

    /// Live paths, sorted.
    pub fn live_paths(&self) -> Result<Vec<StorePath>> {
        self.with_marking(|g, m, _| {
            let mut v: Vec<StorePath> =
                g.node_ids().filter(|&i| m.is_live(i)).filter_map(|i| g.path(i).cloned()).collect();
            v.sort();
            v
        })
    }

    /// Dead paths, sorted.
    pub fn dead_paths(&self) -> Result<Vec<StorePath>> {
        self.with_marking(|g, _, dead| {
            let mut v: Vec<StorePath> = dead.iter().filter_map(|&i| g.path(i).cloned()).collect();
            v.sort();
            v
        })
    }

    /// Deletes every path no root reaches (or, with `dry_run`, says which), referrers first,
    /// then unregistered leftovers and unused links of `optimise`.
    pub fn collect_garbage(&self, opts: &GcOptions) -> Result<GcReport> {
        let _one = self.gc_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.collect_locked(opts)
    }

    /// Blocks until the space of collected paths is freed (the trash is empty).
    pub fn wait_reclaimed(&self) {
        self.reclaimer.wait_idle();
    }

    /// Marks the start of a collection (see `TempState::released`); the end when dropped.
    fn collecting(&self) -> Collecting<'_> {
        self.temp.lock().set_collecting(true);
        self.reclaimer.set_paused(true);
        Collecting(self)
    }

    fn collect_locked(&self, opts: &GcOptions) -> Result<GcReport> {
        let _collecting = self.collecting();
        let started = std::time::Instant::now();
        let (order, sizes) = self.with_marking(|g, m, dead| {
            let sizes: Vec<u64> = dead.iter().map(|i| m.meta.nar_size.get(i).copied().unwrap_or(0)).collect();
            (dead.into_iter().filter_map(|i| g.path(i).cloned()).collect::<Vec<_>>(), sizes)
        })?;
        if opts.dry_run {
            let mut report = GcReport::default();
            for (p, size) in order.into_iter().zip(sizes) {
                if opts.max_freed.is_some_and(|m| report.bytes_freed > m) {
                    report.limit_reached = true;
                    break;
                }
                report.bytes_freed += size;
                report.deleted.push(p);
            }
            return Ok(report);
        }
        let (mut report, mut moved) = self.sweep(order, opts.max_freed)?;
        if !report.limit_reached {
            report.unregistered = self.remove_unregistered(&mut moved)?;
            report.bytes_freed = moved.bytes;
            report.bytes_freed += self.remove_unused_links(&moved)?;
        }
        tracing::info!(deleted = report.deleted.len(), bytes = report.bytes_freed, elapsed = ?started.elapsed(), "garbage collected");
        Ok(report)
    }

    /// Deletes exactly `paths`, refusing (and deleting nothing) if any is live or referenced by
    /// a path not among them, and saying by what.
    pub fn delete_paths(&self, paths: &[StorePath]) -> Result<GcReport> {
        let _one = self.gc_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _collecting = self.collecting();
        for p in paths {
            self.valid_path_info(p)?;
        }
        let roots = self.read_roots()?;
        let dir = self.store_dir().clone();
        let order = self.with_graph(|g| -> Result<_> {
            let m = self.mark(g, &roots)?;
            let wanted: BTreeSet<u32> = paths.iter().filter_map(|p| g.id(p)).collect();
            for &id in &wanted {
                let p = g.path(id).expect("ids of valid paths");
                if let Some(r) = roots.iter().find(|r| &r.path == p) {
                    return Err(alive(&dir, p, format!("it is a root ({})", r.origin)));
                }
                if let Some(&r) =
                    g.neighbours(id, Direction::Referrers).iter().find(|&&r| r != id && !wanted.contains(&r))
                {
                    let by = dir.display(g.path(r).expect("edges join nodes"));
                    return Err(alive(&dir, p, format!("it is still referenced by '{by}'")));
                }
                if m.is_live(id) {
                    let why = match g
                        .walk(&[id], Direction::Referrers)
                        .iter()
                        .find_map(|&a| roots.iter().find(|r| g.id(&r.path) == Some(a)))
                    {
                        Some(r) => format!("it is reachable from the root {}", r.origin),
                        None => "it is kept by keep-derivations or keep-outputs".to_owned(),
                    };
                    return Err(alive(&dir, p, why));
                }
            }
            let ids: Vec<u32> = wanted.into_iter().collect();
            let mut order = g.walk(&ids, Direction::References);
            order.retain(|i| ids.contains(i));
            order.reverse();
            Ok(order.into_iter().filter_map(|i| g.path(i).cloned()).collect::<Vec<_>>())
        })??;
        let (report, _) = self.sweep(order, None)?;
        if let Some(p) = paths.iter().find(|p| !report.deleted.contains(p)) {
            return Err(alive(&dir, p, "a running operation is using it or a new path references it".into()));
        }
        Ok(report)
    }

    /// Invalidates and removes `order` (referrers first) in batches, skipping paths that became
    /// rooted or referenced since they were found dead. Removal from disk runs on a second
    /// thread while the next batch is invalidated.
    fn sweep(&self, order: Vec<StorePath>, max_freed: Option<u64>) -> Result<(GcReport, Moved)> {
        let mut report = GcReport::default();
        // What the paths taken so far free, as Nix counts it (only with a limit to check).
        let mut freed = 0u64;
        let mut limit_reached = false;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<StorePath>>(4);
        let moved = std::thread::scope(|scope| -> Result<Moved> {
            let remover = scope.spawn(move || {
                let mut moved = Moved::default();
                let started = std::time::Instant::now();
                let mut busy = std::time::Duration::ZERO;
                for batch in rx {
                    let t = std::time::Instant::now();
                    let before = moved.bytes;
                    for p in batch {
                        // An add or import of the same path may have come since it was
                        // invalidated: under the path's lock, contents of a path valid again are
                        // the new copy, and the add never finds half of the old one.
                        let _lock = self.locks.lock([p.clone()]);
                        if self.is_registered(&p) {
                            continue;
                        }
                        cairn_fault::point("gc-mid-sweep");
                        if let Err(e) = self.remove_contents(&p, &mut moved) {
                            // Already invalid: what is left is removed by the next collection.
                            tracing::warn!("cannot remove '{}': {e}", p);
                        }
                    }
                    self.reclaimer.added(moved.bytes - before);
                    busy += t.elapsed();
                }
                tracing::debug!(?busy, total = ?started.elapsed(), "contents moved to the trash");
                moved
            });
            let mut i = 0;
            let result = (|| -> Result<()> {
                while i < order.len() && !limit_reached {
                    let end = (i + BATCH).min(order.len());
                    let mut batch = Vec::with_capacity(end - i);
                    // Measured before the deletion lock is taken; a path that is not taken
                    // after all was measured for nothing.
                    let sizes: Vec<u64> = match max_freed {
                        Some(_) => order[i..end].iter().map(|p| freed_by_deleting(&self.real_path(p))).collect(),
                        None => Vec::new(),
                    };
                    self.invalidate_batch(&order[i..end], false, |j, p| {
                        // As Nix: a path is deleted, then the count checked.
                        if let Some(m) = max_freed {
                            if freed > m {
                                limit_reached = true;
                                return false;
                            }
                            freed += sizes[j];
                        }
                        batch.push(p.clone());
                        true
                    })?;
                    limit_reached |= max_freed.is_some_and(|m| freed > m);
                    i = end;
                    report.deleted.extend(batch.iter().cloned());
                    if tx.send(batch).is_err() {
                        break;
                    }
                }
                Ok(())
            })();
            drop(tx);
            let moved = remover.join().expect("remover thread panicked");
            result.map(|_| moved)
        })?;
        report.bytes_freed = moved.bytes;
        report.limit_reached = limit_reached;
        Ok((report, moved))
    }

    /// One batch of the sweep, under the deletion lock: `take(index, path)` decides, for each
    /// path still deletable, whether it goes; those that go leave the graph and the database.
    /// Invalidates those of `paths` (in order) that no valid path refers to and that `take`
    /// accepts; with `in_use_too`, also paths an operation holds (their contents are gone).
    pub(crate) fn invalidate_batch(
        &self,
        paths: &[StorePath],
        in_use_too: bool,
        mut take: impl FnMut(usize, &StorePath) -> bool,
    ) -> Result<()> {
        let temp = self.temp.lock();
        let mut graph = self.graph_write();
        // Loaded here, under the write lock: a failed registration may have dropped the graph
        // since any earlier load.
        if graph.is_none() {
            *graph = Some(self.db().load_graph()?);
        }
        let Some(g) = graph.as_mut() else { return Ok(()) };
        let mut gone = Vec::new();
        for (j, p) in paths.iter().enumerate() {
            let Some(id) = g.id(p) else { continue };
            if (temp.contains(p) && !in_use_too) || g.is_referenced(id) || !take(j, p) {
                continue;
            }
            g.remove_node(id);
            gone.push(id as i64);
        }
        // Take the database before letting the graph go, so that no registration comes in
        // between, then let graph readers (the remover among them) go on during the commit.
        let mut db = self.db();
        drop(graph);
        let t = std::time::Instant::now();
        let invalidated = db.invalidate(&gone);
        drop(db);
        cairn_fault::point("gc-after-invalidate");
        tracing::debug!(paths = gone.len(), elapsed = ?t.elapsed(), "batch invalidated");
        if let Err(e) = invalidated {
            // The graph is ahead of the database: reload it at the next use.
            *self.graph_write() = None;
            return Err(e.into());
        }
        drop(temp);
        Ok(())
    }

    /// Whether a path is valid, from the graph when it is loaded (under the path's lock, the
    /// graph and the database agree: registration updates both before the lock is released).
    fn is_registered(&self, p: &StorePath) -> bool {
        if let Some(g) = self.graph_read().as_ref() {
            return g.id(p).is_some();
        }
        self.is_valid(p).unwrap_or(true)
    }

    /// Moves an invalid path's contents out of the store directory into the trash, which the
    /// reclaimer empties (see `reclaim.rs`); returns the bytes that will free (the sizes of files
    /// with no other hard link, as Nix counts them). Callers hold the path's lock.
    fn remove_contents(&self, p: &StorePath, moved: &mut Moved) -> Result<()> {
        self.move_to_trash(&self.real_path(p), &p.base_name(), moved)
    }

    fn move_to_trash(&self, real: &Path, name: &str, moved: &mut Moved) -> Result<()> {
        let meta = match fs::symlink_metadata(real) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StoreError::Io { op: "stat", path: real.to_owned(), source }),
        };
        // Renaming a directory to another parent rewrites its `..`, which needs write access.
        if meta.is_dir() && meta.mode() & 0o200 == 0 {
            fs::set_permissions(real, fs::Permissions::from_mode(0o755)).map_err(|source| StoreError::Io {
                op: "chmod",
                path: real.to_owned(),
                source,
            })?;
        }
        self.count_removal();
        // Unique in the trash: the same path may be collected again before the last copy is gone.
        let n = self.tmp_counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let trash = self.layout.trash_dir().join(format!("{name}.{n}"));
        fs::rename(real, &trash).map_err(|source| StoreError::Io {
            op: "move to trash",
            path: real.to_owned(),
            source,
        })?;
        moved.count(&trash)
    }

    /// Removes what the store directory holds under `p` if `p` is not a valid path and no
    /// operation holds it (Nix's deletion of a path that is not valid: its leftovers go, and
    /// nothing else is asked). Returns whether there was anything.
    pub fn remove_unregistered_path(&self, p: &StorePath) -> Result<bool> {
        let _one = self.gc_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if fs::symlink_metadata(self.real_path(p)).is_err() {
            return Ok(false);
        }
        let Some(_lock) = self.locks.try_lock(p) else { return Ok(false) };
        if self.is_valid(p)? {
            return Ok(false);
        }
        let mut moved = Moved::default();
        tracing::info!(path = %p, "removing unregistered contents");
        self.remove_contents(p, &mut moved)?;
        self.reclaimer.added(moved.bytes);
        Ok(true)
    }

    /// Removes entries of the store directory that are not valid paths and that no operation
    /// holds (what a crash between placing and registering leaves).
    fn remove_unregistered(&self, moved: &mut Moved) -> Result<usize> {
        let (mut n, before) = (0, moved.bytes);
        for p in self.unregistered_entries()? {
            // An add or import in progress holds the path's lock until it is registered.
            let Some(_lock) = self.locks.try_lock(&p) else { continue };
            if self.is_valid(&p)? {
                continue;
            }
            tracing::info!(path = %p, "removing unregistered contents");
            self.remove_contents(&p, moved)?;
            n += 1;
        }
        self.reclaimer.added(moved.bytes - before);
        Ok(n)
    }

    /// Entries of the store directory named as store paths that are not valid paths: what a
    /// crash between placing and registering leaves, or an add still under way. Dead to a
    /// collector, as Nix counts them (`--print-dead` lists them).
    pub fn unregistered_entries(&self) -> Result<Vec<StorePath>> {
        let dir = &self.layout.real_store_dir;
        let entries = fs::read_dir(dir).map_err(|source| StoreError::Io { op: "list", path: dir.clone(), source })?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue;
            }
            let Ok(p) = StorePath::from_base_name(name) else { continue };
            if !self.with_graph(|g| g.id(&p).is_some())? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Removes files of `optimise`'s links directory that no store path shares any more.
    /// A link is unused when its only other names were just moved to the trash.
    fn remove_unused_links(&self, moved: &Moved) -> Result<u64> {
        let dir = self.layout.links_dir();
        let Ok(entries) = fs::read_dir(&dir) else { return Ok(0) };
        let mut bytes = 0;
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            // Names in the trash may be gone already (the reclaimer is running).
            let in_trash = moved.shared.get(&(meta.dev(), meta.ino())).copied().unwrap_or(0);
            // optimise may link to it again between the check and the move: it then finds the
            // link gone and makes a new one.
            if meta.nlink() <= 1 + in_trash {
                let name = format!("link-{}", entry.file_name().to_string_lossy());
                self.move_to_trash(&entry.path(), &name, &mut Moved::default())?;
                bytes += meta.size();
            }
        }
        self.reclaimer.added(bytes);
        Ok(bytes)
    }

    /// Collects garbage if the store's file system has less than `min_free` bytes available,
    /// until `max_free` are (Nix's `min-free` and `max-free`). Skips if a collection is running.
    pub fn auto_gc(&self, min_free: u64, max_free: u64) -> Result<Option<GcReport>> {
        let dir = &self.layout.real_store_dir;
        let st = nix::sys::statvfs::statvfs(dir).map_err(|e| StoreError::Io {
            op: "statvfs",
            path: dir.clone(),
            source: e.into(),
        })?;
        // Space the reclaimer is still freeing counts as free: it will be, shortly.
        let avail = st.blocks_available() as u64 * st.fragment_size() as u64 + self.reclaimer.pending_bytes();
        if avail >= min_free || max_free <= avail {
            return Ok(None);
        }
        let Ok(_one) = self.gc_lock.try_lock() else { return Ok(None) };
        tracing::info!(avail, min_free, max_free, "free space below min-free: collecting garbage");
        self.collect_locked(&GcOptions { dry_run: false, max_freed: Some(max_free - avail) }).map(Some)
    }
}

/// What deleting the tree at `path` frees, as Nix 2.8's `deletePath` counts it: the size of
/// every file (not directory) with one or two names — two because `optimise` links files, and
/// the other name is then likely the link in `.links` that goes too.
fn freed_by_deleting(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return if meta.nlink() <= 2 { meta.size() } else { 0 };
    }
    let Ok(list) = fs::read_dir(path) else { return 0 };
    list.flatten().map(|e| freed_by_deleting(&e.path())).sum()
}

/// What a collection moved to the trash.
#[derive(Default)]
struct Moved {
    /// Sizes of the files moved that had no other name (freed once the trash is emptied).
    bytes: u64,
    /// Files moved that have other names (hard links of `optimise`): how many names of each
    /// inode went to the trash.
    shared: HashMap<(u64, u64), u64>,
}

impl Moved {
    /// Counts a tree just moved into the trash.
    fn count(&mut self, path: &Path) -> Result<()> {
        let meta = fs::symlink_metadata(path).map_err(|source| StoreError::Io {
            op: "stat",
            path: path.to_owned(),
            source,
        })?;
        if meta.is_dir() {
            let list =
                fs::read_dir(path).map_err(|source| StoreError::Io { op: "list", path: path.to_owned(), source })?;
            for entry in list {
                let entry = entry.map_err(|source| StoreError::Io { op: "list", path: path.to_owned(), source })?;
                self.count(&entry.path())?;
            }
        } else if meta.nlink() == 1 {
            self.bytes += meta.size();
        } else {
            *self.shared.entry((meta.dev(), meta.ino())).or_default() += 1;
        }
        Ok(())
    }
}

struct Collecting<'a>(&'a LocalStore);

impl Drop for Collecting<'_> {
    fn drop(&mut self) {
        self.0.temp.lock().set_collecting(false);
        self.0.reclaimer.set_paused(false);
    }
}

fn alive(dir: &cairn_nix::StoreDir, p: &StorePath, why: String) -> StoreError {
    StoreError::Alive { path: dir.display(p), why }
}
