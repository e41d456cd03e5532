//! What a build's sandbox holds, as a pure value.
//!
//! A build sees a private root: the input closure at its store paths (directories bind-mounted
//! read-only, files and symlinks linked or copied, see [`Node::Input`]), an empty store
//! directory where the outputs appear, `/build` (its working and
//! temporary directory), a minimal `/dev`, a fresh `/proc`, `/etc/passwd`, `/etc/group` and
//! `/etc/hosts` as Nix 2.8 writes them, and the configured `sandbox-paths`.
//!
//! Terminals: a private `devpts` instance at `/dev/pts` with `/dev/ptmx` pointing into it, as
//! Nix mounts it, so that a build may open pseudo-terminals of its own (test suites do) — none
//! of the host's is reachable. What is deliberately absent: `/dev/tty` (it names the
//! controlling terminal of whoever opens it; a builder has none, and one that had the daemon's
//! could type into the shell that started it with `TIOCSTI`) and the host's consoles. What is
//! bounded ([`SandboxLimits`]): the builder's processes (its `RLIMIT_NPROC`) and `/dev/shm`, a
//! sized tmpfs (half the RAM by default, as Nix's `sandbox-dev-shm-size`).
//!
//! [`plan`] computes all of that — files to create, mounts to make, the builder's environment,
//! its limits — without touching the system, so that it can be tested and read apart from the
//! code that applies it ([`crate::sys`]). The daemon creates the [`Skeleton`] on disk (as itself, outside any
//! namespace); the sandbox helper applies the [`SandboxSpec`] inside the namespaces.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_nix::derivation::Derivation;
use cairn_nix::hash::{Encoding, Hash, HashAlgo};
use cairn_nix::{StoreDir, StorePath};
use serde::{Deserialize, Serialize};

use crate::refgraph::Graphs;
use crate::structured::AttrsError;

pub use crate::limits::{SandboxLimits, TmpfsSize};

/// The build's working directory inside the sandbox (`NIX_BUILD_TOP`), as in Nix.
pub const BUILD_TOP: &str = "/build";
/// `HOME` in the sandbox: a path that does not exist, so that nothing finds a home there.
pub const HOME: &str = "/homeless-shelter";
/// The sandbox's host name, as Nix names it.
pub const HOSTNAME: &str = "localhost";
/// The builder's uid and gid inside the sandbox (Nix's `sandboxUid`/`sandboxGid`).
pub const SANDBOX_UID: u32 = 1000;
pub const SANDBOX_GID: u32 = 100;

/// Host files a fixed-output build (which keeps the network) sees, as Nix gives them.
pub const NETWORK_FILES: &[&str] = &["/etc/resolv.conf", "/etc/services", "/etc/hosts"];

/// Device nodes bound from the host's `/dev`. Not `/dev/tty`: see the module's doc.
const DEVICES: &[&str] = &["/dev/full", "/dev/null", "/dev/random", "/dev/urandom", "/dev/zero"];

/// The device of derivations that require the `kvm` system feature.
const KVM: &str = "/dev/kvm";

/// Who owns a created entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Owner {
    /// The daemon's user.
    Daemon,
    /// The build user (the host uid the sandbox's uid 1000 maps to).
    Builder,
    /// The daemon's user and the build user's group: the store directory, as Nix makes it —
    /// with the sticky bit, the builder creates entries there but cannot remove the inputs.
    BuildGroup,
}

/// An entry created under the sandbox root before the build starts. Paths are as seen inside
/// the sandbox (absolute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    Dir {
        path: String,
        mode: u32,
        owner: Owner,
    },
    File {
        path: String,
        contents: Vec<u8>,
        mode: u32,
        owner: Owner,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// An empty file or directory for a bind mount to cover.
    MountPoint {
        path: String,
        dir: bool,
    },
    /// An input store path, placed by [`crate::root::create`]: a directory gets a mount point
    /// (its bind is among [`Mount::Inputs`]); anything else is placed as Nix 2.8 places it, a
    /// hard link to `source` when `link`, else (or when the link cannot be made) a copy with
    /// the store's mode and modification time, a symlink copied as a symlink — except a file
    /// larger than [`COPY_MAX`] that is not linked, which is bound like a directory.
    Input {
        path: String,
        source: PathBuf,
        link: bool,
    },
}

/// The largest input file copied into a sandbox that cannot link it: above this, a bind mount
/// costs less than the copy.
pub const COPY_MAX: u64 = 64 << 10;

/// The entries to create, in order (parents first).
pub type Skeleton = Vec<Node>;

/// One mount made inside the sandbox's mount namespace. Targets are inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mount {
    /// A host path bound at `target`; read-only ones are remounted read-only.
    Bind { source: PathBuf, target: String, read_only: bool },
    /// A fresh `proc` for the sandbox's PID namespace.
    Proc { target: String },
    /// An empty tmpfs (`/dev/shm`) of at most `size`.
    Tmpfs { target: String, size: TmpfsSize },
    /// A new, private `devpts` instance (`/dev/pts`): the build's own pseudo-terminals only.
    Devpts { target: String },
    /// The input closure: the host's store directory `source` bound once, read-only, at `stage`
    /// (a host directory beside the root, out of the builder's reach), then each of `names`
    /// bound from there at `store/NAME`. A bind of a read-only mount is read-only, so an input
    /// costs one `mount` where binding it from the store and remounting it read-only cost three
    /// calls — a build with a few hundred inputs spent most of its sandbox set-up there.
    Inputs { source: PathBuf, stage: PathBuf, store: String, names: Vec<String> },
}

/// Everything the sandbox helper needs: where the root is, what to mount, what to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// The host directory that becomes `/`.
    pub root: PathBuf,
    pub mounts: Vec<Mount>,
    /// Keep the host's network namespace (fixed-output derivations only).
    pub network: bool,
    pub uid: u32,
    pub gid: u32,
    pub workdir: String,
    pub builder: String,
    pub args: Vec<String>,
    /// The builder's whole environment, sorted by name.
    pub env: Vec<(String, String)>,
    /// The builder's `RLIMIT_NPROC` (see [`SandboxLimits::max_processes`](crate::limits::SandboxLimits)).
    pub max_processes: Option<u64>,
}

impl SandboxSpec {
    /// `target` resolved under the root on the host.
    pub fn host_path(&self, target: &str) -> PathBuf {
        under(&self.root, target)
    }

    /// Keeps, of the inputs to bind, those the skeleton gave a mount point (`bound`, by store
    /// path base name, as [`crate::root::create`] returns them): the others were linked or
    /// copied into the root.
    pub fn bind_only(&mut self, bound: &std::collections::BTreeSet<String>) {
        for m in &mut self.mounts {
            if let Mount::Inputs { names, .. } = m {
                names.retain(|n| bound.contains(n));
            }
        }
        self.mounts.retain(|m| !matches!(m, Mount::Inputs { names, .. } if names.is_empty()));
    }
}

/// Where [`Mount::Inputs`] stages the store for a sandbox whose root is `root`: a directory
/// beside it (created with it), which the chrooted builder cannot reach.
pub fn input_stage(root: &Path) -> PathBuf {
    root.with_file_name("inputs")
}

/// `inner` (absolute, inside the sandbox) under `root` on the host.
pub fn under(root: &Path, inner: &str) -> PathBuf {
    root.join(inner.trim_start_matches('/'))
}

/// What [`plan`] needs to know about one build.
#[derive(Debug, Clone)]
pub struct BuildInput<'a> {
    pub store_dir: &'a StoreDir,
    /// Where the store directory really is on the host (differs from the logical store
    /// directory when the store lives under a root directory).
    pub real_store_dir: &'a Path,
    pub drv: &'a Derivation,
    /// The outputs to produce, by name.
    pub outputs: &'a BTreeMap<String, StorePath>,
    /// The closure of the input sources and input derivations' outputs.
    pub inputs: &'a [StorePath],
    /// `sandbox-paths`.
    pub sandbox_paths: &'a [SandboxPath],
    /// `NIX_BUILD_CORES`.
    pub cores: usize,
    /// The host directory that becomes `/`.
    pub root: &'a Path,
    pub limits: SandboxLimits,
    /// Values of the derivation's `impureEnvVars` (the requesting client's, else the daemon's,
    /// else empty); set only for a fixed-output derivation, after Nix's own variables.
    pub impure_env: &'a [(String, String)],
    /// What `exportReferencesGraph` gives the build ([`crate::refgraph`]; read from the store
    /// by the caller, so that this stays pure).
    pub graphs: &'a Graphs,
    /// Inputs that are not directories may be hard-linked into the root: the store is on the
    /// root's file system and its files are not the build user's (who could otherwise change
    /// the store through the link).
    pub link_inputs: bool,
}

/// Why a derivation cannot be built as asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(transparent)]
    Attrs(#[from] AttrsError),
    #[error("sandbox-paths entry '{0}' must be an absolute path outside the store directory")]
    BadSandboxPath(String),
    #[error("the builder '{0}' is neither in the input closure nor in sandbox-paths")]
    BuilderNotAvailable(String),
}

/// The skeleton to create and the spec to apply for one build.
pub fn plan(b: &BuildInput<'_>) -> Result<(Skeleton, SandboxSpec), PlanError> {
    let drv = b.drv;
    // With structured attributes the builder gets files instead of the derivation's variables.
    let structured = crate::structured::parse(&drv.env, "derivation")?;
    // Output paths by name, for the hash placeholders Nix rewrites in what the builder sees.
    let output_paths: BTreeMap<String, String> =
        b.outputs.iter().map(|(n, p)| (n.clone(), b.store_dir.display(p))).collect();
    let rewrite = |s: &str| crate::structured::rewrite(s, &output_paths);
    let fixed = drv.outputs.len() == 1 && drv.outputs.values().all(|o| !o.hash.is_empty());
    let store = b.store_dir.as_str();
    let mut sk: Skeleton = Vec::new();
    let dir = |path: &str, mode, owner| Node::Dir { path: path.to_owned(), mode, owner };

    // Parents of the store directory, then the store directory itself: writable by the builder's
    // group (the outputs are created there), sticky so that it cannot remove what it did not
    // create.
    let mut prefix = String::new();
    for part in store.trim_start_matches('/').split('/').collect::<Vec<_>>().split_last().map(|(_, p)| p).unwrap_or(&[])
    {
        prefix = format!("{prefix}/{part}");
        sk.push(dir(&prefix, 0o755, Owner::Daemon));
    }
    sk.push(dir(store, 0o1775, Owner::BuildGroup));
    sk.push(dir(BUILD_TOP, 0o700, Owner::Builder));
    sk.push(dir("/etc", 0o755, Owner::Daemon));
    sk.push(dir("/tmp", 0o1777, Owner::Daemon));
    sk.push(dir("/proc", 0o555, Owner::Daemon));
    sk.push(dir("/dev", 0o755, Owner::Daemon));
    sk.push(dir("/dev/shm", 0o755, Owner::Daemon));
    sk.push(dir("/dev/pts", 0o755, Owner::Daemon));
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        sk.push(Node::Symlink { path: format!("/dev/{name}"), target: target.to_owned() });
    }
    sk.push(Node::File {
        path: "/etc/passwd".into(),
        contents: passwd().into_bytes(),
        mode: 0o444,
        owner: Owner::Daemon,
    });
    sk.push(Node::File {
        path: "/etc/group".into(),
        contents: group().into_bytes(),
        mode: 0o444,
        owner: Owner::Daemon,
    });

    let mut mounts = Vec::new();
    let mut bind = |sk: &mut Skeleton, source: PathBuf, target: String, dir: bool, read_only: bool| {
        sk.push(Node::MountPoint { path: target.clone(), dir });
        mounts.push(Mount::Bind { source, target, read_only });
    };
    for d in DEVICES {
        bind(&mut sk, PathBuf::from(d), (*d).to_owned(), false, false);
    }
    // A derivation that asks for the `kvm` feature gets the device, as Nix gives it.
    let kvm = crate::requirements::Attrs::new(drv, "derivation")
        .and_then(|a| a.required_features())
        .is_ok_and(|f| f.contains("kvm"));
    if kvm && Path::new(KVM).exists() {
        bind(&mut sk, PathBuf::from(KVM), KVM.to_owned(), false, false);
    }
    if fixed {
        // Only files and DNS resolve names: no other name service of the host leaks in.
        sk.push(Node::File {
            path: "/etc/nsswitch.conf".into(),
            contents: b"hosts: files dns\nservices: files\n".to_vec(),
            mode: 0o444,
            owner: Owner::Daemon,
        });
        for f in NETWORK_FILES {
            if Path::new(f).exists() {
                bind(&mut sk, PathBuf::from(f), (*f).to_owned(), false, true);
            }
        }
    } else {
        sk.push(Node::File {
            path: "/etc/hosts".into(),
            contents: b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
            mode: 0o444,
            owner: Owner::Daemon,
        });
    }
    // Inputs: a directory is bound read-only. Anything else is hard-linked (`link_inputs`),
    // else copied if small: either costs less than a mount point, a mount and its unmounting —
    // the largest per-input cost of a build — and a copy is the builder's alone. Which is
    // which is known once the skeleton is made ([`SandboxSpec::bind_only`]).
    let mut names = Vec::with_capacity(b.inputs.len());
    for p in b.inputs {
        let source = b.real_store_dir.join(p.base_name());
        sk.push(Node::Input { path: b.store_dir.display(p), source, link: b.link_inputs });
        names.push(p.base_name());
    }
    let inputs = (!names.is_empty()).then(|| Mount::Inputs {
        source: b.real_store_dir.to_owned(),
        stage: input_stage(b.root),
        store: store.to_owned(),
        names,
    });
    for SandboxPath { inside, host, optional } in b.sandbox_paths {
        // Nix's `PATH?`: left out where the host has no such path.
        if *optional && std::fs::symlink_metadata(host).is_err() {
            continue;
        }
        if !inside.starts_with('/') || inside.starts_with(&format!("{store}/")) || inside == store {
            return Err(PlanError::BadSandboxPath(inside.clone()));
        }
        // Parents of the mount point, created if the skeleton lacks them.
        let mut prefix = String::new();
        let parts: Vec<&str> = inside.trim_start_matches('/').split('/').collect();
        for part in &parts[..parts.len() - 1] {
            prefix = format!("{prefix}/{part}");
            if !sk.iter().any(|n| matches!(n, Node::Dir { path, .. } if *path == prefix)) {
                sk.push(dir(&prefix, 0o755, Owner::Daemon));
            }
        }
        let is_dir = std::fs::metadata(host).map(|m| m.is_dir()).unwrap_or(false);
        bind(&mut sk, host.clone(), inside.clone(), is_dir, true);
    }
    mounts.extend(inputs);
    mounts.push(Mount::Tmpfs { target: "/dev/shm".into(), size: b.limits.dev_shm_size });
    mounts.push(Mount::Devpts { target: "/dev/pts".into() });
    sk.push(Node::Symlink { path: "/dev/ptmx".into(), target: "/dev/pts/ptmx".into() });
    mounts.push(Mount::Proc { target: "/proc".into() });

    if !builder_available(b) {
        return Err(PlanError::BuilderNotAvailable(drv.builder.clone()));
    }

    let mut env = BTreeMap::new();
    // Set first, so that the derivation may override them.
    env.insert("PATH".to_owned(), "/path-not-set".to_owned());
    env.insert("HOME".to_owned(), HOME.to_owned());
    env.insert("NIX_STORE".to_owned(), store.to_owned());
    env.insert("NIX_BUILD_CORES".to_owned(), b.cores.to_string());
    let pass_as_file: Vec<&str> = drv.env.get("passAsFile").map(|v| v.split_whitespace().collect()).unwrap_or_default();
    for (k, v) in drv.env.iter().filter(|_| structured.is_none()) {
        let (k, v) = (&rewrite(k), &rewrite(v));
        if pass_as_file.contains(&k.as_str()) {
            let name = format!(".attr-{}", Hash::digest(HashAlgo::Sha256, k.as_bytes()).encode(Encoding::Nix32));
            let path = format!("{BUILD_TOP}/{name}");
            sk.push(Node::File {
                path: path.clone(),
                contents: v.as_bytes().to_vec(),
                mode: 0o644,
                owner: Owner::Builder,
            });
            env.insert(format!("{k}Path"), path);
        } else {
            env.insert(k.clone(), v.clone());
        }
    }
    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        env.insert(k.to_owned(), BUILD_TOP.to_owned());
    }
    if fixed {
        env.insert("NIX_OUTPUT_CHECKED".to_owned(), "1".to_owned());
        env.extend(b.impure_env.iter().cloned());
    }
    env.insert("NIX_LOG_FD".to_owned(), "2".to_owned());
    env.insert("TERM".to_owned(), "xterm-256color".to_owned());
    if let Some(attrs) = &structured {
        let (json, sh) = crate::structured::files(attrs, &output_paths, &b.graphs.attrs);
        // Nix 2.8 names its build directory outside the sandbox (see `crate::structured`).
        let name = attrs.get("name").and_then(|n| n.as_str()).unwrap_or_default();
        let outside = format!("/tmp/nix-build-{name}.drv-0");
        for (file, contents, var) in
            [(".attrs.sh", sh, "NIX_ATTRS_SH_FILE"), (".attrs.json", json, "NIX_ATTRS_JSON_FILE")]
        {
            sk.push(Node::File {
                path: format!("{BUILD_TOP}/{file}"),
                contents: contents.into_bytes(),
                mode: 0o644,
                owner: Owner::Builder,
            });
            env.insert(var.to_owned(), format!("{outside}/{file}"));
        }
    }
    // Legacy `exportReferencesGraph` files, written by the daemon as Nix writes them.
    for (file, contents) in &b.graphs.files {
        sk.push(Node::File {
            path: format!("{BUILD_TOP}/{file}"),
            contents: contents.clone(),
            mode: 0o644,
            owner: Owner::Builder,
        });
    }

    let spec = SandboxSpec {
        root: b.root.to_owned(),
        mounts,
        network: fixed,
        uid: SANDBOX_UID,
        gid: SANDBOX_GID,
        workdir: BUILD_TOP.to_owned(),
        builder: drv.builder.clone(),
        args: drv.args.iter().map(|a| rewrite(a)).collect(),
        env: env.into_iter().collect(),
        max_processes: b.limits.max_processes,
    };
    Ok((sk, spec))
}

/// Whether the builder is reachable in the sandbox: inside an input path, or a sandbox path.
fn builder_available(b: &BuildInput<'_>) -> bool {
    let builder = b.drv.builder.as_str();
    if let Ok((p, _)) = b.store_dir.parse_inner(builder) {
        return b.inputs.contains(&p);
    }
    b.sandbox_paths.iter().any(|p| builder == p.inside || builder.starts_with(&format!("{}/", p.inside)))
}

/// `/etc/passwd` as Nix 2.8 writes it.
pub fn passwd() -> String {
    format!(
        "root:x:0:0:Nix build user:{BUILD_TOP}:/noshell\n\
         nixbld:x:{SANDBOX_UID}:{SANDBOX_GID}:Nix build user:{BUILD_TOP}:/noshell\n\
         nobody:x:65534:65534:Nobody:/:/noshell\n"
    )
}

/// `/etc/group` as Nix 2.8 writes it.
pub fn group() -> String {
    format!("root:x:0:\nnixbld:!:{SANDBOX_GID}:\nnogroup:x:65534:\n")
}

/// One `sandbox-paths` entry: the host's `host` seen in the sandbox at `inside`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPath {
    pub inside: String,
    pub host: PathBuf,
    /// Left out where the host has no such path (Nix's trailing `?`).
    pub optional: bool,
}

impl SandboxPath {
    /// `INSIDE` bound from the same path of the host.
    pub fn same(path: &str) -> SandboxPath {
        SandboxPath { inside: path.to_owned(), host: path.into(), optional: false }
    }
}

/// Parses one `sandbox-paths` entry as Nix does: `PATH` or `INSIDE=HOST`, either with a
/// trailing `?` if it may be missing on the host.
pub fn parse_sandbox_path(entry: &str) -> SandboxPath {
    let (entry, optional) = match entry.strip_suffix('?') {
        Some(e) => (e, true),
        None => (entry, false),
    };
    match entry.split_once('=') {
        Some((inside, host)) => SandboxPath { inside: inside.to_owned(), host: PathBuf::from(host), optional },
        None => SandboxPath { optional, ..SandboxPath::same(entry) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_nix::derivation::DerivationOutput;

    fn drv(fixed: bool) -> Derivation {
        let mut d = Derivation {
            platform: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            args: vec!["-c".into(), "echo hi > $out".into()],
            ..Default::default()
        };
        let (algo, hash) = if fixed { ("sha256".to_owned(), "ab".repeat(32)) } else { (String::new(), String::new()) };
        d.outputs.insert(
            "out".into(),
            DerivationOutput { path: "/nix/store/00000000000000000000000000000000-x".into(), hash_algo: algo, hash },
        );
        d.env.insert("name".into(), "x".into());
        d.env.insert("PATH".into(), "/mine".into());
        d.env.insert("TMPDIR".into(), "/elsewhere".into());
        d.env.insert("big".into(), "contents".into());
        d.env.insert("passAsFile".into(), "big".into());
        d
    }

    fn plan_of(d: &Derivation, sandbox_paths: &[SandboxPath]) -> Result<(Skeleton, SandboxSpec), PlanError> {
        let dir = StoreDir::new("/nix/store").unwrap();
        let outputs = BTreeMap::new();
        let input = StorePath::from_base_name("11111111111111111111111111111111-dep").unwrap();
        plan(&BuildInput {
            store_dir: &dir,
            real_store_dir: Path::new("/srv/cairn/nix/store"),
            drv: d,
            outputs: &outputs,
            inputs: &[input],
            sandbox_paths,
            cores: 3,
            root: Path::new("/tmp/b/root"),
            limits: SandboxLimits { max_processes: Some(64), dev_shm_size: TmpfsSize::Bytes(8 << 20) },
            impure_env: &[("http_proxy".into(), "http://proxy:3128".into()), ("TMPDIR".into(), "/t".into())],
            graphs: &Graphs::default(),
            link_inputs: false,
        })
    }

    fn sh() -> Vec<SandboxPath> {
        vec![parse_sandbox_path("/bin/sh=/bin/busybox")]
    }

    #[test]
    fn environment_follows_nix() {
        let (sk, spec) = plan_of(&drv(false), &sh()).unwrap();
        let env: BTreeMap<_, _> = spec.env.iter().cloned().collect();
        assert_eq!(env["PATH"], "/mine", "the derivation overrides PATH");
        assert_eq!(env["TMPDIR"], "/build", "but not the temporary directories");
        assert_eq!(env["HOME"], "/homeless-shelter");
        assert_eq!(env["NIX_STORE"], "/nix/store");
        assert_eq!(env["NIX_BUILD_CORES"], "3");
        assert_eq!(env["NIX_LOG_FD"], "2");
        assert_eq!(env["TERM"], "xterm-256color");
        assert!(!env.contains_key("big") && !env.contains_key("NIX_OUTPUT_CHECKED"));
        let file = &env["bigPath"];
        assert!(file.starts_with("/build/.attr-"), "{file}");
        assert!(sk
            .iter()
            .any(|n| matches!(n, Node::File { path, contents, .. } if path == file && contents == b"contents")));
        assert!(!spec.network);
        assert_eq!((spec.uid, spec.gid, spec.workdir.as_str()), (1000, 100, "/build"));
    }

    #[test]
    fn inputs_are_bound_read_only_and_proc_comes_last() {
        let (sk, spec) = plan_of(&drv(false), &sh()).unwrap();
        let root = spec.root.clone();
        assert!(spec.mounts.contains(&Mount::Inputs {
            source: "/srv/cairn/nix/store".into(),
            stage: input_stage(&root),
            store: "/nix/store".into(),
            names: vec!["11111111111111111111111111111111-dep".into()],
        }));
        assert!(sk.iter().any(|n| matches!(n, Node::Input { path, source, link: false }
            if path == "/nix/store/11111111111111111111111111111111-dep"
                && source == Path::new("/srv/cairn/nix/store/11111111111111111111111111111111-dep"))));
        // Placed by a link or a copy: no bind.
        let mut placed = spec.clone();
        placed.bind_only(&Default::default());
        assert!(!placed.mounts.iter().any(|m| matches!(m, Mount::Inputs { .. })));
        let mut bound = spec.clone();
        bound.bind_only(&["11111111111111111111111111111111-dep".to_owned()].into());
        assert_eq!(bound, spec);
        assert_eq!(spec.mounts.last(), Some(&Mount::Proc { target: "/proc".into() }));
        for m in &spec.mounts {
            if let Mount::Bind { target, .. } = m {
                assert!(sk.iter().any(|n| matches!(n, Node::MountPoint { path, .. } if path == target)), "{target}");
            }
        }
        assert!(sk.contains(&Node::Dir { path: "/nix/store".into(), mode: 0o1775, owner: Owner::BuildGroup }));
        let hosts = sk.iter().find_map(|n| match n {
            Node::File { path, contents, .. } if path == "/etc/hosts" => Some(contents.clone()),
            _ => None,
        });
        assert_eq!(hosts.as_deref(), Some(&b"127.0.0.1 localhost\n::1 localhost\n"[..]));
    }

    #[test]
    fn no_host_terminal_is_reachable_in_dev() {
        let (sk, spec) = plan_of(&drv(false), &sh()).unwrap();
        let in_dev = |p: &str| {
            sk.iter().any(|n| match n {
                Node::Dir { path, .. } | Node::File { path, .. } | Node::Symlink { path, .. } => path == p,
                Node::MountPoint { path, .. } | Node::Input { path, .. } => path == p,
            }) || spec.mounts.iter().any(|m| match m {
                Mount::Bind { source, target, .. } => target == p || source == Path::new(p),
                Mount::Tmpfs { target, .. } | Mount::Proc { target } | Mount::Devpts { target } => target == p,
                Mount::Inputs { .. } => false,
            })
        };
        for tty in ["/dev/tty", "/dev/console", "/dev/tty0"] {
            assert!(!in_dev(tty), "{tty} is not provided");
        }
        assert!(in_dev("/dev/null") && in_dev("/dev/urandom"));
        // Pseudo-terminals come from a private instance, never the host's.
        assert!(spec.mounts.contains(&Mount::Devpts { target: "/dev/pts".into() }));
        assert!(!spec.mounts.iter().any(|m| matches!(m, Mount::Bind { source, .. } if source.starts_with("/dev/pts"))));
        assert!(sk.contains(&Node::Symlink { path: "/dev/ptmx".into(), target: "/dev/pts/ptmx".into() }));
    }

    #[test]
    fn limits_reach_the_spec_and_dev_shm_is_sized() {
        let (_, spec) = plan_of(&drv(false), &sh()).unwrap();
        assert_eq!(spec.max_processes, Some(64));
        assert!(spec.mounts.contains(&Mount::Tmpfs { target: "/dev/shm".into(), size: TmpfsSize::Bytes(8 << 20) }));
        // The helper gets them through its JSON line.
        let back: SandboxSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn fixed_output_keeps_the_network() {
        let (_, spec) = plan_of(&drv(true), &sh()).unwrap();
        assert!(spec.network);
        assert!(spec.env.contains(&("NIX_OUTPUT_CHECKED".into(), "1".into())));
    }

    #[test]
    fn impure_variables_reach_fixed_outputs_only_and_come_after_nixs() {
        let env = |fixed| plan_of(&drv(fixed), &sh()).unwrap().1.env.into_iter().collect::<BTreeMap<_, _>>();
        let (fixed, plain) = (env(true), env(false));
        assert_eq!(fixed["http_proxy"], "http://proxy:3128");
        assert_eq!(fixed["TMPDIR"], "/t", "set after TMPDIR, as Nix's initEnv does");
        assert!(!plain.contains_key("http_proxy"));
        assert_eq!(plain["TMPDIR"], "/build");
    }

    #[test]
    fn refusals() {
        assert_eq!(plan_of(&drv(false), &[]).unwrap_err(), PlanError::BuilderNotAvailable("/bin/sh".into()));
        let bad = vec![parse_sandbox_path("/nix/store/x=/x")];
        assert!(matches!(plan_of(&drv(false), &bad).unwrap_err(), PlanError::BadSandboxPath(_)));
        let mut d = drv(false);
        d.env.insert("__json".into(), "{".into());
        assert!(matches!(plan_of(&d, &sh()).unwrap_err(), PlanError::Attrs(_)));
    }

    fn plan_with_outputs(d: &Derivation, graphs: &Graphs) -> (Skeleton, SandboxSpec) {
        let dir = StoreDir::new("/nix/store").unwrap();
        let out = StorePath::from_base_name("22222222222222222222222222222222-x").unwrap();
        let outputs = BTreeMap::from([("out".to_owned(), out)]);
        plan(&BuildInput {
            store_dir: &dir,
            real_store_dir: Path::new("/srv/cairn/nix/store"),
            drv: d,
            outputs: &outputs,
            inputs: &[],
            sandbox_paths: &sh(),
            cores: 1,
            root: Path::new("/tmp/b/root"),
            limits: SandboxLimits { max_processes: None, dev_shm_size: TmpfsSize::Bytes(8 << 20) },
            impure_env: &[],
            graphs,
            link_inputs: false,
        })
        .unwrap()
    }

    fn file<'a>(sk: &'a Skeleton, p: &str) -> Option<&'a [u8]> {
        sk.iter().find_map(|n| match n {
            Node::File { path, contents, .. } if path == p => Some(&contents[..]),
            _ => None,
        })
    }

    #[test]
    fn structured_attrs_replace_the_environment_with_attrs_files() {
        let mut d = drv(false);
        d.env = BTreeMap::from([
            ("__json".into(), r#"{"name":"x","greeting":"hi"}"#.into()),
            ("out".into(), "/nix/store/22222222222222222222222222222222-x".into()),
        ]);
        let (sk, spec) = plan_with_outputs(&d, &Graphs::default());
        let env: BTreeMap<_, _> = spec.env.iter().cloned().collect();
        assert!(!env.contains_key("__json") && !env.contains_key("out") && !env.contains_key("greeting"));
        assert_eq!(env["NIX_ATTRS_JSON_FILE"], "/tmp/nix-build-x.drv-0/.attrs.json", "Nix 2.8's value");
        assert_eq!(env["NIX_ATTRS_SH_FILE"], "/tmp/nix-build-x.drv-0/.attrs.sh");
        assert_eq!(
            file(&sk, "/build/.attrs.json"),
            Some(
                &br#"{"greeting":"hi","name":"x","outputs":{"out":"/nix/store/22222222222222222222222222222222-x"}}"#[..]
            )
        );
        assert_eq!(
            file(&sk, "/build/.attrs.sh"),
            Some(
                &b"declare greeting='hi'\ndeclare name='x'\n\
                   declare -A outputs=(['out']='/nix/store/22222222222222222222222222222222-x' )\n"[..]
            )
        );
    }

    #[test]
    fn placeholders_become_output_paths_in_environment_and_arguments() {
        let mut d = drv(false);
        let ph = crate::structured::hash_placeholder("out");
        d.env.insert("where".into(), format!("{ph}/bin"));
        d.args.push(format!("{ph}/lib"));
        let (_, spec) = plan_with_outputs(&d, &Graphs::default());
        assert!(spec.env.contains(&("where".into(), "/nix/store/22222222222222222222222222222222-x/bin".into())));
        assert_eq!(spec.args.last().map(String::as_str), Some("/nix/store/22222222222222222222222222222222-x/lib"));
    }

    #[test]
    fn export_references_graph_files_land_in_the_build_directory() {
        let graphs = Graphs { files: BTreeMap::from([("g".to_owned(), b"graph".to_vec())]), ..Graphs::default() };
        let (sk, _) = plan_with_outputs(&drv(false), &graphs);
        assert_eq!(file(&sk, "/build/g"), Some(&b"graph"[..]));
    }

    #[test]
    fn etc_files() {
        assert_eq!(
            passwd(),
            "root:x:0:0:Nix build user:/build:/noshell\nnixbld:x:1000:100:Nix build user:/build:/noshell\n\
             nobody:x:65534:65534:Nobody:/:/noshell\n"
        );
        assert_eq!(group(), "root:x:0:\nnixbld:!:100:\nnogroup:x:65534:\n");
        let sh = SandboxPath { inside: "/bin/sh".into(), host: "/bin/busybox".into(), optional: false };
        assert_eq!(parse_sandbox_path("/bin/sh=/bin/busybox"), sh);
        assert_eq!(parse_sandbox_path("/etc/ssl?"), SandboxPath { optional: true, ..SandboxPath::same("/etc/ssl") });
        assert!(parse_sandbox_path("/x=/nowhere?").optional);
    }
}
