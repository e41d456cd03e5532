//! The daemon seen from outside: its status, its effective settings, and a stop on request.
//!
//! An auto-started daemon keeps the settings it started with; a user who then edits the config
//! file needs to see which daemon is running, with what, and to stop or restart it without
//! hunting for its pid. `GET /v1/daemon/status` and `/v1/daemon/config` answer anyone allowed to
//! connect (nothing in them is secret: secret keys appear as file names); `POST
//! /v1/daemon/stop` needs a trusted user (the daemon's own user always is) and shuts down as
//! SIGTERM does, through the same graceful path in `server`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::{Extension, Json};
use cairn_api::config::Settings;
use cairn_api::DaemonStatus;
use tokio::sync::Notify;

use crate::auth::Peer;
use crate::error::{ApiError, ApiResult};
use crate::handlers::AppState;

/// What the daemon knows about itself, shared by the handlers and the accept loop.
pub struct Control {
    pub settings: Settings,
    /// The config file the settings were read from (absolute), if any.
    pub config_file: Option<PathBuf>,
    started_wall: SystemTime,
    started: Instant,
    fingerprint: String,
    /// Notified once by a stop request; the accept loop then shuts down as on SIGTERM.
    pub stop: Notify,
}

impl Control {
    pub fn new(settings: Settings, config_file: Option<PathBuf>) -> Control {
        Control {
            fingerprint: settings.fingerprint(),
            settings,
            config_file,
            started_wall: SystemTime::now(),
            started: Instant::now(),
            stop: Notify::new(),
        }
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn status(&self) -> DaemonStatus {
        DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            api_version: cairn_api::API_VERSION,
            socket: self.settings.socket.display().to_string(),
            store_dir: self.settings.store_dir.clone(),
            root: self.settings.root.display().to_string(),
            config_file: self.config_file.as_ref().map(|p| p.display().to_string()),
            started: self.started_wall.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            uptime_seconds: self.started.elapsed().as_secs(),
            settings_fingerprint: self.fingerprint.clone(),
        }
    }
}

type St = State<Arc<AppState>>;

pub async fn status(State(s): St) -> Json<DaemonStatus> {
    Json(s.control.status())
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
