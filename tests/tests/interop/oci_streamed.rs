//! Streamed layers and image derivations: a built image's store layers are descriptions in the
//! store (no blob written) whose bytes are made again, checked, when the image is exported,
//! served by cairnd's registry or pushed; `--materialise` writes the blobs; an image build is a
//! `builtin:oci-image` derivation, realised again after a collection with the same digest; and a
//! store path changed behind the store's back cannot pass for its layer.

use std::path::Path;
use std::process::Command;

use cairn_tests::oci::{digest_of, http, layout_blob, layout_blobs, run_tool, skopeo_raw};
use cairn_tests::{free_port, require_peer, wait_listening, TestStore};

use cairn_tests::json;

/// A tree of a few files (one of 3 MiB, one under a name longer than a tar header holds, a
/// symlink, an executable) and a text path referring to it: the closure of the text path.
fn closure(store: &TestStore, tmp: &Path, message: &str) -> (String, String) {
    let tree = tmp.join("tree");
    if !tree.exists() {
        let deep = tree.join("share").join("a-directory-name-long-enough-that-the-whole-entry-name-passes-one-hundred");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("and-a-file-with-a-long-name-too.txt"), b"deep\n").unwrap();
        let big: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(tree.join("big.bin"), big).unwrap();
        std::fs::create_dir(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
        let exec = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        std::fs::set_permissions(tree.join("bin/tool"), exec).unwrap();
        std::os::unix::fs::symlink("bin/tool", tree.join("tool")).unwrap();
    }
    let tree_path = store.ok(&["add", tree.to_str().unwrap()]).trim().to_owned();
    let f = tmp.join(format!("top-{}", &digest_of(message.as_bytes())[7..19]));
    std::fs::write(&f, format!("{message} {tree_path}\n")).unwrap();
    let top = store.ok(&["add-text", "top", f.to_str().unwrap(), "--ref", &tree_path]).trim().to_owned();
    (tree_path, top)
}

fn build(store: &TestStore, top: &str, tag: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["image", "build", "--json", "--closure", top, "--tag", tag];
    args.extend(extra);
    json(&store.ok(&args))
}

/// Every blob of an `oci:` layout has the digest it is filed under.
fn assert_blobs_verify(dir: &Path) {
    for d in layout_blobs(dir) {
        assert_eq!(digest_of(&layout_blob(dir, &d)), d, "blob {d} of {}", dir.display());
    }
}

fn blob_entry(digest: &str) -> String {
    format!("-oci-blob-sha256-{}", digest.trim_start_matches("sha256:"))
}

#[test]
fn streamed_layers_are_made_again_when_exported_served_and_pushed() {
    let port = free_port();
    let s = TestStore::builder().config(&format!("listen = \"127.0.0.1:{port}\"\naccept-pushes = true\n")).start();
    wait_listening(port);
    let tmp = tempfile::tempdir().unwrap();
    let (tree, top) = closure(&s, tmp.path(), "v1");
    let built = build(&s, &top, "built/streamed:1", &[]);
    let digest = built["image"]["digest"].as_str().unwrap().to_owned();

    // The store layers are descriptions referring to their paths; no blob was written for them.
    let ins = json(&s.ok(&["image", "inspect", "--json", "built/streamed:1"]));
    // Named by digest as docker and skopeo name it, NAME@DIGEST: the same image; another
    // repository's name with that digest is not.
    let by_digest = json(&s.ok(&["image", "inspect", "--json", &format!("built/streamed@{digest}")]));
    assert_eq!(by_digest, ins);
    let other = s.run(&["image", "inspect", &format!("built/other@{digest}")], b"");
    assert!(!other.status.success(), "{}", String::from_utf8_lossy(&other.stderr));
    let layers = ins["layers"].as_array().unwrap().clone();
    assert_eq!(layers.len(), 3, "{ins}");
    let entries = s.store_entries();
    for l in &layers[..2] {
        assert_eq!(l["streamed"], true, "{l}");
        let d = l["digest"].as_str().unwrap();
        assert!(l["path"].as_str().unwrap().ends_with(&format!("-oci-layer-sha256-{}", &d[7..])), "{l}");
        assert!(!entries.iter().any(|e| e.ends_with(&blob_entry(d))), "no blob for streamed layer {d}");
    }
    assert_eq!(layers[2]["streamed"], false, "the customisation layer is a small blob");
    let tree_layer = layers
        .iter()
        .position(|l| l["path"].as_str().is_some_and(|p| s.ok(&["references", p]).lines().any(|r| r == tree)));
    assert!(tree_layer.is_some(), "a layer's description refers to the tree: {ins}");
    // The layout refers to the descriptions, which refer to the paths: one graph for the GC.
    let closure_of_image = s.ok(&["closure", built["image"]["layout"].as_str().unwrap()]);
    assert!(closure_of_image.lines().any(|p| p == tree), "the image's closure holds the tree");

    // Exported: a complete layout whose every blob has its digest, valid for oci-image-tool.
    let out = tmp.path().join("exported");
    s.ok(&["image", "push", "built/streamed:1", &format!("oci:{}:1", out.display())]);
    assert_blobs_verify(&out);
    for l in &layers {
        assert!(layout_blobs(&out).contains(&l["digest"].as_str().unwrap().to_owned()));
    }
    if require_peer("oci-image-tool") {
        run_tool(Command::new("oci-image-tool").args(["validate", "--type", "image", "--ref", "name=1"]).arg(&out));
    }

    // Served by cairnd's registry: whole and by range, the same bytes.
    let big = layers[tree_layer.unwrap()]["digest"].as_str().unwrap().to_owned();
    let whole = layout_blob(&out, &big);
    let a = http(port, "GET", &format!("/v2/built/streamed/blobs/{big}"), &[], b"");
    assert_eq!(a.status, 200);
    assert_eq!(digest_of(&a.body), big);
    let r = http(port, "GET", &format!("/v2/built/streamed/blobs/{big}"), &[("Range", "bytes=1000000-1999999")], b"");
    assert_eq!(r.status, 206);
    assert_eq!(r.body, whole[1_000_000..2_000_000]);
    // Pushed back to the registry that made it (a streamed layer's bytes, uploaded by digest):
    // taken and linked as any blob, though the store held it only as a streamed layer.
    let up = http(port, "POST", &format!("/v2/again/streamed/blobs/uploads/?digest={big}"), &[], &whole);
    assert_eq!(up.status, 201, "{}", String::from_utf8_lossy(&up.body));
    assert_eq!(http(port, "GET", &format!("/v2/again/streamed/blobs/{big}"), &[], b"").status, 200);
    let wrong = http(port, "POST", &format!("/v2/wrong/streamed/blobs/uploads/?digest={big}"), &[], &whole[1..]);
    assert_eq!(wrong.status, 400, "{}", String::from_utf8_lossy(&wrong.body));
    if require_peer("skopeo") {
        let src = format!("docker://127.0.0.1:{port}/built/streamed:1");
        assert_eq!(digest_of(&skopeo_raw(&src)), digest);
        let pulled = tmp.path().join("pulled");
        // As sent: skopeo would otherwise compress the uncompressed layers on the way.
        run_tool(
            Command::new("skopeo")
                .args(["copy", "--preserve-digests", "--src-tls-verify=false", &src])
                .arg(format!("oci:{}:1", pulled.display())),
        );
        assert_blobs_verify(&pulled);
        assert_eq!(layout_blobs(&pulled), layout_blobs(&out));
    }

    // Materialised: the same image, now with blob paths for its layers.
    let m = build(&s, &top, "built/materialised:1", &["--materialise"]);
    assert_eq!(m["image"]["digest"], built["image"]["digest"]);
    assert_ne!(m["derivation"], built["derivation"], "materialising is another derivation");
    let entries = s.store_entries();
    for l in &layers[..2] {
        let d = l["digest"].as_str().unwrap();
        assert!(entries.iter().any(|e| e.ends_with(&blob_entry(d))), "materialised blob for {d}");
    }
    let mins = json(&s.ok(&["image", "inspect", "--json", "built/materialised:1"]));
    assert!(mins["layers"].as_array().unwrap().iter().all(|l| l["streamed"] == false), "{mins}");
}

#[test]
fn an_image_build_is_a_derivation_realised_again_after_collection() {
    let s = TestStore::start();
    let tmp = tempfile::tempdir().unwrap();
    let (_, top) = closure(&s, tmp.path(), "v1");
    let built = build(&s, &top, "built/drv:1", &["--entrypoint", "/bin/true"]);
    let drv = built["derivation"].as_str().unwrap().to_owned();
    let layout = built["image"]["layout"].as_str().unwrap().to_owned();
    assert!(drv.ends_with("-oci-image.drv"), "{built}");
    let shown = json(&s.ok(&["derivation", "show", &drv]));
    let d = &shown[&drv];
    assert_eq!(d["builder"], "builtin:oci-image", "{shown}");
    assert_eq!(d["outputs"]["out"]["path"], layout.as_str());
    assert!(d["inputSrcs"].as_array().unwrap().iter().any(|p| p == top.as_str()), "{shown}");
    let info = json(&s.ok(&["path-info", "--json", &layout]));
    assert_eq!(info[0]["deriver"], drv.as_str(), "{info}");

    // The same inputs: the derivation's output is valid, nothing is built.
    let again = build(&s, &top, "built/drv:2", &["--entrypoint", "/bin/true"]);
    assert_eq!((again["cached"].as_bool(), again["derivation"].as_str()), (Some(true), Some(drv.as_str())));
    // Another option: another derivation.
    let other = build(&s, &top, "built/drv:3", &["--entrypoint", "/bin/false"]);
    assert_ne!(other["derivation"], built["derivation"]);

    // Untagged and collected, the image is gone; realising its derivation makes it again, the
    // same bytes under the same path.
    for t in ["built/drv:1", "built/drv:2"] {
        s.ok(&["image", "untag", t]);
    }
    let root = tmp.path().join("drv-root");
    s.ok(&["add-root", root.to_str().unwrap(), &drv]);
    s.ok(&["gc"]);
    assert!(!s.run(&["path-info", &layout], b"").status.success(), "the untagged image was collected");
    let out = s.ok(&["realise", "-Q", &drv]);
    assert_eq!(out.trim(), layout);
    let ins = json(&s.ok(&["image", "inspect", "--json", &layout]));
    assert_eq!(ins["digest"], built["image"]["digest"], "{ins}");
    assert!(s.ok(&["log", &drv]).contains("store layers hashed"));
}

#[test]
fn a_store_path_changed_behind_the_store_cannot_pass_for_its_layer() {
    let s = TestStore::start();
    let tmp = tempfile::tempdir().unwrap();
    let (tree, top) = closure(&s, tmp.path(), "v1");
    build(&s, &top, "built/tampered:1", &[]);
    // Root can write into the store: flip bytes of the big file, keeping its size.
    let real = s.real_store_dir().join(Path::new(&tree).file_name().unwrap()).join("big.bin");
    Command::new("chmod").arg("u+w").arg(&real).status().unwrap();
    let mut bytes = std::fs::read(&real).unwrap();
    bytes[12345] ^= 0xff;
    std::fs::write(&real, &bytes).unwrap();

    let out = tmp.path().join("exported");
    let e = s.fail(&["image", "push", "built/tampered:1", &format!("oci:{}:1", out.display())], b"");
    assert!(e.contains("broke off") && e.contains("store paths no longer"), "{e}");
    assert!(s.log().contains("its store paths changed"), "the daemon's log names the layer");
    // Nothing under the layer's name was left in the layout directory.
    let ins = json(&s.ok(&["image", "inspect", "--json", "built/tampered:1"]));
    for l in ins["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        if l["streamed"] == true && out.join("blobs/sha256").exists() {
            let present = layout_blobs(&out).contains(&d.to_owned());
            assert!(!present || digest_of(&layout_blob(&out, d)) == d, "a wrong blob {d} was left");
        }
    }
    // The daemon goes on serving.
    s.ok(&["image", "ls"]);
}
