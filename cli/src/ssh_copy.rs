//! `cairn copy --to ssh-ng://HOST` and `--to ssh://HOST`: a closure copied into a Nix store over
//! SSH, as `nix copy --to` does — through `nix-daemon --stdio` there (the worker protocol), or
//! `nix-store --serve --write` (Nix's legacy SSH protocol). Any store that answers either works:
//! a Nix machine, or a cairnd (`?remote-program=cairnd`). `--from` the same URLs copies the
//! other way, as `nix copy --from` does: the closure's metadata asked there, and what the daemon
//! lacks sent into it as a push stream, which it takes as it takes any push, hashed before it
//! is registered — with signatures by a key it trusts, as Nix checks them even for a trusted
//! user, unless `--no-check-sigs` (which only a trusted user may use).
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

use crate::copied::{narinfo_of, Checks, Copied};

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
    checks: Checks,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Copied> {
    let target = target_of(url)?;
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
            .query_valid_paths(&wanted, checks.substitute_on_destination)
            .map_err(|e| anyhow!("asking '{url}' which paths it has: {e}"))?;
        // References first, in Nix's order (`topoSortPaths` of what is missing, reversed).
        let mut missing: BTreeMap<StorePath, cairn_worker::ValidPathInfo> =
            ordered.into_iter().filter(|e| !valid.contains(&e.path)).map(|e| (e.path.clone(), e)).collect();
        let order = cairn_nix::references_first(missing.keys(), |p| missing.get(p).map(|e| &e.info.references));
        let missing: Vec<_> = order.iter().filter_map(|p| missing.remove(p)).collect();
        let bytes: u64 = missing.iter().map(|e| e.info.nar_size).sum();
        bar.set_length(bytes);
        if !missing.is_empty() {
            conn.session
                .add_multiple_to_store(&missing, !checks.check_sigs, &mut |e, w| {
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

/// Where the SSH master connections' sockets go: a private directory of this user's, in
/// `$XDG_RUNTIME_DIR` if there is one, else in the temporary directory (made with mode 0700,
/// and refused if someone else made it or may enter it).
fn ssh_dir() -> anyhow::Result<std::path::PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("cairn-ssh-{}", nix::unistd::geteuid()));
    connect::private_dir(&dir).map_err(|e| anyhow!(e))?;
    Ok(dir)
}

/// The connection target `url` names: one ssh connection of its own, gone when the copy is.
fn target_of(url: &str) -> anyhow::Result<Target> {
    let machines = cairn_nix::machines::parse(url, "-", &mut |_| Ok(None))?;
    let [machine] = &machines[..] else { anyhow::bail!("'{url}': one store URL expected") };
    Ok(match Target::of(machine)? {
        Target::Ssh(t) => Target::Ssh(connect::SshTarget { shared: false, ..t }),
        other => other,
    })
}

/// Copies the closure of `paths` (as the store at `url` has it) into the daemon: only what it
/// lacks, references first.
pub(crate) async fn copy_from_ssh(
    client: &Client,
    store_dir: &StoreDir,
    url: &str,
    paths: &[String],
    check_sigs: bool,
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
        // A level of the closure at a time, each level's metadata asked in one go.
        let mut infos = BTreeMap::new();
        let mut level: Vec<StorePath> = wanted.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
        while !level.is_empty() {
            if infos.len() + level.len() > MAX_CLOSURE {
                anyhow::bail!("'{shown}' answers with a closure of more than {MAX_CLOSURE} paths");
            }
            let answers =
                conn.session.query_path_infos(&level).map_err(|e| anyhow!("asking '{shown}' about paths: {e}"))?;
            let mut next = BTreeSet::new();
            for (p, info) in level.into_iter().zip(answers) {
                let info = info.ok_or_else(|| anyhow!("path '{}' is not valid on '{shown}'", dir.display(&p)))?;
                next.extend(info.references.iter().cloned());
                infos.insert(p, info);
            }
            level = next.into_iter().filter(|r| !infos.contains_key(r)).collect();
        }
        let order = cairn_nix::references_first(infos.keys(), |p| infos.get(p).map(|i| &i.references));
        let ordered: Vec<_> = order.into_iter().filter_map(|p| infos.remove(&p).map(|i| (p, i))).collect();
        Ok((conn, ordered))
    })
    .await??;
    // Here: what the daemon lacks.
    let shown: Vec<String> = closure.iter().map(|(p, _)| store_dir.display(p)).collect();
    let valid = client.call(query::IsValid { paths: shown.clone() }).await?;
    anyhow::ensure!(valid.len() == shown.len(), "the daemon answered for {} of {} paths", valid.len(), shown.len());
    let missing: Vec<_> = closure.into_iter().zip(valid).filter(|(_, v)| !v).map(|(e, _)| e).collect();
    let skipped = shown.len() - missing.len();
    if missing.is_empty() {
        return Ok(Copied { written: 0, skipped, bytes: 0 });
    }
    let bytes = missing.iter().fold(0u64, |n, (_, i)| n.saturating_add(i.nar_size));
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
    // The NARs come from there on a blocking thread and go into the daemon as one push. Each
    // is read through a NAR parser, which knows where it ends whatever size was claimed; the
    // daemon checks it against the narinfo before anything is registered.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
    let (bar, url) = (progress.clone(), url.to_owned());
    let stopper = conn.stopper();
    let feed = tokio::task::spawn_blocking(move || -> anyhow::Result<Fed> {
        let send = |b: Vec<u8>| tx.blocking_send(Ok(b.into())).is_ok();
        if !send(push::start()) {
            return Ok(Fed::ReceiverGone);
        }
        for (path, size, narinfo) in entries {
            if !send(push::entry(&narinfo)) {
                return Ok(Fed::ReceiverGone);
            }
            let sent = conn
                .session
                .nar_from_path(&path, |r| -> std::io::Result<Option<u64>> {
                    let mut out = Forward { send: &send, count: 0, gone: false, bar: &bar };
                    cairn_nix::nar::copy_one(r, &mut out, cairn_nix::nar::Limits::default())
                        .map_err(std::io::Error::other)?;
                    Ok((!out.gone).then_some(out.count))
                })
                .map_err(|e| anyhow!("fetching '{path}' from '{url}': {e}"))?
                .map_err(|e| anyhow!("fetching '{path}' from '{url}': {e}"))?;
            match sent {
                None => return Ok(Fed::ReceiverGone),
                Some(n) if n != size => {
                    anyhow::bail!("'{url}' sent a NAR of {n} bytes for '{path}', whose size it said is {size}")
                }
                Some(_) => {}
            }
        }
        send(push::end());
        Ok(Fed::All)
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    let received =
        client.receive(cairn_client::body_from_reader(tokio_util::io::StreamReader::new(stream)), check_sigs).await;
    // The daemon's refusal is the reason; and a remote stalled mid-NAR must not keep the feed.
    if received.is_err() {
        stopper.stop();
    }
    let fed = feed.await?;
    let received = received?;
    fed?;
    Ok(Copied { written: received.len(), skipped, bytes })
}

/// Most paths a closure asked of a remote store may have: a remote that keeps naming new
/// references is not followed for ever.
const MAX_CLOSURE: usize = 1 << 20;

/// How the feed of a `--from` copy ended.
enum Fed {
    All,
    /// The daemon stopped reading: its answer says why.
    ReceiverGone,
}

/// Hands what passes to the push body, counting it; notes when the receiver is gone.
struct Forward<'a, F: Fn(Vec<u8>) -> bool> {
    send: &'a F,
    count: u64,
    gone: bool,
    bar: &'a indicatif::ProgressBar,
}

impl<F: Fn(Vec<u8>) -> bool> std::io::Write for Forward<'_, F> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.gone {
            self.gone = !(self.send)(buf.to_vec());
        }
        self.count += buf.len() as u64;
        self.bar.inc(buf.len() as u64);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
