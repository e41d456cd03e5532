//! The greeting that opens every connection, from either side.
//!
//! Followed from Nix 2.8's `processConnection` (`src/libstore/daemon.cc`, the daemon) and
//! `RemoteStore::initConnection` (`src/libstore/remote-store.cc`, the client), with the two
//! fields added since from Nix 2.24's `worker-protocol-connection.cc` and `worker-protocol.cc`
//! (`ClientHandshakeInfo`):
//!
//! ```text
//! client → WORKER_MAGIC_1                     daemon → WORKER_MAGIC_2, its version
//! client → its version
//!          (≥ 1.38) its feature set           daemon → (≥ 1.38) its feature set
//!          (≥ 1.14) CPU affinity: 0, or 1 and a CPU (obsolete, ignored)
//!          (≥ 1.11) reserve-space flag (obsolete, ignored)
//!                                             daemon → (≥ 1.33) its Nix version string
//!                                                      (≥ 1.35) whether it trusts the client
//!                                             daemon → startup log messages, STDERR_LAST
//! ```
//!
//! The version in force is the smaller of the two; every "≥" above is tested against it.
//! (Nix 2.8 itself has no trust field — it speaks 1.34 and the field came with 1.35 in Nix
//! 2.15 — and tests the peer's version rather than the minimum, which gives the same answers
//! because each side only tests the versions it knows.)
//!
//! Neither function sends or reads the startup log: the daemon ends the handshake with
//! [`StderrMessage::Last`](crate::logger::StderrMessage::Last) (or an error to refuse the
//! client), and the client reads messages until then (see
//! [`read_until_last`](crate::logger::read_until_last)).

use std::collections::BTreeSet;
use std::io::{Read, Write};

use crate::codec::{read_string, read_u64, write_bool, write_str, write_u64, Limits};
use crate::constants::{ProtocolVersion, TrustedFlag, WORKER_MAGIC_1, WORKER_MAGIC_2};
use crate::error::{Error, Result};

/// What the daemon says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    /// The newest version the daemon speaks; [`ProtocolVersion::MAX`] normally.
    pub version: ProtocolVersion,
    /// The Nix version string sent to clients ≥ 1.33 (`nix-daemon` sends e.g. `2.8.0`).
    pub nix_version: String,
    /// Whether the client is trusted, sent to clients ≥ 1.35; `None` for "unknown".
    pub trust: Option<TrustedFlag>,
    /// Protocol features offered to clients ≥ 1.38 (Nix 2.24 – 2.29 define none).
    pub features: BTreeSet<String>,
}

/// What the client says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The newest version the client speaks.
    pub version: ProtocolVersion,
    /// Protocol features asked for from daemons ≥ 1.38.
    pub features: BTreeSet<String>,
}

/// The daemon's side of a finished handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSession {
    /// The version in force: the smaller of the two.
    pub version: ProtocolVersion,
    /// The version the client announced.
    pub client_version: ProtocolVersion,
    /// Features both sides offered.
    pub features: BTreeSet<String>,
}

/// The client's side of a finished handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSession {
    /// The version in force: the smaller of the two.
    pub version: ProtocolVersion,
    /// The version the daemon announced.
    pub daemon_version: ProtocolVersion,
    /// Features both sides offered.
    pub features: BTreeSet<String>,
    /// The daemon's Nix version, from daemons ≥ 1.33.
    pub nix_version: Option<String>,
    /// Whether the daemon trusts us, from daemons ≥ 1.35.
    pub trust: Option<TrustedFlag>,
}

fn read_version(r: &mut impl Read) -> Result<ProtocolVersion> {
    let raw = read_u64(r)?;
    match ProtocolVersion::from_wire(raw) {
        Some(v) if v.major() == 1 => Ok(v),
        _ => Err(Error::UnsupportedVersion(raw)),
    }
}

fn read_features(r: &mut impl Read, limits: &Limits) -> Result<BTreeSet<String>> {
    let n = crate::codec::read_count(r, limits)?;
    (0..n).map(|_| read_string(r, limits.max_string, "feature")).collect()
}

fn write_features(w: &mut impl Write, features: &BTreeSet<String>) -> Result<()> {
    crate::codec::write_strings(w, features.iter())
}

/// Encodes `std::optional<TrustedFlag>`: 0 for unknown, else the flag.
pub fn write_trust(w: &mut impl Write, trust: Option<TrustedFlag>) -> Result<()> {
    write_u64(w, trust.map_or(0, TrustedFlag::to_u64))
}

/// Decodes `std::optional<TrustedFlag>`.
pub fn read_trust(r: &mut impl Read) -> Result<Option<TrustedFlag>> {
    match read_u64(r)? {
        0 => Ok(None),
        n => TrustedFlag::from_u64(n).map(Some).ok_or(Error::BadValue { what: "trusted flag", value: n }),
    }
}

/// The daemon's half: reads the client's greeting and answers it, up to (not including) the
/// startup log. Clients older than 1.10 are refused, as by `nix-daemon` 2.8.
pub fn server_handshake<S: Read + Write>(s: &mut S, hello: &ServerHello, limits: &Limits) -> Result<ServerSession> {
    let magic = read_u64(s)?;
    if magic != WORKER_MAGIC_1 {
        return Err(Error::BadMagic(magic));
    }
    write_u64(s, WORKER_MAGIC_2)?;
    write_u64(s, hello.version.to_wire())?;
    s.flush()?;
    let client_version = read_version(s)?;
    let version = client_version.min(hello.version);
    if version < ProtocolVersion::MIN_CLIENT {
        return Err(Error::UnsupportedVersion(client_version.to_wire()));
    }
    let mut features = BTreeSet::new();
    if version.has(38) {
        let theirs = read_features(s, limits)?;
        write_features(s, &hello.features)?;
        s.flush()?;
        features = theirs.intersection(&hello.features).cloned().collect();
    }
    if version.has(14) && read_u64(s)? != 0 {
        read_u64(s)?; // the obsolete CPU affinity
    }
    if version.has(11) {
        read_u64(s)?; // the obsolete reserve-space flag
    }
    if version.has(33) {
        write_str(s, &hello.nix_version)?;
    }
    if version.has(35) {
        write_trust(s, hello.trust)?;
    }
    s.flush()?;
    Ok(ServerSession { version, client_version, features })
}

/// The client's half: greets the daemon and reads its answer, up to (not including) the
/// startup log. Daemons older than 1.10 are refused, as by Nix 2.8's client.
pub fn client_handshake<S: Read + Write>(s: &mut S, hello: &ClientHello, limits: &Limits) -> Result<ClientSession> {
    write_u64(s, WORKER_MAGIC_1)?;
    s.flush()?;
    let magic = read_u64(s)?;
    if magic != WORKER_MAGIC_2 {
        return Err(Error::BadMagic(magic));
    }
    let daemon_version = read_version(s)?;
    if daemon_version < ProtocolVersion::MIN_DAEMON {
        return Err(Error::UnsupportedVersion(daemon_version.to_wire()));
    }
    let version = daemon_version.min(hello.version);
    write_u64(s, hello.version.to_wire())?;
    let mut features = BTreeSet::new();
    if version.has(38) {
        write_features(s, &hello.features)?;
        s.flush()?;
        let theirs = read_features(s, limits)?;
        features = theirs.intersection(&hello.features).cloned().collect();
    }
    if version.has(14) {
        write_u64(s, 0)?; // no CPU affinity
    }
    if version.has(11) {
        write_bool(s, false)?; // no reserved space
    }
    s.flush()?;
    let nix_version = if version.has(33) { Some(read_string(s, limits.max_string, "daemon version")?) } else { None };
    let trust = if version.has(35) { read_trust(s)? } else { None };
    Ok(ClientSession { version, daemon_version, features, nix_version, trust })
}

/// A connection's read half and write half as one stream, for [`server_handshake`] and
/// [`client_handshake`] when the two halves are buffered apart (a `BufReader` on one clone of
/// a socket, a `BufWriter` on another).
pub struct Duplex<'a, R, W> {
    pub r: &'a mut R,
    pub w: &'a mut W,
}

impl<R: Read, W> Read for Duplex<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.r.read(buf)
    }
}

impl<R, W: Write> Write for Duplex<'_, R, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}
