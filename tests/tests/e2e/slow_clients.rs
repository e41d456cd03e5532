//! Clients that stop reading their answers: the daemon's work must not wait for them, nor hold
//! what it holds for them, for ever.
//!
//! Regression tests for two findings of the benchmark's soak workload: a download (NAR, blob,
//! export) that its client never read parked a thread of the blocking pool and kept the path
//! temporarily rooted for as long as the connection stayed open (`send-timeout` now closes it);
//! and a realisation whose client stopped reading its event stream stopped scheduling its
//! derivations, while the builder's log lines piled up in memory behind it (the stream's events
//! now wait in a bounded outbox, and the builds go on). Each test takes a few seconds.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use cairn_tests::{require_peer, TestStore};

use crate::build_sandbox::drv_json;

/// A file of `len` bytes that does not compress, so that no buffer on the way holds much of it.
fn noise(len: usize) -> Vec<u8> {
    cairn_tests::Rng::new(7).bytes(len)
}

fn is_valid(st: &TestStore, p: &str) -> bool {
    st.run(&["path-info", p], b"").status.success()
}

/// Reads from `s` until it ends (or fails), for at most `wait`; the bytes read, and whether the
/// stream ended rather than went quiet.
fn read_to_end_within(s: &mut UnixStream, wait: Duration) -> (usize, bool) {
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    while start.elapsed() < wait {
        match s.read(&mut buf) {
            Ok(0) => return (total, true),
            Ok(n) => total += n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return (total, false)
            }
            Err(_) => return (total, true),
        }
    }
    (total, false)
}

#[test]
fn a_download_nobody_reads_is_cut_at_the_send_timeout_and_lets_its_path_go() {
    let st = TestStore::builder().config("send-timeout = 1\n").start();
    let f = st.root.path().join("big");
    std::fs::write(&f, noise(16 << 20)).unwrap();
    // Not rooted: only the download holds it.
    let p = st.ok(&["add", f.to_str().unwrap()]).trim().to_owned();
    let mut s = UnixStream::connect(&st.socket).unwrap();
    write!(s, "GET /v1/nar?path={p} HTTP/1.1\r\nHost: cairnd\r\n\r\n").unwrap();
    // Nothing read for well over the timeout: the daemon gives the download up, and with it the
    // path's temporary root.
    std::thread::sleep(Duration::from_secs(3));
    let gc = st.ok(&["gc"]);
    assert!(!is_valid(&st, &p), "the stalled download still holds {p}: gc printed {gc:?}");
    let (got, ended) = read_to_end_within(&mut s, Duration::from_secs(5));
    assert!(ended, "the daemon did not close the stalled download ({got} bytes came when read)");
    assert!(got < 16 << 20, "the whole NAR came ({got} bytes): the download was not cut");
}

#[test]
fn a_slow_reader_that_keeps_reading_is_not_cut_by_the_send_timeout() {
    let st = TestStore::builder().config("send-timeout = 1\n").start();
    let f = st.root.path().join("big");
    std::fs::write(&f, noise(4 << 20)).unwrap();
    let p = st.ok(&["add", f.to_str().unwrap()]).trim().to_owned();
    let mut s = UnixStream::connect(&st.socket).unwrap();
    write!(s, "GET /v1/nar?path={p} HTTP/1.1\r\nHost: cairnd\r\nConnection: close\r\n\r\n").unwrap();
    // 256 KiB every 300 ms: the whole answer takes ~5 s, each pause well under the timeout.
    let start = Instant::now();
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => panic!("the answer was cut after {} bytes: {e}", answer.len()),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(start.elapsed() > Duration::from_secs(2), "read too fast to show anything: {:?}", start.elapsed());
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer[..answer.len().min(200)]));
    assert!(answer.ends_with(b"0\r\n\r\n"), "the chunked answer ends properly");
    assert!(answer.len() > 4 << 20, "{} bytes for a 4 MiB file", answer.len());
}

/// Adds a derivation; returns (drv path, output path).
fn add_drv(st: &TestStore, file: &str, json: &str) -> (String, String) {
    let f = st.root.path().join(file);
    std::fs::write(&f, json).unwrap();
    let drv = st.ok(&["derivation", "add", f.to_str().unwrap()]).trim().to_owned();
    let out = st.ok(&["derivation", "output-paths", &drv]).trim().to_owned();
    (drv, out)
}

#[test]
fn a_chain_keeps_building_while_its_client_reads_nothing() {
    if !require_peer("/bin/busybox") {
        return;
    }
    // No send-timeout: what lets the chain go on must not be the client's disconnection.
    let st = TestStore::builder()
        .store_dir("/nix/store")
        .config("sandbox-paths = [\"/bin/sh=/bin/busybox\"]\nsend-timeout = 0\n")
        .start();
    // The first build talks far more than the socket and the stream's channel hold (~6 MB).
    let chatty = "i=0; while [ $i -lt 100000 ]; do echo \"line $i of a builder that talks a lot\"; i=$((i+1)); done; \
                  echo a > $out";
    let (a, a_out) = add_drv(&st, "a.json", &drv_json("chatty", chatty, &[], None));
    let (b, b_out) = add_drv(&st, "b.json", &drv_json("after-chatty", "cat $in0 > $out", &[(&a, &a_out)], None));
    let body = serde_json::json!({ "paths": [b] }).to_string();
    let mut s = UnixStream::connect(&st.socket).unwrap();
    write!(
        s,
        "POST /v1/realise HTTP/1.1\r\nHost: cairnd\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // The stream is never read; both builds still run, one after the other, and register.
    let start = Instant::now();
    while !is_valid(&st, &b_out) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the second build did not run while the client read nothing ({} valid: {})\n{}",
            a_out,
            is_valid(&st, &a_out),
            st.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Read now, the stream tells of both builds and ends with their results; the log lines the
    // client was too slow for are counted, not lost silently.
    let mut answer = String::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.contains(r#""event":"done""#), "no done event in {} bytes", answer.len());
    assert!(answer.contains("log lines were not sent"), "no note of the dropped log lines");
    assert!(answer.len() < 4 << 20, "{} bytes of events were kept for a client that read nothing", answer.len());
}

#[test]
fn an_upload_that_stops_sending_part_way_is_cut_at_the_body_read_timeout_and_holds_nothing() {
    let st = TestStore::builder().config("body-read-timeout = 1\n").start();
    let tmp = st.real_store_dir().join(".cairn-tmp");
    let mut s = UnixStream::connect(&st.socket).unwrap();
    // A flat add of 1 MiB that sends 1 KiB of it, then nothing.
    write!(
        s,
        "POST /v1/add?name=stalled&method=flat&size=1048576&executable=false HTTP/1.1\r\nHost: cairnd\r\n\
         Content-Length: 1048576\r\n\r\n"
    )
    .unwrap();
    s.write_all(&noise(1024)).unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_end(&mut answer);
    let took = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(took < Duration::from_secs(8), "the stalled upload was not cut ({took:?})");
    assert!(answer.contains("body-read-timeout"), "the answer says why: {answer}");
    // Nothing of it stays: no temporary copy, and the daemon serves the next client.
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left in .cairn-tmp: {left:?}");
    let f = st.root.path().join("after");
    std::fs::write(&f, b"after\n").unwrap();
    st.ok(&["add", f.to_str().unwrap()]);
}

/// A client that goes away (a Ctrl-C of `cairn realise`) stops its builds, as a Nix client's
/// do on nix-daemon: the chain does not go on past the build that was running.
#[test]
fn a_client_that_goes_away_stops_its_builds() {
    if !require_peer("/bin/busybox") {
        return;
    }
    let st =
        TestStore::builder().store_dir("/nix/store").config("sandbox-paths = [\"/bin/sh=/bin/busybox\"]\n").start();
    let step = "echo started; sleep 1; echo done > $out";
    let (a, a_out) = add_drv(&st, "a.json", &drv_json("first", step, &[], None));
    let (b, b_out) =
        add_drv(&st, "b.json", &drv_json("second", &format!("cat $in0 >/dev/null; {step}"), &[(&a, &a_out)], None));
    let (c, c_out) =
        add_drv(&st, "c.json", &drv_json("third", &format!("cat $in0 >/dev/null; {step}"), &[(&b, &b_out)], None));
    let mut client = st
        .cairn()
        .args(["realise", &c])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Gone while the first build runs.
    let start = Instant::now();
    while !st.log().contains("building") {
        assert!(start.elapsed() < Duration::from_secs(20), "the first build did not start\n{}", st.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    client.kill().unwrap();
    client.wait().unwrap();
    let start = Instant::now();
    while !st.log().contains("the client went away: its builds were stopped") {
        assert!(start.elapsed() < Duration::from_secs(20), "the builds went on\n{}", st.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(!is_valid(&st, &c_out), "the last build of the chain did not run");
    // The daemon serves the next request.
    assert!(st.ok(&["realise", &a]).contains(&a_out));
}
