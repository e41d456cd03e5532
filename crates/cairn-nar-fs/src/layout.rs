//! The NAR of a tree without making it: where each of its bytes comes from, so that any range
//! of it can be read at any time. A peer asks for ranges of a store path's NAR, and resumes a
//! transfer in the middle; serialising the whole NAR to a file first would cost a copy of the
//! path, and serialising it from the start for every range would cost a pass per range.
//!
//! The layout holds the NAR's own framing (tags, names, sizes, padding) as bytes and each regular
//! file's contents as a reference to the file: a tree of a few thousand files costs a few hundred
//! kilobytes, whatever its size.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cairn_nix::nar::NarWriter;

use crate::{dump_node, io_err, FsError, Result};

/// Where the bytes of a tree's NAR come from.
#[derive(Debug)]
pub struct NarLayout {
    pub(crate) pieces: Vec<Piece>,
    size: u64,
}

#[derive(Debug)]
pub(crate) struct Piece {
    /// Offset of the piece's first byte in the NAR.
    at: u64,
    pub(crate) len: u64,
    pub(crate) source: Source,
}

#[derive(Debug)]
pub(crate) enum Source {
    Framing(Vec<u8>),
    Contents(PathBuf),
}

/// The sink a layout is written to: framing is kept, contents are marked.
#[derive(Default)]
struct Recorder {
    pieces: Vec<Piece>,
    framing: Vec<u8>,
    at: u64,
}

impl Recorder {
    fn end_framing(&mut self) {
        if !self.framing.is_empty() {
            let bytes = std::mem::take(&mut self.framing);
            let len = bytes.len() as u64;
            self.pieces.push(Piece { at: self.at, len, source: Source::Framing(bytes) });
            self.at += len;
        }
    }

    fn contents(&mut self, file: &Path, len: u64) {
        self.end_framing();
        if len > 0 {
            self.pieces.push(Piece { at: self.at, len, source: Source::Contents(file.to_owned()) });
            self.at += len;
        }
    }
}

impl Write for Recorder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.framing.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl NarLayout {
    /// The layout of the NAR of the tree at `path` (as [`dump`](crate::dump) would write it).
    /// Reads the tree's metadata, not its files.
    pub fn of(path: &Path) -> Result<NarLayout> {
        let mut w = NarWriter::new(Recorder::default()).map_err(io_err("lay out the NAR of", path))?;
        dump_node(path, None, &mut w, &mut |w, file, name, executable, size| {
            w.regular_elsewhere(name, executable, size, |rec| {
                rec.contents(file, size);
                Ok(())
            })
            .map_err(|source| FsError::NarWrite { path: file.to_owned(), source })
        })?;
        let mut rec = w.finish().map_err(|source| FsError::NarWrite { path: path.to_owned(), source })?;
        rec.end_framing();
        Ok(NarLayout { size: rec.at, pieces: rec.pieces })
    }

    /// The NAR's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The regular files whose contents the NAR holds (empty ones aside), in NAR order, with
    /// their laid-out sizes.
    pub fn files(&self) -> impl Iterator<Item = (&Path, u64)> {
        self.pieces.iter().filter_map(|p| match &p.source {
            Source::Contents(path) => Some((path.as_path(), p.len)),
            Source::Framing(_) => None,
        })
    }

    /// A reader of the NAR from its start, which can also read at any offset.
    pub fn reader(&self) -> NarLayoutReader<&NarLayout> {
        NarLayoutReader::new(self)
    }
}

/// Reads a [`NarLayout`]'s bytes (borrowed, or shared with an `Arc`), keeping the last file it
/// read from open.
pub struct NarLayoutReader<L> {
    layout: L,
    open: Option<(usize, File)>,
    pos: u64,
}

impl<L: std::ops::Deref<Target = NarLayout>> NarLayoutReader<L> {
    pub fn new(layout: L) -> Self {
        NarLayoutReader { layout, open: None, pos: 0 }
    }

    /// Fills `buf` with the NAR's bytes from `offset` (fewer only at the NAR's end). A file of the
    /// tree that changed size since the layout was made is an error, never wrong bytes.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let pieces = &self.layout.pieces;
        let mut i = pieces.partition_point(|p| p.at + p.len <= offset);
        let mut done = 0usize;
        while done < buf.len() && i < pieces.len() {
            let p = &pieces[i];
            let from = offset + done as u64 - p.at;
            let n = ((p.len - from) as usize).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match &p.source {
                Source::Framing(bytes) => dst.copy_from_slice(&bytes[from as usize..from as usize + n]),
                Source::Contents(path) => {
                    if self.open.as_ref().is_none_or(|(at, _)| *at != i) {
                        self.open = Some((i, File::open(path)?));
                    }
                    let (_, file) = self.open.as_ref().expect("opened above");
                    file.read_exact_at(dst, from).map_err(|e| match e.kind() {
                        io::ErrorKind::UnexpectedEof => {
                            io::Error::other(format!("'{}' is shorter than when its NAR was laid out", path.display()))
                        }
                        _ => e,
                    })?;
                }
            }
            done += n;
            i += 1;
        }
        Ok(done)
    }
}

impl<L: std::ops::Deref<Target = NarLayout>> Read for NarLayoutReader<L> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.read_at(self.pos, buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{restore, RestoreMode};
    use cairn_nix::nar::{Limits, NarReader};
    use cairn_nix::strategies::tree;
    use proptest::prelude::*;

    fn dumped(path: &Path) -> Vec<u8> {
        let mut nar = Vec::new();
        crate::dump(path, &mut nar).unwrap();
        nar
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any range read from a layout is the same range of the dumped NAR.
        #[test]
        fn every_range_of_a_layout_is_that_range_of_the_nar(t in tree(), cuts in proptest::collection::vec(any::<u16>(), 1..6)) {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("x");
            let nar = t.to_nar();
            let mut r = NarReader::new(nar.as_slice(), Limits::default()).unwrap();
            restore(&mut r, &root, RestoreMode::Plain).unwrap();
            prop_assert_eq!(&dumped(&root), &nar);
            let layout = NarLayout::of(&root).unwrap();
            prop_assert_eq!(layout.size(), nar.len() as u64);
            let mut whole = Vec::new();
            layout.reader().read_to_end(&mut whole).unwrap();
            prop_assert_eq!(&whole, &nar);
            let mut r = layout.reader();
            for c in cuts {
                let start = c as usize % (nar.len() + 1);
                let mut buf = vec![0u8; (c as usize / 7) % 300];
                let n = r.read_at(start as u64, &mut buf).unwrap();
                prop_assert_eq!(n, buf.len().min(nar.len() - start));
                prop_assert_eq!(&buf[..n], &nar[start..start + n]);
            }
        }
    }

    #[test]
    fn a_file_that_shrank_is_an_error_not_wrong_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("x");
        std::fs::write(&root, vec![7u8; 5000]).unwrap();
        let layout = NarLayout::of(&root).unwrap();
        std::fs::write(&root, vec![7u8; 10]).unwrap();
        let mut out = Vec::new();
        let err = layout.reader().read_to_end(&mut out).unwrap_err();
        assert!(err.to_string().contains("shorter"), "{err}");
    }
}
