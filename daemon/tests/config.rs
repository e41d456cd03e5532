//! cairnd's configuration surface: the shipped template, and refusal of unknown keys.

use std::process::Command;

fn cairnd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cairnd"))
}

#[test]
fn template_is_printed_and_accepted() {
    let out = cairnd().arg("--print-config-template").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("# trusted-users ="));
    cairn_api::config::ConfigFile::parse(&text, std::path::Path::new("template")).unwrap();
}

#[test]
fn unknown_keys_stop_the_daemon_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cairn.toml");
    std::fs::write(&cfg, "trusted-user = [\"root\"]\n").unwrap();
    let out =
        cairnd().args(["--root", dir.path().to_str().unwrap(), "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown key `trusted-user`; did you mean `trusted-users`?"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}
