//! Who may move or remove an image tag.
//!
//! A tag is a garbage-collector root (`cairn_store`'s `gcroots/oci-tags/NAME:TAG`): removing it,
//! or pointing it elsewhere, lets the next collection delete the image it named. Any allowed
//! user may add images, so without a rule any user could make another's image collectable. The
//! rule follows Nix's for GC roots, which a user may remove only if they made them:
//!
//! - a trusted user may create, move and remove any tag;
//! - any other allowed user may create a tag that does not exist yet, and may move or remove only
//!   a tag they created (pointing a tag at the image it already names changes nothing and is
//!   allowed to all, so two users pulling the same image do not collide);
//! - a tag without a recorded creator — pushed through the registry on `listen`, which knows no
//!   users, or made before cairnd recorded creators — may be moved or removed only by a trusted
//!   user through the socket.
//!
//! The creator is recorded by the daemon in `<state>/oci-tag-owners/<tag file name>` (the uid, as
//! text), beside the store's tag links rather than in them: the store keeps tags as plain root
//! symlinks and knows nothing of users. Each check and the change it allows run under one lock,
//! so two users cannot both create the same tag. The registry on `listen` is outside the rule:
//! with `accept-pushes` it has no authentication (see the config template), and a tag it moves or
//! removes loses its record.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use cairn_image::ImageError;
use cairn_nix::StorePath;
use cairn_oci::tag::ROOT_GROUP;
use cairn_oci::TagName;
use cairn_store::{LocalStore, StoreError};
use thiserror::Error;

use crate::auth::Peer;

/// The state subdirectory of creator records.
const OWNERS: &str = "oci-tag-owners";

/// Why a tag may not be changed, or could not be.
#[derive(Debug, Error)]
pub enum TagError {
    #[error("tag '{tag}' was made by {owner}: only they or a trusted user may {action} it")]
    NotYours { tag: String, owner: String, action: Action },
    #[error("tag '{tag}' has no recorded creator (the registry or an older cairnd made it): only a trusted user may {action} it")]
    Unowned { tag: String, action: Action },
    #[error("cannot record the creator of tag '{tag}' in '{}': {source}", path.display())]
    Record {
        tag: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a refused caller wanted to do to a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Move,
    Remove,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Move => "move",
            Action::Remove => "remove",
        })
    }
}

pub type Result<T> = std::result::Result<T, TagError>;

/// The creator records, and the lock under which tags change.
pub struct TagOwners {
    dir: PathBuf,
    lock: Mutex<()>,
}

/// Held while a tag is checked and changed.
pub struct Held<'a> {
    _guard: MutexGuard<'a, ()>,
}

impl TagOwners {
    /// The records under `<state>/oci-tag-owners` (made when the first is written).
    pub fn new(state_dir: &Path) -> TagOwners {
        TagOwners { dir: state_dir.join(OWNERS), lock: Mutex::new(()) }
    }

    /// Takes the lock under which tags are checked and changed (a poisoned lock is taken as is:
    /// nothing under it panics, and the records on disk are the truth).
    pub fn hold(&self) -> Held<'_> {
        Held { _guard: self.lock.lock().unwrap_or_else(PoisonError::into_inner) }
    }

    fn record_path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The uid recorded as the creator of the tag whose link is named `file`.
    fn owner(&self, file: &str) -> Option<u32> {
        std::fs::read_to_string(self.record_path(file)).ok()?.trim().parse().ok()
    }

    fn record(&self, tag: &TagName, uid: u32) -> Result<()> {
        let file = tag.file_name();
        let path = self.record_path(&file);
        let err = |source| TagError::Record { tag: tag.to_string(), path: path.clone(), source };
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        let tmp = self.dir.join(format!(".new-{}", std::process::id()));
        std::fs::write(&tmp, format!("{uid}\n")).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }

    /// Forgets the creator of the tag whose link is named `file` (the tag is gone, or the
    /// registry moved it).
    pub fn forget(&self, _held: &Held<'_>, file: &str) {
        match std::fs::remove_file(self.record_path(file)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(tag = file, "cannot remove the creator record of a tag: {e}"),
        }
    }

    /// Whether `peer` may change `tag`, which points at `current`, to point at `target` (`None`:
    /// remove it).
    fn may(&self, peer: &Peer, tag: &TagName, current: &StorePath, target: Option<&StorePath>) -> Result<()> {
        if peer.trusted || target == Some(current) {
            return Ok(());
        }
        let action = if target.is_some() { Action::Move } else { Action::Remove };
        match self.owner(&tag.file_name()) {
            Some(uid) if uid == peer.uid => Ok(()),
            Some(uid) => Err(TagError::NotYours { tag: tag.to_string(), owner: user_name(uid), action }),
            None => Err(TagError::Unowned { tag: tag.to_string(), action }),
        }
    }

    /// Checks, without changing anything, that `peer` may point `tag` at `layout` (to refuse a
    /// long operation before it starts rather than after).
    pub fn check_set(&self, store: &LocalStore, peer: &Peer, tag: &TagName, layout: &StorePath) -> Result<()> {
        let _held = self.hold();
        match store.root_link_target(ROOT_GROUP, &tag.file_name())? {
            Some(current) => self.may(peer, tag, &current, Some(layout)),
            None => Ok(()),
        }
    }

    /// Points `tag` at `layout` for `peer`: creates it (recording `peer` as its creator), or
    /// moves it if `peer` may.
    pub fn set(&self, store: &LocalStore, peer: &Peer, tag: &TagName, layout: &StorePath) -> Result<()> {
        let _held = self.hold();
        let file = tag.file_name();
        match store.root_link_target(ROOT_GROUP, &file)? {
            Some(current) if &current == layout => return Ok(()),
            Some(current) => self.may(peer, tag, &current, Some(layout))?,
            None => {}
        }
        store.set_root_link(ROOT_GROUP, &file, layout)?;
        self.record(tag, peer.uid)
    }

    /// Removes `tags` for `peer`, all or none: each must exist and be one `peer` may remove.
    /// Returns the paths they pointed at.
    pub fn remove(&self, store: &LocalStore, peer: &Peer, tags: &[TagName]) -> Result<Vec<StorePath>> {
        let held = self.hold();
        let mut current = Vec::with_capacity(tags.len());
        for t in tags {
            let Some(p) = store.root_link_target(ROOT_GROUP, &t.file_name())? else {
                return Err(ImageError::NoSuchTag(t.to_string()).into());
            };
            self.may(peer, t, &p, None)?;
            current.push(p);
        }
        for t in tags {
            store.remove_root_link(ROOT_GROUP, &t.file_name())?;
            self.forget(&held, &t.file_name());
        }
        Ok(current)
    }
}

/// A uid as the error message names it: `user 'name' (uid N)`, or `uid N` without an account.
fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("user '{}' (uid {uid})", u.name),
        _ => format!("uid {uid}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use cairn_nix::StoreDir;
    use cairn_store::StoreLayout;

    use super::*;

    fn peer(uid: u32, trusted: bool) -> Peer {
        Peer { uid, client: None, user: format!("u{uid}"), allowed: true, trusted }
    }

    #[test]
    fn users_change_only_their_own_tags_and_trusted_users_any() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(StoreLayout::under_root(dir.path(), StoreDir::new("/store").unwrap())).unwrap();
        let owners = TagOwners::new(&dir.path().join("state"));
        let a = store.add_text("image-a", b"a", &BTreeSet::new()).unwrap().path;
        let b = store.add_text("image-b", b"b", &BTreeSet::new()).unwrap().path;
        let (alice, bob, root) = (peer(4001, false), peer(4002, false), peer(0, true));
        let t = TagName::parse("app:v1").unwrap();

        owners.set(&store, &alice, &t, &a).unwrap();
        owners.set(&store, &bob, &t, &a).unwrap(); // already so: nothing changes
        let e = owners.set(&store, &bob, &t, &b).unwrap_err();
        assert!(matches!(e, TagError::NotYours { action: Action::Move, .. }), "{e}");
        assert!(owners.check_set(&store, &bob, &t, &b).is_err());
        let e = owners.remove(&store, &bob, std::slice::from_ref(&t)).unwrap_err();
        assert_eq!(e.to_string(), "tag 'app:v1' was made by uid 4001: only they or a trusted user may remove it");
        assert_eq!(store.root_link_target(ROOT_GROUP, &t.file_name()).unwrap(), Some(a.clone()));

        owners.set(&store, &alice, &t, &b).unwrap();
        assert_eq!(owners.remove(&store, &alice, std::slice::from_ref(&t)).unwrap(), vec![b.clone()]);
        assert_eq!(store.root_link_target(ROOT_GROUP, &t.file_name()).unwrap(), None);

        // A tag nobody is recorded for (the registry's): only the trusted may touch it.
        store.set_root_link(ROOT_GROUP, &t.file_name(), &a).unwrap();
        let e = owners.remove(&store, &alice, std::slice::from_ref(&t)).unwrap_err();
        assert!(matches!(e, TagError::Unowned { action: Action::Remove, .. }), "{e}");
        owners.set(&store, &root, &t, &b).unwrap();
        assert!(owners.set(&store, &alice, &t, &a).is_err(), "now root's");
        owners.remove(&store, &root, std::slice::from_ref(&t)).unwrap();

        // All or none.
        let (t1, t2) = (TagName::parse("x:1").unwrap(), TagName::parse("x:2").unwrap());
        owners.set(&store, &alice, &t1, &a).unwrap();
        owners.set(&store, &bob, &t2, &a).unwrap();
        assert!(owners.remove(&store, &alice, &[t1.clone(), t2.clone()]).is_err());
        assert_eq!(store.root_link_target(ROOT_GROUP, &t1.file_name()).unwrap(), Some(a.clone()), "nothing removed");
    }
}
