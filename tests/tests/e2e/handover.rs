//! Files handed to the daemon open (`SCM_RIGHTS` on a connection's first byte) for `POST
//! /v1/add?handedOver=true` (one file) and `?spliced=true` (a tree's large files), spoken raw: whatever is handed over, the daemon reads only a regular
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
            "not exactly one file was handed over",
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

/// Sends the mark byte with `fds` attached, then a spliced add request with `body`; the status
/// code and body of the answer.
fn add_spliced(st: &TestStore, fds: &[&std::fs::File], body: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(&st.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    sendmsg::<()>(s.as_raw_fd(), &[IoSlice::new(&[HANDOVER_MARK])], &cmsg, MsgFlags::empty(), None).unwrap();
    write!(
        s,
        "POST /v1/add?name=tree&method=nar&spliced=true HTTP/1.1\r\nHost: cairnd\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned())
}

/// `cairn add TREE` hands the tree's large files over open and streams the rest: the path and
/// NAR hash are those of the tree's NAR made here, byte for byte.
#[test]
fn a_tree_whose_large_files_are_handed_over_is_added_as_its_nar_says() {
    let st = TestStore::start();
    let tree = st.root.path().join("tree");
    std::fs::create_dir_all(tree.join("lib")).unwrap();
    std::fs::write(tree.join("lib/big.bin"), cairn_tests::Rng::new(5).bytes(3 << 20)).unwrap();
    std::fs::write(tree.join("other.bin"), cairn_tests::Rng::new(6).bytes((1 << 20) + 7)).unwrap();
    std::fs::write(tree.join("small.txt"), b"small\n").unwrap();
    std::os::unix::fs::symlink("lib/big.bin", tree.join("link")).unwrap();
    let added = st.ok(&["add", tree.to_str().unwrap()]).trim().to_owned();
    let info: serde_json::Value = serde_json::from_str(&st.ok(&["path-info", "--json", &added])).unwrap();
    let mut nar = Vec::new();
    cairn_nar_fs::dump(&tree, &mut nar).unwrap();
    let expected = cairn_nix::Hash::digest(cairn_nix::HashAlgo::Sha256, &nar);
    assert_eq!(info[0]["narHash"].as_str().unwrap(), expected.to_sri(), "{info}");
    assert_eq!(info[0]["narSize"].as_u64().unwrap(), nar.len() as u64);
    st.ok(&["verify", "--check-contents"]);
}

/// A spliced body that names a file not handed over, or a size that is not the file's, is
/// refused in one line and nothing is registered; the daemon keeps serving.
#[test]
fn a_spliced_body_that_does_not_match_its_files_is_refused() {
    let st = TestStore::start();
    let f = st.root.path().join("data.bin");
    std::fs::write(&f, vec![7u8; 5000]).unwrap();
    let file = std::fs::File::open(&f).unwrap();
    let bytes = |b: &[u8]| [&[1u8][..], &(b.len() as u64).to_le_bytes(), b].concat();
    let file_ref = |k: u32, len: u64| [&[2u8][..], &k.to_le_bytes(), &len.to_le_bytes()].concat();
    // The NAR of a lone 5000-byte file, its contents handed over.
    let mut w = cairn_nix::nar::NarWriter::new(Vec::new()).unwrap();
    w.regular(None, false, 5000, &mut &vec![7u8; 5000][..]).unwrap();
    let nar = w.finish().unwrap();
    let start = nar.windows(5000).position(|w| w.iter().all(|b| *b == 7)).unwrap();
    let (head, tail) = (&nar[..start], &nar[start + 5000..]);
    let body = |file_part: Vec<u8>| [bytes(head), file_part, bytes(tail)].concat();
    for (bad, says) in [
        (body(file_ref(1, 5000)), "handed-over file 1, and 1 were handed over"),
        (body(file_ref(0, 4999)), "is 5000 bytes, the body says 4999"),
    ] {
        let (status, answer) = add_spliced(&st, &[&file], &bad);
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains(says), "{answer}");
        assert!(valid_paths(&st).is_empty(), "nothing registered");
    }
    let (status, answer) = add_spliced(&st, &[&file], &body(file_ref(0, 5000)));
    assert_eq!(status, 200, "{answer}");
    let via_cli = st.ok(&["add", f.to_str().unwrap(), "--name", "tree"]).trim().to_owned();
    assert!(answer.contains(&format!("\"path\":\"{via_cli}\"")), "{answer}");
}

/// Descriptors beyond what a request may use (more than 16, up to the 253 one message can
/// carry) are closed, not kept: connections that hand over many leave the daemon's open files
/// as they were.
#[test]
fn descriptors_handed_over_beyond_the_limit_are_closed() {
    let st = TestStore::start();
    let open_fds = || std::fs::read_dir(format!("/proc/{}/fd", st.pid())).unwrap().count();
    let f = st.root.path().join("data.bin");
    std::fs::write(&f, b"x").unwrap();
    let files: Vec<std::fs::File> = (0..40).map(|_| std::fs::File::open(&f).unwrap()).collect();
    let refs: Vec<&std::fs::File> = files.iter().collect();
    st.ok(&["version"]);
    let before = open_fds();
    for _ in 0..20 {
        let (status, _) = add_spliced(&st, &refs, b"");
        assert_eq!(status, 400, "an empty body is no NAR");
    }
    st.ok(&["version"]);
    let after = open_fds();
    assert!(after <= before + 2, "the daemon kept descriptors: {before} open before, {after} after");
}
