//! Where a ready derivation runs: a remote builder's slot or one of this machine's jobs.
//!
//! As Nix decides with its build hook: a derivation that only this machine may build
//! (`builtin:` builders, `--check` and `--repair`, whatever `max-jobs` says; and
//! `preferLocalBuild` when this machine can build it) stays here; any other goes to the best remote builder with a free slot
//! ([`Remote::choose`]), else here if this machine can build it and a job is free, else it
//! waits for a slot to be given back. With `max-jobs = 0` nothing is built here. When no
//! builder could ever take it (none builds its platform and features, or all that could are
//! down) and this machine cannot either, it fails at once, naming why.

use std::sync::Arc;
use std::time::Duration;

use cairn_nix::StorePath;
use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::NodeMode;
use super::{Builder, Node};
use crate::remote::{Needs, Remote};
use crate::requirements::Attrs;

/// How long a waiting build sleeps before it looks again (a builder marked down comes back
/// with nobody to announce it).
const RECHECK: Duration = Duration::from_secs(1);

/// A build's place to run; given back when dropped.
pub(crate) enum Slot {
    Local(LocalSlot),
    Remote(RemoteSlot),
}

pub(crate) struct LocalSlot {
    _permit: OwnedSemaphorePermit,
    freed: Arc<Notify>,
}

impl Drop for LocalSlot {
    fn drop(&mut self) {
        self.freed.notify_waiters();
    }
}

pub(crate) struct RemoteSlot {
    pub remote: Arc<Remote>,
    freed: Arc<Notify>,
}

impl Drop for RemoteSlot {
    fn drop(&mut self) {
        self.remote.release();
        self.freed.notify_waiters();
    }
}

impl Builder {
    /// A slot for `node` (`None`: nothing is ready, which the caller's guard prevents), or why
    /// it cannot be built anywhere.
    pub(super) async fn slot_for(
        &self,
        ready: Option<(&StorePath, &Node)>,
        machines: &[Arc<Remote>],
        local: bool,
    ) -> Result<Slot, String> {
        let Some((drv_path, node)) = ready else { return std::future::pending().await };
        let shown = self.store.store_dir().display(drv_path);
        let attrs = Attrs::new(&node.drv, &shown).ok();
        let features = attrs.as_ref().and_then(|a| a.required_features().ok()).unwrap_or_default();
        // Builtin builders run in the daemon, and checks and repairs compare with this store:
        // those run here, even with max-jobs = 0.
        let only_here = node.mode != NodeMode::Build || node.drv.builder.starts_with("builtin:");
        // `local` is false when the request itself asked for no local builds (max-jobs 0).
        let local_allowed = (self.settings.max_jobs > 0 && local) || only_here;
        let local_can = local_allowed && self.settings.host.check(&node.drv, &shown).is_ok();
        let prefer_here = local_can && attrs.as_ref().is_some_and(|a| a.prefer_local_build().unwrap_or(false));
        let remote_allowed = !(only_here || prefer_here);
        let needs = Needs { system: &node.drv.platform, features: &features, inputs: &node.inputs };
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if remote_allowed {
                if let Some(remote) = Remote::choose(machines, &needs) {
                    return Ok(Slot::Remote(RemoteSlot { remote, freed: self.freed.clone() }));
                }
            }
            let suitable: Vec<&Arc<Remote>> =
                if remote_allowed { machines.iter().filter(|m| m.suits(&needs)).collect() } else { Vec::new() };
            if local_can || (local_allowed && suitable.is_empty()) {
                // Here: either this machine can build it, or nothing else could and the build
                // reports why this machine cannot (in Nix's words).
                if suitable.is_empty() || suitable.iter().all(|m| m.down()) {
                    let permit = self.jobs.clone().acquire_owned().await.map_err(|e| e.to_string())?;
                    return Ok(Slot::Local(LocalSlot { _permit: permit, freed: self.freed.clone() }));
                }
                if let Ok(permit) = self.jobs.clone().try_acquire_owned() {
                    return Ok(Slot::Local(LocalSlot { _permit: permit, freed: self.freed.clone() }));
                }
            } else if suitable.is_empty() {
                return Err(self.nowhere(&shown, node, &features, machines, local));
            } else if suitable.iter().all(|m| m.down()) {
                let why: Vec<String> = suitable
                    .iter()
                    .map(|m| {
                        let s = m.status();
                        format!("'{}' ({})", m.uri(), s.last_error.unwrap_or_else(|| "down".to_owned()))
                    })
                    .collect();
                return Err(format!(
                    "cannot build '{shown}': every builder that could build it is down: {}",
                    why.join(", ")
                ));
            }
            let _ = tokio::time::timeout(RECHECK, freed).await;
        }
    }

    /// Why no machine, this one included, will build `node`.
    fn nowhere(
        &self,
        shown: &str,
        node: &Node,
        features: &std::collections::BTreeSet<String>,
        machines: &[Arc<Remote>],
        local: bool,
    ) -> String {
        if !local && machines.is_empty() {
            // The client's own max-jobs 0, in Nix's words.
            return "unable to start any build; either increase '--max-jobs' or enable remote builds.".to_owned();
        }
        let wanted = format!(
            "a '{}' with features {{{}}} is required to build '{shown}'",
            node.drv.platform,
            features.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        if self.settings.max_jobs == 0 && machines.is_empty() {
            return "unable to start any build: max-jobs is 0 and no remote builders are configured \
                    (set max-jobs, or builders)"
                .to_owned();
        }
        let builders: Vec<String> =
            machines.iter().map(|m| format!("'{}' ({})", m.uri(), m.machine.systems.join(", "))).collect();
        format!(
            "{wanted}, but {} and no builder matches (builders: {})",
            if self.settings.max_jobs == 0 || !local {
                "max-jobs is 0".to_owned()
            } else {
                format!("I am a '{}'", self.settings.host.system)
            },
            if builders.is_empty() { "none".to_owned() } else { builders.join(", ") }
        )
    }
}
