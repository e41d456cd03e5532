//! Requests: an op code and its fields, read by the daemon and written by the client.
//!
//! One variant per operation of Nix 2.8's `performOp` (`src/libstore/daemon.cc`), each read
//! field by field in the order and with the version tests of that function, and written as
//! Nix 2.8's `RemoteStore` (`remote-store.cc`) writes it. `AddPermRoot` (1.36) follows Nix
//! 2.24's `daemon.cc`. The two ops Nix removed (`QueryFailedPaths`, `ClearFailedPaths`) and
//! numbers that name no op are errors, which a daemon reports as Nix's "invalid operation".
//!
//! A request's fields are all [`Request`] holds. Some ops are followed by a payload the
//! daemon must consume before it answers; [`Request::payload`] says which kind:
//!
//! - framed ([`crate::framing`]): `AddToStore` ≥ 1.25, `AddToStoreNar` ≥ 1.23,
//!   `AddMultipleToStore`, `AddBuildLog`;
//! - a bare NAR, whose end only a NAR parser finds: `AddToStore` < 1.25 (a flat file comes
//!   as the NAR of a regular file), `AddToStoreNar` < 1.21;
//! - tunnelled: the daemon pulls data with `STDERR_READ` (`ImportPaths`, `AddToStoreNar`
//!   1.21–1.22).
//!
//! `AddMultipleToStore`'s framed payload is itself a count followed by, per path, a
//! [`ValidPathInfo`] in the 1.16 layout and the path's NAR ([`read_multiple_entry_info`]).
//!
//! Every length and count is checked against the connection's [`Limits`]
//! before anything is allocated, so a hostile client gets an error, never an abort.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use cairn_nix::{ContentAddress, StorePath};

use crate::codec::*;
use crate::constants::{BuildMode, ProtocolVersion, WorkerOp};
use crate::error::{Error, Result};
use crate::types::*;

/// `RegisterDrvOutput`'s argument, whose layout changed in 1.31.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterDrvOutput {
    /// Before 1.31: the output id and the output's store path as a *base name*.
    Legacy { id: DrvOutput, out_path: StorePath },
    /// From 1.31: the realisation as JSON (see [`Realisation::to_json`]).
    Json(String),
}

/// What follows a request's fields on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    None,
    /// Frames, read with [`crate::FramedReader`].
    Framed,
    /// A bare NAR.
    Nar,
    /// Data pulled from the client with `STDERR_READ`.
    Tunnelled,
}

/// One request, as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Answer: bool.
    IsValidPath(StorePath),
    /// Answer: bool (clients < 1.12 only).
    HasSubstitutes(StorePath),
    /// Answer: the NAR hash, bare base16 (obsolete).
    QueryPathHash(StorePath),
    /// Answer: path set (obsolete).
    QueryReferences(StorePath),
    /// Answer: path set.
    QueryReferrers(StorePath),
    /// Protocol ≥ 1.25; framed payload; answer: [`ValidPathInfo`].
    AddToStore { name: String, method: CaMethod, references: BTreeSet<StorePath>, repair: bool },
    /// Protocol < 1.25; a NAR follows; answer: the path. `fixed == false` means
    /// recursive SHA-256 whatever the other fields say (Nix's compatibility hack).
    AddToStoreLegacy { name: String, fixed: bool, recursive: bool, hash_algo: String },
    /// Answer: the path.
    AddTextToStore { name: String, text: Vec<u8>, references: BTreeSet<StorePath> },
    /// Answer: 1. The mode is sent from 1.15.
    BuildPaths { paths: Vec<DerivedPath>, mode: BuildMode },
    /// Answer: 1.
    EnsurePath(StorePath),
    /// Answer: 1.
    AddTempRoot(StorePath),
    /// A symlink's path, outside the store; answer: 1.
    AddIndirectRoot(String),
    /// Obsolete; answer: 1.
    SyncWithGc,
    /// Answer: root count, then (link, target) pairs.
    FindRoots,
    /// Obsolete; the export is sent with `STDERR_WRITE`, then 1.
    ExportPath { path: StorePath, sign: u32 },
    /// Answer: the deriver or "" (obsolete).
    QueryDeriver(StorePath),
    /// No answer after `STDERR_LAST`.
    SetOptions(ClientOptions),
    /// Answer: [`GcResults`].
    CollectGarbage(GcOptions),
    /// Answer: 0, or 1 and a [`SubstitutablePathInfo`] (clients < 1.12 only).
    QuerySubstitutablePathInfo(StorePath),
    /// Answer: path set (obsolete).
    QueryDerivationOutputs(StorePath),
    /// Answer: path set.
    QueryAllValidPaths,
    /// Answer (≥ 1.17): 0, or 1 and a [`PathInfo`].
    QueryPathInfo(StorePath),
    /// Obsolete; an export stream is tunnelled; answer: the imported paths.
    ImportPaths,
    /// Answer: output names (obsolete).
    QueryDerivationOutputNames(StorePath),
    /// Answer: the path or "".
    QueryPathFromHashPart(String),
    /// Paths with optional content addresses (before 1.22 a plain set); answer: count, then
    /// (path, [`SubstitutablePathInfo`]) pairs.
    QuerySubstitutablePathInfos(BTreeMap<StorePath, Option<ContentAddress>>),
    /// `substitute` is sent from 1.27; answer: path set.
    QueryValidPaths { paths: BTreeSet<StorePath>, substitute: bool },
    /// Answer: path set.
    QuerySubstitutablePaths(BTreeSet<StorePath>),
    /// Answer: path set.
    QueryValidDerivers(StorePath),
    /// Answer: 1.
    OptimiseStore,
    /// Answer: bool, whether errors remain.
    VerifyStore { check_contents: bool, repair: bool },
    /// Answer: [`BuildResult`].
    BuildDerivation { drv_path: StorePath, drv: BasicDerivation, mode: BuildMode },
    /// Answer: 1.
    AddSignatures { path: StorePath, sigs: BTreeSet<String> },
    /// Answer: the NAR itself, right after `STDERR_LAST`.
    NarFromPath(StorePath),
    /// The path's metadata in the 1.16 layout; payload by version; no answer after
    /// `STDERR_LAST`.
    AddToStoreNar { info: ValidPathInfo, repair: bool, dont_check_sigs: bool },
    /// Answer: [`Missing`].
    QueryMissing(Vec<DerivedPath>),
    /// Answer: map of output names to paths or "".
    QueryDerivationOutputMap(StorePath),
    /// No answer after `STDERR_LAST`.
    RegisterDrvOutput(RegisterDrvOutput),
    /// Answer: before 1.31 a path set, after a set of realisation JSON strings.
    QueryRealisation(DrvOutput),
    /// Framed payload; no answer after `STDERR_LAST`.
    AddMultipleToStore { repair: bool, dont_check_sigs: bool },
    /// The derivation's *base name*; framed payload (the log); answer: 1.
    AddBuildLog(StorePath),
    /// Answer: [`KeyedBuildResult`] list.
    BuildPathsWithResults { paths: Vec<DerivedPath>, mode: BuildMode },
    /// Protocol ≥ 1.36; answer: the root's path.
    AddPermRoot { path: StorePath, gc_root: String },
}

fn read_mode(r: &mut impl Read) -> Result<BuildMode> {
    let n = read_u64(r)?;
    BuildMode::from_u64(n).ok_or(Error::BadValue { what: "build mode", value: n })
}

/// The connection's settings with the version raised to at least 1.16, for the path-info
/// layouts that are fixed whatever the connection's version.
fn at_least_16(proto: &Proto) -> std::borrow::Cow<'_, Proto> {
    if proto.has(16) {
        std::borrow::Cow::Borrowed(proto)
    } else {
        std::borrow::Cow::Owned(Proto { version: ProtocolVersion::new(1, 16), ..proto.clone() })
    }
}

/// Reads the op code that starts a request; `None` at a clean end of stream.
fn read_op_code(r: &mut impl Read) -> Result<Option<u64>> {
    let mut b = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(Error::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(u64::from_le_bytes(b)))
}

impl Request {
    /// Reads the next request; `Ok(None)` when the client closed the connection between
    /// requests (not inside one).
    pub fn read(r: &mut impl Read, proto: &Proto) -> Result<Option<Request>> {
        let Some(code) = read_op_code(r)? else { return Ok(None) };
        let op = WorkerOp::from_u64(code).ok_or(Error::UnknownOp(code))?;
        Request::read_fields(op, r, proto).map(Some)
    }

    /// Reads the fields of `op`, whose code has been read.
    pub fn read_fields(op: WorkerOp, r: &mut impl Read, proto: &Proto) -> Result<Request> {
        use WorkerOp as O;
        let path = |r: &mut _| read_path(r, proto);
        Ok(match op {
            O::IsValidPath => Request::IsValidPath(path(r)?),
            O::HasSubstitutes => Request::HasSubstitutes(path(r)?),
            O::QueryPathHash => Request::QueryPathHash(path(r)?),
            O::QueryReferences => Request::QueryReferences(path(r)?),
            O::QueryReferrers => Request::QueryReferrers(path(r)?),
            O::AddToStore if proto.has(25) => {
                let name = read_short(r, proto, "name")?;
                let method = CaMethod::parse(&read_short(r, proto, "content-address method")?)?;
                let references = read_path_set(r, proto)?;
                let repair = read_bool(r)?;
                Request::AddToStore { name, method, references, repair }
            }
            O::AddToStore => {
                let name = read_short(r, proto, "name")?;
                let fixed = read_bool(r)?;
                let recursive = match read_u64(r)? {
                    0 => false,
                    1 => true,
                    n => return Err(Error::BadValue { what: "file ingestion method", value: n }),
                };
                let hash_algo = read_short(r, proto, "hash algorithm")?;
                Request::AddToStoreLegacy { name, fixed, recursive, hash_algo }
            }
            O::AddTextToStore => Request::AddTextToStore {
                name: read_short(r, proto, "name")?,
                text: read_bytes(r, proto.limits.max_blob)?,
                references: read_path_set(r, proto)?,
            },
            O::BuildPaths => {
                let paths = DerivedPath::read_list(r, proto)?;
                let mode = if proto.has(15) { read_mode(r)? } else { BuildMode::Normal };
                Request::BuildPaths { paths, mode }
            }
            O::EnsurePath => Request::EnsurePath(path(r)?),
            O::AddTempRoot => Request::AddTempRoot(path(r)?),
            O::AddIndirectRoot => Request::AddIndirectRoot(read_short(r, proto, "root path")?),
            O::SyncWithGC => Request::SyncWithGc,
            O::FindRoots => Request::FindRoots,
            O::ExportPath => Request::ExportPath { path: path(r)?, sign: read_u32(r, "sign flag")? },
            O::QueryDeriver => Request::QueryDeriver(path(r)?),
            O::SetOptions => Request::SetOptions(ClientOptions::read(r, proto)?),
            O::CollectGarbage => Request::CollectGarbage(GcOptions::read(r, proto)?),
            O::QuerySubstitutablePathInfo => Request::QuerySubstitutablePathInfo(path(r)?),
            O::QueryDerivationOutputs => Request::QueryDerivationOutputs(path(r)?),
            O::QueryAllValidPaths => Request::QueryAllValidPaths,
            O::QueryFailedPaths | O::ClearFailedPaths => return Err(Error::RemovedOp(op)),
            O::QueryPathInfo => Request::QueryPathInfo(path(r)?),
            O::ImportPaths => Request::ImportPaths,
            O::QueryDerivationOutputNames => Request::QueryDerivationOutputNames(path(r)?),
            O::QueryPathFromHashPart => Request::QueryPathFromHashPart(read_short(r, proto, "hash part")?),
            O::QuerySubstitutablePathInfos if proto.has(22) => {
                let n = read_count(r, &proto.limits)?;
                let mut map = BTreeMap::new();
                for _ in 0..n {
                    let p = path(r)?;
                    let ca = read_opt_ca(r, proto)?;
                    map.insert(p, ca);
                }
                Request::QuerySubstitutablePathInfos(map)
            }
            O::QuerySubstitutablePathInfos => {
                Request::QuerySubstitutablePathInfos(read_path_set(r, proto)?.into_iter().map(|p| (p, None)).collect())
            }
            O::QueryValidPaths => {
                let paths = read_path_set(r, proto)?;
                let substitute = proto.has(27) && read_u32(r, "substitute flag")? != 0;
                Request::QueryValidPaths { paths, substitute }
            }
            O::QuerySubstitutablePaths => Request::QuerySubstitutablePaths(read_path_set(r, proto)?),
            O::QueryValidDerivers => Request::QueryValidDerivers(path(r)?),
            O::OptimiseStore => Request::OptimiseStore,
            O::VerifyStore => Request::VerifyStore { check_contents: read_bool(r)?, repair: read_bool(r)? },
            O::BuildDerivation => {
                let drv_path = path(r)?;
                let drv = BasicDerivation::read(r, proto)?;
                Request::BuildDerivation { drv_path, drv, mode: read_mode(r)? }
            }
            O::AddSignatures => {
                Request::AddSignatures { path: path(r)?, sigs: read_string_set(r, proto, "signature")? }
            }
            O::NarFromPath => Request::NarFromPath(path(r)?),
            O::AddToStoreNar => {
                let info = ValidPathInfo::read(r, &at_least_16(proto))?;
                Request::AddToStoreNar { info, repair: read_bool(r)?, dont_check_sigs: read_bool(r)? }
            }
            O::QueryMissing => Request::QueryMissing(DerivedPath::read_list(r, proto)?),
            O::QueryDerivationOutputMap => Request::QueryDerivationOutputMap(path(r)?),
            O::RegisterDrvOutput if proto.has(31) => Request::RegisterDrvOutput(RegisterDrvOutput::Json(read_string(
                r,
                proto.limits.max_blob,
                "realisation",
            )?)),
            O::RegisterDrvOutput => {
                let id = DrvOutput::parse(&read_short(r, proto, "derivation output id")?)?;
                let out_path = StorePath::from_base_name(&read_short(r, proto, "output path")?)?;
                Request::RegisterDrvOutput(RegisterDrvOutput::Legacy { id, out_path })
            }
            O::QueryRealisation => {
                Request::QueryRealisation(DrvOutput::parse(&read_short(r, proto, "derivation output id")?)?)
            }
            O::AddMultipleToStore => {
                Request::AddMultipleToStore { repair: read_bool(r)?, dont_check_sigs: read_bool(r)? }
            }
            O::AddBuildLog => {
                Request::AddBuildLog(StorePath::from_base_name(&read_short(r, proto, "derivation path")?)?)
            }
            O::BuildPathsWithResults => {
                let paths = DerivedPath::read_list(r, proto)?;
                Request::BuildPathsWithResults { paths, mode: read_mode(r)? }
            }
            O::AddPermRoot if proto.has(36) => {
                Request::AddPermRoot { path: path(r)?, gc_root: read_short(r, proto, "root path")? }
            }
            O::AddPermRoot => return Err(Error::OpNotInVersion { op, minor: proto.version.minor() }),
        })
    }

    /// The request's op.
    pub fn op(&self) -> WorkerOp {
        use WorkerOp as O;
        match self {
            Request::IsValidPath(_) => O::IsValidPath,
            Request::HasSubstitutes(_) => O::HasSubstitutes,
            Request::QueryPathHash(_) => O::QueryPathHash,
            Request::QueryReferences(_) => O::QueryReferences,
            Request::QueryReferrers(_) => O::QueryReferrers,
            Request::AddToStore { .. } | Request::AddToStoreLegacy { .. } => O::AddToStore,
            Request::AddTextToStore { .. } => O::AddTextToStore,
            Request::BuildPaths { .. } => O::BuildPaths,
            Request::EnsurePath(_) => O::EnsurePath,
            Request::AddTempRoot(_) => O::AddTempRoot,
            Request::AddIndirectRoot(_) => O::AddIndirectRoot,
            Request::SyncWithGc => O::SyncWithGC,
            Request::FindRoots => O::FindRoots,
            Request::ExportPath { .. } => O::ExportPath,
            Request::QueryDeriver(_) => O::QueryDeriver,
            Request::SetOptions(_) => O::SetOptions,
            Request::CollectGarbage(_) => O::CollectGarbage,
            Request::QuerySubstitutablePathInfo(_) => O::QuerySubstitutablePathInfo,
            Request::QueryDerivationOutputs(_) => O::QueryDerivationOutputs,
            Request::QueryAllValidPaths => O::QueryAllValidPaths,
            Request::QueryPathInfo(_) => O::QueryPathInfo,
            Request::ImportPaths => O::ImportPaths,
            Request::QueryDerivationOutputNames(_) => O::QueryDerivationOutputNames,
            Request::QueryPathFromHashPart(_) => O::QueryPathFromHashPart,
            Request::QuerySubstitutablePathInfos(_) => O::QuerySubstitutablePathInfos,
            Request::QueryValidPaths { .. } => O::QueryValidPaths,
            Request::QuerySubstitutablePaths(_) => O::QuerySubstitutablePaths,
            Request::QueryValidDerivers(_) => O::QueryValidDerivers,
            Request::OptimiseStore => O::OptimiseStore,
            Request::VerifyStore { .. } => O::VerifyStore,
            Request::BuildDerivation { .. } => O::BuildDerivation,
            Request::AddSignatures { .. } => O::AddSignatures,
            Request::NarFromPath(_) => O::NarFromPath,
            Request::AddToStoreNar { .. } => O::AddToStoreNar,
            Request::QueryMissing(_) => O::QueryMissing,
            Request::QueryDerivationOutputMap(_) => O::QueryDerivationOutputMap,
            Request::RegisterDrvOutput(_) => O::RegisterDrvOutput,
            Request::QueryRealisation(_) => O::QueryRealisation,
            Request::AddMultipleToStore { .. } => O::AddMultipleToStore,
            Request::AddBuildLog(_) => O::AddBuildLog,
            Request::BuildPathsWithResults { .. } => O::BuildPathsWithResults,
            Request::AddPermRoot { .. } => O::AddPermRoot,
        }
    }

    /// What the client sends after the fields, at the connection's version.
    pub fn payload(&self, proto: &Proto) -> Payload {
        match self {
            Request::AddToStore { .. } | Request::AddMultipleToStore { .. } | Request::AddBuildLog(_) => {
                Payload::Framed
            }
            Request::AddToStoreLegacy { .. } => Payload::Nar,
            Request::AddToStoreNar { .. } if proto.has(23) => Payload::Framed,
            Request::AddToStoreNar { .. } if proto.has(21) => Payload::Tunnelled,
            Request::AddToStoreNar { .. } => Payload::Nar,
            Request::ImportPaths => Payload::Tunnelled,
            _ => Payload::None,
        }
    }

    /// Writes the op code and fields (client side) in the layout of `proto.version`; the
    /// payload, if any, is the caller's to send next. A request the version cannot express
    /// (a variant of the other side of 1.25 or 1.31, a lone `.drv` before 1.30) is an error.
    pub fn write(&self, w: &mut impl Write, proto: &Proto) -> Result<()> {
        let not_in_version = || Error::OpNotInVersion { op: self.op(), minor: proto.version.minor() };
        write_u64(w, self.op().to_u64())?;
        let path = |w: &mut _, p| write_path(w, proto, p);
        match self {
            Request::IsValidPath(p)
            | Request::HasSubstitutes(p)
            | Request::QueryPathHash(p)
            | Request::QueryReferences(p)
            | Request::QueryReferrers(p)
            | Request::EnsurePath(p)
            | Request::AddTempRoot(p)
            | Request::QueryDeriver(p)
            | Request::QuerySubstitutablePathInfo(p)
            | Request::QueryDerivationOutputs(p)
            | Request::QueryPathInfo(p)
            | Request::QueryDerivationOutputNames(p)
            | Request::QueryValidDerivers(p)
            | Request::NarFromPath(p)
            | Request::QueryDerivationOutputMap(p) => path(w, p),
            Request::AddToStore { name, method, references, repair } => {
                if !proto.has(25) {
                    return Err(not_in_version());
                }
                write_str(w, name)?;
                write_str(w, &method.render())?;
                write_path_set(w, proto, references)?;
                write_bool(w, *repair)
            }
            Request::AddToStoreLegacy { name, fixed, recursive, hash_algo } => {
                if proto.has(25) {
                    return Err(not_in_version());
                }
                write_str(w, name)?;
                write_bool(w, *fixed)?;
                write_bool(w, *recursive)?;
                write_str(w, hash_algo)
            }
            Request::AddTextToStore { name, text, references } => {
                write_str(w, name)?;
                write_bytes(w, text)?;
                write_path_set(w, proto, references)
            }
            Request::BuildPaths { paths, mode } => {
                DerivedPath::write_list(w, proto, paths)?;
                if proto.has(15) {
                    write_u64(w, mode.to_u64())?;
                }
                Ok(())
            }
            Request::AddIndirectRoot(s) | Request::QueryPathFromHashPart(s) => write_str(w, s),
            Request::SyncWithGc
            | Request::FindRoots
            | Request::QueryAllValidPaths
            | Request::ImportPaths
            | Request::OptimiseStore => Ok(()),
            Request::ExportPath { path: p, sign } => {
                path(w, p)?;
                write_u64(w, u64::from(*sign))
            }
            Request::SetOptions(o) => o.write(w, proto),
            Request::CollectGarbage(o) => o.write(w, proto),
            Request::QuerySubstitutablePathInfos(map) => {
                write_count(w, map.len())?;
                for (p, ca) in map {
                    path(w, p)?;
                    if proto.has(22) {
                        write_opt_ca(w, ca.as_ref())?;
                    }
                }
                Ok(())
            }
            Request::QueryValidPaths { paths, substitute } => {
                write_path_set(w, proto, paths)?;
                if proto.has(27) {
                    write_bool(w, *substitute)?;
                }
                Ok(())
            }
            Request::QuerySubstitutablePaths(paths) => write_path_set(w, proto, paths),
            Request::VerifyStore { check_contents, repair } => {
                write_bool(w, *check_contents)?;
                write_bool(w, *repair)
            }
            Request::BuildDerivation { drv_path, drv, mode } => {
                path(w, drv_path)?;
                drv.write(w, proto)?;
                write_u64(w, mode.to_u64())
            }
            Request::AddSignatures { path: p, sigs } => {
                path(w, p)?;
                write_strings(w, sigs.iter())
            }
            Request::AddToStoreNar { info, repair, dont_check_sigs } => {
                info.write(w, &at_least_16(proto))?;
                write_bool(w, *repair)?;
                write_bool(w, *dont_check_sigs)
            }
            Request::QueryMissing(paths) => DerivedPath::write_list(w, proto, paths),
            Request::RegisterDrvOutput(RegisterDrvOutput::Legacy { id, out_path }) => {
                if proto.has(31) {
                    return Err(not_in_version());
                }
                write_str(w, &id.render())?;
                write_str(w, &out_path.to_string())
            }
            Request::RegisterDrvOutput(RegisterDrvOutput::Json(json)) => {
                if !proto.has(31) {
                    return Err(not_in_version());
                }
                write_str(w, json)
            }
            Request::QueryRealisation(id) => write_str(w, &id.render()),
            Request::AddMultipleToStore { repair, dont_check_sigs } => {
                write_bool(w, *repair)?;
                write_bool(w, *dont_check_sigs)
            }
            Request::AddBuildLog(p) => write_str(w, &p.to_string()),
            Request::BuildPathsWithResults { paths, mode } => {
                DerivedPath::write_list(w, proto, paths)?;
                write_u64(w, mode.to_u64())
            }
            Request::AddPermRoot { path: p, gc_root } => {
                if !proto.has(36) {
                    return Err(not_in_version());
                }
                path(w, p)?;
                write_str(w, gc_root)
            }
        }
    }
}

/// Reads the path count that starts `AddMultipleToStore`'s (unframed) payload.
pub fn read_multiple_count(r: &mut impl Read, proto: &Proto) -> Result<u64> {
    let n = read_u64(r)?;
    if n > proto.limits.max_count as u64 {
        return Err(Error::TooMany { count: n, max: proto.limits.max_count });
    }
    Ok(n)
}

/// Reads one entry's metadata in `AddMultipleToStore`'s payload (the 1.16 layout whatever
/// the connection's version); the path's NAR follows it.
pub fn read_multiple_entry_info(r: &mut impl Read, proto: &Proto) -> Result<ValidPathInfo> {
    ValidPathInfo::read(r, &at_least_16(proto))
}

/// Writes one entry's metadata of `AddMultipleToStore`'s payload; the caller writes the count
/// first and the NAR after each entry.
pub fn write_multiple_entry_info(w: &mut impl Write, proto: &Proto, info: &ValidPathInfo) -> Result<()> {
    info.write(w, &at_least_16(proto))
}
