//! Export in the `nix-store --export` stream format (import is in `import.rs`).

use std::collections::BTreeMap;
use std::io::{self, Write};

use cairn_nix::export::{write_end_marker, write_next_marker, write_trailer, ExportTrailer};
use cairn_nix::hash::HashingWriter;
use cairn_nix::{HashAlgo, StorePath};

use crate::{fsops, LocalStore, PathInfo, Result, StoreError};

impl LocalStore {
    /// Sorts `infos` so that every path comes after the paths it references (within the set).
    pub fn topo_sort(&self, infos: &[PathInfo]) -> Vec<PathInfo> {
        let by_path: BTreeMap<&StorePath, &PathInfo> = infos.iter().map(|i| (&i.path, i)).collect();
        let order =
            cairn_nix::references_first(infos.iter().map(|i| &i.path), |p| by_path.get(p).map(|i| &i.references));
        order.iter().filter_map(|p| by_path.get(p).map(|i| (*i).clone())).collect()
    }

    /// Writes an export stream of exactly `paths` (not their closure), references first. The
    /// contents are hashed as they are dumped, and a path whose contents no longer match its
    /// recorded NAR hash is refused rather than exported.
    pub fn export(&self, paths: &[StorePath], out: impl Write) -> Result<()> {
        let _roots = self.temp.add(paths.iter().cloned());
        let infos = paths.iter().map(|p| self.valid_path_info(p)).collect::<Result<Vec<_>>>()?;
        let mut out = io::BufWriter::with_capacity(256 * 1024, out);
        let wr = |e: io::Error| StoreError::Io { op: "write", path: "export stream".into(), source: e };
        for info in self.topo_sort(&infos) {
            write_next_marker(&mut out).map_err(wr)?;
            let mut hashing = HashingWriter::new(&mut out, HashAlgo::Sha256);
            fsops::dump(&self.real_path(&info.path), &mut hashing)?;
            let (hash, _, _) = hashing.finish();
            if hash != info.nar_hash {
                return Err(StoreError::HashMismatch {
                    path: self.store_dir().display(&info.path),
                    expected: info.nar_hash.to_string(),
                    actual: hash.to_string(),
                });
            }
            let trailer = ExportTrailer {
                path: self.store_dir().display(&info.path),
                references: info.references.iter().map(|r| self.store_dir().display(r)).collect(),
                deriver: info.deriver.as_ref().map(|d| self.store_dir().display(d)),
            };
            write_trailer(&mut out, &trailer).map_err(wr)?;
        }
        write_end_marker(&mut out).map_err(wr)?;
        out.flush().map_err(wr)
    }
}
