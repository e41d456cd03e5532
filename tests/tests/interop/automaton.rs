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
    store.ok(&["automaton", "create", "in-image", "--image", "entry/point:1", "--", "/etc/passwd"]);
    let e = store.fail(&["automaton", "create", "no-dir", "--image", "entry/point:1", "--", "/etc"], b"");
    assert!(e.contains("command '/etc' is not in"), "a directory is no command: {e}");
    // An image without a command, and none given.
    store.ok(&["image", "build", "--closure", &s, "--tag", "no/cmd:1"]);
    let e = store.fail(&["automaton", "create", "nothing", "--image", "no/cmd:1"], b"");
    assert!(e.contains("no command to run: the image sets neither Entrypoint nor Cmd"), "{e}");
    // Without an image a command is still needed (a usage error).
    let out = store.cairn().args(["automaton", "create", "bare", "--closure", &s]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
