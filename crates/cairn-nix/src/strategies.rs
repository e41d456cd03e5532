//! Proptest strategies shared by the tests of cairn's crates (feature `test-strategies`):
//! arbitrary file system trees and their NARs.

use std::collections::BTreeMap;

use proptest::prelude::*;

use crate::nar::{Limits, NarError, NarEvent, NarReader, NarWriter};

/// An in-memory file system object, ordered as a NAR orders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tree {
    File { executable: bool, contents: Vec<u8> },
    Symlink { target: Vec<u8> },
    Directory(BTreeMap<Vec<u8>, Tree>),
}

/// Entry names as Linux allows them: any bytes but `/` and NUL, not `.` or `..`; includes
/// non-UTF-8 and names whose byte order differs from a locale's collation order.
pub fn entry_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-zA-Z0-9._-]{1,12}".prop_map(String::into_bytes),
        prop::collection::vec(1u8..=255, 1..16)
            .prop_map(|v| v.into_iter().map(|b| if b == b'/' { b'x' } else { b }).collect()),
        Just("Z".into()),
        Just("a".into()),
        Just("é".into()),
    ]
    .prop_filter("reserved", |n: &Vec<u8>| n != b"." && n != b"..")
}

/// Arbitrary trees up to a few levels deep, with empty files, empty directories, executables,
/// and dangling symlinks.
pub fn tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        (any::<bool>(), prop::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(executable, contents)| Tree::File { executable, contents }),
        prop::collection::vec(1u8..=255, 1..40).prop_map(|target| Tree::Symlink { target }),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop::collection::btree_map(entry_name(), inner, 0..6).prop_map(Tree::Directory)
    })
}

impl Tree {
    /// The NAR of this tree.
    pub fn to_nar(&self) -> Vec<u8> {
        let mut w = NarWriter::new(Vec::new()).unwrap();
        self.write(&mut w, None);
        w.finish().unwrap()
    }

    fn write(&self, w: &mut NarWriter<Vec<u8>>, name: Option<&[u8]>) {
        match self {
            Tree::File { executable, contents } => {
                w.regular(name, *executable, contents.len() as u64, &mut contents.as_slice()).unwrap()
            }
            Tree::Symlink { target } => w.symlink(name, target).unwrap(),
            Tree::Directory(entries) => {
                w.begin_directory(name).unwrap();
                for (n, t) in entries {
                    t.write(w, Some(n));
                }
                w.end_directory().unwrap();
            }
        }
    }

    /// Parses a NAR into a tree.
    #[allow(clippy::type_complexity)]
    pub fn from_nar(nar: &[u8]) -> Result<Tree, NarError> {
        let mut r = NarReader::new(nar, Limits::default())?;
        let mut stack: Vec<(Option<Vec<u8>>, BTreeMap<Vec<u8>, Tree>)> = Vec::new();
        let mut root = None;
        let mut place = |stack: &mut Vec<(Option<Vec<u8>>, BTreeMap<Vec<u8>, Tree>)>,
                         name: Option<Vec<u8>>,
                         t: Tree| match stack.last_mut() {
            Some((_, entries)) => {
                entries.insert(name.expect("entries have names"), t);
            }
            None => root = Some(t),
        };
        while let Some(ev) = r.next_event()? {
            match ev {
                NarEvent::Regular { name, executable, size } => {
                    let mut contents = Vec::with_capacity(size as usize);
                    r.copy_contents(&mut contents, &mut [0u8; 64])?;
                    place(&mut stack, name, Tree::File { executable, contents });
                }
                NarEvent::Symlink { name, target } => place(&mut stack, name, Tree::Symlink { target }),
                NarEvent::Directory { name } => stack.push((name, BTreeMap::new())),
                NarEvent::EndDirectory => {
                    let (name, entries) = stack.pop().expect("balanced");
                    place(&mut stack, name, Tree::Directory(entries));
                }
            }
        }
        Ok(root.expect("a complete NAR has a root"))
    }
}
