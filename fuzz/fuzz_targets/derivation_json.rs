//! Derivations in JSON form (`nix show-derivation`'s output, what `cairn derivation add`
//! reads). Contract: no panic; a derivation that parses prints as JSON that parses as the same
//! derivation under the same key, and as ATerm that parses back too.
#![no_main]

use cairn_nix::derivation::Derivation;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(text) = cairn_fuzz::text(data) else { return };
    let Ok((key, drv)) = Derivation::from_json(text) else { return };
    let key = key.unwrap_or_else(|| "/nix/store/00000000000000000000000000000000-x.drv".to_owned());
    let json = drv.to_json(&key);
    let (again_key, again) = Derivation::from_json(&json).expect("printed JSON parses");
    assert_eq!(again_key.as_deref(), Some(key.as_str()));
    assert_eq!(again, drv, "print then parse gives the same derivation");
    let aterm = drv.to_aterm();
    assert_eq!(Derivation::parse(aterm.as_bytes()).expect("its ATerm parses"), drv);
});
