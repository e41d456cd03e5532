//! Workload 6: realising 200 trivial derivations, a chain (each needs the one before) and a fan-out (200
//! independent leaves and one root that needs them all): `cairn realise` vs `nix-store
//! --realise`, both sandboxed, both with `max-jobs = 2` and one core per build, `/bin/sh` a static
//! busybox in both sandboxes. The derivations are instantiated by real `nix-instantiate` from
//! the expressions under `nix/tests/` and exported into cairn, so both build the same `.drv`s;
//! every output path and NAR hash is compared once. Builds do almost nothing, so the times are
//! the scheduling and sandbox set-up overhead of each tool; the chain's time per derivation is
//! printed as each tool's per-build fixed cost.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};

use cairn_tests::NixStore;

use crate::{median, nix_store, timed, Cairn, Opts, Table};

/// The busybox bound at `/bin/sh` in both sandboxes.
const BUSYBOX: &str = "/bin/busybox";

fn expressions() -> std::path::PathBuf {
    std::env::var_os("CAIRN_BENCH_NIX")
        .map(Into::into)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../nix/tests"))
}

fn nix_config() -> String {
    format!(
        "substituters =\nexperimental-features = nix-command\nbuild-users-group =\nsandbox = true\n\
         sandbox-paths = /bin/sh={BUSYBOX}\nmax-jobs = 2\ncores = 1\n"
    )
}

fn nix_cmd(store: &NixStore, tool: &str) -> Command {
    let mut c = store.cmd(tool);
    c.env("NIX_CONFIG", nix_config());
    c
}

fn run(mut c: Command) -> Result<String> {
    let out = c.output()?;
    ensure!(out.status.success(), "{:?}: {}", c, String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Instantiates `file` with `n` into a fresh Nix store; returns the top `.drv`.
fn instantiate(store: &NixStore, file: &str, n: u64) -> Result<String> {
    let mut c = nix_cmd(store, "nix-instantiate");
    c.arg(expressions().join(file)).args(["--arg", "n", &n.to_string()]);
    Ok(run(c)?.trim().to_owned())
}

pub fn bench_build(o: &Opts, w: &Path, with_nix: bool, table: &mut Table) -> Result<()> {
    ensure!(Path::new(BUSYBOX).exists(), "the build workload needs {BUSYBOX} (Debian busybox-static)");
    ensure!(with_nix, "the build workload needs nix-instantiate to write the derivations");
    let n = if o.paths < 100_000 { 50 } else { 200 };
    // Build directories where both tools put them by default (TMPDIR, /tmp here), then on a
    // tmpfs for both: creating and removing a sandbox root's few dozen entries costs more than
    // the build on a slow disk.
    let shm = Path::new("/dev/shm");
    let dirs: Vec<(&str, Option<&Path>)> =
        if shm.is_dir() { vec![("/tmp", None), ("tmpfs", Some(shm))] } else { vec![("/tmp", None)] };
    for (dir_label, dir) in dirs {
        for (label, file) in [("chain", "chain.nix"), ("fan-out", "fanout.nix")] {
            let (mut c_times, mut n_times) = (Vec::new(), Vec::new());
            let mut checked = false;
            for rep in 0..o.reps {
                // Nix: fresh store, instantiate (not timed), realise.
                let nix = nix_store(w, &format!("build-{label}-{rep}"));
                let top = instantiate(&nix, file, n)?;
                let drvs = run({
                    let mut c = nix_cmd(&nix, "nix-store");
                    c.args(["-qR", &top]);
                    c
                })?;
                let stream = w.join("drvs.export");
                let mut export = nix_cmd(&nix, "nix-store");
                export.arg("--export").args(drvs.lines());
                export.stdout(std::fs::File::create(&stream)?);
                ensure!(export.status()?.success(), "nix-store --export failed");
                let mut realise = nix_cmd(&nix, "nix-store");
                realise.args(["--realise", &top]);
                if let Some(d) = dir {
                    realise.env("TMPDIR", d);
                }
                let (nix_out, secs) = timed(realise, None)?;
                n_times.push(secs);

                // cairn: fresh daemon, the same derivations imported (not timed), realise.
                let cairn = Cairn::start_configured(
                    w,
                    &format!("cairn-build-{label}-{rep}-"),
                    &format!(
                        "sandbox-paths = [\"/bin/sh={BUSYBOX}\"]\nmax-jobs = 2\ncores = 1\n{}",
                        dir.map(|d| format!("build-dir = \"{}\"\n", d.display())).unwrap_or_default()
                    ),
                )?;
                let mut import = cairn.cairn();
                import.arg("import");
                run({
                    import.stdin(std::fs::File::open(&stream)?);
                    import
                })?;
                let mut realise = cairn.cairn();
                realise.args(["realise", "-Q", &top]);
                let (cairn_out, secs) = timed(realise, None)?;
                c_times.push(secs);
                ensure!(cairn_out.trim() == nix_out.trim(), "different outputs: cairn {cairn_out:?}, nix {nix_out:?}");

                if !checked {
                    compare_outputs(&nix, &cairn, &top).with_context(|| format!("{label}: cairn and Nix disagree"))?;
                    checked = true;
                }
            }
            let drv_count = if label == "chain" { n } else { n + 1 };
            let (c, nix) = (median(&mut c_times), median(&mut n_times));
            table.time(format!("realise {drv_count} trivial drvs ({label}, {dir_label})"), c, Some(nix));
            if label == "chain" {
                // The chain's builds run one after another and do almost nothing: its time
                // per derivation is each tool's fixed cost of one build.
                let per = drv_count as f64;
                table.time(format!("  per-build fixed cost (chain, {dir_label})"), c / per, Some(nix / per));
            }
        }
    }
    table.footer.push(format!(
        "build: every output path and NAR hash of the first repetition equal in both stores; \
         max-jobs 2, cores 1, sandboxed, {BUSYBOX} as /bin/sh"
    ));
    Ok(())
}

/// Every output of the closure: same paths, same NAR hashes in both stores.
fn compare_outputs(nix: &NixStore, cairn: &Cairn, top: &str) -> Result<()> {
    let mut q = nix_cmd(nix, "nix-store");
    q.args(["-qR", "--include-outputs", top]);
    let outputs: Vec<String> = run(q)?.lines().filter(|l| !l.ends_with(".drv")).map(str::to_owned).collect();
    ensure!(!outputs.is_empty(), "no outputs");
    let mut h = nix_cmd(nix, "nix-store");
    h.args(["-q", "--hash"]).args(&outputs);
    let nix_hashes: Vec<String> = run(h)?.lines().map(str::to_owned).collect();
    let mut info = cairn.cairn();
    info.args(["path-info", "--json"]).args(&outputs);
    let infos: serde_json::Value = serde_json::from_str(&run(info)?)?;
    for (i, (p, nh)) in outputs.iter().zip(&nix_hashes).enumerate() {
        let ch = infos[i]["narHash"].as_str().context("narHash")?;
        let nh = cairn_nix::Hash::parse_prefixed(nh)?;
        ensure!(nh.to_sri() == ch, "{p}: nix {} vs cairn {ch}", nh.to_sri());
    }
    Ok(())
}
