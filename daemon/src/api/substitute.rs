//! `POST /v1/substitute`: closures fetched from binary caches (see `cairn_cache::substitute`),
//! with progress streamed to the client as JSON lines.
//!
//! The daemon keeps its configured substituters open (their `nix-cache-info` read once, their
//! HTTP connections pooled) and one narinfo lookup cache for all requests. A request may name
//! other caches; as in Nix, only trusted users may make the daemon read a URL nobody configured.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response as HttpResponse;
use axum::{Extension, Json};
use cairn_api::{ErrorBody, SubstituteEvent, SubstituteRequest};
use cairn_cache::Progress;

use crate::auth::Peer;
use crate::convert::{self, store_paths};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

fn progress_event(p: &Progress) -> SubstituteEvent {
    SubstituteEvent::Progress {
        paths_expected: p.paths_expected.load(Ordering::Relaxed),
        paths_done: p.paths_done.load(Ordering::Relaxed),
        bytes_expected: p.bytes_expected.load(Ordering::Relaxed),
        bytes_done: p.bytes_done.load(Ordering::Relaxed),
    }
}

pub async fn handler(
    State(st): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    Json(req): Json<SubstituteRequest>,
) -> ApiResult<HttpResponse> {
    let sub = &st.substitution;
    if !sub.policy.require_sigs && !peer.trusted {
        return Err(ApiError::forbidden(format!(
            "user '{}' may not substitute while require-sigs is off (add it to trusted-users)",
            peer.user
        )));
    }
    let caches = sub.caches(&req.from, &peer)?;
    let dir = st.store_dir.clone();
    let paths = store_paths(&dir, &req.paths)?;
    // Nothing missing needs no cache (a valid path's closure is valid).
    let all_valid = || {
        let (store, paths) = (st.store.clone(), paths.clone());
        tokio::task::spawn_blocking(move || paths.iter().all(|p| store.is_valid(p).unwrap_or(false)))
    };
    if caches.is_empty() && !all_valid().await? {
        return Err(ApiError::bad_request(
            "no binary cache to substitute from: set substituters in the daemon's config, or name one (--from URL)",
        ));
    }
    let progress = Arc::new(Progress::default());
    let job = sub.job(&st.store, caches, peer.client, progress.clone(), false);
    let store = st.store.clone();
    let user = peer.user.clone();
    let counters = progress.clone();
    let work = async move {
        let outcome = cairn_cache::substitute(job, &paths).await;
        match outcome {
            Err(e) => {
                tracing::warn!(user, "substitution failed: {e}");
                let e = ApiError::from(e);
                SubstituteEvent::Error(ErrorBody { kind: e.kind, message: e.message })
            }
            Ok(report) => {
                for i in &report.added {
                    tracing::info!(path = %dir.display(&i.path), "substituted");
                }
                let valid: Vec<_> = paths
                    .iter()
                    .filter_map(|p| store.path_info(p).ok().flatten())
                    .map(|i| convert::path_info(&dir, &i))
                    .collect();
                let (added, failed) = convert::substitution(&dir, &report);
                SubstituteEvent::Done { paths: valid, added, failed }
            }
        }
    };
    Ok(crate::stream::progress_lines(move || progress_event(&counters), work))
}

/// `verify --repair`: checks the store, then substitutes every missing or modified path again
/// and swaps the good copy in; what no cache has is built again from its deriver, when that
/// derivation is valid, in repair mode — as Nix's `repairPath` does. Each problem's message says
/// whether it was repaired, or why not. `caches` are the substituters and trust policy to use
/// (a Nix client's own, as `nix-daemon` takes a trusted client's); `None`: the configured ones.
/// With `forget_vanished` (Nix's `verifyStore`, for its clients), a vanished path nothing refers
/// to is forgotten rather than repaired; cairn's own `verify --repair` fetches it again.
pub async fn verify_and_repair(
    st: Arc<AppState>,
    peer: Peer,
    check_contents: bool,
    caches: Option<(Vec<Arc<cairn_cache::Substituter>>, cairn_cache::Policy)>,
    forget_vanished: bool,
) -> ApiResult<cairn_api::VerifyResult> {
    may_repair(&peer)?;
    let store = st.store.clone();
    let mut report = tokio::task::spawn_blocking(move || {
        store.verify(cairn_store::VerifyOptions { check_contents, forget_vanished, drop_modified_links: true })
    })
    .await??;
    let (repaired, why) = repair(&st, &peer, caches, &repairable(&report.problems)).await;
    for p in &mut report.problems {
        let Some(path) = &p.path else { continue };
        if repaired.contains(path) {
            p.message.push_str(" (repaired)");
        } else if let Some(reason) = why.get(path) {
            p.message.push_str(&format!(" (cannot repair: {reason})"));
        }
    }
    report.repaired += repaired.len() as u64;
    tracing::info!(repaired = report.repaired, problems = report.problems.len(), "verify --repair");
    Ok(convert::verify_result(&st.store_dir, report))
}

/// Only a trusted user may have paths replaced.
fn may_repair(peer: &Peer) -> ApiResult<()> {
    if peer.trusted {
        return Ok(());
    }
    Err(ApiError::forbidden(format!(
        "user '{}' is not trusted to repair paths (add it to trusted-users in the daemon's config)",
        peer.user
    )))
}

/// The paths whose contents are missing or modified: what fetching or building them again
/// mends (a false content address is not mended by the same bytes again: left to `verify`).
fn repairable(problems: &[cairn_store::Problem]) -> Vec<cairn_nix::StorePath> {
    problems.iter().filter(|p| matches!(p.kind, "missing" | "modified")).filter_map(|p| p.path.clone()).collect()
}

/// Repairs `broken` (valid paths found missing or modified): substituted again and swapped
/// in, else built again from their derivers. Returns what was repaired, and why each of the
/// others was not.
async fn repair(
    st: &Arc<AppState>,
    peer: &Peer,
    caches: Option<(Vec<Arc<cairn_cache::Substituter>>, cairn_cache::Policy)>,
    broken: &[cairn_nix::StorePath],
) -> (std::collections::BTreeSet<cairn_nix::StorePath>, std::collections::BTreeMap<cairn_nix::StorePath, String>) {
    let mut why: std::collections::BTreeMap<cairn_nix::StorePath, String> = std::collections::BTreeMap::new();
    let mut repaired: std::collections::BTreeSet<cairn_nix::StorePath> = Default::default();
    let sub = &st.substitution;
    let (caches, policy) = caches.unwrap_or_else(|| (sub.configured.clone(), sub.policy.clone()));
    if !broken.is_empty() && caches.is_empty() {
        why.extend(broken.iter().map(|p| (p.clone(), "no substituter is configured".to_owned())));
    } else if !broken.is_empty() {
        let mut job = sub.job(&st.store, caches, peer.client, Arc::new(Progress::default()), true);
        job.policy = policy;
        match cairn_cache::substitute(job, broken).await {
            Ok(r) => {
                repaired.extend(r.added.into_iter().map(|i| i.path));
                why.extend(r.failed);
            }
            Err(e) => why.extend(broken.iter().map(|p| (p.clone(), e.to_string()))),
        }
    }
    let left: Vec<cairn_nix::StorePath> = broken.iter().filter(|p| !repaired.contains(*p)).cloned().collect();
    for (path, outcome) in rebuild_from_derivers(st, &left).await {
        match outcome {
            Ok(()) => {
                why.remove(&path);
                repaired.insert(path);
            }
            Err(e) => {
                why.insert(path, e);
            }
        }
    }
    (repaired, why)
}

/// `--repair` of named valid paths (a Nix client's `nix-store -r --repair PATH`): their
/// contents are checked, and those found missing or modified are repaired as `verify --repair`
/// repairs them. Returns, for each path that could not be repaired, why; an intact path needs
/// nothing.
pub async fn repair_paths(
    st: Arc<AppState>,
    peer: Peer,
    paths: Vec<cairn_nix::StorePath>,
    caches: Option<(Vec<Arc<cairn_cache::Substituter>>, cairn_cache::Policy)>,
) -> ApiResult<Vec<(cairn_nix::StorePath, String)>> {
    may_repair(&peer)?;
    let store = st.store.clone();
    let problems = tokio::task::spawn_blocking(move || store.verify_paths(&paths)).await??;
    let broken = repairable(&problems);
    for p in &broken {
        tracing::warn!(path = %st.store_dir.display(p), "found broken; repairing");
    }
    let (repaired, mut why) = repair(&st, &peer, caches, &broken).await;
    Ok(broken
        .into_iter()
        .filter(|p| !repaired.contains(p))
        .map(|p| {
            let reason =
                why.remove(&p).unwrap_or_else(|| "no substituter has it and no valid derivation builds it".into());
            (p, reason)
        })
        .collect())
}

/// Builds again, in repair mode, the valid derivers of `paths` that name them as outputs; the
/// outcome for each path that had such a deriver.
async fn rebuild_from_derivers(
    st: &Arc<AppState>,
    paths: &[cairn_nix::StorePath],
) -> Vec<(cairn_nix::StorePath, Result<(), String>)> {
    use cairn_build::realise::{Goal, Mode, Options};
    let store = st.store.clone();
    let wanted = paths.to_vec();
    // (path, its deriver) for each path a valid derivation outputs.
    let derived: Vec<(cairn_nix::StorePath, cairn_nix::StorePath)> = tokio::task::spawn_blocking(move || {
        wanted
            .into_iter()
            .filter_map(|p| {
                let drv = store.path_info(&p).ok().flatten()?.deriver?;
                let outputs = store.derivation_outputs(&drv).ok()?;
                (store.is_valid(&drv).unwrap_or(false) && outputs.values().any(|o| *o == p)).then_some((p, drv))
            })
            .collect()
    })
    .await
    .unwrap_or_default();
    if derived.is_empty() {
        return Vec::new();
    }
    let drvs: std::collections::BTreeSet<cairn_nix::StorePath> = derived.iter().map(|(_, d)| d.clone()).collect();
    let goals = drvs.into_iter().map(|drv| Goal { drv, outputs: None }).collect();
    let options = Options { keep_going: true, mode: Mode::Repair, ..Default::default() };
    let (events, _) = tokio::sync::mpsc::unbounded_channel();
    let results: std::collections::BTreeMap<cairn_nix::StorePath, Result<(), String>> =
        match st.builder.realise(goals, options, events).await {
            Ok(outcome) => outcome.results.into_iter().map(|(drv, r)| (drv, r.map(|_| ()))).collect(),
            Err(e) => return derived.into_iter().map(|(p, _)| (p, Err(e.to_string()))).collect(),
        };
    derived
        .into_iter()
        .map(|(p, drv)| {
            let r = results.get(&drv).cloned().unwrap_or_else(|| Err("its deriver was not built".into()));
            (p, r)
        })
        .collect()
}
