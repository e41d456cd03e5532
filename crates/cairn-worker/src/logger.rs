//! The logger channel: what the daemon sends between a request and its result.
//!
//! After reading a request the daemon sends any number of messages — log lines, structured
//! activities (protocol ≥ 1.20), requests for or deliveries of tunnelled data — and then
//! exactly one of `STDERR_LAST` (the result follows) or `STDERR_ERROR` (nothing follows).
//! Followed from Nix 2.8's `TunnelLogger`, `TunnelSink`, `TunnelSource` and the `Fields`
//! encoder in `src/libstore/daemon.cc` (writing), `RemoteStore::Connection::processStderr`
//! and `readFields` in `remote-store.cc` (reading), and `operator<<(Sink &, const Error &)` /
//! `readError` in `src/libutil/serialise.cc` (the error format of protocol ≥ 1.26):
//!
//! ```text
//! "Error", level, "Error" (the removed name), message, 0 (no position),
//! trace count, per trace: 0 (no position), hint
//! ```
//!
//! Older clients get the message and an exit status instead. Daemons must not send
//! activities or results to clients older than 1.20: Nix turns an activity's text into a log
//! line for them and drops the rest ([`StderrMessage::downgrade`] does the same).
//!
//! Log text is read lossily (invalid UTF-8 becomes U+FFFD): it is for display, and builders
//! print what they like. Everything else in this crate is strict.

use std::io::{Read, Write};

use crate::codec::{
    read_bytes, read_count, read_string, read_u32, read_u64, write_bytes, write_str, write_u64, Limits,
};
use crate::constants::*;
use crate::error::{Error, Result};

/// A field of an activity or result (Nix's `Logger::Field`: `tInt = 0`, `tString = 1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Int(u64),
    /// Bytes, as Nix sends them: a build log line is whatever the builder wrote, UTF-8 or not.
    String(Vec<u8>),
}

/// An error as the daemon reports it to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// The error's level (≥ 1.26 only; older clients do not receive it).
    pub level: Verbosity,
    /// The message, one or more lines, as Nix would print it after `error: `.
    pub message: String,
    /// Trace lines (≥ 1.26 only), outermost last as Nix sends them.
    pub traces: Vec<String>,
    /// The exit status the client should use (< 1.26 only; Nix's default is 1).
    pub exit_status: u32,
}

impl RemoteError {
    /// An error at level `Error` with exit status 1, as Nix's `Error(msg)`.
    pub fn new(message: impl Into<String>) -> RemoteError {
        RemoteError { level: Verbosity::Error, message: message.into(), traces: Vec::new(), exit_status: 1 }
    }
}

/// `text` without terminal escape sequences (Nix colours its messages: `ESC [ … m`) or other
/// control characters but newlines and tabs, as Nix's `filterANSIEscapes` shows another
/// daemon's words: what a remote machine says is shown, never obeyed by the terminal.
pub fn plain_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                // CSI: parameters and intermediates, up to a final byte in '@'..='~'.
                Some('[') => {
                    for d in chars.by_ref() {
                        if ('@'..='~').contains(&d) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ST (`ESC \`).
                Some(']') => {
                    while let Some(d) = chars.next() {
                        if d == '\x07' || (d == '\x1b' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// One message on the logger channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StderrMessage {
    /// A log line (`STDERR_NEXT`); Nix's daemon appends the newline itself.
    Next(String),
    /// The daemon asks for up to `len` bytes of a tunnelled source (`STDERR_READ`); the
    /// client answers with a byte string. Used by `ImportPaths` and `AddToStoreNar` 1.21–1.22.
    Read(u64),
    /// Bytes for the client's sink (`STDERR_WRITE`); used by `ExportPath`.
    Write(Vec<u8>),
    /// The request is done; its result follows (`STDERR_LAST`).
    Last,
    /// The request failed (`STDERR_ERROR`).
    Error(RemoteError),
    /// `STDERR_START_ACTIVITY` (≥ 1.20).
    StartActivity { id: u64, level: Verbosity, kind: ActivityType, text: String, fields: Vec<Field>, parent: u64 },
    /// `STDERR_STOP_ACTIVITY` (≥ 1.20).
    StopActivity { id: u64 },
    /// `STDERR_RESULT` (≥ 1.20): e.g. a build log line (`BuildLogLine`, one string field).
    Result { id: u64, kind: ResultType, fields: Vec<Field> },
}

fn write_fields(w: &mut impl Write, fields: &[Field]) -> Result<()> {
    write_u64(w, fields.len() as u64)?;
    for f in fields {
        match f {
            Field::Int(i) => {
                write_u64(w, 0)?;
                write_u64(w, *i)?;
            }
            Field::String(s) => {
                write_u64(w, 1)?;
                write_bytes(w, s)?;
            }
        }
    }
    Ok(())
}

fn read_text(r: &mut impl Read, max: usize) -> Result<String> {
    Ok(String::from_utf8_lossy(&read_bytes(r, max)?).into_owned())
}

fn read_fields(r: &mut impl Read, limits: &Limits) -> Result<Vec<Field>> {
    let n = read_count(r, limits)?;
    (0..n)
        .map(|_| match read_u64(r)? {
            0 => Ok(Field::Int(read_u64(r)?)),
            1 => Ok(Field::String(read_bytes(r, limits.max_blob)?)),
            t => Err(Error::BadValue { what: "field type", value: t }),
        })
        .collect()
}

impl StderrMessage {
    /// What a daemon may send a client of `version` instead of `self`: activities become a
    /// log line of their text (if any) for clients < 1.20, stops and results vanish.
    pub fn downgrade(self, version: ProtocolVersion) -> Option<StderrMessage> {
        if version.has(20) {
            return Some(self);
        }
        match self {
            StderrMessage::StartActivity { text, .. } if !text.is_empty() => {
                Some(StderrMessage::Next(format!("{text}...\n")))
            }
            StderrMessage::StartActivity { .. } | StderrMessage::StopActivity { .. } | StderrMessage::Result { .. } => {
                None
            }
            other => Some(other),
        }
    }

    /// Writes the message (daemon side) in the layout of `version`. Activities are written
    /// as given: use [`Self::downgrade`] first for old clients.
    pub fn write(&self, w: &mut impl Write, version: ProtocolVersion) -> Result<()> {
        match self {
            StderrMessage::Next(s) => {
                write_u64(w, STDERR_NEXT)?;
                write_str(w, s)
            }
            StderrMessage::Read(len) => {
                write_u64(w, STDERR_READ)?;
                write_u64(w, *len)
            }
            StderrMessage::Write(data) => {
                write_u64(w, STDERR_WRITE)?;
                write_bytes(w, data)
            }
            StderrMessage::Last => write_u64(w, STDERR_LAST),
            StderrMessage::Error(e) => {
                write_u64(w, STDERR_ERROR)?;
                if version.has(26) {
                    write_str(w, "Error")?;
                    write_u64(w, e.level.to_u64())?;
                    write_str(w, "Error")?;
                    write_str(w, &e.message)?;
                    write_u64(w, 0)?;
                    write_u64(w, e.traces.len() as u64)?;
                    for t in &e.traces {
                        write_u64(w, 0)?;
                        write_str(w, t)?;
                    }
                    Ok(())
                } else {
                    write_str(w, &e.message)?;
                    write_u64(w, u64::from(e.exit_status))
                }
            }
            StderrMessage::StartActivity { id, level, kind, text, fields, parent } => {
                write_u64(w, STDERR_START_ACTIVITY)?;
                write_u64(w, *id)?;
                write_u64(w, level.to_u64())?;
                write_u64(w, kind.to_u64())?;
                write_str(w, text)?;
                write_fields(w, fields)?;
                write_u64(w, *parent)
            }
            StderrMessage::StopActivity { id } => {
                write_u64(w, STDERR_STOP_ACTIVITY)?;
                write_u64(w, *id)
            }
            StderrMessage::Result { id, kind, fields } => {
                write_u64(w, STDERR_RESULT)?;
                write_u64(w, *id)?;
                write_u64(w, kind.to_u64())?;
                write_fields(w, fields)
            }
        }
    }

    /// Reads one message (client side) in the layout of `version`.
    pub fn read(r: &mut impl Read, version: ProtocolVersion, limits: &Limits) -> Result<StderrMessage> {
        let code = read_u64(r)?;
        Ok(match code {
            STDERR_NEXT => StderrMessage::Next(read_text(r, limits.max_blob)?),
            STDERR_READ => StderrMessage::Read(read_u64(r)?),
            STDERR_WRITE => StderrMessage::Write(read_bytes(r, limits.max_blob)?),
            STDERR_LAST => StderrMessage::Last,
            STDERR_ERROR if version.has(26) => {
                let kind = read_string(r, limits.max_string, "error type")?;
                if kind != "Error" {
                    return Err(Error::Malformed { what: "error type", value: kind });
                }
                let level = Verbosity::from_u64_clamped(read_u64(r)?);
                let _name = read_bytes(r, limits.max_string)?;
                let message = read_text(r, limits.max_blob)?;
                let have_pos = read_u64(r)?;
                if have_pos != 0 {
                    return Err(Error::BadValue { what: "error position", value: have_pos });
                }
                let n = read_count(r, limits)?;
                let mut traces = Vec::new();
                for _ in 0..n {
                    let have_pos = read_u64(r)?;
                    if have_pos != 0 {
                        return Err(Error::BadValue { what: "trace position", value: have_pos });
                    }
                    traces.push(read_text(r, limits.max_blob)?);
                }
                StderrMessage::Error(RemoteError { level, message, traces, exit_status: 1 })
            }
            STDERR_ERROR => {
                let message = read_text(r, limits.max_blob)?;
                let exit_status = read_u32(r, "exit status")?;
                StderrMessage::Error(RemoteError { level: Verbosity::Error, message, traces: Vec::new(), exit_status })
            }
            STDERR_START_ACTIVITY => StderrMessage::StartActivity {
                id: read_u64(r)?,
                level: Verbosity::from_u64_clamped(read_u64(r)?),
                kind: ActivityType::from_u64(read_u64(r)?),
                text: read_text(r, limits.max_blob)?,
                fields: read_fields(r, limits)?,
                parent: read_u64(r)?,
            },
            STDERR_STOP_ACTIVITY => StderrMessage::StopActivity { id: read_u64(r)? },
            STDERR_RESULT => StderrMessage::Result {
                id: read_u64(r)?,
                kind: ResultType::from_u64(read_u64(r)?),
                fields: read_fields(r, limits)?,
            },
            other => return Err(Error::UnknownMessage(other)),
        })
    }
}

/// Reads messages until `STDERR_LAST` (`Ok(Ok(()))`) or `STDERR_ERROR` (`Ok(Err(e))`),
/// handing every other message to `on_message` — the client's `processStderr`.
pub fn read_until_last(
    r: &mut impl Read,
    version: ProtocolVersion,
    limits: &Limits,
    mut on_message: impl FnMut(StderrMessage) -> Result<()>,
) -> Result<std::result::Result<(), RemoteError>> {
    loop {
        match StderrMessage::read(r, version, limits)? {
            StderrMessage::Last => return Ok(Ok(())),
            StderrMessage::Error(e) => return Ok(Err(e)),
            other => on_message(other)?,
        }
    }
}

#[cfg(test)]
mod plain_text_tests {
    use super::plain_text;

    #[test]
    fn a_remote_message_is_shown_without_its_terminal_escapes() {
        let nix = "\x1b[31;1merror:\x1b[0m builder for '\x1b[35;1m/nix/store/x-fail.drv\x1b[0m' failed\n       > out";
        assert_eq!(plain_text(nix), "error: builder for '/nix/store/x-fail.drv' failed\n       > out");
        // A title set through OSC, a bell, a carriage return and a lone escape: all dropped.
        assert_eq!(plain_text("a\x1b]0;owned\x07b\x1b]2;x\x1b\\c\x07\rd\x1bQe"), "abcde");
        assert_eq!(plain_text("tab\tand\nnewline stay"), "tab\tand\nnewline stay");
        assert_eq!(plain_text("unterminated \x1b[31"), "unterminated ");
    }
}
