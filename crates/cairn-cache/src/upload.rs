//! NARs made ready for a binary cache: compressed, with both hashes, in one pass.

use std::io::{self, Read, Write};
use std::path::Path;

use cairn_nix::hash::{Hash, HashAlgo, Hasher, HashingWriter};

use crate::Compression;

/// A NAR written compressed, with what its narinfo records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressedNar {
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub file_hash: Hash,
    pub file_size: u64,
}

/// Reads a NAR from `nar`, writes it compressed to the new file `out` (synced), and returns
/// the SHA-256 and size of the NAR and of the file.
pub fn compress_nar(
    mut nar: impl Read,
    compression: Compression,
    level: Option<i32>,
    out: &Path,
) -> io::Result<CompressedNar> {
    let file = std::fs::File::create(out)?;
    let counted = HashingWriter::new(io::BufWriter::with_capacity(1 << 20, file), HashAlgo::Sha256);
    let mut enc = compression.encoder_at(counted, level)?;
    let mut nar_hasher = Hasher::new(HashAlgo::Sha256);
    let mut nar_size = 0u64;
    let mut buf = vec![0u8; 1 << 18];
    loop {
        let n = match nar.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        nar_hasher.update(&buf[..n]);
        nar_size += n as u64;
        enc.write_all(&buf[..n])?;
    }
    let (file_hash, file_size, buffered) = enc.finish()?.finish();
    let file = buffered.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(CompressedNar { nar_hash: nar_hasher.finish(), nar_size, file_hash, file_size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_describe_the_nar_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let nar = b"pretend this is a NAR".repeat(1000);
        for c in [Compression::None, Compression::Zstd, Compression::Xz, Compression::Bzip2] {
            let out = dir.path().join(c.name());
            let r = compress_nar(&nar[..], c, None, &out).unwrap();
            let file = std::fs::read(&out).unwrap();
            assert_eq!(r.nar_hash, Hash::digest(HashAlgo::Sha256, &nar));
            assert_eq!(r.nar_size, nar.len() as u64);
            assert_eq!(r.file_hash, Hash::digest(HashAlgo::Sha256, &file));
            assert_eq!(r.file_size, file.len() as u64);
            let mut back = Vec::new();
            c.decoder(&file[..]).unwrap().read_to_end(&mut back).unwrap();
            assert_eq!(back, nar);
        }
    }
}
