//! The client side of a session: what `RemoteStore` does in Nix, for the ops a remote build
//! and `cairnd --serve` need — handshake and startup log, `SetOptions`, `QueryValidPaths`,
//! `QueryPathInfo`, `QueryDerivationOutputMap`, `AddTempRoot`, `AddMultipleToStore`,
//! `BuildPaths`, `BuildDerivation` and `NarFromPath`.
//!
//! Each call writes its request, flushes, reads the logger channel up to `STDERR_LAST`
//! (handing log messages to the caller) and then the answer. A `STDERR_ERROR` is
//! [`ClientError::Remote`]: the daemon refused this request, and the connection can carry the
//! next one. Anything else ([`ClientError::Protocol`]) leaves the connection in an unknown
//! state: drop it.
//!
//! Like the rest of the crate this does no I/O of its own: it runs over any blocking reader
//! and writer (a Unix socket's halves, an `ssh` child's stdout and stdin).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use cairn_nix::{StoreDir, StorePath};

use crate::codec::{write_u64, Limits, Proto};
use crate::constants::{BuildMode, ProtocolVersion};
use crate::error::Error;
use crate::framing::FramedWriter;
use crate::handshake::{client_handshake, ClientHello, ClientSession, Duplex};
use crate::logger::{read_until_last, RemoteError, StderrMessage};
use crate::request::{write_multiple_entry_info, Request};
use crate::response::Response;
use crate::types::{BasicDerivation, BuildResult, ClientOptions, DerivedPath, PathInfo, ValidPathInfo};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error; the connection is still usable. (Shown without the
    /// terminal escapes Nix colours its messages with.)
    #[error("{}", crate::logger::plain_text(&.0.message))]
    Remote(RemoteError),
    /// The bytes or the connection failed; drop the connection.
    #[error("{0}")]
    Protocol(#[from] Error),
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Protocol(Error::from(e))
    }
}

/// One session with a daemon.
pub struct Client<R: Read, W: Write> {
    r: R,
    w: W,
    proto: Proto,
    session: ClientSession,
}

impl<R: Read, W: Write> Client<R, W> {
    /// Greets the daemon (offering protocol 1.34, as Nix 2.8 does) and reads its startup log.
    /// Give buffered halves: every field is a few bytes.
    pub fn connect(r: R, w: W, store_dir: StoreDir, limits: Limits) -> Result<Self, ClientError> {
        Client::connect_offering(r, w, store_dir, limits, ProtocolVersion::NIX_2_8)
    }

    /// [`Client::connect`] offering another version (the session speaks the lower of it and the
    /// daemon's).
    pub fn connect_offering(
        mut r: R,
        mut w: W,
        store_dir: StoreDir,
        limits: Limits,
        version: ProtocolVersion,
    ) -> Result<Self, ClientError> {
        let hello = ClientHello { version, features: BTreeSet::new() };
        let session = client_handshake(&mut Duplex { r: &mut r, w: &mut w }, &hello, &limits)?;
        let proto = Proto { version: session.version, store_dir, limits };
        let mut c = Client { r, w, proto, session };
        c.finish(&mut |_| {})?;
        Ok(c)
    }

    /// What the handshake agreed on, and the daemon's version string.
    pub fn session(&self) -> &ClientSession {
        &self.session
    }

    /// Reads the logger channel to `STDERR_LAST`.
    fn finish(&mut self, on_log: &mut dyn FnMut(StderrMessage)) -> Result<(), ClientError> {
        let v = self.proto.version;
        read_until_last(&mut self.r, v, &self.proto.limits, |m| {
            on_log(m);
            Ok(())
        })?
        .map_err(ClientError::Remote)
    }

    /// Sends a request without payload and reads its answer.
    fn call(&mut self, req: &Request, on_log: &mut dyn FnMut(StderrMessage)) -> Result<Response, ClientError> {
        req.write(&mut self.w, &self.proto)?;
        self.w.flush()?;
        self.finish(on_log)?;
        Ok(Response::read(req.op(), &mut self.r, &self.proto)?)
    }

    pub fn set_options(&mut self, options: &ClientOptions) -> Result<(), ClientError> {
        self.call(&Request::SetOptions(options.clone()), &mut |_| {})?;
        Ok(())
    }

    /// The paths among `paths` that are valid there; with `substitute`, after the daemon
    /// tried to substitute the others (1.27+; older daemons ignore it).
    pub fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, ClientError> {
        let req = Request::QueryValidPaths { paths: paths.clone(), substitute };
        match self.call(&req, &mut |_| {})? {
            Response::PathSet(s) => Ok(s),
            other => Err(unexpected("QueryValidPaths", other)),
        }
    }

    /// The path's metadata, `None` if it is not valid there.
    pub fn query_path_info(&mut self, path: &StorePath) -> Result<Option<PathInfo>, ClientError> {
        match self.call(&Request::QueryPathInfo(path.clone()), &mut |_| {}) {
            Ok(Response::PathInfo(info)) => Ok(info),
            Ok(other) => Err(unexpected("QueryPathInfo", other)),
            // Daemons before 1.17 answer an invalid path with an error.
            Err(ClientError::Remote(_)) if !self.proto.has(17) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The metadata of many paths, `None` for those not valid there: `QueryPathInfo`s
    /// pipelined a few at a time (each batch written, then its answers read), so a remote
    /// daemon costs one round trip per batch rather than per path.
    pub fn query_path_infos(&mut self, paths: &[StorePath]) -> Result<Vec<Option<PathInfo>>, ClientError> {
        /// Requests in flight: their answers must fit the pipes between the two ends while
        /// the next requests are written (a few KiB each at most).
        const BATCH: usize = 16;
        let mut out = Vec::with_capacity(paths.len());
        for chunk in paths.chunks(BATCH) {
            for p in chunk {
                Request::QueryPathInfo(p.clone()).write(&mut self.w, &self.proto)?;
            }
            self.w.flush()?;
            for _ in chunk {
                let answer = match self.finish(&mut |_| {}) {
                    Ok(()) => {
                        match Response::read(crate::constants::WorkerOp::QueryPathInfo, &mut self.r, &self.proto)? {
                            Response::PathInfo(info) => info,
                            other => return Err(unexpected("QueryPathInfo", other)),
                        }
                    }
                    // Daemons before 1.17 answer an invalid path with an error.
                    Err(ClientError::Remote(_)) if !self.proto.has(17) => None,
                    Err(e) => return Err(e),
                };
                out.push(answer);
            }
        }
        Ok(out)
    }

    /// Sends paths with their NARs in one `AddMultipleToStore` (protocol 1.32+), or to an
    /// older daemon one `AddToStoreNar` each, as Nix's `RemoteStore` does. `write_nar` writes
    /// the NAR of the entry it is given; entries go in the order given, so give references
    /// first.
    pub fn add_multiple_to_store(
        &mut self,
        entries: &[ValidPathInfo],
        dont_check_sigs: bool,
        write_nar: &mut dyn FnMut(&ValidPathInfo, &mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), ClientError> {
        if !self.proto.has(32) {
            return entries.iter().try_for_each(|e| self.add_to_store_nar(e, dont_check_sigs, write_nar));
        }
        Request::AddMultipleToStore { repair: false, dont_check_sigs }.write(&mut self.w, &self.proto)?;
        let mut framed = FramedWriter::new(&mut self.w);
        write_u64(&mut framed, entries.len() as u64)?;
        for e in entries {
            write_multiple_entry_info(&mut framed, &self.proto, e)?;
            write_nar(e, &mut framed)?;
        }
        framed.finish()?;
        self.w.flush()?;
        self.finish(&mut |_| {})?;
        Ok(())
    }

    /// Sends one path with its NAR (`AddToStoreNar`), the NAR as the session's version wants
    /// it: framed from 1.23, pulled by the daemon with `STDERR_READ` in 1.21 and 1.22 (Nix 2.3
    /// speaks 1.21), bare before.
    pub fn add_to_store_nar(
        &mut self,
        entry: &ValidPathInfo,
        dont_check_sigs: bool,
        write_nar: &mut dyn FnMut(&ValidPathInfo, &mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), ClientError> {
        let req = Request::AddToStoreNar { info: entry.clone(), repair: false, dont_check_sigs };
        req.write(&mut self.w, &self.proto)?;
        match req.payload(&self.proto) {
            crate::request::Payload::Framed => {
                let mut framed = FramedWriter::new(&mut self.w);
                write_nar(entry, &mut framed)?;
                framed.finish()?;
            }
            crate::request::Payload::Tunnelled => {
                // The daemon asks for the bytes as it reads them: they must be at hand.
                let mut nar = Vec::with_capacity(usize::try_from(entry.info.nar_size).unwrap_or(0).min(1 << 30));
                write_nar(entry, &mut nar)?;
                self.w.flush()?;
                let (r, w, v) = (&mut self.r, &mut self.w, self.proto.version);
                let mut at = 0usize;
                return read_until_last(r, v, &self.proto.limits, |m| {
                    if let StderrMessage::Read(n) = m {
                        let end = at.saturating_add(usize::try_from(n).unwrap_or(usize::MAX)).min(nar.len());
                        crate::codec::write_bytes(w, &nar[at..end])?;
                        w.flush()?;
                        at = end;
                    }
                    Ok(())
                })?
                .map_err(ClientError::Remote);
            }
            _ => write_nar(entry, &mut self.w)?,
        }
        self.w.flush()?;
        self.finish(&mut |_| {})
    }

    /// Builds a derivation the daemon is sent rather than reads (its input sources must be
    /// valid there); log messages go to `on_log` as they come.
    pub fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        mode: BuildMode,
        on_log: &mut dyn FnMut(StderrMessage),
    ) -> Result<BuildResult, ClientError> {
        let req = Request::BuildDerivation { drv_path: drv_path.clone(), drv: drv.clone(), mode };
        match self.call(&req, on_log)? {
            Response::BuildResult(r) => Ok(r),
            other => Err(unexpected("BuildDerivation", other)),
        }
    }

    /// Builds or substitutes derived paths (`BuildPaths`); log messages go to `on_log` as they
    /// come. A failure is [`ClientError::Remote`] with the daemon's message.
    pub fn build_paths(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
        on_log: &mut dyn FnMut(StderrMessage),
    ) -> Result<(), ClientError> {
        self.call(&Request::BuildPaths { paths: paths.to_vec(), mode }, on_log)?;
        Ok(())
    }

    /// Holds `path` against collection for as long as this session lasts (`AddTempRoot`).
    pub fn add_temp_root(&mut self, path: &StorePath) -> Result<(), ClientError> {
        self.call(&Request::AddTempRoot(path.clone()), &mut |_| {})?;
        Ok(())
    }

    /// A derivation's outputs and, for those known, their paths (`QueryDerivationOutputMap`).
    pub fn query_derivation_output_map(
        &mut self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, Option<StorePath>>, ClientError> {
        match self.call(&Request::QueryDerivationOutputMap(drv.clone()), &mut |_| {})? {
            Response::OutputMap(m) => Ok(m),
            other => Err(unexpected("QueryDerivationOutputMap", other)),
        }
    }

    /// Asks for a path's NAR and hands the connection's reader to `read_nar`, which must read
    /// exactly the NAR (a NAR parser knows where it ends) and nothing more.
    pub fn nar_from_path<T>(&mut self, path: &StorePath, read_nar: impl FnOnce(&mut R) -> T) -> Result<T, ClientError> {
        self.call(&Request::NarFromPath(path.clone()), &mut |_| {})?;
        Ok(read_nar(&mut self.r))
    }
}

fn unexpected(op: &str, got: Response) -> ClientError {
    ClientError::Protocol(Error::Malformed { what: "answer", value: format!("{op} answered {got:?}") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants::BuildStatus;
    use crate::framing::FramedReader;
    use crate::handshake::{server_handshake, ServerHello};
    use crate::request::{read_multiple_count, read_multiple_entry_info};
    use crate::types::ValidPathInfo;
    use cairn_nix::{Hash, HashAlgo};
    use std::io::{BufReader, BufWriter};
    use std::os::unix::net::UnixStream;

    fn dir() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    fn path(n: u8, name: &str) -> StorePath {
        StorePath::new([n; 20], name).unwrap()
    }

    fn info(p: &StorePath) -> PathInfo {
        PathInfo {
            deriver: None,
            nar_hash: Hash::digest(HashAlgo::Sha256, p.name().as_bytes()),
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size: 8,
            ultimate: false,
            sigs: ["builder-1:c2ln".to_owned()].into(),
            ca: None,
        }
    }

    /// A daemon that answers each request the way a remote builder does, as a script of the
    /// ops it expects.
    fn daemon(s: UnixStream) -> std::thread::JoinHandle<Vec<String>> {
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = BufWriter::new(s);
            let hello = ServerHello {
                version: ProtocolVersion::NIX_2_8,
                nix_version: "2.8.0".into(),
                trust: None,
                features: BTreeSet::new(),
            };
            let session = server_handshake(&mut Duplex { r: &mut r, w: &mut w }, &hello, &Limits::default()).unwrap();
            let proto = Proto::new(session.version, dir());
            StderrMessage::Last.write(&mut w, proto.version).unwrap();
            w.flush().unwrap();
            while let Some(req) = Request::read(&mut r, &proto).unwrap() {
                seen.push(format!("{:?}", req.op()));
                let last = |w: &mut BufWriter<UnixStream>| StderrMessage::Last.write(w, proto.version).unwrap();
                match req {
                    Request::SetOptions(_) => last(&mut w),
                    Request::QueryValidPaths { paths, .. } => {
                        last(&mut w);
                        let valid: BTreeSet<StorePath> = paths.into_iter().filter(|p| p.name() == "has").collect();
                        Response::PathSet(valid).write(&mut w, &proto).unwrap();
                    }
                    Request::AddMultipleToStore { .. } => {
                        let mut f = FramedReader::new(&mut r);
                        let n = read_multiple_count(&mut f, &proto).unwrap();
                        for _ in 0..n {
                            let e: ValidPathInfo = read_multiple_entry_info(&mut f, &proto).unwrap();
                            let mut nar = vec![0u8; e.info.nar_size as usize];
                            f.read_exact(&mut nar).unwrap();
                            seen.push(format!("got {} {}", e.path.name(), String::from_utf8_lossy(&nar)));
                        }
                        f.drain().unwrap();
                        last(&mut w);
                    }
                    Request::BuildDerivation { drv, .. } => {
                        StderrMessage::Next("building\n".into()).write(&mut w, proto.version).unwrap();
                        if drv.builder == "fail" {
                            StderrMessage::Error(RemoteError::new("not trusted")).write(&mut w, proto.version).unwrap();
                        } else {
                            last(&mut w);
                            Response::BuildResult(BuildResult::new(BuildStatus::Built, ""))
                                .write(&mut w, &proto)
                                .unwrap();
                        }
                    }
                    Request::QueryPathInfo(p) => {
                        last(&mut w);
                        let i = (p.name() == "out").then(|| info(&p));
                        Response::PathInfo(i).write(&mut w, &proto).unwrap();
                    }
                    Request::NarFromPath(_) => {
                        last(&mut w);
                        w.write_all(b"NAR-BYTES").unwrap();
                    }
                    other => panic!("unexpected {other:?}"),
                }
                w.flush().unwrap();
            }
            seen
        })
    }

    #[test]
    fn a_remote_build_session_speaks_each_op_as_a_daemon_reads_it() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = daemon(theirs);
        let mut c =
            Client::connect(BufReader::new(ours.try_clone().unwrap()), BufWriter::new(ours), dir(), Limits::default())
                .unwrap();
        assert_eq!(c.session().version, ProtocolVersion::NIX_2_8);
        assert_eq!(c.session().nix_version.as_deref(), Some("2.8.0"));
        c.set_options(&ClientOptions::default()).unwrap();
        let (has, lacks) = (path(1, "has"), path(2, "lacks"));
        let valid = c.query_valid_paths(&[has.clone(), lacks.clone()].into(), true).unwrap();
        assert_eq!(valid, [has].into());
        let entry = ValidPathInfo { path: lacks.clone(), info: info(&lacks) };
        c.add_multiple_to_store(std::slice::from_ref(&entry), true, &mut |_, w| w.write_all(b"12345678")).unwrap();
        let drv = BasicDerivation { builder: "/bin/sh".into(), platform: "x86_64-linux".into(), ..Default::default() };
        let mut lines = Vec::new();
        let r = c
            .build_derivation(&path(3, "x.drv"), &drv, BuildMode::Normal, &mut |m| lines.push(format!("{m:?}")))
            .unwrap();
        assert_eq!((r.status, lines.len()), (BuildStatus::Built, 1));
        // A refusal is the daemon's answer: the session goes on.
        let refused = BasicDerivation { builder: "fail".into(), ..drv };
        match c.build_derivation(&path(3, "x.drv"), &refused, BuildMode::Normal, &mut |_| {}) {
            Err(ClientError::Remote(e)) => assert_eq!(e.message, "not trusted"),
            other => panic!("{other:?}"),
        }
        let out = path(4, "out");
        assert_eq!(c.query_path_info(&out).unwrap().unwrap().sigs, info(&out).sigs);
        assert_eq!(c.query_path_info(&path(5, "gone")).unwrap(), None);
        let nar = c
            .nar_from_path(&out, |r| {
                let mut b = [0u8; 9];
                r.read_exact(&mut b).map(|_| b)
            })
            .unwrap()
            .unwrap();
        assert_eq!(&nar, b"NAR-BYTES");
        drop(c);
        let seen = server.join().unwrap();
        assert_eq!(
            seen,
            [
                "SetOptions",
                "QueryValidPaths",
                "AddMultipleToStore",
                &format!("got {} 12345678", lacks.name()),
                "BuildDerivation",
                "BuildDerivation",
                "QueryPathInfo",
                "QueryPathInfo",
                "NarFromPath"
            ]
        );
    }

    #[test]
    fn a_daemon_sending_garbage_is_a_protocol_error_not_a_panic() {
        for garbage in [&b""[..], &b"not a nix daemon at all"[..], &[0xff; 64][..]] {
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            theirs.write_all(garbage).unwrap();
            drop(theirs);
            let r = Client::connect(
                BufReader::new(ours.try_clone().unwrap()),
                BufWriter::new(ours),
                dir(),
                Limits::default(),
            );
            assert!(matches!(r, Err(ClientError::Protocol(_))), "{garbage:?}");
        }
    }
}
