//! cairn's reference graph in SQLite.
//!
//! The database says which store paths are *valid* (complete, registered, safe to use) and
//! records for each its NAR hash and size, registration time, deriver, signatures, content
//! address and references, plus the outputs of registered derivations. A path's contents on disk
//! mean nothing until its row is committed here.
//!
//! Tables follow Nix's `ValidPaths`/`Refs`/`DerivationOutputs` so that the concepts map one to
//! one, but paths are stored as base names (`<hash>-<name>`): the store directory is fixed for a
//! database's life and need not be repeated a hundred thousand times.
//!
//! Closure queries do not walk the database: [`Graph`] loads the `Refs` table once into integer
//! adjacency lists keyed by row id, and answers closures with a bitset walk.
//!
//! **Architecture invariant:** this crate never touches the store directory. It knows rows, not
//! files; the store crate keeps the two in step.

mod graph;
mod schema;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use cairn_nix::{ContentAddress, Hash, StorePath};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use thiserror::Error;

pub use graph::{Direction, Graph};

/// What the database says a valid path's contents are: enough to check them (`verify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedContents {
    pub path: StorePath,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub ca: Option<ContentAddress>,
}

/// Everything the database knows about a valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    /// SHA-256 of the path's NAR.
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    /// Seconds since the epoch.
    pub registration_time: i64,
    /// Whether this store built the path itself (rather than trusting a signature).
    pub ultimate: bool,
    /// Signatures in Nix's `keyname:base64` form.
    pub signatures: BTreeSet<String>,
    pub ca: Option<ContentAddress>,
}

impl PathInfo {
    /// Signatures of the path's metadata by `keys`, over Nix's fingerprint of it (path, NAR
    /// hash and size, references), as `secret-key-files` sign what a store builds.
    pub fn signatures_by(
        &self,
        dir: &cairn_nix::StoreDir,
        keys: &[cairn_nix::signing::SecretKey],
    ) -> cairn_nix::signing::Result<BTreeSet<String>> {
        let fp = cairn_nix::signing::fingerprint(dir, &self.path, &self.nar_hash, self.nar_size, &self.references)?;
        Ok(keys.iter().map(|k| k.sign(&fp)).collect())
    }

    /// The path as a binary cache describes it, its NAR at `url` compressed with `compression`
    /// (no file hash or size: a served NAR is compressed as it is sent).
    pub fn into_narinfo(self, url: String, compression: &str) -> cairn_nix::narinfo::NarInfo {
        cairn_nix::narinfo::NarInfo {
            store_path: self.path,
            url,
            compression: compression.to_owned(),
            file_hash: None,
            file_size: None,
            nar_hash: self.nar_hash,
            nar_size: self.nar_size,
            references: self.references,
            deriver: self.deriver,
            system: None,
            signatures: self.signatures.into_iter().collect(),
            ca: self.ca.map(|c| c.to_string()),
            extra: Vec::new(),
        }
    }
}

/// Why a database operation failed.
#[derive(Debug, Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database schema version {found} is newer than this cairn understands ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("database row for '{path}' is corrupt: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("cannot register '{path}': its reference '{reference}' is not valid")]
    MissingReference { path: String, reference: String },
    #[error("path '{0}' is not valid")]
    NotValid(String),
    /// Nix's words for the same refusal.
    #[error("cycle detected in the references of '{path}' from '{reference}'")]
    ReferenceCycle { path: String, reference: String },
    #[error("cannot invalidate '{0}': a valid path still references it")]
    StillReferenced(String),
    #[error("cannot flush the database's log '{}': {source}", path.display())]
    Flush { path: std::path::PathBuf, source: std::io::Error },
}

/// Per-path facts the garbage collector reads once, keyed by graph id.
#[derive(Debug, Default)]
pub struct GcMetadata {
    pub nar_size: std::collections::HashMap<u32, u64>,
    pub deriver: std::collections::HashMap<u32, StorePath>,
    /// Outputs recorded for a derivation (`DerivationOutputs`), valid or not.
    pub outputs: std::collections::HashMap<u32, Vec<StorePath>>,
}

pub type Result<T> = std::result::Result<T, DbError>;

/// A connection to the reference graph.
pub struct Db {
    conn: Connection,
    /// The write-ahead log's file, for [`flush`](Db::flush); `None` in memory.
    wal: Option<PathBuf>,
    /// Whether a commit since the last flush was made without syncing the log.
    unflushed: bool,
}

/// Refuses a batch whose paths refer to each other in a cycle (a path may refer to itself).
///
/// Paths already valid cannot refer to a path of the batch, so a cycle can only run through the
/// batch; a depth-first search over its own edges finds one before anything is written.
fn check_acyclic(infos: &[PathInfo]) -> Result<()> {
    let index: std::collections::HashMap<&StorePath, usize> =
        infos.iter().enumerate().map(|(i, info)| (&info.path, i)).collect();
    let edges = |i: usize| {
        let info = &infos[i];
        info.references.iter().filter(move |r| **r != info.path).filter_map(|r| index.get(r).copied())
    };
    // 0: not visited, 1: on the current path, 2: done.
    let mut state = vec![0u8; infos.len()];
    for start in 0..infos.len() {
        if state[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, Vec<usize>)> = vec![(start, edges(start).collect())];
        state[start] = 1;
        while let Some((node, pending)) = stack.last_mut() {
            let node = *node;
            match pending.pop() {
                Some(next) if state[next] == 1 => {
                    return Err(DbError::ReferenceCycle {
                        path: infos[next].path.to_string(),
                        reference: infos[node].path.to_string(),
                    });
                }
                Some(next) if state[next] == 0 => {
                    state[next] = 1;
                    stack.push((next, edges(next).collect()));
                }
                Some(_) => {}
                None => {
                    state[node] = 2;
                    stack.pop();
                }
            }
        }
    }
    Ok(())
}

fn corrupt(path: &str, detail: impl ToString) -> DbError {
    DbError::Corrupt { path: path.to_owned(), detail: detail.to_string() }
}

fn parse_path(s: &str) -> Result<StorePath> {
    StorePath::from_base_name(s).map_err(|e| corrupt(s, e))
}

/// The most memory SQLite's page cache may take (`PRAGMA cache_size`): enough to keep the
/// hot part of a large store's metadata in memory, and a bound a long-running daemon's resident
/// memory can be judged against.
pub const PAGE_CACHE_LIMIT: u64 = 64 << 20;

impl Db {
    /// Opens (creating and migrating as needed) the database at `path`, in WAL mode with
    /// synchronous commits: a registration that returned is on disk.
    ///
    /// The database belongs to one process (the store lock guarantees it), so it is opened in
    /// exclusive locking mode: SQLite then takes its file locks once instead of around every
    /// query, which is most of the cost of a point query.
    pub fn open(path: &Path) -> Result<Db> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "cache_size", -(PAGE_CACHE_LIMIT as i64 / 1024))?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Ok(Db { wal: Some(wal.into()), ..Db::setup(conn)? })
    }

    /// A private in-memory database, for tests.
    pub fn open_in_memory() -> Result<Db> {
        Db::setup(Connection::open_in_memory()?)
    }

    fn setup(mut conn: Connection) -> Result<Db> {
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // The query planner's stability guarantee: a cached statement keeps its plan whatever
        // is bound to it. Without it, SQLite (built with STAT4) re-prepares the references
        // query at every new path, which was most of the cost of a point query.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        conn.busy_timeout(std::time::Duration::from_secs(60))?;
        schema::migrate(&mut conn)?;
        Ok(Db { conn, wal: None, unflushed: false })
    }

    /// The schema version this database is at.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    fn id_of(tx: &Connection, path: &StorePath) -> Result<Option<i64>> {
        Ok(tx
            .prepare_cached("SELECT id FROM ValidPaths WHERE path = ?1")?
            .query_row([path.to_string()], |r| r.get(0))
            .optional()?)
    }

    pub fn is_valid(&self, path: &StorePath) -> Result<bool> {
        Ok(Db::id_of(&self.conn, path)?.is_some())
    }

    /// The valid path whose hash part is `hash_part` (32 nixbase32 characters), if any: how a
    /// binary cache finds the path a `<hash>.narinfo` request names.
    pub fn path_from_hash_part(&self, hash_part: &str) -> Result<Option<StorePath>> {
        // Paths are stored by base name, `<hash>-<name>`; '.' is the character after '-'.
        let path: Option<String> = self
            .conn
            .prepare_cached("SELECT path FROM ValidPaths WHERE path > ?1 AND path < ?2 LIMIT 1")?
            .query_row([format!("{hash_part}-"), format!("{hash_part}.")], |r| r.get(0))
            .optional()?;
        path.map(|p| parse_path(&p)).transpose()
    }

    /// Adds signatures to a valid path's (Nix's `addSignatures`): the union is kept, so adding
    /// one twice changes nothing.
    pub fn add_signatures(&mut self, path: &StorePath, sigs: &BTreeSet<String>) -> Result<()> {
        let tx = self.conn.transaction()?;
        let old: Option<Option<String>> = tx
            .prepare_cached("SELECT sigs FROM ValidPaths WHERE path = ?1")?
            .query_row([path.to_string()], |r| r.get(0))
            .optional()?;
        let Some(old) = old else { return Err(DbError::NotValid(path.to_string())) };
        let mut all: BTreeSet<String> = old.unwrap_or_default().split_whitespace().map(str::to_owned).collect();
        all.extend(sigs.iter().cloned());
        let joined = all.into_iter().collect::<Vec<_>>().join(" ");
        tx.execute("UPDATE ValidPaths SET sigs = ?1 WHERE path = ?2", params![joined, path.to_string()])?;
        tx.commit()?;
        Ok(())
    }

    /// The metadata of a valid path, or `None`.
    pub fn path_info(&self, path: &StorePath) -> Result<Option<PathInfo>> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT id, hash, registrationTime, deriver, narSize, ultimate, sigs, ca FROM ValidPaths WHERE path = ?1",
            )?
            .query_row([path.to_string()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, bool>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                ))
            })
            .optional()?;
        let Some((id, hash, time, deriver, size, ultimate, sigs, ca)) = row else { return Ok(None) };
        let p = path.to_string();
        let references = self
            .conn
            .prepare_cached("SELECT v.path FROM Refs r JOIN ValidPaths v ON r.reference = v.id WHERE r.referrer = ?1")?
            .query_map([id], |r| r.get::<_, String>(0))?
            .map(|s| parse_path(&s?))
            .collect::<Result<_>>()?;
        Ok(Some(PathInfo {
            path: path.clone(),
            nar_hash: hash.parse().map_err(|e| corrupt(&p, e))?,
            nar_size: u64::try_from(size).map_err(|e| corrupt(&p, e))?,
            references,
            deriver: deriver.filter(|d| !d.is_empty()).map(|d| parse_path(&d)).transpose()?,
            registration_time: time,
            ultimate,
            signatures: sigs.unwrap_or_default().split_whitespace().map(str::to_owned).collect(),
            ca: ca.filter(|c| !c.is_empty()).map(|c| c.parse().map_err(|e| corrupt(&p, e))).transpose()?,
        }))
    }

    /// Registers paths in one transaction: all become valid together or none does. Every
    /// reference must be valid already or be among `infos`. Already-valid paths are left as
    /// they are. Returns the row ids of the paths, in order.
    pub fn register(&mut self, infos: &[PathInfo]) -> Result<Vec<i64>> {
        self.register_with_outputs(infos, &[])
    }

    /// [`register`](Self::register), recording in the same transaction the outputs of the
    /// derivations among `infos` (as Nix does when a `.drv` becomes valid).
    pub fn register_with_outputs(
        &mut self,
        infos: &[PathInfo],
        drv_outputs: &[(StorePath, BTreeMap<String, StorePath>)],
    ) -> Result<Vec<i64>> {
        let tx = self.conn.transaction()?;
        let ids = Db::register_in(&tx, infos)?;
        for (drv, outputs) in drv_outputs {
            Db::record_outputs(&tx, drv, outputs)?;
        }
        cairn_fault::point("in-transaction");
        tx.commit()?;
        Ok(ids)
    }

    /// [`register_with_outputs`](Self::register_with_outputs) of paths whose contents may not
    /// be on disk yet, without waiting for the disk: the paths are valid at once, and the
    /// registration reaches the disk with the next synchronous commit or
    /// [`flush`](Self::flush). Each path is marked, in the same transaction, as
    /// registered before its contents were synced. The marks go with
    /// [`clear_unsynced`](Self::clear_unsynced) once the file system is synced; a mark found
    /// when the store opens means a crash may have lost the contents, which are then checked
    /// ([`unsynced`](Self::unsynced), [`forget_with_referrers`](Self::forget_with_referrers)).
    /// A registration can reach the disk before its contents (a checkpoint, a later
    /// synchronous commit, the kernel's writeback of the log), but never without its mark.
    pub fn register_unsynced(
        &mut self,
        infos: &[PathInfo],
        drv_outputs: &[(StorePath, BTreeMap<String, StorePath>)],
    ) -> Result<Vec<i64>> {
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let registered = (|| -> Result<Vec<i64>> {
            let tx = self.conn.transaction()?;
            let ids = Db::register_in(&tx, infos)?;
            for (drv, outputs) in drv_outputs {
                Db::record_outputs(&tx, drv, outputs)?;
            }
            {
                let mut mark = tx.prepare_cached("INSERT OR IGNORE INTO Unsynced (id) VALUES (?1)")?;
                for id in &ids {
                    mark.execute([id])?;
                }
            }
            cairn_fault::point("in-transaction");
            tx.commit()?;
            Ok(ids)
        })();
        let restored = self.conn.pragma_update(None, "synchronous", "FULL");
        let ids = registered?;
        self.unflushed = true;
        restored?;
        Ok(ids)
    }

    /// The newest mark of [`register_unsynced`](Self::register_unsynced), if any: what a sync
    /// of the file system started now covers.
    pub fn unsynced_bound(&self) -> Result<Option<i64>> {
        Ok(self.conn.query_row("SELECT max(id) FROM Unsynced", [], |r| r.get(0))?)
    }

    /// Removes the marks up to `bound` (the file system was synced after they were made), in a
    /// synchronous commit, which puts every earlier commit on disk too.
    pub fn clear_unsynced(&mut self, bound: i64) -> Result<()> {
        self.conn.execute("DELETE FROM Unsynced WHERE id <= ?1", [bound])?;
        self.unflushed = false;
        Ok(())
    }

    /// The paths still marked by [`register_unsynced`](Self::register_unsynced).
    pub fn unsynced(&self) -> Result<Vec<StorePath>> {
        self.conn
            .prepare("SELECT v.path FROM Unsynced u JOIN ValidPaths v ON u.id = v.id ORDER BY u.id")?
            .query_map([], |r| r.get::<_, String>(0))?
            .map(|s| parse_path(&s?))
            .collect()
    }

    /// Invalidates `paths` and every valid path that refers to them, directly or not, in one
    /// transaction; returns them all. What a crash left half-written goes with everything
    /// built on it.
    pub fn forget_with_referrers(&mut self, paths: &[StorePath]) -> Result<Vec<StorePath>> {
        let tx = self.conn.transaction()?;
        let mut doomed: BTreeMap<i64, String> = BTreeMap::new();
        {
            let mut closure = tx.prepare_cached(
                "WITH RECURSIVE doomed(id) AS (
                     SELECT id FROM ValidPaths WHERE path = ?1
                     UNION SELECT r.referrer FROM Refs r JOIN doomed d ON r.reference = d.id
                 ) SELECT v.id, v.path FROM doomed d JOIN ValidPaths v ON v.id = d.id",
            )?;
            for p in paths {
                for row in closure.query_map([p.to_string()], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))? {
                    let (id, path) = row?;
                    doomed.insert(id, path);
                }
            }
            // Their own references first: every referrer of one of them is one of them.
            let mut refs = tx.prepare_cached("DELETE FROM Refs WHERE referrer = ?1")?;
            for id in doomed.keys() {
                refs.execute([id])?;
            }
            let mut outs = tx.prepare_cached("DELETE FROM DerivationOutputs WHERE drv = ?1")?;
            let mut row = tx.prepare_cached("DELETE FROM ValidPaths WHERE id = ?1")?;
            for id in doomed.keys() {
                outs.execute([id])?;
                row.execute([id])?;
            }
        }
        tx.commit()?;
        doomed.values().map(|p| parse_path(p)).collect()
    }

    /// Puts every commit made so far on disk: after it, nothing
    /// [`register_unsynced`](Self::register_unsynced) registered can be lost.
    pub fn flush(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.unflushed) {
            return Ok(());
        }
        let Some(wal) = &self.wal else { return Ok(()) };
        // A checkpoint since then synced the log before copying it and the database after;
        // what is in the log now is synced here. No log at all: everything was checkpointed.
        let synced = match std::fs::File::open(wal) {
            Ok(f) => f.sync_data(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        synced.map_err(|source| {
            self.unflushed = true;
            DbError::Flush { path: wal.clone(), source }
        })
    }

    fn record_outputs(tx: &Connection, drv: &StorePath, outputs: &BTreeMap<String, StorePath>) -> Result<()> {
        let id = Db::id_of(tx, drv)?.ok_or_else(|| DbError::NotValid(drv.to_string()))?;
        let mut st =
            tx.prepare_cached("INSERT OR REPLACE INTO DerivationOutputs (drv, id, path) VALUES (?1, ?2, ?3)")?;
        for (name, path) in outputs {
            st.execute(params![id, name, path.to_string()])?;
        }
        Ok(())
    }

    fn register_in(tx: &Transaction<'_>, infos: &[PathInfo]) -> Result<Vec<i64>> {
        check_acyclic(infos)?;
        let mut ids = Vec::with_capacity(infos.len());
        let mut fresh = Vec::new();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for info in infos {
                if let Some(id) = Db::id_of(tx, &info.path)? {
                    ids.push(id);
                    continue;
                }
                let sigs = info.signatures.iter().cloned().collect::<Vec<_>>().join(" ");
                insert.execute(params![
                    info.path.to_string(),
                    info.nar_hash.to_string(),
                    info.registration_time,
                    info.deriver.as_ref().map(StorePath::to_string),
                    info.nar_size as i64,
                    info.ultimate,
                    (!sigs.is_empty()).then_some(sigs),
                    info.ca.as_ref().map(ContentAddress::to_string),
                ])?;
                let id = tx.last_insert_rowid();
                ids.push(id);
                fresh.push((id, info));
            }
        }
        // References within the batch are resolved from the ids just assigned, not by a lookup
        // each (an import of 100k paths has some 300k references).
        let batch: std::collections::HashMap<&StorePath, i64> =
            infos.iter().map(|i| &i.path).zip(ids.iter().copied()).collect();
        let mut add_ref = tx.prepare_cached("INSERT OR IGNORE INTO Refs (referrer, reference) VALUES (?1, ?2)")?;
        for (id, info) in fresh {
            for r in &info.references {
                let rid = match batch.get(r) {
                    Some(&rid) => rid,
                    None => Db::id_of(tx, r)?.ok_or_else(|| DbError::MissingReference {
                        path: info.path.to_string(),
                        reference: r.to_string(),
                    })?,
                };
                add_ref.execute([id, rid])?;
            }
        }
        Ok(ids)
    }

    /// Records the outputs of a registered derivation.
    pub fn register_derivation_outputs(
        &mut self,
        drv: &StorePath,
        outputs: &BTreeMap<String, StorePath>,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        Db::record_outputs(&tx, drv, outputs)?;
        tx.commit()?;
        Ok(())
    }

    /// The valid derivations that record `path` among their outputs (Nix's
    /// `queryValidDerivers`), through the index on `DerivationOutputs(path)`.
    pub fn valid_derivers(&self, path: &StorePath) -> Result<BTreeSet<StorePath>> {
        self.conn
            .prepare_cached(
                "SELECT v.path FROM DerivationOutputs o JOIN ValidPaths v ON o.drv = v.id WHERE o.path = ?1",
            )?
            .query_map([path.to_string()], |r| r.get::<_, String>(0))?
            .map(|s| parse_path(&s?))
            .collect()
    }

    /// The recorded outputs of a derivation.
    pub fn derivation_outputs(&self, drv: &StorePath) -> Result<BTreeMap<String, StorePath>> {
        self.conn
            .prepare_cached(
                "SELECT o.id, o.path FROM DerivationOutputs o JOIN ValidPaths v ON o.drv = v.id WHERE v.path = ?1",
            )?
            .query_map([drv.to_string()], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .map(|row| {
                let (name, path) = row?;
                Ok((name, parse_path(&path)?))
            })
            .collect()
    }

    /// Valid paths that reference `path`.
    pub fn referrers(&self, path: &StorePath) -> Result<BTreeSet<StorePath>> {
        self.conn
            .prepare_cached(
                "SELECT v.path FROM Refs r JOIN ValidPaths v ON r.referrer = v.id
                 WHERE r.reference = (SELECT id FROM ValidPaths WHERE path = ?1)",
            )?
            .query_map([path.to_string()], |r| r.get::<_, String>(0))?
            .map(|s| parse_path(&s?))
            .collect()
    }

    /// Number of valid paths.
    pub fn count(&self) -> Result<u64> {
        Ok(self.conn.query_row("SELECT count(*) FROM ValidPaths", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Invalidates paths, given by row id (the graph's ids), in one transaction: their rows,
    /// references and derivation outputs go together, or (on any error) none do. Callers
    /// invalidate referrers before what they reference; a path still referenced by a valid path
    /// outside the batch is refused (`Refs.reference` is `ON DELETE RESTRICT`), so the graph can
    /// never lose a reference. Ids that are not valid are skipped.
    pub fn invalidate(&mut self, ids: &[i64]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            // A path's own outgoing references go first: a self-reference would otherwise
            // restrict its own deletion.
            let mut refs = tx.prepare_cached("DELETE FROM Refs WHERE referrer = ?1")?;
            let mut outs = tx.prepare_cached("DELETE FROM DerivationOutputs WHERE drv = ?1")?;
            let mut row = tx.prepare_cached("DELETE FROM ValidPaths WHERE id = ?1")?;
            for &id in ids {
                refs.execute([id])?;
                outs.execute([id])?;
                if let Err(e) = row.execute([id]) {
                    return Err(match e {
                        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                            let path: String = tx
                                .query_row("SELECT path FROM ValidPaths WHERE id = ?1", [id], |r| r.get(0))
                                .unwrap_or_else(|_| format!("row {id}"));
                            DbError::StillReferenced(path)
                        }
                        other => other.into(),
                    });
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The row id of a valid path.
    pub fn id(&self, path: &StorePath) -> Result<Option<i64>> {
        Db::id_of(&self.conn, path)
    }

    /// What the garbage collector needs beyond the graph, by row id: each path's NAR size and
    /// deriver, and the outputs recorded for each derivation.
    pub fn gc_metadata(&self) -> Result<GcMetadata> {
        let mut meta = GcMetadata::default();
        let mut st = self.conn.prepare("SELECT id, narSize, deriver FROM ValidPaths")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let id = r.get::<_, i64>(0)? as u32;
            meta.nar_size.insert(id, r.get::<_, i64>(1)? as u64);
            if let Some(d) = r.get::<_, Option<String>>(2)?.filter(|d| !d.is_empty()) {
                meta.deriver.insert(id, parse_path(&d)?);
            }
        }
        let mut st = self.conn.prepare("SELECT drv, path FROM DerivationOutputs")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let path: String = r.get(1)?;
            meta.outputs.entry(r.get::<_, i64>(0)? as u32).or_default().push(parse_path(&path)?);
        }
        Ok(meta)
    }

    /// The bytes SQLite's page cache holds now (`SQLITE_DBSTATUS_CACHE_USED`), at most about
    /// [`PAGE_CACHE_LIMIT`].
    pub fn page_cache_bytes(&self) -> u64 {
        let (mut current, mut highest) = (0, 0);
        // SAFETY: the handle is this open connection's, used on this thread while `self` is
        // borrowed; sqlite3_db_status only reads the connection's counters into the two ints.
        #[allow(unsafe_code)]
        let rc = unsafe {
            rusqlite::ffi::sqlite3_db_status(
                self.conn.handle(),
                rusqlite::ffi::SQLITE_DBSTATUS_CACHE_USED,
                &mut current,
                &mut highest,
                0,
            )
        };
        if rc == rusqlite::ffi::SQLITE_OK {
            current.max(0) as u64
        } else {
            0
        }
    }

    /// Problems SQLite finds in the file and in the references (`quick_check`,
    /// `foreign_key_check`), one line each; empty when all is well.
    pub fn check_integrity(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut st = self.conn.prepare("PRAGMA quick_check")?;
        for row in st.query_map([], |r| r.get::<_, String>(0))? {
            let row = row?;
            if row != "ok" {
                out.push(format!("database: {row}"));
            }
        }
        let mut st = self.conn.prepare("PRAGMA foreign_key_check")?;
        let rows =
            st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?, r.get::<_, String>(2)?)))?;
        for row in rows {
            let (table, rowid, parent) = row?;
            out.push(format!("database: row {} of {table} refers to a missing row of {parent}", rowid.unwrap_or(-1)));
        }
        Ok(out)
    }

    /// Every valid path with its NAR hash and size, for `verify`.
    pub fn all_hashes(&self) -> Result<Vec<RecordedContents>> {
        let mut st = self.conn.prepare("SELECT path, hash, narSize, ca FROM ValidPaths ORDER BY path")?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, Option<String>>(3)?))
        })?;
        rows.map(|row| {
            let (path, hash, size, ca) = row?;
            let nar_hash = hash.parse().map_err(|e| corrupt(&path, e))?;
            let ca = ca.filter(|c| !c.is_empty()).map(|c| c.parse().map_err(|e| corrupt(&path, e))).transpose()?;
            Ok(RecordedContents { path: parse_path(&path)?, nar_hash, nar_size: size as u64, ca })
        })
        .collect()
    }

    /// Reads every valid path and reference into a [`Graph`].
    pub fn load_graph(&self) -> Result<Graph> {
        let mut g = Graph::default();
        let mut st = self.conn.prepare("SELECT id, path FROM ValidPaths")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let path: String = r.get(1)?;
            g.insert_node(r.get::<_, i64>(0)? as u32, parse_path(&path)?);
        }
        let mut st = self.conn.prepare("SELECT referrer, reference FROM Refs")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            g.insert_edge(r.get::<_, i64>(0)? as u32, r.get::<_, i64>(1)? as u32);
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests;
