//! Narinfo lookups, remembered.
//!
//! A closure query asks a cache for the same narinfos again and again (every build, every
//! `substitute` of an overlapping closure). Answers are kept in memory for a while, as Nix keeps
//! them in its `binary-cache` database: found narinfos for long (they never change: a store
//! path's contents are fixed), "not there" answers briefly, because a later push makes them
//! wrong — a negative answer must not hide a new path for long. Only narinfos that passed the
//! checks are remembered; a refused one is asked for again next time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_nix::narinfo::NarInfo;

/// Remembered narinfo lookups, per cache and hash part.
#[derive(Debug)]
pub struct NarInfoCache {
    positive_ttl: Duration,
    negative_ttl: Duration,
    entries: Mutex<HashMap<Key, (Instant, Option<NarInfo>)>>,
}

/// (cache URL, hash part).
type Key = (String, String);

/// Nix's `narinfo-cache-positive-ttl`: 30 days.
pub const DEFAULT_POSITIVE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// A minute (Nix's `narinfo-cache-negative-ttl` is an hour, which hides a fresh push that long).
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(60);

impl Default for NarInfoCache {
    fn default() -> Self {
        NarInfoCache::new(DEFAULT_POSITIVE_TTL, DEFAULT_NEGATIVE_TTL)
    }
}

impl NarInfoCache {
    pub fn new(positive_ttl: Duration, negative_ttl: Duration) -> NarInfoCache {
        NarInfoCache { positive_ttl, negative_ttl, entries: Mutex::new(HashMap::new()) }
    }

    /// `Some(answer)` if a lookup of `hash_part` in `cache` is remembered and fresh.
    pub fn get(&self, cache: &str, hash_part: &str) -> Option<Option<NarInfo>> {
        self.get_at(cache, hash_part, Instant::now())
    }

    fn get_at(&self, cache: &str, hash_part: &str, now: Instant) -> Option<Option<NarInfo>> {
        let mut map = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (cache.to_owned(), hash_part.to_owned());
        let (at, answer) = map.get(&key)?;
        let ttl = if answer.is_some() { self.positive_ttl } else { self.negative_ttl };
        if now.duration_since(*at) >= ttl {
            map.remove(&key);
            return None;
        }
        Some(answer.clone())
    }

    /// Remembers an answer (`None`: the cache has no such narinfo).
    pub fn put(&self, cache: &str, hash_part: &str, answer: Option<NarInfo>) {
        self.put_at(cache, hash_part, answer, Instant::now())
    }

    fn put_at(&self, cache: &str, hash_part: &str, answer: Option<NarInfo>, at: Instant) {
        let mut map = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert((cache.to_owned(), hash_part.to_owned()), (at, answer));
    }

    /// Forgets what is known of `hash_part` in `cache` (its NAR turned out bad, say).
    pub fn forget(&self, cache: &str, hash_part: &str) {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(cache.to_owned(), hash_part.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_nix::{Hash, HashAlgo, StoreDir};

    fn info() -> NarInfo {
        let dir = StoreDir::default();
        let h = Hash::digest(HashAlgo::Sha256, b"x");
        let path = dir.make_store_path("test", &h, "x").unwrap();
        NarInfo::parse(
            &dir,
            &format!(
                "StorePath: {}\nURL: nar/x.nar\nCompression: none\nNarHash: {}\nNarSize: 8\nReferences: \n",
                dir.display(&path),
                h.to_prefixed(cairn_nix::hash::Encoding::Nix32)
            ),
        )
        .unwrap()
    }

    #[test]
    fn answers_expire_after_their_ttl() {
        let c = NarInfoCache::new(Duration::from_secs(100), Duration::from_secs(10));
        let t0 = Instant::now();
        c.put_at("u", "pos", Some(info()), t0);
        c.put_at("u", "neg", None, t0);
        assert_eq!(c.get_at("u", "pos", t0 + Duration::from_secs(9)), Some(Some(info())));
        assert_eq!(c.get_at("u", "neg", t0 + Duration::from_secs(9)), Some(None));
        // The negative answer goes first: a later push is seen after at most its TTL.
        assert_eq!(c.get_at("u", "neg", t0 + Duration::from_secs(10)), None);
        assert_eq!(c.get_at("u", "pos", t0 + Duration::from_secs(99)), Some(Some(info())));
        assert_eq!(c.get_at("u", "pos", t0 + Duration::from_secs(100)), None);
        // Other caches are other entries.
        assert_eq!(c.get_at("v", "pos", t0), None);
    }

    #[test]
    fn forget_drops_an_answer() {
        let c = NarInfoCache::default();
        c.put("u", "h", Some(info()));
        c.forget("u", "h");
        assert_eq!(c.get("u", "h"), None);
    }
}
