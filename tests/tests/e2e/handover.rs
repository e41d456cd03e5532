//! Files handed to the daemon open (`SCM_RIGHTS` on a connection's first byte) for `POST
//! /v1/add?handedOver=true`, spoken raw: whatever is handed over, the daemon reads only a regular
//! file open for reading, answers anything else with one line naming the problem, registers
//! nothing, and keeps serving.

use std::io::{IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cairn_tests::TestStore;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// The first byte of a connection that hands files over (`cairn_api::HANDOVER_MARK`).
const HANDOVER_MARK: u8 = 0;

/// Sends the mark byte with `fd` attached (or without any), then an add request naming the
/// handed-over file; the status code and body of the answer.
fn add_handed_over(st: &TestStore, fd: Option<&impl AsRawFd>, query: &str) -> (u16, String) {
    let mut s = UnixStream::connect(&st.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let fds: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(s.as_raw_fd(), &[IoSlice::new(&[HANDOVER_MARK])], cmsgs, MsgFlags::empty(), None).unwrap();
    write!(s, "POST /v1/add?{query} HTTP/1.1\r\nHost: cairnd\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned())
}

fn valid_paths(st: &TestStore) -> Vec<String> {
    st.store_entries()
}

#[test]
fn a_file_handed_over_is_added_as_the_cli_adds_it() {
    let st = TestStore::start();
    let f = st.root.path().join("data.bin");
    std::fs::write(&f, cairn_tests::Rng::new(3).bytes(3 << 20)).unwrap();
    let via_cli = st.ok(&["add", f.to_str().unwrap()]).trim().to_owned();
    let via_cli_flat = st.ok(&["add", "--flat", f.to_str().unwrap()]).trim().to_owned();
    let file = std::fs::File::open(&f).unwrap();
    let (status, body) = add_handed_over(&st, Some(&file), "name=data.bin&method=nar&handedOver=true");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("\"path\":\"{via_cli}\"")), "{body}");
    let (status, body) = add_handed_over(&st, Some(&file), "name=data.bin&method=flat&handedOver=true");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("\"path\":\"{via_cli_flat}\"")), "{body}");
    // The NAR of the same file, made here and streamed the old way, lands at the same path.
    let data = std::fs::read(&f).unwrap();
    let mut w = cairn_nix::nar::NarWriter::new(Vec::new()).unwrap();
    w.regular(None, false, data.len() as u64, &mut &data[..]).unwrap();
    let nar = w.finish().unwrap();
    let mut s = UnixStream::connect(&st.socket).unwrap();
    write!(
        s,
        "POST /v1/add?name=data.bin&method=nar HTTP/1.1\r\nHost: cairnd\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        nar.len()
    )
    .unwrap();
    s.write_all(&nar).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.contains(&format!("\"path\":\"{via_cli}\"")), "{answer}");
}

#[test]
fn only_a_readable_regular_file_is_taken_and_nothing_else_is_registered() {
    let st = TestStore::start();
    let before = valid_paths(&st);
    let (r, _w) = nix::unistd::pipe().unwrap();
    let write_only = std::fs::File::create(st.root.path().join("w")).unwrap();
    let dir = std::fs::File::open(st.root.path()).unwrap();
    for (what, answer, want) in [
        ("a pipe", add_handed_over(&st, Some(&r), "name=p&method=nar&handedOver=true"), "is not a regular file"),
        (
            "a directory",
            add_handed_over(&st, Some(&dir), "name=d&method=flat&handedOver=true"),
            "is not a regular file",
        ),
        (
            "a write-only file",
            add_handed_over(&st, Some(&write_only), "name=w&method=nar&handedOver=true"),
            "without read access",
        ),
        (
            "nothing",
            add_handed_over(&st, None::<&std::fs::File>, "name=n&method=nar&handedOver=true"),
            "no file was handed over",
        ),
    ] {
        let (status, body) = answer;
        assert_eq!(status, 400, "{what}: {body}");
        assert!(body.contains(want), "{what}: {body}");
        assert_eq!(body.lines().count(), 1, "{what}: one line: {body}");
    }
    assert_eq!(valid_paths(&st), before, "nothing was registered");
    // A file handed over to a request that does not ask for it is only closed, and the
    // daemon serves on.
    let f = st.root.path().join("x");
    std::fs::write(&f, b"x").unwrap();
    let file = std::fs::File::open(&f).unwrap();
    let (status, body) = add_handed_over(&st, Some(&file), "name=x&method=flat&size=5");
    assert_eq!(status, 400, "{body}");
    assert!(st.ok(&["add", f.to_str().unwrap()]).starts_with("/store/"));
}
