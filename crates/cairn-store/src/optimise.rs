//! `optimise`: hard-link identical files across the store.
//!
//! As in Nix, every regular file is keyed by the SHA-256 of its NAR serialisation (contents and
//! executable bit) under `<store>/.links/<nix32>`. The first file with a key becomes the link's
//! inode; later ones are replaced by a hard link to it. Replacement is a `link` into the
//! temporary area and a `rename` over the file: atomic, so a reader sees the old inode or the
//! new one, both with the same bytes, and a crash leaves at worst a stray link in the temporary
//! area (emptied at start-up).
//!
//! Each path is temporarily rooted while it is processed, so a concurrent collection leaves it
//! alone; the collector removes `.links` entries no path shares any more, and a link that
//! disappears between our `link` calls is simply recreated.

use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;

use cairn_nix::nar::NarWriter;
use cairn_nix::{HashAlgo, Hasher, StorePath};

use crate::fsops::{self, io_err};
use crate::{LocalStore, Result, StoreError};

/// What `optimise` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OptimiseReport {
    /// Store paths looked at.
    pub paths: u64,
    /// Files replaced by a hard link to an identical file.
    pub files_linked: u64,
    /// Bytes those files took.
    pub bytes_saved: u64,
}

/// The name of a regular file's link in `.links`: the nix32 SHA-256 of its NAR (contents and
/// executable bit), as Nix names it.
pub(crate) fn link_name(file: &Path, meta: &Metadata) -> Result<String> {
    let executable = meta.mode() & 0o100 != 0;
    let mut nar = NarWriter::new(Hasher::new(HashAlgo::Sha256)).map_err(io_err("hash", file))?;
    let mut f = File::open(file).map_err(io_err("open", file))?;
    nar.regular(None, executable, meta.size(), &mut f)
        .map_err(|source| StoreError::NarWrite { path: file.to_owned(), source })?;
    let hash = nar.finish().map_err(|source| StoreError::NarWrite { path: file.to_owned(), source })?.finish();
    Ok(cairn_nix::nixbase32::encode(hash.as_bytes()))
}

impl LocalStore {
    /// The links of `.links` whose file no longer hashes to its name (a store file modified in
    /// place modifies its link too), as Nix's `verifyStore` finds them: (link, its hash now).
    pub(crate) fn modified_links(&self) -> Result<Vec<(std::path::PathBuf, String)>> {
        let links = self.layout.links_dir();
        let entries = match fs::read_dir(&links) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &links)(e)),
        };
        let mut modified = Vec::new();
        for e in entries {
            let e = e.map_err(io_err("list", &links))?;
            let path = e.path();
            let Ok(meta) = fs::symlink_metadata(&path) else { continue };
            if !meta.is_file() {
                continue;
            }
            let now = link_name(&path, &meta)?;
            if e.file_name().to_str() != Some(now.as_str()) {
                modified.push((path, now));
            }
        }
        modified.sort();
        Ok(modified)
    }

    /// Hard-links identical files of every valid path.
    pub fn optimise(&self) -> Result<OptimiseReport> {
        let paths = self.with_graph(|g| g.node_ids().filter_map(|i| g.path(i).cloned()).collect::<Vec<_>>())?;
        let report = self.optimise_paths(&paths)?;
        tracing::info!(files = report.files_linked, bytes = report.bytes_saved, "optimised");
        Ok(report)
    }

    /// What hard-linking saves now, in bytes, as Nix reckons it after a collection: the extra
    /// links' sizes, less the linked files' own and the links directory's blocks (negative when
    /// nothing is shared).
    pub fn links_saving(&self) -> Result<i64> {
        let links = self.layout.links_dir();
        let entries = match fs::read_dir(&links) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err("list", &links)(e)),
        };
        let (mut actual, mut unshared) = (0i64, 0i64);
        for entry in entries {
            let m = entry.and_then(|e| e.metadata()).map_err(io_err("stat", &links))?;
            if m.nlink() != 1 {
                actual += m.size() as i64;
                unshared += (m.nlink() as i64 - 1) * m.size() as i64;
            }
        }
        let overhead = fs::metadata(&links).map_err(io_err("stat", &links))?.blocks() as i64 * 512;
        Ok(unshared - actual - overhead)
    }

    /// `auto-optimise-store`: every path registered from now on is hard-linked with identical
    /// files of the store once registered, as Nix does for each path it registers.
    pub fn set_auto_optimise(&self, on: bool) {
        self.auto_optimise.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// What `auto-optimise-store` does for paths just registered (by a caller holding no path
    /// lock): a failure is only logged, as the paths are registered either way.
    pub(crate) fn optimise_registered(&self, paths: impl IntoIterator<Item = StorePath>) {
        if !self.auto_optimise.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let paths: Vec<StorePath> = paths.into_iter().collect();
        if let Err(e) = self.optimise_paths(&paths) {
            tracing::warn!("auto-optimise-store: {e}");
        }
    }

    /// Hard-links the files of `paths` (those valid) with identical files of the store, as
    /// Nix's `auto-optimise-store` does for each path it registers.
    pub fn optimise_paths(&self, paths: &[StorePath]) -> Result<OptimiseReport> {
        let links = self.layout.links_dir();
        fs::create_dir_all(&links).map_err(io_err("create", &links))?;
        let mut report = OptimiseReport::default();
        for p in paths {
            let _root = self.temp_root([p.clone()]);
            if !self.is_valid(p)? {
                continue;
            }
            report.paths += 1;
            self.optimise_tree(&self.real_path(p), &mut report)?;
        }
        Ok(report)
    }

    fn optimise_tree(&self, path: &Path, report: &mut OptimiseReport) -> Result<()> {
        let meta = fs::symlink_metadata(path).map_err(io_err("stat", path))?;
        if meta.is_dir() {
            for entry in fs::read_dir(path).map_err(io_err("list", path))? {
                self.optimise_tree(&entry.map_err(io_err("list", path))?.path(), report)?;
            }
        } else if meta.is_file() && meta.size() > 0 {
            // A link that vanishes between our two `link` calls (the collector removed it as
            // unused) is recreated on the next attempt.
            for _ in 0..3 {
                if self.optimise_file(path, &meta, report)? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Links one file; `false` if its link vanished and it should be tried again.
    fn optimise_file(&self, file: &Path, meta: &Metadata, report: &mut OptimiseReport) -> Result<bool> {
        let link = self.layout.links_dir().join(link_name(file, meta)?);
        match fs::hard_link(file, &link) {
            Ok(()) => return Ok(true), // the first of its kind
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            // Too many links to this inode already, or the file system refuses: leave it.
            Err(e) if e.raw_os_error() == Some(nix::libc::EMLINK) => return Ok(true),
            Err(e) => return Err(io_err("link", &link)(e)),
        }
        let link_meta = match fs::symlink_metadata(&link) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("stat", &link)(e)),
        };
        if link_meta.ino() == meta.ino() && link_meta.dev() == meta.dev() {
            return Ok(true); // already linked
        }
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.layout.tmp_root().join(format!("link-{}-{n}", std::process::id()));
        match fs::hard_link(&link, &tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) if e.raw_os_error() == Some(nix::libc::EMLINK) => return Ok(true),
            Err(e) => return Err(io_err("link", &tmp)(e)),
        }
        // The file's directory is read-only and its mtime canonical: open it up for the
        // rename, then restore both. (A file that is itself a store path sits in the store
        // directory, which is writable and has no canonical form.)
        let parent = file.parent().expect("store files have a parent");
        let in_path = parent != self.layout.real_store_dir;
        if in_path {
            fs::set_permissions(parent, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", parent))?;
        }
        let renamed = fs::rename(&tmp, file).map_err(io_err("replace", file));
        if in_path {
            fsops::set_canonical_dir(parent)?;
        }
        if renamed.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        renamed?;
        report.files_linked += 1;
        report.bytes_saved += meta.size();
        Ok(true)
    }
}
