//! Workload 11, soak and load: `--soak-clients` clients (64) against one cairnd for
//! `--soak-minutes` (10), each looping over a mix of what a busy daemon serves — `cairn add` of
//! small trees, `cairn import` of small export streams, `cairn closure` of a 2000-path graph (the
//! timed query), `cairn realise` of small derivations, `cairn gc`, image pulls (and untags) from a
//! local distribution registry, and `cairn log` of large build logs — while slow clients hold
//! connections the daemon must neither let grow its memory nor let hold its work:
//!
//! - two *log followers*, each starting realisations one after another whose builders print
//!   ~15 MB of log lines, and not reading the event stream (which carries the log) for 90 s;
//! - two *tricklers*, sending a registry request head to the `listen` address one byte every
//!   half second, again whenever the daemon closes the connection;
//! - two *stalled NAR downloads* (a 32 MiB path, on the socket) and two *stalled blob downloads*
//!   (a 32 MiB layer, from the registry on `listen`), each reading nothing for 90 s — longer than
//!   the default `send-timeout` — then reading what came, and starting again.
//!
//! Before the load, the closure query is timed unloaded; during it, cairnd's resident memory
//! (VmRSS, VmHWM), open descriptors and threads are sampled every two seconds; after it, the slow
//! clients close and the daemon gets ten seconds to settle before the last sample. The report
//! gives the operations done per kind, every error the mix does not explain (an untag of a tag
//! another client removed first is explained; anything else is not), the closure query's p50/p99
//! unloaded and under load, what became of the slow clients, and a verdict against the bounds
//! below. The daemon runs with its default limits and timeouts.
//!
//! The mix keeps its own work alive: what a client must find again is rooted (`add -o`,
//! `realise -o`, `add-root`) and the links go once it is done, so that `gc` has garbage to
//! collect; the only window between a path's making and its rooting (`derivation add`, then
//! `add-root`) is closed to `gc` by a lock in this process.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cairn_tests::Rng;

use crate::image::{free_port, layer, sha256_hex, skopeo, start_registry, wait_port, write_image};
use crate::{fmt_secs, make_export_stream, write_export_stream, Cairn, Opts, Table};

mod slow;

use slow::{log_follower, stalled_downloads, trickler};

/// The busybox bound at `/bin/sh` in the sandbox.
const BUSYBOX: &str = "/bin/busybox";
/// Paths in the graph the closure queries walk.
const BASE_PATHS: u64 = 2000;
/// Images in the registry the clients pull.
const IMAGES: u64 = 4;
/// Open descriptors cairnd may hold at the end beyond those it held at the start.
const FD_SLACK: u64 = 16;
/// Resident memory cairnd may hold at the end beyond what it held at the start and what its
/// store's caches grew by (SQLite's page cache, bounded by its limit; the reference graph), in
/// MiB. The caches are what a long-running daemon is meant to keep; anything else that grows is
/// memory the load left behind.
const RSS_SLACK_MIB: f64 = 32.0;
/// Log lines of the log followers' builds (~15 MB).
const CHATTY_LINES: usize = 250_000;
/// The longest any one command of the mix may take before it counts as stalled (and is killed).
const OP_LIMIT: Duration = Duration::from_secs(180);

/// What a command of the mix came to.
enum Outcome {
    Ok,
    /// A failure the mix itself explains (another client's doing).
    Explained,
    Unexpected(String),
}

#[derive(Default)]
struct Kind {
    ok: u64,
    explained: u64,
    unexpected: u64,
    secs: Vec<f64>,
}

/// What the clients share.
struct Mix {
    cairn: PathBuf,
    store_args: Vec<String>,
    /// The root of the graph the closure queries walk, and its closure's size.
    top: String,
    registry: String,
    deadline: Instant,
    /// Held (shared) between making a path and rooting it; `gc` takes it exclusively.
    gc: RwLock<()>,
    kinds: Mutex<BTreeMap<&'static str, Kind>>,
    errors: Mutex<Vec<String>>,
    /// The chatty derivations the log followers built (rooted until the end), whose ~15 MB logs
    /// clients read with `cairn log`.
    chatty: Mutex<Vec<String>>,
}

impl Mix {
    fn cairn(&self) -> Command {
        let mut c = Command::new(&self.cairn);
        c.args(&self.store_args).arg("--no-auto-start");
        c
    }

    /// What the daemon's store caches hold (`cairn daemon status --json`): SQLite's page cache
    /// and its limit in bytes, and the graph's paths and rows.
    fn store_memory(&self) -> Result<[u64; 4]> {
        let mut c = self.cairn();
        c.args(["daemon", "status", "--json"]);
        let out = c.output().context("cairn daemon status")?;
        ensure!(out.status.success(), "cairn daemon status: {}", String::from_utf8_lossy(&out.stderr).trim());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let m = &v["memory"];
        let get = |k: &str| m[k].as_u64().with_context(|| format!("no memory.{k} in cairn daemon status"));
        Ok([get("pageCacheBytes")?, get("pageCacheLimit")?, get("graphPaths")?, get("graphRows")?])
    }

    fn record(&self, kind: &'static str, outcome: Outcome, secs: f64) {
        let mut kinds = self.kinds.lock().unwrap();
        let k = kinds.entry(kind).or_default();
        match outcome {
            Outcome::Ok => {
                k.ok += 1;
                k.secs.push(secs);
            }
            Outcome::Explained => k.explained += 1,
            Outcome::Unexpected(m) => {
                k.unexpected += 1;
                let mut errors = self.errors.lock().unwrap();
                if errors.len() < 20 {
                    errors.push(format!("{kind}: {}", m.trim()));
                }
            }
        }
    }

    /// Runs a command of the mix, recording its outcome: `judge` decides on its stdout.
    fn op(
        &self,
        kind: &'static str,
        c: Command,
        stdin: Option<&Path>,
        judge: impl FnOnce(&str) -> Result<(), String>,
    ) -> Option<String> {
        let (r, secs) = exec(c, stdin, OP_LIMIT);
        match r {
            Ok(out) => match judge(&out) {
                Ok(()) => {
                    self.record(kind, Outcome::Ok, secs);
                    Some(out)
                }
                Err(m) => {
                    self.record(kind, Outcome::Unexpected(m), secs);
                    None
                }
            },
            Err(e) => {
                self.record(kind, Outcome::Unexpected(e), secs);
                None
            }
        }
    }
}

/// Runs `c` (stdin from a file, or none), killing it after `limit`; returns its stdout or a
/// one-line description of its failure, and the seconds it took.
fn exec(mut c: Command, stdin: Option<&Path>, limit: Duration) -> (Result<String, String>, f64) {
    let input = match stdin {
        Some(f) => match std::fs::File::open(f) {
            Ok(f) => Stdio::from(f),
            Err(e) => return (Err(format!("cannot open {}: {e}", f.display())), 0.0),
        },
        None => Stdio::null(),
    };
    c.stdin(input).stdout(Stdio::piped()).stderr(Stdio::piped());
    let t = Instant::now();
    let child = match c.spawn() {
        Ok(c) => c,
        Err(e) => return (Err(format!("cannot start cairn: {e}")), 0.0),
    };
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(limit) {
        Ok(o) => o,
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = rx.recv();
            return (Err(format!("no answer within {limit:?} (killed)")), t.elapsed().as_secs_f64());
        }
    };
    let secs = t.elapsed().as_secs_f64();
    match out {
        Ok(o) if o.status.success() => (Ok(String::from_utf8_lossy(&o.stdout).into_owned()), secs),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            (Err(format!("{} ({})", err.trim().lines().last().unwrap_or(""), o.status)), secs)
        }
        Err(e) => (Err(format!("cannot wait for cairn: {e}")), secs),
    }
}

fn lines(n: usize) -> impl FnOnce(&str) -> Result<(), String> {
    move |out: &str| {
        let got = out.lines().filter(|l| !l.is_empty()).count();
        if got == n {
            Ok(())
        } else {
            Err(format!("printed {got} lines, {n} expected: {:?}", out.chars().take(200).collect::<String>()))
        }
    }
}

/// A derivation's JSON (as `cairn derivation add` reads it): `script` run by `/bin/sh -c`.
fn drv_json(name: &str, script: &str) -> String {
    serde_json::json!({
        "outputs": { "out": { "path": "" } },
        "inputSrcs": [],
        "inputDrvs": {},
        "system": "x86_64-linux",
        "builder": "/bin/sh",
        "args": ["-c", script],
        "env": { "name": name, "builder": "/bin/sh", "system": "x86_64-linux", "out": "" },
    })
    .to_string()
}

/// One client: the mix, until the deadline.
fn client(mix: &Mix, id: u64, dir: &Path) {
    let _ = std::fs::create_dir_all(dir);
    let mut rng = Rng::new(1000 + id);
    let mut n = 0u64;
    while Instant::now() < mix.deadline {
        n += 1;
        match rng.below(100) {
            0..=34 => {
                let mut c = mix.cairn();
                c.arg("closure").arg(&mix.top);
                mix.op("closure", c, None, lines(BASE_PATHS as usize));
            }
            35..=54 => {
                let tree = dir.join("tree");
                let _ = std::fs::remove_dir_all(&tree);
                let made = (0..3).try_for_each(|f| {
                    let d = tree.join(format!("d{f}"));
                    std::fs::create_dir_all(&d)?;
                    let len = 100 + rng.below(4000) as usize;
                    std::fs::write(d.join("file"), rng.bytes(len))
                });
                if let Err(e) = made {
                    mix.record("add", Outcome::Unexpected(format!("cannot write the tree: {e}")), 0.0);
                    continue;
                }
                let link = dir.join("add-root");
                let _ = std::fs::remove_file(&link);
                let mut c = mix.cairn();
                c.arg("add").arg("-o").arg(&link).arg(&tree);
                mix.op("add", c, None, lines(1));
                let _ = std::fs::remove_file(&link);
            }
            55..=69 => {
                let file = dir.join("import.export");
                let refs: Vec<Vec<u32>> = (0..8u32).map(|i| if i == 0 { vec![] } else { vec![i - 1] }).collect();
                if let Err(e) = write_export_stream(&file, &format!("soak{id}x{n}-"), &refs) {
                    mix.record("import", Outcome::Unexpected(format!("cannot write the stream: {e}")), 0.0);
                    continue;
                }
                let mut c = mix.cairn();
                c.arg("import");
                mix.op("import", c, Some(&file), lines(8));
            }
            70..=79 => realise(mix, dir, &format!("soak-{id}-{n}"), "echo building; echo $name > $out"),
            80..=95 => {
                let k = rng.below(IMAGES);
                let mut c = mix.cairn();
                c.args(["image", "pull", "--tls-verify=false", "--tag", &format!("soak/p{k}:v1")]);
                c.arg(format!("{}/soak/img:v{k}", mix.registry));
                mix.op("image pull", c, None, |_| Ok(()));
            }
            96..=97 => {
                let k = rng.below(IMAGES);
                let mut c = mix.cairn();
                c.args(["image", "untag", &format!("soak/p{k}:v1")]);
                let (r, secs) = exec(c, None, OP_LIMIT);
                let outcome = match r {
                    Ok(_) => Outcome::Ok,
                    // Another client untagged it first, or it was never pulled yet.
                    Err(e) if e.contains("no image") || e.contains("not found") || e.contains("no tag") => {
                        Outcome::Explained
                    }
                    Err(e) => Outcome::Unexpected(e),
                };
                mix.record("image untag", outcome, secs);
            }
            98 if !mix.chatty.lock().unwrap().is_empty() => {
                let chatty = mix.chatty.lock().unwrap().clone();
                let drv = &chatty[rng.below(chatty.len() as u64) as usize];
                let mut c = mix.cairn();
                c.arg("log").arg(drv);
                mix.op("log (15 MB)", c, None, |out| {
                    if out.lines().count() >= CHATTY_LINES {
                        Ok(())
                    } else {
                        Err(format!("the log has {} lines", out.lines().count()))
                    }
                });
            }
            _ => {
                let _exclusive = mix.gc.write().unwrap();
                let mut c = mix.cairn();
                c.arg("gc");
                mix.op("gc", c, None, |out| {
                    if out.contains("deleted") {
                        Ok(())
                    } else {
                        Err(format!("no summary: {out:?}"))
                    }
                });
            }
        }
    }
}

/// Writes a derivation running `script`, roots it, realises it (rooting its output) and lets
/// both roots go.
fn realise(mix: &Mix, dir: &Path, name: &str, script: &str) {
    let Some(drv) = add_rooted_drv(mix, dir, name, script) else { return };
    let out_link = dir.join("out-root");
    let _ = std::fs::remove_file(&out_link);
    let mut c = mix.cairn();
    c.args(["realise", "-Q", "-o"]).arg(&out_link).arg(&drv);
    mix.op("realise", c, None, lines(1));
    let _ = std::fs::remove_file(&out_link);
    let _ = std::fs::remove_file(dir.join("drv-root"));
}

/// `cairn derivation add` and `cairn add-root` with no `gc` between them; the `.drv`, rooted
/// by `dir/drv-root`.
fn add_rooted_drv(mix: &Mix, dir: &Path, name: &str, script: &str) -> Option<String> {
    let file = dir.join("drv.json");
    if let Err(e) = std::fs::write(&file, drv_json(name, script)) {
        mix.record("realise", Outcome::Unexpected(format!("cannot write the derivation: {e}")), 0.0);
        return None;
    }
    let _shared = mix.gc.read().unwrap();
    let mut c = mix.cairn();
    c.args(["derivation", "add"]).arg(&file);
    let drv = mix.op("derivation add", c, None, lines(1))?.trim().to_owned();
    let link = dir.join("drv-root");
    let _ = std::fs::remove_file(&link);
    let mut c = mix.cairn();
    c.arg("add-root").arg(&link).arg(&drv);
    mix.op("add-root", c, None, |_| Ok(()))?;
    Some(drv)
}

/// One sample of cairnd: resident and peak memory (KiB), open descriptors, threads.
#[derive(Clone, Copy, Default)]
struct Sample {
    secs: f64,
    rss_kib: u64,
    /// Of the resident memory: anonymous (heap, stacks) and file-backed (the binary's pages).
    anon_kib: u64,
    file_kib: u64,
    hwm_kib: u64,
    fds: u64,
    threads: u64,
}

fn sample(pid: u32, since: Instant) -> Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let v = status.lines().find_map(|l| l.strip_prefix(name)).with_context(|| format!("no {name}"))?;
        Ok(v.trim().trim_end_matches("kB").trim().parse()?)
    };
    Ok(Sample {
        secs: since.elapsed().as_secs_f64(),
        rss_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:")?,
        file_kib: field("RssFile:")?,
        hwm_kib: field("VmHWM:")?,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64,
        threads: field("Threads:")?,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The `p`-quantile (0–1) of `v`, sorted here.
fn quantile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// What a slow client saw.
struct SlowReport {
    what: String,
    result: String,
}

pub fn bench_soak(o: &Opts, w: &Path, table: &mut Table) -> Result<()> {
    for tool in ["docker-registry", "skopeo"] {
        ensure!(crate::have(tool), "the soak workload needs {tool} (Debian packages docker-registry, skopeo)");
    }
    ensure!(Path::new(BUSYBOX).exists(), "the soak workload needs {BUSYBOX} (Debian busybox-static)");
    let minutes = o.soak_minutes;
    let clients = o.soak_clients;
    let w = &w.join("soak");
    std::fs::create_dir_all(w)?;

    // The registry: IMAGES small images sharing a layer, and one with a 32 MiB layer for the
    // stalled blob download.
    println!("soak: setting up (registry, images, cairnd, a {BASE_PATHS}-path graph) …");
    let reg = start_registry(w)?;
    let registry = format!("127.0.0.1:{}", reg.port);
    let src = w.join("images");
    let shared = layer(1, 100)?;
    for k in 0..IMAGES {
        let own = layer(1, 101 + k)?;
        write_image(&src, &format!("v{k}"), &[&shared, &own])?;
        crate::image::run(&mut skopeo(
            &format!("oci:{}:v{k}", src.display()),
            &format!("docker://{registry}/soak/img:v{k}"),
        ))?;
    }
    let big_layer = layer(32, 200)?;
    let big_digest = format!("sha256:{}", sha256_hex(&big_layer));
    write_image(&src, "big", &[&big_layer])?;
    crate::image::run(&mut skopeo(&format!("oci:{}:big", src.display()), &format!("docker://{registry}/soak/big:v1")))?;
    let big_blob_len = big_layer.len() as u64;
    drop(big_layer);

    // cairnd, serving a registry and a binary cache on `listen`, building in its sandbox; its
    // limits and timeouts are the defaults.
    let listen = free_port()?;
    let c = Cairn::start_configured(
        w,
        "cairn-soak-",
        &format!("listen = \"127.0.0.1:{listen}\"\nsandbox-paths = [\"/bin/sh={BUSYBOX}\"]\nmax-jobs = 2\ncores = 1\n"),
    )?;
    wait_port(listen)?;
    let roots = w.join("roots");
    std::fs::create_dir_all(&roots)?;
    let ok = |mut cmd: Command| -> Result<String> {
        let out = cmd.output()?;
        ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let stream = w.join("base.export");
    let top = make_export_stream(&stream, BASE_PATHS)?;
    let mut import = c.cairn();
    import.arg("import").stdin(std::fs::File::open(&stream)?);
    ok(import)?;
    let mut root = c.cairn();
    root.arg("add-root").arg(roots.join("base")).arg(&top);
    ok(root)?;
    // The 32 MiB path of the stalled NAR downloads.
    let big_file = w.join("big.bin");
    std::fs::write(&big_file, Rng::new(300).bytes(32 << 20))?;
    let mut add = c.cairn();
    add.arg("add").arg("-o").arg(roots.join("big")).arg(&big_file);
    let big_path = ok(add)?.trim().to_owned();
    // The big image, served by cairnd's registry under soak/big:v1.
    let mut pull = c.cairn();
    pull.args(["image", "pull", "--tls-verify=false", "--tag", "soak/big:v1"]);
    pull.arg(format!("docker://{registry}/soak/big:v1"));
    ok(pull)?;

    let mut store_args = c.store_args();
    store_args.shrink_to_fit();
    let mix = Mix {
        cairn: cairn_tests::bin_dir().join("cairn"),
        store_args,
        top,
        registry: format!("docker://{registry}"),
        deadline: Instant::now(),
        gc: RwLock::new(()),
        kinds: Mutex::new(BTreeMap::new()),
        errors: Mutex::new(Vec::new()),
        chatty: Mutex::new(Vec::new()),
    };

    // Unloaded: the closure query alone, 100 times.
    let mut unloaded = Vec::new();
    for _ in 0..100 {
        let mut q = mix.cairn();
        q.arg("closure").arg(&mix.top);
        let (r, secs) = exec(q, None, OP_LIMIT);
        let out = r.map_err(anyhow::Error::msg)?;
        ensure!(out.lines().count() as u64 == BASE_PATHS, "closure printed {} paths", out.lines().count());
        unloaded.push(secs);
    }
    let (u50, u99) = (quantile(&mut unloaded, 0.5), quantile(&mut unloaded, 0.99));
    println!("soak: unloaded closure of {BASE_PATHS} paths: p50 {} p99 {}", fmt_secs(u50), fmt_secs(u99));

    // The load.
    let pid = c.pid();
    let t0 = Instant::now();
    let start_sample = sample(pid, t0)?;
    let start_memory = mix.store_memory()?;
    let mix = Mix { deadline: t0 + Duration::from_secs_f64(minutes * 60.0), ..mix };
    let samples = Mutex::new(vec![start_sample]);
    let slow: Mutex<Vec<SlowReport>> = Mutex::new(Vec::new());
    let load_done = std::sync::atomic::AtomicBool::new(false);
    println!(
        "soak: {clients} clients for {minutes} min; cairnd at start: RSS {:.1} MiB, {} fds, {} threads",
        mib(start_sample.rss_kib),
        start_sample.fds,
        start_sample.threads
    );
    std::thread::scope(|s| {
        // Samples every two seconds, and a line each minute.
        s.spawn(|| {
            let mut next_line = 60.0;
            while !load_done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(2));
                let Ok(x) = sample(pid, t0) else { continue };
                samples.lock().unwrap().push(x);
                if x.secs >= next_line {
                    next_line += 60.0;
                    let done: u64 = mix.kinds.lock().unwrap().values().map(|k| k.ok + k.explained + k.unexpected).sum();
                    println!(
                        "soak: {:>4.0} s: {done} ops; cairnd RSS {:.1} MiB (peak {:.1}), {} fds, {} threads",
                        x.secs,
                        mib(x.rss_kib),
                        mib(x.hwm_kib),
                        x.fds,
                        x.threads
                    );
                }
            }
        });
        let mix = &mix;
        let workers: Vec<_> = (0..clients)
            .map(|id| {
                let dir = w.join(format!("client-{id}"));
                s.spawn(move || client(mix, id, &dir))
            })
            .collect();
        // The slow clients, once the load is under way; each holds on until the deadline.
        std::thread::sleep(Duration::from_secs(5).min(mix.deadline.saturating_duration_since(Instant::now())));
        let slow = &slow;
        let report = move |what: String, result: String| slow.lock().unwrap().push(SlowReport { what, result });
        for i in 0..2 {
            let (socket, dir) = (c.socket.clone(), w.join(format!("follower-{i}")));
            s.spawn(move || {
                let r = log_follower(mix, &socket, &dir, &format!("soak-chatty-{i}"), mix.deadline);
                report(format!("log follower {i} (never reads)"), r);
            });
            s.spawn(move || report(format!("trickler {i} (head byte by byte)"), trickler(listen, mix.deadline)));
            let (socket, nar) = (c.socket.clone(), big_path.clone());
            s.spawn(move || {
                let req = format!("GET /v1/nar?path={nar} HTTP/1.1\r\nHost: cairnd\r\n\r\n");
                let connect = || {
                    let u = UnixStream::connect(&socket)?;
                    u.set_read_timeout(Some(Duration::from_secs(5)))?;
                    Ok((u, None))
                };
                let r = stalled_downloads(connect, &req, mix.deadline, 32 << 20);
                report(format!("NAR download {i} (never reads)"), r);
            });
            let digest = big_digest.clone();
            s.spawn(move || {
                let req = format!("GET /v2/soak/big/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1:{listen}\r\n\r\n");
                let connect = || {
                    let t = TcpStream::connect(("127.0.0.1", listen))?;
                    t.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let port = t.local_addr()?.port();
                    Ok((t, Some(port)))
                };
                let r = stalled_downloads(connect, &req, mix.deadline, big_blob_len);
                report(format!("blob download {i} (never reads)"), r);
            });
        }
        for h in workers {
            let _ = h.join();
        }
        load_done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let load_secs = t0.elapsed().as_secs_f64();
    // Every client and slow connection is gone; the daemon settles.
    std::thread::sleep(Duration::from_secs(10));
    let end = sample(pid, t0)?;
    let end_memory = mix.store_memory()?;
    let samples = samples.into_inner().unwrap();
    let max = |f: fn(&Sample) -> u64| samples.iter().chain([&end]).map(f).max().unwrap_or(0);

    // The report.
    let kinds = mix.kinds.into_inner().unwrap();
    let errors = mix.errors.into_inner().unwrap();
    println!();
    println!(
        "soak: {clients} clients, {:.1} min of load against one cairnd (closure graph {BASE_PATHS} paths, {IMAGES} images)",
        load_secs / 60.0
    );
    println!("  {:<16} {:>8} {:>10} {:>11} {:>10} {:>10}", "operation", "ok", "explained", "unexpected", "p50", "p99");
    let mut unexpected = 0;
    let mut loaded = (f64::NAN, f64::NAN);
    for (name, k) in kinds {
        let mut secs = k.secs;
        let (p50, p99) = (quantile(&mut secs, 0.5), quantile(&mut secs, 0.99));
        if name == "closure" {
            loaded = (p50, p99);
        }
        unexpected += k.unexpected;
        println!(
            "  {:<16} {:>8} {:>10} {:>11} {:>10} {:>10}",
            name,
            k.ok,
            k.explained,
            k.unexpected,
            fmt_secs(p50),
            fmt_secs(p99)
        );
    }
    println!(
        "  closure query p50/p99: unloaded {} / {}, under load {} / {}",
        fmt_secs(u50),
        fmt_secs(u99),
        fmt_secs(loaded.0),
        fmt_secs(loaded.1)
    );
    println!("  unexpected errors: {unexpected}");
    for e in errors.iter().take(10) {
        println!("    {e}");
    }
    println!("  slow clients:");
    let mut slow = slow.into_inner().unwrap();
    slow.sort_by(|a, b| a.what.cmp(&b.what));
    for r in &slow {
        println!("    {:<34} {}", r.what, r.result);
    }
    println!("  cairnd {:<16} {:>10} {:>10} {:>10}", "", "start", "end", "max");
    println!(
        "  {:<23} {:>10.1} {:>10.1} {:>10.1}",
        "RSS (MiB)",
        mib(start_sample.rss_kib),
        mib(end.rss_kib),
        mib(max(|s| s.rss_kib))
    );
    for (name, f) in [
        ("  anonymous (MiB)", (|s: &Sample| s.anon_kib) as fn(&Sample) -> u64),
        ("  file-backed (MiB)", |s| s.file_kib),
    ] {
        println!("  {:<23} {:>10.1} {:>10.1} {:>10.1}", name, mib(f(&start_sample)), mib(f(&end)), mib(max(f)));
    }
    println!(
        "  {:<23} {:>10.1} {:>10.1} {:>10}",
        "peak RSS, VmHWM (MiB)",
        mib(start_sample.hwm_kib),
        mib(end.hwm_kib),
        ""
    );
    println!("  {:<23} {:>10} {:>10} {:>10}", "open fds", start_sample.fds, end.fds, max(|s| s.fds));
    println!("  {:<23} {:>10} {:>10} {:>10}", "threads", start_sample.threads, end.threads, max(|s| s.threads));
    let bytes_mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "  {:<23} {:>10.1} {:>10.1} {:>10} (limit {:.0} MiB)",
        "SQLite page cache (MiB)",
        bytes_mib(start_memory[0]),
        bytes_mib(end_memory[0]),
        "",
        bytes_mib(end_memory[1])
    );
    println!(
        "  {:<23} {:>10} {:>10}",
        "graph paths / rows",
        format!("{} / {}", start_memory[2], start_memory[3]),
        format!("{} / {}", end_memory[2], end_memory[3])
    );
    let cache_growth = bytes_mib(end_memory[0].saturating_sub(start_memory[0]));
    let fds_ok = end.fds <= start_sample.fds + FD_SLACK;
    let rss_bound = mib(start_sample.rss_kib) + cache_growth + RSS_SLACK_MIB;
    let rss_ok = mib(end.rss_kib) <= rss_bound;
    let verdict = |ok: bool| if ok { "ok" } else { "EXCEEDED" };
    println!("  bounds (10 s after the load and the slow clients stopped):");
    println!("    fds end <= start + {FD_SLACK}: {} <= {}: {}", end.fds, start_sample.fds + FD_SLACK, verdict(fds_ok));
    println!(
        "    RSS end <= start + page cache growth + {RSS_SLACK_MIB} MiB: {:.1} <= {:.1} + {:.1} + {RSS_SLACK_MIB} = {:.1} MiB: {}",
        mib(end.rss_kib),
        mib(start_sample.rss_kib),
        cache_growth,
        rss_bound,
        verdict(rss_ok)
    );
    println!("    unexpected errors = 0: {}", verdict(unexpected == 0));
    let pass = fds_ok && rss_ok && unexpected == 0;
    println!("  verdict: {}", if pass { "PASS" } else { "FAIL" });

    table.note("soak: closure p50 / p99 unloaded", format!("{} / {}", fmt_secs(u50), fmt_secs(u99)));
    table.note(
        &format!("soak: closure p50 / p99, {clients} clients"),
        format!("{} / {}", fmt_secs(loaded.0), fmt_secs(loaded.1)),
    );
    table.note(
        "soak: cairnd RSS start / end / max",
        format!("{:.0} / {:.0} / {:.0} MiB", mib(start_sample.rss_kib), mib(end.rss_kib), mib(max(|s| s.rss_kib))),
    );
    table
        .note("soak: cairnd fds start / end / max", format!("{} / {} / {}", start_sample.fds, end.fds, max(|s| s.fds)));
    table.footer.push(format!(
        "soak: {} ({unexpected} unexpected errors; fds end <= start + {FD_SLACK}, RSS end <= start + page cache growth + {RSS_SLACK_MIB} MiB)",
        if pass { "PASS" } else { "FAIL" }
    ));
    drop(c);
    drop(reg);
    Ok(())
}
