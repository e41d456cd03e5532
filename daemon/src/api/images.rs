//! The image routes of the socket API (`/v1/oci/…`) and the image queries of `/v1/query`.
//!
//! Blobs and commits are content-addressed and verified, so any allowed user may add them, as
//! any allowed user may `cairn add`. Pulls and pushes run in the daemon — its connections, its
//! store writes, no copy through the socket — with the credentials the client read from the
//! caller's own auth files; they stream progress as JSON lines like substitutions do.

use std::io::{self, BufRead};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::Response as HttpResponse;
use axum::{Extension, Json};
use cairn_api::image::{
    AutomatonInfo, BuildEvent, BuiltInfo, DescriptorWire, ImageDetail, ImageEvent, ImageInfo, ImportItem, LayerInfo,
    PullRequest, PushRequest, RegistryOptions,
};
use cairn_api::{query, ErrorBody};
use cairn_image::images::Image;
use cairn_image::pull::{Progress, PullOptions};
use cairn_image::registry::{ClientOptions, Credentials, Registry};
use cairn_image::Images;
use cairn_nix::StorePath;
use cairn_oci::manifest::{Descriptor, Platform};
use cairn_oci::reference::{ImageRef, Reference};
use cairn_oci::{Digest, TagName};
use cairn_store::ClientScope;

use crate::auth::Peer;
use crate::error::{ApiError, ApiResult};
use crate::outbox::{dropped_text, forward, Line};
use crate::state::{AppState, St};
use crate::stream::{blocking, json_line, stream_response, upload, IntoStoreError};

/// Blobs moved at once by a pull or a push.
const JOBS: usize = 8;

fn descriptor_wire(d: &Descriptor) -> DescriptorWire {
    DescriptorWire {
        media_type: d.media_type.clone(),
        digest: d.digest.to_string(),
        size: d.size,
        platform: d.platform.as_ref().map(|p| p.to_string()),
    }
}

fn descriptor(w: &DescriptorWire) -> ApiResult<Descriptor> {
    Ok(Descriptor {
        media_type: w.media_type.clone(),
        digest: Digest::parse(&w.digest)?,
        size: w.size,
        platform: w.platform.as_deref().map(Platform::parse).transpose()?,
        annotations: Default::default(),
    })
}

/// The summary of a stored image.
pub(crate) fn image_info(images: &Images, img: &Image) -> ApiResult<ImageInfo> {
    let tags = images.tags_of(&img.layout)?.iter().map(ToString::to_string).collect();
    Ok(ImageInfo {
        tags,
        digest: img.digest().to_string(),
        media_type: img.manifests[0].media_type.clone(),
        layout: images.store.store_dir().display(&img.layout),
        size: images.size_of(img)?,
        blobs: img.blobs.len() as u64,
    })
}

fn detail(images: &Images, img: &Image) -> ApiResult<ImageDetail> {
    let info = image_info(images, img)?;
    let manifests = images.image_manifests(img)?;
    let dir = images.store.store_dir();
    let mut platforms = Vec::new();
    let mut config = None;
    let mut layers = Vec::new();
    let mut contents: Vec<DescriptorWire> = img.manifests.iter().map(descriptor_wire).collect();
    for (i, (d, m)) in manifests.iter().enumerate() {
        if !contents.iter().any(|c| c.digest == d.digest.to_string()) {
            contents.push(descriptor_wire(d));
        }
        for c in &m.children {
            if !contents.iter().any(|x| x.digest == c.digest.to_string()) {
                contents.push(descriptor_wire(c));
            }
        }
        let cfg_desc = &m.children[0];
        let cfg: Option<serde_json::Value> =
            images.read_manifest(cfg_desc, "the image").ok().and_then(|b| serde_json::from_slice(&b).ok());
        let platform = d.platform.as_ref().map(|p| p.to_string()).or_else(|| {
            let c = cfg.as_ref()?;
            Some(format!("{}/{}", c.get("os")?.as_str()?, c.get("architecture")?.as_str()?))
        });
        platforms.extend(platform);
        if i == 0 {
            config = cfg;
            layers = m
                .layers()
                .iter()
                .map(|l| LayerInfo {
                    media_type: l.media_type.clone(),
                    digest: l.digest.to_string(),
                    size: l.size,
                    path: dir.display(img.streamed.get(&l.digest).unwrap_or(&images.blob_path(&l.digest))),
                    streamed: img.streamed.contains_key(&l.digest),
                })
                .collect();
        }
    }
    // Index manifests the layout holds (all-platform pulls): listed too, so exports are whole.
    for d in &img.blobs {
        let s = d.to_string();
        if !contents.iter().any(|c| c.digest == s) {
            contents.push(DescriptorWire {
                media_type: "application/octet-stream".into(),
                digest: s,
                size: images.blob_of(img, d)?.map(|b| b.size).unwrap_or(0),
                platform: None,
            });
        }
    }
    Ok(ImageDetail { info, platforms, config, layers, contents })
}

fn automaton_info(dir: &cairn_nix::StoreDir, a: cairn_image::automaton::Automaton) -> AutomatonInfo {
    let abs = |b: &str| format!("{}/{b}", dir.as_str());
    AutomatonInfo {
        name: a.name,
        bundle: a.bundle.display().to_string(),
        paths: a.paths.iter().map(|p| abs(p)).collect(),
        mounted: a.mounted.len() as u64,
        image: a.image.as_deref().map(abs),
        rootfs: a.rootfs.as_deref().map(abs),
        args: a.args,
        env: a.env,
        whole_store: a.whole_store,
        writable: a.writable,
    }
}

/// The image queries of `POST /v1/query`, one function per operation, each returning its
/// operation's answer (`api::store::answer` routes them; nothing is routed twice).
pub(crate) fn list(st: &AppState) -> ApiResult<Vec<ImageInfo>> {
    let images = &st.images;
    let mut out = Vec::new();
    for (img, _) in images.list()? {
        out.push(image_info(images, &img)?);
    }
    Ok(out)
}

pub(crate) fn inspect(st: &AppState, q: query::ImageInspect) -> ApiResult<Box<ImageDetail>> {
    Ok(Box::new(detail(&st.images, &st.images.resolve(&q.image)?)?))
}

pub(crate) fn tag(st: &AppState, peer: &Peer, q: query::ImageTag) -> ApiResult<Vec<ImageInfo>> {
    let images = &st.images;
    let t = TagName::parse(&q.tag)?;
    let _client = ClientScope::enter(peer.client);
    let img = images.resolve(&q.image)?;
    st.tag_owners.set(&st.store, peer, &t, &img.layout)?;
    tracing::info!(tag = %t, layout = %st.store_dir.display(&img.layout), user = peer.user, "tagged");
    Ok(vec![image_info(images, &img)?])
}

pub(crate) fn untag(st: &AppState, peer: &Peer, q: query::ImageUntag) -> ApiResult<Vec<String>> {
    let tags = q.tags.iter().map(|t| TagName::parse(t)).collect::<Result<Vec<_>, _>>()?;
    let removed = st.tag_owners.remove(&st.store, peer, &tags)?;
    for t in &tags {
        tracing::info!(tag = %t, user = peer.user, "untagged");
    }
    Ok(removed.iter().map(|p| st.store_dir.display(p)).collect())
}

pub(crate) fn unpack(st: &AppState, peer: &Peer, q: query::ImageUnpack) -> ApiResult<cairn_api::image::UnpackedInfo> {
    let _client = ClientScope::enter(peer.client);
    let r = cairn_image::unpack::unpack(&st.images, &q.image)?;
    Ok(cairn_api::image::UnpackedInfo {
        path: st.store_dir.display(&r.path),
        layers: r.layers as u64,
        dropped_devices: r.dropped_devices,
        dropped_special_bits: r.dropped_special_bits,
        made_readable: r.made_readable,
        cached: r.cached,
    })
}

pub(crate) fn automaton_create(
    st: &AppState,
    peer: &Peer,
    a: cairn_api::image::AutomatonRequest,
) -> ApiResult<Vec<AutomatonInfo>> {
    let images = &st.images;
    let _client = ClientScope::enter(peer.client);
    let spec = cairn_image::automaton::AutomatonSpec {
        name: a.name,
        paths: crate::convert::store_paths(&st.store_dir, &a.paths)?,
        image: a.image.as_deref().map(|i| images.resolve(i)).transpose()?,
        whole_store: a.whole_store,
        writable: a.writable,
        args: a.args,
        env: a.env,
    };
    let made = cairn_image::automaton::create(images, &spec)?;
    tracing::info!(name = made.name, mounted = made.mounted.len(), "automaton created");
    Ok(vec![automaton_info(&st.store_dir, made)])
}

pub(crate) fn automaton_list(st: &AppState) -> ApiResult<Vec<AutomatonInfo>> {
    Ok(cairn_image::automaton::list(&st.images)?.into_iter().map(|a| automaton_info(&st.store_dir, a)).collect())
}

pub(crate) fn automaton_show(st: &AppState, q: query::AutomatonShow) -> ApiResult<Vec<AutomatonInfo>> {
    Ok(vec![automaton_info(&st.store_dir, cairn_image::automaton::get(&st.images, &q.name)?)])
}

pub(crate) fn automaton_remove(st: &AppState, q: query::AutomatonRemove) -> ApiResult<Vec<AutomatonInfo>> {
    let gone = cairn_image::automaton::remove(&st.images, &q.name)?;
    tracing::info!(name = gone.name, "automaton removed");
    Ok(vec![automaton_info(&st.store_dir, gone)])
}

/// `image build`: the image's derivation written and realised (by
/// [`ImageBuiltin`](crate::state::ImageBuiltin); nothing to do when its output is valid), then
/// tagged. The builder's events go to `events`.
pub async fn build_image(
    st: Arc<AppState>,
    peer: Peer,
    b: cairn_api::image::BuildRequest,
    events: tokio::sync::mpsc::UnboundedSender<cairn_build::Event>,
) -> ApiResult<Box<BuiltInfo>> {
    let st2 = st.clone();
    let tag = b.tag.as_deref().map(TagName::parse).transpose()?;
    let (tag2, peer2) = (tag.clone(), peer.clone());
    let (drv_path, out, roots, base_layers) = blocking(move || {
        let _client = ClientScope::enter(peer2.client);
        let (images, dir) = (&st2.images, &st2.store_dir);
        let opts = cairn_image::layered::BuildOptions {
            compression: cairn_image::layered::LayerCompression::parse(b.compression.as_deref().unwrap_or("none"))?,
            paths: crate::convert::store_paths(dir, &b.paths)?,
            from: b.from.as_deref().map(|f| images.resolve(f)).transpose()?,
            max_layers: b.max_layers.unwrap_or(100) as usize,
            entrypoint: b.entrypoint,
            cmd: b.cmd,
            env: b.env,
            materialise: b.materialise,
            copies: b
                .copy
                .iter()
                .map(|c| {
                    let (p, dest) = c
                        .split_once(':')
                        .ok_or_else(|| ApiError::bad_request(format!("--copy '{c}': expected PATH:DEST")))?;
                    cairn_image::layered::check_copy_dest(dest)?;
                    Ok((crate::convert::store_path(dir, p)?, dest.to_owned()))
                })
                .collect::<ApiResult<Vec<_>>>()?,
        };
        if opts.paths.is_empty() && opts.copies.is_empty() {
            return Err(ApiError::bad_request("nothing to build: name a store path (--closure or --copy)"));
        }
        for p in opts.paths.iter().chain(opts.copies.iter().map(|(p, _)| p)) {
            if !st2.store.is_valid(p)? {
                return Err(cairn_store::StoreError::NotValid(dir.display(p)).into());
            }
        }
        let base_layers = cairn_image::layered::check(images, &opts)?;
        let drv = cairn_image::layered::derivation(dir, &opts);
        let (drv_path, out, roots) =
            add_image_derivation(&st2, &peer2, drv, cairn_image::layered::NAME, tag2.as_ref())?;
        Ok((drv_path, out, roots, base_layers))
    })
    .await?;
    let cached = realise_image(&st, &drv_path, events).await?;
    blocking(move || {
        let _roots = roots;
        let images = &st.images;
        let image = images.load(&out)?;
        if let Some(t) = &tag {
            st.tag_owners.set(&st.store, &peer, t, &image.layout)?;
        }
        let written = st
            .image_builder
            .written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&drv_path)
            .unwrap_or(0);
        tracing::info!(digest = %image.digest(), written, cached, "image built");
        let dir = &st.store_dir;
        let layers = cairn_image::layered::layer_paths(images, &image, base_layers)?;
        Ok(Box::new(BuiltInfo {
            image: image_info(images, &image)?,
            layers: layers.iter().map(|l| l.iter().map(|p| dir.display(p)).collect()).collect(),
            layers_written: if cached { 0 } else { written as u64 },
            derivation: dir.display(&drv_path),
            cached,
        }))
    })
    .await
}

/// Writes an image derivation into the store (its output path computed); refuses a tag the
/// caller may not move before anything is built. Returns the derivation, its output, and roots
/// on both.
fn add_image_derivation(
    st: &AppState,
    peer: &Peer,
    mut drv: cairn_nix::derivation::Derivation,
    name: &str,
    tag: Option<&TagName>,
) -> ApiResult<(StorePath, StorePath, cairn_store::TempRootGuard)> {
    let dir = &st.store_dir;
    cairn_build::derivations::Derivations::new(&st.store).complete(&mut drv)?;
    let refs = drv.input_srcs.iter().map(|p| crate::convert::store_path(dir, p)).collect::<ApiResult<_>>()?;
    let info = st.store.add_text(&format!("{name}.drv"), drv.to_aterm().as_bytes(), &refs)?;
    let out = crate::convert::store_path(dir, &drv.outputs["out"].path)?;
    if let Some(t) = tag {
        st.tag_owners.check_set(&st.store, peer, t, &out)?;
    }
    let roots = st.store.temp_root([info.path.clone(), out.clone()]);
    Ok((info.path, out, roots))
}

/// Realises an image derivation; whether its output was valid already.
async fn realise_image(
    st: &Arc<AppState>,
    drv_path: &StorePath,
    events: tokio::sync::mpsc::UnboundedSender<cairn_build::Event>,
) -> ApiResult<bool> {
    let goal = cairn_build::Goal { drv: drv_path.clone(), outputs: None };
    let outcome = st.builder.realise(vec![goal], cairn_build::Options::default(), events).await?;
    if let Some((_, Err(m))) = outcome.results.first() {
        return Err(ApiError::internal(m.clone()));
    }
    Ok(outcome.built.is_empty())
}

/// `image squash` and `image combine`: a composition's derivation written and realised, the
/// result tagged.
pub async fn compose_image(
    st: Arc<AppState>,
    peer: Peer,
    c: cairn_api::image::ComposeRequest,
) -> ApiResult<Box<BuiltInfo>> {
    use cairn_api::image::ComposeKind;
    use cairn_image::compose::{Compose, Overrides, COMBINE_NAME, SQUASH_NAME};
    let tag = c.tag.as_deref().map(TagName::parse).transpose()?;
    let (st2, peer2, tag2) = (st.clone(), peer.clone(), tag.clone());
    let (drv_path, out, roots) = blocking(move || {
        let _client = ClientScope::enter(peer2.client);
        let images = &st2.images;
        let parts = c.images.iter().map(|i| images.resolve(i)).collect::<Result<Vec<_>, _>>()?;
        let (compose, name) = match c.kind {
            ComposeKind::Squash => {
                let [img] = <[_; 1]>::try_from(parts).map_err(|_| ApiError::bad_request("squash takes one image"))?;
                (Compose::Squash(img), SQUASH_NAME)
            }
            ComposeKind::Combine => {
                if parts.len() < 2 {
                    return Err(ApiError::bad_request("combine takes two images or more"));
                }
                let overrides = Overrides { entrypoint: c.entrypoint, cmd: c.cmd, env: c.env };
                (Compose::Combine { images: parts, overrides }, COMBINE_NAME)
            }
        };
        let drv = cairn_image::compose::derivation(&st2.store_dir, &compose);
        add_image_derivation(&st2, &peer2, drv, name, tag2.as_ref())
    })
    .await?;
    let (events, _) = tokio::sync::mpsc::unbounded_channel();
    let cached = realise_image(&st, &drv_path, events).await?;
    blocking(move || {
        let _roots = roots;
        let image = st.images.load(&out)?;
        if let Some(t) = &tag {
            st.tag_owners.set(&st.store, &peer, t, &image.layout)?;
        }
        tracing::info!(digest = %image.digest(), cached, "image composed");
        Ok(Box::new(BuiltInfo {
            image: image_info(&st.images, &image)?,
            layers: Vec::new(),
            layers_written: 0,
            derivation: st.store_dir.display(&drv_path),
            cached,
        }))
    })
    .await
}

/// The wire form of a builder's event, if the build's stream shows it.
fn build_event(dir: &cairn_nix::StoreDir, e: cairn_build::Event) -> Option<BuildEvent> {
    match e {
        cairn_build::Event::Started { drv, .. } => Some(BuildEvent::Started { drv: dir.display(&drv) }),
        cairn_build::Event::Log { drv, line } => {
            Some(BuildEvent::Log { drv: dir.display(&drv), line: String::from_utf8_lossy(&line).into_owned() })
        }
        // The end is the last line, from the answer.
        _ => None,
    }
}

/// `POST /v1/oci/build`: [`build_image`], its builder's events streamed as JSON lines, the last
/// the built image or the error.
pub async fn build(
    State(s): State<Arc<AppState>>,
    axum::Extension(peer): axum::Extension<Peer>,
    Json(req): Json<cairn_api::image::BuildRequest>,
) -> ApiResult<HttpResponse> {
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
    let (events, seen) = tokio::sync::mpsc::unbounded_channel();
    let dir = s.store_dir.clone();
    tokio::spawn(async move {
        let work = build_image(s, peer, req, events);
        // The build never waits for the client (see `outbox`).
        let convert = |e| {
            let e = build_event(&dir, e)?;
            Some(match &e {
                BuildEvent::Log { drv, .. } => Line::Log { drv: drv.clone(), line: json_line(&e) },
                _ => Line::Event(json_line(&e)),
            })
        };
        let note = |drv, n| json_line(&BuildEvent::Log { drv, line: dropped_text(n) });
        let answer = forward(work, seen, &tx, convert, note).await;
        let last = match answer {
            Ok(b) => BuildEvent::Built(b),
            Err(e) => {
                tracing::warn!("image build failed: {}", e.message);
                BuildEvent::Error(ErrorBody { kind: e.kind, message: e.message })
            }
        };
        let _ = tx.send(json_line(&last)).await;
    });
    Ok(crate::stream::json_lines(rx))
}

/// The longest item line of an import stream.
const MAX_ITEM_LINE: u64 = 64 * 1024;

/// `POST /v1/oci/import`: blobs and a commit in one stream, all or nothing.
pub async fn import(
    State(s): State<Arc<AppState>>,
    axum::Extension(peer): axum::Extension<Peer>,
    body: Body,
) -> ApiResult<Json<ImageInfo>> {
    let info = upload(body, move |input| {
        let mut r = std::io::BufReader::with_capacity(1 << 20, input);
        let mut roots = cairn_image::images::TempRootGuardSet::default();
        let mut added: Vec<Digest> = Vec::new();
        let result = (|| -> ApiResult<ImageInfo> {
            loop {
                let mut line = Vec::new();
                std::io::Read::take(&mut r, MAX_ITEM_LINE)
                    .read_until(b'\n', &mut line)
                    .map_err(|e| ApiError::bad_request(format!("reading the import stream: {e}")))?;
                if line.is_empty() {
                    return Err(ApiError::bad_request("the import stream ended without a commit"));
                }
                let item: ImportItem = serde_json::from_slice(&line)
                    .map_err(|e| ApiError::bad_request(format!("the import stream has a bad item: {e}")))?;
                match item {
                    ImportItem::Blob { digest, size } => {
                        let d = Digest::parse(&digest)?;
                        roots.hold(s.images.root_blobs([&d]));
                        let new = !s.images.has_blob(&d)?;
                        s.images.add_blob(&d, size, std::io::Read::take(&mut r, size))?;
                        if new {
                            added.push(d);
                        }
                    }
                    ImportItem::Commit(c) => {
                        if std::io::Read::read(&mut r, &mut [0u8; 1]).map_err(|e| ApiError::bad_request(e.to_string()))? != 0 {
                            return Err(ApiError::bad_request("the import stream continues after its commit"));
                        }
                        let manifests = c.manifests.iter().map(descriptor).collect::<ApiResult<Vec<_>>>()?;
                        let tag = c.tag.as_deref().map(TagName::parse).transpose()?;
                        let img = s.images.commit(manifests, None)?;
                        if let Some(t) = &tag {
                            s.tag_owners.set(&s.store, &peer, t, &img.layout)?;
                        }
                        tracing::info!(layout = %s.store_dir.display(&img.layout), digest = %img.digest(), "image imported");
                        return image_info(&s.images, &img);
                    }
                }
            }
        })();
        if result.is_err() {
            drop(roots);
            s.images.forget(&added);
        }
        result
    })
    .await?;
    Ok(Json(info))
}

/// A registry client's options: the request's credentials and TLS choice, the daemon's network
/// timeouts (the same `connect-timeout` and `stalled-download-timeout` binary caches use).
fn client_options(o: &RegistryOptions, net: &cairn_cache::NetOptions) -> ClientOptions {
    ClientOptions {
        net: net.clone(),
        credentials: o
            .credentials
            .as_ref()
            .map(|c| Credentials { username: c.username.clone(), password: c.password.clone() }),
        insecure: !o.tls_verify,
    }
}

fn progress_event(p: &Progress) -> ImageEvent {
    ImageEvent::Progress {
        blobs_total: p.blobs_total.load(Ordering::Relaxed),
        blobs_done: p.blobs_done.load(Ordering::Relaxed),
        bytes_total: p.bytes_total.load(Ordering::Relaxed),
        bytes_done: p.bytes_done.load(Ordering::Relaxed),
    }
}

/// Runs a transfer, streaming its progress and its outcome.
fn stream_job(
    progress: Arc<Progress>,
    work: impl std::future::Future<Output = ApiResult<ImageEvent>> + Send + 'static,
) -> HttpResponse {
    crate::stream::progress_lines(move || progress_event(&progress), async move {
        work.await.unwrap_or_else(|e| {
            tracing::warn!("image transfer failed: {}", e.message);
            ImageEvent::Error(ErrorBody { kind: e.kind, message: e.message })
        })
    })
}

/// `POST /v1/oci/pull`.
pub async fn pull(
    State(s): State<Arc<AppState>>,
    axum::Extension(peer): axum::Extension<Peer>,
    Json(req): Json<PullRequest>,
) -> ApiResult<HttpResponse> {
    let image = ImageRef::parse(req.source.trim_start_matches("docker://"))?;
    check_registry(&s, &peer, &image.registry)?;
    let tag = match &req.tag {
        Some(t) => Some(TagName::parse(t)?),
        None => image.default_tag(),
    };
    let platform = match &req.platform {
        Some(p) => Platform::parse(p)?,
        None => Platform::host(),
    };
    let peers = s.substitution.peers.clone();
    // The daemon tags the pulled image itself, as the caller may (see `tag_owners`).
    let opts = PullOptions { platform, all_platforms: req.all_platforms, tag: None, jobs: JOBS, peers };
    let progress = Arc::new(Progress::default());
    let p = progress.clone();
    let copts = client_options(&req.registry, &s.substitution.net);
    Ok(stream_job(progress, async move {
        let reg = Arc::new(Registry::connect(&image, &copts, false).await?);
        let pulled = cairn_image::pull::pull(s.images.clone(), reg, &image.reference, opts, p).await?;
        tracing::info!(
            image = %image, digest = %pulled.image.digest(), fetched = pulled.bytes_fetched,
            skipped = pulled.bytes_skipped, "pulled"
        );
        let st = s.clone();
        let pulled_image = pulled.image;
        let info = blocking(move || {
            if let Some(t) = &tag {
                st.tag_owners.set(&st.store, &peer, t, &pulled_image.layout)?;
            }
            image_info(&st.images, &pulled_image)
        })
        .await?;
        Ok(ImageEvent::Pulled {
            image: info,
            blobs_fetched: pulled.blobs_fetched,
            bytes_fetched: pulled.bytes_fetched,
            blobs_skipped: pulled.blobs_skipped,
            bytes_skipped: pulled.bytes_skipped,
        })
    }))
}

/// Untrusted users may have the daemon reach only the registries of `allowed-registries`:
/// otherwise any local user could point it at any host its network reaches.
fn check_registry(st: &AppState, peer: &Peer, registry: &str) -> ApiResult<()> {
    let allowed = &st.control.settings.allowed_registries;
    if peer.trusted || allowed.iter().any(|a| a == "*" || a == registry) {
        return Ok(());
    }
    Err(ApiError::forbidden(format!(
        "registry '{registry}' is not in allowed-registries: ask an administrator to add it, or use a trusted user"
    )))
}

/// `POST /v1/oci/push`.
pub async fn push(
    State(s): State<Arc<AppState>>,
    axum::Extension(peer): axum::Extension<Peer>,
    Json(req): Json<PushRequest>,
) -> ApiResult<HttpResponse> {
    let dest = ImageRef::parse(req.destination.trim_start_matches("docker://"))?;
    check_registry(&s, &peer, &dest.registry)?;
    let st = s.clone();
    let what = req.image.clone();
    let img = blocking::<_, ApiError>(move || Ok(st.images.resolve(&what)?)).await?;
    // Another repository of the destination registry that holds this image (by its tags), for
    // cross-repository mounts.
    let st = s.clone();
    let layout = img.layout.clone();
    let tags = blocking::<_, ApiError>(move || Ok(st.images.tags_of(&layout)?)).await?;
    let mount_from = tags.iter().find_map(|t| {
        let (host, repo) = t.name().split_once('/')?;
        (host == dest.registry && repo != dest.repository).then(|| repo.to_owned())
    });
    let progress = Arc::new(Progress::default());
    let p = progress.clone();
    let copts = client_options(&req.registry, &s.substitution.net);
    let reference: Reference = dest.reference.clone();
    Ok(stream_job(progress, async move {
        let reg = Arc::new(Registry::connect(&dest, &copts, true).await?);
        let opts = cairn_image::push::PushOptions { mount_from, jobs: JOBS, chunk_size: req.chunk_size };
        let pushed = cairn_image::push::push(s.images.clone(), reg, img, &reference, opts, p).await?;
        tracing::info!(destination = %dest, digest = %pushed.digest, uploaded = pushed.bytes_uploaded, "pushed");
        Ok(ImageEvent::Pushed {
            digest: pushed.digest.to_string(),
            blobs_uploaded: pushed.blobs_uploaded,
            bytes_uploaded: pushed.bytes_uploaded,
            blobs_skipped: pushed.blobs_skipped,
            blobs_mounted: pushed.blobs_mounted,
        })
    }))
}

pub(crate) async fn oci_blob(
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
