//! The optional listeners on `listen`: a Nix binary cache ([`cache`]) and an OCI registry
//! ([`registry`]) over the same store.

pub mod cache;
pub mod registry;
