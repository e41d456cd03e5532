//! The node: one iroh endpoint that serves this store to peers (lookups and iroh-blobs
//! transfers) and fetches from them.
//!
//! **Fetching.** A substitution or a pull asks [`Node::find`] before going upstream. Every
//! usable peer gets a lookup at once; the bytes then stream from a peer that has the thing,
//! each chunk checked against the BLAKE3 hash as it arrives, and in order, so that the store
//! restores them as they come. A peer that fails mid-transfer is replaced by the next, which is
//! asked only for what is still missing (iroh-blobs' ranges); a peer whose bytes do not match
//! what it claimed is shunned for a while. The caller still checks the whole against the trusted
//! hash (NAR hash, digest) before registering anything.
//!
//! **Fetching upstream once for the fleet.** A node that wants something says so to peers who
//! ask ("deciding") while it asks its own peers, and once it goes upstream ("fetching") until
//! what it fetched is valid. A node waits, asking again every [`POLL`], while a peer is fetching
//! it, or is deciding and has a smaller node id; otherwise it goes upstream. So of nodes that
//! want the same thing at once, the one that ranks first for that thing goes upstream and the
//! others wait for it; two go only when one decided before the other's first lookup reached it.
//! If a fetch ends without the peer having it, a waiting node goes upstream itself.
//!
//! Nodes rank by node id: the smallest fetches a whole image or closure upstream. (Ranking by a
//! hash of node and object, to spread an image's layers over the fleet, was measured: it made
//! two nodes decide on one layer at once more often — 1.25 GiB from the registry for a 1 GiB
//! image, against 1.00 — and was no faster on one machine.) A blob is valid as soon as it is
//! stored, so a node waits for any peer fetching a blob. A substituted path becomes valid only
//! when its whole batch commits, so a node waiting for a peer's path while that peer waits for
//! one of its own would wait for ever. So a node that is itself fetching paths upstream waits
//! for a peer's path only if the peer's id is smaller than its own; a node fetching none waits
//! for any peer. In a circle of waits every node would be fetching (someone waits for it), so
//! ids would fall all the way round: no circle can close.
//! Several holders of one thing are tried in an order of each node's own ([`rank`]), which
//! spreads the serving.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bao_tree::io::fsm::BaoContentItem;
use bao_tree::{ChunkNum, ChunkRanges};
use bytes::{Buf, Bytes};
use cairn_api::{PeerPushAnswer, PeerStatus, PeersStatus};
use cairn_nix::StorePath;
use cairn_store::peers::{PeerCache, PeerFile, PeerOffer, Peers, Wanted};
use cairn_store::LocalStore;
use iroh::endpoint::Connection;
use iroh::protocol::{ProtocolHandler, Router};
use iroh::{Endpoint, NodeAddr, NodeId, RelayMode, SecretKey};
use iroh_blobs::get::fsm::{self, BlobContentNext, ConnectedNext, DecodeError, EndBlobNext};
use iroh_blobs::protocol::{GetRequest, RangeSpecSeq};
use iroh_blobs::util::local_pool::LocalPool;

use crate::copy;
use crate::index::Index;
use crate::lookup::{self, decode_answer, decode_request, encode_answer, encode_request, Answer};
use crate::offer::{Offer, PeerView, Resolved};

/// How long a lookup (connecting included) may take before the peer counts as unreachable.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a node waiting for a peer's upstream fetch asks again.
pub const POLL: Duration = Duration::from_millis(200);
/// How long a node that sees no one to wait for waits before asking once more, and deciding.
pub const SETTLE: Duration = Duration::from_millis(100);
/// How long a node waits for peers' upstream fetches before going upstream itself.
pub const WAIT_FOR_PEERS: Duration = Duration::from_secs(600);
/// How long a peer that sent bytes not matching its claim is not asked.
pub const SHUN_LIAR: Duration = Duration::from_secs(600);
/// How long a connection may hear nothing (not even a keep-alive) before it counts as lost.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a transfer may wait for its next verified piece before the peer counts as stalled.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a lookup may wait for this node to hash what it holds before answering "ask again".
pub const HASHING_ANSWER: Duration = Duration::from_secs(2);
/// How long a peer may take to send one copy request (a push's narinfos can be megabytes).
pub const COPY_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an unreachable peer is not asked.
pub const SHUN_UNREACHABLE: Duration = Duration::from_secs(30);
/// Things from this size up, held by several peers, are fetched from several at once.
pub const SPLIT_FROM: u64 = 8 << 20;
/// The ranges they are fetched in (a multiple of iroh-blobs' 16 KiB chunk groups); each range in
/// flight is buffered whole, so this times two per peer bounds the memory of one fetch.
pub const SEGMENT: u64 = 1 << 20;

/// What a node is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where peers reach this node; `None`: it fetches from peers but serves none.
    pub listen: Option<SocketAddr>,
    /// Peers, each `NODE-ID@HOST:PORT[,HOST:PORT…]`, or a bare `NODE-ID` with
    /// `local_discovery`.
    pub peers: Vec<String>,
    /// Find peers' addresses on the local network (iroh's mDNS discovery), and announce this
    /// node's. Admission still goes by the node ids in `peers`.
    pub local_discovery: bool,
    /// Holds the node's secret key and the index.
    pub state_dir: PathBuf,
    pub max_transfers_per_peer: usize,
    /// Upload bytes per second for all peers together (0: unlimited).
    pub upload_rate: u64,
    /// Keys with which narinfos served to peers are signed (`secret-key-files`), so that peers
    /// trusting them take this node's own paths.
    pub keys: Vec<cairn_nix::signing::SecretKey>,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("peers: '{spec}' is not NODE-ID@HOST:PORT: {why}")]
    Peer { spec: String, why: String },
    #[error("p2p secret key '{}': {why}", path.display())]
    Key { path: PathBuf, why: String },
    #[error("p2p index '{}': {source}", path.display())]
    Index { path: PathBuf, source: rusqlite::Error },
    #[error("cannot bind the p2p endpoint to {addr}: {why}")]
    Bind { addr: String, why: String },
}

/// A running node.
pub struct Node {
    shared: Arc<Shared>,
    router: Option<Router>,
    _pool: Option<LocalPool>,
    /// The connections made to every peer at start, stopped at shutdown if still trying.
    greetings: Vec<tokio::task::JoinHandle<()>>,
}

struct Shared {
    endpoint: Endpoint,
    peers: Vec<Arc<Peer>>,
    fetching: Arc<Fetching>,
    offer: Arc<Offer>,
    upstream_objects: AtomicU64,
    store: Arc<LocalStore>,
    keys: Vec<cairn_nix::signing::SecretKey>,
    /// What takes pushes from peers (`cairn copy --to p2p://…`), once the daemon set it.
    receiver: std::sync::OnceLock<Arc<dyn Receiver>>,
    /// Each peer's slots for copy requests (`copy::MAX_STREAMS`), over all its connections.
    copy_slots: Mutex<HashMap<NodeId, Arc<tokio::sync::Semaphore>>>,
}

/// Takes paths a peer pushes: substitutes them from the peer (`from`, its narinfos) as from any
/// binary cache, under this node's own trust policy. Set by the daemon ([`Node::take_pushes`]).
pub trait Receiver: Send + Sync {
    fn receive(
        &self,
        url: String,
        from: Arc<dyn PeerCache>,
        paths: Vec<StorePath>,
    ) -> Pin<Box<dyn Future<Output = Result<PeerPushAnswer, String>> + Send + 'static>>;
}

impl Node {
    /// Starts the node: binds its endpoint and, if it listens, serves lookups and transfers.
    pub async fn start(config: Config, store: Arc<LocalStore>) -> Result<Node, NodeError> {
        fs::create_dir_all(&config.state_dir)
            .map_err(|e| NodeError::Key { path: config.state_dir.clone(), why: e.to_string() })?;
        let key = load_or_make_key(&config.state_dir.join("p2p-secret-key"))?;
        // One entry per node id, and not this node itself: a fleet's shared list of peers may
        // name every node, this one included.
        let mut peers: Vec<Arc<Peer>> = Vec::new();
        for spec in &config.peers {
            let addr = parse_peer(spec, config.local_discovery)?;
            if addr.node_id == key.public() {
                continue;
            }
            match peers.iter().find(|p| p.addr.node_id == addr.node_id) {
                Some(_) => {
                    return Err(NodeError::Peer { spec: spec.clone(), why: "the node id is listed twice".into() })
                }
                None => peers.push(Arc::new(Peer { addr, state: Mutex::default() })),
            }
        }
        let index_path = config.state_dir.join("p2p-index.sqlite");
        let index = Index::open(&index_path).map_err(|source| NodeError::Index { path: index_path, source })?;
        let offer = Arc::new(Offer::new(store.clone(), index, config.max_transfers_per_peer, config.upload_rate));
        if config.listen.is_some() {
            // Blobs are hashed with BLAKE3 as they are added, not on a peer's first ask.
            store.offer_to(offer.clone());
        }
        // A peer that dies is noticed within IDLE_TIMEOUT (keep-alives every second), not after
        // QUIC's default 30 s: the transfer it was in moves on to another peer that soon.
        let mut transport = iroh::endpoint::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(1)));
        transport.max_idle_timeout(Some(iroh::endpoint::VarInt::from_u32(IDLE_TIMEOUT.as_millis() as u32).into()));
        let mut builder =
            Endpoint::builder().secret_key(key).relay_mode(RelayMode::Disabled).transport_config(transport);
        if config.local_discovery {
            builder = builder.discovery_local_network();
        }
        let bind = config.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        builder = match bind {
            SocketAddr::V4(a) => builder.bind_addr_v4(a),
            SocketAddr::V6(a) => builder.bind_addr_v6(a),
        };
        if config.listen.is_some() {
            builder = builder.alpns(vec![iroh_blobs::ALPN.to_vec(), lookup::ALPN.to_vec(), copy::ALPN.to_vec()]);
        }
        let endpoint =
            builder.bind().await.map_err(|e| NodeError::Bind { addr: bind.to_string(), why: format!("{e:#}") })?;
        // iroh falls back to another port when the asked one is taken; peers would then knock
        // at the configured port in vain.
        if let Some(asked) = config.listen.filter(|a| a.port() != 0) {
            let (v4, v6) = endpoint.bound_sockets();
            if !std::iter::once(v4).chain(v6).any(|a| a.port() == asked.port()) {
                endpoint.close().await;
                return Err(NodeError::Bind { addr: asked.to_string(), why: "the port is in use".into() });
            }
        }
        // iroh drops QUIC packets from addresses it knows no node at. A peer that still trusts
        // the path it used before this node restarted sends straight away, without the
        // handshake that would teach this node its address: told the configured addresses
        // now, the node takes those packets from the start.
        for p in peers.iter().filter(|p| !p.addr.direct_addresses.is_empty()) {
            if let Err(e) = endpoint.add_node_addr(p.addr.clone()) {
                tracing::warn!(peer = %p.addr.node_id, "p2p: cannot note the peer's address: {e:#}");
            }
        }
        let fetching = Arc::new(Fetching::default());
        // Only configured peers are served: a node id is a key, checked by the QUIC handshake.
        let known = Known(Arc::new(peers.iter().map(|p| p.addr.node_id).collect()));
        tracing::info!(node_id = %endpoint.node_id(), listen = ?config.listen, peers = peers.len(), "p2p node started");
        let shared = Arc::new(Shared {
            endpoint: endpoint.clone(),
            peers,
            fetching: fetching.clone(),
            offer: offer.clone(),
            upstream_objects: AtomicU64::new(0),
            store,
            keys: config.keys,
            receiver: std::sync::OnceLock::new(),
            copy_slots: Mutex::default(),
        });
        let (router, pool) = if config.listen.is_some() {
            let pool = LocalPool::default();
            let router = Router::builder(endpoint)
                .accept(
                    iroh_blobs::ALPN,
                    BlobsHandler { offer: offer.clone(), rt: pool.handle().clone(), known: known.clone() },
                )
                .accept(lookup::ALPN, LookupHandler { offer, fetching, known: known.clone() })
                .accept(copy::ALPN, CopyHandler { shared: Arc::downgrade(&shared), known })
                .spawn();
            (Some(router), Some(pool))
        } else {
            (None, None)
        };
        // Greet every peer: the connection confirms the path both ways, so that a peer that
        // connects to this node right after it (re)started is answered at once rather than after
        // iroh validates the path on its own (seconds, past a lookup's patience).
        let greetings = shared
            .peers
            .iter()
            .map(|peer| {
                let (peer, endpoint) = (peer.clone(), shared.endpoint.clone());
                tokio::spawn(async move {
                    if let Err(why) = peer.connection(&endpoint, lookup::ALPN).await {
                        tracing::debug!(peer = %peer.addr.node_id, "p2p: peer not reached at start: {why}");
                    }
                })
            })
            .collect();
        Ok(Node { shared, router, _pool: pool, greetings })
    }

    pub fn node_id(&self) -> NodeId {
        self.shared.endpoint.node_id()
    }

    /// Lets configured peers push paths to this node (`cairn copy --to p2p://…`): `receiver`
    /// substitutes them from the peer. Without it, pushes are refused.
    pub fn take_pushes(&self, receiver: Arc<dyn Receiver>) {
        let _ = self.shared.receiver.set(receiver);
    }

    /// Asks the configured peer `to` (its node id) to take the paths of `narinfos` from this
    /// node; answers what it added and refused, once it is done.
    pub async fn push(&self, to: &str, narinfos: Vec<String>) -> Result<PeerPushAnswer, String> {
        let peer = self.shared.configured(to)?;
        let request = copy::encode_request(&copy::Request::Push(narinfos)).map_err(|e| e.to_string())?;
        // The peer answers when its substitution ends, which takes as long as the closure takes:
        // no time limit here beyond the connection's own (it stays alive while the peer does).
        match self.shared.ask_copy(&peer, &request, None).await? {
            copy::Reply::Found(json) => serde_json::from_slice(&json)
                .map_err(|e| format!("p2p://{to} answered the push with something else: {e}")),
            copy::Reply::Refused(why) => Err(format!("p2p://{to} refused the push: {why}")),
            copy::Reply::Missing => Err(format!("p2p://{to} answered the push with 'missing'")),
        }
    }

    /// Stops serving and closes the endpoint.
    pub async fn shutdown(&self) {
        for g in &self.greetings {
            g.abort();
        }
        if let Some(router) = &self.router {
            let _ = router.shutdown().await;
        }
        // Returns once the socket is released (a connection still shaking hands with an
        // unreachable peer drains first; cairnd bounds that wait).
        self.shared.endpoint.close().await;
    }

    /// What `cairn peers` shows.
    pub fn status(&self) -> PeersStatus {
        let s = &self.shared;
        let served = s.offer.served.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let (v4, v6) = s.endpoint.bound_sockets();
        let now = Instant::now();
        PeersStatus {
            node_id: s.endpoint.node_id().to_string(),
            listening: if self.router.is_some() {
                std::iter::once(v4).chain(v6).map(|a| a.to_string()).collect()
            } else {
                Vec::new()
            },
            served_bytes: s.offer.served_bytes.load(Ordering::Relaxed),
            served_objects: s.offer.served_objects.load(Ordering::Relaxed),
            upstream_objects: s.upstream_objects.load(Ordering::Relaxed),
            offered: s.offer.index().count().unwrap_or(0),
            peers: s
                .peers
                .iter()
                .map(|p| {
                    let st = p.state();
                    let state = match st.shunned_until {
                        Some(t) if t > now => format!("shunned for {}s", (t - now).as_secs() + 1),
                        _ if st.last_ok.is_some() => "ok".to_owned(),
                        _ => "not yet reached".to_owned(),
                    };
                    PeerStatus {
                        node_id: p.addr.node_id.to_string(),
                        addresses: if p.addr.direct_addresses.is_empty() {
                            // A bare node id: the addresses discovery found, if any.
                            s.endpoint
                                .remote_info(p.addr.node_id)
                                .map(|i| i.addrs.iter().map(|a| format!("{} (discovered)", a.addr)).collect())
                                .unwrap_or_default()
                        } else {
                            p.addr.direct_addresses.iter().map(|a| a.to_string()).collect()
                        },
                        state,
                        fetched_bytes: st.fetched_bytes,
                        fetched_objects: st.fetched_objects,
                        served_bytes: served.get(&p.addr.node_id).copied().unwrap_or(0),
                        last_error: st.last_error.clone(),
                    }
                })
                .collect(),
        }
    }
}

impl Peers for Node {
    fn find(&self, wanted: Wanted) -> Pin<Box<dyn Future<Output = PeerOffer> + Send + '_>> {
        let shared = self.shared.clone();
        Box::pin(async move { shared.find(wanted).await })
    }

    fn cache_of(&self, node: &str) -> Result<Arc<dyn PeerCache>, String> {
        let peer = self.shared.configured(node)?;
        Ok(Arc::new(PeerFiles { shared: self.shared.clone(), peer, given: HashMap::new() }))
    }
}

/// A peer's store as a binary cache: narinfos asked over the copy protocol, or handed over with
/// a push (`given`, by hash part).
struct PeerFiles {
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    given: HashMap<String, String>,
}

impl PeerCache for PeerFiles {
    fn get<'a>(&'a self, key: &'a str) -> PeerFile<'a> {
        Box::pin(async move {
            let request = match key.strip_suffix(".narinfo") {
                Some(hash_part) => match self.given.get(hash_part) {
                    Some(text) => return Ok(Some(text.clone().into_bytes())),
                    None => copy::Request::NarInfo(hash_part.to_owned()),
                },
                None if key == "nix-cache-info" => copy::Request::CacheInfo,
                None => return Ok(None),
            };
            let Ok(request) = copy::encode_request(&request) else { return Ok(None) };
            match self.shared.ask_copy(&self.peer, &request, Some(LOOKUP_TIMEOUT)).await? {
                copy::Reply::Found(bytes) => Ok(Some(bytes)),
                copy::Reply::Missing => Ok(None),
                copy::Reply::Refused(why) => Err(format!("the peer refused: {why}")),
            }
        })
    }
}

impl Shared {
    /// The configured peer whose node id is `node`.
    fn configured(&self, node: &str) -> Result<Arc<Peer>, String> {
        let id: NodeId = node.parse().map_err(|e| format!("p2p://{node}: not a node id: {e}"))?;
        self.peers.iter().find(|p| p.addr.node_id == id).cloned().ok_or_else(|| {
            format!(
                "p2p://{node}: not one of this daemon's peers (add NODE-ID@HOST:PORT to `peers` in its configuration)"
            )
        })
    }

    /// One request of the copy protocol to `peer`, answered within `limit` (if any).
    async fn ask_copy(&self, peer: &Peer, request: &[u8], limit: Option<Duration>) -> Result<copy::Reply, String> {
        let asked = async {
            let conn = peer.connection(&self.endpoint, copy::ALPN).await?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(request).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let bytes = recv.read_to_end(copy::MAX_ANSWER).await.map_err(|e| e.to_string())?;
            copy::decode_reply(&bytes).map_err(|e| e.to_string())
        };
        let answered = match limit {
            Some(limit) => tokio::time::timeout(limit, asked)
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {}s", limit.as_secs()))),
            None => asked.await,
        };
        answered.map_err(|why| {
            peer.forget_connections();
            format!("p2p://{}: {why}", peer.addr.node_id)
        })
    }

    async fn find(self: Arc<Self>, wanted: Wanted) -> PeerOffer {
        let size = match &wanted {
            Wanted::Nar { nar_size, .. } => *nar_size,
            Wanted::Blob { size, .. } => *size,
        };
        let Ok(request) = encode_request(&wanted) else { return PeerOffer::Upstream(Box::new(())) };
        let mut guard = self.fetching.register(request.clone());
        let me = self.endpoint.node_id();
        let deadline = Instant::now() + WAIT_FOR_PEERS;
        // An empty thing is not worth a round trip.
        let mut ask = size > 0;
        let mut settled = false;
        while ask {
            let live: Vec<Arc<Peer>> = self.peers.iter().filter(|p| !p.shunned()).cloned().collect();
            if live.is_empty() {
                break;
            }
            let answers = futures_util::future::join_all(live.iter().map(|p| self.ask(p, &request))).await;
            let mut haves: Vec<(Arc<Peer>, [u8; 32])> = Vec::new();
            let mut wait = false;
            for (peer, answer) in live.into_iter().zip(answers) {
                match answer {
                    Ok(Answer::Have { blake3, size: claimed }) if claimed == size => haves.push((peer, blake3)),
                    Ok(Answer::Have { size: claimed, .. }) => {
                        peer.shun(SHUN_LIAR, format!("claimed {claimed} bytes where {size} are wanted"))
                    }
                    Ok(Answer::Fetching) => {
                        wait |= matches!(wanted, Wanted::Blob { .. })
                            || peer.addr.node_id.as_bytes() < me.as_bytes()
                            || !self.fetching.fetches_paths_upstream()
                    }
                    Ok(Answer::Deciding) => wait |= peer.addr.node_id.as_bytes() < me.as_bytes(),
                    Ok(Answer::Missing) => {}
                    Err(why) => peer.shun(SHUN_UNREACHABLE, why),
                }
            }
            if !haves.is_empty() {
                let mut candidates = by_majority(haves);
                // Each node its own order of holders: a fleet's fetches spread over them.
                candidates.sort_by_key(|(p, _)| rank(&p.addr.node_id, &[me.as_bytes(), &request[..]].concat()));
                return PeerOffer::Bytes(Box::new(self.stream(size, candidates, guard)));
            }
            if !wait && !settled {
                // Nobody to wait for: ask once more after a moment, so that peers that came to
                // want it meanwhile (and whose lookups this node's reached too early) are seen
                // deciding, and the id order picks one of them.
                settled = true;
                tokio::time::sleep(SETTLE).await;
                continue;
            }
            ask = wait && Instant::now() < deadline;
            if !ask {
                break;
            }
            settled = false;
            tokio::time::sleep(POLL).await;
        }
        self.upstream_objects.fetch_add(1, Ordering::Relaxed);
        guard.decide();
        PeerOffer::Upstream(Box::new(guard))
    }

    /// One lookup, on the peer's lookup connection (made on first use).
    async fn ask(&self, peer: &Peer, request: &[u8]) -> Result<Answer, String> {
        let asked = async {
            let conn = peer.connection(&self.endpoint, lookup::ALPN).await?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(request).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let bytes = recv.read_to_end(lookup::MAX_ANSWER).await.map_err(|e| e.to_string())?;
            decode_answer(&bytes).map_err(|e| e.to_string())
        };
        match tokio::time::timeout(LOOKUP_TIMEOUT, asked).await {
            Ok(Ok(a)) => {
                peer.state().last_ok = Some(Instant::now());
                Ok(a)
            }
            Ok(Err(why)) => {
                peer.forget_connections();
                Err(format!("lookup failed: {why}"))
            }
            Err(_) => {
                peer.forget_connections();
                Err(format!("no answer to a lookup within {}s", LOOKUP_TIMEOUT.as_secs()))
            }
        }
    }

    /// Streams `size` bytes from the candidates: a large thing held by several peers in
    /// segments spread over them ([`striped`](Self::striped)), else from one peer after
    /// another, each asked only for what the ones before did not send.
    fn stream(self: Arc<Self>, size: u64, candidates: Vec<(Arc<Peer>, [u8; 32])>, guard: FetchGuard) -> PeerBytes {
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(32);
        tokio::spawn(async move {
            let _guard = guard;
            let mut sent = vec![false; candidates.len()];
            let done = if candidates.len() > 1 && size >= SPLIT_FROM {
                self.striped(size, &candidates, &mut sent, &tx).await
            } else {
                self.rest_of(size, &candidates, &mut sent, 0, size, &tx).await
            };
            if done {
                for ((peer, _), _) in candidates.iter().zip(&sent).filter(|(_, s)| **s) {
                    peer.state().fetched_objects += 1;
                }
            }
        });
        PeerBytes { rx, chunk: Bytes::new() }
    }

    /// Sends `[pos, end)` from the candidates not shunned, in turn, each failing one shunned
    /// and the next asked only for the rest; an error on `tx` if none could. `sent` marks
    /// those that sent bytes. True if all of it was sent.
    async fn rest_of(
        &self,
        size: u64,
        candidates: &[(Arc<Peer>, [u8; 32])],
        sent: &mut [bool],
        mut pos: u64,
        end: u64,
        tx: &Sender,
    ) -> bool {
        if pos >= end {
            return true;
        }
        for (i, (peer, blake3)) in candidates.iter().enumerate() {
            if peer.shunned() {
                continue;
            }
            let before = pos;
            let result = get_from(&self.endpoint, peer, *blake3, size, &mut pos, end, tx).await;
            sent[i] |= pos > before;
            match result {
                Ok(()) => return true,
                Err(failure) => {
                    if !failed(peer, failure) {
                        return false;
                    }
                }
            }
        }
        let _ = tx.send(Err(io::Error::other("no peer could send all of it"))).await;
        false
    }

    /// Sends `size` bytes fetched in [`SEGMENT`]-byte ranges from several peers at once (two
    /// ranges in flight per peer, round robin), in order. A range whose peer fails is finished
    /// by the others, from where its verified bytes stopped. True if all of it was sent.
    async fn striped(&self, size: u64, candidates: &[(Arc<Peer>, [u8; 32])], sent: &mut [bool], tx: &Sender) -> bool {
        let segments = size.div_ceil(SEGMENT);
        let window = 2 * candidates.len();
        let mut in_flight = std::collections::VecDeque::new();
        let mut next = 0u64;
        let mut done = 0u64;
        while done < segments {
            while in_flight.len() < window && next < segments {
                let live: Vec<usize> = (0..candidates.len()).filter(|i| !candidates[*i].0.shunned()).collect();
                let Some(&who) = live.get(next as usize % live.len().max(1)) else { break };
                let (start, end) = (next * SEGMENT, ((next + 1) * SEGMENT).min(size));
                // Room for the whole range (in pieces of 1 KiB at the least): a range not yet at
                // the front is fetched to its end and frees the peer's transfer slot, so two
                // striped fetches can never each hold the slots the other's front range needs.
                let (seg_tx, seg_rx) = tokio::sync::mpsc::channel((SEGMENT / 1024) as usize);
                let (endpoint, (peer, blake3)) = (self.endpoint.clone(), candidates[who].clone());
                let task = tokio::spawn(async move {
                    let mut pos = start;
                    get_from(&endpoint, &peer, blake3, size, &mut pos, end, &seg_tx).await
                });
                in_flight.push_back((start, end, seg_rx, task, who));
                next += 1;
            }
            let Some((start, end, mut seg_rx, task, who)) = in_flight.pop_front() else {
                let _ = tx.send(Err(io::Error::other("no peer could send all of it"))).await;
                return false;
            };
            let mut pos = start;
            while let Some(Ok(piece)) = seg_rx.recv().await {
                pos += piece.len() as u64;
                if tx.send(Ok(piece)).await.is_err() {
                    return false;
                }
            }
            sent[who] |= pos > start;
            let result = task.await.unwrap_or_else(|e| Err(Failure::Other(format!("the transfer task failed: {e}"))));
            if let Err(failure) = result {
                // The rest of this range from the others.
                if !failed(&candidates[who].0, failure) || !self.rest_of(size, candidates, sent, pos, end, tx).await {
                    return false;
                }
            }
            done += 1;
        }
        true
    }
}

/// Why a transfer from one peer ended early.
enum Failure {
    /// Whoever reads the bytes stopped reading.
    Receiver,
    /// The peer sent bytes that do not match what it claimed.
    Lied(String),
    /// Anything else (the peer went away, no longer has it …).
    Other(String),
}

/// Gets `[*delivered, end)` of the blob `blake3` (of `size` bytes) from `peer`, sending each
/// verified piece on `tx` in order.
async fn get_from(
    endpoint: &Endpoint,
    peer: &Peer,
    blake3: [u8; 32],
    size: u64,
    delivered: &mut u64,
    end: u64,
    tx: &Sender,
) -> Result<(), Failure> {
    let other = |e: &dyn std::fmt::Display| Failure::Other(e.to_string());
    let conn = peer.connection(endpoint, iroh_blobs::ALPN).await.map_err(Failure::Other)?;
    let hash = iroh_blobs::Hash::from_bytes(blake3);
    let ranges = if end >= size {
        ChunkRanges::from(ChunkNum(*delivered / 1024)..)
    } else {
        ChunkRanges::from(ChunkNum(*delivered / 1024)..ChunkNum(end.div_ceil(1024)))
    };
    let request = GetRequest::new(hash, RangeSpecSeq::from_ranges([ranges]));
    let header = async {
        let connected = fsm::start(conn, request).next().await.map_err(|e| other(&e))?;
        let ConnectedNext::StartRoot(root) = connected.next().await.map_err(|e| other(&e))? else {
            return Err(Failure::Other("the peer answered with something else".into()));
        };
        root.next().next().await.map_err(|e| other(&e))
    };
    let (mut content, claimed) = tokio::time::timeout(STALL_TIMEOUT, header)
        .await
        .map_err(|_| Failure::Other(format!("sent no answer within {}s", STALL_TIMEOUT.as_secs())))??;
    if claimed != size {
        return Err(Failure::Lied(format!("it sends {claimed} bytes where {size} are wanted")));
    }
    loop {
        let next = tokio::time::timeout(STALL_TIMEOUT, content.next()).await.map_err(|_| {
            Failure::Other(format!("sent nothing for {}s (after {delivered} bytes)", STALL_TIMEOUT.as_secs()))
        })?;
        match next {
            BlobContentNext::More((next, item)) => {
                let item = item.map_err(|e| match e {
                    DecodeError::LeafHashMismatch(_) | DecodeError::ParentHashMismatch(_) => {
                        Failure::Lied(format!("it sent bytes that do not hash to what it claimed ({e})"))
                    }
                    e => other(&e),
                })?;
                if let BaoContentItem::Leaf(leaf) = item {
                    let leaf_end = (leaf.offset + leaf.data.len() as u64).min(end);
                    if leaf.offset > *delivered {
                        return Err(Failure::Other("the peer skipped bytes".into()));
                    }
                    if leaf_end > *delivered {
                        let data =
                            leaf.data.slice((*delivered - leaf.offset) as usize..(leaf_end - leaf.offset) as usize);
                        let n = data.len() as u64;
                        tx.send(Ok(data)).await.map_err(|_| Failure::Receiver)?;
                        *delivered = leaf_end;
                        peer.state().fetched_bytes += n;
                    }
                }
                content = next;
            }
            BlobContentNext::Done(end) => {
                if let EndBlobNext::Closing(closing) = end.next() {
                    let _ = closing.next().await;
                }
                break;
            }
        }
    }
    if *delivered < end {
        return Err(Failure::Other(format!("the transfer ended after {delivered} of {end} bytes")));
    }
    Ok(())
}

/// Where verified pieces go, in order.
type Sender = tokio::sync::mpsc::Sender<io::Result<Bytes>>;

/// Notes a peer's failure (shunned unless it was the receiver that stopped); false: stop.
fn failed(peer: &Peer, failure: Failure) -> bool {
    match failure {
        Failure::Receiver => false,
        Failure::Lied(why) => {
            peer.shun(SHUN_LIAR, why);
            true
        }
        Failure::Other(why) => {
            peer.forget_connections();
            peer.shun(SHUN_UNREACHABLE, why);
            true
        }
    }
}

/// Where `node` stands among the holders of `key` (lowest first).
pub fn rank(node: &NodeId, key: &[u8]) -> [u8; 32] {
    let mut h = bao_tree::blake3::Hasher::new();
    h.update(node.as_bytes());
    h.update(key);
    *h.finalize().as_bytes()
}

/// The candidates that agree with most others on the BLAKE3 hash (a peer claiming another hash
/// for the same trusted identity is at best wrong), in their order.
fn by_majority(haves: Vec<(Arc<Peer>, [u8; 32])>) -> Vec<(Arc<Peer>, [u8; 32])> {
    let mut votes: HashMap<[u8; 32], usize> = HashMap::new();
    for (_, h) in &haves {
        *votes.entry(*h).or_default() += 1;
    }
    let Some((&winner, _)) = votes.iter().max_by_key(|(_, n)| **n) else { return haves };
    haves.into_iter().filter(|(_, h)| *h == winner).collect()
}

/// The verified bytes of a peer transfer, read by a blocking reader (the store's restore).
struct PeerBytes {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl Read for PeerBytes {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.chunk = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk.advance(n);
        Ok(n)
    }
}

/// A configured peer and what this node knows of it.
struct Peer {
    addr: NodeAddr,
    state: Mutex<PeerState>,
}

#[derive(Default)]
struct PeerState {
    shunned_until: Option<Instant>,
    last_error: Option<String>,
    last_ok: Option<Instant>,
    fetched_bytes: u64,
    fetched_objects: u64,
    lookup: Option<Connection>,
    blobs: Option<Connection>,
    copy: Option<Connection>,
}

impl Peer {
    fn state(&self) -> std::sync::MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn shunned(&self) -> bool {
        self.state().shunned_until.is_some_and(|t| t > Instant::now())
    }

    fn shun(&self, how_long: Duration, why: String) {
        tracing::warn!(peer = %self.addr.node_id, "p2p: not asking this peer for {}s: {why}", how_long.as_secs());
        let mut st = self.state();
        st.shunned_until = Some(Instant::now() + how_long);
        st.last_error = Some(why);
    }

    fn forget_connections(&self) {
        let mut st = self.state();
        st.lookup = None;
        st.blobs = None;
        st.copy = None;
    }

    fn slot<'s>(st: &'s mut PeerState, alpn: &[u8]) -> &'s mut Option<Connection> {
        match alpn {
            a if a == lookup::ALPN => &mut st.lookup,
            a if a == copy::ALPN => &mut st.copy,
            _ => &mut st.blobs,
        }
    }

    /// The peer's connection for `alpn`, made on first use and kept.
    async fn connection(&self, endpoint: &Endpoint, alpn: &[u8]) -> Result<Connection, String> {
        let cached = Self::slot(&mut self.state(), alpn).clone();
        if let Some(c) = cached.filter(|c| c.close_reason().is_none()) {
            return Ok(c);
        }
        let conn = tokio::time::timeout(LOOKUP_TIMEOUT, endpoint.connect(self.addr.clone(), alpn))
            .await
            .map_err(|_| format!("could not connect within {}s", LOOKUP_TIMEOUT.as_secs()))?
            .map_err(|e| format!("could not connect: {e:#}"))?;
        *Self::slot(&mut self.state(), alpn) = Some(conn.clone());
        Ok(conn)
    }
}

/// What this node wants now (lookup request bytes → wanted by how many, fetched upstream by
/// how many).
#[derive(Default)]
struct Fetching(Mutex<HashMap<Vec<u8>, (usize, usize)>>);

impl Fetching {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, (usize, usize)>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn register(self: &Arc<Self>, key: Vec<u8>) -> FetchGuard {
        self.map().entry(key.clone()).or_default().0 += 1;
        FetchGuard { fetching: self.clone(), key, upstream: false }
    }

    /// Whether this node is fetching any store path's NAR upstream.
    fn fetches_paths_upstream(&self) -> bool {
        self.map().iter().any(|(key, (_, upstream))| *upstream > 0 && key.first() == Some(&lookup::KIND_NAR))
    }

    /// What to tell a peer asking for `key` that this node does not hold.
    fn answer(&self, key: &[u8]) -> Answer {
        match self.map().get(key) {
            Some((_, upstream)) if *upstream > 0 => Answer::Fetching,
            Some(_) => Answer::Deciding,
            None => Answer::Missing,
        }
    }
}

/// Marks a thing as wanted (then fetched upstream) by this node while it lives.
struct FetchGuard {
    fetching: Arc<Fetching>,
    key: Vec<u8>,
    upstream: bool,
}

impl FetchGuard {
    /// This node goes upstream for it.
    fn decide(&mut self) {
        if !self.upstream {
            self.upstream = true;
            if let Some(e) = self.fetching.map().get_mut(&self.key) {
                e.1 += 1;
            }
        }
    }
}

impl Drop for FetchGuard {
    fn drop(&mut self) {
        let mut map = self.fetching.map();
        if let Some(e) = map.get_mut(&self.key) {
            e.0 -= 1;
            e.1 -= usize::from(self.upstream);
            if e.0 == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// The node ids this node serves: its configured peers.
#[derive(Clone)]
struct Known(Arc<std::collections::HashSet<NodeId>>);

impl Known {
    /// The connection's peer if it is a configured one; else the connection is closed.
    fn admit(&self, conn: &Connection) -> anyhow::Result<Option<NodeId>> {
        let id = conn.remote_node_id()?;
        if self.0.contains(&id) {
            return Ok(Some(id));
        }
        tracing::warn!(node = %id, "p2p: refused a node that is not among the configured peers");
        conn.close(1u8.into(), b"not a configured peer");
        Ok(None)
    }
}

/// Serves iroh-blobs transfers from the offer.
#[derive(Clone)]
struct BlobsHandler {
    offer: Arc<Offer>,
    rt: iroh_blobs::util::local_pool::LocalPoolHandle,
    known: Known,
}

impl std::fmt::Debug for BlobsHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlobsHandler")
    }
}

type Accepted = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'static>>;

impl ProtocolHandler for BlobsHandler {
    fn accept(&self, conn: Connection) -> Accepted {
        let this = self.clone();
        Box::pin(async move {
            let Some(requester) = this.known.admit(&conn)? else { return Ok(()) };
            let view = PeerView { offer: this.offer, requester };
            iroh_blobs::provider::handle_connection(conn, view, Default::default(), this.rt).await;
            Ok(())
        })
    }
}

/// Answers lookups.
#[derive(Clone)]
struct LookupHandler {
    offer: Arc<Offer>,
    fetching: Arc<Fetching>,
    known: Known,
}

impl std::fmt::Debug for LookupHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LookupHandler")
    }
}

impl ProtocolHandler for LookupHandler {
    fn accept(&self, conn: Connection) -> Accepted {
        let this = self.clone();
        Box::pin(async move {
            if this.known.admit(&conn)?.is_none() {
                return Ok(());
            }
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let this = this.clone();
                tokio::spawn(async move {
                    let read = tokio::time::timeout(LOOKUP_TIMEOUT, recv.read_to_end(lookup::MAX_REQUEST));
                    let request = match read.await {
                        Ok(Ok(bytes)) => bytes,
                        _ => return,
                    };
                    let answer = match decode_request(&request) {
                        Ok(wanted) => this.answer(wanted, &request).await,
                        Err(e) => {
                            tracing::debug!("p2p: refused a lookup: {e}");
                            let _ = send.reset(1u8.into());
                            return;
                        }
                    };
                    if send.write_all(&encode_answer(&answer)).await.is_ok() {
                        let _ = send.finish();
                    }
                });
            }
            Ok(())
        })
    }
}

impl LookupHandler {
    async fn answer(&self, wanted: Wanted, request: &[u8]) -> Answer {
        let offer = self.offer.clone();
        // A path never hashed for peers is hashed now, which can take longer than the asker
        // waits: past HASHING_ANSWER it is told to ask again, and the hashing goes on.
        let resolving = tokio::task::spawn_blocking(move || offer.resolve(&wanted));
        match tokio::time::timeout(HASHING_ANSWER, resolving).await {
            Ok(Ok(Ok(Resolved::Have(blake3, size)))) => return Answer::Have { blake3, size },
            Ok(Ok(Ok(Resolved::Hashing))) | Err(_) => return Answer::Fetching,
            Ok(Ok(Ok(Resolved::Missing))) => {}
            Ok(Ok(Err(e))) => tracing::warn!("p2p: cannot answer a lookup: {e}"),
            Ok(Err(e)) => tracing::warn!("p2p: lookup task failed: {e}"),
        }
        self.fetching.answer(request)
    }
}

/// Serves the copy protocol: narinfos of valid paths, and pushes handed to the [`Receiver`].
#[derive(Clone)]
struct CopyHandler {
    /// Weak: the shared state holds the router's endpoint, and the router its handlers.
    shared: std::sync::Weak<Shared>,
    known: Known,
}

impl std::fmt::Debug for CopyHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CopyHandler")
    }
}

impl ProtocolHandler for CopyHandler {
    fn accept(&self, conn: Connection) -> Accepted {
        let this = self.clone();
        Box::pin(async move {
            let Some(requester) = this.known.admit(&conn)? else { return Ok(()) };
            let Some(shared) = this.shared.upgrade() else { return Ok(()) };
            // Per peer, over all its connections.
            let streams = shared.copy_streams(requester);
            drop(shared);
            loop {
                // A stream is taken only when a slot is free, so a peer cannot open more.
                let Ok(slot) = streams.clone().acquire_owned().await else { return Ok(()) };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else { return Ok(()) };
                let Some(shared) = this.shared.upgrade() else { return Ok(()) };
                tokio::spawn(async move {
                    let _slot = slot;
                    let read = tokio::time::timeout(COPY_REQUEST_TIMEOUT, recv.read_to_end(copy::MAX_REQUEST));
                    let Ok(Ok(request)) = read.await else { return };
                    let reply = match copy::decode_request(&request) {
                        Ok(request) => shared.serve_copy(requester, request).await,
                        Err(e) => copy::Reply::Refused(e.to_string()),
                    };
                    if send.write_all(&copy::encode_reply(&reply)).await.is_ok() {
                        let _ = send.finish();
                    }
                });
            }
        })
    }
}

impl Shared {
    /// The copy-request slots of `peer`.
    fn copy_streams(&self, peer: NodeId) -> Arc<tokio::sync::Semaphore> {
        let mut slots = self.copy_slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        slots.entry(peer).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(copy::MAX_STREAMS))).clone()
    }

    /// The answer to one copy request from the configured peer `requester`.
    async fn serve_copy(self: Arc<Self>, requester: NodeId, request: copy::Request) -> copy::Reply {
        let dir = self.store.store_dir().clone();
        match request {
            copy::Request::CacheInfo => {
                let info = cairn_nix::narinfo::CacheInfo {
                    store_dir: dir.as_str().to_owned(),
                    want_mass_query: true,
                    priority: 40,
                };
                copy::Reply::Found(info.render().into_bytes())
            }
            copy::Request::NarInfo(hash_part) => {
                let store = self.store.clone();
                let found = tokio::task::spawn_blocking(move || -> Result<_, cairn_store::StoreError> {
                    let Some(path) = store.path_from_hash_part(&hash_part)? else { return Ok(None) };
                    store.path_info(&path)
                })
                .await;
                match found {
                    Ok(Ok(Some(info))) => {
                        // The NAR comes as a p2p transfer; the URL only names it.
                        let url = format!(
                            "nar/{}-{}.nar",
                            info.path.hash_part(),
                            info.nar_hash.encode(cairn_nix::hash::Encoding::Nix32)
                        );
                        let mut narinfo = info.into_narinfo(url, "none");
                        for key in &self.keys {
                            if let Err(e) = narinfo.sign(&dir, key) {
                                return copy::Reply::Refused(e.to_string());
                            }
                        }
                        copy::Reply::Found(narinfo.render(&dir).into_bytes())
                    }
                    Ok(Ok(None)) => copy::Reply::Missing,
                    Ok(Err(e)) => copy::Reply::Refused(e.to_string()),
                    Err(e) => copy::Reply::Refused(e.to_string()),
                }
            }
            copy::Request::Push(narinfos) => {
                let Some(receiver) = self.receiver.get().cloned() else {
                    return copy::Reply::Refused("this node takes no pushes".into());
                };
                let Some(peer) = self.peers.iter().find(|p| p.addr.node_id == requester).cloned() else {
                    return copy::Reply::Refused("not a configured peer".into());
                };
                let mut given = HashMap::new();
                let mut paths = Vec::new();
                for (i, text) in narinfos.into_iter().enumerate() {
                    match cairn_nix::narinfo::NarInfo::parse(&dir, &text) {
                        Ok(info) => {
                            given.insert(info.store_path.hash_part().to_owned(), text);
                            paths.push(info.store_path);
                        }
                        Err(e) => return copy::Reply::Refused(format!("pushed narinfo {}: {e}", i + 1)),
                    }
                }
                let url = format!("p2p://{requester}");
                let from = Arc::new(PeerFiles { shared: self.clone(), peer, given });
                match receiver.receive(url, from, paths).await {
                    Ok(answer) => match serde_json::to_vec(&answer) {
                        Ok(json) => copy::Reply::Found(json),
                        Err(e) => copy::Reply::Refused(e.to_string()),
                    },
                    Err(why) => copy::Reply::Refused(why),
                }
            }
        }
    }
}

/// `NODE-ID@HOST:PORT[,HOST:PORT…]` as an address (host names resolved now); with `discovery`,
/// a bare `NODE-ID`, whose addresses discovery finds.
pub fn parse_peer(spec: &str, discovery: bool) -> Result<NodeAddr, NodeError> {
    let bad = |why: String| NodeError::Peer { spec: spec.to_owned(), why };
    let (id, addrs) = match spec.split_once('@') {
        Some(split) => split,
        None if discovery => {
            let node_id: NodeId = spec.parse().map_err(|e| bad(format!("bad node id: {e}")))?;
            return Ok(NodeAddr::new(node_id));
        }
        None => return Err(bad("no '@' (a bare node id needs p2p-local-discovery)".into())),
    };
    let node_id: NodeId = id.parse().map_err(|e| bad(format!("bad node id: {e}")))?;
    let mut direct = BTreeSet::new();
    for a in addrs.split(',') {
        direct.extend(a.to_socket_addrs().map_err(|e| bad(format!("bad address '{a}': {e}")))?);
    }
    if direct.is_empty() {
        return Err(bad("no address".into()));
    }
    Ok(NodeAddr::from_parts(node_id, None, direct))
}

/// The node's secret key, made on first start (readable by the daemon's user only).
fn load_or_make_key(path: &Path) -> Result<SecretKey, NodeError> {
    let err = |why: String| NodeError::Key { path: path.to_owned(), why };
    match fs::read(path) {
        Ok(bytes) => {
            let bytes: [u8; 32] = bytes.try_into().map_err(|_| err("not 32 bytes".into()))?;
            Ok(SecretKey::from_bytes(&bytes))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut bytes))
                .map_err(|e| err(format!("no randomness: {e}")))?;
            let tmp = path.with_extension("new");
            use std::os::unix::fs::OpenOptionsExt;
            let written = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_all()))
                .and_then(|_| fs::rename(&tmp, path));
            written.map_err(|e| err(e.to_string()))?;
            Ok(SecretKey::from_bytes(&bytes))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_node_id_at_addresses() {
        let id = SecretKey::from_bytes(&[3; 32]).public();
        let addr = parse_peer(&format!("{id}@127.0.0.1:7000,[::1]:7001"), false).unwrap();
        assert_eq!(addr.node_id, id);
        assert_eq!(addr.direct_addresses.len(), 2);
        for bad in ["127.0.0.1:7000", &format!("{id}@"), "zz@127.0.0.1:1", &format!("{id}@nohost"), &id.to_string()] {
            let e = parse_peer(bad, false).unwrap_err().to_string();
            assert!(e.starts_with("peers: '"), "{e}");
        }
        // A bare node id only with discovery, which finds its addresses.
        let e = parse_peer(&id.to_string(), false).unwrap_err().to_string();
        assert!(e.contains("needs p2p-local-discovery"), "{e}");
        let bare = parse_peer(&id.to_string(), true).unwrap();
        assert_eq!((bare.node_id, bare.direct_addresses.len()), (id, 0));
        assert!(parse_peer("zz", true).is_err());
    }

    #[test]
    fn the_store_makes_outboards_with_iroh_blobs_chunk_groups() {
        assert_eq!(cairn_store::peers::BLAKE3_BLOCK, iroh_blobs::IROH_BLOCK_SIZE);
    }

    #[test]
    fn the_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let a = load_or_make_key(&path).unwrap();
        let b = load_or_make_key(&path).unwrap();
        assert_eq!(a.public(), b.public());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        fs::write(&path, b"short").unwrap();
        assert!(load_or_make_key(&path).unwrap_err().to_string().contains("not 32 bytes"));
    }
}
