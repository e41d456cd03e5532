//! Layouts Nix ships no test data for, pinned by bytes spelled out here from Nix 2.8's source
//! (the `<<`/`>>` lines cited beside each), independently of the crate's encoders: requests
//! as `RemoteStore` writes them and `performOp` reads them, logger messages as `TunnelLogger`
//! writes them, and the refusals a hostile client meets.

use std::collections::{BTreeMap, BTreeSet};

use cairn_nix::derivation::DerivationOutput;
use cairn_nix::{Hash, HashAlgo, StoreDir, StorePath};
use cairn_worker::*;

/// Builds bytes the way Nix's `Sink << …` does: numbers as u64 LE, strings length-prefixed
/// and zero-padded.
#[derive(Default)]
struct B(Vec<u8>);

impl B {
    fn u(mut self, n: u64) -> B {
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }
    fn s(mut self, s: &str) -> B {
        self = self.u(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self.0.resize(self.0.len().div_ceil(8) * 8, 0);
        self
    }
}

fn proto(minor: u8) -> Proto {
    Proto::new(ProtocolVersion::new(1, minor), StoreDir::new("/nix/store").unwrap())
}

const P1: &str = "/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-dep-1.0";
const P2: &str = "/nix/store/0hm2f1psjpcwg8fijsmr4wwxrx59s092-top-1.0";
const DRV: &str = "/nix/store/kzqrmz5g4gfpvvbcr6fnpf8gsm1ikvf3-top-1.0.drv";

fn sp(s: &str) -> StorePath {
    StoreDir::new("/nix/store").unwrap().parse(s).unwrap()
}

/// Reads `bytes` as a request at `minor`, checks it is `want` and that writing it gives the
/// same bytes back.
fn pin(minor: u8, bytes: &[u8], want: &Request) {
    let p = proto(minor);
    let mut r = bytes;
    let got = Request::read(&mut r, &p).unwrap().unwrap();
    assert_eq!(&got, want);
    assert!(r.is_empty(), "{} bytes left", r.len());
    let mut out = Vec::new();
    want.write(&mut out, &p).unwrap();
    assert_eq!(out, bytes, "{:?} at 1.{minor}", want.op());
}

#[test]
fn set_options() {
    // RemoteStore::setOptions: keepFailed, keepGoing, tryFallback, verbosity, maxBuildJobs,
    // maxSilentTime, true (useBuildHook), lvlError or lvlVomit, 0, 0, buildCores,
    // useSubstitutes, and from 1.12 the overrides.
    let head = B::default().u(19).u(0).u(1).u(0).u(3).u(4).u(5).u(1).u(0).u(0).u(0).u(6).u(1);
    let mut want = ClientOptions {
        keep_failed: false,
        keep_going: true,
        try_fallback: false,
        verbosity: Verbosity::Info,
        max_build_jobs: 4,
        max_silent_time: 5,
        verbose_build: true,
        build_cores: 6,
        use_substitutes: true,
        overrides: BTreeMap::new(),
    };
    pin(11, &head.0, &Request::SetOptions(want.clone()));
    want.overrides.insert("connect-timeout".into(), "5".into());
    let bytes = head.u(1).s("connect-timeout").s("5").0;
    pin(34, &bytes, &Request::SetOptions(want));
}

#[test]
fn add_to_store_nar() {
    // daemon.cc wopAddToStoreNar: path, deriver, narHash (base16), references,
    // registrationTime, narSize, ultimate, sigs, ca, repair, dontCheckSigs.
    let hash = Hash::digest(HashAlgo::Sha256, b"nar");
    let bytes = B::default()
        .u(39)
        .s(P2)
        .s(DRV)
        .s(&hash.encode(cairn_nix::hash::Encoding::Base16))
        .u(1)
        .s(P1)
        .u(1234)
        .u(5678)
        .u(0)
        .u(1)
        .s("k:c2ln")
        .s("")
        .u(0)
        .u(1);
    let want = Request::AddToStoreNar {
        info: ValidPathInfo {
            path: sp(P2),
            info: PathInfo {
                deriver: Some(sp(DRV)),
                nar_hash: hash,
                references: [sp(P1)].into(),
                registration_time: 1234,
                nar_size: 5678,
                ultimate: false,
                sigs: ["k:c2ln".to_string()].into(),
                ca: None,
            },
        },
        repair: false,
        dont_check_sigs: true,
    };
    // The layout is the same at every version (ValidPathInfo at format 16); the payload is not.
    for (minor, payload) in [(20, Payload::Nar), (22, Payload::Tunnelled), (23, Payload::Framed), (34, Payload::Framed)]
    {
        pin(minor, &bytes.0, &want);
        assert_eq!(want.payload(&proto(minor)), payload);
    }
}

#[test]
fn build_derivation() {
    // writeDerivation: outputs (name, path, hashAlgo, hash), inputSrcs, platform, builder,
    // args, env; then the build mode.
    let bytes = B::default()
        .u(36)
        .s(DRV)
        .u(1)
        .s("out")
        .s(P2)
        .s("")
        .s("")
        .u(1)
        .s(P1)
        .s("x86_64-linux")
        .s("/bin/sh")
        .u(2)
        .s("-c")
        .s("echo hi > $out")
        .u(1)
        .s("out")
        .s(P2)
        .u(2);
    let drv = BasicDerivation {
        outputs: [(
            "out".to_string(),
            DerivationOutput { path: P2.into(), hash_algo: String::new(), hash: String::new() },
        )]
        .into(),
        input_srcs: [sp(P1)].into(),
        platform: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), "echo hi > $out".into()],
        env: [("out".to_string(), P2.to_string())].into(),
    };
    pin(34, &bytes.0, &Request::BuildDerivation { drv_path: sp(DRV), drv, mode: BuildMode::Check });
}

#[test]
fn collect_garbage() {
    // RemoteStore::collectGarbage: action, pathsToDelete, ignoreLiveness, maxFreed, 0, 0, 0.
    let bytes = B::default().u(20).u(3).u(1).s(P1).u(0).u(u64::MAX).u(0).u(0).u(0);
    let want = Request::CollectGarbage(GcOptions {
        action: GcAction::DeleteSpecific,
        paths_to_delete: [sp(P1)].into(),
        ignore_liveness: false,
        max_freed: u64::MAX,
    });
    pin(34, &bytes.0, &want);
    // The answer: paths, bytesFreed, 0 (obsolete).
    let res = GcResults { paths: [P1.to_string()].into(), bytes_freed: 42 };
    let mut out = Vec::new();
    Response::GcResults(res).write(&mut out, &proto(34)).unwrap();
    assert_eq!(out, B::default().u(1).s(P1).u(42).u(0).0);
}

#[test]
fn version_dependent_requests() {
    let paths: BTreeSet<StorePath> = [sp(P1)].into();
    // QueryValidPaths: the substitute flag from 1.27.
    pin(26, &B::default().u(31).u(1).s(P1).0, &Request::QueryValidPaths { paths: paths.clone(), substitute: false });
    pin(
        27,
        &B::default().u(31).u(1).s(P1).u(1).0,
        &Request::QueryValidPaths { paths: paths.clone(), substitute: true },
    );
    // BuildPaths: the mode from 1.15; derived paths in the old form before 1.30.
    pin(
        14,
        &B::default().u(9).u(1).s(DRV).0,
        &Request::BuildPaths {
            paths: vec![DerivedPath::Built { drv_path: sp(DRV), outputs: OutputsSpec::All }],
            mode: BuildMode::Normal,
        },
    );
    pin(
        34,
        &B::default().u(9).u(1).s(&format!("{DRV}!*")).u(1).0,
        &Request::BuildPaths {
            paths: vec![DerivedPath::Built { drv_path: sp(DRV), outputs: OutputsSpec::All }],
            mode: BuildMode::Repair,
        },
    );
    // QuerySubstitutablePathInfos: a set before 1.22, a map to content addresses after.
    let map: BTreeMap<StorePath, Option<cairn_nix::ContentAddress>> = [(sp(P1), None)].into();
    pin(21, &B::default().u(30).u(1).s(P1).0, &Request::QuerySubstitutablePathInfos(map.clone()));
    pin(22, &B::default().u(30).u(1).s(P1).s("").0, &Request::QuerySubstitutablePathInfos(map));
    // AddToStore: name, method, references, repair from 1.25; name, fixed, recursive, algo before.
    pin(
        25,
        &B::default().u(7).s("src").s("fixed:r:sha256").u(1).s(P1).u(0).0,
        &Request::AddToStore {
            name: "src".into(),
            method: CaMethod::Fixed { method: cairn_nix::FileIngestionMethod::Recursive, algo: HashAlgo::Sha256 },
            references: paths.clone(),
            repair: false,
        },
    );
    pin(
        24,
        &B::default().u(7).s("src").u(1).u(0).s("sha1").0,
        &Request::AddToStoreLegacy { name: "src".into(), fixed: true, recursive: false, hash_algo: "sha1".into() },
    );
    // AddTextToStore and AddBuildLog (whose path is a base name).
    pin(
        34,
        &B::default().u(8).s("t.txt").s("hi").u(1).s(P1).0,
        &Request::AddTextToStore { name: "t.txt".into(), text: b"hi".to_vec(), references: paths },
    );
    pin(34, &B::default().u(45).s(&DRV["/nix/store/".len()..]).0, &Request::AddBuildLog(sp(DRV)));
    // AddPermRoot exists from 1.36 only.
    let bytes = B::default().u(47).s(P1).s("/root/result").0;
    pin(36, &bytes, &Request::AddPermRoot { path: sp(P1), gc_root: "/root/result".into() });
    assert!(matches!(Request::read(&mut &bytes[..], &proto(34)), Err(Error::OpNotInVersion { .. })));
}

#[test]
fn path_info_answers_by_version() {
    let info = PathInfo {
        deriver: None,
        nar_hash: Hash::digest(HashAlgo::Sha256, b""),
        references: BTreeSet::new(),
        registration_time: 1,
        nar_size: 2,
        ultimate: true,
        sigs: BTreeSet::new(),
        ca: None,
    };
    let body = B::default().s("").s(&info.nar_hash.encode(cairn_nix::hash::Encoding::Base16)).u(0).u(1).u(2);
    // Before 1.16 no ultimate/sigs/ca, before 1.17 no validity flag.
    let mut out = Vec::new();
    Response::PathInfo(Some(info.clone())).write(&mut out, &proto(15)).unwrap();
    assert_eq!(out, body.0);
    out.clear();
    Response::PathInfo(Some(info.clone())).write(&mut out, &proto(17)).unwrap();
    let with_flag = B::default().u(1).s("").s(&info.nar_hash.encode(cairn_nix::hash::Encoding::Base16)).u(0).u(1).u(2);
    assert_eq!(out, with_flag.u(1).u(0).s("").0);
    out.clear();
    Response::PathInfo(None).write(&mut out, &proto(17)).unwrap();
    assert_eq!(out, B::default().u(0).0);
}

#[test]
fn logger_messages() {
    let v = |m: u8| ProtocolVersion::new(1, m);
    let enc = |m: &StderrMessage, minor: u8| {
        let mut out = Vec::new();
        m.write(&mut out, v(minor)).unwrap();
        let back = StderrMessage::read(&mut &out[..], v(minor), &Limits::default()).unwrap();
        (out, back)
    };
    // operator<<(Sink &, const Error &): "Error", level, "Error", msg, 0, traces (0, hint)…
    let err =
        RemoteError { level: Verbosity::Error, message: "boom".into(), traces: vec!["while x".into()], exit_status: 1 };
    let (out, back) = enc(&StderrMessage::Error(err.clone()), 26);
    assert_eq!(out, B::default().u(0x63787470).s("Error").u(0).s("Error").s("boom").u(0).u(1).u(0).s("while x").0);
    assert_eq!(back, StderrMessage::Error(err.clone()));
    // Before 1.26: what() and the status.
    let (out, _) = enc(&StderrMessage::Error(RemoteError { exit_status: 100, ..err }), 25);
    assert_eq!(out, B::default().u(0x63787470).s("boom").u(100).0);
    // START_ACTIVITY: act, lvl, type, s, fields, parent; fields: count, (type, value)…
    let start = StderrMessage::StartActivity {
        id: 7,
        level: Verbosity::Info,
        kind: ActivityType::Build,
        text: "building".into(),
        fields: vec![Field::String("/nix/store/x.drv".into()), Field::Int(1)],
        parent: 3,
    };
    let (out, back) = enc(&start, 34);
    assert_eq!(
        out,
        B::default().u(0x53545254).u(7).u(3).u(105).s("building").u(2).u(1).s("/nix/store/x.drv").u(0).u(1).u(3).0
    );
    assert_eq!(back, start);
    // RESULT: act, type, fields. NEXT: a string. LAST: the code alone.
    let res = StderrMessage::Result { id: 7, kind: ResultType::BuildLogLine, fields: vec![Field::String("hi".into())] };
    assert_eq!(enc(&res, 34).0, B::default().u(0x52534c54).u(7).u(101).u(1).u(1).s("hi").0);
    assert_eq!(enc(&StderrMessage::Next("line\n".into()), 34).0, B::default().u(0x6f6c6d67).s("line\n").0);
    assert_eq!(enc(&StderrMessage::Last, 34).0, B::default().u(0x616c7473).0);
    // Clients before 1.20 get the activity's text as a log line, and nothing else.
    assert_eq!(start.clone().downgrade(v(19)), Some(StderrMessage::Next("building...\n".into())));
    assert_eq!(res.downgrade(v(19)), None);
}

#[test]
fn hostile_requests_are_errors() {
    let p = proto(34);
    let read = |b: &[u8]| Request::read(&mut &b[..], &p);
    assert!(matches!(read(&[]), Ok(None)), "a clean end between requests");
    assert!(matches!(read(&[1, 0, 0]), Err(Error::Truncated)));
    assert!(matches!(read(&B::default().u(2).0), Err(Error::UnknownOp(2))));
    assert!(matches!(read(&B::default().u(1 << 40).0), Err(Error::UnknownOp(_))));
    assert!(matches!(read(&B::default().u(24).0), Err(Error::RemovedOp(WorkerOp::QueryFailedPaths))));
    assert!(matches!(read(&B::default().u(1).u(u64::MAX).0), Err(Error::TooLong { .. })));
    assert!(matches!(read(&B::default().u(32).u(u64::MAX).0), Err(Error::TooMany { .. })));
    let mut padded = B::default().u(1).s(P1).0;
    *padded.last_mut().unwrap() = 1;
    assert!(matches!(read(&padded), Err(Error::BadPadding)));
    assert!(matches!(read(&B::default().u(1).s("/etc/passwd").0), Err(Error::StorePath(_))));
    assert!(matches!(read(&B::default().u(1).s(P1).0[..20]), Err(Error::Truncated)));
    // Nix's readInt refuses numbers that do not fit an unsigned int.
    assert!(matches!(read(&B::default().u(31).u(0).u(1 << 32).0), Err(Error::IntegerTooLarge { .. })));
    // A bad magic and an unsupported version in the handshake.
    let hello =
        ServerHello { version: ProtocolVersion::MAX, nix_version: "x".into(), trust: None, features: BTreeSet::new() };
    let mut s = Script { input: &B::default().u(0x1234).0, output: Vec::new() };
    assert!(matches!(server_handshake(&mut s, &hello, &Limits::default()), Err(Error::BadMagic(0x1234))));
    let mut s = Script { input: &B::default().u(0x6e697863).u(0x109).0, output: Vec::new() };
    assert!(matches!(server_handshake(&mut s, &hello, &Limits::default()), Err(Error::UnsupportedVersion(0x109))));
    let mut s = Script { input: &B::default().u(0x6e697863).u(0x222).0, output: Vec::new() };
    assert!(matches!(server_handshake(&mut s, &hello, &Limits::default()), Err(Error::UnsupportedVersion(0x222))));
}

#[test]
fn feature_exchange_at_1_38() {
    // Nix 2.24's handshake: at 1.38 the client sends its features after its version, the
    // daemon answers with its own; both keep the intersection.
    let mut input = B::default().u(0x6e697863).u(0x126).u(2).s("a").s("b").u(0).u(0).0;
    let hello = ServerHello {
        version: ProtocolVersion::MAX,
        nix_version: "2.24.0".into(),
        trust: Some(TrustedFlag::NotTrusted),
        features: ["b".to_string(), "c".to_string()].into(),
    };
    let mut s = Script { input: &input, output: Vec::new() };
    let session = server_handshake(&mut s, &hello, &Limits::default()).unwrap();
    assert_eq!(session.features, ["b".to_string()].into());
    let out = s.output;
    assert_eq!(out, B::default().u(0x6478696f).u(0x126).u(2).s("b").s("c").s("2.24.0").u(2).0);
    // And the client side of the same exchange.
    input = out;
    let mut c = Script { input: &input, output: Vec::new() };
    let hello = ClientHello { version: ProtocolVersion::MAX, features: ["a".to_string(), "b".to_string()].into() };
    let session = client_handshake(&mut c, &hello, &Limits::default()).unwrap();
    assert_eq!(session.features, ["b".to_string()].into());
    assert_eq!(session.trust, Some(TrustedFlag::NotTrusted));
    assert_eq!(c.output, B::default().u(0x6e697863).u(0x126).u(2).s("a").s("b").u(0).u(0).0);
}

struct Script<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl std::io::Read for Script<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl std::io::Write for Script<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
