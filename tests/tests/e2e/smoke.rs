//! The shortest path through the real binaries: add, query, dump, stop.

use cairn_tests::{line, TestStore};

#[test]
fn add_query_dump_and_graceful_stop() {
    let mut s = TestStore::builder().store_dir("/nix/store").start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("srcx")).unwrap();
    std::fs::create_dir(dir.path().join("srcx/d")).unwrap();
    std::fs::write(dir.path().join("srcx/d/f"), b"a\n").unwrap();
    let path = line(&s.ok(&["add", dir.path().join("srcx").to_str().unwrap()]));
    // The same tree under Nix 2.8 (`nix-store --add srcx`).
    assert_eq!(path, "/nix/store/fmdjhp489wgbbl1j46l4mykv9ndsbr4c-srcx");
    let info: serde_json::Value = serde_json::from_str(&s.ok(&["path-info", "--json", &path])).unwrap();
    // `nix-store --dump srcx | wc -c` with Nix 2.8.
    assert_eq!(info[0]["narSize"], 456);
    let nar = s.ok_bytes(&["nar", "dump", &path], b"");
    assert_eq!(nar.len(), 456);
    assert_eq!(s.ok(&["cat", &format!("{path}/d/f")]), "a\n");
    s.stop();
    assert!(s.log().contains("SIGTERM"), "{}", s.log());
}
