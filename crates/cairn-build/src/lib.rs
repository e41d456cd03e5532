//! cairn's builder: derivations realised in Linux namespaces, output-identical to Nix.
//!
//! Layers, from pure to effectful: [`sandbox`] describes a build's sandbox as a value (what is
//! mounted where, the builder's environment, the files of its root); [`sys`] applies that value
//! through a trait of system calls (tested without root by a recorder); [`helper`] is the
//! single-threaded process that enters the namespaces; [`runner`] is the daemon's side of one
//! run (id maps, log lines, timeouts); [`outputs`] hashes, scans and checks what a build
//! produced; [`derivations`] reads `.drv`s from the store and checks their output paths;
//! [`realise`] schedules builds and registers their outputs, here or on the remote builders of
//! [`remote`] (reached with Nix's worker protocol); [`logs`] keeps build logs.
//! [`checks`] applies a derivation's reference constraints to its outputs before registration,
//! [`structured`] writes `__structuredAttrs` files, [`refgraph`] `exportReferencesGraph`'s.
//! Derivations whose builder is `builtin:NAME` are made in-process by a [`Builtin`] the daemon
//! registers (cairn's own code, trusted as the daemon is), not in a sandbox; `builtin:fetchurl`
//! is cairn-build's own ([`fetchurl`]): it downloads in the daemon, and its result is checked
//! and registered as a sandboxed fixed-output build's is. [`requirements`] reads what a
//! derivation asks of the host (`system`, `requiredSystemFeatures`, `allowSubstitutes`,
//! `impureEnvVars`) and refuses, in Nix's words, what this machine cannot build.
//!
//! **Architecture Invariant:** builders never see the store or the database: only their input
//! closure (bound read-only, or linked or copied where they cannot change it) and an empty
//! directory for their outputs. Outputs enter the
//! store only through `cairn-store`'s batch, as NARs whose hash was computed here.

pub mod buildenv;
pub mod checks;
pub mod derivations;
pub mod fetchurl;
pub mod helper;
pub mod limits;
pub mod logs;
pub mod outputs;
pub mod realise;
pub mod refgraph;
pub mod remote;
pub mod requirements;
pub mod root;
pub mod runner;
pub mod sandbox;
pub mod seccomp;
pub mod structured;
pub mod sys;
pub mod unpack_channel;
pub mod views;
pub mod zygote;

pub use logs::LogStore;
pub use realise::{
    BuildSettings, Builder, Builtin, Event, Failure, FailureKind, Goal, Mode, Options, Outcome, RequestLimits,
};

use cairn_nix::derivation::DerivationError;
use cairn_store::StoreError;

/// Why a realisation could not start.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("'{0}' is not a derivation (a .drv store path)")]
    NotDerivation(String),
    #[error("derivation '{0}' is not valid in this store (add it with `cairn derivation add` or `cairn import`)")]
    NotValid(String),
    #[error("derivation '{path}': {source}")]
    BadDerivation {
        path: String,
        #[source]
        source: DerivationError,
    },
    #[error("derivation '{drv}' has no output '{output}'")]
    UnknownOutput { drv: String, output: String },
    #[error(
        "derivation '{drv}' declares output '{output}' at '{declared}', but its hash puts it at '{computed}'; \
         refusing a derivation that claims another path"
    )]
    WrongOutputPath { drv: String, output: String, declared: String, computed: String },
    #[error(
        "derivation '{0}' has floating content-addressed or impure outputs (Nix's experimental \
         'ca-derivations' and 'impure-derivations'), which cairnd does not build"
    )]
    ContentAddressed(String),
    #[error("input '{path}' of derivation '{drv}' is not valid (substitute or add it first)")]
    InputNotValid { drv: String, path: String },
    /// `--check` of a derivation whose wanted outputs are not all valid (Nix's words).
    #[error("some outputs of '{drv}' are not valid, so checking is not possible")]
    NotCheckable { drv: String },
    /// `--repair` found a bad path in an output closure that no derivation of the input
    /// closure makes (Nix's words).
    #[error(
        "some paths in the output closure of derivation '{drv}' could not be repaired (corrupted or missing: '{path}')"
    )]
    Unrepairable { drv: String, path: String },
    #[error(transparent)]
    Plan(#[from] sandbox::PlanError),
    #[error(transparent)]
    Graph(#[from] refgraph::GraphError),
    #[error("{op} '{path}': {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<DerivationError> for BuildError {
    fn from(source: DerivationError) -> Self {
        BuildError::BadDerivation { path: String::new(), source }
    }
}

/// Runs the sandbox helper or the zygote and exits, if this process was started as one (their
/// first argument says so); returns otherwise. Call it first in `main`, before any thread exists.
/// It lives here, above both, so that the helper and the zygote (which runs the helper) do not
/// import each other.
pub fn run_if_asked() {
    let first = std::env::args_os().nth(1);
    if first.as_deref() == Some(std::ffi::OsStr::new(helper::HELPER_ARG)) {
        std::process::exit(helper::main());
    }
    if first.as_deref() == Some(std::ffi::OsStr::new(zygote::ZYGOTE_ARG)) {
        std::process::exit(zygote::main());
    }
}
