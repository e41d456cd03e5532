//! Reclaiming the disk space of collected paths in the background.
//!
//! A collection makes paths invalid and moves their contents out of the store directory into
//! `.cairn-trash` — a rename each, so the store is consistent and the paths gone when the
//! collection returns. Freeing the space is left to this thread, which empties the trash.
//!
//! Why: on a file system mounted with `discard` (common on VMs and SSDs), every unlink of a file
//! with data waits for the TRIM of its blocks, and removing 100k small paths takes seconds to
//! tens of seconds — most of a collection's time, spent holding nothing anyone waits for. The
//! trash is emptied at start-up too, so a crash leaves nothing behind for long.
//!
//! `pending_bytes` says how much is still to be freed; automatic collection counts it as free,
//! and [`LocalStore::wait_reclaimed`](crate::LocalStore::wait_reclaimed) waits until none is left.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::fsops;

#[derive(Default)]
struct State {
    /// Bytes moved to the trash and not yet freed (an estimate: hard links may change).
    pending_bytes: u64,
    /// Work was added since the thread last found the trash empty.
    wake: bool,
    /// The trash was found empty and nothing was added since.
    idle: bool,
    /// A collection is running: wait, and leave it the disk (freeing blocks competes with the
    /// renames and commits the collection is waiting on).
    paused: bool,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The thread that empties `.cairn-trash`.
pub(crate) struct Reclaimer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Reclaimer {
    /// Starts the thread, which begins by emptying what an earlier run left in `trash`.
    pub(crate) fn start(trash: PathBuf) -> Reclaimer {
        let shared =
            Arc::new(Shared { state: Mutex::new(State { wake: true, ..State::default() }), changed: Condvar::new() });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cairn-reclaim".into())
            .spawn(move || run(&s, &trash))
            .expect("cannot start the reclaim thread");
        Reclaimer { shared, thread: Some(thread) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tells the thread that `bytes` more are in the trash.
    pub(crate) fn added(&self, bytes: u64) {
        let mut st = self.lock();
        st.pending_bytes += bytes;
        st.wake = true;
        st.idle = false;
        self.shared.changed.notify_all();
    }

    /// Holds reclaiming back (or lets it go on).
    pub(crate) fn set_paused(&self, paused: bool) {
        self.lock().paused = paused;
        self.shared.changed.notify_all();
    }

    pub(crate) fn pending_bytes(&self) -> u64 {
        self.lock().pending_bytes
    }

    /// Blocks until the trash is empty.
    pub(crate) fn wait_idle(&self) {
        let mut st = self.lock();
        while !st.idle {
            st = self.shared.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

fn run(shared: &Shared, trash: &std::path::Path) {
    loop {
        {
            let mut st = shared.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            while (!st.wake || st.paused) && !st.stop {
                st = shared.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if st.stop {
                return;
            }
            st.wake = false;
        }
        let entries: Vec<PathBuf> = match std::fs::read_dir(trash) {
            Ok(d) => d.flatten().map(|e| e.path()).collect(),
            Err(e) => {
                tracing::warn!("cannot list '{}': {e}", trash.display());
                Vec::new()
            }
        };
        for entry in entries {
            cairn_fault::point("trash-mid-emptying");
            let freed = fsops::remove_tree_counting(&entry).unwrap_or_else(|e| {
                tracing::warn!("cannot empty the trash: {e}");
                0
            });
            let mut st = shared.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            st.pending_bytes = st.pending_bytes.saturating_sub(freed);
            while st.paused && !st.stop {
                st = shared.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if st.stop {
                return;
            }
        }
        let mut st = shared.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !st.wake {
            st.idle = true;
            st.pending_bytes = 0;
            shared.changed.notify_all();
        }
    }
}

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
