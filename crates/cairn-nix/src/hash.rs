//! Hashes as Nix prints and parses them.
//!
//! Nix writes a hash in four encodings — base16, nixbase32, base64 and SRI (`sha256-<base64>`) —
//! usually prefixed with its algorithm (`sha256:…`). Parsing accepts all of them and tells the
//! encodings apart by length, exactly as Nix's `Hash::parseAnyPrefixed` does, so a user can paste
//! whatever `nix hash`, `nix path-info` or a `.narinfo` printed.

use std::fmt;
use std::str::FromStr;

use data_encoding::{BASE64, HEXLOWER_PERMISSIVE};
use sha2::Digest;
use thiserror::Error;

use crate::nixbase32;

/// A hash algorithm Nix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    /// Digest length in bytes.
    pub const fn digest_len(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    /// The name Nix uses (`sha256`).
    pub const fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        match s {
            "md5" => Ok(HashAlgo::Md5),
            "sha1" => Ok(HashAlgo::Sha1),
            "sha256" => Ok(HashAlgo::Sha256),
            "sha512" => Ok(HashAlgo::Sha512),
            other => Err(HashError::UnknownAlgo(other.to_owned())),
        }
    }
}

/// Why a hash string did not parse.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    #[error("unknown hash algorithm '{0}'")]
    UnknownAlgo(String),
    #[error("hash '{0}' names no algorithm")]
    MissingAlgo(String),
    #[error("hash '{hash}' has the wrong length for {algo}")]
    BadLength { hash: String, algo: HashAlgo },
    #[error("hash '{0}' is not valid base16, nixbase32 or base64")]
    BadEncoding(String),
    #[error("expected a {expected} hash, got {got}")]
    WrongAlgo { expected: HashAlgo, got: HashAlgo },
}

/// The encodings Nix prints a hash in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Base16,
    Nix32,
    Base64,
    Sri,
}

/// A digest with its algorithm.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    algo: HashAlgo,
    digest: [u8; 64],
}

impl Hash {
    /// Wraps a digest; `digest` must be `algo.digest_len()` bytes.
    pub fn new(algo: HashAlgo, digest: &[u8]) -> Result<Hash, HashError> {
        if digest.len() != algo.digest_len() {
            return Err(HashError::BadLength { hash: BASE64.encode(digest), algo });
        }
        let mut d = [0u8; 64];
        d[..digest.len()].copy_from_slice(digest);
        Ok(Hash { algo, digest: d })
    }

    /// A SHA-256 hash from its 32 bytes.
    pub fn sha256(digest: [u8; 32]) -> Hash {
        let mut d = [0u8; 64];
        d[..32].copy_from_slice(&digest);
        Hash { algo: HashAlgo::Sha256, digest: d }
    }

    /// Hashes `data` in one go.
    pub fn digest(algo: HashAlgo, data: &[u8]) -> Hash {
        let mut h = Hasher::new(algo);
        h.update(data);
        h.finish()
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.digest[..self.algo.digest_len()]
    }

    /// Prints the digest alone in `enc` (SRI carries its algorithm anyway).
    pub fn encode(&self, enc: Encoding) -> String {
        match enc {
            Encoding::Base16 => data_encoding::HEXLOWER.encode(self.as_bytes()),
            Encoding::Nix32 => nixbase32::encode(self.as_bytes()),
            Encoding::Base64 => BASE64.encode(self.as_bytes()),
            Encoding::Sri => self.to_sri(),
        }
    }

    /// `algo:digest` with the digest in `enc` (SRI is printed as is).
    pub fn to_prefixed(&self, enc: Encoding) -> String {
        match enc {
            Encoding::Sri => self.to_sri(),
            _ => format!("{}:{}", self.algo, self.encode(enc)),
        }
    }

    /// `sha256-<base64>`, the Subresource Integrity form.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, BASE64.encode(self.as_bytes()))
    }

    /// Parses `algo:digest` or `algo-base64` (SRI).
    pub fn parse_prefixed(s: &str) -> Result<Hash, HashError> {
        if let Some((algo, rest)) = s.split_once(':') {
            return Hash::parse_digest(algo.parse()?, rest, s);
        }
        if let Some((algo, rest)) = s.split_once('-') {
            let algo: HashAlgo = algo.parse()?;
            return Hash::parse_base64(algo, rest, s);
        }
        Err(HashError::MissingAlgo(s.to_owned()))
    }

    /// Parses a hash that may or may not carry its algorithm; without one it must be `algo`.
    pub fn parse_with_algo(s: &str, algo: HashAlgo) -> Result<Hash, HashError> {
        let h =
            if s.contains(':') || s.contains('-') { Hash::parse_prefixed(s)? } else { Hash::parse_digest(algo, s, s)? };
        if h.algo != algo {
            return Err(HashError::WrongAlgo { expected: algo, got: h.algo });
        }
        Ok(h)
    }

    fn parse_base64(algo: HashAlgo, digest: &str, whole: &str) -> Result<Hash, HashError> {
        let bytes = BASE64.decode(digest.as_bytes()).map_err(|_| HashError::BadEncoding(whole.to_owned()))?;
        if bytes.len() != algo.digest_len() {
            return Err(HashError::BadLength { hash: whole.to_owned(), algo });
        }
        Hash::new(algo, &bytes)
    }

    /// Parses a bare digest, telling base16, nixbase32 and base64 apart by length.
    fn parse_digest(algo: HashAlgo, digest: &str, whole: &str) -> Result<Hash, HashError> {
        let n = algo.digest_len();
        let bytes = if digest.len() == 2 * n {
            HEXLOWER_PERMISSIVE.decode(digest.as_bytes()).map_err(|_| HashError::BadEncoding(whole.to_owned()))?
        } else if digest.len() == nixbase32::encoded_len(n) {
            nixbase32::decode(digest.as_bytes()).map_err(|_| HashError::BadEncoding(whole.to_owned()))?
        } else if digest.len() == BASE64.encode_len(n) {
            return Hash::parse_base64(algo, digest, whole);
        } else {
            return Err(HashError::BadLength { hash: whole.to_owned(), algo });
        };
        Hash::new(algo, &bytes)
    }
}

impl fmt::Display for Hash {
    /// `algo:nixbase32`, the form Nix uses in its database and in `.narinfo` files.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_prefixed(Encoding::Nix32))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_prefixed(Encoding::Base16))
    }
}

impl FromStr for Hash {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Hash, HashError> {
        Hash::parse_prefixed(s)
    }
}

/// An incremental hasher for any [`HashAlgo`]. SHA-256 uses the CPU's SHA extensions when
/// present (the `sha2` crate detects them at run time).
#[derive(Clone)]
pub enum Hasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algo: HashAlgo) -> Hasher {
        match algo {
            HashAlgo::Md5 => Hasher::Md5(md5::Md5::new()),
            HashAlgo::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            HashAlgo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            HashAlgo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Hash {
        match self {
            Hasher::Md5(h) => Hash::new(HashAlgo::Md5, &h.finalize()),
            Hasher::Sha1(h) => Hash::new(HashAlgo::Sha1, &h.finalize()),
            Hasher::Sha256(h) => Hash::new(HashAlgo::Sha256, &h.finalize()),
            Hasher::Sha512(h) => Hash::new(HashAlgo::Sha512, &h.finalize()),
        }
        .expect("digest length matches its algorithm")
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    count: u64,
}

impl<W> HashingWriter<W> {
    pub fn new(inner: W, algo: HashAlgo) -> Self {
        HashingWriter { inner, hasher: Hasher::new(algo), count: 0 }
    }
    /// The hash and byte count of everything written, and the inner writer.
    pub fn finish(self) -> (Hash, u64, W) {
        (self.hasher.finish(), self.count, self.inner)
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    count: u64,
}

impl<R> HashingReader<R> {
    pub fn new(inner: R, algo: HashAlgo) -> Self {
        HashingReader { inner, hasher: Hasher::new(algo), count: 0 }
    }
    /// The hash and byte count of everything read, and the inner reader.
    pub fn finish(self) -> (Hash, u64, R) {
        (self.hasher.finish(), self.count, self.inner)
    }
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ABC_HEX: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn encodings_of_sha256_abc() {
        let h = Hash::digest(HashAlgo::Sha256, b"abc");
        assert_eq!(h.encode(Encoding::Base16), ABC_HEX);
        // `nix hash to-base32 sha256:ba78…` and `nix hash to-sri`.
        assert_eq!(h.to_string(), "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s");
        assert_eq!(h.to_sri(), "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=");
        for s in [
            format!("sha256:{ABC_HEX}"),
            "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".to_owned(),
            "sha256:ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=".to_owned(),
            "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=".to_owned(),
        ] {
            assert_eq!(s.parse::<Hash>().unwrap(), h, "{s}");
        }
        assert_eq!(Hash::parse_with_algo(ABC_HEX, HashAlgo::Sha256).unwrap(), h);
    }

    #[test]
    fn other_algorithms() {
        assert_eq!(Hash::digest(HashAlgo::Md5, b"abc").encode(Encoding::Base16), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            Hash::digest(HashAlgo::Sha1, b"abc").encode(Encoding::Base16),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert!(Hash::digest(HashAlgo::Sha512, b"abc").encode(Encoding::Base16).starts_with("ddaf35a193617aba"));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!("sha256:abc".parse::<Hash>(), Err(HashError::BadLength { .. })));
        assert!(matches!("blake9:abc".parse::<Hash>(), Err(HashError::UnknownAlgo(_))));
        assert!(matches!("nothing".parse::<Hash>(), Err(HashError::MissingAlgo(_))));
        assert!(matches!(
            Hash::parse_with_algo(&format!("sha1:{}", "0".repeat(40)), HashAlgo::Sha256),
            Err(HashError::WrongAlgo { .. })
        ));
        let bad_nix32 = format!("sha256:{}", "e".repeat(52));
        assert!(matches!(bad_nix32.parse::<Hash>(), Err(HashError::BadEncoding(_))));
    }

    proptest! {
        #[test]
        fn every_encoding_round_trips(data in proptest::collection::vec(any::<u8>(), 0..100)) {
            for algo in [HashAlgo::Md5, HashAlgo::Sha1, HashAlgo::Sha256, HashAlgo::Sha512] {
                let h = Hash::digest(algo, &data);
                for enc in [Encoding::Base16, Encoding::Nix32, Encoding::Base64, Encoding::Sri] {
                    prop_assert_eq!(&h.to_prefixed(enc).parse::<Hash>().unwrap(), &h);
                }
            }
        }

        #[test]
        fn parse_never_panics(s in ".{0,100}") {
            let _ = s.parse::<Hash>();
        }
    }
}
