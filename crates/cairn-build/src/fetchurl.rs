//! `builtin:fetchurl`: the builder of `import <nix/fetchurl.nix>` (and of Nixpkgs' bootstrap
//! tarballs), run in the daemon as Nix 2.8 runs it (`libstore/builtins/fetchurl.cc`).
//!
//! The derivation names a `url`; its single output `out` is the downloaded file, or — with
//! `unpack = "1"` — the file read as a NAR (xz-decompressed first when the URL ends in `.xz`) and
//! restored as a tree. `executable = "1"` makes the result mode 0755. With `outputHashMode =
//! flat`, each `hashed-mirrors` entry is tried first as `MIRROR/ALGO/BASE16-HASH`; a mirror's
//! failure is only logged. `http://`, `https://` and `file://` URLs are fetched; TLS
//! certificates are not verified, as in Nix, because the result is checked against the output
//! hash anyway. That check, the references check (none allowed) and the registration are the
//! same as for any fixed-output build: the caller hands the result to the ordinary
//! registration path, so nothing a download produces enters the store unchecked.
//!
//! Differences from Nix, each on purpose:
//! - only fixed-output derivations are fetched: an input-addressed output would depend on what
//!   the server answers that day (newer Nix refuses them too);
//! - a `file://` URL is read only if everyone may read it (the file readable by others, every
//!   parent directory searchable by others). Nix reads it as its unprivileged build user; the
//!   daemon, which may be root, must not copy a private file into the world-readable store or
//!   reveal its hash in a mismatch message;
//! - proxies come from the build's `impureEnvVars` values (`http_proxy`, `https_proxy`,
//!   `all_proxy`, `no_proxy`, which `fetchurl.nix` names), so a client's proxy settings reach the
//!   download as they reach any fixed-output builder; the daemon's own environment is used only
//!   through that same resolution. `.netrc` is not read.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_nix::derivation::Derivation;
use cairn_nix::hash::Encoding;
use tokio::io::AsyncWriteExt;

/// The builder name this module serves.
pub const FETCHURL: &str = "builtin:fetchurl";

/// Settings of downloads made by `builtin:fetchurl`.
#[derive(Debug, Clone, Default)]
pub struct FetchSettings {
    /// `hashed-mirrors`: base URLs tried first for flat fixed outputs.
    pub hashed_mirrors: Vec<String>,
    /// `connect-timeout`.
    pub connect_timeout: Option<Duration>,
    /// `stalled-download-timeout`: a download silent this long fails.
    pub stalled_timeout: Option<Duration>,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("attribute '{0}' missing")]
    MissingAttr(&'static str),
    #[error("'builtin:fetchurl' requires an 'out' output")]
    NoOut,
    #[error("'builtin:fetchurl' must be a fixed-output derivation")]
    NotFixed,
    #[error("unable to download '{url}': {message}")]
    Download { url: String, message: String },
    #[error(
        "file '{0}' is not readable by everyone: builtin:fetchurl reads local files only as an unprivileged build user could"
    )]
    NotPublic(String),
    #[error("cannot unpack '{url}' as a NAR archive: {message}")]
    Unpack { url: String, message: String },
    #[error("{op} '{path}': {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What one `builtin:fetchurl` derivation asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// The derivation's `url`.
    pub url: String,
    /// Hashed-mirror URLs to try before it (flat outputs only).
    pub mirrors: Vec<String>,
    pub unpack: bool,
    pub executable: bool,
}

impl Fetch {
    /// Reads the derivation's attributes, with Nix's rules (`url` and `outputHashMode` must be
    /// present; `unpack`/`executable` are true when `"1"`).
    pub fn from_derivation(drv: &Derivation, hashed_mirrors: &[String]) -> Result<Fetch, FetchError> {
        if !drv.outputs.contains_key("out") {
            return Err(FetchError::NoOut);
        }
        let Some((_, hash)) = drv.fixed_output().ok().flatten() else {
            return Err(FetchError::NotFixed);
        };
        let attr = |name: &'static str| drv.env.get(name).ok_or(FetchError::MissingAttr(name));
        let url = attr("url")?.clone();
        let flat = attr("outputHashMode")? == "flat";
        let mirrors = if flat {
            let algo = hash.algo().to_string();
            let hex = hash.encode(Encoding::Base16);
            hashed_mirrors.iter().map(|m| format!("{}/{algo}/{hex}", m.trim_end_matches('/'))).collect()
        } else {
            Vec::new()
        };
        Ok(Fetch {
            url,
            mirrors,
            unpack: drv.env.get("unpack").is_some_and(|v| v == "1"),
            executable: drv.env.get("executable").is_some_and(|v| v == "1"),
        })
    }
}

/// Fetches into `dest` (which must not exist), using `scratch` (a file path of the build
/// directory) for the download. `env` holds the values of the derivation's `impureEnvVars`.
pub async fn run(
    fetch: &Fetch,
    dest: &Path,
    scratch: &Path,
    settings: &FetchSettings,
    env: &BTreeMap<String, String>,
    log: &mut (dyn FnMut(&[u8]) + Send),
) -> Result<(), FetchError> {
    let client = client(settings, env, &fetch.url)?;
    for m in &fetch.mirrors {
        log(format!("trying hashed mirror '{m}'").as_bytes());
        match download(&client, m, scratch).await {
            Ok(()) => return finish(fetch, m, scratch, dest).await,
            Err(e) => log(format!("{e}").as_bytes()),
        }
    }
    log(format!("downloading '{}'", fetch.url).as_bytes());
    download(&client, &fetch.url, scratch).await?;
    finish(fetch, &fetch.url, scratch, dest).await
}

/// An HTTP client configured as Nix's downloader is: no TLS verification, redirects followed,
/// the timeouts of the settings, and the proxies of the build's impure environment.
fn client(settings: &FetchSettings, env: &BTreeMap<String, String>, url: &str) -> Result<reqwest::Client, FetchError> {
    let bad = |message: String| FetchError::Download { url: url.to_owned(), message };
    let mut b = reqwest::Client::builder().tls_danger_accept_invalid_certs(true).no_proxy();
    if let Some(t) = settings.connect_timeout {
        b = b.connect_timeout(t);
    }
    if let Some(t) = settings.stalled_timeout {
        b = b.read_timeout(t);
    }
    let var = |k: &str| env.get(k).or_else(|| env.get(&k.to_uppercase())).filter(|v| !v.is_empty()).map(String::as_str);
    let no_proxy = var("no_proxy").and_then(reqwest::NoProxy::from_string);
    for name in ["http_proxy", "https_proxy", "all_proxy"] {
        if let Some(v) = var(name) {
            let p = match name {
                "http_proxy" => reqwest::Proxy::http(v),
                "https_proxy" => reqwest::Proxy::https(v),
                _ => reqwest::Proxy::all(v),
            };
            let p = p.map_err(|e| bad(format!("{name} '{v}': {e}")))?;
            b = b.proxy(p.no_proxy(no_proxy.clone()));
        }
    }
    b.build().map_err(|e| bad(e.to_string()))
}

/// Downloads `url` to the file `to` (replaced if it exists).
async fn download(client: &reqwest::Client, url: &str, to: &Path) -> Result<(), FetchError> {
    let fail = |message: String| FetchError::Download { url: url.to_owned(), message };
    if let Some(rest) = url.strip_prefix("file://") {
        let path = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .ok_or_else(|| fail(format!("'{rest}' is not an absolute file path")))?;
        let (src, to) = (path.clone(), to.to_owned());
        return tokio::task::spawn_blocking(move || copy_public(&src, &to)).await.map_err(|e| fail(e.to_string()))?;
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(fail("only http, https and file URLs are supported".to_owned()));
    }
    let mut resp = client.get(url).send().await.map_err(|e| fail(error_chain(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(fail(format!("HTTP error {}", status.as_u16())));
    }
    let io = |op| move |source| FetchError::Io { op, path: to.display().to_string(), source };
    let mut file = tokio::fs::File::create(to).await.map_err(io("create"))?;
    while let Some(chunk) = resp.chunk().await.map_err(|e| fail(error_chain(&e)))? {
        file.write_all(&chunk).await.map_err(io("write"))?;
    }
    file.flush().await.map_err(io("write"))?;
    Ok(())
}

/// An error with its causes, as reqwest's top-level message is only "error sending request".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Copies a local file that everyone may read; refuses any other.
fn copy_public(src: &Path, to: &Path) -> Result<(), FetchError> {
    let shown = src.display().to_string();
    let io = |op, source| FetchError::Io { op, path: shown.clone(), source };
    let real = std::fs::canonicalize(src).map_err(|e| io("read", e))?;
    for dir in real.ancestors().skip(1) {
        let m = std::fs::metadata(dir).map_err(|e| io("read", e))?;
        if m.mode() & 0o001 == 0 {
            return Err(FetchError::NotPublic(shown));
        }
    }
    let mut f = std::fs::File::open(&real).map_err(|e| io("read", e))?;
    let m = f.metadata().map_err(|e| io("read", e))?;
    if !m.is_file() || m.mode() & 0o004 == 0 {
        return Err(FetchError::NotPublic(shown));
    }
    let mut out = std::fs::File::create(to).map_err(|source| FetchError::Io {
        op: "create",
        path: to.display().to_string(),
        source,
    })?;
    std::io::copy(&mut f, &mut out).map_err(|e| io("read", e))?;
    Ok(())
}

/// Moves the download into place: as it is, or restored from a NAR; then made executable.
async fn finish(fetch: &Fetch, url: &str, scratch: &Path, dest: &Path) -> Result<(), FetchError> {
    let (fetch, url, scratch, dest) = (fetch.clone(), url.to_owned(), scratch.to_owned(), dest.to_owned());
    tokio::task::spawn_blocking(move || place(&fetch, &url, &scratch, &dest)).await.map_err(|e| FetchError::Io {
        op: "place",
        path: String::new(),
        source: std::io::Error::other(e),
    })?
}

fn place(fetch: &Fetch, url: &str, scratch: &Path, dest: &Path) -> Result<(), FetchError> {
    let io = |op, p: &Path| {
        let path = p.display().to_string();
        move |source| FetchError::Io { op, path, source }
    };
    if fetch.unpack {
        let f = std::fs::File::open(scratch).map_err(io("read", scratch))?;
        let reader: Box<dyn Read> = if fetch.url.ends_with(".xz") {
            Box::new(liblzma::read::XzDecoder::new(std::io::BufReader::new(f)))
        } else {
            Box::new(std::io::BufReader::new(f))
        };
        let unpack = |message: String| FetchError::Unpack { url: url.to_owned(), message };
        let mut nar = cairn_nix::nar::NarReader::new(reader, cairn_nix::nar::Limits::default())
            .map_err(|e| unpack(e.to_string()))?;
        cairn_store::restore(&mut nar, dest, cairn_store::RestoreMode::Plain).map_err(|e| unpack(e.to_string()))?;
    } else {
        std::fs::rename(scratch, dest).map_err(io("move", dest))?;
    }
    if fetch.executable {
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755)).map_err(io("chmod", dest))?;
    }
    Ok(())
}

/// The file a download is written to in a build directory, before it is moved (or unpacked)
/// to the output's place.
pub fn scratch_file(top: &Path) -> PathBuf {
    top.join("download")
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_nix::derivation::DerivationOutput;

    fn drv(env: &[(&str, &str)], algo: &str) -> Derivation {
        let mut d = Derivation { platform: "builtin".into(), builder: "builtin:fetchurl".into(), ..Default::default() };
        d.outputs.insert(
            "out".into(),
            DerivationOutput { path: "/nix/store/x".into(), hash_algo: algo.into(), hash: "ab".repeat(32) },
        );
        for (k, v) in env {
            d.env.insert((*k).into(), (*v).into());
        }
        d
    }

    #[test]
    fn flat_outputs_try_hashed_mirrors_first() {
        let d = drv(&[("url", "http://x/a"), ("outputHashMode", "flat")], "sha256");
        let f = Fetch::from_derivation(&d, &["http://m/".into()]).unwrap();
        assert_eq!(f.mirrors, vec![format!("http://m/sha256/{}", "ab".repeat(32))]);
        assert!(!f.unpack && !f.executable);
        let d = drv(&[("url", "http://x/a"), ("outputHashMode", "recursive"), ("unpack", "1")], "r:sha256");
        let f = Fetch::from_derivation(&d, &["http://m".into()]).unwrap();
        assert!(f.mirrors.is_empty() && f.unpack);
    }

    #[test]
    fn attributes_nix_requires_are_required() {
        let d = drv(&[("outputHashMode", "flat")], "sha256");
        assert_eq!(Fetch::from_derivation(&d, &[]).unwrap_err().to_string(), "attribute 'url' missing");
        let d = drv(&[("url", "http://x/a")], "sha256");
        assert_eq!(Fetch::from_derivation(&d, &[]).unwrap_err().to_string(), "attribute 'outputHashMode' missing");
        let d = drv(&[("url", "http://x/a"), ("outputHashMode", "flat")], "");
        assert!(matches!(Fetch::from_derivation(&d, &[]), Err(FetchError::NotFixed)));
    }

    #[test]
    fn private_local_files_are_refused() {
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let src = t.path().join("secret");
        std::fs::write(&src, b"x").unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o600)).unwrap();
        let to = t.path().join("copy");
        assert!(matches!(copy_public(&src, &to), Err(FetchError::NotPublic(_))));
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).unwrap();
        // The temporary directory's parents (/tmp) are searchable by everyone.
        copy_public(&src, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"x");
    }
}
