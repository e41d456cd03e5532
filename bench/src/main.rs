//! cairn's benchmark: the foundation's three workloads, run through cairn and real Nix in the
//! same run on the same machine, printing both figures and their ratio.
//!
//! 1. `add` of a tree of 1 GiB in ~8k files (`cairn add` vs `nix-store --add`), with cairnd's
//!    peak resident memory (VmHWM) during the add;
//! 2. `import` of one export stream of 100k small paths with references
//!    (`cairn import` vs `nix-store --import`);
//! 3. the closure of a path that reaches all 100k paths (`cairn closure` vs `nix-store -qR`),
//!    cold (first query after start, which loads the graph) and warm.
//!
//! Each tool starts from a fresh store for every repetition; timings are wall-clock for the
//! whole command, client start-up included. Inputs are generated, then read once so that both
//! tools see a warm page cache. Run it with `bench/run` (release build); `bench/run --quick`
//! uses smaller inputs. Nothing here is a pass/fail test: it prints what it measured.

use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cairn_nix::export::{write_end_marker, write_next_marker, write_trailer, ExportTrailer};
use cairn_nix::nar::NarWriter;
use cairn_nix::{Hash, HashAlgo, StoreDir, StorePath};

struct Opts {
    tree_mib: u64,
    files: u64,
    paths: u64,
    reps: usize,
    with_nix: bool,
    /// Only write the export stream of `paths` paths to this file (for profiling), then exit.
    write_stream: Option<PathBuf>,
}

fn parse_opts() -> Result<Opts> {
    let mut o = Opts { tree_mib: 1024, files: 8192, paths: 100_000, reps: 3, with_nix: true, write_stream: None };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || -> Result<u64> { args.next().context("missing number")?.parse().context("not a number") };
        match a.as_str() {
            "--quick" => (o.tree_mib, o.files, o.paths, o.reps) = (256, 2048, 20_000, 1),
            "--tree-mib" => o.tree_mib = num()?,
            "--files" => o.files = num()?,
            "--paths" => o.paths = num()?,
            "--reps" => o.reps = num()? as usize,
            "--no-nix" => o.with_nix = false,
            "--write-stream" => o.write_stream = Some(args.next().context("missing file")?.into()),
            "-h" | "--help" => {
                println!("usage: cairn-bench [--quick] [--tree-mib N] [--files N] [--paths N] [--reps N] [--no-nix] [--write-stream FILE]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(o)
}

fn bin(name: &str) -> PathBuf {
    std::env::current_exe().expect("own path").with_file_name(name)
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

/// A cairnd on a fresh root, stopped (SIGTERM) on drop; the root is removed with the work
/// directory at the end.
struct Cairn {
    root: PathBuf,
    socket: PathBuf,
    child: Child,
}

impl Cairn {
    fn start(work: &Path, tag: &str) -> Result<Cairn> {
        let root = work.join(format!("cairn-{tag}"));
        rm_rf(&root);
        std::fs::create_dir_all(&root)?;
        let socket = root.join("sock");
        let child = Cairn::spawn(&root, &socket)?;
        Ok(Cairn { root, socket, child })
    }

    /// Stops this daemon and starts a new one on the same store.
    fn restart(&mut self) -> Result<()> {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::SIGTERM);
        self.child.wait()?;
        self.child = Cairn::spawn(&self.root, &self.socket)?;
        Ok(())
    }

    fn spawn(root: &Path, socket: &Path) -> Result<Child> {
        let child = Command::new(bin("cairnd"))
            .args(["--store-dir", "/nix/store", "--config", "/dev/null", "--root"])
            .arg(root)
            .arg("--socket")
            .arg(socket)
            .env("RUST_LOG", std::env::var("CAIRN_BENCH_LOG").unwrap_or("warn".into()))
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(root.join("cairnd.log"))?)
            .spawn()
            .context("start cairnd (build with bench/run)")?;
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            ensure!(t.elapsed() < Duration::from_secs(30), "cairnd did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(child)
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(bin("cairn"));
        c.args(["--store-dir", "/nix/store", "--config", "/dev/null", "--no-auto-start", "--root"])
            .arg(&self.root)
            .arg("--socket")
            .arg(&self.socket);
        c
    }

    /// Peak resident set of the daemon so far, in MiB.
    fn peak_rss_mib(&self) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
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
}

impl Drop for Cairn {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::SIGTERM);
        let _ = self.child.wait();
        if std::env::var_os("CAIRN_BENCH_LOG").is_some() {
            eprint!("{}", std::fs::read_to_string(self.root.join("cairnd.log")).unwrap_or_default());
        }
        // The root stays until the end: mass deletions slow down the next run's file creation
        // (ext4 skips recently freed inodes), which would bias whichever tool runs next.
    }
}

/// A private Nix store (`local?root=DIR`), removed with the work directory at the end.
struct NixStore {
    root: PathBuf,
}

impl NixStore {
    fn new(work: &Path, tag: &str) -> NixStore {
        let root = work.join(format!("nix-{tag}"));
        rm_rf(&root);
        NixStore { root }
    }
    fn cmd(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.arg("--store").arg(format!("local?root={}", self.root.display()));
        c.env("NIX_CONFIG", "substituters =\nexperimental-features = nix-command\nbuild-users-group =\n");
        c.env_remove("NIX_REMOTE");
        c
    }
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

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A tree of `files` files totalling `mib` MiB in 64 directories, every seventh executable.
fn make_tree(dir: &Path, mib: u64, files: u64) -> Result<()> {
    let size = (mib << 20) / files;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
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

/// An export stream of `n` text paths; path i references up to three earlier ones (i-1, i/2,
/// 7i/10), so that the last path's closure is all of them. Returns the last path.
fn make_export_stream(file: &Path, n: u64) -> Result<String> {
    let dir = StoreDir::new("/nix/store")?;
    let mut out = BufWriter::new(std::fs::File::create(file)?);
    let mut paths: Vec<StorePath> = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut refs = std::collections::BTreeSet::new();
        if i > 0 {
            for j in [i - 1, i / 2, i * 7 / 10] {
                if j < i {
                    refs.insert(paths[j as usize].clone());
                }
            }
        }
        let mut contents = format!("path {i}\n").into_bytes();
        for r in &refs {
            contents.extend_from_slice(dir.display(r).as_bytes());
            contents.push(b'\n');
        }
        let p = dir.make_text_path(&format!("p{i}"), &Hash::digest(HashAlgo::Sha256, &contents), &refs)?;
        write_next_marker(&mut out)?;
        let mut nar = NarWriter::new(&mut out)?;
        nar.regular(None, false, contents.len() as u64, &mut &contents[..])?;
        nar.finish()?;
        write_trailer(
            &mut out,
            &ExportTrailer {
                path: dir.display(&p),
                references: refs.iter().map(|r| dir.display(r)).collect(),
                deriver: None,
            },
        )?;
        paths.push(p);
    }
    write_end_marker(&mut out)?;
    out.flush()?;
    Ok(dir.display(paths.last().context("no paths")?))
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

fn main() -> Result<()> {
    let o = parse_opts()?;
    if let Some(file) = &o.write_stream {
        println!("{}", make_export_stream(file, o.paths)?);
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

    // 1. add
    let tree = w.join("tree");
    make_tree(&tree, o.tree_mib, o.files)?;
    read_all(&tree)?;
    let (mut c_times, mut n_times, mut cp_times, mut rss) = (Vec::new(), Vec::new(), Vec::new(), 0f64);
    for rep in 0..o.reps {
        let c = Cairn::start(w, &format!("add{rep}"))?;
        let (cp, t) = timed(
            {
                let mut cmd = c.cmd();
                cmd.arg("add").arg(&tree);
                cmd
            },
            None,
        )?;
        rss = rss.max(c.peak_rss_mib()?);
        c_times.push(t);
        drop(c);
        if with_nix {
            let n = NixStore::new(w, &format!("add{rep}"));
            let (np, t) = timed(
                {
                    let mut cmd = n.cmd("nix-store");
                    cmd.arg("--add").arg(&tree);
                    cmd
                },
                None,
            )?;
            ensure!(np.trim() == cp.trim(), "cairn and nix disagree: {cp} vs {np}");
            n_times.push(t);
        }
        // The floor of any durable copy of the tree on this file system: `cp -r` then `sync`.
        let dest = w.join(format!("cp{rep}"));
        let mut cp = Command::new("sh");
        cp.arg("-c").arg(format!("cp -r '{}' '{}' && sync", tree.display(), dest.display()));
        cp_times.push(timed(cp, None)?.1);
        println!(
            "  add rep {}: cairn {} nix {} cp -r + sync {}",
            rep + 1,
            fmt_secs(*c_times.last().unwrap()),
            n_times.last().map(|t| fmt_secs(*t)).unwrap_or("-".into()),
            fmt_secs(*cp_times.last().unwrap())
        );
    }
    let c_add = median(&mut c_times);
    let cp_floor = median(&mut cp_times);
    let n_add = (!n_times.is_empty()).then(|| median(&mut n_times));

    // 2. import, 3. closure
    let stream = w.join("stream.export");
    let last = make_export_stream(&stream, o.paths)?;
    // Read once, so that both tools find the stream in the page cache.
    std::io::copy(&mut std::fs::File::open(&stream)?, &mut std::io::sink())?;
    let c = Cairn::start(w, "import")?;
    let (out, c_import) = timed(
        {
            let mut cmd = c.cmd();
            cmd.arg("import");
            cmd
        },
        Some(&stream),
    )?;
    ensure!(out.lines().count() as u64 == o.paths, "cairn imported {} paths", out.lines().count());
    // The first query after a daemon start (the graph loads in the background at start), then
    // warm queries.
    let mut c = c;
    c.restart()?;
    let closure_cmd = |c: &Cairn| {
        let mut cmd = c.cmd();
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
        let n = NixStore::new(w, "import");
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
    drop(c);
    // Removing the inputs and stores (several GiB) is not measured.
    rm_rf(w);

    println!();
    println!("{:<48} {:>12} {:>12} {:>10}", "workload", "cairn", "nix", "nix/cairn");
    let row = |name: String, c: f64, n: Option<f64>| {
        println!("{:<48} {:>12} {:>12} {:>10}", name, fmt_secs(c), n.map(fmt_secs).unwrap_or("-".into()), ratio(n, c));
    };
    row(format!("add {} MiB tree of {} files (median of {})", o.tree_mib, o.files, o.reps), c_add, n_add);
    println!("{:<48} {:>12}", "  cp -r + sync of the same tree (copy floor)", fmt_secs(cp_floor));
    println!("{:<48} {:>12}", "  cairnd peak RSS during add", format!("{rss:.1} MiB"));
    row(format!("import {} paths in one stream", o.paths), c_import, n_import);
    row(format!("closure in a {}-path graph, warm (median of 7)", o.paths), c_warm, n_closure);
    row(format!("closure in a {}-path graph, 1st after restart", o.paths), c_cold, n_closure);
    Ok(())
}
