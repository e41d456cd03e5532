//! One layer's changeset applied to a directory tree, as the image spec's layer rules say, by a
//! process that trusts nothing in the tar.
//!
//! A layer is a tar of what changed: new and replaced entries, and whiteouts (`.wh.NAME`: NAME
//! of a lower layer is gone; `.wh..wh..opq`: the directory's lower contents are gone). A
//! whiteout only ever hides what *lower* layers made, so the tree remembers which paths this
//! layer has written (and their ancestors) and never removes those, whatever the order of the
//! entries. The rules that keep a hostile layer inside the tree:
//!
//! * names are relative: `./` prefixes and `.` components are fine, an absolute name or a `..`
//!   component anywhere is refused (the issue asked for absolute names to be refused, not
//!   re-rooted: no real layer builder writes them, and a silent re-rooting hides a forgery);
//! * no write, removal or hard-link lookup ever leaves the tree: parents are walked one
//!   component at a time with `symlink_metadata`, and a symlink among them is resolved as the
//!   image's own root would resolve it (umoci's and containerd's `SecureJoin`): its target read
//!   and walked in turn, an absolute one from the tree's root, `..` never above it, at most 40
//!   symlinks (a loop is refused) — so `lib/x` below `lib -> usr/lib` is written to `usr/lib/x`,
//!   and `evil/x` below `evil -> /etc` to the tree's own `etc/x`. An existing entry at the final
//!   name is removed first (a directory only when the new entry is not one), files are created
//!   with `O_EXCL`, so a symlink at the final name is replaced, never followed;
//! * a hard link names an earlier regular file of the tree, reached the same way;
//! * device nodes and fifos are dropped and setuid/setgid/sticky bits ignored (store paths hold
//!   neither), and both are counted for the report; owners, times and extended attributes are
//!   not kept either. A file is executable if any execute bit is set in the layer.
//!
//! The tree is private scratch space (mode 0700, written only by this process), so what a
//! check sees cannot change before the write it guards. Everything is created owner-writable,
//! whatever the layer says: the store makes the result read-only anyway.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tar::EntryType;

use super::resolve::{resolve, Found, Make, Stop};
use super::UnpackError;

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
/// aufs's own bookkeeping (`.wh..wh.plnk`, `.wh..wh.aufs`), skipped as Docker skips it.
const AUFS_META: &[u8] = b".wh..wh.";
const SPECIAL_BITS: u32 = 0o7000;

/// A root filesystem being built from layers.
pub(super) struct Tree {
    root: PathBuf,
    /// Device nodes and fifos left out.
    pub(super) dropped_devices: u64,
    /// Files and directories whose setuid, setgid or sticky bits were ignored.
    pub(super) dropped_special_bits: u64,
    /// Files and directories the image kept from other users (no read bit for others), which
    /// the store makes readable to everyone.
    pub(super) made_readable: u64,
}

impl Tree {
    /// A tree rooted at `root`, an existing empty directory.
    pub(super) fn new(root: PathBuf) -> Tree {
        Tree { root, dropped_devices: 0, dropped_special_bits: 0, made_readable: 0 }
    }

    /// Applies one uncompressed layer (named `label` in errors), reading `input` to its end.
    pub(super) fn apply(&mut self, label: &str, input: impl Read) -> Result<(), UnpackError> {
        let bad_tar = |source| UnpackError::BadTar { layer: label.to_owned(), source };
        let mut archive = tar::Archive::new(input);
        let mut layer = Layer { tree: self, label, touched: HashSet::new() };
        for entry in archive.entries().map_err(bad_tar)? {
            let mut entry = entry.map_err(bad_tar)?;
            layer.entry(&mut entry)?;
        }
        // The end-of-archive blocks and padding: read so that a compressed stream is checked
        // to its end (gzip's CRC) and a caller hashing the input sees all of it.
        io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(bad_tar)?;
        Ok(())
    }
}

/// The application of one layer.
struct Layer<'a> {
    tree: &'a mut Tree,
    label: &'a str,
    /// Paths (relative to the root) this layer wrote, with their ancestors: whiteouts of the
    /// same layer do not remove them.
    touched: HashSet<PathBuf>,
}

fn shown(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

fn rel_path(components: &[&[u8]]) -> PathBuf {
    components.iter().map(|c| OsStr::from_bytes(c)).collect()
}

/// Removes what is at `path` (not following a symlink there).
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether parents that are missing are created (entries) or mean "nothing to do" (whiteouts).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parents {
    Create,
    MustExist,
}

impl Layer<'_> {
    fn io(&self, op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> UnpackError {
        let path = path.to_owned();
        move |source| UnpackError::Io { op, path, source }
    }

    fn escapes(&self, entry: &[u8]) -> UnpackError {
        UnpackError::Escapes { layer: self.label.to_owned(), entry: shown(entry) }
    }

    /// The components of an entry name (empty for the root), refusing absolute names, `..`
    /// and NUL bytes.
    fn components<'n>(&self, raw: &'n [u8], entry: &[u8]) -> Result<Vec<&'n [u8]>, UnpackError> {
        if raw.starts_with(b"/") || raw.contains(&0) {
            return Err(self.escapes(entry));
        }
        let mut out = Vec::new();
        for c in raw.split(|b| *b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => return Err(self.escapes(entry)),
                c => out.push(c),
            }
        }
        Ok(out)
    }

    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let kind = e.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let raw = e.path_bytes().into_owned();
        let comps = self.components(&raw, &raw)?;
        let Some((name, parents)) = comps.split_last() else {
            // The root itself (`./`): a directory is what it already is.
            return if kind.is_dir() {
                Ok(())
            } else {
                Err(UnpackError::ReplacesRoot { layer: self.label.to_owned(), entry: shown(&raw) })
            };
        };
        if parents.iter().any(|c| c.starts_with(AUFS_META)) || (name.starts_with(AUFS_META) && *name != OPAQUE) {
            return Ok(());
        }
        if parents.iter().any(|c| c.starts_with(WHITEOUT)) {
            return Err(UnpackError::BadWhiteout { layer: self.label.to_owned(), entry: shown(&raw) });
        }
        if *name == OPAQUE {
            return self.opaque(&raw, parents);
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            return self.whiteout(&raw, parents, hidden);
        }

        let parent = self.parent_dir(&raw, parents, Parents::Create)?.expect("parents are created");
        let dest = parent.join(OsStr::from_bytes(name));
        let mode = e.header().mode().map_err(|source| UnpackError::BadTar { layer: self.label.to_owned(), source })?;
        match kind {
            EntryType::Directory => {
                self.count_mode(mode);
                self.make_dir(&dest)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.count_mode(mode);
                self.write_file(e, &dest, mode & 0o111 != 0)?;
            }
            EntryType::Symlink => {
                let target = e.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                if target.is_empty() {
                    return Err(UnpackError::EmptySymlink { layer: self.label.to_owned(), entry: shown(&raw) });
                }
                remove_any(&dest).map_err(self.io("replace", &dest))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &dest)
                    .map_err(self.io("create symlink", &dest))?;
            }
            EntryType::Link => {
                let target = e.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                self.hard_link(&raw, &dest, &target)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                // Left out; what a lower layer had at that name is replaced by nothing.
                remove_any(&dest).map_err(self.io("replace", &dest))?;
                self.tree.dropped_devices += 1;
                return Ok(());
            }
            other => {
                return Err(UnpackError::UnsupportedEntry {
                    layer: self.label.to_owned(),
                    entry: shown(&raw),
                    kind: other.as_byte() as char,
                })
            }
        }
        let written = self.relative(&dest).to_owned();
        self.touch(&written);
        Ok(())
    }

    /// Counts what an entry's `mode` loses in the store: special bits, and privacy from other
    /// users.
    fn count_mode(&mut self, mode: u32) {
        if mode & SPECIAL_BITS != 0 {
            self.tree.dropped_special_bits += 1;
        }
        if mode & 0o004 == 0 {
            self.tree.made_readable += 1;
        }
    }

    /// Marks a path of the tree (relative to its root) and its ancestors as written by this
    /// layer.
    fn touch(&mut self, rel: &Path) {
        let mut p = PathBuf::new();
        for c in rel.components() {
            p.push(c);
            self.touched.insert(p.clone());
        }
    }

    /// Where `path`, a path of the tree, is relative to its root.
    fn relative<'p>(&self, path: &'p Path) -> &'p Path {
        path.strip_prefix(&self.tree.root).unwrap_or(path)
    }

    /// The directory holding an entry: `parents` resolved as the image's own root would resolve
    /// them ([`resolve`]: a symlink on the way followed inside the tree), so that `lib/x` below
    /// `lib -> usr/lib` lands in `usr/lib`, and nothing ever lands outside. Missing directories
    /// are created (`Create`) or mean there is nothing there (`MustExist`: `None`, also for a
    /// non-directory on the way).
    fn parent_dir(&mut self, entry: &[u8], parents: &[&[u8]], how: Parents) -> Result<Option<PathBuf>, UnpackError> {
        let root = self.tree.root.clone();
        let on_disk = |w: &[Vec<u8>]| root.join(rel_path(&w.iter().map(Vec::as_slice).collect::<Vec<_>>()));
        let look = |w: &[Vec<u8>]| -> Result<Found, UnpackError> {
            let p = on_disk(w);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => Ok(Found::Dir),
                Ok(m) if m.file_type().is_symlink() => {
                    let target = fs::read_link(&p).map_err(self.io("read symlink", &p))?;
                    Ok(Found::Symlink(target.into_os_string().into_vec()))
                }
                Ok(_) => Ok(Found::Other),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Found::Missing),
                Err(e) => Err(self.io("stat", &p)(e)),
            }
        };
        let mut made = |w: &[Vec<u8>]| -> Result<(), UnpackError> {
            let p = on_disk(w);
            fs::DirBuilder::new().mode(0o755).create(&p).map_err(|source| UnpackError::Io {
                op: "create",
                path: p,
                source,
            })
        };
        let make: Make<'_, UnpackError> = if how == Parents::Create { Some(&mut made) } else { None };
        match resolve(parents, look, make) {
            Ok(found) => Ok(found.map(|w| on_disk(&w))),
            Err(Stop::Failed(e)) => Err(e),
            Err(Stop::TooMany(at)) => {
                Err(UnpackError::ThroughSymlink { layer: self.label.to_owned(), entry: shown(entry), symlink: at })
            }
            Err(Stop::NotADirectory(at)) => {
                Err(UnpackError::NotADirectory { layer: self.label.to_owned(), entry: shown(entry), parent: at })
            }
        }
    }

    fn make_dir(&self, dest: &Path) -> Result<(), UnpackError> {
        if fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir()) {
            return Ok(());
        }
        remove_any(dest).map_err(self.io("replace", dest))?;
        fs::DirBuilder::new().mode(0o755).create(dest).map_err(self.io("create", dest))
    }

    fn write_file<R: Read>(&self, e: &mut tar::Entry<'_, R>, dest: &Path, executable: bool) -> Result<(), UnpackError> {
        remove_any(dest).map_err(self.io("replace", dest))?;
        let mode = if executable { 0o755 } else { 0o644 };
        let mut f =
            OpenOptions::new().write(true).create_new(true).mode(mode).open(dest).map_err(self.io("create", dest))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match e.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(UnpackError::BadTar { layer: self.label.to_owned(), source }),
            };
            f.write_all(&buf[..n]).map_err(self.io("write", dest))?;
        }
        // Whatever the umask took away.
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(self.io("chmod", dest))
    }

    fn hard_link(&mut self, raw: &[u8], dest: &Path, target: &[u8]) -> Result<(), UnpackError> {
        let outside =
            || UnpackError::LinkOutside { layer: self.label.to_owned(), entry: shown(raw), target: shown(target) };
        let missing =
            || UnpackError::LinkMissing { layer: self.label.to_owned(), entry: shown(raw), target: shown(target) };
        if target.starts_with(b"/") || target.contains(&0) {
            return Err(outside());
        }
        let tcomps = self.components(target, raw).map_err(|_| outside())?;
        let Some((tname, tparents)) = tcomps.split_last() else { return Err(missing()) };
        let Some(dir) = self.parent_dir(raw, tparents, Parents::MustExist)? else { return Err(missing()) };
        let source = dir.join(OsStr::from_bytes(tname));
        // A regular file, or a symlink (linked itself, not followed, as umoci links it).
        if !fs::symlink_metadata(&source).is_ok_and(|m| m.is_file() || m.is_symlink()) {
            return Err(missing());
        }
        if source == dest {
            return Ok(());
        }
        if source.starts_with(dest) {
            // Replacing the entry would remove the file it links to.
            return Err(missing());
        }
        remove_any(dest).map_err(self.io("replace", dest))?;
        fs::hard_link(&source, dest).map_err(self.io("link", dest))
    }

    /// `.wh.NAME`: NAME, as lower layers made it, is gone.
    fn whiteout(&mut self, raw: &[u8], parents: &[&[u8]], hidden: &[u8]) -> Result<(), UnpackError> {
        if matches!(hidden, b"" | b"." | b"..") {
            return Err(UnpackError::BadWhiteout { layer: self.label.to_owned(), entry: shown(raw) });
        }
        let Some(dir) = self.parent_dir(raw, parents, Parents::MustExist)? else { return Ok(()) };
        let path = dir.join(OsStr::from_bytes(hidden));
        let rel = self.relative(&path).to_owned();
        self.remove_lower(&path, &rel)
    }

    /// `DIR/.wh..wh..opq`: what lower layers put in DIR is gone.
    fn opaque(&mut self, raw: &[u8], parents: &[&[u8]]) -> Result<(), UnpackError> {
        let Some(dir) = self.parent_dir(raw, parents, Parents::MustExist)? else { return Ok(()) };
        let rel = self.relative(&dir).to_owned();
        self.remove_lower_children(&dir, &rel)
    }

    /// Removes what lower layers made at `path` (relative: `rel`), keeping what this one wrote.
    fn remove_lower(&self, path: &Path, rel: &Path) -> Result<(), UnpackError> {
        let m = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io("stat", path)(e)),
        };
        if !self.touched.contains(rel) {
            return remove_any(path).map_err(self.io("remove", path));
        }
        if m.is_dir() {
            self.remove_lower_children(path, rel)?;
        }
        Ok(())
    }

    fn remove_lower_children(&self, dir: &Path, rel: &Path) -> Result<(), UnpackError> {
        let names: Vec<_> = fs::read_dir(dir)
            .and_then(|d| d.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>())
            .map_err(self.io("list", dir))?;
        for n in names {
            self.remove_lower(&dir.join(&n), &rel.join(&n))?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// A tar entry for tests; names and link targets are written as raw bytes, so that hostile
    /// ones (which `tar::Builder`'s path setters refuse) can be made too.
    pub(crate) enum E<'a> {
        File(&'a str, &'a [u8], u32),
        Dir(&'a str),
        Sym(&'a str, &'a str),
        Link(&'a str, &'a str),
        Dev(&'a str),
        Fifo(&'a str),
    }

    pub(crate) fn tar_of(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            let (name, link, kind, mode, data): (&str, &str, EntryType, u32, &[u8]) = match e {
                E::File(n, d, m) => (n, "", EntryType::Regular, *m, d),
                E::Dir(n) => (n, "", EntryType::Directory, 0o755, b""),
                E::Sym(n, t) => (n, t, EntryType::Symlink, 0o777, b""),
                E::Link(n, t) => (n, t, EntryType::Link, 0o644, b""),
                E::Dev(n) => (n, "", EntryType::Char, 0o600, b""),
                E::Fifo(n) => (n, "", EntryType::Fifo, 0o600, b""),
            };
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

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        tree: Tree,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        fs::create_dir(&root).unwrap();
        Fixture { tree: Tree::new(root.clone()), root, _dir: dir }
    }

    impl Fixture {
        fn apply(&mut self, entries: &[E]) -> Result<(), UnpackError> {
            self.tree.apply("L", &tar_of(entries)[..])
        }
        fn exists(&self, p: &str) -> bool {
            fs::symlink_metadata(self.root.join(p)).is_ok()
        }
        fn read(&self, p: &str) -> String {
            fs::read_to_string(self.root.join(p)).unwrap()
        }
        /// Every path of the tree, sorted.
        fn listing(&self) -> Vec<String> {
            fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
                for e in fs::read_dir(dir).unwrap() {
                    let p = e.unwrap().path();
                    out.push(p.strip_prefix(root).unwrap().display().to_string());
                    if fs::symlink_metadata(&p).unwrap().is_dir() {
                        walk(root, &p, out);
                    }
                }
            }
            let mut out = Vec::new();
            walk(&self.root, &self.root, &mut out);
            out.sort();
            out
        }
    }

    #[test]
    fn files_directories_symlinks_and_modes() {
        let mut f = fixture();
        f.apply(&[
            E::Dir("./"),
            E::Dir("./etc/"),
            E::File("./etc/motd", b"hello\n", 0o444),
            E::File("bin/tool", b"#!/bin/sh\n", 0o755),
            E::Sym("bin/sh", "/bin/busybox"),
            E::Dir("usr//lib/./x/"),
        ])
        .unwrap();
        assert_eq!(f.listing(), ["bin", "bin/sh", "bin/tool", "etc", "etc/motd", "usr", "usr/lib", "usr/lib/x"]);
        assert_eq!(f.read("etc/motd"), "hello\n");
        assert_eq!(fs::metadata(f.root.join("etc/motd")).unwrap().mode() & 0o777, 0o644);
        assert_eq!(fs::metadata(f.root.join("bin/tool")).unwrap().mode() & 0o777, 0o755);
        assert_eq!(fs::read_link(f.root.join("bin/sh")).unwrap(), Path::new("/bin/busybox"));
        assert_eq!((f.tree.dropped_devices, f.tree.dropped_special_bits), (0, 0));
    }

    #[test]
    fn later_layers_replace_entries_of_another_type() {
        let mut f = fixture();
        f.apply(&[E::Dir("a/"), E::File("a/x", b"1", 0o644), E::File("b", b"2", 0o644), E::Sym("c", "/etc")]).unwrap();
        f.apply(&[
            E::File("a", b"now a file", 0o644),
            E::Dir("b/"),
            E::File("b/y", b"3", 0o644),
            E::File("c", b"4", 0o644),
        ])
        .unwrap();
        assert_eq!(f.listing(), ["a", "b", "b/y", "c"]);
        assert_eq!(f.read("a"), "now a file");
        assert!(fs::symlink_metadata(f.root.join("c")).unwrap().is_file());
    }

    #[test]
    fn whiteouts_remove_lower_entries_and_never_appear() {
        let mut f = fixture();
        f.apply(&[
            E::File("etc/gone", b"x", 0o644),
            E::Dir("var/cache/"),
            E::File("var/cache/a", b"x", 0o644),
            E::File("etc/kept", b"x", 0o644),
            E::Sym("etc/link", "/nowhere"),
        ])
        .unwrap();
        f.apply(&[
            E::File("etc/.wh.gone", b"", 0o644),
            E::File("var/.wh.cache", b"", 0o644),
            E::File("etc/.wh.link", b"", 0),
        ])
        .unwrap();
        assert_eq!(f.listing(), ["etc", "etc/kept", "var"]);
        // A whiteout of something that is not there, or below a missing directory, does nothing.
        f.apply(&[E::File("etc/.wh.never", b"", 0o644), E::File("nodir/.wh.x", b"", 0o644)]).unwrap();
        assert_eq!(f.listing(), ["etc", "etc/kept", "var"]);
    }

    #[test]
    fn whiteouts_spare_what_their_own_layer_wrote() {
        let mut f = fixture();
        f.apply(&[E::Dir("d/"), E::File("d/old", b"1", 0o644), E::File("f", b"old", 0o644)]).unwrap();
        // Whiteout after the new entries of the same layer: only the lower contents go.
        f.apply(&[
            E::File("d/new", b"2", 0o644),
            E::File("f", b"new", 0o644),
            E::File(".wh.d", b"", 0),
            E::File(".wh.f", b"", 0),
        ])
        .unwrap();
        assert_eq!(f.listing(), ["d", "d/new", "f"]);
        assert_eq!(f.read("f"), "new");
    }

    #[test]
    fn opaque_directories_lose_their_lower_contents() {
        let mut f = fixture();
        f.apply(&[E::Dir("o/"), E::File("o/a", b"1", 0o644), E::Dir("o/sub/"), E::File("o/sub/b", b"2", 0o644)])
            .unwrap();
        f.apply(&[E::Dir("o/"), E::File("o/.wh..wh..opq", b"", 0), E::File("o/c", b"3", 0o644)]).unwrap();
        assert_eq!(f.listing(), ["o", "o/c"]);
        // The marker after the layer's own entries: those stay.
        f.apply(&[E::File("o/d", b"4", 0o644), E::File("o/.wh..wh..opq", b"", 0)]).unwrap();
        assert_eq!(f.listing(), ["o", "o/d"]);
        // Opaque root.
        f.apply(&[E::File("top", b"5", 0o644), E::File(".wh..wh..opq", b"", 0)]).unwrap();
        assert_eq!(f.listing(), ["top"]);
    }

    #[test]
    fn aufs_metadata_is_skipped() {
        let mut f = fixture();
        f.apply(&[
            E::Dir(".wh..wh.plnk/"),
            E::File(".wh..wh.plnk/1.2", b"x", 0o644),
            E::File("a/.wh..wh.aufs", b"", 0),
        ])
        .unwrap();
        assert!(f.listing().is_empty());
        f.apply(&[E::File("a/kept", b"", 0o644), E::File("a/.wh..wh.aufs", b"", 0)]).unwrap();
        assert_eq!(f.listing(), ["a", "a/kept"]);
    }

    #[test]
    fn bad_whiteouts_are_refused() {
        for name in [".wh..", ".wh...", ".wh.", "a/.wh.x/y", "a/.wh./b"] {
            let mut f = fixture();
            f.apply(&[E::File("keep", b"1", 0o644)]).unwrap();
            let e = f.apply(&[E::File(name, b"", 0o644)]).unwrap_err();
            assert!(matches!(e, UnpackError::BadWhiteout { .. }), "{name}: {e}");
            assert!(e.to_string().contains(name), "{e}");
            assert!(f.exists("keep"));
        }
        let mut f = fixture();
        assert!(matches!(f.apply(&[E::File(".wh.a/../..", b"", 0)]).unwrap_err(), UnpackError::Escapes { .. }));
    }

    #[test]
    fn whiteouts_through_symlinks_stay_inside_the_tree() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"x").unwrap();
        let mut f = fixture();
        f.apply(&[
            E::Sym("evil", outside.path().to_str().unwrap()),
            E::Sym("up", "../../../.."),
            E::File("usr/lib/old", b"o", 0o644),
            E::File("usr/lib/kept", b"k", 0o644),
            E::Sym("lib", "usr/lib"),
        ])
        .unwrap();
        f.apply(&[
            E::File("evil/.wh.victim", b"", 0),
            E::File("evil/.wh..wh..opq", b"", 0),
            E::File("up/.wh.victim", b"", 0),
            E::File("lib/.wh.old", b"", 0),
        ])
        .unwrap();
        assert!(outside.path().join("victim").exists());
        assert!(!f.exists("usr/lib/old") && f.exists("usr/lib/kept"));
    }

    #[test]
    fn hard_links_resolve_to_earlier_files_of_the_tree() {
        let mut f = fixture();
        f.apply(&[E::File("usr/bin/a", b"same", 0o755)]).unwrap();
        f.apply(&[
            E::File("usr/bin/b", b"other", 0o644),
            E::Link("usr/bin/c", "./usr/bin/a"),
            E::Link("d", "usr/bin/b"),
        ])
        .unwrap();
        assert_eq!(f.read("usr/bin/c"), "same");
        assert_eq!(f.read("d"), "other");
        let (a, c) = (fs::metadata(f.root.join("usr/bin/a")).unwrap(), fs::metadata(f.root.join("usr/bin/c")).unwrap());
        assert_eq!(a.ino(), c.ino());
        // Replacing the target later leaves the link with the old contents (copy-up semantics).
        f.apply(&[E::File("usr/bin/a", b"changed", 0o755)]).unwrap();
        assert_eq!(f.read("usr/bin/c"), "same");
        // A link to itself, when that file exists, changes nothing.
        f.apply(&[E::Link("d", "d")]).unwrap();
        assert_eq!(f.read("d"), "other");
    }

    #[test]
    fn hard_links_outside_or_to_nothing_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"s").unwrap();
        let abs = outside.path().join("secret").display().to_string();
        let mut f = fixture();
        f.apply(&[
            E::File("f", b"1", 0o644),
            E::Dir("dir/"),
            E::Sym("s", "f"),
            E::Sym("out", outside.path().to_str().unwrap()),
        ])
        .unwrap();
        for (target, outside_kind) in [
            ("../../etc/passwd", true),
            ("a/../../x", true),
            (abs.as_str(), true),
            ("missing", false),
            ("dir", false),
            ("", false),
        ] {
            let e = f.apply(&[E::Link("l", target)]).unwrap_err();
            if outside_kind {
                assert!(matches!(e, UnpackError::LinkOutside { .. }), "{target}: {e}");
            } else {
                assert!(matches!(e, UnpackError::LinkMissing { .. }), "{target}: {e}");
            }
            assert!(e.to_string().contains("'l'"), "{e}");
        }
        // A symlink on the way is followed inside the tree, where there is no such file.
        let e = f.apply(&[E::Link("l", "out/secret")]).unwrap_err();
        assert!(matches!(e, UnpackError::LinkMissing { .. }), "{e}");
        // A link in the same layer as an entry that comes later is not "earlier".
        let e = f.apply(&[E::Link("early", "late"), E::File("late", b"x", 0o644)]).unwrap_err();
        assert!(matches!(e, UnpackError::LinkMissing { .. }), "{e}");
        assert!(!f.exists("l") && !f.exists("early"));
        // A link to a symlink is that symlink, not what it points to (as umoci makes it).
        f.apply(&[E::Link("hs", "s")]).unwrap();
        assert_eq!(fs::read_link(f.root.join("hs")).unwrap(), Path::new("f"));
    }

    #[test]
    fn devices_fifos_and_special_bits_are_dropped_and_counted() {
        let mut f = fixture();
        f.apply(&[E::File("dev/null", b"lower", 0o644)]).unwrap();
        f.apply(&[
            E::Dev("dev/null"),
            E::Dev("dev/zero"),
            E::Fifo("run/fifo"),
            E::File("bin/su", b"x", 0o4755),
            E::File("bin/wall", b"x", 0o2755),
            E::Dir("tmp/"),
        ])
        .unwrap();
        let mut sticky = tar::Header::new_gnu();
        sticky.set_path("var/tmp/").unwrap();
        sticky.set_entry_type(EntryType::Directory);
        sticky.set_mode(0o1777);
        sticky.set_size(0);
        sticky.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&sticky, &b""[..]).unwrap();
        f.tree.apply("L", &b.into_inner().unwrap()[..]).unwrap();
        assert_eq!(f.listing(), ["bin", "bin/su", "bin/wall", "dev", "run", "tmp", "var", "var/tmp"]);
        assert_eq!(f.tree.dropped_devices, 3);
        assert_eq!(f.tree.dropped_special_bits, 3);
        assert_eq!(fs::metadata(f.root.join("bin/su")).unwrap().mode() & 0o7777, 0o755);
        assert_eq!(fs::metadata(f.root.join("var/tmp")).unwrap().mode() & 0o7000, 0);
    }

    #[test]
    fn entries_the_image_keeps_from_other_users_are_counted() {
        let mut f = fixture();
        f.apply(&[
            E::File("etc/shadow", b"x", 0o640),
            E::File("etc/passwd", b"x", 0o644),
            E::File("home/u/key", b"x", 0o600),
            E::File("bin/tool", b"x", 0o755),
        ])
        .unwrap();
        assert_eq!(f.tree.made_readable, 2, "etc/shadow and home/u/key");
    }

    #[test]
    fn entries_that_leave_the_root_are_refused_by_name() {
        for name in ["../escape", "a/../../escape", "/etc/abs", "./a/../../b", "x/.."] {
            let mut f = fixture();
            let e = f.apply(&[E::File(name, b"x", 0o644)]).unwrap_err();
            assert!(matches!(e, UnpackError::Escapes { .. }), "{name}: {e}");
            assert_eq!(e.to_string(), format!("layer L: entry '{name}' leaves the image root (absolute, or '..')"));
        }
        let mut f = fixture();
        let e = f.apply(&[E::File("./", b"x", 0o644)]).unwrap_err();
        assert!(matches!(e, UnpackError::ReplacesRoot { .. }), "{e}");
    }

    #[test]
    fn writes_through_symlinks_land_inside_the_tree() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().to_str().unwrap();
        let mut f = fixture();
        // As umoci and containerd resolve them: `lib -> usr/lib` then `lib/x` is `usr/lib/x`,
        // in one layer and across layers, through relative and absolute targets.
        f.apply(&[E::Dir("usr/lib/"), E::Sym("lib", "usr/lib"), E::File("lib/a", b"a", 0o644)]).unwrap();
        f.apply(&[E::Sym("lib64", "/usr/lib/../lib"), E::File("lib64/b", b"b", 0o644), E::Dir("lib/sub/")]).unwrap();
        assert_eq!((f.read("usr/lib/a"), f.read("usr/lib/b")), ("a".into(), "b".into()));
        assert!(fs::symlink_metadata(f.root.join("usr/lib/sub")).unwrap().is_dir());
        // A target outside the tree is taken as the image sees it, below the tree's root: an
        // absolute one from there, and `..` never above it.
        f.apply(&[
            E::Sym("evil", target),
            E::File("evil/x", b"inside", 0o644),
            E::Sym("up", "../../../../.."),
            E::File("up/y", b"inside", 0o644),
            E::Dir("evil/sub/"),
            E::Sym("evil/s", "/x"),
            E::Link("evil/h", "lib/a"),
            E::Dev("evil/d"),
        ])
        .unwrap();
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        let inside = f.root.join(target.trim_start_matches('/'));
        assert_eq!(fs::read_to_string(inside.join("x")).unwrap(), "inside");
        assert!(inside.join("sub").is_dir() && inside.join("h").is_file());
        assert_eq!(f.read("y"), "inside");
        // Symlinks that lead to each other are refused, naming the entry.
        let e = f.apply(&[E::Sym("loop-a", "loop-b"), E::Sym("loop-b", "loop-a"), E::File("loop-a/x", b"", 0o644)]);
        let e = e.unwrap_err();
        assert!(matches!(&e, UnpackError::ThroughSymlink { .. }), "{e}");
        assert!(e.to_string().contains("'loop-a/x'"), "{e}");
        // A symlink at the final name is replaced, not followed.
        fs::write(outside.path().join("file"), b"original").unwrap();
        let file = outside.path().join("file").display().to_string();
        f.apply(&[E::Sym("l", &file), E::Sym("d", target)]).unwrap();
        f.apply(&[E::File("l", b"new", 0o644), E::Dir("d/")]).unwrap();
        assert_eq!(fs::read(outside.path().join("file")).unwrap(), b"original");
        assert_eq!(f.read("l"), "new");
        assert!(fs::symlink_metadata(f.root.join("d")).unwrap().is_dir());
        // A regular file as a parent is refused.
        let e = f.apply(&[E::File("l/x", b"", 0o644)]).unwrap_err();
        assert!(matches!(e, UnpackError::NotADirectory { .. }), "{e}");
        let e = f.apply(&[E::Sym("to-file", "l"), E::File("to-file/x", b"", 0o644)]).unwrap_err();
        assert!(matches!(e, UnpackError::NotADirectory { .. }), "{e}");
    }

    #[test]
    fn garbage_is_not_a_tar() {
        let mut f = fixture();
        let e = f.tree.apply("L", &[7u8; 1024][..]).unwrap_err();
        assert!(matches!(e, UnpackError::BadTar { .. }), "{e}");
        let mut t = tar_of(&[E::File("a", b"x", 0o644)]);
        t[100] ^= 1; // the mode field: the header checksum no longer matches
        let e = f.tree.apply("L", &t[..]).unwrap_err();
        assert!(matches!(e, UnpackError::BadTar { .. }), "{e}");
        // Truncated inside a file's contents.
        let t = tar_of(&[E::File("a", &[1u8; 4000], 0o644)]);
        let e = f.tree.apply("L", &t[..2048]).unwrap_err();
        assert!(matches!(e, UnpackError::BadTar { .. }), "{e}");
    }
}
