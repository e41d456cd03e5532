//! Store paths: their names, their parsing, and how Nix computes them.
//!
//! A store path is `<store dir>/<hash>-<name>`, where `<hash>` is 20 bytes printed in nixbase32
//! (32 characters). The 20 bytes are a SHA-256 of a *fingerprint* string, XOR-folded to 160 bits:
//!
//! ```text
//! <type>:sha256:<inner hash, base16>:<store dir>:<name>
//! ```
//!
//! `<type>` says what the inner hash is of: `text:<refs…>` (a text file, `builtins.toFile`),
//! `source:<refs…>[:self]` (a NAR, `nix-store --add`), or `output:<id>` (a derivation output or a
//! non-recursive fixed-output path). Because the store directory is part of the fingerprint, the
//! same contents get different paths under `/store` and `/nix/store`; `StoreDir` carries it.

use std::collections::BTreeSet;
use std::fmt;

use thiserror::Error;

use crate::content_address::{ContentAddress, FileIngestionMethod};
use crate::hash::{Encoding, Hash, HashAlgo};
use crate::nixbase32;

/// Bytes of the digest in a store path.
pub const DIGEST_LEN: usize = 20;
/// Characters of the nixbase32 digest in a store path.
pub const HASH_PART_LEN: usize = 32;

/// Whether `s` is a store path's hash part: [`HASH_PART_LEN`] characters of Nix's base-32
/// alphabet (what a `<hash>.narinfo` key names).
pub fn is_hash_part(s: &str) -> bool {
    s.len() == HASH_PART_LEN && s.bytes().all(|b| crate::nixbase32::ALPHABET.contains(&b))
}
/// Longest name Nix accepts (so that the base name fits in 255 bytes with room to spare).
pub const MAX_NAME_LEN: usize = 211;

/// Why a store path or name was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("store path '{0}' is not in the store directory '{1}'")]
    NotInStore(String, String),
    #[error("store path '{0}' is too short or has no '-' after its hash")]
    Malformed(String),
    #[error("store path '{path}' has an invalid hash part")]
    BadHash { path: String },
    #[error("store path name '{0}' is empty")]
    EmptyName(String),
    #[error("store path name '{0}' is longer than {MAX_NAME_LEN} characters")]
    NameTooLong(String),
    #[error("store path name '{name}' contains the illegal character {c:?}")]
    IllegalChar { name: String, c: char },
    #[error("store path name '{0}' is not allowed")]
    ReservedName(String),
    #[error("store directory '{0}' must be an absolute path without a trailing '/'")]
    BadStoreDir(String),
}

/// Why a content address does not account for the path that carries it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ContentAddressClaimError {
    #[error("a text content address cannot refer to its own path")]
    TextSelfReference,
    #[error("content address '{ca}' allows no references, yet references are listed")]
    References { ca: String },
    #[error("content address '{ca}' yields '{computed}', not this path")]
    OtherPath { ca: String, computed: String },
    #[error(transparent)]
    StorePath(#[from] StorePathError),
}

type Result<T> = std::result::Result<T, StorePathError>;

/// Checks a store path name the way Nix 2.8 does, and also refuses `.` and `..`.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName(name.to_owned()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong(name.to_owned()));
    }
    if name == "." || name == ".." {
        return Err(StorePathError::ReservedName(name.to_owned()));
    }
    if let Some(c) = name.chars().find(|&c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c))) {
        return Err(StorePathError::IllegalChar { name: name.to_owned(), c });
    }
    Ok(())
}

/// A store path without its store directory: a hash part and a validated name.
///
/// The hash part is kept as its 32 nixbase32 characters, so that the derived ordering is the
/// ordering of base names — the order Nix sorts paths in (in export streams, listings, sets).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    hash: [u8; HASH_PART_LEN],
    name: String,
}

impl StorePath {
    /// Builds a store path from its parts, validating the name.
    pub fn new(digest: [u8; DIGEST_LEN], name: &str) -> Result<StorePath> {
        validate_name(name)?;
        let hash = nixbase32::encode(&digest).into_bytes().try_into().expect("20 bytes encode to 32 characters");
        Ok(StorePath { hash, name: name.to_owned() })
    }

    /// Parses a base name `<hash>-<name>`.
    pub fn from_base_name(base: &str) -> Result<StorePath> {
        if base.len() < HASH_PART_LEN + 2 || base.as_bytes()[HASH_PART_LEN] != b'-' {
            return Err(StorePathError::Malformed(base.to_owned()));
        }
        let hash: [u8; HASH_PART_LEN] = base.as_bytes()[..HASH_PART_LEN].try_into().expect("length checked");
        if nixbase32::decode(&hash).is_err() {
            return Err(StorePathError::BadHash { path: base.to_owned() });
        }
        let name = &base[HASH_PART_LEN + 1..];
        validate_name(name)?;
        Ok(StorePath { hash, name: name.to_owned() })
    }

    /// The 20-byte digest.
    pub fn digest(&self) -> [u8; DIGEST_LEN] {
        nixbase32::decode(&self.hash)
            .expect("validated on construction")
            .try_into()
            .expect("32 characters decode to 20 bytes")
    }

    /// The 32-character nixbase32 hash part.
    pub fn hash_part(&self) -> &str {
        std::str::from_utf8(&self.hash).expect("nixbase32 is ASCII")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash_part(), self.name)
    }
}

impl fmt::Display for StorePath {
    /// Prints the base name; use [`StoreDir::display`] for the absolute path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.hash_part(), self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

/// The logical store directory (`/store`, `/nix/store`): part of every path's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreDir(String);

impl Default for StoreDir {
    fn default() -> Self {
        StoreDir("/store".to_owned())
    }
}

impl StoreDir {
    pub fn new(dir: &str) -> Result<StoreDir> {
        if !dir.starts_with('/') || (dir.len() > 1 && dir.ends_with('/')) || dir.contains("//") || dir.len() < 2 {
            return Err(StorePathError::BadStoreDir(dir.to_owned()));
        }
        Ok(StoreDir(dir.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The absolute path of `path`.
    pub fn display(&self, path: &StorePath) -> String {
        // Built by hand, sized once: closures print 100k of these per query.
        let mut s = String::with_capacity(self.0.len() + 2 + HASH_PART_LEN + path.name.len());
        s.push_str(&self.0);
        s.push('/');
        s.push_str(path.hash_part());
        s.push('-');
        s.push_str(&path.name);
        s
    }

    /// Parses an absolute store path, which must lie directly in this store directory.
    pub fn parse(&self, s: &str) -> Result<StorePath> {
        let base = s
            .strip_prefix(self.0.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(s.to_owned(), self.0.clone()))?;
        if base.contains('/') {
            return Err(StorePathError::Malformed(s.to_owned()));
        }
        StorePath::from_base_name(base)
    }

    /// Splits a path that lies inside a store path into the store path and the rest
    /// (`/store/abc-x/bin/sh` → (`abc-x`, `bin/sh`)).
    pub fn parse_inner<'a>(&self, s: &'a str) -> Result<(StorePath, &'a str)> {
        let rest = s
            .strip_prefix(self.0.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(s.to_owned(), self.0.clone()))?;
        let (base, inner) = rest.split_once('/').unwrap_or((rest, ""));
        Ok((StorePath::from_base_name(base)?, inner.trim_end_matches('/')))
    }

    /// The generic computation: SHA-256 of the fingerprint, folded to 20 bytes.
    pub fn make_store_path(&self, path_type: &str, inner: &Hash, name: &str) -> Result<StorePath> {
        validate_name(name)?;
        let fingerprint =
            format!("{}:{}:{}:{}:{}", path_type, inner.algo(), inner.encode(Encoding::Base16), self.0, name);
        let full = Hash::digest(HashAlgo::Sha256, fingerprint.as_bytes());
        StorePath::new(compress_hash(full.as_bytes()), name)
    }

    fn type_with_refs(&self, prefix: &str, refs: &BTreeSet<StorePath>, has_self: bool) -> String {
        let mut t = prefix.to_owned();
        for r in refs {
            t.push(':');
            t.push_str(&self.display(r));
        }
        if has_self {
            t.push_str(":self");
        }
        t
    }

    /// A text path (`builtins.toFile`, `.drv` files): `contents_hash` is the SHA-256 of the file.
    pub fn make_text_path(&self, name: &str, contents_hash: &Hash, refs: &BTreeSet<StorePath>) -> Result<StorePath> {
        self.make_store_path(&self.type_with_refs("text", refs, false), contents_hash, name)
    }

    /// A fixed-output path (`nix-store --add`, `--add-fixed`, fixed-output derivations).
    /// Recursive SHA-256 paths are `source` paths and may have references; all others are
    /// `output:out` paths of a `fixed:out:` fingerprint and have none.
    pub fn make_fixed_output_path(
        &self,
        name: &str,
        method: FileIngestionMethod,
        hash: &Hash,
        refs: &BTreeSet<StorePath>,
        has_self_ref: bool,
    ) -> Result<StorePath> {
        if method == FileIngestionMethod::Recursive && hash.algo() == HashAlgo::Sha256 {
            self.make_store_path(&self.type_with_refs("source", refs, has_self_ref), hash, name)
        } else {
            let inner = format!(
                "fixed:out:{}{}:",
                if method == FileIngestionMethod::Recursive { "r:" } else { "" },
                hash.to_prefixed(Encoding::Base16)
            );
            self.make_store_path("output:out", &Hash::digest(HashAlgo::Sha256, inner.as_bytes()), name)
        }
    }

    /// The path of a content-addressed object, from its content address.
    pub fn make_content_addressed_path(
        &self,
        name: &str,
        ca: &ContentAddress,
        refs: &BTreeSet<StorePath>,
        has_self_ref: bool,
    ) -> Result<StorePath> {
        match ca {
            ContentAddress::Text(hash) => self.make_text_path(name, hash, refs),
            ContentAddress::Fixed { method, hash } => {
                self.make_fixed_output_path(name, *method, hash, refs, has_self_ref)
            }
        }
    }

    /// Checks that a path's content address, with its references, yields the path itself:
    /// what lets a content-addressed path in without a signature. Refuses references the
    /// method cannot have — a text path never refers to itself, and a fixed-output path that is
    /// not recursive SHA-256 refers to nothing — since they would be recorded without being part
    /// of the path's hash.
    pub fn check_content_address(
        &self,
        path: &StorePath,
        ca: &ContentAddress,
        references: &BTreeSet<StorePath>,
    ) -> std::result::Result<(), ContentAddressClaimError> {
        let self_ref = references.contains(path);
        let others: BTreeSet<StorePath> = references.iter().filter(|r| *r != path).cloned().collect();
        match ca {
            ContentAddress::Text(_) if self_ref => return Err(ContentAddressClaimError::TextSelfReference),
            ContentAddress::Fixed { method, hash }
                if (*method != FileIngestionMethod::Recursive || hash.algo() != HashAlgo::Sha256)
                    && !references.is_empty() =>
            {
                return Err(ContentAddressClaimError::References { ca: ca.to_string() })
            }
            _ => {}
        }
        let computed = self.make_content_addressed_path(path.name(), ca, &others, self_ref)?;
        if &computed != path {
            return Err(ContentAddressClaimError::OtherPath { ca: ca.to_string(), computed: self.display(&computed) });
        }
        Ok(())
    }

    /// The path of output `output` of a derivation whose `hashDerivationModulo` is `drv_hash`.
    pub fn make_output_path(&self, output: &str, drv_hash: &Hash, drv_name: &str) -> Result<StorePath> {
        let name = if output == "out" { drv_name.to_owned() } else { format!("{drv_name}-{output}") };
        self.make_store_path(&format!("output:{output}"), drv_hash, &name)
    }
}

/// `paths` ordered so that each comes after those among them it refers to: a depth-first walk
/// in the order given, each path placed after its references (visited in their set's order).
/// This is the order of Nix's `topoSortPaths`, reversed — what `nix-store --export` writes and a
/// receiver that checks each path's references as it arrives needs. `references(p)` gives a
/// member's references, `None` for a path outside the set. Iterative, so a long chain cannot
/// exhaust the stack.
pub fn references_first<'a>(
    paths: impl IntoIterator<Item = &'a StorePath>,
    references: impl Fn(&StorePath) -> Option<&'a BTreeSet<StorePath>>,
) -> Vec<StorePath> {
    let mut seen: std::collections::HashSet<&StorePath> = std::collections::HashSet::new();
    let mut order = Vec::new();
    for start in paths {
        let Some(refs) = references(start) else { continue };
        if !seen.insert(start) {
            continue;
        }
        let mut stack = vec![(start, refs.iter())];
        while let Some(top) = stack.last_mut() {
            let p = top.0;
            let next = top.1.find(|r| *r != p && !seen.contains(r) && references(r).is_some());
            match next.and_then(|r| references(r).map(|rr| (r, rr))) {
                Some((r, rr)) => {
                    seen.insert(r);
                    stack.push((r, rr.iter()));
                }
                None => {
                    order.push(p.clone());
                    stack.pop();
                }
            }
        }
    }
    order
}

/// XOR-folds a digest to [`DIGEST_LEN`] bytes, as Nix's `compressHash`.
pub fn compress_hash(hash: &[u8]) -> [u8; DIGEST_LEN] {
    let mut out = [0u8; DIGEST_LEN];
    for (i, b) in hash.iter().enumerate() {
        out[i % DIGEST_LEN] ^= b;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn references_come_first_in_nix_s_export_order_even_along_a_long_chain() {
        let p = |n: u8, name: &str| StorePath::new([n; 20], name).unwrap();
        let (a, b, c, d, x) = (p(1, "a"), p(2, "b"), p(3, "c"), p(4, "d"), p(9, "x"));
        // a → c and x (outside), b → a and itself, d alone.
        let refs: std::collections::BTreeMap<StorePath, BTreeSet<StorePath>> = [
            (a.clone(), [c.clone(), x].into()),
            (b.clone(), [a.clone(), b.clone()].into()),
            (c.clone(), BTreeSet::new()),
            (d.clone(), BTreeSet::new()),
        ]
        .into();
        assert_eq!(references_first(refs.keys(), |q| refs.get(q)), vec![c, a, b, d]);
        // 200 000 links, each referring to the one before: no recursion to overflow.
        let links: Vec<StorePath> = (0..200_000u32)
            .map(|i| {
                let mut digest = [0u8; 20];
                digest[..4].copy_from_slice(&i.to_be_bytes());
                StorePath::new(digest, "link").unwrap()
            })
            .collect();
        let chain: std::collections::HashMap<StorePath, BTreeSet<StorePath>> = links
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), if i == 0 { BTreeSet::new() } else { [links[i - 1].clone()].into() }))
            .collect();
        let order = references_first(links.iter().rev(), |q| chain.get(q));
        assert_eq!(order, links);
    }

    fn nix_store() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    #[test]
    fn text_path_vector() {
        // `builtins.toFile "foo" "bar"` in Nix.
        let p = nix_store().make_text_path("foo", &Hash::digest(HashAlgo::Sha256, b"bar"), &BTreeSet::new()).unwrap();
        assert_eq!(nix_store().display(&p), "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo");
    }

    #[test]
    fn text_path_with_reference_vector() {
        // `nix-instantiate --eval -E 'builtins.toFile "baz" "${builtins.toFile "foo" "bar"}"'`, Nix 2.8.
        let foo = nix_store().parse("/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo").unwrap();
        let refs = BTreeSet::from([foo]);
        let contents = b"/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo";
        let p = nix_store().make_text_path("baz", &Hash::digest(HashAlgo::Sha256, contents), &refs).unwrap();
        assert_eq!(nix_store().display(&p), "/nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz");
    }

    #[test]
    fn a_content_address_is_checked_against_its_path_and_references() {
        let dir = nix_store();
        let foo = dir.parse("/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo").unwrap();
        let text = ContentAddress::Text(Hash::digest(HashAlgo::Sha256, b"bar"));
        dir.check_content_address(&foo, &text, &BTreeSet::new()).unwrap();
        // Nix's own vector with a reference: the reference is part of the hash.
        let baz = dir.parse("/nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz").unwrap();
        let baz_ca = ContentAddress::Text(Hash::digest(HashAlgo::Sha256, dir.display(&foo).as_bytes()));
        dir.check_content_address(&baz, &baz_ca, &BTreeSet::from([foo.clone()])).unwrap();
        let e = dir.check_content_address(&baz, &baz_ca, &BTreeSet::new()).unwrap_err();
        assert!(matches!(e, ContentAddressClaimError::OtherPath { .. }), "{e}");
        // Other contents: another path.
        let other = ContentAddress::Text(Hash::digest(HashAlgo::Sha256, b"planted"));
        assert!(dir.check_content_address(&foo, &other, &BTreeSet::new()).is_err());
        // A text path referring to itself cannot exist.
        let e = dir.check_content_address(&foo, &text, &BTreeSet::from([foo.clone()])).unwrap_err();
        assert_eq!(e, ContentAddressClaimError::TextSelfReference);
        // A flat fixed-output path with a reference: refused, even though the path would match
        // (flat paths ignore references when computed).
        let flat_hash = Hash::digest(HashAlgo::Sha256, b"hello\n");
        let flat = ContentAddress::Fixed { method: FileIngestionMethod::Flat, hash: flat_hash.clone() };
        let p = dir
            .make_fixed_output_path("hello", FileIngestionMethod::Flat, &flat_hash, &BTreeSet::new(), false)
            .unwrap();
        dir.check_content_address(&p, &flat, &BTreeSet::new()).unwrap();
        let e = dir.check_content_address(&p, &flat, &BTreeSet::from([foo.clone()])).unwrap_err();
        assert!(matches!(e, ContentAddressClaimError::References { .. }), "{e}");
        // Recursive SHA-256 (`source`) paths may refer to others and to themselves.
        let nar_hash = Hash::digest(HashAlgo::Sha256, b"a nar");
        let source = ContentAddress::Fixed { method: FileIngestionMethod::Recursive, hash: nar_hash.clone() };
        let refs = BTreeSet::from([foo.clone()]);
        let p = dir.make_fixed_output_path("src", FileIngestionMethod::Recursive, &nar_hash, &refs, true).unwrap();
        let mut with_self = refs.clone();
        with_self.insert(p.clone());
        dir.check_content_address(&p, &source, &with_self).unwrap();
        assert!(dir.check_content_address(&p, &source, &refs).is_err(), "the self-reference is part of the hash");
    }

    #[test]
    fn fixed_output_vectors() {
        // `printf 'hello\n' > hello; nix-store --add-fixed sha256 hello` with Nix 2.8.
        let h = Hash::digest(HashAlgo::Sha256, b"hello\n");
        let p = nix_store()
            .make_fixed_output_path("hello", FileIngestionMethod::Flat, &h, &BTreeSet::new(), false)
            .unwrap();
        assert_eq!(p.base_name(), "8zv8i345w2xn27jrxj4cyjc6x3b4am1q-hello");
    }

    #[test]
    fn source_path_vector() {
        // `mkdir -p srcx/d; echo a > srcx/d/f; nix-store --add srcx` with Nix 2.8; the NAR hash
        // is that of `nix-store --dump srcx`.
        let nar_hash =
            Hash::parse_with_algo("ee7dcabe457938218e46c7d01319f952cc52776a3c224c8061527745db0e1d43", HashAlgo::Sha256)
                .unwrap();
        let p = nix_store()
            .make_fixed_output_path("srcx", FileIngestionMethod::Recursive, &nar_hash, &BTreeSet::new(), false)
            .unwrap();
        assert_eq!(p.base_name(), "fmdjhp489wgbbl1j46l4mykv9ndsbr4c-srcx");
    }

    #[test]
    fn parse_and_print() {
        let s = "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo";
        let p = nix_store().parse(s).unwrap();
        assert_eq!(p.name(), "foo");
        assert_eq!(nix_store().display(&p), s);
        let (p2, rest) = nix_store().parse_inner("/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo/bin/sh").unwrap();
        assert_eq!((p2, rest), (p, "bin/sh"));
        assert!(matches!(StoreDir::default().parse(s), Err(StorePathError::NotInStore(..))));
        assert!(nix_store().parse("/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-fo o").is_err());
        assert!(nix_store().parse("/nix/store/exjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo").is_err());
        assert!(nix_store().parse("/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-").is_err());
        assert!(nix_store().parse("/nix/store/short-foo").is_err());
        assert!(nix_store().parse("/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo/x").is_err());
    }

    #[test]
    fn names() {
        assert!(validate_name("hello-2.12.1").is_ok());
        assert!(validate_name("a+b=c?_.").is_ok());
        assert!(validate_name(&"x".repeat(211)).is_ok());
        assert!(matches!(validate_name(&"x".repeat(212)), Err(StorePathError::NameTooLong(_))));
        assert!(matches!(validate_name(""), Err(StorePathError::EmptyName(_))));
        assert!(matches!(validate_name(".."), Err(StorePathError::ReservedName(_))));
        assert!(matches!(validate_name("a/b"), Err(StorePathError::IllegalChar { c: '/', .. })));
        assert!(matches!(validate_name("é"), Err(StorePathError::IllegalChar { .. })));
    }

    #[test]
    fn store_dirs() {
        assert!(StoreDir::new("/store").is_ok());
        for bad in ["store", "/store/", "/", "", "//store"] {
            assert!(StoreDir::new(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn base_name_round_trips(digest in any::<[u8; 20]>(), name in "[a-zA-Z0-9+._?=-]{1,40}") {
            prop_assume!(name != "." && name != "..");
            let p = StorePath::new(digest, &name).unwrap();
            prop_assert_eq!(StorePath::from_base_name(&p.base_name()).unwrap(), p);
        }

        #[test]
        fn every_computed_content_address_checks_out(
            contents in proptest::collection::vec(any::<u8>(), 0..64),
            name in "[a-z0-9]{1,12}",
            kind in 0u8..4,
        ) {
            let dir = nix_store();
            let (algo, method) = match kind {
                0 => (HashAlgo::Sha256, None),
                1 => (HashAlgo::Sha256, Some(FileIngestionMethod::Flat)),
                2 => (HashAlgo::Sha256, Some(FileIngestionMethod::Recursive)),
                _ => (HashAlgo::Sha1, Some(FileIngestionMethod::Recursive)),
            };
            let hash = Hash::digest(algo, &contents);
            let ca = match method {
                None => ContentAddress::Text(hash),
                Some(method) => ContentAddress::Fixed { method, hash },
            };
            let p = dir.make_content_addressed_path(&name, &ca, &BTreeSet::new(), false).unwrap();
            prop_assert!(dir.check_content_address(&p, &ca, &BTreeSet::new()).is_ok());
            let mut other = contents.clone();
            other.push(0);
            let forged = match &ca {
                ContentAddress::Text(_) => ContentAddress::Text(Hash::digest(algo, &other)),
                ContentAddress::Fixed { method, .. } => ContentAddress::Fixed { method: *method, hash: Hash::digest(algo, &other) },
            };
            prop_assert!(dir.check_content_address(&p, &forged, &BTreeSet::new()).is_err());
        }

        #[test]
        fn parse_never_panics(s in "/store/.{0,80}") {
            let _ = StoreDir::default().parse(&s);
        }
    }
}
