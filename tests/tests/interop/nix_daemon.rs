//! Nix's own tools against cairnd's `nix-daemon-socket`, compared with the same commands
//! against a real `nix-daemon` 2.8 on a store of the same shape (logical `/nix/store` under a
//! private root). Every command runs twice, once per daemon, from a fresh client; the answers
//! must agree: the same store paths, NAR hashes, references, content addresses and exit codes.
//!
//! The client is told where each store's files are (`?root=`), since Nix reads some things
//! from the file system itself (derivations, exports, logs); cairn's logs are at
//! `<root>/var/lib/cairn/log` (`&log=`).
//!
//! At the end, Nix's legacy SSH protocol: `cairnd --serve` against `nix-store --serve` on
//! nix-daemon's store, through Nix's `ssh://` stores and byte for byte.
//!
//! Needs Nix 2.8 (`nix-bin`) and a static busybox as the builders' `/bin/sh`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use cairn_tests::{bin_dir, hello_nar_hash, output_with_stdin, path_info_fields, require_peer, NixDaemon, TestStore};

/// Path metadata by path, as `path_info_fields` gives it.
type Metadata = BTreeMap<String, BTreeMap<String, serde_json::Value>>;

/// What cairnd builds with: the settings of `cairn_tests::nix_daemon::NIX_DAEMON_CONFIG`.
const CAIRN_CONFIG: &str = "sandbox-paths = [\"/bin/sh=/bin/busybox\"]\nmax-jobs = 2\n";
/// The clients' own settings (nothing that changes what the daemons do).
const CLIENT_CONFIG: &str = "substituters =\nexperimental-features = nix-command\nbuild-users-group =\n";

/// cairnd and nix-daemon side by side, and a scratch directory for the clients.
struct Pair {
    cairn: TestStore,
    nix: NixDaemon,
    work: tempfile::TempDir,
}

/// Which daemon a command goes to.
#[derive(Clone, Copy, Debug)]
enum Side {
    Cairn,
    Nix,
}

impl Pair {
    fn start() -> Pair {
        Pair::start_with("", "")
    }

    /// Both daemons with more settings: cairnd's (TOML) and nix-daemon's (nix.conf lines).
    fn start_with(cairn_extra: &str, nix_extra: &str) -> Pair {
        let cairn =
            TestStore::builder().store_dir("/nix/store").config(&format!("{CAIRN_CONFIG}{cairn_extra}")).start();
        Pair { cairn, nix: NixDaemon::start_with(nix_extra), work: tempfile::tempdir().unwrap() }
    }

    fn url(&self, side: Side) -> String {
        match side {
            Side::Cairn => {
                let root = self.cairn.root.path();
                format!(
                    "unix://{}?root={}&log={}",
                    root.join("nix-socket").display(),
                    root.display(),
                    root.join("var/lib/cairn/log").display()
                )
            }
            Side::Nix => format!("unix://{}?root={}", self.nix.socket().display(), self.nix.root().display()),
        }
    }

    /// A Nix command for `side`, from a client with its own empty state.
    fn cmd(&self, side: Side, tool: &str) -> Command {
        let home = self.work.path().join(format!("client-{side:?}"));
        let conf = home.join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("nix.conf"), CLIENT_CONFIG).unwrap();
        let mut c = Command::new(tool);
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("NIX_CONF_DIR", &conf)
            .env("NIX_STATE_DIR", home.join("state"))
            .env("NIX_LOG_DIR", home.join("log"))
            .env("NIX_REMOTE", self.url(side))
            .current_dir(self.work.path());
        c
    }

    fn run(&self, side: Side, tool: &str, args: &[&str]) -> Output {
        self.cmd(side, tool).args(args).stdin(Stdio::null()).output().unwrap()
    }

    fn ok(&self, side: Side, tool: &str, args: &[&str]) -> String {
        let out = self.run(side, tool, args);
        assert!(
            out.status.success(),
            "{side:?}: {tool} {args:?} failed:\n{}\ncairnd's log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.cairn.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the command on both sides; both must succeed and print the same.
    fn same(&self, tool: &str, args: &[&str]) -> String {
        let (c, n) = (self.ok(Side::Cairn, tool, args), self.ok(Side::Nix, tool, args));
        assert_eq!(c, n, "{tool} {args:?}: cairnd and nix-daemon differ");
        c
    }

    /// Runs the command on both sides; the exit codes must agree. Returns both outputs.
    fn alike(&self, tool: &str, args: &[&str]) -> (Output, Output) {
        let (c, n) = (self.run(Side::Cairn, tool, args), self.run(Side::Nix, tool, args));
        assert_eq!(
            c.status.code(),
            n.status.code(),
            "{tool} {args:?}: exit codes differ\ncairnd: {}\nnix-daemon: {}",
            String::from_utf8_lossy(&c.stderr),
            String::from_utf8_lossy(&n.stderr)
        );
        (c, n)
    }

    /// narHash, narSize, references and ca of each path `nix path-info --json -r` reports (both
    /// sides print it with the same Nix client, so references come in the same order).
    fn metadata(&self, side: Side, paths: &[&str]) -> Metadata {
        let mut args = vec!["path-info", "--json", "-r"];
        args.extend(paths);
        path_info_fields(self.ok(side, "nix", &args).as_bytes(), &["narHash", "narSize", "references", "ca"])
    }

    fn same_metadata(&self, paths: &[&str]) {
        let (c, n) = (self.metadata(Side::Cairn, paths), self.metadata(Side::Nix, paths));
        assert_eq!(c, n, "path-info of {paths:?} differs");
    }

    /// A Nix command on a store of its own (not through a daemon), which must succeed.
    fn local(&self, args: &[&str]) -> String {
        let out = self.cmd(Side::Nix, args[0]).env_remove("NIX_REMOTE").args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Builds `file` on a Nix store of its own, `store` (`local?root=…`), sandboxed with a
    /// static busybox as `/bin/sh`: its output path.
    fn local_build(&self, store: &str, file: &str) -> String {
        let args =
            ["nix-build", "--store", store, "--option", "sandbox-paths", "/bin/sh=/bin/busybox", "--no-out-link", file];
        self.local(&args).trim().to_owned()
    }

    /// Builds `file` (its attribute `attr`, if given) on a Nix store of its own (`src-store`),
    /// signs the output with the secret key `sk` and copies it into the binary cache `cache`
    /// (a URL): the output path.
    fn cached_build(&self, file: &str, attr: Option<&str>, sk: &Path, cache: &str) -> String {
        let local = format!("local?root={}", self.work.path().join("src-store").display());
        let mut args = vec!["nix-build", "--store", &local, "--option", "sandbox-paths", "/bin/sh=/bin/busybox"];
        args.extend(["--no-out-link", file]);
        args.extend(attr.iter().flat_map(|a| ["-A", *a]));
        let out = self.local(&args).trim().to_owned();
        self.local(&["nix", "store", "sign", "--store", &local, "--key-file", sk.to_str().unwrap(), &out]);
        self.local(&["nix", "copy", "--from", &local, "--to", cache, &out]);
        out
    }

    /// A new binary-cache key pair named `name`: the secret key's file and the public key.
    fn key(&self, name: &str) -> (std::path::PathBuf, String) {
        let (sk, pk) = (self.work.path().join(format!("{name}.sk")), self.work.path().join(format!("{name}.pk")));
        let out =
            Command::new("nix-store").args(["--generate-binary-cache-key", name]).args([&sk, &pk]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (sk, std::fs::read_to_string(&pk).unwrap().trim().to_owned())
    }

    fn write(&self, rel: &str, contents: &[u8]) -> String {
        let p = self.work.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, contents).unwrap();
        p.display().to_string()
    }
}

fn peers() -> bool {
    require_peer("nix-daemon") && require_peer("/bin/busybox")
}

/// Both sides' errors say each of `wants`.
fn both_say(c: &Output, n: &Output, wants: &[&str]) {
    for (side, out) in [("cairnd", c), ("nix-daemon", n)] {
        let e = String::from_utf8_lossy(&out.stderr);
        for want in wants {
            assert!(e.contains(want), "{side} does not say {want:?}:\n{e}");
        }
    }
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

fn expr(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nix/tests").join(name).display().to_string()
}

#[test]
fn nix_store_adds_and_queries_answer_as_nix_daemon_does() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let file = p.write("in/hello.txt", b"hello\n");
    let dir = p.work.path().join("in/tree");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/data"), vec![7u8; 100_000]).unwrap();
    cairn_tests::write_exec(&dir.join("run"), b"#!/bin/sh\necho run\n");
    std::os::unix::fs::symlink("sub/data", dir.join("link")).unwrap();
    let dir = dir.display().to_string();

    let mut added = Vec::new();
    for args in [
        vec!["--add", file.as_str()],
        vec!["--add", dir.as_str()],
        vec!["--add-fixed", "sha256", file.as_str()],
        vec!["--add-fixed", "sha1", file.as_str()],
        vec!["--add-fixed", "sha512", file.as_str()],
        vec!["--add-fixed", "--recursive", "sha256", dir.as_str()],
        vec!["--add-fixed", "--recursive", "sha1", dir.as_str()],
    ] {
        let out = p.same("nix-store", &args);
        assert_eq!(lines(&out).len(), 1, "{args:?}: {out}");
        added.push(out.trim().to_owned());
    }
    // Adding again changes nothing and answers the same path.
    p.same("nix-store", &["--add", file.as_str()]);
    let refs: Vec<&str> = added.iter().map(String::as_str).collect();
    p.same_metadata(&refs);

    // Text paths with references (`builtins.toFile`), written by nix-instantiate through the
    // daemon, and the closure queries over them.
    let tree = added[1].clone();
    let top = p
        .same("nix-instantiate", &["--eval", "--read-write-mode", "--argstr", "tree", &tree, &expr("text-closure.nix")])
        .trim()
        .trim_matches('"')
        .to_owned();
    p.same_metadata(&[&top]);
    for q in [
        vec!["-qR", top.as_str()],
        vec!["-q", "--references", top.as_str()],
        vec!["-q", "--referrers", tree.as_str()],
        vec!["-q", "--referrers-closure", tree.as_str()],
        vec!["-q", "--tree", top.as_str()],
        vec!["-q", "--hash", top.as_str()],
        vec!["-q", "--size", tree.as_str()],
        vec!["--check-validity", top.as_str(), tree.as_str()],
    ] {
        p.same("nix-store", &q);
    }
    // Through the hash part, as `nix path-info` of an abbreviated path would ask.
    p.same("nix", &["path-info", &top]);
    // An invalid path: both refuse, alike.
    let missing = "/nix/store/00000000000000000000000000000000-missing";
    p.alike("nix-store", &["-q", "--references", missing]);
    p.alike("nix-store", &["--check-validity", missing]);
}

#[test]
fn builds_through_cairnd_give_what_nix_daemon_gives() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let hash = hello_nar_hash();
    let built = p.same("nix-build", &["--no-out-link", &expr("builds.nix"), "--argstr", "narHash", &hash]);
    let outs: Vec<&str> = lines(&built);
    assert!(outs.len() >= 11, "{built}");
    p.same_metadata(&outs);
    let drvs = p.same("nix-instantiate", &[&expr("builds.nix"), "--argstr", "narHash", &hash]);
    for d in lines(&drvs) {
        p.same("nix-store", &["-q", "--outputs", d]);
        p.same("nix-store", &["-qR", d]);
    }
    for o in &outs {
        p.same("nix-store", &["-q", "--deriver", o]);
        // `nix show-derivation` of an output finds its valid derivers through the daemon.
        p.same("nix", &["show-derivation", o]);
    }
    // Realising what is valid builds nothing and answers the same outputs.
    let mut realise = vec!["--realise"];
    realise.extend(lines(&drvs));
    p.same("nix-store", &realise);
    // Source paths and `builtins.toFile` text, added by nix-build through the daemon.
    p.write("src/input.txt", b"an input file\n");
    let with_sources = p.write(
        "sources.nix",
        br#"derivation { name = "with-sources"; system = builtins.currentSystem; builder = "/bin/sh";
              src = ./src/input.txt; dir = ./src; note = builtins.toFile "note" "a note\n";
              args = [ "-c" "cat $src $note > $out; ls $dir >> $out" ]; }"#,
    );
    let out = p.same("nix-build", &["--no-out-link", &with_sources]);
    p.same_metadata(&[out.trim()]);
    let drv = p.same("nix-instantiate", &[&with_sources]);
    p.same("nix-store", &["-qR", drv.trim()]);

    // A chain, and a build log Nix reads back.
    let chain = p.same("nix-build", &["--no-out-link", &expr("chain.nix"), "--arg", "n", "10"]);
    p.same_metadata(&[chain.trim()]);
    let logs = p.write(
        "logs.nix",
        br#"derivation { name = "logs"; system = builtins.currentSystem; builder = "/bin/sh";
              args = [ "-c" "echo a visible line; echo another >&2; echo x > $out" ]; }"#,
    );
    let out = p.same("nix-build", &["--no-out-link", &logs]);
    let drv = p.same("nix-store", &["-q", "--deriver", out.trim()]);
    let log = p.same("nix-store", &["-l", drv.trim()]);
    assert_eq!(log, "a visible line\nanother\n");
    p.same("nix", &["log", out.trim()]);
    // A check builds again and says so, as Nix does.
    let (c, n) = p.alike("nix-build", &["--no-out-link", &logs, "--check"]);
    both_say(&c, &n, &["checking outputs of '"]);
}

#[test]
fn failed_builds_show_the_log_tail_and_exit_as_with_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let f = p.write(
        "fail.nix",
        br#"let sh = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; };
in { bad = sh "bad" "echo first line; echo second line >&2; exit 3";
     good = sh "good" "echo good > $out";
     after = sh "after" "cat ${sh "bad2" "exit 1"} > $out"; }"#,
    );
    let (c, n) = p.alike("nix-build", &["--no-out-link", &f, "-A", "bad"]);
    let (ce, ne) = (String::from_utf8_lossy(&c.stderr), String::from_utf8_lossy(&n.stderr));
    for want in ["failed with exit code 3", "> first line", "> second line", "For full logs, run '"] {
        assert!(ce.contains(want), "cairnd's error lacks {want:?}:\n{ce}");
        assert!(ne.contains(want), "nix-daemon's error lacks {want:?}:\n{ne}");
    }
    // -k: the good one is built although another fails.
    let drvs = p.same("nix-instantiate", &[&f]);
    let mut args = vec!["--realise", "-k"];
    args.extend(lines(&drvs));
    p.alike("nix-store", &args);
    // Without -k the first failure stops the rest, which are not reported as failures.
    args.remove(1);
    let (c, _) = p.alike("nix-store", &args);
    assert!(!String::from_utf8_lossy(&c.stderr).contains("not built"), "{}", String::from_utf8_lossy(&c.stderr));
    let good = p.same("nix-instantiate", &[&f, "-A", "good"]);
    p.same("nix-store", &["-q", "--outputs", good.trim()]);
    let good_out = p.same("nix-store", &["-q", "--outputs", good.trim()]);
    p.same("nix-store", &["--check-validity", good_out.trim()]);
    // A dependency's failure fails its dependents, alike, in the same words.
    let (c, n) = p.alike("nix-build", &["--no-out-link", &f, "-A", "after"]);
    both_say(&c, &n, &["1 dependencies of derivation '", "failed to build"]);
    // Two outputs of one failing derivation asked for one by one: one goal, one failure.
    let multi = p.write(
        "multi-fail.nix",
        br#"derivation { name = "multi-fail"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo failing; exit 1" ]; outputs = [ "out" "dev" ]; }"#,
    );
    let drv = p.same("nix-instantiate", &[&multi]);
    let (c, n) = p.alike("nix-store", &["-r", &format!("{}!out", drv.trim()), &format!("{}!dev", drv.trim())]);
    for (side, o) in [("cairnd", &c), ("nix-daemon", &n)] {
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(e.matches("failed with exit code 1").count(), 1, "{side}:\n{e}");
    }
}

/// A build that writes more log than `max-build-log-size` (the client's, or the daemon's own)
/// is killed, in Nix's words and with Nix's exit status; a quieter one is not.
#[test]
fn a_build_writing_more_log_than_allowed_is_killed_as_by_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let f = p.write(
        "noisy.nix",
        br#"let sh = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; };
in { noisy = sh "noisy" "i=0; while [ $i -lt 200 ]; do echo line $i of a noisy build; i=$((i+1)); done; echo > $out";
     quiet = sh "quiet" "echo a few words; echo > $out"; }"#,
    );
    let (c, n) = p.alike("nix-build", &["--no-out-link", &f, "-A", "noisy", "--option", "max-build-log-size", "1000"]);
    assert_eq!(c.status.code(), Some(1), "{}", String::from_utf8_lossy(&c.stderr));
    both_say(&c, &n, &["-noisy.drv!out' from .drv file killed after writing more than 1000 bytes of log output"]);
    let (c, _) = p.alike("nix-build", &["--no-out-link", &f, "-A", "quiet", "--option", "max-build-log-size", "1000"]);
    assert!(c.status.success());
    // The daemon's own limit, the client saying nothing.
    let q = Pair::start_with("max-build-log-size = 1000\n", "max-build-log-size = 1000");
    let f = q.write("noisy.nix", &std::fs::read(&f).unwrap());
    let (c, n) = q.alike("nix-build", &["--no-out-link", &f, "-A", "noisy"]);
    both_say(&c, &n, &["killed after writing more than 1000 bytes of log output"]);
}

#[test]
fn roots_and_garbage_collection_through_cairnd_behave_as_with_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let keep = p.write("keep.txt", b"keep me\n");
    let drop = p.write("drop.txt", b"collect me\n");
    let keep_path = p.same("nix-store", &["--add", &keep]).trim().to_owned();
    let drop_path = p.same("nix-store", &["--add", &drop]).trim().to_owned();
    for side in [Side::Cairn, Side::Nix] {
        let link = p.work.path().join(format!("root-{side:?}"));
        p.ok(side, "nix-store", &["--add-root", link.to_str().unwrap(), "-r", &keep_path]);
        assert_eq!(std::fs::read_link(&link).unwrap().display().to_string(), keep_path);
        let roots = p.ok(side, "nix-store", &["--gc", "--print-roots"]);
        assert!(roots.contains(&format!("{} -> {keep_path}", link.display())), "{side:?}: {roots}");
        let dead = p.ok(side, "nix-store", &["--gc", "--print-dead"]);
        assert!(dead.contains(&drop_path) && !dead.contains(&keep_path), "{side:?}: {dead}");
        let live = p.ok(side, "nix-store", &["--gc", "--print-live"]);
        assert!(live.contains(&keep_path) && !live.contains(&drop_path), "{side:?}: {live}");
    }
    // Deleting a live path is refused by both, in nix-daemon's words; a dead one goes.
    let (c, n) = p.alike("nix-store", &["--delete", &keep_path]);
    both_say(
        &c,
        &n,
        &[&format!(
            "Cannot delete path '{keep_path}' since it is still alive. To find out why, use: nix-store --query --roots"
        )],
    );
    let (c, n) = p.alike("nix-store", &["--gc", "--max-freed", "1"]);
    // The collector's progress, as Nix prints it.
    both_say(&c, &n, &["finding garbage collector roots...", "deleting garbage...", "deleting '/nix/store/"]);
    both_say(&c, &n, &["deleting unused links...", "note: currently hard linking saves "]);
    // The limit reached, said as Nix says it.
    both_say(&c, &n, &["deleted more than 1 bytes; stopping"]);
    let (c, n) = p.alike("nix-store", &["--gc", "--print-dead"]);
    both_say(&c, &n, &["finding garbage collector roots...", "determining live/dead paths..."]);
    p.alike("nix-store", &["--check-validity", &drop_path]);
    p.same("nix-store", &["--check-validity", &keep_path]);
    p.alike("nix-store", &["--gc"]);
    p.same("nix-store", &["--check-validity", &keep_path]);
}

/// `--keep-failed`: the kept build directory is said on a line of its own before the error,
/// as nix-daemon says it, and the error itself does not repeat it.
#[test]
fn a_kept_build_directory_is_said_before_the_error_as_by_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let file = p.write(
        "kept.nix",
        br#"derivation { name = "kept"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo partial > leftover; exit 1" ]; }"#,
    );
    let (c, n) = p.alike("nix-build", &["--no-out-link", "-K", &file]);
    for (side, out) in [("cairnd", &c), ("nix-daemon", &n)] {
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        let note = lines.iter().position(|l| l.starts_with("note: keeping build directory '"));
        let error = lines.iter().position(|l| l.starts_with("error: builder for '"));
        assert!(matches!((note, error), (Some(a), Some(b)) if a < b), "{side}:\n{err}");
        assert_eq!(err.matches("keeping build directory").count(), 1, "{side}:\n{err}");
    }
}

/// `--max-freed` counts what Nix counts (the files' sizes), and deletes paths until more than it
/// is freed: the same dead paths go, and the same words say why it stopped.
#[test]
fn a_collection_with_max_freed_deletes_what_nix_daemon_deletes() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let mut paths = Vec::new();
    for i in 0..10 {
        let f = p.write(&format!("f{i}"), &vec![b'a' + i as u8; 300]);
        paths.push(p.same("nix-store", &["--add", &f]).trim().to_owned());
    }
    for (max, deleted) in [("1000", 4), ("600", 3)] {
        let (c, n) = p.alike("nix-store", &["--gc", "--max-freed", max]);
        both_say(&c, &n, &[&format!("deleted more than {max} bytes; stopping")]);
        let count = |o: &Output| String::from_utf8_lossy(&o.stderr).matches("deleting '/nix/store/").count();
        assert_eq!((count(&c), count(&n)), (deleted, deleted), "--max-freed {max}");
        let valid = |side: Side| {
            paths.iter().filter(|q| p.run(side, "nix-store", &["--check-validity", q]).status.success()).count()
        };
        assert_eq!(valid(Side::Cairn), valid(Side::Nix));
    }
    // A limit the dead paths never reach: everything goes, and no word of a limit.
    let (c, n) = p.alike("nix-store", &["--gc", "--max-freed", "1000000"]);
    for o in [&c, &n] {
        assert!(!String::from_utf8_lossy(&o.stderr).contains("stopping"), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

/// Links in Nix's own `gcroots` and `profiles` directories (NixOS's `current-system`, profiles,
/// links an administrator made) root their paths on cairnd as on nix-daemon: a store that Nix
/// kept before loses nothing to cairnd's collector. cairnd reads them and changes nothing.
#[test]
fn roots_in_nix_s_own_gcroots_and_profiles_directories_are_kept_as_by_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let add = |name: &str| p.same("nix-store", &["--add", &p.write(name, name.as_bytes())]).trim().to_owned();
    let (direct, indirect, profile, dead) = (add("direct"), add("indirect"), add("profile"), add("dead"));
    let elsewhere = p.work.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    for root in [p.cairn.root.path().to_owned(), p.nix.root()] {
        let state = root.join("nix/var/nix");
        std::fs::create_dir_all(state.join("gcroots/auto")).unwrap();
        std::fs::create_dir_all(state.join("profiles/per-user/someone")).unwrap();
        // A direct root, and an indirect one through a link outside the store (as
        // current-system -> /run/current-system -> /nix/store/…).
        std::os::unix::fs::symlink(&direct, state.join("gcroots/direct")).unwrap();
        let outside = elsewhere.join(format!("link-{}", root.file_name().unwrap().to_string_lossy()));
        let _ = std::fs::remove_file(&outside);
        std::os::unix::fs::symlink(&indirect, &outside).unwrap();
        std::os::unix::fs::symlink(&outside, state.join("gcroots/auto/indirect")).unwrap();
        // A profile's generation, linked relatively as nix-env links them.
        let gens = state.join("profiles/per-user/someone");
        std::os::unix::fs::symlink(&profile, gens.join("profile-1-link")).unwrap();
        std::os::unix::fs::symlink("profile-1-link", gens.join("profile")).unwrap();
        // A stale indirect root: neither daemon's business to keep anything for.
        std::os::unix::fs::symlink(p.work.path().join("gone"), state.join("gcroots/auto/stale")).unwrap();
    }
    for side in [Side::Cairn, Side::Nix] {
        let dead_now = p.ok(side, "nix-store", &["--gc", "--print-dead"]);
        for kept in [&direct, &indirect, &profile] {
            assert!(!dead_now.contains(kept.as_str()), "{side:?} would collect {kept}:\n{dead_now}");
        }
        assert!(dead_now.contains(&dead), "{side:?}: {dead_now}");
        let roots = p.ok(side, "nix-store", &["-q", "--roots", &profile]);
        assert!(roots.contains("profiles/per-user/someone/profile-1-link"), "{side:?}: {roots}");
    }
    p.alike("nix-store", &["--gc"]);
    p.same("nix-store", &["--check-validity", &direct, &indirect, &profile]);
    let (c, _) = p.alike("nix-store", &["--check-validity", &dead]);
    assert!(!c.status.success());
    // cairnd left Nix's directory as it found it (nix-daemon removes its own stale links).
    assert!(std::fs::symlink_metadata(p.cairn.root.path().join("nix/var/nix/gcroots/auto/stale")).is_ok());
}

#[test]
fn exports_imports_and_copies_move_closures_between_cairnd_and_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let built = p.same("nix-build", &["--no-out-link", &expr("chain.nix"), "--arg", "n", "5"]);
    let top = built.trim().to_owned();
    let closure = p.same("nix-store", &["-qR", &top]);
    let mut export = vec!["--export"];
    export.extend(lines(&closure));
    // The export streams are the same bytes.
    let c = p.cmd(Side::Cairn, "nix-store").args(&export).output().unwrap();
    let n = p.cmd(Side::Nix, "nix-store").args(&export).output().unwrap();
    assert!(c.status.success() && n.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    assert_eq!(c.stdout, n.stdout, "export streams differ");

    // nix-daemon's export imported through cairnd, into a store that has none of it.
    let fresh = Pair::start();
    let imported = output_with_stdin(fresh.cmd(Side::Cairn, "nix-store").arg("--import"), &n.stdout);
    assert!(imported.status.success(), "{}", String::from_utf8_lossy(&imported.stderr));
    assert_eq!(String::from_utf8_lossy(&imported.stdout), closure, "the imported paths, as listed");
    assert_eq!(fresh.metadata(Side::Cairn, &[&top]), p.metadata(Side::Nix, &[&top]));

    // nix copy from nix-daemon's store to cairnd's: the whole closure, then nothing.
    let other = Pair::start();
    let copy = |p: &Pair| {
        let out = p
            .cmd(Side::Cairn, "nix")
            .args(["copy", "--no-check-sigs", "--from", &p.url(Side::Nix), "--to", &other.url(Side::Cairn), &top])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    // (A second later than the build: a copy keeps the source's registration time, as a copy
    // into nix-daemon does, and does not take its own.)
    std::thread::sleep(std::time::Duration::from_millis(1100));
    copy(&p);
    assert_eq!(other.metadata(Side::Cairn, &[&top]), p.metadata(Side::Nix, &[&top]));
    let registered = |p: &Pair, side: Side| {
        let v: serde_json::Value = serde_json::from_str(&p.ok(side, "nix", &["path-info", "--json", &top])).unwrap();
        v[0]["registrationTime"].as_u64().unwrap()
    };
    assert_eq!(registered(&other, Side::Cairn), registered(&p, Side::Nix), "registrationTime kept by the copy");
    let added = |s: &TestStore| s.log().matches("added with metadata (nix protocol)").count();
    let first = added(&other.cairn);
    assert_eq!(first, lines(&closure).len(), "each path of the closure travelled once");
    copy(&p);
    assert_eq!(added(&other.cairn), first, "a second copy sent nothing");

    // And back out of cairnd into a local Nix store.
    let back = p.work.path().join("back");
    let out = p
        .cmd(Side::Cairn, "nix")
        .args(["copy", "--no-check-sigs", "--from", &other.url(Side::Cairn)])
        .arg("--to")
        .arg(format!("local?root={}", back.display()))
        .arg(&top)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(&back).status();
}

#[test]
fn verify_optimise_and_signatures_through_cairnd_behave_as_with_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let a = p.write("a.txt", b"same bytes\n");
    let path = p.same("nix-store", &["--add", &a]).trim().to_owned();
    p.alike("nix-store", &["--verify", "--check-contents"]);
    p.alike("nix-store", &["--optimise"]);

    // Signatures: the same key signs the same fingerprint to the same signature.
    let key = p.work.path().join("key.sec");
    let gen = Command::new("nix-store")
        .args(["--generate-binary-cache-key", "test-key-1"])
        .arg(&key)
        .arg(p.work.path().join("key.pub"))
        .output()
        .unwrap();
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    p.same("nix", &["store", "sign", "-k", key.to_str().unwrap(), &path]);
    let sigs = |side| {
        let v: serde_json::Value =
            serde_json::from_str(&p.ok(side, "nix", &["path-info", "--json", "--sigs", &path])).unwrap();
        v[0]["signatures"].clone()
    };
    assert_eq!(sigs(Side::Cairn), sigs(Side::Nix));
    assert!(sigs(Side::Cairn).to_string().contains("test-key-1:"));
    // A trusted client's `secret-key-files` signs what is built for it, as nix-daemon signs it.
    let f = p.write(
        "signed-build.nix",
        br#"derivation { name = "signed-build"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo signed > $out" ]; }"#,
    );
    let built = p.same("nix-build", &["--no-out-link", &f, "--option", "secret-key-files", key.to_str().unwrap()]);
    let built_sigs = |side| {
        let v: serde_json::Value =
            serde_json::from_str(&p.ok(side, "nix", &["path-info", "--json", "--sigs", built.trim()])).unwrap();
        v[0]["signatures"].clone()
    };
    assert_eq!(built_sigs(Side::Cairn), built_sigs(Side::Nix));
    assert!(built_sigs(Side::Cairn).to_string().contains("test-key-1:"), "{}", built_sigs(Side::Cairn));
    // A trusted client's `auto-optimise-store` links what is built for it with identical files.
    let same = |n: u8| {
        let f = p.write(
            &format!("same-{n}.nix"),
            format!(r#"derivation {{ name = "same-{n}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "mkdir $out; echo identical > $out/f" ]; }}"#).as_bytes(),
        );
        p.same("nix-build", &["--no-out-link", &f, "--option", "auto-optimise-store", "true"])
    };
    let (one, two) = (same(1), same(2));
    for root in [p.cairn.root.path().to_owned(), p.nix.root()] {
        use std::os::unix::fs::MetadataExt;
        let ino = |o: &str| std::fs::metadata(root.join(o.trim().trim_start_matches('/')).join("f")).unwrap().ino();
        assert_eq!(ino(&one), ino(&two), "{}: identical built files are one inode", root.display());
    }

    // A modified file: both report it and fail the check.
    for root in [p.cairn.root.path().to_owned(), p.nix.root()] {
        let f = root.join(path.trim_start_matches('/'));
        let _ = Command::new("chmod").arg("u+w").arg(&f).status();
        std::fs::write(&f, b"other bytes\n").unwrap();
    }
    let (c, n) = p.alike("nix-store", &["--verify", "--check-contents"]);
    assert!(String::from_utf8_lossy(&c.stderr).contains(&path), "{}", String::from_utf8_lossy(&c.stderr));
    // In the same words and order, progress lines and the optimiser's modified link included
    // (each daemon's root apart).
    let rooted = |o: &Output, root: &Path| String::from_utf8_lossy(&o.stderr).replace(&*root.to_string_lossy(), "ROOT");
    assert_eq!(rooted(&c, p.cairn.root.path()), rooted(&n, &p.nix.root()));

    // Built outputs that no cache has: one modified, one gone that another refers to, one gone
    // that nothing refers to. `--repair` builds the first two again from their derivers and
    // forgets the third, as nix-daemon does.
    let f = p.write(
        "repair.nix",
        br#"let sh = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; };
    b = sh "repair-b" "echo b > $out";
in { a = sh "repair-a" "mkdir $out; echo a > $out/f"; c = sh "repair-c" "echo ${b} > $out"; d = sh "repair-d" "echo d > $out"; }"#,
    );
    let built = p.same("nix-build", &["--no-out-link", &f]);
    let (a, c, d) = (lines(&built)[0].to_owned(), lines(&built)[1].to_owned(), lines(&built)[2].to_owned());
    let b = lines(&p.same("nix-store", &["-q", "--references", &c]))[0].to_owned();
    for root in [p.cairn.root.path().to_owned(), p.nix.root()] {
        let dir = root.join(a.trim_start_matches('/'));
        let _ = Command::new("chmod").arg("-R").arg("u+w").arg(&dir).status();
        std::fs::write(dir.join("bad"), b"x\n").unwrap();
        for gone in [&b, &d] {
            let gone = root.join(gone.trim_start_matches('/'));
            let _ = Command::new("chmod").arg("u+w").arg(&gone).status();
            std::fs::remove_file(&gone).unwrap();
        }
    }
    // The .txt above is still modified and has no deriver: neither daemon can repair it.
    let (c_out, n_out) = p.alike("nix-store", &["--verify", "--check-contents", "--repair"]);
    assert!(!c_out.status.success(), "{}", String::from_utf8_lossy(&c_out.stderr));
    for (side, root, out) in [("cairnd", p.cairn.root.path().to_owned(), &c_out), ("nix-daemon", p.nix.root(), &n_out)]
    {
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!root.join(a.trim_start_matches('/')).join("bad").exists(), "{side} left {a} modified:\n{said}");
        assert!(root.join(b.trim_start_matches('/')).exists(), "{side} did not restore {b}:\n{said}");
    }
    p.same_metadata(&[&a, &c]);
    let (cd, _) = p.alike("nix-store", &["--check-validity", &d]);
    assert!(!cd.status.success(), "the vanished path nothing refers to is forgotten");
}

#[test]
fn nix_build_makes_result_links_through_cairnd() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let mut targets = Vec::new();
    for side in [Side::Cairn, Side::Nix] {
        let link = p.work.path().join(format!("result-{side:?}"));
        p.ok(side, "nix", &["build", "-f", &expr("fanout.nix"), "--arg", "n", "5", "-o", link.to_str().unwrap()]);
        targets.push(std::fs::read_link(&link).unwrap());
    }
    assert_eq!(targets[0], targets[1]);
}

/// Several outputs of one derivation, and several derivations, asked for on one command line:
/// nix-daemon answers one result per derivation, in its goals' order (by name), so `nix build`
/// prints one JSON entry each and makes one set of links; cairnd answers the same.
#[test]
fn outputs_of_one_derivation_asked_together_are_one_result_as_with_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let file = p.write(
        "multi.nix",
        br#"let mk = name: outputs: derivation {
  inherit name outputs; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "for o in $outputs; do eval \"echo $o > \\$$o\"; done" ];
}; in { multi = mk "multi" [ "out" "dev" "lib" ]; b = mk "b" [ "out" ]; d = mk "d" [ "out" ]; }"#,
    );
    let json_of = |side: Side, attrs: &[&str]| {
        let mut args = vec!["build", "--json", "--no-link", "-f", &file];
        args.extend(attrs);
        let v: serde_json::Value = serde_json::from_str(&p.ok(side, "nix", &args)).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| (e["drvPath"].as_str().unwrap().to_owned(), e["outputs"].clone()))
            .collect::<Vec<_>>()
    };
    for attrs in [&["multi.dev", "multi.lib"][..], &["d", "multi.dev", "b", "multi"], &["multi.lib", "multi.out"]] {
        let (c, n) = (json_of(Side::Cairn, attrs), json_of(Side::Nix, attrs));
        assert_eq!(c, n, "nix build --json {attrs:?}");
        assert_eq!(c.iter().filter(|(d, _)| d.ends_with("-multi.drv")).count(), 1, "{c:?}");
    }
    let links = |side: Side| {
        let dir = p.work.path().join(format!("links-{side:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        let out = p
            .cmd(side, "nix")
            .args(["build", "-f", &file, "multi.lib", "multi.dev", "multi.out"])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    };
    assert_eq!(links(Side::Cairn), links(Side::Nix));
}

/// `nix-env -i` through cairnd: the user environment (`builtin:buildenv`) is the one
/// `nix-daemon` makes — same path, same NAR, same references — with two packages' directories
/// merged, a priority deciding a collision, and a propagated package.
#[test]
fn nix_env_installs_into_a_profile_as_with_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let f = p.write(
        "env.nix",
        br#"let sh = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; };
    extra = sh "extra" "mkdir -p $out/bin; echo extra > $out/bin/extra";
in {
  one = sh "one" "mkdir -p $out/bin $out/share/doc/one; echo one > $out/bin/one; echo same > $out/bin/both; echo d > $out/share/doc/one/README";
  two = (sh "two" "mkdir -p $out/bin $out/share/doc/two $out/nix-support; echo two > $out/bin/two; echo other > $out/bin/both; echo d > $out/share/doc/two/README; echo ${extra} > $out/nix-support/propagated-user-env-packages") // { meta.priority = 7; };
  three = sh "three" "mkdir -p $out/bin; echo three > $out/bin/both";
}"#,
    );
    let mut profiles = Vec::new();
    for side in [Side::Cairn, Side::Nix] {
        let profile = p.work.path().join(format!("profile-{side:?}/p"));
        std::fs::create_dir_all(profile.parent().unwrap()).unwrap();
        let profile = profile.to_str().unwrap().to_owned();
        p.ok(side, "nix-env", &["-p", &profile, "-f", &f, "-iA", "one", "two"]);
        // p -> p-1-link -> the user environment's store path.
        let generation = Path::new(&profile).parent().unwrap().join(std::fs::read_link(&profile).unwrap());
        profiles.push(std::fs::read_link(generation).unwrap());
    }
    assert_eq!(profiles[0], profiles[1], "the user environments differ");
    let env = profiles[0].to_str().unwrap();
    p.same("nix-store", &["-q", "--hash", env]);
    p.same("nix-store", &["-q", "--references", env]);
    // The collision went to the lower priority number (one's 5 before two's 7).
    let both = p.cairn.root.path().join(env.trim_start_matches('/')).join("bin/both");
    assert!(std::fs::read_link(&both).unwrap().to_str().unwrap().ends_with("-one/bin/both"));
    // Equal priorities collide, and the builder's failure reads as Nix's.
    let (c, n) = p
        .alike("nix-env", &["-p", &p.work.path().join("clash").display().to_string(), "-f", &f, "-iA", "one", "three"]);
    assert!(!c.status.success());
    both_say(&c, &n, &["have the same priority 5", "failed with exit code 1"]);
}

/// The channel `nix-channel --update` makes (its `unpack-channel.nix`: a derivation of
/// `builtin:unpack-channel`), built through cairnd: the tarball unpacked into the same store
/// path, with the same bytes, as through nix-daemon; a tarball of two entries refused alike.
/// (`nix-channel` itself names the tarball by its host path, which a store with `?root=`, as
/// these tests use, does not take.)
#[test]
fn a_channel_is_unpacked_as_with_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    p.write("chan-src/nixexprs-1/default.nix", b"{ }: { answer = 42; }\n");
    p.write("chan-src/nixexprs-1/lib/util.nix", b"x: x\n");
    p.write("chan-src/second/f", b"x\n");
    for (tarball, entries) in [("one.tar.bz2", vec!["nixexprs-1"]), ("two.tar.bz2", vec!["nixexprs-1", "second"])] {
        let tar = Command::new("tar")
            .arg("-cjf")
            .arg(p.work.path().join(tarball))
            .arg("-C")
            .arg(p.work.path().join("chan-src"))
            .args(entries)
            .status()
            .unwrap();
        assert!(tar.success());
    }
    let f = p.write(
        "channel.nix",
        br#"{ src }: derivation { builder = "builtin:unpack-channel"; system = "builtin"; name = "mine"; channelName = "mine"; inherit src; preferLocalBuild = true; }"#,
    );
    let one = p.work.path().join("one.tar.bz2").display().to_string();
    let out = p.same("nix-build", &["--no-out-link", &f, "--arg", "src", &one]);
    p.same_metadata(&[out.trim()]);
    let file = p.cairn.root.path().join(out.trim().trim_start_matches('/')).join("mine/default.nix");
    assert_eq!(std::fs::read(file).unwrap(), b"{ }: { answer = 42; }\n");
    let two = p.work.path().join("two.tar.bz2").display().to_string();
    let (c, n) = p.alike("nix-build", &["--no-out-link", &f, "--arg", "src", &two]);
    assert!(!c.status.success());
    both_say(&c, &n, &["contains more than one file"]);
}

/// Paths that are not valid are answered as Nix answers them: no referrers, no roots, and a
/// deletion that succeeds (removing a leftover of that name); and what `nix-store --add`
/// registers is not marked `ultimate` (that marks what was built).
#[test]
fn paths_that_are_not_valid_and_added_paths_are_answered_as_nix_daemon_does() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let gone = "/nix/store/00000000000000000000000000000000-nope";
    for args in [
        &["-q", "--referrers", gone][..],
        &["-q", "--referrers-closure", gone],
        &["-q", "--roots", gone],
        &["--delete", gone],
    ] {
        let (c, n) = p.alike("nix-store", args);
        assert_eq!(c.stdout, n.stdout, "{args:?}");
        assert!(c.status.success(), "{args:?}: {}", String::from_utf8_lossy(&c.stderr));
    }
    // A leftover under a name that is not valid is dead, and goes with the deletion.
    let stray = "/nix/store/11111111111111111111111111111111-stray";
    let host = p.cairn.root.path().join(stray.trim_start_matches('/'));
    std::fs::write(&host, b"left over").unwrap();
    assert!(p.ok(Side::Cairn, "nix-store", &["--gc", "--print-dead"]).contains(stray));
    p.ok(Side::Cairn, "nix-store", &["--delete", stray]);
    assert!(!host.exists(), "the leftover is still there");
    let file = p.write("added", b"added\n");
    let path = p.same("nix-store", &["--add", &file]);
    for side in [Side::Cairn, Side::Nix] {
        let json = p.ok(side, "nix", &["path-info", "--json", path.trim()]);
        assert!(!json.contains("\"ultimate\""), "{side:?}: {json}");
    }
    // A path whose contents disappeared, and that nothing refers to, leaves the database at
    // the next --verify.
    for root in [p.cairn.root.path().to_owned(), p.nix.root()] {
        let real = root.join(path.trim().trim_start_matches('/'));
        std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        std::fs::remove_file(real).unwrap();
    }
    let (c, _) = p.alike("nix-store", &["--verify"]);
    assert!(String::from_utf8_lossy(&c.stderr).contains("disappeared, removing from database"), "{c:?}");
    p.alike("nix-store", &["--check-validity", path.trim()]);
}

/// A trusted client's `substituters` and `trusted-public-keys` are used for its requests, as
/// `nix-daemon` uses them: a signed path copied in is checked against the client's key, and a
/// path is substituted from the client's cache.
#[test]
fn a_trusted_client_s_substituters_and_keys_are_honoured() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let (sk, pk) = p.key("client-key-1");
    // A signed path in a local binary cache, made by a store of the test's own.
    let src = p.work.path().join("src-store");
    let cache = format!("file://{}", p.work.path().join("cache").display());
    let local = format!("local?root={}", src.display());
    // Input-addressed (built), so that only a signature can vouch for it.
    let f = p.write(
        "signed.nix",
        br#"derivation { name = "signed"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo signed > $out" ]; }"#,
    );
    let nix = |args: &[&str]| p.local(args);
    let path = p.local_build(&local, &f);
    nix(&["nix", "store", "sign", "--store", &local, "--key-file", sk.to_str().unwrap(), &path]);
    nix(&["nix", "copy", "--from", &local, "--to", &cache, &path]);
    // Substituted from the client's cache, checked with the client's key.
    let (c, n) = p.alike(
        "nix-store",
        &["--realise", &path, "--option", "substituters", &cache, "--option", "trusted-public-keys", &pk],
    );
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    assert_eq!(c.stdout, n.stdout);
    // Both say what they copy from where, as Nix's daemon does.
    let copying = format!("copying path '{path}' from '{cache}'...");
    both_say(&c, &n, &[&copying]);
    // So does a build whose output is substituted instead of built.
    for side in [Side::Cairn, Side::Nix] {
        p.ok(side, "nix-store", &["--delete", &path]);
    }
    let (c, n) = p.alike(
        "nix-build",
        &["--no-out-link", &f, "--option", "substituters", &cache, "--option", "trusted-public-keys", &pk],
    );
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    both_say(&c, &n, &[&copying]);
    // Without the client's key, the daemon's own (none) do not vouch for it.
    for side in [Side::Cairn, Side::Nix] {
        p.ok(side, "nix-store", &["--delete", &path]);
    }
    let (c, n) = p.alike("nix-store", &["--realise", &path, "--option", "substituters", &cache]);
    assert!(!c.status.success());
    // And both say why, as Nix's daemon warns.
    let unsigned =
        format!("the substitute for '{path}' from '{cache}' is not signed by any of the keys in 'trusted-public-keys'");
    both_say(&c, &n, &[&unsigned]);
    // Still, the cache has it: what may be fetched is answered from its narinfo, signed or not.
    let (c, n) = p.alike("nix-store", &["--realise", "--dry-run", &path, "--option", "substituters", &cache]);
    both_say(&c, &n, &["this path will be fetched", &path]);
    // What is substitutable in bulk (`nix-env -qas`) is asked only of caches that want mass
    // queries: this one says nothing of it, unless its URL says so.
    let mass = format!("{cache}?want-mass-query=true");
    for (url, status) in [(&cache, "---"), (&mass, "--S")] {
        let shown = p.same("nix-env", &["-f", &f, "-qas", "--option", "substituters", url]);
        assert!(shown.starts_with(status), "{url}: {shown}");
    }
    // And `nix copy` into the daemon is checked with the client's key.
    let (c, n) = p.alike("nix", &["copy", "--from", &cache, "--option", "trusted-public-keys", &pk, &path]);
    assert!(c.status.success() && n.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
}

/// As Nix's goals, top down: a derivation whose output no cache has is built, and the outputs
/// it uses of its inputs are substituted where a cache has them — an input that was
/// substituted needs nothing of its own inputs, which are neither fetched nor built.
#[test]
fn inputs_a_cache_has_are_substituted_and_only_the_rest_is_built_as_by_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let (sk, pk) = p.key("inputs-key-1");
    let f = p.write(
        "chain.nix",
        br#"let
  sh = "/bin/sh";
  mk = name: script: derivation { inherit name; system = builtins.currentSystem; builder = sh; args = [ "-c" script ]; };
  low = mk "low-input" "echo low > $out";
  mid = mk "mid-input" "read x < ${low}; echo mid-$x > $out";
in { inherit low mid; top = mk "top-goal" "read x < ${mid}; echo top-$x > $out"; }
"#,
    );
    let cache = format!("file://{}", p.work.path().join("cache").display());
    let mid = p.cached_build(&f, Some("mid"), &sk, &cache);
    let args =
        ["--no-out-link", &f, "-A", "top", "--option", "substituters", &cache, "--option", "trusted-public-keys", &pk];
    let (c, n) = p.alike("nix-build", &args);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    assert_eq!(c.stdout, n.stdout);
    let top = String::from_utf8_lossy(&c.stdout).trim().to_owned();
    both_say(&c, &n, &[&format!("copying path '{mid}' from '{cache}'..."), "-top-goal.drv'..."]);
    for (side, out) in [("cairnd", &c), ("nix-daemon", &n)] {
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            !e.contains("-mid-input.drv") && !e.contains("-low-input"),
            "{side} built or fetched an input it did not need:\n{e}"
        );
    }
    p.same("nix-store", &["--check-validity", &mid, &top]);
    p.same_metadata(&[&mid, &top]);
}

/// `nix-store -r --repair PATH` of a path (not a derivation): a modified copy is fetched again
/// from the substituters and swapped in, as nix-daemon does; an intact one stays. Where no cache
/// has it, cairnd builds it again from its deriver when that is valid (as `--verify --repair`
/// does, where nix-daemon fails), and otherwise fails saying so, the path left as it was.
#[test]
fn repairing_a_named_path_fetches_it_again_as_nix_daemon_does() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let (sk, pk) = p.key("repair-key-1");
    let f = p.write(
        "named.nix",
        br#"let mk = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; };
in { cached = mk "repair-cached" "mkdir $out; echo good > $out/f"; local = mk "repair-local" "echo local > $out"; }
"#,
    );
    let cache = format!("file://{}", p.work.path().join("cache").display());
    let cached = p.cached_build(&f, Some("cached"), &sk, &cache);
    let from_cache = ["--option", "substituters", &cache, "--option", "trusted-public-keys", &pk];
    let with = |args: &[&str]| -> Vec<String> { args.iter().chain(&from_cache).map(|a| a.to_string()).collect() };
    let args = with(&["-r", &cached]);
    p.same("nix-store", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let file = |root: &Path| root.join(cached.trim_start_matches('/')).join("f");
    let roots = [("cairnd", p.cairn.root.path().to_owned()), ("nix-daemon", p.nix.root())];
    for (_, root) in &roots {
        let _ = Command::new("chmod").arg("-R").arg("u+w").arg(root.join(cached.trim_start_matches('/'))).status();
        std::fs::write(file(root), b"corrupt\n").unwrap();
    }
    let args = with(&["-r", "--repair", &cached]);
    let (c, n) = p.alike("nix-store", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    assert_eq!(c.stdout, n.stdout);
    for (side, root) in &roots {
        assert_eq!(std::fs::read(file(root)).unwrap(), b"good\n", "{side} did not repair {cached}");
    }
    p.same("nix-store", &["--verify", "--check-contents"]);

    // No cache: cairnd builds it again from its deriver (nix-daemon only substitutes).
    let built = p.ok(Side::Cairn, "nix-build", &["--no-out-link", &f, "-A", "local"]).trim().to_owned();
    let real = p.cairn.root.path().join(built.trim_start_matches('/'));
    let _ = Command::new("chmod").arg("u+w").arg(&real).status();
    std::fs::write(&real, b"corrupt\n").unwrap();
    p.ok(Side::Cairn, "nix-store", &["-r", "--repair", &built]);
    assert_eq!(std::fs::read(&real).unwrap(), b"local\n");
    // An intact path needs nothing.
    p.ok(Side::Cairn, "nix-store", &["-r", "--repair", &built]);

    // Neither a cache nor a deriver: the request fails, naming the path, and nothing changes.
    let text = p.ok(Side::Cairn, "nix-store", &["--add", &p.write("plain.txt", b"plain\n")]).trim().to_owned();
    let real = p.cairn.root.path().join(text.trim_start_matches('/'));
    let _ = Command::new("chmod").arg("u+w").arg(&real).status();
    std::fs::write(&real, b"corrupt\n").unwrap();
    let out = p.run(Side::Cairn, "nix-store", &["-r", "--repair", &text]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("cannot repair") && said.contains(&text), "{said}");
    assert_eq!(std::fs::read(&real).unwrap(), b"corrupt\n");
}

/// What a dry run says it would download, from a cache whose narinfos give no `FileSize` (as a
/// cache that compresses on the fly serves them): nix-daemon's figures, 0 bytes to download.
#[test]
fn a_dry_run_counts_download_sizes_as_nix_daemon_does() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let (sk, pk) = p.key("sizes-key-1");
    let f = p.write(
        "sized.nix",
        br#"derivation { name = "sized"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "i=0; while [ $i -lt 3000 ]; do echo line $i; i=$((i+1)); done > $out" ]; }"#,
    );
    let cache_dir = p.work.path().join("cache");
    let cache = format!("file://{}", cache_dir.display());
    let out = p.cached_build(&f, None, &sk, &cache);
    for e in std::fs::read_dir(&cache_dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "narinfo") {
            let text = std::fs::read_to_string(&path).unwrap();
            let kept: String = text.lines().filter(|l| !l.starts_with("FileSize:")).map(|l| format!("{l}\n")).collect();
            std::fs::write(&path, kept).unwrap();
        }
    }
    let args = ["-r", "--dry-run", &out, "--option", "substituters", &cache, "--option", "trusted-public-keys", &pk];
    let (c, n) = p.alike("nix-store", &args);
    let sizes = |o: &Output| {
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .filter(|l| l.contains("download"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(!sizes(&n).is_empty(), "{}", String::from_utf8_lossy(&n.stderr));
    assert_eq!(sizes(&c), sizes(&n));
}

/// A fixed output is substituted by its content address from a binary cache of another store
/// directory (`?store=`), as Nix 2.8's `fetchurl.sh` test does: the URL it names does not exist.
#[test]
fn a_fixed_output_comes_from_a_cache_of_another_store_directory_as_with_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let file = p.write("fetched.txt", b"fetched from a cache of another store directory\n");
    let other = format!("file://{}?store=/fnord/store", p.work.path().join("other-store").display());
    let there = p.local(&["nix", "--store", &other, "store", "add-file", &file]).trim().to_owned();
    assert!(there.starts_with("/fnord/store/"), "{there}");
    let hash = p.local(&["nix", "hash", "file", "--type", "sha256", "--base16", &file]).trim().to_owned();
    let shown = other.split('?').next().unwrap().to_owned();
    for (name, h) in [("sha256", hash.clone()), ("hash", format!("sha256:{hash}"))] {
        let args = [
            "--no-out-link",
            "--expr",
            "import <nix/fetchurl.nix>",
            "--argstr",
            "url",
            "file:///no-such-dir/fetched.txt",
            "--argstr",
            name,
            &h,
            "--option",
            "substituters",
            &other,
        ];
        let (c, n) = p.alike("nix-build", &args);
        assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
        assert_eq!(c.stdout, n.stdout);
        both_say(&c, &n, &[&format!("copying path '{there}' from '{shown}'...")]);
        let out = String::from_utf8_lossy(&c.stdout).trim().to_owned();
        p.same_metadata(&[&out]);
        for side in [Side::Cairn, Side::Nix] {
            p.ok(side, "nix-store", &["--delete", &out]);
        }
    }
    // Its NAR corrupted: a failed substitute, which without `--fallback` fails the build.
    let cache_dir = p.work.path().join("other-store");
    for e in std::fs::read_dir(cache_dir.join("nar")).unwrap() {
        let nar = e.unwrap().path();
        let mut bytes = std::fs::read(&nar).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0xff;
        std::fs::write(&nar, bytes).unwrap();
    }
    let args = [
        "--no-out-link",
        "--expr",
        "import <nix/fetchurl.nix>",
        "--argstr",
        "url",
        "file:///no-such-dir/fetched.txt",
        "--argstr",
        "sha256",
        &hash,
        "--option",
        "substituters",
        &other,
    ];
    let (c, n) = p.alike("nix-build", &args);
    assert!(!c.status.success());
    both_say(&c, &n, &["try '--fallback'"]);
    // Another file under that name: the cache has nothing at the path its hash gives there.
    let other_hash = "0000000000000000000000000000000000000000000000000000000000000000";
    let args = [
        "--no-out-link",
        "--expr",
        "import <nix/fetchurl.nix>",
        "--argstr",
        "url",
        "file:///no-such-dir/fetched.txt",
        "--argstr",
        "sha256",
        other_hash,
        "--option",
        "substituters",
        &other,
    ];
    let (c, _) = p.alike("nix-build", &args);
    assert!(!c.status.success());
}

/// The daemon's own `secret-key-files` sign what it builds, as nix-daemon's do (ed25519 is
/// deterministic: the same signature on the same path), and not what is merely added.
#[test]
fn the_daemon_s_secret_key_files_sign_what_it_builds_as_nix_daemon_s_do() {
    if !peers() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let (sk, pk) = (keys.path().join("builder.sk"), keys.path().join("builder.pk"));
    let out =
        Command::new("nix-store").args(["--generate-binary-cache-key", "builder-1"]).args([&sk, &pk]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p = Pair::start_with(
        &format!("secret-key-files = [\"{}\"]\n", sk.display()),
        &format!("secret-key-files = {}", sk.display()),
    );
    let f = p.write(
        "signed-build.nix",
        br#"derivation { name = "signed-build"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo built > $out" ]; }"#,
    );
    let built = p.same("nix-build", &["--no-out-link", &f]).trim().to_owned();
    let added = p.same("nix-store", &["--add", &f]).trim().to_owned();
    let sigs = |side| -> Vec<serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_str(&p.ok(side, "nix", &["path-info", "--json", &built, &added])).unwrap();
        v.as_array().unwrap().iter().map(|i| i["signatures"].clone()).collect()
    };
    let (c, n) = (sigs(Side::Cairn), sigs(Side::Nix));
    assert_eq!(c, n);
    assert!(c.iter().any(|s| s.to_string().contains("builder-1:")), "{c:?}");
    let public = std::fs::read_to_string(&pk).unwrap();
    p.same("nix", &["store", "verify", "--sigs-needed", "1", "--trusted-public-keys", public.trim(), &built]);
}

/// A content-addressed path that refers to itself (what `nix store make-content-addressed`
/// makes of a built path) is named by its hash modulo its own hash part: copied into cairnd it
/// is taken, with the same metadata, as nix-daemon takes it.
#[test]
fn a_self_referencing_content_addressed_path_is_taken_as_by_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let local = format!("local?root={}", p.work.path().join("src-store").display());
    let f = p.write(
        "selfref.nix",
        br#"derivation { name = "selfref"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "mkdir $out; echo $out > $out/me; echo $out/me > $out/again" ]; }"#,
    );
    let built = p.local_build(&local, &f);
    let made = p.local(&["nix", "store", "make-content-addressed", "--store", &local, "--json", &built]);
    let v: serde_json::Value = serde_json::from_str(&made).unwrap();
    let ca_path = v["rewrites"][&built].as_str().unwrap().to_owned();
    for side in [Side::Cairn, Side::Nix] {
        p.ok(side, "nix", &["copy", "--from", &local, &ca_path]);
    }
    p.same_metadata(&[&ca_path]);
    let refs = p.same("nix-store", &["-q", "--references", &ca_path]);
    assert_eq!(refs.trim(), ca_path, "it refers to itself");
}

/// A path named `.drv` must be a derivation whose outputs its own fields agree on, however it
/// comes in (added, imported): refused as nix-daemon refuses it, nothing registered.
#[test]
fn a_drv_that_is_not_a_derivation_or_claims_another_output_path_is_refused() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let garbage = p.write("bad/x.drv", b"garbage\n");
    let (c, n) = p.alike("nix-store", &["--add", &garbage]);
    assert!(!c.status.success());
    both_say(&c, &n, &["error parsing derivation"]);
    // A fixed-output derivation whose output path is not the one its hash gives.
    let f = p.write(
        "fod.nix",
        br#"derivation { name = "fod"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo -n > $out" ];
                         outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"; }"#,
    );
    let drv = p.ok(Side::Nix, "nix-instantiate", &[&f]);
    let real = p.nix.root().join(drv.trim().trim_start_matches('/'));
    let text = std::fs::read_to_string(real).unwrap();
    let out = p.ok(Side::Nix, "nix-store", &["-q", "--outputs", drv.trim()]);
    // Its environment naming another output path: refused by both.
    let other = "/nix/store/00000000000000000000000000000000-fod";
    let env_liar = text.replace(&format!("(\"out\",\"{}\")", out.trim()), &format!("(\"out\",\"{other}\")"));
    assert_ne!(env_liar, text);
    let (c, n) = p.alike("nix-store", &["--add", &p.write("env-liar/fod.drv", env_liar.as_bytes())]);
    assert!(!c.status.success());
    both_say(&c, &n, &["incorrect environment variable 'out'"]);
    // Its output written at another path: Nix 2.8 ignores what is written there for a fixed
    // output; cairn, which uses it, refuses it.
    let liar = text.replacen(out.trim(), other, 1);
    let c = p.run(Side::Cairn, "nix-store", &["--add", &p.write("liar/fod.drv", liar.as_bytes())]);
    assert!(!c.status.success(), "a fixed output at another path was taken");
    assert!(
        String::from_utf8_lossy(&c.stderr).contains("has incorrect output"),
        "{}",
        String::from_utf8_lossy(&c.stderr)
    );
    // An input-addressed derivation (with an input derivation) claiming another output path,
    // its environment agreeing with the lie: only its hash tells, and both refuse it, naming
    // the path it should have.
    let f = p.write(
        "ia.nix",
        br#"let dep = derivation { name = "dep"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; };
in derivation { name = "ia"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "cat ${dep} > $out" ]; }"#,
    );
    let drv = p.same("nix-instantiate", &[&f]);
    let out = p.same("nix-store", &["-q", "--outputs", drv.trim()]);
    let text = std::fs::read_to_string(p.nix.root().join(drv.trim().trim_start_matches('/'))).unwrap();
    let other = "/nix/store/11111111111111111111111111111111-ia";
    let liar = text.replace(out.trim(), other);
    assert_eq!(liar.matches(other).count(), 2, "{liar}");
    let (c, n) = p.alike("nix-store", &["--add", &p.write("ia-liar/ia.drv", liar.as_bytes())]);
    assert!(!c.status.success(), "a derivation claiming another output path was taken");
    let says = format!("has incorrect output '{other}', should be '{}'", out.trim());
    both_say(&c, &n, &[&says]);
    // Its honest text is taken by both, so nothing but the claim was refused.
    let honest = p.write("ia-honest/ia.drv", text.as_bytes());
    let (c, _) = p.alike("nix-store", &["--add", &honest]);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
}

/// A derivation named apart from its `name` attribute — as `nix develop` writes its shell
/// derivation, `NAME-env` — has its output paths from its own name: both daemons take it and
/// build it to the same path.
#[test]
fn a_derivation_named_apart_from_its_name_attribute_is_built_as_nix_daemon_builds_it() {
    use cairn_nix::derivation::{Derivation, DerivationError, DerivationOutput};
    if !peers() {
        return;
    }
    let p = Pair::start();
    let empty = DerivationOutput { path: String::new(), hash_algo: String::new(), hash: String::new() };
    let mut drv = Derivation {
        outputs: BTreeMap::from([("out".to_owned(), empty)]),
        platform: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), "echo named apart > $out".into()],
        env: ["builder", "name", "out", "system"]
            .into_iter()
            .zip(["/bin/sh", "shell", "", "x86_64-linux"])
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ..Default::default()
    };
    let dir = cairn_nix::StoreDir::new("/nix/store").unwrap();
    let out = drv.output_paths::<DerivationError>(&dir, "shell-env", &mut |_| unreachable!("no inputs")).unwrap();
    let out = dir.display(&out["out"]);
    drv.outputs.get_mut("out").unwrap().path = out.clone();
    drv.env.insert("out".into(), out.clone());
    let file = p.write("develop/shell-env.drv", drv.to_aterm().as_bytes());
    let drv_path = p.same("nix-store", &["--add", &file]);
    assert_eq!(p.same("nix-store", &["--realise", drv_path.trim()]).trim(), out);
}

/// A substitute that fails (a corrupt NAR in the cache) fails the build unless the client asked
/// for `--fallback`, which then builds it, as with nix-daemon.
#[test]
fn a_failed_substitute_fails_the_build_unless_fallback_is_asked_for() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let (sk, pk) = p.key("fb-1");
    let f = p.write(
        "fb.nix",
        br#"derivation { name = "fallback"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo from source > $out" ]; }"#,
    );
    let src = format!("local?root={}", p.work.path().join("src-store").display());
    let cache_dir = p.work.path().join("cache");
    let cache = format!("file://{}?compression=none", cache_dir.display());
    let nix = |args: &[&str]| p.local(args);
    let path = p.local_build(&src, &f);
    nix(&["nix", "store", "sign", "--store", &src, "--key-file", sk.to_str().unwrap(), path.trim()]);
    nix(&["nix", "copy", "--from", &src, "--to", &cache, path.trim()]);
    // Corrupt the NAR: its narinfo still offers it, signed.
    for e in std::fs::read_dir(cache_dir.join("nar")).unwrap() {
        let nar = e.unwrap().path();
        let mut bytes = std::fs::read(&nar).unwrap();
        let at = bytes.len() - 20;
        bytes[at] ^= 0xff;
        std::fs::write(&nar, bytes).unwrap();
    }
    let cache_url = format!("file://{}", cache_dir.display());
    let opts = ["--option", "substituters", cache_url.as_str(), "--option", "trusted-public-keys", pk.as_str()];
    let mut args = vec!["--no-out-link", f.as_str()];
    args.extend(opts);
    let (c, n) = p.alike("nix-build", &args);
    assert!(!c.status.success(), "built without --fallback");
    both_say(&c, &n, &["try '--fallback'"]);
    // Asked for the path itself, the error is the substitute's, not a missing one.
    let mut realise = vec!["--realise", path.trim()];
    realise.extend(opts);
    let (c, _) = p.alike("nix-store", &realise);
    let e = String::from_utf8_lossy(&c.stderr);
    assert!(e.contains("cannot substitute") && !e.contains("no substituter that can build it"), "{e}");
    // So does a build that needs it as an input: the input fails, and the goal with it.
    let top = p.write(
        "fb-top.nix",
        br#"derivation { name = "fallback-top"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "read x < ${import ./fb.nix}; echo top-$x > $out" ]; }"#,
    );
    let mut top_args = vec!["--no-out-link", top.as_str()];
    top_args.extend(opts);
    let (c, n) = p.alike("nix-build", &top_args);
    assert!(!c.status.success(), "built without --fallback");
    both_say(&c, &n, &["try '--fallback'", "1 dependencies of derivation '", "-fallback-top.drv' failed to build"]);
    top_args.push("--fallback");
    let top_out = p.same("nix-build", &top_args);
    for side in [Side::Cairn, Side::Nix] {
        p.ok(side, "nix-store", &["--delete", path.trim()]);
    }
    args.push("--fallback");
    assert_eq!(p.same("nix-build", &args).trim(), path);
    // A NAR gone from the cache is no failure: as if the cache had not offered it, the path is
    // built without `--fallback` (Nix's "substitute gone").
    args.pop();
    top_args.pop();
    for side in [Side::Cairn, Side::Nix] {
        p.ok(side, "nix-store", &["--delete", path.trim()]);
    }
    std::fs::rename(cache_dir.join("nar"), cache_dir.join("nar-gone")).unwrap();
    assert_eq!(p.same("nix-build", &args).trim(), path);
    for side in [Side::Cairn, Side::Nix] {
        p.ok(side, "nix-store", &["--delete", top_out.trim(), path.trim()]);
    }
    assert_eq!(p.same("nix-build", &top_args), top_out);
}

/// A cache whose closure of a path is incomplete (a reference has no narinfo) offers no
/// substitute for it until that reference is built: as with nix-daemon, the build goes on
/// without `--fallback`, builds the reference, and then substitutes the path.
#[test]
fn a_path_whose_closure_a_cache_lacks_is_built_without_fallback_as_by_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let (sk, pk) = p.key("incomplete-1");
    let f = p.write(
        "refs.nix",
        br#"let dep = derivation { name = "closure-dep"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo dep > $out" ]; };
in derivation { name = "closure-top"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo ${dep} > $out" ]; }"#,
    );
    let src = format!("local?root={}", p.work.path().join("src-store").display());
    let cache_dir = p.work.path().join("cache");
    let cache = format!("file://{}", cache_dir.display());
    let top = p.local_build(&src, &f);
    p.local(&["nix", "store", "sign", "--store", &src, "-r", "--key-file", sk.to_str().unwrap(), &top]);
    p.local(&["nix", "copy", "--from", &src, "--to", &cache, &top]);
    let mut narinfos = 0;
    for e in std::fs::read_dir(&cache_dir).unwrap() {
        let path = e.unwrap().path();
        if std::fs::read_to_string(&path)
            .is_ok_and(|t| t.lines().any(|l| l.starts_with("StorePath: ") && l.ends_with("-closure-dep")))
        {
            std::fs::remove_file(&path).unwrap();
            narinfos += 1;
        }
    }
    assert_eq!(narinfos, 1);
    let args = ["--no-out-link", &f, "--option", "substituters", &cache, "--option", "trusted-public-keys", &pk];
    let (c, n) = p.alike("nix-build", &args);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    assert_eq!(String::from_utf8_lossy(&c.stdout).trim(), top);
    assert_eq!(c.stdout, n.stdout);
    // Both build the reference (the part of the closure the cache lacks), then substitute the
    // path itself again instead of building it.
    both_say(&c, &n, &["-closure-dep.drv'...", &format!("copying path '{top}' from '{cache}'...")]);
    for (side, out) in [("cairnd", &c), ("nix-daemon", &n)] {
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!e.contains("-closure-top.drv'..."), "{side} built what it could substitute:\n{e}");
        // A cache lacking part of a closure is no error to show: the build goes on.
        assert!(!e.contains("error:"), "{side} shows an error for a build that succeeds:\n{e}");
    }
    p.same_metadata(&[&top]);
}

/// The client's `--max-jobs 0` builds nothing locally, and its `--cores 0` reaches the builder
/// as `NIX_BUILD_CORES=0` ("use them all"), as with `nix-daemon`.
#[test]
fn a_client_s_max_jobs_0_and_cores_0_mean_what_they_mean_to_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let f = p.write(
        "opts.nix",
        br#"{ salt }: derivation { name = "cores-${salt}"; system = builtins.currentSystem; builder = "/bin/sh";
                               args = [ "-c" "echo $NIX_BUILD_CORES > $out" ]; }"#,
    );
    let (c, n) = p.alike("nix-build", &["--no-out-link", &f, "--argstr", "salt", "j0", "--max-jobs", "0"]);
    assert!(!c.status.success());
    both_say(&c, &n, &["unable to start any build; either increase '--max-jobs' or enable remote builds"]);
    let out = p.same("nix-build", &["--no-out-link", &f, "--argstr", "salt", "c0", "--cores", "0"]);
    let built = p.cairn.root.path().join(out.trim().trim_start_matches('/'));
    assert_eq!(std::fs::read_to_string(built).unwrap(), "0\n");
}

/// Sandbox rules as Nix 2.8 applies them: `__noChroot` refused under a sandbox, a group- or
/// world-writable output rejected, `passAsFile` and `exportReferencesGraph` files the builder's
/// own to change, `/etc/nsswitch.conf` for a fixed-output build, `/dev/shm` as large as Nix's.
/// A trusted client's `sandbox-paths` (its `nix.conf`'s and `extra-sandbox-paths` merged, as a
/// Nix client sends them) are its builds' instead of the daemon's, as nix-daemon applies a
/// trusted client's settings; an entry ending in `?` that the host lacks is left out.
#[test]
fn a_trusted_client_s_sandbox_paths_are_its_builds_as_with_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    p.write("extra/greeting", b"hello from the host\n");
    let extra = p.work.path().join("extra").display().to_string();
    let f = p.write(
        "sees.nix",
        br#"{ dir }: derivation { name = "sees-extra"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "cat ${dir}/greeting > $out" ]; }"#,
    );
    let extra_paths = format!("/extra={extra} /maybe=/nonexistent/path?");
    let args = [
        "--no-out-link",
        &f,
        "--argstr",
        "dir",
        "/extra",
        "--option",
        "sandbox-paths",
        "/bin/sh=/bin/busybox",
        "--option",
        "extra-sandbox-paths",
        &extra_paths,
    ];
    let (c, n) = p.alike("nix-build", &args);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    assert_eq!(c.stdout, n.stdout);
    let out = String::from_utf8_lossy(&c.stdout).trim().to_owned();
    for root in [p.cairn.root.path().to_owned(), p.nix.root()] {
        assert_eq!(std::fs::read(root.join(out.trim_start_matches('/'))).unwrap(), b"hello from the host\n");
    }
    // The client's list replaces the daemon's: without /bin/sh in it, neither can build.
    let (c, _) =
        p.alike("nix-build", &["--no-out-link", &f, "--argstr", "dir", "/x", "--option", "sandbox-paths", &extra]);
    assert!(!c.status.success());
}

#[test]
fn sandbox_rules_match_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let f = p.write(
        "rules.nix",
        br#"let sh = name: script: extra: derivation ({ inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; } // extra);
    dep = sh "dep" "echo dep > $out" {};
in {
  nochroot = sh "nochroot" "echo x > $out" { __noChroot = true; };
  writable = sh "writable" "mkdir $out; echo a > $out/a; chmod 777 $out" {};
  passfile = sh "passfile" "echo more >> $textPath; echo more >> g; cat $textPath g > $out" { passAsFile = [ "text" ]; text = "a"; exportReferencesGraph = [ "g" dep ]; };
  nss = sh "nss" "cat /etc/nsswitch.conf > $out" { outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"; };
  shm = sh "shm" "dd if=/dev/zero of=/dev/shm/big bs=1M count=80 2>/dev/null && echo ok > $out" {};
  pty = sh "pty" "exec 3<>/dev/ptmx && ls /dev/pts > $out" {};
  stdin = sh "stdin" "echo to stdin >&0 && echo ok > $out" {};
}"#,
    );
    for (attr, succeeds, says) in [
        ("nochroot", false, "has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'"),
        ("writable", false, "suspicious ownership or permission on"),
        ("passfile", true, ""),
        ("shm", true, ""),
        ("pty", true, ""),
        ("stdin", true, ""),
    ] {
        let (c, n) = p.alike("nix-build", &["--no-out-link", &f, "-A", attr]);
        assert_eq!(c.status.success(), succeeds, "{attr}: {}", String::from_utf8_lossy(&c.stderr));
        if succeeds {
            assert_eq!(c.stdout, n.stdout, "{attr}");
            let out = String::from_utf8_lossy(&c.stdout).trim().trim_start_matches('/').to_owned();
            let read = |root: &Path| std::fs::read_to_string(root.join(&out)).unwrap();
            assert_eq!(read(p.cairn.root.path()), read(&p.nix.root()), "{attr}: what the builder saw");
        } else {
            let (ce, ne) = (String::from_utf8_lossy(&c.stderr), String::from_utf8_lossy(&n.stderr));
            assert!(ce.contains(says) && ne.contains(says), "{attr}:\ncairnd: {ce}\nnix-daemon: {ne}");
        }
    }
    // The fixed output's hash is not that of nsswitch.conf: both fail, and say what they got.
    let (c, n) = p.alike("nix-build", &["--no-out-link", &f, "-A", "nss"]);
    let got = |o: &Output| {
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        e.lines().find(|l| l.trim_start().starts_with("got:")).map(|l| l.trim().to_owned()).unwrap_or(e)
    };
    assert_eq!(got(&c), got(&n), "/etc/nsswitch.conf differs in a fixed-output build");
}

/// What a builder writes reaches the client and the stored log as its bytes, as through
/// nix-daemon: a line that is not UTF-8, a line longer than the daemon's pieces, a carriage
/// return, and a last line without its newline.
#[test]
fn build_output_reaches_the_client_and_the_log_byte_for_byte_as_with_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let f = p.write(
        "bytes.nix",
        br#"derivation { name = "bytes"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" ''
  printf '\377\376 latin-1\n'
  head -c 100000 /dev/zero | tr '\0' a; echo
  printf 'progress 10%%\rprogress 100%%\n' >&2
  echo > $out
  printf 'last line without newline'
'' ]; }"#,
    );
    let drv = p.same("nix-instantiate", &[&f]);
    let (c, n) = p.alike("nix-build", &["--no-out-link", drv.trim()]);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    // What the client printed of the build: the lines that do not name a store path.
    let shown = |o: &Output| -> Vec<Vec<u8>> {
        o.stderr
            .split(|&b| b == b'\n')
            .filter(|l| !l.windows(11).any(|w| w == b"/nix/store/"))
            .map(<[u8]>::to_vec)
            .collect()
    };
    let (cs, ns) = (shown(&c), shown(&n));
    assert!(ns.iter().any(|l| l.starts_with(b"\xff\xfe latin-1")), "nix-daemon shows the raw bytes");
    assert!(ns.iter().any(|l| l.len() == 100_000), "nix-daemon shows the long line whole");
    let brief = |v: &[Vec<u8>]| -> Vec<String> {
        v.iter().map(|l| format!("{} bytes: {:?}", l.len(), String::from_utf8_lossy(&l[..l.len().min(40)]))).collect()
    };
    assert!(
        cs == ns,
        "what the client shows of the build differs:\ncairnd: {:#?}\nnix-daemon: {:#?}",
        brief(&cs),
        brief(&ns)
    );
    let log = |side| p.run(side, "nix-store", &["-l", drv.trim()]).stdout;
    let (cl, nl) = (log(Side::Cairn), log(Side::Nix));
    assert!(nl.ends_with(b"last line without newline"), "{:?}", String::from_utf8_lossy(&nl[nl.len() - 40..]));
    assert!(cl == nl, "the stored logs differ:\ncairnd: {} bytes\nnix-daemon: {} bytes", cl.len(), nl.len());
}

/// A fixed output built with another hash than declared fails, and is registered — as by
/// nix-daemon — at the path of the hash it has, where the derivation with its hash corrected
/// finds it without building.
#[test]
fn a_fixed_output_with_another_hash_is_kept_at_its_own_path_as_by_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let f = p.write(
        "mismatch.nix",
        br#"{ hash }: derivation { name = "fetched"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo goodbye > $out" ];
                 outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = hash; }"#,
    );
    let hello = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"; // "hello\n"
    let got = {
        let out = Command::new("sh").args(["-c", "echo goodbye | sha256sum"]).output().unwrap();
        String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
    };
    let (c, n) = p.alike("nix-build", &["--no-out-link", &f, "--argstr", "hash", hello]);
    assert!(!c.status.success());
    both_say(&c, &n, &["hash mismatch in fixed-output derivation"]);
    let kept = p.local(&["nix-store", "--print-fixed-path", "sha256", &got, "fetched"]);
    p.same("nix-store", &["--check-validity", kept.trim()]);
    p.same_metadata(&[kept.trim()]);
    // Corrected, it is found valid: nothing is built.
    let (c, n) = p.alike("nix-build", &["--no-out-link", &f, "--argstr", "hash", &got]);
    assert_eq!(c.stdout, n.stdout);
    assert_eq!(String::from_utf8_lossy(&c.stdout).trim(), kept.trim());
    for (side, o) in [("cairnd", &c), ("nix-daemon", &n)] {
        assert!(!String::from_utf8_lossy(&o.stderr).contains("building"), "{side} built it again");
    }
}

/// A trusted client's `post-build-hook` runs after each build, as nix-daemon runs it: with
/// `DRV_PATH` and `OUT_PATHS`, Nix commands in it seeing the daemon's store, its output shown to
/// the client; a failing hook fails the build.
#[test]
fn a_post_build_hook_runs_after_each_build_as_with_nix_daemon() {
    use std::os::unix::fs::PermissionsExt;
    if !peers() {
        return;
    }
    let p = Pair::start();
    let record = p.work.path().join("hook-record");
    let hook = p.write(
        "hook.sh",
        // A Nix command in the hook sees the daemon's store (here: queries the derivation).
        format!(
            "#!/bin/sh\necho \"$DRV_PATH|$OUT_PATHS\" >> {}\nnix-store -q --hash \"$DRV_PATH\" >/dev/null && echo uploading\n",
            record.display()
        )
        .as_bytes(),
    );
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = p.write(
        "hooked.nix",
        br#"let sh = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; outputs = [ "out" "doc" ]; };
    dep = sh "hooked-dep" "echo dep > $out; echo doc > $doc";
in { top = sh "hooked" "cat ${dep} > $out; echo > $doc"; bad = sh "hooked-bad" "echo > $out; echo > $doc"; }"#,
    );
    let mut records = Vec::new();
    for side in [Side::Cairn, Side::Nix] {
        let out = p.run(side, "nix-build", &["--no-out-link", &f, "-A", "top", "--option", "post-build-hook", &hook]);
        assert!(out.status.success(), "{side:?}: {}", String::from_utf8_lossy(&out.stderr));
        let said = String::from_utf8_lossy(&out.stderr);
        for want in [format!("running post-build-hook '{hook}'..."), "post-build-hook: uploading".to_owned()] {
            assert_eq!(said.matches(&want).count(), 2, "{side:?} does not say {want:?} for each build:\n{said}");
        }
        records.push(std::fs::read_to_string(&record).unwrap());
        std::fs::remove_file(&record).unwrap();
    }
    // The same derivations, in the same order. (Nix 2.8.0 passes OUT_PATHS empty, a bug later
    // releases fixed; cairnd passes the outputs.)
    let drvs = |r: &str| r.lines().map(|l| l.split('|').next().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(drvs(&records[0]), drvs(&records[1]));
    let top = p.same("nix-instantiate", &[&f, "-A", "top"]);
    let outs = p.same("nix-store", &["-q", "--outputs", top.trim()]);
    let mut outs: Vec<&str> = lines(&outs);
    outs.sort();
    let last = records[0].lines().last().unwrap();
    assert_eq!(last, format!("{}|{}", top.trim(), outs.join(" ")), "DRV_PATH and OUT_PATHS");
    // A failing hook fails the build, in the same words.
    let failing = p.write("failing-hook.sh", b"#!/bin/sh\necho no upload\nexit 3\n");
    std::fs::set_permissions(&failing, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (c, n) = p.alike("nix-build", &["--no-out-link", &f, "-A", "bad", "--option", "post-build-hook", &failing]);
    assert!(!c.status.success());
    both_say(&c, &n, &[&format!("program '{failing}' failed with exit code 3")]);
}

/// The daemon's own `post-build-hook` reaches the daemon's store with Nix's tools whatever its
/// store directory and root: the hook's `NIX_REMOTE` names the real store directory (Nix's
/// `root=` would take it to be `ROOT/nix/store`) and `NIX_STORE_DIR` the logical one.
#[test]
fn nix_commands_in_the_daemon_s_hook_see_its_store_under_another_store_directory() {
    use std::os::unix::fs::PermissionsExt;
    if !peers() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let record = work.path().join("record");
    let hook = work.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh
export HOME={home}
{{ nix --extra-experimental-features nix-command path-info \"$DRV_PATH\" && \
             nix-store -q --deriver \"$OUT_PATHS\" && \
             nix --extra-experimental-features nix-command store cat \"$OUT_PATHS\"; }} >> {record} 2>&1\n",
            home = work.path().display(),
            record = record.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let st = TestStore::builder()
        .store_dir("/gnu/store")
        .config(&format!("{CAIRN_CONFIG}post-build-hook = \"{}\"\n", hook.display()))
        .start();
    let drv = serde_json::json!({
        "outputs": { "out": { "path": "" } }, "inputSrcs": [], "inputDrvs": {}, "system": "x86_64-linux",
        "builder": "/bin/sh", "args": ["-c", "echo hooked > $out"],
        "env": { "name": "hooked-elsewhere", "builder": "/bin/sh", "system": "x86_64-linux", "out": "" },
    });
    let f = work.path().join("drv.json");
    std::fs::write(&f, drv.to_string()).unwrap();
    let drv = st.ok(&["derivation", "add", f.to_str().unwrap()]).trim().to_owned();
    let out = st.ok(&["realise", &drv]).trim().to_owned();
    assert!(out.starts_with("/gnu/store/"), "{out}");
    let said = std::fs::read_to_string(&record).unwrap();
    assert_eq!(said, format!("{out}\n{drv}\nhooked\n"), "{said}");
}

/// A client that goes away stops its build, as `nix-daemon` stops it: the builder's processes
/// are killed within a second or so, and nothing is registered. (The build said nothing, so
/// no failed write to the client could tell the daemon.)
#[test]
fn a_build_whose_client_goes_away_is_stopped() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let f = p.write(
        "long.nix",
        br#"derivation { name = "long"; system = builtins.currentSystem; builder = "/bin/sh";
                          args = [ "-c" "sleep 41.5; echo done > $out" ]; }"#,
    );
    let drv = p.ok(Side::Cairn, "nix-instantiate", &[&f]);
    let out = p.ok(Side::Cairn, "nix-store", &["-q", "--outputs", drv.trim()]);
    let mut client =
        p.cmd(Side::Cairn, "nix-store").args(["--realise", drv.trim()]).stdin(Stdio::null()).spawn().unwrap();
    let sleeping = || cairn_tests::processes(&["sleep", "41.5"]);
    let started = std::time::Instant::now();
    while sleeping().is_empty() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the build never started:
{}",
            p.cairn.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    client.kill().unwrap();
    client.wait().unwrap();
    let killed = std::time::Instant::now();
    while !sleeping().is_empty() {
        assert!(
            killed.elapsed() < std::time::Duration::from_secs(5),
            "the build of a client that went away still runs:
{}",
            p.cairn.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let valid = p.run(Side::Cairn, "nix-store", &["--check-validity", out.trim()]);
    assert!(!valid.status.success(), "the stopped build's output was registered");
    // Its build directory goes as a stopped build's does.
    let left = || {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("cairn-build-long-") && n.contains(&format!("-{}-", p.cairn.pid())))
            .collect::<Vec<_>>()
    };
    let gone = std::time::Instant::now();
    while !left().is_empty() {
        assert!(gone.elapsed() < std::time::Duration::from_secs(10), "build directory left: {:?}", left());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The daemon goes on serving.
    p.ok(Side::Cairn, "nix-store", &["-q", "--hash", drv.trim()]);
}

/// A Nix 2.8 machine (a local store, no daemon) hands its build to cairnd as its remote
/// builder: `ssh-ng://localhost` runs the remote program without ssh, and `cairnd --stdio`
/// relays the session to the running cairnd.
#[test]
fn nix_uses_cairnd_as_its_remote_builder_over_ssh_ng() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let builders = format!("ssh-ng://localhost?remote-program={} x86_64-linux", bin_dir().join("cairnd").display());
    nix_builds_a_chain_on(&p, &builders);
}

/// A trusted Nix client's `--builders` through the daemon: nix-daemon builds on them, and so
/// does cairnd (instead of its own, here none) — the outputs come back and are valid.
#[test]
fn a_trusted_client_s_builders_are_used_as_by_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    // The builder: a nix-daemon on a store of its own, configured as the tests' Nix is (run by
    // whichever daemon reaches it, in that daemon's environment).
    let program = p.write(
        "remote-nix-daemon",
        b"#!/bin/sh\nexport NIX_CONFIG='build-users-group =\nsandbox-paths = /bin/sh=/bin/busybox\nsubstituters ='\nexec nix-daemon \"$@\"\n",
    );
    std::fs::set_permissions(&program, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for side in [Side::Cairn, Side::Nix] {
        let remote = p.work.path().join(format!("remote-{side:?}"));
        let builders = format!(
            "ssh-ng://localhost?remote-program={program}&remote-store=local%3Froot%3D{} x86_64-linux",
            remote.display()
        );
        let args = ["--no-out-link", &expr("chain.nix"), "--arg", "n", "2", "--max-jobs", "0", "--builders", &builders];
        let out = p.ok(side, "nix-build", &args);
        let top = out.trim();
        p.ok(side, "nix-store", &["--check-validity", top]);
        let built_there = std::fs::read_dir(remote.join("nix/store"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with("-chain-1"));
        assert!(built_there, "{side:?}: the chain was built on the client's builder");
        let _ = Command::new("chmod").args(["-R", "u+w"]).arg(&remote).status();
    }
}

/// A Nix machine with a local store (no daemon) builds a chain of three with `--max-jobs 0` and
/// `builders`, which lead to this pair's cairnd: the build shows, its output is the one
/// nix-daemon makes, and cairnd's log names it.
fn nix_builds_a_chain_on(p: &Pair, builders: &str) {
    let local = p.work.path().join("local");
    let remote = p
        .cmd(Side::Cairn, "nix-build")
        .env("NIX_REMOTE", "")
        .env("CAIRN_ROOT", p.cairn.root.path())
        .env("CAIRN_STORE_DIR", "/nix/store")
        .env("CAIRN_SOCKET", &p.cairn.socket)
        .env("CAIRN_CONFIG", &p.cairn.config)
        .args(["--store", &format!("local?root={}", local.display()), "--no-out-link", &expr("chain.nix")])
        .args(["--arg", "n", "3", "--max-jobs", "0", "--builders", builders])
        .args(["--option", "sandbox-paths", "/bin/sh=/bin/busybox"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&remote.stderr);
    assert!(remote.status.success(), "remote build failed:\n{err}\ncairnd's log:\n{}", p.cairn.log());
    assert!(err.contains("chain-2"), "Nix shows the remote build:\n{err}");
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(&local).status();
    // The same output as a build on nix-daemon.
    let direct = p.ok(Side::Nix, "nix-build", &["--no-out-link", &expr("chain.nix"), "--arg", "n", "3"]);
    assert_eq!(String::from_utf8_lossy(&remote.stdout), direct);
    // cairnd built it (its log names the derivation).
    assert!(p.cairn.log().contains("chain-2"), "{}", p.cairn.log());
}

/// With no cairnd running, `cairnd --stdio` opens the store itself and serves the session:
/// `ssh-ng://localhost?remote-program=cairnd` then works on a store nobody serves.
#[test]
fn cairnd_stdio_serves_a_store_no_daemon_holds() {
    if !peers() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    let file = work.path().join("f.txt");
    std::fs::write(&file, b"over stdio\n").unwrap();
    let nix = |args: &[&str]| {
        let out = Command::new("nix")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", work.path())
            .env("NIX_CONFIG", CLIENT_CONFIG)
            .env("NIX_STATE_DIR", work.path().join("client-state"))
            .env("CAIRN_ROOT", &root)
            .env("CAIRN_STORE_DIR", "/nix/store")
            .env("CAIRN_CONFIG", "/dev/null")
            .env("CAIRN_SOCKET", work.path().join("no-daemon.sock"))
            .output()
            .unwrap();
        assert!(out.status.success(), "nix {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let remote = format!("ssh-ng://localhost?remote-program={}", bin_dir().join("cairnd").display());
    let src = format!("local?root={}", work.path().join("src").display());
    let out = Command::new("nix-store")
        .args(["--store", &src, "--add"])
        .arg(&file)
        .env("NIX_CONFIG", CLIENT_CONFIG)
        .env("NIX_REMOTE", "")
        .output()
        .unwrap();
    let path = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    nix(&["copy", "--no-check-sigs", "--from", &src, "--to", &remote, &path]);
    assert!(root.join(path.trim_start_matches('/')).exists(), "the path is in cairn's store");
    let info = nix(&["path-info", "--json", "--store", &remote, &path]);
    assert!(info.contains("\"narHash\""), "{info}");
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(work.path()).status();
}

/// What a client sees of failed builds and of a path nothing can make is nix-daemon's, word for
/// word: a dependency's failure with its log tail indented under its first line (Nix's
/// `showErrorInfo`), `-k` and without, the new CLI's `--keep-going`, and `nix-store -r` of a
/// path no cache has.
#[test]
fn failures_read_as_nix_daemon_s_word_for_word() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let f = p.write(
        "failures.nix",
        // One input only: two building at once would print their lines in either order.
        br#"let bad = derivation { name = "failures-bad"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo failing; exit 3" ]; };
in derivation { name = "failures-both"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo ${bad} > $out" ]; }"#,
    );
    let missing = "/nix/store/00000000000000000000000000000000-nothing";
    for args in [
        vec!["nix-build", "--no-out-link", &f],
        vec!["nix-build", "--no-out-link", &f, "-k"],
        vec!["nix", "build", "--no-link", "-f", &f, "--keep-going"],
        vec!["nix-store", "-r", missing],
    ] {
        let (c, n) = p.alike(args[0], &args[1..]);
        assert!(!c.status.success(), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&c.stderr), String::from_utf8_lossy(&n.stderr), "{args:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Nix's legacy SSH protocol: `cairnd --serve` against `nix-store --serve` on nix-daemon's store.

impl Pair {
    /// The program an `ssh://localhost` store runs for `side` (Nix runs `PROGRAM --serve
    /// --write` through `bash -c`, without ssh, for the host `localhost`): cairnd with this
    /// pair's settings, or Nix's own `nix-store` on nix-daemon's store.
    fn serve_program(&self, side: Side) -> String {
        match side {
            Side::Cairn => {
                let script = self.work.path().join("cairnd-serve");
                let body = format!(
                    "#!/bin/sh\nexec env CAIRN_ROOT='{}' CAIRN_STORE_DIR=/nix/store CAIRN_SOCKET='{}' CAIRN_CONFIG='{}' '{}' \"$@\"\n",
                    self.cairn.root.path().display(),
                    self.cairn.socket.display(),
                    self.cairn.config.display(),
                    bin_dir().join("cairnd").display()
                );
                cairn_tests::write_exec(&script, body.as_bytes());
                script.display().to_string()
            }
            Side::Nix => {
                let script = self.work.path().join("nix-store-serve");
                let body = format!("#!/bin/sh\nexec env NIX_REMOTE='{}' nix-store \"$@\"\n", self.url(Side::Nix));
                cairn_tests::write_exec(&script, body.as_bytes());
                script.display().to_string()
            }
        }
    }

    fn ssh_url(&self, side: Side) -> String {
        format!("ssh://localhost?remote-program={}", self.serve_program(side))
    }

    /// Runs `PROGRAM --serve ARGS` for `side` with `input` on its standard input. With `then`,
    /// the input stays open until that many bytes were answered (as a client waiting for a
    /// build keeps it: both servers stop a build whose client hung up), and more follows.
    fn serve_session(&self, side: Side, args: &[&str], input: &[u8], then: Option<(usize, &[u8])>) -> Output {
        let mut c = self.cmd(side, &self.serve_program(side));
        c.arg("--serve").args(args);
        let Some((wait_for, more)) = then else { return output_with_stdin(&mut c, input) };
        let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let errors = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
            v
        });
        let (mut stdin, mut stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
        std::io::Write::write_all(&mut stdin, input).unwrap();
        let mut answered = vec![0u8; wait_for];
        let read = std::io::Read::read_exact(&mut stdout, &mut answered);
        if read.is_ok() {
            std::io::Write::write_all(&mut stdin, more).unwrap();
        }
        drop(stdin);
        if read.is_ok() {
            std::io::Read::read_to_end(&mut stdout, &mut answered).unwrap();
        }
        let status = child.wait().unwrap();
        Output { status, stdout: answered, stderr: errors.join().unwrap() }
    }
}

/// Where two byte strings first differ, for a readable failure.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    let at = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
    let show = |s: &[u8]| String::from_utf8_lossy(&s[at.saturating_sub(32)..(at + 64).min(s.len())]).into_owned();
    format!("lengths {} and {}, first difference at {at}:\n{:?}\n{:?}", a.len(), b.len(), show(a), show(b))
}

/// A Nix 2.8 machine hands its builds to cairnd over Nix's legacy SSH protocol — what a builder
/// named `ssh://` or without a scheme uses — with `cairnd --serve --write` as the remote
/// program: the inputs go over, the build runs in cairnd, the outputs come back identical to
/// nix-daemon's, with the build's output shown.
#[test]
fn nix_uses_cairnd_as_its_remote_builder_over_legacy_ssh() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    // What the builder says is shown, as the build's log, through either remote program.
    let said = p.write(
        "said.nix",
        br#"derivation { name = "serve-said"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo said by the builder; echo > $out" ]; }"#,
    );
    for side in [Side::Cairn, Side::Nix] {
        let out = p
            .cmd(side, "nix-build")
            .env("NIX_REMOTE", "")
            .args(["--store", &format!("local?root={}", p.work.path().join(format!("said-{side:?}")).display())])
            .args(["--no-out-link", &said, "--max-jobs", "0", "--builders"])
            .arg(format!("{} x86_64-linux", p.ssh_url(side)))
            .args(["--option", "sandbox-paths", "/bin/sh=/bin/busybox"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{side:?}:\n{err}");
        assert!(err.contains("said by the builder"), "{side:?} shows the build's output:\n{err}");
    }
    nix_builds_a_chain_on(&p, &format!("{} x86_64-linux", p.ssh_url(Side::Cairn)));
}

/// A build handed over the legacy protocol that runs past `--max-silent-time` fails in Nix's
/// words for a goal built from a derivation it was sent, "from in-memory derivation" (Nix 2.8's
/// `DerivationGoal` names it so; the nix-store --serve here hands its builds to nix-daemon,
/// which does not take the client's limit, so only cairnd's words are checked).
#[test]
fn a_remote_build_timing_out_is_named_as_nix_store_serve_names_it() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let quiet = p.write(
        "quiet.nix",
        br#"derivation { name = "serve-quiet"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "sleep 5; echo > $out" ]; }"#,
    );
    let side = Side::Cairn;
    let out = p
        .cmd(side, "nix-build")
        .env("NIX_REMOTE", "")
        .args(["--store", &format!("local?root={}", p.work.path().join(format!("quiet-{side:?}")).display())])
        .args(["--no-out-link", &quiet, "--max-jobs", "0", "--max-silent-time", "1", "--builders"])
        .arg(format!("{} x86_64-linux", p.ssh_url(side)))
        .args(["--option", "sandbox-paths", "/bin/sh=/bin/busybox"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{side:?}:\n{err}");
    assert!(
        err.contains("-serve-quiet.drv!out' from in-memory derivation timed out after 1 seconds of silence"),
        "{side:?}:\n{err}"
    );
}

/// `nix copy` to and from an `ssh://` store served by `cairnd --serve`, `nix path-info -r` and
/// `nix store dump-path` on it, answer as they do when `nix-store --serve` serves nix-daemon's
/// store.
#[test]
fn an_ssh_store_served_by_cairnd_answers_nix_as_nix_store_serve_does() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let local = format!("local?root={}", p.work.path().join("local").display());
    let top = p.local_build(&local, &expr("chain.nix"));
    let mut metadata = Vec::new();
    let mut dumps = Vec::new();
    for side in [Side::Cairn, Side::Nix] {
        let url = p.ssh_url(side);
        p.ok(side, "nix", &["copy", "--no-check-sigs", "--from", &local, "--to", &url, &top]);
        // Only what is missing travels: a second copy has nothing to send.
        let again = p
            .cmd(side, "nix")
            .args(["copy", "-v", "--no-check-sigs", "--from", &local, "--to", &url, &top])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&again.stderr);
        assert!(again.status.success() && !said.contains("copying path"), "{side:?}:\n{said}");
        metadata.push(path_info_fields(
            p.ok(side, "nix", &["path-info", "--json", "-r", "--store", &url, &top]).as_bytes(),
            &["narHash", "narSize", "references", "ca", "deriver"],
        ));
        let dump = p.cmd(side, "nix").args(["store", "dump-path", "--store", &url, &top]).output().unwrap();
        assert!(dump.status.success(), "{side:?}: {}", String::from_utf8_lossy(&dump.stderr));
        dumps.push(dump.stdout);
        // And back, into a store of its own.
        let back = format!("local?root={}", p.work.path().join(format!("back-{side:?}")).display());
        p.ok(side, "nix", &["copy", "--no-check-sigs", "--from", &url, "--to", &back, &top]);
        let verified =
            p.cmd(side, "nix").args(["store", "verify", "--no-trust", "--store", &back, "-r", &top]).output().unwrap();
        assert!(verified.status.success(), "{side:?}: {}", String::from_utf8_lossy(&verified.stderr));
    }
    assert_eq!(metadata[0].len(), 200, "the whole closure is there");
    assert_eq!(metadata[0], metadata[1]);
    assert!(dumps[0] == dumps[1], "{}", first_difference(&dumps[0], &dumps[1]));
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(p.work.path()).status();
}

/// The protocol itself, byte for byte: one session of every command (queries with and without
/// temporary roots, path infos, closures with and without outputs, a NAR, an export, an import,
/// a build) written by cairn's serve client, answered by `cairnd --serve --write` and by
/// `nix-store --serve --write` on nix-daemon's store: the answers are the same bytes.
#[test]
fn cairnd_serve_answers_every_command_byte_for_byte_as_nix_store_serve() {
    use cairn_worker::codec::write_u64;
    use cairn_worker::serve::{ServeBuildSettings, ServeRequest, SERVE_MAGIC_1, SERVE_PROTOCOL_VERSION};
    use cairn_worker::{DerivedPath, OutputsSpec};
    if !peers() {
        return;
    }
    let p = Pair::start();
    let dir = cairn_nix::StoreDir::new("/nix/store").unwrap();
    let path = |s: &str| dir.parse(s.trim()).unwrap();
    let local = format!("local?root={}", p.work.path().join("local").display());
    let top = p.local_build(&local, &expr("chain.nix"));
    let drv = p.same("nix-instantiate", &[&expr("chain.nix"), "--arg", "n", "2"]);
    let out = p.same("nix-store", &["-q", "--outputs", drv.trim()]);
    for side in [Side::Cairn, Side::Nix] {
        p.ok(side, "nix", &["copy", "--no-check-sigs", "--from", &local, "--to", &p.url(side), &top]);
    }
    // A closure in neither store (a chain of four, each referring to the one before), as an
    // export stream.
    let other = format!("local?root={}", p.work.path().join("other").display());
    let four = p.write("four.nix", br#"import ./chain4.nix"#);
    std::fs::copy(expr("chain.nix"), p.work.path().join("chain.nix")).unwrap();
    p.write("chain4.nix", br#"import ./chain.nix { n = 4; }"#);
    let imported = p.local_build(&other, &four);
    let chain4 = p.local(&["nix-store", "--store", &other, "-qR", &imported]);
    let mut export_args = vec!["--store", other.as_str(), "--export"];
    export_args.extend(chain4.lines());
    let export = p.cmd(Side::Nix, "nix-store").env_remove("NIX_REMOTE").args(&export_args).output().unwrap();
    assert!(export.status.success());

    let (top, drv, out) = (path(&top), path(&drv), path(&out));
    let closure = p.same("nix-store", &["-qR", &dir.display(&top)]);
    let closure: BTreeSet<_> = closure.lines().map(path).collect();
    // Ten consecutive links of the chain: each refers to another of them.
    let mut link = top.clone();
    let mut links = BTreeSet::new();
    while links.len() < 10 {
        links.insert(link.clone());
        let refs = p.same("nix-store", &["-q", "--references", &dir.display(&link)]);
        link = path(refs.lines().next().unwrap());
    }
    let missing = path("/nix/store/00000000000000000000000000000000-missing");
    let mut session = Vec::new();
    write_u64(&mut session, SERVE_MAGIC_1).unwrap();
    write_u64(&mut session, SERVE_PROTOCOL_VERSION).unwrap();
    let requests = [
        ServeRequest::QueryValidPaths { lock: true, substitute: false, paths: [top.clone(), missing.clone()].into() },
        ServeRequest::QueryPathInfos(closure.iter().take(3).cloned().chain([top.clone(), missing]).collect()),
        ServeRequest::QueryClosure { include_outputs: false, paths: [top.clone()].into() },
        ServeRequest::QueryClosure { include_outputs: true, paths: [drv.clone()].into() },
        ServeRequest::DumpStorePath(top.clone()),
        ServeRequest::ExportPaths(links),
    ];
    for r in &requests {
        r.write(&mut session, &dir, SERVE_PROTOCOL_VERSION).unwrap();
    }
    ServeRequest::ImportPaths.write(&mut session, &dir, SERVE_PROTOCOL_VERSION).unwrap();
    session.extend_from_slice(&export.stdout);
    let gone = path("/nix/store/00000000000000000000000000000000-gone");
    for r in [
        ServeRequest::QueryPathInfos(chain4.lines().map(path).collect()),
        ServeRequest::QueryClosure { include_outputs: false, paths: [gone].into() },
    ] {
        r.write(&mut session, &dir, SERVE_PROTOCOL_VERSION).unwrap();
    }
    let c = p.serve_session(Side::Cairn, &["--write"], &session, None);
    let n = p.serve_session(Side::Nix, &["--write"], &session, None);
    let (ce, ne) = (String::from_utf8_lossy(&c.stderr), String::from_utf8_lossy(&n.stderr));
    // The last query names an invalid path: both end the session there with an error.
    assert!(!c.status.success() && !n.status.success(), "cairnd:\n{ce}\nnix-store:\n{ne}");
    assert!(ce.contains("is not valid") && ne.contains("is not valid"), "cairnd:\n{ce}\nnix-store:\n{ne}");
    assert!(c.stdout == n.stdout, "{}\ncairnd:\n{ce}\nnix-store:\n{ne}", first_difference(&c.stdout, &n.stdout));
    assert!(c.stdout.len() > 4096, "a NAR and an export were answered: {} bytes", c.stdout.len());

    // A build, in a session that stays open until it is answered.
    let mut build = Vec::new();
    write_u64(&mut build, SERVE_MAGIC_1).unwrap();
    write_u64(&mut build, SERVE_PROTOCOL_VERSION).unwrap();
    let settings = ServeBuildSettings { max_silent_time: 60, build_timeout: 600, ..Default::default() };
    let paths = vec![DerivedPath::Built { drv_path: drv, outputs: OutputsSpec::All }];
    ServeRequest::BuildPaths { paths, settings }.write(&mut build, &dir, SERVE_PROTOCOL_VERSION).unwrap();
    let mut then = Vec::new();
    let query = ServeRequest::QueryValidPaths { lock: false, substitute: false, paths: [out.clone()].into() };
    query.write(&mut then, &dir, SERVE_PROTOCOL_VERSION).unwrap();
    let c = p.serve_session(Side::Cairn, &["--write"], &build, Some((24, &then)));
    let n = p.serve_session(Side::Nix, &["--write"], &build, Some((24, &then)));
    let (ce, ne) = (String::from_utf8_lossy(&c.stderr), String::from_utf8_lossy(&n.stderr));
    assert!(c.status.success() && n.status.success(), "cairnd:\n{ce}\nnix-store:\n{ne}");
    assert!(c.stdout == n.stdout, "{}\ncairnd:\n{ce}\nnix-store:\n{ne}", first_difference(&c.stdout, &n.stdout));
    // The import and the build are in both stores now.
    let out_shown = dir.display(&out);
    assert_eq!(p.same("nix-store", &["-qR", imported.trim()]), chain4, "the imported closure is in both stores");
    p.same("nix-store", &["--check-validity", &out_shown]);
}

/// Refusals read as `nix-store --serve`'s: without `--write`, imports and builds are refused;
/// a stranger's greeting, an unknown command and an `AddToStoreNar` whose bytes lie about their
/// hash end the session. Each time both answer the same bytes before it ends, fail, say the
/// same thing, and register nothing; the daemon goes on serving.
#[test]
fn cairnd_serve_refuses_what_nix_store_serve_refuses() {
    use cairn_worker::codec::write_u64;
    use cairn_worker::serve::{ServeBuildSettings, ServeRequest, SERVE_MAGIC_1, SERVE_PROTOCOL_VERSION};
    use cairn_worker::{PathInfo, ValidPathInfo};
    if !peers() {
        return;
    }
    let p = Pair::start();
    let dir = cairn_nix::StoreDir::new("/nix/store").unwrap();
    let greeting = || {
        let mut v = Vec::new();
        write_u64(&mut v, SERVE_MAGIC_1).unwrap();
        write_u64(&mut v, SERVE_PROTOCOL_VERSION).unwrap();
        v
    };
    let with = |r: ServeRequest, tail: &[u8]| {
        let mut v = greeting();
        r.write(&mut v, &dir, SERVE_PROTOCOL_VERSION).unwrap();
        v.extend_from_slice(tail);
        v
    };
    let mut nar = cairn_nix::nar::NarWriter::new(Vec::new()).unwrap();
    nar.regular(None, false, 6, &mut &b"lies!\n"[..]).unwrap();
    let nar = nar.finish().unwrap();
    let liar = cairn_nix::StorePath::from_base_name("7rjj86a15146cq1d3qy068lml7n8ykzm-liar").unwrap();
    let lying = ServeRequest::AddToStoreNar(ValidPathInfo {
        path: liar.clone(),
        info: PathInfo {
            deriver: None,
            nar_hash: cairn_nix::Hash::digest(cairn_nix::HashAlgo::Sha256, b"something else"),
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size: nar.len() as u64,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        },
    });
    let mut unknown = greeting();
    write_u64(&mut unknown, 42).unwrap();
    let mut stranger = Vec::new();
    write_u64(&mut stranger, 0x6e69_7863).unwrap();
    write_u64(&mut stranger, 0x122).unwrap();
    let build = ServeRequest::BuildPaths { paths: Vec::new(), settings: ServeBuildSettings::default() };
    let cases: Vec<(&[&str], Vec<u8>, &str)> = vec![
        (&[], with(ServeRequest::ImportPaths, &[0; 8]), "importing paths is not allowed"),
        (&[], with(lying.clone(), &nar), "importing paths is not allowed"),
        (&[], with(build, &[]), "building paths is not allowed"),
        (&["--write"], unknown, "unknown serve command 42"),
        (&["--write"], stranger, "protocol mismatch"),
        (&["--write"], with(lying, &nar), "hash"),
    ];
    for (args, input, says) in cases {
        let c = p.serve_session(Side::Cairn, args, &input, None);
        let n = p.serve_session(Side::Nix, args, &input, None);
        let (ce, ne) = (String::from_utf8_lossy(&c.stderr), String::from_utf8_lossy(&n.stderr));
        assert!(!c.status.success() && !n.status.success(), "{says}: cairnd:\n{ce}\nnix-store:\n{ne}");
        assert!(c.stdout == n.stdout, "{says}: {}", first_difference(&c.stdout, &n.stdout));
        assert!(ce.contains(says) && ne.contains(says), "{says}: cairnd:\n{ce}\nnix-store:\n{ne}");
    }
    let (c, n) = p.alike("nix-store", &["--check-validity", &dir.display(&liar)]);
    assert!(!c.status.success() && !n.status.success(), "the lying path is not registered");
    // The daemon goes on serving.
    let added = p.ok(Side::Cairn, "nix-store", &["--add", &p.write("after.txt", b"after\n")]);
    p.ok(Side::Cairn, "nix-store", &["-q", "--hash", added.trim()]);
}

/// A client that hangs up while its build runs stops the build, as `nix-store --serve` stops it
/// (`MonitorFdHup`); nothing is registered and the daemon goes on serving.
#[test]
fn a_serve_client_that_hangs_up_stops_its_build_as_with_nix_store_serve() {
    use cairn_worker::codec::write_u64;
    use cairn_worker::serve::{ServeBuildSettings, ServeRequest, SERVE_MAGIC_1, SERVE_PROTOCOL_VERSION};
    use cairn_worker::{DerivedPath, OutputsSpec};
    if !peers() {
        return;
    }
    let p = Pair::start();
    let dir = cairn_nix::StoreDir::new("/nix/store").unwrap();
    let f = p.write(
        "long.nix",
        br#"derivation { name = "serve-long"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "sleep 67; echo > $out" ]; }"#,
    );
    let drv = p.same("nix-instantiate", &[&f]);
    let out = p.same("nix-store", &["-q", "--outputs", drv.trim()]);
    let mut input = Vec::new();
    write_u64(&mut input, SERVE_MAGIC_1).unwrap();
    write_u64(&mut input, SERVE_PROTOCOL_VERSION).unwrap();
    let paths = vec![DerivedPath::Built { drv_path: dir.parse(drv.trim()).unwrap(), outputs: OutputsSpec::All }];
    ServeRequest::BuildPaths { paths, settings: ServeBuildSettings::default() }
        .write(&mut input, &dir, SERVE_PROTOCOL_VERSION)
        .unwrap();
    let running = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            // Arguments are NUL-separated: joined by spaces, `sleep 67` is the builder's shell
            // and the `sleep` it runs.
            .any(|c| {
                c.iter()
                    .map(|&b| if b == 0 { b' ' } else { b })
                    .collect::<Vec<_>>()
                    .windows(8)
                    .any(|w| w == b"sleep 67")
            })
    };
    let within = |secs: u64, what: &str, done: &dyn Fn() -> bool| {
        let since = std::time::Instant::now();
        while !done() {
            assert!(since.elapsed() < std::time::Duration::from_secs(secs), "{what}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    for side in [Side::Cairn, Side::Nix] {
        let mut c = p.cmd(side, &p.serve_program(side));
        c.args(["--serve", "--write"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = c.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, &input).unwrap();
        // The client goes away once its build runs.
        within(30, &format!("{side:?}: the build never started"), &running);
        drop(stdin);
        let stopped = std::time::Instant::now();
        let o = child.wait_with_output().unwrap();
        assert!(!o.status.success(), "{side:?}: the session ends in an error");
        assert!(stopped.elapsed() < std::time::Duration::from_secs(20), "{side:?} waited for the build");
        assert_eq!(o.stdout.len(), 16, "{side:?}: only the greeting is answered");
        within(15, &format!("{side:?}: its builder still runs"), &|| !running());
    }
    let (c, n) = p.alike("nix-store", &["--check-validity", out.trim()]);
    assert!(!c.status.success() && !n.status.success());
    p.ok(Side::Cairn, "nix-store", &["-q", "--hash", drv.trim()]);
}

/// With no cairnd running, `cairnd --serve --write` opens the store itself: `nix copy` to
/// `ssh://localhost?remote-program=cairnd` works on a store nobody serves.
#[test]
fn cairnd_serve_serves_a_store_no_daemon_holds() {
    if !peers() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    let file = work.path().join("f.txt");
    std::fs::write(&file, b"over ssh://\n").unwrap();
    let program = work.path().join("cairnd-serve");
    let body = format!(
        "#!/bin/sh\nexec env CAIRN_ROOT='{}' CAIRN_STORE_DIR=/nix/store CAIRN_CONFIG=/dev/null CAIRN_SOCKET='{}' '{}' \"$@\"\n",
        root.display(),
        work.path().join("no-daemon.sock").display(),
        bin_dir().join("cairnd").display()
    );
    cairn_tests::write_exec(&program, body.as_bytes());
    let nix = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", work.path())
            .env("NIX_CONFIG", CLIENT_CONFIG)
            .env("NIX_STATE_DIR", work.path().join("client-state"))
            .env("NIX_REMOTE", "")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let remote = format!("ssh://localhost?remote-program={}", program.display());
    let src = format!("local?root={}", work.path().join("src").display());
    let path = nix(&["nix-store", "--store", &src, "--add", &file.display().to_string()]).trim().to_owned();
    nix(&["nix", "copy", "--no-check-sigs", "--from", &src, "--to", &remote, &path]);
    assert!(root.join(path.trim_start_matches('/')).exists(), "the path is in cairn's store");
    let info = nix(&["nix", "path-info", "--json", "--store", &remote, &path]);
    assert!(info.contains("\"narHash\""), "{info}");
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(work.path()).status();
}

/// Failed builds over the legacy protocol answer as `nix-store --serve`'s do: `BuildPaths` with
/// status 1 and the error as Nix renders it, `BuildDerivation` with the build's status and
/// message (the same text once colour escapes are set aside; the times are each run's own).
#[test]
fn failed_builds_over_serve_answer_as_nix_store_serve_s() {
    use cairn_worker::codec::{read_u64, write_u64};
    use cairn_worker::serve::{
        read_build_result, ServeBuildSettings, ServeRequest, SERVE_MAGIC_1, SERVE_PROTOCOL_VERSION,
    };
    use cairn_worker::{BasicDerivation, DerivedPath, Limits, OutputsSpec};
    if !peers() {
        return;
    }
    let p = Pair::start();
    let dir = cairn_nix::StoreDir::new("/nix/store").unwrap();
    let f = p.write(
        "bad.nix",
        br#"derivation { name = "serve-bad"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo about to fail; exit 3" ]; }"#,
    );
    let drv = p.same("nix-instantiate", &[&f]).trim().to_owned();
    let parsed = cairn_nix::derivation::Derivation::parse(
        &std::fs::read(p.cairn.root.path().join(drv.trim_start_matches('/'))).unwrap(),
    )
    .unwrap();
    let drv_path = dir.parse(&drv).unwrap();
    let basic = BasicDerivation::from_derivation(&parsed, BTreeSet::new());
    let strip = |s: &str| {
        let mut out = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let session = |req: ServeRequest| {
        let mut v = Vec::new();
        write_u64(&mut v, SERVE_MAGIC_1).unwrap();
        write_u64(&mut v, SERVE_PROTOCOL_VERSION).unwrap();
        req.write(&mut v, &dir, SERVE_PROTOCOL_VERSION).unwrap();
        v
    };
    let settings = ServeBuildSettings::default();
    let paths = vec![DerivedPath::Built { drv_path: drv_path.clone(), outputs: OutputsSpec::All }];
    let build_paths = session(ServeRequest::BuildPaths { paths, settings: settings.clone() });
    let build_drv = session(ServeRequest::BuildDerivation { drv_path, drv: basic, settings });
    let mut answers = Vec::new();
    for side in [Side::Cairn, Side::Nix] {
        // Each session stays open until its first answer word has come.
        let o = p.serve_session(side, &["--write"], &build_paths, Some((24, &[])));
        let mut r = &o.stdout[16..];
        let status = read_u64(&mut r).unwrap();
        let message = cairn_worker::codec::read_string(&mut r, 1 << 20, "message").unwrap();
        assert!(message.starts_with("\x1b[31;1merror:\x1b[0m "), "{side:?}: {message:?}");
        let o = p.serve_session(side, &["--write"], &build_drv, Some((24, &[])));
        let result = read_build_result(&mut &o.stdout[16..], Limits::default(), SERVE_PROTOCOL_VERSION).unwrap();
        answers.push((status, strip(&message), result.status, strip(&result.error_msg), result.times_built));
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0].0, 1);
}

/// `cairn copy --to ssh-ng://…` and `--to ssh://…` put a closure into a Nix store as `nix copy
/// --to` does: through `nix-daemon --stdio` or `nix-store --serve --write` on nix-daemon's store,
/// only what is missing, with the same metadata there as here; unsigned paths are refused by
/// a daemon that checks signatures unless `--no-check-sigs` is given. `--from` the same URLs
/// brings closures back, as `nix copy --from` does.
#[test]
fn cairn_copy_moves_closures_to_and_from_nix_stores_over_ssh_as_nix_copy_does() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let daemon = {
        let script = p.work.path().join("nix-daemon-stdio");
        let body = format!("#!/bin/sh\nexec env NIX_REMOTE='{}' nix-daemon \"$@\"\n", p.url(Side::Nix));
        cairn_tests::write_exec(&script, body.as_bytes());
        script.display().to_string()
    };
    let ng = format!("ssh-ng://localhost?remote-program={daemon}");
    let top = p.ok(Side::Cairn, "nix-build", &["--no-out-link", &expr("chain.nix"), "--arg", "n", "3"]);
    let top = top.trim();
    // A daemon that checks signatures refuses unsigned paths, and says why.
    let refused = p.cairn.run(&["copy", "--to", &ng, top], b"");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("signature"), "{said}");
    let copied = p.cairn.run(&["copy", "--json", "--no-check-sigs", "--to", &ng, top], b"");
    assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));
    let json: serde_json::Value = serde_json::from_slice(&copied.stdout).unwrap();
    assert_eq!((json["copied"].as_u64(), json["skipped"].as_u64()), (Some(3), Some(0)));
    p.same_metadata(&[top]);
    let again = p.cairn.run(&["copy", "--json", "--no-check-sigs", "--to", &ng, top], b"");
    let json: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!((json["copied"].as_u64(), json["skipped"].as_u64()), (Some(0), Some(3)), "only what is missing");
    // The legacy protocol: a longer chain, of which three links are there already.
    let longer = p.ok(Side::Cairn, "nix-build", &["--no-out-link", &expr("chain.nix"), "--arg", "n", "5"]);
    let longer = longer.trim();
    let legacy = p.ssh_url(Side::Nix);
    let copied = p.cairn.run(&["copy", "--json", "--to", &legacy, longer], b"");
    assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));
    let json: serde_json::Value = serde_json::from_slice(&copied.stdout).unwrap();
    assert_eq!((json["copied"].as_u64(), json["skipped"].as_u64()), (Some(2), Some(3)));
    p.same_metadata(&[longer]);

    // And back the other way, as `nix copy --from`: paths built by nix-daemon come into cairnd,
    // through either protocol, only what is missing; unsigned ones only with --no-check-sigs,
    // even for a trusted user, as with Nix.
    let f = p.write(
        "from-nix.nix",
        br#"let a = derivation { name = "from-nix-a"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo a > $out" ]; };
    b = derivation { name = "from-nix-b"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo ${a} > $out" ]; };
in derivation { name = "from-nix-c"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo ${b} > $out" ]; }"#,
    );
    let c = p.ok(Side::Nix, "nix-build", &["--no-out-link", &f]);
    let c = c.trim();
    let b = p.ok(Side::Nix, "nix-store", &["-q", "--references", c]);
    let b = b.trim();
    let unsigned = p.cairn.run(&["copy", "--from", &ng, b], b"");
    let said = String::from_utf8_lossy(&unsigned.stderr);
    assert!(!unsigned.status.success() && said.contains("it is not signed"), "{said}");
    let copied = p.cairn.run(&["copy", "--json", "--no-check-sigs", "--from", &ng, b], b"");
    assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));
    let json: serde_json::Value = serde_json::from_slice(&copied.stdout).unwrap();
    assert_eq!((json["copied"].as_u64(), json["skipped"].as_u64()), (Some(2), Some(0)));
    let copied = p.cairn.run(&["copy", "--json", "--no-check-sigs", "--from", &legacy, c], b"");
    assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));
    let json: serde_json::Value = serde_json::from_slice(&copied.stdout).unwrap();
    assert_eq!((json["copied"].as_u64(), json["skipped"].as_u64()), (Some(1), Some(2)));
    p.same_metadata(&[c]);
    // Signed there with a key cairnd trusts, a path comes without --no-check-sigs.
    let (sk, pk) = p.key("there");
    let d = p.write("from-nix-d.nix", br#"derivation { name = "from-nix-d"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo d > $out" ]; }"#);
    let d = p.ok(Side::Nix, "nix-build", &["--no-out-link", &d]);
    let d = d.trim();
    p.ok(Side::Nix, "nix", &["store", "sign", "--key-file", &sk.display().to_string(), d]);
    let refused = p.cairn.run(&["copy", "--from", &legacy, d], b"");
    assert!(!refused.status.success(), "not yet trusted");
    let trusting = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!("{CAIRN_CONFIG}trusted-public-keys = [\"{pk}\"]\n"))
        .start();
    let signed = trusting.run(&["copy", "--from", &legacy, d], b"");
    assert!(signed.status.success(), "{}", String::from_utf8_lossy(&signed.stderr));
    p.cairn.ok(&["verify", "--check-contents"]);
    // A path the store there does not have is named.
    let gone = "/nix/store/00000000000000000000000000000000-gone";
    let e = p.cairn.run(&["copy", "--from", &legacy, gone], b"");
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains(gone), "{e:?}");
}

/// `nix-copy-closure` runs `nix-store --serve --write` on the other machine, by that name. On a
/// machine with cairn and no Nix, a `nix-store` on the ssh user's `PATH` that runs `cairnd`
/// takes `nix-copy-closure --to` and answers `--from`, as Nix's own would.
#[test]
fn nix_copy_closure_reaches_cairnd_as_the_remote_nix_store() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let bin = p.work.path().join("remote-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let body = format!("#!/bin/sh\nexec '{}' \"$@\"\n", p.serve_program(Side::Cairn));
    cairn_tests::write_exec(&bin.join("nix-store"), body.as_bytes());
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let local = format!("local?root={}", p.work.path().join("local").display());
    let top = p.local_build(&local, &expr("chain.nix"));
    // nix-copy-closure copies from the client's own store: NIX_REMOTE names it.
    let copy = |args: &[&str]| {
        let out = p
            .cmd(Side::Nix, "nix-copy-closure")
            .env("PATH", &path)
            .env("NIX_REMOTE", &local)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "nix-copy-closure {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    copy(&["--to", "localhost", &top]);
    let closure = p.ok(Side::Cairn, "nix-store", &["-qR", &top]);
    assert_eq!(closure.lines().count(), 200, "the whole closure is in cairn's store");
    // And back, into another store of the client's.
    let back = format!("local?root={}", p.work.path().join("back").display());
    let out = p
        .cmd(Side::Nix, "nix-copy-closure")
        .env("PATH", &path)
        .env("NIX_REMOTE", &back)
        .args(["--from", "localhost", &top])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let there = p.local(&["nix-store", "--store", &back, "-qR", &top]);
    assert_eq!(there, p.local(&["nix-store", "--store", &local, "-qR", &top]));
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(p.work.path()).status();
}

/// `cairn copy --to ssh-ng://… -s` (and `ssh://`) has the store there substitute what its own
/// caches have and sends only the rest, as `nix copy -s` does; without `-s` everything missing
/// is sent.
#[test]
fn cairn_copy_substitute_on_destination_sends_only_what_the_far_side_cannot_fetch() {
    if !peers() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let nix_conf = format!("substituters = file://{}\nrequire-sigs = false\n", cache.path().display());
    let p = Pair::start_with("", &nix_conf);
    let daemon = {
        let script = p.work.path().join("nix-daemon-stdio");
        let body = format!("#!/bin/sh\nexec env NIX_REMOTE='{}' nix-daemon \"$@\"\n", p.url(Side::Nix));
        cairn_tests::write_exec(&script, body.as_bytes());
        script.display().to_string()
    };
    let count = |out: &Output| {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (json["copied"].as_u64().unwrap(), json["skipped"].as_u64().unwrap())
    };
    let cache_url = format!("file://{}", cache.path().display());
    for (n, url) in [("3", format!("ssh-ng://localhost?remote-program={daemon}")), ("4", p.ssh_url(Side::Nix))] {
        let top = p.ok(Side::Cairn, "nix-build", &["--no-out-link", &expr("chain.nix"), "--arg", "n", n]);
        let top = top.trim();
        // The closure's first links are in the far side's cache, the top is not.
        let below = p.ok(Side::Cairn, "nix-store", &["-q", "--references", top]);
        p.cairn.ok(&["copy", "--to", &cache_url, below.trim()]);
        let out = p.cairn.run(&["copy", "--json", "-s", "--no-check-sigs", "--to", &url, top], b"");
        let (copied, skipped) = count(&out);
        assert_eq!(copied, 1, "{url}: only the top is sent");
        assert_eq!(copied + skipped, n.parse::<u64>().unwrap(), "{url}");
        p.same_metadata(&[top]);
    }
    // Without -s, a path the cache has is sent all the same.
    let f = p.write(
        "no-s.nix",
        br#"let a = derivation { name = "no-s-a"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo a > $out" ]; };
in derivation { name = "no-s-b"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo ${a} > $out" ]; }"#,
    );
    let top = p.ok(Side::Cairn, "nix-build", &["--no-out-link", &f]);
    let top = top.trim();
    let below = p.ok(Side::Cairn, "nix-store", &["-q", "--references", top]);
    p.cairn.ok(&["copy", "--to", &cache_url, below.trim()]);
    let url = format!("ssh-ng://localhost?remote-program={daemon}");
    let (copied, _) = count(&p.cairn.run(&["copy", "--json", "--no-check-sigs", "--to", &url, top], b""));
    assert_eq!(copied, 2, "without -s the cached link is sent too");
}

/// A Nix store reached over SSH is a substituter for cairnd as for nix-daemon: `ssh://`
/// (`nix-store --serve`, what NixOS's `nix.sshServe` offers) and `ssh-ng://` (`nix-daemon
/// --stdio`), each with its signatures checked unless its URL says `?trusted=1`, its NARs
/// checked against what it said of them, and `cairn substitute --from` reaching it too.
#[test]
fn stores_reached_over_ssh_substitute_as_with_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let src = p.work.path().join("ssh-src");
    let local = format!("local?root={}", src.display());
    let f = p.write(
        "over-ssh.nix",
        br#"let dep = derivation { name = "over-ssh-dep"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo dep > $out" ]; };
in derivation { name = "over-ssh-top"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo ${dep} > $out" ]; }"#,
    );
    let top = p.local_build(&local, &f);
    let dep = p.local(&["nix-store", "--store", &local, "-q", "--references", &top]).trim().to_owned();
    let program = |name: &str, tool: &str| {
        let script = p.work.path().join(name);
        cairn_tests::write_exec(
            &script,
            format!("#!/bin/sh\nexec env NIX_REMOTE='{local}' {tool} \"$@\"\n").as_bytes(),
        );
        script.display().to_string()
    };
    let ssh = format!("ssh://localhost?remote-program={}", program("src-nix-store", "nix-store"));
    let ng = format!("ssh-ng://localhost?remote-program={}", program("src-nix-daemon", "nix-daemon"));
    let forget = || {
        for side in [Side::Cairn, Side::Nix] {
            p.ok(side, "nix-store", &["--delete", &top, &dep]);
        }
    };
    let valid = |side: Side, path: &str| p.run(side, "nix-store", &["--check-validity", path]).status.success();
    // Unsigned, from an untrusted store: refused by both, nothing registered.
    for url in [&ssh, &ng] {
        let (c, n) = p.alike("nix-store", &["--realise", &top, "--option", "substituters", url]);
        assert!(!c.status.success() && !n.status.success(), "{url}: {}", String::from_utf8_lossy(&c.stderr));
        let shown = url.split('?').next().unwrap();
        both_say(&c, &n, &[&format!(
            "warning: the substitute for '{top}' from '{shown}' is not signed by any of the keys in 'trusted-public-keys'"
        )]);
        assert!(!valid(Side::Cairn, &dep) && !valid(Side::Cairn, &top), "{url}: nothing of it is registered");
    }
    // `?trusted=1`: taken, as Nix takes it, and said to come from the store as Nix names it.
    for (url, shown) in [(&ssh, "ssh://localhost"), (&ng, "ssh-ng://localhost")] {
        let trusted = format!("{url}&trusted=1");
        let (c, n) = p.alike("nix-store", &["--realise", &top, "--option", "substituters", &trusted]);
        assert!(c.status.success(), "{url}: {}", String::from_utf8_lossy(&c.stderr));
        assert_eq!(c.stdout, n.stdout);
        both_say(
            &c,
            &n,
            &[&format!("copying path '{top}' from '{shown}'"), &format!("copying path '{dep}' from '{shown}'")],
        );
        p.same_metadata(&[&top]);
        forget();
    }
    // Signed there, with the key given: taken from an untrusted store too.
    let (sk, pk) = p.key("over-ssh-key");
    p.local(&["nix", "store", "sign", "--store", &local, "--key-file", sk.to_str().unwrap(), "-r", &top]);
    for url in [&ssh, &ng] {
        let (c, _) = p.alike(
            "nix-store",
            &["--realise", &top, "--option", "substituters", url, "--option", "trusted-public-keys", &pk],
        );
        assert!(c.status.success(), "{url}: {}", String::from_utf8_lossy(&c.stderr));
        p.same_metadata(&[&top]);
        for side in [Side::Cairn, Side::Nix] {
            let info = p.ok(side, "nix", &["path-info", "--json", &top]);
            assert!(info.contains("\"over-ssh-key:"), "the signature came along: {info}");
        }
        forget();
    }
    // cairn's own verb reaches it the same way.
    let trusted = format!("{ng}&trusted=1");
    let out = p.cairn.run(&["substitute", "--from", &trusted, &top], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(valid(Side::Cairn, &top) && valid(Side::Cairn, &dep));
    p.ok(Side::Cairn, "nix-store", &["--delete", &top, &dep]);
    // A store whose file no longer matches what it says of the path: both refuse the NAR,
    // nothing is registered, and cairnd goes on serving.
    let file = src.join(top.trim_start_matches('/'));
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&file, b"not what was built\n").unwrap();
    for url in [&ssh, &ng] {
        let trusted = format!("{url}&trusted=1");
        let (c, n) = p.alike("nix-store", &["--realise", &top, "--option", "substituters", &trusted]);
        assert!(!c.status.success() && !n.status.success(), "{url}");
        let said = String::from_utf8_lossy(&c.stderr);
        let shown = url.split('?').next().unwrap();
        assert!(said.contains(&format!("{shown}: NAR hash mismatch for '{top}'")), "{url}: {said}");
        assert!(!valid(Side::Cairn, &top), "{url}: the altered path is not registered");
    }
    assert!(valid(Side::Cairn, &dep), "the path that matched was taken");
    p.ok(Side::Cairn, "nix-store", &["--verify", "--check-contents"]);
}

/// A dry run plans to build a derivation that does not allow substitutes (`allowSubstitutes =
/// false`) although a cache has its output, as nix-daemon's `queryMissing` does.
#[test]
fn a_dry_run_builds_what_does_not_allow_substitutes_as_nix_daemon_plans() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let (sk, pk) = p.key("nosub-key");
    let src = p.work.path().join("nosub-src");
    let local = format!("local?root={}", src.display());
    let cache = format!("file://{}", p.work.path().join("nosub-cache").display());
    let f = p.write(
        "nosub.nix",
        br#"derivation { name = "nosub"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo nosub > $out" ]; allowSubstitutes = false; }"#,
    );
    let out = p.local_build(&local, &f);
    p.local(&["nix", "store", "sign", "--store", &local, "--key-file", sk.to_str().unwrap(), &out]);
    p.local(&["nix", "copy", "--from", &local, "--to", &cache, &out]);
    let opts = ["--option", "substituters", &cache, "--option", "trusted-public-keys", &pk];
    let args: Vec<&str> = ["--no-out-link", "--dry-run", f.as_str()].into_iter().chain(opts).collect();
    let (c, n) = p.alike("nix-build", &args);
    both_say(&c, &n, &["this derivation will be built:", "-nosub.drv"]);
    for (side, o) in [("cairnd", &c), ("nix-daemon", &n)] {
        let said = String::from_utf8_lossy(&o.stderr);
        assert!(!said.contains("will be fetched"), "{side}: {said}");
    }
}

/// A client asking for a derivation another client is building waits for it, told so in
/// nix-daemon's words, and gets the same output without a second build.
#[test]
fn a_build_another_client_is_running_is_waited_for_as_with_nix_daemon() {
    if !peers() {
        return;
    }
    let p = Pair::start();
    let f = p.write(
        "shared-build.nix",
        br#"derivation { name = "shared-build"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "sleep 3; echo once > $out" ]; }"#,
    );
    let drv = p.same("nix-instantiate", &[&f]).trim().to_owned();
    let out = p.same("nix-store", &["-q", "--outputs", &drv]).trim().to_owned();
    for side in [Side::Cairn, Side::Nix] {
        // A post-build hook runs after the one build, not for the client that waited.
        let record = p.work.path().join(format!("waited-hook-{side:?}"));
        let hook = p.work.path().join(format!("waited-hook-{side:?}.sh"));
        cairn_tests::write_exec(&hook, format!("#!/bin/sh\necho \"$DRV_PATH\" >> {}\n", record.display()).as_bytes());
        let hooked = ["-r", &drv, "--option", "post-build-hook", hook.to_str().unwrap()];
        let first = p
            .cmd(side, "nix-store")
            .args(hooked)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1000));
        let second = p.run(side, "nix-store", &hooked);
        let first = first.wait_with_output().unwrap();
        assert!(
            first.status.success() && second.status.success(),
            "{side:?}: {}",
            String::from_utf8_lossy(&second.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&second.stdout).trim(), out);
        let said = String::from_utf8_lossy(&second.stderr);
        // (nix-daemon names the path as its file is, under its private root.)
        let name = &out[out.rfind('/').unwrap()..];
        assert!(said.contains("waiting for lock on '") && said.contains(&format!("{name}'...")), "{side:?}: {said}");
        assert!(!said.contains("building '"), "{side:?}: built once, by the first: {said}");
        assert_eq!(std::fs::read_to_string(&record).unwrap(), format!("{drv}\n"), "{side:?}: the hook ran once");
    }
}
