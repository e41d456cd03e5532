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
//! Layers are reproducible: a tar of the store directory's components and the paths' trees,
//! entries in byte order, mtime 1, owner and group 0 without names, the store's own modes. The
//! same closure and options give the same layer, config and manifest digests on any machine.
//! A layer's digest is remembered per set of paths (`Memo::Layer`), so a rebuild after one path
//! changed writes and hashes only the layers that hold changed paths; a whole build is
//! remembered per input (`Memo::ImageBuild`), so building the same inputs again does no work.
//!
//! All calls block; the daemon runs them on its blocking pool.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write};
use std::path::Path;

use cairn_nix::{Hash, HashAlgo, Hasher, StorePath};
use cairn_oci::manifest::{Descriptor, OCI_MANIFEST};
use cairn_oci::{Digest, TagName};
use cairn_store::{Direction, Memo};

use crate::images::{Image, TempRootGuardSet};
use crate::{ImageError, Images, Result};

/// The media type of the layers a build writes (uncompressed tar).
pub const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Changes whenever the bytes a build writes change, so memos of older builds are not reused.
const FORMAT: &str = "cairn-layered-image-v1";

/// How store layers are compressed. Both compressors are deterministic at a fixed level, so
/// compressed layers are as reproducible as plain ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerCompression {
    #[default]
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    pub fn parse(s: &str) -> Result<LayerCompression> {
        match s {
            "none" => Ok(LayerCompression::None),
            "gzip" => Ok(LayerCompression::Gzip),
            "zstd" => Ok(LayerCompression::Zstd),
            other => Err(ImageError::BadBuild(format!("unknown layer compression '{other}' (none, gzip or zstd)"))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            LayerCompression::None => "none",
            LayerCompression::Gzip => "gzip",
            LayerCompression::Zstd => "zstd",
        }
    }

    fn media_type(self) -> &'static str {
        match self {
            LayerCompression::None => LAYER,
            LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

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
    pub tag: Option<TagName>,
}

/// What a build made.
#[derive(Debug)]
pub struct Built {
    pub image: Image,
    /// The store paths of each store layer, in layer order.
    pub layers: Vec<Vec<StorePath>>,
    /// Layers written and hashed by this build (the others were remembered).
    pub layers_written: usize,
    /// Whether the whole image was remembered from an earlier build.
    pub cached: bool,
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

fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Writes the reproducible tar of `paths` (and of the store directory's components).
pub fn write_layer(images: &Images, paths: &[StorePath], out: impl Write) -> Result<()> {
    let io_err = |path: &Path, source: io::Error| ImageError::Io { path: path.display().to_string(), source };
    let mut b = tar::Builder::new(out);
    let dir = images.store.store_dir().as_str().trim_start_matches('/').to_owned();
    let mut prefix = String::new();
    for comp in dir.split('/').filter(|c| !c.is_empty()) {
        prefix.push_str(comp);
        prefix.push('/');
        let mut h = tar_header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, &prefix, io::empty()).map_err(|e| io_err(Path::new(&prefix), e))?;
    }
    let mut sorted: Vec<&StorePath> = paths.iter().collect();
    sorted.sort_by_key(|p| p.base_name());
    fn walk<W: Write>(b: &mut tar::Builder<W>, real: &Path, name: &str) -> Result<()> {
        let io_err = |source: io::Error| ImageError::Io { path: real.display().to_string(), source };
        let m = fs::symlink_metadata(real).map_err(io_err)?;
        let ft = m.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(real).map_err(io_err)?;
            let mut h = tar_header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut h, name, &target).map_err(io_err)?;
        } else if ft.is_dir() {
            let mut h = tar_header(tar::EntryType::Directory, 0o555, 0);
            b.append_data(&mut h, format!("{name}/"), io::empty()).map_err(io_err)?;
            let mut entries: Vec<_> =
                fs::read_dir(real).map_err(io_err)?.collect::<io::Result<Vec<_>>>().map_err(io_err)?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let child = format!("{name}/{}", e.file_name().to_string_lossy());
                walk(b, &e.path(), &child)?;
            }
        } else {
            use std::os::unix::fs::PermissionsExt;
            let mode = if m.permissions().mode() & 0o111 != 0 { 0o555 } else { 0o444 };
            let mut h = tar_header(tar::EntryType::Regular, mode, m.len());
            let f = fs::File::open(real).map_err(io_err)?;
            b.append_data(&mut h, name, f).map_err(io_err)?;
        }
        Ok(())
    }
    for p in sorted {
        walk(&mut b, &images.store.real_path(p), &format!("{dir}/{}", p.base_name()))?;
    }
    b.into_inner().and_then(|mut w| w.flush()).map_err(|e| io_err(Path::new("layer"), e))?;
    Ok(())
}

/// Hashes what passes into a file.
struct HashingFile {
    file: fs::File,
    hasher: Hasher,
    size: u64,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn memo_key(parts: &[&str]) -> Hash {
    let mut h = Hasher::new(HashAlgo::Sha256);
    for p in parts {
        h.update(p.as_bytes());
        h.update(b"\0");
    }
    h.finish()
}

/// A layer as its memo records it: the blob, and the digest of the uncompressed tar (its diff
/// id), which a compressed blob's own digest does not give.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayerRecord {
    digest: String,
    size: u64,
    diff_id: String,
    media_type: String,
}

fn temp_err(source: io::Error) -> ImageError {
    ImageError::Io { path: "a temporary file".into(), source }
}

/// The layer holding `paths`: remembered, or written, hashed, compressed and added now.
/// Returns its descriptor, its diff id and whether it was written.
fn layer_blob(
    images: &Images,
    paths: &[StorePath],
    compression: LayerCompression,
    roots: &mut TempRootGuardSet,
) -> Result<(Descriptor, Digest, bool)> {
    let dir = images.store.store_dir();
    let mut names: Vec<String> = paths.iter().map(|p| p.base_name()).collect();
    names.sort();
    let mut parts = vec![FORMAT, "layer", dir.as_str(), compression.name()];
    parts.extend(names.iter().map(String::as_str));
    let key = memo_key(&parts);
    // The memo points at a small text path recording the layer and referring to its blob.
    if let Some((record, guard)) = images.store.memo(Memo::Layer, &key)? {
        let bytes = fs::read(images.store.real_path(&record)).unwrap_or_default();
        if let Ok(r) = serde_json::from_slice::<LayerRecord>(&bytes) {
            if let (Ok(d), Ok(diff)) = (Digest::parse(&r.digest), Digest::parse(&r.diff_id)) {
                roots.hold(guard);
                roots.hold(images.root_blobs([&d]));
                if images.has_blob(&d)? {
                    return Ok((descriptor(&r.media_type, d, r.size), diff, false));
                }
            }
        }
    }
    let tmp = tempfile::tempfile().map_err(temp_err)?;
    let mut w = HashingFile { file: tmp, hasher: Hasher::new(HashAlgo::Sha256), size: 0 };
    write_layer(images, paths, &mut w)?;
    let HashingFile { mut file, hasher, size } = w;
    let diff_id = Digest::from_hash(&hasher.finish()).expect("sha256");
    io::Seek::seek(&mut file, io::SeekFrom::Start(0)).map_err(temp_err)?;
    let (mut blob, digest, blob_size) = match compression {
        LayerCompression::None => (file, diff_id.clone(), size),
        c => {
            let out = tempfile::tempfile().map_err(temp_err)?;
            let mut hw = HashingFile { file: out, hasher: Hasher::new(HashAlgo::Sha256), size: 0 };
            let mut input = io::BufReader::with_capacity(1 << 20, file);
            if c == LayerCompression::Gzip {
                let mut e = flate2::write::GzEncoder::new(&mut hw, flate2::Compression::new(6));
                io::copy(&mut input, &mut e).map_err(temp_err)?;
                e.finish().map_err(temp_err)?;
            } else {
                let mut e = zstd::stream::write::Encoder::new(&mut hw, 3).map_err(temp_err)?;
                io::copy(&mut input, &mut e).map_err(temp_err)?;
                e.finish().map_err(temp_err)?;
            }
            let HashingFile { mut file, hasher, size } = hw;
            io::Seek::seek(&mut file, io::SeekFrom::Start(0)).map_err(temp_err)?;
            (file, Digest::from_hash(&hasher.finish()).expect("sha256"), size)
        }
    };
    roots.hold(images.root_blobs([&digest]));
    let info = images.add_blob(&digest, blob_size, io::BufReader::with_capacity(1 << 20, &mut blob))?;
    let record = LayerRecord {
        digest: digest.to_string(),
        size: blob_size,
        diff_id: diff_id.to_string(),
        media_type: compression.media_type().to_owned(),
    };
    let text = serde_json::to_vec(&record).expect("records serialise");
    let refs: BTreeSet<StorePath> = [info.path.clone()].into();
    let rec = images.store.add_text("oci-layer-record", &text, &refs)?;
    images.store.remember(Memo::Layer, &key, &rec.path)?;
    Ok((descriptor(compression.media_type(), digest, blob_size), diff_id, true))
}

fn descriptor(media_type: &str, digest: Digest, size: u64) -> Descriptor {
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

fn store_json(
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

/// Builds (or finds) the image of `opts`' closure.
pub fn build(images: &Images, opts: &BuildOptions) -> Result<Built> {
    let store = &images.store;
    let dir = store.store_dir().clone();
    let mut roots = TempRootGuardSet::default();
    roots.hold(store.temp_root(opts.paths.clone()));
    let closure = store.walk(&opts.paths, Direction::References)?;
    let mut refs = BTreeMap::new();
    for p in &closure {
        refs.insert(p.clone(), store.valid_path_info(p)?.references);
    }
    let base = match &opts.from {
        Some(img) => {
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
    let budget = opts.max_layers.checked_sub(base_layers + 1).filter(|b| *b >= 1).ok_or_else(|| {
        ImageError::BadBuild(format!(
            "--max-layers {} leaves no layer for the store paths ({base_layers} in the base image, 1 for /etc and /tmp)",
            opts.max_layers
        ))
    })?;

    // The whole build, remembered by everything it reads.
    let mut roots_sorted: Vec<String> = opts.paths.iter().map(|p| dir.display(p)).collect();
    roots_sorted.sort();
    let inputs = serde_json::json!({
        "paths": roots_sorted, "maxLayers": opts.max_layers, "entrypoint": opts.entrypoint, "cmd": opts.cmd,
        "env": opts.env, "compression": opts.compression.name(), "from": base.as_ref().map(|(d, _, _)| d.digest.to_string()), "arch": cairn_oci::Platform::host().architecture,
    })
    .to_string();
    let key = memo_key(&[FORMAT, "image", dir.as_str(), &inputs]);
    let groups = group_layers(popularity_order(&dir, &refs), budget);
    if let Some((layout, guard)) = store.memo(Memo::ImageBuild, &key)? {
        roots.hold(guard);
        let image = images.load(&layout)?;
        if let Some(t) = &opts.tag {
            store.set_tag(&t.file_name(), &layout)?;
        }
        return Ok(Built { image, layers: groups, layers_written: 0, cached: true });
    }

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
    let mut written = 0;
    for g in &groups {
        let (d, diff_id, new) = layer_blob(images, g, opts.compression, &mut roots)?;
        written += new as usize;
        diff_ids.push(diff_id.to_string());
        layer_descs.push(d);
    }
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
        let mut env: Vec<serde_json::Value> = cfg["Env"].as_array().cloned().unwrap_or_default();
        env.extend(opts.env.iter().map(|e| serde_json::Value::from(e.as_str())));
        cfg["Env"] = env.into();
    }
    config["config"] = cfg;
    config["rootfs"] = serde_json::json!({ "type": "layers", "diff_ids": diff_ids });
    if let Some(o) = config.as_object_mut() {
        o.remove("history");
        o.remove("created");
    }
    let config_desc = store_json(images, CONFIG, &config, &mut roots)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": layer_descs.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
    });
    let manifest_desc = store_json(images, OCI_MANIFEST, &manifest, &mut roots)?;
    let image = images.commit(vec![manifest_desc], opts.tag.as_ref())?;
    store.remember(Memo::ImageBuild, &key, &image.layout)?;
    Ok(Built { image, layers: groups, layers_written: written, cached: false })
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
