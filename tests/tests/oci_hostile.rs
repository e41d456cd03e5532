//! Hostile registries and layouts: a std-only registry in this test that lies (blobs whose bytes
//! are not their digest, manifests naming absent blobs, oversized or garbage manifests, a
//! by-digest answer with other bytes) and that wants bearer tokens; `oci:` layouts with bad
//! blobs. Every case must end in a one-line error, leave nothing in the store, and leave the
//! daemon serving.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use cairn_e2e::oci::digest_of;
use cairn_e2e::TestStore;

const TOKEN: &str = "tok-4711";

#[derive(Default)]
struct FakeState {
    /// `repo/ref` → (content type, bytes).
    manifests: HashMap<String, (String, Vec<u8>)>,
    /// digest → bytes served (which may not be the digest's).
    blobs: HashMap<String, Vec<u8>>,
    /// Basic credentials the token endpoint wants; with `anonymous`, tokens without them too.
    creds: Option<(String, String)>,
    anonymous: bool,
    token_queries: Vec<String>,
}

struct Fake {
    port: u16,
    state: Arc<Mutex<FakeState>>,
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

impl Fake {
    fn start(state: FakeState) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(state));
        let st = state.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || serve(c, port, &st));
            }
        });
        Fake { port, state }
    }

    fn image(&self) -> String {
        format!("docker://127.0.0.1:{}/hostile/app", self.port)
    }
}

fn respond(c: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut h = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    let _ = c.write_all(h.as_bytes());
    let _ = c.write_all(body);
}

fn serve(mut c: TcpStream, port: u16, st: &Mutex<FakeState>) {
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned());
    let mut auth = String::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = v.trim().to_owned();
            }
        }
    }
    let st = &mut *st.lock().unwrap();
    let wants_auth = st.creds.is_some() || st.anonymous;
    if let Some(q) = target.strip_prefix("/token?") {
        st.token_queries.push(q.to_owned());
        let ok = st.anonymous
            || st.creds.as_ref().is_some_and(|(u, p)| auth == format!("Basic {}", b64(&format!("{u}:{p}"))));
        if ok {
            respond(
                &mut c,
                "200 OK",
                &[("Content-Type", "application/json".into())],
                format!(r#"{{"token":"{TOKEN}"}}"#).as_bytes(),
            );
        } else {
            respond(&mut c, "401 Unauthorized", &[], b"{}");
        }
        return;
    }
    if wants_auth && auth != format!("Bearer {TOKEN}") {
        let challenge = format!(
            r#"Bearer realm="http://127.0.0.1:{port}/token",service="fake.test",scope="repository:hostile/app:pull""#
        );
        respond(
            &mut c,
            "401 Unauthorized",
            &[("WWW-Authenticate", challenge)],
            br#"{"errors":[{"code":"UNAUTHORIZED","message":"token"}]}"#,
        );
        return;
    }
    let head = method == "HEAD";
    let path = target.split('?').next().unwrap_or("");
    if path == "/v2/" {
        respond(&mut c, "200 OK", &[], b"{}");
    } else if let Some((repo, r)) = path.strip_prefix("/v2/").and_then(|p| p.rsplit_once("/manifests/")) {
        match st.manifests.get(&format!("{repo}/{r}")) {
            Some((ct, bytes)) => {
                let body: &[u8] = if head { b"" } else { bytes };
                respond(&mut c, "200 OK", &[("Content-Type", ct.clone())], body)
            }
            None => {
                respond(&mut c, "404 Not Found", &[], br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}"#)
            }
        }
    } else if let Some((_, d)) = path.strip_prefix("/v2/").and_then(|p| p.rsplit_once("/blobs/")) {
        match st.blobs.get(d) {
            Some(bytes) => respond(&mut c, "200 OK", &[], bytes),
            None => respond(&mut c, "404 Not Found", &[], br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}"#),
        }
    } else {
        respond(&mut c, "404 Not Found", &[], b"");
    }
    let _ = r.read(&mut [0u8; 0]);
}

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
