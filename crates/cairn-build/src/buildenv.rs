//! `builtin:buildenv`: the builder of the `user-environment` derivations that `nix-env -i`,
//! `nix-env -e`, `nix-env --set-flag` and friends make for profiles, run in the daemon as Nix 2.8
//! runs it (`libstore/builtins/buildenv.cc`; the derivation itself comes from
//! `nix-env/buildenv.nix`).
//!
//! **The derivation.** Its env names the `manifest` (a store path of the text file
//! `env-manifest.nix`, linked as `$out/manifest.nix` so the next `nix-env` can read what is
//! installed) and `derivations`, the packages as one whitespace-separated list of groups
//! `ACTIVE PRIORITY N PATH1 … PATHN`: one group per installed package, its `meta.active`
//! (anything but `false` counts as active), its `meta.priority` (default 5; read like C's
//! `stoi`, so `"2x"` is 2) and the store paths of its `N` installed outputs. [`packages`]
//! turns that back into a list of [`Package`]s.
//!
//! **The tree.** [`build`] makes `$out` a forest of symlinks into the packages:
//! - active packages are linked in order of priority (lower number first), then path; a package
//!   path seen before is not linked again;
//! - an entry of a package is linked as a whole (`$out/bin -> /nix/store/…-a/bin`) until a
//!   second package brings a directory of the same name; that link then becomes a real directory
//!   holding links to the children of the old link's *canonical* target, and then to the new
//!   package's children, and so on down;
//! - two non-directories at one place: the lower priority number wins; equal numbers are an
//!   error (2.8 has no exception for links to the same file); a directory meeting a
//!   non-directory is an error, whatever the priorities, except that a file with a lower number
//!   replaces a plain link to a directory;
//! - names starting with `.` are never linked, nor entries whose path ends in
//!   `/propagated-build-inputs`, `/nix-support`, `/perllocal.pod`, `/info/dir`, `/log`,
//!   `/manifest.nix` or `/manifest.json`; entries that cannot be followed (dangling symlinks) are
//!   skipped with a warning, as is a package that is not a directory;
//! - each linked package's `nix-support/propagated-user-env-packages` names more store paths
//!   (separated by spaces or newlines); they are linked after all explicit packages, round by
//!   round, in path order, with priorities 1000, 1001, … so they lose most collisions.
//!
//! **Logical and host paths.** Symlinks in `$out` and the paths in messages are *logical* store
//! paths (`/nix/store/…`), as a build sees them; the files themselves may live elsewhere on the
//! host (cairn's store directory need not be `/nix/store`). Every lookup therefore follows
//! symlinks by hand, component by component, and reads a store object through
//! [`StoreView::real`]. This is also what Nix's sandbox gives the builder: only store paths are
//! visible, so a link leading outside the store (`/etc/…`, `/run/…`) counts as dangling, and the
//! daemon (often root) never lists or stats host files on a package's behalf. The store
//! directory and its ancestors are walked through but never listed.
//!
//! The result is byte-for-byte Nix's tree: same links, same targets, same real directories
//! (their modes are canonicalised on registration anyway). Entries are visited in name order
//! rather than `readdir` order, which changes only which of several errors is reported.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// The builder name this module serves.
pub const BUILDENV: &str = "builtin:buildenv";

/// Paths never linked into an environment, matched at the end of the source path: useless in a
/// profile, or bound to collide between packages (each Perl package's `perllocal.pod`, each
/// Texinfo package's `info/dir`).
const SKIPPED_SUFFIXES: [&[u8]; 7] = [
    b"/propagated-build-inputs",
    b"/nix-support",
    b"/perllocal.pod",
    b"/info/dir",
    b"/log",
    b"/manifest.nix",
    b"/manifest.json",
];

/// The file, inside a package, naming packages to install along with it.
const PROPAGATED: &[u8] = b"/nix-support/propagated-user-env-packages";

/// The priority of the first propagated package; each next one gets one more.
const FIRST_PROPAGATED_PRIORITY: i32 = 1000;

/// Symlinks followed when testing whether an entry exists (the kernel's limit for `stat`).
const MAX_STAT_FOLLOWS: u32 = 40;

/// Symlinks followed when canonicalising the target of a link being expanded (Nix's
/// `canonPath` limit).
const MAX_CANON_FOLLOWS: u32 = 1024;

/// Why an environment could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildEnvError {
    /// The derivation lacks an attribute the builder needs.
    #[error("attribute '{0}' missing")]
    MissingAttr(&'static str),
    /// `derivations` stops inside a group (Nix reads past the end of its list here).
    #[error("attribute 'derivations' ends in the middle of a package group")]
    Truncated,
    /// A priority or output count in `derivations` is not an `int`.
    #[error("attribute 'derivations' has an invalid {field} '{value}'")]
    BadNumber { field: &'static str, value: String },
    /// A package path, or a path one leads to, is relative.
    #[error("not an absolute path: '{0}'")]
    NotAbsolute(String),
    /// Following the symlinks of a path never ends.
    #[error("getting status of '{0}': Too many levels of symbolic links")]
    SymlinkLoop(String),
    /// A directory meets a link to something that is not a directory.
    #[error("collision between '{src}' and non-directory '{target}'")]
    DirOverNonDir { src: String, target: String },
    /// Two non-directories of the same priority want the same place.
    #[error(
        "packages '{src}' and '{existing}' have the same priority {priority}; use 'nix-env --set-flag priority NUMBER INSTALLED_PKGNAME' to change the priority of one of the conflicting packages (0 being the highest priority)"
    )]
    SamePriority { src: String, existing: String, priority: i32 },
    /// A non-directory meets a directory already merged from several packages.
    #[error("collision between non-directory '{src}' and directory '{dst}'")]
    FileOverDir { src: String, dst: String },
    /// Making a link failed.
    #[error("creating symlink from '{link}' to '{target}': {source}")]
    Symlink {
        link: String,
        target: String,
        #[source]
        source: io::Error,
    },
    /// Another file-system operation failed.
    #[error("{op} '{path}': {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// One store path to link, from a group of `derivations` or propagated by another package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    /// The logical store path (an output of an installed derivation).
    pub path: String,
    /// Whether to link it at all (`meta.active`, switched by `nix-env --set-flag active false`).
    pub active: bool,
    /// Its priority: in a collision of files, the lower number wins.
    pub priority: i32,
}

/// How the builder sees the store: logical paths and where their files are.
#[derive(Clone, Copy)]
pub struct StoreView<'a> {
    /// The logical store directory, e.g. `/nix/store` (no trailing slash).
    pub dir: &'a str,
    /// Maps a logical store path (`<dir>/<name>`, never a path inside one) to the host path of
    /// that store object. The object is read with `lstat`, so a store path that is itself a
    /// symlink is followed logically.
    pub real: &'a dyn Fn(&str) -> PathBuf,
}

/// The environment to make.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Where to make it on the host; created if missing.
    pub host: &'a Path,
    /// The output's logical store path, used only in messages (as Nix's name the output).
    pub logical: &'a str,
}

/// What a successful build reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Links made into packages (the `manifest.nix` link not counted), as Nix's debug line counts.
    pub symlinks: u64,
    /// Warnings for the build log, without a `warning: ` prefix.
    pub warnings: Vec<String>,
}

/// Parses the derivation's `derivations` attribute into the packages to link, in the order
/// given (the caller need not sort them; [`build`] does).
pub fn packages(env: &BTreeMap<String, String>) -> Result<Vec<Package>, BuildEnvError> {
    let list = env.get("derivations").ok_or(BuildEnvError::MissingAttr("derivations"))?;
    let mut words = list.split([' ', '\t', '\n', '\r']).filter(|w| !w.is_empty());
    let mut found = Vec::new();
    while let Some(active) = words.next() {
        let priority = stoi(words.next().ok_or(BuildEnvError::Truncated)?, "priority")?;
        let outputs = stoi(words.next().ok_or(BuildEnvError::Truncated)?, "output count")?;
        for _ in 0..outputs.max(0) {
            let path = words.next().ok_or(BuildEnvError::Truncated)?;
            found.push(Package { path: path.to_owned(), active: active != "false", priority });
        }
    }
    Ok(found)
}

/// The derivation's `manifest` attribute: the store path to link as `$out/manifest.nix`.
pub fn manifest(env: &BTreeMap<String, String>) -> Result<&str, BuildEnvError> {
    env.get("manifest").map(String::as_str).ok_or(BuildEnvError::MissingAttr("manifest"))
}

/// Makes the environment of `packages` at `out`, then links `manifest` (when given) as
/// `manifest.nix` in it. See the module documentation for the rules.
pub fn build(
    out: &Target<'_>,
    packages: &[Package],
    manifest: Option<&str>,
    store: &StoreView<'_>,
) -> Result<Summary, BuildEnvError> {
    std::fs::create_dir_all(out.host).map_err(|e| io_error("creating directory", out.logical.as_bytes(), e))?;
    let mut linker = Linker {
        fs: Resolver { store_dir: store.dir.trim_end_matches('/'), real: store.real },
        out: *out,
        priorities: HashMap::new(),
        done: BTreeSet::new(),
        postponed: BTreeSet::new(),
        summary: Summary::default(),
    };

    let mut explicit: Vec<&Package> = packages.iter().filter(|p| p.active).collect();
    explicit.sort_by(|a, b| a.priority.cmp(&b.priority).then_with(|| a.path.cmp(&b.path)));
    for p in explicit {
        linker.add_package(p.path.as_bytes(), p.priority)?;
    }

    // Packages wanted by others come last, so that they lose collisions with explicit ones.
    let mut priority = FIRST_PROPAGATED_PRIORITY;
    while !linker.postponed.is_empty() {
        for path in std::mem::take(&mut linker.postponed) {
            linker.add_package(&path, priority)?;
            priority = priority.saturating_add(1);
        }
    }
    tracing::debug!("created {} symlinks in user environment", linker.summary.symlinks);

    if let Some(m) = manifest {
        let link = out.host.join("manifest.nix");
        std::os::unix::fs::symlink(m, &link).map_err(|source| BuildEnvError::Symlink {
            link: format!("{}/manifest.nix", out.logical),
            target: m.to_owned(),
            source,
        })?;
    }
    Ok(linker.summary)
}

/// Reads an `int` as C++'s `std::stoi` does: optional leading space and sign, then at least one
/// digit; whatever follows the digits is ignored.
fn stoi(word: &str, field: &'static str) -> Result<i32, BuildEnvError> {
    let bad = || BuildEnvError::BadNumber { field, value: word.to_owned() };
    let s = word.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let len = digits.bytes().take_while(u8::is_ascii_digit).count();
    if len == 0 {
        return Err(bad());
    }
    let mut n: i64 = 0;
    for b in digits[..len].bytes() {
        n = n.checked_mul(10).and_then(|n| n.checked_add(i64::from(b - b'0'))).ok_or_else(bad)?;
    }
    i32::try_from(if negative { -n } else { n }).map_err(|_| bad())
}

/// The link-making state of one build.
struct Linker<'a> {
    fs: Resolver<'a>,
    out: Target<'a>,
    /// The priority of each link made, by its host path.
    priorities: HashMap<PathBuf, i32>,
    /// Package paths already linked.
    done: BTreeSet<Vec<u8>>,
    /// Propagated package paths waiting for the next round.
    postponed: BTreeSet<Vec<u8>>,
    summary: Summary,
}

impl Linker<'_> {
    /// Links one package (unless linked before) and notes the packages it propagates.
    fn add_package(&mut self, path: &[u8], priority: i32) -> Result<(), BuildEnvError> {
        if !self.done.insert(path.to_vec()) {
            return Ok(());
        }
        let out = self.out;
        self.link_children(path, out.host, out.logical.as_bytes(), priority)?;

        let file = [path, PROPAGATED].concat();
        match self.fs.resolve(&file, MAX_STAT_FOLLOWS)? {
            Resolved::Absent { .. } => {}
            Resolved::File { host, .. } => {
                let text = std::fs::read(&host).map_err(|e| io_error("reading file", &file, e))?;
                for word in text.split(|&b| b == b' ' || b == b'\n').filter(|w| !w.is_empty()) {
                    if !self.done.contains(word) {
                        self.postponed.insert(word.to_vec());
                    }
                }
            }
            Resolved::Dir { .. } => {
                let e = io::Error::from_raw_os_error(nix::libc::EISDIR);
                return Err(io_error("reading file", &file, e));
            }
        }
        Ok(())
    }

    /// Links the children of the logical directory `src_dir` into the host directory `dst_dir`
    /// (shown as `dst_shown`), merging with what is there.
    fn link_children(
        &mut self,
        src_dir: &[u8],
        dst_dir: &Path,
        dst_shown: &[u8],
        priority: i32,
    ) -> Result<(), BuildEnvError> {
        let Some(names) = self.list(src_dir)? else {
            self.summary.warnings.push(format!(
                "not including '{}' in the user environment because it's not a directory",
                show(src_dir)
            ));
            return Ok(());
        };
        for name in names {
            if name.first() == Some(&b'.') {
                continue;
            }
            let src = join(src_dir, &name);
            let dst = dst_dir.join(OsStr::from_bytes(&name));
            let shown = join(dst_shown, &name);

            let src_is_dir = match self.fs.resolve(&src, MAX_STAT_FOLLOWS)? {
                Resolved::Absent { .. } => {
                    self.summary.warnings.push(format!("skipping dangling symlink '{}'", show(&shown)));
                    continue;
                }
                Resolved::Dir { .. } => true,
                Resolved::File { .. } => false,
            };
            if SKIPPED_SUFFIXES.iter().any(|s| src.ends_with(s)) {
                continue;
            }

            let existing = match std::fs::symlink_metadata(&dst) {
                Ok(m) => Some(m.file_type()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_error("getting status of", &shown, e)),
            };
            match existing {
                Some(t) if src_is_dir && t.is_dir() => {
                    self.link_children(&src, &dst, &shown, priority)?;
                    continue;
                }
                Some(t) if src_is_dir && t.is_symlink() => {
                    // Expand the link into a directory of links to what it pointed at.
                    let old = read_link(&dst, &shown)?;
                    let target = match self.fs.resolve(&old, MAX_CANON_FOLLOWS)? {
                        Resolved::Dir { path, .. } => path,
                        Resolved::File { path, .. } => {
                            return Err(BuildEnvError::DirOverNonDir { src: show(&src), target: show(&path) })
                        }
                        Resolved::Absent { .. } => {
                            let e = io::Error::from_raw_os_error(nix::libc::ENOENT);
                            return Err(io_error("getting status of", &old, e));
                        }
                    };
                    std::fs::remove_file(&dst).map_err(|e| io_error("unlinking", &shown, e))?;
                    std::fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&dst)
                        .map_err(|e| io_error("creating directory", &shown, e))?;
                    let old_priority = self.priorities.get(&dst).copied().unwrap_or(0);
                    self.link_children(&target, &dst, &shown, old_priority)?;
                    self.link_children(&src, &dst, &shown, priority)?;
                    continue;
                }
                Some(t) if !src_is_dir && t.is_symlink() => {
                    let old_priority = self.priorities.get(&dst).copied().unwrap_or(0);
                    if old_priority == priority {
                        let existing = show(&read_link(&dst, &shown)?);
                        return Err(BuildEnvError::SamePriority { src: show(&src), existing, priority });
                    }
                    if old_priority < priority {
                        continue;
                    }
                    std::fs::remove_file(&dst).map_err(|e| io_error("unlinking", &shown, e))?;
                }
                Some(t) if !src_is_dir && t.is_dir() => {
                    return Err(BuildEnvError::FileOverDir { src: show(&src), dst: show(&shown) });
                }
                // Nothing there yet (anything else makes the link fail, as in Nix).
                _ => {}
            }

            std::os::unix::fs::symlink(OsStr::from_bytes(&src), &dst).map_err(|source| BuildEnvError::Symlink {
                link: show(&shown),
                target: show(&src),
                source,
            })?;
            self.priorities.insert(dst, priority);
            self.summary.symlinks += 1;
        }
        Ok(())
    }

    /// The names in a logical directory, sorted; `None` if it is not a directory.
    fn list(&self, dir: &[u8]) -> Result<Option<Vec<Vec<u8>>>, BuildEnvError> {
        let host = match self.fs.resolve(dir, MAX_STAT_FOLLOWS)? {
            Resolved::Dir { host: Some(host), .. } => host,
            Resolved::File { .. } | Resolved::Absent { not_dir: true } => return Ok(None),
            Resolved::Absent { not_dir: false } => {
                let e = io::Error::from_raw_os_error(nix::libc::ENOENT);
                return Err(io_error("opening directory", dir, e));
            }
            // The store directory or above: not the builder's to list.
            Resolved::Dir { host: None, .. } => {
                let e = io::Error::from_raw_os_error(nix::libc::EACCES);
                return Err(io_error("opening directory", dir, e));
            }
        };
        let reading = |e| io_error("reading directory", dir, e);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&host).map_err(|e| io_error("opening directory", dir, e))? {
            names.push(entry.map_err(reading)?.file_name().into_vec());
        }
        names.sort();
        Ok(Some(names))
    }
}

/// What one logical path names, its last component not followed.
enum Node {
    /// A directory; no host path for the root, the store directory and the directories
    /// between them, which are walked through but never listed.
    Dir(Option<PathBuf>),
    /// Anything that is neither a directory nor a symlink.
    File(PathBuf),
    /// A symlink, with its target.
    Link(Vec<u8>),
    /// Nothing: `not_dir` when a parent is not a directory (`ENOTDIR`), else missing (`ENOENT`).
    Absent { not_dir: bool },
}

/// Where a logical path leads once every symlink on the way is followed.
enum Resolved {
    /// A directory, with its canonical logical path.
    Dir { path: Vec<u8>, host: Option<PathBuf> },
    /// A non-directory, with its canonical logical path.
    File { path: Vec<u8>, host: PathBuf },
    /// Nothing (a dangling link, a missing entry, or a path outside the store).
    Absent { not_dir: bool },
}

/// Follows logical paths through the store as the sandboxed builder would see it.
struct Resolver<'a> {
    store_dir: &'a str,
    real: &'a dyn Fn(&str) -> PathBuf,
}

impl Resolver<'_> {
    /// Looks at a canonical logical path (one with no symlink, `.` or `..` before its last
    /// component) without following its last component.
    fn lstat(&self, path: &[u8]) -> Result<Node, BuildEnvError> {
        let dir = self.store_dir.as_bytes();
        let above_store = dir.starts_with(path) && (path.len() == dir.len() || dir.get(path.len()) == Some(&b'/'));
        if path.is_empty() || path == b"/" || above_store {
            return Ok(Node::Dir(None));
        }
        let Some(inside) = path.strip_prefix(dir).and_then(|r| r.strip_prefix(b"/")) else {
            return Ok(Node::Absent { not_dir: false });
        };
        let (name, rest) = match inside.iter().position(|&b| b == b'/') {
            Some(i) => (&inside[..i], &inside[i + 1..]),
            None => (inside, &[][..]),
        };
        // Only a store path's own name leads to the host (never `..` out of the store).
        let Ok(name) = std::str::from_utf8(name) else {
            return Ok(Node::Absent { not_dir: false });
        };
        if name.is_empty() || name == "." || name == ".." {
            return Ok(Node::Absent { not_dir: false });
        }
        let store_path = format!("{}/{name}", self.store_dir);
        let mut host = (self.real)(store_path.as_str());
        if !rest.is_empty() {
            host.push(OsStr::from_bytes(rest));
        }
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => Ok(Node::Link(read_link(&host, path)?)),
            Ok(m) if m.is_dir() => Ok(Node::Dir(Some(host))),
            Ok(_) => Ok(Node::File(host)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Node::Absent { not_dir: false }),
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => Ok(Node::Absent { not_dir: true }),
            Err(e) => Err(io_error("getting status of", path, e)),
        }
    }

    /// Follows `path` to what it names, resolving every symlink (relative ones against their
    /// directory, `..` after the symlinks before it), giving up after `max_follows` links.
    fn resolve(&self, path: &[u8], max_follows: u32) -> Result<Resolved, BuildEnvError> {
        if path.first() != Some(&b'/') {
            return Err(BuildEnvError::NotAbsolute(show(path)));
        }
        let mut done: Vec<u8> = Vec::new();
        let mut todo: Vec<u8> = path.to_vec();
        let mut at = 0;
        let mut follows = 0;
        let mut done_is_dir = true;
        loop {
            while todo.get(at) == Some(&b'/') {
                at += 1;
            }
            if at >= todo.len() {
                break;
            }
            if !done_is_dir {
                return Ok(Resolved::Absent { not_dir: true });
            }
            let end = todo[at..].iter().position(|&b| b == b'/').map_or(todo.len(), |i| at + i);
            let component = todo[at..end].to_vec();
            at = end;
            if component == b"." {
                continue;
            }
            if component == b".." {
                truncate_to_parent(&mut done);
                continue;
            }
            done.push(b'/');
            done.extend_from_slice(&component);
            match self.lstat(&done)? {
                Node::Link(target) => {
                    follows += 1;
                    if follows > max_follows {
                        return Err(BuildEnvError::SymlinkLoop(show(path)));
                    }
                    let mut next = target;
                    next.extend_from_slice(&todo[at..]);
                    todo = next;
                    at = 0;
                    if todo.first() == Some(&b'/') {
                        done.clear();
                    } else {
                        truncate_to_parent(&mut done);
                    }
                }
                Node::Dir(_) => done_is_dir = true,
                Node::File(_) => done_is_dir = false,
                Node::Absent { not_dir } => return Ok(Resolved::Absent { not_dir }),
            }
        }
        if done.is_empty() {
            done.push(b'/');
        }
        Ok(match self.lstat(&done)? {
            Node::Dir(host) => Resolved::Dir { path: done, host },
            Node::File(host) => Resolved::File { path: done, host },
            // Only if the store changed under us between two looks.
            Node::Link(_) | Node::Absent { .. } => Resolved::Absent { not_dir: false },
        })
    }
}

/// Drops the last component of a path being built (`/a/b` → `/a`, `/a` → empty, the root).
fn truncate_to_parent(path: &mut Vec<u8>) {
    if let Some(i) = path.iter().rposition(|&b| b == b'/') {
        path.truncate(i);
    }
}

/// `dir + "/" + name`, as the paths in links are spelt.
fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    [dir, b"/", name].concat()
}

/// A path for a message.
fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

fn read_link(host: &Path, shown: &[u8]) -> Result<Vec<u8>, BuildEnvError> {
    let target = std::fs::read_link(host).map_err(|e| io_error("reading symbolic link", shown, e))?;
    Ok(target.into_os_string().into_vec())
}

fn io_error(op: &'static str, path: &[u8], source: io::Error) -> BuildEnvError {
    BuildEnvError::Io { op, path: show(path), source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    const STORE: &str = "/nix/store";
    const OUT: &str = "/nix/store/00000000000000000000000000000000-user-environment";
    const MANIFEST: &str = "/nix/store/11111111111111111111111111111111-env-manifest.nix";
    const A: &str = "/nix/store/aaaa-a";
    const B: &str = "/nix/store/bbbb-b";
    const C: &str = "/nix/store/cccc-c";
    const D: &str = "/nix/store/dddd-d";
    const E: &str = "/nix/store/eeee-e";

    /// A store in a temporary directory: logical `/nix/store/NAME` is host `<tmp>/store/NAME`.
    struct Fixture {
        tmp: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let tmp = tempfile::tempdir().unwrap();
            fs::create_dir(tmp.path().join("store")).unwrap();
            Fixture { tmp }
        }

        fn host(&self, logical: &str) -> PathBuf {
            self.tmp.path().join("store").join(logical.strip_prefix("/nix/store/").unwrap())
        }

        fn file(&self, logical: &str, text: &str) {
            let h = self.host(logical);
            fs::create_dir_all(h.parent().unwrap()).unwrap();
            fs::write(h, text).unwrap();
        }

        fn link(&self, logical: &str, target: &str) {
            let h = self.host(logical);
            fs::create_dir_all(h.parent().unwrap()).unwrap();
            symlink(target, h).unwrap();
        }

        fn out(&self) -> PathBuf {
            self.tmp.path().join("out")
        }

        fn build(&self, packages: &[Package], manifest: Option<&str>) -> Result<Summary, BuildEnvError> {
            let root = self.tmp.path().join("store");
            let real = move |p: &str| root.join(p.rsplit('/').next().unwrap_or(p));
            let out = self.out();
            let target = Target { host: &out, logical: OUT };
            build(&target, packages, manifest, &StoreView { dir: STORE, real: &real })
        }

        /// `$out` as lines: `dir/`, `link -> target`, `file (file)`, in name order.
        fn tree(&self) -> Vec<String> {
            let mut lines = Vec::new();
            walk(&self.out(), "", &mut lines);
            lines
        }
    }

    fn walk(dir: &Path, prefix: &str, lines: &mut Vec<String>) {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        for name in names {
            let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
            let path = dir.join(&name);
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                lines.push(format!("{rel} -> {}", fs::read_link(&path).unwrap().display()));
            } else if meta.is_dir() {
                lines.push(format!("{rel}/"));
                walk(&path, &rel, lines);
            } else {
                lines.push(format!("{rel} (file)"));
            }
        }
    }

    fn pkg(path: &str, priority: i32) -> Package {
        Package { path: path.to_owned(), active: true, priority }
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn a_lone_package_is_linked_by_its_top_directories() {
        let f = Fixture::new();
        f.file(&format!("{A}/bin/a"), "a");
        f.file(&format!("{A}/share/doc/readme"), "r");
        let summary = f.build(&[pkg(A, 5)], Some(MANIFEST)).unwrap();
        assert_eq!(
            f.tree(),
            [format!("bin -> {A}/bin"), format!("manifest.nix -> {MANIFEST}"), format!("share -> {A}/share")]
        );
        assert_eq!(summary, Summary { symlinks: 2, warnings: vec![] });
    }

    #[test]
    fn two_packages_sharing_a_directory_merge_it_into_a_real_one() {
        let f = Fixture::new();
        f.file(&format!("{A}/bin/a"), "a");
        f.file(&format!("{A}/share/man/a.1"), "a");
        f.file(&format!("{B}/bin/b"), "b");
        f.file(&format!("{B}/lib/libb.so"), "b");
        f.build(&[pkg(B, 5), pkg(A, 5)], None).unwrap();
        assert_eq!(
            f.tree(),
            [
                "bin/".to_owned(),
                format!("bin/a -> {A}/bin/a"),
                format!("bin/b -> {B}/bin/b"),
                format!("lib -> {B}/lib"),
                format!("share -> {A}/share"),
            ]
        );
    }

    #[test]
    fn the_lower_priority_number_wins_a_file_collision_in_any_order() {
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
            let f = Fixture::new();
            f.file(&format!("{A}/bin/x"), "a");
            f.file(&format!("{B}/bin/x"), "b");
            f.file(&format!("{C}/bin/x"), "c");
            let all = [pkg(A, 7), pkg(B, 2), pkg(C, 9)];
            let given: Vec<Package> = order.iter().map(|&i| all[i].clone()).collect();
            f.build(&given, None).unwrap();
            assert_eq!(f.tree(), ["bin/".to_owned(), format!("bin/x -> {B}/bin/x")]);
        }
    }

    #[test]
    fn equal_priorities_colliding_fail_with_nix_message() {
        let f = Fixture::new();
        f.file(&format!("{A}/bin/x"), "a");
        f.file(&format!("{B}/bin/x"), "b");
        let err = f.build(&[pkg(B, 5), pkg(A, 5)], None).unwrap_err();
        assert!(matches!(err, BuildEnvError::SamePriority { priority: 5, .. }));
        assert_eq!(
            err.to_string(),
            format!(
                "packages '{B}/bin/x' and '{A}/bin/x' have the same priority 5; use 'nix-env --set-flag priority \
                 NUMBER INSTALLED_PKGNAME' to change the priority of one of the conflicting packages (0 being the \
                 highest priority)"
            )
        );
    }

    #[test]
    fn equal_priorities_collide_even_when_both_links_lead_to_one_file() {
        let f = Fixture::new();
        f.file(&format!("{C}/bin/x"), "c");
        f.link(&format!("{A}/bin/x"), &format!("{C}/bin/x"));
        f.link(&format!("{B}/bin/x"), &format!("{C}/bin/x"));
        let err = f.build(&[pkg(A, 5), pkg(B, 5)], None).unwrap_err();
        assert!(matches!(err, BuildEnvError::SamePriority { .. }), "{err}");
    }

    #[test]
    fn propagated_packages_are_linked_and_lose_to_explicit_ones() {
        let f = Fixture::new();
        f.file(&format!("{A}/bin/a"), "a");
        f.file(&format!("{A}/nix-support/propagated-user-env-packages"), &format!("{C}\n"));
        f.file(&format!("{B}/bin/x"), "b");
        f.file(&format!("{C}/bin/x"), "c");
        f.file(&format!("{C}/bin/c"), "c");
        // A second round, and a package already linked, which is not linked again.
        f.file(&format!("{C}/nix-support/propagated-user-env-packages"), &format!("{D} {A}"));
        f.file(&format!("{D}/share/d"), "d");
        let summary = f.build(&[pkg(A, 5), pkg(B, 5)], None).unwrap();
        assert_eq!(
            f.tree(),
            [
                "bin/".to_owned(),
                format!("bin/a -> {A}/bin/a"),
                format!("bin/c -> {C}/bin/c"),
                format!("bin/x -> {B}/bin/x"),
                format!("share -> {D}/share"),
            ]
        );
        assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
    }

    #[test]
    fn propagated_packages_take_priorities_from_1000_in_path_order() {
        let f = Fixture::new();
        f.file(&format!("{A}/nix-support/propagated-user-env-packages"), &format!("{E} {C}\n"));
        f.file(&format!("{C}/bin/x"), "c");
        f.file(&format!("{E}/bin/x"), "e");
        f.build(&[pkg(A, 5)], None).unwrap();
        // C sorts first, gets 1000 and beats E's 1001; equal priorities would have failed.
        assert_eq!(f.tree(), ["bin/".to_owned(), format!("bin/x -> {C}/bin/x")]);
    }

    #[test]
    fn a_propagated_file_replaces_a_weaker_link_to_a_directory() {
        let f = Fixture::new();
        f.file(&format!("{A}/bin/x"), "a");
        f.file(&format!("{B}/nix-support/propagated-user-env-packages"), C);
        f.file(&format!("{C}/bin"), "c");
        f.build(&[pkg(A, 2000), pkg(B, 5)], None).unwrap();
        assert_eq!(f.tree(), [format!("bin -> {C}/bin")]);
    }

    #[test]
    fn the_manifest_is_linked_and_packages_own_manifests_are_not() {
        let f = Fixture::new();
        f.file(&format!("{A}/bin/a"), "a");
        f.file(&format!("{A}/manifest.nix"), "[]");
        f.file(&format!("{A}/manifest.json"), "{}");
        f.build(&[pkg(A, 5)], Some(MANIFEST)).unwrap();
        assert_eq!(f.tree(), [format!("bin -> {A}/bin"), format!("manifest.nix -> {MANIFEST}")]);
    }

    #[test]
    fn a_package_that_is_a_file_is_left_out_with_a_warning() {
        let f = Fixture::new();
        f.file(E, "just a file");
        f.link(D, E);
        let summary = f.build(&[pkg(E, 5), pkg(D, 5)], Some(MANIFEST)).unwrap();
        assert_eq!(f.tree(), [format!("manifest.nix -> {MANIFEST}")]);
        assert_eq!(
            summary.warnings,
            [
                format!("not including '{D}' in the user environment because it's not a directory"),
                format!("not including '{E}' in the user environment because it's not a directory"),
            ]
        );
    }

    #[test]
    fn a_missing_package_is_an_error() {
        let f = Fixture::new();
        let err = f.build(&[pkg(A, 5)], None).unwrap_err();
        assert!(matches!(err, BuildEnvError::Io { op: "opening directory", .. }), "{err}");
    }

    #[test]
    fn expanding_a_link_to_a_symlinked_directory_links_its_canonical_target() {
        let f = Fixture::new();
        f.link(&format!("{A}/lib"), &format!("{D}/lib"));
        f.file(&format!("{D}/lib/x"), "d");
        f.file(&format!("{D}/lib/log"), "d");
        f.file(&format!("{B}/lib/y"), "b");
        f.build(&[pkg(A, 1), pkg(B, 3)], None).unwrap();
        assert_eq!(f.tree(), ["lib/".to_owned(), format!("lib/x -> {D}/lib/x"), format!("lib/y -> {B}/lib/y")]);
    }

    #[test]
    fn merging_a_symlinked_directory_keeps_the_path_through_the_symlink() {
        let f = Fixture::new();
        f.link(&format!("{A}/lib"), &format!("{D}/lib"));
        f.file(&format!("{D}/lib/x"), "d");
        f.file(&format!("{D}/lib/log"), "d");
        f.file(&format!("{B}/lib/y"), "b");
        f.build(&[pkg(A, 3), pkg(B, 1)], None).unwrap();
        assert_eq!(f.tree(), ["lib/".to_owned(), format!("lib/x -> {A}/lib/x"), format!("lib/y -> {B}/lib/y")]);
    }

    #[test]
    fn links_inside_packages_are_linked_as_they_are() {
        let f = Fixture::new();
        f.file(&format!("{A}/libexec/x"), "a");
        f.link(&format!("{A}/bin/x"), "../libexec/x");
        f.link(&format!("{A}/bin/y"), &format!("{C}/bin/y"));
        f.file(&format!("{C}/bin/y"), "c");
        f.file(&format!("{B}/bin/b"), "b");
        let summary = f.build(&[pkg(A, 5), pkg(B, 5)], None).unwrap();
        assert_eq!(
            f.tree(),
            [
                "bin/".to_owned(),
                format!("bin/b -> {B}/bin/b"),
                format!("bin/x -> {A}/bin/x"),
                format!("bin/y -> {A}/bin/y"),
                format!("libexec -> {A}/libexec"),
            ]
        );
        assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
    }

    #[test]
    fn dangling_links_and_links_out_of_the_store_are_skipped_with_a_warning() {
        let f = Fixture::new();
        f.file(&format!("{A}/bin/a"), "a");
        f.link(&format!("{A}/bin/etc"), "/etc/passwd");
        f.link(&format!("{A}/bin/gone"), "/nix/store/zzzz-missing/bin/gone");
        f.link(&format!("{A}/bin/rel"), "../nothing");
        f.link(&format!("{A}/bin/through-file"), "a/b");
        f.file(&format!("{B}/bin/b"), "b");
        let summary = f.build(&[pkg(A, 5), pkg(B, 5)], None).unwrap();
        assert_eq!(f.tree(), ["bin/".to_owned(), format!("bin/a -> {A}/bin/a"), format!("bin/b -> {B}/bin/b")]);
        let warned: Vec<String> = ["etc", "gone", "rel", "through-file"]
            .iter()
            .map(|n| format!("skipping dangling symlink '{OUT}/bin/{n}'"))
            .collect();
        assert_eq!(summary.warnings, warned);
    }

    #[test]
    fn dot_files_and_nix_special_files_are_never_linked() {
        let f = Fixture::new();
        for p in [".hidden/x", ".profile", "log", "perllocal.pod", "propagated-build-inputs", "nix-support/hook"] {
            f.file(&format!("{A}/{p}"), "a");
        }
        f.file(&format!("{A}/share/info/dir"), "a");
        f.file(&format!("{A}/share/info/a.info"), "a");
        f.file(&format!("{A}/share/dir"), "a");
        f.file(&format!("{A}/lib/perl5/perllocal.pod"), "a");
        f.file(&format!("{B}/share/info/b.info"), "b");
        f.file(&format!("{B}/lib/perl5/B.pm"), "b");
        f.build(&[pkg(A, 5), pkg(B, 5)], None).unwrap();
        assert_eq!(
            f.tree(),
            [
                "lib/".to_owned(),
                "lib/perl5/".to_owned(),
                format!("lib/perl5/B.pm -> {B}/lib/perl5/B.pm"),
                "share/".to_owned(),
                format!("share/dir -> {A}/share/dir"),
                "share/info/".to_owned(),
                format!("share/info/a.info -> {A}/share/info/a.info"),
                format!("share/info/b.info -> {B}/share/info/b.info"),
            ]
        );
    }

    #[test]
    fn inactive_packages_are_not_linked() {
        let f = Fixture::new();
        f.file(&format!("{A}/bin/a"), "a");
        f.file(&format!("{B}/bin/a"), "b");
        f.file(&format!("{B}/bin/b"), "b");
        let inactive = Package { path: B.to_owned(), active: false, priority: 0 };
        f.build(&[pkg(A, 5), inactive], None).unwrap();
        assert_eq!(f.tree(), [format!("bin -> {A}/bin")]);
    }

    #[test]
    fn a_directory_meeting_a_linked_file_is_a_collision() {
        let f = Fixture::new();
        f.file(&format!("{A}/share"), "a");
        f.file(&format!("{B}/share/x"), "b");
        let err = f.build(&[pkg(A, 1), pkg(B, 3)], None).unwrap_err();
        assert_eq!(err.to_string(), format!("collision between '{B}/share' and non-directory '{A}/share'"));
    }

    #[test]
    fn a_file_meeting_a_merged_directory_is_a_collision() {
        let f = Fixture::new();
        f.file(&format!("{A}/bin/a"), "a");
        f.file(&format!("{B}/bin/b"), "b");
        f.file(&format!("{C}/bin"), "c");
        let err = f.build(&[pkg(A, 1), pkg(B, 2), pkg(C, 3)], None).unwrap_err();
        assert_eq!(err.to_string(), format!("collision between non-directory '{C}/bin' and directory '{OUT}/bin'"));
    }

    #[test]
    fn a_store_path_that_is_a_symlink_is_followed_logically() {
        let f = Fixture::new();
        f.file(&format!("{A}/bin/a"), "a");
        // The target is logical: on the host, /nix/store/aaaa-a need not exist.
        f.link(D, A);
        f.file(&format!("{B}/bin/b"), "b");
        f.build(&[pkg(D, 5), pkg(B, 5)], None).unwrap();
        assert_eq!(f.tree(), ["bin/".to_owned(), format!("bin/a -> {D}/bin/a"), format!("bin/b -> {B}/bin/b")]);
    }

    #[test]
    fn a_symlink_loop_in_a_package_is_an_error() {
        let f = Fixture::new();
        f.link(&format!("{A}/bin/loop"), "loop");
        f.file(&format!("{B}/bin/b"), "b");
        let err = f.build(&[pkg(B, 5), pkg(A, 5)], None).unwrap_err();
        assert!(matches!(err, BuildEnvError::SymlinkLoop(_)), "{err}");
    }

    /// The second profile of a session with Nix 2.8.0 (`nix-build` of a `builtin:buildenv`
    /// derivation with `derivations = "true 1 1 A true 3 1 B"`, store paths as recorded).
    #[test]
    fn matches_a_profile_built_by_nix_2_8() {
        let a = "/nix/store/60ciignidk96qxl80jwyx1xhmgqqsm6j-a";
        let b = "/nix/store/i3hs1k68mxl84fxllbwwvfn2q1j7kgmc-b";
        let c = "/nix/store/r9ny97alpzn1j9d6k95i0sjjjd8hxxm3-c";
        let d = "/nix/store/rcbnyipkr9f4pm6l5301aqldwis08v28-d";
        let manifest = "/nix/store/0f8vm1qx122pkdqc77km07dbhhzn5c8w-env-manifest.nix";
        let f = Fixture::new();
        f.file(&format!("{c}/bin/c"), "c\n");
        f.file(&format!("{c}/share/c/f"), "c\n");
        f.file(&format!("{d}/lib/x/d"), "d\n");
        f.file(&format!("{d}/lib/log"), "dd\n");
        for (p, text) in [("bin/x", "a\n"), ("bin/a", "a\n"), ("share/info/dir", "dir\n"), ("share/info/a.info", "i\n")]
        {
            f.file(&format!("{a}/{p}"), text);
        }
        f.file(&format!("{a}/log"), "log\n");
        f.file(&format!("{a}/manifest.nix"), "manifest\n");
        f.file(&format!("{a}/nix-support/propagated-user-env-packages"), &format!("{c} \n"));
        fs::create_dir_all(f.host(&format!("{a}/.hidden"))).unwrap();
        f.link(&format!("{a}/bin/dangling"), "/nowhere");
        f.link(&format!("{a}/lib"), &format!("{d}/lib"));
        for (p, text) in [("bin/x", "b\n"), ("bin/b", "b\n"), ("lib/y/y", "y\n"), ("share/c/f", "b\n")] {
            f.file(&format!("{b}/{p}"), text);
        }

        let list = format!("true 1 1 {a} true 3 1 {b}");
        let drv_env = env(&[("derivations", list.as_str()), ("manifest", manifest)]);
        let pkgs = packages(&drv_env).unwrap();
        let summary = f.build(&pkgs, Some(super::manifest(&drv_env).unwrap())).unwrap();
        assert_eq!(
            f.tree(),
            [
                "bin/".to_owned(),
                format!("bin/a -> {a}/bin/a"),
                format!("bin/b -> {b}/bin/b"),
                format!("bin/c -> {c}/bin/c"),
                format!("bin/x -> {a}/bin/x"),
                "lib/".to_owned(),
                format!("lib/x -> {d}/lib/x"),
                format!("lib/y -> {b}/lib/y"),
                format!("manifest.nix -> {manifest}"),
                "share/".to_owned(),
                "share/c/".to_owned(),
                format!("share/c/f -> {b}/share/c/f"),
                format!("share/info -> {a}/share/info"),
            ]
        );
        assert_eq!(summary.warnings, [format!("skipping dangling symlink '{OUT}/bin/dangling'")]);
    }

    #[test]
    fn derivations_are_read_as_groups_of_flag_priority_count_and_paths() {
        let e = env(&[(
            "derivations",
            "true 5 1 /nix/store/a\tfalse 3 2 /nix/store/b /nix/store/b-man\n1 -2 1 /nix/store/c  true 4 0 x 0 1 /nix/store/d",
        )]);
        let got = packages(&e).unwrap();
        let want = [
            ("/nix/store/a", true, 5),
            ("/nix/store/b", false, 3),
            ("/nix/store/b-man", false, 3),
            ("/nix/store/c", true, -2),
            ("/nix/store/d", true, 0),
        ];
        let want: Vec<Package> =
            want.iter().map(|&(p, active, priority)| Package { path: p.to_owned(), active, priority }).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn priorities_are_read_as_stoi_reads_them() {
        let read = |s: &str| packages(&env(&[("derivations", s)])).map(|p| p[0].priority);
        assert_eq!(read("true 2x 1 /a").unwrap(), 2);
        assert_eq!(read("true +7 1 /a").unwrap(), 7);
        assert_eq!(read("true 5.5 1 /a").unwrap(), 5);
        assert_eq!(read("true -2147483648 1 /a").unwrap(), i32::MIN);
        for bad in ["true x 1 /a", "true - 1 /a", "true 2147483648 1 /a", "true 99999999999999999999 1 /a"] {
            assert!(matches!(read(bad), Err(BuildEnvError::BadNumber { field: "priority", .. })), "{bad}");
        }
        assert!(matches!(
            packages(&env(&[("derivations", "true 1 many /a")])),
            Err(BuildEnvError::BadNumber { field: "output count", .. })
        ));
    }

    #[test]
    fn a_truncated_derivations_list_is_an_error() {
        for s in ["true", "true 5", "true 5 2 /nix/store/a"] {
            assert!(matches!(packages(&env(&[("derivations", s)])), Err(BuildEnvError::Truncated)), "{s}");
        }
        assert!(packages(&env(&[("derivations", " \n")])).unwrap().is_empty());
    }

    #[test]
    fn missing_attributes_are_reported_as_nix_reports_them() {
        let e = BTreeMap::new();
        assert_eq!(packages(&e).unwrap_err().to_string(), "attribute 'derivations' missing");
        assert_eq!(manifest(&e).unwrap_err().to_string(), "attribute 'manifest' missing");
    }
}
