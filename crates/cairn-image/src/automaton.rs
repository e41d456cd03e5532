//! Automata: containers that mount their closure from the host store instead of copying it into
//! image layers.
//!
//! An automaton is an OCI runtime bundle under `<state>/automata/<name>/`: a `config.json` (the
//! runtime spec, from `oci-spec`'s defaults — namespaces, `/proc`, `/dev`, masked paths — plus
//! what follows) and a `rootfs/` that is an empty directory. Every path of the closure is
//! bind-mounted read-only at its own store path (or the whole store directory with
//! `whole_store`), so the program inside finds its dependencies where it was built to find them
//! and sees no other store path. With an image, each top-level entry of the image's unpacked root
//! filesystem (a store path, see `unpack`) is bind-mounted read-only in turn and top-level
//! symlinks are recreated, so the image is used in place, never copied; the image's own copy of
//! the store directory is left out (the closure's mounts take its place). `/tmp` is a fresh
//! tmpfs; the root itself is read-only unless `writable`. A `writable` automaton with an image
//! gets a writable overlay instead: each top-level directory of the image is an overlay mount
//! whose lower layer is the (read-only) rootfs store path and whose upper and work directories
//! are in the bundle (`upper/`, `work/`), so what the program writes survives its runs, stays out
//! of the store, and goes with `rm`. The closure's mounts stay read-only either way.
//!
//! While an automaton exists its closure's roots, its image and its rootfs are garbage-collector
//! roots (`gcroots/oci-automata/<name>@…`); removing it removes those roots and the bundle.
//! Running it is the caller's business: `cairn automaton run` starts the configured OCI runtime
//! (runc, or crun) on the bundle with the caller's own privileges.

use std::fs;
use std::path::{Path, PathBuf};

use cairn_nix::StorePath;
use cairn_store::Direction;
use oci_spec::runtime::{Mount, MountBuilder, Spec};
use serde::{Deserialize, Serialize};

use crate::images::{Image, TempRootGuardSet};
use crate::process::{merge_env, resolve_user, ImageProcess};

use crate::{ImageError, Images, Result};

/// The gcroots group automata keep their paths in.
const GROUP: &str = "oci-automata";

/// What to create.
#[derive(Debug, Clone)]
pub struct AutomatonSpec {
    pub name: String,
    /// The closure's roots.
    pub paths: Vec<StorePath>,
    pub image: Option<Image>,
    /// Bind the whole store directory instead of the closure's paths.
    pub whole_store: bool,
    /// Leave the root writable (the bundle's own directory, never the store).
    pub writable: bool,
    pub args: Vec<String>,
    /// `NAME=VALUE`, after the default `PATH` and `TERM`.
    pub env: Vec<String>,
}

/// An automaton as it is recorded beside its bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Automaton {
    pub name: String,
    /// The bundle directory (`config.json`, `rootfs/`).
    pub bundle: PathBuf,
    /// The closure's roots, as store path base names.
    pub paths: Vec<String>,
    /// Every path of the closure, bind-mounted (empty with `whole_store`).
    pub mounted: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub whole_store: bool,
    #[serde(default)]
    pub writable: bool,
}

fn automata_dir(images: &Images) -> PathBuf {
    images.store.layout().state_dir.join("automata")
}

/// `[a-z0-9][a-z0-9_.-]{0,63}`: a name that is one path component and a runtime container id.
pub fn validate_name(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadAutomaton(format!(
            "invalid name '{name}': 1 to 64 of [a-z0-9_.-], starting with a letter or digit"
        )))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.display().to_string(), source }
}

fn bind(destination: &str, source: &Path) -> Result<Mount> {
    MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(vec!["rbind".to_owned(), "ro".to_owned(), "nosuid".to_owned(), "nodev".to_owned()])
        .build()
        .map_err(|e| ImageError::BadAutomaton(format!("mount of {destination}: {e}")))
}

/// An overlay mount at `destination`: `lower` read-only under `upper` (with its `work` dir).
fn overlay(destination: &str, lower: &Path, upper: &Path, work: &Path) -> Result<Mount> {
    let opt = |key: &str, p: &Path| -> Result<String> {
        let s = p.to_str().filter(|s| !s.contains([',', ':'])).ok_or_else(|| {
            ImageError::BadAutomaton(format!("cannot overlay '{}': overlay paths cannot hold ',' or ':'", p.display()))
        })?;
        Ok(format!("{key}={s}"))
    };
    MountBuilder::default()
        .destination(destination)
        .typ("overlay")
        .source("overlay")
        .options(vec![opt("lowerdir", lower)?, opt("upperdir", upper)?, opt("workdir", work)?])
        .build()
        .map_err(|e| ImageError::BadAutomaton(format!("mount of {destination}: {e}")))
}

/// Creates the automaton `spec` describes.
pub fn create(images: &Images, spec: &AutomatonSpec) -> Result<Automaton> {
    validate_name(&spec.name)?;
    if spec.args.is_empty() && spec.image.is_none() {
        return Err(ImageError::BadAutomaton("no command to run (cairn automaton create NAME … -- CMD …)".into()));
    }
    let store = &images.store;
    let dir = store.store_dir().clone();
    let bundle = automata_dir(images).join(&spec.name);
    if bundle.exists() {
        return Err(ImageError::BadAutomaton(format!(
            "an automaton named '{}' exists (cairn automaton rm it first)",
            spec.name
        )));
    }
    let mut roots = TempRootGuardSet::default();
    roots.hold(store.temp_root(spec.paths.clone()));
    let closure = store.walk(&spec.paths, Direction::References)?;
    let rootfs = match &spec.image {
        Some(img) => {
            roots.hold(store.temp_root([img.layout.clone()]));
            let r = crate::unpack::unpack(images, &dir.display(&img.layout))?;
            roots.hold(store.temp_root([r.path.clone()]));
            Some(r.path)
        }
        None => None,
    };
    // What the image says of its process: command, environment, user, working directory.
    let process = match &spec.image {
        Some(img) => image_process(images, img)?,
        None => ImageProcess::default(),
    };
    // Without a command, the image's own: its Entrypoint followed by its Cmd, as podman runs it.
    let args = match &spec.image {
        Some(_) if spec.args.is_empty() => {
            let args = [process.entrypoint.clone(), process.cmd.clone()].concat();
            if args.is_empty() {
                return Err(ImageError::BadAutomaton(
                    "no command to run: the image sets neither Entrypoint nor Cmd (cairn automaton create NAME … -- CMD …)"
                        .into(),
                ));
            }
            args
        }
        _ => spec.args.clone(),
    };
    let view = View {
        store_dir: dir.as_str(),
        real_store_dir: &store.layout().real_store_dir,
        mounted: (!spec.whole_store).then(|| closure.iter().map(|p| p.base_name()).collect()),
        rootfs: rootfs.as_ref().map(|r| store.real_path(r)),
    };
    // The defaults, then the image's, then the caller's: a later value of a name wins.
    let mut env = vec![format!("PATH={DEFAULT_PATH}"), "TERM=xterm".to_owned()];
    merge_env(&mut env, process.env.iter().chain(&spec.env).cloned());
    // An image that names a user runs as that user, resolved in its own /etc/passwd.
    let ids = resolve_user(&process.user, rootfs.as_ref().map(|r| store.real_path(r)).as_deref())?;
    let cwd = if process.working_dir.is_empty() { "/".to_owned() } else { process.working_dir.clone() };
    if !cwd.starts_with('/') {
        return Err(ImageError::BadAutomaton(format!("the image's working directory '{cwd}' is not absolute")));
    }
    view.check_command(&args[0], &env, || {
        let mut what = Vec::new();
        if spec.whole_store {
            what.push("the whole store".to_owned());
        } else if !spec.paths.is_empty() {
            let roots: Vec<String> = spec.paths.iter().map(|p| dir.display(p)).collect();
            what.push(format!("the closure of {}", roots.join(", ")));
        }
        if let Some(img) = &spec.image {
            what.push(format!("image {}", dir.display(&img.layout)));
        }
        if what.is_empty() {
            what.push("no store paths".to_owned());
        }
        // A store path that is not mounted (an image's own copy of the store is not: the
        // closure's paths take its place).
        let unmounted = args[0]
            .strip_prefix(dir.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .map(|rest| rest.split('/').next().unwrap_or(rest))
            .is_some_and(|base| !spec.whole_store && !closure.iter().any(|p| p.base_name() == base));
        let hint = if unmounted { "; mount its store path with --closure" } else { "" };
        format!("{}){hint}", what.join(" and "))
    })?;
    let spec = &AutomatonSpec { args, ..spec.clone() };

    // The bundle is made under a temporary name and renamed into place last.
    let parent = automata_dir(images);
    fs::create_dir_all(&parent).map_err(io(&parent))?;
    let tmp = parent.join(format!(".new-{}-{}", spec.name, std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let made = (|| -> Result<Automaton> {
        let root_dir = tmp.join("rootfs");
        fs::create_dir_all(&root_dir).map_err(io(&root_dir))?;
        let mut mounts: Vec<Mount> = Spec::default().mounts().clone().unwrap_or_default();
        let store_top = dir.as_str().trim_start_matches('/').split('/').next().unwrap_or("").to_owned();
        if let Some(r) = &rootfs {
            let real = store.real_path(r);
            let mut entries: Vec<_> =
                fs::read_dir(&real).map_err(io(&real))?.collect::<std::io::Result<_>>().map_err(io(&real))?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let name = e.file_name().to_string_lossy().into_owned();
                if name == store_top || ["proc", "dev", "sys", "tmp"].contains(&name.as_str()) {
                    continue;
                }
                let ft = e.file_type().map_err(io(&e.path()))?;
                if ft.is_symlink() {
                    let target = fs::read_link(e.path()).map_err(io(&e.path()))?;
                    std::os::unix::fs::symlink(&target, root_dir.join(&name)).map_err(io(&root_dir))?;
                } else if spec.writable && ft.is_dir() {
                    for area in ["upper", "work"] {
                        let d = tmp.join(area).join(&name);
                        fs::create_dir_all(&d).map_err(io(&d))?;
                    }
                    mounts.push(overlay(
                        &format!("/{name}"),
                        &e.path(),
                        &bundle.join("upper").join(&name),
                        &bundle.join("work").join(&name),
                    )?);
                } else {
                    mounts.push(bind(&format!("/{name}"), &e.path())?);
                }
            }
        }
        let mounted: Vec<String> = if spec.whole_store {
            mounts.push(bind(dir.as_str(), &store.layout().real_store_dir)?);
            Vec::new()
        } else {
            for p in &closure {
                mounts.push(bind(&dir.display(p), &store.real_path(p))?);
            }
            closure.iter().map(|p| p.base_name()).collect()
        };
        mounts.push(
            MountBuilder::default()
                .destination("/tmp")
                .typ("tmpfs")
                .source("tmpfs")
                .options(vec!["nosuid".to_owned(), "nodev".to_owned(), "mode=1777".to_owned()])
                .build()
                .map_err(|e| ImageError::BadAutomaton(format!("the /tmp mount: {e}")))?,
        );
        let mut s = Spec::default();
        s.set_mounts(Some(mounts));
        s.set_hostname(Some(spec.name.clone()));
        if let Some(root) = s.root_mut() {
            root.set_path(PathBuf::from("rootfs"));
            root.set_readonly(Some(!spec.writable));
        }
        if let Some(p) = s.process_mut() {
            p.set_args(Some(spec.args.clone()));
            p.set_env(Some(env.clone()));
            p.set_terminal(Some(false));
            p.set_cwd(PathBuf::from(&cwd));
            let user = p.user_mut();
            user.set_uid(ids.uid);
            user.set_gid(ids.gid);
            user.set_additional_gids((!ids.additional_gids.is_empty()).then(|| ids.additional_gids.clone()));
        }
        let config = tmp.join("config.json");
        let text = serde_json::to_vec_pretty(&s).map_err(|e| ImageError::BadAutomaton(format!("config.json: {e}")))?;
        fs::write(&config, text).map_err(io(&config))?;
        let a = Automaton {
            name: spec.name.clone(),
            bundle: bundle.clone(),
            paths: spec.paths.iter().map(|p| p.base_name()).collect(),
            mounted,
            image: spec.image.as_ref().map(|i| i.layout.base_name()),
            rootfs: rootfs.as_ref().map(|r| r.base_name()),
            args: spec.args.clone(),
            env: spec.env.clone(),
            whole_store: spec.whole_store,
            writable: spec.writable,
        };
        let record = tmp.join("automaton.json");
        fs::write(&record, serde_json::to_vec_pretty(&a).expect("records serialise")).map_err(io(&record))?;
        // Roots before the bundle appears: an automaton that exists always has its paths.
        let mut keep: Vec<(String, StorePath)> =
            spec.paths.iter().enumerate().map(|(i, p)| (format!("{}@{i}", spec.name), p.clone())).collect();
        if let Some(img) = &spec.image {
            keep.push((format!("{}@image", spec.name), img.layout.clone()));
        }
        if let Some(r) = &rootfs {
            keep.push((format!("{}@rootfs", spec.name), r.clone()));
        }
        for (link, p) in keep {
            store.set_root_link(GROUP, &link, &p)?;
        }
        fs::rename(&tmp, &bundle).map_err(io(&bundle))?;
        Ok(a)
    })();
    if made.is_err() {
        let _ = fs::remove_dir_all(&tmp);
        let _ = release_roots(images, &spec.name);
    }
    made
}

/// What an image's configuration says of its process, for the manifest `unpack` picks (the
/// host's platform).
fn image_process(images: &Images, img: &Image) -> Result<ImageProcess> {
    let Some((_, m)) = crate::unpack::pick_manifest(images.image_manifests(img)?, &cairn_oci::Platform::host()) else {
        return Ok(ImageProcess::default());
    };
    let Some(config) = m.children.first() else { return Ok(ImageProcess::default()) };
    let config: serde_json::Value = serde_json::from_slice(&images.read_manifest(config, "the image")?)
        .map_err(|e| cairn_oci::OciError::ManifestJson(format!("the image's config: {e}")))?;
    Ok(ImageProcess::from_config(&config))
}

/// The file system an automaton's program sees, as far as it comes from the store: the image's
/// root (its top-level entries but the store directory's) and the store paths mounted (all of
/// them with `whole_store`). Used to check, before anything is written, that the command exists.
struct View<'a> {
    store_dir: &'a str,
    real_store_dir: &'a Path,
    /// The base names of the mounted store paths; `None` when the whole store is.
    mounted: Option<std::collections::HashSet<String>>,
    /// The image's unpacked root, on the host.
    rootfs: Option<PathBuf>,
}

impl View<'_> {
    /// The host path behind a normalised path inside the automaton, if it is mounted there.
    fn host_path(&self, inside: &[String]) -> Option<PathBuf> {
        let store: Vec<&str> = self.store_dir.split('/').filter(|c| !c.is_empty()).collect();
        let n = store.len().min(inside.len());
        if inside[..n].iter().zip(&store).all(|(a, b)| a == b) && !inside.is_empty() {
            if inside.len() <= store.len() {
                // The store directory or a directory above it: mount points.
                return Some(self.real_store_dir.to_owned());
            }
            let base = &inside[store.len()];
            if self.mounted.as_ref().is_some_and(|m| !m.contains(base)) {
                return None;
            }
            return Some(inside[store.len()..].iter().fold(self.real_store_dir.to_owned(), |p, c| p.join(c)));
        }
        if ["proc", "dev", "sys", "tmp"].contains(&inside.first().map_or("", String::as_str)) {
            return None;
        }
        let root = self.rootfs.as_ref()?;
        Some(inside.iter().fold(root.clone(), |p, c| p.join(c)))
    }

    /// What `path` (absolute, inside the automaton) is on the host, following symlinks as the
    /// automaton would see them; `None` if it is not there.
    fn lookup(&self, path: &str) -> Option<(PathBuf, fs::Metadata)> {
        let mut todo: std::collections::VecDeque<String> =
            path.split('/').filter(|c| !c.is_empty()).map(str::to_owned).collect();
        let mut at: Vec<String> = Vec::new();
        let mut links = 0;
        while let Some(c) = todo.pop_front() {
            match c.as_str() {
                "." => continue,
                ".." => {
                    at.pop();
                    continue;
                }
                _ => at.push(c),
            }
            let host = self.host_path(&at)?;
            let meta = fs::symlink_metadata(&host).ok()?;
            if meta.file_type().is_symlink() {
                links += 1;
                let target = fs::read_link(&host).ok()?;
                if links > 40 {
                    return None;
                }
                at.pop();
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    at.clear();
                }
                for (i, t) in target.split('/').filter(|c| !c.is_empty()).enumerate() {
                    todo.insert(i, t.to_owned());
                }
            }
        }
        let host = self.host_path(&at)?;
        let meta = fs::metadata(&host).ok()?;
        Some((host, meta))
    }

    /// A file the automaton could execute at `path`: not a directory, with an execute bit.
    fn executable(&self, path: &str) -> Option<(PathBuf, fs::Metadata)> {
        use std::os::unix::fs::PermissionsExt;
        self.lookup(path).filter(|(_, m)| !m.is_dir() && m.permissions().mode() & 0o111 != 0)
    }

    /// Fails with one line naming the problem unless the command can run in the automaton: an
    /// absolute path that is there, not a directory, executable, and if it is a script, with its
    /// interpreter there too; a bare name found so on the `PATH` it will run with (`env`'s).
    fn check_command(&self, command: &str, env: &[String], what: impl FnOnce() -> String) -> Result<()> {
        let bad = |m: String| Err(ImageError::BadAutomaton(m));
        let host = if command.contains('/') {
            if !command.starts_with('/') {
                return bad(format!("command '{command}' must be an absolute path or a bare name on PATH"));
            }
            match self.lookup(command) {
                None => None,
                Some((_, m)) if m.is_dir() => return bad(format!("command '{command}' is a directory")),
                Some((h, m)) => {
                    use std::os::unix::fs::PermissionsExt;
                    if m.permissions().mode() & 0o111 == 0 {
                        return bad(format!(
                            "command '{command}' is not executable (mode {:o})",
                            m.permissions().mode() & 0o7777
                        ));
                    }
                    Some(h)
                }
            }
        } else {
            let path = env.iter().rev().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
            path.split(':')
                .filter(|d| d.starts_with('/'))
                .find_map(|d| self.executable(&format!("{d}/{command}")))
                .map(|(h, _)| h)
        };
        let Some(host) = host else {
            return bad(format!("command '{command}' is not in what the automaton mounts ({}", what()));
        };
        // A script runs only if its interpreter (`#!` and an absolute path) is there too.
        if let Some(interpreter) = interpreter(&host) {
            if self.executable(&interpreter).is_none() {
                return bad(format!(
                    "command '{command}' is a script for '{interpreter}', which is not in what the automaton mounts ({}",
                    what()
                ));
            }
        }
        Ok(())
    }
}

/// The interpreter a script at `host` names on its `#!` line, if it names an absolute one.
fn interpreter(host: &Path) -> Option<String> {
    let mut head = [0u8; 256];
    let n = std::io::Read::read(&mut fs::File::open(host).ok()?, &mut head).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
    let text = std::str::from_utf8(line).ok()?;
    text.split_whitespace().next().filter(|i| i.starts_with('/')).map(str::to_owned)
}

/// The `PATH` an automaton's program gets unless `env` sets one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Removes every root of automaton `name`.
fn release_roots(images: &Images, name: &str) -> Result<()> {
    let prefix = format!("{name}@");
    for (link, _) in images.store.root_links(GROUP)? {
        if link.starts_with(&prefix) {
            images.store.remove_root_link(GROUP, &link)?;
        }
    }
    Ok(())
}

/// The automaton `name`.
pub fn get(images: &Images, name: &str) -> Result<Automaton> {
    validate_name(name)?;
    let record = automata_dir(images).join(name).join("automaton.json");
    let bytes = fs::read(&record)
        .map_err(|_| ImageError::BadAutomaton(format!("no automaton is named '{name}' (see cairn automaton ls)")))?;
    serde_json::from_slice(&bytes).map_err(|e| ImageError::BadAutomaton(format!("'{}': {e}", record.display())))
}

/// Every automaton, by name.
pub fn list(images: &Images) -> Result<Vec<Automaton>> {
    let dir = automata_dir(images);
    let Ok(entries) = fs::read_dir(&dir) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if let Ok(a) = get(images, &name) {
            out.push(a);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Removes automaton `name`: its roots first, then its bundle.
pub fn remove(images: &Images, name: &str) -> Result<Automaton> {
    let a = get(images, name)?;
    release_roots(images, name)?;
    fs::remove_dir_all(&a.bundle).map_err(io(&a.bundle))?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_component_and_a_container_id() {
        for ok in ["web", "a-1", "x.y_z", "0"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Web", "-a", ".a", "a/b", "a b", "..", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
