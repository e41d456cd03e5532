//! Workload `remote`: the 200-derivation fan-out (`nix/tests/fanout.nix`) dispatched to two
//! remote builders on this machine, both real `nix-daemon`s (fresh for each side and run, on
//! `unix://` sockets, `max-jobs = 2`, two slots each in the machines spec), so that only the
//! dispatching side differs:
//!
//! - cairn: a cairnd with `max-jobs = 0` and the two builders, timing `cairn realise` of the
//!   instantiated root;
//! - Nix 2.8: `nix-store --realise` of the same derivation in a local store with
//!   `--max-jobs 0 --builders …` (its build hook).
//!
//! Instantiation is not timed on either side. Beside them, a local realise of the same
//! derivations by a cairnd with `max-jobs = 2`, for the remote overhead per derivation. Then
//! the bytes moved: NARs sent and fetched by cairn for the fan-out, and for a 20-link chain on
//! one builder, whose every input the builder made itself (so nothing should be sent).

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::protocol::{cairn_url, client, with, NixDaemon, BUSYBOX, CAIRN_CONF, CLIENT_CONF};
use crate::{median, rm_rf, timed, Cairn, Opts, Table};

fn expr(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nix/tests").join(name).display().to_string()
}

/// Two fresh nix-daemons under `w/<tag>-{0,1}`, and their machines spec.
fn builders(w: &Path, tag: &str) -> Result<(Vec<NixDaemon>, String)> {
    let mut daemons = Vec::new();
    let mut spec = Vec::new();
    for i in 0..2 {
        let root = w.join(format!("{tag}-builder-{i}"));
        rm_rf(&root);
        let d = NixDaemon::start(&root)?;
        // `?root=`: Nix's client of a `unix://` store reads NARs from the store's files itself
        // (cairn reads them from the connection and ignores it).
        spec.push(format!("{} x86_64-linux - 2 1", d.url()));
        daemons.push(d);
    }
    Ok((daemons, spec.join(" ; ")))
}

/// `nix-instantiate` of an expression into a cairnd's store; the derivation.
fn instantiate(w: &Path, c: &Cairn, file: &str, n: u32) -> Result<String> {
    let (out, _) =
        timed(with(client(w, &cairn_url(c), "nix-instantiate"), &[&expr(file), "--arg", "n", &n.to_string()]), None)?;
    Ok(out.trim().to_owned())
}

fn builders_json(c: &Cairn) -> Result<serde_json::Value> {
    let out = c.cairn().args(["builders", "--json"]).output()?;
    ensure!(out.status.success(), "cairn builders: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn sum(v: &serde_json::Value, field: &str) -> u64 {
    v.as_array().map(|a| a.iter().filter_map(|b| b[field].as_u64()).sum()).unwrap_or(0)
}

pub fn bench_remote(o: &Opts, w: &Path, with_nix: bool, table: &mut Table) -> Result<()> {
    ensure!(with_nix, "the remote workload needs Nix 2.8 (nix-bin)");
    ensure!(Path::new(BUSYBOX).exists(), "the remote workload needs {BUSYBOX} (busybox-static)");
    table.section("nix hook");
    let n = if o.paths < 100_000 { 50 } else { 200 };
    let (mut c_times, mut n_times, mut l_times) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sent, mut fetched) = (0, 0);
    for rep in 0..o.reps {
        // cairn, dispatching.
        let (_builders, spec) = builders(w, &format!("remote-cairn-{rep}"))?;
        let config = format!("sandbox-paths = [\"/bin/sh=/bin/busybox\"]\nmax-jobs = 0\nbuilders = \"{spec}\"\n");
        let cairn = Cairn::start_configured(w, &format!("remote-cairn-{rep}-"), &config)?;
        let drv = instantiate(w, &cairn, "fanout.nix", n)?;
        let (c_out, secs) = timed(with(cairn.cairn(), &["realise", "-Q", &drv]), None)?;
        c_times.push(secs);
        let b = builders_json(&cairn)?;
        ensure!(sum(&b, "built") == u64::from(n) + 1, "cairn's builders built {} derivations", sum(&b, "built"));
        (sent, fetched) = (sum(&b, "narsSent"), sum(&b, "narsReceived"));
        drop(cairn);

        // Nix 2.8, dispatching through its build hook to two builders of the same kind.
        let (_builders, spec) = builders(w, &format!("remote-nix-{rep}"))?;
        let nix_root = w.join(format!("remote-nix-{rep}"));
        rm_rf(&nix_root);
        let store = format!("local?root={}", nix_root.display());
        let (drv_nix, _) = timed(
            with(client(w, &store, "nix-instantiate"), &[&expr("fanout.nix"), "--arg", "n", &n.to_string()]),
            None,
        )?;
        let args = ["--realise", drv_nix.trim(), "--max-jobs", "0", "--option", "builders", &spec];
        // Nix's build hook passes the client's sandbox paths on to the builders: it needs the
        // builders' `/bin/sh` in its own configuration.
        let conf = w.join("remote-nix-client-conf");
        std::fs::create_dir_all(&conf)?;
        std::fs::write(conf.join("nix.conf"), format!("{CLIENT_CONF}sandbox-paths = /bin/sh=/bin/busybox\n"))?;
        let mut realise = with(client(w, &store, "nix-store"), &args);
        realise.env("NIX_CONF_DIR", &conf);
        let (n_out, secs) = timed(realise, None)?;
        n_times.push(secs);
        ensure!(c_out.trim() == n_out.trim(), "outputs differ: cairn {c_out:?}, nix {n_out:?}");
        let _ = Command::new("chmod").arg("-R").arg("u+w").arg(&nix_root).status();
        rm_rf(&nix_root);

        // The same derivations built here, for the overhead of going remote.
        let local = Cairn::start_configured(w, &format!("remote-local-{rep}-"), CAIRN_CONF)?;
        let drv = instantiate(w, &local, "fanout.nix", n)?;
        let (_, secs) = timed(with(local.cairn(), &["realise", "-Q", &drv]), None)?;
        l_times.push(secs);
    }
    let (c, nx, l) = (median(&mut c_times), median(&mut n_times), median(&mut l_times));
    table.time(format!("fan-out of {} drvs on 2 remote nix-daemons", n + 1), c, Some(nx));
    table.note("  cairn building it here instead (max-jobs 2)", crate::fmt_secs(l));
    table.note(
        "  remote overhead per drv ((remote - local) / drvs)",
        format!("{:.1} ms", (c - l) * 1000.0 / f64::from(n + 1)),
    );
    table.note("  NARs sent / fetched by cairn for the fan-out", format!("{sent} / {fetched}"));

    // A chain on one builder: every input is an output the builder made, so nothing is sent.
    let (builder, _) = builders(w, "remote-chain")?;
    let spec = format!("{} x86_64-linux - 2 1", builder[0].url());
    let config = format!("sandbox-paths = [\"/bin/sh=/bin/busybox\"]\nmax-jobs = 0\nbuilders = \"{spec}\"\n");
    let cairn = Cairn::start_configured(w, "remote-chain-cairn-", &config)?;
    let drv = instantiate(w, &cairn, "chain.nix", 20)?;
    timed(with(cairn.cairn(), &["realise", "-Q", &drv]), None).context("chain")?;
    let b = builders_json(&cairn)?;
    table.note("  NARs sent for a 20-link chain on one builder", format!("{}", sum(&b, "narsSent")));
    Ok(())
}
