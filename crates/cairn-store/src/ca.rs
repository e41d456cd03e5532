//! Content addresses checked against contents.
//!
//! A content-addressed path needs no signature: its name follows from its contents, so anyone
//! can check it. That holds only if somebody *does* check it. A narinfo, a pushed path or a
//! build's metadata that says `CA: fixed:sha256:…` makes two claims — that the content address
//! yields the path (a pure computation, [`StoreDir::check_content_address`]), and that the
//! contents hash to the content address — and a NAR hash that matches the NAR proves neither,
//! since whoever wrote the metadata also wrote the NAR hash. Without the second check, a hostile
//! cache or pusher could place any bytes under the path of an added file, a fixed-output
//! derivation's output or an OCI blob (Nix 2.8 refuses the same with "ca hash mismatch importing
//! path").
//!
//! So every path that arrives with a content address has it recomputed from the tree that was
//! restored (the NAR hash already checked against the NAR):
//!
//! - `text:` and `fixed:` (flat): the tree must be one regular file; its bytes are hashed with the
//!   address's algorithm.
//! - `fixed:r:sha256:`: the content hash *is* the NAR hash, which was just checked: no extra read.
//! - `fixed:r:<other algorithm>:`: the tree is dumped once more as a NAR and hashed.
//! - a `fixed:r:` path that refers to itself (`nix store make-content-addressed` makes them):
//!   its contents name its own path, so the address is the hash *modulo* its hash part (Nix's
//!   `hashCAPath`, [`HashModulo`]): the tree is dumped once more.
//!
//! Paths that arrive without one (an export stream never carries it; importing needs trust, as
//! in Nix) are registered without one, as Nix registers them; where cairn relies on a path's
//! name for its bytes — an OCI blob path — it checks those bytes itself
//! ([`LocalStore::checked_flat`](crate::LocalStore::checked_flat)).
//!
//! **Architecture invariant:** no path is registered with a content address that does not yield
//! it ([`LocalStore::register`] checks every claim before the transaction), and no path enters
//! with a content address its contents were not hashed against.

use std::fs::File;
use std::io;
use std::path::Path;

use cairn_nix::content_address::FileIngestionMethod;
use cairn_nix::hash::HashingWriter;
use cairn_nix::references::HashModulo;
use cairn_nix::{ContentAddress, Hash, HashAlgo, Hasher, StoreDir};

use crate::{fsops, PathInfo, Result, StoreError};

/// Checks that `info`'s content address, if it has one, yields its path with its references.
pub(crate) fn check_claim(dir: &StoreDir, info: &PathInfo) -> Result<()> {
    let Some(ca) = &info.ca else { return Ok(()) };
    dir.check_content_address(&info.path, ca, &info.references)
        .map_err(|source| StoreError::ContentAddressClaim { path: dir.display(&info.path), source })
}

/// Checks that the tree at `tree`, whose NAR has SHA-256 `nar_hash`, hashes to `info`'s content
/// address (see the module documentation), and that the address yields the path.
pub(crate) fn check_contents(dir: &StoreDir, info: &PathInfo, tree: &Path) -> Result<()> {
    let Some(ca) = &info.ca else { return Ok(()) };
    check_claim(dir, info)?;
    let itself = info.references.contains(&info.path).then(|| info.path.hash_part());
    let actual = content_hash(ca, &info.nar_hash, tree, &dir.display(&info.path), itself)?;
    let expected = match ca {
        ContentAddress::Text(h) | ContentAddress::Fixed { hash: h, .. } => h,
    };
    if &actual != expected {
        return Err(StoreError::ContentAddressMismatch {
            path: dir.display(&info.path),
            ca: ca.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// The hash of `tree` that content address `ca` is about; `itself`: the hash part of a path
/// that refers to itself, which the hash is taken modulo.
fn content_hash(ca: &ContentAddress, nar_hash: &Hash, tree: &Path, shown: &str, itself: Option<&str>) -> Result<Hash> {
    match ca {
        ContentAddress::Text(h) | ContentAddress::Fixed { method: FileIngestionMethod::Flat, hash: h } => {
            flat_hash(tree, h.algo())?
                .ok_or_else(|| StoreError::ContentAddressNotAFile { path: shown.to_owned(), ca: ca.to_string() })
        }
        ContentAddress::Fixed { method: FileIngestionMethod::Recursive, hash } => {
            if let Some(part) = itself {
                let mut w = HashModulo::new(hash.algo(), part);
                fsops::dump(tree, &mut w)?;
                return Ok(w.finish().0);
            }
            if hash.algo() == HashAlgo::Sha256 && nar_hash.algo() == HashAlgo::Sha256 {
                return Ok(nar_hash.clone());
            }
            let mut w = HashingWriter::new(io::sink(), hash.algo());
            fsops::dump(tree, &mut w)?;
            Ok(w.finish().0)
        }
    }
}

/// The hash of a regular file's bytes, or `None` if `tree` is not a regular file.
fn flat_hash(tree: &Path, algo: HashAlgo) -> Result<Option<Hash>> {
    let io_err = |source| StoreError::Io { op: "hash", path: tree.to_owned(), source };
    let meta = std::fs::symlink_metadata(tree).map_err(io_err)?;
    if !meta.file_type().is_file() {
        return Ok(None);
    }
    let mut h = Hasher::new(algo);
    io::copy(&mut File::open(tree).map_err(io_err)?, &mut h).map_err(io_err)?;
    Ok(Some(h.finish()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use cairn_nix::strategies::Tree;
    use cairn_nix::StorePath;

    fn dir() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    fn info(path: StorePath, nar: &[u8], ca: Option<ContentAddress>, references: BTreeSet<StorePath>) -> PathInfo {
        PathInfo {
            path,
            nar_hash: Hash::digest(HashAlgo::Sha256, nar),
            nar_size: nar.len() as u64,
            references,
            deriver: None,
            registration_time: 0,
            ultimate: false,
            signatures: BTreeSet::new(),
            ca,
        }
    }

    fn restored(tree: &Tree) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let nar = tree.to_nar();
        let tmp = tempfile::tempdir().unwrap();
        let at = tmp.path().join("x");
        let mut r = cairn_nix::nar::NarReader::new(&nar[..], cairn_nix::nar::Limits::default()).unwrap();
        crate::restore(&mut r, &at, crate::RestoreMode::Canonical).unwrap();
        (tmp, at, nar)
    }

    #[test]
    fn a_flat_address_is_checked_against_the_file_bytes() {
        let genuine = Hash::digest(HashAlgo::Sha256, b"release tarball");
        let ca = ContentAddress::Fixed { method: FileIngestionMethod::Flat, hash: genuine.clone() };
        let path = dir()
            .make_fixed_output_path("src.tar", FileIngestionMethod::Flat, &genuine, &BTreeSet::new(), false)
            .unwrap();
        let (_t, good, nar) = restored(&Tree::File { executable: false, contents: b"release tarball".to_vec() });
        check_contents(&dir(), &info(path.clone(), &nar, Some(ca.clone()), BTreeSet::new()), &good).unwrap();
        let (_t, planted, nar) = restored(&Tree::File { executable: false, contents: b"backdoor".to_vec() });
        let e =
            check_contents(&dir(), &info(path.clone(), &nar, Some(ca.clone()), BTreeSet::new()), &planted).unwrap_err();
        assert!(e.to_string().contains("content address mismatch"), "{e}");
        let (_t, tree, nar) =
            restored(&Tree::Directory([(b"a".to_vec(), Tree::Symlink { target: b"b".to_vec() })].into()));
        let e = check_contents(&dir(), &info(path, &nar, Some(ca), BTreeSet::new()), &tree).unwrap_err();
        assert!(e.to_string().contains("is for a regular file"), "{e}");
    }

    #[test]
    fn a_recursive_address_is_the_nar_hash_or_a_second_dump() {
        let tree = Tree::Directory([(b"f".to_vec(), Tree::File { executable: true, contents: b"x".to_vec() })].into());
        let (_t, at, nar) = restored(&tree);
        for algo in [HashAlgo::Sha256, HashAlgo::Sha1, HashAlgo::Sha512] {
            let h = Hash::digest(algo, &nar);
            let ca = ContentAddress::Fixed { method: FileIngestionMethod::Recursive, hash: h.clone() };
            let p =
                dir().make_fixed_output_path("t", FileIngestionMethod::Recursive, &h, &BTreeSet::new(), false).unwrap();
            check_contents(&dir(), &info(p.clone(), &nar, Some(ca), BTreeSet::new()), &at).unwrap();
            let forged = Hash::digest(algo, b"other");
            let ca = ContentAddress::Fixed { method: FileIngestionMethod::Recursive, hash: forged.clone() };
            let p = dir()
                .make_fixed_output_path("t", FileIngestionMethod::Recursive, &forged, &BTreeSet::new(), false)
                .unwrap();
            assert!(check_contents(&dir(), &info(p, &nar, Some(ca), BTreeSet::new()), &at).is_err(), "{algo}");
        }
    }
}
