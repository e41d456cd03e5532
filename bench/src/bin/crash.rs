//! The crash harness: kills cairnd over and over while clients add, import, realise, collect,
//! substitute, pull and push, and checks after every restart that nothing a client was told is
//! lost and nothing half done is left.
//!
//! Each round starts the daemon, lets several client threads run a random mix of operations
//! against it, and kills it with `SIGKILL` — either at a random moment, or (cairnd built with
//! its `fault-injection` feature, see `cairn-fault`) at the Nth arrival at one named step of a
//! commit protocol, through `CAIRN_FAULT=STEP:N`. Then it restarts the daemon and checks:
//!
//! - every path a client was told is valid (the command succeeded) is valid — each such path is
//!   rooted by a symlink in `gcroots/` made *before* the command, so no collection may take it;
//!   every image tag a pull was told of resolves, and every manifest a push was told of is served;
//! - `PRAGMA integrity_check` is `ok`, and `cairn verify --check-contents` finds nothing: the
//!   database's quick and foreign-key checks (no valid path refers to an invalid one, so every
//!   rooted closure is complete), every valid path's contents hash to its NAR hash, and the
//!   in-memory graph equals the database;
//! - nothing is left in `.cairn-tmp` once the daemon is up, nor in `.cairn-trash` once its
//!   background emptying ran.
//!
//! It prints, per step (and for random moments), the kills, the losses and the problems found.
//! Run it with `bench/crash` (which builds cairnd with the feature in a target directory of
//! its own); it is a benchmark job, not a test: CI's time budget does not include it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cairn_nix::content_address::FileIngestionMethod;
use cairn_nix::export::write_end_marker;
use cairn_nix::hash::HashingWriter;
use cairn_nix::{Hash, HashAlgo, StoreDir, StorePath};
use cairn_tests::oci::{http, skopeo_copy, umoci_image, DockerRegistry};
use cairn_tests::{free_port, Rng, TestStore};

const STORE: &str = "/nix/store";
const BUSYBOX: &str = "/bin/busybox";
/// How long a round waits for its named step before it kills the daemon itself.
const STEP_WAIT: Duration = Duration::from_secs(10);

struct Opts {
    kills: u64,
    clients: u64,
    seed: u64,
    reset_every: u64,
    steps: Vec<String>,
}

fn opts() -> Result<Opts> {
    let mut o = Opts { kills: 1000, clients: 6, seed: 1, reset_every: 50, steps: Vec::new() };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--kills" => o.kills = val()?.parse()?,
            "--clients" => o.clients = val()?.parse()?,
            "--seed" => o.seed = val()?.parse()?,
            "--reset-every" => o.reset_every = val()?.parse()?,
            "--steps" => o.steps = val()?.split(',').map(str::to_owned).collect(),
            _ => bail!(
                "usage: cairn-crash [--kills N] [--clients N] [--seed N] [--reset-every N] [--steps random,STEP,…]\n\
                 steps: random {}",
                cairn_fault::STEPS.join(" ")
            ),
        }
    }
    if o.steps.is_empty() {
        o.steps =
            std::iter::once("random".to_owned()).chain(cairn_fault::STEPS.iter().map(|s| (*s).to_owned())).collect();
    }
    Ok(o)
}

/// What the clients were told, to be found again after the crash.
#[derive(Default)]
struct Told {
    paths: BTreeSet<String>,
    tags: BTreeSet<String>,
    pushed: BTreeSet<String>,
    /// Operations that succeeded, by kind.
    kinds: BTreeMap<&'static str, u64>,
}

/// The fixed things every round uses.
struct World {
    work: PathBuf,
    /// A signed `file://` binary cache of small paths, and those paths.
    cache_url: String,
    cached: Vec<String>,
    public_key: String,
    /// An upstream registry with one image (`crash/img:v1`), if the peers are installed.
    registry: Option<DockerRegistry>,
    /// An OCI layout with that image, pushed into cairnd's registry listener.
    layout: Option<PathBuf>,
}

fn main() -> Result<()> {
    let o = opts()?;
    let work = tempfile::Builder::new().prefix("cairn-crash-").tempdir_in(std::env::temp_dir())?;
    let world = setup(work.path()).context("setting up")?;
    let mut rng = Rng::new(o.seed);
    let mut per_step: BTreeMap<String, StepCount> = BTreeMap::new();
    let mut round = 0u64;
    let started = Instant::now();
    let mut problems_total = 0u64;
    let mut kinds: BTreeMap<&'static str, u64> = BTreeMap::new();
    while round < o.kills {
        let mut daemon = start_crashd(&world, round)?;
        let mut told = Told::default();
        let until = (round + o.reset_every).min(o.kills);
        while round < until {
            let step = o.steps[(round as usize) % o.steps.len()].clone();
            let c = per_step.entry(step.clone()).or_default();
            let outcome = one_round(&world, &mut daemon, &mut told, &step, o.clients, &mut rng, round)?;
            c.rounds += 1;
            if outcome.reached {
                c.reached += 1;
            }
            c.ops += outcome.ops;
            c.losses += outcome.losses.len() as u64;
            c.problems += outcome.problems.len() as u64;
            for p in outcome.losses.iter().chain(&outcome.problems).take(5) {
                eprintln!("round {round} ({step}): {p}");
            }
            problems_total += (outcome.losses.len() + outcome.problems.len()) as u64;
            round += 1;
            if round % 25 == 0 {
                eprintln!(
                    "cairn-crash: {round} kills in {:.0} s, {problems_total} losses or problems",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        for (k, n) in &told.kinds {
            *kinds.entry(*k).or_default() += n;
        }
        daemon.terminate();
        let _ = Command::new("chmod").args(["-R", "u+w"]).arg(daemon.root.path()).status();
    }
    print_table(&per_step, started.elapsed());
    println!(
        "operations told done, by kind: {}",
        kinds.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
    );
    if problems_total > 0 {
        bail!("{problems_total} losses or problems (see above)");
    }
    Ok(())
}

#[derive(Default)]
struct StepCount {
    rounds: u64,
    reached: u64,
    ops: u64,
    losses: u64,
    problems: u64,
}

fn print_table(per: &BTreeMap<String, StepCount>, took: Duration) {
    println!(
        "\n{:<22} {:>7} {:>8} {:>9} {:>7} {:>9}",
        "crash at", "rounds", "killed", "ops told", "losses", "problems"
    );
    let mut t = StepCount::default();
    for (step, c) in per {
        println!("{step:<22} {:>7} {:>8} {:>9} {:>7} {:>9}", c.rounds, c.reached, c.ops, c.losses, c.problems);
        t.rounds += c.rounds;
        t.reached += c.reached;
        t.ops += c.ops;
        t.losses += c.losses;
        t.problems += c.problems;
    }
    println!("{:<22} {:>7} {:>8} {:>9} {:>7} {:>9}", "total", t.rounds, t.reached, t.ops, t.losses, t.problems);
    println!(
        "\n\"killed\": rounds in which the daemon died at that step (random: at a random moment, by SIGKILL); the \
         other rounds ran out of time before reaching the step and were killed at the end.\n\"ops told\": operations \
         whose success a client saw, each checked after the restart. {:.0} s in all.",
        took.as_secs_f64()
    );
}

fn setup(work: &Path) -> Result<World> {
    anyhow::ensure!(Path::new(BUSYBOX).exists(), "the crash harness needs {BUSYBOX} (Debian busybox-static)");
    // The cache: small flat paths added to a seed daemon, copied out signed.
    let seed = TestStore::builder().root_in(work, "seed-").store_dir(STORE).start();
    let (sk, pk) = (work.join("cache.sec"), work.join("cache.pub"));
    ok(seed.cairn().args(["key", "generate", "crash-cache-1"]).arg(&sk).arg(&pk))?;
    let mut rng = Rng::new(7);
    let mut cached = Vec::new();
    let files = work.join("cache-files");
    std::fs::create_dir_all(&files)?;
    for i in 0..300 {
        let f = files.join(format!("cached-{i}"));
        std::fs::write(&f, sized(&mut rng, 1, 8192))?;
        cached.push(ok(seed.cairn().args(["add", "--flat"]).arg(&f))?.trim().to_owned());
    }
    let cache = work.join("cache");
    let cache_url = format!("file://{}", cache.display());
    ok(seed
        .cairn()
        .args(["copy", "--to", &format!("{cache_url}?compression=zstd"), "--secret-key-file"])
        .arg(&sk)
        .args(&cached))?;
    let public_key = std::fs::read_to_string(&pk)?.trim().to_owned();
    drop(seed);

    // The image: a two-layer umoci image in a layout, pushed to an upstream registry.
    let have = |t: &str| {
        Command::new("sh").args(["-c", &format!("command -v {t}")]).output().is_ok_and(|o| o.status.success())
    };
    let (registry, layout) = if have("umoci") && have("skopeo") && have("docker-registry") {
        let layout = work.join("layout");
        let big: Vec<u8> = rng.bytes(4 << 20);
        umoci_image(
            &layout,
            "v1",
            &[
                vec![("etc/a".into(), b"a\n".to_vec())],
                vec![("data/big".into(), big), ("data/small".into(), b"s".to_vec())],
            ],
        );
        let registry = DockerRegistry::start();
        skopeo_copy(&format!("oci:{}:v1", layout.display()), &format!("docker://{}/crash/img:v1", registry.host()));
        (Some(registry), Some(layout))
    } else {
        eprintln!("cairn-crash: umoci, skopeo or docker-registry missing: no image pulls or pushes");
        (None, None)
    };
    Ok(World { work: work.to_owned(), cache_url, cached, public_key, registry, layout })
}

fn start_crashd(w: &World, round: u64) -> Result<TestStore> {
    let port = free_port();
    let config = format!(
        "substituters = [\"{}\"]\ntrusted-public-keys = [\"{}\"]\nsandbox-paths = [\"/bin/sh={BUSYBOX}\"]\n\
         max-jobs = 2\nlisten = \"127.0.0.1:{port}\"\naccept-pushes = true\n",
        w.cache_url, w.public_key
    );
    let st =
        TestStore::builder().root_in(&w.work, &format!("crashd-{round}-")).store_dir(STORE).config(&config).start();
    std::fs::write(st.root.path().join("listen-port"), port.to_string())?;
    Ok(st)
}

struct Outcome {
    reached: bool,
    ops: u64,
    losses: Vec<String>,
    problems: Vec<String>,
}

/// One round: start (with the fault armed), run the clients, kill, restart, check.
fn one_round(
    w: &World,
    st: &mut TestStore,
    told: &mut Told,
    step: &str,
    clients: u64,
    rng: &mut Rng,
    round: u64,
) -> Result<Outcome> {
    // The daemon from the previous round (or the first start) is up and checked: restart it
    // with the fault armed.
    let armed = step != "random";
    if armed {
        st.terminate();
        st.set_env(cairn_fault::ENV, Some(&format!("{step}:{}", 1 + rng.below(2))));
        st.restart();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Mutex::new(Told::default()));
    let ops = Arc::new(AtomicU64::new(0));
    let port: u16 = std::fs::read_to_string(st.root.path().join("listen-port"))?.trim().parse()?;
    let ctx = Arc::new(Ctx {
        cairn: CairnCmd { args: st.store_args(), bin: bin_dir() },
        roots: st.root.path().join("var/lib/cairn/gcroots"),
        files: st.root.path().join("client-files"),
        cache_paths: w.cached.clone(),
        registry: w.registry.as_ref().map(|r| r.host()),
        layout: w.layout.clone(),
        port,
    });
    std::fs::create_dir_all(&ctx.roots)?;
    std::fs::create_dir_all(&ctx.files)?;
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (stop, shared, ops, ctx) = (stop.clone(), shared.clone(), ops.clone(), ctx.clone());
            let mut rng = Rng::new(rng.next() ^ c);
            std::thread::spawn(move || client(&ctx, &stop, &shared, &ops, &mut rng, round * 1000 + c))
        })
        .collect();
    let reached = if armed {
        let t = Instant::now();
        while !st.has_exited() && t.elapsed() < STEP_WAIT {
            std::thread::sleep(Duration::from_millis(5));
        }
        st.has_exited()
    } else {
        std::thread::sleep(Duration::from_millis(50 + rng.below(1500)));
        true
    };
    st.crash();
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    {
        let mut s = shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        told.paths.append(&mut s.paths);
        told.tags.append(&mut s.tags);
        told.pushed.append(&mut s.pushed);
        for (k, n) in std::mem::take(&mut s.kinds) {
            *told.kinds.entry(k).or_default() += n;
        }
    }
    st.set_env(cairn_fault::ENV, None);
    st.restart();
    let (losses, problems) = check(st, told, port)?;
    Ok(Outcome { reached, ops: ops.load(Ordering::SeqCst), losses, problems })
}

/// The checks after a restart: (losses, other problems).
fn check(st: &mut TestStore, told: &Told, port: u16) -> Result<(Vec<String>, Vec<String>)> {
    let mut problems = Vec::new();
    let real = st.real_store_dir();
    // Recovery removed every temporary copy before the daemon listened.
    let left: Vec<_> = std::fs::read_dir(real.join(".cairn-tmp"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    if !left.is_empty() {
        problems.push(format!("left in .cairn-tmp after recovery: {left:?}"));
    }
    // The graph is loaded by a closure query, then verify compares it with the database and
    // hashes every valid path.
    if let Some(p) = told.paths.iter().next() {
        let out = run(st.cairn().args(["closure", p]))?;
        if !out.status.success() {
            problems.push(format!("closure query after restart: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
    }
    let out = run(st.cairn().args(["verify", "--check-contents"]))?;
    if !out.status.success() {
        problems.push(format!(
            "verify: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut losses = Vec::new();
    for tag in &told.tags {
        let out = run(st.cairn().args(["image", "inspect", tag]))?;
        if !out.status.success() {
            losses.push(format!("lost: image tag {tag} was told pulled"));
        }
    }
    cairn_tests::wait_listening(port);
    for name in &told.pushed {
        let a = http(
            port,
            "GET",
            &format!("/v2/{name}/manifests/latest"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            b"",
        );
        if a.status != 200 {
            losses.push(format!("lost: pushed manifest {name}:latest answers {}", a.status));
        }
    }
    // The trash is emptied in the background after a start.
    let t = Instant::now();
    loop {
        let left = std::fs::read_dir(real.join(".cairn-trash")).map(|d| d.count()).unwrap_or(0);
        if left == 0 {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            problems.push(format!("{left} entries still in .cairn-trash 30 s after the restart"));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The database, read while the daemon is stopped (it holds it exclusively).
    st.terminate();
    let db = rusqlite::Connection::open_with_flags(
        st.root.path().join("var/lib/cairn/db/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let integrity: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if integrity != "ok" {
        problems.push(format!("integrity_check: {integrity}"));
    }
    let mut valid = BTreeSet::new();
    {
        let mut q = db.prepare("SELECT path FROM ValidPaths")?;
        for p in q.query_map([], |r| r.get::<_, String>(0))? {
            // Rows name paths by base name, without the store directory.
            valid.insert(format!("{STORE}/{}", p?));
        }
    }
    drop(db);
    losses.extend(told.paths.iter().filter(|p| !valid.contains(*p)).map(|p| format!("lost: {p} was told valid")));
    st.restart();
    Ok((losses, problems))
}

fn bin_dir() -> PathBuf {
    std::env::var_os("CAIRN_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| {
        std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_owned)).unwrap_or_default()
    })
}

/// `cairn` aimed at the round's daemon, never starting one (the fault must not be armed in it).
struct CairnCmd {
    args: Vec<String>,
    bin: PathBuf,
}

impl CairnCmd {
    fn cmd(&self) -> Command {
        let mut c = Command::new(self.bin.join("cairn"));
        c.args(&self.args).arg("--no-auto-start").env_remove(cairn_fault::ENV).env("HOME", "/nonexistent");
        c
    }
}

struct Ctx {
    cairn: CairnCmd,
    roots: PathBuf,
    files: PathBuf,
    cache_paths: Vec<String>,
    registry: Option<String>,
    layout: Option<PathBuf>,
    port: u16,
}

/// One client: random operations until the round stops; what succeeded goes into `told`.
fn client(ctx: &Ctx, stop: &AtomicBool, told: &Mutex<Told>, ops: &AtomicU64, rng: &mut Rng, id: u64) {
    let dir = StoreDir::new(STORE).expect("a valid store directory");
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let tag = format!("c{id}-{n}");
        let op = rng.below(100);
        let kind = match op {
            0..=24 => "add --flat",
            25..=39 => "add",
            40..=54 => "import",
            55..=64 => "substitute",
            65..=74 => "realise",
            75..=84 => "gc",
            85..=92 => "image pull",
            _ => "push",
        };
        let result = match op {
            0..=24 => add_flat(ctx, &dir, rng, &tag),
            25..=39 => add_tree(ctx, &dir, rng, &tag),
            40..=54 => import(ctx, &dir, rng, &tag),
            55..=64 => substitute(ctx, rng),
            65..=74 => realise(ctx, &tag),
            75..=84 => gc(ctx, rng, &tag).map(|()| Vec::new()),
            85..=92 => pull(ctx, &tag).map(|t| {
                if let Some(t) = t {
                    told.lock().unwrap_or_else(std::sync::PoisonError::into_inner).tags.insert(t);
                }
                Vec::new()
            }),
            _ => push(ctx, &tag).map(|p| {
                if let Some(p) = p {
                    told.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pushed.insert(p);
                }
                Vec::new()
            }),
        };
        // A failure is expected once the daemon is gone; only successes are told.
        if let Ok(paths) = result {
            ops.fetch_add(1, Ordering::SeqCst);
            let mut t = told.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            t.paths.extend(paths);
            *t.kinds.entry(kind).or_default() += 1;
        }
    }
}

/// Roots `path` (a logical store path) before it exists: a symlink in `gcroots/crash`.
fn root(ctx: &Ctx, name: &str, path: &str) -> Result<()> {
    let link = ctx.roots.join(format!("crash-{name}"));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(path, &link)?;
    Ok(())
}

fn add_flat(ctx: &Ctx, dir: &StoreDir, rng: &mut Rng, tag: &str) -> Result<Vec<String>> {
    let bytes = sized(rng, 1, 64 << 10);
    let name = format!("flat-{tag}");
    let f = ctx.files.join(&name);
    std::fs::write(&f, &bytes)?;
    let p = dir.make_fixed_output_path(
        &name,
        FileIngestionMethod::Flat,
        &Hash::digest(HashAlgo::Sha256, &bytes),
        &BTreeSet::new(),
        false,
    )?;
    let shown = dir.display(&p);
    root(ctx, &name, &shown)?;
    let out = ok(ctx.cairn.cmd().args(["add", "--flat"]).arg(&f))?;
    ensure!(out.trim() == shown, "add --flat printed {out:?}, not {shown}");
    Ok(vec![shown])
}

fn add_tree(ctx: &Ctx, dir: &StoreDir, rng: &mut Rng, tag: &str) -> Result<Vec<String>> {
    let name = format!("tree-{tag}");
    let t = ctx.files.join(&name);
    std::fs::create_dir_all(t.join("sub"))?;
    for i in 0..1 + rng.below(5) {
        std::fs::write(t.join(if i % 2 == 0 { "sub" } else { "." }).join(format!("f{i}")), sized(rng, 0, 32 << 10))?;
    }
    std::os::unix::fs::symlink("sub/f0", t.join("link"))?;
    let mut h = HashingWriter::new(std::io::sink(), HashAlgo::Sha256);
    cairn_nar_fs::dump(&t, &mut h)?;
    let (hash, _, _) = h.finish();
    let p = dir.make_fixed_output_path(&name, FileIngestionMethod::Recursive, &hash, &BTreeSet::new(), false)?;
    let shown = dir.display(&p);
    root(ctx, &name, &shown)?;
    let out = ok(ctx.cairn.cmd().arg("add").arg(&t))?;
    ensure!(out.trim() == shown, "add printed {out:?}, not {shown}");
    Ok(vec![shown])
}

/// An export stream of 1–4 text paths, each referring to the ones before it.
fn import(ctx: &Ctx, dir: &StoreDir, rng: &mut Rng, tag: &str) -> Result<Vec<String>> {
    let mut stream = Vec::new();
    let mut paths: Vec<StorePath> = Vec::new();
    for i in 0..1 + rng.below(4) {
        let refs: BTreeSet<StorePath> = paths.iter().filter(|_| rng.below(2) == 0).cloned().collect();
        let mut contents = format!("{tag} {i}\n").into_bytes();
        contents.extend(sized(rng, 0, 4096));
        for r in &refs {
            contents.extend_from_slice(dir.display(r).as_bytes());
        }
        paths.push(cairn_tests::export_text_path(&mut stream, dir, &format!("imp-{tag}-{i}"), &contents, &refs)?);
    }
    write_end_marker(&mut stream)?;
    let shown: Vec<String> = paths.iter().map(|p| dir.display(p)).collect();
    for (i, p) in shown.iter().enumerate() {
        root(ctx, &format!("imp-{tag}-{i}"), p)?;
    }
    ok_stdin(ctx.cairn.cmd().arg("import"), &stream)?;
    Ok(shown)
}

fn substitute(ctx: &Ctx, rng: &mut Rng) -> Result<Vec<String>> {
    let picked: BTreeSet<String> = (0..1 + rng.below(8))
        .map(|_| ctx.cache_paths[rng.below(ctx.cache_paths.len() as u64) as usize].clone())
        .collect();
    for p in &picked {
        root(ctx, &format!("sub-{}", p.rsplit('/').next().unwrap_or(p)), p)?;
    }
    ok(ctx.cairn.cmd().arg("substitute").args(&picked))?;
    Ok(picked.into_iter().collect())
}

/// A derivation of its own (its output is new), its output rooted before it is built.
fn realise(ctx: &Ctx, tag: &str) -> Result<Vec<String>> {
    let json = serde_json::json!({
        "system": "x86_64-linux",
        "builder": "/bin/sh",
        "args": ["-c", format!("echo {tag} > $out")],
        "env": { "out": "", "name": format!("drv-{tag}"), "system": "x86_64-linux", "builder": "/bin/sh" },
        "outputs": { "out": { "path": "" } },
        "inputSrcs": [],
        "inputDrvs": {},
    });
    let drv = ok_stdin(ctx.cairn.cmd().args(["derivation", "add", "-"]), json.to_string().as_bytes())?;
    let drv = drv.trim();
    let out = ok(ctx.cairn.cmd().args(["derivation", "output-paths", drv]))?;
    let out = out.split_whitespace().find(|w| w.starts_with(STORE)).context("no output path")?.to_owned();
    root(ctx, &format!("drv-{tag}"), &out)?;
    let built = ok(ctx.cairn.cmd().args(["realise", drv]))?;
    ensure!(built.trim() == out, "realise printed {built:?}, not {out}");
    Ok(vec![out])
}

/// Some garbage (unrooted), then a collection.
fn gc(ctx: &Ctx, rng: &mut Rng, tag: &str) -> Result<()> {
    for i in 0..1 + rng.below(4) {
        let f = ctx.files.join(format!("garbage-{tag}-{i}"));
        std::fs::write(&f, sized(rng, 1, 16 << 10))?;
        ok(ctx.cairn.cmd().args(["add", "--flat"]).arg(&f))?;
    }
    ok(ctx.cairn.cmd().arg("gc"))?;
    Ok(())
}

fn pull(ctx: &Ctx, tag: &str) -> Result<Option<String>> {
    let Some(host) = &ctx.registry else { return Ok(None) };
    let local = format!("crash/pulled-{tag}:v1");
    ok(ctx.cairn.cmd().args([
        "image",
        "pull",
        &format!("docker://{host}/crash/img:v1"),
        "--tls-verify=false",
        "--tag",
        &local,
    ]))?;
    Ok(Some(local))
}

fn push(ctx: &Ctx, tag: &str) -> Result<Option<String>> {
    let Some(layout) = &ctx.layout else { return Ok(None) };
    let name = format!("crash/pushed-{tag}");
    let out = run(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://127.0.0.1:{}/{name}:latest", ctx.port),
    ]))?;
    ensure!(out.status.success(), "push failed");
    Ok(Some(name))
}

/// `min` to `min + spread - 1` random bytes.
fn sized(rng: &mut Rng, min: u64, spread: u64) -> Vec<u8> {
    let n = min + rng.below(spread);
    rng.bytes(n as usize)
}

fn run(c: &mut Command) -> Result<Output> {
    Ok(c.stdin(Stdio::null()).output()?)
}

fn ok(c: &mut Command) -> Result<String> {
    let out = run(c)?;
    ensure!(out.status.success(), "{:?}: {}", c.get_args().last(), String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ok_stdin(c: &mut Command, input: &[u8]) -> Result<String> {
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(input);
    }
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
