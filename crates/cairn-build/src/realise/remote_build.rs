//! One build on a remote builder ([`crate::remote`]), from the daemon's side: the session's
//! blocking work on the blocking pool, the log kept and streamed as a local build's is, the
//! outputs restored into a build directory laid out as a sandboxed build's
//! (`<top>/root/<store>/<output>`) and then collected, checked and registered by the same code
//! as a local build's — with the builder's claim compared first, and its signatures kept.
//!
//! The answer says what the caller does next: the build's result (built, or failed there and
//! reported with the builder's name), or `None` when the machine let the build down
//! (unreachable, broken session, outputs not as claimed), which is then marked down and the
//! build goes elsewhere. Nothing of a remote build is registered unless every output matched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use cairn_nix::StorePath;
use cairn_store::Direction;
use cairn_worker::BuildStatus;
use tokio::sync::{mpsc, watch};

use super::slots::RemoteSlot;
use super::{unless_cancelled, Builder, Event, Failure, FailureKind, Node, Options, Stop};
use crate::remote::{self, connect::Stopper, Claim, RemoteFailure};
use crate::sandbox::under;

impl Builder {
    pub(super) async fn build_remote(
        self: &Arc<Self>,
        drv_path: &StorePath,
        node: &Node,
        options: &Options,
        events: &mpsc::UnboundedSender<Event>,
        cancelled: &mut watch::Receiver<bool>,
        slot: &RemoteSlot,
    ) -> Option<Result<BTreeMap<String, StorePath>, Stop>> {
        let remote = slot.remote.clone();
        let dir = self.store.store_dir().clone();
        let shown = dir.display(drv_path);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = drv_path.name().trim_end_matches(".drv").to_owned();
        let top = self.settings.build_dir.join(format!("cairn-remote-{name}-{}-{n}", std::process::id()));
        let _ = events.send(Event::Started { drv: drv_path.clone(), machine: Some(remote.uri().to_owned()) });
        let log = self.settings.logs.writer(drv_path);

        let stopper: Arc<Mutex<Option<Stopper>>> = Arc::default();
        let session = {
            let (this, remote, drv_path, top, stopper) =
                (self.clone(), remote.clone(), drv_path.clone(), top.clone(), stopper.clone());
            let (drv, inputs, outputs, events) =
                (node.drv.clone(), node.inputs.clone(), node.outputs.clone(), events.clone());
            let limits = self.run_limits(options);
            tokio::task::spawn_blocking(move || {
                let _roots = this.store.temp_root(inputs.iter().chain(outputs.values()).cloned());
                let mut log = log;
                let r = this.remote_session(
                    &remote,
                    &drv_path,
                    &drv,
                    &inputs,
                    &outputs,
                    &top,
                    &stopper,
                    limits,
                    &mut |line| {
                        let _ = log.line(line);
                        let _ = events.send(Event::Log { drv: drv_path.clone(), line: line.to_vec() });
                    },
                );
                if let Err(e) = log.finish() {
                    tracing::warn!("cannot keep the log of {}: {e}", this.store.store_dir().display(&drv_path));
                }
                r
            })
        };
        let ended = unless_cancelled(cancelled, session).await;
        let result = match ended {
            Err(stop) => {
                if let Some(s) = stopper.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
                    s.stop();
                }
                Some(Err(stop))
            }
            Ok(Err(e)) => Some(Err(Failure::from(e.to_string()).into())),
            Ok(Ok(Err(RemoteFailure::Machine(why)))) => {
                tracing::warn!("builder '{}' failed building '{shown}': {why}", remote.uri());
                set_aside(&remote, events, drv_path, "failed", &why);
                None
            }
            Ok(Ok(Err(RemoteFailure::Build { status, message }))) => {
                remote.record(false);
                let kind = match status {
                    BuildStatus::TimedOut => FailureKind::TimedOut,
                    BuildStatus::NotDeterministic => FailureKind::NotDeterministic,
                    BuildStatus::PermanentFailure => FailureKind::Permanent,
                    BuildStatus::LogLimitExceeded => FailureKind::LogLimit,
                    _ => FailureKind::Other,
                };
                let message = format!("build of '{shown}' on '{}' failed: {message}", remote.uri());
                Some(Err(Failure::new(kind, message).into()))
            }
            Ok(Ok(Ok((claims, closure)))) => {
                let this = self.clone();
                let (drv_path2, drv, outputs, top2) =
                    (drv_path.clone(), node.drv.clone(), node.outputs.clone(), top.clone());
                let (mode, keep_failed) = (node.mode.clone(), options.keep_failed);
                let registered = tokio::task::spawn_blocking(move || {
                    let collected =
                        this.collect_outputs(&drv_path2, &drv, &outputs, &closure, &top2, &mode).map_err(Err)?;
                    for (_, display, c) in &collected {
                        let claim = claims.get(&c.path).ok_or_else(|| Ok(format!("no claim for '{display}'")))?;
                        remote::check_claim(display, claim, &c.nar_hash, &c.references).map_err(Ok)?;
                    }
                    let signatures: BTreeMap<StorePath, BTreeSet<String>> =
                        claims.into_iter().map(|(p, c)| (p, c.signatures)).collect();
                    this.commit_outputs(&drv_path2, &drv, &outputs, collected, &mode, keep_failed, &signatures)
                        .map_err(Err)
                })
                .await;
                match registered {
                    Err(e) => Some(Err(Failure::from(e.to_string()).into())),
                    Ok(Ok(outputs)) => {
                        remote.record(true);
                        Some(Ok(outputs))
                    }
                    // The outputs are not what the builder said they are.
                    Ok(Err(Ok(why))) => {
                        tracing::warn!("builder '{}' returned untrustworthy outputs of '{shown}': {why}", remote.uri());
                        set_aside(&remote, events, drv_path, "refused", &why);
                        None
                    }
                    // The outputs are wrong in the way a local build's can be (a hash mismatch,
                    // a forbidden reference): the build failed.
                    Ok(Err(Err(f))) => {
                        remote.record(false);
                        let mut f = f;
                        f.message = format!("{} (built on '{}')", f.message, remote.uri());
                        Some(Err(f.into()))
                    }
                }
            }
        };
        let top2 = top.clone();
        tokio::task::spawn_blocking(move || {
            if top2.exists() {
                if let Err(e) = crate::root::remove(&top2) {
                    tracing::warn!("cannot remove build directory '{}': {e}", top2.display());
                }
            }
        });
        result
    }

    /// The blocking part: a session, the inputs sent, the build, the outputs fetched into
    /// `top`. Returns each output's claim, and the input closure (the outputs' candidate
    /// references).
    #[allow(clippy::too_many_arguments)]
    fn remote_session(
        &self,
        remote: &remote::Remote,
        drv_path: &StorePath,
        drv: &cairn_nix::derivation::Derivation,
        inputs: &[StorePath],
        outputs: &BTreeMap<String, StorePath>,
        top: &std::path::Path,
        stopper: &Mutex<Option<Stopper>>,
        limits: crate::runner::RunLimits,
        on_line: &mut dyn FnMut(&[u8]),
    ) -> Result<(BTreeMap<StorePath, Claim>, Vec<StorePath>), RemoteFailure> {
        let dir = self.store.store_dir();
        let machine = |e: String| RemoteFailure::Machine(e);
        let remotes = &self.remotes;
        let mut conn = remote
            .session(dir, &remotes.ssh_dir, remotes.use_substitutes)
            .map_err(|e| machine(format!("cannot connect: {e}")))?;
        *stopper.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(conn.stopper());
        let closure = self.store.walk(inputs, Direction::References).map_err(|e| machine(e.to_string()))?;
        remote::send_inputs(remote, &mut conn, &self.store, &closure, remotes.use_substitutes).map_err(machine)?;
        remote::build(&mut conn, drv_path, drv, inputs, &remote::options(remotes.use_substitutes, limits), on_line)?;
        std::fs::create_dir(top).map_err(|e| machine(format!("cannot create '{}': {e}", top.display())))?;
        let mut claims = BTreeMap::new();
        for path in outputs.values() {
            let dest = under(&top.join("root"), &dir.display(path));
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| machine(format!("cannot create '{}': {e}", parent.display())))?;
            }
            let claim = remote::fetch_output(remote, &mut conn, dir, path, &dest).map_err(machine)?;
            claims.insert(path.clone(), claim);
        }
        remote.give_back(conn);
        Ok((claims, closure))
    }
}

/// A builder that failed, or whose outputs cannot be trusted: said in the build's log, marked
/// down for a while, the build left to another machine (or this one) if one can take it.
fn set_aside(remote: &remote::Remote, events: &mpsc::UnboundedSender<Event>, drv: &StorePath, what: &str, why: &str) {
    let line = format!(
        "cairn: builder '{}' {what}: {why}; another machine (or this one) takes the build if it can",
        remote.uri()
    );
    let _ = events.send(Event::Log { drv: drv.clone(), line: line.into_bytes() });
    remote.mark_down(why);
    remote.record(false);
}
