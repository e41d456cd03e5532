//! End-to-end behaviour a user relies on: the real `cairnd`, driven by the real `cairn`.
//!
//! Expected values are computed independently of the daemon where possible: NARs of source
//! trees are built here with `NarWriter` from a walk of the file system, and hashed here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cairn_nix::hash::Encoding;
use cairn_nix::nar::NarWriter;
use cairn_nix::{Hash, HashAlgo};
use cairn_tests::{bin_dir, line, world_readable_tempdir, write, write_exec, TestStore};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers

use cairn_tests::utf8 as s;

/// The NAR of a local tree, built here (independently of cairn-store's dumper).
fn nar_of(path: &Path) -> Vec<u8> {
    fn node(w: &mut NarWriter<&mut Vec<u8>>, path: &Path, name: Option<&[u8]>) {
        let meta = fs::symlink_metadata(path).unwrap();
        if meta.file_type().is_symlink() {
            let t = fs::read_link(path).unwrap();
            w.symlink(name, t.as_os_str().as_bytes()).unwrap();
        } else if meta.is_dir() {
            let mut names: Vec<Vec<u8>> =
                fs::read_dir(path).unwrap().map(|e| e.unwrap().file_name().as_bytes().to_vec()).collect();
            names.sort();
            w.begin_directory(name).unwrap();
            for n in names {
                node(w, &path.join(std::ffi::OsStr::from_bytes(&n)), Some(&n));
            }
            w.end_directory().unwrap();
        } else {
            let data = fs::read(path).unwrap();
            w.regular(name, meta.mode() & 0o100 != 0, data.len() as u64, &mut &data[..]).unwrap();
        }
    }
    let mut out = Vec::new();
    let mut w = NarWriter::new(&mut out).unwrap();
    node(&mut w, path, None);
    w.finish().unwrap();
    out
}

fn sha256(data: &[u8]) -> Hash {
    Hash::digest(HashAlgo::Sha256, data)
}

fn sri(data: &[u8]) -> String {
    sha256(data).to_sri()
}

fn lines(out: &str) -> Vec<String> {
    out.lines().map(str::to_owned).collect()
}

fn base(p: &str) -> &str {
    p.rsplit('/').next().unwrap()
}

use cairn_tests::json;

fn path_infos(st: &TestStore, paths: &[&str]) -> BTreeMap<String, Value> {
    let mut args = vec!["path-info", "--json"];
    args.extend_from_slice(paths);
    let v = json(&st.ok(&args));
    v.as_array().unwrap().iter().map(|i| (i["path"].as_str().unwrap().to_owned(), i.clone())).collect()
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect()
}

/// Asserts that every path comes after those of its references that are in the list.
fn assert_dependencies_first(order: &[String], infos: &BTreeMap<String, Value>) {
    let pos: HashMap<&str, usize> = order.iter().enumerate().map(|(i, p)| (p.as_str(), i)).collect();
    for (i, p) in order.iter().enumerate() {
        for r in str_list(&infos[p]["references"]) {
            if let Some(&j) = pos.get(r.as_str()) {
                assert!(j < i || r == *p, "{r} must come before its referrer {p} in {order:#?}");
            }
        }
    }
}

/// A store path printed by cairn: `/store/<32 nixbase32 chars>-<name>`.
fn assert_store_path(p: &str, store_dir: &str, name: &str) {
    let b = p.strip_prefix(&format!("{store_dir}/")).unwrap_or_else(|| panic!("{p} is not in {store_dir}"));
    let (h, n) = b.split_at(32);
    assert!(h.bytes().all(|c| b"0123456789abcdfghijklmnpqrsvwxyz".contains(&c)), "hash part of {p}");
    assert_eq!(n, format!("-{name}"), "{p}");
}

fn assert_one_line_failure(out: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{what} should fail with 1; stderr:\n{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "errors are one line:\n{err}");
    assert!(err.starts_with("cairn: "), "{err}");
    err
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

// ---------------------------------------------------------------------------------------------
// The CLI tour

/// Sources used by the tour: a tree with an executable, a symlink and an empty directory, a
/// text file and a binary file.
fn tour_sources(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let tree = d.join("hello-tree");
    write_exec(&tree.join("bin/hello"), b"#!/bin/sh\necho hello\n");
    write(&tree.join("share/doc/README"), b"read me\n");
    std::os::unix::fs::symlink("../share/doc/README", tree.join("bin/readme")).unwrap();
    fs::create_dir_all(tree.join("empty")).unwrap();
    let file = d.join("notes.txt");
    write(&file, b"just a file\n");
    let bin = d.join("data.bin");
    write(&bin, &(0..=255u8).cycle().take(5000).collect::<Vec<u8>>());
    (tree, file, bin)
}

#[test]
fn cli_tour() {
    let st = TestStore::start();
    let src = tempfile::tempdir().unwrap();
    let (tree, file, bin) = tour_sources(src.path());

    // add: files and trees, several at once, printed in argument order.
    let added = lines(&st.ok(&["add", s(&tree), s(&file), s(&bin)]));
    assert_eq!(added.len(), 3, "{added:?}");
    let (tree_p, file_p, bin_p) = (added[0].clone(), added[1].clone(), added[2].clone());
    assert_store_path(&tree_p, "/store", "hello-tree");
    assert_store_path(&file_p, "/store", "notes.txt");
    assert_store_path(&bin_p, "/store", "data.bin");
    // Adding again is idempotent; --name renames.
    assert_eq!(line(&st.ok(&["add", s(&tree)])), tree_p);
    let renamed = line(&st.ok(&["add", "--name", "other-name", s(&file)]));
    assert_store_path(&renamed, "/store", "other-name");
    assert_ne!(base(&renamed)[..32], base(&file_p)[..32], "the name is part of the hash");
    st.fail(&["add", "--name", "x", s(&file), s(&bin)], b"");

    // The contents are on disk, canonical.
    let real_tree = st.real_store_dir().join(base(&tree_p));
    assert_eq!(fs::read(real_tree.join("bin/hello")).unwrap(), b"#!/bin/sh\necho hello\n");
    let m = fs::metadata(real_tree.join("bin/hello")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o555);
    assert_eq!(m.mtime(), 1);
    assert_eq!(fs::metadata(real_tree.join("share/doc/README")).unwrap().mode() & 0o7777, 0o444);
    assert_eq!(fs::read_link(real_tree.join("bin/readme")).unwrap(), Path::new("../share/doc/README"));

    // path-info --json: Nix's field names, and hashes computed here.
    let infos = path_infos(&st, &[&tree_p, &file_p, &bin_p]);
    for (p, src_path) in [(&tree_p, &tree), (&file_p, &file), (&bin_p, &bin)] {
        let i = &infos[p.as_str()];
        let nar = nar_of(src_path);
        assert_eq!(i["narHash"], sri(&nar), "{p}");
        assert_eq!(i["narSize"], nar.len() as u64, "{p}");
        assert_eq!(i["references"], serde_json::json!([]), "{p}");
        assert!(i["registrationTime"].as_i64().unwrap() > 1_600_000_000, "{i}");
        assert_eq!(i["ca"], format!("fixed:r:{}", sha256(&nar).to_prefixed(Encoding::Nix32)), "{i}");
        for key in ["narHash", "narSize", "references", "registrationTime", "ca", "path"] {
            assert!(i.get(key).is_some(), "{key} missing in {i}");
        }
    }
    // Plain path-info: path, size, hash per line.
    let plain = st.ok(&["path-info", &tree_p, &bin_p]);
    let want = format!(
        "{tree_p}\t{}\t{}\n{bin_p}\t{}\t{}\n",
        infos[&tree_p]["narSize"],
        infos[&tree_p]["narHash"].as_str().unwrap(),
        infos[&bin_p]["narSize"],
        infos[&bin_p]["narHash"].as_str().unwrap()
    );
    assert_eq!(plain, want);

    // add --flat: a flat fixed-output path, hashed over the bytes.
    let flat_p = line(&st.ok(&["add", "--flat", s(&bin)]));
    assert_store_path(&flat_p, "/store", "data.bin");
    assert_ne!(flat_p, bin_p, "flat and recursive paths differ");
    let bytes = fs::read(&bin).unwrap();
    let fi = &path_infos(&st, &[&flat_p])[&flat_p];
    assert_eq!(fi["ca"], format!("fixed:{}", sha256(&bytes).to_prefixed(Encoding::Nix32)));
    assert_eq!(fi["narHash"], sri(&nar_of(&bin)));
    assert_eq!(st.ok_bytes(&["cat", &flat_p], b""), bytes);
    let e = st.fail(&["add", "--flat", s(&tree)], b"");
    assert!(e.contains("--flat") && e.contains("hello-tree"), "{e}");

    // add-text with references, from a file and from stdin.
    let text1 = format!("the program is {tree_p}/bin/hello\n");
    let t1_src = src.path().join("t1");
    write(&t1_src, text1.as_bytes());
    let t1 = line(&st.ok(&["add-text", "greeting", s(&t1_src), "--ref", &tree_p]));
    assert_store_path(&t1, "/store", "greeting");
    let text2 = format!("{t1} and {flat_p}\n");
    let t2 = line(
        &String::from_utf8(st.ok_bytes(&["add-text", "top", "-", "--ref", &t1, "--ref", &flat_p], text2.as_bytes()))
            .unwrap(),
    );
    assert_store_path(&t2, "/store", "top");
    assert_eq!(st.ok(&["cat", &t2]), text2);
    let ti = path_infos(&st, &[&t1, &t2]);
    assert_eq!(ti[&t1]["ca"], format!("text:{}", sha256(text1.as_bytes()).to_prefixed(Encoding::Nix32)));
    assert_eq!(str_list(&ti[&t1]["references"]), std::slice::from_ref(&tree_p));
    let mut t2_refs = vec![t1.clone(), flat_p.clone()];
    t2_refs.sort();
    assert_eq!(str_list(&ti[&t2]["references"]), t2_refs);
    // The same text without the reference is another path.
    let t1_noref = line(&st.ok(&["add-text", "greeting", s(&t1_src)]));
    assert_ne!(t1_noref, t1);
    // Refused references: well-formed but not valid, and not a store path at all.
    let missing = format!("/store/{}-missing", "0".repeat(32));
    let e = st.fail(&["add-text", "bad", s(&t1_src), "--ref", &missing], b"");
    assert!(e.contains(&missing) && e.contains("not valid"), "{e}");
    let e = st.fail(&["add-text", "bad", s(&t1_src), "--ref", "/etc/passwd"], b"");
    assert!(e.contains("/etc/passwd") && e.contains("not in the store"), "{e}");
    let e = st.fail(&["add-text", "bad", s(&t1_src), "--ref", "/store/short"], b"");
    assert!(e.contains("short"), "{e}");

    // references / referrers.
    assert_eq!(lines(&st.ok(&["references", &t2])), t2_refs);
    assert_eq!(str_list(&json(&st.ok(&["references", "--json", &t2]))), t2_refs);
    assert_eq!(st.ok(&["references", &tree_p]), "");
    assert_eq!(lines(&st.ok(&["referrers", &tree_p])), std::slice::from_ref(&t1));
    assert_eq!(lines(&st.ok(&["referrers", &flat_p])), std::slice::from_ref(&t2));
    assert_eq!(st.ok(&["referrers", &t2]), "");

    // closure: dependencies first.
    let all_infos = path_infos(&st, &[&tree_p, &flat_p, &t1, &t2]);
    let closure = lines(&st.ok(&["closure", &t2]));
    assert_eq!(
        closure.iter().cloned().collect::<BTreeSet<_>>(),
        [&tree_p, &flat_p, &t1, &t2].into_iter().cloned().collect()
    );
    assert_eq!(closure.len(), 4, "{closure:?}");
    assert_dependencies_first(&closure, &all_infos);
    assert_eq!(closure.last().unwrap(), &t2);
    assert_eq!(lines(&st.ok(&["requisites", &t1])), [tree_p.clone(), t1.clone()]);
    assert_eq!(lines(&st.ok(&["closure", &bin_p])), std::slice::from_ref(&bin_p));
    assert_eq!(str_list(&json(&st.ok(&["closure", "--json", &t2]))), closure);

    // path-info --closure.
    let ci = json(&st.ok(&["path-info", "--closure", "--json", &t2]));
    let ci_paths: Vec<String> = ci.as_array().unwrap().iter().map(|i| i["path"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ci_paths.iter().cloned().collect::<BTreeSet<_>>(), closure.iter().cloned().collect());
    assert_eq!(lines(&st.ok(&["path-info", "-r", &t1])).len(), 2);

    // referrers-closure: the path first, everything that needs it after what it needs.
    let rc = lines(&st.ok(&["referrers-closure", &tree_p]));
    assert_eq!(rc.iter().cloned().collect::<BTreeSet<_>>(), [&tree_p, &t1, &t2].into_iter().cloned().collect());
    assert_eq!(rc.len(), 3);
    assert_eq!(rc[0], tree_p);
    assert_dependencies_first(&rc, &all_infos);
    assert_eq!(lines(&st.ok(&["referrers-closure", &t2])), std::slice::from_ref(&t2));

    // graph --json: the closure's nodes and (reference, referrer) edges, as --dot draws them.
    let g = json(&st.ok(&["graph", "--json", &t2]));
    let nodes: BTreeSet<String> = str_list(&g["nodes"]).into_iter().collect();
    assert_eq!(nodes, closure.iter().cloned().collect());
    let edges: BTreeSet<(String, String)> = g["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_str().unwrap().to_owned(), e[1].as_str().unwrap().to_owned()))
        .collect();
    let want_edges: BTreeSet<(String, String)> =
        [(tree_p.clone(), t1.clone()), (t1.clone(), t2.clone()), (flat_p.clone(), t2.clone())].into_iter().collect();
    assert_eq!(edges, want_edges);

    // graph --dot (and the default): a digraph whose edges go from reference to referrer.
    let dot = st.ok(&["graph", "--dot", &t2]);
    assert_eq!(dot, st.ok(&["graph", &t2]), "DOT is the default");
    let dot_lines = lines(&dot);
    assert_eq!(dot_lines.first().map(String::as_str), Some("digraph G {"), "{dot}");
    assert_eq!(dot_lines.last().map(String::as_str), Some("}"), "{dot}");
    let (mut dot_nodes, mut dot_edges) = (BTreeSet::new(), BTreeSet::new());
    for l in &dot_lines[1..dot_lines.len() - 1] {
        assert!(l.ends_with("];"), "DOT statement: {l}");
        let quoted: Vec<&str> = l.split('"').collect();
        if let Some((from, to)) = l.split_once(" -> ") {
            let unq = |x: &str| x.trim().trim_matches('"').to_owned();
            let to = to.split(" [").next().unwrap();
            assert!(from.starts_with('"') && from.ends_with('"'), "{l}");
            dot_edges.insert((unq(from), unq(to)));
        } else {
            assert!(l.contains("[label = "), "{l}");
            dot_nodes.insert(quoted[1].to_owned());
        }
        assert_eq!(quoted.len() % 2, 1, "balanced quotes: {l}");
    }
    assert_eq!(dot_nodes, nodes);
    assert_eq!(dot_edges, want_edges, "--dot draws the edges --json lists: {dot}");
    assert_eq!(st.run(&["graph", "--dot", "--json", &t2], b"").status.code(), Some(2), "--dot and --json conflict");

    // ls (plain and JSON), of a directory and of a file.
    let ls = st.ok(&["ls", &tree_p]);
    let names: Vec<&str> = ls.lines().map(|l| l.rsplit(' ').next().unwrap()).collect();
    assert_eq!(names, ["bin", "empty", "share"], "{ls}");
    assert!(ls.lines().all(|l| l.starts_with("dr-xr-xr-x")), "{ls}");
    let lsb = st.ok(&["ls", &format!("{tree_p}/bin")]);
    let lsb: Vec<&str> = lsb.lines().collect();
    assert_eq!(lsb.len(), 2);
    assert!(lsb[0].starts_with("-r-xr-xr-x") && lsb[0].ends_with(" hello"), "{lsb:?}");
    assert!(lsb[0].contains(" 21 "), "size of hello: {lsb:?}");
    assert!(lsb[1].starts_with("lrwxrwxrwx") && lsb[1].ends_with(" readme -> ../share/doc/README"), "{lsb:?}");
    let lj = json(&st.ok(&["ls", "--json", &format!("{tree_p}/bin")]));
    assert_eq!(
        lj,
        serde_json::json!([
            {"name": "hello", "type": "executable", "size": 21},
            {"name": "readme", "type": "symlink", "target": "../share/doc/README"}
        ])
    );
    let lf = json(&st.ok(&["ls", "--json", &format!("{tree_p}/share/doc/README")]));
    assert_eq!(lf, serde_json::json!([{"name": "README", "type": "regular", "size": 8}]));
    assert_eq!(json(&st.ok(&["ls", "--json", &format!("{tree_p}/empty")])), serde_json::json!([]));
    let e = st.fail(&["ls", &format!("{tree_p}/nope")], b"");
    assert!(e.contains("nope"), "{e}");

    // cat.
    assert_eq!(st.ok(&["cat", &format!("{tree_p}/share/doc/README")]), "read me\n");
    assert_eq!(st.ok_bytes(&["cat", &bin_p], b""), bytes);
    let e = st.fail(&["cat", &format!("{tree_p}/share")], b"");
    assert!(e.contains("not a regular file"), "{e}");

    // nar dump → nar restore round trip of a tree.
    let nar = st.ok_bytes(&["nar", "dump", &tree_p], b"");
    assert_eq!(nar, nar_of(&tree), "the store's NAR is the source tree's");
    assert_eq!(sri(&nar), infos[&tree_p]["narHash"]);
    let restored = src.path().join("restored");
    st.ok_bytes(&["nar", "restore", s(&restored)], &nar);
    assert_eq!(nar_of(&restored), nar);
    assert_eq!(fs::read(restored.join("share/doc/README")).unwrap(), b"read me\n");
    assert!(fs::metadata(restored.join("bin/hello")).unwrap().mode() & 0o100 != 0);
    assert_eq!(fs::read_link(restored.join("bin/readme")).unwrap(), Path::new("../share/doc/README"));
    assert!(restored.join("empty").is_dir());
    // `nar dump` of a local (non-store) path is `nix-store --dump`.
    assert_eq!(st.ok_bytes(&["nar", "dump", s(&restored)], b""), nar);
    // Restoring onto an existing path is refused.
    let e = st.fail(&["nar", "restore", s(&restored)], &nar);
    assert!(e.contains("restored"), "{e}");

    // version --json.
    let v = json(&st.ok(&["version", "--json"]));
    assert_eq!(v["client"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["daemon"]["apiVersion"], 1);
    assert_eq!(v["daemon"]["daemonVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["daemon"]["storeDir"], "/store");
    assert_eq!(v["daemon"]["trusted"], true);
    let vt = st.ok(&["version"]);
    assert!(vt.contains("store /store") && vt.contains("trusted"), "{vt}");

    // export → import into a second daemon: same paths, hashes and references.
    let exported_paths = lines(&st.ok(&["closure", &t2, &bin_p]));
    let mut args = vec!["export"];
    args.extend(exported_paths.iter().map(String::as_str));
    let stream = st.ok_bytes(&args, b"");
    let other = TestStore::start();
    let imported = lines(&String::from_utf8(other.ok_bytes(&["import"], &stream)).unwrap());
    assert_eq!(
        imported.iter().cloned().collect::<BTreeSet<_>>(),
        exported_paths.iter().cloned().collect::<BTreeSet<_>>()
    );
    let refs: Vec<&str> = exported_paths.iter().map(String::as_str).collect();
    let (a, b) = (path_infos(&st, &refs), path_infos(&other, &refs));
    for p in &exported_paths {
        for key in ["path", "narHash", "narSize", "references"] {
            assert_eq!(a[p][key], b[p][key], "{key} of {p}");
        }
    }
    assert_eq!(other.ok(&["cat", &format!("{tree_p}/share/doc/README")]), "read me\n");
    assert_eq!(other.ok_bytes(&["nar", "dump", &tree_p], b""), nar);
    assert_eq!(
        other.store_entries(),
        exported_paths.iter().map(|p| base(p).to_owned()).collect::<BTreeSet<_>>().into_iter().collect::<Vec<_>>()
    );
    // Importing the same stream again is a no-op that still answers every path.
    let again = lines(&String::from_utf8(other.ok_bytes(&["import"], &stream)).unwrap());
    assert_eq!(again.len(), exported_paths.len());

    // Arguments: the physical path under the root, and symlinks to store paths (./result).
    let phys = st.real_store_dir().join(base(&tree_p));
    assert_eq!(line(&st.ok(&["path-info", s(&phys)])).split('\t').next().unwrap(), tree_p);
    assert_eq!(st.ok(&["cat", &format!("{}/share/doc/README", phys.display())]), "read me\n");
    let result = src.path().join("result");
    std::os::unix::fs::symlink(&phys, &result).unwrap();
    assert_eq!(lines(&st.ok(&["closure", s(&result)])), std::slice::from_ref(&tree_p));
    let result2 = src.path().join("result-logical");
    std::os::unix::fs::symlink(&t1, &result2).unwrap(); // dangling on the host: /store is not real
    assert_eq!(lines(&st.ok(&["references", s(&result2)])), std::slice::from_ref(&tree_p));
    let chain = src.path().join("result-chain");
    std::os::unix::fs::symlink("result", &chain).unwrap();
    assert_eq!(st.ok_bytes(&["nar", "dump", s(&chain)], b""), nar);
    let e = st.fail(&["path-info", s(&file)], b"");
    assert!(e.contains("not in the store directory"), "{e}");

    st.store_entries();
    assert!(!st.log().contains("panicked"), "{}", st.log());
}

/// `cairn cat result/share/doc/README` with `result` a symlink to a store path, as a user types
/// it after a build: the symlink is the first component of the argument, not all of it.
#[test]

fn inner_paths_through_a_result_symlink() {
    let st = TestStore::start();
    let src = tempfile::tempdir().unwrap();
    let (tree, _, _) = tour_sources(src.path());
    let tree_p = line(&st.ok(&["add", s(&tree)]));
    let result = src.path().join("result");
    std::os::unix::fs::symlink(st.real_store_dir().join(base(&tree_p)), &result).unwrap();
    let logical = src.path().join("result-logical");
    std::os::unix::fs::symlink(&tree_p, &logical).unwrap();
    for r in [&result, &logical] {
        assert_eq!(st.ok(&["cat", &format!("{}/share/doc/README", r.display())]), "read me\n");
        let ls = st.ok(&["ls", &format!("{}/share/doc", r.display())]);
        assert!(ls.trim_end().ends_with(" README"), "{ls}");
        let nar = st.ok_bytes(&["nar", "dump", &format!("{}/", r.display())], b"");
        assert_eq!(nar, nar_of(&tree));
    }
}

/// A physical store path relative to the current directory (`cd $root; cairn path-info
/// store/…-x`), as a shell user types it.
#[test]

fn relative_physical_paths() {
    let st = TestStore::start();
    let src = tempfile::tempdir().unwrap();
    let (tree, _, _) = tour_sources(src.path());
    let tree_p = line(&st.ok(&["add", s(&tree)]));
    let rel = format!("store/{}", base(&tree_p));
    let run = |args: &[&str]| {
        let out = st.cairn().current_dir(st.root.path()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "cairn {args:?} in {}: {}",
            st.root.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(line(&run(&["path-info", &rel])).split('\t').next().unwrap(), tree_p);
    assert_eq!(run(&["cat", &format!("./{rel}/share/doc/README")]), "read me\n");
    // A relative symlink given by a relative name.
    std::os::unix::fs::symlink(&rel, st.root.path().join("result")).unwrap();
    assert_eq!(line(&run(&["path-info", "result"])).split('\t').next().unwrap(), tree_p);
}

// ---------------------------------------------------------------------------------------------
// Auto-start

/// Kills a daemon this test did not spawn directly (auto-started) if the test fails.
struct DaemonGuard(Option<i32>);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Whether a process is running (a zombie is not: nobody may reap an orphan in a container).
fn running(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap().split_whitespace().next().unwrap().to_owned();
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn auto_start_starts_one_daemon_and_reuses_it() {
    let root = tempfile::Builder::new().prefix("cairn-tests-auto-").tempdir().unwrap();
    let config = root.path().join("cairn.toml");
    fs::write(&config, "").unwrap();
    let socket = root.path().join("sock");
    let cmd = |extra: &[&str]| {
        let mut c = Command::new(bin_dir().join("cairn"));
        c.arg("--root").arg(root.path()).args(["--store-dir", "/store"]).arg("--socket").arg(&socket);
        c.arg("--config").arg(&config).args(extra);
        c.stdin(Stdio::null());
        c
    };

    // --no-auto-start: a one-line error naming the socket, and no daemon.
    let out = cmd(&["--no-auto-start", "gc", "--print-roots"]).output().unwrap();
    let e = assert_one_line_failure(&out, "cairn --no-auto-start gc --print-roots");
    assert!(e.contains("no cairnd is listening") && e.contains(s(&socket)), "{e}");
    assert!(!socket.exists());
    // So does `auto-start-daemon = false` in the config file.
    fs::write(&config, "auto-start-daemon = false\n").unwrap();
    let out = cmd(&["gc", "--print-roots"]).output().unwrap();
    let e = assert_one_line_failure(&out, "cairn gc with auto-start-daemon = false");
    assert!(e.contains("no cairnd is listening"), "{e}");
    assert!(!socket.exists());
    fs::write(&config, "").unwrap();

    // Without the flag, the first command starts a daemon and says so.
    let src = root.path().join("src.txt");
    fs::write(&src, b"auto\n").unwrap();
    let out = cmd(&["add", s(&src)]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    let msg = err.lines().find(|l| l.contains("started cairnd")).unwrap_or_else(|| panic!("no start message: {err}"));
    let pid: i32 = msg
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{msg}"));
    let mut guard = DaemonGuard(Some(pid));
    assert!(msg.contains(s(&socket)), "{msg}");
    assert!(running(pid), "daemon {pid} runs");
    assert!(socket.exists());
    let path = line(&String::from_utf8(out.stdout).unwrap());
    assert_store_path(&path, "/store", "src.txt");

    // The next commands reuse it: no message, same store.
    for _ in 0..2 {
        let out = cmd(&["cat", &path]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout, b"auto\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "no second daemon");
    }
    let procs = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&p| running(p))
        .filter(|p| {
            fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(s(&socket)))
                .unwrap_or(false)
        })
        .collect::<Vec<_>>();
    assert_eq!(procs, [pid], "exactly one daemon serves the socket");
    let log = root.path().join("var/lib/cairn/cairnd.log");
    assert!(fs::read_to_string(&log).unwrap().contains("listening"), "log in {}", log.display());

    // Stop it: it removes its socket and exits.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_for("the auto-started daemon to exit", Duration::from_secs(30), || !running(pid));
    guard.0 = None;
    assert!(!socket.exists(), "socket removed on SIGTERM");
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(root.path()).status();
}

// ---------------------------------------------------------------------------------------------
// Concurrency

#[test]
fn concurrent_adds_of_overlapping_content() {
    const THREADS: usize = 16;
    const ITERATIONS: usize = 4;
    const SHARED: usize = 3;
    let st = TestStore::start();
    let src = tempfile::tempdir().unwrap();
    // Every thread has its own copy of the shared trees (same name, same contents).
    let make_tree = |dir: &Path, seed: &str| {
        write(&dir.join("a"), format!("a {seed}\n").as_bytes());
        write(&dir.join("sub/b"), format!("b {seed}\n").repeat(100).as_bytes());
        write_exec(&dir.join("sub/run"), b"#!/bin/sh\n");
        std::os::unix::fs::symlink("sub/b", dir.join("link")).unwrap();
    };
    for t in 0..THREADS {
        for k in 0..SHARED {
            make_tree(&src.path().join(format!("t{t}/shared-{k}")), &format!("shared {k}"));
        }
        for i in 0..ITERATIONS {
            make_tree(&src.path().join(format!("t{t}/distinct-{t}-{i}")), &format!("distinct {t} {i}"));
        }
        write(&src.path().join(format!("t{t}/flat")), b"the same flat file\n");
    }
    let results: Vec<Vec<(String, String)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (st, src) = (&st, src.path());
                scope.spawn(move || {
                    let mut got = Vec::new();
                    for i in 0..ITERATIONS {
                        let dir = src.join(format!("t{t}"));
                        let names = [
                            format!("shared-{}", (t + i) % SHARED),
                            format!("distinct-{t}-{i}"),
                            format!("shared-{}", (t + i + 1) % SHARED),
                        ];
                        let args: Vec<String> = std::iter::once("add".to_owned())
                            .chain(names.iter().map(|n| dir.join(n).display().to_string()))
                            .collect();
                        let args: Vec<&str> = args.iter().map(String::as_str).collect();
                        let out = lines(&st.ok(&args));
                        assert_eq!(out.len(), 3, "{out:?}");
                        got.extend(names.iter().cloned().zip(out));
                        let flat = line(&st.ok(&["add", "--flat", s(&dir.join("flat"))]));
                        got.push(("flat".to_owned(), flat));
                    }
                    got
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("adding thread")).collect()
    });

    let mut by_tree: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, path) in results.into_iter().flatten() {
        by_tree.entry(name).or_default().insert(path);
    }
    assert_eq!(by_tree.len(), SHARED + THREADS * ITERATIONS + 1);
    for (name, paths) in &by_tree {
        assert_eq!(paths.len(), 1, "identical trees {name} got one path each: {paths:?}");
    }
    let all: BTreeSet<String> = by_tree.values().flatten().cloned().collect();
    assert_eq!(all.len(), by_tree.len(), "distinct trees have distinct paths");
    // Every path is valid and its contents match its recorded hash.
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let infos = path_infos(&st, &refs);
    assert_eq!(infos.len(), all.len());
    for (name, paths) in &by_tree {
        let p = paths.iter().next().unwrap();
        let dumped = st.ok_bytes(&["nar", "dump", p], b"");
        assert_eq!(sri(&dumped), infos[p]["narHash"], "{p}");
        let source = match name.strip_prefix("distinct-") {
            Some(rest) => src.path().join(format!("t{}", rest.split('-').next().unwrap())).join(name),
            None if name == "flat" => src.path().join("t0/flat"),
            None => src.path().join("t0").join(name),
        };
        if name == "flat" {
            assert_eq!(st.ok_bytes(&["cat", p], b""), fs::read(&source).unwrap());
        } else {
            assert_eq!(dumped, nar_of(&source), "{name}");
        }
    }
    // On disk: exactly these paths, and no temporary leftovers.
    let mut want: Vec<String> = all.iter().map(|p| base(p).to_owned()).collect();
    want.sort();
    assert_eq!(st.store_entries(), want);
    assert!(!st.log().contains("panicked"), "{}", st.log());
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown and restart

#[test]
fn sigterm_while_idle_exits_cleanly_and_restart_keeps_paths() {
    let mut st = TestStore::start();
    let src = tempfile::tempdir().unwrap();
    let (tree, file, bin) = tour_sources(src.path());
    let added = lines(&st.ok(&["add", s(&tree), s(&file)]));
    let flat = line(&st.ok(&["add", "--flat", s(&bin)]));
    let t = src.path().join("t");
    write(&t, format!("{}\n", added[0]).as_bytes());
    let text = line(&st.ok(&["add-text", "text", s(&t), "--ref", &added[0]]));
    let mut paths = added.clone();
    paths.push(flat);
    paths.push(text.clone());
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let before = path_infos(&st, &refs);
    let entries = st.store_entries();

    st.stop(); // asserts exit status 0
    assert!(!st.socket.exists(), "the socket is removed on SIGTERM");
    assert!(st.log().contains("SIGTERM") && st.log().contains("stopped"), "{}", st.log());
    let out = st.run(&["gc", "--print-roots"], b"");
    assert_eq!(out.status.code(), Some(1), "nothing listens after the stop");

    st.restart();
    assert_eq!(path_infos(&st, &refs), before, "every path and its metadata survive a restart");
    assert_eq!(st.store_entries(), entries);
    for p in &paths {
        assert_eq!(sri(&st.ok_bytes(&["nar", "dump", p], b"")), before[p]["narHash"], "{p}");
    }
    assert_eq!(lines(&st.ok(&["referrers", &added[0]])), std::slice::from_ref(&text), "the reference graph survives");
    assert_eq!(lines(&st.ok(&["closure", &text])), [added[0].clone(), text.clone()]);
    // Stop and start once more, with the graph loaded this time.
    st.stop();
    st.restart();
    assert_eq!(path_infos(&st, &refs), before);
    st.stop();
}

// ---------------------------------------------------------------------------------------------
// Crash safety

/// Bytes of the temporary copies the daemon has written so far (allocated blocks: files are
/// pre-sized, so their length says nothing).
fn tmp_progress(st: &TestStore) -> Option<u64> {
    fn walk(p: &Path, total: &mut u64, found: &mut bool) {
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                *found = true;
                if let Ok(m) = e.path().symlink_metadata() {
                    *total += m.blocks() * 512;
                    if m.is_dir() {
                        walk(&e.path(), total, found);
                    }
                }
            }
        }
    }
    let (mut total, mut found) = (0, false);
    walk(&st.real_store_dir().join(".cairn-tmp"), &mut total, &mut found);
    found.then_some(total)
}

#[test]
fn sigkill_during_a_large_add_leaves_a_consistent_store() {
    const BIG: u64 = 200 << 20;
    let mut st = TestStore::start();
    let src = tempfile::tempdir().unwrap();
    let (tree, file, _) = tour_sources(src.path());
    let before_paths = lines(&st.ok(&["add", s(&tree), s(&file)]));
    let refs: Vec<&str> = before_paths.iter().map(String::as_str).collect();
    let before = path_infos(&st, &refs);

    // A 200 MB tree: one big file of varied bytes and a small one.
    let big = src.path().join("big");
    fs::create_dir(&big).unwrap();
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(fs::File::create(big.join("blob")).unwrap());
        let mut chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for i in 0..(BIG >> 20) {
            chunk[0] = i as u8;
            chunk[1 << 19] = (i >> 8) as u8;
            f.write_all(&chunk).unwrap();
        }
        f.flush().unwrap();
    }
    write(&big.join("small"), b"small\n");
    let big_hash = &serde_json::json!(sri(&nar_of(&big)));

    let mut entries = st.store_entries();
    let mut crashed = 0;
    for fraction in [0u64, 10, 45, 80] {
        let mut child = st
            .cairn()
            .args(["add", s(&big)])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the daemon has written `fraction` % of the blob into its temporary area.
        let threshold = BIG * fraction / 100;
        let start = Instant::now();
        let mut finished = false;
        loop {
            if tmp_progress(&st).is_some_and(|n| n >= threshold) {
                break;
            }
            if child.try_wait().unwrap().is_some() {
                finished = true;
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "the add made no progress:\n{}", st.log());
            std::thread::sleep(Duration::from_millis(2));
        }
        st.crash();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            // The add won the race: then its path must survive.
            finished = true;
        } else {
            crashed += 1;
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(err.trim_end().lines().last().unwrap_or("").starts_with("cairn: "), "{err}");
        }
        st.restart();
        let now = st.store_entries(); // asserts no temporary leftovers
        let added_path = finished.then(|| line(&String::from_utf8_lossy(&out.stdout)));
        // A new entry is either registered and complete (the kill came after the commit), or
        // an unregistered leftover that cairn must not report as valid and that the next add
        // replaces. Never a registered partial path.
        for e in now.iter().filter(|e| !entries.contains(e)) {
            let p = format!("/store/{e}");
            let out = st.run(&["path-info", "--json", &p], b"");
            if out.status.success() {
                let info = &json(&String::from_utf8_lossy(&out.stdout))[0];
                assert_eq!(info["narHash"], *big_hash, "{p} is registered but is not the whole tree");
                let dumped = st.ok_bytes(&["nar", "dump", &p], b"");
                assert_eq!(sri(&dumped), *big_hash, "{p} is registered but its contents are partial");
            } else {
                assert!(added_path.as_ref() != Some(&p), "{p} was reported added but is not valid");
            }
        }
        assert_eq!(path_infos(&st, &refs), before, "earlier paths are intact");
        for p in &before_paths {
            assert_eq!(sri(&st.ok_bytes(&["nar", "dump", p], b"")), before[p]["narHash"]);
        }
        entries = now;
    }
    assert!(crashed >= 2, "the daemon should have been killed mid-add at least twice, was {crashed} times");

    // Afterwards the same tree adds fine, and its contents are right.
    let p = line(&st.ok(&["add", s(&big)]));
    assert_store_path(&p, "/store", "big");
    let info = &path_infos(&st, &[&p])[&p];
    let dumped = st.ok_bytes(&["nar", "dump", &p], b"");
    assert_eq!(info["narSize"], dumped.len() as u64, "{info}");
    assert!(dumped.len() as u64 > BIG);
    assert_eq!(sri(&dumped), info["narHash"]);
    assert_eq!(dumped, nar_of(&big));
    assert_eq!(st.ok(&["cat", &format!("{p}/small")]), "small\n");
    let final_entries = st.store_entries();
    for e in &final_entries {
        let out = st.run(&["path-info", &format!("/store/{e}")], b"");
        assert!(out.status.success(), "{e} is on disk but not valid after a successful add");
    }
    st.stop();
}

// ---------------------------------------------------------------------------------------------
// Authorisation by peer credentials

#[test]
fn unprivileged_users_by_peer_credentials() {
    if !is_root() {
        eprintln!("skipping: needs root to run cairn as another user with setpriv");
        return;
    }
    if !cairn_tests::require_peer("setpriv") {
        return;
    }
    let st = TestStore::start();
    let src = world_readable_tempdir();
    let f = src.path().join("public.txt");
    fs::write(&f, b"for everyone\n").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();

    // Default config: anyone may add and query, not import.
    let out = st.run_as_nobody(&["add", s(&f)], b"");
    assert!(out.status.success(), "nobody's add: {}", String::from_utf8_lossy(&out.stderr));
    let p = line(&String::from_utf8(out.stdout).unwrap());
    assert_store_path(&p, "/store", "public.txt");
    assert_eq!(line(&st.ok(&["add", s(&f)])), p, "the same path as root's add");
    let out = st.run_as_nobody(&["cat", &p], b"");
    assert!(out.status.success());
    assert_eq!(out.stdout, b"for everyone\n");
    let out = st.run_as_nobody(&["path-info", "--json", &p], b"");
    assert!(out.status.success());
    assert_eq!(json(&String::from_utf8(out.stdout).unwrap())[0]["path"], p);
    let out = st.run_as_nobody(&["version", "--json"], b"");
    assert!(out.status.success());
    assert_eq!(json(&String::from_utf8(out.stdout).unwrap())["daemon"]["trusted"], false);
    let out = st.run_as_nobody(&["export", &p], b"");
    assert!(out.status.success(), "untrusted users may export");
    let stream = out.stdout;
    assert_eq!(stream, st.ok_bytes(&["export", &p], b""));

    // import needs trust: a stream of a new path is refused and nothing is registered.
    let other = TestStore::start();
    let g = src.path().join("other.txt");
    fs::write(&g, b"other\n").unwrap();
    let q = line(&other.ok(&["add", s(&g)]));
    let stream_q = other.ok_bytes(&["export", &q], b"");
    let entries = st.store_entries();
    // With an empty stdin the refusal cannot race with the upload of the stream (see
    // `refusal_of_a_large_untrusted_import_names_the_reason` for what happens when it does).
    let out = st.run_as_nobody(&["import"], b"");
    let e = assert_one_line_failure(&out, "nobody's import");
    assert!(e.contains("trusted-users") && e.contains("nobody"), "{e}");
    let out = st.run_as_nobody(&["import"], &stream_q);
    assert_eq!(out.status.code(), Some(1), "nobody's import of a stream: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(st.store_entries(), entries);
    assert!(!st.run(&["path-info", &q], b"").status.success());
    // Root (trusted) can.
    assert_eq!(lines(&String::from_utf8(st.ok_bytes(&["import"], &stream_q)).unwrap()), std::slice::from_ref(&q));

    // allowed-users = ["root"]: nobody may not even ask for the version.
    let closed = TestStore::builder().config("allowed-users = [\"root\"]\n").start();
    let out = closed.run_as_nobody(&["version"], b"");
    let e = assert_one_line_failure(&out, "nobody's version with allowed-users = [root]");
    assert!(e.contains("allowed-users") && e.contains("nobody"), "{e}");
    let out = closed.run_as_nobody(&["add", s(&f)], b"");
    let e = assert_one_line_failure(&out, "nobody's add with allowed-users = [root]");
    assert!(e.contains("allowed-users"), "{e}");
    // Also for an upload far larger than the socket's buffers.
    let big = src.path().join("big");
    fs::write(&big, vec![42u8; 16 << 20]).unwrap();
    fs::set_permissions(&big, fs::Permissions::from_mode(0o644)).unwrap();
    for flat in [false, true] {
        let args = if flat { vec!["add", "--flat", s(&big)] } else { vec!["add", s(&big)] };
        let out = closed.run_as_nobody(&args, b"");
        let e = assert_one_line_failure(&out, "nobody's add of 16 MB with allowed-users = [root]");
        assert!(e.contains("allowed-users"), "{e}");
    }
    assert_eq!(closed.store_entries(), Vec::<String>::new());
    // Root still may.
    assert_eq!(line(&closed.ok(&["add", s(&f)])), p);

    // trusted-users naming nobody lets it import.
    let trusting = TestStore::builder().config("trusted-users = [\"nobody\"]\n").start();
    let out = trusting.run_as_nobody(&["import"], &stream_q);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(line(&String::from_utf8(out.stdout).unwrap()), q);
}

/// When the daemon refuses an upload before reading all of it (403 for an untrusted import),
/// `cairn` must report the daemon's reason, not the broken pipe its upload ran into.
#[test]

fn refusal_of_a_large_untrusted_import_names_the_reason() {
    if !is_root() {
        eprintln!("skipping: needs root to run cairn as another user with setpriv");
        return;
    }
    let st = TestStore::start();
    let src = world_readable_tempdir();
    let big = src.path().join("big");
    fs::write(&big, (0..20u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect::<Vec<u8>>()).unwrap();
    fs::set_permissions(&big, fs::Permissions::from_mode(0o644)).unwrap();
    let p = line(&st.ok(&["add", s(&big)]));
    let stream = st.ok_bytes(&["export", &p], b"");
    let other = TestStore::start();
    let out = other.run_as_nobody(&["import"], &stream);
    let e = assert_one_line_failure(&out, "nobody's import of a 20 MB stream");
    assert!(e.contains("trusted-users"), "{e}");
    assert_eq!(other.store_entries(), Vec::<String>::new());
}

/// A socket path longer than a socket address holds (the default one, under a long home
/// directory) is listened on and reached all the same, as Nix reaches such sockets.
#[test]
fn a_socket_path_longer_than_a_socket_address_holds_is_served_and_reached() {
    let t = tempfile::tempdir().unwrap();
    let deep = t.path().join("d".repeat(110));
    fs::create_dir_all(&deep).unwrap();
    let (root, socket, config) = (t.path().join("root"), deep.join("cairnd.sock"), t.path().join("cairn.toml"));
    fs::write(&config, "").unwrap();
    let args = ["--root", s(&root), "--store-dir", "/store", "--socket", s(&socket), "--config", s(&config)];
    let mut daemon =
        Command::new(bin_dir().join("cairnd")).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    while !socket.exists() {
        assert!(started.elapsed() < Duration::from_secs(30), "cairnd did not listen on the long path");
        std::thread::sleep(Duration::from_millis(20));
    }
    let f = t.path().join("f");
    fs::write(&f, b"reached\n").unwrap();
    let out =
        Command::new(bin_dir().join("cairn")).args(args).args(["--no-auto-start", "add", s(&f)]).output().unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("/store/"));
}

/// Substituting paths that are all valid needs no cache, as `nix-store -r VALID` needs none;
/// a missing one with no cache configured is a one-line error saying what to set.
#[test]
fn substituting_what_is_valid_needs_no_cache() {
    let st = TestStore::start();
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("f"), b"here\n").unwrap();
    let p = line(&st.ok(&["add", s(&d.path().join("f"))]));
    assert_eq!(line(&st.ok(&["substitute", &p])), p);
    // So does realising it, as `nix-store --realise PATH` of a path that is not a derivation.
    assert_eq!(line(&st.ok(&["realise", &p])), p);
    let e = assert_one_line_failure(
        &st.run(&["substitute", "/store/00000000000000000000000000000000-x"], b""),
        "a missing path without caches",
    );
    assert!(e.contains("no binary cache to substitute from") && e.contains("substituters"), "{e}");
}

/// Untrusted users substitute only from the configured caches (a named URL could make the
/// daemon read any directory), and may send paths to another daemon only signed.
#[test]
fn untrusted_users_substitute_only_from_configured_caches() {
    if !is_root() {
        eprintln!("skipping: needs root to run cairn as another user with setpriv");
        return;
    }
    let cache = world_readable_tempdir();
    let url = format!("file://{}", cache.path().display());
    let st = TestStore::builder().config(&format!("substituters = [\"{url}\"]")).start();
    let some = "/store/00000000000000000000000000000000-x";
    let e = assert_one_line_failure(
        &st.run_as_nobody(&["substitute", "--from", "file:///root", some], b""),
        "nobody's --from",
    );
    assert!(e.contains("configured substituters") && e.contains("trusted-users"), "{e}");
    // The configured one is allowed (and has nothing).
    let e = assert_one_line_failure(&st.run_as_nobody(&["substitute", some], b""), "nobody's substitute");
    assert!(e.contains(&url) || e.contains("no substituter has it"), "{e}");
    // A push stream without signatures from an untrusted user is refused.
    let src = world_readable_tempdir();
    let f = src.path().join("f");
    fs::write(&f, b"x\n").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    let other = TestStore::start();
    let p = line(&other.ok(&["add", s(&f)]));
    let stream = other.ok_bytes(&["export", &p], b"");
    let imported = TestStore::start();
    imported.ok_bytes(&["import"], &stream);
    let e = assert_one_line_failure(
        &imported.run_as_nobody(&["copy", "--to", &format!("unix://{}", st.socket.display()), &p], b""),
        "nobody's unsigned copy",
    );
    assert!(e.contains("not signed"), "{e}");
    assert_eq!(st.store_entries(), Vec::<String>::new());
}

/// `trusted-substituters`, as Nix's: caches users who are not trusted may name too — by the
/// same URL or without its trailing `/` — and take signed paths from; any other stays refused,
/// and through the Nix protocol it is ignored with nix-daemon's warning.
#[test]
fn untrusted_users_may_name_the_trusted_substituters() {
    if !is_root() {
        eprintln!("skipping: needs root to run cairn as another user with setpriv");
        return;
    }
    // A signed path in a cache, made by a store of the test's own.
    let cache = world_readable_tempdir();
    let url = format!("file://{}", cache.path().display());
    let src = world_readable_tempdir();
    write(&src.path().join("f"), b"from a trusted substituter\n");
    let seed = TestStore::start();
    let path = line(&seed.ok(&["add", s(&src.path().join("f"))]));
    let keys = world_readable_tempdir();
    let (sk, pk) = (keys.path().join("sk"), keys.path().join("pk"));
    seed.ok(&["key", "generate", "trusted-subs-1", s(&sk), s(&pk)]);
    seed.ok(&["copy", "--to", &url, "--secret-key-file", s(&sk), &path]);
    let public = fs::read_to_string(&pk).unwrap();
    let st = TestStore::builder()
        .config(&format!("trusted-substituters = [\"{url}/\"]\ntrusted-public-keys = [\"{}\"]\n", public.trim()))
        .start();
    let some = "/store/00000000000000000000000000000000-x";
    let e = assert_one_line_failure(&st.run_as_nobody(&["substitute", "--from", "file:///root", some], b""), "--from");
    assert!(e.contains("trusted-substituters"), "{e}");
    let out = st.run_as_nobody(&["substitute", "--from", &url, &path], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(st.run(&["path-info", &path], b"").status.success());
    // Not a configured substituter: nothing comes from it unasked.
    st.ok(&["delete", &path]);
    assert!(!st.run(&["substitute", &path], b"").status.success());
    // A Nix client that is not trusted is warned of the caches it may not use, as by nix-daemon.
    if cairn_tests::require_peer("nix-store") {
        let nix_socket = st.root.path().join("nix-socket");
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "nix-store", "-r", &path])
            .args(["--option", "substituters", &format!("{url} file:///root")])
            .env("NIX_REMOTE", format!("unix://{}", nix_socket.display()))
            .env("NIX_CONFIG", "experimental-features = nix-command\n")
            .env("NIX_STORE_DIR", "/store")
            .env("HOME", "/nonexistent")
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{e}\n{}", st.log());
        assert!(e.contains("warning: ignoring untrusted substituter 'file:///root'"), "{e}");
        assert!(!e.contains(&format!("substituter '{url}'")), "{e}");
    }
}

/// A reader of cairn's output that is gone (`cairn add … | head -0`) ends it quietly, as the
/// shell tools end: exit code 1, no panic on stderr — and what it did is done.
#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    let st = TestStore::start();
    let file = st.root.path().join("closed-stdout");
    fs::write(&file, b"printed to nobody\n").unwrap();
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    drop(ours);
    let out = st
        .cairn()
        .args(["add", file.to_str().unwrap()])
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(!said.contains("panicked"), "{said}");
    let listed = st.ok(&["add", file.to_str().unwrap()]);
    assert!(listed.contains("closed-stdout"), "the add was done: {listed}");
}
