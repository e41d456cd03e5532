//! The builtin builders Nix runs in its sandbox and cairnd runs in the daemon, each as one
//! build whose output is made into a build directory laid out as a sandboxed build's
//! (`<top>/root/<store>/<output>`) and registered through the same [`Builder::register`] as any
//! build's, its references found among its inputs' closure:
//! - `builtin:buildenv`, the user environment of `nix-env` and profiles ([`crate::buildenv`],
//!   which reads the store alone, as Nix's reads it in the sandbox);
//! - `builtin:unpack-channel`, a channel of `nix-channel --update`
//!   ([`crate::unpack_channel`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_nix::StorePath;
use tokio::sync::mpsc;

use super::{Builder, Event, Node};
use crate::buildenv::{self, StoreView, Target};
use crate::sandbox::under;

/// What makes a builtin's output: given the store, the output's host path and logical path,
/// it makes the output there and returns warnings to log, or the error.
type Make = Box<dyn FnOnce(&cairn_store::LocalStore, &Path, &str) -> Result<Vec<String>, String> + Send>;

impl Builder {
    /// Makes and registers the output of a `builtin:buildenv` derivation; the error is the
    /// message to report.
    pub(super) async fn build_buildenv(
        self: &Arc<Self>,
        drv_path: &StorePath,
        node: &Node,
        options: &super::Options,
        events: &mpsc::UnboundedSender<Event>,
    ) -> Result<BTreeMap<String, StorePath>, super::Failure> {
        let env = &node.drv.env;
        let shown = self.store.store_dir().display(drv_path);
        let failed = |m: String| format!("builder for '{shown}' failed: {m}");
        let packages = buildenv::packages(env).map_err(|e| failed(e.to_string()))?;
        let manifest = buildenv::manifest(env).map_err(|e| failed(e.to_string()))?.to_owned();
        let make: Make = Box::new(move |store, dest, logical| {
            let store_dir = store.store_dir().as_str().to_owned();
            let real_dir = store.layout().real_store_dir.clone();
            let real = move |p: &str| real_dir.join(p.rsplit('/').next().unwrap_or(p));
            let view = StoreView { dir: &store_dir, real: &real };
            let summary = buildenv::build(&Target { host: dest, logical }, &packages, Some(&manifest), &view)
                .map_err(|e| e.to_string())?;
            // (Nix says how many links it made only at debug verbosity.)
            Ok(summary.warnings.iter().map(|w| format!("warning: {w}")).collect())
        });
        self.build_builtin_in_daemon(drv_path, node, options, events, make).await
    }

    /// Makes and registers the output of a `builtin:unpack-channel` derivation.
    pub(super) async fn build_unpack_channel(
        self: &Arc<Self>,
        drv_path: &StorePath,
        node: &Node,
        options: &super::Options,
        events: &mpsc::UnboundedSender<Event>,
    ) -> Result<BTreeMap<String, StorePath>, super::Failure> {
        let env = node.drv.env.clone();
        let make: Make = Box::new(move |store, dest, _| {
            // `src` is an input of the derivation (valid, rooted for the build); read in place.
            let src = env.get("src").and_then(|s| store.store_dir().parse(s).ok());
            let real_src: PathBuf = src.map(|p| store.real_path(&p)).unwrap_or_default();
            crate::unpack_channel::unpack(&env, &real_src, dest).map_err(|e| e.to_string())?;
            Ok(Vec::new())
        });
        self.build_builtin_in_daemon(drv_path, node, options, events, make).await
    }

    /// One builtin build made in the daemon by `make`.
    async fn build_builtin_in_daemon(
        self: &Arc<Self>,
        drv_path: &StorePath,
        node: &Node,
        options: &super::Options,
        events: &mpsc::UnboundedSender<Event>,
        make: Make,
    ) -> Result<BTreeMap<String, StorePath>, super::Failure> {
        let dir = self.store.store_dir().clone();
        let shown = dir.display(drv_path);
        let out = node
            .outputs
            .get("out")
            .ok_or_else(|| format!("builder for '{shown}' failed: '{}' requires an 'out' output", node.drv.builder))?;

        let top = self.new_top(drv_path);
        let logical = dir.display(out);
        let dest = under(&top.join("root"), &logical);
        let _roots = self.store.temp_root(node.inputs.iter().chain(node.outputs.values()).cloned());
        let _ = events.send(Event::Started { drv: drv_path.clone(), machine: None });
        let mut log = self.settings.logs.writer(drv_path);

        let made = {
            let (this, top, dest, inputs) = (self.clone(), top.clone(), dest.clone(), node.inputs.clone());
            tokio::task::spawn_blocking(move || -> Result<(Vec<String>, Vec<StorePath>), String> {
                std::fs::create_dir(&top).map_err(|e| format!("create build directory '{}': {e}", top.display()))?;
                std::fs::set_permissions(&top, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .map_err(|e| e.to_string())?;
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                let warnings = make(&this.store, &dest, &logical)?;
                // References are found among what the output could point at.
                let closure =
                    this.store.walk(&inputs, cairn_store::Direction::References).map_err(|e| e.to_string())?;
                Ok((warnings, closure))
            })
            .await
            .map_err(|e| e.to_string())?
        };
        let made = match made {
            // As Nix shows a builtin builder's failure: the builder's exit, its error as the log's
            // last line (logged by `finish_in_daemon`).
            Err(e) => Err((
                format!("error: {e}"),
                format!("builder for '{shown}' failed with exit code 1;\nlast 1 log lines:\n> error: {e}"),
            )),
            Ok((warnings, closure)) => {
                for line in warnings {
                    let _ = log.line(line.as_bytes());
                    let _ = events.send(Event::Log { drv: drv_path.clone(), line: line.into_bytes() });
                }
                Ok(closure)
            }
        };
        self.finish_in_daemon(drv_path, node, options, made, log, top).await
    }
}
