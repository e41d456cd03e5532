//! Binary caches in S3-compatible object storage: a real Garage server (one node on loopback,
//! started here), written by `cairn copy --to s3://…` and substituted from by another cairnd.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_e2e::{free_port, line, require_peer, wait_listening, write, TestStore};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A one-node Garage with a bucket and a key; killed when dropped.
struct Garage {
    _dir: tempfile::TempDir,
    config: PathBuf,
    child: Child,
    s3_port: u16,
    key_id: String,
    secret: String,
}

impl Garage {
    fn start(bucket: &str) -> Garage {
        let dir = tempfile::tempdir().unwrap();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let secret: String = (0..32).map(|i| format!("{:02x}", (i * 37 + 11) as u8)).collect();
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\nadmin_token = \"test-admin-token\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new("garage")
            .arg("-c")
            .arg(&config)
            .arg("server")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut g = Garage { _dir: dir, config, child, s3_port: s3, key_id: String::new(), secret: String::new() };
        let started = Instant::now();
        let id = loop {
            let out = g.cmd(&["node", "id", "-q"]);
            if out.status.success() {
                break String::from_utf8_lossy(&out.stdout).trim().split('@').next().unwrap().to_owned();
            }
            assert!(started.elapsed() < Duration::from_secs(30), "garage did not start");
            std::thread::sleep(Duration::from_millis(200));
        };
        // `node id` reads the key on disk; the RPC and S3 ports open a little later.
        wait_listening(rpc);
        wait_listening(s3);
        let started = Instant::now();
        while !g.cmd(&["layout", "assign", "-z", "dc1", "-c", "1G", &id]).status.success() {
            assert!(started.elapsed() < Duration::from_secs(30), "garage layout assign kept failing");
            std::thread::sleep(Duration::from_millis(200));
        }
        g.ok(&["layout", "apply", "--version", "1"]);
        g.ok(&["bucket", "create", bucket]);
        let key = g.ok(&["key", "create", "cairn-test"]);
        let field = |name: &str| {
            key.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned()).expect("key output")
        };
        g.key_id = field("Key ID:");
        g.secret = field("Secret key:");
        g.ok(&["bucket", "allow", "--read", "--write", "--owner", bucket, "--key", "cairn-test"]);
        g
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("garage").arg("-c").arg(&self.config).args(args).stdin(Stdio::null()).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(out.status.success(), "garage {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn closures_round_trip_through_s3() {
    if !require_peer("garage") {
        return;
    }
    let garage = Garage::start("nix-cache");
    let url = format!("s3://nix-cache?endpoint=http://127.0.0.1:{}&region=garage", garage.s3_port);
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
