//! `.drv` files in ATerm form (from imports, substitutes, the worker protocol's
//! `BuildDerivation`). Contract: no panic; a derivation that parses prints as ATerm that parses
//! as the same derivation, and its name, fixed-output hash, `hashDerivationModulo` and output
//! paths are computed or refused without a panic.
#![no_main]

use cairn_nix::derivation::{Derivation, DerivationError, OutputHashes};
use cairn_nix::hash::{Hash, HashAlgo};
use libfuzzer_sys::fuzz_target;

/// Every input derivation has one output, `out`, hashed from its path.
fn inputs(path: &str) -> Result<OutputHashes, DerivationError> {
    Ok(OutputHashes::from([("out".to_owned(), Hash::digest(HashAlgo::Sha256, path.as_bytes()))]))
}

fuzz_target!(|data: &[u8]| {
    let Ok(drv) = Derivation::parse(data) else { return };
    let aterm = drv.to_aterm();
    let again = Derivation::parse(aterm.as_bytes()).expect("a printed derivation parses");
    assert_eq!(again, drv, "print then parse gives the same derivation");
    let _ = drv.name();
    let _ = drv.fixed_output();
    let _ = drv.hash_modulo::<DerivationError>(true, &mut inputs);
    let _ = drv.hash_modulo::<DerivationError>(false, &mut inputs);
    let _ = drv.output_paths::<DerivationError>(&cairn_fuzz::store_dir(), &mut inputs);
});
