//! One layer holding an image's applied filesystem, made from the layers' tar streams without
//! writing the tree anywhere.
//!
//! Two passes over the layers. The first reads every entry's header and keeps an index of the
//! tree the layers make, applied as the OCI image spec says: a later entry replaces an earlier
//! one at its path (a directory over a directory only changes its metadata), `.wh.NAME` removes
//! `NAME` and everything below it from the layers beneath, `.wh..wh..opq` removes everything
//! the layers beneath put in its directory, and what a layer writes itself is never removed by
//! its own whiteouts. Entries are refused as unpacking refuses them (leaving the root, under a
//! non-directory, hard links to nothing), and a symlink on an entry's way is followed inside
//! the image as unpacking follows it. Each surviving regular file
//! remembers where its contents are: which layer, which entry.
//!
//! The second pass writes the layer: the root and every directory (sorted), then symlinks,
//! devices and fifos (sorted), then regular files as their contents come by while the layers
//! are read again in order, and hard links last (sorted), each to a file already written.
//! Owners, modes, times and extended attributes (PAX records) are the entries' own. The output
//! is a function of the image alone, so two stores squash an image to the same bytes.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use cairn_oci::manifest::Descriptor;
use tar::{EntryType, Header};

use crate::unpack::resolve::{resolve, Found, Make, Stop};
use crate::unpack::{read_layer, UnpackError};

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// A path in the image, relative to its root, without a trailing slash; empty for the root.
type Key = Vec<u8>;

/// Where a regular file's contents are: layer index and entry ordinal in it.
type Source = (usize, u64);

#[derive(Debug, Clone)]
enum Kind {
    Dir,
    File(Source),
    Symlink(Vec<u8>),
    /// A hard link to a path, and the contents it shares with that path when it was made.
    HardLink(Key, Source),
    /// A device or fifo: its header says which.
    Special,
}

#[derive(Debug, Clone)]
struct Node {
    kind: Kind,
    header: Header,
    /// PAX records to keep (owners, times, extended attributes), not those the writer makes.
    pax: Vec<(String, Vec<u8>)>,
}

/// What the first pass keeps of a tar entry: everything but its contents.
struct RawEntry {
    /// Its place among the layer's entries.
    ordinal: u64,
    path: Vec<u8>,
    header: Header,
    pax: Vec<(String, Vec<u8>)>,
    link: Option<Vec<u8>>,
}

/// Reads a layer's entries (an uncompressed tar), keeping their headers and copying every
/// byte read to `spool`, so that the second pass reads contents from there instead of
/// decompressing the layer again.
fn read_entries(label: &str, input: &mut dyn Read, spool: &mut dyn Write) -> Result<Vec<RawEntry>, UnpackError> {
    let bad_tar = |source| UnpackError::BadTar { layer: label.to_owned(), source };
    let mut tee = Tee { inner: input, copy: spool };
    let mut archive = tar::Archive::new(&mut tee);
    let mut out = Vec::new();
    for (ordinal, entry) in archive.entries().map_err(bad_tar)?.enumerate() {
        let mut e = entry.map_err(bad_tar)?;
        let kind = e.header().entry_type();
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() || kind.is_gnu_longname() {
            continue;
        }
        let pax = keep_pax(&mut e).map_err(bad_tar)?;
        out.push(RawEntry {
            ordinal: ordinal as u64,
            path: e.path_bytes().into_owned(),
            header: e.header().clone(),
            pax,
            link: e.link_name_bytes().map(|t| t.into_owned()),
        });
    }
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(bad_tar)?;
    Ok(out)
}

/// A reader that copies what it reads.
struct Tee<'a> {
    inner: &'a mut dyn Read,
    copy: &'a mut dyn Write,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Where each source's contents go (the first path as a file, the others as hard links to it),
/// and the hard links kept as links: (link, target).
type Plan = (BTreeMap<Source, Vec<Key>>, Vec<(Key, Key)>);

/// The tree the layers make.
#[derive(Default)]
pub(crate) struct Index {
    nodes: BTreeMap<Key, Node>,
    root: Option<Node>,
}

fn shown(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

/// Everything strictly below `key`.
fn below(nodes: &BTreeMap<Key, Node>, key: &[u8]) -> Vec<Key> {
    if key.is_empty() {
        return nodes.keys().cloned().collect();
    }
    let mut start = key.to_vec();
    start.push(b'/');
    let mut end = key.to_vec();
    end.push(b'/' + 1);
    nodes.range(start..end).map(|(k, _)| k.clone()).collect()
}

fn dir_header() -> Header {
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    h.set_mtime(0);
    h
}

impl Index {
    /// Applies one layer's entries, read by [`read_entries`], to the index.
    fn apply(&mut self, layer: usize, label: &str, entries: Vec<RawEntry>) -> Result<(), UnpackError> {
        let mut touched: HashSet<Key> = HashSet::new();
        for e in entries {
            self.entry(layer, label, e, &mut touched)?;
        }
        Ok(())
    }

    fn entry(&mut self, layer: usize, label: &str, e: RawEntry, touched: &mut HashSet<Key>) -> Result<(), UnpackError> {
        let RawEntry { ordinal, path: raw, mut header, pax, link } = e;
        let kind = header.entry_type();
        let escapes = || UnpackError::Escapes { layer: label.to_owned(), entry: shown(&raw) };
        if raw.starts_with(b"/") || raw.contains(&0) {
            return Err(escapes());
        }
        let mut comps: Vec<&[u8]> = Vec::new();
        for c in raw.split(|b| *b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => return Err(escapes()),
                c => comps.push(c),
            }
        }
        let Some((name, parents)) = comps.split_last() else {
            return if kind.is_dir() {
                self.root = Some(Node { kind: Kind::Dir, header, pax });
                Ok(())
            } else {
                Err(UnpackError::ReplacesRoot { layer: label.to_owned(), entry: shown(&raw) })
            };
        };
        if parents.iter().any(|c| c.starts_with(WHITEOUT)) {
            return Err(UnpackError::BadWhiteout { layer: label.to_owned(), entry: shown(&raw) });
        }
        if name.starts_with(b".wh..wh.") && *name != OPAQUE {
            return Ok(()); // other AUFS metadata
        }
        // A whiteout hides what is there (nothing to do where its directory is not); an entry
        // makes its directory.
        let whiteout = name.starts_with(WHITEOUT);
        let Some(parent) = self.resolve(label, &raw, parents, (!whiteout).then_some(&mut *touched))? else {
            return Ok(());
        };
        if *name == OPAQUE {
            for k in below(&self.nodes, &parent) {
                if !touched.contains(&k) {
                    self.nodes.remove(&k);
                }
            }
            return Ok(());
        }
        let join = |n: &[u8]| -> Key {
            if parent.is_empty() {
                n.to_vec()
            } else {
                [parent.as_slice(), b"/", n].concat()
            }
        };
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            if matches!(hidden, b"" | b"." | b"..") {
                return Err(UnpackError::BadWhiteout { layer: label.to_owned(), entry: shown(&raw) });
            }
            let key = join(hidden);
            let mut gone = below(&self.nodes, &key);
            gone.push(key);
            for k in gone.into_iter().filter(|k| !touched.contains(k)) {
                self.nodes.remove(&k);
            }
            return Ok(());
        }
        let key = join(name);
        let kind = match kind {
            EntryType::Directory => Kind::Dir,
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => Kind::File((layer, ordinal)),
            EntryType::Symlink => {
                let target = link.clone().unwrap_or_default();
                if target.is_empty() {
                    return Err(UnpackError::EmptySymlink { layer: label.to_owned(), entry: shown(&raw) });
                }
                // What a file system could not hold, unpacking cannot make either.
                if target.contains(&0) || target.len() >= crate::unpack::MAX_SYMLINK_TARGET {
                    return Err(UnpackError::BadSymlink { layer: label.to_owned(), entry: shown(&raw) });
                }
                Kind::Symlink(target)
            }
            EntryType::Link => {
                let target = link.clone().unwrap_or_default();
                let outside =
                    || UnpackError::LinkOutside { layer: label.to_owned(), entry: shown(&raw), target: shown(&target) };
                if target.starts_with(b"/") || target.split(|b| *b == b'/').any(|c| c == b"..") {
                    return Err(outside());
                }
                let tcomps: Vec<&[u8]> = target.split(|b| *b == b'/').filter(|c| !c.is_empty() && *c != b".").collect();
                let tkey = match tcomps.split_last() {
                    Some((tname, tparents)) => match self.resolve(label, &raw, tparents, None)? {
                        Some(d) if d.is_empty() => tname.to_vec(),
                        Some(d) => [d.as_slice(), b"/", tname].concat(),
                        None => Key::new(),
                    },
                    None => Key::new(),
                };
                match self.nodes.get(&tkey).map(|n| &n.kind) {
                    Some(Kind::File(s)) | Some(Kind::HardLink(_, s)) => Kind::HardLink(tkey, *s),
                    // A hard link to a symlink is that symlink again (as unpacking makes it, and
                    // umoci): written as a symlink of its own.
                    Some(Kind::Symlink(t)) => {
                        let t = t.clone();
                        header.set_entry_type(EntryType::Symlink);
                        header.set_size(0);
                        Kind::Symlink(t)
                    }
                    _ => {
                        return Err(UnpackError::LinkMissing {
                            layer: label.to_owned(),
                            entry: shown(&raw),
                            target: shown(&target),
                        })
                    }
                }
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => Kind::Special,
            other => {
                return Err(UnpackError::UnsupportedEntry {
                    layer: label.to_owned(),
                    entry: shown(&raw),
                    kind: other.as_byte() as char,
                })
            }
        };
        let replaces_dir_with_dir =
            matches!(kind, Kind::Dir) && matches!(self.nodes.get(&key).map(|n| &n.kind), Some(Kind::Dir));
        if !replaces_dir_with_dir {
            for k in below(&self.nodes, &key) {
                self.nodes.remove(&k);
            }
        }
        self.nodes.insert(key.clone(), Node { kind, header, pax });
        touched.insert(key);
        Ok(())
    }

    /// The directory `parents` name, resolved as unpacking resolves it (`unpack::layer`): a
    /// symlink on the way is followed inside the image (an absolute target from its root, `..`
    /// never above it, at most 40). With `touched` (an entry's own parents), directories
    /// missing are made and the way is marked as this layer's; without (a whiteout's, a hard
    /// link's target), `None` where there is no such directory.
    fn resolve(
        &mut self,
        label: &str,
        raw: &[u8],
        parents: &[&[u8]],
        touched: Option<&mut HashSet<Key>>,
    ) -> Result<Option<Key>, UnpackError> {
        let nodes = std::cell::RefCell::new(&mut self.nodes);
        let look = |w: &[Vec<u8>]| -> Result<Found, UnpackError> {
            Ok(match nodes.borrow().get(&w.join(&b'/')).map(|n| &n.kind) {
                None => Found::Missing,
                Some(Kind::Dir) => Found::Dir,
                Some(Kind::Symlink(target)) => Found::Symlink(target.clone()),
                Some(_) => Found::Other,
            })
        };
        let mut made = |w: &[Vec<u8>]| -> Result<(), UnpackError> {
            nodes.borrow_mut().insert(w.join(&b'/'), Node { kind: Kind::Dir, header: dir_header(), pax: Vec::new() });
            Ok(())
        };
        let creating = touched.is_some();
        let make: Make<'_, UnpackError> = if creating { Some(&mut made) } else { None };
        let walked = match resolve(parents, look, make) {
            Ok(Some(w)) => w,
            Ok(None) => return Ok(None),
            Err(Stop::Failed(e)) => return Err(e),
            Err(Stop::TooMany(at)) => {
                return Err(UnpackError::ThroughSymlink { layer: label.to_owned(), entry: shown(raw), symlink: at })
            }
            Err(Stop::NotADirectory(at)) => {
                return Err(UnpackError::NotADirectory { layer: label.to_owned(), entry: shown(raw), parent: at })
            }
        };
        // The way the entry is reached is this layer's (not directories a symlink led
        // through and left): as unpacking marks it.
        if let Some(t) = touched {
            for n in 1..=walked.len() {
                t.insert(walked[..n].join(&b'/'));
            }
        }
        Ok(Some(walked.join(&b'/')))
    }

    /// The paths each source's contents are written at: the first as a file, the others as
    /// hard links to it; and the hard links kept as links.
    fn plan(&self) -> Plan {
        let mut files: BTreeMap<Source, Vec<Key>> = BTreeMap::new();
        let mut links = Vec::new();
        for (k, n) in &self.nodes {
            match &n.kind {
                Kind::File(s) => files.entry(*s).or_default().insert(0, k.clone()),
                Kind::HardLink(target, s) => {
                    // Still a link to the same contents: kept. Otherwise (its target replaced or
                    // removed since), a file with the contents it was made with.
                    if matches!(self.nodes.get(target).map(|t| &t.kind), Some(Kind::File(ts)) if ts == s) {
                        links.push((k.clone(), target.clone()));
                    } else {
                        files.entry(*s).or_default().push(k.clone());
                    }
                }
                _ => {}
            }
        }
        (files, links)
    }
}

/// The PAX records of an entry worth keeping: all but those the writer makes itself (path,
/// link name, size).
fn keep_pax<R: Read>(e: &mut tar::Entry<'_, R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = e.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let key = ext.key().map_err(|_| io::Error::other("a PAX key is not UTF-8"))?;
            if !matches!(key, "path" | "linkpath" | "size") {
                out.push((key.to_owned(), ext.value_bytes().to_vec()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A PAX extended header's records (`LEN key=value\n`, LEN counting the whole record).
fn pax_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body = k.len() + v.len() + 3; // ' ', '=', '\n'
        let mut len = body + body.to_string().len();
        if len.to_string().len() != body.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

/// Writes one entry (with its PAX records first, if any).
fn write_entry<W: Write>(
    b: &mut tar::Builder<W>,
    node: &Node,
    path: &[u8],
    link: Option<&[u8]>,
    data: impl Read,
) -> io::Result<()> {
    if !node.pax.is_empty() {
        let records = pax_records(&node.pax);
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::XHeader);
        h.set_mode(0o644);
        h.set_size(records.len() as u64);
        h.set_mtime(0);
        let name = [b"PaxHeaders/", &path[path.len().saturating_sub(80)..]].concat();
        h.set_path(std::str::from_utf8(&name).unwrap_or("PaxHeaders/entry"))?;
        h.set_cksum();
        b.append(&h, &records[..])?;
    }
    use std::os::unix::ffi::OsStrExt;
    let mut h = node.header.clone();
    match link {
        Some(target) => crate::streamed::append_link_bytes(b, &mut h, path, target),
        None => b.append_data(&mut h, std::ffi::OsStr::from_bytes(path), data),
    }
}

fn dir_name(k: &[u8]) -> Vec<u8> {
    [k, b"/"].concat()
}

/// Writes the squashed layer to `out`. `layers` and `open` give each layer's descriptor and a
/// reader of its blob; `scratch` is a private directory for the layers' uncompressed tars,
/// which the first pass writes (layers read on all cores at once) and the second reads.
pub(crate) fn squash<W: Write>(
    layers: &[Descriptor],
    open: &mut dyn FnMut(usize) -> crate::Result<Box<dyn Read + Send>>,
    scratch: &Path,
    out: W,
    log: &mut dyn FnMut(&str),
) -> crate::Result<W> {
    let spool = |i: usize| scratch.join(format!("layer-{i}.tar"));
    let inputs: Vec<Mutex<Option<Box<dyn Read + Send>>>> =
        (0..layers.len()).map(|i| open(i).map(|r| Mutex::new(Some(r)))).collect::<crate::Result<_>>()?;
    log(&format!("reading {} layers", layers.len()));
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(layers.len()).max(1);
    let next = AtomicUsize::new(0);
    type Read1 = crate::Result<Vec<RawEntry>>;
    let results: Vec<Mutex<Option<Read1>>> = (0..layers.len()).map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(l) = layers.get(i) else { break };
                let input = inputs[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                let r = (|| -> Read1 {
                    let input = input.ok_or_else(|| crate::ImageError::BadBuild("a layer was read twice".into()))?;
                    let path = spool(i);
                    let file = std::fs::File::create(&path)
                        .map_err(|source| crate::ImageError::Io { path: path.display().to_string(), source })?;
                    let mut w = io::BufWriter::with_capacity(1 << 20, file);
                    let label = l.digest.to_string();
                    let entries = read_layer(l, input, |tar| read_entries(&label, tar, &mut w))?;
                    w.flush().map_err(|source| crate::ImageError::Io { path: path.display().to_string(), source })?;
                    Ok(entries)
                })();
                let failed = r.is_err();
                *results[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r);
                if failed {
                    next.store(layers.len(), Ordering::Relaxed);
                    break;
                }
            });
        }
    });
    let mut index = Index::default();
    for (i, (l, r)) in layers.iter().zip(results).enumerate() {
        let entries = r
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .unwrap_or_else(|| Err(crate::ImageError::BadBuild("a layer was not read".into())))?;
        index.apply(i, &l.digest.to_string(), entries)?;
    }
    let io_err = |source: io::Error| crate::ImageError::Io { path: "the squashed layer".into(), source };
    let mut b = tar::Builder::new(out);
    if let Some(root) = &index.root {
        write_entry(&mut b, root, b"./", None, io::empty()).map_err(io_err)?;
    }
    for (k, n) in index.nodes.iter().filter(|(_, n)| matches!(n.kind, Kind::Dir)) {
        let mut n = n.clone();
        n.header.set_size(0);
        write_entry(&mut b, &n, &dir_name(k), None, io::empty()).map_err(io_err)?;
    }
    for (k, n) in &index.nodes {
        match &n.kind {
            Kind::Symlink(t) => write_entry(&mut b, n, k, Some(t), io::empty()).map_err(io_err)?,
            Kind::Special => {
                let mut n = n.clone();
                n.header.set_size(0);
                write_entry(&mut b, &n, k, None, io::empty()).map_err(io_err)?
            }
            _ => {}
        }
    }
    let (files, links) = index.plan();
    let wanted_layers: BTreeSet<usize> = files.keys().map(|(l, _)| *l).collect();
    for (i, l) in layers.iter().enumerate() {
        if !wanted_layers.contains(&i) {
            continue;
        }
        log(&format!("copying files of layer {}/{}", i + 1, layers.len()));
        let label = l.digest.to_string();
        let path = spool(i);
        let tar = std::fs::File::open(&path)
            .map_err(|source| crate::ImageError::Io { path: path.display().to_string(), source })?;
        (|| -> Result<(), UnpackError> {
            let bad_tar = |source| UnpackError::BadTar { layer: label.clone(), source };
            let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 20, tar));
            for (ordinal, entry) in archive.entries().map_err(bad_tar)?.enumerate() {
                let entry = entry.map_err(bad_tar)?;
                let Some(paths) = files.get(&(i, ordinal as u64)) else { continue };
                let first = &paths[0];
                // The first path holds the contents (it may be a hard link whose target is gone).
                let mut node = index.nodes[first].clone();
                node.header.set_entry_type(EntryType::Regular);
                node.header.as_old_mut().linkname.fill(0);
                node.header.set_size(entry.header().size().map_err(bad_tar)?);
                write_entry(&mut b, &node, first, None, entry).map_err(bad_tar)?;
                for other in &paths[1..] {
                    let mut link = index.nodes[other].clone();
                    link.header.set_entry_type(EntryType::Link);
                    write_entry(&mut b, &link, other, Some(first), io::empty()).map_err(bad_tar)?;
                }
            }
            Ok(())
        })()?;
    }
    for (k, target) in &links {
        write_entry(&mut b, &index.nodes[k], k, Some(target), io::empty()).map_err(io_err)?;
    }
    b.into_inner().map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_oci::Digest;

    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn tar_of(entries: &[(&str, EntryType, &[u8], u32)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, mode) in entries {
            let mut h = Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            h.set_mtime(7);
            h.set_uid(1000);
            h.set_gid(100);
            match kind {
                EntryType::Symlink | EntryType::Link => {
                    h.set_size(0);
                    b.append_link(&mut h, path, std::str::from_utf8(data).unwrap()).unwrap();
                }
                _ => {
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, *data).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn desc(bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: Digest::sha256_of(bytes),
            size: bytes.len() as u64,
            platform: None,
            annotations: Default::default(),
        }
    }

    /// The squash of `layers`: (path, type, contents or link target, mode, uid).
    fn squashed(layers: &[Vec<u8>]) -> Vec<(String, char, Vec<u8>, u32, u64)> {
        let descs: Vec<Descriptor> = layers.iter().map(|l| desc(l)).collect();
        let layers2 = layers.to_vec();
        let out = squash(
            &descs,
            &mut |i| Ok(Box::new(std::io::Cursor::new(layers2[i].clone()))),
            scratch().path(),
            Vec::new(),
            &mut |_| {},
        )
        .unwrap();
        let mut a = tar::Archive::new(&out[..]);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let h = e.header().clone();
                let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
                let mut data = Vec::new();
                if let Some(l) = e.link_name_bytes() {
                    data = l.into_owned();
                } else {
                    e.read_to_end(&mut data).unwrap();
                }
                (path, h.entry_type().as_byte() as char, data, h.mode().unwrap(), h.uid().unwrap())
            })
            .collect()
    }

    fn names(s: &[(String, char, Vec<u8>, u32, u64)]) -> Vec<&str> {
        s.iter().map(|e| e.0.as_str()).collect()
    }

    #[test]
    fn whiteouts_and_opaque_directories_hide_what_lower_layers_put_there() {
        use EntryType::*;
        let l1 = tar_of(&[
            ("etc/", Directory, b"", 0o755),
            ("etc/keep", Regular, b"keep\n", 0o644),
            ("etc/gone", Regular, b"gone\n", 0o644),
            ("var/", Directory, b"", 0o755),
            ("var/old/", Directory, b"", 0o700),
            ("var/old/a", Regular, b"a\n", 0o600),
            ("var/lib/", Directory, b"", 0o755),
            ("var/lib/x", Regular, b"x\n", 0o644),
        ]);
        let l2 = tar_of(&[
            ("etc/.wh.gone", Regular, b"", 0o644),
            ("var/lib/.wh..wh..opq", Regular, b"", 0o644),
            ("var/lib/y", Regular, b"y\n", 0o644),
            ("var/.wh.old", Regular, b"", 0o644),
            ("etc/keep", Regular, b"kept, changed\n", 0o640),
        ]);
        let s = squashed(&[l1, l2]);
        // Directories first, sorted; then files in the order their contents come.
        assert_eq!(names(&s), ["etc/", "var/", "var/lib/", "var/lib/y", "etc/keep"]);
        assert_eq!(s[4].2, b"kept, changed\n");
        assert_eq!((s[4].3, s[4].4), (0o640, 1000), "the entry's own mode and owner");
    }

    #[test]
    fn a_layer_s_own_entries_survive_its_whiteouts_and_replacements_drop_subtrees() {
        use EntryType::*;
        let l1 =
            tar_of(&[("d/", Directory, b"", 0o755), ("d/f", Regular, b"1", 0o644), ("s", Regular, b"file", 0o644)]);
        // `d` becomes a file (its subtree goes); `s` a symlink; a file written and whited out
        // in the same layer stays, as its whiteout only applies below.
        let l2 = tar_of(&[
            ("d", Regular, b"now a file", 0o644),
            ("s", Symlink, b"d", 0o777),
            ("n", Regular, b"new", 0o644),
            (".wh.n", Regular, b"", 0o644),
        ]);
        let s = squashed(&[l1, l2]);
        assert_eq!(names(&s), ["s", "d", "n"]);
        assert_eq!((s[0].1, s[0].2.as_slice()), ('2', &b"d"[..]));
    }

    #[test]
    fn hard_links_are_kept_or_become_files_when_their_target_changed() {
        use EntryType::*;
        let l1 = tar_of(&[
            ("a", Regular, b"shared", 0o644),
            ("b", Link, b"a", 0o644),
            ("c", Regular, b"other", 0o644),
            ("d", Link, b"c", 0o644),
        ]);
        // `c` is replaced: `d` keeps the contents it linked to.
        let l2 = tar_of(&[("c", Regular, b"replaced", 0o644)]);
        let s = squashed(&[l1, l2]);
        let by: BTreeMap<&str, (char, &[u8])> = s.iter().map(|e| (e.0.as_str(), (e.1, e.2.as_slice()))).collect();
        assert_eq!(by["a"], ('0', &b"shared"[..]));
        assert_eq!(by["b"], ('1', &b"a"[..]));
        assert_eq!(by["c"], ('0', &b"replaced"[..]));
        assert_eq!(by["d"], ('0', &b"other"[..]));
        // A hard link to a symlink is that symlink again, as unpacking (and umoci) make it.
        let s = squashed(&[tar_of(&[("s", Symlink, b"target", 0o777), ("hs", Link, b"s", 0o777)])]);
        let by: BTreeMap<&str, (char, &[u8])> = s.iter().map(|e| (e.0.as_str(), (e.1, e.2.as_slice()))).collect();
        assert_eq!(by["hs"], ('2', &b"target"[..]));
        assert_eq!(by["s"], ('2', &b"target"[..]));
    }

    #[test]
    fn the_same_layers_squash_to_the_same_bytes_and_pax_records_are_kept() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(1);
        let xattr = pax_records(&[("SCHILY.xattr.user.k".to_owned(), b"v".to_vec())]);
        let mut x = Header::new_ustar();
        x.set_entry_type(EntryType::XHeader);
        x.set_size(xattr.len() as u64);
        x.set_path("PaxHeaders/f").unwrap();
        x.set_cksum();
        b.append(&x, &xattr[..]).unwrap();
        b.append_data(&mut h, "f", &b"1"[..]).unwrap();
        let layer = b.into_inner().unwrap();
        let run = || {
            let d = [desc(&layer)];
            let l = layer.clone();
            squash(
                &d,
                &mut |_| Ok(Box::new(std::io::Cursor::new(l.clone()))),
                scratch().path(),
                Vec::new(),
                &mut |_| {},
            )
            .unwrap()
        };
        let (one, two) = (run(), run());
        assert_eq!(one, two);
        let mut a = tar::Archive::new(&one[..]);
        let mut e = a.entries().unwrap().next().unwrap().unwrap();
        let kept: Vec<(String, Vec<u8>)> = e
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|x| {
                let x = x.unwrap();
                (x.key().unwrap().to_owned(), x.value_bytes().to_vec())
            })
            .collect();
        assert_eq!(kept, [("SCHILY.xattr.user.k".to_owned(), b"v".to_vec())]);
    }

    #[test]
    fn pax_record_lengths_count_themselves() {
        for v in [0usize, 1, 5, 90, 95, 96, 1000] {
            let r = pax_records(&[("k".to_owned(), vec![b'x'; v])]);
            let len: usize =
                std::str::from_utf8(&r[..r.iter().position(|b| *b == b' ').unwrap()]).unwrap().parse().unwrap();
            assert_eq!(len, r.len(), "value of {v} bytes");
        }
    }

    /// The names of the entries of the layer `layers` squash to, sorted.
    fn squashed_names(layers: &[Vec<u8>]) -> Vec<String> {
        let descs: Vec<_> = layers.iter().map(|l| desc(l)).collect();
        let out = squash(
            &descs,
            &mut |i| Ok(Box::new(std::io::Cursor::new(layers[i].clone()))),
            scratch().path(),
            Vec::new(),
            &mut |_| {},
        )
        .unwrap();
        let mut names: Vec<String> = tar::Archive::new(&out[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn entries_through_symlinks_land_inside_the_root_and_outside_names_are_refused() {
        use EntryType::*;
        let l1 = tar_of(&[
            ("usr/lib/", Directory, b"", 0o755),
            ("lib", Symlink, b"usr/lib", 0o777),
            ("link", Symlink, b"/etc", 0o777),
        ]);
        let l2 = tar_of(&[
            ("link/passwd", Regular, b"x", 0o644),
            ("lib/a", Regular, b"a", 0o644),
            ("lib/.wh.gone", Regular, b"", 0),
        ]);
        let l0 = tar_of(&[("usr/lib/gone", Regular, b"g", 0o644)]);
        let names = squashed_names(&[l0, l1, l2]);
        assert_eq!(names, ["etc/", "etc/passwd", "lib", "link", "usr/", "usr/lib/", "usr/lib/a"], "{names:?}");
        // A directory a symlink led through and left is not the layer's: its whiteout takes it
        // (as unpacking does).
        let l0 =
            tar_of(&[("a/old", Regular, b"o", 0o644), ("a/s", Symlink, b"/y", 0o777), ("y/", Directory, b"", 0o755)]);
        let l1 = tar_of(&[("a/s/f", Regular, b"f", 0o644), (".wh.a", Regular, b"", 0o644)]);
        let names = squashed_names(&[l0, l1]);
        assert_eq!(names, ["y/", "y/f"], "{names:?}");
        // A target no file system holds, and a whiteout of nothing, are refused as unpacking
        // refuses them.
        for (bad, says) in [
            (tar_of(&[("s", Symlink, &[b'x'; 4096][..], 0o777)]), "no file system holds"),
            (tar_of(&[(".wh.", Regular, b"", 0o644)]), "not a valid whiteout"),
            // And a hard link out of the root.
            (tar_of(&[("a", Link, b"../../etc/shadow", 0o644)]), "outside"),
        ] {
            let d = [desc(&bad)];
            let e = squash(
                &d,
                &mut |_| Ok(Box::new(std::io::Cursor::new(bad.clone()))),
                scratch().path(),
                Vec::new(),
                &mut |_| {},
            )
            .unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
    }
}
