//! Pulling an image from a registry into the store.
//!
//! The top manifest is fetched first (by tag or digest) and stored under the digest of its
//! bytes; an index is narrowed to one platform's manifest (or kept whole with all platforms);
//! then every config and layer not already in the store is downloaded, several at once, each
//! streamed straight into [`Images::add_blob`], which hashes while it writes and refuses bytes
//! whose digest or size is not the descriptor's. Blobs already in the store are not fetched at
//! all: that is what makes a second image sharing layers with the first cheap. Everything the
//! pull touches is rooted until the image's layout is registered (and tagged), so a concurrent
//! collection cannot take a blob between its arrival and the layout that references it.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cairn_oci::manifest::{is_manifest_type, Descriptor, Manifest, ManifestKind, Platform};
use cairn_oci::reference::Reference;
use cairn_oci::{Digest, TagName};
use futures_util::TryStreamExt;
use tokio_util::io::{StreamReader, SyncIoBridge};

use cairn_store::peers::{PeerOffer, Peers, Wanted};

use crate::images::{Image, Images, TempRootGuardSet};
use crate::registry::Registry;
use crate::{ImageError, Result};

/// What to pull.
#[derive(Clone)]
pub struct PullOptions {
    pub platform: Platform,
    pub all_platforms: bool,
    pub tag: Option<TagName>,
    /// Blobs downloaded at once.
    pub jobs: usize,
    /// Asked for each blob before the registry (`peers`); the digest still comes from the
    /// manifest the registry served.
    pub peers: Option<Arc<dyn Peers>>,
}

/// Counters a caller can watch while a pull runs.
#[derive(Default, Debug)]
pub struct Progress {
    pub blobs_total: AtomicU64,
    pub blobs_done: AtomicU64,
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
}

/// What a pull did.
#[derive(Debug)]
pub struct Pulled {
    pub image: Image,
    pub blobs_fetched: u64,
    pub bytes_fetched: u64,
    pub blobs_skipped: u64,
    pub bytes_skipped: u64,
}

/// Counts bytes into the progress as they pass, and stops the download once another blob of
/// the pull has failed.
struct Counting<R> {
    inner: R,
    progress: Arc<Progress>,
    cancel: Arc<std::sync::atomic::AtomicBool>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::other("the pull failed"));
        }
        let n = self.inner.read(buf)?;
        self.progress.bytes_done.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Registry { registry: "cairnd".into(), message: e.to_string() })?
}

/// Asks the peers for a blob and stores what one sends (refused unless it has the descriptor's
/// digest and size). `Err`: fetch it from the registry, holding the guard (if any) meanwhile.
async fn from_peers(images: &Images, peers: Option<&dyn Peers>, d: &Descriptor) -> Result<(), Option<Box<dyn Send>>> {
    let Some(peers) = peers else { return Err(None) };
    if d.digest.algo() != cairn_oci::DigestAlgo::Sha256 {
        return Err(None);
    }
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(d.digest.to_hash().as_bytes());
    let reader = match peers.find(Wanted::Blob { sha256, size: d.size }).await {
        PeerOffer::Bytes(reader) => reader,
        PeerOffer::Upstream(guard) => return Err(Some(guard)),
    };
    let (im, d) = (images.clone(), d.clone());
    let stored = blocking(move || im.add_blob(&d.digest, d.size, io::BufReader::with_capacity(1 << 20, reader))).await;
    stored.map(|_| ()).map_err(|e| {
        tracing::warn!("blob from peers refused: {e}; asking the registry");
        None
    })
}

/// Blobs a pull added, removed again if the pull fails: a refused image leaves nothing behind.
#[derive(Default, Clone)]
struct Added(Arc<std::sync::Mutex<Vec<Digest>>>);

impl Added {
    fn push(&self, d: &Digest) {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(d.clone());
    }

    /// Deletes the blobs added so far (those that nothing else has come to use meanwhile).
    async fn undo(self, images: &Images) {
        let digests = std::mem::take(&mut *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if digests.is_empty() {
            return;
        }
        let im = images.clone();
        let _ = tokio::task::spawn_blocking(move || im.forget(&digests)).await;
    }
}

/// Fetches a manifest, stores its bytes as a blob and parses it.
async fn fetch_manifest(
    images: &Images,
    reg: &Registry,
    reference: &Reference,
    declared: Option<&str>,
    roots: &mut TempRootGuardSet,
    added: &Added,
) -> Result<(Descriptor, Manifest)> {
    let f = reg.manifest(reference).await?;
    let m = Manifest::parse(&f.bytes, f.media_type.as_deref().or(declared))?;
    let d = Descriptor {
        media_type: m.media_type.clone(),
        digest: f.digest.clone(),
        size: f.bytes.len() as u64,
        platform: None,
        annotations: Default::default(),
    };
    roots.hold(images.root_blobs([&d.digest]));
    let (im, dg, bytes) = (images.clone(), d.digest.clone(), f.bytes);
    let new = blocking(move || {
        let new = !im.has_blob(&dg)?;
        im.add_blob(&dg, bytes.len() as u64, &bytes[..])?;
        Ok(new)
    })
    .await?;
    if new {
        added.push(&d.digest);
    }
    Ok((d, m))
}

/// Pulls `reference` of the registry's repository into the store. On failure the blobs it added
/// are deleted again.
pub async fn pull(
    images: Images,
    reg: Arc<Registry>,
    reference: &Reference,
    opts: PullOptions,
    progress: Arc<Progress>,
) -> Result<Pulled> {
    let added = Added::default();
    match pull_inner(images.clone(), reg, reference, opts, progress, added.clone()).await {
        Ok(p) => Ok(p),
        Err(e) => {
            added.undo(&images).await;
            Err(e)
        }
    }
}

async fn pull_inner(
    images: Images,
    reg: Arc<Registry>,
    reference: &Reference,
    opts: PullOptions,
    progress: Arc<Progress>,
    added: Added,
) -> Result<Pulled> {
    let mut roots = TempRootGuardSet::default();
    let (top_desc, top) = fetch_manifest(&images, &reg, reference, None, &mut roots, &added).await?;
    // The manifests the layout will list, and the image manifests whose blobs are needed.
    let mut tops = vec![top_desc.clone()];
    let mut image_manifests = Vec::new();
    match top.kind {
        ManifestKind::Image => image_manifests.push(top),
        ManifestKind::Index if !opts.all_platforms => {
            let child = top.select(&opts.platform)?.clone();
            let (mut d, m) = fetch_manifest(
                &images,
                &reg,
                &Reference::Digest(child.digest.clone()),
                Some(&child.media_type),
                &mut roots,
                &added,
            )
            .await?;
            if m.kind != ManifestKind::Image {
                return Err(cairn_oci::OciError::UnsupportedManifest(
                    "an index entry for a platform is itself an index".into(),
                )
                .into());
            }
            d.media_type = child.media_type.clone();
            d.platform = child.platform.clone();
            tops = vec![d];
            image_manifests.push(m);
        }
        ManifestKind::Index => {
            let mut todo: Vec<Descriptor> =
                top.children.iter().filter(|c| is_manifest_type(&c.media_type)).cloned().collect();
            let mut seen = BTreeSet::new();
            while let Some(c) = todo.pop() {
                if !seen.insert(c.digest.clone()) {
                    continue;
                }
                let (_, m) = fetch_manifest(
                    &images,
                    &reg,
                    &Reference::Digest(c.digest.clone()),
                    Some(&c.media_type),
                    &mut roots,
                    &added,
                )
                .await?;
                match m.kind {
                    ManifestKind::Image => image_manifests.push(m),
                    ManifestKind::Index => {
                        todo.extend(m.children.iter().filter(|c| is_manifest_type(&c.media_type)).cloned())
                    }
                }
            }
        }
    }

    // Configs and layers, once each, in manifest order.
    let mut blobs: Vec<Descriptor> = Vec::new();
    let mut seen = BTreeSet::new();
    for m in &image_manifests {
        for c in &m.children {
            if seen.insert(c.digest.clone()) {
                blobs.push(c.clone());
            }
        }
    }
    roots.hold(images.root_blobs(blobs.iter().map(|d| &d.digest)));
    let (mut missing, mut blobs_skipped, mut bytes_skipped) = (Vec::new(), 0u64, 0u64);
    for d in blobs {
        let (im, dg) = (images.clone(), d.digest.clone());
        if blocking(move || im.has_blob(&dg)).await? {
            blobs_skipped += 1;
            bytes_skipped += d.size;
        } else {
            missing.push(d);
        }
    }
    progress.blobs_total.store(missing.len() as u64, Ordering::Relaxed);
    progress.bytes_total.store(missing.iter().map(|d| d.size).sum(), Ordering::Relaxed);

    let sem = Arc::new(tokio::sync::Semaphore::new(opts.jobs.max(1)));
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for d in missing.clone() {
        let (images, reg, sem, progress) = (images.clone(), reg.clone(), sem.clone(), progress.clone());
        let (added, cancel, peers) = (added.clone(), cancel.clone(), opts.peers.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            if cancel.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Peers first; what they send is checked against the manifest's digest as the
            // registry's bytes are. Peers hear that this node fetches it until it is stored.
            let _fetching = match from_peers(&images, peers.as_deref(), &d).await {
                Ok(()) => {
                    added.push(&d.digest);
                    progress.bytes_done.fetch_add(d.size, Ordering::Relaxed);
                    progress.blobs_done.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(guard) => guard,
            };
            let r = reg.blob(&d.digest).await?;
            let stream = r.bytes_stream().map_err(|e| io::Error::other(cairn_net::with_causes(&e)));
            let reader = SyncIoBridge::new(StreamReader::new(stream));
            let p = progress.clone();
            let digest = d.digest.clone();
            blocking(move || {
                let counted = Counting { inner: reader, progress: p, cancel };
                images.add_blob(&d.digest, d.size, io::BufReader::with_capacity(1 << 20, counted)).map_err(
                    |e| match e {
                        ImageError::Store(s) => ImageError::Registry {
                            registry: reg.name.clone(),
                            message: format!("blob {}: {s}", d.digest),
                        },
                        other => other,
                    },
                )
            })
            .await?;
            added.push(&digest);
            progress.blobs_done.fetch_add(1, Ordering::Relaxed);
            Ok::<_, ImageError>(())
        });
    }
    // On the first failure the others are told to stop, and all are waited for: a download
    // still writing when the pull is undone would leave its blob behind.
    let mut first_error = None;
    while let Some(res) = tasks.join_next().await {
        let res =
            res.map_err(|e| ImageError::Registry { registry: "cairnd".into(), message: e.to_string() }).and_then(|r| r);
        if let Err(e) = res {
            cancel.store(true, Ordering::Relaxed);
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }

    let tag = opts.tag.clone();
    let im = images.clone();
    cairn_fault::point("pull-mid");
    let image = blocking(move || im.commit(tops, tag.as_ref())).await?;
    drop(roots);
    Ok(Pulled {
        image,
        blobs_fetched: missing.len() as u64,
        bytes_fetched: missing.iter().map(|d| d.size).sum(),
        blobs_skipped,
        bytes_skipped,
    })
}
