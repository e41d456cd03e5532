//! `nix-store --export` streams (what `cairn import` and the worker protocol's `ImportPaths`
//! read): markers, NARs in place, trailers. Contract: no panic; every trailer read is written
//! back to bytes that read as the same trailer.
#![no_main]

use cairn_nix::export::{read_marker, read_trailer, write_trailer};
use cairn_nix::nar::{Limits, NarReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    for _ in 0..64 {
        match read_marker(&mut input) {
            Ok(true) => {}
            Ok(false) | Err(_) => return,
        }
        let Ok(mut nar) = NarReader::new(&mut input, Limits::default()) else { return };
        if nar.skip_to_end().is_err() {
            return;
        }
        drop(nar);
        let Ok(trailer) = read_trailer(&mut input) else { return };
        let mut bytes = Vec::new();
        write_trailer(&mut bytes, &trailer).expect("writing to memory");
        let again = read_trailer(&mut &bytes[..]).expect("a written trailer reads back");
        assert_eq!(again, trailer);
    }
});
