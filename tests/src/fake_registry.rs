//! A registry written for tests, std only: it serves what a test puts in its state — including
//! lies (blobs that are not their digest, manifests naming absent blobs) — and can want bearer
//! tokens from its own token endpoint, with or without credentials.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

pub const TOKEN: &str = "tok-4711";

#[derive(Default)]
pub struct FakeState {
    /// `repo/ref` → (content type, bytes).
    pub manifests: HashMap<String, (String, Vec<u8>)>,
    /// digest → bytes served (which may not be the digest's).
    pub blobs: HashMap<String, Vec<u8>>,
    /// Basic credentials the token endpoint wants; with `anonymous`, tokens without them too.
    pub creds: Option<(String, String)>,
    pub anonymous: bool,
    pub token_queries: Vec<String>,
    /// Digests of the blobs sent (`GET`s answered with a body), in order.
    pub blobs_sent: Vec<String>,
}

pub struct Fake {
    pub port: u16,
    pub state: Arc<Mutex<FakeState>>,
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

impl Fake {
    /// Serves `state` on a free loopback port until the process ends.
    pub fn start(state: FakeState) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(state));
        let st = state.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || serve(c, port, &st));
            }
        });
        Fake { port, state }
    }

    /// `docker://127.0.0.1:PORT/hostile/app`.
    pub fn image(&self) -> String {
        format!("docker://127.0.0.1:{}/hostile/app", self.port)
    }
}

fn respond(c: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut h = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    let _ = c.write_all(h.as_bytes());
    let _ = c.write_all(body);
}

fn serve(mut c: TcpStream, port: u16, st: &Mutex<FakeState>) {
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned());
    let mut auth = String::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = v.trim().to_owned();
            }
        }
    }
    let st = &mut *st.lock().unwrap();
    let wants_auth = st.creds.is_some() || st.anonymous;
    if let Some(q) = target.strip_prefix("/token?") {
        st.token_queries.push(q.to_owned());
        let ok = st.anonymous
            || st.creds.as_ref().is_some_and(|(u, p)| auth == format!("Basic {}", b64(&format!("{u}:{p}"))));
        if ok {
            respond(
                &mut c,
                "200 OK",
                &[("Content-Type", "application/json".into())],
                format!(r#"{{"token":"{TOKEN}"}}"#).as_bytes(),
            );
        } else {
            respond(&mut c, "401 Unauthorized", &[], b"{}");
        }
        return;
    }
    if wants_auth && auth != format!("Bearer {TOKEN}") {
        let challenge = format!(
            r#"Bearer realm="http://127.0.0.1:{port}/token",service="fake.test",scope="repository:hostile/app:pull""#
        );
        respond(
            &mut c,
            "401 Unauthorized",
            &[("WWW-Authenticate", challenge)],
            br#"{"errors":[{"code":"UNAUTHORIZED","message":"token"}]}"#,
        );
        return;
    }
    let head = method == "HEAD";
    let path = target.split('?').next().unwrap_or("");
    if path == "/v2/" {
        respond(&mut c, "200 OK", &[], b"{}");
    } else if let Some((repo, r)) = path.strip_prefix("/v2/").and_then(|p| p.rsplit_once("/manifests/")) {
        match st.manifests.get(&format!("{repo}/{r}")) {
            Some((ct, bytes)) => {
                let body: &[u8] = if head { b"" } else { bytes };
                respond(&mut c, "200 OK", &[("Content-Type", ct.clone())], body)
            }
            None => {
                respond(&mut c, "404 Not Found", &[], br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}"#)
            }
        }
    } else if let Some((_, d)) = path.strip_prefix("/v2/").and_then(|p| p.rsplit_once("/blobs/")) {
        match st.blobs.get(d).cloned() {
            Some(bytes) => {
                if !head {
                    st.blobs_sent.push(d.to_owned());
                }
                respond(&mut c, "200 OK", &[], &bytes)
            }
            None => respond(&mut c, "404 Not Found", &[], br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}"#),
        }
    } else {
        respond(&mut c, "404 Not Found", &[], b"");
    }
}
