//! The crate against real Nix 2.8, both ways:
//!
//! - `nix-store` and `nix path-info` as clients of a tiny daemon built from this crate that
//!   answers from a fixed table (handshake, `SetOptions`, `IsValidPath`, `QueryValidPaths`,
//!   `QueryPathInfo`, `QueryReferrers`, errors for everything else);
//! - this crate's client against `nix-daemon --stdio` on a private store: handshake,
//!   `SetOptions`, `AddTextToStore`, `AddToStore` and `AddToStoreNar` with framed payloads,
//!   `IsValidPath`, `QueryPathInfo`, `NarFromPath`, `QueryReferrers`, a failing `BuildPaths`
//!   (the error format of 1.26+) after which the connection keeps working.
//!
//! Skipped with a message when Nix is not installed, unless `CAIRN_REQUIRE_PEERS=1`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};

use cairn_nix::nar::{NarReader, NarWriter};
use cairn_nix::{ContentAddress, FileIngestionMethod, Hash, HashAlgo, StoreDir, StorePath};
use cairn_tests::require_peer;
use cairn_worker::*;

fn store_dir() -> StoreDir {
    StoreDir::new("/nix/store").unwrap()
}

/// An environment in which Nix reads no system configuration and writes only under `dir`.
fn nix_env(cmd: &mut Command, dir: &Path) {
    let conf = dir.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("nix.conf"), "build-users-group =\nsubstituters =\nsandbox = false\n").unwrap();
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("NIX_CONF_DIR", &conf)
        .env("NIX_STATE_DIR", dir.join("state"))
        .env("NIX_LOG_DIR", dir.join("log"))
        .env("XDG_CACHE_HOME", dir.join("cache"));
}

fn nar_of_file(contents: &[u8]) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.regular(None, false, contents.len() as u64, &mut &contents[..]).unwrap();
    w.finish().unwrap()
}

// ---------------------------------------------------------------------------------------
// Nix's client against a daemon built from this crate.

struct Table {
    infos: BTreeMap<StorePath, PathInfo>,
}

impl Table {
    fn new() -> (Table, StorePath, StorePath) {
        let dep = StorePath::from_base_name("7rjj86a15146cq1d3qy068lml7n8ykzm-dep-1.0").unwrap();
        let top = StorePath::from_base_name("0hm2f1psjpcwg8fijsmr4wwxrx59s092-top-1.0").unwrap();
        let deriver = StorePath::from_base_name("kzqrmz5g4gfpvvbcr6fnpf8gsm1ikvf3-top-1.0.drv").unwrap();
        let info = |nar: &[u8], refs: &[&StorePath]| PathInfo {
            deriver: None,
            nar_hash: Hash::digest(HashAlgo::Sha256, nar),
            references: refs.iter().map(|p| (*p).clone()).collect(),
            registration_time: 1_700_000_000,
            nar_size: nar.len() as u64,
            ultimate: true,
            sigs: BTreeSet::new(),
            ca: None,
        };
        let mut infos = BTreeMap::new();
        infos.insert(dep.clone(), info(&nar_of_file(b"dep"), &[]));
        let mut top_info = info(&nar_of_file(b"top"), &[&dep, &top]);
        top_info.deriver = Some(deriver);
        top_info.sigs.insert("cache.example.org-1:c2lnbmF0dXJl".into());
        top_info.ca = Some(ContentAddress::Fixed {
            method: FileIngestionMethod::Recursive,
            hash: Hash::digest(HashAlgo::Sha256, b"x"),
        });
        infos.insert(top.clone(), top_info);
        (Table { infos }, dep, top)
    }

    fn answer(&self, req: &Request) -> std::result::Result<Response, String> {
        Ok(match req {
            Request::SetOptions(_) => Response::Nothing,
            Request::IsValidPath(p) => Response::Bool(self.infos.contains_key(p)),
            Request::QueryValidPaths { paths, .. } => {
                Response::PathSet(paths.iter().filter(|p| self.infos.contains_key(*p)).cloned().collect())
            }
            Request::QueryPathInfo(p) => Response::PathInfo(self.infos.get(p).cloned()),
            Request::QueryReferrers(p) => Response::PathSet(
                self.infos.iter().filter(|(_, i)| i.references.contains(p)).map(|(q, _)| q.clone()).collect(),
            ),
            Request::AddTempRoot(_) | Request::EnsurePath(_) | Request::BuildPaths { .. } => Response::One,
            Request::QueryMissing(_) => Response::Missing(Missing::default()),
            other => return Err(format!("operation {:?} is not supported by this test daemon", other.op())),
        })
    }
}

/// Serves one connection; returns the requests it saw.
fn serve(stream: UnixStream, table: &Table) -> Result<Vec<Request>> {
    let mut r = BufReader::new(stream.try_clone()?);
    let mut w = BufWriter::new(stream);
    let hello = ServerHello {
        version: ProtocolVersion::MAX,
        nix_version: "cairn-worker-test".into(),
        trust: Some(TrustedFlag::Trusted),
        features: BTreeSet::new(),
    };
    let mut io = Duplex { r: &mut r, w: &mut w };
    let session = server_handshake(&mut io, &hello, &Limits::default())?;
    assert_eq!(session.client_version, ProtocolVersion::NIX_2_8);
    assert_eq!(session.version, ProtocolVersion::NIX_2_8);
    let proto = Proto::new(session.version, store_dir());
    StderrMessage::Last.write(&mut w, proto.version)?;
    w.flush()?;
    let mut seen = Vec::new();
    while let Some(req) = Request::read(&mut r, &proto)? {
        // Structured logging around every answer, as nix-daemon's activities are.
        let activity = StderrMessage::StartActivity {
            id: 42,
            level: Verbosity::Info,
            kind: ActivityType::Builds,
            text: String::new(),
            fields: Vec::new(),
            parent: 0,
        };
        activity.write(&mut w, proto.version)?;
        let fields = vec![Field::Int(1), Field::Int(2), Field::Int(0), Field::Int(0)];
        StderrMessage::Result { id: 42, kind: ResultType::Progress, fields }.write(&mut w, proto.version)?;
        StderrMessage::StopActivity { id: 42 }.write(&mut w, proto.version)?;
        match table.answer(&req) {
            Ok(resp) => {
                StderrMessage::Last.write(&mut w, proto.version)?;
                resp.write(&mut w, &proto)?;
            }
            Err(msg) => StderrMessage::Error(RemoteError::new(msg)).write(&mut w, proto.version)?,
        }
        w.flush()?;
        seen.push(req);
    }
    Ok(seen)
}

/// Runs a Nix command against a fresh test daemon; returns its output and the requests seen.
fn run_against_table(dir: &Path, args: &[&str]) -> (std::process::Output, Vec<Request>) {
    let sock = dir.join("sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (table, _, _) = Table::new();
        let mut seen = Vec::new();
        // Nix may open more than one connection; serve them one after another until the
        // client is done (the main thread connects once more to stop us).
        for stream in listener.incoming() {
            let stream = stream.unwrap();
            match serve(stream, &table) {
                Ok(reqs) => seen.extend(reqs),
                Err(Error::Truncated) => break, // the stop connection
                Err(e) => panic!("test daemon: {e}"),
            }
        }
        seen
    });
    let mut cmd = Command::new(args[0]);
    nix_env(&mut cmd, dir);
    let store = format!("unix://{}", sock.display());
    cmd.args(&args[1..]).args(["--store", &store]);
    let out = cmd.output().unwrap();
    UnixStream::connect(&sock).unwrap();
    let seen = server.join().unwrap();
    (out, seen)
}

#[test]
fn nix_clients_read_answers_written_by_this_crate() {
    if !require_peer("nix-store") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (table, dep, top) = Table::new();
    let sd = store_dir();
    let top_s = sd.display(&top);
    let dep_s = sd.display(&dep);

    // References through QueryPathInfo.
    let (out, seen) = run_against_table(dir.path(), &["nix-store", "-q", "--references", &top_s]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "nix-store failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort();
    let mut want = vec![dep_s.as_str(), top_s.as_str()];
    want.sort();
    assert_eq!(lines, want);
    assert!(matches!(seen[0], Request::SetOptions(_)), "{seen:?}");
    assert!(seen.contains(&Request::QueryPathInfo(top.clone())), "{seen:?}");

    // The closure, the NAR hash (printed by Nix from our base16), size and deriver.
    let (out, _) = run_against_table(dir.path(), &["nix-store", "-qR", &top_s]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    let info = &table.infos[&top];
    let (out, _) = run_against_table(dir.path(), &["nix-store", "-q", "--hash", &top_s]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{}\n", info.nar_hash), "{out:?}");
    let (out, _) = run_against_table(dir.path(), &["nix-store", "-q", "--size", &top_s]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{}\n", info.nar_size), "{out:?}");
    let (out, _) = run_against_table(dir.path(), &["nix-store", "-q", "--deriver", &top_s]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), sd.display(info.deriver.as_ref().unwrap()));
    let (out, _) = run_against_table(dir.path(), &["nix-store", "-q", "--referrers", &dep_s]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), top_s);

    // Validity: an unknown path is invalid (IsValidPath or QueryValidPaths).
    let missing = sd.display(&StorePath::from_base_name("00000000000000000000000000000000-missing").unwrap());
    let (out, _) =
        run_against_table(dir.path(), &["nix-store", "--check-validity", "--print-invalid", &top_s, &missing]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), missing);

    // Every field of the path info, as `nix path-info --json` shows it.
    let (out, _) = run_against_table(
        dir.path(),
        &["nix", "--extra-experimental-features", "nix-command", "path-info", "--json", &top_s],
    );
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "nix path-info failed: {}", String::from_utf8_lossy(&out.stderr));
    for needle in [
        format!("\"narHash\":\"{}\"", info.nar_hash.to_sri()),
        format!("\"narSize\":{}", info.nar_size),
        "\"ultimate\":true".to_string(),
        "\"registrationTime\":1700000000".to_string(),
        format!("\"ca\":\"{}\"", info.ca.as_ref().unwrap()),
        "\"signatures\":[\"cache.example.org-1:c2lnbmF0dXJl\"]".to_string(),
    ] {
        assert!(json.contains(&needle), "{needle} not in {json}");
    }

    // An error from the daemon reaches the user in Nix's words, and the exit status fails.
    let (out, _) = run_against_table(dir.path(), &["nix-store", "--optimise"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("OptimiseStore is not supported by this test daemon"), "{stderr}");
}

// ---------------------------------------------------------------------------------------
// This crate's client against `nix-daemon --stdio`.

struct Daemon {
    child: std::process::Child,
    r: BufReader<std::process::ChildStdout>,
    w: BufWriter<std::process::ChildStdin>,
    proto: Proto,
}

/// `nix-daemon --stdio` on a private store under `dir`.
fn nix_daemon_stdio(dir: &Path) -> std::process::Child {
    let mut cmd = Command::new("nix-daemon");
    nix_env(&mut cmd, dir);
    let store = format!("local?root={}", dir.join("root").display());
    cmd.args(["--stdio", "--store", &store])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        let mut child = nix_daemon_stdio(dir);
        let r = BufReader::new(child.stdout.take().unwrap());
        let w = BufWriter::new(child.stdin.take().unwrap());
        let proto = Proto::new(ProtocolVersion::MAX, store_dir());
        Daemon { child, r, w, proto }
    }

    fn handshake(&mut self) -> ClientSession {
        let hello = ClientHello { version: ProtocolVersion::MAX, features: BTreeSet::new() };
        let session = client_handshake(&mut Duplex { r: &mut self.r, w: &mut self.w }, &hello, &self.proto.limits)
            .expect("handshake with nix-daemon");
        self.proto.version = session.version;
        self.stderr().expect("startup messages");
        session
    }

    /// Reads logger messages up to the result; the daemon's error, if it sent one.
    fn stderr(&mut self) -> std::result::Result<(), RemoteError> {
        read_until_last(&mut self.r, self.proto.version, &self.proto.limits, |_| Ok(())).unwrap()
    }

    fn send(&mut self, req: &Request) {
        req.write(&mut self.w, &self.proto).unwrap();
        self.w.flush().unwrap();
    }

    fn call(&mut self, req: &Request) -> std::result::Result<Response, RemoteError> {
        self.send(req);
        self.stderr()?;
        Ok(Response::read(req.op(), &mut self.r, &self.proto).unwrap())
    }

    fn send_framed(&mut self, data: &[u8]) {
        let mut fw = FramedWriter::with_chunk_size(&mut self.w, 1000);
        fw.write_all(data).unwrap();
        fw.finish().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn this_client_talks_to_nix_daemon() {
    if !require_peer("nix-daemon") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let session = d.handshake();
    assert_eq!(session.daemon_version, ProtocolVersion::NIX_2_8);
    assert_eq!(session.version, ProtocolVersion::NIX_2_8);
    assert_eq!(session.nix_version.as_deref(), Some("2.8.0"));
    assert_eq!(session.trust, None, "1.34 has no trust field");

    let options = ClientOptions { keep_going: true, ..ClientOptions::default() };
    assert_eq!(d.call(&Request::SetOptions(options)), Ok(Response::Nothing));

    // AddTextToStore: the path Nix computes is the one cairn-nix computes.
    let sd = store_dir();
    let text = b"hello from cairn-worker\n";
    let want = sd.make_text_path("hello.txt", &Hash::digest(HashAlgo::Sha256, text), &BTreeSet::new()).unwrap();
    let req = Request::AddTextToStore { name: "hello.txt".into(), text: text.to_vec(), references: BTreeSet::new() };
    assert_eq!(d.call(&req), Ok(Response::Path(want.clone())));
    assert_eq!(d.call(&Request::IsValidPath(want.clone())), Ok(Response::Bool(true)));

    // QueryPathInfo: NAR hash and size of the file's NAR, the text content address.
    let nar = nar_of_file(text);
    let Ok(Response::PathInfo(Some(info))) = d.call(&Request::QueryPathInfo(want.clone())) else {
        panic!("no path info")
    };
    assert_eq!(info.nar_hash, Hash::digest(HashAlgo::Sha256, &nar));
    assert_eq!(info.nar_size, nar.len() as u64);
    assert_eq!(info.ca, Some(ContentAddress::Text(Hash::digest(HashAlgo::Sha256, text))));
    let missing = StorePath::from_base_name("00000000000000000000000000000000-missing").unwrap();
    assert_eq!(d.call(&Request::QueryPathInfo(missing.clone())), Ok(Response::PathInfo(None)));
    assert_eq!(d.call(&Request::IsValidPath(missing.clone())), Ok(Response::Bool(false)));

    // AddToStore (1.25+) with a framed NAR, referring to the text file.
    let tree_nar = nar_of_file(b"#!/bin/sh\necho hi\n");
    let refs: BTreeSet<StorePath> = [want.clone()].into();
    let req = Request::AddToStore {
        name: "script".into(),
        method: CaMethod::Fixed { method: FileIngestionMethod::Recursive, algo: HashAlgo::Sha256 },
        references: refs.clone(),
        repair: false,
    };
    d.send(&req);
    d.send_framed(&tree_nar);
    d.stderr().unwrap();
    let Response::ValidPathInfo(added) = Response::read(req.op(), &mut d.r, &d.proto).unwrap() else { panic!() };
    let want_script = sd
        .make_fixed_output_path(
            "script",
            FileIngestionMethod::Recursive,
            &Hash::digest(HashAlgo::Sha256, &tree_nar),
            &refs,
            false,
        )
        .unwrap();
    assert_eq!(added.path, want_script);
    assert_eq!(added.info.references, refs);
    assert_eq!(d.call(&Request::QueryReferrers(want.clone())), Ok(Response::PathSet([want_script.clone()].into())));

    // AddToStoreNar with framed NAR bytes (trusted: `--stdio` trusts its client), then the
    // NAR read back with NarFromPath.
    let contents = b"imported as a NAR\n";
    let nar = nar_of_file(contents);
    let nar_hash = Hash::digest(HashAlgo::Sha256, &nar);
    let ca = ContentAddress::Fixed { method: FileIngestionMethod::Recursive, hash: nar_hash.clone() };
    let path = sd
        .make_fixed_output_path("imported", FileIngestionMethod::Recursive, &nar_hash, &BTreeSet::new(), false)
        .unwrap();
    let info = ValidPathInfo {
        path: path.clone(),
        info: PathInfo {
            deriver: None,
            nar_hash,
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size: nar.len() as u64,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: Some(ca),
        },
    };
    let req = Request::AddToStoreNar { info, repair: false, dont_check_sigs: true };
    assert_eq!(req.payload(&d.proto), Payload::Framed);
    d.send(&req);
    d.send_framed(&nar);
    d.stderr().unwrap();
    assert_eq!(d.call(&Request::IsValidPath(path.clone())), Ok(Response::Bool(true)));
    assert_eq!(d.call(&Request::NarFromPath(path.clone())), Ok(Response::Nar));
    let mut got = Vec::new();
    {
        let tee = Tee { r: &mut d.r, copy: &mut got };
        let mut nr = NarReader::new(tee, Default::default()).unwrap();
        nr.skip_to_end().unwrap();
    }
    assert_eq!(got, nar);

    // A failing request: the error in the 1.26+ format, and the connection still in sync.
    let req = Request::BuildPaths { paths: vec![DerivedPath::Opaque(missing.clone())], mode: BuildMode::Normal };
    let err = d.call(&req).unwrap_err();
    assert!(err.message.contains("missing"), "{err:?}");
    assert_eq!(d.call(&Request::IsValidPath(want.clone())), Ok(Response::Bool(true)));

    // An op Nix 2.8 removed is refused by Nix too ("invalid operation").
    write_u64_raw(&mut d.w, WorkerOp::QueryFailedPaths.to_u64());
    d.w.flush().unwrap();
    let err = d.stderr().unwrap_err();
    assert!(err.message.contains("invalid operation"), "{err:?}");
}

fn write_u64_raw(w: &mut impl Write, n: u64) {
    w.write_all(&n.to_le_bytes()).unwrap();
}

struct Tee<'a, R> {
    r: &'a mut R,
    copy: &'a mut Vec<u8>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        self.copy.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Paths sent with `add_multiple_to_store` reach a real nix-daemon whatever the session's
/// version: one `AddMultipleToStore` from 1.32, else one `AddToStoreNar` each, its NAR framed
/// (1.23+), pulled by the daemon (1.21–1.22: Nix 2.3 speaks 1.21) or bare (before); and
/// pipelined `QueryPathInfo`s read them back, an invalid path among them.
#[test]
fn paths_reach_nix_daemon_and_are_read_back_at_every_protocol_version() {
    if !require_peer("nix-daemon") {
        return;
    }
    for minor in [34u8, 30, 22, 21, 20, 17, 16] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = nix_daemon_stdio(dir.path());
        let r = BufReader::new(child.stdout.take().unwrap());
        let w = BufWriter::new(child.stdin.take().unwrap());
        let version = ProtocolVersion::new(1, minor);
        let mut c = Client::connect_offering(r, w, store_dir(), Limits::default(), version).unwrap();
        assert_eq!(c.session().version, version);
        // Two content-addressed paths (no signature needed), the second larger than a
        // tunnelled chunk or a frame.
        let sd = store_dir();
        let mut entries = Vec::new();
        let mut nars = Vec::new();
        for (name, contents) in [("first", format!("first at 1.{minor}\n")), ("second", "second\n".repeat(3000))] {
            let nar = nar_of_file(contents.as_bytes());
            let nar_hash = Hash::digest(HashAlgo::Sha256, &nar);
            let ca = ContentAddress::Fixed { method: FileIngestionMethod::Recursive, hash: nar_hash.clone() };
            let path = sd
                .make_fixed_output_path(name, FileIngestionMethod::Recursive, &nar_hash, &BTreeSet::new(), false)
                .unwrap();
            let info = PathInfo { ca: Some(ca), ..PathInfo::bare(None, nar_hash, BTreeSet::new(), nar.len() as u64) };
            entries.push(ValidPathInfo { path, info });
            nars.push(nar);
        }
        let mut next = nars.iter();
        c.add_multiple_to_store(&entries, false, &mut |_, w| w.write_all(next.next().unwrap())).unwrap();
        for (e, nar) in entries.iter().zip(&nars) {
            let info = c.query_path_info(&e.path).unwrap().unwrap_or_else(|| panic!("1.{minor}: {} missing", e.path));
            assert_eq!(info.nar_hash, Hash::digest(HashAlgo::Sha256, nar), "1.{minor}");
        }
        // Pipelined, with an invalid path among them (an error before 1.17, `None` since).
        let missing = StorePath::from_base_name("00000000000000000000000000000000-missing").unwrap();
        let mut asked: Vec<StorePath> = entries.iter().map(|e| e.path.clone()).collect();
        asked.insert(1, missing);
        asked.extend(std::iter::repeat_n(asked[0].clone(), 40));
        let infos = c.query_path_infos(&asked).unwrap();
        assert_eq!(infos.len(), asked.len(), "1.{minor}");
        assert!(infos[1].is_none(), "1.{minor}");
        assert_eq!(infos[2].as_ref().map(|i| i.nar_size), Some(nars[1].len() as u64), "1.{minor}");
        assert!(infos.iter().enumerate().all(|(i, v)| i == 1 || v.is_some()), "1.{minor}");
        drop(c);
        let _ = child.kill();
        let _ = child.wait();
    }
}
