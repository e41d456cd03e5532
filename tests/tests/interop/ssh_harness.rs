//! The harness's sshd (`cairn_tests::sshd`), which the remote-build tests over `ssh-ng://`
//! trust to be what they think: a server that lets in the harness's client key and proves its
//! own host key, so that a failure there is cairn's and not the harness's.
//!
//! Needs `sshd` and `ssh` (`openssh-server`, `openssh-client`).

use std::process::{Command, Output, Stdio};

use cairn_tests::sshd::Sshd;
use cairn_tests::{require_peer, utf8};

/// `ssh -F <config> <alias> <command>`, with nothing of this user's ssh setup.
fn ssh(config: &std::path::Path, alias: &str, command: &str) -> Output {
    Command::new("ssh").arg("-F").arg(config).arg(alias).arg(command).stdin(Stdio::null()).output().unwrap()
}

#[test]
fn the_test_sshd_accepts_only_its_client_key_and_proves_its_host_key() {
    if !require_peer("sshd") || !require_peer("ssh") {
        return;
    }
    let sshd = Sshd::start();

    let config = sshd.ssh_config("builder");
    let out = ssh(&config, "builder", "true");
    assert!(out.status.success(), "ssh failed:\n{}\nsshd's log:\n{}", String::from_utf8_lossy(&out.stderr), sshd.log());

    // The same config with another client key: root is not let in.
    let work = tempfile::tempdir().unwrap();
    let intruder = work.path().join("intruder");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&intruder)
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(keygen.success());
    let intruder_config = work.path().join("ssh_config");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&intruder_config, text.replace(utf8(sshd.client_key()), utf8(&intruder))).unwrap();
    let out = ssh(&intruder_config, "builder", "true");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sshd let in a key it was not given:\n{err}");
    assert!(err.contains("Permission denied (publickey)"), "{err}");

    // Another host key in the client's known hosts: the server is not trusted.
    let impostor = sshd.wrong_host_key_config("builder");
    let out = ssh(&impostor, "builder", "true");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ssh accepted a host key it was not given:\n{err}");
    assert!(err.contains("Host key verification failed"), "{err}");
}
