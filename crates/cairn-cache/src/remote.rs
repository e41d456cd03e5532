//! Stores that answer questions instead of serving files, used as substituters: Nix's `ssh://`
//! (`nix-store --serve`, NixOS's `nix.sshServe`), `ssh-ng://` (`nix-daemon --stdio`) and
//! `unix://` stores. How they are reached is above this crate (the daemon reaches them as it
//! reaches remote builders); a substitution asks only what [`RemoteStore`] offers, and checks
//! what comes back as it checks any cache's: signatures or a proving content address (unless
//! the URL says `?trusted=1`, as Nix's `trusted` store setting), then the NAR's size and hash
//! before anything is registered.
//!
//! Such a store has no `nix-cache-info`: as in Nix, its priority is the URL's `?priority=`,
//! else 0, and it is asked in bulk only with `?want-mass-query=true`. Its narinfos are not
//! remembered between substitutions (its answers change as paths come and go).

use std::future::Future;
use std::pin::Pin;

use cairn_nix::StorePath;
use cairn_store::PathInfo;

/// What a remote store answers.
pub trait RemoteStore: Send + Sync {
    /// What the store says of `path`, or `None` if it has no such valid path.
    fn path_info<'a>(&'a self, path: &'a StorePath) -> RemoteAnswer<'a, Option<PathInfo>>;

    /// The NAR of `path`, as a blocking reader: it ends where the NAR ends, and fails (never
    /// just ends) if the store stops sending before that.
    fn nar<'a>(&'a self, path: &'a StorePath) -> RemoteAnswer<'a, Box<dyn std::io::Read + Send>>;
}

/// A remote store's answer, or what went wrong, in a line.
pub type RemoteAnswer<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// Whether `url` names a store reached by Nix's protocols rather than a binary cache.
pub fn is_remote_store(url: &str) -> bool {
    ["ssh://", "ssh-ng://", "unix://"].iter().any(|s| url.starts_with(s))
}
