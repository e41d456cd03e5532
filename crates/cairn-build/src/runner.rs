//! The daemon's side of one sandboxed build: starts the helper (see [`crate::helper`]), maps
//! its user namespace, streams its log line by line and enforces the timeouts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::helper::HELPER_ARG;
use crate::sandbox::{SandboxSpec, SANDBOX_GID, SANDBOX_UID};

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

/// Runs the sandbox `spec` with the helper executable `helper`, the sandbox's ids mapped to the
/// host's `uid`/`gid`; each log line (without its newline) goes to `log`.
pub async fn run(
    helper: &Path,
    spec: &SandboxSpec,
    uid: u32,
    gid: u32,
    limits: RunLimits,
    mut log: impl FnMut(&[u8]) + Send,
) -> std::io::Result<RunEnd> {
    let mut child = Command::new(helper)
        .arg(HELPER_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let helper_pid = child.id().unwrap_or(0);
    let mut stdin = child.stdin.take().expect("piped");
    let mut control = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut output = BufReader::new(child.stderr.take().expect("piped"));

    let mut line = serde_json::to_vec(spec).expect("specs serialise");
    line.push(b'\n');
    stdin.write_all(&line).await?;
    stdin.flush().await?;
    match control.next_line().await? {
        Some(l) if l == "userns" => {}
        Some(l) => return Ok(setup_failure(&l, &mut child).await),
        None => return Ok(RunEnd::SetupFailed("the sandbox helper exited before creating its user namespace".into())),
    }
    if let Err(e) = map_ids(helper_pid, uid, gid) {
        let _ = child.start_kill();
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
    let end = loop {
        let silent_deadline = limits.max_silent.map(|s| last_output + s);
        let wake = [deadline, silent_deadline].into_iter().flatten().min();
        tokio::select! {
            l = control.next_line(), if control_open => match l? {
                Some(l) => {
                    if let Some(pid) = l.strip_prefix("pid ") {
                        builder_pid = pid.trim().parse().ok();
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
            status = child.wait(), if !output_open && !control_open => {
                let status = status?;
                if let Some(e) = setup_error.take() {
                    break RunEnd::SetupFailed(e);
                }
                use std::os::unix::process::ExitStatusExt;
                break RunEnd::Exited(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
            },
            _ = sleep_until(wake), if wake.is_some() => {
                let now = tokio::time::Instant::now();
                let end = match (deadline, limits.timeout) {
                    (Some(d), Some(t)) if now >= d => RunEnd::TimedOut(t),
                    _ => RunEnd::Silent(limits.max_silent.unwrap_or_default()),
                };
                kill(builder_pid, &mut child).await;
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
async fn kill(builder_pid: Option<i32>, child: &mut tokio::process::Child) {
    if let Some(pid) = builder_pid {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    let _ = child.kill().await;
}

async fn setup_failure(line: &str, child: &mut tokio::process::Child) -> RunEnd {
    let _ = child.wait().await;
    RunEnd::SetupFailed(line.strip_prefix("error ").unwrap_or(line).to_owned())
}

/// Writes the helper's id maps from outside its user namespace.
fn map_ids(pid: u32, uid: u32, gid: u32) -> std::io::Result<()> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    std::fs::write(proc.join("setgroups"), "deny")?;
    std::fs::write(proc.join("uid_map"), format!("{SANDBOX_UID} {uid} 1"))?;
    std::fs::write(proc.join("gid_map"), format!("{SANDBOX_GID} {gid} 1"))?;
    Ok(())
}
