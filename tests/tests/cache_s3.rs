//! Binary caches in S3-compatible object storage: a real Garage server (one node on loopback,
//! started here), written by `cairn copy --to s3://…` and substituted from by another cairnd.

use std::path::Path;

use cairn_e2e::garage::Garage;
use cairn_e2e::{line, require_peer, write, TestStore};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn closures_round_trip_through_s3() {
    if !require_peer("garage") {
        return;
    }
    let garage = Garage::start();
    let url = garage.url("", "");
    let creds = |b: cairn_e2e::TestStoreBuilder| {
        b.env("AWS_ACCESS_KEY_ID", &garage.key_id).env("AWS_SECRET_ACCESS_KEY", &garage.secret)
    };
    let dir = tempfile::tempdir().unwrap();
    // Imported paths (no content address): only the signature vouches for them.
    let scratch = TestStore::start();
    write(&dir.path().join("tree/data"), &vec![9u8; 2 << 20]);
    write(&dir.path().join("tree/bin/x"), b"#!/bin/sh\n");
    let tree = line(&scratch.ok(&["add", s(&dir.path().join("tree"))]));
    write(&dir.path().join("note"), format!("{tree}\n").as_bytes());
    let top = line(&scratch.ok(&["add-text", "note", s(&dir.path().join("note")), "--ref", &tree]));
    let writer = creds(TestStore::builder()).start();
    writer.ok_bytes(&["import"], &scratch.ok_bytes(&["export", &tree, &top], b""));
    let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
    writer.ok(&["key", "generate", "s3-cache-1", s(&sk), s(&pk)]);
    let public = std::fs::read_to_string(&pk).unwrap();

    let out = writer.run(&["copy", "--json", "--to", &url, "--secret-key-file", s(&sk), &top], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["copied"], 2, "{v}");
    let again: serde_json::Value =
        serde_json::from_str(&writer.ok(&["copy", "--json", "--to", &url, "--secret-key-file", s(&sk), &top])).unwrap();
    assert_eq!((again["copied"].as_u64(), again["skipped"].as_u64()), (Some(0), Some(2)), "{again}");

    // Another daemon substitutes the closure from the bucket, checking the signatures.
    let reader = creds(TestStore::builder())
        .config(&format!("substituters = [\"{url}\"]\ntrusted-public-keys = [\"{}\"]", public.trim()))
        .start();
    assert_eq!(reader.ok(&["substitute", &top]), format!("{top}\n"));
    let a: serde_json::Value = serde_json::from_str(&writer.ok(&["path-info", "--json", "--closure", &top])).unwrap();
    let b: serde_json::Value = serde_json::from_str(&reader.ok(&["path-info", "--json", "--closure", &top])).unwrap();
    for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
        for k in ["path", "narHash", "narSize", "references"] {
            assert_eq!(x[k], y[k], "{k}");
        }
    }
    reader.ok(&["verify", "--check-contents"]);
    // Not trusting the key: refused.
    let untrusting = creds(TestStore::builder()).config(&format!("substituters = [\"{url}\"]")).start();
    let err = untrusting.fail(&["substitute", &top], b"");
    assert!(err.contains("trusted-public-keys"), "{err}");
    assert!(untrusting.store_entries().is_empty());
    // Wrong credentials: a clear error, not a hang.
    let stranger = TestStore::builder()
        .env("AWS_ACCESS_KEY_ID", "GKnobody")
        .env("AWS_SECRET_ACCESS_KEY", "0000")
        .config(&format!("substituters = [\"{url}\"]\ntrusted-public-keys = [\"{}\"]", public.trim()))
        .start();
    let err = stranger.fail(&["substitute", &top], b"");
    assert!(err.contains("s3") || err.contains("nix-cache"), "{err}");
}
