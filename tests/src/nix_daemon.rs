//! A real `nix-daemon` 2.8 on a private store (logical `/nix/store` under a private root), the
//! reference cairn's daemon is compared with, and the remote end of the remote-build tests.
//! Needs Nix 2.8 (`nix-bin`) and a static busybox as the builders' `/bin/sh`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::write_exec;

/// What the daemon builds with; the interop tests give cairnd the same settings, so that both
/// daemons build alike.
pub const NIX_DAEMON_CONFIG: &str = "build-users-group =\nsubstituters =\nsandbox = true\n\
    sandbox-paths = /bin/sh=/bin/busybox\nmax-jobs = 2\nexperimental-features = nix-command\n";

/// A real nix-daemon on a private store. Killed when dropped.
pub struct NixDaemon {
    dir: tempfile::TempDir,
    child: Child,
    stdio_program: OnceLock<PathBuf>,
}

impl NixDaemon {
    /// A daemon with [`NIX_DAEMON_CONFIG`].
    pub fn start() -> NixDaemon {
        NixDaemon::start_with("")
    }

    /// A daemon with [`NIX_DAEMON_CONFIG`] and then `extra_conf` (nix.conf lines; later lines win).
    pub fn start_with(extra_conf: &str) -> NixDaemon {
        let dir = tempfile::Builder::new().prefix("nix-daemon-peer-").tempdir().unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("nix.conf"), format!("{NIX_DAEMON_CONFIG}{extra_conf}\n")).unwrap();
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let child = Command::new("nix-daemon")
            .arg("--store")
            .arg(store_url(dir.path()))
            .env_clear()
            .envs(environment(dir.path()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start nix-daemon");
        let d = NixDaemon { dir, child, stdio_program: OnceLock::new() };
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(d.socket()).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "nix-daemon did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// The daemon's socket (for `unix://` store URLs).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("state/daemon-socket/socket")
    }

    /// The store's root: the logical `/nix/store` is `<root>/nix/store`.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// An executable that serves this store on stdin/stdout (`nix-daemon --stdio`), with the
    /// daemon's own settings and state: the remote program of an `ssh-ng://` store, so that an
    /// ssh session reaches this store rather than the host's. It ignores its arguments, since
    /// Nix and cairn append `--stdio` to a remote program.
    pub fn stdio_program(&self) -> PathBuf {
        self.stdio_program
            .get_or_init(|| {
                // `env -i` rather than the caller's environment: an sshd session sets its own
                // (USER, SHELL, SSH_*, another PATH), which must not change what the daemon does.
                let mut script = String::from("#!/bin/sh\nexec env -i");
                for (key, value) in environment(self.dir.path()) {
                    script.push_str(&format!(" {key}={}", shell_quote(&value.to_string_lossy())));
                }
                // `env` finds nix-daemon on the PATH just given: the daemon's own.
                script.push_str(&format!(" nix-daemon --stdio --store {}\n", shell_quote(&store_url(self.dir.path()))));
                let path = self.dir.path().join("nix-daemon-stdio");
                write_exec(&path, script.as_bytes());
                path
            })
            .clone()
    }
}

impl Drop for NixDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("chmod").args(["-R", "u+w"]).arg(self.dir.path()).status();
    }
}

/// The store the daemon in `dir` serves.
fn store_url(dir: &Path) -> String {
    format!("local?root={}", dir.join("root").display())
}

/// The whole environment of the daemon in `dir` (and of its stdio program): nothing of the
/// caller's but PATH, so that neither the host's Nix settings nor its state leak in.
fn environment(dir: &Path) -> Vec<(&'static str, OsString)> {
    vec![
        ("PATH", std::env::var_os("PATH").unwrap_or_default()),
        ("HOME", dir.into()),
        ("NIX_CONF_DIR", dir.join("conf").into()),
        ("NIX_STATE_DIR", dir.join("state").into()),
        ("NIX_LOG_DIR", dir.join("log").into()),
    ]
}

/// `s` as one word for `/bin/sh`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
