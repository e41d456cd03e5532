//! The soak's slow clients: realisations whose event streams are not read, registry request
//! heads sent a byte at a time, downloads never read. Each loops until the deadline and sums up
//! what became of its attempts in one line.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{add_rooted_drv, exec, Mix, CHATTY_LINES, OP_LIMIT};
use crate::fmt_secs;

/// Whether the TCP connection from local port `port` has been closed by its peer (it is in
/// CLOSE_WAIT, or gone), from `/proc/net/tcp`. The peer's FIN comes after the data it sent, so
/// a close behind a full receive window (a download never read) shows only once read.
fn closed_by_peer(port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else { return false };
    let want = format!(":{port:04X}");
    for l in table.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 3 && f[1].ends_with(&want) {
            // 01 ESTABLISHED; 08 CLOSE_WAIT (the peer sent FIN); 07 CLOSE.
            return f[3] != "01";
        }
    }
    true
}

/// Reads what a stalled client never read, for up to `wait`: the bytes, and whether the stream
/// ended (the daemon closed it) rather than going quiet.
fn drain(s: &mut impl Read, wait: Duration) -> (u64, bool) {
    let start = Instant::now();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    while start.elapsed() < wait {
        match s.read(&mut buf) {
            Ok(0) => return (total, true),
            Ok(n) => total += n as u64,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return (total, false)
            }
            Err(_) => return (total, true),
        }
    }
    (total, false)
}

/// How long a stalled client holds its connection before it reads what came (and so learns
/// whether the daemon closed it): the default `send-timeout` and half a minute more.
const HOLD: Duration = Duration::from_secs(90);

/// What became of one stalled download.
enum Stall {
    /// The daemon closed it, after these seconds if seen (TCP), having sent part of the answer.
    Cut(Option<f64>),
    /// Never cut: once read, the whole answer came.
    Whole,
    /// Never cut: once read, part of it came, then silence.
    Silent,
    Failed(String),
}

/// One stalled download: sends `request` on `s`, reads nothing for [`HOLD`] (or until the
/// deadline, or a little after the daemon closed it: for TCP, `port` being its local port, the
/// close shows in `/proc/net/tcp`), then reads what came.
fn stalled_download<S: Read + Write>(
    mut s: S,
    request: &str,
    port: Option<u16>,
    deadline: Instant,
    full: u64,
) -> Stall {
    let start = Instant::now();
    if let Err(e) = s.write_all(request.as_bytes()) {
        return Stall::Failed(format!("could not send the request: {e}"));
    }
    let mut cut_at = None;
    while Instant::now() < deadline && start.elapsed() < HOLD && cut_at.is_none() {
        std::thread::sleep(Duration::from_millis(500));
        if port.is_some_and(closed_by_peer) {
            cut_at = Some(start.elapsed().as_secs_f64());
        }
    }
    let (got, ended) = drain(&mut s, Duration::from_secs(20));
    match (ended, got < full) {
        (true, true) => Stall::Cut(cut_at),
        (_, false) => Stall::Whole,
        (false, true) => Stall::Silent,
    }
}

/// Stalled downloads one after another until the deadline, each on a fresh connection from
/// `connect` (the stream and, for TCP, its local port); a summary of what became of them.
pub(super) fn stalled_downloads<S: Read + Write>(
    connect: impl Fn() -> std::io::Result<(S, Option<u16>)>,
    request: &str,
    deadline: Instant,
    full: u64,
) -> String {
    let (mut cut, mut seen, mut whole, mut silent, mut failed) = (0, Vec::new(), 0, 0, Vec::new());
    while Instant::now() < deadline {
        let stall = match connect() {
            Ok((s, port)) => stalled_download(s, request, port, deadline, full),
            Err(e) => Stall::Failed(format!("cannot connect: {e}")),
        };
        match stall {
            Stall::Cut(t) => {
                cut += 1;
                seen.extend(t);
            }
            Stall::Whole => whole += 1,
            Stall::Silent => silent += 1,
            Stall::Failed(e) => {
                failed.push(e);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    let mut out = format!("{} stalls: {cut} cut by cairnd", cut + whole + silent + failed.len());
    if !seen.is_empty() {
        let (lo, hi) = (seen.iter().cloned().fold(f64::MAX, f64::min), seen.iter().cloned().fold(0.0, f64::max));
        out.push_str(&format!(" (closed {}–{} after the request)", fmt_secs(lo), fmt_secs(hi)));
    }
    if whole > 0 {
        out.push_str(&format!(", {whole} never cut (the whole answer came once read)"));
    }
    if silent > 0 {
        out.push_str(&format!(", {silent} never cut (part came once read, then silence)"));
    }
    if let Some(e) = failed.first() {
        out.push_str(&format!(", {} failed ({e})", failed.len()));
    }
    out
}

/// A registry request head sent to `port` one byte every half second, over and over until the
/// deadline; reports how long the daemon let each attempt go on.
pub(super) fn trickler(port: u16, deadline: Instant) -> String {
    // A head that never ends: every byte the daemon reads is one more of the same header.
    let head = b"GET /v2/ HTTP/1.1\r\nHost: soak\r\nX-Slow: ";
    let mut cuts = Vec::new();
    let mut completed = 0;
    while Instant::now() < deadline {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            std::thread::sleep(Duration::from_secs(1));
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(1)));
        let start = Instant::now();
        let mut cut = false;
        for b in head.iter().chain(std::iter::repeat(&b'a')) {
            if Instant::now() >= deadline {
                break;
            }
            if s.write_all(&[*b]).is_err() {
                cut = true;
                break;
            }
            let mut buf = [0u8; 256];
            match s.read(&mut buf) {
                Ok(_) => {
                    // Closed (0) or answered (a 408, or the answer to a whole head).
                    cut = true;
                    break;
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => {
                    cut = true;
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        if cut {
            cuts.push(start.elapsed().as_secs_f64());
        } else {
            completed += 1;
        }
    }
    let max = cuts.iter().cloned().fold(0.0, f64::max);
    format!("{} attempts cut by cairnd (longest {}), {} still open at the end", cuts.len(), fmt_secs(max), completed)
}

/// Realisations one after another until the deadline, each of a new derivation whose builder
/// prints ~15 MB of log, requested on a raw connection whose answer (the event stream with the
/// log) is not read for [`HOLD`]; a summary of when their outputs became valid (the builds must
/// not wait for the client) and whether the daemon closed the streams.
pub(super) fn log_follower(mix: &Mix, socket: &Path, dir: &Path, name: &str, deadline: Instant) -> String {
    let (mut valid, mut never, mut closed, mut failed) = (Vec::new(), 0, 0, Vec::new());
    let mut n = 0;
    while Instant::now() < deadline {
        n += 1;
        match follow_once(mix, socket, &dir.join(format!("attempt-{n}")), &format!("{name}-{n}"), deadline) {
            Ok((valid_at, ended)) => {
                match valid_at {
                    Some(t) => valid.push(t),
                    None => never += 1,
                }
                closed += usize::from(ended);
            }
            Err(e) => {
                failed.push(e);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    let mut out = format!("{} builds: {} outputs valid while unread", valid.len() + never + failed.len(), valid.len());
    if !valid.is_empty() {
        let (lo, hi) = (valid.iter().cloned().fold(f64::MAX, f64::min), valid.iter().cloned().fold(0.0, f64::max));
        out.push_str(&format!(" (after {}–{})", fmt_secs(lo), fmt_secs(hi)));
    }
    out.push_str(&format!(", {never} still building when read; {closed} streams closed by cairnd"));
    if let Some(e) = failed.first() {
        out.push_str(&format!("; {} failed ({e})", failed.len()));
    }
    out
}

/// One unread realisation of [`log_follower`]: when its output became valid (seconds after the
/// request), and whether the daemon had closed the stream when it was read.
fn follow_once(
    mix: &Mix,
    socket: &Path,
    dir: &Path,
    name: &str,
    deadline: Instant,
) -> Result<(Option<f64>, bool), String> {
    let _ = std::fs::create_dir_all(dir);
    let script = format!(
        "i=0; while [ $i -lt {CHATTY_LINES} ]; do echo \"log line $i of a builder that talks a lot, padding\"; \
         i=$((i+1)); done; echo $name > $out"
    );
    let drv = add_rooted_drv(mix, dir, name, &script).ok_or("could not add its derivation")?;
    let mut c = mix.cairn();
    c.args(["derivation", "output-paths", &drv]);
    let out = exec(c, None, OP_LIMIT).0.map_err(|e| format!("no output path: {e}"))?.trim().to_owned();
    let body = serde_json::json!({ "paths": [drv] }).to_string();
    let request = format!(
        "POST /v1/realise HTTP/1.1\r\nHost: cairnd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = UnixStream::connect(socket).map_err(|e| format!("cannot connect: {e}"))?;
    let start = Instant::now();
    s.write_all(request.as_bytes()).map_err(|e| format!("could not send the request: {e}"))?;
    let mut valid_at = None;
    while Instant::now() < deadline && start.elapsed() < HOLD {
        if valid_at.is_none() {
            let mut c = mix.cairn();
            c.args(["path-info", &out]);
            if exec(c, None, OP_LIMIT).0.is_ok() {
                valid_at = Some(start.elapsed().as_secs_f64());
                // Its log is one the mix reads (the .drv stays rooted until the end).
                mix.chatty.lock().unwrap().push(drv.clone());
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let (_, ended) = drain(&mut s, Duration::from_secs(30));
    Ok((valid_at, ended))
}
