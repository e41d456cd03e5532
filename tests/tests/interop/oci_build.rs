//! Images built from closures (`cairn image build`): layered by popularity, reproducible across
//! stores, remembered per input, sharing layers between related images; and, with the real
//! peers, pushed to distribution, read back by skopeo, validated by oci-image-tool, unpacked by
//! umoci and run by runc.

use std::path::Path;
use std::process::Command;

use cairn_tests::oci::{digest_of, run_tool, skopeo_copy, skopeo_raw, DockerRegistry};
use cairn_tests::{require_peer, TestStore};

use cairn_tests::json;

/// A tree with a static busybox as `bin/busybox` and `bin/sh` (busybox picks its applet from
/// the name it is called by), added to the store; and a script that refers to it.
fn closure(store: &TestStore, tmp: &Path, message: &str) -> (String, String) {
    let tree = tmp.join("tools");
    if !tree.exists() {
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).unwrap();
    }
    let tools = store.ok(&["add", tree.to_str().unwrap()]).trim().to_owned();
    let script = tmp.join(format!("script-{}", digest_of(message.as_bytes()).split_at(15).1));
    std::fs::write(&script, format!("#!{tools}/bin/sh\necho {message}\n")).unwrap();
    let s = store.ok(&["add-text", "hello.sh", script.to_str().unwrap(), "--ref", &tools]).trim().to_owned();
    (tools, s)
}

fn build(store: &TestStore, tools: &str, script: &str, tag: &str) -> serde_json::Value {
    json(&store.ok(&[
        "image",
        "build",
        "--json",
        "--closure",
        script,
        "--entrypoint",
        &format!("{tools}/bin/sh"),
        "--entrypoint",
        script,
        "--env",
        "GREETING=hi",
        "--tag",
        tag,
    ]))
}

fn layer_digests(store: &TestStore, image: &str) -> Vec<String> {
    let ins = json(&store.ok(&["image", "inspect", "--json", image]));
    ins["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn builds_are_reproducible_remembered_and_share_layers() {
    if !require_peer("/bin/busybox") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let a = TestStore::start();
    let (tools, script) = closure(&a, tmp.path(), "hello from the closure");
    let first = build(&a, &tools, &script, "built/hello:1");
    assert_eq!(first["cached"], false);
    assert_eq!(first["layersWritten"], 2);
    // One referrer each way: the tools are as popular as the script (one path from the root
    // reaches each), and the tie goes by name, as in nixpkgs: hello.sh, then tools.
    assert_eq!(first["layers"], serde_json::json!([[script], [tools]]));
    // The same inputs again: remembered, same digest, nothing written.
    let again = build(&a, &tools, &script, "built/hello:again");
    assert_eq!((again["cached"].as_bool(), again["layersWritten"].as_u64()), (Some(true), Some(0)));
    assert_eq!(again["image"]["digest"], first["image"]["digest"]);

    // Another store, the same inputs: the same digests, byte for byte.
    let b = TestStore::start();
    let (tools_b, script_b) = closure(&b, tmp.path(), "hello from the closure");
    assert_eq!((tools_b.as_str(), script_b.as_str()), (tools.as_str(), script.as_str()));
    let other = build(&b, &tools_b, &script_b, "built/hello:1");
    assert_eq!(other["image"]["digest"], first["image"]["digest"], "reproducible across stores");

    // Compressed layers are as reproducible, and unpack to the same tree.
    for how in ["gzip", "zstd"] {
        let args = ["image", "build", "--json", "--compress", how, "--closure", &script, "--tag", "built/compressed:1"];
        let (x, y) = (json(&a.ok(&args)), json(&b.ok(&args)));
        assert_eq!(x["image"]["digest"], y["image"]["digest"], "{how} layers are reproducible");
        assert_ne!(x["image"]["digest"], first["image"]["digest"]);
        let ins = json(&a.ok(&["image", "inspect", "--json", "built/compressed:1"]));
        assert!(ins["layers"][0]["mediaType"].as_str().unwrap().ends_with(&format!("+{how}")), "{ins}");
        let plain = a.ok(&["image", "unpack", "built/hello:1"]);
        let packed = a.ok(&["image", "unpack", "built/compressed:1"]);
        assert_eq!(
            a.ok(&["path-info", "--json", plain.trim()]).split("narHash").nth(1).map(|s| s[..60].to_owned()),
            a.ok(&["path-info", "--json", packed.trim()]).split("narHash").nth(1).map(|s| s[..60].to_owned()),
            "same tree"
        );
    }

    // One path changed: only its layer is new; the tools' layer and the /etc layer are shared.
    let (_, script2) = closure(&a, tmp.path(), "a second greeting");
    let second = build(&a, &tools, &script2, "built/hello:2");
    assert_eq!(second["layersWritten"], 1, "only the changed path's layer is written: {second}");
    let (l1, l2) = (layer_digests(&a, "built/hello:1"), layer_digests(&a, "built/hello:2"));
    assert_eq!(l1.len(), 3);
    assert_ne!(l1[0], l2[0]);
    assert_eq!(l1[1], l2[1], "the shared dependency's layer keeps its digest");
    assert_eq!(l1[2], l2[2], "the customisation layer is the same");

    // Layer budget: one layer for store paths merges the whole closure; none is refused.
    let merged = json(&a.ok(&["image", "build", "--json", "--closure", &script, "--max-layers", "2"]));
    assert_eq!(merged["layers"], serde_json::json!([[script, tools]]));
    let e = a.fail(&["image", "build", "--closure", &script, "--max-layers", "1"], b"");
    assert!(e.contains("--max-layers 1 leaves no layer for the store paths"), "{e}");
    // On a base image, the base's layers come first and count.
    let on_base = json(&a.ok(&[
        "image",
        "build",
        "--json",
        "--closure",
        &script2,
        "--from",
        "built/hello:1",
        "--max-layers",
        "6",
        "--tag",
        "built/on-base:1",
    ]));
    let lb = layer_digests(&a, "built/on-base:1");
    assert_eq!(&lb[..3], &l1[..], "the base's layers, then the new ones: {on_base}");
    assert_eq!(lb.len(), 3 + on_base["layers"].as_array().unwrap().len() + 1);
}

#[test]
fn popular_dependencies_get_the_lowest_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestStore::start();
    let text = |name: &str, refs: &[&str]| {
        let f = tmp.path().join(name);
        std::fs::write(&f, format!("{name} {refs:?}")).unwrap();
        let mut args = vec!["add-text", name, f.to_str().unwrap()];
        for r in refs {
            args.extend(["--ref", r]);
        }
        s.ok(&args).trim().to_owned()
    };
    // root → a, b; a → libc; b → libc, zlib: libc is reached twice, the others once.
    let libc = text("libc", &[]);
    let zlib = text("zlib", &[]);
    let a = text("a", &[&libc]);
    let b = text("b", &[&libc, &zlib]);
    let root = text("root", &[&a, &b]);
    let built = json(&s.ok(&["image", "build", "--json", "--closure", &root]));
    let layers: Vec<String> =
        built["layers"].as_array().unwrap().iter().map(|l| l[0].as_str().unwrap().to_owned()).collect();
    assert_eq!(layers[0], libc, "{built}");
    // Ties (popularity 1) by name: a, b, root, zlib.
    assert_eq!(layers[1..], [a, b, root, zlib]);
}

/// The daemon streams the image builder's steps: `cairn image build` with stderr not a terminal
/// prints them as `oci-image> STEP` lines (as `cairn realise` prints build logs), the build's log
/// keeps them, a cached build has none, and `--json` still prints only the answer.
#[test]
fn an_image_build_shows_the_builders_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestStore::start();
    let text = |name: &str, refs: &[&str]| {
        let f = tmp.path().join(name);
        std::fs::write(&f, format!("{name} {refs:?}")).unwrap();
        let mut args = vec!["add-text", name, f.to_str().unwrap()];
        for r in refs {
            args.extend(["--ref", r]);
        }
        s.ok(&args).trim().to_owned()
    };
    let lib = text("lib", &[]);
    let root = text("root", &[&lib]);
    let out = s.run(&["image", "build", "--closure", &root, "--materialise", "--tag", "steps/shown:1"], b"");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.trim().starts_with("sha256:"), "{stdout}");
    let steps: Vec<&str> = stderr.lines().filter_map(|l| l.strip_prefix("oci-image> ")).collect();
    for want in [
        "2 store paths in 2 store layers",
        "2 store layers: 0 remembered, 2 to hash (",
        "layer 1/2: hashing ",
        "layer 2/2: hashing ",
        "layer 1/2: storing its ",
        "writing the config",
        "writing the manifest",
        "2 store layers hashed",
    ] {
        assert!(steps.iter().any(|l| l.starts_with(want)), "no step '{want}' in:\n{stderr}");
    }
    assert!(steps.contains(&"2 store layers hashed"), "none remembered, none said to be: {stderr}");
    assert!(stderr.lines().last().is_some_and(|l| l.starts_with("built steps/shown:1 (2 store layers, ")), "{stderr}");

    // The same steps are the derivation's log.
    let built = json(&s.ok(&["image", "build", "--json", "--closure", &root, "--materialise"]));
    assert_eq!(built["cached"], true);
    assert_eq!(built["layers"].as_array().map(Vec::len), Some(2), "materialised layers are listed too: {built}");
    let log = s.ok(&["log", built["derivation"].as_str().unwrap()]);
    assert!(log.lines().any(|l| l.starts_with("layer 2/2: hashing ")), "{log}");
    assert!(log.contains("writing the config"), "{log}");

    // Nothing to build: no steps.
    let again = s.run(&["image", "build", "--closure", &root, "--materialise"], b"");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(!stderr.contains("oci-image> "), "{stderr}");
    assert!(stderr.contains("already valid"), "{stderr}");
}

#[test]
fn an_image_built_from_a_closure_runs_under_runc() {
    if !["docker-registry", "skopeo", "umoci", "oci-image-tool", "runc", "/bin/busybox"].iter().all(|p| require_peer(p))
    {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        if std::env::var("CAIRN_REQUIRE_PEERS").as_deref() == Ok("1") {
            panic!("running images with runc needs root here");
        }
        eprintln!("skipping: runc needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = TestStore::start();
    let (tools, script) = closure(&store, tmp.path(), "hello from the closure");
    let built = build(&store, &tools, &script, "built/hello:1");
    let digest = built["image"]["digest"].as_str().unwrap().to_owned();
    let reg = DockerRegistry::start();
    let dest = format!("docker://{}/built/hello:1", reg.host());
    store.ok(&["image", "push", "--tls-verify=false", "built/hello:1", &dest]);
    assert_eq!(digest_of(&skopeo_raw(&dest)), digest);
    // A second image of the same tools: pushing it uploads nothing for the shared layers.
    let (_, script2) = closure(&store, tmp.path(), "another program");
    build(&store, &tools, &script2, "built/hello:2");
    let pushed = json(&store.ok(&[
        "image",
        "push",
        "--json",
        "--tls-verify=false",
        "built/hello:2",
        &format!("docker://{}/built/hello:2", reg.host()),
    ]));
    assert_eq!((pushed["blobsUploaded"].as_u64(), pushed["blobsSkipped"].as_u64()), (Some(2), Some(2)), "{pushed}");

    let layout = tmp.path().join("pulled");
    skopeo_copy(&dest, &format!("oci:{}:1", layout.display()));
    run_tool(Command::new("oci-image-tool").args(["validate", "--type", "image", "--ref", "name=1"]).arg(&layout));
    let bundle = tmp.path().join("bundle");
    run_tool(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:1", layout.display())).arg(&bundle));
    assert_eq!(cairn_tests::oci::runc_run(&bundle), "hello from the closure\n");
}

/// On a base image (made by umoci, which writes history and a creation time), `--env` replaces
/// a value the base sets in its place, as a Dockerfile's ENV does, and the base's history and
/// creation time stay, with one entry per added layer; oci-image-tool finds the result valid.
#[test]
fn a_build_on_a_base_keeps_its_history_and_replaces_its_environment_values() {
    if !require_peer("umoci") || !require_peer("oci-image-tool") || !require_peer("/bin/busybox") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("base");
    let image = format!("{}:1", layout.display());
    cairn_tests::oci::umoci_image(&layout, "1", &[vec![("etc/base".to_owned(), b"base\n".to_vec())]]);
    run_tool(Command::new("umoci").args(["config", "--image", &image, "--config.env", "A=1", "--config.env", "B=1"]));
    let store = TestStore::start();
    store.ok(&["image", "pull", "--tag", "base/env:1", &format!("oci:{image}")]);
    let (_, script) = closure(&store, tmp.path(), "on a base");
    let args = ["--closure", &script, "--from", "base/env:1", "--env", "B=2", "--env", "C=3", "--tag", "derived/env:1"];
    store.ok(&[&["image", "build"][..], &args[..]].concat());
    let out = tmp.path().join("out");
    store.ok(&["image", "push", "derived/env:1", &format!("oci:{}:1", out.display())]);
    run_tool(Command::new("oci-image-tool").args(["validate", "--type", "image", "--ref", "name=1"]).arg(&out));

    let config_of = |dir: &Path| {
        let index = json(&std::fs::read_to_string(dir.join("index.json")).unwrap());
        let digest = index["manifests"][0]["digest"].as_str().unwrap().replace(':', "/");
        let manifest = json(&std::fs::read_to_string(dir.join("blobs").join(digest)).unwrap());
        let digest = manifest["config"]["digest"].as_str().unwrap().replace(':', "/");
        (json(&std::fs::read_to_string(dir.join("blobs").join(digest)).unwrap()), manifest)
    };
    let (base, base_manifest) = config_of(&layout);
    let (derived, manifest) = config_of(&out);
    let env = |c: &serde_json::Value| -> Vec<String> {
        c["config"]["Env"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_owned()).collect()
    };
    let mut want = env(&base);
    let b = want.iter().position(|e| e == "B=1").expect("umoci set B=1");
    want[b] = "B=2".to_owned();
    want.push("C=3".to_owned());
    assert_eq!(env(&derived), want, "B replaced in its place, C added");
    assert_eq!(derived["created"], base["created"], "the base's creation time");
    let (history, base_history) = (derived["history"].as_array().unwrap(), base["history"].as_array().unwrap());
    assert_eq!(&history[..base_history.len()], &base_history[..], "the base's history first");
    let with_layers = |h: &[serde_json::Value]| h.iter().filter(|e| e["empty_layer"] != true).count();
    assert_eq!(with_layers(history), manifest["layers"].as_array().unwrap().len(), "one entry per layer");
    assert!(with_layers(base_history) == base_manifest["layers"].as_array().unwrap().len());
}
