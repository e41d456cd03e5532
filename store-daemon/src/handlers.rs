//! The API's routes on top of `LocalStore`.
//!
//! Store calls block (file system, SQLite), so each runs on tokio's blocking pool. Request
//! bodies reach them as `std::io::Read` through `SyncIoBridge`; streamed answers leave through a
//! bounded channel, so a slow client applies back-pressure instead of the daemon buffering a NAR.
//! A failure half-way through a streamed answer aborts the HTTP response, so the client sees an
//! error and never a silently truncated NAR.

use std::io::{self, BufReader, Write};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, Request as HttpRequest, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use cairn_api::{
    routes, AddMethod, AddQuery, DirEntry, ExportRequest, GcAction, PathQuery, Request, Response, VersionInfo,
};
use cairn_nix::StoreDir;
use cairn_store::{ClientScope, Direction, EntryKind, GcOptions, LocalStore, VerifyOptions};
use futures_util::TryStreamExt;
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::auth::Peer;
use crate::convert::{self, store_path, store_paths};
use crate::error::{ApiError, ApiResult};

/// What every handler shares.
pub struct AppState {
    pub store: Arc<LocalStore>,
    pub store_dir: StoreDir,
    /// Substituters, narinfo lookups and the trust policy for substituted paths.
    pub substitution: crate::substitute::Substitution,
    pub builder: Arc<cairn_build::Builder>,
    /// OCI images over the same store.
    pub images: cairn_image::Images,
    /// The builder of image derivations (registered with `builder` as `builtin:oci-image`).
    pub image_builder: Arc<crate::images::ImageBuiltin>,
    /// Who made each tag, and so who may move or remove it.
    pub tag_owners: Arc<crate::tag_owners::TagOwners>,
    /// The daemon's own status and settings, and its stop switch.
    pub control: Arc<crate::control::Control>,
}

type St = State<Arc<AppState>>;

/// One JSON line of a streamed answer.
pub(crate) fn json_line(v: &impl serde::Serialize) -> Bytes {
    let mut out = serde_json::to_vec(v).expect("events serialise");
    out.push(b'\n');
    out.into()
}

/// Runs `work` in its own task and answers with JSON lines: `progress()` five times a second
/// while it runs and once more at the end, then the event `work` ends with.
pub(crate) fn progress_lines<E: serde::Serialize + Send + 'static>(
    progress: impl Fn() -> E + Send + 'static,
    work: impl std::future::Future<Output = E> + Send + 'static,
) -> HttpResponse {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        tokio::pin!(work);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        let last = loop {
            tokio::select! {
                e = &mut work => break e,
                _ = tick.tick() => { let _ = tx.send(json_line(&progress())).await; }
            }
        };
        let _ = tx.send(json_line(&progress())).await;
        let _ = tx.send(json_line(&last)).await;
    });
    json_lines(rx)
}

/// A streamed answer of JSON lines, one per message received on `rx`, ending when its senders
/// are gone.
pub(crate) fn json_lines(rx: mpsc::Receiver<Bytes>) -> HttpResponse {
    let body =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx)) },
        );
    ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(body)).into_response()
}

/// The router, without per-connection state (the server adds the [`Peer`]).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(routes::VERSION, get(version))
        .route(routes::QUERY, post(query))
        .route(routes::ADD, post(add))
        .route(routes::NAR, get(nar))
        .route(routes::CAT, get(cat))
        .route(routes::EXPORT, post(export))
        .route(routes::IMPORT, post(import))
        .route(routes::SUBSTITUTE, post(crate::substitute::handler))
        .route(routes::RECEIVE, post(receive))
        .route(routes::REALISE, post(crate::build::realise))
        .route(routes::LOG, get(crate::build::log))
        .route(routes::OCI_IMPORT, post(crate::images::import))
        .route(routes::OCI_PULL, post(crate::images::pull))
        .route(routes::OCI_PUSH, post(crate::images::push))
        .route(routes::OCI_BUILD, post(crate::images::build))
        .route(routes::OCI_BLOB, get(oci_blob))
        .route(routes::DAEMON_STATUS, get(crate::control::status))
        .route(routes::DAEMON_CONFIG, get(crate::control::config))
        .route(routes::DAEMON_STOP, post(crate::control::stop))
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

/// Runs a blocking store call on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await?
}

async fn version(State(s): St, Extension(peer): Extension<Peer>) -> Json<VersionInfo> {
    Json(VersionInfo {
        api_version: cairn_api::API_VERSION,
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        store_dir: s.store_dir.as_str().to_owned(),
        trusted: peer.trusted,
        user: peer.user,
        settings_fingerprint: s.control.fingerprint().to_owned(),
    })
}

fn paths_out(dir: &StoreDir, v: impl IntoIterator<Item = cairn_nix::StorePath>) -> Response {
    Response::Paths(v.into_iter().map(|p| dir.display(&p)).collect())
}

/// A JSON answer serialised in one pass into a buffer sized for it. Large answers (a 100k-path
/// closure is 5 MB) would otherwise be copied again at every growth of a small buffer.
pub(crate) fn json_answer(v: &impl serde::Serialize, size_hint: usize) -> ApiResult<HttpResponse> {
    let mut buf = Vec::with_capacity(size_hint.max(256));
    serde_json::to_writer(&mut buf, v).map_err(|e| ApiError::internal(format!("cannot encode answer: {e}")))?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], buf).into_response())
}

/// A generous estimate of a response's JSON size.
fn size_hint(r: &Response) -> usize {
    match r {
        Response::Paths(v) => v.iter().map(|p| p.len() + 3).sum::<usize>() + 64,
        Response::Graph { nodes, edges } => {
            nodes.iter().map(|p| p.len() + 3).sum::<usize>()
                + edges.iter().map(|(a, b)| a.len() + b.len() + 8).sum::<usize>()
                + 64
        }
        Response::PathInfos(v) => v.len() * 512,
        _ => 4096,
    }
}

async fn query(State(s): St, Extension(peer): Extension<Peer>, Json(req): Json<Request>) -> ApiResult<HttpResponse> {
    if let Request::Verify { check_contents, repair: true } = req {
        let report = crate::substitute::verify_and_repair(s, peer, check_contents).await?;
        return json_answer(&report, 4096);
    }
    if let Request::ImageBuild(b) = req {
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        let r = crate::images::build_image(s, peer, b, events).await?;
        return json_answer(&r, 4096);
    }
    let st = s.clone();
    blocking(move || answer(&st, &peer, req)).await
}

/// `Response::Paths` of a closure, written straight from the graph into one buffer: no string
/// per path. Store path names are validated to `[A-Za-z0-9+._?=-]`, which JSON needs no escape
/// for; the store directory is escaped once.
fn closure_json(st: &AppState, paths: &[String]) -> ApiResult<HttpResponse> {
    let dir = &st.store_dir;
    let prefix = serde_json::to_string(&format!("{}/", dir.as_str())).expect("a string serialises");
    let prefix = &prefix[..prefix.len() - 1]; // the opening quote and the escaped directory
    let mut buf = Vec::with_capacity(1 << 16);
    buf.extend_from_slice(br#"{"kind":"paths","value":["#);
    let mut first = true;
    st.store.walk_map(&store_paths(dir, paths)?, Direction::References, |p| {
        if !std::mem::take(&mut first) {
            buf.push(b',');
        }
        buf.extend_from_slice(prefix.as_bytes());
        buf.extend_from_slice(p.hash_part().as_bytes());
        buf.push(b'-');
        buf.extend_from_slice(p.name().as_bytes());
        buf.push(b'"');
    })?;
    buf.extend_from_slice(b"]}");
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], buf).into_response())
}

/// Answers one query. A closure, the one answer that can hold 100k paths, is written by
/// [`closure_json`]; everything else is a [`Response`] serialised by [`json_answer`].
fn answer(st: &AppState, peer: &Peer, req: Request) -> ApiResult<HttpResponse> {
    let (store, dir) = (&st.store, &st.store_dir);
    let resp = match req {
        Request::ImageList
        | Request::ImageInspect { .. }
        | Request::ImageTag { .. }
        | Request::ImageUntag { .. }
        | Request::ImageUnpack { .. }
        | Request::AutomatonCreate(_)
        | Request::AutomatonList
        | Request::AutomatonShow { .. }
        | Request::AutomatonRemove { .. } => crate::images::answer(st, peer, req)?,
        // Realised by the builder, asynchronously: `query` answers it before coming here.
        Request::ImageBuild(_) => return Err(ApiError::internal("an image build reached the blocking queries")),
        Request::PathInfo { paths, closure } => {
            let mut paths = store_paths(dir, &paths)?;
            if closure {
                paths = store.walk(&paths, Direction::References)?;
            }
            let infos = paths
                .iter()
                .map(|p| Ok(convert::path_info(dir, &store.valid_path_info(p)?)))
                .collect::<ApiResult<Vec<_>>>()?;
            Response::PathInfos(infos)
        }
        Request::References { path } => paths_out(dir, store.valid_path_info(&store_path(dir, &path)?)?.references),
        Request::Referrers { path } => paths_out(dir, store.referrers(&store_path(dir, &path)?)?),
        Request::Closure { paths } => return closure_json(st, &paths),
        Request::ReferrersClosure { paths } => {
            let mut v = store.walk_map(&store_paths(dir, &paths)?, Direction::Referrers, |p| dir.display(p))?;
            v.reverse();
            Response::Paths(v)
        }
        Request::Graph { paths } => {
            let g = store.closure_graph(&store_paths(dir, &paths)?)?;
            let mut edges = Vec::new();
            let nodes = g
                .into_iter()
                .map(|(p, refs)| {
                    let from = dir.display(&p);
                    edges.extend(refs.iter().map(|r| (from.clone(), dir.display(r))));
                    from
                })
                .collect();
            Response::Graph { nodes, edges }
        }
        Request::Ls { path } => {
            let (p, inner) = dir.parse_inner(&path).map_err(|e| ApiError::bad_request(e.to_string()))?;
            let (kind, entries) = store.list(&p, inner)?;
            let listing = if kind == EntryKind::Directory {
                entries.into_iter().map(|e| dir_entry(&e.name, e.kind)).collect()
            } else {
                let name =
                    if inner.is_empty() { p.base_name() } else { inner.rsplit('/').next().unwrap_or(inner).to_owned() };
                vec![dir_entry(name.as_bytes(), kind)]
            };
            Response::Listing(listing)
        }
        Request::AddText { name, contents, references } => {
            let contents = base64::engine::general_purpose::STANDARD
                .decode(contents)
                .map_err(|e| ApiError::bad_request(format!("text contents are not base64: {e}")))?;
            let refs = store_paths(dir, &references)?.into_iter().collect();
            let _client = ClientScope::enter(peer.client);
            let info = store.add_text(&name, &contents, &refs)?;
            Response::PathInfos(vec![convert::path_info(dir, &info)])
        }
        Request::IsValid { paths } => {
            Response::Valid(store_paths(dir, &paths)?.iter().map(|p| store.is_valid(p)).collect::<Result<_, _>>()?)
        }
        Request::Gc { action, max_freed } => match action {
            GcAction::PrintRoots => Response::Roots(
                store
                    .roots()?
                    .into_iter()
                    .map(|r| cairn_api::RootInfo { origin: r.origin, path: dir.display(&r.path) })
                    .collect(),
            ),
            GcAction::PrintLive => paths_out(dir, store.live_paths()?),
            GcAction::PrintDead => paths_out(dir, store.dead_paths()?),
            GcAction::Collect | GcAction::DryRun => {
                let opts = GcOptions { dry_run: action == GcAction::DryRun, max_freed };
                Response::Gc(convert::gc_result(dir, store.collect_garbage(&opts)?))
            }
        },
        Request::Delete { paths } => {
            Response::Gc(convert::gc_result(dir, store.delete_paths(&store_paths(dir, &paths)?)?))
        }
        Request::AddRoot { link, path } => {
            let link = std::path::PathBuf::from(link);
            if !link.is_absolute() {
                return Err(ApiError::bad_request(format!("root link '{}' is not an absolute path", link.display())));
            }
            let p = store_path(dir, &path)?;
            // Kept for the client's life: it creates the link after this answer.
            let _client = ClientScope::enter(peer.client);
            store.add_indirect_root(&link, &p)?;
            tracing::info!(link = %link.display(), path, "root added");
            Response::Paths(vec![dir.display(&p)])
        }
        Request::Optimise => {
            let r = store.optimise()?;
            Response::Optimise(cairn_api::OptimiseResult {
                paths: r.paths,
                files_linked: r.files_linked,
                bytes_saved: r.bytes_saved,
            })
        }
        Request::Verify { check_contents, repair: _ } => {
            Response::Verify(convert::verify_result(dir, store.verify(VerifyOptions { check_contents })?))
        }
        Request::AddDerivation { aterm } => crate::build::add_derivation(st, &aterm)?,
        Request::DerivationOutputs { paths } => crate::build::derivation_outputs(st, &paths)?,
        Request::ImpureEnvVars { paths } => crate::build::impure_env_vars(st, &paths)?,
    };
    json_answer(&resp, size_hint(&resp))
}

fn dir_entry(name: &[u8], kind: EntryKind) -> DirEntry {
    let name = String::from_utf8_lossy(name).into_owned();
    match kind {
        EntryKind::Regular { executable, size } => DirEntry {
            name,
            kind: if executable { "executable" } else { "regular" }.into(),
            size: Some(size),
            target: None,
        },
        EntryKind::Symlink { target } => DirEntry {
            name,
            kind: "symlink".into(),
            size: None,
            target: Some(String::from_utf8_lossy(&target).into_owned()),
        },
        EntryKind::Directory => DirEntry { name, kind: "directory".into(), size: None, target: None },
    }
}

/// A request body as a blocking reader.
pub(crate) fn body_reader(body: Body) -> impl io::Read + Send + 'static {
    let stream = body.into_data_stream().map_err(io::Error::other);
    BufReader::with_capacity(1 << 20, SyncIoBridge::new(StreamReader::new(stream)))
}

/// How much of a refused upload is read and discarded before answering. An HTTP/1.1 client
/// that is still sending when the answer comes may see its write fail before it reads the
/// answer; draining lets it read why it was refused. Past this bound the connection is closed.
const DRAIN_LIMIT: u64 = 1 << 30;

/// Runs `consume` over an upload on the blocking pool; if it fails, drains the rest of the
/// upload (up to [`DRAIN_LIMIT`]) so that the client receives the error.
pub(crate) async fn upload<T: Send + 'static>(
    body: Body,
    consume: impl FnOnce(&mut dyn io::Read) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let mut input = body_reader(body);
    blocking(move || {
        let result = consume(&mut input);
        if result.is_err() {
            let _ = io::copy(&mut io::Read::take(&mut input, DRAIN_LIMIT), &mut io::sink());
        }
        result
    })
    .await
}

/// Refuses an upload without looking at it, but drains it first (see [`DRAIN_LIMIT`]).
async fn refuse_upload<T>(body: Body, e: ApiError) -> ApiResult<T> {
    let mut input = body_reader(body);
    blocking(move || {
        let _ = io::copy(&mut io::Read::take(&mut input, DRAIN_LIMIT), &mut io::sink());
        Ok(())
    })
    .await?;
    Err(e)
}

async fn add(
    State(s): St,
    Extension(peer): Extension<Peer>,
    Query(q): Query<AddQuery>,
    body: Body,
) -> ApiResult<Json<cairn_api::PathInfo>> {
    let info = upload(body, move |input| {
        let _client = ClientScope::enter(peer.client);
        let info = match q.method {
            AddMethod::Nar => s.store.add_nar(&q.name, input)?,
            AddMethod::Flat => {
                let size = q.size.ok_or_else(|| ApiError::bad_request("a flat add needs size=BYTES"))?;
                s.store.add_flat(&q.name, input, size, q.executable)?
            }
        };
        tracing::info!(path = %s.store_dir.display(&info.path), "added");
        Ok(convert::path_info(&s.store_dir, &info))
    })
    .await?;
    Ok(Json(info))
}

/// A `Write` whose bytes become a streamed response body. Dropping it without
/// [`finish`](Self::finish) after an error ends the body with that error.
pub(crate) struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
}

const CHUNK: usize = 256 * 1024;

impl ChannelWriter {
    fn new() -> (ChannelWriter, Body) {
        let (tx, rx) = mpsc::channel(8);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        (ChannelWriter { tx, buf: BytesMut::with_capacity(CHUNK) }, Body::from_stream(stream))
    }

    fn send(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = self.buf.split().freeze();
            self.tx
                .blocking_send(Ok(chunk))
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))?;
            self.buf.reserve(CHUNK);
        }
        Ok(())
    }

    fn fail(self, message: String) {
        let _ = self.tx.blocking_send(Err(io::Error::other(message)));
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Streams what `produce` writes; checks done before it are reported with a status code.
pub(crate) fn stream_response(
    produce: impl FnOnce(&mut ChannelWriter) -> Result<(), cairn_store::StoreError> + Send + 'static,
) -> HttpResponse {
    let (mut w, body) = ChannelWriter::new();
    tokio::task::spawn_blocking(move || match produce(&mut w).and_then(|_| w.flush().map_err(|e| e.into_store())) {
        Ok(()) => {}
        Err(e) => {
            tracing::warn!("streamed answer failed: {e}");
            w.fail(e.to_string());
        }
    });
    HttpResponse::new(body)
}

trait IntoStoreError {
    fn into_store(self) -> cairn_store::StoreError;
}

impl IntoStoreError for io::Error {
    fn into_store(self) -> cairn_store::StoreError {
        cairn_store::StoreError::Io { op: "send", path: "response".into(), source: self }
    }
}

async fn nar(State(s): St, Query(q): Query<PathQuery>) -> ApiResult<HttpResponse> {
    let p = store_path(&s.store_dir, &q.path)?;
    let st = s.clone();
    let p2 = p.clone();
    blocking(move || Ok(st.store.valid_path_info(&p2)?)).await?;
    Ok(stream_response(move |w| s.store.dump_path(&p, w)))
}

async fn cat(State(s): St, Query(q): Query<PathQuery>) -> ApiResult<HttpResponse> {
    let (p, inner) = s.store_dir.parse_inner(&q.path).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let inner = inner.to_owned();
    let st = s.clone();
    let mut file = blocking(move || Ok(st.store.open_file(&p, &inner)?)).await?;
    Ok(stream_response(move |w| io::copy(&mut file, w).map(|_| ()).map_err(|e| e.into_store())))
}

async fn oci_blob(
    State(s): St,
    Extension(peer): Extension<Peer>,
    Query(q): Query<cairn_api::BlobQuery>,
) -> ApiResult<HttpResponse> {
    let st = s.clone();
    let (blob, mut reader) = blocking(move || {
        let _client = ClientScope::enter(peer.client);
        let img = st.images.resolve(&q.image)?;
        let d = cairn_oci::Digest::parse(&q.digest)?;
        if !img.blobs.contains(&d) {
            return Err(ApiError::not_found(format!("image '{}' has no blob {d}", q.image)));
        }
        let blob = st
            .images
            .blob_of(&img, &d)?
            .ok_or_else(|| ApiError::not_found(format!("blob {d} of '{}' is not in the store", q.image)))?;
        let reader = st.images.open_blob(&blob)?;
        Ok((blob, reader))
    })
    .await?;
    Ok(stream_response(move |w| {
        let _blob = blob;
        io::copy(&mut reader, w).map(|_| ()).map_err(|e| e.into_store())
    }))
}

async fn export(State(s): St, Json(req): Json<ExportRequest>) -> ApiResult<HttpResponse> {
    let paths = store_paths(&s.store_dir, &req.paths)?;
    let st = s.clone();
    let check = paths.clone();
    blocking(move || {
        for p in &check {
            st.store.valid_path_info(p)?;
        }
        Ok(())
    })
    .await?;
    Ok(stream_response(move |w| s.store.export(&paths, w)))
}

/// A closure copied from another daemon, with its metadata (content addresses, signatures,
/// derivers) — what an export stream cannot carry.
async fn receive(State(s): St, Extension(peer): Extension<Peer>, body: Body) -> ApiResult<Json<Vec<String>>> {
    let added = upload(body, move |input| {
        let _client = ClientScope::enter(peer.client);
        let done = cairn_cache::push::receive(&s.store, &s.substitution.policy, !peer.trusted, input)?;
        tracing::info!(paths = done.added.len(), "received");
        if let Some((p, r)) = done.incomplete.first() {
            return Err(ApiError::bad_request(format!(
                "'{}' references '{}', which is neither valid nor in the stream",
                s.store_dir.display(p),
                s.store_dir.display(r)
            )));
        }
        Ok(done.added.iter().map(|i| s.store_dir.display(&i.path)).collect())
    })
    .await?;
    Ok(Json(added))
}

async fn import(
    State(s): St,
    Extension(peer): Extension<Peer>,
    body: Body,
) -> ApiResult<Json<Vec<cairn_api::PathInfo>>> {
    if !peer.trusted {
        let e = ApiError::forbidden(cairn_api::untrusted_import_message(&peer.user));
        return refuse_upload(body, e).await;
    }
    let infos = upload(body, move |input| {
        let _client = ClientScope::enter(peer.client);
        let infos = s.store.import(input)?;
        tracing::info!(paths = infos.len(), "imported");
        Ok(infos.iter().map(|i| convert::path_info(&s.store_dir, i)).collect())
    })
    .await?;
    Ok(Json(infos))
}
