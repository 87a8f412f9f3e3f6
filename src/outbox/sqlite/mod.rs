//! The SQLite store: one database file (WAL) under the data directory.
//!
//! Why SQLite (via `rusqlite`, bundled): one file, crash-safe with WAL, readable with standard
//! tools when an operator needs to look, and fast enough when commits are grouped. `redb` would
//! do too, but dead-letter queries with filters (destination, rule, time) are plain SQL here.
//!
//! Writes go through one writer thread (`writer.rs`) that groups every command waiting into one
//! transaction ("group commit"), so durability costs one fsync per batch, not per request.
//! Reads (`/status`, the admin API, start-up) use a small pool of read connections on the
//! blocking thread pool, never the async runtime's threads, and never re-run the schema.
//! The data directory is locked while the store is open: two engines on one outbox would send
//! each other's messages.

mod dedup;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use tokio::sync::oneshot;

use super::{
    now_ms, BoxFut, DeadLetter, DeadLetterFilter, EnqueueError, Enqueued, Job, KeyState, NewJob,
    NewTracker, Outcome, PendingGroup, Replayed, Store, StoreError, Summary,
};
use crate::job::Payload;
use crate::silence::{NewSilence, Silence};
use writer::{writer, Cmd};

/// The SQLite outbox.
pub struct SqliteStore {
    /// The data directory's lock, held for as long as the store is open.
    _lock: std::fs::File,
    tx: mpsc::Sender<Cmd>,
    path: PathBuf,
    pending: Arc<AtomicUsize>,
    reads: Arc<ReadPool>,
}

const SCHEMA: &str = "
PRAGMA journal_mode=WAL;
PRAGMA synchronous=FULL;
PRAGMA wal_autocheckpoint=8000;
CREATE TABLE IF NOT EXISTS outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  destination TEXT NOT NULL, rule TEXT NOT NULL, event_id TEXT NOT NULL,
  target TEXT NOT NULL, message TEXT NOT NULL, secret INTEGER NOT NULL,
  created_at INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  attempt_log TEXT NOT NULL DEFAULT '[]', last_error TEXT,
  kind TEXT, replay_of INTEGER
);
CREATE TABLE IF NOT EXISTS dead_letters (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  destination TEXT NOT NULL, rule TEXT NOT NULL, event_id TEXT NOT NULL,
  target TEXT NOT NULL, message TEXT NOT NULL,
  created_at INTEGER NOT NULL, dead_at INTEGER NOT NULL,
  attempt_log TEXT NOT NULL, last_error TEXT NOT NULL,
  kind TEXT
);
CREATE INDEX IF NOT EXISTS dead_letters_dest ON dead_letters(destination, dead_at);
CREATE TABLE IF NOT EXISTS dedup_keys (id INTEGER PRIMARY KEY, hash BLOB NOT NULL, expires_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS dedup_keys_expires ON dedup_keys(expires_at);
CREATE TABLE IF NOT EXISTS throttle (key TEXT PRIMARY KEY, until INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_flushes (
  rule TEXT NOT NULL, grp TEXT NOT NULL, flushed_at INTEGER NOT NULL, PRIMARY KEY (rule, grp)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS silences (
  id INTEGER PRIMARY KEY AUTOINCREMENT, rule TEXT, matchers TEXT NOT NULL, key TEXT,
  starts_at INTEGER NOT NULL, ends_at INTEGER NOT NULL, author TEXT NOT NULL,
  comment TEXT NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS message_keys (
  destination TEXT NOT NULL, key TEXT NOT NULL, channel TEXT NOT NULL, ts TEXT NOT NULL,
  opened_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
  PRIMARY KEY (destination, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_trackers (
  event_id TEXT PRIMARY KEY, destination TEXT NOT NULL, run_id TEXT NOT NULL,
  pending INTEGER NOT NULL, delivered INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
  errors TEXT NOT NULL DEFAULT '[]', report TEXT NOT NULL
);
";

/// Hot statements go through SQLite's prepared-statement cache, so the same SQL text is not
/// parsed again for every row (bench/PROFILE.md).
trait Cached {
    fn exec_c<P: rusqlite::Params>(&self, sql: &str, p: P) -> rusqlite::Result<usize>;
    fn row_c<T, P: rusqlite::Params, F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        p: P,
        f: F,
    ) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec_c<P: rusqlite::Params>(&self, sql: &str, p: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(p)
    }
    fn row_c<T, P: rusqlite::Params, F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        p: P,
        f: F,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(p, f)
    }
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    c.set_prepared_statement_cache_capacity(64);
    c.execute_batch(SCHEMA)?;
    migrate(&c)?;
    Ok(c)
}

/// Schema versions (`PRAGMA user_version`) and what each migration does.
///
/// 1. Payload kinds: `outbox` and `dead_letters` get a `kind` column. Rows stored before it
///    were operations for the `port` destination when their JSON has an `op` of `expand` (with
///    `rule` and `event`) or `report` (with `run_id` and `context`), and messages otherwise.
///
/// 2. Replays keep their dead letter's id: `outbox` gets `replay_of`, the id of the dead letter a
///    job was replayed from; if it dies again, it is that dead letter again. (The tables of
///    keyed messages, silences and digest flushes are new tables, made by the schema.)
///
/// 3. Dedup keys are logged append-only and looked up in memory (`dedup.rs`): the unexpired keys
///    of the `dedup` table become their digests in `dedup_keys`, and `dedup` is dropped.
///
/// A message's kind is stored as NULL (it is nearly every row, and NULL costs the insert
/// nothing); readers see `message`.
fn migrate(c: &Connection) -> rusqlite::Result<()> {
    let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < 1 {
        migrate_kinds(c)?;
    }
    if version < 2 {
        if !has_column(c, "outbox", "replay_of")? {
            c.execute_batch("ALTER TABLE outbox ADD COLUMN replay_of INTEGER")?;
        }
        c.execute_batch("PRAGMA user_version = 2")?;
    }
    if version < 3 {
        dedup::migrate(c, now_ms())?;
        c.execute_batch("PRAGMA user_version = 3")?;
    }
    // Grouped rules' items, found without a scan of the queue (needs `kind`, so after the
    // migrations that add it).
    c.execute_batch(
        "CREATE INDEX IF NOT EXISTS outbox_groups ON outbox(kind) WHERE kind = 'group'",
    )?;
    Ok(())
}

fn has_column(c: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    c.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
        [table, column],
        |r| r.get(0),
    )
}

fn migrate_kinds(c: &Connection) -> rusqlite::Result<()> {
    for table in ["outbox", "dead_letters"] {
        if !has_column(c, table, "kind")? {
            c.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN kind TEXT"))?;
        }
        c.execute_batch(&format!(
            "UPDATE {table} SET kind = 'expand' WHERE json_valid(message)
               AND json_extract(message, '$.op') = 'expand'
               AND json_type(message, '$.rule') = 'text' AND json_type(message, '$.event') IS NOT NULL;
             UPDATE {table} SET kind = 'report' WHERE json_valid(message)
               AND json_extract(message, '$.op') = 'report'
               AND json_type(message, '$.run_id') = 'text' AND json_type(message, '$.context') IS NOT NULL;"
        ))?;
    }
    c.execute_batch("PRAGMA user_version = 1")
}

use super::redacted_json;

/// Takes the exclusive lock on `<data_dir>/switchyard.lock` (an OS file lock: it goes away
/// with the process, even after kill -9, so there is never a stale lock to clean up) and writes
/// this process's id into it. Two engines on one outbox would each deliver the other's jobs,
/// so a second one refuses to start, naming the holder.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, String> {
    use std::io::{Read, Seek, Write};
    let path = data_dir.join("switchyard.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = Read::by_ref(&mut f).take(32).read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.chars().all(|c| c.is_ascii_digit()) && !holder.is_empty() {
                format!("another switchyard process (pid {holder})")
            } else {
                "another switchyard process".to_string()
            };
            return Err(format!(
                "the data directory {} is in use by {who}: two engines on one outbox would send \
                 each other's messages. Stop that one, give this one its own --data-dir, or, to \
                 manage a running engine's dead letters, use --server with its admin API",
                data_dir.display()
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(format!("cannot lock {}: {e}", path.display()))
        }
    }
    // The pid is information for the message above; failing to write it is not an error.
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = write!(f, "{}", std::process::id());
    let _ = f.flush();
    Ok(f)
}

/// The kind column of a payload: NULL for a message.
fn stored_kind(p: &Payload) -> Option<&'static str> {
    match p {
        Payload::Message(_) => None,
        other => Some(other.kind()),
    }
}

/// Read connections, reused: opening one (and preparing its statements) per `/status` request
/// cost more than the reads themselves. At most [`ReadPool::KEEP`] are kept idle.
struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReadPool {
    const KEEP: usize = 2;

    fn new(path: PathBuf) -> ReadPool {
        ReadPool {
            path,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on a read connection, on the blocking pool.
    async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let taken = pool.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match taken {
                Some(c) => c,
                None => {
                    let c = Connection::open_with_flags(
                        &pool.path,
                        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )
                    .map_err(db)?;
                    c.busy_timeout(Duration::from_secs(5)).map_err(db)?;
                    c
                }
            };
            let out = f(&conn).map_err(db);
            let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < Self::KEEP {
                idle.push(conn);
            }
            out
        })
        .await
        .map_err(|e| StoreError::Database(format!("read task failed: {e}")))?
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `<data_dir>/switchyard.db`, migrating its schema, and starts
    /// the writer thread.
    pub fn open(data_dir: &Path) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Open(format!(
                "cannot create data directory {}: {e}",
                data_dir.display()
            ))
        })?;
        let lock = lock_data_dir(data_dir).map_err(StoreError::Open)?;
        let path = data_dir.join("switchyard.db");
        let conn = open(&path)
            .map_err(|e| StoreError::Open(format!("cannot open {}: {e}", path.display())))?;
        let count: i64 = conn
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
            .map_err(|e| StoreError::Open(e.to_string()))?;
        let pending = Arc::new(AtomicUsize::new(count as usize));
        let dedup = dedup::Dedup::load(&conn, now_ms())
            .map_err(|e| StoreError::Open(format!("cannot read the dedup window: {e}")))?;
        let (tx, rx) = mpsc::channel();
        let p2 = pending.clone();
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer(conn, rx, p2, dedup))
            .map_err(|e| StoreError::Open(format!("cannot start the outbox writer: {e}")))?;
        Ok(SqliteStore {
            reads: Arc::new(ReadPool::new(path.clone())),
            _lock: lock,
            tx,
            path,
            pending,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn send(&self, cmd: Cmd) -> Result<(), StoreError> {
        self.tx.send(cmd).map_err(|_| StoreError::Stopped)
    }

    /// Sends the writer a command that answers with a result, and waits for the answer.
    async fn ask<T>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Cmd,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(cmd(reply))?;
        rx.await
            .map_err(|_| StoreError::Stopped)?
            .map_err(StoreError::Database)
    }
}

impl Store for SqliteStore {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    fn enqueue(
        &self,
        dedup: Option<(String, i64)>,
        jobs: Vec<NewJob>,
        tracker: Option<(String, NewTracker)>,
    ) -> BoxFut<'_, Result<Enqueued, EnqueueError>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            self.send(Cmd::Enqueue {
                dedup,
                jobs,
                tracker,
                reply,
            })
            .map_err(|e| EnqueueError::Storage(e.to_string()))?;
            // A dropped reply: the batch it was in failed before its turn came.
            rx.await.map_err(|_| {
                EnqueueError::Storage("the outbox could not commit this event".into())
            })?
        })
    }

    fn finish(&self, id: i64, outcome: Outcome) -> BoxFut<'_, Vec<Job>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let cmd = Cmd::Finish {
                id,
                outcome,
                reply: Some(reply),
            };
            if self.send(cmd).is_ok() {
                return rx.await.unwrap_or_default();
            }
            Vec::new()
        })
    }

    fn load_pending(&self) -> BoxFut<'_, Result<Vec<Job>, StoreError>> {
        Box::pin(self.reads.read(|c| {
            let mut st = c.prepare(
                "SELECT id, destination, rule, event_id, target, message, secret, created_at, attempts, COALESCE(kind, 'message') FROM outbox WHERE kind IS NOT 'group' ORDER BY id",
            )?;
            let rows = st.query_map([], |r| {
                let text: String = r.get(5)?;
                let rule: String = r.get(2)?;
                let kind: String = r.get(9)?;
                Ok(Job {
                    id: r.get(0)?,
                    destination: r.get(1)?,
                    payload: Payload::from_stored(&kind, &text, &rule),
                    rule,
                    event_id: r.get(3)?,
                    target: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
                    text: Bytes::from(text),
                    secret: r.get::<_, i64>(6)? != 0,
                    created_at: r.get(7)?,
                    attempts: r.get::<_, i64>(8)? as u32,
                    as_stored: false,
                })
            })?;
            rows.collect()
        }))
    }

    fn summary(&self) -> BoxFut<'_, Result<Summary, StoreError>> {
        Box::pin(self.reads.read(|c| {
            let by = |table: &str| -> rusqlite::Result<Vec<(String, i64)>> {
                let mut st = c.prepare_cached(&format!(
                    "SELECT destination, count(*) FROM {table} GROUP BY destination"
                ))?;
                let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            };
            Ok(Summary {
                pending: by("outbox WHERE kind IS NOT 'group'")?,
                dead_letters: by("dead_letters")?,
                active_throttles: c.query_row(
                    "SELECT count(*) FROM throttle WHERE until > ?",
                    [now_ms()],
                    |r| r.get(0),
                )?,
                open_keys: c.query_row(
                    "SELECT count(*) FROM message_keys WHERE expires_at > ?",
                    [now_ms()],
                    |r| r.get(0),
                )?,
            })
        }))
    }

    fn pending_groups(&self) -> BoxFut<'_, Result<Vec<PendingGroup>, StoreError>> {
        Box::pin(self.reads.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT o.rule, json_extract(o.message, '$.group') AS g, count(*), min(o.created_at),
                        (SELECT flushed_at FROM group_flushes f WHERE f.rule = o.rule AND f.grp = json_extract(o.message, '$.group'))
                 FROM outbox o WHERE o.kind = 'group' GROUP BY o.rule, g ORDER BY min(o.created_at)",
            )?;
            let rows = st.query_map([], |r| {
                Ok(PendingGroup {
                    rule: r.get(0)?,
                    group: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                    items: r.get(2)?,
                    first_at: r.get(3)?,
                    last_flush: r.get(4)?,
                })
            })?;
            rows.collect()
        }))
    }

    fn group_items(
        &self,
        rule: &str,
        group: &str,
    ) -> BoxFut<'_, Result<Vec<(i64, Value)>, StoreError>> {
        let (rule, group) = (rule.to_string(), group.to_string());
        Box::pin(self.reads.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT id, json_extract(message, '$.event') FROM outbox WHERE kind = 'group' AND rule = ? AND json_extract(message, '$.group') = ? ORDER BY id",
            )?;
            let rows = st.query_map(params![rule, group], |r| {
                let text: Option<String> = r.get(1)?;
                Ok((
                    r.get(0)?,
                    text.and_then(|t| serde_json::from_str(&t).ok())
                        .unwrap_or(Value::Null),
                ))
            })?;
            rows.collect()
        }))
    }

    fn flush_group(
        &self,
        rule: String,
        group: String,
        ids: Vec<i64>,
        jobs: Vec<NewJob>,
    ) -> BoxFut<'_, Result<Vec<Job>, StoreError>> {
        Box::pin(self.ask(|reply| Cmd::FlushGroup {
            rule,
            group,
            ids,
            jobs,
            reply,
        }))
    }

    fn silences(&self, ended_within: i64) -> BoxFut<'_, Result<Vec<Silence>, StoreError>> {
        Box::pin(self.reads.read(move |c| {
            let mut st =
                c.prepare_cached(&format!("{SILENCE_COLUMNS} WHERE ends_at > ? ORDER BY id"))?;
            let rows = st.query_map([now_ms().saturating_sub(ended_within)], silence_row)?;
            rows.collect()
        }))
    }

    fn add_silence(
        &self,
        s: NewSilence,
        starts: i64,
        ends: i64,
    ) -> BoxFut<'_, Result<Silence, StoreError>> {
        let op: writer::AdminOp = Box::new(move |tx, now| {
            let matchers = serde_json::to_string(&s.matchers).unwrap_or_else(|_| "[]".into());
            tx.execute(
                "INSERT INTO silences (rule, matchers, key, starts_at, ends_at, author, comment, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                params![s.rule, matchers, s.key, starts, ends, s.author, s.comment, now],
            )
            .map_err(|e| e.to_string())?;
            let made = Silence {
                id: tx.last_insert_rowid(),
                rule: s.rule,
                matchers: s.matchers,
                key: s.key,
                starts_at: starts,
                ends_at: ends,
                author: s.author,
                comment: s.comment,
                created_at: now,
            };
            Ok(serde_json::to_value(made).unwrap_or_default())
        });
        Box::pin(async move {
            let v = self.ask(|reply| Cmd::Admin { op, reply }).await?;
            serde_json::from_value(v).map_err(|e| StoreError::Database(e.to_string()))
        })
    }

    fn expire_silence(&self, id: i64) -> BoxFut<'_, Result<Option<Silence>, StoreError>> {
        let op: writer::AdminOp = Box::new(move |tx, now| {
            tx.execute(
                "UPDATE silences SET ends_at = ? WHERE id = ? AND ends_at > ?",
                params![now, id, now],
            )
            .map_err(|e| e.to_string())?;
            let s = tx
                .query_row(
                    &format!("{SILENCE_COLUMNS} WHERE id = ?"),
                    [id],
                    silence_row,
                )
                .optional()
                .map_err(|e| e.to_string())?;
            Ok(serde_json::to_value(s).unwrap_or_default())
        });
        Box::pin(async move {
            let v = self.ask(|reply| Cmd::Admin { op, reply }).await?;
            serde_json::from_value(v).map_err(|e| StoreError::Database(e.to_string()))
        })
    }

    fn open_keys(&self, limit: usize) -> BoxFut<'_, Result<Vec<super::OpenKey>, StoreError>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Box::pin(self.reads.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT destination, key, channel, ts, opened_at FROM message_keys WHERE expires_at > ? ORDER BY destination, key LIMIT ?",
            )?;
            let rows = st.query_map([now_ms(), limit], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    KeyState {
                        channel: r.get(2)?,
                        ts: r.get(3)?,
                        opened_at: r.get(4)?,
                    },
                ))
            })?;
            rows.collect()
        }))
    }

    fn message_key(
        &self,
        destination: &str,
        key: &str,
    ) -> BoxFut<'_, Result<Option<KeyState>, StoreError>> {
        let (destination, key) = (destination.to_string(), key.to_string());
        Box::pin(self.reads.read(move |c| {
            c.prepare_cached(
                "SELECT channel, ts, opened_at FROM message_keys WHERE destination = ? AND key = ? AND expires_at > ?",
            )?
            .query_row(params![destination, key, now_ms()], |r| {
                Ok(KeyState {
                    channel: r.get(0)?,
                    ts: r.get(1)?,
                    opened_at: r.get(2)?,
                })
            })
            .optional()
        }))
    }

    fn dead_letters(&self, f: DeadLetterFilter) -> BoxFut<'_, Result<Vec<DeadLetter>, StoreError>> {
        Box::pin(self.reads.read(move |c| query_dead(c, &f)))
    }

    fn dead_letter(&self, id: i64) -> BoxFut<'_, Result<Option<DeadLetter>, StoreError>> {
        Box::pin(self.reads.read(move |c| {
            let mut st = c.prepare_cached(&format!("{DEAD_COLUMNS} WHERE id = ?"))?;
            st.query_row([id], dead_row).optional()
        }))
    }

    fn replay(&self, ids: Vec<i64>) -> BoxFut<'_, Result<Replayed, StoreError>> {
        Box::pin(self.ask(|reply| Cmd::Replay { ids, reply }))
    }

    fn purge(&self, filter: DeadLetterFilter) -> BoxFut<'_, Result<usize, StoreError>> {
        Box::pin(self.ask(|reply| Cmd::Purge { filter, reply }))
    }
}

fn where_clause(f: &DeadLetterFilter) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value as V;
    let mut w = vec!["1=1".to_string()];
    let mut args = Vec::new();
    if let Some(d) = &f.destination {
        w.push("destination = ?".into());
        args.push(V::Text(d.clone()));
    }
    if let Some(r) = &f.rule {
        w.push("rule = ?".into());
        args.push(V::Text(r.clone()));
    }
    if let Some(s) = f.since {
        w.push("dead_at >= ?".into());
        args.push(V::Integer(s));
    }
    if let Some(u) = f.until {
        w.push("dead_at <= ?".into());
        args.push(V::Integer(u));
    }
    (w.join(" AND "), args)
}

/// Deletes the dead letters matching `f` straight from the database file, without the data
/// directory's lock (SQLite serialises it with a running engine's writer): purging takes
/// nothing out of the engine's hands, unlike a replay, which needs the engine to pick the
/// messages up.
pub fn purge_dead(path: &Path, f: &DeadLetterFilter) -> Result<usize, StoreError> {
    let c = open_file(path)?;
    let (w, args) = where_clause(f);
    c.execute(
        &format!("DELETE FROM dead_letters WHERE {w}"),
        rusqlite::params_from_iter(args),
    )
    .map_err(db)
}

const SILENCE_COLUMNS: &str =
    "SELECT id, rule, matchers, starts_at, ends_at, author, comment, created_at, key FROM silences";

fn silence_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Silence> {
    Ok(Silence {
        id: r.get(0)?,
        rule: r.get(1)?,
        matchers: serde_json::from_str(&r.get::<_, String>(2)?).unwrap_or_default(),
        starts_at: r.get(3)?,
        ends_at: r.get(4)?,
        author: r.get(5)?,
        comment: r.get(6)?,
        created_at: r.get(7)?,
        key: r.get(8)?,
    })
}

/// A database error as a store error.
fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

/// Opens the database file for the CLI's offline commands.
fn open_file(path: &Path) -> Result<Connection, StoreError> {
    open(path).map_err(|e| StoreError::Open(format!("cannot open {}: {e}", path.display())))
}

/// Lists dead letters straight from a database file, newest first (the CLI, without a server).
pub fn list_dead(path: &Path, f: &DeadLetterFilter) -> Result<Vec<DeadLetter>, StoreError> {
    query_dead(&open_file(path)?, f).map_err(db)
}

/// One dead letter straight from a database file (the CLI, without a server).
pub fn read_dead(path: &Path, id: i64) -> Result<Option<DeadLetter>, StoreError> {
    open_file(path)?
        .query_row(&format!("{DEAD_COLUMNS} WHERE id = ?"), [id], dead_row)
        .optional()
        .map_err(db)
}

/// The columns of a dead letter, in [`dead_row`]'s order.
const DEAD_COLUMNS: &str = "SELECT id, destination, rule, event_id, target, message, created_at, dead_at, attempt_log, last_error, COALESCE(kind, 'message') FROM dead_letters";

fn query_dead(c: &Connection, f: &DeadLetterFilter) -> rusqlite::Result<Vec<DeadLetter>> {
    let (w, args) = where_clause(f);
    let sql = format!(
        "{DEAD_COLUMNS} WHERE {w} ORDER BY id DESC LIMIT {}",
        f.limit.unwrap_or(1000)
    );
    let mut st = c.prepare(&sql)?;
    let rows = st.query_map(rusqlite::params_from_iter(args), dead_row)?;
    rows.collect()
}

fn dead_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.get(0)?,
        destination: r.get(1)?,
        rule: r.get(2)?,
        event_id: r.get(3)?,
        target: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
        message: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or(Value::Null),
        created_at: r.get(6)?,
        dead_at: r.get(7)?,
        attempts: serde_json::from_str(&r.get::<_, String>(8)?).unwrap_or_default(),
        last_error: r.get(9)?,
        kind: r.get(10)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Target;
    use crate::outbox::Outbox;
    use serde_json::json;

    fn job(event_id: &str) -> NewJob {
        NewJob {
            destination: "d".into(),
            rule: "r".into(),
            event_id: event_id.into(),
            target: Target::default(),
            payload: crate::job::Payload::Message(json!({"text": "hi"})),
            secret: false,
            throttle: None,
            error: None,
        }
    }

    /// An outbox written before payloads had a kind: its operations come back as operations,
    /// its messages (even one with an `op` field of another shape) as messages.
    #[tokio::test]
    async fn rows_stored_before_payload_kinds_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join("switchyard.db")).unwrap();
            c.execute_batch(
                "CREATE TABLE outbox (
                  id INTEGER PRIMARY KEY AUTOINCREMENT,
                  destination TEXT NOT NULL, rule TEXT NOT NULL, event_id TEXT NOT NULL,
                  target TEXT NOT NULL, message TEXT NOT NULL, secret INTEGER NOT NULL,
                  created_at INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                  attempt_log TEXT NOT NULL DEFAULT '[]', last_error TEXT);
                 CREATE TABLE dead_letters (
                  id INTEGER PRIMARY KEY AUTOINCREMENT,
                  destination TEXT NOT NULL, rule TEXT NOT NULL, event_id TEXT NOT NULL,
                  target TEXT NOT NULL, message TEXT NOT NULL,
                  created_at INTEGER NOT NULL, dead_at INTEGER NOT NULL,
                  attempt_log TEXT NOT NULL, last_error TEXT NOT NULL);",
            )
            .unwrap();
            for (rule, msg) in [
                (
                    "w",
                    json!({"op": "expand", "rule": "w", "event": {"type": "port/entity.updated"}}),
                ),
                (
                    "r",
                    json!({"op": "report", "run_id": "r_1", "status": "SUCCESS", "fields": {},
                             "default_summary": "Sent 1 message(s)", "log": "delivered 1 message(s)",
                             "context": {"report": {"delivered": 1, "failed": 0, "errors": []}}}),
                ),
                (
                    "m",
                    json!({"op": "deploy", "text": "a webhook body with an op field"}),
                ),
            ] {
                c.execute(
                    "INSERT INTO outbox (destination, rule, event_id, target, message, secret, created_at) VALUES ('p', ?, 'e', '{}', ?, 0, 0)",
                    rusqlite::params![rule, msg.to_string()],
                )
                .unwrap();
            }
        }
        let o = Outbox::open(dir.path(), 100).unwrap();
        let jobs = o.load_pending().await.unwrap();
        assert_eq!(jobs.len(), 3);
        assert!(
            matches!(&jobs[0].payload, Payload::Expand(e) if e.rule == "w"),
            "{:?}",
            jobs[0].payload
        );
        match &jobs[1].payload {
            Payload::Report(r) => {
                assert_eq!(r.run_id, "r_1");
                assert_eq!(r.tally.delivered, 1);
                assert_eq!(crate::runs::report_of(&r.tally).status, "SUCCESS");
            }
            other => panic!("not a report: {other:?}"),
        }
        assert!(matches!(&jobs[2].payload, Payload::Message(m) if m["op"] == "deploy"));
    }

    fn committed(r: Result<Enqueued, EnqueueError>) -> Vec<Job> {
        match r {
            Ok(Enqueued::Committed(jobs, _)) => jobs,
            Ok(Enqueued::Duplicate) => panic!("unexpected duplicate"),
            Err(e) => panic!("enqueue failed: {e:?}"),
        }
    }

    #[tokio::test]
    async fn dedup_keys_hold_for_their_window_and_then_renew() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ob = Outbox::open(dir.path(), 100).expect("open");
        let long = Some(("k1".to_string(), Duration::from_secs(3600)));
        assert_eq!(
            committed(ob.enqueue(long.clone(), vec![job("k1")], None).await).len(),
            1
        );
        assert!(matches!(
            ob.enqueue(long, vec![job("k1")], None).await,
            Ok(Enqueued::Duplicate)
        ));
        // A window that is already over lets the same key in again (its row is renewed).
        let short = Some(("k2".to_string(), Duration::ZERO));
        committed(ob.enqueue(short.clone(), vec![job("k2")], None).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            committed(ob.enqueue(short, vec![job("k2")], None).await).len(),
            1
        );
        assert_eq!(ob.pending(), 3);
    }

    /// The window is durable: after a restart (the map rebuilt from `dedup_keys`) a key is
    /// still a duplicate; two enqueues of one key in one batch accept one.
    #[tokio::test]
    async fn dedup_keys_survive_a_restart_and_a_shared_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hour = Duration::from_secs(3600);
        {
            let ob = Outbox::open(dir.path(), 100).expect("open");
            let (a, b) = tokio::join!(
                ob.enqueue(Some(("same".into(), hour)), vec![job("same")], None),
                ob.enqueue(Some(("same".into(), hour)), vec![job("same")], None),
            );
            let dups = [&a, &b]
                .iter()
                .filter(|r| matches!(r, Ok(Enqueued::Duplicate)))
                .count();
            assert_eq!(dups, 1, "{a:?} {b:?}");
            committed(
                ob.enqueue(
                    Some(("gone".into(), Duration::ZERO)),
                    vec![job("gone")],
                    None,
                )
                .await,
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let ob = Outbox::open(dir.path(), 100).expect("reopen");
        assert!(matches!(
            ob.enqueue(Some(("same".into(), hour)), vec![job("same")], None)
                .await,
            Ok(Enqueued::Duplicate)
        ));
        // An expired key is not loaded: its event is accepted again.
        committed(
            ob.enqueue(Some(("gone".into(), hour)), vec![job("gone")], None)
                .await,
        );
    }

    /// Expired rows of the dedup log go at most `SWEEP_ROWS` per batch (a day-old burst does not
    /// hold one commit for long), and all of them go in the batches that follow.
    #[tokio::test]
    async fn expired_dedup_rows_are_swept_in_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = 5_000;
        {
            let ob = Outbox::open(dir.path(), 100_000).expect("open");
            let all = (0..n).map(|i| {
                let ob = ob.clone();
                async move {
                    let key = format!("k{i}");
                    ob.enqueue(Some((key.clone(), Duration::ZERO)), vec![job(&key)], None)
                        .await
                }
            });
            for r in futures_util::future::join_all(all).await {
                committed(r);
            }
        }
        let rows = |dir: &Path| -> i64 {
            let c = Connection::open(dir.join("switchyard.db")).expect("db");
            c.query_row("SELECT count(*) FROM dedup_keys", [], |r| r.get(0))
                .expect("count")
        };
        assert!(rows(dir.path()) > 0);
        // After a restart every row has expired; each batch takes at most SWEEP_ROWS of them.
        let ob = Outbox::open(dir.path(), 100_000).expect("reopen");
        let mut seen = vec![rows(dir.path())];
        for i in 0..4 {
            let key = format!("after-{i}");
            committed(
                ob.enqueue(
                    Some((key.clone(), Duration::from_secs(60))),
                    vec![job(&key)],
                    None,
                )
                .await,
            );
            seen.push(rows(dir.path()));
        }
        for w in seen.windows(2) {
            assert!(w[0] - w[1] <= dedup::SWEEP_ROWS, "{seen:?}");
        }
        assert_eq!(
            *seen.last().expect("last"),
            4,
            "only the live keys remain: {seen:?}"
        );
    }

    /// A data directory from before schema 3 keeps its unexpired keys (as digests); the old
    /// table is gone.
    #[tokio::test]
    async fn dedup_keys_of_the_old_table_are_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let far = now_ms() + 3_600_000;
        {
            let c = Connection::open(dir.path().join("switchyard.db")).expect("db");
            c.execute_batch(
                "CREATE TABLE dedup (key TEXT PRIMARY KEY, expires_at INTEGER NOT NULL) WITHOUT ROWID;
                 PRAGMA user_version = 2;",
            )
            .expect("old schema");
            c.execute("INSERT INTO dedup VALUES ('live', ?), ('dead', 1)", [far])
                .expect("rows");
        }
        let ob = Outbox::open(dir.path(), 100).expect("open");
        let hour = Duration::from_secs(3600);
        assert!(matches!(
            ob.enqueue(Some(("live".into(), hour)), vec![job("live")], None)
                .await,
            Ok(Enqueued::Duplicate)
        ));
        committed(
            ob.enqueue(Some(("dead".into(), hour)), vec![job("dead")], None)
                .await,
        );
        drop(ob);
        let c = Connection::open(dir.path().join("switchyard.db")).expect("db");
        let old: bool = c
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'dedup')",
                [],
                |r| r.get(0),
            )
            .expect("query");
        assert!(!old, "the old table is dropped");
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, 3);
    }

    #[tokio::test]
    async fn an_event_with_nothing_to_send_is_not_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ob = Outbox::open(dir.path(), 100).expect("open");
        let key = Some(("nothing".to_string(), Duration::from_secs(3600)));
        // Twice the same key, no jobs: both answered as committed, nothing kept, no dedup row.
        assert!(committed(ob.enqueue(key.clone(), vec![], None).await).is_empty());
        assert!(committed(ob.enqueue(key.clone(), vec![], None).await).is_empty());
        // The key is still free for a redelivery that does produce a job.
        assert_eq!(
            committed(ob.enqueue(key, vec![job("nothing")], None).await).len(),
            1
        );
    }

    #[tokio::test]
    async fn a_delivered_job_leaves_the_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ob = Outbox::open(dir.path(), 100).expect("open");
        let jobs = committed(ob.enqueue(None, vec![job("e"), job("e")], None).await);
        assert_eq!(ob.pending(), 2);
        let delivered = Outcome::Delivered {
            follow_ups: vec![],
            message: true,
            key: None,
        };
        assert!(ob.finish(jobs[0].id, delivered).await.is_empty());
        assert_eq!(ob.pending(), 1);
        assert_eq!(ob.load_pending().await.expect("pending").len(), 1);
    }
}
