//! A real OpenSSH server for the remote-build tests over `ssh-ng://`: one `sshd` on a loopback
//! port with its own host key, letting root in with one client key only. Clients reach it
//! through an ssh client config ([`Sshd::ssh_config`]) passed as `NIX_SSHOPTS="-F <file>"`,
//! since a store URL cannot name a port. Needs `openssh-server` and `openssh-client`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

use crate::free_port;

/// Where Debian's sshd is (it is not on every PATH; see [`crate::require_peer`]).
const SSHD: &str = "/usr/sbin/sshd";

/// A running sshd on `127.0.0.1:<port>`, with its keys, config and log in a temporary
/// directory. Killed when dropped.
pub struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    client_key: PathBuf,
    child: Child,
}

impl Sshd {
    /// Starts sshd and waits until it accepts connections; panics with its log if it exits.
    pub fn start() -> Sshd {
        let dir = tempfile::Builder::new().prefix("sshd-peer-").tempdir().unwrap();
        // sshd refuses to start without its privilege separation directory, which only the
        // openssh-server service creates (at boot, not at install).
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd (sshd's privilege separation directory)");
        keygen(&dir.path().join("host_ed25519"));
        let client_key = dir.path().join("client_ed25519");
        keygen(&client_key);
        let port = free_port();
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1:{port}\n\
                 HostKey {d}/host_ed25519\n\
                 AuthorizedKeysFile {d}/client_ed25519.pub\n\
                 PermitRootLogin prohibit-password\n\
                 AuthenticationMethods publickey\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 PidFile none\n\
                 LogLevel VERBOSE\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("sshd.log")).unwrap();
        // -E sends -e's log to the file; stdout and stderr go there too for anything before it.
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .arg("-E")
            .arg(dir.path().join("sshd.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        let mut s = Sshd { dir, port, client_key, child };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("sshd exited at start ({status}):\n{}", s.log());
            }
            assert!(started.elapsed() < Duration::from_secs(30), "sshd did not listen on {port}:\n{}", s.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The private key root logs in with (the only one sshd accepts).
    pub fn client_key(&self) -> &Path {
        &self.client_key
    }

    /// sshd's log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// The host's public key as a Nix machines file's `base64-ssh-public-host-key` field wants
    /// it: the base64 of its `ssh-ed25519 AAAA…` line.
    pub fn host_key_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.host_key_line())
    }

    /// Writes an ssh client config declaring `Host <alias>` as this server, as root with the
    /// client key, trusting only this server's host key; returns its path (for `ssh -F`).
    pub fn ssh_config(&self, alias: &str) -> PathBuf {
        self.client_config(alias, alias, &self.host_key_line())
    }

    /// Like [`Sshd::ssh_config`], but trusting another, freshly made host key instead: ssh must
    /// refuse the server ("Host key verification failed"). Nix given the right key in a
    /// machines file still connects: its `-oUserKnownHostsFile` wins over this file's.
    pub fn wrong_host_key_config(&self, alias: &str) -> PathBuf {
        let other = self.dir.path().join(format!("other_host_ed25519-{alias}"));
        keygen(&other);
        self.client_config(&format!("wrong-{alias}"), alias, &public_key_line(&other))
    }

    /// This server's public host key line (`ssh-ed25519 AAAA…`, without the comment).
    fn host_key_line(&self) -> String {
        public_key_line(&self.dir.path().join("host_ed25519"))
    }

    /// Writes `ssh_config-<name>` and its `known_hosts-<name>`, where `host_key` is trusted
    /// for this server under both names ssh may look it up by.
    fn client_config(&self, name: &str, alias: &str, host_key: &str) -> PathBuf {
        let d = self.dir.path();
        let known_hosts = d.join(format!("known_hosts-{name}"));
        std::fs::write(&known_hosts, format!("[127.0.0.1]:{} {host_key}\n{alias} {host_key}\n", self.port)).unwrap();
        let config = d.join(format!("ssh_config-{name}"));
        // HostKeyAlias: ssh looks the key up under the alias, not `[127.0.0.1]:<port>`, so that
        // the known-hosts file Nix writes from a machines file's host key (`<alias> <key>`,
        // given as `-oUserKnownHostsFile`, which wins over this file's) matches too.
        // GlobalKnownHostsFile: no key the host trusts system-wide counts.
        std::fs::write(
            &config,
            format!(
                "Host {alias}\n\
                 \tHostName 127.0.0.1\n\
                 \tPort {port}\n\
                 \tUser root\n\
                 \tIdentityFile {key}\n\
                 \tIdentitiesOnly yes\n\
                 \tHostKeyAlias {alias}\n\
                 \tUserKnownHostsFile {known_hosts}\n\
                 \tGlobalKnownHostsFile /dev/null\n\
                 \tStrictHostKeyChecking yes\n\
                 \tBatchMode yes\n",
                port = self.port,
                key = self.client_key.display(),
                known_hosts = known_hosts.display(),
            ),
        )
        .unwrap();
        config
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes a new ed25519 key pair: `path` (private, mode 0600 as ssh insists) and `path.pub`.
fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "cairn-tests", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen");
    assert!(out.status.success(), "ssh-keygen failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// The `<type> <base64 key>` of the public key beside private key `path`.
fn public_key_line(path: &Path) -> String {
    let mut public = path.as_os_str().to_owned();
    public.push(".pub");
    let line = std::fs::read_to_string(&public).unwrap();
    line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}
