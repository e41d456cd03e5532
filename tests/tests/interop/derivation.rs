//! `cairn derivation show` prints what `nix show-derivation` (Nix 2.8) prints, byte for byte,
//! for derivations real `nix-instantiate` wrote and cairn imported.

use std::path::Path;

use cairn_tests::{require_peer, NixStore, TestStore};

#[test]
fn derivation_show_matches_nix() {
    if !require_peer("nix-instantiate") {
        return;
    }
    let nix = NixStore::new();
    let expr =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/cairn-nix/tests/fixtures/derivations/derivations.nix");
    let mut drvs = Vec::new();
    for attr in ["simple", "multi", "fixed", "fixedr", "dependent"] {
        let out = nix.ok("nix-instantiate", &[expr.to_str().unwrap(), "-A", attr]);
        drvs.push(String::from_utf8(out).unwrap().trim().to_owned());
    }
    let closure = String::from_utf8(nix.ok("nix-store", &["-qR", &drvs[4]])).unwrap();
    let closure: Vec<&str> = closure.lines().collect();
    let mut export = vec!["--export"];
    export.extend(&closure);
    let stream = nix.ok("nix-store", &export);
    let st = TestStore::builder().store_dir("/nix/store").start();
    st.ok_bytes(&["import"], &stream);

    let mut show = vec!["show-derivation"];
    show.extend(drvs.iter().map(String::as_str));
    let theirs = String::from_utf8(nix.ok("nix", &show)).unwrap();
    let mut ours = vec!["derivation", "show"];
    ours.extend(drvs.iter().map(String::as_str));
    assert_eq!(st.ok(&ours), theirs);
    for d in &drvs {
        let theirs = String::from_utf8(nix.ok("nix", &["show-derivation", d])).unwrap();
        assert_eq!(st.ok(&["derivation", "show", d]), theirs, "{d}");
    }
    // Not a derivation: one line, says so.
    let src = closure.iter().find(|p| p.ends_with("script.sh")).unwrap();
    assert!(st.fail(&["derivation", "show", src], b"").contains("not a derivation"));
}
