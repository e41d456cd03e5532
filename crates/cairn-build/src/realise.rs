//! Realising derivations: which ones need building, in what order, and one build from start to
//! registration.
//!
//! [`Builder::realise`] walks the requested derivations and their input derivations, keeps those
//! with an output that is not valid, and runs them as their inputs finish — as many at once as
//! `max-jobs` allows, across all requests (a semaphore the whole daemon shares). A build whose
//! inputs failed is not started. Without `keep_going`, the first failure ends the request as it
//! ends Nix 2.8's `Worker::run` (a failed top-level goal clears the goals, whose destructors kill
//! their builders): no build of the request starts afterwards, not even one already waiting for
//! a job slot, and the request's builds still running are killed and their build directories
//! removed. With `keep_going`, everything that does not need a failed build is built.
//!
//! `--check` and `--repair` (Nix's build modes) are in [`modes`]: the plan decides per
//! derivation what it is built for ([`modes::NodeMode`]), and [`Builder::register`] compares,
//! swaps in or registers accordingly.
//!
//! One build ([`Builder::build`]): temporary roots on its input closure and outputs; a build
//! directory `<build-dir>/cairn-build-<name>-<pid>-<n>/` holding the sandbox root; the log kept
//! compressed and streamed as events; then each output is serialised, hashed, scanned and checked
//! ([`crate::outputs`]) and the outputs are registered together in one batch, with the
//! derivation as deriver. Nothing of a failed build is registered. Two requests for the same
//! derivation build it once: the second waits for the first, then finds its outputs valid.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_nix::derivation::Derivation;
use cairn_nix::StorePath;
use cairn_store::{Direction, LocalStore, PathInfo, StoreError};
use tokio::sync::{mpsc, watch, Notify, Semaphore};

use crate::derivations::Derivations;
use crate::fetchurl::{FetchSettings, FETCHURL};
use crate::limits::{hint, SandboxLimits};
use crate::logs::LogStore;
use crate::outputs::{collect, Collected, Expect};
use crate::remote::{Remote, Remotes};
use crate::requirements::{impure_values, Attrs, Host};
use crate::runner::{run, RunEnd, RunLimits};
use crate::sandbox::{plan, under, BuildInput};
use crate::BuildError;

mod modes;
mod remote_build;
mod slots;
use modes::{ContentsCheck, NodeMode, Stop};
pub use modes::{Failure, FailureKind, Mode};
use slots::Slot;

/// How many log lines a failure message quotes, as Nix does.
const TAIL_LINES: usize = 10;

/// The builder's configuration.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    /// Builds running at once on this machine, across all requests; 0 builds only on remote
    /// builders.
    pub max_jobs: usize,
    /// `NIX_BUILD_CORES`.
    pub cores: usize,
    pub timeout: Option<Duration>,
    pub max_silent: Option<Duration>,
    /// `max-build-log-size`: bytes of log a build may write before it is killed.
    pub max_log_size: Option<u64>,
    /// `sandbox-paths`.
    pub sandbox_paths: Vec<crate::sandbox::SandboxPath>,
    /// Where build directories are created.
    pub build_dir: PathBuf,
    /// When the daemon runs as root, builds run as host uids (and gids) `base`, `base + 1`, …
    /// (one per concurrent build). Otherwise as the daemon's own user, mapped.
    pub build_uid_base: u32,
    /// The executable started as the sandbox helper (cairnd or cairn itself).
    pub helper: PathBuf,
    pub logs: LogStore,
    /// `build-max-processes` and `sandbox-dev-shm-size`.
    pub limits: SandboxLimits,
    /// `build-max-output-size`: the largest NAR an output may have.
    pub max_output_size: Option<u64>,
    /// `system`, `extra-platforms`, `system-features`: what this machine builds.
    pub host: Host,
    /// Downloads of `builtin:fetchurl`.
    pub fetch: FetchSettings,
    /// `post-build-hook`: run after each derivation built here ([`hook`]).
    pub post_build_hook: Option<PathBuf>,
    /// Added to the hook's environment: `NIX_REMOTE` naming this daemon and `NIX_STORE_DIR`
    /// its store directory, so that the Nix commands a hook runs (`nix copy --to … $OUT_PATHS`)
    /// see this store, as a hook run by nix-daemon sees nix-daemon's.
    pub hook_env: Vec<(String, String)>,
    /// `secret-key-files`: what is built here is registered signed with these keys, as Nix
    /// signs its builds (`signPathInfo`), so that it can be copied to stores that require
    /// signatures.
    pub signing_keys: Vec<cairn_nix::signing::SecretKey>,
}

/// One derivation to realise, with the outputs wanted (all if `None`).
#[derive(Debug, Clone)]
pub struct Goal {
    pub drv: StorePath,
    pub outputs: Option<BTreeSet<String>>,
}

/// Per-request options.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Go on with other builds after one fails.
    pub keep_going: bool,
    /// Keep the build directory of a failed build.
    pub keep_failed: bool,
    /// The requesting client's values of variables that fixed-output derivations name in
    /// `impureEnvVars` (a variable it did not send falls back to the daemon's environment).
    pub impure_env: Arc<BTreeMap<String, String>>,
    /// Normal, `--check` or `--repair`.
    pub mode: Mode,
    /// What the client asked to tighten (Nix's `SetOptions`); unset fields keep the daemon's.
    pub limits: RequestLimits,
    /// Derivations a trusted client sent rather than named (Nix's `BuildDerivation`): built
    /// as given, with the outputs they declare, whether or not they are in the store.
    pub given: Arc<BTreeMap<StorePath, Arc<Derivation>>>,
    /// The remote builders this request may use instead of the daemon's (a trusted client's
    /// `--builders`); `None`: the daemon's.
    pub builders: Option<Arc<Vec<Arc<Remote>>>>,
    /// The `post-build-hook` of this request instead of the daemon's (a trusted client's;
    /// empty: none).
    pub post_build_hook: Option<PathBuf>,
    /// The `sandbox-paths` of this request's builds instead of the daemon's (a trusted
    /// client's `sandbox-paths` and `extra-sandbox-paths`).
    pub sandbox_paths: Option<Arc<Vec<crate::sandbox::SandboxPath>>>,
    /// Derivations whose outputs are substituted once more just before they would be built.
    pub resubstitute: Option<Resubstitution>,
}

/// Substitutes paths again (closures included), telling `announce` of each path whose download
/// starts (as the cache names it, and the cache's URL).
pub trait Resubstitute: Send + Sync {
    fn substitute(
        &self,
        paths: Vec<StorePath>,
        announce: Box<dyn Fn(String, String) + Send + Sync>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// Nix's retry of a substitute whose closure a cache had only part of: the derivations `drvs`
/// are built only if, once their inputs are realised (the missing part among them), their
/// outputs still cannot be substituted `with`.
#[derive(Clone)]
pub struct Resubstitution {
    pub drvs: Arc<BTreeSet<StorePath>>,
    pub with: Arc<dyn Resubstitute>,
}

impl std::fmt::Debug for Resubstitution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resubstitution").field("drvs", &self.drvs).finish_non_exhaustive()
    }
}

/// A request's own limits. A client may tighten the daemon's limits but not loosen them: a
/// timeout or silence limit applies when it is shorter than the daemon's (or the daemon has
/// none), and `max_jobs` caps this request's builds below the daemon's `max-jobs`. `cores` is
/// what the builds see as `NIX_BUILD_CORES`, a hint that limits nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestLimits {
    pub max_jobs: Option<usize>,
    pub timeout: Option<Duration>,
    pub max_silent: Option<Duration>,
    pub cores: Option<usize>,
    pub max_log_size: Option<u64>,
}

impl RequestLimits {
    /// The smaller of two optional limits, `None` meaning none.
    fn tighter<T: Ord>(daemon: Option<T>, request: Option<T>) -> Option<T> {
        match (daemon, request) {
            (Some(d), Some(r)) => Some(d.min(r)),
            (d, r) => d.or(r),
        }
    }
}

/// What a realisation reports while it runs.
#[derive(Debug, Clone)]
pub enum Event {
    /// The derivations to build, before any starts.
    Plan {
        drvs: Vec<StorePath>,
    },
    /// A path is being substituted instead of built ([`Resubstitution`]): as the cache names
    /// it, and the cache's URL.
    Substituting {
        path: String,
        from: String,
    },
    /// Another request is building the derivation: this one waits for it (Nix's "waiting for
    /// lock on …"), then takes its outputs or builds what is still missing.
    Waiting {
        drv: StorePath,
        outputs: Vec<StorePath>,
    },
    Started {
        drv: StorePath,
        /// The remote builder it runs on; `None`: this machine.
        machine: Option<String>,
    },
    /// One line of a build's log (without its newline).
    Log {
        drv: StorePath,
        line: Vec<u8>,
    },
    Built {
        drv: StorePath,
        outputs: BTreeMap<String, StorePath>,
    },
    Failed {
        drv: StorePath,
        kind: FailureKind,
        message: String,
    },
}

/// Why a goal was not realised when another's failure stopped the request (no `--keep-going`).
pub const NOT_BUILT: &str = "not built: another build failed (use --keep-going to build everything possible)";

/// A goal's wanted outputs, or why it could not be realised.
pub type GoalResult = Result<BTreeMap<String, StorePath>, String>;

/// The result of each goal.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub results: Vec<(StorePath, GoalResult)>,
    /// Derivations built by this request.
    pub built: Vec<StorePath>,
}

/// A builder that runs in the daemon for derivations whose builder is `builtin:NAME`. It makes
/// and registers every output itself (with the derivation as deriver), as one batch, or
/// nothing; the error is the message to report. It runs on the blocking pool and holds a job
/// slot like any build.
pub trait Builtin: Send + Sync {
    fn build(
        &self,
        drv_path: &StorePath,
        drv: &Derivation,
        outputs: &BTreeMap<String, StorePath>,
        log: &mut dyn FnMut(&[u8]),
    ) -> Result<(), String>;
}

/// Builds derivations into a store. One per daemon.
pub struct Builder {
    builtins: Mutex<HashMap<String, Arc<dyn Builtin>>>,
    store: Arc<LocalStore>,
    settings: BuildSettings,
    /// Job slots, taken by each request's scheduling loop in its plan's order and handed to
    /// the build, so that builds start in a deterministic order (inputs first, then the goals
    /// in the order given) and a stopped request starts nothing more.
    jobs: Arc<Semaphore>,
    /// Host uids free for builds (root daemons only).
    uids: Mutex<Vec<u32>>,
    /// Derivations being built, so that concurrent requests build each once.
    building: Mutex<HashMap<StorePath, Arc<tokio::sync::Mutex<()>>>>,
    counter: AtomicU64,
    /// Remote builders.
    remotes: Arc<Remotes>,
    /// Raised whenever a local or remote slot is given back.
    freed: Arc<Notify>,
    /// Store directories of finished builds' roots, for the next roots to take.
    views: crate::views::Views,
}

mod builtins_build;
mod fetchurl_build;
mod hook;

/// A derivation scheduled in one request.
struct Node {
    drv: Arc<Derivation>,
    outputs: BTreeMap<String, StorePath>,
    /// The outputs wanted of it (`None`: all); all of them are built.
    wanted: Option<BTreeSet<String>>,
    /// Input paths of the sandbox: input sources and the needed outputs of input derivations.
    inputs: Vec<StorePath>,
    /// Input derivations that must be built first.
    deps: Vec<StorePath>,
    /// What it is built for.
    mode: NodeMode,
}

impl Builder {
    /// A build's time limits: the daemon's, tightened by the request's.
    pub(crate) fn run_limits(&self, options: &Options) -> RunLimits {
        RunLimits {
            timeout: RequestLimits::tighter(self.settings.timeout, options.limits.timeout),
            max_silent: RequestLimits::tighter(self.settings.max_silent, options.limits.max_silent),
            max_log_size: RequestLimits::tighter(self.settings.max_log_size, options.limits.max_log_size),
        }
    }

    pub fn new(store: Arc<LocalStore>, settings: BuildSettings) -> Builder {
        let jobs = settings.max_jobs.max(1);
        // Never uid 0 or the daemon's own: a builder that owned the store's files could change
        // them through the links its root holds (Nix refuses a build user that is its own uid).
        let me = nix::unistd::geteuid().as_raw();
        let uids: Vec<u32> = (0..jobs as u32)
            .rev()
            .filter_map(|i| settings.build_uid_base.checked_add(i))
            .filter(|&u| u != 0 && u != me)
            .collect();
        if me == 0 && uids.len() < jobs {
            tracing::warn!(
                base = settings.build_uid_base,
                "build-uid-base gives {} usable build uids for max-jobs {jobs} (uid 0 and the daemon's own are never used)",
                uids.len()
            );
        }
        let views = crate::views::Views::new(&settings.build_dir);
        Builder {
            builtins: Mutex::new(HashMap::new()),
            store,
            settings,
            views,
            jobs: Arc::new(Semaphore::new(jobs)),
            uids: Mutex::new(uids),
            building: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
            remotes: Arc::new(Remotes::none()),
            freed: Arc::new(Notify::new()),
        }
    }

    /// The same builder, sending builds to `remotes` too.
    pub fn with_remotes(mut self, remotes: Arc<Remotes>) -> Builder {
        self.remotes = remotes;
        self
    }

    pub fn remotes(&self) -> &Arc<Remotes> {
        &self.remotes
    }

    /// The remote builders a request may use.
    fn machines(&self, options: &Options) -> Arc<Vec<Arc<Remote>>> {
        match &options.builders {
            Some(b) => b.clone(),
            None => Arc::new(self.remotes.configured().to_vec()),
        }
    }

    /// The daemon's `sandbox-paths`.
    pub fn sandbox_paths(&self) -> &[crate::sandbox::SandboxPath] {
        &self.settings.sandbox_paths
    }

    pub fn logs(&self) -> &LogStore {
        &self.settings.logs
    }

    /// Registers the builder of `builtin:NAME` derivations.
    pub fn add_builtin(&self, name: &str, b: Arc<dyn Builtin>) {
        self.builtins.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(format!("builtin:{name}"), b);
    }

    /// Realises `goals`; `events` gets progress and log lines. Errors are for requests that
    /// cannot start (a goal that is not a valid derivation, a wrong output path); a failed build
    /// is reported in the outcome.
    pub async fn realise(
        self: &Arc<Self>,
        goals: Vec<Goal>,
        options: Options,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<Outcome, BuildError> {
        let this = self.clone();
        let goals2 = goals.clone();
        let mode = options.mode;
        let given = options.given.clone();
        let (nodes, order) = tokio::task::spawn_blocking(move || this.plan(&goals2, mode, &given))
            .await
            .map_err(|e| BuildError::Internal(e.to_string()))??;
        let _ = events.send(Event::Plan { drvs: order.clone() });

        let mut remaining: HashMap<StorePath, usize> = HashMap::new();
        let mut dependents: HashMap<StorePath, Vec<StorePath>> = HashMap::new();
        for p in &order {
            let n = &nodes[p];
            remaining.insert(p.clone(), n.deps.len());
            for d in &n.deps {
                dependents.entry(d.clone()).or_default().push(p.clone());
            }
        }
        let nodes = Arc::new(nodes);
        let mut failed: HashMap<StorePath, String> = HashMap::new();
        let mut built = Vec::new();
        // Those whose outputs are valid now, built by this request or not.
        let mut finished: std::collections::HashSet<StorePath> = std::collections::HashSet::new();
        let mut stopped = false;
        // Raised when the request stops: builds waiting to start give up, running ones are killed.
        let (cancel, cancelled) = watch::channel(false);
        let mut set = Builds(tokio::task::JoinSet::new());
        let machines = self.machines(&options);
        let spawn = |set: &mut tokio::task::JoinSet<_>, p: StorePath, slot: Result<Slot, String>| {
            let this = self.clone();
            let nodes = nodes.clone();
            let events = events.clone();
            let options = options.clone();
            let cancelled = cancelled.clone();
            set.spawn(async move {
                let r = match slot {
                    Ok(slot) => this.build(&p, &nodes[&p], &options, &events, cancelled, slot).await,
                    Err(why) => Err(Stop::Failed(why.into())),
                };
                // As Nix: the hook runs once the outputs are registered; its failure is the build's.
                let hook = options.post_build_hook.as_ref().or(this.settings.post_build_hook.as_ref());
                let hook = hook.filter(|h| !h.as_os_str().is_empty());
                // (Not for outputs found valid: they were not built by this request.)
                let r = match (r, hook) {
                    (Ok((outputs, true)), Some(hook)) if nodes[&p].mode != NodeMode::Check => {
                        hook::run(hook, &this.settings.hook_env, &this.store, &p, &outputs, &events)
                            .await
                            .map(|()| (outputs, true))
                            .map_err(|m| Stop::Failed(m.into()))
                    }
                    (r, _) => r,
                };
                (p, r)
            });
        };
        // The client's own cap on parallel builds, within the daemon's.
        let request_jobs = options.limits.max_jobs.filter(|&n| n > 0).unwrap_or(usize::MAX);
        // A request that asks for max-jobs 0 builds nothing here (only on remote builders).
        let local = options.limits.max_jobs != Some(0);
        // Ready builds, each started when it gets a job slot, in Nix's order: by the derivation's
        // name, then its path (its worker's goal keys) — which decides what is built before a
        // failure stops the rest.
        let dir = self.store.store_dir().clone();
        let key = |p: &StorePath| format!("b${}${}", p.name(), dir.display(p));
        let mut ready: BTreeMap<String, StorePath> =
            order.iter().filter(|p| remaining[*p] == 0).map(|p| (key(p), p.clone())).collect();
        loop {
            let joined = tokio::select! {
                biased;
                joined = set.join_next(), if !set.is_empty() => joined,
                slot = self.slot_for(ready.first_key_value().and_then(|(_, p)| nodes.get(p).map(|n| (p, n))), &machines, local), if !ready.is_empty() && !stopped && set.len() < request_jobs => {
                    if let Some((_, p)) = ready.pop_first() {
                        spawn(&mut set, p, slot);
                    }
                    continue;
                }
                else => break,
            };
            let Some(joined) = joined else { continue };
            let (p, r) = joined.map_err(|e| BuildError::Internal(e.to_string()))?;
            match r {
                Ok((outputs, ran)) => {
                    if ran {
                        built.push(p.clone());
                    }
                    finished.insert(p.clone());
                    let _ = events.send(Event::Built { drv: p.clone(), outputs });
                    for d in dependents.get(&p).into_iter().flatten() {
                        let Some(left) = remaining.get_mut(d) else { continue };
                        *left = left.saturating_sub(1);
                        if *left == 0 && !failed.contains_key(d) {
                            ready.insert(key(d), d.clone());
                        }
                    }
                }
                // Stopped because another build failed: that one is the failure to report.
                Err(Stop::Cancelled) => {}
                Err(Stop::Failed(Failure { kind, message })) => {
                    let _ = events.send(Event::Failed { drv: p.clone(), kind, message: message.clone() });
                    failed.insert(p.clone(), message);
                    if !options.keep_going && !stopped {
                        stopped = true;
                        let _ = cancel.send(true);
                    }
                    // Everything that needs it fails too.
                    let mut queue: Vec<StorePath> = dependents.get(&p).cloned().unwrap_or_default();
                    while let Some(d) = queue.pop() {
                        if failed.contains_key(&d) {
                            continue;
                        }
                        // In Nix's words: how many of its own inputs failed.
                        let n = nodes
                            .get(&d)
                            .map_or(1, |n| n.deps.iter().filter(|x| failed.contains_key(*x)).count().max(1));
                        let shown = self.store.store_dir().display(&d);
                        failed.insert(d.clone(), format!("{n} dependencies of derivation '{shown}' failed to build"));
                        queue.extend(dependents.get(&d).cloned().unwrap_or_default());
                    }
                }
            }
        }

        let mut results = Vec::new();
        for g in &goals {
            let r = match failed.get(&g.drv) {
                Some(m) => Err(m.clone()),
                None if stopped && nodes.contains_key(&g.drv) && !finished.contains(&g.drv) => {
                    Err(NOT_BUILT.to_owned())
                }
                None => self.wanted_outputs(g, &nodes, &options.given).await,
            };
            results.push((g.drv.clone(), r));
        }
        // Builds registered their outputs without waiting for the disk: one flush for all of
        // them (their contents, then their registrations) before the client hears the outcome.
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.flush_registrations())
            .await
            .map_err(|e| BuildError::Internal(e.to_string()))??;
        Ok(Outcome { results, built })
    }

    /// The wanted outputs of a goal, which must be valid now.
    async fn wanted_outputs(
        self: &Arc<Self>,
        g: &Goal,
        nodes: &HashMap<StorePath, Node>,
        given: &BTreeMap<StorePath, Arc<Derivation>>,
    ) -> Result<BTreeMap<String, StorePath>, String> {
        let all = match nodes.get(&g.drv) {
            Some(n) => n.outputs.clone(),
            None => {
                let this = self.clone();
                let drv = g.drv.clone();
                let given = given.get(&drv).cloned();
                tokio::task::spawn_blocking(move || {
                    let mut drvs = Derivations::new(&this.store);
                    if let Some(d) = given {
                        drvs.give(&drv, d)?;
                    }
                    drvs.outputs(&drv)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?
            }
        };
        let dir = self.store.store_dir();
        let mut out = BTreeMap::new();
        for (name, p) in all {
            if g.outputs.as_ref().is_some_and(|w| !w.contains(&name)) {
                continue;
            }
            if !self.store.is_valid(&p).map_err(|e| e.to_string())? {
                return Err(format!("output '{name}' ({}) is not valid", dir.display(&p)));
            }
            out.insert(name, p);
        }
        Ok(out)
    }

    /// The derivations to build for `goals`, each with its inputs, in an order where inputs
    /// come first, and what each is built for under `mode` (see [`modes`]).
    fn plan(
        &self,
        goals: &[Goal],
        mode: Mode,
        given: &BTreeMap<StorePath, Arc<Derivation>>,
    ) -> Result<(HashMap<StorePath, Node>, Vec<StorePath>), BuildError> {
        let dir = self.store.store_dir();
        let mut drvs = Derivations::new(&self.store);
        for (p, d) in given {
            drvs.give(p, d.clone())?;
        }
        for g in goals {
            let d = drvs.load(&g.drv)?;
            for o in g.outputs.iter().flatten() {
                if !d.outputs.contains_key(o) {
                    return Err(BuildError::UnknownOutput { drv: dir.display(&g.drv), output: o.clone() });
                }
            }
        }
        // Check applies to the requested derivations only (their inputs are realised normally).
        let checked: HashMap<&StorePath, Option<&BTreeSet<String>>> = if mode == Mode::Check {
            goals.iter().map(|g| (&g.drv, g.outputs.as_ref())).collect()
        } else {
            HashMap::new()
        };
        let mut contents = ContentsCheck::new(&self.store);
        let mut nodes: HashMap<StorePath, Node> = HashMap::new();
        let mut needed: HashMap<StorePath, bool> = HashMap::new();
        let mut order = Vec::new();
        // The outputs wanted of each derivation (`None`: all): a goal's, and what the derivations
        // that need it use of it. As Nix's goals, a derivation whose wanted outputs are valid is
        // not built, whatever its other outputs are.
        let mut wanted: HashMap<StorePath, Option<BTreeSet<String>>> = HashMap::new();
        for g in goals {
            want(&mut wanted, &g.drv, g.outputs.as_ref().map(|o| o.iter().cloned().collect()));
        }
        // Post-order walk; a derivation needs building if one of its wanted outputs is not valid
        // (or, when repairing, one of its outputs is not valid or not good), or if it is checked.
        let mut stack: Vec<(StorePath, bool)> = goals.iter().rev().map(|g| (g.drv.clone(), false)).collect();
        while let Some((p, inputs_done)) = stack.pop() {
            if needed.contains_key(&p) {
                continue;
            }
            let drv = drvs.load(&p)?;
            let outputs = drvs.outputs(&p)?;
            let node_mode = if let Some(wanted) = checked.get(&p) {
                if !modes::checkable(&self.store, &outputs, *wanted)? {
                    return Err(BuildError::NotCheckable { drv: dir.display(&p) });
                }
                Some(NodeMode::Check)
            } else if mode == Mode::Repair {
                let mut corrupt = BTreeSet::new();
                let mut missing = false;
                for o in outputs.values() {
                    if !self.store.is_valid(o)? {
                        missing = true;
                    } else if !contents.good(o)? {
                        corrupt.insert(o.clone());
                    }
                }
                (missing || !corrupt.is_empty()).then_some(NodeMode::Repair { corrupt })
            } else {
                let want = wanted.get(&p).cloned().flatten();
                let mut missing = false;
                for (name, o) in &outputs {
                    if want.as_ref().is_none_or(|w| w.contains(name)) && !self.store.is_valid(o)? {
                        missing = true;
                        break;
                    }
                }
                missing.then_some(NodeMode::Build)
            };
            let Some(node_mode) = node_mode else {
                needed.insert(p.clone(), false);
                if mode == Mode::Repair {
                    // Good outputs: the rest of their closure is checked instead, and a bad path
                    // there is rebuilt by its deriver (Nix's `repairClosure`).
                    for deriver in self.closure_repairs(&p, &outputs, &mut drvs, &mut contents)? {
                        stack.push((deriver, false));
                    }
                }
                continue;
            };
            let inputs = drvs.inputs(&drv)?;
            if !inputs_done {
                stack.push((p.clone(), true));
                for (ip, outs) in &inputs {
                    // An input found not to need building for what others wanted of it is looked
                    // at again if this one wants more of it.
                    if want(&mut wanted, ip, Some(outs.iter().cloned().collect())) && needed.get(ip) == Some(&false) {
                        needed.remove(ip);
                    }
                    if !needed.contains_key(ip) {
                        stack.push((ip.clone(), false));
                    }
                }
                continue;
            }
            let mut input_paths = Vec::new();
            let mut deps = Vec::new();
            for (ip, outs) in &inputs {
                let ip_outputs = drvs.outputs(ip)?;
                for o in outs {
                    let path = ip_outputs
                        .get(o)
                        .ok_or_else(|| BuildError::UnknownOutput { drv: dir.display(ip), output: o.clone() })?;
                    input_paths.push(path.clone());
                }
                if needed.get(ip).copied().unwrap_or(false) {
                    deps.push(ip.clone());
                }
            }
            for src in &drv.input_srcs {
                let sp = dir
                    .parse(src)
                    .map_err(|e| BuildError::BadDerivation { path: dir.display(&p), source: e.into() })?;
                if !self.store.is_valid(&sp)? {
                    return Err(BuildError::InputNotValid { drv: dir.display(&p), path: src.clone() });
                }
                input_paths.push(sp);
            }
            needed.insert(p.clone(), true);
            order.push(p.clone());
            let wanted = wanted.get(&p).cloned().flatten();
            nodes.insert(p, Node { drv, outputs, wanted, inputs: input_paths, deps, mode: node_mode });
        }
        Ok((nodes, order))
    }

    /// The derivations to rebuild (in repair mode) for the bad paths in the output closure of
    /// `drv`, whose own outputs are good: each bad path's maker among the derivations of `drv`'s
    /// own closure. A bad path that none of them makes cannot be repaired by building.
    fn closure_repairs(
        &self,
        drv: &StorePath,
        outputs: &BTreeMap<String, StorePath>,
        drvs: &mut Derivations,
        contents: &mut ContentsCheck,
    ) -> Result<Vec<StorePath>, BuildError> {
        let dir = self.store.store_dir();
        let own: Vec<StorePath> = outputs.values().cloned().collect();
        let closure = self.store.walk(&own, Direction::References)?;
        let mut bad = Vec::new();
        for p in closure.iter().filter(|p| !own.contains(p)) {
            if !contents.good(p)? {
                tracing::warn!(
                    "found corrupted or missing path '{}' in the output closure of '{}'",
                    dir.display(p),
                    dir.display(drv)
                );
                bad.push(p.clone());
            }
        }
        if bad.is_empty() {
            return Ok(Vec::new());
        }
        let mut makers: HashMap<StorePath, StorePath> = HashMap::new();
        for d in self.store.walk(std::slice::from_ref(drv), Direction::References)? {
            if d.name().ends_with(".drv") {
                for o in drvs.outputs(&d)?.into_values() {
                    makers.insert(o, d.clone());
                }
            }
        }
        let mut derivers = Vec::new();
        for p in bad {
            match makers.get(&p) {
                Some(d) => derivers.push(d.clone()),
                None => return Err(BuildError::Unrepairable { drv: dir.display(drv), path: dir.display(&p) }),
            }
        }
        Ok(derivers)
    }

    /// Builds one derivation whose inputs are valid; the error is the failure to report, or
    /// that the request stopped (`cancelled` raised) before or while it ran. True with the
    /// outputs: built by this request; false: found valid (another request built them while
    /// this one waited for it, or a cache had them), as Nix's "already valid".
    async fn build(
        self: &Arc<Self>,
        drv_path: &StorePath,
        node: &Node,
        options: &Options,
        events: &mpsc::UnboundedSender<Event>,
        mut cancelled: watch::Receiver<bool>,
        slot: Slot,
    ) -> Result<(BTreeMap<String, StorePath>, bool), Stop> {
        let store = &self.store;
        let once = {
            let mut b = self.building.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            b.entry(drv_path.clone()).or_default().clone()
        };
        let _once = match once.clone().try_lock_owned() {
            Ok(held) => held,
            Err(_) => {
                let outputs = node.outputs.values().cloned().collect();
                let _ = events.send(Event::Waiting { drv: drv_path.clone(), outputs });
                unless_cancelled(&mut cancelled, once.lock_owned()).await?
            }
        };
        if node.mode == NodeMode::Build {
            let all_valid = node.outputs.values().try_fold(true, |acc, p| store.is_valid(p).map(|v| acc && v));
            if all_valid.map_err(|e| e.to_string())? {
                return Ok((node.outputs.clone(), false));
            }
            if let Some(r) = options.resubstitute.as_ref().filter(|r| r.drvs.contains(drv_path)) {
                let wanted: Vec<StorePath> =
                    crate::derivations::missing_wanted(store, &node.outputs, node.wanted.as_ref())
                        .into_iter()
                        .cloned()
                        .collect();
                let events = events.clone();
                let announce = Box::new(move |path, from| {
                    let _ = events.send(Event::Substituting { path, from });
                });
                unless_cancelled(&mut cancelled, r.with.substitute(wanted.clone(), announce)).await?;
                if wanted.iter().all(|p| store.is_valid(p).unwrap_or(false)) {
                    return Ok((node.outputs.clone(), false));
                }
            }
        }
        self.build_held(drv_path, node, options, events, cancelled, slot).await.map(|outputs| (outputs, true))
    }

    /// [`Self::build`] once the derivation is this request's to build (its lock held, its
    /// outputs not all valid).
    async fn build_held(
        self: &Arc<Self>,
        drv_path: &StorePath,
        node: &Node,
        options: &Options,
        events: &mpsc::UnboundedSender<Event>,
        mut cancelled: watch::Receiver<bool>,
        slot: Slot,
    ) -> Result<BTreeMap<String, StorePath>, Stop> {
        let store = &self.store;
        let dir = store.store_dir().clone();
        let shown = dir.display(drv_path);
        // On a remote builder while one takes it; a builder that fails the build's trust
        // (unreachable, broken session, outputs not as claimed) is marked down and another
        // slot is taken, possibly here.
        let mut slot = slot;
        let _local = loop {
            match slot {
                Slot::Local(l) => break l,
                Slot::Remote(r) => {
                    if let Some(done) = self.build_remote(drv_path, node, options, events, &mut cancelled, &r).await {
                        return done;
                    }
                    drop(r);
                    slot = unless_cancelled(
                        &mut cancelled,
                        self.slot_for(
                            Some((drv_path, node)),
                            &self.machines(options),
                            options.limits.max_jobs != Some(0),
                        ),
                    )
                    .await?
                    .map_err(Failure::from)?;
                }
            }
        };
        // As Nix's startBuilder: only a derivation that must be built needs the right machine.
        self.settings.host.check(&node.drv, &shown).map_err(|e| e.to_string())?;
        let impure = Attrs::new(&node.drv, &shown)
            .and_then(|a| a.impure_env_vars())
            .map(|names| impure_values(&names, &options.impure_env))
            .map_err(|e| e.to_string())?;
        if node.drv.builder == FETCHURL && !self.has_builtin(FETCHURL) {
            return Ok(self.build_fetchurl(drv_path, node, &impure, options, events).await?);
        }
        let in_daemon = match node.drv.builder.as_str() {
            b @ (crate::buildenv::BUILDENV | crate::unpack_channel::UNPACK_CHANNEL) => !self.has_builtin(b),
            _ => false,
        };
        if in_daemon {
            if node.mode != NodeMode::Build {
                return Err(format!(
                    "cannot check or repair '{shown}': builder '{}' runs in the daemon",
                    node.drv.builder
                )
                .into());
            }
            return Ok(if node.drv.builder == crate::buildenv::BUILDENV {
                self.build_buildenv(drv_path, node, options, events).await?
            } else {
                self.build_unpack_channel(drv_path, node, options, events).await?
            });
        }
        // Builds are always sandboxed here, as Nix's are with `sandbox = true`.
        if node.drv.env.get("__noChroot").is_some_and(|v| v == "1") {
            return Err(format!(
                "derivation '{shown}' has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'"
            )
            .into());
        }
        if node.drv.builder.starts_with("builtin:") {
            if node.mode != NodeMode::Build {
                return Err(format!(
                    "cannot check or repair '{shown}': builder '{}' runs in the daemon",
                    node.drv.builder
                )
                .into());
            }
            return Ok(self.build_builtin(drv_path, node, events).await?);
        }
        let uid_slot = UidSlot::take(self);
        if nix::unistd::geteuid().is_root() && uid_slot.uid.is_none() {
            return Err(
                "no build uid is free (more builds than max-jobs, or a build-uid-base range that holds uid 0?)"
                    .to_owned()
                    .into(),
            );
        }

        let this = self.clone();
        let inputs = node.inputs.clone();
        let outputs = node.outputs.clone();
        let drv = node.drv.clone();
        let top = self.new_top(drv_path);
        let host_ids = uid_slot.ids();
        let t0 = std::time::Instant::now();
        let cores = options.limits.cores.unwrap_or(self.settings.cores);
        let paths = options.sandbox_paths.clone();
        let prepared = {
            let top = top.clone();
            tokio::task::spawn_blocking(move || {
                let paths = paths.as_deref().map_or(&this.settings.sandbox_paths[..], |p| &p[..]);
                this.prepare(&drv, &inputs, &outputs, &top, host_ids, &impure, cores, paths)
            })
            .await
            .map_err(|e| e.to_string())?
        };
        let (spec, closure, roots, placed) = match prepared {
            Ok(v) => v,
            Err(e) => {
                let _ = crate::root::remove(&top);
                return Err(format!("cannot build '{shown}': {e}").into());
            }
        };
        let _ = events.send(Event::Started { drv: drv_path.clone(), machine: None });
        let mut log = self.settings.logs.writer(drv_path);
        let mut tail: VecDeque<String> = VecDeque::new();
        let limits = self.run_limits(options);
        let (uid, gid) = host_ids.unwrap_or_else(|| (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw()));
        let t1 = t0.elapsed();
        // Dropping the run (when the request stops) kills the helper, and with it the sandbox's
        // PID 1 (its parent-death signal) and every process of the build.
        let ended = unless_cancelled(
            &mut cancelled,
            run(&self.settings.helper, &spec, uid, gid, limits, |line, newline| {
                // The log keeps the bytes, as written; what is shown is the line as a terminal
                // shows it.
                let _ = log.part(line, newline);
                let shown = overstrike(line);
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(String::from_utf8_lossy(&shown).into_owned());
                let _ = events.send(Event::Log { drv: drv_path.clone(), line: shown });
            }),
        )
        .await;
        // Put in place while the outputs are registered, and before the build's end is told.
        let log_kept = tokio::task::spawn_blocking(move || log.finish());
        drop(uid_slot);
        // Nix counts a failed fixed-output builder as a transient failure (exit code 1).
        let builder_failed =
            if node.drv.fixed_output().ok().flatten().is_some() { FailureKind::Other } else { FailureKind::Permanent };
        let in_memory = options.given.contains_key(drv_path);
        let failure = match ended {
            Err(stop) => Some(stop),
            Ok(Err(e)) => Some(format!("cannot run the builder of '{shown}': {e}").into()),
            Ok(Ok(RunEnd::Exited(0))) => None,
            Ok(Ok(RunEnd::Exited(code))) => {
                let mut m = format!("builder for '{shown}' failed with exit code {code}");
                if let Some(h) = hint(&self.settings.limits, tail.iter().map(String::as_str)) {
                    m.push_str(&format!(" ({h})"));
                }
                Some(Failure::new(builder_failed, with_tail(m, &tail)).into())
            }
            Ok(Ok(RunEnd::SetupFailed(e))) => Some(format!("cannot set up the sandbox for '{shown}': {e}").into()),
            // In Nix's words, which name the goal as `building of 'DRV!OUTPUTS' from .drv file`.
            Ok(Ok(RunEnd::TimedOut(t))) => Some(
                Failure::new(
                    FailureKind::TimedOut,
                    format!("{} timed out after {} seconds", goal_name(&shown, node, in_memory), t.as_secs()),
                )
                .into(),
            ),
            Ok(Ok(RunEnd::Silent(t))) => Some(
                Failure::new(
                    FailureKind::TimedOut,
                    format!(
                        "{} timed out after {} seconds of silence",
                        goal_name(&shown, node, in_memory),
                        t.as_secs()
                    ),
                )
                .into(),
            ),
            Ok(Ok(RunEnd::LogLimit(n))) => Some(
                Failure::new(
                    FailureKind::LogLimit,
                    format!(
                        "{} killed after writing more than {n} bytes of log output",
                        goal_name(&shown, node, in_memory)
                    ),
                )
                .into(),
            ),
        };
        let t2 = t0.elapsed();
        let mut unkept_view = None;
        let result: Result<_, Stop> = match failure {
            Some(stop) => Err(stop),
            None => {
                let this = self.clone();
                let drv_path = drv_path.clone();
                let node_drv = node.drv.clone();
                let outputs = node.outputs.clone();
                let top2 = top.clone();
                let (mode, keep_failed) = (node.mode.clone(), options.keep_failed);
                // A view only where the builder was a build user (see `views`).
                let view = host_ids.map(|(_, gid)| (gid, placed.inputs.clone()));
                let registered = tokio::task::spawn_blocking(move || {
                    let r = this.register(&drv_path, &node_drv, &outputs, &closure, &top2, &mode, keep_failed);
                    let unkept = match (&r, view) {
                        (Ok(_), Some((gid, inputs))) => {
                            let store = this.store.store_dir().as_str();
                            let removals = this.store.removals();
                            this.views.keep(&top2.join("root"), store, inputs, removals, gid).unwrap_or_else(|e| {
                                tracing::debug!("not keeping the store directory of '{}': {e}", top2.display());
                                None
                            })
                        }
                        _ => None,
                    };
                    (r, unkept)
                })
                .await
                .map_err(|e| Failure::from(e.to_string()));
                match registered {
                    Ok((r, unkept)) => {
                        unkept_view = unkept;
                        r.map_err(Stop::Failed)
                    }
                    Err(e) => Err(Stop::Failed(e)),
                }
            }
        };
        if let Err(e) = log_kept.await.map_err(std::io::Error::other).and_then(|kept| kept) {
            tracing::warn!("cannot keep the log of {shown}: {e}");
        }
        tracing::debug!(drv = %shown, prepare = ?t1, run = ?(t2 - t1), register = ?(t0.elapsed() - t2), "build phases");
        // The build directory goes in the background: nothing waits for it (on a slow file
        // system, removing a sandbox root costs as much as the build).
        let keep = matches!(result, Err(Stop::Failed(_))) && options.keep_failed;
        if !keep {
            let top2 = top.clone();
            // The inputs stay rooted while the root holds links to them: a collection
            // meanwhile would count their bytes as freed when they are not. The outputs' roots
            // go with the build (the request roots what it realised for its client), so that a
            // `delete` right after the build does not find them still in use.
            let linked = store.temp_root(node.inputs.iter().cloned());
            drop(roots);
            tokio::task::spawn_blocking(move || {
                for dir in std::iter::once(&top2).chain(unkept_view.as_ref()) {
                    if let Err(e) = crate::root::remove(dir) {
                        tracing::warn!("cannot remove build directory '{}': {e}", dir.display());
                    }
                }
                drop(linked);
            });
        }
        match result {
            Err(Stop::Failed(mut f)) if keep => {
                // Kept for the user: a later daemon's sweep leaves it alone.
                crate::root::forget(&top.join("root"), dir.as_str(), &placed, host_ids.map(|(uid, _)| uid));
                let _ = std::fs::File::create(top.join(crate::root::KEPT));
                crate::root::open_kept(&top);
                f.message.push_str(&format!("\nnote: keeping build directory '{}'", top.join("root/build").display()));
                Err(Stop::Failed(f))
            }
            other => other,
        }
    }

    /// Runs a builtin builder, its log kept and streamed as a sandboxed build's is.
    async fn build_builtin(
        self: &Arc<Self>,
        drv_path: &StorePath,
        node: &Node,
        events: &mpsc::UnboundedSender<Event>,
    ) -> Result<BTreeMap<String, StorePath>, String> {
        let shown = self.store.store_dir().display(drv_path);
        let b = self.builtins.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&node.drv.builder).cloned();
        let Some(b) = b else {
            return Err(format!("cannot build '{shown}': this cairnd has no builder '{}'", node.drv.builder));
        };
        let _ = events.send(Event::Started { drv: drv_path.clone(), machine: None });
        let mut log = self.settings.logs.writer(drv_path);
        let (this, drv_path2, drv, outputs, events2) =
            (self.clone(), drv_path.clone(), node.drv.clone(), node.outputs.clone(), events.clone());
        let ended = tokio::task::spawn_blocking(move || {
            let _roots = this.store.temp_root(outputs.values().cloned());
            let r = b.build(&drv_path2, &drv, &outputs, &mut |line| {
                let _ = log.line(line);
                let _ = events2.send(Event::Log { drv: drv_path2.clone(), line: line.to_vec() });
            });
            if let Err(e) = log.finish() {
                tracing::warn!("cannot keep the log of {}: {e}", this.store.store_dir().display(&drv_path2));
            }
            r
        })
        .await
        .map_err(|e| e.to_string())?;
        ended.map_err(|m| format!("builder for '{shown}' failed: {m}"))?;
        for (name, p) in &node.outputs {
            if !self.store.is_valid(p).map_err(|e| e.to_string())? {
                return Err(format!("builder for '{shown}' did not make output '{name}'"));
            }
        }
        // A builtin registers its outputs itself: signed once they are.
        self.store.sign_paths(node.outputs.values(), &self.settings.signing_keys);
        Ok(node.outputs.clone())
    }

    /// Creates the build directory and the sandbox root; returns the spec, the input closure,
    /// and the temporary roots that keep the closure and the outputs alive.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn prepare(
        &self,
        drv: &Derivation,
        inputs: &[StorePath],
        outputs: &BTreeMap<String, StorePath>,
        top: &Path,
        host_ids: Option<(u32, u32)>,
        impure_env: &[(String, String)],
        cores: usize,
        sandbox_paths: &[crate::sandbox::SandboxPath],
    ) -> Result<
        (crate::sandbox::SandboxSpec, Vec<StorePath>, cairn_store::TempRootGuard, crate::root::Placed),
        BuildError,
    > {
        let roots = self.store.temp_root(inputs.iter().chain(outputs.values()).cloned());
        let closure = self.store.walk(inputs, Direction::References)?;
        let graphs = crate::refgraph::graphs(
            self.store.store_dir(),
            &drv.env,
            crate::structured::parse(&drv.env, "derivation").map_err(crate::sandbox::PlanError::from)?.as_ref(),
            &closure.iter().cloned().collect(),
            &mut crate::refgraph::StoreMeta::new(&self.store),
        )?;
        let root = top.join("root");
        // The store directory of an earlier root, where one holds much of this closure.
        let view = host_ids.and_then(|(_, gid)| {
            let names: Vec<String> = closure.iter().map(StorePath::base_name).collect();
            let wanted: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
            self.views.take(&wanted, self.store.removals(), gid)
        });
        let (skeleton, spec) = plan(&BuildInput {
            store_dir: self.store.store_dir(),
            real_store_dir: &self.store.layout().real_store_dir,
            drv,
            outputs,
            inputs: &closure,
            sandbox_paths,
            cores,
            root: &root,
            limits: self.settings.limits,
            impure_env,
            graphs: &graphs,
            link_inputs: host_ids.is_some() && same_file_system(top, &self.store.layout().real_store_dir),
        })?;
        let io = |source| BuildError::Io { op: "create build directory", path: top.display().to_string(), source };
        std::fs::create_dir(top).map_err(io)?;
        std::fs::set_permissions(top, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(io)?;
        // Files shared between roots only where the builder cannot write to the daemon's files.
        let shared = host_ids.map(|_| crate::root::shared_dir(top.parent().unwrap_or(top)));
        let view = view.map(|v| v.into_kept(self.store.store_dir().as_str()));
        let placed = crate::root::create_from(&root, &skeleton, host_ids, shared.as_deref(), view).map_err(io)?;
        let mut spec = spec;
        spec.bind_only(&placed.bound);
        // The stage the bound inputs come from, only if some are (a chain's inputs are files).
        if !placed.bound.is_empty() {
            std::fs::create_dir(crate::sandbox::input_stage(&root)).map_err(io)?;
        }
        Ok((spec, closure, roots, placed))
    }

    /// Collects, checks and registers the outputs of a successful build — or, for a check,
    /// compares them with the registered ones, and for a repair swaps the good copies in.
    #[allow(clippy::too_many_arguments)]
    fn register(
        &self,
        drv_path: &StorePath,
        drv: &Derivation,
        outputs: &BTreeMap<String, StorePath>,
        closure: &[StorePath],
        top: &Path,
        mode: &NodeMode,
        keep_failed: bool,
    ) -> Result<BTreeMap<String, StorePath>, Failure> {
        let collected = self.collect_outputs(drv_path, drv, outputs, closure, top, mode)?;
        self.commit_outputs(drv_path, drv, outputs, collected, mode, keep_failed, &BTreeMap::new())
    }

    /// Serialises, hashes and scans each output found under `top`, checks it against what the
    /// derivation declares, and refuses outputs that refer to each other in a cycle. Returns
    /// them in an order where an output comes after those it refers to. A fixed output with
    /// another hash is registered at that hash's path unless `mode` only checks.
    fn collect_outputs(
        &self,
        drv_path: &StorePath,
        drv: &Derivation,
        outputs: &BTreeMap<String, StorePath>,
        closure: &[StorePath],
        top: &Path,
        mode: &NodeMode,
    ) -> Result<Vec<(String, String, Collected)>, Failure> {
        let dir = self.store.store_dir();
        let shown = dir.display(drv_path);
        let candidates: BTreeMap<String, StorePath> =
            closure.iter().chain(outputs.values()).map(|p| (p.hash_part().to_owned(), p.clone())).collect();
        let fixed = drv.fixed_output().map_err(|e| e.to_string())?;
        let mut collected = Vec::new();
        for (name, path) in outputs {
            let display = dir.display(path);
            let host = under(&top.join("root"), &display);
            let expect = Expect {
                drv: &shown,
                output: name,
                path,
                display: &display,
                fixed: fixed.clone(),
                max_nar_size: self.settings.max_output_size,
            };
            let c = match collect(&host, &expect, &candidates, top) {
                Ok(c) => c,
                Err(crate::outputs::OutputError::HashMismatch { drv, specified, got, found }) => {
                    if let Some(found) = found.filter(|_| *mode != NodeMode::Check) {
                        self.register_mismatched(drv_path, name, *found);
                    }
                    let e = crate::outputs::OutputError::HashMismatch { drv, specified, got, found: None };
                    return Err(Failure::new(FailureKind::HashMismatch, e.to_string()));
                }
                Err(e) => return Err(Failure::new(FailureKind::Other, e.to_string())),
            };
            collected.push((display.clone(), c));
        }
        // Outputs referring to each other in a cycle cannot be registered (nor, in Nix, sorted):
        // refused first, in Nix's words.
        let by_path: BTreeMap<&StorePath, &String> = outputs.iter().map(|(n, p)| (p, n)).collect();
        let refers: BTreeMap<&str, BTreeSet<String>> = outputs
            .keys()
            .zip(&collected)
            .map(|(name, (_, c))| {
                (name.as_str(), c.references.iter().filter_map(|r| by_path.get(r).map(|n| (*n).clone())).collect())
            })
            .collect();
        let names: BTreeSet<String> = outputs.keys().cloned().collect();
        let sorted = crate::outputs::output_order(&shown, &names, |n| refers.get(n).cloned().unwrap_or_default())
            .map_err(|e| e.to_string())?;
        let mut by_name: BTreeMap<&String, (String, Collected)> = outputs.keys().zip(collected).collect();
        Ok(sorted.iter().filter_map(|n| by_name.remove(n).map(|(display, c)| (n.clone(), display, c))).collect())
    }

    /// A fixed output whose hash is not the one declared is still registered, as Nix registers
    /// it, at the path of the hash it has — so that the derivation, its hash corrected, finds
    /// it valid and is not built again — unless that path is valid already. Its failure to
    /// register is only logged: the build fails with the mismatch either way.
    fn register_mismatched(&self, drv_path: &StorePath, output: &str, found: Collected) {
        let dir = self.store.store_dir();
        let Some(cairn_nix::ContentAddress::Fixed { method, hash }) = &found.ca else { return };
        let path = match dir.make_fixed_output_path(found.path.name(), *method, hash, &BTreeSet::new(), false) {
            Ok(p) => p,
            Err(e) => return tracing::warn!("cannot name the mismatched output '{output}': {e}"),
        };
        if self.store.is_valid(&path).unwrap_or(true) {
            return;
        }
        let info = PathInfo {
            path: path.clone(),
            nar_hash: found.nar_hash,
            nar_size: found.nar_size,
            references: BTreeSet::new(),
            deriver: Some(drv_path.clone()),
            registration_time: 0,
            ultimate: true,
            signatures: BTreeSet::new(),
            ca: found.ca,
        };
        let registered = (|| -> Result<(), String> {
            let reader = found.nar.into_reader().map_err(|e| e.to_string())?;
            let batch = self.store.build_batch().map_err(|e| e.to_string())?;
            batch.add_nar_with_info::<_, StoreError>(info, reader, |_| Ok(())).map_err(|e| e.to_string())?;
            batch.commit().map_err(|e| e.to_string())?;
            Ok(())
        })();
        match registered {
            Ok(()) => tracing::info!(path = %dir.display(&path), "registered a fixed output at the hash it has"),
            Err(e) => tracing::warn!("cannot register the mismatched output '{}': {e}", dir.display(&path)),
        }
    }

    /// Registers collected outputs in one batch (with `signatures` per path: a remote
    /// builder's), after the derivation's reference constraints; or compares them (check), or
    /// swaps good copies in (repair).
    #[allow(clippy::too_many_arguments)]
    fn commit_outputs(
        &self,
        drv_path: &StorePath,
        drv: &Derivation,
        outputs: &BTreeMap<String, StorePath>,
        collected: Vec<(String, String, Collected)>,
        mode: &NodeMode,
        keep_failed: bool,
        signatures: &BTreeMap<StorePath, BTreeSet<String>>,
    ) -> Result<BTreeMap<String, StorePath>, Failure> {
        let dir = self.store.store_dir();
        let shown = dir.display(drv_path);
        if *mode == NodeMode::Check {
            for (_, _, c) in collected {
                self.compare(&shown, c, keep_failed)?;
            }
            return Ok(outputs.clone());
        }
        // Reference constraints, before anything of the build enters the store.
        crate::checks::check_built(&self.store, drv, collected.iter().map(|(n, _, c)| (n, c)), &shown)
            .map_err(|e| e.to_string())?;
        let corrupt = match mode {
            NodeMode::Repair { corrupt } => corrupt.clone(),
            _ => BTreeSet::new(),
        };
        let batch = self.store.build_batch().map_err(|e| e.to_string())?;
        // Registered signed with `secret-key-files`, in the same transaction.
        let keys = &self.settings.signing_keys;
        let sign = |info: &mut PathInfo| {
            if keys.is_empty() {
                return;
            }
            match info.signatures_by(dir, keys) {
                Ok(sigs) => info.signatures.extend(sigs),
                Err(e) => tracing::warn!(path = %dir.display(&info.path), "cannot sign a built path: {e}"),
            }
        };
        let repair =
            if corrupt.is_empty() { None } else { Some(self.store.repair_batch().map_err(|e| e.to_string())?) };
        for (_, display, c) in collected {
            let mut info = PathInfo {
                path: c.path.clone(),
                nar_hash: c.nar_hash,
                nar_size: c.nar_size,
                references: c.references,
                deriver: Some(drv_path.clone()),
                registration_time: 0,
                ultimate: true,
                signatures: signatures.get(&c.path).cloned().unwrap_or_default(),
                ca: c.ca,
            };
            sign(&mut info);
            let reader = c.nar.into_reader().map_err(|e| format!("reading output '{display}': {e}"))?;
            match &repair {
                Some(r) if corrupt.contains(&c.path) => {
                    r.add_nar_with_info::<_, StoreError>(info, reader, |_| Ok(())).map_err(|e| match e {
                        StoreError::HashMismatch { expected, actual, .. } => format!(
                            "cannot repair output '{display}' of '{shown}': the rebuilt output has NAR hash \
                             '{actual}', but '{expected}' is registered (the build is not deterministic)"
                        ),
                        e => format!("cannot repair output '{display}': {e}"),
                    })?;
                }
                _ => {
                    batch
                        .add_nar_with_info::<_, StoreError>(info, reader, |_| Ok(()))
                        .map_err(|e| format!("cannot register output '{display}': {e}"))?;
                }
            }
        }
        cairn_fault::point("build-register-mid");
        // Flushed once for the whole request, at its end (see `realise`), and once a second on
        // the way.
        let committed =
            batch.commit_unflushed().map_err(|e| format!("cannot register the outputs of '{shown}': {e}"))?;
        self.store.flush_registrations_if_due().map_err(|e| format!("cannot flush the registrations: {e}"))?;
        if let Some((p, missing)) = committed.incomplete.first() {
            return Err(format!(
                "cannot register '{}': its reference '{}' is not valid",
                dir.display(p),
                dir.display(missing)
            )
            .into());
        }
        if let Some(r) = repair {
            r.commit().map_err(|e| format!("cannot repair the outputs of '{shown}': {e}"))?;
        }
        Ok(outputs.clone())
    }

    /// `--check` of one output: the rebuilt NAR hash must be the registered one. With
    /// `keep_failed`, differing contents are kept as `<output>.check` in the store directory,
    /// as Nix keeps them.
    fn compare(&self, shown_drv: &str, c: crate::outputs::Collected, keep_failed: bool) -> Result<(), Failure> {
        let Some(old) = self.store.path_info(&c.path).map_err(|e| e.to_string())? else {
            return Ok(()); // not valid (an unwanted output): nothing to compare, as in Nix
        };
        if old.nar_hash == c.nar_hash {
            return Ok(());
        }
        let real = self.store.real_path(&c.path);
        let real_shown = real.display().to_string();
        if !keep_failed {
            return Err(modes::not_deterministic(shown_drv, &real_shown, None));
        }
        let mut kept = real.clone().into_os_string();
        kept.push(".check");
        let kept = PathBuf::from(kept);
        let restored = (|| -> Result<(), String> {
            if std::fs::symlink_metadata(&kept).is_ok() {
                cairn_store::remove_tree(&kept).map_err(|e| e.to_string())?;
            }
            let mut reader = c.nar.into_reader().map_err(|e| e.to_string())?;
            let mut nar = cairn_nix::nar::NarReader::new(&mut reader, cairn_nix::nar::Limits::default())
                .map_err(|e| e.to_string())?;
            cairn_store::restore(&mut nar, &kept, cairn_store::RestoreMode::Canonical).map_err(|e| e.to_string())
        })();
        match restored {
            Ok(()) => Err(modes::not_deterministic(shown_drv, &real_shown, Some(&kept.display().to_string()))),
            Err(e) => {
                tracing::warn!("cannot keep '{}': {e}", kept.display());
                Err(modes::not_deterministic(shown_drv, &real_shown, None))
            }
        }
    }
}

impl Drop for Builder {
    /// The roots' shared files go with the builder (another process's sweep takes them if it
    /// is killed; a later build of another builder here makes them again).
    fn drop(&mut self) {
        let _ = crate::root::remove(&crate::root::shared_dir(&self.settings.build_dir));
        self.views.clear();
    }
}

impl Builder {
    /// A new build directory's path for a build of `drv_path` (not created).
    fn new_top(&self, drv_path: &StorePath) -> std::path::PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.settings.build_dir.join(crate::root::top_name(drv_path.name().trim_end_matches(".drv"), n))
    }
}

/// `goals` with one goal per derivation, as Nix's worker keeps one: `drv!out` and `drv!dev`
/// asked together become one goal wanting both (so a failure is reported once). First
/// appearances keep their order.
pub fn merge_goals(goals: Vec<Goal>) -> Vec<Goal> {
    let mut wanted: HashMap<StorePath, Option<BTreeSet<String>>> = HashMap::new();
    let mut order = Vec::new();
    for g in goals {
        if !wanted.contains_key(&g.drv) {
            order.push(g.drv.clone());
        }
        want(&mut wanted, &g.drv, g.outputs);
    }
    order.into_iter().map(|drv| Goal { outputs: wanted.remove(&drv).flatten(), drv }).collect()
}

/// Adds `outputs` (`None`: all) to what is wanted of `drv`; true if that wants more than before.
fn want(
    wanted: &mut HashMap<StorePath, Option<BTreeSet<String>>>,
    drv: &StorePath,
    outputs: Option<BTreeSet<String>>,
) -> bool {
    match (wanted.get_mut(drv), outputs) {
        (None, outputs) => {
            wanted.insert(drv.clone(), outputs);
            true
        }
        (Some(None), _) => false,
        (Some(w @ Some(_)), None) => {
            *w = None;
            true
        }
        (Some(Some(have)), Some(more)) => {
            let before = have.len();
            have.extend(more);
            have.len() > before
        }
    }
}

/// The builds of one request. Dropped with the request (its client went away), they are let go
/// rather than aborted: the request's `cancel` sender goes with it, so each build sees the
/// request stopped and ends as a stopped build does — its sandbox killed, its build directory
/// removed. An aborted task would skip that, and leave the directory behind.
struct Builds<T: 'static>(tokio::task::JoinSet<T>);

impl<T: 'static> Drop for Builds<T> {
    fn drop(&mut self) {
        self.0.detach_all();
    }
}

impl<T: 'static> std::ops::Deref for Builds<T> {
    type Target = tokio::task::JoinSet<T>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<T: 'static> std::ops::DerefMut for Builds<T> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// `f`, unless the request stops first.
async fn unless_cancelled<T>(
    cancelled: &mut watch::Receiver<bool>,
    f: impl std::future::Future<Output = T>,
) -> Result<T, Stop> {
    tokio::select! {
        biased;
        // A closed channel means the request is gone: stop as well.
        _ = cancelled.wait_for(|c| *c) => Err(Stop::Cancelled),
        v = f => Ok(v),
    }
}

/// A build as Nix names its goal in messages: `building of 'DRV!OUT,…' from .drv file`, with
/// the outputs wanted of it.
/// Whether the build directory `top` (not made yet: its parent is asked) is on the file
/// system of `store`, so that a hard link between them can be made.
fn same_file_system(top: &Path, store: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    let parent = top.parent().unwrap_or(top);
    dev(parent).is_some() && dev(parent) == dev(store)
}

/// The goal as Nix names it in its messages: a derivation the client sent (`BuildDerivation`,
/// a remote build) is built "from in-memory derivation", with all its outputs.
fn goal_name(shown: &str, node: &Node, in_memory: bool) -> String {
    let outputs: Vec<&str> = match &node.wanted {
        Some(w) if !in_memory => w.iter().map(String::as_str).collect(),
        _ => node.outputs.keys().map(String::as_str).collect(),
    };
    let from = if in_memory { "in-memory derivation" } else { ".drv file" };
    format!("building of '{shown}!{}' from {from}", outputs.join(","))
}

/// A line as Nix shows a builder's output: a carriage return goes back to the line's start and
/// what follows overwrites it (a progress bar's last state, not all of them run together).
fn overstrike(line: &[u8]) -> Vec<u8> {
    if !line.contains(&b'\r') {
        return line.to_vec();
    }
    let mut out: Vec<u8> = Vec::with_capacity(line.len());
    let mut at = 0;
    for &b in line {
        if b == b'\r' {
            at = 0;
        } else {
            if at < out.len() {
                out[at] = b;
            } else {
                out.push(b);
            }
            at += 1;
        }
    }
    out
}

fn with_tail(mut message: String, tail: &VecDeque<String>) -> String {
    if !tail.is_empty() {
        message.push_str(&format!(";\nlast {} log lines:", tail.len()));
        for l in tail {
            message.push_str("\n> ");
            message.push_str(l);
        }
    }
    message
}

/// A host uid (and gid of the same number) lent to one build, when the daemon is root.
struct UidSlot<'a> {
    builder: &'a Builder,
    uid: Option<u32>,
}

impl<'a> UidSlot<'a> {
    fn take(builder: &'a Builder) -> UidSlot<'a> {
        let uid = if nix::unistd::geteuid().is_root() {
            builder.uids.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop()
        } else {
            None
        };
        UidSlot { builder, uid }
    }

    fn ids(&self) -> Option<(u32, u32)> {
        self.uid.map(|u| (u, u))
    }
}

impl Drop for UidSlot<'_> {
    fn drop(&mut self) {
        if let Some(u) = self.uid.take() {
            self.builder.uids.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{merge_goals, overstrike, Goal};
    use cairn_nix::StorePath;

    #[test]
    fn goals_of_one_derivation_merge_into_one_wanting_all_they_want() {
        let p = |n: &str| StorePath::from_base_name(&format!("{}-{n}.drv", "0".repeat(32))).unwrap();
        let g = |d: &str, o: Option<&[&str]>| Goal {
            drv: p(d),
            outputs: o.map(|o| o.iter().map(|s| (*s).to_owned()).collect()),
        };
        let merged =
            merge_goals(vec![g("a", Some(&["out"])), g("b", None), g("a", Some(&["dev"])), g("b", Some(&["x"]))]);
        assert_eq!(merged.len(), 2);
        assert_eq!(
            (merged[0].drv.clone(), merged[1].drv.clone()),
            (p("a"), p("b")),
            "first appearances keep their order"
        );
        assert_eq!(merged[0].outputs, Some(["dev".to_owned(), "out".to_owned()].into()));
        assert_eq!(merged[1].outputs, None, "all wins");
    }

    #[test]
    fn a_carriage_return_restarts_the_line_as_a_terminal_shows_it() {
        assert_eq!(overstrike(b"cr: abc\rXY"), b"XY: abc");
        assert_eq!(overstrike(b"10%\r20%\r100%"), b"100%");
        assert_eq!(overstrike(b"plain line"), b"plain line");
        assert_eq!(overstrike(b"ends\r"), b"ends");
        assert_eq!(overstrike(b"\r"), b"");
    }
}
