//! Domain types to wire types and back.

use cairn_nix::hash::Encoding;
use cairn_nix::{StoreDir, StorePath};
use cairn_store::PathInfo;

use crate::error::ApiError;

pub fn path_info(dir: &StoreDir, i: &PathInfo) -> cairn_api::PathInfo {
    cairn_api::PathInfo {
        path: dir.display(&i.path),
        nar_hash: i.nar_hash.to_prefixed(Encoding::Sri),
        nar_size: i.nar_size,
        references: i.references.iter().map(|r| dir.display(r)).collect(),
        deriver: i.deriver.as_ref().map(|d| dir.display(d)),
        registration_time: i.registration_time,
        ultimate: i.ultimate,
        signatures: i.signatures.iter().cloned().collect(),
        ca: i.ca.as_ref().map(ToString::to_string),
    }
}

/// The store's form of a path's metadata from Nix's wire.
pub fn store_info(v: cairn_worker::ValidPathInfo) -> PathInfo {
    PathInfo {
        path: v.path,
        nar_hash: v.info.nar_hash,
        nar_size: v.info.nar_size,
        references: v.info.references,
        deriver: v.info.deriver,
        registration_time: v.info.registration_time.min(i64::MAX as u64) as i64,
        ultimate: v.info.ultimate,
        signatures: v.info.sigs,
        ca: v.info.ca,
    }
}

/// A substitution's added paths and its failures, as the wire names them.
pub fn substitution(
    dir: &StoreDir,
    r: &cairn_cache::substitute::Report,
) -> (Vec<String>, Vec<cairn_api::SubstituteFailure>) {
    let added = r.added.iter().map(|i| dir.display(&i.path)).collect();
    let failed = r
        .failed
        .iter()
        .map(|(p, reason)| cairn_api::SubstituteFailure { path: dir.display(p), reason: reason.clone() })
        .collect();
    (added, failed)
}

pub fn store_path(dir: &StoreDir, s: &str) -> Result<StorePath, ApiError> {
    dir.parse(s.trim_end_matches('/')).map_err(|e| ApiError::bad_request(e.to_string()))
}

pub fn store_paths(dir: &StoreDir, v: &[String]) -> Result<Vec<StorePath>, ApiError> {
    v.iter().map(|s| store_path(dir, s)).collect()
}

pub fn gc_result(dir: &StoreDir, r: cairn_store::GcReport) -> cairn_api::GcResult {
    cairn_api::GcResult {
        deleted: r.deleted.iter().map(|p| dir.display(p)).collect(),
        bytes_freed: r.bytes_freed,
        unregistered: r.unregistered as u64,
        limit_reached: r.limit_reached,
    }
}

pub fn verify_result(dir: &StoreDir, r: cairn_store::VerifyReport) -> cairn_api::VerifyResult {
    cairn_api::VerifyResult {
        checked: r.checked,
        problems: r
            .problems
            .into_iter()
            .map(|p| cairn_api::VerifyProblem {
                path: p.path.as_ref().map(|x| dir.display(x)),
                kind: p.kind.to_owned(),
                message: p.message,
            })
            .collect(),
        repaired: r.repaired,
        forgotten: r.forgotten,
    }
}
