//! Garbage collection end to end: roots, `gc`, `delete`, `verify`, `optimise` through the real
//! `cairn` and `cairnd`, then many clients against a collector, and crashes in the middle of it
//! all.
//!
//! Expected sets are computed here from what the test built, never taken from the daemon: the
//! paths a test added, which of them its roots reach, what is on disk.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_tests::{bin_dir, line, write, write_exec, Rng, TestStore};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers

use cairn_tests::utf8 as s;

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).expect("utf-8 output")
}

fn lines(out: &str) -> Vec<String> {
    out.lines().map(str::to_owned).collect()
}

fn set<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> BTreeSet<String> {
    items.into_iter().map(|x| x.as_ref().to_owned()).collect()
}

fn base(p: &str) -> &str {
    p.rsplit('/').next().unwrap()
}

use cairn_tests::json;

fn str_list(v: &Value) -> Vec<String> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|x| x.as_str().unwrap().to_owned()).collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `cairn add-text NAME - --ref R… [-o LINK]` with `contents` on stdin: the arguments.
fn add_text_args(name: &str, refs: &[&str], link: Option<&Path>) -> Vec<String> {
    let mut args = vec!["add-text".to_owned(), name.to_owned(), "-".to_owned()];
    for r in refs {
        args.extend(["--ref".to_owned(), (*r).to_owned()]);
    }
    if let Some(l) = link {
        args.extend(["-o".to_owned(), s(l).to_owned()]);
    }
    args
}

fn run(st: &TestStore, args: &[String], stdin: &[u8]) -> Output {
    st.run(&args.iter().map(String::as_str).collect::<Vec<_>>(), stdin)
}

/// Adds a text path, asserting success; returns its store path.
fn add_text(st: &TestStore, name: &str, contents: &str, refs: &[&str], link: Option<&Path>) -> String {
    let args = add_text_args(name, refs, link);
    let out = run(st, &args, contents.as_bytes());
    assert!(out.status.success(), "cairn {args:?} failed:\n{}", stderr(&out));
    let p = line(&text(out.stdout));
    assert!(p.starts_with(&format!("{}/", st.store_dir)) && p.ends_with(&format!("-{name}")), "{p}");
    p
}

/// Whether `path-info` finds the path valid (exit 0) or says it is not (exit 1, in Nix's words).
fn is_valid(st: &TestStore, p: &str) -> bool {
    let out = st.run(&["path-info", p], b"");
    match out.status.code() {
        Some(0) => true,
        Some(1) => {
            let e = stderr(&out);
            assert_eq!(line(&e), format!("cairn: path '{p}' is not valid"), "path-info {p}");
            false
        }
        other => panic!("path-info {p} exited with {other:?}: {}", stderr(&out)),
    }
}

/// `verify --check-contents --json` finds nothing; returns how many paths it checked.
fn assert_verify_clean(st: &TestStore, what: &str) -> u64 {
    let out = st.run(&["verify", "--check-contents", "--json"], b"");
    let stdout = text(out.stdout.clone());
    assert!(out.status.success(), "{what}: verify failed ({}):\n{stdout}\n{}", out.status, stderr(&out));
    let v = json(&stdout);
    assert_eq!(v["problems"], serde_json::json!([]), "{what}: {v}");
    assert_eq!(v["repaired"], 0, "{what}: {v}");
    v["checked"].as_u64().unwrap()
}

/// The store paths on disk (base names), asserting that the temporary and trash areas are empty.
fn on_disk(st: &TestStore) -> BTreeSet<String> {
    st.wait_trash_empty();
    let trash = st.real_store_dir().join(".cairn-trash");
    let left: Vec<_> = fs::read_dir(&trash).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "trash left in the store: {left:?}");
    st.store_entries().into_iter().filter(|n| !n.starts_with('.')).collect()
}

fn bases(paths: &BTreeSet<String>) -> BTreeSet<String> {
    paths.iter().map(|p| base(p).to_owned()).collect()
}

/// `gc --print-live` or `--print-dead`: asserts the text form is sorted and equals the JSON form.
fn gc_print(st: &TestStore, flag: &str) -> BTreeSet<String> {
    let plain = lines(&st.ok(&["gc", flag]));
    let mut sorted = plain.clone();
    sorted.sort();
    assert_eq!(plain, sorted, "gc {flag} prints sorted paths");
    let listed = str_list(&json(&st.ok(&["gc", flag, "--json"])));
    assert_eq!(listed, plain, "gc {flag} --json lists what the text form prints");
    let set = set(&plain);
    assert_eq!(set.len(), plain.len(), "gc {flag} repeats paths: {plain:?}");
    set
}

/// `gc --print-roots` as (origin, path) pairs; asserts the JSON form says the same.
fn gc_roots(st: &TestStore) -> BTreeSet<(String, String)> {
    let plain: Vec<(String, String)> = lines(&st.ok(&["gc", "--print-roots"]))
        .iter()
        .map(|l| {
            let (o, p) = l.split_once(" -> ").unwrap_or_else(|| panic!("not 'ORIGIN -> PATH': {l}"));
            (o.to_owned(), p.to_owned())
        })
        .collect();
    let listed: Vec<(String, String)> = json(&st.ok(&["gc", "--print-roots", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["origin"].as_str().unwrap().to_owned(), r["path"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(listed, plain, "--print-roots --json");
    plain.into_iter().collect()
}

struct Collected {
    deleted: Vec<String>,
    bytes_freed: u64,
    unregistered: u64,
}

fn gc_result(out: &str) -> Collected {
    let v = json(out);
    Collected {
        deleted: str_list(&v["deleted"]),
        bytes_freed: v["bytesFreed"].as_u64().unwrap_or_else(|| panic!("{v}")),
        unregistered: v["unregistered"].as_u64().unwrap_or_else(|| panic!("{v}")),
    }
}

fn gc_json(st: &TestStore, extra: &[&str]) -> Collected {
    let mut args = vec!["gc", "--json"];
    args.extend_from_slice(extra);
    let out = st.ok(&args);
    if extra.contains(&"--dry-run") {
        // A dry run deletes nothing, and says so in its keys.
        let v = json(&out);
        assert!(v.get("deleted").is_none(), "{v}");
        return Collected {
            deleted: str_list(&v["wouldDelete"]),
            bytes_freed: v["wouldFree"].as_u64().unwrap_or_else(|| panic!("{v}")),
            unregistered: 0,
        };
    }
    gc_result(&out)
}

/// Asserts that `order` lists every path before the paths it references (referrers first).
fn assert_referrers_first(order: &[String], refs: &BTreeMap<String, Vec<String>>) {
    let pos: BTreeMap<&str, usize> = order.iter().enumerate().map(|(i, p)| (p.as_str(), i)).collect();
    for (p, rs) in refs {
        for r in rs {
            if let (Some(i), Some(j)) = (pos.get(p.as_str()), pos.get(r.as_str())) {
                assert!(i < j, "{p} refers to {r} and must be deleted first: {order:?}");
            }
        }
    }
}

fn gcroots(st: &TestStore) -> PathBuf {
    st.root.path().join("var/lib/cairn/gcroots")
}

fn auto_roots(st: &TestStore) -> BTreeSet<String> {
    fs::read_dir(gcroots(st).join("auto"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// The daemon log mentions no panic.
fn assert_no_panic(st: &TestStore) {
    let log = st.log();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
}

// ---------------------------------------------------------------------------------------------
// a. Roots, live and dead paths, collection

#[test]
fn roots_decide_what_lives_and_gc_deletes_exactly_the_dead() {
    let st = TestStore::start();
    let links = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();

    // A closure: top → c → b → a (and c → a).
    let a = add_text(&st, "a", "gc roots test: the leaf\n", &[], None);
    let b = add_text(&st, "b", &format!("b needs {a}\n"), &[&a], None);
    let c = add_text(&st, "c", &format!("c needs {b} and {a}\n"), &[&b, &a], None);
    let top = add_text(&st, "top", &format!("top needs {c}\n"), &[&c], None);
    // A tree, rooted as it is added.
    let tree = src.path().join("rooted-tree");
    write_exec(&tree.join("bin/tool"), b"#!/bin/sh\necho gc roots test\n");
    write(&tree.join("share/data"), &[7u8; 3000]);
    let x_link = links.path().join("x-link");
    let x = line(&st.ok(&["add", "-o", s(&x_link), s(&tree)]));
    // Garbage: d refers to a live path, e stands alone, g → f, h is a tree.
    let contents: BTreeMap<&str, String> = [
        ("d", format!("d uses {a}\n")),
        ("e", "gc roots test: e, alone\n".to_owned()),
        ("f", "gc roots test: f\n".to_owned()),
    ]
    .into_iter()
    .collect();
    let d = add_text(&st, "d", &contents["d"], &[&a], None);
    let e = add_text(&st, "e", &contents["e"], &[], None);
    let f = add_text(&st, "f", &contents["f"], &[], None);
    let g_text = format!("g needs {f}\n");
    let g = add_text(&st, "g", &g_text, &[&f], None);
    let dead_tree = src.path().join("dead-tree");
    write(&dead_tree.join("one"), &[1u8; 5000]);
    write(&dead_tree.join("sub/two"), &[2u8; 700]);
    let h = line(&st.ok(&["add", s(&dead_tree)]));

    // add-root: a symlink to the path's real place, and an indirect root naming the link.
    let top_link = links.path().join("top-link");
    assert_eq!(line(&st.ok(&["add-root", s(&top_link), &top])), s(&top_link));
    assert_eq!(fs::read_link(&top_link).unwrap(), st.real_store_dir().join(base(&top)));
    assert_eq!(fs::read_link(&x_link).unwrap(), st.real_store_dir().join(base(&x)));
    assert_eq!(auto_roots(&st).len(), 2, "one indirect root per link");
    // As Nix's addPermRoot: a link into the store is replaced, any other file is not.
    let mine = links.path().join("mine");
    symlink("/etc/hostname", &mine).unwrap();
    let refused = st.run(&["add-root", s(&mine), &top], b"");
    let said = stderr(&refused);
    assert!(!refused.status.success() && said.contains("points outside the store"), "{said}");
    assert_eq!(fs::read_link(&mine).unwrap(), Path::new("/etc/hostname"), "the user's link stays");
    fs::remove_file(&mine).unwrap();

    let all = set([&a, &b, &c, &top, &x, &d, &e, &f, &g, &h]);
    let live = set([&a, &b, &c, &top, &x]);
    let dead = set([&d, &e, &f, &g, &h]);
    assert_eq!(on_disk(&st), bases(&all));

    // No client holds anything any more: the links are the only roots.
    assert_eq!(
        gc_roots(&st),
        [(s(&top_link).to_owned(), top.clone()), (s(&x_link).to_owned(), x.clone())].into_iter().collect()
    );
    assert_eq!(gc_print(&st, "--print-live"), live);
    assert_eq!(gc_print(&st, "--print-dead"), dead);

    // A dry run names the dead and deletes nothing.
    let dry = st.run(&["gc", "--dry-run"], b"");
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert_eq!(set(lines(&text(dry.stdout.clone()))), dead);
    assert!(stderr(&dry).starts_with("would delete 5 store paths, freeing "), "{}", stderr(&dry));
    assert_eq!(set(gc_json(&st, &["--dry-run"]).deleted), dead);
    assert_eq!(on_disk(&st), bases(&all));
    assert!(all.iter().all(|p| is_valid(&st, p)));

    // The collection deletes exactly the dead, referrers first, and frees their files' bytes.
    let r = gc_json(&st, &[]);
    assert_eq!(set(&r.deleted), dead);
    assert_eq!(r.deleted.len(), dead.len(), "{:?}", r.deleted);
    let refs: BTreeMap<String, Vec<String>> = [(d.clone(), vec![a.clone()]), (g.clone(), vec![f.clone()])].into();
    assert_referrers_first(&r.deleted, &refs);
    let text_bytes: usize = contents.values().map(String::len).sum::<usize>() + g_text.len();
    assert_eq!(r.bytes_freed, (text_bytes + 5000 + 700) as u64, "bytes of the dead paths' files");
    assert_eq!(r.unregistered, 0);
    for p in &dead {
        assert!(!is_valid(&st, p), "{p} was collected");
        assert!(fs::symlink_metadata(st.real_store_dir().join(base(p))).is_err(), "{p} is gone from disk");
    }
    assert_eq!(on_disk(&st), bases(&live));
    assert_eq!(assert_verify_clean(&st, "after gc"), 5);
    assert_eq!(st.ok(&["cat", &format!("{x}/share/data")]).len(), 3000);
    assert_eq!(gc_print(&st, "--print-dead"), BTreeSet::new());
    assert_eq!(st.ok(&["gc"]), "0 store paths deleted, 0.00 MiB freed\n");

    // Removing a link makes its path dead at the next collection.
    fs::remove_file(&x_link).unwrap();
    assert_eq!(gc_print(&st, "--print-dead"), set([&x]));
    let out = st.ok(&["gc"]);
    let tool_len = fs::metadata(tree.join("bin/tool")).unwrap().len();
    let want = format!("1 store path deleted, {:.2} MiB freed\n", (tool_len + 3000) as f64 / 1048576.0);
    assert_eq!(out, want);
    assert!(!is_valid(&st, &x));
    assert_eq!(auto_roots(&st).len(), 1, "the collector removes the stale indirect root");

    // Permanent roots: symlinks under gcroots/ into the store, in the logical form or the
    // physical one, to a path or into it; anything else there roots nothing.
    let tree_again = line(&st.ok(&["add", s(&tree)]));
    assert_eq!(tree_again, x);
    let gr = gcroots(&st);
    fs::create_dir_all(gr.join("sub/deeper")).unwrap();
    symlink(&c, gr.join("logical")).unwrap();
    symlink(st.real_store_dir().join(base(&x)).join("bin/tool"), gr.join("sub/deeper/physical-inner")).unwrap();
    symlink("/etc/passwd", gr.join("elsewhere")).unwrap();
    symlink(format!("/store/{}-gone", "0".repeat(32)), gr.join("invalid")).unwrap();
    fs::remove_file(&top_link).unwrap();
    assert_eq!(
        gc_roots(&st),
        [
            (s(&gr.join("logical")).to_owned(), c.clone()),
            (s(&gr.join("sub/deeper/physical-inner")).to_owned(), x.clone())
        ]
        .into_iter()
        .collect()
    );
    assert_eq!(gc_print(&st, "--print-live"), set([&a, &b, &c, &x]));
    assert_eq!(gc_print(&st, "--print-dead"), set([&top]));
    assert_eq!(gc_json(&st, &[]).deleted, std::slice::from_ref(&top));
    assert_eq!(auto_roots(&st), BTreeSet::new(), "both links are gone, and so are their indirect roots");
    assert_eq!(on_disk(&st), bases(&set([&a, &b, &c, &x])));
    assert_eq!(assert_verify_clean(&st, "permanent roots"), 4);

    // Without roots, everything goes.
    fs::remove_dir_all(&gr).unwrap();
    let r = gc_json(&st, &[]);
    assert_eq!(set(&r.deleted), set([&a, &b, &c, &x]));
    assert_referrers_first(&r.deleted, &[(c.clone(), vec![b.clone(), a.clone()]), (b.clone(), vec![a.clone()])].into());
    assert_eq!(on_disk(&st), BTreeSet::new());
    assert_eq!(assert_verify_clean(&st, "empty store"), 0);
    assert_no_panic(&st);
}

#[test]
fn max_freed_stops_once_enough_is_freed() {
    let st = TestStore::start();
    let src = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(41);
    let mut added = BTreeSet::new();
    for i in 0..3 {
        let f = src.path().join(format!("blob-{i}"));
        write(&f, &rng.bytes(100 << 10));
        added.insert(line(&st.ok(&["add", s(&f)])));
    }
    assert_eq!(gc_print(&st, "--print-dead"), added);
    // Each path frees 100 KiB: the collector stops at the first moment it has freed 150 KiB.
    assert_eq!(gc_json(&st, &["--dry-run", "--max-freed", "150K"]).deleted.len(), 2);
    let r = gc_json(&st, &["--max-freed", "150K"]);
    assert_eq!(r.deleted.len(), 2, "{:?}", r.deleted);
    assert_eq!(r.bytes_freed, 2 * (100 << 10));
    let left: BTreeSet<String> = added.difference(&set(&r.deleted)).cloned().collect();
    assert_eq!(left.len(), 1);
    assert_eq!(on_disk(&st), bases(&left));
    let r = gc_json(&st, &["--max-freed", "1G"]);
    assert_eq!(set(&r.deleted), left);
    assert_eq!(on_disk(&st), BTreeSet::new());
    let e = st.run(&["gc", "--max-freed", "12Q"], b"");
    assert_eq!(e.status.code(), Some(2), "a bad size is a usage error: {}", stderr(&e));
}

// ---------------------------------------------------------------------------------------------
// b. delete

#[test]
fn delete_refuses_live_or_referenced_paths_and_deletes_nothing() {
    let st = TestStore::start();
    let links = tempfile::tempdir().unwrap();
    let a = add_text(&st, "a", "delete test: leaf\n", &[], None);
    let b = add_text(&st, "b", &format!("delete test: b needs {a}\n"), &[&a], None);
    let link = links.path().join("c-link");
    let c = add_text(&st, "c", &format!("delete test: c needs {b}\n"), &[&b], Some(&link));
    let d_text = "delete test: dead d\n";
    let d = add_text(&st, "d", d_text, &[], None);
    let e_text = format!("delete test: dead e needs {d}\n");
    let e = add_text(&st, "e", &e_text, &[&d], None);
    let everything = set([&a, &b, &c, &d, &e]);
    let assert_untouched = |what: &str| {
        assert_eq!(on_disk(&st), bases(&everything), "{what}");
        for p in &everything {
            assert!(is_valid(&st, p), "{what}: {p}");
        }
    };

    let err = st.fail(&["delete", &c], b"");
    assert_eq!(line(&err), format!("cairn: cannot delete '{c}': it is a root ({})", s(&link)));
    let err = st.fail(&["delete", &b], b"");
    assert_eq!(line(&err), format!("cairn: cannot delete '{b}': it is still referenced by '{c}'"));
    // With its referrer: the root is named (on the root itself or on what it reaches).
    let err = line(&st.fail(&["delete", &b, &c], b""));
    assert!(
        err == format!("cairn: cannot delete '{b}': it is reachable from the root {}", s(&link))
            || err == format!("cairn: cannot delete '{c}': it is a root ({})", s(&link)),
        "{err}"
    );
    let err = line(&st.fail(&["delete", &a, &b], b""));
    assert!(
        err == format!("cairn: cannot delete '{a}': it is reachable from the root {}", s(&link))
            || err == format!("cairn: cannot delete '{b}': it is still referenced by '{c}'"),
        "{err}"
    );
    let err = st.fail(&["delete", &d], b"");
    assert_eq!(line(&err), format!("cairn: cannot delete '{d}': it is still referenced by '{e}'"));
    // A deletable path listed with a refused one is not deleted either.
    let err = st.fail(&["delete", &e, &d, &c], b"");
    assert_eq!(line(&err), format!("cairn: cannot delete '{c}': it is a root ({})", s(&link)));
    let missing = format!("/store/{}-missing", "1".repeat(32));
    let err = st.fail(&["delete", &e, &missing], b"");
    assert_eq!(line(&err), format!("cairn: path '{missing}' is not valid in this store"));
    assert_untouched("after refusals");
    assert_eq!(st.run(&["delete"], b"").status.code(), Some(2), "no path is a usage error");

    // Dead paths go together, referrers first.
    let v = json(&st.ok(&["delete", "--json", &d, &e]));
    assert_eq!(str_list(&v["deleted"]), [e.clone(), d.clone()]);
    assert_eq!(v["bytesFreed"], (d_text.len() + e_text.len()) as u64);
    for p in [&d, &e] {
        assert!(!is_valid(&st, p));
        assert!(!st.real_store_dir().join(base(p)).exists());
    }

    // Once the link is gone, the top can go, then the rest, but never a referenced path alone.
    fs::remove_file(&link).unwrap();
    assert_eq!(st.ok(&["delete", &c]), format!("1 store path deleted, {:.2} MiB freed\n", 0.0));
    let err = st.fail(&["delete", &a], b"");
    assert_eq!(line(&err), format!("cairn: cannot delete '{a}': it is still referenced by '{b}'"));
    assert!(is_valid(&st, &a));
    let v = json(&st.ok(&["delete", "--json", &a, &b]));
    assert_eq!(str_list(&v["deleted"]), [b.clone(), a.clone()]);
    assert_eq!(on_disk(&st), BTreeSet::new());
    assert_eq!(assert_verify_clean(&st, "after deletes"), 0);
}

// ---------------------------------------------------------------------------------------------
// c. verify

#[test]
fn verify_finds_modified_and_missing_paths() {
    let st = TestStore::start();
    let links = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("verify-tree");
    write(&tree.join("data"), &[b'v'; 1000]);
    write_exec(&tree.join("bin/run"), b"#!/bin/sh\nexit 0\n");
    let t = line(&st.ok(&["add", "-o", s(&links.path().join("t")), s(&tree)]));
    let n = add_text(&st, "note", "verify test: a note\n", &[], Some(&links.path().join("n")));
    let g = add_text(&st, "gone", &format!("verify test: refers to {n}\n"), &[&n], Some(&links.path().join("g")));
    let ok = st.run(&["verify", "--check-contents"], b"");
    assert!(ok.status.success());
    assert_eq!(ok.stdout, b"");
    assert_eq!(stderr(&ok), "3 paths checked, no problems\n");

    // Change a file's bytes under the daemon (store files are read-only: open it up first).
    let data = st.real_store_dir().join(base(&t)).join("data");
    fs::set_permissions(&data, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&data, [b'w'; 1000]).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o444)).unwrap();
    // Only --check-contents reads contents.
    assert!(st.run(&["verify"], b"").status.success());
    let out = st.run(&["verify", "--check-contents"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "cairn: 1 of 3 paths checked has problems\n");
    let found = lines(&text(out.stdout));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with(&format!("path '{t}' was modified! expected hash 'sha256:")), "{}", found[0]);

    // Remove another path's file: as `nix-store --verify`, a path that disappeared and that no
    // valid path refers to is removed from the database (see below for one that is referred to).
    let gone = st.real_store_dir().join(base(&g));
    fs::set_permissions(&gone, fs::Permissions::from_mode(0o644)).unwrap();
    fs::remove_file(&gone).unwrap();
    let out = st.run(&["verify"], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with(&format!("path '{g}' disappeared, removing from database...\n")),
        "{}",
        stderr(&out)
    );
    assert!(!st.run(&["path-info", &g], b"").status.success(), "{g} is still valid");
    // Add it back, referred to by another path, and remove it again: it stays, a problem.
    assert_eq!(
        add_text(&st, "gone", &format!("verify test: refers to {n}\n"), &[&n], Some(&links.path().join("g"))),
        g
    );
    let r = add_text(&st, "referrer", &format!("verify test: refers to {g}\n"), &[&g], Some(&links.path().join("r")));
    fs::set_permissions(&gone, fs::Permissions::from_mode(0o644)).unwrap();
    fs::remove_file(&gone).unwrap();
    let out = st.run(&["verify"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(out.stdout), format!("path '{g}' disappeared, but it still has valid referrers!\n"));
    let out = st.run(&["verify", "--check-contents", "--json"], b"");
    assert_eq!(out.status.code(), Some(1));
    let v = json(&text(out.stdout));
    assert_eq!(v["checked"], 4);
    assert_eq!(v["repaired"], 0);
    let kinds: BTreeMap<String, String> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["path"].as_str().unwrap().to_owned(), p["kind"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(kinds, [(t.clone(), "modified".to_owned()), (g.clone(), "missing".to_owned())].into());

    // --repair: there is nothing to repair from, and it says so for each problem.
    let out = st.run(&["verify", "--check-contents", "--repair"], b"");
    assert_eq!(out.status.code(), Some(1));
    let found = lines(&text(out.stdout));
    assert_eq!(found.len(), 2, "{found:?}");
    for (l, p) in found.iter().zip([&t, &g]) {
        assert!(l.contains(&format!("'{p}'")), "{l}");
        assert!(l.ends_with(" (cannot repair: no substituter is configured)"), "{l}");
    }
    if nix::unistd::geteuid().is_root() && Command::new("setpriv").arg("--version").output().is_ok() {
        // Repair needs trust: an ordinary user is refused before anything is checked.
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin_dir().join("cairn"))
            .args(st.store_args())
            .args(["--no-auto-start", "verify", "--repair"])
            .env("HOME", "/nonexistent")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("not trusted to repair"), "{}", stderr(&out));
    }

    // The broken paths can be collected like any other, and the store is whole again.
    fs::remove_file(links.path().join("t")).unwrap();
    fs::remove_file(links.path().join("g")).unwrap();
    fs::remove_file(links.path().join("r")).unwrap();
    let collected = gc_json(&st, &[]);
    assert_eq!(set(&collected.deleted), set([&t, &g, &r]));
    assert_eq!(assert_verify_clean(&st, "after collecting the broken paths"), 1);
    assert_eq!(line(&st.ok(&["add", s(&tree)])), t, "the tree adds again at the same path");
    assert_eq!(assert_verify_clean(&st, "after adding the tree again"), 2);
    assert_eq!(on_disk(&st), bases(&set([&t, &n])));
}

// ---------------------------------------------------------------------------------------------
// d. optimise

/// `auto-optimise-store`: what is registered — added, imported, substituted — is linked with
/// identical files already in the store at once, as Nix links what it registers; the paths'
/// NARs stay what they were.
#[test]
fn auto_optimise_store_links_what_is_registered() {
    let st = TestStore::builder().config("auto-optimise-store = true\n").start();
    let src = tempfile::tempdir().unwrap();
    let big = Rng::new(23).bytes(1 << 20);
    write(&src.path().join("one/big"), &big);
    write(&src.path().join("one/own"), b"auto-optimise: one\n");
    write(&src.path().join("two/lib/big"), &big);
    let added = lines(&st.ok(&["add", s(&src.path().join("one")), s(&src.path().join("two"))]));
    // The same bytes imported from another store under another name.
    write(&src.path().join("three/big"), &big);
    let other = TestStore::start();
    let three = line(&other.ok(&["add", s(&src.path().join("three"))]));
    st.ok_bytes(&["import"], &other.ok_bytes(&["export", &three], b""));
    let real = |p: &str, f: &str| st.real_store_dir().join(base(p)).join(f);
    let ino = |f: PathBuf| fs::symlink_metadata(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display())).ino();
    let big_ino = ino(real(&added[0], "big"));
    assert_eq!(ino(real(&added[1], "lib/big")), big_ino);
    assert_eq!(ino(real(&three, "big")), big_ino);
    assert_ne!(ino(real(&added[0], "own")), big_ino);
    assert_eq!(st.ok(&["optimise"]), "0.00 MiB freed by hard-linking 0 files\n", "nothing was left to link");
    assert_eq!(assert_verify_clean(&st, "after auto-optimise"), 3);
}

#[test]
fn optimise_hard_links_identical_files_without_changing_any_path() {
    let st = TestStore::start();
    let links = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(17);
    let big = rng.bytes(2 << 20);
    let small = b"optimise test: the same small file\n";
    let (t1, t2) = (src.path().join("opt-one"), src.path().join("opt-two"));
    write(&t1.join("big"), &big);
    write(&t1.join("small"), small);
    write(&t1.join("own"), b"optimise test: only in one\n");
    write(&t2.join("lib/big"), &big);
    write(&t2.join("copy-of-big"), &big);
    write(&t2.join("small"), small);
    write(&t2.join("own"), b"optimise test: only in two\n");
    // Same bytes, but executable: another NAR, never linked to the others.
    write_exec(&t2.join("big-exec"), &big);
    write(&t2.join("empty"), b"");
    let added = lines(&st.ok(&["add", "-o", s(&links.path().join("opt")), s(&t1), s(&t2)]));
    let (p1, p2) = (added[0].clone(), added[1].clone());
    let dump = |p: &str| st.ok_bytes(&["nar", "dump", p], b"");
    let (nar1, nar2) = (dump(&p1), dump(&p2));

    let v = json(&st.ok(&["optimise", "--json"]));
    let saved = 2 * big.len() + small.len();
    assert_eq!(v, serde_json::json!({ "paths": 2, "filesLinked": 3, "bytesSaved": saved }));
    let real = |p: &str, f: &str| st.real_store_dir().join(base(p)).join(f);
    let ino = |f: PathBuf| fs::symlink_metadata(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display())).ino();
    let big_ino = ino(real(&p1, "big"));
    assert_eq!(ino(real(&p2, "lib/big")), big_ino);
    assert_eq!(ino(real(&p2, "copy-of-big")), big_ino);
    assert_ne!(ino(real(&p2, "big-exec")), big_ino);
    assert_eq!(ino(real(&p1, "small")), ino(real(&p2, "small")));
    assert_ne!(ino(real(&p1, "own")), ino(real(&p2, "own")));
    // Canonical still: modes, mtimes; and the paths' NARs are what they were.
    let m = fs::metadata(real(&p2, "lib/big")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.mtime()), (0o444, 1));
    assert_eq!(fs::metadata(real(&p2, "big-exec")).unwrap().mode() & 0o7777, 0o555);
    assert_eq!(fs::metadata(real(&p2, "lib")).unwrap().mtime(), 1);
    assert!(dump(&p1) == nar1 && dump(&p2) == nar2, "optimise changed a NAR");
    assert_eq!(assert_verify_clean(&st, "after optimise"), 2);

    // Again: nothing left to link.
    assert_eq!(st.ok(&["optimise"]), "0.00 MiB freed by hard-linking 0 files\n");

    // Collected, shared files count once, and the links directory empties.
    fs::remove_file(links.path().join("opt")).unwrap();
    fs::remove_file(links.path().join("opt-2")).unwrap();
    let r = gc_json(&st, &[]);
    assert_eq!(set(&r.deleted), set([&p1, &p2]));
    let distinct = 2 * big.len() + small.len() + "optimise test: only in one\n".len() * 2;
    assert_eq!(r.bytes_freed, distinct as u64, "every distinct file once, shared or not");
    let left: Vec<_> = fs::read_dir(st.real_store_dir().join(".links")).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(on_disk(&st), BTreeSet::new());
}

// ---------------------------------------------------------------------------------------------
// e. Many clients against the collector

/// One kind of failure the concurrency test accepts: an add or root whose reference was
/// collected first because nothing rooted it.
fn not_valid(out: &Output) -> bool {
    let e = stderr(out);
    out.status.code() == Some(1) && e.starts_with("cairn: path '") && line(&e).ends_with("' is not valid in this store")
}

#[derive(Default)]
struct Tally {
    ops: AtomicUsize,
    imports: AtomicUsize,
    adds: AtomicUsize,
    unlinks: AtomicUsize,
    not_valid: AtomicUsize,
    collections: AtomicUsize,
    collected: AtomicUsize,
}

#[test]
fn concurrent_clients_and_collector_keep_every_rooted_closure_whole() {
    const WORKERS: u64 = 16;
    const RUN: Duration = Duration::from_secs(6);
    let st = TestStore::start();
    let work = tempfile::tempdir().unwrap();

    // Overlapping closures, built in another store and exported: a shared base and a shared tree
    // under four tops.
    let (tops, streams, closures) = {
        let seed = TestStore::start();
        let mut base_paths: Vec<String> = Vec::new();
        for i in 0..10 {
            let refs: Vec<&str> = base_paths.iter().rev().take(2).map(String::as_str).collect();
            let p = add_text(&seed, &format!("base-{i}"), &format!("concurrency base {i} {refs:?}\n"), &refs, None);
            base_paths.push(p);
        }
        let tree = work.path().join("shared-tree");
        write(&tree.join("lib/libshared"), &Rng::new(5).bytes(64 << 10));
        write_exec(&tree.join("bin/shared"), b"#!/bin/sh\necho shared\n");
        let tree_p = line(&seed.ok(&["add", s(&tree)]));
        let mut tops = Vec::new();
        let mut streams = Vec::new();
        let mut closures = Vec::new();
        for k in 0..4 {
            let refs = [base_paths[9 - 2 * k].as_str(), tree_p.as_str()];
            let mid = add_text(&seed, &format!("mid-{k}"), &format!("mid {k} {refs:?}\n"), &refs, None);
            let top = add_text(&seed, &format!("top-{k}"), &format!("top {k} {mid}\n"), &[&mid, &base_paths[k]], None);
            let closure = lines(&seed.ok(&["closure", &top]));
            let mut args = vec!["export"];
            args.extend(closure.iter().map(String::as_str));
            streams.push(seed.ok_bytes(&args, b""));
            closures.push(set(&closure));
            tops.push(top);
        }
        (tops, streams, closures)
    };
    let shared_paths: Vec<String> = closures.iter().flatten().cloned().collect::<BTreeSet<_>>().into_iter().collect();

    // Sources the workers add: trees and files, some with the same files inside.
    let srcs = work.path().join("srcs");
    let mut rng = Rng::new(9);
    let common = rng.bytes(20 << 10);
    let mut sources = Vec::new();
    for i in 0..3 {
        let t = srcs.join(format!("tree-{i}"));
        write(&t.join("common"), &common);
        write(&t.join(format!("own-{i}")), &rng.bytes(3000));
        sources.push(t);
        let f = srcs.join(format!("file-{i}"));
        write(&f, &rng.bytes(1000 + i * 500));
        sources.push(f);
    }

    let tally = Tally::default();
    let errors = Mutex::new(Vec::<String>::new());
    let fail = |what: String| errors.lock().unwrap().push(what);
    let deadline = Instant::now() + RUN;
    let links_root = work.path().join("links");
    std::thread::scope(|scope| {
        for t in 0..WORKERS {
            let (st, tally, fail, tops, streams, closures, sources, shared_paths) =
                (&st, &tally, &fail, &tops, &streams, &closures, &sources, &shared_paths);
            let dir = links_root.join(format!("w{t}"));
            fs::create_dir_all(&dir).unwrap();
            scope.spawn(move || {
                let mut rng = Rng::new(1000 + t);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    tally.ops.fetch_add(1, Ordering::Relaxed);
                    let link = dir.join(format!("l{}", rng.below(6)));
                    let own_link = dir.join(format!("l{}", rng.below(6)));
                    let have_own = fs::symlink_metadata(&own_link).is_ok();
                    match rng.below(20) {
                        0..=3 => {
                            let k = rng.below(4) as usize;
                            let out = st.run(&["import"], &streams[k]);
                            if !out.status.success() {
                                fail(format!("w{t}#{n} import {k}: {}", stderr(&out)));
                                continue;
                            }
                            tally.imports.fetch_add(1, Ordering::Relaxed);
                            let printed = set(lines(&text(out.stdout)));
                            if printed != closures[k] {
                                fail(format!("w{t}#{n} import {k} printed {printed:?}"));
                            }
                            // The import's client has exited: the top may be collected before
                            // it is rooted.
                            let out = st.run(&["add-root", s(&link), &tops[k]], b"");
                            if not_valid(&out) {
                                tally.not_valid.fetch_add(1, Ordering::Relaxed);
                            } else if !out.status.success() {
                                fail(format!("w{t}#{n} add-root {}: {}", link.display(), stderr(&out)));
                            }
                        }
                        4..=8 => {
                            // Text with overlapping contents, referring to a path one of our
                            // links holds (must work) or to a shared path nothing holds (may be
                            // gone).
                            let id = rng.below(6);
                            let (r, must) = if have_own && rng.below(2) == 0 {
                                (s(&own_link).to_owned(), true)
                            } else {
                                (shared_paths[rng.below(shared_paths.len() as u64) as usize].clone(), false)
                            };
                            let args = add_text_args(&format!("note-{id}"), &[&r], Some(&link));
                            let out = run(st, &args, format!("shared note {id}\n").as_bytes());
                            if out.status.success() {
                                tally.adds.fetch_add(1, Ordering::Relaxed);
                            } else if !must && not_valid(&out) {
                                tally.not_valid.fetch_add(1, Ordering::Relaxed);
                            } else {
                                fail(format!("w{t}#{n} add-text --ref {r}: {}", stderr(&out)));
                            }
                        }
                        9..=14 => {
                            let src = &sources[rng.below(sources.len() as u64) as usize];
                            let out = st.run(&["add", "-o", s(&link), s(src)], b"");
                            if out.status.success() {
                                tally.adds.fetch_add(1, Ordering::Relaxed);
                            } else {
                                fail(format!("w{t}#{n} add {}: {}", src.display(), stderr(&out)));
                            }
                        }
                        15..=16 => {
                            if fs::remove_file(&link).is_ok() {
                                tally.unlinks.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        17 if t == 0 && rng.below(4) == 0 => {
                            let out = st.run(&["optimise"], b"");
                            if !out.status.success() {
                                fail(format!("w{t}#{n} optimise: {}", stderr(&out)));
                            }
                        }
                        _ => {
                            // What our link holds is whole right now.
                            if have_own {
                                let out = st.run(&["path-info", "--closure", s(&own_link)], b"");
                                if !out.status.success() {
                                    fail(format!("w{t}#{n} path-info -r {}: {}", own_link.display(), stderr(&out)));
                                }
                            }
                        }
                    }
                }
            });
        }
        // The collector, and now and then a check that every valid path is on disk.
        let (st, tally, fail) = (&st, &tally, &fail);
        scope.spawn(move || {
            let mut i = 0;
            while Instant::now() < deadline {
                i += 1;
                if i % 5 == 0 {
                    let out = st.run(&["verify"], b"");
                    if !out.status.success() {
                        fail(format!(
                            "verify during the run: {}{}",
                            String::from_utf8_lossy(&out.stdout),
                            stderr(&out)
                        ));
                    }
                    continue;
                }
                let out = st.run(&["gc", "--json"], b"");
                if !out.status.success() {
                    fail(format!("gc: {}", stderr(&out)));
                    continue;
                }
                tally.collections.fetch_add(1, Ordering::Relaxed);
                tally.collected.fetch_add(gc_result(&text(out.stdout)).deleted.len(), Ordering::Relaxed);
            }
        });
    });
    let errors = errors.into_inner().unwrap();
    eprintln!(
        "concurrency: {} operations, {} imports, {} adds, {} unlinks, {} 'not valid', {} collections deleted {} paths",
        tally.ops.load(Ordering::Relaxed),
        tally.imports.load(Ordering::Relaxed),
        tally.adds.load(Ordering::Relaxed),
        tally.unlinks.load(Ordering::Relaxed),
        tally.not_valid.load(Ordering::Relaxed),
        tally.collections.load(Ordering::Relaxed),
        tally.collected.load(Ordering::Relaxed),
    );
    // Reported now, asserted after the links are checked (which says more if both fail).
    let errors = errors.join("\n");
    if !errors.is_empty() {
        let log = st.log();
        let warnings: Vec<&str> =
            log.lines().filter(|l| ["ERROR", "WARN", "stale"].iter().any(|w| l.contains(w))).collect();
        eprintln!("failures:\n{errors}\ndaemon errors, warnings, stale roots:\n{}", warnings.join("\n"));
    }
    assert!(tally.collections.load(Ordering::Relaxed) >= 5, "the collector hardly ran");
    assert!(tally.collected.load(Ordering::Relaxed) > 0, "nothing was ever collected: the test tested nothing");
    assert!(tally.imports.load(Ordering::Relaxed) > 10 && tally.adds.load(Ordering::Relaxed) > 50);

    // Every link that exists points to a valid path whose closure is valid and on disk.
    let check_links = |what: &str| -> BTreeSet<String> {
        let mut links = Vec::new();
        for t in 0..WORKERS {
            for e in fs::read_dir(links_root.join(format!("w{t}"))).unwrap().flatten() {
                links.push(e.path());
            }
        }
        if links.is_empty() {
            return BTreeSet::new();
        }
        let mut targets = BTreeSet::new();
        for l in &links {
            let target = fs::read_link(l).unwrap();
            let b = target.file_name().unwrap().to_str().unwrap().to_owned();
            assert_eq!(target, st.real_store_dir().join(&b), "{what}: {}", l.display());
            targets.insert(format!("/store/{b}"));
        }
        let args: Vec<&str> = ["closure"].into_iter().chain(links.iter().map(|l| s(l))).collect();
        let closure = set(lines(&st.ok(&args)));
        let args: Vec<&str> =
            ["path-info", "--closure", "--json"].into_iter().chain(links.iter().map(|l| s(l))).collect();
        let infos = json(&st.ok(&args));
        let infos: BTreeSet<String> =
            infos.as_array().unwrap().iter().map(|i| i["path"].as_str().unwrap().to_owned()).collect();
        assert_eq!(infos, closure, "{what}");
        assert!(targets.is_subset(&closure), "{what}");
        for p in &closure {
            assert!(st.real_store_dir().join(base(p)).exists(), "{what}: {p} is valid but not on disk");
        }
        closure
    };
    let live = check_links("after the run");
    assert_verify_clean(&st, "after the run");
    assert!(errors.is_empty(), "clients failed:\n{errors}");
    // With no client left, the links are the only roots.
    gc_json(&st, &[]);
    assert_eq!(check_links("after a last collection"), live);
    assert_eq!(gc_print(&st, "--print-live"), live);
    assert_eq!(on_disk(&st), bases(&live));
    // Without the links, nothing is left: no path, no link of optimise, no indirect root.
    fs::remove_dir_all(&links_root).unwrap();
    let r = gc_json(&st, &[]);
    assert_eq!(set(&r.deleted), live);
    assert_eq!(on_disk(&st), BTreeSet::new());
    assert_eq!(auto_roots(&st), BTreeSet::new());
    let links_left: Vec<_> = fs::read_dir(st.real_store_dir().join(".links"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(links_left.is_empty(), "{links_left:?}");
    assert_verify_clean(&st, "at the end");
    assert_no_panic(&st);
}

// ---------------------------------------------------------------------------------------------
// f. Crashes

/// Export streams made in a separate store: many small dead paths (text chains and trees), and a
/// few large files.
fn crash_streams(dir: &Path) -> (PathBuf, BTreeSet<String>, PathBuf, BTreeSet<String>) {
    let seed = TestStore::start();
    let mut rng = Rng::new(77);
    let mut many = Vec::new();
    for chain in 0..30 {
        let mut prev: Option<String> = None;
        for i in 0..5 {
            let refs: Vec<&str> = prev.iter().map(String::as_str).collect();
            let p =
                add_text(&seed, &format!("c{chain}-{i}"), &format!("crash chain {chain} {i} {prev:?}\n"), &refs, None);
            prev = Some(p.clone());
            many.push(p);
        }
    }
    // Trees with many files: their removal goes through the trash.
    let mut trees = Vec::new();
    for i in 0..20 {
        let t = dir.join(format!("crash-tree-{i}"));
        for j in 0..30 {
            write(&t.join(format!("d{}/f{j}", j % 4)), &rng.bytes(200 + (i * 40 + j) % 900));
        }
        trees.push(t);
    }
    let args: Vec<&str> = ["add"].into_iter().chain(trees.iter().map(|t| s(t))).collect();
    many.extend(lines(&seed.ok(&args)));
    let mut large = Vec::new();
    for i in 0..8 {
        let f = dir.join(format!("crash-large-{i}"));
        write(&f, &rng.bytes(3 << 20));
        large.push(line(&seed.ok(&["add", s(&f)])));
    }
    let top = add_text(
        &seed,
        "large-top",
        &format!("{large:?}\n"),
        &large.iter().map(String::as_str).collect::<Vec<_>>(),
        None,
    );
    large.push(top);
    let export = |paths: &[String], to: &Path| {
        let args: Vec<&str> = ["export"].into_iter().chain(paths.iter().map(String::as_str)).collect();
        fs::write(to, seed.ok_bytes(&args, b"")).unwrap();
    };
    let (many_file, large_file) = (dir.join("many.stream"), dir.join("large.stream"));
    export(&many, &many_file);
    export(&large, &large_file);
    (many_file, set(&many), large_file, set(&large))
}

#[test]
fn crashes_during_gc_import_and_add_leave_a_consistent_store() {
    const ITERATIONS: u64 = 30;
    let work = tempfile::tempdir().unwrap();
    let (many_file, many, large_file, large) = crash_streams(work.path());
    let mut st = TestStore::start();
    let links = work.path().join("links");
    fs::create_dir_all(&links).unwrap();
    let srcs = work.path().join("srcs");
    let mut rng = Rng::new(0xC0FFEE);
    for i in 0..4 {
        let t = srcs.join(format!("add-tree-{i}"));
        for j in 0..10 {
            write(&t.join(format!("f{j}")), &rng.bytes(5000 + j * 100));
        }
    }
    // Links of acknowledged adds: the path each must keep valid.
    let mut acked: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut counts = [0usize; 3];
    for i in 0..ITERATIONS {
        let kind = (i % 3) as usize;
        let delay = Duration::from_millis(rng.below(301));
        match kind {
            0 => {
                // A collection of many dead paths, killed.
                let out = st.run(&["import"], &fs::read(&many_file).unwrap());
                assert!(out.status.success(), "{}", stderr(&out));
                let child =
                    st.cairn().args(["gc", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
                std::thread::sleep(delay);
                st.crash();
                let out = child.wait_with_output().unwrap();
                counts[0] += out.status.success() as usize;
            }
            1 => {
                // An import of large paths, killed. None of them is valid before.
                let before = large.iter().filter(|p| is_valid(&st, p)).count();
                assert_eq!(before, 0, "iteration {i}: unrooted paths survived the last collection");
                let child = st
                    .cairn()
                    .arg("import")
                    .stdin(fs::File::open(&large_file).unwrap())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                std::thread::sleep(delay);
                st.crash();
                let out = child.wait_with_output().unwrap();
                st.restart();
                let valid: BTreeSet<String> = large.iter().filter(|p| is_valid(&st, p)).cloned().collect();
                if out.status.success() {
                    counts[1] += 1;
                    assert_eq!(set(lines(&text(out.stdout))), large, "iteration {i}");
                    assert_eq!(valid, large, "iteration {i}: an acknowledged import was lost");
                } else {
                    assert!(valid.is_empty() || valid == large, "iteration {i}: a partial import: {valid:?}");
                }
            }
            _ => {
                // Adds with links, killed.
                let stop = AtomicBool::new(false);
                let done = Mutex::new(Vec::<(PathBuf, String)>::new());
                let pid = st.pid() as i32;
                std::thread::scope(|scope| {
                    let (st, stop, done, srcs, links) = (&st, &stop, &done, &srcs, &links);
                    scope.spawn(move || {
                        let mut k = 0;
                        while !stop.load(Ordering::Relaxed) {
                            k += 1;
                            let link = links.join(format!("i{i}-{k}"));
                            let out = if k % 2 == 0 {
                                st.run(&["add", "-o", s(&link), s(&srcs.join(format!("add-tree-{}", k % 4)))], b"")
                            } else {
                                let args = add_text_args(&format!("crash-add-{i}-{k}"), &[], Some(&link));
                                run(st, &args, format!("crash test add {i} {k}\n").as_bytes())
                            };
                            if !out.status.success() {
                                break;
                            }
                            done.lock().unwrap().push((link, line(&text(out.stdout))));
                        }
                    });
                    std::thread::sleep(delay);
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
                    stop.store(true, Ordering::Relaxed);
                });
                st.crash(); // reaps the killed daemon
                let done = done.into_inner().unwrap();
                counts[2] += done.len();
                acked.extend(done);
            }
        }
        if kind != 1 {
            st.restart();
        }

        // Start-up emptied the temporary area and the reclaimer the trash; what is valid is whole.
        st.wait_trash_empty();
        for area in [".cairn-tmp", ".cairn-trash"] {
            let left: Vec<_> =
                fs::read_dir(st.real_store_dir().join(area)).unwrap().flatten().map(|e| e.path()).collect();
            assert!(left.is_empty(), "iteration {i}: {area} holds {left:?} after restart");
        }
        assert_verify_clean(&st, &format!("iteration {i} after restart"));
        let check_acked = |when: &str| {
            if acked.is_empty() {
                return;
            }
            for (l, p) in &acked {
                assert_eq!(fs::read_link(l).unwrap(), st.real_store_dir().join(base(p)), "{when}");
            }
            let args: Vec<&str> = ["path-info", "--closure"].into_iter().chain(acked.keys().map(|l| s(l))).collect();
            let out = st.run(&args, b"");
            assert!(
                out.status.success(),
                "iteration {i} {when}: an acknowledged, rooted path is gone: {}",
                stderr(&out)
            );
        };
        check_acked("after restart");

        // A collection works and leaves exactly the live paths on disk.
        let r = gc_json(&st, &[]);
        let live = gc_print(&st, "--print-live");
        assert_eq!(on_disk(&st), bases(&live), "iteration {i}: after gc ({} unregistered removed)", r.unregistered);
        // The links are the only roots: no client is left.
        let rooted = if acked.is_empty() {
            BTreeSet::new()
        } else {
            let args: Vec<&str> = ["closure"].into_iter().chain(acked.keys().map(|l| s(l))).collect();
            set(lines(&st.ok(&args)))
        };
        assert_eq!(live, rooted, "iteration {i}");
        check_acked("after gc");
        assert!(many.iter().all(|p| !live.contains(p)), "iteration {i}: unrooted paths are live");

        // Keep the store small: forget some links now and then.
        if i % 4 == 3 {
            let keys: Vec<PathBuf> = acked.keys().cloned().collect();
            for l in keys.iter().filter(|_| rng.below(2) == 0) {
                fs::remove_file(l).unwrap();
                acked.remove(l);
            }
        }
    }
    eprintln!(
        "crashes: {ITERATIONS} iterations; collections finished before the kill {}, imports {}, acknowledged adds {}",
        counts[0], counts[1], counts[2]
    );
    assert!(counts[2] > 0, "no add was ever acknowledged");
    assert_verify_clean(&st, "at the end");
    assert_no_panic(&st);
}
