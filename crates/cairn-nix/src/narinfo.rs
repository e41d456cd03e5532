//! `.narinfo` files and `nix-cache-info`, the metadata of Nix binary caches.
//!
//! A narinfo is `Key: value` lines. Nix requires `StorePath`, `URL`, `NarHash` and `NarSize`;
//! `Compression` defaults to `bzip2` when absent (caches from before the field); `References`
//! and `Deriver` are base names; `Deriver: unknown-deriver` means none; `Sig` may repeat. Fields
//! this parser does not know are kept in order and written back, never an error, so that a
//! newer cache's narinfo still loads. Values come from the network: every field is checked
//! (store paths parsed, hashes decoded, sizes numeric) before anything trusts it.

use std::collections::BTreeSet;

use thiserror::Error;

use crate::hash::{Encoding, Hash};
use crate::signing::{self, PublicKey, SecretKey};
use crate::store_path::{StoreDir, StorePath};

/// Why a narinfo or cache info was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NarInfoError {
    #[error("narinfo line {line} is not 'Key: value'")]
    Line { line: usize },
    #[error("narinfo lacks the required field '{0}'")]
    Missing(&'static str),
    #[error("narinfo field '{field}' appears twice")]
    Duplicate { field: &'static str },
    #[error("narinfo field '{field}': {detail}")]
    Field { field: &'static str, detail: String },
    #[error("binary cache's store directory is '{theirs}', ours is '{ours}'")]
    StoreDirMismatch { theirs: String, ours: String },
}

pub type Result<T> = std::result::Result<T, NarInfoError>;

/// A parsed `.narinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Relative to the cache (`nar/<filehash>.nar.xz`).
    pub url: String,
    /// `none`, `xz`, `zstd`, `bzip2`, `br`, …
    pub compression: String,
    pub file_hash: Option<Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    pub signatures: Vec<String>,
    pub ca: Option<String>,
    /// Fields this parser does not know, in order.
    pub extra: Vec<(String, String)>,
}

fn field<T, E: std::fmt::Display>(name: &'static str, r: std::result::Result<T, E>) -> Result<T> {
    r.map_err(|e| NarInfoError::Field { field: name, detail: e.to_string() })
}

fn base_name(name: &'static str, dir: &StoreDir, s: &str) -> Result<StorePath> {
    // References and derivers are base names; accept full paths in this store too.
    let s = s.strip_prefix(dir.as_str()).and_then(|r| r.strip_prefix('/')).unwrap_or(s);
    field(name, StorePath::from_base_name(s))
}

fn hash(name: &'static str, s: &str) -> Result<Hash> {
    field(name, Hash::parse_prefixed(s))
}

fn size(name: &'static str, s: &str) -> Result<u64> {
    field(name, s.parse::<u64>())
}

impl NarInfo {
    /// Parses a narinfo of a cache whose store directory is `dir`.
    pub fn parse(dir: &StoreDir, text: &str) -> Result<NarInfo> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let (mut file_hash, mut file_size, mut nar_hash, mut nar_size) = (None, None, None, None);
        let mut references = BTreeSet::new();
        let (mut deriver, mut system, mut ca) = (None, None, None);
        let mut signatures = Vec::new();
        let mut extra = Vec::new();
        fn once<T>(slot: &mut Option<T>, name: &'static str, v: T) -> Result<()> {
            if slot.replace(v).is_some() {
                return Err(NarInfoError::Duplicate { field: name });
            }
            Ok(())
        }
        // Lines end at '\n' alone, as Nix reads them: a '\r' is part of a value (so a CRLF
        // narinfo is refused, as by Nix), and every value renders back as it was read.
        for (i, line) in text.split('\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(": ")
                .or_else(|| line.strip_suffix(':').map(|k| (k, "")))
                .ok_or(NarInfoError::Line { line: i + 1 })?;
            match key {
                "StorePath" => once(&mut store_path, "StorePath", field("StorePath", dir.parse(value))?)?,
                "URL" => once(&mut url, "URL", value.to_owned())?,
                "Compression" => once(&mut compression, "Compression", value.to_owned())?,
                "FileHash" => once(&mut file_hash, "FileHash", hash("FileHash", value)?)?,
                "FileSize" => once(&mut file_size, "FileSize", size("FileSize", value)?)?,
                "NarHash" => once(&mut nar_hash, "NarHash", hash("NarHash", value)?)?,
                "NarSize" => once(&mut nar_size, "NarSize", size("NarSize", value)?)?,
                "References" => {
                    for r in value.split_whitespace() {
                        references.insert(base_name("References", dir, r)?);
                    }
                }
                "Deriver" if value == "unknown-deriver" => {}
                "Deriver" => once(&mut deriver, "Deriver", base_name("Deriver", dir, value)?)?,
                "System" => once(&mut system, "System", value.to_owned())?,
                "Sig" => signatures.push(value.to_owned()),
                "CA" => once(&mut ca, "CA", value.to_owned())?,
                other => extra.push((other.to_owned(), value.to_owned())),
            }
        }
        let url = url.ok_or(NarInfoError::Missing("URL"))?;
        if url.is_empty() {
            return Err(NarInfoError::Field { field: "URL", detail: "empty".into() });
        }
        Ok(NarInfo {
            store_path: store_path.ok_or(NarInfoError::Missing("StorePath"))?,
            url,
            compression: compression.filter(|c| !c.is_empty()).unwrap_or_else(|| "bzip2".to_owned()),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size: nar_size.ok_or(NarInfoError::Missing("NarSize"))?,
            references,
            deriver,
            system,
            signatures,
            ca,
            extra,
        })
    }

    /// The narinfo's text, fields in the order Nix writes them.
    pub fn render(&self, dir: &StoreDir) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: &str| {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push('\n');
        };
        line("StorePath", &dir.display(&self.store_path));
        line("URL", &self.url);
        line("Compression", &self.compression);
        if let Some(h) = &self.file_hash {
            line("FileHash", &h.to_prefixed(Encoding::Nix32));
        }
        if let Some(s) = self.file_size {
            line("FileSize", &s.to_string());
        }
        line("NarHash", &self.nar_hash.to_prefixed(Encoding::Nix32));
        line("NarSize", &self.nar_size.to_string());
        let refs: Vec<String> = self.references.iter().map(StorePath::base_name).collect();
        line("References", &refs.join(" "));
        if let Some(d) = &self.deriver {
            line("Deriver", &d.base_name());
        }
        if let Some(s) = &self.system {
            line("System", s);
        }
        for s in &self.signatures {
            line("Sig", s);
        }
        if let Some(c) = &self.ca {
            line("CA", c);
        }
        for (k, v) in &self.extra {
            line(k, v);
        }
        out
    }

    /// What this path's signatures cover.
    pub fn fingerprint(&self, dir: &StoreDir) -> signing::Result<String> {
        signing::fingerprint(dir, &self.store_path, &self.nar_hash, self.nar_size, &self.references)
    }

    /// Whether one of the signatures is by one of `keys` and valid.
    pub fn is_signed_by(&self, dir: &StoreDir, keys: &[PublicKey]) -> bool {
        let Ok(fp) = self.fingerprint(dir) else { return false };
        self.signatures.iter().any(|s| keys.iter().any(|k| k.verifies(&fp, s)))
    }

    /// Adds `key`'s signature (replacing an earlier one by the same key name).
    pub fn sign(&mut self, dir: &StoreDir, key: &SecretKey) -> signing::Result<()> {
        let sig = key.sign(&self.fingerprint(dir)?);
        let prefix = format!("{}:", key.name);
        self.signatures.retain(|s| !s.starts_with(&prefix));
        self.signatures.push(sig);
        Ok(())
    }
}

/// A cache's `nix-cache-info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: String,
    pub want_mass_query: bool,
    /// Lower is tried first; Nix's default is 50.
    pub priority: u32,
}

impl CacheInfo {
    /// Parses a `nix-cache-info` and checks that the cache serves our store directory.
    pub fn parse(ours: &StoreDir, text: &str) -> Result<CacheInfo> {
        let mut info = CacheInfo { store_dir: ours.as_str().to_owned(), want_mass_query: false, priority: 50 };
        for line in text.lines() {
            let Some((k, v)) = line.split_once(':') else { continue };
            let v = v.trim();
            match k.trim() {
                "StoreDir" => info.store_dir = v.to_owned(),
                "WantMassQuery" => info.want_mass_query = v == "1",
                "Priority" => info.priority = field("Priority", v.parse::<u32>())?,
                _ => {}
            }
        }
        if info.store_dir != ours.as_str() {
            return Err(NarInfoError::StoreDirMismatch { theirs: info.store_dir, ours: ours.as_str().to_owned() });
        }
        Ok(info)
    }

    pub fn render(&self) -> String {
        format!(
            "StoreDir: {}\nWantMassQuery: {}\nPriority: {}\n",
            self.store_dir,
            u8::from(self.want_mass_query),
            self.priority
        )
    }
}

#[cfg(test)]
mod tests;
