//! Unix socket paths of any length.
//!
//! The kernel takes a socket's path in `sockaddr_un.sun_path`, 108 bytes with its terminating
//! NUL: a store under a long home directory gets a default socket path longer than that, and
//! `connect`/`bind` refuse it. Nix 2.8 reaches such sockets; so does cairn, by naming the socket
//! through its open directory (`/proc/self/fd/N/NAME`), which is short whatever the directory.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The longest path `sun_path` holds (its 108 bytes less the terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// A path to give `connect` or `bind` for a socket at some path: the path itself when it fits,
/// else one through the socket's directory, held open for as long as this lives.
pub struct SocketAddress {
    path: PathBuf,
    _dir: Option<File>,
}

impl SocketAddress {
    pub fn of(socket: &Path) -> io::Result<SocketAddress> {
        if socket.as_os_str().len() <= SUN_PATH_MAX {
            return Ok(SocketAddress { path: socket.to_owned(), _dir: None });
        }
        let (Some(dir), Some(name)) = (socket.parent(), socket.file_name()) else {
            return Ok(SocketAddress { path: socket.to_owned(), _dir: None });
        };
        let dir = File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir })?;
        let path = Path::new("/proc/self/fd").join(dir.as_raw_fd().to_string()).join(name);
        if path.as_os_str().len() > SUN_PATH_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the socket's name '{}' is longer than a socket path may be", name.to_string_lossy()),
            ));
        }
        Ok(SocketAddress { path, _dir: Some(dir) })
    }

    /// What to pass to `connect` or `bind`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::SocketAddress;

    #[test]
    fn a_socket_under_a_long_directory_is_reached_and_bound_through_it() {
        let t = tempfile::tempdir().unwrap();
        let deep = t.path().join("d".repeat(120));
        std::fs::create_dir(&deep).unwrap();
        let socket = deep.join("s.sock");
        assert!(std::os::unix::net::UnixListener::bind(&socket).is_err(), "too long for sun_path");
        let at = SocketAddress::of(&socket).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(at.path()).unwrap();
        assert!(socket.exists(), "bound where it was asked to be");
        let to = SocketAddress::of(&socket).unwrap();
        let _client = std::os::unix::net::UnixStream::connect(to.path()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let short = t.path().join("short.sock");
        assert_eq!(SocketAddress::of(&short).unwrap().path(), short, "a path that fits is kept");
    }
}
