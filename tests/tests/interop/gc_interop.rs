//! Garbage collection against real Nix 2.8: the same paths in a cairn store and a Nix store, the
//! same roots in both, and both collectors must find the same live and dead paths and leave the
//! same paths valid.
//!
//! The paths are a random DAG of `builtins.toFile` texts (and two trees from `nix-store --add`)
//! evaluated by Nix, exported with `nix-store --export` and imported with `cairn import`. The
//! expected live set is also computed here, from the DAG the test generated, so that the two
//! collectors are not only compared with each other.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use cairn_tests::{line, require_peer, NixStore, Rng, TestStore};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).expect("utf-8 output")
}

fn lines(s: &str) -> Vec<String> {
    s.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

fn set<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> BTreeSet<String> {
    items.into_iter().map(|x| x.as_ref().to_owned()).collect()
}

fn base(p: &str) -> &str {
    p.rsplit('/').next().unwrap()
}

use cairn_tests::utf8;

use cairn_tests::json;

fn cairn_gcroots(st: &TestStore) -> PathBuf {
    st.root.path().join("var/lib/cairn/gcroots")
}

/// `<root>/nix/var/nix/gcroots`: where Nix looks for roots of a `local?root=` store.
fn nix_gcroots(n: &NixStore) -> PathBuf {
    n.root.path().join("nix/var/nix/gcroots")
}

/// Store paths (base names) in a store directory on disk, without Nix's `.links` and cairn's
/// dot-directories.
fn entries(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

fn bases(paths: &BTreeSet<String>) -> BTreeSet<String> {
    paths.iter().map(|p| base(p).to_owned()).collect()
}

/// `nix-store --gc --print-live` or `--print-dead`.
fn nix_print(n: &NixStore, flag: &str) -> BTreeSet<String> {
    set(lines(&text(n.ok("nix-store", &["--gc", flag]))))
}

fn cairn_print(st: &TestStore, flag: &str) -> BTreeSet<String> {
    set(lines(&st.ok(&["gc", flag])))
}

/// Every valid path of the Nix store.
fn nix_valid(n: &NixStore) -> BTreeSet<String> {
    set(lines(&text(n.ok("nix", &["path-info", "--all"]))))
}

/// Every valid path of the cairn store: `verify` checks every valid path and counts them, so
/// `expected` is the valid set if all of it is valid and the count matches.
fn assert_cairn_valid(st: &TestStore, expected: &BTreeSet<String>, what: &str) {
    let v = json(&st.ok(&["verify", "--check-contents", "--json"]));
    assert_eq!(v["problems"], serde_json::json!([]), "{what}");
    assert_eq!(v["checked"], expected.len() as u64, "{what}: number of valid paths");
    if !expected.is_empty() {
        let mut args = vec!["path-info", "--json"];
        args.extend(expected.iter().map(String::as_str));
        assert_eq!(json(&st.ok(&args)).as_array().unwrap().len(), expected.len(), "{what}");
    }
    assert_eq!(entries(&st.real_store_dir()), bases(expected), "{what}: on disk");
}

/// The closure of `roots` in a graph of references.
fn closure(refs: &BTreeMap<String, Vec<String>>, roots: &BTreeSet<String>) -> BTreeSet<String> {
    let mut live = BTreeSet::new();
    let mut stack: Vec<String> = roots.iter().cloned().collect();
    while let Some(p) = stack.pop() {
        if live.insert(p.clone()) {
            stack.extend(refs[&p].iter().cloned());
        }
    }
    live
}

/// Evaluates a Nix expression file (writing its `toFile` paths), returning the JSON value.
fn nix_eval(n: &NixStore, file: &Path, args: &[&str]) -> Value {
    let mut a = vec!["--eval", "--read-write-mode", "--strict", "--json"];
    a.extend_from_slice(args);
    a.push(utf8(file));
    serde_json::from_slice(&n.ok("nix-instantiate", &a)).unwrap()
}

/// Exports `paths` from Nix and imports them into cairn; asserts both hold them alike.
fn copy_to_cairn(n: &NixStore, st: &TestStore, paths: &BTreeSet<String>) {
    let mut args = vec!["--export"];
    args.extend(paths.iter().map(String::as_str));
    let stream = n.ok("nix-store", &args);
    let imported = set(lines(&text(st.ok_bytes(&["import"], &stream))));
    assert_eq!(&imported, paths, "cairn import prints what Nix exported");
    let mut args = vec!["path-info", "--json"];
    args.extend(paths.iter().map(String::as_str));
    let cairn: BTreeMap<String, Value> = json(&st.ok(&args))
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["path"].as_str().unwrap().to_owned(), i.clone()))
        .collect();
    let mut args = vec!["path-info", "--json"];
    args.extend(paths.iter().map(String::as_str));
    let nix = json(&text(n.ok("nix", &args)));
    for i in nix.as_array().unwrap() {
        let p = i["path"].as_str().unwrap();
        assert_eq!(cairn[p]["narHash"], i["narHash"], "{p}");
        let refs = |v: &Value| set(v["references"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()));
        assert_eq!(refs(&cairn[p]), refs(i), "references of {p}");
        assert_eq!(cairn[p]["deriver"], i["deriver"], "deriver of {p}");
    }
}

// ---------------------------------------------------------------------------------------------
// A random DAG

/// A DAG of `count` text nodes over two trees: node i refers to up to three earlier nodes, and
/// now and then to a tree. Returns the expression (taking the trees as `t0`, `t1`) and each
/// node's references as indices (`count` and `count + 1` are the trees).
fn dag_expression(seed: u64, count: usize) -> (String, Vec<BTreeSet<usize>>) {
    let mut rng = Rng::new(seed);
    let mut refs = Vec::new();
    let mut expr = String::from("{ t0, t1 }:\nlet\n");
    expr.push_str(&format!("  n{count} = builtins.storePath t0;\n  n{} = builtins.storePath t1;\n", count + 1));
    for i in 0..count {
        let mut r = BTreeSet::new();
        if i > 0 {
            for _ in 0..rng.below(4) {
                r.insert(rng.below(i as u64) as usize);
            }
        }
        if rng.below(10) == 0 {
            r.insert(count + rng.below(2) as usize);
        }
        let mentions: String = r.iter().map(|j| format!(" ${{n{j}}}")).collect();
        expr.push_str(&format!(
            "  n{i} = builtins.toFile \"node-{i}\" \"gc interop {seed} node {i}:{mentions}\\n\";\n"
        ));
        refs.push(r);
    }
    expr.push_str("in [");
    for i in 0..count {
        expr.push_str(&format!(" n{i}"));
    }
    expr.push_str(" ]\n");
    (expr, refs)
}

#[test]
fn cairn_and_nix_collect_the_same_paths() {
    if !require_peer("nix-store") || !require_peer("nix") || !require_peer("nix-instantiate") {
        return;
    }
    const NODES: usize = 200;
    let n = NixStore::new();
    let st = TestStore::builder().store_dir("/nix/store").start();
    let work = tempfile::tempdir().unwrap();

    // Two trees, added to Nix.
    let mut trees = Vec::new();
    for t in 0..2 {
        let dir = work.path().join(format!("interop-tree-{t}"));
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("bin/tool"), format!("#!/bin/sh\necho tree {t}\n")).unwrap();
        fs::write(dir.join("data"), vec![t as u8; 4000]).unwrap();
        trees.push(line(&text(n.ok("nix-store", &["--add", utf8(&dir)]))));
    }
    // The DAG, evaluated by Nix.
    let (expr, node_refs) = dag_expression(2024, NODES);
    let file = work.path().join("dag.nix");
    fs::write(&file, &expr).unwrap();
    let v = nix_eval(&n, &file, &["--argstr", "t0", &trees[0], "--argstr", "t1", &trees[1]]);
    let mut paths: Vec<String> = v.as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()).collect();
    assert_eq!(paths.len(), NODES);
    paths.extend(trees.iter().cloned());
    let refs: BTreeMap<String, Vec<String>> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let r = if i < NODES { node_refs[i].iter().map(|&j| paths[j].clone()).collect() } else { vec![] };
            (p.clone(), r)
        })
        .collect();
    let all = set(&paths);
    assert_eq!(nix_valid(&n), all, "the Nix store holds the DAG and nothing else");
    copy_to_cairn(&n, &st, &all);
    assert_cairn_valid(&st, &all, "after the import");

    // The same roots in both: permanent symlinks to paths (logical form), one into a tree, one
    // to a path that is not valid, one out of the store; and an indirect root each.
    let mut rng = Rng::new(7);
    let mut roots = BTreeSet::new();
    let (ng, cg) = (nix_gcroots(&n), cairn_gcroots(&st));
    for dir in [&ng, &cg] {
        fs::create_dir_all(dir.join("nested")).unwrap();
    }
    for k in 0..8 {
        let p = &paths[NODES / 2 + rng.below((NODES / 2) as u64) as usize];
        roots.insert(p.clone());
        for dir in [&ng, &cg] {
            let at = if k % 2 == 0 { dir.join(format!("root-{k}")) } else { dir.join(format!("nested/root-{k}")) };
            symlink(p, at).unwrap();
        }
    }
    roots.insert(trees[1].clone());
    let missing = format!("/nix/store/{}-not-here", "0".repeat(32));
    for dir in [&ng, &cg] {
        symlink(format!("{}/bin/tool", trees[1]), dir.join("into-a-tree")).unwrap();
        symlink(&missing, dir.join("invalid")).unwrap();
        symlink("/etc/hostname", dir.join("elsewhere")).unwrap();
    }
    let indirect = &paths[NODES / 3];
    roots.insert(indirect.clone());
    let (nix_link, cairn_link) = (work.path().join("nix-result"), work.path().join("cairn-result"));
    n.ok("nix-store", &["--realise", indirect, "--add-root", utf8(&nix_link)]);
    st.ok(&["add-root", utf8(&cairn_link), indirect]);

    let live = closure(&refs, &roots);
    let dead: BTreeSet<String> = all.difference(&live).cloned().collect();
    assert!(live.len() > 20 && dead.len() > 20, "a DAG worth collecting: {} live, {} dead", live.len(), dead.len());
    assert_eq!(nix_print(&n, "--print-dead"), dead, "nix-store --gc --print-dead");
    assert_eq!(cairn_print(&st, "--print-dead"), dead, "cairn gc --print-dead");
    assert_eq!(nix_print(&n, "--print-live"), live, "nix-store --gc --print-live");
    assert_eq!(cairn_print(&st, "--print-live"), live, "cairn gc --print-live");

    // Both collectors, then the same paths are left.
    let out = text(n.ok("nix-store", &["--gc"]));
    assert_eq!(line(&out).split(' ').next(), Some(dead.len().to_string().as_str()), "nix-store --gc: {out}");
    let r = json(&st.ok(&["gc", "--json"]));
    let deleted = set(r["deleted"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()));
    assert_eq!(deleted, dead, "cairn gc deletes what Nix deletes");
    assert_eq!(nix_valid(&n), live, "Nix keeps the live paths");
    assert_eq!(entries(&n.root.path().join("nix/store")), bases(&live));
    assert_cairn_valid(&st, &live, "after both collections");

    // Without the indirect roots and half of the permanent ones, once more.
    fs::remove_file(&nix_link).unwrap();
    fs::remove_file(&cairn_link).unwrap();
    roots.remove(indirect);
    for k in (1..8).step_by(2) {
        let p = fs::read_link(ng.join(format!("nested/root-{k}"))).unwrap();
        let p = utf8(&p).to_owned();
        for dir in [&ng, &cg] {
            fs::remove_file(dir.join(format!("nested/root-{k}"))).unwrap();
        }
        // Another root may point at the same path.
        let still = (0..8).step_by(2).any(|j| fs::read_link(ng.join(format!("root-{j}"))).unwrap() == Path::new(&p));
        if !still {
            roots.remove(&p);
        }
    }
    let live2 = closure(&refs, &roots);
    let dead2: BTreeSet<String> = live.difference(&live2).cloned().collect();
    assert!(!dead2.is_empty(), "removing roots frees something");
    assert_eq!(nix_print(&n, "--print-dead"), dead2);
    assert_eq!(cairn_print(&st, "--print-dead"), dead2);
    n.ok("nix-store", &["--gc"]);
    assert_eq!(
        set(json(&st.ok(&["gc", "--json"]))["deleted"].as_array().unwrap().iter().map(|p| p.as_str().unwrap())),
        dead2
    );
    assert_eq!(nix_valid(&n), live2);
    assert_cairn_valid(&st, &live2, "second round");
    // Nix removed its stale indirect root; so did cairn.
    let autos = |dir: &Path| fs::read_dir(dir.join("auto")).map(|d| d.count()).unwrap_or(0);
    assert_eq!((autos(&ng), autos(&cg)), (0, 0));

    // The indirect root of one link has the same name in both stores.
    let keep = live2.iter().next().unwrap().clone();
    let link = work.path().join("same-link");
    n.ok("nix-store", &["--realise", &keep, "--add-root", utf8(&link)]);
    fs::remove_file(&link).unwrap();
    st.ok(&["add-root", utf8(&link), &keep]);
    let names = |dir: &Path| -> BTreeSet<String> {
        fs::read_dir(dir.join("auto"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(&cg), names(&ng), "gcroots/auto names");
    assert_eq!(names(&cg).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Derivations: keep-derivations and keep-outputs

/// Nix settings for building in a private store: the sandbox needs the host's shell.
const BUILD_CONFIG: &str = "substituters =\nexperimental-features = nix-command\nsandbox = false\n\
    build-users-group =\nextra-sandbox-paths = /bin /lib /lib64 /usr\n";

/// Two derivations, each with a builder script only the derivation refers to, and an output
/// that refers to a shared dependency.
const DERIVATIONS: &str = r#"
let
  dep = builtins.toFile "gc-interop-dep" "a dependency of both outputs\n";
  drv = n: derivation {
    name = "gc-interop-out-${n}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ (builtins.toFile "gc-interop-builder-${n}.sh" "echo ${dep} > $out\n") ];
  };
in { a = drv "a"; b = drv "b"; }
"#;

#[test]
fn keep_derivations_and_keep_outputs_as_nix() {
    if !require_peer("nix-store") || !require_peer("nix") || !require_peer("nix-instantiate") {
        return;
    }
    let n = NixStore::new();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("drvs.nix");
    fs::write(&file, DERIVATIONS).unwrap();
    let nix_build = |args: &[&str]| -> String {
        let out = n.cmd("nix-store").env("NIX_CONFIG", BUILD_CONFIG).args(args).output().unwrap();
        assert!(out.status.success(), "nix-store {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
        text(out.stdout)
    };
    let drvs = lines(&text(n.ok("nix-instantiate", &[utf8(&file)])));
    assert_eq!(drvs.len(), 2, "{drvs:?}");
    let mut args = vec!["--realise"];
    args.extend(drvs.iter().map(String::as_str));
    let outs = lines(&nix_build(&args));
    assert_eq!(outs.len(), 2);
    let (drv_a, drv_b) = if drvs[0].ends_with("-a.drv") { (&drvs[0], &drvs[1]) } else { (&drvs[1], &drvs[0]) };
    let (out_a, out_b) = if outs[0].ends_with("-a") { (&outs[0], &outs[1]) } else { (&outs[1], &outs[0]) };
    let all = nix_valid(&n);
    assert_eq!(all.len(), 7, "dep, two builders, two derivations, two outputs: {all:?}");
    let drv_closure = |d: &str| set(lines(&text(n.ok("nix-store", &["-qR", d]))));
    let out_closure = |o: &str| set(lines(&text(n.ok("nix-store", &["-qR", o]))));
    assert_eq!(
        lines(&text(n.ok("nix-store", &["-q", "--deriver", out_a]))),
        std::slice::from_ref(drv_a),
        "Nix records the deriver"
    );

    // Roots: the output of a, and the derivation of b.
    fs::create_dir_all(nix_gcroots(&n)).unwrap();
    symlink(out_a, nix_gcroots(&n).join("out-a")).unwrap();
    symlink(drv_b, nix_gcroots(&n).join("drv-b")).unwrap();

    // Each combination of the settings, in Nix and in a cairn store that imported everything.
    for (keep_derivations, keep_outputs) in [(true, false), (false, false), (true, true), (false, true)] {
        let what = format!("keep-derivations = {keep_derivations}, keep-outputs = {keep_outputs}");
        let st = TestStore::builder()
            .store_dir("/nix/store")
            .config(&format!("keep-derivations = {keep_derivations}\nkeep-outputs = {keep_outputs}\n"))
            .start();
        copy_to_cairn(&n, &st, &all);
        let cg = cairn_gcroots(&st);
        fs::create_dir_all(&cg).unwrap();
        symlink(out_a, cg.join("out-a")).unwrap();
        symlink(drv_b, cg.join("drv-b")).unwrap();

        // Expected, from the settings' definitions.
        let mut live = out_closure(out_a);
        live.extend(drv_closure(drv_b));
        if keep_derivations {
            live.extend(drv_closure(drv_a));
        }
        if keep_outputs {
            live.extend(out_closure(out_b));
        }
        let dead: BTreeSet<String> = all.difference(&live).cloned().collect();
        let nix_dead = set(lines(&text(
            n.cmd("nix-store")
                .args(["--gc", "--print-dead"])
                .args(["--option", "keep-derivations", &keep_derivations.to_string()])
                .args(["--option", "keep-outputs", &keep_outputs.to_string()])
                .output()
                .unwrap()
                .stdout,
        )));
        assert_eq!(nix_dead, dead, "Nix, {what}");
        assert_eq!(cairn_print(&st, "--print-dead"), dead, "cairn, {what}");
        let r = json(&st.ok(&["gc", "--json"]));
        assert_eq!(set(r["deleted"].as_array().unwrap().iter().map(|p| p.as_str().unwrap())), dead, "{what}");
        assert_cairn_valid(&st, &live, &what);
    }
}
