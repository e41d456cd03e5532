//! Automata under the real runc: the program inside reads its closure from read-only bind
//! mounts, cannot write to them, sees no other store path, and uses an image's root filesystem
//! in place; a collection while it runs deletes none of its closure, and removing the automaton
//! makes the closure collectable.

use std::path::Path;
use std::process::{Command, Stdio};

use cairn_tests::{require_peer, TestStore};

use cairn_tests::json;

/// Whether runc can run here (it needs root on these machines).
fn runc_ready() -> bool {
    if !require_peer("runc") || !require_peer("/bin/busybox") {
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        if std::env::var("CAIRN_REQUIRE_PEERS").as_deref() == Ok("1") {
            panic!("the automaton tests run runc, which needs root here");
        }
        eprintln!("skipping: runc needs root");
        return false;
    }
    true
}

/// A busybox tree (`bin/sh` is busybox under the name of its applet) and a script using it.
fn closure(store: &TestStore, tmp: &Path, name: &str, script: &str) -> (String, String) {
    let tree = tmp.join("tools");
    if !tree.exists() {
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).unwrap();
        std::fs::write(tree.join("data.txt"), "data from the closure\n").unwrap();
    }
    let tools = store.ok(&["add", tree.to_str().unwrap()]).trim().to_owned();
    let f = tmp.join(name);
    std::fs::write(&f, script.replace("TOOLS", &tools)).unwrap();
    let s = store.ok(&["add-text", name, f.to_str().unwrap(), "--ref", &tools]).trim().to_owned();
    (tools, s)
}

fn run(store: &TestStore, name: &str) -> (bool, String, String) {
    let out = store.cairn().args(["automaton", "run", name]).stdin(Stdio::null()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_closure_is_mounted_read_only_and_alone() {
    if !runc_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = TestStore::start();
    let other = store.ok(&["add", "/etc/hostname"]).trim().to_owned();
    let script = "cat TOOLS/data.txt\nls /store\n\
                  if echo x > TOOLS/new 2>/dev/null; then echo WROTE; else echo read-only; fi\n\
                  echo scratch > /tmp/t && cat /tmp/t\nhostname\n";
    let (tools, s) = closure(&store, tmp.path(), "check.sh", script);
    let a = json(&store.ok(&[
        "automaton",
        "create",
        "--json",
        "checker",
        "--closure",
        &s,
        "--",
        &format!("{tools}/bin/sh"),
        &s,
    ]));
    assert_eq!(a["mounted"], 2);
    let (ok, out, err) = run(&store, "checker");
    assert!(ok, "{err}");
    let base = |p: &str| Path::new(p).file_name().unwrap().to_string_lossy().into_owned();
    let mut listed = [base(&s), base(&tools)];
    listed.sort();
    assert_eq!(
        out,
        format!("data from the closure\n{}\nread-only\nscratch\nchecker\n", listed.join("\n")),
        "the closure is readable, read-only, and the only thing in the store ({other} is not there)"
    );
    assert!(!out.contains(&base(&other)));
    // The same bundle under crun: the same view.
    if require_peer("crun") {
        let c = store
            .cairn()
            .args(["automaton", "run", "--runtime", "crun", "checker"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(c.status.success(), "crun: {}", String::from_utf8_lossy(&c.stderr));
        assert_eq!(String::from_utf8_lossy(&c.stdout), out, "crun runs the bundle as runc does");
    }

    // With an image: its root filesystem is used in place (its /etc/passwd is there).
    store.ok(&["image", "build", "--closure", &tools, "--tag", "base/etc:1"]);
    let (_, s2) = closure(&store, tmp.path(), "image.sh", "TOOLS/bin/sh -c 'head -1 /etc/passwd'\n");
    store.ok(&[
        "automaton",
        "create",
        "with-image",
        "--image",
        "base/etc:1",
        "--closure",
        &s2,
        "--",
        &format!("{tools}/bin/sh"),
        &s2,
    ]);
    let (ok, out, err) = run(&store, "with-image");
    assert!(ok, "{err}");
    assert_eq!(out, "root:x:0:0:root:/root:/bin/sh\n");
    let ls = json(&store.ok(&["automaton", "ls", "--json"]));
    assert_eq!(ls.as_array().unwrap().len(), 2);
    assert!(ls[1]["image"].as_str().unwrap().ends_with("-oci-image"), "a built image: {ls}");

    // Refusals, each one line.
    let e = store.fail(&["automaton", "create", "checker", "--closure", &s, "--", "x"], b"");
    assert!(e.contains("an automaton named 'checker' exists"), "{e}");
    let e = store.fail(&["automaton", "create", "Bad/Name", "--closure", &s, "--", "x"], b"");
    assert!(e.contains("invalid name 'Bad/Name'"), "{e}");
    let e = store.fail(&["automaton", "rm", "nobody"], b"");
    assert!(e.contains("no automaton is named 'nobody'"), "{e}");
    // Writable with an image: an overlay over the image's directories. What the program writes
    // stays for its next run, never reaches the rootfs store path, and the closure stays
    // read-only.
    let script = "cat /etc/note 2>/dev/null || echo none\necho kept >> /etc/note\n\
                  if echo x > TOOLS/new 2>/dev/null; then echo WROTE; else echo read-only; fi\n";
    let (_, s4) = closure(&store, tmp.path(), "overlay.sh", script);
    let w = json(&store.ok(&[
        "automaton",
        "create",
        "--json",
        "overlaid",
        "--writable",
        "--image",
        "base/etc:1",
        "--closure",
        &s4,
        "--",
        &format!("{tools}/bin/sh"),
        &s4,
    ]));
    let (ok, out, err) = run(&store, "overlaid");
    assert!(ok, "{err}");
    assert_eq!(out, "none\nread-only\n");
    let (ok, out, err) = run(&store, "overlaid");
    assert!(ok, "{err}");
    assert_eq!(out, "kept\nread-only\n", "the overlay's upper directory survives between runs");
    let rootfs = store.real_store_dir().join(w["rootfs"].as_str().unwrap().rsplit('/').next().unwrap());
    assert!(rootfs.join("etc/passwd").exists() && !rootfs.join("etc/note").exists(), "the rootfs path is untouched");
    let bundle = Path::new(w["bundle"].as_str().unwrap()).to_owned();
    assert_eq!(std::fs::read_to_string(bundle.join("upper/etc/note")).unwrap(), "kept\nkept\n");
    store.ok(&["verify", "--check-contents"]);
    store.ok(&["automaton", "rm", "overlaid"]);
    assert!(!bundle.exists(), "rm takes the overlay with the bundle");

    // The program's failure is its exit status.
    let (_, s3) = closure(&store, tmp.path(), "fail.sh", "exit 3\n");
    store.ok(&["automaton", "create", "failing", "--closure", &s3, "--", &format!("{tools}/bin/sh"), &s3]);
    let st = store.cairn().args(["automaton", "run", "failing"]).stdin(Stdio::null()).status().unwrap();
    assert_eq!(st.code(), Some(3));
}

#[test]
fn a_running_automaton_keeps_its_closure_until_it_is_removed() {
    if !runc_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = TestStore::start();
    let flag = tmp.path().join("started");
    let script = "echo started > /flag/started\nsleep 2\ncat TOOLS/data.txt\n";
    let (tools, s) = closure(&store, tmp.path(), "slow.sh", script);
    // The script signals through a host directory bound in by hand (the bundle is ours to edit).
    store.ok(&["automaton", "create", "slow", "--writable", "--closure", &s, "--", &format!("{tools}/bin/sh"), &s]);
    let show = json(&store.ok(&["automaton", "show", "--json", "slow"]));
    let config_path = Path::new(show["bundle"].as_str().unwrap()).join("config.json");
    let mut config = json(&std::fs::read_to_string(&config_path).unwrap());
    config["mounts"].as_array_mut().unwrap().push(serde_json::json!({
        "destination": "/flag", "type": "bind", "source": tmp.path(), "options": ["rbind", "rw"],
    }));
    std::fs::write(&config_path, config.to_string()).unwrap();

    let child =
        store.cairn().args(["automaton", "run", "slow"]).stdin(Stdio::null()).stdout(Stdio::piped()).spawn().unwrap();
    let t = std::time::Instant::now();
    while !flag.exists() {
        assert!(t.elapsed() < std::time::Duration::from_secs(20), "the automaton did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    store.ok(&["gc"]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "data from the closure\n", "the closure survived the collection");
    for p in [&tools, &s] {
        assert!(store.run(&["path-info", p], b"").status.success(), "{p} kept while the automaton exists");
    }
    store.ok(&["automaton", "rm", "slow"]);
    store.ok(&["gc"]);
    for p in [&tools, &s] {
        assert!(!store.run(&["path-info", p], b"").status.success(), "{p} collectable once the automaton is gone");
    }
    assert!(!Path::new(show["bundle"].as_str().unwrap()).exists());
    let _ = Command::new("runc").args(["delete", "--force", "cairn-slow"]).output();
}

#[test]
fn an_automaton_moves_to_another_daemon_as_closure_and_description() {
    if !runc_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let a = TestStore::start();
    let b = TestStore::start();
    let (tools, s) = closure(&a, tmp.path(), "moved.sh", "cat TOOLS/data.txt\n");
    a.ok(&["image", "build", "--closure", &tools, "--tag", "base/etc:1"]);
    a.ok(&[
        "automaton",
        "create",
        "mover",
        "--image",
        "base/etc:1",
        "--env",
        "X=1",
        "--closure",
        &s,
        "--",
        &format!("{tools}/bin/sh"),
        &s,
    ]);
    let to = format!("unix://{}", b.socket.display());
    let out = a.cairn().args(["automaton", "export", "mover", "--to", &to]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("copied"), "{}", String::from_utf8_lossy(&out.stderr));
    let description = tmp.path().join("mover.json");
    std::fs::write(&description, &out.stdout).unwrap();
    let d = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(d["env"], serde_json::json!(["X=1"]));
    b.ok(&["automaton", "import", description.to_str().unwrap()]);
    let (ok, stdout, err) = run(&b, "mover");
    assert!(ok, "{err}");
    assert_eq!(stdout, "data from the closure\n");
    // A second export sends nothing: the other daemon has every path.
    let again = a.cairn().args(["automaton", "export", "mover", "--to", &to]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("copied 0 paths"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let _ = Command::new("runc").args(["delete", "--force", "cairn-mover"]).output();
}

/// With `--image` and no command, the image's Entrypoint and Cmd run; a command that is not in
/// what the automaton mounts is refused at `create` with one line naming it.
#[test]
fn the_image_s_command_is_the_default_and_commands_must_exist() {
    if !require_peer("/bin/busybox") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = TestStore::start();
    let (tools, s) = closure(&store, tmp.path(), "hello.sh", "echo hello from TOOLS\n");
    let sh = format!("{tools}/bin/sh");
    store.ok(&["image", "build", "--closure", &s, "--entrypoint", &sh, "--cmd", &s, "--tag", "entry/point:1"]);
    // The image's store paths are not mounted (the closure's take their place): the command's
    // store path must be given with --closure.
    let e = store.fail(&["automaton", "create", "defaulted", "--image", "entry/point:1"], b"");
    assert!(
        e.contains(&format!("command '{sh}' is not in what")) && e.contains("; mount its store path with --closure"),
        "{e}"
    );
    let a =
        json(&store.ok(&["automaton", "create", "--json", "defaulted", "--image", "entry/point:1", "--closure", &s]));
    assert_eq!(a["args"], serde_json::json!([sh, s]), "Entrypoint then Cmd");
    if runc_ready() {
        let (ok, out, err) = run(&store, "defaulted");
        assert!(ok, "{err}");
        assert_eq!(out, format!("hello from {tools}\n"));
    }

    // Refusals, each one line naming the command and what is mounted.
    let other = store.ok(&["add", "/bin/busybox"]).trim().to_owned();
    let e = store.fail(&["automaton", "create", "missing", "--closure", &s, "--", "/bin/sh", "-c", "true"], b"");
    assert_eq!(
        e.trim_end(),
        format!("cairn: command '/bin/sh' is not in what the automaton mounts (the closure of {s})")
    );
    let e = store.fail(&["automaton", "create", "missing", "--closure", &s, "--", &other], b"");
    assert!(e.contains(&format!("command '{other}' is not in what the automaton mounts")), "outside the closure: {e}");
    assert!(e.trim_end().ends_with("; mount its store path with --closure"), "{e}");
    let e = store.fail(&["automaton", "create", "missing", "--closure", &s, "--", &format!("{tools}/bin/nope")], b"");
    assert!(e.contains("bin/nope' is not in what") && !e.contains("--closure"), "{e}");
    let e = store.fail(&["automaton", "create", "missing", "--closure", &s, "--", "sh"], b"");
    assert!(e.contains("command 'sh' is not in what the automaton mounts"), "not on the default PATH: {e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    // Found: on the PATH given (through the relative symlink bin/sh -> busybox), in the whole
    // store, and in the image's root (its /etc/passwd, not a program, but a file).
    let path = format!("PATH={tools}/bin");
    store.ok(&["automaton", "create", "on-path", "--env", &path, "--closure", &s, "--", "sh", &s]);
    store.ok(&["automaton", "create", "whole", "--whole-store", "--", &other]);
    store.ok(&["automaton", "create", "in-image", "--image", "entry/point:1", "--closure", &s, "--", &sh]);
    let e = store.fail(&["automaton", "create", "no-dir", "--image", "entry/point:1", "--", "/etc"], b"");
    assert_eq!(e.trim_end(), "cairn: command '/etc' is a directory");
    let e = store.fail(&["automaton", "create", "no-exec", "--image", "entry/point:1", "--", "/etc/passwd"], b"");
    assert_eq!(e.trim_end(), "cairn: command '/etc/passwd' is not executable (mode 444)");
    // A script whose interpreter is not mounted cannot run.
    let e = store.fail(&["automaton", "create", "no-interp", "--closure", &s, "--whole-store", "--", &s], b"");
    assert!(e.contains(&format!("command '{s}' is not executable")), "{e}");
    let script = tmp.path().join("script");
    std::fs::write(&script, "#!/no/such/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let exe = store.ok(&["add", script.to_str().unwrap()]).trim().to_owned();
    let e = store.fail(&["automaton", "create", "no-interp", "--closure", &exe, "--", &exe], b"");
    assert!(e.contains(&format!("command '{exe}' is a script for '/no/such/sh', which is not in")), "{e}");
    // An image without a command, and none given.
    store.ok(&["image", "build", "--closure", &s, "--tag", "no/cmd:1"]);
    let e = store.fail(&["automaton", "create", "nothing", "--image", "no/cmd:1"], b"");
    assert!(e.contains("no command to run: the image sets neither Entrypoint nor Cmd"), "{e}");
    // Without an image a command is still needed (a usage error).
    let out = store.cairn().args(["automaton", "create", "bare", "--closure", &s]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// An image that says which user, directory and environment its program runs with: the
/// automaton runs it so, as umoci's bundle of the same image runs under runc — in particular,
/// not as root when the image names another user.
#[test]
fn an_image_s_user_working_directory_and_environment_apply_as_under_umoci_and_runc() {
    if !runc_ready() || !require_peer("umoci") {
        return;
    }
    use cairn_tests::oci::{run_tool, runc_run};
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let image = format!("{}:v1", layout.display());
    run_tool(Command::new("umoci").args(["init", "--layout"]).arg(&layout));
    run_tool(Command::new("umoci").args(["new", "--image", &image]));
    let b = tmp.path().join("b");
    run_tool(Command::new("umoci").args(["unpack", "--image", &image]).arg(&b));
    let root = b.join("rootfs");
    for d in ["bin", "etc", "home/u"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::fs::set_permissions(root.join("bin/busybox"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000:u:/home/u:/bin/sh\n")
        .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nu:x:1000:\nextra:x:2000:u\n").unwrap();
    std::fs::write(root.join("home/u/f"), "mine\n").unwrap();
    std::os::unix::fs::chown(root.join("home/u"), Some(1000), Some(1000)).unwrap();
    std::os::unix::fs::chown(root.join("home/u/f"), Some(1000), Some(1000)).unwrap();
    run_tool(Command::new("umoci").args(["repack", "--image", &image]).arg(&b));
    run_tool(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.user",
        "u",
        "--config.workingdir",
        "/home/u",
        "--config.env",
        "B=2",
        "--config.env",
        "PATH=/bin",
    ]));
    let script = "id -u; id -g; id -G; pwd; echo B=$B PATH=$PATH; cat f";

    // The reference: umoci's bundle of the image under runc, running the same command.
    let reference = tmp.path().join("reference");
    run_tool(Command::new("umoci").args(["unpack", "--image", &image]).arg(&reference));
    let config_path = reference.join("config.json");
    let mut config = json(&std::fs::read_to_string(&config_path).unwrap());
    config["process"]["args"] = serde_json::json!(["sh", "-c", script]);
    config["process"]["terminal"] = serde_json::json!(false);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let expected = runc_run(&reference);
    assert!(expected.starts_with("1000\n1000\n"), "the reference runs as the image's user: {expected}");

    let store = TestStore::start();
    store.ok(&["image", "pull", "--tag", "users/u:1", &format!("oci:{image}")]);
    // A bare name is found on the image's PATH.
    store.ok(&["automaton", "create", "as-user", "--image", "users/u:1", "--", "sh", "-c", script]);
    let (ok, out, err) = run(&store, "as-user");
    assert!(ok, "{err}");
    assert_eq!(out, expected);
    // The caller's environment comes after the image's: its value of a name wins.
    store.ok(&["automaton", "create", "env", "--image", "users/u:1", "--env", "B=3", "--", "sh", "-c", "echo $B"]);
    assert_eq!(run(&store, "env").1, "3\n");
    let a = json(&store.ok(&["automaton", "show", "--json", "env"]));
    let config = json(&std::fs::read_to_string(Path::new(a["bundle"].as_str().unwrap()).join("config.json")).unwrap());
    let env: Vec<&str> = config["process"]["env"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    assert_eq!(env.iter().filter(|e| e.starts_with("B=")).count(), 1, "{env:?}");
    for name in ["as-user", "env"] {
        let _ = Command::new("runc").args(["delete", "--force", &format!("cairn-{name}")]).output();
    }
}

/// `cairn automaton run` is the runtime for the program's lifetime: a SIGTERM sent to it reaches
/// the program (which may handle it), and nothing runs on once it has ended.
#[test]
fn a_signal_to_automaton_run_reaches_the_program_and_nothing_is_left_running() {
    if !runc_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = TestStore::start();
    let script =
        "trap 'echo got-term; exit 42' TERM\necho > /flag/started\nwhile true; do TOOLS/bin/busybox sleep 0.1; done\n";
    let (tools, s) = closure(&store, tmp.path(), "trap.sh", script);
    store.ok(&["automaton", "create", "trapper", "--closure", &s, "--", &format!("{tools}/bin/sh"), &s]);
    bind_flag_dir(&store, "trapper", tmp.path());
    let child = store
        .cairn()
        .args(["automaton", "run", "trapper"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&tmp.path().join("started"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got-term\n");
    assert_eq!(out.status.code(), Some(42), "the program's own status");
    let state = Command::new("runc").args(["state", "cairn-trapper"]).output().unwrap();
    assert!(!state.status.success(), "the container is gone: {}", String::from_utf8_lossy(&state.stdout));
}

/// Removing an automaton whose container runs is refused (as `runc delete` refuses), and
/// `--force` kills it first; its roots go only then.
#[test]
fn removing_a_running_automaton_is_refused_unless_forced() {
    if !runc_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = TestStore::start();
    let script = "echo > /flag/started\nTOOLS/bin/busybox sleep 300\n";
    let (tools, s) = closure(&store, tmp.path(), "sleep.sh", script);
    store.ok(&["automaton", "create", "sleeper", "--closure", &s, "--", &format!("{tools}/bin/sh"), &s]);
    bind_flag_dir(&store, "sleeper", tmp.path());
    let mut child = store.cairn().args(["automaton", "run", "sleeper"]).stdin(Stdio::null()).spawn().unwrap();
    wait_for(&tmp.path().join("started"));
    let e = store.fail(&["automaton", "rm", "sleeper"], b"");
    assert_eq!(
        e.trim_end(),
        "cairn: automaton 'sleeper' is running in runc (container 'cairn-sleeper'); stop it first, or remove it with \
         --force, which kills it"
    );
    assert!(store.run(&["automaton", "show", "sleeper"], b"").status.success(), "still there");
    store.ok(&["automaton", "rm", "--force", "sleeper"]);
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed");
    assert!(!Command::new("runc").args(["state", "cairn-sleeper"]).output().unwrap().status.success());
    store.ok(&["gc"]);
    assert!(!store.run(&["path-info", &s], b"").status.success(), "its closure became collectable");
}

/// Binds host directory `dir` at `/flag` in automaton `name` (its bundle is ours to edit), for
/// the program to signal through.
fn bind_flag_dir(store: &TestStore, name: &str, dir: &Path) {
    let show = json(&store.ok(&["automaton", "show", "--json", name]));
    let config_path = Path::new(show["bundle"].as_str().unwrap()).join("config.json");
    let mut config = json(&std::fs::read_to_string(&config_path).unwrap());
    config["mounts"].as_array_mut().unwrap().push(serde_json::json!({
        "destination": "/flag", "type": "bind", "source": dir, "options": ["rbind", "rw"],
    }));
    config["root"]["readonly"] = serde_json::json!(false);
    std::fs::write(&config_path, config.to_string()).unwrap();
}

fn wait_for(flag: &Path) {
    let t = std::time::Instant::now();
    while !flag.exists() {
        assert!(t.elapsed() < std::time::Duration::from_secs(20), "the automaton did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
