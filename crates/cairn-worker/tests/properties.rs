//! Property tests: every structure round-trips at every version (minus the fields a version
//! lacks), and no bytes — random, or valid encodings cut short or flipped — make a reader
//! panic. The contract for readers of untrusted bytes: errors are fine, panics are not.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use cairn_nix::derivation::DerivationOutput;
use cairn_nix::{ContentAddress, FileIngestionMethod, Hash, HashAlgo, StoreDir, StorePath};
use cairn_worker::*;
use proptest::prelude::*;

const VERSIONS: &[u8] =
    &[10, 11, 12, 14, 15, 16, 17, 20, 21, 22, 23, 25, 26, 27, 28, 29, 30, 31, 33, 34, 35, 36, 37, 38];

fn proto(minor: u8) -> Proto {
    Proto::new(ProtocolVersion::new(1, minor), StoreDir::new("/nix/store").unwrap())
}

fn version() -> impl Strategy<Value = u8> {
    prop::sample::select(VERSIONS)
}

fn store_path() -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]{0,20}").prop_map(|(d, n)| StorePath::new(d, &n).unwrap())
}

fn drv_path() -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), "[a-z0-9-]{1,10}").prop_map(|(d, n)| StorePath::new(d, &format!("{n}.drv")).unwrap())
}

fn paths() -> impl Strategy<Value = BTreeSet<StorePath>> {
    prop::collection::btree_set(store_path(), 0..4)
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[ -~]{0,20}", any::<String>(), Just(String::new())]
}

fn strings() -> impl Strategy<Value = BTreeSet<String>> {
    prop::collection::btree_set(text(), 0..3)
}

fn sha256() -> impl Strategy<Value = Hash> {
    any::<[u8; 32]>().prop_map(Hash::sha256)
}

fn ca() -> impl Strategy<Value = Option<ContentAddress>> {
    let algo = prop::sample::select(vec![HashAlgo::Md5, HashAlgo::Sha1, HashAlgo::Sha256, HashAlgo::Sha512]);
    prop_oneof![
        Just(None),
        sha256().prop_map(|h| Some(ContentAddress::Text(h))),
        (algo, any::<bool>(), any::<[u8; 64]>()).prop_map(|(a, r, d)| {
            let method = if r { FileIngestionMethod::Recursive } else { FileIngestionMethod::Flat };
            Some(ContentAddress::Fixed { method, hash: Hash::new(a, &d[..a.digest_len()]).unwrap() })
        }),
    ]
}

fn path_info() -> impl Strategy<Value = PathInfo> {
    (prop::option::of(store_path()), sha256(), paths(), any::<u64>(), any::<u64>(), any::<bool>(), strings(), ca())
        .prop_map(|(deriver, nar_hash, references, registration_time, nar_size, ultimate, sigs, ca)| PathInfo {
            deriver,
            nar_hash,
            references,
            registration_time,
            nar_size,
            ultimate,
            sigs,
            ca,
        })
}

fn valid_path_info() -> impl Strategy<Value = ValidPathInfo> {
    (store_path(), path_info()).prop_map(|(path, info)| ValidPathInfo { path, info })
}

/// What a path info keeps at `minor`.
fn project_info(mut i: PathInfo, minor: u8) -> PathInfo {
    if minor < 16 {
        (i.ultimate, i.sigs, i.ca) = (false, BTreeSet::new(), None);
    }
    i
}

fn output_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9]{0,5}"
}

fn derived_path() -> impl Strategy<Value = DerivedPath> {
    prop_oneof![
        store_path().prop_map(DerivedPath::Opaque),
        (drv_path(), prop::collection::btree_set(output_name(), 0..3)).prop_map(|(drv_path, names)| {
            let outputs = if names.is_empty() { OutputsSpec::All } else { OutputsSpec::Names(names) };
            DerivedPath::Built { drv_path, outputs }
        }),
    ]
}

fn drv_output() -> impl Strategy<Value = DrvOutput> {
    (sha256(), output_name()).prop_map(|(drv_hash, output_name)| DrvOutput { drv_hash, output_name })
}

fn build_result() -> impl Strategy<Value = BuildResult> {
    (
        (0u64..20).prop_map(BuildStatus::from_u64),
        text(),
        any::<u32>(),
        any::<bool>(),
        (any::<u64>(), any::<u64>()),
        (prop::option::of(0..=i64::MAX as u64), prop::option::of(0..=i64::MAX as u64)),
        prop::collection::btree_map(drv_output(), text(), 0..3),
    )
        .prop_map(
            |(status, error_msg, times_built, nd, (start_time, stop_time), (cpu_user, cpu_system), built)| {
                BuildResult {
                    status,
                    error_msg,
                    times_built,
                    is_non_deterministic: nd,
                    start_time,
                    stop_time,
                    cpu_user,
                    cpu_system,
                    built_outputs: built,
                }
            },
        )
}

fn project_result(mut r: BuildResult, minor: u8) -> BuildResult {
    if minor < 29 {
        (r.times_built, r.is_non_deterministic, r.start_time, r.stop_time) = (0, false, 0, 0);
    }
    if minor < 37 {
        (r.cpu_user, r.cpu_system) = (None, None);
    }
    if minor < 28 {
        r.built_outputs.clear();
    }
    r
}

fn basic_derivation() -> impl Strategy<Value = BasicDerivation> {
    let output = ("[ -~]{0,10}", "[ -~]{0,10}", "[ -~]{0,10}").prop_map(|(path, hash_algo, hash)| DerivationOutput {
        path,
        hash_algo,
        hash,
    });
    (
        prop::collection::btree_map(output_name(), output, 0..3),
        paths(),
        text(),
        text(),
        prop::collection::vec(text(), 0..3),
        prop::collection::btree_map(text(), text(), 0..3),
    )
        .prop_map(|(outputs, input_srcs, platform, builder, args, env)| BasicDerivation {
            outputs,
            input_srcs,
            platform,
            builder,
            args,
            env,
        })
}

fn verbosity() -> impl Strategy<Value = Verbosity> {
    prop::sample::select(Verbosity::ALL)
}

fn client_options() -> impl Strategy<Value = ClientOptions> {
    (
        (any::<bool>(), any::<bool>(), any::<bool>(), verbosity()),
        (any::<u32>(), any::<u32>(), any::<bool>(), any::<u32>(), any::<bool>()),
        prop::collection::btree_map(text(), text(), 0..3),
    )
        .prop_map(
            |((keep_failed, keep_going, try_fallback, verbosity), (jobs, silent, vb, cores, subs), overrides)| {
                ClientOptions {
                    keep_failed,
                    keep_going,
                    try_fallback,
                    verbosity,
                    max_build_jobs: jobs,
                    max_silent_time: silent,
                    verbose_build: vb,
                    build_cores: cores,
                    use_substitutes: subs,
                    overrides,
                }
            },
        )
}

fn mode() -> impl Strategy<Value = BuildMode> {
    prop::sample::select(BuildMode::ALL)
}

fn gc_options() -> impl Strategy<Value = GcOptions> {
    (prop::sample::select(GcAction::ALL), paths(), any::<bool>(), any::<u64>()).prop_map(
        |(action, paths_to_delete, ignore_liveness, max_freed)| GcOptions {
            action,
            paths_to_delete,
            ignore_liveness,
            max_freed,
        },
    )
}

fn ca_method() -> impl Strategy<Value = CaMethod> {
    prop_oneof![
        Just(CaMethod::Text),
        (any::<bool>(), prop::sample::select(vec![HashAlgo::Md5, HashAlgo::Sha1, HashAlgo::Sha256, HashAlgo::Sha512]))
            .prop_map(|(r, algo)| CaMethod::Fixed {
                method: if r { FileIngestionMethod::Recursive } else { FileIngestionMethod::Flat },
                algo
            }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    let p = store_path;
    prop_oneof![
        p().prop_map(Request::IsValidPath),
        p().prop_map(Request::HasSubstitutes),
        p().prop_map(Request::QueryPathHash),
        p().prop_map(Request::QueryReferences),
        p().prop_map(Request::QueryReferrers),
        ("[a-z]{1,8}", ca_method(), paths(), any::<bool>()).prop_map(|(name, method, references, repair)| {
            Request::AddToStore { name, method, references, repair }
        }),
        ("[a-z]{1,8}", any::<bool>(), any::<bool>(), "[a-z0-9]{0,6}").prop_map(
            |(name, fixed, recursive, hash_algo)| { Request::AddToStoreLegacy { name, fixed, recursive, hash_algo } }
        ),
        ("[a-z]{1,8}", prop::collection::vec(any::<u8>(), 0..40), paths())
            .prop_map(|(name, text, references)| Request::AddTextToStore { name, text, references }),
        (prop::collection::vec(derived_path(), 0..3), mode())
            .prop_map(|(paths, mode)| Request::BuildPaths { paths, mode }),
        p().prop_map(Request::EnsurePath),
        p().prop_map(Request::AddTempRoot),
        text().prop_map(Request::AddIndirectRoot),
        Just(Request::SyncWithGc),
        Just(Request::FindRoots),
        (p(), any::<u32>()).prop_map(|(path, sign)| Request::ExportPath { path, sign }),
        p().prop_map(Request::QueryDeriver),
        client_options().prop_map(Request::SetOptions),
        gc_options().prop_map(Request::CollectGarbage),
        p().prop_map(Request::QuerySubstitutablePathInfo),
        p().prop_map(Request::QueryDerivationOutputs),
        Just(Request::QueryAllValidPaths),
        p().prop_map(Request::QueryPathInfo),
        Just(Request::ImportPaths),
        p().prop_map(Request::QueryDerivationOutputNames),
        text().prop_map(Request::QueryPathFromHashPart),
        prop::collection::btree_map(p(), ca(), 0..3).prop_map(Request::QuerySubstitutablePathInfos),
        (paths(), any::<bool>()).prop_map(|(paths, substitute)| Request::QueryValidPaths { paths, substitute }),
        paths().prop_map(Request::QuerySubstitutablePaths),
        p().prop_map(Request::QueryValidDerivers),
        Just(Request::OptimiseStore),
        (any::<bool>(), any::<bool>())
            .prop_map(|(check_contents, repair)| Request::VerifyStore { check_contents, repair }),
        (drv_path(), basic_derivation(), mode()).prop_map(|(drv_path, drv, mode)| Request::BuildDerivation {
            drv_path,
            drv,
            mode
        }),
        (p(), strings()).prop_map(|(path, sigs)| Request::AddSignatures { path, sigs }),
        p().prop_map(Request::NarFromPath),
        (valid_path_info(), any::<bool>(), any::<bool>())
            .prop_map(|(info, repair, dont_check_sigs)| Request::AddToStoreNar { info, repair, dont_check_sigs }),
        prop::collection::vec(derived_path(), 0..3).prop_map(Request::QueryMissing),
        p().prop_map(Request::QueryDerivationOutputMap),
        (drv_output(), p())
            .prop_map(|(id, out_path)| Request::RegisterDrvOutput(RegisterDrvOutput::Legacy { id, out_path })),
        text().prop_map(|j| Request::RegisterDrvOutput(RegisterDrvOutput::Json(j))),
        drv_output().prop_map(Request::QueryRealisation),
        (any::<bool>(), any::<bool>())
            .prop_map(|(repair, dont_check_sigs)| Request::AddMultipleToStore { repair, dont_check_sigs }),
        p().prop_map(Request::AddBuildLog),
        (prop::collection::vec(derived_path(), 0..3), mode())
            .prop_map(|(paths, mode)| Request::BuildPathsWithResults { paths, mode }),
        (p(), text()).prop_map(|(path, gc_root)| Request::AddPermRoot { path, gc_root }),
    ]
}

/// What a request keeps at `minor`: fields the version lacks take the reader's defaults.
fn project_request(r: Request, minor: u8) -> Request {
    match r {
        Request::BuildPaths { paths, .. } if minor < 15 => Request::BuildPaths { paths, mode: BuildMode::Normal },
        Request::QueryValidPaths { paths, .. } if minor < 27 => Request::QueryValidPaths { paths, substitute: false },
        Request::QuerySubstitutablePathInfos(m) if minor < 22 => {
            Request::QuerySubstitutablePathInfos(m.into_keys().map(|k| (k, None)).collect())
        }
        Request::SetOptions(o) if minor < 12 => Request::SetOptions(ClientOptions { overrides: BTreeMap::new(), ..o }),
        other => other,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn requests_round_trip(req in request(), minor in version()) {
        let p = proto(minor);
        let mut bytes = Vec::new();
        // Some requests cannot be said at some versions; that must be an error, not bytes.
        if req.write(&mut bytes, &p).is_err() {
            return Ok(());
        }
        let mut r = &bytes[..];
        let back = Request::read(&mut r, &p).unwrap().unwrap();
        prop_assert!(r.is_empty());
        prop_assert_eq!(back, project_request(req, minor));
        // Every proper prefix is an error (or, for the empty prefix, a clean end).
        for cut in 1..bytes.len() {
            prop_assert!(Request::read(&mut &bytes[..cut], &p).is_err(), "prefix of {} bytes", cut);
        }
    }

    #[test]
    fn path_infos_round_trip(v in valid_path_info(), minor in version()) {
        let p = proto(minor);
        let mut bytes = Vec::new();
        v.write(&mut bytes, &p).unwrap();
        let back = ValidPathInfo::read(&mut &bytes[..], &p).unwrap();
        prop_assert_eq!(back, ValidPathInfo { path: v.path, info: project_info(v.info, minor) });
    }

    #[test]
    fn build_results_round_trip(r in build_result(), d in derived_path(), minor in version()) {
        let p = proto(minor);
        let keyed = KeyedBuildResult { path: d, result: r };
        let mut bytes = Vec::new();
        if keyed.write(&mut bytes, &p).is_err() {
            return Ok(());
        }
        let back = KeyedBuildResult::read(&mut &bytes[..], &p).unwrap();
        prop_assert_eq!(back.result, project_result(keyed.result, minor));
        prop_assert_eq!(back.path, keyed.path);
    }

    #[test]
    fn responses_round_trip(
        info in prop::option::of(path_info()),
        set in paths(),
        missing in (paths(), paths(), paths(), any::<u64>(), any::<u64>()),
        roots in prop::collection::vec((text(), store_path()), 0..3),
        map in prop::collection::btree_map(output_name(), prop::option::of(store_path()), 0..3),
        subst in prop::collection::btree_map(store_path(), (prop::option::of(store_path()), paths(), any::<u64>(), any::<u64>()), 0..3),
        minor in 17u8..=38,
    ) {
        let p = proto(minor);
        let subst = subst.into_iter().map(|(k, (deriver, references, download_size, nar_size))| {
            (k, SubstitutablePathInfo { deriver, references, download_size, nar_size })
        }).collect();
        let (will_build, will_substitute, unknown, download_size, nar_size) = missing;
        let cases = [
            (WorkerOp::QueryPathInfo, Response::PathInfo(info.map(|i| project_info(i, minor)))),
            (WorkerOp::QueryReferrers, Response::PathSet(set)),
            (WorkerOp::QueryMissing, Response::Missing(Missing { will_build, will_substitute, unknown, download_size, nar_size })),
            (WorkerOp::FindRoots, Response::Roots(roots)),
            (WorkerOp::QueryDerivationOutputMap, Response::OutputMap(map)),
            (WorkerOp::QuerySubstitutablePathInfos, Response::SubstitutablePathInfos(subst)),
            (WorkerOp::IsValidPath, Response::Bool(true)),
            (WorkerOp::AddTempRoot, Response::One),
        ];
        for (op, resp) in cases {
            let mut bytes = Vec::new();
            resp.write(&mut bytes, &p).unwrap();
            let mut r = &bytes[..];
            prop_assert_eq!(Response::read(op, &mut r, &p).unwrap(), resp);
            prop_assert!(r.is_empty());
        }
    }

    #[test]
    fn stderr_messages_round_trip(
        id in any::<u64>(),
        parent in any::<u64>(),
        level in verbosity(),
        kind in any::<u64>(),
        s in text(),
        fields in prop::collection::vec(prop_oneof![any::<u64>().prop_map(Field::Int), prop::collection::vec(any::<u8>(), 0..64).prop_map(Field::String)], 0..4),
        traces in prop::collection::vec(text(), 0..3),
        status in any::<u32>(),
        minor in version(),
    ) {
        let v = ProtocolVersion::new(1, minor);
        let err = RemoteError { level, message: s.clone(), traces: traces.clone(), exit_status: status };
        let err_back = if minor >= 26 {
            RemoteError { exit_status: 1, ..err.clone() }
        } else {
            RemoteError { level: Verbosity::Error, traces: Vec::new(), ..err.clone() }
        };
        let cases = [
            (StderrMessage::Next(s.clone()), None),
            (StderrMessage::Last, None),
            (StderrMessage::Read(id), None),
            (StderrMessage::Write(s.clone().into_bytes()), None),
            (StderrMessage::Error(err), Some(StderrMessage::Error(err_back))),
            (StderrMessage::StartActivity { id, level, kind: ActivityType::from_u64(kind), text: s.clone(), fields: fields.clone(), parent }, None),
            (StderrMessage::StopActivity { id }, None),
            (StderrMessage::Result { id, kind: ResultType::from_u64(kind), fields }, None),
        ];
        for (msg, want) in cases {
            let mut bytes = Vec::new();
            msg.write(&mut bytes, v).unwrap();
            let back = StderrMessage::read(&mut &bytes[..], v, &Limits::default()).unwrap();
            prop_assert_eq!(back, want.unwrap_or(msg));
        }
    }

    #[test]
    fn derivations_and_options_round_trip(drv in basic_derivation(), opts in client_options(), gc in gc_options()) {
        let p = proto(34);
        let mut bytes = Vec::new();
        drv.write(&mut bytes, &p).unwrap();
        opts.write(&mut bytes, &p).unwrap();
        gc.write(&mut bytes, &p).unwrap();
        let mut r = &bytes[..];
        prop_assert_eq!(BasicDerivation::read(&mut r, &p).unwrap(), drv);
        prop_assert_eq!(ClientOptions::read(&mut r, &p).unwrap(), opts);
        prop_assert_eq!(GcOptions::read(&mut r, &p).unwrap(), gc);
        prop_assert!(r.is_empty());
    }

    #[test]
    fn framed_streams_round_trip(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..100), 0..8), size in 1usize..64, stop in 0usize..200) {
        let data: Vec<u8> = chunks.concat();
        let mut w = FramedWriter::with_chunk_size(Vec::new(), size);
        for c in &chunks {
            w.write_all(c).unwrap();
        }
        let mut bytes = w.finish().unwrap();
        bytes.extend_from_slice(b"after");
        let mut r = FramedReader::new(&bytes[..]);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        prop_assert_eq!(&got, &data);
        prop_assert_eq!(r.into_inner(), b"after");
        // Stopping early and draining also lands on the next request.
        let mut r = FramedReader::new(&bytes[..]);
        let mut partial = vec![0u8; stop.min(data.len())];
        r.read_exact(&mut partial).unwrap();
        r.drain().unwrap();
        prop_assert_eq!(r.into_inner(), b"after");
    }

    // ---- never panics -------------------------------------------------------------------

    #[test]
    fn request_reader_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300), op in 0u64..50, minor in version()) {
        let p = proto(minor);
        let _ = Request::read(&mut &bytes[..], &p);
        // With a valid op code in front, so that every op's field reader sees garbage.
        let mut with_op = op.to_le_bytes().to_vec();
        with_op.extend_from_slice(&bytes);
        let _ = Request::read(&mut &with_op[..], &p);
    }

    #[test]
    fn readers_of_garbage_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), minor in version()) {
        let p = proto(minor);
        let v = p.version;
        let _ = StderrMessage::read(&mut &bytes[..], v, &p.limits);
        let _ = ValidPathInfo::read(&mut &bytes[..], &p);
        let _ = BasicDerivation::read(&mut &bytes[..], &p);
        let _ = BuildResult::read(&mut &bytes[..], &p);
        for op in WorkerOp::ALL {
            let _ = Response::read(*op, &mut &bytes[..], &p);
        }
        let mut fr = FramedReader::new(&bytes[..]);
        let _ = fr.drain();
    }

    #[test]
    fn handshakes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), prefix in 0u8..3, minor in version()) {
        // Half the time start with the right magic (and a plausible version) to get further in.
        let mut input = Vec::new();
        if prefix > 0 {
            input.extend_from_slice(&0x6e697863u64.to_le_bytes());
            input.extend_from_slice(&ProtocolVersion::new(1, minor).to_wire().to_le_bytes());
        }
        input.extend_from_slice(&bytes);
        let hello = ServerHello { version: ProtocolVersion::MAX, nix_version: "x".into(), trust: None, features: BTreeSet::new() };
        let _ = server_handshake(&mut Script { input: &input, output: Vec::new() }, &hello, &Limits::default());
        let mut input = Vec::new();
        if prefix > 0 {
            input.extend_from_slice(&0x6478696fu64.to_le_bytes());
            input.extend_from_slice(&ProtocolVersion::new(1, minor).to_wire().to_le_bytes());
        }
        input.extend_from_slice(&bytes);
        let hello = ClientHello { version: ProtocolVersion::MAX, features: BTreeSet::new() };
        let _ = client_handshake(&mut Script { input: &input, output: Vec::new() }, &hello, &Limits::default());
    }

    #[test]
    fn flipped_bytes_never_panic(req in request(), minor in version(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let p = proto(minor);
        let mut bytes = Vec::new();
        if req.write(&mut bytes, &p).is_err() || bytes.is_empty() {
            return Ok(());
        }
        let i = at.index(bytes.len());
        bytes[i] ^= 1 << bit;
        let _ = Request::read(&mut &bytes[..], &p);
    }
}

#[test]
fn tiny_limits_refuse_before_allocating() {
    let mut p = proto(34);
    p.limits = Limits { max_string: 8, max_blob: 8, max_count: 1 };
    let mut bytes = Vec::new();
    Request::QueryValidPaths {
        paths: [StorePath::from_base_name("00000000000000000000000000000000-a").unwrap()].into(),
        substitute: false,
    }
    .write(&mut bytes, &proto(34))
    .unwrap();
    assert!(matches!(Request::read(&mut &bytes[..], &p), Err(Error::TooLong { .. })));
}

struct Script<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Script<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Script<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
