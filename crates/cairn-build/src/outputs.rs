//! What a finished build produced: each output serialised as a NAR once, with its NAR hash, its
//! references and (for fixed outputs) its content hash computed from that same pass.
//!
//! References are found as Nix finds them: by scanning the NAR for the hash parts of the input
//! closure and of the derivation's own outputs (so an output may refer to itself and to its
//! siblings). A fixed output must hash to what the derivation declares — its file's bytes for
//! `flat`, its NAR for `recursive`, with the declared algorithm — and may refer to nothing. The
//! NAR is kept (in memory, spilled to a file past [`SPILL`]) so that the store restores exactly
//! what was hashed; the restore makes it canonical (modes 0444/0555, no setuid/setgid, mtime 1).
//! With `build-max-output-size` set, serialising stops as soon as an output's NAR passes it:
//! a sparse file of gigabytes is refused after reading the limit, not stored at its full size.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::Path;

use cairn_nix::hash::{Hash, HashAlgo, Hasher};
use cairn_nix::references::ReferenceScanner;
use cairn_nix::{ContentAddress, FileIngestionMethod, StorePath};

/// NARs up to this size stay in memory.
const SPILL: usize = 8 << 20;

/// Why an output was refused.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("builder for '{drv}' failed to produce output path for output '{output}' at '{path}'")]
    Missing { drv: String, output: String, path: String },
    /// As Nix: someone other than the builder could have written into it.
    #[error("suspicious ownership or permission on '{path}' for output '{output}'; rejecting this build output")]
    Suspicious { output: String, path: String },
    /// `found` is the output as built, with the content address it has (no references): Nix
    /// registers it at that address's path before it reports the mismatch.
    #[error("hash mismatch in fixed-output derivation '{drv}':\n  specified: {specified}\n     got:    {got}")]
    HashMismatch { drv: String, specified: String, got: String, found: Option<Box<Collected>> },
    #[error(
        "output path '{path}' should be a non-executable regular file since recursive hashing is not enabled \
         (outputHashMode=flat)"
    )]
    NotFlat { path: String },
    #[error("fixed-output derivation '{drv}' produced output '{path}' that refers to store paths: {refs}")]
    FixedWithReferences { drv: String, path: String, refs: String },
    #[error("output '{path}' is larger than build-max-output-size ({limit} bytes as a NAR)")]
    TooLarge { path: String, limit: u64 },
    #[error("reading output '{path}': {message}")]
    Read { path: String, message: String },
}

/// A NAR kept for the restore.
#[derive(Debug)]
pub enum Spool {
    Memory(Vec<u8>),
    File(File),
}

impl Spool {
    /// A reader over the whole NAR.
    pub fn into_reader(self) -> io::Result<Box<dyn Read + Send>> {
        Ok(match self {
            Spool::Memory(v) => Box::new(io::Cursor::new(v)),
            Spool::File(mut f) => {
                f.rewind()?;
                Box::new(io::BufReader::new(f))
            }
        })
    }
}

/// Everything written to it is hashed, scanned and kept.
struct Sink<'a> {
    nar: Hasher,
    size: u64,
    /// The content hash of a recursive fixed output with another algorithm than SHA-256.
    other: Option<Hasher>,
    scanner: ReferenceScanner,
    spool: Spool,
    spill_dir: &'a Path,
    /// `build-max-output-size`; passing it fails the write and sets `over`.
    limit: Option<u64>,
    over: bool,
}

impl Write for Sink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.limit.is_some_and(|l| self.size + buf.len() as u64 > l) {
            self.over = true;
            return Err(io::Error::other("the output is larger than build-max-output-size"));
        }
        self.nar.update(buf);
        if let Some(h) = self.other.as_mut() {
            h.update(buf);
        }
        self.scanner.update(buf);
        self.size += buf.len() as u64;
        match &mut self.spool {
            Spool::Memory(v) if v.len() + buf.len() > SPILL => {
                let mut f = tempfile_in(self.spill_dir)?;
                f.write_all(v)?;
                f.write_all(buf)?;
                self.spool = Spool::File(f);
            }
            Spool::Memory(v) => v.extend_from_slice(buf),
            Spool::File(f) => f.write_all(buf)?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An unnamed file in `dir`.
fn tempfile_in(dir: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).write(true).custom_flags(nix::libc::O_TMPFILE).mode(0o600).open(dir)
}

/// One collected output.
#[derive(Debug)]
pub struct Collected {
    pub path: StorePath,
    pub nar: Spool,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub ca: Option<ContentAddress>,
}

/// What to check an output against.
pub struct Expect<'a> {
    pub drv: &'a str,
    pub output: &'a str,
    pub path: &'a StorePath,
    /// The path as printed (logical store directory).
    pub display: &'a str,
    pub fixed: Option<(FileIngestionMethod, Hash)>,
    /// `build-max-output-size`: the largest NAR accepted.
    pub max_nar_size: Option<u64>,
}

/// Serialises, hashes and scans the output at `host` (the builder's copy); `candidates` maps
/// hash parts to the paths a reference may name. `spill_dir` takes large NARs.
pub fn collect(
    host: &Path,
    expect: &Expect<'_>,
    candidates: &BTreeMap<String, StorePath>,
    spill_dir: &Path,
) -> Result<Collected, OutputError> {
    let read_err =
        |e: &dyn std::fmt::Display| OutputError::Read { path: expect.display.to_owned(), message: e.to_string() };
    let meta = match std::fs::symlink_metadata(host) {
        Ok(m) => m,
        Err(_) => {
            return Err(OutputError::Missing {
                drv: expect.drv.to_owned(),
                output: expect.output.to_owned(),
                path: expect.display.to_owned(),
            })
        }
    };
    if !meta.file_type().is_symlink() && std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o022 != 0 {
        return Err(OutputError::Suspicious { output: expect.output.to_owned(), path: expect.display.to_owned() });
    }
    let other = match &expect.fixed {
        Some((FileIngestionMethod::Recursive, h)) if h.algo() != HashAlgo::Sha256 => Some(Hasher::new(h.algo())),
        _ => None,
    };
    let mut sink = Sink {
        nar: Hasher::new(HashAlgo::Sha256),
        size: 0,
        other,
        scanner: ReferenceScanner::new(candidates.keys().map(String::as_str)),
        spool: Spool::Memory(Vec::new()),
        spill_dir,
        limit: expect.max_nar_size,
        over: false,
    };
    if let Err(e) = cairn_store::dump(host, &mut sink) {
        return Err(match (sink.over, expect.max_nar_size) {
            (true, Some(limit)) => OutputError::TooLarge { path: expect.display.to_owned(), limit },
            _ => read_err(&e),
        });
    }
    let nar_hash = sink.nar.finish();
    let references: BTreeSet<StorePath> = sink.scanner.found().filter_map(|h| candidates.get(h)).cloned().collect();
    let ca = match &expect.fixed {
        None => None,
        Some((method, wanted)) => {
            let got = match method {
                FileIngestionMethod::Recursive => match sink.other {
                    Some(h) => h.finish(),
                    None => nar_hash.clone(),
                },
                FileIngestionMethod::Flat => {
                    use std::os::unix::fs::PermissionsExt;
                    if !meta.is_file() || meta.permissions().mode() & 0o100 != 0 {
                        return Err(OutputError::NotFlat { path: expect.display.to_owned() });
                    }
                    let mut h = Hasher::new(wanted.algo());
                    let mut f = File::open(host).map_err(|e| read_err(&e))?;
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let n = f.read(&mut buf).map_err(|e| read_err(&e))?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                    }
                    h.finish()
                }
            };
            if got != *wanted {
                let found = references.is_empty().then(|| {
                    Box::new(Collected {
                        path: expect.path.clone(),
                        nar: sink.spool,
                        nar_hash,
                        nar_size: sink.size,
                        references: BTreeSet::new(),
                        ca: Some(ContentAddress::Fixed { method: *method, hash: got.clone() }),
                    })
                });
                return Err(OutputError::HashMismatch {
                    drv: expect.drv.to_owned(),
                    specified: wanted.to_sri(),
                    got: got.to_sri(),
                    found,
                });
            }
            if !references.is_empty() {
                let refs = references.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
                return Err(OutputError::FixedWithReferences {
                    drv: expect.drv.to_owned(),
                    path: expect.display.to_owned(),
                    refs,
                });
            }
            Some(ContentAddress::Fixed { method: *method, hash: got })
        }
    };
    Ok(Collected { path: expect.path.clone(), nar: sink.spool, nar_hash, nar_size: sink.size, references, ca })
}

/// Orders a build's outputs so that each comes after the outputs it refers to, as Nix's
/// `registerOutputs` does with `topoSort`, and refuses outputs that refer to each other in a
/// cycle with Nix's message, naming the same two outputs Nix names (its depth-first search over
/// output names in sorted order, children in sorted order, is followed step for step).
/// `refers` gives, for an output name, the names of the other outputs its references include.
pub fn output_order(
    drv: &str,
    names: &BTreeSet<String>,
    refers: impl Fn(&str) -> BTreeSet<String>,
) -> Result<Vec<String>, OutputCycle> {
    struct Dfs<'a> {
        drv: &'a str,
        names: &'a BTreeSet<String>,
        refers: &'a dyn Fn(&str) -> BTreeSet<String>,
        visited: BTreeSet<String>,
        parents: BTreeSet<String>,
        sorted: Vec<String>,
    }
    impl Dfs<'_> {
        fn visit(&mut self, name: &str, parent: Option<&str>) -> Result<(), OutputCycle> {
            if self.parents.contains(name) {
                return Err(OutputCycle {
                    drv: self.drv.to_owned(),
                    output: name.to_owned(),
                    from: parent.unwrap_or_default().to_owned(),
                });
            }
            if !self.visited.insert(name.to_owned()) {
                return Ok(());
            }
            self.parents.insert(name.to_owned());
            for child in (self.refers)(name) {
                if child != name && self.names.contains(&child) {
                    self.visit(&child, Some(name))?;
                }
            }
            self.sorted.push(name.to_owned());
            self.parents.remove(name);
            Ok(())
        }
    }
    let mut dfs =
        Dfs { drv, names, refers: &refers, visited: BTreeSet::new(), parents: BTreeSet::new(), sorted: Vec::new() };
    for name in names {
        dfs.visit(name, None)?;
    }
    // Nix reverses its post-order to get referrers first; cairn wants references first, which
    // the post-order already is.
    Ok(dfs.sorted)
}

/// A build's outputs refer to each other in a cycle (Nix 2.8's words).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cycle detected in build of '{drv}' in the references of output '{output}' from output '{from}'")]
pub struct OutputCycle {
    pub drv: String,
    pub output: String,
    pub from: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sp(s: &str) -> StorePath {
        StorePath::from_base_name(s).unwrap()
    }

    fn expect<'a>(path: &'a StorePath, fixed: Option<(FileIngestionMethod, Hash)>) -> Expect<'a> {
        Expect { drv: "/nix/store/x.drv", output: "out", path, display: "/nix/store/p", fixed, max_nar_size: None }
    }

    #[test]
    fn finds_references_to_itself_and_inputs_only() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let me = sp("00000000000000000000000000000000-me");
        let dep = sp("11111111111111111111111111111111-dep");
        let unrelated = sp("22222222222222222222222222222222-no");
        std::fs::write(out.join("a"), format!("/nix/store/{me} and /nix/store/{dep}")).unwrap();
        let candidates: BTreeMap<String, StorePath> =
            [&me, &dep].into_iter().map(|p| (p.hash_part().to_owned(), p.clone())).collect();
        let c = collect(&out, &expect(&me, None), &candidates, t.path()).unwrap();
        assert_eq!(c.references, BTreeSet::from([me.clone(), dep]));
        assert!(!c.references.contains(&unrelated));
        let mut nar = Vec::new();
        cairn_store::dump(&out, &mut nar).unwrap();
        assert_eq!(c.nar_hash, Hash::digest(HashAlgo::Sha256, &nar));
        assert_eq!(c.nar_size, nar.len() as u64);
        let mut kept = Vec::new();
        c.nar.into_reader().unwrap().read_to_end(&mut kept).unwrap();
        assert_eq!(kept, nar);
    }

    #[test]
    fn fixed_outputs_are_checked_with_their_algorithm() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, b"hello\n").unwrap();
        let p = sp("00000000000000000000000000000000-f");
        let none = BTreeMap::new();
        for algo in [HashAlgo::Sha1, HashAlgo::Sha256, HashAlgo::Sha512] {
            let good = Hash::digest(algo, b"hello\n");
            let c = collect(&f, &expect(&p, Some((FileIngestionMethod::Flat, good.clone()))), &none, t.path()).unwrap();
            assert_eq!(c.ca, Some(ContentAddress::Fixed { method: FileIngestionMethod::Flat, hash: good }));
            let bad = Hash::digest(algo, b"other");
            let e = collect(&f, &expect(&p, Some((FileIngestionMethod::Flat, bad))), &none, t.path()).unwrap_err();
            assert!(e.to_string().starts_with("hash mismatch in fixed-output derivation '/nix/store/x.drv'"), "{e}");
        }
        let mut nar = Vec::new();
        cairn_store::dump(&f, &mut nar).unwrap();
        let r = Hash::digest(HashAlgo::Sha512, &nar);
        assert!(collect(&f, &expect(&p, Some((FileIngestionMethod::Recursive, r))), &none, t.path()).is_ok());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        let good = Hash::digest(HashAlgo::Sha256, b"hello\n");
        let e = collect(&f, &expect(&p, Some((FileIngestionMethod::Flat, good))), &none, t.path()).unwrap_err();
        assert!(matches!(e, OutputError::NotFlat { .. }));
    }

    #[test]
    fn missing_output_and_large_nars_spill() {
        let t = tempfile::tempdir().unwrap();
        let p = sp("00000000000000000000000000000000-f");
        let e = collect(&t.path().join("nothing"), &expect(&p, None), &BTreeMap::new(), t.path()).unwrap_err();
        assert!(matches!(e, OutputError::Missing { .. }));
        let big = t.path().join("big");
        std::fs::write(&big, vec![7u8; SPILL + 100]).unwrap();
        let c = collect(&big, &expect(&p, None), &BTreeMap::new(), t.path()).unwrap();
        assert!(matches!(c.nar, Spool::File(_)));
        let mut kept = Vec::new();
        c.nar.into_reader().unwrap().read_to_end(&mut kept).unwrap();
        assert_eq!(kept.len() as u64, c.nar_size);
    }

    #[test]
    fn an_output_over_the_max_output_size_is_refused_early() {
        let t = tempfile::tempdir().unwrap();
        let p = sp("00000000000000000000000000000000-f");
        // A sparse file of 1 GiB: refusing it must not read it all.
        let big = t.path().join("sparse");
        std::fs::File::create(&big).unwrap().set_len(1 << 30).unwrap();
        let limited = Expect { max_nar_size: Some(1 << 20), ..expect(&p, None) };
        let started = std::time::Instant::now();
        let e = collect(&big, &limited, &BTreeMap::new(), t.path()).unwrap_err();
        assert!(matches!(e, OutputError::TooLarge { limit: 1048576, .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "output '/nix/store/p' is larger than build-max-output-size (1048576 bytes as a NAR)"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "stopped at the limit");
        let small = t.path().join("small");
        std::fs::write(&small, b"fits").unwrap();
        assert!(collect(&small, &limited, &BTreeMap::new(), t.path()).is_ok());
    }

    #[test]
    fn outputs_in_a_cycle_are_refused_naming_the_outputs_nix_names() {
        let names: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        let edges = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| pairs.iter().filter(|(a, _)| *a == n).map(|(_, b)| b.to_string()).collect()
        };
        // a → c → b → a: Nix starts at a, goes to c, then b, and meets a again from b.
        let e = output_order("/d.drv", &names, edges(&[("a", "c"), ("c", "b"), ("b", "a")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cycle detected in build of '/d.drv' in the references of output 'a' from output 'b'"
        );
        // Self-references and references to other outputs without a cycle: references first.
        let order = output_order("/d.drv", &names, edges(&[("a", "a"), ("a", "b"), ("b", "c"), ("c", "c")])).unwrap();
        assert_eq!(order, vec!["c", "b", "a"]);
    }
}
