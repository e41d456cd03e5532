//! Hostile clients of cairnd's `nix-daemon-socket`: bytes no Nix would send, spoken raw to the
//! real daemon. Whatever a client sends, the daemon answers with `STDERR_ERROR` or closes that
//! one connection; it never crashes, hangs, allocates what a length claims, registers a path
//! whose NAR is bad or cut short, or leaves temporary files behind; and it keeps serving
//! everyone else (every test ends by handshaking afresh and asking `IsValidPath`).
//!
//! The client side is written here byte by byte (little-endian `u64`s, padded strings, framed
//! payloads) rather than with `cairn-worker`, so that every field can be made wrong. It speaks
//! protocol 1.35 (Nix 2.8's 1.34 plus the daemon's trust flag), and 1.20 and 1.22 where the NAR
//! of `AddToStoreNar` came bare or pulled with `STDERR_READ`. The untrusted client is this test
//! binary run again as user nobody (`setpriv`), so that the daemon sees its uid.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use cairn_tests::{bin_dir, Rng, TestStore};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use sha2::{Digest, Sha256};

const WORKER_MAGIC_1: u64 = 0x6e69_7863;
const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// Protocol 1.35.
const MINOR: u64 = 35;
const VERSION: u64 = (1 << 8) | MINOR;

const STDERR_NEXT: u64 = 0x6f6c_6d67;
const STDERR_READ: u64 = 0x6461_7461;
const STDERR_LAST: u64 = 0x616c_7473;
const STDERR_ERROR: u64 = 0x6378_7470;
const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
const STDERR_RESULT: u64 = 0x5253_4c54;

const OP_IS_VALID_PATH: u64 = 1;
const OP_QUERY_VALID_PATHS: u64 = 31;
const OP_ADD_TO_STORE_NAR: u64 = 39;
const OP_NAR_FROM_PATH: u64 = 38;
/// `CollectGarbage`: never sent by the fuzzer (it could collect the liveness check's path).
const OP_COLLECT_GARBAGE: u64 = 20;
/// `AddPermRoot` (1.36): never sent by the fuzzer (it makes a symlink where the client says).
const OP_ADD_PERM_ROOT: u64 = 47;

/// How long any read from the daemon may take before the test calls it a hang.
const TIMEOUT: Duration = Duration::from_secs(20);

/// The environment variable that turns [`helper_untrusted_client_process`] into the client
/// run as another user.
const HELPER_ENV: &str = "CAIRN_NIX_HOSTILE_HELPER_SOCKET";

// ---------------------------------------------------------------------------------------------
// The wire, by hand

fn put_u64(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(&n.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, s: &[u8]) {
    put_u64(buf, s.len() as u64);
    buf.extend_from_slice(s);
    buf.resize(buf.len() + (8 - s.len() % 8) % 8, 0);
}

/// Whether an I/O error is the daemon not answering in time (a hang) rather than a close.
fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn get_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn get_bytes(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let len = get_u64(r)?;
    assert!(len < 16 << 20, "the daemon sent a string of {len} bytes");
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    let mut pad = [0u8; 8];
    r.read_exact(&mut pad[..(8 - len as usize % 8) % 8])?;
    assert_eq!(pad, [0u8; 8], "the daemon's padding is zeros");
    Ok(v)
}

fn get_string(r: &mut impl Read) -> io::Result<String> {
    Ok(String::from_utf8_lossy(&get_bytes(r)?).into_owned())
}

/// How the daemon ended its answer to a request.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// `STDERR_LAST`: the result follows.
    Last,
    /// `STDERR_ERROR` with this message.
    Error(String),
    /// The connection was closed (or reset) before either.
    Closed,
    /// `STDERR_READ`: the daemon pulls this many bytes of a tunnelled payload (1.21–1.22).
    Read(u64),
}

/// Reads the logger messages of one answer up to `STDERR_LAST` or `STDERR_ERROR`; panics if
/// the daemon stays silent for [`TIMEOUT`] or sends something that is not a logger message.
fn read_reply(r: &mut impl Read) -> Reply {
    read_reply_v(r, MINOR)
}

/// [`read_reply`] for a client of protocol 1.`minor`; also stops at `STDERR_READ`.
fn read_reply_v(r: &mut impl Read, minor: u64) -> Reply {
    let res = (|| -> io::Result<Reply> {
        loop {
            match get_u64(r)? {
                STDERR_LAST => return Ok(Reply::Last),
                STDERR_READ => return Ok(Reply::Read(get_u64(r)?)),
                STDERR_ERROR if minor < 26 => {
                    let message = get_string(r)?;
                    let _exit_status = get_u64(r)?;
                    return Ok(Reply::Error(message));
                }
                STDERR_ERROR => {
                    // Protocol ≥ 1.26: "Error", level, "Error", message, no position, traces.
                    assert_eq!(get_string(r)?, "Error");
                    let _level = get_u64(r)?;
                    let _name = get_bytes(r)?;
                    let message = get_string(r)?;
                    assert_eq!(get_u64(r)?, 0, "no position");
                    for _ in 0..get_u64(r)? {
                        get_u64(r)?;
                        get_bytes(r)?;
                    }
                    return Ok(Reply::Error(message));
                }
                STDERR_NEXT => {
                    get_bytes(r)?;
                }
                STDERR_START_ACTIVITY => {
                    let (_id, _level, _kind) = (get_u64(r)?, get_u64(r)?, get_u64(r)?);
                    get_bytes(r)?;
                    read_fields(r)?;
                    get_u64(r)?;
                }
                STDERR_STOP_ACTIVITY => {
                    get_u64(r)?;
                }
                STDERR_RESULT => {
                    let (_id, _kind) = (get_u64(r)?, get_u64(r)?);
                    read_fields(r)?;
                }
                other => panic!("the daemon sent {other:#x}, not a logger message"),
            }
        }
    })();
    match res {
        Ok(reply) => reply,
        Err(e) if is_timeout(&e) => panic!("the daemon did not answer within {TIMEOUT:?}"),
        Err(_) => Reply::Closed,
    }
}

fn read_fields(r: &mut impl Read) -> io::Result<()> {
    for _ in 0..get_u64(r)? {
        match get_u64(r)? {
            0 => drop(get_u64(r)?),
            1 => drop(get_bytes(r)?),
            t => panic!("field type {t}"),
        }
    }
    Ok(())
}

/// Asserts that the daemon closes the connection (after whatever it still had to say) within
/// [`TIMEOUT`].
fn assert_closed(s: &mut UnixStream, what: &str) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if is_timeout(&e) => panic!("{what}: the daemon kept the connection open for {TIMEOUT:?}"),
            Err(_) => return,
        }
    }
}

/// A connection to the worker-protocol socket, with timeouts so that a hang fails the test.
fn connect(s: &TestStore) -> UnixStream {
    connect_path(&nix_socket(s))
}

fn connect_path(path: &std::path::Path) -> UnixStream {
    let c = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    c.set_write_timeout(Some(TIMEOUT)).unwrap();
    c
}

fn nix_socket(s: &TestStore) -> PathBuf {
    s.root.path().join("nix-socket")
}

/// The handshake of a protocol-1.35 client, up to and including the start-up log's
/// `STDERR_LAST`; returns the daemon's trust flag (1 trusted, 2 not).
fn handshake(c: &mut UnixStream) -> u64 {
    handshake_v(c, MINOR).expect("a trust flag")
}

/// The handshake of a client of protocol 1.`minor`; the trust flag comes from 1.35 on.
fn handshake_v(c: &mut UnixStream, minor: u64) -> Option<u64> {
    c.write_all(&WORKER_MAGIC_1.to_le_bytes()).unwrap();
    assert_eq!(get_u64(c).expect("the daemon's magic"), WORKER_MAGIC_2);
    let daemon = get_u64(c).unwrap();
    assert!(daemon >= VERSION, "daemon version {daemon:#x}");
    let mut hello = Vec::new();
    put_u64(&mut hello, (1 << 8) | minor);
    put_u64(&mut hello, 0); // no CPU affinity
    put_u64(&mut hello, 0); // no reserved space
    c.write_all(&hello).unwrap();
    if minor >= 33 {
        let nix_version = get_string(c).unwrap();
        assert!(nix_version.starts_with("2."), "{nix_version}");
    }
    let trust = if minor >= 35 { Some(get_u64(c).unwrap()) } else { None };
    assert_eq!(read_reply_v(c, minor), Reply::Last, "start-up log");
    trust
}

/// A fresh connection, handshaken.
fn session(s: &TestStore) -> UnixStream {
    let mut c = connect(s);
    handshake(&mut c);
    c
}

fn is_valid_request(path: &str) -> Vec<u8> {
    let mut req = Vec::new();
    put_u64(&mut req, OP_IS_VALID_PATH);
    put_bytes(&mut req, path.as_bytes());
    req
}

/// `IsValidPath` on an open session.
fn is_valid(c: &mut UnixStream, path: &str) -> bool {
    c.write_all(&is_valid_request(path)).unwrap();
    assert_eq!(read_reply(c), Reply::Last, "IsValidPath {path}");
    match get_u64(c).unwrap() {
        0 => false,
        1 => true,
        n => panic!("IsValidPath answered {n}"),
    }
}

/// `IsValidPath` on a fresh connection.
fn is_valid_fresh(s: &TestStore, path: &str) -> bool {
    is_valid(&mut session(s), path)
}

/// The daemon still serves: a new client handshakes, and `IsValidPath` tells a path it holds
/// from one it does not.
fn assert_daemon_serves(s: &TestStore, valid: &str) {
    let mut c = session(s);
    assert!(is_valid(&mut c, valid), "{valid} is valid; daemon log:\n{}", s.log());
    assert!(!is_valid(&mut c, &random_path(&mut Rng::new(7), "never-added")));
}

/// Adds a small file with the CLI: a path the liveness checks expect to be valid.
fn known_path(s: &TestStore) -> String {
    let f = s.root.path().join("known.txt");
    std::fs::write(&f, b"known to be valid\n").unwrap();
    s.ok(&["add", f.to_str().unwrap()]).trim_end().to_owned()
}

/// An input-addressed store path that nothing made (its hash part is random).
fn random_path(rng: &mut Rng, name: &str) -> String {
    const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let hash: String = (0..32).map(|_| rng.pick(NIX32) as char).collect();
    format!("/nix/store/{hash}-{name}")
}

#[test]
fn a_nar_nobody_reads_ends_its_session_at_the_send_timeout_and_others_are_served() {
    let s = TestStore::builder().store_dir("/nix/store").config("send-timeout = 1\n").start();
    let f = s.root.path().join("big");
    std::fs::write(&f, Rng::new(7).bytes(16 << 20)).unwrap();
    let big = s.ok(&["add", f.to_str().unwrap()]).trim_end().to_owned();
    let known = known_path(&s);
    let mut c = session(&s);
    let mut req = Vec::new();
    put_u64(&mut req, OP_NAR_FROM_PATH);
    put_bytes(&mut req, big.as_bytes());
    c.write_all(&req).unwrap();
    // Nothing read for well over the timeout: the daemon's write makes no progress, fails, and
    // the session ends; meanwhile everyone else is served.
    std::thread::sleep(Duration::from_secs(3));
    assert_daemon_serves(&s, &known);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let ended = loop {
        match c.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got += n,
            Err(e) if is_timeout(&e) => break false,
            Err(_) => break true,
        }
    };
    assert!(ended, "the daemon kept the stalled session open ({got} bytes came when read)");
    assert!(got < 16 << 20, "the whole NAR came ({got} bytes): the session was not cut");
}

// ---------------------------------------------------------------------------------------------
// NARs and AddToStoreNar

fn nar_strings(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        put_bytes(&mut v, p);
    }
    v
}

/// The NAR of a regular file.
fn nar_regular(contents: &[u8]) -> Vec<u8> {
    nar_strings(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents", contents, b")"])
}

/// The NAR of a directory with one regular file named `name`.
fn nar_dir_with_entry(name: &[u8], contents: &[u8]) -> Vec<u8> {
    nar_strings(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        name,
        b"node",
        b"(",
        b"type",
        b"regular",
        b"contents",
        contents,
        b")",
        b")",
        b")",
    ])
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// The head of an `AddToStoreNar` (protocol ≥ 1.23: a framed payload follows), unsigned, no
/// references, asking the daemon not to check signatures.
fn add_nar_head(path: &str, nar_hash_hex: &str, nar_size: u64) -> Vec<u8> {
    let mut req = Vec::new();
    put_u64(&mut req, OP_ADD_TO_STORE_NAR);
    put_bytes(&mut req, path.as_bytes());
    put_bytes(&mut req, b""); // deriver
    put_bytes(&mut req, nar_hash_hex.as_bytes());
    put_u64(&mut req, 0); // references
    put_u64(&mut req, 0); // registration time
    put_u64(&mut req, nar_size);
    put_u64(&mut req, 0); // ultimate
    put_u64(&mut req, 0); // signatures
    put_bytes(&mut req, b""); // content address
    put_u64(&mut req, 0); // repair
    put_u64(&mut req, 1); // dontCheckSigs
    req
}

/// `data` as frames of at most `chunk` bytes, with the terminating empty frame.
fn framed(data: &[u8], chunk: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for c in data.chunks(chunk) {
        put_u64(&mut v, c.len() as u64);
        v.extend_from_slice(c);
    }
    put_u64(&mut v, 0);
    v
}

/// A whole `AddToStoreNar` of `nar`, claiming `nar_hash_hex` and the NAR's real size.
fn add_nar_request(path: &str, nar: &[u8], nar_hash_hex: &str) -> Vec<u8> {
    let mut req = add_nar_head(path, nar_hash_hex, nar.len() as u64);
    req.extend(framed(nar, 4096));
    req
}

fn daemon_with_known_path() -> (TestStore, String) {
    let s = TestStore::builder().store_dir("/nix/store").start();
    let known = known_path(&s);
    (s, known)
}

// ---------------------------------------------------------------------------------------------
// The handshake and the request header

#[test]
fn bad_magic_closes_only_that_connection() {
    let (s, known) = daemon_with_known_path();
    for magic in [0u64, 0x6478_696f, u64::MAX, WORKER_MAGIC_1 + 1] {
        let mut c = connect(&s);
        c.write_all(&magic.to_le_bytes()).unwrap();
        assert_closed(&mut c, &format!("magic {magic:#x}"));
    }
    // Fewer than eight bytes, then gone.
    let mut c = connect(&s);
    c.write_all(b"cxi").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_closed(&mut c, "a short magic");
    // A client that speaks HTTP to the wrong socket.
    let mut c = connect(&s);
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_closed(&mut c, "HTTP");
    assert_daemon_serves(&s, &known);
}

#[test]
fn unsupported_client_versions_are_refused_without_harm() {
    let (s, known) = daemon_with_known_path();
    // Protocol 2.x, 1.9 (too old), and garbage.
    for version in [(2u64 << 8) | 1, (1 << 8) | 9, u64::MAX] {
        let mut c = connect(&s);
        c.write_all(&WORKER_MAGIC_1.to_le_bytes()).unwrap();
        assert_eq!(get_u64(&mut c).unwrap(), WORKER_MAGIC_2);
        get_u64(&mut c).unwrap();
        c.write_all(&version.to_le_bytes()).unwrap();
        assert_closed(&mut c, &format!("client version {version:#x}"));
    }
    assert_daemon_serves(&s, &known);
}

#[test]
fn unknown_and_removed_op_codes_are_reported_as_invalid_operations() {
    let (s, known) = daemon_with_known_path();
    for op in [0u64, 24, 25, 1000, u64::MAX] {
        let mut c = session(&s);
        let mut req = Vec::new();
        put_u64(&mut req, op);
        // Something that could be its fields, to show they are not followed.
        put_u64(&mut req, 42);
        c.write_all(&req).unwrap();
        match read_reply(&mut c) {
            Reply::Error(m) => assert!(m.contains("invalid operation"), "op {op}: {m}"),
            Reply::Closed => {}
            other => panic!("op {op} was answered: {other:?}"),
        }
        assert_closed(&mut c, &format!("op {op}"));
    }
    assert_daemon_serves(&s, &known);
}

// ---------------------------------------------------------------------------------------------
// Lengths, counts, padding, truncation

/// Sends `req` on a fresh session and asserts it is refused (an error, or a close) and that the
/// session then ends; the answer comes at once, so nothing waited for what the length claimed.
fn assert_refused_and_closed(s: &TestStore, req: &[u8], what: &str) -> Reply {
    let mut c = session(s);
    c.write_all(req).unwrap();
    let started = std::time::Instant::now();
    let reply = read_reply(&mut c);
    assert_ne!(reply, Reply::Last, "{what} was answered");
    assert_closed(&mut c, what);
    assert!(started.elapsed() < Duration::from_secs(10), "{what}: took {:?}", started.elapsed());
    reply
}

fn daemon_rss_kib(s: &TestStore) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn oversize_string_lengths_and_counts_are_refused_before_anything_is_allocated() {
    let (s, known) = daemon_with_known_path();
    let rss_before = daemon_rss_kib(&s);
    for len in [1u64 << 40, u64::MAX, (1 << 20) + 1] {
        let mut req = Vec::new();
        put_u64(&mut req, OP_IS_VALID_PATH);
        put_u64(&mut req, len);
        req.extend_from_slice(b"/nix/store/");
        let reply = assert_refused_and_closed(&s, &req, &format!("IsValidPath of a {len}-byte string"));
        if let Reply::Error(m) = reply {
            assert!(m.contains("bad request") || m.contains("long"), "{m}");
        }
    }
    for count in [1u64 << 40, u64::MAX, (1 << 20) + 1] {
        let mut req = Vec::new();
        put_u64(&mut req, OP_QUERY_VALID_PATHS);
        put_u64(&mut req, count);
        put_bytes(&mut req, known.as_bytes());
        assert_refused_and_closed(&s, &req, &format!("QueryValidPaths of {count} paths"));
    }
    // None of it was allocated (a 2^40-byte buffer would have failed or shown here).
    let rss_after = daemon_rss_kib(&s);
    assert!(rss_after < rss_before + (256 << 10), "the daemon grew from {rss_before} KiB to {rss_after} KiB");
    assert_daemon_serves(&s, &known);
}

/// A frame length over the reader's limit (4 GiB) puts the stream out of step: the daemon must
/// report it (or close) at once, not go on reading what follows as more frames. Checked for
/// each framed operation: AddToStoreNar, AddToStore and AddMultipleToStore.
#[test]
fn a_frame_claiming_two_to_the_forty_bytes_is_refused_at_once() {
    let (s, known) = daemon_with_known_path();
    let rss_before = daemon_rss_kib(&s);
    let nar = nar_regular(b"x");
    let path = random_path(&mut Rng::new(1), "huge-frame");
    let add_to_store_nar = add_nar_head(&path, &sha256_hex(&nar), nar.len() as u64);
    let mut add_to_store = Vec::new();
    put_u64(&mut add_to_store, 7);
    put_bytes(&mut add_to_store, b"huge-frame");
    put_bytes(&mut add_to_store, b"fixed:r:sha256");
    put_u64(&mut add_to_store, 0); // references
    put_u64(&mut add_to_store, 0); // repair
    let mut add_multiple = Vec::new();
    put_u64(&mut add_multiple, 44);
    put_u64(&mut add_multiple, 0); // repair
    put_u64(&mut add_multiple, 1); // dontCheckSigs
    for (what, mut req) in
        [("AddToStoreNar", add_to_store_nar), ("AddToStore", add_to_store), ("AddMultipleToStore", add_multiple)]
    {
        put_u64(&mut req, 1 << 40);
        req.extend_from_slice(&nar);
        // The client keeps the connection open and waits for the answer, as Nix's would.
        assert_refused_and_closed(&s, &req, &format!("{what}: a frame of 2^40 bytes"));
    }
    let rss_after = daemon_rss_kib(&s);
    assert!(rss_after < rss_before + (256 << 10), "the daemon grew from {rss_before} KiB to {rss_after} KiB");
    assert!(!is_valid_fresh(&s, &path));
    assert_daemon_serves(&s, &known);
}

/// The same frame, from a client that then stops writing: the session ends, nothing is
/// allocated or registered.
#[test]
fn a_frame_claiming_two_to_the_forty_bytes_from_a_client_that_stops_writing_ends_the_session() {
    let (s, known) = daemon_with_known_path();
    let rss_before = daemon_rss_kib(&s);
    let nar = nar_regular(b"x");
    let path = random_path(&mut Rng::new(1), "huge-frame");
    let mut req = add_nar_head(&path, &sha256_hex(&nar), nar.len() as u64);
    put_u64(&mut req, 1 << 40);
    req.extend_from_slice(&nar);
    let mut c = session(&s);
    c.write_all(&req).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_ne!(read_reply(&mut c), Reply::Last, "a frame of 2^40 bytes was accepted");
    assert_closed(&mut c, "a frame of 2^40 bytes");
    let rss_after = daemon_rss_kib(&s);
    assert!(rss_after < rss_before + (256 << 10), "the daemon grew from {rss_before} KiB to {rss_after} KiB");
    assert!(!is_valid_fresh(&s, &path));
    s.store_entries();
    assert_daemon_serves(&s, &known);
}

#[test]
fn a_length_within_limits_but_never_sent_ends_when_the_client_does() {
    let (s, known) = daemon_with_known_path();
    // 512 KiB announced, 16 bytes sent, then the client stops writing: the daemon must not
    // wait forever nor answer as if the string were whole.
    let mut c = session(&s);
    let mut req = Vec::new();
    put_u64(&mut req, OP_IS_VALID_PATH);
    put_u64(&mut req, 512 << 10);
    req.extend_from_slice(b"/nix/store/aaaaa");
    c.write_all(&req).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_ne!(read_reply(&mut c), Reply::Last);
    assert_closed(&mut c, "a truncated string");
    assert_daemon_serves(&s, &known);
}

#[test]
fn non_zero_string_padding_is_refused() {
    let (s, known) = daemon_with_known_path();
    // A path whose length is not a multiple of eight: its padding bytes must be zeros.
    let path = known.clone();
    assert_ne!(path.len() % 8, 0, "{path} needs padding");
    let mut req = is_valid_request(&path);
    let last = req.len() - 1;
    req[last] = 0xff;
    let reply = assert_refused_and_closed(&s, &req, "IsValidPath with non-zero padding");
    if let Reply::Error(m) = reply {
        assert!(m.contains("padding") || m.contains("bad request"), "{m}");
    }
    // The same request with zeros is answered.
    assert!(is_valid_fresh(&s, &path));
    assert_daemon_serves(&s, &known);
}

#[test]
fn truncated_requests_end_the_session_without_harm() {
    let (s, known) = daemon_with_known_path();
    let whole = {
        let nar = nar_regular(b"truncated");
        add_nar_request(&random_path(&mut Rng::new(3), "truncated"), &nar, &sha256_hex(&nar))
    };
    let requests: Vec<(&str, Vec<u8>)> = vec![
        ("IsValidPath", is_valid_request(&known)),
        ("QueryValidPaths", {
            let mut r = Vec::new();
            put_u64(&mut r, OP_QUERY_VALID_PATHS);
            put_u64(&mut r, 2);
            put_bytes(&mut r, known.as_bytes());
            put_bytes(&mut r, known.as_bytes());
            put_u64(&mut r, 0);
            r
        }),
        ("AddToStoreNar", whole),
    ];
    for (what, req) in &requests {
        // Cut at a few places: inside the op code, inside a length, inside a string, near the
        // end. (An AddToStoreNar is cut before its last NAR byte: one whose NAR came whole and
        // only the terminating frame is missing may be registered, as by Nix.)
        let end = if *what == "AddToStoreNar" { req.len() - 9 } else { req.len() - 1 };
        for cut in [3, 8, 12, req.len() / 2, end] {
            for close in [false, true] {
                let mut c = session(&s);
                c.write_all(&req[..cut]).unwrap();
                if close {
                    // Gone altogether; the daemon's read fails and its session ends.
                    drop(c);
                    continue;
                }
                c.shutdown(Shutdown::Write).unwrap();
                let reply = read_reply(&mut c);
                assert_ne!(reply, Reply::Last, "{what} cut at {cut} of {} was answered", req.len());
                assert_closed(&mut c, &format!("{what} cut at {cut}"));
            }
        }
    }
    assert!(!is_valid_fresh(&s, &random_path(&mut Rng::new(3), "truncated")), "a truncated add registered its path");
    let entries = s.store_entries();
    assert_eq!(entries.len(), 1, "only the known path: {entries:?}");
    assert_daemon_serves(&s, &known);
}

// ---------------------------------------------------------------------------------------------
// AddToStoreNar

/// Sends `req` on a fresh session, waits until the daemon has temporary work in the store
/// for it (up to `wait`), then vanishes; returns whether some was seen.
fn send_and_vanish(s: &TestStore, req: &[u8], wait: Duration) -> bool {
    let mut c = session(s);
    c.write_all(req).unwrap();
    let started = std::time::Instant::now();
    let mut seen = false;
    while started.elapsed() < wait {
        if !s.temp_work().is_empty() {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(c);
    seen
}

#[test]
fn a_client_that_vanishes_mid_nar_leaves_nothing_registered_and_no_temporary_files() {
    let (s, known) = daemon_with_known_path();
    let before = s.store_entries();
    let mut rng = Rng::new(11);
    let mut seen_tmp = 0;
    let mut gone = Vec::new();
    for (i, sent_fraction) in [0.0f64, 0.1, 0.5, 0.99].into_iter().enumerate() {
        let contents = rng.bytes(2 << 20);
        let nar = nar_regular(&contents);
        let path = random_path(&mut rng, &format!("vanished-{i}"));
        let mut req = add_nar_head(&path, &sha256_hex(&nar), nar.len() as u64);
        let sent = (nar.len() as f64 * sent_fraction) as usize;
        // A frame claiming the whole NAR, of which only part comes.
        put_u64(&mut req, nar.len() as u64);
        req.extend_from_slice(&nar[..sent]);
        let wait = Duration::from_millis(if sent == 0 { 200 } else { 2000 });
        seen_tmp += usize::from(send_and_vanish(&s, &req, wait));
        assert!(!is_valid_fresh(&s, &path), "{path} ({sent} of {} NAR bytes sent) was registered", nar.len());
        gone.push(path);
    }
    // The NAR sent in many small frames, the client gone between two of them.
    let nar = nar_regular(&rng.bytes(1 << 20));
    let path = random_path(&mut rng, "vanished-between-frames");
    let mut req = add_nar_head(&path, &sha256_hex(&nar), nar.len() as u64);
    let payload = framed(&nar, 4096);
    req.extend_from_slice(&payload[..payload.len() / 2 / 4104 * 4104]);
    seen_tmp += usize::from(send_and_vanish(&s, &req, Duration::from_secs(2)));
    assert!(!is_valid_fresh(&s, &path));
    gone.push(path);

    // AddToStore (content-addressed: anyone may) cut short, recursive and text: halfway, and
    // with the whole dump sent but not the empty frame that ends it (a path is committed only
    // once its payload has ended).
    let methods = [&b"fixed:r:sha256"[..], b"fixed:sha256", b"text:sha256"];
    for (method, whole) in methods.iter().flat_map(|m| [(*m, false), (*m, true)]) {
        let mut req = Vec::new();
        put_u64(&mut req, 7);
        put_bytes(&mut req, b"vanished-ca");
        put_bytes(&mut req, method);
        put_u64(&mut req, 0); // references
        put_u64(&mut req, 0); // repair
        let dump = if method == b"fixed:r:sha256" { nar_regular(&rng.bytes(1 << 20)) } else { rng.bytes(1 << 20) };
        put_u64(&mut req, dump.len() as u64);
        req.extend_from_slice(if whole { &dump[..] } else { &dump[..dump.len() / 2] });
        send_and_vanish(&s, &req, Duration::from_millis(500));
    }

    // AddMultipleToStore cut in its second path's NAR: the first, whole, is not registered
    // either (the batch is one).
    let mut payload = Vec::new();
    put_u64(&mut payload, 2);
    let mut first_path = String::new();
    for i in 0..2 {
        let nar = nar_regular(&rng.bytes(512 << 10));
        let path = random_path(&mut rng, &format!("vanished-multiple-{i}"));
        let head = add_nar_head(&path, &sha256_hex(&nar), nar.len() as u64);
        // The ValidPathInfo of AddToStoreNar's head, without its op code, repair and dontCheckSigs.
        payload.extend_from_slice(&head[8..head.len() - 16]);
        payload.extend_from_slice(&nar);
        if i == 0 {
            first_path = path;
        } else {
            gone.push(path);
        }
    }
    gone.push(first_path);
    let mut req = Vec::new();
    put_u64(&mut req, 44);
    put_u64(&mut req, 0); // repair
    put_u64(&mut req, 1); // dontCheckSigs
    let framed_payload = framed(&payload, 32 << 10);
    req.extend_from_slice(&framed_payload[..framed_payload.len() - (200 << 10)]);
    seen_tmp += usize::from(send_and_vanish(&s, &req, Duration::from_secs(2)));

    assert!(seen_tmp > 0, "the daemon never started writing a NAR into the store: the test proves nothing");
    // store_entries fails if anything is left in .cairn-tmp or .cairn-trash.
    assert_eq!(s.store_entries(), before, "nothing partial is left in the store");
    let mut c = session(&s);
    let mut req = Vec::new();
    put_u64(&mut req, OP_QUERY_VALID_PATHS);
    put_u64(&mut req, gone.len() as u64);
    for p in &gone {
        put_bytes(&mut req, p.as_bytes());
    }
    put_u64(&mut req, 0);
    c.write_all(&req).unwrap();
    assert_eq!(read_reply(&mut c), Reply::Last);
    assert_eq!(get_u64(&mut c).unwrap(), 0, "QueryValidPaths finds none of {gone:?}");
    assert_daemon_serves(&s, &known);
}

#[test]
fn a_nar_that_does_not_match_its_claimed_hash_is_refused_and_the_session_goes_on() {
    let (s, known) = daemon_with_known_path();
    let before = s.store_entries();
    let mut rng = Rng::new(21);
    let mut c = session(&s);
    let nar = nar_regular(&rng.bytes(300 << 10));
    let path = random_path(&mut rng, "forged-hash");
    let claimed = sha256_hex(&nar_regular(b"something else"));
    c.write_all(&add_nar_request(&path, &nar, &claimed)).unwrap();
    match read_reply(&mut c) {
        Reply::Error(m) => assert!(m.to_lowercase().contains("hash"), "{m}"),
        other => panic!("a NAR with the wrong hash: {other:?}; daemon log:\n{}", s.log()),
    }
    // The payload was drained: the same connection answers the next request in step.
    assert!(!is_valid(&mut c, &path), "the path with the wrong hash is not valid");
    assert!(is_valid(&mut c, &known));
    assert!(!is_valid_fresh(&s, &path));
    assert_eq!(s.store_entries(), before, "nothing was added");

    // A size that does not match (the frames end before narSize): refused too, and in step.
    let short_path = random_path(&mut rng, "wrong-size");
    let mut req = add_nar_head(&short_path, &sha256_hex(&nar), nar.len() as u64 + 8);
    req.extend(framed(&nar, 4096));
    c.write_all(&req).unwrap();
    assert!(matches!(read_reply(&mut c), Reply::Error(_)), "a NAR shorter than its narSize");
    assert!(!is_valid(&mut c, &short_path));

    // And a correct add on the same connection succeeds.
    c.write_all(&add_nar_request(&path, &nar, &sha256_hex(&nar))).unwrap();
    assert_eq!(read_reply(&mut c), Reply::Last, "daemon log:\n{}", s.log());
    assert!(is_valid(&mut c, &path));
    assert!(is_valid_fresh(&s, &path));
    assert_daemon_serves(&s, &known);
}

/// A session of protocol 1.`minor`.
fn session_v(s: &TestStore, minor: u64) -> UnixStream {
    let mut c = connect(s);
    handshake_v(&mut c, minor);
    c
}

fn is_valid_v(c: &mut UnixStream, minor: u64, path: &str) -> bool {
    c.write_all(&is_valid_request(path)).unwrap();
    assert_eq!(read_reply_v(c, minor), Reply::Last, "IsValidPath {path}");
    get_u64(c).unwrap() != 0
}

/// Answers the daemon's `STDERR_READ`s of a tunnelled `AddToStoreNar` (1.21–1.22) with `nar`;
/// stops answering (the caller then hangs up) once `stop_at` bytes have gone, if given.
fn serve_tunnel(c: &mut UnixStream, minor: u64, nar: &[u8], stop_at: Option<usize>) -> Reply {
    let mut off = 0;
    loop {
        match read_reply_v(c, minor) {
            Reply::Read(n) => {
                if stop_at.is_some_and(|k| off >= k) {
                    return Reply::Read(n);
                }
                assert!(n > 0 && off < nar.len(), "the daemon asked for {n} bytes past the NAR's end");
                let take = (n as usize).min(nar.len() - off);
                let mut b = Vec::new();
                put_bytes(&mut b, &nar[off..off + take]);
                off += take;
                c.write_all(&b).unwrap();
            }
            other => return other,
        }
    }
}

/// Clients before framing: a bare NAR after the request (< 1.21) and a NAR pulled with
/// `STDERR_READ` (1.21–1.22). A NAR with the wrong hash is refused with the session in step,
/// and a client gone mid-NAR leaves nothing.
#[test]
fn old_clients_bare_and_tunnelled_nars_are_checked_and_cleaned_up_alike() {
    let (s, known) = daemon_with_known_path();
    let before = s.store_entries();
    let mut rng = Rng::new(51);
    for minor in [20u64, 22] {
        let tunnelled = minor >= 21;
        let nar = nar_regular(&rng.bytes(256 << 10));
        let path = random_path(&mut rng, &format!("old-client-{minor}"));

        // The wrong hash: refused, in step, nothing added.
        let mut c = session_v(&s, minor);
        let claimed = sha256_hex(b"not this NAR");
        let mut req = add_nar_head(&path, &claimed, nar.len() as u64);
        if !tunnelled {
            req.extend_from_slice(&nar);
        }
        c.write_all(&req).unwrap();
        let reply = if tunnelled { serve_tunnel(&mut c, minor, &nar, None) } else { read_reply_v(&mut c, minor) };
        match reply {
            Reply::Error(m) => assert!(m.to_lowercase().contains("hash"), "1.{minor}: {m}"),
            other => panic!("1.{minor}: a NAR with the wrong hash: {other:?}"),
        }
        assert!(!is_valid_v(&mut c, minor, &path), "1.{minor}: in step, and not valid");
        assert!(is_valid_v(&mut c, minor, &known));

        // The right hash on the same connection: added.
        let mut req = add_nar_head(&path, &sha256_hex(&nar), nar.len() as u64);
        if !tunnelled {
            req.extend_from_slice(&nar);
        }
        c.write_all(&req).unwrap();
        let reply = if tunnelled { serve_tunnel(&mut c, minor, &nar, None) } else { read_reply_v(&mut c, minor) };
        assert_eq!(reply, Reply::Last, "1.{minor}: daemon log:\n{}", s.log());
        assert!(is_valid_v(&mut c, minor, &path));
        drop(c);

        // Gone halfway through the NAR.
        let half_path = random_path(&mut rng, &format!("old-client-gone-{minor}"));
        let half_nar = nar_regular(&rng.bytes(1 << 20));
        let mut c = session_v(&s, minor);
        let mut req = add_nar_head(&half_path, &sha256_hex(&half_nar), half_nar.len() as u64);
        if tunnelled {
            c.write_all(&req).unwrap();
            assert!(matches!(serve_tunnel(&mut c, minor, &half_nar, Some(half_nar.len() / 2)), Reply::Read(_)));
        } else {
            req.extend_from_slice(&half_nar[..half_nar.len() / 2]);
            c.write_all(&req).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        }
        drop(c);
        assert!(!is_valid_fresh(&s, &half_path), "1.{minor}: a NAR cut short was registered");
    }
    // Only the two whole adds are new; no temporary files are left.
    let after = s.store_entries();
    assert_eq!(after.len(), before.len() + 2, "{after:?}");
    assert_daemon_serves(&s, &known);
}

#[test]
fn a_nar_with_a_dangerous_entry_name_is_refused_and_nothing_is_registered() {
    let (s, known) = daemon_with_known_path();
    let before = s.store_entries();
    let mut rng = Rng::new(31);
    let mut c = session(&s);
    for name in [&b".."[..], b".", b"/", b"a/b", b"", b"a\0b", b"../../../../etc/cairn-escape"] {
        let nar = nar_dir_with_entry(name, b"escaped\n");
        let path = random_path(&mut rng, "bad-entry");
        c.write_all(&add_nar_request(&path, &nar, &sha256_hex(&nar))).unwrap();
        match read_reply(&mut c) {
            Reply::Error(_) => {}
            other => panic!("a NAR with an entry named {:?}: {other:?}", String::from_utf8_lossy(name)),
        }
        // In step: the next request on the same connection is answered.
        assert!(!is_valid(&mut c, &path), "{path} with an entry named {:?}", String::from_utf8_lossy(name));
    }
    assert!(!std::path::Path::new("/etc/cairn-escape").exists());
    assert!(!s.root.path().join("nix/etc").exists());
    assert_eq!(s.store_entries(), before, "nothing was added");
    // A well-formed directory NAR is accepted on the same connection.
    let nar = nar_dir_with_entry(b"fine", b"fine\n");
    let path = random_path(&mut rng, "good-entry");
    c.write_all(&add_nar_request(&path, &nar, &sha256_hex(&nar))).unwrap();
    assert_eq!(read_reply(&mut c), Reply::Last);
    assert!(is_valid(&mut c, &path));
    assert_daemon_serves(&s, &known);
}

// ---------------------------------------------------------------------------------------------
// An untrusted client

/// Runs this binary's test `helper` as `nobody` (through `setpriv`) with `env`, asserting it
/// ran; returns what it printed on lines starting with `HELPER `.
fn as_nobody(helper: &str, env: &[(&str, &std::ffi::OsStr)]) -> Vec<String> {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", &cairn_tests::test_name(module_path!(), helper), "--nocapture", "--test-threads=1"])
        .env("CAIRN_BIN_DIR", bin_dir());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "helper failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().filter_map(|l| l.find("HELPER ").map(|i| l[i + 7..].to_owned())).collect()
}

/// Whether this run may connect as another user (root, for `setpriv`).
fn can_be_nobody() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipping: needs root to connect as another user with setpriv");
    }
    root
}

/// Run as another user by [`an_untrusted_clients_unsigned_add_to_store_nar_is_refused`] (the
/// test binary re-executed through `setpriv`); does nothing in a normal run. It connects,
/// sends an unsigned `AddToStoreNar` asking not to check signatures, then `IsValidPath` on the
/// same connection, and prints what happened on lines starting with `HELPER `.
#[test]
fn helper_untrusted_client_process() {
    let Some(socket) = std::env::var_os(HELPER_ENV) else { return };
    let path = std::env::var("CAIRN_NIX_HOSTILE_HELPER_PATH").unwrap();
    let mut c = connect_path(std::path::Path::new(&socket));
    let trust = handshake(&mut c);
    println!("HELPER trust {trust}");
    let nar = nar_regular(b"unsigned and untrusted\n");
    c.write_all(&add_nar_request(&path, &nar, &sha256_hex(&nar))).unwrap();
    match read_reply(&mut c) {
        Reply::Error(m) => println!("HELPER error {}", m.replace('\n', " ")),
        Reply::Last => println!("HELPER added"),
        Reply::Closed => println!("HELPER closed"),
        Reply::Read(n) => println!("HELPER asked for {n} bytes"),
    }
    println!("HELPER valid-after {}", is_valid(&mut c, &path));
}

#[test]
fn an_untrusted_clients_unsigned_add_to_store_nar_is_refused() {
    if !can_be_nobody() {
        return;
    }
    let (s, known) = daemon_with_known_path();
    let before = s.store_entries();
    let path = random_path(&mut Rng::new(41), "untrusted");
    let socket = nix_socket(&s);
    let said = as_nobody(
        "helper_untrusted_client_process",
        &[(HELPER_ENV, socket.as_os_str()), ("CAIRN_NIX_HOSTILE_HELPER_PATH", path.as_ref())],
    );
    assert_eq!(said.len(), 3, "helper output: {said:?}");
    assert_eq!(said[0], "trust 2", "the daemon tells nobody it is not trusted");
    assert!(said[1].starts_with("error "), "an untrusted unsigned add: {}", said[1]);
    assert!(said[1].contains("signature"), "{}", said[1]);
    assert_eq!(said[2], "valid-after false", "the connection stays in step and the path is not valid");
    assert!(!is_valid_fresh(&s, &path));
    assert_eq!(s.store_entries(), before);
    assert_daemon_serves(&s, &known);
}

/// Run as another user by [`an_untrusted_clients_build_log_is_refused_without_being_kept`]:
/// sends `AddBuildLog` with a 192 MiB log, then `IsValidPath`; prints what happened.
#[test]
fn helper_untrusted_build_log_process() {
    let Some(socket) = std::env::var_os(HELPER_LOG_ENV) else { return };
    let path = std::env::var("CAIRN_NIX_HOSTILE_HELPER_PATH").unwrap();
    let mut c = connect_path(std::path::Path::new(&socket));
    handshake(&mut c);
    let mut req = Vec::new();
    put_u64(&mut req, 45); // AddBuildLog, of a path by its base name (as Nix sends it)
    put_bytes(&mut req, path.rsplit('/').next().unwrap().as_bytes());
    c.write_all(&req).unwrap();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..192 {
        let mut frame = Vec::with_capacity(chunk.len() + 8);
        put_u64(&mut frame, chunk.len() as u64);
        frame.extend_from_slice(&chunk);
        c.write_all(&frame).unwrap();
    }
    c.write_all(&0u64.to_le_bytes()).unwrap();
    match read_reply(&mut c) {
        Reply::Error(m) => println!("HELPER error {}", m.replace('\n', " ")),
        other => println!("HELPER {other:?}"),
    }
    println!("HELPER valid-after {}", is_valid(&mut c, &path));
}

/// Run as another user by [`an_untrusted_client_learns_nothing_of_files_it_may_not_read`]:
/// asks for each path of `CAIRN_NIX_HOSTILE_HELPER_LINKS` (`:`-separated) to be an indirect
/// root, printing the daemon's answer.
#[test]
fn helper_untrusted_indirect_root_process() {
    let Some(socket) = std::env::var_os(HELPER_ROOT_ENV) else { return };
    let links = std::env::var("CAIRN_NIX_HOSTILE_HELPER_LINKS").unwrap();
    let mut c = connect_path(std::path::Path::new(&socket));
    handshake(&mut c);
    for link in links.split(':') {
        let mut req = Vec::new();
        put_u64(&mut req, 12); // AddIndirectRoot
        put_bytes(&mut req, link.as_bytes());
        c.write_all(&req).unwrap();
        match read_reply(&mut c) {
            Reply::Error(m) => println!("HELPER error {}", m.replace('\n', " ")),
            other => println!("HELPER {other:?}"),
        }
    }
}

const HELPER_ROOT_ENV: &str = "CAIRN_NIX_HOSTILE_ROOT_HELPER";

/// `AddIndirectRoot` of links in a directory an untrusted client may not read — one into the
/// store, one elsewhere, one missing, one not a link — is refused in the same words for each,
/// naming no target: the daemon's rights do not become the client's eyes.
#[test]
fn an_untrusted_client_learns_nothing_of_files_it_may_not_read() {
    if !can_be_nobody() {
        return;
    }
    let (s, known) = daemon_with_known_path();
    let secret = tempfile::tempdir().unwrap();
    std::fs::set_permissions(secret.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let into_store = secret.path().join("into-store");
    std::os::unix::fs::symlink(&known, &into_store).unwrap();
    let elsewhere = secret.path().join("elsewhere");
    std::os::unix::fs::symlink("/SECRET-TARGET", &elsewhere).unwrap();
    let plain = secret.path().join("plain");
    std::fs::write(&plain, "x").unwrap();
    let missing = secret.path().join("missing");
    let links: Vec<String> =
        [&into_store, &elsewhere, &plain, &missing].iter().map(|p| p.display().to_string()).collect();
    let (socket, joined) = (nix_socket(&s), links.join(":"));
    let said = as_nobody(
        "helper_untrusted_indirect_root_process",
        &[(HELPER_ROOT_ENV, socket.as_os_str()), ("CAIRN_NIX_HOSTILE_HELPER_LINKS", joined.as_ref())],
    );
    assert_eq!(said.len(), 4, "helper output: {said:?}");
    for (link, answer) in links.iter().zip(&said) {
        assert_eq!(
            *answer,
            format!("error root '{link}' is not a symbolic link of yours into the store"),
            "the same words whatever is there"
        );
    }
    assert!(!said.iter().any(|l| l.contains("SECRET-TARGET")));
    assert_daemon_serves(&s, &known);
}

/// The environment variable that turns [`helper_untrusted_build_log_process`] into the client.
const HELPER_LOG_ENV: &str = "CAIRN_NIX_HOSTILE_LOG_HELPER";

/// An untrusted client may not add build logs (Nix's rule), and what it sends is read past, not
/// kept: a refused log costs the daemon nothing like its size in memory.
#[test]
fn an_untrusted_clients_build_log_is_refused_without_being_kept() {
    if !can_be_nobody() {
        return;
    }
    let (s, known) = daemon_with_known_path();
    let peak = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().to_owned();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    let before = peak();
    let socket = nix_socket(&s);
    let said = as_nobody(
        "helper_untrusted_build_log_process",
        &[(HELPER_LOG_ENV, socket.as_os_str()), ("CAIRN_NIX_HOSTILE_HELPER_PATH", known.as_ref())],
    );
    assert_eq!(said.len(), 2, "helper output: {said:?}");
    assert!(said[0].starts_with("error ") && said[0].contains("not privileged to add logs"), "{}", said[0]);
    assert_eq!(said[1], "valid-after true", "the connection stays in step");
    let grew = peak().saturating_sub(before);
    assert!(grew < 64 << 20, "the daemon's peak memory grew by {} MiB for a refused 192 MiB log", grew >> 20);
    assert_daemon_serves(&s, &known);
}

// ---------------------------------------------------------------------------------------------
// Random bytes

/// The op codes the fuzzer prefixes its bytes with: Nix 2.8's, and some beyond.
fn fuzz_ops() -> Vec<u64> {
    (0..48).filter(|&op| op != OP_COLLECT_GARBAGE && op != OP_ADD_PERM_ROOT).collect()
}

/// Fields that look like the protocol's: small integers and short strings, some of them store
/// paths, then random bytes.
fn plausible_fields(rng: &mut Rng, known: &str) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..rng.below(8) {
        match rng.below(5) {
            0 => put_u64(&mut v, rng.below(4)),
            1 => put_u64(&mut v, rng.next()),
            2 => {
                let len = rng.below(40) as usize;
                put_bytes(&mut v, &rng.bytes(len));
            }
            3 => put_bytes(&mut v, known.as_bytes()),
            _ => put_bytes(&mut v, random_path(rng, "fuzz").as_bytes()),
        }
    }
    v
}

/// One of a few well-formed requests (some with payloads), for the fuzzer to damage.
fn valid_request(rng: &mut Rng, known: &str) -> Vec<u8> {
    match rng.below(4) {
        0 => is_valid_request(known),
        1 => {
            let mut r = Vec::new();
            put_u64(&mut r, OP_QUERY_VALID_PATHS);
            put_u64(&mut r, 2);
            put_bytes(&mut r, known.as_bytes());
            put_bytes(&mut r, random_path(rng, "fuzz").as_bytes());
            put_u64(&mut r, 0);
            r
        }
        2 => {
            let len = rng.below(300) as usize;
            let nar = nar_regular(&rng.bytes(len));
            add_nar_request(&random_path(rng, "fuzz"), &nar, &sha256_hex(&nar))
        }
        _ => {
            let mut r = Vec::new();
            put_u64(&mut r, 7);
            put_bytes(&mut r, b"fuzz");
            put_bytes(&mut r, b"fixed:r:sha256");
            put_u64(&mut r, 0);
            put_u64(&mut r, 0);
            let len = rng.below(300) as usize;
            r.extend(framed(&nar_regular(&rng.bytes(len)), 64));
            r
        }
    }
}

#[test]
fn random_bytes_after_a_valid_handshake_never_hurt_the_daemon() {
    let (s, known) = daemon_with_known_path();
    let ops = fuzz_ops();
    let strategy = (any::<u64>(), 0usize..4, prop::collection::vec(any::<u8>(), 0..1024));
    // Few shrinking steps: each costs a connection, and a hang costs the read timeout.
    let config = Config { cases: 64, failure_persistence: None, max_shrink_iters: 16, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let result = runner.run(&strategy, |(seed, shape, tail)| {
        let mut rng = Rng::new(seed);
        let mut bytes = Vec::new();
        match shape {
            // Nothing but noise.
            0 => {}
            // A real op code, then noise.
            1 => put_u64(&mut bytes, rng.pick(&ops)),
            // A real op code and fields of the right shapes, then noise.
            2 => {
                put_u64(&mut bytes, rng.pick(&ops));
                bytes.extend(plausible_fields(&mut rng, &known));
            }
            // A valid request with a few bytes changed and perhaps cut short, then noise.
            _ => {
                let mut req = valid_request(&mut rng, &known);
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(req.len() as u64) as usize;
                    req[i] = rng.next() as u8;
                }
                if rng.below(3) == 0 {
                    req.truncate(rng.below(req.len() as u64) as usize);
                }
                bytes.extend(req);
            }
        }
        if shape == 0 && tail.len() >= 8 && u64::from_le_bytes(tail[..8].try_into().unwrap()) == OP_COLLECT_GARBAGE {
            return Ok(());
        }
        bytes.extend_from_slice(&tail);
        let mut c = session(&s);
        // The daemon may close before it has read everything: a failed write is fine.
        let _ = c.write_all(&bytes);
        let _ = c.shutdown(Shutdown::Write);
        // Whatever it answers, it must end the session (the client has stopped writing) in time.
        assert_closed(&mut c, "random bytes");
        prop_assert!(is_valid_fresh(&s, &known), "the daemon still serves; log:\n{}", s.log());
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\ndaemon log:\n{}", s.log());
    }
    // No temporary files are left (store_entries checks .cairn-tmp and .cairn-trash).
    s.store_entries();
    assert_daemon_serves(&s, &known);
}
