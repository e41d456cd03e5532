//! The system calls that build a sandbox, behind a trait.
//!
//! [`detach`] (the sandbox helper's first step), [`isolate`] (run by the helper once its user
//! namespace is mapped) and [`enter`] (run by the sandbox's PID 1 just before it becomes the
//! builder) apply a [`SandboxSpec`] through [`Sys`]. [`Linux`] makes the calls; tests give a
//! recorder instead and check the order and the arguments without root: the helper leaves the
//! daemon's session (and so its controlling terminal) and closes every descriptor it inherited
//! but 0–2 before anything else, nothing is mounted before the mount namespace is private,
//! inputs are bound read-only, `/dev/shm` is sized, `/proc` is mounted from inside the new PID
//! namespace, the builder gets a session and a process limit of its own, ids are dropped last.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use nix::sched::CloneFlags;

use crate::sandbox::{Mount, SandboxSpec, HOSTNAME};

/// One `mount(2)` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountCall {
    pub source: Option<PathBuf>,
    pub target: PathBuf,
    pub fstype: Option<String>,
    pub flags: MsFlags,
    pub data: Option<String>,
}

impl MountCall {
    /// A recursive bind of `source` at `target`.
    fn bind(source: &Path, target: PathBuf) -> MountCall {
        MountCall {
            source: Some(source.to_owned()),
            target,
            fstype: None,
            flags: MsFlags::MS_BIND | MsFlags::MS_REC,
            data: None,
        }
    }
}

/// The calls a sandbox needs.
pub trait Sys {
    fn unshare(&mut self, flags: CloneFlags) -> io::Result<()>;
    fn mount(&mut self, call: &MountCall) -> io::Result<()>;
    /// The flags of the mount holding `path` that an unprivileged remount must keep (`nosuid`,
    /// `nodev`, `noexec`): the kernel refuses to clear them from inside a user namespace.
    fn locked_flags(&mut self, path: &Path) -> io::Result<MsFlags>;
    fn sethostname(&mut self, name: &str) -> io::Result<()>;
    fn chroot(&mut self, dir: &Path) -> io::Result<()>;
    fn chdir(&mut self, dir: &Path) -> io::Result<()>;
    /// Becomes `uid`/`gid` (inside the user namespace), losing every capability.
    fn set_ids(&mut self, uid: u32, gid: u32) -> io::Result<()>;
    fn no_new_privs(&mut self) -> io::Result<()>;
    /// Loads the builder's system-call filter ([`crate::seccomp`]); needs `no_new_privs`.
    fn filter_syscalls(&mut self) -> io::Result<()>;
    /// Brings up `lo` in a new network namespace (it starts down), so that a build can still
    /// talk to itself over 127.0.0.1.
    fn loopback_up(&mut self) -> io::Result<()>;
    /// Starts a new session: the process leaves its controlling terminal behind, and nothing it
    /// starts can get one back without a terminal device (the sandbox has none).
    fn setsid(&mut self) -> io::Result<()>;
    /// Closes every descriptor from 3 up ([`Descriptors::Close`]), or marks them close-on-exec
    /// ([`Descriptors::CloseOnExec`]): a descriptor the daemon inherited open, on a secret file
    /// or on a directory outside the root, must not reach a builder.
    fn close_descriptors(&mut self, how: Descriptors) -> io::Result<()>;
    /// Sets `RLIMIT_NPROC`, soft and hard.
    fn limit_processes(&mut self, max: u64) -> io::Result<()>;
}

/// How [`Sys::close_descriptors`] treats descriptors from 3 up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Descriptors {
    Close,
    CloseOnExec,
}

/// A failed step, named.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct SysError {
    pub step: String,
    #[source]
    pub source: io::Error,
}

fn step<T>(r: io::Result<T>, what: impl FnOnce() -> String) -> Result<T, SysError> {
    r.map_err(|source| SysError { step: what(), source })
}

/// The namespaces a build gets besides its user namespace: all but the network namespace for
/// a build that keeps the host's network (`network`, fixed-output derivations only).
pub fn namespaces(network: bool) -> CloneFlags {
    let mut f =
        CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    if !network {
        f |= CloneFlags::CLONE_NEWNET;
    }
    f
}

/// The helper's first step, before it reads its spec: a session of its own (no controlling
/// terminal: the daemon may have been started from a shell) and no descriptor but 0–2.
pub fn detach(sys: &mut dyn Sys) -> Result<(), SysError> {
    step(sys.setsid(), || "start a new session".into())?;
    step(sys.close_descriptors(Descriptors::Close), || "close inherited descriptors".into())?;
    Ok(())
}

/// Unshares the build's namespaces (see [`namespaces`]), makes the new mount namespace private,
/// names the host [`HOSTNAME`] and, in a network namespace of its own, brings up `lo`. Nothing
/// here depends on the build: a helper does it before its spec arrives.
pub fn unshare_namespaces(network: bool, sys: &mut dyn Sys) -> Result<(), SysError> {
    step(sys.unshare(namespaces(network)), || "unshare the build's namespaces".into())?;
    // Nothing mounted from here on may reach the host's mounts.
    step(
        sys.mount(&MountCall {
            source: None,
            target: "/".into(),
            fstype: None,
            flags: MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            data: None,
        }),
        || "make the mount namespace private".into(),
    )?;
    step(sys.sethostname(HOSTNAME), || "set the host name".into())?;
    if !network {
        step(sys.loopback_up(), || "bring up the loopback interface".into())?;
    }
    Ok(())
}

/// In namespaces made by [`unshare_namespaces`]: makes every mount but `/proc` (which must be
/// mounted from inside the new PID namespace: see [`enter`]).
pub fn isolate(spec: &SandboxSpec, sys: &mut dyn Sys) -> Result<(), SysError> {
    for m in &spec.mounts {
        match m {
            Mount::Bind { source, target, read_only: true } => {
                bind_read_only(sys, source, &spec.host_path(target), target)?;
            }
            Mount::Bind { source, target, read_only: false } => {
                step(sys.mount(&MountCall::bind(source, spec.host_path(target))), || {
                    format!("bind '{}' at '{target}'", source.display())
                })?
            }
            Mount::Tmpfs { target, size } => step(
                sys.mount(&MountCall {
                    source: Some("none".into()),
                    target: spec.host_path(target),
                    fstype: Some("tmpfs".into()),
                    flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    data: Some(format!("mode=1777,size={}", size.option())),
                }),
                || format!("mount a tmpfs of {size} at '{target}'"),
            )?,
            Mount::Inputs { source, stage, store, names } => {
                bind_read_only(sys, source, stage, &stage.display().to_string())?;
                for name in names {
                    let target = format!("{store}/{name}");
                    step(sys.mount(&MountCall::bind(&stage.join(name), spec.host_path(&target))), || {
                        format!("bind input '{target}'")
                    })?;
                }
            }
            Mount::Devpts { target } => step(
                sys.mount(&MountCall {
                    source: Some("devpts".into()),
                    target: spec.host_path(target),
                    fstype: Some("devpts".into()),
                    flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                    data: Some("newinstance,mode=0620,ptmxmode=0666".into()),
                }),
                || format!("mount a private devpts at '{target}'"),
            )?,
            Mount::Proc { .. } => {}
        }
    }
    Ok(())
}

/// Binds `source` at `target` (shown as `shown`) and remounts it read-only, keeping the flags
/// an unprivileged remount must keep.
fn bind_read_only(sys: &mut dyn Sys, source: &Path, target: &Path, shown: &str) -> Result<(), SysError> {
    step(sys.mount(&MountCall::bind(source, target.to_owned())), || {
        format!("bind '{}' at '{shown}'", source.display())
    })?;
    let locked = step(sys.locked_flags(source), || format!("statvfs '{}'", source.display()))?;
    step(
        sys.mount(&MountCall {
            source: None,
            target: target.to_owned(),
            fstype: None,
            flags: MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | locked,
            data: None,
        }),
        || format!("make '{shown}' read-only"),
    )
}

/// In the sandbox's PID 1: starts the builder's session, mounts `/proc`, enters the root, sets
/// the process limit, leaves no descriptor but 0–2 to the builder, and drops to the build user.
pub fn enter(spec: &SandboxSpec, sys: &mut dyn Sys) -> Result<(), SysError> {
    // As Nix's builders: a session of their own, so no terminal's signals reach them either.
    step(sys.setsid(), || "start the builder's session".into())?;
    for m in &spec.mounts {
        if let Mount::Proc { target } = m {
            step(
                sys.mount(&MountCall {
                    source: Some("none".into()),
                    target: spec.host_path(target),
                    fstype: Some("proc".into()),
                    flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                    data: None,
                }),
                || format!("mount proc at '{target}'"),
            )?;
        }
    }
    step(sys.chroot(&spec.root), || format!("enter the sandbox root '{}'", spec.root.display()))?;
    step(sys.chdir(Path::new(&spec.workdir)), || format!("enter '{}'", spec.workdir))?;
    if let Some(max) = spec.max_processes {
        step(sys.limit_processes(max), || format!("limit the builder to {max} processes"))?;
    }
    // Close-on-exec rather than closed: this process still uses what it opened since the
    // helper closed the rest (a descriptor on /dev/null, about to become stdin).
    step(sys.close_descriptors(Descriptors::CloseOnExec), || "mark descriptors close-on-exec".into())?;
    step(sys.set_ids(spec.uid, spec.gid), || format!("become uid {} gid {}", spec.uid, spec.gid))?;
    step(sys.no_new_privs(), || "set no_new_privs".into())?;
    step(sys.filter_syscalls(), || "load the system-call filter".into())?;
    Ok(())
}

/// The real calls.
#[derive(Debug, Default)]
pub struct Linux;

impl Sys for Linux {
    fn unshare(&mut self, flags: CloneFlags) -> io::Result<()> {
        Ok(nix::sched::unshare(flags)?)
    }

    fn mount(&mut self, c: &MountCall) -> io::Result<()> {
        Ok(nix::mount::mount(c.source.as_deref(), &c.target, c.fstype.as_deref(), c.flags, c.data.as_deref())?)
    }

    fn locked_flags(&mut self, path: &Path) -> io::Result<MsFlags> {
        use nix::sys::statvfs::FsFlags;
        let f = nix::sys::statvfs::statvfs(path)?.flags();
        let mut out = MsFlags::empty();
        for (fs, ms) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ] {
            if f.contains(fs) {
                out |= ms;
            }
        }
        Ok(out)
    }

    fn sethostname(&mut self, name: &str) -> io::Result<()> {
        Ok(nix::unistd::sethostname(name)?)
    }

    fn chroot(&mut self, dir: &Path) -> io::Result<()> {
        Ok(nix::unistd::chroot(dir)?)
    }

    fn chdir(&mut self, dir: &Path) -> io::Result<()> {
        Ok(nix::unistd::chdir(dir)?)
    }

    fn set_ids(&mut self, uid: u32, gid: u32) -> io::Result<()> {
        use nix::unistd::{setresgid, setresuid, Gid, Uid};
        let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
        setresgid(g, g, g)?;
        setresuid(u, u, u)?;
        Ok(())
    }

    fn no_new_privs(&mut self) -> io::Result<()> {
        Ok(nix::sys::prctl::set_no_new_privs()?)
    }

    fn filter_syscalls(&mut self) -> io::Result<()> {
        crate::seccomp::install()
    }

    fn setsid(&mut self) -> io::Result<()> {
        nix::unistd::setsid()?;
        Ok(())
    }

    fn close_descriptors(&mut self, how: Descriptors) -> io::Result<()> {
        use nix::libc;
        let flags = match how {
            Descriptors::Close => 0,
            Descriptors::CloseOnExec => libc::CLOSE_RANGE_CLOEXEC,
        };
        // SAFETY: close_range(2) (Linux 5.9; older kernels fail the build rather than leak)
        // changes only the descriptor table. It closes descriptors only in the helper's first
        // step, when nothing in the process owns one above 2: the helper has opened nothing yet
        // and the standard library opens nothing before `main`. Marking close-on-exec closes
        // nothing now.
        #[allow(unsafe_code)]
        let r = unsafe { libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, flags) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn limit_processes(&mut self, max: u64) -> io::Result<()> {
        use nix::sys::resource::{setrlimit, Resource};
        Ok(setrlimit(Resource::RLIMIT_NPROC, max, max)?)
    }

    fn loopback_up(&mut self) -> io::Result<()> {
        use nix::libc;
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
        use std::os::fd::AsRawFd;
        let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
        // SAFETY: `ifreq` is plain data, zero is a valid value for it, and the two ioctls read
        // and write only that struct, whose name is NUL-terminated.
        #[allow(unsafe_code)]
        unsafe {
            let mut req: libc::ifreq = std::mem::zeroed();
            for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
                *d = *s as libc::c_char;
            }
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
                return Err(io::Error::last_os_error());
            }
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use cairn_nix::derivation::{Derivation, DerivationOutput};
    use cairn_nix::{StoreDir, StorePath};

    use crate::sandbox::{plan, BuildInput, SandboxLimits, TmpfsSize};

    /// Records every call; fails the one whose description contains `fail_at`.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<String>,
        fail_at: Option<&'static str>,
    }

    impl Recorder {
        fn record(&mut self, s: String) -> io::Result<()> {
            let fail = self.fail_at.is_some_and(|f| s.contains(f));
            self.calls.push(s);
            if fail {
                return Err(io::Error::from_raw_os_error(1));
            }
            Ok(())
        }
    }

    impl Sys for Recorder {
        fn unshare(&mut self, flags: CloneFlags) -> io::Result<()> {
            self.record(format!("unshare {flags:?}"))
        }
        fn mount(&mut self, c: &MountCall) -> io::Result<()> {
            self.record(format!(
                "mount {:?} {} {:?} {:?} {:?}",
                c.source.as_deref().map(Path::display).map(|d| d.to_string()),
                c.target.display(),
                c.fstype,
                c.flags,
                c.data
            ))
        }
        fn locked_flags(&mut self, _: &Path) -> io::Result<MsFlags> {
            Ok(MsFlags::MS_NOSUID)
        }
        fn sethostname(&mut self, name: &str) -> io::Result<()> {
            self.record(format!("hostname {name}"))
        }
        fn chroot(&mut self, dir: &Path) -> io::Result<()> {
            self.record(format!("chroot {}", dir.display()))
        }
        fn chdir(&mut self, dir: &Path) -> io::Result<()> {
            self.record(format!("chdir {}", dir.display()))
        }
        fn set_ids(&mut self, uid: u32, gid: u32) -> io::Result<()> {
            self.record(format!("ids {uid} {gid}"))
        }
        fn no_new_privs(&mut self) -> io::Result<()> {
            self.record("nnp".into())
        }
        fn filter_syscalls(&mut self) -> io::Result<()> {
            self.record("seccomp".into())
        }
        fn loopback_up(&mut self) -> io::Result<()> {
            self.record("lo up".into())
        }
        fn setsid(&mut self) -> io::Result<()> {
            self.record("setsid".into())
        }
        fn close_descriptors(&mut self, how: Descriptors) -> io::Result<()> {
            self.record(format!("close {how:?}"))
        }
        fn limit_processes(&mut self, max: u64) -> io::Result<()> {
            self.record(format!("nproc {max}"))
        }
    }

    /// What the helper does with a spec: namespaces first (before it has the spec), then mounts.
    fn prepare_and_isolate(spec: &SandboxSpec, r: &mut Recorder) {
        unshare_namespaces(spec.network, r).unwrap();
        isolate(spec, r).unwrap();
    }

    fn spec(fixed: bool) -> SandboxSpec {
        let mut d = Derivation { builder: "/bin/sh".into(), ..Default::default() };
        d.env.insert("name".into(), "x".into());
        let (algo, hash) = if fixed { ("sha256".to_owned(), "ab".repeat(32)) } else { (String::new(), String::new()) };
        d.outputs.insert("out".into(), DerivationOutput { path: String::new(), hash_algo: algo, hash });
        let dir = StoreDir::new("/nix/store").unwrap();
        let input = StorePath::from_base_name("11111111111111111111111111111111-dep").unwrap();
        plan(&BuildInput {
            store_dir: &dir,
            real_store_dir: Path::new("/srv/nix/store"),
            drv: &d,
            outputs: &BTreeMap::new(),
            inputs: &[input],
            sandbox_paths: &[crate::sandbox::parse_sandbox_path("/bin/sh=/bin/busybox")],
            cores: 1,
            root: Path::new("/tmp/r"),
            limits: SandboxLimits { max_processes: Some(64), dev_shm_size: TmpfsSize::Bytes(8 << 20) },
            impure_env: &[],
            graphs: &crate::refgraph::Graphs::default(),
            link_inputs: false,
        })
        .unwrap()
        .1
    }

    #[test]
    fn isolate_privatises_before_mounting_and_binds_inputs_read_only() {
        let mut r = Recorder::default();
        prepare_and_isolate(&spec(false), &mut r);
        assert!(r.calls[0].starts_with("unshare") && r.calls[0].contains("CLONE_NEWNET"), "{}", r.calls[0]);
        assert!(r.calls[1].contains("MS_PRIVATE") && r.calls[1].contains(" / "), "{}", r.calls[1]);
        // The store is staged read-only once, beside the root; each input is bound from there.
        let stage = r.calls.iter().position(|c| c.contains("\"/srv/nix/store\"") && c.contains("/tmp/inputs")).unwrap();
        assert!(r.calls[stage].contains("MS_BIND") && !r.calls[stage].contains("MS_RDONLY"), "{}", r.calls[stage]);
        let remount = &r.calls[stage + 1];
        assert!(remount.contains("MS_REMOUNT") && remount.contains("MS_RDONLY") && remount.contains("/tmp/inputs"));
        assert!(remount.contains("MS_NOSUID"), "locked flags kept: {remount}");
        let bind = &r.calls[stage + 2];
        assert!(
            bind.contains("/tmp/inputs/11111111111111111111111111111111-dep")
                && bind.contains("/tmp/r/nix/store/11111111111111111111111111111111-dep")
                && bind.contains("MS_BIND"),
            "{bind}"
        );
        assert!(!r.calls.iter().any(|c| c.contains("\"proc\"")), "proc is PID 1's job");
        let hostname = r.calls.iter().position(|c| c == "hostname localhost").unwrap();
        assert!(hostname < stage, "named with the namespaces, before any mount of the build");
        let lo = r.calls.iter().position(|c| c == "lo up").expect("a private network still has a loopback");
        assert!(lo < stage);
    }

    #[test]
    fn fixed_output_builds_keep_the_network_namespace() {
        let mut r = Recorder::default();
        prepare_and_isolate(&spec(true), &mut r);
        assert!(!r.calls[0].contains("CLONE_NEWNET") && r.calls[0].contains("CLONE_NEWPID"), "{}", r.calls[0]);
        assert!(!r.calls.contains(&"lo up".to_owned()), "the host's network is left alone");
    }

    #[test]
    fn enter_starts_a_session_mounts_proc_chroots_limits_then_drops_ids() {
        let mut r = Recorder::default();
        enter(&spec(false), &mut r).unwrap();
        let kinds: Vec<&str> = r.calls.iter().map(|c| c.split(' ').next().unwrap()).collect();
        assert_eq!(kinds, ["setsid", "mount", "chroot", "chdir", "nproc", "close", "ids", "nnp", "seccomp"]);
        assert!(r.calls[1].contains("/tmp/r/proc") && r.calls[1].contains("\"proc\""));
        assert_eq!(r.calls[4], "nproc 64", "the builder's process limit comes from the spec");
        assert_eq!(r.calls[5], "close CloseOnExec", "nothing but 0–2 survives the builder's exec");
        assert_eq!(r.calls[6], "ids 1000 100");
        let mut unlimited = spec(false);
        unlimited.max_processes = None;
        let mut r = Recorder::default();
        enter(&unlimited, &mut r).unwrap();
        assert!(!r.calls.iter().any(|c| c.starts_with("nproc")), "{:?}", r.calls);
    }

    #[test]
    fn the_helper_leaves_the_daemons_session_and_descriptors_first() {
        let mut r = Recorder::default();
        detach(&mut r).unwrap();
        assert_eq!(r.calls, ["setsid", "close Close"]);
        let mut r = Recorder { fail_at: Some("setsid"), ..Default::default() };
        let e = detach(&mut r).unwrap_err();
        assert!(e.to_string().starts_with("start a new session: "), "{e}");
        assert_eq!(r.calls, ["setsid"], "a helper that keeps the terminal stops there");
    }

    #[test]
    fn dev_shm_is_a_sized_tmpfs() {
        let mut r = Recorder::default();
        prepare_and_isolate(&spec(false), &mut r);
        let shm = r.calls.iter().find(|c| c.contains("/tmp/r/dev/shm")).unwrap();
        assert!(shm.contains("\"tmpfs\"") && shm.contains("Some(\"mode=1777,size=8388608\")"), "{shm}");
        assert!(shm.contains("MS_NOSUID") && shm.contains("MS_NODEV"), "{shm}");
    }

    #[test]
    fn a_failed_step_is_named_and_stops() {
        let mut r = Recorder { fail_at: Some("chroot"), ..Default::default() };
        let e = enter(&spec(false), &mut r).unwrap_err();
        assert_eq!(e.to_string(), "enter the sandbox root '/tmp/r': Operation not permitted (os error 1)");
        assert!(!r.calls.iter().any(|c| c.starts_with("ids")), "nothing after the failure");
    }
}
