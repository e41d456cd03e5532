//! Nix binary caches: reading them to substitute store paths, and writing them.
//!
//! A binary cache is a set of files: `nix-cache-info` (which store directory it serves, its
//! priority), one `<hash part>.narinfo` per store path (the path's metadata and signatures, and
//! where its NAR is), and the NARs themselves, usually compressed. The formats are in
//! `cairn-nix` (`narinfo`, `signing`); this crate moves the files.
//!
//! - [`backend`]: where the files are (`file://`, `http(s)://`, `s3://`).
//! - [`compression`]: none, xz, zstd, bzip2, as a narinfo's `Compression:` names them.
//! - [`lookup`]: narinfo lookups remembered for a while (positive and negative TTLs).
//! - [`remote`]: stores that answer questions (`ssh://`, `ssh-ng://`, `unix://`) as
//!   substituters, through a [`remote::RemoteStore`] the daemon supplies.
//! - [`substitute`]: closures fetched from several caches by priority, in parallel, each path
//!   checked (narinfo for the right path, trusted signature or proving content address, file
//!   size and hash, NAR size and hash) before anything of it is registered.
//! - [`upload`]: NARs compressed and hashed in one pass for writing a cache.
//! - [`push`]: closures pushed into another cairnd over TCP, checked like substituted ones.

pub mod backend;
pub mod compression;
pub mod lookup;
pub mod push;
pub mod remote;
pub mod substitute;
pub mod upload;

pub use backend::{Backend, NetOptions};
pub use compression::Compression;
pub use lookup::NarInfoCache;
pub use substitute::{substitute, Limits, Policy, Progress, Report, Substituter};

use thiserror::Error;

/// Why a cache could not be used, or a path from it was refused.
#[derive(Debug, Error)]
pub enum CacheError {
    #[error("'{url}': {reason}")]
    Url { url: String, reason: String },
    #[error("{url}: no such file in the cache")]
    Missing { url: String },
    #[error("{url}: {source}")]
    Io {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{url}: no answer within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("compression '{0}' is not one cairn reads or writes (none, xz, zstd, bzip2 and gzip are)")]
    Compression(String),
    #[error("{url}: {reason}")]
    BadFile { url: String, reason: String },
    #[error("'{path}' from {cache}: {check}")]
    Refused { path: String, cache: String, check: String },
    #[error(transparent)]
    Store(#[from] cairn_store::StoreError),
}
