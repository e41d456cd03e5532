//! A tree's NAR sent to a daemon on the same machine with its large files handed over open.
//!
//! Streaming a tree's NAR through the socket copies every byte four times before the daemon
//! has hashed it (into the client, into the socket, out of it, into the store). A client on
//! the same machine can instead open the tree's largest files itself (with its own permissions)
//! and pass the descriptors; the body then carries the NAR's framing and small files, and says
//! where a handed-over file's whole contents go:
//!
//! ```text
//! body    = segment*
//! segment = 0x01 len:u64le bytes[len]     (bytes of the NAR, as they are)
//!         | 0x02 k:u32le len:u64le        (the whole of handed-over file k, which is len bytes)
//! ```
//!
//! [`Spliced`] turns such a body back into the NAR, reading a handed-over file with `pread`
//! from its start; the daemon parses, restores and hashes what it gives as any NAR (a body that
//! does not make a valid NAR is refused like any other). A file whose size is not the one the
//! body says, or that changes while it is read, is an error, never different bytes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use crate::layout::{NarLayout, Source};

/// At most this many files are handed over with one request.
pub const MAX_HANDED: usize = 16;
/// Files smaller than this travel in the body: a descriptor costs more than their bytes.
pub const HAND_OVER_FROM: u64 = 1 << 20;

const BYTES: u8 = 1;
const FILE: u8 = 2;
/// The largest `BYTES` segment a writer makes (readers take any length).
const CHUNK: usize = 1 << 20;

impl NarLayout {
    /// The files of the layout worth handing over (at least [`HAND_OVER_FROM`] bytes; the
    /// [`MAX_HANDED`] largest), as indexes into [`NarLayout::files`]'s order.
    pub fn files_to_hand_over(&self) -> Vec<usize> {
        let mut big: Vec<(usize, u64)> =
            self.files().enumerate().filter(|(_, (_, len))| *len >= HAND_OVER_FROM).map(|(i, (_, l))| (i, l)).collect();
        big.sort_by_key(|(i, len)| (std::cmp::Reverse(*len), *i));
        big.truncate(MAX_HANDED);
        let mut chosen: Vec<usize> = big.into_iter().map(|(i, _)| i).collect();
        chosen.sort_unstable();
        chosen
    }

    /// Writes the spliced body of this layout: the files at `handed` (indexes into
    /// [`NarLayout::files`], ascending) as references to descriptors 0, 1, … in that order, the
    /// rest of the NAR as bytes (small files read now, checked to have their laid-out size).
    pub fn write_spliced(&self, handed: &[usize], mut out: impl Write) -> io::Result<()> {
        let mut file_index = 0usize;
        let mut buf = vec![0u8; CHUNK];
        for piece in &self.pieces {
            match &piece.source {
                Source::Framing(bytes) => {
                    out.write_all(&[BYTES])?;
                    out.write_all(&(bytes.len() as u64).to_le_bytes())?;
                    out.write_all(bytes)?;
                }
                Source::Contents(path) => {
                    if let Ok(k) = handed.binary_search(&file_index) {
                        out.write_all(&[FILE])?;
                        out.write_all(&(k as u32).to_le_bytes())?;
                        out.write_all(&piece.len.to_le_bytes())?;
                    } else {
                        let f = File::open(path)?;
                        let mut done = 0u64;
                        while done < piece.len {
                            let n = ((piece.len - done) as usize).min(CHUNK);
                            f.read_exact_at(&mut buf[..n], done).map_err(|e| changed(path, e))?;
                            out.write_all(&[BYTES])?;
                            out.write_all(&(n as u64).to_le_bytes())?;
                            out.write_all(&buf[..n])?;
                            done += n as u64;
                        }
                    }
                    file_index += 1;
                }
            }
        }
        Ok(())
    }
}

fn changed(path: &std::path::Path, e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            io::Error::other(format!("'{}' is shorter than when its NAR was laid out", path.display()))
        }
        _ => e,
    }
}

/// The NAR a spliced body and its handed-over files make, read in order.
pub struct Spliced<R> {
    body: R,
    files: Vec<File>,
    /// What the current segment has left: bytes of the body, or of file `k` from `at`.
    left: Left,
}

enum Left {
    Header,
    Bytes(u64),
    File { k: usize, at: u64, len: u64 },
}

impl<R: Read> Spliced<R> {
    pub fn new(body: R, files: Vec<File>) -> Spliced<R> {
        Spliced { body, files, left: Left::Header }
    }

    /// Reads the next segment's header; false at the body's clean end.
    fn next_segment(&mut self) -> io::Result<bool> {
        let mut kind = [0u8; 1];
        if self.body.read(&mut kind)? == 0 {
            return Ok(false);
        }
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        match kind[0] {
            BYTES => {
                let mut len = [0u8; 8];
                self.body.read_exact(&mut len)?;
                self.left = Left::Bytes(u64::from_le_bytes(len));
            }
            FILE => {
                let mut k = [0u8; 4];
                let mut len = [0u8; 8];
                self.body.read_exact(&mut k)?;
                self.body.read_exact(&mut len)?;
                let (k, len) = (u32::from_le_bytes(k) as usize, u64::from_le_bytes(len));
                let file = self.files.get(k).ok_or_else(|| {
                    bad(format!("the body names handed-over file {k}, and {} were handed over", self.files.len()))
                })?;
                let meta = file.metadata()?;
                if !meta.is_file() {
                    return Err(bad(format!("handed-over file {k} is not a regular file")));
                }
                if meta.len() != len {
                    return Err(bad(format!("handed-over file {k} is {} bytes, the body says {len}", meta.len())));
                }
                self.left = Left::File { k, at: 0, len };
            }
            other => return Err(bad(format!("unknown segment kind {other} in a spliced NAR"))),
        }
        Ok(true)
    }
}

impl<R: Read> Read for Spliced<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.left {
                Left::Header => {
                    if !self.next_segment()? {
                        return Ok(0);
                    }
                }
                // A segment used up (or empty): the next one.
                Left::Bytes(0) => self.left = Left::Header,
                Left::File { at, len, .. } if at == len => self.left = Left::Header,
                Left::Bytes(n) => {
                    let want = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    let got = self.body.read(&mut buf[..want])?;
                    if got == 0 {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the spliced NAR ends mid-segment"));
                    }
                    self.left = Left::Bytes(n - got as u64);
                    return Ok(got);
                }
                Left::File { k, at, len } => {
                    let want = buf.len().min(usize::try_from(len - at).unwrap_or(usize::MAX));
                    let got = self.files[k].read_at(&mut buf[..want], at)?;
                    if got == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("handed-over file {k} became shorter while it was read"),
                        ));
                    }
                    self.left = Left::File { k, at: at + got as u64, len };
                    return Ok(got);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{restore, RestoreMode};
    use cairn_nix::nar::{Limits, NarReader};
    use cairn_nix::strategies::tree;
    use proptest::prelude::*;

    /// `t` restored under a temporary directory.
    fn on_disk(t: &cairn_nix::strategies::Tree) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("x");
        let nar = t.to_nar();
        let mut r = NarReader::new(nar.as_slice(), Limits::default()).unwrap();
        restore(&mut r, &root, RestoreMode::Plain).unwrap();
        (dir, root)
    }

    fn spliced(layout: &NarLayout, handed: &[usize]) -> (Vec<u8>, Vec<File>) {
        let mut body = Vec::new();
        layout.write_spliced(handed, &mut body).unwrap();
        let paths: Vec<_> = layout.files().map(|(p, _)| p.to_owned()).collect();
        let files = handed.iter().map(|i| File::open(&paths[*i]).unwrap()).collect();
        (body, files)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whichever files are handed over, the spliced body and the files make the NAR.
        #[test]
        fn a_spliced_body_and_its_files_make_the_nar(t in tree(), pick in any::<u32>()) {
            let (_dir, root) = on_disk(&t);
            let layout = NarLayout::of(&root).unwrap();
            let n = layout.files().count();
            let handed: Vec<usize> = (0..n).filter(|i| pick & (1 << (i % 32)) != 0).collect();
            let (body, files) = spliced(&layout, &handed);
            let mut nar = Vec::new();
            Spliced::new(body.as_slice(), files).read_to_end(&mut nar).unwrap();
            prop_assert_eq!(nar, t.to_nar());
        }

        /// Hostile bodies: never a panic, and what reads is exactly the BYTES segments' contents
        /// (no file was handed over, so any FILE segment is an error).
        #[test]
        fn arbitrary_bodies_are_refused_or_read(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut out = Vec::new();
            if Spliced::new(body.as_slice(), Vec::new()).read_to_end(&mut out).is_ok() {
                let mut expected = Vec::new();
                let mut rest = &body[..];
                while let Some((&kind, tail)) = rest.split_first() {
                    prop_assert_eq!(kind, BYTES);
                    let len = u64::from_le_bytes(tail[..8].try_into().unwrap()) as usize;
                    expected.extend_from_slice(&tail[8..8 + len]);
                    rest = &tail[8 + len..];
                }
                prop_assert_eq!(out, expected);
            }
        }
    }

    #[test]
    fn large_files_are_handed_over_up_to_the_limit_largest_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("x");
        std::fs::create_dir(&root).unwrap();
        for i in 0..20u64 {
            let f = File::create(root.join(format!("f{i:02}"))).unwrap();
            f.set_len(HAND_OVER_FROM + i).unwrap();
        }
        std::fs::write(root.join("small"), b"tiny").unwrap();
        let layout = NarLayout::of(&root).unwrap();
        let handed = layout.files_to_hand_over();
        assert_eq!(handed, (4..20).collect::<Vec<_>>(), "the 16 largest, in NAR order");
    }

    #[test]
    fn a_handed_over_file_of_another_size_or_index_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        let body = |k: u32, len: u64| [&[FILE][..], &k.to_le_bytes(), &len.to_le_bytes()].concat();
        let read = |b: Vec<u8>| {
            let mut out = Vec::new();
            Spliced::new(b.as_slice(), vec![File::open(&p).unwrap()]).read_to_end(&mut out).map(|_| out)
        };
        assert_eq!(read(body(0, 10)).unwrap(), b"0123456789");
        let e = read(body(0, 11)).unwrap_err().to_string();
        assert!(e.contains("is 10 bytes, the body says 11"), "{e}");
        let e = read(body(1, 10)).unwrap_err().to_string();
        assert!(e.contains("handed-over file 1, and 1 were handed over"), "{e}");
        let e = read(vec![BYTES, 5, 0, 0, 0, 0, 0, 0, 0, b'a']).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = read(vec![9]).unwrap_err().to_string();
        assert!(e.contains("unknown segment kind 9"), "{e}");
    }
}
