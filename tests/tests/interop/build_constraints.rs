//! Reference constraints, `exportReferencesGraph` and structured attributes compared with real
//! Nix 2.8: every attribute of `nix/tests/constraints.nix` is instantiated by real
//! `nix-instantiate`, exported into cairn, and realised by both (each sandboxed, with a static
//! busybox as `/bin/sh`). Both must accept the same derivations — with the same output paths and
//! NAR hashes (so `.attrs.json`, `.attrs.sh`, the graph files and the builder's environment are
//! byte for byte Nix's) — and refuse the same ones, cairn's error carrying Nix's message with the
//! same output and offending paths. A refused output is never registered.
//!
//! Needs `nix-instantiate`/`nix-store` (Debian `nix-bin`) and `/bin/busybox` (`busybox-static`).

use std::collections::BTreeMap;
use std::path::Path;

use cairn_tests::{output_with_stdin, require_peer, NixStore, TestStore};

const NIX_CONFIG: &str = "substituters =\nexperimental-features = nix-command\nbuild-users-group =\nsandbox = true\n\
                          sandbox-paths = /bin/sh=/bin/busybox\nmax-jobs = 2\n";

/// A Nix command on the peer store, building as the tests expect (`TMPDIR=/tmp`: Nix 2.8 puts
/// its build directory's host path into `NIX_ATTRS_*_FILE`).
fn nix_cmd(n: &NixStore, tool: &str, args: &[&str]) -> std::process::Output {
    n.cmd(tool).env("NIX_CONFIG", NIX_CONFIG).env("TMPDIR", "/tmp").args(args).output().unwrap()
}

fn nix_ok(n: &NixStore, tool: &str, args: &[&str]) -> String {
    let out = nix_cmd(n, tool, args);
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Store paths named in a message, in order.
fn paths_in(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("/nix/store/") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| c.is_whitespace() || c == '\'' || c == '"').unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// narHash by path, from a `path-info --json` answer.
fn nar_hashes(json: &str) -> BTreeMap<String, String> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| (i["path"].as_str().unwrap().to_owned(), i["narHash"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn cairn_accepts_and_refuses_what_nix_does_with_the_same_bytes_and_messages() {
    if !require_peer("nix-instantiate") || !require_peer("/bin/busybox") {
        return;
    }
    let n = NixStore::new();
    let expr = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nix/tests/constraints.nix");
    let expr = expr.to_str().unwrap();
    let names =
        nix_ok(&n, "nix-instantiate", &["--eval", "--strict", "-E", &format!("builtins.attrNames (import {expr})")]);
    let names: Vec<String> =
        names.trim().trim_matches(['[', ']']).split_whitespace().map(|a| a.trim_matches('"').to_owned()).collect();
    assert!(names.len() >= 20, "{names:?}");
    let drvs: BTreeMap<String, String> =
        names.iter().map(|a| (a.clone(), nix_ok(&n, "nix-instantiate", &[expr, "-A", a]).trim().to_owned())).collect();

    let mut closure_args = vec!["-qR"];
    closure_args.extend(drvs.values().map(String::as_str));
    let closure = nix_ok(&n, "nix-store", &closure_args);
    let mut export_args = vec!["--export"];
    export_args.extend(closure.lines());
    let stream = nix_cmd(&n, "nix-store", &export_args).stdout;
    let s = TestStore::builder()
        .store_dir("/nix/store")
        .config("sandbox-paths = [\"/bin/sh=/bin/busybox\"]\nmax-jobs = 2\n")
        .start();
    let imported = output_with_stdin(s.cairn().arg("import"), &stream);
    assert!(imported.status.success(), "{}", String::from_utf8_lossy(&imported.stderr));

    let mut refused = Vec::new();
    for (attr, drv) in &drvs {
        let theirs = nix_cmd(&n, "nix-store", &["--realise", drv]);
        let ours = s.run(&["realise", "-Q", drv], b"");
        let (their_err, our_err) =
            (String::from_utf8_lossy(&theirs.stderr).into_owned(), String::from_utf8_lossy(&ours.stderr).into_owned());
        assert_eq!(
            ours.status.success(),
            theirs.status.success(),
            "{attr}: cairn and Nix disagree\nNix: {their_err}\ncairn: {our_err}"
        );
        assert_eq!(theirs.status.success(), !attr.starts_with("bad-"), "{attr}: {their_err}");
        if theirs.status.success() {
            let mut t: Vec<String> = String::from_utf8(theirs.stdout).unwrap().lines().map(str::to_owned).collect();
            let mut o: Vec<String> = String::from_utf8(ours.stdout).unwrap().lines().map(str::to_owned).collect();
            t.sort();
            o.sort();
            assert_eq!(o, t, "{attr}: output paths");
            let mut args = vec!["path-info", "--json"];
            args.extend(o.iter().map(String::as_str));
            assert_eq!(nar_hashes(&s.ok(&args)), nar_hashes(&nix_ok(&n, "nix", &args)), "{attr}: NAR hashes");
        } else {
            // Nix's first line, word for word, and the paths its message names.
            let line =
                their_err.lines().find_map(|l| l.strip_prefix("error: ")).unwrap_or_else(|| panic!("{their_err}"));
            assert!(our_err.contains(line), "{attr}: cairn's error lacks Nix's {line:?}:\n{our_err}");
            let named = paths_in(&their_err);
            for p in &named {
                assert!(our_err.contains(p.as_str()), "{attr}: cairn's error does not name {p}:\n{our_err}");
            }
            // Nothing of a refused build is registered.
            for o in s.ok(&["derivation", "output-paths", drv]).lines() {
                assert!(!s.run(&["path-info", o], b"").status.success(), "{attr}: '{o}' was registered");
            }
            refused.push(attr.clone());
        }
    }
    assert!(refused.len() >= 10, "{refused:?}");
    s.ok(&["verify", "--check-contents"]);
    assert!(!s.log().contains("panicked"), "{}", s.log());
}
