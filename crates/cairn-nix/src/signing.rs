//! Nix's signatures on store paths: ed25519 over a path's fingerprint.
//!
//! Keys are written `name:base64`, as `nix-store --generate-binary-cache-key` writes them: the
//! secret key is the 64-byte ed25519 key pair (seed, then public key), the public key its 32
//! bytes. A signature is `name:base64(64 bytes)` over [`fingerprint`]. Key generation takes the
//! seed from the caller, so that this crate stays free of I/O (randomness included).

use std::collections::BTreeSet;

use data_encoding::BASE64;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use thiserror::Error;

use crate::hash::{Encoding, Hash, HashAlgo};
use crate::store_path::{StoreDir, StorePath};

/// Why a key or signature was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SigningError {
    #[error("key or signature '{0}' is not of the form NAME:BASE64")]
    Form(String),
    #[error("key '{name}' has {len} bytes, {expected} expected{}", match (len, expected) {
        (32, 64) => " (this is a public key; a secret key is needed here)",
        (64, 32) => " (this is a secret key; a public key is needed here)",
        _ => "",
    })]
    Length { name: String, len: usize, expected: usize },
    #[error("secret key '{0}' does not match its own public half")]
    Mismatch(String),
    #[error("public key '{0}' is not a valid ed25519 point")]
    BadPoint(String),
    #[error("a fingerprint needs a SHA-256 NAR hash, not {0}")]
    NotSha256(String),
}

pub type Result<T> = std::result::Result<T, SigningError>;

/// `name:base64` split and decoded.
fn split(s: &str) -> Result<(&str, Vec<u8>)> {
    let (name, b64) = s.trim().split_once(':').ok_or_else(|| SigningError::Form(s.to_owned()))?;
    if name.is_empty() {
        return Err(SigningError::Form(s.to_owned()));
    }
    let bytes = BASE64.decode(b64.as_bytes()).map_err(|_| SigningError::Form(s.to_owned()))?;
    Ok((name, bytes))
}

/// What a path's signature covers: `1;<path>;<narHash>;<narSize>;<refs>`, with the NAR hash as
/// `sha256:<nix32>` and the references as full store paths joined by commas.
pub fn fingerprint(
    dir: &StoreDir,
    path: &StorePath,
    nar_hash: &Hash,
    nar_size: u64,
    references: &BTreeSet<StorePath>,
) -> Result<String> {
    if nar_hash.algo() != HashAlgo::Sha256 {
        return Err(SigningError::NotSha256(nar_hash.algo().to_string()));
    }
    let refs: Vec<String> = references.iter().map(|r| dir.display(r)).collect();
    Ok(format!("1;{};{};{nar_size};{}", dir.display(path), nar_hash.to_prefixed(Encoding::Nix32), refs.join(",")))
}

/// A public key that signatures are checked against (`trusted-public-keys`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn parse(s: &str) -> Result<PublicKey> {
        let (name, bytes) = split(s)?;
        let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| SigningError::Length {
            name: name.to_owned(),
            len: bytes.len(),
            expected: 32,
        })?;
        let key = VerifyingKey::from_bytes(&arr).map_err(|_| SigningError::BadPoint(name.to_owned()))?;
        Ok(PublicKey { name: name.to_owned(), key })
    }

    /// Whether `sig` (`name:base64`) is this key's signature of `fingerprint`. A signature by
    /// another key name is not.
    pub fn verifies(&self, fingerprint: &str, sig: &str) -> bool {
        let Ok((name, bytes)) = split(sig) else { return false };
        let Ok(arr) = <[u8; 64]>::try_from(bytes.as_slice()) else { return false };
        name == self.name
            && self.key.verify_strict(fingerprint.as_bytes(), &ed25519_dalek::Signature::from_bytes(&arr)).is_ok()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

/// A key that signs paths.
#[derive(Clone)]
pub struct SecretKey {
    pub name: String,
    key: SigningKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({:?})", self.name)
    }
}

impl SecretKey {
    /// A new key from 32 random bytes the caller supplies.
    pub fn from_seed(name: &str, seed: [u8; 32]) -> SecretKey {
        SecretKey { name: name.to_owned(), key: SigningKey::from_bytes(&seed) }
    }

    pub fn parse(s: &str) -> Result<SecretKey> {
        let (name, bytes) = split(s)?;
        let arr: [u8; 64] = bytes.as_slice().try_into().map_err(|_| SigningError::Length {
            name: name.to_owned(),
            len: bytes.len(),
            expected: 64,
        })?;
        let key = SigningKey::from_keypair_bytes(&arr).map_err(|_| SigningError::Mismatch(name.to_owned()))?;
        Ok(SecretKey { name: name.to_owned(), key })
    }

    pub fn public(&self) -> PublicKey {
        PublicKey { name: self.name.clone(), key: self.key.verifying_key() }
    }

    /// `name:base64` of the signature of `fingerprint`.
    pub fn sign(&self, fingerprint: &str) -> String {
        format!("{}:{}", self.name, BASE64.encode(&self.key.sign(fingerprint.as_bytes()).to_bytes()))
    }

    /// The secret key in Nix's file format.
    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.name, BASE64.encode(&self.key.to_keypair_bytes()))
    }
}
