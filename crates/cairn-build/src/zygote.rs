//! The pre-started helper: one process that forks a fresh sandbox helper for each build.
//!
//! Starting the helper as a new copy of the daemon's executable cost more than anything else a
//! trivial build does besides the kernel's namespace work: the loader relocates a large
//! executable, the runtime reads `/proc/self/maps`, and every page touched is faulted in again —
//! about 1.3 ms of CPU and 2.7 ms of wall time per build, measured with `perf`. The zygote is
//! that copy started once (with [`ZYGOTE_ARG`]), single-threaded and holding nothing: it leaves
//! the daemon's session and closes every descriptor but its socket ([`crate::sys::detach`]),
//! then waits. For each build the daemon sends it the three pipe ends that become the helper's
//! stdin, stdout and stderr ([`SCM_RIGHTS`](nix::sys::socket::ControlMessage::ScmRights));
//! the zygote forks, and the child puts them at 0–2 and runs the helper exactly as a spawned
//! one would ([`crate::helper`]: it detaches again, so it keeps nothing of the zygote's either).
//!
//! The zygote ignores `SIGCHLD`, so the kernel reaps the helpers; a helper therefore reports
//! its own pid (`userns PID`) and its builder's status (`exit N`) on its control pipe, and the
//! daemon kills it through a pidfd, which cannot name a recycled pid. When the daemon exits,
//! the zygote reads the end of its socket and exits too. If the zygote is gone (killed), the
//! next build starts a new one.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};

use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::sys::{self, Linux};

/// The first argument that makes `cairnd` or `cairn` the zygote.
pub const ZYGOTE_ARG: &str = "__cairn-sandbox-zygote";

/// A running zygote: its process and the daemon's end of its socket.
struct Running {
    child: Child,
    socket: UnixStream,
}

/// The zygote of one helper executable, started on first use.
pub struct Zygote {
    helper: PathBuf,
    running: Mutex<Option<Running>>,
}

impl Zygote {
    /// The zygote of `helper` in this process (one per executable, shared by every build).
    pub fn of(helper: &Path) -> &'static Zygote {
        static ALL: OnceLock<Mutex<Vec<&'static Zygote>>> = OnceLock::new();
        let mut all = ALL.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(z) = all.iter().find(|z| z.helper == helper) {
            return z;
        }
        // Leaked on purpose: a daemon has one or two helper executables, kept while it lives.
        let z: &'static Zygote = Box::leak(Box::new(Zygote { helper: helper.to_owned(), running: Mutex::new(None) }));
        all.push(z);
        z
    }

    /// Has a new helper started with `stdio` as its descriptors 0, 1 and 2.
    pub fn start_helper(&self, stdio: [BorrowedFd<'_>; 3]) -> io::Result<()> {
        let fds: [RawFd; 3] = stdio.map(|f| f.as_raw_fd());
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        // A zygote that died (killed, or its executable replaced and the daemon restarted its
        // children) fails the send: start another once.
        let mut last = None;
        for _ in 0..2 {
            if running.is_none() {
                *running = Some(spawn(&self.helper)?);
            }
            let Some(r) = running.as_mut() else { continue };
            let sent = sendmsg::<()>(
                r.socket.as_raw_fd(),
                &[IoSlice::new(b"h")],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            );
            match sent {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                    *running = None;
                    last = Some(io::Error::from(e));
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("cannot start the sandbox zygote")))
    }
}

fn spawn(helper: &Path) -> io::Result<Running> {
    let (ours, theirs) = UnixStream::pair()?;
    let child = Command::new(helper)
        .arg(ZYGOTE_ARG)
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Running { child, socket: ours })
}

/// The zygote's loop (this process was started with [`ZYGOTE_ARG`], its socket on stdin);
/// returns its exit status.
pub(crate) fn main() -> i32 {
    if sys::detach(&mut Linux).is_err() {
        return crate::helper::SETUP_FAILED;
    }
    // SAFETY: this process has one thread and no handler of its own for SIGCHLD.
    #[allow(unsafe_code)]
    if unsafe { signal(Signal::SIGCHLD, SigHandler::SigIgn) }.is_err() {
        return crate::helper::SETUP_FAILED;
    }
    loop {
        let mut byte = [0u8; 1];
        let mut space = nix::cmsg_space!([RawFd; 3]);
        let mut iov = [IoSliceMut::new(&mut byte)];
        let received = match recvmsg::<()>(0, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) if m.bytes == 0 => return 0, // the daemon is gone
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return 1,
        };
        let mut fds: Vec<OwnedFd> = Vec::new();
        if let Ok(cmsgs) = received.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel just installed these descriptors in this process for
                    // this message; nothing else owns them.
                    #[allow(unsafe_code)]
                    fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
        }
        let Ok(stdio) = <[OwnedFd; 3]>::try_from(fds) else { continue };
        // SAFETY: the zygote has a single thread, so the child cannot inherit a lock held by
        // another thread.
        #[allow(unsafe_code)]
        let forked = unsafe { nix::unistd::fork() };
        if let Ok(nix::unistd::ForkResult::Child) = forked {
            std::process::exit(become_helper(stdio));
        }
        // Parent (or failed fork): the ends are closed here; the daemon sees the helper's
        // pipes end if it never started.
    }
}

/// In the forked child: the received ends become 0–2, then the helper runs.
fn become_helper(stdio: [OwnedFd; 3]) -> i32 {
    // SAFETY: one thread; the default disposition, so that the helper can wait for its builder.
    #[allow(unsafe_code)]
    if unsafe { signal(Signal::SIGCHLD, SigHandler::SigDfl) }.is_err() {
        return crate::helper::SETUP_FAILED;
    }
    let [i, o, e] = stdio;
    if nix::unistd::dup2_stdin(&i).is_err() || nix::unistd::dup2_stdout(&o).is_err() {
        return crate::helper::SETUP_FAILED;
    }
    if nix::unistd::dup2_stderr(&e).is_err() {
        return crate::helper::SETUP_FAILED;
    }
    drop((i, o, e));
    crate::helper::main()
}
