//! Images built from store closures, layered by popularity.
//!
//! A closure becomes an image the way nixpkgs' `buildLayeredImage` makes one: every path of the
//! closure gets a *popularity* — the number of distinct paths from the closure's roots (paths no
//! other path of the closure references) down to it in the reference graph — and the paths,
//! most popular first and ties broken by name (the name with the hash moved to its end, as
//! nixpkgs' `closure-graph.py` sorts), get one layer each. When there are more paths than
//! layers allowed (`max_layers`, counting the base image's layers and the customisation layer),
//! the least popular paths share the last store layer. Shared dependencies (the C library, a
//! shell) are the most popular, so they sit in the lowest layers, and two images of related
//! closures share those layers blob for blob.
//!
//! An image build is a derivation: [`derivation`] writes the inputs (root paths, base image,
//! options) into a `.drv` whose builder is [`BUILTIN`], so the image's store path is a function
//! of its inputs and a second build of the same inputs finds its output valid and does nothing.
//! The daemon's builder runs [`build_output`] for it in-process (no sandbox: it only reads store
//! paths and writes store paths).
//!
//! Store layers are streamed ([`crate::streamed`]): each is produced once, hashed as it goes, and
//! kept as a description that refers to its paths; nothing of its bytes is written unless the
//! build is asked to `materialise` them. A layer's description is remembered per set of paths
//! (`memo::LAYER`), so a rebuild after one path changed hashes only the layers holding changed
//! paths. Layers missing from the memo are hashed on all cores at once.
//!
//! All calls block; the daemon runs them on its blocking pool.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use cairn_nix::derivation::{Derivation, DerivationOutput};
use cairn_nix::{Hash, HashAlgo, Hasher, StoreDir, StorePath};
use cairn_oci::layout::{streamed_layer_name, Layout};
use cairn_oci::manifest::{Descriptor, OCI_MANIFEST};
use cairn_oci::Digest;
use cairn_store::{Direction, PathInfo};

use crate::memo;

use crate::images::{Image, TempRootGuardSet};
use crate::streamed::{describe, tar_header, LayerReader, LayerRecipe, FORMAT};
pub use crate::streamed::{LayerCompression, LAYER};
use crate::{ImageError, Images, Result};

pub(crate) const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// The builder of image derivations.
pub const BUILTIN: &str = "builtin:oci-image";
/// The name of image derivations (and so of their `.drv` and output paths).
pub const NAME: &str = "oci-image";

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub compression: LayerCompression,
    /// The closure's roots.
    pub paths: Vec<StorePath>,
    /// An image to build on: its layers come first and count against `max_layers`.
    pub from: Option<Image>,
    /// Layers in all (base, store paths and the customisation layer).
    pub max_layers: usize,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=VALUE` pairs, appended to the base's.
    pub env: Vec<String>,
    /// Store the layers' bytes as blobs too, not only their descriptions.
    pub materialise: bool,
    /// Store paths placed (their own trees, not their closures) at absolute paths inside the
    /// image, one layer each, above the closure's layers: `--copy PATH:DEST`.
    pub copies: Vec<(StorePath, String)>,
}

/// Checks a `--copy` destination: absolute, not the root, no `.`, `..` or empty components.
pub fn check_copy_dest(dest: &str) -> Result<()> {
    let ok = dest.starts_with('/')
        && dest.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..")
        && dest.len() > 1
        && !dest.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadBuild(format!(
            "--copy destination '{dest}' must be an absolute path below / without '.', '..' or empty components"
        )))
    }
}

/// What building an image's derivation made.
#[derive(Debug, Default)]
pub struct Built {
    /// Layers hashed by this build (the others were remembered).
    pub layers_written: usize,
    /// The image's layers of store paths, hashed or remembered.
    pub store_layers: usize,
}

/// Paths in popularity order (most popular first, ties by name), given each path's references.
pub fn popularity_order(dir: &cairn_nix::StoreDir, refs: &BTreeMap<StorePath, BTreeSet<StorePath>>) -> Vec<StorePath> {
    // Referrers of each path within the closure, self-references dropped.
    let mut referrers: HashMap<&StorePath, Vec<&StorePath>> = HashMap::new();
    for (p, rs) in refs {
        for r in rs {
            if r != p && refs.contains_key(r) {
                referrers.entry(r).or_default().push(p);
            }
        }
    }
    // Paths from the roots: a root counts one; every other path the sum of its referrers'
    // counts (the number of times it appears when the graph is unfolded into a tree from the
    // roots). Memoised over the DAG.
    fn count<'a>(
        p: &'a StorePath,
        referrers: &HashMap<&'a StorePath, Vec<&'a StorePath>>,
        memo: &mut HashMap<&'a StorePath, u128>,
    ) -> u128 {
        if let Some(c) = memo.get(p) {
            return *c;
        }
        let c = match referrers.get(p) {
            None => 1,
            Some(rs) => rs.iter().map(|r| count(r, referrers, memo)).fold(0u128, |a, b| a.saturating_add(b)),
        };
        memo.insert(p, c);
        c
    }
    let mut memo = HashMap::new();
    let name_key = |p: &StorePath| {
        // closure-graph.py's package_name: the hash part (with the store directory before it)
        // moved after the name.
        let full = dir.display(p);
        let mut parts: Vec<&str> = full.split('-').collect();
        let first = parts.remove(0);
        parts.push(first);
        parts.join("-")
    };
    let mut v: Vec<(u128, String, StorePath)> =
        refs.keys().map(|p| (count(p, &referrers, &mut memo), name_key(p), p.clone())).collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    v.into_iter().map(|(_, _, p)| p).collect()
}

/// Groups paths in popularity order into at most `n` layers: one each, the rest in the last.
pub fn group_layers(order: Vec<StorePath>, n: usize) -> Vec<Vec<StorePath>> {
    if n == 0 || order.is_empty() {
        return Vec::new();
    }
    if order.len() <= n {
        return order.into_iter().map(|p| vec![p]).collect();
    }
    let mut it = order.into_iter();
    let mut out: Vec<Vec<StorePath>> = it.by_ref().take(n - 1).map(|p| vec![p]).collect();
    out.push(it.collect());
    out
}

fn memo_key(parts: &[&str]) -> Hash {
    let mut h = Hasher::new(HashAlgo::Sha256);
    for p in parts {
        h.update(p.as_bytes());
        h.update(b"\0");
    }
    h.finish()
}

/// The memo key of the layer of `paths`.
fn layer_key(dir: &StoreDir, paths: &[StorePath], compression: LayerCompression) -> Hash {
    let mut names: Vec<String> = paths.iter().map(|p| p.base_name()).collect();
    names.sort();
    let mut parts = vec![FORMAT, "layer", dir.as_str(), compression.name()];
    parts.extend(names.iter().map(String::as_str));
    memo_key(&parts)
}

/// The memo key of a `--copy` layer: its path, where it goes, and how it is compressed.
fn copy_key(dir: &StoreDir, path: &StorePath, dest: &str, compression: LayerCompression) -> Hash {
    memo_key(&[FORMAT, "copy", dir.as_str(), compression.name(), &path.base_name(), dest])
}

/// A `--copy` layer: remembered, or described now and remembered (its description refers to
/// the one path).
fn copy_layer(
    images: &Images,
    path: &StorePath,
    dest: &str,
    compression: LayerCompression,
    roots: &mut TempRootGuardSet,
) -> Result<StoreLayer> {
    let store = &images.store;
    let dir = store.store_dir();
    let key = copy_key(dir, path, dest, compression);
    if let Some((p, guard)) = store.memo(memo::LAYER, &key)? {
        let shown = dir.display(&p);
        let bytes = fs::read(store.real_path(&p)).map_err(|source| ImageError::Io { path: shown.clone(), source })?;
        if let Ok(recipe) = LayerRecipe::parse(&bytes, &shown) {
            roots.hold(guard);
            return Ok(StoreLayer { path: p, recipe });
        }
    }
    let recipe = crate::streamed::describe_at(store, path, dest, compression)?;
    let text = serde_json::to_vec_pretty(&recipe).expect("descriptions serialise");
    let info = store.add_text(&streamed_layer_name(&recipe.digest()), &text, &[path.clone()].into())?;
    roots.hold(store.temp_root([info.path.clone()]));
    store.remember(memo::LAYER, &key, &info.path)?;
    store.remember(memo::STREAMED_LAYER, &recipe.digest().to_hash(), &info.path)?;
    Ok(StoreLayer { path: info.path, recipe })
}

/// A store layer of a build: its description's path and what it describes.
struct StoreLayer {
    path: StorePath,
    recipe: LayerRecipe,
}

/// The remembered description of the layer of `paths`, if any (rooted in `roots`).
fn remembered_layer(
    images: &Images,
    paths: &[StorePath],
    compression: LayerCompression,
    roots: &mut TempRootGuardSet,
) -> Result<Option<StoreLayer>> {
    let key = layer_key(images.store.store_dir(), paths, compression);
    let Some((path, guard)) = images.store.memo(memo::LAYER, &key)? else { return Ok(None) };
    let shown = images.store.store_dir().display(&path);
    let bytes =
        fs::read(images.store.real_path(&path)).map_err(|source| ImageError::Io { path: shown.clone(), source })?;
    match LayerRecipe::parse(&bytes, &shown) {
        Ok(recipe) => {
            roots.hold(guard);
            Ok(Some(StoreLayer { path, recipe }))
        }
        // A description of another format: made again below.
        Err(e) => {
            tracing::debug!("layer memo not used: {e}");
            Ok(None)
        }
    }
}

/// Describes the layer of `paths` now and keeps the description (a text path referring to the
/// paths), remembered by its paths and by its digest.
fn new_layer(
    images: &Images,
    paths: &[StorePath],
    compression: LayerCompression,
    roots: &mut TempRootGuardSet,
) -> Result<StoreLayer> {
    let recipe = describe(&images.store, paths, compression)?;
    let text = serde_json::to_vec_pretty(&recipe).expect("descriptions serialise");
    let refs: BTreeSet<StorePath> = paths.iter().cloned().collect();
    let info = images.store.add_text(&streamed_layer_name(&recipe.digest()), &text, &refs)?;
    roots.hold(images.store.temp_root([info.path.clone()]));
    let dir = images.store.store_dir();
    images.store.remember(memo::LAYER, &layer_key(dir, paths, compression), &info.path)?;
    images.store.remember(memo::STREAMED_LAYER, &recipe.digest().to_hash(), &info.path)?;
    Ok(StoreLayer { path: info.path, recipe })
}

/// The layers of `groups`, in order: remembered ones looked up, the others described on as
/// many threads as there are cores (largest first). Returns how many were described now.
fn store_layers(
    images: &Images,
    groups: &[Vec<StorePath>],
    compression: LayerCompression,
    roots: &mut TempRootGuardSet,
    log: &mut dyn FnMut(&str),
) -> Result<(Vec<StoreLayer>, usize)> {
    let mut found: Vec<Option<StoreLayer>> = Vec::with_capacity(groups.len());
    for g in groups {
        found.push(remembered_layer(images, g, compression, roots)?);
    }
    let mut todo: Vec<(usize, u64)> = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        if found[i].is_none() {
            let mut size = 0;
            for p in g {
                size += images.store.valid_path_info(p)?.nar_size;
            }
            todo.push((i, size));
        }
    }
    todo.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let described = todo.len();
    let total: u64 = todo.iter().map(|t| t.1).sum();
    log(&format!(
        "{} store layers: {} remembered, {described} to hash ({})",
        groups.len(),
        groups.len() - described,
        human(total)
    ));
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(todo.len()).max(1);
    let next = AtomicUsize::new(0);
    type Made = Result<(StoreLayer, TempRootGuardSet)>;
    let results: Mutex<Vec<(usize, Made)>> = Mutex::new(Vec::new());
    // The workers' step lines, written to `log` by this thread as they come.
    let (steps, lines) = std::sync::mpsc::channel::<String>();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let steps = steps.clone();
            let (next, todo, results) = (&next, &todo, &results);
            scope.spawn(move || loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(i, size)) = todo.get(k) else { break };
                let _ = steps.send(format!(
                    "layer {}/{}: hashing {} ({})",
                    k + 1,
                    todo.len(),
                    human(size),
                    plural(groups[i].len(), "path")
                ));
                let mut r = TempRootGuardSet::default();
                let made = new_layer(images, &groups[i], compression, &mut r).map(|l| (l, r));
                let failed = made.is_err();
                results.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((i, made));
                if failed {
                    // Stop the others from starting more.
                    next.store(todo.len(), Ordering::Relaxed);
                    break;
                }
            });
        }
        drop(steps);
        for line in lines {
            log(&line);
        }
    });
    for (i, made) in results.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
        let (layer, r) = made?;
        roots.extend(r);
        found[i] = Some(layer);
    }
    let layers = found.into_iter().map(|l| l.expect("every layer remembered or described")).collect();
    Ok((layers, described))
}

/// `size` bytes for people: `1.2 GiB`.
fn human(size: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = size as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{size} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `1 path`, `3 paths`.
fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Stores a streamed layer's bytes as a blob (made again from its paths and checked).
fn materialise(images: &Images, layer: &StoreLayer, roots: &mut TempRootGuardSet) -> Result<()> {
    let d = layer.recipe.digest();
    roots.hold(images.root_blobs([&d]));
    if images.store.is_valid(&images.blob_path(&d))? {
        return Ok(());
    }
    let reader = LayerReader::open(images.store.clone(), &layer.recipe)?;
    images.add_blob(&d, layer.recipe.size, io::BufReader::with_capacity(1 << 20, reader))?;
    Ok(())
}
pub(crate) fn descriptor(media_type: &str, digest: Digest, size: u64) -> Descriptor {
    Descriptor { media_type: media_type.to_owned(), digest, size, platform: None, annotations: Default::default() }
}

/// `/etc/passwd`, `/etc/group` (root and nobody) and a world-writable `/tmp`.
fn customisation_layer() -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let io_err = |source: io::Error| ImageError::Io { path: "the customisation layer".into(), source };
    let files: [(&str, &[u8]); 2] = [
        ("etc/group", b"root:x:0:\nnobody:x:65534:\n"),
        ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/var/empty:/bin/false\n"),
    ];
    b.append_data(&mut tar_header(tar::EntryType::Directory, 0o755, 0), "etc/", io::empty()).map_err(io_err)?;
    for (name, data) in files {
        b.append_data(&mut tar_header(tar::EntryType::Regular, 0o444, data.len() as u64), name, data)
            .map_err(io_err)?;
    }
    b.append_data(&mut tar_header(tar::EntryType::Directory, 0o1777, 0), "tmp/", io::empty()).map_err(io_err)?;
    b.into_inner().map_err(io_err)
}

pub(crate) fn store_json(
    images: &Images,
    media_type: &str,
    v: &serde_json::Value,
    roots: &mut TempRootGuardSet,
) -> Result<Descriptor> {
    let bytes = serde_json::to_vec(v).expect("JSON values serialise");
    let d = Digest::sha256_of(&bytes);
    roots.hold(images.root_blobs([&d]));
    images.add_blob(&d, bytes.len() as u64, &bytes[..])?;
    Ok(descriptor(media_type, d, bytes.len() as u64))
}

/// A private scratch directory beside the store directory (on the store's disk), or in the
/// system's temporary directory where that is not writable; removed when dropped.
pub(crate) fn scratch_dir(images: &Images) -> Result<tempfile::TempDir> {
    let beside = images.store.layout().real_store_dir.parent().map(|p| p.to_owned()).unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix(".cairn-image-")
        .tempdir_in(&beside)
        .or_else(|_| tempfile::Builder::new().prefix(".cairn-image-").tempdir())
        .map_err(|source| ImageError::Io { path: beside.display().to_string(), source })
}

/// Stores the blob `write` writes (once, to a scratch file beside the store, hashed as it is
/// written); returns its digest and size. For blobs made here whose size and digest are known
/// only at the end: a squashed layer, a copied tree.
pub(crate) fn store_written_blob(
    images: &Images,
    roots: &mut TempRootGuardSet,
    write: &mut dyn FnMut(&mut dyn io::Write) -> Result<()>,
) -> Result<(Digest, u64)> {
    let store = &images.store;
    let dir = scratch_dir(images)?;
    let scratch = tempfile::Builder::new()
        .prefix("blob-")
        .tempfile_in(dir.path())
        .map_err(|source| ImageError::Io { path: dir.path().display().to_string(), source })?;
    let io_err = |source: io::Error| ImageError::Io { path: scratch.path().display().to_string(), source };
    let file = scratch.reopen().map_err(io_err)?;
    let mut w = cairn_nix::hash::HashingWriter::new(io::BufWriter::with_capacity(1 << 20, file), HashAlgo::Sha256);
    write(&mut w)?;
    let (hash, size, mut inner) = w.finish();
    io::Write::flush(&mut inner).map_err(io_err)?;
    drop(inner);
    let digest = Digest::from_hash(&hash).ok_or_else(|| ImageError::BadBuild("a SHA-256 is not a digest".into()))?;
    roots.hold(images.root_blobs([&digest]));
    if !store.is_valid(&images.blob_path(&digest))? {
        images.add_blob(&digest, size, scratch.reopen().map_err(io_err)?)?;
    }
    Ok((digest, size))
}

/// The layers left for store paths.
fn budget(max_layers: usize, base_layers: usize) -> Result<usize> {
    max_layers.checked_sub(base_layers + 1).filter(|b| *b >= 1).ok_or_else(|| {
        ImageError::BadBuild(format!(
            "--max-layers {max_layers} leaves no layer for the store paths ({base_layers} for the base image and copies, 1 for /etc and /tmp)"
        ))
    })
}

/// Refuses options no build could follow, before a derivation is written for them; returns
/// how many layers the base image has.
pub fn check(images: &Images, opts: &BuildOptions) -> Result<usize> {
    let base_layers = match &opts.from {
        Some(img) => images
            .image_manifests(img)?
            .first()
            .map(|(_, m)| m.layers().len())
            .ok_or_else(|| ImageError::NotAnImage(images.store.store_dir().display(&img.layout)))?,
        None => 0,
    };
    budget(opts.max_layers, base_layers + opts.copies.len()).map(|_| base_layers)
}

/// The image derivation of `opts`, its output paths not yet filled in (the store completes it).
/// Its inputs are the closure's roots and the base image's layout; its environment every
/// option, so that any change of input or option is another derivation.
pub fn derivation(dir: &StoreDir, opts: &BuildOptions) -> Derivation {
    let json = |v: &Vec<String>| serde_json::to_string(v).expect("strings serialise");
    let mut roots: Vec<String> = opts.paths.iter().map(|p| dir.display(p)).collect();
    roots.sort();
    roots.dedup();
    let mut input_srcs: BTreeSet<String> = roots.iter().cloned().collect();
    input_srcs.extend(opts.copies.iter().map(|(p, _)| dir.display(p)));
    let from = opts.from.as_ref().map(|img| dir.display(&img.layout)).unwrap_or_default();
    if !from.is_empty() {
        input_srcs.insert(from.clone());
    }
    let env: BTreeMap<String, String> = [
        ("name", NAME.to_owned()),
        ("builder", BUILTIN.to_owned()),
        ("system", "builtin".to_owned()),
        ("format", FORMAT.to_owned()),
        ("paths", roots.join(" ")),
        ("from", from),
        ("maxLayers", opts.max_layers.to_string()),
        ("entrypoint", json(&opts.entrypoint)),
        ("cmd", json(&opts.cmd)),
        ("env", json(&opts.env)),
        ("compression", opts.compression.name().to_owned()),
        ("materialise", if opts.materialise { "1" } else { "" }.to_owned()),
        ("architecture", cairn_oci::Platform::host().architecture),
        ("out", String::new()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut env = env;
    // Only when there are some, so that images without copies keep their derivations.
    if !opts.copies.is_empty() {
        let copies: Vec<(String, &String)> = opts.copies.iter().map(|(p, d)| (dir.display(p), d)).collect();
        env.insert("copies".to_owned(), serde_json::to_string(&copies).expect("strings serialise"));
    }
    Derivation {
        outputs: [(
            "out".to_owned(),
            DerivationOutput { path: String::new(), hash_algo: String::new(), hash: String::new() },
        )]
        .into(),
        input_drvs: BTreeMap::new(),
        input_srcs,
        platform: "builtin".to_owned(),
        builder: BUILTIN.to_owned(),
        args: Vec::new(),
        env,
    }
}

/// The options an image derivation was written with.
pub fn options_of(images: &Images, drv: &Derivation) -> Result<BuildOptions> {
    let dir = images.store.store_dir();
    let bad = |why: String| ImageError::BadBuild(format!("not an image derivation: {why}"));
    let var = |k: &str| drv.env.get(k).ok_or_else(|| bad(format!("no '{k}'")));
    let list = |k: &str| -> Result<Vec<String>> {
        serde_json::from_str(var(k)?).map_err(|e| bad(format!("'{k}' is not a JSON list of strings: {e}")))
    };
    if var("format")? != FORMAT {
        return Err(bad(format!("written for format '{}', this cairn builds '{FORMAT}'", var("format")?)));
    }
    let paths = var("paths")?
        .split_whitespace()
        .map(|p| dir.parse(p).map_err(|e| bad(format!("path '{p}': {e}"))))
        .collect::<Result<Vec<_>>>()?;
    let from = match var("from")?.as_str() {
        "" => None,
        f => Some(images.load(&dir.parse(f).map_err(|e| bad(format!("base '{f}': {e}")))?)?),
    };
    Ok(BuildOptions {
        compression: LayerCompression::parse(var("compression")?)?,
        paths,
        from,
        max_layers: var("maxLayers")?.parse().map_err(|_| bad("'maxLayers' is not a number".into()))?,
        entrypoint: list("entrypoint")?,
        cmd: list("cmd")?,
        env: list("env")?,
        materialise: !var("materialise")?.is_empty(),
        copies: match drv.env.get("copies") {
            None => Vec::new(),
            Some(c) => {
                let pairs: Vec<(String, String)> =
                    serde_json::from_str(c).map_err(|e| bad(format!("'copies' is not a list of pairs: {e}")))?;
                pairs
                    .into_iter()
                    .map(|(p, d)| {
                        check_copy_dest(&d)?;
                        Ok((dir.parse(&p).map_err(|e| bad(format!("copy '{p}': {e}")))?, d))
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        },
    })
}

/// The store paths of each streamed layer of an image, after its first `skip` layers (a base's).
pub fn layer_paths(images: &Images, img: &Image, skip: usize) -> Result<Vec<Vec<StorePath>>> {
    let dir = images.store.store_dir();
    let mut out = Vec::new();
    for (_, m) in images.image_manifests(img)?.into_iter().take(1) {
        for l in m.layers().iter().skip(skip) {
            let Some(b) = images.blob_of(img, &l.digest)? else { continue };
            let recipe = match b.source {
                crate::images::BlobSource::Streamed(r) => Some(*r),
                // A materialised layer: its description is still remembered by its digest.
                crate::images::BlobSource::File(_) => {
                    match images.store.memo(memo::STREAMED_LAYER, &l.digest.to_hash())? {
                        Some((path, _root)) => {
                            let shown = dir.display(&path);
                            let real = images.store.real_path(&path);
                            let bytes = fs::read(&real)
                                .map_err(|source| ImageError::Io { path: real.display().to_string(), source })?;
                            Some(LayerRecipe::parse(&bytes, &shown)?)
                        }
                        None => None,
                    }
                }
            };
            if let Some(r) = recipe {
                out.push(r.paths.iter().filter_map(|n| dir.parse(&format!("{}/{n}", dir.as_str())).ok()).collect());
            }
        }
    }
    Ok(out)
}

/// Builds the image a derivation describes and registers it at its output path `out` (the
/// layout, with `drv_path` as deriver).
/// Each step (a layer hashed, the config written, ...) is told to `log` as one line.
pub fn build_output(
    images: &Images,
    drv_path: &StorePath,
    drv: &Derivation,
    out: &StorePath,
    log: &mut dyn FnMut(&str),
) -> Result<Built> {
    let opts = options_of(images, drv)?;
    let mut roots = TempRootGuardSet::default();
    let (layout, built) = build_layout(images, &opts, &mut roots, log)?;
    log("registering the image's layout");
    register_layout(images, &layout, drv_path, out)?;
    Ok(built)
}

/// Registers an image derivation's layout at its output path `out`, with `drv_path` as deriver.
pub(crate) fn register_layout(images: &Images, layout: &Layout, drv_path: &StorePath, out: &StorePath) -> Result<()> {
    let dir = images.store.store_dir();
    let nar = layout.nar(dir);
    let info = PathInfo {
        path: out.clone(),
        nar_hash: Hash::digest(HashAlgo::Sha256, &nar),
        nar_size: nar.len() as u64,
        references: layout.references(dir),
        deriver: Some(drv_path.clone()),
        registration_time: 0,
        ultimate: true,
        signatures: BTreeSet::new(),
        ca: None,
    };
    let batch = images.store.build_batch()?;
    batch.add_nar_with_info::<_, cairn_store::StoreError>(info, &nar[..], |_| Ok(()))?;
    let committed = batch.commit()?;
    if let Some((_, missing)) = committed.incomplete.first() {
        return Err(ImageError::BadBuild(format!("the layout's reference '{}' is not valid", dir.display(missing))));
    }
    Ok(())
}

/// Makes every blob of the image of `opts` (or finds it remembered) and returns its layout;
/// each step is told to `log` as one line.
pub fn build_layout(
    images: &Images,
    opts: &BuildOptions,
    roots: &mut TempRootGuardSet,
    log: &mut dyn FnMut(&str),
) -> Result<(Layout, Built)> {
    let store = &images.store;
    let dir = store.store_dir().clone();
    roots.hold(store.temp_root(opts.paths.clone()));
    log("reading the closure");
    let closure = store.walk(&opts.paths, Direction::References)?;
    let mut refs = BTreeMap::new();
    for p in &closure {
        refs.insert(p.clone(), store.valid_path_info(p)?.references);
    }
    let base = match &opts.from {
        Some(img) => {
            roots.hold(store.temp_root([img.layout.clone()]));
            let (desc, m) = images
                .image_manifests(img)?
                .into_iter()
                .next()
                .ok_or_else(|| ImageError::NotAnImage(dir.display(&img.layout)))?;
            let config: serde_json::Value =
                serde_json::from_slice(&images.read_manifest(&m.children[0], "the base image")?)
                    .map_err(|e| cairn_oci::OciError::ManifestJson(format!("the base image's config: {e}")))?;
            Some((desc, m, config))
        }
        None => None,
    };
    let base_layers = base.as_ref().map(|(_, m, _)| m.layers().len()).unwrap_or(0);
    let budget = budget(opts.max_layers, base_layers + opts.copies.len())?;
    let groups = group_layers(popularity_order(&dir, &refs), budget);
    log(&format!("{} in {}", plural(closure.len(), "store path"), plural(groups.len(), "store layer")));

    let mut layer_descs: Vec<Descriptor> = base.as_ref().map(|(_, m, _)| m.layers().to_vec()).unwrap_or_default();
    let mut diff_ids: Vec<String> = match &base {
        Some((_, _, c)) => c["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d.as_str().map(str::to_owned)).collect())
            .unwrap_or_default(),
        None => Vec::new(),
    };
    if diff_ids.len() != base_layers {
        return Err(ImageError::BadBuild("the base image's config does not list a diff id per layer".into()));
    }
    let t = std::time::Instant::now();
    let (layers, written) = store_layers(images, &groups, opts.compression, roots, log)?;
    tracing::debug!(layers = layers.len(), described = written, elapsed = ?t.elapsed(), "store layers");
    let mut hints = BTreeMap::new();
    for (i, l) in layers.iter().enumerate() {
        if opts.materialise {
            log(&format!("layer {}/{}: storing its {}", i + 1, layers.len(), human(l.recipe.size)));
            materialise(images, l, roots)?;
        }
        let r = &l.recipe;
        diff_ids.push(r.diff_id.clone());
        layer_descs.push(descriptor(&r.media_type, r.digest(), r.size));
        hints.insert(r.digest(), l.path.clone());
    }
    for (path, dest) in &opts.copies {
        log(&format!("layer for {} at {dest}", dir.display(path)));
        roots.hold(store.temp_root([path.clone()]));
        let l = copy_layer(images, path, dest, opts.compression, roots)?;
        if opts.materialise {
            materialise(images, &l, roots)?;
        }
        diff_ids.push(l.recipe.diff_id.clone());
        layer_descs.push(descriptor(&l.recipe.media_type, l.recipe.digest(), l.recipe.size));
        hints.insert(l.recipe.digest(), l.path.clone());
    }
    log("writing the /etc and /tmp layer");
    let custom = customisation_layer()?;
    let cd = Digest::sha256_of(&custom);
    roots.hold(images.root_blobs([&cd]));
    images.add_blob(&cd, custom.len() as u64, &custom[..])?;
    diff_ids.push(cd.to_string());
    layer_descs.push(descriptor(LAYER, cd, custom.len() as u64));

    let mut config = match &base {
        Some((_, _, c)) => c.clone(),
        None => {
            serde_json::json!({ "architecture": cairn_oci::Platform::host().architecture, "os": "linux", "config": {} })
        }
    };
    let cfg = config["config"].as_object_mut().map(|o| o.clone()).unwrap_or_default();
    let mut cfg = serde_json::Value::Object(cfg);
    if !opts.entrypoint.is_empty() {
        cfg["Entrypoint"] = serde_json::json!(opts.entrypoint);
    }
    if !opts.cmd.is_empty() {
        cfg["Cmd"] = serde_json::json!(opts.cmd);
    }
    if !opts.env.is_empty() {
        // A value for a name the base sets replaces it, as a Dockerfile's ENV does.
        let mut env: Vec<String> =
            cfg["Env"].as_array().into_iter().flatten().filter_map(|e| e.as_str().map(str::to_owned)).collect();
        crate::process::merge_env(&mut env, opts.env.iter().cloned());
        cfg["Env"] = serde_json::json!(env);
    }
    config["config"] = cfg;
    let added = diff_ids.len() - base_layers;
    config["rootfs"] = serde_json::json!({ "type": "layers", "diff_ids": diff_ids });
    if base.is_some() {
        // The base's history and creation time stay (the image is as reproducible as its base),
        // and each layer added gets an entry, so that history still has one per layer.
        let created = config.get("created").cloned();
        let mut history = config["history"].as_array().cloned().unwrap_or_default();
        for i in 0..added {
            let mut entry = serde_json::json!({
                "created_by": "cairn image build",
                "comment": format!("layer {} of {added} added to the base", i + 1),
            });
            if let Some(c) = &created {
                entry["created"] = c.clone();
            }
            history.push(entry);
        }
        config["history"] = serde_json::Value::Array(history);
    } else if let Some(o) = config.as_object_mut() {
        // Nothing says when: the same closure makes the same image.
        o.remove("history");
        o.remove("created");
    }
    log("writing the config");
    let config_desc = store_json(images, CONFIG, &config, roots)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": layer_descs.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
    });
    log("writing the manifest");
    let manifest_desc = store_json(images, OCI_MANIFEST, &manifest, roots)?;
    // With `materialise`, the blob paths exist now and are linked in place of the descriptions.
    let layout = images.layout_of(vec![manifest_desc], &hints, roots)?;
    Ok((layout, Built { layers_written: written, store_layers: layers.len() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_nix::StoreDir;

    fn sp(name: &str, n: u8) -> StorePath {
        StorePath::new([n; 20], name).unwrap()
    }

    #[test]
    fn popularity_as_nixpkgs_counts_it() {
        // foo → bar → baz → tux, foo → baz: baz and tux appear twice when the graph is unfolded
        // from its root, bar and foo once (closure-graph.py's own example).
        let dir = StoreDir::new("/nix/store").unwrap();
        let (foo, bar, baz, tux) = (sp("foo", 1), sp("bar", 2), sp("baz", 3), sp("tux", 4));
        let refs: BTreeMap<StorePath, BTreeSet<StorePath>> = [
            (foo.clone(), [foo.clone(), bar.clone(), baz.clone()].into()),
            (bar.clone(), [bar.clone(), baz.clone()].into()),
            (baz.clone(), [baz.clone(), tux.clone()].into()),
            (tux.clone(), [tux.clone()].into()),
        ]
        .into();
        assert_eq!(popularity_order(&dir, &refs), vec![baz.clone(), tux.clone(), bar.clone(), foo.clone()]);
        assert_eq!(
            group_layers(vec![baz.clone(), tux.clone(), bar.clone(), foo.clone()], 2),
            vec![vec![baz.clone()], vec![tux, bar, foo]]
        );
        assert_eq!(group_layers(vec![baz.clone()], 5), vec![vec![baz]]);
        assert!(group_layers(vec![], 3).is_empty());
    }

    #[test]
    fn the_customisation_layer_is_reproducible() {
        assert_eq!(customisation_layer().unwrap(), customisation_layer().unwrap());
        let layer = customisation_layer().unwrap();
        let mut a = tar::Archive::new(&layer[..]);
        let names: Vec<String> =
            a.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        assert_eq!(names, ["etc/", "etc/group", "etc/passwd", "tmp/"]);
    }
}
