//! OCI and Docker manifests, indexes and image configs (from registries, pushes, archives).
//! The first byte picks the media type a registry or descriptor declared; the rest is the
//! document. Contract: no panic; a parsed index's platform selection and an image's layers are
//! answered; a config's platform and merged `config` object are read; a `docker save`
//! `manifest.json` is read or refused.
#![no_main]

use cairn_oci::manifest::{Manifest, Platform};
use libfuzzer_sys::fuzz_target;

const DECLARED: [Option<&str>; 6] = [
    None,
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.docker.distribution.manifest.v2+json"),
    Some("application/vnd.docker.distribution.manifest.list.v2+json"),
    Some("application/octet-stream"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, doc)) = data.split_first() else { return };
    let declared = DECLARED[pick as usize % DECLARED.len()];
    if let Ok(m) = Manifest::parse(doc, declared) {
        let _ = m.layers();
        for p in ["linux/amd64", "linux/arm64/v8", "windows/amd64"] {
            let _ = m.select(&Platform::parse(p).expect("a valid platform"));
        }
        for d in &m.children {
            let _ = d.to_json();
        }
    }
    if let Ok(config) = serde_json::from_slice::<serde_json::Value>(doc) {
        let _ = cairn_image::fuzzing::read_configs(&[config.clone(), config]);
    }
    let _ = cairn_oci::docker_archive::parse_archive_manifest(doc);
});
