//! Manifests and indexes: what a blob of JSON says about the blobs below it.
//!
//! Parsing goes through `oci-spec`'s types (which accept Docker's schema 2 media types too), and
//! keeps only what a store needs to walk an image: each child's media type, digest, size and
//! platform. The bytes themselves are never re-serialised: a manifest's digest is the digest of
//! the exact bytes a registry or a layout gave, so cairn stores, serves and pushes those bytes.

use std::collections::BTreeMap;
use std::fmt;

use oci_spec::image::{ImageIndex, ImageManifest};

use crate::{Digest, OciError, Result, MAX_MANIFEST_SIZE};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The manifest media types a pull accepts, as an `Accept` header.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Whether a media type names a manifest or an index (a blob of JSON with children).
pub fn is_manifest_type(media_type: &str) -> bool {
    matches!(media_type, OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST)
}

/// An OS/architecture[/variant] triple.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// `OS/ARCH[/VARIANT]`, as `--platform` takes it.
    pub fn parse(s: &str) -> Result<Platform> {
        let bad = || OciError::BadPlatform(s.chars().take(100).collect());
        let mut it = s.split('/');
        let os = it.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
        let arch = it.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
        let variant = it.next().map(str::to_owned);
        if it.next().is_some() || variant.as_deref() == Some("") {
            return Err(bad());
        }
        Ok(Platform { os: os.to_owned(), architecture: arch.to_owned(), variant })
    }

    /// The machine this runs on, in Go's names (what registries' indexes use).
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "x86" => ("386", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" => ("ppc64le", None),
            other => (other, None),
        };
        Platform { os: "linux".into(), architecture: architecture.into(), variant: variant.map(str::to_owned) }
    }

    /// Whether an index entry for `other` runs here: same OS and architecture, and the same
    /// variant when both name one (arm64's `v8` is implied when absent).
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && match (&self.variant, &other.variant) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A content descriptor, reduced to what walking and serving need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub platform: Option<Platform>,
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    fn from_spec(d: &oci_spec::image::Descriptor) -> Result<Descriptor> {
        let digest = Digest::parse(d.digest().as_ref())?;
        let size = d.size();
        if size > i64::MAX as u64 {
            return Err(OciError::BadSize { digest: digest.to_string(), size: -1 });
        }
        Ok(Descriptor {
            media_type: d.media_type().to_string(),
            digest,
            size,
            platform: d.platform().as_ref().map(|p| Platform {
                os: p.os().to_string(),
                architecture: p.architecture().to_string(),
                variant: p.variant().clone(),
            }),
            annotations: d.annotations().clone().unwrap_or_default().into_iter().collect(),
        })
    }

    /// The descriptor as JSON, in the field order the image spec's examples use.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("mediaType".into(), self.media_type.clone().into());
        m.insert("digest".into(), self.digest.to_string().into());
        m.insert("size".into(), self.size.into());
        if !self.annotations.is_empty() {
            m.insert("annotations".into(), serde_json::to_value(&self.annotations).expect("strings"));
        }
        if let Some(p) = &self.platform {
            let mut pm = serde_json::Map::new();
            pm.insert("architecture".into(), p.architecture.clone().into());
            pm.insert("os".into(), p.os.clone().into());
            if let Some(v) = &p.variant {
                pm.insert("variant".into(), v.clone().into());
            }
            m.insert("platform".into(), pm.into());
        }
        m.into()
    }
}

/// Whether a manifest blob is an image manifest or an index of manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    Image,
    Index,
}

/// A parsed manifest or index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub kind: ManifestKind,
    /// The media type the JSON declares, or the one its shape implies.
    pub media_type: String,
    /// For an image: the config, then the layers in order. For an index: the manifests.
    pub children: Vec<Descriptor>,
    /// The image manifest's `subject` (for referrers), if any.
    pub subject: Option<Descriptor>,
    /// An index's or manifest's `artifactType`, if any.
    pub artifact_type: Option<String>,
}

impl Manifest {
    /// Parses a manifest's bytes. `declared` is the media type its descriptor or HTTP answer
    /// gave, used when the JSON has none.
    pub fn parse(bytes: &[u8], declared: Option<&str>) -> Result<Manifest> {
        if bytes.len() as u64 > MAX_MANIFEST_SIZE {
            return Err(OciError::ManifestTooLarge { size: bytes.len() as u64 });
        }
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| OciError::ManifestJson(e.to_string()))?;
        let obj = v.as_object().ok_or_else(|| OciError::ManifestJson("not a JSON object".into()))?;
        if obj.get("schemaVersion").and_then(|s| s.as_i64()) != Some(2) {
            return Err(OciError::UnsupportedManifest("only schemaVersion 2 manifests are supported".into()));
        }
        let declared_in_json = obj.get("mediaType").and_then(|m| m.as_str()).map(str::to_owned);
        let declared_in_json = declared_in_json.as_deref();
        let is_index = match declared_in_json.or(declared) {
            Some(OCI_INDEX | DOCKER_LIST) => true,
            Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
            _ => obj.contains_key("manifests"),
        };
        if is_index {
            let idx: ImageIndex = serde_json::from_value(v).map_err(|e| OciError::ManifestJson(e.to_string()))?;
            let children = idx.manifests().iter().map(Descriptor::from_spec).collect::<Result<Vec<_>>>()?;
            Ok(Manifest {
                kind: ManifestKind::Index,
                media_type: declared_in_json.or(declared).unwrap_or(OCI_INDEX).to_owned(),
                children,
                subject: None,
                artifact_type: idx.artifact_type().as_ref().map(|m| m.to_string()),
            })
        } else {
            let m: ImageManifest = serde_json::from_value(v).map_err(|e| OciError::ManifestJson(e.to_string()))?;
            let mut children = vec![Descriptor::from_spec(m.config())?];
            for l in m.layers() {
                children.push(Descriptor::from_spec(l)?);
            }
            Ok(Manifest {
                kind: ManifestKind::Image,
                media_type: declared_in_json.or(declared).unwrap_or(OCI_MANIFEST).to_owned(),
                children,
                subject: m.subject().as_ref().map(Descriptor::from_spec).transpose()?,
                artifact_type: m.artifact_type().as_ref().map(|m| m.to_string()),
            })
        }
    }

    /// The entry of an index that runs on `platform` (the first that matches, as `docker pull`).
    pub fn select(&self, platform: &Platform) -> Result<&Descriptor> {
        self.children
            .iter()
            .find(|d| is_manifest_type(&d.media_type) && d.platform.as_ref().is_some_and(|p| platform.matches(p)))
            .ok_or_else(|| OciError::NoPlatform(platform.to_string()))
    }

    /// An image's layers (its children after the config).
    pub fn layers(&self) -> &[Descriptor] {
        match self.kind {
            ManifestKind::Image => &self.children[1..],
            ManifestKind::Index => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(b: &[u8]) -> String {
        Digest::sha256_of(b).to_string()
    }

    pub(crate) fn image_manifest(config: &[u8], layers: &[&[u8]]) -> Vec<u8> {
        let layers: Vec<String> = layers
            .iter()
            .map(|l| {
                format!(
                    r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}"#,
                    d(l),
                    l.len()
                )
            })
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
            d(config),
            config.len(),
            layers.join(",")
        )
        .into_bytes()
    }

    #[test]
    fn image_manifest_children_in_order() {
        let m = Manifest::parse(&image_manifest(b"{}", &[b"a", b"b"]), None).unwrap();
        assert_eq!(m.kind, ManifestKind::Image);
        assert_eq!(m.children.len(), 3);
        assert_eq!(m.children[0].digest.to_string(), d(b"{}"));
        assert_eq!(m.layers()[1].digest.to_string(), d(b"b"));
    }

    #[test]
    fn index_selects_platform() {
        let idx = format!(
            r#"{{"schemaVersion":2,"manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":2,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            d(b"arm"),
            d(b"amd")
        );
        let m = Manifest::parse(idx.as_bytes(), Some(OCI_INDEX)).unwrap();
        assert_eq!(m.kind, ManifestKind::Index);
        assert_eq!(m.select(&Platform::parse("linux/amd64").unwrap()).unwrap().size, 2);
        assert_eq!(m.select(&Platform::parse("linux/arm64").unwrap()).unwrap().size, 1);
        assert!(m.select(&Platform::parse("linux/arm64/v9").unwrap()).is_err());
        assert!(m.select(&Platform::parse("windows/amd64").unwrap()).is_err());
    }

    #[test]
    fn refuses_what_it_cannot_walk() {
        assert!(matches!(
            Manifest::parse(br#"{"schemaVersion":1,"fsLayers":[]}"#, None),
            Err(OciError::UnsupportedManifest(_))
        ));
        assert!(Manifest::parse(b"[]", None).is_err());
        let bad_digest = br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:zz","size":1},"layers":[]}"#;
        assert!(Manifest::parse(bad_digest, None).is_err());
        let huge = vec![b' '; MAX_MANIFEST_SIZE as usize + 1];
        assert!(matches!(Manifest::parse(&huge, None), Err(OciError::ManifestTooLarge { .. })));
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux/amd64/v1/x").is_err());
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::parse(&bytes, None);
        }

        #[test]
        fn never_panics_on_json_shapes(s in r#"\{"schemaVersion":2,("mediaType":"[a-z./+]{0,60}",)?"(config|layers|manifests)":(\[\]|\{\}|null|1)\}"#) {
            let _ = Manifest::parse(s.as_bytes(), None);
        }
    }
}
