//! The pure parts of the `listen` address's request handling, for the fuzz targets in `fuzz/`
//! (built only with the `fuzzing` feature): what a binary-cache or registry request's path,
//! `Range` header, query and credentials are read as, before any store call. The handlers
//! themselves need a store and a runtime; everything they decide from untrusted text alone is
//! reachable here.

use std::collections::HashMap;

use axum::http::HeaderValue;

/// A `Range` header read against a body of `len` bytes (see `stream::parse_range`).
pub use crate::stream::parse_range;

/// The store path hash part of a cache's `HASH.narinfo` request.
pub fn narinfo_file(file: &str) -> Option<&str> {
    crate::listen::cache::narinfo_file(file)
}

/// A cache's `nar/HASH-NARHASH.nar[.zst]` request: hash part, NAR hash, whether compressed.
pub fn nar_file(file: &str) -> Option<(&str, &str, bool)> {
    crate::listen::cache::nar_file(file).map(|f| (f.hash_part, f.nar_hash, f.compressed))
}

/// A registry request after `/v2/`, as the registry's handler reads it from the path axum
/// decoded: the route (its `Debug` form) and the repository it acts on, if any, once the
/// repository name and any digest pass the handler's checks.
pub fn registry_route(decoded_rest: &str) -> Option<(String, Option<&str>)> {
    use crate::listen::registry::{digest_ok, name_ok, route, Route};
    let r = route(decoded_rest)?;
    if let Some(name) = r.repository() {
        name_ok(name).ok()?;
    }
    if let Route::Blob(_, d) | Route::Referrers(_, d) = r {
        digest_ok(d).ok()?;
    }
    Some((format!("{r:?}"), r.repository()))
}

/// The repository the `listen-auth-file` check decides on for a request's (raw) path.
pub fn auth_repository(raw_path: &str) -> Option<String> {
    crate::listen::auth::repository(raw_path)
}

/// The registry's `n`/`last` pagination of `all` (sorted names) under query `q`: the page and
/// its `Link` header, or `None` when refused.
pub fn paginate(all: Vec<String>, q: &HashMap<String, String>) -> Option<(Vec<String>, Option<String>)> {
    let (page, link) = crate::listen::registry::paginate(all, q, "/v2/_catalog").ok()?;
    Some((page, link.map(|l| l.to_str().unwrap_or_default().to_owned())))
}

/// The user a request's `Authorization` header identifies, among those of a `listen-auth-file`
/// with text `users` (`None` if the file is refused or no user matches).
pub fn identify(users: &str, authorization: &[u8]) -> Option<String> {
    let auth = crate::listen::auth::ListenAuth {
        users: crate::listen::auth::ListenAuth::parse(users).ok()?,
        anonymous_read: false,
    };
    let value = HeaderValue::from_bytes(authorization).ok()?;
    auth.identify(Some(&value)).map(|u| u.name.clone())
}
