//! Signing keys: what `cairn key generate` writes, real Nix 2.8 accepts, and the other way round.

use std::os::unix::fs::PermissionsExt;

use cairn_tests::{bin_dir, line, require_peer, write, NixStore, TestStore};

fn cairn(args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin_dir().join("cairn")).args(args).output().unwrap()
}

#[test]
fn keys_cairn_generates_sign_for_nix_and_nix_keys_read_in_cairn() {
    if !require_peer("nix-store") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = (dir.path().join("cairn.sec"), dir.path().join("cairn.pub"));
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let out = cairn(&["key", "generate", "cairn-test-1", &s(&sk), &s(&pk)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777, 0o600);
    let public = std::fs::read_to_string(&pk).unwrap();
    assert!(public.starts_with("cairn-test-1:"), "{public}");
    // Never overwrites a secret key.
    let again = cairn(&["key", "generate", "cairn-test-1", &s(&sk), &s(&pk)]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("a secret key is never overwritten"));
    assert_eq!(line(&String::from_utf8(cairn(&["key", "public", &s(&sk)]).stdout).unwrap()), public);

    // An input-addressed path in Nix (imported, so it has no content address that would make
    // signatures unnecessary), signed by Nix with cairn's key.
    let st = TestStore::builder().store_dir("/nix/store").start();
    write(&dir.path().join("f"), b"signed by a key cairn made\n");
    let p = line(&st.ok(&["add", &s(&dir.path().join("f"))]));
    let nix = NixStore::new();
    nix.ok_stdin("nix-store", &["--import"], &st.ok_bytes(&["export", &p], b""));
    let verify = |key: &str| {
        nix.cmd("nix")
            .args(["store", "verify", "--trusted-public-keys", key, "--sigs-needed", "1", &p])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(!verify(&public), "unsigned: untrusted");
    nix.ok("nix", &["store", "sign", "--key-file", &s(&sk), &p]);
    assert!(verify(&public), "Nix accepts the signature made with cairn's key");
    let other = dir.path().join("other");
    nix.ok("nix-store", &["--generate-binary-cache-key", "other-1", &s(&other), &s(&dir.path().join("other.pub"))]);
    let other_public = std::fs::read_to_string(dir.path().join("other.pub")).unwrap();
    assert!(!verify(&other_public), "another key does not vouch for it");

    // Nix's key pair, read by cairn: the same public key.
    assert_eq!(line(&String::from_utf8(cairn(&["key", "public", &s(&other)]).stdout).unwrap()), other_public.trim());
    let bad = cairn(&["key", "public", &s(&pk)]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("bytes, 64 expected"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
