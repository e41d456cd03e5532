//! The one error type of the wire crate.
//!
//! Every way a peer's bytes can be refused is a variant here, so that a daemon can tell a
//! hostile or broken client (bad magic, unknown op, a length over its limit, non-zero padding,
//! a stream cut short) from an I/O failure of its own, and answer each with one line. Nix
//! throws `SerialisationError`s with the same meanings; the messages here are cairn's own
//! (lowercase, one line), not Nix's.

use std::io;

use cairn_nix::content_address::ContentAddressError;
use cairn_nix::hash::HashError;
use cairn_nix::store_path::StorePathError;

use crate::constants::WorkerOp;

/// Why bytes on a worker-protocol connection were refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("unsupported protocol version {}.{}", .0 >> 8, .0 & 0xff)]
    UnsupportedVersion(u64),
    #[error("unknown op {0}")]
    UnknownOp(u64),
    #[error("op {0:?} was removed from the protocol")]
    RemovedOp(WorkerOp),
    #[error("op {op:?} is not part of protocol 1.{minor}")]
    OpNotInVersion { op: WorkerOp, minor: u8 },
    #[error("length {len} over limit {max}")]
    TooLong { len: u64, max: usize },
    #[error("count {count} over limit {max}")]
    TooMany { count: u64, max: usize },
    #[error("non-zero padding")]
    BadPadding,
    #[error("truncated")]
    Truncated,
    #[error("integer {value} too large for {what}")]
    IntegerTooLarge { what: &'static str, value: u64 },
    #[error("{what} is not valid utf-8")]
    NotUtf8 { what: &'static str },
    #[error("bad value {value} for {what}")]
    BadValue { what: &'static str, value: u64 },
    #[error("malformed {what}: {value:?}")]
    Malformed { what: &'static str, value: String },
    #[error("unknown stderr message {0:#x}")]
    UnknownMessage(u64),
    #[error("bad store path: {0}")]
    StorePath(#[from] StorePathError),
    #[error("bad hash: {0}")]
    Hash(#[from] HashError),
    #[error("bad content address: {0}")]
    ContentAddress(#[from] ContentAddressError),
    #[error("i/o error: {0}")]
    Io(#[source] io::Error),
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Truncated
        } else {
            Error::Io(e)
        }
    }
}

impl From<cairn_nix::wire::WireError> for Error {
    fn from(e: cairn_nix::wire::WireError) -> Self {
        use cairn_nix::wire::WireError;
        match e {
            WireError::Truncated => Error::Truncated,
            WireError::TooLong { len, max } => Error::TooLong { len, max },
            WireError::BadPadding => Error::BadPadding,
            WireError::Io(e) => Error::from(e),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
