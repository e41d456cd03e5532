//! Golden derivations written by Nix 2.8 (see fixtures/derivations/README.md): parsed and
//! reprinted byte for byte, and every output path recomputed.

use std::collections::BTreeMap;
use std::path::Path;

use cairn_nix::derivation::{Derivation, DerivationError};
use cairn_nix::{Hash, StoreDir};

fn fixtures() -> BTreeMap<String, Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/derivations");
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "drv"))
        .map(|p| (format!("/nix/store/{}", p.file_name().unwrap().to_str().unwrap()), std::fs::read(&p).unwrap()))
        .collect()
}

fn modulo(all: &BTreeMap<String, Vec<u8>>, path: &str) -> Result<BTreeMap<String, Hash>, DerivationError> {
    let drv = Derivation::parse(&all[path])?;
    drv.hash_modulo(false, &mut |p| modulo(all, p))
}

#[test]
fn golden_derivations_round_trip_byte_for_byte() {
    let all = fixtures();
    assert_eq!(all.len(), 5);
    for (path, bytes) in &all {
        let drv = Derivation::parse(bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(drv.to_aterm().as_bytes(), &bytes[..], "{path}");
    }
}

#[test]
fn output_paths_are_the_ones_nix_wrote() {
    let all = fixtures();
    let dir = StoreDir::new("/nix/store").unwrap();
    for (path, bytes) in &all {
        let drv = Derivation::parse(bytes).unwrap();
        let name = path.rsplit('/').next().unwrap().split_once('-').unwrap().1.trim_end_matches(".drv");
        let computed = drv.output_paths(&dir, name, &mut |p| modulo(&all, p)).unwrap();
        assert_eq!(computed.len(), drv.outputs.len(), "{path}");
        for (name, out) in &drv.outputs {
            assert_eq!(dir.display(&computed[name]), out.path, "{path} output {name}");
        }
    }
}

#[test]
fn malformed_derivations_are_refused() {
    let good = fixtures().into_values().next().unwrap();
    assert!(Derivation::parse(&good).is_ok());
    for cut in 0..good.len() {
        assert!(Derivation::parse(&good[..cut]).is_err(), "cut at {cut}");
    }
    let mut trailing = good.clone();
    trailing.push(b' ');
    assert_eq!(Derivation::parse(&trailing), Err(DerivationError::Trailing));
    let unsorted = br#"Derive([("out","","",""),("dev","","","")],[],[],"x","/bin/sh",[],[])"#;
    assert!(matches!(Derivation::parse(unsorted), Err(DerivationError::Unsorted { .. })));
    let dup_env = br#"Derive([],[],[],"x","b",[],[("a","1"),("a","2")])"#;
    assert!(matches!(Derivation::parse(dup_env), Err(DerivationError::Unsorted { .. })));
}

#[test]
fn json_is_what_nix_show_derivation_prints() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/derivations");
    for (name, bytes) in fixtures() {
        let drv = Derivation::parse(&bytes).unwrap();
        let path = name.clone();
        let base = name.trim_start_matches("/nix/store/").replace(".drv", ".json");
        let json = std::fs::read_to_string(dir.join(base)).unwrap();
        assert_eq!(drv.to_json(&path), json, "{name}");
        let (key, back) = Derivation::from_json(&json).unwrap();
        assert_eq!((key.as_deref(), back), (Some(path.as_str()), drv), "{name}");
    }
    assert!(Derivation::from_json("{\"outputs\": {}}").unwrap_err().contains("missing field"));
    assert!(Derivation::from_json("[1]").is_err());
}
