//! Durable state of the API: every resource in memory for reads, and in a
//! SQLite file for restarts.
//!
//! * [`Store::read`] runs a closure on the current [`State`] under a shared
//!   lock: Describe calls run in parallel.
//! * [`Store::write`] runs a closure on a [`Txn`] under the exclusive lock.
//!   The closure validates and changes resources; when it returns `Ok`, the
//!   changed resources are written to SQLite in one transaction and only then
//!   does `write` return (so the API answers after the commit). When the
//!   closure fails, panics, or the commit fails, the in-memory state is put
//!   back exactly as it was.
//! * After each committed change the [`Observer`] sees the new state (the
//!   datapath re-publishes its snapshot from it).
//!
//! See `docs/api.md` for why SQLite and how concurrency works.

mod db;
pub mod ids;
pub mod model;
pub mod net;

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use db::Db;
use model::{Kind, Resource};

/// Failures of the durable store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or initialised.
    #[error("cannot open the state database")]
    Open(#[source] rusqlite::Error),
    /// The state directory could not be created.
    #[error("cannot create the state directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    /// A statement failed.
    #[error("state database error")]
    Sql(#[source] rusqlite::Error),
    /// A stored document no longer parses.
    #[error("stored resource {0} is corrupt")]
    Corrupt(String, #[source] serde_json::Error),
    #[error("cannot encode a resource")]
    Encode(#[source] serde_json::Error),
    /// The database was written by a newer enilab.
    #[error("state database has schema version {0}, which this enilab does not know")]
    Schema(String),
    /// A handler panicked; its changes were rolled back.
    #[error("internal error while handling the request; nothing was changed")]
    Panicked,
}

/// Every resource, keyed by ID.
#[derive(Debug, Default, Clone)]
pub struct State {
    res: BTreeMap<String, Resource>,
}

impl State {
    pub fn resource(&self, id: &str) -> Option<&Resource> {
        self.res.get(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.res.contains_key(id)
    }

    pub fn get<K: Kind>(&self, id: &str) -> Option<&K> {
        if !id.starts_with(K::PREFIX) {
            return None;
        }
        self.res.get(id).and_then(K::from_ref)
    }

    /// All resources of one kind, in ID order.
    pub fn iter<K: Kind>(&self) -> impl Iterator<Item = &K> + '_ {
        self.res
            .range::<str, _>((
                std::ops::Bound::Included(K::PREFIX),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(K::PREFIX))
            .filter_map(|(_, v)| K::from_ref(v))
    }

    /// Every resource, in ID order.
    pub fn all(&self) -> impl Iterator<Item = &Resource> + '_ {
        self.res.values()
    }

    pub fn len(&self) -> usize {
        self.res.len()
    }

    pub fn is_empty(&self) -> bool {
        self.res.is_empty()
    }
}

/// Changes in progress: the state plus an undo log.
pub struct Txn<'a> {
    state: &'a mut State,
    undo: Vec<(String, Option<Resource>)>,
    touched: BTreeSet<String>,
}

impl std::ops::Deref for Txn<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.state
    }
}

impl Txn<'_> {
    fn touch(&mut self, id: &str) {
        if self.touched.insert(id.to_string()) {
            self.undo
                .push((id.to_string(), self.state.res.get(id).cloned()));
        }
    }

    /// Insert or replace a resource.
    pub fn put<K: Kind>(&mut self, x: K) {
        let id = x.id().to_string();
        self.touch(&id);
        self.state.res.insert(id, x.into());
    }

    pub fn put_resource(&mut self, r: Resource) {
        let id = r.id().to_string();
        self.touch(&id);
        self.state.res.insert(id, r);
    }

    pub fn remove(&mut self, id: &str) {
        self.touch(id);
        self.state.res.remove(id);
    }

    fn rollback(self) {
        for (id, old) in self.undo.into_iter().rev() {
            match old {
                Some(r) => {
                    self.state.res.insert(id, r);
                }
                None => {
                    self.state.res.remove(&id);
                }
            }
        }
    }
}

/// Told about every committed change.
pub trait Observer: Send + Sync {
    /// Called with the exclusive lock held, right after a commit: keep it
    /// short and never call back into the store.
    fn on_change(&self, state: &State);
}

/// The durable store.
pub struct Store {
    state: RwLock<State>,
    db: Mutex<Db>,
    observer: RwLock<Option<Arc<dyn Observer>>>,
    path: PathBuf,
}

impl Store {
    /// Open (or create) `<dir>/state.db` and load every resource.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Dir(dir.to_path_buf(), e))?;
        let path = dir.join("state.db");
        let db = Db::open(&path)?;
        let mut state = State::default();
        for r in db.load()? {
            state.res.insert(r.id().to_string(), r);
        }
        Ok(Store {
            state: RwLock::new(state),
            db: Mutex::new(db),
            observer: RwLock::new(None),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn set_observer(&self, obs: Arc<dyn Observer>) {
        *self.observer.write().unwrap_or_else(|e| e.into_inner()) = Some(obs);
        // Let it see what was loaded.
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        self.notify(&st);
    }

    fn notify(&self, st: &State) {
        let obs = self
            .observer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(o) = obs {
            if catch_unwind(AssertUnwindSafe(|| o.on_change(st))).is_err() {
                tracing::error!("state observer panicked");
            }
        }
    }

    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        f(&st)
    }

    /// Run `f` as one atomic, durable change (see the module comment).
    pub fn write<R, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        // The state is only ever changed through a Txn that rolls back, so a
        // poisoned lock still guards consistent data.
        let mut guard = self.state.write().unwrap_or_else(|e| e.into_inner());
        let mut txn = Txn {
            state: &mut guard,
            undo: Vec::new(),
            touched: BTreeSet::new(),
        };
        let out = match catch_unwind(AssertUnwindSafe(|| f(&mut txn))) {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                txn.rollback();
                return Err(e);
            }
            Err(_) => {
                txn.rollback();
                tracing::error!("API handler panicked; change rolled back");
                return Err(StoreError::Panicked.into());
            }
        };
        if txn.touched.is_empty() {
            return Ok(out);
        }
        let committed = {
            let mut db = self.db.lock().unwrap_or_else(|e| e.into_inner());
            let puts: Vec<&Resource> = txn
                .touched
                .iter()
                .filter_map(|id| txn.state.res.get(id))
                .collect();
            let dels: Vec<&str> = txn
                .touched
                .iter()
                .filter(|id| !txn.state.res.contains_key(*id))
                .map(|s| s.as_str())
                .collect();
            db.commit(&puts, &dels)
        };
        if let Err(e) = committed {
            txn.rollback();
            return Err(e.into());
        }
        drop(txn);
        self.notify(&guard);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::model::*;
    use super::*;

    fn vpc(id: &str) -> Vpc {
        Vpc {
            id: id.into(),
            cidr: "10.0.0.0/16".into(),
            cidr_assoc_id: "vpc-cidr-assoc-1".into(),
            tenancy: "default".into(),
            main_route_table: String::new(),
            default_acl: String::new(),
            default_sg: String::new(),
            tags: Tags::new(),
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("enilab-store-{tag}-{}", ids::random_u64()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn commits_survive_reopen_and_failures_roll_back() {
        let dir = tempdir("reopen");
        {
            let s = Store::open(&dir).unwrap();
            s.write(|t| {
                t.put(vpc("vpc-00000000000000001"));
                Ok::<_, StoreError>(())
            })
            .unwrap();
            let r: Result<(), StoreError> = s.write(|t| {
                t.put(vpc("vpc-00000000000000002"));
                t.remove("vpc-00000000000000001");
                Err(StoreError::Panicked)
            });
            assert!(r.is_err());
            assert!(s.read(|st| st.contains("vpc-00000000000000001")));
            assert!(!s.read(|st| st.contains("vpc-00000000000000002")));
            let r: Result<(), StoreError> = s.write(|t| {
                t.put(vpc("vpc-00000000000000003"));
                panic!("handler bug")
            });
            assert!(matches!(r, Err(StoreError::Panicked)));
            assert_eq!(s.read(|st| st.len()), 1);
        }
        let s = Store::open(&dir).unwrap();
        let ids: Vec<String> = s.read(|st| st.iter::<Vpc>().map(|v| v.id.clone()).collect());
        assert_eq!(ids, vec!["vpc-00000000000000001".to_string()]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
