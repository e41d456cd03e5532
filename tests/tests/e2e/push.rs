//! `cairn copy --to tcp://HOST:PORT`: closures pushed into another cairnd over TCP, only what it
//! lacks, and only paths one of its trusted keys signed.

use cairn_tests::{free_port, line, wait_listening, write, TestStore};

use cairn_tests::utf8 as s;

#[test]
fn push_sends_only_missing_signed_paths() {
    let dir = tempfile::tempdir().unwrap();
    // Paths without a content address (imported), which only a signature can vouch for.
    let seed = TestStore::start();
    write(&dir.path().join("lib/data"), &vec![3u8; 300_000]);
    let lib = line(&seed.ok(&["add", s(&dir.path().join("lib"))]));
    write(&dir.path().join("app"), format!("#!/bin/sh\n# uses {lib}\n").as_bytes());
    let app = line(&seed.ok(&["add-text", "app", s(&dir.path().join("app")), "--ref", &lib]));
    let sender = TestStore::start();
    sender.ok_bytes(&["import"], &seed.ok_bytes(&["export", &lib, &app], b""));
    let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
    sender.ok(&["key", "generate", "node-a-1", s(&sk), s(&pk)]);
    let public = std::fs::read_to_string(&pk).unwrap();

    let port = free_port();
    let receiver = TestStore::builder()
        .config(&format!(
            "listen = \"127.0.0.1:{port}\"\naccept-pushes = true\ntrusted-public-keys = [\"{}\"]",
            public.trim()
        ))
        .start();
    wait_listening(port);
    let to = format!("tcp://127.0.0.1:{port}");

    // Unsigned paths are refused, whatever require-sigs says, and nothing is registered.
    let err = sender.fail(&["copy", "--to", &to, &app], b"");
    assert!(err.contains("not signed"), "{err}");
    assert!(receiver.store_entries().is_empty());

    // Signed: the whole closure arrives, identical.
    let out = sender.ok(&["copy", "--json", "--to", &to, "--secret-key-file", s(&sk), &lib]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["copied"].as_u64(), v["skipped"].as_u64()), (Some(1), Some(0)), "{v}");
    let out = sender.ok(&["copy", "--json", "--to", &to, "--secret-key-file", s(&sk), &app]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["copied"].as_u64(), v["skipped"].as_u64()), (Some(1), Some(1)), "only the missing path: {v}");
    let ours: serde_json::Value =
        serde_json::from_str(&sender.ok(&["path-info", "--json", "--closure", &app])).unwrap();
    let theirs: serde_json::Value =
        serde_json::from_str(&receiver.ok(&["path-info", "--json", "--closure", &app])).unwrap();
    for (a, b) in ours.as_array().unwrap().iter().zip(theirs.as_array().unwrap()) {
        for k in ["path", "narHash", "narSize", "references"] {
            assert_eq!(a[k], b[k], "{k}");
        }
    }
    receiver.ok(&["verify", "--check-contents"]);
    let v: serde_json::Value =
        serde_json::from_str(&sender.ok(&["copy", "--json", "--to", &to, "--secret-key-file", s(&sk), &app])).unwrap();
    assert_eq!(v["copied"].as_u64(), Some(0), "{v}");

    // Signed by a key the receiver does not trust: refused; content-addressed paths need no key.
    let (sk2, pk2) = (dir.path().join("sk2"), dir.path().join("pk2"));
    sender.ok(&["key", "generate", "stranger-1", s(&sk2), s(&pk2)]);
    write(&dir.path().join("tree2/f"), b"input-addressed by import\n");
    let t2 = line(&seed.ok(&["add", s(&dir.path().join("tree2"))]));
    sender.ok_bytes(&["import"], &seed.ok_bytes(&["export", &t2], b""));
    let err = sender.fail(&["copy", "--to", &to, "--secret-key-file", s(&sk2), &t2], b"");
    assert!(err.contains("trusted key"), "{err}");
    assert!(!receiver.ok(&["path-info", "--json", &app]).contains(&t2[7..]));
    write(&dir.path().join("other"), b"other\n");
    let other = line(&sender.ok(&["add-text", "other", s(&dir.path().join("other"))]));
    sender.ok(&["copy", "--to", &to, &other]);
    receiver.ok(&["path-info", &other]);

    // A daemon without accept-pushes does not take pushes, and says what is needed.
    let port2 = free_port();
    let closed = TestStore::builder().config(&format!("listen = \"127.0.0.1:{port2}\"")).start();
    wait_listening(port2);
    let err = sender.fail(&["copy", "--to", &format!("tcp://127.0.0.1:{port2}"), &lib], b"");
    assert!(err.contains("accept-pushes"), "{err}");
    assert!(closed.store_entries().is_empty());
}

#[test]
fn copy_to_another_daemons_socket_sends_only_what_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let a = TestStore::start();
    write(&dir.path().join("lib/data"), &vec![1u8; 100_000]);
    let lib = line(&a.ok(&["add", s(&dir.path().join("lib"))]));
    write(&dir.path().join("app"), format!("uses {lib}\n").as_bytes());
    let app = line(&a.ok(&["add-text", "app", s(&dir.path().join("app")), "--ref", &lib]));
    let b = TestStore::start();
    let to = format!("unix://{}", b.socket.display());
    let v: serde_json::Value = serde_json::from_str(&a.ok(&["copy", "--json", "--to", &to, &lib])).unwrap();
    assert_eq!((v["copied"].as_u64(), v["skipped"].as_u64()), (Some(1), Some(0)), "{v}");
    let v: serde_json::Value = serde_json::from_str(&a.ok(&["copy", "--json", "--to", &to, &app])).unwrap();
    assert_eq!((v["copied"].as_u64(), v["skipped"].as_u64()), (Some(1), Some(1)), "{v}");
    // Everything an export stream would lose arrives too (content addresses here).
    let ours: serde_json::Value = serde_json::from_str(&a.ok(&["path-info", "--json", "--closure", &app])).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&b.ok(&["path-info", "--json", "--closure", &app])).unwrap();
    for (x, y) in ours.as_array().unwrap().iter().zip(theirs.as_array().unwrap()) {
        for k in ["path", "narHash", "narSize", "references", "ca", "signatures", "deriver"] {
            assert_eq!(x[k], y[k], "{k}");
        }
        assert!(x["ca"].is_string(), "{x}");
    }
    let v: serde_json::Value = serde_json::from_str(&a.ok(&["copy", "--json", "--to", &to, &app])).unwrap();
    assert_eq!(v["copied"].as_u64(), Some(0), "{v}");
    b.ok(&["verify", "--check-contents"]);
    // Another store directory: refused, in one line.
    let nix = TestStore::builder().store_dir("/nix/store").start();
    let err = a.fail(&["copy", "--to", &format!("unix://{}", nix.socket.display()), &app], b"");
    assert!(err.contains("store directory"), "{err}");
    assert!(nix.store_entries().is_empty());
}
