//! What one build may take of the host, and how a build that ran into a limit is told so.
//!
//! Without limits one build forked ~30,000 processes before its timeout and filled `/dev/shm`
//! (a tmpfs, which the kernel sizes at half the RAM) with a gigabyte. Each limit is a daemon
//! setting named as a Nix user would guess it:
//!
//! - `build-max-processes`: the builder's `RLIMIT_NPROC`, set by the sandbox's PID 1 just
//!   before it executes the builder (soft and hard, so the builder cannot raise it). The
//!   daemon manages no cgroups, so there is no `pids.max` to use; `RLIMIT_NPROC` serves because
//!   the kernel counts it per (user, user namespace) and every build has a user namespace of
//!   its own, so the count is the build's own tasks, threads included — not every process of
//!   the host uid. It does not hold for host root, which the kernel exempts; builds never run
//!   as host root (a root daemon builds as `build-uid-base + N`, a user's daemon as that user).
//! - `sandbox-dev-shm-size`: the `size=` of the sandbox's `/dev/shm` tmpfs.
//! - `build-max-output-size`: checked while each output is serialised
//!   ([`crate::outputs::collect`]), which stops reading at the limit, so a sparse file of
//!   gigabytes costs no more than the limit to refuse.
//!
//! A process limit shows as `EAGAIN` from `fork` and a full tmpfs as `ENOSPC`, which the
//! builder reports in its own words; [`hint`] reads the end of its log so that the failure
//! names the setting to raise.

use serde::{Deserialize, Serialize};

/// The size of a tmpfs, as its `size=` option takes it: bytes, or a percentage of the RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TmpfsSize {
    Bytes(u64),
    Percent(u8),
}

/// Why a size setting was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "'{0}' is not a size: give bytes with an optional K, M or G suffix (\"64M\"), or a percentage of the RAM (\"10%\")"
)]
pub struct BadSize(pub String);

impl TmpfsSize {
    /// Parses `64M`, `1G`, `512k`, `1048576` or `50%` (what Nix's `sandbox-dev-shm-size` takes).
    pub fn parse(s: &str) -> Result<TmpfsSize, BadSize> {
        let bad = || BadSize(s.to_owned());
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            return match p.parse::<u8>() {
                Ok(n) if (1..=100).contains(&n) => Ok(TmpfsSize::Percent(n)),
                _ => Err(bad()),
            };
        }
        let (digits, shift) = match t.char_indices().last() {
            Some((i, 'k' | 'K')) => (&t[..i], 10),
            Some((i, 'm' | 'M')) => (&t[..i], 20),
            Some((i, 'g' | 'G')) => (&t[..i], 30),
            _ => (t, 0),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        match n.checked_mul(1 << shift) {
            Some(b) if b > 0 => Ok(TmpfsSize::Bytes(b)),
            _ => Err(bad()),
        }
    }

    /// The value of tmpfs's `size=` option.
    pub fn option(&self) -> String {
        match self {
            TmpfsSize::Bytes(b) => b.to_string(),
            TmpfsSize::Percent(p) => format!("{p}%"),
        }
    }
}

impl std::fmt::Display for TmpfsSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            TmpfsSize::Bytes(b) if b % (1 << 30) == 0 => write!(f, "{}G", b >> 30),
            TmpfsSize::Bytes(b) if b % (1 << 20) == 0 => write!(f, "{}M", b >> 20),
            TmpfsSize::Bytes(b) if b % (1 << 10) == 0 => write!(f, "{}K", b >> 10),
            TmpfsSize::Bytes(b) => write!(f, "{b}"),
            TmpfsSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What one build may take of the host (`build-max-processes`, `sandbox-dev-shm-size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxLimits {
    /// The builder's `RLIMIT_NPROC` (soft and hard), `None` for the daemon's own. The kernel
    /// counts it per user and user namespace, threads included: each build has its own user
    /// namespace, so this bounds one build's tasks, whatever host uid it maps to — except host
    /// root, which the kernel exempts (builds never map to it: a root daemon builds as
    /// `build-uid-base + N`, a user's daemon as that user).
    pub max_processes: Option<u64>,
    /// The size of the sandbox's `/dev/shm`.
    pub dev_shm_size: TmpfsSize,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits { max_processes: Some(DEFAULT_MAX_PROCESSES), dev_shm_size: DEFAULT_DEV_SHM_SIZE }
    }
}

/// The default of `build-max-processes`: far above what a parallel build runs (compilers,
/// linkers and their threads), far below a host's own limit, so that a fork bomb stops early.
pub const DEFAULT_MAX_PROCESSES: u64 = 4096;
/// The default of `sandbox-dev-shm-size`: Docker's. Nix's "50%" is what an unsized tmpfs gets
/// anyway, which is half the RAM per build.
pub const DEFAULT_DEV_SHM_SIZE: TmpfsSize = TmpfsSize::Bytes(64 << 20);

/// A note naming the limit a failed build most likely ran into, from the last lines of its log.
pub fn hint<'a>(limits: &SandboxLimits, tail: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut processes = false;
    let mut shm = false;
    for line in tail {
        let l = line.to_ascii_lowercase();
        processes |= l.contains("resource temporarily unavailable")
            && (l.contains("fork") || l.contains("clone") || l.contains("thread") || l.contains("spawn"));
        shm |= l.contains("/dev/shm") && l.contains("no space left on device");
    }
    match (processes, limits.max_processes) {
        (true, Some(n)) => Some(format!("it may have reached build-max-processes = {n}")),
        _ if shm => Some(format!("/dev/shm is full: sandbox-dev-shm-size = {}", limits.dev_shm_size)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_tmpfs_takes_them() {
        assert_eq!(TmpfsSize::parse("64M"), Ok(TmpfsSize::Bytes(64 << 20)));
        assert_eq!(TmpfsSize::parse("8m"), Ok(TmpfsSize::Bytes(8 << 20)));
        assert_eq!(TmpfsSize::parse("1G"), Ok(TmpfsSize::Bytes(1 << 30)));
        assert_eq!(TmpfsSize::parse("512k"), Ok(TmpfsSize::Bytes(512 << 10)));
        assert_eq!(TmpfsSize::parse("4096"), Ok(TmpfsSize::Bytes(4096)));
        assert_eq!(TmpfsSize::parse("50%"), Ok(TmpfsSize::Percent(50)));
        for bad in ["", "0", "M", "-1M", "1T", "0%", "101%", "99999999999999G", "1.5G"] {
            assert_eq!(TmpfsSize::parse(bad), Err(BadSize(bad.to_owned())), "{bad}");
        }
        assert_eq!(TmpfsSize::Bytes(8 << 20).option(), "8388608");
        assert_eq!(TmpfsSize::Percent(10).option(), "10%");
        assert_eq!(TmpfsSize::Bytes(8 << 20).to_string(), "8M");
        assert_eq!(TmpfsSize::Bytes(1000).to_string(), "1000");
        let e = TmpfsSize::parse("lots").unwrap_err().to_string();
        assert!(e.starts_with("'lots' is not a size") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn defaults_bound_every_build() {
        let d = SandboxLimits::default();
        assert_eq!(d.max_processes, Some(DEFAULT_MAX_PROCESSES));
        assert_eq!(d.dev_shm_size, TmpfsSize::Bytes(64 << 20));
    }

    #[test]
    fn a_failure_names_the_limit_its_log_shows() {
        let l = SandboxLimits { max_processes: Some(64), dev_shm_size: TmpfsSize::Bytes(8 << 20) };
        let fork = ["building", "sh: can't fork: Resource temporarily unavailable"];
        assert_eq!(hint(&l, fork).as_deref(), Some("it may have reached build-max-processes = 64"));
        let shm = ["dd: error writing '/dev/shm/fill': No space left on device"];
        assert_eq!(hint(&l, shm).as_deref(), Some("/dev/shm is full: sandbox-dev-shm-size = 8M"));
        assert_eq!(hint(&l, ["cc: error: no such file", "write /build/x: No space left on device"]), None);
        let unlimited = SandboxLimits { max_processes: None, ..l };
        assert_eq!(hint(&unlimited, fork), None);
    }
}
