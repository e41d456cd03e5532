//! One worker-protocol connection: the handshake, then requests read and answered one at a
//! time until the client hangs up.
//!
//! Each answer is framed by the logger channel as in `nix-daemon`'s `processConnection`: log
//! messages and activities while the work runs, then `STDERR_LAST` and the answer, or
//! `STDERR_ERROR` and the message. An error that leaves the stream in step (the request and its
//! payload were read whole) is reported and the session goes on; one that does not (a bad frame,
//! a NAR cut short, a vanished client) ends the session after the error, as Nix's does.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::sync::Arc;

use cairn_nix::StorePath;
use cairn_worker::{
    server_handshake, ActivityType, ClientOptions, Duplex, Error as WireError, Field, Proto, ProtocolVersion,
    RemoteError, Request, Response, ResultType, ServerHello, StderrMessage, TrustedFlag, Verbosity,
};

use crate::auth::Peer;
use crate::error::ApiError;
use crate::state::AppState;

/// The Nix version announced to clients ≥ 1.33: the release whose protocol (1.34) the daemon
/// speaks, so that clients pick the layouts it answers in. cairn's own version follows it.
const NIX_VERSION: &str = concat!("2.8.0 (cairn ", env!("CARGO_PKG_VERSION"), ")");

/// How a request failed.
pub(super) enum Failure {
    /// The request was read whole: report it, and go on with the next one.
    Report(String),
    /// The stream is out of step or gone: report it if possible, and close.
    Fatal(String),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Failure {
        Failure::Report(e.message)
    }
}

impl From<cairn_store::StoreError> for Failure {
    fn from(e: cairn_store::StoreError) -> Failure {
        Failure::from(ApiError::from(e))
    }
}

impl From<cairn_build::BuildError> for Failure {
    fn from(e: cairn_build::BuildError) -> Failure {
        Failure::from(ApiError::from(e))
    }
}

impl From<WireError> for Failure {
    fn from(e: WireError) -> Failure {
        Failure::Fatal(format!("bad request: {e}"))
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Fatal(format!("connection: {e}"))
    }
}

pub(super) type OpResult<T> = Result<T, Failure>;

/// What follows `STDERR_LAST`.
pub(super) enum Answer {
    /// Written by the protocol crate (`Response::Nothing` writes nothing).
    Response(Box<Response>),
    /// The NAR of a valid path, streamed from the store.
    Nar(StorePath),
}

/// One connection.
pub(crate) struct Session<R: Read, W: Write> {
    pub(super) st: Arc<AppState>,
    pub(super) peer: Peer,
    pub(super) rt: tokio::runtime::Handle,
    pub(super) r: R,
    pub(super) w: W,
    pub(super) proto: Proto,
    /// What `SetOptions` said.
    pub(super) options: ClientOptions,
    /// Paths the client rooted with `AddTempRoot`, and the paths it added: alive until it hangs
    /// up, as Nix's temporary roots live as long as the client's connection.
    pub(super) temp_roots: cairn_store::TempRootGuard,
    next_activity: u64,
    /// A write to the client failed during a build: it is gone.
    pub(super) gone: bool,
    /// The client's end, watched for a hang-up while a build runs (which then stops, as
    /// `nix-daemon` stops a build whose client went away).
    pub(super) watch: Option<std::os::fd::OwnedFd>,
}

impl<R: Read, W: Write> Session<R, W> {
    pub(crate) fn new(st: Arc<AppState>, peer: Peer, rt: tokio::runtime::Handle, r: R, w: W) -> Session<R, W> {
        let proto = Proto::new(ProtocolVersion::MAX, st.store_dir.clone());
        let temp_roots = st.store.temp_root([]);
        Session {
            st,
            peer,
            rt,
            r,
            w,
            proto,
            options: ClientOptions::default(),
            temp_roots,
            next_activity: (std::process::id() as u64) << 32,
            gone: false,
            watch: None,
        }
    }

    /// Watches `fd` (a duplicate of the client's end) for a hang-up while builds run.
    pub(crate) fn watching(mut self, fd: Option<std::os::fd::OwnedFd>) -> Self {
        self.watch = fd;
        self
    }

    /// Runs the session until the client hangs up; an error is why it ended otherwise.
    pub(crate) fn run(mut self) -> Result<(), WireError> {
        let hello = ServerHello {
            version: ProtocolVersion::MAX,
            nix_version: NIX_VERSION.to_owned(),
            trust: Some(if self.peer.trusted { TrustedFlag::Trusted } else { TrustedFlag::NotTrusted }),
            features: BTreeSet::new(),
        };
        let limits = self.proto.limits;
        let session = server_handshake(&mut Duplex { r: &mut self.r, w: &mut self.w }, &hello, &limits)?;
        self.proto.version = session.version;
        // The start-up log (empty), ended as every answer is.
        self.message(StderrMessage::Last)?;
        self.w.flush()?;
        loop {
            let req = match Request::read(&mut self.r, &self.proto) {
                Ok(None) => return Ok(()),
                Ok(Some(r)) => r,
                Err(e @ (WireError::UnknownOp(_) | WireError::RemovedOp(_) | WireError::OpNotInVersion { .. })) => {
                    // Its fields are unknown, so the stream cannot be followed past it.
                    let message = match e {
                        WireError::UnknownOp(n) => format!("invalid operation {n}"),
                        WireError::RemovedOp(op) => format!("invalid operation {}", op.to_u64()),
                        e => e.to_string(),
                    };
                    let _ = self.error(&message);
                    return Ok(());
                }
                Err(e) => {
                    let _ = self.error(&format!("bad request: {e}"));
                    return Err(e);
                }
            };
            let op = req.op();
            tracing::debug!(user = self.peer.user, ?op, "nix daemon op");
            match self.perform(req) {
                Ok(Answer::Response(r)) => {
                    self.message(StderrMessage::Last)?;
                    r.write(&mut self.w, &self.proto)?;
                }
                Ok(Answer::Nar(path)) => {
                    self.message(StderrMessage::Last)?;
                    // Once the NAR has started, a failure cannot be reported: the stream ends.
                    let st = self.st.clone();
                    st.store.dump_path(&path, &mut self.w).map_err(|e| WireError::Io(io::Error::other(e)))?;
                }
                Err(Failure::Report(m)) => self.error(&m)?,
                Err(Failure::Fatal(m)) => {
                    let _ = self.error(&m);
                    let _ = self.w.flush();
                    return Ok(());
                }
            }
            self.w.flush()?;
        }
    }

    /// Writes a logger message in the client's layout (activities become plain lines, or
    /// nothing, for clients before 1.20).
    pub(super) fn message(&mut self, m: StderrMessage) -> Result<(), WireError> {
        match m.downgrade(self.proto.version) {
            Some(m) => m.write(&mut self.w, self.proto.version),
            None => Ok(()),
        }
    }

    /// Sends a failure as `STDERR_ERROR`.
    pub(super) fn error(&mut self, message: &str) -> Result<(), WireError> {
        self.message(StderrMessage::Error(RemoteError::new(message)))?;
        self.w.flush()?;
        Ok(())
    }

    /// A log line the client shows as Nix shows the daemon's messages.
    /// An error logged as Nix's daemon logs one (`showErrorInfo`): `error: ` and the message,
    /// its continuation lines indented under the first.
    pub(super) fn log_error(&mut self, message: &str) {
        self.log_line(&format!("error: {}", message.replace('\n', "\n       ")));
    }

    pub(super) fn log_line(&mut self, line: &str) {
        let ok = self.message(StderrMessage::Next(format!("{line}\n"))).is_ok() && self.w.flush().is_ok();
        self.gone |= !ok;
    }

    /// Starts an activity; returns its id.
    pub(super) fn start_activity(&mut self, kind: ActivityType, text: String, fields: Vec<Field>) -> u64 {
        self.start_activity_at(Verbosity::Info, kind, text, fields)
    }

    /// Starts an activity of `level` (Nix's own for its kind); returns its id.
    pub(super) fn start_activity_at(
        &mut self,
        level: Verbosity,
        kind: ActivityType,
        text: String,
        fields: Vec<Field>,
    ) -> u64 {
        self.next_activity += 1;
        let id = self.next_activity;
        let m = StderrMessage::StartActivity { id, level, kind, text, fields, parent: 0 };
        let ok = self.message(m).is_ok() && self.w.flush().is_ok();
        self.gone |= !ok;
        id
    }

    /// Starts Nix's "copying path '…' from '…'" activity of a substitution; returns its id.
    pub(super) fn start_copy(&mut self, path: String, from: String) -> u64 {
        let text = format!("copying path '{path}' from '{from}'");
        let fields =
            vec![Field::String(path.into_bytes()), Field::String(from.into_bytes()), Field::String(b"local".to_vec())];
        self.start_activity(ActivityType::CopyPath, text, fields)
    }

    pub(super) fn activity_result(&mut self, id: u64, kind: ResultType, fields: Vec<Field>) {
        let ok = self.message(StderrMessage::Result { id, kind, fields }).is_ok() && self.w.flush().is_ok();
        self.gone |= !ok;
    }

    pub(super) fn stop_activity(&mut self, id: u64) {
        let ok = self.message(StderrMessage::StopActivity { id }).is_ok() && self.w.flush().is_ok();
        self.gone |= !ok;
    }

    /// The store directory's rendering of a path.
    pub(super) fn show(&self, p: &StorePath) -> String {
        self.st.store_dir.display(p)
    }

    /// Refuses what needs trust, in the words `nix-daemon` uses.
    pub(super) fn require_trust(&self, what: &str) -> OpResult<()> {
        if self.peer.trusted {
            Ok(())
        } else {
            Err(Failure::Report(format!(
                "you are not privileged to {what} (user '{}' is not in trusted-users)",
                self.peer.user
            )))
        }
    }

    /// Answers one request (its payload, if any, is read by the operation).
    fn perform(&mut self, req: Request) -> OpResult<Answer> {
        use Request as Q;
        let r = |x: Response| Ok(Answer::Response(Box::new(x)));
        match req {
            Q::SetOptions(o) => {
                self.options = o;
                self.warn_of_untrusted_substituters();
                r(Response::Nothing)
            }
            Q::AddToStore { name, method, references, repair: _ } => {
                r(self.add_to_store(&name, method, &references)?)
            }
            Q::AddToStoreLegacy { name, fixed, recursive, hash_algo } => {
                r(self.add_to_store_legacy(&name, fixed, recursive, &hash_algo)?)
            }
            Q::AddTextToStore { name, text, references } => r(self.add_text(&name, &text, &references)?),
            Q::AddToStoreNar { info, repair, dont_check_sigs } => {
                self.add_to_store_nar(info, repair, dont_check_sigs)?;
                r(Response::Nothing)
            }
            Q::AddMultipleToStore { repair, dont_check_sigs } => {
                self.add_multiple(repair, dont_check_sigs)?;
                r(Response::Nothing)
            }
            Q::NarFromPath(p) => {
                self.st.store.valid_path_info(&p)?;
                Ok(Answer::Nar(p))
            }
            Q::BuildPaths { paths, mode } => {
                self.build_paths(&paths, mode)?;
                r(Response::One)
            }
            Q::BuildPathsWithResults { paths, mode } => {
                r(Response::BuildResults(self.build_with_results(&paths, mode)?))
            }
            Q::BuildDerivation { drv_path, drv, mode } => {
                r(Response::BuildResult(self.build_derivation(drv_path, drv, mode)?))
            }
            Q::EnsurePath(p) => {
                self.ensure_valid(std::slice::from_ref(&p), |p| {
                    format!("path '{p}' does not exist and cannot be created")
                })?;
                r(Response::One)
            }
            Q::QueryMissing(targets) => r(Response::Missing(self.query_missing(&targets)?)),
            other => self.query(other).map(|x| Answer::Response(Box::new(x))),
        }
    }

    /// The build options the client's `SetOptions` maps onto.
    pub(super) fn build_limits(&self) -> cairn_build::RequestLimits {
        let secs = |n: u64| (n > 0).then(|| std::time::Duration::from_secs(n));
        let o = &self.options;
        let timeout =
            o.overrides.get("timeout").or_else(|| o.overrides.get("build-timeout")).and_then(|v| v.parse().ok());
        cairn_build::RequestLimits {
            // 0 is the client's "no local builds" (Nix's --max-jobs 0), not "no cap".
            max_jobs: Some(o.max_build_jobs as usize),
            timeout: timeout.and_then(secs),
            max_silent: secs(u64::from(o.max_silent_time)),
            // Passed on as given: 0 tells the builder to use every core (NIX_BUILD_CORES=0).
            cores: Some(o.build_cores as usize),
            max_log_size: o.overrides.get("max-build-log-size").and_then(|v| v.parse().ok()).filter(|&n| n > 0),
        }
    }
}
