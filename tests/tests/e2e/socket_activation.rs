//! Socket activation, as systemd does it (`nix/systemd/cairnd.socket`): the supervisor binds the
//! socket, starts cairnd with the listening socket as descriptor 3, `LISTEN_PID` = cairnd's pid
//! and `LISTEN_FDS=1`, and cairnd serves on it without binding (or, at exit, removing) the file.
//! Also: the shipped unit files pass `systemd-analyze verify`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_tests::{bin_dir, require_peer};

/// Starts cairnd on `root` as a socket-activating supervisor would, passing `listener` as
/// descriptor 3; `listen_pid` says whose the descriptors are (`$$`: cairnd's own pid, as the
/// shell execs it).
fn activated(root: &Path, listener: &std::os::unix::net::UnixListener, listen_pid: &str, fds: &str) -> Child {
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("LISTEN_PID={listen_pid} LISTEN_FDS={fds} exec \"$0\" \"$@\""))
        .arg(bin_dir().join("cairnd"))
        .args(["--root", root.to_str().unwrap(), "--store-dir", "/store"])
        .arg("--socket")
        .arg(root.join("sock"))
        .arg("--config")
        .arg(root.join("cairn.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec this only calls dup2 and fcntl, which are async-signal-safe.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            use nix::libc;
            if fd == 3 {
                // Already there: only make it survive exec.
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn cairn(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin_dir().join("cairn"))
        .args(["--root", root.to_str().unwrap(), "--store-dir", "/store", "--no-auto-start"])
        .arg("--socket")
        .arg(root.join("sock"))
        .arg("--config")
        .arg(root.join("cairn.toml"))
        .args(args)
        .output()
        .unwrap()
}

fn stop(child: Child) -> String {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cairnd_serves_on_the_socket_systemd_passes() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("cairn.toml"), "").unwrap();
    let sock = root.path().join("sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let inode = std::fs::metadata(&sock).unwrap().ino();
    // A client that connects before the daemon runs is served once it does (the point of it).
    let early = std::os::unix::net::UnixStream::connect(&sock).unwrap();

    let child = activated(root.path(), &listener, "$$", "1");
    let started = Instant::now();
    loop {
        let out = cairn(root.path(), &["daemon", "status"]);
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("cairnd"));
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(early);
    // Served on the passed socket: the file is still the one the supervisor bound …
    assert_eq!(std::fs::metadata(&sock).unwrap().ino(), inode, "cairnd bound the socket again");
    let log = stop(child);
    assert!(log.contains("listening on the socket systemd passed"), "{log}");
    // … and stays after the daemon exits, for the next activation.
    assert_eq!(std::fs::metadata(&sock).unwrap().ino(), inode, "cairnd removed the supervisor's socket:\n{log}");
}

#[test]
fn descriptors_meant_for_another_process_or_too_many_are_not_taken() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("cairn.toml"), "").unwrap();
    let sock = root.path().join("sock");

    // Two sockets: refused with a one-line reason.
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let out = activated(root.path(), &listener, "$$", "2").wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LISTEN_FDS=2: cairnd takes exactly one socket from systemd"), "{err}");

    // LISTEN_PID of another process (inherited by mistake): cairnd binds its socket itself.
    let inode = std::fs::metadata(&sock).unwrap().ino();
    let child = activated(root.path(), &listener, "1", "1");
    let started = Instant::now();
    while std::fs::metadata(&sock).map(|m| m.ino()).unwrap_or(inode) == inode {
        assert!(started.elapsed() < Duration::from_secs(30), "cairnd did not bind its own socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    while !cairn(root.path(), &["daemon", "status"]).status.success() {
        assert!(started.elapsed() < Duration::from_secs(30), "cairnd does not answer");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = stop(child);
    assert!(!log.contains("socket systemd passed"), "{log}");
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    if !require_peer("systemd-analyze") {
        return;
    }
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nix/systemd");
    let dir = tempfile::tempdir().unwrap();
    // The unit names /usr/bin/cairnd, where a distribution installs it; point it at this build.
    let service = std::fs::read_to_string(units.join("cairnd.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/bin/cairnd\n"));
    let cairnd = bin_dir().join("cairnd");
    std::fs::write(dir.path().join("cairnd.service"), service.replace("/usr/bin/cairnd", cairnd.to_str().unwrap()))
        .unwrap();
    std::fs::copy(units.join("cairnd.socket"), dir.path().join("cairnd.socket")).unwrap();
    // Documentation=man:cairn(1) is checked too: against the pages `cairn man` writes.
    let man = dir.path().join("man");
    assert!(Command::new(bin_dir().join("cairn")).arg("man").arg(man.join("man1")).status().unwrap().success());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("cairnd.socket"))
        .arg(dir.path().join("cairnd.service"))
        .env("MANPATH", &man)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let socket = std::fs::read_to_string(units.join("cairnd.socket")).unwrap();
    assert!(
        socket.contains("ListenStream=/var/lib/cairn/daemon-socket/socket\n"),
        "the default socket of root = \"/\""
    );
}
