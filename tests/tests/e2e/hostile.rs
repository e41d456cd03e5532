//! Hostile and broken input against the real daemon. For every case: a one-line error naming
//! the problem, nothing registered, and a daemon that still serves a normal add afterwards.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cairn_nix::export::{write_end_marker, write_next_marker, write_trailer, ExportTrailer, EXPORT_MAGIC};
use cairn_nix::nar::NarWriter;
use cairn_nix::wire::{write_bytes, write_u64};
use cairn_tests::{line, TestStore};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client over the Unix socket

#[derive(Debug)]
struct Reply {
    status: u16,
    body: Vec<u8>,
}

fn read_reply(c: &mut UnixStream) -> Reply {
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // The daemon may reset a connection whose body it did not read to the end.
            Err(e) if !raw.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the reply: {e} (got {:?})", String::from_utf8_lossy(&raw)),
        }
    }
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
        panic!("no HTTP header in the reply: {:?}", String::from_utf8_lossy(raw));
    });
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status_line = head.lines().next().unwrap();
    let mut parts = status_line.split(' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{status_line}"));
    let mut body = raw[split + 4..].to_vec();
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16).unwrap();
            rest = &rest[eol + 2..];
            if size == 0 || rest.len() < size {
                out.extend_from_slice(&rest[..size.min(rest.len())]);
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[(size + 2).min(rest.len())..];
        }
        body = out;
    }
    Reply { status, body }
}

fn connect(st: &TestStore) -> UnixStream {
    let c = UnixStream::connect(&st.socket).expect("connect to cairnd");
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c
}

/// Sends one request with a body and reads the whole reply.
fn http(st: &TestStore, method: &str, target: &str, content_type: &str, body: &[u8]) -> Reply {
    let mut c = connect(st);
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: c\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    // The daemon may answer (and stop reading) before the body is in: a failed write is fine.
    // No half-close: hyper drops a connection whose client shuts down its write side.
    let _ = c.write_all(&req);
    read_reply(&mut c)
}

fn post_nar(st: &TestStore, name: &str, nar: &[u8]) -> Reply {
    http(st, "POST", &format!("/v1/add?name={name}&method=nar"), "application/octet-stream", nar)
}

fn get(st: &TestStore, target: &str) -> Reply {
    http(st, "GET", target, "application/octet-stream", b"")
}

fn query(st: &TestStore, json: &str) -> Reply {
    http(st, "POST", "/v1/query", "application/json", json.as_bytes())
}

/// Asserts an error reply: the status, a JSON `{kind, message}` body, a one-line message
/// containing `needle`. Returns the message.
fn assert_error(r: &Reply, status: u16, needle: &str) -> String {
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, status, "expected {status} for {needle:?}, got {}: {text}", r.status);
    let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text:?}"));
    let kind = v["kind"].as_str().unwrap_or_else(|| panic!("no kind: {text}"));
    let want_kind = match status {
        400 => "bad-request",
        403 => "forbidden",
        404 => "not-found",
        _ => "internal",
    };
    assert_eq!(kind, want_kind, "{text}");
    let msg = v["message"].as_str().unwrap_or_else(|| panic!("no message: {text}")).to_owned();
    assert!(!msg.is_empty() && !msg.contains('\n'), "one-line message: {msg:?}");
    assert!(msg.to_lowercase().contains(&needle.to_lowercase()), "message {msg:?} should mention {needle:?}");
    msg
}

// ---------------------------------------------------------------------------------------------
// Building NARs and export streams, valid or not

/// A NAR node as a list of wire strings.
type Node = Vec<Vec<u8>>;

fn t(s: &[u8]) -> Vec<u8> {
    s.to_vec()
}

fn file(contents: &[u8]) -> Node {
    vec![t(b"("), t(b"type"), t(b"regular"), t(b"contents"), t(contents), t(b")")]
}

fn symlink(target: &[u8]) -> Node {
    vec![t(b"("), t(b"type"), t(b"symlink"), t(b"target"), t(target), t(b")")]
}

fn dir(entries: Vec<(&[u8], Node)>) -> Node {
    let mut v = vec![t(b"("), t(b"type"), t(b"directory")];
    for (name, node) in entries {
        v.extend([t(b"entry"), t(b"("), t(b"name"), t(name), t(b"node")]);
        v.extend(node);
        v.push(t(b")"));
    }
    v.push(t(b")"));
    v
}

fn nar(node: Node) -> Vec<u8> {
    let mut out = Vec::new();
    write_bytes(&mut out, b"nix-archive-1").unwrap();
    for s in node {
        write_bytes(&mut out, &s).unwrap();
    }
    out
}

/// A valid NAR of a small tree, built with the NarWriter (which refuses to write invalid NARs).
fn valid_tree_nar(seed: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = NarWriter::new(&mut out).unwrap();
    w.begin_directory(None).unwrap();
    let a = format!("file a of {seed}\n");
    w.regular(Some(b"a"), false, a.len() as u64, &mut a.as_bytes()).unwrap();
    w.begin_directory(Some(b"d")).unwrap();
    w.regular(Some(b"exe"), true, 3, &mut &b"#!x"[..]).unwrap();
    w.end_directory().unwrap();
    w.symlink(Some(b"l"), b"a").unwrap();
    w.end_directory().unwrap();
    w.finish().unwrap();
    out
}

fn nested(depth: usize) -> Node {
    let mut node = file(b"deep");
    for _ in 0..depth {
        node = dir(vec![(b"a", node)]);
    }
    node
}

fn export_item(out: &mut Vec<u8>, nar: &[u8], path: &str, references: &[&str]) {
    write_next_marker(out).unwrap();
    out.extend_from_slice(nar);
    let trailer = ExportTrailer {
        path: path.to_owned(),
        references: references.iter().map(|r| r.to_string()).collect(),
        deriver: None,
    };
    write_trailer(out, &trailer).unwrap();
}

/// A syntactically valid store path under `/store` whose hash part is derived from `seed`.
fn fake_path(seed: u8, name: &str) -> String {
    format!("/store/{}-{name}", cairn_nix::nixbase32::encode(&[seed; 20]))
}

// ---------------------------------------------------------------------------------------------
// The invariant checked after every refusal

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Adds a new small file through the CLI and reads it back: the daemon still works.
fn normal_add_works(st: &TestStore) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("ok.txt");
    let contents = format!("still serving {n} {}\n", std::process::id());
    fs::write(&f, &contents).unwrap();
    let p = line(&st.ok(&["add", f.to_str().unwrap()]));
    assert_eq!(st.ok(&["cat", &p]), contents);
    p
}

/// Runs `refuse` and checks that it registered nothing and left a working daemon.
fn refused(st: &TestStore, what: &str, refuse: impl FnOnce()) {
    let before = st.store_entries();
    refuse();
    assert_eq!(st.store_entries(), before, "{what}: nothing may be added");
    normal_add_works(st);
    assert!(!st.log().contains("panicked"), "{what}: the daemon panicked:\n{}", st.log());
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tmp_is_empty(st: &TestStore) -> bool {
    st.temp_work().is_empty()
}

// ---------------------------------------------------------------------------------------------
// Raw NARs POSTed to /v1/add

#[test]
fn malformed_nars_are_refused() {
    let st = TestStore::start();
    let good = valid_tree_nar("good");
    // Sanity: the raw client and the builders make a NAR the daemon accepts.
    let ok = post_nar(&st, "good", &good);
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    let info: Value = serde_json::from_slice(&ok.body).unwrap();
    assert!(info["path"].as_str().unwrap().ends_with("-good"));
    assert_eq!(info["narSize"], good.len() as u64);
    let manual = nar(dir(vec![(b"a", file(b"x")), (b"b", symlink(b"a"))]));
    assert_eq!(post_nar(&st, "manual", &manual).status, 200, "the hand-built NAR encoding is valid");

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad magic",
            {
                let mut v = Vec::new();
                write_bytes(&mut v, b"nix-archive-2").unwrap();
                v.extend_from_slice(&good[24..]);
                v
            },
            "bad magic",
        ),
        ("not a NAR at all", b"GIF89a\0\0 this is not a NAR, not even close".to_vec(), "magic"),
        ("unsorted entries", nar(dir(vec![(b"b", file(b"1")), (b"a", file(b"2"))])), "not sorted"),
        ("duplicate entries", nar(dir(vec![(b"a", file(b"1")), (b"a", file(b"2"))])), "duplicate"),
        ("entry ..", nar(dir(vec![(b"..", file(b"1"))])), "invalid entry name"),
        ("entry .", nar(dir(vec![(b".", file(b"1"))])), "invalid entry name"),
        ("entry with /", nar(dir(vec![(b"a/b", file(b"1"))])), "invalid entry name"),
        ("entry with NUL", nar(dir(vec![(b"a\0b", file(b"1"))])), "invalid entry name"),
        ("empty entry name", nar(dir(vec![(b"", file(b"1"))])), "invalid entry name"),
        ("escape through ../..", nar(dir(vec![(b"../../../tmp/x", file(b"1"))])), "invalid entry name"),
        ("nesting 257 deep", nar(nested(257)), "deeper than 256"),
        ("nesting 1000 deep", nar(nested(1000)), "deeper than 256"),
        ("unknown node type", nar(vec![t(b"("), t(b"type"), t(b"fifo"), t(b")")]), "unknown node type"),
        (
            "unknown tag in a file",
            nar(vec![t(b"("), t(b"type"), t(b"regular"), t(b"mode"), t(b"0777"), t(b")")]),
            "expected",
        ),
        (
            "trailing bytes",
            {
                let mut v = good.clone();
                v.extend_from_slice(&[0u8; 8]);
                v
            },
            "after the end of the NAR",
        ),
        (
            "trailing garbage",
            {
                let mut v = good.clone();
                v.extend_from_slice(b"x");
                v
            },
            "after the end of the NAR",
        ),
        (
            "a second NAR after the first",
            {
                let mut v = good.clone();
                v.extend_from_slice(&good);
                v
            },
            "after the end of the NAR",
        ),
        ("empty symlink target", nar(symlink(b"")), "invalid symlink target"),
        ("symlink target with NUL", nar(dir(vec![(b"l", symlink(b"/etc\0x"))])), "invalid symlink target"),
        ("empty body", Vec::new(), "truncated"),
        (
            "huge string length",
            {
                let mut v = Vec::new();
                write_bytes(&mut v, b"nix-archive-1").unwrap();
                write_bytes(&mut v, b"(").unwrap();
                write_u64(&mut v, u64::MAX).unwrap();
                v
            },
            "exceeds the limit",
        ),
        (
            "file longer than the NAR",
            {
                let mut v = Vec::new();
                for s in [&b"nix-archive-1"[..], b"(", b"type", b"regular", b"contents"] {
                    write_bytes(&mut v, s).unwrap();
                }
                write_u64(&mut v, 1 << 40).unwrap();
                v.extend_from_slice(b"short");
                v
            },
            "truncated",
        ),
    ];
    for (what, body, needle) in &cases {
        refused(&st, what, || {
            let r = post_nar(&st, &format!("case-{}", what.replace(|c: char| !c.is_ascii_alphanumeric(), "-")), body);
            assert_error(&r, 400, needle);
        });
    }

    // Non-zero padding: after file contents, and after a tag.
    let mut bad_pad = nar(file(b"abc"));
    let at = bad_pad.windows(3).position(|w| w == b"abc").unwrap() + 3;
    bad_pad[at] = 1;
    let mut bad_tag_pad = nar(file(b"abc"));
    let at = bad_tag_pad.windows(4).position(|w| w == b"type").unwrap() + 4;
    bad_tag_pad[at + 3] = b'!';
    for (what, body) in [("non-zero padding after contents", bad_pad), ("non-zero padding after a tag", bad_tag_pad)] {
        refused(&st, what, || {
            assert_error(&post_nar(&st, "pad", &body), 400, "padding");
        });
    }

    // Truncated at many offsets.
    let tree = nar(dir(vec![
        (b"a", file(b"some contents here")),
        (b"d", dir(vec![(b"x", file(b"")), (b"y", symlink(b"../a"))])),
        (b"z", file(b"12345678")),
    ]));
    assert_eq!(post_nar(&st, "tree", &tree).status, 200);
    let mut offsets: Vec<usize> =
        vec![1, 7, 8, 15, 16, 23, 24, 31, 40, 56, 100, tree.len() / 2, tree.len() - 16, tree.len() - 8, tree.len() - 1];
    offsets.extend((0..tree.len()).step_by(37));
    offsets.sort_unstable();
    offsets.dedup();
    let before = st.store_entries();
    for &cut in &offsets {
        let r = post_nar(&st, "cut", &tree[..cut]);
        let msg = assert_error(&r, 400, "");
        assert!(msg.contains("truncated") || msg.contains("magic"), "cut at {cut}/{}: {msg}", tree.len());
    }
    assert_eq!(st.store_entries(), before, "no truncated NAR is registered");
    normal_add_works(&st);

    // The depth limit is 256: exactly 256 levels are accepted.
    assert_eq!(post_nar(&st, "deep", &nar(nested(256))).status, 200, "256 levels are within the limit");
    assert!(!st.log().contains("panicked"), "{}", st.log());
}

#[test]
fn bad_add_parameters_are_refused() {
    let st = TestStore::start();
    let good = valid_tree_nar("params");
    let long_name = format!("/v1/add?name={}&method=nar", "n".repeat(212));
    let cases: Vec<(&str, &str, &str)> = vec![
        ("a space in the name", "/v1/add?name=a%20b&method=nar", "illegal character"),
        ("a slash in the name", "/v1/add?name=a%2Fb&method=nar", "illegal character"),
        ("name ..", "/v1/add?name=..&method=nar", "not allowed"),
        ("name .", "/v1/add?name=.&method=nar", "not allowed"),
        ("empty name", "/v1/add?name=&method=nar", "empty"),
        ("a NUL in the name", "/v1/add?name=a%00b&method=nar", "illegal character"),
        ("a too long name", &long_name, "longer than"),
        ("flat without size", "/v1/add?name=f&method=flat", "size"),
    ];
    for (what, target, needle) in cases {
        refused(&st, what, || {
            assert_error(&http(&st, "POST", target, "application/octet-stream", &good), 400, needle);
        });
    }
    // A flat add whose body is shorter or longer than announced.
    refused(&st, "flat body shorter than size", || {
        let r = http(&st, "POST", "/v1/add?name=f&method=flat&size=10", "application/octet-stream", b"12345");
        assert_error(&r, 400, "expected 10 bytes");
    });
    refused(&st, "flat body longer than size", || {
        let r = http(&st, "POST", "/v1/add?name=f&method=flat&size=3", "application/octet-stream", b"12345");
        assert_error(&r, 400, "expected 3 bytes");
    });
    refused(&st, "flat body empty but size given", || {
        let r = http(&st, "POST", "/v1/add?name=f&method=flat&size=1", "application/octet-stream", b"");
        assert_error(&r, 400, "expected 1 bytes");
    });
    // And the exact size works.
    let r = http(&st, "POST", "/v1/add?name=f&method=flat&size=5", "application/octet-stream", b"12345");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// Requests that do not even parse: missing or bad query parameters, JSON that is not JSON or
/// not a request. The API promises a JSON `{kind, message}` body for every failure.
#[test]

fn unparsable_requests_get_json_errors() {
    let st = TestStore::start();
    let good = valid_tree_nar("unparsable");
    refused(&st, "requests that do not parse", || {
        for target in
            ["/v1/add?name=x", "/v1/add?method=nar", "/v1/add?name=x&method=zip", "/v1/add?name=x&method=flat&size=-1"]
        {
            let r = http(&st, "POST", target, "application/octet-stream", &good);
            assert_error(&r, 400, "");
        }
        for body in ["{not json", "{\"op\":\"drop-tables\"}", "[]", ""] {
            assert_error(&query(&st, body), 400, "");
        }
        assert_error(&http(&st, "POST", "/v1/query", "text/plain", b"{\"op\":\"is-valid\",\"paths\":[]}"), 400, "");
        assert_error(&get(&st, "/v1/nar"), 400, "");
        assert_error(&get(&st, "/v1/cat?paht=/store/x"), 400, "");
    });
}

// ---------------------------------------------------------------------------------------------
// Export streams through `cairn import`

#[test]
fn malformed_export_streams_are_refused() {
    let st = TestStore::start();
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("existing"), b"I am valid\n").unwrap();
    let existing = line(&st.ok(&["add", src.path().join("existing").to_str().unwrap()]));

    let nar_a = valid_tree_nar("a");
    let nar_b = valid_tree_nar("b");
    let new_a = fake_path(1, "new-a");
    let new_b = fake_path(2, "new-b");
    let missing = fake_path(3, "missing");

    // A valid two-path stream (b references a): accepted by a second store, as a control.
    let mut valid = Vec::new();
    export_item(&mut valid, &nar_a, &new_a, &[]);
    export_item(&mut valid, &nar_b, &new_b, &[&new_a, &existing]);
    write_end_marker(&mut valid).unwrap();
    {
        let control = TestStore::start();
        control.ok(&["add", src.path().join("existing").to_str().unwrap()]);
        let got = line(&String::from_utf8(control.ok_bytes(&["import"], &valid)).unwrap());
        assert_eq!(got, format!("{new_a}\n{new_b}").trim_end());
    }

    let mut cases: Vec<(String, Vec<u8>, String)> = Vec::new();
    let mut case = |what: &str, stream: Vec<u8>, needle: &str| cases.push((what.to_owned(), stream, needle.to_owned()));

    case("garbage marker", 7u64.to_le_bytes().to_vec(), "not an export stream");
    case("text instead of a stream", b"hello, this is not an export stream at all\n".to_vec(), "not an export stream");
    case("empty stream", Vec::new(), "unexpected end");
    case(
        "bad trailer magic",
        {
            let mut v = Vec::new();
            write_next_marker(&mut v).unwrap();
            v.extend_from_slice(&nar_a);
            write_u64(&mut v, 0xdead_beef).unwrap();
            write_bytes(&mut v, new_a.as_bytes()).unwrap();
            write_u64(&mut v, 0).unwrap();
            write_bytes(&mut v, b"").unwrap();
            write_u64(&mut v, 0).unwrap();
            write_end_marker(&mut v).unwrap();
            v
        },
        "bad trailer magic",
    );
    case(
        "a reference that is neither valid nor in the stream",
        {
            let mut v = Vec::new();
            export_item(&mut v, &nar_a, &new_a, &[&missing]);
            write_end_marker(&mut v).unwrap();
            v
        },
        "neither valid nor earlier in the stream",
    );
    case(
        "a referrer before its reference",
        {
            let mut v = Vec::new();
            export_item(&mut v, &nar_b, &new_b, &[&new_a]);
            export_item(&mut v, &nar_a, &new_a, &[]);
            write_end_marker(&mut v).unwrap();
            v
        },
        "neither valid nor earlier in the stream",
    );
    case(
        "all or nothing: a good path, then a bad one",
        {
            let mut v = Vec::new();
            export_item(&mut v, &nar_a, &new_a, &[]);
            export_item(&mut v, &nar_b, &new_b, &[&missing]);
            write_end_marker(&mut v).unwrap();
            v
        },
        "neither valid nor earlier in the stream",
    );
    case(
        "a path outside the store directory",
        {
            let mut v = Vec::new();
            export_item(&mut v, &nar_a, &new_a.replace("/store/", "/nix/store/"), &[]);
            write_end_marker(&mut v).unwrap();
            v
        },
        "not in the store directory",
    );
    case(
        "a path escaping the store directory",
        {
            let mut v = Vec::new();
            export_item(&mut v, &nar_a, &format!("/store/../etc/{}", &new_a[7..]), &[]);
            write_end_marker(&mut v).unwrap();
            v
        },
        "store path",
    );
    case(
        "an invalid hash part in the trailer",
        {
            let mut v = Vec::new();
            export_item(&mut v, &nar_a, &format!("/store/{}-x", "e".repeat(32)), &[]);
            write_end_marker(&mut v).unwrap();
            v
        },
        "invalid hash part",
    );
    case(
        "a short store path in the trailer",
        {
            let mut v = Vec::new();
            export_item(&mut v, &nar_a, "/store/abc", &[]);
            write_end_marker(&mut v).unwrap();
            v
        },
        "too short",
    );
    case(
        "an invalid name in the trailer",
        {
            let mut v = Vec::new();
            export_item(&mut v, &nar_a, &format!("{}-{}", &new_a[..39], "a b"), &[]);
            write_end_marker(&mut v).unwrap();
            v
        },
        "illegal character",
    );
    case(
        "an invalid reference in the trailer",
        {
            let mut v = Vec::new();
            export_item(&mut v, &nar_a, &new_a, &["/store/not-a-path"]);
            write_end_marker(&mut v).unwrap();
            v
        },
        "store path",
    );
    case(
        "a malformed NAR inside the stream",
        {
            let mut v = Vec::new();
            write_next_marker(&mut v).unwrap();
            v.extend_from_slice(&nar(dir(vec![(b"b", file(b"1")), (b"a", file(b"2"))])));
            v
        },
        "not sorted",
    );
    case(
        "a valid path whose NAR differs (hash mismatch)",
        {
            let mut v = Vec::new();
            export_item(&mut v, &nar(file(b"I am not what you recorded\n")), &existing, &[]);
            write_end_marker(&mut v).unwrap();
            v
        },
        "hash mismatch",
    );
    case(
        "a bad signature flag",
        {
            let mut v = Vec::new();
            write_next_marker(&mut v).unwrap();
            v.extend_from_slice(&nar_a);
            write_u64(&mut v, EXPORT_MAGIC).unwrap();
            write_bytes(&mut v, new_a.as_bytes()).unwrap();
            write_u64(&mut v, 0).unwrap();
            write_bytes(&mut v, b"").unwrap();
            write_u64(&mut v, 5).unwrap();
            write_end_marker(&mut v).unwrap();
            v
        },
        "expected 0 or 1",
    );
    // Truncated at several offsets of the valid stream, including at the path boundary and
    // just before the end marker.
    let boundary = 8 + nar_a.len();
    for cut in [
        1,
        8,
        12,
        40,
        boundary - 1,
        boundary,
        boundary + 8,
        boundary + 20,
        valid.len() / 2,
        valid.len() - 9,
        valid.len() - 8,
        valid.len() - 1,
    ] {
        case(&format!("truncated at {cut} of {}", valid.len()), valid[..cut].to_vec(), "");
    }

    for (what, stream, needle) in &cases {
        refused(&st, what, || {
            let e = st.fail(&["import"], stream);
            assert!(e.to_lowercase().contains(&needle.to_lowercase()), "{what}: {e}");
            if what.starts_with("truncated") {
                assert!(e.contains("truncated") || e.contains("unexpected end"), "{what}: {e}");
            }
        });
        for p in [&new_a, &new_b] {
            assert!(!st.run(&["path-info", p], b"").status.success(), "{what}: {p} must not be valid");
        }
        assert_eq!(st.ok(&["cat", &existing]), "I am valid\n", "{what}: the existing path is untouched");
    }

    // The same stream, with its reference present, is accepted: the refusals were about the
    // stream, not about the daemon.
    assert_eq!(lines(&String::from_utf8(st.ok_bytes(&["import"], &valid)).unwrap()), [new_a.clone(), new_b.clone()]);
    assert_eq!(lines(&st.ok(&["references", &new_b])), {
        let mut v = vec![new_a.clone(), existing.clone()];
        v.sort();
        v
    });
    // Raw: an untrusted import is not the case here (root is trusted), but a raw import of
    // garbage answers a JSON error.
    refused(&st, "raw import of garbage", || {
        assert_error(
            &http(&st, "POST", "/v1/import", "application/octet-stream", &9u64.to_le_bytes()),
            400,
            "not an export stream",
        );
    });
}

fn lines(s: &str) -> Vec<String> {
    s.lines().map(str::to_owned).collect()
}

// ---------------------------------------------------------------------------------------------
// Unreadable sources

fn assert_one_line_failure(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "should fail with 1; stderr:\n{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "errors are one line:\n{err}");
    assert!(err.starts_with("cairn: "), "{err}");
    err
}

#[test]
fn unreadable_sources_are_refused() {
    let st = TestStore::start();
    refused(&st, "a source that does not exist", || {
        let e = st.fail(&["add", "/nonexistent/cairn-tests/source"], b"");
        assert!(e.contains("/nonexistent/cairn-tests/source") && e.contains("No such file"), "{e}");
        let e = st.fail(&["add", "--flat", "/nonexistent/cairn-tests/source"], b"");
        assert!(e.contains("/nonexistent/cairn-tests/source"), "{e}");
    });
    refused(&st, "a source that is a FIFO", || {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let e = st.fail(&["add", d.path().to_str().unwrap()], b"");
        assert!(e.contains("fifo"), "{e}");
    });

    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping the unreadable-file cases: they need root to run cairn as nobody");
        return;
    }
    if !cairn_tests::require_peer("setpriv") {
        return;
    }
    let src = tempfile::Builder::new().prefix("cairn-tests-src-").tempdir().unwrap();
    fs::set_permissions(src.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let tree = src.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::set_permissions(&tree, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(tree.join("a-readable"), b"fine\n").unwrap();
    fs::write(tree.join("secret"), b"you may not read me\n").unwrap();
    fs::set_permissions(tree.join("a-readable"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(tree.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::write(tree.join("z-after"), b"after\n").unwrap();
    fs::set_permissions(tree.join("z-after"), fs::Permissions::from_mode(0o644)).unwrap();
    refused(&st, "a tree with a mode-000 file, as nobody", || {
        let e = assert_one_line_failure(&st.run_as_nobody(&["add", tree.to_str().unwrap()], b""));
        assert!(e.contains("secret") && e.contains("Permission denied"), "{e}");
        let e =
            assert_one_line_failure(&st.run_as_nobody(&["add", "--flat", tree.join("secret").to_str().unwrap()], b""));
        assert!(e.contains("secret") && e.contains("Permission denied"), "{e}");
    });
    // A directory nobody cannot list.
    let locked = src.path().join("locked");
    fs::create_dir_all(locked.join("inner")).unwrap();
    fs::write(locked.join("inner/f"), b"x").unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(locked.join("inner"), fs::Permissions::from_mode(0o000)).unwrap();
    refused(&st, "a tree with a mode-000 directory, as nobody", || {
        let e = assert_one_line_failure(&st.run_as_nobody(&["add", locked.to_str().unwrap()], b""));
        assert!(e.contains("inner") && e.contains("Permission denied"), "{e}");
    });
    // Root reads it all: the same trees add fine.
    let p = line(&st.ok(&["add", tree.to_str().unwrap()]));
    assert_eq!(st.ok(&["cat", &format!("{p}/secret")]), "you may not read me\n");
    fs::set_permissions(locked.join("inner"), fs::Permissions::from_mode(0o755)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Reading inside store paths without leaving them

#[test]
fn ls_and_cat_stay_inside_store_paths() {
    let st = TestStore::start();
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("escape");
    fs::create_dir_all(tree.join("dir")).unwrap();
    fs::write(tree.join("dir/f"), b"inside\n").unwrap();
    std::os::unix::fs::symlink("/etc", tree.join("link")).unwrap();
    std::os::unix::fs::symlink("..", tree.join("up")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", tree.join("passwd")).unwrap();
    let p = line(&st.ok(&["add", tree.to_str().unwrap()]));
    assert_eq!(st.ok(&["cat", &format!("{p}/dir/f")]), "inside\n");
    let other = {
        fs::write(src.path().join("other"), b"other\n").unwrap();
        line(&st.ok(&["add", src.path().join("other").to_str().unwrap()]))
    };
    let other_base = other.rsplit('/').next().unwrap();

    let no_host_file = |out: &[u8], what: &str| {
        let text = String::from_utf8_lossy(out);
        assert!(!text.contains("root:") && !text.contains("nobody"), "{what} printed a host file: {text}");
    };
    let cat_refused = |arg: String, needle: &str| {
        let out = st.run(&["cat", &arg], b"");
        no_host_file(&out.stdout, &arg);
        let e = st.fail(&["cat", &arg], b"");
        assert!(e.contains(needle), "cat {arg}: {e}");
    };
    refused(&st, "cat through symlinks and ..", || {
        cat_refused(format!("{p}/link/passwd"), "not a path inside a store path");
        cat_refused(format!("{p}/link/hostname"), "not a path inside a store path");
        cat_refused(format!("{p}/passwd"), "not a regular file");
        cat_refused(format!("{p}/up/{other_base}"), "not a path inside a store path");
        cat_refused(format!("{p}/dir/../dir/f"), "not a path inside a store path");
        cat_refused(format!("{p}/../{other_base}"), "not a path inside a store path");
        // The CLI normalises `.` and `//` as any path argument is (`cat /etc/./passwd`); the
        // daemon still refuses them on the wire (see the raw HTTP cases).
        let f = st.ok(&["cat", &format!("{p}/dir/f")]);
        assert_eq!(st.ok(&["cat", &format!("{p}/./dir/f")]), f);
        assert_eq!(st.ok(&["cat", &format!("{p}/dir//f")]), f);
        cat_refused(format!("{p}/../../etc/passwd"), "not a path inside a store path");
        cat_refused("/store/../etc/passwd".to_owned(), "store path");
        cat_refused(format!("{p}/dir/f/x"), "not a directory");
    });
    refused(&st, "ls through symlinks and ..", || {
        let out = st.ok(&["ls", "--json", &format!("{p}/link")]);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{"name": "link", "type": "symlink", "target": "/etc"}]),
            "ls shows the symlink, not /etc"
        );
        let out = st.ok(&["ls", &format!("{p}/link/")]);
        assert!(!out.contains("passwd") && out.contains("link -> /etc"), "{out}");
        for arg in [
            format!("{p}/link/ssl"),
            format!("{p}/up/{other_base}"),
            format!("{p}/dir/.."),
            format!("{p}/.."),
            format!("{p}/dir/../.."),
        ] {
            let out = st.run(&["ls", &arg], b"");
            assert!(!String::from_utf8_lossy(&out.stdout).contains("passwd"), "ls {arg} listed a host directory");
            let e = st.fail(&["ls", &arg], b"");
            assert!(e.contains("not a path inside a store path"), "ls {arg}: {e}");
        }
        let e = st.fail(&["ls", "/store/.."], b"");
        assert!(e.contains("store path"), "{e}");
    });
    // The same over raw HTTP, where no CLI normalises anything.
    refused(&st, "raw cat and ls escapes", || {
        for path in [
            format!("{p}/link/passwd"),
            format!("{p}/link%2Fpasswd"),
            format!("{p}/%2E%2E/{other_base}"),
            format!("{p}/dir/%2e%2e/%2e%2e/%2e%2e/etc/passwd"),
            format!("{p}/up/up/up/etc/passwd"),
        ] {
            let r = get(&st, &format!("/v1/cat?path={path}"));
            no_host_file(&r.body, &path);
            assert_error(&r, 400, "");
        }
        for path in ["/etc/passwd", "/store/../etc/passwd", "/store/%2E%2E/etc/passwd", "/store", "/store/"] {
            let r = get(&st, &format!("/v1/cat?path={path}"));
            no_host_file(&r.body, path);
            assert_error(&r, 400, "store");
        }
        let r = query(&st, &format!(r#"{{"op":"ls","path":"{p}/link"}}"#));
        assert_eq!(r.status, 200);
        assert!(!String::from_utf8_lossy(&r.body).contains("passwd"));
        assert_error(
            &query(&st, &format!(r#"{{"op":"ls","path":"{p}/link/ssl"}}"#)),
            400,
            "not a path inside a store path",
        );
        assert_error(&query(&st, r#"{"op":"ls","path":"/etc"}"#), 400, "not in the store directory");
    });
}

// ---------------------------------------------------------------------------------------------
// Invalid store paths in requests

#[test]
fn invalid_store_paths_are_400s() {
    let st = TestStore::start();
    let bad_hash = format!("/store/{}-x", "e".repeat(32)); // 'e' is not nixbase32
    let missing = fake_path(9, "missing");
    refused(&st, "CLI verbs on invalid paths", || {
        for verb in
            ["path-info", "references", "referrers", "closure", "referrers-closure", "graph", "export", "ls", "cat"]
        {
            let e = st.fail(&[verb, &bad_hash], b"");
            assert!(e.contains("invalid hash part"), "{verb}: {e}");
            let e = st.fail(&[verb, "/store/tooshort"], b"");
            assert!(e.contains("too short"), "{verb}: {e}");
            let e = st.fail(&[verb, &missing], b"");
            assert!(e.contains("not valid"), "{verb}: {e}");
        }
        let e = st.fail(&["nar", "dump", &missing], b"");
        assert!(e.contains("not valid"), "{e}");
        let e = st.fail(&["path-info", &format!("{}-a b", &missing[..39])], b"");
        assert!(e.contains("illegal character"), "{e}");
    });
    refused(&st, "raw requests on invalid paths", || {
        for target in [
            format!("/v1/nar?path={bad_hash}"),
            "/v1/nar?path=/store/x".to_owned(),
            "/v1/nar?path=/etc/passwd".to_owned(),
            "/v1/nar?path=".to_owned(),
            "/v1/nar?path=%00%01%02".to_owned(),
            format!("/v1/nar?path={}%00", &missing),
            format!("/v1/cat?path={bad_hash}/f"),
            format!("/v1/nar?path=/store/{}", "z".repeat(5000)),
        ] {
            assert_error(&get(&st, &target), 400, "");
        }
        assert_error(&get(&st, &format!("/v1/nar?path={missing}")), 404, "not valid");
        assert_error(&get(&st, &format!("/v1/cat?path={missing}/f")), 404, "not valid");
        for op in [
            format!(r#"{{"op":"path-info","paths":["{bad_hash}"],"closure":false}}"#),
            r#"{"op":"closure","paths":["/store/../etc"]}"#.to_owned(),
            r#"{"op":"references","path":"relative/path"}"#.to_owned(),
            r#"{"op":"referrers","path":""}"#.to_owned(),
            r#"{"op":"graph","paths":["/nix/store/00000000000000000000000000000000-x"]}"#.to_owned(),
            r#"{"op":"is-valid","paths":["/store/0"]}"#.to_owned(),
            format!(r#"{{"op":"add-text","name":"t","contents":"aGk=","references":["{bad_hash}"]}}"#),
            r#"{"op":"add-text","name":"a b","contents":"aGk=","references":[]}"#.to_owned(),
            r#"{"op":"add-text","name":"t","contents":"not base64!","references":[]}"#.to_owned(),
        ] {
            assert_error(&query(&st, &op), 400, "");
        }
        assert_error(&query(&st, &format!(r#"{{"op":"closure","paths":["{missing}"]}}"#)), 404, "not valid");
        assert_error(
            &http(&st, "POST", "/v1/export", "application/json", format!(r#"{{"paths":["{bad_hash}"]}}"#).as_bytes()),
            400,
            "invalid hash part",
        );
        assert_error(
            &http(&st, "POST", "/v1/export", "application/json", format!(r#"{{"paths":["{missing}"]}}"#).as_bytes()),
            404,
            "not valid",
        );
        // A valid is-valid query answers false for a missing path.
        let r = query(&st, &format!(r#"{{"op":"is-valid","paths":["{missing}"]}}"#));
        assert_eq!(r.status, 200);
        assert_eq!(
            serde_json::from_slice::<Value>(&r.body).unwrap(),
            serde_json::json!({"kind": "valid", "value": [false]})
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Clients that lie about their bodies or go away

#[test]
fn clients_that_go_away_do_not_hurt_the_daemon() {
    let st = TestStore::start();
    let good = valid_tree_nar("early");
    let targets = ["/v1/add?name=huge&method=nar", "/v1/add?name=huge&method=flat&size=1099511627776", "/v1/import"];
    for target in targets {
        // A huge Content-Length, a tiny body, then the client half-closes and waits.
        refused(&st, &format!("{target}: huge Content-Length, half-closed"), || {
            let mut c = connect(&st);
            write!(c, "POST {target} HTTP/1.1\r\nHost: c\r\nContent-Length: 1099511627776\r\n\r\n").unwrap();
            c.write_all(&good[..40]).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut raw = Vec::new();
            let _ = c.read_to_end(&mut raw);
            if !raw.is_empty() {
                let r = parse_reply(&raw);
                assert!(r.status >= 400, "{target}: {} {}", r.status, String::from_utf8_lossy(&r.body));
            }
            wait_until("the temporary area is empty", || tmp_is_empty(&st));
        });
        // The same, but the client vanishes without reading anything.
        refused(&st, &format!("{target}: huge Content-Length, client gone"), || {
            let mut c = connect(&st);
            write!(c, "POST {target} HTTP/1.1\r\nHost: c\r\nContent-Length: 1099511627776\r\n\r\n").unwrap();
            c.write_all(&good).unwrap();
            drop(c);
            wait_until("the temporary area is empty", || tmp_is_empty(&st));
        });
    }
    // A client that stops in the middle of a large upload (a megabyte into a big file).
    refused(&st, "client gone mid-upload", || {
        let mut c = connect(&st);
        let mut body = Vec::new();
        for s in [&b"nix-archive-1"[..], b"(", b"type", b"regular", b"contents"] {
            write_bytes(&mut body, s).unwrap();
        }
        write_u64(&mut body, 100 << 20).unwrap();
        write!(
            c,
            "POST /v1/add?name=big&method=nar HTTP/1.1\r\nHost: c\r\nContent-Length: {}\r\n\r\n",
            body.len() + (100 << 20) + 16
        )
        .unwrap();
        c.write_all(&body).unwrap();
        c.write_all(&vec![7u8; 1 << 20]).unwrap();
        wait_until("the daemon writes the file", || !tmp_is_empty(&st));
        drop(c);
        wait_until("the temporary area is empty", || tmp_is_empty(&st));
    });
    // Garbage instead of HTTP, and a connection that says nothing.
    refused(&st, "not HTTP", || {
        let mut c = connect(&st);
        c.write_all(b"\x00\x01\x02 SSH-2.0-OpenSSH\r\n\r\n").unwrap();
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut raw = Vec::new();
        let _ = c.read_to_end(&mut raw);
        let silent = connect(&st);
        drop(silent);
    });
    // Many abandoned connections at once.
    let before = st.store_entries();
    let conns: Vec<UnixStream> = (0..64)
        .map(|i| {
            let mut c = connect(&st);
            write!(c, "POST /v1/add?name=a{i}&method=nar HTTP/1.1\r\nHost: c\r\nContent-Length: 999999\r\n\r\n")
                .unwrap();
            c.write_all(&good[..64]).unwrap();
            c
        })
        .collect();
    wait_until("the daemon has started all 64 uploads", || {
        fs::read_dir(st.real_store_dir().join(".cairn-tmp")).map(|d| d.count()).unwrap_or(0) == 64
    });
    let added = normal_add_works(&st); // while 64 uploads hang
    drop(conns);
    wait_until("the temporary area is empty", || tmp_is_empty(&st));
    let mut want = before;
    want.push(added.rsplit('/').next().unwrap().to_owned());
    want.sort();
    assert_eq!(st.store_entries(), want, "only the normal add is registered");
    normal_add_works(&st);
    let mut st = st;
    st.stop(); // and it still shuts down cleanly
}

// ---------------------------------------------------------------------------------------------
// More corners

/// User-controlled strings quoted in error messages must not break them over several lines.
#[test]

fn error_messages_with_control_characters_stay_on_one_line() {
    let st = TestStore::start();
    refused(&st, "a newline in an add name", || {
        let r = http(&st, "POST", "/v1/add?name=a%0Ab&method=nar", "application/octet-stream", &valid_tree_nar("nl"));
        assert_error(&r, 400, "illegal character");
    });
    refused(&st, "a newline in a path argument", || {
        let e = st.fail(&["path-info", "/store/x\ninjected: line"], b"");
        assert!(e.contains("too short"), "{e}");
    });
    refused(&st, "a newline in an imported path", || {
        let mut v = Vec::new();
        export_item(&mut v, &valid_tree_nar("nl"), &format!("{}-a\nb", &fake_path(4, "x")[..39]), &[]);
        write_end_marker(&mut v).unwrap();
        let e = st.fail(&["import"], &v);
        assert!(e.contains("illegal character"), "{e}");
    });
}

/// An export stream naming one path twice, then another path: the duplicate is skipped (the
/// first copy wins), and the rest of the stream still imports.
#[test]

fn import_of_a_stream_with_a_duplicate_path() {
    let st = TestStore::start();
    let (a, b) = (fake_path(5, "dup-a"), fake_path(6, "dup-b"));
    let nar_a = valid_tree_nar("dup a");
    let mut v = Vec::new();
    export_item(&mut v, &nar_a, &a, &[]);
    export_item(&mut v, &nar_a, &a, &[]);
    export_item(&mut v, &valid_tree_nar("dup b"), &b, &[&a]);
    write_end_marker(&mut v).unwrap();
    let out = st.run(&["import"], &v);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines(&st.ok(&["closure", &b])), [a.clone(), b.clone()]);
    st.store_entries();
}

#[test]
fn tampered_store_contents_are_not_exported() {
    let st = TestStore::start();
    let src = tempfile::tempdir().unwrap();
    let f = src.path().join("victim");
    fs::write(&f, b"original contents\n").unwrap();
    let p = line(&st.ok(&["add", f.to_str().unwrap()]));
    let good = st.ok_bytes(&["export", &p], b"");
    // Someone with root changes the file behind the daemon's back (same length).
    let real = st.real_store_dir().join(p.rsplit('/').next().unwrap());
    fs::set_permissions(&real, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&real, b"tampered contents\n").unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o444)).unwrap();
    let out = st.run(&["export", &p], b"");
    assert!(!out.status.success(), "an export of tampered contents must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // The stream must not be a complete, importable export of the tampered bytes.
    assert_ne!(out.stdout.len(), good.len(), "a full-length stream was written");
    let other = TestStore::start();
    let r = other.run(&["import"], &out.stdout);
    assert!(!r.status.success(), "the partial stream must not import");
    assert_eq!(other.store_entries(), Vec::<String>::new());
}

/// A NAR announcing a file of 2^62 bytes is the client's error (400), not the store's (500).
#[test]

fn a_file_larger_than_the_file_system_allows_is_a_client_error() {
    let st = TestStore::start();
    // A file announcing 2^62 bytes, with 8 of them: a client error, not a server one.
    let mut huge_file = Vec::new();
    for s in [&b"nix-archive-1"[..], b"(", b"type", b"regular", b"contents"] {
        write_bytes(&mut huge_file, s).unwrap();
    }
    write_u64(&mut huge_file, 1 << 62).unwrap();
    huge_file.extend_from_slice(b"12345678");
    refused(&st, "a file of 2^62 bytes", || {
        let r = post_nar(&st, "huge", &huge_file);
        assert_error(&r, 400, "");
    });
}

#[test]
fn more_malformed_nars() {
    let st = TestStore::start();
    let long = vec![b'n'; 256];
    refused(&st, "an entry name of 256 bytes", || {
        assert_error(&post_nar(&st, "long", &nar(dir(vec![(&long[..], file(b"x"))]))), 400, "exceeds the limit");
    });
    refused(&st, "a symlink target of 4096 bytes", || {
        assert_error(&post_nar(&st, "long", &nar(symlink(&vec![b'a'; 4096]))), 400, "exceeds the limit");
    });
    // Limits are inclusive: 255-byte names and 4095-byte targets are fine.
    let ok = nar(dir(vec![(&long[..255], file(b"x")), (b"t", symlink(&vec![b'a'; 4095]))]));
    assert_eq!(post_nar(&st, "limits", &ok).status, 200);

    // A store path that is itself a symlink to a host file: ls shows the link, cat refuses.
    let r = post_nar(&st, "rootlink", &nar(symlink(b"/etc/passwd")));
    assert_eq!(r.status, 200);
    let p = serde_json::from_slice::<Value>(&r.body).unwrap()["path"].as_str().unwrap().to_owned();
    let out = st.run(&["cat", &p], b"");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("root:"), "cat followed a symlink out of the store");
    let e = st.fail(&["cat", &p], b"");
    assert!(e.contains("not a regular file"), "{e}");
    let e = st.fail(&["cat", &format!("{p}/x")], b"");
    assert!(e.contains("not a directory"), "{e}");
    let ls = serde_json::from_str::<Value>(&st.ok(&["ls", "--json", &p])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
    assert_eq!(
        (&ls[0]["type"], &ls[0]["target"]),
        (&serde_json::json!("symlink"), &serde_json::json!("/etc/passwd")),
        "{ls}"
    );
    assert_eq!(st.ok_bytes(&["nar", "dump", &p], b""), nar(symlink(b"/etc/passwd")));
}

/// `cairn ls` of a store path that is a file or a symlink lists one entry named after it.
#[test]

fn ls_of_a_store_path_that_is_not_a_directory_names_it() {
    let st = TestStore::start();
    let src = tempfile::tempdir().unwrap();
    let f = src.path().join("plain.txt");
    fs::write(&f, b"12345").unwrap();
    let p = line(&st.ok(&["add", f.to_str().unwrap()]));
    let base = p.rsplit('/').next().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&st.ok(&["ls", "--json", &p])).unwrap(),
        serde_json::json!([{"name": base, "type": "regular", "size": 5}])
    );
    assert!(st.ok(&["ls", &p]).trim_end().ends_with(&format!(" {base}")));
}

/// An export stream that is refused at its first bytes, followed by megabytes the daemon will
/// never read: `cairn import` must still say why.
#[test]

fn early_refusal_of_a_large_import_names_the_problem() {
    let st = TestStore::start();
    let mut stream = 7u64.to_le_bytes().to_vec();
    stream.resize(20 << 20, 0);
    refused(&st, "garbage marker, then 20 MB", || {
        let e = st.fail(&["import"], &stream);
        assert!(e.contains("not an export stream"), "{e}");
    });
}

#[test]
fn bad_gc_requests_are_refused() {
    let st = TestStore::start();
    let kept = normal_add_works(&st);
    // Which paths are live is not the client's to decide: nothing here deletes anything.
    refused(&st, "relative root link", || {
        let r = query(&st, &format!(r#"{{"op":"add-root","link":"result","path":"{kept}"}}"#));
        assert_error(&r, 400, "not an absolute path");
    });
    refused(&st, "root of an invalid path", || {
        let r = query(&st, &format!(r#"{{"op":"add-root","link":"/tmp/x","path":"{}"}}"#, fake_path(3, "gone")));
        assert_error(&r, 404, "not valid");
    });
    refused(&st, "root of a path outside the store", || {
        let r = query(&st, r#"{"op":"add-root","link":"/tmp/x","path":"/etc/passwd"}"#);
        assert_error(&r, 400, "/etc/passwd");
    });
    for body in [
        r#"{"op":"gc","action":"delete-everything"}"#,
        r#"{"op":"gc","action":"collect","max_freed":-1}"#,
        r#"{"op":"gc","action":"collect","max_freed":"lots"}"#,
        r#"{"op":"delete","paths":"/store/x"}"#,
        r#"{"op":"verify","check_contents":"yes"}"#,
    ] {
        refused(&st, body, || {
            assert_error(&query(&st, body), 400, "bad request");
        });
    }
    refused(&st, "delete of a path outside the store", || {
        assert_error(&query(&st, r#"{"op":"delete","paths":["/store/../etc"]}"#), 400, "/store/../etc");
    });
    assert!(st.ok(&["path-info", &kept]).contains(&kept));
}
