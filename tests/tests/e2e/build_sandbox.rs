//! Builds in the real cairnd's sandbox: what a builder can and cannot do, how failures,
//! timeouts and stray processes end, and what gets registered. Builders are shell scripts run by
//! a static busybox bound at `/bin/sh` (`sandbox-paths`), as Nix users do on Debian.
//!
//! Needs `/bin/busybox` (Debian `busybox-static`); `.ci/run` installs it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_nix::hash::Encoding;
use cairn_tests::{processes, require_peer, TestStore};

const BUSYBOX: &str = "/bin/busybox";

fn store(extra: &str) -> Option<TestStore> {
    if !require_peer(BUSYBOX) {
        return None;
    }
    Some(
        TestStore::builder()
            .store_dir("/nix/store")
            .config(&format!("sandbox-paths = [\"/bin/sh={BUSYBOX}\"]\nmax-jobs = 4\n{extra}"))
            .start(),
    )
}

/// A derivation's JSON: `script` run by `/bin/sh -c`, inputs given as (drv, output path).
pub(crate) fn drv_json(name: &str, script: &str, inputs: &[(&str, &str)], fixed: Option<(&str, &str, &str)>) -> String {
    let mut env = BTreeMap::from([
        ("name".to_owned(), name.to_owned()),
        ("builder".to_owned(), "/bin/sh".to_owned()),
        ("system".to_owned(), "x86_64-linux".to_owned()),
        ("out".to_owned(), String::new()),
    ]);
    for (i, (_, out)) in inputs.iter().enumerate() {
        env.insert(format!("in{i}"), (*out).to_owned());
    }
    let out = match fixed {
        Some((mode, algo, hash)) => {
            let algo = if mode == "recursive" { format!("r:{algo}") } else { algo.to_owned() };
            serde_json::json!({ "path": "", "hashAlgo": algo, "hash": hash })
        }
        None => serde_json::json!({ "path": "" }),
    };
    let input_drvs: BTreeMap<&str, Vec<&str>> = inputs.iter().map(|(d, _)| (*d, vec!["out"])).collect();
    serde_json::json!({
        "outputs": { "out": out },
        "inputSrcs": [],
        "inputDrvs": input_drvs,
        "system": "x86_64-linux",
        "builder": "/bin/sh",
        "args": ["-c", script],
        "env": env,
    })
    .to_string()
}

/// Adds a derivation; returns (drv path, output path).
fn add(s: &TestStore, json: &str) -> (String, String) {
    let f = s.root.path().join(format!("drv-{}.json", COUNTER.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&f, json).unwrap();
    let drv = s.ok(&["derivation", "add", f.to_str().unwrap()]).trim().to_owned();
    let out = s.ok(&["derivation", "output-paths", &drv]).trim().to_owned();
    (drv, out)
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn is_valid(s: &TestStore, p: &str) -> bool {
    s.run(&["path-info", p], b"").status.success()
}

/// Build directories this daemon left behind, once its background removals had 10 s.
fn build_dirs(s: &TestStore) -> Vec<String> {
    let pid = s.pid();
    let started = Instant::now();
    loop {
        let left: Vec<String> = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            // Not the roots' shared files (`cairn-build-@shared-PID-0`), kept while it runs.
            .filter(|n| n.starts_with("cairn-build-") && !n.contains('@') && n.contains(&format!("-{pid}-")))
            .collect();
        if left.is_empty() || started.elapsed() > Duration::from_secs(10) {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_chain_builds_inputs_first_and_registers_outputs_with_their_deriver() {
    let Some(s) = store("") else { return };
    let (a, a_out) = add(&s, &drv_json("a", "echo a > $out", &[], None));
    let (b, b_out) =
        add(&s, &drv_json("b", "mkdir $out; cat $in0 > $out/a; echo $in0 > $out/ref", &[(&a, &a_out)], None));
    let (c, c_out) = add(&s, &drv_json("c", "cat $in0/a > $out; echo $in0 >> $out", &[(&b, &b_out)], None));
    let printed = s.ok(&["realise", &c]);
    assert_eq!(printed.trim(), c_out);
    for (drv, out) in [(&a, &a_out), (&b, &b_out), (&c, &c_out)] {
        let info: serde_json::Value = serde_json::from_str(&s.ok(&["path-info", "--json", out])).unwrap();
        assert_eq!(info[0]["deriver"], drv.as_str(), "{out}");
        assert_eq!(info[0]["ultimate"], true);
    }
    // b refers to a (its output names it), c to b; a to nothing.
    assert_eq!(s.ok(&["references", &b_out]).trim(), a_out);
    assert_eq!(s.ok(&["references", &c_out]).trim(), b_out);
    assert_eq!(s.ok(&["cat", &c_out]), format!("a\n{b_out}\n"));
    // Built once: a second realise starts nothing and prints the same.
    let before = s.log().matches("building").count();
    assert_eq!(s.ok(&["realise", &c]).trim(), c_out);
    assert_eq!(s.log().matches("building").count(), before);
    assert!(build_dirs(&s).is_empty(), "build directories removed: {:?}", build_dirs(&s));
    // The log of each build is kept.
    assert!(s.ok(&["log", &b_out]).is_empty(), "b printed nothing");
    let (d, _) = add(&s, &drv_json("d", "echo hello from d; echo > $out", &[], None));
    s.ok(&["realise", &d]);
    assert_eq!(s.ok(&["log", &d]), "hello from d\n");
}

#[test]
fn a_path_deleted_and_built_anew_is_seen_with_its_new_contents_by_the_next_build() {
    // The store directory of a finished build's root is kept for the next build (a view, see
    // `cairn-build`'s `views`): one that held a path deleted since must not show it to a later
    // build with the contents it had then.
    let Some(s) = store("") else { return };
    let (x, x_out) = add(&s, &drv_json("x", "cat /proc/sys/kernel/random/uuid > $out", &[], None));
    let (y, y_out) = add(&s, &drv_json("y", "cat $in0 > $out", &[(&x, &x_out)], None));
    s.ok(&["realise", &y]);
    let first = s.ok(&["cat", &y_out]);
    assert_eq!(first, s.ok(&["cat", &x_out]));
    s.ok(&["delete", &y_out]);
    s.ok(&["delete", &x_out]);
    s.ok(&["realise", &y]);
    let (second, x_now) = (s.ok(&["cat", &y_out]), s.ok(&["cat", &x_out]));
    assert_ne!(x_now, first, "x was built anew, with other contents");
    assert_eq!(second, x_now, "y saw x as it is now, not as it was");
    s.ok(&["verify"]);
}

#[test]
fn a_failing_builder_reports_its_log_tail_and_registers_nothing() {
    let Some(s) = store("") else { return };
    let script = "mkdir $out; echo partial > $out/x; for i in $(seq 1 20); do echo line $i; done; exit 3";
    let (drv, out) = add(&s, &drv_json("fails", script, &[], None));
    let err = String::from_utf8(s.run(&["realise", &drv], b"").stderr).unwrap();
    assert!(err.contains(&format!("builder for '{drv}' failed with exit code 3;")), "{err}");
    assert!(
        err.contains("last 10 log lines:") && err.contains("       > line 20") && !err.contains("       > line 10\n"),
        "{err}"
    );
    assert!(err.contains("fails> line 1\n"), "the log streamed as it was written: {err}");
    assert!(err.trim_end().ends_with(&format!("cairn: build of '{drv}' failed")), "{err}");
    assert!(!is_valid(&s, &out));
    assert!(!s.real_store_dir().join(out.rsplit('/').next().unwrap()).exists(), "nothing placed in the store");
    let left = build_dirs(&s);
    assert!(left.is_empty(), "build directory left after 10 s: {left:?}\ncairnd's log:\n{}", s.log());
    assert_eq!(s.ok(&["log", &drv]).lines().count(), 20, "the whole log is kept");
    // The daemon goes on serving.
    let (ok, ok_out) = add(&s, &drv_json("fine", "echo > $out", &[], None));
    assert_eq!(s.ok(&["realise", &ok]).trim(), ok_out);
}

#[test]
fn keep_going_builds_what_does_not_need_the_failure_and_keep_failed_keeps_its_directory() {
    let Some(s) = store("") else { return };
    let (bad, bad_out) = add(&s, &drv_json("bad", "echo kept > /build/evidence; exit 1", &[], None));
    let (good, good_out) = add(&s, &drv_json("good", "sleep 1; echo > $out", &[], None));
    let (top, top_out) = add(&s, &drv_json("top", "echo > $out", &[(&bad, &bad_out), (&good, &good_out)], None));
    let r = s.run(&["realise", "-k", "-K", "--json", &top, &good], b"");
    assert!(!r.status.success());
    let results: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(results[1]["outputs"]["out"], good_out.as_str(), "the good one is built: {results}");
    let why = results[0]["error"].as_str().unwrap();
    assert_eq!(why, format!("1 dependencies of derivation '{top}' failed to build"), "as Nix says it");
    assert!(!is_valid(&s, &top_out) && is_valid(&s, &good_out));
    let err = String::from_utf8(r.stderr).unwrap();
    let kept = err.split("keeping build directory '").nth(1).and_then(|r| r.split('\'').next()).expect(&err);
    assert_eq!(std::fs::read_to_string(Path::new(kept).join("evidence")).unwrap(), "kept\n");
    // Open to the user who asked for it, whoever that is (as Nix makes it 0755): another user
    // reads what the builder left.
    if nix_is_root() {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(Path::new(kept).join("evidence"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n", "{}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::remove_dir_all(Path::new(kept).parent().unwrap().parent().unwrap()).unwrap();
}

/// A root daemon's supplementary groups do not reach the builder (in its user namespace they
/// would still open the host's files to it), as Nix drops them.
#[test]
fn the_builder_has_no_supplementary_group_of_the_daemons() {
    if !nix_is_root() {
        return; // a user's daemon keeps its user's groups, as Nix's does
    }
    // The daemon inherits the test process's groups: give it one (harmless to the other tests
    // of this process, whose daemons get it too).
    nix::unistd::setgroups(&[nix::unistd::Gid::from_raw(4242)]).unwrap();
    let Some(s) = store("") else { return };
    let (d, out) = add(&s, &drv_json("groups", "grep Groups /proc/self/status > $out", &[], None));
    s.ok(&["realise", &d]);
    let line = s.ok(&["cat", &out]);
    assert_eq!(line.trim_end(), "Groups:", "no supplementary group: {line:?}");
}

/// A kept build directory holds no input: linked ones are the store's own files.
#[test]
fn a_kept_build_directory_holds_no_link_to_the_store() {
    let Some(s) = store("") else { return };
    let (a, a_out) = add(&s, &drv_json("linked-input", "echo original > $out", &[], None));
    let (b, b_out) = add(&s, &drv_json("fails", "cat $in0 > /build/seen; mkdir $out; exit 1", &[(&a, &a_out)], None));
    s.ok(&["realise", &a]);
    let r = s.run(&["realise", "-K", &b], b"");
    assert!(!r.status.success());
    let err = String::from_utf8(r.stderr).unwrap();
    let kept = err.split("keeping build directory '").nth(1).and_then(|r| r.split('\'').next()).expect(&err);
    let kept = Path::new(kept);
    assert_eq!(std::fs::read_to_string(kept.join("seen")).unwrap(), "original\n", "the build saw its input");
    let root = kept.parent().unwrap();
    assert!(std::fs::symlink_metadata(root.join(a_out.trim_start_matches('/'))).is_err(), "the input is gone");
    assert!(root.join(b_out.trim_start_matches('/')).is_dir(), "the partial output stays");
    std::fs::remove_dir_all(root.parent().unwrap()).unwrap();
}

#[test]
fn a_timeout_kills_every_process_of_the_build() {
    let Some(s) = store("timeout = 2") else { return };
    let (drv, out) = add(&s, &drv_json("slow", "sleep 4242 & sleep 4243", &[], None));
    let started = Instant::now();
    let child = std::thread::spawn({
        let args = s.store_args();
        move || {
            std::process::Command::new(cairn_tests::bin_dir().join("cairn"))
                .args(&args)
                .args(["realise", &drv])
                .output()
                .unwrap()
        }
    });
    // While it runs, the builder's processes belong to a build uid, not to the daemon's user.
    let mut seen = Vec::new();
    while seen.is_empty() && started.elapsed() < Duration::from_secs(10) {
        seen = processes(&["sleep", "4242"]);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!seen.is_empty(), "the build's processes are visible from the host");
    let status = std::fs::read_to_string(format!("/proc/{}/status", seen[0])).unwrap_or_default();
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    if nix_is_root() {
        assert!(uid >= 30000, "builds run as a build uid, not root: {uid}");
    }
    let r = child.join().unwrap();
    let err = String::from_utf8(r.stderr).unwrap();
    assert!(err.contains("timed out after 2 seconds"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(200));
    assert!(processes(&["sleep", "4242"]).is_empty() && processes(&["sleep", "4243"]).is_empty(), "no process left");
    assert!(!is_valid(&s, &out));
    let left = build_dirs(&s);
    assert!(left.is_empty(), "build directory left after 10 s: {left:?}\ncairnd's log:\n{}", s.log());
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .is_some_and(|u| u.split_whitespace().next() == Some("0"))
}

#[test]
fn max_silent_time_and_background_children() {
    let Some(s) = store("max-silent-time = 1") else { return };
    let (drv, _) = add(&s, &drv_json("quiet", "echo one; sleep 30", &[], None));
    let started = Instant::now();
    let err = String::from_utf8(s.run(&["realise", &drv], b"").stderr).unwrap();
    assert!(err.contains("timed out after 1 seconds of silence"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // A builder that succeeds while a child still runs: the child dies with the build.
    let (bg, bg_out) = add(&s, &drv_json("bg", "sleep 4343 & echo done > $out", &[], None));
    assert_eq!(s.ok(&["realise", &bg]).trim(), bg_out);
    std::thread::sleep(Duration::from_millis(200));
    assert!(processes(&["sleep", "4343"]).is_empty(), "the background child was killed");
}

#[test]
fn only_fixed_output_builds_reach_the_network() {
    let Some(s) = store("") else { return };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    std::thread::spawn({
        let accepted = accepted.clone();
        move || {
            for c in listener.incoming() {
                accepted.fetch_add(1, Ordering::SeqCst);
                let mut c = c.unwrap();
                let _ = std::io::Write::write_all(&mut c, b"fetched\n");
                let mut sink = Vec::new();
                let _ = c.read_to_end(&mut sink);
            }
        }
    });
    let script = format!("nc 127.0.0.1 {port} </dev/null > $out; test -s $out");
    let (drv, _) = add(&s, &drv_json("no-net", &script, &[], None));
    let err = String::from_utf8(s.run(&["realise", &drv], b"").stderr).unwrap();
    assert!(err.contains("failed with exit code"), "{err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "an ordinary build cannot reach the host");
    // A fixed-output derivation keeps the host's network and must produce the declared bytes.
    let sha = sha256(b"fetched\n").encode(Encoding::Base16);
    let (fod, fod_out) = add(&s, &drv_json("fetched", &script, &[], Some(("flat", "sha256", &sha))));
    assert_eq!(s.ok(&["realise", &fod]).trim(), fod_out);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(s.ok(&["cat", &fod_out]), "fetched\n");
    let info: serde_json::Value = serde_json::from_str(&s.ok(&["path-info", "--json", &fod_out])).unwrap();
    assert_eq!(info[0]["ca"], format!("fixed:sha256:{}", sha256(b"fetched\n").encode(Encoding::Nix32)));
}

#[test]
fn the_host_and_the_inputs_are_out_of_reach() {
    let Some(s) = store("") else { return };
    let (a, a_out) = add(&s, &drv_json("input", "mkdir $out; echo original > $out/f", &[], None));
    s.ok(&["realise", &a]);
    let db = s.root.path().join("var/lib/cairn/db");
    assert!(db.exists());
    let script = format!(
        "cat {db} && exit 10; ls {real} && exit 11; echo x > $in0/f && exit 12; touch $in0/new && exit 13; \
         cat /etc/shadow && exit 14; echo > $out",
        db = db.display(),
        real = s.real_store_dir().display()
    );
    let (b, b_out) = add(&s, &drv_json("prober", &script, &[(&a, &a_out)], None));
    assert_eq!(s.ok(&["realise", &b]).trim(), b_out, "every attempt failed inside the sandbox");
    let log = s.ok(&["log", &b]);
    assert!(log.contains("Read-only file system"), "{log}");
    assert_eq!(s.ok(&["cat", &format!("{a_out}/f")]), "original\n");
    assert!(
        s.ok(&["verify", "--check-contents"]).is_empty() || !s.ok(&["verify", "--check-contents"]).contains("modified")
    );
}

/// Inputs that are not directories are linked or copied into the root, as Nix places them,
/// not bound: the builder must still not change the store through them, and a symlink is the
/// symlink it is in the store (a bind would have followed it on the host).
#[test]
fn file_and_symlink_inputs_are_seen_as_in_the_store_and_cannot_be_changed() {
    let Some(s) = store("") else { return };
    let (a, a_out) = add(&s, &drv_json("file-input", "echo original > $out; chmod 555 $out", &[], None));
    let (l, l_out) = add(&s, &drv_json("symlink-input", "ln -s /nix/store/nowhere-at-all $out", &[], None));
    s.ok(&["realise", &a, &l]);
    // With build users (a root daemon), the store directory is the build group's, as Nix makes
    // it: the builder cannot remove an input (unprivileged, the sandbox is all its own).
    let remove = if nix_is_root() { "rm -f $in0; test -e $in0 || exit 13; mv $in0 /build/x && exit 14;" } else { "" };
    let script = format!(
        "echo x > $in0 && exit 10; echo x >> $in0 && exit 11; chmod 777 $in0 && exit 12; {remove} \
         test -x $in0 || exit 15; test \"$(cat $in0)\" = original || exit 16; \
         test -L $in1 || exit 17; echo $(readlink $in1) > $out"
    );
    let (b, b_out) = add(&s, &drv_json("prober", &script, &[(&a, &a_out), (&l, &l_out)], None));
    assert_eq!(s.ok(&["realise", &b]).trim(), b_out, "every attempt failed inside the sandbox: {}", s.ok(&["log", &b]));
    assert_eq!(s.ok(&["cat", &b_out]), "/nix/store/nowhere-at-all\n");
    assert_eq!(s.ok(&["cat", &a_out]), "original\n");
    let verify = s.run(&["verify", "--check-contents"], b"");
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}

#[test]
fn outputs_are_canonical_and_setuid_modes_are_refused_to_the_builder() {
    let Some(s) = store("") else { return };
    // As Nix's system-call filter: the setuid and setgid chmods fail, the plain ones pass.
    let script = "mkdir $out; echo x > $out/suid; chmod 4755 $out/suid 2>/dev/null || echo refused; \
                  chmod 755 $out/suid; echo y > $out/sgid; chmod 2775 $out/sgid 2>/dev/null || echo refused; \
                  chmod 775 $out/sgid; mkdir -m 777 $out/d; ln -s suid $out/link; id -u; id -g";
    let (drv, out) = add(&s, &drv_json("modes", script, &[], None));
    s.ok(&["realise", &drv]);
    use std::os::unix::fs::MetadataExt;
    let real = s.real_store_dir().join(out.rsplit('/').next().unwrap());
    for (f, mode) in [("suid", 0o100555), ("sgid", 0o100555), ("d", 0o40555)] {
        let m = std::fs::symlink_metadata(real.join(f)).unwrap();
        assert_eq!(m.mode(), mode, "{f}: {:o}", m.mode());
        assert_eq!(m.mtime(), 1);
    }
    assert_eq!(
        s.ok(&["log", &drv]),
        "refused\nrefused\n1000\n100\n",
        "setuid and setgid modes refused; the builder sees itself as uid 1000, gid 100"
    );
}

#[test]
fn wrong_output_paths_and_unknown_derivations_are_refused() {
    let Some(s) = store("") else { return };
    let mut v: serde_json::Value = serde_json::from_str(&drv_json("liar", "echo > $out", &[], None)).unwrap();
    let claimed = "/nix/store/00000000000000000000000000000000-liar";
    v["outputs"]["out"]["path"] = claimed.into();
    let f = s.root.path().join("liar.json");
    std::fs::write(&f, v.to_string()).unwrap();
    let err = s.fail(&["derivation", "add", f.to_str().unwrap()], b"");
    assert!(err.contains(&format!("declares output 'out' at '{claimed}'")), "{err}");
    let err = s.fail(&["realise", "/nix/store/00000000000000000000000000000000-nothing.drv"], b"");
    assert!(err.contains("is not valid"), "{err}");
    let (a, _) = add(&s, &drv_json("a", "echo > $out", &[], None));
    let err = s.fail(&["realise", &format!("{a}!dev")], b"");
    assert!(err.contains("has no output 'dev'"), "{err}");
}

fn sha256(b: &[u8]) -> cairn_nix::Hash {
    cairn_nix::Hash::digest(cairn_nix::HashAlgo::Sha256, b)
}

/// One raw API call over the socket; returns the status line and body.
fn raw_query(s: &TestStore, body: &str) -> (String, String) {
    use std::io::Write;
    let mut c = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
    write!(
        c,
        "POST /v1/query HTTP/1.1\r\nHost: cairnd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    let status = answer.lines().next().unwrap_or_default().to_owned();
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[test]
fn hostile_derivations_are_refused_in_one_line_and_nothing_is_added() {
    let Some(s) = store("") else { return };
    let before = s.store_entries();
    let garbage = [
        "Derive([(\"out\",\"\",\"\",\"\")],[],[],\"x\",\"/bin/sh\",[],[(\"name\",\"x\"",
        "Derive(",
        "not a derivation at all",
        // An input derivation that is not in the store.
        "Derive([(\"out\",\"\",\"\",\"\")],[(\"/nix/store/00000000000000000000000000000000-gone.drv\",[\"out\"])],[],\
         \"x86_64-linux\",\"/bin/sh\",[],[(\"name\",\"x\"),(\"out\",\"\")])",
        // A name that is no store path name.
        "Derive([(\"out\",\"\",\"\",\"\")],[],[],\"x86_64-linux\",\"/bin/sh\",[],[(\"name\",\"../x\"),(\"out\",\"\")])",
        // A fixed output with a hash that is not one.
        "Derive([(\"out\",\"\",\"sha256\",\"zz\")],[],[],\"x86_64-linux\",\"/bin/sh\",[],[(\"name\",\"x\"),(\"out\",\"\")])",
    ];
    for aterm in garbage {
        let body = serde_json::json!({ "op": "add-derivation", "aterm": aterm }).to_string();
        let (status, answer) = raw_query(&s, &body);
        assert!(status.contains(" 400 ") || status.contains(" 404 "), "{aterm}: {status} {answer}");
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_else(|_| panic!("{answer}"));
        let msg = v["message"].as_str().unwrap();
        assert!(!msg.contains('\n') && !msg.is_empty(), "{msg}");
    }
    let f = s.root.path().join("bad.json");
    std::fs::write(&f, "{\"outputs\": 3}").unwrap();
    let err = s.fail(&["derivation", "add", f.to_str().unwrap()], b"");
    assert!(err.contains("is not a derivation in JSON"), "{err}");
    assert_eq!(s.store_entries(), before, "nothing was added");
    let (ok, ok_out) = add(&s, &drv_json("after", "echo > $out", &[], None));
    assert_eq!(s.ok(&["realise", &ok]).trim(), ok_out, "the daemon still builds");
}

#[test]
fn outputs_a_substituter_has_are_substituted_not_built() {
    let Some(a) = store("") else { return };
    let json = drv_json("cached", "echo built once > $out", &[], None);
    let (drv, out) = add(&a, &json);
    a.ok(&["realise", &drv]);
    let (sk, pk) = (a.root.path().join("sk"), a.root.path().join("pk"));
    a.ok(&["key", "generate", "builds-1", sk.to_str().unwrap(), pk.to_str().unwrap()]);
    let cache = a.root.path().join("cache");
    let url = format!("file://{}", cache.display());
    a.ok(&["copy", "--to", &url, "--secret-key-file", sk.to_str().unwrap(), &out]);
    let key = std::fs::read_to_string(&pk).unwrap();
    let Some(b) = store(&format!("substituters = [\"{url}\"]\ntrusted-public-keys = [\"{}\"]", key.trim())) else {
        return;
    };
    let (drv_b, out_b) = add(&b, &json);
    assert_eq!((drv_b.as_str(), out_b.as_str()), (drv.as_str(), out.as_str()));
    assert_eq!(b.ok(&["realise", &drv_b]).trim(), out);
    let log = b.log();
    assert!(log.contains("substituted instead of building"), "{log}");
    assert!(!log.contains("building drv="), "nothing was built: {log}");
    let info: serde_json::Value = serde_json::from_str(&b.ok(&["path-info", "--json", &out])).unwrap();
    assert!(info[0]["signatures"][0].as_str().unwrap().starts_with("builds-1:"), "{info}");
}

/// Another cairnd's store reached over SSH is a substituter: `ssh://` (the legacy protocol, its
/// `cairnd --serve`) and `ssh-ng://` (the worker protocol, its `cairnd --stdio`); and so is its
/// Nix socket, as `unix://`. Its unsigned
/// paths are taken only from a URL that says `?trusted=1` (otherwise the derivation is built,
/// and the client told why); its NARs are checked against what it says of them.
#[test]
fn another_cairnd_over_ssh_is_a_substituter() {
    let Some(a) = store("") else { return };
    let json = drv_json("over-ssh", "echo built once > $out", &[], None);
    let (drv, out) = add(&a, &json);
    a.ok(&["realise", &drv]);
    let program = a.root.path().join("cairnd-there");
    let script = format!(
        "#!/bin/sh\nexec env CAIRN_ROOT='{}' CAIRN_STORE_DIR=/nix/store CAIRN_SOCKET='{}' CAIRN_CONFIG='{}' '{}' \"$@\"\n",
        a.root.path().display(),
        a.socket.display(),
        a.config.display(),
        cairn_tests::bin_dir().join("cairnd").display()
    );
    cairn_tests::write_exec(&program, script.as_bytes());
    let hash_there = a.ok(&["path-info", "--json", &out]);
    let nar_hash = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()[0]["narHash"].clone();
    let there = a.socket.with_file_name("nix-socket");
    for (url, shown) in [
        (format!("ssh://localhost?remote-program={}", program.display()), "ssh://localhost".to_owned()),
        (format!("ssh-ng://localhost?remote-program={}", program.display()), "ssh-ng://localhost".to_owned()),
        (format!("unix://{}?priority=1", there.display()), format!("unix://{}", there.display())),
    ] {
        let Some(b) = store(&format!("substituters = [\"{url}\"]")) else { return };
        add(&b, &json);
        let built = b.run(&["realise", &drv], b"");
        assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
        let said = String::from_utf8_lossy(&built.stderr);
        assert!(said.contains(&format!("cannot substitute '{out}'")) && said.contains("not signed"), "{said}");
        assert!(b.log().contains("building drv="), "{shown}: built, since the substitute is not trusted");
        let Some(c) = store(&format!("substituters = [\"{url}&trusted=1\"]")) else { return };
        add(&c, &json);
        let fetched = c.run(&["realise", &drv], b"");
        assert!(fetched.status.success(), "{}", String::from_utf8_lossy(&fetched.stderr));
        let said = String::from_utf8_lossy(&fetched.stderr);
        assert!(said.contains(&format!("copying path '{out}' from '{shown}'...")), "{said}");
        assert!(!c.log().contains("building drv="), "{shown}: nothing was built");
        assert_eq!(nar_hash(&c.ok(&["path-info", "--json", &out])), nar_hash(&hash_there));
        assert_eq!(c.ok(&["cat", &out]), "built once\n");
    }
}

/// A derivation whose output no cache has is built, and the outputs it uses of its inputs are
/// substituted where a cache has them; an input substituted needs nothing of its own inputs.
#[test]
fn inputs_a_substituter_has_are_substituted_and_only_the_rest_is_built() {
    let Some(a) = store("") else { return };
    let low_json = drv_json("low", "echo low > $out", &[], None);
    let (low, low_out) = add(&a, &low_json);
    let mid_json = drv_json("mid", "read x < $in0; echo mid-$x > $out", &[(&low, &low_out)], None);
    let (mid, mid_out) = add(&a, &mid_json);
    a.ok(&["realise", &mid]);
    let (sk, pk) = (a.root.path().join("sk"), a.root.path().join("pk"));
    a.ok(&["key", "generate", "inputs-1", sk.to_str().unwrap(), pk.to_str().unwrap()]);
    let cache = a.root.path().join("cache");
    let url = format!("file://{}", cache.display());
    a.ok(&["copy", "--to", &url, "--secret-key-file", sk.to_str().unwrap(), &mid_out]);
    let key = std::fs::read_to_string(&pk).unwrap();
    let Some(b) = store(&format!("substituters = [\"{url}\"]\ntrusted-public-keys = [\"{}\"]", key.trim())) else {
        return;
    };
    add(&b, &low_json);
    add(&b, &mid_json);
    let (top, top_out) = add(&b, &drv_json("top", "read x < $in0; echo top-$x > $out", &[(&mid, &mid_out)], None));
    let out = b.run(&["realise", &top], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), top_out);
    // The client is told of each path as its download starts, as Nix's clients are.
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(&format!("copying path '{mid_out}' from '{url}'...")), "{said}");
    assert_eq!(b.ok(&["cat", &top_out]), "top-mid-low\n");
    let log = b.log();
    assert!(log.contains("substituted instead of building"), "{log}");
    assert!(is_valid(&b, &mid_out), "the input was substituted");
    assert!(!is_valid(&b, &low_out), "the input's input was neither fetched nor built: {log}");
    assert!(!log.contains("-mid.drv") && !log.contains("-low.drv"), "only the goal was built: {log}");
}

/// A cache that has a path but not all of its closure: the missing reference is built, then
/// the path itself is substituted rather than built, as Nix retries it.
#[test]
fn a_path_whose_closure_a_cache_lacks_is_substituted_once_the_rest_is_built() {
    let Some(a) = store("") else { return };
    let dep_json = drv_json("closure-dep", "echo dep > $out", &[], None);
    let (dep, dep_out) = add(&a, &dep_json);
    let top_json = drv_json("closure-top", "echo $in0 > $out", &[(&dep, &dep_out)], None);
    let (top, top_out) = add(&a, &top_json);
    a.ok(&["realise", &top]);
    let (sk, pk) = (a.root.path().join("sk"), a.root.path().join("pk"));
    a.ok(&["key", "generate", "closure-1", sk.to_str().unwrap(), pk.to_str().unwrap()]);
    let cache = a.root.path().join("cache");
    let url = format!("file://{}", cache.display());
    a.ok(&["copy", "--to", &url, "--secret-key-file", sk.to_str().unwrap(), &top_out]);
    let dep_narinfo = cache.join(format!("{}.narinfo", &dep_out["/nix/store/".len()..][..32]));
    std::fs::remove_file(&dep_narinfo).unwrap();
    let key = std::fs::read_to_string(&pk).unwrap();
    let Some(b) = store(&format!("substituters = [\"{url}\"]\ntrusted-public-keys = [\"{}\"]", key.trim())) else {
        return;
    };
    add(&b, &dep_json);
    add(&b, &top_json);
    let out = b.run(&["realise", &top], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), top_out);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(&format!("copying path '{top_out}' from '{url}'...")), "{said}");
    let log = b.log();
    assert!(log.contains("-closure-dep.drv"), "the reference was built: {log}");
    assert!(!log.contains(&format!("building drv={top}")), "the path was substituted, not built: {log}");
    let info: serde_json::Value = serde_json::from_str(&b.ok(&["path-info", "--json", &top_out])).unwrap();
    assert!(info[0]["signatures"][0].as_str().unwrap().starts_with("closure-1:"), "{info}");
}

/// A realisation roots its derivation and outputs for its client's process, as Nix's daemon
/// does for a session: a collection between the build and the client's own root (`realise -o`)
/// must not take the output just built. Here the client is this test process, on a connection
/// of its own, alive while `cairn gc` runs.
#[test]
fn a_realised_output_is_kept_for_its_client_until_the_client_roots_it() {
    let Some(s) = store("") else { return };
    let (drv, out) = add(&s, &drv_json("kept-for-its-client", "echo kept > $out", &[], None));
    let body = serde_json::json!({ "paths": [drv] }).to_string();
    let mut c = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
    write!(
        c,
        "POST /v1/realise HTTP/1.1\r\nHost: cairnd\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert!(answer.contains(r#""event":"done""#), "{answer}");
    // Nothing roots the output but this process's realisation.
    s.ok(&["gc"]);
    assert!(is_valid(&s, &out), "a collection took the output its client had just built");
    assert!(is_valid(&s, &drv), "a collection took the derivation its client realised");
}

/// As Nix's goals: a derivation whose wanted outputs are valid is not built again for its other
/// outputs — asked for by `DRV!out`, or needed by another derivation only for `out`.
#[test]
fn a_derivation_whose_wanted_outputs_are_valid_is_not_built_for_the_others() {
    let Some(s) = store("") else { return };
    let multi = serde_json::json!({
        "outputs": { "out": { "path": "" }, "dev": { "path": "" } },
        "inputSrcs": [], "inputDrvs": {}, "system": "x86_64-linux", "builder": "/bin/sh",
        "args": ["-c", "echo o > $out; echo d > $dev"],
        "env": { "name": "multi", "builder": "/bin/sh", "system": "x86_64-linux", "out": "", "dev": "" },
    });
    let f = s.root.path().join("multi.json");
    std::fs::write(&f, multi.to_string()).unwrap();
    let drv = s.ok(&["derivation", "add", f.to_str().unwrap()]).trim().to_owned();
    let built: serde_json::Value = serde_json::from_str(&s.ok(&["realise", "--json", &drv])).unwrap();
    let (out, dev) = (
        built[0]["outputs"]["out"].as_str().unwrap().to_owned(),
        built[0]["outputs"]["dev"].as_str().unwrap().to_owned(),
    );
    s.ok(&["delete", &dev]);
    assert!(!is_valid(&s, &dev));
    // Only `out` is wanted, and it is valid: nothing is built.
    s.ok(&["realise", &format!("{drv}!out")]);
    assert!(!is_valid(&s, &dev), "the derivation was built again for an output nobody asked for");
    // A dependent that uses only `out` does not make it build either.
    let (user, user_out) = add(&s, &drv_json("user", "cat $in0 > $out", &[(&drv, &out)], None));
    s.ok(&["realise", &user]);
    assert!(is_valid(&s, &user_out) && !is_valid(&s, &dev));
    // Asked for everything, it is built.
    s.ok(&["realise", &drv]);
    assert!(is_valid(&s, &dev));
}
