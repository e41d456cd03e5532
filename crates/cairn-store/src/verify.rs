//! `verify`: is what the database says true of the disk?
//!
//! Checks that the database is intact and its references closed (SQLite's `quick_check` and
//! `foreign_key_check`), that every valid path has contents on disk, and — with
//! `check_contents` — that those contents still serialise to the recorded NAR hash and size and,
//! for content-addressed paths, hash to the recorded content address, which yields the path.
//! Contents are hashed on two threads; each path is temporarily rooted while it is checked, and
//! a path a concurrent collection took in the meantime is not reported.
//!
//! Repair needs good copies from somewhere: the daemon substitutes the broken paths again
//! ([`crate::Batch`] in repair mode) and reports what it could not repair.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use cairn_nix::hash::HashingWriter;
use cairn_nix::{Hash, HashAlgo, StorePath};

use cairn_db::RecordedContents;

use crate::{fsops, LocalStore, PathInfo, Result};

/// What to check.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions {
    pub check_contents: bool,
    /// Remove from the database the paths whose contents disappeared and that no valid path
    /// refers to, as `nix-store --verify` does, with `--repair` too (Nix repairs only a vanished
    /// path still referred to); cairn's own `verify --repair` leaves them to be fetched again.
    pub forget_vanished: bool,
    /// Remove the links of `.links` found modified (a repair, as Nix's: optimising links the
    /// repaired files again).
    pub drop_modified_links: bool,
}

/// One thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The path concerned, if the problem is a path's.
    pub path: Option<StorePath>,
    /// `missing`, `modified`, `content-address`, `database`, `graph` (the in-memory reference
    /// graph disagrees with the database), `link` (a file of `.links` no longer hashes to its
    /// name: a store file modified in place).
    pub kind: &'static str,
    /// One line, as Nix words it where Nix has the same check.
    pub message: String,
}

/// What `verify` found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub checked: u64,
    pub problems: Vec<Problem>,
    /// Paths repaired (filled in by whoever repairs).
    pub repaired: u64,
    /// Paths whose contents had disappeared and that were removed from the database (no valid
    /// path referred to them), one line each, as Nix logs them.
    pub forgotten: Vec<String>,
}

impl LocalStore {
    pub fn verify(&self, opts: VerifyOptions) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        for message in self.db().check_integrity()? {
            report.problems.push(Problem { path: None, kind: "database", message });
        }
        if let Some(message) = self.graph_difference()? {
            report.problems.push(Problem { path: None, kind: "graph", message });
        }
        let all = self.db().all_hashes()?;
        report.checked = all.len() as u64;
        let problems = Mutex::new(Vec::new());
        let next = AtomicUsize::new(0);
        let workers = if opts.check_contents { 2 } else { 1 };
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(recorded) = all.get(i) else { break };
                    if let Some(p) = self.verify_path(recorded, opts.check_contents) {
                        problems.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(p);
                    }
                });
            }
        });
        let mut problems = problems.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        if opts.forget_vanished {
            self.forget_vanished(&mut problems, &mut report.forgotten)?;
        }
        problems.sort();
        if opts.check_contents {
            for (link, now) in self.modified_links()? {
                let name = link.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let mut message =
                    format!("link '{}' was modified! expected hash '{name}', got '{now}'", link.display());
                if opts.drop_modified_links && std::fs::remove_file(&link).is_ok() {
                    message.push_str(" (repaired)");
                    report.repaired += 1;
                }
                report.problems.push(Problem { path: None, kind: "link", message });
            }
        }
        report.problems.extend(problems);
        Ok(report)
    }

    /// Checks the contents of `paths` only (those valid; the others are not this check's
    /// business): what a repair of named paths starts from.
    pub fn verify_paths(&self, paths: &[StorePath]) -> Result<Vec<Problem>> {
        let mut problems = Vec::new();
        for path in paths {
            let Some(info) = self.path_info(path)? else { continue };
            let recorded =
                RecordedContents { path: info.path, nar_hash: info.nar_hash, nar_size: info.nar_size, ca: info.ca };
            problems.extend(self.verify_path(&recorded, true));
        }
        Ok(problems)
    }

    /// As Nix's `verifyStore`: a path whose contents disappeared is removed from the database
    /// unless a path that is still valid refers to it (then it stays a problem, worded as
    /// Nix's). Paths that vanished together go together, referrers first.
    fn forget_vanished(&self, problems: &mut Vec<Problem>, forgotten: &mut Vec<String>) -> Result<()> {
        let vanished: Vec<StorePath> =
            problems.iter().filter(|p| p.kind == "missing").filter_map(|p| p.path.clone()).collect();
        if vanished.is_empty() {
            return Ok(());
        }
        let gone = |p: &StorePath| std::fs::symlink_metadata(self.real_path(p)).is_err();
        // Each pass invalidates those no valid path refers to any more.
        for _ in 0..vanished.len() {
            let before = vanished.iter().filter(|p| self.is_valid(p).unwrap_or(true)).count();
            self.invalidate_batch(&vanished, true, |_, p| gone(p))?;
            let after = vanished.iter().filter(|p| self.is_valid(p).unwrap_or(true)).count();
            if after == 0 || after == before {
                break;
            }
        }
        for problem in problems.iter_mut().filter(|p| p.kind == "missing") {
            let Some(path) = &problem.path else { continue };
            let shown = self.store_dir().display(path);
            if self.is_valid(path)? {
                problem.message = format!("path '{shown}' disappeared, but it still has valid referrers!");
            } else {
                forgotten.push(format!("path '{shown}' disappeared, removing from database..."));
            }
        }
        problems.retain(|p| p.kind != "missing" || p.path.as_ref().is_some_and(|p| self.is_valid(p).unwrap_or(true)));
        Ok(())
    }

    /// Whether the in-memory graph (if loaded) differs from the database. The database is read
    /// under the graph's read lock, but a registration commits to the database before it takes
    /// the graph's write lock: a difference is reported only if it is still there after the
    /// store had time to catch up.
    fn graph_difference(&self) -> Result<Option<String>> {
        let mut last = None;
        for attempt in 0..3 {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let g = self.graph_read();
            let Some(graph) = g.as_ref() else { return Ok(None) };
            let loaded = self.db().load_graph()?;
            last = graph.difference(&loaded);
            if last.is_none() {
                return Ok(None);
            }
        }
        Ok(last.map(|d| format!("the in-memory reference graph is out of step with the database: {d}")))
    }

    fn verify_path(&self, recorded: &RecordedContents, contents: bool) -> Option<Problem> {
        let RecordedContents { path, nar_hash: hash, nar_size: size, ca } = recorded;
        let _root = self.temp_root([path.clone()]);
        let shown = self.store_dir().display(path);
        let problem = |kind, message| Some(Problem { path: Some(path.clone()), kind, message });
        let real = self.real_path(path);
        let found = if std::fs::symlink_metadata(&real).is_err() {
            problem("missing", format!("path '{shown}' disappeared, but it is still valid"))
        } else if contents {
            let mut w = HashingWriter::new(std::io::sink(), HashAlgo::Sha256);
            match fsops::dump(&real, &mut w) {
                Err(e) => problem("modified", format!("path '{shown}' cannot be read: {e}")),
                Ok(()) => {
                    let (actual, actual_size, _) = w.finish();
                    if &actual != hash {
                        problem(
                            "modified",
                            format!("path '{shown}' was modified! expected hash '{hash}', got '{actual}'"),
                        )
                    } else if actual_size != *size {
                        problem("modified", format!("path '{shown}' has NAR size {actual_size}, recorded {size}"))
                    } else {
                        self.verify_content_address(path, hash, *size, ca.as_ref(), &real).err().and_then(|e| {
                            problem(
                                "content-address",
                                format!(
                                    "{e} (its recorded NAR hash is as false as the contents; \
                                         `cairn delete` it and fetch it again)"
                                ),
                            )
                        })
                    }
                }
            }
        } else {
            None
        };
        // A path collected while we looked is not a problem.
        found.filter(|_| self.is_valid(path).unwrap_or(true))
    }

    /// A recorded content address must yield the path with its recorded references, and the
    /// contents (whose NAR hash was just found equal to the recorded one) must hash to it: a
    /// consistent NAR hash says nothing about a content address written beside it.
    fn verify_content_address(
        &self,
        path: &StorePath,
        nar_hash: &Hash,
        nar_size: u64,
        ca: Option<&cairn_nix::ContentAddress>,
        real: &std::path::Path,
    ) -> Result<()> {
        let Some(ca) = ca else { return Ok(()) };
        let references = self.path_info(path)?.map(|i| i.references).unwrap_or_default();
        let info = PathInfo {
            path: path.clone(),
            nar_hash: nar_hash.clone(),
            nar_size,
            references,
            deriver: None,
            registration_time: 0,
            ultimate: false,
            signatures: Default::default(),
            ca: Some(ca.clone()),
        };
        crate::ca::check_contents(self.store_dir(), &info, real)
    }
}
