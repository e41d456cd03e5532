//! The API's routes on top of `LocalStore`, one module per group: [`store`] (queries and reads),
//! [`transfer`] (add, import, export, receive), [`substitute`], [`realise`], [`images`],
//! [`peers`] (the p2p node: its status, pushes to and from peers) and [`control`] (the daemon
//! itself). This module only wires them into a router and checks that
//! the peer may use the daemon at all.

use std::sync::Arc;

use axum::extract::Request as HttpRequest;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::{Extension, Router};
use cairn_api::routes;

use crate::auth::Peer;
use crate::error::ApiError;
use crate::state::AppState;

pub mod control;
pub mod images;
pub mod peers;
pub mod realise;
pub mod store;
pub mod substitute;
pub mod transfer;

/// The router, without per-connection state (the server adds the [`Peer`]).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(routes::VERSION, get(store::version))
        .route(routes::QUERY, post(store::query))
        .route(routes::ADD, post(transfer::add))
        .route(routes::NAR, get(store::nar))
        .route(routes::CAT, get(store::cat))
        .route(routes::EXPORT, post(transfer::export))
        .route(routes::IMPORT, post(transfer::import))
        .route(routes::SUBSTITUTE, post(substitute::handler))
        .route(routes::RECEIVE, post(transfer::receive))
        .route(routes::REALISE, post(realise::realise))
        .route(routes::LOG, get(realise::log))
        .route(routes::OCI_IMPORT, post(images::import))
        .route(routes::OCI_PULL, post(images::pull))
        .route(routes::OCI_PUSH, post(images::push))
        .route(routes::OCI_BUILD, post(images::build))
        .route(routes::OCI_BLOB, get(images::oci_blob))
        .route(routes::DAEMON_STATUS, get(control::status))
        .route(routes::DAEMON_CONFIG, get(control::config))
        .route(routes::DAEMON_STOP, post(control::stop))
        .route(routes::PEERS, get(peers::status))
        .route(routes::PEERS_PUSH, post(peers::push))
        .fallback(|| async { ApiError::not_found("no such API route (this daemon speaks API version 1)") })
        .layer(middleware::from_fn(require_allowed))
        .layer(middleware::from_fn(crate::error::json_errors))
        .with_state(state)
}

async fn require_allowed(Extension(peer): Extension<Peer>, req: HttpRequest, next: Next) -> HttpResponse {
    if !peer.allowed {
        return ApiError::forbidden(format!(
            "user '{}' may not use this cairnd (add it to allowed-users in the daemon's config)",
            peer.user
        ))
        .into_response();
    }
    next.run(req).await
}
