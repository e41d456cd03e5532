//! Adding content whose address the caller already knows: OCI blobs (flat files named by their
//! digest) and trees with declared references (OCI image layouts).
//!
//! A blob arrives from a registry or an archive and is trusted only once its bytes hash to the
//! digest that named it. [`LocalStore::add_flat_expecting`] computes the store path from the
//! expected hash *before* reading (so an already valid blob costs one lookup), writes the bytes
//! while two other threads compute the flat SHA-256 and the NAR SHA-256 (on a large layer they are
//! most of the work, and they run in parallel with the copy), and refuses the copy — nothing
//! placed, nothing registered — when the digest differs.

use std::collections::BTreeSet;
use std::io::Read;

use cairn_nix::content_address::FileIngestionMethod;
use cairn_nix::store_path::validate_name;
use cairn_nix::{ContentAddress, Hash, StorePath};

use crate::{nar_size_of_file, CopyToFile, LocalStore, PathInfo, Result, StoreError};

impl LocalStore {
    /// The flat fixed-output path a file named `name` with flat hash `hash` has.
    pub fn flat_path(&self, name: &str, hash: &Hash) -> Result<StorePath> {
        Ok(self.store_dir().make_fixed_output_path(name, FileIngestionMethod::Flat, hash, &BTreeSet::new(), false)?)
    }

    /// Checks a valid path found where the flat path of `expected` is. Registered with that
    /// content address, it was checked when it came in; without one (an import of unknown
    /// origin), its bytes are checked now, so that a blob is never vouched for by its name alone.
    pub fn checked_flat(&self, info: PathInfo, expected: &Hash) -> Result<PathInfo> {
        let ca = ContentAddress::Fixed { method: FileIngestionMethod::Flat, hash: expected.clone() };
        if info.ca.as_ref() == Some(&ca) {
            return Ok(info);
        }
        let claimed = PathInfo { ca: Some(ca), ..info.clone() };
        crate::ca::check_contents(self.store_dir(), &claimed, &self.real_path(&info.path))?;
        Ok(info)
    }

    /// Adds `size` bytes as the flat fixed-output path of `expected` (`nix-store --add-fixed`'s
    /// path for a file called `name`), refusing them unless they hash to `expected` and number
    /// exactly `size`. Returns the existing path's metadata at once if it is already valid (the
    /// input is then not read).
    pub fn add_flat_expecting(&self, name: &str, input: impl Read, size: u64, expected: &Hash) -> Result<PathInfo> {
        validate_name(name)?;
        let path = self.flat_path(name, expected)?;
        let _root = self.temp.add([path.clone()]);
        if let Some(info) = self.path_info(&path)? {
            return self.checked_flat(info, expected);
        }
        let tmp = self.temp_dir()?;
        let copy = tmp.0.join("x");
        let mut file = CopyToFile::new(&copy, false)?;
        let sha256 = expected.algo() == cairn_nix::HashAlgo::Sha256;
        let blake3 = sha256 && self.offered.get().is_some();
        let c = crate::files::copy_hashing(input, size, false, Some(expected.algo()), blake3, &mut file, &copy)?;
        let (Some(flat), nar_hash, got) = (c.flat, c.nar, c.size) else {
            return Err(StoreError::NotAFile(name.to_owned()));
        };
        if flat != *expected {
            return Err(StoreError::ContentMismatch {
                name: name.to_owned(),
                expected: expected.to_prefixed(cairn_nix::hash::Encoding::Base16),
                actual: flat.to_prefixed(cairn_nix::hash::Encoding::Base16),
            });
        }
        file.finish()?;
        let info = crate::flat_info(path, flat, nar_hash, nar_size_of_file(got, false));
        let info = self.finish_add(&copy, info)?;
        if let (Some(to), Some((b3, outboard))) = (self.offered.get(), c.blake3) {
            let mut digest = [0u8; 32];
            digest.copy_from_slice(expected.as_bytes());
            to.hashed(crate::peers::Wanted::Blob { sha256: digest, size: got }, b3, outboard);
        }
        Ok(info)
    }

    /// Adds the tree a NAR serialises as a `source` path with `references` (each must be valid),
    /// as Nix's `addToStore` with references does. The references are declared, not scanned: the
    /// caller knows what the tree links to.
    pub fn add_nar_with_references(
        &self,
        name: &str,
        input: impl Read,
        references: &BTreeSet<StorePath>,
    ) -> Result<PathInfo> {
        validate_name(name)?;
        let _roots = self.temp.add(references.iter().cloned());
        for r in references {
            if !self.is_valid(r)? {
                return Err(StoreError::NotValid(self.store_dir().display(r)));
            }
        }
        let tmp = self.temp_dir()?;
        let copy = tmp.0.join("x");
        let (nar_hash, nar_size, _) = Self::receive_nar(input, &copy, None)?;
        let info = crate::source_info(self.store_dir(), name, nar_hash, nar_size, references)?;
        self.finish_add(&copy, info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests_support::open_temp_store;

    #[test]
    fn blobs_are_checked_and_land_at_their_flat_path() {
        let (_dir, store) = open_temp_store();
        let data = vec![7u8; 3 * crate::files::CHUNK + 5];
        let hash = Hash::digest(cairn_nix::HashAlgo::Sha256, &data);
        let info = store.add_flat_expecting("blob", &data[..], data.len() as u64, &hash).unwrap();
        // The same path and NAR hash the unchecked flat add computes.
        let plain = store.add_flat("blob", &data[..], data.len() as u64, false).unwrap();
        assert_eq!(info, plain);
        // Already valid: answered without reading.
        let again = store.add_flat_expecting("blob", std::io::empty(), data.len() as u64, &hash).unwrap();
        assert_eq!(again.path, info.path);
    }

    #[test]
    fn wrong_bytes_or_sizes_register_nothing() {
        let (_dir, store) = open_temp_store();
        let hash = Hash::digest(cairn_nix::HashAlgo::Sha256, b"right");
        let e = store.add_flat_expecting("b", &b"wrong"[..], 5, &hash).unwrap_err();
        assert!(matches!(e, StoreError::ContentMismatch { .. }), "{e}");
        let e = store.add_flat_expecting("b", &b"right!"[..], 5, &hash).unwrap_err();
        assert!(matches!(e, StoreError::SizeMismatch { .. }), "{e}");
        let e = store.add_flat_expecting("b", &b"righ"[..], 5, &hash).unwrap_err();
        assert!(matches!(e, StoreError::SizeMismatch { .. }), "{e}");
        assert_eq!(store.count().unwrap(), 0);
        assert!(!store.is_valid(&store.flat_path("b", &hash).unwrap()).unwrap());
    }

    #[test]
    fn trees_with_declared_references() {
        let (_dir, store) = open_temp_store();
        let blob = store.add_text("t", b"x", &BTreeSet::new()).unwrap();
        let refs: BTreeSet<_> = [blob.path.clone()].into();
        let nar = crate::tests_support::sample_nar();
        let info = store.add_nar_with_references("tree", &nar[..], &refs).unwrap();
        assert_eq!(info.references, refs);
        assert_ne!(info.path, store.add_nar("tree", &nar[..]).unwrap().path, "references are part of the path");
        let missing: BTreeSet<_> =
            [store.flat_path("nope", &Hash::digest(cairn_nix::HashAlgo::Sha256, b"")).unwrap()].into();
        assert!(matches!(store.add_nar_with_references("t2", &nar[..], &missing), Err(StoreError::NotValid(_))));
    }
}
