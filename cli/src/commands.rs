//! The verbs.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::Engine;
use cairn_api::config::Settings;
use cairn_api::{AddMethod, AddQuery, GcAction, GcResult, PathInfo, Request, Response};
use cairn_client::{body_from_reader, Client};
use cairn_nix::nar::{Limits, NarReader};
use cairn_nix::signing::SecretKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::io::SyncIoBridge;

use crate::connect::connect;
use crate::progress::{self, Counting};
use crate::{Cli, Command, DerivationCommand, KeyCommand, NarCommand};

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = cli.store.settings(cli.no_auto_start)?;
    let ctx = Ctx { settings, cli_store: cli.store };
    match cli.command {
        Command::Add { paths, flat, name, json, out_link } => {
            if name.is_some() && paths.len() > 1 {
                bail!("--name names one path, but {} were given", paths.len());
            }
            let client = ctx.client().await?;
            let mut infos = Vec::new();
            for (i, p) in paths.iter().enumerate() {
                let info = add(&client, p, flat, name.as_deref()).await?;
                if let Some(link) = &out_link {
                    ctx.add_root(&client, &numbered(link, i), &info.path).await?;
                }
                if !json {
                    println!("{}", info.path);
                }
                infos.push(info);
            }
            if json {
                print_json(&infos)?;
            }
        }
        Command::AddText { name, file, references, json, out_link } => {
            let contents = if file == Path::new("-") {
                let mut v = Vec::new();
                std::io::stdin().read_to_end(&mut v).context("cannot read stdin")?;
                v
            } else {
                std::fs::read(&file).with_context(|| format!("cannot read '{}'", file.display()))?
            };
            let references = references.iter().map(|r| ctx.store_path(r)).collect::<anyhow::Result<_>>()?;
            let req = Request::AddText {
                name,
                contents: base64::engine::general_purpose::STANDARD.encode(contents),
                references,
            };
            let client = ctx.client().await?;
            let infos = path_infos(client.query(&req).await?)?;
            if let (Some(link), Some(info)) = (&out_link, infos.first()) {
                ctx.add_root(&client, link, &info.path).await?;
            }
            if json {
                print_json(&infos)?;
            } else {
                infos.iter().for_each(|i| println!("{}", i.path));
            }
        }
        Command::AddRoot { link, path } => {
            let path = ctx.store_path(&path)?;
            ctx.add_root(&ctx.client().await?, &link, &path).await?;
            println!("{}", std::path::absolute(&link)?.display());
        }
        Command::Gc { print_roots, print_live, print_dead, dry_run, max_freed, json } => {
            let action = match (print_roots, print_live, print_dead, dry_run) {
                (true, ..) => GcAction::PrintRoots,
                (_, true, ..) => GcAction::PrintLive,
                (_, _, true, _) => GcAction::PrintDead,
                (.., true) => GcAction::DryRun,
                _ => GcAction::Collect,
            };
            let req = Request::Gc { action, max_freed };
            match action {
                GcAction::PrintLive | GcAction::PrintDead => ctx.print_paths(req, json).await?,
                GcAction::PrintRoots => {
                    let resp = ctx.client().await?.query(&req).await?;
                    let Response::Roots(roots) = resp else { bail!("cairnd answered --print-roots with {resp:?}") };
                    if json {
                        print_json(&roots)?;
                    } else {
                        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                        for r in roots {
                            writeln!(out, "{} -> {}", r.origin, r.path)?;
                        }
                        out.flush()?;
                    }
                }
                GcAction::Collect | GcAction::DryRun => {
                    let client = ctx.client().await?;
                    let spinner = progress::spinner("collecting garbage");
                    let resp = client.query(&req).await;
                    spinner.finish_and_clear();
                    let r = gc_result(resp?)?;
                    print_gc(&r, json, action == GcAction::DryRun)?;
                }
            }
        }
        Command::Delete { paths, json } => {
            let req = Request::Delete { paths: ctx.store_paths(&paths)? };
            let r = gc_result(ctx.client().await?.query(&req).await?)?;
            print_gc(&r, json, false)?;
        }
        Command::Optimise { json } => {
            let spinner = progress::spinner("optimising");
            let resp = ctx.client().await?.query(&Request::Optimise).await;
            spinner.finish_and_clear();
            let Response::Optimise(r) = resp? else { bail!("cairnd answered optimise with something else") };
            if json {
                print_json(&r)?;
            } else {
                println!("{} freed by hard-linking {}", mib(r.bytes_saved), count(r.files_linked, "file"));
            }
        }
        Command::Verify { check_contents, repair, json } => {
            let spinner = progress::spinner(if check_contents { "checking contents" } else { "checking paths" });
            let resp = ctx.client().await?.query(&Request::Verify { check_contents, repair }).await;
            spinner.finish_and_clear();
            let Response::Verify(r) = resp? else { bail!("cairnd answered verify with something else") };
            if json {
                print_json(&r)?;
            } else {
                for p in &r.problems {
                    println!("{}", p.message);
                }
            }
            let left = r.problems.len() as u64 - r.repaired;
            if left > 0 {
                let verb = if left == 1 { "has" } else { "have" };
                bail!("{left} of {} checked {verb} problems", count(r.checked, "path"));
            }
            if r.repaired > 0 && !json {
                eprintln!("{} repaired", count(r.repaired, "path"));
            }
            if !json {
                eprintln!("{} checked, no problems", count(r.checked, "path"));
            }
        }
        Command::PathInfo { paths, closure, size, closure_size, human_readable, json, help: _ } => {
            let flags = crate::closures::PathInfoFlags { closure, json, size, closure_size, human: human_readable };
            crate::closures::path_info(&ctx, &paths, flags).await?;
        }
        Command::WhyDepends { package, dependency, all, json } => {
            crate::closures::why_depends(&ctx, &package, &dependency, all, json).await?
        }
        Command::DiffClosures { before, after, json } => {
            crate::closures::diff_closures(&ctx, &before, &after, json).await?
        }
        Command::Du { paths, bytes, json } => crate::closures::du(&ctx, &paths, bytes, json).await?,
        Command::References { path, json } => {
            ctx.print_paths(Request::References { path: ctx.store_path(&path)? }, json).await?
        }
        Command::Referrers { path, json } => {
            ctx.print_paths(Request::Referrers { path: ctx.store_path(&path)? }, json).await?
        }
        Command::Closure { paths, json } => {
            ctx.print_paths(Request::Closure { paths: ctx.store_paths(&paths)? }, json).await?
        }
        Command::ReferrersClosure { paths, json } => {
            ctx.print_paths(Request::ReferrersClosure { paths: ctx.store_paths(&paths)? }, json).await?
        }
        Command::Graph { paths, dot: _, json } => {
            let resp = ctx.client().await?.query(&Request::Graph { paths: ctx.store_paths(&paths)? }).await?;
            let Response::Graph { nodes, edges } = resp else { bail!("cairnd answered a graph query with {resp:?}") };
            if json {
                // Edges as `--dot` draws them (and `nix-store --graph`): reference → referrer.
                let edges: Vec<(&String, &String)> = edges.iter().map(|(from, to)| (to, from)).collect();
                print_json(&serde_json::json!({ "nodes": nodes, "edges": edges }))?;
            } else {
                print_dot(&nodes, &edges)?;
            }
        }
        Command::Ls { path, json } => {
            let resp = ctx.client().await?.query(&Request::Ls { path: ctx.inner_path(&path)? }).await?;
            let Response::Listing(entries) = resp else { bail!("cairnd answered ls with {resp:?}") };
            if json {
                print_json(&entries)?;
            } else {
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                for e in entries {
                    let mode = match e.kind.as_str() {
                        "directory" => "dr-xr-xr-x",
                        "executable" => "-r-xr-xr-x",
                        "symlink" => "lrwxrwxrwx",
                        _ => "-r--r--r--",
                    };
                    let target = e.target.map(|t| format!(" -> {t}")).unwrap_or_default();
                    writeln!(out, "{mode} {:>12} {}{target}", e.size.unwrap_or(0), e.name)?;
                }
                out.flush()?;
            }
        }
        Command::Derivation(DerivationCommand::Show { paths }) => {
            let client = ctx.client().await?;
            let mut all = std::collections::BTreeMap::new();
            for p in ctx.store_paths(&paths)? {
                if !p.ends_with(".drv") {
                    bail!("'{p}' is not a derivation (a .drv store path)");
                }
                let mut r = client.cat(&p).await?;
                let mut bytes = Vec::new();
                r.read_to_end(&mut bytes).await?;
                let drv = cairn_nix::derivation::Derivation::parse(&bytes).with_context(|| format!("'{p}'"))?;
                all.insert(p, drv);
            }
            print!("{}", cairn_nix::derivation::show_json(&all));
        }
        Command::Derivation(DerivationCommand::Add { file }) => {
            let text = if file.as_os_str() == "-" {
                let mut t = String::new();
                std::io::stdin().read_to_string(&mut t).context("cannot read stdin")?;
                t
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("cannot read '{}'", file.display()))?
            };
            let (_, drv) = cairn_nix::derivation::Derivation::from_json(&text)
                .map_err(|e| anyhow::anyhow!("'{}' is not a derivation in JSON: {e}", file.display()))?;
            let infos =
                path_infos(ctx.client().await?.query(&Request::AddDerivation { aterm: drv.to_aterm() }).await?)?;
            for i in infos {
                println!("{}", i.path);
            }
        }
        Command::Derivation(DerivationCommand::OutputPaths { paths, json }) => {
            let paths = ctx.store_paths(&paths)?;
            let Response::Outputs(map) =
                ctx.client().await?.query(&Request::DerivationOutputs { paths: paths.clone() }).await?
            else {
                bail!("cairnd answered derivation-outputs with something else");
            };
            if json {
                print_json(&map)?;
            } else {
                for p in &paths {
                    for out in map.get(p).into_iter().flat_map(|m| m.values()) {
                        println!("{out}");
                    }
                }
            }
        }
        Command::Realise { paths, keep_going, keep_failed, out_link, quiet, json, check, repair } => {
            let mode = match (check, repair) {
                (true, _) => cairn_api::BuildMode::Check,
                (_, true) => cairn_api::BuildMode::Repair,
                _ => cairn_api::BuildMode::Normal,
            };
            let flags = crate::build::RealiseFlags { keep_going, keep_failed, quiet, json, mode };
            crate::build::realise(&ctx, &paths, flags, out_link.as_deref()).await?;
        }
        Command::Image(cmd) => crate::image::run(&ctx, cmd).await?,
        Command::Automaton(cmd) => crate::automaton::run(&ctx, cmd).await?,
        Command::Log { path } => {
            let p = ctx.store_path(&path)?;
            let r = ctx.client().await?.log(&p).await?;
            to_stdout(r, None).await?;
        }
        Command::Cat { path } => {
            let r = ctx.client().await?.cat(&ctx.inner_path(&path)?).await?;
            to_stdout(r, None).await?;
        }
        Command::Nar(NarCommand::Dump { path }) => {
            refuse_terminal("a NAR")?;
            match ctx.try_store_path(&path.to_string_lossy()) {
                Some(p) => {
                    let r = ctx.client().await?.nar(&p).await?;
                    to_stdout(r, Some("dumping")).await?;
                }
                None => {
                    tokio::task::spawn_blocking(move || cairn_store::dump(&path, std::io::stdout().lock())).await??;
                }
            }
        }
        Command::Nar(NarCommand::Restore { dir }) => {
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let stdin = std::io::BufReader::with_capacity(1 << 20, std::io::stdin().lock());
                let mut nar = NarReader::new(stdin, Limits::default())?;
                cairn_store::restore(&mut nar, &dir, cairn_store::RestoreMode::Plain)?;
                Ok(())
            })
            .await??;
        }
        Command::Export { paths } => {
            refuse_terminal("an export stream")?;
            let r = ctx.client().await?.export(ctx.store_paths(&paths)?).await?;
            to_stdout(r, Some("exporting")).await?;
        }
        Command::Import { json } => {
            let client = ctx.client().await?;
            // Say so before sending a stream the daemon would refuse unread (it checks again).
            let me = client.version().await?;
            if !me.trusted {
                bail!("{}", cairn_api::untrusted_import_message(&me.user));
            }
            let (w, r) = tokio::io::duplex(1 << 20);
            let bar = progress::bytes("importing");
            let mut sink = Counting { inner: SyncIoBridge::new(w), bar: bar.clone() };
            let reader = tokio::task::spawn_blocking(move || std::io::copy(&mut std::io::stdin().lock(), &mut sink));
            let res = client.import(body_from_reader(r)).await;
            bar.finish_and_clear();
            let read = reader.await?;
            let infos = upload_outcome(res, read.map(|_| ()), "cannot read stdin")?;
            if json {
                print_json(&infos)?;
            } else {
                infos.iter().for_each(|i| println!("{}", i.path));
            }
        }
        Command::Substitute { from, json, paths } => {
            substitute(&ctx, from, &paths, json).await?;
        }
        Command::Copy { to: None, from: Some(from), secret_key_file: _, json, paths } => {
            substitute(&ctx, vec![from], &paths, json).await?;
        }
        Command::Copy { to, secret_key_file, json, paths, .. } => {
            let to = to.context("copy needs --to or --from")?;
            let client = ctx.client().await?;
            let store_dir = cairn_nix::StoreDir::new(&ctx.settings.store_dir)?;
            let paths = ctx.store_paths(&paths)?;
            let key = match &secret_key_file {
                Some(f) => {
                    let text = std::fs::read_to_string(f).with_context(|| format!("cannot read '{}'", f.display()))?;
                    Some(SecretKey::parse(&text).with_context(|| format!("'{}'", f.display()))?)
                }
                None => None,
            };
            let done = copy_closure(&client, &store_dir, &to, paths, key.as_ref()).await?;
            if json {
                print_json(
                    &serde_json::json!({ "copied": done.written, "skipped": done.skipped, "bytes": done.bytes }),
                )?;
            } else {
                eprintln!(
                    "copied {} ({:.2} MiB) to {to}, {} already there",
                    count(done.written, "path"),
                    done.bytes as f64 / (1024.0 * 1024.0),
                    done.skipped
                );
            }
        }
        Command::Key(KeyCommand::Generate { name, secret_key_file, public_key_file }) => {
            key_generate(&name, &secret_key_file, &public_key_file)?;
        }
        Command::Key(KeyCommand::Public { secret_key_file }) => {
            let text = std::fs::read_to_string(&secret_key_file)
                .with_context(|| format!("cannot read '{}'", secret_key_file.display()))?;
            let sk = SecretKey::parse(&text).with_context(|| format!("'{}'", secret_key_file.display()))?;
            println!("{}", sk.public());
        }
        Command::Version { json } => {
            // Never starts a daemon: the client's version, and the running daemon's if any.
            let v = crate::connect::probe(&ctx.settings).await?.map(|(_, v)| v);
            if json {
                print_json(&serde_json::json!({ "client": env!("CARGO_PKG_VERSION"), "daemon": v }))?;
            } else {
                println!("cairn {}", env!("CARGO_PKG_VERSION"));
                match v {
                    Some(v) => println!(
                        "cairnd {} (API {}), store {}, {}",
                        v.daemon_version,
                        v.api_version,
                        v.store_dir,
                        if v.trusted { "trusted" } else { "not trusted" }
                    ),
                    None => println!("cairnd: not running on '{}'", ctx.settings.socket.display()),
                }
            }
        }
        Command::Daemon { action: Some(cmd), .. } => crate::daemon::run(&ctx, cmd).await?,
        Command::Daemon { action: None, .. } | Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("handled in main")
        }
    }
    Ok(())
}

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
        if let Ok(m) = std::fs::symlink_metadata(&link) {
            if !m.file_type().is_symlink() {
                bail!("'{}' exists and is not a symlink; not replacing it", link.display());
            }
        }
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
        let req = Request::AddRoot { link: link.display().to_string(), path: path.to_owned() };
        if let Err(e) = client.query(&req).await {
            let _ = std::fs::remove_file(&link);
            return Err(e.into());
        }
        Ok(())
    }

    fn real_store_dir(&self) -> PathBuf {
        self.settings.root.join(self.settings.store_dir.trim_start_matches('/'))
    }

    /// Turns an argument into a logical path inside the store: a store path (with or without
    /// an inner part), the same under the physical root (absolute or relative), or a path that
    /// leads there through symlinks anywhere along it (like `./result/bin/x`).
    fn try_inner_path(&self, arg: &str) -> Option<String> {
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

    fn inner_path(&self, arg: &str) -> anyhow::Result<String> {
        self.try_inner_path(arg)
            .with_context(|| format!("'{arg}' is not in the store directory '{}'", self.settings.store_dir))
    }

    /// The store path an argument names (dropping any inner part).
    fn try_store_path(&self, arg: &str) -> Option<String> {
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

    /// Prints a `Response::Paths` answer. Parsed with borrowed strings: a closure can hold 100k
    /// paths, and they go straight from the answer's bytes to stdout.
    async fn print_paths(&self, req: Request, json: bool) -> anyhow::Result<()> {
        #[derive(serde::Deserialize)]
        struct Paths<S> {
            kind: String,
            value: Vec<S>,
        }
        let bytes = self.client().await?.query_bytes(&req).await?;
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
        if answer.kind != "paths" {
            bail!("cairnd answered with {:?} instead of paths", answer.kind);
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

/// Writes a new key pair. The seed comes from the kernel's random source; the secret key file is
/// created 0600 and never overwritten (a lost signing key cannot be recovered).
fn key_generate(name: &str, secret: &Path, public: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if name.is_empty() || name.contains(':') || name.contains(char::is_whitespace) {
        bail!("key name '{name}' must be non-empty, without ':' or spaces");
    }
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("cannot read /dev/urandom")?;
    let sk = SecretKey::from_seed(name, seed);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(secret)
        .with_context(|| format!("cannot create '{}' (it must not exist yet)", secret.display()))?;
    f.write_all(sk.to_nix_string().as_bytes())?;
    f.sync_all()?;
    std::fs::write(public, sk.public().to_string()).with_context(|| format!("cannot write '{}'", public.display()))?;
    Ok(())
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

/// Bytes as Nix shows them (`showBytes`).
fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn gc_result(resp: Response) -> anyhow::Result<GcResult> {
    match resp {
        Response::Gc(r) => Ok(r),
        other => bail!("cairnd answered with {other:?}"),
    }
}

/// A collection's or delete's outcome, worded as `nix-store --gc` words it.
fn print_gc(r: &GcResult, json: bool, dry_run: bool) -> anyhow::Result<()> {
    if json && dry_run {
        // Nothing was deleted: the list and the bytes say what would be.
        return print_json(&serde_json::json!({ "wouldDelete": r.deleted, "wouldFree": r.bytes_freed }));
    }
    if json {
        return print_json(r);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if dry_run {
        for p in &r.deleted {
            writeln!(out, "{p}")?;
        }
        out.flush()?;
        eprintln!("would delete {}, freeing {}", count(r.deleted.len(), "store path"), mib(r.bytes_freed));
        return Ok(());
    }
    writeln!(out, "{} deleted, {} freed", count(r.deleted.len(), "store path"), mib(r.bytes_freed))?;
    Ok(out.flush()?)
}

pub(crate) fn path_infos(resp: Response) -> anyhow::Result<Vec<PathInfo>> {
    match resp {
        Response::PathInfos(v) => Ok(v),
        other => bail!("cairnd answered with {other:?}"),
    }
}

pub(crate) fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)?;
    Ok(out.flush()?)
}

fn refuse_terminal(what: &str) -> anyhow::Result<()> {
    if std::io::stdout().is_terminal() {
        bail!("refusing to write {what} to a terminal; redirect stdout to a file or a pipe");
    }
    Ok(())
}

async fn to_stdout(mut r: impl AsyncRead + Unpin, progress_label: Option<&str>) -> anyhow::Result<()> {
    let bar = progress_label.map(progress::bytes);
    let mut out = tokio::io::stdout();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
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

/// Adds one file or tree: streams its NAR (or, flat, its bytes) to the daemon.
async fn add(client: &Client, path: &Path, flat: bool, name: Option<&str>) -> anyhow::Result<PathInfo> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    let name = match name {
        Some(n) => n.to_owned(),
        None => std::path::absolute(path)?
            .file_name()
            .with_context(|| format!("'{}' has no file name; give one with --name", path.display()))?
            .to_string_lossy()
            .into_owned(),
    };
    cairn_nix::store_path::validate_name(&name).with_context(|| format!("cannot add '{}'", path.display()))?;
    if flat {
        if !meta.is_file() {
            bail!("--flat adds regular files, and '{}' is not one", path.display());
        }
        let file = tokio::fs::File::open(path).await.with_context(|| format!("cannot read '{}'", path.display()))?;
        let executable = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o100 != 0;
        let q = AddQuery { name, method: AddMethod::Flat, size: Some(meta.len()), executable };
        return Ok(client.add(&q, body_from_reader(file)).await?);
    }
    let (w, r) = tokio::io::duplex(1 << 20);
    let bar = progress::bytes(&format!("adding {name}"));
    let sink = Counting { inner: SyncIoBridge::new(w), bar: bar.clone() };
    let src = path.to_owned();
    let dumper = tokio::task::spawn_blocking(move || cairn_store::dump(&src, sink));
    let q = AddQuery { name, method: AddMethod::Nar, size: None, executable: false };
    let added = client.add(&q, body_from_reader(r)).await;
    bar.finish_and_clear();
    let dumped = dumper.await?.map_err(|e| match e {
        cairn_store::StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe => source,
        other => std::io::Error::other(other),
    });
    upload_outcome(added, dumped, &format!("cannot add '{}'", path.display()))
}

/// Combines the daemon's answer to an upload with the local side that produced the body.
/// A local read error explains a failed upload best; but when the daemon refused the upload
/// and stopped reading, the producer only sees a broken pipe, and the daemon's answer is the
/// one that names the problem.
fn upload_outcome<T>(
    answer: Result<T, cairn_client::ClientError>,
    produced: std::io::Result<()>,
    what: &str,
) -> anyhow::Result<T> {
    match (answer, produced) {
        (Ok(v), Ok(())) => Ok(v),
        (_, Err(e)) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context(what.to_owned()))
        }
        (Err(e), _) => Err(e.into()),
        (Ok(_), Err(e)) => Err(anyhow::Error::new(e).context(what.to_owned())),
    }
}

fn print_dot(nodes: &[String], edges: &[(String, String)]) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let label = |p: &str| p.rsplit('/').next().unwrap_or(p).get(33..).unwrap_or(p).to_owned();
    writeln!(out, "digraph G {{")?;
    for n in nodes {
        writeln!(out, "\"{n}\" [label = \"{}\", shape = box, style = filled, fillcolor = \"#ffffff\"];", label(n))?;
    }
    for (from, to) in edges {
        if from != to {
            writeln!(out, "\"{to}\" -> \"{from}\" [color = \"black\"];")?;
        }
    }
    writeln!(out, "}}")?;
    Ok(out.flush()?)
}

/// Runs a substitution in the daemon, drawing its progress, and prints the asked-for paths.
pub(crate) async fn substitute(ctx: &Ctx, from: Vec<String>, paths: &[String], json: bool) -> anyhow::Result<()> {
    use cairn_api::{SubstituteEvent, SubstituteRequest};
    use tokio::io::AsyncBufReadExt;
    let client = ctx.client().await?;
    let req = SubstituteRequest { from, paths: ctx.store_paths(paths)? };
    let mut lines = tokio::io::BufReader::new(client.substitute(&req).await?).lines();
    let bar = progress::transfer("substituting");
    let mut end = None;
    while let Some(line) = lines.next_line().await.context("reading the daemon's answer")? {
        match serde_json::from_str::<SubstituteEvent>(&line).context("cairnd sent an unreadable event")? {
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
    }
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

/// Copies the closure of `paths` to `to`: another daemon (`unix://`, `tcp://`, only what it
/// lacks) or a binary cache (`file://`, `s3://`).
pub(crate) async fn copy_closure(
    client: &Client,
    store_dir: &cairn_nix::StoreDir,
    to: &str,
    paths: Vec<String>,
    key: Option<&SecretKey>,
) -> anyhow::Result<crate::cache::Copied> {
    let done = if to.starts_with("tcp://") {
        let bar = progress::transfer("pushing");
        let done = crate::cache::copy_to_tcp(client, store_dir, paths, to, key, &bar).await;
        bar.finish_and_clear();
        done?
    } else if let Some(socket) = to.strip_prefix("unix://") {
        let bar = progress::transfer("copying");
        let done = crate::cache::copy_to_daemon(client, Path::new(socket), paths, store_dir, key, &bar).await;
        bar.finish_and_clear();
        done?
    } else {
        let infos = path_infos(client.query(&Request::PathInfo { paths, closure: true }).await?)?;
        let bar = progress::transfer("copying");
        let done = crate::cache::copy_to_cache(client, store_dir, &infos, to, key, &bar).await;
        bar.finish_and_clear();
        done?
    };
    Ok(done)
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
