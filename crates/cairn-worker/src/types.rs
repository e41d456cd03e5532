//! The structures operations carry, with their layouts per protocol version.
//!
//! Each type here is a wire type, apart from cairn's domain types: it holds exactly what the
//! wire holds, so that reading and writing it round-trips, and a daemon converts it to and
//! from its store's own types by hand. Followed from Nix 2.8:
//!
//! - [`PathInfo`] / [`ValidPathInfo`]: `ValidPathInfo::read/write` (`src/libstore/path-info.cc`):
//!   deriver (empty for none), NAR hash as bare base16, references, registration time, NAR
//!   size, and from 1.16 `ultimate`, signatures and content address (empty for none).
//!   `QueryPathInfo` answers without the path, `AddToStore` (≥ 1.25) with it, and
//!   `AddToStoreNar` sends it with the path first, as [`ValidPathInfo`] does.
//! - [`BuildResult`]: `BuildDerivation`'s answer in `daemon.cc` (status, error message; 1.29
//!   adds times built, non-determinism and start/stop times; 1.28 adds the built outputs),
//!   with 1.37's CPU times from Nix 2.24's `worker-protocol.cc`. [`KeyedBuildResult`] is
//!   `BuildPathsWithResults`' element: the derived path first (Nix 2.8 calls it `BuildResult`).
//! - [`DerivedPath`]: `DerivedPath::to_string/parse` (`derived-path.cc`) from 1.30, and the
//!   older `path!out1,out2` form of `StorePathWithOutputs` (`path-with-outputs.cc`).
//! - [`BasicDerivation`]: `readDerivation`/`writeDerivation` in `derivations.cc`.
//! - [`ClientOptions`]: `wopSetOptions` in `daemon.cc` and `RemoteStore::setOptions`.
//! - [`GcOptions`]/[`GcResults`]: `wopCollectGarbage`; [`SubstitutablePathInfo`],
//!   [`Missing`], [`DrvOutput`], [`Realisation`] likewise from `daemon.cc` and `realisation.cc`.
//!
//! Fidelity notes. Nix reads sets into `std::set`, so duplicates collapse and writing is in
//! sorted order; the `BTreeSet`s here do the same, and `StorePath`'s order is Nix's (by base
//! name). Where Nix reads a map with `emplace` the first duplicate wins, where with `[]` the
//! last; each reader says which it mirrors.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use cairn_nix::derivation::DerivationOutput;
use cairn_nix::hash::Encoding;
use cairn_nix::{FileIngestionMethod, Hash, HashAlgo, StorePath};

use crate::codec::*;
use crate::constants::{BuildStatus, GcAction, Verbosity};
use crate::error::{Error, Result};

/// A path's metadata without the path (Nix ≥ 2.19 calls it `UnkeyedValidPathInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub deriver: Option<StorePath>,
    /// SHA-256 of the path's NAR.
    pub nar_hash: Hash,
    pub references: BTreeSet<StorePath>,
    /// Seconds since the epoch.
    pub registration_time: u64,
    pub nar_size: u64,
    /// Built locally rather than substituted (≥ 1.16).
    pub ultimate: bool,
    /// Signatures, `name:base64` (≥ 1.16).
    pub sigs: BTreeSet<String>,
    /// Content address (≥ 1.16).
    pub ca: Option<cairn_nix::ContentAddress>,
}

impl PathInfo {
    /// What a peer that tells only a path's deriver, hash, references and size says of it (an
    /// export stream, the legacy protocol's path infos): no signatures, no content address,
    /// not ultimate, registered at time 0.
    pub fn bare(
        deriver: Option<StorePath>,
        nar_hash: Hash,
        references: BTreeSet<StorePath>,
        nar_size: u64,
    ) -> PathInfo {
        PathInfo {
            deriver,
            nar_hash,
            references,
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        }
    }

    pub fn read(r: &mut impl Read, proto: &Proto) -> Result<PathInfo> {
        let deriver = read_opt_path(r, proto)?;
        let hash = read_short(r, proto, "nar hash")?;
        let nar_hash = Hash::parse_with_algo(&hash, HashAlgo::Sha256)?;
        let references = read_path_set(r, proto)?;
        let registration_time = read_u64(r)?;
        let nar_size = read_u64(r)?;
        let (mut ultimate, mut sigs, mut ca) = (false, BTreeSet::new(), None);
        if proto.has(16) {
            ultimate = read_bool(r)?;
            sigs = read_string_set(r, proto, "signature")?;
            ca = read_opt_ca(r, proto)?;
        }
        Ok(PathInfo { deriver, nar_hash, references, registration_time, nar_size, ultimate, sigs, ca })
    }

    pub fn write(&self, w: &mut impl Write, proto: &Proto) -> Result<()> {
        write_opt_path(w, proto, self.deriver.as_ref())?;
        write_str(w, &self.nar_hash.encode(Encoding::Base16))?;
        write_path_set(w, proto, &self.references)?;
        write_u64(w, self.registration_time)?;
        write_u64(w, self.nar_size)?;
        if proto.has(16) {
            write_bool(w, self.ultimate)?;
            write_strings(w, self.sigs.iter())?;
            write_opt_ca(w, self.ca.as_ref())?;
        }
        Ok(())
    }
}

/// A path and its metadata: `AddToStore`'s answer (≥ 1.25), the head of `AddToStoreNar`, and
/// each entry of `AddMultipleToStore`'s stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPathInfo {
    pub path: StorePath,
    pub info: PathInfo,
}

impl ValidPathInfo {
    pub fn read(r: &mut impl Read, proto: &Proto) -> Result<ValidPathInfo> {
        let path = read_path(r, proto)?;
        Ok(ValidPathInfo { path, info: PathInfo::read(r, proto)? })
    }

    pub fn write(&self, w: &mut impl Write, proto: &Proto) -> Result<()> {
        write_path(w, proto, &self.path)?;
        self.info.write(w, proto)
    }
}

/// Which outputs of a derivation are wanted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum OutputsSpec {
    /// `*`, or (before 1.30) no outputs named.
    All,
    /// Named outputs; never empty (an empty list reads as `All`, as in Nix 2.8).
    Names(BTreeSet<String>),
}

/// What a build request names: a store path to make valid, or outputs of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum DerivedPath {
    Opaque(StorePath),
    Built { drv_path: StorePath, outputs: OutputsSpec },
}

fn is_derivation(p: &StorePath) -> bool {
    p.name().ends_with(".drv")
}

/// The outputs after `!`: `*` is all (from 1.30); names are comma-separated, empty ones
/// skipped as Nix's `tokenizeString` does, and no names at all means all (Nix 2.8).
fn parse_outputs(s: &str, star_is_all: bool) -> OutputsSpec {
    let names: BTreeSet<String> = s.split(',').filter(|n| !n.is_empty()).map(str::to_owned).collect();
    if names.is_empty() || (star_is_all && s == "*") {
        OutputsSpec::All
    } else {
        OutputsSpec::Names(names)
    }
}

impl DerivedPath {
    /// Parses the string form of protocol `proto.version`: from 1.30 `path`, `drv!*` or
    /// `drv!a,b`; before, `path` or `path!a,b`, where a derivation without outputs named
    /// means all its outputs (`StorePathWithOutputs::toDerivedPath`).
    pub fn parse(s: &str, proto: &Proto) -> Result<DerivedPath> {
        let split = s.split_once('!');
        let path = proto.store_dir.parse(split.map_or(s, |(p, _)| p))?;
        if proto.has(30) {
            return Ok(match split {
                Some((_, outs)) => DerivedPath::Built { drv_path: path, outputs: parse_outputs(outs, true) },
                None => DerivedPath::Opaque(path),
            });
        }
        let outputs = split.map_or(OutputsSpec::All, |(_, outs)| parse_outputs(outs, false));
        Ok(if outputs != OutputsSpec::All || is_derivation(&path) {
            DerivedPath::Built { drv_path: path, outputs }
        } else {
            DerivedPath::Opaque(path)
        })
    }

    /// The string form of protocol `proto.version`. Before 1.30 a derivation file itself
    /// cannot be named (it would mean its outputs), which is an error as in Nix.
    pub fn render(&self, proto: &Proto) -> Result<String> {
        Ok(match self {
            DerivedPath::Opaque(p) if !proto.has(30) && is_derivation(p) => {
                return Err(Error::Malformed {
                    what: "derived path for protocol < 1.30",
                    value: proto.store_dir.display(p),
                })
            }
            DerivedPath::Opaque(p) => proto.store_dir.display(p),
            DerivedPath::Built { drv_path, outputs: OutputsSpec::All } if !proto.has(30) => {
                proto.store_dir.display(drv_path)
            }
            DerivedPath::Built { drv_path, outputs } => {
                let mut s = proto.store_dir.display(drv_path);
                s.push('!');
                match outputs {
                    OutputsSpec::All => s.push('*'),
                    OutputsSpec::Names(names) => s.push_str(&names.iter().cloned().collect::<Vec<_>>().join(",")),
                }
                s
            }
        })
    }

    pub fn read(r: &mut impl Read, proto: &Proto) -> Result<DerivedPath> {
        DerivedPath::parse(&read_short(r, proto, "derived path")?, proto)
    }

    pub fn write(&self, w: &mut impl Write, proto: &Proto) -> Result<()> {
        write_str(w, &self.render(proto)?)
    }

    /// Reads a `std::vector<DerivedPath>` (as strings before 1.30, which is the same bytes).
    pub fn read_list(r: &mut impl Read, proto: &Proto) -> Result<Vec<DerivedPath>> {
        let n = read_count(r, &proto.limits)?;
        (0..n).map(|_| DerivedPath::read(r, proto)).collect()
    }

    pub fn write_list(w: &mut impl Write, proto: &Proto, paths: &[DerivedPath]) -> Result<()> {
        write_count(w, paths.len())?;
        paths.iter().try_for_each(|p| p.write(w, proto))
    }
}

/// A derivation output's identity for content-addressed derivations: `sha256:<hex>!out`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DrvOutput {
    /// The derivation's hash modulo (Nix orders by digest length, then bytes, as `Hash`'s
    /// derived order does).
    pub drv_hash: Hash,
    pub output_name: String,
}

impl DrvOutput {
    pub fn parse(s: &str) -> Result<DrvOutput> {
        let (hash, name) =
            s.split_once('!').ok_or_else(|| Error::Malformed { what: "derivation output id", value: s.to_owned() })?;
        Ok(DrvOutput { drv_hash: Hash::parse_prefixed(hash)?, output_name: name.to_owned() })
    }

    pub fn render(&self) -> String {
        format!("{}!{}", self.drv_hash.to_prefixed(Encoding::Base16), self.output_name)
    }
}

/// A realisation, for rendering the JSON the protocol carries it as (`Realisation::toJSON`
/// dumped by nlohmann: keys sorted, no spaces, paths as base names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realisation {
    pub id: DrvOutput,
    pub out_path: StorePath,
    pub signatures: BTreeSet<String>,
    pub dependent_realisations: BTreeMap<DrvOutput, StorePath>,
}

impl Realisation {
    /// The JSON text Nix sends for this realisation.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{\"dependentRealisations\":{");
        for (i, (id, path)) in self.dependent_realisations.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            cairn_nix::json::write_string(&mut s, &id.render());
            s.push(':');
            cairn_nix::json::write_string(&mut s, &path.to_string());
        }
        s.push_str("},\"id\":");
        cairn_nix::json::write_string(&mut s, &self.id.render());
        s.push_str(",\"outPath\":");
        cairn_nix::json::write_string(&mut s, &self.out_path.to_string());
        s.push_str(",\"signatures\":[");
        for (i, sig) in self.signatures.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            cairn_nix::json::write_string(&mut s, sig);
        }
        s.push_str("]}");
        s
    }
}

/// Reads an optional duration in microseconds (1.37: a tag, then an `int64_t`).
fn read_opt_micros(r: &mut impl Read) -> Result<Option<u64>> {
    match read_u64(r)? {
        0 => Ok(None),
        1 => {
            let n = read_u64(r)?;
            if n > i64::MAX as u64 {
                return Err(Error::IntegerTooLarge { what: "cpu time", value: n });
            }
            Ok(Some(n))
        }
        t => Err(Error::BadValue { what: "optional tag", value: t }),
    }
}

fn write_opt_micros(w: &mut impl Write, v: Option<u64>) -> Result<()> {
    match v {
        None => write_u64(w, 0),
        Some(n) => {
            write_u64(w, 1)?;
            write_u64(w, n)
        }
    }
}

/// The outcome of building or substituting one derived path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    pub status: BuildStatus,
    pub error_msg: String,
    /// ≥ 1.29, as are the three fields after it.
    pub times_built: u32,
    pub is_non_deterministic: bool,
    pub start_time: u64,
    pub stop_time: u64,
    /// User CPU time in microseconds (≥ 1.37).
    pub cpu_user: Option<u64>,
    /// System CPU time in microseconds (≥ 1.37).
    pub cpu_system: Option<u64>,
    /// ≥ 1.28: each built output's id and its realisation as JSON (see [`Realisation`]).
    pub built_outputs: BTreeMap<DrvOutput, String>,
}

impl BuildResult {
    /// A result with only a status and message, the rest zero.
    pub fn new(status: BuildStatus, error_msg: impl Into<String>) -> BuildResult {
        BuildResult {
            status,
            error_msg: error_msg.into(),
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            cpu_user: None,
            cpu_system: None,
            built_outputs: BTreeMap::new(),
        }
    }

    pub fn read(r: &mut impl Read, proto: &Proto) -> Result<BuildResult> {
        let status = BuildStatus::from_u64(u64::from(read_u32(r, "build status")?));
        let mut res = BuildResult::new(status, read_string(r, proto.limits.max_blob, "error message")?);
        if proto.has(29) {
            res.times_built = read_u32(r, "times built")?;
            res.is_non_deterministic = read_bool(r)?;
            res.start_time = read_u64(r)?;
            res.stop_time = read_u64(r)?;
        }
        if proto.has(37) {
            res.cpu_user = read_opt_micros(r)?;
            res.cpu_system = read_opt_micros(r)?;
        }
        if proto.has(28) {
            let n = read_count(r, &proto.limits)?;
            for _ in 0..n {
                let id = DrvOutput::parse(&read_short(r, proto, "derivation output id")?)?;
                let json = read_string(r, proto.limits.max_blob, "realisation")?;
                res.built_outputs.insert(id, json);
            }
        }
        Ok(res)
    }

    pub fn write(&self, w: &mut impl Write, proto: &Proto) -> Result<()> {
        write_u64(w, self.status.to_u64())?;
        write_str(w, &self.error_msg)?;
        if proto.has(29) {
            write_u64(w, u64::from(self.times_built))?;
            write_bool(w, self.is_non_deterministic)?;
            write_u64(w, self.start_time)?;
            write_u64(w, self.stop_time)?;
        }
        if proto.has(37) {
            write_opt_micros(w, self.cpu_user)?;
            write_opt_micros(w, self.cpu_system)?;
        }
        if proto.has(28) {
            write_count(w, self.built_outputs.len())?;
            for (id, json) in &self.built_outputs {
                write_str(w, &id.render())?;
                write_str(w, json)?;
            }
        }
        Ok(())
    }
}

/// A build result with the derived path it answers (`BuildPathsWithResults`, ≥ 1.34).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedBuildResult {
    pub path: DerivedPath,
    pub result: BuildResult,
}

impl KeyedBuildResult {
    pub fn read(r: &mut impl Read, proto: &Proto) -> Result<KeyedBuildResult> {
        let path = DerivedPath::read(r, proto)?;
        Ok(KeyedBuildResult { path, result: BuildResult::read(r, proto)? })
    }

    pub fn write(&self, w: &mut impl Write, proto: &Proto) -> Result<()> {
        self.path.write(w, proto)?;
        self.result.write(w, proto)
    }
}

/// A derivation without its input derivations, as `BuildDerivation` sends it; its name is
/// the derivation path's name without `.drv`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BasicDerivation {
    /// Output name → (path or empty, `[r:]algo` or empty, base16 hash or empty/`impure`).
    pub outputs: BTreeMap<String, DerivationOutput>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

impl BasicDerivation {
    /// Reads `readDerivation`'s layout: outputs (first duplicate wins), input sources,
    /// platform, builder, arguments, environment (last duplicate wins).
    pub fn read(r: &mut impl Read, proto: &Proto) -> Result<BasicDerivation> {
        let mut drv = BasicDerivation::default();
        let n = read_count(r, &proto.limits)?;
        for _ in 0..n {
            let name = read_short(r, proto, "output name")?;
            let path = read_short(r, proto, "output path")?;
            let hash_algo = read_short(r, proto, "output hash algorithm")?;
            let hash = read_short(r, proto, "output hash")?;
            drv.outputs.entry(name).or_insert(DerivationOutput { path, hash_algo, hash });
        }
        drv.input_srcs = read_path_set(r, proto)?;
        drv.platform = read_short(r, proto, "platform")?;
        drv.builder = read_string(r, proto.limits.max_blob, "builder")?;
        let n = read_count(r, &proto.limits)?;
        drv.args = (0..n).map(|_| read_string(r, proto.limits.max_blob, "argument")).collect::<Result<_>>()?;
        let n = read_count(r, &proto.limits)?;
        for _ in 0..n {
            let k = read_string(r, proto.limits.max_blob, "environment name")?;
            let v = read_string(r, proto.limits.max_blob, "environment value")?;
            drv.env.insert(k, v);
        }
        Ok(drv)
    }

    pub fn write(&self, w: &mut impl Write, proto: &Proto) -> Result<()> {
        write_count(w, self.outputs.len())?;
        for (name, o) in &self.outputs {
            write_str(w, name)?;
            write_str(w, &o.path)?;
            write_str(w, &o.hash_algo)?;
            write_str(w, &o.hash)?;
        }
        write_path_set(w, proto, &self.input_srcs)?;
        write_str(w, &self.platform)?;
        write_str(w, &self.builder)?;
        write_strings(w, self.args.iter())?;
        write_string_map(w, &self.env)
    }

    /// What `BuildDerivation` sends for `drv`: its input derivations dropped, and as input
    /// sources the paths it builds with (its sources and the outputs it uses of its input
    /// derivations), as Nix's remote builds send it.
    pub fn from_derivation(drv: &cairn_nix::derivation::Derivation, inputs: BTreeSet<StorePath>) -> BasicDerivation {
        BasicDerivation {
            outputs: drv.outputs.clone(),
            input_srcs: inputs,
            platform: drv.platform.clone(),
            builder: drv.builder.clone(),
            args: drv.args.clone(),
            env: drv.env.clone(),
        }
    }

    /// The derivation as `cairn-nix` holds it, with no input derivations.
    pub fn to_derivation(&self, proto: &Proto) -> cairn_nix::derivation::Derivation {
        cairn_nix::derivation::Derivation {
            outputs: self.outputs.clone(),
            input_drvs: BTreeMap::new(),
            input_srcs: self.input_srcs.iter().map(|p| proto.store_dir.display(p)).collect(),
            platform: self.platform.clone(),
            builder: self.builder.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
        }
    }
}

/// The client's settings (`SetOptions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    pub keep_failed: bool,
    pub keep_going: bool,
    pub try_fallback: bool,
    pub verbosity: Verbosity,
    pub max_build_jobs: u32,
    pub max_silent_time: u32,
    /// Sent as the verbosity `Error` (verbose) or `Vomit` (not), as Nix's client does.
    pub verbose_build: bool,
    pub build_cores: u32,
    pub use_substitutes: bool,
    /// Other settings by name (≥ 1.12); the first of duplicate names wins.
    pub overrides: BTreeMap<String, String>,
}

impl Default for ClientOptions {
    /// Nix 2.8's defaults on a one-core machine.
    fn default() -> Self {
        ClientOptions {
            keep_failed: false,
            keep_going: false,
            try_fallback: false,
            verbosity: Verbosity::Error,
            max_build_jobs: 1,
            max_silent_time: 0,
            verbose_build: true,
            build_cores: 1,
            use_substitutes: true,
            overrides: BTreeMap::new(),
        }
    }
}

impl ClientOptions {
    /// Reads the fields as `nix-daemon` 2.8 does: every number an `unsigned int`, the
    /// obsolete `useBuildHook`, `logType` and `printBuildTrace` skipped.
    pub fn read(r: &mut impl Read, proto: &Proto) -> Result<ClientOptions> {
        let keep_failed = read_u32(r, "keep-failed")? != 0;
        let keep_going = read_u32(r, "keep-going")? != 0;
        let try_fallback = read_u32(r, "fallback")? != 0;
        let verbosity = Verbosity::from_u64_clamped(u64::from(read_u32(r, "verbosity")?));
        let max_build_jobs = read_u32(r, "max-jobs")?;
        let max_silent_time = read_u32(r, "max-silent-time")?;
        read_u32(r, "use-build-hook")?;
        let verbose_build = read_u32(r, "build verbosity")? == 0;
        read_u32(r, "log type")?;
        read_u32(r, "print build trace")?;
        let build_cores = read_u32(r, "cores")?;
        let use_substitutes = read_u32(r, "substitute")? != 0;
        let mut overrides = BTreeMap::new();
        if proto.has(12) {
            let n = read_u32(r, "override count")?;
            if n as usize > proto.limits.max_count {
                return Err(Error::TooMany { count: u64::from(n), max: proto.limits.max_count });
            }
            for _ in 0..n {
                let k = read_short(r, proto, "setting name")?;
                let v = read_short(r, proto, "setting value")?;
                overrides.entry(k).or_insert(v);
            }
        }
        Ok(ClientOptions {
            keep_failed,
            keep_going,
            try_fallback,
            verbosity,
            max_build_jobs,
            max_silent_time,
            verbose_build,
            build_cores,
            use_substitutes,
            overrides,
        })
    }

    /// Writes the fields as Nix 2.8's client does.
    pub fn write(&self, w: &mut impl Write, proto: &Proto) -> Result<()> {
        write_bool(w, self.keep_failed)?;
        write_bool(w, self.keep_going)?;
        write_bool(w, self.try_fallback)?;
        write_u64(w, self.verbosity.to_u64())?;
        write_u64(w, u64::from(self.max_build_jobs))?;
        write_u64(w, u64::from(self.max_silent_time))?;
        write_bool(w, true)?; // useBuildHook
        let build_verbosity = if self.verbose_build { Verbosity::Error } else { Verbosity::Vomit };
        write_u64(w, build_verbosity.to_u64())?;
        write_u64(w, 0)?; // logType
        write_u64(w, 0)?; // printBuildTrace
        write_u64(w, u64::from(self.build_cores))?;
        write_bool(w, self.use_substitutes)?;
        if proto.has(12) {
            write_string_map(w, &self.overrides)?;
        }
        Ok(())
    }
}

/// What `CollectGarbage` is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcOptions {
    pub action: GcAction,
    pub paths_to_delete: BTreeSet<StorePath>,
    pub ignore_liveness: bool,
    /// Stop after freeing this many bytes (`u64::MAX`: no limit).
    pub max_freed: u64,
}

impl GcOptions {
    pub fn read(r: &mut impl Read, proto: &Proto) -> Result<GcOptions> {
        let action = u64::from(read_u32(r, "gc action")?);
        let action = GcAction::from_u64(action).ok_or(Error::BadValue { what: "gc action", value: action })?;
        let paths_to_delete = read_path_set(r, proto)?;
        let ignore_liveness = read_bool(r)?;
        let max_freed = read_u64(r)?;
        for _ in 0..3 {
            read_u32(r, "obsolete gc field")?;
        }
        Ok(GcOptions { action, paths_to_delete, ignore_liveness, max_freed })
    }

    pub fn write(&self, w: &mut impl Write, proto: &Proto) -> Result<()> {
        write_u64(w, self.action.to_u64())?;
        write_path_set(w, proto, &self.paths_to_delete)?;
        write_bool(w, self.ignore_liveness)?;
        write_u64(w, self.max_freed)?;
        for _ in 0..3 {
            write_u64(w, 0)?;
        }
        Ok(())
    }
}

/// What `CollectGarbage` did: the paths (printed, as strings) and the bytes freed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GcResults {
    pub paths: BTreeSet<String>,
    pub bytes_freed: u64,
}

impl GcResults {
    pub fn read(r: &mut impl Read, proto: &Proto) -> Result<GcResults> {
        let paths = read_string_set(r, proto, "path")?;
        let bytes_freed = read_u64(r)?;
        read_u64(r)?; // obsolete
        Ok(GcResults { paths, bytes_freed })
    }

    pub fn write(&self, w: &mut impl Write) -> Result<()> {
        write_strings(w, self.paths.iter())?;
        write_u64(w, self.bytes_freed)?;
        write_u64(w, 0)
    }
}

/// What a substituter knows about a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubstitutablePathInfo {
    pub deriver: Option<StorePath>,
    pub references: BTreeSet<StorePath>,
    pub download_size: u64,
    pub nar_size: u64,
}

impl SubstitutablePathInfo {
    pub fn read(r: &mut impl Read, proto: &Proto) -> Result<SubstitutablePathInfo> {
        Ok(SubstitutablePathInfo {
            deriver: read_opt_path(r, proto)?,
            references: read_path_set(r, proto)?,
            download_size: read_u64(r)?,
            nar_size: read_u64(r)?,
        })
    }

    pub fn write(&self, w: &mut impl Write, proto: &Proto) -> Result<()> {
        write_opt_path(w, proto, self.deriver.as_ref())?;
        write_path_set(w, proto, &self.references)?;
        write_u64(w, self.download_size)?;
        write_u64(w, self.nar_size)
    }
}

/// `QueryMissing`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Missing {
    pub will_build: BTreeSet<StorePath>,
    pub will_substitute: BTreeSet<StorePath>,
    pub unknown: BTreeSet<StorePath>,
    pub download_size: u64,
    pub nar_size: u64,
}

impl Missing {
    pub fn read(r: &mut impl Read, proto: &Proto) -> Result<Missing> {
        Ok(Missing {
            will_build: read_path_set(r, proto)?,
            will_substitute: read_path_set(r, proto)?,
            unknown: read_path_set(r, proto)?,
            download_size: read_u64(r)?,
            nar_size: read_u64(r)?,
        })
    }

    pub fn write(&self, w: &mut impl Write, proto: &Proto) -> Result<()> {
        write_path_set(w, proto, &self.will_build)?;
        write_path_set(w, proto, &self.will_substitute)?;
        write_path_set(w, proto, &self.unknown)?;
        write_u64(w, self.download_size)?;
        write_u64(w, self.nar_size)
    }
}

/// How `AddToStore` (≥ 1.25) asks for its payload to be hashed: `text:sha256`,
/// `fixed:<algo>` (a flat file's bytes) or `fixed:r:<algo>` (a NAR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaMethod {
    Text,
    Fixed { method: FileIngestionMethod, algo: HashAlgo },
}

impl CaMethod {
    /// Parses as Nix 2.8's `parseContentAddressMethod`.
    pub fn parse(s: &str) -> Result<CaMethod> {
        let bad = || Error::Malformed { what: "content-address method", value: s.to_owned() };
        if let Some(algo) = s.strip_prefix("text:") {
            return match algo.parse::<HashAlgo>() {
                Ok(HashAlgo::Sha256) => Ok(CaMethod::Text),
                _ => Err(bad()),
            };
        }
        let rest = s.strip_prefix("fixed:").ok_or_else(bad)?;
        let (method, algo) = match rest.strip_prefix("r:") {
            Some(algo) => (FileIngestionMethod::Recursive, algo),
            None => (FileIngestionMethod::Flat, rest),
        };
        Ok(CaMethod::Fixed { method, algo: algo.parse().map_err(|_| bad())? })
    }

    /// Nix's `renderContentAddressMethod`.
    pub fn render(&self) -> String {
        match self {
            CaMethod::Text => "text:sha256".to_owned(),
            CaMethod::Fixed { method: FileIngestionMethod::Flat, algo } => format!("fixed:{algo}"),
            CaMethod::Fixed { method: FileIngestionMethod::Recursive, algo } => format!("fixed:r:{algo}"),
        }
    }
}
