//! Primitive values as the worker protocol carries them, with the limits that make hostile
//! input an error rather than an allocation.
//!
//! Everything on the wire is built of little-endian `u64`s and byte strings (a `u64` length,
//! the bytes, zeros up to a multiple of eight) — the same primitives as NARs, which
//! `cairn_nix::wire` provides (Nix 2.8: `src/libutil/serialise.{hh,cc}`). On top of them come
//! Nix's `worker_proto::read/write` instances (Nix 2.8: `remote-store.cc`, top): collections
//! are a count and their elements, store paths are printed absolute paths, and "optional"
//! paths and content addresses are the empty string when absent.
//!
//! Reading is defensive where Nix's is not: a length or count above [`Limits`] is refused
//! before anything is allocated, and a string's buffer only grows as its bytes actually
//! arrive, so a peer claiming 2⁶⁴ bytes costs nothing. Nix's `readInt` (an `unsigned int`)
//! refuses values above `u32::MAX`; [`read_u32`] does the same.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use cairn_nix::{ContentAddress, StoreDir, StorePath};

use crate::constants::ProtocolVersion;
use crate::error::{Error, Result};

/// Bounds on what a peer may make the reader hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest short string: store paths, names, hashes, signatures, option names and values.
    pub max_string: usize,
    /// Longest large string: `AddTextToStore` contents, derivation arguments and environment
    /// values, log lines and error messages.
    pub max_blob: usize,
    /// Most elements of one set, list or map.
    pub max_count: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_string: 1 << 20, max_blob: 256 << 20, max_count: 1 << 20 }
    }
}

/// What every encoder and decoder needs to know about the connection: the version in force,
/// the store directory paths are printed in, and the reader's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proto {
    pub version: ProtocolVersion,
    pub store_dir: StoreDir,
    pub limits: Limits,
}

impl Proto {
    pub fn new(version: ProtocolVersion, store_dir: StoreDir) -> Proto {
        Proto { version, store_dir, limits: Limits::default() }
    }

    /// Whether fields of protocol `1.minor` are on the wire.
    pub fn has(&self, minor: u8) -> bool {
        self.version.has(minor)
    }
}

/// Reads a little-endian `u64`.
pub fn read_u64(r: &mut impl Read) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads an `unsigned int` as Nix's `readInt` does: values above `u32::MAX` are refused.
pub fn read_u32(r: &mut impl Read, what: &'static str) -> Result<u32> {
    let n = read_u64(r)?;
    u32::try_from(n).map_err(|_| Error::IntegerTooLarge { what, value: n })
}

/// Reads a boolean: any non-zero `u64` is true, as in Nix.
pub fn read_bool(r: &mut impl Read) -> Result<bool> {
    Ok(read_u64(r)? != 0)
}

/// Writes a little-endian `u64`.
pub fn write_u64(w: &mut impl Write, n: u64) -> Result<()> {
    w.write_all(&n.to_le_bytes())?;
    Ok(())
}

/// Writes a boolean as 0 or 1.
pub fn write_bool(w: &mut impl Write, b: bool) -> Result<()> {
    write_u64(w, u64::from(b))
}

/// Reads a byte string of at most `max` bytes, allocating only as bytes arrive.
pub fn read_bytes(r: &mut impl Read, max: usize) -> Result<Vec<u8>> {
    let len = read_u64(r)?;
    if len > max as u64 {
        return Err(Error::TooLong { len, max });
    }
    let mut buf = Vec::with_capacity(len.min(64 * 1024) as usize);
    (&mut *r).take(len).read_to_end(&mut buf)?;
    if (buf.len() as u64) < len {
        return Err(Error::Truncated);
    }
    cairn_nix::wire::read_padding(r, len)?;
    Ok(buf)
}

/// Reads a UTF-8 string of at most `max` bytes.
pub fn read_string(r: &mut impl Read, max: usize, what: &'static str) -> Result<String> {
    String::from_utf8(read_bytes(r, max)?).map_err(|_| Error::NotUtf8 { what })
}

/// Writes a byte string with its length and padding.
pub fn write_bytes(w: &mut impl Write, s: &[u8]) -> Result<()> {
    cairn_nix::wire::write_bytes(w, s)?;
    Ok(())
}

/// Writes a string.
pub fn write_str(w: &mut impl Write, s: &str) -> Result<()> {
    write_bytes(w, s.as_bytes())
}

/// Reads a collection's element count, refusing counts over the limit.
pub fn read_count(r: &mut impl Read, limits: &Limits) -> Result<usize> {
    let n = read_u64(r)?;
    if n > limits.max_count as u64 {
        return Err(Error::TooMany { count: n, max: limits.max_count });
    }
    Ok(n as usize)
}

/// Writes a collection's element count.
pub fn write_count(w: &mut impl Write, n: usize) -> Result<()> {
    write_u64(w, n as u64)
}

/// Reads a short string under `proto`'s limit.
pub fn read_short(r: &mut impl Read, proto: &Proto, what: &'static str) -> Result<String> {
    read_string(r, proto.limits.max_string, what)
}

/// Reads a list of short strings (`Strings`).
pub fn read_strings(r: &mut impl Read, proto: &Proto, what: &'static str) -> Result<Vec<String>> {
    let n = read_count(r, &proto.limits)?;
    (0..n).map(|_| read_short(r, proto, what)).collect()
}

/// Reads a set of short strings (`StringSet`); duplicates collapse as in `std::set`.
pub fn read_string_set(r: &mut impl Read, proto: &Proto, what: &'static str) -> Result<BTreeSet<String>> {
    let n = read_count(r, &proto.limits)?;
    (0..n).map(|_| read_short(r, proto, what)).collect()
}

/// Writes strings with their count: a `Strings` or a `StringSet` (in the set's order).
pub fn write_strings<'a>(w: &mut impl Write, ss: impl ExactSizeIterator<Item = &'a String>) -> Result<()> {
    write_count(w, ss.len())?;
    for s in ss {
        write_str(w, s)?;
    }
    Ok(())
}

/// Reads an absolute store path in `proto`'s store directory.
pub fn read_path(r: &mut impl Read, proto: &Proto) -> Result<StorePath> {
    let s = read_short(r, proto, "store path")?;
    Ok(proto.store_dir.parse(&s)?)
}

/// Writes a store path as its absolute path.
pub fn write_path(w: &mut impl Write, proto: &Proto, p: &StorePath) -> Result<()> {
    write_str(w, &proto.store_dir.display(p))
}

/// Reads a store path or the empty string (`std::optional<StorePath>`).
pub fn read_opt_path(r: &mut impl Read, proto: &Proto) -> Result<Option<StorePath>> {
    let s = read_short(r, proto, "store path")?;
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(proto.store_dir.parse(&s)?))
    }
}

/// Writes a store path or the empty string.
pub fn write_opt_path(w: &mut impl Write, proto: &Proto, p: Option<&StorePath>) -> Result<()> {
    match p {
        Some(p) => write_path(w, proto, p),
        None => write_str(w, ""),
    }
}

/// Reads a `StorePathSet`.
pub fn read_path_set(r: &mut impl Read, proto: &Proto) -> Result<BTreeSet<StorePath>> {
    let n = read_count(r, &proto.limits)?;
    (0..n).map(|_| read_path(r, proto)).collect()
}

/// Writes a `StorePathSet`, in Nix's order (by base name).
pub fn write_path_set(w: &mut impl Write, proto: &Proto, paths: &BTreeSet<StorePath>) -> Result<()> {
    write_count(w, paths.len())?;
    for p in paths {
        write_path(w, proto, p)?;
    }
    Ok(())
}

/// Reads a content address or the empty string (`std::optional<ContentAddress>`).
pub fn read_opt_ca(r: &mut impl Read, proto: &Proto) -> Result<Option<ContentAddress>> {
    let s = read_short(r, proto, "content address")?;
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(s.parse()?))
    }
}

/// Writes a content address (`text:sha256:…`, `fixed:r:sha256:…`) or the empty string.
pub fn write_opt_ca(w: &mut impl Write, ca: Option<&ContentAddress>) -> Result<()> {
    match ca {
        Some(ca) => write_str(w, &ca.to_string()),
        None => write_str(w, ""),
    }
}

/// Reads a map of short strings; the first of duplicate keys wins, as with Nix's `emplace`.
pub fn read_string_map(r: &mut impl Read, proto: &Proto, what: &'static str) -> Result<BTreeMap<String, String>> {
    let n = read_count(r, &proto.limits)?;
    let mut map = BTreeMap::new();
    for _ in 0..n {
        let k = read_short(r, proto, what)?;
        let v = read_short(r, proto, what)?;
        map.entry(k).or_insert(v);
    }
    Ok(map)
}

/// Writes a map of strings with its count, in key order.
pub fn write_string_map(w: &mut impl Write, map: &BTreeMap<String, String>) -> Result<()> {
    write_count(w, map.len())?;
    for (k, v) in map {
        write_str(w, k)?;
        write_str(w, v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_lengths_cost_nothing() {
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        assert!(matches!(read_bytes(&mut &bytes[..], usize::MAX), Err(Error::Truncated)));
        bytes = (1u64 << 40).to_le_bytes().to_vec();
        assert!(matches!(read_bytes(&mut &bytes[..], 10), Err(Error::TooLong { .. })));
    }

    #[test]
    fn read_int_refuses_wide_values() {
        let bytes = (1u64 << 32).to_le_bytes();
        assert!(matches!(read_u32(&mut &bytes[..], "x"), Err(Error::IntegerTooLarge { .. })));
    }
}
