//! Who may move or remove an image tag (regression test: an unprivileged user removed another
//! user's tag, and the next collection deleted the image). Trusted users may change any tag;
//! others may create tags and change only those they made. Switching users needs root and
//! `setpriv`; the test skips otherwise.

use cairn_tests::TestStore;

const NOBODY: u32 = 65534;
const OTHER: u32 = 65533;

fn ok_as(st: &TestStore, uid: u32, args: &[&str]) {
    let out = st.run_as(uid, args, b"");
    assert!(out.status.success(), "uid {uid} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The one-line error of a refused command.
fn refused_as(st: &TestStore, uid: u32, args: &[&str]) -> String {
    let out = st.run_as(uid, args, b"");
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "uid {uid} {args:?} should fail: {e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e}");
    e.trim_end().to_owned()
}

fn tags(st: &TestStore) -> String {
    st.ok(&["image", "ls"])
}

#[test]
fn an_untrusted_user_moves_or_removes_only_the_tags_they_made() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: switching users needs root");
        return;
    }
    if !cairn_tests::require_peer("setpriv") {
        return;
    }
    let st = TestStore::start();
    let mut closures = Vec::new();
    for name in ["a", "b"] {
        let f = st.root.path().join(name);
        std::fs::write(&f, name).unwrap();
        closures.push(st.ok(&["add", f.to_str().unwrap()]).trim().to_owned());
    }
    st.ok(&["image", "build", "--closure", &closures[0], "--tag", "root/app:1"]);
    st.ok(&["image", "build", "--closure", &closures[1], "--tag", "root/other:1"]);

    // nobody makes a tag of its own, and may move it.
    ok_as(&st, NOBODY, &["image", "tag", "root/app:1", "nobody/app:1"]);
    ok_as(&st, NOBODY, &["image", "tag", "root/other:1", "nobody/app:1"]);
    // Pointing root's tag at the image it already names changes nothing, and is allowed.
    ok_as(&st, NOBODY, &["image", "tag", "root/app:1", "root/app:1"]);

    // nobody may neither remove nor move root's tag…
    let e = refused_as(&st, NOBODY, &["image", "untag", "root/app:1"]);
    assert_eq!(e, "cairn: tag 'root/app:1' was made by user 'root' (uid 0): only they or a trusted user may remove it");
    let e = refused_as(&st, NOBODY, &["image", "tag", "root/other:1", "root/app:1"]);
    assert!(e.ends_with("only they or a trusted user may move it"), "{e}");
    // …and another unprivileged user may not touch nobody's.
    let e = refused_as(&st, OTHER, &["image", "untag", "nobody/app:1"]);
    assert!(e.contains("tag 'nobody/app:1' was made by user 'nobody' (uid 65534)"), "{e}");
    // An untag of several tags is all or nothing.
    refused_as(&st, NOBODY, &["image", "untag", "nobody/app:1", "root/app:1"]);
    assert!(tags(&st).contains("nobody/app:1"), "{}", tags(&st));

    // What nobody could not untag survives a collection.
    st.ok(&["gc"]);
    let ls = tags(&st);
    assert!(ls.contains("root/app:1") && ls.contains("root/other:1"), "{ls}");

    // nobody removes its own tag; root removes anyone's.
    ok_as(&st, NOBODY, &["image", "untag", "nobody/app:1"]);
    ok_as(&st, NOBODY, &["image", "tag", "root/app:1", "nobody/app:2"]);
    st.ok(&["image", "untag", "nobody/app:2", "root/other:1"]);
    // A tag made again by someone else belongs to them.
    ok_as(&st, OTHER, &["image", "tag", "root/app:1", "nobody/app:1"]);
    refused_as(&st, NOBODY, &["image", "untag", "nobody/app:1"]);
    ok_as(&st, OTHER, &["image", "untag", "nobody/app:1"]);
    let ls = tags(&st);
    assert!(ls.contains("root/app:1") && !ls.contains("nobody/") && !ls.contains("root/other"), "{ls}");
}
