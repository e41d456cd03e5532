//! Remote builds: cairnd spreads a derivation graph over builders it reaches with Nix's worker
//! protocol — other cairnds on their `nix-daemon-socket`, and a real Nix 2.8 `nix-daemon`
//! behind a real OpenSSH server (`ssh-ng://`) — and survives builders that die, lie or cannot
//! be reached. Derivations are written into cairn's store by real `nix-instantiate` through
//! cairnd's Nix socket; results are compared with a local realise of the same derivations.
//!
//! Needs Nix 2.8, a static busybox (the builders' `/bin/sh`) and OpenSSH (`sshd`, `ssh`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_tests::sshd::Sshd;
use cairn_tests::{hello_nar_hash, json, require_peer, NixDaemon, TestStore};
use serde_json::Value;

/// Every store here builds with busybox as `/bin/sh`, under `/nix/store`.
const BUILD: &str = "sandbox-paths = [\"/bin/sh=/bin/busybox\"]\n";

fn peers() -> bool {
    require_peer("nix-instantiate") && require_peer("/bin/busybox")
}

fn expr(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nix/tests").join(name).display().to_string()
}

/// A cairnd that builds here, `jobs` at a time.
fn builder(jobs: usize) -> TestStore {
    TestStore::builder().store_dir("/nix/store").config(&format!("{BUILD}max-jobs = {jobs}\n")).start()
}

/// A cairnd's worker-protocol socket.
fn nix_socket(st: &TestStore) -> PathBuf {
    st.socket.with_file_name("nix-socket")
}

/// A cairnd that sends its builds to `builders` (a machines spec), building `jobs` at a time
/// itself; `env` for its environment (NIX_SSHOPTS).
fn dispatcher(builders: &str, jobs: usize, env: &[(&str, &str)]) -> TestStore {
    let mut b = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!("{BUILD}max-jobs = {jobs}\nbuilders = {}\n", toml_string(builders)));
    for (k, v) in env {
        b = b.env(k, v);
    }
    b.start()
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
}

/// A script in `dir` that runs `cairnd ARGS` on `st`'s store (what an `ssh-ng://localhost` or
/// `ssh://localhost` builder's `remote-program` names); its path.
fn cairnd_program(st: &TestStore, dir: &Path, name: &str, args: &str) -> String {
    let program = dir.join(name);
    let body = format!(
        "#!/bin/sh\nexec env CAIRN_ROOT={} CAIRN_STORE_DIR=/nix/store CAIRN_SOCKET={} CAIRN_CONFIG={} {} {args}\n",
        st.root.path().display(),
        st.socket.display(),
        st.config.display(),
        cairn_tests::bin_dir().join("cairnd").display()
    );
    cairn_tests::write_exec(&program, body.as_bytes());
    program.display().to_string()
}

/// The machines-file line of a cairnd builder.
fn unix_machine(st: &TestStore, jobs: usize) -> String {
    format!("unix://{} x86_64-linux - {jobs} 1", nix_socket(st).display())
}

/// `nix-instantiate` of an expression into a cairnd's store (through its Nix socket); the
/// derivations' paths.
fn instantiate(st: &TestStore, file: &str, args: &[(&str, &str)]) -> Vec<String> {
    instantiate_attrs(st, file, args, &[])
}

/// [`instantiate`] of some attributes (`-A`) of an expression.
fn instantiate_attrs(st: &TestStore, file: &str, args: &[(&str, &str)], attrs: &[&str]) -> Vec<String> {
    let home = tempfile::tempdir().unwrap();
    let mut c = Command::new("nix-instantiate");
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("NIX_CONFIG", "substituters =\nbuild-users-group =\n")
        .env("NIX_STATE_DIR", home.path().join("state"))
        .env("NIX_REMOTE", format!("unix://{}?root={}", nix_socket(st).display(), st.root.path().display()))
        .arg(expr(file));
    for (k, v) in args {
        c.args(["--arg", k, v]);
    }
    for a in attrs {
        c.args(["-A", a]);
    }
    let out = c.stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "nix-instantiate {file}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
}

/// `cairn realise --json` of `drvs`; each derivation's outputs.
fn realise(st: &TestStore, drvs: &[String]) -> Value {
    let mut args = vec!["realise", "--json", "-Q"];
    args.extend(drvs.iter().map(String::as_str));
    let out = st.run(&args, b"");
    assert!(out.status.success(), "realise: {}\ncairnd's log:\n{}", String::from_utf8_lossy(&out.stderr), st.log());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// NAR hash of each output of a realise's answer, by output path.
fn output_hashes(st: &TestStore, realised: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for r in realised.as_array().unwrap() {
        for p in r["outputs"].as_object().unwrap().values() {
            let p = p.as_str().unwrap();
            let info = json(&st.ok(&["path-info", "--json", p]));
            out.push((p.to_owned(), info[0]["narHash"].as_str().unwrap().to_owned()));
        }
    }
    out
}

/// The stderr of a `cairn` command that must fail.
fn failure(st: &TestStore, args: &[&str]) -> String {
    let out = st.run(args, b"");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "cairn {args:?} should fail:\n{err}");
    err
}

/// `cairn builders --json`, by URI.
fn builders(st: &TestStore) -> Vec<Value> {
    json(&st.ok(&["builders", "--json"])).as_array().unwrap().clone()
}

fn builder_named<'a>(all: &'a [Value], socket: &Path) -> &'a Value {
    let uri = format!("unix://{}", socket.display());
    all.iter().find(|b| b["uri"] == uri.as_str()).unwrap_or_else(|| panic!("no builder {uri} in {all:?}"))
}

#[test]
fn a_fanout_and_a_chain_over_three_cairnd_builders_build_each_derivation_once_as_a_local_realise_does() {
    if !peers() {
        return;
    }
    let remote: Vec<TestStore> = (0..3).map(|_| builder(2)).collect();
    let spec: Vec<String> = remote.iter().map(|b| unix_machine(b, 2)).collect();
    let d = dispatcher(&spec.join("\n"), 0, &[]);
    let mut drvs = instantiate(&d, "fanout.nix", &[("n", "200")]);
    drvs.extend(instantiate(&d, "chain.nix", &[("n", "20")]));
    let realised = realise(&d, &drvs);

    let all = builders(&d);
    let counts: Vec<u64> =
        remote.iter().map(|b| builder_named(&all, &nix_socket(b))["built"].as_u64().unwrap()).collect();
    eprintln!("builds per builder: {counts:?}");
    // 200 leaves, the root, 20 chain links: each built once, somewhere, and nothing here.
    assert_eq!(counts.iter().sum::<u64>(), 221, "{all:?}");
    assert!(counts.iter().all(|&c| c > 0), "the fan-out is spread over every builder: {counts:?}");
    assert!(all.iter().all(|b| b["failed"] == 0 && b["state"] == "up"), "{all:?}");
    assert!(!d.log().contains("building (here)"));

    // The same derivations realised locally by a cairnd without builders.
    let local = builder(2);
    let mut local_drvs = instantiate(&local, "fanout.nix", &[("n", "200")]);
    local_drvs.extend(instantiate(&local, "chain.nix", &[("n", "20")]));
    assert_eq!(local_drvs, drvs);
    assert_eq!(output_hashes(&d, &realised), output_hashes(&local, &realise(&local, &local_drvs)));
    d.ok(&["verify", "--check-contents"]);
}

/// Waits until `st`'s builder `socket` runs a build.
fn wait_running(st: &TestStore, socket: &Path) {
    let started = Instant::now();
    loop {
        if builder_named(&builders(st), socket)["running"].as_u64() == Some(1) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no build started on {}", socket.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_build_whose_builder_dies_mid_build_finishes_on_another_and_its_log_is_kept() {
    if !peers() {
        return;
    }
    let (mut first, second) = (builder(1), builder(1));
    let d = dispatcher(&format!("{}\n{}", unix_machine(&first, 1), unix_machine(&second, 1)), 0, &[]);
    let drvs = instantiate(&d, "slow.nix", &[("tag", "\"dies\""), ("seconds", "4")]);
    let mut realise = d.cairn();
    realise.args(["realise", "--json", &drvs[0]]).stdout(Stdio::piped()).stderr(Stdio::piped());
    let running = realise.spawn().unwrap();
    // The first configured builder takes it (both are idle); then it dies.
    wait_running(&d, &nix_socket(&first));
    std::thread::sleep(Duration::from_millis(500));
    first.crash();
    let out = running.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "realise: {err}\n{}", d.log());
    assert!(err.contains(&format!("on 'unix://{}'", nix_socket(&second).display())), "{err}");
    let all = builders(&d);
    let dead = builder_named(&all, &nix_socket(&first));
    assert_eq!(dead["state"], "down", "{dead}");
    assert!(dead["lastError"].as_str().unwrap_or("").contains("broke"), "{dead}");
    assert_eq!(builder_named(&all, &nix_socket(&second))["built"], 1);
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = result[0]["outputs"]["out"].as_str().unwrap();
    assert_eq!(d.ok(&["cat", path]), "done dies\n");
    assert!(d.ok(&["log", &drvs[0]]).contains("start dies"), "the remote build's log is kept");
}

#[test]
fn outputs_a_builder_tampered_with_are_refused_and_built_elsewhere() {
    if !peers() {
        return;
    }
    let (liar, honest) = (builder(1), builder(1));
    // The liar holds the output already, with contents that no longer match its NAR hash.
    let there = instantiate(&liar, "slow.nix", &[("tag", "\"tampered\""), ("seconds", "0")]);
    let built = realise(&liar, &there);
    let out = built[0]["outputs"]["out"].as_str().unwrap().to_owned();
    let file = liar.real_store_dir().join(out.trim_start_matches("/nix/store/"));
    let _ = Command::new("chmod").arg("u+w").arg(&file).status();
    std::fs::write(&file, b"done forged\n").unwrap();

    let d = dispatcher(&format!("{}\n{}", unix_machine(&liar, 1), unix_machine(&honest, 1)), 0, &[]);
    let drvs = instantiate(&d, "slow.nix", &[("tag", "\"tampered\""), ("seconds", "0")]);
    assert_eq!(drvs, there);
    let realised = realise(&d, &drvs);
    assert_eq!(realised[0]["outputs"]["out"], out.as_str());
    assert_eq!(d.ok(&["cat", &out]), "done tampered\n", "the honest builder's output");
    let all = builders(&d);
    let l = builder_named(&all, &nix_socket(&liar));
    assert_eq!((l["state"].as_str(), l["built"].as_u64()), (Some("down"), Some(0)), "{l}");
    assert!(l["lastError"].as_str().unwrap_or("").contains("NAR hash"), "{l}");
    assert_eq!(builder_named(&all, &nix_socket(&honest))["built"], 1);
    d.ok(&["verify", "--check-contents"]);
}

#[test]
fn with_every_builder_down_cairn_builds_here_or_says_why_when_max_jobs_is_0() {
    if !peers() {
        return;
    }
    let gone = tempfile::tempdir().unwrap();
    let spec = format!(
        "unix://{} x86_64-linux\nunix://{} x86_64-linux",
        gone.path().join("a.sock").display(),
        gone.path().join("b.sock").display()
    );
    let only_remote = dispatcher(&spec, 0, &[]);
    let drvs = instantiate(&only_remote, "slow.nix", &[("tag", "\"nowhere\""), ("seconds", "0")]);
    let err = failure(&only_remote, &["realise", &drvs[0]]);
    assert!(err.contains("a.sock") && err.contains("b.sock") && err.contains("down"), "{err}");
    assert!(err.contains("cannot connect"), "the reason is given: {err}");
    assert_eq!(only_remote.ok(&["builders"]).matches("down (").count(), 2);

    let fallback = dispatcher(&spec, 1, &[]);
    let drvs = instantiate(&fallback, "slow.nix", &[("tag", "\"here\""), ("seconds", "0")]);
    let realised = realise(&fallback, &drvs);
    assert_eq!(fallback.ok(&["cat", realised[0]["outputs"]["out"].as_str().unwrap()]), "done here\n");

    // A request's own builders are a trusted user's choice.
    let err = String::from_utf8_lossy(&fallback.run_as_nobody(&["realise", "--builders", &spec, &drvs[0]], b"").stderr)
        .into_owned();
    assert!(err.contains("only trusted users may choose the builders"), "{err}");
}

#[test]
fn cairn_builds_on_a_real_nix_daemon_over_ssh_ng_and_refuses_a_wrong_host_key() {
    if !peers() || !require_peer("sshd") || !require_peer("ssh") {
        return;
    }
    let sshd = Sshd::start();
    // The builder signs what it builds; the signatures come back with the outputs.
    let keys = tempfile::tempdir().unwrap();
    let (sk, pk) = (keys.path().join("sk"), keys.path().join("pk"));
    let generated = Command::new("nix-store")
        .args(["--generate-binary-cache-key", "nixbuilder-1"])
        .args([&sk, &pk])
        .output()
        .unwrap();
    assert!(generated.status.success(), "{}", String::from_utf8_lossy(&generated.stderr));
    let nix = NixDaemon::start_with(&format!(
        "sandbox = true\nsandbox-paths = /bin/sh=/bin/busybox\nsecret-key-files = {}\n",
        sk.display()
    ));
    let program = nix.stdio_program();
    let config = sshd.ssh_config("nixbuilder");
    let opts = format!("-F {}", config.display());
    let machine = format!("ssh-ng://nixbuilder?remote-program={} x86_64-linux - 2 1", program.display());
    let d = dispatcher(&machine, 0, &[("NIX_SSHOPTS", &opts)]);
    let drvs = instantiate(&d, "chain.nix", &[("n", "4")]);
    let out = d.run(&["realise", "--json", &drvs[0]], b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\n{}\nsshd:\n{}", d.log(), sshd.log());
    assert!(err.contains("on 'ssh-ng://nixbuilder"), "progress names the machine: {err}");
    let realised: Value = serde_json::from_slice(&out.stdout).unwrap();

    // The same as a local build.
    let local = builder(1);
    let local_drvs = instantiate(&local, "chain.nix", &[("n", "4")]);
    assert_eq!(output_hashes(&d, &realised), output_hashes(&local, &realise(&local, &local_drvs)));
    let b = &builders(&d)[0];
    assert_eq!((b["built"].as_u64(), b["failed"].as_u64()), (Some(4), Some(0)), "{b}");
    let out = realised[0]["outputs"]["out"].as_str().unwrap();
    let info = json(&d.ok(&["path-info", "--json", out]));
    assert!(info[0]["signatures"].to_string().contains("nixbuilder-1:"), "the builder's signature is kept: {info}");
    // Each link's input was built on the same machine: nothing had to be sent.
    assert_eq!(b["narsSent"], 0, "{b}");
    assert_eq!(b["narsReceived"], 4, "{b}");
    // nix-daemon signs nothing here, but it registered the paths: they are valid there.
    let there = Command::new("nix-store")
        .args(["--store", &format!("local?root={}", nix.root().display()), "-q", "--hash"])
        .arg(realised[0]["outputs"]["out"].as_str().unwrap())
        .env("NIX_REMOTE", "")
        .output()
        .unwrap();
    assert!(there.status.success(), "{}", String::from_utf8_lossy(&there.stderr));

    // A machines entry whose host key is not the server's: refused, and said so.
    let wrong = Sshd::start();
    let spoofed = format!(
        "ssh-ng://root@127.0.0.1:{}?remote-program={} x86_64-linux {} 1 1 - - {}",
        sshd.port(),
        program.display(),
        sshd.client_key().display(),
        wrong.host_key_base64()
    );
    let d2 = dispatcher(&spoofed, 0, &[]);
    let drvs = instantiate(&d2, "slow.nix", &[("tag", "\"spoofed\""), ("seconds", "0")]);
    let err = failure(&d2, &["realise", &drvs[0]]);
    assert!(err.contains("Host key verification failed"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{}", sshd.port())), "the builder is named: {err}");
    // With the right key in the machines entry the same builder is accepted.
    let right = spoofed.replace(&wrong.host_key_base64(), &sshd.host_key_base64());
    let d3 = dispatcher(&right, 0, &[]);
    let drvs = instantiate(&d3, "slow.nix", &[("tag", "\"proven\""), ("seconds", "0")]);
    let realised = realise(&d3, &drvs);
    assert_eq!(d3.ok(&["cat", realised[0]["outputs"]["out"].as_str().unwrap()]), "done proven\n");
}

#[test]
fn multi_output_and_fixed_output_derivations_built_remotely_match_a_local_realise() {
    if !peers() {
        return;
    }
    let remote = builder(2);
    let d = dispatcher(&unix_machine(&remote, 2), 0, &[]);
    let local = builder(2);
    let nar_hash = format!("\"{}\"", hello_nar_hash());
    let attrs = ["multi", "selfref", "flat-sha256", "recursive", "uses-fixed", "c3"];
    let drvs = instantiate_attrs(&d, "builds.nix", &[("narHash", &nar_hash)], &attrs);
    let local_drvs = instantiate_attrs(&local, "builds.nix", &[("narHash", &nar_hash)], &attrs);
    assert_eq!(drvs, local_drvs);
    let realised = realise(&d, &drvs);
    assert_eq!(output_hashes(&d, &realised), output_hashes(&local, &realise(&local, &local_drvs)));
    // References between a build's outputs and to its inputs came back as built.
    for r in realised.as_array().unwrap() {
        for p in r["outputs"].as_object().unwrap().values() {
            let p = p.as_str().unwrap();
            assert_eq!(d.ok(&["references", p]), local.ok(&["references", p]), "{p}");
        }
    }
    let b = &builders(&d)[0];
    assert_eq!(b["failed"], 0, "{b}");
    d.ok(&["verify", "--check-contents"]);
}

#[test]
fn a_build_failing_on_a_builder_names_it_and_keep_going_finishes_the_rest_elsewhere() {
    if !peers() {
        return;
    }
    let (one, two) = (builder(1), builder(1));
    let d = dispatcher(&format!("{}\n{}", unix_machine(&one, 1), unix_machine(&two, 1)), 0, &[]);
    let bad = instantiate(&d, "slow.nix", &[("tag", "\"bad\""), ("seconds", "0"), ("fail", "true")]);
    let good = instantiate(&d, "fanout.nix", &[("n", "6")]);
    let out = d.run(&["realise", "--keep-going", &bad[0], &good[0]], b"");
    let err = String::from_utf8_lossy(&out.stderr);
    // A failed build: Nix's exit status for it, the builder named, its log's tail quoted.
    assert_eq!(out.status.code(), Some(100), "{err}");
    assert!(err.contains("on 'unix://") && err.contains("failed"), "{err}");
    assert!(err.contains("exit code 3") || err.contains("no luck"), "{err}");
    // The fan-out went on and finished; the machines were not blamed for the build.
    let root = d.ok(&["derivation", "output-paths", &good[0]]);
    assert!(d.run(&["path-info", root.trim()], b"").status.success(), "the fan-out was built: {err}");
    let all = builders(&d);
    assert!(all.iter().all(|b| b["state"] == "up"), "{all:?}");
    assert_eq!(all.iter().map(|b| b["built"].as_u64().unwrap()).sum::<u64>(), 7, "{all:?}");
    assert_eq!(all.iter().map(|b| b["failed"].as_u64().unwrap()).sum::<u64>(), 1, "{all:?}");
    assert!(d.ok(&["log", &bad[0]]).contains("start bad"), "the failed build's log is kept");
}

#[test]
fn nix_build_through_cairnd_has_its_builds_sent_to_cairns_builders() {
    if !peers() {
        return;
    }
    let remote = builder(2);
    let d = dispatcher(&unix_machine(&remote, 2), 0, &[]);
    let home = tempfile::tempdir().unwrap();
    let out = Command::new("nix-build")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("NIX_CONFIG", "substituters =\nbuild-users-group =\n")
        .env("NIX_STATE_DIR", home.path().join("state"))
        .env("NIX_REMOTE", format!("unix://{}?root={}", nix_socket(&d).display(), d.root.path().display()))
        .args(["--no-out-link", &expr("chain.nix"), "--arg", "n", "3"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\n{}", d.log());
    // Nix shows where each build runs, from the activity cairnd sends.
    let on = format!("on 'unix://{}'", nix_socket(&remote).display());
    assert_eq!(err.matches(&on).count(), 3, "{err}");
    assert_eq!(builders(&d)[0]["built"], 3);
    let path = String::from_utf8(out.stdout).unwrap();
    assert!(d.ok(&["cat", path.trim()]).starts_with("2 "), "{path}");
}

#[test]
fn a_cairnd_reached_as_ssh_ng_localhost_builds_through_its_stdio_program() {
    if !peers() {
        return;
    }
    let b = builder(1);
    // `ssh-ng://localhost` runs the remote program here, without SSH, as Nix does; this one
    // is `cairnd --stdio` pointed at the builder's store, which relays to its daemon.
    let work = tempfile::tempdir().unwrap();
    let program = cairnd_program(&b, work.path(), "cairnd-stdio", "\"$@\"");
    let d = dispatcher(&format!("ssh-ng://localhost?remote-program={program} x86_64-linux"), 0, &[]);
    let drvs = instantiate(&d, "slow.nix", &[("tag", "\"localhost\""), ("seconds", "0")]);
    let realised = realise(&d, &drvs);
    let out = realised[0]["outputs"]["out"].as_str().unwrap();
    assert_eq!(d.ok(&["cat", out]), "done localhost\n");
    assert_eq!(builders(&d)[0]["built"], 1);
    assert!(b.run(&["path-info", out], b"").status.success(), "the builder's store has it");
}

/// Builders named `ssh://` speak Nix's legacy SSH protocol, as Nix's do: cairn builds on a real
/// `nix-store --serve --write` (on nix-daemon's store) and on a cairnd's `--serve`, with the
/// inputs sent, the outputs identical to a local realise and the builder's output kept as the
/// build's log; a program that does not speak it is named in the machine's error.
#[test]
fn ssh_builders_speak_nix_s_legacy_protocol_to_nix_store_serve_and_to_cairnd_serve() {
    if !peers() || !require_peer("nix-daemon") {
        return;
    }
    let nix = cairn_tests::NixDaemon::start_with("");
    let b = builder(1);
    let work = tempfile::tempdir().unwrap();
    let nix_store = work.path().join("nix-store-serve");
    let body = format!(
        "#!/bin/sh\nexec env NIX_REMOTE='unix://{}?root={}' nix-store \"$@\"\n",
        nix.socket().display(),
        nix.root().display()
    );
    cairn_tests::write_exec(&nix_store, body.as_bytes());
    let nix_store = nix_store.display().to_string();
    let cairnd = cairnd_program(&b, work.path(), "cairnd-serve", "\"$@\"");
    let here = builder(1);
    let src = work.path().join("src.txt");
    std::fs::write(&src, b"an input source\n").unwrap();
    for (program, tag) in [(&nix_store, "legacy-nix"), (&cairnd, "legacy-cairn")] {
        let d = dispatcher(&format!("ssh://localhost?remote-program={program} x86_64-linux"), 0, &[]);
        let args = [("tag", format!("\"{tag}\"")), ("seconds", "0".to_owned()), ("src", src.display().to_string())];
        let args: Vec<(&str, &str)> = args.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let drvs = instantiate(&d, "slow.nix", &args);
        let realised = realise(&d, &drvs);
        assert_eq!(builders(&d)[0]["built"], 1, "{tag}: built there");
        let out = realised[0]["outputs"]["out"].as_str().unwrap();
        assert_eq!(d.ok(&["cat", out]), format!("done {tag}\nan input source\n"));
        assert!(d.ok(&["log", &drvs[0]]).contains(&format!("start {tag}")), "{tag}: the builder's output is the log");
        // The same output as a build here.
        let local = realise(&here, &instantiate(&here, "slow.nix", &args));
        assert_eq!(output_hashes(&d, &realised), output_hashes(&here, &local), "{tag}");
    }
    // A remote program that speaks the other protocol is named in the machine's error.
    let stdio = cairnd_program(&b, work.path(), "speaks-the-worker-protocol", "--stdio");
    let wrong = dispatcher(&format!("ssh://localhost?remote-program={stdio} x86_64-linux"), 0, &[]);
    let drvs = instantiate(&wrong, "slow.nix", &[("tag", "\"wrong\""), ("seconds", "0")]);
    let e = failure(&wrong, &[&["realise"][..], &drvs.iter().map(String::as_str).collect::<Vec<_>>()].concat());
    assert!(e.contains("localhost"), "{e}");
    let down = builders(&wrong);
    assert!(down[0]["lastError"].as_str().is_some_and(|m| m.contains("legacy SSH protocol")), "{down:?}");
}

/// A build's time limits go with it to the builder, as Nix's `build-remote` sends its
/// `timeout` and `max-silent-time`: over the worker protocol and the legacy one, to a cairnd
/// with no limit of its own, a build that sleeps past them fails as timed out there, in
/// seconds rather than after it. (A real `nix-store --serve` on a daemon's store drops them —
/// Nix 2.8's own FIXME — so only one that opens its store itself would apply them.)
#[test]
fn a_build_s_time_limits_go_with_it_to_the_builder() {
    if !peers() {
        return;
    }
    let b = builder(1);
    let work = tempfile::tempdir().unwrap();
    let serve = cairnd_program(&b, work.path(), "cairnd-serve", "\"$@\"");
    for (machine, limit) in [
        (unix_machine(&b, 1), "timeout = 2"),
        (unix_machine(&b, 1), "max-silent-time = 2"),
        (format!("ssh://localhost?remote-program={serve} x86_64-linux"), "max-silent-time = 2"),
        (format!("ssh://localhost?remote-program={serve} x86_64-linux"), "timeout = 2"),
    ] {
        let d = TestStore::builder()
            .store_dir("/nix/store")
            .config(&format!("{BUILD}max-jobs = 0\n{limit}\nbuilders = {}\n", toml_string(&machine)))
            .start();
        let tag = format!("\"limit-{}-{}\"", limit.split(' ').next().unwrap(), machine.len());
        let drvs = instantiate(&d, "slow.nix", &[("tag", &tag), ("seconds", "60")]);
        let started = std::time::Instant::now();
        let e = failure(&d, &[&["realise"][..], &drvs.iter().map(String::as_str).collect::<Vec<_>>()].concat());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{machine} {limit}: the limit did not go along"
        );
        assert!(e.contains("timed out") || e.contains("silent"), "{machine} {limit}: {e}");
    }
}

#[test]
fn prefer_local_build_stays_here_while_this_machine_may_build() {
    if !peers() {
        return;
    }
    let b = builder(1);
    let args = [("tag", "\"pref\""), ("seconds", "0"), ("preferLocal", "true")];
    let here = dispatcher(&unix_machine(&b, 1), 1, &[]);
    let realised = realise(&here, &instantiate(&here, "slow.nix", &args));
    assert!(realised[0]["outputs"]["out"].is_string());
    assert_eq!(builders(&here)[0]["built"], 0, "built here");
    // With max-jobs = 0 this machine may not build it: it goes out after all.
    let only_remote = dispatcher(&unix_machine(&b, 1), 0, &[]);
    realise(&only_remote, &instantiate(&only_remote, "slow.nix", &args));
    assert_eq!(builders(&only_remote)[0]["built"], 1);
}

#[test]
fn with_builders_use_substitutes_a_builder_fetches_inputs_from_its_own_caches() {
    if !peers() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let d = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!("{BUILD}max-jobs = 0\nbuilders-use-substitutes = true\n"))
        .start();
    let src = work.path().join("input.txt");
    std::fs::write(&src, b"from the cache\n").unwrap();
    let drvs = instantiate(&d, "slow.nix", &[("tag", "\"sub\""), ("seconds", "0"), ("src", src.to_str().unwrap())]);
    let input = d.ok(&["references", &drvs[0]]).lines().find(|l| l.ends_with("-input.txt")).unwrap().to_owned();
    // The input goes into a signed binary cache the builder trusts.
    let (sk, pk) = (work.path().join("sk"), work.path().join("pk"));
    d.ok(&["key", "generate", "builders-cache-1", sk.to_str().unwrap(), pk.to_str().unwrap()]);
    let cache = format!("file://{}", work.path().join("cache").display());
    d.ok(&["copy", "--to", &cache, "--secret-key-file", sk.to_str().unwrap(), &input]);
    let public = std::fs::read_to_string(&pk).unwrap();
    let b = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!(
            "{BUILD}max-jobs = 1\nsubstituters = [\"{cache}\"]\ntrusted-public-keys = [\"{}\"]\n",
            public.trim()
        ))
        .start();
    let out = d.run(&["realise", "--json", "--builders", &unix_machine(&b, 1), &drvs[0]], b"");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), d.log());
    let realised: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d.ok(&["cat", realised[0]["outputs"]["out"].as_str().unwrap()]), "done sub\nfrom the cache\n");
    let all = builders(&d);
    assert_eq!((all[0]["built"].as_u64(), all[0]["narsSent"].as_u64()), (Some(1), Some(0)), "{all:?}");
    let sigs = json(&b.ok(&["path-info", "--json", &input]));
    assert!(sigs[0]["signatures"].to_string().contains("builders-cache-1:"), "substituted there: {sigs}");
}

#[test]
fn a_builder_that_refuses_the_build_is_marked_down_and_another_builds_it() {
    if !peers() {
        return;
    }
    // A cairnd of another user that trusts nobody: it refuses input-addressed builds from
    // this (root) client, as nix-daemon refuses them from untrusted users.
    let refusing = TestStore::builder()
        .store_dir("/nix/store")
        .as_user(4242)
        .config(&format!("{BUILD}max-jobs = 1\ntrusted-users = []\n"))
        .start();
    let willing = builder(1);
    let d = dispatcher(&format!("{}\n{}", unix_machine(&refusing, 1), unix_machine(&willing, 1)), 0, &[]);
    let drvs = instantiate(&d, "slow.nix", &[("tag", "\"refused\""), ("seconds", "0")]);
    let realised = realise(&d, &drvs);
    assert_eq!(d.ok(&["cat", realised[0]["outputs"]["out"].as_str().unwrap()]), "done refused\n");
    let all = builders(&d);
    let r = builder_named(&all, &nix_socket(&refusing));
    assert_eq!(r["state"], "down", "{r}");
    assert!(r["lastError"].as_str().unwrap_or("").contains("refused"), "{r}");
    assert_eq!(builder_named(&all, &nix_socket(&willing))["built"], 1);
}

#[test]
fn a_builder_speaking_garbage_is_marked_down_and_the_daemon_goes_on() {
    if !peers() {
        return;
    }
    // Something on a socket that answers every connection with bytes no daemon sends: a
    // huge length where the handshake's magic should be, then hangs up.
    let work = tempfile::tempdir().unwrap();
    let sock = work.path().join("liar.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { break };
            use std::io::Write;
            let _ = s.write_all(&[0xff; 4096]);
        }
    });
    let honest = builder(1);
    let spec = format!("unix://{} x86_64-linux\n{}", sock.display(), unix_machine(&honest, 1));
    let d = dispatcher(&spec, 0, &[]);
    let drvs = instantiate(&d, "slow.nix", &[("tag", "\"garbage\""), ("seconds", "0")]);
    let realised = realise(&d, &drvs);
    assert_eq!(d.ok(&["cat", realised[0]["outputs"]["out"].as_str().unwrap()]), "done garbage\n");
    let all = builders(&d);
    let liar = all.iter().find(|b| b["uri"].as_str().unwrap().contains("liar.sock")).unwrap();
    assert_eq!(liar["state"], "down", "{liar}");
    assert!(liar["lastError"].as_str().unwrap_or("").contains("cannot connect"), "{liar}");
    // The daemon serves on.
    d.ok(&["verify"]);
    let more = instantiate(&d, "slow.nix", &[("tag", "\"after\""), ("seconds", "0")]);
    realise(&d, &more);
}
