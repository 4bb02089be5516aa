//! The embedded default store: SQLite in WAL mode, one JSON document per record.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use muster_machinery::model::MachineId;
use muster_machinery::token::JoinToken;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{check_token, BuildFn, LayerRecord, MachineRecord, Store, StoreError, TokenRecord, UpdateFn};

const SCHEMA_VERSION: i64 = 1;

/// SQLite-backed [`Store`]. Calls run on tokio's blocking pool; one connection, serialized.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn corrupt(kind: &'static str, id: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { kind, id: id.to_owned(), reason: e.to_string() }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    /// The database and its WAL files are the controller's alone (0600).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let io = |e: std::io::Error| StoreError::Backend(format!("{}: {e}", path.display()));
        // Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the
        // database's mode.
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(io)?;
        let conn =
            Connection::open(path).map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        let store = Self::setup(conn)?;
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let p = std::path::PathBuf::from(p);
            if p.exists() {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
            }
        }
        Ok(store)
    }

    /// An in-memory database, for tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::setup(Connection::open_in_memory().map_err(backend)?)
    }

    fn setup(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL").map_err(backend)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(backend)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(backend)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "database schema version {version} is newer than this controller understands ({SCHEMA_VERSION})"
            )));
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS layers (key TEXT PRIMARY KEY, doc TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS registrations (mac TEXT PRIMARY KEY, doc TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS machines (
                 id TEXT PRIMARY KEY, doc TEXT NOT NULL, last_seen_ms INTEGER NOT NULL DEFAULT 0);
             PRAGMA user_version = 1;",
        )
        .map_err(backend)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| StoreError::Backend("store lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(backend)?
    }
}

fn load_machine(id: &str, doc: &str, last_seen_ms: i64) -> Result<MachineRecord, StoreError> {
    let mut m: MachineRecord = serde_json::from_str(doc).map_err(|e| corrupt("machine", id, e))?;
    m.last_seen_ms = m.last_seen_ms.max(last_seen_ms);
    Ok(m)
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(backend)
}

fn get_token_tx(tx: &rusqlite::Transaction<'_>, id: &str) -> Result<Option<TokenRecord>, StoreError> {
    let doc: Option<String> = tx
        .query_row("SELECT doc FROM tokens WHERE id = ?1", [id], |r| r.get(0))
        .optional()
        .map_err(backend)?;
    doc.map(|d| serde_json::from_str(&d).map_err(|e| corrupt("token", id, e))).transpose()
}

fn get_machine_tx(conn: &Connection, id: &str) -> Result<Option<MachineRecord>, StoreError> {
    let row: Option<(String, i64)> = conn
        .query_row("SELECT doc, last_seen_ms FROM machines WHERE id = ?1", [id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(backend)?;
    row.map(|(doc, seen)| load_machine(id, &doc, seen)).transpose()
}

fn put_machine_tx(conn: &Connection, m: &MachineRecord, insert: bool) -> Result<(), StoreError> {
    let doc = to_json(m)?;
    let sql = if insert {
        "INSERT INTO machines (id, doc, last_seen_ms) VALUES (?1, ?2, ?3)"
    } else {
        "UPDATE machines SET doc = ?2, last_seen_ms = MAX(last_seen_ms, ?3) WHERE id = ?1"
    };
    let n = conn.execute(sql, params![m.id.as_str(), doc, m.last_seen_ms]).map_err(|e| match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            StoreError::Duplicate { kind: "machine", id: m.id.to_string() }
        }
        e => backend(e),
    })?;
    if n != 1 {
        return Err(StoreError::NotFound { kind: "machine", id: m.id.to_string() });
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_token(&self, token: TokenRecord) -> Result<(), StoreError> {
        self.run(move |c| {
            let doc = to_json(&token)?;
            c.execute("INSERT INTO tokens (id, doc) VALUES (?1, ?2)", params![token.id, doc]).map_err(
                |e| match e {
                    rusqlite::Error::SqliteFailure(f, _)
                        if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        StoreError::Duplicate { kind: "token", id: token.id.clone() }
                    }
                    e => backend(e),
                },
            )?;
            Ok(())
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.run(|c| {
            let mut stmt = c.prepare("SELECT id, doc FROM tokens ORDER BY id").map_err(backend)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, doc) = row.map_err(backend)?;
                out.push(serde_json::from_str(&doc).map_err(|e| corrupt("token", &id, e))?);
            }
            Ok(out)
        })
        .await
    }

    async fn update_token(&self, id: &str, f: UpdateFn<TokenRecord>) -> Result<TokenRecord, StoreError> {
        let id = id.to_owned();
        self.run(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let mut t =
                get_token_tx(&tx, &id)?.ok_or(StoreError::NotFound { kind: "token", id: id.clone() })?;
            f(&mut t)?;
            tx.execute("UPDATE tokens SET doc = ?2 WHERE id = ?1", params![id, to_json(&t)?])
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(t)
        })
        .await
    }

    async fn enroll(
        &self,
        token: &JoinToken,
        now_ms: i64,
        build: BuildFn,
    ) -> Result<MachineRecord, StoreError> {
        let token = token.clone();
        self.run(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let mut record = get_token_tx(&tx, token.id())?.ok_or(super::TokenRejection::Invalid)?;
            check_token(&record, &token, now_ms)?;
            record.uses_left -= 1;
            tx.execute("UPDATE tokens SET doc = ?2 WHERE id = ?1", params![record.id, to_json(&record)?])
                .map_err(backend)?;
            let before = list_registrations_tx(&tx)?;
            let mut regs = before.clone();
            let machine = build(&record, &mut regs);
            put_changed_registrations_tx(&tx, &before, &regs)?;
            put_machine_tx(&tx, &machine, true)?;
            tx.commit().map_err(backend)?;
            Ok(machine)
        })
        .await
    }

    async fn get_machine(&self, id: &MachineId) -> Result<Option<MachineRecord>, StoreError> {
        let id = id.clone();
        self.run(move |c| get_machine_tx(c, id.as_str())).await
    }

    async fn list_machines(&self) -> Result<Vec<MachineRecord>, StoreError> {
        self.run(|c| {
            let mut stmt =
                c.prepare("SELECT id, doc, last_seen_ms FROM machines ORDER BY id").map_err(backend)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
                .map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, doc, seen) = row.map_err(backend)?;
                out.push(load_machine(&id, &doc, seen)?);
            }
            Ok(out)
        })
        .await
    }

    async fn update_machine(
        &self,
        id: &MachineId,
        f: UpdateFn<MachineRecord>,
    ) -> Result<MachineRecord, StoreError> {
        let id = id.clone();
        self.run(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let mut m = get_machine_tx(&tx, id.as_str())?
                .ok_or_else(|| StoreError::NotFound { kind: "machine", id: id.to_string() })?;
            f(&mut m)?;
            if m.id != id {
                return Err(StoreError::Corrupt {
                    kind: "machine",
                    id: id.to_string(),
                    reason: "an update changed its id".into(),
                });
            }
            put_machine_tx(&tx, &m, false)?;
            tx.commit().map_err(backend)?;
            Ok(m)
        })
        .await
    }

    async fn delete_machine(&self, id: &MachineId) -> Result<(), StoreError> {
        let id = id.clone();
        self.run(move |c| {
            let n = c.execute("DELETE FROM machines WHERE id = ?1", [id.as_str()]).map_err(backend)?;
            if n == 0 {
                return Err(StoreError::NotFound { kind: "machine", id: id.to_string() });
            }
            Ok(())
        })
        .await
    }

    async fn record_last_seen(&self, seen: Vec<(MachineId, i64)>) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        self.run(move |c| {
            let tx = c.transaction().map_err(backend)?;
            {
                let mut stmt = tx
                    .prepare("UPDATE machines SET last_seen_ms = MAX(last_seen_ms, ?2) WHERE id = ?1")
                    .map_err(backend)?;
                for (id, ms) in &seen {
                    stmt.execute(params![id.as_str(), ms]).map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn get_layer(&self, key: &str) -> Result<Option<LayerRecord>, StoreError> {
        let key = key.to_owned();
        self.run(move |c| get_layer_tx(c, &key)).await
    }

    async fn put_layer(
        &self,
        key: &str,
        layer: Option<serde_json::Value>,
        now_ms: i64,
    ) -> Result<LayerRecord, StoreError> {
        let key = key.to_owned();
        self.run(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(backend)?;
            let record = get_layer_tx(&tx, &key)?.unwrap_or_default().with(layer, now_ms);
            let doc = serde_json::json!({ LAYER_RECORD: record });
            tx.execute(
                "INSERT INTO layers (key, doc) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET doc = excluded.doc",
                params![key, to_json(&doc)?],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(record)
        })
        .await
    }

    async fn list_layers(&self) -> Result<Vec<(String, LayerRecord)>, StoreError> {
        self.run(move |c| {
            let mut st = c.prepare("SELECT key, doc FROM layers ORDER BY key").map_err(backend)?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            rows.into_iter().map(|(k, d)| Ok((k.clone(), layer_record(&k, &d)?))).collect()
        })
        .await
    }

    async fn update_machine_with_registrations(
        &self,
        id: &MachineId,
        f: super::ClaimFn,
    ) -> Result<MachineRecord, StoreError> {
        let id = id.clone();
        self.run(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let mut m = get_machine_tx(&tx, id.as_str())?
                .ok_or_else(|| StoreError::NotFound { kind: "machine", id: id.to_string() })?;
            let before = list_registrations_tx(&tx)?;
            let mut regs = before.clone();
            f(&mut m, &mut regs)?;
            if m.id != id {
                return Err(corrupt("machine", id.as_str(), "an update changed its id"));
            }
            put_changed_registrations_tx(&tx, &before, &regs)?;
            put_machine_tx(&tx, &m, false)?;
            tx.commit().map_err(backend)?;
            Ok(m)
        })
        .await
    }

    async fn put_registration(&self, r: super::Registration) -> Result<(), StoreError> {
        self.run(move |c| put_registration_tx(c, &r)).await
    }

    async fn list_registrations(&self) -> Result<Vec<super::Registration>, StoreError> {
        self.run(|c| list_registrations_tx(c)).await
    }

    async fn delete_registration(&self, mac: &str) -> Result<bool, StoreError> {
        let mac = mac.to_owned();
        self.run(move |c| {
            Ok(c.execute("DELETE FROM registrations WHERE mac = ?1", [&mac]).map_err(backend)? > 0)
        })
        .await
    }
}

/// How a layer document with history is wrapped (a bare value is a layer stored before layers
/// had history: its one revision is the value itself).
const LAYER_RECORD: &str = "muster.layer/v1";

fn layer_record(key: &str, doc: &str) -> Result<LayerRecord, StoreError> {
    let mut v: serde_json::Value = serde_json::from_str(doc).map_err(|e| corrupt("layer", key, e))?;
    match v.get_mut(LAYER_RECORD).map(serde_json::Value::take) {
        Some(r) => serde_json::from_value(r).map_err(|e| corrupt("layer", key, e)),
        None => Ok(LayerRecord::default().with(Some(v), 0)),
    }
}

fn get_layer_tx(c: &Connection, key: &str) -> Result<Option<LayerRecord>, StoreError> {
    let doc: Option<String> = c
        .query_row("SELECT doc FROM layers WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(backend)?;
    doc.map(|d| layer_record(key, &d)).transpose()
}

fn list_registrations_tx(c: &Connection) -> Result<Vec<super::Registration>, StoreError> {
    let mut stmt = c.prepare("SELECT mac, doc FROM registrations ORDER BY mac").map_err(backend)?;
    let rows =
        stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        let (mac, doc) = row.map_err(backend)?;
        out.push(serde_json::from_str(&doc).map_err(|e| corrupt("registration", &mac, e))?);
    }
    Ok(out)
}

fn put_registration_tx(c: &Connection, r: &super::Registration) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO registrations (mac, doc) VALUES (?1, ?2) ON CONFLICT(mac) DO UPDATE SET doc = excluded.doc",
        params![r.mac, to_json(r)?],
    )
    .map_err(backend)?;
    Ok(())
}

/// Saves the registrations of `after` that differ from `before` (the same list, as read in this
/// transaction, before a step changed some).
fn put_changed_registrations_tx(
    c: &Connection,
    before: &[super::Registration],
    after: &[super::Registration],
) -> Result<(), StoreError> {
    for (old, new) in before.iter().zip(after) {
        if old != new {
            put_registration_tx(c, new)?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod layer_tests {
    use super::*;

    #[tokio::test]
    async fn layers_keep_their_history_through_a_delete() {
        let s = SqliteStore::in_memory().unwrap();
        assert_eq!(s.get_layer("cluster/lab").await.unwrap(), None);
        let v1 = serde_json::json!({"sysctls": {"vm.swappiness": "1"}});
        let v2 = serde_json::json!({"sysctls": {"vm.swappiness": "2"}});
        s.put_layer("cluster/lab", Some(v1.clone()), 10).await.unwrap();
        s.put_layer("cluster/lab", Some(v2.clone()), 20).await.unwrap();
        let r = s.get_layer("cluster/lab").await.unwrap().unwrap();
        assert_eq!(r.value, Some(v2));
        s.put_layer("cluster/lab", None, 30).await.unwrap();
        let r = s.get_layer("cluster/lab").await.unwrap().unwrap();
        assert_eq!(r.value, None);
        let revs: Vec<(u64, i64, bool)> =
            r.revisions.iter().map(|x| (x.revision, x.created_ms, x.value.is_some())).collect();
        assert_eq!(revs, [(1, 10, true), (2, 20, true), (3, 30, false)]);
        assert_eq!(r.revisions[0].value, Some(v1));
        assert_eq!(s.list_layers().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_layer_stored_before_history_reads_as_its_one_revision() {
        let s = SqliteStore::in_memory().unwrap();
        let v = serde_json::json!({"hostname": "x"});
        s.conn
            .lock()
            .unwrap()
            .execute("INSERT INTO layers (key, doc) VALUES ('role/worker', ?1)", [v.to_string()])
            .unwrap();
        let r = s.get_layer("role/worker").await.unwrap().unwrap();
        assert_eq!((r.value, r.revisions.len()), (Some(v), 1));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::TokenRejection;
    use super::*;
    use muster_machinery::model::{Labels, Role};

    fn token(n: u8) -> JoinToken {
        JoinToken::from_random(&[n; 38]).unwrap()
    }

    fn token_record(t: &JoinToken, uses: u32) -> TokenRecord {
        TokenRecord {
            id: t.id().into(),
            digest: t.digest().to_vec(),
            created_ms: 0,
            expires_ms: 10_000,
            uses_total: uses,
            uses_left: uses,
            labels: Labels::from([("rack".to_string(), "r1".to_string())]),
            auto_accept: true,
            revoked: false,
            description: String::new(),
            boot: false,
        }
    }

    fn machine(id: u8, t: &TokenRecord) -> MachineRecord {
        MachineRecord {
            id: MachineId::from_random([id; 8]),
            hostname: format!("node-{id}"),
            approved: t.auto_accept,
            revoked: false,
            role: Role::None,
            cluster: String::new(),
            labels: t.labels.clone(),
            inventory: Default::default(),
            enrolled_ms: 1,
            last_seen_ms: 1,
            heartbeat_ms: 5000,
            token_id: t.id.clone(),
            cert_serial: String::new(),
            cert_not_after_ms: 0,
            config: Default::default(),
            flag: String::new(),
            revision: 0,
            key_sha256: String::new(),
            claim: String::new(),
            install: Default::default(),
        }
    }

    #[tokio::test]
    async fn single_use_token_race_has_one_winner() {
        let s = SqliteStore::in_memory().unwrap();
        let t = token(1);
        s.insert_token(token_record(&t, 1)).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..8u8 {
            let (s, t) = (s.clone(), t.clone());
            tasks.push(tokio::spawn(
                async move { s.enroll(&t, 5, Box::new(move |r, _| machine(i, r))).await },
            ));
        }
        let mut ok = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(m) => {
                    ok += 1;
                    assert_eq!(m.labels.get("rack").map(String::as_str), Some("r1"));
                }
                Err(StoreError::Token(TokenRejection::Exhausted)) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(ok, 1);
        assert_eq!(s.list_machines().await.unwrap().len(), 1);
        assert_eq!(s.list_tokens().await.unwrap()[0].uses_left, 0);
    }

    #[tokio::test]
    async fn rejected_token_changes_nothing() {
        let s = SqliteStore::in_memory().unwrap();
        let t = token(2);
        s.insert_token(token_record(&t, 3)).await.unwrap();
        let err = s.enroll(&t, 10_000, Box::new(|r, _| machine(1, r))).await.unwrap_err();
        assert!(matches!(err, StoreError::Token(TokenRejection::Expired)));
        let err = s.enroll(&token(3), 5, Box::new(|r, _| machine(1, r))).await.unwrap_err();
        assert!(matches!(err, StoreError::Token(TokenRejection::Invalid)));
        assert!(s.list_machines().await.unwrap().is_empty());
        assert_eq!(s.list_tokens().await.unwrap()[0].uses_left, 3);
    }

    #[tokio::test]
    async fn update_is_atomic_and_errors_abort() {
        let s = SqliteStore::in_memory().unwrap();
        let t = token(4);
        s.insert_token(token_record(&t, 1)).await.unwrap();
        let m = s.enroll(&t, 5, Box::new(|r, _| machine(7, r))).await.unwrap();
        let err = s
            .update_machine(
                &m.id,
                Box::new(|m| {
                    m.cluster = "changed".into();
                    Err(StoreError::Aborted)
                }),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Aborted));
        assert_eq!(s.get_machine(&m.id).await.unwrap().unwrap().cluster, "");
        s.update_machine(
            &m.id,
            Box::new(|m| {
                m.cluster = "lab".into();
                Ok(())
            }),
        )
        .await
        .unwrap();
        s.record_last_seen(vec![(m.id.clone(), 99), (MachineId::from_random([9; 8]), 5)]).await.unwrap();
        let got = s.get_machine(&m.id).await.unwrap().unwrap();
        assert_eq!((got.cluster.as_str(), got.last_seen_ms), ("lab", 99));
        s.delete_machine(&m.id).await.unwrap();
        assert!(matches!(s.delete_machine(&m.id).await, Err(StoreError::NotFound { .. })));
        assert!(matches!(
            s.update_machine(&m.id, Box::new(|_| Ok(()))).await,
            Err(StoreError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let t = token(5);
        {
            let s = SqliteStore::open(&path).unwrap();
            s.insert_token(token_record(&t, 2)).await.unwrap();
            s.enroll(&t, 5, Box::new(|r, _| machine(1, r))).await.unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.list_machines().await.unwrap().len(), 1);
        assert_eq!(s.list_tokens().await.unwrap()[0].uses_left, 1);
        let mode: String =
            s.conn.lock().unwrap().pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }
}
