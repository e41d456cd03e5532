//! `cairn copy --to file://DIR`: writes paths' closures as a Nix binary cache.
//!
//! The layout is Nix's (`nix-cache-info`, `<hash>.narinfo`, `nar/<file hash>.nar`), so that
//! `nix copy --from file://DIR` and any Nix substituter read it. NARs come from the daemon and
//! are re-hashed on the way: a path whose contents no longer match its recorded NAR hash is not
//! published. Each NAR is written before its narinfo, both through a temporary name and a
//! rename, so a reader never finds a narinfo whose NAR is missing or half written. Paths whose
//! narinfo is already there are skipped. NARs are stored uncompressed for now.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cairn_api::PathInfo;
use cairn_client::Client;
use cairn_nix::hash::{Encoding, Hash, HashAlgo, Hasher};
use cairn_nix::narinfo::NarInfo;
use cairn_nix::signing::SecretKey;
use cairn_nix::StoreDir;
use tokio::io::AsyncReadExt;

/// The directory of a `file://` URL.
pub fn file_url_dir(url: &str) -> anyhow::Result<PathBuf> {
    match url.strip_prefix("file://") {
        Some(p) if p.starts_with('/') => Ok(PathBuf::from(p.split('?').next().unwrap_or(p))),
        Some(_) => bail!("'{url}': a file:// URL needs an absolute path (file:///srv/cache)"),
        None => bail!("'{url}': only file:// binary caches can be written so far"),
    }
}

/// What a copy did.
pub struct Copied {
    pub written: usize,
    pub skipped: usize,
    pub bytes: u64,
}

fn write_atomically(dest: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = dest.with_file_name(format!(".tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create '{}'", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dest).with_context(|| format!("cannot write '{}'", dest.display()))
}

/// Writes `infos` (a closure) into the cache at `dir`, signing with `key` if given.
pub async fn copy_to_file_cache(
    client: &Client,
    store_dir: &StoreDir,
    infos: &[PathInfo],
    dir: &Path,
    key: Option<&SecretKey>,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Copied> {
    let nar_dir = dir.join("nar");
    std::fs::create_dir_all(&nar_dir).with_context(|| format!("cannot create '{}'", nar_dir.display()))?;
    let cache_info = dir.join("nix-cache-info");
    if !cache_info.exists() {
        write_atomically(&cache_info, format!("StoreDir: {}\n", store_dir.as_str()).as_bytes())?;
    }
    let mut done = Copied { written: 0, skipped: 0, bytes: 0 };
    for info in infos {
        let path = store_dir.parse(&info.path)?;
        let narinfo_file = dir.join(format!("{}.narinfo", path.hash_part()));
        if narinfo_file.exists() {
            done.skipped += 1;
            continue;
        }
        let nar_hash = Hash::parse_prefixed(&info.nar_hash)?;
        // Stream the NAR into a temporary file, hashing it.
        let tmp = nar_dir.join(format!(".tmp-{}-{}", std::process::id(), path.hash_part()));
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        let mut hasher = Hasher::new(HashAlgo::Sha256);
        let mut size = 0u64;
        let mut r = client.nar(&info.path).await?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r.read(&mut buf).await.with_context(|| format!("reading the NAR of {}", info.path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            size += n as u64;
            progress.inc(n as u64);
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let file_hash = hasher.finish();
        if file_hash != nar_hash || size != info.nar_size {
            let _ = std::fs::remove_file(&tmp);
            bail!("{}: contents hash to {file_hash}, recorded {nar_hash}; not published", info.path);
        }
        let url = format!("nar/{}.nar", file_hash.encode(Encoding::Nix32));
        std::fs::rename(&tmp, dir.join(&url))?;
        let mut narinfo = NarInfo {
            store_path: path,
            url,
            compression: "none".into(),
            file_hash: Some(file_hash),
            file_size: Some(size),
            nar_hash,
            nar_size: info.nar_size,
            references: info.references.iter().map(|r| store_dir.parse(r)).collect::<Result<_, _>>()?,
            deriver: info.deriver.as_deref().map(|d| store_dir.parse(d)).transpose()?,
            system: None,
            signatures: info.signatures.clone(),
            ca: info.ca.clone(),
            extra: Vec::new(),
        };
        if let Some(k) = key {
            narinfo.sign(store_dir, k)?;
        }
        write_atomically(&narinfo_file, narinfo.render(store_dir).as_bytes())?;
        done.written += 1;
        done.bytes += size;
    }
    Ok(done)
}
