//! The `listen` address with `listen-auth-file`: the binary cache, the registry and pushes let
//! in only the users of the file, each with its scopes and repository prefixes — checked with
//! the clients users have: Nix 2.8 with `netrc-file`, skopeo with `--creds`, `cairn copy --to
//! tcp://` with `CAIRN_PUSH_TOKEN`, and curl for the status codes.

use std::path::Path;
use std::process::Command;

use cairn_tests::oci::{run_tool, umoci_image};
use cairn_tests::{free_port, line, require_peer, wait_listening, write, NixStore, TestStore};
use sha2::Digest as _;

fn sha(t: &str) -> String {
    sha2::Sha256::digest(t.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// curl's status code for a request (`-u NAME:TOKEN` if given), and the challenge if any.
fn curl(url: &str, method: &str, user: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-o", "/dev/null", "-D", "-", "-X", method, url]);
    if let Some(u) = user {
        c.args(["-u", u]);
    }
    let out = String::from_utf8(run_tool(&mut c)).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let challenge = out
        .lines()
        .find_map(|l| l.to_ascii_lowercase().starts_with("www-authenticate:").then(|| l.trim().to_owned()))
        .unwrap_or_default();
    (status, challenge)
}

fn skopeo(args: &[&str]) -> std::process::Output {
    Command::new("skopeo").args(args).output().unwrap()
}

#[test]
fn only_the_files_users_read_and_push_each_as_its_scopes_allow() {
    if !["nix", "skopeo", "umoci", "curl"].iter().all(|p| require_peer(p)) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!(
            "alice {} read,push team\nbob {} read  # reads only\nold {} read,push expires=2020-01-01T00:00:00Z\n\
             carol {} read,push\n",
            sha("alice-token"),
            sha("bob-token"),
            sha("old-token"),
            sha("carol-token")
        ),
    )
    .unwrap();
    let sender = TestStore::builder().store_dir("/nix/store").start();
    let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
    sender.ok(&["key", "generate", "auth-test-1", sk.to_str().unwrap(), pk.to_str().unwrap()]);
    let public = std::fs::read_to_string(&pk).unwrap().trim().to_owned();
    let port = free_port();
    let server = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!(
            "listen = \"127.0.0.1:{port}\"\naccept-pushes = true\ntrusted-public-keys = [\"{public}\"]\n\
             secret-key-files = [\"{}\"]\nlisten-auth-file = \"{}\"\n",
            sk.display(),
            users.display()
        ))
        .start();
    wait_listening(port);
    let base = format!("http://127.0.0.1:{port}");

    // Status codes: no credentials 401 with a Basic challenge; a reader may read, not push.
    let (status, challenge) = curl(&format!("{base}/nix-cache-info"), "GET", None);
    assert_eq!(status, 401);
    assert!(challenge.contains("Basic realm=\"cairn\""), "{challenge}");
    assert_eq!(curl(&format!("{base}/nix-cache-info"), "GET", Some("bob:bob-token")).0, 200);
    assert_eq!(curl(&format!("{base}/nix-cache-info"), "GET", Some("bob:alice-token")).0, 401);
    assert_eq!(curl(&format!("{base}/push"), "POST", Some("bob:bob-token")).0, 403);
    assert_eq!(curl(&format!("{base}/v2/"), "GET", None).0, 401);
    // An expired token is no token.
    assert_eq!(curl(&format!("{base}/nix-cache-info"), "GET", Some("old:old-token")).0, 401);
    assert_eq!(curl(&format!("{base}/push"), "POST", Some("old:old-token")).0, 401);

    // `cairn copy --to tcp://` pushes with a token that may push, and only with one.
    write(&dir.path().join("tree/data"), b"behind a token\n");
    let path = line(&sender.ok(&["add", dir.path().join("tree").to_str().unwrap()]));
    let to = format!("tcp://127.0.0.1:{port}");
    let push = |token: Option<&str>| {
        let mut c = sender.cairn();
        c.args(["copy", "--to", &to, "--secret-key-file", sk.to_str().unwrap(), &path]);
        match token {
            Some(t) => c.env("CAIRN_PUSH_TOKEN", t),
            None => c.env_remove("CAIRN_PUSH_TOKEN"),
        };
        c.output().unwrap()
    };
    let refused = push(None);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("authentication required"));
    let refused = push(Some("old-token"));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("the token of 'old' has expired"), "{refused:?}");
    let refused = push(Some("bob-token"));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("'bob' may not push"), "{refused:?}");
    assert!(!server.run(&["path-info", &path], b"").status.success(), "nothing was received");
    // A user limited to registry repositories may not use the cache at all.
    let refused = push(Some("alice-token"));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("may not use the binary cache"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!server.run(&["path-info", &path], b"").status.success(), "nothing was received");
    let pushed = push(Some("carol-token"));
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));
    assert!(server.run(&["path-info", &path], b"").status.success());

    // Nix 2.8 reads the cache with its netrc-file, and not without.
    let netrc = dir.path().join("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1 login bob password bob-token\n").unwrap();
    let nix = NixStore::new();
    let copy = |extra: &[&str]| {
        let mut c = nix.cmd("nix");
        c.args(["copy", "--from", &base, "--option", "trusted-public-keys", &public]).args(extra).arg(&path);
        c.output().unwrap()
    };
    assert!(!copy(&[]).status.success(), "no credentials, no copy");
    let out = copy(&["--option", "netrc-file", netrc.to_str().unwrap()]);
    assert!(out.status.success(), "nix copy with netrc: {}", String::from_utf8_lossy(&out.stderr));
    // So does another cairnd with the same netrc-file, and not without it.
    let reader = |with_netrc: bool| {
        let netrc_line = if with_netrc { format!("netrc-file = \"{}\"\n", netrc.display()) } else { String::new() };
        TestStore::builder()
            .store_dir("/nix/store")
            .config(&format!("substituters = [\"{base}\"]\ntrusted-public-keys = [\"{public}\"]\n{netrc_line}"))
            .start()
    };
    let without = reader(false);
    assert!(!without.run(&["substitute", &path], b"").status.success(), "no credentials, no substitution");
    let with = reader(true);
    assert_eq!(with.ok(&["substitute", &path]), format!("{path}\n"));

    // skopeo: alice pushes under her prefix only; bob pulls; nobody anonymous.
    let layout = dir.path().join("layout");
    umoci_image(&layout, "1", &[vec![("hello".to_owned(), b"hi\n".to_vec())]]);
    let src = format!("oci:{}:1", layout.display());
    let push_to = |repo: &str, creds: &str| {
        skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            creds,
            &src,
            &format!("docker://127.0.0.1:{port}/{repo}:1"),
        ])
    };
    let ok = push_to("team/app", "alice:alice-token");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let denied = push_to("other/app", "alice:alice-token");
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("403"), "{denied:?}");
    assert!(!push_to("team/app2", "bob:bob-token").status.success(), "bob only reads");
    let pulled = dir.path().join("pulled");
    let pull = |creds: Option<&str>| {
        let mut args = vec!["copy", "--src-tls-verify=false"];
        if let Some(c) = creds {
            args.extend(["--src-creds", c]);
        }
        let from = format!("docker://127.0.0.1:{port}/team/app:1");
        let to = format!("oci:{}:1", pulled.display());
        args.extend([from.as_str(), to.as_str()]);
        skopeo(&args)
    };
    assert!(!pull(None).status.success(), "no anonymous reads unless configured");
    assert!(!pull(Some("old:old-token")).status.success(), "no reads with an expired token");
    let got = pull(Some("bob:bob-token"));
    assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    assert!(Path::new(&pulled).join("index.json").exists());
}

#[test]
fn anonymous_reads_when_configured_but_never_anonymous_pushes() {
    if !require_peer("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(&users, format!("alice {} read,push\n", sha("alice-token"))).unwrap();
    let port = free_port();
    let _server = TestStore::builder()
        .config(&format!(
            "listen = \"127.0.0.1:{port}\"\naccept-pushes = true\nlisten-auth-file = \"{}\"\nlisten-anonymous-read = true\n",
            users.display()
        ))
        .start();
    wait_listening(port);
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(curl(&format!("{base}/nix-cache-info"), "GET", None).0, 200);
    assert_eq!(curl(&format!("{base}/v2/"), "GET", None).0, 200);
    assert_eq!(curl(&format!("{base}/push"), "POST", None).0, 401);
    assert_eq!(curl(&format!("{base}/v2/x/blobs/uploads/"), "POST", None).0, 401);
}

#[test]
fn a_bad_users_file_stops_the_daemon_at_start_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(&users, "alice not-a-hash read\n").unwrap();
    let out = Command::new(cairn_tests::bin_dir().join("cairnd"))
        .args(["--root", dir.path().to_str().unwrap(), "--socket", dir.path().join("s").to_str().unwrap()])
        .arg("--config")
        .arg({
            let c = dir.path().join("cairn.toml");
            std::fs::write(
                &c,
                format!("listen = \"127.0.0.1:{}\"\nlisten-auth-file = \"{}\"\n", free_port(), users.display()),
            )
            .unwrap();
            c
        })
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1") && err.contains("listen-auth-file"), "{err}");
}

/// A self-signed certificate for 127.0.0.1 (`cert.pem`, `key.pem` in `dir`), made by openssl.
fn self_signed(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    run_tool(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=cairn-test", "-addext", "subjectAltName=IP:127.0.0.1"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    (cert, key)
}

#[test]
fn the_listen_address_speaks_tls_to_nix_skopeo_and_curl_and_reloads_its_certificate_on_sighup() {
    if !["nix", "skopeo", "umoci", "curl", "openssl"].iter().all(|p| require_peer(p)) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "first");
    let users = dir.path().join("users");
    std::fs::write(&users, format!("alice {} read,push\n", sha("alice-token"))).unwrap();
    let signing = TestStore::builder().store_dir("/nix/store").start();
    let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
    signing.ok(&["key", "generate", "tls-test-1", sk.to_str().unwrap(), pk.to_str().unwrap()]);
    let public = std::fs::read_to_string(&pk).unwrap().trim().to_owned();
    let (live_cert, live_key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
    std::fs::copy(&cert, &live_cert).unwrap();
    std::fs::copy(&key, &live_key).unwrap();
    let port = free_port();
    let server = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!(
            "listen = \"127.0.0.1:{port}\"\naccept-pushes = true\nsecret-key-files = [\"{}\"]\nlisten-auth-file = \"{}\"\n\
             listen-tls-cert = \"{}\"\nlisten-tls-key = \"{}\"\n",
            sk.display(),
            users.display(),
            live_cert.display(),
            live_key.display()
        ))
        .start();
    wait_listening(port);
    let https = format!("https://127.0.0.1:{port}");
    let curl_tls = |ca: &Path| {
        Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", "alice:alice-token", "--cacert"])
            .arg(ca)
            .arg(format!("{https}/nix-cache-info"))
            .output()
            .unwrap()
    };
    let ok = curl_tls(&cert);
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "200", "{ok:?}");
    // A plaintext client to the TLS port gets no answer.
    let plain = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://127.0.0.1:{port}/nix-cache-info")])
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200", "plain HTTP is refused");

    // Nix 2.8 over HTTPS, trusting the certificate, with its netrc.
    write(&dir.path().join("tree/f"), b"over tls\n");
    let path = line(&server.ok(&["add", dir.path().join("tree").to_str().unwrap()]));
    let netrc = dir.path().join("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1 login alice password alice-token\n").unwrap();
    let nix = NixStore::new();
    let out = nix
        .cmd("nix")
        .args(["copy", "--from", &https, "--option", "trusted-public-keys", &public])
        .args(["--option", "netrc-file", netrc.to_str().unwrap()])
        .env("NIX_SSL_CERT_FILE", &cert)
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "nix copy over TLS: {}", String::from_utf8_lossy(&out.stderr));

    // skopeo over TLS with the certificate as its CA; refused without it.
    let layout = dir.path().join("layout");
    umoci_image(&layout, "1", &[vec![("hello".to_owned(), b"hi\n".to_vec())]]);
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&cert, certs.join("ca.crt")).unwrap();
    let src = format!("oci:{}:1", layout.display());
    let dest = format!("docker://127.0.0.1:{port}/tls/app:1");
    let with_ca =
        skopeo(&["copy", "--dest-cert-dir", certs.to_str().unwrap(), "--dest-creds", "alice:alice-token", &src, &dest]);
    assert!(with_ca.status.success(), "{}", String::from_utf8_lossy(&with_ca.stderr));
    assert!(!skopeo(&["copy", "--dest-creds", "alice:alice-token", &src, &dest]).status.success(), "an unknown CA");

    // A new certificate, then SIGHUP: the new one is served.
    let (cert2, key2) = self_signed(dir.path(), "second");
    std::fs::copy(&cert2, &live_cert).unwrap();
    std::fs::copy(&key2, &live_key).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.pid() as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    let started = std::time::Instant::now();
    while String::from_utf8_lossy(&curl_tls(&cert2).stdout) != "200" {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the new certificate is not served");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_ne!(String::from_utf8_lossy(&curl_tls(&cert).stdout), "200", "the old certificate is gone");
    // A broken pair on reload keeps the current one.
    std::fs::write(&live_key, b"not a key\n").unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.pid() as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(String::from_utf8_lossy(&curl_tls(&cert2).stdout), "200");
    assert!(server.log().contains("TLS certificate not reloaded"), "{}", server.log());
}

#[test]
fn untrusted_users_reach_only_the_allowed_registries() {
    if !["docker-registry", "skopeo", "umoci"].iter().all(|p| require_peer(p)) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let reg = cairn_tests::oci::DockerRegistry::start();
    let layout = dir.path().join("layout");
    umoci_image(&layout, "1", &[vec![("hello".to_owned(), b"hi\n".to_vec())]]);
    cairn_tests::oci::skopeo_copy(&format!("oci:{}:1", layout.display()), &format!("docker://{}/app:1", reg.host()));
    let source = format!("docker://{}/app:1", reg.host());
    let pull_as_nobody = |st: &TestStore| st.run_as_nobody(&["image", "pull", "--tls-verify=false", &source], b"");

    // By default an untrusted user cannot send the daemon to a registry; a trusted one can.
    let closed = TestStore::start();
    let out = pull_as_nobody(&closed);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in allowed-registries"), "{out:?}");
    closed.ok(&["image", "pull", "--tls-verify=false", &source]);
    // Once the registry is allowed, the untrusted user's pull works.
    let open = TestStore::builder().config(&format!("allowed-registries = [\"{}\"]\n", reg.host())).start();
    let out = pull_as_nobody(&open);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let other = open.run_as_nobody(
        &["image", "push", "--tls-verify=false", &format!("{}/app:1", reg.host()), "docker://127.0.0.1:1/elsewhere:1"],
        b"",
    );
    assert!(String::from_utf8_lossy(&other.stderr).contains("'127.0.0.1:1' is not in allowed-registries"), "{other:?}");
}
