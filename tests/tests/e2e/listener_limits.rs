//! Connection limits and request-head timeouts on cairnd's two listeners (the Unix socket and
//! `listen`).
//!
//! Regression tests for descriptor exhaustion: a few hundred idle or byte-trickling connections
//! from one user used to take every file descriptor of the daemon, whose accept loop then spun
//! logging "Too many open files" and served nobody. The socket tests switch users with `setpriv`
//! (util-linux) and so need root; they skip otherwise. Each test is bounded to a few seconds.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_tests::{free_port, wait_listening, TestStore};

/// The environment variables that make [`helper_holding_idle_connections`] hold connections.
const HOLD_SOCKET: &str = "CAIRN_E2E_HOLD_SOCKET";
const HOLD_COUNT: &str = "CAIRN_E2E_HOLD_COUNT";

/// Not a test of its own: run again by [`one_users_idle_connections_leave_other_users_served`]
/// as another user, it opens `$CAIRN_E2E_HOLD_COUNT` connections to the socket, says how many
/// it holds, and keeps them open, sending nothing, until its stdin closes. Without those
/// variables (an ordinary test run) it does nothing.
#[test]
fn helper_holding_idle_connections() {
    let (Some(socket), Some(count)) = (std::env::var_os(HOLD_SOCKET), std::env::var_os(HOLD_COUNT)) else {
        return;
    };
    let n: usize = count.to_str().and_then(|c| c.parse().ok()).expect("a count");
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        match UnixStream::connect(&socket) {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
    }
    // Straight to the pipe: `println!` in a test is captured by the harness.
    let mut out = std::io::stdout();
    writeln!(out, "HELD {} FAILED {failed}", held.len()).unwrap();
    out.flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// A process of `uid` holding `n` idle connections to the daemon's socket; they close when it is
/// dropped.
struct Holder(std::process::Child);

impl Holder {
    fn start(st: &TestStore, uid: u32, n: usize) -> Holder {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new("setpriv")
            .args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()])
            .arg(exe)
            .args([
                "--exact",
                &cairn_tests::test_name(module_path!(), "helper_holding_idle_connections"),
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HOLD_SOCKET, &st.socket)
            .env(HOLD_COUNT, n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run setpriv");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        while let Some(Ok(line)) = lines.next() {
            // The harness may have printed the test's name on the same line.
            if let Some((_, rest)) = line.split_once("HELD ") {
                eprintln!("holder: {n} connections tried, {rest}");
                // The rest (the harness's summary) is read, so that the holder ends quietly.
                std::thread::spawn(move || lines.for_each(drop));
                return Holder(child);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the holder ended before holding its connections");
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

fn can_switch_users() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: switching users needs root");
        return false;
    }
    cairn_tests::require_peer("setpriv")
}

fn log_lines(st: &TestStore) -> usize {
    st.log().lines().count()
}

/// Runs `f` and asserts it took less than a second.
fn within_a_second<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let r = f();
    assert!(start.elapsed() < Duration::from_secs(1), "{what} took {:?}", start.elapsed());
    r
}

#[test]
fn one_users_idle_connections_leave_other_users_served() {
    if !can_switch_users() {
        return;
    }
    // Default limits: they are what must protect a host.
    let st = TestStore::start();
    let f = st.root.path().join("f");
    std::fs::write(&f, b"served\n").unwrap();
    let p = st.ok(&["add", f.to_str().unwrap()]).trim().to_owned();
    let before = log_lines(&st);

    let holder = Holder::start(&st, 65534, 1000);
    // Root (the daemon's own user) and another unprivileged user are answered at once.
    within_a_second("root's query", || st.ok(&["path-info", &p]));
    let other = within_a_second("another user's query", || st.run_as(65533, &["path-info", &p], b""));
    assert!(other.status.success(), "uid 65533: {}", String::from_utf8_lossy(&other.stderr));
    // The user over the limit is told so, in one line (once the flood's own refusals, which
    // are answered a second at most, are done).
    std::thread::sleep(Duration::from_millis(1200));
    let own = st.run_as(65534, &["path-info", &p], b"");
    let e = String::from_utf8_lossy(&own.stderr);
    assert!(!own.status.success(), "nobody's 1001st connection was served");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(e.contains("too many connections from user 'nobody'"), "{e}");

    let logged = log_lines(&st) - before;
    assert!(logged < 100, "{logged} log lines for one user's flood:\n{}", st.log());
    drop(holder);
    // Their connections closed, the user is served again.
    let start = Instant::now();
    loop {
        let out = st.run_as(65534, &["path-info", &p], b"");
        if out.status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "nobody not served again: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the daemon refused `s`: answered it (503) or closed it, within `wait`.
fn refused_by_daemon(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        // Closed without a word, or answered with the refusal.
        Ok(n) => n == 0 || buf[..n].starts_with(b"HTTP/1.1 503"),
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

#[test]
fn idle_connections_from_one_address_are_capped_on_listen() {
    let port = free_port();
    let st =
        TestStore::builder().config(&format!("listen = \"127.0.0.1:{port}\"\nmax-connections-per-user = 50\n")).start();
    wait_listening(port);
    let before = log_lines(&st);
    let mut held: Vec<TcpStream> = (0..1000).filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok()).collect();
    assert_eq!(held.len(), 1000, "connects queue in the backlog");
    // Exactly 50 are kept; the daemon refused the others (answering a few, for a second).
    std::thread::sleep(Duration::from_millis(1200));
    held.retain_mut(|s| !refused_by_daemon(s, Duration::from_millis(5)));
    assert_eq!(held.len(), 50, "connections kept from 127.0.0.1");

    // Another address, and the socket, are served at once.
    if cairn_tests::require_peer("curl") {
        let out = within_a_second("a request from 127.0.0.2", || {
            Command::new("curl")
                .args(["-sS", "-m", "2", "--interface", "127.0.0.2"])
                .arg(format!("http://127.0.0.1:{port}/nix-cache-info"))
                .output()
                .unwrap()
        });
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && body.contains("StoreDir"), "{body} {}", String::from_utf8_lossy(&out.stderr));
    }
    within_a_second("a query on the socket", || st.ok(&["version"]));
    // 127.0.0.1 itself is refused with one line while it holds its 50.
    // (TCP may reset a connection closed with the request unread: then there is no answer.)
    if let Some((status, body)) = try_get(port, "/nix-cache-info") {
        assert_eq!(status, 503, "{body}");
        assert_eq!(
            body.trim_end(),
            "too many connections from address 127.0.0.1 (max-connections-per-user = 50); close some and try again"
        );
    }
    let logged = log_lines(&st) - before;
    assert!(logged < 100, "{logged} log lines for one address's flood:\n{}", st.log());
    drop(held);
    let start = Instant::now();
    while try_get(port, "/nix-cache-info").is_none_or(|(status, _)| status != 200) {
        assert!(start.elapsed() < Duration::from_secs(5), "127.0.0.1 not served again");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` on `127.0.0.1:port`: the status and body, or `None` if the connection broke.
fn try_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).ok()?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// Sends `head` one byte every 100 ms on `s` until the daemon closes the connection; returns
/// how long that took (`None`: the whole head went through).
fn trickle(mut s: UnixStream, head: &[u8]) -> Option<Duration> {
    let start = Instant::now();
    let mut reader = s.try_clone().unwrap();
    let closed = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    });
    for b in head {
        if closed.is_finished() || s.write_all(&[*b]).is_err() {
            return Some(closed.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn a_trickled_request_head_is_cut_at_the_header_read_timeout() {
    let st = TestStore::builder().config("header-read-timeout = 1\n").start();
    // The head of a real request, slowly: 10 bytes a second, far longer than 1 s in all.
    let head = b"GET /v1/version HTTP/1.1\r\nHost: cairnd\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let took = trickle(UnixStream::connect(&st.socket).unwrap(), head).expect("the trickled head was served");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "closed after {took:?}");
    // A connection that sends nothing at all is closed as soon.
    let mut idle = UnixStream::connect(&st.socket).unwrap();
    let start = Instant::now();
    let _ = idle.read(&mut [0u8; 16]);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "idle closed after {took:?}");
}

/// Reads an HTTP answer from `s` slowly (`chunk` bytes, then `pause`), to its end.
fn read_slowly(s: &mut UnixStream, chunk: usize, pause: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("the answer was cut after {} bytes: {e}", out.len()),
        }
        std::thread::sleep(pause);
    }
}

#[test]
fn a_long_answer_is_not_cut_by_the_header_read_timeout() {
    let st = TestStore::builder().config("header-read-timeout = 1\n").start();
    let f = st.root.path().join("big");
    let contents: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&f, &contents).unwrap();
    let p = st.ok(&["add", "--flat", f.to_str().unwrap()]).trim().to_owned();
    let mut s = UnixStream::connect(&st.socket).unwrap();
    write!(s, "GET /v1/cat?path={p} HTTP/1.1\r\nHost: cairnd\r\nConnection: close\r\n\r\n").unwrap();
    let start = Instant::now();
    // 4 MiB in 256 KiB reads 150 ms apart: well over the 1 s timeout.
    let answer = read_slowly(&mut s, 256 << 10, Duration::from_millis(150));
    assert!(start.elapsed() > Duration::from_secs(2), "read too fast to show anything: {:?}", start.elapsed());
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer[..answer.len().min(200)]));
    assert!(answer.ends_with(b"0\r\n\r\n"), "the chunked answer ends properly");
    assert!(answer.len() > contents.len(), "{} bytes for a 4 MiB file", answer.len());
}
