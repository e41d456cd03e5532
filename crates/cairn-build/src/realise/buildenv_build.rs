//! `builtin:buildenv` as one build: the user environment of `nix-env` and profiles, made in the
//! daemon by [`crate::buildenv`] into a build directory laid out as a sandboxed build's
//! (`<top>/root/<store>/<output>`), then registered through the same [`Builder::register`] as
//! any build's, its references found among its inputs' closure. Nix runs this builder inside
//! the sandbox, where only the store is visible; [`crate::buildenv`] reads the store alone.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_nix::StorePath;
use tokio::sync::mpsc;

use super::{Builder, Event, Node};
use crate::buildenv::{self, StoreView, Target};
use crate::sandbox::under;

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
        let dir = self.store.store_dir().clone();
        let shown = dir.display(drv_path);
        let failed = |m: String| format!("builder for '{shown}' failed: {m}");
        let packages = buildenv::packages(&node.drv.env).map_err(|e| failed(e.to_string()))?;
        let manifest = buildenv::manifest(&node.drv.env).map_err(|e| failed(e.to_string()))?.to_owned();
        let out =
            node.outputs.get("out").ok_or_else(|| failed("'builtin:buildenv' requires an 'out' output".into()))?;

        let top = self.new_top(drv_path);
        let logical = dir.display(out);
        let dest = under(&top.join("root"), &logical);
        let _roots = self.store.temp_root(node.inputs.iter().chain(node.outputs.values()).cloned());
        let _ = events.send(Event::Started { drv: drv_path.clone(), machine: None });
        let mut log = self.settings.logs.writer(drv_path).map_err(|e| format!("cannot open the build log: {e}"))?;

        let made = {
            let (this, top, dest, inputs) = (self.clone(), top.clone(), dest.clone(), node.inputs.clone());
            tokio::task::spawn_blocking(move || -> Result<(buildenv::Summary, Vec<StorePath>), String> {
                std::fs::create_dir(&top).map_err(|e| format!("create build directory '{}': {e}", top.display()))?;
                std::fs::set_permissions(&top, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .map_err(|e| e.to_string())?;
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                let store_dir = this.store.store_dir().as_str().to_owned();
                let real_dir = this.store.layout().real_store_dir.clone();
                let real = move |p: &str| real_dir.join(p.rsplit('/').next().unwrap_or(p));
                let view = StoreView { dir: &store_dir, real: &real };
                let summary =
                    buildenv::build(&Target { host: &dest, logical: &logical }, &packages, Some(&manifest), &view)
                        .map_err(|e| e.to_string())?;
                // References are found among what the environment could point at.
                let closure =
                    this.store.walk(&inputs, cairn_store::Direction::References).map_err(|e| e.to_string())?;
                Ok((summary, closure))
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
            Ok((summary, closure)) => {
                // (Nix says how many links it made only at debug verbosity.)
                for line in summary.warnings.iter().map(|w| format!("warning: {w}")) {
                    let _ = log.line(line.as_bytes());
                    let _ = events.send(Event::Log { drv: drv_path.clone(), line: line.into_bytes() });
                }
                Ok(closure)
            }
        };
        self.finish_in_daemon(drv_path, node, options, made, log, top).await
    }
}
