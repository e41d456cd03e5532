//! Garbage collection and store upkeep: gc (roots, live, dead), delete, optimise, verify.

use std::io::Write;

use anyhow::bail;
use clap::Args;

use cairn_api::{query, GcAction, GcResult};

use crate::ctx::{count, print_json, Ctx};
use crate::progress;

#[derive(Args)]
pub struct GcArgs {
    /// Print the roots (`LINK -> PATH`) instead.
    #[arg(long, group = "report")]
    pub print_roots: bool,
    /// Print the paths that would be kept instead.
    #[arg(long, group = "report")]
    pub print_live: bool,
    /// Print the paths that would be deleted instead.
    #[arg(long, group = "report")]
    pub print_dead: bool,
    /// Say what would be deleted and how much it would free, deleting nothing.
    #[arg(long, conflicts_with = "report")]
    pub dry_run: bool,
    /// Stop after freeing about this much (bytes, or with a K, M, G or T suffix).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, conflicts_with = "report")]
    pub max_freed: Option<u64>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl GcArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let GcArgs { print_roots, print_live, print_dead, dry_run, max_freed, json } = self;
        let action = match (print_roots, print_live, print_dead, dry_run) {
            (true, ..) => GcAction::PrintRoots,
            (_, true, ..) => GcAction::PrintLive,
            (_, _, true, _) => GcAction::PrintDead,
            (.., true) => GcAction::DryRun,
            _ => GcAction::Collect,
        };
        match action {
            GcAction::PrintLive => ctx.print_paths(query::GcLive, json).await?,
            GcAction::PrintDead => ctx.print_paths(query::GcDead, json).await?,
            GcAction::PrintRoots => {
                let roots = ctx.client().await?.call(query::GcRoots).await?;
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
                let r = client.call(query::GcCollect { dry_run: action == GcAction::DryRun, max_freed }).await;
                spinner.finish_and_clear();
                let r = r?;
                print_gc(&r, json, action == GcAction::DryRun)?;
            }
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct DeleteArgs {
    /// Store paths to delete.
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl DeleteArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let DeleteArgs { paths, json } = self;
        let r = ctx.client().await?.call(query::Delete { paths: ctx.store_paths(&paths)? }).await?;
        print_gc(&r, json, false)?;
        Ok(())
    }
}

#[derive(Args)]
pub struct OptimiseArgs {
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl OptimiseArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let OptimiseArgs { json } = self;
        let spinner = progress::spinner("optimising");
        let r = ctx.client().await?.call(query::Optimise {}).await;
        spinner.finish_and_clear();
        let r = r?;
        if json {
            print_json(&r)?;
        } else {
            println!("{} freed by hard-linking {}", mib(r.bytes_saved), count(r.files_linked, "file"));
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Hash every path's contents and compare with the recorded NAR hash.
    #[arg(long)]
    pub check_contents: bool,
    /// Repair broken paths from a substituter (needs a trusted user).
    #[arg(long)]
    pub repair: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl VerifyArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let VerifyArgs { check_contents, repair, json } = self;
        let spinner = progress::spinner(if check_contents { "checking contents" } else { "checking paths" });
        let r = ctx.client().await?.call(query::Verify { check_contents, repair }).await;
        spinner.finish_and_clear();
        let r = r?;
        if json {
            print_json(&r)?;
        } else {
            for line in &r.forgotten {
                eprintln!("{line}");
            }
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
        Ok(())
    }
}

/// A byte count with an optional binary suffix (`512`, `64K`, `1.5G`), as Nix's `--max-freed`.
fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid size '{s}' (use bytes or K/M/G/T)");
    let t = s.trim();
    let (num, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_uppercase()),
        _ => (t, 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        _ => return Err(bad()),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    Ok((n * (1u64 << shift) as f64) as u64)
}

/// Bytes as Nix shows them (`showBytes`).
fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
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
    out.flush()?;
    if r.limit_reached {
        eprintln!("stopped once more than --max-freed was freed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        for bad in ["", "K", "-1M", "1X", "nanM", "one", "banana"] {
            assert_eq!(parse_size(bad), Err(format!("invalid size '{bad}' (use bytes or K/M/G/T)")), "{bad:?}");
        }
    }
}
