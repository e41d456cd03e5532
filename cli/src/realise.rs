//! `cairn realise` (alias `build`): the daemon builds, this side shows its log lines as
//! `name> line` (as Nix's new CLI does), a spinner with the count of builds, and prints the
//! output paths.

use std::path::Path;

use anyhow::{bail, Context};
use std::collections::BTreeMap;

use std::collections::BTreeSet;

use cairn_api::{query, BuildMode, RealiseEvent, RealiseRequest, RealiseResult};

use crate::ctx::to_stdout;
use crate::ctx::{follow_events, numbered, print_json, Ctx};
use crate::progress;
use clap::{Args, Subcommand};
use std::io::Read as _;
use std::path::PathBuf;
use tokio::io::AsyncReadExt;

/// The name shown before a build's log lines: the derivation's name without hash and `.drv`.
pub(crate) fn short_name(drv: &str) -> &str {
    let base = drv.rsplit('/').next().unwrap_or(drv);
    let name = base.split_once('-').map(|(_, n)| n).unwrap_or(base);
    name.strip_suffix(".drv").unwrap_or(name)
}

/// This process's values of the variables that the fixed-output derivations to realise name in
/// `impureEnvVars` (proxy settings, typically): a fixed-output build sees the environment of
/// the user who asked for it, as it does when Nix builds without a daemon. Unset variables are
/// not sent, so the daemon's own values apply to them, as with Nix's daemon.
async fn impure_env(client: &cairn_client::Client, paths: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let drvs = paths.iter().map(|p| p.split_once('!').map_or(p.as_str(), |(d, _)| d).to_owned()).collect();
    let names = client.call(query::ImpureEnvVars { paths: drvs }).await?;
    Ok(names.into_iter().filter_map(|n| std::env::var(&n).ok().map(|v| (n, v))).collect())
}

/// A realisation that failed, with the exit status `nix-store --realise` would have: 100 and up
/// when builds failed (see [`cairn_api::nix_exit_status`]), 1 otherwise.
#[derive(Debug)]
pub struct RealiseFailed {
    pub status: u8,
    pub message: String,
}

impl std::fmt::Display for RealiseFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RealiseFailed {}

/// `cairn realise`'s switches.
#[derive(Debug, Clone, Default)]
pub struct RealiseFlags {
    pub keep_going: bool,
    pub keep_failed: bool,
    pub quiet: bool,
    pub json: bool,
    pub mode: BuildMode,
    /// Remote builders instead of the daemon's.
    pub builders: Option<String>,
}

pub async fn realise(ctx: &Ctx, args: &[String], flags: RealiseFlags, out_link: Option<&Path>) -> anyhow::Result<()> {
    let RealiseFlags { keep_going, keep_failed, quiet, json, mode, builders } = flags;
    let mut paths = Vec::new();
    for a in args {
        let (p, outs) = match a.split_once('!') {
            Some((p, o)) => (p, Some(o)),
            None => (a.as_str(), None),
        };
        let p = ctx.store_path(p)?;
        paths.push(match outs {
            Some(o) => format!("{p}!{o}"),
            None => p,
        });
    }
    // A path that is not a derivation is realised as Nix realises one: made valid, substituted
    // if it is not (`nix-store --realise PATH`).
    let (plain, paths): (Vec<String>, Vec<String>) =
        paths.into_iter().partition(|p| !p.contains('!') && !p.ends_with(".drv"));
    if !plain.is_empty() {
        if mode != BuildMode::Normal {
            bail!(
                "--check and --repair rebuild derivations; for other paths, `cairn verify --check-contents --repair`"
            );
        }
        if json && !paths.is_empty() {
            bail!("--json realises derivations or other paths, not both at once");
        }
        crate::cache::substitute(ctx, Vec::new(), &plain, json).await?;
        if paths.is_empty() {
            return Ok(());
        }
    }
    let client = ctx.client().await?;
    let impure_env = impure_env(&client, &paths).await?;
    let req = RealiseRequest { paths, keep_going, keep_failed, impure_env, mode, builders };
    let events = client.realise(&req).await?;
    let bar = progress::spinner("building");
    let (mut total, mut done, mut running) = (0usize, 0usize, 0usize);
    let mut end = None;
    // Kinds of the failures seen, for the exit status, and the derivations they were shown for.
    let mut kinds = Vec::new();
    let mut shown = BTreeSet::new();
    follow_events(events, |event: RealiseEvent| {
        match event {
            RealiseEvent::Substituting { path, from } => {
                if !quiet {
                    bar.suspend(|| eprintln!("copying path '{path}' from '{from}'..."));
                }
            }
            RealiseEvent::NotSubstituted { path, message } => {
                bar.suspend(|| eprintln!("cairn: cannot substitute '{path}' ({message}); building it instead"));
            }
            RealiseEvent::Plan { drvs } => total = drvs.len(),
            RealiseEvent::Started { drv, machine } => {
                running += 1;
                if let (Some(m), false) = (machine, quiet) {
                    bar.suspend(|| eprintln!("building '{}' on '{m}'", short_name(&drv)));
                }
            }
            RealiseEvent::Log { drv, line } => {
                if !quiet {
                    bar.suspend(|| eprintln!("{}> {line}", short_name(&drv)));
                }
            }
            RealiseEvent::Built { .. } => {
                running = running.saturating_sub(1);
                done += 1;
            }
            RealiseEvent::Failed { drv, kind, message } => {
                running = running.saturating_sub(1);
                kinds.push(kind);
                shown.insert(drv);
                // Several lines (the log's tail), indented under the first as Nix prints them.
                bar.suspend(|| eprintln!("cairn: {}", message.replace('\n', "\n       ")));
            }
            RealiseEvent::Error(e) => {
                bar.finish_and_clear();
                bail!("{}", e.message)
            }
            d @ RealiseEvent::Done { .. } => end = Some(d),
        }
        bar.set_message(format!("building {done}/{total} ({running} running)"));
        Ok(())
    })
    .await?;
    bar.finish_and_clear();
    let Some(RealiseEvent::Done { results }) = end else {
        bail!("cairnd ended the build without saying how it went (see its log)")
    };
    if let Some(link) = out_link {
        for (i, r) in results.iter().enumerate() {
            for (name, path) in &r.outputs {
                let mut l = numbered(link, i).into_os_string();
                if name != "out" {
                    l.push(format!("-{name}"));
                }
                ctx.add_root(&client, Path::new(&l), path).await?;
            }
        }
    }
    if json {
        let v: Vec<_> = results
            .iter()
            .map(|r| serde_json::json!({ "drvPath": r.drv, "outputs": r.outputs, "error": r.error }))
            .collect();
        print_json(&v)?;
    } else {
        // Each derivation's outputs in store-path order, as `nix-store --realise` prints its
        // `PathSet` (not by output name: `out` may come first or last).
        for r in &results {
            let mut outs: Vec<&String> = r.outputs.values().collect();
            outs.sort();
            for p in outs {
                println!("{p}");
            }
        }
    }
    let failed: Vec<&RealiseResult> = results.iter().filter(|r| r.error.is_some()).collect();
    let message = match failed.as_slice() {
        [] => return Ok(()),
        // A build's own failure was shown as it happened; say only which one.
        [one] if shown.contains(&one.drv) => format!("build of '{}' failed", one.drv),
        [one] => {
            format!("build of '{}' failed: {}", one.drv, one.error.as_deref().unwrap_or_default().replace('\n', " "))
        }
        many => format!(
            "{} of the {} derivations asked for were not realised, the first '{}' (--json lists them)",
            many.len(),
            results.len(),
            many[0].drv
        ),
    };
    Err(RealiseFailed { status: cairn_api::nix_exit_status(kinds), message }.into())
}

#[derive(Args)]
pub struct RealiseArgs {
    /// `DRV` or `DRV!out1,out2` (a `.drv` store path, or a symlink to one); any other store
    /// path is made valid, substituted if it is not (as `nix-store --realise PATH`).
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// Go on building what does not need a failed build (`-k`, as Nix).
    #[arg(short = 'k', long)]
    pub keep_going: bool,
    /// Keep the build directory of a failed build (`-K`, as Nix).
    #[arg(short = 'K', long)]
    pub keep_failed: bool,
    /// Make this symlink to the (first) output a garbage-collector root.
    #[arg(short = 'o', long, value_name = "LINK")]
    pub out_link: Option<PathBuf>,
    /// Do not print build logs (they are still stored: see `cairn log`).
    #[arg(short = 'Q', long)]
    pub quiet: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Build the derivations again although their outputs are valid, and fail (exit code
    /// 104) if an output differs from the registered one, as `nix-store --realise --check`.
    /// Nothing registered changes; with `-K` the new output is kept as `OUTPUT.check`.
    #[arg(long, conflicts_with = "repair")]
    pub check: bool,
    /// Rebuild outputs (and paths of their closure) whose contents are corrupt or missing
    /// and put the good copies in place, as `nix-store --realise --repair`.
    #[arg(long)]
    pub repair: bool,
    /// Remote builders for this realisation instead of the daemon's `builders` setting, in
    /// Nix's machines format (`'ssh-ng://host x86_64-linux - 4; unix:///run/b.sock'`, or
    /// `@FILE`); `''` builds only on the daemon's machine. Trusted users only.
    #[arg(long, value_name = "SPEC")]
    pub builders: Option<String>,
}

impl RealiseArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let RealiseArgs { paths, keep_going, keep_failed, out_link, quiet, json, check, repair, builders } = self;
        let mode = match (check, repair) {
            (true, _) => cairn_api::BuildMode::Check,
            (_, true) => cairn_api::BuildMode::Repair,
            _ => cairn_api::BuildMode::Normal,
        };
        let flags = crate::realise::RealiseFlags { keep_going, keep_failed, quiet, json, mode, builders };
        crate::realise::realise(ctx, &paths, flags, out_link.as_deref()).await?;
        Ok(())
    }
}

#[derive(Args)]
pub struct BuildersArgs {
    /// Print the builders as JSON.
    #[arg(long)]
    pub json: bool,
}

impl BuildersArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let builders = ctx.client().await?.call(query::Builders {}).await?;
        if self.json {
            return print_json(&builders);
        }
        if builders.is_empty() {
            eprintln!(
                "no remote builders (set `builders` in the daemon's configuration, or pass --builders to realise)"
            );
            return Ok(());
        }
        for b in builders {
            let state = match b.down_seconds {
                Some(s) => format!("down ({s}s more)"),
                None => b.state.clone(),
            };
            let features =
                if b.supported_features.is_empty() { "-".to_owned() } else { b.supported_features.join(",") };
            println!(
                "{}  {}  {}  jobs {}/{}  speed {}  features {}  built {}  failed {}  sent {} NARs ({} bytes)  fetched {} NARs ({} bytes)",
                b.uri,
                state,
                b.systems.join(","),
                b.running,
                b.max_jobs,
                b.speed_factor,
                features,
                b.built,
                b.failed,
                b.nars_sent,
                b.bytes_sent,
                b.nars_received,
                b.bytes_received
            );
            if let Some(e) = b.last_error {
                println!("  last error: {e}");
            }
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct LogArgs {
    /// A derivation (`.drv`) or an output it built.
    pub path: String,
}

impl LogArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let LogArgs { path } = self;
        let p = ctx.store_path(&path)?;
        let r = ctx.client().await?.log(&p).await?;
        to_stdout(r, None).await?;
        Ok(())
    }
}

#[derive(Subcommand)]
pub enum DerivationCommand {
    /// Print derivations as JSON, as `nix show-derivation` (Nix 2.8) prints them.
    Show {
        /// Derivations (`.drv` store paths).
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Write a derivation given as JSON (as `derivation show` prints it, or its inner object)
    /// into the store, as `nix derivation add`; empty output paths are computed. Prints the .drv.
    Add {
        /// The JSON file; `-` reads stdin.
        file: PathBuf,
    },
    /// Print the output paths of derivations, computed from their inputs (as `nix-store -q
    /// --outputs` prints them); a derivation declaring other paths than its hash gives is refused.
    OutputPaths {
        /// Derivations (`.drv` store paths).
        #[arg(required = true)]
        paths: Vec<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

impl DerivationCommand {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            DerivationCommand::Show { paths } => {
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
            DerivationCommand::Add { file } => {
                let text = if file.as_os_str() == "-" {
                    let mut t = String::new();
                    std::io::stdin().read_to_string(&mut t).context("cannot read stdin")?;
                    t
                } else {
                    std::fs::read_to_string(&file).with_context(|| format!("cannot read '{}'", file.display()))?
                };
                let (_, drv) = cairn_nix::derivation::Derivation::from_json(&text)
                    .map_err(|e| anyhow::anyhow!("'{}' is not a derivation in JSON: {e}", file.display()))?;
                let infos = ctx.client().await?.call(query::AddDerivation { aterm: drv.to_aterm() }).await?;
                for i in infos {
                    println!("{}", i.path);
                }
            }
            DerivationCommand::OutputPaths { paths, json } => {
                let paths = ctx.store_paths(&paths)?;
                let map = ctx.client().await?.call(query::DerivationOutputs { paths: paths.clone() }).await?;
                if json {
                    print_json(&map)?;
                } else {
                    for p in &paths {
                        // Sorted by path, as `nix-store -q --outputs` prints a derivation's.
                        let mut outs: Vec<&String> = map.get(p).into_iter().flat_map(|m| m.values()).collect();
                        outs.sort();
                        for out in outs {
                            println!("{out}");
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_names() {
        assert_eq!(super::short_name("/nix/store/00000000000000000000000000000000-hello-2.1.drv"), "hello-2.1");
        assert_eq!(super::short_name("weird"), "weird");
    }
}
