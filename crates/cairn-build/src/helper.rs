//! The sandbox helper: a fresh, single-threaded process that becomes the build's sandbox.
//!
//! The daemon is multi-threaded, and a multi-threaded process can neither `unshare` a user
//! namespace nor safely do much after `fork`. So the daemon starts its own executable again,
//! once, as the zygote ([`crate::zygote`]; [`crate::run_if_asked`] is the first thing both `cairnd` and
//! `cairn` do), which forks a helper for each build; the helper, alone in its process, does the
//! work ([`HELPER_ARG`] starts one directly, without the zygote):
//!
//! 1. leaves the daemon's session, and so the terminal the daemon may have been started from,
//!    and closes every descriptor but 0–2 ([`crate::sys::detach`]): whatever the daemon
//!    inherited open — a secret file, a directory outside the root — ends here;
//! 2. reads `start private` or `start host` (whether the build gets a network namespace of its
//!    own, or keeps the host's: fixed-output derivations only);
//! 3. drops the daemon's supplementary groups (a root daemon's; as Nix does), unshares a user
//!    namespace and says `userns PID` on stdout; the daemon, outside, writes its
//!    `uid_map`/`gid_map` (the sandbox's uid 1000 and gid 100 map to the build user) and answers
//!    `go` — only a process in the parent namespace may map ids other than its own;
//! 4. unshares the mount, PID, IPC, UTS and (for `private`) network namespaces
//!    ([`crate::sys::unshare_namespaces`]);
//! 5. reads the [`SandboxSpec`] (one JSON line on stdin) and makes the mounts
//!    ([`crate::sys::isolate`]). Steps 1–4 do not depend on the build, so the daemon starts a
//!    helper ahead of the build that will use it ([`crate::runner`]): the kernel's namespace
//!    work, the largest fixed cost of a build, is done while the previous build still runs;
//! 6. forks the sandbox's PID 1, says `pid N`, waits for it, says `exit STATUS`, closes both
//!    pipes (the daemon sees the build's end without waiting for this process's own exit) and
//!    exits with it (128 + signal if killed). PID 1 starts a session of its own, mounts `/proc`, enters the root,
//!    sets the process limit, drops to the build user, sets `no_new_privs` and a parent-death
//!    signal, and executes the builder with stdin on `/dev/null`, stdout and stderr on the
//!    helper's stderr, which is the build log, and no other descriptor. When PID 1 ends, the kernel kills whatever
//!    else runs in the namespace: a builder cannot leave processes behind.
//!
//! Any failure is reported as `error MESSAGE` on stdout before exiting.

use std::ffi::OsString;
use std::io::{self, BufRead, Write};
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;

use crate::sandbox::SandboxSpec;
use crate::sys::{self, Linux};

/// The first argument that makes `cairnd` or `cairn` the sandbox helper.
pub const HELPER_ARG: &str = "__cairn-sandbox";

/// Exit status of a helper that failed before the builder ran.
pub const SETUP_FAILED: i32 = 126;

fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn fail(message: impl std::fmt::Display) -> i32 {
    say(&format!("error {}", message.to_string().replace('\n', " ")));
    SETUP_FAILED
}

/// The helper, with the daemon's pipes at 0–2 (started by [`crate::zygote`], or spawned).
pub(crate) fn main() -> i32 {
    if let Err(e) = sys::detach(&mut Linux) {
        return fail(e);
    }
    let mut stdin = io::stdin().lock();
    let mut line = String::new();
    if let Err(e) = stdin.read_line(&mut line) {
        return fail(format_args!("read the start line: {e}"));
    }
    let network = match line.trim() {
        "start private" => false,
        "start host" => true,
        "" => return SETUP_FAILED, // the daemon let an unused helper go
        other => return fail(format_args!("bad start line '{other}'")),
    };
    // No supplementary group of the daemon's reaches the builder: in the user namespace they
    // would still grant access on the host's files, and cannot be dropped there (its setgroups
    // is denied). As Nix does, before the namespace; a daemon that is not root has no right to
    // and keeps its user's groups, as Nix's does.
    match nix::unistd::setgroups(&[]) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => {}
        Err(e) => return fail(format_args!("drop supplementary groups: {e}")),
    }
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER) {
        return fail(format_args!("unshare a user namespace: {e} (are unprivileged user namespaces disabled?)"));
    }
    // Its own pid: a helper forked by the zygote is not the daemon's child.
    say(&format!("userns {}", std::process::id()));
    line.clear();
    match stdin.read_line(&mut line) {
        Ok(_) if line.trim() == "go" => {}
        _ => return fail("the daemon did not map the user namespace"),
    }
    if let Err(e) = sys::unshare_namespaces(network, &mut Linux) {
        return fail(e);
    }
    line.clear();
    match stdin.read_line(&mut line) {
        Ok(0) => return SETUP_FAILED, // the daemon let an unused helper go
        Ok(_) => {}
        Err(e) => return fail(format_args!("read the sandbox spec: {e}")),
    }
    let spec: SandboxSpec = match serde_json::from_str(&line) {
        Ok(s) => s,
        Err(e) => return fail(format_args!("bad sandbox spec: {e}")),
    };
    if spec.network != network {
        return fail("the sandbox spec does not match the namespaces this helper made");
    }
    if let Err(e) = sys::isolate(&spec, &mut Linux) {
        return fail(e);
    }
    // SAFETY: this process has a single thread (it is the helper, started for this and running
    // nothing else), so the child cannot inherit a lock held by another thread.
    #[allow(unsafe_code)]
    let forked = unsafe { nix::unistd::fork() };
    match forked {
        Err(e) => fail(format_args!("fork the sandbox's init: {e}")),
        Ok(nix::unistd::ForkResult::Child) => {
            let e = become_builder(&spec);
            std::process::exit(fail(e));
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            say(&format!("pid {child}"));
            let code = wait(child);
            // The daemon cannot wait for a helper it did not start: the status goes this way.
            say(&format!("exit {code}"));
            // Every process of the sandbox is gone (PID 1 reaped them before it was reaped),
            // so this process holds the last writing ends of both pipes: closed now, the daemon
            // sees the end of the build at once instead of after this process's own exit,
            // which tears down an address space as large as the daemon's first.
            for fd in [1, 2] {
                // SAFETY: descriptors 1 and 2 are this process's, and nothing writes to them
                // after this (the exit status goes by the exit code).
                #[allow(unsafe_code)]
                drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
            }
            code
        }
    }
}

fn wait(child: nix::unistd::Pid) -> i32 {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return fail(format_args!("wait for the builder: {e}")),
        }
    }
}

/// PID 1 of the sandbox: only returns on failure.
fn become_builder(spec: &SandboxSpec) -> String {
    if let Err(e) = sys::enter(spec, &mut Linux) {
        return e.to_string();
    }
    // Read and write, as Nix opens it: a builder may write to its stdin.
    let null = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        Ok(f) => f,
        Err(e) => return format!("open /dev/null in the sandbox: {e}"),
    };
    if let Err(e) = nix::unistd::dup2_stdin(&null) {
        return format!("redirect stdin: {e}");
    }
    // The builder writes its log to stderr; stdout (the control channel so far) joins it.
    if let Err(e) = nix::unistd::dup2_stdout(io::stderr()) {
        return format!("redirect stdout: {e}");
    }
    // Set last: changing ids clears it.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        return format!("set the parent-death signal: {e}");
    }
    let argv0: OsString = std::path::Path::new(&spec.builder)
        .file_name()
        .map(|n| n.to_owned())
        .unwrap_or_else(|| spec.builder.clone().into());
    let e = std::process::Command::new(&spec.builder)
        .arg0(argv0)
        .args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .exec();
    format!("executing builder '{}': {e}", spec.builder)
}
