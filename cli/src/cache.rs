//! `cairn copy --to URL`: paths' closures written as a Nix binary cache (`file://`, `s3://`), or
//! copied into another daemon (`unix://SOCKET`, `tcp://HOST:PORT`, or a peer: `p2p://NODE-ID`;
//! a Nix store over SSH is [`crate::ssh_copy`]'s).
//!
//! The cache layout is Nix's (`nix-cache-info`, `<hash>.narinfo`, `nar/<file hash>.nar.zst`), so
//! that `nix copy --from` and any Nix substituter read it. NARs come from the daemon and are
//! compressed (zstd unless `?compression=` says otherwise) and hashed in one pass into a
//! temporary file; a path whose contents no longer match its recorded NAR hash is not published.
//! Each NAR is uploaded before its narinfo, both atomically, so a reader never finds a narinfo
//! whose NAR is missing or half written. Paths whose narinfo is already there are skipped.

use std::path::Path;

use crate::copied::{narinfo_of, Checks, Copied};
use crate::ctx::{count, follow_events, print_json, Ctx};
use crate::progress;
use anyhow::{bail, Context};
use cairn_api::{query, PathInfo};
use cairn_cache::backend::split_params;
use cairn_cache::upload::compress_nar;
use cairn_cache::{Backend, Compression, NetOptions};
use cairn_client::{body_from_reader, Client};
use cairn_nix::hash::{Encoding, Hash};
use cairn_nix::narinfo::CacheInfo;
use cairn_nix::signing::SecretKey;
use cairn_nix::StoreDir;
use clap::Args;
use std::path::PathBuf;
use tokio_util::io::SyncIoBridge;

/// Writes `infos` (a closure) into the cache at `url`, signing with `key` if given.
pub async fn copy_to_cache(
    client: &Client,
    store_dir: &StoreDir,
    infos: &[PathInfo],
    url: &str,
    key: Option<&SecretKey>,
    net: &NetOptions,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Copied> {
    let backend = Backend::open(url, net)?;
    if matches!(backend, Backend::Http { .. }) {
        bail!("'{url}': cairn writes binary caches to file:// and s3:// URLs (or copies to a daemon: unix://SOCKET)");
    }
    let (_, params) = split_params(url);
    let opts = WriteParams::of(url, &params)?;
    let compression = opts.compression;
    let url_key = opts.secret_key;
    match backend.get("nix-cache-info").await? {
        None => {
            let info = CacheInfo { store_dir: store_dir.as_str().to_owned(), want_mass_query: true, priority: 50 };
            backend.put("nix-cache-info", info.render().into()).await?;
        }
        // As Nix: never a cache of another store directory.
        Some(text) => match CacheInfo::parse(store_dir, &String::from_utf8_lossy(&text)) {
            Ok(_) => {}
            Err(cairn_nix::narinfo::NarInfoError::StoreDirMismatch { theirs, ours }) => {
                bail!("binary cache '{url}' is for Nix stores with prefix '{theirs}', not '{ours}'")
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("'{url}': its nix-cache-info"))),
        },
    }
    let tmp_dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut done = Copied { written: 0, skipped: 0, bytes: 0 };
    // The total is the closure's NAR bytes, less those of paths the cache turns out to have.
    let mut total: u64 = infos.iter().map(|i| i.nar_size).sum();
    progress.set_length(total);
    for info in infos {
        let path = store_dir.parse(&info.path)?;
        let narinfo_key = format!("{}.narinfo", path.hash_part());
        if backend.exists(&narinfo_key).await? {
            done.skipped += 1;
            total -= info.nar_size;
            progress.set_length(total);
            continue;
        }
        let nar_hash = Hash::parse_prefixed(&info.nar_hash)?;
        let tmp = tmp_dir.path().join(path.hash_part());
        let reader = SyncIoBridge::new(client.nar(&info.path).await?);
        let bar = progress.clone();
        let out = tmp.clone();
        let written = tokio::task::spawn_blocking(move || {
            compress_nar(crate::progress::CountingRead { inner: reader, bar }, compression, opts.level, &out)
        })
        .await?
        .with_context(|| format!("reading the NAR of {}", info.path))?;
        if written.nar_hash != nar_hash || written.nar_size != info.nar_size {
            bail!("{}: contents hash to {}, recorded {nar_hash}; not published", info.path, written.nar_hash);
        }
        let url = format!("nar/{}.nar{}", written.file_hash.encode(Encoding::Nix32), compression.extension());
        backend.put_file(&url, &tmp).await?;
        let _ = std::fs::remove_file(&tmp);
        let mut narinfo = narinfo_of(store_dir, info, key)?;
        if let Some(k) = &url_key {
            narinfo.sign(store_dir, k)?;
        }
        narinfo.url = url;
        narinfo.compression = compression.name().into();
        narinfo.file_hash = Some(written.file_hash);
        narinfo.file_size = Some(written.file_size);
        backend.put(&narinfo_key, narinfo.render(store_dir).into()).await?;
        done.written += 1;
        done.bytes += written.file_size;
    }
    Ok(done)
}

/// What a binary cache URL's parameters ask of a copy to it, as Nix's binary cache stores
/// read them: `compression` (and `compression-level`), `secret-key` (a key file: every narinfo
/// written is signed with it too). Parameters for reading (`priority`, `trusted` …), for S3,
/// and `parallel-compression` (the files are the same) change nothing here; those of Nix's that
/// cairn does not do are warned about, as is any unknown one (Nix's "unknown setting").
struct WriteParams {
    compression: Compression,
    level: Option<i32>,
    secret_key: Option<SecretKey>,
}

impl WriteParams {
    fn of(url: &str, params: &[(String, String)]) -> anyhow::Result<WriteParams> {
        let mut out = WriteParams { compression: Compression::Zstd, level: None, secret_key: None };
        for (k, v) in params {
            match k.as_str() {
                "compression" => out.compression = v.parse::<Compression>()?,
                "compression-level" => {
                    out.level = Some(v.parse().with_context(|| format!("'{url}': compression-level '{v}'"))?)
                }
                "secret-key" => {
                    let text = std::fs::read_to_string(v).with_context(|| format!("cannot read '{v}' (secret-key)"))?;
                    out.secret_key = Some(SecretKey::parse(&text).with_context(|| format!("'{v}'"))?);
                }
                "parallel-compression"
                | "priority"
                | "want-mass-query"
                | "trusted"
                | "store"
                | "region"
                | "endpoint"
                | "scheme"
                | "profile"
                | "multipart-upload"
                | "buffer-size" => {}
                "write-nar-listing"
                | "index-debug-info"
                | "narinfo-compression"
                | "ls-compression"
                | "log-compression" => {
                    if !matches!(v.as_str(), "" | "0" | "false") {
                        eprintln!("cairn: warning: '{url}': '{k}' is not something cairn writes; ignored");
                    }
                }
                other => eprintln!("cairn: warning: unknown setting '{other}' in '{url}'"),
            }
        }
        Ok(out)
    }
}

/// Pushes the closure of `paths` into the cairnd at `url` (`tcp://HOST:PORT`, which must accept
/// pushes), sending only what it lacks, each path signed with `key` if given (the receiver
/// accepts only paths one of its trusted keys signed).
pub async fn copy_to_tcp(
    client: &Client,
    store_dir: &StoreDir,
    paths: Vec<String>,
    url: &str,
    key: Option<&SecretKey>,
    net: &NetOptions,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Copied> {
    use cairn_cache::push::Pusher;
    let pusher = Pusher::new(url, net)?;
    let closure = client.call(query::Closure { paths }).await?;
    let missing = pusher.missing(&closure).await?;
    let skipped = closure.len() - missing.len();
    if missing.is_empty() {
        return Ok(Copied { written: 0, skipped, bytes: 0 });
    }
    let (stream, bytes, feed) = push_stream(client, store_dir, missing, key, progress).await?;
    let answer = pusher.push(stream).await;
    feed.await??;
    let answer: serde_json::Value = serde_json::from_str(&answer?).context("the receiver's answer")?;
    let added = answer["added"].as_array().map(|a| a.len()).unwrap_or(0);
    Ok(Copied { written: added, skipped, bytes })
}

/// A push stream (framed by `cairn_nix::wire::push`) of `paths` (references first), NARs read from the
/// daemon as the stream is sent; also the NAR bytes it carries, and the task feeding it (whose
/// error, if any, says why the stream ended early).
async fn push_stream(
    client: &Client,
    store_dir: &StoreDir,
    paths: Vec<String>,
    key: Option<&SecretKey>,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<(
    impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
    u64,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    use cairn_nix::wire::push;
    let infos = client.call(query::PathInfo { paths, closure: false }).await?;
    let mut entries = Vec::with_capacity(infos.len());
    for info in &infos {
        let narinfo = push::narinfo(narinfo_of(store_dir, info, key)?);
        entries.push((info.path.clone(), narinfo.render(store_dir)));
    }
    let bytes: u64 = infos.iter().map(|i| i.nar_size).sum();
    progress.set_length(bytes);
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
    let sender = client.clone();
    let bar = progress.clone();
    let feed = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let send = |b: bytes::Bytes| tx.send(Ok(b));
        if send(push::start().into()).await.is_err() {
            return Ok(());
        }
        for (path, narinfo) in entries {
            if send(push::entry(&narinfo).into()).await.is_err() {
                return Ok(());
            }
            let mut nar = sender.nar(&path).await?;
            loop {
                let mut buf = vec![0u8; 256 * 1024];
                let n = nar.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                bar.inc(n as u64);
                if send(buf.into()).await.is_err() {
                    return Ok(());
                }
            }
        }
        let _ = send(push::end().into()).await;
        anyhow::Ok(())
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    Ok((stream, bytes, feed))
}

/// Copies the closure of `paths` from the daemon behind `from` into the daemon at `socket`,
/// sending only the paths it lacks, with all their metadata.
pub async fn copy_to_daemon(
    from: &Client,
    socket: &Path,
    paths: Vec<String>,
    store_dir: &StoreDir,
    key: Option<&SecretKey>,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Copied> {
    let to = Client::new(socket);
    let theirs = to.version().await.with_context(|| format!("cannot reach the daemon at '{}'", socket.display()))?;
    if theirs.store_dir != store_dir.as_str() {
        bail!(
            "the daemon at '{}' has store directory {}, ours is {}: paths cannot move between them",
            socket.display(),
            theirs.store_dir,
            store_dir.as_str()
        );
    }
    let closure = from.call(query::Closure { paths }).await?;
    let valid = to.call(query::IsValid { paths: closure.clone() }).await?;
    let missing: Vec<String> = closure.iter().zip(&valid).filter(|(_, v)| !**v).map(|(p, _)| p.clone()).collect();
    let skipped = closure.len() - missing.len();
    if missing.is_empty() {
        return Ok(Copied { written: 0, skipped, bytes: 0 });
    }
    // Narinfos and NARs rather than an export stream, so that content addresses, signatures
    // and derivers arrive too.
    let (stream, bytes, feed) = push_stream(from, store_dir, missing, key, progress).await?;
    let answer = to.receive(body_from_reader(tokio_util::io::StreamReader::new(stream)), false).await;
    feed.await??;
    Ok(Copied { written: answer?.len(), skipped, bytes })
}

/// Asks the daemon's peer `node` to take the closure of `paths` from the daemon (it substitutes
/// them under its own trust policy: unsigned paths need `key`, one of its trusted keys).
async fn copy_to_peer(
    client: &Client,
    store_dir: &StoreDir,
    paths: Vec<String>,
    node: &str,
    key: Option<&SecretKey>,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Copied> {
    let infos = client.call(query::PathInfo { paths, closure: true }).await?;
    let mut narinfos = Vec::with_capacity(infos.len());
    for info in &infos {
        let mut narinfo = narinfo_of(store_dir, info, key)?;
        // The NAR travels as a p2p transfer; the URL only names it.
        narinfo.url = format!("nar/{}.nar", narinfo.nar_hash.encode(Encoding::Nix32));
        narinfos.push(narinfo.render(store_dir));
    }
    // The peer reports nothing until it is done; what this node has served it meanwhile is the
    // progress.
    let id = node.to_owned();
    let served = move |status: cairn_api::PeersStatus| {
        status.peers.into_iter().find(|p| p.node_id == id).map_or(0, |p| p.served_bytes)
    };
    let before = client.peers().await.map(served.clone()).unwrap_or(0);
    let watch = {
        let (client, bar) = (client.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                if let Ok(status) = client.peers().await {
                    bar.set_position(served(status).saturating_sub(before));
                }
            }
        })
    };
    let pushed = client.peers_push(&cairn_api::PeerPushRequest { to: node.to_owned(), narinfos }).await;
    watch.abort();
    let mut answer = pushed?;
    // The first path refused on its own, not one that only needs another.
    answer.failed.sort_by_key(|f| f.reason.starts_with("needs '"));
    if let Some(first) = answer.failed.first() {
        let more = match answer.failed.len() - 1 {
            0 => String::new(),
            n => format!(" ({} could not be copied either)", count(n, "more path")),
        };
        bail!("p2p://{node} did not take '{}': {}{more}", first.path, first.reason);
    }
    // Counted from what was pushed: the peer's list is only its word.
    let added: std::collections::HashSet<&str> = answer.added.iter().map(String::as_str).collect();
    let taken: Vec<&PathInfo> = infos.iter().filter(|i| added.contains(i.path.as_str())).collect();
    let bytes = taken.iter().map(|i| i.nar_size).sum();
    Ok(Copied { written: taken.len(), skipped: infos.len() - taken.len(), bytes })
}

#[derive(Args)]
pub struct SubstituteArgs {
    /// Use this cache instead of the configured ones (repeatable; file://, http(s)://, s3://).
    #[arg(long, value_name = "URL")]
    pub from: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Store paths to fetch, with their closures.
    #[arg(required = true)]
    pub paths: Vec<String>,
}

impl SubstituteArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let SubstituteArgs { from, json, paths } = self;
        substitute(ctx, from, &paths, json).await?;
        Ok(())
    }
}

#[derive(Args)]
pub struct CopyArgs {
    /// Write to this cache (`file:///dir`, `s3://bucket?endpoint=…`; `?compression=zstd|xz|
    /// bzip2|none`, zstd by default), daemon (`unix:///path/to/socket`, `tcp://HOST:PORT`
    /// of one with accept-pushes, or `p2p://NODE-ID`, one of the daemon's peers; these two take
    /// only paths signed by a key they trust) or Nix store over SSH (`ssh-ng://[USER@]HOST`,
    /// `ssh://[USER@]HOST`, as `nix copy --to` reaches one).
    #[arg(long, required_unless_present = "from", conflicts_with = "from")]
    pub to: Option<String>,
    /// With `--to ssh-ng://`: ask the receiving daemon not to check signatures, which it
    /// honours for a user it trusts; with `--from ssh-ng://|ssh://`: do not require them here,
    /// for a user the daemon trusts (`nix copy --no-check-sigs`).
    #[arg(long)]
    pub no_check_sigs: bool,
    /// With `--to ssh-ng://|ssh://`: have the store there substitute what it can from its own
    /// substituters first, and send only the rest (`nix copy -s`).
    #[arg(long, short = 's')]
    pub substitute_on_destination: bool,
    /// Substitute from this cache: `file:///dir`, `http(s)://host/…`, `s3://bucket?…`, or
    /// `p2p://NODE-ID`, one of the daemon's peers; or copy from a Nix store over SSH
    /// (`ssh-ng://[USER@]HOST`, `ssh://[USER@]HOST`), as `nix copy --from` does.
    #[arg(long)]
    pub from: Option<String>,
    /// Sign each path with this secret key (see `cairn key generate`).
    #[arg(long, value_name = "FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Store paths whose closures to copy.
    #[arg(required = true)]
    pub paths: Vec<String>,
}

impl CopyArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            CopyArgs {
                to: None,
                from: Some(from),
                json,
                paths,
                no_check_sigs,
                secret_key_file,
                substitute_on_destination,
            } if crate::ssh_copy::is_ssh(&from) => {
                if secret_key_file.is_some() {
                    bail!("--secret-key-file signs what is sent (--to); paths copied --from keep their own signatures");
                }
                if substitute_on_destination {
                    bail!("--substitute-on-destination asks the store copied to (--to); this daemon substitutes as configured");
                }
                let client = ctx.client().await?;
                let store_dir = cairn_nix::StoreDir::new(&ctx.settings.store_dir)?;
                let paths = ctx.store_paths(&paths)?;
                let bar = progress::transfer("copying");
                let done =
                    crate::ssh_copy::copy_from_ssh(&client, &store_dir, &from, &paths, !no_check_sigs, &bar).await;
                bar.finish_and_clear();
                report_copy(&done?, &from, "from", json)?;
            }
            CopyArgs { to: None, from: Some(from), json, paths, .. } => {
                substitute(ctx, vec![from], &paths, json).await?;
            }
            CopyArgs { to, secret_key_file, json, paths, no_check_sigs, substitute_on_destination, .. } => {
                let to = to.context("copy needs --to or --from")?;
                let client = ctx.client().await?;
                let store_dir = cairn_nix::StoreDir::new(&ctx.settings.store_dir)?;
                let paths = ctx.store_paths(&paths)?;
                let key = match &secret_key_file {
                    Some(f) => {
                        let text =
                            std::fs::read_to_string(f).with_context(|| format!("cannot read '{}'", f.display()))?;
                        Some(SecretKey::parse(&text).with_context(|| format!("'{}'", f.display()))?)
                    }
                    None => None,
                };
                let checks = Checks { check_sigs: !no_check_sigs, substitute_on_destination };
                let done = copy_closure(&client, &store_dir, &to, paths, key.as_ref(), &ctx.net(), checks).await?;
                report_copy(&done, &to, "to", json)?;
            }
        }
        Ok(())
    }
}

/// What a copy did, as JSON or one line.
fn report_copy(done: &Copied, url: &str, direction: &str, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(&serde_json::json!({ "copied": done.written, "skipped": done.skipped, "bytes": done.bytes }))
    } else {
        eprintln!(
            "copied {} ({:.2} MiB) {direction} {url}, {} already there",
            count(done.written, "path"),
            done.bytes as f64 / (1024.0 * 1024.0),
            done.skipped
        );
        Ok(())
    }
}

/// Runs a substitution in the daemon, drawing its progress, and prints the asked-for paths.
pub(crate) async fn substitute(ctx: &Ctx, from: Vec<String>, paths: &[String], json: bool) -> anyhow::Result<()> {
    use cairn_api::{SubstituteEvent, SubstituteRequest};
    let client = ctx.client().await?;
    let req = SubstituteRequest { from, paths: ctx.store_paths(paths)? };
    let events = client.substitute(&req).await?;
    let bar = progress::transfer("substituting");
    let mut end = None;
    follow_events(events, |event: SubstituteEvent| {
        match event {
            SubstituteEvent::Progress { paths_expected, paths_done, bytes_expected, bytes_done } => {
                bar.set_length(bytes_expected);
                bar.set_position(bytes_done);
                bar.set_message(format!("substituting {paths_done}/{paths_expected} paths"));
            }
            SubstituteEvent::Error(e) => {
                bar.finish_and_clear();
                bail!("{}", e.message)
            }
            done @ SubstituteEvent::Done { .. } => end = Some(done),
        }
        Ok(())
    })
    .await?;
    bar.finish_and_clear();
    let Some(SubstituteEvent::Done { paths, added, failed }) = end else {
        bail!("cairnd ended the substitution without saying how it went (see its log)")
    };
    if json {
        print_json(&serde_json::json!({ "paths": paths, "added": added, "failed": failed }))?;
    } else {
        for p in &paths {
            println!("{}", p.path);
        }
        if !added.is_empty() {
            eprintln!("substituted {}", count(added.len(), "path"));
        }
    }
    // One line: the first path that failed on its own (the others need it, or failed alike).
    let mut failed = failed;
    failed.sort_by_key(|f| f.reason.starts_with("needs '"));
    if let Some(first) = failed.first() {
        let more = match failed.len() - 1 {
            0 => String::new(),
            n => format!(" ({} could not be substituted; --json lists them)", count(n, "more path")),
        };
        bail!("cannot substitute '{}': {}{more}", first.path, first.reason);
    }
    Ok(())
}

/// Copies the closure of `paths` to `to`: another daemon (`unix://`, `tcp://`, `p2p://`, only
/// what it lacks), a Nix store over SSH (`ssh-ng://`, `ssh://`, likewise) or a binary cache
/// (`file://`, `s3://`).
pub(crate) async fn copy_closure(
    client: &Client,
    store_dir: &cairn_nix::StoreDir,
    to: &str,
    paths: Vec<String>,
    key: Option<&SecretKey>,
    net: &NetOptions,
    checks: Checks,
) -> anyhow::Result<Copied> {
    let done = if crate::ssh_copy::is_ssh(to) {
        let bar = progress::transfer("copying");
        let done = crate::ssh_copy::copy_to_ssh(client, store_dir, to, paths, key, checks, &bar).await;
        bar.finish_and_clear();
        done?
    } else if let Some(node) = to.strip_prefix("p2p://") {
        let node = node.trim_end_matches('/');
        let bar = progress::bytes(&format!("p2p://{node} is taking the closure: sent"));
        let done = copy_to_peer(client, store_dir, paths, node, key, &bar).await;
        bar.finish_and_clear();
        done?
    } else if to.starts_with("tcp://") {
        let bar = progress::transfer("pushing");
        let done = crate::cache::copy_to_tcp(client, store_dir, paths, to, key, net, &bar).await;
        bar.finish_and_clear();
        done?
    } else if let Some(socket) = to.strip_prefix("unix://") {
        let bar = progress::transfer("copying");
        let done = crate::cache::copy_to_daemon(client, Path::new(socket), paths, store_dir, key, &bar).await;
        bar.finish_and_clear();
        done?
    } else {
        let infos = client.call(query::PathInfo { paths, closure: true }).await?;
        let bar = progress::transfer("copying");
        let done = crate::cache::copy_to_cache(client, store_dir, &infos, to, key, net, &bar).await;
        bar.finish_and_clear();
        done?
    };
    Ok(done)
}

#[derive(clap::Args)]
pub struct PeersArgs {
    /// Print the node and its peers as JSON.
    #[arg(long)]
    pub json: bool,
}

impl PeersArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let status = ctx.client().await?.peers().await?;
        if self.json {
            return print_json(&status);
        }
        let listening = if status.listening.is_empty() {
            "not listening (no p2p-listen)".to_owned()
        } else {
            format!("listening on {}", status.listening.join(", "))
        };
        println!(
            "this node {}  {listening}  offered {}  served {} bytes ({} transfers)  fetched upstream {}",
            status.node_id, status.offered, status.served_bytes, status.served_objects, status.upstream_objects
        );
        if status.peers.is_empty() {
            eprintln!("no peers (set `peers` in the daemon's configuration)");
        }
        for p in status.peers {
            println!(
                "{}@{}  {}  fetched {} ({} bytes)  served {} bytes",
                p.node_id,
                p.addresses.join(","),
                p.state,
                p.fetched_objects,
                p.fetched_bytes,
                p.served_bytes
            );
            if let Some(e) = p.last_error {
                println!("  last error: {e}");
            }
        }
        Ok(())
    }
}
