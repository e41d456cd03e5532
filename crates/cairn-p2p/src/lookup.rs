//! The lookup protocol: "do you hold this, and by which BLAKE3 hash?"
//!
//! Users ask for things by the hashes their trusted sources give (a narinfo's NAR hash, a
//! manifest's sha256 digest); iroh-blobs moves bytes by BLAKE3 hash. Before a transfer, the
//! asking node sends each peer one lookup on a stream of its own (ALPN [`ALPN`]) and gets one
//! answer. An answer is a claim, not a truth: the BLAKE3 hash only lets the bytes be checked as
//! they stream; whether they are the wanted bytes is checked against the trusted hash after.
//!
//! ```text
//! request  = 0x01 len:u8 base-name[len] nar-sha256[32] nar-size:u64le   (a store path's NAR)
//!          | 0x02 sha256[32] size:u64le                                 (an OCI blob)
//! answer   = 0x00 blake3[32] size:u64le   (held and valid)
//!          | 0x01                         (being fetched upstream: ask again soon)
//!          | 0x02                         (not here)
//!          | 0x03                         (wanted here too, not yet fetched from anywhere)
//! ```

use cairn_nix::{Hash, HashAlgo, StorePath};
use cairn_store::peers::Wanted;

/// The ALPN of the lookup protocol.
pub const ALPN: &[u8] = b"/cairn/p2p-lookup/1";

/// The first byte of a request for a store path's NAR.
pub const KIND_NAR: u8 = 1;
/// The first byte of a request for a blob.
pub const KIND_BLOB: u8 = 2;

/// No request is longer than this (a 255-byte name and the fixed fields).
pub const MAX_REQUEST: usize = 1 + 1 + 255 + 32 + 8;
/// No answer is longer than this.
pub const MAX_ANSWER: usize = 1 + 32 + 8;

/// A peer's answer to a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Have {
        blake3: [u8; 32],
        size: u64,
    },
    /// The peer is fetching it upstream.
    Fetching,
    Missing,
    /// The peer wants it too and is asking its own peers.
    Deciding,
}

/// Why bytes are not a request or an answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("the lookup is {0} bytes, which fits no request or answer")]
    Length(usize),
    #[error("unknown lookup kind {0}")]
    Kind(u8),
    #[error("the lookup names a bad store path: {0}")]
    Path(String),
    #[error("only SHA-256 NAR hashes can be looked up (this one is {0})")]
    Algo(HashAlgo),
}

/// The request for `wanted`.
pub fn encode_request(wanted: &Wanted) -> Result<Vec<u8>, LookupError> {
    let mut out = Vec::with_capacity(MAX_REQUEST);
    match wanted {
        Wanted::Nar { path, nar_hash, nar_size } => {
            if nar_hash.algo() != HashAlgo::Sha256 {
                return Err(LookupError::Algo(nar_hash.algo()));
            }
            let name = path.base_name();
            let len = u8::try_from(name.len()).map_err(|_| LookupError::Path(name.clone()))?;
            out.push(KIND_NAR);
            out.push(len);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(nar_hash.as_bytes());
            out.extend_from_slice(&nar_size.to_le_bytes());
        }
        Wanted::Blob { sha256, size } => {
            out.push(KIND_BLOB);
            out.extend_from_slice(sha256);
            out.extend_from_slice(&size.to_le_bytes());
        }
    }
    Ok(out)
}

/// Parses a request; anything but exactly one well-formed request is refused.
pub fn decode_request(bytes: &[u8]) -> Result<Wanted, LookupError> {
    let bad_len = || LookupError::Length(bytes.len());
    let (&kind, rest) = bytes.split_first().ok_or_else(bad_len)?;
    match kind {
        KIND_NAR => {
            let (&len, rest) = rest.split_first().ok_or_else(bad_len)?;
            if rest.len() != len as usize + 40 {
                return Err(bad_len());
            }
            let (name, rest) = rest.split_at(len as usize);
            let name =
                std::str::from_utf8(name).map_err(|_| LookupError::Path(String::from_utf8_lossy(name).into()))?;
            let path = StorePath::from_base_name(name).map_err(|e| LookupError::Path(e.to_string()))?;
            let (hash, size) = rest.split_at(32);
            Ok(Wanted::Nar { path, nar_hash: Hash::sha256(array(hash)), nar_size: u64::from_le_bytes(array(size)) })
        }
        KIND_BLOB => {
            if rest.len() != 40 {
                return Err(bad_len());
            }
            let (hash, size) = rest.split_at(32);
            Ok(Wanted::Blob { sha256: array(hash), size: u64::from_le_bytes(array(size)) })
        }
        k => Err(LookupError::Kind(k)),
    }
}

pub fn encode_answer(answer: &Answer) -> Vec<u8> {
    match answer {
        Answer::Have { blake3, size } => {
            let mut out = vec![0u8];
            out.extend_from_slice(blake3);
            out.extend_from_slice(&size.to_le_bytes());
            out
        }
        Answer::Fetching => vec![1],
        Answer::Missing => vec![2],
        Answer::Deciding => vec![3],
    }
}

pub fn decode_answer(bytes: &[u8]) -> Result<Answer, LookupError> {
    match bytes {
        [0, rest @ ..] if rest.len() == 40 => {
            let (hash, size) = rest.split_at(32);
            Ok(Answer::Have { blake3: array(hash), size: u64::from_le_bytes(array(size)) })
        }
        [1] => Ok(Answer::Fetching),
        [2] => Ok(Answer::Missing),
        [3] => Ok(Answer::Deciding),
        [0..=3, ..] | [] => Err(LookupError::Length(bytes.len())),
        [k, ..] => Err(LookupError::Kind(*k)),
    }
}

/// The first `N` bytes of a slice whose length was checked.
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&bytes[..N]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn path() -> StorePath {
        StorePath::from_base_name("7rjj86a15146cq1d3qy068lml7n8ykzm-hello-2.12").unwrap()
    }

    fn wanted() -> impl Strategy<Value = Wanted> {
        prop_oneof![
            (any::<[u8; 32]>(), any::<u64>()).prop_map(|(h, s)| Wanted::Nar {
                path: path(),
                nar_hash: Hash::sha256(h),
                nar_size: s
            }),
            (any::<[u8; 32]>(), any::<u64>()).prop_map(|(sha256, size)| Wanted::Blob { sha256, size }),
        ]
    }

    fn answer() -> impl Strategy<Value = Answer> {
        prop_oneof![
            (any::<[u8; 32]>(), any::<u64>()).prop_map(|(blake3, size)| Answer::Have { blake3, size }),
            Just(Answer::Fetching),
            Just(Answer::Missing),
            Just(Answer::Deciding),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(w in wanted()) {
            let bytes = encode_request(&w).unwrap();
            prop_assert!(bytes.len() <= MAX_REQUEST);
            prop_assert_eq!(decode_request(&bytes).unwrap(), w);
        }

        #[test]
        fn answers_round_trip(a in answer()) {
            let bytes = encode_answer(&a);
            prop_assert!(bytes.len() <= MAX_ANSWER);
            prop_assert_eq!(decode_answer(&bytes).unwrap(), a);
        }

        /// Hostile bytes: never a panic, and a request that parses re-encodes to the same bytes.
        #[test]
        fn arbitrary_bytes_are_refused_or_exact(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(w) = decode_request(&bytes) {
                prop_assert_eq!(encode_request(&w).unwrap(), bytes.clone());
            }
            if let Ok(a) = decode_answer(&bytes) {
                prop_assert_eq!(encode_answer(&a), bytes);
            }
        }

        #[test]
        fn truncated_or_extended_requests_are_refused(w in wanted(), cut in 0usize..80, extra in 1usize..4) {
            let bytes = encode_request(&w).unwrap();
            let cut = cut.min(bytes.len() - 1);
            prop_assert!(decode_request(&bytes[..cut]).is_err());
            let mut longer = bytes.clone();
            longer.extend(std::iter::repeat_n(0u8, extra));
            prop_assert!(decode_request(&longer).is_err());
        }
    }

    #[test]
    fn a_request_naming_a_path_outside_the_rules_is_refused() {
        let mut bytes = vec![1u8, 4];
        bytes.extend_from_slice(b"../x");
        bytes.extend_from_slice(&[0u8; 40]);
        assert!(matches!(decode_request(&bytes), Err(LookupError::Path(_))));
    }

    #[test]
    fn only_sha256_nar_hashes_are_asked_for() {
        let w = Wanted::Nar { path: path(), nar_hash: Hash::digest(HashAlgo::Sha1, b"x"), nar_size: 1 };
        assert_eq!(encode_request(&w), Err(LookupError::Algo(HashAlgo::Sha1)));
    }
}
