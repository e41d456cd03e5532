//! Builds over Nix's protocol: `BuildPaths`, `BuildPathsWithResults`, `BuildDerivation` and
//! `QueryMissing`, run by the daemon's builder with their logs streamed to the client.
//!
//! Each build is an activity of type `Build` whose log lines are `BuildLogLine` results, as
//! `nix-daemon` sends them, so that `nix-build` prints them and `nix build` shows them in its
//! progress bar. A failure of one of the requested derivations is the request's error (the
//! builder's message with the log's last lines); failures of their dependencies are logged as
//! `error:` lines first, as Nix logs them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cairn_build::derivations::Derivations;
use cairn_build::requirements::Attrs;
use cairn_build::{Event, FailureKind, Goal, Mode, Options, Outcome};
use cairn_nix::StorePath;
use cairn_worker::{
    ActivityType, BasicDerivation, BuildMode, BuildResult, BuildStatus, DerivedPath, DrvOutput, Field,
    KeyedBuildResult, Missing, OutputsSpec, Realisation, ResultType, Verbosity,
};

use super::session::{Failure, OpResult, Session};

fn mode_of(m: BuildMode) -> Mode {
    match m {
        BuildMode::Normal => Mode::Normal,
        BuildMode::Repair => Mode::Repair,
        BuildMode::Check => Mode::Check,
    }
}

fn status_of(kind: FailureKind) -> BuildStatus {
    match kind {
        FailureKind::Permanent => BuildStatus::PermanentFailure,
        FailureKind::TimedOut => BuildStatus::TimedOut,
        FailureKind::HashMismatch => BuildStatus::OutputRejected,
        FailureKind::NotDeterministic => BuildStatus::NotDeterministic,
        FailureKind::LogLimit => BuildStatus::LogLimitExceeded,
        FailureKind::Other => BuildStatus::MiscFailure,
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A realisation's outcome, with what the events said about each derivation.
struct Realised {
    outcome: Outcome,
    failures: HashMap<StorePath, FailureKind>,
    /// The derivations whose builder ran (built or failed): Nix counts each as built once.
    ran: HashSet<StorePath>,
    started: u64,
    stopped: u64,
}

/// Resolves once the client's end (`fd`) has hung up; never without one. A client says nothing
/// while its build runs, so its end is looked at a few times a second rather than read.
async fn client_gone(fd: Option<std::os::fd::BorrowedFd<'_>>) {
    use nix::poll::PollFlags;
    let Some(fd) = fd else { return std::future::pending().await };
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut fds = [nix::poll::PollFd::new(fd, PollFlags::POLLIN)];
        if !nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok_and(|n| n > 0) {
            continue;
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        // A closed socket's or pipe's far end; or a socket with nothing left to read but its end.
        if revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
            return;
        }
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        if revents.contains(PollFlags::POLLIN)
            && nix::sys::socket::recv(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut [0u8; 1], flags) == Ok(0)
        {
            return;
        }
    }
}

impl<R: Read, W: Write> Session<R, W> {
    /// Refuses repairs from untrusted clients, as `nix-daemon` does.
    fn check_mode(&self, mode: BuildMode) -> OpResult<()> {
        if mode == BuildMode::Repair && !self.peer.trusted {
            return Err(Failure::Report("repairing is not allowed because you are not in 'trusted-users'".into()));
        }
        Ok(())
    }

    /// In repair mode, the contents of valid opaque paths are checked and the broken ones
    /// repaired (substituted again, or built again from their derivers); returns those that
    /// could not be, with why. Any other mode: nothing to do.
    fn repair_opaque(&mut self, paths: &[StorePath], mode: BuildMode) -> OpResult<Vec<(StorePath, String)>> {
        if mode != BuildMode::Repair || paths.is_empty() {
            return Ok(Vec::new());
        }
        let caches = Some((self.substituters(), self.policy()));
        let fut = crate::api::substitute::repair_paths(self.st.clone(), self.peer.clone(), paths.to_vec(), caches);
        Ok(self.rt.block_on(fut)?)
    }

    /// A trusted client's `sandbox-paths` (instead of the daemon's) and `extra-sandbox-paths`
    /// (added), as nix-daemon applies a trusted client's settings; `None` if it set neither,
    /// or is not trusted.
    fn client_sandbox_paths(&self) -> Option<Arc<Vec<cairn_build::sandbox::SandboxPath>>> {
        let (base, extra) = (self.client_setting("sandbox-paths"), self.client_setting("extra-sandbox-paths"));
        if !self.peer.trusted || (base.is_none() && extra.is_none()) {
            return None;
        }
        let parse = |v: &str| v.split_whitespace().map(cairn_build::sandbox::parse_sandbox_path).collect::<Vec<_>>();
        let mut paths = match base {
            Some(v) => parse(v),
            None => self.st.builder.sandbox_paths().to_vec(),
        };
        paths.extend(extra.map(parse).unwrap_or_default());
        Some(Arc::new(paths))
    }

    /// The client's `builders` (`--builders`), as nix-daemon takes them: a trusted client's
    /// replace the daemon's; an untrusted one may only turn them off (an empty value).
    fn client_builders(&self) -> OpResult<Option<Arc<Vec<Arc<cairn_build::remote::Remote>>>>> {
        let Some(spec) = self.client_setting("builders") else { return Ok(None) };
        if !self.peer.trusted && !spec.trim().is_empty() {
            return Ok(None);
        }
        let machines = crate::api::realise::machines(spec, &self.st.control.settings)
            .map_err(|e| Failure::Report(format!("builders: {e}")))?;
        Ok(Some(Arc::new(self.st.builder.remotes().resolve(machines))))
    }

    /// Realises `goals` with the client's options, streaming the builds' activities and logs.
    fn realise(
        &mut self,
        goals: Vec<Goal>,
        mode: BuildMode,
        given: BTreeMap<StorePath, Arc<cairn_nix::derivation::Derivation>>,
    ) -> OpResult<Realised> {
        let st = self.st.clone();
        let mode = mode_of(mode);
        let keys = self.client_signing_keys()?;
        let mut options = Options {
            keep_going: self.options.keep_going,
            keep_failed: self.options.keep_failed,
            impure_env: Arc::new(BTreeMap::new()),
            mode,
            limits: self.build_limits(),
            given: Arc::new(given),
            builders: self.client_builders()?,
            // A trusted client's hook runs as the daemon, as nix-daemon runs it; an empty
            // value turns the daemon's off.
            post_build_hook: self
                .client_setting("post-build-hook")
                .filter(|_| self.peer.trusted)
                .map(std::path::PathBuf::from),
            resubstitute: None,
            sandbox_paths: self.client_sandbox_paths(),
        };
        let started = now();
        let mut goals = goals;
        let mut refused: Vec<(StorePath, cairn_build::realise::GoalResult)> = Vec::new();
        if mode == Mode::Normal && self.options.use_substitutes {
            let (caches, policy) = (self.substituters(), self.policy());
            let (announce, copying) = tokio::sync::mpsc::unbounded_channel();
            let peer = self.peer.clone();
            let fallback = self.options.try_fallback;
            let work = crate::api::realise::substitute_first(
                &st,
                &peer,
                &goals,
                caches.clone(),
                policy.clone(),
                Some(announce),
                fallback,
            );
            let not = self.showing_copies(work, copying);
            options.resubstitute = crate::api::realise::resubstitution(&st, &peer, caches, policy, &not);
            if !not.failed.is_empty() {
                refused = self.without_fallback(&mut goals, not);
            }
        }
        let top: BTreeSet<StorePath> = goals.iter().map(|g| g.drv.clone()).collect();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
        let rt = self.rt.clone();
        let mut activities = HashMap::new();
        let mut failures = HashMap::new();
        let mut ran = HashSet::new();
        // A duplicate of its own, so that the watch borrows nothing of the session.
        let watch = self.watch.as_ref().and_then(|fd| fd.try_clone().ok());
        let mut hung_up = false;
        let outcome = rt.block_on(async {
            let work = st.builder.realise(goals, options, tx);
            tokio::pin!(work);
            let mut done = None;
            loop {
                tokio::select! {
                    r = &mut work, if done.is_none() => done = Some(r),
                    e = rx.recv() => match e {
                        Some(e) => {
                            if let Event::Started { drv, .. } = &e {
                                ran.insert(drv.clone());
                            }
                            self.on_event(e, &top, mode, &mut activities, &mut failures)
                        }
                        None => break,
                    },
                    // Dropping the work stops its builds (their sandboxes are killed).
                    () = client_gone(watch.as_ref().map(std::os::fd::AsFd::as_fd)), if done.is_none() => {
                        hung_up = true;
                        break;
                    }
                }
            }
            done
        });
        // Builds and waits that a failure cancelled sent no end: their activities end here.
        for (_, id) in activities.drain() {
            self.stop_activity(id);
        }
        if hung_up {
            tracing::info!(user = self.peer.user, "the client hung up: its builds were stopped");
            return Err(Failure::Fatal("the client hung up during the build".into()));
        }
        let mut outcome = outcome.ok_or_else(|| Failure::Report("the build ended without an outcome".into()))??;
        if mode != Mode::Check {
            self.after_building(&outcome.built, &keys);
        }
        outcome.results.extend(refused);
        Ok(Realised { outcome, failures, ran, started, stopped: now() })
    }

    /// The keys of a trusted client's `secret-key-files`, with which `nix-daemon` signs what
    /// it builds for that client (read as the daemon: only a trusted client may name files).
    fn client_signing_keys(&self) -> OpResult<Vec<cairn_nix::signing::SecretKey>> {
        let Some(files) = self.client_setting("secret-key-files").filter(|_| self.peer.trusted) else {
            return Ok(Vec::new());
        };
        files
            .split_whitespace()
            .map(|f| {
                let text =
                    std::fs::read_to_string(f).map_err(|e| Failure::Report(format!("opening file '{f}': {e}")))?;
                cairn_nix::signing::SecretKey::parse(text.trim())
                    .map_err(|e| Failure::Report(format!("secret key file '{f}': {e}")))
            })
            .collect()
    }

    /// What a trusted client's settings ask of what was built for it, as nix-daemon does it:
    /// the outputs of the derivations `built` signed with `keys` (`secret-key-files`), and
    /// hard-linked with identical files of the store (`auto-optimise-store`).
    fn after_building(&self, built: &[StorePath], keys: &[cairn_nix::signing::SecretKey]) {
        let optimise = self.peer.trusted && self.client_setting("auto-optimise-store") == Some("true");
        if keys.is_empty() && !optimise {
            return;
        }
        let store = &self.st.store;
        let mut drvs = Derivations::new(store);
        let outputs: Vec<StorePath> =
            built.iter().flat_map(|drv| drvs.outputs(drv).unwrap_or_default().into_values()).collect();
        if optimise {
            if let Err(e) = store.optimise_paths(&outputs) {
                tracing::warn!("cannot optimise built paths: {e}");
            }
        }
        store.sign_paths(&outputs, keys);
    }

    /// Nix's rule without `--fallback`: a goal whose wanted output had a substitute (a cache
    /// offered it) that failed is not built from source but fails, saying so, and so does one
    /// that needs such an output. The substitutions' own errors are logged first, as Nix logs
    /// them (with `--fallback` too). A substitute that is gone (its NAR lost, its closure
    /// incomplete in the caches) is no failure, as in Nix. Returns the results of the goals
    /// refused.
    fn without_fallback(
        &mut self,
        goals: &mut Vec<Goal>,
        not: crate::api::realise::NotSubstituted,
    ) -> Vec<(StorePath, cairn_build::realise::GoalResult)> {
        // As Nix: a substitute that failed is an error shown, one whose closure a cache lacks
        // only a note in the daemon's log (it is substituted once the rest is built).
        for (p, why) in not.failed.iter().filter(|(p, _)| not.offered.contains(p) && !not.incomplete.contains(p)) {
            self.log_error(&format!("substituting '{}': {why}", self.show(p)));
        }
        let broken: BTreeMap<StorePath, String> = not.failed.iter().filter(|(p, _)| not.broken(p)).cloned().collect();
        if broken.is_empty() || self.options.try_fallback {
            return Vec::new();
        }
        let st = self.st.clone();
        let mut drvs = Derivations::new(&st.store);
        let mut refused = Vec::new();
        let mut kept = Vec::new();
        let substitutes_failed = |drv: &StorePath| {
            format!(
                "some substitutes for the outputs of derivation '{}' failed (usually happens due to \
                 networking issues); try '--fallback' to build derivation from source ",
                st.store_dir.display(drv)
            )
        };
        for g in goals.drain(..) {
            match with_broken_substitute(&mut drvs, &st.store, &g, &broken) {
                None => kept.push(g),
                Some(d) if d == g.drv => refused.push((g.drv, Err(substitutes_failed(&d)))),
                // An input that would be built for want of its substitute fails, and so does
                // the goal that needs it, as Nix's goals do.
                Some(d) => {
                    self.log_error(&substitutes_failed(&d));
                    let message =
                        format!("1 dependencies of derivation '{}' failed to build", st.store_dir.display(&g.drv));
                    refused.push((g.drv, Err(message)));
                }
            }
        }
        *goals = kept;
        refused
    }

    /// Turns a builder event into the client's activities and log lines.
    fn on_event(
        &mut self,
        e: Event,
        top: &BTreeSet<StorePath>,
        mode: Mode,
        activities: &mut HashMap<StorePath, u64>,
        failures: &mut HashMap<StorePath, FailureKind>,
    ) {
        match e {
            Event::Plan { .. } => {}
            Event::Substituting { path, from } => {
                let id = self.start_copy(path, from);
                self.stop_activity(id);
            }
            Event::Waiting { drv, outputs } => {
                // As Nix's goal waiting for another process's output locks.
                let paths: Vec<String> = outputs.iter().map(|p| format!("'{}'", self.show(p))).collect();
                let text = format!("waiting for lock on {}", paths.join(", "));
                let id = self.start_activity_at(Verbosity::Warn, ActivityType::BuildWaiting, text, Vec::new());
                activities.insert(drv, id);
            }
            Event::Started { drv, machine } => {
                // A wait that ends in a build of its own: the wait's activity ends first.
                if let Some(id) = activities.remove(&drv) {
                    self.stop_activity(id);
                }
                let shown = self.show(&drv);
                tracing::info!(drv = %shown, user = self.peer.user, "building (nix protocol)");
                // As Nix's build activity: the machine is its second field, and in the text.
                // A check says so, as Nix's does.
                let doing = if mode == Mode::Check { "checking outputs of" } else { "building" };
                let text = match &machine {
                    Some(m) => format!("{doing} '{shown}' on '{m}'"),
                    None => format!("{doing} '{shown}'"),
                };
                let fields = vec![
                    Field::String(shown.clone().into_bytes()),
                    Field::String(machine.unwrap_or_default().into_bytes()),
                    Field::Int(1),
                    Field::Int(1),
                ];
                let id = self.start_activity(ActivityType::Build, text, fields);
                activities.insert(drv, id);
            }
            Event::Log { drv, line } => {
                if let Some(&id) = activities.get(&drv) {
                    self.activity_result(id, ResultType::BuildLogLine, vec![Field::String(line)]);
                }
            }
            Event::Built { drv, .. } => {
                if let Some(id) = activities.remove(&drv) {
                    self.stop_activity(id);
                }
            }
            Event::Failed { drv, kind, message } => {
                if let Some(id) = activities.remove(&drv) {
                    self.stop_activity(id);
                }
                // As Nix: a kept build directory is said on a line of its own, before the error.
                if let (_, Some(note)) = split_kept_note(&message) {
                    self.log_line(note);
                }
                failures.insert(drv.clone(), kind);
                // A requested derivation's failure is the request's error; others are logged.
                if !top.contains(&drv) {
                    let message = self.with_log_hint(&drv, &message);
                    self.log_error(&message);
                }
            }
        }
    }

    /// A builder's failure with its log's tail ends, as Nix's, by saying where the whole log is.
    fn with_log_hint(&self, drv: &StorePath, message: &str) -> String {
        // The kept build directory's note was said on its own line when the build failed.
        let (message, _) = split_kept_note(message);
        // (A remote builder's failure may have said it already.)
        if message.contains(" log lines:\n") && !message.contains("For full logs, run ") {
            format!("{message}\nFor full logs, run '\x1b[1mnix log {}\x1b[0m'.", self.show(drv))
        } else {
            message.to_owned()
        }
    }

    /// Goals (one per derivation: [`cairn_build::realise::merge_goals`]) and opaque paths of a
    /// request.
    fn split(&self, paths: &[DerivedPath]) -> (Vec<Goal>, Vec<StorePath>) {
        let mut goals = Vec::new();
        let mut opaque = Vec::new();
        for p in paths {
            match p {
                DerivedPath::Opaque(p) => opaque.push(p.clone()),
                DerivedPath::Built { drv_path, outputs } => goals.push(Goal {
                    drv: drv_path.clone(),
                    outputs: match outputs {
                        OutputsSpec::All => None,
                        OutputsSpec::Names(n) => Some(n.clone()),
                    },
                }),
            }
        }
        (cairn_build::realise::merge_goals(goals), opaque)
    }

    /// `BuildPaths`: everything made valid, or the error.
    pub(super) fn build_paths(&mut self, paths: &[DerivedPath], mode: BuildMode) -> OpResult<()> {
        self.check_mode(mode)?;
        let (goals, opaque) = self.split(paths);
        self.ensure_valid(&opaque, |p| format!("build of '{p}' failed"))?;
        if let Some((p, why)) = self.repair_opaque(&opaque, mode)?.into_iter().next() {
            return Err(Failure::Report(format!("build of '{}' failed: cannot repair it: {why}", self.show(&p))));
        }
        if goals.is_empty() {
            return Ok(());
        }
        let r = self.realise(goals, mode, BTreeMap::new())?;
        let failed: Vec<(StorePath, String)> =
            r.outcome.results.into_iter().filter_map(|(drv, res)| res.err().map(|m| (drv, m))).collect();
        match failed.as_slice() {
            [] => Ok(()),
            [(drv, message)] => Err(Failure::Report(self.with_log_hint(drv, message))),
            many => {
                // As Nix: the failures are logged, not the goals a failure stopped.
                for (drv, m) in many.iter().filter(|(_, m)| m != cairn_build::realise::NOT_BUILT) {
                    self.log_error(&self.with_log_hint(drv, m));
                }
                let list: Vec<String> = many.iter().map(|(d, _)| format!("'{}'", self.show(d))).collect();
                Err(Failure::Report(format!("build of {} failed", list.join(", "))))
            }
        }
    }

    /// The result of one derivation goal, with its built outputs named as Nix names them.
    fn goal_result(
        &self,
        drv: &StorePath,
        res: Result<BTreeMap<String, StorePath>, String>,
        r: &Realised,
        given: Option<&Arc<cairn_nix::derivation::Derivation>>,
    ) -> BuildResult {
        let mut result = match &res {
            Ok(_) if r.outcome.built.contains(drv) => BuildResult::new(BuildStatus::Built, ""),
            Ok(_) => BuildResult::new(BuildStatus::AlreadyValid, ""),
            Err(m) => {
                let status = match r.failures.get(drv) {
                    Some(k) => status_of(*k),
                    None if m.contains(" dependencies of derivation '") => BuildStatus::DependencyFailed,
                    None => BuildStatus::MiscFailure,
                };
                BuildResult::new(status, self.with_log_hint(drv, m))
            }
        };
        if r.outcome.built.contains(drv) || (res.is_err() && r.ran.contains(drv)) {
            result.times_built = 1;
            result.start_time = r.started;
            result.stop_time = r.stopped;
        }
        if let Ok(outputs) = res {
            let mut drvs = Derivations::new(&self.st.store);
            if let Some(d) = given {
                let _ = drvs.give(drv, d.clone());
            }
            if let Ok(hashes) = drvs.static_output_hashes(drv) {
                for (name, path) in outputs {
                    let Some(h) = hashes.get(&name) else { continue };
                    let id = DrvOutput { drv_hash: h.clone(), output_name: name };
                    let json = Realisation {
                        id: id.clone(),
                        out_path: path,
                        signatures: BTreeSet::new(),
                        dependent_realisations: BTreeMap::new(),
                    }
                    .to_json();
                    result.built_outputs.insert(id, json);
                }
            }
        }
        result
    }

    /// `BuildPathsWithResults`: one result per goal, as Nix's worker has them — requests for
    /// the same derivation (other outputs) or the same path are one goal, named by the first
    /// request, and the results come in the goals' order (paths to substitute, then
    /// derivations, each by name, then path); failures are results, not errors.
    pub(super) fn build_with_results(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
    ) -> OpResult<Vec<KeyedBuildResult>> {
        self.check_mode(mode)?;
        let (goals, _) = self.split(paths);
        let realised = if goals.is_empty() { None } else { Some(self.realise(goals, mode, BTreeMap::new())?) };
        let mut by_goal: BTreeMap<String, &DerivedPath> = BTreeMap::new();
        for p in paths {
            let key = match p {
                DerivedPath::Opaque(path) => format!("a${}${}", path.name(), self.show(path)),
                DerivedPath::Built { drv_path, .. } => format!("b${}${}", drv_path.name(), self.show(drv_path)),
            };
            by_goal.entry(key).or_insert(p);
        }
        let mut out = Vec::new();
        for p in by_goal.into_values() {
            let result = match p {
                DerivedPath::Opaque(path) => {
                    let one = std::slice::from_ref(path);
                    match self.ensure_valid(one, Self::no_substituter).and_then(|()| self.repair_opaque(one, mode)) {
                        Ok(left) if left.is_empty() => BuildResult::new(BuildStatus::AlreadyValid, ""),
                        Ok(left) => BuildResult::new(
                            BuildStatus::MiscFailure,
                            format!("cannot repair '{}': {}", self.show(path), left[0].1),
                        ),
                        Err(Failure::Report(m)) => BuildResult::new(BuildStatus::MiscFailure, m),
                        Err(f) => return Err(f),
                    }
                }
                DerivedPath::Built { drv_path, .. } => {
                    let Some(r) = realised.as_ref() else { continue };
                    let res = r
                        .outcome
                        .results
                        .iter()
                        .find(|(d, _)| d == drv_path)
                        .map(|(_, res)| res.clone())
                        .unwrap_or_else(|| Err("not realised".into()));
                    self.goal_result(drv_path, res, r, None)
                }
            };
            out.push(KeyedBuildResult { path: p.clone(), result });
        }
        Ok(out)
    }

    /// `BuildDerivation`: a derivation the client sends rather than names (how Nix hands work to
    /// a remote builder). Its outputs cannot be recomputed without its input derivations, so,
    /// as in Nix, only trusted clients may send input-addressed ones; a content-addressed one
    /// must name the path its hash gives.
    pub(super) fn build_derivation(
        &mut self,
        drv_path: StorePath,
        basic: BasicDerivation,
        mode: BuildMode,
    ) -> OpResult<BuildResult> {
        self.check_mode(mode)?;
        let drv = basic.to_derivation(&self.proto);
        let fixed = drv.fixed_output().map_err(|e| Failure::Report(e.to_string()))?;
        if !self.peer.trusted {
            let Some((method, hash)) = fixed else {
                return Err(Failure::Report("you are not privileged to build input-addressed derivations".into()));
            };
            let name = drv.name().map_err(|e| Failure::Report(e.to_string()))?;
            let want = self
                .st
                .store_dir
                .make_fixed_output_path(&name, method, &hash, &BTreeSet::new(), false)
                .map_err(|e| Failure::Report(e.to_string()))?;
            let declared = drv.outputs.get("out").map(|o| o.path.clone()).unwrap_or_default();
            if declared != self.show(&want) {
                return Err(Failure::Report(format!(
                    "derivation '{}' declares output '{declared}', but its hash gives '{}'",
                    self.show(&drv_path),
                    self.show(&want)
                )));
            }
        }
        let drv = Arc::new(drv);
        let given = BTreeMap::from([(drv_path.clone(), drv.clone())]);
        let goal = Goal { drv: drv_path.clone(), outputs: None };
        let r = self.realise(vec![goal], mode, given)?;
        let res = r
            .outcome
            .results
            .iter()
            .find(|(d, _)| *d == drv_path)
            .map(|(_, x)| x.clone())
            .unwrap_or_else(|| Err("not realised".into()));
        Ok(self.goal_result(&drv_path, res, &r, Some(&drv)))
    }

    /// `QueryMissing`: what building `targets` would build, substitute, or not know how to
    /// make, walking input derivations of what must be built as Nix's `queryMissing` does.
    pub(super) fn query_missing(&mut self, targets: &[DerivedPath]) -> OpResult<Missing> {
        let st = self.st.clone();
        let store = &st.store;
        let mut missing = Missing {
            will_build: BTreeSet::new(),
            will_substitute: BTreeSet::new(),
            unknown: BTreeSet::new(),
            download_size: 0,
            nar_size: 0,
        };
        let mut drvs = Derivations::new(store);
        let mut seen: BTreeSet<DerivedPath> = BTreeSet::new();
        let mut todo: Vec<DerivedPath> = targets.to_vec();
        while let Some(t) = todo.pop() {
            if !seen.insert(t.clone()) {
                continue;
            }
            match t {
                DerivedPath::Opaque(p) => {
                    if store.is_valid(&p)? {
                        continue;
                    }
                    let found = self.offered(std::slice::from_ref(&p));
                    match found.get(&p) {
                        Some(info) => {
                            missing.will_substitute.insert(p.clone());
                            missing.download_size += info.file_size.unwrap_or(0);
                            missing.nar_size += info.nar_size;
                            todo.extend(info.references.iter().filter(|r| **r != p).cloned().map(DerivedPath::Opaque));
                        }
                        None => {
                            missing.unknown.insert(p);
                        }
                    }
                }
                DerivedPath::Built { drv_path, outputs } => {
                    if !store.is_valid(&drv_path)? {
                        missing.unknown.insert(drv_path);
                        continue;
                    }
                    let all = drvs.outputs(&drv_path)?;
                    let mut absent = Vec::new();
                    for (name, p) in &all {
                        let wanted = match &outputs {
                            OutputsSpec::All => true,
                            OutputsSpec::Names(n) => n.contains(name),
                        };
                        if wanted && !store.is_valid(p)? {
                            absent.push(p.clone());
                        }
                    }
                    if absent.is_empty() {
                        continue;
                    }
                    // As Nix's `queryMissing`: a derivation that does not allow substitutes
                    // (`allowSubstitutes = false`) is built, whatever the caches have.
                    let shown = st.store_dir.display(&drv_path);
                    let allowed = Attrs::allow_substitutes(&*drvs.load(&drv_path)?, &shown);
                    let found = if allowed { self.offered(&absent) } else { Default::default() };
                    if found.len() == absent.len() {
                        for p in absent {
                            todo.push(DerivedPath::Opaque(p));
                        }
                        continue;
                    }
                    missing.will_build.insert(drv_path.clone());
                    let drv = drvs.load(&drv_path)?;
                    for (input, outs) in drvs.inputs(&drv)? {
                        let names: BTreeSet<String> = outs.into_iter().collect();
                        let spec = if names.is_empty() { OutputsSpec::All } else { OutputsSpec::Names(names) };
                        todo.push(DerivedPath::Built { drv_path: input, outputs: spec });
                    }
                    for src in &drv.input_srcs {
                        if let Ok(p) = st.store_dir.parse(src) {
                            todo.push(DerivedPath::Opaque(p));
                        }
                    }
                }
            }
        }
        Ok(missing)
    }
}

/// The first derivation, top down from `goal`, that would be built although a substitute of
/// one of its wanted outputs failed (`broken`); the walk stops at derivations whose wanted
/// outputs are valid, which need nothing of their inputs.
fn with_broken_substitute(
    drvs: &mut Derivations<'_>,
    store: &cairn_store::LocalStore,
    goal: &Goal,
    broken: &BTreeMap<StorePath, String>,
) -> Option<StorePath> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![(goal.drv.clone(), goal.outputs.clone())];
    while let Some((drv_path, wanted)) = stack.pop() {
        if !seen.insert((drv_path.clone(), wanted.clone())) {
            continue;
        }
        let Ok(outputs) = drvs.outputs(&drv_path) else { continue };
        let missing = cairn_build::derivations::missing_wanted(store, &outputs, wanted.as_ref());
        if missing.is_empty() {
            continue;
        }
        if missing.iter().any(|p| broken.contains_key(*p)) {
            return Some(drv_path);
        }
        let Ok(drv) = drvs.load(&drv_path) else { continue };
        for (input, used) in drvs.inputs(&drv).unwrap_or_default() {
            stack.push((input, Some(used.into_iter().collect())));
        }
    }
    None
}

/// A failure's message without the note the builder adds when it keeps the build directory
/// (`--keep-failed`), and that note.
fn split_kept_note(message: &str) -> (&str, Option<&str>) {
    match message.rfind("\nnote: keeping build directory '") {
        Some(i) => (&message[..i], Some(&message[i + 1..])),
        None => (message, None),
    }
}
