//! The listeners beside the API socket: on `listen`, a Nix binary cache ([`cache`]) and an OCI
//! registry ([`registry`]); on `nix-daemon-socket` and `cairnd --stdio`, Nix's daemon protocol
//! ([`nix`]). All serve the same store.

pub mod auth;
pub mod cache;
pub mod nix;
pub mod registry;
pub mod tls;
