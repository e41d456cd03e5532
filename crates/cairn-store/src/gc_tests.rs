//! Collection, roots, optimise and verify on real stores in temporary directories.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use cairn_nix::derivation::{Derivation, DerivationError, DerivationOutput};
use cairn_nix::export::{write_end_marker, write_next_marker, write_trailer, ExportTrailer};
use cairn_nix::strategies::Tree;
use cairn_nix::{StoreDir, StorePath};

use crate::roots::paths_in;
use crate::{ClientId, ClientScope, GcOptions, GcSettings, LocalStore, StoreError, StoreLayout, VerifyOptions};

fn store_at(root: &Path) -> LocalStore {
    LocalStore::open(StoreLayout::under_root(root, StoreDir::new("/store").unwrap())).unwrap()
}

fn text(s: &LocalStore, name: &str, refs: &[&StorePath]) -> StorePath {
    s.add_text(name, name.as_bytes(), &refs.iter().map(|r| (*r).clone()).collect()).unwrap().path
}

/// A permanent root: a symlink in gcroots to the path's real location.
fn root(s: &LocalStore, name: &str, p: &StorePath) {
    let dir = s.gc_roots_dir();
    fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(s.real_path(p), dir.join(name)).unwrap();
}

fn quiet(s: LocalStore) -> LocalStore {
    // This test process's own environment and maps do not name these stores, but keep the
    // tests independent of whatever else runs on the machine.
    s.with_gc_settings(GcSettings { runtime_roots: false, ..GcSettings::default() })
}

#[test]
fn collection_keeps_closures_of_roots_and_deletes_the_rest_referrers_first() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(store_at(dir.path()));
    let a = text(&s, "a", &[]);
    let b = text(&s, "b", &[&a]);
    let c = text(&s, "c", &[&b]);
    let d = text(&s, "d", &[&a]);
    let e = text(&s, "e", &[&d]);
    let tree = s.add_nar("tree", &crate::tests_support::sample_nar()[..]).unwrap().path;
    root(&s, "c", &c);
    assert_eq!(s.live_paths().unwrap(), sorted([&a, &b, &c]));
    assert_eq!(s.dead_paths().unwrap(), sorted([&d, &e, &tree]));
    let roots = s.roots().unwrap();
    assert_eq!(roots.len(), 1);
    assert!(roots[0].origin.ends_with("gcroots/c"), "{roots:?}");

    let dry = s.collect_garbage(&GcOptions { dry_run: true, max_freed: None }).unwrap();
    assert_eq!(dry.deleted.len(), 3);
    assert!(s.is_valid(&e).unwrap());

    let report = s.collect_garbage(&GcOptions::default()).unwrap();
    let pos = |p: &StorePath| report.deleted.iter().position(|x| x == p).unwrap();
    assert!(pos(&e) < pos(&d), "referrers first: {:?}", report.deleted);
    assert_eq!(report.bytes_freed, 2 + (b"#!/bin/sh\n".len() + b"hello\n".len()) as u64);
    for p in [&d, &e, &tree] {
        assert!(!s.is_valid(p).unwrap() && !s.real_path(p).exists());
    }
    for p in [&a, &b, &c] {
        assert!(s.is_valid(p).unwrap() && s.real_path(p).exists());
    }
    s.wait_reclaimed();
    assert_eq!(fs::read_dir(s.layout.trash_dir()).unwrap().count(), 0);
    assert!(s.verify(VerifyOptions { check_contents: true, ..Default::default() }).unwrap().problems.is_empty());
    // The graph followed: closure queries no longer see the dead paths.
    assert!(s.walk(std::slice::from_ref(&e), cairn_db::Direction::References).is_err());
}

fn sorted<'a>(v: impl IntoIterator<Item = &'a StorePath>) -> Vec<StorePath> {
    let mut v: Vec<StorePath> = v.into_iter().cloned().collect();
    v.sort();
    v
}

#[test]
fn indirect_roots_count_while_their_link_exists() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(store_at(dir.path()));
    let p = text(&s, "kept", &[]);
    let link = dir.path().join("result");
    std::os::unix::fs::symlink(s.real_path(&p), &link).unwrap();
    s.add_indirect_root(&link, &p).unwrap();
    assert_eq!(s.live_paths().unwrap(), vec![p.clone()]);
    assert_eq!(s.roots().unwrap()[0].origin, link.display().to_string());
    fs::remove_file(&link).unwrap();
    assert_eq!(s.dead_paths().unwrap(), vec![p.clone()]);
    assert_eq!(fs::read_dir(s.gc_roots_dir().join("auto")).unwrap().count(), 0, "stale indirect root removed");
    let other = text(&s, "never-valid-root", &[]);
    s.delete_paths(std::slice::from_ref(&other)).unwrap();
    assert!(matches!(s.add_indirect_root(&link, &other), Err(StoreError::NotValid(_))));
}

#[test]
fn temporary_roots_protect_paths_and_their_closures() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(store_at(dir.path()));
    let a = text(&s, "a", &[]);
    let b = text(&s, "b", &[&a]);
    let junk = text(&s, "junk", &[]);
    let guard = s.temp_root([b.clone()]);
    // Shown as the daemon process's, as Nix shows a worker's (`{temp:PID}`).
    let mine = format!("{{temp:{}}}", std::process::id());
    assert!(s.roots().unwrap().iter().any(|r| r.path == b && r.origin == mine));
    let report = s.collect_garbage(&GcOptions::default()).unwrap();
    assert_eq!(report.deleted, vec![junk]);
    assert!(s.is_valid(&a).unwrap() && s.is_valid(&b).unwrap());
    drop(guard);
    assert_eq!(s.collect_garbage(&GcOptions::default()).unwrap().deleted, vec![b, a]);
}

#[test]
fn a_clients_paths_stay_rooted_while_its_process_lives() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(store_at(dir.path()));
    let me = ClientId::of_pid(std::process::id() as i32).unwrap();
    let p = {
        let _scope = ClientScope::enter(Some(me));
        text(&s, "mine", &[])
    };
    assert!(s.roots().unwrap().iter().any(|r| r.path == p && r.origin == format!("{{temp:{}}}", me.pid)));
    assert!(s.collect_garbage(&GcOptions::default()).unwrap().deleted.is_empty());
    // A process that is gone (same pid, other start time) roots nothing.
    let gone = ClientId { pid: me.pid, start_time: me.start_time + 1 };
    let q = {
        let _scope = ClientScope::enter(Some(gone));
        text(&s, "theirs", &[])
    };
    assert_eq!(s.collect_garbage(&GcOptions::default()).unwrap().deleted, vec![q]);
}

#[test]
fn delete_refuses_live_or_referenced_paths_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(store_at(dir.path()));
    let a = text(&s, "a", &[]);
    let b = text(&s, "b", &[&a]);
    let r = text(&s, "rooted", &[]);
    let under = text(&s, "under", &[]);
    let over = text(&s, "over", &[&under]);
    root(&s, "r", &r);
    root(&s, "over", &over);
    let msg = |e: StoreError| e.to_string();
    let e = msg(s.delete_paths(std::slice::from_ref(&a)).unwrap_err());
    assert!(e.contains("still referenced by") && e.contains("-b'"), "{e}");
    let e = msg(s.delete_paths(std::slice::from_ref(&r)).unwrap_err());
    assert!(e.contains("is a root") && e.contains("gcroots/r"), "{e}");
    let e = msg(s.delete_paths(&[under.clone(), over.clone()]).unwrap_err());
    assert!(e.contains("gcroots/over"), "{e}");
    // Refusal deletes nothing; a path and its referrer together may go.
    assert!(s.is_valid(&a).unwrap());
    let report = s.delete_paths(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(report.deleted, vec![b, a]);
    assert!(matches!(s.delete_paths(std::slice::from_ref(&report.deleted[0])), Err(StoreError::NotValid(_))));
}

#[test]
fn max_freed_stops_the_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(store_at(dir.path()));
    for i in 0..10 {
        text(&s, &format!("junk{i}"), &[]);
    }
    let one = s.dead_paths().unwrap().len();
    assert_eq!(one, 10);
    // Each of these text paths is one file of 5 bytes ("junkN"), counted as Nix counts it:
    // paths are deleted until more than the limit is freed, 12 bytes taking three paths.
    let report = s.collect_garbage(&GcOptions { dry_run: false, max_freed: Some(12) }).unwrap();
    assert_eq!((report.deleted.len(), report.limit_reached), (3, true));
    assert_eq!(s.count().unwrap(), 7);
    // Exactly at the limit is not more than it: 15 bytes take four paths.
    let report = s.collect_garbage(&GcOptions { dry_run: false, max_freed: Some(15) }).unwrap();
    assert_eq!((report.deleted.len(), report.limit_reached), (4, true));
    // A limit never reached deletes every dead path and says nothing of it.
    let report = s.collect_garbage(&GcOptions { dry_run: false, max_freed: Some(1 << 20) }).unwrap();
    assert_eq!((report.deleted.len(), report.limit_reached), (3, false));
}

/// Registers an output path `out` built by derivation `drv` via an export stream (the only
/// way to get a path with a deriver into a store without building it).
fn import_output(s: &LocalStore, out: &StorePath, drv: &StorePath) {
    let mut stream = Vec::new();
    write_next_marker(&mut stream).unwrap();
    stream.extend(Tree::File { executable: false, contents: b"built".to_vec() }.to_nar());
    let dir = s.store_dir();
    let t = ExportTrailer { path: dir.display(out), references: vec![], deriver: Some(dir.display(drv)) };
    write_trailer(&mut stream, &t).unwrap();
    write_end_marker(&mut stream).unwrap();
    s.import(&stream[..]).unwrap();
}

#[test]
fn keep_derivations_and_keep_outputs_follow_nix() {
    let dir = tempfile::tempdir().unwrap();
    let mut drv = Derivation {
        outputs: BTreeMap::from([(
            "out".to_owned(),
            DerivationOutput { path: String::new(), hash_algo: String::new(), hash: String::new() },
        )]),
        platform: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        env: BTreeMap::from([("name".to_owned(), "hello".to_owned()), ("out".to_owned(), String::new())]),
        ..Default::default()
    };
    // Its output path, as Nix writes it.
    let store_dir = StoreDir::new("/store").unwrap();
    let out = drv.output_paths::<DerivationError>(&store_dir, "hello", &mut |_| unreachable!("no inputs")).unwrap()
        ["out"]
        .clone();
    let shown = store_dir.display(&out);
    drv.outputs.get_mut("out").unwrap().path = shown.clone();
    drv.env.insert("out".to_owned(), shown);
    let drv_text = drv.to_aterm();
    let setup = |settings: GcSettings| {
        let s = store_at(dir.path()).with_gc_settings(settings);
        let drv = s.add_text("hello.drv", drv_text.as_bytes(), &BTreeSet::new()).unwrap().path;
        assert_eq!(s.derivation_outputs(&drv).unwrap()["out"], out, "outputs recorded on registration");
        import_output(&s, &out, &drv);
        (s, drv)
    };
    let defaults = GcSettings { runtime_roots: false, ..GcSettings::default() };
    let (s, drv) = setup(defaults);
    root(&s, "out", &out);
    assert_eq!(s.live_paths().unwrap(), sorted([&out, &drv]), "keep-derivations keeps the deriver");
    fs::remove_file(s.gc_roots_dir().join("out")).unwrap();
    root(&s, "drv", &drv);
    assert_eq!(s.live_paths().unwrap(), vec![drv.clone()], "keep-outputs is off");
    drop(s);
    let (s, drv) = setup(GcSettings { keep_outputs: true, keep_derivations: false, ..defaults });
    assert_eq!(s.live_paths().unwrap(), sorted([&out, &drv]), "keep-outputs keeps the outputs");
    fs::remove_file(s.gc_roots_dir().join("drv")).unwrap();
    root(&s, "out", &out);
    assert_eq!(s.live_paths().unwrap(), vec![out.clone()], "keep-derivations is off");
}

#[test]
fn unregistered_leftovers_are_removed_unless_an_operation_holds_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(store_at(dir.path()));
    let left = StorePath::from_base_name("0c2kfsfbw5dh2ma4z3g6whrjsgshw1ya-left").unwrap();
    let held = StorePath::from_base_name("1c2kfsfbw5dh2ma4z3g6whrjsgshw1ya-held").unwrap();
    for p in [&left, &held] {
        fs::create_dir_all(s.real_path(p).join("sub")).unwrap();
    }
    fs::write(s.layout.real_store_dir.join("not-a-store-path"), b"x").unwrap();
    let _lock = s.locks.lock([held.clone()]);
    let report = s.collect_garbage(&GcOptions::default()).unwrap();
    assert_eq!(report.unregistered, 1);
    assert!(!s.real_path(&left).exists() && s.real_path(&held).exists());
    assert!(s.layout.real_store_dir.join("not-a-store-path").exists(), "foreign names are left alone");
}

#[test]
fn optimise_links_identical_files_and_survives_collection() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(store_at(dir.path()));
    let big = vec![7u8; 100_000];
    let tree = |extra: &[u8]| {
        Tree::Directory(
            [
                (b"same".to_vec(), Tree::File { executable: false, contents: big.clone() }),
                (b"x".to_vec(), Tree::File { executable: true, contents: big.clone() }),
                (b"own".to_vec(), Tree::File { executable: false, contents: extra.to_vec() }),
            ]
            .into(),
        )
        .to_nar()
    };
    let p1 = s.add_nar("one", &tree(b"1")[..]).unwrap();
    let p2 = s.add_nar("two", &tree(b"2")[..]).unwrap();
    let report = s.optimise().unwrap();
    // `same` and `x` of two are linked to those of one; `same` and `x` have the same bytes but
    // not the same executable bit, so they are not linked to each other.
    assert_eq!((report.files_linked, report.bytes_saved), (2, 200_000));
    let ino = |p: &StorePath, f: &str| fs::metadata(s.real_path(p).join(f)).unwrap().ino();
    assert_eq!(ino(&p1.path, "same"), ino(&p2.path, "same"));
    assert_ne!(ino(&p1.path, "same"), ino(&p1.path, "x"));
    let meta = fs::symlink_metadata(s.real_path(&p2.path)).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.mtime()), (0o555, 1), "directory left canonical");
    assert!(s.verify(VerifyOptions { check_contents: true, ..Default::default() }).unwrap().problems.is_empty());
    assert_eq!(s.optimise().unwrap().files_linked, 0, "a second run has nothing to do");
    root(&s, "two", &p2.path);
    s.collect_garbage(&GcOptions::default()).unwrap();
    let mut nar = Vec::new();
    s.dump_path(&p2.path, &mut nar).unwrap();
    assert_eq!(nar, tree(b"2"));
    fs::remove_file(s.gc_roots_dir().join("two")).unwrap();
    // The first collection's trash (one's names for the shared files) must be gone, or the
    // links still have a name there and wait for the next collection.
    s.wait_reclaimed();
    let report = s.collect_garbage(&GcOptions::default()).unwrap();
    assert_eq!(report.bytes_freed, 200_000 + 1, "files counted once their last link goes");
    assert_eq!(fs::read_dir(s.layout.links_dir()).unwrap().count(), 0);
}

#[test]
fn verify_reports_missing_and_modified_paths() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(store_at(dir.path()));
    let a = text(&s, "a", &[]);
    let b = text(&s, "b", &[]);
    let c = text(&s, "c", &[]);
    fs::remove_file(s.real_path(&a)).unwrap();
    let real = s.real_path(&b);
    fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    fs::write(&real, b"B").unwrap();
    let quick = s.verify(VerifyOptions::default()).unwrap();
    assert_eq!(quick.checked, 3);
    assert_eq!(quick.problems.iter().map(|p| p.kind).collect::<Vec<_>>(), ["missing"]);
    let full = s.verify(VerifyOptions { check_contents: true, ..Default::default() }).unwrap();
    let kinds: BTreeSet<_> = full.problems.iter().map(|p| (p.kind, p.path.clone().unwrap())).collect();
    assert_eq!(kinds, BTreeSet::from([("missing", a), ("modified", b)]));
    assert!(full.problems.iter().any(|p| p.message.contains("was modified! expected hash")));
    assert!(s.is_valid(&c).unwrap());
}

#[test]
fn untrusted_clients_see_root_links_but_not_other_processes_roots() {
    let path = StorePath::from_base_name("00000000000000000000000000000000-x").unwrap();
    let seen = |o: &str, trusted| crate::Root { origin: o.to_owned(), path: path.clone() }.origin_shown(trusted);
    for runtime in ["/proc/4242/environ", "/proc/4242/maps", "/proc/1/fd/3", "{temp:4242}"] {
        assert_eq!(seen(runtime, false), "{censored}");
        assert_eq!(seen(runtime, true), runtime);
    }
    for link in ["/var/lib/cairn/gcroots/auto/x", "/home/u/result", "/nix/var/nix/profiles/system-1-link"] {
        assert_eq!(seen(link, false), link);
    }
}

#[test]
fn runtime_root_scanner_finds_paths_in_maps_and_environments() {
    let text = "7f00-7f01 r-xp 0 fd:01 1 /store/0c2kfsfbw5dh2ma4z3g6whrjsgshw1ya-libc-2.37/lib/libc.so\n\
                PATH=/store/1c2kfsfbw5dh2ma4z3g6whrjsgshw1ya-bash/bin:/usr/bin\0/storefront /store/short-x";
    let found: Vec<String> = paths_in(text, &["/store"]).iter().map(|p| p.name().to_owned()).collect();
    assert_eq!(found, ["libc-2.37", "bash"]);
}

/// A store kept at `/srv/a/store` with the logical directory `/store`: its paths are found under
/// either name, but another store's file (`/srv/b/store/…`) is not one of them.
#[test]
fn the_logical_store_directory_is_not_matched_inside_another_store_s_path() {
    let text = "/srv/b/store/0c2kfsfbw5dh2ma4z3g6whrjsgshw1ya-theirs\n\
                /srv/a/store/1c2kfsfbw5dh2ma4z3g6whrjsgshw1ya-ours-real\n\
                PATH=/store/2c2kfsfbw5dh2ma4z3g6whrjsgshw1ya-ours-logical/bin:/store/3c2kfsfbw5dh2ma4z3g6whrjsgshw1ya-too";
    let found: Vec<String> = paths_in(text, &["/srv/a/store", "/store"]).iter().map(|p| p.name().to_owned()).collect();
    assert_eq!(found, ["ours-real", "ours-logical", "too"]);
}

#[test]
fn runtime_roots_include_this_process() {
    let dir = tempfile::tempdir().unwrap();
    let s = store_at(dir.path());
    let p = text(&s, "open-file", &[]);
    let f = fs::File::open(s.real_path(&p)).unwrap();
    assert!(s.roots().unwrap().iter().any(|r| r.path == p && r.origin.contains("/fd/")));
    assert!(s.collect_garbage(&GcOptions::default()).unwrap().deleted.is_empty());
    drop(f);
    assert_eq!(s.collect_garbage(&GcOptions::default()).unwrap().deleted, vec![p]);
}

#[test]
fn adds_racing_with_collections_never_lose_what_they_root() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(store_at(dir.path()));
    let stop = AtomicBool::new(false);
    let links = dir.path().join("links");
    fs::create_dir_all(&links).unwrap();
    std::thread::scope(|scope| {
        let collector = scope.spawn(|| {
            let mut runs = 0;
            while !stop.load(Ordering::Relaxed) || runs < 3 {
                s.collect_garbage(&GcOptions::default()).unwrap();
                runs += 1;
            }
            runs
        });
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (s, links) = (&s, &links);
                scope.spawn(move || {
                    for i in 0..60 {
                        // Shared, unrooted dependencies appear and disappear under the collector.
                        let base = s.add_text(&format!("base{}", i % 5), b"base", &BTreeSet::new());
                        let base = match base {
                            Ok(b) => b.path,
                            Err(e) => panic!("{e}"),
                        };
                        let top = match s.add_text(&format!("top{w}-{i}"), b"top", &BTreeSet::from([base.clone()])) {
                            Ok(t) => t.path,
                            // The base went between the two adds: the add says so, nothing lost.
                            Err(StoreError::NotValid(_)) => continue,
                            Err(e) => panic!("{e}"),
                        };
                        if i % 3 == 0 {
                            // The link first: without a client session (the daemon keeps
                            // a client's new paths rooted until it exits), a root whose link
                            // does not exist yet protects nothing.
                            let link = links.join(format!("{w}-{i}"));
                            std::os::unix::fs::symlink(s.real_path(&top), &link).unwrap();
                            match s.add_indirect_root(&link, &top) {
                                Ok(()) => {}
                                Err(StoreError::NotValid(_)) => fs::remove_file(&link).unwrap(),
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                })
            })
            .collect();
        let results: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        // Stop the collector before reporting a worker's panic, or the scope waits forever.
        stop.store(true, Ordering::Relaxed);
        assert!(collector.join().unwrap() >= 3);
        for r in results {
            r.unwrap();
        }
    });
    let live = s.live_paths().unwrap();
    for entry in fs::read_dir(&links).unwrap() {
        let target = fs::read_link(entry.unwrap().path()).unwrap();
        let p = StorePath::from_base_name(target.file_name().unwrap().to_str().unwrap()).unwrap();
        assert!(live.contains(&p), "rooted path {p} is live");
    }
    let report = s.verify(VerifyOptions { check_contents: true, ..Default::default() }).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    s.collect_garbage(&GcOptions::default()).unwrap();
    assert_eq!(s.count().unwrap() as usize, live.len());
}

#[test]
fn automatic_collection_runs_only_below_min_free() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(store_at(dir.path()));
    let junk = text(&s, "junk", &[]);
    assert_eq!(s.auto_gc(0, u64::MAX).unwrap(), None, "min-free 0: never");
    assert_eq!(s.auto_gc(1, u64::MAX).unwrap(), None, "more than one byte is free");
    // Less free than asked for: collect until max-free would be reached (here: everything).
    let report = s.auto_gc(u64::MAX, u64::MAX).unwrap().expect("collected");
    assert_eq!(report.deleted, vec![junk]);
}

/// A root source of another part of cairn (an image tag, a running automaton).
struct Tags(Vec<StorePath>);

impl crate::RootSource for Tags {
    fn name(&self) -> &'static str {
        "tags"
    }
    fn roots(&self, _: &StoreLayout) -> crate::Result<Vec<crate::Root>> {
        Ok(self.0.iter().map(|p| crate::Root { origin: format!("{{tag:{}}}", p.name()), path: p.clone() }).collect())
    }
}

#[test]
fn registered_root_sources_keep_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    let s = quiet(store_at(dir.path()));
    let layer = text(&s, "layer", &[]);
    let image = text(&s, "image", &[&layer]);
    let junk = text(&s, "junk", &[]);
    s.add_root_source(std::sync::Arc::new(Tags(vec![image.clone()])));
    assert!(s.roots().unwrap().iter().any(|r| r.origin == "{tag:image}" && r.path == image));
    assert_eq!(s.collect_garbage(&GcOptions::default()).unwrap().deleted, vec![junk]);
    assert!(s.is_valid(&layer).unwrap(), "the closure of a source's root is kept");
}
