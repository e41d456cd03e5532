//! Scratch files of the registry's blob uploads (`<state>/oci-uploads`) never outlive their
//! upload: a monolithic upload (`POST …/blobs/uploads/?digest=`) whose client goes away
//! mid-body used to leave its file behind with no session to expire it (regression test), and
//! what a crash leaves is swept when the daemon starts.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_tests::oci::{digest_of, http};
use cairn_tests::{free_port, wait_listening, TestStore};

fn uploads(st: &TestStore) -> PathBuf {
    st.root.path().join("var/lib/cairn/oci-uploads")
}

fn files(dir: &Path) -> Vec<(String, u64)> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map(|m| m.len()).unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits up to 5 s for `cond`.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(5), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn registry() -> (TestStore, u16) {
    let port = free_port();
    let st = TestStore::builder().config(&format!("listen = \"127.0.0.1:{port}\"\naccept-pushes = true\n")).start();
    wait_listening(port);
    (st, port)
}

#[test]
fn a_monolithic_upload_cut_mid_body_leaves_no_scratch_file() {
    let (st, port) = registry();
    let dir = uploads(&st);
    let blob = vec![7u8; 1 << 20];
    let digest = digest_of(&blob);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST /v2/team/app/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        blob.len()
    )
    .unwrap();
    s.write_all(&blob[..256 << 10]).unwrap();
    eventually("the upload's scratch file appears", || files(&dir).iter().any(|(_, len)| *len > 0));
    drop(s);
    eventually("the scratch file of the cut upload is removed", || files(&dir).is_empty());

    // A whole upload whose bytes do not have its digest leaves nothing either.
    let a = http(port, "POST", &format!("/v2/team/app/blobs/uploads/?digest={digest}"), &[], &blob[1..]);
    assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
    assert!(files(&dir).is_empty(), "{:?}", files(&dir));
    // And the registry still takes the blob whole.
    let a = http(port, "POST", &format!("/v2/team/app/blobs/uploads/?digest={digest}"), &[], &blob);
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    assert!(files(&dir).is_empty(), "{:?}", files(&dir));
}

#[test]
fn a_session_upload_cut_mid_chunk_leaves_no_scratch_file() {
    let (st, port) = registry();
    let dir = uploads(&st);
    let a = http(port, "POST", "/v2/team/app/blobs/uploads/", &[], b"");
    assert_eq!(a.status, 202);
    let loc = a.header("location").unwrap().to_owned();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "PATCH {loc} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1048576\r\n\r\n").unwrap();
    s.write_all(&[1u8; 128 << 10]).unwrap();
    eventually("the chunk reaches the scratch file", || files(&dir).iter().any(|(_, len)| *len > 0));
    drop(s);
    // The session went with its half-written chunk.
    eventually("the session's scratch file is removed", || files(&dir).is_empty());
    assert_eq!(http(port, "GET", &loc, &[], b"").status, 404);
}

#[test]
fn scratch_files_left_by_an_earlier_run_are_swept_at_start() {
    let mut st = TestStore::start();
    let dir = uploads(&st);
    st.crash();
    std::fs::create_dir_all(dir.join("0123abcd-dir")).unwrap();
    std::fs::write(dir.join("00112233445566778899aabbccddeeff"), b"half an upload").unwrap();
    std::fs::write(dir.join("0123abcd-dir/x"), b"x").unwrap();
    // Swept whether or not this run serves the registry.
    st.restart();
    assert!(files(&dir).is_empty(), "{:?}", files(&dir));
    assert!(st.log().contains("removed scratch files of registry uploads"), "{}", st.log());
}

/// A blob the store already holds (here, another repository's) is linked into a repository only
/// by an upload of its bytes: naming its digest over other bytes — monolithic or at the end of
/// a session — is refused as distribution refuses it, and the repository still does not have it.
#[test]
fn a_held_blob_is_not_claimed_by_its_digest_over_other_bytes() {
    let (_st, port) = registry();
    let secret = b"another repository's layer".repeat(1000);
    let digest = digest_of(&secret);
    let put = http(port, "POST", &format!("/v2/secret/app/blobs/uploads/?digest={digest}"), &[], &secret);
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));
    let blob_in = |repo: &str| http(port, "GET", &format!("/v2/{repo}/blobs/{digest}"), &[], b"").status;
    assert_eq!(blob_in("team/x"), 404);
    let junk = http(port, "POST", &format!("/v2/team/x/blobs/uploads/?digest={digest}"), &[], b"junk");
    assert_eq!(junk.status, 400, "{}", String::from_utf8_lossy(&junk.body));
    assert!(String::from_utf8_lossy(&junk.body).contains("DIGEST_INVALID"));
    assert_eq!(blob_in("team/x"), 404, "the monolithic upload linked nothing");
    let session = http(port, "POST", "/v2/team/x/blobs/uploads/", &[], b"");
    assert_eq!(session.status, 202);
    let loc = session.header("location").unwrap().to_owned();
    let patched = http(port, "PATCH", &loc, &[], b"junk");
    assert_eq!(patched.status, 202, "{}", String::from_utf8_lossy(&patched.body));
    let loc = patched.header("location").unwrap().to_owned();
    let sep = if loc.contains('?') { '&' } else { '?' };
    let done = http(port, "PUT", &format!("{loc}{sep}digest={digest}"), &[], b"");
    assert_eq!(done.status, 400, "{}", String::from_utf8_lossy(&done.body));
    assert_eq!(blob_in("team/x"), 404, "the session linked nothing");
    // Its true bytes are taken, and then it is there.
    let right = http(port, "POST", &format!("/v2/team/x/blobs/uploads/?digest={digest}"), &[], &secret);
    assert_eq!(right.status, 201, "{}", String::from_utf8_lossy(&right.body));
    assert_eq!(blob_in("team/x"), 200);
}

/// Upload sessions are bounded: past 4096 open ones, a new one is refused (429, saying why)
/// until one ends; a finished upload frees its place.
#[test]
fn open_upload_sessions_are_bounded() {
    let (st, port) = registry();
    let mut last = String::new();
    for _ in 0..4096 {
        let a = http(port, "POST", "/v2/team/app/blobs/uploads/", &[], b"");
        assert_eq!(a.status, 202);
        last = a.header("location").unwrap().to_owned();
    }
    let refused = http(port, "POST", "/v2/team/app/blobs/uploads/", &[], b"");
    assert_eq!(refused.status, 429, "{}", String::from_utf8_lossy(&refused.body));
    assert!(String::from_utf8_lossy(&refused.body).contains("uploads are open"));
    assert_eq!(files(&uploads(&st)).len(), 4096, "no file for the refused session");
    // One finished: a place is free again.
    let sep = if last.contains('?') { '&' } else { '?' };
    let done = http(port, "PUT", &format!("{last}{sep}digest={}", digest_of(b"")), &[], b"");
    assert_eq!(done.status, 201, "{}", String::from_utf8_lossy(&done.body));
    assert_eq!(http(port, "POST", "/v2/team/app/blobs/uploads/", &[], b"").status, 202);
}
