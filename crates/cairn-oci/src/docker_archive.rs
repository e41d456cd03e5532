//! The JSON of `docker-archive:` files, whose bytes matter: the `manifest.json` and
//! `repositories` that `docker save` writes and `docker load` reads, and the Docker schema 2
//! manifest that the containers tools (skopeo, podman) make up for an image read from such an
//! archive — whose digest becomes the image's.
//!
//! A docker archive holds no image manifest, only `manifest.json`: an array of
//! `{Config, RepoTags, Layers}` naming files in the tar. To give an imported image the digest the
//! containers tools give it, [`Schema2`] is serialised exactly as containers/image's
//! `manifest.Schema2` marshals: compact JSON, fields in the order `schemaVersion`, `mediaType`,
//! `config`, `layers`, and every descriptor `mediaType`, `size`, `digest`, each layer labelled
//! `tar.gzip` whether compressed or not (readers tell them apart by their first bytes).
//! Typed structs rather than `format!` so the field order is the structs' order and a digest
//! is escaped as JSON; the unit tests pin the bytes.
//!
//! Like the rest of the crate this does no I/O: the CLI reads and writes the tar.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::DOCKER_MANIFEST;
use crate::Digest;

/// The media type of a schema 2 image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// The media type the containers tools give every layer of a docker archive.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// One image of `manifest.json`, in the order `docker save` writes the fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ArchiveImage {
    /// The config's file name in the archive (`<hex>.json`).
    pub config: String,
    /// `NAME:TAG`s; `null` or absent in archives of untagged images.
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    /// The layers' file names, bottom first.
    pub layers: Vec<String>,
}

/// `manifest.json`: the archive's images.
pub fn parse_archive_manifest(bytes: &[u8]) -> Result<Vec<ArchiveImage>, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// The bytes of a `manifest.json` of these images.
pub fn archive_manifest(images: &[ArchiveImage]) -> Vec<u8> {
    serde_json::to_vec(images).expect("strings serialise")
}

/// The bytes of `repositories` (the file older `docker load`s read): `{NAME: {TAG: top layer
/// id}}`.
pub fn repositories(name: &str, tag: &str, top_layer: &str) -> Vec<u8> {
    let map = BTreeMap::from([(name, BTreeMap::from([(tag, top_layer)]))]);
    serde_json::to_vec(&map).expect("strings serialise")
}

/// A descriptor as containers/image's `manifest.Schema2Descriptor` marshals it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Schema2Descriptor {
    pub media_type: String,
    pub size: u64,
    pub digest: String,
}

/// A Docker schema 2 image manifest as containers/image's `manifest.Schema2` marshals it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Schema2 {
    pub schema_version: u32,
    pub media_type: String,
    pub config: Schema2Descriptor,
    pub layers: Vec<Schema2Descriptor>,
}

impl Schema2 {
    /// The manifest the containers tools make for an archived image: its config and layers
    /// (digest and size of each file), every layer labelled `tar.gzip`.
    pub fn for_archive(config: (&Digest, u64), layers: &[(Digest, u64)]) -> Schema2 {
        let descriptor = |media_type: &str, d: &Digest, size: u64| Schema2Descriptor {
            media_type: media_type.to_owned(),
            size,
            digest: d.to_string(),
        };
        Schema2 {
            schema_version: 2,
            media_type: DOCKER_MANIFEST.to_owned(),
            config: descriptor(DOCKER_CONFIG, config.0, config.1),
            layers: layers.iter().map(|(d, s)| descriptor(DOCKER_LAYER_GZIP, d, *s)).collect(),
        }
    }

    /// Its bytes: compact JSON, the fields in the structs' order.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("strings serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    /// The bytes containers/image writes for an archived image of one config and two layers.
    #[test]
    fn schema2_has_the_containers_tools_bytes() {
        let m = Schema2::for_archive((&d('c'), 1234), &[(d('a'), 10), (d('b'), 20)]);
        let want = concat!(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","#,
            r#""config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":1234,"#,
            r#""digest":"sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"},"#,
            r#""layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":10,"#,
            r#""digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},"#,
            r#"{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":20,"#,
            r#""digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}]}"#,
        );
        assert_eq!(String::from_utf8(m.to_bytes()).unwrap(), want);
        let empty = Schema2::for_archive((&d('c'), 2), &[]);
        assert!(String::from_utf8(empty.to_bytes()).unwrap().ends_with(r#""layers":[]}"#));
    }

    /// `docker save`'s `manifest.json`: Config, RepoTags, Layers.
    #[test]
    fn archive_manifest_has_docker_saves_bytes() {
        let img = ArchiveImage {
            config: "cc.json".into(),
            repo_tags: Some(vec!["localhost/x:v1".into()]),
            layers: vec!["aa.tar".into(), "bb.tar".into()],
        };
        let bytes = archive_manifest(std::slice::from_ref(&img));
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            r#"[{"Config":"cc.json","RepoTags":["localhost/x:v1"],"Layers":["aa.tar","bb.tar"]}]"#
        );
        assert_eq!(parse_archive_manifest(&bytes).unwrap(), [img]);
        assert_eq!(repositories("localhost/x", "v1", "bb"), br#"{"localhost/x":{"v1":"bb"}}"#.to_vec());
    }

    /// Untagged images: docker writes `null`, other writers leave the field out.
    #[test]
    fn untagged_images_are_read() {
        for text in [r#"[{"Config":"c.json","RepoTags":null,"Layers":[]}]"#, r#"[{"Config":"c.json","Layers":[]}]"#] {
            let got = parse_archive_manifest(text.as_bytes()).unwrap();
            assert_eq!(got[0].repo_tags, None);
        }
        assert!(parse_archive_manifest(br#"[{"RepoTags":[]}]"#).is_err());
    }
}
