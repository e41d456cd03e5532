//! A real Garage (S3-compatible object storage) for the S3 binary-cache tests: one node on
//! loopback ports, a bucket (also served as a website) and a key allowed on it. Needs `garage`
//! on PATH (`.ci/run` installs it).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, wait_listening, Rng};

pub const BUCKET: &str = "nix-cache";

/// A one-node Garage with a bucket (readable as a website too) and a key allowed on it; the
/// server is killed when this is dropped, also when a test panics.
pub struct Garage {
    dir: tempfile::TempDir,
    config: PathBuf,
    child: Child,
    pub s3_port: u16,
    pub web_port: u16,
    pub key_id: String,
    pub secret: String,
}

impl Garage {
    pub fn start() -> Garage {
        let dir = tempfile::Builder::new().prefix("garage-").tempdir().unwrap();
        let (rpc, s3, web, admin) = (free_port(), free_port(), free_port(), free_port());
        let seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64 ^ rpc as u64;
        let rpc_secret: String = Rng::new(seed).bytes(32).iter().map(|b| format!("{b:02x}")).collect();
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{rpc_secret}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\
                 [s3_web]\nbind_addr = \"127.0.0.1:{web}\"\nroot_domain = \".web.garage.localhost\"\n\
                 index = \"index.html\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\nadmin_token = \"cairn-test-admin\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new("garage")
            .arg("-c")
            .arg(&config)
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start garage");
        // From here on the guard owns the server: any panic below kills it.
        let mut g =
            Garage { dir, config, child, s3_port: s3, web_port: web, key_id: String::new(), secret: String::new() };
        let started = Instant::now();
        let node = loop {
            let out = g.cmd(&["node", "id", "-q"]);
            if out.status.success() {
                break String::from_utf8_lossy(&out.stdout).trim().split('@').next().unwrap().to_owned();
            }
            if let Some(status) = g.child.try_wait().unwrap() {
                panic!("garage exited ({status}):\n{}", g.log());
            }
            assert!(started.elapsed() < Duration::from_secs(30), "garage did not start:\n{}", g.log());
            std::thread::sleep(Duration::from_millis(100));
        };
        for port in [rpc, s3, web] {
            wait_listening(port);
        }
        let started = Instant::now();
        while !g.cmd(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]).status.success() {
            assert!(started.elapsed() < Duration::from_secs(30), "garage layout assign kept failing:\n{}", g.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        g.ok(&["layout", "apply", "--version", "1"]);
        g.ok(&["bucket", "create", BUCKET]);
        g.ok(&["bucket", "website", "--allow", BUCKET]);
        let key = g.ok(&["key", "create", "cairn-tests"]);
        let field = |name: &str| -> String {
            key.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| panic!("no '{name}' in garage's key output:\n{key}"))
        };
        g.key_id = field("Key ID:");
        g.secret = field("Secret key:");
        assert!(g.key_id.starts_with("GK") && g.secret.len() == 64, "{key}");
        g.ok(&["bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "cairn-tests"]);
        g
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        Command::new("garage").arg("-c").arg(&self.config).args(args).stdin(Stdio::null()).output().unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(out.status.success(), "garage {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The cache URL for cairn (an optional key prefix and extra parameters).
    pub fn url(&self, prefix: &str, extra: &str) -> String {
        format!("s3://{BUCKET}{prefix}?endpoint=http://127.0.0.1:{}&region=garage{extra}", self.s3_port)
    }

    /// The bucket as plain HTTP (Garage's website endpoint, the bucket named in the host).
    pub fn web_url(&self, prefix: &str) -> String {
        format!("http://{BUCKET}.web.garage.localhost:{}{prefix}", self.web_port)
    }

    /// Waits until the bucket holds `n` objects (Garage counts them in the background).
    pub fn wait_objects(&self, n: u64) {
        let started = Instant::now();
        loop {
            let info = self.ok(&["bucket", "info", BUCKET]);
            let count = info.lines().find_map(|l| l.trim().strip_prefix("Objects:")).map(|v| v.trim().parse::<u64>());
            if let Some(Ok(c)) = count {
                if c == n {
                    return;
                }
                assert!(started.elapsed() < Duration::from_secs(15), "bucket has {c} objects, expected {n}:\n{info}");
            } else {
                panic!("no object count in:\n{info}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
