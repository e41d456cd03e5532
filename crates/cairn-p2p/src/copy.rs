//! The copy protocol: a peer's store read as a binary cache, and pushes.
//!
//! `cairn copy --from p2p://NODE-ID` substitutes from a peer as from any binary cache: the
//! narinfos come from the peer over this protocol (ALPN [`ALPN`]) and are checked as any cache's
//! (trusted signature, or a content address that proves the path); the NARs they name come as
//! BLAKE3-verified transfers from whichever peers hold them, and are checked against the
//! narinfo's NAR hash before registration. `cairn copy --to p2p://NODE-ID` asks the peer to do
//! just that from this node, handing it the narinfos (signed as the user chose) with the request.
//!
//! One request per QUIC stream, one answer:
//!
//! ```text
//! request = 0x01 hash-part[32]                       the narinfo of a valid path
//!         | 0x02                                     nix-cache-info
//!         | 0x03 (len:u32le narinfo[len])*            take these paths from me (a push)
//! answer  = 0x00 bytes    (a narinfo, nix-cache-info, or the push's JSON PeerPushAnswer)
//!         | 0x01          (no such path)
//!         | 0x02 reason   (refused: UTF-8 text)
//! ```

/// The ALPN of the copy protocol.
pub const ALPN: &[u8] = b"/cairn/p2p-copy/1";

/// No request is longer than this (a push of a closure of some 50 000 paths).
pub const MAX_REQUEST: usize = 32 << 20;
/// Requests a peer may have in flight, over all its connections; more wait (bounds what a peer
/// can make this node buffer to `MAX_STREAMS` × [`MAX_REQUEST`]).
pub const MAX_STREAMS: usize = 4;
/// No answer is longer than this.
pub const MAX_ANSWER: usize = 64 << 20;

/// No narinfo is shorter (its StorePath and NarHash lines alone are longer): a push of tiny
/// entries would make a node hold millions of strings.
pub const MIN_NARINFO: usize = 64;

const NARINFO: u8 = 1;
const CACHE_INFO: u8 = 2;
const PUSH: u8 = 3;

/// A request of the copy protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The narinfo of the valid path with this hash part.
    NarInfo(String),
    CacheInfo,
    /// Take these paths (their narinfos' texts) from the asking node.
    Push(Vec<String>),
}

/// An answer of the copy protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Found(Vec<u8>),
    Missing,
    Refused(String),
}

/// Why bytes are not a request or an answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CopyError {
    #[error("empty copy message")]
    Empty,
    #[error("unknown copy request kind {0}")]
    Kind(u8),
    #[error("'{0}' is not a store path's hash part")]
    HashPart(String),
    #[error("a pushed narinfo runs past the end of the request")]
    Truncated,
    #[error("a pushed narinfo is not UTF-8")]
    Utf8,
    #[error("a pushed narinfo of {0} bytes is too short to be one")]
    ShortNarInfo(usize),
    #[error("bytes after the end of a request")]
    Trailing,
    #[error("the request is longer than {MAX_REQUEST} bytes")]
    TooLong,
}

use cairn_nix::store_path::is_hash_part;

pub fn encode_request(request: &Request) -> Result<Vec<u8>, CopyError> {
    let out = match request {
        Request::NarInfo(hash_part) => {
            if !is_hash_part(hash_part) {
                return Err(CopyError::HashPart(hash_part.clone()));
            }
            [&[NARINFO], hash_part.as_bytes()].concat()
        }
        Request::CacheInfo => vec![CACHE_INFO],
        Request::Push(narinfos) => {
            let mut out = vec![PUSH];
            for n in narinfos {
                let len = u32::try_from(n.len()).map_err(|_| CopyError::TooLong)?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(n.as_bytes());
            }
            out
        }
    };
    if out.len() > MAX_REQUEST {
        return Err(CopyError::TooLong);
    }
    Ok(out)
}

/// Parses a request; anything but exactly one well-formed request is refused.
pub fn decode_request(bytes: &[u8]) -> Result<Request, CopyError> {
    let (&kind, mut rest) = bytes.split_first().ok_or(CopyError::Empty)?;
    match kind {
        NARINFO => {
            let text =
                std::str::from_utf8(rest).map_err(|_| CopyError::HashPart(String::from_utf8_lossy(rest).into()))?;
            if !is_hash_part(text) {
                return Err(CopyError::HashPart(text.to_owned()));
            }
            Ok(Request::NarInfo(text.to_owned()))
        }
        CACHE_INFO if rest.is_empty() => Ok(Request::CacheInfo),
        CACHE_INFO => Err(CopyError::Trailing),
        PUSH => {
            let mut narinfos = Vec::new();
            while !rest.is_empty() {
                let (len, tail) = rest.split_first_chunk::<4>().ok_or(CopyError::Truncated)?;
                let len = u32::from_le_bytes(*len) as usize;
                if tail.len() < len {
                    return Err(CopyError::Truncated);
                }
                if len < MIN_NARINFO {
                    return Err(CopyError::ShortNarInfo(len));
                }
                let (text, tail) = tail.split_at(len);
                narinfos.push(std::str::from_utf8(text).map_err(|_| CopyError::Utf8)?.to_owned());
                rest = tail;
            }
            Ok(Request::Push(narinfos))
        }
        k => Err(CopyError::Kind(k)),
    }
}

pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    match reply {
        Reply::Found(bytes) => [&[0u8], &bytes[..]].concat(),
        Reply::Missing => vec![1],
        Reply::Refused(reason) => [&[2u8], reason.as_bytes()].concat(),
    }
}

pub fn decode_reply(bytes: &[u8]) -> Result<Reply, CopyError> {
    match bytes.split_first() {
        None => Err(CopyError::Empty),
        Some((0, rest)) => Ok(Reply::Found(rest.to_vec())),
        Some((1, [])) => Ok(Reply::Missing),
        Some((2, rest)) => Ok(Reply::Refused(String::from_utf8_lossy(rest).into_owned())),
        Some((k, _)) => Err(CopyError::Kind(*k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            "[0-9a-df-np-sv-z]{32}".prop_map(Request::NarInfo),
            Just(Request::CacheInfo),
            proptest::collection::vec(".{64,200}", 0..5).prop_map(Request::Push),
        ]
    }

    fn reply() -> impl Strategy<Value = Reply> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Reply::Found),
            Just(Reply::Missing),
            ".{0,100}".prop_map(Reply::Refused),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(r in request()) {
            let bytes = encode_request(&r).unwrap();
            prop_assert_eq!(decode_request(&bytes).unwrap(), r);
        }

        #[test]
        fn replies_round_trip(r in reply()) {
            prop_assert_eq!(decode_reply(&encode_reply(&r)).unwrap(), r);
        }

        /// Hostile bytes: never a panic, and a request that parses re-encodes to the same bytes.
        #[test]
        fn arbitrary_bytes_are_refused_or_exact(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(r) = decode_request(&bytes) {
                prop_assert_eq!(encode_request(&r).unwrap(), bytes.clone());
            }
            let _ = decode_reply(&bytes);
        }

        #[test]
        fn a_push_cut_short_is_refused(narinfos in proptest::collection::vec(".{64,100}", 1..4), cut in 1usize..50) {
            let bytes = encode_request(&Request::Push(narinfos)).unwrap();
            let cut = cut.min(bytes.len() - 1);
            let shorter = &bytes[..bytes.len() - cut];
            // Cut at a boundary it is a shorter push; anywhere else it is refused.
            if let Ok(Request::Push(got)) = decode_request(shorter) {
                prop_assert_eq!(encode_request(&Request::Push(got)).unwrap(), shorter.to_vec());
            }
        }
    }

    #[test]
    fn a_narinfo_request_names_a_hash_part_and_nothing_else() {
        for bad in ["../../etc/passwd", "0000000000000000000000000000000e", "short", ""] {
            let bytes = [&[NARINFO], bad.as_bytes()].concat();
            assert!(matches!(decode_request(&bytes), Err(CopyError::HashPart(_))), "{bad}");
            assert!(encode_request(&Request::NarInfo(bad.into())).is_err());
        }
        assert_eq!(decode_request(&[CACHE_INFO, 0]), Err(CopyError::Trailing));
    }

    #[test]
    fn a_push_whose_length_runs_past_the_end_is_refused() {
        let mut bytes = vec![PUSH];
        bytes.extend_from_slice(&100u32.to_le_bytes());
        bytes.extend_from_slice(b"StorePath: x");
        assert_eq!(decode_request(&bytes), Err(CopyError::Truncated));
    }

    #[test]
    fn a_push_of_entries_too_short_to_be_narinfos_is_refused() {
        let mut bytes = vec![PUSH];
        for _ in 0..3 {
            bytes.extend_from_slice(&1u32.to_le_bytes());
            bytes.push(b'x');
        }
        assert_eq!(decode_request(&bytes), Err(CopyError::ShortNarInfo(1)));
    }
}
