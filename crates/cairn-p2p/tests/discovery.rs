//! Local-network discovery: peers named by bare node ids find each other's addresses over mDNS
//! (iroh's discovery), in a network namespace the test makes (loopback only, with multicast),
//! so that nothing leaves this machine.

use std::process::Command;
use std::sync::Arc;

use cairn_nix::StoreDir;
use cairn_p2p::{Config, Node};
use cairn_store::peers::{PeerOffer, Peers, Wanted};
use cairn_store::{LocalStore, StoreLayout};

fn store(dir: &std::path::Path) -> Arc<LocalStore> {
    let layout = StoreLayout::under_root(dir, StoreDir::new("/store").unwrap());
    Arc::new(LocalStore::open(layout).unwrap())
}

/// Moves this thread (and the threads and processes it starts) into a new network namespace
/// whose loopback carries multicast. False if this machine does not allow it (not root).
fn own_network() -> bool {
    if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
        return false;
    }
    let ip = |args: &[&str]| Command::new("ip").args(args).status().is_ok_and(|s| s.success());
    ip(&["link", "set", "lo", "up", "multicast", "on"]) && ip(&["route", "add", "224.0.0.0/4", "dev", "lo"])
}

fn loopback() -> std::net::SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[test]
fn peers_named_by_node_id_alone_are_found_on_the_local_network() {
    if !own_network() {
        if std::env::var_os("CAIRN_REQUIRE_PEERS").is_some() {
            panic!("cannot make a network namespace (run as root with iproute2's ip)");
        }
        eprintln!("skipped: cannot make a network namespace");
        return;
    }
    // The runtime's threads start here, inside the namespace.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a_store = store(a_dir.path());
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let mut w = cairn_nix::nar::NarWriter::new(Vec::new()).unwrap();
        w.regular(None, false, data.len() as u64, &mut data.as_slice()).unwrap();
        let nar = w.finish().unwrap();
        let info = a_store.add_nar("found", nar.as_slice()).unwrap();
        // Keys first, so that each can name the other by id.
        let key = |dir: &std::path::Path, byte: u8| {
            std::fs::create_dir_all(dir.join("p2p")).unwrap();
            std::fs::write(dir.join("p2p/p2p-secret-key"), [byte; 32]).unwrap();
            iroh::SecretKey::from_bytes(&[byte; 32]).public()
        };
        let (a_id, b_id) = (key(a_dir.path(), 11), key(b_dir.path(), 12));
        let config = |dir: &std::path::Path, peer: iroh::NodeId| Config {
            listen: Some(loopback()),
            peers: vec![peer.to_string()],
            local_discovery: true,
            state_dir: dir.join("p2p"),
            max_transfers_per_peer: 4,
            upload_rate: 0,
            keys: Vec::new(),
        };
        let a = Node::start(config(a_dir.path(), b_id), a_store).await.unwrap();
        let b = Node::start(config(b_dir.path(), a_id), store(b_dir.path())).await.unwrap();
        let wanted = Wanted::Nar { path: info.path, nar_hash: info.nar_hash, nar_size: info.nar_size };
        // Announcements take a moment: ask until the peer is found (at most 30 s).
        let started = std::time::Instant::now();
        let reader = loop {
            if let PeerOffer::Bytes(r) = b.find(wanted.clone()).await {
                break r;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "never found: {:?}", b.status());
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        };
        let got = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut r = reader;
            std::io::Read::read_to_end(&mut r, &mut out).map(|_| out)
        })
        .await
        .unwrap()
        .unwrap();
        assert!(got == nar, "the NAR came from the discovered peer");
        let status = b.status();
        assert!(status.peers[0].addresses.iter().any(|a| a.ends_with("(discovered)")), "{status:?}");
        a.shutdown().await;
        b.shutdown().await;
    });
}
