//! Reaching a builder: a worker-protocol session over a Unix socket or an SSH command, as
//! Nix's `unix://` and `ssh-ng://` stores reach their daemons.
//!
//! - `unix:///path` connects to the socket (`unix://` alone: Nix's default daemon socket).
//! - `ssh-ng://[user@]host[:port]` runs `REMOTE-PROGRAM --stdio` (default `nix-daemon`, so
//!   `remote-program=cairnd` reaches a cairnd) through the system's OpenSSH client, in batch
//!   mode (no prompts), with the machine's key and host key if given, options from
//!   `NIX_SSHOPTS` as Nix takes them, and one master connection per host that later sessions
//!   reuse (`ControlMaster`). URI parameters as Nix's: `ssh-key`, `remote-program`,
//!   `remote-store`, `base64-ssh-public-host-key`, `compress`.
//! - `ssh-ng://localhost` runs the remote program here without SSH, as Nix does.
//! - `ssh://[user@]host` and a bare host name (Nix's default) run `REMOTE-PROGRAM --serve
//!   --write` (default `nix-store`, or `cairnd`) and speak Nix's legacy SSH protocol
//!   (`cairn_worker::serve`), as Nix's `ssh://` stores do — the only way to builders whose
//!   key is bound to `command="nix-store --serve --write"` (NixOS's `nix.sshServe`). That
//!   protocol has no log channel: the builder's output is read from the remote program's
//!   standard error while the build runs.
//!
//! A session that cannot start fails with what the transport said (`ssh`'s last lines, such as
//! "Host key verification failed."), so the user sees why a builder is down.

use std::collections::{BTreeSet, VecDeque};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};

use cairn_nix::machines::Machine;
use cairn_nix::{StoreDir, StorePath};
use cairn_worker::serve::ServeClient;
use cairn_worker::{Client, ClientError, Limits};

/// Nix's default daemon socket, for `unix://` without a path.
const DEFAULT_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

/// How a builder is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    Ssh(SshTarget),
}

/// An SSH builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// `[user@]host`, as `ssh` takes it.
    pub host: String,
    pub port: Option<u16>,
    pub key: String,
    /// The host's public key line, checked instead of the user's known hosts.
    pub host_key: Option<String>,
    /// The command run there.
    pub command: String,
    pub compress: bool,
    /// Nix's legacy SSH protocol (`ssh://`) rather than the worker protocol (`ssh-ng://`).
    pub serve: bool,
    /// Share one master connection per host, kept a minute after its last session (the
    /// daemon's builders); off for a one-off command, which leaves nothing running behind it.
    pub shared: bool,
}

/// Why a builder's URI was refused.
#[derive(Debug, thiserror::Error)]
#[error("builder '{uri}': {problem}")]
pub struct UriError {
    pub uri: String,
    pub problem: String,
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b)) {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Target {
    /// Where `m` is, from its URI and columns (the URI's parameters win, as in Nix).
    pub fn of(m: &Machine) -> Result<Target, UriError> {
        let bad = |problem: &str| UriError { uri: m.uri.clone(), problem: problem.to_owned() };
        let (scheme, rest) = match m.uri.split_once("://") {
            Some((s, r)) => (s, r),
            None => ("ssh", m.uri.as_str()),
        };
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut params = std::collections::BTreeMap::new();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            params.insert(k, percent_decode(v));
        }
        match scheme {
            "unix" => {
                let path = if authority.is_empty() { DEFAULT_SOCKET } else { authority };
                Ok(Target::Unix(PathBuf::from(path)))
            }
            "ssh-ng" | "ssh" => {
                if authority.is_empty() || authority.contains('/') {
                    return Err(bad(&format!("expected {scheme}://[USER@]HOST")));
                }
                let (host, port) = match authority.rsplit_once(':') {
                    Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
                        Ok(p) => (h.to_owned(), Some(p)),
                        Err(_) => return Err(bad("the port is not a number")),
                    },
                    _ => (authority.to_owned(), None),
                };
                if host.starts_with('-') {
                    return Err(bad("a host name cannot start with '-'"));
                }
                let serve = scheme == "ssh";
                let (default, mode) = if serve { ("nix-store", "--serve --write") } else { ("nix-daemon", "--stdio") };
                let program = params.get("remote-program").cloned().unwrap_or_else(|| default.to_owned());
                let mut command = format!("{} {mode}", shell_quote(&program));
                if let Some(store) = params.get("remote-store").filter(|s| !s.is_empty()) {
                    command.push_str(&format!(" --store {}", shell_quote(store)));
                }
                let host_key_b64 = params.get("base64-ssh-public-host-key").cloned().unwrap_or(m.host_key.clone());
                let host_key = if host_key_b64.is_empty() {
                    None
                } else {
                    let probe = Machine { host_key: host_key_b64, ..m.clone() };
                    Some(probe.host_key_line().ok_or_else(|| bad("the host key is not base64 of a key line"))?)
                };
                Ok(Target::Ssh(SshTarget {
                    host,
                    port,
                    key: params.get("ssh-key").cloned().unwrap_or(m.ssh_key.clone()),
                    host_key,
                    command,
                    compress: params.get("compress").is_some_and(|v| v == "true"),
                    serve,
                    shared: true,
                }))
            }
            other => Err(bad(&format!("cairn reaches builders over ssh-ng://, ssh:// or unix://, not {other}://"))),
        }
    }
}

/// `%XX` escapes in URI parameters, as Nix decodes them.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

type Reader = BufReader<Box<dyn Read + Send>>;
type Writer = BufWriter<Box<dyn Write + Send>>;

/// A session with a builder, and what ends it.
pub struct Conn {
    pub session: Session,
    stopper: Stopper,
}

/// A session in either of Nix's protocols, with the calls a remote build makes.
pub enum Session {
    Worker(Client<Reader, Writer>),
    /// The legacy SSH protocol; the remote program's standard error is where a build's output
    /// comes, and the build settings go with each build.
    Serve {
        client: ServeClient<Reader, Writer>,
        stderr: Arc<Stderr>,
        settings: cairn_worker::serve::ServeBuildSettings,
    },
}

/// How long a failed session's program is given to say why and end.
const LAST_WORDS: std::time::Duration = std::time::Duration::from_secs(2);

/// A legacy-protocol failure: the server ends the session on any error, after saying why on
/// its standard error, so what it said last is the reason (a refusal); without it, the bytes.
fn serve_error(stderr: &Stderr, e: cairn_worker::Error) -> ClientError {
    let said = stderr.last_words(LAST_WORDS);
    // A refusal is said as an error; other last words (a build's own output, when the program
    // died mid-build) are no reason, and the broken session is.
    let refusal = said.iter().any(|l| {
        let l = cairn_worker::plain_text(l);
        l.contains("error:") || l.starts_with("cairnd:")
    });
    if refusal {
        ClientError::Remote(cairn_worker::RemoteError::new(said.join(" ")))
    } else {
        ClientError::Protocol(e)
    }
}

impl Session {
    pub fn set_options(&mut self, options: &cairn_worker::ClientOptions) -> Result<(), ClientError> {
        match self {
            Session::Worker(c) => c.set_options(options),
            // Sent with each build instead (Nix's `putBuildSettings`).
            Session::Serve { settings, .. } => {
                settings.max_silent_time = options.max_silent_time;
                settings.build_timeout = options.overrides.get("timeout").and_then(|t| t.parse().ok()).unwrap_or(0);
                settings.max_log_size =
                    options.overrides.get("max-build-log-size").and_then(|t| t.parse().ok()).unwrap_or(0);
                Ok(())
            }
        }
    }

    pub fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, ClientError> {
        match self {
            Session::Worker(c) => c.query_valid_paths(paths, substitute),
            Session::Serve { client, stderr, .. } => {
                client.query_valid_paths(paths, substitute).map_err(|e| serve_error(stderr, e))
            }
        }
    }

    pub fn query_path_info(&mut self, path: &StorePath) -> Result<Option<cairn_worker::PathInfo>, ClientError> {
        match self {
            Session::Worker(c) => c.query_path_info(path),
            Session::Serve { client, stderr, .. } => client.query_path_info(path).map_err(|e| serve_error(stderr, e)),
        }
    }

    /// The metadata of many paths, `None` for those not valid there: pipelined over the worker
    /// protocol, one `QueryPathInfos` over the legacy one.
    pub fn query_path_infos(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<Option<cairn_worker::PathInfo>>, ClientError> {
        match self {
            Session::Worker(c) => c.query_path_infos(paths),
            Session::Serve { client, stderr, .. } => {
                let set: BTreeSet<StorePath> = paths.iter().cloned().collect();
                let mut found: std::collections::BTreeMap<StorePath, cairn_worker::PathInfo> = client
                    .query_path_infos(&set)
                    .map_err(|e| serve_error(stderr, e))?
                    .into_iter()
                    .map(|v| (v.path, v.info))
                    .collect();
                Ok(paths.iter().map(|p| found.remove(p)).collect())
            }
        }
    }

    /// Sends paths with their NARs, references first: one `AddMultipleToStore`, or one
    /// `AddToStoreNar` each over the legacy protocol.
    pub fn add_multiple_to_store(
        &mut self,
        entries: &[cairn_worker::ValidPathInfo],
        dont_check_sigs: bool,
        write_nar: &mut dyn FnMut(&cairn_worker::ValidPathInfo, &mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), ClientError> {
        match self {
            Session::Worker(c) => c.add_multiple_to_store(entries, dont_check_sigs, write_nar),
            Session::Serve { client, stderr, .. } => entries
                .iter()
                .try_for_each(|e| client.add_to_store_nar(e, write_nar))
                .map_err(|e| serve_error(stderr, e)),
        }
    }

    /// Builds a derivation sent whole; its log lines go to `on_log` as they come (over the
    /// legacy protocol, read from the remote program's standard error while the answer is
    /// awaited).
    pub fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &cairn_worker::BasicDerivation,
        on_log: &mut dyn FnMut(cairn_worker::StderrMessage),
    ) -> Result<cairn_worker::BuildResult, ClientError> {
        match self {
            Session::Worker(c) => c.build_derivation(drv_path, drv, cairn_worker::BuildMode::Normal, on_log),
            Session::Serve { client, stderr, settings } => {
                let settings = settings.clone();
                // What it said before this build is not this build's.
                stderr.drain(&mut |_| {}, true);
                let stderr: &Stderr = stderr;
                std::thread::scope(|scope| {
                    let build = scope.spawn(|| client.build_derivation(drv_path, drv, &settings));
                    loop {
                        let finished = build.is_finished();
                        stderr.drain(on_log, finished);
                        if finished {
                            break;
                        }
                        stderr.wait(std::time::Duration::from_millis(50));
                    }
                    build.join().unwrap_or_else(|_| {
                        Err(cairn_worker::Error::Io(std::io::Error::other("the session's reader panicked")))
                    })
                })
                .map_err(|e| serve_error(stderr, e))
            }
        }
    }

    /// Asks for a path's NAR and hands the reader to `read_nar`, which must read exactly it.
    pub fn nar_from_path<T>(
        &mut self,
        path: &StorePath,
        read_nar: impl FnOnce(&mut Reader) -> T,
    ) -> Result<T, ClientError> {
        match self {
            Session::Worker(c) => c.nar_from_path(path, read_nar),
            Session::Serve { client, stderr, .. } => {
                client.nar_from_path(path, read_nar).map_err(|e| serve_error(stderr, e))
            }
        }
    }
}

/// Complete lines of what a program writes, handed over as they end; the last two that say
/// something (ssh's "Warning:" lines aside) are kept, for a failure's reason.
#[derive(Default)]
struct LineTail {
    partial: Vec<u8>,
    recent: VecDeque<String>,
}

/// The longest line held back waiting for its end: a builder that never writes a newline is
/// logged in pieces of this size, not held whole.
const MAX_LINE: usize = 64 << 10;

impl LineTail {
    fn feed(&mut self, bytes: &[u8], on_line: &mut dyn FnMut(String)) {
        self.partial.extend_from_slice(bytes);
        while let Some(end) = self
            .partial
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| i + 1)
            .or((self.partial.len() >= MAX_LINE).then_some(MAX_LINE))
        {
            let line: Vec<u8> = self.partial.drain(..end).collect();
            self.hand_over(line, on_line);
        }
    }

    /// Hands over the unfinished last line, if any.
    fn flush(&mut self, on_line: &mut dyn FnMut(String)) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.hand_over(line, on_line);
        }
    }

    fn hand_over(&mut self, line: Vec<u8>, on_line: &mut dyn FnMut(String)) {
        let line = String::from_utf8_lossy(&line).into_owned();
        let said = line.trim();
        if says_something(said) {
            if self.recent.len() == 2 {
                self.recent.pop_front();
            }
            self.recent.push_back(said.to_owned());
        }
        on_line(line);
    }
}

/// Whether a line (trimmed) may be a failure's reason: not empty, not one of ssh's warnings.
fn says_something(line: &str) -> bool {
    !line.is_empty() && !line.starts_with("Warning:")
}

/// What a session's program writes on its standard error, read from a pipe by a thread of its
/// own as it comes, so that nothing grows on disk however much it says: the lines not yet
/// handed over (at most [`MAX_PENDING`] bytes of them; older ones are dropped and counted), and
/// the last lines that said something.
pub struct Stderr {
    state: Mutex<Said>,
    changed: Condvar,
}

#[derive(Default)]
struct Said {
    tail: LineTail,
    pending: VecDeque<String>,
    pending_bytes: usize,
    dropped: u64,
    ended: bool,
}

/// Most output held for a build that has not taken it yet (a session not building keeps only
/// this much of what its program says).
const MAX_PENDING: usize = 4 << 20;

impl Said {
    fn push(&mut self, line: String) {
        self.pending_bytes += line.len();
        self.pending.push_back(line);
        while self.pending_bytes > MAX_PENDING {
            let Some(old) = self.pending.pop_front() else { break };
            self.pending_bytes -= old.len();
            self.dropped += old.len() as u64;
        }
    }

    /// The lines `bytes` complete, pending; with `None`, the unfinished last line too.
    fn feed(&mut self, bytes: Option<&[u8]>) {
        let mut lines = Vec::new();
        match bytes {
            Some(b) => self.tail.feed(b, &mut |l| lines.push(l)),
            None => self.tail.flush(&mut |l| lines.push(l)),
        }
        lines.into_iter().for_each(|l| self.push(l));
    }
}

impl Stderr {
    fn start(mut pipe: impl Read + Send + 'static) -> std::io::Result<Arc<Stderr>> {
        let me = Arc::new(Stderr { state: Mutex::new(Said::default()), changed: Condvar::new() });
        let feed = me.clone();
        std::thread::Builder::new().name("remote-stderr".into()).spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = pipe.read(&mut buf).unwrap_or(0);
                let mut said = feed.lock();
                if n == 0 {
                    said.feed(None);
                    said.ended = true;
                    feed.changed.notify_all();
                    return;
                }
                said.feed(Some(&buf[..n]));
                drop(said);
                feed.changed.notify_all();
            }
        })?;
        Ok(me)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Said> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands the lines said so far to `on_log` (with `all`, an unfinished last line too).
    fn drain(&self, on_log: &mut dyn FnMut(cairn_worker::StderrMessage), all: bool) {
        let (lines, dropped) = {
            let mut said = self.lock();
            if all {
                said.feed(None);
            }
            said.pending_bytes = 0;
            (std::mem::take(&mut said.pending), std::mem::take(&mut said.dropped))
        };
        if dropped > 0 {
            on_log(cairn_worker::StderrMessage::Next(format!("({dropped} bytes of output were dropped)\n")));
        }
        lines.into_iter().for_each(|l| on_log(cairn_worker::StderrMessage::Next(l)));
    }

    /// Waits at most `timeout` for more to be said (or for the end).
    fn wait(&self, timeout: std::time::Duration) {
        let said = self.lock();
        if said.pending.is_empty() && !said.ended {
            let _ = self.changed.wait_timeout(said, timeout);
        }
    }

    /// The last lines that said something, once the program has closed its standard error or
    /// `grace` has passed.
    fn last_words(&self, grace: std::time::Duration) -> Vec<String> {
        let said = self.lock();
        let (said, _) = self
            .changed
            .wait_timeout_while(said, grace, |s| !s.ended)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut recent = said.tail.recent.clone();
        if !said.ended {
            // An unfinished last line may be the reason.
            let last = String::from_utf8_lossy(&said.tail.partial).trim().to_owned();
            if says_something(&last) {
                recent.push_back(last);
            }
        }
        recent.into_iter().rev().take(2).rev().collect()
    }
}

/// Ends a session from another thread (when the build it serves is cancelled): the socket
/// shut down, or the `ssh` child killed. The connection's own reads and writes then fail.
#[derive(Clone)]
pub enum Stopper {
    Socket(Arc<UnixStream>),
    Process(Arc<Mutex<Child>>),
}

impl Stopper {
    pub fn stop(&self) {
        match self {
            Stopper::Socket(s) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            Stopper::Process(c) => kill_group(&mut c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)),
        }
    }
}

/// Kills a session's process and its group (the child leads it), unless it was waited for:
/// std remembers a reaped child, whose pid may since be another process's.
fn kill_group(c: &mut Child) {
    if let Ok(None) = c.try_wait() {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = c.kill();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Stopper::Process(c) = &self.stopper {
            // The remote program ends when its stdin closes; don't leave a zombie.
            let mut c = c.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            kill_group(&mut c);
            let _ = c.wait();
        }
    }
}

impl Conn {
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }
}

/// Opens a session: connects or starts the command, greets the daemon and reads its startup
/// log. `ssh_dir` holds the SSH master sockets and written known-hosts files.
pub fn open(target: &Target, store_dir: &StoreDir, ssh_dir: &Path) -> Result<Conn, String> {
    open_stoppable(target, store_dir, ssh_dir, &mut |_| {})
}

/// [`open`], handing `started` the session's [`Stopper`] as soon as there is a connection or a
/// process, before the greeting: a caller that stops waiting can end a remote that never
/// answers.
pub fn open_stoppable(
    target: &Target,
    store_dir: &StoreDir,
    ssh_dir: &Path,
    started: &mut dyn FnMut(Stopper),
) -> Result<Conn, String> {
    match target {
        Target::Unix(path) => {
            let s = UnixStream::connect(path).map_err(|e| format!("cannot connect to '{}': {e}", path.display()))?;
            let r = s.try_clone().map_err(|e| e.to_string())?;
            let w = s.try_clone().map_err(|e| e.to_string())?;
            let stopper = Stopper::Socket(Arc::new(s));
            started(stopper.clone());
            let client = greet(Box::new(r), Box::new(w), store_dir).map_err(|e| e.to_string())?;
            Ok(Conn { session: Session::Worker(client), stopper })
        }
        Target::Ssh(t) => {
            private_dir(ssh_dir)?;
            let mut cmd = ssh_command(t, ssh_dir)?;
            // Its own process group, which a stop ends whole: `sh -c` for `localhost` does not
            // exec its command, which would otherwise outlive it holding the pipes.
            let mut child = std::os::unix::process::CommandExt::process_group(&mut cmd, 0)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run '{}': {e}", cmd.get_program().to_string_lossy()))?;
            let (Some(stdin), Some(stdout), Some(err)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                kill_group(&mut child);
                let _ = child.wait();
                return Err("ssh's pipes are missing".to_owned());
            };
            let stderr = match Stderr::start(err) {
                Ok(s) => s,
                Err(e) => {
                    kill_group(&mut child);
                    let _ = child.wait();
                    return Err(format!("cannot start a thread: {e}"));
                }
            };
            let child = Arc::new(Mutex::new(child));
            let stopper = Stopper::Process(child.clone());
            started(stopper.clone());
            let greeted = if t.serve {
                greet_serve(Box::new(stdout), Box::new(stdin), store_dir).map(|client| Session::Serve {
                    client,
                    stderr: stderr.clone(),
                    settings: Default::default(),
                })
            } else {
                greet(Box::new(stdout), Box::new(stdin), store_dir).map(Session::Worker)
            };
            match greeted {
                Ok(session) => Ok(Conn { session, stopper }),
                Err(e) => {
                    {
                        let mut c = child.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        kill_group(&mut c);
                        let _ = c.wait();
                    }
                    let why = stderr.last_words(LAST_WORDS).join(" ");
                    let protocol = if t.serve { "Nix's legacy SSH protocol" } else { "the worker protocol" };
                    Err(if why.is_empty() {
                        format!("'{}' did not answer in {protocol} ({e})", t.command)
                    } else {
                        why
                    })
                }
            }
        }
    }
}

/// Makes `dir` (mode 0700), or checks that it is already a directory of this user's that nobody
/// else could write into (and makes it 0700): SSH's master sockets and the known-hosts files written for it go there, and a
/// directory someone else made first (its name is predictable) could hand ssh their socket or
/// point a written file elsewhere.
pub fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create '{}': {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("'{}': {e}", dir.display()))?;
    let ours = meta.is_dir() && meta.uid() == nix::unistd::geteuid().as_raw();
    // One of ours that nobody else could write into (an older cairn made them 0755, and a pid
    // comes round again) is made private; any other is refused.
    if !ours || meta.mode() & 0o022 != 0 {
        return Err(format!("'{}' is not a private directory of this user's: remove it", dir.display()));
    }
    if meta.mode() & 0o077 != 0 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make '{}' private: {e}", dir.display()))?;
    }
    Ok(())
}

fn greet(
    r: Box<dyn Read + Send>,
    w: Box<dyn Write + Send>,
    store_dir: &StoreDir,
) -> Result<Client<Reader, Writer>, ClientError> {
    Client::connect(
        BufReader::with_capacity(64 << 10, r),
        BufWriter::with_capacity(64 << 10, w),
        store_dir.clone(),
        Limits::default(),
    )
}

fn greet_serve(
    r: Box<dyn Read + Send>,
    w: Box<dyn Write + Send>,
    store_dir: &StoreDir,
) -> Result<ServeClient<Reader, Writer>, ClientError> {
    ServeClient::connect(
        BufReader::with_capacity(64 << 10, r),
        BufWriter::with_capacity(64 << 10, w),
        store_dir.clone(),
        Limits::default(),
    )
    .map_err(ClientError::Protocol)
}

/// The `ssh` command line for a session (or, for `localhost`, the shell running the command).
fn ssh_command(t: &SshTarget, ssh_dir: &Path) -> Result<Command, String> {
    let bare_host = t.host.rsplit('@').next().unwrap_or(&t.host);
    // Exactly `localhost`, as Nix's `SSHMaster` fakes it: `user@localhost` is a real login.
    if t.host == "localhost" && t.port.is_none() {
        let mut c = Command::new("sh");
        c.arg("-c").arg(&t.command);
        return Ok(c);
    }
    let mut c = Command::new("ssh");
    if let Ok(opts) = std::env::var("NIX_SSHOPTS") {
        c.args(opts.split_whitespace());
    }
    c.args(["-x", "-a", "-oBatchMode=yes"]);
    if let Some(p) = t.port {
        c.arg("-p").arg(p.to_string());
    }
    if !t.key.is_empty() {
        c.arg("-i").arg(&t.key);
    }
    if let Some(line) = &t.host_key {
        // The machine's host key replaces the known hosts: the builder must prove it.
        let file = ssh_dir.join(format!("known-hosts-{}", hex_id(&t.host, t.port, line)));
        let names = match t.port {
            Some(p) => format!("{bare_host},[{bare_host}]:{p}"),
            None => bare_host.to_owned(),
        };
        std::fs::write(&file, format!("{names} {line}\n"))
            .map_err(|e| format!("cannot write '{}': {e}", file.display()))?;
        c.arg(format!("-oUserKnownHostsFile={}", file.display()));
        c.arg("-oStrictHostKeyChecking=yes");
        c.arg("-oCheckHostIP=no");
    }
    if t.compress {
        c.arg("-C");
    }
    // One master connection per host, kept a minute after the last session: later sessions
    // skip the key exchange and authentication.
    // The socket is named by everything that decides what the connection proves (host, port,
    // key, pinned host key): a session made with other credentials or another host key is
    // never reused for this one.
    if !t.shared {
        c.arg("--").arg(&t.host).arg(&t.command);
        return Ok(c);
    }
    c.args(["-oControlMaster=auto", "-oControlPersist=60"]);
    let credentials = format!("{}\n{}", t.key, t.host_key.as_deref().unwrap_or(""));
    c.arg(format!("-oControlPath={}/m-{}", ssh_dir.display(), hex_id(&t.host, t.port, &credentials)));
    c.arg("--").arg(&t.host).arg(&t.command);
    Ok(c)
}

fn hex_id(host: &str, port: Option<u16>, line: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (host, port, line).hash(&mut h);
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(uri: &str) -> Machine {
        cairn_nix::machines::parse(uri, "x86_64-linux", &mut |_: &str| Ok(None)).unwrap().remove(0)
    }

    #[test]
    fn uris_name_their_transport_as_nix_reads_them() {
        assert_eq!(Target::of(&machine("unix:///run/b.sock")).unwrap(), Target::Unix("/run/b.sock".into()));
        assert_eq!(Target::of(&machine("unix://")).unwrap(), Target::Unix(DEFAULT_SOCKET.into()));
        let Target::Ssh(t) = Target::of(&machine("ssh-ng://alice@big:2222?remote-program=cairnd&ssh-key=/k")).unwrap()
        else {
            panic!()
        };
        assert_eq!((t.host.as_str(), t.port, t.key.as_str()), ("alice@big", Some(2222), "/k"));
        assert_eq!(t.command, "cairnd --stdio");
        assert!(!t.serve);
        // A bare host name is `ssh://`, Nix's legacy SSH protocol, as in Nix's machines files.
        let Target::Ssh(t) = Target::of(&machine("big - /id 1 1 - - -")).unwrap() else { panic!() };
        assert_eq!(
            (t.host.as_str(), t.port, t.key.as_str(), t.command.as_str(), t.serve),
            ("big", None, "/id", "nix-store --serve --write", true)
        );
        let Target::Ssh(t) = Target::of(&machine("ssh://h?remote-store=local%3Froot%3D/r")).unwrap() else { panic!() };
        assert_eq!(t.command, "nix-store --serve --write --store 'local?root=/r'");
        let Target::Ssh(t) = Target::of(&machine("ssh://h?remote-program=/opt/bin/cairnd")).unwrap() else { panic!() };
        assert_eq!((t.command.as_str(), t.serve), ("/opt/bin/cairnd --serve --write", true));
    }

    #[test]
    fn the_ssh_directory_is_made_private_and_one_others_could_write_into_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let fresh = tmp.path().join("fresh");
        private_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        // One of ours an older cairn made 0755: made private.
        let old = tmp.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&old).unwrap();
        assert_eq!(mode(&old), 0o700);
        // One anybody could have written into, or a symlink: refused.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(private_dir(&open).unwrap_err().contains("not a private directory"));
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(private_dir(&link).is_err());
    }

    #[test]
    fn master_connections_are_named_by_their_credentials_and_one_offs_have_none() {
        let dir = tempfile::tempdir().unwrap();
        let args = |t: &SshTarget| -> Vec<String> {
            ssh_command(t, dir.path()).unwrap().get_args().map(|a| a.to_string_lossy().into_owned()).collect()
        };
        let Target::Ssh(t) = Target::of(&machine("ssh://alice@big - /k1 1 1 - - -")).unwrap() else { panic!() };
        let path = |a: &[String]| a.iter().find(|a| a.starts_with("-oControlPath=")).cloned().unwrap();
        let first = args(&t);
        assert!(first.contains(&"-oControlMaster=auto".to_owned()), "{first:?}");
        let other_key = args(&SshTarget { key: "/k2".into(), ..t.clone() });
        assert_ne!(path(&first), path(&other_key), "another key, another master");
        let pinned = args(&SshTarget { host_key: Some("ssh-ed25519 AAAA".into()), ..t.clone() });
        assert_ne!(path(&first), path(&pinned), "a pinned host key, another master");
        let one_off = args(&SshTarget { shared: false, ..t.clone() });
        assert!(!one_off.iter().any(|a| a.starts_with("-oControl")), "{one_off:?}");
        assert_eq!(one_off.last().map(String::as_str), Some("nix-store --serve --write"));
        // Only exactly `localhost` is run without ssh.
        let Target::Ssh(local) = Target::of(&machine("ssh://localhost")).unwrap() else { panic!() };
        assert_eq!(ssh_command(&local, dir.path()).unwrap().get_program(), "sh");
        let Target::Ssh(login) = Target::of(&machine("ssh://root@localhost")).unwrap() else { panic!() };
        assert_eq!(ssh_command(&login, dir.path()).unwrap().get_program(), "ssh");
    }

    #[test]
    fn log_lines_are_handed_over_whole_and_the_last_one_at_the_end() {
        let mut seen = Vec::new();
        let mut tail = LineTail::default();
        tail.feed(b"one\ntw", &mut |l| seen.push(l));
        tail.feed(b"o\nthree", &mut |l| seen.push(l));
        tail.flush(&mut |l| seen.push(l));
        assert_eq!(seen, ["one\n", "two\n", "three"]);
        // A line that never ends is handed over in pieces, not held whole; the last lines that
        // said something are kept for a failure's reason (ssh's warnings aside).
        let mut pieces = Vec::new();
        let mut tail = LineTail::default();
        tail.feed(&vec![b'x'; MAX_LINE * 2 + 10], &mut |l| pieces.push(l.len()));
        tail.feed(b"\nerror: refused\nWarning: Permanently added 'h'\n\n", &mut |l| pieces.push(l.len()));
        assert_eq!(pieces, [MAX_LINE, MAX_LINE, 11, 15, 31, 1]);
        assert_eq!(tail.recent.back().map(String::as_str), Some("error: refused"));
    }

    #[test]
    fn a_program_that_says_too_much_is_held_to_a_bound_and_its_last_words_kept() {
        let (r, mut w) = UnixStream::pair().unwrap();
        let stderr = Stderr::start(r).unwrap();
        let line = vec![b'y'; 1023];
        for _ in 0..(MAX_PENDING / 1024) * 3 {
            w.write_all(&line).unwrap();
            w.write_all(b"\n").unwrap();
        }
        w.write_all(b"error: the last word").unwrap();
        drop(w);
        assert_eq!(
            stderr.last_words(std::time::Duration::from_secs(10)),
            ["y".repeat(1023), "error: the last word".into()]
        );
        let mut held = 0;
        let mut dropped = String::new();
        stderr.drain(
            &mut |m| {
                if let cairn_worker::StderrMessage::Next(l) = m {
                    if l.starts_with('(') {
                        dropped = l;
                    } else {
                        held += l.len();
                    }
                }
            },
            true,
        );
        assert!(held <= MAX_PENDING && held > MAX_PENDING - 2048, "{held}");
        assert!(dropped.contains("bytes of output were dropped"), "{dropped}");
    }

    #[test]
    fn unusable_uris_are_refused_naming_the_builder() {
        for (uri, why) in [
            ("https://cache", "ssh-ng://, ssh:// or unix://"),
            ("ssh-ng://", "USER@]HOST"),
            ("ssh-ng://h:port", "port"),
            ("ssh-ng://-oProxyCommand=x", "cannot start with '-'"),
        ] {
            let e = Target::of(&machine(uri)).unwrap_err().to_string();
            assert!(e.contains(uri) && e.contains(why), "{uri}: {e}");
        }
    }

    #[test]
    fn a_given_host_key_is_the_only_key_ssh_accepts() {
        let key = data_encoding::BASE64.encode(b"ssh-ed25519 AAAAkey");
        let m = machine(&format!("ssh-ng://h:22 - - 1 1 - - {key}"));
        let Target::Ssh(t) = Target::of(&m).unwrap() else { panic!() };
        let dir = tempfile::tempdir().unwrap();
        let c = ssh_command(&t, dir.path()).unwrap();
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let known = args.iter().find_map(|a| a.strip_prefix("-oUserKnownHostsFile=")).unwrap();
        assert_eq!(std::fs::read_to_string(known).unwrap(), "h,[h]:22 ssh-ed25519 AAAAkey\n");
        assert!(
            args.contains(&"-oStrictHostKeyChecking=yes".to_owned()) && args.contains(&"-oBatchMode=yes".to_owned())
        );
        assert_eq!(&args[args.len() - 3..], ["--", "h", "nix-daemon --stdio"]);
    }
}
