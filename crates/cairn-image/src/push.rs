//! Pushing a stored image to a registry.
//!
//! Configs and layers go first, several at once: a blob the repository already has (HEAD) is
//! skipped; one that another repository of the same registry has (known from the image's own
//! tags, `HOST/REPO:TAG` of a pull) is mounted; the rest are uploaded in one PUT each, streamed
//! from the store. Manifests follow, children before the index that lists them, each sent as its
//! exact stored bytes with its own media type, so the registry computes the digests cairn has.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cairn_oci::manifest::{is_manifest_type, Descriptor, Manifest};
use cairn_oci::reference::Reference;
use cairn_oci::Digest;

use crate::images::{Image, Images};
use crate::pull::Progress;
use crate::registry::Registry;
use crate::{ImageError, Result};

/// Chunks made on the blocking pool, as a stream.
pub fn blocking_stream(
    chunks: Box<dyn Iterator<Item = std::io::Result<Vec<u8>>> + Send>,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        for chunk in chunks {
            let failed = chunk.is_err();
            if tx.blocking_send(chunk.map(bytes::Bytes::from)).is_err() || failed {
                break;
            }
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

/// What a push did.
#[derive(Debug)]
pub struct Pushed {
    pub digest: Digest,
    pub blobs_uploaded: u64,
    pub bytes_uploaded: u64,
    pub blobs_skipped: u64,
    pub blobs_mounted: u64,
}

/// How a push sends blobs.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Another repository of the same registry that may hold the blobs (mounted from there).
    pub mount_from: Option<String>,
    /// Blobs at once.
    pub jobs: usize,
    /// Send blobs larger than this in chunks of this size; monolithic when `None`.
    pub chunk_size: Option<u64>,
}

/// Pushes `img` to the registry's repository under `reference`.
pub async fn push(
    images: Images,
    reg: Arc<Registry>,
    img: Image,
    reference: &Reference,
    opts: PushOptions,
    progress: Arc<Progress>,
) -> Result<Pushed> {
    let PushOptions { mount_from, jobs, chunk_size } = opts;
    let _roots = images.root_blobs(img.blobs.iter());
    // Manifests in push order (children first) and the other blobs.
    let im = images.clone();
    let img2 = img.clone();
    let (manifests, blobs) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut order: Vec<(Descriptor, Vec<u8>)> = Vec::new();
        let mut blobs: Vec<Descriptor> = Vec::new();
        fn visit(
            im: &Images,
            img: &Image,
            d: &Descriptor,
            order: &mut Vec<(Descriptor, Vec<u8>)>,
            blobs: &mut Vec<Descriptor>,
        ) -> Result<()> {
            if order.iter().any(|(o, _)| o.digest == d.digest) {
                return Ok(());
            }
            let bytes = im.read_manifest(d, "the image")?;
            let m = Manifest::parse(&bytes, Some(&d.media_type))?;
            for c in &m.children {
                if is_manifest_type(&c.media_type) {
                    if img.blobs.contains(&c.digest) {
                        visit(im, img, c, order, blobs)?;
                    }
                } else if !blobs.iter().any(|b| b.digest == c.digest) {
                    blobs.push(c.clone());
                }
            }
            order.push((d.clone(), bytes));
            Ok(())
        }
        for d in &img2.manifests {
            visit(&im, &img2, d, &mut order, &mut blobs)?;
        }
        Ok((order, blobs))
    })
    .await
    .map_err(|e| ImageError::Registry { registry: "cairnd".into(), message: e.to_string() })??;

    progress.blobs_total.store(blobs.len() as u64, Ordering::Relaxed);
    progress.bytes_total.store(blobs.iter().map(|b| b.size).sum(), Ordering::Relaxed);
    let uploaded = Arc::new(AtomicU64::new(0));
    let uploaded_bytes = Arc::new(AtomicU64::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let mounted = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(jobs.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let shared = Arc::new(img.clone());
    for d in blobs {
        let (images, reg, sem, progress) = (images.clone(), reg.clone(), sem.clone(), progress.clone());
        let img = shared.clone();
        let (uploaded, uploaded_bytes, skipped, mounted) =
            (uploaded.clone(), uploaded_bytes.clone(), skipped.clone(), mounted.clone());
        let mount_from = mount_from.clone();
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            let done = |p: &Progress| {
                p.blobs_done.fetch_add(1, Ordering::Relaxed);
                p.bytes_done.fetch_add(d.size, Ordering::Relaxed);
            };
            if reg.has_blob(&d.digest).await? {
                skipped.fetch_add(1, Ordering::Relaxed);
                done(&progress);
                return Ok::<_, ImageError>(());
            }
            let mount = mount_from.as_deref().map(|from| (&d.digest, from));
            let Some(location) = reg.start_upload(mount).await? else {
                mounted.fetch_add(1, Ordering::Relaxed);
                done(&progress);
                return Ok(());
            };
            // A stored blob's file, or a streamed layer made as it is sent (its last chunk fails,
            // and so the upload, unless the bytes have the digest).
            let (im, img, digest) = (images.clone(), img.clone(), d.digest.clone());
            let (_blob, reader) = tokio::task::spawn_blocking(move || -> Result<_> {
                let blob = im.blob_of(&img, &digest)?.ok_or_else(|| ImageError::MissingBlob {
                    digest: digest.to_string(),
                    referrer: "the image".into(),
                })?;
                let chunks = im.blob_chunks(&blob)?;
                Ok((blob, chunks))
            })
            .await
            .map_err(|e| ImageError::Registry { registry: "cairnd".into(), message: e.to_string() })??;
            let stream = blocking_stream(reader);
            match chunk_size {
                Some(c) if d.size > c => {
                    let reader = tokio_util::io::StreamReader::new(Box::pin(stream));
                    reg.put_blob_chunked(&location, &d.digest, reader, d.size, c.max(1)).await?
                }
                _ => reg.put_blob(&location, &d.digest, d.size, reqwest::Body::wrap_stream(stream)).await?,
            }
            uploaded.fetch_add(1, Ordering::Relaxed);
            uploaded_bytes.fetch_add(d.size, Ordering::Relaxed);
            done(&progress);
            Ok(())
        });
    }
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res.map_err(|e| ImageError::Registry { registry: "cairnd".into(), message: e.to_string() })? {
            tasks.abort_all();
            return Err(e);
        }
    }

    let top = img.manifests[0].digest.clone();
    let n = manifests.len();
    for (i, (d, bytes)) in manifests.into_iter().enumerate() {
        let is_top = i + 1 == n && d.digest == top;
        let r = if is_top { reference.to_string() } else { d.digest.to_string() };
        if is_top {
            if let Reference::Digest(want) = reference {
                if *want != d.digest {
                    return Err(ImageError::ManifestDigest {
                        registry: reg.name.clone(),
                        reference: reference.to_string(),
                        expected: want.to_string(),
                        actual: d.digest.to_string(),
                    });
                }
            }
        }
        reg.put_manifest(&r, &d.media_type, bytes).await?;
    }
    Ok(Pushed {
        digest: top,
        blobs_uploaded: uploaded.load(Ordering::Relaxed),
        bytes_uploaded: uploaded_bytes.load(Ordering::Relaxed),
        blobs_skipped: skipped.load(Ordering::Relaxed),
        blobs_mounted: mounted.load(Ordering::Relaxed),
    })
}
