//! Nodes on loopback: a store path's NAR travels from one node's store to another's reader,
//! verified; a peer that lies is caught and dropped, and the transfer continues from another
//! peer where the liar's verified bytes ended.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

use bao_tree::io::outboard::PostOrderMemOutboard;
use bao_tree::ChunkRanges;
use cairn_nix::{Hash, StoreDir, StorePath};
use cairn_p2p::lookup::{self, Answer};
use cairn_p2p::{Config, Node};
use cairn_store::peers::{PeerOffer, Peers, Wanted};
use cairn_store::{LocalStore, StoreLayout};
use iroh::endpoint::Connection;
use iroh::protocol::{ProtocolHandler, Router};
use iroh::{Endpoint, RelayMode, SecretKey};
use iroh_blobs::IROH_BLOCK_SIZE;

fn store(dir: &std::path::Path) -> Arc<LocalStore> {
    let layout = StoreLayout::under_root(dir, StoreDir::new("/store").unwrap());
    Arc::new(LocalStore::open(layout).unwrap())
}

/// A store holding one path whose NAR is a little over `size` bytes of varied contents.
fn store_with_a_path(dir: &std::path::Path, size: usize) -> (Arc<LocalStore>, StorePath, Hash, u64, Vec<u8>) {
    let s = store(dir);
    let contents: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let mut w = cairn_nix::nar::NarWriter::new(Vec::new()).unwrap();
    w.regular(None, false, contents.len() as u64, &mut contents.as_slice()).unwrap();
    let nar = w.finish().unwrap();
    let info = s.add_nar("payload", nar.as_slice()).unwrap();
    (s, info.path, info.nar_hash, info.nar_size, nar)
}

fn loopback() -> SocketAddr {
    let l = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn node(dir: &std::path::Path, store: Arc<LocalStore>, listen: Option<SocketAddr>, peers: Vec<String>) -> Node {
    let config = Config {
        listen,
        peers,
        local_discovery: false,
        state_dir: dir.join("p2p"),
        max_transfers_per_peer: 4,
        upload_rate: 0,
        keys: Vec::new(),
    };
    Node::start(config, store).await.unwrap()
}

/// Gives the node that will start in `dir` the secret key `[byte; 32]`; returns its node id.
fn fixed_key(dir: &std::path::Path, byte: u8) -> iroh::NodeId {
    std::fs::create_dir_all(dir.join("p2p")).unwrap();
    std::fs::write(dir.join("p2p/p2p-secret-key"), [byte; 32]).unwrap();
    SecretKey::from_bytes(&[byte; 32]).public()
}

/// Reads a peer offer's bytes on a blocking thread, as the store's restore does.
async fn read_all(offer: PeerOffer) -> std::io::Result<Vec<u8>> {
    let PeerOffer::Bytes(mut r) = offer else { panic!("expected bytes from a peer") };
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        r.read_to_end(&mut out).map(|_| out)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nar_travels_from_a_peer_verified_and_unknown_things_go_upstream() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let (a_store, path, nar_hash, nar_size, nar) = store_with_a_path(a_dir.path(), 3 << 20);
    let a_addr = loopback();
    // A serves B (one of its peers), not C.
    let b_id = fixed_key(b_dir.path(), 7);
    let a = node(a_dir.path(), a_store, Some(a_addr), vec![format!("{b_id}@127.0.0.1:9")]).await;
    let b = node(b_dir.path(), store(b_dir.path()), None, vec![format!("{}@{a_addr}", a.node_id())]).await;

    let wanted = Wanted::Nar { path: path.clone(), nar_hash: nar_hash.clone(), nar_size };
    let got = read_all(b.find(wanted).await).await.unwrap();
    assert!(got == nar, "the bytes from the peer are the NAR");
    let (sa, sb) = (a.status(), b.status());
    assert_eq!(sa.served_bytes, nar_size);
    assert_eq!(sb.peers[0].fetched_bytes, nar_size);
    assert_eq!(sb.peers[0].fetched_objects, 1);
    assert!(sa.listening.iter().any(|l| l == &a_addr.to_string()));
    assert!(sb.listening.is_empty(), "a node without p2p-listen serves nothing");

    // The same path with another NAR hash is not what A holds: upstream.
    let other = Wanted::Nar { path: path.clone(), nar_hash: Hash::sha256([9; 32]), nar_size };
    assert!(matches!(b.find(other).await, PeerOffer::Upstream(_)));
    assert_eq!(b.status().upstream_objects, 1);

    // C is not one of A's peers: A closes its connections, and C goes upstream.
    let c_dir = tempfile::tempdir().unwrap();
    let c = node(c_dir.path(), store(c_dir.path()), None, vec![format!("{}@{a_addr}", a.node_id())]).await;
    let wanted = Wanted::Nar { path, nar_hash, nar_size };
    assert!(matches!(c.find(wanted).await, PeerOffer::Upstream(_)));
    let status = c.status();
    assert!(status.peers[0].last_error.is_some(), "{status:?}");
    assert_eq!(a.status().served_bytes, nar_size, "nothing more was served");
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

/// A peer that claims the right BLAKE3 hash and sends the right tree of hashes, but altered
/// bytes: iroh-blobs' own provider checks what it sends, so the liar encodes its answer itself.
#[derive(Debug, Clone)]
struct Liar {
    hash: iroh_blobs::Hash,
    outboard: PostOrderMemOutboard,
    data: Vec<u8>,
}

type Accepted = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send + 'static>>;

impl ProtocolHandler for Liar {
    fn accept(&self, conn: Connection) -> Accepted {
        let this = self.clone();
        Box::pin(async move {
            let lookups = conn.alpn().as_deref() == Some(lookup::ALPN);
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let _ = recv.read_to_end(64 * 1024).await;
                if lookups {
                    let answer = Answer::Have { blake3: *this.hash.as_bytes(), size: this.data.len() as u64 };
                    send.write_all(&lookup::encode_answer(&answer)).await?;
                } else {
                    // The whole blob, as iroh-blobs' provider frames it: size, then bao encoding.
                    let mut out = (this.data.len() as u64).to_le_bytes().to_vec();
                    bao_tree::io::sync::encode_ranges(&this.data[..], &this.outboard, &ChunkRanges::all(), &mut out)?;
                    send.write_all(&out).await?;
                }
                send.finish()?;
            }
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_is_dropped_and_the_transfer_resumes_from_an_honest_one() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let (a_store, path, nar_hash, nar_size, nar) = store_with_a_path(a_dir.path(), 2 << 20);
    let a_addr = loopback();
    // B's key is fixed (A serves it), and the liar's chosen so that B tries the liar first.
    let b_id = fixed_key(b_dir.path(), 7);
    let a = node(a_dir.path(), a_store, Some(a_addr), vec![format!("{b_id}@127.0.0.1:9")]).await;

    // The liar: right hash and outboard, one byte altered 1.5 MiB in.
    let outboard = PostOrderMemOutboard::create(&nar, IROH_BLOCK_SIZE);
    let mut altered = nar.clone();
    altered[3 << 19] ^= 1;
    let liar = Liar { hash: outboard.root.into(), outboard, data: altered };
    let liar_addr = loopback();
    let SocketAddr::V4(v4) = liar_addr else { unreachable!() };
    let wanted = Wanted::Nar { path, nar_hash, nar_size };
    let order_key = [b_id.as_bytes(), &lookup::encode_request(&wanted).unwrap()[..]].concat();
    let liar_key = (1u8..=255)
        .map(|i| [i; 32])
        .find(|k| {
            let id = SecretKey::from_bytes(k).public();
            cairn_p2p::node::rank(&id, &order_key) < cairn_p2p::node::rank(&a.node_id(), &order_key)
        })
        .unwrap();
    let ep = Endpoint::builder()
        .secret_key(SecretKey::from_bytes(&liar_key))
        .relay_mode(RelayMode::Disabled)
        .bind_addr_v4(v4)
        .alpns(vec![iroh_blobs::ALPN.to_vec(), lookup::ALPN.to_vec()])
        .bind()
        .await
        .unwrap();
    let router = Router::builder(ep.clone()).accept(iroh_blobs::ALPN, liar.clone()).accept(lookup::ALPN, liar).spawn();

    let peers = vec![format!("{}@{liar_addr}", ep.node_id()), format!("{}@{a_addr}", a.node_id())];
    let b = node(b_dir.path(), store(b_dir.path()), None, peers).await;
    assert_eq!(b.node_id(), b_id);
    let got = read_all(b.find(wanted).await).await.unwrap();
    assert!(got == nar, "the bytes are right despite the liar");

    let status = b.status();
    let (from_liar, from_a) = (&status.peers[0], &status.peers[1]);
    assert!(from_liar.state.starts_with("shunned"), "{from_liar:?}");
    assert!(from_liar.last_error.as_deref().unwrap_or("").contains("do not hash"), "{from_liar:?}");
    assert!(from_liar.fetched_bytes > 0, "the liar's verified prefix was kept");
    assert_eq!(from_liar.fetched_bytes + from_a.fetched_bytes, nar_size, "nothing was fetched twice");
    assert!(a.status().served_bytes < nar_size, "the honest peer was asked only for the rest");
    router.shutdown().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// A peer that restarts is reachable again at once: a node knows its configured peers'
/// addresses from the start, so it does not drop the packets of a peer that still trusts the
/// path it used before the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_reached_again_at_once() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let (a_store, path, nar_hash, nar_size, nar) = store_with_a_path(a_dir.path(), 200_000);
    let (a_addr, b_addr) = (loopback(), loopback());
    let a_id = fixed_key(a_dir.path(), 201);
    let b_id = fixed_key(b_dir.path(), 202);
    // A fleet's one list of peers, this node included: it is left out of its own peers.
    let a_peers = vec![format!("{b_id}@{b_addr}"), format!("{a_id}@{a_addr}")];
    let a = node(a_dir.path(), a_store.clone(), Some(a_addr), a_peers.clone()).await;
    assert_eq!(a.status().peers.len(), 1, "a node is not its own peer");
    let b = node(b_dir.path(), store(b_dir.path()), Some(b_addr), vec![format!("{a_id}@{a_addr}")]).await;
    let wanted = Wanted::Nar { path, nar_hash, nar_size };
    assert!(read_all(b.find(wanted.clone()).await).await.unwrap() == nar);
    a.shutdown().await;
    drop(a);
    // The same address again: the old endpoint's socket may take a moment to be let go.
    let config = |listen| Config {
        listen,
        peers: a_peers.clone(),
        local_discovery: false,
        state_dir: a_dir.path().join("p2p"),
        max_transfers_per_peer: 4,
        upload_rate: 0,
        keys: Vec::new(),
    };
    let rebinding = std::time::Instant::now();
    let a = loop {
        match Node::start(config(Some(a_addr)), a_store.clone()).await {
            Ok(a) => break a,
            Err(e) if rebinding.elapsed() < std::time::Duration::from_secs(10) && e.to_string().contains("in use") => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    let started = std::time::Instant::now();
    let again = b.find(wanted).await;
    assert!(matches!(again, PeerOffer::Bytes(_)), "the restarted peer was not reached: {:?}", b.status());
    assert!(read_all(again).await.unwrap() == nar);
    assert!(started.elapsed() < std::time::Duration::from_secs(3), "took {:?}", started.elapsed());
    a.shutdown().await;
    b.shutdown().await;
}

/// A large thing held by several peers comes from all of them at once, in ranges, and arrives
/// whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_nar_held_by_two_peers_comes_from_both_at_once() {
    let (a_dir, b_dir, c_dir) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_store, path, nar_hash, nar_size, nar) = store_with_a_path(a_dir.path(), 20 << 20);
    // B holds the same path: the same NAR added to its store.
    let b_store = store(b_dir.path());
    assert_eq!(b_store.add_nar("payload", nar.as_slice()).unwrap().path, path);
    let (a_addr, b_addr) = (loopback(), loopback());
    let c_id = fixed_key(c_dir.path(), 9);
    let c_peer = vec![format!("{c_id}@127.0.0.1:9")];
    let a = node(a_dir.path(), a_store, Some(a_addr), c_peer.clone()).await;
    let b = node(b_dir.path(), b_store, Some(b_addr), c_peer).await;
    let peers = vec![format!("{}@{a_addr}", a.node_id()), format!("{}@{b_addr}", b.node_id())];
    let c = node(c_dir.path(), store(c_dir.path()), None, peers).await;
    let got = read_all(c.find(Wanted::Nar { path, nar_hash, nar_size }).await).await.unwrap();
    assert!(got == nar, "the bytes are the NAR, in order");
    let (sa, sb) = (a.status().served_bytes, b.status().served_bytes);
    assert!(sa > 0 && sb > 0, "both peers served part of it: {sa} and {sb}");
    assert_eq!(sa + sb, nar_size, "each byte once");
    let status = c.status();
    assert!(status.peers.iter().all(|p| p.fetched_objects == 1), "{status:?}");
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

/// Hostile bytes on the copy protocol from a configured peer: every malformed request is
/// refused with a reason, a narinfo is served only for a valid path, a push is refused when the
/// node takes none, and the node goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_copy_requests_are_refused_and_the_node_goes_on_serving() {
    use cairn_p2p::copy::{self, Reply, Request};
    let a_dir = tempfile::tempdir().unwrap();
    let (a_store, path, nar_hash, _, _) = store_with_a_path(a_dir.path(), 1000);
    let a_addr = loopback();
    let b_key = SecretKey::from_bytes(&[5; 32]);
    let a = node(a_dir.path(), a_store, Some(a_addr), vec![format!("{}@127.0.0.1:9", b_key.public())]).await;
    let ep = Endpoint::builder().secret_key(b_key).relay_mode(RelayMode::Disabled).bind().await.unwrap();
    let conn = ep.connect(iroh::NodeAddr::new(a.node_id()).with_direct_addresses([a_addr]), copy::ALPN).await.unwrap();
    let ask = |bytes: Vec<u8>| {
        let conn = conn.clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&bytes).await.unwrap();
            send.finish().unwrap();
            copy::decode_reply(&recv.read_to_end(copy::MAX_ANSWER).await.unwrap()).unwrap()
        }
    };
    let refused = |r: Reply| match r {
        Reply::Refused(why) => why,
        other => panic!("not refused: {other:?}"),
    };
    for hostile in
        [vec![], vec![9], vec![1, b'.', b'.', b'/'], vec![2, 0], vec![3, 200, 0, 0, 0, b'x'], vec![3, 1, 0, 0, 0, 0xff]]
    {
        let why = refused(ask(hostile.clone()).await);
        assert!(!why.is_empty(), "{hostile:?}");
    }
    let long_enough = "StorePath: nonsense, but as long as a narinfo has to be to get this far\n".to_owned();
    let why = refused(ask(copy::encode_request(&Request::Push(vec![long_enough])).unwrap()).await);
    assert!(why.contains("takes no pushes"), "{why}");
    // Still serving: a path it holds, and one it does not.
    let Reply::Found(text) = ask(copy::encode_request(&Request::NarInfo(path.hash_part().into())).unwrap()).await
    else {
        panic!("no narinfo for a valid path")
    };
    let info = cairn_nix::narinfo::NarInfo::parse(&StoreDir::new("/store").unwrap(), &String::from_utf8(text).unwrap())
        .unwrap();
    assert_eq!((info.store_path, info.nar_hash), (path, nar_hash));
    let absent = "0".repeat(32);
    assert_eq!(ask(copy::encode_request(&Request::NarInfo(absent)).unwrap()).await, Reply::Missing);
    let Reply::Found(text) = ask(copy::encode_request(&Request::CacheInfo).unwrap()).await else { panic!() };
    assert!(String::from_utf8(text).unwrap().contains("StoreDir: /store"));
    ep.close().await;
    a.shutdown().await;
}

/// A listen port that is taken is an error naming it, not a node quietly listening elsewhere
/// (iroh would fall back to another port, where no peer looks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_listen_port_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = Config {
        listen: Some(addr),
        peers: Vec::new(),
        local_discovery: false,
        state_dir: dir.path().join("p2p"),
        max_transfers_per_peer: 4,
        upload_rate: 0,
        keys: Vec::new(),
    };
    let Err(e) = Node::start(config, store(dir.path())).await else { panic!("started on a taken port") };
    assert!(e.to_string().contains(&format!("cannot bind the p2p endpoint to {addr}: the port is in use")), "{e}");
}
