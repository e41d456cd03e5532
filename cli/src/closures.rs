//! Questions about closures that Nix users ask with `nix why-depends`, `nix store
//! diff-closures` and `nix path-info -s/-S`, and `cairn du`.
//!
//! All of them are answered on this side from one `PathInfo { closure: true }` query: the daemon
//! sends each path of the closure with its NAR size and references, and the graph walks here are
//! cheap next to that answer. The outputs follow Nix 2.8's byte for byte, except that Nix writes
//! ANSI colours even into pipes and cairn only onto a terminal (and never with `NO_COLOR` set).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{IsTerminal, Write};

use anyhow::bail;
use cairn_api::{query, PathInfo};

use crate::ctx::{print_json, Ctx};
use clap::Args;

/// Whether to colour stdout: a terminal, and no `NO_COLOR`.
fn colours() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The closure of `paths` as an indexed graph: paths sorted as Nix sorts a `StorePathSet` (by
/// name, which within one store directory is the order of the absolute paths), references as
/// indices in that order.
struct Graph {
    paths: Vec<String>,
    nar_size: Vec<u64>,
    refs: Vec<Vec<usize>>,
    index: HashMap<String, usize>,
}

impl Graph {
    fn new(mut infos: Vec<PathInfo>) -> Graph {
        infos.sort_by(|a, b| a.path.cmp(&b.path));
        infos.dedup_by(|a, b| a.path == b.path);
        let index: HashMap<String, usize> = infos.iter().enumerate().map(|(i, p)| (p.path.clone(), i)).collect();
        let refs = infos
            .iter()
            .map(|i| {
                let mut r: Vec<usize> = i.references.iter().filter_map(|r| index.get(r).copied()).collect();
                r.sort_unstable();
                r
            })
            .collect();
        Graph {
            nar_size: infos.iter().map(|i| i.nar_size).collect(),
            paths: infos.into_iter().map(|i| i.path).collect(),
            refs,
            index,
        }
    }

    /// The paths reachable from `from` (itself included), as a mask.
    fn reachable(&self, from: &[usize], seen: &mut Vec<bool>) {
        seen.clear();
        seen.resize(self.paths.len(), false);
        let mut stack: Vec<usize> = from.to_vec();
        while let Some(n) = stack.pop() {
            if !std::mem::replace(&mut seen[n], true) {
                stack.extend(self.refs[n].iter().copied().filter(|&r| !seen[r]));
            }
        }
    }

    /// The sum of the NAR sizes of the closure of `from`, as Nix's `getClosureSize`.
    fn closure_size(&self, from: usize, seen: &mut Vec<bool>) -> u64 {
        self.reachable(&[from], seen);
        seen.iter().zip(&self.nar_size).filter(|(s, _)| **s).map(|(_, n)| n).sum()
    }
}

async fn closure_graph(ctx: &Ctx, paths: Vec<String>) -> anyhow::Result<Graph> {
    let infos = ctx.client().await?.call(query::PathInfo { paths, closure: true }).await?;
    Ok(Graph::new(infos))
}

// ---------------------------------------------------------------------------------------------
// why-depends

const TREE_CONN: &str = "├───";
const TREE_LAST: &str = "└───";
const TREE_LINE: &str = "│   ";
const TREE_NULL: &str = "    ";

/// `cairn why-depends PACKAGE DEPENDENCY`, as `nix why-depends` (without `--precise`): the
/// package, then the chain of references to the dependency that goes through paths closest to
/// it; with `--all`, every edge on a path from one to the other, as a tree in which a path's
/// references are shown once (later mentions are greyed on a terminal).
///
/// Distances come from a breadth-first walk of the reversed graph, so they are the shortest.
/// (Nix 2.8 runs its walk with a queue ordered by memory address, and on some graphs takes a
/// longer chain than the shortest.) When the package does not need the dependency, this says so
/// on stderr and exits 0, as Nix does.
pub async fn why_depends(ctx: &Ctx, package: &str, dependency: &str, all: bool, json: bool) -> anyhow::Result<()> {
    let package = ctx.store_path(package)?;
    let dependency = ctx.store_path(dependency)?;
    let g = closure_graph(ctx, vec![package.clone()]).await?;
    let pkg = g.index[&package];
    let Some(&dep) = g.index.get(&dependency) else {
        eprintln!("'{package}' does not depend on '{dependency}'");
        // A script still gets its JSON: no chain.
        if json {
            return print_json(&serde_json::json!({ "package": package, "dependency": dependency, "chain": [] }));
        }
        return Ok(());
    };
    // Distance of every path to the dependency, over the reversed edges.
    let mut rrefs = vec![Vec::new(); g.paths.len()];
    for (n, refs) in g.refs.iter().enumerate() {
        for &r in refs {
            rrefs[r].push(n);
        }
    }
    let mut dist = vec![usize::MAX; g.paths.len()];
    dist[dep] = 0;
    let mut queue = std::collections::VecDeque::from([dep]);
    while let Some(n) = queue.pop_front() {
        for &p in &rrefs[n] {
            if dist[p] == usize::MAX {
                dist[p] = dist[n] + 1;
                queue.push_back(p);
            }
        }
    }
    // A path's references on the way to the dependency, closest first (ties in path order).
    let next = |n: usize| -> Vec<usize> {
        let mut v: Vec<usize> =
            g.refs[n].iter().copied().filter(|&r| !(r == n && pkg != dep) && dist[r] != usize::MAX).collect();
        v.sort_by_key(|&r| dist[r]);
        v
    };
    if json {
        let mut chain = vec![pkg];
        while *chain.last().expect("non-empty") != dep {
            let Some(&n) = next(*chain.last().expect("non-empty")).first() else { break };
            chain.push(n);
        }
        let mut v = serde_json::json!({
            "package": package,
            "dependency": dependency,
            "chain": chain.iter().map(|&n| &g.paths[n]).collect::<Vec<_>>(),
        });
        if all {
            let mut edges = BTreeMap::new();
            let mut stack = vec![pkg];
            while let Some(n) = stack.pop() {
                if edges.contains_key(&g.paths[n]) || n == dep && pkg != dep {
                    continue;
                }
                let refs = next(n);
                stack.extend(refs.iter().copied());
                edges.insert(g.paths[n].clone(), refs.iter().map(|&r| g.paths[r].clone()).collect::<Vec<_>>());
            }
            v["edges"] = serde_json::json!(edges);
        }
        return print_json(&v);
    }
    struct Printer<'a, W> {
        out: W,
        paths: &'a [String],
        visited: Vec<bool>,
        all: bool,
        colours: bool,
        stop: Option<usize>,
    }
    /// Returns `false` once the chain has reached the dependency (without `--all`).
    fn print_node<W: Write>(
        p: &mut Printer<'_, W>,
        n: usize,
        pad: &str,
        next: &dyn Fn(usize) -> Vec<usize>,
    ) -> std::io::Result<bool> {
        if Some(n) == p.stop {
            return Ok(false);
        }
        if p.visited[n] {
            return Ok(true);
        }
        let refs = next(n);
        for (i, &r) in refs.iter().enumerate() {
            let last = !p.all || i + 1 == refs.len();
            let (grey, normal) = match (p.colours, p.visited[r]) {
                (true, true) => ("\x1b[38;5;244m", "\x1b[0m"),
                (true, false) => ("", "\x1b[0m"),
                _ => ("", ""),
            };
            let branch = if last { TREE_LAST } else { TREE_CONN };
            writeln!(p.out, "{pad}{grey}{branch}{}{normal}", p.paths[r])?;
            p.visited[n] = true;
            let pad = format!("{pad}{}", if last { TREE_NULL } else { TREE_LINE });
            if !print_node(p, r, &pad, next)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
    let mut p = Printer {
        out: std::io::BufWriter::new(std::io::stdout().lock()),
        paths: &g.paths,
        visited: vec![false; g.paths.len()],
        all,
        colours: colours(),
        stop: (!all && pkg != dep).then_some(dep),
    };
    writeln!(p.out, "{package}")?;
    print_node(&mut p, pkg, "", &next)?;
    Ok(p.out.flush()?)
}

// ---------------------------------------------------------------------------------------------
// diff-closures

/// A store path name split as `nix store diff-closures` splits it: an output suffix (`-dev`,
/// `-lib32`, any `-[a-z]+` at the end) dropped, then Nix's `DrvName`: the name up to the first
/// `-` not followed by a letter, the version after it.
fn package_version(name: &str) -> (&str, &str) {
    let name = match name.rsplit_once('-') {
        Some((n, out))
            if (!out.is_empty() && out.bytes().all(|b| b.is_ascii_lowercase())) || out == "lib32" || out == "lib64" =>
        {
            n
        }
        _ => name,
    };
    let b = name.as_bytes();
    for i in 0..b.len() {
        if b[i] == b'-' && i + 1 < b.len() && !b[i + 1].is_ascii_alphabetic() {
            return (&name[..i], &name[i + 1..]);
        }
    }
    (name, "")
}

/// Package name → version → NAR sizes of the closure's paths of that name and version.
fn group(g: &Graph, top: usize) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut seen = Vec::new();
    g.reachable(&[top], &mut seen);
    let mut groups: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (i, path) in g.paths.iter().enumerate().filter(|(i, _)| seen[*i]) {
        let base = path.rsplit('/').next().unwrap_or(path);
        let name = base.split_once('-').map_or(base, |(_, n)| n);
        let (pkg, version) = package_version(name);
        *groups.entry(pkg.to_owned()).or_default().entry(version.to_owned()).or_default() += g.nar_size[i];
    }
    groups
}

fn show_versions(versions: &BTreeSet<&str>) -> String {
    if versions.is_empty() {
        return "∅".to_owned();
    }
    let shown: BTreeSet<&str> = versions.iter().map(|v| if v.is_empty() { "ε" } else { v }).collect();
    shown.into_iter().collect::<Vec<_>>().join(", ")
}

/// `cairn diff-closures BEFORE AFTER`, as `nix store diff-closures`: for each package name whose
/// set of versions changed, or whose paths' NAR sizes changed by 8 KiB or more, one line
/// `name: 1.0 → 1.1, +12.5 KiB` (`∅` for no version, `ε` for the empty one).
pub async fn diff_closures(ctx: &Ctx, before: &str, after: &str, json: bool) -> anyhow::Result<()> {
    let (before, after) = (ctx.store_path(before)?, ctx.store_path(after)?);
    let g = closure_graph(ctx, vec![before.clone(), after.clone()]).await?;
    let (b, a) = (group(&g, g.index[&before]), group(&g, g.index[&after]));
    let names: BTreeSet<&String> = b.keys().chain(a.keys()).collect();
    let empty = BTreeMap::new();
    let colours = colours();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut changes = BTreeMap::new();
    for name in names {
        let (bv, av) = (b.get(name).unwrap_or(&empty), a.get(name).unwrap_or(&empty));
        let delta = av.values().sum::<u64>() as i64 - bv.values().sum::<u64>() as i64;
        let show_delta = delta.abs() >= 8 * 1024;
        let removed: BTreeSet<&str> = bv.keys().filter(|v| !av.contains_key(*v)).map(String::as_str).collect();
        let added: BTreeSet<&str> = av.keys().filter(|v| !bv.contains_key(*v)).map(String::as_str).collect();
        if !show_delta && removed.is_empty() && added.is_empty() {
            continue;
        }
        if json {
            changes.insert(
                name.clone(),
                serde_json::json!({ "versionsBefore": removed, "versionsAfter": added, "sizeDelta": delta }),
            );
            continue;
        }
        let mut items = Vec::new();
        if !removed.is_empty() || !added.is_empty() {
            items.push(format!("{} → {}", show_versions(&removed), show_versions(&added)));
        }
        if show_delta {
            let kib = format!("{:+.1} KiB", delta as f64 / 1024.0);
            items.push(match (colours, delta > 0) {
                (false, _) => kib,
                (true, true) => format!("\x1b[31;1m{kib}\x1b[0m"),
                (true, false) => format!("\x1b[32;1m{kib}\x1b[0m"),
            });
        }
        writeln!(out, "{name}: {}", items.join(", "))?;
    }
    if json {
        serde_json::to_writer(&mut out, &changes)?;
        writeln!(out)?;
    }
    Ok(out.flush()?)
}

// ---------------------------------------------------------------------------------------------
// path-info and du

/// `cairn path-info`'s switches.
#[derive(Debug, Clone, Copy, Default)]
pub struct PathInfoFlags {
    pub closure: bool,
    pub json: bool,
    /// `-s`: each path's NAR size.
    pub size: bool,
    /// `-S`: each path's closure size (the sum of the NAR sizes of its closure).
    pub closure_size: bool,
    /// `-h`: sizes as `5.7G`.
    pub human: bool,
}

/// A size as `nix path-info` prints it: `\t%11d`, or with `-h` `\t%6.1f` and a unit letter.
fn nix_size(n: u64, human: bool) -> String {
    if !human {
        return format!("\t{n:>11}");
    }
    const UNITS: [char; 9] = [' ', 'K', 'M', 'G', 'T', 'P', 'E', 'Z', 'Y'];
    let (mut v, mut power) = (n as f64, 0);
    while v > 1024.0 && power + 1 < UNITS.len() {
        power += 1;
        v /= 1024.0;
    }
    format!("\t{v:>6.1}{}", UNITS[power])
}

/// `cairn path-info`: without `-s`/`-S` cairn's `PATH\tNAR-SIZE\tNAR-HASH` lines; with them
/// `nix path-info`'s layout (paths padded to one width, sizes in columns, sorted). With `--json`,
/// an invalid path is `{"path": …, "valid": false}` and the exit status 0, as Nix's; without,
/// it is an error (`path '…' is not valid`).
pub async fn path_info(ctx: &Ctx, args: &[String], f: PathInfoFlags) -> anyhow::Result<()> {
    let paths = ctx.store_paths(args)?;
    let client = ctx.client().await?;
    // Which paths are valid, in the order given (the closure of an invalid path is an error).
    let valid: Vec<bool> = if f.closure {
        vec![true; paths.len()]
    } else {
        let v = client.call(query::IsValid { paths: paths.clone() }).await?;
        if v.len() != paths.len() {
            bail!("cairnd answered is-valid for {} paths with {} answers", paths.len(), v.len());
        }
        v
    };
    if !f.json {
        if let Some((p, _)) = paths.iter().zip(&valid).find(|(_, v)| !**v) {
            bail!("path '{p}' is not valid");
        }
    }
    let asked: Vec<String> = paths.iter().zip(&valid).filter(|(_, v)| **v).map(|(p, _)| p.clone()).collect();
    let infos = if asked.is_empty() {
        Vec::new()
    } else {
        client.call(query::PathInfo { paths: asked.clone(), closure: f.closure }).await?
    };
    let closure_sizes: HashMap<String, u64> = if f.closure_size && !infos.is_empty() {
        let g = if f.closure {
            Graph::new(infos.clone())
        } else {
            Graph::new(client.call(query::PathInfo { paths: asked, closure: true }).await?)
        };
        let mut seen = Vec::new();
        infos.iter().map(|i| (i.path.clone(), g.closure_size(g.index[&i.path], &mut seen))).collect()
    } else {
        HashMap::new()
    };
    if f.json {
        let mut by_path: HashMap<&str, &PathInfo> = infos.iter().map(|i| (i.path.as_str(), i)).collect();
        let mut out = Vec::with_capacity(infos.len());
        let entry = |i| JsonEntry::Valid(NixPathInfo::of(i, closure_sizes.get(&i.path).copied()));
        if f.closure {
            out.extend(infos.iter().map(entry));
        } else {
            for (p, ok) in paths.iter().zip(&valid) {
                match (ok, by_path.remove(p.as_str())) {
                    (true, Some(i)) => out.push(entry(i)),
                    (true, None) => {}
                    (false, _) => out.push(JsonEntry::Invalid { path: p, valid: false }),
                }
            }
        }
        return print_json(&out);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if !f.size && !f.closure_size {
        for i in &infos {
            writeln!(out, "{}\t{}\t{}", i.path, i.nar_size, i.nar_hash)?;
        }
        return Ok(out.flush()?);
    }
    let infos = nix_order(infos);
    let width = infos.iter().map(|i| i.path.len()).max().unwrap_or(0);
    for i in &infos {
        write!(out, "{:<width$}", i.path)?;
        if f.size {
            out.write_all(nix_size(i.nar_size, f.human).as_bytes())?;
        }
        if f.closure_size {
            out.write_all(nix_size(closure_sizes[&i.path], f.human).as_bytes())?;
        }
        writeln!(out)?;
    }
    Ok(out.flush()?)
}

/// Paths in the order `nix path-info` prints them: its `topoSortPaths` reversed, which is the
/// post-order of a depth-first walk over the paths sorted, each path's references (those in the
/// set) visited in sorted order. References come before their referrers.
fn nix_order(infos: Vec<PathInfo>) -> Vec<PathInfo> {
    let g = Graph::new(infos.clone());
    let mut by_path: HashMap<String, PathInfo> = infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut order = Vec::with_capacity(g.paths.len());
    let mut visited = vec![false; g.paths.len()];
    for start in 0..g.paths.len() {
        // An explicit stack of (path, next reference to look at): closures can be deep.
        let mut stack = vec![(start, 0)];
        while let Some((n, i)) = stack.pop() {
            if i == 0 {
                if visited[n] {
                    continue;
                }
                visited[n] = true;
            }
            match g.refs[n].get(i) {
                Some(&r) => {
                    stack.push((n, i + 1));
                    if r != n && !visited[r] {
                        stack.push((r, 0));
                    }
                }
                None => order.push(n),
            }
        }
    }
    order.into_iter().filter_map(|n| by_path.remove(&g.paths[n])).collect()
}

/// Bytes as `du -h` and Nix's `showBytes` would, in binary units.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let (mut v, mut i) = (n as f64, 0);
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// `cairn du PATH…`: each path's closure, as a line `SIZE\tN paths\tPATH`, and with several
/// paths a `total` line for the union of their closures (shared paths counted once). Sizes are
/// NAR sizes, as `nix path-info -S` adds them: what the closure takes to copy, and on disk
/// before blocks and `optimise`'s hard links.
pub async fn du(ctx: &Ctx, args: &[String], bytes: bool, json: bool) -> anyhow::Result<()> {
    let paths = ctx.store_paths(args)?;
    let g = closure_graph(ctx, paths.clone()).await?;
    let mut seen = Vec::new();
    let mut rows = Vec::new();
    for p in &paths {
        g.reachable(&[g.index[p]], &mut seen);
        let count = seen.iter().filter(|s| **s).count();
        rows.push((p.as_str(), g.closure_size(g.index[p], &mut seen), count));
    }
    let total = (g.nar_size.iter().sum::<u64>(), g.paths.len());
    let show = |n: u64| if bytes { n.to_string() } else { human_bytes(n) };
    let plural = |n: usize| if n == 1 { "1 path".to_owned() } else { format!("{n} paths") };
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(p, size, count)| serde_json::json!({ "path": p, "closureSize": size, "paths": count }))
            .collect();
        return print_json(
            &serde_json::json!({ "closures": v, "total": { "closureSize": total.0, "paths": total.1 } }),
        );
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (p, size, count) in &rows {
        writeln!(out, "{}\t{}\t{p}", show(*size), plural(*count))?;
    }
    if rows.len() > 1 {
        writeln!(out, "{}\t{}\ttotal", show(total.0), plural(total.1))?;
    }
    Ok(out.flush()?)
}

#[derive(Args)]
pub struct PathInfoArgs {
    /// Store paths (or paths inside the store, or symlinks to them).
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// For the whole closure of the paths.
    #[arg(long, short = 'r')]
    pub closure: bool,
    /// Print each path's NAR size, as `nix path-info -s`.
    #[arg(long, short = 's')]
    pub size: bool,
    /// Print each path's closure size (the NAR sizes of its closure added), as `nix path-info -S`.
    #[arg(long, short = 'S')]
    pub closure_size: bool,
    /// With -s and -S, print sizes as 5.7G (`-h`, as Nix).
    #[arg(long, short = 'h')]
    pub human_readable: bool,
    /// JSON, as `nix path-info --json`: `{"path": …, "valid": false}` for an invalid path.
    #[arg(long)]
    pub json: bool,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
}

impl PathInfoArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let PathInfoArgs { paths, closure, size, closure_size, human_readable, json, help: _ } = self;
        let flags = crate::closures::PathInfoFlags { closure, json, size, closure_size, human: human_readable };
        crate::closures::path_info(ctx, &paths, flags).await?;
        Ok(())
    }
}

#[derive(Args)]
pub struct WhyDependsArgs {
    /// The store path that depends (directly or not) on DEPENDENCY.
    pub package: String,
    /// The store path it depends on.
    pub dependency: String,
    /// Show every edge on a path from PACKAGE to DEPENDENCY, not only a shortest chain.
    #[arg(long, short = 'a')]
    pub all: bool,
    /// `{"package", "dependency", "chain": [PACKAGE, …, DEPENDENCY]}`, with --all also
    /// `"edges"`: each path on the way and its references on the way, closest first.
    #[arg(long)]
    pub json: bool,
}

impl WhyDependsArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let WhyDependsArgs { package, dependency, all, json } = self;
        crate::closures::why_depends(ctx, &package, &dependency, all, json).await?;
        Ok(())
    }
}

#[derive(Args)]
pub struct DiffClosuresArgs {
    /// The old store path (its closure is compared).
    pub before: String,
    /// The new store path.
    pub after: String,
    /// A map from package name to `versionsBefore`, `versionsAfter` and `sizeDelta` (bytes).
    #[arg(long)]
    pub json: bool,
}

impl DiffClosuresArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let DiffClosuresArgs { before, after, json } = self;
        crate::closures::diff_closures(ctx, &before, &after, json).await?;
        Ok(())
    }
}

#[derive(Args)]
pub struct DuArgs {
    /// Store paths whose closure sizes to print.
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// Sizes in bytes instead of KiB, MiB, GiB.
    #[arg(long, short = 'b')]
    pub bytes: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl DuArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let DuArgs { paths, bytes, json } = self;
        crate::closures::du(ctx, &paths, bytes, json).await?;
        Ok(())
    }
}

#[derive(Args)]
pub struct ReferencesArgs {
    /// A store path.
    pub path: String,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl ReferencesArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let ReferencesArgs { path, json } = self;
        ctx.print_paths(query::References { path: ctx.store_path(&path)? }, json).await?;
        Ok(())
    }
}

#[derive(Args)]
pub struct ReferrersArgs {
    /// A store path.
    pub path: String,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl ReferrersArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let ReferrersArgs { path, json } = self;
        ctx.print_paths(query::Referrers { path: ctx.store_path(&path)? }, json).await?;
        Ok(())
    }
}

#[derive(Args)]
pub struct ClosureArgs {
    /// Store paths whose closure to print.
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl ClosureArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let ClosureArgs { paths, json } = self;
        ctx.print_paths(query::Closure { paths: ctx.store_paths(&paths)? }, json).await?;
        Ok(())
    }
}

#[derive(Args)]
pub struct ReferrersClosureArgs {
    /// Store paths whose referrers to print.
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl ReferrersClosureArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let ReferrersClosureArgs { paths, json } = self;
        ctx.print_paths(query::ReferrersClosure { paths: ctx.store_paths(&paths)? }, json).await?;
        Ok(())
    }
}

#[derive(Args)]
pub struct GraphArgs {
    /// Store paths whose closure to draw.
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// Graphviz DOT (the default).
    #[arg(long, conflicts_with = "json")]
    pub dot: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl GraphArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let GraphArgs { paths, dot: _, json } = self;
        let query::ReferenceGraph { nodes, edges } =
            ctx.client().await?.call(query::Graph { paths: ctx.store_paths(&paths)? }).await?;
        if json {
            // Edges as `--dot` draws them (and `nix-store --graph`): reference → referrer.
            let edges: Vec<(&String, &String)> = edges.iter().map(|(from, to)| (to, from)).collect();
            print_json(&serde_json::json!({ "nodes": nodes, "edges": edges }))?;
        } else {
            print_dot(&nodes, &edges)?;
        }
        Ok(())
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

/// One entry of `path-info --json`, with its fields in the order `nix path-info --json` writes
/// them (so that the two print the same bytes).
#[derive(serde::Serialize)]
#[serde(untagged)]
enum JsonEntry<'a> {
    Valid(NixPathInfo<'a>),
    Invalid { path: &'a str, valid: bool },
}

/// A path's metadata as Nix 2.8's `pathInfoToJSON` writes it: `ca` and `closureSize` after the
/// references, then the impure fields, a zero registration time and an empty list left out.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct NixPathInfo<'a> {
    path: &'a str,
    nar_hash: &'a str,
    nar_size: u64,
    references: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    closure_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deriver: Option<&'a str>,
    #[serde(skip_serializing_if = "is_zero")]
    registration_time: i64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ultimate: bool,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    signatures: &'a [String],
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl<'a> NixPathInfo<'a> {
    fn of(i: &'a PathInfo, closure_size: Option<u64>) -> NixPathInfo<'a> {
        NixPathInfo {
            path: &i.path,
            nar_hash: &i.nar_hash,
            nar_size: i.nar_size,
            references: &i.references,
            ca: i.ca.as_deref(),
            closure_size,
            deriver: i.deriver.as_deref(),
            registration_time: i.registration_time,
            ultimate: i.ultimate,
            signatures: &i.signatures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{nix_size, package_version, JsonEntry, NixPathInfo};

    #[test]
    fn path_info_json_has_nix_s_field_order() {
        let info = cairn_api::PathInfo {
            path: "/nix/store/x".into(),
            nar_hash: "sha256-AAAA".into(),
            nar_size: 120,
            references: vec!["/nix/store/y".into()],
            deriver: Some("/nix/store/d.drv".into()),
            registration_time: 7,
            ultimate: true,
            signatures: vec!["k:s".into()],
            ca: Some("fixed:sha256:00".into()),
        };
        let text = serde_json::to_string(&[
            JsonEntry::Valid(NixPathInfo::of(&info, Some(9))),
            JsonEntry::Invalid { path: "/nix/store/z", valid: false },
        ])
        .unwrap();
        assert_eq!(
            text,
            r#"[{"path":"/nix/store/x","narHash":"sha256-AAAA","narSize":120,"references":["/nix/store/y"],"ca":"fixed:sha256:00","closureSize":9,"deriver":"/nix/store/d.drv","registrationTime":7,"ultimate":true,"signatures":["k:s"]},{"path":"/nix/store/z","valid":false}]"#
        );
        let bare = cairn_api::PathInfo {
            deriver: None,
            registration_time: 0,
            ultimate: false,
            signatures: vec![],
            ca: None,
            ..info
        };
        assert_eq!(
            serde_json::to_string(&NixPathInfo::of(&bare, None)).unwrap(),
            r#"{"path":"/nix/store/x","narHash":"sha256-AAAA","narSize":120,"references":["/nix/store/y"]}"#
        );
    }

    #[test]
    fn names_split_as_diff_closures_splits_them() {
        assert_eq!(package_version("hello-2.12"), ("hello", "2.12"));
        assert_eq!(package_version("openssl-1.1.1t-dev"), ("openssl", "1.1.1t"));
        assert_eq!(package_version("gcc-wrapper-11.3.0"), ("gcc-wrapper", "11.3.0"));
        assert_eq!(package_version("glibc-2.34-210-bin"), ("glibc", "2.34-210"));
        assert_eq!(package_version("foo-lib64"), ("foo", ""));
        assert_eq!(package_version("gone"), ("gone", ""));
        assert_eq!(package_version("python3-minimal"), ("python3", ""));
        assert_eq!(package_version("x-1-A"), ("x", "1-A"));
    }

    #[test]
    fn sizes_as_nix_path_info() {
        assert_eq!(nix_size(120, false), "\t        120");
        assert_eq!(nix_size(272, true), "\t 272.0 ");
        assert_eq!(nix_size(28632, true), "\t  28.0K");
        assert_eq!(nix_size(1024, true), "\t1024.0 ");
    }
}
