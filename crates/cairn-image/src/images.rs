//! Images in the store: layouts made from stored blobs, tags, and what a user names.
//!
//! All calls block (file system, SQLite): the daemon runs them on its blocking pool.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use cairn_nix::StorePath;
use cairn_oci::layout::{self, blob_name, blob_path, digest_of_blob_name, digest_of_streamed_layer_name};
use cairn_oci::manifest::{is_manifest_type, Descriptor, Manifest, ManifestKind};
use cairn_oci::tag::ROOT_GROUP;
use cairn_oci::{Digest, TagName, MAX_MANIFEST_SIZE};
use cairn_store::{LocalStore, TempRootGuard};

use crate::streamed::{LayerReader, LayerRecipe};
use crate::{ImageError, Result};

/// A stored image: its layout path and the manifests its `index.json` lists.
#[derive(Debug, Clone)]
pub struct Image {
    pub layout: StorePath,
    pub manifests: Vec<Descriptor>,
    /// Every blob the layout links to.
    pub blobs: BTreeSet<Digest>,
    /// The streamed layers among them, with the paths of their descriptions.
    pub streamed: BTreeMap<Digest, StorePath>,
}

/// Where a blob's bytes come from.
pub enum BlobSource {
    /// A blob path's file.
    File(PathBuf),
    /// A streamed layer, made from store paths when read.
    Streamed(Box<LayerRecipe>),
}

/// A blob found in the store, rooted while this is held.
pub struct Blob {
    /// The blob path, or the streamed layer's description.
    pub path: StorePath,
    pub size: u64,
    pub source: BlobSource,
    _root: TempRootGuard,
}

impl Blob {
    pub fn is_streamed(&self) -> bool {
        matches!(self.source, BlobSource::Streamed(_))
    }
}

impl Image {
    /// The image's digest: its (first) top manifest's.
    pub fn digest(&self) -> &Digest {
        &self.manifests[0].digest
    }
}

/// Image operations over one store.
#[derive(Clone)]
pub struct Images {
    pub store: Arc<LocalStore>,
}

impl Images {
    pub fn new(store: Arc<LocalStore>) -> Images {
        Images { store }
    }

    /// The store path of a blob.
    pub fn blob_path(&self, d: &Digest) -> StorePath {
        blob_path(self.store.store_dir(), d)
    }

    /// Roots the blob paths of `digests` for the life of the guard (before any validity check).
    pub fn root_blobs<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) -> TempRootGuard {
        self.store.temp_root(digests.into_iter().map(|d| self.blob_path(d)).collect::<Vec<_>>())
    }

    /// Whether a blob is in the store (as a blob path or a streamed layer).
    pub fn has_blob(&self, d: &Digest) -> Result<bool> {
        Ok(self.find_blob(d, None)?.is_some())
    }

    /// A blob by digest: its blob path if valid, else the streamed layer `hint` names (an
    /// image's link) or the one remembered for the digest.
    pub fn find_blob(&self, d: &Digest, hint: Option<&StorePath>) -> Result<Option<Blob>> {
        let path = self.blob_path(d);
        let root = self.store.temp_root([path.clone()]);
        if let Some(info) = self.store.path_info(&path)? {
            // The path's name alone does not vouch for its bytes (see cairn-store's `ca.rs`).
            self.store.checked_flat(info, &d.to_hash())?;
            let real = self.store.real_path(&path);
            let m = fs::symlink_metadata(&real)
                .map_err(|source| ImageError::Io { path: real.display().to_string(), source })?;
            return Ok(Some(Blob { path, size: m.len(), source: BlobSource::File(real), _root: root }));
        }
        drop(root);
        let (recipe_path, root) = match hint {
            Some(h) => {
                let root = self.store.temp_root([h.clone()]);
                if !self.store.is_valid(h)? {
                    return Ok(None);
                }
                (h.clone(), root)
            }
            None => match self.store.memo(crate::memo::STREAMED_LAYER, &d.to_hash())? {
                Some(found) => found,
                None => return Ok(None),
            },
        };
        let shown = self.store.store_dir().display(&recipe_path);
        let real = self.store.real_path(&recipe_path);
        let bytes = fs::read(&real).map_err(|source| ImageError::Io { path: real.display().to_string(), source })?;
        let recipe = LayerRecipe::parse(&bytes, &shown)?;
        if recipe.digest != d.to_string() {
            return Err(ImageError::BadLayer(format!("{shown} describes layer {}, not {d}", recipe.digest)));
        }
        Ok(Some(Blob {
            path: recipe_path,
            size: recipe.size,
            source: BlobSource::Streamed(Box::new(recipe)),
            _root: root,
        }))
    }

    /// A blob of `img`.
    pub fn blob_of(&self, img: &Image, d: &Digest) -> Result<Option<Blob>> {
        self.find_blob(d, img.streamed.get(d))
    }

    /// A blob's bytes: its file, or the streamed layer made now (and checked as it ends).
    pub fn open_blob(&self, b: &Blob) -> Result<Box<dyn Read + Send>> {
        match &b.source {
            BlobSource::File(real) => {
                let f = fs::File::open(real)
                    .map_err(|source| ImageError::Io { path: real.display().to_string(), source })?;
                Ok(Box::new(f))
            }
            BlobSource::Streamed(r) => Ok(Box::new(LayerReader::open(self.store.clone(), r)?)),
        }
    }

    /// A blob's bytes as chunks of up to 1 MiB: a file read in large reads, a streamed layer's
    /// chunks as they are made (the last item is the error if the layer is refused).
    pub fn blob_chunks(&self, b: &Blob) -> Result<Box<dyn Iterator<Item = std::io::Result<Vec<u8>>> + Send>> {
        match &b.source {
            BlobSource::File(real) => {
                let mut f = fs::File::open(real)
                    .map_err(|source| ImageError::Io { path: real.display().to_string(), source })?;
                Ok(Box::new(std::iter::from_fn(move || {
                    let mut chunk = Vec::with_capacity(1 << 20);
                    match Read::read_to_end(&mut Read::take(&mut f, 1 << 20), &mut chunk) {
                        Ok(0) => None,
                        Ok(_) => Some(Ok(chunk)),
                        Err(e) => Some(Err(e)),
                    }
                })))
            }
            BlobSource::Streamed(r) => Ok(Box::new(LayerReader::open(self.store.clone(), r)?.into_chunks())),
        }
    }

    /// Adds a blob's bytes, refused unless they have `digest` and `size`.
    pub fn add_blob(&self, digest: &Digest, size: u64, input: impl Read) -> Result<cairn_store::PathInfo> {
        Ok(self.store.add_flat_expecting(&blob_name(digest), input, size, &digest.to_hash())?)
    }

    /// A stored manifest's bytes (callers hold a root on it). Refuses a blob larger than any
    /// manifest may be, or one whose size is not what its descriptor says.
    pub fn read_manifest(&self, d: &Descriptor, referrer: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(&d.digest);
        if !self.store.is_valid(&path)? {
            return Err(ImageError::MissingBlob { digest: d.digest.to_string(), referrer: referrer.to_owned() });
        }
        if d.size > MAX_MANIFEST_SIZE {
            return Err(cairn_oci::OciError::ManifestTooLarge { size: d.size }.into());
        }
        let real = self.store.real_path(&path);
        let bytes = fs::read(&real).map_err(|source| ImageError::Io { path: real.display().to_string(), source })?;
        if bytes.len() as u64 != d.size {
            return Err(ImageError::BlobSize {
                digest: d.digest.to_string(),
                referrer: referrer.to_owned(),
                expected: d.size,
                actual: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }

    /// Every blob `top` reaches (itself included), each checked to be in the store with the
    /// size its descriptor gives, and the streamed layers among them (found through `hints`
    /// first); manifests are parsed as they are met.
    pub fn closure(
        &self,
        top: &[Descriptor],
        hints: &BTreeMap<Digest, StorePath>,
        roots: &mut TempRootGuardSet,
    ) -> Result<(BTreeSet<Digest>, BTreeMap<Digest, StorePath>)> {
        let mut seen = BTreeSet::new();
        let mut streamed = BTreeMap::new();
        let mut todo: Vec<(Descriptor, String)> = top.iter().map(|d| (d.clone(), "the image".to_owned())).collect();
        while let Some((d, referrer)) = todo.pop() {
            if !seen.insert(d.digest.clone()) {
                continue;
            }
            roots.hold(self.root_blobs([&d.digest]));
            if is_manifest_type(&d.media_type) {
                let bytes = self.read_manifest(&d, &referrer)?;
                let m = Manifest::parse(&bytes, Some(&d.media_type))?;
                let name = format!("manifest {}", d.digest);
                for c in m.children {
                    todo.push((c, name.clone()));
                }
            } else {
                let Some(blob) = self.find_blob(&d.digest, hints.get(&d.digest))? else {
                    return Err(ImageError::MissingBlob { digest: d.digest.to_string(), referrer });
                };
                if blob.size != d.size {
                    return Err(ImageError::BlobSize {
                        digest: d.digest.to_string(),
                        referrer,
                        expected: d.size,
                        actual: blob.size,
                    });
                }
                if blob.is_streamed() {
                    streamed.insert(d.digest.clone(), blob.path.clone());
                }
                roots.hold(blob._root);
            }
        }
        Ok((seen, streamed))
    }

    /// Makes the layout of `manifests` (each stored, as is everything they reach) and points
    /// `tag` at it.
    pub fn commit(&self, manifests: Vec<Descriptor>, tag: Option<&TagName>) -> Result<Image> {
        let mut roots = TempRootGuardSet::default();
        let l = self.layout_of(manifests, &BTreeMap::new(), &mut roots)?;
        let dir = self.store.store_dir();
        let info = self.store.add_nar_with_references(&l.name(), &l.nar(dir)[..], &l.references(dir))?;
        if let Some(t) = tag {
            self.store.set_root_link(ROOT_GROUP, &t.file_name(), &info.path)?;
        }
        Ok(Image { layout: info.path, manifests: l.manifests, blobs: l.blobs, streamed: l.streamed })
    }

    /// The layout of `manifests`, everything they reach checked present (streamed layers found
    /// through `hints` first) and rooted in `roots`.
    pub fn layout_of(
        &self,
        manifests: Vec<Descriptor>,
        hints: &BTreeMap<Digest, StorePath>,
        roots: &mut TempRootGuardSet,
    ) -> Result<layout::Layout> {
        if manifests.is_empty() {
            return Err(cairn_oci::OciError::BadLayout("an image needs at least one manifest".into()).into());
        }
        let (blobs, streamed) = self.closure(&manifests, hints, roots)?;
        Ok(layout::Layout { manifests, blobs, streamed })
    }

    /// Deletes blobs an operation added before it failed (those nothing else uses by now).
    pub fn forget(&self, digests: &[Digest]) {
        for d in digests {
            if let Err(e) = self.store.delete_paths(&[self.blob_path(d)]) {
                tracing::debug!(digest = %d, "blob of a failed operation kept: {e}");
            }
        }
    }

    /// Reads a stored layout back.
    pub fn load(&self, layout: &StorePath) -> Result<Image> {
        let shown = self.store.store_dir().display(layout);
        let Some(info) = self.store.path_info(layout)? else { return Err(ImageError::NotAnImage(shown)) };
        let real = self.store.real_path(layout).join("index.json");
        let bytes = match fs::read(&real) {
            Ok(b) => b,
            Err(_) => return Err(ImageError::NotAnImage(shown)),
        };
        let manifests = layout::parse_index(&bytes).map_err(|_| ImageError::NotAnImage(shown.clone()))?;
        if manifests.is_empty() {
            return Err(ImageError::NotAnImage(shown));
        }
        let mut blobs: BTreeSet<Digest> =
            info.references.iter().filter_map(|r| digest_of_blob_name(r.name())).collect();
        let streamed: BTreeMap<Digest, StorePath> = info
            .references
            .iter()
            .filter_map(|r| digest_of_streamed_layer_name(r.name()).map(|d| (d, r.clone())))
            .collect();
        blobs.extend(streamed.keys().cloned());
        Ok(Image { layout: layout.clone(), manifests, blobs, streamed })
    }

    /// What a user names: a layout's store path, an image digest (of a tagged image), or a tag.
    pub fn resolve(&self, what: &str) -> Result<Image> {
        let dir = self.store.store_dir();
        if what.starts_with('/') {
            let (p, _) = dir.parse_inner(what).map_err(|_| ImageError::NotAnImage(what.to_owned()))?;
            return self.load(&p);
        }
        // `NAME@DIGEST`, as docker and skopeo name an image: one of that repository's images
        // (tagged, or pushed by digest) holding that manifest.
        if let Some((name, d)) = what.rsplit_once('@').and_then(|(n, d)| Some((n, Digest::parse(d).ok()?))) {
            cairn_oci::tag::validate_repository(name)?;
            for (link, p) in self.store.root_links(ROOT_GROUP)? {
                let named = TagName::from_file_name(&link).is_ok_and(|t| t.name() == name)
                    || cairn_oci::tag::parse_digest_root_file_name(&link).is_some_and(|(n, _)| n == name);
                if !named {
                    continue;
                }
                if let Ok(img) = self.load(&p) {
                    if img.manifests.iter().any(|m| m.digest == d) {
                        return Ok(img);
                    }
                }
            }
            return Err(ImageError::NoSuchDigest(what.to_owned()));
        }
        if let Ok(d) = Digest::parse(what) {
            for (_, p) in self.store.root_links(ROOT_GROUP)? {
                if let Ok(img) = self.load(&p) {
                    if img.manifests.iter().any(|m| m.digest == d) {
                        return Ok(img);
                    }
                }
            }
            return Err(ImageError::NoSuchDigest(what.to_owned()));
        }
        let t = TagName::parse(what)?;
        match self.store.root_link_target(ROOT_GROUP, &t.file_name())? {
            Some(p) => self.load(&p),
            None => Err(ImageError::NoSuchTag(t.to_string())),
        }
    }

    /// Every tag and the image it names, by layout.
    pub fn list(&self) -> Result<Vec<(Image, Vec<TagName>)>> {
        let mut by_layout: BTreeMap<StorePath, Vec<TagName>> = BTreeMap::new();
        for (file, p) in self.store.root_links(ROOT_GROUP)? {
            if let Ok(t) = TagName::from_file_name(&file) {
                by_layout.entry(p).or_default().push(t);
            }
        }
        let mut out = Vec::new();
        for (p, tags) in by_layout {
            if let Ok(img) = self.load(&p) {
                out.push((img, tags));
            }
        }
        Ok(out)
    }

    /// The tags naming a layout.
    pub fn tags_of(&self, layout: &StorePath) -> Result<Vec<TagName>> {
        Ok(self
            .store
            .root_links(ROOT_GROUP)?
            .into_iter()
            .filter(|(_, p)| p == layout)
            .filter_map(|(f, _)| TagName::from_file_name(&f).ok())
            .collect())
    }

    /// The sum of an image's blobs' sizes.
    pub fn size_of(&self, img: &Image) -> Result<u64> {
        let mut total = 0;
        for d in &img.blobs {
            total += self.blob_of(img, d)?.map(|b| b.size).unwrap_or(0);
        }
        Ok(total)
    }

    /// The size of a stored blob (or streamed layer), or `None` if it is not in the store.
    pub fn blob_size(&self, d: &Digest) -> Result<Option<u64>> {
        Ok(self.find_blob(d, None)?.map(|b| b.size))
    }

    /// Every image manifest an image holds (an index's entries that are stored, recursively),
    /// with their parsed contents.
    pub fn image_manifests(&self, img: &Image) -> Result<Vec<(Descriptor, Manifest)>> {
        let mut out = Vec::new();
        let mut todo: Vec<Descriptor> = img.manifests.iter().rev().cloned().collect();
        while let Some(d) = todo.pop() {
            if !img.blobs.contains(&d.digest) {
                continue;
            }
            let m = Manifest::parse(&self.read_manifest(&d, "the image")?, Some(&d.media_type))?;
            match m.kind {
                ManifestKind::Image => out.push((d, m)),
                ManifestKind::Index => {
                    todo.extend(m.children.iter().rev().filter(|c| is_manifest_type(&c.media_type)).cloned())
                }
            }
        }
        Ok(out)
    }
}

/// Temporary roots gathered while walking an image.
#[derive(Default)]
pub struct TempRootGuardSet(Vec<TempRootGuard>);

impl TempRootGuardSet {
    pub fn hold(&mut self, g: TempRootGuard) {
        self.0.push(g);
    }

    pub fn extend(&mut self, other: TempRootGuardSet) {
        self.0.extend(other.0);
    }
}
