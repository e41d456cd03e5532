//! A distribution-protocol client (the OCI Distribution Spec's pull and push endpoints).
//!
//! Authentication follows the spec's challenge flow: a request answered 401 carries a
//! `WWW-Authenticate` challenge; `Basic` is answered with the caller's credentials, `Bearer`
//! by fetching a token from the challenge's realm for the repository's scope (with the
//! credentials, if any, as basic auth — anonymous otherwise), and the request is sent again.
//! Tokens are kept for the client's life. Only requests without a streamed body are retried, so
//! the client authenticates (`/v2/` with the push scope) before it uploads.

use base64::Engine;
use cairn_oci::manifest::ACCEPT;
use cairn_oci::reference::{ImageRef, Reference};
use cairn_oci::{Digest, MAX_MANIFEST_SIZE};
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use tokio::sync::Mutex;

use crate::{ImageError, Result};

/// Credentials for one registry.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// How a client connects.
#[derive(Clone, Default)]
pub struct ClientOptions {
    pub credentials: Option<Credentials>,
    /// Allow plain HTTP and unverified certificates.
    pub insecure: bool,
    /// The daemon's `connect-timeout` and `stalled-download-timeout`.
    pub net: cairn_net::NetOptions,
}

/// A client for one repository of one registry.
pub struct Registry {
    http: reqwest::Client,
    /// `https://host` or `http://host`.
    base: String,
    /// How the registry is named in messages.
    pub name: String,
    pub repository: String,
    creds: Option<Credentials>,
    auth: Mutex<Option<HeaderValue>>,
    /// The actions (`pull`, `pull,push`) tokens are asked for.
    actions: &'static str,
}

/// A manifest as a registry answered it.
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub media_type: Option<String>,
}

fn err(name: &str, e: impl std::fmt::Display) -> ImageError {
    ImageError::Registry { registry: name.to_owned(), message: e.to_string() }
}

/// One challenge's scheme and parameters.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub scheme: String,
    pub params: Vec<(String, String)>,
}

/// Parses `Bearer realm="…",service="…",scope="…"` (quoted or token values).
pub(crate) fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = Vec::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, v) = s.split_once('=')?;
        let k = k.trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (value, after) = if let Some(q) = v.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            out.push(n)
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => out.push(c),
                }
            }
            (out, &q[end?..])
        } else {
            let end = v.find(',').unwrap_or(v.len());
            (v[..end].trim().to_owned(), &v[end..])
        };
        params.push((k, value));
        s = after.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge { scheme: scheme.to_ascii_lowercase(), params })
}

impl Registry {
    /// A client for `image`'s repository. With `insecure`, HTTPS is tried without certificate
    /// checks and plain HTTP used when the registry does not speak TLS.
    pub async fn connect(image: &ImageRef, opts: &ClientOptions, push: bool) -> Result<Registry> {
        let name = image.registry.clone();
        let http = cairn_net::client_builder(&opts.net)
            .pool_max_idle_per_host(16)
            .tls_danger_accept_invalid_certs(opts.insecure)
            .build()
            .map_err(|e| err(&name, format!("cannot start an HTTP client: {e}")))?;
        let host = image.api_host();
        let mut base = format!("https://{host}");
        if opts.insecure {
            let probe = http.get(format!("{base}/v2/")).timeout(opts.net.connect_timeout).send().await;
            if probe.is_err() {
                base = format!("http://{host}");
            }
        }
        let reg = Registry {
            http,
            base,
            name,
            repository: image.repository.clone(),
            creds: opts.credentials.clone(),
            auth: Mutex::new(None),
            actions: if push { "pull,push" } else { "pull" },
        };
        reg.login().await?;
        Ok(reg)
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.repository)
    }

    /// Answers the registry's challenge on `/v2/`, if any, so that later requests carry auth.
    async fn login(&self) -> Result<()> {
        let r = self
            .http
            .get(format!("{}/v2/", self.base))
            .send()
            .await
            .map_err(|e| err(&self.name, cairn_net::with_causes(&e)))?;
        if r.status() == StatusCode::UNAUTHORIZED {
            self.answer_challenge(r.headers()).await?;
        } else if !r.status().is_success() && r.status() != StatusCode::NOT_FOUND {
            return Err(self.status_error("GET /v2/", r).await);
        }
        Ok(())
    }

    fn scope(&self) -> String {
        format!("repository:{}:{}", self.repository, self.actions)
    }

    fn basic(&self) -> Option<String> {
        self.creds.as_ref().map(|c| {
            let raw = format!("{}:{}", c.username, c.password);
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
        })
    }

    async fn answer_challenge(&self, headers: &HeaderMap) -> Result<()> {
        let unauthorized = || ImageError::Unauthorized { registry: self.name.clone(), scope: self.scope() };
        let challenge = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(parse_challenge)
            .find(|c| c.scheme == "bearer" || c.scheme == "basic")
            .ok_or_else(unauthorized)?;
        let value = if challenge.scheme == "basic" {
            self.basic().ok_or_else(unauthorized)?
        } else {
            let param = |k: &str| challenge.params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let realm = param("realm").ok_or_else(|| err(&self.name, "a bearer challenge without a realm"))?;
            let mut url =
                reqwest::Url::parse(&realm).map_err(|e| err(&self.name, format!("token realm '{realm}': {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(err(&self.name, format!("token realm '{realm}' is not an HTTP URL")));
            }
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("scope", &self.scope());
                if let Some(service) = param("service") {
                    q.append_pair("service", &service);
                }
            }
            let mut req = self.http.get(url);
            if let Some(b) = self.basic() {
                req = req.header(AUTHORIZATION, b);
            }
            let r = req.send().await.map_err(|e| err(&self.name, cairn_net::with_causes(&e)))?;
            if r.status() == StatusCode::UNAUTHORIZED || r.status() == StatusCode::FORBIDDEN {
                return Err(unauthorized());
            }
            if !r.status().is_success() {
                return Err(self.status_error("the token service", r).await);
            }
            let body = read_limited(r, 1 << 20).await.map_err(|e| err(&self.name, e))?;
            #[derive(serde::Deserialize)]
            struct Token {
                token: Option<String>,
                access_token: Option<String>,
            }
            let t: Token = serde_json::from_slice(&body).map_err(|e| err(&self.name, format!("token answer: {e}")))?;
            let token = t.token.or(t.access_token).ok_or_else(|| err(&self.name, "the token answer has no token"))?;
            format!("Bearer {token}")
        };
        let v = HeaderValue::from_str(&value).map_err(|_| err(&self.name, "the token is not a header value"))?;
        *self.auth.lock().await = Some(v);
        Ok(())
    }

    async fn status_error(&self, what: &str, r: reqwest::Response) -> ImageError {
        let status = r.status().as_u16();
        let body = read_limited(r, 64 * 1024).await.unwrap_or_default();
        // The spec's error body: {"errors":[{"code":…,"message":…}]}.
        let detail = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                let e = v.get("errors")?.get(0)?;
                Some(format!(
                    ": {} {}",
                    e.get("code").and_then(|c| c.as_str()).unwrap_or(""),
                    e.get("message").and_then(|c| c.as_str()).unwrap_or("")
                ))
            })
            .unwrap_or_default();
        ImageError::Status { registry: self.name.clone(), what: what.to_owned(), status, detail }
    }

    /// Sends a request without a body, answering one auth challenge.
    async fn send(&self, method: Method, url: &str, headers: HeaderMap) -> Result<reqwest::Response> {
        for attempt in 0..2 {
            let mut req = self.http.request(method.clone(), url).headers(headers.clone());
            if let Some(a) = self.auth.lock().await.clone() {
                req = req.header(AUTHORIZATION, a);
            }
            let r = req.send().await.map_err(|e| err(&self.name, cairn_net::with_causes(&e)))?;
            if r.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                self.answer_challenge(r.headers()).await?;
                continue;
            }
            return Ok(r);
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// A request builder carrying the auth the client holds (for bodies, which are not retried).
    pub async fn request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, url);
        if let Some(a) = self.auth.lock().await.clone() {
            req = req.header(AUTHORIZATION, a);
        }
        req
    }

    /// Fetches a manifest by tag or digest. Its digest is computed from the bytes received; a
    /// manifest asked for by digest must have it.
    pub async fn manifest(&self, reference: &Reference) -> Result<FetchedManifest> {
        let mut h = HeaderMap::new();
        h.insert(reqwest::header::ACCEPT, HeaderValue::from_static(ACCEPT));
        let what = format!("manifest {reference}");
        let r = self.send(Method::GET, &self.url(&format!("manifests/{reference}")), h).await?;
        if !r.status().is_success() {
            return Err(self.status_error(&format!("GET {what}"), r).await);
        }
        let media_type = r
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
        let bytes = read_limited(r, MAX_MANIFEST_SIZE).await.map_err(|e| err(&self.name, format!("{what}: {e}")))?;
        let digest = Digest::sha256_of(&bytes);
        if let Reference::Digest(want) = reference {
            let actual = match want.algo() {
                cairn_oci::DigestAlgo::Sha256 => digest.clone(),
                cairn_oci::DigestAlgo::Sha512 => {
                    Digest::from_hash(&cairn_nix::Hash::digest(cairn_nix::HashAlgo::Sha512, &bytes))
                        .expect("sha512 digests")
                }
            };
            if &actual != want {
                return Err(ImageError::ManifestDigest {
                    registry: self.name.clone(),
                    reference: reference.to_string(),
                    expected: want.to_string(),
                    actual: actual.to_string(),
                });
            }
            return Ok(FetchedManifest { bytes, digest: actual, media_type });
        }
        Ok(FetchedManifest { bytes, digest, media_type })
    }

    /// Starts a blob download; the body is the caller's to stream (and verify).
    pub async fn blob(&self, digest: &Digest) -> Result<reqwest::Response> {
        let r = self.send(Method::GET, &self.url(&format!("blobs/{digest}")), HeaderMap::new()).await?;
        if !r.status().is_success() {
            return Err(self.status_error(&format!("GET blob {digest}"), r).await);
        }
        Ok(r)
    }

    /// Whether the repository has a blob (HEAD).
    pub async fn has_blob(&self, digest: &Digest) -> Result<bool> {
        let r = self.send(Method::HEAD, &self.url(&format!("blobs/{digest}")), HeaderMap::new()).await?;
        match r.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.status_error(&format!("HEAD blob {digest}"), r).await),
        }
    }

    /// Starts an upload, or mounts `digest` from repository `from` of the same registry. Answers
    /// `None` when the mount succeeded, else the upload's location.
    pub async fn start_upload(&self, mount: Option<(&Digest, &str)>) -> Result<Option<String>> {
        let mut url = self.url("blobs/uploads/");
        if let Some((d, from)) = mount {
            url.push_str(&format!("?mount={d}&from={from}"));
        }
        let r = self.send(Method::POST, &url, HeaderMap::new()).await?;
        match r.status() {
            StatusCode::CREATED if mount.is_some() => Ok(None),
            StatusCode::ACCEPTED | StatusCode::CREATED => {
                let loc = r
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| err(&self.name, "an upload answer without a Location"))?;
                Ok(Some(self.absolute(loc)))
            }
            _ => Err(self.status_error("POST blob upload", r).await),
        }
    }

    /// A Location header made absolute.
    pub fn absolute(&self, loc: &str) -> String {
        if loc.starts_with("http://") || loc.starts_with("https://") {
            loc.to_owned()
        } else {
            format!("{}{}", self.base, loc)
        }
    }

    /// Finishes an upload with the whole blob in one PUT (monolithic).
    pub async fn put_blob(&self, location: &str, digest: &Digest, size: u64, body: reqwest::Body) -> Result<()> {
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={digest}");
        let r = self
            .request(Method::PUT, &url)
            .await
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(body)
            .send()
            .await
            .map_err(|e| err(&self.name, cairn_net::with_causes(&e)))?;
        if r.status() != StatusCode::CREATED && !r.status().is_success() {
            return Err(self.status_error(&format!("PUT blob {digest}"), r).await);
        }
        Ok(())
    }

    /// Sends a blob in chunks of `chunk` bytes (PATCH with `Content-Range`, each answered with
    /// the next location), then finishes the upload with an empty PUT carrying the digest.
    pub async fn put_blob_chunked(
        &self,
        location: &str,
        digest: &Digest,
        mut f: impl tokio::io::AsyncRead + Unpin,
        size: u64,
        chunk: u64,
    ) -> Result<()> {
        use tokio::io::AsyncReadExt;
        let shown = format!("blob {digest}");
        let mut loc = location.to_owned();
        let mut offset = 0u64;
        while offset < size {
            let n = chunk.min(size - offset);
            let mut buf = vec![0u8; n as usize];
            f.read_exact(&mut buf).await.map_err(|source| ImageError::Io { path: shown.clone(), source })?;
            let r = self
                .request(Method::PATCH, &loc)
                .await
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(reqwest::header::CONTENT_RANGE, format!("{offset}-{}", offset + n - 1))
                .header(reqwest::header::CONTENT_LENGTH, n)
                .body(buf)
                .send()
                .await
                .map_err(|e| err(&self.name, cairn_net::with_causes(&e)))?;
            if r.status() != StatusCode::ACCEPTED {
                return Err(self.status_error(&format!("PATCH blob {digest} at {offset}"), r).await);
            }
            let next = r.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok());
            if let Some(next) = next {
                loc = self.absolute(next);
            }
            offset += n;
        }
        self.put_blob(&loc, digest, 0, reqwest::Body::from(Vec::new())).await
    }

    /// Puts a manifest's exact bytes under `reference` (a tag or its digest).
    pub async fn put_manifest(&self, reference: &str, media_type: &str, bytes: Vec<u8>) -> Result<()> {
        let r = self
            .request(Method::PUT, &self.url(&format!("manifests/{reference}")))
            .await
            .header(CONTENT_TYPE, media_type)
            .body(bytes)
            .send()
            .await
            .map_err(|e| err(&self.name, cairn_net::with_causes(&e)))?;
        if !r.status().is_success() {
            return Err(self.status_error(&format!("PUT manifest {reference}"), r).await);
        }
        Ok(())
    }
}

/// A response body read whole, refused past `limit` bytes.
async fn read_limited(r: reqwest::Response, limit: u64) -> std::result::Result<Vec<u8>, String> {
    if r.content_length().is_some_and(|n| n > limit) {
        return Err(format!("the answer is larger than {limit} bytes"));
    }
    let mut out = Vec::new();
    let mut s = r.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| cairn_net::with_causes(&e))?;
        if out.len() as u64 + chunk.len() as u64 > limit {
            return Err(format!("the answer is larger than {limit} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(c.params[2].1, "repository:a/b:pull");
        let b = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(b.scheme, "basic");
        let t = parse_challenge("Bearer realm=x, service=y").unwrap();
        assert_eq!(t.params, vec![("realm".into(), "x".into()), ("service".into(), "y".into())]);
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
        for junk in ["", "Bearer", "Bearer ===", "Bearer a=\"\\", "\u{0}"] {
            let _ = parse_challenge(junk);
        }
    }
}
