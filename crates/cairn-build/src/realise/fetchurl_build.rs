//! `builtin:fetchurl` as one build: the download ([`crate::fetchurl`]) runs in the daemon, into
//! a build directory laid out as a sandboxed build's (`<top>/root/<store>/<output>`), and the
//! result then goes through the same [`Builder::register`] as any build's — serialised, checked
//! against the output hash, scanned for references, registered with the derivation as deriver.
//! Its log is kept and streamed like a builder's. The build directory is always removed: Nix
//! does not keep a builtin's (it may hold credentials), and neither does cairn.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_nix::StorePath;
use tokio::sync::mpsc;

use super::{Builder, Event, Node};
use crate::fetchurl::{self, Fetch};
use crate::sandbox::under;

impl Builder {
    /// Whether the daemon registered its own builder for `name` (which then wins over cairn's).
    pub(super) fn has_builtin(&self, name: &str) -> bool {
        self.builtins.lock().map(|b| b.contains_key(name)).unwrap_or(false)
    }

    /// Fetches and registers the output of a `builtin:fetchurl` derivation; the error is the
    /// message to report.
    pub(super) async fn build_fetchurl(
        self: &Arc<Self>,
        drv_path: &StorePath,
        node: &Node,
        impure_env: &[(String, String)],
        options: &super::Options,
        events: &mpsc::UnboundedSender<Event>,
    ) -> Result<BTreeMap<String, StorePath>, super::Failure> {
        let dir = self.store.store_dir().clone();
        let shown = dir.display(drv_path);
        let failed = |m: String| format!("builder for '{shown}' failed: {m}");
        let fetch = Fetch::from_derivation(&node.drv, &self.settings.fetch.hashed_mirrors)
            .map_err(|e| failed(e.to_string()))?;
        let out = node.outputs.get("out").ok_or_else(|| failed(fetchurl::FetchError::NoOut.to_string()))?;

        let top = self.new_top(drv_path);
        let dest = under(&top.join("root"), &dir.display(out));
        let _roots = self.store.temp_root(node.outputs.values().cloned());
        let made = {
            let (top, dest) = (top.clone(), dest.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                std::fs::create_dir(&top)?;
                std::fs::set_permissions(&top, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
                std::fs::create_dir_all(dest.parent().unwrap_or(&top))
            })
            .await
            .map_err(|e| e.to_string())?
        };
        if let Err(e) = made {
            let _ = crate::root::remove(&top);
            return Err(format!("cannot build '{shown}': create build directory '{}': {e}", top.display()).into());
        }

        let _ = events.send(Event::Started { drv: drv_path.clone(), machine: None });
        let mut log = self.settings.logs.writer(drv_path);
        let env: BTreeMap<String, String> = impure_env.iter().cloned().collect();
        let fetched = {
            let mut line = |l: &[u8]| {
                let _ = log.line(l);
                let _ = events.send(Event::Log { drv: drv_path.clone(), line: l.to_vec() });
            };
            fetchurl::run(&fetch, &dest, &fetchurl::scratch_file(&top), &self.settings.fetch, &env, &mut line).await
        };
        let made = fetched.map(|()| Vec::new()).map_err(|e| (format!("error: {e}"), failed(e.to_string())));
        self.finish_in_daemon(drv_path, node, options, made, log, top).await
    }

    /// The end of a build made in the daemon into `<top>/root`: registers its outputs (their
    /// references found among `made`'s closure) or logs why there are none (`made`'s error is
    /// the line for the log and the message to report), keeps the log, and removes the build
    /// directory. The error is the message to report.
    pub(super) async fn finish_in_daemon(
        self: &Arc<Self>,
        drv_path: &StorePath,
        node: &Node,
        options: &super::Options,
        made: Result<Vec<StorePath>, (String, String)>,
        mut log: crate::logs::LogWriter,
        top: std::path::PathBuf,
    ) -> Result<BTreeMap<String, StorePath>, super::Failure> {
        let result = match made {
            Err((line, message)) => {
                let _ = log.line(line.as_bytes());
                Err(message.into())
            }
            Ok(closure) => {
                let this = self.clone();
                let (drv_path, drv, outputs, top) =
                    (drv_path.clone(), node.drv.clone(), node.outputs.clone(), top.clone());
                let (mode, keep_failed) = (node.mode.clone(), options.keep_failed);
                tokio::task::spawn_blocking(move || {
                    this.register(&drv_path, &drv, &outputs, &closure, &top, &mode, keep_failed)
                })
                .await
                .map_err(|e| super::Failure::from(e.to_string()))
                .and_then(|r| r)
            }
        };
        if let Err(e) = log.finish() {
            tracing::warn!("cannot keep the log of {}: {e}", self.store.store_dir().display(drv_path));
        }
        tokio::task::spawn_blocking(move || {
            if let Err(e) = crate::root::remove(&top) {
                tracing::warn!("cannot remove build directory '{}': {e}", top.display());
            }
        });
        result
    }
}
