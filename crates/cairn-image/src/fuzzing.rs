//! What the fuzz targets (`fuzz/` at the top of the repository) reach without a store: the
//! rules that apply a hostile layer to a tree, and the readers of image configs that squashes,
//! combinations and layered builds use. Built only with the `fuzzing` feature, so that these
//! stay crate-private in every real build.

use std::path::Path;

use serde_json::Value;

pub use crate::unpack::UnpackError;

/// Applies uncompressed layer tars in order to `root`, an existing empty directory, as an
/// image's layers are unpacked; returns the device nodes and special bits left out.
pub fn apply_layers(root: &Path, layers: &[&[u8]]) -> Result<(u64, u64), UnpackError> {
    crate::unpack::apply_layers(root, layers)
}

/// What the image builders read from image configs: the platform string of each, and their
/// merged `config` object (with no command-line overrides).
pub fn read_configs(configs: &[Value]) -> (Vec<String>, Value) {
    let platforms = configs.iter().map(crate::compose::platform_of).collect();
    (platforms, crate::compose::merge_configs(configs, &crate::compose::Overrides::default()))
}
