//! `cairn image unpack` through the real daemon: an image built by `umoci` unpacks to the tree
//! `umoci unpack --rootless` makes (names, types, contents, symlink targets, executable bits),
//! whiteouts and opaque directories included; entries below symlinks land where umoci puts
//! them, inside the rootfs; a second unpack is answered from the cache; and hand-made hostile
//! layouts (`..` entries, a symlink loop, hard links out of the root) are refused with a
//! one-line error naming the entry, leaving nothing outside the scratch directory, no rootfs in
//! the store and a daemon that still answers.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_tests::oci::{digest_of, run_tool};
use cairn_tests::{require_peer, TestStore};

/// What a tree holds, path by path: `d`, `f <exec> <contents>` or `l <target>`.
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("l {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                walk(root, &p, out);
                "d".to_owned()
            } else {
                let exec = m.permissions().mode() & 0o111 != 0;
                format!("f {exec} {}", String::from_utf8_lossy(&std::fs::read(&p).unwrap()))
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn umoci(args: &[&str], extra: &Path) {
    run_tool(Command::new("umoci").args(args).arg(extra));
}

/// A tar layer with normal names (from `tar::Builder`).
fn plain_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        if name.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
        } else {
            h.set_mode(0o644);
        }
        h.set_size(data.len() as u64);
        h.set_mtime(1);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// An entry of a hand-made layer; names and targets go into the header as raw bytes, which
/// `tar::Builder`'s path setters would refuse for hostile ones.
enum Raw<'a> {
    File(&'a str, &'a [u8], u32),
    Sym(&'a str, &'a str),
    Link(&'a str, &'a str),
    Dev(&'a str),
}

fn raw_tar(entries: &[Raw]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (name, link, kind, mode, data): (&str, &str, _, u32, &[u8]) = match e {
            Raw::File(n, d, m) => (n, "", tar::EntryType::Regular, *m, d),
            Raw::Sym(n, t) => (n, t, tar::EntryType::Symlink, 0o777, b""),
            Raw::Link(n, t) => (n, t, tar::EntryType::Link, 0o644, b""),
            Raw::Dev(n) => (n, "", tar::EntryType::Char, 0o600, b""),
        };
        let mut h = tar::Header::new_gnu();
        let g = h.as_gnu_mut().unwrap();
        g.name[..name.len()].copy_from_slice(name.as_bytes());
        g.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// Writes an `oci:` layout by hand at `dir`: one image tagged `t`, its layers gzipped.
fn hand_layout(dir: &Path, layers: &[Vec<u8>]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = digest_of(bytes);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes).unwrap();
        d
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        diff_ids.push(digest_of(l));
        let z = gzip(l);
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(&z), "size": z.len(),
        }));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config), "size": config.len() },
        "layers": descs,
    }))
    .unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(&manifest),
            "size": manifest.len(), "annotations": { "org.opencontainers.image.ref.name": "t" },
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn rootfs_entries(store: &TestStore) -> Vec<String> {
    store.store_entries().into_iter().filter(|e| e.contains("oci-rootfs")).collect()
}

fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("cairn-{what}-{}-{nanos}", std::process::id())
}

#[test]
fn unpack_matches_umoci_and_is_cached() {
    if !require_peer("umoci") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let image = format!("{}:t", dir.display());
    umoci(&["init", "--layout"], &dir);
    run_tool(Command::new("umoci").args(["new", "--image", &image]));
    let bundle = |n: &str| tmp.path().join(n);

    // Layer 1: a file, an executable, a symlink, a hard link, and what later layers remove.
    let b1 = bundle("b1");
    umoci(&["unpack", "--rootless", "--image", &image], &b1);
    let r = b1.join("rootfs");
    for d in ["etc", "bin", "opq/sub", "var/cache"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::write(r.join("etc/motd"), b"hello\n").unwrap();
    std::fs::write(r.join("etc/gone"), b"deleted by layer 2\n").unwrap();
    std::fs::write(r.join("bin/run"), b"#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(r.join("bin/run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("../etc/motd", r.join("bin/motd-link")).unwrap();
    std::fs::hard_link(r.join("etc/motd"), r.join("etc/motd-hard")).unwrap();
    std::fs::write(r.join("opq/a"), b"a\n").unwrap();
    std::fs::write(r.join("opq/sub/b"), b"b\n").unwrap();
    std::fs::write(r.join("var/cache/c"), b"c\n").unwrap();
    umoci(&["repack", "--image", &image], &b1);

    // Layer 2 (umoci writes `.wh.` files): a file and a directory deleted, a file added.
    let b2 = bundle("b2");
    umoci(&["unpack", "--rootless", "--image", &image], &b2);
    let r = b2.join("rootfs");
    std::fs::remove_file(r.join("etc/gone")).unwrap();
    std::fs::remove_dir_all(r.join("var/cache")).unwrap();
    std::fs::write(r.join("etc/new"), b"added by layer 2\n").unwrap();
    umoci(&["repack", "--image", &image], &b2);

    // Layer 3 (umoci never writes opaque markers; added verbatim): `opq` made opaque.
    let l3 = tmp.path().join("l3.tar");
    std::fs::write(&l3, plain_tar(&[("opq/", b""), ("opq/.wh..wh..opq", b""), ("opq/fresh", b"fresh\n")])).unwrap();
    run_tool(Command::new("umoci").args(["raw", "add-layer", "--image", &image]).arg(&l3));

    let reference = bundle("reference");
    umoci(&["unpack", "--rootless", "--image", &image], &reference);
    let expected = tree(&reference.join("rootfs"));
    // What the image holds, so that a umoci that got it wrong cannot make cairn look right.
    assert!(expected.contains_key("etc/motd-hard") && expected.contains_key("opq/fresh"), "{expected:#?}");
    for gone in ["etc/gone", "var/cache", "opq/a", "opq/sub"] {
        assert!(!expected.contains_key(gone), "{gone}: {expected:#?}");
    }

    let store = TestStore::start();
    store.ok(&["image", "pull", &format!("oci:{image}"), "--tag", "t/x:1"]);
    let out = store.run(&["image", "unpack", "t/x:1"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let said = String::from_utf8(out.stderr).unwrap();
    assert_eq!(said.trim(), "unpacked 3 layers", "{said}");
    let name = path.rsplit('/').next().unwrap();
    assert!(name.contains("-oci-rootfs-"), "{path}");

    let real = store.root.path().join(path.trim_start_matches('/'));
    let got = tree(&real);
    assert_eq!(got, expected);
    assert!(!got.keys().any(|k| k.rsplit('/').next().unwrap().starts_with(".wh.")));
    assert_eq!(got["bin/run"], "f true #!/bin/sh\necho run\n");
    assert_eq!(got["bin/motd-link"], "l ../etc/motd");
    assert_eq!(got["etc/motd-hard"], got["etc/motd"]);

    // Again: the same path, from the cache; with an out-link that roots it, and as JSON.
    let link = tmp.path().join("rootfs-link");
    let out = store.run(&["image", "unpack", "t/x:1", "-o", link.to_str().unwrap()], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), path);
    assert!(String::from_utf8(out.stderr).unwrap().contains("cached"));
    assert_eq!(std::fs::read_link(&link).unwrap(), real);
    let json: serde_json::Value = serde_json::from_str(&store.ok(&["image", "unpack", "t/x:1", "--json"])).unwrap();
    assert_eq!(json["path"], path.as_str());
    assert_eq!(json["cached"], true);
    assert_eq!(json["layers"], 3);
    store.ok(&["gc"]);
    assert!(real.exists(), "the out-link roots the rootfs");

    // Without the out-link the rootfs is garbage like any other path; unpacking rebuilds it.
    std::fs::remove_file(&link).unwrap();
    store.ok(&["gc"]);
    assert!(!real.exists(), "the cache is not a root");
    let out = store.run(&["image", "unpack", "t/x:1"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), path);
    assert!(!String::from_utf8(out.stderr).unwrap().contains("cached"));
    assert_eq!(tree(&real), expected);
}

#[test]
fn drops_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    hand_layout(&dir, &[raw_tar(&[Raw::File("bin/su", b"x", 0o4755), Raw::Dev("dev/null"), Raw::Dev("dev/zero")])]);
    let store = TestStore::start();
    store.ok(&["image", "pull", &format!("oci:{}:t", dir.display()), "--tag", "t/drops:1"]);
    let out = store.run(&["image", "unpack", "t/drops:1"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8(out.stderr).unwrap().trim(),
        "unpacked 1 layer; dropped 2 device nodes or fifos, 1 setuid/setgid/sticky bit"
    );
    let path = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let real = store.root.path().join(path.trim_start_matches('/'));
    let got = tree(&real);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["bin", "bin/su", "dev"]);
    assert_eq!(std::fs::metadata(real.join("bin/su")).unwrap().permissions().mode() & 0o7777, 0o555);
}

/// A hostile image: its name, its layers, the entry the refusal must name, and paths that must
/// not appear.
struct Case<'a>(&'a str, Vec<Vec<u8>>, String, Vec<PathBuf>);

#[test]
fn hostile_layers_are_refused_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tempfile::Builder::new().prefix("cairn-outside-").tempdir().unwrap();
    std::fs::write(outside.path().join("victim"), b"still here").unwrap();
    let store = TestStore::start();

    let escape = unique("escape");
    let deep_escape = format!("../../../../../../../../../../../../tmp/{escape}");
    let through = unique("through");
    let cases = [
        Case(
            "dotdot",
            vec![raw_tar(&[Raw::File("ok", b"1", 0o644), Raw::File(&deep_escape, b"pwned", 0o644)])],
            deep_escape.clone(),
            vec![PathBuf::from("/tmp").join(&escape)],
        ),
        Case(
            "symlink-loop",
            vec![raw_tar(&[
                Raw::Sym("loop-a", "loop-b"),
                Raw::Sym("loop-b", "/loop-a"),
                Raw::File(&format!("loop-a/{through}"), b"pwned", 0o644),
            ])],
            format!("loop-a/{through}"),
            vec![PathBuf::from("/").join(&through)],
        ),
        Case(
            "hardlink-out",
            vec![raw_tar(&[Raw::File("a", b"1", 0o644), Raw::Link("passwd", "../../etc/passwd")])],
            "../../etc/passwd".to_owned(),
            vec![],
        ),
    ];
    for (i, Case(what, layers, entry, must_not_exist)) in cases.iter().enumerate() {
        let dir = tmp.path().join(what);
        hand_layout(&dir, layers);
        let tag = format!("t/hostile:{i}");
        store.ok(&["image", "pull", &format!("oci:{}:t", dir.display()), "--tag", &tag]);
        let err = store.fail(&["image", "unpack", &tag], b"");
        assert!(err.contains(&format!("'{entry}'")), "{what}: {err}");
        for p in must_not_exist {
            assert!(std::fs::symlink_metadata(p).is_err(), "{what}: {} was created", p.display());
        }
        assert!(rootfs_entries(&store).is_empty(), "{what}: {:?}", rootfs_entries(&store));
        let scratch: Vec<_> = std::fs::read_dir(store.root.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".cairn-unpack-"))
            .collect();
        assert!(scratch.is_empty(), "{what}: scratch left: {scratch:?}");
        assert!(store.ok(&["image", "ls"]).contains(&tag), "{what}: the daemon still answers");
    }
    assert_eq!(std::fs::read(outside.path().join("victim")).unwrap(), b"still here");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
}

/// Entries below a symlink land where the image's own root resolves it, as `umoci unpack` (and
/// containerd) put them: `lib/x` below `lib -> usr/lib` is `usr/lib/x`, and a symlink that
/// points out of the image (absolute, or `..` past its root) is taken inside it. Nothing is
/// written or removed outside.
#[test]
fn entries_below_symlinks_land_inside_the_rootfs_as_umoci_puts_them() {
    if !require_peer("umoci") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let outside = tempfile::Builder::new().prefix("cairn-outside-").tempdir().unwrap();
    std::fs::write(outside.path().join("victim"), b"still here").unwrap();
    let outside_dir = outside.path().display().to_string();
    let through = unique("through");
    let layers = [
        raw_tar(&[
            Raw::File("usr/lib/gone", b"lower", 0o644),
            Raw::File("usr/lib/kept", b"kept", 0o644),
            Raw::Sym("lib", "usr/lib"),
            Raw::Sym("lib64", "/usr/lib/../lib"),
            Raw::Sym("evil", "/tmp"),
            Raw::Sym("evil2", &outside_dir),
            Raw::Sym("up", "../../../.."),
            Raw::Sym("s", "usr/lib/kept"),
            // A hard link to a symlink: the symlink again, not what it points to.
            Raw::Link("hs", "s"),
        ]),
        raw_tar(&[
            Raw::File("lib/x", b"via lib", 0o755),
            Raw::File("lib64/y", b"via lib64", 0o644),
            Raw::File("lib/.wh.gone", b"", 0),
            Raw::File(&format!("evil/{through}"), b"inside", 0o644),
            Raw::File("evil2/planted", b"inside", 0o644),
            Raw::File("evil2/.wh.victim", b"", 0),
            Raw::File("up/top", b"inside", 0o644),
        ]),
    ];
    let layout = tmp.path().join("layout");
    hand_layout(&layout, &layers);
    let bundle = tmp.path().join("umoci-bundle");
    umoci(&["unpack", "--rootless", "--image", &format!("{}:t", layout.display())], &bundle);
    let expected = tree(&bundle.join("rootfs"));
    assert_eq!(expected.get("usr/lib/x").map(String::as_str), Some("f true via lib"), "{expected:#?}");
    assert!(!expected.contains_key("usr/lib/gone"), "{expected:#?}");

    let store = TestStore::start();
    store.ok(&["image", "pull", &format!("oci:{}:t", layout.display()), "--tag", "t/through:1"]);
    let path = store.ok(&["image", "unpack", "t/through:1"]).trim().to_owned();
    let got = tree(&store.root.path().join(path.trim_start_matches('/')));
    assert_eq!(got, expected);
    assert_eq!(got.get(&format!("tmp/{through}")).map(String::as_str), Some("f false inside"), "{got:#?}");
    assert!(std::fs::symlink_metadata(PathBuf::from("/tmp").join(&through)).is_err());
    assert_eq!(std::fs::read(outside.path().join("victim")).unwrap(), b"still here");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
}

/// A pulled image's rootfs is an ordinary store path: a derivation takes it as an input source
/// and builds on it in the sandbox, and the output references it.
#[test]
fn a_rootfs_is_the_input_of_a_derivation() {
    if !require_peer("/bin/busybox") {
        return;
    }
    let store =
        TestStore::builder().store_dir("/nix/store").config("sandbox-paths = [\"/bin/sh=/bin/busybox\"]\n").start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("l");
    hand_layout(&layout, &[plain_tar(&[("app/greeting", b"hello from the image\n")])]);
    store.ok(&["image", "pull", "--tag", "base/img:1", &format!("oci:{}:t", layout.display())]);
    let rootfs = store.ok(&["image", "unpack", "base/img:1"]).trim().to_owned();
    let drv = serde_json::json!({
        "outputs": { "out": { "path": "" } },
        "inputSrcs": [rootfs],
        "inputDrvs": {},
        "system": "x86_64-linux",
        "builder": "/bin/sh",
        "args": ["-c", "read line < $base/app/greeting; echo \"$line, built on $base\" > $out"],
        "env": { "name": "on-an-image", "builder": "/bin/sh", "system": "x86_64-linux", "out": "", "base": rootfs },
    });
    let f = tmp.path().join("drv.json");
    std::fs::write(&f, drv.to_string()).unwrap();
    let drv_path = store.ok(&["derivation", "add", f.to_str().unwrap()]).trim().to_owned();
    let out = store.ok(&["realise", "-Q", &drv_path]).trim().to_owned();
    assert_eq!(store.ok(&["cat", &out]), format!("hello from the image, built on {rootfs}\n"));
    assert!(store.ok(&["references", &out]).contains(&rootfs), "the output refers to the rootfs");
}
