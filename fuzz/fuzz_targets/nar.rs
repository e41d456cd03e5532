//! `NarReader` over arbitrary bytes (NARs come from binary caches, pushes, imports and the
//! worker protocol). Contract: no panic; a NAR that parses is written back byte for byte by
//! `NarWriter` (the format is canonical), and the reader never reads past its end.
#![no_main]

use cairn_nix::nar::{Limits, NarEvent, NarReader, NarWriter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_depth: 64, ..Limits::default() };
    let mut input = data;
    let Ok(mut r) = NarReader::new(&mut input, limits) else { return };
    let mut w = NarWriter::new(Vec::new()).expect("writing to memory");
    let mut buf = [0u8; 4096];
    loop {
        let event = match r.next_event() {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(_) => return,
        };
        match event {
            NarEvent::Regular { name, executable, size } => {
                let mut contents = Vec::new();
                if r.copy_contents(&mut contents, &mut buf).is_err() {
                    return;
                }
                assert_eq!(contents.len() as u64, size, "contents as long as declared");
                w.regular(name.as_deref(), executable, size, &mut &contents[..]).expect("a parsed file is writable");
            }
            NarEvent::Symlink { name, target } => {
                w.symlink(name.as_deref(), &target).expect("a parsed symlink is writable")
            }
            NarEvent::Directory { name } => w.begin_directory(name.as_deref()).expect("a parsed directory is writable"),
            NarEvent::EndDirectory => w.end_directory().expect("a parsed directory closes"),
        }
    }
    drop(r);
    let consumed = data.len() - input.len();
    let written = w.finish().expect("a complete NAR finishes");
    assert_eq!(written, &data[..consumed], "a parsed NAR is written back byte for byte");
});
