//! The verbs Nix users reach for, against real Nix 2.8 on the same closures: `why-depends`
//! (`nix why-depends`), `diff-closures` (`nix store diff-closures`), `path-info -s/-S/-h`
//! (`nix path-info`), `path-info --json` on an invalid path, and the order in which `realise`
//! prints a derivation's outputs (`nix-store --realise`).
//!
//! The closures are `builtins.toFile` texts written by real `nix-instantiate` into a private Nix
//! store, exported with `nix-store --export` and imported into cairn, so both stores hold the same
//! paths with the same references and sizes. Nix writes ANSI colours even into pipes, cairn only
//! onto a terminal: outputs are compared with Nix's escapes removed.

use std::collections::BTreeMap;
use std::path::Path;

use cairn_tests::{output_with_stdin, require_peer, NixStore, TestStore};
use serde_json::Value;

/// Two generations of a small "system": zlib and python change versions, `gone` goes, `hello`
/// comes, python grows by more than 8 KiB and `gone` takes 11 KiB away; `openssl` and `curl`
/// keep their versions but change paths (their references changed).
const SYSTEMS: &str = r#"
let
  big = n: builtins.concatStringsSep "" (builtins.genList (i: "0123456789abcdef") n);
  f = builtins.toFile;
  glibc = f "glibc-2.34" "libc\n";
  zlib = f "zlib-1.2.11" "z ${glibc}\n";
  zlib2 = f "zlib-1.2.12" "z2 ${glibc}\n";
  openssl = f "openssl-1.1.1" "ssl ${zlib} ${glibc}";
  openssl2 = f "openssl-1.1.1" "ssl ${zlib2} ${glibc}";
  curl = f "curl-7.80" "${openssl} ${zlib}";
  curl2 = f "curl-7.80" "${openssl2} ${zlib2}";
  python = f "python3-3.9.1" "${openssl} ${glibc} ${big 1000}";
  python2 = f "python3-3.10.0" "${openssl2} ${glibc} ${big 2000}";
  hello = f "hello-2.12" "${glibc}";
  gone = f "gone" "${glibc} ${big 700}";
  libs = f "libs-1.0-lib64" "${glibc}";
  top1 = f "system-1" "${curl} ${python} ${gone} ${libs} ${big 100}";
  top2 = f "system-2" "${curl2} ${python2} ${hello}";
in { before = top1; after = top2; inherit glibc zlib openssl curl python hello; }
"#;

struct Both {
    nix: NixStore,
    cairn: TestStore,
    paths: BTreeMap<String, String>,
}

/// The systems in a private Nix store and, through an export stream, in a cairn store.
fn both() -> Option<Both> {
    if !require_peer("nix") || !require_peer("nix-store") || !require_peer("nix-instantiate") {
        return None;
    }
    let nix = NixStore::new();
    let json = nix.ok("nix-instantiate", &["--eval", "--read-write-mode", "--strict", "--json", "--expr", SYSTEMS]);
    let v: BTreeMap<String, String> = serde_json::from_slice(&json).unwrap();
    let closure = text(nix.ok("nix-store", &["-qR", &v["before"], &v["after"]]));
    let mut args = vec!["--export"];
    args.extend(closure.lines());
    let stream = nix.ok("nix-store", &args);
    let cairn = TestStore::builder().store_dir("/nix/store").start();
    cairn.ok_bytes(&["import"], &stream);
    Some(Both { nix, cairn, paths: v })
}

fn text(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap()
}

/// Removes ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Both {
    fn p(&self, name: &str) -> &str {
        &self.paths[name]
    }

    /// `nix ARGS` on the Nix store: (stdout without colours, stderr, exit code).
    fn nix(&self, args: &[&str]) -> (String, String, i32) {
        let out = self.nix.cmd("nix").args(args).output().unwrap();
        (strip_ansi(&text(out.stdout)), text(out.stderr), out.status.code().unwrap_or(-1))
    }

    /// `cairn ARGS` on the cairn store: (stdout, stderr, exit code).
    fn cairn(&self, args: &[&str]) -> (String, String, i32) {
        let out = output_with_stdin(self.cairn.cairn().args(args), b"");
        (text(out.stdout), text(out.stderr), out.status.code().unwrap_or(-1))
    }

    /// Asserts that `nix NIX_ARGS` and `cairn CAIRN_ARGS` print the same and both succeed;
    /// returns the output.
    fn same(&self, nix_args: &[&str], cairn_args: &[&str]) -> String {
        let (theirs, nix_err, nix_code) = self.nix(nix_args);
        assert_eq!(nix_code, 0, "nix {nix_args:?}: {nix_err}");
        let (ours, err, code) = self.cairn(cairn_args);
        assert_eq!(code, 0, "cairn {cairn_args:?}: {err}");
        assert_eq!(ours, theirs, "cairn {cairn_args:?} vs nix {nix_args:?}");
        ours
    }
}

#[test]
fn why_depends_prints_nix_s_chain_and_tree() {
    let Some(b) = both() else { return };
    let pairs = [
        ("before", "glibc"),
        ("before", "zlib"),
        ("before", "openssl"),
        ("before", "python"),
        ("curl", "glibc"),
        ("after", "glibc"),
        ("after", "hello"),
        ("glibc", "glibc"),
        ("before", "before"),
    ];
    for (from, to) in pairs {
        let (from, to) = (b.p(from), b.p(to));
        let chain = b.same(&["why-depends", from, to], &["why-depends", from, to]);
        let tree = b.same(&["why-depends", "--all", from, to], &["why-depends", "--all", from, to]);
        if from != to {
            assert!(chain.lines().count() >= 2, "{chain}");
            assert!(tree.lines().count() >= chain.lines().count(), "{tree}");
        }
        // The JSON chain is the printed one.
        let (json, err, code) = b.cairn(&["why-depends", "--json", from, to]);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(&json).unwrap();
        let listed: Vec<&str> = v["chain"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
        let printed: Vec<&str> =
            chain.lines().map(|l| l.trim_start_matches(|c: char| c == ' ' || !c.is_ascii())).collect();
        assert_eq!(listed, printed, "why-depends --json chain vs its tree");
    }
    // The whole tree of the first pair, spelled out (Nix's own answer is the one above).
    let (tree, ..) = b.cairn(&["why-depends", "-a", b.p("curl"), b.p("glibc")]);
    assert_eq!(
        tree,
        format!(
            "{curl}\n├───{z}\n│   └───{g}\n└───{o}\n    ├───{g}\n    └───{z}\n",
            curl = b.p("curl"),
            z = b.p("zlib"),
            o = b.p("openssl"),
            g = b.p("glibc")
        )
    );
    let (edges, ..) = b.cairn(&["why-depends", "--all", "--json", b.p("curl"), b.p("glibc")]);
    let v: Value = serde_json::from_str(&edges).unwrap();
    assert_eq!(v["edges"][b.p("curl")], serde_json::json!([b.p("zlib"), b.p("openssl")]));
    assert_eq!(v["edges"][b.p("openssl")], serde_json::json!([b.p("glibc"), b.p("zlib")]));

    // Not a dependency: said on stderr, exit status 0, as Nix.
    let (from, to) = (b.p("glibc"), b.p("before"));
    let (out, nix_err, nix_code) = b.nix(&["why-depends", from, to]);
    let (ours, err, code) = b.cairn(&["why-depends", from, to]);
    assert_eq!((ours.as_str(), code), (out.as_str(), nix_code));
    assert_eq!(err, nix_err);
    assert_eq!(err, format!("'{from}' does not depend on '{to}'\n"));
}

#[test]
fn diff_closures_prints_what_nix_prints() {
    let Some(b) = both() else { return };
    let (before, after) = (b.p("before"), b.p("after"));
    let diff = b.same(&["store", "diff-closures", before, after], &["diff-closures", before, after]);
    assert_eq!(
        diff,
        "gone: ε → ∅, -11.1 KiB\nhello: ∅ → 2.12\nlibs: 1.0 → ∅\npython3: 3.9.1 → 3.10.0, +15.6 KiB\n\
         system: 1 → 2\nzlib: 1.2.11 → 1.2.12\n"
    );
    b.same(&["store", "diff-closures", after, before], &["diff-closures", after, before]);
    assert_eq!(b.same(&["store", "diff-closures", before, before], &["diff-closures", before, before]), "");
    b.same(&["store", "diff-closures", b.p("curl"), after], &["diff-closures", b.p("curl"), after]);

    let (json, err, code) = b.cairn(&["diff-closures", "--json", before, after]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v["python3"],
        serde_json::json!({"versionsBefore": ["3.9.1"], "versionsAfter": ["3.10.0"], "sizeDelta": 16000})
    );
    assert_eq!(v.as_object().unwrap().len(), 6, "{v}");
}

#[test]
fn path_info_sizes_as_nix() {
    let Some(b) = both() else { return };
    let (before, glibc, python) = (b.p("before"), b.p("glibc"), b.p("python"));
    for flags in
        [&["-S"][..], &["-s"], &["-s", "-S"], &["-r", "-s", "-S"], &["-rS"], &["-r", "-h", "-S", "-s"], &["-Sh"]]
    {
        let mut args = vec!["path-info"];
        args.extend_from_slice(flags);
        args.extend([python, glibc, before]);
        let out = b.same(&args, &args);
        assert!(out.lines().all(|l| l.contains('\t')), "{out}");
    }
    // With --json, the closure size is a field, as Nix's `closureSize`.
    let sizes = |json: &str| -> BTreeMap<String, Value> {
        let v: Value = serde_json::from_str(json).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| (i["path"].as_str().unwrap().to_owned(), i["closureSize"].clone()))
            .collect()
    };
    let (theirs, ..) = b.nix(&["path-info", "--json", "-rS", before]);
    let (ours, ..) = b.cairn(&["path-info", "--json", "-rS", before]);
    assert_eq!(sizes(&ours), sizes(&theirs));
    assert_eq!(sizes(&ours).len(), 8);

    // du: the closure's size as -S adds it, its path count, and a total for shared closures.
    let s_line = b.cairn(&["path-info", "-S", before]).0;
    let closure_size: u64 = s_line.split('\t').nth(1).unwrap().trim().parse().unwrap();
    let (du, err, code) = b.cairn(&["du", "--bytes", before, python]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        du,
        format!(
            "{closure_size}\t8 paths\t{before}\n{}\t4 paths\t{python}\n{closure_size}\t8 paths\ttotal\n",
            b.cairn(&["path-info", "-S", python]).0.split('\t').nth(1).unwrap().trim()
        )
    );
    let (du, ..) = b.cairn(&["du", glibc]);
    assert_eq!(du, format!("120 B\t1 path\t{glibc}\n"));
}

#[test]
fn path_info_json_on_an_invalid_path_as_nix() {
    let Some(b) = both() else { return };
    let missing = "/nix/store/00000000000000000000000000000000-missing";
    let glibc = b.p("glibc");
    // Alone, and beside a valid path: `{"path", "valid": false}`, exit status 0.
    let (theirs, _, nix_code) = b.nix(&["path-info", "--json", missing]);
    let (ours, err, code) = b.cairn(&["path-info", "--json", missing]);
    assert_eq!((code, nix_code), (0, 0), "{err}");
    let (ours, theirs): (Value, Value) = (serde_json::from_str(&ours).unwrap(), serde_json::from_str(&theirs).unwrap());
    assert_eq!(ours, theirs);
    assert_eq!(ours, serde_json::json!([{ "path": missing, "valid": false }]));

    let (theirs, _, nix_code) = b.nix(&["path-info", "--json", glibc, missing]);
    let (ours, err, code) = b.cairn(&["path-info", "--json", glibc, missing]);
    assert_eq!((code, nix_code), (0, 0), "{err}");
    let by_path = |s: &str| -> BTreeMap<String, (Value, Value, Value)> {
        let v: Value = serde_json::from_str(s).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["path"].as_str().unwrap().to_owned(),
                    (i["valid"].clone(), i["narHash"].clone(), i["narSize"].clone()),
                )
            })
            .collect()
    };
    assert_eq!(by_path(&ours), by_path(&theirs));

    // Without --json, or with the closure of an invalid path, it is an error (exit status 1).
    let (_, nix_err, nix_code) = b.nix(&["path-info", missing]);
    let (_, err, code) = b.cairn(&["path-info", missing]);
    assert_eq!((code, nix_code), (1, 1), "{err}");
    assert!(nix_err.contains(&format!("error: path '{missing}' is not valid")), "{nix_err}");
    assert_eq!(err, format!("cairn: path '{missing}' is not valid\n"));
    let (_, _, nix_code) = b.nix(&["path-info", "--json", "-r", missing]);
    let (_, err, code) = b.cairn(&["path-info", "--json", "-r", missing]);
    assert_eq!((code, nix_code), (1, 1), "{err}");
}

/// `nix-store --realise` prints each derivation's outputs in store-path order (a `PathSet`), not
/// by output name: `multi`'s `doc`, `dev` and `out` come out in the order of their hashes.
#[test]
fn realise_prints_outputs_in_nix_s_order() {
    if !require_peer("nix-instantiate") || !require_peer("/bin/busybox") {
        return;
    }
    const NIX_CONFIG: &str = "substituters =\nexperimental-features = nix-command\nbuild-users-group =\n\
                              sandbox = true\nsandbox-paths = /bin/sh=/bin/busybox\n";
    let n = NixStore::new();
    let nix = |tool: &str, args: &[&str]| -> String {
        let out = n.cmd(tool).env("NIX_CONFIG", NIX_CONFIG).args(args).output().unwrap();
        assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        text(out.stdout)
    };
    let expr = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nix/tests/builds.nix");
    let expr = expr.to_str().unwrap();
    let mut drvs = Vec::new();
    for attr in ["multi", "selfref"] {
        drvs.push(nix("nix-instantiate", &[expr, "--argstr", "narHash", "0", "-A", attr]).trim().to_owned());
    }
    let closure = nix("nix-store", &["-qR", &drvs[0], &drvs[1]]);
    let mut export = vec!["--export"];
    export.extend(closure.lines());
    let stream = n.cmd("nix-store").env("NIX_CONFIG", NIX_CONFIG).args(&export).output().unwrap().stdout;
    let s = TestStore::builder().store_dir("/nix/store").config("sandbox-paths = [\"/bin/sh=/bin/busybox\"]\n").start();
    s.ok_bytes(&["import"], &stream);

    let args = [drvs[0].as_str(), drvs[1].as_str()];
    let theirs = nix("nix-store", &[&["--realise"][..], &args].concat());
    let ours = s.ok(&[&["realise", "-Q"][..], &args].concat());
    assert_eq!(ours, theirs);
    assert_eq!(ours.lines().count(), 5);
    // Some output is printed before one whose name sorts first, so the order is not by name.
    let names: Vec<&str> = ours.lines().map(|l| l.rsplit('-').next().unwrap()).collect();
    assert_ne!(names, ["dev", "doc", "multi", "lib", "selfref"], "{ours}");
    let one = format!("{}!out,dev", drvs[0]);
    assert_eq!(s.ok(&["realise", "-Q", &one]), nix("nix-store", &["--realise", &one]));
}
