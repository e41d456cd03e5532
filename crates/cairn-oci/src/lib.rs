//! OCI images in a content-addressed store, as pure functions.
//!
//! cairn keeps OCI images in the same store and reference graph as Nix closures:
//!
//! - a **blob** (layer, config, manifest, index) is a flat fixed-output store path whose path is
//!   computed from its digest alone ([`blob_path`]), so that any node knows where a blob lives
//!   from a manifest before downloading it, and a layer is stored once whatever image brought
//!   it;
//! - an **image** is an OCI image layout (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`)
//!   stored as one store path whose blob entries are symlinks to the blob paths and which
//!   references them ([`layout::Layout`]): images share blobs by construction, the garbage
//!   collector sees the edges, and the layout is usable as is by OCI tools;
//! - a **tag** (`name:tag` → image) is a named garbage-collector root ([`tag::TagName`]).
//!
//! This crate knows how those things are spelled and computed — digests, references and
//! transports, manifest and index walking with platform selection, the layout's bytes, the JSON
//! of docker archives ([`docker_archive`]) — and
//! does no I/O (the same invariant as `cairn-nix`): the store, the registry client and the
//! daemon drive it with bytes they read.

pub mod digest;
pub mod docker_archive;
pub mod layout;
pub mod manifest;
pub mod reference;
pub mod tag;
pub mod to_oci;

pub use digest::{Digest, DigestAlgo};
pub use layout::{blob_path, Layout};
pub use manifest::{Descriptor, Manifest, ManifestKind, Platform};
pub use reference::{ImageRef, Transport};
pub use tag::TagName;

/// Manifests and indexes larger than this are refused, as distribution refuses them (4 MiB).
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// Everything this crate refuses, each naming the problem.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OciError {
    #[error("invalid digest '{0}': expected sha256:<64 hex digits> or sha512:<128 hex digits>")]
    BadDigest(String),
    #[error("invalid image reference '{reference}': {why}")]
    BadReference { reference: String, why: &'static str },
    #[error("invalid tag '{0}': a tag is 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'")]
    BadTag(String),
    #[error("invalid repository name '{0}': components of [a-z0-9] joined by '.', '_', '__' or '-', separated by '/'")]
    BadName(String),
    /// A name (with its tag or digest) whose root link would be longer than a file name may be.
    #[error("'{0}' is too long: with its tag or digest it must fit a file name (255 bytes, '/' and ':' counting 3)")]
    NameTooLong(String),
    #[error("manifest is {size} bytes, more than the {MAX_MANIFEST_SIZE} allowed")]
    ManifestTooLarge { size: u64 },
    #[error("manifest is not valid JSON: {0}")]
    ManifestJson(String),
    #[error("unsupported manifest: {0}")]
    UnsupportedManifest(String),
    #[error("descriptor of {digest} has size {size}, beyond what any blob may have")]
    BadSize { digest: String, size: i64 },
    #[error("no manifest in the index matches platform {0}")]
    NoPlatform(String),
    #[error("invalid platform '{0}': expected OS/ARCH[/VARIANT]")]
    BadPlatform(String),
    #[error("invalid image layout: {0}")]
    BadLayout(String),
}

pub type Result<T, E = OciError> = std::result::Result<T, E>;
