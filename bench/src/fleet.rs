//! Workload `fleet`: five cairnd on this machine pull one image (`--tree-mib`, 1 GiB by default,
//! four layers) from one distribution registry at the same moment — once without peers, once
//! with each node configured with the four others as peers (`p2p-listen` on loopback). Printed:
//! the wall time of each round (from the start of the five pulls to the end of the last), and
//! the blob bytes the registry sent (its own access log, not cairn's counters). Every node's
//! image digest is checked against the registry's.
//!
//! Beside it, what BLAKE3 costs on the pull path: one node pulling the image alone, with
//! `p2p-listen` set (each blob hashed with BLAKE3 and its outboard in the same pass as its
//! SHA-256) and without (SHA-256 only), median of `--reps`; and one thread hashing the same
//! bytes with SHA-256 alone and with SHA-256 plus BLAKE3 and its outboard.

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use crate::image::{free_port, layer, run, sha256_hex, skopeo, start_registry_logging, write_image};
use crate::{fmt_secs, rm_rf, Cairn, Opts, Table};

const NODES: usize = 5;

/// Blob bytes sent with status 200, from the access log's lines after byte `from`.
fn blob_bytes_sent(log: &Path, from: usize) -> Result<u64> {
    let text = std::fs::read_to_string(log)?;
    let mut total = 0u64;
    for line in text.get(from..).unwrap_or("").lines() {
        // ... "GET /v2/bench/fleet/blobs/sha256:… HTTP/1.1" 200 1048576 "" "agent"
        let Some((request, rest)) = line.split_once("\" ") else { continue };
        if !(request.contains("\"GET /v2/") && request.contains("/blobs/")) {
            continue;
        }
        let mut fields = rest.split_whitespace();
        if fields.next() == Some("200") {
            total += fields.next().and_then(|b| b.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Ok(total)
}

/// Five daemons; with `peers`, each listens on loopback and has the four others as peers (they
/// start once to make their keys, then again with their peers).
fn fleet(w: &Path, round: &str, peers: bool) -> Result<Vec<Cairn>> {
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..NODES {
        let port = free_port()?;
        let config = if peers { format!("p2p-listen = \"127.0.0.1:{port}\"\n") } else { String::new() };
        let c = Cairn::start_configured(w, &format!("cairn-fleet-{round}-{i}-"), &config)?;
        if peers {
            let v: serde_json::Value = serde_json::from_str(&run(c.cairn().args(["peers", "--json"]))?)?;
            addrs.push(format!("{}@127.0.0.1:{port}", v["nodeId"].as_str().context("node id")?));
        }
        nodes.push((c, config));
    }
    let mut out = Vec::new();
    for (i, (mut c, config)) in nodes.into_iter().enumerate() {
        if peers {
            let others: Vec<String> =
                addrs.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, a)| format!("\"{a}\"")).collect();
            std::fs::write(&c.config, format!("{config}peers = [{}]\n", others.join(", ")))?;
            c.restart();
        }
        out.push(c);
    }
    Ok(out)
}

/// The five pulls at once: wall time, and each node's image digest.
fn pull_all(nodes: &[Cairn], image: &str) -> Result<(f64, Vec<String>)> {
    let started = Instant::now();
    let outs: Vec<Result<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|c| scope.spawn(move || run(c.cairn().args(["image", "pull", "--json", "--tls-verify=false", image]))))
            .collect();
        handles.into_iter().map(|h| h.join().expect("pull thread")).collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let mut digests = Vec::new();
    for out in outs {
        let v: serde_json::Value = serde_json::from_str(&out?)?;
        digests.push(v["image"]["digest"].as_str().unwrap_or("").to_owned());
    }
    Ok((secs, digests))
}

pub fn bench_fleet(o: &Opts, w: &Path, table: &mut Table) -> Result<()> {
    for tool in ["docker-registry", "skopeo"] {
        ensure!(crate::have(tool), "the fleet workload needs {tool} (Debian packages docker-registry, skopeo)");
    }
    let total = o.tree_mib.max(16);
    eprintln!("fleet: writing a {total} MiB, 4-layer image …");
    let layers: Vec<Vec<u8>> = (0..4).map(|i| layer(total / 4, 100 + i)).collect::<Result<_>>()?;
    let src = w.join("fleet-src");
    let digest = write_image(&src, "v1", &layers.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
    let image_bytes: u64 = layers.iter().map(|l| l.len() as u64).sum();
    let log = w.join("fleet-registry.log");
    let reg = start_registry_logging(w, "fleet-registry", Some(&log))?;
    let up = format!("docker://127.0.0.1:{}/bench/fleet:v1", reg.port);
    run(&mut skopeo(&format!("oci:{}:v1", src.display()), &up))?;
    rm_rf(&src);

    table.section("no peers");
    let mut rows = Vec::new();
    for (round, peers) in [("alone", false), ("peers", true)] {
        let nodes = fleet(w, round, peers)?;
        let log_at = std::fs::metadata(&log)?.len() as usize;
        let (secs, digests) = pull_all(&nodes, &up)?;
        ensure!(digests.iter().all(|d| *d == digest), "a node pulled another digest: {digests:?}");
        let sent = blob_bytes_sent(&log, log_at)?;
        let roots: Vec<_> = nodes.iter().map(|c| c.root.path().to_owned()).collect();
        drop(nodes);
        roots.iter().for_each(|r| rm_rf(r));
        rows.push((secs, sent));
    }
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    let ((alone_secs, alone_sent), (peers_secs, peers_sent)) = (rows[0], rows[1]);
    table.time(format!("{NODES} nodes pull one {total} MiB image at once"), peers_secs, Some(alone_secs));
    table.note("  registry blob bytes sent, with peers", gib(peers_sent));
    table.note("  registry blob bytes sent, without peers", gib(alone_sent));
    table.note("  the image's blobs", gib(image_bytes));

    // What BLAKE3 costs on the pull path: one node, with and without a p2p node (no peers).
    let (mut with_b3, mut without_b3) = (Vec::new(), Vec::new());
    for rep in 0..o.reps {
        for (times, config) in
            [(&mut with_b3, format!("p2p-listen = \"127.0.0.1:{}\"\n", free_port()?)), (&mut without_b3, String::new())]
        {
            let c = Cairn::start_configured(w, &format!("cairn-b3-{rep}-"), &config)?;
            let (secs, digests) = pull_all(std::slice::from_ref(&c), &up)?;
            ensure!(digests == [digest.clone()], "the pull gave {digests:?}");
            if !config.is_empty() {
                let v: serde_json::Value = serde_json::from_str(&run(c.cairn().args(["peers", "--json"]))?)?;
                ensure!(v["offered"].as_u64() >= Some(5), "not every blob was hashed for peers: {v}");
            }
            times.push(secs);
            let root = c.root.path().to_owned();
            drop(c);
            rm_rf(&root);
        }
    }
    table.time(
        format!("one node pulls it, BLAKE3 beside SHA-256 (median of {})", o.reps),
        crate::median(&mut with_b3),
        Some(crate::median(&mut without_b3)),
    );
    table.note("  (the 'no peers' column: SHA-256 only)", String::new());

    // What BLAKE3 costs beside SHA-256, on one thread.
    let data = &layers[0];
    let t = Instant::now();
    let sha = sha256_hex(data);
    let sha_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let sha2 = sha256_hex(data);
    let tree = bao_tree::BaoTree::new(data.len() as u64, bao_tree::BlockSize::from_chunk_log(4));
    let mut outboard = Vec::new();
    bao_tree::io::sync::outboard_post_order(&mut data.as_slice().take(u64::MAX), tree, &mut outboard)?;
    let both_secs = t.elapsed().as_secs_f64();
    ensure!(sha == sha2, "SHA-256 is not deterministic");
    table.note(
        &format!("  SHA-256 of {} MiB, alone / with BLAKE3+outboard", data.len() >> 20),
        format!("{} / {}", fmt_secs(sha_secs), fmt_secs(both_secs)),
    );
    table.footer.push(format!(
        "fleet: {NODES} cairnd on one machine, distribution 2.8 on loopback as the upstream; 'no peers' column = the \
         same pulls without p2p; bytes from distribution's access log; every node's digest checked"
    ));
    Ok(())
}
