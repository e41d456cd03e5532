//! Garbage-collector roots.
//!
//! A path is live if a root reaches it. Roots come from named [`RootSource`]s — the gcroots
//! directory of symlinks (permanent and indirect roots), the store paths that running processes
//! use (runtime roots), and whatever later parts of cairn register (image tags, automata) — and
//! from temporary roots ([`TempRoots`]): every path an operation is working on, for the life of
//! that operation, and every path handed to a client, for the life of that client's process.
//!
//! Temporary roots are what make a collection safe while the store is in use. An operation
//! roots a path *before* it checks that the path is valid, and the collector re-checks temporary
//! roots under the same mutex just before it invalidates anything, so for every path either the
//! operation sees it invalid or the collector sees it rooted — never a half-deleted path.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use cairn_nix::StorePath;

use crate::{Result, StoreError, StoreLayout};

/// A root and where it comes from (a symlink, `{temp:PID}`, `/proc/PID/maps` …), as
/// `--print-roots` shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Root {
    pub origin: String,
    pub path: StorePath,
}

impl Root {
    /// Where the root comes from, as a client may see it: as nix-daemon's, an untrusted client
    /// does not learn other processes' roots — what `/proc` shows (their maps, files and
    /// environments) and the paths operations hold — only the links that root paths.
    pub fn origin_shown(&self, trusted: bool) -> String {
        if trusted || (self.origin.starts_with('/') && !self.origin.starts_with("/proc/")) {
            self.origin.clone()
        } else {
            "{censored}".to_owned()
        }
    }
}

/// A named kind of root. The collector asks every registered source for its roots at the start
/// of each collection; a source reports store paths whether or not they are valid (invalid ones
/// are ignored).
pub trait RootSource: Send + Sync {
    /// Shown in logs (`links`, `runtime`, …).
    fn name(&self) -> &'static str;
    fn roots(&self, layout: &StoreLayout) -> Result<Vec<Root>>;
}

/// The process of a connected client, told apart from a later process with the same pid by its
/// start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId {
    pub pid: i32,
    pub start_time: u64,
}

impl ClientId {
    /// The running process `pid`, or `None` if there is none.
    pub fn of_pid(pid: i32) -> Option<ClientId> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Field 2 is the command in parentheses and may itself hold ") ": skip past the last one.
        let after = &stat[stat.rfind(')')? + 1..];
        // Fields from 3 on; start time is field 22.
        let start_time = after.split_whitespace().nth(19)?.parse().ok()?;
        Some(ClientId { pid, start_time })
    }

    fn alive(&self) -> bool {
        ClientId::of_pid(self.pid) == Some(*self)
    }
}

thread_local! {
    static CLIENT: std::cell::Cell<Option<ClientId>> = const { std::cell::Cell::new(None) };
}

/// While alive, temporary roots taken on this thread are also kept for `client`'s process, as
/// Nix keeps a daemon session's temporary roots until the client disconnects. A client that adds
/// a path and then roots it (`cairn add --out-link`) so cannot lose the path in between.
///
/// A thread-local rather than a parameter: roots are taken deep inside store operations (an
/// import roots every reference it checks), and every operation would otherwise carry it.
pub struct ClientScope(Option<ClientId>);

impl ClientScope {
    pub fn enter(client: Option<ClientId>) -> ClientScope {
        ClientScope(CLIENT.with(|c| c.replace(client)))
    }
}

impl Drop for ClientScope {
    fn drop(&mut self) {
        CLIENT.with(|c| c.set(self.0));
    }
}

#[derive(Default)]
pub(crate) struct TempState {
    /// Paths rooted by operations in progress, with a count each.
    ops: HashMap<StorePath, usize>,
    /// Paths kept for client processes.
    clients: HashMap<ClientId, HashSet<StorePath>>,
    /// New clients since the last pruning of dead ones.
    since_prune: usize,
    /// Whether a collection is running; while it is, released roots move to `released`.
    collecting: bool,
    /// Paths rooted at some moment of the running collection. The collector marked from the
    /// roots it read when it started: a path rooted later (and perhaps released after being
    /// linked from a new permanent root) must survive this collection.
    released: HashSet<StorePath>,
}

impl TempState {
    pub(crate) fn contains(&self, p: &StorePath) -> bool {
        self.ops.contains_key(p) || self.released.contains(p) || self.clients.values().any(|s| s.contains(p))
    }

    /// Starts (or ends) a collection's watch over released roots.
    pub(crate) fn set_collecting(&mut self, on: bool) {
        self.collecting = on;
        self.released.clear();
    }

    /// Forgets clients whose process has exited. (A client links what it wants kept before it
    /// exits, and the collector reads temporary roots before links, so a pruned client's paths
    /// need no grace.)
    pub(crate) fn prune(&mut self) {
        self.clients.retain(|c, _| c.alive());
        self.since_prune = 0;
    }

    pub(crate) fn roots(&self) -> Vec<Root> {
        // The daemon's own operations' roots are its process's, as Nix shows a worker's.
        let me = std::process::id();
        let ops = self.ops.keys().map(move |p| Root { origin: format!("{{temp:{me}}}"), path: p.clone() });
        let clients = self
            .clients
            .iter()
            .flat_map(|(c, s)| s.iter().map(move |p| Root { origin: format!("{{temp:{}}}", c.pid), path: p.clone() }));
        ops.chain(clients).collect()
    }
}

/// The temporary roots of a store. Its mutex is also the collector's deletion lock.
#[derive(Default, Clone)]
pub(crate) struct TempRoots(Arc<Mutex<TempState>>);

/// Releases an operation's temporary roots when dropped.
pub struct TempRootGuard {
    roots: TempRoots,
    paths: Vec<StorePath>,
}

impl TempRoots {
    pub(crate) fn lock(&self) -> MutexGuard<'_, TempState> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Roots `paths` until the guard is dropped (and, inside a [`ClientScope`], for the life of
    /// the client).
    pub(crate) fn add(&self, paths: impl IntoIterator<Item = StorePath>) -> TempRootGuard {
        let paths: Vec<StorePath> = paths.into_iter().collect();
        self.take(&paths);
        TempRootGuard { roots: self.clone(), paths }
    }

    fn take(&self, paths: &[StorePath]) {
        let mut st = self.lock();
        for p in paths {
            *st.ops.entry(p.clone()).or_default() += 1;
        }
        if let Some(client) = CLIENT.with(|c| c.get()) {
            if !st.clients.contains_key(&client) {
                st.since_prune += 1;
                if st.since_prune > 256 {
                    st.prune();
                }
            }
            st.clients.entry(client).or_default().extend(paths.iter().cloned());
        }
    }
}

impl TempRootGuard {
    /// Roots more paths, released with the others.
    pub fn extend(&mut self, paths: impl IntoIterator<Item = StorePath>) {
        let more: Vec<StorePath> = paths.into_iter().collect();
        self.roots.take(&more);
        self.paths.extend(more);
    }
}

impl Drop for TempRootGuard {
    fn drop(&mut self) {
        if self.paths.is_empty() {
            return;
        }
        let mut st = self.roots.lock();
        for p in &self.paths {
            if let Some(n) = st.ops.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    st.ops.remove(p);
                    if st.collecting {
                        st.released.insert(p.clone());
                    }
                }
            }
        }
    }
}

/// The name of the indirect root for `link` in `gcroots/auto`: the nix32 SHA-1 of the link's
/// path, as Nix names it.
pub fn auto_root_name(link: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let h = cairn_nix::Hash::digest(cairn_nix::HashAlgo::Sha1, link.as_os_str().as_bytes());
    cairn_nix::nixbase32::encode(h.as_bytes())
}

/// The store path a symlink target or file name points into, if any: logical (`/store/…`) or
/// physical (`<root>/store/…`) form, possibly inside the store path.
pub(crate) fn store_path_of(layout: &StoreLayout, target: &Path) -> Option<StorePath> {
    let s = target.to_str()?;
    for dir in [layout.store_dir.as_str(), layout.real_store_dir.to_str()?] {
        if let Some(rest) = s.strip_prefix(dir).and_then(|r| r.strip_prefix('/')) {
            let base = rest.split('/').next()?;
            return StorePath::from_base_name(base).ok();
        }
    }
    None
}

/// Permanent and indirect roots: the gcroots directory.
///
/// As in Nix: a symlink anywhere under it that points into the store is a root; a symlink that
/// points elsewhere is an indirect root, which counts if its target is itself a symlink into the
/// store, and is stale (to be removed from `auto/`) once its target is gone; a regular file named
/// like a store path roots that path.
pub struct LinkRoots {
    pub dir: PathBuf,
}

impl LinkRoots {
    /// The roots, and the stale entries of `auto/` (which the store removes under its lock).
    pub(crate) fn roots_and_stale(&self, layout: &StoreLayout) -> Result<(Vec<Root>, Vec<PathBuf>)> {
        let (mut out, mut stale) = (Vec::new(), Vec::new());
        self.scan(layout, &self.dir, &mut out, &mut stale)?;
        Ok((out, stale))
    }

    fn scan(&self, layout: &StoreLayout, dir: &Path, out: &mut Vec<Root>, stale: &mut Vec<PathBuf>) -> Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // As Nix: a directory of roots this daemon may not read is skipped, said in the log.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                tracing::info!("cannot read potential root '{}': {e}", dir.display());
                return Ok(());
            }
            Err(source) => return Err(StoreError::Io { op: "list", path: dir.to_owned(), source }),
        };
        let auto = self.dir.join("auto");
        for entry in entries {
            let entry = entry.map_err(|source| StoreError::Io { op: "list", path: dir.to_owned(), source })?;
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if dir == auto && entry.file_name().as_encoded_bytes().starts_with(b".") {
                continue; // a root being written (`add_indirect_root`)
            }
            if ft.is_dir() {
                self.scan(layout, &path, out, stale)?;
            } else if ft.is_symlink() {
                let Ok(target) = fs::read_link(&path) else { continue };
                if let Some(p) = store_path_of(layout, &target) {
                    out.push(Root { origin: path.display().to_string(), path: p });
                    continue;
                }
                let target = dir.join(target);
                match fs::symlink_metadata(&target) {
                    Err(_) if dir == auto => stale.push(path),
                    Ok(m) if m.file_type().is_symlink() => {
                        if let Some(p) = fs::read_link(&target).ok().and_then(|t| store_path_of(layout, &t)) {
                            out.push(Root { origin: target.display().to_string(), path: p });
                        }
                    }
                    _ => {}
                }
            } else if ft.is_file() {
                if let Some(p) =
                    path.file_name().and_then(|n| n.to_str()).and_then(|n| StorePath::from_base_name(n).ok())
                {
                    out.push(Root { origin: path.display().to_string(), path: p });
                }
            }
        }
        Ok(())
    }
}

impl RootSource for LinkRoots {
    fn name(&self) -> &'static str {
        "links"
    }
    fn roots(&self, layout: &StoreLayout) -> Result<Vec<Root>> {
        Ok(self.roots_and_stale(layout)?.0)
    }
}

/// Store paths in use by running processes: their executables, working directories, open
/// files, memory maps and environments, found in `/proc`.
pub struct RuntimeRoots;

impl RuntimeRoots {
    /// Every store path named in `text` under one of `dirs`. A directory after the first (the
    /// logical store directory of a store kept elsewhere) counts only where a path starts, not
    /// as the tail of a longer one: `/tmp/other/store/…` is another store's file, not this
    /// store's `/store/…`.
    fn find_in(text: &[u8], dirs: &[&[u8]], origin: &str, out: &mut Vec<Root>) {
        for (i, dir) in dirs.iter().enumerate() {
            let mut from = 0;
            while let Some(at) = find(&text[from..], dir) {
                let begins = from + at;
                let start = begins + dir.len();
                from = start;
                if text.get(start) != Some(&b'/') {
                    continue;
                }
                // Preceded by a byte of a directory name: the tail of another path.
                if i > 0
                    && begins > 0
                    && (text[begins - 1].is_ascii_alphanumeric() || b"/-._+~".contains(&text[begins - 1]))
                {
                    continue;
                }
                let base = &text[start + 1..];
                let end = base.iter().position(|&b| !is_name_byte(b)).unwrap_or(base.len());
                if let Ok(p) = std::str::from_utf8(&base[..end])
                    .map_err(drop)
                    .and_then(|s| StorePath::from_base_name(s).map_err(drop))
                {
                    out.push(Root { origin: origin.to_owned(), path: p });
                }
            }
        }
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+-._?=".contains(&b)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

impl RootSource for RuntimeRoots {
    fn name(&self) -> &'static str {
        "runtime"
    }
    fn roots(&self, layout: &StoreLayout) -> Result<Vec<Root>> {
        use std::os::unix::ffi::OsStrExt;
        let real = layout.real_store_dir.as_os_str().as_bytes();
        let logical = layout.store_dir.as_str().as_bytes();
        let dirs: Vec<&[u8]> = if real == logical { vec![real] } else { vec![real, logical] };
        let mut out = Vec::new();
        let Ok(procs) = fs::read_dir("/proc") else { return Ok(out) };
        for p in procs.flatten() {
            let name = p.file_name();
            if !name.as_bytes().iter().all(u8::is_ascii_digit) {
                continue;
            }
            let dir = p.path();
            // Processes come and go while we look: anything unreadable is skipped.
            for link in ["exe", "cwd", "root"] {
                if let Ok(t) = fs::read_link(dir.join(link)) {
                    RuntimeRoots::find_in(
                        t.as_os_str().as_bytes(),
                        &dirs,
                        &dir.join(link).display().to_string(),
                        &mut out,
                    );
                }
            }
            if let Ok(fds) = fs::read_dir(dir.join("fd")) {
                for fd in fds.flatten() {
                    if let Ok(t) = fs::read_link(fd.path()) {
                        RuntimeRoots::find_in(
                            t.as_os_str().as_bytes(),
                            &dirs,
                            &fd.path().display().to_string(),
                            &mut out,
                        );
                    }
                }
            }
            for file in ["maps", "environ"] {
                if let Ok(text) = fs::read(dir.join(file)) {
                    RuntimeRoots::find_in(&text, &dirs, &dir.join(file).display().to_string(), &mut out);
                }
            }
        }
        Ok(out)
    }
}

/// Store paths in a text, for tests of the scanner: under the store directory `dirs[0]` (where
/// the store is) or `dirs[1]` (its logical name, if it is kept elsewhere).
#[cfg(test)]
pub(crate) fn paths_in(text: &str, dirs: &[&str]) -> Vec<StorePath> {
    let mut out = Vec::new();
    let dirs: Vec<&[u8]> = dirs.iter().map(|d| d.as_bytes()).collect();
    RuntimeRoots::find_in(text.as_bytes(), &dirs, "", &mut out);
    out.into_iter().map(|r| r.path).collect()
}
