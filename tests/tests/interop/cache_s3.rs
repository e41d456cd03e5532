//! S3 binary caches against a real Garage server (one node on loopback, started here and killed
//! on drop): `cairn copy --to s3://…` writes a signed cache (only what the bucket lacks; NARs
//! large enough for multipart uploads; a prefix and another compression), another cairnd
//! substitutes the closure from the bucket with the key trusted, real Nix 2.8 reads the same
//! objects through Garage's website endpoint (Nix has no S3 here), and a cairnd that
//! substituted from S3 serves the paths on to Nix with the writer's signatures intact. Missing,
//! wrong or untrusted credentials and keys fail in one line, soon.
//!
//! Needs `garage` (Garage 2.x) on PATH; `.ci/run` installs it.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use cairn_tests::garage::{Garage, BUCKET};
use cairn_tests::{
    free_port, line, path_info_fields as metadata, path_info_summary as infos, require_peer, wait_listening, write,
    NixStore, Rng, TestStore,
};
use serde_json::Value;

use cairn_tests::utf8 as s;

const FIELDS: &[&str] = &["narHash", "narSize", "references", "ca", "deriver"];

/// `cairn ARGS` for `st`'s daemon with extra environment variables (the daemon's own
/// environment is not changed).
fn cairn_with_env(st: &TestStore, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = st.cairn();
    c.envs(env.iter().copied()).args(args).stdin(Stdio::null());
    c.output().unwrap()
}

/// Asserts exit code 1 with a one-line `cairn: ` error; returns it.
fn one_line_failure(out: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{what} should fail; stderr:\n{err}");
    let last = err.trim_end().lines().last().unwrap_or("").to_owned();
    assert!(last.starts_with("cairn: "), "{what}:\n{err}");
    last
}

#[test]
fn closures_travel_through_garage_to_cairn_and_nix() {
    if !require_peer("garage") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let garage = Garage::start();
    let creds = [("AWS_ACCESS_KEY_ID", garage.key_id.as_str()), ("AWS_SECRET_ACCESS_KEY", garage.secret.as_str())];
    let url = garage.url("", "");

    // The writer: input-addressed paths (only signatures vouch for them, imported from a
    // scratch store), a content-addressed tree with 12 MB of incompressible data (a multipart
    // upload), and a note over both. Store directory /nix/store, for Nix.
    let scratch = TestStore::builder().store_dir("/nix/store").start();
    write(&work.path().join("ia/lib/data"), &Rng::new(1).bytes(200_000));
    cairn_tests::write_exec(&work.path().join("ia/bin/run"), b"#!/bin/sh\necho run\n");
    let ia_tree = line(&scratch.ok(&["add", s(&work.path().join("ia"))]));
    write(&work.path().join("ia-note"), format!("needs {ia_tree}\n").as_bytes());
    let ia_note = line(&scratch.ok(&["add-text", "ia-note", s(&work.path().join("ia-note")), "--ref", &ia_tree]));
    let writer = TestStore::builder().store_dir("/nix/store").start();
    writer.ok_bytes(&["import"], &scratch.ok_bytes(&["export", &ia_tree, &ia_note], b""));
    write(&work.path().join("big/blob"), &Rng::new(2).bytes(12 << 20));
    std::os::unix::fs::symlink("blob", work.path().join("big/link")).unwrap();
    let big = line(&writer.ok(&["add", s(&work.path().join("big"))]));
    write(&work.path().join("top"), format!("{big}\n{ia_note}\n").as_bytes());
    let top = line(&writer.ok(&["add-text", "top", s(&work.path().join("top")), "--ref", &big, "--ref", &ia_note]));
    let (sk, pk) = (work.path().join("sk"), work.path().join("pk"));
    writer.ok(&["key", "generate", "s3-writer-1", s(&sk), s(&pk)]);
    let public = std::fs::read_to_string(&pk).unwrap().trim().to_owned();
    let ours_json = writer.ok_bytes(&["path-info", "--json", "--closure", &top], b"");
    let ours = metadata(&ours_json, FIELDS);
    assert_eq!(ours.len(), 4);

    // The CLI reads the credentials from its own environment (the daemon has none): part of
    // the closure first, then all of it — only what the bucket lacks is written.
    let copy = |paths: &[&str]| -> Value {
        let mut args = vec!["copy", "--json", "--to", &url, "--secret-key-file", s(&sk)];
        args.extend_from_slice(paths);
        let out = cairn_with_env(&writer, &creds, &args);
        assert!(out.status.success(), "copy --to s3: {}\n{}", String::from_utf8_lossy(&out.stderr), writer.log());
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = copy(&[&ia_tree]);
    assert_eq!((v["copied"].as_u64(), v["skipped"].as_u64()), (Some(1), Some(0)), "{v}");
    garage.wait_objects(3); // nix-cache-info, one narinfo, one NAR
    let v = copy(&[&top]);
    assert_eq!((v["copied"].as_u64(), v["skipped"].as_u64()), (Some(3), Some(1)), "{v}");
    assert!(v["bytes"].as_u64().unwrap() > 12 << 20, "{v}");
    garage.wait_objects(9);
    let v = copy(&[&top]);
    assert_eq!((v["copied"].as_u64(), v["skipped"].as_u64(), v["bytes"].as_u64()), (Some(0), Some(4), Some(0)));
    garage.wait_objects(9);
    // A second cache under a prefix of the same bucket, uncompressed.
    let plain_url = garage.url("/plain", "&compression=none");
    let out = cairn_with_env(&writer, &creds, &["copy", "--to", &plain_url, "--secret-key-file", s(&sk), &top]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("copied 4 paths"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    garage.wait_objects(18);

    // Another cairnd, credentials in its environment and the key trusted, substitutes the
    // closure from each cache: identical metadata, the writer's signature, the same bytes.
    let trusting = format!("trusted-public-keys = [\"{public}\"]\n");
    let reader_port = free_port();
    let reader = TestStore::builder()
        .store_dir("/nix/store")
        .env(creds[0].0, creds[0].1)
        .env(creds[1].0, creds[1].1)
        .config(&format!("{trusting}listen = \"127.0.0.1:{reader_port}\"\n"))
        .start();
    assert_eq!(reader.ok(&["substitute", "--from", &url, &top]), format!("{top}\n"));
    let theirs_json = reader.ok_bytes(&["path-info", "--json", "--closure", &top], b"");
    assert_eq!(metadata(&theirs_json, FIELDS), ours);
    assert_eq!(infos(&theirs_json), infos(&ours_json));
    for (p, m) in metadata(&theirs_json, &["signatures"]) {
        let sigs = m["signatures"].as_array().unwrap_or_else(|| panic!("{p} unsigned"));
        assert!(sigs.iter().any(|s| s.as_str().unwrap().starts_with("s3-writer-1:")), "{p}: {sigs:?}");
    }
    reader.ok(&["verify", "--check-contents"]);
    for p in [&big, &ia_tree, &top] {
        assert!(reader.ok_bytes(&["nar", "dump", p], b"") == writer.ok_bytes(&["nar", "dump", p], b""), "{p}");
    }
    let plain_reader = TestStore::builder()
        .store_dir("/nix/store")
        .env(creds[0].0, creds[0].1)
        .env(creds[1].0, creds[1].1)
        .config(&trusting)
        .start();
    plain_reader.ok(&["copy", "--from", &plain_url, &top]);
    assert_eq!(metadata(&plain_reader.ok_bytes(&["path-info", "--json", "--closure", &top], b""), FIELDS), ours);
    plain_reader.ok(&["verify", "--check-contents"]);
    // The bucket as a configured substituter (not `--from`), with the credentials and the key
    // in the daemon's environment and config. (From the former cache_s3.rs.)
    let configured = TestStore::builder()
        .store_dir("/nix/store")
        .env(creds[0].0, creds[0].1)
        .env(creds[1].0, creds[1].1)
        .config(&format!("{trusting}substituters = [\"{url}\"]\n"))
        .start();
    assert_eq!(configured.ok(&["substitute", &top]), format!("{top}\n"));
    assert_eq!(metadata(&configured.ok_bytes(&["path-info", "--json", "--closure", &top], b""), FIELDS), ours);
    configured.ok(&["verify", "--check-contents"]);

    // Real Nix reads what cairn wrote, over Garage's website endpoint, checking the writer's
    // signatures, file hashes and sizes; and takes the paths from the reader's listener too,
    // where the writer's signatures were kept (the reader has no key of its own).
    if require_peer("nix") {
        wait_listening(reader_port);
        for from in [garage.web_url(""), garage.web_url("/plain"), format!("http://127.0.0.1:{reader_port}")] {
            let nix = NixStore::new();
            let out = nix
                .cmd("nix")
                .args(["copy", "--from", &from, "--option", "trusted-public-keys", &public, &top])
                .output()
                .unwrap();
            assert!(out.status.success(), "nix copy --from {from}: {}", String::from_utf8_lossy(&out.stderr));
            let nix_json = nix.ok("nix", &["path-info", "--json", "--recursive", &top]);
            assert_eq!(infos(&nix_json), infos(&ours_json), "{from}");
            assert_eq!(metadata(&nix_json, FIELDS), ours, "{from}");
            assert_eq!(nix.ok("nix", &["store", "dump-path", &big]), writer.ok_bytes(&["nar", "dump", &big], b""));
        }
        // Not trusting the writer's key, Nix refuses the input-addressed paths.
        let out = NixStore::new()
            .cmd("nix")
            .args([
                "copy",
                "--from",
                &garage.web_url(""),
                "--option",
                "trusted-public-keys",
                "x-1:up1w+p9hbiFiyds3XlVGeZ3VPMC2rkO4TNTtYkEN+Qo=",
                &ia_note,
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("lacks a valid signature"));
    }

    // Refusals, each in one line and soon. The key not trusted: the input-addressed paths
    // are refused and nothing that needs them is registered.
    let untrusting =
        TestStore::builder().store_dir("/nix/store").env(creds[0].0, creds[0].1).env(creds[1].0, creds[1].1).start();
    let started = Instant::now();
    let err = one_line_failure(&untrusting.run(&["substitute", "--from", &url, &ia_note], b""), "untrusted key");
    assert!(err.contains("trusted-public-keys"), "{err}");
    for p in [&ia_note, &ia_tree] {
        assert!(!untrusting.run(&["path-info", p], b"").status.success(), "{p} registered unsigned");
    }
    // The same through a configured substituter.
    let untrusting_configured = TestStore::builder()
        .store_dir("/nix/store")
        .env(creds[0].0, creds[0].1)
        .env(creds[1].0, creds[1].1)
        .config(&format!("substituters = [\"{url}\"]\n"))
        .start();
    let err = untrusting_configured.fail(&["substitute", &ia_note], b"");
    assert!(err.contains("trusted-public-keys"), "{err}");
    assert!(untrusting_configured.store_entries().is_empty());
    // Content-addressed paths prove themselves.
    assert_eq!(untrusting.ok(&["substitute", "--from", &url, &big]), format!("{big}\n"));
    // Wrong credentials, a bucket that does not exist, no credentials at all (the instance
    // metadata service pointed at a closed port, so that no real one is asked).
    let closed = format!("http://127.0.0.1:{}", free_port());
    let zeros = "0".repeat(64);
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String);
    let cases: Vec<Case> = vec![
        ("wrong secret", vec![creds[0], ("AWS_SECRET_ACCESS_KEY", zeros.as_str())], url.clone()),
        ("unknown key", vec![("AWS_ACCESS_KEY_ID", "GK000000000000000000000000"), creds[1]], url.clone()),
        ("no such bucket", creds.to_vec(), url.replace(BUCKET, "no-such-bucket")),
        ("no credentials", vec![("AWS_METADATA_ENDPOINT", closed.as_str())], url.clone()),
    ];
    for (what, env, cache) in &cases {
        let mut b = TestStore::builder().store_dir("/nix/store").config(&trusting);
        for (k, v) in env {
            b = b.env(k, v);
        }
        let st = b.start();
        let err = one_line_failure(&st.run(&["substitute", "--from", cache, &top], b""), what);
        assert!(err.contains(if *what == "no such bucket" { "no-such-bucket" } else { BUCKET }), "{what}: {err}");
        assert!(st.store_entries().is_empty(), "{what}: {:?}", st.store_entries());
        // And writing with such credentials.
        let mut c = writer.cairn();
        c.env_remove("AWS_ACCESS_KEY_ID").env_remove("AWS_SECRET_ACCESS_KEY");
        c.envs(env.iter().copied()).args(["copy", "--to", cache, "--secret-key-file", s(&sk), &top]);
        let err = one_line_failure(&c.stdin(Stdio::null()).output().unwrap(), what);
        assert!(err.contains("s3") || err.contains(BUCKET) || err.contains("no-such-bucket"), "{what}: {err}");
    }
    garage.wait_objects(18);
    assert!(started.elapsed() < Duration::from_secs(30), "refusals took {:?}", started.elapsed());
}

/// A daemon without S3 credentials says that credentials are missing and where they come from,
/// instead of reporting the instance metadata service it fell back to (here a closed port, as
/// on any machine that is not a cloud instance).
#[test]
fn missing_s3_credentials_are_named() {
    if !require_peer("garage") {
        return;
    }
    let garage = Garage::start();
    let closed = format!("http://127.0.0.1:{}", free_port());
    let st = TestStore::builder().env("AWS_METADATA_ENDPOINT", &closed).start();
    let some = format!("/store/{}-x", "1".repeat(32));
    let err = one_line_failure(&st.run(&["substitute", "--from", &garage.url("", ""), &some], b""), "no credentials");
    assert!(err.contains("no S3 credentials") && err.contains("AWS_ACCESS_KEY_ID"), "{err}");
}
