//! Peers as a source of bytes: what substitution and pulls ask before going upstream.
//!
//! A peer is a source of *bytes*, never of *truth*: what is wanted is named by a hash that came
//! from a trusted place (a signed narinfo's NAR hash, a manifest's digest), and whatever a peer
//! sends is checked against it before anything is registered, as an upstream download is. The
//! engine that finds peers and moves the bytes (`cairn-p2p`) implements [`Peers`]; the store
//! only defines what is asked, so that the caches and the image code need not know it.

use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;

use cairn_nix::{Hash, StorePath};

/// Something wanted from peers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Wanted {
    /// The NAR of a store path, whose hash and size a trusted narinfo gave.
    Nar { path: StorePath, nar_hash: Hash, nar_size: u64 },
    /// An OCI blob by its SHA-256 digest and size (from a manifest).
    Blob { sha256: [u8; 32], size: u64 },
}

/// What peers answered.
pub enum PeerOffer {
    /// A peer streams the bytes (verified against the peer's BLAKE3 as they arrive; the caller
    /// still checks them against the wanted hash). A read error means the peers gave up: the
    /// caller goes upstream.
    Bytes(Box<dyn Read + Send>),
    /// No peer has it: fetch it upstream. Keep the guard until what was fetched is valid (or
    /// the fetch failed): while it lives, peers asking for the same thing are told it is on its
    /// way and wait for it rather than fetching it upstream as well.
    Upstream(Box<dyn Send>),
}

/// The chunk groups of the BLAKE3 outboards made for peers (16 KiB, iroh-blobs' own).
pub const BLAKE3_BLOCK: bao_tree::BlockSize = bao_tree::BlockSize::from_chunk_log(4);

/// Told the BLAKE3 hash and outboard of something the store hashed while adding it, so that it
/// can be offered to peers without reading it again.
pub trait Offered: Send + Sync {
    fn hashed(&self, wanted: Wanted, blake3: [u8; 32], outboard: Vec<u8>);
}

/// BLAKE3 and the post-order outboard ([`BLAKE3_BLOCK`]) of `size` bytes read from `data`.
pub fn blake3_outboard(data: impl Read, size: u64) -> std::io::Result<([u8; 32], Vec<u8>)> {
    let tree = bao_tree::BaoTree::new(size, BLAKE3_BLOCK);
    // Grown as the data arrives: the size is a claim until the bytes are there.
    let mut outboard = Vec::with_capacity(tree.outboard_size().min(1 << 20) as usize);
    let root = bao_tree::io::sync::outboard_post_order(data, tree, &mut outboard)?;
    Ok((*root.as_bytes(), outboard))
}

/// Where bytes can come from before upstream.
pub trait Peers: Send + Sync {
    fn find(&self, wanted: Wanted) -> Pin<Box<dyn Future<Output = PeerOffer> + Send + '_>>;

    /// The configured peer `node` (its node id) seen as a binary cache, for copies from it
    /// (`p2p://NODE-ID`); an error says why there is no such peer.
    fn cache_of(&self, node: &str) -> Result<Arc<dyn PeerCache>, String>;
}

/// A peer's store seen as a binary cache of narinfos: what `cairn copy --from p2p://…` reads.
/// The narinfos are claims like any cache's (their signatures are checked); the NARs they name
/// come through [`Peers::find`], verified.
pub trait PeerCache: Send + Sync {
    /// The peer's `nix-cache-info`, or `<hash part>.narinfo` of one of its valid paths
    /// (`None`: it has no such path).
    fn get<'a>(&'a self, key: &'a str) -> PeerFile<'a>;
}

/// A file a peer answers with, or `None`, or why it could not be had.
pub type PeerFile<'a> = Pin<Box<dyn Future<Output = Result<Option<Vec<u8>>, String>> + Send + 'a>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_size_far_beyond_the_data_is_an_error_not_an_allocation() {
        // 2^62 bytes would want a 2^54-byte outboard: nothing is reserved before data arrives.
        let err = blake3_outboard(&b"abc"[..], 1 << 62).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn the_outboard_root_is_the_blake3_hash() {
        let data = vec![7u8; 100_000];
        let (root, outboard) = blake3_outboard(&data[..], data.len() as u64).unwrap();
        assert_eq!(root, *bao_tree::blake3::hash(&data).as_bytes());
        assert_eq!(outboard.len() as u64, bao_tree::BaoTree::new(data.len() as u64, BLAKE3_BLOCK).outboard_size());
    }
}
