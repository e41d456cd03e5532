//! An image's root filesystem as an ordinary store path.
//!
//! `unpack` applies the layers of an image manifest in order (see [`layer`] for the rules
//! that keep a hostile layer inside the tree) into a private scratch directory, then adds that
//! tree with `add_nar(dump(..))`: the rootfs is a content-addressed `source` path named
//! `oci-rootfs-<first 12 hex of the manifest digest>`, canonical like every store path (modes
//! 0444/0555, no owners, no special files). Two images whose layers give the same tree share
//! one path.
//!
//! The scratch directory is made next to the store directory (on the same disk as the store,
//! usually the one with room for it) or, where that is not writable, in the system's temporary
//! directory; never inside the store directory, which only `cairn-store` writes. It is removed
//! whatever happens, and nothing is registered unless every layer applied cleanly.
//!
//! Layers are read from their blob paths in the store (rooted while in use), decompressed as
//! their media type says (`tar`, `tar+gzip` — Docker's `tar.gzip` too — and `tar+zstd`), and
//! hashed as they are read: blobs were verified when added, but a blob changed on disk since is
//! refused rather than unpacked.
//!
//! Unpacking is memoised per manifest digest through the store's rootfs cache (a link that is
//! deliberately not a garbage-collector root): a second unpack of an image finds its path and
//! does nothing else, and one whose rootfs was collected meanwhile is simply rebuilt.
//!
//! All calls block; the daemon runs them on its blocking pool.

mod layer;
pub(crate) mod resolve;

use std::fs;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use cairn_nix::StorePath;
use cairn_oci::manifest::{Descriptor, Manifest, Platform};
use cairn_oci::Digest;

use crate::{ImageError, Images, Result};

/// What an unpack produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackReport {
    /// The rootfs.
    pub path: StorePath,
    /// The number of layers of the image.
    pub layers: usize,
    /// Device nodes and fifos left out (0 when `cached`: nothing was unpacked).
    pub dropped_devices: u64,
    /// Files and directories whose setuid, setgid or sticky bits were dropped (0 when `cached`).
    pub dropped_special_bits: u64,
    /// Files and directories the image kept from other users, which the store (whose files
    /// every local user may read) makes readable to all (0 when `cached`).
    pub made_readable: u64,
    /// Whether the rootfs was already unpacked and still in the store.
    pub cached: bool,
}

/// Symlink targets are shorter than this (Linux's `PATH_MAX`).
pub(crate) const MAX_SYMLINK_TARGET: usize = 4096;

/// Components walked, symlinks' included, to resolve one entry's directory: what `PATH_MAX`
/// targets followed [`MAX_SYMLINKS`] times could hold, and no more, so that a layer of symlinks
/// to long paths cannot make every entry below them a walk of millions of steps.
pub(crate) const MAX_STEPS: usize = 4096;

/// Symlinks followed to resolve one entry's directory, as Linux's limit (`ELOOP`).
pub(crate) const MAX_SYMLINKS: usize = 40;

/// Why a layer could not be unpacked. Each refusal of an entry names the layer and the entry.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer {layer}: entry '{entry}' leaves the image root (absolute, or '..')")]
    Escapes { layer: String, entry: String },
    #[error("layer {layer}: entry '{entry}' goes through too many symlinks (more than {MAX_SYMLINKS}, or {MAX_STEPS} steps: a loop?) at '{symlink}'")]
    ThroughSymlink { layer: String, entry: String, symlink: String },
    #[error("layer {layer}: entry '{entry}' is below '{parent}', which is not a directory")]
    NotADirectory { layer: String, entry: String, parent: String },
    #[error("layer {layer}: entry '{entry}' would replace the image root")]
    ReplacesRoot { layer: String, entry: String },
    #[error("layer {layer}: '{entry}' is not a valid whiteout")]
    BadWhiteout { layer: String, entry: String },
    #[error("layer {layer}: hard link '{entry}' points outside the image root ('{target}')")]
    LinkOutside { layer: String, entry: String, target: String },
    #[error("layer {layer}: hard link '{entry}' names '{target}', which is not an earlier regular file of the image")]
    LinkMissing { layer: String, entry: String, target: String },
    #[error("layer {layer}: symlink '{entry}' has an empty target")]
    EmptySymlink { layer: String, entry: String },
    #[error("layer {layer}: symlink '{entry}' has a target no file system holds (a NUL byte, or {MAX_SYMLINK_TARGET} bytes or more)")]
    BadSymlink { layer: String, entry: String },
    #[error("layer {layer}: entry '{entry}' has unsupported tar type '{kind}'")]
    UnsupportedEntry { layer: String, entry: String, kind: char },
    #[error("layer {layer} has media type '{media_type}', which cannot be unpacked (tar, tar+gzip or tar+zstd)")]
    MediaType { layer: String, media_type: String },
    #[error("layer {layer} is not a valid (compressed) tar stream: {source}")]
    BadTar {
        layer: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer} does not have the digest that names it: its bytes hash to {actual}")]
    DigestMismatch { layer: String, actual: String },
    #[error("layer {layer} is {actual} bytes, but the manifest says {expected}")]
    SizeMismatch { layer: String, expected: u64, actual: u64 },
    #[error("layer {layer} uncompressed is {actual}, but the image's config says {expected} (rootfs.diff_ids)")]
    DiffIdMismatch { layer: String, expected: String, actual: String },
    #[error("image {image} has {layers} layers, but its config lists {diff_ids} diff ids")]
    DiffIdCount { image: String, layers: usize, diff_ids: usize },
    #[error("image {image} has no image manifest in the store")]
    NoManifest { image: String },
    #[error("cannot {op} '{}': {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl UnpackError {
    /// Whether the image (a layer's contents or type) is at fault, rather than this machine.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, UnpackError::Io { .. })
    }
}

/// How a layer is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

fn compression(layer: &Descriptor) -> Result<Compression, UnpackError> {
    let t = layer.media_type.as_str();
    let layer_type =
        t.starts_with("application/vnd.oci.image.layer.") || t.starts_with("application/vnd.docker.image.rootfs.");
    Ok(match t {
        _ if layer_type && (t.ends_with(".tar") || t.ends_with("+tar")) => Compression::None,
        _ if layer_type && (t.ends_with(".tar+gzip") || t.ends_with(".tar.gzip")) => Compression::Gzip,
        _ if layer_type && (t.ends_with(".tar+zstd") || t.ends_with(".tar.zstd")) => Compression::Zstd,
        _ => return Err(UnpackError::MediaType { layer: layer.digest.to_string(), media_type: t.to_owned() }),
    })
}

/// Unpacks what a user names (a tag, an image digest, a layout path): see the module doc.
pub fn unpack(images: &Images, what: &str) -> Result<UnpackReport> {
    let img = images.resolve(what)?;
    let store = &images.store;
    let _layout = store.temp_root([img.layout.clone()]);
    let _blobs = images.root_blobs(&img.blobs);
    let (desc, manifest) = pick_manifest(images.image_manifests(&img)?, &Platform::host())
        .ok_or_else(|| UnpackError::NoManifest { image: img.digest().to_string() })?;
    let layers = manifest.layers();
    let key = desc.digest.to_hash();
    if let Some((path, _root)) = store.memo(crate::memo::ROOTFS, &key)? {
        tracing::debug!(image = %desc.digest, path = %store.store_dir().display(&path), "rootfs cached");
        return Ok(UnpackReport {
            path,
            layers: layers.len(),
            dropped_devices: 0,
            dropped_special_bits: 0,
            made_readable: 0,
            cached: true,
        });
    }
    let mut blobs = Vec::with_capacity(layers.len());
    for l in layers {
        match images.blob_of(&img, &l.digest)? {
            None => {
                return Err(ImageError::MissingBlob {
                    digest: l.digest.to_string(),
                    referrer: format!("manifest {}", desc.digest),
                })
            }
            Some(b) if b.size != l.size => {
                return Err(ImageError::BlobSize {
                    digest: l.digest.to_string(),
                    referrer: format!("manifest {}", desc.digest),
                    expected: l.size,
                    actual: b.size,
                })
            }
            Some(b) => blobs.push(b),
        }
    }

    let diff_ids = diff_ids(images, &desc, &manifest)?;
    if let Some(ids) = diff_ids.as_ref().filter(|ids| ids.len() != layers.len()) {
        return Err(UnpackError::DiffIdCount {
            image: desc.digest.to_string(),
            layers: layers.len(),
            diff_ids: ids.len(),
        }
        .into());
    }
    let scratch = scratch_dir(store.layout().real_store_dir.parent())?;
    let root = scratch.path().join("rootfs");
    fs::create_dir(&root).map_err(|source| UnpackError::Io { op: "create", path: root.clone(), source })?;
    let mut tree = layer::Tree::new(root.clone());
    for (i, (l, b)) in layers.iter().zip(&blobs).enumerate() {
        let diff_id = diff_ids.as_ref().map(|ids| &ids[i]);
        apply_blob(&mut tree, l, diff_id, images.open_blob(b)?)?;
    }
    let name = format!("oci-rootfs-{}", &desc.digest.hex()[..12]);
    let info = add_tree(images, &name, &root)?;
    drop(scratch);
    if let Err(e) = store.remember(crate::memo::ROOTFS, &key, &info.path) {
        tracing::warn!(image = %desc.digest, "cannot remember the unpacked rootfs: {e}");
    }
    tracing::info!(
        image = %desc.digest, path = %store.store_dir().display(&info.path), layers = layers.len(),
        dropped_devices = tree.dropped_devices, dropped_special_bits = tree.dropped_special_bits,
        made_readable = tree.made_readable, "unpacked"
    );
    Ok(UnpackReport {
        path: info.path,
        layers: layers.len(),
        dropped_devices: tree.dropped_devices,
        dropped_special_bits: tree.dropped_special_bits,
        made_readable: tree.made_readable,
        cached: false,
    })
}

/// The uncompressed layers' digests the image's config lists (`rootfs.diff_ids`), checked as
/// each layer is applied, as umoci checks them; `None` for a config that lists none (or an
/// empty list).
fn diff_ids(images: &Images, desc: &Descriptor, manifest: &Manifest) -> Result<Option<Vec<Digest>>> {
    let Some(config_desc) = manifest.children.first() else { return Ok(None) };
    // A config may be larger than a manifest may (long histories); past this, it is not read.
    const MAX_CONFIG: u64 = 64 << 20;
    if config_desc.size > MAX_CONFIG {
        return Ok(None);
    }
    let real = images.store.real_path(&images.blob_path(&config_desc.digest));
    let bytes = fs::read(&real).map_err(|source| ImageError::Io { path: real.display().to_string(), source })?;
    let config: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| cairn_oci::OciError::ManifestJson(format!("the config of {}: {e}", desc.digest)))?;
    // An empty list (hand-made layouts have them) says nothing to check against.
    let Some(ids) = config.pointer("/rootfs/diff_ids").and_then(|v| v.as_array()).filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    let parsed = ids
        .iter()
        .map(|v| v.as_str().and_then(|s| Digest::parse(s).ok()))
        .collect::<Option<Vec<Digest>>>()
        .ok_or_else(|| {
            cairn_oci::OciError::ManifestJson(format!("the config of {}: a diff id is not a digest", desc.digest))
        })?;
    Ok(Some(parsed))
}

/// Applies uncompressed layers in order to `root`, an existing empty directory, by the rules
/// [`unpack`] applies an image's layers with; returns the device nodes and special bits left out.
#[cfg(feature = "fuzzing")]
pub(crate) fn apply_layers(root: &Path, layers: &[&[u8]]) -> Result<(u64, u64), UnpackError> {
    let mut tree = layer::Tree::new(root.to_owned());
    for (i, l) in layers.iter().enumerate() {
        tree.apply(&format!("layer {i}"), *l)?;
    }
    Ok((tree.dropped_devices, tree.dropped_special_bits))
}

/// The image manifest to unpack: the only one, or (from a multi-platform index) the first for
/// `platform`, else the first.
pub(crate) fn pick_manifest(
    mut ms: Vec<(Descriptor, Manifest)>,
    platform: &Platform,
) -> Option<(Descriptor, Manifest)> {
    let i = ms.iter().position(|(d, _)| d.platform.as_ref().is_some_and(|p| platform.matches(p))).unwrap_or(0);
    (i < ms.len()).then(|| ms.swap_remove(i))
}

/// A private (0700) scratch directory beside the store directory, or in the system's.
fn scratch_dir(beside: Option<&Path>) -> Result<tempfile::TempDir, UnpackError> {
    let mut b = tempfile::Builder::new();
    b.prefix(".cairn-unpack-");
    if let Some(dir) = beside {
        if let Ok(t) = b.tempdir_in(dir) {
            return Ok(t);
        }
    }
    b.tempdir().map_err(|source| UnpackError::Io { op: "create", path: std::env::temp_dir(), source })
}

/// Applies one layer blob read from `input`: decompressed by its media type, hashed on the way
/// and checked against its digest and size once read to the end, and its uncompressed tar
/// against `diff_id` (the config's).
fn apply_blob(
    tree: &mut layer::Tree,
    l: &Descriptor,
    diff_id: Option<&Digest>,
    input: impl Read,
) -> Result<(), UnpackError> {
    let label = l.digest.to_string();
    let Some(want) = diff_id else { return read_layer(l, input, |tar| tree.apply(&label, tar)) };
    let actual = read_layer(l, input, |tar| {
        let mut hashed = cairn_nix::hash::HashingReader::new(tar, want.algo().hash_algo());
        tree.apply(&label, &mut hashed)?;
        // The tar's end-of-archive blocks and padding count too.
        io::copy(&mut hashed, &mut io::sink())
            .map_err(|source| UnpackError::BadTar { layer: label.clone(), source })?;
        Ok(hashed.finish().0)
    })?;
    if actual != want.to_hash() {
        let shown = Digest::from_hash(&actual).map(|d| d.to_string()).unwrap_or_default();
        return Err(UnpackError::DiffIdMismatch { layer: label, expected: want.to_string(), actual: shown });
    }
    Ok(())
}

/// Hands `f` the uncompressed tar stream of one layer blob read from `input` (decompressed as
/// its media type says), hashing the blob on the way; once `f` returns, the rest of the blob
/// is read and checked against the descriptor's digest and size. A blob that does not hash to
/// its digest is the error, whatever else went wrong with it.
pub(crate) fn read_layer<T>(
    l: &Descriptor,
    input: impl Read,
    f: impl FnOnce(&mut dyn Read) -> Result<T, UnpackError>,
) -> Result<T, UnpackError> {
    let label = l.digest.to_string();
    let kind = compression(l)?;
    let mut raw = cairn_nix::hash::HashingReader::new(input, l.digest.algo().hash_algo());
    // Docker's `rootfs.diff.tar.gzip` also labels uncompressed layers: the manifests the
    // containers tools derive for `docker save` archives do, so those layers are told apart by
    // their first bytes, as those tools do.
    let mut buffered = BufReader::with_capacity(1 << 20, &mut raw);
    let kind = if kind == Compression::Gzip && l.media_type.starts_with("application/vnd.docker.") {
        use std::io::BufRead;
        let head = buffered.fill_buf().map_err(|source| UnpackError::BadTar { layer: label.clone(), source })?;
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else {
            Compression::None
        }
    } else {
        kind
    };
    let applied = {
        let mut stream: Box<dyn Read + '_> = match kind {
            Compression::None => Box::new(&mut buffered),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut buffered)),
            Compression::Zstd => Box::new(
                zstd::Decoder::new(&mut buffered)
                    .map_err(|source| UnpackError::BadTar { layer: label.clone(), source })?,
            ),
        };
        f(&mut stream)
    };
    let drained_buffer = io::copy(&mut buffered, &mut io::sink());
    drop(buffered);
    // Read what follows the compressed stream too, so the whole blob is hashed.
    let drained = drained_buffer.and_then(|_| io::copy(&mut raw, &mut io::sink()));
    let (actual, size, _) = raw.finish();
    if actual != l.digest.to_hash() {
        let shown = Digest::from_hash(&actual).map(|d| d.to_string()).unwrap_or_default();
        return Err(UnpackError::DigestMismatch { layer: label, actual: shown });
    }
    if size != l.size {
        return Err(UnpackError::SizeMismatch { layer: label, expected: l.size, actual: size });
    }
    let value = applied?;
    drained.map_err(|source| UnpackError::BadTar { layer: label, source })?;
    Ok(value)
}

/// Adds the tree at `root` to the store as a NAR, dumped on a second thread while the store
/// restores it (the NAR is never held whole, in memory or on disk).
fn add_tree(images: &Images, name: &str, root: &Path) -> Result<cairn_store::PathInfo> {
    std::thread::scope(|s| {
        let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(8);
        let errors = tx.clone();
        let dumper = s.spawn(move || {
            let r = cairn_store::dump(root, ChannelWriter(tx));
            if let Err(e) = &r {
                // Ends the reader's stream with the reason, rather than with a short NAR.
                let _ = errors.send(Err(io::Error::other(e.to_string())));
            }
            r
        });
        let added = images.store.add_nar(name, ChannelReader { rx, buf: Vec::new(), pos: 0 });
        let dumped = dumper.join().expect("dump thread panicked");
        match (added, dumped) {
            (Ok(info), Ok(())) => Ok(info),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e.into()),
        }
    })
}

struct ChannelWriter(SyncSender<io::Result<Vec<u8>>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(Ok(buf.to_vec())).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct ChannelReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => (self.buf, self.pos) = (chunk, 0),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use cairn_nix::StoreDir;
    use cairn_oci::manifest::Descriptor;
    use cairn_oci::TagName;
    use cairn_store::{GcOptions, LocalStore, StoreLayout};

    use super::layer::tests::{tar_of, E};
    use super::*;

    const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    fn zstd(b: &[u8]) -> Vec<u8> {
        zstd::encode_all(b, 1).unwrap()
    }

    fn desc(media_type: &str, bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest: Digest::sha256_of(bytes),
            size: bytes.len() as u64,
            platform: None,
            annotations: Default::default(),
        }
    }

    struct Env {
        dir: tempfile::TempDir,
        images: Images,
    }

    fn env() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(StoreLayout::under_root(dir.path(), StoreDir::new("/store").unwrap())).unwrap();
        Env { images: Images::new(Arc::new(store)), dir }
    }

    impl Env {
        fn blob(&self, d: &Descriptor, bytes: &[u8]) {
            self.images.add_blob(&d.digest, d.size, bytes).unwrap();
        }

        /// Stores an image of `layers` (media type, blob bytes) and tags it `t/x:1`.
        fn image(&self, layers: &[(&str, Vec<u8>)]) -> Descriptor {
            self.image_listing(layers, &[])
        }

        /// [`Env::image`] whose config lists `diff_ids`.
        fn image_listing(&self, layers: &[(&str, Vec<u8>)], diff_ids: &[Digest]) -> Descriptor {
            let ids: Vec<String> = diff_ids.iter().map(|d| d.to_string()).collect();
            let config = serde_json::to_vec(&serde_json::json!({
                "architecture": "amd64", "os": "linux", "rootfs": { "type": "layers", "diff_ids": ids },
            }))
            .unwrap();
            let config = &config[..];
            let cd = desc("application/vnd.oci.image.config.v1+json", config);
            self.blob(&cd, config);
            let mut ls = Vec::new();
            for (t, b) in layers {
                let d = desc(t, b);
                self.blob(&d, b);
                ls.push(d.to_json());
            }
            let m = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": cairn_oci::manifest::OCI_MANIFEST,
                "config": cd.to_json(),
                "layers": ls,
            });
            let mb = serde_json::to_vec(&m).unwrap();
            let md = desc(cairn_oci::manifest::OCI_MANIFEST, &mb);
            self.blob(&md, &mb);
            self.images.commit(vec![md.clone()], Some(&TagName::parse("t/x:1").unwrap())).unwrap();
            md
        }

        fn rootfs_entries(&self) -> Vec<String> {
            let real = self.images.store.layout().real_store_dir.clone();
            let mut v: Vec<String> = fs::read_dir(real)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("oci-rootfs"))
                .collect();
            v.sort();
            v
        }

        fn scratch_left(&self) -> Vec<String> {
            fs::read_dir(self.dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".cairn-unpack-"))
                .collect()
        }
    }

    #[test]
    fn layers_that_are_not_the_config_s_diff_ids_are_refused_as_umoci_refuses_them() {
        let e = env();
        let l1 = tar_of(&[E::File("a", b"first", 0o644)]);
        let l2 = tar_of(&[E::File("b", b"second", 0o644)]);
        let (d1, d2) = (Digest::sha256_of(&l1), Digest::sha256_of(&l2));
        let layers = [(GZIP, gzip(&l1)), (TAR, l2.clone())];
        e.image_listing(&layers, &[d1.clone(), d2.clone()]);
        let r = unpack(&e.images, "t/x:1").unwrap();
        assert_eq!(fs::read(e.images.store.real_path(&r.path).join("b")).unwrap(), b"second");
        // Swapped, as a config made for other layers: refused, naming the layer; nothing kept.
        let env2 = env();
        env2.image_listing(&layers, &[d2.clone(), d1.clone()]);
        let err = unpack(&env2.images, "t/x:1").unwrap_err().to_string();
        assert!(err.contains("rootfs.diff_ids") && err.contains(&d2.to_string()), "{err}");
        assert!(env2.rootfs_entries().is_empty() && env2.scratch_left().is_empty());
        // One short.
        let env3 = env();
        env3.image_listing(&layers, &[d1]);
        let err = unpack(&env3.images, "t/x:1").unwrap_err().to_string();
        assert!(err.contains("has 2 layers, but its config lists 1 diff ids"), "{err}");
    }

    #[test]
    fn media_types() {
        for (t, c) in [
            (TAR, Compression::None),
            (GZIP, Compression::Gzip),
            (ZSTD, Compression::Zstd),
            (DOCKER_GZIP, Compression::Gzip),
            ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", Compression::Gzip),
            ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", Compression::Zstd),
        ] {
            assert_eq!(compression(&desc(t, b"")).unwrap(), c, "{t}");
        }
        for t in ["application/vnd.oci.image.layer.v1.tar+bzip2", "application/octet-stream", "text/x.tar"] {
            assert!(matches!(compression(&desc(t, b"")), Err(UnpackError::MediaType { .. })), "{t}");
        }
    }

    #[test]
    fn unpacks_gzip_zstd_and_plain_layers_in_order_once() {
        let e = env();
        let l1 = tar_of(&[E::File("etc/motd", b"one", 0o644), E::File("bin/x", b"#!", 0o4755), E::Dev("dev/null")]);
        let l2 = tar_of(&[E::File("etc/.wh.motd", b"", 0), E::Sym("bin/y", "x"), E::Link("bin/z", "bin/x")]);
        let l3 = tar_of(&[E::File("etc/issue", b"three", 0o644)]);
        let md = e.image(&[(GZIP, gzip(&l1)), (ZSTD, zstd(&l2)), (TAR, l3)]);

        let r = unpack(&e.images, "t/x:1").unwrap();
        assert_eq!(r.path.name(), format!("oci-rootfs-{}", &md.digest.hex()[..12]));
        assert_eq!((r.layers, r.dropped_devices, r.dropped_special_bits, r.cached), (3, 1, 1, false));
        let real = e.images.store.real_path(&r.path);
        assert_eq!(fs::read_to_string(real.join("etc/issue")).unwrap(), "three");
        assert!(!real.join("etc/motd").exists() && !real.join("etc/.wh.motd").exists());
        assert_eq!(fs::read_link(real.join("bin/y")).unwrap(), Path::new("x"));
        assert_eq!(fs::read(real.join("bin/z")).unwrap(), b"#!");
        assert_eq!(fs::metadata(real.join("bin/x")).unwrap().permissions().mode() & 0o7777, 0o555);
        assert!(!real.join("dev/null").exists());
        assert!(e.scratch_left().is_empty());

        // By tag, by digest, by layout: the same path, from the cache.
        let layout = e.images.store.store_dir().display(&e.images.resolve("t/x:1").unwrap().layout);
        for what in ["t/x:1", &md.digest.to_string(), &layout] {
            let again = unpack(&e.images, what).unwrap();
            assert_eq!((again.path.clone(), again.cached, again.layers), (r.path.clone(), true, 3), "{what}");
        }

        // The cache is no root: once collected, the rootfs is unpacked again, to the same path.
        let gc = e.images.store.collect_garbage(&GcOptions::default()).unwrap();
        assert_eq!(gc.deleted, vec![r.path.clone()]);
        let rebuilt = unpack(&e.images, "t/x:1").unwrap();
        assert_eq!((rebuilt.path, rebuilt.cached, rebuilt.dropped_devices), (r.path, false, 1));
    }

    #[test]
    fn a_refused_layer_registers_nothing_and_leaves_no_scratch() {
        let e = env();
        let good = tar_of(&[E::File("a", b"1", 0o644)]);
        let bad = tar_of(&[E::File("ok", b"1", 0o644), E::File("../escape", b"x", 0o644)]);
        e.image(&[(TAR, good), (DOCKER_GZIP, gzip(&bad))]);
        let err = unpack(&e.images, "t/x:1").unwrap_err();
        assert!(err.is_bad_input(), "{err}");
        assert!(err.to_string().contains("'../escape'"), "{err}");
        assert!(e.rootfs_entries().is_empty());
        assert!(e.scratch_left().is_empty());
        assert!(!e.dir.path().join("escape").exists());
    }

    #[test]
    fn a_layer_changed_on_disk_is_refused() {
        let e = env();
        let l = tar_of(&[E::File("a", b"original contents", 0o644)]);
        e.image(&[(TAR, l.clone())]);
        let blob = e.images.store.real_path(&e.images.blob_path(&Digest::sha256_of(&l)));
        fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
        let forged = String::from_utf8(l).unwrap().replace("original", "replaced");
        fs::File::create(&blob).unwrap().write_all(forged.as_bytes()).unwrap();
        let err = unpack(&e.images, "t/x:1").unwrap_err();
        assert!(matches!(err, ImageError::Unpack(UnpackError::DigestMismatch { .. })), "{err}");
        assert!(e.rootfs_entries().is_empty());
        assert!(e.scratch_left().is_empty());
    }

    #[test]
    fn blobs_are_checked_against_digest_and_size_and_must_be_tar() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        fs::create_dir(&root).unwrap();
        let mut tree = layer::Tree::new(root.clone());
        let l = tar_of(&[E::File("a", b"1", 0o644)]);
        let mut d = desc(TAR, &l);
        apply_blob(&mut tree, &d, None, &l[..]).unwrap();
        d.digest = Digest::sha256_of(b"something else");
        assert!(matches!(apply_blob(&mut tree, &d, None, &l[..]), Err(UnpackError::DigestMismatch { .. })));
        let mut d = desc(TAR, &l);
        d.size += 1;
        assert!(matches!(apply_blob(&mut tree, &d, None, &l[..]), Err(UnpackError::SizeMismatch { .. })));
        // Valid gzip (right digest) around something that is not a tar.
        let junk = gzip(&[9u8; 2048]);
        assert!(matches!(apply_blob(&mut tree, &desc(GZIP, &junk), None, &junk[..]), Err(UnpackError::BadTar { .. })));
        // A truncated gzip stream of a valid tar.
        let g = gzip(&l);
        let cut = &g[..g.len() - 6];
        assert!(matches!(apply_blob(&mut tree, &desc(GZIP, cut), None, cut), Err(UnpackError::BadTar { .. })));
        // Bytes after a zstd frame.
        let mut z = zstd(&l);
        z.extend_from_slice(b"trailing");
        assert!(matches!(apply_blob(&mut tree, &desc(ZSTD, &z), None, &z[..]), Err(UnpackError::BadTar { .. })));
    }

    #[test]
    fn picks_the_host_platform_from_an_index() {
        let m = |p: Option<&str>| {
            let mut d = desc(cairn_oci::manifest::OCI_MANIFEST, p.unwrap_or("none").as_bytes());
            d.platform = p.map(|p| Platform::parse(p).unwrap());
            let mf = Manifest::parse(
                br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":0},"layers":[]}"#,
                None,
            )
            .unwrap();
            (d, mf)
        };
        let host = Platform::parse("linux/arm64").unwrap();
        let (d, _) = pick_manifest(vec![m(Some("linux/amd64")), m(Some("linux/arm64"))], &host).unwrap();
        assert_eq!(d.platform, Some(host.clone()));
        let (d, _) = pick_manifest(vec![m(None)], &host).unwrap();
        assert_eq!(d.platform, None);
        assert!(pick_manifest(vec![], &host).is_none());
    }
}
