//! Adding lone regular files: the copy and its hashes at once.
//!
//! A lone file's store path needs the SHA-256 of its NAR, and a flat path also the hash of its
//! bytes: on a large file each hash costs as much as the copy. [`copy_hashing`] reads the file
//! in chunks on the caller's thread and writes them to the store's copy while one or two other
//! threads hash the same chunks, so the three overlap. [`LocalStore::add_file`] adds a file the
//! daemon was handed as an open descriptor (a client's own `cairn add FILE`): the bytes go from
//! the page cache to the store's copy without crossing the socket twice.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use cairn_nix::nar::{NarWriteError, NarWriter};
use cairn_nix::store_path::validate_name;
use cairn_nix::{Hash, HashAlgo, Hasher};

use crate::{nar_size_of_file, CopyToFile, LocalStore, PathInfo, Result, StoreError};

/// Chunk size of the pipeline.
pub(crate) const CHUNK: usize = 1 << 20;

/// How a lone file is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileMethod {
    /// As `nix-store --add FILE`: a `source` path named by the NAR's hash.
    Nar,
    /// As `nix-store --add-fixed sha256 FILE`: a flat fixed-output path.
    Flat,
}

/// What [`copy_hashing`] read: the bytes' hash (when asked for), the NAR's hash, the byte count.
pub(crate) struct Copied {
    pub flat: Option<Hash>,
    pub nar: Hash,
    pub size: u64,
    /// The bytes' BLAKE3 hash and outboard, when asked for.
    pub blake3: Option<([u8; 32], Vec<u8>)>,
}

/// Copies exactly `size` bytes of `input` into `file` (refusing fewer or more), hashing them
/// (with `flat`, when given) and hashing the NAR of a lone file with those contents, each on a
/// thread of its own.
pub(crate) fn copy_hashing(
    mut input: impl Read,
    size: u64,
    executable: bool,
    flat: Option<HashAlgo>,
    blake3: bool,
    file: &mut CopyToFile,
    copy: &Path,
) -> Result<Copied> {
    std::thread::scope(|scope| -> Result<Copied> {
        let (flat_tx, flat_rx) = sync_channel::<Arc<Vec<u8>>>(8);
        let (nar_tx, nar_rx) = sync_channel::<Arc<Vec<u8>>>(8);
        let (b3_tx, b3_rx) = sync_channel::<Chunk>(8);
        // BLAKE3 for peers, in the same pass: a thread of its own, fed the same chunks.
        let b3_hasher =
            blake3.then(|| scope.spawn(move || crate::peers::blake3_outboard(ChunkReader::new(b3_rx), size).ok()));
        let flat_hasher = flat.map(|algo| {
            scope.spawn(move || {
                let mut h = Hasher::new(algo);
                for c in flat_rx {
                    h.update(&c);
                }
                h.finish()
            })
        });
        let nar = scope.spawn(move || -> std::result::Result<Hash, NarWriteError> {
            let mut w = NarWriter::new(Hasher::new(HashAlgo::Sha256))?;
            w.regular_from_chunks(None, executable, size, nar_rx.iter().map(Chunk))?;
            Ok(w.finish()?.finish())
        });
        let mut got = 0u64;
        let io = |op, source| StoreError::Io { op, path: copy.to_owned(), source };
        loop {
            let mut chunk = vec![0u8; CHUNK.min((size - got.min(size)) as usize + 1).max(1)];
            let mut filled = 0;
            while filled < chunk.len() {
                match input.read(&mut chunk[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io("read", e)),
                }
            }
            if filled == 0 {
                break;
            }
            chunk.truncate(filled);
            got += filled as u64;
            if got > size {
                return Err(StoreError::SizeMismatch { expected: size, actual: got });
            }
            file.write_all(&chunk).map_err(|e| io("write", e))?;
            let chunk = Arc::new(chunk);
            // A hasher only stops early by panicking; its join below reports that.
            if flat_hasher.is_some() {
                let _ = flat_tx.send(chunk.clone());
            }
            if b3_hasher.is_some() {
                let _ = b3_tx.send(Chunk(chunk.clone()));
            }
            let _ = nar_tx.send(chunk);
        }
        drop(flat_tx);
        drop(nar_tx);
        drop(b3_tx);
        let blake3 = b3_hasher.and_then(|h| h.join().expect("BLAKE3 hasher panicked"));
        let flat = flat_hasher.map(|h| h.join().expect("flat hasher panicked"));
        let nar = nar.join().expect("NAR hasher panicked");
        if got != size {
            return Err(StoreError::SizeMismatch { expected: size, actual: got });
        }
        let nar = nar.map_err(|source| StoreError::NarWrite { path: copy.to_owned(), source })?;
        Ok(Copied { flat, nar, size: got, blake3 })
    })
}

/// Chunks sent by another thread, as a reader: the end of the channel is the end of the data
/// (a sender that fails says why elsewhere). The BLAKE3 outboard reads the copy pipeline's
/// chunks through it; substitution reads decompressed chunks through it.
pub struct ChunkReader<C> {
    rx: std::sync::mpsc::Receiver<C>,
    chunk: Option<C>,
    at: usize,
}

impl<C> ChunkReader<C> {
    pub fn new(rx: std::sync::mpsc::Receiver<C>) -> Self {
        ChunkReader { rx, chunk: None, at: 0 }
    }
}

impl<C: AsRef<[u8]>> Read for ChunkReader<C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(c) = self.chunk.as_ref().map(AsRef::as_ref).filter(|c| self.at < c.len()) {
                let n = buf.len().min(c.len() - self.at);
                buf[..n].copy_from_slice(&c[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            match self.rx.recv() {
                Ok(c) => (self.chunk, self.at) = (Some(c), 0),
                Err(_) => return Ok(0),
            }
        }
    }
}

/// A chunk of the pipeline, as bytes.
struct Chunk(Arc<Vec<u8>>);

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Reads a file from its start whatever its offset (which a handed-over file shares with the
/// client that opened it), without moving the offset.
struct FromStart<'a> {
    file: &'a File,
    at: u64,
}

impl Read for FromStart<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

impl LocalStore {
    /// Adds the regular file `input` is open on, as `nix-store --add` (`Nar`) or `nix-store
    /// --add-fixed sha256` (`Flat`) adds a file: executable if its owner may execute it. All
    /// of it is read, from its start, whatever the descriptor's offset. Its size is taken when
    /// the add starts; a file that changes size meanwhile is refused.
    pub fn add_file(&self, name: &str, input: File, method: FileMethod) -> Result<PathInfo> {
        validate_name(name)?;
        let meta = input.metadata().map_err(|source| StoreError::Io { op: "stat", path: name.into(), source })?;
        if !meta.file_type().is_file() {
            return Err(StoreError::NotAFile(name.to_owned()));
        }
        let flags = nix::fcntl::fcntl(&input, nix::fcntl::FcntlArg::F_GETFL)
            .map(nix::fcntl::OFlag::from_bits_truncate)
            .map_err(|e| StoreError::Io { op: "inspect", path: name.into(), source: e.into() })?;
        if flags & nix::fcntl::OFlag::O_ACCMODE == nix::fcntl::OFlag::O_WRONLY
            || flags.contains(nix::fcntl::OFlag::O_PATH)
        {
            return Err(StoreError::NotReadable(name.to_owned()));
        }
        let executable = meta.mode() & 0o100 != 0;
        let tmp = self.temp_dir()?;
        let copy = tmp.0.join("x");
        let mut file = CopyToFile::new(&copy, executable)?;
        let flat_algo = (method == FileMethod::Flat).then_some(HashAlgo::Sha256);
        let c =
            copy_hashing(FromStart { file: &input, at: 0 }, meta.len(), executable, flat_algo, false, &mut file, &copy)
                .map_err(|e| match e {
                    StoreError::SizeMismatch { expected, actual } => {
                        StoreError::FileChanged { name: name.to_owned(), expected, actual }
                    }
                    other => other,
                })?;
        file.finish()?;
        let nar_size = nar_size_of_file(c.size, executable);
        let info = match c.flat {
            Some(hash) => crate::flat_info(self.flat_path(name, &hash)?, hash, c.nar, nar_size),
            None => crate::source_info(self.store_dir(), name, c.nar, nar_size, &BTreeSet::new())?,
        };
        self.finish_add(&copy, info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests_support::open_temp_store;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_file_handed_over_lands_where_its_nar_or_its_bytes_put_it() {
        let (dir, store) = open_temp_store();
        for executable in [false, true] {
            let f = dir.path().join(format!("f{executable}"));
            let data: Vec<u8> = (0..3 * CHUNK + 13).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(&f, &data).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(if executable { 0o755 } else { 0o644 }))
                .unwrap();
            let mut nar = Vec::new();
            crate::dump(&f, &mut nar).unwrap();
            let by_nar = store.add_nar("f", &nar[..]).unwrap();
            // Whatever the descriptor's offset, all of the file is added.
            let mut handed = File::open(&f).unwrap();
            io::Seek::seek(&mut handed, io::SeekFrom::End(-5)).unwrap();
            let by_file = store.add_file("f", handed, FileMethod::Nar).unwrap();
            assert_eq!(
                (by_file.path.clone(), by_file.nar_hash.clone(), by_file.nar_size),
                (by_nar.path, by_nar.nar_hash, by_nar.nar_size)
            );
            let flat = store.add_flat("g", &data[..], data.len() as u64, executable).unwrap();
            let flat_by_file = store.add_file("g", File::open(&f).unwrap(), FileMethod::Flat).unwrap();
            assert_eq!(
                (flat_by_file.path, flat_by_file.nar_hash, flat_by_file.ca),
                (flat.path, flat.nar_hash, flat.ca)
            );
            let mode = std::fs::metadata(store.real_path(&by_file.path)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, if executable { 0o555 } else { 0o444 });
        }
    }

    #[test]
    fn only_regular_files_are_taken() {
        let (dir, store) = open_temp_store();
        let (r, _w) = nix::unistd::pipe().unwrap();
        let err = store.add_file("p", File::from(r), FileMethod::Nar).unwrap_err();
        assert!(matches!(err, StoreError::NotAFile(_)), "{err}");
        let err = store.add_file("d", File::open(dir.path()).unwrap(), FileMethod::Flat).unwrap_err();
        assert!(matches!(err, StoreError::NotAFile(_)), "{err}");
        let w = File::create(dir.path().join("w")).unwrap();
        let err = store.add_file("w", w, FileMethod::Nar).unwrap_err();
        assert!(matches!(err, StoreError::NotReadable(_)), "{err}");
        let path_only = File::from(
            nix::fcntl::open(&dir.path().join("w"), nix::fcntl::OFlag::O_PATH, nix::sys::stat::Mode::empty()).unwrap(),
        );
        let err = store.add_file("o", path_only, FileMethod::Flat).unwrap_err();
        assert!(matches!(err, StoreError::NotReadable(_)), "{err}");
    }

    #[test]
    fn a_short_or_long_input_is_refused_and_leaves_nothing() {
        let (_dir, store) = open_temp_store();
        let data = vec![1u8; CHUNK + 1];
        for claimed in [data.len() as u64 - 1, data.len() as u64 + 1] {
            let err = store.add_flat("x", &data[..], claimed, false).unwrap_err();
            assert!(matches!(err, StoreError::SizeMismatch { .. }), "{err}");
        }
        assert_eq!(store.temp_leftovers(), 0, "the copies are gone");
    }
}
