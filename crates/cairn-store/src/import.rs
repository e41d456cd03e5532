//! Import of `nix-store --export` streams.
//!
//! An import is all or nothing: nothing of a stream is registered unless every path in it
//! checks out — its NAR well-formed, its references valid or earlier in the stream, its NAR hash
//! equal to the recorded one if the path is valid already.
//!
//! A stream names a path only *after* its NAR. Rather than restoring each NAR into a temporary
//! directory and renaming it into place afterwards (a rename per path), the reading thread
//! parses and hashes each NAR while recording its bytes (in memory, spilling to a file in the
//! temporary area past [`SPILL_AT`]); once the trailer names the path, the path is locked and the
//! recording handed to a second thread that restores it directly at its final place. Parsing
//! and file creation so run on two cores, and the only per-path file system work is creating
//! the files. At the end one `syncfs` makes everything durable and one transaction registers it.
//! If anything fails, the paths placed so far (unregistered, still locked) are removed.
//!
//! Placing contents at their final path before registration is what a crash could leave too; the
//! store's invariant already covers it (an unregistered tree at a path's place is replaced by the
//! next add of that path), and such a tree is never served: readers check validity first.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use cairn_nix::export::{read_marker, read_trailer};
use cairn_nix::nar::{Limits, NarReader};
use cairn_nix::{HashAlgo, Hasher, StorePath};

use crate::locks::PathLockGuard;
use crate::{fsops, now, remove_tree, restore_with_buffer, LocalStore, PathInfo, RestoreMode, Result, StoreError};

/// NARs up to this size are handed over in memory; larger ones through a file.
const SPILL_AT: usize = 1 << 20;
/// Recordings in flight between the two threads (bounds memory to about 32 MiB).
const IN_FLIGHT: usize = 32;

/// A recorded NAR on its way to being placed.
enum Recording {
    Memory(Vec<u8>),
    File(PathBuf),
}

struct Job {
    dest: PathBuf,
    nar: Recording,
}

/// Records the bytes a NAR parser consumes, hashing them as they pass.
struct Recorder<'a, R> {
    input: &'a mut R,
    hasher: Hasher,
    size: u64,
    memory: Vec<u8>,
    spill: Option<(PathBuf, BufWriter<File>)>,
    spill_path: PathBuf,
}

impl<'a, R: Read> Recorder<'a, R> {
    fn new(input: &'a mut R, spill_path: PathBuf) -> Self {
        Recorder { input, hasher: Hasher::new(HashAlgo::Sha256), size: 0, memory: Vec::new(), spill: None, spill_path }
    }

    fn finish(self) -> Result<(cairn_nix::Hash, u64, Recording)> {
        let recording = match self.spill {
            None => Recording::Memory(self.memory),
            Some((path, mut w)) => {
                w.flush().map_err(|source| StoreError::Io { op: "write", path: path.clone(), source })?;
                Recording::File(path)
            }
        };
        Ok((self.hasher.finish(), self.size, recording))
    }
}

impl<R: Read> Read for Recorder<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        let data = &buf[..n];
        self.hasher.update(data);
        self.size += n as u64;
        if self.spill.is_none() && self.memory.len() + n > SPILL_AT {
            let mut w = BufWriter::with_capacity(1 << 20, File::create(&self.spill_path)?);
            w.write_all(&self.memory)?;
            self.memory = Vec::new();
            self.spill = Some((self.spill_path.clone(), w));
        }
        match &mut self.spill {
            Some((_, w)) => w.write_all(data)?,
            None => self.memory.extend_from_slice(data),
        }
        Ok(n)
    }
}

/// What the reading thread found.
struct Staged {
    /// Every path of the stream, in stream order (valid ones with their recorded metadata).
    all: Vec<PathInfo>,
    /// The paths to register.
    new: Vec<PathInfo>,
    /// Temporary roots on every path of the stream and every reference, so that a collection
    /// cannot take a reference between its check and the registration.
    roots: crate::TempRootGuard,
}

impl LocalStore {
    /// Imports an export stream. Returns the paths of the stream in stream order (including
    /// those that were valid already).
    pub fn import(&self, input: impl Read) -> Result<Vec<PathInfo>> {
        // Imports take many path locks one by one; two imports taking the same paths in
        // different orders could deadlock, so imports run one at a time. Adds take one path lock
        // at a time and never wait while holding one, so they cannot close a cycle.
        let _one_import = self.import_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let started = std::time::Instant::now();
        let tmp = self.temp_dir()?;
        let mut input = BufReader::with_capacity(256 * 1024, input);
        let (tx, rx) = mpsc::sync_channel::<Job>(IN_FLIGHT);
        let mut sent: Vec<PathBuf> = Vec::new();
        // Locks on the new paths, held until they are registered or, on failure, removed (an
        // add of the same path must not register it while our copy is being removed).
        let mut locks: Vec<PathLockGuard<'_>> = Vec::new();
        let (read, placed) = std::thread::scope(|scope| {
            let writer = scope.spawn(|| self.place_all(rx));
            let read = self.read_stream(&mut input, &tmp.0, tx, &mut sent, &mut locks);
            (read, writer.join().expect("import writer thread panicked"))
        });
        let outcome = match (read, placed) {
            (Ok(staged), Ok(())) => {
                let new: Vec<StorePath> = staged.new.iter().map(|i| i.path.clone()).collect();
                self.commit_import(staged, started).map(|all| (all, new))
            }
            // The reader stops when the writer hangs up; the writer's error is the cause.
            (Err(_), Err(e)) | (Ok(_), Err(e)) => Err(e),
            (Err(e), Ok(())) => Err(e),
        };
        if outcome.is_err() {
            for dest in &sent {
                if let Err(e) = remove_tree(dest) {
                    tracing::warn!("cannot remove an unregistered import: {e}");
                }
            }
        }
        drop(locks);
        let (all, new) = outcome?;
        self.optimise_registered(new);
        Ok(all)
    }

    fn commit_import(&self, staged: Staged, started: std::time::Instant) -> Result<Vec<PathInfo>> {
        if !staged.new.is_empty() {
            let read = started.elapsed();
            cairn_fault::point("contents-written");
            // One syncfs makes every placed file and directory entry durable.
            fsops::sync_filesystem(&self.layout.real_store_dir)?;
            let synced = started.elapsed();
            cairn_fault::point("after-syncfs");
            if let Err(e) = self.register(&staged.new) {
                // Refused whole: what was placed for it goes.
                for info in &staged.new {
                    let _ = remove_tree(&self.real_path(&info.path));
                }
                return Err(e);
            }
            tracing::debug!(paths = staged.all.len(), new = staged.new.len(), ?read, ?synced, total = ?started.elapsed(), "import committed");
        }
        Ok(staged.all)
    }

    /// Parses the stream, checks every path, locks the new ones and hands their NARs over.
    fn read_stream<'a>(
        &'a self,
        input: &mut impl Read,
        tmp: &Path,
        tx: mpsc::SyncSender<Job>,
        sent: &mut Vec<PathBuf>,
        locks: &mut Vec<PathLockGuard<'a>>,
    ) -> Result<Staged> {
        let store_dir = self.store_dir().clone();
        let mut seen: HashSet<StorePath> = HashSet::new();
        let mut staged = Staged { all: Vec::new(), new: Vec::new(), roots: self.temp.add([]) };
        for n in 0u64.. {
            if !read_marker(input)? {
                break;
            }
            let mut rec = Recorder::new(input, tmp.join(format!("{n}.nar")));
            NarReader::new(&mut rec, Limits::default())?.skip_to_end()?;
            let (nar_hash, nar_size, recording) = rec.finish()?;
            let trailer = read_trailer(input)?;
            let path = store_dir.parse(&trailer.path)?;
            let references = trailer
                .references
                .iter()
                .map(|r| store_dir.parse(r))
                .collect::<std::result::Result<BTreeSet<_>, _>>()?;
            let deriver = trailer.deriver.as_deref().map(|d| store_dir.parse(d)).transpose()?;
            if !seen.insert(path.clone()) {
                continue; // the same path twice in one stream: the first copy wins
            }
            staged.roots.extend(references.iter().cloned().chain([path.clone()]));
            for r in &references {
                if r != &path && !seen.contains(r) && !self.is_valid(r)? {
                    return Err(StoreError::MissingReference { path: trailer.path, reference: store_dir.display(r) });
                }
            }
            let check_existing = |existing: PathInfo| {
                if existing.nar_hash != nar_hash {
                    return Err(StoreError::HashMismatch {
                        path: trailer.path.clone(),
                        expected: existing.nar_hash.to_string(),
                        actual: nar_hash.to_string(),
                    });
                }
                Ok(existing)
            };
            if let Some(existing) = self.path_info(&path)? {
                staged.all.push(check_existing(existing)?);
                continue;
            }
            let lock = self.locks.lock([path.clone()]);
            // Someone may have registered it while we waited for the lock.
            if let Some(existing) = self.path_info(&path)? {
                staged.all.push(check_existing(existing)?);
                continue;
            }
            locks.push(lock);
            let dest = self.real_path(&path);
            sent.push(dest.clone());
            if tx.send(Job { dest, nar: recording }).is_err() {
                return Err(StoreError::Io {
                    op: "hand over",
                    path: tmp.to_owned(),
                    source: io::Error::other("the import writer stopped"),
                });
            }
            let info = PathInfo {
                path,
                nar_hash,
                nar_size,
                references,
                deriver,
                registration_time: now(),
                ultimate: false,
                signatures: BTreeSet::new(),
                ca: None,
            };
            staged.new.push(info.clone());
            staged.all.push(info);
        }
        Ok(staged)
    }

    /// Restores handed-over NARs at their final places until the reader hangs up.
    fn place_all(&self, rx: mpsc::Receiver<Job>) -> Result<()> {
        let mut buf = vec![0u8; fsops::COPY_BUF];
        for job in rx {
            match self.place(&job, &mut buf) {
                // An unregistered leftover (from a crash) is in the way: replace it.
                Err(StoreError::Io { path, source, .. })
                    if path == job.dest && source.kind() == io::ErrorKind::AlreadyExists =>
                {
                    tracing::warn!(path = %job.dest.display(), "replacing an unregistered leftover");
                    remove_tree(&job.dest)?;
                    self.place(&job, &mut buf)?;
                }
                other => other?,
            }
            if let Recording::File(f) = &job.nar {
                let _ = std::fs::remove_file(f);
            }
        }
        Ok(())
    }

    fn place(&self, job: &Job, buf: &mut [u8]) -> Result<()> {
        match &job.nar {
            Recording::Memory(bytes) => restore_with_buffer(
                &mut NarReader::new(&bytes[..], Limits::default())?,
                &job.dest,
                RestoreMode::Canonical,
                buf,
            ),
            Recording::File(f) => {
                let file = File::open(f).map_err(|source| StoreError::Io { op: "open", path: f.clone(), source })?;
                let mut nar = NarReader::new(BufReader::with_capacity(1 << 20, file), Limits::default())?;
                restore_with_buffer(&mut nar, &job.dest, RestoreMode::Canonical, buf)
            }
        }
    }
}
