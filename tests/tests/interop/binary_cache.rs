//! `cairn copy --to file://DIR` writes binary caches that real Nix 2.8 substitutes from,
//! with signatures Nix checks against the key's public half.

use std::path::Path;

use cairn_tests::{line, path_info_summary as infos, require_peer, write, NixStore, TestStore};
use serde_json::Value;

use cairn_tests::utf8 as s;

/// A tree (an executable and 100 kB of data) and a note that references it, made in a scratch
/// store; returns both paths and their export stream (imported paths carry no content address,
/// so Nix insists on signatures for them).
fn tree_and_note(dir: &Path) -> (String, String, Vec<u8>) {
    let seed = TestStore::builder().store_dir("/nix/store").start();
    write(&dir.join("tree/bin/tool"), b"#!/bin/sh\necho tool\n");
    write(&dir.join("tree/share/data"), &vec![42u8; 100_000]);
    let tree = line(&seed.ok(&["add", s(&dir.join("tree"))]));
    write(&dir.join("note"), format!("uses {tree}\n").as_bytes());
    let top = line(&seed.ok(&["add-text", "note", s(&dir.join("note")), "--ref", &tree]));
    let stream = seed.ok_bytes(&["export", &tree, &top], b"");
    (tree, top, stream)
}

/// A store holding [`tree_and_note`]'s closure (imported: no content addresses, so Nix insists
/// on signatures) and a new key pair named `name`: the store, the tree, the note, the secret
/// key's file and the public key.
fn keyed_store(dir: &Path, name: &str) -> (TestStore, String, String, std::path::PathBuf, String) {
    let (tree, top, stream) = tree_and_note(dir);
    let st = TestStore::builder().store_dir("/nix/store").start();
    st.ok_bytes(&["import"], &stream);
    let (sk, pk) = (dir.join("sk"), dir.join("pk"));
    st.ok(&["key", "generate", name, s(&sk), s(&pk)]);
    let public = std::fs::read_to_string(&pk).unwrap().trim().to_owned();
    (st, tree, top, sk, public)
}

#[test]
fn nix_substitutes_signed_closures_from_a_cache_cairn_wrote() {
    if !require_peer("nix-store") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Paths without a content address (imported), for which Nix insists on a signature.
    let (st, tree, top, sk, public) = keyed_store(dir.path(), "cairn-cache-1");
    let cache = dir.path().join("cache");
    let url = format!("file://{}", cache.display());
    st.ok(&["copy", "--to", &url, "--secret-key-file", s(&sk), &top]);
    assert_eq!(
        std::fs::read_to_string(cache.join("nix-cache-info")).unwrap(),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 50\n"
    );
    // NARs are compressed with zstd unless the URL says otherwise.
    let narinfo = std::fs::read_to_string(cache.join(format!("{}.narinfo", &top[11..43]))).unwrap();
    assert!(narinfo.contains("Compression: zstd\n") && narinfo.contains(".nar.zst\n"), "{narinfo}");
    assert_eq!(
        std::fs::read_dir(&cache)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "narinfo"))
            .count(),
        2
    );
    // Again: nothing to write.
    let again = st.run(&["copy", "--to", &url, &top], b"");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("copied 0 paths"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // Nix trusts the key: the closure arrives with the same NAR hashes, sizes and references.
    let nix = NixStore::new();
    nix.ok("nix", &["copy", "--from", &url, "--option", "trusted-public-keys", public.trim(), &top]);
    let ours = infos(&st.ok_bytes(&["path-info", "--json", "--closure", &top], b""));
    let theirs = infos(&nix.ok("nix", &["path-info", "--json", "--recursive", &top]));
    assert_eq!(ours, theirs);
    assert_eq!(ours.len(), 2);

    // Nix trusting another key, or a cache written without a key: refused.
    let other = NixStore::new();
    let refuse = |url: &str, key: &str| {
        let out = other
            .cmd("nix")
            .args(["copy", "--from", url, "--option", "trusted-public-keys", key, &top])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("lacks a valid signature"), "{err}");
    };
    refuse(&url, "someone-else-1:up1w+p9hbiFiyds3XlVGeZ3VPMC2rkO4TNTtYkEN+Qo=");
    let unsigned = format!("file://{}", dir.path().join("unsigned").display());
    st.ok(&["copy", "--to", &unsigned, &top]);
    refuse(&unsigned, public.trim());

    // Contents that no longer match their NAR hash are not published.
    let real = st.real_store_dir().join(tree.trim_start_matches("/nix/store/")).join("share/data");
    std::fs::set_permissions(real.parent().unwrap(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&real, b"tampered").unwrap();
    let bad = format!("file://{}", dir.path().join("bad").display());
    let err = st.fail(&["copy", "--to", &bad, &top], b"");
    assert!(err.contains(&tree) || err.contains("hash"), "{err}");
    let published: Vec<_> =
        std::fs::read_dir(dir.path().join("bad")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!published.iter().any(|n| n.to_string_lossy().starts_with(&tree[11..43])), "{published:?}");
    // Caches are written to file:// and s3:// only, and said so.
    let err = st.fail(&["copy", "--to", "http://127.0.0.1:9/cache", &top], b"");
    assert!(err.contains("file:// and s3://"), "{err}");
}

#[test]
fn cairn_substitutes_from_a_cache_nix_wrote_checking_every_path() {
    if !require_peer("nix-store") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Input-addressed paths in Nix (imported from a cairn export), signed by a Nix key.
    let (tree, top, stream) = tree_and_note(dir.path());
    let nix = NixStore::new();
    nix.ok_stdin("nix-store", &["--import"], &stream);
    let (sk, pk) = (dir.path().join("nix.sec"), dir.path().join("nix.pub"));
    nix.ok("nix-store", &["--generate-binary-cache-key", "nix-cache-1", s(&sk), s(&pk)]);
    nix.ok("nix", &["store", "sign", "--recursive", "--key-file", s(&sk), &top]);
    let cache = dir.path().join("cache");
    let url = format!("file://{}", cache.display());
    nix.ok("nix", &["copy", "--to", &format!("{url}?compression=none"), &top]);
    let public = std::fs::read_to_string(&pk).unwrap();

    // Trusting Nix's key: the closure arrives, references first, identical to Nix's.
    let st = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!("trusted-public-keys = [\"{}\"]", public.trim()))
        .start();
    assert_eq!(st.ok(&["copy", "--from", &url, &top]), format!("{top}\n"));
    let ours = infos(&st.ok_bytes(&["path-info", "--json", "--closure", &top], b""));
    let theirs = infos(&nix.ok("nix", &["path-info", "--json", "--recursive", &top]));
    assert_eq!(ours, theirs);
    let sigs: Value = serde_json::from_slice(&st.ok_bytes(&["path-info", "--json", &top], b"")).unwrap();
    assert!(sigs[0]["signatures"][0].as_str().unwrap().starts_with("nix-cache-1:"), "{sigs}");
    assert_eq!(
        st.ok_bytes(&["nar", "dump", &tree], b""),
        nix.ok("nix-store", &["--dump", s(&nix.root.path().join(tree.trim_start_matches('/')))])
    );

    // Not trusting it: refused, nothing registered.
    let untrusting = TestStore::builder().store_dir("/nix/store").start();
    let err = untrusting.fail(&["copy", "--from", &url, &top], b"");
    assert!(err.contains("trusted key") && err.contains("trusted-public-keys"), "{err}");
    assert!(untrusting.store_entries().is_empty());

    // A NAR that does not match its narinfo: refused, nothing of it registered.
    let narinfo = std::fs::read_to_string(cache.join(format!("{}.narinfo", &tree[11..43]))).unwrap();
    let nar_url = narinfo.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
    let nar_file = cache.join(nar_url);
    let mut bytes = std::fs::read(&nar_file).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    std::fs::write(&nar_file, &bytes).unwrap();
    let fresh = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!("trusted-public-keys = [\"{}\"]", public.trim()))
        .start();
    let err = fresh.fail(&["copy", "--from", &url, &top], b"");
    assert!(err.contains("NAR hash mismatch") || err.contains("the file hashes to"), "{err}");
    assert!(fresh.store_entries().is_empty());
    // A narinfo for another path under this path's name: refused. (A new daemon: the first one
    // remembers the good narinfo it read, as narinfos never change.)
    std::fs::write(cache.join(format!("{}.narinfo", &top[11..43])), &narinfo).unwrap();
    let fresh = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!("trusted-public-keys = [\"{}\"]", public.trim()))
        .start();
    let err = fresh.fail(&["copy", "--from", &url, &top], b"");
    assert!(err.contains("the narinfo is for"), "{err}");
    assert!(fresh.store_entries().is_empty());
    // zstd, as Nix writes it, is read.
    let zst = format!("file://{}", dir.path().join("zstd").display());
    nix.ok("nix", &["copy", "--to", &format!("{zst}?compression=zstd"), &top]);
    assert!(std::fs::read_to_string(dir.path().join("zstd").join(format!("{}.narinfo", &top[11..43])))
        .unwrap()
        .contains("Compression: zstd"));
    let z = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!("trusted-public-keys = [\"{}\"]", public.trim()))
        .start();
    assert_eq!(z.ok(&["copy", "--from", &zst, &top]), format!("{top}\n"));
    assert_eq!(infos(&z.ok_bytes(&["path-info", "--json", "--closure", &top], b"")), theirs);
    // xz (Nix's default) and bzip2 are read too.
    for compression in ["xz", "bzip2"] {
        let url = format!("file://{}", dir.path().join(compression).display());
        nix.ok("nix", &["copy", "--to", &format!("{url}?compression={compression}"), &top]);
        let narinfo =
            std::fs::read_to_string(dir.path().join(compression).join(format!("{}.narinfo", &top[11..43]))).unwrap();
        assert!(narinfo.contains(&format!("Compression: {compression}")), "{narinfo}");
        let z = TestStore::builder()
            .store_dir("/nix/store")
            .config(&format!("trusted-public-keys = [\"{}\"]", public.trim()))
            .start();
        assert_eq!(z.ok(&["copy", "--from", &url, &top]), format!("{top}\n"));
        assert_eq!(infos(&z.ok_bytes(&["path-info", "--json", "--closure", &top], b"")), theirs);
    }
}

#[test]
fn verify_repair_fetches_broken_paths_again_from_the_substituters() {
    let dir = tempfile::tempdir().unwrap();
    let seed = TestStore::start();
    let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
    seed.ok(&["key", "generate", "repair-cache-1", s(&sk), s(&pk)]);
    write(&dir.path().join("tree/data"), b"the good contents\n");
    write(&dir.path().join("tree/more"), &vec![7u8; 50_000]);
    let tree = line(&seed.ok(&["add", s(&dir.path().join("tree"))]));
    let url = format!("file://{}", dir.path().join("cache").display());
    seed.ok(&["copy", "--to", &url, "--secret-key-file", s(&sk), &tree]);

    let public = std::fs::read_to_string(&pk).unwrap();
    let st = TestStore::builder()
        .config(&format!("substituters = [\"{url}\"]\ntrusted-public-keys = [\"{}\"]", public.trim()))
        .start();
    assert_eq!(st.ok(&["substitute", &tree]), format!("{tree}\n"));
    // Break the copy: one file modified.
    let real = st.real_store_dir().join(&tree[7..]);
    std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(real.join("data"), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(real.join("data"), b"bit rot\n").unwrap();
    assert!(st.fail(&["verify", "--check-contents"], b"").contains("1 of 1 path checked has problems"));

    let out = st.run(&["verify", "--check-contents", "--repair"], b"");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("was modified") && stdout.trim_end().ends_with("(repaired)"), "{stdout}");
    assert_eq!(st.ok(&["cat", &format!("{tree}/data")]), "the good contents\n");
    st.ok(&["verify", "--check-contents"]);
    // A missing path too.
    std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::remove_dir_all(&real).unwrap();
    st.ok(&["verify", "--repair"]);
    assert_eq!(st.ok(&["cat", &format!("{tree}/data")]), "the good contents\n");

    // Without a substituter it says so, and fails.
    let alone = TestStore::start();
    let stream = seed.ok_bytes(&["export", &tree], b"");
    alone.ok_bytes(&["import"], &stream);
    let real = alone.real_store_dir().join(&tree[7..]);
    std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::remove_dir_all(&real).unwrap();
    let out = alone.run(&["verify", "--repair"], b"");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("(cannot repair: no substituter is configured)"));
}

/// A cache URL's parameters are read as Nix reads them: `secret-key` signs what is written (a
/// cache Nix then trusts), `compression=gzip` is written and read both ways (Nix names no
/// extension for it), a cache of another store directory is refused in Nix's words, and a local
/// cache without `nix-cache-info` is read as Nix reads it.
#[test]
fn cache_url_parameters_gzip_and_store_directories_are_honoured_as_by_nix() {
    if !require_peer("nix-store") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (st, tree, top, sk, public) = keyed_store(dir.path(), "params-1");

    // secret-key and compression in the URL, as `nix copy --to` takes them.
    let cache = dir.path().join("gz");
    let url = format!("file://{}?compression=gzip&secret-key={}", cache.display(), sk.display());
    st.ok(&["copy", "--to", &url, &top]);
    let narinfo = std::fs::read_to_string(cache.join(format!("{}.narinfo", &top[11..43]))).unwrap();
    assert!(narinfo.contains("Compression: gzip\n") && narinfo.contains("Sig: params-1:"), "{narinfo}");
    assert!(narinfo.lines().any(|l| l.starts_with("URL: nar/") && l.ends_with(".nar")), "{narinfo}");
    let nix = NixStore::new();
    let plain = format!("file://{}", cache.display());
    nix.ok("nix", &["copy", "--from", &plain, "--option", "trusted-public-keys", public.trim(), &top]);
    assert_eq!(infos(&nix.ok("nix", &["path-info", "--json", "--recursive", &top])).len(), 2);

    // A gzip cache Nix wrote, read by cairn.
    let nix_cache = dir.path().join("nix-gz");
    let nix_url = format!("file://{}?compression=gzip", nix_cache.display());
    nix.ok("nix", &["copy", "--to", &nix_url, &top]);
    let fresh = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!("trusted-public-keys = [\"{}\"]\n", public.trim()))
        .start();
    fresh.ok(&["copy", "--from", &format!("file://{}", nix_cache.display()), &top]);
    fresh.ok(&["verify", "--check-contents"]);

    // A cache of another store directory: refused, nothing written.
    let gnu = dir.path().join("gnu");
    write(&gnu.join("nix-cache-info"), b"StoreDir: /gnu/store\n");
    let out = st.run(&["copy", "--to", &format!("file://{}", gnu.display()), &tree], b"");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("is for Nix stores with prefix '/gnu/store', not '/nix/store'"),
        "{said}"
    );
    assert_eq!(std::fs::read_dir(&gnu).unwrap().count(), 1);

    // A local cache without nix-cache-info (Nix would write one): read all the same.
    std::fs::remove_file(nix_cache.join("nix-cache-info")).unwrap();
    let again = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!("trusted-public-keys = [\"{}\"]\n", public.trim()))
        .start();
    again.ok(&["copy", "--from", &format!("file://{}", nix_cache.display()), &top]);
}

/// `cairn log` of a path built elsewhere finds its build log in a binary cache, where Nix's
/// `nix store copy-log` puts it, as `nix log` looks there.
#[test]
fn build_logs_are_read_from_binary_caches_as_nix_log_reads_them() {
    if !require_peer("nix-store") || !require_peer("/bin/busybox") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nix = NixStore::new().sandboxed();
    let expr = dir.path().join("logged.nix");
    write(
        &expr,
        br#"derivation { name = "logged-elsewhere"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo built far away; echo > $out" ]; }"#,
    );
    let out = String::from_utf8(
        nix.ok("nix-build", &["--no-out-link", "--option", "sandbox-paths", "/bin/sh=/bin/busybox", s(&expr)]),
    )
    .unwrap()
    .trim()
    .to_owned();
    let drv = String::from_utf8(nix.ok("nix-store", &["-q", "--deriver", &out])).unwrap().trim().to_owned();
    let cache = format!("file://{}", dir.path().join("cache").display());
    nix.ok("nix", &["copy", "--to", &cache, &out]);
    nix.ok("nix", &["store", "copy-log", "--to", &cache, &drv]);
    let st = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!("substituters = [\"{cache}\"]\nrequire-sigs = false\n"))
        .start();
    st.ok(&["substitute", &out]);
    assert_eq!(st.ok(&["log", &out]), "built far away\n");
}
