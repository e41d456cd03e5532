//! `post-build-hook`, as Nix 2.8 runs it (`runPostBuildHook`): after a derivation was built
//! here and its outputs registered, the program runs as the daemon, with the daemon's
//! environment, `NIX_REMOTE` naming this daemon (so that Nix commands in the hook see this
//! store, as under nix-daemon they see its), `DRV_PATH` (the derivation) and `OUT_PATHS` (its
//! outputs, space-separated, sorted — Nix 2.8.0 passes it empty, a bug later releases fixed);
//! what it prints, stdout and stderr together, is shown to the client line by line as
//! `post-build-hook: LINE`, as Nix's clients show it. A hook that fails fails the build (its
//! outputs stay valid), in Nix's words. It is what sites use to upload what they build to a
//! cache.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;

use cairn_nix::StorePath;
use cairn_store::LocalStore;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use super::Event;

/// Runs `hook` for the derivation `drv`, built with `outputs`.
pub(super) async fn run(
    hook: &Path,
    env: &[(String, String)],
    store: &LocalStore,
    drv: &StorePath,
    outputs: &BTreeMap<String, StorePath>,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), String> {
    let dir = store.store_dir();
    let mut out_paths: Vec<String> = outputs.values().map(|p| dir.display(p)).collect();
    out_paths.sort();
    let shown = hook.display();
    let failed = |why: String| format!("program '{shown}' {why}");
    let _ = events
        .send(Event::Log { drv: drv.clone(), line: format!("running post-build-hook '{shown}'...").into_bytes() });
    // One pipe for both, so that lines come in the order the hook wrote them.
    let (reader, writer) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| failed(format!("cannot start: {e}")))?;
    let writer2 = writer.try_clone().map_err(|e| failed(format!("cannot start: {e}")))?;
    let mut child = tokio::process::Command::new(hook)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("DRV_PATH", dir.display(drv))
        .env("OUT_PATHS", out_paths.join(" "))
        .stdin(Stdio::null())
        .stdout(writer2)
        .stderr(writer)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("cannot start: {e}")))?;
    let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(reader)
        .map_err(|e| failed(format!("cannot read its output: {e}")))?;
    let mut lines = BufReader::new(reader).split(b'\n');
    while let Ok(Some(line)) = lines.next_segment().await {
        let mut shown_line = b"post-build-hook: ".to_vec();
        shown_line.extend_from_slice(&line);
        let _ = events.send(Event::Log { drv: drv.clone(), line: shown_line });
    }
    let status = child.wait().await.map_err(|e| failed(format!("cannot be waited for: {e}")))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(failed(format!("failed with exit code {code}"))),
        None => Err(failed(format!(
            "was killed by signal {}",
            std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
        ))),
    }
}
