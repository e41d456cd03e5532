//! The framing of a push stream (`cairn copy --to tcp://…` and `unix://…`): what the sender
//! writes and the receiver (`cairn_cache::push::receive`) reads, side by side so they cannot
//! drift.
//!
//! ```text
//! string "cairn-push-1"
//! per path, references first:  string NARINFO   then exactly NarSize bytes of NAR (unframed)
//! string ""                    (the end)
//! ```
//!
//! Strings are Nix's wire strings ([`super::write_bytes`]). The NAR is not framed because its
//! narinfo already says how long it is, and the receiver reads it with `take(nar_size)` straight
//! into the store's restore; a sender that sends fewer bytes fails the NAR parser, one that sends
//! more fails the next string. The narinfo is the binary-cache text with URL and compression of
//! an uncompressed NAR ([`narinfo`]).
//!
//! The writer side is three functions returning bytes rather than a `Write` adapter: the CLI
//! sends the frames as chunks of an async body between NAR chunks it reads from the daemon.

use std::io::{self, Read};

use super::{read_bytes, write_bytes, WireError};
use crate::narinfo::NarInfo;

/// The stream's first string.
pub const MAGIC: &[u8] = b"cairn-push-1";

/// Longest narinfo a reader accepts.
pub const MAX_NARINFO: usize = 1 << 20;

/// Why a push stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("not a push stream (it does not start with cairn-push-1)")]
    NotPush,
    #[error("not a push stream: {0}")]
    Wire(#[from] WireError),
    #[error("a narinfo is not UTF-8")]
    NotUtf8,
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 16);
    write_bytes(&mut v, s).expect("writing to a Vec cannot fail");
    v
}

/// The stream's first frame.
pub fn start() -> Vec<u8> {
    string(MAGIC)
}

/// The frame before a path's NAR: its narinfo's text.
pub fn entry(narinfo: &str) -> Vec<u8> {
    string(narinfo.as_bytes())
}

/// The stream's last frame.
pub fn end() -> Vec<u8> {
    string(b"")
}

/// The narinfo a pushed path is sent with: uncompressed, URL unused.
pub fn narinfo(mut info: NarInfo) -> NarInfo {
    info.url = "nar/pushed.nar".into();
    info.compression = "none".into();
    info.file_hash = None;
    info.file_size = None;
    info
}

/// Reads a push stream: [`PushReader::next_narinfo`] until `None`, reading each path's NAR
/// through [`PushReader::nar`] in between.
pub struct PushReader<R> {
    inner: R,
}

impl<R: Read> PushReader<R> {
    /// Checks the stream's first string.
    pub fn new(mut inner: R) -> Result<PushReader<R>, PushError> {
        if read_bytes(&mut inner, 64)? != MAGIC {
            return Err(PushError::NotPush);
        }
        Ok(PushReader { inner })
    }

    /// The next path's narinfo text, or `None` at the end of the stream.
    pub fn next_narinfo(&mut self) -> Result<Option<String>, PushError> {
        let text = read_bytes(&mut self.inner, MAX_NARINFO)?;
        if text.is_empty() {
            return Ok(None);
        }
        String::from_utf8(text).map(Some).map_err(|_| PushError::NotUtf8)
    }

    /// The NAR after a narinfo: at most `nar_size` bytes. Read it to its end (or drain it)
    /// before the next narinfo.
    pub fn nar(&mut self, nar_size: u64) -> io::Take<&mut R> {
        (&mut self.inner).take(nar_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A stream of `entries` as a sender writes it.
    fn write(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut out = start();
        for (info, nar) in entries {
            out.extend(entry(info));
            out.extend_from_slice(nar);
        }
        out.extend(end());
        out
    }

    fn read(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, PushError> {
        let mut r = PushReader::new(bytes)?;
        let mut out = Vec::new();
        while let Some(info) = r.next_narinfo()? {
            // The tests' "narinfos" are the NAR's length.
            let mut nar = Vec::new();
            r.nar(info.len() as u64 * 3).read_to_end(&mut nar).map_err(WireError::from)?;
            out.push((info, nar));
        }
        Ok(out)
    }

    #[test]
    fn frames_have_these_bytes() {
        let mut want = vec![12, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(b"cairn-push-1\0\0\0\0");
        assert_eq!(start(), want);
        assert_eq!(entry("ab"), [2, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', 0, 0, 0, 0, 0, 0]);
        assert_eq!(end(), [0; 8]);
    }

    #[test]
    fn other_streams_are_refused() {
        assert!(matches!(PushReader::new(&entry("cairn-push-2")[..]), Err(PushError::NotPush)));
        assert!(matches!(PushReader::new(&b"\x01"[..]), Err(PushError::Wire(WireError::Truncated))));
        let mut s = start();
        s.extend(entry("\u{ff}"));
        let at = s.len() - 8 + 1; // the second byte of "ÿ"'s UTF-8
        s[at] = 0xff;
        assert!(matches!(PushReader::new(&s[..]).unwrap().next_narinfo(), Err(PushError::NotUtf8)));
    }

    proptest! {
        #[test]
        fn what_is_written_is_read_back(infos in prop::collection::vec("[a-z]{0,20}", 0..6), seed: u8) {
            // Each NAR is three bytes per byte of its narinfo (the reader above relies on it).
            let entries: Vec<(String, Vec<u8>)> = infos
                .into_iter()
                .filter(|i| !i.is_empty())
                .map(|i| { let n = i.len() * 3; (i, (0..n).map(|k| seed.wrapping_add(k as u8)).collect()) })
                .collect();
            prop_assert_eq!(read(&write(&entries)).unwrap(), entries);
        }

        #[test]
        fn a_cut_stream_is_an_error(infos in prop::collection::vec("[a-z]{1,20}", 1..4), cut_at: prop::sample::Index) {
            let entries: Vec<(String, Vec<u8>)> =
                infos.into_iter().map(|i| { let n = i.len() * 3; (i, vec![7; n]) }).collect();
            let bytes = write(&entries);
            let cut = cut_at.index(bytes.len());
            prop_assert!(read(&bytes[..cut]).is_err());
        }
    }
}
