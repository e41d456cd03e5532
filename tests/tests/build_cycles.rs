//! A build whose outputs refer to each other in a cycle is refused — and the daemon goes on.
//!
//! Nix refuses such outputs ("cycle detected in the references of …"). The refusal must come
//! before anything is committed: no row in the database, nothing left in the store, and no lock
//! left poisoned for everyone else (the bug this pins: a panic in registration after the commit,
//! while the graph's write lock was held, failed every later import and build).

use std::collections::BTreeMap;

use cairn_e2e::{line, require_peer, TestStore};

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
    assert!(err.contains("cycle detected in the references of"), "{err}");
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
