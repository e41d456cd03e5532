//! Remote builders: the machines a derivation may be sent to, their state, and one remote build
//! from inputs sent to outputs fetched.
//!
//! Builders are reached with Nix's protocols ([`connect`]): the worker protocol (`ssh-ng://`,
//! `unix://`) or the legacy SSH one (`ssh://`, bare host names), so a builder is a real
//! `nix-daemon` or `nix-store --serve`, another cairnd, or anything that serves them; no
//! protocol of cairn's own is involved. One remote build, as Nix's `build-remote` does it (the
//! legacy protocol's commands in its place: `QueryValidPaths`, `AddToStoreNar` per path,
//! `BuildDerivation`, `QueryPathInfos`, `DumpStorePath`):
//!
//! 1. `QueryValidPaths` of the input closure (asking the builder to substitute what it can
//!    when `builders-use-substitutes` is set), then `AddMultipleToStore` of only what it
//!    lacks, references first;
//! 2. `BuildDerivation` of the derivation with its input paths as sources; its log lines come
//!    back as they are written;
//! 3. per output, `QueryPathInfo` (the builder's claim: NAR hash, references, signatures) and
//!    `NarFromPath`, restored into the build directory while the NAR hash of the bytes is
//!    computed. The caller then checks the outputs as it checks a local build's (hash, scan,
//!    output path, reference constraints) and compares them with the claim before anything is
//!    registered.
//!
//! Which machine builds what is [`Remote::choose`]'s: a machine that builds the platform and
//! supports the required features (and whose mandatory features are required), not marked
//! down, with a free slot; the lowest load per speed, then the fastest, then the least loaded,
//! then the one known to hold most of the input closure. What a machine is known to hold is
//! remembered from its `QueryValidPaths` answers and from what was sent to it, so choosing
//! asks nothing over the network.
//!
//! A machine that cannot be reached, breaks a session, or returns outputs that do not match
//! its claim is marked down for [`DOWN_FOR`]; the build goes elsewhere.

pub mod connect;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cairn_nix::machines::Machine;
use cairn_nix::{Hash, StoreDir, StorePath};

use connect::{Conn, Target};

/// How long a machine that failed is left alone.
pub const DOWN_FOR: Duration = Duration::from_secs(60);
/// Idle sessions kept per machine for the next build.
const IDLE_SESSIONS: usize = 8;
/// Paths remembered per machine as held there (beyond it, the memory starts again).
const KNOWN_PATHS: usize = 200_000;

/// A configured builder and what is known of it.
pub struct Remote {
    pub machine: Machine,
    target: Result<Target, String>,
    state: Mutex<State>,
    idle: Mutex<Vec<Conn>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("uri", &self.machine.uri).finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    running: u32,
    down_until: Option<Instant>,
    last_error: Option<String>,
    built: u64,
    failed: u64,
    nars_sent: u64,
    bytes_sent: u64,
    nars_received: u64,
    bytes_received: u64,
    known: HashSet<StorePath>,
}

/// What is known of a machine now (its configuration is [`Remote::machine`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteStatus {
    /// Seconds it is left alone for after a failure; `None`: up.
    pub down_seconds: Option<u64>,
    pub running: u32,
    pub built: u64,
    pub failed: u64,
    pub nars_sent: u64,
    pub bytes_sent: u64,
    pub nars_received: u64,
    pub bytes_received: u64,
    pub last_error: Option<String>,
}

/// What a derivation needs of a machine.
pub struct Needs<'a> {
    pub system: &'a str,
    pub features: &'a BTreeSet<String>,
    /// The input closure, to prefer a machine that holds it.
    pub inputs: &'a [StorePath],
}

/// A builder's account of one output it built.
#[derive(Debug, Clone)]
pub struct Claim {
    pub nar_hash: Hash,
    pub references: BTreeSet<StorePath>,
    pub signatures: BTreeSet<String>,
    /// The SHA-256 of the bytes it sent.
    pub received_hash: Hash,
}

/// What went wrong on a remote build, and whose fault it is.
#[derive(Debug)]
pub enum RemoteFailure {
    /// The machine: unreachable, a broken session, outputs not as claimed. Mark it down and
    /// build elsewhere.
    Machine(String),
    /// The build itself failed there (its status and message): report it.
    Build { status: cairn_worker::BuildStatus, message: String },
}

impl Remote {
    pub fn new(machine: Machine) -> Remote {
        let target = Target::of(&machine).map_err(|e| e.to_string());
        Remote { machine, target, state: Mutex::new(State::default()), idle: Mutex::new(Vec::new()) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn uri(&self) -> &str {
        &self.machine.uri
    }

    /// Whether it could ever build a derivation with these needs.
    pub fn suits(&self, needs: &Needs<'_>) -> bool {
        self.target.is_ok()
            && self.machine.builds_for(needs.system)
            && self.machine.all_supported(needs.features)
            && self.machine.mandatory_met(needs.features)
    }

    fn is_down(&self, s: &State, now: Instant) -> bool {
        s.down_until.is_some_and(|t| t > now)
    }

    /// Whether it is down now.
    pub fn down(&self) -> bool {
        let s = self.state();
        self.is_down(&s, Instant::now())
    }

    /// The best machine among `machines` for `needs` with a free slot, its slot taken; `None`
    /// when none is free now. Lowest load per speed first, then the fastest, then the least
    /// loaded, then the one holding most of the inputs (Nix's order, with the last added).
    pub fn choose(machines: &[Arc<Remote>], needs: &Needs<'_>) -> Option<Arc<Remote>> {
        let now = Instant::now();
        let mut guards: Vec<(usize, MutexGuard<'_, State>)> = Vec::new();
        for (i, m) in machines.iter().enumerate() {
            if !m.suits(needs) {
                continue;
            }
            let s = m.state();
            if m.is_down(&s, now) || s.running >= m.machine.max_jobs {
                continue;
            }
            guards.push((i, s));
        }
        let held = |s: &State| needs.inputs.iter().filter(|p| s.known.contains(*p)).count();
        let best = guards.iter_mut().max_by(|(a, sa), (b, sb)| {
            let (ma, mb) = (&machines[*a].machine, &machines[*b].machine);
            // load / speed, compared without division: la * sb vs lb * sa (lower is better).
            let per_speed = (u64::from(sb.running) * u64::from(ma.speed_factor))
                .cmp(&(u64::from(sa.running) * u64::from(mb.speed_factor)));
            per_speed
                .then(ma.speed_factor.cmp(&mb.speed_factor))
                .then(sb.running.cmp(&sa.running))
                .then(held(sa).cmp(&held(sb)))
                .then(b.cmp(a)) // the first configured wins a tie
        })?;
        best.1.running += 1;
        Some(machines[best.0].clone())
    }

    /// Gives back a slot taken by [`Self::choose`].
    pub fn release(&self) {
        let mut s = self.state();
        s.running = s.running.saturating_sub(1);
    }

    /// Marks it down for [`DOWN_FOR`] with the reason, and drops its idle sessions.
    pub fn mark_down(&self, why: &str) {
        {
            let mut s = self.state();
            s.down_until = Some(Instant::now() + DOWN_FOR);
            s.last_error = Some(why.to_owned());
            s.known.clear();
        }
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }

    pub fn record(&self, built: bool) {
        let mut s = self.state();
        if built {
            s.built += 1;
            s.down_until = None;
        } else {
            s.failed += 1;
        }
    }

    fn remember(&self, paths: impl IntoIterator<Item = StorePath>) {
        let mut s = self.state();
        if s.known.len() > KNOWN_PATHS {
            s.known.clear();
        }
        s.known.extend(paths);
    }

    pub fn status(&self) -> RemoteStatus {
        let s = self.state();
        let now = Instant::now();
        let down = s.down_until.filter(|t| *t > now).map(|t| (t - now).as_secs().max(1));
        RemoteStatus {
            down_seconds: down,
            running: s.running,
            built: s.built,
            failed: s.failed,
            nars_sent: s.nars_sent,
            bytes_sent: s.bytes_sent,
            nars_received: s.nars_received,
            bytes_received: s.bytes_received,
            last_error: s.last_error.clone().or_else(|| self.target.as_ref().err().cloned()),
        }
    }

    /// An idle session, or a new one with the options remote builds use ([`options`]).
    pub fn session(&self, store_dir: &StoreDir, ssh_dir: &std::path::Path, substitute: bool) -> Result<Conn, String> {
        if let Some(c) = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop() {
            return Ok(c);
        }
        let target = self.target.as_ref().map_err(Clone::clone)?;
        let mut conn = connect::open(target, store_dir, ssh_dir)?;
        let options = options(substitute, crate::runner::RunLimits::default());
        conn.session.set_options(&options).map_err(|e| format!("setting options: {e}"))?;
        Ok(conn)
    }

    /// Keeps a session that ended a request cleanly for the next build. Not a legacy-protocol
    /// one: its standard error's file holds every build's output, and a new session is cheap
    /// (one master connection per host).
    pub fn give_back(&self, c: Conn) {
        if matches!(c.session, connect::Session::Serve { .. }) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < IDLE_SESSIONS {
            idle.push(c);
        }
    }
}

/// Every builder the daemon knows: the configured ones, and those requests named (each URI
/// once, so that its state is shared by everyone who uses it).
pub struct Remotes {
    configured: Vec<Arc<Remote>>,
    named: Mutex<BTreeMap<String, Arc<Remote>>>,
    /// SSH master sockets and known-hosts files.
    pub ssh_dir: PathBuf,
    /// `builders-use-substitutes`.
    pub use_substitutes: bool,
}

impl Remotes {
    pub fn new(configured: Vec<Machine>, ssh_dir: PathBuf, use_substitutes: bool) -> Remotes {
        let configured: Vec<Arc<Remote>> = configured.into_iter().map(|m| Arc::new(Remote::new(m))).collect();
        let named = configured.iter().map(|r| (key(&r.machine), r.clone())).collect();
        Remotes { configured, named: Mutex::new(named), ssh_dir, use_substitutes }
    }

    /// No builders.
    pub fn none() -> Remotes {
        Remotes::new(Vec::new(), std::env::temp_dir(), false)
    }

    pub fn configured(&self) -> &[Arc<Remote>] {
        &self.configured
    }

    /// The machines of a request's own `builders`, sharing state with any earlier request
    /// that named the same machine.
    pub fn resolve(&self, machines: Vec<Machine>) -> Vec<Arc<Remote>> {
        let mut named = self.named.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        machines.into_iter().map(|m| named.entry(key(&m)).or_insert_with(|| Arc::new(Remote::new(m))).clone()).collect()
    }

    /// Every machine known, configured first.
    pub fn all(&self) -> Vec<Arc<Remote>> {
        let named = self.named.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = self.configured.clone();
        out.extend(named.values().filter(|r| !self.configured.iter().any(|c| Arc::ptr_eq(c, r))).cloned());
        out
    }
}

/// Machines are the same machine when every column is the same.
fn key(m: &Machine) -> String {
    format!("{m:?}")
}

/// The wire form of a store path's metadata (what a builder is sent, and what cairnd's Nix
/// listener answers).
pub fn wire_info(i: &cairn_store::PathInfo) -> cairn_worker::PathInfo {
    cairn_worker::PathInfo {
        deriver: i.deriver.clone(),
        nar_hash: i.nar_hash.clone(),
        references: i.references.clone(),
        registration_time: i.registration_time.max(0) as u64,
        nar_size: i.nar_size,
        ultimate: i.ultimate,
        sigs: i.signatures.clone(),
        ca: i.ca.clone(),
    }
}

/// Sends the builder what it lacks of `closure` (dependencies first), asking it to
/// substitute first when `substitute`.
pub fn send_inputs(
    remote: &Remote,
    conn: &mut Conn,
    store: &cairn_store::LocalStore,
    closure: &[StorePath],
    substitute: bool,
) -> Result<(), String> {
    let wanted: BTreeSet<StorePath> = closure.iter().cloned().collect();
    let valid = conn.session.query_valid_paths(&wanted, substitute).map_err(|e| format!("asking what it has: {e}"))?;
    let mut entries = Vec::new();
    for p in closure.iter().filter(|p| !valid.contains(*p)) {
        let info = store
            .path_info(p)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("input '{}' is not valid here", store.store_dir().display(p)))?;
        entries.push(cairn_worker::ValidPathInfo { path: p.clone(), info: wire_info(&info) });
    }
    if !entries.is_empty() {
        let bytes: u64 = entries.iter().map(|e| e.info.nar_size).sum();
        conn.session
            .add_multiple_to_store(&entries, true, &mut |e, w| {
                store.dump_path(&e.path, w).map_err(|e| std::io::Error::other(e.to_string()))
            })
            .map_err(|e| format!("sending {} inputs: {e}", entries.len()))?;
        let mut s = remote.state();
        s.nars_sent += entries.len() as u64;
        s.bytes_sent += bytes;
    }
    remote.remember(wanted);
    Ok(())
}

/// The options remote builds use: the builder's own jobs and cores, its log lines sent,
/// substitution as `builders-use-substitutes` says, and a build's time limits (as Nix's
/// `build-remote` passes its `max-silent-time`, `timeout` and `max-build-log-size`; the last two
/// go by name).
pub fn options(substitute: bool, limits: crate::runner::RunLimits) -> cairn_worker::ClientOptions {
    let secs = |d: std::time::Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
    let mut options = cairn_worker::ClientOptions {
        max_build_jobs: 1,
        build_cores: 0,
        use_substitutes: substitute,
        verbose_build: true,
        max_silent_time: limits.max_silent.map_or(0, secs),
        ..Default::default()
    };
    if let Some(t) = limits.timeout {
        options.overrides.insert("timeout".into(), secs(t).to_string());
    }
    if let Some(n) = limits.max_log_size {
        options.overrides.insert("max-build-log-size".into(), n.to_string());
    }
    options
}

/// Runs `BuildDerivation` there with `options` (see [`options`]); `on_line` gets each log line.
pub fn build(
    conn: &mut Conn,
    drv_path: &StorePath,
    drv: &cairn_nix::derivation::Derivation,
    inputs: &[StorePath],
    options: &cairn_worker::ClientOptions,
    on_line: &mut dyn FnMut(&[u8]),
) -> Result<(), RemoteFailure> {
    use cairn_worker::{Field, ResultType, StderrMessage};
    conn.session
        .set_options(options)
        .map_err(|e| RemoteFailure::Machine(format!("the session broke before the build: {e}")))?;
    let basic = cairn_worker::BasicDerivation::from_derivation(drv, inputs.iter().cloned().collect());
    let mut on_log = |m: StderrMessage| match m {
        StderrMessage::Next(s) => on_line(s.trim_end_matches('\n').as_bytes()),
        StderrMessage::Result { kind: ResultType::BuildLogLine, fields, .. } => {
            if let Some(Field::String(s)) = fields.first() {
                on_line(s);
            }
        }
        _ => {}
    };
    let result = conn.session.build_derivation(drv_path, &basic, &mut on_log).map_err(|e| {
        match e {
            // Failed builds come back as a result; an error is the daemon refusing the
            // request (this client not trusted there, an input it lacks …): not the
            // build's fault, and another machine may take it.
            cairn_worker::ClientError::Remote(e) => {
                RemoteFailure::Machine(format!("it refused the build: {}", cairn_worker::plain_text(&e.message)))
            }
            e => RemoteFailure::Machine(format!("the session broke during the build: {e}")),
        }
    })?;
    if result.status.success() {
        Ok(())
    } else {
        Err(RemoteFailure::Build { status: result.status, message: cairn_worker::plain_text(&result.error_msg) })
    }
}

/// Fetches an output's claim and NAR, restoring it at `dest` and hashing what came.
pub fn fetch_output(
    remote: &Remote,
    conn: &mut Conn,
    store_dir: &StoreDir,
    path: &StorePath,
    dest: &std::path::Path,
) -> Result<Claim, String> {
    let shown = store_dir.display(path);
    let info = conn
        .session
        .query_path_info(path)
        .map_err(|e| format!("asking for output '{shown}': {e}"))?
        .ok_or_else(|| format!("it did not make output '{shown}'"))?;
    let restored = conn
        .session
        .nar_from_path(path, |r| -> Result<(Hash, u64), String> {
            let mut hashing = cairn_nix::hash::HashingReader::new(r, cairn_nix::HashAlgo::Sha256);
            let mut nar = cairn_nix::nar::NarReader::new(&mut hashing, cairn_nix::nar::Limits::default())
                .map_err(|e| e.to_string())?;
            cairn_store::restore(&mut nar, dest, cairn_store::RestoreMode::Canonical).map_err(|e| e.to_string())?;
            drop(nar);
            let (hash, n, _) = hashing.finish();
            Ok((hash, n))
        })
        .map_err(|e| format!("fetching output '{shown}': {e}"))?;
    let (received_hash, n) = restored.map_err(|e| format!("fetching output '{shown}': {e}"))?;
    {
        let mut s = remote.state();
        s.nars_received += 1;
        s.bytes_received += n;
    }
    Ok(Claim { nar_hash: info.nar_hash, references: info.references, signatures: info.sigs, received_hash })
}

/// The builder's claims against what was received and scanned here: a difference means the
/// builder (or the way to it) is not to be trusted with this build.
pub fn check_claim(
    shown: &str,
    claim: &Claim,
    nar_hash: &Hash,
    references: &BTreeSet<StorePath>,
) -> Result<(), String> {
    if claim.received_hash != claim.nar_hash {
        return Err(format!(
            "output '{shown}' came with NAR hash '{}', but the builder registered '{}'",
            claim.received_hash.to_sri(),
            claim.nar_hash.to_sri()
        ));
    }
    if &claim.nar_hash != nar_hash {
        return Err(format!("output '{shown}' changed on the way in (NAR hash '{}' here)", nar_hash.to_sri()));
    }
    if &claim.references != references {
        return Err(format!("output '{shown}': the builder registered other references than its contents hold"));
    }
    Ok(())
}
