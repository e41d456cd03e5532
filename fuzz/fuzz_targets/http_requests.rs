//! What cairnd's `listen` address (binary cache and OCI registry) reads from a request before
//! any store call: the cache's `.narinfo` and `nar/` file names, `Range` headers, the
//! registry's routes under `/v2/` (as axum percent-decodes them) with their name and digest
//! checks, `n`/`last` pagination, and the `Authorization` header against a users file. Input:
//! `PATH\n--\nHEADER\n--\nQUERY-LAST`. Contract: no panic; a range that is satisfied lies inside
//! the body; and the repository the `listen-auth-file` check decides on is the one the
//! registry's handler acts on (or one that contains it), so that prefixes cannot be escaped.
#![no_main]

use std::collections::HashMap;

use cairn_daemon::fuzzing;
use libfuzzer_sys::fuzz_target;

/// A users file: one user limited to `team`, one to nothing.
const USERS: &str = "alice 4f8f1ae5c62ff6e03fc1d4bcd2bf3b4c9b1e3cbe8f94e9e0b04c6c1b0d3f1a22 read,push team\n\
                     bob b2c7f4b8fbcc14dc0a1e7f52e2e24a5ffb0c0a8d4fe5d0d68b6cd66a1ef2f0b0 read\n";

fuzz_target!(|data: &[u8]| {
    let p = cairn_fuzz::parts(data, 3);
    let Some(path) = cairn_fuzz::text(p[0]) else { return };
    let header = p[1];

    // The binary cache.
    let file = path.strip_prefix("/nar/").unwrap_or(path.trim_start_matches('/'));
    if let Some(h) = fuzzing::narinfo_file(file) {
        assert_eq!(h.len(), 32);
    }
    let _ = fuzzing::nar_file(file);
    if let Some(value) = cairn_fuzz::text(header) {
        for len in [0, 1, 511, 512, 1 << 20, u64::MAX] {
            if let Some(Ok((start, end))) = fuzzing::parse_range(value, len) {
                assert!(start < end && end <= len, "range {start}..{end} of {len} bytes from {value:?}");
            }
        }
    }

    // Who is asking.
    let _ = fuzzing::identify(USERS, header);

    // The registry: what the handler acts on (after axum's decoding) against what the
    // authorisation check decided on (the raw path).
    if let Some(raw_rest) = path.strip_prefix("/v2/") {
        let decoded = percent_encoding::percent_decode_str(raw_rest).decode_utf8();
        if let Ok(decoded) = decoded {
            if let Some((_, Some(acted_on))) = fuzzing::registry_route(&decoded) {
                let checked = fuzzing::auth_repository(path);
                let contained = checked
                    .as_deref()
                    .is_some_and(|c| acted_on == c || acted_on.strip_prefix(c).is_some_and(|r| r.starts_with('/')));
                assert!(contained, "{path:?}: the handler acts on {acted_on:?}, the check decided on {checked:?}");
            }
        }
    }
    if let Some(last) = cairn_fuzz::text(p[2]) {
        let all: Vec<String> = ["a", "b", "b/c", "team/x"].iter().map(|s| s.to_string()).collect();
        let mut q = HashMap::from([("last".to_owned(), last.to_owned())]);
        if let Some(n) = cairn_fuzz::text(header) {
            q.insert("n".to_owned(), n.to_owned());
        }
        if let Some((page, _)) = fuzzing::paginate(all, &q) {
            assert!(page.iter().all(|t| t.as_str() > last));
        }
    }
});
