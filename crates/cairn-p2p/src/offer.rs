//! What this node offers its peers: the NAR of every valid store path and every OCI blob in its
//! store, as iroh-blobs entries read straight from the store (a NAR through its
//! [`NarLayout`], a blob from its file), never a copy.
//!
//! Nothing is offered that is not valid: every lookup and every transfer first roots the path
//! and checks it is valid with the hash asked for, and the root is held until the transfer
//! ends, so a collection on this node cannot pull a path out from under a peer reading it.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bao_tree::io::outboard::PostOrderMemOutboard;
use bao_tree::BaoTree;
use bytes::{Bytes, BytesMut};
use cairn_nar_fs::{NarLayout, NarLayoutReader};
use cairn_store::peers::Wanted;
use cairn_store::{LocalStore, TempRootGuard};
use iroh::NodeId;
use iroh_blobs::store::{BaoBlobSize, Map, MapEntry};
use iroh_blobs::IROH_BLOCK_SIZE;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::index::{Index, Row};
use crate::lookup::encode_request;

/// Why something could not be offered (a local failure: the peer is told "not here").
#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    #[error(transparent)]
    Store(#[from] cairn_store::StoreError),
    #[error("the p2p index: {0}")]
    Index(#[from] rusqlite::Error),
    #[error(transparent)]
    Fs(#[from] cairn_nar_fs::FsError),
    #[error("hashing what is offered: {0}")]
    Io(#[from] io::Error),
    #[error("'{0}' does not have the size its metadata says")]
    Size(String),
}

/// How this node serves: limits and what it has served.
pub struct Offer {
    store: Arc<LocalStore>,
    index: Index,
    /// Transfers at once to one peer.
    per_peer: usize,
    slots: Mutex<HashMap<NodeId, Arc<Semaphore>>>,
    pace: Option<Pace>,
    pub(crate) served: Mutex<HashMap<NodeId, u64>>,
    pub(crate) served_bytes: AtomicU64,
    pub(crate) served_objects: AtomicU64,
    /// Lookup keys being hashed now (once each, however many peers ask).
    hashing: Mutex<std::collections::HashSet<Vec<u8>>>,
}

/// What [`Offer::resolve`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    Have([u8; 32], u64),
    /// Valid here, and being hashed for another lookup: ask again.
    Hashing,
    Missing,
}

/// Where an offered thing's bytes are.
#[derive(Debug)]
enum Source {
    Nar(Arc<NarLayout>),
    File(PathBuf),
}

/// Something valid here, rooted while this lives.
struct Opened {
    root: TempRootGuard,
    /// Where it is on disk: a store path's tree, or a blob's file.
    real: PathBuf,
    nar: bool,
    size: u64,
}

impl Opened {
    /// Where its bytes come from (for a NAR, a walk of the tree's metadata).
    fn source(&self, store: &LocalStore, wanted: &Wanted) -> Result<Source, OfferError> {
        if !self.nar {
            return Ok(Source::File(self.real.clone()));
        }
        let layout = NarLayout::of(&self.real)?;
        if layout.size() != self.size {
            let name = match wanted {
                Wanted::Nar { path, .. } => store.store_dir().display(path),
                Wanted::Blob { .. } => self.real.display().to_string(),
            };
            return Err(OfferError::Size(name));
        }
        Ok(Source::Nar(Arc::new(layout)))
    }
}

impl Offer {
    pub fn new(store: Arc<LocalStore>, index: Index, per_peer: usize, upload_rate: u64) -> Offer {
        Offer {
            store,
            index,
            per_peer: per_peer.max(1),
            slots: Mutex::default(),
            pace: (upload_rate > 0).then(|| Pace { rate: upload_rate, next: Mutex::new(Instant::now()) }),
            served: Mutex::default(),
            served_bytes: AtomicU64::new(0),
            served_objects: AtomicU64::new(0),
            hashing: Mutex::default(),
        }
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Roots what `wanted` names and checks that it is valid here with the asked hash and size.
    fn open(&self, wanted: &Wanted) -> Result<Option<Opened>, OfferError> {
        match wanted {
            Wanted::Nar { path, nar_hash, nar_size } => {
                let root = self.store.temp_root([path.clone()]);
                let Some(info) = self.store.path_info(path)? else { return Ok(None) };
                if info.nar_hash != *nar_hash || info.nar_size != *nar_size {
                    return Ok(None);
                }
                Ok(Some(Opened { root, real: self.store.real_path(path), nar: true, size: *nar_size }))
            }
            Wanted::Blob { sha256, size } => {
                let Some(digest) = cairn_oci::Digest::from_hash(&cairn_nix::Hash::sha256(*sha256)) else {
                    return Ok(None);
                };
                let path = cairn_oci::layout::blob_path(self.store.store_dir(), &digest);
                let root = self.store.temp_root([path.clone()]);
                if !self.store.is_valid(&path)? {
                    return Ok(None);
                }
                let file = self.store.real_path(&path);
                let len = std::fs::metadata(&file)?.len();
                if len != *size {
                    return Ok(None);
                }
                Ok(Some(Opened { root, real: file, nar: false, size: len }))
            }
        }
    }

    /// The BLAKE3 hash and size of `wanted` if it is valid here. The first ask reads it once to
    /// hash it and make its outboard; the index remembers both. Blocks: call off the runtime.
    pub fn resolve(&self, wanted: &Wanted) -> Result<Resolved, OfferError> {
        let Ok(key) = encode_request(wanted) else { return Ok(Resolved::Missing) };
        // Not valid (yet: a row hashed in the same pass as a substitution comes before its
        // batch commits; or no longer): not offered, and the row, always right, stays.
        let Some(opened) = self.open(wanted)? else { return Ok(Resolved::Missing) };
        if let Some((blake3, size)) = self.index.get_hash(&key)? {
            return Ok(Resolved::Have(blake3, size));
        }
        if !self.hashing.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key.clone()) {
            return Ok(Resolved::Hashing);
        }
        struct Done<'a>(&'a Offer, &'a [u8]);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.hashing.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(self.1);
            }
        }
        let _done = Done(self, &key);
        let source = opened.source(&self.store, wanted)?;
        let read = SourceRead { reader: SourceReader::open(&source)?, at: 0 };
        let (blake3, outboard) = cairn_store::peers::blake3_outboard(read, opened.size)?;
        let row = Row { blake3, size: opened.size, outboard };
        self.index.put(&key, &row)?;
        drop(opened.root);
        Ok(Resolved::Have(row.blake3, row.size))
    }

    /// The entry a peer's transfer of `hash` reads, if something valid here has that BLAKE3 hash.
    fn entry(self: &Arc<Self>, hash: &iroh_blobs::Hash, requester: NodeId) -> Result<Option<Entry>, OfferError> {
        for key in self.index.keys_of(hash.as_bytes())? {
            let Ok(wanted) = crate::lookup::decode_request(&key) else {
                self.index.remove(&key)?;
                continue;
            };
            let Some(opened) = self.open(&wanted)? else { continue };
            let Some(row) = self.index.get(&key)? else { continue };
            // A row cut short (the index is written without waiting for the disk) is dropped,
            // not served: bao would read past its end.
            if row.outboard.len() as u64 != BaoTree::new(row.size, IROH_BLOCK_SIZE).outboard_size() {
                self.index.remove(&key)?;
                continue;
            }
            return Ok(Some(Entry {
                hash: *hash,
                size: row.size,
                outboard: Bytes::from(row.outboard),
                source: Arc::new(opened.source(&self.store, &wanted)?),
                _root: Arc::new(opened.root),
                _slot: None,
                offer: self.clone(),
                requester,
            }));
        }
        Ok(None)
    }

    fn slot(&self, peer: NodeId) -> Arc<Semaphore> {
        let mut slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        slots.entry(peer).or_insert_with(|| Arc::new(Semaphore::new(self.per_peer))).clone()
    }

    fn count_served(&self, peer: NodeId, n: u64) {
        self.served_bytes.fetch_add(n, Ordering::Relaxed);
        *self.served.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(peer).or_default() += n;
    }
}

impl cairn_store::peers::Offered for Offer {
    fn hashed(&self, wanted: Wanted, blake3: [u8; 32], outboard: Vec<u8>) {
        let size = match &wanted {
            Wanted::Nar { nar_size, .. } => *nar_size,
            Wanted::Blob { size, .. } => *size,
        };
        let Ok(key) = encode_request(&wanted) else { return };
        if let Err(e) = self.index.put(&key, &Row { blake3, size, outboard }) {
            tracing::warn!("p2p index: {e}");
        }
    }
}

/// Reads a source's bytes at any offset, keeping what it reads from open.
enum SourceReader {
    Nar(NarLayoutReader<Arc<NarLayout>>),
    File(File),
}

impl SourceReader {
    fn open(source: &Source) -> io::Result<SourceReader> {
        Ok(match source {
            Source::Nar(layout) => SourceReader::Nar(NarLayoutReader::new(layout.clone())),
            Source::File(path) => SourceReader::File(File::open(path)?),
        })
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            SourceReader::Nar(nar) => nar.read_at(offset, buf),
            SourceReader::File(file) => file.read_at(buf, offset),
        }
    }
}

/// A source read from its start (for hashing it).
struct SourceRead {
    reader: SourceReader,
    at: u64,
}

impl io::Read for SourceRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.reader.read_at(self.at, buf)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// The offer as one peer's connection sees it (transfers are counted and limited per peer).
#[derive(Clone)]
pub struct PeerView {
    pub(crate) offer: Arc<Offer>,
    pub(crate) requester: NodeId,
}

impl Map for PeerView {
    type Entry = Entry;

    async fn get(&self, hash: &iroh_blobs::Hash) -> io::Result<Option<Entry>> {
        let slot = tokio::time::timeout(SLOT_WAIT, self.offer.slot(self.requester).acquire_owned())
            .await
            .map_err(|_| io::Error::other("this peer's transfers are all busy"))?
            .map_err(io::Error::other)?;
        // A tree walk and SQLite: not on the provider's few threads.
        let (offer, hash, requester) = (self.offer.clone(), *hash, self.requester);
        let entry = tokio::task::spawn_blocking(move || offer.entry(&hash, requester))
            .await
            .map_err(io::Error::other)?
            .map_err(|e| {
                tracing::warn!("p2p: cannot offer {hash}: {e}");
                io::Error::other(e.to_string())
            })?;
        if entry.is_some() {
            self.offer.served_objects.fetch_add(1, Ordering::Relaxed);
        }
        Ok(entry.map(|e| Entry { _slot: Some(Arc::new(slot)), ..e }))
    }
}

/// One offered thing during one transfer.
#[derive(Clone)]
pub struct Entry {
    hash: iroh_blobs::Hash,
    size: u64,
    outboard: Bytes,
    source: Arc<Source>,
    _root: Arc<TempRootGuard>,
    _slot: Option<Arc<OwnedSemaphorePermit>>,
    offer: Arc<Offer>,
    requester: NodeId,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("hash", &self.hash).field("size", &self.size).finish()
    }
}

impl MapEntry for Entry {
    fn hash(&self) -> iroh_blobs::Hash {
        self.hash
    }

    fn size(&self) -> BaoBlobSize {
        BaoBlobSize::Verified(self.size)
    }

    fn is_complete(&self) -> bool {
        true
    }

    async fn outboard(&self) -> io::Result<impl bao_tree::io::fsm::Outboard> {
        Ok(PostOrderMemOutboard {
            root: bao_tree::blake3::Hash::from_bytes(*self.hash.as_bytes()),
            tree: BaoTree::new(self.size, IROH_BLOCK_SIZE),
            data: self.outboard.clone(),
        })
    }

    async fn data_reader(&self) -> io::Result<impl iroh_io::AsyncSliceReader> {
        let reader = SourceReader::open(&self.source)?;
        Ok(EntryReader { size: self.size, reader, offer: self.offer.clone(), requester: self.requester })
    }
}

/// Reads an entry's bytes for iroh-blobs' provider, counting and pacing them.
struct EntryReader {
    size: u64,
    reader: SourceReader,
    offer: Arc<Offer>,
    requester: NodeId,
}

impl iroh_io::AsyncSliceReader for EntryReader {
    async fn read_at(&mut self, offset: u64, len: usize) -> io::Result<Bytes> {
        // A transfer reads chunk groups (16 KiB); only a request for a hash sequence (which
        // cairn never offers) reads a whole entry at once, and would hold it all in memory.
        if len > MAX_READ {
            return Err(io::Error::other("refused: a read larger than a transfer makes"));
        }
        let len = len.min(self.size.saturating_sub(offset) as usize);
        let mut buf = BytesMut::zeroed(len);
        let mut done = 0;
        while done < len {
            let n = self.reader.read_at(offset + done as u64, &mut buf[done..])?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "an offered file ended early"));
            }
            done += n;
        }
        self.offer.count_served(self.requester, len as u64);
        if let Some(pace) = &self.offer.pace {
            tokio::time::sleep(pace.wait(len as u64)).await;
        }
        Ok(buf.freeze())
    }

    async fn size(&mut self) -> io::Result<u64> {
        Ok(self.size)
    }
}

/// The largest read a transfer may ask of an entry.
const MAX_READ: usize = 1 << 20;
/// How long a transfer waits for one of its peer's slots.
const SLOT_WAIT: Duration = Duration::from_secs(60);

/// The node's upload bandwidth, shared by every transfer: each read waits its turn.
struct Pace {
    /// Bytes per second.
    rate: u64,
    /// When the link is free again.
    next: Mutex<Instant>,
}

impl Pace {
    fn wait(&self, bytes: u64) -> Duration {
        let mut next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let start = (*next).max(now);
        *next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        start - now
    }
}
