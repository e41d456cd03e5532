//! The daemon's side of one sandboxed build: has the zygote start a helper (see
//! [`crate::zygote`], [`crate::helper`]), maps its user namespace, streams its log line by line
//! and enforces the timeouts. The run ends when both of the helper's pipes end: the helper has
//! exited, and every process of the sandbox before it; its status came on the control pipe.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;

use crate::sandbox::{SandboxSpec, SANDBOX_GID, SANDBOX_UID};
use crate::zygote::Zygote;

/// The longest log line passed on whole; longer ones are cut into pieces of this size.
const MAX_LINE: usize = 64 * 1024;

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
}

/// Limits of one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunLimits {
    pub timeout: Option<Duration>,
    pub max_silent: Option<Duration>,
}

/// Runs the sandbox `spec` in a helper of the executable `helper` (forked by its zygote, see
/// [`crate::zygote`]), the sandbox's ids mapped to the host's `uid`/`gid`; each log line
/// (without its newline) goes to `log`.
pub async fn run(
    helper: &Path,
    spec: &SandboxSpec,
    uid: u32,
    gid: u32,
    limits: RunLimits,
    mut log: impl FnMut(&[u8]) + Send,
) -> std::io::Result<RunEnd> {
    use nix::fcntl::OFlag;
    let (stdin_r, stdin_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (control_r, control_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (output_r, output_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Zygote::of(helper).start_helper([stdin_r.as_fd(), control_w.as_fd(), output_w.as_fd()])?;
    // Only the helper holds the other ends now: their end is the helper's end.
    drop((stdin_r, control_w, output_w));
    let mut stdin = pipe::Sender::from_owned_fd(stdin_w)?;
    let mut control = BufReader::new(pipe::Receiver::from_owned_fd(control_r)?).lines();
    let mut output = BufReader::new(pipe::Receiver::from_owned_fd(output_r)?);
    // Killed through this if the build is abandoned (timeouts, or the request dropped).
    let mut helper = HelperGuard(None);

    let mut line = serde_json::to_vec(spec).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stdin.write_all(&line).await?;
    stdin.flush().await?;
    let helper_pid = match control.next_line().await? {
        Some(l) if l.starts_with("userns ") => l["userns ".len()..].trim().parse::<u32>().ok(),
        Some(l) => return Ok(RunEnd::SetupFailed(l.strip_prefix("error ").unwrap_or(&l).to_owned())),
        None => return Ok(RunEnd::SetupFailed("the sandbox helper exited before creating its user namespace".into())),
    };
    let Some(helper_pid) = helper_pid else {
        return Ok(RunEnd::SetupFailed("the sandbox helper did not say its pid".into()));
    };
    // The helper is alive (it waits for `go`), so this pidfd names it and nothing else.
    helper.0 = pidfd_open(helper_pid).ok();
    if let Err(e) = map_ids(helper_pid, uid, gid) {
        return Ok(RunEnd::SetupFailed(format!("map the build user into the sandbox: {e}")));
    }
    stdin.write_all(b"go\n").await?;
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
                        log(&buf);
                        buf.clear();
                    }
                } else {
                    last_output = tokio::time::Instant::now();
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                        log(&buf[..i]);
                        buf.drain(..=i);
                    }
                    while buf.len() >= MAX_LINE {
                        log(&buf[..MAX_LINE]);
                        buf.drain(..MAX_LINE);
                    }
                }
            },
            // Both pipes end when the helper has exited (its descriptors close before its
            // namespaces are torn down) and every process of the sandbox with it.
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
