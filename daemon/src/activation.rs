//! Socket activation: systemd (or any supervisor speaking its `sd_listen_fds` protocol) binds
//! the Unix socket itself and starts cairnd on the first connection, passing the listening
//! socket as file descriptor 3 with `LISTEN_PID` set to cairnd's pid and `LISTEN_FDS=1`.
//!
//! Only that one case is taken: exactly one descriptor, a listening Unix socket, meant for this
//! process. Without the variables (or with another process's `LISTEN_PID`, inherited by mistake)
//! cairnd binds its `socket` itself. An activated cairnd neither removes nor re-creates the
//! socket file, which belongs to the supervisor; the `.socket` unit's `ListenStream` must be
//! the `socket` setting, since that is where `cairn` connects (see `nix/systemd/`).

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;

use anyhow::{bail, Context};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The listening socket systemd passed to this process, if it passed one.
pub fn inherited_listener() -> anyhow::Result<Option<UnixListener>> {
    let (Ok(pid), Ok(fds)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    if fds.trim() != "1" {
        bail!("LISTEN_FDS={fds}: cairnd takes exactly one socket from systemd (its Unix socket; ListenStream= once)");
    }
    // SAFETY: with LISTEN_PID naming this process, descriptor 3 was opened by the supervisor for
    // it and nothing in this process has taken ownership of it yet (this runs once, at start-up,
    // before anything else opens files).
    #[allow(unsafe_code)]
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    // Passed descriptors are inheritable: keep it from builders and helpers.
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .context("LISTEN_FDS=1, but descriptor 3 is not open")?;
    let listener = UnixListener::from(fd);
    let addr = listener.local_addr().context("the socket systemd passed (descriptor 3) is not a Unix socket")?;
    listener.set_nonblocking(true)?;
    tracing::info!(socket = ?addr.as_pathname(), "listening on the socket systemd passed");
    Ok(Some(listener))
}
