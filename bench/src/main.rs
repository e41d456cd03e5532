//! cairn's benchmark: the foundation's three workloads, garbage collection and substitution, run
//! through cairn and real Nix in the same run on the same machine, printing both figures and their
//! ratio.
//!
//! 1. `add` of a tree of 1 GiB in ~8k files (`cairn add` vs `nix-store --add`), with cairnd's
//!    peak resident memory (VmHWM) during the add;
//! 2. `import` of one export stream of 100k small paths with references
//!    (`cairn import` vs `nix-store --import`);
//! 3. the closure of a path that reaches all 100k paths (`cairn closure` vs `nix-store -qR`),
//!    cold (first query after start, which loads the graph) and warm;
//! 4. garbage collection in a random DAG of 100k paths (each referencing up to 8 random earlier
//!    ones), imported into both stores: with 1% of the paths rooted by symlinks in the gcroots
//!    directories, printing the dead set (`cairn gc --print-dead` vs `nix-store --gc
//!    --print-dead`, both checked against the dead set computed here); then, the roots removed,
//!    deleting all of it (`cairn gc` vs `nix-store --gc`, both stores checked empty after), with
//!    the peak resident memory of cairnd (VmHWM: since a restart for the dead set, reset for the
//!    deletion) and of `nix-store` (`ru_maxrss`), and `rm -rf` of a copy of the store directory
//!    as the file system's floor.
//!    Runtime roots stay on in both (their defaults), so both scan `/proc`.
//! 5. substitution from signed zstd `file://` binary caches written by `cairn copy --to`
//!    (`cairn copy --from` into a fresh cairnd vs `nix copy --from … --to local?root=…`): 1000
//!    small paths, and one 1 GiB path (half random, half repetitive text: zstd takes it to about
//!    two thirds), with the one-core zstd + sha256 limit and a write floor for the large one.
//!    Both destinations are checked once against the seed's NAR hashes, sizes and references.
//! 6. realising 200 trivial derivations, a chain and a fan-out (`cairn realise` vs `nix-store
//!    --realise`, both sandboxed): see `realise.rs`.
//! 7. images (`image.rs`);
//! 8. Nix's own client through `nix-daemon` and through cairnd's `nix-daemon-socket`: closure
//!    queries, connections, `nix copy --to`, `nix-build` (`protocol.rs`).
//! 9. images of images: a squash by cairn beside umoci's (`image.rs`);
//! 10. a fleet: five cairnd pulling one image at once, with and without peers (`fleet.rs`);
//! 10. remote builds: a fan-out dispatched to two remote nix-daemons by cairn and by Nix's
//!     build hook, and the NARs cairn moves (`remote.rs`).
//! 11. soak and load: 64 clients mixing adds, imports, closure queries, builds, gc and image
//!     pulls against one cairnd for 10 minutes, with slow clients holding connections, printing
//!     the closure query's latency under load and cairnd's memory and descriptors (`soak.rs`;
//!     only with `--only soak`, and `--soak-minutes N`, `--soak-clients N`).
//!
//! Each tool starts from a fresh store for every repetition; timings are wall-clock for the
//! whole command, client start-up included. Inputs are generated, then read once so that both
//! tools see a warm page cache. Run it with `bench/run` (release build); `bench/run --quick`
//! uses smaller inputs; `--only gc` (or `add`, `import`, `substitute`, `build`, comma-separated) runs some
//! workloads.
//! Nothing here is a pass/fail test: it prints what it measured (and stops if the two tools
//! disagree; in the gc workload, it says so under the table and goes on).

use std::collections::BTreeSet;
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cairn_nix::export::write_end_marker;
use cairn_nix::{StoreDir, StorePath};
use cairn_tests::{NixStore, Rng, TestStore};

mod fleet;
mod image;
mod protocol;
mod realise;
mod remote;
mod soak;

struct Opts {
    tree_mib: u64,
    files: u64,
    paths: u64,
    reps: usize,
    with_nix: bool,
    /// Workloads to run (`add`, `import`, `gc`); all of them but `soak` by default.
    only: Vec<String>,
    /// How long the soak workload's load lasts, in minutes, and how many clients make it.
    soak_minutes: f64,
    soak_clients: u64,
    /// Only write the export stream of `paths` paths to this file (for profiling), then exit;
    /// with `--only gc`, the gc workload's stream, printing the paths it roots.
    write_stream: Option<PathBuf>,
}

impl Opts {
    fn runs(&self, workload: &str) -> bool {
        // The soak takes its minutes whatever the other sizes: it runs only when asked for.
        (self.only.is_empty() && workload != "soak") || self.only.iter().any(|w| w == workload)
    }
}

const WORKLOADS: [&str; 12] = [
    "add",
    "import",
    "gc",
    "substitute",
    "build",
    "image",
    "fleet",
    "image-build",
    "image-compose",
    "nix-daemon",
    "remote",
    "soak",
];

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        tree_mib: 1024,
        files: 3000,
        paths: 100_000,
        reps: 3,
        with_nix: true,
        only: Vec::new(),
        soak_minutes: 10.0,
        soak_clients: 64,
        write_stream: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || -> Result<u64> { args.next().context("missing number")?.parse().context("not a number") };
        match a.as_str() {
            "--quick" => (o.tree_mib, o.files, o.paths, o.reps) = (256, 1000, 20_000, 1),
            "--tree-mib" => o.tree_mib = num()?,
            "--files" => o.files = num()?,
            "--paths" => o.paths = num()?,
            "--reps" => o.reps = num()? as usize,
            "--no-nix" => o.with_nix = false,
            "--only" => {
                for w in args.next().context("missing workload")?.split(',') {
                    ensure!(WORKLOADS.contains(&w), "unknown workload {w:?} (one of {})", WORKLOADS.join(", "));
                    o.only.push(w.to_owned());
                }
            }
            "--soak-minutes" => {
                o.soak_minutes = args.next().context("missing minutes")?.parse().context("not a number")?
            }
            "--soak-clients" => o.soak_clients = num()?,
            "--write-stream" => o.write_stream = Some(args.next().context("missing file")?.into()),
            "-h" | "--help" => {
                println!("usage: cairn-bench [--quick] [--only add,import,gc,substitute,build,image,image-build,image-compose,fleet,nix-daemon,remote,soak] [--tree-mib N] [--files N] [--paths N]");
                println!("                   [--reps N] [--no-nix] [--write-stream FILE] [--soak-minutes N] [--soak-clients N]");
                println!("soak runs only with --only soak (10 minutes, 64 clients by default).");
                println!("--paths sets the size of both the import/closure graph and the gc graph.");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    ensure!(o.paths > 0 && o.reps > 0, "--paths and --reps must be positive");
    ensure!(o.soak_minutes > 0.0 && o.soak_clients > 0, "--soak-minutes and --soak-clients must be positive");
    Ok(o)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn rm_rf(p: &Path) {
    if !p.exists() {
        return;
    }
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(p).stderr(Stdio::null()).status();
    let _ = std::fs::remove_dir_all(p);
}

/// A cairnd on a fresh root under the work directory: the harness's [`TestStore`] (which starts
/// the binaries next to this one, see `main`), as the bench runs it. The root stays until the
/// work directory goes at the end (mass deletions slow down the next run's file creation: ext4
/// skips recently freed inodes, which would bias whichever tool runs next), and the daemon is
/// stopped with SIGTERM, waited for, when dropped or restarted, so that no run pays for an
/// earlier daemon's shutdown. Its log (`<root>/cairnd.log`) has a filter of the bench's choice
/// (`CAIRN_BENCH_LOG` overrides it, and then each log is printed when its daemon stops).
struct Cairn(TestStore);

impl Cairn {
    /// A cairnd with the default configuration on a root named `cairn-{tag}…`.
    fn start(work: &Path, tag: &str) -> Result<Cairn> {
        Cairn::start_logging(work, tag, "warn")
    }

    /// As [`Cairn::start`], with the given log filter.
    fn start_logging(work: &Path, tag: &str, log: &str) -> Result<Cairn> {
        Cairn::launch(work, &format!("cairn-{tag}-"), "", log)
    }

    /// A cairnd with this config file's text, on a root in `parent` whose name starts with
    /// `prefix`.
    fn start_configured(parent: &Path, prefix: &str, config: &str) -> Result<Cairn> {
        Cairn::launch(parent, prefix, config, "warn")
    }

    fn launch(parent: &Path, prefix: &str, config: &str, log: &str) -> Result<Cairn> {
        std::fs::create_dir_all(parent)?;
        let log = std::env::var("CAIRN_BENCH_LOG").unwrap_or(log.into());
        Ok(Cairn(
            TestStore::builder()
                .root_in(parent, prefix)
                .store_dir("/nix/store")
                .config(config)
                .env("RUST_LOG", &log)
                .start(),
        ))
    }

    /// Stops this daemon (SIGTERM) and starts a new one on the same store.
    fn restart(&mut self) {
        self.0.terminate();
        self.0.restart();
    }

    /// Peak resident set of the daemon so far, in MiB.
    fn peak_rss_mib(&self) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .context("no VmHWM")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kb / 1024.0)
    }

    /// Resets the daemon's peak resident set (VmHWM) to its current one, so that the next
    /// [`Cairn::peak_rss_mib`] covers only what runs in between.
    fn reset_peak_rss(&self) -> Result<()> {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").context("reset VmHWM")
    }

    /// Where cairnd keeps its state (`gcroots/` among it).
    fn state_dir(&self) -> PathBuf {
        self.root.path().join("var/lib/cairn")
    }
}

impl std::ops::Deref for Cairn {
    type Target = TestStore;
    fn deref(&self) -> &TestStore {
        &self.0
    }
}

impl Drop for Cairn {
    fn drop(&mut self) {
        if self.0.is_running() {
            self.0.terminate();
        }
        if std::env::var_os("CAIRN_BENCH_LOG").is_some() {
            eprint!("{}", self.log());
        }
    }
}

/// A private Nix store for the bench: the harness's, under the work directory, kept until the
/// end as cairnd's roots are, building in Nix's sandbox.
fn nix_store(work: &Path, tag: &str) -> NixStore {
    NixStore::new_in(work, &format!("nix-{tag}-")).keep().sandboxed()
}

/// Runs a command with optional stdin from a file; returns (stdout, seconds). Dirty data of
/// earlier runs is flushed first, so that no run pays for another's writeback.
fn timed(mut c: Command, stdin: Option<&Path>) -> Result<(String, f64)> {
    if let Some(f) = stdin {
        c.stdin(std::fs::File::open(f)?);
    }
    nix::unistd::sync();
    let t = Instant::now();
    let out = c.output()?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(out.status.success(), "{:?} failed: {}", c, String::from_utf8_lossy(&out.stderr));
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), secs))
}

/// User + system CPU seconds of every child this process has waited for so far: the CPU a
/// client command spent is a floor under its wall time, whatever serves it.
fn children_cpu() -> Result<f64> {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok(secs(u.user_time()) + secs(u.system_time()))
}

/// As [`timed`], and also the command's peak resident set in MiB (its `ru_maxrss`): the
/// command runs under this binary's `--rusage-to` wrapper, whose only child it is.
fn timed_rss(c: Command, stdin: Option<&Path>, work: &Path) -> Result<(String, f64, f64)> {
    let report = work.join("rusage");
    let _ = std::fs::remove_file(&report);
    let mut w = Command::new(std::env::current_exe()?);
    w.arg("--rusage-to").arg(&report).arg("--").arg(c.get_program()).args(c.get_args());
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => w.env(k, v),
            None => w.env_remove(k),
        };
    }
    if let Some(d) = c.get_current_dir() {
        w.current_dir(d);
    }
    let (out, secs) = timed(w, stdin)?;
    let kib: f64 = std::fs::read_to_string(&report)?.trim().parse()?;
    Ok((out, secs, kib / 1024.0))
}

/// `cairn-bench --rusage-to FILE -- PROGRAM ARGS…`: runs PROGRAM with this process's standard
/// streams and environment, writes its peak resident set (KiB) to FILE, exits with its status.
fn rusage_wrapper(args: &[String]) -> Result<()> {
    let [file, sep, program, rest @ ..] = args else { bail!("usage: --rusage-to FILE -- PROGRAM ARGS…") };
    ensure!(sep == "--", "usage: --rusage-to FILE -- PROGRAM ARGS…");
    let status = Command::new(program).args(rest).status().with_context(|| format!("run {program}"))?;
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    std::fs::write(file, usage.max_rss().to_string())?;
    std::process::exit(status.code().unwrap_or(1));
}

/// A tree of `files` files totalling `mib` MiB in 64 directories, every seventh executable.
/// A tree of `mib` MiB: one file of nine tenths of it, and `files` small files (one in seven
/// executable) sharing the rest, in 64 directories.
fn make_tree(dir: &Path, mib: u64, files: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    make_file(&dir.join("big.bin"), mib * 9 / 10)?;
    let size = ((mib << 20) / 10) / files.max(1);
    let mut rng = Rng::new(1);
    let mut buf = vec![0u8; size as usize];
    for i in 0..files {
        let d = dir.join(format!("d{:02}", i % 64));
        std::fs::create_dir_all(&d)?;
        rng.fill(&mut buf);
        let f = d.join(format!("f{i:05}"));
        std::fs::write(&f, &buf)?;
        if i % 7 == 0 {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}

/// A file of `mib` MiB of random bytes.
fn make_file(path: &Path, mib: u64) -> Result<()> {
    let mut rng = Rng::new(2);
    let mut buf = vec![0u8; 1 << 20];
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for _ in 0..mib {
        rng.fill(&mut buf);
        std::io::Write::write_all(&mut f, &buf)?;
    }
    std::io::Write::flush(&mut f)?;
    Ok(())
}

fn read_all(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            read_all(&p)?;
        } else {
            std::io::copy(&mut std::fs::File::open(&p)?, &mut std::io::sink())?;
        }
    }
    Ok(())
}

/// An export stream of text paths `{prefix}{i}`, path i referencing the earlier paths
/// `refs[i]` and naming them in its contents (so that it is a valid text path), references
/// first. Returns the paths.
fn write_export_stream(file: &Path, prefix: &str, refs: &[Vec<u32>]) -> Result<Vec<String>> {
    let dir = StoreDir::new("/nix/store")?;
    let mut out = BufWriter::new(std::fs::File::create(file)?);
    let mut paths: Vec<StorePath> = Vec::with_capacity(refs.len());
    for (i, r) in refs.iter().enumerate() {
        let refs: BTreeSet<StorePath> = r.iter().map(|&j| paths[j as usize].clone()).collect();
        let mut contents = format!("path {i}\n").into_bytes();
        for r in &refs {
            contents.extend_from_slice(dir.display(r).as_bytes());
            contents.push(b'\n');
        }
        paths.push(cairn_tests::export_text_path(&mut out, &dir, &format!("{prefix}{i}"), &contents, &refs)?);
    }
    write_end_marker(&mut out)?;
    out.flush()?;
    Ok(paths.iter().map(|p| dir.display(p)).collect())
}

/// An export stream of `n` text paths; path i references up to three earlier ones (i-1, i/2,
/// 7i/10), so that the last path's closure is all of them. Returns the last path.
fn make_export_stream(file: &Path, n: u64) -> Result<String> {
    let refs: Vec<Vec<u32>> = (0..n)
        .map(|i| [i.wrapping_sub(1), i / 2, i * 7 / 10].into_iter().filter(|&j| j < i).map(|j| j as u32).collect())
        .collect();
    write_export_stream(file, "p", &refs)?.pop().context("no paths")
}

/// The garbage collector's graph: `n` paths, each referencing 0–8 (fewer if the same one is
/// drawn twice) uniformly drawn earlier ones.
fn random_dag(n: u64) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(2);
    (0..n)
        .map(|i| {
            let k = rng.below(9);
            let r: BTreeSet<u32> = (0..if i == 0 { 0 } else { k }).map(|_| rng.below(i) as u32).collect();
            r.into_iter().collect()
        })
        .collect()
}

/// The indices of the paths of [`random_dag`] that the gc workload roots: 1% of them, drawn
/// uniformly.
fn gc_roots(n: u64) -> Vec<u32> {
    let mut rng = Rng::new(3);
    let mut roots = BTreeSet::new();
    while (roots.len() as u64) < (n / 100).max(1) {
        roots.insert(rng.below(n) as u32);
    }
    roots.into_iter().collect()
}

/// Which paths of `refs` the `roots` reach.
fn reachable(refs: &[Vec<u32>], roots: &[u32]) -> Vec<bool> {
    let mut live = vec![false; refs.len()];
    let mut stack = roots.to_vec();
    while let Some(i) = stack.pop() {
        if !std::mem::replace(&mut live[i as usize], true) {
            stack.extend(refs[i as usize].iter().filter(|&&j| !live[j as usize]));
        }
    }
    live
}

/// Sorted lines of a command's output.
fn sorted_lines(out: &str) -> Vec<&str> {
    let mut v: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    v.sort_unstable();
    v
}

/// `N` of `N store paths deleted, …` (as both `cairn gc` and `nix-store --gc` print it).
fn deleted_count(out: &str) -> Result<u64> {
    let line =
        out.lines().find(|l| l.contains("store paths deleted")).with_context(|| format!("no summary in {out:?}"))?;
    Ok(line.split_whitespace().next().context("empty summary")?.parse()?)
}

/// Entries of a real store directory, leaving out the tools' own (`.links`, `.cairn-tmp` …).
fn store_entries(dir: &Path) -> Result<usize> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
        .count())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ratio(nix: Option<f64>, cairn: f64) -> String {
    nix.map(|n| format!("{:.1}x", n / cairn)).unwrap_or_else(|| "n/a (nix not installed)".into())
}

fn fmt_secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

/// The printed results: workload, cairn, nix, nix/cairn.
#[derive(Default)]
struct Table {
    rows: Vec<String>,
    /// Printed under the table.
    footer: Vec<String>,
}

impl Table {
    fn time(&mut self, name: String, c: f64, n: Option<f64>) {
        let nix = n.map(fmt_secs).unwrap_or("-".into());
        self.rows.push(format!("{:<48} {:>12} {:>12} {:>10}", name, fmt_secs(c), nix, ratio(n, c)));
    }
    fn mib(&mut self, name: String, c: f64, n: Option<f64>) {
        let nix = n.map(|n| format!("{n:.1} MiB")).unwrap_or("-".into());
        self.rows.push(format!("{:<48} {:>12} {:>12} {:>10}", name, format!("{c:.1} MiB"), nix, ratio(n, c)));
    }
    /// A header for the rows that follow, naming the peer they compare with.
    fn section(&mut self, peer: &str) {
        self.rows.push(String::new());
        self.rows.push(format!("{:<48} {:>12} {:>12} {:>10}", "workload", "cairn", peer, format!("{peer}/cairn")));
    }
    /// A row with a figure of cairn's (or of the machine's) only.
    fn note(&mut self, name: &str, value: String) {
        self.rows.push(format!("{name:<48} {value:>12}"));
    }
    fn print(&self) {
        // The Nix header, unless the rows open with a section of their own.
        if !self.rows.first().is_some_and(String::is_empty) {
            println!();
            println!("{:<48} {:>12} {:>12} {:>10}", "workload", "cairn", "nix", "nix/cairn");
        }
        self.rows.iter().for_each(|r| println!("{r}"));
        if !self.footer.is_empty() {
            println!();
            self.footer.iter().for_each(|r| println!("{r}"));
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "--rusage-to") {
        return rusage_wrapper(&args[2..]);
    }
    let o = parse_opts()?;
    // The harness starts `cairn` and `cairnd` from CAIRN_BIN_DIR: those next to this binary
    // (bench/run builds all three in release mode).
    let exe = std::env::current_exe().context("own path")?;
    std::env::set_var("CAIRN_BIN_DIR", exe.parent().context("own directory")?);
    if let Some(file) = &o.write_stream {
        if o.only == ["gc"] {
            let paths = write_export_stream(file, "g", &random_dag(o.paths))?;
            gc_roots(o.paths).iter().for_each(|&r| println!("{}", paths[r as usize]));
        } else {
            println!("{}", make_export_stream(file, o.paths)?);
        }
        return Ok(());
    }
    let with_nix = o.with_nix && have("nix-store");
    let work = tempfile::Builder::new()
        .prefix("cairn-bench-")
        .tempdir_in(std::env::var("CAIRN_BENCH_DIR").unwrap_or("/tmp".into()))?;
    let w = work.path();
    println!(
        "cairn-bench: machine {} cores; nix {}",
        std::thread::available_parallelism()?.get(),
        if with_nix { "present" } else { "absent" }
    );
    let mut table = Table::default();
    if o.runs("add") {
        bench_add(&o, w, with_nix, &mut table)?;
    }
    if o.runs("import") {
        bench_import(&o, w, with_nix, &mut table)?;
    }
    if o.runs("gc") {
        bench_gc(&o, w, with_nix, &mut table)?;
    }
    if o.runs("substitute") {
        bench_substitute(&o, w, with_nix, &mut table)?;
    }
    if o.runs("build") {
        realise::bench_build(&o, w, with_nix, &mut table)?;
    }
    if o.runs("image") {
        image::bench_image(&o, w, &mut table)?;
    }
    if o.runs("image-build") {
        image::bench_image_build(&o, w, &mut table)?;
    }
    if o.runs("fleet") {
        fleet::bench_fleet(&o, w, &mut table)?;
    }
    if o.runs("image-compose") {
        image::bench_image_compose(&o, w, &mut table)?;
    }
    if o.runs("nix-daemon") {
        protocol::bench_nix_daemon(&o, w, with_nix, &mut table)?;
    }
    if o.runs("remote") {
        remote::bench_remote(&o, w, with_nix, &mut table)?;
    }
    if o.runs("soak") {
        soak::bench_soak(&o, w, &mut table)?;
    }
    // Removing the inputs and stores (several GiB) is not measured.
    rm_rf(w);
    table.print();
    Ok(())
}

/// 1. `add` of a tree.
fn bench_add(o: &Opts, w: &Path, with_nix: bool, table: &mut Table) -> Result<()> {
    // What users add: a tree that is mostly one large file among many small ones, and a lone
    // large file.
    let tree = w.join("tree");
    make_tree(&tree, o.tree_mib, o.files)?;
    read_all(&tree)?;
    let file = w.join("big.bin");
    make_file(&file, o.tree_mib)?;
    std::io::copy(&mut std::fs::File::open(&file)?, &mut std::io::sink())?;
    add_row(o, w, with_nix, table, &tree, &format!("add {} MiB tree (one big file + {} small)", o.tree_mib, o.files))?;
    add_row(o, w, with_nix, table, &file, &format!("add one {} MiB file", o.tree_mib))
}

/// `cairn add INPUT` against `nix-store --add INPUT` + `sync` and the floor of any durable copy
/// of it, `cp -r` + `sync`, each rep on a fresh store.
fn add_row(o: &Opts, w: &Path, with_nix: bool, table: &mut Table, input: &Path, label: &str) -> Result<()> {
    let (mut c_times, mut n_times, mut cp_times, mut rss) = (Vec::new(), Vec::new(), Vec::new(), 0f64);
    let name = input.file_name().and_then(|n| n.to_str()).unwrap_or("input");
    let sh = |script: String| {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    };
    for rep in 0..o.reps {
        // Nothing dirty from the last rep or from making the input.
        Command::new("sync").status()?;
        let c = Cairn::start(w, &format!("add-{name}{rep}"))?;
        let (cp, t) = timed(
            {
                let mut cmd = c.cairn();
                cmd.arg("add").arg(input);
                cmd
            },
            None,
        )?;
        rss = rss.max(c.peak_rss_mib()?);
        c_times.push(t);
        drop(c);
        if with_nix {
            let n = nix_store(w, &format!("add-{name}{rep}"));
            // Nix leaves its copy in the page cache; the sync right after makes it as durable
            // as cairn's.
            let mut cmd = n.cmd("nix-store");
            cmd.arg("--add").arg(input);
            let (np, t) = timed(cmd, None)?;
            let (_, t_sync) = timed(Command::new("sync"), None)?;
            ensure!(np.trim() == cp.trim(), "cairn and nix disagree: {cp} vs {np}");
            n_times.push(t + t_sync);
        }
        let dest = w.join(format!("cp-{name}{rep}"));
        // Kept until the end: a mass deletion slows the file system's next creations.
        cp_times.push(timed(sh(format!("cp -r '{}' '{}' && sync", input.display(), dest.display())), None)?.1);
        println!(
            "  {label} rep {}: cairn {} nix + sync {} cp -r + sync {}",
            rep + 1,
            fmt_secs(*c_times.last().unwrap()),
            n_times.last().map(|t| fmt_secs(*t)).unwrap_or("-".into()),
            fmt_secs(*cp_times.last().unwrap())
        );
    }
    let c_add = median(&mut c_times);
    let cp_floor = median(&mut cp_times);
    let n_add = (!n_times.is_empty()).then(|| median(&mut n_times));
    table.time(format!("{label} (median of {}), nix + sync", o.reps), c_add, n_add);
    table.note("  cp -r + sync of the same input (copy floor)", fmt_secs(cp_floor));
    table.note("  cairn / floor", format!("{:.2}x", c_add / cp_floor));
    table.note("  cairnd peak RSS during add", format!("{rss:.1} MiB"));
    Ok(())
}

/// 2. `import` of a stream, 3. closure of its last path.
fn bench_import(o: &Opts, w: &Path, with_nix: bool, table: &mut Table) -> Result<()> {
    let stream = w.join("stream.export");
    let last = make_export_stream(&stream, o.paths)?;
    // Read once, so that both tools find the stream in the page cache.
    std::io::copy(&mut std::fs::File::open(&stream)?, &mut std::io::sink())?;
    let c = Cairn::start(w, "import")?;
    let (out, c_import) = timed(
        {
            let mut cmd = c.cairn();
            cmd.arg("import");
            cmd
        },
        Some(&stream),
    )?;
    ensure!(out.lines().count() as u64 == o.paths, "cairn imported {} paths", out.lines().count());
    // The first query after a daemon start (the graph loads in the background at start), then
    // warm queries.
    let mut c = c;
    c.restart();
    let closure_cmd = |c: &Cairn| {
        let mut cmd = c.cairn();
        cmd.arg("closure").arg(&last);
        cmd
    };
    let (out, c_cold) = timed(closure_cmd(&c), None)?;
    ensure!(out.lines().count() as u64 == o.paths, "closure has {} paths", out.lines().count());
    let mut warm: Vec<f64> = (0..7).map(|_| timed(closure_cmd(&c), None).map(|r| r.1)).collect::<Result<_>>()?;
    let c_warm = median(&mut warm);
    let mut n_import = None;
    let mut n_closure = None;
    if with_nix {
        let n = nix_store(w, "import");
        let (_, t) = timed(
            {
                let mut cmd = n.cmd("nix-store");
                cmd.arg("--import");
                cmd
            },
            Some(&stream),
        )?;
        n_import = Some(t);
        let mut qr: Vec<f64> = Vec::new();
        for _ in 0..3 {
            let (out, t) = timed(
                {
                    let mut cmd = n.cmd("nix-store");
                    cmd.arg("-qR").arg(&last);
                    cmd
                },
                None,
            )?;
            ensure!(out.lines().count() as u64 == o.paths, "nix -qR has {} paths", out.lines().count());
            qr.push(t);
        }
        n_closure = Some(median(&mut qr));
    }
    table.time(format!("import {} paths in one stream", o.paths), c_import, n_import);
    table.time(format!("closure in a {}-path graph, warm (median of 7)", o.paths), c_warm, n_closure);
    table.time(format!("closure in a {}-path graph, 1st after restart", o.paths), c_cold, n_closure);
    Ok(())
}

/// A log line without its terminal colours.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        if ch == '\x1b' {
            // CSI: ESC [ parameters… final byte (@ to ~).
            chars.by_ref().skip(1).find(|c| ('@'..='~').contains(c));
        } else {
            out.push(ch);
        }
    }
    out
}

/// `c` with `args` appended.
fn with_args(mut c: Command, args: &[&str]) -> Command {
    c.args(args);
    c
}

/// Whether a tool printed the expected set of paths; if not, a line saying how they differ.
fn compare_paths(what: &str, got: &[&str], want: &[&str]) -> Option<String> {
    if got == want {
        return None;
    }
    let (g, w): (BTreeSet<&str>, BTreeSet<&str>) = (got.iter().copied().collect(), want.iter().copied().collect());
    let extra: Vec<&&str> = g.difference(&w).collect();
    let missing: Vec<&&str> = w.difference(&g).collect();
    Some(format!(
        "MISMATCH: {what} printed {} paths, {} expected: {} not expected (first {:?}), {} missing (first {:?})",
        got.len(),
        want.len(),
        extra.len(),
        extra.first(),
        missing.len(),
        missing.first()
    ))
}

/// Garbage collection in a random DAG (workload 4): the dead set with 1% of the paths rooted,
/// then the deletion of all of it.
fn bench_gc(o: &Opts, w: &Path, with_nix: bool, table: &mut Table) -> Result<()> {
    let n = o.paths;
    let refs = random_dag(n);
    let stream = w.join("gc.export");
    let paths = write_export_stream(&stream, "g", &refs)?;
    std::io::copy(&mut std::fs::File::open(&stream)?, &mut std::io::sink())?;
    // 1% of the paths, the same in both stores, are permanent roots.
    let roots = gc_roots(n);
    let live = reachable(&refs, &roots);
    let mut dead: Vec<&str> = paths.iter().zip(&live).filter(|(_, &l)| !l).map(|(p, _)| p.as_str()).collect();
    dead.sort_unstable();
    println!(
        "  gc graph: {n} paths, {} references; {} roots reach {} paths, {} dead",
        refs.iter().map(Vec::len).sum::<usize>(),
        roots.len(),
        n as usize - dead.len(),
        dead.len()
    );
    let mut problems = Vec::new();

    // The same stream into both (setup, not the point, but printed).
    let mut c = Cairn::start_logging(w, "gc", "info")?;
    let (out, c_import) = timed(with_args(c.cairn(), &["import"]), Some(&stream))?;
    ensure!(out.lines().count() as u64 == n, "cairn imported {} paths", out.lines().count());
    let nix_store = with_nix.then(|| nix_store(w, "gc"));
    let n_import = match &nix_store {
        Some(s) => Some(timed(with_args(s.cmd("nix-store"), &["--import"]), Some(&stream))?.1),
        None => None,
    };
    table.time(format!("gc setup: import the {n}-path random DAG"), c_import, n_import);

    // Roots: symlinks in the gcroots directories, to the logical path.
    let link_roots = |dir: &Path| -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)?;
        roots
            .iter()
            .map(|&r| {
                let link = dir.join(format!("bench-{r}"));
                std::os::unix::fs::symlink(&paths[r as usize], &link)?;
                Ok(link)
            })
            .collect()
    };
    let mut links = link_roots(&c.state_dir().join("gcroots"))?;
    if let Some(s) = &nix_store {
        links.extend(link_roots(&s.gc_roots_dir())?);
    }

    // The floor of any deletion of these paths on this file system (as `cp -r` + `sync` is that
    // of an add): `rm -rf` of a copy of cairn's store directory, timed after both collections.
    let floor = w.join("gc-delete-floor");
    let mut cp = Command::new("cp");
    cp.arg("-r").arg(c.real_store_dir()).arg(&floor);
    timed(cp, None)?;

    // a. The dead set. cairnd restarts first, so that its memory is that of a daemon that has
    //    been up (graph loaded), not what the import left; the first query also waits for the
    //    graph to load, as any first query after a start does.
    c.restart();
    let print_dead = |c: &Cairn| with_args(c.cairn(), &["gc", "--print-dead"]);
    let (out, c_first) = timed(print_dead(&c), None)?;
    problems.extend(compare_paths("cairn gc --print-dead", &sorted_lines(&out), &dead));
    let mut times = Vec::new();
    for _ in 0..o.reps {
        let (out, secs) = timed(print_dead(&c), None)?;
        problems.extend(compare_paths("cairn gc --print-dead", &sorted_lines(&out), &dead));
        times.push(secs);
    }
    let c_print = median(&mut times);
    let c_print_rss = c.peak_rss_mib()?;
    let (mut n_print, mut n_print_rss) = (None, None);
    if let Some(s) = &nix_store {
        let mut times = Vec::new();
        let mut rss = 0f64;
        for _ in 0..o.reps {
            let (out, secs, r) = timed_rss(with_args(s.cmd("nix-store"), &["--gc", "--print-dead"]), None, w)?;
            problems.extend(compare_paths("nix-store --gc --print-dead", &sorted_lines(&out), &dead));
            times.push(secs);
            rss = rss.max(r);
        }
        (n_print, n_print_rss) = (Some(median(&mut times)), Some(rss));
    }
    let name = format!("gc --print-dead: {} of {n} dead (median of {})", dead.len(), o.reps);
    table.time(name, c_print, n_print);
    table.time("  1st after a cairnd restart (graph loading)".into(), c_first, n_print);
    table.mib("  peak RSS (cairnd VmHWM; nix-store maxrss)".into(), c_print_rss, n_print_rss);

    // b. Everything dead: the roots go, then each tool deletes all paths.
    for l in &links {
        std::fs::remove_file(l)?;
    }
    c.reset_peak_rss()?;
    let gc_started = Instant::now();
    let (out, c_gc) = timed(with_args(c.cairn(), &["gc"]), None)?;
    // cairn gc returns once the paths are invalid and out of the store directory; their space is
    // freed by cairnd in the background (emptying .cairn-trash). Wait for that too, and time
    // it, before Nix runs: Nix frees synchronously, and must not share the disk with our reclaim.
    let trash = c.real_store_dir().join(".cairn-trash");
    while std::fs::read_dir(&trash).map(|mut d| d.next().is_some()).unwrap_or(false) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let c_reclaimed = gc_started.elapsed().as_secs_f64();
    let c_gc_rss = c.peak_rss_mib()?;
    let c_summary = out.trim().to_owned();
    if deleted_count(&out)? != n {
        problems.push(format!("MISMATCH: cairn gc printed {c_summary:?}, {n} paths expected"));
    }
    let (left, _) = timed(with_args(c.cairn(), &["gc", "--print-live"]), None)?;
    let entries = store_entries(&c.real_store_dir())?;
    if !left.trim().is_empty() || entries != 0 {
        problems.push(format!(
            "MISMATCH: after cairn gc, {} paths live and {entries} entries in the store directory",
            left.lines().count()
        ));
    }
    let (mut n_gc, mut n_gc_rss, mut n_summary) = (None, None, None);
    if let Some(s) = &nix_store {
        let (out, secs, rss) = timed_rss(with_args(s.cmd("nix-store"), &["--gc"]), None, w)?;
        (n_gc, n_gc_rss, n_summary) = (Some(secs), Some(rss), Some(out.trim().to_owned()));
        if deleted_count(&out)? != n {
            problems.push(format!("MISMATCH: nix-store --gc printed {:?}, {n} paths expected", out.trim()));
        }
        let (valid, _) = timed(with_args(s.cmd("nix"), &["path-info", "--all"]), None)?;
        let entries = store_entries(&s.real_store_dir())?;
        if !valid.trim().is_empty() || entries != 0 {
            problems.push(format!(
                "MISMATCH: after nix-store --gc, {} paths valid and {entries} entries in the store directory",
                valid.lines().count()
            ));
        }
    }
    let (_, rm_floor) = timed(with_args(Command::new("rm"), &["-rf", &floor.to_string_lossy()]), None)?;
    table.time(format!("gc deleting all {n} paths (until gc returns)"), c_gc, n_gc);
    table.time("  … until their space is freed (cairnd's trash empty)".into(), c_reclaimed, n_gc);
    table.note("  rm -rf of a copy of the store (delete floor)", fmt_secs(rm_floor));
    table.mib("  peak RSS (cairnd VmHWM; nix-store maxrss)".into(), c_gc_rss, n_gc_rss);

    table.footer.push(format!("gc: cairn gc printed {c_summary:?}"));
    if let Some(s) = n_summary {
        table.footer.push(format!("gc: nix-store --gc printed {s:?}"));
    }
    let log_path = c.log_path();
    drop(c);
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    for l in log
        .lines()
        .map(strip_ansi)
        .filter(|l| ["graph loaded", "marked", "garbage collected"].iter().any(|m| l.contains(m)))
    {
        table.footer.push(format!("gc: cairnd: {}", l.trim()));
    }
    for p in problems {
        eprintln!("cairn-bench: {p}");
        table.footer.push(p);
    }
    Ok(())
}

/// Paths with their NAR hash, NAR size and references.
type PathInfos = std::collections::BTreeMap<String, (String, u64, Vec<String>)>;

/// `path-info --json` output (cairn's or Nix's) as [`PathInfos`].
fn path_infos(json: &str) -> Result<PathInfos> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    v.as_array()
        .context("path-info --json is not an array")?
        .iter()
        .map(|i| {
            let refs = i["references"].as_array().context("no references")?;
            Ok((
                i["path"].as_str().context("no path")?.to_owned(),
                (
                    i["narHash"].as_str().context("no narHash")?.to_owned(),
                    i["narSize"].as_u64().context("no narSize")?,
                    refs.iter().filter_map(|r| r.as_str().map(str::to_owned)).collect(),
                ),
            ))
        })
        .collect()
}

/// Whether a destination holds `paths` with the infos of `want`; an error naming the first
/// difference if not.
fn same_infos(who: &str, got: &PathInfos, paths: &[String], want: &PathInfos) -> Result<()> {
    for p in paths {
        ensure!(got.get(p) == want.get(p), "{who}: {p} is {:?}, the seed's is {:?}", got.get(p), want.get(p));
    }
    Ok(())
}

/// A freshly made ext4 file system (a loop-mounted image) for one run, so that no run pays for
/// the inodes an earlier one freed (ext4 searches recently freed inodes when it creates files,
/// which can double the cost of creating many small files). `None` where it cannot be made
/// (not root, no loop devices): runs then use plain directories, and the report says so.
struct FreshFs {
    dir: PathBuf,
    image: PathBuf,
}

impl FreshFs {
    fn new(w: &Path, tag: &str, gib: u64) -> Option<FreshFs> {
        let image = w.join(format!("{tag}.img"));
        let dir = w.join(format!("fs-{tag}"));
        let ok = |c: &mut Command| c.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        let made = std::fs::create_dir_all(&dir).is_ok()
            && ok(Command::new("truncate").arg("-s").arg(format!("{gib}G")).arg(&image))
            && ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))
            && ok(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&dir));
        if made {
            Some(FreshFs { dir, image })
        } else {
            let _ = std::fs::remove_file(&image);
            None
        }
    }
}

impl Drop for FreshFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Workload 5, substitution from a `file://` binary cache (zstd, signed), `cairn copy --from` against
/// `nix copy --from`: 1000 small paths and one 1 GiB path, each run into an empty store (the
/// small paths on a fresh file system each time). cairn's figure includes making the paths
/// durable (one `syncfs`); Nix leaves them in the page cache, so Nix followed by `sync` is shown
/// too.
fn bench_substitute(o: &Opts, w: &Path, with_nix: bool, table: &mut Table) -> Result<()> {
    let quick = o.paths < 100_000;
    let (small_n, big_mib) = if quick { (300u64, 256u64) } else { (1000, 1024) };
    // Inputs, added to a seed daemon and written to two caches.
    let seed = Cairn::start(w, "subst-seed")?;
    let run = |mut c: Command| -> Result<String> {
        let out = c.output()?;
        ensure!(out.status.success(), "{:?}: {}", c, String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut rng = Rng::new(4);
    let small_dir = w.join("subst-small");
    std::fs::create_dir_all(&small_dir)?;
    for i in 0..small_n {
        let mut buf = vec![0u8; 200 + rng.below(4000) as usize];
        rng.fill(&mut buf);
        std::fs::write(small_dir.join(format!("s{i:04}")), &buf)?;
    }
    let big_dir = w.join("subst-big");
    std::fs::create_dir_all(&big_dir)?;
    let words: [&[u8]; 8] = [b"store", b"path", b"closure", b"nix", b"cairn", b"hash", b"derivation", b"output"];
    for i in 0..big_mib / 16 {
        let mut buf = Vec::with_capacity(16 << 20);
        if i % 2 == 0 {
            buf.resize(16 << 20, 0);
            rng.fill(&mut buf);
        } else {
            while buf.len() < 16 << 20 {
                buf.extend_from_slice(rng.pick(&words));
                buf.extend_from_slice(format!(" {}\n", rng.below(100_000)).as_bytes());
            }
            buf.truncate(16 << 20);
        }
        std::fs::write(big_dir.join(format!("b{i:03}")), &buf)?;
    }
    let mut add = seed.cairn();
    add.arg("add");
    for i in 0..small_n {
        add.arg(small_dir.join(format!("s{i:04}")));
    }
    let small: Vec<String> = run(add)?.lines().map(str::to_owned).collect();
    let mut add = seed.cairn();
    add.arg("add").arg(&big_dir);
    let big = run(add)?.trim().to_owned();
    let (sk, pk) = (w.join("subst.sk"), w.join("subst.pk"));
    let mut key = seed.cairn();
    key.args(["key", "generate", "bench-cache-1"]).arg(&sk).arg(&pk);
    run(key)?;
    let public = std::fs::read_to_string(&pk)?.trim().to_owned();
    let caches = [w.join("cache-small"), w.join("cache-big")];
    for (cache, paths) in caches.iter().zip([small.clone(), vec![big.clone()]]) {
        let mut copy = seed.cairn();
        copy.arg("copy").arg("--to").arg(format!("file://{}?compression=zstd", cache.display()));
        copy.arg("--secret-key-file").arg(&sk).args(&paths);
        run(copy)?;
    }
    let file_bytes = |cache: &Path| -> Result<u64> {
        Ok(std::fs::read_dir(cache.join("nar"))?.flatten().map(|e| e.metadata().map(|m| m.len()).unwrap_or(0)).sum())
    };
    let big_file = std::fs::read_dir(caches[1].join("nar"))?.flatten().next().context("no NAR")?.path();
    let big_compressed = file_bytes(&caches[1])?;
    // What both destinations must hold afterwards: the seed's NAR hash, size and references of
    // every path.
    let mut info = seed.cairn();
    info.args(["path-info", "--json"]).args(&small).arg(&big);
    let want = path_infos(&run(info)?)?;
    let nar_size = want.get(&big).context("no path-info for the large path")?.1;
    drop(seed);
    rm_rf(&small_dir);
    rm_rf(&big_dir);

    // The limit: decompress and hash the NAR once, on one core, from memory (the compressed file
    // read beforehand); and each half alone (decompressing into a sink; hashing the NAR held in
    // memory), which is what a pipeline over two cores could approach.
    let (limit, unzstd, sha) = {
        let data = std::fs::read(&big_file)?;
        let stream = |hash: bool| -> Result<f64> {
            let t = Instant::now();
            let mut decoder = zstd::stream::read::Decoder::new(&data[..])?;
            let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = std::io::Read::read(&mut decoder, &mut buf)?;
                if n == 0 {
                    break;
                }
                if hash {
                    sha2::Digest::update(&mut hasher, &buf[..n]);
                }
            }
            std::hint::black_box(sha2::Digest::finalize(hasher));
            Ok(t.elapsed().as_secs_f64())
        };
        let (limit, unzstd) = (stream(true)?, stream(false)?);
        let nar = zstd::stream::decode_all(&data[..])?;
        drop(data);
        let t = Instant::now();
        std::hint::black_box(<sha2::Sha256 as sha2::Digest>::digest(&nar));
        (limit, unzstd, t.elapsed().as_secs_f64())
    };

    // The write floor: the NAR decompressed into one file in the work directory, then `sync`
    // (no hashing, no parsing; the page cache's copy and the disk's writeback are in it).
    let write_floor = {
        let out = w.join("subst-write-floor");
        nix::unistd::sync();
        let t = Instant::now();
        let mut decoder = zstd::stream::read::Decoder::new(std::fs::File::open(&big_file)?)?;
        std::io::copy(&mut decoder, &mut std::fs::File::create(&out)?)?;
        nix::unistd::sync();
        let secs = t.elapsed().as_secs_f64();
        std::fs::remove_file(&out)?;
        nix::unistd::sync();
        secs
    };

    let mut fresh_everywhere = true;
    let mut big_cairn = f64::NAN;
    for (k, (what, cache, paths)) in [
        (format!("substitute {small_n} small paths (zstd cache)"), &caches[0], &small),
        (format!("substitute one {big_mib} MiB path (zstd cache)"), &caches[1], &vec![big.clone()]),
    ]
    .into_iter()
    .enumerate()
    {
        let url = format!("file://{}", cache.display());
        let (mut c_times, mut n_times, mut ns_times) = (Vec::new(), Vec::new(), Vec::new());
        let mut rss = 0f64;
        for rep in 0..o.reps {
            let tag = format!("subst{k}-{rep}");
            // Fresh file systems for the many small paths (file creation is what they measure);
            // the large path goes to plain directories: through a loop device every written byte
            // is copied twice, by a kernel thread competing for the same two cores, which
            // would charge whoever writes back early (cairn, which syncs) for the loop itself.
            let fresh = k == 0;
            let fs = if fresh { FreshFs::new(w, &format!("{tag}-c"), 4) } else { None };
            fresh_everywhere &= fs.is_some() || !fresh;
            let (parent, prefix) = match &fs {
                Some(f) => (f.dir.clone(), "cairn-".to_owned()),
                None => (w.to_owned(), format!("{tag}-cairn-")),
            };
            let c = Cairn::start_configured(&parent, &prefix, &format!("trusted-public-keys = [\"{public}\"]\n"))?;
            let mut cmd = c.cairn();
            cmd.args(["copy", "--from", &url]).args(paths.iter());
            let (out, t) = timed(cmd, None)?;
            ensure!(out.lines().count() == paths.len(), "cairn substituted {} paths", out.lines().count());
            c_times.push(t);
            rss = rss.max(c.peak_rss_mib()?);
            if rep == 0 {
                let mut q = c.cairn();
                q.args(["path-info", "--json"]).args(paths.iter());
                same_infos("cairn copy --from", &path_infos(&run(q)?)?, paths, &want)?;
            }
            drop(c);
            drop(fs);
            if with_nix {
                let fs = if fresh { FreshFs::new(w, &format!("{tag}-n"), 4) } else { None };
                let n = match &fs {
                    Some(f) => NixStore::new_in(&f.dir, "nix-").keep().sandboxed(),
                    None => nix_store(w, &format!("{tag}-nix")),
                };
                // `nix copy` takes its destination from --to, not --store.
                let mut nix_cmd = Command::new("nix");
                nix_cmd.args(["copy", "--from", &url, "--to"]).arg(n.store_url());
                nix_cmd.args(["--option", "trusted-public-keys", &public]).args(paths.iter());
                nix_cmd.env("NIX_CONFIG", n.config());
                nix_cmd.env("XDG_CACHE_HOME", n.cache_home());
                nix_cmd.env_remove("NIX_REMOTE");
                let (_, t) = timed(nix_cmd, None)?;
                let s = Instant::now();
                nix::unistd::sync();
                n_times.push(t);
                ns_times.push(t + s.elapsed().as_secs_f64());
                // Nix read cairn's cache: it holds every path, with the seed's NAR hash, size and
                // references (checked once per workload, not timed).
                if rep == 0 {
                    let mut q = n.cmd("nix");
                    q.args(["path-info", "--json"]).args(paths.iter());
                    same_infos("nix copy --from", &path_infos(&run(q)?)?, paths, &want)?;
                }
                drop(fs);
            }
            println!(
                "  {what} rep {}: cairn {} nix {}",
                rep + 1,
                fmt_secs(*c_times.last().unwrap()),
                n_times.last().map(|t| fmt_secs(*t)).unwrap_or("-".into())
            );
        }
        let n = (!n_times.is_empty()).then(|| median(&mut n_times));
        let c_median = median(&mut c_times);
        big_cairn = c_median;
        table.time(format!("{what} (median of {})", o.reps), c_median, n);
        table.note("  cairnd peak RSS", format!("{rss:.1} MiB"));
        if !ns_times.is_empty() {
            let ns = median(&mut ns_times);
            table.note("  nix copy followed by sync (durable, as cairn)", fmt_secs(ns));
        }
    }
    table.note(
        &format!("  {big_mib} MiB path: NAR / compressed"),
        format!("{:.0} / {:.0} MiB", nar_size as f64 / 1048576.0, big_compressed as f64 / 1048576.0),
    );
    table.note("  zstd -d + sha256 of that NAR, one core (limit)", fmt_secs(limit));
    table.note("    zstd -d alone / sha256 alone", format!("{} / {}", fmt_secs(unzstd), fmt_secs(sha)));
    table.note("  zstd -d to a file + sync (write floor)", fmt_secs(write_floor));
    table.note(&format!("  cairn / write floor, {big_mib} MiB path"), format!("{:.2}x", big_cairn / write_floor));
    table.footer.push(
        "substitution: caches written by cairn copy --to file://…?compression=zstd (signed), read by both; \
         warm page cache (not dropped between runs)"
            .into(),
    );
    if !fresh_everywhere {
        table.footer.push("substitution: no loop-mounted file systems here; runs used plain directories".into());
    }
    Ok(())
}
