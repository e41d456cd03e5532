//! `--check`, `--repair` and keep-going, against real Nix 2.8.
//!
//! Each derivation is instantiated by `nix-instantiate`, exported into cairn and realised by
//! both: `nix-store --realise` (sandboxed, private store) and `cairn realise`. Both must give the
//! same verdicts, the same words for non-determinism and the same exit codes (Nix's
//! `Worker::exitStatus`: 100 failed build, 104 not deterministic, 1 otherwise).
//!
//! Needs `nix-instantiate`/`nix-store` (Debian `nix-bin`) and `/bin/busybox` (`busybox-static`).

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use cairn_tests::{line, processes, require_peer, NixStore, TestStore};

const BUSYBOX: &str = "/bin/busybox";

/// Real Nix and cairn side by side, each building with `jobs` builds at once.
struct Pair {
    nix: NixStore,
    cairn: TestStore,
    jobs: usize,
    exprs: tempfile::TempDir,
}

impl Pair {
    fn new(jobs: usize) -> Option<Pair> {
        if !require_peer(BUSYBOX) || !require_peer("nix-instantiate") {
            return None;
        }
        let cairn = TestStore::builder()
            .store_dir("/nix/store")
            .config(&format!("sandbox-paths = [\"/bin/sh={BUSYBOX}\"]\nmax-jobs = {jobs}\n"))
            .start();
        Some(Pair { nix: NixStore::new(), cairn, jobs, exprs: tempfile::tempdir().unwrap() })
    }

    fn nix(&self, args: &[&str]) -> Output {
        let config = format!(
            "substituters =\nexperimental-features = nix-command\nbuild-users-group =\nsandbox = true\n\
             sandbox-paths = /bin/sh={BUSYBOX}\nmax-jobs = {}\n",
            self.jobs
        );
        self.nix.cmd(args[0]).env("NIX_CONFIG", config).args(&args[1..]).output().unwrap()
    }

    /// Instantiates `expr` with Nix and imports the derivation's closure into cairn.
    fn instantiate(&self, name: &str, expr: &str) -> String {
        let file = self.exprs.path().join(format!("{name}.nix"));
        std::fs::write(&file, expr).unwrap();
        let out = self.nix(&["nix-instantiate", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let drv = line(&String::from_utf8(out.stdout).unwrap()).split('!').next().unwrap().to_owned();
        let closure = self.nix(&["nix-store", "-qR", &drv]);
        let closure = String::from_utf8(closure.stdout).unwrap();
        let mut export = vec!["nix-store", "--export"];
        export.extend(closure.lines());
        let stream = self.nix(&export);
        assert!(stream.status.success(), "{}", String::from_utf8_lossy(&stream.stderr));
        self.cairn.ok_bytes(&["import"], &stream.stdout);
        drv
    }

    fn nix_realise(&self, args: &[&str]) -> Output {
        let mut a = vec!["nix-store", "--realise"];
        a.extend(args);
        self.nix(&a)
    }

    fn cairn_realise(&self, args: &[&str]) -> Output {
        let mut a = vec!["realise"];
        a.extend(args);
        self.cairn.run(&a, b"")
    }

    /// Where Nix keeps its store's files.
    fn nix_real(&self) -> String {
        format!("{}/nix/store", self.nix.root.path().display())
    }

    /// Stderr with both stores' real directories written as the logical `/nix/store`.
    fn said(&self, out: &Output) -> String {
        String::from_utf8_lossy(&out.stderr)
            .replace(&self.nix_real(), "/nix/store")
            .replace(&self.cairn.real_store_dir().display().to_string(), "/nix/store")
    }

    fn cairn_valid(&self, p: &str) -> bool {
        self.cairn.run(&["path-info", p], b"").status.success()
    }

    fn nix_valid(&self, p: &str) -> bool {
        self.nix(&["nix-store", "--check-validity", p]).status.success()
    }

    fn output_of(&self, drv: &str) -> String {
        line(&self.cairn.ok(&["derivation", "output-paths", drv]))
    }
}

fn drv_expr(name: &str, script: &str) -> String {
    format!(
        "derivation {{ name = \"{name}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" {script:?} ]; }}"
    )
}

/// The line of Nix's stderr that says `needle`, without its `error: ` prefix.
fn nix_error_line(said: &str, needle: &str) -> String {
    said.lines()
        .find(|l| l.contains(needle))
        .map(|l| l.trim_start_matches("error: ").trim().to_owned())
        .unwrap_or_else(|| panic!("Nix did not say '{needle}':\n{said}"))
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn nar_hash(s: &TestStore, p: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["path-info", "--json", p])).unwrap();
    v[0]["narHash"].as_str().unwrap().to_owned()
}

#[test]
fn check_passes_for_a_deterministic_build_and_reports_a_random_one_as_nix_does() {
    let Some(t) = Pair::new(2) else { return };
    let same = t.instantiate("same", &drv_expr("same", "echo hello > $out"));
    let random = t.instantiate("random", &drv_expr("random", "head -c 16 /dev/urandom > $out"));
    for d in [&same, &random] {
        let n = t.nix_realise(&[d]);
        assert!(n.status.success(), "{}", String::from_utf8_lossy(&n.stderr));
        let c = t.cairn_realise(&[d]);
        assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    }
    let random_out = t.output_of(&random);
    let registered = nar_hash(&t.cairn, &random_out);

    // Deterministic: both pass, printing the output.
    let n = t.nix_realise(&["--check", &same]);
    let c = t.cairn_realise(&["--check", &same]);
    assert!(n.status.success(), "{}", t.said(&n));
    assert!(c.status.success(), "{}", t.said(&c));
    assert_eq!(String::from_utf8_lossy(&c.stdout), String::from_utf8_lossy(&n.stdout));

    // Random: both fail with Nix's words and exit code 104.
    let n = t.nix_realise(&["--check", &random]);
    let c = t.cairn_realise(&["--check", &random]);
    let said = nix_error_line(&t.said(&n), "may not be deterministic");
    assert_eq!(said, format!("derivation '{random}' may not be deterministic: output '{random_out}' differs"));
    assert!(t.said(&c).contains(&said), "cairn says what Nix says ({said}):\n{}", t.said(&c));
    assert_eq!(code(&n), Some(104), "{}", t.said(&n));
    assert_eq!(code(&c), Some(104), "{}", t.said(&c));
    // Nothing registered changed, and nothing was kept.
    assert_eq!(nar_hash(&t.cairn, &random_out), registered);
    let base = random_out.rsplit('/').next().unwrap();
    assert!(!t.cairn.store_entries().iter().any(|e| e.ends_with(".check")));

    // With --keep-failed, both keep the new output as OUTPUT.check and name it.
    let n = t.nix_realise(&["--check", "--keep-failed", &random]);
    let c = t.cairn_realise(&["--check", "--keep-failed", &random]);
    let said = nix_error_line(&t.said(&n), "may not be deterministic");
    assert_eq!(
        said,
        format!(
            "derivation '{random}' may not be deterministic: output '{random_out}' differs from '{random_out}.check'"
        )
    );
    assert!(t.said(&c).contains(&said), "cairn says what Nix says ({said}):\n{}", t.said(&c));
    assert_eq!((code(&n), code(&c)), (Some(104), Some(104)));
    let kept = t.cairn.real_store_dir().join(format!("{base}.check"));
    assert_eq!(std::fs::read(&kept).unwrap().len(), 16, "the new output is kept");
    assert!(Path::new(&format!("{}/{base}.check", t.nix_real())).exists());
    assert_eq!(nar_hash(&t.cairn, &random_out), registered);
    let _ = std::process::Command::new("chmod").arg("-R").arg("u+w").arg(&kept).status();
    let _ = std::fs::remove_file(&kept);
    t.cairn.ok(&["verify", "--check-contents"]);
    // The build directory kept for the user is the test's to remove.
    let ours = format!("-{}-", t.cairn.pid());
    for e in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("cairn-build-random-") && name.contains(&ours) {
            let _ = std::process::Command::new("rm").arg("-rf").arg(e.path()).status();
        }
    }
}

#[test]
fn check_of_a_derivation_whose_outputs_are_not_valid_is_refused_as_nix_refuses_it() {
    let Some(t) = Pair::new(2) else { return };
    let never = t.instantiate("never-built", &drv_expr("never-built", "echo x > $out"));
    let n = t.nix_realise(&["--check", &never]);
    let c = t.cairn_realise(&["--check", &never]);
    let said = nix_error_line(&t.said(&n), "checking is not possible");
    assert_eq!(said, format!("some outputs of '{never}' are not valid, so checking is not possible"));
    assert!(t.said(&c).contains(&said), "{}", t.said(&c));
    assert_eq!((code(&n), code(&c)), (Some(1), Some(1)));
    // Neither built it.
    let out = t.output_of(&never);
    assert!(!t.nix_valid(&out) && !t.cairn_valid(&out));
}

/// Makes a store path's file (or every file of a directory) writable and appends to it.
fn corrupt(real: &Path) {
    assert!(std::process::Command::new("chmod").arg("-R").arg("u+w").arg(real).status().unwrap().success());
    let file = if real.is_dir() { real.join("data") } else { real.to_path_buf() };
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(b"corrupted\n");
    std::fs::write(&file, bytes).unwrap();
    assert!(std::process::Command::new("chmod").arg("-R").arg("a-w").arg(real).status().unwrap().success());
}

#[test]
fn repair_rebuilds_corrupted_and_missing_outputs_and_their_closure() {
    let Some(t) = Pair::new(2) else { return };
    let dep = t.instantiate("dep", &drv_expr("dep", "mkdir $out; echo dependency > $out/data"));
    let top = t.instantiate(
        "top",
        &format!(
            "let dep = import {}; in derivation {{ name = \"top\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
             inherit dep; args = [ \"-c\" \"mkdir $out; echo $dep > $out/ref; echo top > $out/data\" ]; }}",
            t.exprs.path().join("dep.nix").display()
        ),
    );
    assert!(t.cairn_realise(&[&top]).status.success());
    let (dep_out, top_out) = (t.output_of(&dep), t.output_of(&top));
    let real = |p: &str| t.cairn.real_store_dir().join(p.rsplit('/').next().unwrap());
    let before = (nar_hash(&t.cairn, &dep_out), nar_hash(&t.cairn, &top_out));
    // The same bytes as Nix builds.
    let n = t.nix_realise(&[&top]);
    assert!(n.status.success(), "{}", t.said(&n));
    let info: serde_json::Value =
        serde_json::from_slice(&t.nix(&["nix", "path-info", "--json", &top_out]).stdout).unwrap();
    assert_eq!(info[0]["narHash"].as_str(), Some(before.1.as_str()));

    // The output itself: verify sees it, a normal realise does not mend it, --repair does.
    corrupt(&real(&top_out));
    let v = t.cairn.run(&["verify", "--check-contents"], b"");
    assert!(!v.status.success());
    assert!(String::from_utf8_lossy(&v.stdout).contains(&format!("path '{top_out}' was modified!")));
    t.cairn.ok(&["realise", &top]);
    assert!(!t.cairn.run(&["verify", "--check-contents"], b"").status.success(), "valid outputs are not rebuilt");
    let r = t.cairn_realise(&["--repair", &top]);
    assert!(r.status.success(), "{}", t.said(&r));
    t.cairn.ok(&["verify", "--check-contents"]);
    assert_eq!(std::fs::read_to_string(real(&top_out).join("data")).unwrap(), "top\n");

    // A path of the output closure, its output good: its deriver is rebuilt.
    corrupt(&real(&dep_out));
    let r = t.cairn_realise(&["--repair", &top]);
    assert!(r.status.success(), "{}", t.said(&r));
    t.cairn.ok(&["verify", "--check-contents"]);
    assert_eq!(std::fs::read_to_string(real(&dep_out).join("data")).unwrap(), "dependency\n");

    // A missing output.
    assert!(std::process::Command::new("chmod").arg("-R").arg("u+w").arg(real(&top_out)).status().unwrap().success());
    std::fs::remove_dir_all(real(&top_out)).unwrap();
    let r = t.cairn_realise(&["--repair", &top]);
    assert!(r.status.success(), "{}", t.said(&r));
    t.cairn.ok(&["verify", "--check-contents"]);
    assert_eq!((nar_hash(&t.cairn, &dep_out), nar_hash(&t.cairn, &top_out)), before, "nothing re-registered");
}

#[test]
fn repair_of_a_non_deterministic_output_keeps_what_is_registered() {
    let Some(t) = Pair::new(2) else { return };
    let random = t.instantiate("random", &drv_expr("random", "head -c 16 /dev/urandom > $out"));
    assert!(t.cairn_realise(&[&random]).status.success());
    let out = t.output_of(&random);
    let registered = nar_hash(&t.cairn, &out);
    corrupt(&t.cairn.real_store_dir().join(out.rsplit('/').next().unwrap()));
    let r = t.cairn_realise(&["--repair", &random]);
    assert!(!r.status.success());
    assert!(t.said(&r).contains(&format!("cannot repair output '{out}' of '{random}'")), "{}", t.said(&r));
    assert_eq!(nar_hash(&t.cairn, &out), registered, "the registered NAR hash stays");
}

/// With one job slot, a failing derivation (named to sort first, as Nix orders its goals) and
/// two independent ones: without `-k` neither tool starts another build after the failure and
/// both exit 100; with `-k` both build the others and still exit 100.
#[test]
fn without_keep_going_no_build_starts_after_a_failure_and_the_exit_code_is_nixs() {
    let Some(t) = Pair::new(1) else { return };
    let fail = t.instantiate("a-fail", &drv_expr("a-fail", "echo failing; exit 1"));
    let b = t.instantiate("b-ok", &drv_expr("b-ok", "echo b > $out"));
    let c = t.instantiate("c-ok", &drv_expr("c-ok", "echo c > $out"));
    let (b_out, c_out) = (t.output_of(&b), t.output_of(&c));

    let n = t.nix_realise(&[&fail, &b, &c]);
    let k = t.cairn_realise(&[&fail, &b, &c]);
    assert_eq!(code(&n), Some(100), "{}", t.said(&n));
    assert_eq!(code(&k), Some(100), "{}", t.said(&k));
    let said = nix_error_line(&t.said(&n), "failed with exit code 1");
    assert!(t.said(&k).contains(&said), "cairn says what Nix says ({said}):\n{}", t.said(&k));
    for p in [&b_out, &c_out] {
        assert!(!t.nix_valid(p), "Nix started nothing after the failure");
        assert!(!t.cairn_valid(p), "cairn started nothing after the failure");
    }
    assert!(!t.cairn.run(&["log", &b], b"").status.success(), "b never ran: no log");

    let n = t.nix_realise(&["--keep-going", &fail, &b, &c]);
    let k = t.cairn_realise(&["--keep-going", &fail, &b, &c]);
    assert_eq!((code(&n), code(&k)), (Some(100), Some(100)), "{}\n{}", t.said(&n), t.said(&k));
    for p in [&b_out, &c_out] {
        assert!(t.nix_valid(p) && t.cairn_valid(p), "with -k everything buildable is built: {p}");
    }
}

/// Builds start in Nix's order — by derivation name, whatever the order they were asked in — so
/// without `-k` the same builds happen before a failure stops the rest.
#[test]
fn builds_start_in_name_order_so_a_failure_stops_the_same_ones_as_in_nix() {
    let Some(t) = Pair::new(1) else { return };
    let fail = t.instantiate("zz-fail", &drv_expr("zz-fail", "echo failing; exit 1"));
    let ok = t.instantiate("aa-ok", &drv_expr("aa-ok", "echo ok > $out"));
    let late = t.instantiate("zzz-late", &drv_expr("zzz-late", "echo late > $out"));
    let (ok_out, late_out) = (t.output_of(&ok), t.output_of(&late));
    // Asked for failure first: the one named before it is built all the same, the one after not.
    let n = t.nix_realise(&[&fail, &late, &ok]);
    let k = t.cairn_realise(&[&fail, &late, &ok]);
    assert_eq!((code(&n), code(&k)), (Some(100), Some(100)), "{}\n{}", t.said(&n), t.said(&k));
    assert!(t.nix_valid(&ok_out) && t.cairn_valid(&ok_out), "'aa-ok' is built first by both");
    assert!(!t.nix_valid(&late_out) && !t.cairn_valid(&late_out), "'zzz-late' is not started by either");
}

/// Nix kills the builds still running when a failure ends a run without `-k` (its goals are
/// destroyed); so does cairn, and it leaves no process behind.
#[test]
fn without_keep_going_running_builds_are_killed_when_one_fails() {
    let Some(t) = Pair::new(2) else { return };
    let fail = t.instantiate("a-fail-soon", &drv_expr("a-fail-soon", "sleep 1; exit 3"));
    let slow = t.instantiate("b-slow", &drv_expr("b-slow", "sleep 41; echo late > $out"));
    let slow_out = t.output_of(&slow);
    for (who, run) in [("nix", 0), ("cairn", 1)] {
        let started = Instant::now();
        let out = if run == 0 { t.nix_realise(&[&fail, &slow]) } else { t.cairn_realise(&[&fail, &slow]) };
        assert_eq!(code(&out), Some(100), "{who}: {}", t.said(&out));
        assert!(started.elapsed() < Duration::from_secs(25), "{who} waited for the slow build");
    }
    assert!(!t.nix_valid(&slow_out) && !t.cairn_valid(&slow_out));
    std::thread::sleep(Duration::from_millis(500));
    assert!(processes(&["sleep", "41"]).is_empty(), "a builder outlived its build");
}

#[test]
fn a_timed_out_build_exits_101_as_in_nix() {
    let Some(t) = Pair::new(1) else { return };
    let slow = t.instantiate("slow", &drv_expr("slow", "sleep 30; echo > $out"));
    let n = t.nix_realise(&["--timeout", "1", &slow]);
    assert_eq!(code(&n), Some(101), "{}", t.said(&n));
    let mut t = t;
    t.cairn.stop();
    let config = std::fs::read_to_string(&t.cairn.config).unwrap();
    std::fs::write(&t.cairn.config, format!("{config}timeout = 1\n")).unwrap();
    t.cairn.restart();
    let k = t.cairn_realise(&[&slow]);
    assert_eq!(code(&k), Some(101), "{}", t.said(&k));
}
