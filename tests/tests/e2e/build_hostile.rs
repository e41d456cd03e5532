//! Builds that attack the host from inside the sandbox, each attack of the sandbox review pinned
//! by the behaviour that stops it: typing into the terminal cairnd was started from
//! (`TIOCSTI`), reading descriptors cairnd inherited, a fork bomb, filling `/dev/shm`, an output
//! of gigabytes.
//!
//! The builder is `tests/tests/build_hostile/hostile.c`, compiled static by the test and added to
//! the store as the derivation's only input, so the sandbox holds nothing else. Needs `cc` with a static
//! libc (Debian `gcc` and `libc6-dev`) and util-linux `setsid`. Tests that need cairnd to have
//! a controlling terminal run in a child process of their own that leads a new session on a
//! pseudo-terminal the test holds — so were the sandbox to let a build type into a terminal,
//! it would be that one, never the terminal `cargo test` runs in.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cairn_tests::{bin_dir, processes, require_peer, TestStore};
use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// What the builder types, if anything lets it.
const INJECTED: &str = "CAIRN-INJECTED";

/// Set in the child process that runs a test inside a session on a pseudo-terminal.
const IN_SESSION: &str = "CAIRN_E2E_IN_TERMINAL_SESSION";

/// The hostile builder, compiled once per test process (`None`: no C compiler; skip).
fn hostile_builder() -> Option<&'static Path> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if !require_peer("cc") {
                return None;
            }
            let dir = bin_dir();
            let src = dir.join(format!("cairn-hostile-{}.c", std::process::id()));
            let bin = dir.join(format!("cairn-hostile-{}", std::process::id()));
            std::fs::write(&src, include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/build_hostile/hostile.c")))
                .unwrap();
            let out = Command::new("cc").args(["-static", "-O1", "-o"]).arg(&bin).arg(&src).output().unwrap();
            let _ = std::fs::remove_file(&src);
            assert!(
                out.status.success(),
                "cc -static failed (is a static libc installed? Debian: libc6-dev):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // One file however many test processes compiled it (renaming over it is atomic).
            let kept = dir.join("cairn-hostile-builder");
            std::fs::rename(&bin, &kept).unwrap();
            Some(kept)
        })
        .as_deref()
}

/// A daemon with `config`, and the hostile builder added to its store (its store path).
fn store(config: &str) -> Option<(TestStore, String)> {
    let builder = hostile_builder()?;
    let s = TestStore::builder().store_dir("/nix/store").config(&format!("max-jobs = 4\n{config}")).start();
    let path = s.ok(&["add", "--name", "hostile", builder.to_str().unwrap()]).trim().to_owned();
    Some((s, path))
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Adds a derivation whose builder is `hostile MODE`; returns (drv path, output path).
fn add(s: &TestStore, hostile: &str, mode: &str) -> (String, String) {
    let name = format!("{mode}-{}", COUNTER.fetch_add(1, Ordering::Relaxed));
    let json = serde_json::json!({
        "outputs": { "out": { "path": "" } },
        "inputSrcs": [hostile],
        "inputDrvs": {},
        "system": "x86_64-linux",
        "builder": hostile,
        "args": [mode],
        "env": { "name": name, "builder": hostile, "system": "x86_64-linux", "out": "" },
    });
    let f = s.root.path().join(format!("{name}.json"));
    std::fs::write(&f, json.to_string()).unwrap();
    let drv = s.ok(&["derivation", "add", f.to_str().unwrap()]).trim().to_owned();
    let out = s.ok(&["derivation", "output-paths", &drv]).trim().to_owned();
    (drv, out)
}

/// Builds `drv`, asserting failure; returns cairn's stderr.
fn build_fails(s: &TestStore, drv: &str) -> String {
    let out = s.run(&["realise", drv], b"");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the build of {drv} should fail:\n{err}");
    err
}

/// Field `n` (1-based, as in proc(5)) of `/proc/PID/stat`.
fn stat_field(pid: &str, n: usize) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    after.split_whitespace().nth(n - 3).unwrap().parse().unwrap()
}

/// A pseudo-terminal that is this process's controlling terminal.
struct Terminal {
    master: File,
    slave: File,
}

impl Terminal {
    /// Opens a pty pair and makes the slave the controlling terminal of this process, which
    /// must lead a session without one (the child [`in_a_terminal_session`] starts).
    fn take() -> Terminal {
        use nix::libc;
        use std::os::unix::fs::OpenOptionsExt;
        let master =
            std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open("/dev/ptmx").unwrap();
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `master` is an open pty master for the duration of the calls, and `name` is a
        // writable buffer of the length given.
        #[allow(unsafe_code)]
        let ok = unsafe {
            libc::grantpt(master.as_raw_fd()) == 0
                && libc::unlockpt(master.as_raw_fd()) == 0
                && libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) == 0
        };
        assert!(ok, "cannot set up a pty: {}", std::io::Error::last_os_error());
        let path: String = name.iter().take_while(|&&c| c != 0).map(|&c| c as u8 as char).collect();
        // Without O_NOCTTY: a session leader with no terminal gets this one.
        let slave = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        assert_ne!(stat_field("self", 7), 0, "{path} is now this process's controlling terminal");
        for f in [&master, &slave] {
            fcntl(f, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
        }
        Terminal { master, slave }
    }

    /// Everything waiting to be read on one side, without blocking.
    fn drain(mut f: &File) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => break,
                Err(e) => panic!("reading the pty: {e}"),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Input typed (or injected) into the terminal, as a shell reading it would get it, and
    /// the terminal's echo of it.
    fn typed_and_echoed(&self) -> (String, String) {
        (Terminal::drain(&self.slave), Terminal::drain(&self.master))
    }

    /// Injects `text` as this process may (the terminal is its own), to show that
    /// [`Terminal::typed_and_echoed`] sees an injection; false where the kernel refuses
    /// `TIOCSTI` to everyone (`dev.tty.legacy_tiocsti = 0` without `CAP_SYS_ADMIN`).
    fn inject_as_owner(&self, text: &str) -> bool {
        for b in text.bytes() {
            // SAFETY: TIOCSTI reads one byte at the pointer given, which points to `b`.
            #[allow(unsafe_code)]
            let r = unsafe { nix::libc::ioctl(self.slave.as_raw_fd(), nix::libc::TIOCSTI, &b as *const u8) };
            if r < 0 {
                return false;
            }
        }
        true
    }
}

/// Runs `test` (this test's own name) again in a child process that leads a new session, where
/// `body` gets a pseudo-terminal as the controlling terminal; in that child, runs `body`.
fn in_a_terminal_session(test: &str, body: impl FnOnce(&Terminal)) {
    if std::env::var_os(IN_SESSION).is_some() {
        // Kept open until the process ends: closing the master hangs the terminal up, and the
        // kernel sends SIGHUP to this process, its session leader.
        return body(Box::leak(Box::new(Terminal::take())));
    }
    if !require_peer("setsid") || hostile_builder().is_none() {
        return;
    }
    let out = Command::new("setsid")
        .arg("--wait")
        .arg(std::env::current_exe().unwrap())
        .args([&cairn_tests::test_name(module_path!(), test), "--exact", "--nocapture", "--test-threads=1"])
        .env(IN_SESSION, "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test} in its terminal session ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_build_cannot_type_into_the_terminal_cairnd_was_started_from() {
    in_a_terminal_session("a_build_cannot_type_into_the_terminal_cairnd_was_started_from", |tty| {
        // The check sees an injection when there is one.
        if tty.inject_as_owner(&format!("echo {INJECTED}-CONTROL\n")) {
            let (typed, _) = tty.typed_and_echoed();
            assert!(typed.contains(&format!("{INJECTED}-CONTROL")), "the control injection reads back: {typed:?}");
        } else {
            eprintln!("note: TIOCSTI is refused to everyone here; the build's attempts are still checked");
        }
        // The terminal is also open in cairnd as an inherited descriptor, as a shell's often is.
        let inherited = fcntl(&tty.slave, FcntlArg::F_DUPFD(9)).unwrap();
        let Some((s, hostile)) = store("") else { return };
        let daemon = s.pid().to_string();
        assert_eq!(stat_field(&daemon, 7), stat_field("self", 7), "cairnd has the pty as its controlling terminal");
        assert!(std::fs::read_link(format!("/proc/{daemon}/fd/{inherited}")).unwrap().starts_with("/dev/pts/"));

        let (drv, out) = add(&s, &hostile, "tty");
        s.ok(&["realise", &drv]);
        let report = s.ok(&["cat", &out]);
        let (typed, echoed) = tty.typed_and_echoed();
        assert!(!typed.contains(INJECTED), "the build typed into the terminal: {typed:?}\n{report}");
        assert!(!echoed.contains(INJECTED), "the terminal echoed the build's input: {echoed:?}\n{report}");

        let lines: BTreeSet<&str> = report.lines().collect();
        assert!(lines.contains("tty_nr 0"), "the builder has no controlling terminal:\n{report}");
        assert!(lines.contains("session_leader 1"), "the builder leads a session of its own:\n{report}");
        assert!(lines.contains("open /dev/tty ENOENT"), "there is no /dev/tty in the sandbox:\n{report}");
        // A new terminal comes only from the sandbox's private devpts (as in Nix): its own, none
        // of the host's — the injections below reach nothing.
        assert!(lines.contains("open /dev/ptmx ok"), "the build's own pseudo-terminals:\n{report}");
        let injections: Vec<&str> = report.lines().filter(|l| l.starts_with("inject ")).collect();
        for fd in 0..=2 {
            assert!(injections.iter().any(|l| l.starts_with(&format!("inject fd {fd} "))), "fd {fd} tried:\n{report}");
        }
        assert!(injections.iter().all(|l| !l.ends_with(" ok")), "every TIOCSTI was refused:\n{report}");
    });
}

#[test]
fn an_auto_started_daemon_leaves_the_terminal_of_the_command_that_started_it() {
    in_a_terminal_session("an_auto_started_daemon_leaves_the_terminal_of_the_command_that_started_it", |_tty| {
        let root = tempfile::Builder::new().prefix("cairn-tests-auto-").tempdir().unwrap();
        let config = root.path().join("cairn.toml");
        std::fs::write(&config, "").unwrap();
        let socket = root.path().join("sock");
        let out = Command::new(bin_dir().join("cairn"))
            .arg("--root")
            .arg(root.path())
            .args(["--store-dir", "/store", "--socket"])
            .arg(&socket)
            .arg("--config")
            .arg(&config)
            .args(["gc", "--print-roots"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        let pid = err
            .split("(pid ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .unwrap_or_else(|| panic!("no start message: {err}"))
            .to_owned();
        let stop = || {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid.parse().unwrap()),
                nix::sys::signal::Signal::SIGTERM,
            );
        };
        let (session, tty_nr) = (stat_field(&pid, 6), stat_field(&pid, 7));
        let stdin = std::fs::read_link(format!("/proc/{pid}/fd/0"));
        stop();
        assert_eq!(session.to_string(), pid, "the daemon leads a session of its own");
        assert_eq!(tty_nr, 0, "the daemon has no controlling terminal");
        assert_eq!(stdin.unwrap(), Path::new("/dev/null"));
        let _ = Command::new("chmod").args(["-R", "u+w"]).arg(root.path()).status();
    });
}

#[test]
fn a_build_sees_no_descriptor_cairnd_inherited() {
    if hostile_builder().is_none() {
        return;
    }
    // A secret file and the host's root, open in this process without close-on-exec, so that
    // cairnd inherits them (as from a careless parent). They stay open for the rest of this
    // test process: other tests' daemons inherit them too, which costs nothing.
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("shadow");
    std::fs::write(&secret, "root:cairn-secret:19000::::::\n").unwrap();
    let secret_fd = fcntl(File::open(&secret).unwrap(), FcntlArg::F_DUPFD(7)).unwrap();
    let root_fd = fcntl(File::open("/").unwrap(), FcntlArg::F_DUPFD(8)).unwrap();
    let Some((s, hostile)) = store("") else { return };
    let daemon = s.pid();
    assert_eq!(std::fs::read_link(format!("/proc/{daemon}/fd/{secret_fd}")).unwrap(), secret);
    assert_eq!(std::fs::read_link(format!("/proc/{daemon}/fd/{root_fd}")).unwrap(), Path::new("/"));
    // cairnd marks what it inherited close-on-exec at start, so that nothing it runs (runc,
    // crun, helpers) gets them either.
    for fd in [secret_fd, root_fd] {
        let info = std::fs::read_to_string(format!("/proc/{daemon}/fdinfo/{fd}")).unwrap();
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
        let flags = u32::from_str_radix(flags, 8).unwrap();
        assert_ne!(flags & 0o2000000, 0, "fd {fd} of cairnd is not close-on-exec: {info}");
    }

    let (drv, out) = add(&s, &hostile, "fds");
    s.ok(&["realise", &drv]);
    let report = s.ok(&["cat", &out]);
    let fds: BTreeSet<u32> = report.lines().filter_map(|l| l.split(' ').next()?.parse().ok()).collect();
    assert_eq!(fds, BTreeSet::from([0, 1, 2]), "only stdin, stdout and stderr:\n{report}");
    assert!(report.contains("0 /dev/null"), "{report}");
    assert!(!report.contains("shadow") && !report.lines().any(|l| l.ends_with(" /")), "{report}");
}

#[test]
fn a_fork_bomb_stops_at_build_max_processes_and_the_daemon_keeps_serving() {
    let Some((s, hostile)) = store("build-max-processes = 64\ntimeout = 120") else { return };
    let argv0 = hostile.rsplit('/').next().unwrap().to_owned();
    let (bomb, bomb_out) = add(&s, &hostile, "forkbomb");
    let (other, other_out) = add(&s, &hostile, "fds");
    let started = Instant::now();
    let building = std::thread::spawn({
        let mut c = s.cairn();
        c.args(["realise", &bomb]);
        move || c.output().unwrap()
    });
    // While the bomb goes off (its first process keeps it going for 5 s after its first refused
    // fork), count its processes on the host, and ask the daemon for things.
    while processes(&[&argv0, "forkbomb"]).len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(60), "the bomb never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut most = 0;
    for _ in 0..10 {
        most = most.max(processes(&[&argv0, "forkbomb"]).len());
        std::thread::sleep(Duration::from_millis(50));
    }
    let answered = Instant::now();
    s.ok(&["path-info", &hostile]);
    let answer_time = answered.elapsed();
    let bomb_still_going = !processes(&[&argv0, "forkbomb"]).is_empty();
    assert_eq!(s.ok(&["realise", &other]).trim(), other_out, "another build runs beside the bomb");
    let r = building.join().unwrap();
    let err = String::from_utf8_lossy(&r.stderr).into_owned();
    assert!(!r.status.success(), "{err}");
    assert!(err.contains("build-max-processes = 64"), "the failure names the limit: {err}");
    assert!(most > 1 && most <= 64, "at most 64 of the bomb's processes at once, saw {most}");
    assert!(answer_time < Duration::from_secs(10), "the daemon answered in {answer_time:?}");
    assert!(bomb_still_going, "the daemon answered while the bomb was going off");
    let log = s.ok(&["log", &bomb]);
    assert!(log.contains("fork: Resource temporarily unavailable"), "{log}");
    let inside: usize = log
        .lines()
        .find_map(|l| l.strip_prefix("processes in the sandbox: "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    assert!(inside <= 64, "{inside} processes in the sandbox");
    std::thread::sleep(Duration::from_millis(200));
    assert!(processes(&[&argv0, "forkbomb"]).is_empty(), "the bomb died with its build");
    assert!(!s.run(&["path-info", &bomb_out], b"").status.success());
}

#[test]
fn dev_shm_is_capped_at_sandbox_dev_shm_size() {
    let Some((s, hostile)) = store("sandbox-dev-shm-size = \"8M\"") else { return };
    let (drv, out) = add(&s, &hostile, "shm");
    let err = build_fails(&s, &drv);
    assert!(err.contains("/dev/shm is full: sandbox-dev-shm-size = 8M"), "the failure names the limit: {err}");
    let log = s.ok(&["log", &drv]);
    assert!(log.contains("/dev/shm holds 8192 KiB"), "{log}");
    let written: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("write /dev/shm/fill: No space left on device after "))
        .and_then(|r| r.strip_suffix(" MiB"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    assert!(written <= 8, "{written} MiB");
    assert!(!s.run(&["path-info", &out], b"").status.success());
    let (ok, ok_out) = add(&s, &hostile, "fds");
    assert_eq!(s.ok(&["realise", &ok]).trim(), ok_out, "the daemon still builds");
}

#[test]
fn an_output_over_build_max_output_size_is_refused_naming_the_setting() {
    let Some((s, hostile)) = store("build-max-output-size = 1048576") else { return };
    let (drv, out) = add(&s, &hostile, "sparse");
    let started = Instant::now();
    let err = build_fails(&s, &drv);
    let why = format!("output '{out}' is larger than build-max-output-size (1048576 bytes as a NAR)");
    assert!(err.contains(&why), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "a sparse 2 GiB output is refused without reading it all");
    assert!(!s.run(&["path-info", &out], b"").status.success());
    assert!(!s.real_store_dir().join(out.rsplit('/').next().unwrap()).exists(), "nothing placed in the store");
}
