//! cairnd's socket API, version 1, and the configuration shared by `cairnd` and `cairn`.
//!
//! The transport is HTTP/1.1 over a Unix socket. Small operations are one `POST /v1/query` with
//! a JSON [`Request`] answered by a JSON [`Response`] (typed per operation in [`query`]); operations that move contents use their own
//! routes with streamed bodies (NARs, export streams, files), so that neither side ever holds a
//! whole path in memory. HTTP was chosen over a bespoke framing because the same handlers can
//! later serve a TCP listener (a binary cache, an OCI registry) and because every error has a
//! status code and a JSON body a script can read.
//!
//! | route | body in | body out |
//! |---|---|---|
//! | `GET /v1/version` | — | [`VersionInfo`] |
//! | `POST /v1/query` | [`Request`] | [`Response`] |
//! | `POST /v1/add?name=N&method=nar` | NAR | [`PathInfo`] |
//! | `POST /v1/add?name=N&method=flat&size=S[&executable=true]` | file bytes | [`PathInfo`] |
//! | `GET /v1/nar?path=P` | — | NAR |
//! | `GET /v1/cat?path=P` | — | file bytes (P may point inside a store path) |
//! | `POST /v1/export` | [`ExportRequest`] | export stream |
//! | `POST /v1/import` | export stream | `Vec<PathInfo>` |
//! | `GET /v1/daemon/status` | — | [`DaemonStatus`] |
//! | `GET /v1/daemon/config` | — | [`config::Settings`] (the daemon's effective settings) |
//! | `POST /v1/daemon/stop` | — | [`DaemonStatus`] (trusted users; the daemon then shuts down) |
//! | `GET /v1/peers` | — | [`PeersStatus`] |
//! | `POST /v1/peers/push` | [`PeerPushRequest`] | [`PeerPushAnswer`] |
//!
//! Failures answer a 4xx/5xx status with an [`ErrorBody`].
//!
//! **Architecture invariant:** these types are the wire; the daemon converts them to and from the
//! store's domain types by hand, so the store's types are not shaped by serde and the wire can
//! stay stable while the store changes.

pub mod config;
pub mod image;
pub mod query;
pub mod socket;

pub use query::{Op, Request, Response};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The API version this crate speaks; part of every route.
pub const API_VERSION: u32 = 1;

/// Routes, relative to the socket.
pub mod routes {
    pub const VERSION: &str = "/v1/version";
    pub const QUERY: &str = "/v1/query";
    pub const ADD: &str = "/v1/add";
    pub const NAR: &str = "/v1/nar";
    pub const CAT: &str = "/v1/cat";
    pub const EXPORT: &str = "/v1/export";
    pub const IMPORT: &str = "/v1/import";
    pub const SUBSTITUTE: &str = "/v1/substitute";
    /// A push stream (`cairn_cache::push`) from another daemon's closure; answers the added
    /// paths. Untrusted users' paths need trusted signatures.
    pub const RECEIVE: &str = "/v1/receive";
    /// Builds derivations ([`super::RealiseRequest`]); the answer streams
    /// [`super::RealiseEvent`]s.
    pub const REALISE: &str = "/v1/realise";
    /// The log of a past build of a derivation (or of the deriver of an output), as text.
    pub const LOG: &str = "/v1/log";
    /// Blobs and a commit in one all-or-nothing stream ([`super::image::ImportItem`]).
    pub const OCI_IMPORT: &str = "/v1/oci/import";
    /// A pull from a registry ([`super::image::PullRequest`]).
    pub const OCI_PULL: &str = "/v1/oci/pull";
    /// A push to a registry ([`super::image::PushRequest`]).
    pub const OCI_PUSH: &str = "/v1/oci/push";
    /// An image build ([`super::image::BuildRequest`]); the answer streams
    /// [`super::image::BuildEvent`]s, the last the built image or the error. (The same build
    /// as a query, `Request::ImageBuild`, answers only at the end.)
    pub const OCI_BUILD: &str = "/v1/oci/build";
    /// `GET ?image=&digest=`: a blob of an image, a streamed layer made as it is sent.
    pub const OCI_BLOB: &str = "/v1/oci/blob";
    /// The daemon's process, socket, store and start ([`super::DaemonStatus`]).
    pub const DAEMON_STATUS: &str = "/v1/daemon/status";
    /// The daemon's effective settings ([`super::config::Settings`]).
    pub const DAEMON_CONFIG: &str = "/v1/daemon/config";
    /// `POST`: asks the daemon to shut down as on SIGTERM (trusted users only); answers its
    /// [`super::DaemonStatus`] first.
    pub const DAEMON_STOP: &str = "/v1/daemon/stop";
    /// `GET`: the p2p node and its peers ([`super::PeersStatus`]).
    pub const PEERS: &str = "/v1/peers";
    /// `POST`: asks a peer to take paths from this node ([`super::PeerPushRequest`]).
    pub const PEERS_PUSH: &str = "/v1/peers/push";
}

/// Answer of `GET /v1/version`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub api_version: u32,
    pub daemon_version: String,
    pub store_dir: String,
    /// Whether the caller is a trusted user.
    pub trusted: bool,
    /// The caller's user name as the daemon sees it (from the socket's peer credentials).
    #[serde(default)]
    pub user: String,
    /// [`config::Settings::fingerprint`] of the daemon's effective settings (empty from older
    /// daemons), so that a client can tell cheaply whether the daemon runs with the settings it
    /// would have started it with.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub settings_fingerprint: String,
}

/// Body of `POST /v1/peers/push` (`cairn copy --to p2p://NODE-ID`): the peer is asked to
/// substitute these paths from this node, as from a binary cache whose narinfos are these.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerPushRequest {
    /// The peer's node id (one of the daemon's `peers`).
    pub to: String,
    /// The narinfos of the paths (a closure), as the CLI signed them; references first.
    pub narinfos: Vec<String>,
}

/// What a peer did with a push: the paths it added (it already had the others, or refused them).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PeerPushAnswer {
    pub added: Vec<String>,
    pub failed: Vec<SubstituteFailure>,
}

/// Answer of `GET /v1/peers`: this node on the p2p network and what it knows of its peers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PeersStatus {
    /// What peers put before the `@` to reach this node.
    pub node_id: String,
    /// Where it listens (`p2p-listen`); empty: it fetches from peers but serves none.
    pub listening: Vec<String>,
    /// Things (NARs, blobs) whose BLAKE3 hash it has worked out for peers so far.
    pub offered: u64,
    /// Bytes and transfers served to all peers.
    pub served_bytes: u64,
    pub served_objects: u64,
    /// Things no peer had, which it fetched upstream.
    pub upstream_objects: u64,
    pub peers: Vec<PeerStatus>,
}

/// One configured peer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub node_id: String,
    pub addresses: Vec<String>,
    /// `ok`, `not yet reached`, or `shunned for Ns` (after a failure or bad bytes).
    pub state: String,
    /// Verified bytes fetched from it, and things it sent all or part of (a large thing held by
    /// several peers comes from several at once).
    pub fetched_bytes: u64,
    pub fetched_objects: u64,
    /// Bytes served to it.
    pub served_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Answer of `GET /v1/daemon/status`: which daemon this is and what it was started with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub api_version: u32,
    pub socket: String,
    pub store_dir: String,
    /// The physical root the store and its state live under.
    pub root: String,
    /// The configuration file it read (absolute), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_file: Option<String>,
    /// When it started, in seconds since the Unix epoch.
    pub started: u64,
    pub uptime_seconds: u64,
    /// [`config::Settings::fingerprint`] of its effective settings.
    pub settings_fingerprint: String,
    /// What its store's caches hold in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<StoreMemory>,
}

/// What a store's caches hold in memory: SQLite's page cache (bounded by its limit) and the
/// reference graph kept for closure queries (one node per valid path; its tables are indexed by
/// row id, so their size follows the largest row id handed out).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StoreMemory {
    pub page_cache_bytes: u64,
    pub page_cache_limit: u64,
    /// Paths in the graph (0 until the first closure query loads it).
    pub graph_paths: u64,
    /// Slots in its tables: one past the largest row id.
    pub graph_rows: u64,
}

/// A valid path's metadata, named as `nix path-info --json` names it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PathInfo {
    /// Absolute store path.
    pub path: String,
    /// SRI form (`sha256-…`), as Nix prints it.
    pub nar_hash: String,
    pub nar_size: u64,
    /// Absolute store paths, sorted.
    pub references: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub deriver: Option<String>,
    pub registration_time: i64,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub ultimate: bool,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub signatures: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ca: Option<String>,
}

/// A directory entry, for `ls`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DirEntry {
    pub name: String,
    /// `regular`, `executable`, `symlink` or `directory`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
}

/// Body of `POST /v1/realise`: derivations to build, each `DRV` or `DRV!out1,out2`. The answer
/// is a stream of [`RealiseEvent`]s, one JSON object per line, ending with `done`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct RealiseRequest {
    pub paths: Vec<String>,
    #[serde(default)]
    pub keep_going: bool,
    #[serde(default)]
    pub keep_failed: bool,
    /// The client's values of variables fixed-output derivations name in `impureEnvVars` (see
    /// [`query::ImpureEnvVars`]); a variable missing here takes the daemon's value, as with
    /// Nix's daemon. Only fixed-output builds see them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub impure_env: BTreeMap<String, String>,
    /// Build again what is valid and compare (`check`), or repair what is corrupt (`repair`).
    #[serde(default, skip_serializing_if = "BuildMode::is_normal")]
    pub mode: BuildMode,
    /// Remote builders for this request instead of the daemon's `builders`, in Nix's machines
    /// format (`@FILE` reads a file on the daemon's side; `""` builds only here). Trusted users
    /// only, as Nix's `builders` is a restricted setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builders: Option<String>,
}

/// How a realisation treats derivations whose outputs are valid, as Nix's `--check` and
/// `--repair` do.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BuildMode {
    /// Build only what is not valid.
    #[default]
    Normal,
    /// Build the requested derivations again; fail if an output differs from the registered one.
    Check,
    /// Build again whatever is invalid or corrupt in the requested derivations' outputs and
    /// their closure, and put the good copies in place.
    Repair,
}

impl BuildMode {
    pub fn is_normal(&self) -> bool {
        *self == BuildMode::Normal
    }
}

/// What ended a failed build, for the exit code (see [`nix_exit_status`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The builder failed (or the build was refused on this machine).
    Permanent,
    /// `timeout` or `max-silent-time`.
    TimedOut,
    /// A fixed output without the declared hash.
    HashMismatch,
    /// `--check` found an output differing from the registered one.
    NotDeterministic,
    /// Anything else.
    #[default]
    #[serde(other)]
    Other,
}

/// The exit status of `nix-store --realise` after builds failed with these kinds (Nix 2.8's
/// `Worker::exitStatus`): bits for failed build (100), timeout (101), hash mismatch (102) and
/// non-determinism (104) over `0x60`, or 1 when none applies.
pub fn nix_exit_status(kinds: impl IntoIterator<Item = FailureKind>) -> u8 {
    let (mut permanent, mut timed_out, mut hash, mut check) = (false, false, false, false);
    for k in kinds {
        match k {
            FailureKind::Permanent => permanent = true,
            FailureKind::TimedOut => timed_out = true,
            FailureKind::HashMismatch => hash = true,
            FailureKind::NotDeterministic => check = true,
            FailureKind::Other => {}
        }
    }
    let mut mask = 0u8;
    if permanent || timed_out || hash {
        mask |= 0x04;
    }
    if timed_out {
        mask |= 0x01;
    }
    if hash {
        mask |= 0x02;
    }
    if check {
        mask |= 0x08;
    }
    if mask == 0 {
        1
    } else {
        mask | 0x60
    }
}

/// One line of a realisation's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum RealiseEvent {
    /// A path being substituted instead of built (before the plan), as the cache names it,
    /// from the cache at `from`: what Nix shows as "copying path '…' from '…'".
    Substituting {
        path: String,
        from: String,
    },
    /// A path a cache had a narinfo for could not be substituted, and why; what needs it is
    /// built.
    NotSubstituted {
        path: String,
        message: String,
    },
    /// The derivations that will be built, inputs first.
    Plan {
        drvs: Vec<String>,
    },
    Started {
        drv: String,
        /// The remote builder it runs on (absent: the daemon's machine).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        machine: Option<String>,
    },
    /// One line of a build's log.
    Log {
        drv: String,
        line: String,
    },
    Built {
        drv: String,
        outputs: BTreeMap<String, String>,
    },
    Failed {
        drv: String,
        /// Older daemons do not send it: `other`.
        #[serde(default)]
        kind: FailureKind,
        message: String,
    },
    /// The end: each requested derivation's outputs, or why it was not realised.
    Done {
        results: Vec<RealiseResult>,
    },
    /// The realisation could not start.
    Error(ErrorBody),
}

/// A remote builder as `cairn builders` shows it: its machines-file columns, its state, and
/// what it has done since the daemon started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BuilderInfo {
    pub uri: String,
    pub systems: Vec<String>,
    pub max_jobs: u32,
    pub speed_factor: u32,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    /// `up`, or `down` (left alone for `downSeconds` more after a failure).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_seconds: Option<u64>,
    /// Builds running there now.
    pub running: u32,
    pub built: u64,
    pub failed: u64,
    /// Input paths sent to it, and their NAR bytes.
    pub nars_sent: u64,
    pub bytes_sent: u64,
    /// Outputs fetched from it, and their NAR bytes.
    pub nars_received: u64,
    pub bytes_received: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The result for one requested derivation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RealiseResult {
    pub drv: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Body of `POST /v1/substitute`: fetch the closures of `paths` from binary caches. The answer
/// is a stream of [`SubstituteEvent`]s, one JSON object per line, ending with `done`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubstituteRequest {
    /// Caches to use instead of the daemon's `substituters` (URLs other than those need a
    /// trusted user).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<String>,
    pub paths: Vec<String>,
}

/// One line of a substitution's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum SubstituteEvent {
    /// Counters so far (sent a few times a second while work goes on).
    #[serde(rename_all = "camelCase")]
    Progress { paths_expected: u64, paths_done: u64, bytes_expected: u64, bytes_done: u64 },
    /// The end: the asked-for paths that are now valid, what was added, and what failed.
    Done { paths: Vec<PathInfo>, added: Vec<String>, failed: Vec<SubstituteFailure> },
    /// The substitution could not run at all.
    Error(ErrorBody),
}

/// A path that could not be substituted, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubstituteFailure {
    pub path: String,
    pub reason: String,
}

/// What [`query::Gc`] does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum GcAction {
    Collect,
    DryRun,
    PrintRoots,
    PrintLive,
    PrintDead,
}

/// What a collection or a delete did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GcResult {
    /// Deleted paths (or, in a dry run, those that would be), referrers first.
    pub deleted: Vec<String>,
    /// Bytes of files freed (in a dry run: NAR sizes).
    pub bytes_freed: u64,
    /// Unregistered leftovers removed from the store directory.
    #[serde(default)]
    pub unregistered: u64,
    /// The collection stopped once more than its `max_freed` was freed.
    #[serde(default)]
    pub limit_reached: bool,
}

/// A garbage-collector root.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RootInfo {
    /// A symlink, `{temp:PID}`, `/proc/PID/…`, or a named source's description.
    pub origin: String,
    pub path: String,
}

/// What `optimise` did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OptimiseResult {
    pub paths: u64,
    pub files_linked: u64,
    pub bytes_saved: u64,
}

/// One problem `verify` found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyProblem {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `missing`, `modified` or `database`.
    pub kind: String,
    pub message: String,
}

/// What `verify` found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyResult {
    pub checked: u64,
    pub problems: Vec<VerifyProblem>,
    pub repaired: u64,
    /// Paths whose contents had disappeared and that no valid path referred to: removed from
    /// the database (as `nix-store --verify` removes them), one line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forgotten: Vec<String>,
}

/// The refusal of an import by an untrusted user; the CLI says it before uploading, the daemon
/// when it refuses.
pub fn untrusted_import_message(user: &str) -> String {
    format!("user '{user}' is not trusted to import paths without signatures (add it to trusted-users in the daemon's config)")
}

/// Body of `POST /v1/export`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportRequest {
    pub paths: Vec<String>,
}

/// How `POST /v1/add` interprets its body.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AddMethod {
    /// A NAR, stored as a recursive (`source`) path.
    Nar,
    /// A file's bytes, stored as a flat SHA-256 fixed-output path.
    Flat,
}

/// The first byte of a socket connection that hands the daemon open files (`SCM_RIGHTS`
/// attached to it) before its HTTP request; no request starts with it. See [`AddQuery::handed_over`].
pub const HANDOVER_MARK: u8 = 0;

/// Query string of `POST /v1/receive`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct ReceiveQuery {
    /// Check signatures even for a trusted user, as `nix copy` does unless `--no-check-sigs`
    /// (an untrusted user's pushes are always checked).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub check_sigs: bool,
}

/// Query string of `POST /v1/add`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddQuery {
    pub name: String,
    pub method: AddMethod,
    /// Byte count, required for `flat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// For `flat`: store the file executable, as `nix-store --add-fixed` does for a file whose
    /// owner-execute bit is set. Does not change the path (only the contents' hash does), but it
    /// is part of the NAR and so of the NAR hash.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub executable: bool,
    /// The file is the descriptor the client handed over with its connection (a regular
    /// file, read by the daemon; the body is empty). `size` and `executable` then come from
    /// the file itself.
    #[serde(default, rename = "handedOver", skip_serializing_if = "std::ops::Not::not")]
    pub handed_over: bool,
    /// For `nar`: the body is a spliced NAR (`cairn_nar_fs::Spliced`): the NAR's bytes, save
    /// the contents of files handed over with the connection, which it names by their order.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spliced: bool,
}

/// Query string of `GET /v1/nar` and `GET /v1/cat`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PathQuery {
    pub path: String,
}

/// The query of [`routes::OCI_BLOB`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobQuery {
    /// A tag, image digest or layout path.
    pub image: String,
    pub digest: String,
}

/// What kind of failure an [`ErrorBody`] reports; one HTTP status each.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request or its body is malformed (400).
    BadRequest,
    /// The caller may not do this (403).
    Forbidden,
    /// A path is not valid (404).
    NotFound,
    /// The store's state forbids it: a path to delete is still live or referenced (409).
    Conflict,
    /// The store could not do it (500).
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Internal => 500,
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    /// One line, lower case, naming the problem.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_is_nixs_worker_mask() {
        use FailureKind::*;
        assert_eq!(nix_exit_status([]), 1);
        assert_eq!(nix_exit_status([Other]), 1);
        assert_eq!(nix_exit_status([Permanent]), 100);
        assert_eq!(nix_exit_status([TimedOut]), 101);
        assert_eq!(nix_exit_status([HashMismatch]), 102);
        assert_eq!(nix_exit_status([NotDeterministic]), 104);
        assert_eq!(nix_exit_status([Permanent, TimedOut, Other]), 101);
        assert_eq!(nix_exit_status([NotDeterministic, Permanent]), 108);
    }

    #[test]
    fn realise_wire_stays_compatible() {
        let r: RealiseRequest = serde_json::from_str(r#"{"paths":["/s/x.drv"]}"#).unwrap();
        assert_eq!(r.mode, BuildMode::Normal);
        let r = RealiseRequest { mode: BuildMode::Check, ..r };
        assert!(serde_json::to_string(&r).unwrap().contains(r#""mode":"check""#));
        let e: RealiseEvent = serde_json::from_str(r#"{"event":"failed","drv":"d","message":"m"}"#).unwrap();
        assert_eq!(e, RealiseEvent::Failed { drv: "d".into(), kind: FailureKind::Other, message: "m".into() });
        let e: RealiseEvent =
            serde_json::from_str(r#"{"event":"failed","drv":"d","kind":"timed-out","message":"m"}"#).unwrap();
        assert!(matches!(e, RealiseEvent::Failed { kind: FailureKind::TimedOut, .. }));
    }

    #[test]
    fn requests_have_a_stable_json_shape() {
        let r: Request = query::Closure { paths: vec!["/store/x".into()] }.into();
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"op":"closure","paths":["/store/x"]}"#);
        let back: Request = serde_json::from_str(r#"{"op":"path-info","paths":[],"closure":true}"#).unwrap();
        assert_eq!(back, Request::PathInfo(query::PathInfo { paths: vec![], closure: true }));
        assert!(serde_json::from_str::<Request>(r#"{"op":"drop-tables"}"#).is_err());
    }

    #[test]
    fn path_info_matches_nix_field_names() {
        let p = PathInfo {
            path: "/nix/store/x".into(),
            nar_hash: "sha256-AAAA".into(),
            nar_size: 120,
            references: vec![],
            deriver: None,
            registration_time: 1,
            ultimate: false,
            signatures: vec![],
            ca: Some("fixed:sha256:00".into()),
        };
        let v: serde_json::Value = serde_json::to_value(&p).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["ca", "narHash", "narSize", "path", "references", "registrationTime"]);
    }
}
