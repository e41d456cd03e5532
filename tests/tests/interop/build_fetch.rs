//! Fixed-output derivations and host requirements, compared with real Nix 2.8: `builtin:fetchurl`
//! (from `import <nix/fetchurl.nix>`) against an HTTP server this file starts on 127.0.0.1 and
//! a `file://` URL; a fixed output already valid is not built again; `impureEnvVars` come from
//! the client's environment; `system` and `requiredSystemFeatures` are refused with Nix's words.
//! Derivations are written by `nix-instantiate`, exported into cairn, and realised by both (each
//! sandboxed, a static busybox as `/bin/sh`).
//!
//! Needs `nix-instantiate`/`nix-store` (Debian `nix-bin`), `/bin/busybox` (`busybox-static`) and
//! `xz`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cairn_nix::hash::Encoding;
use cairn_nix::{Hash, HashAlgo};
use cairn_tests::{output_with_stdin, require_peer, NixStore, TestStore};

fn nix_config(extra: &str) -> String {
    format!(
        "substituters =\nexperimental-features = nix-command\nbuild-users-group =\nsandbox = true\n\
         sandbox-paths = /bin/sh=/bin/busybox {extra}\nmax-jobs = 2\nsystem-features = benchmark big-parallel\n"
    )
}

const CAIRN_CONFIG: &str =
    "sandbox-paths = [\"/bin/sh=/bin/busybox\"]\nmax-jobs = 2\nsystem-features = [\"benchmark\", \"big-parallel\"]\n";

fn peers() -> bool {
    require_peer("nix-instantiate") && require_peer("/bin/busybox") && require_peer("xz")
}

fn nix(n: &NixStore, config: &str, tool: &str, args: &[&str]) -> std::process::Output {
    n.cmd(tool).env("NIX_CONFIG", config).args(args).output().unwrap()
}

fn nix_ok(n: &NixStore, config: &str, tool: &str, args: &[&str]) -> String {
    let out = nix(n, config, tool, args);
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `cairn ARGS`, which must fail; returns its stderr.
fn fails(s: &TestStore, args: &[&str]) -> String {
    let out = s.run(args, b"");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "cairn {args:?} should fail");
    err
}

fn sha256_hex(data: &[u8]) -> String {
    Hash::digest(HashAlgo::Sha256, data).encode(Encoding::Base16)
}

/// A store with Nix's derivations of `drvs` (and their closure) imported.
fn cairn_with(n: &NixStore, config: &str, drvs: &[String]) -> TestStore {
    let mut args = vec!["-qR"];
    args.extend(drvs.iter().map(String::as_str));
    let closure = nix_ok(n, config, "nix-store", &args);
    let mut export = vec!["--export"];
    export.extend(closure.lines());
    let stream = nix(n, config, "nix-store", &export).stdout;
    let s = TestStore::builder().store_dir("/nix/store").config(CAIRN_CONFIG).start();
    let imported = output_with_stdin(s.cairn().arg("import"), &stream);
    assert!(imported.status.success(), "{}", String::from_utf8_lossy(&imported.stderr));
    s
}

/// Instantiates each attribute of `expr` (a file) with `args`.
fn instantiate(n: &NixStore, config: &str, expr: &Path, attrs: &[&str], args: &[(&str, &str)]) -> Vec<String> {
    attrs
        .iter()
        .map(|a| {
            let mut v = vec![expr.to_str().unwrap(), "-A", a];
            for (k, val) in args {
                v.extend(["--argstr", k, val]);
            }
            nix_ok(n, config, "nix-instantiate", &v).trim().to_owned()
        })
        .collect()
}

/// The NAR hash (base16, `sha256:` prefixed as `path-info --json` shows it) of one path.
fn nar_hash(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v[0]["narHash"].as_str().unwrap().to_owned()
}

/// Serves the files of `dir` over HTTP/1.0; counts requests.
fn serve(dir: &Path) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let (dir, h) = (dir.to_owned(), hits.clone());
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            h.fetch_add(1, Ordering::SeqCst);
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => req.extend_from_slice(&buf[..k]),
                }
            }
            let head = String::from_utf8_lossy(&req).into_owned();
            let target = head.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_owned();
            let reply = match std::fs::read(dir.join(&target)) {
                Ok(body) => {
                    let mut r = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
                    r.extend(body);
                    r
                }
                Err(_) => b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
            };
            let _ = conn.write_all(&reply);
        }
    });
    (port, hits)
}

const FETCH_NIX: &str = r#"
{ base, dir, flat, exec, tree, wrong }:
let fetchurl = import <nix/fetchurl.nix>; in {
  http = fetchurl { url = "${base}/hello.txt"; sha256 = flat; };
  file = fetchurl { url = "file://${dir}/hello.txt"; sha256 = flat; name = "hello-from-file.txt"; };
  exec = fetchurl { url = "${base}/tool.sh"; sha256 = exec; executable = true; };
  unpack = fetchurl { url = "${base}/tree.nar"; sha256 = tree; unpack = true; };
  unpackXz = fetchurl { url = "${base}/tree.nar.xz"; sha256 = tree; unpack = true; name = "tree-xz"; };
  wrong = fetchurl { url = "${base}/hello.txt"; sha256 = wrong; name = "wrong.txt"; };
  missing = fetchurl { url = "${base}/nothing-here"; sha256 = flat; name = "missing.txt"; };
}
"#;

#[test]
fn builtin_fetchurl_fetches_what_nix_fetches_and_refuses_wrong_bytes() {
    if !peers() {
        return;
    }
    let served = tempfile::tempdir().unwrap();
    std::fs::set_permissions(served.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = served.path();
    std::fs::write(dir.join("hello.txt"), b"hello from the server\n").unwrap();
    std::fs::write(dir.join("tool.sh"), b"#!/bin/sh\necho tool\n").unwrap();
    // A NAR of a directory with a file and an executable, and the same NAR compressed.
    let mut tree = Vec::new();
    let mut w = cairn_nix::nar::NarWriter::new(&mut tree).unwrap();
    w.begin_directory(None).unwrap();
    w.regular(Some(b"data"), false, 4, &mut &b"abc\n"[..]).unwrap();
    w.regular(Some(b"run"), true, 3, &mut &b"hi\n"[..]).unwrap();
    w.end_directory().unwrap();
    w.finish().unwrap();
    std::fs::write(dir.join("tree.nar"), &tree).unwrap();
    let xz = std::process::Command::new("xz").args(["-k", "-f"]).arg(dir.join("tree.nar")).status().unwrap();
    assert!(xz.success());
    let mut exec_nar = Vec::new();
    let mut w = cairn_nix::nar::NarWriter::new(&mut exec_nar).unwrap();
    w.regular(None, true, 20, &mut &b"#!/bin/sh\necho tool\n"[..]).unwrap();
    w.finish().unwrap();
    let (port, hits) = serve(dir);

    let n = NixStore::new();
    let config = nix_config(&format!("{0}={0}", dir.display()));
    let expr = n.root.path().join("fetch.nix");
    std::fs::write(&expr, FETCH_NIX).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let (flat, exec, treeh) = (sha256_hex(b"hello from the server\n"), sha256_hex(&exec_nar), sha256_hex(&tree));
    let wrong = sha256_hex(b"something else");
    let args = [
        ("base", base.as_str()),
        ("dir", dir.to_str().unwrap()),
        ("flat", flat.as_str()),
        ("exec", exec.as_str()),
        ("tree", treeh.as_str()),
        ("wrong", wrong.as_str()),
    ];
    let good = ["http", "file", "exec", "unpack", "unpackXz"];
    let drvs = instantiate(&n, &config, &expr, &good, &args);
    let bad = instantiate(&n, &config, &expr, &["wrong", "missing"], &args);
    let show = nix_ok(&n, &config, "nix", &["show-derivation", &drvs[0]]);
    assert!(show.contains("\"builder\": \"builtin:fetchurl\""), "{show}");

    // Nix fetches them; cairn fetches the same paths with the same NAR hashes.
    let mut theirs = Vec::new();
    for d in &drvs {
        theirs.push(nix_ok(&n, &config, "nix-store", &["--realise", d]).trim().to_owned());
    }
    let mut all = drvs.clone();
    all.extend(bad.iter().cloned());
    let s = cairn_with(&n, &config, &all);
    let before = hits.load(Ordering::SeqCst);
    for (d, p) in drvs.iter().zip(&theirs) {
        let ours = s.ok(&["realise", "-Q", d]).trim().to_owned();
        assert_eq!(&ours, p, "output of {d}");
        let mine = nar_hash(&s.ok(&["path-info", "--json", p]));
        let nixs = nar_hash(&nix_ok(&n, &config, "nix", &["path-info", "--json", p]));
        assert_eq!(mine, nixs, "NAR hash of {p}");
    }
    assert_eq!(hits.load(Ordering::SeqCst) - before, 4, "cairn downloaded the four HTTP URLs (the file URL is local)");
    let real = |p: &str| s.real_store_dir().join(p.rsplit('/').next().unwrap());
    assert_eq!(std::fs::read(real(&theirs[0])).unwrap(), b"hello from the server\n");
    assert_eq!(std::fs::read(real(&theirs[1])).unwrap(), b"hello from the server\n");
    let mode = std::fs::metadata(real(&theirs[2])).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111, "executable = true: the file is executable ({mode:o})");
    for t in &theirs[3..5] {
        assert_eq!(std::fs::read(real(t).join("data")).unwrap(), b"abc\n", "unpack = true: the NAR is restored");
        assert_ne!(std::fs::metadata(real(t).join("run")).unwrap().permissions().mode() & 0o111, 0);
    }

    // Wrong bytes: both refuse, naming the hash mismatch; nothing is registered.
    let out = nix(&n, &config, "nix-store", &["--realise", &bad[0]]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hash mismatch in fixed-output derivation"));
    let e = fails(&s, &["realise", &bad[0]]);
    assert!(e.contains("hash mismatch in fixed-output derivation"), "{e}");
    let wrong_out = s.ok(&["derivation", "output-paths", &bad[0]]).trim().to_owned();
    assert!(!s.run(&["path-info", &wrong_out], b"").status.success(), "refused bytes are not registered");
    // A URL the server does not have: both fail.
    assert!(!nix(&n, &config, "nix-store", &["--realise", &bad[1]]).status.success());
    let e = fails(&s, &["realise", &bad[1]]);
    assert!(e.contains("unable to download") && e.contains("404"), "{e}");
    let log = s.ok(&["log", &bad[1]]);
    assert!(log.contains("nothing-here"), "the fetch's log is kept: {log}");
}

const FOD_NIX: &str = r#"
{ hash }:
let lib = import ./lib.nix;
    broken = lib.sh "exit 1" { name = "never-built-input"; };
in {
  # Two derivations of one fixed output: the second, whose builder and input would fail, is
  # never run once the first made the output.
  good = lib.sh "echo fixed > $out" { name = "same-fixed"; outputHashAlgo = "sha256"; outputHash = hash; outputHashMode = "flat"; };
  failing = lib.sh "echo ${broken}; exit 1" { name = "same-fixed"; outputHashAlgo = "sha256"; outputHash = hash; outputHashMode = "flat"; };
}
"#;

#[test]
fn a_fixed_output_already_valid_is_not_built_again() {
    if !peers() {
        return;
    }
    let n = NixStore::new();
    let config = nix_config("");
    let dir = n.root.path();
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("../nix/tests/lib.nix"), dir.join("lib.nix")).unwrap();
    std::fs::write(dir.join("fod.nix"), FOD_NIX).unwrap();
    let hash = sha256_hex(b"fixed\n");
    let drvs = instantiate(&n, &config, &dir.join("fod.nix"), &["good", "failing"], &[("hash", &hash)]);
    assert_ne!(drvs[0], drvs[1]);
    let nix_out: Vec<String> =
        drvs.iter().map(|d| nix_ok(&n, &config, "nix-store", &["--realise", d]).trim().to_owned()).collect();
    assert_eq!(nix_out[0], nix_out[1], "one output path; Nix realises the failing one without building it");

    let s = cairn_with(&n, &config, &drvs);
    assert_eq!(s.ok(&["realise", "-Q", &drvs[0]]).trim(), nix_out[0]);
    assert_eq!(s.ok(&["realise", "-Q", &drvs[1]]).trim(), nix_out[1]);
    let log = s.log();
    let started = |d: &str| log.lines().any(|l| l.contains("building") && l.contains(d));
    assert!(started(&drvs[0]));
    assert!(!started(&drvs[1]), "the second derivation was not built:\n{log}");
}

const IMPURE_NIX: &str = r#"
{ hash }:
let lib = import ./lib.nix; in {
  fixed = lib.sh "printf %s \"$CAIRN_TEST_PROXY\" > $out"
    { name = "impure-fixed"; impureEnvVars = [ "CAIRN_TEST_PROXY" ];
      outputHashAlgo = "sha256"; outputHash = hash; outputHashMode = "flat"; };
  plain = lib.sh "printf %s \"\${CAIRN_TEST_PROXY-unset}\" > $out"
    { name = "impure-plain"; impureEnvVars = [ "CAIRN_TEST_PROXY" ]; };
}
"#;

#[test]
fn impure_env_vars_come_from_the_client_and_reach_fixed_outputs_only() {
    if !peers() {
        return;
    }
    let n = NixStore::new();
    let config = nix_config("");
    let dir = n.root.path();
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("../nix/tests/lib.nix"), dir.join("lib.nix")).unwrap();
    std::fs::write(dir.join("impure.nix"), IMPURE_NIX).unwrap();
    let hash = sha256_hex(b"http://proxy.example:3128");
    let drvs = instantiate(&n, &config, &dir.join("impure.nix"), &["fixed", "plain"], &[("hash", &hash)]);
    // Nix without a daemon: the variables of the process that builds.
    let realise = |d: &str| {
        let out = n
            .cmd("nix-store")
            .env("NIX_CONFIG", &config)
            .env("CAIRN_TEST_PROXY", "http://proxy.example:3128")
            .args(["--realise", d])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let theirs: Vec<String> = drvs.iter().map(|d| realise(d)).collect();

    let s = cairn_with(&n, &config, &drvs);
    // Without the variable in the client's environment (nor the daemon's), the value is empty
    // and the fixed output's hash does not match.
    let e = fails(&s, &["realise", &drvs[0]]);
    assert!(e.contains("hash mismatch"), "{e}");
    for (d, p) in drvs.iter().zip(&theirs) {
        let out = s.cairn().env("CAIRN_TEST_PROXY", "http://proxy.example:3128").args(["realise", "-Q", d]).output();
        let out = out.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), p);
        let mine = nar_hash(&s.ok(&["path-info", "--json", p]));
        assert_eq!(mine, nar_hash(&nix_ok(&n, &config, "nix", &["path-info", "--json", p])), "{p}");
    }
    let plain = s.real_store_dir().join(theirs[1].rsplit('/').next().unwrap());
    assert_eq!(std::fs::read(plain).unwrap(), b"unset", "an input-addressed build never sees the variable");
}

const HOST_NIX: &str = r#"
let lib = import ./lib.nix; in {
  foreign = lib.sh "echo > $out" { name = "foreign"; system = "aarch64-linux"; };
  needsFeature = lib.sh "echo > $out" { name = "needs-feature"; requiredSystemFeatures = [ "cairn-test-feature" "big-parallel" ]; };
  extraPlatform = lib.sh "echo i686 > $out" { name = "extra-platform"; system = "i686-linux"; };
  hasFeature = lib.sh "echo > $out" { name = "has-feature"; requiredSystemFeatures = [ "big-parallel" ]; };
}
"#;

#[test]
fn system_and_required_features_are_refused_in_nixs_words() {
    if !peers() {
        return;
    }
    let n = NixStore::new();
    let config = nix_config("");
    let dir = n.root.path();
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("../nix/tests/lib.nix"), dir.join("lib.nix")).unwrap();
    std::fs::write(dir.join("host.nix"), HOST_NIX).unwrap();
    let attrs = ["foreign", "needsFeature", "extraPlatform", "hasFeature"];
    let drvs = instantiate(&n, &config, &dir.join("host.nix"), &attrs, &[]);
    let s = cairn_with(&n, &config, &drvs);
    for d in &drvs[..2] {
        let out = nix(&n, &config, "nix-store", &["--realise", d]);
        assert!(!out.status.success());
        let theirs = String::from_utf8_lossy(&out.stderr);
        let message = theirs.lines().find_map(|l| l.strip_prefix("error: ")).unwrap().to_owned();
        assert!(message.contains("is required to build"), "{theirs}");
        let ours = fails(&s, &["realise", d]);
        assert!(ours.contains(&message), "cairn says Nix's words:\n  nix:   {message}\n  cairn: {ours}");
    }
    for d in &drvs[2..] {
        let theirs = nix_ok(&n, &config, "nix-store", &["--realise", d]);
        assert_eq!(s.ok(&["realise", "-Q", d]).trim(), theirs.trim(), "{d} builds on both");
    }
}
