//! Signing keys and signatures in Nix's `name:base64` form (`trusted-public-keys`, key files,
//! narinfo `Sig:` lines). Input: `KEY\n--\nFINGERPRINT\n--\nSIGNATURE`. Contract: no panic;
//! a key that parses prints as text that parses as the same key; checking any signature of any
//! fingerprint is a yes or no.
#![no_main]

use cairn_nix::signing::{PublicKey, SecretKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = cairn_fuzz::parts(data, 3);
    let (Some(key), Some(fingerprint), Some(sig)) =
        (cairn_fuzz::text(p[0]), cairn_fuzz::text(p[1]), cairn_fuzz::text(p[2]))
    else {
        return;
    };
    if let Ok(pk) = PublicKey::parse(key) {
        let again = PublicKey::parse(&pk.to_string()).expect("a printed public key parses");
        assert_eq!(again.to_string(), pk.to_string());
        let _ = pk.verifies(fingerprint, sig);
    }
    if let Ok(sk) = SecretKey::parse(key) {
        let again = SecretKey::parse(&sk.to_nix_string()).expect("a printed secret key parses");
        assert_eq!(again.to_nix_string(), sk.to_nix_string());
        let signed = sk.sign(fingerprint);
        assert!(sk.public().verifies(fingerprint, &signed), "a key verifies its own signature");
    }
});
