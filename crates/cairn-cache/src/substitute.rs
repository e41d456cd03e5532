//! Substitution: the closures of some store paths fetched from binary caches.
//!
//! Every missing path is looked up in the caches in priority order; the first narinfo that passes
//! the checks is used, its references are looked up at once (lookups run in parallel, up to
//! [`Limits::connections`]), and its NAR is downloaded (up to [`Limits::jobs`] at once). A NAR
//! is read, decompressed, hashed and restored in one streaming pass on a blocking thread; its
//! compressed bytes are counted and hashed as they pass, so the file size and hash are checked
//! without a second read. Whatever check fails — narinfo for another path, no trusted signature,
//! file size or hash, NAR size or hash — the path is refused with a message naming the check,
//! nothing of it is placed, and the next cache is tried. Accepted paths go into one store
//! [`Batch`], committed at the end: one `syncfs`, one transaction, and only paths whose whole
//! closure arrived.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use cairn_nix::content_address::ContentAddress;
use cairn_nix::hash::{HashAlgo, Hasher};
use cairn_nix::narinfo::{CacheInfo, NarInfo};
use cairn_nix::signing::PublicKey;
use cairn_nix::{StoreDir, StorePath};
use cairn_store::peers::{PeerOffer, Peers, Wanted};
use cairn_store::{Batch, ChunkReader, ClientId, ClientScope, LocalStore, PathInfo, TempRootGuard};
use tokio::sync::{mpsc, OnceCell, Semaphore};

use crate::backend::{split_params, Backend, FileReader, NetOptions};
use crate::remote::RemoteStore;
use crate::{CacheError, Compression, NarInfoCache};

/// One binary cache to substitute from.
pub struct Substituter {
    url: String,
    backend: Backend,
    /// `?priority=N` in the URL, which overrides the cache's own.
    priority: Option<u32>,
    /// `?want-mass-query=true|false` in the URL, which overrides the cache's own.
    want_mass_query: Option<bool>,
    /// `?store=DIR` in the URL: the store directory the cache's paths are in, when it is not
    /// this store's (as Nix's `store` parameter of a store URL). Such a cache serves only paths
    /// whose content address is known, under the path that address gives in its directory.
    store_dir: Option<StoreDir>,
    /// `?trusted=1`: its paths are taken without a signature (Nix's `trusted` setting).
    trusted: bool,
    /// Fetched on first use; only a good answer is kept, so a cache that was down is asked again.
    info: OnceCell<CacheInfo>,
}

impl std::fmt::Debug for Substituter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Substituter({})", self.url)
    }
}

/// The parameters every substituter's URL may carry, as Nix's store settings.
struct Params {
    priority: Option<u32>,
    want_mass_query: Option<bool>,
    store_dir: Option<StoreDir>,
    trusted: bool,
}

/// A boolean setting as Nix reads one.
fn flag(url: &str, key: &str, v: &str) -> Result<bool, CacheError> {
    match v {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(CacheError::Url { url: url.to_owned(), reason: format!("{key} '{v}' is not true or false") }),
    }
}

impl Params {
    fn of(url: &str) -> Result<Params, CacheError> {
        let (_, params) = split_params(url);
        let get = |key: &str| params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let priority = match get("priority") {
            None => None,
            Some(v) => Some(v.parse().map_err(|_| CacheError::Url {
                url: url.to_owned(),
                reason: format!("priority '{v}' is not a number"),
            })?),
        };
        let want_mass_query = get("want-mass-query").map(|v| flag(url, "want-mass-query", v)).transpose()?;
        let trusted = get("trusted").map(|v| flag(url, "trusted", v)).transpose()?.unwrap_or(false);
        let store_dir = match get("store") {
            None => None,
            Some(v) => Some(
                StoreDir::new(v)
                    .map_err(|e| CacheError::Url { url: url.to_owned(), reason: format!("store '{v}': {e}") })?,
            ),
        };
        Ok(Params { priority, want_mass_query, store_dir, trusted })
    }
}

impl Substituter {
    pub fn open(url: &str, net: &NetOptions) -> Result<Substituter, CacheError> {
        let params = Params::of(url)?;
        let backend = Backend::open(url, net)?;
        Ok(Substituter::with(url, backend, params))
    }

    fn with(url: &str, backend: Backend, p: Params) -> Substituter {
        Substituter {
            url: url.to_owned(),
            backend,
            priority: p.priority,
            want_mass_query: p.want_mass_query,
            store_dir: p.store_dir,
            trusted: p.trusted,
            info: OnceCell::new(),
        }
    }

    /// A fleet peer as a cache (`p2p://NODE-ID`): its narinfos from `cache`, its NARs from the
    /// job's peers.
    pub fn peer(url: &str, cache: Arc<dyn cairn_store::peers::PeerCache>) -> Substituter {
        let backend = Backend::Peer { url: url.to_owned(), cache };
        let params = Params { priority: None, want_mass_query: Some(true), store_dir: None, trusted: false };
        Substituter::with(url, backend, params)
    }

    /// A store that answers questions (`ssh://`, `ssh-ng://`, `unix://`; see [`crate::remote`]),
    /// reached through `store`. Its URL may say `priority`, `want-mass-query` and `trusted`.
    pub fn remote(url: &str, store: Arc<dyn RemoteStore>) -> Result<Substituter, CacheError> {
        let params = Params::of(url)?;
        if params.store_dir.is_some() {
            return Err(CacheError::Url {
                url: url.to_owned(),
                reason: "a remote store is asked for paths of this store's directory (no store= parameter)".into(),
            });
        }
        Ok(Substituter::with(url, Backend::Remote { url: url.to_owned(), store }, params))
    }

    /// The policy its narinfos are checked under: `policy`, or none for a cache whose URL says
    /// `?trusted=1` (Nix's `trusted`: its paths need no signature).
    fn policy<'a>(&self, policy: &'a Policy) -> std::borrow::Cow<'a, Policy> {
        if self.trusted {
            std::borrow::Cow::Owned(Policy { require_sigs: false, ..Policy::default() })
        } else {
            std::borrow::Cow::Borrowed(policy)
        }
    }

    /// Whether its answers may be remembered (a peer's change as it adds and collects paths).
    fn memoised(&self) -> bool {
        !matches!(self.backend, Backend::Peer { .. } | Backend::Remote { .. })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The build log of `drv` the cache holds (`log/<drv>`, as Nix's `copy-log` and caches with
    /// logs keep them), if it is a binary cache that has one (at most 4 MiB).
    pub async fn build_log(&self, drv: &StorePath) -> Result<Option<bytes::Bytes>, CacheError> {
        match self.backend {
            Backend::Remote { .. } | Backend::Peer { .. } => Ok(None),
            _ => self.backend.get(&format!("log/{drv}")).await,
        }
    }

    /// The store directory of the cache's paths: its URL's `?store=`, else `ours`.
    pub fn store_dir_for(&self, ours: &StoreDir) -> StoreDir {
        self.store_dir.clone().unwrap_or_else(|| ours.clone())
    }

    /// Whether the cache's paths are in another store directory than `ours` (`?store=`).
    fn elsewhere(&self, ours: &StoreDir) -> bool {
        self.store_dir.as_ref().is_some_and(|d| d != ours)
    }

    /// The cache's `nix-cache-info`, checked to serve `ours` (or the URL's `?store=`).
    pub async fn cache_info(&self, ours: &StoreDir) -> Result<&CacheInfo, CacheError> {
        let dir = &self.store_dir_for(ours);
        self.info
            .get_or_try_init(|| async {
                if let Backend::Remote { .. } = self.backend {
                    // Nix's defaults for a store that is not a binary cache.
                    return Ok(CacheInfo { store_dir: dir.as_str().to_owned(), want_mass_query: false, priority: 0 });
                }
                let key = "nix-cache-info";
                let text = match self.backend.get(key).await? {
                    Some(text) => text,
                    // As Nix: a local directory without one is a cache of this store directory
                    // with the defaults (Nix writes the file there; a reader does not).
                    None if matches!(self.backend, Backend::File(_)) => Default::default(),
                    None => return Err(CacheError::Missing { url: self.backend.describe(key) }),
                };
                CacheInfo::parse(dir, &String::from_utf8_lossy(&text))
                    .map_err(|e| CacheError::BadFile { url: self.backend.describe(key), reason: e.to_string() })
            })
            .await
    }

    /// Lower is tried first.
    pub async fn priority(&self, dir: &StoreDir) -> Result<u32, CacheError> {
        let info = self.cache_info(dir).await?;
        Ok(self.priority.unwrap_or(info.priority))
    }

    /// Whether the cache welcomes many queries at once (`WantMassQuery`, or the URL's
    /// `want-mass-query`): Nix asks only those what is substitutable in bulk (`nix-env -qas`).
    pub async fn want_mass_query(&self, dir: &StoreDir) -> bool {
        match self.want_mass_query {
            Some(w) => w,
            None => self.cache_info(dir).await.is_ok_and(|i| i.want_mass_query),
        }
    }

    /// The narinfo of `path`, parsed, or `None` if the cache has none.
    async fn narinfo(
        &self,
        dir: &StoreDir,
        path: &StorePath,
        lookups: &NarInfoCache,
    ) -> Result<Option<NarInfo>, CacheError> {
        if let Some(answer) = lookups.get(&self.url, path.hash_part()).filter(|_| self.memoised()) {
            return Ok(answer);
        }
        if let Backend::Remote { store, .. } = &self.backend {
            let info = store
                .path_info(path)
                .await
                .map_err(|reason| CacheError::Http { url: self.backend.describe(&path.to_string()), reason })?;
            return Ok(info.map(|i| {
                let key = i.path.to_string();
                i.into_narinfo(key, "none")
            }));
        }
        let key = format!("{}.narinfo", path.hash_part());
        let Some(text) = self.backend.get(&key).await? else {
            if self.memoised() {
                lookups.put(&self.url, path.hash_part(), None);
            }
            return Ok(None);
        };
        let info = NarInfo::parse(dir, &String::from_utf8_lossy(&text))
            .map_err(|e| CacheError::BadFile { url: self.backend.describe(&key), reason: e.to_string() })?;
        Ok(Some(info))
    }

    /// The narinfo by which `path` would be fetched from this cache. For a cache of another
    /// store directory (`?store=`), that is the narinfo of the path that `ca`, the content
    /// address `path` is known by, gives in the cache's directory, taken for `path`: the same
    /// bytes under the name this store gives them, as Nix substitutes a fixed output from such
    /// a cache. Its signatures (over the other directory's path) are dropped: the content
    /// address proves the path, and the contents are checked against it when they arrive.
    /// `None`: the cache has no such narinfo, or cannot serve `path` (another directory and no
    /// content address known).
    async fn narinfo_for(
        &self,
        ours: &StoreDir,
        path: &StorePath,
        ca: Option<&ContentAddress>,
        lookups: &NarInfoCache,
    ) -> Result<Option<NarInfo>, CacheError> {
        if !self.elsewhere(ours) {
            return self.narinfo(ours, path, lookups).await;
        }
        let Some((theirs, there)) = self.named_there(ours, path, ca) else { return Ok(None) };
        let Some(mut info) = self.narinfo(&theirs, &there, lookups).await? else { return Ok(None) };
        let bad = |reason: String| CacheError::BadFile {
            url: self.backend.describe(&format!("{}.narinfo", there.hash_part())),
            reason,
        };
        if info.store_path != there {
            return Err(bad(format!("the narinfo is for '{}'", theirs.display(&info.store_path))));
        }
        // As Nix: the cache must say the same content address, and no references.
        if info.ca.as_deref().and_then(|c| c.parse::<ContentAddress>().ok()).as_ref() != ca {
            return Err(bad(format!(
                "'{}' is not content-addressed as '{}'",
                theirs.display(&there),
                ca.map(|c| c.to_string()).unwrap_or_default()
            )));
        }
        if !info.references.is_empty() {
            return Err(bad(format!("'{}' has references, which a fixed output cannot have", theirs.display(&there))));
        }
        info.store_path = path.clone();
        info.signatures.clear();
        info.deriver = None;
        Ok(Some(info))
    }

    /// The store directory of this cache and the path `path` has there: itself in this store's
    /// directory, the path its content address `ca` gives in another (none without one).
    fn named_there(
        &self,
        ours: &StoreDir,
        path: &StorePath,
        ca: Option<&ContentAddress>,
    ) -> Option<(StoreDir, StorePath)> {
        if !self.elsewhere(ours) {
            return Some((ours.clone(), path.clone()));
        }
        let theirs = self.store_dir_for(ours);
        let there = theirs.make_content_addressed_path(path.name(), ca?, &BTreeSet::new(), false).ok()?;
        Some((theirs, there))
    }

    /// The URL as Nix shows a store's: without its parameters.
    fn shown_url(&self) -> &str {
        split_params(&self.url).0
    }
}

/// Which paths are trusted.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Keys whose signatures make a path trusted (`trusted-public-keys`).
    pub trusted_keys: Vec<PublicKey>,
    /// Whether a path needs such a signature or a content address that proves it.
    pub require_sigs: bool,
}

/// How much runs at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Narinfo lookups in flight.
    pub connections: usize,
    /// NAR downloads in flight.
    pub jobs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { connections: 25, jobs: 16 }
    }
}

/// Counters a progress display reads while a substitution runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Paths found in a cache, to download.
    pub paths_expected: AtomicU64,
    pub paths_done: AtomicU64,
    /// Their files' sizes (as the narinfos say; NAR sizes where a narinfo has no file size).
    pub bytes_expected: AtomicU64,
    /// Bytes downloaded so far.
    pub bytes_done: AtomicU64,
}

/// What a substitution did.
#[derive(Debug, Default)]
pub struct Report {
    /// Newly registered paths, references first.
    pub added: Vec<PathInfo>,
    /// Paths that could not be substituted, and why.
    pub failed: Vec<(StorePath, String)>,
    /// Of those, the ones no cache could really offer: their NAR was gone from every cache
    /// that offered them (Nix's "substitute gone"), or one of their references could not be
    /// substituted (an incomplete closure). Nix counts neither as a failed substitute: a build
    /// falls back to building them without being asked to.
    pub unavailable: HashSet<StorePath>,
    /// The paths some cache offered: a narinfo that passed the checks (trust included).
    pub offered: HashSet<StorePath>,
    /// Of the failed paths, those some cache answered for with a narinfo, good or not (the
    /// others no cache had, or no cache could be asked).
    pub answered: HashSet<StorePath>,
    /// Of the unavailable paths, those that came but were left out because one of their
    /// references could not be substituted: a cache had only part of their closure.
    pub incomplete: HashSet<StorePath>,
}

/// What a substitution tells as it goes, for a client to show as Nix's daemon shows it. `from`
/// is the cache's URL without its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A path's download starts (the path as the cache names it): "copying path '…' from '…'".
    Copying { path: String, from: String },
    /// A cache has the path, but its narinfo is signed by no trusted key and no content
    /// address proves it: "the substitute for '…' from '…' is not signed by any of the keys in
    /// 'trusted-public-keys'" (Nix's warning; the next cache is tried).
    Unsigned { path: String, from: String },
}

/// Told of each [`Notice`].
pub type Announce = mpsc::UnboundedSender<Notice>;

/// What a substitution needs.
pub struct Job {
    pub store: Arc<LocalStore>,
    pub substituters: Vec<Arc<Substituter>>,
    pub lookups: Arc<NarInfoCache>,
    pub policy: Policy,
    pub limits: Limits,
    /// The client whose request this is: what it adds stays rooted while it lives.
    pub client: Option<ClientId>,
    pub progress: Arc<Progress>,
    /// Fetch these valid paths again and swap the copies in for their broken contents
    /// (`verify --repair`); references are not looked at.
    pub repair: bool,
    /// Asked for each NAR before its cache (`peers`): the narinfo still comes from the cache.
    pub peers: Option<Arc<dyn Peers>>,
    /// Told of each path as its download starts.
    pub announce: Option<Announce>,
    /// The content addresses some wanted paths are known by (the outputs of fixed-output
    /// derivations): such a path may come from a cache of another store directory.
    pub content_addresses: HashMap<StorePath, ContentAddress>,
}

struct Ctx {
    dir: StoreDir,
    /// Why configured caches could not be used (named when nothing else has a path).
    unusable: Vec<String>,
    subs: Vec<Arc<Substituter>>,
    lookups: Arc<NarInfoCache>,
    policy: Policy,
    client: Option<ClientId>,
    progress: Arc<Progress>,
    batch: Batch,
    net: Semaphore,
    jobs: Semaphore,
    peers: Option<Arc<dyn Peers>>,
    /// Peers are told these paths are on their way until the batch is committed.
    fetching: std::sync::Mutex<Vec<Box<dyn Send>>>,
    announce: Option<Announce>,
    content_addresses: HashMap<StorePath, ContentAddress>,
}

enum Event {
    /// A usable narinfo for a path: its references are wanted too.
    Found { path: StorePath, references: Vec<StorePath>, size: u64 },
    /// A path's download ended; `gone`: it failed only because caches had lost its NAR;
    /// `answered`: some cache had a narinfo for it.
    Done { path: StorePath, result: Result<(), String>, gone: bool, answered: bool },
}

/// Substitutes whatever is missing of the closures of `paths`.
pub async fn substitute(job: Job, paths: &[StorePath]) -> Result<Report, CacheError> {
    let started = std::time::Instant::now();
    let store = job.store;
    let dir = store.store_dir().clone();
    // Caches by priority; one that cannot be used is skipped, and named if nothing is found.
    let mut usable: Vec<(u32, Arc<Substituter>)> = Vec::new();
    let mut unusable: Vec<String> = Vec::new();
    let prios = futures_util::future::join_all(job.substituters.iter().map(|s| s.priority(&dir))).await;
    for (s, p) in job.substituters.iter().zip(prios) {
        match p {
            Ok(p) => usable.push((p, s.clone())),
            Err(e) => {
                tracing::warn!(cache = s.url(), "cannot use substituter: {e}");
                unusable.push(e.to_string());
            }
        }
    }
    usable.sort_by_key(|(p, _)| *p);
    let ctx = Arc::new(Ctx {
        dir: dir.clone(),
        unusable: unusable.clone(),
        subs: usable.into_iter().map(|(_, s)| s).collect(),
        lookups: job.lookups,
        policy: job.policy,
        client: job.client,
        progress: job.progress,
        batch: if job.repair { store.repair_batch()? } else { store.batch()? },
        net: Semaphore::new(job.limits.connections.max(1)),
        jobs: Semaphore::new(job.limits.jobs.max(1)),
        peers: if job.repair { None } else { job.peers },
        fetching: Default::default(),
        announce: job.announce,
        content_addresses: job.content_addresses,
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut tasks = tokio::task::JoinSet::new();
    let mut seen: HashSet<StorePath> = HashSet::new();
    // Every path looked at is rooted before its validity is checked, so that a collection cannot
    // take a valid reference before the batch registers what needs it.
    let mut roots: Vec<TempRootGuard> = Vec::new();
    let mut outstanding = 0usize;
    let mut report = Report::default();
    // `force`: fetch even a valid path (repair).
    let mut want = |p: &StorePath,
                    force: bool,
                    tasks: &mut tokio::task::JoinSet<()>,
                    outstanding: &mut usize|
     -> Result<(), CacheError> {
        if !seen.insert(p.clone()) {
            return Ok(());
        }
        roots.push(store.temp_root([p.clone()]));
        if !force && store.is_valid(p)? {
            return Ok(());
        }
        *outstanding += 1;
        tasks.spawn(fetch_path(ctx.clone(), p.clone(), tx.clone()));
        Ok(())
    };
    for p in paths {
        want(p, job.repair, &mut tasks, &mut outstanding)?;
    }
    let mut announced: HashSet<StorePath> = HashSet::new();
    while outstanding > 0 {
        let Some(event) = rx.recv().await else { break };
        match event {
            Event::Found { path, references, size } => {
                report.offered.insert(path.clone());
                if announced.insert(path) {
                    ctx.progress.paths_expected.fetch_add(1, Ordering::Relaxed);
                    ctx.progress.bytes_expected.fetch_add(size, Ordering::Relaxed);
                }
                for r in references.iter().filter(|_| !job.repair) {
                    want(r, false, &mut tasks, &mut outstanding)?;
                }
            }
            Event::Done { path, result, gone, answered } => {
                outstanding -= 1;
                if let Err(e) = result {
                    if gone {
                        report.unavailable.insert(path.clone());
                    }
                    if answered {
                        report.answered.insert(path.clone());
                    }
                    report.failed.push((path, e));
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    drop(tasks);
    let fetched = started.elapsed();
    let ctx = Arc::into_inner(ctx).expect("every download task has ended");
    let client = ctx.client;
    let batch = ctx.batch;
    let fetching = ctx.fetching;
    cairn_fault::point("substitute-mid");
    let committed = tokio::task::spawn_blocking(move || {
        let _client = ClientScope::enter(client);
        batch.commit()
    })
    .await
    .map_err(|e| CacheError::Io { url: "substitution".into(), source: io::Error::other(e) })??;
    drop(fetching);
    tracing::debug!(?fetched, total = ?started.elapsed(), paths = committed.added.len(), "substitution committed");
    report.added = committed.added;
    for (p, r) in committed.incomplete {
        report.unavailable.insert(p.clone());
        report.incomplete.insert(p.clone());
        let why = format!("needs '{}', which could not be substituted", dir.display(&r));
        report.failed.push((p, why));
    }
    if report.failed.is_empty() && !unusable.is_empty() {
        tracing::debug!(unusable = ?unusable, "substitution succeeded without some caches");
    }
    for p in paths {
        if !store.is_valid(p)? && !report.failed.iter().any(|(f, _)| f == p) {
            let mut tried = unusable.clone();
            tried.push("its closure is incomplete".into());
            report.failed.push((p.clone(), tried.join("; ")));
        }
    }
    drop(roots);
    Ok(report)
}

/// Finds a usable narinfo for `path` and downloads its NAR, falling back to the next cache on
/// any failure.
async fn fetch_path(ctx: Arc<Ctx>, path: StorePath, tx: mpsc::UnboundedSender<Event>) {
    let mut tried: Vec<String> = Vec::new();
    // Whether a cache offered the path and lost its NAR, and whether anything else went wrong.
    let (mut lost, mut broke, mut answered) = (false, false, false);
    for sub in &ctx.subs {
        let found = {
            let _permit = ctx.net.acquire().await.expect("semaphore open");
            sub.narinfo_for(&ctx.dir, &path, ctx.content_addresses.get(&path), &ctx.lookups).await
        };
        let info = match found {
            Ok(Some(info)) => {
                answered = true;
                info
            }
            Ok(None) => continue,
            Err(e) => {
                answered |= matches!(e, CacheError::BadFile { .. });
                broke = true;
                tried.push(e.to_string());
                continue;
            }
        };
        let policy = sub.policy(&ctx.policy);
        if let Err(check) = check_narinfo(&ctx.dir, &path, &info, &policy) {
            if let Some(a) = ctx.announce.as_ref().filter(|_| info.store_path == path) {
                if trusted_path_info(&ctx.dir, &path_info_of(&info), &policy).is_err() {
                    let shown = ctx.dir.display(&path);
                    let _ = a.send(Notice::Unsigned { path: shown, from: sub.shown_url().to_owned() });
                }
            }
            ctx.lookups.forget(sub.url(), path.hash_part());
            tried.push(format!("{}: {check}", sub.url()));
            continue;
        }
        // (A narinfo of another store directory's is remembered under its own hash part.)
        if sub.memoised() && !sub.elsewhere(&ctx.dir) {
            ctx.lookups.put(sub.url(), path.hash_part(), Some(info.clone()));
        }
        let references = info.references.iter().filter(|r| **r != path).cloned().collect();
        let size = info.file_size.unwrap_or(info.nar_size);
        let _ = tx.send(Event::Found { path: path.clone(), references, size });
        let _job = ctx.jobs.acquire().await.expect("semaphore open");
        if let Some(a) = &ctx.announce {
            let ca = ctx.content_addresses.get(&path);
            if let Some((theirs, there)) = sub.named_there(&ctx.dir, &path, ca) {
                let _ = a.send(Notice::Copying { path: theirs.display(&there), from: sub.shown_url().to_owned() });
            }
        }
        if from_peers(&ctx, &info).await {
            ctx.progress.paths_done.fetch_add(1, Ordering::Relaxed);
            ctx.progress.bytes_done.fetch_add(size, Ordering::Relaxed);
            let _ = tx.send(Event::Done { path, result: Ok(()), gone: false, answered: true });
            return;
        }
        match download(&ctx, sub, info).await {
            Ok(()) => {
                ctx.progress.paths_done.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(Event::Done { path, result: Ok(()), gone: false, answered: true });
                return;
            }
            Err(e) => {
                tracing::warn!(path = %ctx.dir.display(&path), "substitution failed: {e}");
                match e {
                    CacheError::Missing { .. } => lost = true,
                    _ => broke = true,
                }
                ctx.lookups.forget(sub.url(), path.hash_part());
                tried.push(match e {
                    CacheError::Refused { cache, check, .. } => format!("{cache}: {check}"),
                    e => e.to_string(),
                });
            }
        }
    }
    tried.extend(ctx.unusable.iter().cloned());
    let reason = if tried.is_empty() { "no substituter has it".to_owned() } else { tried.join("; ") };
    let _ = tx.send(Event::Done { path, result: Err(reason), gone: lost && !broke, answered });
}

/// Which of `paths` the caches could substitute, with the narinfo each would be fetched by:
/// for each path the first cache, by priority, whose narinfo passes [`check_narinfo`]. A cache
/// that cannot be read counts as not having the path. Nothing is downloaded but narinfos
/// (Nix's `querySubstitutablePathInfos`).
pub async fn query(
    substituters: &[Arc<Substituter>],
    lookups: &NarInfoCache,
    policy: &Policy,
    dir: &StoreDir,
    paths: &[StorePath],
) -> std::collections::BTreeMap<StorePath, NarInfo> {
    use futures_util::StreamExt;
    let prios = futures_util::future::join_all(substituters.iter().map(|s| s.priority(dir))).await;
    // As Nix's `querySubstitutablePaths`: caches of another store directory are not asked.
    let mut subs: Vec<(u32, &Arc<Substituter>)> = substituters
        .iter()
        .zip(prios)
        .filter(|(s, _)| !s.elsewhere(dir))
        .filter_map(|(s, p)| p.ok().map(|p| (p, s)))
        .collect();
    subs.sort_by_key(|(p, _)| *p);
    let subs = &subs;
    futures_util::stream::iter(paths)
        .map(|path| async move {
            for (_, sub) in subs {
                if let Ok(Some(info)) = sub.narinfo(dir, path, lookups).await {
                    if check_narinfo(dir, path, &info, &sub.policy(policy)).is_ok() {
                        if sub.memoised() {
                            lookups.put(sub.url(), path.hash_part(), Some(info.clone()));
                        }
                        return Some((path.clone(), info));
                    }
                }
            }
            None
        })
        .buffer_unordered(25)
        .filter_map(|x| async move { x })
        .collect()
        .await
}

/// Whether a path's metadata is trusted under `policy`: a signature by a trusted key, or a
/// content address that yields the path. Without `require_sigs`, anything is.
pub fn trusted_path_info(dir: &StoreDir, info: &PathInfo, policy: &Policy) -> Result<(), String> {
    if !policy.require_sigs {
        return Ok(());
    }
    let signed = cairn_nix::signing::fingerprint(dir, &info.path, &info.nar_hash, info.nar_size, &info.references)
        .is_ok_and(|fp| info.signatures.iter().any(|sig| policy.trusted_keys.iter().any(|k| k.verifies(&fp, sig))));
    let proven = info.ca.as_ref().is_some_and(|ca| {
        let refs: BTreeSet<StorePath> = info.references.iter().filter(|r| **r != info.path).cloned().collect();
        let self_ref = info.references.contains(&info.path);
        dir.make_content_addressed_path(info.path.name(), ca, &refs, self_ref).is_ok_and(|p| p == info.path)
    });
    if signed || proven {
        Ok(())
    } else if info.signatures.is_empty() {
        Err("it is not signed, and no content address proves it (trusted-public-keys, require-sigs)".into())
    } else {
        Err("no signature is by a trusted key (trusted-public-keys), and no content address proves it".into())
    }
}

/// The checks a narinfo must pass before its NAR is fetched; the error names the failed one.
pub fn check_narinfo(dir: &StoreDir, wanted: &StorePath, info: &NarInfo, policy: &Policy) -> Result<(), String> {
    if info.store_path != *wanted {
        return Err(format!("the narinfo is for '{}'", dir.display(&info.store_path)));
    }
    trusted_path_info(dir, &path_info_of(info), policy)?;
    Compression::parse(&info.compression).map_err(|e| e.to_string())?;
    if info.url.is_empty()
        || info.url.starts_with('/')
        || info.url.contains("://")
        || info.url.split('/').any(|c| c == "..")
    {
        return Err(format!("the NAR URL '{}' leaves the cache", info.url));
    }
    Ok(())
}

/// The store metadata a narinfo vouches for.
pub fn path_info_of(info: &NarInfo) -> PathInfo {
    PathInfo {
        path: info.store_path.clone(),
        nar_hash: info.nar_hash.clone(),
        nar_size: info.nar_size,
        references: info.references.clone(),
        deriver: info.deriver.clone(),
        registration_time: 0,
        ultimate: false,
        signatures: info.signatures.iter().cloned().collect(),
        ca: info.ca.as_deref().and_then(|c| c.parse().ok()),
    }
}

/// Asks the peers for the NAR a trusted narinfo describes and restores what one sends into the
/// batch, checked against the narinfo's NAR hash and size as a download is. False: no peer had
/// it, or what came was refused (then the cache is asked, and peers are told this node is
/// fetching it until the batch is committed).
async fn from_peers(ctx: &Arc<Ctx>, info: &NarInfo) -> bool {
    let Some(peers) = &ctx.peers else { return false };
    let wanted =
        Wanted::Nar { path: info.store_path.clone(), nar_hash: info.nar_hash.clone(), nar_size: info.nar_size };
    let reader = match peers.find(wanted).await {
        PeerOffer::Bytes(reader) => reader,
        PeerOffer::Upstream(guard) => {
            ctx.fetching.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(guard);
            return false;
        }
    };
    let (task_ctx, path_info) = (ctx.clone(), path_info_of(info));
    let placed = tokio::task::spawn_blocking(move || {
        let _client = ClientScope::enter(task_ctx.client);
        // One byte more than NarSize is read at most: a longer NAR fails the size check.
        let size = path_info.nar_size;
        task_ctx.batch.add_nar_with_info(path_info, reader.take(size + 1), |_| Ok::<(), CacheError>(()))
    })
    .await;
    match placed {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::warn!(path = %ctx.dir.display(&info.store_path), "from peers: {e}; asking the cache");
            false
        }
        Err(e) => {
            tracing::warn!(path = %ctx.dir.display(&info.store_path), "from peers: {e}; asking the cache");
            false
        }
    }
}

/// Downloads the NAR a narinfo names from its cache and restores it into the batch, on a
/// blocking thread ([`place`]).
async fn download(ctx: &Arc<Ctx>, sub: &Substituter, info: NarInfo) -> Result<(), CacheError> {
    let reader = sub.backend.open_read(&info.url).await?;
    let url = sub.backend.describe(&info.url);
    let ctx = ctx.clone();
    tokio::task::spawn_blocking(move || {
        let _client = ClientScope::enter(ctx.client);
        place(&ctx, info, reader, &url)
    })
    .await
    .map_err(|e| CacheError::Io { url: "download".into(), source: io::Error::other(e) })?
}

/// The compressed file as a buffered reader that counts its bytes (for progress), hashes them
/// (for the narinfo's FileHash) and refuses more than FileSize says. Large files are hashed on a
/// thread of their own, which gets each chunk without a copy.
struct FileCheck {
    inner: FileReader,
    chunk: Bytes,
    at: usize,
    size: u64,
    limit: Option<u64>,
    /// The file's expected size (FileSize, else NarSize), for sizing reads.
    expected: u64,
    progress: Arc<Progress>,
    hash: FileHash,
}

enum FileHash {
    Inline(Hasher),
    Thread { tx: std::sync::mpsc::SyncSender<Bytes>, done: std::thread::JoinHandle<cairn_nix::Hash> },
}

/// Chunks the file is read in.
const FILE_CHUNK: usize = 1 << 20;

impl FileCheck {
    fn new(inner: FileReader, info: &NarInfo, progress: Arc<Progress>, threaded: bool) -> FileCheck {
        let hasher = Hasher::new(info.file_hash.as_ref().map(|h| h.algo()).unwrap_or(HashAlgo::Sha256));
        let hash = if threaded {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(8);
            let done = std::thread::spawn(move || {
                let mut h = hasher;
                for chunk in rx {
                    h.update(&chunk);
                }
                h.finish()
            });
            FileHash::Thread { tx, done }
        } else {
            FileHash::Inline(hasher)
        };
        let expected = info.file_size.unwrap_or(info.nar_size);
        FileCheck { inner, chunk: Bytes::new(), at: 0, size: 0, limit: info.file_size, expected, progress, hash }
    }

    /// The file's hash (all of it must have been read).
    fn finish(self) -> cairn_nix::Hash {
        match self.hash {
            FileHash::Inline(h) => h.finish(),
            FileHash::Thread { tx, done } => {
                drop(tx);
                done.join().expect("file hashing thread panicked")
            }
        }
    }
}

impl io::BufRead for FileCheck {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.at == self.chunk.len() {
            // No bigger than what is expected to be left (a small path's file is a few
            // kilobytes; zeroing a full chunk for it would cost more than reading it).
            let left = self.expected.saturating_sub(self.size) + 1;
            let mut buf = bytes::BytesMut::zeroed(left.clamp(4096, FILE_CHUNK as u64) as usize);
            let n = loop {
                match self.inner.read(&mut buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            buf.truncate(n);
            self.size += n as u64;
            self.progress.bytes_done.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(limit) = self.limit.filter(|l| self.size > *l) {
                return Err(io::Error::other(format!(
                    "the file is longer than the narinfo's FileSize ({limit} bytes)"
                )));
            }
            let chunk = buf.freeze();
            match &mut self.hash {
                FileHash::Inline(h) => h.update(&chunk),
                FileHash::Thread { tx, .. } => {
                    tx.send(chunk.clone()).map_err(|_| io::Error::other("the file hashing thread stopped"))?
                }
            }
            (self.chunk, self.at) = (chunk, 0);
        }
        Ok(&self.chunk[self.at..])
    }

    fn consume(&mut self, n: usize) {
        self.at = (self.at + n).min(self.chunk.len());
    }
}

impl Read for FileCheck {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = io::BufRead::fill_buf(self)?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        io::BufRead::consume(self, n);
        Ok(n)
    }
}

/// Compressed bytes a file may have after its NAR ends (zstd's checksum, xz's index and footer
/// are a few bytes; more is refused, so an endless body cannot keep a download going).
const MAX_EPILOGUE: u64 = 1 << 20;

/// NARs larger than this are decompressed on a thread of their own, feeding the thread that
/// parses and writes them (which has the NAR-hashing thread beside it): the three overlap.
const PIPELINE_AT: u64 = 1 << 20;

/// Reads what is left of a compressed file after its NAR, up to [`MAX_EPILOGUE`] bytes.
fn drain_epilogue<R: Read>(rest: R) -> Result<R, String> {
    let mut limited = rest.take(MAX_EPILOGUE + 1);
    let n = io::copy(&mut limited, &mut io::sink()).map_err(|e| format!("reading the file: {e}"))?;
    if n > MAX_EPILOGUE {
        return Err(format!("the file continues for more than {MAX_EPILOGUE} bytes after the NAR"));
    }
    Ok(limited.into_inner())
}

/// The narinfo's FileSize and FileHash against the file as read.
fn check_file(info: &NarInfo, file: FileCheck) -> Result<(), String> {
    if let Some(expected) = info.file_size.filter(|s| *s != file.size) {
        return Err(format!("the file has {} bytes, the narinfo says {expected} (FileSize)", file.size));
    }
    let actual = file.finish();
    if let Some(expected) = info.file_hash.as_ref().filter(|h| **h != actual) {
        return Err(format!("the file hashes to {actual}, the narinfo says {expected} (FileHash)"));
    }
    Ok(())
}

/// Restores one NAR into the batch, checking everything the narinfo says.
fn place(ctx: &Ctx, info: NarInfo, reader: FileReader, url: &str) -> Result<(), CacheError> {
    let path = ctx.dir.display(&info.store_path);
    let refuse = |check: String| CacheError::Refused { path: path.clone(), cache: url.to_owned(), check };
    let compression = Compression::parse(&info.compression)?;
    let file = FileCheck::new(reader, &info, ctx.progress.clone(), info.nar_size > PIPELINE_AT);
    let decoder = compression
        .decoder(file)
        .map_err(|e| refuse(format!("cannot start {} decompression: {e}", compression.name())))?;
    let path_info = path_info_of(&info);
    // At most one byte more than NarSize is decompressed: a longer NAR fails the size check
    // instead of filling the disk.
    let limited = decoder.take(info.nar_size + 1);
    let result = if info.nar_size <= PIPELINE_AT {
        ctx.batch.add_nar_with_info(path_info, limited, |limited| -> Result<(), CacheError> {
            let rest = drain_epilogue(limited.into_inner().into_inner()).map_err(&refuse)?;
            check_file(&info, rest).map_err(&refuse)
        })
    } else {
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
            let producer = scope.spawn(move || -> Result<FileCheck, String> {
                let mut limited = limited;
                loop {
                    let mut chunk = vec![0u8; 1 << 20];
                    let mut filled = 0;
                    while filled < chunk.len() {
                        match limited.read(&mut chunk[filled..]) {
                            Ok(0) => break,
                            Ok(n) => filled += n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(format!("reading the {} file: {e}", compression.name())),
                        }
                    }
                    if filled == 0 {
                        break;
                    }
                    chunk.truncate(filled);
                    if tx.send(chunk).is_err() {
                        return Err("the NAR was refused before its end".into());
                    }
                }
                drop(tx);
                drain_epilogue(limited.into_inner().into_inner())
            });
            let mut producer = Some(producer);
            let reader = ChunkReader::new(rx);
            let added = ctx.batch.add_nar_with_info(path_info, reader, |reader| -> Result<(), CacheError> {
                drop(reader);
                let file = producer.take().expect("joined once").join().expect("decompressing thread panicked");
                check_file(&info, file.map_err(&refuse)?).map_err(&refuse)
            });
            // A failed decompression ends the NAR early; its own error says more.
            match (added, producer.map(|p| p.join().expect("decompressing thread panicked"))) {
                (Err(_), Some(Err(why))) if why != "the NAR was refused before its end" => Err(refuse(why)),
                (added, _) => added,
            }
        })
    };
    match result {
        Ok(_) => Ok(()),
        Err(CacheError::Store(e)) => Err(refuse(e.to_string())),
        Err(e) => Err(e),
    }
}
