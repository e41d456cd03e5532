//! Finding references: which of a set of store path hashes occur in a stream of bytes.
//!
//! Nix discovers a path's references by scanning its contents for the 32-character hash parts of
//! candidate paths (the build's inputs and outputs). The scan skips ahead over any window that
//! contains a character outside nixbase32, which makes it close to a linear pass. Contents arrive
//! in chunks, so the scanner keeps the last 31 bytes of each chunk and rescans them joined with the
//! start of the next: a hash split across two reads is still found.

use std::collections::HashSet;

use crate::nixbase32::is_valid_char;
use crate::store_path::HASH_PART_LEN;

/// Scans byte chunks for the hash parts of candidate store paths.
pub struct ReferenceScanner {
    candidates: HashSet<[u8; HASH_PART_LEN]>,
    found: HashSet<[u8; HASH_PART_LEN]>,
    tail: Vec<u8>,
}

impl ReferenceScanner {
    /// A scanner for these hash parts (each 32 nixbase32 characters; others are ignored).
    pub fn new<'a>(hash_parts: impl IntoIterator<Item = &'a str>) -> Self {
        let candidates = hash_parts.into_iter().filter_map(|h| h.as_bytes().try_into().ok()).collect();
        ReferenceScanner { candidates, found: HashSet::new(), tail: Vec::with_capacity(2 * HASH_PART_LEN) }
    }

    fn search(&mut self, s: &[u8]) {
        let mut i = 0;
        while i + HASH_PART_LEN <= s.len() {
            match (0..HASH_PART_LEN).rev().find(|&j| !is_valid_char(s[i + j])) {
                Some(j) => i += j + 1,
                None => {
                    let window: [u8; HASH_PART_LEN] = s[i..i + HASH_PART_LEN].try_into().expect("window length");
                    if self.candidates.remove(&window) {
                        self.found.insert(window);
                    }
                    i += 1;
                }
            }
        }
    }

    /// Feeds the next chunk of contents.
    pub fn update(&mut self, data: &[u8]) {
        if self.candidates.is_empty() {
            return;
        }
        let head = data.len().min(HASH_PART_LEN);
        let mut joined = std::mem::take(&mut self.tail);
        joined.extend_from_slice(&data[..head]);
        self.search(&joined);
        self.search(data);
        // Keep the last HASH_PART_LEN - 1 bytes of everything seen so far.
        let keep = HASH_PART_LEN - 1;
        if data.len() >= keep {
            joined.clear();
            joined.extend_from_slice(&data[data.len() - keep..]);
        } else {
            joined.truncate(joined.len() - head);
            joined.extend_from_slice(data);
            let excess = joined.len().saturating_sub(keep);
            joined.drain(..excess);
        }
        self.tail = joined;
    }

    /// Marks the boundary between two files: a hash cannot span it.
    pub fn reset_boundary(&mut self) {
        self.tail.clear();
    }

    /// The hash parts found so far.
    pub fn found(&self) -> impl Iterator<Item = &str> {
        self.found.iter().map(|h| std::str::from_utf8(h).expect("nixbase32 is ASCII"))
    }
}

/// Nix's `HashModuloSink`: the hash a content-addressed path that refers to itself is named
/// by. Its contents name its own path, which depends on that hash; so the hash is taken with
/// every occurrence of the path's hash part (`modulus`) replaced by as many zero bytes, then
/// `|POS` (decimal) hashed for each occurrence's offset, so that contents with some of those
/// bytes already zero do not collide. Without an occurrence the hash is the plain one.
pub struct HashModulo {
    hasher: crate::Hasher,
    modulus: Vec<u8>,
    /// Bytes not hashed yet: fewer than `modulus` at rest, so an occurrence split between two
    /// writes is still found.
    pending: Vec<u8>,
    /// Bytes hashed so far.
    pos: u64,
    matches: Vec<u64>,
}

impl HashModulo {
    pub fn new(algo: crate::HashAlgo, modulus: &str) -> HashModulo {
        HashModulo {
            hasher: crate::Hasher::new(algo),
            modulus: modulus.as_bytes().to_vec(),
            pending: Vec::new(),
            pos: 0,
            matches: Vec::new(),
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        let n = self.modulus.len();
        self.pending.extend_from_slice(data);
        if n == 0 {
            self.hasher.update(&self.pending);
            self.pos += self.pending.len() as u64;
            self.pending.clear();
            return;
        }
        let mut j = 0;
        while j + n <= self.pending.len() {
            if self.pending[j..j + n] == self.modulus[..] {
                self.matches.push(self.pos + j as u64);
                self.pending[j..j + n].fill(0);
                j += n;
            } else {
                j += 1;
            }
        }
        // Keep what could still begin an occurrence.
        let keep = (n - 1).min(self.pending.len());
        let done = self.pending.len() - keep;
        self.hasher.update(&self.pending[..done]);
        self.pos += done as u64;
        self.pending.drain(..done);
    }

    /// The hash, and the number of bytes added.
    pub fn finish(mut self) -> (crate::Hash, u64) {
        self.hasher.update(&self.pending);
        self.pos += self.pending.len() as u64;
        for m in &self.matches {
            self.hasher.update(format!("|{m}").as_bytes());
        }
        (self.hasher.finish(), self.pos)
    }
}

impl std::io::Write for HashModulo {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: &str = "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0";
    const B: &str = "5xd714cbfnkz02h2vbsj4fm03x3f15nf";

    fn found(s: &ReferenceScanner) -> Vec<String> {
        let mut v: Vec<_> = s.found().map(str::to_owned).collect();
        v.sort();
        v
    }

    #[test]
    fn finds_hashes_in_one_chunk() {
        let mut s = ReferenceScanner::new([A, B]);
        s.update(format!("#!/bin/sh\nexec /store/{A}-foo/bin/x").as_bytes());
        assert_eq!(found(&s), vec![A.to_owned()]);
    }

    #[test]
    fn finds_a_hash_split_at_every_position() {
        let text = format!("xx/{B}-bar yy");
        for cut in 0..text.len() {
            let mut s = ReferenceScanner::new([A, B]);
            s.update(&text.as_bytes()[..cut]);
            s.update(&text.as_bytes()[cut..]);
            assert_eq!(found(&s), vec![B.to_owned()], "cut at {cut}");
        }
    }

    #[test]
    fn finds_a_hash_fed_byte_by_byte() {
        let text = format!("{A}{B}");
        let mut s = ReferenceScanner::new([A, B]);
        for b in text.as_bytes() {
            s.update(std::slice::from_ref(b));
        }
        assert_eq!(found(&s).len(), 2);
    }

    #[test]
    fn no_false_positives() {
        let mut s = ReferenceScanner::new([A]);
        s.update(&A.as_bytes()[..31]);
        s.reset_boundary();
        s.update(&A.as_bytes()[31..]);
        assert!(found(&s).is_empty());
    }

    proptest! {
        #[test]
        fn chunking_does_not_matter(prefix in "[a-z0-9/ -]{0,50}", suffix in "[a-z0-9 ]{0,50}", cuts in prop::collection::vec(0usize..200, 0..6)) {
            let text = format!("{prefix}{A}{suffix}");
            let mut whole = ReferenceScanner::new([A, B]);
            whole.update(text.as_bytes());
            let mut parts = ReferenceScanner::new([A, B]);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.sort();
            let mut last = 0;
            for c in cuts.into_iter().chain([text.len()]) {
                parts.update(&text.as_bytes()[last..c]);
                last = c;
            }
            prop_assert_eq!(found(&whole), found(&parts));
            prop_assert!(found(&whole).contains(&A.to_owned()));
        }
    }

    /// The definition: every occurrence replaced (left to right, not overlapping), positions
    /// appended.
    fn modulo_by_definition(data: &[u8], modulus: &[u8]) -> crate::Hash {
        let mut d = data.to_vec();
        let mut positions = Vec::new();
        let mut j = 0;
        while j + modulus.len() <= d.len() {
            if &d[j..j + modulus.len()] == modulus {
                positions.push(j);
                d[j..j + modulus.len()].fill(0);
                j += modulus.len();
            } else {
                j += 1;
            }
        }
        for p in positions {
            d.extend_from_slice(format!("|{p}").as_bytes());
        }
        crate::Hash::digest(crate::HashAlgo::Sha256, &d)
    }

    #[test]
    fn hash_modulo_without_an_occurrence_is_the_plain_hash() {
        let mut h = HashModulo::new(crate::HashAlgo::Sha256, A);
        h.update(b"nothing of itself here");
        assert_eq!(h.finish().0, crate::Hash::digest(crate::HashAlgo::Sha256, b"nothing of itself here"));
    }

    proptest::proptest! {
        #[test]
        fn hash_modulo_is_its_definition_however_the_bytes_are_split(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
                    proptest::strategy::Just(A.as_bytes().to_vec()),
                    proptest::strategy::Just(A.as_bytes()[..20].to_vec()),
                    proptest::strategy::Just(A.as_bytes()[20..].to_vec()),
                ],
                0..12,
            ),
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let data: Vec<u8> = parts.concat();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort();
            let mut h = HashModulo::new(crate::HashAlgo::Sha256, A);
            let mut at = 0;
            for c in cuts.into_iter().chain([data.len()]) {
                h.update(&data[at..c]);
                at = c;
            }
            let (hash, size) = h.finish();
            proptest::prop_assert_eq!(size, data.len() as u64);
            proptest::prop_assert_eq!(hash, modulo_by_definition(&data, A.as_bytes()));
        }
    }
}
