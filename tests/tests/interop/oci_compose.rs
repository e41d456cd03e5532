//! Images made of images (`cairn image squash`, `cairn image combine`), checked with the real
//! OCI tools: umoci unpacks a squashed image to the same tree as the original (whiteouts,
//! opaque directories, hard links, owners and modes included), a combination runs under runc,
//! skopeo and oci-image-tool read both, and digests survive a push to distribution.
//!
//! Needs umoci, skopeo, oci-image-tool, docker-registry (distribution), runc, a static busybox,
//! and root (umoci keeps owners, runc runs the container).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_tests::oci::{digest_of, run_tool, runc_run, skopeo_raw, DockerRegistry};
use cairn_tests::{json, require_peer, Rng, TestStore};
use tar::{EntryType, Header};

fn peers() -> bool {
    let all = ["umoci", "skopeo", "oci-image-tool", "docker-registry", "runc", "/bin/busybox"]
        .iter()
        .all(|p| require_peer(p));
    if all && !nix::unistd::geteuid().is_root() {
        assert!(std::env::var("CAIRN_REQUIRE_PEERS").as_deref() != Ok("1"), "these tests need root here");
        eprintln!("skipping: umoci with owners and runc need root");
        return false;
    }
    all
}

/// A tar layer of entries: (path, type, contents or link target, mode, uid).
fn layer(entries: &[(&str, EntryType, &[u8], u32, u64)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, data, mode, uid) in entries {
        let mut h = Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(*mode);
        h.set_uid(*uid);
        h.set_gid(*uid);
        h.set_mtime(1_700_000_000);
        match kind {
            EntryType::Symlink | EntryType::Link => {
                h.set_size(0);
                b.append_link(&mut h, path, std::str::from_utf8(data).unwrap()).unwrap();
            }
            _ => {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// An image `DIR:TAG` made by umoci of these layers, added verbatim.
fn umoci_layers(dir: &Path, tag: &str, layers: &[Vec<u8>], config: &[&str]) {
    if !dir.join("index.json").exists() {
        run_tool(Command::new("umoci").args(["init", "--layout"]).arg(dir));
    }
    let image = format!("{}:{tag}", dir.display());
    run_tool(Command::new("umoci").args(["new", "--image", &image]));
    for (i, l) in layers.iter().enumerate() {
        let f = dir.with_extension(format!("{tag}-layer-{i}.tar"));
        std::fs::write(&f, l).unwrap();
        run_tool(Command::new("umoci").args(["raw", "add-layer", "--image", &image]).arg(&f));
    }
    if !config.is_empty() {
        run_tool(Command::new("umoci").args(["config", "--image", &image]).args(config));
    }
}

/// The busybox image: a shell, and a tree whose later layers delete, hide and replace.
fn layered_image(dir: &Path) {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let big = Rng::new(7).bytes(1 << 20);
    use EntryType::*;
    let l1 = layer(&[
        ("bin/", Directory, b"", 0o755, 0),
        ("bin/busybox", Regular, &busybox, 0o755, 0),
        ("bin/sh", Symlink, b"busybox", 0o777, 0),
        ("etc/", Directory, b"", 0o755, 0),
        ("etc/conf", Regular, b"v1\n", 0o644, 1000),
        ("etc/gone", Regular, b"x\n", 0o644, 0),
        ("var/", Directory, b"", 0o755, 0),
        ("var/cache/", Directory, b"", 0o700, 33),
        ("var/cache/a", Regular, b"a\n", 0o600, 33),
        ("var/cache/sub/", Directory, b"", 0o755, 33),
        ("var/cache/sub/b", Regular, b"b\n", 0o600, 33),
        ("data/", Directory, b"", 0o755, 0),
        ("data/big", Regular, &big, 0o644, 0),
        ("data/link", Link, b"data/big", 0o644, 0),
        ("opt/", Directory, b"", 0o755, 0),
        ("opt/x/", Directory, b"", 0o755, 0),
        ("opt/x/old", Regular, b"old\n", 0o644, 0),
    ]);
    let l2 = layer(&[
        ("etc/.wh.gone", Regular, b"", 0o644, 0),
        ("var/cache/.wh..wh..opq", Regular, b"", 0o644, 0),
        ("var/cache/c", Regular, b"c\n", 0o640, 33),
        ("etc/conf", Regular, b"v2\n", 0o600, 0),
        ("opt/.wh.x", Regular, b"", 0o644, 0),
        ("opt/x/", Directory, b"", 0o750, 7),
        ("opt/x/new", Regular, b"new\n", 0o644, 0),
        ("data/again", Link, b"data/big", 0o644, 0),
        ("usr/", Directory, b"", 0o755, 0),
        ("usr/setuid", Regular, b"#!/bin/sh\n", 0o4755, 0),
    ]);
    // The file two hard links share is replaced: they keep the old contents.
    let l3 = layer(&[("data/big", Regular, b"replaced\n", 0o644, 0)]);
    umoci_layers(dir, "base", &[l1, l2, l3], &[]);
}

/// What a tree holds, by path: type, permissions, owner, and contents (a hash) or link target;
/// and its hard-link groups.
type Tree = (BTreeMap<String, (char, u32, u32, u32, String)>, BTreeSet<Vec<String>>);

fn tree(root: &Path) -> Tree {
    let mut entries = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let (kind, what) = if ft.is_dir() {
                stack.push(p.clone());
                ('d', String::new())
            } else if ft.is_symlink() {
                ('l', std::fs::read_link(&p).unwrap().display().to_string())
            } else {
                inodes.entry((m.dev(), m.ino())).or_default().push(rel.clone());
                ('f', digest_of(&std::fs::read(&p).unwrap()))
            };
            entries.insert(rel, (kind, m.mode() & 0o7777, m.uid(), m.gid(), what));
        }
    }
    let links = inodes
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    (entries, links)
}

/// umoci's unpack of `DIR:TAG`: the rootfs and its tree.
fn unpacked(dir: &Path, tag: &str, into: &Path) -> (PathBuf, Tree) {
    let bundle = into.join(format!("bundle-{tag}"));
    run_tool(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:{tag}", dir.display())).arg(&bundle));
    let t = tree(&bundle.join("rootfs"));
    (bundle, t)
}

fn count_blobs(store: &TestStore) -> usize {
    store.store_entries().iter().filter(|n| n.contains("-oci-blob-")).count()
}

#[test]
fn a_squashed_image_unpacks_as_the_original_and_is_the_same_in_any_store() {
    if !peers() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    layered_image(&src);
    let oci = format!("oci:{}:base", src.display());

    let squash = |store: &TestStore| -> serde_json::Value {
        store.ok(&["image", "pull", "--tag", "base:1", &oci]);
        json(&store.ok(&["image", "squash", "--json", "--tag", "squashed:1", "base:1"]))
    };
    let (one, two) = (TestStore::start(), TestStore::start());
    let first = squash(&one);
    let digest = first["image"]["digest"].as_str().unwrap().to_owned();
    assert_eq!(squash(&two)["image"]["digest"], digest.as_str(), "the same bytes in another store");
    // A second squash of the same image is its derivation's valid output.
    let again = json(&one.ok(&["image", "squash", "--json", "base:1"]));
    assert_eq!((again["image"]["digest"].as_str(), again["cached"].as_bool()), (Some(digest.as_str()), Some(true)));

    let out = tmp.path().join("out");
    one.ok(&["image", "push", "squashed:1", &format!("oci:{}:squashed", out.display())]);
    run_tool(Command::new("oci-image-tool").args(["validate", "--type", "image", "--ref", "name=squashed"]).arg(&out));
    let manifest: serde_json::Value =
        serde_json::from_slice(&skopeo_raw(&format!("oci:{}:squashed", out.display()))).unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1, "{manifest}");

    let (_, original) = unpacked(&src, "base", tmp.path());
    let (_, squashed) = unpacked(&out, "squashed", tmp.path());
    assert_eq!(squashed.0, original.0, "the same tree (types, modes, owners, contents, link targets)");
    assert_eq!(squashed.1, original.1, "the same hard links");
    // What the layers did is visible: hidden, replaced, kept.
    assert!(!original.0.contains_key("etc/gone") && !original.0.contains_key("var/cache/a"));
    assert!(!original.0.contains_key("var/cache/sub") && !original.0.contains_key("opt/x/old"));
    assert_eq!(original.0["etc/conf"].1, 0o600);
    assert_eq!(original.0["usr/setuid"].1, 0o4755);
    assert!(original.1.contains(&vec!["data/again".to_owned(), "data/link".to_owned()]), "{:?}", original.1);
}

#[test]
fn combined_images_run_under_runc_share_their_blobs_and_keep_digests_through_distribution() {
    if !peers() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    layered_image(&src);
    let motd = layer(&[
        ("etc/", EntryType::Directory, b"", 0o755, 0),
        ("etc/motd", EntryType::Regular, b"hello from the top\n", 0o644, 0),
    ]);
    umoci_layers(
        &src,
        "top",
        &[motd],
        &[
            "--config.env=GREETING=hi",
            "--config.cmd=/bin/sh",
            "--config.cmd=-c",
            "--config.cmd=cat /etc/motd; echo $GREETING $MORE",
        ],
    );
    let store = TestStore::start();
    store.ok(&["image", "pull", "--tag", "base:1", &format!("oci:{}:base", src.display())]);
    store.ok(&["image", "pull", "--tag", "top:1", &format!("oci:{}:top", src.display())]);
    let before = count_blobs(&store);
    let combined =
        json(&store.ok(&["image", "combine", "--json", "--env", "MORE=there", "--tag", "both:1", "base:1", "top:1"]));
    // Only the new config and manifest are new blobs; the layers are the inputs' own.
    assert_eq!(count_blobs(&store), before + 2);
    let digest = combined["image"]["digest"].as_str().unwrap().to_owned();
    let detail = json(&store.ok(&["image", "inspect", "--json", "both:1"]));
    assert_eq!(detail["layers"].as_array().unwrap().len(), 4, "{detail}");

    // Pushed to distribution and read back by skopeo: the same manifest bytes.
    let reg = DockerRegistry::start();
    let dest = format!("docker://{}/composed/both:1", reg.host());
    store.ok(&["image", "push", "--tls-verify=false", "both:1", &dest]);
    assert_eq!(digest_of(&skopeo_raw(&dest)), digest);

    // Run under runc from an OCI layout, after oci-image-tool validated it.
    let out = tmp.path().join("out");
    store.ok(&["image", "push", "both:1", &format!("oci:{}:both", out.display())]);
    run_tool(Command::new("oci-image-tool").args(["validate", "--type", "image", "--ref", "name=both"]).arg(&out));
    let (bundle, _) = unpacked(&out, "both", tmp.path());
    assert_eq!(runc_run(&bundle), "hello from the top\nhi there\n");

    // A squashed image combined again: pushed, pulled by skopeo, digests kept.
    store.ok(&["image", "squash", "--tag", "base-squashed:1", "base:1"]);
    let again = json(&store.ok(&["image", "combine", "--json", "--tag", "again:1", "base-squashed:1", "top:1"]));
    let dest = format!("docker://{}/composed/again:1", reg.host());
    store.ok(&["image", "push", "--tls-verify=false", "again:1", &dest]);
    assert_eq!(digest_of(&skopeo_raw(&dest)), again["image"]["digest"].as_str().unwrap());
    let copied = tmp.path().join("copied");
    cairn_tests::oci::skopeo_copy(&dest, &format!("oci:{}:again", copied.display()));
    let (_, from_skopeo) = unpacked(&copied, "again", tmp.path());
    let (_, direct) = unpacked(&out, "both", tmp.path().join("b2").as_path());
    assert_eq!(from_skopeo, direct, "squashing the base changed nothing of the combined tree");
}

#[test]
fn images_of_different_platforms_are_not_combined() {
    if !peers() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let one = layer(&[("a", EntryType::Regular, b"a", 0o644, 0)]);
    umoci_layers(&src, "amd", std::slice::from_ref(&one), &["--architecture=amd64"]);
    umoci_layers(&src, "arm", &[one], &["--architecture=arm64"]);
    let store = TestStore::start();
    store.ok(&["image", "pull", "--tag", "amd:1", &format!("oci:{}:amd", src.display())]);
    store.ok(&["image", "pull", "--platform", "linux/arm64", "--tag", "arm:1", &format!("oci:{}:arm", src.display())]);
    let err = store.fail(&["image", "combine", "amd:1", "arm:1"], b"");
    assert!(err.contains("different platforms") && err.contains("linux/arm64"), "{err}");
}

#[test]
fn an_image_built_on_a_squashed_image_with_a_copied_tree_runs_and_holds_the_tree() {
    if !peers() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    layered_image(&src);
    let store = TestStore::start();
    store.ok(&["image", "pull", "--tag", "base:1", &format!("oci:{}:base", src.display())]);
    store.ok(&["image", "squash", "--tag", "squashed:1", "base:1"]);
    let site = tmp.path().join("site");
    cairn_tests::write(&site.join("index.html"), b"<p>served</p>\n");
    cairn_tests::write(&site.join("sub/x"), b"x\n");
    let tree_path = cairn_tests::line(&store.ok(&["add", site.to_str().unwrap()]));
    let build = |tag: &str| {
        json(&store.ok(&[
            "image",
            "build",
            "--json",
            "--from",
            "squashed:1",
            "--copy",
            &format!("{tree_path}:/srv/www"),
            "--cmd=/bin/sh",
            "--cmd=-c",
            "--cmd=cat /srv/www/index.html /srv/www/sub/x",
            "--tag",
            tag,
        ]))
    };
    let built = build("site:1");
    assert_eq!(build("site:2")["cached"], true, "the same inputs: the derivation's valid output");
    // The copied tree's layer is streamed: a description that refers to the path.
    assert!(store.ok(&["referrers", &tree_path]).contains("-oci-layer-sha256-"), "streamed, not stored");
    let detail = json(&store.ok(&["image", "inspect", "--json", "site:1"]));
    // The squashed base's one layer, the copied tree's, and /etc-/tmp.
    assert_eq!(detail["layers"].as_array().unwrap().len(), 3, "{detail}");

    let out = tmp.path().join("out");
    store.ok(&["image", "push", "site:1", &format!("oci:{}:site", out.display())]);
    run_tool(Command::new("oci-image-tool").args(["validate", "--type", "image", "--ref", "name=site"]).arg(&out));
    let (bundle, t) = unpacked(&out, "site", tmp.path());
    assert_eq!(t.0["srv/www/index.html"].4, digest_of(b"<p>served</p>\n"));
    assert!(t.0.keys().all(|k| !k.starts_with("store/")), "the copied path's tree only, not the store");
    assert_eq!(runc_run(&bundle), "<p>served</p>\nx\n");
    assert!(built["image"]["digest"].as_str().unwrap().starts_with("sha256:"));

    let err = store.fail(&["image", "build", "--copy", &format!("{tree_path}:/a/../etc")], b"");
    assert!(err.contains("--copy destination"), "{err}");
}
