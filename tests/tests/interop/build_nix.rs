//! Builds compared with real Nix 2.8: the derivations of `nix/tests/builds.nix` are written by
//! real `nix-instantiate`, exported into cairn, and realised by both (each sandboxed, with a
//! static busybox as `/bin/sh`). cairn must compute the same output paths as `nix-store -q
//! --outputs`, and every output must have the same NAR hash, references and content address as
//! Nix's.
//!
//! Needs `nix-instantiate`/`nix-store` (Debian `nix-bin`) and `/bin/busybox` (`busybox-static`).

use std::collections::BTreeMap;
use std::path::Path;

use cairn_tests::{hello_nar_hash, output_with_stdin, require_peer, NixStore, TestStore};

const NIX_CONFIG: &str = "substituters =\nexperimental-features = nix-command\nbuild-users-group =\nsandbox = true\n\
                          sandbox-paths = /bin/sh=/bin/busybox\nmax-jobs = 2\n";

fn nix(n: &NixStore, tool: &str, args: &[&str]) -> String {
    let out = n.cmd(tool).env("NIX_CONFIG", NIX_CONFIG).args(args).output().unwrap();
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// (references, ca) of each path in a `path-info --json` answer, by path.
fn metadata(json: &str) -> BTreeMap<String, (Vec<String>, Option<String>, String)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let mut refs: Vec<String> =
                i["references"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect();
            refs.sort();
            let ca = i["ca"].as_str().map(str::to_owned);
            let hash = i["narHash"].as_str().unwrap().to_owned();
            (i["path"].as_str().unwrap().to_owned(), (refs, ca, hash))
        })
        .collect()
}

#[test]
fn cairn_builds_what_nix_builds_byte_for_byte() {
    if !require_peer("nix-instantiate") || !require_peer("/bin/busybox") {
        return;
    }
    let n = NixStore::new();
    let expr = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nix/tests/builds.nix");
    let drvs: Vec<String> =
        nix(&n, "nix-instantiate", &[expr.to_str().unwrap(), "--argstr", "narHash", &hello_nar_hash()])
            .lines()
            .map(str::to_owned)
            .collect();
    assert_eq!(drvs.len(), 11, "{drvs:?}");
    let mut closure_args = vec!["-qR"];
    closure_args.extend(drvs.iter().map(String::as_str));
    let closure = nix(&n, "nix-store", &closure_args);
    let mut export_args = vec!["--export"];
    export_args.extend(closure.lines());
    let stream = n.cmd("nix-store").env("NIX_CONFIG", NIX_CONFIG).args(&export_args).output().unwrap().stdout;

    let s = TestStore::builder()
        .store_dir("/nix/store")
        .config("sandbox-paths = [\"/bin/sh=/bin/busybox\"]\nmax-jobs = 2\n")
        .start();
    let imported = output_with_stdin(s.cairn().arg("import"), &stream);
    assert!(imported.status.success(), "{}", String::from_utf8_lossy(&imported.stderr));

    // Output paths: recomputed by cairn from the derivations, as Nix computed them.
    let mut outputs = Vec::new();
    for d in &drvs {
        let mut theirs: Vec<String> =
            nix(&n, "nix-store", &["-q", "--outputs", d]).lines().map(str::to_owned).collect();
        let mut ours: Vec<String> = s.ok(&["derivation", "output-paths", d]).lines().map(str::to_owned).collect();
        theirs.sort();
        ours.sort();
        assert_eq!(ours, theirs, "outputs of {d}");
        outputs.extend(ours);
    }
    assert_eq!(outputs.len(), 14, "3 chain, 3 multi, 2 selfref, 4 fixed, uses-fixed, fan-out root: {outputs:?}");

    // Both build; the same outputs come out.
    let mut realise = vec!["--realise"];
    realise.extend(drvs.iter().map(String::as_str));
    let mut theirs: Vec<String> = nix(&n, "nix-store", &realise).lines().map(str::to_owned).collect();
    let mut args = vec!["realise", "-Q"];
    args.extend(drvs.iter().map(String::as_str));
    let mut ours: Vec<String> = s.ok(&args).lines().map(str::to_owned).collect();
    theirs.sort();
    ours.sort();
    assert_eq!(ours, theirs);

    let mut info_args = vec!["path-info", "--json"];
    info_args.extend(ours.iter().map(String::as_str));
    let mine = metadata(&s.ok(&info_args));
    let mut nix_args = vec!["path-info", "--json"];
    nix_args.extend(ours.iter().map(String::as_str));
    let nixs = metadata(&nix(&n, "nix", &nix_args));
    assert_eq!(mine.len(), ours.len());
    for (p, m) in &mine {
        assert_eq!(Some(m), nixs.get(p), "{p}: cairn (refs, ca, narHash) vs Nix");
    }
    // The cases the expressions set up, checked on cairn's side.
    let find = |suffix: &str| ours.iter().find(|p| p.ends_with(suffix)).unwrap().clone();
    let (out, dev) = (find("-multi"), find("-multi-dev"));
    assert_eq!(mine[&dev].0, vec![out.clone()], "dev refers to out");
    let (selfref, lib) = (find("-selfref"), find("-selfref-lib"));
    let mut both = vec![selfref.clone(), lib];
    both.sort();
    assert_eq!(mine[&selfref].0, both, "an output refers to itself and its sibling");
    assert!(mine[&find("-recursive")].1.as_deref().unwrap().starts_with("fixed:r:sha256:"));
    assert!(mine[&find("-flat-sha1")].1.as_deref().unwrap().starts_with("fixed:sha1:"));
    assert!(mine[&find("-flat-sha512")].1.as_deref().unwrap().starts_with("fixed:sha512:"));
    let fan: serde_json::Value = serde_json::from_str(&s.ok(&["path-info", "--json", &find("-fanout-root")])).unwrap();
    assert_eq!(fan[0]["references"].as_array().unwrap().len(), 0, "the root copies its leaves' contents");
    assert_eq!(s.ok(&["closure", &find("-fanout-root")]).lines().count(), 1);
}
