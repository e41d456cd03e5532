//! Nix's legacy SSH protocol: what `nix-store --serve` speaks on its standard input and output,
//! and what `ssh://` stores (Nix's `LegacySSHStore`: `nix copy --to ssh://`, remote builders
//! named `ssh://` or without a scheme, `nix-copy-closure`) and Hydra's queue runner speak to it.
//!
//! The reference is Nix 2.8: `serve-protocol.hh` (version 2.7), `opServe` in
//! `src/nix-store/nix-store.cc` (the server) and `legacy-ssh-store.cc` (the client). The
//! primitives are the worker protocol's ([`crate::codec`]): little-endian `u64`s, padded byte
//! strings, sets as a count and their elements, store paths printed whole.
//!
//! A session: the client sends [`SERVE_MAGIC_1`] and its version, the server answers
//! [`SERVE_MAGIC_2`] and its own ([`server_greeting`]); then commands, each a number and its
//! fields ([`ServeRequest`]), answered in order with no logger channel — the server's messages
//! go to its standard error, which an `ssh://` builder shows as the build's log.
//!
//! Fidelity notes:
//! - `BuildPaths` names paths in the old `path!out1,out2` form (`parsePathWithOutputs`): a
//!   derivation without outputs named means all of them, as [`DerivedPath::parse`] reads it
//!   before worker protocol 1.30.
//! - `AddToStoreNar` takes the NAR hash in any encoding, with or without `sha256:`
//!   (`Hash::parseAny`); `QueryPathInfos` answers it as `sha256:` and nixbase32.
//! - Nix 2.8 writes `BuildDerivation`'s built outputs whatever the client's version (its test
//!   reads `GET_PROTOCOL_MINOR(clientVersion >= 6)`); they are written here from 2.6, as the
//!   test means and as every client that reads them (2.6 and later) expects.

use std::collections::BTreeSet;
use std::io::{Read, Write};

use cairn_nix::{HashAlgo, StoreDir, StorePath};

use crate::codec::*;
use crate::constants::ProtocolVersion;
use crate::error::{Error, Result};
use crate::types::{BasicDerivation, BuildResult, DerivedPath, PathInfo, ValidPathInfo};

/// What a client opens a session with.
pub const SERVE_MAGIC_1: u64 = 0x390c_9deb;
/// What the server answers.
pub const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// Nix 2.8's version of the protocol: 2.7.
pub const SERVE_PROTOCOL_VERSION: u64 = 2 << 8 | 7;

/// The minor version of a serve-protocol peer (Nix's `GET_PROTOCOL_MINOR`).
pub fn minor(version: u64) -> u64 {
    version & 0xff
}

/// The server's half of the greeting: reads the client's magic, answers with the server's
/// magic and version, and returns the client's version.
pub fn server_greeting(r: &mut impl Read, w: &mut impl Write) -> Result<u64> {
    let magic = read_u64(r)?;
    if magic != SERVE_MAGIC_1 {
        return Err(Error::BadMagic(magic));
    }
    write_u64(w, SERVE_MAGIC_2)?;
    write_u64(w, SERVE_PROTOCOL_VERSION)?;
    w.flush()?;
    Ok(u64::from(read_u32(r, "serve protocol version")?))
}

/// The client's half of the greeting (as `LegacySSHStore` opens a connection): returns the
/// server's version, which must be 2.x.
pub fn client_greeting(r: &mut impl Read, w: &mut impl Write, version: u64) -> Result<u64> {
    write_u64(w, SERVE_MAGIC_1)?;
    write_u64(w, version)?;
    w.flush()?;
    let magic = read_u64(r)?;
    if magic != SERVE_MAGIC_2 {
        return Err(Error::BadMagic(magic));
    }
    let remote = u64::from(read_u32(r, "serve protocol version")?);
    if remote & 0xff00 != 0x200 {
        return Err(Error::UnsupportedVersion(remote));
    }
    Ok(remote)
}

/// The command numbers (`ServeCommand`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeCommand {
    QueryValidPaths = 1,
    QueryPathInfos = 2,
    DumpStorePath = 3,
    ImportPaths = 4,
    ExportPaths = 5,
    BuildPaths = 6,
    QueryClosure = 7,
    BuildDerivation = 8,
    AddToStoreNar = 9,
}

impl ServeCommand {
    pub fn from_u64(n: u64) -> Option<ServeCommand> {
        use ServeCommand as C;
        Some(match n {
            1 => C::QueryValidPaths,
            2 => C::QueryPathInfos,
            3 => C::DumpStorePath,
            4 => C::ImportPaths,
            5 => C::ExportPaths,
            6 => C::BuildPaths,
            7 => C::QueryClosure,
            8 => C::BuildDerivation,
            9 => C::AddToStoreNar,
            _ => return None,
        })
    }
}

/// The build settings that follow `BuildPaths` and `BuildDerivation` (`putBuildSettings`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeBuildSettings {
    /// Seconds without output before a build is killed (0: no limit).
    pub max_silent_time: u32,
    /// Seconds a build may run (0: no limit).
    pub build_timeout: u32,
    /// Bytes of log a build may write (0: no limit); from 2.2.
    pub max_log_size: u64,
    /// Extra rounds to check determinism; from 2.3, with `enforce_determinism`.
    pub build_repeat: u32,
    pub enforce_determinism: bool,
    /// Keep a failed build's directory; from 2.7.
    pub keep_failed: bool,
}

impl ServeBuildSettings {
    pub fn read(r: &mut impl Read, client: u64) -> Result<ServeBuildSettings> {
        let mut s = ServeBuildSettings {
            max_silent_time: read_u32(r, "max silent time")?,
            build_timeout: read_u32(r, "build timeout")?,
            ..Default::default()
        };
        if minor(client) >= 2 {
            s.max_log_size = read_u64(r)?;
        }
        if minor(client) >= 3 {
            s.build_repeat = read_u32(r, "build repeat")?;
            s.enforce_determinism = read_u32(r, "enforce determinism")? != 0;
        }
        if minor(client) >= 7 {
            s.keep_failed = read_u32(r, "keep failed")? != 0;
        }
        Ok(s)
    }

    pub fn write(&self, w: &mut impl Write, server: u64) -> Result<()> {
        write_u64(w, u64::from(self.max_silent_time))?;
        write_u64(w, u64::from(self.build_timeout))?;
        if minor(server) >= 2 {
            write_u64(w, self.max_log_size)?;
        }
        if minor(server) >= 3 {
            write_u64(w, u64::from(self.build_repeat))?;
            write_bool(w, self.enforce_determinism)?;
        }
        if minor(server) >= 7 {
            write_bool(w, self.keep_failed)?;
        }
        Ok(())
    }
}

/// One command and its fields. Two are followed by data the server reads next: `ImportPaths`
/// by an export stream (`nix-store --export`'s format), `AddToStoreNar` by exactly
/// `nar_size` bytes of NAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeRequest {
    /// With `lock`, the valid ones are held against collection for the session; with
    /// `substitute`, missing ones are substituted first (both only for writers).
    QueryValidPaths {
        lock: bool,
        substitute: bool,
        paths: BTreeSet<StorePath>,
    },
    QueryPathInfos(BTreeSet<StorePath>),
    DumpStorePath(StorePath),
    ImportPaths,
    ExportPaths(BTreeSet<StorePath>),
    BuildPaths {
        paths: Vec<DerivedPath>,
        settings: ServeBuildSettings,
    },
    QueryClosure {
        include_outputs: bool,
        paths: BTreeSet<StorePath>,
    },
    BuildDerivation {
        drv_path: StorePath,
        drv: BasicDerivation,
        settings: ServeBuildSettings,
    },
    AddToStoreNar(ValidPathInfo),
}

/// The codec settings of a serve session: paths printed in `store_dir`, the reader's limits,
/// and derived paths in the `path!outputs` form of worker protocol 1.29.
fn proto(store_dir: &StoreDir, limits: Limits) -> Proto {
    Proto { version: ProtocolVersion::new(1, 29), store_dir: store_dir.clone(), limits }
}

impl ServeRequest {
    pub fn command(&self) -> ServeCommand {
        use ServeCommand as C;
        match self {
            ServeRequest::QueryValidPaths { .. } => C::QueryValidPaths,
            ServeRequest::QueryPathInfos(_) => C::QueryPathInfos,
            ServeRequest::DumpStorePath(_) => C::DumpStorePath,
            ServeRequest::ImportPaths => C::ImportPaths,
            ServeRequest::ExportPaths(_) => C::ExportPaths,
            ServeRequest::BuildPaths { .. } => C::BuildPaths,
            ServeRequest::QueryClosure { .. } => C::QueryClosure,
            ServeRequest::BuildDerivation { .. } => C::BuildDerivation,
            ServeRequest::AddToStoreNar(_) => C::AddToStoreNar,
        }
    }

    /// Reads the next command; `None` when the client closed the session between commands.
    /// `client` is the version the client greeted with.
    pub fn read(r: &mut impl Read, store_dir: &StoreDir, limits: Limits, client: u64) -> Result<Option<ServeRequest>> {
        let mut first = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            match r.read(&mut first[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(Error::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let n = u64::from_le_bytes(first);
        let command = ServeCommand::from_u64(n).ok_or(Error::UnknownOp(n))?;
        let p = proto(store_dir, limits);
        use ServeCommand as C;
        Ok(Some(match command {
            C::QueryValidPaths => {
                let lock = read_u32(r, "lock")? != 0;
                let substitute = read_u32(r, "substitute")? != 0;
                ServeRequest::QueryValidPaths { lock, substitute, paths: read_path_set(r, &p)? }
            }
            C::QueryPathInfos => ServeRequest::QueryPathInfos(read_path_set(r, &p)?),
            C::DumpStorePath => ServeRequest::DumpStorePath(read_path(r, &p)?),
            C::ImportPaths => ServeRequest::ImportPaths,
            C::ExportPaths => {
                read_u32(r, "export flag")?; // obsolete
                ServeRequest::ExportPaths(read_path_set(r, &p)?)
            }
            C::BuildPaths => {
                let n = read_count(r, &p.limits)?;
                let paths = (0..n).map(|_| DerivedPath::read(r, &p)).collect::<Result<Vec<_>>>()?;
                ServeRequest::BuildPaths { paths, settings: ServeBuildSettings::read(r, client)? }
            }
            C::QueryClosure => {
                let include_outputs = read_u32(r, "include outputs")? != 0;
                ServeRequest::QueryClosure { include_outputs, paths: read_path_set(r, &p)? }
            }
            C::BuildDerivation => {
                let drv_path = read_path(r, &p)?;
                let drv = BasicDerivation::read(r, &p)?;
                ServeRequest::BuildDerivation { drv_path, drv, settings: ServeBuildSettings::read(r, client)? }
            }
            C::AddToStoreNar => {
                let path = read_path(r, &p)?;
                let deriver = read_opt_path(r, &p)?;
                let nar_hash = cairn_nix::Hash::parse_with_algo(&read_short(r, &p, "nar hash")?, HashAlgo::Sha256)?;
                let references = read_path_set(r, &p)?;
                let registration_time = read_u64(r)?;
                let nar_size = read_u64(r)?;
                let ultimate = read_u64(r)? != 0;
                let sigs = read_string_set(r, &p, "signature")?;
                let ca = read_opt_ca(r, &p)?;
                if nar_size == 0 {
                    return Err(Error::Malformed {
                        what: "path info",
                        value: "narInfo is too old and missing the narSize field".into(),
                    });
                }
                let info = PathInfo { deriver, nar_hash, references, registration_time, nar_size, ultimate, sigs, ca };
                ServeRequest::AddToStoreNar(ValidPathInfo { path, info })
            }
        }))
    }

    /// Writes the command as `LegacySSHStore` does for a server of version `server`.
    pub fn write(&self, w: &mut impl Write, store_dir: &StoreDir, server: u64) -> Result<()> {
        let p = proto(store_dir, Limits::default());
        write_u64(w, self.command() as u64)?;
        match self {
            ServeRequest::QueryValidPaths { lock, substitute, paths } => {
                write_bool(w, *lock)?;
                write_bool(w, *substitute)?;
                write_path_set(w, &p, paths)
            }
            ServeRequest::QueryPathInfos(paths) => write_path_set(w, &p, paths),
            ServeRequest::DumpStorePath(path) => write_path(w, &p, path),
            ServeRequest::ImportPaths => Ok(()),
            ServeRequest::ExportPaths(paths) => {
                write_u64(w, 0)?;
                write_path_set(w, &p, paths)
            }
            ServeRequest::BuildPaths { paths, settings } => {
                write_count(w, paths.len())?;
                paths.iter().try_for_each(|d| d.write(w, &p))?;
                settings.write(w, server)
            }
            ServeRequest::QueryClosure { include_outputs, paths } => {
                write_bool(w, *include_outputs)?;
                write_path_set(w, &p, paths)
            }
            ServeRequest::BuildDerivation { drv_path, drv, settings } => {
                write_path(w, &p, drv_path)?;
                drv.write(w, &p)?;
                settings.write(w, server)
            }
            ServeRequest::AddToStoreNar(v) => {
                write_path(w, &p, &v.path)?;
                write_opt_path(w, &p, v.info.deriver.as_ref())?;
                write_str(w, &v.info.nar_hash.encode(cairn_nix::hash::Encoding::Base16))?;
                write_path_set(w, &p, &v.info.references)?;
                write_u64(w, v.info.registration_time)?;
                write_u64(w, v.info.nar_size)?;
                write_bool(w, v.info.ultimate)?;
                write_strings(w, v.info.sigs.iter())?;
                write_opt_ca(w, v.info.ca.as_ref())
            }
        }
    }
}

/// `QueryPathInfos`' answer: each valid path's metadata (the invalid ones left out), then the
/// empty string. The download size is the NAR size: nothing is compressed.
pub fn write_path_infos<'a>(
    w: &mut impl Write,
    store_dir: &StoreDir,
    client: u64,
    infos: impl IntoIterator<Item = (&'a StorePath, &'a PathInfo)>,
) -> Result<()> {
    let p = proto(store_dir, Limits::default());
    for (path, info) in infos {
        write_path(w, &p, path)?;
        write_opt_path(w, &p, info.deriver.as_ref())?;
        write_path_set(w, &p, &info.references)?;
        write_u64(w, info.nar_size)?;
        write_u64(w, info.nar_size)?;
        if minor(client) >= 4 {
            write_str(w, &info.nar_hash.to_prefixed(cairn_nix::hash::Encoding::Nix32))?;
            write_opt_ca(w, info.ca.as_ref())?;
            write_strings(w, info.sigs.iter())?;
        }
    }
    write_str(w, "")
}

/// Reads `QueryPathInfos`' answer (the client's side).
pub fn read_path_infos(
    r: &mut impl Read,
    store_dir: &StoreDir,
    limits: Limits,
    server: u64,
) -> Result<Vec<ValidPathInfo>> {
    let p = proto(store_dir, limits);
    let mut out = Vec::new();
    loop {
        let s = read_short(r, &p, "store path")?;
        if s.is_empty() {
            return Ok(out);
        }
        if out.len() >= limits.max_count {
            return Err(Error::TooMany { count: out.len() as u64 + 1, max: limits.max_count });
        }
        let path = store_dir.parse(&s)?;
        let deriver = read_opt_path(r, &p)?;
        let references = read_path_set(r, &p)?;
        let _download_size = read_u64(r)?;
        let nar_size = read_u64(r)?;
        // Before 2.4 the hash is not told: an empty NAR's stands in for it.
        let mut info = PathInfo::bare(deriver, cairn_nix::Hash::digest(HashAlgo::Sha256, b""), references, nar_size);
        if minor(server) >= 4 {
            info.nar_hash = cairn_nix::Hash::parse_with_algo(&read_short(r, &p, "nar hash")?, HashAlgo::Sha256)?;
            info.ca = read_opt_ca(r, &p)?;
            info.sigs = read_string_set(r, &p, "signature")?;
        }
        out.push(ValidPathInfo { path, info });
    }
}

/// `BuildPaths`' answer: 0, or the failure's status and message.
pub fn write_build_paths_result(w: &mut impl Write, failure: Option<(u64, &str)>) -> Result<()> {
    match failure {
        None => write_u64(w, 0),
        Some((status, message)) => {
            write_u64(w, status)?;
            write_str(w, message)
        }
    }
}

/// `BuildDerivation`'s answer to a client of version `client`.
pub fn write_build_result(w: &mut impl Write, client: u64, result: &BuildResult) -> Result<()> {
    write_u64(w, result.status.to_u64())?;
    write_str(w, &result.error_msg)?;
    if minor(client) >= 3 {
        write_u64(w, u64::from(result.times_built))?;
        write_bool(w, result.is_non_deterministic)?;
        write_u64(w, result.start_time)?;
        write_u64(w, result.stop_time)?;
    }
    if minor(client) >= 6 {
        write_count(w, result.built_outputs.len())?;
        for (id, json) in &result.built_outputs {
            write_str(w, &id.render())?;
            write_str(w, json)?;
        }
    }
    Ok(())
}

/// Reads `BuildDerivation`'s answer from a server of version `server`.
pub fn read_build_result(r: &mut impl Read, limits: Limits, server: u64) -> Result<BuildResult> {
    // The worker protocol's layout at 1.29 (times) and 1.28 (outputs) is this one at 2.3 and 2.6.
    let status = crate::constants::BuildStatus::from_u64(u64::from(read_u32(r, "build status")?));
    let mut res = BuildResult::new(status, read_string(r, limits.max_blob, "error message")?);
    if minor(server) >= 3 {
        res.times_built = read_u32(r, "times built")?;
        res.is_non_deterministic = read_bool(r)?;
        res.start_time = read_u64(r)?;
        res.stop_time = read_u64(r)?;
    }
    if minor(server) >= 6 {
        let n = read_count(r, &limits)?;
        for _ in 0..n {
            let id = crate::types::DrvOutput::parse(&read_string(r, limits.max_string, "derivation output id")?)?;
            let json = read_string(r, limits.max_blob, "realisation")?;
            res.built_outputs.insert(id, json);
        }
    }
    Ok(res)
}

/// The client side of a session, as `LegacySSHStore` speaks it: for the ops a remote build
/// needs. The server's messages (a build's log) come on another stream (its standard error),
/// which the caller reads; a refusal ends the server, so any error here leaves the session
/// unusable.
pub struct ServeClient<R: Read, W: Write> {
    r: R,
    w: W,
    store_dir: StoreDir,
    limits: Limits,
    /// The server's version.
    remote: u64,
}

impl<R: Read, W: Write> ServeClient<R, W> {
    /// Greets the server, offering Nix 2.8's version (2.7).
    pub fn connect(mut r: R, mut w: W, store_dir: StoreDir, limits: Limits) -> Result<Self> {
        let remote = client_greeting(&mut r, &mut w, SERVE_PROTOCOL_VERSION)?;
        Ok(ServeClient { r, w, store_dir, limits, remote })
    }

    /// The server's version.
    pub fn remote_version(&self) -> u64 {
        self.remote
    }

    fn send(&mut self, req: &ServeRequest) -> Result<()> {
        req.write(&mut self.w, &self.store_dir, self.remote)?;
        self.w.flush()?;
        Ok(())
    }

    /// The paths among `paths` valid there; with `substitute`, after it tried to substitute
    /// the others.
    pub fn query_valid_paths(&mut self, paths: &BTreeSet<StorePath>, substitute: bool) -> Result<BTreeSet<StorePath>> {
        self.send(&ServeRequest::QueryValidPaths { lock: false, substitute, paths: paths.clone() })?;
        read_path_set(&mut self.r, &proto(&self.store_dir, self.limits))
    }

    /// A path's metadata, `None` if it is not valid there (servers from 2.4: before, the NAR
    /// hash is not sent).
    pub fn query_path_info(&mut self, path: &StorePath) -> Result<Option<PathInfo>> {
        let infos = self.query_path_infos(&[path.clone()].into())?;
        Ok(infos.into_iter().find(|v| &v.path == path).map(|v| v.info))
    }

    /// The metadata of the valid ones among `paths`, in one `QueryPathInfos` (servers from 2.4).
    pub fn query_path_infos(&mut self, paths: &BTreeSet<StorePath>) -> Result<Vec<ValidPathInfo>> {
        if minor(self.remote) < 4 {
            return Err(Error::UnsupportedVersion(self.remote));
        }
        self.send(&ServeRequest::QueryPathInfos(paths.clone()))?;
        read_path_infos(&mut self.r, &self.store_dir, self.limits, self.remote)
    }

    /// Adds one path, `write_nar` writing its NAR: `AddToStoreNar` from 2.5, an export stream
    /// of one path before, as `LegacySSHStore::addToStore` does.
    pub fn add_to_store_nar(
        &mut self,
        info: &ValidPathInfo,
        write_nar: &mut dyn FnMut(&ValidPathInfo, &mut dyn Write) -> std::io::Result<()>,
    ) -> Result<()> {
        if minor(self.remote) >= 5 {
            ServeRequest::AddToStoreNar(info.clone()).write(&mut self.w, &self.store_dir, self.remote)?;
            write_nar(info, &mut self.w)?;
        } else {
            write_u64(&mut self.w, ServeCommand::ImportPaths as u64)?;
            write_u64(&mut self.w, 1)?;
            write_nar(info, &mut self.w)?;
            let p = proto(&self.store_dir, self.limits);
            write_u64(&mut self.w, cairn_nix::export::EXPORT_MAGIC)?;
            write_path(&mut self.w, &p, &info.path)?;
            write_path_set(&mut self.w, &p, &info.info.references)?;
            write_opt_path(&mut self.w, &p, info.info.deriver.as_ref())?;
            write_u64(&mut self.w, 0)?;
            write_u64(&mut self.w, 0)?;
        }
        self.w.flush()?;
        match read_u64(&mut self.r)? {
            1 => Ok(()),
            n => Err(Error::BadValue { what: "answer to an added path", value: n }),
        }
    }

    /// Builds a derivation sent whole (its input sources must be valid there).
    pub fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        settings: &ServeBuildSettings,
    ) -> Result<BuildResult> {
        self.send(&ServeRequest::BuildDerivation {
            drv_path: drv_path.clone(),
            drv: drv.clone(),
            settings: settings.clone(),
        })?;
        read_build_result(&mut self.r, self.limits, self.remote)
    }

    /// Asks for a path's NAR and hands the reader to `read_nar`, which must read exactly the
    /// NAR (a NAR parser knows where it ends).
    pub fn nar_from_path<T>(&mut self, path: &StorePath, read_nar: impl FnOnce(&mut R) -> T) -> Result<T> {
        self.send(&ServeRequest::DumpStorePath(path.clone()))?;
        Ok(read_nar(&mut self.r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dir() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    fn path(n: u8, name: &str) -> StorePath {
        StorePath::new([n; 20], name).unwrap()
    }

    fn round_trip(req: &ServeRequest, version: u64) -> ServeRequest {
        let mut buf = Vec::new();
        req.write(&mut buf, &dir(), version).unwrap();
        let mut r = &buf[..];
        let back = ServeRequest::read(&mut r, &dir(), Limits::default(), version).unwrap().unwrap();
        assert!(r.is_empty(), "{} bytes left after {:?}", r.len(), req.command());
        back
    }

    #[test]
    fn greetings_agree_on_versions_as_nix_store_serve_does() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(b.try_clone().unwrap());
            let mut w = b;
            server_greeting(&mut r, &mut w).unwrap()
        });
        let mut r = std::io::BufReader::new(a.try_clone().unwrap());
        let mut w = a;
        let remote = client_greeting(&mut r, &mut w, 0x205).unwrap();
        assert_eq!(remote, SERVE_PROTOCOL_VERSION);
        assert_eq!(server.join().unwrap(), 0x205);
    }

    #[test]
    fn a_worker_protocol_greeting_is_not_a_serve_greeting() {
        let mut bytes = Vec::new();
        write_u64(&mut bytes, 0x6e69_7863).unwrap();
        write_u64(&mut bytes, SERVE_PROTOCOL_VERSION).unwrap();
        let mut out = Vec::new();
        assert!(matches!(server_greeting(&mut &bytes[..], &mut out), Err(Error::BadMagic(0x6e69_7863))));
        assert!(out.is_empty(), "nothing is answered to a stranger");
    }

    #[test]
    fn build_paths_names_outputs_in_the_old_form() {
        let drv = path(1, "hello.drv");
        let mut buf = Vec::new();
        write_u64(&mut buf, ServeCommand::BuildPaths as u64).unwrap();
        write_u64(&mut buf, 3).unwrap();
        write_str(&mut buf, &format!("/nix/store/{drv}")).unwrap();
        write_str(&mut buf, &format!("/nix/store/{drv}!out,dev")).unwrap();
        write_str(&mut buf, &format!("/nix/store/{}", path(2, "src"))).unwrap();
        ServeBuildSettings { max_silent_time: 7, ..Default::default() }.write(&mut buf, 0x207).unwrap();
        let req = ServeRequest::read(&mut &buf[..], &dir(), Limits::default(), 0x207).unwrap().unwrap();
        let ServeRequest::BuildPaths { paths, settings } = req else { panic!("{req:?}") };
        use crate::types::OutputsSpec;
        assert_eq!(
            paths,
            vec![
                DerivedPath::Built { drv_path: drv.clone(), outputs: OutputsSpec::All },
                DerivedPath::Built {
                    drv_path: drv,
                    outputs: OutputsSpec::Names(["dev".to_owned(), "out".to_owned()].into())
                },
                DerivedPath::Opaque(path(2, "src")),
            ]
        );
        assert_eq!(settings.max_silent_time, 7);
    }

    #[test]
    fn settings_follow_the_client_s_version() {
        let s = ServeBuildSettings {
            max_silent_time: 1,
            build_timeout: 2,
            max_log_size: 3,
            build_repeat: 4,
            enforce_determinism: true,
            keep_failed: true,
        };
        for (version, words) in [(0x201u64, 2usize), (0x202, 3), (0x203, 5), (0x206, 5), (0x207, 6)] {
            let mut buf = Vec::new();
            s.write(&mut buf, version).unwrap();
            assert_eq!(buf.len(), words * 8, "2.{}", minor(version));
            let back = ServeBuildSettings::read(&mut &buf[..], version).unwrap();
            assert_eq!(back.build_timeout, 2);
            assert_eq!(back.keep_failed, version >= 0x207);
        }
    }

    #[test]
    fn path_infos_are_answered_with_a_nix32_hash_and_end_with_an_empty_string() {
        let p = path(3, "x");
        let info = PathInfo {
            deriver: Some(path(4, "x.drv")),
            nar_hash: cairn_nix::Hash::digest(HashAlgo::Sha256, b"nar"),
            references: [path(5, "dep")].into(),
            registration_time: 9,
            nar_size: 120,
            ultimate: true,
            sigs: ["k:c2ln".to_owned()].into(),
            ca: None,
        };
        let mut buf = Vec::new();
        write_path_infos(&mut buf, &dir(), 0x207, [(&p, &info)]).unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(text.contains("sha256:"), "{text}");
        let back = read_path_infos(&mut &buf[..], &dir(), Limits::default(), 0x207).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].path, p);
        assert_eq!(back[0].info.nar_hash, info.nar_hash);
        assert_eq!(back[0].info.references, info.references);
        assert_eq!(back[0].info.sigs, info.sigs);
        assert_eq!(back[0].info.deriver, info.deriver);
        // Before 2.4 only the sizes follow the references.
        let mut old = Vec::new();
        write_path_infos(&mut old, &dir(), 0x203, [(&p, &info)]).unwrap();
        let back = read_path_infos(&mut &old[..], &dir(), Limits::default(), 0x203).unwrap();
        assert_eq!(back[0].info.nar_size, 120);
    }

    #[test]
    fn an_add_without_a_nar_size_is_refused_as_nix_refuses_it() {
        let v = ValidPathInfo {
            path: path(6, "y"),
            info: PathInfo {
                deriver: None,
                nar_hash: cairn_nix::Hash::digest(HashAlgo::Sha256, b""),
                references: BTreeSet::new(),
                registration_time: 0,
                nar_size: 0,
                ultimate: false,
                sigs: BTreeSet::new(),
                ca: None,
            },
        };
        let mut buf = Vec::new();
        ServeRequest::AddToStoreNar(v).write(&mut buf, &dir(), 0x207).unwrap();
        let e = ServeRequest::read(&mut &buf[..], &dir(), Limits::default(), 0x207).unwrap_err();
        assert!(e.to_string().contains("narSize"), "{e}");
    }

    #[test]
    fn build_results_round_trip_at_every_version() {
        let mut res = BuildResult::new(crate::constants::BuildStatus::Built, "");
        res.times_built = 1;
        res.start_time = 5;
        res.stop_time = 6;
        for version in [0x202u64, 0x203, 0x205, 0x206, 0x207] {
            let mut buf = Vec::new();
            write_build_result(&mut buf, version, &res).unwrap();
            let back = read_build_result(&mut &buf[..], Limits::default(), version).unwrap();
            assert_eq!(back.status, res.status);
            assert_eq!(back.stop_time, if version >= 0x203 { 6 } else { 0 });
        }
    }

    #[test]
    fn an_unknown_command_is_an_error_and_a_clean_end_is_none() {
        let mut buf = Vec::new();
        write_u64(&mut buf, 10).unwrap();
        assert!(matches!(
            ServeRequest::read(&mut &buf[..], &dir(), Limits::default(), 0x207),
            Err(Error::UnknownOp(10))
        ));
        assert!(ServeRequest::read(&mut &b""[..], &dir(), Limits::default(), 0x207).unwrap().is_none());
        assert!(matches!(
            ServeRequest::read(&mut &b"\x01\0\0"[..], &dir(), Limits::default(), 0x207),
            Err(Error::Truncated)
        ));
    }

    fn arb_path() -> impl Strategy<Value = StorePath> {
        (any::<[u8; 20]>(), "[a-z][a-z0-9.-]{0,12}").prop_map(|(d, n)| StorePath::new(d, &n).unwrap())
    }

    fn arb_settings() -> impl Strategy<Value = ServeBuildSettings> {
        (any::<u32>(), any::<u32>(), any::<u64>(), any::<u32>(), any::<bool>(), any::<bool>()).prop_map(
            |(a, b, c, d, e, f)| ServeBuildSettings {
                max_silent_time: a,
                build_timeout: b,
                max_log_size: c,
                build_repeat: d,
                enforce_determinism: e,
                keep_failed: f,
            },
        )
    }

    fn arb_request() -> impl Strategy<Value = ServeRequest> {
        let paths = || proptest::collection::btree_set(arb_path(), 0..4);
        prop_oneof![
            (any::<bool>(), any::<bool>(), paths())
                .prop_map(|(lock, substitute, paths)| ServeRequest::QueryValidPaths { lock, substitute, paths }),
            paths().prop_map(ServeRequest::QueryPathInfos),
            arb_path().prop_map(ServeRequest::DumpStorePath),
            Just(ServeRequest::ImportPaths),
            paths().prop_map(ServeRequest::ExportPaths),
            (any::<bool>(), paths())
                .prop_map(|(include_outputs, paths)| ServeRequest::QueryClosure { include_outputs, paths }),
            (proptest::collection::vec(arb_path(), 0..3), arb_settings()).prop_map(|(ps, settings)| {
                let paths = ps
                    .into_iter()
                    .map(|p| {
                        if p.name().ends_with(".drv") {
                            DerivedPath::Built { drv_path: p, outputs: crate::types::OutputsSpec::All }
                        } else {
                            DerivedPath::Opaque(p)
                        }
                    })
                    .collect();
                ServeRequest::BuildPaths { paths, settings }
            }),
            (arb_path(), arb_settings(), "[a-z]{0,8}").prop_map(|(drv_path, settings, builder)| {
                let drv = BasicDerivation { builder, platform: "x86_64-linux".into(), ..Default::default() };
                ServeRequest::BuildDerivation { drv_path, drv, settings }
            }),
            (arb_path(), paths(), 1..u64::MAX, any::<bool>()).prop_map(|(path, references, nar_size, ultimate)| {
                ServeRequest::AddToStoreNar(ValidPathInfo {
                    path,
                    info: PathInfo {
                        deriver: None,
                        nar_hash: cairn_nix::Hash::digest(HashAlgo::Sha256, &nar_size.to_le_bytes()),
                        references,
                        registration_time: 1,
                        nar_size,
                        ultimate,
                        sigs: BTreeSet::new(),
                        ca: None,
                    },
                })
            }),
        ]
    }

    proptest! {
        #[test]
        fn every_request_reads_back_as_written(req in arb_request()) {
            prop_assert_eq!(round_trip(&req, SERVE_PROTOCOL_VERSION), req);
        }

        #[test]
        fn reading_hostile_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), version in 0x200u64..0x208) {
            let limits = Limits { max_string: 256, max_blob: 1024, max_count: 16 };
            let mut r = &bytes[..];
            while let Ok(Some(_)) = ServeRequest::read(&mut r, &dir(), limits, version) {}
            let _ = read_path_infos(&mut &bytes[..], &dir(), limits, version);
            let _ = read_build_result(&mut &bytes[..], limits, version);
        }

        #[test]
        fn a_command_word_with_valid_fields_after_it_never_panics(cmd in 1u64..10, tail in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut bytes = cmd.to_le_bytes().to_vec();
            bytes.extend(tail);
            let _ = ServeRequest::read(&mut &bytes[..], &dir(), Limits { max_string: 256, max_blob: 1024, max_count: 16 }, 0x207);
        }
    }
}
