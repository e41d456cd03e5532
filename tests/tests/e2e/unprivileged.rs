//! An unprivileged user's own store: cairnd and cairn run as user nobody (uid 65534, through
//! `setpriv`) on a root that user owns, and the README's first steps work — adding files and
//! directories (an empty one too), importing, realising a derivation with a directory output,
//! pulling an image (a layout is a directory) and collecting garbage.
//!
//! The rest of the suite runs as root, which gets past permission checks an ordinary user meets
//! (moving a read-only directory into the store needs write access to it): this test is what
//! catches those. Needs root (to switch users), `setpriv` and `/bin/busybox`.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use cairn_tests::{line, require_peer, world_readable_tempdir, TestStore};

const BUSYBOX: &str = "/bin/busybox";
const NOBODY: u32 = 65534;

#[test]
fn an_unprivileged_users_own_store_adds_imports_builds_pulls_and_collects() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root to run the store as another user");
        return;
    }
    if !require_peer("setpriv") || !require_peer(BUSYBOX) {
        return;
    }
    let st = TestStore::builder()
        .as_user(NOBODY)
        .store_dir("/nix/store")
        .config(&format!("sandbox-paths = [\"/bin/sh={BUSYBOX}\"]\n"))
        .start();
    let pid = st.pid();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_owned();
    assert!(uid_line.split_whitespace().nth(1) == Some("65534"), "cairnd runs as nobody: {uid_line}");

    // Files, a tree and an empty directory.
    let src = world_readable_tempdir();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    fs::write(src.path().join("hello.txt"), b"hello\n").unwrap();
    fs::create_dir_all(src.path().join("tree/sub")).unwrap();
    fs::write(src.path().join("tree/sub/f"), b"in a tree\n").unwrap();
    fs::create_dir(src.path().join("empty")).unwrap();
    for p in [src.path().join("tree"), src.path().join("tree/sub"), src.path().join("empty")] {
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    for p in [src.path().join("hello.txt"), src.path().join("tree/sub/f")] {
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let file = line(&st.ok(&["add", &s(&src.path().join("hello.txt"))]));
    let tree = line(&st.ok(&["add", &s(&src.path().join("tree"))]));
    let empty = line(&st.ok(&["add", &s(&src.path().join("empty"))]));
    assert_eq!(st.ok(&["cat", &format!("{tree}/sub/f")]), "in a tree\n");
    assert_eq!(st.ok(&["cat", &file]), "hello\n");
    st.ok(&["path-info", &empty]);

    // An import of a directory path made by another store.
    let other = TestStore::builder().store_dir("/nix/store").start();
    fs::write(src.path().join("tree/other"), b"from elsewhere\n").unwrap();
    fs::set_permissions(src.path().join("tree/other"), fs::Permissions::from_mode(0o644)).unwrap();
    let imported = line(&other.ok(&["add", &s(&src.path().join("tree"))]));
    st.ok_bytes(&["import"], &other.ok_bytes(&["export", &imported], b""));
    assert_eq!(st.ok(&["cat", &format!("{imported}/other")]), "from elsewhere\n");

    // A derivation whose output is a directory, built in the unprivileged sandbox; it leaves
    // directories closed to everyone in its build directory, which the daemon (not root, so
    // unable to read them as they are) still removes.
    let drv_json = serde_json::json!({
        "outputs": { "out": { "path": "" } },
        "inputSrcs": [],
        "inputDrvs": {},
        "system": "x86_64-linux",
        "builder": "/bin/sh",
        "args": ["-c", "mkdir -p /build/x/y $out/bin; echo f > /build/x/y/f; chmod 000 /build/x/y /build/x; \
                        echo built > $out/bin/greeting"],
        "env": { "name": "dir-output", "builder": "/bin/sh", "system": "x86_64-linux", "out": "" },
    });
    let drv_file = st.root.path().join("drv.json");
    fs::write(&drv_file, drv_json.to_string()).unwrap();
    fs::set_permissions(&drv_file, fs::Permissions::from_mode(0o644)).unwrap();
    let drv = line(&st.ok(&["derivation", "add", &s(&drv_file)]));
    let out = line(&st.ok(&["realise", &drv]));
    assert_eq!(st.ok(&["cat", &format!("{out}/bin/greeting")]), "built\n");
    let mine = format!("cairn-build-dir-output-{pid}-");
    let left = || {
        fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .any(|n| n.starts_with(&mine))
    };
    let started = std::time::Instant::now();
    while left() && started.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!left(), "the build directory, closed directories and all, is removed");

    // An image pulled from an OCI layout another store wrote.
    let layout_parent = world_readable_tempdir();
    let layout = layout_parent.path().join("layout");
    other.ok(&["image", "build", "--closure", &imported, "--tag", "local/app:v1"]);
    other.ok(&["image", "push", "local/app:v1", &format!("oci:{}:v1", layout.display())]);
    let _ = std::process::Command::new("chmod").args(["-R", "a+rX"]).arg(&layout).status();
    st.ok(&["image", "pull", "--tag", "local/app:v1", &format!("oci:{}:v1", layout.display())]);
    assert!(st.ok(&["image", "ls"]).contains("local/app"), "{}", st.ok(&["image", "ls"]));

    // Collecting: the unrooted paths go, the tagged image stays.
    st.ok(&["gc"]);
    assert!(!st.run(&["path-info", &file], b"").status.success(), "an unrooted file is collected");
    assert!(st.ok(&["image", "ls"]).contains("local/app"));
    st.ok(&["verify", "--check-contents"]);
}
