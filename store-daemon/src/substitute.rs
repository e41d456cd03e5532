//! Substitution from `file://` binary caches: the closure of the asked paths, fetched
//! references first, each path checked before anything of it is registered.
//!
//! Checks, in order, each failing with a message that names it: the cache serves our store
//! directory; the narinfo names the path asked for; the path is signed by a trusted key
//! (`trusted-public-keys`), or is content-addressed and its content address really gives this
//! path; the NAR is stored uncompressed or with zstd (xz and bzip2 are not read yet); the file
//! has the size and hash the narinfo says; and, as it is restored, the NAR has the narinfo's
//! hash and size.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use cairn_nix::narinfo::{CacheInfo, NarInfo};
use cairn_nix::signing::PublicKey;
use cairn_nix::Hasher;
use cairn_nix::{ContentAddress, StoreDir, StorePath};
use cairn_store::{LocalStore, PathInfo};

use crate::error::ApiError;

fn read(path: &Path) -> Result<String, ApiError> {
    std::fs::read_to_string(path).map_err(|e| ApiError::not_found(format!("cannot read '{}': {e}", path.display())))
}

/// Whether a content-addressed narinfo's path follows from its content address.
fn ca_matches(dir: &StoreDir, info: &NarInfo) -> bool {
    let Some(ca) = info.ca.as_deref().and_then(|c| c.parse::<ContentAddress>().ok()) else { return false };
    let refs: BTreeSet<StorePath> = info.references.iter().filter(|r| **r != info.store_path).cloned().collect();
    let self_ref = info.references.contains(&info.store_path);
    dir.make_content_addressed_path(info.store_path.name(), &ca, &refs, self_ref).is_ok_and(|p| p == info.store_path)
}

/// Substitutes the closures of `paths` from the cache at `cache`; returns what was added.
pub fn from_file_cache(
    store: &LocalStore,
    dir: &StoreDir,
    cache: &Path,
    paths: &[StorePath],
    keys: &[PublicKey],
    require_sigs: bool,
) -> Result<Vec<PathInfo>, ApiError> {
    CacheInfo::parse(dir, &read(&cache.join("nix-cache-info"))?).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // The missing part of the closure, by narinfo.
    let mut wanted: BTreeMap<StorePath, NarInfo> = BTreeMap::new();
    let mut todo: Vec<StorePath> = paths.to_vec();
    while let Some(p) = todo.pop() {
        if wanted.contains_key(&p) || store.is_valid(&p)? {
            continue;
        }
        let file = cache.join(format!("{}.narinfo", p.hash_part()));
        let text = read(&file)?;
        let info = NarInfo::parse(dir, &text).map_err(|e| ApiError::bad_request(format!("{}: {e}", file.display())))?;
        if info.store_path != p {
            return Err(ApiError::bad_request(format!(
                "{}: the narinfo is for '{}', not '{}'",
                file.display(),
                dir.display(&info.store_path),
                dir.display(&p)
            )));
        }
        let signed = info.is_signed_by(dir, keys);
        if require_sigs && !signed && !ca_matches(dir, &info) {
            return Err(ApiError::forbidden(format!(
                "'{}' is not signed by a trusted key (trusted-public-keys) and is not content-addressed",
                dir.display(&p)
            )));
        }
        if !matches!(info.compression.as_str(), "none" | "zstd") {
            return Err(ApiError::bad_request(format!(
                "'{}' is compressed with {}; only uncompressed and zstd caches can be read so far",
                dir.display(&p),
                info.compression
            )));
        }
        todo.extend(info.references.iter().filter(|r| **r != p).cloned());
        wanted.insert(p, info);
    }
    // References first.
    let mut order: Vec<StorePath> = Vec::new();
    let mut placed: BTreeSet<StorePath> = BTreeSet::new();
    fn visit(
        p: &StorePath,
        wanted: &BTreeMap<StorePath, NarInfo>,
        placed: &mut BTreeSet<StorePath>,
        order: &mut Vec<StorePath>,
    ) {
        if !wanted.contains_key(p) || !placed.insert(p.clone()) {
            return;
        }
        for r in wanted[p].references.iter().filter(|r| *r != p) {
            visit(r, wanted, placed, order);
        }
        order.push(p.clone());
    }
    for p in wanted.keys() {
        visit(p, &wanted, &mut placed, &mut order);
    }
    let mut added = Vec::new();
    for p in order {
        let info = &wanted[&p];
        let nar = cache.join(&info.url);
        if info.url.contains("..") || info.url.starts_with('/') {
            return Err(ApiError::bad_request(format!(
                "'{}': NAR URL '{}' leaves the cache",
                dir.display(&p),
                info.url
            )));
        }
        let file = std::fs::File::open(&nar)
            .map_err(|e| ApiError::not_found(format!("cannot read '{}': {e}", nar.display())))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if let Some(size) = info.file_size.filter(|s| *s != len) {
            return Err(ApiError::bad_request(format!(
                "'{}': the NAR file has {len} bytes, the narinfo says {size}",
                dir.display(&p)
            )));
        }
        let path_info = PathInfo {
            path: p.clone(),
            nar_hash: info.nar_hash.clone(),
            nar_size: info.nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            registration_time: 0,
            ultimate: false,
            signatures: info.signatures.iter().cloned().collect(),
            ca: info.ca.as_deref().and_then(|c| c.parse().ok()),
        };
        // The file's hash first (a local file: one more read), so that a mismatch refuses the
        // path before anything of it is placed; then the NAR's, as it is restored.
        if let Some(expected) = &info.file_hash {
            let mut h = Hasher::new(expected.algo());
            let mut f = std::io::BufReader::with_capacity(1 << 20, &file);
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = std::io::Read::read(&mut f, &mut buf)
                    .map_err(|e| ApiError::internal(format!("cannot read '{}': {e}", nar.display())))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            let actual = h.finish();
            if &actual != expected {
                return Err(ApiError::bad_request(format!(
                    "'{}': the NAR file hashes to {actual}, the narinfo says {expected}",
                    dir.display(&p)
                )));
            }
        }
        let file = std::fs::File::open(&nar)
            .map_err(|e| ApiError::not_found(format!("cannot read '{}': {e}", nar.display())))?;
        let reader = std::io::BufReader::with_capacity(1 << 20, file);
        // Bounded: a NAR longer than its narinfo says is cut there and fails the size check.
        let added_path = if info.compression == "zstd" {
            let decoder = zstd::stream::read::Decoder::with_buffer(reader)
                .map_err(|e| ApiError::internal(format!("cannot start zstd: {e}")))?;
            store.add_nar_with_info(path_info, std::io::Read::take(decoder, info.nar_size + 1))?
        } else {
            store.add_nar_with_info(path_info, std::io::Read::take(reader, info.nar_size + 1))?
        };
        added.push(added_path);
        tracing::info!(path = %dir.display(&p), "substituted");
    }
    Ok(added)
}
