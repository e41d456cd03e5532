use super::*;
use cairn_nix::{HashAlgo, StoreDir};
use graph::Direction;

fn path(name: &str) -> StorePath {
    let h = Hash::digest(HashAlgo::Sha256, name.as_bytes());
    StoreDir::default().make_store_path("test", &h, name).unwrap()
}

fn info(name: &str, refs: &[&str]) -> PathInfo {
    PathInfo {
        path: path(name),
        nar_hash: Hash::digest(HashAlgo::Sha256, name.as_bytes()),
        nar_size: 8 * name.len() as u64,
        references: refs.iter().map(|r| path(r)).collect(),
        deriver: None,
        registration_time: 1_700_000_000,
        ultimate: true,
        signatures: BTreeSet::from(["cache-1:c2ln".to_owned()]),
        ca: None,
    }
}

#[test]
fn register_and_query() {
    let mut db = Db::open_in_memory().unwrap();
    assert_eq!(db.schema_version().unwrap(), schema::VERSION);
    db.register(&[info("a", &[]), info("b", &["a", "b"])]).unwrap();
    let b = db.path_info(&path("b")).unwrap().unwrap();
    assert_eq!(b, info("b", &["a", "b"]));
    assert_eq!(db.referrers(&path("a")).unwrap(), BTreeSet::from([path("b")]));
    assert!(db.path_info(&path("c")).unwrap().is_none());
    assert_eq!(db.count().unwrap(), 2);
}

#[test]
fn registration_is_all_or_nothing() {
    let mut db = Db::open_in_memory().unwrap();
    let err = db.register(&[info("a", &[]), info("b", &["missing"])]).unwrap_err();
    assert!(matches!(err, DbError::MissingReference { .. }), "{err}");
    assert!(!db.is_valid(&path("a")).unwrap());
}

#[test]
fn derivation_outputs() {
    let mut db = Db::open_in_memory().unwrap();
    db.register(&[info("x.drv", &[])]).unwrap();
    let outs = BTreeMap::from([("out".to_owned(), path("x")), ("dev".to_owned(), path("x-dev"))]);
    db.register_derivation_outputs(&path("x.drv"), &outs).unwrap();
    assert_eq!(db.derivation_outputs(&path("x.drv")).unwrap(), outs);
    assert!(db.register_derivation_outputs(&path("y.drv"), &outs).is_err());
}

#[test]
fn valid_derivers_are_found_from_an_output() {
    let mut db = Db::open_in_memory().unwrap();
    db.register(&[info("x.drv", &[]), info("z.drv", &[])]).unwrap();
    db.register_derivation_outputs(&path("x.drv"), &BTreeMap::from([("out".to_owned(), path("x"))])).unwrap();
    db.register_derivation_outputs(&path("z.drv"), &BTreeMap::from([("lib".to_owned(), path("x"))])).unwrap();
    let both: std::collections::BTreeSet<_> = [path("x.drv"), path("z.drv")].into();
    assert_eq!(db.valid_derivers(&path("x")).unwrap(), both);
    assert!(db.valid_derivers(&path("x-dev")).unwrap().is_empty());
}

#[test]
fn reopen_keeps_data_and_refuses_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db.sqlite");
    Db::open(&file).unwrap().register(&[info("a", &[])]).unwrap();
    let db = Db::open(&file).unwrap();
    assert!(db.is_valid(&path("a")).unwrap());
    db.conn.pragma_update(None, "user_version", 99).unwrap();
    drop(db);
    assert!(matches!(Db::open(&file), Err(DbError::SchemaTooNew { found: 99, .. })));
}

#[test]
fn an_unsynced_registration_is_valid_at_once_marked_and_later_commits_are_synchronous_again() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db.sqlite");
    let mut db = Db::open(&file).unwrap();
    let synchronous = |db: &Db| db.conn.pragma_query_value(None, "synchronous", |r| r.get::<_, i64>(0)).unwrap();
    assert_eq!(synchronous(&db), 2, "opened with synchronous = FULL");
    db.register_unsynced(&[info("a", &[])], &[]).unwrap();
    assert!(db.is_valid(&path("a")).unwrap());
    assert!(db.unflushed);
    assert_eq!(db.unsynced().unwrap(), [path("a")]);
    assert_eq!(synchronous(&db), 2, "only that commit was made without waiting for the disk");
    // A refused batch leaves the connection synchronous too, and marks nothing.
    assert!(db.register_unsynced(&[info("b", &["missing"])], &[]).is_err());
    assert_eq!(synchronous(&db), 2);
    let bound = db.unsynced_bound().unwrap().unwrap();
    db.register_unsynced(&[info("c", &["a"])], &[]).unwrap();
    db.clear_unsynced(bound).unwrap();
    assert!(!db.unflushed, "the clearing commit was synchronous");
    assert_eq!(db.unsynced().unwrap(), [path("c")], "only marks made before the bound go");
    db.register(&[info("d", &["a"])]).unwrap();
    drop(db);
    let db = Db::open(&file).unwrap();
    assert!(db.is_valid(&path("a")).unwrap() && db.is_valid(&path("c")).unwrap());
    assert!(!db.is_valid(&path("b")).unwrap());
    assert_eq!(db.unsynced().unwrap(), [path("c")], "a mark outlives the process");
}

#[test]
fn forgetting_a_path_forgets_everything_that_refers_to_it_and_nothing_else() {
    let mut db = Db::open_in_memory().unwrap();
    db.register(&[
        info("libc", &[]),
        info("lib", &["libc", "lib"]),
        info("app", &["lib"]),
        info("tool", &["app", "libc"]),
        info("other", &["libc"]),
    ])
    .unwrap();
    db.register_unsynced(&[info("late", &["app"])], &[]).unwrap();
    let mut gone = db.forget_with_referrers(&[path("lib")]).unwrap();
    gone.sort();
    let mut want = vec![path("app"), path("late"), path("lib"), path("tool")];
    want.sort();
    assert_eq!(gone, want);
    for p in ["app", "late", "lib", "tool"] {
        assert!(!db.is_valid(&path(p)).unwrap(), "{p}");
    }
    assert!(db.is_valid(&path("libc")).unwrap() && db.is_valid(&path("other")).unwrap());
    assert!(db.unsynced().unwrap().is_empty(), "the mark went with its path");
    assert_eq!(db.referrers(&path("libc")).unwrap().into_iter().collect::<Vec<_>>(), [path("other")]);
}

#[test]
fn graph_closure_is_topological() {
    let mut db = Db::open_in_memory().unwrap();
    db.register(&[
        info("libc", &[]),
        info("lib", &["libc"]),
        info("app", &["lib", "libc", "app"]),
        info("other", &["libc"]),
    ])
    .unwrap();
    let g = db.load_graph().unwrap();
    let app = g.id(&path("app")).unwrap();
    let closure: Vec<_> =
        g.walk(&[app], Direction::References).into_iter().map(|i| g.path(i).unwrap().clone()).collect();
    assert_eq!(closure, vec![path("libc"), path("lib"), path("app")]);
    let libc = g.id(&path("libc")).unwrap();
    let mut up: Vec<_> =
        g.walk(&[libc], Direction::Referrers).into_iter().map(|i| g.path(i).unwrap().name().to_owned()).collect();
    up.sort();
    assert_eq!(up, ["app", "lib", "libc", "other"]);
}

#[test]
fn invalidation_keeps_the_graph_closed() {
    let mut db = Db::open_in_memory().unwrap();
    db.register(&[info("libc", &[]), info("app", &["libc", "app"]), info("x.drv", &[])]).unwrap();
    db.register_derivation_outputs(&path("x.drv"), &BTreeMap::from([("out".to_owned(), path("x"))])).unwrap();
    let id = |db: &Db, name: &str| db.id(&path(name)).unwrap().unwrap_or(-1);
    let ids = |db: &Db, names: &[&str]| names.iter().map(|n| id(db, n)).collect::<Vec<_>>();
    // A referenced path cannot go while its referrer stays, and a refused batch changes nothing.
    let err = db.invalidate(&ids(&db, &["x.drv", "libc"])).unwrap_err();
    assert!(matches!(err, DbError::StillReferenced(ref p) if p.ends_with("-libc")), "{err}");
    assert!(db.is_valid(&path("x.drv")).unwrap() && db.is_valid(&path("libc")).unwrap());
    // Referrers first, in one batch; a self-reference does not block its own path.
    db.invalidate(&ids(&db, &["app", "libc", "x.drv", "never-valid"])).unwrap();
    assert_eq!(db.count().unwrap(), 0);
    assert!(db.derivation_outputs(&path("x.drv")).unwrap().is_empty());
    let refs: i64 = db.conn.query_row("SELECT count(*) FROM Refs", [], |r| r.get(0)).unwrap();
    assert_eq!(refs, 0);
}

#[test]
fn graph_node_removal() {
    let mut db = Db::open_in_memory().unwrap();
    db.register(&[info("libc", &[]), info("app", &["libc", "app"])]).unwrap();
    let mut g = db.load_graph().unwrap();
    let (libc, app) = (g.id(&path("libc")).unwrap(), g.id(&path("app")).unwrap());
    assert!(g.is_referenced(libc) && !g.is_referenced(app), "a self-reference does not count");
    g.remove_node(app);
    assert!(!g.is_referenced(libc));
    assert_eq!(g.id(&path("app")), None);
    assert_eq!(g.node_ids().collect::<Vec<_>>(), vec![libc]);
    let meta = db.gc_metadata().unwrap();
    assert_eq!(meta.nar_size[&libc], 8 * 4);
}

#[test]
fn a_graph_kept_in_step_has_no_difference_and_a_stale_one_is_named() {
    let mut db = Db::open_in_memory().unwrap();
    db.register(&[info("libc", &[]), info("app", &["libc", "app"])]).unwrap();
    let mut kept = db.load_graph().unwrap();
    assert_eq!(kept.difference(&db.load_graph().unwrap()), None);
    // A registration the graph followed, then one it missed.
    let ids = db.register(&[info("tool", &["libc"])]).unwrap();
    kept.insert_path(ids[0] as u32, &path("tool"), [kept.id(&path("libc")).unwrap()]);
    assert_eq!(kept.difference(&db.load_graph().unwrap()), None);
    db.register(&[info("late", &[])]).unwrap();
    let d = kept.difference(&db.load_graph().unwrap()).expect("a difference");
    assert!(d.contains("-late'") && d.contains("in the database"), "{d}");
    // A node removed from memory only.
    let mut stale = db.load_graph().unwrap();
    stale.remove_node(stale.id(&path("app")).unwrap());
    let d = stale.difference(&db.load_graph().unwrap()).expect("a difference");
    assert!(d.contains("-app'"), "{d}");
}

#[test]
fn path_from_hash_part_finds_only_that_hash() {
    let mut db = Db::open_in_memory().unwrap();
    db.register(&[info("a", &[]), info("b", &[])]).unwrap();
    let a = path("a");
    assert_eq!(db.path_from_hash_part(a.hash_part()).unwrap(), Some(a.clone()));
    // A prefix of a hash part, or a hash nobody has, finds nothing.
    assert_eq!(db.path_from_hash_part(&a.hash_part()[..31]).unwrap(), None);
    assert_eq!(db.path_from_hash_part(&"0".repeat(32)).unwrap(), None);
}

#[test]
fn a_reference_cycle_between_distinct_paths_is_refused_and_nothing_registered() {
    let mut db = Db::open_in_memory().unwrap();
    db.register(&[info("input", &[])]).unwrap();
    // a → c → b → a, as a multi-output build can produce.
    let err = db.register(&[info("a", &["c", "input"]), info("b", &["a"]), info("c", &["b", "c"])]).unwrap_err();
    assert!(matches!(err, DbError::ReferenceCycle { .. }), "{err}");
    assert!(err.to_string().starts_with("cycle detected in the references of '"), "{err}");
    for p in ["a", "b", "c"] {
        assert!(!db.is_valid(&path(p)).unwrap());
    }
    assert_eq!(db.count().unwrap(), 1);
    // Self-references and a diamond are no cycle.
    db.register(&[info("d", &["d"]), info("e", &["d"]), info("f", &["d", "e"]), info("g", &["e", "f", "g"])]).unwrap();
    assert!(db.check_integrity().unwrap().is_empty());
}

proptest::proptest! {
    /// Random batches whose paths refer to random others of the batch: registered exactly when
    /// the references (self-references aside) form no cycle, as a topological sort decides.
    #[test]
    fn a_batch_is_registered_exactly_when_it_is_acyclic(
        edges in proptest::collection::vec((0usize..6, 0usize..6), 0..10),
    ) {
        let names: Vec<String> = (0..6).map(|i| format!("p{i}")).collect();
        let refs = |i: usize| -> Vec<&str> {
            edges.iter().filter(|(a, _)| *a == i).map(|(_, b)| names[*b].as_str()).collect()
        };
        let infos: Vec<PathInfo> = (0..6).map(|i| info(&names[i], &refs(i))).collect();
        // Kahn's algorithm over the distinct-path edges.
        let mut indegree = [0usize; 6];
        let distinct: BTreeSet<(usize, usize)> = edges.iter().copied().filter(|(a, b)| a != b).collect();
        for (_, b) in &distinct {
            indegree[*b] += 1;
        }
        let mut ready: Vec<usize> = (0..6).filter(|i| indegree[*i] == 0).collect();
        let mut seen = 0;
        while let Some(n) = ready.pop() {
            seen += 1;
            for (_, b) in distinct.iter().filter(|(a, _)| *a == n) {
                indegree[*b] -= 1;
                if indegree[*b] == 0 {
                    ready.push(*b);
                }
            }
        }
        let acyclic = seen == 6;
        let mut db = Db::open_in_memory().unwrap();
        let result = db.register(&infos);
        proptest::prop_assert_eq!(result.is_ok(), acyclic, "{:?}", result.err());
        proptest::prop_assert_eq!(db.count().unwrap(), if acyclic { 6 } else { 0 });
    }
}
