//! A content address is checked against the content, wherever a path comes from.
//!
//! The forgery: a narinfo (or a pushed path) whose `CA:` field yields its store path — so it
//! needs no signature — with a NAR of other bytes and a NarHash/NarSize/FileHash consistent with
//! those bytes. The tests make one in a store of their own (a genuine `cairn add --flat`, then
//! the bytes and the recorded NAR hash swapped while the daemon is stopped), and offer it to
//! another daemon every way a path can arrive: from a binary cache, pushed by an unprivileged
//! user over the Unix socket (`copy --to unix://`), pushed over TCP (`copy --to tcp://`) and
//! uploaded to the registry over a blob path an import put there. Each is refused with one line
//! naming the content-address mismatch and leaves nothing registered; an export stream, which
//! carries no content address, is taken only from a trusted user, as Nix takes it; and
//! `verify --check-contents` reports the store that holds a forgery.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use cairn_nix::nar::NarWriter;
use cairn_nix::{Hash, HashAlgo};
use cairn_tests::{bin_dir, free_port, line, wait_listening, world_readable_tempdir, TestStore};

const GENUINE: &[u8] = b"the genuine release tarball\n";
const PLANTED: &[u8] = b"a planted backdoor, of another length\n";

use cairn_tests::utf8 as s;

fn nar_of_file(bytes: &[u8]) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.regular(None, false, bytes.len() as u64, &mut &bytes[..]).unwrap();
    w.finish().unwrap()
}

/// Adds `GENUINE` as a flat path named `name`, then — daemon stopped — replaces its bytes with
/// `PLANTED` and its recorded NAR hash and size with theirs, as a store that took a forgery in
/// would hold it. Returns the path.
fn forged_store(name: &str) -> (TestStore, String, tempfile::TempDir) {
    let mut st = TestStore::start();
    let src = world_readable_tempdir();
    let f = src.path().join(name);
    fs::write(&f, GENUINE).unwrap();
    let p = line(&st.ok(&["add", "--flat", s(&f)]));
    st.stop();
    let base = p.rsplit('/').next().unwrap().to_owned();
    let real = st.real_store_dir().join(&base);
    fs::set_permissions(&real, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&real, PLANTED).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o444)).unwrap();
    let nar = nar_of_file(PLANTED);
    let db = rusqlite::Connection::open(st.root.path().join("var/lib/cairn/db/db.sqlite")).unwrap();
    let changed = db
        .execute(
            "UPDATE ValidPaths SET hash = ?1, narSize = ?2 WHERE path = ?3",
            rusqlite::params![Hash::digest(HashAlgo::Sha256, &nar).to_string(), nar.len() as i64, base],
        )
        .unwrap();
    assert_eq!(changed, 1, "the path's row");
    drop(db);
    st.restart();
    (st, p, src)
}

fn assert_refused(out: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{what} must be refused; stdout:\n{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: one line:\n{err}");
    assert!(err.contains("content address mismatch"), "{what}: the error names the content-address mismatch:\n{err}");
    err
}

fn assert_not_valid(st: &TestStore, p: &str) {
    let out = st.run(&["path-info", p], b"");
    assert!(!out.status.success(), "'{p}' must not be valid");
    let base = p.rsplit('/').next().unwrap();
    assert!(!st.store_entries().iter().any(|e| e == base), "nothing of '{p}' is left in the store");
}

#[test]
fn verify_check_contents_reports_a_planted_content_address() {
    let (st, p, _src) = forged_store("release.tar");
    // The recorded NAR hash agrees with the planted bytes: only the content address tells.
    let out = st.run(&["verify", "--check-contents"], b"");
    assert!(!out.status.success(), "verify must fail");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains(&p) && stdout.contains("content address mismatch"), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "one problem: {stdout}");
    // Without --check-contents nothing is read, and nothing is said.
    st.ok(&["verify"]);
}

#[test]
fn a_binary_cache_with_a_forged_content_address_is_refused() {
    let (a, p, _src) = forged_store("release.tar");
    let cache = tempfile::tempdir().unwrap();
    let url = format!("file://{}", cache.path().display());
    a.ok(&["copy", "--to", &url, &p]);
    let hash_part = &p.rsplit('/').next().unwrap()[..32];
    let narinfo = fs::read_to_string(cache.path().join(format!("{hash_part}.narinfo"))).unwrap();
    assert!(narinfo.contains("\nCA: fixed:sha256:") && !narinfo.contains("\nSig:"), "{narinfo}");

    let b = TestStore::start();
    let err = assert_refused(&b.run(&["substitute", "--from", &url, &p], b""), "substitution");
    assert!(err.contains(&p), "{err}");
    assert_not_valid(&b, &p);

    // The same cache with the genuine bytes: substituted (the check is of contents, not of
    // unsigned caches).
    let honest = TestStore::start();
    let src = world_readable_tempdir();
    fs::write(src.path().join("release.tar"), GENUINE).unwrap();
    assert_eq!(line(&honest.ok(&["add", "--flat", s(&src.path().join("release.tar"))])), p);
    let good = tempfile::tempdir().unwrap();
    let good_url = format!("file://{}", good.path().display());
    honest.ok(&["copy", "--to", &good_url, &p]);
    b.ok(&["substitute", "--from", &good_url, &p]);
    assert_eq!(b.ok_bytes(&["cat", &p], b""), GENUINE);
}

#[test]
fn a_flat_path_with_references_is_refused() {
    let st = TestStore::start();
    let src = world_readable_tempdir();
    fs::write(src.path().join("flat"), GENUINE).unwrap();
    fs::write(src.path().join("other"), b"another path\n").unwrap();
    let p = line(&st.ok(&["add", "--flat", s(&src.path().join("flat"))]));
    let other = line(&st.ok(&["add", s(&src.path().join("other"))]));
    let cache = tempfile::tempdir().unwrap();
    let url = format!("file://{}", cache.path().display());
    st.ok(&["copy", "--to", &url, &p]);
    let hash_part = &p.rsplit('/').next().unwrap()[..32];
    let narinfo_path = cache.path().join(format!("{hash_part}.narinfo"));
    let narinfo = fs::read_to_string(&narinfo_path).unwrap();
    let other_base = other.rsplit('/').next().unwrap();
    // The flat address would still yield the path: flat paths are computed without references.
    let forged: String = narinfo
        .lines()
        .map(|l| if l.starts_with("References:") { format!("References: {other_base}\n") } else { format!("{l}\n") })
        .collect();
    assert_ne!(forged, narinfo, "the narinfo has a References line");
    fs::write(&narinfo_path, forged).unwrap();

    let b = TestStore::start();
    b.ok(&["add", s(&src.path().join("other"))]);
    let out = b.run(&["substitute", "--from", &url, &p], b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a flat path referring to another must be refused");
    assert!(err.contains("allows no references"), "{err}");
    assert_not_valid(&b, &p);
}

#[test]
fn an_unprivileged_push_over_the_socket_with_a_forged_content_address_is_refused() {
    if !nix::unistd::geteuid().is_root() || !cairn_tests::require_peer("setpriv") {
        eprintln!("skipping: needs root and setpriv to push as another user");
        return;
    }
    let (a, p, _src) = forged_store("release.tar");
    let b = TestStore::start();
    let out = a.run_as_nobody(&["copy", "--to", &format!("unix://{}", b.socket.display()), &p], b"");
    assert_refused(&out, "nobody's copy --to unix://");
    assert_not_valid(&b, &p);
}

#[test]
fn a_tcp_push_with_a_forged_content_address_is_refused() {
    let (a, p, _src) = forged_store("release.tar");
    let port = free_port();
    let b = TestStore::builder().config(&format!("listen = \"127.0.0.1:{port}\"\naccept-pushes = true\n")).start();
    wait_listening(port);
    assert_refused(&a.run(&["copy", "--to", &format!("tcp://127.0.0.1:{port}"), &p], b""), "copy --to tcp://");
    assert_not_valid(&b, &p);
}

#[test]
fn an_import_is_trusted_as_in_nix_and_carries_no_content_address() {
    let (a, forged, _src) = forged_store("release.tar");
    // An export stream carries no content address; importing needs trust, and a trusted import
    // is taken as Nix takes it: registered without one (so nothing vouches for its name).
    let b = TestStore::start();
    b.ok_bytes(&["import"], &a.ok_bytes(&["export", &forged], b""));
    let info: serde_json::Value = serde_json::from_slice(&b.ok_bytes(&["path-info", "--json", &forged], b"")).unwrap();
    assert!(info[0]["ca"].is_null(), "{info}");
    // Nor can an untrusted user import it.
    if nix::unistd::geteuid().is_root() && cairn_tests::require_peer("setpriv") {
        let c = TestStore::start();
        let stream = a.ok_bytes(&["export", &forged], b"");
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin_dir().join("cairn"))
            .args(c.store_args())
            .args(["--no-auto-start", "import"])
            .env("HOME", "/nonexistent");
        let out = cairn_tests::output_with_stdin(&mut cmd, &stream);
        assert!(!out.status.success(), "an untrusted import must be refused");
        assert_not_valid(&c, &forged);
    }
}

#[test]
fn a_registry_never_vouches_for_bytes_planted_at_a_blob_path() {
    let digest_hex = sha2_hex(GENUINE);
    let name = format!("oci-blob-sha256-{digest_hex}");
    let (a, forged, _src) = forged_store(&name);
    // The forged blob path reaches a daemon by a trusted import (no content address travels).
    let port = free_port();
    let b = TestStore::builder().config(&format!("listen = \"127.0.0.1:{port}\"\naccept-pushes = true\n")).start();
    wait_listening(port);
    b.ok_bytes(&["import"], &a.ok_bytes(&["export", &forged], b""));

    // The genuine upload of that digest is refused rather than answered with the planted bytes.
    let src = world_readable_tempdir();
    let blob = src.path().join("blob");
    fs::write(&blob, GENUINE).unwrap();
    let base = format!("http://127.0.0.1:{port}/v2/team/app");
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "-X", "POST", "--data-binary"])
        .arg(format!("@{}", blob.display()))
        .arg(format!("{base}/blobs/uploads/?digest=sha256:{digest_hex}"))
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!answer.ends_with("201"), "the upload into a planted blob path must not succeed: {answer}");
    // The fault is the store's, not the client's: the registry answers 500 and its log says why.
    assert!(answer.ends_with("500"), "{answer}");
    assert!(b.log().contains("content address mismatch"), "cairnd's log names the mismatch:\n{}", b.log());
    // And it is never served.
    let out = Command::new("curl").args(["-sS", &format!("{base}/blobs/sha256:{digest_hex}")]).output().unwrap();
    assert!(!out.stdout.windows(PLANTED.len()).any(|w| w == PLANTED), "the registry served the planted bytes");
    assert!(String::from_utf8_lossy(&out.stdout).contains("UNKNOWN"), "{}", String::from_utf8_lossy(&out.stdout));
}

fn sha2_hex(bytes: &[u8]) -> String {
    Hash::digest(HashAlgo::Sha256, bytes).encode(cairn_nix::hash::Encoding::Base16)
}
