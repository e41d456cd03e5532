//! Hostile binary caches, served by a small HTTP server in this file: every lie a cache can tell
//! is refused with a one-line error naming the check, nothing of the path is registered or left
//! in the store, no download hangs past the configured timeouts, and the daemon goes on serving.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_e2e::{line, write, TestStore};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// What the server does for one request path.
#[derive(Clone)]
enum Answer {
    /// The file under the served directory (404 if absent).
    File,
    Bytes(Vec<u8>),
    Status(u16),
    /// Claims `len` bytes, sends `body`, closes.
    Truncated {
        body: Vec<u8>,
        len: usize,
    },
    /// Sends the headers and `body`, then nothing for a minute.
    Stall(Vec<u8>),
    /// Accepts and never answers.
    Silent,
}

struct Server {
    port: u16,
    dir: PathBuf,
    rules: Arc<Mutex<HashMap<String, Answer>>>,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let rules: Arc<Mutex<HashMap<String, Answer>>> = Arc::default();
        let (r, d) = (rules.clone(), dir.to_owned());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (r, d) = (r.clone(), d.clone());
                std::thread::spawn(move || serve(conn, &d, &r));
            }
        });
        Server { port, dir: dir.to_owned(), rules }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn rule(&self, path: &str, a: Answer) {
        self.rules.lock().unwrap().insert(path.to_owned(), a);
    }

    fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(rel)).unwrap()
    }
}

fn serve(conn: TcpStream, dir: &Path, rules: &Mutex<HashMap<String, Answer>>) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut first = String::new();
    if r.read_line(&mut first).is_err() {
        return;
    }
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
            break;
        }
    }
    let target = first.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let answer = rules.lock().unwrap().get(&target).cloned().unwrap_or(Answer::File);
    let mut c = conn;
    let head =
        |status: u16, len: usize| format!("HTTP/1.1 {status} X\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
    let _ = match answer {
        Answer::File => match std::fs::read(dir.join(target.trim_start_matches('/'))) {
            Ok(b) => c.write_all(head(200, b.len()).as_bytes()).and_then(|_| c.write_all(&b)),
            Err(_) => c.write_all(head(404, 0).as_bytes()),
        },
        Answer::Bytes(b) => c.write_all(head(200, b.len()).as_bytes()).and_then(|_| c.write_all(&b)),
        Answer::Status(st) => c.write_all(head(st, 0).as_bytes()),
        Answer::Truncated { body, len } => c.write_all(head(200, len).as_bytes()).and_then(|_| c.write_all(&body)),
        Answer::Stall(b) => {
            let _ = c.write_all(head(200, b.len() + 1_000_000).as_bytes()).and_then(|_| c.write_all(&b));
            std::thread::sleep(Duration::from_secs(60));
            Ok(())
        }
        Answer::Silent => {
            std::thread::sleep(Duration::from_secs(60));
            Ok(())
        }
    };
}

/// A closure without content addresses (tree ← note), signed, in an uncompressed cache.
struct Fixture {
    dir: tempfile::TempDir,
    seed: TestStore,
    tree: String,
    top: String,
    public: String,
    server: Server,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(20_000, "none")
    }

    /// `size` bytes of data in the tree; the cache's NARs compressed with `compression`.
    fn with(size: usize, compression: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let scratch = TestStore::start();
        let data: Vec<u8> = (0..size as u64).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        write(&dir.path().join("tree/data"), &data);
        write(&dir.path().join("tree/bin/run"), b"#!/bin/sh\n");
        let tree = line(&scratch.ok(&["add", s(&dir.path().join("tree"))]));
        write(&dir.path().join("note"), format!("uses {tree}\n").as_bytes());
        let top = line(&scratch.ok(&["add-text", "note", s(&dir.path().join("note")), "--ref", &tree]));
        let seed = TestStore::start();
        seed.ok_bytes(&["import"], &scratch.ok_bytes(&["export", &tree, &top], b""));
        let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
        seed.ok(&["key", "generate", "hostile-test-1", s(&sk), s(&pk)]);
        let cache = dir.path().join("cache");
        seed.ok(&[
            "copy",
            "--to",
            &format!("file://{}?compression={compression}", cache.display()),
            "--secret-key-file",
            s(&sk),
            &top,
        ]);
        let public = std::fs::read_to_string(&pk).unwrap().trim().to_owned();
        let server = Server::start(&cache);
        Fixture { dir, seed, tree, top, public, server }
    }

    fn narinfo_key(path: &str) -> String {
        format!("/{}.narinfo", &path[7..39])
    }

    fn narinfo(&self, path: &str) -> String {
        String::from_utf8(self.server.read(&Self::narinfo_key(path)[1..])).unwrap()
    }

    fn nar_url(&self, path: &str) -> String {
        format!("/{}", self.narinfo(path).lines().find_map(|l| l.strip_prefix("URL: ")).unwrap())
    }

    /// A daemon substituting from the server, trusting the fixture's key.
    fn client(&self, extra: &str) -> TestStore {
        TestStore::builder()
            .config(&format!(
                "trusted-public-keys = [\"{}\"]\nconnect-timeout = 2\nstalled-download-timeout = 2\n{extra}",
                self.public
            ))
            .start()
    }

    /// Substitutes `top` from the server: must fail, naming `expect`, leaving nothing.
    fn refused(&self, st: &TestStore, expect: &str) {
        let started = Instant::now();
        let err = st.fail(&["substitute", "--from", &self.server.url(), &self.top], b"");
        assert!(started.elapsed() < Duration::from_secs(15), "took {:?}: {err}", started.elapsed());
        assert!(err.contains(expect), "expected '{expect}' in: {err}");
        let left: Vec<String> = st.store_entries().into_iter().filter(|e| !e.ends_with("-alive")).collect();
        assert!(left.is_empty(), "left in the store: {left:?}");
        // The daemon still serves.
        write(&self.dir.path().join("alive"), b"alive\n");
        st.ok(&["add", s(&self.dir.path().join("alive"))]);
        let _ = std::fs::remove_file(self.dir.path().join("alive"));
    }
}

fn replace_line(narinfo: &str, key: &str, value: &str) -> String {
    narinfo
        .lines()
        .map(|l| if l.starts_with(&format!("{key}: ")) { format!("{key}: {value}") } else { l.to_owned() })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn sha256_nix32(data: &[u8]) -> String {
    cairn_nix::Hash::digest(cairn_nix::HashAlgo::Sha256, data).to_prefixed(cairn_nix::hash::Encoding::Nix32)
}

#[test]
fn lies_about_contents_are_refused() {
    let f = Fixture::new();
    let st = f.client("");
    let nar_url = f.nar_url(&f.tree);
    let nar = f.server.read(&nar_url[1..]);
    let info = f.narinfo(&f.tree);

    // The NAR's bytes changed, FileHash made to match: only the NAR hash can tell.
    let mut bad = nar.clone();
    let at = bad.len() - 200;
    bad[at] ^= 1;
    f.server.rule(&nar_url, Answer::Bytes(bad.clone()));
    f.server.rule(
        &Fixture::narinfo_key(&f.tree),
        Answer::Bytes(replace_line(&info, "FileHash", &sha256_nix32(&bad)).into_bytes()),
    );
    f.refused(&st, "NAR hash mismatch");

    // Only FileHash wrong.
    f.server.clear();
    f.server.rule(
        &Fixture::narinfo_key(&f.tree),
        Answer::Bytes(replace_line(&info, "FileHash", &sha256_nix32(b"other")).into_bytes()),
    );
    f.refused(&st, "(FileHash)");

    // A truncated body.
    f.server.clear();
    f.server.rule(&nar_url, Answer::Truncated { body: nar[..nar.len() / 2].to_vec(), len: nar.len() });
    f.refused(&st, &f.tree);

    // A NAR far longer than NarSize: with FileSize, cut there; without, cut at NarSize.
    f.server.clear();
    let mut long = nar.clone();
    long.extend(std::iter::repeat_n(0u8, 64 << 20));
    f.server.rule(&nar_url, Answer::Bytes(long.clone()));
    f.refused(&st, "longer than the narinfo's FileSize");
    let no_file_fields: String = info.lines().filter(|l| !l.starts_with("File")).map(|l| format!("{l}\n")).collect();
    f.server.rule(&Fixture::narinfo_key(&f.tree), Answer::Bytes(no_file_fields.into_bytes()));
    f.refused(&st, "after the end of the NAR");

    // Nothing of it anywhere, and the good cache still works.
    f.server.clear();
    assert_eq!(st.ok(&["substitute", "--from", &f.server.url(), &f.top]), format!("{}\n", f.top));
    st.ok(&["verify", "--check-contents"]);
}

#[test]
fn lies_about_identity_and_trust_are_refused() {
    let f = Fixture::new();
    let st = f.client("");
    // A narinfo for another path under this path's name.
    f.server.rule(&Fixture::narinfo_key(&f.top), Answer::Bytes(f.narinfo(&f.tree).into_bytes()));
    f.refused(&st, "the narinfo is for");
    // Unsigned: the signature lines dropped.
    f.server.clear();
    let unsigned: String =
        f.narinfo(&f.top).lines().filter(|l| !l.starts_with("Sig:")).map(|l| format!("{l}\n")).collect();
    f.server.rule(&Fixture::narinfo_key(&f.top), Answer::Bytes(unsigned.into_bytes()));
    f.refused(&st, "not signed");
    // Signed, but by a key this daemon does not trust.
    f.server.clear();
    let stranger = TestStore::builder()
        .config("trusted-public-keys = [\"someone-1:up1w+p9hbiFiyds3XlVGeZ3VPMC2rkO4TNTtYkEN+Qo=\"]")
        .start();
    stranger.fail(&["substitute", "--from", &f.server.url(), &f.top], b"");
    f.refused(&stranger, "no signature is by a trusted key");
    // A NAR URL outside the cache.
    let escaping = replace_line(&f.narinfo(&f.top), "URL", "../../etc/passwd");
    f.server.rule(&Fixture::narinfo_key(&f.top), Answer::Bytes(escaping.into_bytes()));
    f.refused(&st, "leaves the cache");
    // Garbage.
    f.server.rule(&Fixture::narinfo_key(&f.top), Answer::Bytes(b"\x00\xffnot a narinfo at all\n\n".to_vec()));
    f.refused(&st, &f.server.url());
    drop(f.seed);
}

#[test]
fn slow_and_silent_servers_time_out() {
    let f = Fixture::new();
    let st = f.client("");
    // Headers and a little of the NAR, then nothing.
    let nar_url = f.nar_url(&f.tree);
    let nar = f.server.read(&nar_url[1..]);
    f.server.rule(&nar_url, Answer::Stall(nar[..100].to_vec()));
    f.refused(&st, "stalled-download-timeout");
    // A narinfo request never answered (a new daemon: the first remembers the good narinfo).
    f.server.clear();
    f.server.rule(&Fixture::narinfo_key(&f.top), Answer::Silent);
    f.refused(&f.client(""), "no answer within");
}

#[test]
fn a_failing_cache_falls_through_to_the_next_by_priority() {
    let f = Fixture::new();
    let bad = Server::start(f.dir.path());
    bad.rule("/nix-cache-info", Answer::Bytes(b"StoreDir: /store\nPriority: 10\n".to_vec()));
    bad.rule(&Fixture::narinfo_key(&f.top), Answer::Status(500));
    bad.rule(&Fixture::narinfo_key(&f.tree), Answer::Bytes(b"garbage".to_vec()));
    let good = f.server.url();
    let st = f.client(&format!("substituters = [\"{}\", \"{good}?priority=20\"]", bad.url()));
    assert_eq!(st.ok(&["substitute", &f.top]), format!("{}\n", f.top));
    let v: serde_json::Value = serde_json::from_str(&st.ok(&["path-info", "--json", "--closure", &f.top])).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
}

#[test]
fn a_negative_answer_is_forgotten_after_its_ttl() {
    let f = Fixture::new();
    let st = f.client("narinfo-cache-negative-ttl = 3");
    f.server.rule(&Fixture::narinfo_key(&f.top), Answer::Status(404));
    let err = st.fail(&["substitute", "--from", &f.server.url(), &f.top], b"");
    assert!(err.contains("no substituter has it"), "{err}");
    // Pushed meanwhile: the remembered answer hides it until the TTL runs out, no longer.
    f.server.clear();
    let pushed = Instant::now();
    let err = st.fail(&["substitute", "--from", &f.server.url(), &f.top], b"");
    assert!(err.contains("no substituter has it"), "{err}");
    assert!(pushed.elapsed() < Duration::from_secs(2), "the check came too late to mean anything");
    std::thread::sleep(Duration::from_millis(3200));
    assert_eq!(st.ok(&["substitute", "--from", &f.server.url(), &f.top]), format!("{}\n", f.top));
}

#[test]
fn large_compressed_nars_are_checked_as_they_stream() {
    // Over 1 MiB: decompressed on a thread of its own, hashed on others.
    let f = Fixture::with(3 << 20, "zstd");
    let st = f.client("");
    let nar_url = f.nar_url(&f.tree);
    assert!(nar_url.ends_with(".nar.zst"), "{nar_url}");
    let file = f.server.read(&nar_url[1..]);
    let info = f.narinfo(&f.tree);
    // Compressed bytes changed in the middle, FileHash made to match.
    let mut bad = file.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 64] {
        *b ^= 0x55;
    }
    f.server.rule(&nar_url, Answer::Bytes(bad.clone()));
    f.server.rule(
        &Fixture::narinfo_key(&f.tree),
        Answer::Bytes(replace_line(&info, "FileHash", &sha256_nix32(&bad)).into_bytes()),
    );
    f.refused(&st, &f.tree);
    // Cut short.
    f.server.clear();
    f.server.rule(&nar_url, Answer::Truncated { body: file[..file.len() - 1000].to_vec(), len: file.len() });
    f.refused(&st, &f.tree);
    // Good bytes, wrong FileHash: caught after the NAR, before anything is registered.
    f.server.rule(&nar_url, Answer::File);
    f.server.rule(
        &Fixture::narinfo_key(&f.tree),
        Answer::Bytes(replace_line(&info, "FileHash", &sha256_nix32(b"x")).into_bytes()),
    );
    f.refused(&st, "(FileHash)");
    // And the truth arrives intact.
    f.server.clear();
    assert_eq!(st.ok(&["substitute", "--from", &f.server.url(), &f.top]), format!("{}\n", f.top));
    st.ok(&["verify", "--check-contents"]);
}
