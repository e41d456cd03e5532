//! Where the blobs of an image being imported come from, and the archives images are written to:
//! `oci:DIR` (a layout directory), `oci-archive:FILE` (a tar of one) and `docker-archive:FILE`
//! (what `docker save` writes and `docker load` reads).
//!
//! Archives are never extracted: one pass over the tar's headers records where each regular
//! file's data starts, and blobs are then read in place. Entry names are only ever looked up
//! (by names built from validated digests or read from `manifest.json` and compared), never used
//! as paths to write, so an archive cannot make the CLI write anywhere.
//!
//! A docker archive has no manifest: the CLI stores the Docker schema 2 manifest that the
//! containers tools (skopeo, podman) generate for it, so the image gets the digest those tools
//! give it. Its bytes, and those of `manifest.json` and `repositories`, are
//! `cairn_oci::docker_archive`'s (unit-tested there); this module only reads and writes tars.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use cairn_oci::docker_archive;
use cairn_oci::manifest::{Descriptor, DOCKER_MANIFEST};
use cairn_oci::Digest;
use sha2::Digest as _;

/// Where one blob's bytes are.
#[derive(Clone, Debug)]
pub enum Origin {
    File(PathBuf),
    /// `size` bytes at `offset` of the archive.
    Entry {
        offset: u64,
        size: u64,
    },
    Memory(Vec<u8>),
}

/// The blobs of an image to import.
pub struct Source {
    /// What to call it in messages.
    pub name: String,
    /// The archive holding `Entry` origins.
    archive: Option<PathBuf>,
    dir: Option<PathBuf>,
    blobs: HashMap<Digest, Origin>,
    /// A compressed archive's tar, decompressed for reading in place; removed when dropped.
    _plain: Option<tempfile::TempPath>,
}

impl Source {
    /// An `oci:` directory.
    pub fn dir(dir: &Path) -> Source {
        Source {
            name: format!("'{}'", dir.display()),
            archive: None,
            dir: Some(dir.to_owned()),
            blobs: HashMap::new(),
            _plain: None,
        }
    }

    pub fn origin(&self, d: &Digest) -> Option<Origin> {
        if let Some(o) = self.blobs.get(d) {
            return Some(o.clone());
        }
        let dir = self.dir.as_ref()?;
        let p = dir.join("blobs").join(d.algo().as_str()).join(d.hex());
        std::fs::symlink_metadata(&p).ok().map(|_| Origin::File(p))
    }

    pub fn size(&self, o: &Origin) -> anyhow::Result<u64> {
        Ok(match o {
            Origin::File(p) => std::fs::metadata(p).with_context(|| format!("cannot read '{}'", p.display()))?.len(),
            Origin::Entry { size, .. } => *size,
            Origin::Memory(b) => b.len() as u64,
        })
    }

    /// A small blob's bytes (callers check the size first).
    pub fn read(&self, o: &Origin) -> anyhow::Result<Vec<u8>> {
        Ok(match o {
            Origin::File(p) => std::fs::read(p).with_context(|| format!("cannot read '{}'", p.display()))?,
            Origin::Entry { offset, size } => {
                let mut f = self.open_archive()?;
                f.seek(SeekFrom::Start(*offset))?;
                let mut v = Vec::with_capacity(*size as usize);
                f.take(*size).read_to_end(&mut v)?;
                v
            }
            Origin::Memory(b) => b.clone(),
        })
    }

    /// A blob's bytes as a stream.
    pub async fn open(&self, o: &Origin) -> anyhow::Result<Box<dyn tokio::io::AsyncRead + Send + Sync + Unpin>> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        Ok(match o {
            Origin::File(p) => {
                Box::new(tokio::fs::File::open(p).await.with_context(|| format!("cannot read '{}'", p.display()))?)
            }
            Origin::Entry { offset, size } => {
                let a = self.archive.as_ref().expect("entries come from an archive");
                let mut f = tokio::fs::File::open(a).await.with_context(|| format!("cannot read '{}'", a.display()))?;
                f.seek(SeekFrom::Start(*offset)).await?;
                Box::new(f.take(*size))
            }
            Origin::Memory(b) => Box::new(std::io::Cursor::new(b.clone())),
        })
    }

    fn open_archive(&self) -> anyhow::Result<std::fs::File> {
        let a = self.archive.as_ref().expect("entries come from an archive");
        std::fs::File::open(a).with_context(|| format!("cannot read '{}'", a.display()))
    }
}

/// The regular files of a tar: name (without a leading `./`) → (data offset, size).
fn index_tar(file: &Path) -> anyhow::Result<HashMap<String, (u64, u64)>> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot read '{}'", file.display()))?;
    let mut a = tar::Archive::new(f);
    let mut out = HashMap::new();
    for e in a.entries_with_seek().with_context(|| format!("'{}' is not a tar archive", file.display()))? {
        let e = e.with_context(|| format!("'{}' is not a valid tar archive", file.display()))?;
        if !e.header().entry_type().is_file() {
            continue;
        }
        let name = e.path()?.to_string_lossy().trim_start_matches("./").to_owned();
        out.insert(name, (e.raw_file_position(), e.size()));
    }
    Ok(out)
}

/// The tar an archive file is: itself, or — compressed with gzip, zstd, xz or bzip2, as
/// containers/image reads archives (`docker save | gzip`) — a temporary decompressed copy.
fn plain_tar(file: &Path) -> anyhow::Result<(PathBuf, Option<tempfile::TempPath>)> {
    use std::io::Read;
    let mut head = [0u8; 6];
    let mut f = std::fs::File::open(file).with_context(|| format!("cannot read '{}'", file.display()))?;
    let n = f.read(&mut head)?;
    let head = &head[..n];
    let kind = if head.starts_with(&[0x1f, 0x8b]) {
        "gzip"
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "zstd"
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        "xz"
    } else if head.starts_with(b"BZh") {
        "bzip2"
    } else {
        return Ok((file.to_owned(), None));
    };
    let input = std::io::BufReader::new(std::fs::File::open(file)?);
    let mut decoded: Box<dyn Read> = match kind {
        "gzip" => Box::new(flate2::read::MultiGzDecoder::new(input)),
        "zstd" => Box::new(zstd::Decoder::with_buffer(input)?),
        "xz" => cairn_cache::Compression::Xz.decoder(input).map(|d| Box::new(d) as Box<dyn Read>)?,
        _ => cairn_cache::Compression::Bzip2.decoder(input).map(|d| Box::new(d) as Box<dyn Read>)?,
    };
    let mut tmp = tempfile::Builder::new().prefix("cairn-archive-").tempfile()?;
    std::io::copy(&mut decoded, &mut tmp).with_context(|| format!("decompressing '{}' ({kind})", file.display()))?;
    let path = tmp.into_temp_path();
    Ok((path.to_path_buf(), Some(path)))
}

/// An `oci-archive:` file: its `index.json` and blobs, read in place.
pub fn oci_archive(file: &Path) -> anyhow::Result<(Source, Vec<u8>)> {
    let shown = file;
    let (file, plain) = plain_tar(file)?;
    let file = file.as_path();
    let entries = index_tar(file)?;
    let mut blobs = HashMap::new();
    for (name, (offset, size)) in &entries {
        let Some(rest) = name.strip_prefix("blobs/") else { continue };
        let Some((alg, hex)) = rest.split_once('/') else { continue };
        if let Ok(d) = Digest::parse(&format!("{alg}:{hex}")) {
            blobs.insert(d, Origin::Entry { offset: *offset, size: *size });
        }
    }
    let source = Source {
        name: format!("'{}'", shown.display()),
        archive: Some(file.to_owned()),
        dir: None,
        blobs,
        _plain: plain,
    };
    let (offset, size) =
        *entries.get("index.json").with_context(|| format!("'{}' has no index.json", shown.display()))?;
    ensure!(size <= cairn_oci::MAX_MANIFEST_SIZE, "the index.json of '{}' is too large", shown.display());
    let index = source.read(&Origin::Entry { offset, size })?;
    Ok((source, index))
}

/// Whether two image names are the same once Docker Hub's implicit prefixes are added
/// (`docker.io/`, `docker.io/library/` for one-component names).
fn same_name(a: &str, b: &str) -> bool {
    fn full(n: &str) -> String {
        match cairn_oci::reference::ImageRef::parse(n) {
            Ok(r) => r.to_string(),
            Err(_) => n.to_owned(),
        }
    }
    a == b || full(a) == full(b)
}

fn sha256_of_reader(mut r: impl Read) -> anyhow::Result<Digest> {
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Digest::parse(&format!("sha256:{}", crate::ctx::hex(&h.finalize())))?)
}

/// One image of a `docker-archive:` file (the one whose `RepoTags` has `reference`, or the only
/// one): its blobs and the schema 2 manifest describing them, whose descriptor is returned, with
/// the image's first `RepoTags` entry (its name, as `docker save` recorded it).
pub fn docker_archive(file: &Path, reference: Option<&str>) -> anyhow::Result<(Source, Descriptor, Option<String>)> {
    let (plain_file, plain) = plain_tar(file)?;
    let entries = index_tar(&plain_file)?;
    let (mo, ms) = *entries
        .get("manifest.json")
        .with_context(|| format!("'{}' has no manifest.json (not a docker archive)", file.display()))?;
    ensure!(ms <= cairn_oci::MAX_MANIFEST_SIZE, "the manifest.json of '{}' is too large", file.display());
    let mut source = Source {
        name: format!("'{}'", file.display()),
        archive: Some(plain_file.clone()),
        dir: None,
        blobs: HashMap::new(),
        _plain: plain,
    };
    let raw = source.read(&Origin::Entry { offset: mo, size: ms })?;
    let items = docker_archive::parse_archive_manifest(&raw)
        .with_context(|| format!("the manifest.json of '{}'", file.display()))?;
    // `@N`: the N-th image of manifest.json, from 0, as skopeo reads it.
    let nth = reference.and_then(|r| r.strip_prefix('@')).and_then(|n| n.parse::<usize>().ok());
    let item = match (reference, nth) {
        (Some(r), Some(n)) => items
            .get(n)
            .with_context(|| format!("'{}' holds {} images: there is no {r}", file.display(), items.len()))?,
        (Some(r), None) => items
            .iter()
            .find(|i| i.repo_tags.iter().flatten().any(|t| same_name(t, r)))
            .with_context(|| format!("no image in '{}' is tagged '{r}'", file.display()))?,
        (None, _) if items.len() == 1 => &items[0],
        (None, _) => bail!(
            "'{}' holds {} images: name one (docker-archive:FILE:NAME:TAG, or :@N for the N-th from 0)",
            file.display(),
            items.len()
        ),
    };
    let entry = |name: &str| -> anyhow::Result<(u64, u64)> {
        entries
            .get(name.trim_start_matches("./"))
            .copied()
            .with_context(|| format!("'{}' names '{name}', which it does not hold", file.display()))
    };
    let mut hash_entry = |name: &str| -> anyhow::Result<(Digest, u64)> {
        let (offset, size) = entry(name)?;
        let mut f = source.open_archive()?;
        f.seek(SeekFrom::Start(offset))?;
        let d = sha256_of_reader(f.take(size))?;
        source.blobs.insert(d.clone(), Origin::Entry { offset, size });
        Ok((d, size))
    };
    let (cd, cs) = hash_entry(&item.config)?;
    let layers = item.layers.iter().map(|l| hash_entry(l)).collect::<anyhow::Result<Vec<_>>>()?;
    let manifest = docker_archive::Schema2::for_archive((&cd, cs), &layers).to_bytes();
    let d = Digest::sha256_of(&manifest);
    let desc = Descriptor {
        media_type: DOCKER_MANIFEST.into(),
        digest: d.clone(),
        size: manifest.len() as u64,
        platform: None,
        annotations: Default::default(),
    };
    source.blobs.insert(d, Origin::Memory(manifest));
    let repo_tag = item.repo_tags.iter().flatten().next().cloned();
    Ok((source, desc, repo_tag))
}

/// Writes the tree under `dir` as an uncompressed tar at `file` (atomically: a temporary file
/// renamed over it), entries sorted, owner root, mtime 0.
pub fn tar_dir(dir: &Path, file: &Path) -> anyhow::Result<()> {
    let tmp = file.with_extension("cairn-tmp");
    let out = std::fs::File::create(&tmp).with_context(|| format!("cannot create '{}'", tmp.display()))?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(out));
    b.mode(tar::HeaderMode::Deterministic);
    let mut files = Vec::new();
    collect(dir, Path::new(""), &mut files)?;
    files.sort();
    for rel in files {
        b.append_path_with_name(dir.join(&rel), &rel)?;
    }
    b.into_inner()?.flush()?;
    std::fs::rename(&tmp, file).with_context(|| format!("cannot write '{}'", file.display()))?;
    Ok(())
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(root.join(rel))? {
        let e = e?;
        let r = rel.join(e.file_name());
        if e.file_type()?.is_dir() {
            collect(root, &r, out)?;
        } else {
            out.push(r);
        }
    }
    Ok(())
}

/// Writes a docker archive: `manifest.json`, `repositories` (with a tag), the config as
/// `<hex>.json` and each layer, uncompressed, as `<diff id hex>.tar` — the layout `docker save`
/// and skopeo write. `layers` are (media type, a file holding the layer blob as stored).
pub fn write_docker_archive(
    file: &Path,
    reference: Option<&str>,
    config: &[u8],
    layers: Vec<(String, PathBuf)>,
) -> anyhow::Result<()> {
    // As skopeo: an existing archive is not added to, nor silently replaced.
    if std::fs::metadata(file).is_ok_and(|m| m.len() > 0) {
        bail!(
            "'{}' exists: a docker-archive is written whole, and this one would lose what it holds (remove it first, or write another file)",
            file.display()
        );
    }
    let tmp = file.with_extension("cairn-tmp");
    let out = std::fs::File::create(&tmp).with_context(|| format!("cannot create '{}'", tmp.display()))?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(out));
    let cd = Digest::sha256_of(config);
    let mut names = Vec::new();
    let header = |size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h
    };
    for (media_type, path) in &layers {
        // Uncompressed into a temporary file first: a tar entry needs its size up front.
        let mut raw = std::fs::File::open(path)?;
        let plain = tempfile::NamedTempFile::new_in(file.parent().unwrap_or(Path::new(".")))?;
        let mut w = std::io::BufWriter::new(plain.reopen()?);
        let mut hasher = sha2::Sha256::new();
        let mut decoder: Box<dyn Read> = if media_type.ends_with("gzip") || media_type.ends_with("+gzip") {
            Box::new(flate2::read::GzDecoder::new(&mut raw))
        } else if media_type.ends_with("zstd") {
            Box::new(zstd::stream::read::Decoder::new(&mut raw)?)
        } else {
            Box::new(&mut raw)
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = decoder.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            w.write_all(&buf[..n])?;
            size += n as u64;
        }
        w.flush()?;
        drop(w);
        let name = format!("{}.tar", crate::ctx::hex(&hasher.finalize()));
        let mut h = header(size);
        b.append_data(&mut h, &name, std::fs::File::open(plain.path())?)?;
        names.push(name);
    }
    let config_name = format!("{}.json", cd.hex());
    b.append_data(&mut header(config.len() as u64), &config_name, config)?;
    let tags = reference.into_iter().map(str::to_owned).collect();
    let top = names.last().map(|n| n.trim_end_matches(".tar").to_owned()).unwrap_or_default();
    let image = docker_archive::ArchiveImage { config: config_name, repo_tags: Some(tags), layers: names };
    let manifest = docker_archive::archive_manifest(&[image]);
    b.append_data(&mut header(manifest.len() as u64), "manifest.json", &manifest[..])?;
    if let Some(r) = reference {
        let (name, tag) = r.rsplit_once(':').context("docker-archive:FILE:NAME:TAG needs a tag")?;
        let repos = docker_archive::repositories(name, tag, &top);
        b.append_data(&mut header(repos.len() as u64), "repositories", &repos[..])?;
    }
    b.into_inner()?.flush()?;
    std::fs::rename(&tmp, file).with_context(|| format!("cannot write '{}'", file.display()))?;
    Ok(())
}
