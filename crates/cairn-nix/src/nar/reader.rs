//! A validating pull parser for NARs.

use std::io::{self, Read, Write};

use thiserror::Error;

use super::{valid_entry_name, MAGIC};
use crate::wire::{read_bytes, read_padding, read_u64, WireError};

/// Bounds on what a NAR may contain; they keep hostile input from exhausting memory or stack.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deepest directory nesting accepted. Default 256: deeper than any real tree (Linux's
    /// `PATH_MAX` of 4096 bytes allows at most 2048 levels of one-character names, but no
    /// package comes near 100).
    pub max_depth: usize,
    /// Longest entry name in bytes. Default 255, Linux's `NAME_MAX`.
    pub max_name_len: usize,
    /// Longest symlink target in bytes. Default 4095, Linux's `PATH_MAX` less the NUL.
    pub max_target_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_depth: 256, max_name_len: 255, max_target_len: 4095 }
    }
}

/// Why a NAR was refused. Every message names the problem so that a user can tell a truncated
/// download from a forged archive.
#[derive(Debug, Error)]
pub enum NarError {
    #[error("not a NAR: bad magic")]
    BadMagic,
    #[error("malformed NAR: expected {expected:?}, found {found:?}")]
    UnexpectedTag { expected: &'static str, found: String },
    #[error("malformed NAR: unknown node type {0:?}")]
    UnknownType(String),
    #[error("malformed NAR: invalid entry name {0:?}")]
    BadName(String),
    #[error("malformed NAR: entry {name:?} is not sorted after {prev:?}")]
    Unsorted { prev: String, name: String },
    #[error("malformed NAR: duplicate entry {0:?}")]
    Duplicate(String),
    #[error("malformed NAR: directories nested deeper than {0} levels")]
    TooDeep(usize),
    #[error("malformed NAR: invalid symlink target {0:?}")]
    BadTarget(String),
    #[error("malformed NAR: truncated")]
    Truncated,
    #[error("malformed NAR: {what} of {len} bytes exceeds the limit of {max}")]
    TooLong { what: &'static str, len: u64, max: usize },
    #[error("malformed NAR: non-zero padding")]
    BadPadding,
    #[error("reading NAR: {0}")]
    Io(#[source] io::Error),
}

impl NarError {
    fn from_wire(e: WireError, what: &'static str) -> NarError {
        match e {
            WireError::Truncated => NarError::Truncated,
            WireError::TooLong { len, max } => NarError::TooLong { what, len, max },
            WireError::BadPadding => NarError::BadPadding,
            WireError::Io(e) => NarError::Io(e),
        }
    }
}

impl From<io::Error> for NarError {
    fn from(e: io::Error) -> Self {
        NarError::from_wire(e.into(), "data")
    }
}

/// One step of a NAR, in archive order. `name` is `None` for the root node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarEvent {
    /// A regular file; its `size` bytes are read next with [`NarReader::read_contents`] (or are
    /// skipped by the following [`NarReader::next_event`]).
    Regular {
        name: Option<Vec<u8>>,
        executable: bool,
        size: u64,
    },
    Symlink {
        name: Option<Vec<u8>>,
        target: Vec<u8>,
    },
    /// A directory opens; its entries follow, then [`NarEvent::EndDirectory`].
    Directory {
        name: Option<Vec<u8>>,
    },
    EndDirectory,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Root,
    InDirectory,
    Contents { remaining: u64, size: u64 },
    Done,
}

/// A streaming NAR parser. Give it a buffered reader: it reads tags eight bytes at a time.
/// It never reads past the end of the NAR, so NARs embedded in other streams (export streams)
/// parse in place.
pub struct NarReader<R: Read> {
    r: R,
    limits: Limits,
    /// One frame per open directory: the last entry name seen in it.
    stack: Vec<Option<Vec<u8>>>,
    state: State,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl<R: Read> NarReader<R> {
    /// Reads and checks the magic.
    pub fn new(mut r: R, limits: Limits) -> Result<Self, NarError> {
        match read_bytes(&mut r, 16) {
            Ok(m) if m == MAGIC => {}
            Ok(_) | Err(WireError::TooLong { .. }) | Err(WireError::BadPadding) => return Err(NarError::BadMagic),
            Err(e) => return Err(NarError::from_wire(e, "magic")),
        }
        Ok(NarReader { r, limits, stack: Vec::new(), state: State::Root })
    }

    fn read_tag(&mut self) -> Result<Vec<u8>, NarError> {
        read_bytes(&mut self.r, 16).map_err(|e| NarError::from_wire(e, "tag"))
    }

    fn expect(&mut self, tag: &'static str) -> Result<(), NarError> {
        let got = self.read_tag()?;
        if got != tag.as_bytes() {
            return Err(NarError::UnexpectedTag { expected: tag, found: lossy(&got) });
        }
        Ok(())
    }

    /// Called when a node's closing `)` has been read.
    fn after_node(&mut self) -> Result<(), NarError> {
        if self.stack.is_empty() {
            self.state = State::Done;
        } else {
            self.expect(")")?; // closes the directory entry
            self.state = State::InDirectory;
        }
        Ok(())
    }

    fn read_node(&mut self, name: Option<Vec<u8>>) -> Result<NarEvent, NarError> {
        self.expect("type")?;
        let ty = self.read_tag()?;
        match ty.as_slice() {
            b"regular" => {
                let mut tag = self.read_tag()?;
                let mut executable = false;
                if tag == b"executable" {
                    self.expect("")?;
                    executable = true;
                    tag = self.read_tag()?;
                }
                if tag != b"contents" {
                    return Err(NarError::UnexpectedTag { expected: "contents", found: lossy(&tag) });
                }
                let size = read_u64(&mut self.r)?;
                self.state = State::Contents { remaining: size, size };
                Ok(NarEvent::Regular { name, executable, size })
            }
            b"symlink" => {
                self.expect("target")?;
                let target = read_bytes(&mut self.r, self.limits.max_target_len)
                    .map_err(|e| NarError::from_wire(e, "target"))?;
                if target.is_empty() || target.contains(&0) {
                    return Err(NarError::BadTarget(lossy(&target)));
                }
                self.expect(")")?;
                self.after_node()?;
                Ok(NarEvent::Symlink { name, target })
            }
            b"directory" => {
                if self.stack.len() >= self.limits.max_depth {
                    return Err(NarError::TooDeep(self.limits.max_depth));
                }
                self.stack.push(None);
                self.state = State::InDirectory;
                Ok(NarEvent::Directory { name })
            }
            other => Err(NarError::UnknownType(lossy(other))),
        }
    }

    /// The next event, or `None` once the NAR is complete.
    pub fn next_event(&mut self) -> Result<Option<NarEvent>, NarError> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Contents { remaining, size } => {
                    if remaining > 0 {
                        let n = io::copy(&mut (&mut self.r).take(remaining), &mut io::sink())?;
                        if n < remaining {
                            return Err(NarError::Truncated);
                        }
                    }
                    read_padding(&mut self.r, size).map_err(|e| NarError::from_wire(e, "contents"))?;
                    self.expect(")")?;
                    self.after_node()?;
                }
                State::Root => {
                    self.expect("(")?;
                    return self.read_node(None).map(Some);
                }
                State::InDirectory => {
                    let tag = self.read_tag()?;
                    match tag.as_slice() {
                        b"entry" => {
                            self.expect("(")?;
                            self.expect("name")?;
                            let name = read_bytes(&mut self.r, self.limits.max_name_len)
                                .map_err(|e| NarError::from_wire(e, "entry name"))?;
                            if !valid_entry_name(&name) {
                                return Err(NarError::BadName(lossy(&name)));
                            }
                            let last = self.stack.last_mut().expect("in a directory");
                            if let Some(prev) = last {
                                match prev.as_slice().cmp(&name) {
                                    std::cmp::Ordering::Less => {}
                                    std::cmp::Ordering::Equal => return Err(NarError::Duplicate(lossy(&name))),
                                    std::cmp::Ordering::Greater => {
                                        return Err(NarError::Unsorted { prev: lossy(prev), name: lossy(&name) })
                                    }
                                }
                            }
                            *last = Some(name.clone());
                            self.expect("node")?;
                            self.expect("(")?;
                            return self.read_node(Some(name)).map(Some);
                        }
                        b")" => {
                            self.stack.pop();
                            self.after_node()?;
                            return Ok(Some(NarEvent::EndDirectory));
                        }
                        _ => return Err(NarError::UnexpectedTag { expected: "entry", found: lossy(&tag) }),
                    }
                }
            }
        }
    }

    /// Reads contents of the current regular file into `buf`; 0 when it is exhausted.
    pub fn read_contents(&mut self, buf: &mut [u8]) -> Result<usize, NarError> {
        let State::Contents { remaining, size } = self.state else { return Ok(0) };
        if remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = remaining.min(buf.len() as u64) as usize;
        let n = self.r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(NarError::Truncated);
        }
        self.state = State::Contents { remaining: remaining - n as u64, size };
        Ok(n)
    }

    /// Copies the rest of the current regular file to `w`.
    pub fn copy_contents(&mut self, w: &mut impl Write, buf: &mut [u8]) -> Result<u64, NarError> {
        let mut total = 0;
        loop {
            let n = self.read_contents(buf)?;
            if n == 0 {
                return Ok(total);
            }
            w.write_all(&buf[..n]).map_err(NarError::Io)?;
            total += n as u64;
        }
    }

    /// Parses to the end, discarding everything: validates a NAR without a consumer.
    pub fn skip_to_end(&mut self) -> Result<(), NarError> {
        while self.next_event()?.is_some() {}
        Ok(())
    }
}
