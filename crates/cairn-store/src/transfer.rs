//! Export and import in the `nix-store --export` / `--import` stream format.
//!
//! An import is all or nothing: every path of the stream is restored into one temporary
//! directory and checked (its NAR parsed and hashed, its references valid or earlier in the
//! stream, its hash equal to the recorded one if the path is valid already) before any of them
//! is moved into place, and then all are made durable with one `syncfs` and registered in one
//! transaction. That is also what makes a 100k-path import fast: one sync and one commit instead
//! of one per path.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{self, Read, Write};

use cairn_nix::export::{read_marker, read_trailer, write_end_marker, write_next_marker, write_trailer, ExportTrailer};
use cairn_nix::hash::{HashingReader, HashingWriter};
use cairn_nix::nar::{Limits, NarReader};
use cairn_nix::{HashAlgo, StorePath};

use crate::{fsops, now, restore_with_buffer, LocalStore, PathInfo, RestoreMode, Result, StoreError};

impl LocalStore {
    /// Sorts `paths` so that every path comes after the paths it references (within the set).
    pub fn topo_sort(&self, infos: &[PathInfo]) -> Vec<PathInfo> {
        let by_path: BTreeMap<&StorePath, &PathInfo> = infos.iter().map(|i| (&i.path, i)).collect();
        let mut done: HashSet<&StorePath> = HashSet::new();
        let mut out = Vec::with_capacity(infos.len());
        for info in infos {
            let mut stack = vec![(info, false)];
            while let Some((i, expanded)) = stack.pop() {
                if done.contains(&i.path) {
                    continue;
                }
                if expanded {
                    done.insert(&i.path);
                    out.push(i.clone());
                } else {
                    stack.push((i, true));
                    for r in i.references.iter().rev() {
                        if r != &i.path && !done.contains(r) {
                            if let Some(ri) = by_path.get(r) {
                                stack.push((ri, false));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Writes an export stream of exactly `paths` (not their closure), references first. The
    /// contents are hashed as they are dumped, and a path whose contents no longer match its
    /// recorded NAR hash is refused rather than exported.
    pub fn export(&self, paths: &[StorePath], out: impl Write) -> Result<()> {
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

    /// Imports an export stream. Returns the paths of the stream in stream order (including
    /// those that were valid already).
    pub fn import(&self, input: impl Read) -> Result<Vec<PathInfo>> {
        let started = std::time::Instant::now();
        let mut input = io::BufReader::with_capacity(256 * 1024, input);
        let tmp = self.temp_dir()?;
        let mut staged: Vec<(PathInfo, Option<std::path::PathBuf>)> = Vec::new();
        let mut seen: HashSet<StorePath> = HashSet::new();
        let store_dir = self.store_dir().clone();
        let mut buf = vec![0u8; fsops::COPY_BUF];
        // Copies are numbered by their position in the stream, duplicates included, so a
        // skipped duplicate never leaves a name that the next path would collide with.
        for n in 0u64.. {
            if !read_marker(&mut input)? {
                break;
            }
            let copy = tmp.0.join(n.to_string());
            let mut hashing = HashingReader::new(&mut input, HashAlgo::Sha256);
            let mut nar = NarReader::new(&mut hashing, Limits::default())?;
            restore_with_buffer(&mut nar, &copy, RestoreMode::Canonical, &mut buf)?;
            drop(nar);
            let (nar_hash, nar_size, _) = hashing.finish();
            let trailer = read_trailer(&mut input)?;
            let path = store_dir.parse(&trailer.path)?;
            let references = trailer
                .references
                .iter()
                .map(|r| store_dir.parse(r))
                .collect::<std::result::Result<BTreeSet<_>, _>>()?;
            let deriver = trailer.deriver.as_deref().map(|d| store_dir.parse(d)).transpose()?;
            if seen.contains(&path) {
                continue; // the same path twice in one stream: the first copy wins
            }
            for r in &references {
                if r != &path && !seen.contains(r) && !self.is_valid(r)? {
                    return Err(StoreError::MissingReference { path: trailer.path, reference: store_dir.display(r) });
                }
            }
            let existing = self.path_info(&path)?;
            if let Some(e) = &existing {
                if e.nar_hash != nar_hash {
                    return Err(StoreError::HashMismatch {
                        path: trailer.path,
                        expected: e.nar_hash.to_string(),
                        actual: nar_hash.to_string(),
                    });
                }
            }
            seen.insert(path.clone());
            let info = PathInfo {
                path,
                nar_hash,
                nar_size,
                references,
                deriver,
                registration_time: now(),
                ultimate: false,
                signatures: BTreeSet::new(),
                ca: None,
            };
            staged.push((existing.unwrap_or(info), Some(copy)));
        }
        let read = started.elapsed();
        let _locks = self.locks.lock(staged.iter().map(|(i, _)| i.path.clone()));
        // Paths someone else registered while we were reading are not installed again.
        let mut to_register = Vec::new();
        for (info, copy) in &mut staged {
            if self.is_valid(&info.path)? {
                *copy = None;
            } else {
                to_register.push(info.clone());
            }
        }
        if !to_register.is_empty() {
            fsops::sync_filesystem(&tmp.0)?;
            let synced = started.elapsed();
            for (info, copy) in &staged {
                if let Some(copy) = copy {
                    self.install(copy, &info.path)?;
                }
            }
            fsops::sync_dir(&self.layout.real_store_dir)?;
            let installed = started.elapsed();
            self.register(&to_register)?;
            tracing::debug!(paths = staged.len(), ?read, ?synced, ?installed, total = ?started.elapsed(), "import committed");
        }
        Ok(staged.into_iter().map(|(i, _)| i).collect())
    }
}
