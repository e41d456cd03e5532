//! What a registry repository holds: blobs pushed to it are its own at once (fetched through it,
//! named by its manifests, kept from the collector until the manifest comes), and a repository
//! gives nothing of another's — not by a mount, not by a manifest naming the other's digests,
//! not to a user limited by `listen-auth-file` prefixes through the cache or the catalog.

use cairn_tests::oci::{digest_of, http, Answer};
use cairn_tests::{free_port, wait_listening, TestStore};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn registry(extra: &str) -> (TestStore, u16) {
    let port = free_port();
    let st =
        TestStore::builder().config(&format!("listen = \"127.0.0.1:{port}\"\naccept-pushes = true\n{extra}")).start();
    wait_listening(port);
    (st, port)
}

fn body(a: &Answer) -> String {
    String::from_utf8_lossy(&a.body).into_owned()
}

/// Uploads `blob` to `repo` in one POST.
fn upload(port: u16, auth: &[(&str, &str)], repo: &str, blob: &[u8]) -> String {
    let d = digest_of(blob);
    let a = http(port, "POST", &format!("/v2/{repo}/blobs/uploads/?digest={d}"), auth, blob);
    assert_eq!(a.status, 201, "{}", body(&a));
    d
}

/// An image manifest naming `config` and `layer`.
fn manifest(config: &[u8], layer: &[u8]) -> Vec<u8> {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        digest_of(config),
        config.len(),
        digest_of(layer),
        layer.len()
    )
    .into_bytes()
}

fn put_manifest(port: u16, auth: &[(&str, &str)], repo: &str, tag: &str, m: &[u8]) -> Answer {
    let mut h = auth.to_vec();
    h.push(("Content-Type", OCI_MANIFEST));
    http(port, "PUT", &format!("/v2/{repo}/manifests/{tag}"), &h, m)
}

#[test]
fn an_uploaded_blob_is_the_repository_s_at_once_and_outlives_a_collection_until_its_manifest() {
    let (st, port) = registry("");
    let (config, layer) = (br#"{"architecture":"amd64","os":"linux"}"#.to_vec(), b"layer bytes".repeat(1000));
    let dc = upload(port, &[], "team/app", &config);
    let dl = upload(port, &[], "team/app", &layer);
    // Fetched through the repository it was pushed to, as distribution answers: a client asks
    // this before uploading, and a miss would make it upload every time.
    let a = http(port, "HEAD", &format!("/v2/team/app/blobs/{dl}"), &[], b"");
    assert_eq!(a.status, 200, "{}", body(&a));
    assert_eq!(http(port, "GET", &format!("/v2/team/app/blobs/{dc}"), &[], b"").body, config);
    // Not through another repository.
    assert_eq!(http(port, "HEAD", &format!("/v2/other/blobs/{dl}"), &[], b"").status, 404);
    // The repository exists already, as in distribution: the catalog lists it.
    assert!(body(&http(port, "GET", "/v2/_catalog", &[], b"")).contains("\"team/app\""));
    assert_eq!(http(port, "GET", "/v2", &[], b"").status, 308, "the API root is /v2/");
    // A collection between the uploads and the manifest keeps them.
    let gc = st.run(&["gc"], b"");
    assert!(gc.status.success(), "{}", String::from_utf8_lossy(&gc.stderr));
    let a = put_manifest(port, &[], "team/app", "v1", &manifest(&config, &layer));
    assert_eq!(a.status, 201, "{}", body(&a));
    assert_eq!(http(port, "GET", &format!("/v2/team/app/blobs/{dl}"), &[], b"").body, layer);
}

#[test]
fn a_manifest_may_name_only_blobs_of_its_own_repository_and_a_mount_only_take_from_one_that_holds_it() {
    let (_st, port) = registry("");
    let (config, layer) = (br#"{"architecture":"amd64","os":"linux"}"#.to_vec(), b"secret layer".repeat(500));
    upload(port, &[], "secret/app", &config);
    let dl = upload(port, &[], "secret/app", &layer);
    assert_eq!(put_manifest(port, &[], "secret/app", "v1", &manifest(&config, &layer)).status, 201);
    // Stored, but not in `team/steal`: refused as distribution refuses it.
    let a = put_manifest(port, &[], "team/steal", "x", &manifest(&config, &layer));
    assert_eq!(a.status, 400, "{}", body(&a));
    assert!(body(&a).contains("MANIFEST_BLOB_UNKNOWN"), "{}", body(&a));
    assert_eq!(http(port, "HEAD", &format!("/v2/team/steal/blobs/{dl}"), &[], b"").status, 404);
    // A mount from a repository that does not hold the blob is an upload start, not a mount.
    let a = http(port, "POST", &format!("/v2/team/steal/blobs/uploads/?mount={dl}&from=team/nothing"), &[], b"");
    assert_eq!(a.status, 202, "{}", body(&a));
    // From one that holds it, it is mounted, and then the repository holds it.
    let a = http(port, "POST", &format!("/v2/team/copy/blobs/uploads/?mount={dl}&from=secret/app"), &[], b"");
    assert_eq!(a.status, 201, "{}", body(&a));
    assert_eq!(http(port, "GET", &format!("/v2/team/copy/blobs/{dl}"), &[], b"").body, layer);
}

#[test]
fn a_manifest_sent_as_another_media_type_than_it_declares_is_refused() {
    let (_st, port) = registry("");
    let (config, layer) = (br#"{"architecture":"amd64","os":"linux"}"#.to_vec(), b"l".repeat(100));
    upload(port, &[], "t/app", &config);
    upload(port, &[], "t/app", &layer);
    let m = manifest(&config, &layer);
    for ct in [Some("text/plain"), Some("application/vnd.docker.distribution.manifest.v2+json"), None] {
        let h: Vec<(&str, &str)> = ct.map(|c| ("Content-Type", c)).into_iter().collect();
        let a = http(port, "PUT", "/v2/t/app/manifests/bad", &h, &m);
        assert_eq!(a.status, 400, "{ct:?}: {}", body(&a));
        assert!(body(&a).contains("MANIFEST_INVALID"), "{}", body(&a));
    }
    assert_eq!(http(port, "HEAD", "/v2/t/app/manifests/bad", &[], b"").status, 404);
    // A manifest that declares no media type (as umoci writes OCI ones) is OCI's: sent as
    // Docker's, it is refused as distribution refuses it; as OCI's, taken.
    let mut v: serde_json::Value = serde_json::from_slice(&m).unwrap();
    v.as_object_mut().unwrap().remove("mediaType");
    let bare = serde_json::to_vec(&v).unwrap();
    let docker = [("Content-Type", "application/vnd.docker.distribution.manifest.v2+json")];
    let a = http(port, "PUT", "/v2/t/app/manifests/bare", &docker, &bare);
    assert_eq!(a.status, 400, "{}", body(&a));
    assert!(body(&a).contains("MANIFEST_INVALID"), "{}", body(&a));
    let a = http(port, "PUT", "/v2/t/app/manifests/bare", &[("Content-Type", OCI_MANIFEST)], &bare);
    assert_eq!(a.status, 201, "{}", body(&a));
    assert_eq!(put_manifest(port, &[], "t/app", "good", &m).status, 201);
}

/// A repository whose tags are all deleted is still there, as in distribution: its tag list is
/// empty, not unknown (`skopeo sync` lists it).
#[test]
fn a_repository_without_tags_lists_none_rather_than_being_unknown() {
    let (_st, port) = registry("");
    let (config, layer) = (br#"{"architecture":"amd64","os":"linux"}"#.to_vec(), b"untagged".repeat(300));
    upload(port, &[], "no/tags", &config);
    upload(port, &[], "no/tags", &layer);
    assert_eq!(put_manifest(port, &[], "no/tags", "only", &manifest(&config, &layer)).status, 201);
    assert_eq!(http(port, "DELETE", "/v2/no/tags/manifests/only", &[], b"").status, 202);
    let a = http(port, "GET", "/v2/no/tags/tags/list", &[], b"");
    assert_eq!(a.status, 200, "{}", body(&a));
    assert_eq!(a.json()["tags"], serde_json::json!([]));
    assert_eq!(http(port, "GET", "/v2/never/was/tags/list", &[], b"").status, 404);
}

#[test]
fn a_user_limited_to_a_prefix_reaches_nothing_of_other_repositories() {
    let sha = |t: &str| digest_of(t.as_bytes()).trim_start_matches("sha256:").to_owned();
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!(
            "owner {} read,push secret\nmallory {} read,push team\nreader {} read\n",
            sha("owner-token"),
            sha("mallory-token"),
            sha("reader-token")
        ),
    )
    .unwrap();
    let (st, port) = registry(&format!("listen-auth-file = \"{}\"\n", users.display()));
    let owner = [("Authorization", "Bearer owner-token")];
    let mallory = [("Authorization", "Bearer mallory-token")];
    let (config, layer) = (br#"{"architecture":"amd64","os":"linux"}"#.to_vec(), b"secret".repeat(700));
    upload(port, &owner, "secret/app", &config);
    let dl = upload(port, &owner, "secret/app", &layer);
    assert_eq!(put_manifest(port, &owner, "secret/app", "v1", &manifest(&config, &layer)).status, 201);

    assert_eq!(http(port, "GET", &format!("/v2/secret/app/blobs/{dl}"), &mallory, b"").status, 403);
    // A mount from a repository mallory may not read is a plain upload start: it neither
    // mounts nor tells whether the blob is there.
    let a = http(port, "POST", &format!("/v2/team/steal/blobs/uploads/?mount={dl}&from=secret/app"), &mallory, b"");
    assert_eq!(a.status, 202, "{}", body(&a));
    // Nor with a readable `from` first and the unreadable one after it (the last one counts).
    let twice = format!("/v2/team/steal/blobs/uploads/?mount={dl}&from=team/steal&from=secret/app");
    let a = http(port, "POST", &twice, &mallory, b"");
    assert_eq!(a.status, 202, "{}", body(&a));
    let a = put_manifest(port, &mallory, "team/steal", "x", &manifest(&config, &layer));
    assert_eq!(a.status, 400, "{}", body(&a));
    assert_eq!(http(port, "GET", &format!("/v2/team/steal/blobs/{dl}"), &mallory, b"").status, 404);
    // The catalog lists only what mallory may read.
    let a = http(port, "GET", "/v2/_catalog", &mallory, b"");
    assert_eq!(a.status, 200);
    assert!(!body(&a).contains("secret"), "{}", body(&a));
    assert!(body(&http(port, "GET", "/v2/_catalog", &owner, b"")).contains("secret/app"));
    // The binary cache names every store path, the image's blobs among them: not for a user
    // limited to repositories; a user without prefixes reads it.
    assert_eq!(http(port, "GET", "/nix-cache-info", &mallory, b"").status, 403);
    assert_eq!(http(port, "GET", "/nix-cache-info", &owner, b"").status, 403, "owner is limited to 'secret' too");
    assert_eq!(http(port, "GET", "/nix-cache-info", &[("Authorization", "Bearer reader-token")], b"").status, 200);
    drop(st);
}

#[test]
fn a_deleted_manifest_can_be_put_again_until_the_collector_takes_its_blobs() {
    let (st, port) = registry("");
    let (config, layer) = (br#"{"architecture":"amd64","os":"linux"}"#.to_vec(), b"again".repeat(300));
    upload(port, &[], "del/me", &config);
    upload(port, &[], "del/me", &layer);
    let m = manifest(&config, &layer);
    assert_eq!(put_manifest(port, &[], "del/me", "d1", &m).status, 201);
    let d = digest_of(&m);
    assert_eq!(http(port, "DELETE", &format!("/v2/del/me/manifests/{d}"), &[], b"").status, 202);
    // As distribution: the repository still holds the blobs, so the manifest alone comes back.
    let a = put_manifest(port, &[], "del/me", "d1", &m);
    assert_eq!(a.status, 201, "{}", body(&a));
    // A client that has the manifest gets a 304, whose length, if it says one, is the true one.
    let tag = format!("\"{d}\"");
    for method in ["GET", "HEAD"] {
        let a = http(port, method, "/v2/del/me/manifests/d1", &[("If-None-Match", &tag)], b"");
        assert_eq!(a.status, 304, "{method}");
        let len = m.len().to_string();
        assert!(a.header("content-length").is_none_or(|l| l == len), "{method}: {:?}", a.header("content-length"));
    }
    // Media types are case-insensitive.
    let a = http(port, "PUT", "/v2/del/me/manifests/upper", &[("Content-Type", &OCI_MANIFEST.to_uppercase())], &m);
    assert_eq!(a.status, 201, "{}", body(&a));
    // Once the manifest is gone and the collector has run, the blobs are gone too.
    for tag in ["d1", "upper"] {
        assert_eq!(http(port, "DELETE", &format!("/v2/del/me/manifests/{tag}"), &[], b"").status, 202);
    }
    let gc = st.run(&["gc"], b"");
    assert!(gc.status.success(), "{}", String::from_utf8_lossy(&gc.stderr));
    let a = put_manifest(port, &[], "del/me", "d1", &m);
    assert_eq!(a.status, 400, "{}", body(&a));
    assert!(body(&a).contains("MANIFEST_BLOB_UNKNOWN"), "{}", body(&a));
}

/// A manifest an index of the repository holds is not deleted out from under it: the deletion
/// is refused (nothing is answered "deleted" and still served), and goes through once the index
/// is gone.
#[test]
fn a_manifest_an_index_holds_is_deleted_only_after_the_index() {
    let (_st, port) = registry("");
    let (config, layer) = (br#"{"architecture":"arm64","os":"linux"}"#.to_vec(), b"child".repeat(300));
    upload(port, &[], "idx/app", &config);
    upload(port, &[], "idx/app", &layer);
    let m = manifest(&config, &layer);
    let d = digest_of(&m);
    assert_eq!(put_manifest(port, &[], "idx/app", &d, &m).status, 201);
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":{},"platform":{{"architecture":"arm64","os":"linux"}}}}]}}"#,
        m.len()
    );
    let ct = [("Content-Type", "application/vnd.oci.image.index.v1+json")];
    let a = http(port, "PUT", "/v2/idx/app/manifests/multi", &ct, index.as_bytes());
    assert_eq!(a.status, 201, "{}", body(&a));
    let child = format!("/v2/idx/app/manifests/{d}");
    // A layer's digest names no manifest: unknown, as distribution answers it.
    let as_manifest = http(port, "DELETE", &format!("/v2/idx/app/manifests/{}", digest_of(&layer)), &[], b"");
    assert_eq!(as_manifest.status, 404, "{}", body(&as_manifest));
    let refused = http(port, "DELETE", &child, &[], b"");
    assert_eq!(refused.status, 409, "{}", body(&refused));
    assert!(body(&refused).contains("idx/app:multi"), "{}", body(&refused));
    assert_eq!(http(port, "GET", &child, &[], b"").status, 200, "still there, as said");
    assert_eq!(http(port, "DELETE", "/v2/idx/app/manifests/multi", &[], b"").status, 202);
    assert_eq!(http(port, "DELETE", &child, &[], b"").status, 202);
    assert_eq!(http(port, "GET", &child, &[], b"").status, 404);
}

/// Repository names in routes follow distribution's grammar (no `a..b`, no host part), and the
/// catalog lists only names a client can ask for: an image kept as `HOST:PORT/NAME` is not one.
#[test]
fn routes_take_distribution_s_names_and_the_catalog_lists_only_those() {
    let (st, port) = registry("");
    let (config, layer) = (br#"{"architecture":"amd64","os":"linux"}"#.to_vec(), b"named".repeat(300));
    upload(port, &[], "cat/app", &config);
    upload(port, &[], "cat/app", &layer);
    assert_eq!(put_manifest(port, &[], "cat/app", "v1", &manifest(&config, &layer)).status, 201);
    st.ok(&["image", "tag", "cat/app:v1", "127.0.0.1:5000/cat/app:v1"]);
    st.ok(&["image", "tag", "cat/app:v1", "registry.example.com/cat/app:v1"]);
    let a = http(port, "GET", "/v2/_catalog", &[], b"");
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["repositories"], serde_json::json!(["cat/app", "registry.example.com/cat/app"]));
    for bad in ["/v2/a..b/x/tags/list", "/v2/a..b/x/manifests/t", "/v2/Cat/app/tags/list"] {
        let a = http(port, "GET", bad, &[], b"");
        assert!(a.status == 400 || a.status == 404, "{bad}: {}", a.status);
        assert_ne!(a.status, 200, "{bad}");
    }
}
