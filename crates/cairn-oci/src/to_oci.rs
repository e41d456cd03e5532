//! Docker schema 2 manifests and manifest lists rewritten with OCI's media types, for writing
//! an image into an `oci:` layout: OCI tools (skopeo's `oci:` transport, umoci) read only OCI
//! manifests there, as skopeo converts when it writes one.
//!
//! The rewrite changes media types only: the manifest's `mediaType`, its config's (Docker's
//! config JSON is a superset of OCI's and is kept byte for byte) and each layer's (gzip, plain
//! zstd and foreign layers to their OCI names; other types kept); digests, sizes, URLs, annotations and platforms are
//! kept. So the new manifest names the same blobs; its own digest is new. (skopeo also rewrites
//! the config, through Go's JSON encoder, so its digests differ from these.)

use serde_json::{Map, Value};

use crate::manifest::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use crate::{OciError, Result};

const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// The OCI name of a Docker layer media type, if it has one.
fn layer_type(docker: &str) -> Option<&'static str> {
    Some(match docker {
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar" => "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar.zstd" => "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        }
        "application/vnd.docker.image.rootfs.foreign.diff.tar" => {
            "application/vnd.oci.image.layer.nondistributable.v1.tar"
        }
        _ => return None,
    })
}

fn object(bytes: &[u8], what: &str) -> Result<Map<String, Value>> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(OciError::ManifestJson(format!("{what} is not a JSON object"))),
        Err(e) => Err(OciError::ManifestJson(format!("{what}: {e}"))),
    }
}

/// A Docker schema 2 image manifest as an OCI image manifest.
pub fn manifest(docker: &[u8]) -> Result<Vec<u8>> {
    let mut m = object(docker, "the manifest")?;
    if m.get("mediaType").and_then(Value::as_str) != Some(DOCKER_MANIFEST) {
        return Err(OciError::ManifestJson("not a Docker schema 2 manifest".into()));
    }
    m.insert("mediaType".into(), OCI_MANIFEST.into());
    match m.get_mut("config").and_then(Value::as_object_mut) {
        Some(c) => {
            c.insert("mediaType".into(), OCI_CONFIG.into());
        }
        None => return Err(OciError::ManifestJson("the manifest has no config".into())),
    }
    for l in m.get_mut("layers").and_then(Value::as_array_mut).into_iter().flatten() {
        let Some(l) = l.as_object_mut() else { continue };
        // Docker's names become OCI's; any other (OCI's own, an artifact's) is kept.
        let docker = l.get("mediaType").and_then(Value::as_str).unwrap_or_default();
        if let Some(oci) = layer_type(docker) {
            l.insert("mediaType".into(), oci.into());
        }
    }
    serde_json::to_vec(&Value::Object(m)).map_err(|e| OciError::ManifestJson(e.to_string()))
}

/// A Docker manifest list as an OCI index whose entries are `children`: for each entry of the
/// list, the (digest, size) of what it became (an OCI manifest), or `None` to keep it.
pub fn index(docker: &[u8], children: &dyn Fn(&str) -> Option<(String, u64)>) -> Result<Vec<u8>> {
    let mut m = object(docker, "the manifest list")?;
    if m.get("mediaType").and_then(Value::as_str) != Some(DOCKER_LIST) {
        return Err(OciError::ManifestJson("not a Docker manifest list".into()));
    }
    m.insert("mediaType".into(), OCI_INDEX.into());
    for e in m.get_mut("manifests").and_then(Value::as_array_mut).into_iter().flatten() {
        let Some(e) = e.as_object_mut() else { continue };
        let digest = e.get("digest").and_then(Value::as_str).unwrap_or_default().to_owned();
        if let Some((d, size)) = children(&digest) {
            e.insert("mediaType".into(), OCI_MANIFEST.into());
            e.insert("digest".into(), d.into());
            e.insert("size".into(), size.into());
        }
    }
    serde_json::to_vec(&Value::Object(m)).map_err(|e| OciError::ManifestJson(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;

    const DOCKER: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":7,"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111"},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":9,"digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222"},{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","size":3,"digest":"sha256:3333333333333333333333333333333333333333333333333333333333333333","urls":["https://example.com/l"]}]}"#;

    #[test]
    fn a_docker_manifest_becomes_an_oci_one_naming_the_same_blobs() {
        let oci = manifest(DOCKER.as_bytes()).unwrap();
        let (before, after) =
            (Manifest::parse(DOCKER.as_bytes(), None).unwrap(), Manifest::parse(&oci, Some(OCI_MANIFEST)).unwrap());
        assert_eq!(after.media_type, OCI_MANIFEST);
        let digests = |m: &Manifest| m.children.iter().map(|c| (c.digest.clone(), c.size)).collect::<Vec<_>>();
        assert_eq!(digests(&before), digests(&after));
        let v: Value = serde_json::from_slice(&oci).unwrap();
        assert_eq!(v["config"]["mediaType"], OCI_CONFIG);
        assert_eq!(v["layers"][0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
        assert_eq!(v["layers"][1]["mediaType"], "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip");
        assert_eq!(v["layers"][1]["urls"][0], "https://example.com/l");
        assert!(manifest(&oci).is_err(), "only a Docker manifest is rewritten");
        // zstd layers have their OCI name; types OCI already names are kept.
        let mixed = DOCKER
            .replace(
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                "application/vnd.docker.image.rootfs.diff.tar.zstd",
            )
            .replace("application/vnd.docker.image.rootfs.diff.tar.gzip", "application/vnd.oci.image.layer.v1.tar");
        let v: Value = serde_json::from_slice(&manifest(mixed.as_bytes()).unwrap()).unwrap();
        assert_eq!(v["layers"][0]["mediaType"], "application/vnd.oci.image.layer.v1.tar");
        assert_eq!(v["layers"][1]["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd");
    }

    #[test]
    fn a_list_becomes_an_index_of_the_rewritten_manifests() {
        let child = "sha256:4444444444444444444444444444444444444444444444444444444444444444";
        let list = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[{{"mediaType":"{DOCKER_MANIFEST}","size":10,"digest":"{child}","platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}}]}}"#
        );
        let new = "sha256:5555555555555555555555555555555555555555555555555555555555555555";
        let oci = index(list.as_bytes(), &|d| (d == child).then(|| (new.to_owned(), 42))).unwrap();
        let m = Manifest::parse(&oci, Some(OCI_INDEX)).unwrap();
        assert_eq!((m.media_type.as_str(), m.children.len()), (OCI_INDEX, 1));
        assert_eq!((m.children[0].digest.to_string(), m.children[0].size), (new.to_owned(), 42));
        assert_eq!(m.children[0].media_type, OCI_MANIFEST);
        assert_eq!(m.children[0].platform.as_ref().unwrap().to_string(), "linux/arm64/v8");
    }
}
