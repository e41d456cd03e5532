//! The store served as a Nix binary cache over HTTP, on the optional `listen` address.
//!
//! Read-only and built from the database alone: `/nix-cache-info`, `/<hash>.narinfo` for every
//! valid path (signed at serve time with the keys of `secret-key-files`), and
//! `/nar/<hash>-<NAR hash>.nar[.zst]`, dumped from the store as it is sent (zstd-compressed on
//! the fly for `.zst`). Requests name paths only by hash part and NAR hash, both checked
//! character by character before the database is asked, so nothing but valid store paths can be
//! reached. `/log/<drv>` is the build log of a valid derivation, as text (what Nix's
//! `nix log --store URL` and a substituter's `getBuildLog` fetch). Uncompressed NARs honour
//! single `Range: bytes=…` requests (resumed downloads).

use std::io;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use cairn_nix::hash::Encoding;
use cairn_nix::narinfo::CacheInfo;
use cairn_nix::signing::SecretKey;
use cairn_nix::store_path::is_hash_part;
use cairn_nix::{StoreDir, StorePath};
use cairn_store::LocalStore;

use crate::stream::{parse_range, stream_response_for_listener, IntoStoreError, Window};

/// What the cache server needs.
pub struct CacheServer {
    pub store: Arc<LocalStore>,
    pub store_dir: StoreDir,
    pub keys: Vec<SecretKey>,
    /// `Some` (the receiver's trust policy) when pushes are accepted.
    pub pushes: Option<cairn_cache::Policy>,
    /// The builds' logs.
    pub logs: cairn_build::LogStore,
}

/// The cache's priority in `nix-cache-info` (as nix-serve: before cache.nixos.org's 40).
const PRIORITY: u32 = 30;

pub fn router(server: Arc<CacheServer>) -> Router {
    let mut r = Router::new()
        .route("/nix-cache-info", get(cache_info))
        .route("/{file}", get(narinfo))
        .route("/nar/{file}", get(nar))
        .route("/log/{file}", get(log));
    if server.pushes.is_some() {
        r = r
            .route(cairn_cache::push::MISSING_ROUTE, axum::routing::post(missing))
            .route(cairn_cache::push::PUSH_ROUTE, axum::routing::post(push));
    }
    r.fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") }).with_state(server)
}

/// Which of the store paths in the body (one per line) are not valid here.
async fn missing(State(s): St, body: String) -> Response {
    let st = s.clone();
    let answer = tokio::task::spawn_blocking(move || -> Result<String, String> {
        let mut out = String::new();
        for line in body.lines().filter(|l| !l.is_empty()) {
            let p = st.store_dir.parse(line).map_err(|e| e.to_string())?;
            if !st.store.is_valid(&p).map_err(|e| e.to_string())? {
                out.push_str(line);
                out.push('\n');
            }
        }
        Ok(out)
    })
    .await;
    match answer {
        Ok(Ok(text)) => text.into_response(),
        Ok(Err(e)) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
        Err(e) => internal(e),
    }
}

/// A push stream (see `cairn_cache::push`), received into one batch.
async fn push(State(s): St, body: Body) -> Response {
    let Some(policy) = s.pushes.clone() else { return not_found() };
    let mut input = crate::stream::body_reader(body);
    let store = s.store.clone();
    let dir = s.store_dir.clone();
    let received = tokio::task::spawn_blocking(move || {
        let r = cairn_cache::push::receive(&store, &policy, true, &mut input);
        if r.is_err() {
            // Read what is still coming (bounded), so that the sender gets the answer instead
            // of a broken connection.
            let _ = io::copy(&mut io::Read::take(&mut input, 1 << 30), &mut io::sink());
        }
        r
    });
    match received.await {
        Ok(Ok(done)) => {
            let added: Vec<String> = done.added.iter().map(|i| dir.display(&i.path)).collect();
            for p in &added {
                tracing::info!(path = p, "received by push");
            }
            let incomplete: Vec<String> = done.incomplete.iter().map(|(p, _)| dir.display(p)).collect();
            let answer = serde_json::json!({ "added": added, "incomplete": incomplete });
            ([(header::CONTENT_TYPE, "application/json")], answer.to_string()).into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!("push refused: {e}");
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
        Err(e) => internal(e),
    }
}

type St = State<Arc<CacheServer>>;

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "no such path in this cache\n").into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::warn!("binary cache: {e}");
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
}

/// The hash part a `HASH.narinfo` request names.
pub(crate) fn narinfo_file(file: &str) -> Option<&str> {
    file.strip_suffix(".narinfo").filter(|h| is_hash_part(h))
}

/// What a `nar/HASH-NARHASH.nar[.zst]` request names (the NAR hash as the narinfo's URL spells
/// it, in Nix's base-32).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NarFile<'a> {
    pub(crate) hash_part: &'a str,
    pub(crate) nar_hash: &'a str,
    pub(crate) compressed: bool,
}

pub(crate) fn nar_file(file: &str) -> Option<NarFile<'_>> {
    let (name, compressed) = match file.strip_suffix(".nar.zst") {
        Some(n) => (n, true),
        None => (file.strip_suffix(".nar")?, false),
    };
    let (hash_part, nar_hash) = name.split_once('-').filter(|(h, _)| is_hash_part(h))?;
    Some(NarFile { hash_part, nar_hash, compressed })
}

async fn cache_info(State(s): St) -> Response {
    let info = CacheInfo { store_dir: s.store_dir.as_str().to_owned(), want_mass_query: true, priority: PRIORITY };
    ([(header::CONTENT_TYPE, "text/x-nix-cache-info")], info.render()).into_response()
}

/// The valid path with this hash part, and its metadata.
async fn lookup(s: &Arc<CacheServer>, hash_part: &str) -> Result<Option<(StorePath, cairn_store::PathInfo)>, Response> {
    let st = s.clone();
    let hash_part = hash_part.to_owned();
    tokio::task::spawn_blocking(move || -> Result<_, cairn_store::StoreError> {
        let Some(p) = st.store.path_from_hash_part(&hash_part)? else { return Ok(None) };
        Ok(st.store.path_info(&p)?.map(|i| (p, i)))
    })
    .await
    .map_err(internal)?
    .map_err(internal)
}

async fn narinfo(State(s): St, UrlPath(file): UrlPath<String>) -> Response {
    let Some(hash_part) = narinfo_file(&file) else { return not_found() };
    let (path, info) = match lookup(&s, hash_part).await {
        Ok(Some(found)) => found,
        Ok(None) => return not_found(),
        Err(r) => return r,
    };
    let url = format!("nar/{}-{}.nar.zst", path.hash_part(), info.nar_hash.encode(Encoding::Nix32));
    let mut narinfo = info.into_narinfo(url, "zstd");
    for key in &s.keys {
        if let Err(e) = narinfo.sign(&s.store_dir, key) {
            return internal(e);
        }
    }
    ([(header::CONTENT_TYPE, "text/x-nix-narinfo")], narinfo.render(&s.store_dir)).into_response()
}

/// The build log of a valid derivation named by its base name, as text.
async fn log(State(s): St, UrlPath(file): UrlPath<String>) -> Response {
    let Ok(drv) = StorePath::from_base_name(&file) else { return not_found() };
    let st = s.clone();
    let found = tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, String> {
        if !drv.name().ends_with(".drv") || !st.store.is_valid(&drv).map_err(|e| e.to_string())? {
            return Ok(None);
        }
        st.logs.read(&drv).map_err(|e| e.to_string())
    })
    .await;
    match found {
        Ok(Ok(Some(text))) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
        Ok(Ok(None)) => (StatusCode::NOT_FOUND, "no build log of such a derivation in this cache\n").into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

async fn nar(State(s): St, UrlPath(file): UrlPath<String>, headers: HeaderMap) -> Response {
    let Some(NarFile { hash_part, nar_hash, compressed }) = nar_file(&file) else { return not_found() };
    let (path, info) = match lookup(&s, hash_part).await {
        Ok(Some(found)) => found,
        Ok(None) => return not_found(),
        Err(r) => return r,
    };
    // A URL from an old narinfo must not serve other contents.
    if info.nar_hash.encode(Encoding::Nix32) != nar_hash {
        return not_found();
    }
    let store = s.store.clone();
    if compressed {
        let mut resp = stream_response_for_listener(move |w| {
            let mut enc = zstd::stream::write::Encoder::new(w, 3).map_err(IntoStoreError::into_store)?;
            store.dump_path(&path, &mut enc)?;
            enc.finish().map_err(IntoStoreError::into_store)?;
            Ok(())
        });
        resp.headers_mut().insert(header::CONTENT_TYPE, "application/x-nix-nar".parse().expect("valid header"));
        return resp;
    }
    let len = info.nar_size;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|v| parse_range(v, len));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len),
        Some(Ok((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Some(Err(())) => {
            return (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))], "")
                .into_response()
        }
    };
    let resp = stream_response_for_listener(move |w| {
        let mut window = Window { inner: w, skip: start, take: end - start };
        match store.dump_path(&path, &mut window) {
            Ok(()) => Ok(()),
            // The range ended before the NAR did.
            Err(_) if window.take == 0 => Ok(()),
            Err(e) => Err(e),
        }
    });
    let (mut parts, body): (_, Body) = resp.into_parts();
    parts.status = status;
    let h = &mut parts.headers;
    h.insert(header::CONTENT_TYPE, "application/x-nix-nar".parse().expect("valid header"));
    h.insert(header::ACCEPT_RANGES, "bytes".parse().expect("valid header"));
    h.insert(header::CONTENT_LENGTH, (end - start).into());
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(header::CONTENT_RANGE, format!("bytes {start}-{}/{len}", end - 1).parse().expect("valid header"));
    }
    Response::from_parts(parts, body)
}
