//! The p2p node seen from the socket: its status (`GET /v1/peers`), and copies between nodes.
//!
//! `cairn copy --to p2p://NODE-ID` sends the closure's narinfos to this daemon, which hands them
//! to the peer (`POST /v1/peers/push`); the peer then substitutes the paths from this node as
//! from a binary cache ([`PushReceiver`]), under its own `trusted-public-keys` and
//! `require-sigs`, the NARs coming as BLAKE3-verified transfers. `--from p2p://NODE-ID` is an
//! ordinary substitution whose cache is the peer (`Substitution::caches`).

use std::sync::{Arc, Weak};

use axum::extract::State;
use axum::Json;
use cairn_api::{PeerPushAnswer, PeerPushRequest};
use cairn_cache::substitute::Substituter;
use cairn_cache::Progress;
use cairn_nix::StorePath;
use cairn_store::peers::PeerCache;

use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, St};

fn node(s: &AppState) -> ApiResult<&Arc<cairn_p2p::Node>> {
    s.p2p.as_ref().ok_or_else(|| {
        ApiError::not_found("this cairnd has no p2p node (set p2p-listen and/or peers in its config, then restart it)")
    })
}

/// The p2p node and its peers.
pub async fn status(State(s): St) -> ApiResult<Json<cairn_api::PeersStatus>> {
    Ok(Json(node(&s)?.status()))
}

/// Asks a peer to take a closure from this node; answers once the peer is done.
pub async fn push(State(s): St, Json(req): Json<PeerPushRequest>) -> ApiResult<Json<PeerPushAnswer>> {
    let node = node(&s)?;
    // Only this store's valid paths are offered: a narinfo for anything else would have the
    // peer ask for bytes this node cannot send.
    let paths = req
        .narinfos
        .iter()
        .map(|text| cairn_nix::narinfo::NarInfo::parse(&s.store_dir, text).map(|i| i.store_path))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::bad_request(format!("a narinfo to push: {e}")))?;
    let store = s.store.clone();
    let invalid = tokio::task::spawn_blocking(move || -> Result<Option<StorePath>, cairn_store::StoreError> {
        for p in paths {
            if !store.is_valid(&p)? {
                return Ok(Some(p));
            }
        }
        Ok(None)
    })
    .await??;
    if let Some(p) = invalid {
        return Err(ApiError::bad_request(format!("'{}' is not a valid path here", s.store_dir.display(&p))));
    }
    let answer = node.push(&req.to, req.narinfos).await.map_err(ApiError::bad_request)?;
    Ok(Json(answer))
}

/// Takes pushes from peers: a substitution from the pushing peer, with the daemon's trust
/// policy, limits and peers.
pub struct PushReceiver {
    /// Weak: the state owns the node, which owns this.
    pub state: Weak<AppState>,
}

impl cairn_p2p::Receiver for PushReceiver {
    fn receive(
        &self,
        url: String,
        from: Arc<dyn PeerCache>,
        paths: Vec<StorePath>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<PeerPushAnswer, String>> + Send + 'static>> {
        let st = self.state.upgrade();
        Box::pin(async move {
            let st = st.ok_or("the daemon is shutting down")?;
            let sub = Arc::new(Substituter::peer(&url, from));
            let job = st.substitution.job(&st.store, vec![sub], None, Arc::new(Progress::default()), false);
            let report = cairn_cache::substitute(job, &paths).await.map_err(|e| e.to_string())?;
            let dir = &st.store_dir;
            for i in &report.added {
                tracing::info!(path = %dir.display(&i.path), from = %url, "taken from a peer's push");
            }
            let (added, failed) = crate::convert::substitution(dir, &report);
            Ok(PeerPushAnswer { added, failed })
        })
    }
}
