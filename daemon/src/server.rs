//! Opening the store, binding the socket, accepting connections, shutting down gracefully.

use std::net::ToSocketAddrs;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Extension;
use cairn_api::config::{state_dir, Settings};
use cairn_nix::StoreDir;
use cairn_store::{GcSettings, LocalStore, StoreLayout};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};

use crate::api::router;
use crate::auth::Policy;
use crate::limits::{AcceptErrors, Connections, Limits, PeerKey};
use crate::send_timeout::SendDeadline;
use crate::state::AppState;

/// How long in-flight requests get to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    serve_with_config(settings, None).await
}

/// Runs the daemon until SIGTERM, SIGINT or a stop request; `config_file` is where its settings
/// came from, for `cairn daemon status`.
pub async fn serve_with_config(settings: Settings, config_file: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let control = Arc::new(crate::state::Control::new(settings.clone(), config_file));
    let nofile = crate::limits::raise_nofile_limit();
    let limits = Limits::from_settings(&settings, nofile);
    crate::stream::set_body_read_timeout(limits.body_read_timeout);
    let state = open_state(&settings, control.clone()).await?;
    let (store, store_dir, images, tag_owners) =
        (state.store.clone(), state.store_dir.clone(), state.images.clone(), state.tag_owners.clone());
    let substitution_policy = state.substitution.policy.clone();
    let policy = Policy { allowed: settings.allowed_users.clone(), trusted: settings.trusted_users.clone() };

    let socket = &settings.socket;
    // Socket activation: the supervisor bound the socket (and owns its file).
    let activated = crate::activation::inherited_listener()?;
    let owns_socket_file = activated.is_none();
    let listener = match activated {
        Some(l) => UnixListener::from_std(l).context("cannot use the socket systemd passed")?,
        None => {
            if let Some(parent) = socket.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("cannot create '{}'", parent.display()))?;
            }
            // We hold the store lock, so a socket file left here is a dead daemon's.
            let _ = std::fs::remove_file(socket);
            let l = cairn_api::socket::SocketAddress::of(socket)
                .and_then(|at| UnixListener::bind(at.path()))
                .with_context(|| format!("cannot listen on '{}'", socket.display()))?;
            // Everyone may connect; SO_PEERCRED and the user lists decide what they may do.
            std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
            l
        }
    };

    let app = router(state.clone());
    if let Some(addr) = &settings.listen {
        let keys = crate::state::secret_keys(&settings)?;
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on '{addr}' (listen in the config)"))?;
        tracing::info!(address = %tcp.local_addr()?, keys = keys.len(), "serving the store as a binary cache and an OCI registry");
        let registry = crate::listen::registry::RegistryServer::new(
            images.clone(),
            settings.accept_pushes,
            &state_dir(&settings.root),
            tag_owners.clone(),
        )
        .context("cannot prepare the registry's upload area")?;
        let cache = crate::listen::cache::router(Arc::new(crate::listen::cache::CacheServer {
            store: store.clone(),
            store_dir: store_dir.clone(),
            keys,
            pushes: settings.accept_pushes.then(|| substitution_policy.clone()),
            logs: state.builder.logs().clone(),
        }))
        .merge(crate::listen::registry::router(Arc::new(registry)));
        let app = match &settings.listen_auth_file {
            Some(f) => {
                let auth = crate::listen::auth::ListenAuth::load(f, settings.listen_anonymous_read)?;
                cache.layer(axum::middleware::from_fn_with_state(Arc::new(auth), crate::listen::auth::check))
            }
            None => {
                if !tcp.local_addr()?.ip().is_loopback() {
                    tracing::warn!(
                        "the listen address is open to anyone who reaches it: set listen-auth-file to require credentials"
                    );
                }
                cache
            }
        };
        let tls = match (&settings.listen_tls_cert, &settings.listen_tls_key) {
            (Some(cert), Some(key)) => {
                let tls = Arc::new(crate::listen::tls::Tls::new(cert, key)?);
                crate::listen::tls::reload_on_sighup(tls.clone())?;
                Some(tls)
            }
            (None, None) => None,
            _ => anyhow::bail!("listen-tls-cert and listen-tls-key go together: set both or neither"),
        };
        tokio::spawn(serve_tcp(tcp, app, Connections::new("listen", limits, None), tls));
    }
    tracing::info!(
        socket = %socket.display(),
        store = settings.store_dir,
        root = %settings.root.display(),
        "cairnd {} listening",
        env!("CARGO_PKG_VERSION")
    );

    // Load the reference graph in the background: start-up does not wait for it, and the first
    // closure query finds it ready (or waits for the load already under way).
    let preload = store.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = preload.preload_graph() {
            tracing::warn!("cannot load the reference graph: {e}");
        }
    });

    if settings.min_free > 0 {
        tokio::spawn(auto_gc(store.clone(), settings.clone()));
    }
    tokio::spawn(release_freed_memory());

    let graceful = GracefulShutdown::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let own = PeerKey::Uid(nix::unistd::geteuid().as_raw());
    if let Some(path) = &settings.nix_daemon_socket {
        let l = crate::listen::nix::bind(path)?;
        tracing::info!(socket = %path.display(), "speaking Nix's daemon protocol");
        let connections = Connections::new("nix-daemon-socket", limits, Some(own));
        tokio::spawn(crate::listen::nix::serve(l, state.clone(), policy.clone(), connections));
    }
    let connections = Connections::new("socket", limits, Some(own));
    let mut errors = AcceptErrors::new("socket");
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => { errors.succeeded(); stream }
                    Err(e) => { errors.failed(e).await; continue; }
                };
                let cred = match stream.peer_cred() {
                    Ok(c) => c,
                    Err(e) => { tracing::debug!("no peer credentials: {e}"); continue; }
                };
                let slot = match connections.admit(PeerKey::Uid(cred.uid())) {
                    Ok(slot) => slot,
                    Err(refusal) => {
                        connections.refuse(stream, &refusal, true);
                        continue;
                    }
                };
                let peer = crate::auth::Peer {
                    client: cred.pid().and_then(cairn_store::ClientId::of_pid),
                    ..policy.identify(cred.uid(), cred.gid())
                };
                tracing::debug!(user = peer.user, uid = peer.uid, "connection");
                let (app, limits, watcher) = (app.clone(), *connections.limits(), graceful.watcher());
                tokio::spawn(async move {
                    let _slot = slot;
                    let Some(handed) = crate::handover::receive(&stream, limits.header_read_timeout).await else {
                        tracing::debug!("connection closed: no request within the header-read timeout");
                        return;
                    };
                    let svc = TowerToHyperService::new(app.layer(Extension(peer)).layer(Extension(handed)));
                    let stream = SendDeadline::new(stream, limits.send_timeout);
                    let conn = watcher.watch(crate::limits::http1(&limits).serve_connection(TokioIo::new(stream), svc));
                    if let Err(e) = conn.await {
                        tracing::debug!("connection ended: {e}");
                    }
                });
            }
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = control.stop.notified() => break,
        }
    }
    drop(listener);
    if owns_socket_file {
        let _ = std::fs::remove_file(socket);
    }
    if let Some(path) = &settings.nix_daemon_socket {
        let _ = std::fs::remove_file(path);
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still running after {SHUTDOWN_GRACE:?}; stopping anyway");
    }
    if let Some(p2p) = &state.p2p {
        // Peers are told at once; a connection still shaking hands with a peer that is down
        // would hold the exit for seconds, and the process ends anyway.
        if tokio::time::timeout(std::time::Duration::from_secs(1), p2p.shutdown()).await.is_err() {
            tracing::debug!("p2p connections still draining at exit");
        }
    }
    crate::state::sweep_ssh_dirs(true);
    tracing::info!("stopped");
    Ok(())
}

/// Opens the store and everything the API's routes share: the substituters, the builder (with
/// the image builder registered), the images and the tag owners.
pub(crate) async fn open_state(
    settings: &Settings,
    control: Arc<crate::state::Control>,
) -> anyhow::Result<Arc<AppState>> {
    let store_dir = StoreDir::new(&settings.store_dir).context("invalid store directory")?;
    let layout = StoreLayout {
        real_store_dir: settings.root.join(store_dir.as_str().trim_start_matches('/')),
        state_dir: state_dir(&settings.root),
        store_dir: store_dir.clone(),
    };
    let gc = GcSettings {
        keep_derivations: settings.keep_derivations,
        keep_outputs: settings.keep_outputs,
        runtime_roots: settings.runtime_roots,
    };
    let store = tokio::task::spawn_blocking(move || LocalStore::open(layout).map(|s| s.with_gc_settings(gc))).await??;
    store.set_auto_optimise(settings.auto_optimise_store);
    if let Some(nix) = &settings.nix_state_dir {
        store.add_link_roots(nix.join("gcroots"));
        store.add_link_roots(nix.join("profiles"));
    }
    let store = Arc::new(store);
    // Scratch files of registry uploads a crash (or an older cairnd) left: no session holds them.
    crate::listen::registry::sweep_uploads(&state_dir(&settings.root));
    // Build directories of cairnds stopped before their background removal ran (before this
    // one builds anything: those with its own pid are an earlier process's too).
    let build_dir = settings.build_dir.clone();
    let swept = tokio::task::spawn_blocking(move || cairn_build::root::sweep_orphans(&build_dir)).await.unwrap_or(0);
    if swept > 0 {
        tracing::info!(removed = swept, dir = %settings.build_dir.display(), "removed build directories left by stopped daemons");
    }
    let swept = tokio::task::spawn_blocking(|| crate::state::sweep_ssh_dirs(false)).await.unwrap_or(0);
    if swept > 0 {
        tracing::info!(removed = swept, "removed SSH directories left by stopped daemons");
    }
    let tag_owners = Arc::new(crate::tag_owners::TagOwners::new(&state_dir(&settings.root)));
    let mut substitution = crate::state::Substitution::from_settings(settings, &store_dir)?;
    let p2p = start_p2p(settings, &store).await?;
    substitution.peers = p2p.clone().map(|n| n as Arc<dyn cairn_store::peers::Peers>);
    let remotes = Arc::new(crate::api::realise::remotes(settings)?);
    let builder = Arc::new(
        cairn_build::Builder::new(store.clone(), crate::api::realise::build_settings(settings)?).with_remotes(remotes),
    );
    let images = cairn_image::Images::new(store.clone());
    let image_builder = Arc::new(crate::state::ImageBuiltin::new(images.clone()));
    builder.add_builtin("oci-image", image_builder.clone());
    let state =
        Arc::new(AppState { store, store_dir, substitution, builder, images, image_builder, tag_owners, control, p2p });
    if let Some(node) = &state.p2p {
        node.take_pushes(Arc::new(crate::api::peers::PushReceiver { state: Arc::downgrade(&state) }));
    }
    Ok(state)
}

/// Starts the p2p node if `p2p-listen` or `peers` is set.
async fn start_p2p(settings: &Settings, store: &Arc<LocalStore>) -> anyhow::Result<Option<Arc<cairn_p2p::Node>>> {
    if settings.p2p_listen.is_none() && settings.peers.is_empty() {
        return Ok(None);
    }
    let listen = match &settings.p2p_listen {
        Some(l) => Some(
            l.to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .with_context(|| format!("p2p-listen: '{l}' is not HOST:PORT"))?,
        ),
        None => None,
    };
    let config = cairn_p2p::Config {
        listen,
        peers: settings.peers.clone(),
        local_discovery: settings.p2p_local_discovery,
        state_dir: state_dir(&settings.root),
        max_transfers_per_peer: settings.p2p_max_transfers_per_peer,
        upload_rate: settings.p2p_upload_rate,
        keys: crate::state::secret_keys(settings)?,
    };
    Ok(Some(Arc::new(cairn_p2p::Node::start(config, store.clone()).await?)))
}

/// Serves the binary cache and the registry on `listen`, under the same limits as the socket
/// (counted per client address, as a TCP peer has no user).
async fn serve_tcp(
    tcp: TcpListener,
    app: axum::Router,
    connections: Arc<Connections>,
    tls: Option<Arc<crate::listen::tls::Tls>>,
) {
    let mut errors = AcceptErrors::new("listen");
    loop {
        let (stream, addr) = match tcp.accept().await {
            Ok(c) => {
                errors.succeeded();
                c
            }
            Err(e) => {
                errors.failed(e).await;
                continue;
            }
        };
        let slot = match connections.admit(PeerKey::of_ip(addr.ip())) {
            Ok(slot) => slot,
            Err(refusal) => {
                connections.refuse(stream, &refusal, false);
                continue;
            }
        };
        // Small answers (narinfos, registry HEADs) leave at once rather than after Nagle's delay.
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(app.clone());
        let http = crate::limits::http1(connections.limits());
        let send_timeout = connections.limits().send_timeout;
        let Some(tls) = &tls else {
            let conn = http.serve_connection(TokioIo::new(SendDeadline::new(stream, send_timeout)), svc);
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = conn.await {
                    tracing::debug!(client = %addr, "connection ended: {e}");
                }
            });
            continue;
        };
        // The handshake on the connection's own task (a slow client holds only its slot), in
        // the time a request head gets.
        let acceptor = tls.acceptor();
        let handshake_limit = connections.limits().header_read_timeout.unwrap_or(std::time::Duration::from_secs(30));
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(handshake_limit, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(client = %addr, "TLS handshake failed: {e}"),
                Err(_) => return tracing::debug!(client = %addr, "TLS handshake timed out"),
            };
            let stream = SendDeadline::new(stream, send_timeout);
            if let Err(e) = http.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(client = %addr, "connection ended: {e}");
            }
        });
    }
}

/// Hands memory that was freed back to the system every [`TRIM_EVERY`].
///
/// Under load the daemon runs on dozens of threads, and glibc's allocator gives each of them an
/// arena of its own; what a burst of requests freed stays in those arenas, counted in the
/// daemon's resident memory, until something asks for it back. Measured after 400 concurrent
/// adds, closure queries and realisations: 114 MiB resident, 48 MiB once the idle threads had
/// gone and `malloc_trim` had run, against 18 MiB at start. So the daemon trims on a timer
/// (a walk of the free lists, a millisecond or two on a large heap, off the async threads).
async fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut every = tokio::time::interval(TRIM_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            // SAFETY: malloc_trim(3) only returns free memory of the allocator's own arenas to
            // the system; it takes the arenas' locks and touches no memory in use.
            #[allow(unsafe_code)]
            let _ = tokio::task::spawn_blocking(|| unsafe { nix::libc::malloc_trim(0) }).await;
        }
    }
}

/// Caps glibc's allocator at one arena per core (its default is eight per core). Memory a
/// burst of requests freed in many arenas stays fragmented there, small live objects pinning
/// whole pages that no trim can return. Measured with the soak (64 clients, 2 minutes, 2
/// cores): anonymous memory 20.7 → 63.2 MiB after the load with the default, 10.5 → 22.3 MiB
/// with two arenas, and the same closure-query latencies. Call before any thread starts.
pub fn limit_allocator_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()).max(2);
        // SAFETY: mallopt(3) sets an allocator parameter; called before other threads exist,
        // it races with no allocation.
        #[allow(unsafe_code)]
        let _ = unsafe { nix::libc::mallopt(nix::libc::M_ARENA_MAX, cores as i32) };
    }
}

/// How often [`release_freed_memory`] trims.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Collects garbage whenever free space drops below `min-free`, checking every
/// `min-free-check-interval` seconds.
async fn auto_gc(store: Arc<LocalStore>, settings: Settings) {
    let mut every = tokio::time::interval(Duration::from_secs(settings.min_free_check_interval));
    loop {
        every.tick().await;
        let s = store.clone();
        let (min, max) = (settings.min_free, settings.max_free);
        match tokio::task::spawn_blocking(move || s.auto_gc(min, max)).await {
            Ok(Ok(Some(r))) => {
                tracing::info!(deleted = r.deleted.len(), bytes = r.bytes_freed, "automatic garbage collection")
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!("automatic garbage collection failed: {e}"),
            Err(e) => tracing::warn!("automatic garbage collection panicked: {e}"),
        }
    }
}
