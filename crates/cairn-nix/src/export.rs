//! The framing of `nix-store --export` streams.
//!
//! An export stream is a sequence of store objects, each introduced by the number 1 and made of
//! the path's NAR followed by a trailer; the number 0 ends the stream:
//!
//! ```text
//! stream  = { 1 nar trailer } 0
//! trailer = 0x4558494e path <u64 n> { reference }^n deriver ( 0 | 1 signature )
//! ```
//!
//! The trailer's last field is a legacy signature flag (Nix writes 0 and ignores a signature on
//! import). The stream carries no hash: an importer computes the NAR hash as it reads. Nix writes
//! paths in topological order (references before referrers), which lets an importer check each
//! path's references as it arrives.

use std::io::{self, Read, Write};

use thiserror::Error;

use crate::wire::{read_bytes, read_u64, write_bytes, write_u64, WireError};

/// The magic number that opens a trailer ("NIXE").
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

/// Longest path string accepted in a trailer.
const MAX_PATH_LEN: usize = 4096;
/// Most references accepted for one path (far beyond any real closure's direct references).
const MAX_REFERENCES: u64 = 1 << 20;

/// Why an export stream was refused.
#[derive(Debug, Error)]
pub enum ExportError {
    #[error("not an export stream: expected 0 or 1 before a path, found {0}")]
    BadMarker(u64),
    #[error("export stream: bad trailer magic {0:#x}")]
    BadMagic(u64),
    #[error("export stream: a path has {0} references, more than allowed")]
    TooManyReferences(u64),
    #[error("export stream: {what} is not UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("export stream: {what}: {source}")]
    Wire {
        what: &'static str,
        #[source]
        source: WireError,
    },
}

/// What follows a path's NAR in an export stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportTrailer {
    pub path: String,
    pub references: Vec<String>,
    pub deriver: Option<String>,
}

/// Writes the marker that says another path follows.
pub fn write_next_marker(w: &mut impl Write) -> io::Result<()> {
    write_u64(w, 1)
}

/// Writes the marker that ends the stream.
pub fn write_end_marker(w: &mut impl Write) -> io::Result<()> {
    write_u64(w, 0)
}

/// Writes a trailer (after the NAR).
pub fn write_trailer(w: &mut impl Write, t: &ExportTrailer) -> io::Result<()> {
    write_u64(w, EXPORT_MAGIC)?;
    write_bytes(w, t.path.as_bytes())?;
    write_u64(w, t.references.len() as u64)?;
    for r in &t.references {
        write_bytes(w, r.as_bytes())?;
    }
    write_bytes(w, t.deriver.as_deref().unwrap_or("").as_bytes())?;
    write_u64(w, 0)
}

/// Reads a marker: `true` if a path follows, `false` at the end of the stream.
pub fn read_marker(r: &mut impl Read) -> Result<bool, ExportError> {
    match read_u64(r).map_err(|e| ExportError::Wire { what: "marker", source: e.into() })? {
        0 => Ok(false),
        1 => Ok(true),
        n => Err(ExportError::BadMarker(n)),
    }
}

fn read_string(r: &mut impl Read, what: &'static str) -> Result<String, ExportError> {
    let b = read_bytes(r, MAX_PATH_LEN).map_err(|source| ExportError::Wire { what, source })?;
    String::from_utf8(b).map_err(|_| ExportError::NotUtf8 { what })
}

/// Reads a trailer (after the NAR).
pub fn read_trailer(r: &mut impl Read) -> Result<ExportTrailer, ExportError> {
    let wire = |what| move |e: io::Error| ExportError::Wire { what, source: e.into() };
    let magic = read_u64(r).map_err(wire("magic"))?;
    if magic != EXPORT_MAGIC {
        return Err(ExportError::BadMagic(magic));
    }
    let path = read_string(r, "path")?;
    let n = read_u64(r).map_err(wire("reference count"))?;
    if n > MAX_REFERENCES {
        return Err(ExportError::TooManyReferences(n));
    }
    let references = (0..n).map(|_| read_string(r, "reference")).collect::<Result<Vec<_>, _>>()?;
    let deriver = read_string(r, "deriver")?;
    match read_u64(r).map_err(wire("signature flag"))? {
        0 => {}
        1 => {
            read_bytes(r, 1 << 16).map_err(|source| ExportError::Wire { what: "signature", source })?;
        }
        n => return Err(ExportError::BadMarker(n)),
    }
    Ok(ExportTrailer { path, references, deriver: (!deriver.is_empty()).then_some(deriver) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn trailer_round_trip_and_errors() {
        let t = ExportTrailer {
            path: "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo".into(),
            references: vec!["/nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz".into()],
            deriver: None,
        };
        let mut out = Vec::new();
        write_trailer(&mut out, &t).unwrap();
        assert_eq!(read_trailer(&mut &out[..]).unwrap(), t);
        out[0] ^= 1;
        assert!(matches!(read_trailer(&mut &out[..]), Err(ExportError::BadMagic(_))));
        assert!(matches!(read_marker(&mut &7u64.to_le_bytes()[..]), Err(ExportError::BadMarker(7))));
        assert!(matches!(read_marker(&mut &[1u8, 0][..]), Err(ExportError::Wire { .. })));
    }

    proptest! {
        #[test]
        fn trailer_parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut with_magic = EXPORT_MAGIC.to_le_bytes().to_vec();
            with_magic.extend(&bytes);
            let _ = read_trailer(&mut &with_magic[..]);
            let _ = read_trailer(&mut &bytes[..]);
        }
    }
}
