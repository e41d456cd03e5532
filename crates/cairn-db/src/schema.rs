//! The versioned schema. `PRAGMA user_version` holds the number of migrations applied; each
//! migration runs once, in order, in its own transaction. A database written by a newer cairn
//! is refused rather than misread.

use rusqlite::Connection;

use crate::{DbError, Result};

/// Migration `i` brings the schema from version `i` to `i + 1`. Append; never edit.
const MIGRATIONS: &[&str] = &[
    // 1: the reference graph.
    "CREATE TABLE ValidPaths (
        id               INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
        path             TEXT UNIQUE NOT NULL,
        hash             TEXT NOT NULL,
        registrationTime INTEGER NOT NULL,
        deriver          TEXT,
        narSize          INTEGER NOT NULL,
        ultimate         INTEGER NOT NULL DEFAULT 0,
        sigs             TEXT,
        ca               TEXT
    );
    CREATE TABLE Refs (
        referrer  INTEGER NOT NULL REFERENCES ValidPaths(id) ON DELETE CASCADE,
        reference INTEGER NOT NULL REFERENCES ValidPaths(id) ON DELETE RESTRICT,
        PRIMARY KEY (referrer, reference)
    );
    CREATE INDEX IndexReferrer ON Refs(referrer);
    CREATE INDEX IndexReference ON Refs(reference);
    CREATE TABLE DerivationOutputs (
        drv  INTEGER NOT NULL REFERENCES ValidPaths(id) ON DELETE CASCADE,
        id   TEXT NOT NULL,
        path TEXT NOT NULL,
        PRIMARY KEY (drv, id)
    );
    CREATE INDEX IndexDerivationOutputs ON DerivationOutputs(path);",
    // 2: paths registered before their contents were synced (see `Db::register_unsynced`).
    "CREATE TABLE Unsynced (
        id INTEGER PRIMARY KEY NOT NULL REFERENCES ValidPaths(id) ON DELETE CASCADE
    );",
];

/// The schema version this build writes.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current > VERSION {
        return Err(DbError::SchemaTooNew { found: current, supported: VERSION });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "database schema migrated");
    }
    Ok(())
}
