//! The index from what users ask by to BLAKE3: one row per thing this node has offered, with
//! the BLAKE3 hash, the size and the bao outboard (the tree of chunk-group hashes iroh-blobs
//! streams beside the bytes so that the receiver can check each chunk as it arrives).
//!
//! Rows are keyed by the lookup request's own bytes ([`crate::lookup::encode_request`]): a store
//! path's name *and* NAR hash, or a blob's sha256. The same key always names the same bytes, so
//! a row never goes wrong. A row may be written before its path is valid (hashed in the same
//! pass as a substitution whose batch has not committed) and outlives a collected path, so
//! every use checks that the path is valid first; rows are small (an outboard is 1/256 of its
//! object) and are not swept. It is a memo of work that can be done
//! again: losing it costs a pass over the data, never a wrong answer, so it is written without
//! waiting for the disk.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

/// A thing's BLAKE3 hash, size and outboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub blake3: [u8; 32],
    pub size: u64,
    pub outboard: Vec<u8>,
}

pub struct Index {
    db: Mutex<Connection>,
}

impl Index {
    pub fn open(path: &Path) -> rusqlite::Result<Index> {
        let db = Connection::open(path)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = OFF;
             CREATE TABLE IF NOT EXISTS offers (
                 key BLOB PRIMARY KEY,
                 blake3 BLOB NOT NULL,
                 size INTEGER NOT NULL,
                 outboard BLOB NOT NULL
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS offers_by_blake3 ON offers (blake3);",
        )?;
        Ok(Index { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        // Every statement is one implicit transaction: a panic elsewhere leaves nothing half-done.
        self.db.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self, key: &[u8]) -> rusqlite::Result<Option<Row>> {
        self.db()
            .query_row("SELECT blake3, size, outboard FROM offers WHERE key = ?1", [key], |r| {
                Ok(Row { blake3: r.get(0)?, size: r.get::<_, i64>(1)? as u64, outboard: r.get(2)? })
            })
            .optional()
    }

    /// A row's BLAKE3 hash and size, without its outboard (what a lookup answers).
    pub fn get_hash(&self, key: &[u8]) -> rusqlite::Result<Option<([u8; 32], u64)>> {
        self.db()
            .query_row("SELECT blake3, size FROM offers WHERE key = ?1", [key], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
            })
            .optional()
    }

    /// The keys that have this BLAKE3 hash (one in practice; a path and a blob can share bytes).
    pub fn keys_of(&self, blake3: &[u8; 32]) -> rusqlite::Result<Vec<Vec<u8>>> {
        let db = self.db();
        let mut st = db.prepare_cached("SELECT key FROM offers WHERE blake3 = ?1")?;
        let keys = st.query_map([blake3.as_slice()], |r| r.get(0))?.collect();
        keys
    }

    pub fn put(&self, key: &[u8], row: &Row) -> rusqlite::Result<()> {
        self.db().execute(
            "INSERT OR REPLACE INTO offers (key, blake3, size, outboard) VALUES (?1, ?2, ?3, ?4)",
            params![key, row.blake3.as_slice(), row.size as i64, row.outboard],
        )?;
        Ok(())
    }

    pub fn remove(&self, key: &[u8]) -> rusqlite::Result<()> {
        self.db().execute("DELETE FROM offers WHERE key = ?1", [key])?;
        Ok(())
    }

    /// How many things are indexed.
    pub fn count(&self) -> rusqlite::Result<u64> {
        self.db().query_row("SELECT count(*) FROM offers", [], |r| r.get::<_, i64>(0)).map(|n| n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_found_by_key_and_by_blake3_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("p2p.sqlite")).unwrap();
        let row = Row { blake3: [7; 32], size: 42, outboard: vec![1, 2, 3] };
        index.put(b"k1", &row).unwrap();
        assert_eq!(index.get(b"k1").unwrap(), Some(row.clone()));
        assert_eq!(index.keys_of(&[7; 32]).unwrap(), vec![b"k1".to_vec()]);
        index.remove(b"k1").unwrap();
        assert_eq!(index.get(b"k1").unwrap(), None);
        assert_eq!(index.count().unwrap(), 0);
    }
}
