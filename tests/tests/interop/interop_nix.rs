//! Interop with real Nix 2.8: cairn must be byte-compatible with it.
//!
//! Every test runs real `nix-store`/`nix`/`nix-instantiate` on a private store ([`NixStore`]) and a
//! real `cairnd` with store directory `/nix/store`, and compares what both print at run time:
//! store paths, NAR hashes and sizes, references, NAR dumps byte for byte, and export streams in
//! both directions. Trees come from a deterministic generator (xorshift), so failures reproduce.
//!
//! Note: `nix-store --dump` dumps the literal path it is given, not the store path, so Nix's
//! copies are dumped by their physical path under the private store's root.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cairn_tests::{line, require_peer, NixStore, Rng, TestStore};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers

fn cairn_store() -> TestStore {
    TestStore::builder().store_dir("/nix/store").start()
}

use cairn_tests::utf8;

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).expect("utf-8 output")
}

fn lines(s: &str) -> Vec<String> {
    s.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

fn write_file(path: &Path, contents: &[u8], mode: u32) {
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn link(target: &[u8], at: &Path) {
    symlink(OsStr::from_bytes(target), at).unwrap();
}

/// Fragments that file names are built from: ASCII, UTF-8 (`é`, `日本`, …) and bytes that are not
/// UTF-8, and characters whose byte order differs from a locale's order.
const NAME_PARTS: &[&[u8]] = &[
    b"a",
    b"B",
    b"z",
    b"Z",
    b"_",
    b"-",
    b".",
    b"0",
    b"9",
    b"x",
    b"lib",
    b"bin",
    b"share",
    b"\xc3\xa9",                 // é
    b"\xc3\xa4",                 // ä
    b"\xe6\x97\xa5\xe6\x9c\xac", // 日本
    b"\xf0\x9f\x98\x80",         // 😀
    b"\xff",
    b"\xfe",
    b" ",
    b"\x01",
];

fn random_name(rng: &mut Rng) -> Vec<u8> {
    loop {
        let mut name = Vec::new();
        for _ in 0..=rng.below(4) {
            name.extend_from_slice(rng.pick(NAME_PARTS));
        }
        if name != b"." && name != b".." {
            return name;
        }
    }
}

fn random_contents(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(6) {
        0 => 0,
        1 => rng.below(16),
        2 => rng.below(300),
        3 => rng.below(5000),
        4 => 8 * rng.below(100), // multiples of 8: no NAR padding
        _ => 60_000 + rng.below(10_000),
    };
    rng.bytes(len as usize)
}

/// Fills `dir` with a random tree: plain and executable files (and modes where only group or
/// other may execute, which Nix does not count as executable), empty files, symlinks (relative,
/// absolute, dangling, non-UTF-8 targets), empty and nested directories, odd names.
fn random_tree(rng: &mut Rng, dir: &Path, depth: u32) {
    let entries = rng.below(if depth == 0 { 10 } else { 7 });
    let mut used = BTreeSet::new();
    for _ in 0..entries {
        let name = random_name(rng);
        if !used.insert(name.clone()) {
            continue;
        }
        let p = dir.join(OsStr::from_bytes(&name));
        match rng.below(12) {
            0..=2 => write_file(&p, &random_contents(rng), 0o644),
            3 => write_file(&p, &random_contents(rng), 0o755),
            4 => write_file(&p, &random_contents(rng), rng.pick(&[0o700, 0o744, 0o500, 0o654, 0o645, 0o444])),
            5 => write_file(&p, b"", rng.pick(&[0o644, 0o755])),
            6 => {
                let sibling = random_name(rng);
                let targets: [&[u8]; 6] =
                    [&sibling, b"../x/y", b"does/not/exist", b"/nix/store/missing-thing", b"\xff\xfe/\xc3", b"."];
                link(rng.pick(&targets), &p)
            }
            7..=9 if depth < 5 => {
                std::fs::create_dir(&p).unwrap();
                random_tree(rng, &p, depth + 1);
            }
            _ => std::fs::create_dir(&p).unwrap(),
        }
    }
}

/// What a generated tree holds, to check that the generator covers every kind of entry.
#[derive(Debug, Default)]
struct Census {
    files: usize,
    executables: usize,
    empty_files: usize,
    symlinks: usize,
    dangling_symlinks: usize,
    dirs: usize,
    empty_dirs: usize,
    non_ascii_utf8_names: usize,
    non_utf8_names: usize,
    max_depth: usize,
}

fn census(p: &Path, depth: usize, c: &mut Census) {
    let name = p.file_name().unwrap().as_bytes();
    match std::str::from_utf8(name) {
        Err(_) => c.non_utf8_names += 1,
        Ok(n) if !n.is_ascii() => c.non_ascii_utf8_names += 1,
        Ok(_) => {}
    }
    c.max_depth = c.max_depth.max(depth);
    let m = std::fs::symlink_metadata(p).unwrap();
    if m.file_type().is_symlink() {
        c.symlinks += 1;
        c.dangling_symlinks += usize::from(std::fs::metadata(p).is_err());
    } else if m.is_dir() {
        c.dirs += 1;
        let entries: Vec<_> = std::fs::read_dir(p).unwrap().map(|e| e.unwrap().path()).collect();
        c.empty_dirs += usize::from(entries.is_empty());
        for e in entries {
            census(&e, depth + 1, c);
        }
    } else {
        c.files += 1;
        c.executables += usize::from(m.permissions().mode() & 0o100 != 0);
        c.empty_files += usize::from(m.len() == 0);
    }
}

/// `nix path-info --json` (or `cairn path-info --json`) output, by path.
fn by_path(json: &str) -> BTreeMap<String, Value> {
    let v: Vec<Value> = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    v.into_iter().map(|i| (i["path"].as_str().unwrap().to_owned(), i)).collect()
}

fn nix_info(n: &NixStore, paths: &[&str], closure: bool) -> BTreeMap<String, Value> {
    let mut args = vec!["path-info", "--json"];
    if closure {
        args.push("-r");
    }
    args.extend_from_slice(paths);
    by_path(&text(n.ok("nix", &args)))
}

fn cairn_info(s: &TestStore, paths: &[&str], closure: bool) -> BTreeMap<String, Value> {
    let mut args = vec!["path-info", "--json"];
    if closure {
        args.push("--closure");
    }
    args.extend_from_slice(paths);
    by_path(&s.ok(&args))
}

/// The references of a path-info entry as a set (order is not part of the contract).
fn refs(info: &Value) -> BTreeSet<String> {
    info["references"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect()
}

/// Compares the metadata that survives any transfer: NAR hash and size and references.
fn assert_same_info(what: &str, cairn: &Value, nix: &Value) {
    assert_eq!(cairn["path"], nix["path"], "{what}");
    assert_eq!(cairn["narHash"], nix["narHash"], "{what}: narHash of {}", nix["path"]);
    assert_eq!(cairn["narSize"], nix["narSize"], "{what}: narSize of {}", nix["path"]);
    assert_eq!(refs(cairn), refs(nix), "{what}: references of {}", nix["path"]);
}

fn assert_same_infos(what: &str, cairn: &BTreeMap<String, Value>, nix: &BTreeMap<String, Value>) {
    assert_eq!(cairn.keys().collect::<Vec<_>>(), nix.keys().collect::<Vec<_>>(), "{what}: paths");
    for (p, c) in cairn {
        assert_same_info(what, c, &nix[p]);
    }
}

/// Where a Nix store path is on disk.
fn nix_real_path(n: &NixStore, store_path: &str) -> PathBuf {
    n.root.path().join(store_path.trim_start_matches('/'))
}

/// `nix-store --dump` of a local path (of a store path: use [`nix_real_path`]).
fn nix_dump(n: &NixStore, path: &Path) -> Vec<u8> {
    n.ok("nix-store", &["--dump", utf8(path)])
}

/// Asserts that two NARs are equal, reporting where they first differ instead of both.
fn assert_nar_eq(what: &str, cairn: &[u8], nix: &[u8]) {
    if cairn == nix {
        return;
    }
    let at = cairn.iter().zip(nix).position(|(a, b)| a != b).unwrap_or(cairn.len().min(nix.len()));
    let window = |v: &[u8]| format!("{:02x?}", &v[at.saturating_sub(16)..(at + 48).min(v.len())]);
    panic!(
        "{what}: NARs differ (cairn {} bytes, nix {} bytes), first at byte {at}\ncairn: {}\nnix:   {}",
        cairn.len(),
        nix.len(),
        window(cairn),
        window(nix)
    );
}

/// Adds `src` with `cairn add` and `nix-store --add` and checks that store path, NAR hash and
/// size, references and content address agree, that `cairn nar dump` of the store path equals
/// `nix-store --dump` of Nix's copy and of the original, and that `cairn nar dump` of the
/// original (no daemon) does too. Returns the store path.
fn assert_add_matches_nix(s: &TestStore, n: &NixStore, src: &Path) -> String {
    let src_s = utf8(src);
    let cp = line(&s.ok(&["add", src_s]));
    let np = line(&text(n.ok("nix-store", &["--add", src_s])));
    assert_eq!(cp, np, "store path of {src_s}");
    let c = &cairn_info(s, &[&cp], false)[&cp];
    let x = &nix_info(n, &[&np], false)[&np];
    assert_same_info(src_s, c, x);
    assert_eq!(c["ca"], x["ca"], "content address of {cp}");
    let nix_copy = nix_dump(n, &nix_real_path(n, &np));
    let nix_orig = nix_dump(n, src);
    assert_nar_eq(&format!("nix-store --dump of {src_s} and of its store copy"), &nix_orig, &nix_copy);
    assert_nar_eq(&format!("cairn nar dump {cp}"), &s.ok_bytes(&["nar", "dump", &cp], b""), &nix_copy);
    assert_nar_eq(&format!("cairn nar dump {src_s}"), &s.ok_bytes(&["nar", "dump", src_s], b""), &nix_orig);
    assert_eq!(x["narSize"].as_u64().unwrap(), nix_copy.len() as u64, "Nix's narSize is its dump's size");
    cp
}

/// `cairn nar restore` of Nix's dump gives a tree that Nix dumps to the same bytes.
fn assert_restore_round_trips(s: &TestStore, n: &NixStore, src: &Path, scratch: &Path) {
    let nar = nix_dump(n, src);
    let dest = scratch.join(format!("restored-{}", src.file_name().unwrap().to_string_lossy()));
    s.ok_bytes(&["nar", "restore", utf8(&dest)], &nar);
    assert_nar_eq(&format!("nix-store --dump of cairn nar restore of {}", src.display()), &nix_dump(n, &dest), &nar);
}

// ---------------------------------------------------------------------------------------------
// 1. Trees on disk: `cairn add` == `nix-store --add`

#[test]
fn generated_trees_add_and_dump_like_nix() {
    if !require_peer("nix-store") || !require_peer("nix") {
        return;
    }
    let s = cairn_store();
    let n = NixStore::new();
    let dir = tempfile::tempdir().unwrap();
    let mut paths = BTreeSet::new();
    let mut c = Census::default();
    for seed in 1..=6u64 {
        let root = dir.path().join(format!("tree-{seed}"));
        std::fs::create_dir(&root).unwrap();
        random_tree(&mut Rng::new(seed), &root, 0);
        census(&root, 0, &mut c);
        paths.insert(assert_add_matches_nix(&s, &n, &root));
        assert_restore_round_trips(&s, &n, &root, dir.path());
    }
    assert_eq!(paths.len(), 6, "different trees, different paths");
    let every = [
        c.files,
        c.executables,
        c.empty_files,
        c.symlinks,
        c.dangling_symlinks,
        c.dirs,
        c.empty_dirs,
        c.non_ascii_utf8_names,
        c.non_utf8_names,
    ];
    assert!(every.iter().all(|&k| k > 0) && c.max_depth >= 4, "the generator covers every kind of entry: {c:?}");
    eprintln!("generated trees: {c:?}");
}

#[test]
fn every_kind_of_entry_adds_and_dumps_like_nix() {
    if !require_peer("nix-store") || !require_peer("nix") {
        return;
    }
    let s = cairn_store();
    let n = NixStore::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("kinds");
    std::fs::create_dir(&root).unwrap();
    write_file(&root.join("plain"), b"plain\n", 0o644);
    write_file(&root.join("exec"), b"#!/bin/sh\necho hi\n", 0o755);
    write_file(&root.join("owner-exec-only"), b"x", 0o700);
    write_file(&root.join("group-exec-only"), b"x", 0o654); // not executable for Nix
    write_file(&root.join("read-only"), b"ro", 0o444);
    write_file(&root.join("empty"), b"", 0o644);
    write_file(&root.join("empty-exec"), b"", 0o755);
    write_file(&root.join("eight"), b"12345678", 0o644); // no padding
    write_file(&root.join("nine"), b"123456789", 0o644);
    std::fs::create_dir(root.join("empty-dir")).unwrap();
    std::fs::create_dir_all(root.join("dir-of-empty/dirs/inside")).unwrap();
    link(b"plain", &root.join("link-to-file"));
    link(b"empty-dir", &root.join("link-to-dir"));
    link(b"does/not/exist", &root.join("dangling"));
    link(b"/nix/store/00000000000000000000000000000000-absent", &root.join("absolute-dangling"));
    link(b"dangling", &root.join("link-to-dangling"));
    link(b"link-to-self", &root.join("link-to-self"));
    link(b"..", &root.join("dotdot"));
    assert_add_matches_nix(&s, &n, &root);
    assert_restore_round_trips(&s, &n, &root, dir.path());
}

#[test]
fn symlinks_as_the_added_path_add_like_nix() {
    if !require_peer("nix-store") || !require_peer("nix") {
        return;
    }
    let s = cairn_store();
    let n = NixStore::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("target-dir")).unwrap();
    write_file(&dir.path().join("target-dir/f"), b"f", 0o644);
    // Nix adds a symlink itself, not what it points to.
    for (name, target) in [
        ("root-link-dangling", &b"does/not/exist"[..]),
        ("root-link-to-dir", b"target-dir"),
        ("root-link-absolute", b"/etc/passwd"),
        ("root-link-non-utf8", b"\xff\xfe\xe6\x97\xa5"),
    ] {
        let p = dir.path().join(name);
        link(target, &p);
        assert_add_matches_nix(&s, &n, &p);
        assert_restore_round_trips(&s, &n, &p, dir.path());
    }
}

#[test]
fn deep_nesting_adds_and_dumps_like_nix() {
    if !require_peer("nix-store") || !require_peer("nix") {
        return;
    }
    let s = cairn_store();
    let n = NixStore::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("deep");
    let mut d = root.clone();
    for level in 0..60 {
        d.push(format!("level-{level:02}"));
        std::fs::create_dir_all(&d).unwrap();
        if level % 10 == 9 {
            write_file(&d.join("file"), format!("level {level}\n").as_bytes(), 0o644);
            link(b"../..", &d.join("up"));
        }
    }
    write_file(&d.join("bottom"), b"#!/bin/sh\n", 0o755);
    std::fs::create_dir(d.join("empty")).unwrap();
    assert_add_matches_nix(&s, &n, &root);
    assert_restore_round_trips(&s, &n, &root, dir.path());
}

#[test]
fn odd_names_and_byte_order_add_like_nix() {
    if !require_peer("nix-store") || !require_peer("nix") {
        return;
    }
    let s = cairn_store();
    let n = NixStore::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("names");
    std::fs::create_dir(&root).unwrap();
    // Byte order (NAR order) differs from a locale's order for these, and some are prefixes of others.
    let names: &[&[u8]] = &[
        b"B",
        b"a",
        b"_x",
        b"Z",
        "ä".as_bytes(),
        "é".as_bytes(),
        "日本".as_bytes(),
        "😀".as_bytes(),
        b"\xff\xfe",
        b"\xfe",
        b"a.",
        b"aa",
        b"a b",
        b"a\x01",
        b"-dash",
        b".hidden",
        b"~",
        "Ä".as_bytes(),
        "e\u{301}".as_bytes(), // é decomposed: a different name
    ];
    for (i, name) in names.iter().enumerate() {
        write_file(&root.join(OsStr::from_bytes(name)), format!("{i}\n").as_bytes(), 0o644);
    }
    let sub = root.join("dir-日本");
    std::fs::create_dir(&sub).unwrap();
    for name in names {
        std::fs::create_dir(sub.join(OsStr::from_bytes(name))).unwrap();
    }
    link(b"\xff\xfe", &root.join(OsStr::from_bytes(b"link-\xfe")));
    link("日本/é".as_bytes(), &root.join("link-utf8"));
    write_file(&root.join(OsStr::from_bytes(b"exec-\xc3\xa9\xff")), b"\xff\xfe\x00 not utf-8 \x00", 0o755);
    assert_add_matches_nix(&s, &n, &root);
    assert_restore_round_trips(&s, &n, &root, dir.path());
}

#[test]
fn lone_files_add_and_dump_like_nix() {
    if !require_peer("nix-store") || !require_peer("nix") {
        return;
    }
    let s = cairn_store();
    let n = NixStore::new();
    let dir = tempfile::tempdir().unwrap();
    for f in lone_files(dir.path()) {
        assert_add_matches_nix(&s, &n, &f);
        assert_restore_round_trips(&s, &n, &f, dir.path());
    }
}

/// A plain file, an executable, an empty file and one over 64 KiB.
fn lone_files(dir: &Path) -> [PathBuf; 4] {
    let mut rng = Rng::new(42);
    let files = [dir.join("lone-file.txt"), dir.join("lone-exec"), dir.join("lone-empty"), dir.join("lone-70k")];
    write_file(&files[0], &rng.bytes(1234), 0o644);
    write_file(&files[1], b"#!/bin/sh\nexit 0\n", 0o755);
    write_file(&files[2], b"", 0o644);
    write_file(&files[3], &rng.bytes(70_001), 0o644);
    files
}

/// `cairn add --flat FILE` vs `nix-store --add-fixed sha256 FILE` (the hash of the bytes).
fn assert_flat_add_matches_nix(s: &TestStore, n: &NixStore, f: &Path) {
    let cp = line(&s.ok(&["add", "--flat", utf8(f)]));
    let np = line(&text(n.ok("nix-store", &["--add-fixed", "sha256", utf8(f)])));
    assert_eq!(cp, np, "flat store path of {}", f.display());
    let c = &cairn_info(s, &[&cp], false)[&cp];
    let x = &nix_info(n, &[&np], false)[&np];
    assert_eq!(c["ca"], x["ca"], "content address of {cp}");
    assert_same_info("cairn add --flat vs nix-store --add-fixed sha256", c, x);
    assert_nar_eq(
        &format!("cairn nar dump {cp}"),
        &s.ok_bytes(&["nar", "dump", &cp], b""),
        &nix_dump(n, &nix_real_path(n, &np)),
    );
}

#[test]
fn flat_add_like_nix_add_fixed() {
    if !require_peer("nix-store") || !require_peer("nix") {
        return;
    }
    let s = cairn_store();
    let n = NixStore::new();
    let dir = tempfile::tempdir().unwrap();
    let [plain, _exec, empty, big] = lone_files(dir.path());
    for f in [plain, empty, big] {
        assert_flat_add_matches_nix(&s, &n, &f);
    }
}

/// Nix 2.8's `nix-store --add-fixed sha256` (and `nix store add-file`) keeps an executable
/// file's executable bit in the NAR, so the store path is the same but the NAR hash is not.
/// (`builtins.path { recursive = false; }` makes the file non-executable instead; `cairn add
/// --flat` does what that does, though it documents itself as `nix-store --add-fixed`.)
#[test]
fn flat_add_of_executable_like_nix_add_fixed() {
    if !require_peer("nix-store") || !require_peer("nix") {
        return;
    }
    let s = cairn_store();
    let n = NixStore::new();
    let dir = tempfile::tempdir().unwrap();
    let [_, exec, _, _] = lone_files(dir.path());
    assert_flat_add_matches_nix(&s, &n, &exec);
}

// ---------------------------------------------------------------------------------------------
// 2. A large file

/// SHA-256 (hex) and length of a command's stdout, streamed through `sha256sum`.
fn stream_sha256(mut cmd: Command) -> String {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let sum = Command::new("sha256sum").stdin(Stdio::from(out)).output().unwrap();
    let status = child.wait_with_output().unwrap();
    assert!(status.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&status.stderr));
    assert!(sum.status.success());
    text(sum.stdout).split_whitespace().next().unwrap().to_owned()
}

#[test]
fn large_file_adds_and_dumps_like_nix() {
    if !require_peer("nix-store") || !require_peer("nix") {
        return;
    }
    const MIB: usize = 1 << 20;
    const SIZE_MIB: usize = 300;
    let s = cairn_store();
    let n = NixStore::new();
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.bin");
    {
        use std::io::Write;
        // One pseudo-random MiB, with a different counter stamped in every 4 KiB of each copy:
        // no two blocks are equal, and nothing is trivially compressible.
        let mut block = Rng::new(300).bytes(MIB);
        let mut f = std::io::BufWriter::with_capacity(MIB, std::fs::File::create(&big).unwrap());
        for i in 0..SIZE_MIB {
            for (j, page) in block.chunks_mut(4096).enumerate() {
                page[..8].copy_from_slice(&((i * 256 + j) as u64).to_le_bytes());
            }
            f.write_all(&block).unwrap();
        }
        f.write_all(b"odd tail").unwrap();
        f.write_all(b"!").unwrap();
        f.into_inner().unwrap().sync_all().unwrap();
    }
    let cp = line(&s.ok(&["add", utf8(&big)]));
    let np = line(&text(n.ok("nix-store", &["--add", utf8(&big)])));
    assert_eq!(cp, np, "store path of a {SIZE_MIB} MiB file");
    let c = &cairn_info(&s, &[&cp], false)[&cp];
    let x = &nix_info(&n, &[&np], false)[&np];
    assert_same_info("large file", c, x);
    assert_eq!(c["ca"], x["ca"]);
    assert!(x["narSize"].as_u64().unwrap() > (SIZE_MIB * MIB) as u64);
    let mut cairn_dump = s.cairn();
    cairn_dump.args(["nar", "dump", &cp]);
    let mut nix_dump = n.cmd("nix-store");
    nix_dump.arg("--dump").arg(nix_real_path(&n, &np));
    assert_eq!(stream_sha256(cairn_dump), stream_sha256(nix_dump), "SHA-256 of the dumps of {cp}");
}

// ---------------------------------------------------------------------------------------------
// 3. Export and import, both ways

fn nix_expr(name: &str) -> String {
    format!("{}/../nix/tests/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Evaluates a test expression with `nix-instantiate --eval --json` (writing `toFile` paths).
fn nix_eval(n: &NixStore, file: &str, args: &[&str]) -> Value {
    let expr = nix_expr(file);
    let mut a = vec!["--eval", "--read-write-mode", "--strict", "--json"];
    a.extend_from_slice(args);
    a.push(&expr);
    serde_json::from_slice(&n.ok("nix-instantiate", &a)).unwrap()
}

/// A small random tree for closures.
fn small_tree(parent: &Path, name: &str, seed: u64) -> PathBuf {
    let root = parent.join(name);
    std::fs::create_dir(&root).unwrap();
    random_tree(&mut Rng::new(seed), &root, 0);
    std::fs::create_dir_all(root.join("bin")).unwrap();
    write_file(&root.join("bin/tool"), b"#!/bin/sh\necho tool\n", 0o755);
    root
}

/// Builds `nix/tests/text-closure.nix` around `tree` in `n`; returns (top, tree's store path).
fn nix_text_closure(n: &NixStore, tree: &Path) -> (String, String) {
    let tp = line(&text(n.ok("nix-store", &["--add", utf8(tree)])));
    let top = nix_eval(n, "text-closure.nix", &["--argstr", "tree", &tp]);
    (top.as_str().unwrap().to_owned(), tp)
}

fn nix_closure(n: &NixStore, top: &str) -> Vec<String> {
    lines(&text(n.ok("nix-store", &["-qR", top])))
}

/// Asserts that every path of `order` comes after the paths it references.
fn assert_references_first(what: &str, order: &[String], infos: &BTreeMap<String, Value>) {
    let pos: BTreeMap<&str, usize> = order.iter().enumerate().map(|(i, p)| (p.as_str(), i)).collect();
    for (i, p) in order.iter().enumerate() {
        for r in refs(&infos[p]) {
            if &r != p {
                assert!(pos[r.as_str()] < i, "{what}: {p} comes before its reference {r}: {order:?}");
            }
        }
    }
}

#[test]
fn nix_export_imports_into_cairn() {
    if !require_peer("nix-store") || !require_peer("nix") || !require_peer("nix-instantiate") {
        return;
    }
    let s = cairn_store();
    let n = NixStore::new();
    let dir = tempfile::tempdir().unwrap();
    let tree = small_tree(dir.path(), "closure-tree", 7);
    let (top, tree_path) = nix_text_closure(&n, &tree);
    let closure = nix_closure(&n, &top);
    assert_eq!(closure.len(), 5, "tree, a, b, c, top: {closure:?}");
    assert!(closure.contains(&tree_path));

    let mut args = vec!["--export"];
    args.extend(closure.iter().map(String::as_str));
    let stream = n.ok("nix-store", &args);
    let imported = lines(&text(s.ok_bytes(&["import"], &stream)));
    assert_eq!(
        imported.iter().collect::<BTreeSet<_>>(),
        closure.iter().collect::<BTreeSet<_>>(),
        "cairn import prints the imported paths"
    );

    let nix = nix_info(&n, &[&top], true);
    let cairn = cairn_info(&s, &[&top], true);
    assert_same_infos("nix-store --export | cairn import", &cairn, &nix);
    // One path at a time too.
    for p in &closure {
        assert_same_info("cairn path-info", &cairn_info(&s, &[p], false)[p], &nix[p]);
    }

    // The closure is the same set, and cairn lists it dependencies first.
    let cairn_closure = lines(&s.ok(&["closure", &top]));
    assert_eq!(cairn_closure.iter().collect::<BTreeSet<_>>(), closure.iter().collect::<BTreeSet<_>>());
    assert_references_first("cairn closure", &cairn_closure, &nix);

    // The imported bytes are Nix's, and exporting one path gives the stream Nix gives.
    for p in &closure {
        assert_nar_eq(
            &format!("cairn nar dump {p} after import"),
            &s.ok_bytes(&["nar", "dump", p], b""),
            &nix_dump(&n, &nix_real_path(&n, p)),
        );
        assert_nar_eq(
            &format!("cairn export {p} vs nix-store --export {p}"),
            &s.ok_bytes(&["export", p], b""),
            &n.ok("nix-store", &["--export", p]),
        );
    }

    // Importing the same stream again changes nothing.
    let before = s.store_entries();
    s.ok_bytes(&["import"], &stream);
    assert_eq!(s.store_entries(), before);
}

#[test]
fn cairn_export_imports_into_nix() {
    if !require_peer("nix-store") || !require_peer("nix") || !require_peer("nix-instantiate") {
        return;
    }
    let s = cairn_store();
    let dir = tempfile::tempdir().unwrap();
    let tree = small_tree(dir.path(), "closure-tree", 11);

    // The closure as Nix builds it from nix/tests/text-closure.nix …
    let eval = NixStore::new();
    let (top, tree_path) = nix_text_closure(&eval, &tree);
    let reference = nix_info(&eval, &[&top], true);
    let closure = nix_closure(&eval, &top);

    // … made again in cairn with `add` and `add-text --ref`, from the same files: the same paths.
    let mut made = BTreeSet::new();
    while made.len() < reference.len() {
        let before = made.len();
        for (p, info) in &reference {
            if made.contains(p) || !refs(info).iter().all(|r| made.contains(r)) {
                continue;
            }
            let ca = info["ca"].as_str().unwrap_or_default();
            let got = if ca.starts_with("text:") {
                let name = p.rsplit_once('/').unwrap().1.split_once('-').unwrap().1;
                let file = nix_real_path(&eval, p);
                let mut args = vec!["add-text".to_owned(), name.to_owned(), utf8(&file).to_owned()];
                for r in refs(info) {
                    args.extend(["--ref".to_owned(), r]);
                }
                line(&s.ok(&args.iter().map(String::as_str).collect::<Vec<_>>()))
            } else {
                assert_eq!(p, &tree_path, "{ca}");
                line(&s.ok(&["add", utf8(&tree)]))
            };
            assert_eq!(&got, p, "cairn makes the path Nix made ({ca})");
            made.insert(got);
        }
        assert!(made.len() > before, "no progress: {made:?} of {:?}", reference.keys());
    }
    let cairn = cairn_info(&s, &[&top], true);
    assert_same_infos("cairn add/add-text vs Nix", &cairn, &reference);
    for (p, c) in &cairn {
        assert_eq!(c["ca"], reference[p]["ca"], "content address of {p}");
    }

    // `cairn closure` is `nix-store -qR`, dependencies first.
    let cairn_closure = lines(&s.ok(&["closure", &top]));
    assert_eq!(cairn_closure.iter().collect::<BTreeSet<_>>(), closure.iter().collect::<BTreeSet<_>>());
    assert_references_first("cairn closure", &cairn_closure, &reference);

    // `cairn export $(cairn closure TOP)` into a fresh Nix store.
    let mut args = vec!["export"];
    args.extend(cairn_closure.iter().map(String::as_str));
    let stream = s.ok_bytes(&args, b"");
    let fresh = NixStore::new();
    let imported = lines(&text(fresh.ok_stdin("nix-store", &["--import"], &stream)));
    assert_eq!(imported.iter().collect::<BTreeSet<_>>(), closure.iter().collect::<BTreeSet<_>>());
    let nix = nix_info(&fresh, &[&top], true);
    assert_same_infos("cairn export | nix-store --import", &cairn, &nix);
    assert_eq!(lines(&text(fresh.ok("nix-store", &["-qR", &top]))).len(), closure.len());
    // Nix re-reads every imported path and finds the recorded hashes.
    let verify = fresh.cmd("nix-store").args(["--verify", "--check-contents"]).output().unwrap();
    let err = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && !err.contains("error"), "nix-store --verify --check-contents:\n{err}");
    for p in &closure {
        assert_nar_eq(
            &format!("nix-store --dump of imported {p}"),
            &nix_dump(&fresh, &nix_real_path(&fresh, p)),
            &s.ok_bytes(&["nar", "dump", p], b""),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A stream whose reference is missing

#[test]
fn import_with_missing_reference_fails_and_registers_nothing() {
    if !require_peer("nix-store") || !require_peer("nix") || !require_peer("nix-instantiate") {
        return;
    }
    let s = cairn_store();
    let n = NixStore::new();
    let dir = tempfile::tempdir().unwrap();
    let v = nix_eval(&n, "missing-ref.nix", &[]);
    let (dep, referrer) = (v["dep"].as_str().unwrap(), v["referrer"].as_str().unwrap());
    assert_eq!(refs(&nix_info(&n, &[referrer], false)[referrer]), BTreeSet::from([dep.to_owned()]));
    let other = dir.path().join("unrelated");
    write_file(&other, b"unrelated\n", 0o644);
    let other = line(&text(n.ok("nix-store", &["--add", utf8(&other)])));

    let before = s.store_entries();
    assert!(before.is_empty(), "{before:?}");
    // Only the referrer.
    let alone = n.ok("nix-store", &["--export", referrer]);
    let err = s.fail(&["import"], &alone);
    assert!(err.contains(referrer) && err.contains(dep), "the error names the path and its missing reference: {err}");
    assert_eq!(s.store_entries(), before, "nothing registered");
    assert!(s.fail(&["path-info", referrer], b"").contains("referrer"));
    // With a valid, unrelated path in the same stream: all or nothing.
    let mixed = n.ok("nix-store", &["--export", &other, referrer]);
    s.fail(&["import"], &mixed);
    assert_eq!(s.store_entries(), before, "nothing registered");

    // Once the reference is in cairn, the same stream imports.
    s.ok_bytes(&["import"], &n.ok("nix-store", &["--export", dep]));
    s.ok_bytes(&["import"], &alone);
    let cairn = cairn_info(&s, &[referrer], true);
    assert_same_infos("import after its reference", &cairn, &nix_info(&n, &[referrer], true));
}

// ---------------------------------------------------------------------------------------------
// The nix/ directory

fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            nix_files(&p, out);
        } else if p.extension() == Some(OsStr::new("nix")) {
            out.push(p);
        }
    }
}

#[test]
fn nix_expressions_parse() {
    if !require_peer("nix-store") || !require_peer("nix-instantiate") {
        return;
    }
    let n = NixStore::new();
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../nix"));
    let mut files = Vec::new();
    nix_files(root, &mut files);
    files.sort();
    for expected in ["package.nix", "module.nix", "config-toml.nix", "tests/text-closure.nix", "tests/missing-ref.nix"]
    {
        assert!(files.contains(&root.join(expected)), "nix/{expected} is missing: {files:?}");
    }
    for f in &files {
        n.ok("nix-instantiate", &["--parse", utf8(f)]);
    }
}

/// The configuration module.nix writes (via config-toml.nix) is one cairnd accepts.
#[test]
fn module_config_is_accepted_by_cairnd() {
    if !require_peer("nix-store") || !require_peer("nix-instantiate") {
        return;
    }
    let n = NixStore::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let socket = dir.path().join("socket");
    let toml =
        nix_eval(&n, "module-config.nix", &["--argstr", "root", utf8(&root), "--argstr", "socket", utf8(&socket)]);
    let toml = toml.as_str().unwrap();
    for key in ["store-dir", "root", "socket", "allowed-users", "trusted-users", "auto-start-daemon", "log-level"] {
        assert!(toml.lines().any(|l| l.starts_with(&format!("{key} = "))), "{key} in:\n{toml}");
    }
    let mut s = TestStore::builder().store_dir("/nix/store").config(toml).start();
    assert!(!s.ok(&["version"]).is_empty());
    s.stop();
}
