//! The store served as an OCI registry (the Distribution Spec's `/v2/` API) on the optional
//! `listen` address, beside the binary cache.
//!
//! A repository is the set of images whose tags carry its name (`NAME:TAG` roots) plus the
//! manifests pushed to it by digest (`NAME@alg-hex` roots, see `cairn_oci::tag`). Pulls read
//! everything from the store: manifests are served as their exact stored bytes (so digests are
//! the ones cairn holds), blobs as files streamed from their store paths with single-range
//! support. A blob or manifest is reachable through a repository only if one of that
//! repository's images holds it.
//!
//! With `accept-pushes = true` the same address takes pushes: upload sessions (POST, PATCH with
//! resumable ranges, PUT with the digest; monolithic POST; cross-repository mounts) write into
//! scratch files under `<state>/oci-uploads`, and the final PUT hands the file to the store,
//! which registers it only if it hashes to the digest. A manifest PUT stores the exact bytes,
//! checks that every blob and child manifest it names is in the repository, commits an image
//! layout, and roots it under the tag (or the digest) it was pushed as. Errors are the spec's
//! JSON codes.
//!
//! A blob uploaded or mounted into a repository is linked to it (a root link in
//! [`UPLOAD_GROUP`]), as distribution links it: it can be fetched through that repository at
//! once, a manifest pushed there may name it, and the collector keeps it until the manifest
//! comes. The link goes when a manifest of the repository names the blob (its image holds it
//! from then on), or after [`UPLOAD_LINK_TTL`] if none ever does; an unrooted record
//! (`<state>/oci-repository-blobs`) keeps the blob the repository's after that manifest is
//! deleted or its tag moves, until the collector takes it, as in distribution. A manifest may
//! name only blobs of its own repository (its images', links or records), and a mount takes a
//! blob only from a repository that holds it — so that a client limited to some repositories
//! cannot reach another's blobs by naming their digests.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use cairn_image::images::Image;
use cairn_image::{ImageError, Images};
use cairn_oci::manifest::Manifest;
use cairn_oci::tag::{digest_root_file_name, encode_name, parse_digest_root_file_name, ROOT_GROUP};
use cairn_oci::{Digest, TagName, MAX_MANIFEST_SIZE};
use futures_util::StreamExt;
use tokio::sync::Mutex;

use crate::stream::blocking;

/// Upload sessions untouched for this long are dropped.
const UPLOAD_IDLE: Duration = Duration::from_secs(3600);

/// Upload sessions open at once (each a scratch file, kept for [`UPLOAD_IDLE`]): far above what
/// pushes need (a client opens one per blob it sends, a few at a time), and a bound on what
/// clients that open sessions and never finish them can hold.
const MAX_UPLOADS: usize = 4096;

/// The root-link group of blobs uploaded or mounted into a repository
/// (`<repository>@<algorithm>-<hex>`, as a digest root's name).
pub const UPLOAD_GROUP: &str = "oci-uploads";

/// How long a blob's link to the repository it was pushed to lasts.
const UPLOAD_LINK_TTL: Duration = Duration::from_secs(24 * 3600);

/// How often expired links are looked for (at an upload's start).
const UPLOAD_LINK_SWEEP: Duration = Duration::from_secs(600);

/// What the registry server needs.
pub struct RegistryServer {
    pub images: Images,
    /// Whether pushes are accepted (`accept-pushes`).
    pub pushes: bool,
    /// Scratch files of upload sessions.
    pub upload_dir: PathBuf,
    pub uploads: Mutex<HashMap<String, Upload>>,
    /// Tag creators: a tag the registry moves or removes loses its record (the registry knows no
    /// users), under the same lock as the socket's tag changes.
    pub tag_owners: Arc<crate::tag_owners::TagOwners>,
    /// When expired upload links were last swept.
    swept: std::sync::Mutex<Option<Instant>>,
    /// Records (empty files, `REPO@alg-hex`) of the blobs a repository's manifests have named:
    /// not roots, so a blob stays the repository's after its manifest is deleted or its tag
    /// moves only until the collector takes it, as in distribution.
    held_dir: PathBuf,
}

/// An upload session: bytes received so far, in a scratch file.
pub struct Upload {
    repo: String,
    file: Scratch,
    size: u64,
    touched: Instant,
}

/// A scratch file under `oci-uploads`, removed when dropped: when its session ends or expires,
/// and when the request writing it fails or is dropped half-way (a client that closes its
/// connection mid-body makes hyper drop the handler's future, so no code after the failed read
/// would run to clean up). A file the store took is already gone; removing it again is a no-op.
pub struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

type St = State<Arc<RegistryServer>>;

/// The upload area under a state directory.
fn upload_dir(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("oci-uploads")
}

/// Empties the upload area, at start: sessions do not survive a restart, so whatever a crash or
/// a killed daemon left there belongs to no session and would never be removed otherwise.
pub fn sweep_uploads(state_dir: &std::path::Path) {
    let dir = upload_dir(state_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    let mut removed = 0u64;
    for e in entries.flatten() {
        if std::fs::remove_file(e.path()).or_else(|_| std::fs::remove_dir_all(e.path())).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(removed, dir = %dir.display(), "removed scratch files of registry uploads left by an earlier run");
    }
}

impl RegistryServer {
    /// A server whose upload area is `<state>/oci-uploads` (swept at start by [`sweep_uploads`]).
    pub fn new(
        images: Images,
        pushes: bool,
        state_dir: &std::path::Path,
        tag_owners: Arc<crate::tag_owners::TagOwners>,
    ) -> std::io::Result<RegistryServer> {
        let upload_dir = upload_dir(state_dir);
        std::fs::create_dir_all(&upload_dir)?;
        let held_dir = state_dir.join("oci-repository-blobs");
        std::fs::create_dir_all(&held_dir)?;
        Ok(RegistryServer {
            images,
            pushes,
            upload_dir,
            uploads: Mutex::new(HashMap::new()),
            tag_owners,
            swept: std::sync::Mutex::new(None),
            held_dir,
        })
    }

    /// What the repository holds of pushed and once-named blobs (see [`Holdings::holds`]).
    fn holdings(&self) -> Holdings {
        Holdings { images: self.images.clone(), held_dir: self.held_dir.clone() }
    }

    /// Removes expired upload links and records of collected blobs, at most once per
    /// [`UPLOAD_LINK_SWEEP`], on the blocking pool (it lists and looks up files): the request
    /// that starts it does not wait for it.
    fn sweep_links(self: &Arc<Self>) {
        {
            let mut last = self.swept.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < UPLOAD_LINK_SWEEP) {
                return;
            }
            *last = Some(Instant::now());
        }
        let s = self.clone();
        tokio::task::spawn_blocking(move || s.sweep_now());
    }

    fn sweep_now(&self) {
        match self.images.store.remove_root_links_older_than(UPLOAD_GROUP, UPLOAD_LINK_TTL) {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "registry: expired links of pushed blobs removed"),
            Err(e) => tracing::warn!("registry: cannot sweep the links of pushed blobs: {e}"),
        }
        // Records of blobs the collector has taken since.
        let Ok(entries) = std::fs::read_dir(&self.held_dir) else { return };
        for e in entries.flatten() {
            let name = e.file_name();
            let gone = name
                .to_str()
                .and_then(parse_digest_root_file_name)
                .is_none_or(|(_, d)| !self.images.has_blob(&d).unwrap_or(true));
            if gone {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Which blobs a repository holds beyond its images': those pushed or mounted into it (rooted
/// links) and those its manifests once named (records, not roots), while they are stored.
#[derive(Clone)]
struct Holdings {
    images: Images,
    held_dir: PathBuf,
}

impl Holdings {
    /// Records that the repository's manifests named these blobs.
    fn remember(&self, repo: &str, digests: &[&Digest]) {
        for d in digests {
            let _ = std::fs::File::create(self.held_dir.join(digest_root_file_name(repo, d)));
        }
    }

    /// Whether the blob was pushed to, or named in, the repository, and is still stored.
    fn has(&self, repo: &str, d: &Digest) -> RResult<bool> {
        let file = digest_root_file_name(repo, d);
        let linked =
            self.images.store.root_link_target(UPLOAD_GROUP, &file)?.is_some_and(|p| p == self.images.blob_path(d));
        Ok((linked || self.held_dir.join(&file).exists()) && self.images.has_blob(d)?)
    }

    /// Whether anything was pushed or mounted into `repo`, or named by its manifests: a
    /// repository whose tags are all deleted is still there, as in distribution.
    fn any(&self, repo: &str) -> RResult<bool> {
        let ours = |file: &str| parse_digest_root_file_name(file).is_some_and(|(n, _)| n == repo);
        if self.images.store.root_links(UPLOAD_GROUP)?.iter().any(|(file, _)| ours(file)) {
            return Ok(true);
        }
        let Ok(entries) = std::fs::read_dir(&self.held_dir) else { return Ok(false) };
        Ok(entries.flatten().any(|e| e.file_name().to_str().is_some_and(ours)))
    }

    /// Whether repository `repo` holds blob `d`: one of its images does, or it has it otherwise.
    fn holds(&self, imgs: &[(Option<String>, Image)], repo: &str, d: &Digest) -> RResult<bool> {
        Ok(imgs.iter().any(|(_, i)| i.blobs.contains(d)) || self.has(repo, d)?)
    }
}

/// The repositories a request may see: its user's `listen-auth-file` prefixes (none: all),
/// put on the request by the listener's check, for the catalog.
#[derive(Debug, Clone, Default)]
pub(crate) struct Visible(Vec<String>);

impl Visible {
    pub(crate) fn new(prefixes: Vec<String>) -> Visible {
        Visible(prefixes)
    }

    pub(crate) fn shows(&self, repo: &str) -> bool {
        covers(&self.0, repo)
    }
}

/// Whether `repo` is one of `prefixes` or under one (`team` covers `team/…`, not `teams`); no
/// prefixes cover every repository.
pub(crate) fn covers(prefixes: &[String], repo: &str) -> bool {
    prefixes.is_empty()
        || prefixes.iter().any(|p| repo == p || repo.strip_prefix(p.as_str()).is_some_and(|rest| rest.starts_with('/')))
}

/// Links a stored blob to the repository it was pushed to (see the module's documentation).
fn link_blob(images: &Images, repo: &str, d: &Digest) -> RResult<()> {
    images.store.set_root_link(UPLOAD_GROUP, &digest_root_file_name(repo, d), &images.blob_path(d))?;
    Ok(())
}

pub fn router(server: Arc<RegistryServer>) -> Router {
    Router::new()
        .route("/v2/", get(base))
        // As distribution: the API root is `/v2/`.
        .route("/v2", get(|| async { axum::response::Redirect::permanent("/v2/") }))
        .route("/v2/{*rest}", any(dispatch))
        .with_state(server)
}

/// A spec error: status, code, message.
#[derive(Debug)]
pub struct RegError(StatusCode, &'static str, String);

impl IntoResponse for RegError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "errors": [{ "code": self.1, "message": self.2, "detail": null }] });
        (self.0, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
    }
}

fn reg_err(status: StatusCode, code: &'static str, msg: impl Into<String>) -> RegError {
    RegError(status, code, msg.into())
}

impl From<ImageError> for RegError {
    fn from(e: ImageError) -> RegError {
        match &e {
            ImageError::MissingBlob { .. } => reg_err(StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN", e.to_string()),
            ImageError::Oci(_) | ImageError::BlobSize { .. } => {
                reg_err(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", e.to_string())
            }
            ImageError::Store(cairn_store::StoreError::ContentMismatch { .. })
            | ImageError::Store(cairn_store::StoreError::SizeMismatch { .. }) => {
                reg_err(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string())
            }
            _ => {
                tracing::error!("registry: {e}");
                reg_err(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", "internal error (see cairnd's log)")
            }
        }
    }
}

impl From<cairn_store::StoreError> for RegError {
    fn from(e: cairn_store::StoreError) -> RegError {
        ImageError::Store(e).into()
    }
}

type RResult<T> = Result<T, RegError>;

impl From<tokio::task::JoinError> for RegError {
    fn from(e: tokio::task::JoinError) -> RegError {
        reg_err(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", format!("worker failed: {e}"))
    }
}

fn api_version_header() -> (header::HeaderName, HeaderValue) {
    (header::HeaderName::from_static("docker-distribution-api-version"), HeaderValue::from_static("registry/2.0"))
}

async fn base() -> Response {
    ([api_version_header(), (header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], "{}").into_response()
}

/// What a `/v2/<name>/…` path asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    Manifest(&'a str, &'a str),
    Blob(&'a str, &'a str),
    UploadStart(&'a str),
    Upload(&'a str, &'a str),
    Tags(&'a str),
    Referrers(&'a str, &'a str),
    Catalog,
}

impl<'a> Route<'a> {
    /// The repository the request acts on (none for the catalog).
    pub(crate) fn repository(&self) -> Option<&'a str> {
        match *self {
            Route::Manifest(n, _)
            | Route::Blob(n, _)
            | Route::UploadStart(n)
            | Route::Upload(n, _)
            | Route::Tags(n)
            | Route::Referrers(n, _) => Some(n),
            Route::Catalog => None,
        }
    }
}

/// Splits a path after `/v2/` at the last `/manifests/`, `/blobs/` … (names contain `/`).
pub(crate) fn route(rest: &str) -> Option<Route<'_>> {
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags(name));
    }
    if let Some(name) = rest.strip_suffix("/blobs/uploads/").or_else(|| rest.strip_suffix("/blobs/uploads")) {
        return Some(Route::UploadStart(name));
    }
    // What follows the keyword is one segment: `t/referrers/blobs/sha256:…` is a blob of the
    // repository `t/referrers`, not the referrers of `t`.
    let split =
        |keyword: &str| rest.rsplit_once(keyword).filter(|(name, tail)| !name.is_empty() && !tail.contains('/'));
    if let Some((name, id)) = split("/blobs/uploads/") {
        return Some(Route::Upload(name, id));
    }
    if let Some((name, r)) = split("/manifests/") {
        return Some(Route::Manifest(name, r));
    }
    if let Some((name, d)) = split("/referrers/") {
        return Some(Route::Referrers(name, d));
    }
    if let Some((name, d)) = split("/blobs/") {
        return Some(Route::Blob(name, d));
    }
    None
}

async fn dispatch(
    State(s): St,
    method: Method,
    UrlPath(rest): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    visible: Option<axum::Extension<Visible>>,
    body: Body,
) -> Response {
    let visible = visible.map(|v| v.0).unwrap_or_default();
    let result = match route(&rest) {
        None => Err(reg_err(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "no such route")),
        Some(Route::Catalog) if method == Method::GET => catalog(&s, &q, &visible).await,
        Some(r) => handle(&s, &method, r, &q, &headers, body).await,
    };
    let mut resp = result.unwrap_or_else(IntoResponse::into_response);
    let (k, v) = api_version_header();
    resp.headers_mut().insert(k, v);
    resp
}

/// A repository name a route may carry: distribution's path grammar (no host part).
pub(crate) fn name_ok(name: &str) -> RResult<()> {
    cairn_oci::tag::validate_registry_path(name)
        .and_then(|()| cairn_oci::tag::fits_digest_links(name))
        .map_err(|e| reg_err(StatusCode::BAD_REQUEST, "NAME_INVALID", e.to_string()))
}

pub(crate) fn digest_ok(d: &str) -> RResult<Digest> {
    Digest::parse(d).map_err(|e| reg_err(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string()))
}

async fn handle(
    s: &Arc<RegistryServer>,
    method: &Method,
    r: Route<'_>,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> RResult<Response> {
    let head = method == Method::HEAD;
    if !s.pushes && matches!(method.as_str(), "PUT" | "POST" | "PATCH" | "DELETE") {
        drain(body, DRAIN_LIMIT).await;
        return Err(reg_err(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "this registry is read-only (accept-pushes = false)",
        ));
    }
    match (method.as_str(), r) {
        ("GET", Route::Tags(name)) => {
            name_ok(name)?;
            tags_list(s, name, q).await
        }
        ("GET" | "HEAD", Route::Manifest(name, reference)) => {
            name_ok(name)?;
            get_manifest(s, name, reference, head, headers).await
        }
        ("GET" | "HEAD", Route::Blob(name, d)) => {
            name_ok(name)?;
            get_blob(s, name, &digest_ok(d)?, head, headers).await
        }
        ("GET", Route::Referrers(name, d)) => {
            name_ok(name)?;
            referrers(s, name, &digest_ok(d)?, q).await
        }
        ("PUT", Route::Manifest(name, reference)) => {
            name_ok(name)?;
            put_manifest(s, name, reference, headers, body).await
        }
        ("DELETE", Route::Manifest(name, reference)) => {
            name_ok(name)?;
            delete_manifest(s, name, reference).await
        }
        ("POST", Route::UploadStart(name)) => {
            name_ok(name)?;
            start_upload(s, name, q, body).await
        }
        ("PATCH", Route::Upload(name, id)) => {
            name_ok(name)?;
            patch_upload(s, name, id, headers, body).await
        }
        ("PUT", Route::Upload(name, id)) => {
            name_ok(name)?;
            finish_upload(s, name, id, q, body).await
        }
        ("GET", Route::Upload(name, id)) => upload_status(s, name, id).await,
        ("DELETE", Route::Upload(name, id)) => {
            let mut ups = s.uploads.lock().await;
            match ups.get(id) {
                Some(u) if u.repo == name => {
                    // Dropping the session removes its scratch file.
                    ups.remove(id);
                    Ok(StatusCode::NO_CONTENT.into_response())
                }
                _ => Err(reg_err(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN", "no such upload")),
            }
        }
        ("DELETE", Route::Blob(..)) => Err(reg_err(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "blobs are deleted by the garbage collector once no image holds them",
        )),
        _ => Err(reg_err(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", format!("{method} is not supported here"))),
    }
}

/// The images of repository `name`, each with the tag or digest root naming it.
fn repo_images(images: &Images, name: &str) -> RResult<Vec<(Option<String>, Image)>> {
    let enc = encode_name(name);
    let mut out = Vec::new();
    for (file, path) in images.store.root_links(ROOT_GROUP)? {
        let tag = match TagName::from_file_name(&file) {
            Ok(t) if t.name() == name => Some(t.tag().to_owned()),
            Ok(_) => continue,
            Err(_) => match parse_digest_root_file_name(&file) {
                Some((n, _)) if n == name && file.starts_with(&enc) => None,
                _ => continue,
            },
        };
        if let Ok(img) = images.load(&path) {
            out.push((tag, img));
        }
    }
    Ok(out)
}

fn name_unknown(name: &str) -> RegError {
    reg_err(StatusCode::NOT_FOUND, "NAME_UNKNOWN", format!("repository '{name}' is not known"))
}

/// The repositories, as far as the client may see them (`listen-auth-file` prefixes).
async fn catalog(s: &Arc<RegistryServer>, q: &HashMap<String, String>, visible: &Visible) -> RResult<Response> {
    let images = s.images.clone();
    let names: BTreeSet<String> = blocking::<_, RegError>(move || {
        Ok(images
            .store
            .root_links(ROOT_GROUP)?
            .into_iter()
            .filter_map(|(f, _)| {
                TagName::from_file_name(&f)
                    .map(|t| t.name().to_owned())
                    .ok()
                    .or_else(|| parse_digest_root_file_name(&f).map(|(n, _)| n))
            })
            // A repository that so far holds only pushed blobs exists too, as in distribution.
            .chain(
                images
                    .store
                    .root_links(UPLOAD_GROUP)?
                    .into_iter()
                    .filter_map(|(f, _)| parse_digest_root_file_name(&f).map(|(n, _)| n)),
            )
            .collect())
    })
    .await?;
    // Only names a client can ask for by route (a tag kept as `HOST:PORT/NAME` cannot be).
    let names =
        names.into_iter().filter(|n| visible.shows(n) && cairn_oci::tag::validate_registry_path(n).is_ok()).collect();
    let (page, link) = paginate(names, q, "/v2/_catalog")?;
    let mut resp =
        ([(header::CONTENT_TYPE, "application/json")], serde_json::json!({ "repositories": page }).to_string())
            .into_response();
    if let Some(l) = link {
        resp.headers_mut().insert(header::LINK, l);
    }
    Ok(resp)
}

/// `n`/`last` pagination of sorted names, with the `Link` of the next page.
pub(crate) fn paginate(
    all: Vec<String>,
    q: &HashMap<String, String>,
    path: &str,
) -> RResult<(Vec<String>, Option<HeaderValue>)> {
    let after: Vec<String> = match q.get("last") {
        Some(last) => all.into_iter().filter(|t| t.as_str() > last.as_str()).collect(),
        None => all,
    };
    let n = match q.get("n") {
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            reg_err(StatusCode::BAD_REQUEST, "PAGINATION_NUMBER_INVALID", "n must be a whole number, 0 or more")
        })?),
        None => None,
    };
    match n {
        // Nothing asked, nothing more to follow (a `Link` to the same page would loop).
        Some(0) => Ok((Vec::new(), None)),
        Some(n) if after.len() > n => {
            let page: Vec<String> = after.into_iter().take(n).collect();
            let last = page.last().cloned().unwrap_or_default();
            let link = HeaderValue::from_str(&format!("<{path}?n={n}&last={last}>; rel=\"next\"")).ok();
            Ok((page, link))
        }
        _ => Ok((after, None)),
    }
}

async fn tags_list(s: &Arc<RegistryServer>, name: &str, q: &HashMap<String, String>) -> RResult<Response> {
    let (images, n, holdings) = (s.images.clone(), name.to_owned(), s.holdings());
    let (imgs, held) = blocking(move || {
        let imgs = repo_images(&images, &n)?;
        let held = imgs.is_empty() && holdings.any(&n)?;
        Ok::<_, RegError>((imgs, held))
    })
    .await?;
    if imgs.is_empty() && !held {
        return Err(name_unknown(name));
    }
    let mut tags: Vec<String> = imgs.into_iter().filter_map(|(t, _)| t).collect();
    tags.sort();
    let (page, link) = paginate(tags, q, &format!("/v2/{name}/tags/list"))?;
    let mut resp =
        ([(header::CONTENT_TYPE, "application/json")], serde_json::json!({ "name": name, "tags": page }).to_string())
            .into_response();
    if let Some(l) = link {
        resp.headers_mut().insert(header::LINK, l);
    }
    Ok(resp)
}

/// A manifest of the repository by tag or digest: its bytes and media type.
fn find_manifest(images: &Images, name: &str, reference: &str) -> RResult<(Digest, Vec<u8>, String)> {
    let imgs = repo_images(images, name)?;
    if imgs.is_empty() {
        return Err(name_unknown(name));
    }
    let unknown =
        || reg_err(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", format!("manifest '{reference}' is not in '{name}'"));
    let desc = if let Ok(d) = Digest::parse(reference) {
        if !imgs.iter().any(|(_, i)| i.blobs.contains(&d)) {
            return Err(unknown());
        }
        let size = images.blob_size(&d)?.ok_or_else(unknown)?;
        if size > MAX_MANIFEST_SIZE {
            return Err(unknown());
        }
        cairn_oci::Descriptor {
            media_type: String::new(),
            digest: d,
            size,
            platform: None,
            annotations: Default::default(),
        }
    } else {
        // A name no tag can have names no manifest here (distribution answers so too).
        cairn_oci::tag::validate_tag(reference).map_err(|_| unknown())?;
        let (_, img) = imgs.iter().find(|(t, _)| t.as_deref() == Some(reference)).ok_or_else(unknown)?;
        img.manifests[0].clone()
    };
    let bytes = images.read_manifest(&desc, "the repository").map_err(|_| unknown())?;
    let media_type = if desc.media_type.is_empty() {
        Manifest::parse(&bytes, None).map(|m| m.media_type).map_err(|_| unknown())?
    } else {
        desc.media_type.clone()
    };
    Ok((desc.digest, bytes, media_type))
}

/// Whether the client's `If-None-Match` names this digest's entity tag (or any): it has the
/// bytes already.
fn not_modified(headers: &HeaderMap, digest: &Digest) -> bool {
    let tag = format!("\"{digest}\"");
    headers.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|t| {
        let t = t.trim();
        // Quoted as an entity tag should be; some clients send the bare digest.
        t == "*" || t.strip_prefix("W/").unwrap_or(t) == tag || t == digest.to_string()
    })
}

async fn get_manifest(
    s: &Arc<RegistryServer>,
    name: &str,
    reference: &str,
    head: bool,
    headers: &HeaderMap,
) -> RResult<Response> {
    let (images, n, r) = (s.images.clone(), name.to_owned(), reference.to_owned());
    let (digest, bytes, media_type) = blocking(move || find_manifest(&images, &n, &r)).await?;
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&media_type).unwrap_or(HeaderValue::from_static("application/json")),
    );
    h.insert("docker-content-digest", HeaderValue::from_str(&digest.to_string()).expect("digests are ASCII"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len() as u64));
    h.insert(header::ETAG, HeaderValue::from_str(&format!("\"{digest}\"")).expect("ASCII"));
    if not_modified(headers, &digest) {
        // The length of what a 200 would carry (HTTP lets a 304 say it; a 0 would be false).
        return Ok((StatusCode::NOT_MODIFIED, h).into_response());
    }
    if head {
        return Ok((StatusCode::OK, h).into_response());
    }
    Ok((StatusCode::OK, h, bytes).into_response())
}

async fn get_blob(
    s: &Arc<RegistryServer>,
    name: &str,
    digest: &Digest,
    head: bool,
    headers: &HeaderMap,
) -> RResult<Response> {
    let (images, n, d) = (s.images.clone(), name.to_owned(), digest.clone());
    let holdings = s.holdings();
    let (blob, len) = blocking(move || {
        let imgs = repo_images(&images, &n)?;
        let unknown = || reg_err(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", format!("blob {d} is not in '{n}'"));
        let blob = match imgs.iter().find(|(_, i)| i.blobs.contains(&d)) {
            Some((_, img)) => images.blob_of(img, &d)?,
            // Pushed there and not yet named by a manifest, or named by one since deleted.
            None if holdings.has(&n, &d)? => images.find_blob(&d, None)?,
            None if imgs.is_empty() => return Err(name_unknown(&n)),
            None => return Err(unknown()),
        };
        let blob = blob.ok_or_else(unknown)?;
        let len = blob.size;
        Ok((blob, len))
    })
    .await?;
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert("docker-content-digest", HeaderValue::from_str(&digest.to_string()).expect("ASCII"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, HeaderValue::from_str(&format!("\"{digest}\"")).expect("ASCII"));
    if not_modified(headers, digest) {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        return Ok((StatusCode::NOT_MODIFIED, h).into_response());
    }
    let range =
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|v| crate::stream::parse_range(v, len));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len),
        Some(Ok((a, b))) => {
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {a}-{}/{len}", b - 1)).expect("ASCII"),
            );
            (StatusCode::PARTIAL_CONTENT, a, b)
        }
        Some(Err(())) => {
            h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes */{len}")).expect("ASCII"));
            return Ok((StatusCode::RANGE_NOT_SATISFIABLE, h).into_response());
        }
    };
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if head {
        return Ok((status, h).into_response());
    }
    // One blocking thread reads the blob (a file, or a streamed layer made now) and feeds the
    // body (no task per chunk); the blob stays rooted until it is sent. A streamed layer's range
    // is found by making and dropping the bytes before it.
    let images = s.images.clone();
    let mut resp = crate::stream::stream_response_for_listener(move |w| {
        let shown = images.store.store_dir().display(&blob.path);
        let io = |op, source| cairn_store::StoreError::Io { op, path: shown.clone().into(), source };
        let r: Box<dyn std::io::Read + Send> = match &blob.source {
            cairn_image::images::BlobSource::File(real) => {
                let mut f = std::fs::File::open(real).map_err(|e| io("open", e))?;
                std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(start)).map_err(|e| io("seek", e))?;
                Box::new(f)
            }
            cairn_image::images::BlobSource::Streamed(_) => {
                let mut r = images.open_blob(&blob).map_err(|e| io("open", std::io::Error::other(e.to_string())))?;
                std::io::copy(&mut std::io::Read::take(&mut r, start), &mut std::io::sink())
                    .map_err(|e| io("make", e))?;
                r
            }
        };
        // In 1 MiB reads (std's copy would read 8 KiB at a time: 128 Ki reads per GiB).
        let mut r = std::io::Read::take(r, end - start);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match std::io::Read::read(&mut r, &mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io("read", e)),
            };
            std::io::Write::write_all(w, &buf[..n]).map_err(|e| io("send", e))?;
        }
        Ok(())
    });
    *resp.status_mut() = status;
    resp.headers_mut().extend(h);
    Ok(resp)
}

async fn referrers(
    s: &Arc<RegistryServer>,
    name: &str,
    digest: &Digest,
    q: &HashMap<String, String>,
) -> RResult<Response> {
    let (images, n, d) = (s.images.clone(), name.to_owned(), digest.clone());
    let filter = q.get("artifactType").cloned();
    let found = blocking::<_, RegError>(move || {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for (_, img) in repo_images(&images, &n)? {
            for (desc, m) in images.image_manifests(&img)? {
                if m.subject.as_ref().is_some_and(|s| s.digest == d) && seen.insert(desc.digest.clone()) {
                    let artifact = m.artifact_type.clone().or_else(|| m.children.first().map(|c| c.media_type.clone()));
                    if filter.as_ref().is_some_and(|f| Some(f) != artifact.as_ref()) {
                        continue;
                    }
                    let mut v = desc.to_json();
                    if let Some(a) = artifact {
                        v["artifactType"] = a.into();
                    }
                    out.push(v);
                }
            }
        }
        Ok(out)
    })
    .await?;
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": cairn_oci::manifest::OCI_INDEX,
        "manifests": found,
    });
    let mut resp = ([(header::CONTENT_TYPE, cairn_oci::manifest::OCI_INDEX)], body.to_string()).into_response();
    if q.contains_key("artifactType") {
        resp.headers_mut().insert("oci-filters-applied", HeaderValue::from_static("artifactType"));
    }
    Ok(resp)
}

/// How much of a refused request body is read before answering (past it, the connection is
/// closed).
const DRAIN_LIMIT: u64 = 64 << 20;

/// Reads and discards up to `limit` bytes of a body.
async fn drain(body: Body, limit: u64) {
    let mut s = body.into_data_stream();
    let mut n = 0u64;
    while let Some(Ok(chunk)) = s.next().await {
        n += chunk.len() as u64;
        if n > limit {
            break;
        }
    }
}

/// A request body read whole, refused past `limit` bytes.
async fn read_body(body: Body, limit: u64) -> RResult<Vec<u8>> {
    let mut out = Vec::new();
    let mut s = body.into_data_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| reg_err(StatusCode::BAD_REQUEST, "UNKNOWN", format!("reading the body: {e}")))?;
        if out.len() as u64 + chunk.len() as u64 > limit {
            return Err(reg_err(
                StatusCode::PAYLOAD_TOO_LARGE,
                "SIZE_INVALID",
                format!("a manifest may have at most {limit} bytes"),
            ));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn put_manifest(
    s: &Arc<RegistryServer>,
    name: &str,
    reference: &str,
    headers: &HeaderMap,
    body: Body,
) -> RResult<Response> {
    let by_digest = Digest::parse(reference).ok();
    if by_digest.is_none() {
        cairn_oci::tag::validate_tag(reference)
            .map_err(|e| reg_err(StatusCode::BAD_REQUEST, "TAG_INVALID", e.to_string()))?;
    }
    let bytes = read_body(body, MAX_MANIFEST_SIZE).await?;
    // The manifest is served later with the type it was pushed with: it must be a manifest's,
    // and the one its JSON declares (as distribution checks), or pulls would read it as another.
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
        .filter(|t| cairn_oci::manifest::is_manifest_type(t))
        .ok_or_else(|| {
            reg_err(
                StatusCode::BAD_REQUEST,
                "MANIFEST_INVALID",
                "the Content-Type must be the manifest's media type (OCI or Docker schema 2)",
            )
        })?;
    let m = Manifest::parse(&bytes, Some(&content_type))
        .map_err(|e| reg_err(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", e.to_string()))?;
    if m.media_type != content_type {
        return Err(reg_err(
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
            format!("the manifest declares media type '{}' but was sent as '{content_type}'", m.media_type),
        ));
    }
    // A Docker schema 2 manifest or list says what it is (an OCI one may leave it out): one that
    // does not would be served as Docker's and read by clients as OCI's.
    let declared = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .is_some_and(|v| v.get("mediaType").is_some_and(|t| t.is_string()));
    if content_type.starts_with("application/vnd.docker.") && !declared {
        return Err(reg_err(
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
            format!("a manifest sent as '{content_type}' must declare it (its mediaType field)"),
        ));
    }
    let digest = match &by_digest {
        Some(want) if want.algo() == cairn_oci::DigestAlgo::Sha512 => {
            Digest::from_hash(&cairn_nix::Hash::digest(cairn_nix::HashAlgo::Sha512, &bytes)).expect("sha512")
        }
        _ => Digest::sha256_of(&bytes),
    };
    if let Some(want) = &by_digest {
        if *want != digest {
            return Err(reg_err(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                format!("the manifest's digest is {digest}, not {want}"),
            ));
        }
    }
    let desc = cairn_oci::Descriptor {
        media_type: m.media_type.clone(),
        digest: digest.clone(),
        size: bytes.len() as u64,
        platform: None,
        annotations: Default::default(),
    };
    let (images, n, r) = (s.images.clone(), name.to_owned(), reference.to_owned());
    let subject = m.subject.clone();
    let children = m.children.clone();
    let owners = s.tag_owners.clone();
    let holdings = s.holdings();
    let img = blocking(move || {
        let tag = match Digest::parse(&r) {
            Ok(_) => None,
            Err(_) => {
                Some(TagName::new(&n, &r).map_err(|e| reg_err(StatusCode::BAD_REQUEST, "TAG_INVALID", e.to_string()))?)
            }
        };
        // Every blob or manifest it names must be in this repository (not merely stored).
        let imgs = repo_images(&images, &n)?;
        for child in &children {
            if !holdings.holds(&imgs, &n, &child.digest)? {
                return Err(reg_err(
                    StatusCode::BAD_REQUEST,
                    "MANIFEST_BLOB_UNKNOWN",
                    format!("the manifest names {}, which is not in '{n}'", child.digest),
                ));
            }
        }
        let root = images.root_blobs([&desc.digest]);
        let new = !images.has_blob(&desc.digest)?;
        images.add_blob(&desc.digest, bytes.len() as u64, &bytes[..])?;
        let held = owners.hold();
        let committed = images.commit(vec![desc.clone()], tag.as_ref()).map_err(RegError::from).and_then(|img| {
            match &tag {
                Some(t) => owners.forget(&held, &t.file_name()),
                None => {
                    images.store.set_root_link(ROOT_GROUP, &digest_root_file_name(&n, &desc.digest), &img.layout)?
                }
            }
            Ok(img)
        });
        drop(held);
        if committed.is_ok() {
            // The image holds its blobs now: their links to the repository have served. They
            // stay the repository's (unrooted) if the manifest is later deleted or its tag moves,
            // as in distribution, until the collector takes them.
            holdings.remember(&n, &children.iter().map(|c| &c.digest).collect::<Vec<_>>());
            for child in &children {
                let _ = images.store.remove_root_link(UPLOAD_GROUP, &digest_root_file_name(&n, &child.digest));
            }
        }
        if committed.is_err() && new {
            // A refused manifest leaves nothing: its blob goes again.
            drop(root);
            images.forget(std::slice::from_ref(&desc.digest));
        }
        committed
    })
    .await?;
    tracing::info!(repository = name, reference, digest = %img.digest(), "manifest pushed");
    let mut h = HeaderMap::new();
    h.insert(header::LOCATION, HeaderValue::from_str(&format!("/v2/{name}/manifests/{digest}")).expect("ASCII"));
    h.insert("docker-content-digest", HeaderValue::from_str(&digest.to_string()).expect("ASCII"));
    if let Some(sub) = subject {
        h.insert("oci-subject", HeaderValue::from_str(&sub.digest.to_string()).expect("ASCII"));
    }
    Ok((StatusCode::CREATED, h).into_response())
}

async fn delete_manifest(s: &Arc<RegistryServer>, name: &str, reference: &str) -> RResult<Response> {
    let (images, n, r) = (s.images.clone(), name.to_owned(), reference.to_owned());
    let owners = s.tag_owners.clone();
    let removed = blocking::<_, RegError>(move || {
        let held = owners.hold();
        let mut removed = 0;
        match Digest::parse(&r) {
            Ok(d) => {
                let imgs = repo_images(&images, &n)?;
                // A manifest another of the repository's images holds (an index's child) would
                // still be served: refused, rather than answered "deleted" and kept.
                let holds_manifest = |i: &Image| {
                    i.digest() != &d
                        && i.blobs.contains(&d)
                        && images.image_manifests(i).is_ok_and(|ms| ms.iter().any(|(m, _)| m.digest == d))
                };
                if let Some((tag, holder)) = imgs.iter().find(|(_, i)| holds_manifest(i)) {
                    let by = tag.clone().unwrap_or_else(|| holder.digest().to_string());
                    return Err(reg_err(
                        StatusCode::CONFLICT,
                        "DENIED",
                        format!("manifest '{d}' is part of '{n}:{by}', which holds it: delete that first"),
                    ));
                }
                for (tag, img) in imgs {
                    if img.digest() == &d {
                        let file = match tag {
                            Some(t) => TagName::new(&n, &t).map(|t| t.file_name()).unwrap_or_default(),
                            None => digest_root_file_name(&n, &d),
                        };
                        if images.store.remove_root_link(ROOT_GROUP, &file)? {
                            owners.forget(&held, &file);
                            removed += 1;
                        }
                    }
                }
            }
            Err(_) => {
                let t =
                    TagName::new(&n, &r).map_err(|e| reg_err(StatusCode::BAD_REQUEST, "TAG_INVALID", e.to_string()))?;
                if images.store.remove_root_link(ROOT_GROUP, &t.file_name())? {
                    owners.forget(&held, &t.file_name());
                    removed += 1;
                }
            }
        }
        Ok(removed)
    })
    .await?;
    if removed == 0 {
        return Err(reg_err(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!("manifest '{reference}' is not in '{name}'"),
        ));
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

/// An unguessable upload id (32 hex digits from the kernel's random source).
fn new_upload_id() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn upload_headers(name: &str, id: &str, size: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::LOCATION, HeaderValue::from_str(&format!("/v2/{name}/blobs/uploads/{id}")).expect("ASCII"));
    h.insert("docker-upload-uuid", HeaderValue::from_str(id).expect("hex"));
    h.insert(header::RANGE, HeaderValue::from_str(&format!("0-{}", size.saturating_sub(1))).expect("ASCII"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
    h
}

fn blob_created(name: &str, digest: &Digest) -> Response {
    let mut h = HeaderMap::new();
    h.insert(header::LOCATION, HeaderValue::from_str(&format!("/v2/{name}/blobs/{digest}")).expect("ASCII"));
    h.insert("docker-content-digest", HeaderValue::from_str(&digest.to_string()).expect("ASCII"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
    (StatusCode::CREATED, h).into_response()
}

/// Appends a body to a scratch file; returns the new size.
async fn append(file: &std::path::Path, body: Body) -> RResult<u64> {
    let mut f =
        tokio::fs::OpenOptions::new().append(true).create(true).open(file).await.map_err(|e| {
            reg_err(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", format!("cannot write the upload: {e}"))
        })?;
    let mut s = body.into_data_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk
            .map_err(|e| reg_err(StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID", format!("reading the body: {e}")))?;
        tokio::io::AsyncWriteExt::write_all(&mut f, &chunk).await.map_err(|e| {
            reg_err(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", format!("cannot write the upload: {e}"))
        })?;
    }
    // tokio's File writes in the background: flush before asking the size (or reading it).
    tokio::io::AsyncWriteExt::flush(&mut f)
        .await
        .map_err(|e| reg_err(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", format!("cannot write the upload: {e}")))?;
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    Ok(len)
}

/// Hands an upload's scratch file to the store under `digest`; the file stays (its `Scratch`
/// owner removes it), so that an upload whose bytes are not `digest` can go on.
async fn commit_upload(s: &Arc<RegistryServer>, repo: &str, file: PathBuf, digest: Digest) -> RResult<()> {
    let (images, repo) = (s.images.clone(), repo.to_owned());
    blocking(move || {
        let result = (|| {
            let f = std::fs::File::open(&file).map_err(|e| {
                reg_err(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", format!("cannot read the upload: {e}"))
            })?;
            let size = f.metadata().map(|m| m.len()).unwrap_or(0);
            cairn_fault::point("push-receive-mid");
            // Rooted from before it is stored until it is linked.
            let _root = images.root_blobs([&digest]);
            // A blob the store already has is not stored again (and not read), but these bytes
            // must still be it: else naming a digest would link any blob the store holds —
            // another repository's — into this one without its bytes. Whether the store read
            // them is what counts (another push may store the blob meanwhile).
            let mut counted = CountingReader { inner: std::io::BufReader::with_capacity(1 << 20, f), count: 0 };
            images.add_blob(&digest, size, &mut counted)?;
            if counted.count < size {
                let again = std::fs::File::open(&file).map_err(|e| {
                    reg_err(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", format!("cannot read the upload: {e}"))
                })?;
                upload_is(&digest, again)?;
            }
            link_blob(&images, &repo, &digest)
        })();
        result.map_err(|e: RegError| {
            if e.1 == "MANIFEST_INVALID" {
                reg_err(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.2)
            } else {
                e
            }
        })
    })
    .await
}

/// Counts what is read through it.
struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: std::io::Read> std::io::Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Checks that an upload's bytes are the blob `digest` names.
fn upload_is(digest: &Digest, f: std::fs::File) -> RResult<()> {
    let expected = digest.to_hash();
    let mut hashed =
        cairn_nix::hash::HashingReader::new(std::io::BufReader::with_capacity(1 << 20, f), expected.algo());
    std::io::copy(&mut hashed, &mut std::io::sink())
        .map_err(|e| reg_err(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", format!("cannot read the upload: {e}")))?;
    if hashed.finish().0 != expected {
        return Err(reg_err(StatusCode::BAD_REQUEST, "DIGEST_INVALID", format!("the upload's bytes are not {digest}")));
    }
    Ok(())
}

async fn start_upload(
    s: &Arc<RegistryServer>,
    name: &str,
    q: &HashMap<String, String>,
    body: Body,
) -> RResult<Response> {
    s.sweep_links();
    if let (Some(d), Some(from)) = (q.get("mount"), q.get("from")) {
        // A blob `from` holds is linked here; otherwise this is an upload like any other (as
        // distribution answers a mount it cannot make).
        let d = digest_ok(d)?;
        let (images, dd, from, n) = (s.images.clone(), d.clone(), from.clone(), name.to_owned());
        let holdings = s.holdings();
        let mounted = blocking::<_, RegError>(move || {
            if cairn_oci::tag::validate_registry_path(&from).is_err() {
                return Ok(false);
            }
            let imgs = repo_images(&images, &from)?;
            if !holdings.holds(&imgs, &from, &dd)? {
                return Ok(false);
            }
            link_blob(&images, &n, &dd)?;
            Ok(true)
        })
        .await?;
        if mounted {
            return Ok(blob_created(name, &d));
        }
    }
    let id = new_upload_id();
    let file = Scratch(s.upload_dir.join(&id));
    if let Some(d) = q.get("digest") {
        // A monolithic upload: the body is the blob. `file` goes when this request ends, however
        // it ends.
        let d = digest_ok(d)?;
        append(&file.0, body).await?;
        commit_upload(s, name, file.0.clone(), d.clone()).await?;
        return Ok(blob_created(name, &d));
    }
    let mut ups = s.uploads.lock().await;
    // Expired sessions are dropped, and their files with them.
    ups.retain(|_, u| u.touched.elapsed() < UPLOAD_IDLE);
    if ups.len() >= MAX_UPLOADS {
        return Err(reg_err(
            StatusCode::TOO_MANY_REQUESTS,
            "TOOMANYREQUESTS",
            format!("{MAX_UPLOADS} uploads are open; finish or cancel one, or wait for idle ones to expire"),
        ));
    }
    std::fs::File::create(&file.0)
        .map_err(|e| reg_err(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", format!("cannot start the upload: {e}")))?;
    ups.insert(id.clone(), Upload { repo: name.to_owned(), file, size: 0, touched: Instant::now() });
    Ok((StatusCode::ACCEPTED, upload_headers(name, &id, 0)).into_response())
}

/// The session `id` of repository `name`, taken out of the table while a request works on it
/// (a second concurrent request on the same session is refused).
async fn take_upload(s: &Arc<RegistryServer>, name: &str, id: &str) -> RResult<Upload> {
    let mut ups = s.uploads.lock().await;
    match ups.get(id) {
        Some(u) if u.repo == name => Ok(ups.remove(id).expect("present")),
        _ => Err(reg_err(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN", "no such upload (or one in use)")),
    }
}

async fn patch_upload(
    s: &Arc<RegistryServer>,
    name: &str,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> RResult<Response> {
    let mut up = take_upload(s, name, id).await?;
    if let Some(r) = headers.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()) {
        let start = r.trim_start_matches("bytes ").split('-').next().and_then(|a| a.trim().parse::<u64>().ok());
        if start != Some(up.size) {
            // Read the refused chunk first: a client still sending would otherwise see the
            // connection reset instead of the answer.
            drain(body, DRAIN_LIMIT).await;
            let size = up.size;
            s.uploads.lock().await.insert(id.to_owned(), up);
            let mut resp = reg_err(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "BLOB_UPLOAD_INVALID",
                format!("the chunk must start at byte {size}"),
            )
            .into_response();
            let mut h = upload_headers(name, id, size);
            h.remove(header::CONTENT_LENGTH);
            resp.headers_mut().extend(h);
            return Ok(resp);
        }
    }
    // Out of the table while the chunk is written: a chunk that fails half-way (or whose
    // request is dropped when its client goes away) ends the session, and its file with it,
    // as that file would hold bytes past the session's recorded size.
    up.size = append(&up.file.0, body).await?;
    up.touched = Instant::now();
    let size = up.size;
    s.uploads.lock().await.insert(id.to_owned(), up);
    Ok((StatusCode::ACCEPTED, upload_headers(name, id, size)).into_response())
}

async fn finish_upload(
    s: &Arc<RegistryServer>,
    name: &str,
    id: &str,
    q: &HashMap<String, String>,
    body: Body,
) -> RResult<Response> {
    let Some(d) = q.get("digest") else {
        return Err(reg_err(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "the final PUT needs ?digest="));
    };
    let d = digest_ok(d)?;
    let mut up = take_upload(s, name, id).await?;
    up.size = append(&up.file.0, body).await?;
    match commit_upload(s, name, up.file.0.clone(), d.clone()).await {
        Ok(()) => Ok(blob_created(name, &d)),
        Err(e) if e.1 == "DIGEST_INVALID" => {
            // As distribution: the session stays, with what it holds, for a PUT with the
            // right digest (or more chunks); only a completed upload ends it.
            up.touched = Instant::now();
            s.uploads.lock().await.insert(id.to_owned(), up);
            Err(e)
        }
        Err(e) => Err(e),
    }
}

async fn upload_status(s: &Arc<RegistryServer>, name: &str, id: &str) -> RResult<Response> {
    let ups = s.uploads.lock().await;
    match ups.get(id) {
        Some(u) if u.repo == name => Ok((StatusCode::NO_CONTENT, upload_headers(name, id, u.size)).into_response()),
        _ => Err(reg_err(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN", "no such upload")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_split_at_the_last_keyword() {
        assert_eq!(route("a/b/manifests/v1"), Some(Route::Manifest("a/b", "v1")));
        assert_eq!(route("a/blobs/x/blobs/sha256:00"), Some(Route::Blob("a/blobs/x", "sha256:00")));
        assert_eq!(route("team/app/blobs/uploads/"), Some(Route::UploadStart("team/app")));
        assert_eq!(route("team/app/blobs/uploads/abc"), Some(Route::Upload("team/app", "abc")));
        assert_eq!(route("x/tags/list"), Some(Route::Tags("x")));
        assert_eq!(route("x/referrers/sha256:00"), Some(Route::Referrers("x", "sha256:00")));
        assert_eq!(route("_catalog"), Some(Route::Catalog));
        // Repositories named like a route's keywords keep their names.
        assert_eq!(route("t/referrers/blobs/sha256:00"), Some(Route::Blob("t/referrers", "sha256:00")));
        assert_eq!(route("t/blobs/uploads/blobs/sha256:00"), Some(Route::Blob("t/blobs/uploads", "sha256:00")));
        assert_eq!(route("t/manifests/manifests/v1"), Some(Route::Manifest("t/manifests", "v1")));
        assert_eq!(route("t/blobs/uploads/blobs/uploads/abc"), Some(Route::Upload("t/blobs/uploads", "abc")));
        assert_eq!(route("nothing"), None);
    }

    #[test]
    fn if_none_match_names_the_digest_s_entity_tag() {
        let d = Digest::sha256_of(b"x");
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::IF_NONE_MATCH, HeaderValue::from_str(v).unwrap());
            not_modified(&h, &d)
        };
        assert!(with(&format!("\"{d}\"")) && with(&format!("\"a\", W/\"{d}\"")) && with("*"));
        assert!(with(&d.to_string()), "the bare digest, as some clients send it");
        assert!(!with("\"sha256:00\""));
        assert!(!not_modified(&HeaderMap::new(), &d));
    }

    #[test]
    fn pagination() {
        let all: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let q: HashMap<String, String> = [("n".to_owned(), "2".to_owned())].into();
        let (page, link) = paginate(all.clone(), &q, "/v2/x/tags/list").unwrap();
        assert_eq!(page, ["a", "b"]);
        assert_eq!(link.unwrap().to_str().unwrap(), "</v2/x/tags/list?n=2&last=b>; rel=\"next\"");
        let q: HashMap<String, String> = [("n".to_owned(), "2".to_owned()), ("last".to_owned(), "b".to_owned())].into();
        assert_eq!(paginate(all.clone(), &q, "/").unwrap(), (vec!["c".to_owned()], None));
        let q: HashMap<String, String> = [("n".to_owned(), "0".to_owned())].into();
        assert_eq!(paginate(all.clone(), &q, "/").unwrap(), (vec![], None), "no link back to the same page");
        let q: HashMap<String, String> = [("n".to_owned(), "x".to_owned())].into();
        assert!(paginate(all, &q, "/").is_err());
    }
}
