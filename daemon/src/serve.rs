//! `cairnd --serve [--write]`: Nix's legacy SSH protocol on standard input and output, as
//! `nix-store --serve` speaks it — what Nix runs on the other end of an `ssh://` store: `nix
//! copy --to/--from 'ssh://HOST?remote-program=cairnd'`, and remote builders named `ssh://`
//! (NixOS's default `protocol = "ssh"`) or by a bare host name, with the same
//! `remote-program`.
//!
//! Each command becomes requests of Nix's worker protocol to the daemon that owns the store —
//! what `nix-store --serve` does on a machine where a `nix-daemon` owns the store. So the
//! session is that daemon's, with the rights of whoever runs this (SO_PEERCRED on its
//! `nix-daemon-socket`): an untrusted user's imports need signatures there and its
//! derivations must be content-addressed, as through any other door. When no cairnd serves
//! the store, one session is opened in this process, and the caller, who could open the
//! store, is trusted (as with `--stdio`).
//!
//! As `nix-store --serve`: without `--write` only queries and downloads are answered; an
//! error that is not a build's (a refused import, an invalid path to dump) is printed on
//! standard error and ends the session with status 1; log lines of builds go to standard
//! error, which an `ssh://` builder shows as the build's log. Where `nix-store --serve`
//! through a daemon drops the build settings a client sends (Nix's own FIXME), max-silent-time,
//! timeout and keep-failed are passed on here before each build.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use cairn_nix::export::{read_marker, read_trailer, write_end_marker, write_next_marker, write_trailer, ExportTrailer};
use cairn_nix::hash::Hasher;
use cairn_nix::{HashAlgo, StoreDir, StorePath};
use cairn_worker::serve::{self, ServeBuildSettings, ServeRequest};
use cairn_worker::{
    BuildMode, Client, ClientError, ClientOptions, Field, Limits, PathInfo, ResultType, StderrMessage, ValidPathInfo,
};

use crate::args::StoreArgs;

type Daemon = Client<BufReader<UnixStream>, BufWriter<UnixStream>>;

/// Runs one serve session on standard input and output.
pub fn run_serve(args: &StoreArgs, write: bool) -> anyhow::Result<()> {
    let settings = args.settings(true)?;
    crate::stdio_logging();
    let dir = StoreDir::new(&settings.store_dir).map_err(|e| anyhow!("store-dir: {e}"))?;
    // A session in this process, when no daemon answers, lives as long as this runtime; its
    // thread ends when this side of the socket pair closes.
    let mut here = None;
    let connect = |p: &std::path::PathBuf| {
        cairn_api::socket::SocketAddress::of(p).and_then(|at| UnixStream::connect(at.path())).ok()
    };
    let stream = match settings.nix_daemon_socket.as_ref().and_then(connect) {
        Some(stream) => stream,
        None => {
            let (ours, theirs) = UnixStream::pair()?;
            let (rt, state) = crate::open_here(args, &settings)?;
            let handle = rt.handle().clone();
            let session = std::thread::Builder::new().name("nix-session".into()).spawn(move || {
                if let Err(e) = crate::listen::nix::serve_trusted(state, handle, theirs) {
                    tracing::debug!("serve: the session ended: {e}");
                }
            })?;
            here = Some((rt, session));
            ours
        }
    };
    let reader = BufReader::with_capacity(1 << 16, stream.try_clone()?);
    let watched = stream.try_clone()?;
    let daemon = Client::connect(reader, BufWriter::with_capacity(1 << 16, stream), dir.clone(), Limits::default())
        .map_err(|e| anyhow!("cannot open a session with the daemon: {e}"))?;
    let stdin = io::stdin();
    let stdout = io::stdout();
    let mut session = Serve {
        daemon,
        dir,
        write,
        client: 0,
        watch: std::os::fd::AsFd::as_fd(&stdin).try_clone_to_owned().ok().map(|fd| (fd, watched)),
        input: BufReader::with_capacity(1 << 16, stdin.lock()),
        output: BufWriter::with_capacity(1 << 16, stdout.lock()),
    };
    let ran = session.run();
    drop(session);
    if let Some((rt, session)) = here {
        let _ = session.join();
        drop(rt);
    }
    ran
}

/// One session: the client's end (`input`, `output`) and the daemon's.
struct Serve<R: Read, W: Write> {
    daemon: Daemon,
    dir: StoreDir,
    write: bool,
    /// The version the client greeted with.
    client: u64,
    /// The client's end (a duplicate of standard input) and the daemon session's, for
    /// [`Serve::while_client_stays`].
    watch: Option<(std::os::fd::OwnedFd, UnixStream)>,
    input: R,
    output: W,
}

/// What a daemon's refusal or a broken session reads as.
fn daemon_error(e: ClientError) -> anyhow::Error {
    anyhow!("{e}")
}

impl<R: Read, W: Write> Serve<R, W> {
    fn run(&mut self) -> anyhow::Result<()> {
        self.client = serve::server_greeting(&mut self.input, &mut self.output).map_err(|e| match e {
            cairn_worker::Error::BadMagic(_) => anyhow!("protocol mismatch"),
            e => anyhow!("{e}"),
        })?;
        loop {
            let req = match ServeRequest::read(&mut self.input, &self.dir, Limits::default(), self.client) {
                Ok(Some(req)) => req,
                Ok(None) => return Ok(()),
                Err(cairn_worker::Error::UnknownOp(n)) => bail!("unknown serve command {n}"),
                Err(e) => bail!("bad request: {e}"),
            };
            tracing::debug!(command = ?req.command(), "serve");
            self.perform(req)?;
            self.output.flush()?;
        }
    }

    fn require_write(&self, what: &str) -> anyhow::Result<()> {
        if self.write {
            Ok(())
        } else {
            bail!("{what} is not allowed")
        }
    }

    fn perform(&mut self, req: ServeRequest) -> anyhow::Result<()> {
        match req {
            ServeRequest::QueryValidPaths { lock, substitute, paths } => {
                if lock && self.write {
                    for p in &paths {
                        self.daemon.add_temp_root(p).map_err(daemon_error)?;
                    }
                }
                let valid = self.daemon.query_valid_paths(&paths, substitute && self.write).map_err(daemon_error)?;
                let proto = self.proto();
                cairn_worker::codec::write_path_set(&mut self.output, &proto, &valid)?;
            }
            ServeRequest::QueryPathInfos(paths) => {
                let paths: Vec<StorePath> = paths.into_iter().collect();
                let answers = self.daemon.query_path_infos(&paths).map_err(daemon_error)?;
                let infos = paths.iter().zip(&answers).filter_map(|(p, i)| i.as_ref().map(|i| (p, i)));
                serve::write_path_infos(&mut self.output, &self.dir, self.client, infos)?;
            }
            ServeRequest::DumpStorePath(p) => {
                let info = self.valid(&p)?;
                self.dump(&p, info.nar_size)?;
            }
            ServeRequest::ImportPaths => {
                self.require_write("importing paths")?;
                self.import()?;
                cairn_worker::codec::write_u64(&mut self.output, 1)?;
            }
            ServeRequest::ExportPaths(paths) => self.export(&paths)?,
            ServeRequest::BuildPaths { paths, settings } => {
                self.require_write("building paths")?;
                self.set_options(&settings)?;
                let built =
                    self.while_client_stays(|s| s.daemon.build_paths(&paths, BuildMode::Normal, &mut log_to_stderr));
                match built {
                    Ok(()) => serve::write_build_paths_result(&mut self.output, None)?,
                    // Nix's status through a daemon: an error's default, 1.
                    Err(ClientError::Remote(e)) => {
                        serve::write_build_paths_result(&mut self.output, Some((1, &shown_error(&e.message))))?
                    }
                    Err(e) => return Err(daemon_error(e)),
                }
            }
            ServeRequest::QueryClosure { include_outputs, paths } => {
                let closure = self.closure(paths, include_outputs)?;
                let proto = self.proto();
                cairn_worker::codec::write_path_set(&mut self.output, &proto, &closure)?;
            }
            ServeRequest::BuildDerivation { drv_path, drv, settings } => {
                self.require_write("building paths")?;
                self.set_options(&settings)?;
                let result = self
                    .while_client_stays(|s| {
                        s.daemon.build_derivation(&drv_path, &drv, BuildMode::Normal, &mut log_to_stderr)
                    })
                    .map_err(daemon_error)?;
                serve::write_build_result(&mut self.output, self.client, &result)?;
            }
            ServeRequest::AddToStoreNar(info) => {
                self.require_write("importing paths")?;
                let size = info.info.nar_size;
                let input = &mut self.input;
                self.daemon
                    .add_multiple_to_store(std::slice::from_ref(&info), true, &mut |_, w| {
                        let copied = io::copy(&mut input.take(size), w)?;
                        if copied < size {
                            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the NAR ended early"));
                        }
                        Ok(())
                    })
                    .map_err(daemon_error)?;
                cairn_worker::codec::write_u64(&mut self.output, 1)?;
            }
        }
        Ok(())
    }

    /// Runs a build while watching the client's end, as `nix-store --serve` does
    /// (`MonitorFdHup`): when the client hangs up, the session with the daemon is shut down,
    /// which stops the build there, and the request fails.
    fn while_client_stays<T>(
        &mut self,
        build: impl FnOnce(&mut Self) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        let done = Arc::new(AtomicBool::new(false));
        let hung_up = Arc::new(AtomicBool::new(false));
        let watcher = self.watch.as_ref().and_then(|(fd, stream)| {
            let (fd, stream) = (fd.try_clone().ok()?, stream.try_clone().ok()?);
            let (done, hung_up) = (done.clone(), hung_up.clone());
            std::thread::Builder::new()
                .name("serve-watch".into())
                .spawn(move || {
                    while !done.load(Ordering::Relaxed) {
                        // No events asked: only a hang-up or an error is reported.
                        let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(&fd), PollFlags::empty())];
                        let polled = nix::poll::poll(&mut fds, PollTimeout::from(200u16));
                        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
                        if polled.is_ok_and(|n| n > 0) && revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                            hung_up.store(true, Ordering::Relaxed);
                            let _ = stream.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                    }
                })
                .ok()
        });
        let result = build(self);
        done.store(true, Ordering::Relaxed);
        if let Some(w) = watcher {
            let _ = w.join();
        }
        match result {
            Err(_) if hung_up.load(Ordering::Relaxed) => Err(ClientError::Protocol(cairn_worker::Error::Io(
                io::Error::other("the client hung up: the build was stopped"),
            ))),
            r => r,
        }
    }

    /// The codec settings for the worker-protocol helpers that serve shares (path sets).
    fn proto(&self) -> cairn_worker::Proto {
        cairn_worker::Proto::new(cairn_worker::ProtocolVersion::NIX_2_8, self.dir.clone())
    }

    /// A valid path's metadata, or Nix's error for an invalid one.
    fn valid(&mut self, p: &StorePath) -> anyhow::Result<PathInfo> {
        self.daemon.query_path_info(p).map_err(daemon_error)?.ok_or_else(|| {
            let shown = self.dir.display(p);
            anyhow!("path '{shown}' is not valid")
        })
    }

    /// Copies a valid path's NAR (`size` bytes) from the daemon to the client.
    fn dump(&mut self, p: &StorePath, size: u64) -> anyhow::Result<()> {
        copy_nar(&mut self.daemon, &self.dir, p, size, &mut self.output)
    }

    /// Tells the daemon the client's build settings, and what `nix-store --serve` sets itself
    /// (no substitution, errors only, build output shown).
    fn set_options(&mut self, s: &ServeBuildSettings) -> anyhow::Result<()> {
        let mut overrides = BTreeMap::new();
        if s.build_timeout > 0 {
            overrides.insert("timeout".to_owned(), s.build_timeout.to_string());
        }
        if s.max_log_size > 0 {
            overrides.insert("max-build-log-size".to_owned(), s.max_log_size.to_string());
        }
        // A client's jobs only tighten the daemon's own `max-jobs`: ask for no limit of ours.
        // Cores as `nix-store --serve` sends them by default: this machine's.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let options = ClientOptions {
            keep_failed: s.keep_failed,
            max_build_jobs: u32::MAX,
            max_silent_time: s.max_silent_time,
            build_cores: cores,
            use_substitutes: false,
            overrides,
            ..ClientOptions::default()
        };
        self.daemon.set_options(&options).map_err(daemon_error)
    }

    /// The closure of `paths` (with the valid outputs of the derivations in it, if asked), as
    /// `computeFSClosure`; an invalid path is an error.
    /// A level of the closure at a time, its metadata asked pipelined.
    fn closure(&mut self, paths: BTreeSet<StorePath>, include_outputs: bool) -> anyhow::Result<BTreeSet<StorePath>> {
        let mut seen = BTreeSet::new();
        let mut level: Vec<StorePath> = paths.into_iter().collect();
        while !level.is_empty() {
            let answers = self.daemon.query_path_infos(&level).map_err(daemon_error)?;
            let mut next = BTreeSet::new();
            for (p, info) in level.into_iter().zip(answers) {
                let info = info.ok_or_else(|| anyhow!("path '{}' is not valid", self.dir.display(&p)))?;
                next.extend(info.references);
                if include_outputs && p.name().ends_with(".drv") {
                    let outputs = self.daemon.query_derivation_output_map(&p).map_err(daemon_error)?;
                    let outputs: Vec<StorePath> = outputs.into_values().flatten().collect();
                    let valid = self.daemon.query_path_infos(&outputs).map_err(daemon_error)?;
                    next.extend(outputs.into_iter().zip(valid).filter(|(_, v)| v.is_some()).map(|(o, _)| o));
                }
                seen.insert(p);
            }
            level = next.into_iter().filter(|r| !seen.contains(r)).collect();
        }
        Ok(seen)
    }

    /// Writes `paths` as `nix-store --export` does: references before referrers (the order of
    /// Nix's `topoSortPaths`, reversed), each NAR followed by its trailer.
    fn export(&mut self, paths: &BTreeSet<StorePath>) -> anyhow::Result<()> {
        let mut infos = BTreeMap::new();
        for p in paths {
            infos.insert(p.clone(), self.valid(p)?);
        }
        for p in cairn_nix::references_first(infos.keys(), |p| infos.get(p).map(|i| &i.references)) {
            let info = &infos[&p];
            write_next_marker(&mut self.output)?;
            let mut hashing = cairn_nix::hash::HashingWriter::new(&mut self.output, HashAlgo::Sha256);
            copy_nar(&mut self.daemon, &self.dir, &p, info.nar_size, &mut hashing)?;
            let (sent, _, _) = hashing.finish();
            if sent != info.nar_hash {
                // Nix's exportPath refuses a path whose contents changed, after sending them.
                bail!(
                    "hash of path '{}' has changed from '{}' to '{}'!",
                    self.dir.display(&p),
                    info.nar_hash.encode(cairn_nix::hash::Encoding::Nix32),
                    sent.encode(cairn_nix::hash::Encoding::Nix32)
                );
            }
            let trailer = ExportTrailer {
                path: self.dir.display(&p),
                references: info.references.iter().map(|r| self.dir.display(r)).collect(),
                deriver: info.deriver.as_ref().map(|d| self.dir.display(d)),
            };
            write_trailer(&mut self.output, &trailer)?;
        }
        write_end_marker(&mut self.output)?;
        Ok(())
    }

    /// Reads an export stream from the client and adds its paths in one `AddMultipleToStore`:
    /// each NAR is spooled to a temporary file while it is hashed, since the daemon is told a
    /// path's hash and size before its NAR.
    fn import(&mut self) -> anyhow::Result<()> {
        let mut entries = Vec::new();
        // One file holds every NAR, one after the other, in the order they are sent on.
        let mut file = BufWriter::new(tempfile::tempfile().context("cannot make a temporary file")?);
        while read_marker(&mut self.input)? {
            let mut spool =
                Spool { input: &mut self.input, file: &mut file, hasher: Hasher::new(HashAlgo::Sha256), size: 0 };
            cairn_nix::nar::NarReader::new(&mut spool, cairn_nix::nar::Limits::default())?.skip_to_end()?;
            let (nar_hash, nar_size) = (spool.hasher.finish(), spool.size);
            let trailer = read_trailer(&mut self.input)?;
            let path = self.dir.parse(&trailer.path)?;
            let references =
                trailer.references.iter().map(|r| self.dir.parse(r)).collect::<Result<BTreeSet<_>, _>>()?;
            let deriver = trailer.deriver.as_deref().map(|d| self.dir.parse(d)).transpose()?;
            entries.push(ValidPathInfo { path, info: PathInfo::bare(deriver, nar_hash, references, nar_size) });
        }
        if entries.is_empty() {
            return Ok(());
        }
        let mut file = BufReader::with_capacity(1 << 16, file.into_inner().map_err(|e| e.into_error())?);
        file.rewind()?;
        self.daemon
            .add_multiple_to_store(&entries, true, &mut |e, w| {
                let copied = io::copy(&mut (&mut file).take(e.info.nar_size), w)?;
                if copied == e.info.nar_size {
                    Ok(())
                } else {
                    Err(io::Error::other("the spooled NAR is shorter than it was"))
                }
            })
            .map_err(daemon_error)
    }
}

/// Copies a valid path's NAR (`size` bytes) from the daemon to `out`.
fn copy_nar(daemon: &mut Daemon, dir: &StoreDir, p: &StorePath, size: u64, out: &mut dyn Write) -> anyhow::Result<()> {
    let copied = daemon
        .nar_from_path(p, |r| io::copy(&mut r.take(size), out))
        .map_err(daemon_error)?
        .context("copying the NAR")?;
    if copied != size {
        bail!("the daemon's NAR of '{}' ended after {copied} of {size} bytes", dir.display(p));
    }
    Ok(())
}

/// An error as Nix's `Error::msg()` renders it (`showErrorInfo`): a red `error:` before the
/// first line, the others indented under it, trailing blanks trimmed.
fn shown_error(message: &str) -> String {
    let mut out = String::new();
    for (i, line) in message.trim_end().split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let prefix = if i == 0 { "\x1b[31;1merror:\x1b[0m " } else { "       " };
        out.push_str(format!("{prefix}{line}").trim_end());
    }
    out
}

/// Reads through to a spool file, hashing what passes.
struct Spool<'a, R> {
    input: &'a mut R,
    file: &'a mut BufWriter<File>,
    hasher: Hasher,
    size: u64,
}

impl<R: Read> Read for Spool<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        self.file.write_all(&buf[..n])?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

/// Shows a build's output as `nix-store --serve` does at its verbosity (errors): the daemon's
/// log lines and the builder's output, on standard error.
fn log_to_stderr(m: StderrMessage) {
    let mut err = io::stderr().lock();
    let _ = match m {
        StderrMessage::Next(text) => err.write_all(text.as_bytes()),
        StderrMessage::Result { kind: ResultType::BuildLogLine, fields, .. } => match fields.first() {
            Some(Field::String(line)) => err.write_all(line).and_then(|()| err.write_all(b"\n")),
            _ => Ok(()),
        },
        _ => Ok(()),
    };
}
