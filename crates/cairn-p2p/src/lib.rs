//! A fleet shares what it holds: peers serve each other store paths' NARs and OCI blobs.
//!
//! The transport is iroh (QUIC between node ids, here without relays or DNS discovery: peers
//! are configured by address, or by node id alone with mDNS discovery on the local network) and iroh-blobs, whose transfers stream BLAKE3-verified
//! chunks with ranges, so that a transfer cut short continues from another peer where it
//! stopped. cairn adds three things around it:
//!
//! - [`lookup`]: the small protocol that maps what users ask by (a store path's NAR hash, an
//!   OCI blob's sha256 digest) to the BLAKE3 hash a transfer needs, and says "being fetched";
//! - [`offer`] and [`index`]: what this node serves — only valid paths, read straight from the
//!   store — and the memo of their BLAKE3 hashes and outboards;
//! - [`copy`]: a peer's store read as a binary cache of narinfos (`cairn copy --from p2p://…`),
//!   and pushes (`--to p2p://…`: the peer substitutes from this node under its own trust policy);
//! - [`node`]: the endpoint, the peers and their state, and fetching with failover, which
//!   implements the store's [`cairn_store::peers::Peers`] for substitution and pulls.
//!
//! **Architecture Invariant:** a peer is a source of bytes, never of truth. Nothing here decides
//! that bytes are right: callers check them against the hash their trusted source gave before
//! anything is registered.

pub mod copy;
pub mod index;
pub mod lookup;
pub mod node;
pub mod offer;

pub use node::{Config, Node, NodeError, Receiver};
