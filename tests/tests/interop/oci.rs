//! OCI images against the real peers: distribution 2.8 (`docker-registry`) as the upstream,
//! images built by `umoci`, moved and read by `skopeo`, validated by `oci-image-tool`.
//!
//! What is checked: digests survive every trip (pull, push, export, serving) byte for byte;
//! blobs already stored are neither fetched nor uploaded again; tags keep images (and their
//! blobs) from the collector and untagging releases them; credentials work with real basic auth.

use std::path::Path;
use std::process::Command;

use cairn_tests::oci::{
    digest_of, layout_blob, layout_blobs, run_tool, skopeo_copy, skopeo_raw, umoci_add_layers, umoci_image, umoci_tag,
    DockerRegistry,
};
use cairn_tests::{free_port, require_peer, wait_listening, TestStore};

fn peers() -> bool {
    ["docker-registry", "skopeo", "umoci", "oci-image-tool"].iter().all(|p| require_peer(p))
}

/// Three layers: two shared with [`second_image`] (the same layer blobs: both images are built
/// on one `base`), one of its own.
fn first_image(dir: &Path) {
    umoci_image(
        dir,
        "base",
        &[
            vec![("etc/base".into(), b"base layer\n".to_vec())],
            vec![("usr/lib/shared.txt".into(), vec![b's'; 200_000])],
        ],
    );
    umoci_tag(dir, "base", "v1");
    umoci_add_layers(dir, "v1", &[vec![("app/one".into(), b"first app\n".to_vec())]]);
}

/// After [`first_image`]: the same base and a layer of its own.
fn second_image(dir: &Path) {
    umoci_tag(dir, "base", "v2");
    umoci_add_layers(dir, "v2", &[vec![("app/two".into(), vec![b'2'; 300_000])]]);
}

fn count_entries(store: &TestStore, infix: &str) -> usize {
    store.store_entries().iter().filter(|e| e.contains(infix)).count()
}

use cairn_tests::json;

#[test]
fn pulls_pushes_and_exports_keep_digests_with_real_peers() {
    if !peers() {
        return;
    }
    let reg = DockerRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    first_image(&src);
    second_image(&src);
    let upstream = format!("docker://{}/team/app", reg.host());
    skopeo_copy(&format!("oci:{}:v1", src.display()), &format!("{upstream}:v1"));
    skopeo_copy(&format!("oci:{}:v2", src.display()), &format!("{upstream}:v2"));
    let v1_digest = digest_of(&skopeo_raw(&format!("{upstream}:v1")));

    let store = TestStore::start();
    // Pull: the digest is the registry's; three layers, a config and the manifest are fetched.
    let out = json(&store.ok(&["image", "pull", "--tls-verify=false", "--json", &format!("{upstream}:v1")]));
    assert_eq!(out["image"]["digest"], v1_digest);
    assert_eq!(out["blobsFetched"], 4, "{out}");
    assert_eq!(out["blobsSkipped"], 0);
    assert_eq!(out["image"]["tags"][0], format!("{}/team/app:v1", reg.host()));
    // A second image sharing two layers fetches only its own layer and config.
    let out2 = json(&store.ok(&[
        "image",
        "pull",
        "--tls-verify=false",
        "--json",
        "--tag",
        "app:v2",
        &format!("{upstream}:v2"),
    ]));
    assert_eq!(out2["blobsFetched"], 2, "{out2}");
    assert_eq!(out2["blobsSkipped"], 2);
    let inspect = json(&store.ok(&["image", "inspect", "--json", "app:v2"]));
    let shared: u64 = inspect["layers"].as_array().unwrap()[..2].iter().map(|l| l["size"].as_u64().unwrap()).sum();
    assert_eq!(out2["bytesSkipped"].as_u64().unwrap(), shared);
    assert_eq!(
        out2["bytesFetched"].as_u64().unwrap() + shared,
        inspect["size"].as_u64().unwrap() - inspect["contents"][0]["size"].as_u64().unwrap()
    );
    // The same layer is one store path: both images' layouts reference it.
    let layer0 = inspect["layers"][0]["path"].as_str().unwrap().to_owned();
    let referrers = store.ok(&["referrers", &layer0]);
    assert_eq!(referrers.lines().count(), 2, "{referrers}");

    // Export to an oci: layout: oci-image-tool validates it, umoci unpacks it, and every blob
    // is byte-identical to what skopeo copies from the registry.
    let exported = tmp.path().join("exported");
    store.ok(&["image", "push", &format!("{}/team/app:v1", reg.host()), &format!("oci:{}:v1", exported.display())]);
    run_tool(Command::new("oci-image-tool").args(["validate", "--type", "image", "--ref", "name=v1"]).arg(&exported));
    let via_skopeo = tmp.path().join("via-skopeo");
    skopeo_copy(&format!("{upstream}:v1"), &format!("oci:{}:v1", via_skopeo.display()));
    assert_eq!(layout_blobs(&exported), layout_blobs(&via_skopeo));
    for d in layout_blobs(&exported) {
        assert_eq!(layout_blob(&exported, &d), layout_blob(&via_skopeo, &d), "{d}");
    }
    let bundle = tmp.path().join("bundle");
    run_tool(
        Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:v1", exported.display()))
            .arg(&bundle),
    );
    assert_eq!(std::fs::read(bundle.join("rootfs/app/one")).unwrap(), b"first app\n");
    // The stored layout itself is usable by skopeo as an oci: directory.
    let layout = inspect["layout"].as_str().unwrap();
    let real = store.real_store_dir().join(Path::new(layout).file_name().unwrap());
    skopeo_copy(&format!("oci:{}", real.display()), &format!("oci:{}:x", tmp.path().join("from-store").display()));

    // Push to another repository: skopeo reads back the same manifest bytes; the blobs were
    // mounted from the repository the image came from.
    let dest = format!("docker://{}/other/copy:v1", reg.host());
    let pushed = json(&store.ok(&[
        "image",
        "push",
        "--tls-verify=false",
        "--json",
        &format!("{}/team/app:v1", reg.host()),
        &dest,
    ]));
    assert_eq!(pushed["digest"], v1_digest);
    assert_eq!(pushed["blobsMounted"], 4, "{pushed}");
    assert_eq!(digest_of(&skopeo_raw(&dest)), v1_digest);
    // app:v2 came from team/app too but is tagged only locally: uploaded, except blobs already there.
    let dest2 = format!("docker://{}/fresh/app:v2", reg.host());
    let pushed2 = json(&store.ok(&["image", "push", "--tls-verify=false", "--json", "app:v2", &dest2]));
    assert_eq!(pushed2["blobsUploaded"], 4, "{pushed2}");
    assert_eq!(digest_of(&skopeo_raw(&dest2)), inspect["digest"].as_str().unwrap());
    let again = json(&store.ok(&["image", "push", "--tls-verify=false", "--json", "app:v2", &dest2]));
    assert_eq!((again["blobsUploaded"].as_u64(), again["blobsSkipped"].as_u64()), (Some(0), Some(4)), "{again}");
    let pulled_back = tmp.path().join("pulled-back");
    skopeo_copy(&dest2, &format!("oci:{}:v2", pulled_back.display()));
    let src_v2 = tmp.path().join("src-v2");
    skopeo_copy(&format!("{upstream}:v2"), &format!("oci:{}:v2", src_v2.display()));
    assert_eq!(layout_blobs(&pulled_back), layout_blobs(&src_v2));

    // Import from an oci: layout written by umoci: same digest as the registry's copy.
    let imported =
        json(&store.ok(&["image", "pull", "--json", "--tag", "local/src:v1", &format!("oci:{}:v1", src.display())]));
    assert_eq!(imported["digest"], v1_digest);
}

#[test]
fn tags_are_roots_and_untagged_images_are_collected() {
    if !peers() {
        return;
    }
    let reg = DockerRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    first_image(&src);
    skopeo_copy(&format!("oci:{}:v1", src.display()), &format!("docker://{}/a/b:v1", reg.host()));
    let store = TestStore::start();
    store.ok(&["image", "pull", "--tls-verify=false", "--tag", "keep:me", &format!("docker://{}/a/b:v1", reg.host())]);
    store.ok(&["image", "tag", "keep:me", "second:name"]);
    assert_eq!(count_entries(&store, "-oci-blob-"), 5);
    store.ok(&["gc"]);
    assert_eq!(count_entries(&store, "-oci-blob-"), 5, "tagged images survive a collection");
    assert_eq!(count_entries(&store, "-oci-image-"), 1);
    let roots = store.ok(&["gc", "--print-roots"]);
    assert!(roots.contains("oci-tags/keep:me"), "{roots}");
    store.ok(&["image", "untag", "keep:me"]);
    store.ok(&["gc"]);
    assert_eq!(count_entries(&store, "-oci-blob-"), 5, "one tag is left");
    store.ok(&["image", "untag", "second:name"]);
    let e = store.fail(&["image", "untag", "second:name"], b"");
    assert!(e.contains("no image is tagged 'second:name'"), "{e}");
    store.ok(&["gc"]);
    assert_eq!(count_entries(&store, "-oci-blob-"), 0, "untagged: layout and blobs collected");
    assert_eq!(count_entries(&store, "-oci-image-"), 0);
    assert!(store.ok(&["image", "ls", "--json"]).trim() == "[]");
}

#[test]
fn cairnd_serves_a_registry_that_skopeo_pulls_from_and_pushes_to() {
    if !peers() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    first_image(&src);
    second_image(&src);
    let port = free_port();
    let store = TestStore::builder().config(&format!("listen = \"127.0.0.1:{port}\"\naccept-pushes = true\n")).start();
    wait_listening(port);
    // skopeo pushes into cairnd (chunked uploads and manifest PUTs) …
    let v1 = format!("docker://127.0.0.1:{port}/served/app:v1");
    skopeo_copy(&format!("oci:{}:v1", src.display()), &v1);
    skopeo_copy(&format!("oci:{}:v2", src.display()), &format!("docker://127.0.0.1:{port}/served/app:v2"));
    let ls = store.ok(&["image", "ls"]);
    assert!(ls.contains("served/app:v1") && ls.contains("served/app:v2"), "{ls}");
    let src_digest = digest_of(&skopeo_raw(&format!("oci:{}:v1", src.display())));
    assert_eq!(json(&store.ok(&["image", "inspect", "--json", "served/app:v1"]))["digest"], src_digest);
    // … and pulls back the same bytes, into a layout oci-image-tool accepts and umoci unpacks.
    assert_eq!(digest_of(&skopeo_raw(&v1)), src_digest);
    let out = tmp.path().join("out");
    skopeo_copy(&v1, &format!("oci:{}:v1", out.display()));
    run_tool(Command::new("oci-image-tool").args(["validate", "--type", "image", "--ref", "name=v1"]).arg(&out));
    let bundle = tmp.path().join("bundle");
    run_tool(
        Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:v1", out.display()))
            .arg(&bundle),
    );
    assert_eq!(std::fs::read(bundle.join("rootfs/app/one")).unwrap(), b"first app\n");
    let tags = run_tool(Command::new("skopeo").args([
        "list-tags",
        "--tls-verify=false",
        &format!("docker://127.0.0.1:{port}/served/app"),
    ]));
    let tags: serde_json::Value = serde_json::from_slice(&tags).unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["v1", "v2"]));
    // Another cairnd pulls from this one, with the digest unchanged.
    let other = TestStore::start();
    let pulled = json(&other.ok(&[
        "image",
        "pull",
        "--tls-verify=false",
        "--json",
        &format!("docker://127.0.0.1:{port}/served/app:v2"),
    ]));
    assert_eq!(pulled["image"]["digest"], digest_of(&skopeo_raw(&format!("oci:{}:v2", src.display()))));
}

#[test]
fn basic_auth_with_a_real_registry() {
    if !peers() {
        return;
    }
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let reg = DockerRegistry::start_with_auth(Some(&format!("alice:{hash}\n")));
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    first_image(&src);
    run_tool(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        "alice:s3cret",
        &format!("oci:{}:v1", src.display()),
        &format!("docker://{}/private/app:v1", reg.host()),
    ]));
    let store = TestStore::start();
    let image = format!("docker://{}/private/app:v1", reg.host());
    let e = store.fail(&["image", "pull", "--tls-verify=false", &image], b"");
    assert!(e.contains("needs credentials") && e.lines().count() == 1, "{e}");
    let e = store.fail(&["image", "pull", "--tls-verify=false", "--creds", "alice:wrong", &image], b"");
    assert!(e.contains("401") || e.contains("credentials"), "{e}");
    assert_eq!(count_entries(&store, "-oci-"), 0, "nothing stored by refused pulls");
    store.ok(&["image", "pull", "--tls-verify=false", "--creds", "alice:s3cret", &image]);
    // Credentials from an auth.json, as podman and skopeo keep them.
    let auth = tmp.path().join("auth.json");
    std::fs::write(&auth, format!(r#"{{"auths":{{"{}":{{"auth":"{}"}}}}}}"#, reg.host(), base64_of("alice:s3cret")))
        .unwrap();
    let dest = format!("docker://{}/private/copy:v1", reg.host());
    store.ok(&[
        "image",
        "push",
        "--tls-verify=false",
        "--authfile",
        auth.to_str().unwrap(),
        &format!("{}/private/app:v1", reg.host()),
        &dest,
    ]);
    let raw = run_tool(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--creds",
        "alice:s3cret",
        "--raw",
        &dest,
    ]));
    assert_eq!(
        digest_of(&raw),
        json(&store.ok(&["image", "inspect", "--json", &format!("{}/private/app:v1", reg.host())]))["digest"]
    );
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn oci_and_docker_archives_both_ways() {
    if !peers() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    first_image(&src);
    let store = TestStore::start();
    let oci_digest = digest_of(&skopeo_raw(&format!("oci:{}:v1", src.display())));

    // oci-archive: written by skopeo, read by cairn, with the digest unchanged.
    let oa = tmp.path().join("image-oci.tar");
    skopeo_copy(&format!("oci:{}:v1", src.display()), &format!("oci-archive:{}:v1", oa.display()));
    let out = json(&store.ok(&[
        "image",
        "pull",
        "--json",
        "--tag",
        "arch/oci:v1",
        &format!("oci-archive:{}:v1", oa.display()),
    ]));
    assert_eq!(out["digest"], oci_digest);
    // Compressed (as skopeo and podman read them too): the same image.
    let gz = tmp.path().join("image-oci.tar.gz");
    std::fs::write(&gz, run_tool(Command::new("gzip").arg("-c").arg(&oa))).unwrap();
    assert_eq!(digest_of(&skopeo_raw(&format!("oci-archive:{}:v1", gz.display()))), oci_digest);
    let out = json(&store.ok(&[
        "image",
        "pull",
        "--json",
        "--tag",
        "arch/gz:v1",
        &format!("oci-archive:{}:v1", gz.display()),
    ]));
    assert_eq!(out["digest"], oci_digest, "a gzip-compressed OCI archive");
    // … and written by cairn, read by skopeo.
    let oa2 = tmp.path().join("out-oci.tar");
    store.ok(&["image", "push", "arch/oci:v1", &format!("oci-archive:{}:v1", oa2.display())]);
    assert_eq!(digest_of(&skopeo_raw(&format!("oci-archive:{}:v1", oa2.display()))), oci_digest);

    // docker-archive: skopeo writes one from the OCI image (layers uncompressed, a Docker
    // config); cairn derives the manifest skopeo derives, so the digests agree.
    let da = tmp.path().join("image-docker.tar");
    skopeo_copy(&format!("oci:{}:v1", src.display()), &format!("docker-archive:{}:arch/docker:v1", da.display()));
    let skopeo_digest = digest_of(&skopeo_raw(&format!("docker-archive:{}", da.display())));
    let out = json(&store.ok(&["image", "pull", "--json", &format!("docker-archive:{}:arch/docker:v1", da.display())]));
    assert_eq!(out["digest"], skopeo_digest, "the schema 2 manifest of a docker archive is skopeo's, byte for byte");
    assert_eq!(out["tags"][0], "arch/docker:v1");
    let xz = tmp.path().join("image-docker.tar.xz");
    std::fs::write(&xz, run_tool(Command::new("xz").arg("-c").arg(&da))).unwrap();
    let out = json(&store.ok(&["image", "pull", "--json", &format!("docker-archive:{}:arch/docker:v1", xz.display())]));
    assert_eq!(out["digest"], skopeo_digest, "an xz-compressed docker archive");
    // `:@N` picks the N-th image (from 0), as skopeo reads it; named by its RepoTags.
    let by_index = format!("docker-archive:{}:@0", da.display());
    assert_eq!(digest_of(&skopeo_raw(&by_index)), skopeo_digest);
    let out = json(&store.ok(&["image", "pull", "--json", &by_index]));
    assert_eq!(
        (&out["digest"], &out["tags"][0]),
        (&serde_json::json!(skopeo_digest), &serde_json::json!("arch/docker:v1"))
    );
    let e = store.fail(&["image", "pull", &format!("docker-archive:{}:@1", da.display())], b"");
    assert!(e.contains("holds 1 images: there is no @1"), "{e}");
    // cairn writes a docker archive from the (gzip-layered) OCI image; skopeo reads it back and
    // umoci unpacks what skopeo made of it.
    let da2 = tmp.path().join("out-docker.tar");
    store.ok(&["image", "push", "arch/oci:v1", &format!("docker-archive:{}:arch/again:v1", da2.display())]);
    let listing = run_tool(Command::new("tar").arg("-xOf").arg(&da2).arg("manifest.json"));
    let listing: serde_json::Value = serde_json::from_slice(&listing).unwrap();
    assert_eq!(listing[0]["RepoTags"], serde_json::json!(["arch/again:v1"]), "{listing}");
    run_tool(Command::new("skopeo").args(["inspect", &format!("docker-archive:{}:arch/again:v1", da2.display())]));
    let back = tmp.path().join("back");
    skopeo_copy(&format!("docker-archive:{}", da2.display()), &format!("oci:{}:v1", back.display()));
    let bundle = tmp.path().join("bundle");
    run_tool(
        Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:v1", back.display()))
            .arg(&bundle),
    );
    assert_eq!(std::fs::read(bundle.join("rootfs/app/one")).unwrap(), b"first app\n");
    assert_eq!(std::fs::read(bundle.join("rootfs/usr/lib/shared.txt")).unwrap(), vec![b's'; 200_000]);
    // The layers cairn wrote are the uncompressed layers of the original (their diff ids).
    let cfg: serde_json::Value = serde_json::from_slice(&run_tool(Command::new("skopeo").args([
        "inspect",
        "--config",
        &format!("docker-archive:{}", da2.display()),
    ])))
    .unwrap();
    let orig: serde_json::Value = serde_json::from_slice(&run_tool(Command::new("skopeo").args([
        "inspect",
        "--config",
        &format!("oci:{}:v1", src.display()),
    ])))
    .unwrap();
    assert_eq!(cfg["rootfs"]["diff_ids"], orig["rootfs"]["diff_ids"]);
}

/// A config and one layer (3 MiB, so that chunked uploads take several chunks) for `arch`, and
/// the image manifest naming them: (manifest, blobs).
fn platform_image(arch: &str) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let config =
        format!(r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}}}}"#).into_bytes();
    let layer = vec![arch.as_bytes()[1]; 3 << 20];
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        digest_of(&config),
        config.len(),
        digest_of(&layer),
        layer.len()
    )
    .into_bytes();
    (manifest, vec![(digest_of(&config), config), (digest_of(&layer), layer)])
}

#[test]
fn platforms_of_an_index_and_chunked_pushes() {
    if !peers() {
        return;
    }
    use cairn_tests::fake_registry::{Fake, FakeState};
    const IDX: &str = "application/vnd.oci.image.index.v1+json";
    const MT: &str = "application/vnd.oci.image.manifest.v1+json";
    let (amd, amd_blobs) = platform_image("amd64");
    let (arm, arm_blobs) = platform_image("arm64");
    let entry = |m: &[u8], arch: &str, variant: &str| {
        format!(
            r#"{{"mediaType":"{MT}","digest":"{}","size":{},"platform":{{"architecture":"{arch}","os":"linux"{variant}}}}}"#,
            digest_of(m),
            m.len()
        )
    };
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{IDX}","manifests":[{},{}]}}"#,
        entry(&amd, "amd64", ""),
        entry(&arm, "arm64", r#","variant":"v8""#)
    )
    .into_bytes();
    let mut st = FakeState::default();
    st.manifests.insert("hostile/app/multi".into(), (IDX.into(), index.clone()));
    for m in [&amd, &arm, &index] {
        let ct = if m == &index { IDX } else { MT };
        st.manifests.insert(format!("hostile/app/{}", digest_of(m)), (ct.into(), m.to_vec()));
    }
    for (d, b) in amd_blobs.iter().chain(&arm_blobs) {
        st.blobs.insert(d.clone(), b.clone());
    }
    let fake = Fake::start(st);
    let src = format!("{}:multi", fake.image());
    let store = TestStore::start();

    let out = json(&store.ok(&[
        "image",
        "pull",
        "--json",
        "--tls-verify=false",
        "--platform",
        "linux/amd64",
        "--tag",
        "multi:amd",
        &src,
    ]));
    assert_eq!(out["image"]["digest"], digest_of(&amd), "an index is narrowed to the platform's manifest");
    assert_eq!(out["blobsFetched"], 2);
    let out = json(&store.ok(&[
        "image",
        "pull",
        "--json",
        "--tls-verify=false",
        "--platform",
        "linux/arm64",
        "--tag",
        "multi:arm",
        &src,
    ]));
    assert_eq!(out["image"]["digest"], digest_of(&arm));
    let out = json(&store.ok(&[
        "image",
        "pull",
        "--json",
        "--tls-verify=false",
        "--all-platforms",
        "--tag",
        "multi:all",
        &src,
    ]));
    assert_eq!(out["image"]["digest"], digest_of(&index), "all platforms: the image is the index");
    assert_eq!((out["blobsFetched"].as_u64(), out["blobsSkipped"].as_u64()), (Some(0), Some(4)), "{out}");
    let ins = json(&store.ok(&["image", "inspect", "--json", "multi:all"]));
    assert_eq!(ins["platforms"], serde_json::json!(["linux/amd64", "linux/arm64/v8"]));
    let e = store.fail(&["image", "pull", "--tls-verify=false", "--platform", "windows/amd64", &src], b"");
    assert!(e.contains("no manifest in the index matches platform windows/amd64"), "{e}");

    // From an `oci:` layout and an `oci-archive:` of the index, the same narrowing as from a
    // registry (and as skopeo copies from `oci:`): the platform asked for, else this machine's,
    // or the whole index with --all-platforms.
    let local = tempfile::tempdir().unwrap();
    let (dir, archive) = (local.path().join("multi"), local.path().join("multi.tar"));
    store.ok(&["image", "push", "multi:all", &format!("oci:{}:all", dir.display())]);
    store.ok(&["image", "push", "multi:all", &format!("oci-archive:{}:all", archive.display())]);
    for src in [format!("oci:{}:all", dir.display()), format!("oci-archive:{}:all", archive.display())] {
        let pulled = |args: &[&str]| {
            let mut all = vec!["image", "pull", "--json", "--tag", "local/multi:x"];
            all.extend_from_slice(args);
            all.push(&src);
            json(&store.ok(&all))["digest"].as_str().unwrap().to_owned()
        };
        assert_eq!(pulled(&["--platform", "linux/arm64"]), digest_of(&arm), "{src}");
        if std::env::consts::ARCH == "x86_64" {
            assert_eq!(pulled(&[]), digest_of(&amd), "{src}: this machine's platform");
        }
        assert_eq!(pulled(&["--all-platforms"]), digest_of(&index), "{src}");
    }

    // The whole index goes to a real registry with every byte kept, blobs in 1 MB chunks.
    let reg = DockerRegistry::start();
    let dest = format!("docker://{}/multi/app:all", reg.host());
    store.ok(&["image", "push", "--tls-verify=false", "--chunk-size", "1000000", "multi:all", &dest]);
    assert_eq!(skopeo_raw(&dest), index);
    assert_eq!(skopeo_raw(&format!("docker://{}/multi/app@{}", reg.host(), digest_of(&arm))), arm);
    // skopeo checks every blob it copies against its digest.
    let arm_copy = tempfile::tempdir().unwrap();
    skopeo_copy(
        &format!("docker://{}/multi/app@{}", reg.host(), digest_of(&arm)),
        &format!("oci:{}:x", arm_copy.path().join("l").display()),
    );

    // Chunked into cairnd's own registry: another daemon receives the same bytes.
    let port = free_port();
    let other = TestStore::builder().config(&format!("listen = \"127.0.0.1:{port}\"\naccept-pushes = true\n")).start();
    wait_listening(port);
    let to_cairnd = format!("docker://127.0.0.1:{port}/multi/app:arm");
    let pushed = json(&store.ok(&[
        "image",
        "push",
        "--json",
        "--tls-verify=false",
        "--chunk-size",
        "1000000",
        "multi:arm",
        &to_cairnd,
    ]));
    assert_eq!(pushed["blobsUploaded"], 2, "{pushed}");
    assert_eq!(json(&other.ok(&["image", "inspect", "--json", "multi/app:arm"]))["digest"], digest_of(&arm));
}

/// A Docker schema 2 image (as most of Docker Hub serves) written to an `oci:` layout is written
/// with OCI's media types, as skopeo writes it there: skopeo and umoci read it, the same blobs
/// (layers and config) under a new manifest, and umoci's tree is the original's.
#[test]
fn a_docker_image_written_to_an_oci_layout_is_read_by_skopeo_and_umoci() {
    if !peers() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    first_image(&src);
    let reg = DockerRegistry::start();
    let docker = format!("docker://{}/docker/app:v1", reg.host());
    run_tool(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        "--format",
        "v2s2",
        &format!("oci:{}:v1", src.display()),
        &docker,
    ]));
    let raw: serde_json::Value = serde_json::from_slice(&skopeo_raw(&docker)).unwrap();
    assert_eq!(raw["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");
    let store = TestStore::start();
    store.ok(&["image", "pull", "--tls-verify=false", "--tag", "docker/app:v1", &docker]);
    let out = tmp.path().join("out");
    store.ok(&["image", "push", "docker/app:v1", &format!("oci:{}:v1", out.display())]);
    let written: serde_json::Value = serde_json::from_slice(&skopeo_raw(&format!("oci:{}:v1", out.display()))).unwrap();
    assert_eq!(written["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(written["config"]["digest"], raw["config"]["digest"], "the same config");
    let digests =
        |m: &serde_json::Value| m["layers"].as_array().unwrap().iter().map(|l| l["digest"].clone()).collect::<Vec<_>>();
    assert_eq!(digests(&written), digests(&raw), "the same layers");
    let bundle = tmp.path().join("bundle");
    run_tool(
        Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:v1", out.display()))
            .arg(&bundle),
    );
    assert_eq!(std::fs::read(bundle.join("rootfs/app/one")).unwrap(), b"first app\n");
    // Only what the layout names, as skopeo writes it: no Docker manifest that nothing names.
    let index = json(&std::fs::read_to_string(out.join("index.json")).unwrap());
    let mut named = vec![index["manifests"][0]["digest"].as_str().unwrap().to_owned()];
    named.push(written["config"]["digest"].as_str().unwrap().to_owned());
    named.extend(digests(&written).iter().map(|d| d.as_str().unwrap().to_owned()));
    named.sort();
    assert_eq!(layout_blobs(&out), named);
    // And cairn reads back what it wrote.
    store.ok(&["image", "pull", "--tag", "docker/again:v1", &format!("oci:{}:v1", out.display())]);
}

/// A session upload whose final PUT names the wrong digest is refused, and — as distribution
/// keeps it — the session goes on with the bytes it holds: its status says so, and a PUT with
/// the right digest completes it without sending them again.
#[test]
fn a_final_put_with_the_wrong_digest_leaves_the_upload_to_finish_as_with_distribution() {
    if !require_peer("docker-registry") {
        return;
    }
    let reg = DockerRegistry::start();
    let port = cairn_tests::free_port();
    let _store = TestStore::builder().config(&format!("listen = \"127.0.0.1:{port}\"\naccept-pushes = true\n")).start();
    cairn_tests::wait_listening(port);
    let wrong = format!("sha256:{}", "1".repeat(64));
    let right = digest_of(b"AAAAABBBBBCCCCC");
    let steps = |port: u16| -> Vec<(u16, Option<String>)> {
        let mut seen = Vec::new();
        let start = cairn_tests::oci::http(port, "POST", "/v2/t/chunks/blobs/uploads/", &[], b"");
        let mut loc = start.header("location").unwrap().to_owned();
        for (range, chunk) in [("0-4", b"AAAAA"), ("5-9", b"BBBBB")] {
            let a = cairn_tests::oci::http(port, "PATCH", &loc, &[("Content-Range", range)], chunk);
            loc = a.header("location").unwrap().to_owned();
            seen.push((a.status, a.header("range").map(str::to_owned)));
        }
        let a = cairn_tests::oci::http(port, "PATCH", &loc, &[], b"CCCCC");
        loc = a.header("location").unwrap().to_owned();
        seen.push((a.status, a.header("range").map(str::to_owned)));
        let sep = if loc.contains('?') { '&' } else { '?' };
        let bad = cairn_tests::oci::http(port, "PUT", &format!("{loc}{sep}digest={wrong}"), &[], b"");
        seen.push((bad.status, Some(bad.error_code())));
        let status = cairn_tests::oci::http(port, "GET", &loc, &[], b"");
        seen.push((status.status, status.header("range").map(str::to_owned)));
        let good = cairn_tests::oci::http(port, "PUT", &format!("{loc}{sep}digest={right}"), &[], b"");
        seen.push((good.status, None));
        let blob = cairn_tests::oci::http(port, "GET", &format!("/v2/t/chunks/blobs/{right}"), &[], b"");
        seen.push((blob.status, Some(String::from_utf8_lossy(&blob.body).into_owned())));
        seen
    };
    let (theirs, ours) = (steps(reg.port), steps(port));
    assert_eq!(ours, theirs);
    assert_eq!(ours[3], (400, Some("DIGEST_INVALID".to_owned())));
    assert_eq!(ours[4], (204, Some("0-14".to_owned())));
    assert_eq!(ours[6], (200, Some("AAAAABBBBBCCCCC".to_owned())));
}
