//! The SQLite file behind the store: one table of JSON documents keyed by
//! resource ID, written in one transaction per API change.

use std::path::Path;

use rusqlite::{params, Connection};

use super::model::Resource;
use super::StoreError;

const SCHEMA_VERSION: i64 = 1;

pub(super) struct Db {
    conn: Connection,
}

impl Db {
    pub(super) fn open(path: &Path) -> Result<Db, StoreError> {
        let conn = Connection::open(path).map_err(StoreError::Open)?;
        // WAL: readers never block the writer; synchronous=FULL: a commit is
        // on disk before the API answers.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS resources (
                 id TEXT PRIMARY KEY,
                 body TEXT NOT NULL
             );",
        )
        .map_err(StoreError::Open)?;
        let version: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .ok();
        match version {
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                    params![SCHEMA_VERSION.to_string()],
                )
                .map_err(StoreError::Open)?;
            }
            Some(v) if v == SCHEMA_VERSION.to_string() => {}
            Some(v) => return Err(StoreError::Schema(v)),
        }
        Ok(Db { conn })
    }

    pub(super) fn load(&self) -> Result<Vec<Resource>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, body FROM resources")
            .map_err(StoreError::Sql)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(StoreError::Sql)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, body) = row.map_err(StoreError::Sql)?;
            let res: Resource =
                serde_json::from_str(&body).map_err(|e| StoreError::Corrupt(id.clone(), e))?;
            out.push(res);
        }
        Ok(out)
    }

    /// Write `puts` and delete `dels` atomically.
    pub(super) fn commit(&mut self, puts: &[&Resource], dels: &[&str]) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(StoreError::Sql)?;
        {
            let mut put = tx
                .prepare_cached("INSERT OR REPLACE INTO resources (id, body) VALUES (?1, ?2)")
                .map_err(StoreError::Sql)?;
            for r in puts {
                let body = serde_json::to_string(r).map_err(StoreError::Encode)?;
                put.execute(params![r.id(), body])
                    .map_err(StoreError::Sql)?;
            }
            let mut del = tx
                .prepare_cached("DELETE FROM resources WHERE id = ?1")
                .map_err(StoreError::Sql)?;
            for id in dels {
                del.execute(params![id]).map_err(StoreError::Sql)?;
            }
        }
        tx.commit().map_err(StoreError::Sql)
    }
}
