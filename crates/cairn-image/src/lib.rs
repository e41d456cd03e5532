//! OCI images in the store, and the registries they come from and go to.
//!
//! [`Images`] turns stored blobs into image layouts and tags (`commit`), resolves what a user
//! names (a tag, a digest, a layout path) and describes images (`inspect`, `list`). The
//! [`registry`] client speaks the distribution protocol (anonymous, basic and bearer-token
//! auth); [`pull`] fetches an image's missing blobs in parallel, each verified against its digest
//! as it streams into the store, and [`push`] uploads what a registry lacks, sending manifests as
//! their exact stored bytes so that digests survive the trip. [`unpack`] applies an image's
//! layers into a root filesystem that is itself a store path, refusing entries that would leave
//! it, and remembers it per image. [`compose`] makes images of images: a squash into one layer
//! and a combination of several images' layers.
//!
//! Everything a network or an archive gives is untrusted until hashed: a blob is registered
//! only under the digest its bytes have, a manifest fetched by tag is stored under the digest of
//! the bytes received, and one fetched by digest must have that digest.

pub mod automaton;
pub mod compose;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod images;
pub mod layered;
pub mod memo;
pub mod process;
pub mod pull;
pub mod push;
pub mod registry;
pub mod streamed;
pub mod unpack;

pub use images::Images;

use cairn_store::StoreError;

/// What image operations refuse or fail at, each naming the image, blob or registry.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Oci(#[from] cairn_oci::OciError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Unpack(#[from] unpack::UnpackError),
    #[error("no image is tagged '{0}' (see cairn image ls)")]
    NoSuchTag(String),
    #[error("no image with digest {0} is in the store")]
    NoSuchDigest(String),
    #[error("'{0}' is not an image layout in the store")]
    NotAnImage(String),
    #[error("{referrer} names blob {digest}, which is not in the store")]
    MissingBlob { digest: String, referrer: String },
    #[error("blob {digest} is {actual} bytes, but {referrer} says {expected}")]
    BlobSize { digest: String, referrer: String, expected: u64, actual: u64 },
    #[error("cannot read '{path}': {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("{registry}: {what} answered {status}{detail}")]
    Status { registry: String, what: String, status: u16, detail: String },
    #[error("{registry}: manifest {reference} has digest {actual}, not {expected}")]
    ManifestDigest { registry: String, reference: String, expected: String, actual: String },
    #[error("{0}")]
    BadAutomaton(String),
    #[error("{0}")]
    BadLayer(String),
    #[error("cannot build the image: {0}")]
    BadBuild(String),
    #[error("{registry}: needs credentials for {scope} (pass --creds USER:PASS or add them to auth.json)")]
    Unauthorized { registry: String, scope: String },
}

impl ImageError {
    /// Whether the caller named something that is not there (a 404 rather than a 500).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ImageError::NoSuchTag(_) | ImageError::NoSuchDigest(_) | ImageError::NotAnImage(_))
            || matches!(self, ImageError::Status { status: 404, .. })
    }

    /// Whether the input (a manifest, a reference, a blob) is at fault.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            ImageError::Oci(_)
                | ImageError::MissingBlob { .. }
                | ImageError::BlobSize { .. }
                | ImageError::ManifestDigest { .. }
                | ImageError::BadBuild(_)
                | ImageError::BadLayer(_)
                | ImageError::BadAutomaton(_)
                | ImageError::Store(StoreError::ContentMismatch { .. } | StoreError::SizeMismatch { .. })
        ) || matches!(self, ImageError::Unpack(u) if u.is_bad_input())
    }
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;
