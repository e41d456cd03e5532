//! The daemon seen from outside: its status, its effective settings, and a stop on request.
//!
//! An auto-started daemon keeps the settings it started with; a user who then edits the config
//! file needs to see which daemon is running, with what, and to stop or restart it without
//! hunting for its pid. `GET /v1/daemon/status` and `/v1/daemon/config` answer anyone allowed to
//! connect (nothing in them is secret: secret keys appear as file names); `POST
//! /v1/daemon/stop` needs a trusted user (the daemon's own user always is) and shuts down as
//! SIGTERM does, through the same graceful path in `server`.

use axum::extract::State;
use axum::{Extension, Json};
use cairn_api::config::Settings;
use cairn_api::DaemonStatus;

use crate::auth::Peer;
use crate::error::{ApiError, ApiResult};
use crate::state::St;

pub async fn status(State(s): St) -> Json<DaemonStatus> {
    let mut status = s.control.status();
    // The database's mutex can be held through a commit's fsync: not on a runtime thread.
    let store = s.store.clone();
    if let Ok(m) = tokio::task::spawn_blocking(move || store.memory()).await {
        status.memory = Some(cairn_api::StoreMemory {
            page_cache_bytes: m.page_cache_bytes,
            page_cache_limit: m.page_cache_limit,
            graph_paths: m.graph_paths,
            graph_rows: m.graph_rows,
        });
    }
    Json(status)
}

pub async fn config(State(s): St) -> Json<Settings> {
    Json(s.control.settings.clone())
}

pub async fn stop(State(s): St, Extension(peer): Extension<Peer>) -> ApiResult<Json<DaemonStatus>> {
    if !peer.trusted {
        return Err(ApiError::forbidden(format!(
            "user '{}' may not stop this cairnd (only trusted-users and the daemon's own user may)",
            peer.user
        )));
    }
    tracing::info!(user = peer.user, "stop requested: shutting down");
    s.control.stop.notify_one();
    Ok(Json(s.control.status()))
}
