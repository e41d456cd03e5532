//! NAR round trips, known bytes, and hostile input.

use proptest::prelude::*;

use super::*;
use crate::hash::{Hash, HashAlgo};
use crate::strategies::{tree, Tree};
use crate::wire::write_bytes;

fn strs(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        write_bytes(&mut out, p).unwrap();
    }
    out
}

fn parse(nar: &[u8]) -> Result<(), NarError> {
    let mut r = NarReader::new(nar, Limits::default())?;
    r.skip_to_end()
}

#[test]
fn matches_nix_store_dump() {
    // `mkdir -p srcx/d; echo a > srcx/d/f; nix-store --dump srcx | sha256sum` with Nix 2.8.
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.begin_directory(None).unwrap();
    w.begin_directory(Some(b"d")).unwrap();
    w.regular(Some(b"f"), false, 2, &mut &b"a\n"[..]).unwrap();
    w.end_directory().unwrap();
    w.end_directory().unwrap();
    let nar = w.finish().unwrap();
    assert_eq!(
        Hash::digest(HashAlgo::Sha256, &nar).encode(crate::hash::Encoding::Base16),
        "ee7dcabe457938218e46c7d01319f952cc52776a3c224c8061527745db0e1d43"
    );
}

#[test]
fn regular_file_layout() {
    let t = Tree::File { executable: true, contents: b"hi".to_vec() };
    let expected = strs(&[b"nix-archive-1", b"(", b"type", b"regular", b"executable", b"", b"contents", b"hi", b")"]);
    assert_eq!(t.to_nar(), expected);
}

#[test]
fn writer_refuses_unsorted_and_bad_names() {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.begin_directory(None).unwrap();
    w.symlink(Some(b"b"), b"x").unwrap();
    assert!(matches!(w.symlink(Some(b"a"), b"x"), Err(NarWriteError::Unsorted { .. })));
    assert!(matches!(w.symlink(Some(b"b"), b"x"), Err(NarWriteError::Unsorted { .. })));
    assert!(matches!(w.symlink(Some(b"c/d"), b"x"), Err(NarWriteError::BadName(_))));
    assert!(matches!(w.symlink(None, b"x"), Err(NarWriteError::Nesting)));
}

fn dir_with(entries: &[&[u8]]) -> Vec<u8> {
    let mut out = strs(&[b"nix-archive-1", b"(", b"type", b"directory"]);
    for name in entries {
        out.extend(strs(&[
            b"entry", b"(", b"name", name, b"node", b"(", b"type", b"symlink", b"target", b"t", b")", b")",
        ]));
    }
    out.extend(strs(&[b")"]));
    out
}

#[test]
fn hostile_inputs_are_refused_with_their_reason() {
    assert!(parse(&dir_with(&[b"a", b"b"])).is_ok());
    assert!(matches!(parse(&strs(&[b"nix-archive-2"])), Err(NarError::BadMagic)));
    assert!(matches!(parse(b""), Err(NarError::Truncated)));
    assert!(matches!(parse(&dir_with(&[b"b", b"a"])), Err(NarError::Unsorted { .. })));
    assert!(matches!(parse(&dir_with(&[b"a", b"a"])), Err(NarError::Duplicate(_))));
    for bad in [&b".."[..], b".", b"a/b", b"a\0b", b""] {
        assert!(matches!(parse(&dir_with(&[bad])), Err(NarError::BadName(_))), "{bad:?}");
    }
    // Truncation at every point of a valid NAR.
    let good = Tree::File { executable: false, contents: b"0123456789".to_vec() }.to_nar();
    for cut in 0..good.len() {
        assert!(parse(&good[..cut]).is_err(), "cut at {cut}");
    }
    // Non-zero padding after the contents.
    let mut bad_pad = good.clone();
    let pos = good.len() - 16 - 6; // 10 content bytes are followed by 6 padding bytes, then ")"
    bad_pad[pos] = 1;
    assert!(matches!(parse(&bad_pad), Err(NarError::BadPadding)));
    // Unknown type, unknown tag, oversize names, empty symlink targets.
    assert!(matches!(parse(&strs(&[b"nix-archive-1", b"(", b"type", b"fifo", b")"])), Err(NarError::UnknownType(_))));
    assert!(matches!(
        parse(&strs(&[b"nix-archive-1", b"(", b"type", b"regular", b"mode", b"", b")"])),
        Err(NarError::UnexpectedTag { .. })
    ));
    assert!(matches!(parse(&dir_with(&[&[b'x'; 256]])), Err(NarError::TooLong { .. })));
    assert!(matches!(
        parse(&strs(&[b"nix-archive-1", b"(", b"type", b"symlink", b"target", b"", b")"])),
        Err(NarError::BadTarget(_))
    ));
    // A length field claiming more than the input holds.
    let mut huge = strs(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    huge.extend(u64::MAX.to_le_bytes());
    assert!(matches!(parse(&huge), Err(NarError::Truncated)));
}

#[test]
fn nesting_limit() {
    let mut nar = strs(&[b"nix-archive-1", b"(", b"type", b"directory"]);
    for _ in 0..300 {
        nar.extend(strs(&[b"entry", b"(", b"name", b"d", b"node", b"(", b"type", b"directory"]));
    }
    assert!(matches!(parse(&nar), Err(NarError::TooDeep(256))));
}

#[test]
fn reader_stops_at_the_end_of_the_nar() {
    let mut bytes = Tree::Symlink { target: b"x".to_vec() }.to_nar();
    let len = bytes.len();
    bytes.extend_from_slice(b"trailing");
    let mut slice = &bytes[..];
    let mut r = NarReader::new(&mut slice, Limits::default()).unwrap();
    r.skip_to_end().unwrap();
    assert_eq!(slice.len(), bytes.len() - len);
}

proptest! {
    #[test]
    fn copy_one_takes_exactly_one_nar_off_a_stream(t in tree(), trailing in proptest::collection::vec(any::<u8>(), 0..64)) {
        let nar = t.to_nar();
        let mut stream = nar.clone();
        stream.extend_from_slice(&trailing);
        let mut rest = &stream[..];
        let mut copy = Vec::new();
        prop_assert_eq!(copy_one(&mut rest, &mut copy, Limits::default()).unwrap(), nar.len() as u64);
        prop_assert_eq!(&copy, &nar);
        prop_assert_eq!(rest, &trailing[..]);
        // Cut anywhere, it is an error, never a NAR.
        let cut = trailing.len() % nar.len();
        prop_assert!(copy_one(&nar[..cut], &mut Vec::new(), Limits::default()).is_err());
    }

    #[test]
    fn a_file_written_from_chunks_is_the_file_written_from_a_reader(
        contents in proptest::collection::vec(any::<u8>(), 0..3000),
        cuts in proptest::collection::vec(0usize..3000, 0..6),
        executable: bool,
    ) {
        let mut from_reader = NarWriter::new(Vec::new()).unwrap();
        from_reader.regular(None, executable, contents.len() as u64, &mut &contents[..]).unwrap();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(contents.len())).collect();
        cuts.sort_unstable();
        let chunks: Vec<&[u8]> = [0].iter().chain(&cuts).zip(cuts.iter().chain([&contents.len()]))
            .map(|(&a, &b)| &contents[a..b])
            .collect();
        let mut from_chunks = NarWriter::new(Vec::new()).unwrap();
        from_chunks.regular_from_chunks(None, executable, contents.len() as u64, chunks.iter().copied()).unwrap();
        prop_assert_eq!(from_chunks.finish().unwrap(), from_reader.finish().unwrap());
        // Chunks that add up to less or more than the size are refused.
        let mut short = NarWriter::new(Vec::new()).unwrap();
        let err = short.regular_from_chunks(None, executable, contents.len() as u64 + 1, chunks.iter().copied());
        prop_assert!(
            matches!(err, Err(NarWriteError::SizeMismatch { .. })),
            "a short file was written"
        );
        if !contents.is_empty() {
            let mut long = NarWriter::new(Vec::new()).unwrap();
            let err = long.regular_from_chunks(None, executable, contents.len() as u64 - 1, chunks.iter().copied());
            prop_assert!(
                matches!(err, Err(NarWriteError::SizeMismatch { .. })),
                "a long file was written"
            );
        }
    }

    #[test]
    fn write_parse_round_trip(t in tree()) {
        let nar = t.to_nar();
        prop_assert_eq!(Tree::from_nar(&nar).unwrap(), t);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse(&bytes);
    }

    #[test]
    fn mutated_nars_never_panic(t in tree(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut nar = t.to_nar();
        let i = pos.index(nar.len());
        nar[i] = byte;
        let _ = parse(&nar);
    }
}
