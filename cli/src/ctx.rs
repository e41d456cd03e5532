//! What every verb shares: the context (settings, the way to the daemon, store-path arguments),
//! JSON printing, path-info answers, counted nouns, streaming to stdout and the daemon's event
//! streams.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use cairn_api::config::Settings;
use cairn_api::{query, Op};
use cairn_client::Client;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::connect::connect;
use crate::progress;

pub(crate) struct Ctx {
    pub(crate) settings: Settings,
    pub(crate) cli_store: cairn_daemon::args::StoreArgs,
}

impl Ctx {
    pub(crate) async fn client(&self) -> anyhow::Result<Client> {
        connect(&self.settings, &self.cli_store).await
    }

    /// Makes `link` a symlink to the path's contents and registers it as an indirect root, in
    /// that order (as Nix's `addPermRoot`): a registered root whose link does not exist yet
    /// would be dropped as stale by a concurrent collection. Between the two steps the path is
    /// rooted by this process (the daemon keeps a client's added paths rooted while it lives).
    pub(crate) async fn add_root(&self, client: &Client, link: &Path, path: &str) -> anyhow::Result<()> {
        let link = std::path::absolute(link).with_context(|| format!("bad link '{}'", link.display()))?;
        // As Nix's addPermRoot: only a link into the store is replaced (kept if this fails).
        let previous = match std::fs::symlink_metadata(&link) {
            Err(_) => None,
            Ok(m) if !m.file_type().is_symlink() => {
                bail!("'{}' exists and is not a symlink; not replacing it", link.display())
            }
            Ok(_) => {
                let old = std::fs::read_link(&link).with_context(|| format!("cannot read '{}'", link.display()))?;
                let into = |dir: &Path| old.strip_prefix(dir).is_ok_and(|r| r.components().count() > 0);
                if !into(Path::new(&self.settings.store_dir)) && !into(&self.real_store_dir()) {
                    bail!(
                        "'{}' exists and points outside the store (to '{}'); not replacing it",
                        link.display(),
                        old.display()
                    );
                }
                Some(old)
            }
        };
        let target = self.settings.root.join(path.trim_start_matches('/'));
        let tmp = link.with_file_name(format!(
            ".{}.cairn-{}",
            link.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp)
            .and_then(|_| std::fs::rename(&tmp, &link))
            .with_context(|| format!("cannot create the symlink '{}'", link.display()))?;
        let req = query::AddRoot { link: link.display().to_string(), path: path.to_owned() };
        if let Err(e) = client.call(req).await {
            let _ = std::fs::remove_file(&link);
            if let Some(old) = previous {
                let _ = std::os::unix::fs::symlink(&old, &link);
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// The network timeouts of the settings (`connect-timeout`, `stalled-download-timeout`), for
    /// what the CLI itself sends to caches and daemons.
    pub(crate) fn net(&self) -> cairn_cache::NetOptions {
        cairn_cache::NetOptions::from_secs(self.settings.connect_timeout, self.settings.stalled_download_timeout)
    }

    pub(crate) fn real_store_dir(&self) -> PathBuf {
        self.settings.root.join(self.settings.store_dir.trim_start_matches('/'))
    }

    /// Turns an argument into a logical path inside the store: a store path (with or without
    /// an inner part), the same under the physical root (absolute or relative), or a path that
    /// leads there through symlinks anywhere along it (like `./result/bin/x`).
    pub(crate) fn try_inner_path(&self, arg: &str) -> Option<String> {
        let dir = Path::new(&self.settings.store_dir);
        let real = self.real_store_dir();
        let logical = |rest: &Path| {
            let s = format!("{}/{}", self.settings.store_dir, rest.display());
            Some(s.trim_end_matches('/').to_owned())
        };
        let mut p = std::path::absolute(arg).ok()?;
        for _ in 0..40 {
            if let Ok(rest) = p.strip_prefix(dir) {
                return logical(rest);
            }
            if let Ok(rest) = p.strip_prefix(&real) {
                return logical(rest);
            }
            // Follow the first symlink on the way and look again.
            let comps: Vec<_> = p.components().collect();
            let mut prefix = PathBuf::new();
            let mut next = None;
            for (i, c) in comps.iter().enumerate() {
                prefix.push(c);
                if std::fs::symlink_metadata(&prefix).is_ok_and(|m| m.file_type().is_symlink()) {
                    let target = std::fs::read_link(&prefix).ok()?;
                    let mut n = prefix.parent().map(|d| d.join(&target)).unwrap_or(target);
                    n.extend(&comps[i + 1..]);
                    next = Some(n);
                    break;
                }
            }
            p = next?;
        }
        None
    }

    pub(crate) fn inner_path(&self, arg: &str) -> anyhow::Result<String> {
        self.try_inner_path(arg)
            .with_context(|| format!("'{arg}' is not in the store directory '{}'", self.settings.store_dir))
    }

    /// The store path an argument names (dropping any inner part).
    pub(crate) fn try_store_path(&self, arg: &str) -> Option<String> {
        let p = self.try_inner_path(arg)?;
        let rest = &p[self.settings.store_dir.len() + 1..];
        Some(format!("{}/{}", self.settings.store_dir, rest.split('/').next().unwrap_or(rest)))
    }

    pub(crate) fn store_path(&self, arg: &str) -> anyhow::Result<String> {
        self.try_store_path(arg)
            .with_context(|| format!("'{arg}' is not in the store directory '{}'", self.settings.store_dir))
    }

    pub(crate) fn store_paths(&self, args: &[String]) -> anyhow::Result<Vec<String>> {
        args.iter().map(|a| self.store_path(a)).collect()
    }

    /// Prints the answer of an operation that answers paths. Parsed with borrowed strings: a
    /// closure can hold 100k paths, and they go straight from the answer's bytes to stdout.
    pub(crate) async fn print_paths<O: Op<Answer = Vec<String>>>(&self, op: O, json: bool) -> anyhow::Result<()> {
        #[derive(serde::Deserialize)]
        struct Paths<S> {
            kind: String,
            value: Vec<S>,
        }
        let bytes = self.client().await?.call_bytes(op).await?;
        let bad = |e: serde_json::Error| anyhow::anyhow!("cairnd sent an answer this cairn does not understand: {e}");
        // Store paths need no JSON escapes, so they borrow from the answer; a store directory
        // with characters JSON escapes would need owned strings.
        let answer: Paths<std::borrow::Cow<'_, str>> = match serde_json::from_slice::<Paths<&str>>(&bytes) {
            Ok(p) => Paths { kind: p.kind, value: p.value.into_iter().map(std::borrow::Cow::Borrowed).collect() },
            Err(_) => {
                let p = serde_json::from_slice::<Paths<String>>(&bytes).map_err(bad)?;
                Paths { kind: p.kind, value: p.value.into_iter().map(std::borrow::Cow::Owned).collect() }
            }
        };
        // The kind this operation's answer has on the wire (`paths`), as `Op::respond` gives it.
        let want = O::respond(Vec::new()).kind();
        if answer.kind != want {
            bail!("cairnd answered with {:?} instead of {want}", answer.kind);
        }
        let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
        if json {
            serde_json::to_writer(&mut out, &answer.value)?;
            writeln!(out)?;
        } else {
            for p in &answer.value {
                out.write_all(p.as_bytes())?;
                out.write_all(b"\n")?;
            }
        }
        Ok(out.flush()?)
    }
}

/// `LINK` for the first path, `LINK-2`, `LINK-3` … for the others (as `nix-build` names
/// further outputs' links).
pub(crate) fn numbered(link: &Path, i: usize) -> PathBuf {
    if i == 0 {
        return link.to_owned();
    }
    let mut s = link.as_os_str().to_owned();
    s.push(format!("-{}", i + 1));
    PathBuf::from(s)
}

/// `1 path`, `2 paths`: a count with its noun, plural unless one.
pub(crate) fn count(n: impl TryInto<u64>, noun: &str) -> String {
    let n: u64 = n.try_into().unwrap_or(u64::MAX);
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

pub(crate) fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)?;
    Ok(out.flush()?)
}

pub(crate) async fn to_stdout(mut r: impl AsyncRead + Unpin, progress_label: Option<&str>) -> anyhow::Result<()> {
    let bar = progress_label.map(progress::bytes);
    let mut out = tokio::io::stdout();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf).await.map_err(|e| anyhow::Error::new(e).context(CutOff))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).await?;
        if let Some(b) = &bar {
            b.inc(n as u64);
        }
    }
    out.flush().await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(())
}

/// What [`to_stdout`] says when the daemon's answer ends before its end (a stream the daemon cut
/// off), so that a caller can say why it may have.
#[derive(Debug)]
pub(crate) struct CutOff;

impl std::fmt::Display for CutOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cairnd's answer ended before its end")
    }
}

/// Follows one of the daemon's JSON-line event streams (substitution progress, builds, image
/// transfers and image builds): each line is parsed as an `E` and given to `on`, until the stream
/// ends or `on` fails.
pub(crate) async fn follow_events<E: serde::de::DeserializeOwned>(
    events: impl AsyncRead + Unpin,
    mut on: impl FnMut(E) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(events).lines();
    while let Some(line) = lines.next_line().await.context("reading the daemon's answer")? {
        on(serde_json::from_str::<E>(&line).context("cairnd sent an unreadable event")?)?;
    }
    Ok(())
}

/// Lower-case hex of bytes.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn counts_are_singular_for_one() {
        assert_eq!(count(1u64, "store path"), "1 store path");
        assert_eq!(count(0usize, "file"), "0 files");
        assert_eq!(count(2u64, "layer"), "2 layers");
        assert_eq!(count(1usize, "path"), "1 path");
    }
}
