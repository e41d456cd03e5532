//! OCI peers for the image tests: a real distribution registry (`docker-registry`), images built
//! with `umoci`, copies made with `skopeo`, and a raw HTTP/1.1 client for protocol tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use sha2::Digest as _;

use crate::{free_port, wait_listening};

/// `sha256:<hex>` of some bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&sha2::Sha256::digest(bytes)))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs a peer tool, panicking with its stderr on failure; returns stdout.
pub fn run_tool(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// A real distribution registry on loopback, its data in a temporary directory. Killed on drop.
pub struct DockerRegistry {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

impl DockerRegistry {
    /// An open registry.
    pub fn start() -> DockerRegistry {
        DockerRegistry::start_with_auth(None)
    }

    /// A registry that wants basic auth with `htpasswd` (lines `user:bcrypt-hash`).
    pub fn start_with_auth(htpasswd: Option<&str>) -> DockerRegistry {
        let dir = tempfile::Builder::new().prefix("registry-").tempdir().unwrap();
        let port = free_port();
        let auth = match htpasswd {
            Some(h) => {
                std::fs::write(dir.path().join("htpasswd"), h).unwrap();
                format!("auth: {{ htpasswd: {{ realm: cairn-test, path: {}/htpasswd }} }}\n", dir.path().display())
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog: {{ level: error }}\nstorage: {{ filesystem: {{ rootdirectory: {}/data }}, delete: {{ enabled: true }} }}\nhttp: {{ addr: 127.0.0.1:{port} }}\n{auth}",
            dir.path().display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .expect("docker-registry runs");
        wait_listening(port);
        DockerRegistry { dir, port, child }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds an OCI layout `DIR:TAG` with umoci, one layer per entry of `layers`, each layer a list
/// of `(path in the rootfs, contents)`.
pub fn umoci_image(dir: &Path, tag: &str, layers: &[Vec<(String, Vec<u8>)>]) {
    if !dir.join("index.json").exists() {
        run_tool(Command::new("umoci").args(["init", "--layout"]).arg(dir));
    }
    let image = format!("{}:{tag}", dir.display());
    run_tool(Command::new("umoci").args(["new", "--image", &image]));
    umoci_add_layers(dir, tag, layers);
}

/// Gives the image `DIR:FROM` the tag `TO` too.
pub fn umoci_tag(dir: &Path, from: &str, to: &str) {
    run_tool(Command::new("umoci").args(["tag", "--image", &format!("{}:{from}", dir.display()), to]));
}

/// Adds layers on top of the image `DIR:TAG` (its tag moves to the result).
pub fn umoci_add_layers(dir: &Path, tag: &str, layers: &[Vec<(String, Vec<u8>)>]) {
    let image = format!("{}:{tag}", dir.display());
    for files in layers {
        let bundle = tempfile::Builder::new().prefix("bundle-").tempdir().unwrap();
        let b = bundle.path().join("b");
        run_tool(Command::new("umoci").args(["unpack", "--rootless", "--image", &image]).arg(&b));
        for (path, contents) in files {
            let p = b.join("rootfs").join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, contents).unwrap();
        }
        run_tool(Command::new("umoci").args(["repack", "--image", &image]).arg(&b));
    }
}

/// Runs the bundle umoci unpacked (`config.json` and `rootfs/`) under runc, without a terminal,
/// as a container of its own (deleted after); asserts it succeeded and returns its stdout.
pub fn runc_run(bundle: &Path) -> String {
    let config = bundle.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap().replace("\"terminal\": true", "\"terminal\": false");
    std::fs::write(&config, text).unwrap();
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let id = format!("cairn-test-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let out = Command::new("runc").arg("run").arg(&id).current_dir(bundle).stdin(Stdio::null()).output().unwrap();
    let _ = Command::new("runc").args(["delete", "--force", &id]).output();
    assert!(out.status.success(), "runc: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `skopeo copy` between two transports (TLS checks off on both sides: loopback registries).
pub fn skopeo_copy(src: &str, dst: &str) {
    run_tool(Command::new("skopeo").args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false", src, dst]));
}

/// The raw manifest bytes skopeo reads from a source.
pub fn skopeo_raw(src: &str) -> Vec<u8> {
    run_tool(Command::new("skopeo").args(["inspect", "--tls-verify=false", "--raw", src]))
}

/// The digests of the blobs of an `oci:` layout directory, sorted.
pub fn layout_blobs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    v.sort();
    v
}

/// The bytes of a blob of an `oci:` layout.
pub fn layout_blob(dir: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))).unwrap()
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The first error code of a spec error body.
    pub fn error_code(&self) -> String {
        self.json()["errors"][0]["code"].as_str().unwrap_or("").to_owned()
    }
}

/// One HTTP/1.1 request to `127.0.0.1:port` (`Connection: close`); `path` may be a full
/// Location header value.
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let path = match path.strip_prefix("http://") {
        Some(rest) => &rest[rest.find('/').unwrap_or(rest.len())..],
        None => path,
    };
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // A server may answer a refused body (too large, say) before reading all of it and close the
    // connection: the rest of the write then fails, and the answer is still there to read.
    if let Err(e) = s.write_all(body) {
        assert!(
            matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset),
            "writing the request body: {e}"
        );
    }
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let mut body = Vec::new();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if method == "HEAD" || status == 204 || status == 304 {
    } else if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    Answer { status, headers, body }
}
