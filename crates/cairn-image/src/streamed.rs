//! Streamed layers: layers described in the store and made from store paths when read.
//!
//! A layer of an image built from a closure is a function of the store paths it holds and of
//! the tar options, so storing its bytes would store the closure twice. Instead the build
//! hashes the layer once as it produces it and keeps a [`LayerRecipe`] — the paths, the tar
//! format, the compression, the digest, size and diff id — as a small text path named
//! `oci-layer-<alg>-<hex>` that refers to the paths. The layout links the layer's blob entry to
//! that path, so an image keeps its layers' paths alive and a collector sees one graph.
//!
//! Whoever reads the layer (a push, the registry endpoint, an export, an unpack) gets a
//! [`LayerReader`]: a thread writes the tar again into a bounded channel while it hashes what
//! it writes, and the reader's last read fails unless the bytes had the recorded digest and
//! size, so a store path changed behind the store's back cannot pass for the layer.
//!
//! The tar is reproducible: the store directory's components, then every path's tree, entries in
//! byte order, mtime 1, owner and group 0 without names, directories 0555, files 0444 or 0555 (the
//! store's own modes), long names as GNU long-name entries. gzip (level 6) and zstd (level 3)
//! are deterministic for a given input, so compressed layers are reproducible too.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use cairn_nix::hash::HashingWriter;
use cairn_nix::{HashAlgo, StorePath};
use cairn_oci::Digest;
use cairn_store::LocalStore;

use crate::{ImageError, Result};

/// Changes whenever the bytes a layer is made of change, so older descriptions and memos are
/// not taken for the new format.
pub const FORMAT: &str = "cairn-layered-image-v1";
/// The media type of uncompressed layers.
pub const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// The size of the chunks a reader hands over, and of the reads of files.
const CHUNK: usize = 1 << 20;

/// How store layers are compressed. Both compressors are deterministic at a fixed level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerCompression {
    #[default]
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    pub fn parse(s: &str) -> Result<LayerCompression> {
        match s {
            "none" => Ok(LayerCompression::None),
            "gzip" => Ok(LayerCompression::Gzip),
            "zstd" => Ok(LayerCompression::Zstd),
            other => Err(ImageError::BadBuild(format!("unknown layer compression '{other}' (none, gzip or zstd)"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LayerCompression::None => "none",
            LayerCompression::Gzip => "gzip",
            LayerCompression::Zstd => "zstd",
        }
    }

    pub fn media_type(self) -> &'static str {
        match self {
            LayerCompression::None => LAYER,
            LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// What a streamed layer's text path holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LayerRecipe {
    pub format: String,
    /// The store directory the tar's names start with.
    pub store_dir: String,
    /// The base names of the paths in the layer, sorted (each is also a reference).
    pub paths: Vec<String>,
    pub compression: String,
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    /// The digest of the uncompressed tar.
    pub diff_id: String,
    /// Where the one path's own tree is placed in the image (a `--copy` layer); absent, the
    /// paths are placed at their store paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
}

impl LayerRecipe {
    /// Parses a description read from the store, refusing one this cairn cannot make.
    pub fn parse(bytes: &[u8], shown: &str) -> Result<LayerRecipe> {
        let bad = |why: String| ImageError::BadLayer(format!("{shown}: {why}"));
        let r: LayerRecipe = serde_json::from_slice(bytes).map_err(|e| bad(format!("not a layer description: {e}")))?;
        if r.format != FORMAT {
            return Err(bad(format!("made by tar format '{}', this cairn makes '{FORMAT}'", r.format)));
        }
        LayerCompression::parse(&r.compression).map_err(|_| bad(format!("unknown compression '{}'", r.compression)))?;
        Digest::parse(&r.digest).map_err(|e| bad(e.to_string()))?;
        Digest::parse(&r.diff_id).map_err(|e| bad(e.to_string()))?;
        Ok(r)
    }

    pub fn digest(&self) -> Digest {
        Digest::parse(&self.digest).expect("checked when parsed or made")
    }

    pub fn diff_id(&self) -> Digest {
        Digest::parse(&self.diff_id).expect("checked when parsed or made")
    }

    fn compression(&self) -> LayerCompression {
        LayerCompression::parse(&self.compression).expect("checked when parsed or made")
    }

    /// The layer's paths in `store`, each checked to be valid.
    pub fn store_paths(&self, store: &LocalStore) -> Result<Vec<StorePath>> {
        let dir = store.store_dir();
        if dir.as_str() != self.store_dir {
            return Err(ImageError::BadLayer(format!(
                "layer {} was described for store directory {}, not {}",
                self.digest,
                self.store_dir,
                dir.as_str()
            )));
        }
        let mut out = Vec::with_capacity(self.paths.len());
        for name in &self.paths {
            let p = dir
                .parse(&format!("{}/{name}", dir.as_str()))
                .map_err(|e| ImageError::BadLayer(format!("layer {}: path '{name}': {e}", self.digest)))?;
            if !store.is_valid(&p)? {
                return Err(ImageError::BadLayer(format!(
                    "layer {} holds {}, which is not valid",
                    self.digest,
                    dir.display(&p)
                )));
            }
            out.push(p);
        }
        Ok(out)
    }
}

/// A reproducible tar entry header (the customisation layer's too).
pub(crate) fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Appends a symlink or hard link entry whose target is kept byte for byte: the tar crate's
/// `append_link` reads the target as a path and drops what components drop (`//`, `./`), so a
/// symlink to `//x` would come out pointing at `/x`. A target longer than the header's field
/// goes first as a GNU long-link entry, as GNU tar writes it.
pub(crate) fn append_link_bytes<W: Write>(
    b: &mut tar::Builder<W>,
    header: &mut tar::Header,
    path: &[u8],
    target: &[u8],
) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    const FIELD: usize = 100;
    if target.len() > FIELD {
        let mut long = tar::Header::new_gnu();
        long.set_entry_type(tar::EntryType::GNULongLink);
        long.set_mode(0o644);
        long.set_size(target.len() as u64 + 1);
        long.as_gnu_mut().ok_or_else(|| io::Error::other("a GNU header"))?.name[..13].copy_from_slice(b"././@LongLink");
        long.set_cksum();
        b.append(&long, &[target, b"\0"].concat()[..])?;
    }
    header.set_link_name_literal(&target[..target.len().min(FIELD)])?;
    header.set_size(0);
    b.append_data(header, std::ffi::OsStr::from_bytes(path), io::empty())
}

/// Writes the reproducible tar of `paths` (and of the store directory's components).
pub fn write_tar(store: &LocalStore, paths: &[StorePath], out: impl Write) -> Result<()> {
    let io_err = |path: &Path, source: io::Error| ImageError::Io { path: path.display().to_string(), source };
    let mut b = tar::Builder::new(out);
    let dir = store.store_dir().as_str().trim_start_matches('/').to_owned();
    let mut prefix = String::new();
    for comp in dir.split('/').filter(|c| !c.is_empty()) {
        prefix.push_str(comp);
        prefix.push('/');
        let mut h = tar_header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, &prefix, io::empty()).map_err(|e| io_err(Path::new(&prefix), e))?;
    }
    let mut sorted: Vec<&StorePath> = paths.iter().collect();
    sorted.sort_by_key(|p| p.base_name());
    let mut buf = vec![0u8; CHUNK];
    for p in sorted {
        let name = format!("{dir}/{}", p.base_name()).into_bytes();
        walk(&mut b, &store.real_path(p), name, &mut buf)?;
    }
    b.into_inner().and_then(|mut w| w.flush()).map_err(|e| io_err(Path::new("layer"), e))?;
    Ok(())
}

/// Writes the reproducible tar of one store path's tree placed at `dest` (an absolute path
/// inside the image, checked by the caller), with `dest`'s parents as directories (0755): the
/// layer of `image build --copy`.
pub fn write_tree_at(store: &LocalStore, path: &StorePath, dest: &str, out: impl Write) -> Result<()> {
    let io_err = |path: &Path, source: io::Error| ImageError::Io { path: path.display().to_string(), source };
    let mut b = tar::Builder::new(out);
    let comps: Vec<&str> = dest.split('/').filter(|c| !c.is_empty()).collect();
    let mut prefix = String::new();
    for comp in &comps[..comps.len().saturating_sub(1)] {
        prefix.push_str(comp);
        prefix.push('/');
        let mut h = tar_header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, &prefix, io::empty()).map_err(|e| io_err(Path::new(&prefix), e))?;
    }
    let mut buf = vec![0u8; CHUNK];
    walk(&mut b, &store.real_path(path), comps.join("/").into_bytes(), &mut buf)?;
    b.into_inner().and_then(|mut w| w.flush()).map_err(|e| io_err(Path::new("layer"), e))?;
    Ok(())
}

/// Appends `real` under `name` (bytes: file names need not be UTF-8), directories' entries in
/// byte order.
fn walk<W: Write>(b: &mut tar::Builder<W>, real: &Path, mut name: Vec<u8>, buf: &mut [u8]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let io_err = |source: io::Error| ImageError::Io { path: real.display().to_string(), source };
    let m = fs::symlink_metadata(real).map_err(io_err)?;
    let ft = m.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(real).map_err(io_err)?;
        let mut h = tar_header(tar::EntryType::Symlink, 0o777, 0);
        append_link_bytes(b, &mut h, &name, target.as_os_str().as_bytes()).map_err(io_err)?;
    } else if ft.is_dir() {
        let mut h = tar_header(tar::EntryType::Directory, 0o555, 0);
        name.push(b'/');
        b.append_data(&mut h, std::ffi::OsStr::from_bytes(&name), io::empty()).map_err(io_err)?;
        let mut entries: Vec<_> =
            fs::read_dir(real).map_err(io_err)?.collect::<io::Result<Vec<_>>>().map_err(io_err)?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let mut child = name.clone();
            child.extend_from_slice(e.file_name().as_bytes());
            walk(b, &e.path(), child, buf)?;
        }
    } else {
        use std::os::unix::fs::PermissionsExt;
        let mode = if m.permissions().mode() & 0o111 != 0 { 0o555 } else { 0o444 };
        let size = m.len();
        let mut h = tar_header(tar::EntryType::Regular, mode, size);
        // The header (and any long-name entry) by the tar crate; the contents in large reads
        // straight into the writer, then the padding to the next 512-byte block.
        b.append_data(&mut h, std::ffi::OsStr::from_bytes(&name), io::empty()).map_err(io_err)?;
        let mut f = fs::File::open(real).map_err(io_err)?;
        let out = b.get_mut();
        let mut left = size;
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = f.read(&mut buf[..want]).map_err(io_err)?;
            if n == 0 {
                return Err(io_err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while read")));
            }
            out.write_all(&buf[..n]).map_err(io_err)?;
            left -= n as u64;
        }
        let pad = (512 - size % 512) % 512;
        out.write_all(&[0u8; 512][..pad as usize]).map_err(io_err)?;
    }
    Ok(())
}

/// Hashes (SHA-256) and counts what passes through to `inner`.
fn counting<W: Write>(inner: W) -> HashingWriter<W> {
    HashingWriter::new(inner, HashAlgo::Sha256)
}

/// The writer, digest and size of a [`counting`] writer.
fn counted<W>(c: HashingWriter<W>) -> (W, Digest, u64) {
    let (h, size, w) = c.finish();
    (w, Digest::from_hash(&h).expect("sha256"), size)
}

/// Writes the layer of `paths` compressed as asked into `out`; returns the writer, the diff
/// id, and the digest and size of what `out` received.
fn encode<W: Write>(
    store: &LocalStore,
    paths: &[StorePath],
    dest: Option<&str>,
    compression: LayerCompression,
    out: W,
) -> Result<(W, Digest, Digest, u64)> {
    let io_err = |source: io::Error| ImageError::Io { path: "a layer".into(), source };
    let write_tar = |store: &LocalStore, paths: &[StorePath], w: &mut dyn Write| match (dest, paths) {
        (None, _) => write_tar(store, paths, w),
        (Some(d), [p]) => write_tree_at(store, p, d, w),
        (Some(d), _) => Err(ImageError::BadLayer(format!("a layer placed at {d} holds one path"))),
    };
    // Uncompressed, the digest is the diff id: one hash, not two.
    if compression == LayerCompression::None {
        let mut c = counting(out);
        write_tar(store, paths, &mut c)?;
        let (w, d, size) = counted(c);
        return Ok((w, d.clone(), d, size));
    }
    let outer = counting(out);
    let (outer, diff_id) = match compression {
        LayerCompression::None => unreachable!("handled above"),
        LayerCompression::Gzip => {
            let mut c = counting(flate2::write::GzEncoder::new(outer, flate2::Compression::new(6)));
            write_tar(store, paths, &mut c)?;
            let (e, d, _) = counted(c);
            (e.finish().map_err(io_err)?, d)
        }
        LayerCompression::Zstd => {
            let e = zstd::stream::write::Encoder::new(outer, 3).map_err(io_err)?;
            let mut c = counting(e);
            write_tar(store, paths, &mut c)?;
            let (e, d, _) = counted(c);
            (e.finish().map_err(io_err)?, d)
        }
    };
    let (w, digest, size) = counted(outer);
    Ok((w, diff_id, digest, size))
}

/// Describes the layer of `paths`: produces it once, hashing it, writing nothing.
pub fn describe(store: &LocalStore, paths: &[StorePath], compression: LayerCompression) -> Result<LayerRecipe> {
    describe_placed(store, paths, None, compression)
}

/// Describes the layer of one path's own tree placed at `dest` in the image (`--copy`).
pub fn describe_at(
    store: &LocalStore,
    path: &StorePath,
    dest: &str,
    compression: LayerCompression,
) -> Result<LayerRecipe> {
    describe_placed(store, std::slice::from_ref(path), Some(dest), compression)
}

fn describe_placed(
    store: &LocalStore,
    paths: &[StorePath],
    dest: Option<&str>,
    compression: LayerCompression,
) -> Result<LayerRecipe> {
    let (_, diff_id, digest, size) = encode(store, paths, dest, compression, io::sink())?;
    let mut names: Vec<String> = paths.iter().map(|p| p.base_name()).collect();
    names.sort();
    names.dedup();
    Ok(LayerRecipe {
        format: FORMAT.to_owned(),
        store_dir: store.store_dir().as_str().to_owned(),
        paths: names,
        compression: compression.name().to_owned(),
        media_type: compression.media_type().to_owned(),
        digest: digest.to_string(),
        size,
        diff_id: diff_id.to_string(),
        dest: dest.map(str::to_owned),
    })
}

/// Sends what is written as chunks over a bounded channel.
struct ChannelWriter {
    buf: Vec<u8>,
    tx: mpsc::SyncSender<io::Result<Vec<u8>>>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.send(Ok(chunk)).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A streamed layer's bytes, made on a thread as they are read. The last read fails (and so no
/// consumer finishes) unless they had the recorded digest and size.
pub struct LayerReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    at: usize,
    done: bool,
}

impl LayerReader {
    /// Starts making the layer `recipe` describes; its paths stay rooted until it is made.
    pub fn open(store: Arc<LocalStore>, recipe: &LayerRecipe) -> Result<LayerReader> {
        let paths = recipe.store_paths(&store)?;
        let dest = recipe.dest.clone();
        let root = store.temp_root(paths.clone());
        let compression = recipe.compression();
        let (want_digest, want_size) = (recipe.digest(), recipe.size);
        let (tx, rx) = mpsc::sync_channel(4);
        std::thread::Builder::new()
            .name("cairn-layer".into())
            .spawn(move || {
                let _root = root;
                let w = ChannelWriter { buf: Vec::with_capacity(CHUNK), tx: tx.clone() };
                let end = match encode(&store, &paths, dest.as_deref(), compression, w) {
                    Ok((mut w, _, digest, size)) => match w.send() {
                        Err(_) => return,
                        Ok(()) if digest == want_digest && size == want_size => return,
                        Ok(()) => io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "layer {want_digest} made again is {digest} ({size} bytes): its store paths changed"
                            ),
                        ),
                    },
                    Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::BrokenPipe => return,
                    Err(e) => io::Error::other(e.to_string()),
                };
                let _ = tx.send(Err(end));
            })
            .map_err(|source| ImageError::Io { path: "a layer thread".into(), source })?;
        Ok(LayerReader { rx, chunk: Vec::new(), at: 0, done: false })
    }
}

impl LayerReader {
    /// The layer's bytes as the chunks they are made in, without copying them again (a push
    /// sends them as they come). The last item is the error, if the layer is refused.
    pub fn into_chunks(mut self) -> impl Iterator<Item = io::Result<Vec<u8>>> + Send {
        let first = (self.at < self.chunk.len()).then(|| Ok(self.chunk.split_off(self.at)));
        let rest = std::iter::from_fn(move || {
            if self.done {
                return None;
            }
            match self.rx.recv() {
                Ok(Ok(c)) => Some(Ok(c)),
                Ok(Err(e)) => {
                    self.done = true;
                    Some(Err(e))
                }
                Err(_) => {
                    self.done = true;
                    None
                }
            }
        });
        first.into_iter().chain(rest)
    }
}

impl Read for LayerReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(c)) => {
                    self.chunk = c;
                    self.at = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_nix::strategies::{tree, Tree};
    use cairn_nix::StoreDir;
    use cairn_store::StoreLayout;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn store() -> (tempfile::TempDir, Arc<LocalStore>) {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(StoreLayout::under_root(dir.path(), StoreDir::new("/store").unwrap())).unwrap();
        (dir, Arc::new(s))
    }

    /// What a tar holds: name bytes → (entry type, mode, contents or link target).
    fn entries(tar_bytes: &[u8]) -> Vec<(Vec<u8>, tar::EntryType, u32, Vec<u8>)> {
        let mut a = tar::Archive::new(tar_bytes);
        let mut out = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let h = e.header().clone();
            assert_eq!((h.mtime().unwrap(), h.uid().unwrap(), h.gid().unwrap()), (1, 0, 0));
            assert_eq!(h.username_bytes().unwrap_or_default(), b"");
            let name = e.path_bytes().into_owned();
            let body = match h.entry_type() {
                tar::EntryType::Symlink => e.link_name_bytes().unwrap().into_owned(),
                _ => {
                    let mut v = Vec::new();
                    e.read_to_end(&mut v).unwrap();
                    v
                }
            };
            out.push((name, h.entry_type(), h.mode().unwrap(), body));
        }
        out
    }

    /// The entries a tree should give under `prefix`, in byte order.
    fn expected(t: &Tree, prefix: Vec<u8>, out: &mut Vec<(Vec<u8>, tar::EntryType, u32, Vec<u8>)>) {
        match t {
            Tree::File { executable, contents } => {
                out.push((prefix, tar::EntryType::Regular, if *executable { 0o555 } else { 0o444 }, contents.clone()))
            }
            Tree::Symlink { target } => out.push((prefix, tar::EntryType::Symlink, 0o777, target.clone())),
            Tree::Directory(entries) => {
                let mut dir = prefix.clone();
                dir.push(b'/');
                out.push((dir.clone(), tar::EntryType::Directory, 0o555, Vec::new()));
                let sorted: BTreeMap<&Vec<u8>, &Tree> = entries.iter().collect();
                for (name, child) in sorted {
                    let mut p = prefix.clone();
                    p.push(b'/');
                    p.extend_from_slice(name);
                    expected(child, p, out);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Any store tree becomes the tar of its entries (names byte for byte, store modes,
        /// sorted), and a reader makes the very bytes the description's digest and size name,
        /// compressed or not.
        #[test]
        fn layers_hold_their_trees_and_read_back_as_described(t in tree()) {
            let (_dir, s) = store();
            let info = s.add_nar("x", &t.to_nar()[..]).unwrap();
            let mut tar_bytes = Vec::new();
            write_tar(&s, std::slice::from_ref(&info.path), &mut tar_bytes).unwrap();
            let mut want = vec![(b"store/".to_vec(), tar::EntryType::Directory, 0o755, Vec::new())];
            expected(&t, format!("store/{}", info.path.base_name()).into_bytes(), &mut want);
            prop_assert_eq!(entries(&tar_bytes), want);
            for c in [LayerCompression::None, LayerCompression::Gzip, LayerCompression::Zstd] {
                let r = describe(&s, std::slice::from_ref(&info.path), c).unwrap();
                prop_assert_eq!(r.diff_id(), Digest::sha256_of(&tar_bytes));
                let mut made = Vec::new();
                LayerReader::open(s.clone(), &r).unwrap().read_to_end(&mut made).unwrap();
                prop_assert_eq!((Digest::sha256_of(&made), made.len() as u64), (r.digest(), r.size));
                if c == LayerCompression::None {
                    prop_assert_eq!(&made, &tar_bytes);
                }
            }
        }
    }

    #[test]
    fn large_files_and_long_names_stream_in_chunks() {
        let (_dir, s) = store();
        let long = "n".repeat(180);
        let big: Vec<u8> = (0..(3 * CHUNK + 777) as u32).map(|i| (i % 251) as u8).collect();
        let t = Tree::Directory(
            [
                (long.clone().into_bytes(), Tree::File { executable: true, contents: big.clone() }),
                (b"link".to_vec(), Tree::Symlink { target: long.clone().into_bytes() }),
            ]
            .into(),
        );
        let info = s.add_nar("big", &t.to_nar()[..]).unwrap();
        let r = describe(&s, std::slice::from_ref(&info.path), LayerCompression::None).unwrap();
        let mut made = Vec::new();
        LayerReader::open(s.clone(), &r).unwrap().read_to_end(&mut made).unwrap();
        let e = entries(&made);
        let base = format!("store/{}", info.path.base_name());
        // Byte order: `link` before the long name.
        assert_eq!(e[2].0, format!("{base}/link").into_bytes());
        assert_eq!(e[2].3, long.as_bytes());
        assert_eq!(e[3].0, format!("{base}/{long}").into_bytes());
        assert_eq!(e[3].3, big);
        // As chunks, after a partial read, the same bytes.
        let mut reader = LayerReader::open(s.clone(), &r).unwrap();
        let mut head = vec![0u8; 1000];
        reader.read_exact(&mut head).unwrap();
        for c in reader.into_chunks() {
            head.extend(c.unwrap());
        }
        assert_eq!(head, made);
        // A reader dropped early stops the thread making it (no hang, no panic).
        let mut partial = LayerReader::open(s.clone(), &r).unwrap();
        let mut some = [0u8; 10];
        partial.read_exact(&mut some).unwrap();
        drop(partial);
    }

    #[test]
    fn a_changed_path_fails_the_last_read() {
        let (_dir, s) = store();
        let info = s.add_text("t", b"original", &Default::default()).unwrap();
        let r = describe(&s, std::slice::from_ref(&info.path), LayerCompression::None).unwrap();
        let real = s.real_path(&info.path);
        let mut perms = fs::metadata(&real).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
        fs::set_permissions(&real, perms).unwrap();
        fs::write(&real, b"tampered").unwrap();
        let mut made = Vec::new();
        let e = LayerReader::open(s.clone(), &r).unwrap().read_to_end(&mut made).unwrap_err();
        assert!(e.to_string().contains("its store paths changed"), "{e}");
        let last = LayerReader::open(s.clone(), &r).unwrap().into_chunks().last().unwrap().unwrap_err();
        assert!(last.to_string().contains("its store paths changed"), "{last}");
    }

    #[test]
    fn descriptions_from_the_store_are_checked() {
        let (_dir, s) = store();
        let info = s.add_text("t", b"x", &Default::default()).unwrap();
        let good = describe(&s, std::slice::from_ref(&info.path), LayerCompression::Gzip).unwrap();
        let json = |r: &LayerRecipe| serde_json::to_vec(r).unwrap();
        assert_eq!(LayerRecipe::parse(&json(&good), "d").unwrap(), good);
        let refuse = |bytes: &[u8], why: &str| {
            let e = LayerRecipe::parse(bytes, "d").map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(why), "{e} (wanted {why})");
        };
        refuse(b"{", "not a layer description");
        let mut v: serde_json::Value = serde_json::from_slice(&json(&good)).unwrap();
        v["extra"] = 1.into();
        refuse(&serde_json::to_vec(&v).unwrap(), "unknown field");
        for (field, value, why) in [
            ("format", "cairn-layered-image-v0", "tar format"),
            ("compression", "lz4", "unknown compression"),
            ("digest", "sha256:XYZ", "digest"),
            ("diffId", "md5:00", "digest"),
        ] {
            let mut v: serde_json::Value = serde_json::from_slice(&json(&good)).unwrap();
            v[field] = value.into();
            refuse(&serde_json::to_vec(&v).unwrap(), why);
        }
        // Paths that are not store paths of this store, or not valid, are refused when made.
        for (paths, dir, why) in [
            (vec!["../../etc/passwd".to_owned()], "/store", "path '../../etc/passwd'"),
            (vec!["00000000000000000000000000000000-gone".to_owned()], "/store", "not valid"),
            (vec![info.path.base_name()], "/nix/store", "store directory"),
        ] {
            let r = LayerRecipe { paths, store_dir: dir.to_owned(), ..good.clone() };
            let e = LayerReader::open(s.clone(), &r).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(why), "{e} (wanted {why})");
        }
    }

    /// Found by the property test: a symlink to `//\x01` came back as `/\x01`.
    #[test]
    fn link_targets_are_kept_byte_for_byte_short_or_long() {
        let long = [b"../".repeat(40).as_slice(), b"x//./y"].concat();
        for target in [&b"//\x01"[..], b"./a//b/.", &long] {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar_header(tar::EntryType::Symlink, 0o777, 0);
            append_link_bytes(&mut b, &mut h, b"dir/link", target).unwrap();
            let bytes = b.into_inner().unwrap();
            let mut a = tar::Archive::new(&bytes[..]);
            let e = a.entries().unwrap().next().unwrap().unwrap();
            assert_eq!(&*e.path_bytes(), b"dir/link");
            assert_eq!(e.link_name_bytes().as_deref(), Some(target), "{}", String::from_utf8_lossy(target));
        }
    }
}
