//! Where a binary cache's files live: a directory (`file://`), a web server (`http://`,
//! `https://`), or S3-compatible object storage (`s3://BUCKET`).
//!
//! A cache is a flat namespace of keys (`nix-cache-info`, `<hash>.narinfo`, `nar/…`). Reads of
//! small files return bytes; NARs are read as a blocking [`Read`] for the thread that restores
//! them. Every network read is bounded by the stall timeout: a server that stops sending fails
//! the read instead of hanging the substitution.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt};

use crate::CacheError;
use cairn_store::peers::PeerCache;

use crate::remote::RemoteStore;

pub use cairn_net::{with_causes, NetOptions};

/// A cache's storage.
#[derive(Clone)]
pub enum Backend {
    File(PathBuf),
    Http {
        client: reqwest::Client,
        base: String,
        opts: NetOptions,
    },
    S3 {
        store: Arc<dyn ObjectStore>,
        prefix: String,
        opts: NetOptions,
        /// Whether the environment names credentials; if not, object_store asks the instance
        /// metadata service, whose failure would otherwise be all an error says.
        env_credentials: bool,
    },
    /// A fleet peer's store (`p2p://NODE-ID`), through the daemon's p2p node: narinfos only,
    /// since its NARs come as verified p2p transfers (`Peers::find`).
    Peer {
        url: String,
        cache: Arc<dyn PeerCache>,
    },
    /// A store that answers questions (`ssh://`, `ssh-ng://`, `unix://`): a path's narinfo is
    /// made of what it says of the path, its NAR's key is the path's base name.
    Remote {
        url: String,
        store: Arc<dyn RemoteStore>,
    },
}

/// The environment variables through which object_store finds S3 credentials without the
/// instance metadata service.
const S3_CREDENTIAL_VARS: [&str; 4] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
];

/// The largest narinfo or `nix-cache-info` read (a narinfo with thousands of references is
/// well under this).
pub const MAX_SMALL_FILE: usize = 4 << 20;

/// A blocking reader of a file in a cache.
pub type FileReader = Box<dyn Read + Send>;

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::File(p) => write!(f, "File({})", p.display()),
            Backend::Http { base, .. } => write!(f, "Http({base})"),
            Backend::S3 { prefix, .. } => write!(f, "S3({prefix})"),
            Backend::Peer { url, .. } => write!(f, "Peer({url})"),
            Backend::Remote { url, .. } => write!(f, "Remote({url})"),
        }
    }
}

/// Splits `url` into its part before `?` and its `key=value` parameters.
pub fn split_params(url: &str) -> (&str, Vec<(String, String)>) {
    match url.split_once('?') {
        None => (url, Vec::new()),
        Some((base, q)) => (
            base,
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (kv.to_owned(), String::new()),
                })
                .collect(),
        ),
    }
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

impl Backend {
    /// Opens the backend a cache URL names. S3 credentials come from the environment
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, …); `?endpoint=` and `?region=` as in Nix.
    pub fn open(url: &str, opts: &NetOptions) -> Result<Backend, CacheError> {
        let bad = |reason: &str| CacheError::Url { url: url.to_owned(), reason: reason.to_owned() };
        let (base, params) = split_params(url);
        if let Some(dir) = base.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(bad("a file:// URL needs an absolute path (file:///srv/cache)"));
            }
            return Ok(Backend::File(PathBuf::from(dir)));
        }
        if base.starts_with("http://") || base.starts_with("https://") {
            let client = cairn_net::client_builder(opts)
                .pool_max_idle_per_host(64)
                .build()
                .map_err(|e| bad(&format!("cannot start an HTTP client: {e}")))?;
            return Ok(Backend::Http { client, base: base.trim_end_matches('/').to_owned(), opts: opts.clone() });
        }
        if let Some(rest) = base.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("an s3:// URL names a bucket (s3://BUCKET?endpoint=…&region=…)"));
            }
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
            let mut allow_http = false;
            if let Some(region) = param(&params, "region") {
                b = b.with_region(region);
            }
            if let Some(endpoint) = param(&params, "endpoint") {
                let endpoint = if endpoint.contains("://") {
                    endpoint.to_owned()
                } else {
                    format!("{}://{endpoint}", param(&params, "scheme").unwrap_or("https"))
                };
                allow_http = endpoint.starts_with("http://");
                b = b.with_endpoint(&endpoint);
            }
            // These options replace the builder's own, so plain HTTP is allowed here.
            let client = object_store::ClientOptions::new()
                .with_allow_http(allow_http)
                .with_connect_timeout(opts.connect_timeout)
                .with_timeout_disabled();
            let retry =
                object_store::RetryConfig { max_retries: 2, retry_timeout: opts.stall_timeout, ..Default::default() };
            let store = b
                .with_client_options(client)
                .with_retry(retry)
                .build()
                .map_err(|e| bad(&format!("cannot open the bucket: {e}")))?;
            return Ok(Backend::S3 {
                store: Arc::new(store),
                prefix: prefix.trim_end_matches('/').to_owned(),
                opts: opts.clone(),
                env_credentials: S3_CREDENTIAL_VARS.iter().any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty())),
            });
        }
        if base.starts_with("p2p://") {
            return Err(bad("a peer is reached through cairnd's p2p node (set `peers` in its configuration)"));
        }
        if crate::remote::is_remote_store(base) {
            return Err(bad("a store reached over SSH or a socket is a substituter of cairnd's, not a binary cache"));
        }
        Err(bad("binary caches are file://, http://, https:// or s3:// URLs (or p2p://NODE-ID, a peer; or ssh://, \
             ssh-ng://, unix:// stores as substituters)"))
    }

    fn file(dir: &Path, key: &str) -> Result<PathBuf, CacheError> {
        if key.split('/').any(|c| c == ".." || c.is_empty()) || key.starts_with('/') {
            return Err(CacheError::Url { url: key.to_owned(), reason: "the key leaves the cache".into() });
        }
        Ok(dir.join(key))
    }

    fn s3_key(prefix: &str, key: &str) -> object_store::path::Path {
        if prefix.is_empty() {
            object_store::path::Path::from(key)
        } else {
            object_store::path::Path::from(format!("{prefix}/{key}"))
        }
    }

    /// The URL of a key, for messages.
    pub fn describe(&self, key: &str) -> String {
        match self {
            Backend::File(d) => format!("file://{}", d.join(key).display()),
            Backend::Http { base, .. } => format!("{base}/{key}"),
            Backend::S3 { store, prefix, .. } => format!("{store}/{}", Self::s3_key(prefix, key)),
            Backend::Peer { url, .. } => format!("{url}/{key}"),
            // Its NAR's key is the path's base name, which messages name anyway.
            Backend::Remote { url, .. } => split_params(url).0.to_owned(),
        }
    }

    /// A small file (`nix-cache-info`, a narinfo), or `None` if the cache has no such file.
    /// Files over [`MAX_SMALL_FILE`] are refused rather than buffered.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        let what = || self.describe(key);
        let too_big = || CacheError::BadFile { url: what(), reason: format!("longer than {MAX_SMALL_FILE} bytes") };
        match self {
            Backend::File(dir) => {
                // A local file of a few kilobytes: read in place, which costs less than handing
                // it to the blocking pool (a closure has thousands).
                let p = Self::file(dir, key)?;
                let file = match std::fs::File::open(&p) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(source) => return Err(CacheError::Io { url: what(), source }),
                };
                let mut buf = Vec::new();
                io::Read::read_to_end(&mut io::Read::take(file, MAX_SMALL_FILE as u64 + 1), &mut buf)
                    .map_err(|source| CacheError::Io { url: what(), source })?;
                if buf.len() > MAX_SMALL_FILE {
                    return Err(too_big());
                }
                Ok(Some(buf.into()))
            }
            Backend::Remote { .. } => {
                Err(CacheError::Url { url: what(), reason: "a remote store is asked by path, not for files".into() })
            }
            Backend::Peer { cache, .. } => match cache.get(key).await {
                Ok(Some(buf)) if buf.len() > MAX_SMALL_FILE => Err(too_big()),
                Ok(found) => Ok(found.map(Bytes::from)),
                Err(reason) => Err(CacheError::Http { url: what(), reason }),
            },
            Backend::Http { .. } | Backend::S3 { .. } => match self.stream(key).await? {
                None => Ok(None),
                Some(mut s) => {
                    let mut buf = Vec::new();
                    while let Some(chunk) = s.next().await {
                        buf.extend_from_slice(&chunk.map_err(|source| CacheError::Io { url: what(), source })?);
                        if buf.len() > MAX_SMALL_FILE {
                            return Err(too_big());
                        }
                    }
                    Ok(Some(buf.into()))
                }
            },
        }
    }

    /// A network body as a stream of chunks, each awaited at most the stall timeout.
    async fn stream(
        &self,
        key: &str,
    ) -> Result<Option<impl Stream<Item = io::Result<Bytes>> + Send + 'static + use<>>, CacheError> {
        let url = self.describe(key);
        let (body, stall): (futures_util::stream::BoxStream<'static, io::Result<Bytes>>, Duration) = match self {
            Backend::File(_) | Backend::Peer { .. } | Backend::Remote { .. } => {
                return Err(CacheError::Url { url, reason: "not read as a stream".into() })
            }
            Backend::Http { client, opts, .. } => {
                let mut req = client.get(&url);
                if let Some((login, password)) = opts.credentials_for(&url) {
                    req = req.basic_auth(login, Some(password));
                }
                let send = req.send();
                let resp = match tokio::time::timeout(opts.connect_timeout + opts.stall_timeout, send).await {
                    Err(_) => return Err(CacheError::Timeout { url, secs: opts.stall_timeout.as_secs() }),
                    Ok(Err(e)) if e.is_timeout() => {
                        return Err(CacheError::Timeout { url, secs: opts.stall_timeout.as_secs() })
                    }
                    Ok(Err(e)) => return Err(CacheError::Http { url, reason: with_causes(&e) }),
                    Ok(Ok(r)) => r,
                };
                match resp.status() {
                    s if s.is_success() => {}
                    // Nix's caches answer 403 for missing keys on some S3 front-ends.
                    reqwest::StatusCode::NOT_FOUND | reqwest::StatusCode::FORBIDDEN => return Ok(None),
                    s => return Err(CacheError::Http { url, reason: format!("the server answered {s}") }),
                }
                let secs = opts.stall_timeout.as_secs();
                let body = resp.bytes_stream().map_err(move |e| {
                    if e.is_timeout() {
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no data for {secs} s (stalled-download-timeout)"),
                        )
                    } else {
                        io::Error::other(with_causes(&e))
                    }
                });
                (body.boxed(), opts.stall_timeout)
            }
            Backend::S3 { store, prefix, opts, env_credentials } => {
                let location = Self::s3_key(prefix, key);
                let get = store.get(&location);
                let r = match tokio::time::timeout(opts.connect_timeout + opts.stall_timeout, get).await {
                    Err(_) => return Err(CacheError::Timeout { url, secs: opts.stall_timeout.as_secs() }),
                    Ok(Err(object_store::Error::NotFound { .. })) => return Ok(None),
                    Ok(Err(e)) => return Err(CacheError::Http { url, reason: s3_reason(&e, *env_credentials) }),
                    Ok(Ok(r)) => r,
                };
                (r.into_stream().map_err(io::Error::other).boxed(), opts.stall_timeout)
            }
        };
        Ok(Some(with_stall_timeout(body, stall, url).boxed()))
    }

    /// A file as a blocking reader (call from a blocking thread's runtime handle context:
    /// network readers block on the runtime that opened them).
    pub async fn open_read(&self, key: &str) -> Result<FileReader, CacheError> {
        match self {
            Backend::File(dir) => {
                let p = Self::file(dir, key)?;
                match std::fs::File::open(&p) {
                    Ok(f) => Ok(Box::new(f)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        Err(CacheError::Missing { url: self.describe(key) })
                    }
                    Err(source) => Err(CacheError::Io { url: self.describe(key), source }),
                }
            }
            Backend::Remote { store, .. } => {
                let path = cairn_nix::StorePath::from_base_name(key)
                    .map_err(|e| CacheError::Url { url: self.describe(key), reason: e.to_string() })?;
                store.nar(&path).await.map_err(|reason| CacheError::Http { url: self.describe(key), reason })
            }
            Backend::Peer { .. } => Err(CacheError::Http {
                url: self.describe(key),
                reason: "no peer could send this NAR (a peer's NARs come only as verified p2p transfers; see \
                         `cairn peers`)"
                    .into(),
            }),
            Backend::Http { .. } | Backend::S3 { .. } => match self.stream(key).await? {
                None => Err(CacheError::Missing { url: self.describe(key) }),
                Some(s) => Ok(Box::new(tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(s)))),
            },
        }
    }

    /// Whether the cache has `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        match self {
            Backend::File(dir) => Ok(Self::file(dir, key)?.exists()),
            Backend::S3 { store, prefix, env_credentials, .. } => match store.head(&Self::s3_key(prefix, key)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(CacheError::Http { url: self.describe(key), reason: s3_reason(&e, *env_credentials) }),
            },
            Backend::Http { .. } | Backend::Peer { .. } | Backend::Remote { .. } => Ok(self.get(key).await?.is_some()),
        }
    }

    /// Writes `key` from a local file, atomically: readers see the whole file or none.
    pub async fn put_file(&self, key: &str, local: &Path) -> Result<(), CacheError> {
        let url = self.describe(key);
        match self {
            Backend::File(dir) => {
                let dest = Self::file(dir, key)?;
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).map_err(|source| CacheError::Io { url: url.clone(), source })?;
                }
                let tmp = dest.with_file_name(format!(".tmp-{}-{}", std::process::id(), unique()));
                let result = std::fs::copy(local, &tmp)
                    .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
                    .and_then(|_| std::fs::rename(&tmp, &dest));
                if result.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                result.map_err(|source| CacheError::Io { url, source })
            }
            Backend::S3 { store, prefix, .. } => {
                let mut file =
                    tokio::fs::File::open(local).await.map_err(|source| CacheError::Io { url: url.clone(), source })?;
                let mut w = object_store::buffered::BufWriter::new(store.clone(), Self::s3_key(prefix, key));
                let copied = tokio::io::copy(&mut file, &mut w).await;
                let done = match copied {
                    Ok(_) => tokio::io::AsyncWriteExt::shutdown(&mut w).await,
                    Err(e) => {
                        let _ = w.abort().await;
                        Err(e)
                    }
                };
                done.map_err(|source| CacheError::Io { url, source })
            }
            Backend::Http { .. } => {
                Err(CacheError::Url { url, reason: "cairn writes binary caches to file:// and s3:// only".into() })
            }
            Backend::Remote { .. } => Err(CacheError::Url {
                url,
                reason: "a remote store is not written as a cache: `cairn copy --to ssh://HOST` copies into it".into(),
            }),
            Backend::Peer { .. } => Err(CacheError::Url {
                url,
                reason: "a peer is not written as a cache: `cairn copy --to p2p://NODE-ID` asks it to take paths"
                    .into(),
            }),
        }
    }

    /// Writes a small file atomically.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), CacheError> {
        let url = self.describe(key);
        match self {
            Backend::S3 { store, prefix, env_credentials, .. } => {
                store
                    .put(&Self::s3_key(prefix, key), data.into())
                    .await
                    .map_err(|e| CacheError::Http { url, reason: s3_reason(&e, *env_credentials) })?;
                Ok(())
            }
            _ => {
                let tmp = std::env::temp_dir().join(format!("cairn-put-{}-{}", std::process::id(), unique()));
                std::fs::write(&tmp, &data).map_err(|source| CacheError::Io { url: url.clone(), source })?;
                let r = self.put_file(key, &tmp).await;
                let _ = std::fs::remove_file(&tmp);
                r
            }
        }
    }
}

/// What an S3 request's failure says. Without credentials in the environment, a failure to get
/// them from the instance metadata service (on any machine that is not a cloud instance, a
/// refused connection to 169.254.169.254) is reported as what it means: no credentials.
fn s3_reason(e: &object_store::Error, env_credentials: bool) -> String {
    let text = with_causes(e);
    let lower = text.to_ascii_lowercase();
    if !env_credentials && (lower.contains("credential") || lower.contains("/latest/api/token")) {
        format!(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in cairnd's environment \
             to substitute, in the CLI's to copy --to; the instance metadata service tried instead \
             failed: {text})"
        )
    } else {
        text
    }
}

fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Ends `body` with a timeout error when no chunk arrives within `stall`.
fn with_stall_timeout(
    body: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
    stall: Duration,
    url: String,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures_util::stream::unfold(Some(body), move |state| {
        let url = url.clone();
        async move {
            let mut body = state?;
            match tokio::time::timeout(stall, body.next()).await {
                Ok(Some(item)) => Some((item, Some(body))),
                Ok(None) => None,
                Err(_) => Some((
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{url}: no data for {} s (stalled-download-timeout)", stall.as_secs()),
                    )),
                    None,
                )),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(text: &str) -> object_store::Error {
        object_store::Error::Generic { store: "S3", source: text.into() }
    }

    #[test]
    fn a_metadata_service_failure_without_credentials_says_so() {
        let e = generic("Error fetching credentials: PUT http://169.254.169.254/latest/api/token: connection refused");
        let reason = s3_reason(&e, false);
        assert!(reason.starts_with("no S3 credentials: set AWS_ACCESS_KEY_ID"), "{reason}");
        assert!(reason.contains("latest/api/token"), "the cause is kept: {reason}");
    }

    #[test]
    fn other_failures_and_configured_credentials_keep_their_text() {
        let e = generic("Error fetching credentials: access denied");
        assert_eq!(s3_reason(&e, true), with_causes(&e));
        let e = generic("connection refused");
        assert_eq!(s3_reason(&e, false), with_causes(&e));
    }
}
