//! Nix's store formats as pure functions.
//!
//! This crate is the bottom layer of cairn. It knows how Nix spells things — nixbase32, hashes in
//! their four encodings, store path names and the way a store path is computed from a content
//! hash, the NAR archive format, the `nix-store --export` stream, and the scan that finds
//! references inside a path's contents — and nothing else.
//!
//! **Architecture invariant:** no file system, no network, no async, no global state. Everything
//! here is a function of its arguments or a state machine over `std::io::{Read, Write}` that the
//! caller drives. That keeps every format testable with in-memory bytes and fuzzable, and lets the
//! store, the daemon and the CLI share one implementation of each format.
//!
//! The formats follow Nix 2.8 byte for byte; the tests carry vectors produced by real Nix.

pub mod content_address;
pub mod derivation;
pub mod export;
pub mod hash;
pub mod json;
pub mod machines;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod references;
pub mod signing;
pub mod store_path;
pub mod wire;

#[cfg(any(test, feature = "test-strategies"))]
pub mod strategies;

pub use content_address::{ContentAddress, FileIngestionMethod};
pub use hash::{Hash, HashAlgo, Hasher};
pub use store_path::{references_first, StoreDir, StorePath};
