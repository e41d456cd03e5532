//! A binary cache written for tests, std only (a `TcpListener` and a thread per connection): it
//! serves the files of a directory (a cache that `cairn copy --to file://` wrote) and, for the
//! request targets a test names, lies instead — other bytes, an error status, a body cut short,
//! one without end, a stall, or silence — and logs what it was asked. The hostile-cache suite
//! uses it; beside it, [`crate::fake_registry`] does the same for OCI registries.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the server answers to one request target.
#[derive(Clone)]
pub enum Reply {
    /// The file of that name in the served directory, or 404.
    File,
    /// 200 with these bytes.
    Bytes(Vec<u8>),
    /// This status, empty body.
    Status(u16),
    /// `Content-Length: claimed`, then `body` (shorter), then the connection is closed.
    CutShort { body: Vec<u8>, claimed: usize },
    /// No `Content-Length` (the body ends when the connection does): `prefix`, then zeros until
    /// the client hangs up.
    Endless(Vec<u8>),
    /// Headers promising a megabyte more than `prefix`, `prefix`, then silence until the client
    /// hangs up.
    Stall(Vec<u8>),
    /// The request is read and never answered.
    Silent,
}

#[derive(Default)]
pub struct Log {
    /// Request targets, in arrival order.
    pub requests: Mutex<Vec<String>>,
    /// Bytes of `Endless` bodies written.
    pub endless_sent: AtomicU64,
    /// `Endless`, `Stall` and `Silent` answers the client gave up on (closed the connection).
    pub hung_up: AtomicU64,
}

/// A running fake cache; its threads live until the process ends.
pub struct FakeCache {
    pub port: u16,
    dir: PathBuf,
    rules: Arc<Mutex<HashMap<String, Reply>>>,
    pub log: Arc<Log>,
}

impl FakeCache {
    /// Serves `dir` on a free loopback port, telling the truth until [`FakeCache::set`] is called.
    pub fn start(dir: &Path) -> FakeCache {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let rules: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
        let log: Arc<Log> = Arc::default();
        let (r, l, d) = (rules.clone(), log.clone(), dir.to_owned());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (r, l, d) = (r.clone(), l.clone(), d.clone());
                std::thread::spawn(move || serve(conn, &d, &r, &l));
            }
        });
        FakeCache { port, dir: dir.to_owned(), rules, log }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Answers requests for `target` (e.g. `/HASH.narinfo`) with `reply` from now on.
    pub fn set(&self, target: &str, reply: Reply) {
        self.rules.lock().unwrap().insert(target.to_owned(), reply);
    }

    /// Tells the truth again.
    pub fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// Whether any request target started with `prefix`.
    pub fn requested_any(&self, prefix: &str) -> bool {
        self.log.requests.lock().unwrap().iter().any(|t| t.starts_with(prefix))
    }

    /// The served file `rel` (relative to the served directory), as it is on disk.
    pub fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(rel)).unwrap()
    }

    /// How many requests for `target` arrived.
    pub fn requests_for(&self, target: &str) -> usize {
        self.log.requests.lock().unwrap().iter().filter(|t| *t == target).count()
    }

    /// Waits (up to 5 s) until the client has hung up on `n` hostile answers in all.
    pub fn wait_hung_up(&self, n: u64) {
        let start = Instant::now();
        while self.log.hung_up.load(Ordering::SeqCst) < n {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the daemon still holds a hostile connection open ({} of {n} closed)",
                self.log.hung_up.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn head(status: u16, len: Option<usize>) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Whatever",
    };
    let len = len.map(|n| format!("Content-Length: {n}\r\n")).unwrap_or_default();
    format!("HTTP/1.1 {status} {reason}\r\n{len}Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

/// Blocks until the peer closes the connection (true) or 30 s pass (false).
fn wait_for_hang_up(conn: &mut TcpStream) -> bool {
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

fn serve(mut conn: TcpStream, dir: &Path, rules: &Mutex<HashMap<String, Reply>>, log: &Log) {
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    conn.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
        if request.len() > 1 << 16 {
            return;
        }
    }
    let target = String::from_utf8_lossy(&request).split_whitespace().nth(1).unwrap_or("/").to_owned();
    log.requests.lock().unwrap().push(target.clone());
    let reply = rules.lock().unwrap().get(&target).cloned().unwrap_or(Reply::File);
    let send = |conn: &mut TcpStream, status: u16, body: &[u8]| {
        let _ = conn.write_all(&head(status, Some(body.len()))).and_then(|_| conn.write_all(body));
    };
    match reply {
        Reply::File => match std::fs::read(dir.join(target.trim_start_matches('/'))) {
            Ok(body) => send(&mut conn, 200, &body),
            Err(_) => send(&mut conn, 404, b""),
        },
        Reply::Bytes(body) => send(&mut conn, 200, &body),
        Reply::Status(status) => send(&mut conn, status, b""),
        Reply::CutShort { body, claimed } => {
            let _ = conn.write_all(&head(200, Some(claimed))).and_then(|_| conn.write_all(&body));
        }
        Reply::Endless(prefix) => {
            let _ = conn.write_all(&head(200, None));
            let mut ended = conn.write_all(&prefix).is_err();
            let zeros = vec![0u8; 256 << 10];
            while !ended && log.endless_sent.load(Ordering::SeqCst) < 8 << 30 {
                match conn.write(&zeros) {
                    Ok(n) => {
                        log.endless_sent.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    // A write timeout means the client stopped reading without hanging up.
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return,
                    Err(_) => ended = true,
                }
            }
            if ended {
                log.hung_up.fetch_add(1, Ordering::SeqCst);
            }
        }
        Reply::Stall(prefix) => {
            let _ = conn.write_all(&head(200, Some(prefix.len() + 1_000_000))).and_then(|_| conn.write_all(&prefix));
            if wait_for_hang_up(&mut conn) {
                log.hung_up.fetch_add(1, Ordering::SeqCst);
            }
        }
        Reply::Silent => {
            if wait_for_hang_up(&mut conn) {
                log.hung_up.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}
