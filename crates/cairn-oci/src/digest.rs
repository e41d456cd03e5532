//! Content digests as the OCI image spec writes them: `algorithm:encoded`.
//!
//! Only the registered algorithms with a store-path meaning are accepted (`sha256`, `sha512`;
//! lower-case hex of the right length), because a blob's store path is computed from its digest
//! and anything looser would give one blob two paths. Parsing is strict so that garbage from a
//! registry or an archive is refused before it names a file or a URL.

use std::fmt;

use cairn_nix::{Hash, HashAlgo};

use crate::{OciError, Result};

/// A digest algorithm this store can address blobs by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestAlgo {
    Sha256,
    Sha512,
}

impl DigestAlgo {
    pub fn as_str(self) -> &'static str {
        match self {
            DigestAlgo::Sha256 => "sha256",
            DigestAlgo::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            DigestAlgo::Sha256 => 64,
            DigestAlgo::Sha512 => 128,
        }
    }

    pub fn hash_algo(self) -> HashAlgo {
        match self {
            DigestAlgo::Sha256 => HashAlgo::Sha256,
            DigestAlgo::Sha512 => HashAlgo::Sha512,
        }
    }
}

/// A validated digest. Ordered by algorithm, then hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algo: DigestAlgo,
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 lower-case hex>` or `sha512:<128 lower-case hex>`.
    pub fn parse(s: &str) -> Result<Digest> {
        let bad = || OciError::BadDigest(s.chars().take(200).collect());
        let (alg, hex) = s.split_once(':').ok_or_else(bad)?;
        let algo = match alg {
            "sha256" => DigestAlgo::Sha256,
            "sha512" => DigestAlgo::Sha512,
            _ => return Err(bad()),
        };
        if hex.len() != algo.hex_len() || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(bad());
        }
        Ok(Digest { algo, hex: hex.to_owned() })
    }

    /// The SHA-256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        Digest::from_hash(&Hash::digest(HashAlgo::Sha256, data)).expect("sha256 is a digest algorithm")
    }

    /// The digest a store hash spells, if its algorithm is one of ours.
    pub fn from_hash(h: &Hash) -> Option<Digest> {
        let algo = match h.algo() {
            HashAlgo::Sha256 => DigestAlgo::Sha256,
            HashAlgo::Sha512 => DigestAlgo::Sha512,
            _ => return None,
        };
        Some(Digest { algo, hex: h.encode(cairn_nix::hash::Encoding::Base16) })
    }

    pub fn algo(&self) -> DigestAlgo {
        self.algo
    }

    /// The encoded part (lower-case hex).
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The digest as a store hash (for flat fixed-output paths and checks).
    pub fn to_hash(&self) -> Hash {
        Hash::parse_with_algo(&self.hex, self.algo.hash_algo()).expect("validated hex")
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo.as_str(), self.hex)
    }
}

impl std::str::FromStr for Digest {
    type Err = OciError;
    fn from_str(s: &str) -> Result<Digest> {
        Digest::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints() {
        let d = Digest::sha256_of(b"");
        assert_eq!(d.to_string(), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        assert_eq!(Digest::from_hash(&d.to_hash()).unwrap(), d);
    }

    #[test]
    fn refuses_loose_spellings() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        for bad in [
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{hex}0"),
            format!("md5:{hex}"),
            format!("sha256+b64:{hex}"),
            hex.to_owned(),
            format!("sha256:../{}", &hex[3..]),
            String::new(),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,140}") {
            let _ = Digest::parse(&s);
        }

        #[test]
        fn round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let d = Digest::sha256_of(&bytes);
            prop_assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        }
    }
}
