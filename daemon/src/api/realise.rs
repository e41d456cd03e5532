//! Builds: `POST /v1/realise` (events streamed as JSON lines), `GET /v1/log`, and the
//! derivation queries (`add-derivation`, `derivation-outputs`).
//!
//! Outputs that the configured substituters have are substituted rather than built, as Nix
//! does. Any allowed user may build, as with Nix's daemon: a derivation's outputs are determined by the
//! derivation (its output paths are checked against its hash before it builds), and builds run
//! sandboxed as build users, never as the daemon's user.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::Response as HttpResponse;
use axum::{Extension, Json};
use bytes::Bytes;
use cairn_api::config::{state_dir, Settings};
use cairn_api::{ErrorBody, PathQuery, RealiseEvent, RealiseRequest, RealiseResult};
use cairn_build::derivations::missing_wanted;
use cairn_build::requirements::Attrs;
use cairn_build::{BuildSettings, Event, Goal, LogStore, Mode, Options};
use cairn_cache::substitute::Notice;
use cairn_nix::{StoreDir, StorePath};
use cairn_store::ClientScope;
use tokio::sync::mpsc;

use crate::auth::Peer;
use crate::convert::{self, store_path};
use crate::error::{ApiError, ApiResult};
use crate::outbox::{dropped_text, forward, Line};
use crate::state::AppState;

/// The builder's settings from the daemon's.
pub fn build_settings(settings: &Settings) -> anyhow::Result<BuildSettings> {
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    Ok(BuildSettings {
        max_jobs: settings.max_jobs,
        cores: settings.cores,
        timeout: secs(settings.timeout),
        max_silent: secs(settings.max_silent_time),
        max_log_size: (settings.max_build_log_size > 0).then_some(settings.max_build_log_size),
        sandbox_paths: settings.sandbox_paths.iter().map(|e| cairn_build::sandbox::parse_sandbox_path(e)).collect(),
        build_dir: settings.build_dir.clone(),
        build_uid_base: settings.build_uid_base,
        helper: std::env::current_exe()?,
        logs: LogStore::new(state_dir(&settings.root).join("log/drvs")),
        limits: cairn_build::sandbox::SandboxLimits {
            max_processes: (settings.build_max_processes > 0).then_some(settings.build_max_processes),
            dev_shm_size: cairn_build::sandbox::TmpfsSize::parse(&settings.sandbox_dev_shm_size)
                .map_err(|e| anyhow::anyhow!("sandbox-dev-shm-size: {e}"))?,
        },
        max_output_size: (settings.build_max_output_size > 0).then_some(settings.build_max_output_size),
        host: cairn_build::requirements::Host {
            system: settings.system.clone(),
            extra_platforms: match &settings.extra_platforms {
                Some(p) => p.iter().cloned().collect(),
                None => cairn_build::requirements::default_extra_platforms(),
            },
            features: match &settings.system_features {
                Some(f) => f.iter().cloned().collect(),
                None => cairn_build::requirements::default_features(),
            },
        },
        fetch: cairn_build::fetchurl::FetchSettings {
            hashed_mirrors: settings.hashed_mirrors.clone(),
            connect_timeout: secs(settings.connect_timeout),
            stalled_timeout: secs(settings.stalled_download_timeout),
        },
        post_build_hook: settings.post_build_hook.clone(),
        // With the store directory, which a Nix client cannot tell from the URL.
        hook_env: settings
            .nix_daemon_socket
            .iter()
            .flat_map(|socket| {
                [
                    ("NIX_REMOTE".to_owned(), nix_remote(socket, settings)),
                    ("NIX_STORE_DIR".to_owned(), settings.store_dir.clone()),
                ]
            })
            .collect(),
        signing_keys: crate::state::secret_keys(settings)?,
    })
}

/// The `NIX_REMOTE` a Nix client on this machine uses to reach this daemon's Nix socket and see
/// its files (the store under the root, the build logs): see the README's "Where Nix reads the
/// store itself".
///
/// Under another root, the store's real directory is named with `real=`: Nix's `root=` takes the
/// store to be at `ROOT/nix/store` whatever the store directory is.
fn nix_remote(socket: &std::path::Path, settings: &Settings) -> String {
    let log = state_dir(&settings.root).join("log");
    if settings.root == std::path::Path::new("/") {
        format!("unix://{}?log={}", socket.display(), log.display())
    } else {
        let real = settings.root.join(settings.store_dir.trim_start_matches('/'));
        format!("unix://{}?real={}&log={}", socket.display(), real.display(), log.display())
    }
}

/// The machines of a `builders` value (Nix's machines format), `@FILE` includes read here; a
/// missing file adds none, as in Nix.
pub fn machines(spec: &str, settings: &Settings) -> Result<Vec<cairn_nix::machines::Machine>, String> {
    let mut read = |path: &str| match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    };
    cairn_nix::machines::parse(spec, &settings.system, &mut read).map_err(|e| e.to_string())
}

/// The remote builders of the daemon's settings (their SSH files in [`crate::state::ssh_dir`]).
pub fn remotes(settings: &Settings) -> anyhow::Result<cairn_build::remote::Remotes> {
    let configured = machines(&settings.builders, settings).map_err(|e| anyhow::anyhow!("builders: {e}"))?;
    Ok(cairn_build::remote::Remotes::new(configured, crate::state::ssh_dir(), settings.builders_use_substitutes))
}

/// `builders`: every remote builder the daemon knows, with its state.
pub fn builders(st: &AppState) -> Vec<cairn_api::BuilderInfo> {
    st.builder
        .remotes()
        .all()
        .iter()
        .map(|r| {
            let (m, s) = (&r.machine, r.status());
            cairn_api::BuilderInfo {
                uri: m.uri.clone(),
                systems: m.systems.clone(),
                max_jobs: m.max_jobs,
                speed_factor: m.speed_factor,
                supported_features: m.supported_features.iter().cloned().collect(),
                mandatory_features: m.mandatory_features.iter().cloned().collect(),
                state: if s.down_seconds.is_some() { "down" } else { "up" }.to_owned(),
                down_seconds: s.down_seconds,
                running: s.running,
                built: s.built,
                failed: s.failed,
                nars_sent: s.nars_sent,
                bytes_sent: s.bytes_sent,
                nars_received: s.nars_received,
                bytes_received: s.bytes_received,
                last_error: s.last_error,
            }
        })
        .collect()
}

/// `DRV` or `DRV!out1,out2`.
pub(crate) fn goal(dir: &StoreDir, s: &str) -> ApiResult<Goal> {
    let (p, outs) = match s.split_once('!') {
        Some((p, o)) => (p, Some(o)),
        None => (s, None),
    };
    let drv = store_path(dir, p)?;
    let outputs = match outs {
        None | Some("*") => None,
        Some(o) => {
            let set: BTreeSet<String> = o.split(',').filter(|x| !x.is_empty()).map(str::to_owned).collect();
            if set.is_empty() {
                return Err(ApiError::bad_request(format!("'{s}' names no output after '!'")));
            }
            Some(set)
        }
    };
    Ok(Goal { drv, outputs })
}

/// The wire form of a failure's kind.
fn failure_kind(k: cairn_build::FailureKind) -> cairn_api::FailureKind {
    use cairn_build::FailureKind as B;
    match k {
        B::Permanent => cairn_api::FailureKind::Permanent,
        B::TimedOut => cairn_api::FailureKind::TimedOut,
        B::HashMismatch => cairn_api::FailureKind::HashMismatch,
        B::NotDeterministic => cairn_api::FailureKind::NotDeterministic,
        B::LogLimit | B::Other => cairn_api::FailureKind::Other,
    }
}

pub(super) fn line(event: &RealiseEvent) -> Bytes {
    let mut v = serde_json::to_vec(event).expect("events serialise");
    v.push(b'\n');
    v.into()
}

fn outputs_wire(dir: &StoreDir, o: &BTreeMap<String, StorePath>) -> BTreeMap<String, String> {
    o.iter().map(|(k, v)| (k.clone(), dir.display(v))).collect()
}

/// What [`substitute_first`] could not substitute.
#[derive(Debug, Default)]
pub(crate) struct NotSubstituted {
    /// The paths, and why.
    pub failed: Vec<(StorePath, String)>,
    /// Of those, the ones a cache offered (a narinfo that passed the checks).
    pub offered: HashSet<StorePath>,
    /// Of those, the ones no cache could really offer ([`cairn_cache::Report::unavailable`]).
    pub unavailable: HashSet<StorePath>,
    /// Of those, the ones a cache answered for with a narinfo, good or not.
    pub answered: HashSet<StorePath>,
    /// Of those, the ones that came without part of their closure (no cache had it).
    pub incomplete: HashSet<StorePath>,
    /// The derivations an output of which came without part of its closure (no cache had it):
    /// as Nix does, they are substituted again once their inputs are built
    /// ([`cairn_build::realise::Resubstitution`]).
    pub retry: BTreeSet<StorePath>,
}

impl NotSubstituted {
    /// Whether `p` had a substitute that failed for a reason Nix counts as a failure: without
    /// `--fallback`, what needs it is not built.
    pub fn broken(&self, p: &StorePath) -> bool {
        self.offered.contains(p) && !self.unavailable.contains(p)
    }
}

/// Substitutes the goals' missing outputs from `caches`, paths trusted by `policy`, as Nix's
/// goals try before they build; returns what could not be substituted (the caller decides
/// whether those are built).
///
/// As Nix's derivation goals, top down: a derivation whose wanted outputs are valid (or were
/// just substituted, with their closures) needs nothing of its inputs; one whose outputs no
/// cache had is built, so the outputs it uses of its inputs are looked for next — one round a
/// level, each round's lookups and downloads in parallel. Without `fallback`, a derivation
/// whose substitute broke will not be built, so its inputs are not looked for. A fixed output
/// is looked for by its content address too, which a cache of another store directory can
/// serve.
pub(crate) async fn substitute_first(
    st: &Arc<AppState>,
    peer: &Peer,
    goals: &[Goal],
    caches: Vec<Arc<cairn_cache::Substituter>>,
    policy: cairn_cache::Policy,
    announce: Option<cairn_cache::substitute::Announce>,
    fallback: bool,
) -> NotSubstituted {
    let mut not = NotSubstituted::default();
    if caches.is_empty() {
        return not;
    }
    // The outputs of each derivation looked at so far (`None`: all).
    let mut looked: HashMap<StorePath, Option<BTreeSet<String>>> = HashMap::new();
    let mut level: Vec<(StorePath, Option<BTreeSet<String>>)> =
        goals.iter().map(|g| (g.drv.clone(), g.outputs.clone())).collect();
    while !level.is_empty() {
        let fresh: Vec<_> = level.into_iter().filter(|(drv, outs)| widen(&mut looked, drv, outs.as_ref())).collect();
        let st2 = st.clone();
        let this_level = fresh.clone();
        let wanted = tokio::task::spawn_blocking(move || missing_outputs(&st2, &this_level)).await.unwrap_or_default();
        if !wanted.paths.is_empty() {
            let progress = Arc::new(cairn_cache::Progress::default());
            let mut job = st.substitution.job(&st.store, caches.clone(), peer.client, progress, false);
            job.policy = policy.clone();
            job.announce = announce.clone();
            job.content_addresses = wanted.content_addresses.clone();
            match cairn_cache::substitute(job, &wanted.paths).await {
                Ok(r) => {
                    for i in &r.added {
                        tracing::info!(path = %st.store_dir.display(&i.path), "substituted instead of building");
                    }
                    let failed = || r.failed.iter().map(|(p, _)| p);
                    not.offered.extend(failed().filter(|p| r.offered.contains(*p)).cloned());
                    not.unavailable.extend(failed().filter(|p| r.unavailable.contains(*p)).cloned());
                    not.answered.extend(r.answered.iter().cloned());
                    not.retry.extend(r.incomplete.iter().filter_map(|p| wanted.owners.get(p)).cloned());
                    not.incomplete.extend(r.incomplete.iter().cloned());
                    not.failed.extend(r.failed);
                }
                Err(e) => tracing::warn!("substitution before building failed: {e}"),
            }
        }
        // What is still missing is built: the outputs it uses of its inputs are looked for next.
        let skip: HashSet<StorePath> = match fallback {
            true => HashSet::new(),
            false => not.failed.iter().map(|(p, _)| p).filter(|p| not.broken(p)).cloned().collect(),
        };
        let st2 = st.clone();
        level =
            tokio::task::spawn_blocking(move || inputs_of_unsubstituted(&st2, &fresh, &skip)).await.unwrap_or_default();
    }
    not
}

/// What the builder substitutes again before it builds (see [`NotSubstituted::retry`]), from
/// `caches` under `policy`; `None` if nothing is to be.
pub(crate) fn resubstitution(
    st: &Arc<AppState>,
    peer: &Peer,
    caches: Vec<Arc<cairn_cache::Substituter>>,
    policy: cairn_cache::Policy,
    not: &NotSubstituted,
) -> Option<cairn_build::realise::Resubstitution> {
    if not.retry.is_empty() {
        return None;
    }
    let with = Arc::new(Resubstitute { st: st.clone(), client: peer.client, caches, policy });
    Some(cairn_build::realise::Resubstitution { drvs: Arc::new(not.retry.clone()), with })
}

/// Substitutions the builder asks for while it runs.
struct Resubstitute {
    st: Arc<AppState>,
    client: Option<cairn_store::ClientId>,
    caches: Vec<Arc<cairn_cache::Substituter>>,
    policy: cairn_cache::Policy,
}

impl cairn_build::realise::Resubstitute for Resubstitute {
    fn substitute(
        &self,
        paths: Vec<StorePath>,
        announce: Box<dyn Fn(String, String) + Send + Sync>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let progress = Arc::new(cairn_cache::Progress::default());
        let mut job = self.st.substitution.job(&self.st.store, self.caches.clone(), self.client, progress, false);
        job.policy = self.policy.clone();
        let (tx, mut rx) = mpsc::unbounded_channel::<Notice>();
        job.announce = Some(tx);
        Box::pin(async move {
            let told = tokio::spawn(async move {
                while let Some(notice) = rx.recv().await {
                    if let Notice::Copying { path, from } = notice {
                        announce(path, from);
                    }
                }
            });
            if let Err(e) = cairn_cache::substitute(job, &paths).await {
                tracing::warn!("substitution before building failed: {e}");
            }
            let _ = told.await;
        })
    }
}

/// Adds `outs` (`None`: all) to what was looked at of `drv`; true if that is more than before.
fn widen(
    looked: &mut HashMap<StorePath, Option<BTreeSet<String>>>,
    drv: &StorePath,
    outs: Option<&BTreeSet<String>>,
) -> bool {
    match (looked.get_mut(drv), outs) {
        (None, _) => {
            looked.insert(drv.clone(), outs.cloned());
            true
        }
        (Some(None), _) => false,
        (Some(had), None) => {
            *had = None;
            true
        }
        (Some(Some(had)), Some(outs)) => {
            let before = had.len();
            had.extend(outs.iter().cloned());
            had.len() > before
        }
    }
}

/// What to ask the caches for, for one level of derivations.
#[derive(Default)]
struct Wanted {
    /// Their wanted outputs that are not valid, of derivations that allow substitutes.
    paths: Vec<StorePath>,
    /// The content addresses of those that are fixed outputs.
    content_addresses: HashMap<StorePath, cairn_nix::ContentAddress>,
    /// The derivation of each.
    owners: HashMap<StorePath, StorePath>,
}

fn missing_outputs(st: &AppState, level: &[(StorePath, Option<BTreeSet<String>>)]) -> Wanted {
    let mut drvs = cairn_build::derivations::Derivations::new(&st.store);
    let mut wanted = Wanted::default();
    for (drv_path, outs) in level {
        let (Ok(outputs), Ok(drv)) = (drvs.outputs(drv_path), drvs.load(drv_path)) else { continue };
        // allowSubstitutes = false: always built (Nix's substitutesAllowed).
        let shown = st.store_dir.display(drv_path);
        if !Attrs::allow_substitutes(&drv, &shown) {
            continue;
        }
        let fixed = drv.fixed_output().ok().flatten();
        for p in missing_wanted(&st.store, &outputs, outs.as_ref()) {
            if let Some((method, hash)) = &fixed {
                let ca = cairn_nix::ContentAddress::Fixed { method: *method, hash: hash.clone() };
                wanted.content_addresses.insert(p.clone(), ca);
            }
            wanted.owners.insert(p.clone(), drv_path.clone());
            wanted.paths.push(p.clone());
        }
    }
    wanted
}

/// The inputs (with the outputs used of each) of the derivations of `level` that still miss a
/// wanted output: they will be built — unless one of those is `broken` (see
/// [`NotSubstituted::broken`]).
fn inputs_of_unsubstituted(
    st: &AppState,
    level: &[(StorePath, Option<BTreeSet<String>>)],
    broken: &HashSet<StorePath>,
) -> Vec<(StorePath, Option<BTreeSet<String>>)> {
    let mut drvs = cairn_build::derivations::Derivations::new(&st.store);
    let mut next = Vec::new();
    for (drv_path, outs) in level {
        let (Ok(outputs), Ok(drv)) = (drvs.outputs(drv_path), drvs.load(drv_path)) else { continue };
        let missing = missing_wanted(&st.store, &outputs, outs.as_ref());
        if missing.is_empty() || missing.iter().any(|p| broken.contains(*p)) {
            continue;
        }
        for (input, used) in drvs.inputs(&drv).unwrap_or_default() {
            next.push((input, Some(used.into_iter().collect())));
        }
    }
    next
}

/// Roots the goals (derivations and outputs) for the client's process (`ClientScope`) before anything is built or
/// found valid, as Nix's daemon roots what a session asks to build. Without it a collection
/// between a build's registration and the end of the realisation (which checks the goals'
/// outputs), or between the answer and the client's own root (`realise -o`), took an unrooted
/// output, and the client read that the output it had just built was not valid.
async fn keep_outputs_for_client(st: &Arc<AppState>, peer: &Peer, goals: &[Goal]) {
    let Some(client) = peer.client else { return };
    let (st, goals) = (st.clone(), goals.to_vec());
    let kept = tokio::task::spawn_blocking(move || {
        let _scope = ClientScope::enter(Some(client));
        let mut drvs = cairn_build::derivations::Derivations::new(&st.store);
        for g in &goals {
            drop(st.store.temp_root([g.drv.clone()]));
            // A derivation that cannot be read fails the realisation itself, which says why.
            if let Ok(outputs) = drvs.outputs(&g.drv) {
                drop(st.store.temp_root(outputs.into_values()));
            }
        }
    });
    if let Err(e) = kept.await {
        tracing::warn!("cannot root the outputs of a realisation for its client: {e}");
    }
}

pub async fn realise(
    State(st): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    Json(req): Json<RealiseRequest>,
) -> ApiResult<HttpResponse> {
    let dir = st.store_dir.clone();
    if req.paths.is_empty() {
        return Err(ApiError::bad_request("nothing to realise: name at least one derivation"));
    }
    let goals = req.paths.iter().map(|p| goal(&dir, p)).collect::<ApiResult<Vec<_>>>()?;
    let mode = match req.mode {
        cairn_api::BuildMode::Normal => Mode::Normal,
        cairn_api::BuildMode::Check => Mode::Check,
        cairn_api::BuildMode::Repair => Mode::Repair,
    };
    // Naming builders sends this store's paths to other machines and trusts what they build:
    // a trusted user's choice, as Nix's `builders` is a restricted setting.
    let builders = match &req.builders {
        None => None,
        Some(_) if !peer.trusted => {
            return Err(ApiError::forbidden(
                "only trusted users may choose the builders (the daemon's `builders` setting applies)",
            ))
        }
        Some(spec) => {
            let m =
                machines(spec, &st.control.settings).map_err(|e| ApiError::bad_request(format!("--builders: {e}")))?;
            Some(Arc::new(st.builder.remotes().resolve(m)))
        }
    };
    let mut options = Options {
        keep_going: req.keep_going,
        keep_failed: req.keep_failed,
        impure_env: Arc::new(req.impure_env),
        mode,
        limits: Default::default(),
        given: Default::default(),
        builders,
        post_build_hook: None,
        resubstitute: None,
        sandbox_paths: None,
    };
    keep_outputs_for_client(&st, &peer, &goals).await;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let builder = st.builder.clone();
    tokio::spawn(async move {
        // A check rebuilds what is valid, and a repair of what is valid is decided by its
        // contents: only a normal realisation fills missing outputs from substituters first,
        // each path told to the client as it starts. Whatever could not be substituted is
        // built (cairn's API always falls back).
        if mode == Mode::Normal {
            let (caches, policy) = (st.substitution.configured.clone(), st.substitution.policy.clone());
            let (announce, mut copying) = mpsc::unbounded_channel::<Notice>();
            let tx2 = tx.clone();
            // Neither the substitution nor the builds after it wait for the client: what a
            // client too slow to read has no room for is not told.
            let told = tokio::spawn(async move {
                while let Some(notice) = copying.recv().await {
                    // Signatures refused are said with the path's failure, if no cache gives it.
                    let Notice::Copying { path, from } = notice else { continue };
                    let ev = line(&RealiseEvent::Substituting { path, from });
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx2.try_send(ev) {
                        break;
                    }
                }
            });
            let not = substitute_first(&st, &peer, &goals, caches.clone(), policy.clone(), Some(announce), true).await;
            let _ = told.await;
            options.resubstitute = resubstitution(&st, &peer, caches, policy, &not);
            // What a cache had but could not give: said, as the build that replaces it is.
            for (path, message) in not.failed.into_iter().filter(|(p, _)| not.answered.contains(p)) {
                let ev = line(&RealiseEvent::NotSubstituted { path: dir.display(&path), message });
                let _ = tx.try_send(ev);
            }
        }
        let (etx, erx) = mpsc::unbounded_channel::<Event>();
        let work = builder.realise(goals, options, etx);
        // The builds never wait for the client (see `outbox`), one too slow to read included;
        // a client that went away (a Ctrl-C) stops them, as nix-daemon stops a gone client's
        // builds — seen when the next line for it cannot be written.
        let convert = |e: Event| {
            let ev = match e {
                Event::Plan { drvs } => RealiseEvent::Plan { drvs: drvs.iter().map(|d| dir.display(d)).collect() },
                Event::Substituting { path, from } => RealiseEvent::Substituting { path, from },
                // Shown to Nix clients; cairn's own shows the build when it starts.
                Event::Waiting { .. } => return None,
                Event::Started { drv, machine } => {
                    tracing::info!(drv = %dir.display(&drv), on = machine.as_deref().unwrap_or("here"), "building");
                    RealiseEvent::Started { drv: dir.display(&drv), machine }
                }
                Event::Log { drv, line: text } => {
                    let ev =
                        RealiseEvent::Log { drv: dir.display(&drv), line: String::from_utf8_lossy(&text).into_owned() };
                    return Some(Line::Log { drv: dir.display(&drv), line: line(&ev) });
                }
                Event::Built { drv, outputs } => {
                    tracing::info!(drv = %dir.display(&drv), "built");
                    RealiseEvent::Built { drv: dir.display(&drv), outputs: outputs_wire(&dir, &outputs) }
                }
                Event::Failed { drv, kind, message } => {
                    tracing::warn!(drv = %dir.display(&drv), "build failed: {message}");
                    RealiseEvent::Failed { drv: dir.display(&drv), kind: failure_kind(kind), message }
                }
            };
            Some(Line::Event(line(&ev)))
        };
        let note = |drv, n| line(&RealiseEvent::Log { drv, line: dropped_text(n) });
        let work_done = tokio::select! {
            done = forward(work, erx, &tx, convert, note) => done,
            // Dropping the work stops its builds (their sandboxes are killed); what already
            // registered stays.
            () = tx.closed() => {
                tracing::info!(user = %peer.user, "the client went away: its builds were stopped");
                return;
            }
        };
        let event = match work_done {
            Err(e) => {
                let e = ApiError::from(e);
                RealiseEvent::Error(ErrorBody { kind: e.kind, message: e.message })
            }
            Ok(outcome) => RealiseEvent::Done {
                results: outcome
                    .results
                    .into_iter()
                    .map(|(drv, r)| match r {
                        Ok(o) => RealiseResult { drv: dir.display(&drv), outputs: outputs_wire(&dir, &o), error: None },
                        Err(m) => RealiseResult { drv: dir.display(&drv), outputs: BTreeMap::new(), error: Some(m) },
                    })
                    .collect(),
            },
        };
        let _ = tx.send(line(&event)).await;
    });
    Ok(crate::stream::json_lines(rx))
}

/// `GET /v1/log?path=`: a derivation's last build log, or its deriver's for an output, streamed
/// as it is decompressed (a log can be far larger than an answer should hold in memory).
pub async fn log(State(st): State<Arc<AppState>>, Query(q): Query<PathQuery>) -> ApiResult<HttpResponse> {
    let dir = st.store_dir.clone();
    let path = store_path(&dir, &q.path)?;
    let st2 = st.clone();
    let dir2 = dir.clone();
    let (drv, here) = tokio::task::spawn_blocking(move || -> ApiResult<_> {
        let drv = if path.name().ends_with(".drv") {
            path.clone()
        } else {
            let info = st2.store.valid_path_info(&path)?;
            info.deriver.ok_or_else(|| {
                ApiError::not_found(format!("'{}' has no known deriver, so no build log", dir2.display(&path)))
            })?
        };
        let here =
            st2.builder.logs().open(&drv).map_err(|e| ApiError::internal(format!("cannot read the build log: {e}")))?;
        Ok((drv, here))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    let mut text: Box<dyn std::io::Read + Send> = match here {
        Some(r) => r,
        // As `nix log`: a log built elsewhere may be in a binary cache (`log/<drv>`).
        None => {
            let mut found = None;
            for sub in &st.substitution.configured {
                match sub.build_log(&drv).await {
                    Ok(Some(b)) => {
                        found = Some(b);
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!(cache = sub.url(), "no build log from the cache: {e}"),
                }
            }
            let b = found
                .ok_or_else(|| ApiError::not_found(format!("build log of '{}' is not available", dir.display(&drv))))?;
            Box::new(std::io::Cursor::new(b))
        }
    };
    let mut answer = crate::stream::stream_response(move |w| {
        std::io::copy(&mut text, w).map(|_| ()).map_err(crate::stream::IntoStoreError::into_store)
    });
    answer
        .headers_mut()
        .insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("text/plain; charset=utf-8"));
    Ok(answer)
}

/// `add-derivation`: the ATerm parsed, completed and written as a text path.
pub fn add_derivation(st: &AppState, aterm: &str) -> ApiResult<Vec<cairn_api::PathInfo>> {
    let mut drv = cairn_nix::derivation::Derivation::parse(aterm.as_bytes())
        .map_err(|e| ApiError::bad_request(format!("derivation: {e}")))?;
    let mut drvs = cairn_build::derivations::Derivations::new(&st.store);
    drvs.complete(&mut drv)?;
    let name = format!("{}.drv", drv.name().map_err(|e| ApiError::bad_request(e.to_string()))?);
    let mut refs = BTreeSet::new();
    for p in drv.input_srcs.iter().chain(drv.input_drvs.keys()) {
        refs.insert(store_path(&st.store_dir, p)?);
    }
    let info = st.store.add_text(&name, drv.to_aterm().as_bytes(), &refs)?;
    Ok(vec![convert::path_info(&st.store_dir, &info)])
}

/// `derivation-outputs`: output paths recomputed and checked.
pub fn derivation_outputs(st: &AppState, paths: &[String]) -> ApiResult<BTreeMap<String, BTreeMap<String, String>>> {
    let mut drvs = cairn_build::derivations::Derivations::new(&st.store);
    let mut out = BTreeMap::new();
    for p in paths {
        let sp = store_path(&st.store_dir, p)?;
        let o = drvs.outputs(&sp)?;
        out.insert(st.store_dir.display(&sp), outputs_wire(&st.store_dir, &o));
    }
    Ok(out)
}

/// `impure-env-vars`: the `impureEnvVars` of the fixed-output derivations in the closure of
/// `paths` (derivations only), sorted and without repeats.
pub fn impure_env_vars(st: &AppState, paths: &[String]) -> ApiResult<Vec<String>> {
    let mut drvs = cairn_build::derivations::Derivations::new(&st.store);
    let mut names = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut stack = paths.iter().map(|p| store_path(&st.store_dir, p)).collect::<ApiResult<Vec<_>>>()?;
    while let Some(p) = stack.pop() {
        if !seen.insert(p.clone()) {
            continue;
        }
        let drv = drvs.load(&p)?;
        let shown = st.store_dir.display(&p);
        let attrs = Attrs::new(&drv, &shown).map_err(|e| ApiError::bad_request(e.to_string()))?;
        names.extend(attrs.impure_env_vars().map_err(|e| ApiError::bad_request(e.to_string()))?);
        for (input, _) in drvs.inputs(&drv)? {
            stack.push(input);
        }
    }
    Ok(names.into_iter().collect())
}
