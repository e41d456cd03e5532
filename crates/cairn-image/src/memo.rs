//! The kinds of memo this crate keeps in the store's state directory (`cairn_store::Memo`): the
//! store remembers a path per kind and key and knows nothing of images, so the names of the
//! kinds — and what their keys are — live here.

use cairn_store::Memo;

/// An image's unpacked root filesystem, by manifest digest (`unpack`).
pub const ROOTFS: Memo = Memo::named("oci-rootfs");
/// A layer made from store paths (its description), by the paths and the tar format (`build`).
pub const LAYER: Memo = Memo::named("oci-layers");
/// A streamed layer's description, by the layer's digest (`build`, `Images::find_blob`).
pub const STREAMED_LAYER: Memo = Memo::named("oci-streamed-layers");
