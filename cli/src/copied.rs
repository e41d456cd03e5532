//! What every `cairn copy --to` shares, whatever the destination: a path's narinfo made from
//! the daemon's metadata (signed when a key is given), what the copy asks of the receiver, and
//! the count of what a copy did.

use cairn_api::PathInfo;
use cairn_nix::hash::Hash;
use cairn_nix::narinfo::NarInfo;
use cairn_nix::signing::SecretKey;
use cairn_nix::StoreDir;

/// What a copy to a Nix store over SSH asks of it (`nix copy`'s `--no-check-sigs` and `-s`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Checks {
    pub check_sigs: bool,
    pub substitute_on_destination: bool,
}

impl Default for Checks {
    fn default() -> Self {
        Checks { check_sigs: true, substitute_on_destination: false }
    }
}

/// What a copy did.
pub struct Copied {
    pub written: usize,
    pub skipped: usize,
    pub bytes: u64,
}

/// A path's narinfo (without file fields), signed with `key` if given.
pub(crate) fn narinfo_of(store_dir: &StoreDir, info: &PathInfo, key: Option<&SecretKey>) -> anyhow::Result<NarInfo> {
    let mut narinfo = NarInfo {
        store_path: store_dir.parse(&info.path)?,
        url: String::new(),
        compression: "none".into(),
        file_hash: None,
        file_size: None,
        nar_hash: Hash::parse_prefixed(&info.nar_hash)?,
        nar_size: info.nar_size,
        references: info.references.iter().map(|r| store_dir.parse(r)).collect::<Result<_, _>>()?,
        deriver: info.deriver.as_deref().map(|d| store_dir.parse(d)).transpose()?,
        system: None,
        signatures: info.signatures.clone(),
        ca: info.ca.clone(),
        extra: Vec::new(),
    };
    if let Some(k) = key {
        narinfo.sign(store_dir, k)?;
    }
    Ok(narinfo)
}
