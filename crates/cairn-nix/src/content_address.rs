//! Content addresses: the `ca` field of a path's metadata (`text:sha256:…`, `fixed:r:sha256:…`).
//!
//! A content address says how a path's name was derived from its contents, so that anyone can
//! check the path without trusting a signature. Nix stores it in the database and in `.narinfo`.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::hash::{Hash, HashAlgo, HashError};

/// How a file system object was hashed: as a flat file, or as a NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileIngestionMethod {
    Flat,
    Recursive,
}

/// A content address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ContentAddress {
    /// A text file hashed with SHA-256; may reference other paths but not itself.
    Text(Hash),
    /// A fixed-output object.
    Fixed { method: FileIngestionMethod, hash: Hash },
}

/// Why a content address did not parse.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ContentAddressError {
    #[error("content address '{0}' is neither 'text:…' nor 'fixed:…'")]
    UnknownKind(String),
    #[error("text content address '{0}' must use sha256")]
    TextNotSha256(String),
    #[error("content address '{ca}': {source}")]
    Hash {
        ca: String,
        #[source]
        source: HashError,
    },
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentAddress::Text(h) => write!(f, "text:{h}"),
            ContentAddress::Fixed { method: FileIngestionMethod::Flat, hash } => write!(f, "fixed:{hash}"),
            ContentAddress::Fixed { method: FileIngestionMethod::Recursive, hash } => write!(f, "fixed:r:{hash}"),
        }
    }
}

impl FromStr for ContentAddress {
    type Err = ContentAddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hash = |h: &str| h.parse::<Hash>().map_err(|source| ContentAddressError::Hash { ca: s.to_owned(), source });
        if let Some(rest) = s.strip_prefix("text:") {
            let h = hash(rest)?;
            if h.algo() != HashAlgo::Sha256 {
                return Err(ContentAddressError::TextNotSha256(s.to_owned()));
            }
            Ok(ContentAddress::Text(h))
        } else if let Some(rest) = s.strip_prefix("fixed:r:") {
            Ok(ContentAddress::Fixed { method: FileIngestionMethod::Recursive, hash: hash(rest)? })
        } else if let Some(rest) = s.strip_prefix("fixed:") {
            Ok(ContentAddress::Fixed { method: FileIngestionMethod::Flat, hash: hash(rest)? })
        } else {
            Err(ContentAddressError::UnknownKind(s.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for s in [
            "text:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            "fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            "fixed:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
        ] {
            assert_eq!(s.parse::<ContentAddress>().unwrap().to_string(), s);
        }
        assert!("nar:sha256:x".parse::<ContentAddress>().is_err());
        assert!("text:sha1:a9993e364706816aba3e25717850c26c9cd0d89d".parse::<ContentAddress>().is_err());
    }
}
