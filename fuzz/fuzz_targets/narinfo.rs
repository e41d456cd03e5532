//! Binary-cache `.narinfo` and `nix-cache-info` files (fetched from caches, sent in pushes).
//! Contract: no panic; a narinfo that parses renders to text that parses as the same narinfo,
//! and its fingerprint and signature checks never panic.
#![no_main]

use cairn_nix::narinfo::{CacheInfo, NarInfo};
use cairn_nix::signing::PublicKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(text) = cairn_fuzz::text(data) else { return };
    let dir = cairn_fuzz::store_dir();
    if let Ok(info) = NarInfo::parse(&dir, text) {
        let rendered = info.render(&dir);
        let again = NarInfo::parse(&dir, &rendered).expect("a rendered narinfo parses");
        assert_eq!(again, info, "render then parse gives the same narinfo");
        let _ = info.fingerprint(&dir);
        let key =
            PublicKey::parse("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=").expect("a valid key");
        let _ = info.is_signed_by(&dir, &[key]);
    }
    if let Ok(ci) = CacheInfo::parse(&dir, text) {
        let again = CacheInfo::parse(&dir, &ci.render()).expect("a rendered nix-cache-info parses");
        assert_eq!(again, ci);
    }
});
