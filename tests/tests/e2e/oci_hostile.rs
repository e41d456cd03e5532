//! Hostile registries and layouts: a std-only registry in this test that lies (blobs whose bytes
//! are not their digest, manifests naming absent blobs, oversized or garbage manifests, a
//! by-digest answer with other bytes) and that wants bearer tokens; `oci:` layouts with bad
//! blobs. Every case must end in a one-line error, leave nothing in the store, and leave the
//! daemon serving.

use cairn_tests::fake_registry::{Fake, FakeState};
use cairn_tests::oci::digest_of;
use cairn_tests::TestStore;

const MT: &str = "application/vnd.oci.image.manifest.v1+json";

/// A config, two layers and a manifest naming them, as (manifest, [(digest, bytes)]).
fn image(seed: &str) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"seed":"{seed}"}}"#
    )
    .into_bytes();
    let l1 = format!("layer one {seed}").into_bytes();
    let l2 = vec![seed.as_bytes()[0]; 3 << 20];
    let desc = |mt: &str, b: &[u8]| format!(r#"{{"mediaType":"{mt}","digest":"{}","size":{}}}"#, digest_of(b), b.len());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{MT}","config":{},"layers":[{},{}]}}"#,
        desc("application/vnd.oci.image.config.v1+json", &config),
        desc("application/vnd.oci.image.layer.v1.tar+gzip", &l1),
        desc("application/vnd.oci.image.layer.v1.tar+gzip", &l2)
    )
    .into_bytes();
    let blobs = [config, l1, l2].into_iter().map(|b| (digest_of(&b), b)).collect();
    (manifest, blobs)
}

fn serve_image(st: &mut FakeState, tag: &str, manifest: &[u8], blobs: &[(String, Vec<u8>)]) {
    st.manifests.insert(format!("hostile/app/{tag}"), (MT.into(), manifest.to_vec()));
    st.manifests.insert(format!("hostile/app/{}", digest_of(manifest)), (MT.into(), manifest.to_vec()));
    for (d, b) in blobs {
        st.blobs.insert(d.clone(), b.clone());
    }
}

fn oci_entries(store: &TestStore) -> Vec<String> {
    store.store_entries().into_iter().filter(|e| e.contains("-oci-")).collect()
}

fn refused(store: &TestStore, args: &[&str], expect: &str) {
    let e = store.fail(args, b"");
    assert!(e.contains(expect), "expected '{expect}' in: {e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e}");
    assert_eq!(oci_entries(store), Vec::<String>::new(), "nothing left after: {e}");
}

#[test]
fn bearer_tokens_with_and_without_credentials() {
    let (manifest, blobs) = image("a");
    let mut st = FakeState { creds: Some(("bob".into(), "pw".into())), ..Default::default() };
    serve_image(&mut st, "v1", &manifest, &blobs);
    let fake = Fake::start(st);
    let store = TestStore::start();
    let src = format!("{}:v1", fake.image());
    refused(
        &store,
        &["image", "pull", "--tls-verify=false", &src],
        "needs credentials for repository:hostile/app:pull",
    );
    refused(&store, &["image", "pull", "--tls-verify=false", "--creds", "bob:nope", &src], "needs credentials");
    let out = store.ok(&["image", "pull", "--tls-verify=false", "--creds", "bob:pw", &src]);
    assert_eq!(out.trim(), digest_of(&manifest));
    let queries = fake.state.lock().unwrap().token_queries.clone();
    assert!(
        queries
            .iter()
            .any(|q| q.contains("scope=repository%3Ahostile%2Fapp%3Apull") && q.contains("service=fake.test")),
        "{queries:?}"
    );

    // A registry that hands out anonymous tokens (as Docker Hub does) needs no credentials.
    let (manifest, blobs) = image("b");
    let mut st = FakeState { anonymous: true, ..Default::default() };
    serve_image(&mut st, "v1", &manifest, &blobs);
    let anon = Fake::start(st);
    let out = store.ok(&["image", "pull", "--tls-verify=false", &format!("{}:v1", anon.image())]);
    assert_eq!(out.trim(), digest_of(&manifest));
}

#[test]
fn a_lying_registry_leaves_nothing_in_the_store() {
    let store = TestStore::start();
    let (manifest, blobs) = image("c");

    // A layer whose bytes are not its digest (a 3 MiB layer: the streaming path).
    let mut st = FakeState::default();
    let mut lying = blobs.clone();
    lying[2].1[1_000_000] ^= 1;
    serve_image(&mut st, "bad-layer", &manifest, &lying);
    let fake = Fake::start(st);
    refused(
        &store,
        &["image", "pull", "--tls-verify=false", &format!("{}:bad-layer", fake.image())],
        "does not have the digest that names it",
    );

    // A manifest naming a blob the registry does not have.
    let mut st = FakeState::default();
    serve_image(&mut st, "absent", &manifest, &blobs[..2]);
    let fake = Fake::start(st);
    refused(&store, &["image", "pull", "--tls-verify=false", &format!("{}:absent", fake.image())], "404");

    // A blob answer that is too long, and one cut short.
    for (tag, change) in [("long", 1i64), ("short", -1)] {
        let mut st = FakeState::default();
        let mut odd = blobs.clone();
        if change > 0 {
            odd[1].1.push(b'x');
        } else {
            odd[1].1.pop();
        }
        serve_image(&mut st, tag, &manifest, &odd);
        let fake = Fake::start(st);
        refused(&store, &["image", "pull", "--tls-verify=false", &format!("{}:{tag}", fake.image())], "expected");
    }

    // Oversized and garbage manifests, and a by-digest answer with other bytes.
    let mut st = FakeState::default();
    let mut huge = br#"{"schemaVersion":2,"x":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 5 << 20));
    huge.extend_from_slice(b"\"}");
    st.manifests.insert("hostile/app/huge".into(), (MT.into(), huge));
    st.manifests.insert("hostile/app/garbage".into(), (MT.into(), b"{\"schemaVersion\":2,\"config\":".to_vec()));
    st.manifests.insert("hostile/app/v1".into(), (MT.into(), b"{}".to_vec()));
    let (other, _) = image("d");
    st.manifests.insert(format!("hostile/app/{}", digest_of(&manifest)), (MT.into(), other));
    let fake = Fake::start(st);
    refused(
        &store,
        &["image", "pull", "--tls-verify=false", &format!("{}:huge", fake.image())],
        "larger than 4194304 bytes",
    );
    refused(&store, &["image", "pull", "--tls-verify=false", &format!("{}:garbage", fake.image())], "not valid JSON");
    refused(&store, &["image", "pull", "--tls-verify=false", &format!("{}:v1", fake.image())], "schemaVersion 2");
    refused(
        &store,
        &["image", "pull", "--tls-verify=false", &format!("{}@{}", fake.image(), digest_of(&manifest))],
        &format!("not {}", digest_of(&manifest)),
    );
    // Bad references are refused before anything is asked of a registry.
    refused(&store, &["image", "pull", "docker://127.0.0.1:1/UPPER/case:v1"], "invalid image reference");
    refused(&store, &["image", "pull", "docker://127.0.0.1:1/a/b@sha256:1234"], "invalid digest");

    // The daemon still pulls a good image afterwards.
    let mut st = FakeState::default();
    serve_image(&mut st, "good", &manifest, &blobs);
    let fake = Fake::start(st);
    let out = store.ok(&["image", "pull", "--tls-verify=false", &format!("{}:good", fake.image())]);
    assert_eq!(out.trim(), digest_of(&manifest));
    assert_eq!(oci_entries(&store).len(), 5, "manifest, config, two layers, layout");
}

/// Writes an `oci:` layout holding `manifest` and `blobs` (written as given) named `v1`.
fn write_layout(dir: &std::path::Path, manifest: &[u8], blobs: &[(String, Vec<u8>)]) {
    let b = dir.join("blobs/sha256");
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(b.join(digest_of(manifest).trim_start_matches("sha256:")), manifest).unwrap();
    for (d, bytes) in blobs {
        std::fs::write(b.join(d.trim_start_matches("sha256:")), bytes).unwrap();
    }
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{MT}","digest":"{}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"v1"}}}}]}}"#,
        digest_of(manifest),
        manifest.len()
    );
    std::fs::write(dir.join("index.json"), index).unwrap();
}

#[test]
fn hostile_oci_layouts_are_refused() {
    let store = TestStore::start();
    let tmp = tempfile::tempdir().unwrap();
    let (manifest, blobs) = image("e");
    let src = |name: &str| format!("oci:{}:v1", tmp.path().join(name).display());

    let mut bad = blobs.clone();
    bad[1].1[0] ^= 1;
    write_layout(&tmp.path().join("tampered"), &manifest, &bad);
    refused(&store, &["image", "pull", "--tag", "x:1", &src("tampered")], "does not have the digest that names it");

    write_layout(&tmp.path().join("missing"), &manifest, &blobs[..2]);
    refused(&store, &["image", "pull", "--tag", "x:1", &src("missing")], "is missing from");

    let mut longer = blobs.clone();
    longer[0].1.push(b' ');
    write_layout(&tmp.path().join("resized"), &manifest, &longer);
    refused(&store, &["image", "pull", "--tag", "x:1", &src("resized")], "bytes, but its descriptor says");

    let escape = tmp.path().join("escape");
    write_layout(&escape, &manifest, &blobs);
    std::fs::write(
        escape.join("index.json"),
        format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{MT}","digest":"sha256:../../../../etc/passwd","size":1}}]}}"#),
    )
    .unwrap();
    refused(
        &store,
        &["image", "pull", "--tag", "x:1", &format!("oci:{}", escape.display())],
        "Invalid encoded value ../../../../etc/passwd",
    );

    let ok = tmp.path().join("ok");
    write_layout(&ok, &manifest, &blobs);
    refused(
        &store,
        &["image", "pull", "--tag", "x:1", &format!("oci:{}:other", ok.display())],
        "no manifest in index.json is named 'other'",
    );
    let out = store.ok(&["image", "pull", "--tag", "x:1", &src("ok")]);
    assert_eq!(out.trim(), digest_of(&manifest));
}

/// A registry that accepts connections and never answers: the pull fails after the daemon's
/// `connect-timeout` / `stalled-download-timeout`, as a binary cache's download would, not after
/// fixed minutes of its own.
#[test]
fn a_silent_registry_fails_a_pull_after_the_configured_timeouts() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Hold every connection open, saying nothing, until the test ends.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            held.push(c);
        }
    });
    let store = TestStore::builder().config("connect-timeout = 1\nstalled-download-timeout = 1\n").start();
    let started = std::time::Instant::now();
    let out =
        store.run(&["image", "pull", "--tls-verify=false", &format!("docker://127.0.0.1:{port}/silent/app:1")], b"");
    let took = started.elapsed();
    assert!(!out.status.success(), "a pull from a registry that never answers must fail");
    assert!(took < std::time::Duration::from_secs(15), "the pull took {took:?}: the settings were not applied");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")) && err.contains("timed out"), "{err}");
}
