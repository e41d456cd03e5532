//! Golden bytes from Nix itself: the worker-protocol characterisation data of Nix 2.24.0
//! (`tests/unit/libstore/data/worker-protocol/*.bin`, see `tests/fixtures/README.md`). Each
//! file is several values of one type encoded back to back at one protocol version; every test
//! decodes them, checks them against the values Nix's test source encoded, and encodes the
//! values again to the same bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use cairn_nix::{ContentAddress, FileIngestionMethod, Hash, HashAlgo, StoreDir, StorePath};
use cairn_worker::codec::*;
use cairn_worker::*;

fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nix").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn proto(minor: u8) -> Proto {
    Proto::new(ProtocolVersion::new(1, minor), StoreDir::new("/nix/store").unwrap())
}

fn sp(base: &str) -> StorePath {
    StorePath::from_base_name(base).unwrap()
}

const FOO: &str = "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo";
const BAR: &str = "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar";
const BAR_DRV: &str = "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv";

/// Decodes `count` values with `read`, checks the input is used up, re-encodes them with
/// `write` and checks the bytes are Nix's.
fn golden<T: std::fmt::Debug + PartialEq>(
    name: &str,
    expected: &[T],
    mut read: impl FnMut(&mut &[u8]) -> Result<T>,
    mut write: impl FnMut(&mut Vec<u8>, &T) -> Result<()>,
) {
    let bytes = fixture(name);
    let mut r = &bytes[..];
    let got: Vec<T> = expected.iter().map(|_| read(&mut r).unwrap()).collect();
    assert!(r.is_empty(), "{name}: {} bytes left over", r.len());
    assert_eq!(got, expected, "{name}: decoded values");
    let mut out = Vec::new();
    for v in expected {
        write(&mut out, v).unwrap();
    }
    assert_eq!(out, bytes, "{name}: re-encoded bytes");
}

#[test]
fn strings() {
    // Nix's test writes `"oh no \0\0\0 what was that!"` as a C string: it ends at the NUL.
    let expected: Vec<Vec<u8>> =
        vec![b"".to_vec(), b"hi".to_vec(), b"white rabbit".to_vec(), "大白兔".into(), b"oh no ".to_vec()];
    golden("string.bin", &expected, |r| read_bytes(r, 1024), |w, s| write_bytes(w, s));
}

#[test]
fn store_paths() {
    let p = proto(10);
    let expected = [sp(FOO), sp("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo-bar")];
    golden("store-path.bin", &expected, |r| read_path(r, &p), |w, v| write_path(w, &p, v));
}

#[test]
fn optional_store_paths() {
    let p = proto(10);
    let expected = [None, Some(sp("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo-bar"))];
    golden("optional-store-path.bin", &expected, |r| read_opt_path(r, &p), |w, v| write_opt_path(w, &p, v.as_ref()));
}

fn cas() -> [ContentAddress; 3] {
    [
        ContentAddress::Text(Hash::digest(HashAlgo::Sha256, b"Derive(...)")),
        ContentAddress::Fixed {
            method: FileIngestionMethod::Flat,
            hash: Hash::digest(HashAlgo::Sha1, b"blob blob..."),
        },
        ContentAddress::Fixed {
            method: FileIngestionMethod::Recursive,
            hash: Hash::digest(HashAlgo::Sha256, b"(...)"),
        },
    ]
}

#[test]
fn content_addresses() {
    let p = proto(10);
    let expected = cas().map(Some);
    golden("content-address.bin", &expected, |r| read_opt_ca(r, &p), |w, v| write_opt_ca(w, v.as_ref()));
    let expected = [None, Some(cas()[1].clone())];
    golden("optional-content-address.bin", &expected, |r| read_opt_ca(r, &p), |w, v| write_opt_ca(w, v.as_ref()));
}

#[test]
fn derived_paths() {
    let names = |ns: &[&str]| OutputsSpec::Names(ns.iter().map(|s| s.to_string()).collect());
    let built = |outputs| DerivedPath::Built { drv_path: sp(BAR_DRV), outputs };
    let p = proto(29);
    let expected = [DerivedPath::Opaque(sp(FOO)), built(OutputsSpec::All), built(names(&["x", "y"]))];
    golden("derived-path-1.29.bin", &expected, |r| DerivedPath::read(r, &p), |w, v| v.write(w, &p));
    let p = proto(30);
    let expected = [
        DerivedPath::Opaque(sp(FOO)),
        DerivedPath::Opaque(sp("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv")),
        built(OutputsSpec::All),
        built(names(&["x", "y"])),
    ];
    golden("derived-path-1.30.bin", &expected, |r| DerivedPath::read(r, &p), |w, v| v.write(w, &p));
    // A lone .drv cannot be said before 1.30.
    assert!(expected[1].render(&proto(29)).is_err());
}

fn h1() -> Hash {
    Hash::parse_prefixed("sha256-FePFYIlMuycIXPZbWi7LGEiMmZSX9FMbaQenWBzm1Sc=").unwrap()
}

fn h2() -> Hash {
    Hash::parse_prefixed("sha256-b4afnqKCO9oWXgYHb9DeQ2berSwOjS27rSd9TxXDc/U=").unwrap()
}

#[test]
fn drv_outputs() {
    let expected = [
        DrvOutput { drv_hash: h1(), output_name: "baz".into() },
        DrvOutput { drv_hash: h2(), output_name: "quux".into() },
    ];
    golden(
        "drv-output.bin",
        &expected,
        |r| DrvOutput::parse(&read_string(r, 1024, "id")?),
        |w, v| write_str(w, &v.render()),
    );
}

#[test]
fn realisations_render_as_nix_dumps_them() {
    let sigs: BTreeSet<String> = ["asdf", "qwer"].map(String::from).into();
    let r1 = Realisation {
        id: DrvOutput { drv_hash: h1(), output_name: "baz".into() },
        out_path: sp(FOO),
        signatures: sigs,
        dependent_realisations: BTreeMap::new(),
    };
    let mut r2 = r1.clone();
    r2.dependent_realisations.insert(DrvOutput { drv_hash: h2(), output_name: "quux".into() }, sp(FOO));
    golden(
        "realisation.bin",
        &[r1.to_json(), r2.to_json()],
        |r| read_string(r, 4096, "realisation"),
        |w, v| write_str(w, v),
    );
}

fn built_outputs() -> BTreeMap<DrvOutput, String> {
    [("foo", FOO), ("bar", BAR)]
        .into_iter()
        .map(|(name, path)| {
            let id = DrvOutput { drv_hash: h2(), output_name: name.into() };
            let json = Realisation {
                id: id.clone(),
                out_path: sp(path),
                signatures: BTreeSet::new(),
                dependent_realisations: BTreeMap::new(),
            }
            .to_json();
            (id, json)
        })
        .collect()
}

fn build_results(minor: u8) -> [BuildResult; 3] {
    let mut a = BuildResult::new(BuildStatus::OutputRejected, "no idea why");
    let mut b = BuildResult::new(BuildStatus::NotDeterministic, "no idea why");
    let mut c = BuildResult::new(BuildStatus::Built, "");
    if minor >= 28 {
        c.built_outputs = built_outputs();
    }
    if minor >= 29 {
        (b.times_built, b.is_non_deterministic, b.start_time, b.stop_time) = (3, true, 30, 50);
        (c.times_built, c.start_time, c.stop_time) = (1, 30, 50);
    }
    if minor >= 37 {
        (c.cpu_user, c.cpu_system) = (Some(500_000_000), Some(604_000_000));
    }
    a.error_msg = "no idea why".into();
    [a, b, c]
}

#[test]
fn build_results_by_version() {
    for minor in [27, 28, 29, 37] {
        let p = proto(minor);
        golden(
            &format!("build-result-1.{minor}.bin"),
            &build_results(minor),
            |r| BuildResult::read(r, &p),
            |w, v| v.write(w, &p),
        );
    }
}

#[test]
fn keyed_build_results() {
    let p = proto(29);
    let [a, b, _] = build_results(29);
    let expected = [
        KeyedBuildResult { path: DerivedPath::Opaque(sp("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-xxx")), result: a },
        KeyedBuildResult {
            path: DerivedPath::Built { drv_path: sp(BAR_DRV), outputs: OutputsSpec::Names(["out".to_string()].into()) },
            result: b,
        },
    ];
    golden("keyed-build-result-1.29.bin", &expected, |r| KeyedBuildResult::read(r, &p), |w, v| v.write(w, &p));
}

fn info(deriver: Option<&str>, references: &[&str]) -> PathInfo {
    PathInfo {
        deriver: deriver.map(sp),
        nar_hash: h1(),
        references: references.iter().map(|r| sp(r)).collect(),
        registration_time: 23423,
        nar_size: 34878,
        ultimate: false,
        sigs: BTreeSet::new(),
        ca: None,
    }
}

#[test]
fn path_infos_1_15() {
    let p = proto(15);
    let expected = [info(None, &[]), info(Some(BAR_DRV), &["g1w7hyyyy1w7hy3qg1w7hy3qgqqqqy3q-foo.drv"])];
    golden("unkeyed-valid-path-info-1.15.bin", &expected, |r| PathInfo::read(r, &p), |w, v| v.write(w, &p));
    let expected = [
        ValidPathInfo { path: sp(BAR), info: info(None, &[]) },
        ValidPathInfo { path: sp(BAR), info: info(Some(BAR_DRV), &["g1w7hyyyy1w7hy3qg1w7hy3qgqqqqy3q-foo", BAR]) },
    ];
    golden("valid-path-info-1.15.bin", &expected, |r| ValidPathInfo::read(r, &p), |w, v| v.write(w, &p));
}

#[test]
fn path_infos_1_16() {
    let p = proto(16);
    let mut first = info(None, &[]);
    first.ultimate = true;
    let mut second = info(Some(BAR_DRV), &["g1w7hyyyy1w7hy3qg1w7hy3qgqqqqy3q-foo", BAR]);
    second.sigs = ["fake-sig-1", "fake-sig-2"].map(String::from).into();
    // The third is a content-addressed path Nix computed from its content address (name
    // "foo", references: bar and itself); its hash part is taken from the file.
    let bytes = fixture("valid-path-info-1.16.bin");
    let mut r = &bytes[..];
    ValidPathInfo::read(&mut r, &p).unwrap();
    ValidPathInfo::read(&mut r, &p).unwrap();
    let third = ValidPathInfo::read(&mut r, &p).unwrap();
    assert_eq!(third.path.name(), "foo");
    let mut third_info = info(None, &[BAR]);
    third_info.references.insert(third.path.clone());
    third_info.ca = Some(cas()[2].clone());
    let expected = [
        ValidPathInfo { path: sp(BAR), info: first },
        ValidPathInfo { path: sp(BAR), info: second },
        ValidPathInfo { path: third.path.clone(), info: third_info },
    ];
    golden("valid-path-info-1.16.bin", &expected, |r| ValidPathInfo::read(r, &p), |w, v| v.write(w, &p));
    // The path is the one cairn-nix computes for that content address and references.
    let store = StoreDir::new("/nix/store").unwrap();
    let others: BTreeSet<StorePath> = [sp(BAR)].into();
    let computed = store
        .make_fixed_output_path(
            "foo",
            FileIngestionMethod::Recursive,
            &Hash::digest(HashAlgo::Sha256, b"(...)"),
            &others,
            true,
        )
        .unwrap();
    assert_eq!(computed, third.path);
}

#[test]
fn build_modes_and_trust_flags() {
    golden(
        "build-mode.bin",
        BuildMode::ALL,
        |r| Ok(BuildMode::from_u64(read_u64(r)?).unwrap()),
        |w, m| write_u64(w, m.to_u64()),
    );
    golden(
        "optional-trusted-flag.bin",
        &[None, Some(TrustedFlag::Trusted), Some(TrustedFlag::NotTrusted)],
        |r| handshake::read_trust(r),
        |w, t| handshake::write_trust(w, *t),
    );
}

fn owned(ss: &[&str]) -> Vec<String> {
    ss.iter().map(|s| s.to_string()).collect()
}

#[test]
fn vectors_and_sets() {
    let p = proto(10);
    for (name, nested) in [("vector.bin", owned(&["", "1", "2"])), ("set.bin", owned(&["", "1", "2"]))] {
        let bytes = fixture(name);
        let mut r = &bytes[..];
        assert_eq!(read_strings(&mut r, &p, "s").unwrap(), owned(&[]));
        assert_eq!(read_strings(&mut r, &p, "s").unwrap(), owned(&[""]));
        let third = read_string_set(&mut r, &p, "s").unwrap();
        assert_eq!(third, ["", "foo", "bar"].map(String::from).into());
        let n = read_count(&mut r, &p.limits).unwrap();
        let outer: Vec<Vec<String>> = (0..n).map(|_| read_strings(&mut r, &p, "s").unwrap()).collect();
        assert_eq!(outer, vec![vec![], owned(&[""]), nested]);
        assert!(r.is_empty());
        // Sets are written sorted (the third value starts after 8 + 16 bytes).
        let mut out = Vec::new();
        write_strings(&mut out, [String::new(), "bar".into(), "foo".into()].iter()).unwrap();
        let set_bytes = fixture("set.bin");
        assert_eq!(&set_bytes[24..24 + out.len()], out);
    }
}

/// A client script: the bytes a client of `minor` sends in the handshake (Nix 2.8's
/// `initConnection`): magic, version, affinity 0 (≥ 1.14), reserve space 0 (≥ 1.11).
fn client_greeting(minor: u8) -> Vec<u8> {
    let mut v = Vec::new();
    write_u64(&mut v, 0x6e697863).unwrap();
    write_u64(&mut v, ProtocolVersion::new(1, minor).to_wire()).unwrap();
    if minor >= 14 {
        write_u64(&mut v, 0).unwrap();
    }
    if minor >= 11 {
        write_u64(&mut v, 0).unwrap();
    }
    v
}

/// A duplex stream: reads from a script, records writes.
struct Duplex<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl std::io::Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn handshake_to_client_at_1_10() {
    let greeting = client_greeting(10);
    let hello = ServerHello {
        version: ProtocolVersion::new(1, 10),
        nix_version: "x".into(),
        trust: None,
        features: BTreeSet::new(),
    };
    let mut s = Duplex { input: &greeting, output: Vec::new() };
    let session = server_handshake(&mut s, &hello, &Limits::default()).unwrap();
    assert_eq!(session.version, ProtocolVersion::new(1, 10));
    assert_eq!(s.output, fixture("handshake-to-client.bin"));

    let to_client = fixture("handshake-to-client.bin");
    let mut c = Duplex { input: &to_client, output: Vec::new() };
    let hello = ClientHello { version: ProtocolVersion::new(1, 10), features: BTreeSet::new() };
    let session = client_handshake(&mut c, &hello, &Limits::default()).unwrap();
    assert_eq!(session.version, ProtocolVersion::new(1, 10));
    assert_eq!(c.output, client_greeting(10));
}

#[test]
fn client_handshake_info_by_version() {
    type Infos<'a> = Vec<(&'a str, Option<TrustedFlag>)>;
    let cases: [(u8, &str, Infos); 3] = [
        (30, "client-handshake-info_1_30.bin", vec![("unused", None)]),
        (33, "client-handshake-info_1_33.bin", vec![("foo", None), ("bar", None)]),
        (
            35,
            "client-handshake-info_1_35.bin",
            vec![("foo", Some(TrustedFlag::NotTrusted)), ("bar", Some(TrustedFlag::Trusted))],
        ),
    ];
    for (minor, file, infos) in cases {
        let mut all = Vec::new();
        for (nix_version, trust) in infos {
            let greeting = client_greeting(minor);
            let hello = ServerHello {
                version: ProtocolVersion::MAX,
                nix_version: nix_version.into(),
                trust,
                features: BTreeSet::new(),
            };
            let mut s = Duplex { input: &greeting, output: Vec::new() };
            server_handshake(&mut s, &hello, &Limits::default()).unwrap();
            all.extend_from_slice(&s.output[16..]);

            // And the client reads it back.
            let mut to_client = s.output.clone();
            to_client.truncate(16);
            to_client.extend_from_slice(&s.output[16..]);
            let mut c = Duplex { input: &to_client, output: Vec::new() };
            let hello = ClientHello { version: ProtocolVersion::new(1, minor), features: BTreeSet::new() };
            let session = client_handshake(&mut c, &hello, &Limits::default()).unwrap();
            assert_eq!(session.trust, trust);
            assert_eq!(session.nix_version.as_deref(), (minor >= 33).then_some(nix_version));
            assert_eq!(c.output, client_greeting(minor));
        }
        assert_eq!(all, fixture(file), "{file}");
    }
}
