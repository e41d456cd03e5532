//! What puts paths into the store: `AddToStore` (every content-address method, and the layout
//! before 1.25), `AddTextToStore`, `AddToStoreNar` and `AddMultipleToStore`.
//!
//! Content-addressed adds compute the path from the bytes, so anyone may make them. Adds that
//! come with metadata (`AddToStoreNar`, `AddMultipleToStore`) are Nix's `addToStore(info)`:
//! the NAR must hash to the claimed hash, a claimed content address must hold, and unless the
//! client is trusted and asked not to, the path needs a trusted signature or a content address
//! that proves it (with `require-sigs`, as in Nix).
//!
//! A framed payload is drained whatever happens, so that an error leaves the stream in step; a
//! bare NAR (clients before 1.23/1.25) is read exactly to its end, and a failure in the middle
//! of one ends the session.

use std::collections::BTreeSet;
use std::io::{self, Read, Seek, Write};

use cairn_nix::hash::{Hasher, HashingWriter};
use cairn_nix::nar::{NarEvent, NarReader};
use cairn_nix::{ContentAddress, FileIngestionMethod, HashAlgo, StorePath};
use cairn_store::{ClientScope, PathInfo};
use cairn_worker::{codec, CaMethod, FramedReader, Payload, Response, StderrMessage, ValidPathInfo};

use super::ops::wire_info;
use super::session::{Failure, OpResult, Session};

/// Pulls a payload from the client with `STDERR_READ` (clients 1.21–1.22): each read asks for
/// exactly what the caller wants, so nothing past the payload is requested.
struct Tunnel<'a, R: Read, W: Write> {
    r: &'a mut R,
    w: &'a mut W,
    version: cairn_worker::ProtocolVersion,
    max: usize,
}

impl<R: Read, W: Write> Read for Tunnel<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(self.max);
        StderrMessage::Read(want as u64).write(self.w, self.version).map_err(io::Error::other)?;
        self.w.flush()?;
        let got = codec::read_bytes(self.r, want).map_err(io::Error::other)?;
        if got.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the client sent an empty chunk"));
        }
        buf[..got.len()].copy_from_slice(&got);
        Ok(got.len())
    }
}

/// A file that disappears when closed, for payloads whose path is known only once they are
/// hashed.
fn spool_file(st: &crate::state::AppState) -> OpResult<std::fs::File> {
    tempfile::tempfile_in(&st.store.layout().state_dir)
        .map_err(|e| Failure::Report(format!("cannot create a temporary file: {e}")))
}

impl<R: Read, W: Write> Session<R, W> {
    /// `AddToStore` (≥ 1.25): a framed dump hashed as `method` says.
    pub(super) fn add_to_store(
        &mut self,
        name: &str,
        method: CaMethod,
        references: &BTreeSet<StorePath>,
    ) -> OpResult<Response> {
        let st = self.st.clone();
        let _client = ClientScope::enter(self.peer.client);
        let mut framed = FramedReader::new(&mut self.r);
        let added = (|| -> OpResult<PathInfo> {
            match method {
                CaMethod::Text => {
                    let mut text = Vec::new();
                    (&mut framed).take(self.proto.limits.max_blob as u64 + 1).read_to_end(&mut text)?;
                    if text.len() > self.proto.limits.max_blob {
                        return Err(Failure::Report(format!("text for '{name}' is too large")));
                    }
                    Ok(st.store.add_text(name, &text, references)?)
                }
                CaMethod::Fixed { method: FileIngestionMethod::Recursive, algo: HashAlgo::Sha256 } => {
                    Ok(st.store.add_nar_with_references(name, &mut framed, references)?)
                }
                CaMethod::Fixed { method, algo } => {
                    if !references.is_empty() {
                        return Err(Failure::Report(
                            "cannot yet have refs with flat or nar-hashed data (only recursive SHA-256 paths and text may have references)"
                                .into(),
                        ));
                    }
                    add_hashed(&st, name, method, algo, &mut framed)
                }
            }
        })();
        // Whatever happened, the rest of the frames go: the next request follows them.
        framed.drain()?;
        let info = added?;
        self.temp_roots.extend([info.path.clone()]);
        tracing::info!(path = %self.show(&info.path), "added (nix protocol)");
        Ok(Response::ValidPathInfo(ValidPathInfo { path: info.path.clone(), info: wire_info(&info) }))
    }

    /// `AddToStore` before 1.25: a bare NAR, whatever the method (a flat file comes as the
    /// NAR of a regular file).
    pub(super) fn add_to_store_legacy(
        &mut self,
        name: &str,
        fixed: bool,
        recursive: bool,
        hash_algo: &str,
    ) -> OpResult<Response> {
        let st = self.st.clone();
        let _client = ClientScope::enter(self.peer.client);
        // The NAR is read to its end first (a parse error here leaves the stream out of step).
        let mut nar = spool_file(&st)?;
        cairn_nix::nar::copy_one(&mut self.r, &mut nar, cairn_nix::nar::Limits::default())
            .map_err(|e| Failure::Fatal(format!("bad NAR: {e}")))?;
        nar.rewind()?;
        // Nix's compatibility hack: an add that is not fixed is recursive SHA-256.
        let (method, algo) = if !fixed {
            (FileIngestionMethod::Recursive, HashAlgo::Sha256)
        } else {
            let algo: HashAlgo =
                hash_algo.parse().map_err(|_| Failure::Report(format!("unknown hash algorithm '{hash_algo}'")))?;
            (if recursive { FileIngestionMethod::Recursive } else { FileIngestionMethod::Flat }, algo)
        };
        let info = match method {
            FileIngestionMethod::Recursive if algo == HashAlgo::Sha256 => st.store.add_nar(name, nar)?,
            FileIngestionMethod::Recursive => add_hashed(&st, name, method, algo, &mut nar)?,
            FileIngestionMethod::Flat => {
                // The file inside the NAR is what is hashed.
                let mut file = spool_file(&st)?;
                let mut reader = NarReader::new(io::BufReader::new(nar), cairn_nix::nar::Limits::default())
                    .map_err(|e| Failure::Report(format!("bad NAR: {e}")))?;
                match reader.next_event().map_err(|e| Failure::Report(format!("bad NAR: {e}")))? {
                    Some(NarEvent::Regular { .. }) => {
                        reader
                            .copy_contents(&mut file, &mut vec![0u8; 1 << 16])
                            .map_err(|e| Failure::Report(format!("bad NAR: {e}")))?;
                    }
                    _ => return Err(Failure::Report("a flat add needs the NAR of a regular file".into())),
                }
                file.rewind()?;
                add_hashed(&st, name, FileIngestionMethod::Flat, algo, &mut file)?
            }
        };
        self.temp_roots.extend([info.path.clone()]);
        Ok(Response::Path(info.path))
    }

    /// `AddTextToStore` (clients before 1.25).
    pub(super) fn add_text(&mut self, name: &str, text: &[u8], refs: &BTreeSet<StorePath>) -> OpResult<Response> {
        let _client = ClientScope::enter(self.peer.client);
        let info = self.st.store.add_text(name, text, refs)?;
        self.temp_roots.extend([info.path.clone()]);
        Ok(Response::Path(info.path))
    }

    /// `AddToStoreNar`: one path with its metadata; the payload's form depends on the version.
    pub(super) fn add_to_store_nar(
        &mut self,
        info: ValidPathInfo,
        repair: bool,
        dont_check_sigs: bool,
    ) -> OpResult<()> {
        let st = self.st.clone();
        let _client = ClientScope::enter(self.peer.client);
        let mut info = crate::convert::store_info(info);
        if !self.peer.trusted {
            info.ultimate = false;
        }
        let refused = check_trust(&st, &self.policy(), self.peer.trusted, &info, dont_check_sigs);
        let repair = repair && self.peer.trusted;
        let size = info.nar_size;
        let path = info.path.clone();
        let payload = cairn_worker::Request::AddToStoreNar {
            info: ValidPathInfo { path: path.clone(), info: wire_info(&info) },
            repair,
            dont_check_sigs,
        }
        .payload(&self.proto);
        // The NAR is checked into a batch; the batch is committed only once the payload has
        // been read to its end, so a client cut off after its NAR has registered nothing.
        let add = |input: &mut dyn Read| -> OpResult<cairn_store::Batch> {
            refused?;
            let batch = if repair { st.store.repair_batch()? } else { st.store.batch()? };
            let mut nar = input.take(size);
            batch.add_nar_with_info(info, &mut nar, |_| Ok::<(), cairn_store::StoreError>(()))?;
            io::copy(&mut nar, &mut io::sink())?;
            Ok(batch)
        };
        let batch = match payload {
            Payload::Framed => {
                let mut framed = FramedReader::new(&mut self.r);
                let r = add(&mut framed);
                framed.drain()?;
                r?
            }
            Payload::Tunnelled => {
                let version = self.proto.version;
                let mut tunnel = Tunnel { r: &mut self.r, w: &mut self.w, version, max: 1 << 20 };
                // Refused before anything is pulled: the client sends nothing unasked.
                add(&mut tunnel)?
            }
            _ => {
                // A bare NAR of exactly NarSize bytes: all of it must be read, whatever happens.
                let mut bare = (&mut self.r).take(size);
                let r = add(&mut bare);
                if bare.limit() > 0 {
                    io::copy(&mut bare, &mut io::sink())?;
                }
                r?
            }
        };
        let committed = batch.commit()?;
        let new = !committed.added.is_empty();
        check_committed(&st, committed)?;
        self.temp_roots.extend([path.clone()]);
        if new {
            tracing::info!(path = %self.show(&path), "added with metadata (nix protocol)");
        }
        Ok(())
    }

    /// `AddMultipleToStore`: a framed stream of (metadata, NAR) pairs, added as one batch, so
    /// that paths are registered whole closures at a time.
    pub(super) fn add_multiple(&mut self, repair: bool, dont_check_sigs: bool) -> OpResult<()> {
        let st = self.st.clone();
        let _client = ClientScope::enter(self.peer.client);
        let repair = repair && self.peer.trusted;
        let proto = self.proto.clone();
        let trusted = self.peer.trusted;
        let policy = self.policy();
        let mut added = Vec::new();
        // Buffered above the framing, so that nothing past the payload's end is read.
        let mut input = io::BufReader::with_capacity(1 << 16, FramedReader::new(&mut self.r));
        let result = (|| -> OpResult<cairn_store::Batch> {
            let batch = if repair { st.store.repair_batch()? } else { st.store.batch()? };
            let count = cairn_worker::request::read_multiple_count(&mut input, &proto)?;
            for _ in 0..count {
                let wire = cairn_worker::request::read_multiple_entry_info(&mut input, &proto)?;
                let mut info = crate::convert::store_info(wire);
                if !trusted {
                    info.ultimate = false;
                }
                check_trust(&st, &policy, trusted, &info, dont_check_sigs)?;
                added.push(info.path.clone());
                let mut nar = (&mut input).take(info.nar_size);
                batch.add_nar_with_info(info, &mut nar, |_| Ok::<(), cairn_store::StoreError>(()))?;
                io::copy(&mut nar, &mut io::sink())?;
            }
            Ok(batch)
        })();
        // Whatever happened, the rest of the frames go (what the buffer holds is part of them);
        // only a payload read to its end is committed.
        input.into_inner().drain()?;
        let committed = result?.commit()?;
        for i in &committed.added {
            tracing::info!(path = %st.store_dir.display(&i.path), "added with metadata (nix protocol)");
        }
        check_committed(&st, committed)?;
        self.temp_roots.extend(added);
        Ok(())
    }
}

/// Adds a dump hashed with `algo` (a flat file's bytes, or a NAR hashed recursively): it is
/// spooled while both hashes are computed, since its path depends on them, then added with
/// the metadata they give.
fn add_hashed(
    st: &crate::state::AppState,
    name: &str,
    method: FileIngestionMethod,
    algo: HashAlgo,
    input: &mut dyn Read,
) -> OpResult<PathInfo> {
    let file = spool_file(st)?;
    let mut w = HashingWriter::new(io::BufWriter::with_capacity(1 << 16, file), algo);
    let size = io::copy(input, &mut w)?;
    let (hash, _, inner) = w.finish();
    let mut file = inner.into_inner().map_err(|e| Failure::Report(format!("cannot write a temporary file: {e}")))?;
    file.rewind()?;
    match method {
        FileIngestionMethod::Flat => Ok(st.store.add_flat_expecting(name, file, size, &hash)?),
        FileIngestionMethod::Recursive => {
            let mut sha = Hasher::new(HashAlgo::Sha256);
            io::copy(&mut file, &mut sha)?;
            file.rewind()?;
            let nar_hash = sha.finish();
            let path = st
                .store_dir
                .make_fixed_output_path(name, method, &hash, &BTreeSet::new(), false)
                .map_err(|e| Failure::Report(e.to_string()))?;
            let info = PathInfo {
                path,
                nar_hash,
                nar_size: size,
                references: BTreeSet::new(),
                deriver: None,
                registration_time: 0,
                ultimate: false,
                signatures: BTreeSet::new(),
                ca: Some(ContentAddress::Fixed { method, hash }),
            };
            let store = st.store.clone();
            let batch = store.batch()?;
            batch
                .add_nar_with_info(info.clone(), io::BufReader::new(file), |_| Ok::<(), cairn_store::StoreError>(()))?;
            batch.commit()?;
            Ok(st.store.valid_path_info(&info.path)?)
        }
    }
}

/// Whether a path with this metadata may come in without its signatures being checked, and
/// if not, whether they (or its content address) pass: Nix's rule, `require-sigs` unless a
/// trusted client asked not to check.
fn check_trust(
    st: &crate::state::AppState,
    policy: &cairn_cache::Policy,
    trusted: bool,
    info: &PathInfo,
    dont_check_sigs: bool,
) -> OpResult<()> {
    let require = policy.require_sigs && !(trusted && dont_check_sigs);
    let policy = cairn_cache::Policy { require_sigs: require, ..policy.clone() };
    cairn_cache::substitute::trusted_path_info(&st.store_dir, info, &policy).map_err(|why| {
        Failure::Report(format!(
            "cannot add path '{}' because it lacks a signature by a trusted key: {why}",
            st.store_dir.display(&info.path)
        ))
    })
}

/// A commit that left paths out (a reference neither valid nor sent) is an error, as Nix's
/// registration refuses it.
fn check_committed(st: &crate::state::AppState, c: cairn_store::Committed) -> OpResult<()> {
    if let Some((p, r)) = c.incomplete.first() {
        return Err(Failure::Report(format!(
            "cannot add path '{}' because its reference '{}' is not valid",
            st.store_dir.display(p),
            st.store_dir.display(r)
        )));
    }
    Ok(())
}
