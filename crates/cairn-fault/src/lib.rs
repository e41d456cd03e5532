//! Named crash points in cairn's commit protocols.
//!
//! The store promises that a crash at any moment loses nothing a client was told is valid and
//! leaves nothing half done. Killing the daemon at random moments tests that promise only where
//! the moments happen to fall; the steps where a crash matters most — after the contents are
//! written but before they are synced, inside the database transaction, halfway through a
//! collection's sweep — are each a few microseconds wide. So each such step calls [`point`] with
//! its name, and the crash harness (`bench/crash`) starts cairnd with `CAIRN_FAULT=STEP:N`, which
//! makes the daemon kill itself with `SIGKILL` the `N`th time it reaches `STEP`.
//!
//! **Architecture Invariant:** without the `enabled` feature, [`point`] is an empty inline
//! function and the environment is never read: no normal build can be made to crash by its
//! environment. The feature is enabled only by `cairn-daemon`'s `fault-injection` feature, which
//! only the crash harness builds.

/// Every step that calls [`point`], for the harness to choose from and to report on.
pub const STEPS: &[&str] = &[
    "contents-written",
    "after-syncfs",
    "after-rename",
    "in-transaction",
    "after-commit",
    "gc-after-invalidate",
    "gc-mid-sweep",
    "trash-mid-emptying",
    "substitute-mid",
    "pull-mid",
    "push-receive-mid",
    "build-register-mid",
    "flush-after-syncfs",
];

/// The environment variable naming the step to crash at, as `STEP:N` (N from 1).
pub const ENV: &str = "CAIRN_FAULT";

/// Reached step `name`: kills this process if the harness asked for a crash here (only with
/// the `enabled` feature; otherwise nothing).
#[inline(always)]
pub fn point(name: &'static str) {
    #[cfg(feature = "enabled")]
    armed::reach(name);
    #[cfg(not(feature = "enabled"))]
    let _ = name;
}

#[cfg(feature = "enabled")]
mod armed {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    /// The step and the count at which to crash, from [`super::ENV`].
    fn target() -> Option<&'static (String, u64)> {
        static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
        TARGET
            .get_or_init(|| {
                let v = std::env::var(super::ENV).ok()?;
                let (step, n) = v.split_once(':').unwrap_or((v.as_str(), "1"));
                Some((step.to_owned(), n.parse().ok()?))
            })
            .as_ref()
    }

    pub(super) fn reach(name: &'static str) {
        static HITS: AtomicU64 = AtomicU64::new(0);
        let Some((step, n)) = target() else { return };
        if step != name {
            return;
        }
        if HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            // SIGKILL, as a power cut or the OOM killer: no destructor, no flush, no unwinding.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
        }
    }
}
