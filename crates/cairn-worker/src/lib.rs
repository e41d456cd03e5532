//! The Nix worker protocol — what `nix-daemon` speaks on its socket and on `--stdio`, and
//! what `unix://` and `ssh-ng://` stores speak to it — as pure encoders and decoders.
//!
//! cairnd answers Nix's own tools through it, and cairn's remote builds talk to other
//! daemons through it, so both sides live here: every layout can be read and written. The
//! crate does no I/O of its own: everything works over blocking [`std::io::Read`] and
//! [`std::io::Write`] (no async runtime, no sockets, no store), as `cairn-nix` does for file
//! formats; the daemon's listener and the remote-build client bring the connections. [`Client`] is
//! the client side of a session, for the ops a remote build and `cairnd --serve` need.
//! [`serve`] is Nix's other protocol, the legacy SSH one `nix-store --serve` speaks.
//!
//! The reference is Nix 2.8 (protocol 1.34), read in its source: `worker-protocol.hh`,
//! `daemon.cc`, `remote-store.cc`, `path-info.cc`, `serialise.{hh,cc}`, `build-result.hh`,
//! `logging.hh`. Versions down to 1.10 are spoken as Nix 2.8 speaks them, and newer clients
//! up to 1.38 (Nix 2.24 – 2.29) are accepted with the layouts their source defines (trust
//! flag 1.35, `AddPermRoot` 1.36, CPU times in build results 1.37, feature sets 1.38).
//!
//! A connection's life, daemon side: [`server_handshake`], then [`StderrMessage::Last`];
//! then per request [`Request::read`], any payload ([`Request::payload`], [`FramedReader`]),
//! log messages, and `Last` plus a [`Response`] or an [`StderrMessage::Error`].
//!
//! **Invariant:** nothing read from a peer panics or allocates more than the connection's
//! [`Limits`] (plus what the peer actually sent); bad bytes are an [`Error`].

pub mod client;
pub mod codec;
pub mod constants;
pub mod error;
pub mod framing;
pub mod handshake;
pub mod logger;
pub mod request;
pub mod response;
pub mod serve;
pub mod types;

pub use client::{Client, ClientError};
pub use codec::{Limits, Proto};
pub use constants::{
    ActivityType, BuildMode, BuildStatus, GcAction, ProtocolVersion, ResultType, TrustedFlag, Verbosity, WorkerOp,
};
pub use error::{Error, Result};
pub use framing::{FramedReader, FramedWriter};
pub use handshake::{
    client_handshake, server_handshake, ClientHello, ClientSession, Duplex, ServerHello, ServerSession,
};
pub use logger::{plain_text, read_until_last, Field, RemoteError, StderrMessage};
pub use request::{Payload, RegisterDrvOutput, Request};
pub use response::{Realisations, Response};
pub use types::{
    BasicDerivation, BuildResult, CaMethod, ClientOptions, DerivedPath, DrvOutput, GcOptions, GcResults,
    KeyedBuildResult, Missing, OutputsSpec, PathInfo, Realisation, SubstitutablePathInfo, ValidPathInfo,
};
