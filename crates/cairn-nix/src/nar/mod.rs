//! NAR, the Nix ARchive: a canonical serialisation of a file system object.
//!
//! A NAR holds one regular file (with its executable bit), symlink or directory, and nothing
//! else: no timestamps, owners or other permissions. Directory entries are sorted by the bytes
//! of their names, strings are padded, and so every tree has exactly one NAR — which is why the
//! SHA-256 of a NAR identifies the tree (the "NAR hash").
//!
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( "regular" ["executable" ""] "contents" <bytes>
//!                        | "symlink" "target" <bytes>
//!                        | "directory" { "entry" "(" "name" <bytes> "node" node ")" } ) ")"
//! ```
//!
//! [`NarWriter`] produces NARs from events; [`NarReader`] is a pull parser that validates
//! everything an attacker could bend (magic, tags, padding, entry order, names, depth, lengths)
//! and streams file contents without buffering them. Because it refuses every non-canonical
//! encoding, the hash of the bytes it accepted equals the hash of the tree it describes.

mod reader;
mod writer;

pub use reader::{Limits, NarError, NarEvent, NarReader};
pub use writer::{NarWriteError, NarWriter};

/// The magic string every NAR starts with.
pub const MAGIC: &[u8] = b"nix-archive-1";

/// Checks a directory entry name: non-empty, not `.` or `..`, no `/` and no NUL.
pub fn valid_entry_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

/// Reads exactly one NAR from `r`, validating it, and writes every byte read to `copy`: how a
/// NAR sent bare on a stream (Nix's protocols send it without a length) is taken off it without
/// reading past its end. Returns its length; an error of `copy` is [`NarError::Io`].
pub fn copy_one(r: impl std::io::Read, copy: &mut dyn std::io::Write, limits: Limits) -> Result<u64, NarError> {
    let mut tee = Tee { inner: r, copy, count: 0 };
    NarReader::new(&mut tee, limits)?.skip_to_end()?;
    Ok(tee.count)
}

struct Tee<'a, R> {
    inner: R,
    copy: &'a mut dyn std::io::Write,
    count: u64,
}

impl<R: std::io::Read> std::io::Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
