//! Writing NARs from a stream of events.

use std::io::{self, Read, Write};

use thiserror::Error;

use super::{valid_entry_name, MAGIC};
use crate::wire::{padding, write_bytes, write_u64};

/// Why a NAR could not be written.
#[derive(Debug, Error)]
pub enum NarWriteError {
    #[error("entry name {0:?} is not allowed in a NAR")]
    BadName(String),
    #[error("entry {name:?} is not sorted after {prev:?}")]
    Unsorted { prev: String, name: String },
    #[error("a directory entry needs a name, and the root must have none")]
    Nesting,
    #[error("file {name:?} was announced with {expected} bytes but had {actual}")]
    SizeMismatch { name: String, expected: u64, actual: u64 },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Writes a NAR to `W`, one event at a time: [`regular`](Self::regular),
/// [`symlink`](Self::symlink), [`begin_directory`](Self::begin_directory) …
/// [`end_directory`](Self::end_directory). Children must come in byte order of their names;
/// the writer checks it, so it cannot produce a NAR that Nix would reject.
pub struct NarWriter<W: Write> {
    w: W,
    /// One frame per open directory: the last entry name written in it.
    stack: Vec<Option<Vec<u8>>>,
    root_done: bool,
    buf: Vec<u8>,
}

impl<W: Write> NarWriter<W> {
    /// Starts a NAR by writing its magic.
    pub fn new(mut w: W) -> io::Result<Self> {
        write_bytes(&mut w, MAGIC)?;
        Ok(NarWriter { w, stack: Vec::new(), root_done: false, buf: Vec::new() })
    }

    fn open_node(&mut self, name: Option<&[u8]>) -> Result<(), NarWriteError> {
        match (name, self.stack.last_mut()) {
            (None, None) if !self.root_done => {}
            (Some(name), Some(last)) => {
                if !valid_entry_name(name) {
                    return Err(NarWriteError::BadName(String::from_utf8_lossy(name).into_owned()));
                }
                if let Some(prev) = last {
                    if prev.as_slice() >= name {
                        return Err(NarWriteError::Unsorted {
                            prev: String::from_utf8_lossy(prev).into_owned(),
                            name: String::from_utf8_lossy(name).into_owned(),
                        });
                    }
                }
                *last = Some(name.to_vec());
                write_bytes(&mut self.w, b"entry")?;
                write_bytes(&mut self.w, b"(")?;
                write_bytes(&mut self.w, b"name")?;
                write_bytes(&mut self.w, name)?;
                write_bytes(&mut self.w, b"node")?;
            }
            _ => return Err(NarWriteError::Nesting),
        }
        write_bytes(&mut self.w, b"(")?;
        write_bytes(&mut self.w, b"type")?;
        Ok(())
    }

    fn close_node(&mut self) -> Result<(), NarWriteError> {
        write_bytes(&mut self.w, b")")?;
        if self.stack.is_empty() {
            self.root_done = true;
        } else {
            write_bytes(&mut self.w, b")")?; // closes the directory entry
        }
        Ok(())
    }

    /// A regular file's node up to its contents.
    fn begin_regular(&mut self, name: Option<&[u8]>, executable: bool, size: u64) -> Result<(), NarWriteError> {
        self.open_node(name)?;
        write_bytes(&mut self.w, b"regular")?;
        if executable {
            write_bytes(&mut self.w, b"executable")?;
            write_bytes(&mut self.w, b"")?;
        }
        write_bytes(&mut self.w, b"contents")?;
        write_u64(&mut self.w, size)?;
        Ok(())
    }

    /// A regular file's node after its `size` bytes of contents.
    fn end_regular(&mut self, size: u64) -> Result<(), NarWriteError> {
        self.w.write_all(&[0u8; 8][..padding(size)])?;
        self.close_node()
    }

    /// Writes a regular file of `size` bytes read from `contents`.
    pub fn regular(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        size: u64,
        contents: &mut impl Read,
    ) -> Result<(), NarWriteError> {
        self.begin_regular(name, executable, size)?;
        if self.buf.is_empty() {
            self.buf = vec![0u8; 256 * 1024];
        }
        let mut left = size;
        while left > 0 {
            let want = left.min(self.buf.len() as u64) as usize;
            let n = contents.read(&mut self.buf[..want])?;
            if n == 0 {
                return Err(NarWriteError::SizeMismatch {
                    name: String::from_utf8_lossy(name.unwrap_or(b"")).into_owned(),
                    expected: size,
                    actual: size - left,
                });
            }
            self.w.write_all(&self.buf[..n])?;
            left -= n as u64;
        }
        self.end_regular(size)
    }

    /// Writes a regular file of `size` bytes given as chunks, each written straight through
    /// (no copy into a buffer of the writer's: a hasher behind it reads the chunks themselves).
    pub fn regular_from_chunks<C: AsRef<[u8]>>(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        size: u64,
        chunks: impl IntoIterator<Item = C>,
    ) -> Result<(), NarWriteError> {
        self.begin_regular(name, executable, size)?;
        let mut written = 0u64;
        for c in chunks {
            let c = c.as_ref();
            written += c.len() as u64;
            if written > size {
                break;
            }
            self.w.write_all(c)?;
        }
        if written != size {
            return Err(NarWriteError::SizeMismatch {
                name: String::from_utf8_lossy(name.unwrap_or(b"")).into_owned(),
                expected: size,
                actual: written,
            });
        }
        self.end_regular(size)
    }

    /// Writes a regular file's node without its `size` bytes of contents: `mark` is handed the
    /// sink where they belong (a NAR layout records "the file's bytes go here" and moves on).
    pub fn regular_elsewhere(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        size: u64,
        mark: impl FnOnce(&mut W) -> io::Result<()>,
    ) -> Result<(), NarWriteError> {
        self.begin_regular(name, executable, size)?;
        mark(&mut self.w)?;
        self.end_regular(size)
    }

    /// Writes a symlink.
    pub fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), NarWriteError> {
        self.open_node(name)?;
        write_bytes(&mut self.w, b"symlink")?;
        write_bytes(&mut self.w, b"target")?;
        write_bytes(&mut self.w, target)?;
        self.close_node()
    }

    /// Opens a directory; its entries follow, then [`end_directory`](Self::end_directory).
    pub fn begin_directory(&mut self, name: Option<&[u8]>) -> Result<(), NarWriteError> {
        self.open_node(name)?;
        write_bytes(&mut self.w, b"directory")?;
        self.stack.push(None);
        Ok(())
    }

    /// Closes the innermost open directory.
    pub fn end_directory(&mut self) -> Result<(), NarWriteError> {
        if self.stack.pop().is_none() {
            return Err(NarWriteError::Nesting);
        }
        self.close_node()
    }

    /// Finishes the NAR and returns the writer; fails if a directory is still open or nothing was
    /// written.
    pub fn finish(mut self) -> Result<W, NarWriteError> {
        if !self.stack.is_empty() || !self.root_done {
            return Err(NarWriteError::Nesting);
        }
        self.w.flush()?;
        Ok(self.w)
    }
}
