//! A newcomer's first hour (issue 24): the daemon seen and steered (`daemon status`,
//! `show-config`, `stop`, `restart`, `version` that starts nothing, a warning when the running
//! daemon's settings are not the ones a command would start it with), config errors and other
//! errors on one line with each cause once, hints where the fix is known, and the small things
//! (plurals, JSON names, graph directions, the names pulls give). Each message is checked as the
//! exact line a user reads.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output};

use cairn_tests::{bin_dir, line, output_with_stdin, TestStore};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

use cairn_tests::json;

/// `cairn` aimed at `st`'s daemon but with another config file (and allowed to start a daemon
/// unless `no_auto_start`).
fn cairn_with_config(st: &TestStore, config: &Path, no_auto_start: bool) -> Command {
    let mut c = Command::new(bin_dir().join("cairn"));
    c.arg("--root").arg(st.root.path()).args(["--store-dir", &st.store_dir]).arg("--socket").arg(&st.socket);
    c.arg("--config").arg(config);
    if no_auto_start {
        c.arg("--no-auto-start");
    }
    c
}

/// Stops, when dropped, a daemon the harness did not start (one `daemon restart` started).
struct StopOnDrop(Option<u32>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[test]
fn daemon_status_show_config_warning_restart_stop_and_version() {
    let st = TestStore::builder().config("max-jobs = 3\n").start();
    let config = st.config.display().to_string();
    let socket = st.socket.display().to_string();

    // Status names this daemon.
    let status = st.ok(&["daemon", "status"]);
    let want_lines = [
        format!("pid:      {}", st.pid()),
        format!("version:  cairnd {} (API 1)", env!("CARGO_PKG_VERSION")),
        format!("socket:   {socket}"),
        "store:    /store".to_owned(),
        format!("root:     {}", st.root.path().display()),
        format!("config:   '{config}'"),
    ];
    let got: Vec<&str> = status.lines().collect();
    assert_eq!(got[..6], want_lines.iter().map(String::as_str).collect::<Vec<_>>()[..], "{status}");
    assert!(got[6].starts_with("uptime:   ") && got[6].ends_with('s'), "{status}");
    assert_eq!(got[7], "settings: as this command would start it");
    assert!(got[8].starts_with("memory:   page cache ") && got[8].contains(" of 64 MiB, graph of "), "{status}");
    let s = json(&st.ok(&["daemon", "status", "--json"]));
    assert_eq!(s["memory"]["pageCacheLimit"], 64 << 20);
    assert_eq!(s["pid"], st.pid());
    assert_eq!(s["configFile"], config.as_str());
    assert_eq!(s["socket"], socket.as_str());
    assert_eq!(s["settingsMatch"], true);
    assert_eq!(s["settingsFingerprint"].as_str().unwrap().len(), 16);

    // Its effective settings, as a config file would give them.
    let shown = st.ok(&["daemon", "show-config"]);
    assert_eq!(
        shown.lines().next().unwrap(),
        format!("# effective settings of cairnd (pid {}, config '{config}')", st.pid())
    );
    assert!(shown.lines().any(|l| l == "max-jobs = 3"), "{shown}");
    assert!(shown.lines().any(|l| l == format!("socket = \"{socket}\"")), "{shown}");
    assert!(!shown.contains("auto-start-daemon"), "a client setting is not the daemon's: {shown}");
    let c = json(&st.ok(&["daemon", "show-config", "--json"]));
    assert_eq!((c["max-jobs"].as_u64(), c["store-dir"].as_str()), (Some(3), Some("/store")));

    // A command whose config differs says so, in one line, naming the keys that differ.
    let other = st.root.path().join("other.toml");
    std::fs::write(&other, "max-jobs = 3\nsubstituters = [\"file:///nowhere\"]\n").unwrap();
    let out = cairn_with_config(&st, &other, true).args(["gc", "--print-roots"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "cairn: warning: the running cairnd (pid {}, config '{config}') differs from this command's settings \
             (config '{}') in substituters; `cairn daemon restart` applies them\n",
            st.pid(),
            other.display()
        )
    );
    // … and one whose config is the daemon's says nothing.
    let same = st.run(&["gc", "--print-roots"], b"");
    assert_eq!(stderr(&same), "");
    let out = cairn_with_config(&st, &other, true).args(["daemon", "status"]).output().unwrap();
    assert!(stdout(&out)
        .lines()
        .any(|l| l.starts_with("settings: the running cairnd") && l.contains("in substituters;")));

    // Restart applies the other config: a new daemon, the old one gone.
    let old = st.pid();
    let out = cairn_with_config(&st, &other, true).args(["daemon", "restart"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let restarted =
        json(&stdout(&cairn_with_config(&st, &other, true).args(["daemon", "status", "--json"]).output().unwrap()));
    let new = restarted["pid"].as_u64().unwrap() as u32;
    let _guard = StopOnDrop(Some(new));
    assert_ne!(new, old);
    let msg = stderr(&out);
    assert!(
        msg.starts_with(&format!(
            "restarted cairnd (pid {old} stopped; pid {new} on '{socket}', config '{}', log in ",
            other.display()
        )),
        "{msg}"
    );
    assert_eq!(restarted["configFile"], other.display().to_string());
    assert_eq!(restarted["settingsMatch"], true);
    let c = json(&stdout(
        &cairn_with_config(&st, &other, true).args(["daemon", "show-config", "--json"]).output().unwrap(),
    ));
    assert_eq!(c["substituters"], serde_json::json!(["file:///nowhere"]));
    // The first config's commands are now the ones warned.
    let warned = st.run(&["gc", "--print-roots"], b"");
    assert!(stderr(&warned)
        .starts_with(&format!("cairn: warning: the running cairnd (pid {new}, config '{}')", other.display())));

    // Stop waits until the daemon is gone.
    let out = st.run(&["daemon", "stop"], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), format!("stopped cairnd (pid {new}) on '{socket}'\n"));
    assert!(!st.socket.exists(), "the socket is gone when stop returns");
    assert!(!Path::new(&format!("/proc/{new}")).exists() || proc_state(new) == Some('Z'), "the daemon exited");
    assert_eq!(st.fail(&["daemon", "status"], b""), format!("cairn: no cairnd is listening on '{socket}'\n"));
    assert_eq!(st.fail(&["daemon", "stop"], b""), format!("cairn: no cairnd is listening on '{socket}'\n"));

    // `version` starts no daemon (even where auto-start is allowed).
    let out = cairn_with_config(&st, &st.config, false).arg("version").output().unwrap();
    if st.socket.exists() {
        // Leave no daemon behind when this fails.
        st.run(&["daemon", "stop"], b"");
        panic!("version started a daemon: {}", stderr(&out));
    }
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("cairn {}\ncairnd: not running on '{socket}'\n", env!("CARGO_PKG_VERSION")));
    assert_eq!(stderr(&out), "");
    assert!(!st.socket.exists(), "version started a daemon");
    let v = json(&stdout(&cairn_with_config(&st, &st.config, false).args(["version", "--json"]).output().unwrap()));
    assert_eq!(v["daemon"], serde_json::Value::Null);
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

#[test]
fn daemon_help_does_not_offer_no_auto_start_and_globals_have_their_heading() {
    let help = |args: &[&str]| {
        let out = Command::new(bin_dir().join("cairn")).args(args).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let daemon = help(&["daemon", "--help"]);
    assert!(!daemon.contains("--no-auto-start"), "{daemon}");
    for verb in ["status", "show-config", "stop", "restart"] {
        assert!(daemon.lines().any(|l| l.trim_start().starts_with(verb)), "{verb} in {daemon}");
    }
    let add = help(&["add", "--help"]);
    let (own, global) = add.split_once("Global options:").expect("a heading for the global options");
    assert!(!own.contains("--root") && global.contains("--root <DIR>") && global.contains("--no-auto-start"), "{add}");
    assert!(own.contains("<PATHS>...  Files or directories to add"), "{add}");
    let build = help(&["image", "build", "--help"]);
    assert!(build.starts_with("Build an image from store closures"), "{build}");
    let unpack = help(&["image", "unpack", "--help"]);
    assert!(unpack.starts_with("Make an image's root filesystem"), "{unpack}");
    let gc = help(&["gc", "--help"]);
    assert!(
        gc.contains("--json") && gc.lines().any(|l| l.contains("--json") && l.contains("Print the result as JSON")),
        "{gc}"
    );
    // A value from the environment is not shown as a typed flag in usage lines.
    let out = Command::new(bin_dir().join("cairn")).arg("add").env("CAIRN_ROOT", "/nowhere").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("Usage: cairn add <PATHS>...\n"), "{}", stderr(&out));
}

#[test]
fn config_errors_are_one_line_with_the_closest_key() {
    let dir = tempfile::tempdir().unwrap();
    let run = |file: &Path| {
        let out = Command::new(bin_dir().join("cairn"))
            .arg("--root")
            .arg(dir.path())
            .arg("--config")
            .arg(file)
            .args(["--no-auto-start", "gc"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        stderr(&out)
    };
    let typo = dir.path().join("sub.toml");
    std::fs::write(&typo, "# caches\nsubstituter = [\"file:///c\"]\n").unwrap();
    assert_eq!(
        run(&typo),
        format!(
            "cairn: config file '{}', line 2: unknown key `substituter`; did you mean `substituters`?\n",
            typo.display()
        )
    );
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(&wrong, "require-sigs = \"yes\"\n").unwrap();
    assert_eq!(
        run(&wrong),
        format!(
            "cairn: config file '{}', line 1: `require-sigs`: invalid type: string \"yes\", expected a boolean\n",
            wrong.display()
        )
    );
    let missing = dir.path().join("missing.toml");
    assert_eq!(run(&missing), format!("cairn: config file '{}' does not exist\n", missing.display()));
    // cairnd says the same.
    let out = Command::new(bin_dir().join("cairnd"))
        .arg("--root")
        .arg(dir.path())
        .arg("--config")
        .arg(&typo)
        .output()
        .unwrap();
    assert_eq!(
        stderr(&out),
        format!(
            "cairnd: config file '{}', line 2: unknown key `substituter`; did you mean `substituters`?\n",
            typo.display()
        )
    );
}

#[test]
fn errors_say_each_cause_once_and_hints_say_what_to_do() {
    let st = TestStore::start();
    let dir = tempfile::tempdir().unwrap();

    // An OS error once, not twice.
    let f = dir.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    let nar = st.ok_bytes(&["nar", "dump", f.to_str().unwrap()], b"");
    let out = output_with_stdin(Command::new(bin_dir().join("cairn")).arg("nar").arg("restore").arg(dir.path()), &nar);
    assert_eq!(stderr(&out), format!("cairn: cannot create '{}': File exists (os error 17)\n", dir.path().display()));

    // A size that is not one is named.
    let out = st.run(&["gc", "--max-freed", "banana"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out).lines().next().unwrap(),
        "error: invalid value 'banana' for '--max-freed <SIZE>': invalid size 'banana' (use bytes or K/M/G/T)"
    );

    // TLS to a plain-HTTP registry: what to do, not rustls's complaint.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = plain.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in plain.incoming().flatten() {
            let mut buf = [0u8; 512];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    assert_eq!(
        st.fail(&["image", "pull", &format!("docker://127.0.0.1:{port}/team/app:v1")], b""),
        format!("cairn: 127.0.0.1:{port}: the registry answered plain HTTP; use --tls-verify=false\n")
    );
}

#[test]
fn images_are_named_from_their_archives_and_rm_removes_tags() {
    let st = TestStore::start();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("hello.txt");
    std::fs::write(&f, b"hello\n").unwrap();
    let p = line(&st.ok(&["add", f.to_str().unwrap()]));
    st.ok(&["image", "build", "--closure", &p, "--tag", "localhost/made:v1"]);

    // docker-archive: named from its RepoTags.
    let docker = dir.path().join("saved.tar");
    st.ok(&["image", "push", "localhost/made:v1", &format!("docker-archive:{}:localhost/named:v2", docker.display())]);
    // An existing archive is not replaced (skopeo refuses to modify one too).
    let saved = std::fs::read(&docker).unwrap();
    let again = st
        .run(&["image", "push", "localhost/made:v1", &format!("docker-archive:{}:other/x:v1", docker.display())], b"");
    assert!(!again.status.success() && stderr(&again).contains("exists"), "{}", stderr(&again));
    assert_eq!(std::fs::read(&docker).unwrap(), saved);
    let out = st.run(&["image", "pull", &format!("docker-archive:{}", docker.display())], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "imported as localhost/named:v2 (named from the archive's RepoTags; --tag NAME:TAG names it otherwise)\n"
    );
    // oci-archive: a ref.name that is only a tag gets the file's name.
    let oci = dir.path().join("My Image.tar");
    st.ok(&["image", "push", "localhost/made:v1", &format!("oci-archive:{}:v3", oci.display())]);
    let out = st.run(&["image", "pull", &format!("oci-archive:{}", oci.display())], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "imported as localhost/my-image:v3 (named from the archive's file name; --tag NAME:TAG names it otherwise)\n"
    );
    // oci: says the name it made.
    let layout = dir.path().join("dir");
    st.ok(&["image", "push", "localhost/made:v1", &format!("oci:{}:v1", layout.display())]);
    let out = st.run(&["image", "pull", &format!("oci:{}:v1", layout.display())], b"");
    assert_eq!(
        stderr(&out),
        "imported as localhost/dir:v1 (named from the directory's name; --tag NAME:TAG names it otherwise)\n"
    );
    let out = st.run(&["image", "pull", "--tag", "localhost/chosen:v9", &format!("oci:{}:v1", layout.display())], b"");
    assert_eq!(stderr(&out), "imported localhost/chosen:v9\n");

    // rm is untag.
    st.ok(&["image", "rm", "localhost/named:v2", "localhost/chosen:v9"]);
    let listed = st.ok(&["image", "ls"]);
    assert!(!listed.contains("localhost/named:v2") && !listed.contains("localhost/chosen:v9"), "{listed}");
    assert!(listed.contains("localhost/dir:v1"), "{listed}");
}

#[test]
fn counts_json_names_and_graph_directions() {
    let st = TestStore::start();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, b"content\n").unwrap();
    let fp = line(&st.ok(&["add", f.to_str().unwrap()]));
    let text = dir.path().join("t");
    std::fs::write(&text, fp.as_bytes()).unwrap();
    let tp = line(&st.ok(&["add-text", "t", text.to_str().unwrap(), "--ref", &fp]));

    // graph: --json edges run as --dot draws them, reference → referrer.
    let dot = st.ok(&["graph", &tp]);
    assert!(dot.contains(&format!("\"{fp}\" -> \"{tp}\"")), "{dot}");
    let g = json(&st.ok(&["graph", "--json", &tp]));
    assert_eq!(g["edges"], serde_json::json!([[fp, tp]]));

    // verify: one path, one path checked.
    let out = st.run(&["verify"], b"");
    assert_eq!(stderr(&out), "2 paths checked, no problems\n");

    // gc --dry-run --json names what it would do.
    let dry = json(&st.ok(&["gc", "--dry-run", "--json"]));
    assert!(dry.get("deleted").is_none(), "{dry}");
    assert_eq!(dry["wouldDelete"], serde_json::json!([tp, fp]));
    assert!(dry["wouldFree"].as_u64().unwrap() > 0);
    let out = st.run(&["gc", "--dry-run"], b"");
    assert!(stderr(&out).starts_with("would delete 2 store paths, freeing "), "{}", stderr(&out));

    // One path deleted is one store path.
    assert_eq!(st.ok(&["delete", &tp]), format!("1 store path deleted, {:.2} MiB freed\n", 0.0));
    let out = st.run(&["verify"], b"");
    assert_eq!(stderr(&out), "1 path checked, no problems\n");

    // One file hard-linked is one file.
    for d in ["a", "b"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
        std::fs::write(dir.path().join(d).join("same"), vec![7u8; 8192]).unwrap();
        st.ok(&["add", dir.path().join(d).to_str().unwrap()]);
    }
    let optimised = st.ok(&["optimise"]);
    assert!(optimised.ends_with(" freed by hard-linking 1 file\n"), "{optimised}");
}
