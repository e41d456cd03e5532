//! Hostile binary caches: a [`FakeCache`] (`tests/src/fake_cache.rs`) in front of a real cache
//! that `cairn copy --to file://` wrote. Each test makes the server lie in one way and checks that
//! the substitution fails with one line naming the check that caught the lie, that nothing of the
//! closure is registered or left in the store (the closure has two paths, so a dependency that
//! fails must also keep its good referrer out), that no download outlives its timeouts, and that
//! the daemon afterwards substitutes the truth from the same server and goes on serving.
//!
//! (Merged from the former `hostile_cache.rs` and `cache_hostile.rs`, which each had their own
//! server.)

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cairn_tests::fake_cache::{FakeCache as Server, Reply};
use cairn_tests::{line, write, Rng, TestStore};
use serde_json::Value;

use cairn_tests::utf8 as s;

fn sha256(data: &[u8]) -> String {
    cairn_nix::Hash::digest(cairn_nix::HashAlgo::Sha256, data).to_prefixed(cairn_nix::hash::Encoding::Nix32)
}

// ---------------------------------------------------------------------------------------------
// The cache.

/// A closure of two paths without content addresses (so only signatures can vouch for them): a
/// tree made by `cairn add DIR`, and a note that references it; written, signed, to an
/// uncompressed cache that a [`Server`] serves.
struct Fixture {
    dir: tempfile::TempDir,
    seed: TestStore,
    tree: String,
    note: String,
    sk: PathBuf,
    public: String,
    cache: PathBuf,
    server: Server,
}

/// Marks a place inside the tree's file contents in its NAR.
const MARKER: &[u8] = b"<<hostile-cache-marker>>";

impl Fixture {
    fn new() -> Fixture {
        Fixture::with_data(20_000)
    }

    /// The tree's data file has `size` bytes (over 1 MiB: the daemon's pipelined NAR route).
    fn with_data(size: usize) -> Fixture {
        Fixture::with(size, "none")
    }

    /// As [`Fixture::with_data`], the cache's NARs compressed with `compression`.
    fn with(size: usize, compression: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let scratch = TestStore::start();
        let mut data = Rng::new(size as u64).bytes(size);
        data[size / 2..size / 2 + MARKER.len()].copy_from_slice(MARKER);
        write(&dir.path().join("tree/data"), &data);
        write(&dir.path().join("tree/bin/run"), b"#!/bin/sh\necho run\n");
        let tree = line(&scratch.ok(&["add", s(&dir.path().join("tree"))]));
        write(&dir.path().join("note.txt"), format!("the tree is {tree}\n").as_bytes());
        let note = line(&scratch.ok(&["add-text", "note", s(&dir.path().join("note.txt")), "--ref", &tree]));
        // Through export and import, which carry no content address.
        let seed = TestStore::start();
        seed.ok_bytes(&["import"], &scratch.ok_bytes(&["export", &tree, &note], b""));
        drop(scratch);
        let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
        seed.ok(&["key", "generate", "hostile-cache-1", s(&sk), s(&pk)]);
        let public = std::fs::read_to_string(&pk).unwrap().trim().to_owned();
        let cache = dir.path().join("cache");
        seed.ok(&[
            "copy",
            "--to",
            &format!("file://{}?compression={compression}", cache.display()),
            "--secret-key-file",
            s(&sk),
            &note,
        ]);
        let server = Server::start(&cache);
        let f = Fixture { dir, seed, tree, note, sk, public, cache, server };
        for p in [&f.tree, &f.note] {
            let info = f.narinfo(p);
            assert!(info.contains("\nSig: hostile-cache-1:"), "{info}");
            assert!(!info.contains("\nCA: "), "a content address would vouch for the path by itself:\n{info}");
            assert!(info.contains(&format!("\nCompression: {compression}\n")), "{info}");
        }
        f
    }

    fn narinfo_key(path: &str) -> String {
        format!("/{}.narinfo", &path[7..39])
    }

    fn narinfo(&self, path: &str) -> String {
        std::fs::read_to_string(self.cache.join(&Self::narinfo_key(path)[1..])).unwrap()
    }

    fn nar_key(&self, path: &str) -> String {
        format!("/{}", field(&self.narinfo(path), "URL"))
    }

    fn nar(&self, path: &str) -> Vec<u8> {
        std::fs::read(self.cache.join(&self.nar_key(path)[1..])).unwrap()
    }

    /// A daemon with store dir `/store` trusting the fixture's key, plus `extra` config.
    fn client(&self, extra: &str) -> TestStore {
        TestStore::builder()
            .store_dir("/store")
            .config(&format!("trusted-public-keys = [\"{}\"]\nrequire-sigs = true\n{extra}", self.public))
            .start()
    }

    /// Writes the closure to another cache directory (`cairn copy --to`), signed with `key` if any.
    fn copy_to(&self, dir: &Path, key: Option<&Path>) {
        let url = format!("file://{}?compression=none", dir.display());
        let mut args = vec!["copy", "--to", &url];
        if let Some(k) = key {
            args.extend(["--secret-key-file", s(k)]);
        }
        args.push(&self.note);
        self.seed.ok(&args);
    }

    /// `cairn substitute --from URL NOTE` must fail within `limit`, leaving the store empty;
    /// returns the error line.
    fn refused(&self, st: &TestStore, url: &str, limit: Duration) -> String {
        let started = Instant::now();
        let err = st.fail(&["substitute", "--from", url, &self.note], b"");
        let took = started.elapsed();
        eprintln!("refused in {took:?}: {err}");
        assert!(took < limit, "the substitution took {took:?} (limit {limit:?}): {err}");
        assert_eq!(st.store_entries(), Vec::<String>::new(), "after: {err}");
        err
    }

    /// A daemon trusting the fixture's key that gives up on a silent server after 2 s, plus `extra`.
    fn impatient_client(&self, extra: &str) -> TestStore {
        self.client(&format!("connect-timeout = 2\nstalled-download-timeout = 2\n{extra}"))
    }

    /// `cairn substitute --from` the fixture's server must fail within 15 s with an error
    /// naming `expect`, leaving nothing in the store; the daemon still adds paths afterwards.
    fn refused_naming(&self, st: &TestStore, expect: &str) {
        let started = Instant::now();
        let err = st.fail(&["substitute", "--from", &self.server.url(), &self.note], b"");
        assert!(started.elapsed() < Duration::from_secs(15), "took {:?}: {err}", started.elapsed());
        assert!(err.contains(expect), "expected '{expect}' in: {err}");
        let left: Vec<String> = st.store_entries().into_iter().filter(|e| !e.ends_with("-alive")).collect();
        assert!(left.is_empty(), "left in the store: {left:?}");
        write(&self.dir.path().join("alive"), b"alive\n");
        st.ok(&["add", s(&self.dir.path().join("alive"))]);
        let _ = std::fs::remove_file(self.dir.path().join("alive"));
    }

    /// The error line when the tree was refused by the check `check` while the note (fine in
    /// itself) was left out for needing it.
    fn tree_refused(&self, err: &str, nar_or_narinfo_url: &str, check: &str) {
        let start = format!("cairn: cannot substitute '{}': {nar_or_narinfo_url}: ", self.tree);
        assert!(err.starts_with(&start), "expected '{start}…' in:\n{err}");
        assert!(err.contains(check), "expected '{check}' in:\n{err}");
        assert!(
            err.trim_end().ends_with(" (1 more path could not be substituted; --json lists them)"),
            "the note needs the tree:\n{err}"
        );
    }

    /// The server stops lying: the same daemon now substitutes the closure from it, intact,
    /// and still adds paths of its own.
    fn recovers(&self, st: &TestStore) {
        self.server.clear();
        assert_eq!(st.ok(&["substitute", "--from", &self.server.url(), &self.note]), format!("{}\n", self.note));
        let mut want = vec![self.tree[7..].to_owned(), self.note[7..].to_owned()];
        want.sort();
        assert_eq!(st.store_entries(), want);
        st.ok(&["verify", "--check-contents"]);
        assert_eq!(st.ok(&["cat", &format!("{}/bin/run", self.tree)]), "#!/bin/sh\necho run\n");
        write(&self.dir.path().join("after.txt"), b"still serving\n");
        let added = line(&st.ok(&["add", s(&self.dir.path().join("after.txt"))]));
        assert_eq!(st.ok(&["cat", &added]), "still serving\n");
    }
}

/// A narinfo field's value.
fn field(narinfo: &str, key: &str) -> String {
    narinfo.lines().find_map(|l| l.strip_prefix(&format!("{key}: "))).unwrap_or_else(|| panic!("no {key}")).to_owned()
}

/// A narinfo with field `key` set to `value` (or removed: `None`); it must be there.
fn edit(narinfo: &str, key: &str, value: Option<&str>) -> String {
    let prefix = format!("{key}: ");
    assert!(narinfo.lines().any(|l| l.starts_with(&prefix)), "no {key} in:\n{narinfo}");
    narinfo
        .lines()
        .filter_map(|l| match (l.starts_with(&prefix), value) {
            (false, _) => Some(format!("{l}\n")),
            (true, Some(v)) => Some(format!("{prefix}{v}\n")),
            (true, None) => None,
        })
        .collect()
}

fn json_failures(stdout: &[u8]) -> Vec<(String, String)> {
    let v: Value = serde_json::from_slice(stdout).unwrap();
    assert_eq!(v["paths"], serde_json::json!([]), "{v}");
    assert_eq!(v["added"], serde_json::json!([]), "{v}");
    let mut failed: Vec<(String, String)> = v["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_owned(), f["reason"].as_str().unwrap().to_owned()))
        .collect();
    failed.sort();
    failed
}

const QUICK: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The lies.

#[test]
fn a_nar_that_does_not_match_its_nar_hash_is_refused() {
    let f = Fixture::new();
    let st = f.client("");
    // One byte of the tree's file contents flipped: the NAR still parses, has the same size, and
    // FileHash is made to match the new bytes (signatures do not cover it), so only the NAR
    // hash is left to catch it.
    let nar = f.nar(&f.tree);
    let at = nar.windows(MARKER.len()).position(|w| w == MARKER).expect("the marker is in the NAR") + 3;
    let mut bad = nar.clone();
    bad[at] ^= 0x20;
    let info = f.narinfo(&f.tree);
    assert_eq!(field(&info, "FileSize"), bad.len().to_string());
    f.server.set(&f.nar_key(&f.tree), Reply::Bytes(bad.clone()));
    f.server
        .set(&Fixture::narinfo_key(&f.tree), Reply::Bytes(edit(&info, "FileHash", Some(&sha256(&bad))).into_bytes()));

    let err = f.refused(&st, &f.server.url(), QUICK);
    let nar_url = format!("{}{}", f.server.url(), f.nar_key(&f.tree));
    f.tree_refused(&err, &nar_url, &format!("NAR hash mismatch for '{}'", f.tree));
    assert!(!err.contains("FileHash") && !err.contains("FileSize"), "{err}");
    // The NAR was really fetched (the note's too: it was restored, then left out).
    assert_eq!(f.server.requests_for(&f.nar_key(&f.tree)), 1);
    assert_eq!(f.server.requests_for(&f.nar_key(&f.note)), 1);

    // --json: both paths listed, the note for needing the tree.
    let out = st.run(&["substitute", "--json", "--from", &f.server.url(), &f.note], b"");
    assert_eq!(out.status.code(), Some(1));
    let failed = json_failures(&out.stdout);
    assert_eq!(failed.len(), 2, "{failed:?}");
    let reason = |p: &str| failed.iter().find(|(f, _)| f == p).map(|(_, r)| r.clone()).unwrap_or_default();
    assert_eq!(reason(&f.note), format!("needs '{}', which could not be substituted", f.tree));
    assert!(reason(&f.tree).starts_with(&format!("{nar_url}: NAR hash mismatch for '{}'", f.tree)), "{failed:?}");
    assert_eq!(st.store_entries(), Vec::<String>::new());

    f.recovers(&st);
}

#[test]
fn a_file_that_does_not_match_its_file_hash_or_size_is_refused() {
    let f = Fixture::new();
    let st = f.client("");
    let info = f.narinfo(&f.tree);
    let nar_url = format!("{}{}", f.server.url(), f.nar_key(&f.tree));
    let actual = sha256(&f.nar(&f.tree));
    assert_eq!(field(&info, "FileHash"), actual);

    // Only FileHash changed: good bytes, a narinfo that says otherwise.
    let claimed = sha256(b"some other file");
    f.server.set(&Fixture::narinfo_key(&f.tree), Reply::Bytes(edit(&info, "FileHash", Some(&claimed)).into_bytes()));
    let err = f.refused(&st, &f.server.url(), QUICK);
    f.tree_refused(&err, &nar_url, &format!("the file hashes to {actual}, the narinfo says {claimed} (FileHash)"));

    // Only FileSize changed (one byte more than there is).
    let size: u64 = field(&info, "FileSize").parse().unwrap();
    f.server.set(
        &Fixture::narinfo_key(&f.tree),
        Reply::Bytes(edit(&info, "FileSize", Some(&(size + 1).to_string())).into_bytes()),
    );
    let err = f.refused(&st, &f.server.url(), QUICK);
    f.tree_refused(&err, &nar_url, &format!("the file has {size} bytes, the narinfo says {} (FileSize)", size + 1));

    f.recovers(&st);
}

#[test]
fn a_body_cut_short_is_refused() {
    let f = Fixture::new();
    let st = f.client("");
    let nar = f.nar(&f.tree);
    let nar_url = format!("{}{}", f.server.url(), f.nar_key(&f.tree));
    let half = nar[..nar.len() / 2].to_vec();

    // Content-Length promises the whole file; half comes, then the connection closes.
    f.server.set(&f.nar_key(&f.tree), Reply::CutShort { body: half.clone(), claimed: nar.len() });
    // (The transport error is all there is to say: the NAR is cut in the middle of a file.)
    let err = f.refused(&st, &f.server.url(), QUICK);
    f.tree_refused(&err, &nar_url, "reading NAR: ");

    // A complete HTTP answer of half the file: the NAR ends too early.
    f.server.set(&f.nar_key(&f.tree), Reply::Bytes(half));
    let err = f.refused(&st, &f.server.url(), QUICK);
    f.tree_refused(&err, &nar_url, "malformed NAR: truncated");

    f.recovers(&st);
}

#[test]
fn a_narinfo_for_another_path_is_refused() {
    let f = Fixture::new();
    let st = f.client("");
    let url = f.server.url();

    // The tree's (validly signed) narinfo under the note's name.
    f.server.set(&Fixture::narinfo_key(&f.note), Reply::Bytes(f.narinfo(&f.tree).into_bytes()));
    let err = f.refused(&st, &url, QUICK);
    assert_eq!(err, format!("cairn: cannot substitute '{}': {url}: the narinfo is for '{}'\n", f.note, f.tree));
    // Nothing was downloaded on its word.
    assert_eq!(f.server.requests_for(&f.nar_key(&f.tree)), 0);

    // --json says the same.
    let out = st.run(&["substitute", "--json", "--from", &url, &f.note], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json_failures(&out.stdout), vec![(f.note.clone(), format!("{url}: the narinfo is for '{}'", f.tree))]);

    // The other way round: the note's narinfo under the tree's name, found as a reference.
    f.server.clear();
    f.server.set(&Fixture::narinfo_key(&f.tree), Reply::Bytes(f.narinfo(&f.note).into_bytes()));
    let err = f.refused(&st, &url, QUICK);
    f.tree_refused(&err, &url, &format!("the narinfo is for '{}'", f.note));

    f.recovers(&st);
}

#[test]
fn unsigned_and_foreign_signed_caches_are_refused() {
    let f = Fixture::new();
    let st = f.client("");

    // Written without a key.
    let unsigned_dir = f.dir.path().join("unsigned");
    f.copy_to(&unsigned_dir, None);
    let unsigned = Server::start(&unsigned_dir);
    assert!(!std::fs::read_to_string(unsigned_dir.join(&Fixture::narinfo_key(&f.note)[1..])).unwrap().contains("Sig:"));
    let err = f.refused(&st, &unsigned.url(), QUICK);
    assert_eq!(
        err,
        format!(
            "cairn: cannot substitute '{}': {}: it is not signed, and no content address proves it \
             (trusted-public-keys, require-sigs)\n",
            f.note,
            unsigned.url()
        )
    );

    // Signed by a key this daemon does not trust.
    let (sk, pk) = (f.dir.path().join("foreign.sk"), f.dir.path().join("foreign.pk"));
    f.seed.ok(&["key", "generate", "foreign-cache-1", s(&sk), s(&pk)]);
    let foreign_dir = f.dir.path().join("foreign");
    f.copy_to(&foreign_dir, Some(&sk));
    let foreign = Server::start(&foreign_dir);
    assert!(std::fs::read_to_string(foreign_dir.join(&Fixture::narinfo_key(&f.note)[1..]))
        .unwrap()
        .contains("Sig: foreign-cache-1:"));
    let err = f.refused(&st, &foreign.url(), QUICK);
    let start = format!("cairn: cannot substitute '{}': {}: ", f.note, foreign.url());
    assert!(err.starts_with(&start), "{err}");
    assert!(err.contains("no signature is by a trusted key (trusted-public-keys)"), "{err}");
    // Refused on the narinfo alone: no NAR fetched from either.
    for server in [&unsigned, &foreign] {
        assert!(!server.requested_any("/nar/"), "{:?}", server.log.requests.lock().unwrap());
    }

    // The same caches are fine otherwise: trusting the foreign key, or not requiring signatures,
    // the closure arrives from them.
    let trusting = TestStore::builder()
        .store_dir("/store")
        .config(&format!("trusted-public-keys = [\"{}\"]\n", std::fs::read_to_string(&pk).unwrap().trim()))
        .start();
    assert_eq!(trusting.ok(&["substitute", "--from", &foreign.url(), &f.note]), format!("{}\n", f.note));
    let lax = TestStore::builder().store_dir("/store").config("require-sigs = false\n").start();
    assert_eq!(lax.ok(&["substitute", "--from", &unsigned.url(), &f.note]), format!("{}\n", f.note));

    f.recovers(&st);
}

#[test]
fn a_nar_far_longer_than_its_nar_size_is_cut_off() {
    // A small NAR (restored in memory) and a large one (pipelined through threads).
    for size in [20_000, 3 << 20] {
        let f = Fixture::with_data(size);
        let st = f.client("");
        let nar = f.nar(&f.tree);
        let info = f.narinfo(&f.tree);
        let nar_url = format!("{}{}", f.server.url(), f.nar_key(&f.tree));
        let mut hung_up = 0;

        // The real NAR and 64 MiB of zeros, the whole length declared in Content-Length; the
        // narinfo (with FileSize) unchanged. (From the former cache_hostile.rs.)
        let mut long = nar.clone();
        long.extend(std::iter::repeat_n(0u8, 64 << 20));
        f.server.set(&f.nar_key(&f.tree), Reply::Bytes(long));
        let err = f.refused(&st, &f.server.url(), QUICK);
        assert!(err.contains("longer than the narinfo's FileSize"), "{err}");

        // The real NAR, then zeros without end; the narinfo (with FileSize) unchanged.
        f.server.set(&f.nar_key(&f.tree), Reply::Endless(nar.clone()));
        let err = f.refused(&st, &f.server.url(), QUICK);
        f.tree_refused(
            &err,
            &nar_url,
            &format!("the file is longer than the narinfo's FileSize ({} bytes)", nar.len()),
        );
        hung_up += 1;
        f.server.wait_hung_up(hung_up);

        // The same without FileSize and FileHash: cut one byte after NarSize.
        let bare = edit(&edit(&info, "FileSize", None), "FileHash", None);
        f.server.set(&Fixture::narinfo_key(&f.tree), Reply::Bytes(bare.into_bytes()));
        let err = f.refused(&st, &f.server.url(), QUICK);
        // (A large NAR is read ahead on a thread of its own, which may be the first to see
        // the extra bytes.)
        let read_ahead = "the file continues for more than 1048576 bytes after the NAR";
        let check = if size > 1 << 20 && err.contains(read_ahead) {
            read_ahead
        } else {
            "input continues after the end of the NAR"
        };
        f.tree_refused(&err, &nar_url, check);
        hung_up += 1;
        f.server.wait_hung_up(hung_up);
        // Neither read much of the endless bodies (socket buffers and a chunk or two).
        let sent = f.server.log.endless_sent.load(Ordering::SeqCst);
        assert!(sent < 64 << 20, "{sent} bytes of zeros were sent for a {}-byte NAR", nar.len());

        // A zstd bomb: 256 MiB of zeros after the NAR squeezed into a small file whose FileSize
        // and FileHash are right. Decompression must stop at NarSize.
        let bomb =
            zstd::stream::encode_all(std::io::Read::chain(&nar[..], std::io::repeat(0).take(256 << 20)), 3).unwrap();
        assert!(bomb.len() < nar.len() + (1 << 20), "{}", bomb.len());
        let bomb_info = edit(
            &edit(
                &edit(&edit(&info, "URL", Some("nar/bomb.nar.zst")), "Compression", Some("zstd")),
                "FileSize",
                Some(&bomb.len().to_string()),
            ),
            "FileHash",
            Some(&sha256(&bomb)),
        );
        f.server.set(&Fixture::narinfo_key(&f.tree), Reply::Bytes(bomb_info.into_bytes()));
        f.server.set("/nar/bomb.nar.zst", Reply::Bytes(bomb));
        let err = f.refused(&st, &f.server.url(), QUICK);
        f.tree_refused(
            &err,
            &format!("{}/nar/bomb.nar.zst", f.server.url()),
            "input continues after the end of the NAR",
        );

        f.recovers(&st);
    }
}

#[test]
fn a_stalled_download_fails_after_the_stall_timeout() {
    let f = Fixture::new();
    // connect-timeout is left at 10 s: what ends these is the stall timeout.
    let st = f.client("stalled-download-timeout = 2\n");
    let nar = f.nar(&f.tree);
    let nar_url = format!("{}{}", f.server.url(), f.nar_key(&f.tree));

    // Headers and 100 bytes of the NAR, then nothing.
    f.server.set(&f.nar_key(&f.tree), Reply::Stall(nar[..100].to_vec()));
    let started = Instant::now();
    let err = f.refused(&st, &f.server.url(), QUICK);
    assert!(started.elapsed() >= Duration::from_millis(1900), "gave up before the timeout: {err}");
    f.tree_refused(&err, &nar_url, "no data for 2 s (stalled-download-timeout)");
    f.server.wait_hung_up(1);

    // The tree's narinfo itself stalls halfway. (Not the note's: this daemon remembers that
    // one, which was good; a refused path's narinfo is forgotten and asked for again.)
    f.server.clear();
    let key = Fixture::narinfo_key(&f.tree);
    let info = f.narinfo(&f.tree);
    f.server.set(&key, Reply::Stall(info.as_bytes()[..20].to_vec()));
    let asked = f.server.requests_for(&key);
    let started = Instant::now();
    let err = f.refused(&st, &f.server.url(), QUICK);
    assert!(started.elapsed() >= Duration::from_millis(1900), "gave up before the timeout: {err}");
    assert_eq!(f.server.requests_for(&key), asked + 1);
    f.tree_refused(&err, &format!("{}{key}", f.server.url()), "no data for 2 s (stalled-download-timeout)");
    f.server.wait_hung_up(2);

    f.recovers(&st);
}

#[test]
fn a_server_that_never_answers_fails_within_the_timeouts() {
    let f = Fixture::new();
    let st = f.client("connect-timeout = 2\nstalled-download-timeout = 2\n");

    // nix-cache-info answered, the narinfo request accepted and never answered.
    f.server.set(&Fixture::narinfo_key(&f.note), Reply::Silent);
    let started = Instant::now();
    let err = f.refused(&st, &f.server.url(), QUICK);
    assert!(started.elapsed() >= Duration::from_millis(1900), "gave up before any timeout: {err}");
    let start = format!("cairn: cannot substitute '{}': {}{}", f.note, f.server.url(), Fixture::narinfo_key(&f.note));
    assert!(err.starts_with(&start), "expected '{start}…' in:\n{err}");
    assert!(err.contains("no answer within"), "{err}");
    f.server.wait_hung_up(1);

    // Nothing answered at all, not even nix-cache-info.
    let mute = Server::start(f.dir.path());
    mute.set("/nix-cache-info", Reply::Silent);
    let started = Instant::now();
    let err = f.refused(&st, &mute.url(), QUICK);
    assert!(started.elapsed() >= Duration::from_millis(1900), "gave up before any timeout: {err}");
    assert!(err.starts_with(&format!("cairn: cannot substitute '{}': ", f.note)), "{err}");
    assert!(err.contains(&format!("{}/nix-cache-info", mute.url())) && err.contains("no answer within"), "{err}");
    mute.wait_hung_up(1);

    f.recovers(&st);
}

/// A Nix store over SSH whose program never greets is given up on within the timeouts
/// (`connect-timeout` + `stalled-download-timeout`), its program ended, and the daemon goes on.
#[test]
fn a_remote_store_that_never_answers_is_given_up_on_and_its_program_ended() {
    let f = Fixture::new();
    let st = f.client("connect-timeout = 1\nstalled-download-timeout = 2\n");
    let script = f.dir.path().join("mute-store");
    cairn_tests::write_exec(&script, b"#!/bin/sh\nexec sleep 5917\n");
    let url = format!("ssh://localhost?remote-program={}&trusted=1", script.display());
    let started = Instant::now();
    let err = f.refused(&st, &url, QUICK);
    assert!(started.elapsed() >= Duration::from_millis(2900), "gave up before the timeouts: {err}");
    assert!(err.contains("'ssh://localhost' did not answer within 3 s"), "{err}");
    let ended = || {
        let gone = Instant::now();
        while !cairn_tests::processes(&["sleep", "5917"]).is_empty() {
            assert!(gone.elapsed() < Duration::from_secs(5), "the remote program was left running");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    ended();
    f.recovers(&st);
    // Configured, it is given up on once, then not asked again for a while: a closure's lookups
    // do not each wait for it.
    let configured =
        f.client(&format!("connect-timeout = 1\nstalled-download-timeout = 2\nsubstituters = [\"{url}\"]\n"));
    let err = configured.fail(&["substitute", &f.note], b"");
    assert!(err.contains("did not answer within 3 s"), "{err}");
    let started = Instant::now();
    let err = configured.fail(&["substitute", &f.note], b"");
    assert!(started.elapsed() < Duration::from_secs(2), "asked again: {err}");
    assert!(err.contains("did not answer a moment ago"), "{err}");
    ended();
}

#[test]
fn garbage_and_server_errors_fall_through_to_the_next_cache() {
    let f = Fixture::new();
    let bad = Server::start(&f.cache);
    let garbage = Rng::new(9).bytes(3000);
    let (note_key, tree_key) = (Fixture::narinfo_key(&f.note), Fixture::narinfo_key(&f.tree));

    // Alone, each lie is an error naming the narinfo's URL.
    let st = f.client("");
    bad.set(&note_key, Reply::Bytes(garbage.clone()));
    let err = f.refused(&st, &bad.url(), QUICK);
    assert!(
        err.starts_with(&format!("cairn: cannot substitute '{}': {}{note_key}: narinfo ", f.note, bad.url())),
        "{err}"
    );
    bad.set(&note_key, Reply::Status(500));
    let err = f.refused(&st, &bad.url(), QUICK);
    assert_eq!(
        err,
        format!(
            "cairn: cannot substitute '{}': {}{note_key}: the server answered 500 Internal Server Error\n",
            f.note,
            bad.url()
        )
    );
    drop(st);

    // Both configured, the bad one first by priority (listed second, so that the order comes
    // from the priorities): every path falls through to the good one.
    bad.set(&note_key, Reply::Bytes(garbage));
    bad.set(&tree_key, Reply::Status(500));
    let before = (bad.requests_for(&note_key), bad.requests_for(&tree_key));
    let st = f.client(&format!("substituters = [\"{}?priority=60\", \"{}?priority=10\"]\n", f.server.url(), bad.url()));
    let out = st.ok(&["substitute", "--json", &f.note]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["failed"], serde_json::json!([]), "{v}");
    let mut added: Vec<&str> = v["added"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    added.sort();
    let mut want = vec![f.tree.as_str(), f.note.as_str()];
    want.sort();
    assert_eq!(added, want);
    assert_eq!(v["paths"][0]["path"], f.note.as_str(), "{v}");
    // The bad cache was asked first for both, and nothing of it was used.
    assert_eq!((bad.requests_for(&note_key), bad.requests_for(&tree_key)), (before.0 + 1, before.1 + 1));
    assert!(!bad.requested_any("/nar/"));
    assert_eq!(f.server.requests_for(&f.nar_key(&f.tree)), 1);
    assert_eq!(f.server.requests_for(&f.nar_key(&f.note)), 1);
    st.ok(&["verify", "--check-contents"]);
    assert_eq!(st.store_entries().len(), 2);
}

#[test]
fn a_path_pushed_after_a_miss_is_found_once_the_negative_ttl_expires() {
    let f = Fixture::new();
    // A cache that has something else only.
    let later = f.dir.path().join("later");
    write(&f.dir.path().join("other.txt"), b"something else\n");
    let other = line(&f.seed.ok(&["add-text", "other", s(&f.dir.path().join("other.txt"))]));
    f.seed.ok(&["copy", "--to", &format!("file://{}?compression=none", later.display()), &other]);
    // Two servers on it, one per daemon: one forgets misses after 1 s, the other after 60 s.
    let (quick_server, slow_server) = (Server::start(&later), Server::start(&later));
    let quick = f.client(&format!("substituters = [\"{}\"]\nnarinfo-cache-negative-ttl = 1\n", quick_server.url()));
    let slow = f.client(&format!("substituters = [\"{}\"]\n", slow_server.url()));
    let key = Fixture::narinfo_key(&f.note);
    for st in [&quick, &slow] {
        let err = st.fail(&["substitute", &f.note], b"");
        assert_eq!(err, format!("cairn: cannot substitute '{}': no substituter has it\n", f.note));
        assert_eq!(st.store_entries(), Vec::<String>::new());
    }
    assert_eq!((quick_server.requests_for(&key), slow_server.requests_for(&key)), (1, 1));

    // Pushed meanwhile.
    f.seed.ok(&[
        "copy",
        "--to",
        &format!("file://{}?compression=none", later.display()),
        "--secret-key-file",
        s(&f.sk),
        &f.note,
    ]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(quick.ok(&["substitute", &f.note]), format!("{}\n", f.note));
    assert_eq!(quick.store_entries().len(), 2);
    quick.ok(&["verify", "--check-contents"]);
    // The other daemon still believes its remembered miss, without asking again.
    let err = slow.fail(&["substitute", &f.note], b"");
    assert_eq!(err, format!("cairn: cannot substitute '{}': no substituter has it\n", f.note));
    assert_eq!((quick_server.requests_for(&key), slow_server.requests_for(&key)), (2, 1));
    assert_eq!(slow.store_entries(), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// From the former `cache_hostile.rs` (its other cases are in the tests above; see the commit).

#[test]
fn lies_about_identity_and_trust_are_refused() {
    let f = Fixture::new();
    let st = f.impatient_client("");
    // A narinfo for another path under this path's name.
    f.server.set(&Fixture::narinfo_key(&f.note), Reply::Bytes(f.narinfo(&f.tree).into_bytes()));
    f.refused_naming(&st, "the narinfo is for");
    // Unsigned: the signature lines dropped.
    f.server.clear();
    let unsigned: String =
        f.narinfo(&f.note).lines().filter(|l| !l.starts_with("Sig:")).map(|l| format!("{l}\n")).collect();
    f.server.set(&Fixture::narinfo_key(&f.note), Reply::Bytes(unsigned.into_bytes()));
    f.refused_naming(&st, "not signed");
    // Signed, but by a key this daemon does not trust.
    f.server.clear();
    let stranger = TestStore::builder()
        .config("trusted-public-keys = [\"someone-1:up1w+p9hbiFiyds3XlVGeZ3VPMC2rkO4TNTtYkEN+Qo=\"]")
        .start();
    stranger.fail(&["substitute", "--from", &f.server.url(), &f.note], b"");
    f.refused_naming(&stranger, "no signature is by a trusted key");
    // A NAR URL outside the cache.
    let escaping = edit(&f.narinfo(&f.note), "URL", Some("../../etc/passwd"));
    f.server.set(&Fixture::narinfo_key(&f.note), Reply::Bytes(escaping.into_bytes()));
    f.refused_naming(&st, "leaves the cache");
    // Garbage.
    f.server.set(&Fixture::narinfo_key(&f.note), Reply::Bytes(b"\x00\xffnot a narinfo at all\n\n".to_vec()));
    f.refused_naming(&st, &f.server.url());
}

#[test]
fn a_failing_cache_falls_through_to_the_next_by_priority() {
    let f = Fixture::new();
    // The priority comes from the bad cache's nix-cache-info, the good one's from its URL.
    let bad = Server::start(f.dir.path());
    bad.set("/nix-cache-info", Reply::Bytes(b"StoreDir: /store\nPriority: 10\n".to_vec()));
    bad.set(&Fixture::narinfo_key(&f.note), Reply::Status(500));
    bad.set(&Fixture::narinfo_key(&f.tree), Reply::Bytes(b"garbage".to_vec()));
    let good = f.server.url();
    let st = f.impatient_client(&format!("substituters = [\"{}\", \"{good}?priority=20\"]", bad.url()));
    assert_eq!(st.ok(&["substitute", &f.note]), format!("{}\n", f.note));
    let v: Value = serde_json::from_str(&st.ok(&["path-info", "--json", "--closure", &f.note])).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
}

#[test]
fn large_compressed_nars_are_checked_as_they_stream() {
    // Over 1 MiB: decompressed on a thread of its own, hashed on others.
    let f = Fixture::with(3 << 20, "zstd");
    let st = f.impatient_client("");
    let nar_url = f.nar_key(&f.tree);
    assert!(nar_url.ends_with(".nar.zst"), "{nar_url}");
    let file = f.server.read(&nar_url[1..]);
    let info = f.narinfo(&f.tree);
    // Compressed bytes changed in the middle, FileHash made to match.
    let mut bad = file.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 64] {
        *b ^= 0x55;
    }
    f.server.set(&nar_url, Reply::Bytes(bad.clone()));
    f.server
        .set(&Fixture::narinfo_key(&f.tree), Reply::Bytes(edit(&info, "FileHash", Some(&sha256(&bad))).into_bytes()));
    f.refused_naming(&st, &f.tree);
    // Cut short.
    f.server.clear();
    f.server.set(&nar_url, Reply::CutShort { body: file[..file.len() - 1000].to_vec(), claimed: file.len() });
    f.refused_naming(&st, &f.tree);
    // Good bytes, wrong FileHash: caught after the NAR, before anything is registered.
    f.server.set(&nar_url, Reply::File);
    f.server
        .set(&Fixture::narinfo_key(&f.tree), Reply::Bytes(edit(&info, "FileHash", Some(&sha256(b"x"))).into_bytes()));
    f.refused_naming(&st, "(FileHash)");
    // And the truth arrives intact.
    f.server.clear();
    assert_eq!(st.ok(&["substitute", "--from", &f.server.url(), &f.note]), format!("{}\n", f.note));
    st.ok(&["verify", "--check-contents"]);
}

#[test]
fn a_negative_answer_is_forgotten_after_its_ttl() {
    let f = Fixture::new();
    // A miss from `--from` (not a configured substituter) is remembered too.
    let st = f.impatient_client("narinfo-cache-negative-ttl = 3");
    f.server.set(&Fixture::narinfo_key(&f.note), Reply::Status(404));
    let err = st.fail(&["substitute", "--from", &f.server.url(), &f.note], b"");
    assert!(err.contains("no substituter has it"), "{err}");
    // Pushed meanwhile: the remembered answer hides it until the TTL runs out, no longer.
    f.server.clear();
    let pushed = Instant::now();
    let err = st.fail(&["substitute", "--from", &f.server.url(), &f.note], b"");
    assert!(err.contains("no substituter has it"), "{err}");
    assert!(pushed.elapsed() < Duration::from_secs(2), "the check came too late to mean anything");
    std::thread::sleep(Duration::from_millis(3200));
    assert_eq!(st.ok(&["substitute", "--from", &f.server.url(), &f.note]), format!("{}\n", f.note));
}

/// A cache of another store directory (`?store=` in its URL) serves a fixed output only by its
/// content address: under the path that address gives there, with a narinfo that says that
/// address and no references, and bytes that prove it. Whatever else it says is refused, and
/// the derivation (which cannot build) fails; the truth is then taken.
#[test]
fn a_cache_of_another_store_directory_serves_a_fixed_output_only_as_its_content_address_proves() {
    let dir = tempfile::tempdir().unwrap();
    let contents = b"a fixed output kept under another store directory\n";
    write(&dir.path().join("fetched"), contents);
    let seed = TestStore::builder().store_dir("/fnord/store").start();
    let there = line(&seed.ok(&["add", "--flat", s(&dir.path().join("fetched"))]));
    let cache = dir.path().join("cache");
    seed.ok(&["copy", "--to", &format!("file://{}?compression=none", cache.display()), &there]);
    let narinfo_file = cache.join(format!("{}.narinfo", &there["/fnord/store/".len()..][..32]));
    let good = std::fs::read_to_string(&narinfo_file).unwrap();
    assert!(good.contains("\nCA: fixed:sha256:"), "{good}");

    let url = format!("file://{}?store=/fnord/store", cache.display());
    let client = TestStore::builder().store_dir("/store").config(&format!("substituters = [\"{url}\"]\n")).start();
    let hash =
        cairn_nix::Hash::digest(cairn_nix::HashAlgo::Sha256, contents).to_prefixed(cairn_nix::hash::Encoding::Base16);
    let hex = hash.trim_start_matches("sha256:");
    let drv_json = serde_json::json!({
        "outputs": { "out": { "path": "", "hashAlgo": "sha256", "hash": hex } },
        "inputSrcs": [], "inputDrvs": {}, "system": "x86_64-linux", "builder": "/bin/sh",
        "args": ["-c", "exit 1"],
        "env": { "name": "fetched", "builder": "/bin/sh", "system": "x86_64-linux", "out": "" },
    });
    let f = dir.path().join("drv.json");
    std::fs::write(&f, drv_json.to_string()).unwrap();
    let drv = line(&client.ok(&["derivation", "add", s(&f)]));
    let out = line(&client.ok(&["derivation", "output-paths", &drv]));
    let valid = |p: &str| client.run(&["path-info", p], b"").status.success();

    // A NAR of other bytes, its hash and size told truly in the narinfo: only the content
    // address catches it.
    write(&dir.path().join("other"), b"other bytes\n");
    let other = line(&seed.ok(&["add", "--flat", s(&dir.path().join("other"))]));
    let other_info = seed.ok(&["path-info", "--json", &other]);
    let v: Value = serde_json::from_str(&other_info).unwrap();
    let other_nar = seed.ok_bytes(&["nar", "dump", &other], b"");
    std::fs::write(cache.join("nar/other.nar"), &other_nar).unwrap();
    let lying_nar = edit(
        &edit(
            &edit(&edit(&good, "URL", Some("nar/other.nar")), "NarHash", v[0]["narHash"].as_str()),
            "NarSize",
            Some(&other_nar.len().to_string()),
        ),
        "FileSize",
        Some(&other_nar.len().to_string()),
    );
    let lying_nar = if lying_nar.contains("\nFileHash: ") { edit(&lying_nar, "FileHash", None) } else { lying_nar };
    for lie in [
        edit(&good, "CA", None),
        edit(&good, "CA", Some(&format!("fixed:r:{hash}"))),
        format!("{good}References: {}\n", &other["/fnord/store/".len()..]),
        lying_nar,
    ] {
        std::fs::write(&narinfo_file, &lie).unwrap();
        let run = client.run(&["realise", &drv], b"");
        assert!(!run.status.success(), "{lie}\n{}", client.log());
        // Said before the build that replaces it.
        let said = String::from_utf8_lossy(&run.stderr);
        assert!(said.contains(&format!("cairn: cannot substitute '{out}' (")), "{lie}\n{said}");
        assert!(!valid(&out), "{lie}");
    }
    std::fs::write(&narinfo_file, &good).unwrap();
    assert_eq!(line(&client.ok(&["realise", &drv])), out);
    assert_eq!(client.ok_bytes(&["cat", &out], b""), contents);
    let info: Value = serde_json::from_str(&client.ok(&["path-info", "--json", &out])).unwrap();
    assert_eq!(
        info[0]["ca"].as_str(),
        Some(format!("fixed:{}", field(&good, "CA").trim_start_matches("fixed:")).as_str())
    );
    assert!(info[0]["signatures"].as_array().is_none_or(|a| a.is_empty()), "{info}");
    client.ok(&["verify", "--check-contents"]);
}
