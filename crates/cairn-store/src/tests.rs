use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;

use cairn_nix::strategies::{tree, Tree};
use proptest::prelude::*;

use super::*;

fn store_at(root: &Path, dir: &str) -> LocalStore {
    LocalStore::open(StoreLayout::under_root(root, StoreDir::new(dir).unwrap())).unwrap()
}

/// Entries of the real store directory other than the (empty) temporary area.
fn store_entries(store: &LocalStore) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(&store.layout.real_store_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".cairn-"))
        .collect();
    v.sort();
    let tmp_left = store.temp_leftovers();
    assert_eq!(tmp_left, 0, "temporary area not empty");
    v
}

fn sample_tree() -> Tree {
    Tree::Directory(
        [
            (
                b"bin".to_vec(),
                Tree::Directory(
                    [(b"run".to_vec(), Tree::File { executable: true, contents: b"#!/bin/sh\n".to_vec() })].into(),
                ),
            ),
            (b"empty".to_vec(), Tree::Directory(Default::default())),
            (b"link".to_vec(), Tree::Symlink { target: b"/nonexistent/dangling".to_vec() }),
            (b"readme".to_vec(), Tree::File { executable: false, contents: b"hello\n".to_vec() }),
        ]
        .into(),
    )
}

#[test]
fn add_nar_is_canonical_and_dumps_back_identically() {
    let root = tempfile::tempdir().unwrap();
    let store = store_at(root.path(), "/nix/store");
    let nar = sample_tree().to_nar();
    let info = store.add_nar("sample", &nar[..]).unwrap();
    assert_eq!(info.nar_hash, Hash::digest(HashAlgo::Sha256, &nar));
    assert_eq!(info.nar_size, nar.len() as u64);
    let real = store.real_path(&info.path);
    for (rel, mode) in [("", 0o555), ("bin", 0o555), ("bin/run", 0o555), ("readme", 0o444), ("empty", 0o555)] {
        let m = fs::symlink_metadata(real.join(rel)).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, mode, "{rel}");
        assert_eq!(m.mtime(), 1, "{rel}");
    }
    assert_eq!(fs::symlink_metadata(real.join("link")).unwrap().mtime(), 1);
    let mut dumped = Vec::new();
    store.dump_path(&info.path, &mut dumped).unwrap();
    assert_eq!(dumped, nar);
    assert_eq!(store.path_info(&info.path).unwrap().unwrap(), info);
}

#[test]
fn flat_and_text_paths_match_nix() {
    let root = tempfile::tempdir().unwrap();
    let store = store_at(root.path(), "/nix/store");
    let flat = store.add_flat("hello", &b"hello\n"[..], 6, false).unwrap();
    assert_eq!(flat.path.base_name(), "8zv8i345w2xn27jrxj4cyjc6x3b4am1q-hello");
    let mut nar = Vec::new();
    store.dump_path(&flat.path, &mut nar).unwrap();
    assert_eq!(flat.nar_hash, Hash::digest(HashAlgo::Sha256, &nar));
    assert_eq!(flat.nar_size, nar.len() as u64);
    // An executable file gets the same path (the path hashes the bytes only) but another NAR.
    let exec = store.add_flat("hello", &b"hello\n"[..], 6, true).unwrap();
    assert_eq!(exec.path, flat.path, "same path: the valid one is returned");
    let root2 = tempfile::tempdir().unwrap();
    let store2 = store_at(root2.path(), "/nix/store");
    let exec = store2.add_flat("hello", &b"hello\n"[..], 6, true).unwrap();
    let mut nar = Vec::new();
    store2.dump_path(&exec.path, &mut nar).unwrap();
    assert_eq!((exec.nar_hash, exec.nar_size), (Hash::digest(HashAlgo::Sha256, &nar), nar.len() as u64));
    assert_eq!(fs::metadata(store2.real_path(&exec.path)).unwrap().permissions().mode() & 0o777, 0o555);
    let foo = store.add_text("foo", b"bar", &BTreeSet::new()).unwrap();
    assert_eq!(foo.path.base_name(), "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo");
    let baz = store
        .add_text("baz", b"/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo", &BTreeSet::from([foo.path.clone()]))
        .unwrap();
    assert_eq!(baz.path.base_name(), "5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz");
    assert_eq!(store.referrers(&foo.path).unwrap(), BTreeSet::from([baz.path.clone()]));
    let closure = store.walk(std::slice::from_ref(&baz.path), Direction::References).unwrap();
    assert_eq!(closure, vec![foo.path, baz.path]);
}

#[test]
fn size_mismatches_and_bad_references_register_nothing() {
    let root = tempfile::tempdir().unwrap();
    let store = store_at(root.path(), "/store");
    assert!(matches!(store.add_flat("x", &b"short"[..], 10, false), Err(StoreError::SizeMismatch { .. })));
    assert!(matches!(store.add_flat("x", &b"too long"[..], 3, false), Err(StoreError::SizeMismatch { .. })));
    let ghost = StorePath::from_base_name("vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-ghost").unwrap();
    assert!(matches!(store.add_text("t", b"x", &BTreeSet::from([ghost])), Err(StoreError::NotValid(_))));
    assert!(matches!(store.add_nar("bad name", &sample_tree().to_nar()[..]), Err(StoreError::StorePath(_))));
    assert_eq!(store.count().unwrap(), 0);
    assert!(store_entries(&store).is_empty());
}

#[test]
fn malformed_nars_leave_nothing_behind() {
    let root = tempfile::tempdir().unwrap();
    let store = store_at(root.path(), "/store");
    let good = sample_tree().to_nar();
    let mut with_trailing = good.clone();
    with_trailing.extend_from_slice(&[0u8; 8]);
    assert!(matches!(store.add_nar("x", &with_trailing[..]), Err(StoreError::TrailingData)));
    for cut in [0, 8, 40, good.len() / 2, good.len() - 1] {
        assert!(matches!(store.add_nar("x", &good[..cut]), Err(StoreError::Nar(_))), "cut {cut}");
    }
    assert_eq!(store.count().unwrap(), 0);
    assert!(store_entries(&store).is_empty());
}

#[test]
fn a_lone_dangling_symlink_can_be_added() {
    let root = tempfile::tempdir().unwrap();
    let store = store_at(root.path(), "/store");
    let nar = Tree::Symlink { target: b"/does/not/exist".to_vec() }.to_nar();
    let info = store.add_nar("link", &nar[..]).unwrap();
    assert_eq!(fs::read_link(store.real_path(&info.path)).unwrap(), Path::new("/does/not/exist"));
}

#[test]
fn concurrent_adds_of_the_same_contents_register_once() {
    let root = tempfile::tempdir().unwrap();
    let store = Arc::new(store_at(root.path(), "/store"));
    let nar = Arc::new(sample_tree().to_nar());
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (store, nar) = (store.clone(), nar.clone());
            std::thread::spawn(move || store.add_nar("same", &nar[..]).unwrap())
        })
        .collect();
    let infos: Vec<PathInfo> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(infos.windows(2).all(|w| w[0] == w[1]), "all callers see the same registration");
    assert_eq!(store.count().unwrap(), 1);
    assert_eq!(store_entries(&store), vec![infos[0].path.base_name()]);
}

#[test]
fn reopening_cleans_crash_leftovers_and_one_process_owns_a_store() {
    let root = tempfile::tempdir().unwrap();
    let layout = StoreLayout::under_root(root.path(), StoreDir::default());
    let store = LocalStore::open(layout.clone()).unwrap();
    assert!(matches!(LocalStore::open(layout.clone()), Err(StoreError::Locked(_))));
    let junk = layout.tmp_root().join("123-0/x");
    fs::create_dir_all(&junk).unwrap();
    fs::write(junk.join("f"), b"half written").unwrap();
    fs::set_permissions(&junk, fs::Permissions::from_mode(0o555)).unwrap();
    drop(store);
    let store = LocalStore::open(layout).unwrap();
    assert!(store_entries(&store).is_empty());
}

#[test]
fn an_unregistered_leftover_at_the_destination_is_replaced() {
    let root = tempfile::tempdir().unwrap();
    let store = store_at(root.path(), "/store");
    let nar = sample_tree().to_nar();
    let info = store.add_nar("x", &nar[..]).unwrap();
    drop(store);
    // Simulate a crash between rename and commit: contents present, row absent.
    let root2 = tempfile::tempdir().unwrap();
    let store2 = store_at(root2.path(), "/store");
    let dest = store2.real_path(&info.path);
    fs::create_dir_all(dest.join("partial")).unwrap();
    let again = store2.add_nar("x", &nar[..]).unwrap();
    assert_eq!(again.path, info.path);
    let mut dumped = Vec::new();
    store2.dump_path(&again.path, &mut dumped).unwrap();
    assert_eq!(dumped, nar);
}

#[test]
fn export_import_round_trip_and_reference_checks() {
    let (r1, r2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (store_at(r1.path(), "/store"), store_at(r2.path(), "/store"));
    let dep = a.add_nar("dep", &sample_tree().to_nar()[..]).unwrap();
    let top = a.add_text("top", b"uses dep", &BTreeSet::from([dep.path.clone()])).unwrap();
    let mut stream = Vec::new();
    a.export(&[top.path.clone(), dep.path.clone()], &mut stream).unwrap();

    // Only the referrer: its reference is neither valid nor in the stream.
    let mut partial = Vec::new();
    a.export(std::slice::from_ref(&top.path), &mut partial).unwrap();
    assert!(matches!(b.import(&partial[..]), Err(StoreError::MissingReference { .. })));
    assert_eq!(b.count().unwrap(), 0);

    let imported = b.import(&stream[..]).unwrap();
    assert_eq!(imported.iter().map(|i| &i.path).collect::<Vec<_>>(), vec![&dep.path, &top.path]);
    let got = b.path_info(&top.path).unwrap().unwrap();
    assert_eq!((got.nar_hash, got.references), (top.nar_hash.clone(), top.references.clone()));
    // Importing again is a no-op; a corrupted copy of a valid path is refused.
    b.import(&stream[..]).unwrap();
    let mut corrupted = stream.clone();
    let pos = corrupted.windows(8).position(|w| w == b"#!/bin/s").unwrap();
    corrupted[pos + 2] = b'?';
    assert!(matches!(b.import(&corrupted[..]), Err(StoreError::HashMismatch { .. })));
    assert_eq!(b.count().unwrap(), 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn add_dump_restore_round_trip(t in tree()) {
        let root = tempfile::tempdir().unwrap();
        let store = store_at(root.path(), "/store");
        let nar = t.to_nar();
        let info = store.add_nar("t", &nar[..]).unwrap();
        let mut dumped = Vec::new();
        store.dump_path(&info.path, &mut dumped).unwrap();
        prop_assert_eq!(&dumped, &nar);
        let out = root.path().join("restored");
        let mut r = NarReader::new(&dumped[..], Limits::default()).unwrap();
        restore(&mut r, &out, RestoreMode::Plain).unwrap();
        let mut again = Vec::new();
        dump(&out, &mut again).unwrap();
        prop_assert_eq!(again, nar);
    }
}

#[test]
fn import_spills_large_nars_and_replaces_leftovers() {
    let (r1, r2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (store_at(r1.path(), "/store"), store_at(r2.path(), "/store"));
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i ^ (i >> 9)) as u8).collect();
    let tree = Tree::Directory([(b"big".to_vec(), Tree::File { executable: false, contents: big })].into());
    let large = a.add_nar("large", &tree.to_nar()[..]).unwrap();
    let small = a.add_text("small", b"x", &BTreeSet::from([large.path.clone()])).unwrap();
    let mut stream = Vec::new();
    a.export(&[large.path.clone(), small.path.clone()], &mut stream).unwrap();
    // A crash left an unregistered tree where the large path goes.
    fs::create_dir_all(b.real_path(&large.path).join("junk")).unwrap();
    b.import(&stream[..]).unwrap();
    for p in [&large, &small] {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        a.dump_path(&p.path, &mut x).unwrap();
        b.dump_path(&p.path, &mut y).unwrap();
        assert_eq!(x, y);
    }
    assert_eq!(store_entries(&b).len(), 2);
}

#[test]
fn a_failed_import_removes_the_paths_it_placed() {
    let (r1, r2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (store_at(r1.path(), "/store"), store_at(r2.path(), "/store"));
    let first = a.add_nar("first", &sample_tree().to_nar()[..]).unwrap();
    let dep = a.add_text("dep", b"d", &BTreeSet::new()).unwrap();
    let needs_dep = a.add_text("needs-dep", b"n", &BTreeSet::from([dep.path.clone()])).unwrap();
    let mut stream = Vec::new();
    // `first` is placed before `needs-dep` turns out to lack its reference.
    a.export(&[first.path.clone(), needs_dep.path.clone()], &mut stream).unwrap();
    assert!(matches!(b.import(&stream[..]), Err(StoreError::MissingReference { .. })));
    assert_eq!(b.count().unwrap(), 0);
    assert!(store_entries(&b).is_empty(), "placed paths are removed: {:?}", store_entries(&b));
}
