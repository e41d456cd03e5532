//! `POST /v1/substitute`: closures fetched from binary caches (see `cairn_cache::substitute`),
//! with progress streamed to the client as JSON lines.
//!
//! The daemon keeps its configured substituters open (their `nix-cache-info` read once, their
//! HTTP connections pooled) and one narinfo lookup cache for all requests. A request may name
//! other caches; as in Nix, only trusted users may make the daemon read a URL nobody configured.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::response::Response as HttpResponse;
use axum::{Extension, Json};
use cairn_api::config::Settings;
use cairn_api::{ErrorBody, SubstituteEvent, SubstituteFailure, SubstituteRequest};
use cairn_cache::{Limits, NarInfoCache, NetOptions, Policy, Progress, Substituter};

use crate::auth::Peer;
use crate::convert::{self, store_paths};
use crate::error::{ApiError, ApiResult};
use crate::handlers::AppState;

/// What every substitution shares.
pub struct Substitution {
    pub(crate) configured: Vec<Arc<Substituter>>,
    pub(crate) lookups: Arc<NarInfoCache>,
    net: NetOptions,
    pub(crate) limits: Limits,
    pub policy: Policy,
}

impl Substitution {
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Substitution> {
        let net = NetOptions {
            connect_timeout: Duration::from_secs(settings.connect_timeout),
            stall_timeout: Duration::from_secs(settings.stalled_download_timeout),
        };
        let configured = settings
            .substituters
            .iter()
            .map(|u| Substituter::open(u, &net).map(Arc::new).with_context(|| "substituters in the config"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let trusted_keys = settings
            .trusted_public_keys
            .iter()
            .map(|k| cairn_nix::signing::PublicKey::parse(k).with_context(|| "trusted-public-keys in the config"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Substitution {
            configured,
            lookups: Arc::new(NarInfoCache::new(
                Duration::from_secs(settings.narinfo_cache_positive_ttl),
                Duration::from_secs(settings.narinfo_cache_negative_ttl),
            )),
            net,
            limits: Limits { connections: settings.substituter_connections, jobs: settings.max_substitution_jobs },
            policy: Policy { trusted_keys, require_sigs: settings.require_sigs },
        })
    }

    /// The caches a request uses: those it names (opened for it, or the configured ones of the
    /// same URL), else the configured ones.
    fn caches(&self, from: &[String], peer: &Peer) -> ApiResult<Vec<Arc<Substituter>>> {
        if from.is_empty() {
            return Ok(self.configured.clone());
        }
        from.iter()
            .map(|url| {
                if let Some(s) = self.configured.iter().find(|s| s.url() == url) {
                    return Ok(s.clone());
                }
                if !peer.trusted {
                    return Err(ApiError::forbidden(format!(
                        "user '{}' may only substitute from the configured substituters; '{url}' is not one \
                         (add the user to trusted-users, or the URL to substituters)",
                        peer.user
                    )));
                }
                Substituter::open(url, &self.net).map(Arc::new).map_err(|e| ApiError::bad_request(e.to_string()))
            })
            .collect()
    }
}

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
    if caches.is_empty() {
        return Err(ApiError::bad_request(
            "no binary cache to substitute from: set substituters in the daemon's config, or name one (--from URL)",
        ));
    }
    let dir = st.store_dir.clone();
    let paths = store_paths(&dir, &req.paths)?;
    let progress = Arc::new(Progress::default());
    let job = cairn_cache::substitute::Job {
        store: st.store.clone(),
        substituters: caches,
        lookups: sub.lookups.clone(),
        policy: sub.policy.clone(),
        limits: sub.limits,
        client: peer.client,
        progress: progress.clone(),
        repair: false,
    };
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
                SubstituteEvent::Done {
                    paths: valid,
                    added: report.added.iter().map(|i| dir.display(&i.path)).collect(),
                    failed: report
                        .failed
                        .iter()
                        .map(|(p, reason)| SubstituteFailure { path: dir.display(p), reason: reason.clone() })
                        .collect(),
                }
            }
        }
    };
    Ok(crate::handlers::progress_lines(move || progress_event(&counters), work))
}

/// `verify --repair`: checks the store, then substitutes every missing or modified path again
/// from the configured substituters and swaps the good copy in. Each problem's message says
/// whether it was repaired, or why not.
pub async fn verify_and_repair(st: Arc<AppState>, peer: Peer, check_contents: bool) -> ApiResult<cairn_api::Response> {
    if !peer.trusted {
        return Err(ApiError::forbidden(format!(
            "user '{}' is not trusted to repair paths (add it to trusted-users in the daemon's config)",
            peer.user
        )));
    }
    let store = st.store.clone();
    let mut report =
        tokio::task::spawn_blocking(move || store.verify(cairn_store::VerifyOptions { check_contents })).await??;
    let broken: Vec<cairn_nix::StorePath> = report
        .problems
        .iter()
        .filter(|p| matches!(p.kind, "missing" | "modified"))
        .filter_map(|p| p.path.clone())
        .collect();
    let mut why: std::collections::BTreeMap<cairn_nix::StorePath, String> = std::collections::BTreeMap::new();
    let mut repaired: std::collections::BTreeSet<cairn_nix::StorePath> = Default::default();
    let sub = &st.substitution;
    if !broken.is_empty() && sub.configured.is_empty() {
        why.extend(broken.iter().map(|p| (p.clone(), "no substituter is configured".to_owned())));
    } else if !broken.is_empty() {
        let job = cairn_cache::substitute::Job {
            store: st.store.clone(),
            substituters: sub.configured.clone(),
            lookups: sub.lookups.clone(),
            policy: sub.policy.clone(),
            limits: sub.limits,
            client: peer.client,
            progress: Arc::new(Progress::default()),
            repair: true,
        };
        match cairn_cache::substitute(job, &broken).await {
            Ok(r) => {
                repaired.extend(r.added.into_iter().map(|i| i.path));
                why.extend(r.failed);
            }
            Err(e) => why.extend(broken.iter().map(|p| (p.clone(), e.to_string()))),
        }
    }
    for p in &mut report.problems {
        let Some(path) = &p.path else { continue };
        if repaired.contains(path) {
            p.message.push_str(" (repaired)");
        } else if let Some(reason) = why.get(path) {
            p.message.push_str(&format!(" (cannot repair: {reason})"));
        }
    }
    report.repaired = repaired.len() as u64;
    tracing::info!(repaired = report.repaired, problems = report.problems.len(), "verify --repair");
    Ok(cairn_api::Response::Verify(convert::verify_result(&st.store_dir, report)))
}

impl From<cairn_cache::CacheError> for ApiError {
    fn from(e: cairn_cache::CacheError) -> ApiError {
        use cairn_cache::CacheError::*;
        match e {
            Store(e) => ApiError::from(e),
            Url { .. } | Compression(_) | BadFile { .. } | Refused { .. } => ApiError::bad_request(e.to_string()),
            Missing { .. } => ApiError::not_found(e.to_string()),
            Io { .. } | Http { .. } | Timeout { .. } => ApiError::internal(e.to_string()),
        }
    }
}
