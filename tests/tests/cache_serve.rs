//! cairnd's `listen` address serves the store as a Nix binary cache: real Nix 2.8 substitutes
//! from it with the cairn key trusted (and refuses without), another cairnd substitutes from it,
//! ranges return exactly the NAR's bytes, and nothing outside the store can be reached.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

use cairn_e2e::{
    free_port, line, path_info_summary as infos, require_peer, wait_listening, write, NixStore, TestStore,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One HTTP/1.1 GET; returns (status, headers, body).
fn get(port: u16, target: &str, extra: &str) -> (u16, String, Vec<u8>) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(c, "GET {target} HTTP/1.1\r\nHost: cache\r\nConnection: close\r\n{extra}\r\n").unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = raw[end + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, head, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + n]);
        b = &b[nl + 2 + n + 2..];
    }
}

#[test]
fn nix_and_cairn_substitute_from_cairnds_binary_cache() {
    if !require_peer("nix-store") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Keys, and a closure without content addresses (imported), which needs signatures.
    let seed = TestStore::builder().store_dir("/nix/store").start();
    let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
    seed.ok(&["key", "generate", "cairn-serve-1", s(&sk), s(&pk)]);
    let public = std::fs::read_to_string(&pk).unwrap();
    write(&dir.path().join("tree/bin/tool"), b"#!/bin/sh\necho tool\n");
    write(&dir.path().join("tree/data"), &(0..200_000u32).flat_map(|i| i.to_le_bytes()).collect::<Vec<_>>());
    let tree = line(&seed.ok(&["add", s(&dir.path().join("tree"))]));
    write(&dir.path().join("note"), format!("uses {tree}\n").as_bytes());
    let top = line(&seed.ok(&["add-text", "note", s(&dir.path().join("note")), "--ref", &tree]));
    let stream = seed.ok_bytes(&["export", &tree, &top], b"");

    let port = free_port();
    let st = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!("listen = \"127.0.0.1:{port}\"\nsecret-key-files = [\"{}\"]", s(&sk)))
        .start();
    st.ok_bytes(&["import"], &stream);
    wait_listening(port);
    let url = format!("http://127.0.0.1:{port}");

    // Real Nix with the key trusted: the closure arrives identical.
    let nix = NixStore::new();
    nix.ok("nix", &["copy", "--from", &url, "--option", "trusted-public-keys", public.trim(), &top]);
    let ours = infos(&st.ok_bytes(&["path-info", "--json", "--closure", &top], b""));
    let theirs = infos(&nix.ok("nix", &["path-info", "--json", "--recursive", &top]));
    assert_eq!(ours, theirs);
    assert_eq!(ours.len(), 2);
    // Without it, refused.
    let other = NixStore::new();
    let out = other
        .cmd("nix")
        .args([
            "copy",
            "--from",
            &url,
            "--option",
            "trusted-public-keys",
            "x-1:up1w+p9hbiFiyds3XlVGeZ3VPMC2rkO4TNTtYkEN+Qo=",
            &top,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lacks a valid signature"));

    // Another cairnd substitutes from it too.
    let peer = TestStore::builder()
        .store_dir("/nix/store")
        .config(&format!("substituters = [\"{url}\"]\ntrusted-public-keys = [\"{}\"]", public.trim()))
        .start();
    assert_eq!(peer.ok(&["substitute", &top]), format!("{top}\n"));
    assert_eq!(infos(&peer.ok_bytes(&["path-info", "--json", "--closure", &top], b"")), ours);

    // The protocol, by hand.
    let (status, _, body) = get(port, "/nix-cache-info", "");
    assert_eq!(
        (status, String::from_utf8(body).unwrap()),
        (200, "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n".into())
    );
    let (status, _, narinfo) = get(port, &format!("/{}.narinfo", &tree[11..43]), "");
    assert_eq!(status, 200);
    let narinfo = String::from_utf8(narinfo).unwrap();
    assert!(narinfo.contains(&format!("StorePath: {tree}\n")) && narinfo.contains("Sig: cairn-serve-1:"), "{narinfo}");
    let nar_url = narinfo.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
    assert!(nar_url.ends_with(".nar.zst"), "{nar_url}");
    let nar = st.ok_bytes(&["nar", "dump", &tree], b"");
    let (status, _, zst) = get(port, &format!("/{nar_url}"), "");
    assert_eq!(status, 200);
    assert_eq!(zstd::stream::decode_all(&zst[..]).unwrap(), nar);
    let plain = format!("/{}", nar_url.trim_end_matches(".zst"));
    let (status, head, whole) = get(port, &plain, "");
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("accept-ranges: bytes"), "{head}");
    assert_eq!(whole, nar);
    let (status, head, part) = get(port, &plain, "Range: bytes=1000-4999\r\n");
    assert_eq!(status, 206);
    assert!(head.contains(&format!("bytes 1000-4999/{}", nar.len())), "{head}");
    assert_eq!(part, &nar[1000..5000]);
    let (status, _, tail) = get(port, &plain, "Range: bytes=-100\r\n");
    assert_eq!((status, &tail[..]), (206, &nar[nar.len() - 100..]));
    let (status, _, _) = get(port, &plain, &format!("Range: bytes={}-\r\n", nar.len()));
    assert_eq!(status, 416);

    // Nothing else is reachable.
    for target in [
        "/0000000000000000000000000000000a.narinfo".to_owned(),
        "/../../etc/passwd".into(),
        "/nar/..%2f..%2fetc%2fpasswd".into(),
        "/nar/%2e%2e/%2e%2e/etc/passwd".into(),
        "/etc/passwd".into(),
        format!("/{}.narinfo", &tree[11..42]),
        format!("/{}EE.narinfo", &tree[11..42]),
        // A NAR URL whose hash is not the path's.
        format!("/nar/{}-{}.nar", &tree[11..43], "0".repeat(52)),
        "/nar/x.nar".into(),
    ] {
        let (status, _, body) = get(port, &target, "");
        assert_eq!(status, 404, "{target}");
        assert!(!String::from_utf8_lossy(&body).contains("root:"), "{target}");
    }
}
