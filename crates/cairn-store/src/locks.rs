//! Per-path locks inside the daemon.
//!
//! Two clients adding the same contents compute the same path. Whoever locks it first moves its
//! copy into place and registers it; the other waits, then finds the path valid and throws its
//! temporary copy away. Locks are taken in sorted order by one call, so two multi-path
//! operations cannot deadlock.

use std::collections::BTreeSet;
use std::sync::{Condvar, Mutex};

use cairn_nix::StorePath;

/// A set of locked store paths.
#[derive(Default)]
pub struct PathLocks {
    held: Mutex<BTreeSet<StorePath>>,
    released: Condvar,
}

/// Holds locks until dropped.
pub struct PathLockGuard<'a> {
    locks: &'a PathLocks,
    paths: Vec<StorePath>,
}

impl PathLocks {
    /// Blocks until none of `paths` is held by anyone else, then holds them all.
    pub fn lock(&self, paths: impl IntoIterator<Item = StorePath>) -> PathLockGuard<'_> {
        let paths: BTreeSet<StorePath> = paths.into_iter().collect();
        let mut held = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while paths.iter().any(|p| held.contains(p)) {
            held = self.released.wait(held).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        held.extend(paths.iter().cloned());
        PathLockGuard { locks: self, paths: paths.into_iter().collect() }
    }

    /// Holds `path` if nobody else does.
    pub fn try_lock(&self, path: &StorePath) -> Option<PathLockGuard<'_>> {
        let mut held = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !held.insert(path.clone()) {
            return None;
        }
        Some(PathLockGuard { locks: self, paths: vec![path.clone()] })
    }
}

impl Drop for PathLockGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in &self.paths {
            held.remove(p);
        }
        self.locks.released.notify_all();
    }
}
