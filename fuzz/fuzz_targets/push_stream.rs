//! The binary cache's push stream (`POST /push` on cairnd's `listen` address): framing,
//! narinfos and the NARs between them, read as `cairn_cache::push::receive` reads them.
//! Contract: no panic; every narinfo is parsed or refused, every NAR validated or refused.
#![no_main]

use std::io::Read;

use cairn_nix::nar::{Limits, NarReader};
use cairn_nix::narinfo::NarInfo;
use cairn_nix::wire::push::PushReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = cairn_fuzz::store_dir();
    let Ok(mut r) = PushReader::new(data) else { return };
    for _ in 0..16 {
        let text = match r.next_narinfo() {
            Ok(Some(t)) => t,
            Ok(None) | Err(_) => return,
        };
        let Ok(info) = NarInfo::parse(&dir, &text) else { return };
        let mut nar = r.nar(info.nar_size);
        let ok = NarReader::new(&mut nar, Limits::default()).and_then(|mut n| n.skip_to_end()).is_ok();
        // What a receiver does with the rest of a path's bytes: drain them.
        let _ = std::io::copy(&mut nar, &mut std::io::sink());
        if !ok {
            return;
        }
        let _ = nar.read(&mut [0u8; 1]);
    }
});
