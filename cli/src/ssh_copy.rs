//! `cairn copy --to ssh-ng://HOST` and `--to ssh://HOST`: a closure copied into a Nix store over
//! SSH, as `nix copy --to` does — through `nix-daemon --stdio` there (the worker protocol), or
//! `nix-store --serve --write` (Nix's legacy SSH protocol). Any store that answers either works:
//! a Nix machine, or a cairnd (`?remote-program=cairnd`).
//!
//! The connection is the remote builders' (`cairn_build::remote::connect`): the system's `ssh`
//! in batch mode, `ssh-key`, `base64-ssh-public-host-key`, `remote-program`, `remote-store` and
//! `NIX_SSHOPTS` as Nix takes them, and `localhost` reached without SSH. The receiver is asked
//! which paths it has; only the others are sent, references first, their NARs streamed from the
//! daemon. The receiver decides what it accepts: unsigned paths need `--secret-key-file` with a
//! key it trusts, or `--no-check-sigs` and a user it trusts (over `ssh-ng://`; `nix-store
//! --serve` never checks them, as in Nix).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, Context};
use cairn_api::query;
use cairn_build::remote::connect::{self, Target};
use cairn_client::Client;
use cairn_nix::signing::SecretKey;
use cairn_nix::{StoreDir, StorePath};
use tokio_util::io::SyncIoBridge;

use crate::cache::{narinfo_of, Copied};

/// Whether `url` names a store reached over SSH.
pub(crate) fn is_ssh(url: &str) -> bool {
    url.starts_with("ssh://") || url.starts_with("ssh-ng://")
}

/// Copies the closure of `paths` into the store at `url`.
pub(crate) async fn copy_to_ssh(
    client: &Client,
    store_dir: &StoreDir,
    url: &str,
    paths: Vec<String>,
    key: Option<&SecretKey>,
    check_sigs: bool,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Copied> {
    let machines = cairn_nix::machines::parse(url, "-", &mut |_| Ok(None))?;
    let [machine] = &machines[..] else { anyhow::bail!("'{url}': one store URL expected") };
    let target = Target::of(machine)?;
    // Dependencies first: a receiver checks each path's references as it arrives.
    let closure = client.call(query::Closure { paths }).await?;
    let infos = client.call(query::PathInfo { paths: closure.clone(), closure: false }).await?;
    let by_path: BTreeMap<String, cairn_api::PathInfo> = infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut ordered = Vec::with_capacity(closure.len());
    for p in &closure {
        let info = by_path.get(p).with_context(|| format!("no metadata for '{p}'"))?;
        let narinfo = narinfo_of(store_dir, info, key)?;
        let ca = narinfo.ca.as_deref().map(str::parse).transpose().map_err(|e| anyhow!("'{p}': {e}"))?;
        ordered.push(cairn_worker::ValidPathInfo {
            path: narinfo.store_path,
            info: cairn_worker::PathInfo {
                deriver: narinfo.deriver,
                nar_hash: narinfo.nar_hash,
                references: narinfo.references,
                registration_time: info.registration_time.max(0) as u64,
                nar_size: narinfo.nar_size,
                ultimate: false,
                sigs: narinfo.signatures.into_iter().collect(),
                ca,
            },
        });
    }
    let ssh_dir = ssh_dir()?;
    let (client, dir, bar, url) = (client.clone(), store_dir.clone(), progress.clone(), url.to_owned());
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Copied> {
        let mut conn = connect::open(&target, &dir, &ssh_dir).map_err(|e| anyhow!("cannot reach '{url}': {e}"))?;
        let wanted: BTreeSet<StorePath> = ordered.iter().map(|e| e.path.clone()).collect();
        let valid = conn
            .session
            .query_valid_paths(&wanted, false)
            .map_err(|e| anyhow!("asking '{url}' which paths it has: {e}"))?;
        let missing: Vec<_> = ordered.into_iter().filter(|e| !valid.contains(&e.path)).collect();
        let bytes: u64 = missing.iter().map(|e| e.info.nar_size).sum();
        bar.set_length(bytes);
        if !missing.is_empty() {
            conn.session
                .add_multiple_to_store(&missing, !check_sigs, &mut |e, w| {
                    let nar = handle.block_on(client.nar(&dir.display(&e.path))).map_err(std::io::Error::other)?;
                    let mut nar = SyncIoBridge::new_with_handle(nar, handle.clone());
                    let n = std::io::copy(&mut nar, &mut bar.wrap_write(w))?;
                    if n != e.info.nar_size {
                        return Err(std::io::Error::other(format!(
                            "the NAR of '{}' has {n} bytes, not {}",
                            dir.display(&e.path),
                            e.info.nar_size
                        )));
                    }
                    Ok(())
                })
                .map_err(|e| anyhow!("copying {} to '{url}': {e}", crate::ctx::count(missing.len(), "path")))?;
        }
        Ok(Copied { written: missing.len(), skipped: wanted.len() - missing.len(), bytes })
    })
    .await?
}

/// Where the SSH master connections' sockets go: a directory of this user's.
fn ssh_dir() -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("cairn-ssh-{}", nix::unistd::geteuid()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create '{}'", dir.display()))?;
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || std::os::unix::fs::MetadataExt::uid(&meta) != nix::unistd::geteuid().as_raw() {
        anyhow::bail!("'{}' is not a directory of this user's", dir.display());
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}
