//! The OCI Distribution Spec's conformance workflows (pull, push, content discovery, content
//! management), ported from the upstream Go suite (which cannot be built here) and run with raw
//! HTTP against cairnd's registry endpoint, plus the hostile pushes a registry must refuse.

use cairn_tests::oci::{digest_of, http, Answer};
use cairn_tests::{free_port, wait_listening, TestStore};

const MT: &str = "application/vnd.oci.image.manifest.v1+json";
const CFG: &str = "application/vnd.oci.image.config.v1+json";

struct Registry {
    store: TestStore,
    port: u16,
}

impl Registry {
    fn start(pushes: bool) -> Registry {
        let port = free_port();
        let store =
            TestStore::builder().config(&format!("listen = \"127.0.0.1:{port}\"\naccept-pushes = {pushes}\n")).start();
        wait_listening(port);
        Registry { store, port }
    }

    fn req(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        http(self.port, method, path, headers, body)
    }

    /// A blob pushed with POST + PUT (the spec's "monolithic upload in a session").
    fn push_blob(&self, name: &str, blob: &[u8]) -> String {
        let a = self.req("POST", &format!("/v2/{name}/blobs/uploads/"), &[], b"");
        assert_eq!(a.status, 202, "{a:?}");
        let loc = a.header("location").unwrap().to_owned();
        let d = digest_of(blob);
        let sep = if loc.contains('?') { '&' } else { '?' };
        let a =
            self.req("PUT", &format!("{loc}{sep}digest={d}"), &[("Content-Type", "application/octet-stream")], blob);
        assert_eq!(a.status, 201, "{a:?} {}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.header("location"), Some(format!("/v2/{name}/blobs/{d}").as_str()));
        d
    }

    /// An image (config + one layer) pushed as `name:tag`; returns (manifest bytes, digest).
    fn push_image(&self, name: &str, tag: &str, seed: &str) -> (Vec<u8>, String) {
        let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":"{seed}"}}"#).into_bytes();
        let layer = format!("layer of {seed}").into_bytes();
        let cd = self.push_blob(name, &config);
        let ld = self.push_blob(name, &layer);
        let m = manifest(&cd, config.len(), &[(&ld, layer.len())], None);
        let a = self.req("PUT", &format!("/v2/{name}/manifests/{tag}"), &[("Content-Type", MT)], &m);
        assert_eq!(a.status, 201, "{a:?} {}", String::from_utf8_lossy(&a.body));
        let d = digest_of(&m);
        assert_eq!(a.header("docker-content-digest"), Some(d.as_str()));
        (m, d)
    }
}

fn manifest(config: &str, config_size: usize, layers: &[(&str, usize)], subject: Option<(&str, usize)>) -> Vec<u8> {
    let ls: Vec<String> = layers
        .iter()
        .map(|(d, n)| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{n}}}"#))
        .collect();
    let subject = subject
        .map(|(d, n)| format!(r#","subject":{{"mediaType":"{MT}","digest":"{d}","size":{n}}},"artifactType":"application/vnd.example.sbom""#))
        .unwrap_or_default();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{MT}","config":{{"mediaType":"{CFG}","digest":"{config}","size":{config_size}}},"layers":[{}]{subject}}}"#,
        ls.join(",")
    )
    .into_bytes()
}

#[test]
fn pull() {
    let r = Registry::start(true);
    let base = r.req("GET", "/v2/", &[], b"");
    assert_eq!(base.status, 200);
    assert_eq!(base.header("docker-distribution-api-version"), Some("registry/2.0"));
    let (m, d) = r.push_image("conf/pull", "v1", "pull");
    for reference in ["v1", d.as_str()] {
        let a = r.req("GET", &format!("/v2/conf/pull/manifests/{reference}"), &[("Accept", MT)], b"");
        assert_eq!(a.status, 200);
        assert_eq!(a.body, m, "manifests come back byte for byte");
        assert_eq!(a.header("content-type"), Some(MT));
        assert_eq!(a.header("docker-content-digest"), Some(d.as_str()));
        let h = r.req("HEAD", &format!("/v2/conf/pull/manifests/{reference}"), &[], b"");
        assert_eq!(h.status, 200);
        assert_eq!(h.header("content-length"), Some(m.len().to_string().as_str()));
    }
    let layer = b"layer of pull";
    let ld = digest_of(layer);
    let a = r.req("GET", &format!("/v2/conf/pull/blobs/{ld}"), &[], b"");
    assert_eq!((a.status, a.body.as_slice()), (200, &layer[..]));
    let h = r.req("HEAD", &format!("/v2/conf/pull/blobs/{ld}"), &[], b"");
    assert_eq!((h.status, h.header("content-length")), (200, Some(layer.len().to_string().as_str())));
    let part = r.req("GET", &format!("/v2/conf/pull/blobs/{ld}"), &[("Range", "bytes=3-7")], b"");
    assert_eq!((part.status, part.body.as_slice()), (206, &layer[3..8]));
    assert_eq!(part.header("content-range"), Some(format!("bytes 3-7/{}", layer.len()).as_str()));
    let bad = r.req("GET", &format!("/v2/conf/pull/blobs/{ld}"), &[("Range", "bytes=999-")], b"");
    assert_eq!(bad.status, 416);

    let a = r.req("GET", "/v2/conf/pull/manifests/nope", &[], b"");
    assert_eq!((a.status, a.error_code().as_str()), (404, "MANIFEST_UNKNOWN"));
    let a = r.req("GET", &format!("/v2/conf/pull/manifests/{}", digest_of(b"other")), &[], b"");
    assert_eq!((a.status, a.error_code().as_str()), (404, "MANIFEST_UNKNOWN"));
    let a = r.req("GET", &format!("/v2/conf/pull/blobs/{}", digest_of(b"other")), &[], b"");
    assert_eq!((a.status, a.error_code().as_str()), (404, "BLOB_UNKNOWN"));
    let a = r.req("GET", "/v2/conf/absent/manifests/v1", &[], b"");
    assert_eq!((a.status, a.error_code().as_str()), (404, "NAME_UNKNOWN"));
    // A blob of another repository is not reachable through this one.
    r.push_image("conf/other", "v1", "other");
    let a = r.req("GET", &format!("/v2/conf/pull/blobs/{}", digest_of(b"layer of other")), &[], b"");
    assert_eq!(a.status, 404);
}

#[test]
fn push() {
    let r = Registry::start(true);
    // Single POST with the digest: the body is the blob.
    let blob = b"posted in one request".to_vec();
    let d = digest_of(&blob);
    let a = r.req(
        "POST",
        &format!("/v2/conf/push/blobs/uploads/?digest={d}"),
        &[("Content-Type", "application/octet-stream")],
        &blob,
    );
    assert_eq!(a.status, 201, "{a:?}");
    // Chunked: POST, PATCH, PATCH, GET status, PUT.
    let chunks: [&[u8]; 2] = [&[b'a'; 70_000], &[b'b'; 30_000]];
    let whole = [chunks[0], chunks[1]].concat();
    let a = r.req("POST", "/v2/conf/push/blobs/uploads/", &[], b"");
    assert_eq!(a.status, 202);
    let mut loc = a.header("location").unwrap().to_owned();
    let mut at = 0usize;
    for c in chunks {
        let range = format!("{at}-{}", at + c.len() - 1);
        let a = r.req("PATCH", &loc, &[("Content-Type", "application/octet-stream"), ("Content-Range", &range)], c);
        assert_eq!(a.status, 202, "{a:?}");
        at += c.len();
        assert_eq!(a.header("range"), Some(format!("0-{}", at - 1).as_str()));
        loc = a.header("location").unwrap().to_owned();
    }
    let st = r.req("GET", &loc, &[], b"");
    assert_eq!((st.status, st.header("range")), (204, Some(format!("0-{}", whole.len() - 1).as_str())));
    // A chunk out of order is refused with 416 and the session stays usable.
    let a = r.req("PATCH", &loc, &[("Content-Range", "5-9")], b"xxxxx");
    assert_eq!(a.status, 416, "{a:?}");
    let wd = digest_of(&whole);
    let a = r.req("PUT", &format!("{loc}?digest={wd}"), &[], b"");
    assert_eq!(a.status, 201, "{a:?}");
    // A blob pushed to a repository is in it at once, as distribution answers.
    let got = r.req("GET", &format!("/v2/conf/push/blobs/{wd}"), &[], b"");
    assert_eq!((got.status, &got.body), (200, &whole));
    assert_eq!(r.req("HEAD", &format!("/v2/conf/other/blobs/{wd}"), &[], b"").status, 404, "and only in it");
    // A manifest naming the blobs makes them its image's.
    let m = manifest(&d, blob.len(), &[(&wd, whole.len())], None);
    let a = r.req("PUT", "/v2/conf/push/manifests/v1", &[("Content-Type", MT)], &m);
    assert_eq!(a.status, 201, "{a:?} {}", String::from_utf8_lossy(&a.body));
    assert_eq!(r.req("GET", &format!("/v2/conf/push/blobs/{wd}"), &[], b"").body, whole);
    // Cross-repository mount.
    let a = r.req("POST", &format!("/v2/conf/mounted/blobs/uploads/?mount={wd}&from=conf/push"), &[], b"");
    assert_eq!(a.status, 201, "{a:?}");
    // Push by digest, then the same manifest by tag. Its blobs must be in the repository
    // first (a manifest naming blobs of another is refused, as distribution refuses it).
    let a = r.req("PUT", &format!("/v2/conf/bydigest/manifests/{}", digest_of(&m)), &[("Content-Type", MT)], &m);
    assert_eq!(a.status, 400, "{a:?}");
    for blob in [&d, &wd] {
        let a = r.req("POST", &format!("/v2/conf/bydigest/blobs/uploads/?mount={blob}&from=conf/push"), &[], b"");
        assert_eq!(a.status, 201, "{a:?}");
    }
    let a = r.req("PUT", &format!("/v2/conf/bydigest/manifests/{}", digest_of(&m)), &[("Content-Type", MT)], &m);
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(r.req("GET", &format!("/v2/conf/bydigest/manifests/{}", digest_of(&m)), &[], b"").body, m);
    // What cairn sees: the pushed tag is an image, with the digest the registry answered.
    let ls = r.store.ok(&["image", "ls", "--json"]);
    assert!(ls.contains("conf/push:v1") && ls.contains(&digest_of(&m)), "{ls}");
}

#[test]
fn push_refusals() {
    let r = Registry::start(true);
    let (_, _) = r.push_image("conf/bad", "v1", "bad");
    let before = r.store.store_entries().len();
    // A blob whose bytes are not the digest.
    let a = r.req("POST", "/v2/conf/bad/blobs/uploads/", &[], b"");
    let loc = a.header("location").unwrap().to_owned();
    let a = r.req("PUT", &format!("{loc}?digest={}", digest_of(b"claimed")), &[], b"actual");
    assert_eq!((a.status, a.error_code().as_str()), (400, "DIGEST_INVALID"), "{a:?}");
    let a = r.req("POST", &format!("/v2/conf/bad/blobs/uploads/?digest={}", digest_of(b"claimed")), &[], b"actual");
    assert_eq!((a.status, a.error_code().as_str()), (400, "DIGEST_INVALID"));
    // A manifest naming a blob that was never pushed.
    let m = manifest(&digest_of(b"nope"), 4, &[], None);
    let a = r.req("PUT", "/v2/conf/bad/manifests/v2", &[("Content-Type", MT)], &m);
    assert_eq!((a.status, a.error_code().as_str()), (400, "MANIFEST_BLOB_UNKNOWN"), "{a:?}");
    // A manifest pushed under a digest it does not have.
    let a = r.req("PUT", &format!("/v2/conf/bad/manifests/{}", digest_of(b"x")), &[("Content-Type", MT)], &m);
    assert_eq!((a.status, a.error_code().as_str()), (400, "DIGEST_INVALID"));
    // Garbage, oversized manifests, bad names and tags.
    let a = r.req("PUT", "/v2/conf/bad/manifests/v3", &[("Content-Type", MT)], b"{\"schemaVersion\":2,");
    assert_eq!((a.status, a.error_code().as_str()), (400, "MANIFEST_INVALID"));
    // A tag no tag can be (129 characters) names no manifest, as distribution answers.
    let a = r.req("GET", &format!("/v2/conf/bad/manifests/{}", "t".repeat(129)), &[], b"");
    assert_eq!((a.status, a.error_code().as_str()), (404, "MANIFEST_UNKNOWN"));
    let huge = vec![b' '; 5 << 20];
    let a = r.req("PUT", "/v2/conf/bad/manifests/v4", &[("Content-Type", MT)], &huge);
    assert_eq!((a.status, a.error_code().as_str()), (413, "SIZE_INVALID"));
    let a = r.req("PUT", "/v2/Conf/Bad/manifests/v1", &[("Content-Type", MT)], &m);
    assert_eq!((a.status, a.error_code().as_str()), (400, "NAME_INVALID"));
    let a = r.req("PUT", "/v2/conf/bad/manifests/-tag", &[("Content-Type", MT)], &m);
    assert_eq!((a.status, a.error_code().as_str()), (400, "TAG_INVALID"));
    for path in
        ["/v2/../../etc/passwd/manifests/x", "/v2/conf/%2e%2e/manifests/x", "/v2/conf/bad/blobs/sha256:..%2f..%2fx"]
    {
        let a = r.req("GET", path, &[], b"");
        assert!(matches!(a.status, 400 | 404), "{path}: {a:?}");
    }
    let a = r.req("PATCH", "/v2/conf/bad/blobs/uploads/0123456789abcdef", &[], b"x");
    assert_eq!((a.status, a.error_code().as_str()), (404, "BLOB_UPLOAD_UNKNOWN"));
    assert_eq!(r.store.store_entries().len(), before, "nothing registered by refused pushes");

    // A read-only registry refuses pushes.
    let ro = Registry::start(false);
    let a = ro.req("POST", "/v2/conf/ro/blobs/uploads/", &[], b"");
    assert_eq!((a.status, a.error_code().as_str()), (405, "UNSUPPORTED"));
}

#[test]
fn content_discovery() {
    let r = Registry::start(true);
    let mut digests = Vec::new();
    for t in ["c", "a", "d", "b"] {
        digests.push(r.push_image("conf/disc", t, "same").1);
    }
    let a = r.req("GET", "/v2/conf/disc/tags/list", &[], b"");
    assert_eq!(a.json(), serde_json::json!({ "name": "conf/disc", "tags": ["a", "b", "c", "d"] }));
    let a = r.req("GET", "/v2/conf/disc/tags/list?n=2", &[], b"");
    assert_eq!(a.json()["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(a.header("link"), Some("</v2/conf/disc/tags/list?n=2&last=b>; rel=\"next\""));
    let a = r.req("GET", "/v2/conf/disc/tags/list?n=2&last=b", &[], b"");
    assert_eq!(a.json()["tags"], serde_json::json!(["c", "d"]));
    assert_eq!(a.header("link"), None);
    let a = r.req("GET", "/v2/conf/none/tags/list", &[], b"");
    assert_eq!((a.status, a.error_code().as_str()), (404, "NAME_UNKNOWN"));

    // Referrers: an artifact whose subject is the image.
    let subject = &digests[0];
    let subject_size = r.req("HEAD", &format!("/v2/conf/disc/manifests/{subject}"), &[], b"");
    let size: usize = subject_size.header("content-length").unwrap().parse().unwrap();
    let cfg = b"{}".to_vec();
    let cd = r.push_blob("conf/disc", &cfg);
    let art = manifest(&cd, cfg.len(), &[], Some((subject, size)));
    let ad = digest_of(&art);
    let a = r.req("PUT", &format!("/v2/conf/disc/manifests/{ad}"), &[("Content-Type", MT)], &art);
    assert_eq!(a.status, 201, "{a:?} {}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.header("oci-subject"), Some(subject.as_str()));
    let a = r.req("GET", &format!("/v2/conf/disc/referrers/{subject}"), &[], b"");
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["manifests"][0]["digest"], ad);
    assert_eq!(v["manifests"][0]["artifactType"], "application/vnd.example.sbom");
    let a = r.req("GET", &format!("/v2/conf/disc/referrers/{subject}?artifactType=application/other"), &[], b"");
    assert_eq!(a.json()["manifests"], serde_json::json!([]));
    assert_eq!(a.header("oci-filters-applied"), Some("artifactType"));
}

#[test]
fn content_management() {
    let r = Registry::start(true);
    let (_, d1) = r.push_image("conf/mgmt", "keep", "one");
    let (_, d2) = r.push_image("conf/mgmt", "drop", "two");
    // Deleting a tag removes it and nothing else.
    assert_eq!(r.req("DELETE", "/v2/conf/mgmt/manifests/drop", &[], b"").status, 202);
    assert_eq!(r.req("GET", "/v2/conf/mgmt/manifests/drop", &[], b"").status, 404);
    assert_eq!(r.req("GET", &format!("/v2/conf/mgmt/manifests/{d2}"), &[], b"").status, 404);
    assert_eq!(r.req("GET", "/v2/conf/mgmt/manifests/keep", &[], b"").status, 200);
    // Deleting by digest removes every tag naming it.
    assert_eq!(r.req("DELETE", &format!("/v2/conf/mgmt/manifests/{d1}"), &[], b"").status, 202);
    assert_eq!(r.req("GET", "/v2/conf/mgmt/manifests/keep", &[], b"").status, 404);
    assert_eq!(r.req("DELETE", &format!("/v2/conf/mgmt/manifests/{d1}"), &[], b"").status, 404);
    // Blobs go with the collector, not with DELETE.
    let a = r.req("DELETE", &format!("/v2/conf/mgmt/blobs/{}", digest_of(b"layer of one")), &[], b"");
    assert_eq!((a.status, a.error_code().as_str()), (405, "UNSUPPORTED"));
    r.store.ok(&["gc"]);
    let left: Vec<String> = r.store.store_entries().into_iter().filter(|e| e.contains("-oci-")).collect();
    assert!(left.is_empty(), "deleted images are collected: {left:?}");
}
