//! The end-to-end harness: starts the real `cairnd` on a temporary root, runs the real `cairn`
//! against it, and drives real Nix 2.8 on a private store for comparisons.
//!
//! Binaries are taken from the cargo target directory this test binary lives in
//! (`target/<profile>/cairn` and `cairnd`; `cargo test --workspace` builds them because the
//! `cairn` and `cairn-daemon` packages have integration tests) or from `CAIRN_BIN_DIR`.
//!
//! Peer tests call [`require_peer`]: where the peer is missing they skip with a message, unless
//! `CAIRN_REQUIRE_PEERS=1` (set by `.ci/run`), where a missing peer fails the test.

pub mod fake_cache;
pub mod fake_registry;
pub mod garage;
pub mod nix_daemon;
pub mod oci;
pub mod sshd;

pub use nix_daemon::NixDaemon;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where `cairn` and `cairnd` are.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CAIRN_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>
    let dir = exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps").to_owned();
    for b in ["cairn", "cairnd"] {
        assert!(
            dir.join(b).exists(),
            "{} not found: run the tests with `cargo test --workspace`",
            dir.join(b).display()
        );
    }
    dir
}

/// Whether a peer tool is installed; fails instead of skipping when `CAIRN_REQUIRE_PEERS=1`.
///
/// Besides PATH, it looks in `/usr/sbin` and `/sbin`: daemons such as `sshd` live there, which
/// PATH often lacks, and the harness starts them by their absolute path anyway.
pub fn require_peer(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found =
        std::env::split_paths(&path).chain(["/usr/sbin", "/sbin"].map(PathBuf::from)).any(|d| d.join(tool).is_file());
    if !found {
        if std::env::var("CAIRN_REQUIRE_PEERS").as_deref() == Ok("1") {
            panic!("peer '{tool}' is required (CAIRN_REQUIRE_PEERS=1) but not installed; see .ci/run");
        }
        eprintln!("skipping: peer '{tool}' is not installed (set CAIRN_REQUIRE_PEERS=1 to make this a failure)");
    }
    found
}

/// A running `cairnd` on a private root. Killed when dropped.
pub struct TestStore {
    pub root: tempfile::TempDir,
    pub store_dir: String,
    pub socket: PathBuf,
    pub config: PathBuf,
    env: Vec<(String, String)>,
    /// The uid the daemon and every command run as (through `setpriv`), if not this process's.
    user: Option<u32>,
    /// Whether the root stays when the store is dropped (see [`TestStoreBuilder::root_in`]).
    keep_root: bool,
    child: Option<Child>,
}

/// Options for [`TestStore`].
pub struct TestStoreBuilder {
    store_dir: String,
    config: String,
    env: Vec<(String, String)>,
    user: Option<u32>,
    /// Where the root is made, and its name's prefix, if not a temporary directory.
    root_in: Option<(PathBuf, String)>,
}

impl TestStoreBuilder {
    pub fn store_dir(mut self, dir: &str) -> Self {
        self.store_dir = dir.to_owned();
        self
    }
    /// An environment variable for the daemon (and the CLI commands run through this store).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
    /// Contents of the daemon's config file.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = toml.to_owned();
        self
    }
    /// Runs the daemon and every command as user `uid` (and group of the same number), with
    /// `setpriv`, on a root that user owns: an unprivileged user's own store. Needs root.
    pub fn as_user(mut self, uid: u32) -> Self {
        self.user = Some(uid);
        self
    }
    /// Makes the root a fresh directory inside `parent`, its name starting with `prefix`, that
    /// stays when the store is dropped (nor is it made writable then): whoever owns `parent`
    /// removes it. For the benchmark, which keeps its stores under its work directory, on the
    /// file system it measures, and removes them all at the end, because a mass deletion
    /// between two runs would slow the next run's file creation (ext4 searches recently freed
    /// inodes).
    pub fn root_in(mut self, parent: &Path, prefix: &str) -> Self {
        self.root_in = Some((parent.to_owned(), prefix.to_owned()));
        self
    }
    pub fn start(self) -> TestStore {
        let root = match &self.root_in {
            None => tempfile::Builder::new().prefix("cairn-tests-").tempdir().expect("temp root"),
            Some((parent, prefix)) => {
                let mut root = tempfile::Builder::new().prefix(prefix).tempdir_in(parent).expect("root");
                root.disable_cleanup(true);
                root
            }
        };
        // World-traversable, so that tests that switch users can reach the socket.
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = root.path().join("cairn.toml");
        std::fs::write(&config, &self.config).unwrap();
        if let Some(uid) = self.user {
            let id = nix::unistd::Uid::from_raw(uid);
            let gid = nix::unistd::Gid::from_raw(uid);
            nix::unistd::chown(root.path(), Some(id), Some(gid)).unwrap();
            nix::unistd::chown(&config, Some(id), Some(gid)).unwrap();
        }
        let mut s = TestStore {
            socket: root.path().join("cairnd.sock"),
            root,
            store_dir: self.store_dir,
            config,
            env: self.env,
            user: self.user,
            keep_root: self.root_in.is_some(),
            child: None,
        };
        s.spawn();
        s
    }
}

impl TestStore {
    pub fn builder() -> TestStoreBuilder {
        TestStoreBuilder {
            store_dir: "/store".into(),
            config: String::new(),
            env: Vec::new(),
            user: None,
            root_in: None,
        }
    }

    /// A daemon with default settings and store directory `/store`.
    pub fn start() -> TestStore {
        TestStore::builder().start()
    }

    /// Flags that point a `cairn` or `cairnd` at this store.
    pub fn store_args(&self) -> Vec<String> {
        vec![
            "--root".into(),
            self.root.path().display().to_string(),
            "--store-dir".into(),
            self.store_dir.clone(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--config".into(),
            self.config.display().to_string(),
        ]
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = self
            .command(bin_dir().join("cairnd"))
            .args(self.store_args())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start cairnd");
        self.child = Some(child);
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("cairnd exited at start ({status}):\n{}", self.log());
            }
            assert!(started.elapsed() < Duration::from_secs(30), "cairnd did not listen:\n{}", self.log());
            // Short: the benchmark times the first query after a (re)start, which must not
            // find the daemon up for long.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("cairnd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Sends SIGTERM and waits; panics unless the daemon exits cleanly.
    pub fn stop(&mut self) {
        let status = self.terminate();
        assert!(status.success(), "cairnd exited with {status} after SIGTERM:\n{}", self.log());
    }

    /// Sends SIGTERM and waits, whatever the daemon exits with; returns that. Unlike
    /// [`TestStore::stop`] it does not judge the exit, and unlike dropping (SIGKILL) it lets
    /// the daemon finish its shutdown: the benchmark stops daemons so, so that no run pays for
    /// a previous daemon's work.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        child.wait().unwrap()
    }

    /// Whether the daemon was started and not stopped, crashed or terminated since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the daemon with SIGKILL (a crash) and waits for it.
    pub fn crash(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sets (or, with `None`, removes) an environment variable of the daemon from its next
    /// (re)start on, and of the commands run through this store.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_owned(), v.to_owned()));
        }
    }

    /// Whether the daemon's process has exited (killed, crashed, or stopped by itself) since
    /// it was started; it is still counted as started until [`TestStore::crash`] reaps it.
    pub fn has_exited(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Starts the daemon again on the same root.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or crash the daemon first");
        self.spawn();
    }

    /// A command for `program`, run as the store's user (see [`TestStoreBuilder::as_user`]).
    fn command(&self, program: PathBuf) -> Command {
        match self.user {
            None => Command::new(program),
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()])
                    .arg(program)
                    .env("HOME", self.root.path());
                c
            }
        }
    }

    /// Runs `cairn ARGS` as user nobody (uid/gid 65534) against this daemon, with `stdin`: an
    /// unprivileged client of a daemon that may be root's. Needs root.
    pub fn run_as_nobody(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.run_as(65534, args, stdin)
    }

    /// Runs `cairn ARGS` as user `uid` (and the group of the same number, with `setpriv`)
    /// against this daemon, with `stdin`. Needs root.
    pub fn run_as(&self, uid: u32, args: &[&str], stdin: &[u8]) -> Output {
        let mut c = Command::new("setpriv");
        c.args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()])
            .arg(bin_dir().join("cairn"))
            .args(self.store_args())
            .arg("--no-auto-start")
            .args(args)
            .env("HOME", "/nonexistent");
        output_with_stdin(&mut c, stdin)
    }

    /// A `cairn` command aimed at this daemon, never starting another.
    pub fn cairn(&self) -> Command {
        let mut c = self.command(bin_dir().join("cairn"));
        c.args(self.store_args()).arg("--no-auto-start").envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Runs `cairn ARGS` with `stdin`, returning its output.
    pub fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        output_with_stdin(self.cairn().args(args), stdin)
    }

    /// Runs `cairn ARGS`, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        String::from_utf8(self.ok_bytes(args, b"")).expect("utf-8 output")
    }

    /// Runs `cairn ARGS` with `stdin`, asserts success, returns stdout.
    pub fn ok_bytes(&self, args: &[&str], stdin: &[u8]) -> Vec<u8> {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "cairn {args:?} failed ({}):\n{}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        out.stdout
    }

    /// Runs `cairn ARGS` with `stdin`, asserts exit code 1 and a one-line error; returns it.
    pub fn fail(&self, args: &[&str], stdin: &[u8]) -> String {
        let out = self.run(args, stdin);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "cairn {args:?} should fail with 1, stderr:\n{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "errors are one line:\n{err}");
        assert!(err.starts_with("cairn: "), "{err}");
        err
    }

    /// Where the store directory is on disk.
    pub fn real_store_dir(&self) -> PathBuf {
        self.root.path().join(self.store_dir.trim_start_matches('/'))
    }

    /// Waits (up to a minute) until the daemon has emptied `.cairn-trash`, where collected
    /// paths wait for their space to be freed in the background.
    pub fn wait_trash_empty(&self) {
        let trash = self.real_store_dir().join(".cairn-trash");
        let started = Instant::now();
        loop {
            let left: Vec<_> =
                std::fs::read_dir(&trash).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
            if left.is_empty() {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the trash was not emptied: {left:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the daemon's unfinished work holds in the store's temporary area (`.cairn-tmp`):
    /// the entries of its directories, and anything else there. The empty directories the
    /// daemon keeps there for reuse are not work.
    pub fn temp_work(&self) -> Vec<PathBuf> {
        let Ok(top) = std::fs::read_dir(self.real_store_dir().join(".cairn-tmp")) else { return Vec::new() };
        let mut work = Vec::new();
        for e in top.flatten() {
            match std::fs::read_dir(e.path()) {
                Ok(inner) => work.extend(inner.flatten().map(|i| i.path())),
                Err(_) => work.push(e.path()),
            }
        }
        work
    }

    /// The entries of the store directory, asserting that no temporary work (in `.cairn-tmp`)
    /// is left behind and that garbage on its way out (in `.cairn-trash`) goes.
    ///
    /// A request whose client went away may still be running — or not yet started — when the
    /// test looks: its temporary directory is given up to 30 s to appear and go, and only what
    /// is still there then counts as left behind.
    pub fn store_entries(&self) -> Vec<String> {
        self.wait_trash_empty();
        let started = Instant::now();
        while !self.temp_work().is_empty() && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = self.temp_work();
        assert!(left.is_empty(), "files left in .cairn-tmp: {left:?}");
        let trash = self.real_store_dir().join(".cairn-trash");
        let left: Vec<_> =
            std::fs::read_dir(&trash).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "files left in .cairn-trash: {left:?}");
        let mut v: Vec<String> = std::fs::read_dir(self.real_store_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".cairn-"))
            .collect();
        v.sort();
        v
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.keep_root {
            return;
        }
        // Store paths are read-only: make the tree writable so the temporary root can go.
        let _ = Command::new("chmod").args(["-R", "u+w"]).arg(self.root.path()).status();
    }
}

/// Real Nix 2.8 on a private store (`local?root=DIR`, logical store `/nix/store`), offline and
/// without build users. The tests build unsandboxed; the benchmark asks for sandboxed builds
/// ([`NixStore::sandboxed`]) and keeps its stores under its work directory
/// ([`NixStore::new_in`], [`NixStore::keep`]).
pub struct NixStore {
    pub root: tempfile::TempDir,
    /// Whether builds run in Nix's sandbox (its default) rather than with `sandbox = false`.
    sandboxed: bool,
    /// Whether the root stays when the store is dropped.
    kept: bool,
}

impl Default for NixStore {
    fn default() -> Self {
        Self::new()
    }
}

impl NixStore {
    pub fn new() -> NixStore {
        NixStore {
            root: tempfile::Builder::new().prefix("nix-peer-").tempdir().unwrap(),
            sandboxed: false,
            kept: false,
        }
    }

    /// A store whose root is a fresh directory inside `parent`, its name starting with `prefix`:
    /// on `parent`'s file system (the benchmark measures its own work directory's). The root
    /// is `rwxr-xr-x`, as a directory `mkdir` made, and removed on drop unless [`kept`].
    ///
    /// [`kept`]: NixStore::keep
    pub fn new_in(parent: &Path, prefix: &str) -> NixStore {
        let root = tempfile::Builder::new().prefix(prefix).tempdir_in(parent).expect("Nix store root");
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        NixStore { root, sandboxed: false, kept: false }
    }

    /// The root stays when the store is dropped (nor is it made writable then): whoever owns
    /// its parent removes it (the benchmark, at the end: a mass deletion between two runs would
    /// slow the next run's file creation).
    pub fn keep(mut self) -> Self {
        self.root.disable_cleanup(true);
        self.kept = true;
        self
    }

    /// Builds in Nix's sandbox ([`NixStore::cmd`] leaves out `sandbox = false`), as the
    /// benchmark compares sandboxed builds.
    pub fn sandboxed(mut self) -> Self {
        self.sandboxed = true;
        self
    }

    /// The `NIX_CONFIG` of [`NixStore::cmd`]: no substituters, no build users, `nix-command`,
    /// and `sandbox = false` unless [`NixStore::sandboxed`].
    pub fn config(&self) -> &'static str {
        if self.sandboxed {
            "substituters =\nexperimental-features = nix-command\nbuild-users-group =\n"
        } else {
            "substituters =\nexperimental-features = nix-command\nsandbox = false\nbuild-users-group =\n"
        }
    }

    /// The real directory behind `/nix/store`.
    pub fn real_store_dir(&self) -> PathBuf {
        self.root.path().join("nix/store")
    }

    /// The directory of the store's garbage collector roots.
    pub fn gc_roots_dir(&self) -> PathBuf {
        self.root.path().join("nix/var/nix/gcroots")
    }

    pub fn store_url(&self) -> String {
        format!("local?root={}", self.root.path().display())
    }

    /// The `XDG_CACHE_HOME` of Nix commands on this store: their narinfo cache, the store's own.
    pub fn cache_home(&self) -> PathBuf {
        self.root.path().join(".cache")
    }

    /// A Nix command (`nix-store`, `nix`, `nix-instantiate`) on this store, offline.
    ///
    /// Its narinfo cache (`~/.cache/nix/binary-cache-v6.sqlite`, kept 30 days by URL) is the
    /// store's own: a binary cache a test serves on a loopback port answers at a URL that an
    /// earlier run may have used for other narinfos of the same paths (signed by another run's
    /// key), and Nix would take those from its cache without asking.
    pub fn cmd(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.arg("--store").arg(self.store_url());
        c.env("NIX_CONFIG", self.config());
        c.env("NIX_REMOTE", "");
        c.env("XDG_CACHE_HOME", self.cache_home());
        c
    }

    /// Runs a Nix command, asserting success; returns stdout.
    pub fn ok(&self, tool: &str, args: &[&str]) -> Vec<u8> {
        let out = self.cmd(tool).args(args).output().unwrap();
        assert!(out.status.success(), "{tool} {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// Runs a Nix command with stdin, asserting success; returns stdout.
    pub fn ok_stdin(&self, tool: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
        let out = output_with_stdin(self.cmd(tool).args(args), stdin);
        assert!(out.status.success(), "{tool} {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }
}

impl Drop for NixStore {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let _ = Command::new("chmod").args(["-R", "u+w"]).arg(self.root.path()).status();
    }
}

/// Runs a command with `stdin` fed from a thread (so a child that writes much before reading all
/// its input cannot deadlock), capturing stdout and stderr.
pub fn output_with_stdin(cmd: &mut Command, stdin: &[u8]) -> Output {
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start command");
    let mut input = child.stdin.take().expect("piped stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait for command");
    writer.join().expect("stdin writer");
    out
}

/// Trims a command's output to one line.
pub fn line(s: &str) -> String {
    s.trim_end().to_owned()
}

/// A small deterministic generator (xorshift64), so that no crate is needed and failures
/// reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Writes a file, creating its directory.
pub fn write(p: &Path, contents: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, contents).unwrap();
}

/// Writes an executable file, creating its directory.
pub fn write_exec(p: &Path, contents: &[u8]) {
    write(p, contents);
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The base-16 NAR hash of a regular file holding "hello\n": the argument of
/// `nix/tests/builds.nix`, for its recursive fixed output.
pub fn hello_nar_hash() -> String {
    let mut nar = Vec::new();
    let mut w = cairn_nix::nar::NarWriter::new(&mut nar).unwrap();
    w.regular(None, false, 6, &mut &b"hello\n"[..]).unwrap();
    w.finish().unwrap();
    cairn_nix::Hash::digest(cairn_nix::HashAlgo::Sha256, &nar).encode(cairn_nix::hash::Encoding::Base16)
}

/// A loopback port nothing listens on, for a server a test starts and that binds it itself.
///
/// Ports come from below the kernel's ephemeral range (which starts at 32768), so neither an
/// outgoing connection nor another `bind(…:0)` takes one between this call and the server's
/// bind; and each is handed out once per test process, so two servers started by tests running
/// side by side (a Garage's web and another Garage's RPC port, say) never get the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Where this process starts in the range: its pid spread over it, so test binaries run at
    // the same time (nextest runs one process per test) start far apart.
    let start = std::process::id().wrapping_mul(2_654_435_761) % COUNT;
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + n) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT)
}

/// Waits until something accepts connections on a loopback port.
pub fn wait_listening(port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `path-info --json` output (cairn's or Nix's) as sorted (path, narHash, narSize, references).
pub fn path_info_summary(json: &[u8]) -> Vec<(String, String, u64, serde_json::Value)> {
    let v: serde_json::Value = serde_json::from_slice(json).unwrap();
    let mut out: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let p = i["path"].as_str().unwrap().to_owned();
            (p, i["narHash"].as_str().unwrap().to_owned(), i["narSize"].as_u64().unwrap(), i["references"].clone())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `path-info --json` as a map from path to the given fields (absent ones as null): what must
/// survive a copy or a round trip through a cache.
pub fn path_info_fields(
    json: &[u8],
    fields: &[&str],
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, serde_json::Value>> {
    let v: serde_json::Value = serde_json::from_slice(json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let kept =
                fields.iter().map(|f| (f.to_string(), i.get(*f).cloned().unwrap_or(serde_json::Value::Null))).collect();
            (i["path"].as_str().unwrap().to_owned(), kept)
        })
        .collect()
}

/// A temporary directory every user may read and enter (tests that switch users read from it).
pub fn world_readable_tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("cairn-tests-src-").tempdir().expect("temporary directory");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// A path as the `&str` a command line wants (the paths tests make are UTF-8).
pub fn utf8(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Parses a command's JSON output; panics showing the output when it is not JSON.
pub fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The name the test harness knows test `name` by when it is defined in the module whose
/// `module_path!()` is `module_path`: `gc::name` for module `gc` of a test binary (the binary's
/// crate name, first in the module path, is not part of it). For running a test again in a
/// child process with `--exact`.
pub fn test_name(module_path: &str, name: &str) -> String {
    match module_path.split_once("::") {
        Some((_crate, module)) => format!("{module}::{name}"),
        None => name.to_owned(),
    }
}

/// Host processes whose command line is exactly `argv`.
pub fn processes(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes one text path (`name`, holding `contents`, referring to `refs`) into an export stream
/// as `nix-store --export` writes it — marker, NAR, trailer — and returns the path. The
/// stream's end marker is the caller's ([`cairn_nix::export::write_end_marker`]).
pub fn export_text_path(
    out: &mut impl Write,
    dir: &cairn_nix::StoreDir,
    name: &str,
    contents: &[u8],
    refs: &std::collections::BTreeSet<cairn_nix::StorePath>,
) -> std::io::Result<cairn_nix::StorePath> {
    use cairn_nix::export::{write_next_marker, write_trailer, ExportTrailer};
    use cairn_nix::{Hash, HashAlgo};
    let p = dir.make_text_path(name, &Hash::digest(HashAlgo::Sha256, contents), refs).map_err(std::io::Error::other)?;
    write_next_marker(&mut *out)?;
    let mut nar = cairn_nix::nar::NarWriter::new(&mut *out).map_err(std::io::Error::other)?;
    nar.regular(None, false, contents.len() as u64, &mut &contents[..]).map_err(std::io::Error::other)?;
    nar.finish().map_err(std::io::Error::other)?;
    write_trailer(
        &mut *out,
        &ExportTrailer {
            path: dir.display(&p),
            references: refs.iter().map(|r| dir.display(r)).collect(),
            deriver: None,
        },
    )?;
    Ok(p)
}
