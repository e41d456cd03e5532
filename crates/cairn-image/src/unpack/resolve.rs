//! One entry's directory resolved as the image's own root would resolve it — umoci's and
//! containerd's `SecureJoin` — for both trees an image's layers are applied to: the scratch
//! directory of `unpack` (`layer.rs`) and the index of `squash`.
//!
//! The components are walked from the root one at a time. A symlink among them is replaced by
//! its target, walked in turn: an absolute target from the root, `..` never above it. So
//! `lib/x` below `lib -> usr/lib` is `usr/lib/x`, and `evil/x` below `evil -> /etc` is the
//! tree's own `etc/x`: the result only ever holds plain components, each found to be a
//! directory (or made one), and cannot name anything outside the tree. A walk is bounded by
//! [`MAX_SYMLINKS`] symlinks and [`MAX_STEPS`] components, so that a loop, or a layer of
//! symlinks to long paths, cannot make one entry a walk of millions of steps.

use super::{MAX_STEPS, MAX_SYMLINKS};

/// What makes a missing directory at a path of the tree (its components from the root).
pub(crate) type Make<'m, E> = Option<&'m mut dyn FnMut(&[Vec<u8>]) -> Result<(), E>>;

/// What is at a path of the tree (its components from the root).
pub(crate) enum Found {
    Dir,
    /// A symlink, with its target.
    Symlink(Vec<u8>),
    /// Anything else: not a directory.
    Other,
    Missing,
}

/// Why a walk stopped, at the path (relative, `/`-joined) where it did.
pub(crate) enum Stop<E> {
    /// More than [`MAX_SYMLINKS`] symlinks, or [`MAX_STEPS`] components.
    TooMany(String),
    /// Something that is not a directory, where a directory was to be made.
    NotADirectory(String),
    /// `look` or `make` failed.
    Failed(E),
}

/// The components of the directory `parents` names. `look` says what is at a path; `make`
/// makes a directory where there is none (without it, a missing or non-directory component
/// means there is no such directory: `None`).
pub(crate) fn resolve<E>(
    parents: &[&[u8]],
    mut look: impl FnMut(&[Vec<u8>]) -> Result<Found, E>,
    mut make: Make<'_, E>,
) -> Result<Option<Vec<Vec<u8>>>, Stop<E>> {
    // Components still to walk, the next one last; and the resolved path so far.
    let mut todo: Vec<Vec<u8>> = parents.iter().rev().map(|c| c.to_vec()).collect();
    let mut walked: Vec<Vec<u8>> = Vec::new();
    let (mut followed, mut steps) = (0, 0);
    let at = |w: &[Vec<u8>]| String::from_utf8_lossy(&w.join(&b'/')).into_owned();
    while let Some(c) = todo.pop() {
        steps += 1;
        if steps > MAX_STEPS {
            return Err(Stop::TooMany(at(&walked)));
        }
        match c.as_slice() {
            b"" | b"." => continue,
            b".." => {
                walked.pop();
                continue;
            }
            _ => {}
        }
        walked.push(c);
        match look(&walked).map_err(Stop::Failed)? {
            Found::Dir => {}
            Found::Symlink(target) => {
                followed += 1;
                if followed > MAX_SYMLINKS {
                    return Err(Stop::TooMany(at(&walked)));
                }
                walked.pop();
                if target.starts_with(b"/") {
                    walked.clear();
                }
                todo.extend(target.split(|b| *b == b'/').rev().map(<[u8]>::to_vec));
            }
            Found::Other => match make {
                None => return Ok(None),
                Some(_) => return Err(Stop::NotADirectory(at(&walked))),
            },
            Found::Missing => match make.as_deref_mut() {
                None => return Ok(None),
                Some(make) => make(&walked).map_err(Stop::Failed)?,
            },
        }
    }
    Ok(Some(walked))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A tree as a map from `/`-joined paths to what is there.
    fn walk(tree: &BTreeMap<&str, Option<&str>>, parents: &str, create: bool) -> Result<Option<String>, String> {
        let comps: Vec<&[u8]> = parents.split('/').map(str::as_bytes).collect();
        let look = |w: &[Vec<u8>]| -> Result<Found, ()> {
            let k = String::from_utf8(w.join(&b'/')).unwrap();
            Ok(match tree.get(k.as_str()) {
                Some(None) => Found::Dir,
                Some(Some("FILE")) => Found::Other,
                Some(Some(t)) => Found::Symlink(t.as_bytes().to_vec()),
                None => Found::Missing,
            })
        };
        let mut mk = |_: &[Vec<u8>]| -> Result<(), ()> { Ok(()) };
        let make: Make<'_, ()> = if create { Some(&mut mk) } else { None };
        let r = resolve(&comps, look, make);
        match r {
            Ok(w) => Ok(w.map(|w| String::from_utf8(w.join(&b'/')).unwrap())),
            Err(Stop::TooMany(at)) => Err(format!("too many at {at}")),
            Err(Stop::NotADirectory(at)) => Err(format!("not a directory at {at}")),
            Err(Stop::Failed(())) => Err("failed".into()),
        }
    }

    #[test]
    fn symlinks_are_followed_inside_the_tree_and_never_above_its_root() {
        let tree: BTreeMap<&str, Option<&str>> = BTreeMap::from([
            ("usr", None),
            ("etc", None),
            ("usr/lib", None),
            ("lib", Some("usr/lib")),
            ("lib64", Some("/usr/lib/../lib")),
            ("up", Some("../../../..")),
            ("abs", Some("/etc/..//usr/./lib")),
            ("slashes", Some("///")),
            ("loop-a", Some("loop-b")),
            ("loop-b", Some("/loop-a")),
            ("f", Some("FILE")),
            ("to-file", Some("f")),
        ]);
        let ok = |p: &str| walk(&tree, p, false);
        assert_eq!(ok("lib"), Ok(Some("usr/lib".into())));
        assert_eq!(ok("lib64"), Ok(Some("usr/lib".into())));
        assert_eq!(ok("up"), Ok(Some(String::new())));
        assert_eq!(ok("up/usr/lib"), Ok(Some("usr/lib".into())));
        assert_eq!(ok("abs"), Ok(Some("usr/lib".into())));
        assert_eq!(ok("slashes"), Ok(Some(String::new())));
        assert_eq!(ok("lib/missing"), Ok(None));
        assert_eq!(ok("to-file"), Ok(None));
        assert_eq!(ok("loop-a"), Err("too many at loop-a".into()));
        assert_eq!(walk(&tree, "to-file/x", true), Err("not a directory at f".into()));
        assert_eq!(walk(&tree, "lib/new/deeper", true), Ok(Some("usr/lib/new/deeper".into())));
    }
}
