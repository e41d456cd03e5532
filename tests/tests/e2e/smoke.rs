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

/// Each cairnd keeps its SSH master sockets in a directory of the temporary directory named by
/// its pid: one a daemon left (it did not stop cleanly) is removed when a daemon starts, and a
/// daemon that stops removes its own — the temporary directory does not fill with them.
#[test]
fn ssh_directories_of_gone_daemons_are_removed_and_a_stopping_daemon_removes_its_own() {
    let uid = nix::unistd::geteuid();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let left = std::env::temp_dir().join(format!("cairn-ssh-{uid}-{dead}"));
    std::fs::create_dir_all(&left).unwrap();
    std::fs::write(left.join("known-hosts-x"), "x").unwrap();
    let mut st = TestStore::start();
    assert!(!left.exists(), "the gone daemon's directory was removed at start");
    assert!(st.log().contains("removed SSH directories left by stopped daemons"), "{}", st.log());
    let own = std::env::temp_dir().join(format!("cairn-ssh-{uid}-{}", st.pid()));
    std::fs::create_dir_all(&own).unwrap();
    st.terminate();
    assert!(!own.exists(), "the stopping daemon removed its own");
}
