//! Who may use the `listen` address (binary cache, registry, pushes), when `listen-auth-file`
//! is set: every request is checked here before its handler runs, so no body is read for a
//! client that may not send it.
//!
//! The file has one user per line (`#` starts a comment):
//!
//! ```text
//! NAME  SHA256-OF-TOKEN  SCOPES  [PREFIX,…]  [expires=TIME]
//! ```
//!
//! `SCOPES` is `read`, `push` or `read,push` (push includes read: a client uploading asks first
//! what is there). `PREFIX`es limit the user to those registry repositories (`team` allows
//! `team` and `team/…`; the catalog lists only them) and keep them from the binary cache, whose
//! paths belong to no repository and include every image's blobs; none means all. `expires=` (an RFC 3339 time, `2027-01-31T00:00:00Z`)
//! ends the token's validity: from then on it is refused as no token at all (401), so that a
//! token handed out for a while cannot be forgotten in the file. The token itself is never
//! stored, only its SHA-256 in hex (`printf %s "$TOKEN" | sha256sum`).
//!
//! A client authenticates with HTTP basic auth (`NAME:TOKEN`: `skopeo --creds`, Nix's
//! `netrc-file`, docker's login) or a bearer token (`Authorization: Bearer TOKEN`: `cairn copy`,
//! curl). Without credentials a request is refused with 401 and a `Basic` challenge, unless it
//! only reads and `listen-anonymous-read` is set; with credentials that do not allow what it
//! asks, 403. GET and HEAD read; every other method pushes.

use std::sync::Arc;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::registry::{covers, Visible};

/// The users of the `listen` address.
#[derive(Debug)]
pub struct ListenAuth {
    pub(crate) users: Vec<User>,
    pub(crate) anonymous_read: bool,
}

#[derive(Debug)]
pub(crate) struct User {
    pub(crate) name: String,
    token_sha256: [u8; 32],
    push: bool,
    prefixes: Vec<String>,
    expires: Option<std::time::SystemTime>,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Read,
    Push,
}

impl ListenAuth {
    /// Reads the users file; a bad line is an error naming it.
    pub fn load(path: &std::path::Path, anonymous_read: bool) -> anyhow::Result<ListenAuth> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read '{}'", path.display()))?;
        let users = ListenAuth::parse(&text)
            .with_context(|| format!("'{}' (listen-auth-file in the config)", path.display()))?;
        Ok(ListenAuth { users, anonymous_read })
    }

    pub(crate) fn parse(text: &str) -> anyhow::Result<Vec<User>> {
        let mut users = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: &str| {
                anyhow::anyhow!(
                    "line {}: {why} (expected NAME SHA256-OF-TOKEN SCOPES [PREFIX,…] [expires=TIME])",
                    i + 1
                )
            };
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (name, hash, scopes, rest) = match cols.as_slice() {
                [n, h, s, rest @ ..] if rest.len() <= 2 => (*n, *h, *s, rest),
                _ => return Err(bad("wrong number of columns")),
            };
            let mut prefixes: Option<Vec<String>> = None;
            let mut expires = None;
            for col in rest {
                if let Some(t) = col.strip_prefix("expires=") {
                    let when = humantime::parse_rfc3339_weak(t)
                        .map_err(|e| bad(&format!("'{t}' is not a time like 2027-01-31T00:00:00Z: {e}")))?;
                    if expires.replace(when).is_some() {
                        return Err(bad("expires= given twice"));
                    }
                } else if prefixes.is_none() {
                    prefixes = Some(col.split(',').filter(|x| !x.is_empty()).map(str::to_owned).collect());
                } else {
                    return Err(bad("wrong number of columns"));
                }
            }
            let mut token_sha256 = [0u8; 32];
            let bytes = (0..hash.len())
                .step_by(2)
                .map(|k| hash.get(k..k + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
                .collect::<Option<Vec<u8>>>()
                .filter(|b| b.len() == 32)
                .ok_or_else(|| bad("the token's SHA-256 is not 64 hex digits"))?;
            token_sha256.copy_from_slice(&bytes);
            let mut push = false;
            for s in scopes.split(',') {
                match s {
                    "read" => {}
                    "push" => push = true,
                    other => return Err(bad(&format!("unknown scope '{other}' (read, push)"))),
                }
            }
            users.push(User {
                name: name.to_owned(),
                token_sha256,
                push,
                prefixes: prefixes.unwrap_or_default(),
                expires,
            });
        }
        Ok(users)
    }

    /// The user whose credentials these are, if any.
    pub(crate) fn identify(&self, authorization: Option<&HeaderValue>) -> Option<&User> {
        let value = authorization?.to_str().ok()?;
        let (name, token) = if let Some(b64) = value.strip_prefix("Basic ") {
            let decoded = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (n, t) = text.split_once(':')?;
            (Some(n.to_owned()), t.to_owned())
        } else {
            (None, value.strip_prefix("Bearer ")?.trim().to_owned())
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every user compared, each comparison over all bytes: no early exit to time.
        let mut found = None;
        for u in &self.users {
            let same = u.token_sha256.iter().zip(&digest).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
            if same && name.as_deref().is_none_or(|n| n == u.name) && found.is_none() {
                found = Some(u);
            }
        }
        found
    }
}

impl User {
    fn expired_at(&self, now: std::time::SystemTime) -> bool {
        self.expires.is_some_and(|t| t <= now)
    }
}

/// The registry repository a `/v2/NAME/…` request acts on. The path is percent-decoded as axum
/// decodes the registry's `{*rest}` parameter and split by the registry's own `route`, so that
/// this check and the handler cannot read different names from one path (a `%2F` hiding a
/// `/manifests/` from one of them, a route the other does not know).
pub(crate) fn repository(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v2/")?;
    let decoded = percent_encoding::percent_decode_str(rest).decode_utf8().ok()?;
    super::registry::route(&decoded)?.repository().map(str::to_owned)
}

/// What a request's path reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target<'a> {
    /// A registry repository.
    Repository(&'a str),
    /// The registry as a whole: `/v2/` and the catalog (filtered by [`Visible`]).
    Registry,
    /// Anything else: the binary cache, whose paths belong to no repository.
    Other,
}

fn allows(user: &User, scope: Scope, target: Target<'_>) -> bool {
    if scope == Scope::Push && !user.push {
        return false;
    }
    match target {
        Target::Repository(r) => covers(&user.prefixes, r),
        Target::Registry => true,
        // A user limited to repositories is limited to the registry: every store path (image
        // blobs included) is reachable through the cache by its name.
        Target::Other => user.prefixes.is_empty(),
    }
}

/// A mount (`POST …/blobs/uploads/?mount=D&from=R`) from a repository the user may not read
/// becomes a plain upload start: the mount's answer would tell them whether `R` holds `D`.
fn without_unreadable_mount(req: &mut Request<Body>, user: &User) {
    let Some(query) = req.uri().query() else { return };
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    // Every `from` is checked: the registry takes the last of several, this check the first.
    let mut froms = pairs.iter().filter(|(k, _)| k == "from").peekable();
    if froms.peek().is_none() || froms.all(|(_, from)| allows(user, Scope::Read, Target::Repository(from))) {
        return;
    }
    let kept: Vec<&(String, String)> = pairs.iter().filter(|(k, _)| k != "from" && k != "mount").collect();
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in kept {
        q.append_pair(k, v);
    }
    let q = q.finish();
    let path = req.uri().path().to_owned();
    let uri = if q.is_empty() { path } else { format!("{path}?{q}") };
    if let Ok(uri) = uri.parse() {
        *req.uri_mut() = uri;
    }
}

/// A refusal, in the registry's error format on `/v2/` paths.
fn refuse(status: StatusCode, registry: bool, message: &str) -> Response {
    let code = if status == StatusCode::UNAUTHORIZED { "UNAUTHORIZED" } else { "DENIED" };
    let mut resp = if registry {
        let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] }).to_string();
        (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    } else {
        (status, format!("{message}\n")).into_response()
    };
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"cairn\""));
    }
    resp
}

/// Whether `path` is the registry's (`/v2`, `/v2/…`), not the binary cache's: a narinfo whose
/// hash starts with "v2" (`/v2….narinfo`) is the cache's.
fn is_registry_path(path: &str) -> bool {
    path == "/v2" || path.starts_with("/v2/")
}

/// Checks a request against the users before its handler runs.
pub async fn check(State(auth): State<Arc<ListenAuth>>, mut req: Request<Body>, next: Next) -> Response {
    let scope = if req.method() == Method::GET || req.method() == Method::HEAD { Scope::Read } else { Scope::Push };
    let path = req.uri().path().to_owned();
    let registry = is_registry_path(&path);
    let repo = repository(&path);
    let repo = repo.as_deref();
    let target = match repo {
        Some(r) => Target::Repository(r),
        None if registry => Target::Registry,
        None => Target::Other,
    };
    match auth.identify(req.headers().get(header::AUTHORIZATION)) {
        Some(user) if user.expired_at(std::time::SystemTime::now()) => {
            tracing::info!(user = user.name, path, "listen: refused (token expired)");
            refuse(StatusCode::UNAUTHORIZED, registry, &format!("the token of '{}' has expired", user.name))
        }
        Some(user) if allows(user, scope, target) => {
            if repo.is_some() && req.method() == Method::POST {
                without_unreadable_mount(&mut req, user);
            }
            req.extensions_mut().insert(Visible::new(user.prefixes.clone()));
            next.run(req).await
        }
        Some(user) => {
            tracing::info!(user = user.name, path, ?scope, "listen: refused (scope or repository)");
            let what = match (scope, repo) {
                (_, None) if target == Target::Other && !user.prefixes.is_empty() => format!(
                    "'{}' is limited to the registry repositories {} and may not use the binary cache",
                    user.name,
                    user.prefixes.join(", ")
                ),
                (Scope::Push, Some(r)) => format!("'{}' may not push to '{r}'", user.name),
                (Scope::Push, None) => format!("'{}' may not push", user.name),
                (Scope::Read, Some(r)) => format!("'{}' may not read '{r}'", user.name),
                (Scope::Read, None) => format!("'{}' may not read", user.name),
            };
            refuse(StatusCode::FORBIDDEN, registry, &what)
        }
        None if scope == Scope::Read && auth.anonymous_read => next.run(req).await,
        None => refuse(StatusCode::UNAUTHORIZED, registry, "authentication required"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(t: &str) -> String {
        Sha256::digest(t.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }

    fn auth() -> ListenAuth {
        let text =
            format!("# users\nalice {} read,push team,shared/x\nbob {} read\n", sha("alice-token"), sha("bob-token"));
        ListenAuth { users: ListenAuth::parse(&text).unwrap(), anonymous_read: false }
    }

    fn basic(name: &str, token: &str) -> HeaderValue {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{name}:{token}"));
        HeaderValue::from_str(&format!("Basic {b}")).unwrap()
    }

    #[test]
    fn users_are_known_by_basic_credentials_or_a_bearer_token() {
        let a = auth();
        assert_eq!(a.identify(Some(&basic("alice", "alice-token"))).map(|u| u.name.as_str()), Some("alice"));
        assert_eq!(
            a.identify(Some(&HeaderValue::from_static("Bearer bob-token"))).map(|u| u.name.as_str()),
            Some("bob")
        );
        assert!(a.identify(Some(&basic("bob", "alice-token"))).is_none(), "the name must match the token");
        assert!(a.identify(Some(&basic("alice", "wrong"))).is_none());
        assert!(a.identify(Some(&HeaderValue::from_static("Basic !!!"))).is_none());
        assert!(a.identify(None).is_none());
    }

    #[test]
    fn scopes_and_repository_prefixes_decide() {
        let a = auth();
        let (alice, bob) = (&a.users[0], &a.users[1]);
        let may = |u, scope, p: &str| {
            let repo = repository(p);
            let target = match repo.as_deref() {
                Some(r) => Target::Repository(r),
                None if is_registry_path(p) => Target::Registry,
                None => Target::Other,
            };
            allows(u, scope, target)
        };
        assert!(may(alice, Scope::Push, "/v2/team/app/blobs/uploads/"));
        assert!(may(alice, Scope::Read, "/v2/shared/x/y/manifests/1"));
        assert!(!may(alice, Scope::Push, "/v2/teams/app/manifests/1"), "a prefix is a whole name");
        assert!(!may(alice, Scope::Read, "/v2/other/manifests/1"));
        assert!(may(alice, Scope::Read, "/v2/") && may(alice, Scope::Read, "/v2/_catalog"));
        // A narinfo whose hash starts with "v2" is the cache's, as every other narinfo.
        assert!(!may(alice, Scope::Read, "/v2m7imk2aaaaaaaaaaaaaaaaaaaaaaaaaaa.narinfo"));
        // The cache serves every store path, image blobs included, by name: not for a user
        // limited to some repositories.
        assert!(!may(alice, Scope::Read, "/nix-cache-info"), "cache routes belong to no repository");
        assert!(!may(alice, Scope::Push, "/push"));
        assert!(may(bob, Scope::Read, "/nix-cache-info") && may(bob, Scope::Read, "/x.narinfo"));
        assert!(may(bob, Scope::Read, "/v2/other/manifests/1"));
        assert!(!may(bob, Scope::Push, "/v2/other/manifests/1"));
        assert!(
            Visible::new(vec!["team".into()]).shows("team/app") && !Visible::new(vec!["team".into()]).shows("other")
        );
        assert!(Visible::default().shows("other"));
        assert_eq!(repository("/v2/a/b/tags/list").as_deref(), Some("a/b"));
        assert_eq!(repository("/v2/").as_deref(), None);
    }

    /// The check read the raw path and stopped at its first `/manifests/`, `/blobs/` or
    /// `/tags/`, the handler the percent-decoded one at its last keyword, `/referrers/`
    /// included: a `%2F`, a route the check did not know or a decoded escape made them name
    /// different repositories, and a user limited to a prefix reached (and pushed to) others.
    /// The first path is the fuzzer's (`http_requests`).
    #[test]
    fn prefixes_hold_whatever_the_path_encoding() {
        let a = auth();
        let alice = &a.users[0];
        let fuzzed =
            "/v2/v2tccc3333333333333333333333333%33333333333333333333333333333333333333333c2/teapp/manifests/cc";
        assert_eq!(
            repository(fuzzed).as_deref(),
            Some("v2tccc33333333333333333333333333333333333333333333333333333333333333333c2/teapp")
        );
        for (path, named) in [
            ("/v2/secret/manifests%2Flatest", "secret"),
            ("/v2/secret%2Fmanifests%2Flatest", "secret"),
            ("/v2/secret/blobs%2Fuploads%2F", "secret"),
            ("/v2/secret/referrers/sha256:00", "secret"),
            ("/v2/%73ecret/manifests/1", "secret"),
        ] {
            assert_eq!(repository(path).as_deref(), Some(named), "{path}");
            let repo = repository(path);
            assert!(!allows(alice, Scope::Read, Target::Repository(repo.as_deref().unwrap())), "{path}");
        }
    }

    #[test]
    fn a_mount_from_a_repository_the_user_may_not_read_becomes_a_plain_upload() {
        let a = auth();
        let alice = &a.users[0];
        let post = |q: &str| {
            let mut req = Request::builder()
                .method(Method::POST)
                .uri(format!("/v2/team/app/blobs/uploads/?{q}"))
                .body(Body::empty())
                .unwrap();
            without_unreadable_mount(&mut req, alice);
            req.uri().to_string()
        };
        assert_eq!(post("mount=sha256:00&from=secret/app"), "/v2/team/app/blobs/uploads/");
        assert_eq!(
            post("from=secret%2Fapp&mount=sha256:00&digest=sha256:11"),
            "/v2/team/app/blobs/uploads/?digest=sha256%3A11"
        );
        assert_eq!(
            post("mount=sha256:00&from=team/base"),
            "/v2/team/app/blobs/uploads/?mount=sha256:00&from=team/base",
            "a readable one is left alone"
        );
    }

    #[test]
    fn bad_lines_are_refused_naming_them() {
        for (text, why) in [
            ("alice abc read", "64 hex"),
            ("alice", "columns"),
            (&*format!("alice {} write", sha("x")), "unknown scope 'write'"),
            (&*format!("alice {} read expires=tomorrow", sha("x")), "'tomorrow' is not a time"),
            (&*format!("alice {} read a b expires=2030-01-01T00:00:00Z", sha("x")), "columns"),
            (&*format!("alice {} read expires=2030-01-01T00:00:00Z expires=2031-01-01T00:00:00Z", sha("x")), "twice"),
        ] {
            let e = ListenAuth::parse(text).unwrap_err().to_string();
            assert!(e.contains("line 1") && e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn a_token_expires_at_its_time_and_prefixes_may_come_before_or_after() {
        let text = format!(
            "old {} read,push team expires=2020-01-01T00:00:00Z\nnew {} read expires=2999-01-01T00:00:00Z team\nforever {} read\n",
            sha("o"),
            sha("n"),
            sha("f")
        );
        let users = ListenAuth::parse(&text).unwrap();
        let now = std::time::SystemTime::now();
        assert!(users[0].expired_at(now) && users[0].prefixes == ["team"]);
        assert!(!users[1].expired_at(now) && users[1].prefixes == ["team"]);
        assert!(users[1].expired_at(humantime::parse_rfc3339("2999-01-01T00:00:00Z").unwrap()), "expired at its time");
        assert!(!users[2].expired_at(now) && users[2].expires.is_none());
    }
}
