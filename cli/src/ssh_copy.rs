//! `cairn copy --to ssh-ng://HOST` and `--to ssh://HOST`: a closure copied into a Nix store over
//! SSH, as `nix copy --to` does — through `nix-daemon --stdio` there (the worker protocol), or
//! `nix-store --serve --write` (Nix's legacy SSH protocol). Any store that answers either works:
//! a Nix machine, or a cairnd (`?remote-program=cairnd`). `--from` the same URLs copies the
//! other way, as `nix copy --from` does: the closure's metadata asked there, and what the daemon
//! lacks sent into it as a push stream, which it takes as it takes any push (signatures by a
//! trusted key, unless the user is trusted) and hashes before registering.
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

use crate::copied::{narinfo_of, Copied};

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
    let target = target_of(url)?;
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

/// The connection target `url` names.
fn target_of(url: &str) -> anyhow::Result<Target> {
    let machines = cairn_nix::machines::parse(url, "-", &mut |_| Ok(None))?;
    let [machine] = &machines[..] else { anyhow::bail!("'{url}': one store URL expected") };
    Ok(Target::of(machine)?)
}

/// Copies the closure of `paths` (as the store at `url` has it) into the daemon: only what it
/// lacks, references first.
pub(crate) async fn copy_from_ssh(
    client: &Client,
    store_dir: &StoreDir,
    url: &str,
    paths: &[String],
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Copied> {
    use cairn_nix::wire::push;
    let target = target_of(url)?;
    let wanted = paths.iter().map(|p| store_dir.parse(p)).collect::<Result<Vec<_>, _>>()?;
    let (dir, shown) = (store_dir.clone(), url.to_owned());
    // There: the closure and its metadata.
    let (mut conn, closure) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let ssh_dir = ssh_dir()?;
        let mut conn = connect::open(&target, &dir, &ssh_dir).map_err(|e| anyhow!("cannot reach '{shown}': {e}"))?;
        let mut infos = BTreeMap::new();
        let mut todo = wanted;
        while let Some(p) = todo.pop() {
            if infos.contains_key(&p) {
                continue;
            }
            let info = conn
                .session
                .query_path_info(&p)
                .map_err(|e| anyhow!("asking '{shown}' about '{}': {e}", dir.display(&p)))?
                .ok_or_else(|| anyhow!("path '{}' is not valid on '{shown}'", dir.display(&p)))?;
            todo.extend(info.references.iter().filter(|r| !infos.contains_key(*r)).cloned());
            infos.insert(p, info);
        }
        let order = cairn_nix::references_first(infos.keys(), |p| infos.get(p).map(|i| &i.references));
        let ordered: Vec<_> = order.into_iter().filter_map(|p| infos.remove(&p).map(|i| (p, i))).collect();
        Ok((conn, ordered))
    })
    .await??;
    // Here: what the daemon lacks.
    let shown: Vec<String> = closure.iter().map(|(p, _)| store_dir.display(p)).collect();
    let valid = client.call(query::IsValid { paths: shown.clone() }).await?;
    let missing: Vec<_> = closure.into_iter().zip(valid).filter(|(_, v)| !v).map(|(e, _)| e).collect();
    let skipped = shown.len() - missing.len();
    if missing.is_empty() {
        return Ok(Copied { written: 0, skipped, bytes: 0 });
    }
    let bytes: u64 = missing.iter().map(|(_, i)| i.nar_size).sum();
    progress.set_length(bytes);
    let mut entries = Vec::with_capacity(missing.len());
    for (path, info) in &missing {
        let narinfo = cairn_nix::narinfo::NarInfo {
            store_path: path.clone(),
            url: String::new(),
            compression: "none".into(),
            file_hash: None,
            file_size: None,
            nar_hash: info.nar_hash.clone(),
            nar_size: info.nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            system: None,
            signatures: info.sigs.iter().cloned().collect(),
            ca: info.ca.as_ref().map(ToString::to_string),
            extra: Vec::new(),
        };
        entries.push((path.clone(), info.nar_size, push::narinfo(narinfo).render(store_dir)));
    }
    // The NARs come from there on a blocking thread and go into the daemon as one push.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
    let (bar, url) = (progress.clone(), url.to_owned());
    let feed = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let send = |b: Vec<u8>| tx.blocking_send(Ok(b.into())).is_ok();
        if !send(push::start()) {
            return Ok(());
        }
        for (path, size, narinfo) in entries {
            if !send(push::entry(&narinfo)) {
                return Ok(());
            }
            let copied = conn
                .session
                .nar_from_path(&path, |r| -> std::io::Result<u64> {
                    let mut nar = std::io::Read::take(r, size);
                    let mut done = 0;
                    loop {
                        let mut buf = vec![0u8; 256 * 1024];
                        let n = std::io::Read::read(&mut nar, &mut buf)?;
                        if n == 0 {
                            return Ok(done);
                        }
                        buf.truncate(n);
                        done += n as u64;
                        bar.inc(n as u64);
                        if !send(buf) {
                            return Ok(done);
                        }
                    }
                })
                .map_err(|e| anyhow!("fetching '{path}' from '{url}': {e}"))??;
            if copied != size {
                anyhow::bail!("'{url}' sent {copied} of the {size} bytes of the NAR of '{path}'");
            }
        }
        send(push::end());
        Ok(())
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    let received = client.receive(cairn_client::body_from_reader(tokio_util::io::StreamReader::new(stream))).await;
    feed.await??;
    Ok(Copied { written: received?.len(), skipped, bytes })
}
