//! Blob paths and image layouts as store paths.
//!
//! A blob's store path is the flat fixed-output path of its digest with the name
//! `oci-blob-<alg>-<hex>`: the path `nix-store --add-fixed <alg>` gives a file of that name and
//! those bytes, computable without the bytes. An image is an OCI image layout whose
//! `blobs/<alg>/<hex>` entries are *relative* symlinks (`../../../<blob path's base name>`) to
//! the blob paths: they resolve inside the store directory wherever it is mounted (a private
//! root included), and the hash parts in them are the layout's references, so the collector
//! keeps an image's blobs exactly as long as the image.
//!
//! A layer that cairn can make again from store paths need not be stored as a blob at all: it
//! is a *streamed layer*, a small text path named `oci-layer-<alg>-<hex>` that describes the
//! layer (the paths, the tar options, digest and size) and refers to the paths it holds. A layout
//! links such a layer's `blobs/<alg>/<hex>` entry to that description instead of to a blob path,
//! so the layout (and through it the description) keeps the layer's store paths alive; the
//! layer's bytes are produced when someone reads them through cairn. Such a layout is not a
//! complete OCI layout on disk: export it (or build with `--materialise`) for one that is.
//!
//! The layout's `index.json` lists the image's top manifest (or manifests) without a
//! `ref.name` annotation: tags live outside the layout, so the same image under two names is
//! one store path.

use std::collections::{BTreeMap, BTreeSet};

use cairn_nix::nar::NarWriter;
use cairn_nix::{FileIngestionMethod, StoreDir, StorePath};

use crate::manifest::{Descriptor, OCI_INDEX};
use crate::{Digest, DigestAlgo, OciError, Result};

/// The contents of every layout's `oci-layout` file.
pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
/// The annotation naming a manifest in an `index.json` (what `oci:DIR:REF` picks).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The store path name of a blob.
pub fn blob_name(d: &Digest) -> String {
    format!("oci-blob-{}-{}", d.algo().as_str(), d.hex())
}

/// The store path of a blob: flat fixed-output, from the digest alone.
pub fn blob_path(dir: &StoreDir, d: &Digest) -> StorePath {
    dir.make_fixed_output_path(&blob_name(d), FileIngestionMethod::Flat, &d.to_hash(), &BTreeSet::new(), false)
        .expect("blob names are valid store path names")
}

/// The store path name of a streamed layer's description.
pub fn streamed_layer_name(d: &Digest) -> String {
    format!("oci-layer-{}-{}", d.algo().as_str(), d.hex())
}

fn digest_after(name: &str, prefix: &str) -> Option<Digest> {
    let rest = name.strip_prefix(prefix)?;
    let (alg, hex) = rest.split_once('-')?;
    Digest::parse(&format!("{alg}:{hex}")).ok()
}

/// The digest a blob path's name spells, if it is one.
pub fn digest_of_blob_name(name: &str) -> Option<Digest> {
    digest_after(name, "oci-blob-")
}

/// The digest a streamed layer's description is named by, if the name is one.
pub fn digest_of_streamed_layer_name(name: &str) -> Option<Digest> {
    digest_after(name, "oci-layer-")
}

/// An image layout to be stored: the manifests its `index.json` lists, every blob it holds, and
/// for the streamed layers among them the store path of their description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub manifests: Vec<Descriptor>,
    pub blobs: BTreeSet<Digest>,
    pub streamed: BTreeMap<Digest, StorePath>,
}

impl Layout {
    /// The store path name: `oci-image-<hex of the first manifest's digest>`.
    pub fn name(&self) -> String {
        match self.manifests.first() {
            Some(d) => format!("oci-image-{}", d.digest.hex()),
            None => "oci-image-empty".into(),
        }
    }

    /// `index.json`: an OCI index of the listed manifests, compact JSON.
    pub fn index_json(&self) -> Vec<u8> {
        index_json(&self.manifests)
    }

    /// The store path a blob entry links to: the blob path, or a streamed layer's description.
    pub fn target(&self, dir: &StoreDir, d: &Digest) -> StorePath {
        self.streamed.get(d).cloned().unwrap_or_else(|| blob_path(dir, d))
    }

    /// The paths the layout links to, which are its references.
    pub fn references(&self, dir: &StoreDir) -> BTreeSet<StorePath> {
        self.blobs.iter().map(|d| self.target(dir, d)).collect()
    }

    /// The layout serialised as a NAR: `blobs/<alg>/<hex>` symlinks, `index.json`, `oci-layout`.
    pub fn nar(&self, dir: &StoreDir) -> Vec<u8> {
        let mut by_algo: BTreeMap<DigestAlgo, Vec<&Digest>> = BTreeMap::new();
        for d in &self.blobs {
            by_algo.entry(d.algo()).or_default().push(d);
        }
        let mut w = NarWriter::new(Vec::new()).expect("writing to memory");
        let index = self.index_json();
        let run = |w: &mut NarWriter<Vec<u8>>| -> std::result::Result<(), cairn_nix::nar::NarWriteError> {
            w.begin_directory(None)?;
            w.begin_directory(Some(b"blobs"))?;
            let mut algos: Vec<_> = by_algo.iter().collect();
            algos.sort_by_key(|(a, _)| a.as_str());
            for (algo, digests) in algos {
                w.begin_directory(Some(algo.as_str().as_bytes()))?;
                for d in digests {
                    let target = format!("../../../{}", self.target(dir, d).base_name());
                    w.symlink(Some(d.hex().as_bytes()), target.as_bytes())?;
                }
                w.end_directory()?;
            }
            w.end_directory()?;
            w.regular(Some(b"index.json"), false, index.len() as u64, &mut &index[..])?;
            w.regular(Some(b"oci-layout"), false, OCI_LAYOUT.len() as u64, &mut &OCI_LAYOUT[..])?;
            w.end_directory()
        };
        run(&mut w).expect("a layout's entries are valid and sorted");
        w.finish().expect("complete NAR")
    }
}

/// An OCI index listing `manifests`, compact JSON.
pub fn index_json(manifests: &[Descriptor]) -> Vec<u8> {
    let v = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&v).expect("JSON values serialise")
}

/// The manifests an `index.json` lists (of a stored layout or of an `oci:` directory).
pub fn parse_index(bytes: &[u8]) -> Result<Vec<Descriptor>> {
    let m =
        crate::Manifest::parse(bytes, Some(OCI_INDEX)).map_err(|e| OciError::BadLayout(format!("index.json: {e}")))?;
    if m.kind != crate::ManifestKind::Index {
        return Err(OciError::BadLayout("index.json is not an image index".into()));
    }
    Ok(m.children)
}

/// The entries of an index that `reference` names: those whose `ref.name` annotation is it,
/// or, without a reference, the only entry (as skopeo picks).
pub fn pick<'a>(manifests: &'a [Descriptor], reference: Option<&str>) -> Result<&'a Descriptor> {
    match reference {
        Some(r) => manifests
            .iter()
            .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(r))
            .ok_or_else(|| OciError::BadLayout(format!("no manifest in index.json is named '{r}'"))),
        None if manifests.len() == 1 => Ok(&manifests[0]),
        None => {
            Err(OciError::BadLayout(format!("index.json lists {} manifests: name one (oci:DIR:REF)", manifests.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::OCI_MANIFEST;
    use cairn_nix::nar::NarReader;

    #[test]
    fn blob_paths_are_nix_flat_paths() {
        // `nix-store --add-fixed sha256` of a file named like the blob holding "hello\n".
        let dir = StoreDir::new("/nix/store").unwrap();
        let d = Digest::sha256_of(b"hello\n");
        let p = blob_path(&dir, &d);
        assert_eq!(p.name(), format!("oci-blob-sha256-{}", d.hex()));
        assert_eq!(digest_of_blob_name(p.name()), Some(d.clone()));
        assert_eq!(digest_of_blob_name("oci-blob-sha256-xyz"), None);
        assert_eq!(digest_of_streamed_layer_name(&streamed_layer_name(&d)), Some(d.clone()));
        assert_eq!(digest_of_streamed_layer_name(p.name()), None);
    }

    #[test]
    fn layout_nar_links_and_references_its_blobs() {
        let dir = StoreDir::new("/store").unwrap();
        let m = Digest::sha256_of(b"m");
        let layout = Layout {
            manifests: vec![Descriptor {
                media_type: OCI_MANIFEST.into(),
                digest: m.clone(),
                size: 1,
                platform: None,
                annotations: Default::default(),
            }],
            blobs: [m.clone(), Digest::sha256_of(b"l"), Digest::sha256_of(b"s")].into_iter().collect(),
            streamed: [(Digest::sha256_of(b"s"), StorePath::new([7; 20], "oci-layer-sha256-s").unwrap())].into(),
        };
        let nar = layout.nar(&dir);
        // The NAR parses, and the scanner would find each blob's hash part in it.
        let mut r = NarReader::new(&nar[..], Default::default()).unwrap();
        while r.next_event().unwrap().is_some() {}
        let refs = layout.references(&dir);
        assert_eq!(refs.len(), 3);
        assert!(refs.contains(&StorePath::new([7; 20], "oci-layer-sha256-s").unwrap()));
        assert!(!refs.contains(&blob_path(&dir, &Digest::sha256_of(b"s"))));
        for p in refs {
            assert!(nar.windows(32).any(|w| w == p.hash_part().as_bytes()));
        }
        assert_eq!(parse_index(&layout.index_json()).unwrap(), layout.manifests);
        assert_eq!(layout.name(), format!("oci-image-{}", m.hex()));
    }

    #[test]
    fn picking_by_ref_name() {
        let mk = |r: Option<&str>| Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: Digest::sha256_of(r.unwrap_or("").as_bytes()),
            size: 1,
            platform: None,
            annotations: r.map(|r| (REF_NAME.to_owned(), r.to_owned())).into_iter().collect(),
        };
        let two = [mk(Some("a")), mk(Some("b"))];
        assert_eq!(pick(&two, Some("b")).unwrap(), &two[1]);
        assert!(pick(&two, None).is_err());
        assert!(pick(&two, Some("c")).is_err());
        assert_eq!(pick(&two[..1], None).unwrap(), &two[0]);
    }
}
