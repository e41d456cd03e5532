//! The CLI's surface without a daemon: help on every verb, usage errors exit 2.

use std::process::Command;

fn cairn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
}

#[test]
fn every_verb_has_help() {
    for verb in [
        "add",
        "add-text",
        "path-info",
        "references",
        "referrers",
        "closure",
        "referrers-closure",
        "graph",
        "ls",
        "cat",
        "nar",
        "export",
        "import",
        "daemon",
        "version",
    ] {
        let out = cairn().args([verb, "--help"]).output().unwrap();
        assert!(out.status.success(), "{verb} --help");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage:"), "{verb}");
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(cairn().arg("frobnicate").output().unwrap().status.code(), Some(2));
    assert_eq!(cairn().args(["add"]).output().unwrap().status.code(), Some(2));
    assert_eq!(cairn().args(["graph", "--dot", "--json", "/store/x"]).output().unwrap().status.code(), Some(2));
}

#[test]
fn no_daemon_and_no_auto_start_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = cairn()
        .args(["--root", dir.path().to_str().unwrap(), "--no-auto-start", "--config", "/dev/null", "closure"])
        .arg("/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("cairn: no cairnd is listening on"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1);
}
