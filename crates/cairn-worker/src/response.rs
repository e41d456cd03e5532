//! Answers: what the daemon writes after `STDERR_LAST`, and the client reads.
//!
//! The shape of an answer depends on the op (and sometimes the version), never on a tag in
//! the bytes, so [`Response::read`] takes the op the client sent. Layouts from the `to << …`
//! lines of Nix 2.8's `performOp` (`src/libstore/daemon.cc`) and the matching reads in
//! `RemoteStore` (`remote-store.cc`). Ops whose answer is a stream (`NarFromPath`: the NAR
//! itself) read and write nothing here; the caller copies the stream.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use cairn_nix::StorePath;

use crate::codec::*;
use crate::constants::WorkerOp;
use crate::error::{Error, Result};
use crate::types::*;

/// `QueryRealisation`'s answer, whose layout changed in 1.31.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Realisations {
    /// Before 1.31: the output paths.
    Paths(BTreeSet<StorePath>),
    /// From 1.31: realisations as JSON.
    Json(BTreeSet<String>),
}

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Nothing follows `STDERR_LAST` (`SetOptions`, `AddToStoreNar`, `AddMultipleToStore`,
    /// `RegisterDrvOutput`).
    Nothing,
    /// The NAR follows, unframed (`NarFromPath`); copying it is the caller's.
    Nar,
    /// The constant 1 that many ops answer with.
    One,
    Bool(bool),
    /// A string: `QueryPathHash`'s base16 hash, `AddPermRoot`'s root.
    Text(String),
    /// `AddTextToStore`, and `AddToStore` before 1.25.
    Path(StorePath),
    /// A path or "": `QueryDeriver`, `QueryPathFromHashPart`.
    OptPath(Option<StorePath>),
    PathSet(BTreeSet<StorePath>),
    /// `ImportPaths`: the imported paths, in import order.
    PathList(Vec<StorePath>),
    /// `QueryDerivationOutputNames`.
    StringSet(BTreeSet<String>),
    /// `QueryPathInfo`; `None` is only expressible from 1.17.
    PathInfo(Option<PathInfo>),
    /// `AddToStore` from 1.25.
    ValidPathInfo(ValidPathInfo),
    /// `QueryDerivationOutputMap`.
    OutputMap(BTreeMap<String, Option<StorePath>>),
    SubstitutablePathInfo(Option<SubstitutablePathInfo>),
    SubstitutablePathInfos(BTreeMap<StorePath, SubstitutablePathInfo>),
    Missing(Missing),
    /// `FindRoots`: (link, target) pairs.
    Roots(Vec<(String, StorePath)>),
    GcResults(GcResults),
    /// `BuildDerivation`.
    BuildResult(BuildResult),
    /// `BuildPathsWithResults`.
    BuildResults(Vec<KeyedBuildResult>),
    Realisations(Realisations),
}

impl Response {
    /// Reads the answer to `op` (client side).
    pub fn read(op: WorkerOp, r: &mut impl Read, proto: &Proto) -> Result<Response> {
        use WorkerOp as O;
        Ok(match op {
            O::SetOptions | O::AddToStoreNar | O::AddMultipleToStore | O::RegisterDrvOutput => Response::Nothing,
            O::NarFromPath => Response::Nar,
            O::BuildPaths
            | O::EnsurePath
            | O::AddTempRoot
            | O::AddIndirectRoot
            | O::SyncWithGC
            | O::ExportPath
            | O::OptimiseStore
            | O::AddSignatures
            | O::AddBuildLog => {
                read_u64(r)?;
                Response::One
            }
            O::IsValidPath | O::HasSubstitutes | O::VerifyStore => Response::Bool(read_u32(r, "bool")? != 0),
            O::QueryPathHash | O::AddPermRoot => Response::Text(read_short(r, proto, "string")?),
            O::AddTextToStore => Response::Path(read_path(r, proto)?),
            O::AddToStore if proto.has(25) => Response::ValidPathInfo(ValidPathInfo::read(r, proto)?),
            O::AddToStore => Response::Path(read_path(r, proto)?),
            O::QueryDeriver | O::QueryPathFromHashPart => Response::OptPath(read_opt_path(r, proto)?),
            O::QueryReferences
            | O::QueryReferrers
            | O::QueryValidDerivers
            | O::QueryDerivationOutputs
            | O::QueryValidPaths
            | O::QuerySubstitutablePaths
            | O::QueryAllValidPaths => Response::PathSet(read_path_set(r, proto)?),
            O::ImportPaths => {
                let n = read_count(r, &proto.limits)?;
                Response::PathList((0..n).map(|_| read_path(r, proto)).collect::<Result<_>>()?)
            }
            O::QueryDerivationOutputNames => Response::StringSet(read_string_set(r, proto, "output name")?),
            O::QueryPathInfo if proto.has(17) => {
                Response::PathInfo(if read_bool(r)? { Some(PathInfo::read(r, proto)?) } else { None })
            }
            O::QueryPathInfo => Response::PathInfo(Some(PathInfo::read(r, proto)?)),
            O::QueryDerivationOutputMap => {
                let n = read_count(r, &proto.limits)?;
                let mut map = BTreeMap::new();
                for _ in 0..n {
                    let name = read_short(r, proto, "output name")?;
                    map.insert(name, read_opt_path(r, proto)?);
                }
                Response::OutputMap(map)
            }
            O::QuerySubstitutablePathInfo => Response::SubstitutablePathInfo(if read_u32(r, "bool")? != 0 {
                Some(SubstitutablePathInfo::read(r, proto)?)
            } else {
                None
            }),
            O::QuerySubstitutablePathInfos => {
                let n = read_count(r, &proto.limits)?;
                let mut map = BTreeMap::new();
                for _ in 0..n {
                    let p = read_path(r, proto)?;
                    map.insert(p, SubstitutablePathInfo::read(r, proto)?);
                }
                Response::SubstitutablePathInfos(map)
            }
            O::QueryMissing => Response::Missing(Missing::read(r, proto)?),
            O::FindRoots => {
                let n = read_count(r, &proto.limits)?;
                let roots = (0..n)
                    .map(|_| Ok((read_short(r, proto, "root link")?, read_path(r, proto)?)))
                    .collect::<Result<_>>()?;
                Response::Roots(roots)
            }
            O::CollectGarbage => Response::GcResults(GcResults::read(r, proto)?),
            O::BuildDerivation => Response::BuildResult(BuildResult::read(r, proto)?),
            O::BuildPathsWithResults => {
                let n = read_count(r, &proto.limits)?;
                Response::BuildResults((0..n).map(|_| KeyedBuildResult::read(r, proto)).collect::<Result<_>>()?)
            }
            O::QueryRealisation if proto.has(31) => {
                let n = read_count(r, &proto.limits)?;
                Response::Realisations(Realisations::Json(
                    (0..n).map(|_| read_string(r, proto.limits.max_blob, "realisation")).collect::<Result<_>>()?,
                ))
            }
            O::QueryRealisation => Response::Realisations(Realisations::Paths(read_path_set(r, proto)?)),
            O::QueryFailedPaths | O::ClearFailedPaths => return Err(Error::RemovedOp(op)),
        })
    }

    /// Writes the answer (daemon side) in the layout of `proto.version`.
    pub fn write(&self, w: &mut impl Write, proto: &Proto) -> Result<()> {
        match self {
            Response::Nothing | Response::Nar => Ok(()),
            Response::One => write_u64(w, 1),
            Response::Bool(b) => write_bool(w, *b),
            Response::Text(s) => write_str(w, s),
            Response::Path(p) => write_path(w, proto, p),
            Response::OptPath(p) => write_opt_path(w, proto, p.as_ref()),
            Response::PathSet(paths) => write_path_set(w, proto, paths),
            Response::PathList(paths) => {
                write_count(w, paths.len())?;
                paths.iter().try_for_each(|p| write_path(w, proto, p))
            }
            Response::StringSet(names) => write_strings(w, names.iter()),
            Response::PathInfo(info) => {
                if proto.has(17) {
                    write_bool(w, info.is_some())?;
                }
                match info {
                    Some(info) => info.write(w, proto),
                    None if proto.has(17) => Ok(()),
                    None => Err(Error::Malformed { what: "path info answer before 1.17", value: "none".into() }),
                }
            }
            Response::ValidPathInfo(info) => info.write(w, proto),
            Response::OutputMap(map) => {
                write_count(w, map.len())?;
                for (name, p) in map {
                    write_str(w, name)?;
                    write_opt_path(w, proto, p.as_ref())?;
                }
                Ok(())
            }
            Response::SubstitutablePathInfo(info) => {
                write_bool(w, info.is_some())?;
                info.as_ref().map_or(Ok(()), |i| i.write(w, proto))
            }
            Response::SubstitutablePathInfos(map) => {
                write_count(w, map.len())?;
                for (p, info) in map {
                    write_path(w, proto, p)?;
                    info.write(w, proto)?;
                }
                Ok(())
            }
            Response::Missing(m) => m.write(w, proto),
            Response::Roots(roots) => {
                write_count(w, roots.len())?;
                for (link, target) in roots {
                    write_str(w, link)?;
                    write_path(w, proto, target)?;
                }
                Ok(())
            }
            Response::GcResults(res) => res.write(w),
            Response::BuildResult(res) => res.write(w, proto),
            Response::BuildResults(results) => {
                write_count(w, results.len())?;
                results.iter().try_for_each(|r| r.write(w, proto))
            }
            Response::Realisations(Realisations::Paths(paths)) => write_path_set(w, proto, paths),
            Response::Realisations(Realisations::Json(json)) => write_strings(w, json.iter()),
        }
    }
}
