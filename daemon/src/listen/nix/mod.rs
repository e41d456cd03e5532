//! Nix's daemon protocol (the worker protocol `nix-daemon` speaks), so that Nix's own tools use
//! cairn's store: `nix-store --store unix://…/nix-socket`, `NIX_REMOTE=unix://…`, and
//! `ssh-ng://host?remote-program=cairnd` (which runs `cairnd --stdio`).
//!
//! The wire format is `cairn-worker`'s; this module brings the connections and answers each
//! operation from the same store, builder, collector and substituters the HTTP API uses
//! ([`session`] runs one connection, [`ops`] the queries and the store's upkeep, [`add`] what
//! puts paths in the store, [`realise`] the builds).
//!
//! A session is a blocking conversation (the client waits for each answer before it sends the
//! next request), so each runs on its own thread with blocking reads and writes, and calls into
//! the async parts of the daemon (builds, substitution) through the runtime's handle. Who the
//! peer is, and what it may do, is decided exactly as on the HTTP socket: SO_PEERCRED, then
//! `allowed-users` and `trusted-users`.
//!
//! **Architecture invariant:** nothing a client sends is trusted more than over the HTTP API:
//! untrusted clients' `AddToStoreNar` paths need a trusted signature or a content address that
//! proves them, their `BuildDerivation`s must be content-addressed, and every NAR is hashed
//! before it is registered.

use std::io::{BufReader, BufWriter};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::UnixListener;

use crate::auth::{Peer, Policy};
use crate::limits::{AcceptErrors, Connections, PeerKey};
use crate::state::AppState;

mod add;
mod ops;
mod realise;
mod session;

pub(crate) use session::Session;

/// Binds the worker-protocol socket at `path` (its directory created, a stale socket file
/// replaced: the caller holds the store lock), open to every user as the HTTP socket is.
pub(crate) fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create '{}'", parent.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let l = cairn_api::socket::SocketAddress::of(path)
        .and_then(|at| UnixListener::bind(at.path()))
        .with_context(|| format!("cannot listen on '{}' (nix-daemon-socket in the config)", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

/// Accepts worker-protocol connections until the runtime shuts down; each session runs on its
/// own thread, counted against the same per-user limits as the HTTP socket's connections.
pub(crate) async fn serve(listener: UnixListener, st: Arc<AppState>, policy: Policy, connections: Arc<Connections>) {
    let rt = tokio::runtime::Handle::current();
    let mut errors = AcceptErrors::new("nix-daemon-socket");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                errors.succeeded();
                stream
            }
            Err(e) => {
                errors.failed(e).await;
                continue;
            }
        };
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("no peer credentials: {e}");
                continue;
            }
        };
        let slot = match connections.admit(PeerKey::Uid(cred.uid())) {
            Ok(slot) => slot,
            Err(refusal) => {
                tracing::warn!("nix-daemon-socket: connection refused: {refusal:?}");
                continue;
            }
        };
        let peer = Peer {
            client: cred.pid().and_then(cairn_store::ClientId::of_pid),
            ..policy.identify(cred.uid(), cred.gid())
        };
        if !peer.allowed {
            // As nix-daemon: the connection is closed before the handshake.
            tracing::warn!(user = peer.user, "user may not use this cairnd (allowed-users)");
            continue;
        }
        let stream = match stream.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("cannot take the connection: {e}");
                continue;
            }
        };
        // A client that reads none of an answer for send-timeout ends its session (SO_SNDTIMEO:
        // a write that makes no progress for that long fails), as on the HTTP listeners.
        if let Err(e) = stream.set_write_timeout(connections.limits().send_timeout) {
            tracing::debug!("cannot set the send timeout: {e}");
        }
        let (st, rt) = (st.clone(), rt.clone());
        let spawned = std::thread::Builder::new().name("nix-session".into()).spawn(move || {
            let _slot = slot;
            let reader = match stream.try_clone() {
                Ok(r) => r,
                Err(e) => return tracing::debug!("cannot clone the connection: {e}"),
            };
            let watch = std::os::fd::AsFd::as_fd(&stream).try_clone_to_owned().ok();
            let user = peer.user.clone();
            let session = Session::new(
                st,
                peer,
                rt,
                BufReader::with_capacity(1 << 16, reader),
                BufWriter::with_capacity(1 << 16, stream),
            )
            .watching(watch);
            if let Err(e) = session.run() {
                tracing::debug!(user, "nix session ended: {e}");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a session thread: {e}");
        }
    }
}

/// Serves one session on standard input and output (`cairnd --stdio`), as `nix-daemon --stdio`
/// does for `ssh-ng://` stores. The caller is whoever could run this program as the store's
/// owner, so it is trusted, as `nix-daemon --stdio` trusts its caller.
pub(crate) fn serve_stdio(st: Arc<AppState>, rt: tokio::runtime::Handle) -> anyhow::Result<()> {
    let session = Session::new(
        st,
        this_user("stdio"),
        rt,
        BufReader::with_capacity(1 << 16, std::io::stdin()),
        BufWriter::with_capacity(1 << 16, std::io::stdout()),
    )
    .watching(std::os::fd::AsFd::as_fd(&std::io::stdin()).try_clone_to_owned().ok());
    session.run().map_err(|e| anyhow::anyhow!("nix session on stdin/stdout: {e}"))
}

/// Serves one session on `stream` in this process, for `cairnd --serve` when no daemon serves
/// the store: the caller could open the store, so it is trusted, as on `--stdio`.
pub(crate) fn serve_trusted(
    st: Arc<AppState>,
    rt: tokio::runtime::Handle,
    stream: std::os::unix::net::UnixStream,
) -> anyhow::Result<()> {
    let reader = stream.try_clone()?;
    let watch = std::os::fd::AsFd::as_fd(&stream).try_clone_to_owned().ok();
    let session = Session::new(
        st,
        this_user("serve"),
        rt,
        BufReader::with_capacity(1 << 16, reader),
        BufWriter::with_capacity(1 << 16, stream),
    )
    .watching(watch);
    session.run().map_err(|e| anyhow::anyhow!("nix session: {e}"))
}

/// The user running this process, trusted: who could open the store.
fn this_user(name: &str) -> Peer {
    let me = nix::unistd::geteuid().as_raw();
    Peer { uid: me, client: None, user: name.into(), allowed: true, trusted: true }
}
