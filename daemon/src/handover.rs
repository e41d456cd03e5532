//! Files a local client hands over with its connection.
//!
//! `cairn add FILE` could stream the file through the socket, but then every byte is copied
//! four times (into the client, into the socket, out of it, into the store) before the daemon
//! has hashed it — on a large file, more work than the copy into the store and the hash
//! together. A client on the same machine instead opens the file itself (with its own
//! permissions: the daemon reads nothing the client could not) and passes the open descriptor
//! (`SCM_RIGHTS`) in the connection's first byte, [`MARK`], which no HTTP request starts with.
//! The request then names it (`POST /v1/add?…&handedOver=true`) and the daemon reads the file
//! directly; what it reads is hashed as it is copied, so a file the client changes meanwhile can
//! only be refused, never registered under a wrong hash.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{recv, recvmsg, ControlMessageOwned, MsgFlags};

use cairn_api::HANDOVER_MARK as MARK;
use cairn_nar_fs::MAX_HANDED;

/// The files a connection handed over, for one of its requests to take.
#[derive(Clone, Default)]
pub struct HandedOver(Arc<Mutex<Vec<File>>>);

impl HandedOver {
    /// The one file handed over with this connection, once (`None` unless exactly one came).
    pub fn take(&self) -> Option<File> {
        let mut files = self.take_all();
        if files.len() == 1 {
            files.pop()
        } else {
            None
        }
    }

    /// All the files handed over with this connection, in their order, once.
    pub fn take_all(&self) -> Vec<File> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// Receives the descriptors a new connection starts with, if it starts with [`MARK`];
/// otherwise leaves its bytes unread. `None` when no first byte came within `wait` (the
/// header-read timeout, which it is part of) or the client went away: the connection is to be
/// closed.
pub async fn receive(stream: &tokio::net::UnixStream, wait: Option<Duration>) -> Option<HandedOver> {
    let out = HandedOver::default();
    let fd = stream.as_raw_fd();
    let first_byte = async {
        loop {
            if stream.readable().await.is_err() {
                return None;
            }
            let mut b = [0u8; 1];
            match stream.try_io(tokio::io::Interest::READABLE, || {
                recv(fd, &mut b, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT).map_err(std::io::Error::from)
            }) {
                Ok(1) => return Some(b[0]),
                Ok(_) => return None,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return None,
            }
        }
    };
    let first = match wait {
        Some(w) => tokio::time::timeout(w, first_byte).await.ok().flatten(),
        None => first_byte.await,
    };
    match first {
        Some(MARK) => {}
        Some(_) => return Some(out),
        None => return None,
    }
    let files = match take_descriptors(fd) {
        Ok(fds) => fds,
        Err(e) => {
            tracing::debug!("cannot receive the descriptors handed over: {e}");
            Vec::new()
        }
    }
    .into_iter()
    .map(|fd| {
        // SAFETY: the kernel just installed `fd` in this process for this message; nothing
        // else knows it, so the File is its only owner.
        #[allow(unsafe_code)]
        let f = unsafe { File::from_raw_fd(fd) };
        f
    });
    // At most MAX_HANDED per connection (a tree's largest files); any others close here (each
    // is a File first, so that none stays open unowned).
    let mut files: Vec<File> = files.collect();
    files.truncate(MAX_HANDED);
    *out.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = files;
    Some(out)
}

/// Reads the mark byte and the descriptors that came with it.
fn take_descriptors(fd: RawFd) -> nix::Result<Vec<RawFd>> {
    let mut b = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut b)];
    // Room for as many descriptors as one message can carry (the kernel's SCM_MAX_FD, 253),
    // even one per control message, so that none is installed here without being seen (and
    // closed, past MAX_HANDED).
    let mut space = vec![0u8; 253 * nix::cmsg_space!(RawFd).len()];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(v) = c {
            fds.extend(v);
        }
    }
    Ok(fds)
}
