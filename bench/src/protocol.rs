//! Workload `nix-daemon`: the same Nix 2.8 client against a real `nix-daemon` and against
//! cairnd's `nix-daemon-socket`, each on a store of its own (logical `/nix/store` under a
//! private root, the client told the root with `?root=`):
//!
//! - `nix-store -qR` of a path whose closure is 10k paths, in a graph of `--paths` (100k)
//!   paths: ten chains of 10k, each path of a chain also referring to its twin in the chain
//!   before, loaded into both stores untimed (`nix-store --import` into the local store the
//!   nix-daemon then serves, `cairn import` into cairnd);
//! - the cost of one connection: connect, handshake, `SetOptions`, one `IsValidPath`, through
//!   `cairn-worker`'s client (the same bytes Nix's client sends), averaged over 500;
//! - `nix copy --to unix://…` from a local Nix store of 1000 small paths, and of one 1 GiB path
//!   (`--tree-mib`; half random, half text), into a fresh daemon each time; beside the large
//!   one, the floor: a plain copy of the file plus `sync`, and one SHA-256 pass over it;
//! - `nix-build` of the 200-derivation fan-out (`nix/tests/fanout.nix`) through the daemon,
//!   instantiation included, both daemons sandboxed with a static busybox as `/bin/sh`,
//!   `max-jobs = 2`, `cores = 1` (the client asks for the same).

use std::io::{BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use cairn_tests::Rng;

use crate::{children_cpu, median, nix_store, rm_rf, timed, write_export_stream, Cairn, Opts, Table};

pub(crate) const BUSYBOX: &str = "/bin/busybox";
pub(crate) const DAEMON_CONF: &str =
    "build-users-group =\nsubstituters =\nsandbox = true\nsandbox-paths = /bin/sh=/bin/busybox\n\
                           max-jobs = 2\ncores = 1\nexperimental-features = nix-command\n";
pub(crate) const CAIRN_CONF: &str = "sandbox-paths = [\"/bin/sh=/bin/busybox\"]\nmax-jobs = 2\ncores = 1\n";
/// What the client asks every daemon for (its `SetOptions`).
pub(crate) const CLIENT_CONF: &str =
    "substituters =\nexperimental-features = nix-command\nbuild-users-group =\nmax-jobs = 2\ncores = 1\n";

/// A real nix-daemon serving the local store at `root`.
pub(crate) struct NixDaemon {
    root: PathBuf,
    state: PathBuf,
    child: Child,
}

impl NixDaemon {
    pub(crate) fn start(root: &Path) -> Result<NixDaemon> {
        let state = root.with_extension("daemon-state");
        rm_rf(&state);
        std::fs::create_dir_all(state.join("conf"))?;
        std::fs::write(state.join("conf/nix.conf"), DAEMON_CONF)?;
        let child = Command::new("nix-daemon")
            .arg("--store")
            .arg(format!("local?root={}", root.display()))
            .env("NIX_CONF_DIR", state.join("conf"))
            .env("NIX_STATE_DIR", &state)
            .env_remove("NIX_REMOTE")
            .env_remove("NIX_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(state.join("daemon.log"))?)
            .spawn()
            .context("start nix-daemon")?;
        let d = NixDaemon { root: root.to_owned(), state, child };
        let t = Instant::now();
        while UnixStream::connect(d.socket()).is_err() {
            ensure!(t.elapsed() < Duration::from_secs(30), "nix-daemon did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(d)
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.state.join("daemon-socket/socket")
    }

    pub(crate) fn url(&self) -> String {
        format!("unix://{}?root={}", self.socket().display(), self.root.display())
    }
}

impl Drop for NixDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cairn_socket(c: &Cairn) -> PathBuf {
    c.root.path().join("nix-socket")
}

pub(crate) fn cairn_url(c: &Cairn) -> String {
    format!("unix://{}?root={}", cairn_socket(c).display(), c.root.path().display())
}

/// A Nix client command on the store at `url`.
pub(crate) fn client(w: &Path, url: &str, tool: &str) -> Command {
    let conf = w.join("client-conf");
    let _ = std::fs::create_dir_all(&conf);
    let _ = std::fs::write(conf.join("nix.conf"), CLIENT_CONF);
    let mut c = Command::new(tool);
    c.env("NIX_REMOTE", url)
        .env("NIX_CONF_DIR", &conf)
        .env("NIX_STATE_DIR", w.join("client-state"))
        .env("HOME", w)
        .env_remove("NIX_CONFIG");
    c
}

/// The ten chains: path i refers to i-1 in its chain and to i-10000 in the chain before.
fn chains(n: u64) -> Vec<Vec<u32>> {
    (0..n as u32)
        .map(|i| {
            let mut r = Vec::new();
            if i % 10_000 != 0 {
                r.push(i - 1);
            }
            if i >= 10_000 {
                r.push(i - 10_000);
            }
            r
        })
        .collect()
}

pub fn bench_nix_daemon(o: &Opts, w: &Path, with_nix: bool, table: &mut Table) -> Result<()> {
    ensure!(with_nix, "the nix-daemon workload needs Nix 2.8 (nix-bin)");
    ensure!(Path::new(BUSYBOX).exists(), "the nix-daemon workload needs {BUSYBOX} (busybox-static)");
    table.section("nix-daemon");
    closure_queries(o, w, table)?;
    copies(o, w, table)?;
    fanout_build(o, w, table)?;
    table.footer.push(
        "nix-daemon: the same Nix 2.8 client against nix-daemon 2.8 and against cairnd's nix-daemon-socket, \
         each on its own private store; output paths compared"
            .into(),
    );
    Ok(())
}

/// `nix-store -qR` of a 10k closure in the big graph, and the cost of one connection.
fn closure_queries(o: &Opts, w: &Path, table: &mut Table) -> Result<()> {
    let n = o.paths.max(10_000);
    let stream = w.join("chains.export");
    let paths = write_export_stream(&stream, "q", &chains(n))?;
    let top = paths[9_999].clone();

    let nix_store = nix_store(w, "proto-q");
    timed(
        {
            let mut c = nix_store.cmd("nix-store");
            c.arg("--import").stdout(Stdio::null());
            c
        },
        Some(&stream),
    )?;
    let nixd = NixDaemon::start(nix_store.root.path())?;
    let cairn = Cairn::start_configured(w, "cairn-proto-q-", CAIRN_CONF)?;
    timed(
        {
            let mut c = cairn.cairn();
            c.arg("import").stdout(Stdio::null());
            c
        },
        Some(&stream),
    )?;
    let (mut c_times, mut n_times) = (Vec::new(), Vec::new());
    let mut answers = Vec::new();
    // The client's own CPU time (user + system) through cairnd: whatever the daemon, the
    // command cannot take less wall time than that.
    let mut client_cpu = Vec::new();
    // The first query of each loads whatever it caches; all are timed, the median reported.
    for _ in 0..o.reps.max(3) {
        let before = children_cpu()?;
        let (out, secs) = timed(with(client(w, &cairn_url(&cairn), "nix-store"), &["-qR", &top]), None)?;
        client_cpu.push(children_cpu()? - before);
        c_times.push(secs);
        answers.push(out);
        let (out, secs) = timed(with(client(w, &nixd.url(), "nix-store"), &["-qR", &top]), None)?;
        n_times.push(secs);
        answers.push(out);
    }
    ensure!(answers.windows(2).all(|a| a[0] == a[1]), "nix-store -qR answers differ");
    ensure!(answers[0].lines().count() == 10_000, "the closure has {} paths", answers[0].lines().count());
    let per = |socket: &Path| -> Result<f64> {
        const N: usize = 500;
        let t = Instant::now();
        for _ in 0..N {
            connect_and_ask(socket, &top)?;
        }
        Ok(t.elapsed().as_secs_f64() / N as f64)
    };
    let (c, nx) = (per(&cairn_socket(&cairn))?, per(&nixd.socket())?);
    table.time(format!("nix-store -qR (10k of {n} paths)"), median(&mut c_times), Some(median(&mut n_times)));
    // The floor: the same client reading the store's database itself, no daemon, no round
    // trips (after the daemon has gone, so that nothing else holds the store).
    drop(nixd);
    let mut floor = Vec::new();
    for _ in 0..o.reps.max(3) {
        floor.push(timed(with(nix_store.cmd("nix-store"), &["-qR", &top]), None)?.1);
    }
    table.note("  floor: the same client on the local store", crate::fmt_secs(median(&mut floor)));
    table.note("  floor: the client's own CPU time through cairnd", crate::fmt_secs(median(&mut client_cpu)));
    table.time("connection: handshake+SetOptions+IsValidPath".into(), c, Some(nx));
    Ok(())
}

pub(crate) fn with(mut c: Command, args: &[&str]) -> Command {
    c.args(args);
    c
}

/// One client connection as Nix's opens it, asking one question.
fn connect_and_ask(socket: &Path, path: &str) -> Result<()> {
    use cairn_worker::*;
    let s = UnixStream::connect(socket)?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = BufWriter::new(s);
    let limits = Limits::default();
    let hello = ClientHello { version: ProtocolVersion::NIX_2_8, features: Default::default() };
    let session = client_handshake(&mut Duplex { r: &mut r, w: &mut w }, &hello, &limits)?;
    let v = session.version;
    read_until_last(&mut r, v, &limits, |_| Ok(()))?.map_err(|e| anyhow::anyhow!(e.message))?;
    let proto = Proto::new(v, cairn_nix::StoreDir::new("/nix/store")?);
    Request::SetOptions(ClientOptions::default()).write(&mut w, &proto)?;
    w.flush()?;
    read_until_last(&mut r, v, &limits, |_| Ok(()))?.map_err(|e| anyhow::anyhow!(e.message))?;
    let p = proto.store_dir.parse(path)?;
    Request::IsValidPath(p).write(&mut w, &proto)?;
    w.flush()?;
    read_until_last(&mut r, v, &limits, |_| Ok(()))?.map_err(|e| anyhow::anyhow!(e.message))?;
    let Response::Bool(true) = Response::read(WorkerOp::IsValidPath, &mut r, &proto)? else {
        anyhow::bail!("{path} is not valid through {}", socket.display())
    };
    Ok(())
}

/// `nix copy --to` each daemon from a local Nix store: 1000 small paths, then one large one.
fn copies(o: &Opts, w: &Path, table: &mut Table) -> Result<()> {
    // The small paths: a stream of 1000 with references, imported into a local store.
    let small = nix_store(w, "proto-src-small");
    let stream = w.join("small.export");
    let refs: Vec<Vec<u32>> =
        (0..1000u32).map(|i| [i.wrapping_sub(1), i / 2].into_iter().filter(|&j| j < i).collect()).collect();
    let small_paths = write_export_stream(&stream, "s", &refs)?;
    timed(
        {
            let mut c = small.cmd("nix-store");
            c.arg("--import").stdout(Stdio::null());
            c
        },
        Some(&stream),
    )?;
    // The large path: half random, half text.
    let big_file = w.join("big.bin");
    {
        let bytes = o.tree_mib << 20;
        let mut f = BufWriter::new(std::fs::File::create(&big_file)?);
        let mut rng = Rng::new(5);
        let mut chunk = vec![0u8; 1 << 20];
        for i in 0..(bytes >> 20) {
            if i % 2 == 0 {
                rng.fill(&mut chunk);
            } else {
                chunk.iter_mut().enumerate().for_each(|(j, b)| *b = b"cairn and nix, side by side\n"[j % 28]);
            }
            f.write_all(&chunk)?;
        }
        f.flush()?;
    }
    let big = nix_store(w, "proto-src-big");
    let (big_path, _) = timed(with(big.cmd("nix-store"), &["--add", big_file.to_str().context("path")?]), None)?;
    let big_path = big_path.trim().to_owned();

    for (label, src, paths) in [
        ("nix copy --to unix:// (1000 small paths)", &small, small_paths.clone()),
        ("nix copy --to unix:// (one large path)", &big, vec![big_path.clone()]),
    ] {
        let (mut c_times, mut n_times, mut client_cpu) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..o.reps {
            let from = src.store_url();
            let nix_root = w.join(format!("proto-copy-nix-{rep}"));
            rm_rf(&nix_root);
            let nixd = NixDaemon::start(&nix_root)?;
            let mut c = client(w, &nixd.url(), "nix");
            c.args(["copy", "--no-check-sigs", "--from", &from, "--to", &nixd.url()]).args(&paths);
            n_times.push(timed(c, None)?.1);
            drop(nixd);
            let cairn = Cairn::start_configured(w, &format!("proto-copy-cairn-{rep}-"), CAIRN_CONF)?;
            let mut c = client(w, &cairn_url(&cairn), "nix");
            c.args(["copy", "--no-check-sigs", "--from", &from, "--to", &cairn_url(&cairn)]).args(&paths);
            let before = children_cpu()?;
            c_times.push(timed(c, None)?.1);
            client_cpu.push(children_cpu()? - before);
            if rep == 0 {
                // Both hold the same paths with the same NAR hashes.
                let q = |url: &str| -> Result<String> {
                    let mut c = client(w, url, "nix-store");
                    c.args(["-q", "--hash"]).args(&paths);
                    Ok(timed(c, None)?.0)
                };
                ensure!(q(&cairn_url(&cairn))? == q(&src.store_url())?, "{label}: hashes differ");
            }
        }
        table.time(label.into(), median(&mut c_times), Some(median(&mut n_times)));
        table.note("  floor: the client's own CPU time into cairnd", crate::fmt_secs(median(&mut client_cpu)));
    }
    // The floor under the large copy: the bytes copied and synced, and one hash pass.
    let copy = w.join("big.copy");
    let t = Instant::now();
    std::fs::copy(&big_file, &copy)?;
    nix::unistd::sync();
    table.note("  floor: cp + sync of the large file", crate::fmt_secs(t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let mut h = cairn_nix::hash::Hasher::new(cairn_nix::HashAlgo::Sha256);
    std::io::copy(&mut std::fs::File::open(&big_file)?, &mut h)?;
    let _ = h.finish();
    table.note("  floor: one SHA-256 pass over it", crate::fmt_secs(t.elapsed().as_secs_f64()));
    // What the client itself needs to serialise the path, sent nowhere.
    let real = big.root.path().join(big_path.trim_start_matches('/'));
    let mut dump = Command::new("nix-store");
    dump.arg("--dump").arg(&real).stdout(Stdio::null()).env_remove("NIX_REMOTE");
    table.note("  floor: the client's nix-store --dump of it", crate::fmt_secs(timed(dump, None)?.1));
    Ok(())
}

/// `nix-build` of the 200-derivation fan-out through each daemon.
fn fanout_build(o: &Opts, w: &Path, table: &mut Table) -> Result<()> {
    let n = if o.paths < 100_000 { 50 } else { 200 };
    let expr = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nix/tests/fanout.nix");
    let expr = expr.to_str().context("path")?.to_owned();
    let (mut c_times, mut n_times) = (Vec::new(), Vec::new());
    for rep in 0..o.reps {
        let args = ["--no-out-link", expr.as_str(), "--arg", "n", &n.to_string()];
        let nix_root = w.join(format!("proto-build-nix-{rep}"));
        rm_rf(&nix_root);
        let nixd = NixDaemon::start(&nix_root)?;
        let (nix_out, secs) = timed(with(client(w, &nixd.url(), "nix-build"), &args), None)?;
        n_times.push(secs);
        drop(nixd);
        let cairn = Cairn::start_configured(w, &format!("proto-build-cairn-{rep}-"), CAIRN_CONF)?;
        let (cairn_out, secs) = timed(with(client(w, &cairn_url(&cairn), "nix-build"), &args), None)?;
        c_times.push(secs);
        ensure!(cairn_out == nix_out, "fan-out outputs differ: {cairn_out:?} vs {nix_out:?}");
    }
    table.time(format!("nix-build fan-out of {} drvs", n + 1), median(&mut c_times), Some(median(&mut n_times)));
    Ok(())
}
