//! The primitives of Nix's serialisation: little-endian `u64`s and length-prefixed byte strings
//! padded with zeros to a multiple of eight bytes. NAR archives and export streams are built of
//! nothing else. [`push`] frames cairn's own push streams with them.

use std::io::{self, Read, Write};

pub mod push;

/// Writes a `u64`, little-endian.
pub fn write_u64(w: &mut impl Write, n: u64) -> io::Result<()> {
    w.write_all(&n.to_le_bytes())
}

/// Zero bytes needed to pad `len` to a multiple of eight.
pub const fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// Writes a byte string: its length, its bytes, and zero padding.
pub fn write_bytes(w: &mut impl Write, s: &[u8]) -> io::Result<()> {
    write_u64(w, s.len() as u64)?;
    w.write_all(s)?;
    w.write_all(&[0u8; 8][..padding(s.len() as u64)])
}

/// Reads a `u64`, little-endian.
pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Why a wire string was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("unexpected end of input")]
    Truncated,
    #[error("string of {len} bytes exceeds the limit of {max}")]
    TooLong { len: u64, max: usize },
    #[error("non-zero padding")]
    BadPadding,
    #[error(transparent)]
    Io(io::Error),
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Truncated
        } else {
            WireError::Io(e)
        }
    }
}

/// Reads and checks zero padding after `len` bytes of payload.
pub fn read_padding(r: &mut impl Read, len: u64) -> Result<(), WireError> {
    let n = padding(len);
    if n > 0 {
        let mut pad = [0u8; 8];
        r.read_exact(&mut pad[..n])?;
        if pad[..n].iter().any(|&b| b != 0) {
            return Err(WireError::BadPadding);
        }
    }
    Ok(())
}

/// Reads a byte string of at most `max` bytes.
pub fn read_bytes(r: &mut impl Read, max: usize) -> Result<Vec<u8>, WireError> {
    let len = read_u64(r)?;
    if len > max as u64 {
        return Err(WireError::TooLong { len, max });
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    read_padding(r, len)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_padded() {
        let mut out = Vec::new();
        write_bytes(&mut out, b"abc").unwrap();
        assert_eq!(out, [3, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, 0, 0]);
        assert_eq!(read_bytes(&mut &out[..], 10).unwrap(), b"abc");
        assert!(matches!(read_bytes(&mut &out[..], 2), Err(WireError::TooLong { .. })));
        assert!(matches!(read_bytes(&mut &out[..12], 10), Err(WireError::Truncated)));
        out[15] = 1;
        assert!(matches!(read_bytes(&mut &out[..], 10), Err(WireError::BadPadding)));
    }
}
