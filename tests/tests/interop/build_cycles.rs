//! A build whose outputs refer to each other in a cycle is refused — and the daemon goes on.
//!
//! Nix refuses such outputs ("cycle detected in build of …"). The refusal must come
//! before anything is committed: no row in the database, nothing left in the store, and no lock
//! left poisoned for everyone else (the bug this pins: a panic in registration after the commit,
//! while the graph's write lock was held, failed every later import and build).

use std::collections::BTreeMap;

use cairn_tests::{line, require_peer, TestStore};

const BUSYBOX: &str = "/bin/busybox";

fn multi_output_drv(name: &str, outputs: &[&str], script: &str) -> String {
    let mut env = BTreeMap::from([
        ("name".to_owned(), name.to_owned()),
        ("builder".to_owned(), "/bin/sh".to_owned()),
        ("system".to_owned(), "x86_64-linux".to_owned()),
        ("outputs".to_owned(), outputs.join(" ")),
    ]);
    let mut outs = serde_json::Map::new();
    for o in outputs {
        env.insert((*o).to_owned(), String::new());
        outs.insert((*o).to_owned(), serde_json::json!({ "path": "" }));
    }
    serde_json::json!({
        "outputs": outs,
        "inputSrcs": [],
        "inputDrvs": {},
        "system": "x86_64-linux",
        "builder": "/bin/sh",
        "args": ["-c", script],
        "env": env,
    })
    .to_string()
}

fn add_drv(st: &TestStore, file: &str, json: &str) -> String {
    let f = st.root.path().join(file);
    std::fs::write(&f, json).unwrap();
    line(&st.ok(&["derivation", "add", f.to_str().unwrap()]))
}

#[test]
fn cyclic_outputs_are_refused_before_commit_and_the_daemon_keeps_serving() {
    if !require_peer(BUSYBOX) {
        return;
    }
    let st = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!("sandbox-paths = [\"/bin/sh={BUSYBOX}\"]\n"))
        .start();
    // a → c → b → a.
    let cyclic = add_drv(
        &st,
        "cyclic.json",
        &multi_output_drv(
            "cyclic",
            &["a", "b", "c"],
            "mkdir $a $b $c; echo $c > $a/ref; echo $b > $c/ref; echo $a > $b/ref",
        ),
    );
    let outputs: Vec<String> = st.ok(&["derivation", "output-paths", &cyclic]).lines().map(str::to_owned).collect();
    assert_eq!(outputs.len(), 3, "{outputs:?}");
    let out = st.run(&["realise", &cyclic], b"");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the cyclic build must fail");
    assert!(
        err.contains(&format!("cycle detected in build of '{cyclic}' in the references of output 'a' from output 'b'")),
        "Nix's words, naming the outputs Nix names: {err}"
    );
    for o in &outputs {
        assert!(!st.run(&["path-info", o], b"").status.success(), "'{o}' must not be registered");
        let base = o.rsplit('/').next().unwrap();
        assert!(!st.store_entries().iter().any(|e| e == base), "nothing of '{o}' is left in the store");
    }

    // The same daemon still builds (outputs referring to each other without a cycle are fine) …
    let fine = add_drv(
        &st,
        "fine.json",
        &multi_output_drv("fine", &["out", "dev"], "mkdir $out $dev; echo $out > $dev/ref; echo $out > $out/self"),
    );
    st.ok(&["realise", &fine]);
    // … imports …
    let other = TestStore::builder().store_dir("/nix/store").start();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("f"), b"imported\n").unwrap();
    let p = line(&other.ok(&["add", src.path().join("f").to_str().unwrap()]));
    st.ok_bytes(&["import"], &other.ok_bytes(&["export", &p], b""));
    // … answers closure queries from the graph, and its database holds no lie.
    st.ok(&["path-info", "--closure", &p]);
    st.ok(&["verify", "--check-contents"]);
    assert!(!st.log().contains("panicked"), "{}", st.log());
}

/// Whether the distinct-path edges `from → to` among `n` outputs form a cycle (Nix's rule:
/// outputs are registered in topological order, and a cycle has none).
fn has_cycle(n: usize, edges: &[(usize, usize)]) -> bool {
    let mut indegree = vec![0usize; n];
    let distinct: std::collections::BTreeSet<(usize, usize)> = edges.iter().copied().filter(|(a, b)| a != b).collect();
    for (_, b) in &distinct {
        indegree[*b] += 1;
    }
    let mut ready: Vec<usize> = (0..n).filter(|i| indegree[*i] == 0).collect();
    let mut sorted = 0;
    while let Some(v) = ready.pop() {
        sorted += 1;
        for (_, b) in distinct.iter().filter(|(a, _)| *a == v) {
            indegree[*b] -= 1;
            if indegree[*b] == 0 {
                ready.push(*b);
            }
        }
    }
    sorted != n
}

/// Random multi-output builders whose outputs refer to random sets of each other (themselves
/// included) and to an input: each is instantiated by real Nix 2.8, then realised by Nix and by
/// cairn. Both accept exactly the acyclic ones (with the same NAR hashes) and refuse the cyclic
/// ones with the same "cycle detected in build of …" line; the daemon keeps serving after every
/// case.
#[test]
fn random_output_reference_graphs_get_nixs_verdict_and_the_daemon_keeps_serving() {
    if !require_peer(BUSYBOX) || !require_peer("nix-instantiate") {
        return;
    }
    let nix_config = "substituters =\nexperimental-features = nix-command\nbuild-users-group =\nsandbox = true\n\
                      sandbox-paths = /bin/sh=/bin/busybox\n";
    let nix = cairn_tests::NixStore::new();
    let nix_run = |args: &[&str]| nix.cmd(args[0]).env("NIX_CONFIG", nix_config).args(&args[1..]).output().unwrap();
    let st = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!("sandbox-paths = [\"/bin/sh={BUSYBOX}\"]\n"))
        .start();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = cairn_tests::Rng::new(18);
    let (mut cyclic_cases, mut acyclic_cases) = (0, 0);
    for case in 0..16 {
        let n = 2 + rng.below(3) as usize;
        let edges: Vec<(usize, usize)> =
            (0..rng.below(5)).map(|_| (rng.below(n as u64) as usize, rng.below(n as u64) as usize)).collect();
        let cyclic = has_cycle(n, &edges);
        let outputs: Vec<String> = (0..n).map(|i| format!("o{i}")).collect();
        let mut script = format!("mkdir {}; ", outputs.iter().map(|o| format!("${o}")).collect::<Vec<_>>().join(" "));
        for (k, (a, b)) in edges.iter().enumerate() {
            script.push_str(&format!("echo ${} > $o{a}/r{k}; ", outputs[*b]));
        }
        script.push_str("echo $input > $o0/input");
        let expr = format!(
            "let input = builtins.toFile \"input-{case}\" \"x\"; in derivation {{ name = \"graph-{case}\"; \
             system = \"x86_64-linux\"; builder = \"/bin/sh\"; outputs = [ {} ]; inherit input; args = [ \"-c\" {script:?} ]; }}",
            outputs.iter().map(|o| format!("\"{o}\"")).collect::<Vec<_>>().join(" ")
        );
        let file = dir.path().join(format!("graph-{case}.nix"));
        std::fs::write(&file, expr).unwrap();
        let out = nix_run(&["nix-instantiate", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // Nix prints `DRV!OUTPUT` when the first output is not `out`.
        let drv = line(&String::from_utf8(out.stdout).unwrap()).split('!').next().unwrap().to_owned();
        let closure = nix_run(&["nix-store", "-qR", &drv]);
        assert!(closure.status.success(), "{}", String::from_utf8_lossy(&closure.stderr));
        let closure = String::from_utf8(closure.stdout).unwrap();
        let mut export = vec!["nix-store", "--export"];
        export.extend(closure.lines());
        let stream = nix_run(&export);
        assert!(stream.status.success(), "{}", String::from_utf8_lossy(&stream.stderr));
        st.ok_bytes(&["import"], &stream.stdout);

        let by_nix = nix_run(&["nix-store", "--realise", &drv]);
        let by_cairn = st.run(&["realise", &drv], b"");
        let (nix_err, cairn_err) = (
            String::from_utf8_lossy(&by_nix.stderr).into_owned(),
            String::from_utf8_lossy(&by_cairn.stderr).into_owned(),
        );
        assert_eq!(by_nix.status.success(), !cyclic, "case {case} {edges:?}: Nix's verdict is the rule's: {nix_err}");
        assert_eq!(by_cairn.status.success(), !cyclic, "case {case} {edges:?}: cairn's verdict is Nix's: {cairn_err}");
        if cyclic {
            cyclic_cases += 1;
            let said = nix_err.lines().find_map(|l| l.strip_prefix("error: ")).unwrap_or_default();
            assert!(said.starts_with("cycle detected in build of"), "{nix_err}");
            assert!(cairn_err.contains(said), "case {case}: cairn says what Nix says ({said}): {cairn_err}");
        } else {
            acyclic_cases += 1;
            let cairn_outs = String::from_utf8(by_cairn.stdout).unwrap();
            let nix_outs = String::from_utf8(by_nix.stdout).unwrap();
            let mut ours_args = vec!["path-info", "--json", "--closure"];
            ours_args.extend(cairn_outs.lines());
            let ours = st.ok(&ours_args);
            let mut theirs_args = vec!["nix", "path-info", "--json", "--recursive"];
            theirs_args.extend(nix_outs.lines());
            let theirs = String::from_utf8(nix_run(&theirs_args).stdout).unwrap();
            let hashes = |json: &str| -> std::collections::BTreeMap<String, String> {
                let v: serde_json::Value = serde_json::from_str(json).unwrap();
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|i| (i["path"].as_str().unwrap().to_owned(), i["narHash"].as_str().unwrap().to_owned()))
                    .collect()
            };
            assert_eq!(hashes(&ours), hashes(&theirs), "case {case}: the same outputs, byte for byte");
        }
        // Still serving: a query and an add answer after every case.
        st.ok(&["path-info", &drv]);
    }
    assert!(cyclic_cases > 0 && acyclic_cases > 0, "both kinds were drawn ({cyclic_cases} cyclic)");
    st.ok(&["verify", "--check-contents"]);
}
