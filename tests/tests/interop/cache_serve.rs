//! cairnd's `listen` address as a Nix binary cache, seen from the outside: real Nix 2.8 copies
//! closures from it (and reads it as a store of its own), another cairnd substitutes from it,
//! the protocol holds up byte for byte over raw sockets (narinfos, zstd and plain NARs, ranges,
//! HEAD, concurrent and abandoned downloads), nothing but valid store paths is reachable; and
//! `cairn copy --to unix://` moves closures between daemons, sending only what the other lacks.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use cairn_nix::hash::{Encoding, Hash, HashAlgo};
use cairn_nix::signing::PublicKey;
use cairn_tests::{
    bin_dir, free_port, line, path_info_fields as metadata, path_info_summary as infos, require_peer, wait_listening,
    write, NixStore, Rng, TestStore,
};
use serde_json::Value;

use cairn_tests::utf8 as s;

/// The name of the key every serving daemon here signs with.
const KEY_NAME: &str = "cairn-serving-e2e-1";

// ---------------------------------------------------------------------------------------------
// Raw HTTP

struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    /// A response header's value (names are case-insensitive).
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), read to the end.
fn http(port: u16, method: &str, target: &str, extra: &str) -> Reply {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(c, "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{extra}\r\n").unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no header block for {target}"));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut reply = Reply { status, head, body: raw[end + 4..].to_vec() };
    if reply.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        reply.body = dechunk(&reply.body);
    }
    if let Some(len) = reply.header("content-length") {
        if method != "HEAD" {
            assert_eq!(reply.body.len(), len.parse::<usize>().unwrap(), "Content-Length of {target}");
        }
    }
    reply
}

fn get(port: u16, target: &str) -> Reply {
    http(port, "GET", target, "")
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size = std::str::from_utf8(&b[..nl]).unwrap();
        let n = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + n]);
        b = &b[nl + 2 + n + 2..];
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A serving daemon: store `store_dir`, `listen` on a free loopback port, signing with a fresh
/// key (when `signed`).
struct Served {
    st: TestStore,
    port: u16,
    url: String,
    /// The public key, `name:base64`.
    public: String,
    _keys: tempfile::TempDir,
}

fn serving(store_dir: &str, signed: bool, extra_config: &str) -> Served {
    let keys = tempfile::tempdir().unwrap();
    let (sk, pk) = (keys.path().join("sk"), keys.path().join("pk"));
    let port = free_port();
    let mut config = format!("listen = \"127.0.0.1:{port}\"\n{extra_config}\n");
    if signed {
        config.push_str(&format!("secret-key-files = [\"{}\"]\n", s(&sk)));
    }
    let out = std::process::Command::new(bin_dir().join("cairn"))
        .args(["key", "generate", KEY_NAME, s(&sk), s(&pk)])
        .output()
        .unwrap();
    assert!(out.status.success(), "key generate: {}", String::from_utf8_lossy(&out.stderr));
    let public = std::fs::read_to_string(&pk).unwrap().trim().to_owned();
    let st = TestStore::builder().store_dir(store_dir).config(&config).start();
    wait_listening(port);
    Served { st, port, url: format!("http://127.0.0.1:{port}"), public, _keys: keys }
}

/// A tree with an executable, a symlink, an empty file and `data_len` bytes of random data.
fn make_tree(dir: &Path, seed: u64, data_len: usize) -> std::path::PathBuf {
    let t = dir.join(format!("tree-{seed}"));
    cairn_tests::write_exec(&t.join("bin/tool"), format!("#!/bin/sh\necho tool {seed}\n").as_bytes());
    write(&t.join("share/data"), &Rng::new(seed).bytes(data_len));
    write(&t.join("share/empty"), b"");
    std::os::unix::fs::symlink("../bin/tool", t.join("share/link")).unwrap();
    t
}

/// Input-addressed paths (no content address, so only a signature vouches for them): a tree
/// and a text referring to it, made in a scratch store and imported into `st`.
fn import_input_addressed(st: &TestStore, dir: &Path, seed: u64) -> (String, String) {
    let scratch = TestStore::builder().store_dir(&st.store_dir).start();
    let t = line(&scratch.ok(&["add", s(&make_tree(dir, seed, 50_000))]));
    write(&dir.join(format!("ia-{seed}")), format!("input-addressed, uses {t}\n").as_bytes());
    let n = line(&scratch.ok(&["add-text", &format!("ia-{seed}"), s(&dir.join(format!("ia-{seed}"))), "--ref", &t]));
    let imported = st.ok_bytes(&["import"], &scratch.ok_bytes(&["export", &t, &n], b""));
    assert_eq!(String::from_utf8(imported).unwrap(), format!("{t}\n{n}\n"));
    (t, n)
}

const COPIED_FIELDS: &[&str] = &["narHash", "narSize", "references", "ca", "deriver"];

fn hash_part(p: &str) -> &str {
    let base = p.rsplit('/').next().unwrap();
    &base[..32]
}

/// Nix settings for building in a private store: the host's shell and tools in the sandbox.
const BUILD_CONFIG: &str = "substituters =\nexperimental-features = nix-command\nsandbox = false\n\
    build-users-group =\nextra-sandbox-paths = /bin /lib /lib64 /usr\n";

/// Two derivation outputs built by real Nix (input-addressed, with derivers): a directory with
/// an executable and a symlink that refers to a file output.
const DERIVATIONS: &str = r#"
let
  dep = derivation {
    name = "serving-dep"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo a dependency > $out" ];
  };
in derivation {
  name = "serving-top"; system = builtins.currentSystem; builder = "/bin/sh"; inherit dep;
  args = [ "-c" "/bin/mkdir -p $out/bin && echo $dep > $out/dep && printf '#!/bin/sh\\necho hi\\n' > $out/bin/hi && /bin/chmod +x $out/bin/hi && /bin/ln -s bin/hi $out/hi" ];
}
"#;

// ---------------------------------------------------------------------------------------------
// Nix 2.8 against the listener

#[test]
fn nix_copies_closures_from_cairnds_listener() {
    if !require_peer("nix-store") || !require_peer("nix") || !require_peer("nix-build") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    // Real Nix builds two input-addressed outputs; cairn imports them (with their derivers).
    let builder = NixStore::new();
    std::fs::write(work.path().join("drv.nix"), DERIVATIONS).unwrap();
    let out = builder
        .cmd("nix-build")
        .env("NIX_CONFIG", BUILD_CONFIG)
        .args([s(&work.path().join("drv.nix")), "--no-out-link"])
        .output()
        .unwrap();
    assert!(out.status.success(), "nix-build: {}", String::from_utf8_lossy(&out.stderr));
    let built = line(&String::from_utf8(out.stdout).unwrap());
    let built_closure: Vec<String> =
        String::from_utf8(builder.ok("nix-store", &["-qR", &built])).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(built_closure.len(), 2, "{built_closure:?}");
    let mut export = vec!["--export"];
    export.extend(built_closure.iter().map(String::as_str));
    let stream = builder.ok("nix-store", &export);

    let srv = serving("/nix/store", true, "");
    let st = &srv.st;
    st.ok_bytes(&["import"], &stream);
    // Content-addressed paths added by cairn, and a note that refers to both kinds.
    let tree = line(&st.ok(&["add", s(&make_tree(work.path(), 1, 300_000))]));
    write(&work.path().join("note"), format!("uses {tree} and {built}\n").as_bytes());
    let note = line(&st.ok(&["add-text", "note", s(&work.path().join("note")), "--ref", &tree, "--ref", &built]));
    let ours_json = st.ok_bytes(&["path-info", "--json", "--closure", &note], b"");
    let ours = infos(&ours_json);
    assert_eq!(ours.len(), 4);
    let ours_meta = metadata(&ours_json, COPIED_FIELDS);
    assert!(ours_meta[&built]["deriver"].is_string() && ours_meta[&built]["ca"].is_null(), "{ours_meta:?}");
    assert!(ours_meta[&tree]["ca"].is_string(), "{ours_meta:?}");

    // With the key trusted, Nix copies the closure, identical.
    let nix = NixStore::new();
    nix.ok("nix", &["copy", "--from", &srv.url, "--option", "trusted-public-keys", &srv.public, &note]);
    let theirs_json = nix.ok("nix", &["path-info", "--json", "--recursive", &note]);
    assert_eq!(infos(&theirs_json), ours);
    assert_eq!(metadata(&theirs_json, COPIED_FIELDS), ours_meta);
    // Every path carries the serving key's signature.
    let sigs: Value = serde_json::from_slice(&theirs_json).unwrap();
    for i in sigs.as_array().unwrap() {
        let sigs = i["signatures"].as_array().unwrap_or_else(|| panic!("no signatures: {i}"));
        assert!(sigs.iter().any(|s| s.as_str().unwrap().starts_with(&format!("{KEY_NAME}:"))), "{i}");
    }
    // The contents too: Nix dumps what it received as cairn dumps the original.
    for p in [&note, &tree, &built] {
        assert_eq!(nix.ok("nix", &["store", "dump-path", p]), st.ok_bytes(&["nar", "dump", p], b""), "{p}");
    }

    // Nix reads the listener as a store of its own: metadata, file contents, whole NARs,
    // and a signature check of the whole closure.
    let direct =
        nix.cmd("nix").args(["path-info", "--store", &srv.url, "--json", "--recursive", &note]).output().unwrap();
    assert!(direct.status.success(), "{}", String::from_utf8_lossy(&direct.stderr));
    assert_eq!(infos(&direct.stdout), ours);
    assert_eq!(metadata(&direct.stdout, &["narHash", "narSize", "references", "ca", "deriver"]), ours_meta);
    let on_http = |args: &[&str]| {
        let out = nix.cmd("nix").args(args).args(["--store", &srv.url]).output().unwrap();
        assert!(out.status.success(), "nix {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    assert_eq!(on_http(&["store", "cat", &format!("{tree}/bin/tool")]), b"#!/bin/sh\necho tool 1\n");
    assert_eq!(on_http(&["store", "cat", &format!("{built}/bin/hi")]), b"#!/bin/sh\necho hi\n");
    assert_eq!(on_http(&["store", "dump-path", &built]), st.ok_bytes(&["nar", "dump", &built], b""));
    on_http(&["store", "verify", "--recursive", "--trusted-public-keys", &srv.public, &note]);

    // Trusting another key, Nix refuses the input-addressed paths...
    let foreign = "x-1:up1w+p9hbiFiyds3XlVGeZ3VPMC2rkO4TNTtYkEN+Qo=";
    let other = NixStore::new();
    let out = other
        .cmd("nix")
        .args(["copy", "--from", &srv.url, "--option", "trusted-public-keys", foreign, &note])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("lacks a valid signature"), "{err}");
    let valid = other.cmd("nix-store").args(["--check-validity", &built]).output().unwrap();
    assert!(!valid.status.success(), "Nix took an unsigned input-addressed path");
    // ... and its store check says the same of the listener's closure.
    let out = nix
        .cmd("nix")
        .args(["store", "verify", "--store", &srv.url, "--recursive", "--trusted-public-keys", foreign, &note])
        .output()
        .unwrap();
    assert!(!out.status.success(), "verify with a foreign key passed");
    // Content-addressed paths need no signature: their CA field proves them to Nix.
    other.ok("nix", &["copy", "--from", &srv.url, "--option", "trusted-public-keys", foreign, &tree]);
    assert_eq!(
        infos(&other.ok("nix", &["path-info", "--json", &tree])),
        infos(&st.ok_bytes(&["path-info", "--json", &tree], b""))
    );

    // An unsigned listener: Nix refuses the input-addressed paths whatever it trusts.
    let unsigned = serving("/nix/store", false, "");
    unsigned.st.ok_bytes(&["import"], &stream);
    let out = NixStore::new()
        .cmd("nix")
        .args(["copy", "--from", &unsigned.url, "--option", "trusted-public-keys", &srv.public, &built])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lacks a valid signature"));
}

// ---------------------------------------------------------------------------------------------
// The protocol over raw sockets

#[test]
fn the_listener_speaks_the_binary_cache_protocol() {
    let work = tempfile::tempdir().unwrap();
    // Store directory /store: nothing about the cache is tied to /nix/store.
    let srv = serving("/store", true, "");
    let (st, port) = (&srv.st, srv.port);
    let (ia_tree, ia_note) = import_input_addressed(st, work.path(), 7);
    let tree = line(&st.ok(&["add", s(&make_tree(work.path(), 2, 1_500_000))]));
    write(&work.path().join("note"), format!("uses {tree} and {ia_note}\n").as_bytes());
    let note = line(&st.ok(&["add-text", "note", s(&work.path().join("note")), "--ref", &tree, "--ref", &ia_note]));

    let info = get(port, "/nix-cache-info");
    assert_eq!((info.status, info.text().as_str()), (200, "StoreDir: /store\nWantMassQuery: 1\nPriority: 30\n"));
    assert_eq!(info.header("content-type").as_deref(), Some("text/x-nix-cache-info"));
    let head = http(port, "HEAD", "/nix-cache-info", "");
    assert_eq!((head.status, head.body.len()), (200, 0));

    let key = PublicKey::parse(&srv.public).unwrap();
    let all: Value = serde_json::from_slice(&st.ok_bytes(&["path-info", "--json", "--closure", &note], b"")).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 4);
    for i in all.as_array().unwrap() {
        let path = i["path"].as_str().unwrap();
        let hp = hash_part(path);
        let nar = st.ok_bytes(&["nar", "dump", path], b"");
        let nar_hash = Hash::digest(HashAlgo::Sha256, &nar).encode(Encoding::Nix32);

        // The narinfo, field by field, against the NAR we dump ourselves.
        let r = get(port, &format!("/{hp}.narinfo"));
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type").as_deref(), Some("text/x-nix-narinfo"));
        let text = r.text();
        let fields: BTreeMap<&str, Vec<&str>> = text.lines().fold(BTreeMap::new(), |mut m, l| {
            let (k, v) = l.split_once(": ").unwrap_or_else(|| panic!("bad narinfo line {l:?}:\n{text}"));
            m.entry(k).or_insert_with(Vec::new).push(v);
            m
        });
        let one = |k: &str| -> Option<&str> {
            let v = fields.get(k)?;
            assert_eq!(v.len(), 1, "{k} twice:\n{text}");
            Some(v[0])
        };
        let url = format!("nar/{hp}-{nar_hash}.nar.zst");
        assert_eq!(one("StorePath"), Some(path), "{text}");
        assert_eq!(one("URL"), Some(url.as_str()), "{text}");
        assert_eq!(one("Compression"), Some("zstd"), "{text}");
        assert_eq!(one("NarHash"), Some(format!("sha256:{nar_hash}").as_str()), "{text}");
        assert_eq!(one("NarSize"), Some(nar.len().to_string().as_str()), "{text}");
        assert_eq!(i["narSize"].as_u64(), Some(nar.len() as u64));
        assert!(one("FileHash").is_none() && one("FileSize").is_none(), "{text}");
        let mut refs: Vec<&str> = i["references"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
        refs.sort();
        let bases: Vec<&str> = refs.iter().map(|r| r.rsplit('/').next().unwrap()).collect();
        assert_eq!(one("References").unwrap_or(""), bases.join(" "), "{text}");
        assert_eq!(one("CA"), i["ca"].as_str(), "{text}");
        // Signed at serve time over Nix's fingerprint, which we spell out here.
        let fingerprint = format!("1;{path};sha256:{nar_hash};{};{}", nar.len(), refs.join(","));
        let sig = one("Sig").unwrap_or_else(|| panic!("unsigned:\n{text}"));
        assert!(key.verifies(&fingerprint, sig), "signature of {path} does not verify:\n{text}");
        // HEAD answers like GET, without a body (Nix asks this way whether a path is there).
        let h = http(port, "HEAD", &format!("/{hp}.narinfo"), "");
        assert_eq!((h.status, h.body.len()), (200, 0), "{path}");

        // The compressed NAR decompresses to exactly the NAR; the plain one is the NAR.
        let z = get(port, &format!("/{url}"));
        assert_eq!(z.status, 200, "{url}");
        assert_eq!(zstd::stream::decode_all(&z.body[..]).unwrap(), nar, "{url}");
        let plain = get(port, &format!("/{}", url.trim_end_matches(".zst")));
        assert_eq!(plain.status, 200);
        assert_eq!(plain.header("accept-ranges").as_deref(), Some("bytes"));
        assert_eq!(plain.header("content-length"), Some(nar.len().to_string()));
        assert!(plain.body == nar, "plain NAR of {path} differs");
        let h = http(port, "HEAD", &format!("/{}", url.trim_end_matches(".zst")), "");
        assert_eq!((h.status, h.body.len()), (200, 0));
        assert_eq!(h.header("content-length"), Some(nar.len().to_string()));
    }
    // Unsigned: no Sig line, the rest the same.
    let bare = serving("/store", false, "");
    bare.st.ok_bytes(&["import"], &st.ok_bytes(&["export", &ia_tree], b""));
    let r = get(bare.port, &format!("/{}.narinfo", hash_part(&ia_tree)));
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("Sig:"), "{}", r.text());
    assert_eq!(r.text().replace('\n', "|"), {
        let signed = get(port, &format!("/{}.narinfo", hash_part(&ia_tree))).text();
        signed.lines().filter(|l| !l.starts_with("Sig: ")).map(|l| format!("{l}|")).collect::<String>()
    });

    // Unknown paths.
    for target in [
        "/00000000000000000000000000000000.narinfo".to_owned(),
        format!("/nar/{}-{}.nar", "0".repeat(32), "0".repeat(52)),
    ] {
        assert_eq!(get(port, &target).status, 404, "{target}");
        assert_eq!(http(port, "HEAD", &target, "").status, 404, "{target}");
    }

    // Many clients at once get the same bytes; clients that hang up halfway harm no one.
    let big = st.ok_bytes(&["nar", "dump", &tree], b"");
    let big_url = get(port, &format!("/{}.narinfo", hash_part(&tree)))
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned))
        .unwrap();
    let threads: Vec<_> = (0..12)
        .map(|i| {
            let target =
                if i % 2 == 0 { format!("/{big_url}") } else { format!("/{}", big_url.trim_end_matches(".zst")) };
            std::thread::spawn(move || {
                let r = get(port, &target);
                assert_eq!(r.status, 200);
                if target.ends_with(".zst") {
                    zstd::stream::decode_all(&r.body[..]).unwrap()
                } else {
                    r.body
                }
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap() == big, "a concurrent download differs");
    }
    for target in [format!("/{big_url}"), format!("/{}", big_url.trim_end_matches(".zst"))] {
        for _ in 0..5 {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            write!(c, "GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut some = [0u8; 4096];
            c.read_exact(&mut some).unwrap();
            drop(c);
        }
    }
    assert!(get(port, &format!("/{big_url}")).status == 200);
    // Two requests on one kept-alive connection.
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(c, "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\nGET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    c.read_to_string(&mut raw).unwrap();
    assert_eq!(raw.matches("HTTP/1.1 200").count(), 2, "{raw}");
    assert_eq!(raw.matches("StoreDir: /store\n").count(), 2, "{raw}");
    st.ok(&["verify", "--check-contents"]);
    assert!(!st.log().contains("panicked"), "{}", st.log());
}

#[test]
fn ranges_of_uncompressed_nars_are_exact_slices() {
    let work = tempfile::tempdir().unwrap();
    let srv = serving("/nix/store", false, "");
    let tree = line(&srv.st.ok(&["add", s(&make_tree(work.path(), 3, 2_000_000))]));
    let nar = srv.st.ok_bytes(&["nar", "dump", &tree], b"");
    let len = nar.len() as u64;
    let url = format!("/nar/{}-{}.nar", hash_part(&tree), Hash::digest(HashAlgo::Sha256, &nar).encode(Encoding::Nix32));
    let range = |spec: &str| http(srv.port, "GET", &url, &format!("Range: {spec}\r\n"));
    let check = |spec: &str, a: u64, b: u64| {
        let r = range(spec);
        assert_eq!(r.status, 206, "{spec}: {}", r.head);
        assert_eq!(r.header("content-range"), Some(format!("bytes {a}-{b}/{len}")), "{spec}");
        assert_eq!(r.header("content-length"), Some((b - a + 1).to_string()), "{spec}");
        assert!(r.body == nar[a as usize..=b as usize], "{spec}: wrong bytes");
    };
    check("bytes=0-0", 0, 0);
    check("bytes=0-99", 0, 99);
    check("bytes=0-", 0, len - 1);
    check(&format!("bytes={}-", len - 1), len - 1, len - 1);
    check(&format!("bytes=100-{}", len + 1_000_000), 100, len - 1);
    check("bytes=-1", len - 1, len - 1);
    check("bytes=-4096", len - 4096, len - 1);
    check(&format!("bytes=-{}", len * 2), 0, len - 1);
    // Ranges across the dump's internal buffers, at random.
    let mut rng = Rng::new(42);
    for _ in 0..25 {
        let a = rng.below(len);
        let b = a + rng.below((len - a).min(1 << 20));
        check(&format!("bytes={a}-{b}"), a, b);
    }
    // Unsatisfiable: 416 with the length.
    for spec in [format!("bytes={len}-"), format!("bytes={}-{}", len + 5, len + 10), "bytes=-0".into()] {
        let r = range(&spec);
        assert_eq!(r.status, 416, "{spec}");
        assert_eq!(r.header("content-range"), Some(format!("bytes */{len}")), "{spec}");
        assert!(r.body.is_empty());
    }
    // What it does not understand (other units, several ranges, garbage): the whole NAR.
    for spec in ["items=0-5", "bytes=0-1,5-9", "bytes=abc"] {
        let r = range(spec);
        assert_eq!(r.status, 200, "{spec}");
        assert!(r.body == nar, "{spec}");
    }
    // A resumed download: the first part, then the rest, makes the NAR.
    let cut = len / 3;
    let mut joined = range(&format!("bytes=0-{}", cut - 1)).body;
    joined.extend(range(&format!("bytes={cut}-")).body);
    assert!(joined == nar);
    // The compressed URL ignores ranges and sends the whole stream.
    let z = http(srv.port, "GET", &format!("{url}.zst"), "Range: bytes=0-9\r\n");
    assert_eq!(z.status, 200);
    assert!(zstd::stream::decode_all(&z.body[..]).unwrap() == nar);
}

#[test]
fn nothing_but_valid_store_paths_is_reachable() {
    let work = tempfile::tempdir().unwrap();
    let srv = serving("/nix/store", true, "");
    let (st, port) = (&srv.st, srv.port);
    let tree = line(&st.ok(&["add", s(&make_tree(work.path(), 4, 10_000))]));
    let gone = line(&st.ok(&["add", s(&make_tree(work.path(), 5, 10_000))]));
    let hp = hash_part(&tree).to_owned();
    let nar_hash =
        |p: &str| Hash::digest(HashAlgo::Sha256, &st.ok_bytes(&["nar", "dump", p], b"")).encode(Encoding::Nix32);
    let (tree_nh, gone_nh) = (nar_hash(&tree), nar_hash(&gone));
    let gone_urls = [
        format!("/{}.narinfo", hash_part(&gone)),
        format!("/nar/{}-{gone_nh}.nar", hash_part(&gone)),
        format!("/nar/{}-{gone_nh}.nar.zst", hash_part(&gone)),
    ];
    for u in &gone_urls {
        assert_eq!(get(port, u).status, 200, "{u}");
    }

    // Things on disk that are not valid paths: a stray tree, a symlink out of the store, a
    // path deleted since.
    let stray = "1b2c3d4f5g6h7i8j9k0l1m2n3p4q5r6s";
    assert!(stray.len() == 32 && stray.bytes().all(|b| cairn_nix::nixbase32::ALPHABET.contains(&b)));
    write(&st.real_store_dir().join(format!("{stray}-stray/passwd")), b"root:x:0:0:stray secret\n");
    let link = "0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    std::os::unix::fs::symlink("/etc", st.real_store_dir().join(format!("{link}-etc"))).unwrap();
    st.ok(&["delete", &gone]);
    for u in &gone_urls {
        assert_eq!(get(port, u).status, 404, "deleted, yet served: {u}");
    }

    // The cache's description names this store's directory.
    let info = get(port, "/nix-cache-info");
    assert_eq!((info.status, info.text().as_str()), (200, "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"));

    let mut targets: Vec<String> = vec![
        "/../etc/passwd".into(),
        "/../../../../etc/passwd".into(),
        "/%2e%2e/%2e%2e/etc/passwd".into(),
        "/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd".into(),
        "/nar/..%2f..%2fetc%2fpasswd".into(),
        "/nar/../../etc/passwd".into(),
        "/nar/%2e%2e%2f%2e%2e%2fetc%2fpasswd".into(),
        "/nar//etc/passwd".into(),
        "//etc/passwd".into(),
        "/etc/passwd".into(),
        "/nix/store".into(),
        format!("/{}-tree", hp),
        format!("/{}.narinfo/../../../etc/passwd", hp),
        format!("/nar/{hp}-{tree_nh}.nar/../../../../etc/passwd"),
        format!("/nar/{hp}-{tree_nh}.nar/bin/tool"),
        format!("/nar/{hp}-{tree_nh}.tar"),
        format!("/nar/{hp}-{tree_nh}.nar.xz"),
        format!("/nar/{hp}-{tree_nh}"),
        format!("/nar/{hp}.nar"),
        "/nar/x.nar".into(),
        // (These four from the former cache_serve.rs.)
        "/../../etc/passwd".into(),
        "/nar/%2e%2e/%2e%2e/etc/passwd".into(),
        "/0000000000000000000000000000000a.narinfo".into(),
        format!("/{}EE.narinfo", &hp[..31]),
        // Hash parts that are not 32 characters of nixbase32 (no e, o, u, t; lower case).
        format!("/{}.narinfo", &hp[..31]),
        format!("/{hp}0.narinfo"),
        format!("/{}.narinfo", hp.to_uppercase()),
        "/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo".into(),
        "/........................................narinfo".into(),
        format!("/{}.narinfo", "%2e".repeat(32)),
        format!("/nar/{}-{tree_nh}.nar", "..%2f".repeat(6) + "etc%2fpass"),
        // A NAR URL with another path's NAR hash, or a wrong or shortened one.
        format!("/nar/{hp}-{gone_nh}.nar"),
        format!("/nar/{hp}-{}.nar", "0".repeat(52)),
        format!("/nar/{hp}-{}.nar.zst", &tree_nh[..51]),
        format!("/nar/{hp}-{tree_nh}0.nar"),
        // The stray tree and the symlink, by every route.
        format!("/{stray}.narinfo"),
        format!("/nar/{stray}-{}.nar", "0".repeat(52)),
        format!("/{link}.narinfo"),
        format!("/nar/{link}-{}.nar.zst", "0".repeat(52)),
        "/.cairn-tmp".into(),
        "/.links".into(),
    ];
    // Query strings and fragments do not change what a path is.
    targets.push(format!("/{}.narinfo?../../etc/passwd", hash_part(&gone)));
    for target in &targets {
        let r = get(port, target);
        assert_eq!(r.status, 404, "{target}: {}\n{}", r.head, r.text());
        let body = r.text();
        assert!(!body.contains("root:") && !body.contains("nix-archive"), "{target} leaked: {body}");
        assert!(body.len() < 100, "{target}: {body}");
    }
    // The real ones still answer.
    assert_eq!(get(port, &format!("/{hp}.narinfo")).status, 200);
    assert_eq!(get(port, &format!("/nar/{hp}-{tree_nh}.nar")).status, 200);
    // Other methods do not change anything.
    let r = http(port, "PUT", &format!("/{hp}.narinfo"), "Content-Length: 0\r\n");
    assert!(r.status == 404 || r.status == 405, "{}", r.head);
    let r = http(port, "DELETE", &format!("/nar/{hp}-{tree_nh}.nar"), "");
    assert!(r.status == 404 || r.status == 405, "{}", r.head);
    st.ok(&["path-info", &tree]);
}

// ---------------------------------------------------------------------------------------------
// cairn against the listener

#[test]
fn cairn_substitutes_from_another_cairnds_listener() {
    let work = tempfile::tempdir().unwrap();
    let srv = serving("/store", true, "");
    let st = &srv.st;
    let (ia_tree, ia_note) = import_input_addressed(st, work.path(), 11);
    let tree = line(&st.ok(&["add", s(&make_tree(work.path(), 12, 400_000))]));
    write(&work.path().join("note"), format!("uses {tree} and {ia_note}\n").as_bytes());
    let note = line(&st.ok(&["add-text", "note", s(&work.path().join("note")), "--ref", &tree, "--ref", &ia_note]));
    let ours_json = st.ok_bytes(&["path-info", "--json", "--closure", &note], b"");
    let ours = metadata(&ours_json, COPIED_FIELDS);
    assert_eq!(ours.len(), 4);
    let trusting = format!("trusted-public-keys = [\"{}\"]\n", srv.public);

    // `substitute --from`: the closure, with the same NAR hashes, sizes, references and
    // content addresses, and the serving key's signature.
    let a = TestStore::builder().config(&trusting).start();
    assert_eq!(a.ok(&["substitute", "--from", &srv.url, &note]), format!("{note}\n"));
    let theirs_json = a.ok_bytes(&["path-info", "--json", "--closure", &note], b"");
    assert_eq!(metadata(&theirs_json, COPIED_FIELDS), ours);
    assert_eq!(infos(&theirs_json), infos(&ours_json));
    let sigs = metadata(&theirs_json, &["signatures"]);
    for p in [&ia_tree, &ia_note] {
        let sig = sigs[p.as_str()]["signatures"].as_array().unwrap_or_else(|| panic!("{p} unsigned"));
        assert!(sig.iter().any(|s| s.as_str().unwrap().starts_with(&format!("{KEY_NAME}:"))), "{p}: {sig:?}");
    }
    a.ok(&["verify", "--check-contents"]);
    for p in [&note, &tree, &ia_tree] {
        assert_eq!(a.ok_bytes(&["nar", "dump", p], b""), st.ok_bytes(&["nar", "dump", p], b""), "{p}");
    }
    // Again: nothing to do.
    assert_eq!(a.ok(&["substitute", "--from", &srv.url, &note]), format!("{note}\n"));

    // `copy --from`, and the listener as a configured substituter.
    let b = TestStore::builder().config(&trusting).start();
    b.ok(&["copy", "--from", &srv.url, &note]);
    assert_eq!(metadata(&b.ok_bytes(&["path-info", "--json", "--closure", &note], b""), COPIED_FIELDS), ours);
    let c = TestStore::builder().config(&format!("{trusting}substituters = [\"{}\"]\n", srv.url)).start();
    assert_eq!(c.ok(&["substitute", &note]), format!("{note}\n"));
    assert_eq!(metadata(&c.ok_bytes(&["path-info", "--json", "--closure", &note], b""), COPIED_FIELDS), ours);

    // Without the key trusted, the input-addressed paths are refused in one line, and nothing
    // that needs them is registered; the content-addressed tree needs no key.
    let d = TestStore::start();
    // (The tree arrives and is counted on a line of its own; the error is the last line.)
    let out = d.run(&["substitute", "--from", &srv.url, &note], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let err = stderr.trim_end().lines().last().unwrap();
    assert!(err.starts_with("cairn: cannot substitute") && err.contains("trusted-public-keys"), "{stderr}");
    assert!(err.contains(&ia_tree) || err.contains(&ia_note), "{stderr}");
    for p in [&note, &ia_note, &ia_tree] {
        assert!(d.run(&["path-info", p], b"").status.code() != Some(0), "{p} registered without a trusted signature");
    }
    assert_eq!(d.ok(&["substitute", "--from", &srv.url, &tree]), format!("{tree}\n"));
    assert_eq!(metadata(&d.ok_bytes(&["path-info", "--json", &tree], b""), COPIED_FIELDS)[&tree], ours[&tree]);
    // A path the listener does not have: one line naming it.
    let missing = format!("/store/{}-missing", "1".repeat(32));
    let err = a.fail(&["substitute", "--from", &srv.url, &missing], b"");
    assert!(err.contains(&missing[7..]) || err.contains("missing"), "{err}");
    // A listener for another store directory is not used.
    let other = serving("/nix/store", true, "");
    let e = TestStore::builder().config(&format!("trusted-public-keys = [\"{}\"]\n", other.public)).start();
    let err = e.fail(&["substitute", "--from", &other.url, &tree], b"");
    assert!(err.contains("/nix/store") || err.contains("store dir"), "{err}");
    assert!(e.store_entries().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Daemon to daemon

fn copy_json(from: &TestStore, to: &TestStore, paths: &[&str]) -> (u64, u64, u64) {
    let mut args = vec!["copy", "--json", "--to"];
    let url = format!("unix://{}", to.socket.display());
    args.push(&url);
    args.extend_from_slice(paths);
    let v: Value = serde_json::from_str(&from.ok(&args)).unwrap();
    (v["copied"].as_u64().unwrap(), v["skipped"].as_u64().unwrap(), v["bytes"].as_u64().unwrap())
}

#[test]
fn copy_between_daemons_sends_only_what_the_other_lacks() {
    let work = tempfile::tempdir().unwrap();
    // Signed input-addressed paths on A, as a substitution leaves them (signatures must travel).
    let cache = work.path().join("cache");
    let seeder = TestStore::start();
    let (ia_tree, ia_note) = import_input_addressed(&seeder, work.path(), 21);
    let (sk, pk) = (work.path().join("sk"), work.path().join("pk"));
    seeder.ok(&["key", "generate", "seed-cache-1", s(&sk), s(&pk)]);
    seeder.ok(&["copy", "--to", &format!("file://{}", cache.display()), "--secret-key-file", s(&sk), &ia_note]);
    let public = std::fs::read_to_string(&pk).unwrap().trim().to_owned();
    let a = TestStore::builder().config(&format!("trusted-public-keys = [\"{public}\"]\n")).start();
    a.ok(&["substitute", "--from", &format!("file://{}", cache.display()), &ia_note]);
    // A chain of content-addressed paths over them: c2's closure has 4 paths, c4's has 6.
    let c1 = line(&a.ok(&["add", s(&make_tree(work.path(), 22, 700_000))]));
    let text = |name: &str, refs: &[&str]| {
        let f = work.path().join(name);
        write(&f, format!("{name}: {}\n", refs.join(" ")).as_bytes());
        let mut args = vec!["add-text", name, s(&f)];
        for r in refs {
            args.extend(["--ref", r]);
        }
        line(&a.ok(&args))
    };
    let c2 = text("c2", &[&c1, &ia_note]);
    let c3 = text("c3", &[&c2]);
    let c4 = text("c4", &[&c3, &c1]);
    let fields = ["narHash", "narSize", "references", "ca", "deriver", "signatures"];
    let on_a = |p: &str| metadata(&a.ok_bytes(&["path-info", "--json", "--closure", p], b""), &fields);
    assert!(on_a(&ia_tree)[&ia_tree]["signatures"].is_array(), "{:?}", on_a(&ia_tree));

    let b = TestStore::start();
    let to = format!("unix://{}", b.socket.display());
    let (copied, skipped, bytes) = copy_json(&a, &b, &[&c2]);
    assert_eq!((copied, skipped), (4, 0));
    let sizes: u64 = on_a(&c2).values().map(|m| m["narSize"].as_u64().unwrap()).sum();
    assert!(bytes >= sizes, "{bytes} bytes sent for {sizes} bytes of NARs");
    let on_b = |p: &str| metadata(&b.ok_bytes(&["path-info", "--json", "--closure", p], b""), &fields);
    assert_eq!(on_b(&c2), on_a(&c2));
    // Again: nothing sent, all there (the human form says so too).
    assert_eq!(copy_json(&a, &b, &[&c2]), (0, 4, 0));
    let out = a.run(&["copy", "--to", &to, &c2], b"");
    assert!(out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert_eq!(msg.trim_end(), format!("copied 0 paths (0.00 MiB) to {to}, 4 already there"));
    // A bigger closure that overlaps: only the two missing paths go.
    let (copied, skipped, bytes) = copy_json(&a, &b, &[&c4]);
    assert_eq!((copied, skipped), (2, 4));
    let sent: u64 = [&c3, &c4].iter().map(|p| on_a(p)[p.as_str()]["narSize"].as_u64().unwrap()).sum();
    assert!(bytes >= sent && bytes < sizes, "{bytes} bytes for two small texts");
    assert_eq!(on_b(&c4), on_a(&c4));
    // Several paths named at once, one already there.
    let c5 = text("c5", &[&c4]);
    let solo = text("solo", &[]);
    assert_eq!(copy_json(&a, &b, &[&c5, &solo, &c1]).0, 2);
    assert_eq!(on_b(&c5), on_a(&c5));
    b.ok(&["verify", "--check-contents"]);
    for p in [&c1, &ia_tree, &c4] {
        assert_eq!(b.ok_bytes(&["nar", "dump", p], b""), a.ok_bytes(&["nar", "dump", p], b""));
    }
    // And back the other way: a third daemon, fed by B, ends up like A.
    let c = TestStore::start();
    assert_eq!(copy_json(&b, &c, &[&c5]).0, 7);
    assert_eq!(metadata(&c.ok_bytes(&["path-info", "--json", "--closure", &c5], b""), &fields), on_a(&c5));

    // A daemon with another store directory: refused in one line, nothing registered.
    let nix = TestStore::builder().store_dir("/nix/store").start();
    let other = format!("unix://{}", nix.socket.display());
    let err = a.fail(&["copy", "--to", &other, &c2], b"");
    assert!(err.contains("store directory") && err.contains("/nix/store"), "{err}");
    assert!(nix.store_entries().is_empty());
    // No daemon at that socket: one line.
    let err = a.fail(&["copy", "--to", &format!("unix://{}", work.path().join("nothing.sock").display()), &c2], b"");
    assert!(err.contains("nothing.sock"), "{err}");
    // A path A does not have: one line, nothing sent.
    let err = a.fail(&["copy", "--to", &to, &format!("/store/{}-nope", "1".repeat(32))], b"");
    assert!(err.contains("nope"), "{err}");
}

/// `copy --to unix:// --secret-key-file SK` signs what it sends, as `copy --to file://` and
/// `tcp://` do: an untrusted user's paths then pass the target's signature check.
#[test]
fn copy_to_a_daemon_signs_with_the_given_key() {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let a = TestStore::start();
    let (ia_tree, _) = import_input_addressed(&a, work.path(), 31);
    let (sk, pk) = (work.path().join("sk"), work.path().join("pk"));
    a.ok(&["key", "generate", "copier-1", s(&sk), s(&pk)]);
    let public = std::fs::read_to_string(&pk).unwrap().trim().to_owned();
    let b = TestStore::builder().config(&format!("trusted-public-keys = [\"{public}\"]\n")).start();
    a.ok(&["copy", "--to", &format!("unix://{}", b.socket.display()), "--secret-key-file", s(&sk), &ia_tree]);
    let sigs = metadata(&b.ok_bytes(&["path-info", "--json", &ia_tree], b""), &["signatures"]);
    let signed = sigs[&ia_tree]["signatures"]
        .as_array()
        .is_some_and(|v| v.iter().any(|s| s.as_str().unwrap().starts_with("copier-1:")));
    assert!(signed, "copy --to unix:// --secret-key-file did not sign: {sigs:?}");

    // An untrusted user can send paths only signed by a key the target trusts: with one.
    if !nix::unistd::geteuid().is_root() || !cairn_tests::require_peer("setpriv") {
        return;
    }
    std::fs::set_permissions(&sk, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let c = TestStore::builder().config(&format!("trusted-public-keys = [\"{public}\"]\n")).start();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin_dir().join("cairn"))
        .args(a.store_args())
        .arg("--no-auto-start")
        .args(["copy", "--to", &format!("unix://{}", c.socket.display()), "--secret-key-file", s(&sk), &ia_tree])
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success(), "nobody's signed copy: {}", String::from_utf8_lossy(&out.stderr));
    c.ok(&["path-info", &ia_tree]);
}

/// The build log of a derivation built here is served at `/log/<drv>`, as a binary cache with
/// logs serves it: `nix log --store URL` prints it; nothing else is served there.
#[test]
fn nix_reads_build_logs_from_cairnds_listener() {
    if !require_peer("nix-store") || !require_peer("/bin/busybox") {
        return;
    }
    let served = serving("/nix/store", true, "sandbox-paths = [\"/bin/sh=/bin/busybox\"]");
    let nix = NixStore::new();
    let dir = tempfile::tempdir().unwrap();
    let expr = dir.path().join("logged.nix");
    write(
        &expr,
        br#"derivation { name = "logged"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo a line for the log; echo > $out" ]; }"#,
    );
    let drv = String::from_utf8(nix.ok("nix-instantiate", &[s(&expr)])).unwrap().trim().to_owned();
    let stream = nix.ok("nix-store", &["--export", &drv]);
    served.st.ok_bytes(&["import"], &stream);
    let out = line(&served.st.ok(&["realise", &drv]));
    let logged = String::from_utf8(nix.ok("nix", &["log", "--store", &served.url, &out])).unwrap();
    assert_eq!(logged, "a line for the log\n");
    let base = drv.trim_start_matches("/nix/store/");
    assert_eq!(get(served.port, &format!("/log/{base}")).text(), "a line for the log\n");
    for missing in ["/log/00000000000000000000000000000000-x.drv", "/log/..%2Fdb", &format!("/log/{}", &out[11..])] {
        assert_eq!(get(served.port, missing).status, 404, "{missing}");
    }
}
