//! Workload 7: OCI images against a local distribution registry (`docker-registry` on
//! loopback), cairn and skopeo side by side.
//!
//! - **pull**: a 3-layer image of about 1 GiB (`--tree-mib`; layers of 1/2, 3/8 and 1/8 of it,
//!   random bytes in gzip-compressed tar layers, as registries hold them; neither tool
//!   decompresses a layer to pull it) pulled by `cairn image pull` into an empty store and by `skopeo copy docker://…
//!   oci:DIR` into an empty directory. cairn makes every blob durable before it registers it;
//!   skopeo does not sync, so `skopeo copy` followed by `sync` is printed too.
//! - **shared layers**: a second image sharing the first two layers, pulled after the first
//!   (into the same store, and by skopeo into the same `oci:` directory): both times, and the
//!   bytes cairn reports it fetched beside the size of the one new layer.
//! - **serving**: `skopeo copy` from cairnd's registry endpoint and from distribution serving
//!   the same image, into empty `oci:` directories.
//!
//! Every pull is checked: the manifest digest cairn reports and the one skopeo wrote are the
//! registry's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sha2::Digest as _;

use crate::{median, rm_rf, timed, Cairn, Opts, Table};

pub(crate) fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) struct Registry {
    child: Child,
    pub(crate) port: u16,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn wait_port(port: u16) -> Result<()> {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(t.elapsed() < Duration::from_secs(20), "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub(crate) fn start_registry(w: &Path) -> Result<Registry> {
    start_registry_named(w, "registry")
}

/// A registry of its own in `w/name`.
fn start_registry_named(w: &Path, name: &str) -> Result<Registry> {
    start_registry_logging(w, name, None)
}

/// A registry of its own in `w/name`, writing its access log (one line per request, with the
/// bytes sent) to `log` if given.
pub(crate) fn start_registry_logging(w: &Path, name: &str, log: Option<&Path>) -> Result<Registry> {
    let dir = w.join(name);
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog: {{ level: error }}\nstorage: {{ filesystem: {{ rootdirectory: {}/data }} }}\nhttp: {{ addr: 127.0.0.1:{port} }}\n",
            dir.display()
        ),
    )?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(match log {
            Some(log) => Stdio::from(std::fs::File::create(log)?),
            None => Stdio::null(),
        })
        .stderr(Stdio::null())
        .spawn()
        .context("start docker-registry (Debian docker-registry)")?;
    wait_port(port)?;
    Ok(Registry { child, port })
}

pub(crate) fn run(c: &mut Command) -> Result<String> {
    let out = c.output().with_context(|| format!("{c:?}"))?;
    ensure!(out.status.success(), "{:?}: {}", c, String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A gzip-compressed tar holding one file of `mib` MiB of pseudo-random bytes (seeded, so
/// layers are stable).
pub(crate) fn layer(mib: u64, seed: u64) -> Result<Vec<u8>> {
    let data = layer_bytes(mib, seed);
    let mut b = tar::Builder::new(Vec::with_capacity(data.len() + 2048));
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1);
    h.set_cksum();
    b.append_data(&mut h, format!("data/layer-{seed}.bin"), &data[..])?;
    let tar = b.into_inner()?;
    let mut gz = flate2::write::GzEncoder::new(Vec::with_capacity(tar.len() + (1 << 20)), flate2::Compression::fast());
    gz.write_all(&tar)?;
    Ok(gz.finish()?)
}

/// Writes an `oci:` layout `dir` with an image `tag` of these layers; returns its manifest
/// digest.
pub(crate) fn write_image(dir: &Path, tag: &str, layers: &[&[u8]]) -> Result<String> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |b: &[u8]| -> Result<String> {
        let h = sha256_hex(b);
        let p = blobs.join(&h);
        if !p.exists() {
            std::fs::write(p, b)?;
        }
        Ok(format!("sha256:{h}"))
    };
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| -> Result<String> {
            let mut plain = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(*l), &mut plain)?;
            Ok(format!("\"sha256:{}\"", sha256_hex(&plain)))
        })
        .collect::<Result<_>>()?;
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    );
    let cd = put(config.as_bytes())?;
    let mut ls = Vec::new();
    for l in layers {
        ls.push(format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}"#,
            put(l)?,
            l.len()
        ));
    }
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{}]}}"#,
        config.len(),
        ls.join(",")
    );
    let md = put(manifest.as_bytes())?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index_path = dir.join("index.json");
    let mut entries: Vec<String> = match std::fs::read_to_string(&index_path) {
        Ok(s) => {
            let v: serde_json::Value = serde_json::from_str(&s)?;
            v["manifests"].as_array().cloned().unwrap_or_default().iter().map(|m| m.to_string()).collect()
        }
        Err(_) => Vec::new(),
    };
    entries.push(format!(
        r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{md}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"{tag}"}}}}"#,
        manifest.len()
    ));
    std::fs::write(index_path, format!(r#"{{"schemaVersion":2,"manifests":[{}]}}"#, entries.join(",")))?;
    Ok(md)
}

pub(crate) fn skopeo(src: &str, dst: &str) -> Command {
    let mut c = Command::new("skopeo");
    c.args(["copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false", src, dst]);
    c
}

/// The digest of the manifest an `oci:` directory's index names.
fn oci_digest(dir: &Path) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("index.json"))?)?;
    Ok(v["manifests"][0]["digest"].as_str().context("index without a manifest")?.to_owned())
}

pub fn bench_image(o: &Opts, w: &Path, table: &mut Table) -> Result<()> {
    for tool in ["docker-registry", "skopeo"] {
        ensure!(crate::have(tool), "the image workload needs {tool} (Debian packages docker-registry, skopeo)");
    }
    let total = o.tree_mib.max(16);
    let sizes = [total / 2, total * 3 / 8, total / 8];
    eprintln!("image: writing a {total} MiB, 3-layer image and a second one sharing two layers …");
    let l1 = layer(sizes[0], 1)?;
    let l2 = layer(sizes[1], 2)?;
    let l3 = layer(sizes[2], 3)?;
    let l3b = layer(sizes[2], 4)?;
    let src = w.join("image-src");
    let local1 = write_image(&src, "v1", &[&l1, &l2, &l3])?;
    let local2 = write_image(&src, "v2", &[&l1, &l2, &l3b])?;
    drop((l1, l2, l3, l3b));
    let reg = start_registry(w)?;
    let up = format!("docker://127.0.0.1:{}/bench/img", reg.port);
    run(&mut skopeo(&format!("oci:{}:v1", src.display()), &format!("{up}:v1")))?;
    run(&mut skopeo(&format!("oci:{}:v2", src.display()), &format!("{up}:v2")))?;
    rm_rf(&src);
    // The registry's digests are the reference (skopeo keeps compressed layers as they are, so
    // they are the local ones).
    let raw =
        |r: &str| run(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", &format!("{up}:{r}")]));
    let d1 = format!("sha256:{}", sha256_hex(raw("v1")?.as_bytes()));
    let d2 = format!("sha256:{}", sha256_hex(raw("v2")?.as_bytes()));
    ensure!(d1 == local1 && d2 == local2, "the registry changed the manifests: {d1} {d2}");

    let (mut c_times, mut s_times, mut s_sync, mut c2_times, mut s2_times) = (vec![], vec![], vec![], vec![], vec![]);
    let mut second_fetched = 0u64;
    let mut pull_rss = 0f64;
    for rep in 0..o.reps {
        // skopeo into an empty oci: directory, then the second image into the same one.
        let dir = w.join(format!("skopeo-{rep}"));
        rm_rf(&dir);
        let (_, secs) = timed(skopeo(&format!("{up}:v1"), &format!("oci:{}:v1", dir.display())), None)?;
        s_times.push(secs);
        ensure!(oci_digest(&dir)? == d1, "skopeo wrote another digest");
        let t = Instant::now();
        nix::unistd::sync();
        s_sync.push(secs + t.elapsed().as_secs_f64());
        let (_, secs) = timed(skopeo(&format!("{up}:v2"), &format!("oci:{}:v2", dir.display())), None)?;
        s2_times.push(secs);
        rm_rf(&dir);

        // cairn into an empty store, then the second image.
        let c = Cairn::start_configured(w, &format!("cairn-image-{rep}-"), "")?;
        let root = c.root.path().to_owned();
        let mut pull = c.cairn();
        pull.args(["image", "pull", "--json", "--tls-verify=false", &format!("{up}:v1")]);
        let (out, secs) = timed(pull, None)?;
        c_times.push(secs);
        let v: serde_json::Value = serde_json::from_str(&out)?;
        ensure!(v["image"]["digest"] == d1.as_str(), "cairn reported another digest: {out}");
        let mut pull2 = c.cairn();
        pull2.args(["image", "pull", "--json", "--tls-verify=false", &format!("{up}:v2")]);
        let (out, secs) = timed(pull2, None)?;
        c2_times.push(secs);
        let v: serde_json::Value = serde_json::from_str(&out)?;
        ensure!(v["image"]["digest"] == d2.as_str(), "cairn reported another digest: {out}");
        second_fetched = v["bytesFetched"].as_u64().unwrap_or(0);
        pull_rss = pull_rss.max(c.peak_rss_mib()?);
        drop(c);
        rm_rf(&root);
    }
    table.section("skopeo");
    table.time(
        format!("pull a {total} MiB 3-layer image (median of {})", o.reps),
        median(&mut c_times),
        Some(median(&mut s_times)),
    );
    table.note("  skopeo copy followed by sync (durable, as cairn)", crate::fmt_secs(median(&mut s_sync)));
    table.note("  cairnd peak RSS during the pulls", format!("{pull_rss:.1} MiB"));
    table.time("pull a 2nd image sharing 2 of its 3 layers".into(), median(&mut c2_times), Some(median(&mut s2_times)));
    table.note(
        "  2nd image: bytes cairn fetched / its new layer",
        format!("{:.1} / {} MiB", second_fetched as f64 / (1 << 20) as f64, sizes[2]),
    );

    // Serving: cairnd's registry endpoint against distribution, the same image.
    let port = free_port()?;
    let c = Cairn::start_configured(w, "cairn-serve-", &format!("listen = \"127.0.0.1:{port}\"\n"))?;
    let root = c.root.path().to_owned();
    wait_port(port)?;
    let mut pull = c.cairn();
    pull.args(["image", "pull", "--tls-verify=false", "--tag", "bench/img:v1", &format!("{up}:v1")]);
    run(&mut pull)?;
    c.reset_peak_rss()?;
    let (mut from_cairn, mut from_dist, mut skopeo_cpu) = (vec![], vec![], vec![]);
    for rep in 0..o.reps {
        for (times, source) in
            [(&mut from_cairn, format!("docker://127.0.0.1:{port}/bench/img:v1")), (&mut from_dist, format!("{up}:v1"))]
        {
            let dir = w.join(format!("serve-{rep}"));
            rm_rf(&dir);
            let before = crate::children_cpu()?;
            let (_, secs) = timed(skopeo(&source, &format!("oci:{}:v1", dir.display())), None)?;
            if source.contains(&format!(":{port}/")) {
                skopeo_cpu.push(crate::children_cpu()? - before);
            }
            ensure!(oci_digest(&dir)? == d1, "{source} served another digest");
            times.push(secs);
            rm_rf(&dir);
        }
    }
    table.time(
        "skopeo pulling it from cairnd vs from distribution".to_owned(),
        median(&mut from_cairn),
        Some(median(&mut from_dist)),
    );
    table.note("  floor: skopeo's own CPU time pulling from cairnd", crate::fmt_secs(median(&mut skopeo_cpu)));
    table.note("  cairnd peak RSS while serving", format!("{:.1} MiB", c.peak_rss_mib()?));
    drop(c);
    rm_rf(&root);
    let _ = std::io::stdout().flush();
    table.footer.push(format!(
        "image: layers of {}/{}/{} MiB (random bytes, tar+gzip), registry distribution 2.8 on loopback; \
         every digest checked against the registry's",
        sizes[0], sizes[1], sizes[2]
    ));
    Ok(())
}

/// Workload 8: an image built from a closure of about 1 GiB (`--tree-mib`: four directories of
/// random files, each a store path, and a small root path referring to them) and pushed to the
/// local registry: `cairn image build` + `cairn image push`, beside one SHA-256 pass over the
/// same bytes (the floor of any tool that must digest them) and beside `umoci repack` +
/// `skopeo copy` of the same tree (copied into an umoci bundle beforehand, not timed). Then a
/// rebuild after the small root path changed: only its layer is new.
///
/// The build is compared with its floor twice, each under the same cache state: cold (the
/// closure's files evicted from the page cache, floor = one SHA-256 pass reading the store files)
/// and warm (the files read just before, floor = one SHA-256 pass over the bytes in memory).
pub fn bench_image_build(o: &Opts, w: &Path, table: &mut Table) -> Result<()> {
    for tool in ["docker-registry", "skopeo", "umoci"] {
        ensure!(
            crate::have(tool),
            "the image-build workload needs {tool} (Debian packages docker-registry, skopeo, umoci)"
        );
    }
    let total = o.tree_mib.max(16);
    let reg = start_registry(w)?;
    let host = format!("127.0.0.1:{}", reg.port);
    // Four directories of two files each.
    let src = w.join("closure-src");
    rm_rf(&src);
    let per_file = total / 8;
    let mut hash_time = 0.0;
    for d in 0..4u64 {
        let dir = src.join(format!("part{d}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..2u64 {
            let mut bytes = layer_bytes(per_file, d * 2 + f + 10);
            let t = Instant::now();
            let _ = sha2::Sha256::digest(&bytes);
            hash_time += t.elapsed().as_secs_f64();
            std::fs::write(dir.join(format!("f{f}.bin")), &bytes)?;
            bytes.clear();
        }
    }
    let (mut builds, mut pushes, mut rebuilds, mut umocis, mut warm) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut fresh_streamed, mut fresh_materialised, mut fresh_skopeo) = (vec![], vec![], vec![]);
    let mut push_rss = 0f64;
    let mut cold_floors = vec![];
    let mut rebuilt_written = 0;
    for rep in 0..o.reps {
        let c = Cairn::start_configured(w, &format!("cairn-ibuild-{rep}-"), "")?;
        let root = c.root.path().to_owned();
        let mut parts = Vec::new();
        for d in 0..4 {
            let mut add = c.cairn();
            add.arg("add").arg(src.join(format!("part{d}")));
            parts.push(run(&mut add)?.trim().to_owned());
        }
        let top = |text: &str| -> Result<String> {
            let f = w.join("top.txt");
            std::fs::write(&f, text)?;
            let mut add = c.cairn();
            add.args(["add-text", "app"]).arg(&f);
            for p in &parts {
                add.args(["--ref", p]);
            }
            Ok(run(&mut add)?.trim().to_owned())
        };
        let app = top(&format!("{} v1", parts.join(" ")))?;
        let part_dirs: Vec<PathBuf> = parts.iter().map(|p| root.join(p.trim_start_matches('/'))).collect();
        // Cold: none of the closure in the page cache, as after a reboot.
        evict_trees(&part_dirs)?;
        let mut build = c.cairn();
        build.args(["image", "build", "--json", "--closure", &app, "--tag", "bench/built:1"]);
        let (_, secs) = timed(build, None)?;
        builds.push(secs);
        let mut push = c.cairn();
        push.args([
            "image",
            "push",
            "--tls-verify=false",
            "bench/built:1",
            &format!("docker://{host}/cairn/built-{rep}:1"),
        ]);
        let (_, secs) = timed(push, None)?;
        pushes.push(secs);
        // The same image with its layers materialised (written to a layout and pulled back as
        // blobs), and skopeo copying it from that layout: each push into an empty registry of
        // its own, so that no push finds a blob there already.
        let layout = w.join(format!("pushed-{rep}"));
        let oci = format!("oci:{}:1", layout.display());
        run(c.cairn().args(["image", "push", "bench/built:1", &oci]))?;
        run(c.cairn().args(["image", "pull", "--tag", "bench/materialised:1", &oci]))?;
        c.reset_peak_rss()?;
        for (k, times) in [&mut fresh_streamed, &mut fresh_materialised, &mut fresh_skopeo].into_iter().enumerate() {
            let r = start_registry_named(w, &format!("registry-push-{rep}-{k}"))?;
            let to = format!("docker://127.0.0.1:{}/push/built:1", r.port);
            let cmd = match k {
                0 | 1 => {
                    let mut cmd = c.cairn();
                    let image = if k == 0 { "bench/built:1" } else { "bench/materialised:1" };
                    cmd.args(["image", "push", "--tls-verify=false", image, &to]);
                    cmd
                }
                _ => skopeo(&oci, &to),
            };
            nix::unistd::sync();
            times.push(timed(cmd, None)?.1);
            drop(r);
            rm_rf(&w.join(format!("registry-push-{rep}-{k}")));
        }
        push_rss = push_rss.max(c.peak_rss_mib()?);
        run(c.cairn().args(["image", "untag", "bench/materialised:1"]))?;
        rm_rf(&layout);
        let app2 = top(&format!("{} v2", parts.join(" ")))?;
        let mut rebuild = c.cairn();
        rebuild.args(["image", "build", "--json", "--closure", &app2, "--tag", "bench/built:2"]);
        let (out, secs) = timed(rebuild, None)?;
        rebuilds.push(secs);
        let v: serde_json::Value = serde_json::from_str(&out)?;
        rebuilt_written = v["layersWritten"].as_u64().unwrap_or(0);
        // The cold floor: one SHA-256 pass reading the same store files from disk.
        evict_trees(&part_dirs)?;
        let t = Instant::now();
        for d in &part_dirs {
            hash_tree(d)?;
        }
        cold_floors.push(t.elapsed().as_secs_f64());
        // The same build with the closure in the page cache. Untag, collect (the inputs are
        // rooted), read the parts once, build.
        for (i, p) in parts.iter().chain([&app]).enumerate() {
            run(c.cairn().arg("add-root").arg(root.join(format!("input-root-{i}"))).arg(p))?;
        }
        run(c.cairn().args(["image", "untag", "bench/built:1", "bench/built:2"]))?;
        run(c.cairn().arg("gc"))?;
        for d in &part_dirs {
            hash_tree(d)?;
        }
        let mut again = c.cairn();
        again.args(["image", "build", "--json", "--closure", &app, "--tag", "bench/built:1"]);
        let (out, secs) = timed(again, None)?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        ensure!(v["cached"] == false, "the build after collection was not made again: {out}");
        warm.push(secs);

        // umoci: the same tree in a bundle's rootfs, repacked into a layer, copied by skopeo.
        let layout = w.join(format!("umoci-{rep}"));
        rm_rf(&layout);
        let image = format!("{}:1", layout.display());
        run(Command::new("umoci").args(["init", "--layout"]).arg(&layout))?;
        run(Command::new("umoci").args(["new", "--image", &image]))?;
        let bundle = w.join(format!("umoci-bundle-{rep}"));
        rm_rf(&bundle);
        run(Command::new("umoci").args(["unpack", "--rootless", "--image", &image]).arg(&bundle))?;
        let store = bundle.join("rootfs/store");
        std::fs::create_dir_all(&store)?;
        run(Command::new("cp").arg("-a").arg(&src).arg(store.join("closure")))?;
        nix::unistd::sync();
        let t = Instant::now();
        run(Command::new("umoci").args(["repack", "--image", &image]).arg(&bundle))?;
        run(&mut skopeo(&format!("oci:{image}"), &format!("docker://{host}/umoci/built-{rep}:1")))?;
        umocis.push(t.elapsed().as_secs_f64());
        drop(c);
        rm_rf(&root);
        rm_rf(&layout);
        rm_rf(&bundle);
    }
    rm_rf(&src);
    let (b, p) = (median(&mut builds), median(&mut pushes));
    table.section("umoci+skopeo");
    table.time(
        format!("image build + push of a {total} MiB closure (median of {})", o.reps),
        b + p,
        Some(median(&mut umocis)),
    );
    table.note("  of which cairn image build", crate::fmt_secs(b));
    table.note("  of which cairn image push", crate::fmt_secs(p));
    let cold = median(&mut cold_floors);
    table.note("  one SHA-256 pass reading the store files from disk (cold floor)", crate::fmt_secs(cold));
    table.note("  build (closure not in the page cache) / cold floor", format!("{:.2}x", b / cold));
    let w = median(&mut warm);
    table.note("  build, closure in the page cache", crate::fmt_secs(w));
    table.note("  one SHA-256 pass over the same bytes in memory (warm floor)", crate::fmt_secs(hash_time));
    table.note("  build (page cache) / warm floor", format!("{:.2}x", w / hash_time));
    table.note("  rebuild after the small root path changed", crate::fmt_secs(median(&mut rebuilds)));
    table.note("  layers that rebuild hashed", format!("{rebuilt_written} of 5 store layers"));
    let (ps, pm, sk) = (median(&mut fresh_streamed), median(&mut fresh_materialised), median(&mut fresh_skopeo));
    table.section("skopeo");
    table.time(format!("push of the built image, streamed layers (median of {})", o.reps), ps, Some(sk));
    table.note("  the same image, layers materialised as blobs", crate::fmt_secs(pm));
    table.note("  streamed / materialised", format!("{:.2}x", ps / pm));
    table.note("  cairnd peak RSS during these pushes", format!("{push_rss:.1} MiB"));
    table.note("  (skopeo: copy of it from an oci: layout; each push to an empty registry)", String::new());
    Ok(())
}

/// Reads every file under `dir` once, in 1 MiB reads, into one SHA-256 per file (which also
/// leaves the files in the page cache).
fn hash_tree(dir: &Path) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for_each_file(dir, &mut |path| {
        let mut f = std::fs::File::open(path)?;
        let mut h = sha2::Sha256::new();
        loop {
            let n = std::io::Read::read(&mut f, &mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        std::hint::black_box(h.finalize());
        Ok(())
    })
}

/// Drops the files under `dirs` from the page cache: written back first (`sync`), then
/// `POSIX_FADV_DONTNEED`, which evicts clean pages no process maps.
fn evict_trees(dirs: &[PathBuf]) -> Result<()> {
    nix::unistd::sync();
    for d in dirs {
        for_each_file(d, &mut |path| {
            let f = std::fs::File::open(path)?;
            nix::fcntl::posix_fadvise(&f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)?;
            Ok(())
        })?;
    }
    Ok(())
}

fn for_each_file(dir: &Path, f: &mut dyn FnMut(&Path) -> Result<()>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let kind = e.file_type()?;
        if kind.is_dir() {
            for_each_file(&e.path(), f)?;
        } else if kind.is_file() {
            f(&e.path())?;
        }
    }
    Ok(())
}

/// `mib` MiB of seeded pseudo-random bytes.
fn layer_bytes(mib: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; (mib << 20) as usize];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    data
}

/// Workload `image-compose`: `cairn image squash` of a 5-layer image of `--tree-mib` MiB (five
/// gzip layers of random data, pulled into the store untimed) beside umoci's squash of the same
/// `oci:` layout (`umoci unpack` of the image, then `umoci new` + `umoci insert` of its root
/// filesystem as one layer), and a second squash of the same image by cairn (its derivation's
/// output found valid). The floor: reading the five layers once, gunzipped.
pub fn bench_image_compose(o: &Opts, w: &Path, table: &mut Table) -> Result<()> {
    ensure!(crate::have("umoci"), "the image-compose workload needs umoci (Debian package umoci)");
    let total = o.tree_mib.max(20);
    eprintln!("image-compose: writing a {total} MiB, 5-layer image …");
    let layers: Vec<Vec<u8>> = (0..5).map(|i| layer(total / 5, 10 + i)).collect::<Result<_>>()?;
    let src = w.join("compose-src");
    rm_rf(&src);
    let refs: Vec<&[u8]> = layers.iter().map(Vec::as_slice).collect();
    write_image(&src, "five", &refs)?;
    drop(layers);
    let (mut c_times, mut c2_times, mut u_times, mut floor) = (vec![], vec![], vec![], vec![]);
    for rep in 0..o.reps {
        let c = Cairn::start(w, &format!("compose{rep}"))?;
        run(c.cairn().args(["image", "pull", "--tag", "five:1", &format!("oci:{}:five", src.display())]))?;
        let (out, secs) = timed(crate::protocol::with(c.cairn(), &["image", "squash", "--json", "five:1"]), None)?;
        c_times.push(secs);
        let first: serde_json::Value = serde_json::from_str(&out)?;
        let (out, secs) = timed(crate::protocol::with(c.cairn(), &["image", "squash", "--json", "five:1"]), None)?;
        c2_times.push(secs);
        let second: serde_json::Value = serde_json::from_str(&out)?;
        ensure!(second["cached"] == true && second["image"]["digest"] == first["image"]["digest"], "{second}");

        let dir = w.join(format!("umoci-compose-{rep}"));
        rm_rf(&dir);
        run(Command::new("cp").arg("-a").arg(&src).arg(&dir))?;
        let bundle = w.join(format!("umoci-compose-bundle-{rep}"));
        rm_rf(&bundle);
        let image = |tag: &str| format!("{}:{tag}", dir.display());
        let script = format!(
            "umoci unpack --image '{}' '{}' >/dev/null && umoci new --image '{}' && umoci insert --image '{}' '{}/rootfs' /",
            image("five"),
            bundle.display(),
            image("squashed"),
            image("squashed"),
            bundle.display()
        );
        let (_, secs) = timed(crate::protocol::with(Command::new("sh"), &["-c", &script]), None)?;
        u_times.push(secs);
        rm_rf(&bundle);

        let t = Instant::now();
        for entry in std::fs::read_dir(src.join("blobs/sha256"))? {
            let p = entry?.path();
            let mut head = [0u8; 2];
            let mut f = std::fs::File::open(&p)?;
            if std::io::Read::read(&mut f, &mut head)? == 2 && head == [0x1f, 0x8b] {
                std::io::copy(&mut flate2::read::GzDecoder::new(std::fs::File::open(&p)?), &mut std::io::sink())?;
            }
        }
        floor.push(t.elapsed().as_secs_f64());
    }
    table.section("umoci");
    table.time(format!("squash a {total} MiB 5-layer image"), median(&mut c_times), Some(median(&mut u_times)));
    table.note("  the same squash again (cairn: its output valid)", crate::fmt_secs(median(&mut c2_times)));
    table.note("  floor: the five layers gunzipped once", crate::fmt_secs(median(&mut floor)));
    Ok(())
}
