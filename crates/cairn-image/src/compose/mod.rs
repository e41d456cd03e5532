//! Images made from images: a squash (one layer holding an image's applied filesystem) and a
//! combination (the layers of several images, one after the other).
//!
//! Like an image built from a closure, each is a derivation whose builder is
//! [`crate::layered::BUILTIN`] (its environment's `compose` says which), with the images'
//! layouts as inputs: the result is a function of its inputs, a second run finds it valid and
//! does nothing, and it is collected with them.
//!
//! - **Squash** ([`squash`]): the image's layers (the manifest for this machine's platform)
//!   applied by their tar entries and written as one uncompressed layer, stored as a blob;
//!   the config keeps everything but `rootfs` (one diff id) and `history` (one entry naming
//!   the squashed image).
//! - **Combine**: the manifests' layers in order, blobs linked (never copied); every image
//!   must be of the first one's platform. Configs merge in order: `Env` by variable name (a
//!   later value replaces an earlier one in place, new names are appended), `Labels`,
//!   `ExposedPorts` and `Volumes` as unions where later wins, `Entrypoint`, `Cmd`,
//!   `WorkingDir`, `User` and `StopSignal` from the last image that sets them; `rootfs` and
//!   `history` concatenated. `--entrypoint`, `--cmd` and `--env` apply last.

mod squash;

use std::collections::{BTreeMap, BTreeSet};

use cairn_nix::derivation::{Derivation, DerivationOutput};
use cairn_nix::{StoreDir, StorePath};
use cairn_oci::manifest::{Descriptor, Manifest, Platform, OCI_MANIFEST};
use cairn_oci::Digest;
use serde_json::Value;

use crate::images::{Image, TempRootGuardSet};
use crate::layered::{descriptor, store_json, BUILTIN, CONFIG};
use crate::unpack::{pick_manifest, UnpackError};
use crate::{ImageError, Images, Result};

/// Media type of a squashed layer: an uncompressed tar (compressing is for the wire, and the
/// registry client or `skopeo` may do it there).
pub const SQUASHED_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// What the derivations are called.
pub const SQUASH_NAME: &str = "oci-image-squashed";
pub const COMBINE_NAME: &str = "oci-image-combined";
/// Bumped when what a composition makes changes, so older results are not taken for newer.
const FORMAT: &str = "1";

/// What to compose.
#[derive(Debug, Clone)]
pub enum Compose {
    Squash(Image),
    Combine { images: Vec<Image>, overrides: Overrides },
}

/// What the command line sets over the merged config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// `NAME=VALUE`, merged by name as the images' are.
    pub env: Vec<String>,
}

/// The derivation of a composition, its output path not yet filled in.
pub fn derivation(dir: &StoreDir, c: &Compose) -> Derivation {
    let json =
        |v: &Option<Vec<String>>| v.as_ref().map(|v| serde_json::to_string(v).expect("strings")).unwrap_or_default();
    let (kind, name, images, overrides) = match c {
        Compose::Squash(img) => ("squash", SQUASH_NAME, vec![img], Overrides::default()),
        Compose::Combine { images, overrides } => ("combine", COMBINE_NAME, images.iter().collect(), overrides.clone()),
    };
    let layouts: Vec<String> = images.iter().map(|i| dir.display(&i.layout)).collect();
    let env: BTreeMap<String, String> = [
        ("name", name.to_owned()),
        ("builder", BUILTIN.to_owned()),
        ("system", "builtin".to_owned()),
        ("compose", kind.to_owned()),
        ("composeFormat", FORMAT.to_owned()),
        ("images", layouts.join(" ")),
        ("entrypoint", json(&overrides.entrypoint)),
        ("cmd", json(&overrides.cmd)),
        ("env", serde_json::to_string(&overrides.env).expect("strings")),
        ("platform", Platform::host().to_string()),
        ("out", String::new()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Derivation {
        outputs: [(
            "out".to_owned(),
            DerivationOutput { path: String::new(), hash_algo: String::new(), hash: String::new() },
        )]
        .into(),
        input_drvs: BTreeMap::new(),
        input_srcs: layouts.into_iter().collect(),
        platform: "builtin".to_owned(),
        builder: BUILTIN.to_owned(),
        args: Vec::new(),
        env,
    }
}

/// Whether an image derivation is a composition (rather than an image of a closure).
pub fn is_composition(drv: &Derivation) -> bool {
    drv.env.contains_key("compose")
}

/// What a composition derivation was written with.
fn of(images: &Images, drv: &Derivation) -> Result<Compose> {
    let dir = images.store.store_dir();
    let bad = |why: String| ImageError::BadBuild(format!("not a composition derivation: {why}"));
    let var = |k: &str| drv.env.get(k).ok_or_else(|| bad(format!("no '{k}'")));
    if var("composeFormat")? != FORMAT {
        return Err(bad(format!("written for format '{}', this cairn composes '{FORMAT}'", var("composeFormat")?)));
    }
    let mut parts = Vec::new();
    for p in var("images")?.split_whitespace() {
        parts.push(images.load(&dir.parse(p).map_err(|e| bad(format!("image '{p}': {e}")))?)?);
    }
    let list = |k: &str| -> Result<Option<Vec<String>>> {
        match var(k)?.as_str() {
            "" => Ok(None),
            s => serde_json::from_str(s).map(Some).map_err(|e| bad(format!("'{k}': {e}"))),
        }
    };
    match var("compose")?.as_str() {
        "squash" => {
            let [img] = <[Image; 1]>::try_from(parts).map_err(|_| bad("a squash has one image".into()))?;
            Ok(Compose::Squash(img))
        }
        "combine" => Ok(Compose::Combine {
            images: parts,
            overrides: Overrides {
                entrypoint: list("entrypoint")?,
                cmd: list("cmd")?,
                env: list("env")?.unwrap_or_default(),
            },
        }),
        other => Err(bad(format!("unknown composition '{other}'"))),
    }
}

/// Makes the composition a derivation describes and registers its layout at `out`.
pub fn build_output(
    images: &Images,
    drv_path: &StorePath,
    drv: &Derivation,
    out: &StorePath,
    log: &mut dyn FnMut(&str),
) -> Result<()> {
    let mut roots = TempRootGuardSet::default();
    let layout = match of(images, drv)? {
        Compose::Squash(img) => squash_layout(images, &img, &mut roots, log)?,
        Compose::Combine { images: parts, overrides } => combine_layout(images, &parts, &overrides, &mut roots, log)?,
    };
    log("registering the image's layout");
    crate::layered::register_layout(images, &layout, drv_path, out)
}

/// An image's manifest for this machine and its config.
fn manifest_and_config(images: &Images, img: &Image) -> Result<(Descriptor, Manifest, Value)> {
    let (desc, m) = pick_manifest(images.image_manifests(img)?, &Platform::host())
        .ok_or_else(|| UnpackError::NoManifest { image: img.digest().to_string() })?;
    let config_desc = m.children.first().ok_or_else(|| ImageError::NotAnImage(desc.digest.to_string()))?;
    let config: Value =
        serde_json::from_slice(&images.read_manifest(config_desc, &format!("manifest {}", desc.digest))?)
            .map_err(|e| cairn_oci::OciError::ManifestJson(format!("the config of {}: {e}", desc.digest)))?;
    Ok((desc, m, config))
}

fn squash_layout(
    images: &Images,
    img: &Image,
    roots: &mut TempRootGuardSet,
    log: &mut dyn FnMut(&str),
) -> Result<cairn_oci::layout::Layout> {
    let store = &images.store;
    roots.hold(store.temp_root([img.layout.clone()]));
    roots.hold(images.root_blobs(&img.blobs));
    let (desc, m, mut config) = manifest_and_config(images, img)?;
    let layers = m.layers().to_vec();
    let mut blobs = Vec::new();
    for l in &layers {
        let b = images.blob_of(img, &l.digest)?.ok_or_else(|| ImageError::MissingBlob {
            digest: l.digest.to_string(),
            referrer: format!("manifest {}", desc.digest),
        })?;
        blobs.push(b);
    }
    // The layers' uncompressed tars, read once, wait here for the second pass.
    let spool = crate::layered::scratch_dir(images)?;
    let (digest, size) = crate::layered::store_written_blob(images, roots, &mut |w| {
        squash::squash(&layers, &mut |i| images.open_blob(&blobs[i]), spool.path(), w, log).map(|_| ())
    })?;
    drop(spool);
    config["rootfs"] = serde_json::json!({ "type": "layers", "diff_ids": [digest.to_string()] });
    let mut entry = serde_json::json!({
        "created_by": "cairn image squash",
        "comment": format!("{} layers of {} squashed", layers.len(), desc.digest),
    });
    if let Some(created) = config.get("created") {
        entry["created"] = created.clone();
    }
    config["history"] = serde_json::json!([entry]);
    let config_desc = store_json(images, CONFIG, &config, roots)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [descriptor(SQUASHED_LAYER, digest, size).to_json()],
    });
    let manifest_desc = store_json(images, OCI_MANIFEST, &manifest, roots)?;
    images.layout_of(vec![with_platform(manifest_desc, &desc)], &BTreeMap::new(), roots)
}

/// A manifest descriptor with the platform the source's had (an index entry's).
fn with_platform(mut d: Descriptor, from: &Descriptor) -> Descriptor {
    d.platform = from.platform.clone();
    d
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// The merged `config` object of several images' configs (see the module doc).
pub(crate) fn merge_configs(configs: &[Value], overrides: &Overrides) -> Value {
    let mut out = serde_json::Map::new();
    let mut env = Vec::new();
    for c in configs {
        let Some(cfg) = c.get("config").and_then(Value::as_object) else { continue };
        for (k, v) in cfg {
            match k.as_str() {
                "Env" => crate::process::merge_env(&mut env, strings(v)),
                "Labels" | "ExposedPorts" | "Volumes" => {
                    let slot = out.entry(k.clone()).or_insert_with(|| Value::Object(Default::default()));
                    if let (Some(into), Some(more)) = (slot.as_object_mut(), v.as_object()) {
                        for (mk, mv) in more {
                            into.insert(mk.clone(), mv.clone());
                        }
                    }
                }
                _ if !v.is_null() => {
                    out.insert(k.clone(), v.clone());
                }
                _ => {}
            }
        }
    }
    crate::process::merge_env(&mut env, overrides.env.iter().cloned());
    if !env.is_empty() {
        out.insert("Env".into(), serde_json::json!(env));
    }
    if let Some(e) = &overrides.entrypoint {
        out.insert("Entrypoint".into(), serde_json::json!(e));
    }
    if let Some(c) = &overrides.cmd {
        out.insert("Cmd".into(), serde_json::json!(c));
    }
    Value::Object(out)
}

/// Whether a blob of `img` starts as gzip does.
fn starts_gzip(images: &Images, img: &Image, digest: &Digest) -> Result<bool> {
    let Some(b) = images.blob_of(img, digest)? else { return Ok(true) };
    let mut head = [0u8; 2];
    let mut r = images.open_blob(&b)?;
    let mut got = 0;
    while got < 2 {
        match std::io::Read::read(&mut r, &mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(source) => return Err(ImageError::Io { path: digest.to_string(), source }),
        }
    }
    Ok(got == 2 && head == [0x1f, 0x8b])
}

/// A layer descriptor as an OCI manifest lists it: Docker's media types for the same bytes
/// become the OCI ones, as skopeo converts them.
fn oci_layer(mut d: Descriptor) -> Descriptor {
    let oci = match d.media_type.as_str() {
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar.zstd" => "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar" => "application/vnd.oci.image.layer.v1.tar",
        _ => return d,
    };
    d.media_type = oci.to_owned();
    d
}

pub(crate) fn platform_of(config: &Value) -> String {
    let s = |k: &str| config.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let mut p = format!("{}/{}", s("os"), s("architecture"));
    if !s("variant").is_empty() {
        p.push('/');
        p.push_str(&s("variant"));
    }
    p
}

fn combine_layout(
    images: &Images,
    parts: &[Image],
    overrides: &Overrides,
    roots: &mut TempRootGuardSet,
    log: &mut dyn FnMut(&str),
) -> Result<cairn_oci::layout::Layout> {
    if parts.len() < 2 {
        return Err(ImageError::BadBuild("combine needs at least two images".into()));
    }
    let mut layers: Vec<Descriptor> = Vec::new();
    let mut diff_ids: Vec<Value> = Vec::new();
    let mut history: Vec<Value> = Vec::new();
    let mut configs = Vec::new();
    let mut hints = BTreeMap::new();
    let mut first_desc = None;
    for img in parts {
        roots.hold(images.store.temp_root([img.layout.clone()]));
        roots.hold(images.root_blobs(&img.blobs));
        let (desc, m, config) = manifest_and_config(images, img)?;
        if let Some(first) = configs.first() {
            let (want, got) = (platform_of(first), platform_of(&config));
            if want != got {
                return Err(ImageError::BadBuild(format!(
                    "cannot combine images of different platforms: {} is {want}, {} is {got}",
                    parts[0].digest(),
                    img.digest()
                )));
            }
        }
        let ids = config["rootfs"]["diff_ids"].as_array().cloned().unwrap_or_default();
        if ids.len() != m.layers().len() {
            return Err(ImageError::BadBuild(format!(
                "the config of {} does not list a diff id per layer",
                desc.digest
            )));
        }
        log(&format!("{}: {} layers", img.digest(), m.layers().len()));
        for l in m.layers() {
            let mut l = oci_layer(l.clone());
            // Docker's gzip type also labels the plain tars of `docker save` archives.
            if l.media_type.ends_with("+gzip") && !starts_gzip(images, img, &l.digest)? {
                l.media_type = "application/vnd.oci.image.layer.v1.tar".to_owned();
            }
            layers.push(l);
        }
        diff_ids.extend(ids);
        history.extend(config["history"].as_array().cloned().unwrap_or_default());
        hints.extend(img.streamed.clone());
        configs.push(config);
        first_desc.get_or_insert(desc);
    }
    let mut config = configs.last().cloned().unwrap_or_default();
    for k in ["os", "architecture", "variant", "os.version", "os.features"] {
        match configs[0].get(k) {
            Some(v) => config[k] = v.clone(),
            None => {
                if let Some(o) = config.as_object_mut() {
                    o.remove(k);
                }
            }
        }
    }
    config["config"] = merge_configs(&configs, overrides);
    config["rootfs"] = serde_json::json!({ "type": "layers", "diff_ids": diff_ids });
    config["history"] = Value::Array(history);
    let config_desc = store_json(images, CONFIG, &config, roots)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": layers.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
    });
    let manifest_desc = store_json(images, OCI_MANIFEST, &manifest, roots)?;
    let seen: BTreeSet<&Digest> = layers.iter().map(|l| &l.digest).collect();
    log(&format!("{} layers, {} distinct blobs linked", layers.len(), seen.len()));
    let first = first_desc.ok_or_else(|| ImageError::BadBuild("no image to combine".into()))?;
    images.layout_of(vec![with_platform(manifest_desc, &first)], &hints, roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_merge_in_order_with_the_overrides_last() {
        let a = serde_json::json!({"config": {
            "Env": ["PATH=/a/bin", "A=1"], "Entrypoint": ["/a"], "Cmd": ["x"], "Labels": {"l": "a", "only-a": "1"},
            "WorkingDir": "/a", "ExposedPorts": {"80/tcp": {}}
        }});
        let b = serde_json::json!({"config": {
            "Env": ["B=2", "PATH=/b/bin"], "Cmd": ["y"], "Labels": {"l": "b"}, "Entrypoint": null,
            "ExposedPorts": {"443/tcp": {}}
        }});
        let merged = merge_configs(&[a.clone(), b.clone()], &Overrides::default());
        assert_eq!(
            merged,
            serde_json::json!({
                "Env": ["PATH=/b/bin", "A=1", "B=2"], "Entrypoint": ["/a"], "Cmd": ["y"],
                "Labels": {"l": "b", "only-a": "1"}, "WorkingDir": "/a",
                "ExposedPorts": {"80/tcp": {}, "443/tcp": {}}
            })
        );
        let o = Overrides { entrypoint: Some(vec!["/e".into()]), cmd: Some(vec![]), env: vec!["A=3".into()] };
        let merged = merge_configs(&[a, b], &o);
        assert_eq!(merged["Entrypoint"], serde_json::json!(["/e"]));
        assert_eq!(merged["Cmd"], serde_json::json!([]));
        assert_eq!(merged["Env"], serde_json::json!(["PATH=/b/bin", "A=3", "B=2"]));
    }

    #[test]
    fn docker_layers_are_listed_with_oci_media_types() {
        let d = |t: &str| Descriptor {
            media_type: t.into(),
            digest: Digest::sha256_of(b"x"),
            size: 1,
            platform: None,
            annotations: Default::default(),
        };
        assert_eq!(
            oci_layer(d("application/vnd.docker.image.rootfs.diff.tar.gzip")).media_type,
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let oci = "application/vnd.oci.image.layer.v1.tar+zstd";
        assert_eq!(oci_layer(d(oci)).media_type, oci);
    }

    #[test]
    fn platforms_are_named_with_their_variant() {
        assert_eq!(platform_of(&serde_json::json!({"os": "linux", "architecture": "amd64"})), "linux/amd64");
        assert_eq!(
            platform_of(&serde_json::json!({"os": "linux", "architecture": "arm", "variant": "v7"})),
            "linux/arm/v7"
        );
    }
}
