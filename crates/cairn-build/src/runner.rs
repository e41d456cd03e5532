//! The daemon's side of one sandboxed build: has the zygote start a helper (see
//! [`crate::zygote`], [`crate::helper`]), maps its user namespace, streams its log line by line
//! and enforces the timeouts. The run ends when both of the helper's pipes end: every process
//! of the sandbox has ended and the helper has closed its ends (before its own exit, which
//! takes a while); the builder's status came on the control pipe.
//!
//! Helpers are started one build ahead. Everything a helper does before it reads its spec —
//! the fork, the user namespace and its id maps, the other namespaces — depends only on the
//! build user and on whether the build keeps the host's network, and it is the largest fixed
//! cost of a build after the builder itself. So when a build takes a helper, another is started
//! in the background for the next build with the same user and network ([`Spare`]); a build
//! finds its helper ready, and only the mounts are left between it and its builder. Every build
//! still gets namespaces of its own: a spare is used once, by one build.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;

use crate::sandbox::{SandboxSpec, SANDBOX_GID, SANDBOX_UID};
use crate::zygote::Zygote;

/// The longest log line passed on whole; longer ones are cut into pieces of this size, so
/// that a builder printing without newlines cannot make the daemon hold its whole output.
/// Nix has no such bound; this one is far above the lines builds print (a minified script,
/// a long compiler command line), which are shown whole, as Nix shows them.
const MAX_LINE: usize = 1 << 20;

/// How one run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// The builder exited with this code (or 128 + the signal that killed it).
    Exited(i32),
    /// The sandbox could not be set up; the builder never ran.
    SetupFailed(String),
    /// Killed after `timeout` in total.
    TimedOut(Duration),
    /// Killed after `max-silent-time` without output.
    Silent(Duration),
    /// Killed after writing more than `max-build-log-size` bytes of log.
    LogLimit(u64),
}

/// Limits of one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunLimits {
    pub timeout: Option<Duration>,
    pub max_silent: Option<Duration>,
    /// Bytes of log the build may write.
    pub max_log_size: Option<u64>,
}

/// Runs the sandbox `spec` in a helper of the executable `helper` (forked by its zygote, see
/// [`crate::zygote`]), the sandbox's ids mapped to the host's `uid`/`gid`; each log line goes
/// to `log` without its newline, with whether it had one (a piece of a line longer than
/// [`MAX_LINE`], and an unterminated last line, have none): the bytes given, with a newline
/// where it says so, are exactly what the builder wrote.
pub async fn run(
    helper: &Path,
    spec: &SandboxSpec,
    uid: u32,
    gid: u32,
    limits: RunLimits,
    mut log: impl FnMut(&[u8], bool) + Send,
) -> std::io::Result<RunEnd> {
    let key = SpareKey { helper: helper.to_owned(), uid, gid, network: spec.network };
    let started = match Spare::take(&key) {
        Some(s) => Ok(s),
        None => {
            let k = key.clone();
            tokio::task::spawn_blocking(move || Spare::start(&k)).await.map_err(std::io::Error::other)??
        }
    };
    // The next build with this user and network finds its helper started.
    Spare::refill(key);
    let mut started = match started {
        Ok(s) => s,
        Err(message) => return Ok(RunEnd::SetupFailed(message)),
    };
    let (Some(stdin), Some(control), Some(output)) =
        (started.stdin.take(), started.control.take(), started.output.take())
    else {
        return Ok(RunEnd::SetupFailed("a started sandbox helper lost its pipes".into()));
    };
    let mut stdin = pipe::Sender::from_owned_fd(stdin)?;
    let mut control = BufReader::new(pipe::Receiver::from_owned_fd(control)?).lines();
    let mut output = BufReader::new(pipe::Receiver::from_owned_fd(output)?);
    // Killed through this if the build is abandoned (timeouts, or the request dropped).
    let mut helper = HelperGuard(started.pidfd.take());

    let mut line = serde_json::to_vec(spec).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stdin.write_all(&line).await?;
    stdin.flush().await?;

    let started = tokio::time::Instant::now();
    let deadline = limits.timeout.map(|t| started + t);
    let mut last_output = started;
    let mut builder_pid: Option<i32> = None;
    let mut setup_error: Option<String> = None;
    let mut control_open = true;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut output_open = true;
    let mut logged: u64 = 0;
    let mut status: Option<i32> = None;
    let end = loop {
        let silent_deadline = limits.max_silent.map(|s| last_output + s);
        let wake = [deadline, silent_deadline].into_iter().flatten().min();
        tokio::select! {
            l = control.next_line(), if control_open => match l? {
                Some(l) => {
                    if let Some(pid) = l.strip_prefix("pid ") {
                        builder_pid = pid.trim().parse().ok();
                    } else if let Some(code) = l.strip_prefix("exit ") {
                        status = code.trim().parse().ok();
                    } else if let Some(e) = l.strip_prefix("error ") {
                        setup_error = Some(e.to_owned());
                    }
                }
                None => control_open = false,
            },
            n = output.read(&mut chunk), if output_open => {
                let n = n?;
                if n == 0 {
                    output_open = false;
                    if !buf.is_empty() {
                        log(&buf, false);
                        buf.clear();
                    }
                } else {
                    last_output = tokio::time::Instant::now();
                    // As Nix counts it: every byte read from the log pipe.
                    logged += n as u64;
                    if let Some(max) = limits.max_log_size.filter(|&m| logged > m) {
                        kill(builder_pid, &mut helper);
                        break RunEnd::LogLimit(max);
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                        log(&buf[..i], true);
                        buf.drain(..=i);
                    }
                    while buf.len() >= MAX_LINE {
                        log(&buf[..MAX_LINE], false);
                        buf.drain(..MAX_LINE);
                    }
                }
            },
            // Both pipes end when every process of the sandbox has ended and the helper has
            // closed its ends (or exited, or been killed).
            _ = std::future::ready(()), if !output_open && !control_open => {
                helper.0 = None;
                if let Some(e) = setup_error.take() {
                    break RunEnd::SetupFailed(e);
                }
                break match status {
                    Some(code) => RunEnd::Exited(code),
                    None => RunEnd::SetupFailed("the sandbox helper ended without the builder's status".into()),
                };
            },
            _ = sleep_until(wake), if wake.is_some() => {
                let now = tokio::time::Instant::now();
                let end = match (deadline, limits.timeout) {
                    (Some(d), Some(t)) if now >= d => RunEnd::TimedOut(t),
                    _ => RunEnd::Silent(limits.max_silent.unwrap_or_default()),
                };
                kill(builder_pid, &mut helper);
                break end;
            },
        }
    };
    Ok(end)
}

/// Which helpers can stand in for each other: the same executable, build user and network.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SpareKey {
    helper: PathBuf,
    uid: u32,
    gid: u32,
    network: bool,
}

/// A helper started ahead of its build: forked by the zygote, its user namespace mapped, its
/// other namespaces made (see [`crate::helper`]), waiting for its spec. Killed if dropped
/// unused.
struct Spare {
    stdin: Option<OwnedFd>,
    control: Option<OwnedFd>,
    output: Option<OwnedFd>,
    pidfd: Option<OwnedFd>,
}

/// At most one spare per key, shared by every build of this process. Plain descriptors, not
/// tokio pipes: a spare may be taken by a build on another runtime than the one it was
/// started from.
fn spares() -> &'static Mutex<HashMap<SpareKey, Spare>> {
    static SPARES: OnceLock<Mutex<HashMap<SpareKey, Spare>>> = OnceLock::new();
    SPARES.get_or_init(Default::default)
}

impl Spare {
    /// The spare for `key`, if one is waiting and still alive.
    fn take(key: &SpareKey) -> Option<Spare> {
        let s = spares().lock().unwrap_or_else(PoisonError::into_inner).remove(key)?;
        s.alive().then_some(s)
    }

    /// Starts a spare for `key` in the background, unless one is waiting already.
    fn refill(key: SpareKey) {
        if spares().lock().unwrap_or_else(PoisonError::into_inner).contains_key(&key) {
            return;
        }
        tokio::task::spawn_blocking(move || {
            let Ok(Ok(s)) = Spare::start(&key) else { return };
            let mut all = spares().lock().unwrap_or_else(PoisonError::into_inner);
            // Another build's refill may have been quicker: the later spare is dropped (killed).
            all.entry(key).or_insert(s);
        });
    }

    /// Whether the helper still runs (its pidfd becomes readable when it exits).
    fn alive(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let Some(fd) = &self.pidfd else { return false };
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
    }

    /// Starts a helper and takes it up to the point where it waits for its spec (blocking: a
    /// fork by the zygote and a line each way). `Ok(Err(message))` when the helper could not
    /// set up its namespaces.
    fn start(key: &SpareKey) -> std::io::Result<Result<Spare, String>> {
        use nix::fcntl::OFlag;
        let (stdin_r, stdin_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (control_r, control_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (output_r, output_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        Zygote::of(&key.helper).start_helper([stdin_r.as_fd(), control_w.as_fd(), output_w.as_fd()])?;
        // Only the helper holds the other ends now: their end is the helper's end.
        drop((stdin_r, control_w, output_w));
        let mut stdin = std::fs::File::from(stdin_w);
        stdin.write_all(if key.network { b"start host\n" } else { b"start private\n" })?;
        let mut control = std::fs::File::from(control_r);
        let line = read_line(&mut control)?;
        let pid = match line.strip_prefix("userns ") {
            Some(pid) => pid.trim().parse::<u32>().ok(),
            None if line.is_empty() => {
                return Ok(Err("the sandbox helper exited before creating its user namespace".into()))
            }
            None => return Ok(Err(line.strip_prefix("error ").unwrap_or(&line).to_owned())),
        };
        let Some(pid) = pid else {
            return Ok(Err("the sandbox helper did not say its pid".into()));
        };
        // The helper is alive (it waits for `go`), so this pidfd names it and nothing else.
        let mut spare =
            Spare { stdin: None, control: Some(control.into()), output: Some(output_r), pidfd: Some(pidfd_open(pid)?) };
        if let Err(e) = map_ids(pid, key.uid, key.gid) {
            return Ok(Err(format!("map the build user into the sandbox: {e}")));
        }
        stdin.write_all(b"go\n")?;
        spare.stdin = Some(stdin.into());
        Ok(Ok(spare))
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        if let Some(fd) = self.pidfd.take() {
            pidfd_kill(&fd);
        }
    }
}

/// One line from a blocking pipe, read a byte at a time so that nothing after it is consumed
/// (the rest of the pipe is read by the build's tokio reader); empty at the end of the pipe.
fn read_line(r: &mut std::fs::File) -> std::io::Result<String> {
    use std::io::Read;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 4096 {
        match r.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Kills the sandbox's PID 1 (which takes the whole PID namespace with it) and the helper.
fn kill(builder_pid: Option<i32>, helper: &mut HelperGuard) {
    if let Some(pid) = builder_pid {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    if let Some(fd) = helper.0.take() {
        pidfd_kill(&fd);
    }
}

/// A helper to kill unless the run ended normally.
struct HelperGuard(Option<OwnedFd>);

impl Drop for HelperGuard {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            pidfd_kill(&fd);
        }
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    use nix::libc;
    // SAFETY: pidfd_open(2) (Linux 5.3) takes a pid and flags and returns a new descriptor,
    // owned from here on.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(unsafe_code)]
    // SAFETY: a descriptor the kernel just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_kill(fd: &OwnedFd) {
    use nix::libc;
    // SAFETY: pidfd_send_signal(2) with a valid pidfd, no siginfo and no flags.
    #[allow(unsafe_code)]
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        );
    }
}

/// Writes the helper's id maps from outside its user namespace.
fn map_ids(pid: u32, uid: u32, gid: u32) -> std::io::Result<()> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    std::fs::write(proc.join("setgroups"), "deny")?;
    std::fs::write(proc.join("uid_map"), format!("{SANDBOX_UID} {uid} 1"))?;
    std::fs::write(proc.join("gid_map"), format!("{SANDBOX_GID} {gid} 1"))?;
    Ok(())
}
