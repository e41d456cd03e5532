//! Reading inside store paths (`cairn ls`, `cairn cat`) without leaving them.
//!
//! A client names `/store/<hash>-x/some/file`. The inner part is resolved one component at a
//! time with `lstat`: `.`, `..` and empty components are refused, and no intermediate component
//! may be a symlink — a symlink inside a store path may point anywhere on the host, and a
//! reader must only ever see the store.

use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use cairn_db::Direction;
use cairn_nix::StorePath;

use crate::{LocalStore, Result, StoreError};

/// What a file system object inside a store path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Regular { executable: bool, size: u64 },
    Symlink { target: Vec<u8> },
    Directory,
}

/// A named entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    pub kind: EntryKind,
}

fn kind_of(meta: &fs::Metadata, p: &std::path::Path) -> Result<EntryKind> {
    let ft = meta.file_type();
    if ft.is_file() {
        Ok(EntryKind::Regular { executable: meta.mode() & 0o100 != 0, size: meta.len() })
    } else if ft.is_symlink() {
        let t = fs::read_link(p).map_err(|source| StoreError::Io { op: "read symlink", path: p.to_owned(), source })?;
        Ok(EntryKind::Symlink { target: t.as_os_str().as_bytes().to_vec() })
    } else if ft.is_dir() {
        Ok(EntryKind::Directory)
    } else {
        Err(StoreError::UnsupportedFileType(p.to_owned()))
    }
}

impl LocalStore {
    /// The real path of `inner` inside a valid store path, refusing escapes.
    fn resolve_inner(&self, path: &StorePath, inner: &str) -> Result<PathBuf> {
        self.valid_path_info(path)?;
        let mut real = self.real_path(path);
        let parts: Vec<&str> = if inner.is_empty() { vec![] } else { inner.split('/').collect() };
        for (i, part) in parts.iter().enumerate() {
            if part.is_empty() || *part == "." || *part == ".." {
                return Err(StoreError::BadInnerPath(inner.to_owned()));
            }
            let meta = fs::symlink_metadata(&real).map_err(|source| StoreError::Io {
                op: "stat",
                path: real.clone(),
                source,
            })?;
            if !meta.is_dir() {
                return Err(StoreError::BadInnerPath(format!(
                    "{inner}: '{}' is not a directory",
                    parts[..i].join("/")
                )));
            }
            real.push(part);
        }
        Ok(real)
    }

    /// What `inner` inside a store path is, and if it is a directory, its entries (sorted).
    pub fn list(&self, path: &StorePath, inner: &str) -> Result<(EntryKind, Vec<Entry>)> {
        let _root = self.temp_root([path.clone()]);
        let real = self.resolve_inner(path, inner)?;
        let meta =
            fs::symlink_metadata(&real).map_err(|source| StoreError::Io { op: "stat", path: real.clone(), source })?;
        let kind = kind_of(&meta, &real)?;
        let mut entries = Vec::new();
        if kind == EntryKind::Directory {
            for e in fs::read_dir(&real).map_err(|source| StoreError::Io { op: "list", path: real.clone(), source })? {
                let e = e.map_err(|source| StoreError::Io { op: "list", path: real.clone(), source })?;
                let p = e.path();
                let m = fs::symlink_metadata(&p).map_err(|source| StoreError::Io {
                    op: "stat",
                    path: p.clone(),
                    source,
                })?;
                entries.push(Entry { name: e.file_name().as_bytes().to_vec(), kind: kind_of(&m, &p)? });
            }
            entries.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok((kind, entries))
    }

    /// Opens a regular file inside a store path.
    /// The file stays readable to its end even if the path is collected meanwhile.
    pub fn open_file(&self, path: &StorePath, inner: &str) -> Result<File> {
        let _root = self.temp_root([path.clone()]);
        let real = self.resolve_inner(path, inner)?;
        let meta =
            fs::symlink_metadata(&real).map_err(|source| StoreError::Io { op: "stat", path: real.clone(), source })?;
        if !meta.is_file() {
            return Err(StoreError::NotAFile(format!("{}/{inner}", self.store_dir().display(path))));
        }
        File::open(&real).map_err(|source| StoreError::Io { op: "open", path: real, source })
    }

    /// The closure of `paths` with its edges: each node with its references.
    pub fn closure_graph(&self, paths: &[StorePath]) -> Result<Vec<(StorePath, Vec<StorePath>)>> {
        let nodes = self.walk(paths, Direction::References)?;
        self.with_graph(|g| {
            nodes
                .into_iter()
                .map(|p| {
                    let id = g.id(&p).expect("walked nodes are in the graph");
                    let refs = g
                        .neighbours(id, Direction::References)
                        .iter()
                        .map(|&r| g.path(r).expect("edges join nodes").clone())
                        .collect();
                    (p, refs)
                })
                .collect()
        })
    }
}
