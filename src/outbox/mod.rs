//! The durable outbox: accepted dispatches, delivery attempts, dead letters and the dedup
//! window, in one SQLite database (WAL) under the data directory.
//!
//! Why SQLite (via `rusqlite`, bundled): one file, crash-safe with WAL, readable with standard
//! tools when an operator needs to look, and fast enough when commits are grouped. `redb` would
//! do too, but dead-letter queries with filters (destination, rule, time) are plain SQL here.
//!
//! Guarantees:
//! - [`Outbox::enqueue`] returns only after the dispatches (and the event's dedup key) are
//!   committed; the HTTP handler answers 202 after that. Concurrent enqueues are grouped into one
//!   transaction by a single writer thread ("group commit"), so durability costs one fsync per
//!   batch, not per request.
//! - A job leaves the `outbox` table only when it is delivered (deleted) or dead-lettered
//!   (moved, in the same transaction). A crash at any point leaves it pending; on start every
//!   pending job is handed to the workers again (at-least-once).
//! - An event id already seen within its dedup window is not enqueued again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

pub use crate::job::{Job, NewJob};
use crate::job::{Payload, ReportSpec, RunReport, Tally, Target};

/// Follow-up tracking for an action run: when every job of the event has finished, a report
/// job for `destination` is created in the same transaction.
#[derive(Debug, Clone)]
pub struct NewTracker {
    /// The `port` destination that reports.
    pub destination: String,
    pub run_id: String,
    /// What the report renders.
    pub report: ReportSpec,
    /// Fail the run with this reason regardless of deliveries (e.g. no rule matched).
    pub fail: Option<String>,
}

/// One delivery attempt, as recorded for dead letters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    pub at: i64,
    pub error: String,
}

/// A dead letter: a dispatch that will not be delivered without an operator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: i64,
    pub destination: String,
    pub rule: String,
    pub event_id: String,
    pub target: Target,
    /// The payload's JSON (see [`Payload::to_json`]); a passcode notification's is withheld.
    pub message: Value,
    /// `message`, `expand` or `report`.
    #[serde(default = "message_kind")]
    pub kind: String,
    pub created_at: i64,
    pub dead_at: i64,
    pub attempts: Vec<Attempt>,
    pub last_error: String,
}

/// Filters for listing dead letters.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub destination: Option<String>,
    pub rule: Option<String>,
    /// Only those that died at or after this unix-ms time.
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub limit: Option<usize>,
}

/// Why an enqueue did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnqueueError {
    /// Too many pending deliveries; the caller should retry later.
    Full { pending: usize },
    /// The database failed; nothing was committed.
    Storage(String),
}

/// The result of an enqueue.
#[derive(Debug, Clone)]
pub enum Enqueued {
    /// Committed; the jobs with their ids, and how many were suppressed by throttles.
    Committed(Vec<Job>, usize),
    /// The event id was already accepted within the dedup window; nothing was added.
    Duplicate,
}

/// What to do with a job after an attempt.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Delivered; `message` is false for operations (a Port expansion), which do not count as
    /// delivered messages in a run's report.
    Delivered {
        follow_ups: Vec<NewJob>,
        message: bool,
    },
    Retry {
        error: String,
    },
    Dead {
        error: String,
    },
}

// One command per message passes through the channel; `Enqueue` is the usual one, so boxing
// it would cost an allocation per event to save a few bytes on the rarer ones.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    Enqueue {
        dedup: Option<(String, i64)>,
        jobs: Vec<NewJob>,
        tracker: Option<(String, NewTracker)>,
        reply: oneshot::Sender<Result<Enqueued, EnqueueError>>,
    },
    Finish {
        id: i64,
        outcome: Outcome,
        reply: Option<oneshot::Sender<Vec<Job>>>,
    },
    Replay {
        ids: Vec<i64>,
        reply: oneshot::Sender<Result<Vec<Job>, String>>,
    },
    Purge {
        filter: DeadLetterFilter,
        reply: oneshot::Sender<Result<usize, String>>,
    },
}

/// Handle to the outbox. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    /// The data directory's lock, held for as long as any clone of this outbox lives.
    _lock: Arc<std::fs::File>,
    tx: mpsc::Sender<Cmd>,
    path: PathBuf,
    pending: Arc<AtomicUsize>,
    max_pending: usize,
}

/// Current unix time in milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
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
  kind TEXT NOT NULL DEFAULT 'message'
);
CREATE TABLE IF NOT EXISTS dead_letters (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  destination TEXT NOT NULL, rule TEXT NOT NULL, event_id TEXT NOT NULL,
  target TEXT NOT NULL, message TEXT NOT NULL,
  created_at INTEGER NOT NULL, dead_at INTEGER NOT NULL,
  attempt_log TEXT NOT NULL, last_error TEXT NOT NULL,
  kind TEXT NOT NULL DEFAULT 'message'
);
CREATE INDEX IF NOT EXISTS dead_letters_dest ON dead_letters(destination, dead_at);
CREATE TABLE IF NOT EXISTS dedup (key TEXT PRIMARY KEY, expires_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_expires ON dedup(expires_at);
CREATE TABLE IF NOT EXISTS throttle (key TEXT PRIMARY KEY, until INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_trackers (
  event_id TEXT PRIMARY KEY, destination TEXT NOT NULL, run_id TEXT NOT NULL,
  pending INTEGER NOT NULL, delivered INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
  errors TEXT NOT NULL DEFAULT '[]', report TEXT NOT NULL
);
";

/// Hot statements go through SQLite's prepared-statement cache: the profile under load showed
/// a fifth of the writer's time in re-parsing the same SQL text for every row.
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

fn message_kind() -> String {
    "message".into()
}

/// Schema versions (`PRAGMA user_version`) and what each migration does.
///
/// 1. Payload kinds: `outbox` and `dead_letters` get a `kind` column. Rows stored before it
///    were operations for the `port` destination when their JSON has an `op` of `expand` (with
///    `rule` and `event`) or `report` (with `run_id` and `context`), and messages otherwise.
fn migrate(c: &Connection) -> rusqlite::Result<()> {
    let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version >= 1 {
        return Ok(());
    }
    for table in ["outbox", "dead_letters"] {
        let has_kind: bool = c.query_row(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM pragma_table_info('{table}') WHERE name = 'kind')"
            ),
            [],
            |r| r.get(0),
        )?;
        if !has_kind {
            c.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN kind TEXT NOT NULL DEFAULT 'message'"
            ))?;
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

/// The message kept in a dead letter of a secret event.
const REDACTED: &str = "[secret: One-Time Passcode notification, not kept]";

/// `REDACTED` as the JSON text stored in the `message` column.
fn redacted_json() -> String {
    Value::String(REDACTED.into()).to_string()
}

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

impl Outbox {
    /// Opens (creating if needed) `<data_dir>/switchyard.db` and starts the writer thread.
    /// `max_pending` bounds the jobs waiting for delivery; past it enqueues fail with `Full`.
    pub fn open(data_dir: &Path, max_pending: usize) -> Result<Outbox, String> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", data_dir.display()))?;
        let lock = lock_data_dir(data_dir)?;
        let path = data_dir.join("switchyard.db");
        let conn = open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let count: i64 = conn
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
            .map_err(|e| e.to_string())?;
        let pending = Arc::new(AtomicUsize::new(count as usize));
        let (tx, rx) = mpsc::channel();
        let p2 = pending.clone();
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer(conn, rx, p2))
            .map_err(|e| e.to_string())?;
        Ok(Outbox {
            _lock: Arc::new(lock),
            tx,
            path,
            pending,
            max_pending,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Jobs waiting for delivery.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Commits the jobs of one event (and its dedup key; jobs with `error` set go straight to
    /// dead letters, e.g. a template that failed for this event), and the run tracker when the
    /// event is an action run to report. Returns after the commit.
    pub async fn enqueue(
        &self,
        dedup: Option<(String, Duration)>,
        jobs: Vec<NewJob>,
        tracker: Option<(String, NewTracker)>,
    ) -> Result<Enqueued, EnqueueError> {
        // An event that produced no job and no run tracker has nothing to make durable: nothing
        // can be lost, and a redelivery of it routes to nothing again, so its dedup key would
        // protect nothing. Most events are like this (an entity update no rule cares about), and
        // skipping the writer for them was the largest single cut in CPU per event (bench/).
        if jobs.is_empty() && tracker.is_none() {
            return Ok(Enqueued::Committed(Vec::new(), 0));
        }
        let pending = self.pending();
        if !jobs.is_empty() && pending + jobs.len() > self.max_pending {
            return Err(EnqueueError::Full { pending });
        }
        let (reply, rx) = oneshot::channel();
        let dedup = dedup.map(|(k, w)| (k, now_ms() + w.as_millis() as i64));
        self.tx
            .send(Cmd::Enqueue {
                dedup,
                jobs,
                tracker,
                reply,
            })
            .map_err(|_| EnqueueError::Storage("the outbox writer has stopped".into()))?;
        // A dropped reply: the batch it was in failed before its turn came.
        rx.await
            .map_err(|_| EnqueueError::Storage("the outbox could not commit this event".into()))?
    }

    /// Records the outcome of an attempt; resolves once committed, with the jobs the commit
    /// created (follow-ups, and a run report when the event's last job finished).
    pub async fn finish(&self, id: i64, outcome: Outcome) -> Vec<Job> {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Finish {
            id,
            outcome,
            reply: Some(reply),
        };
        if self.tx.send(cmd).is_ok() {
            return rx.await.unwrap_or_default();
        }
        Vec::new()
    }

    /// Every pending job, oldest first (used at start-up to resume delivery).
    pub fn load_pending(&self) -> Result<Vec<Job>, String> {
        let c = open(&self.path).map_err(|e| e.to_string())?;
        let mut st = c
            .prepare("SELECT id, destination, rule, event_id, target, message, secret, created_at, attempts, kind FROM outbox ORDER BY id")
            .map_err(|e| e.to_string())?;
        let rows = st
            .query_map([], |r| {
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
                })
            })
            .map_err(|e| e.to_string())?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    }

    /// Throttle keys currently suppressing repeats.
    pub fn active_throttles(&self) -> Result<i64, String> {
        let c = open(&self.path).map_err(|e| e.to_string())?;
        c.query_row(
            "SELECT count(*) FROM throttle WHERE until > ?",
            [now_ms()],
            |r| r.get(0),
        )
        .map_err(|e| e.to_string())
    }

    /// Dead letters per destination.
    pub fn dead_letters_by_destination(&self) -> Result<Vec<(String, i64)>, String> {
        self.count_by_destination("dead_letters")
    }

    /// Pending jobs per destination.
    pub fn pending_by_destination(&self) -> Result<Vec<(String, i64)>, String> {
        self.count_by_destination("outbox")
    }

    fn count_by_destination(&self, table: &str) -> Result<Vec<(String, i64)>, String> {
        let c = open(&self.path).map_err(|e| e.to_string())?;
        let mut st = c
            .prepare(&format!(
                "SELECT destination, count(*) FROM {table} GROUP BY destination"
            ))
            .map_err(|e| e.to_string())?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| e.to_string())?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    }

    /// Lists dead letters, newest first.
    pub fn dead_letters(&self, f: &DeadLetterFilter) -> Result<Vec<DeadLetter>, String> {
        list_dead(&self.path, f)
    }

    /// Moves dead letters back into the outbox; returns the new jobs to hand to the workers.
    pub async fn replay(&self, ids: Vec<i64>) -> Result<Vec<Job>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Replay { ids, reply })
            .map_err(|_| "the outbox writer has stopped".to_string())?;
        rx.await
            .map_err(|_| "the outbox writer has stopped".to_string())?
    }

    /// Deletes dead letters matching the filter; returns how many.
    pub async fn purge(&self, filter: DeadLetterFilter) -> Result<usize, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Purge { filter, reply })
            .map_err(|_| "the outbox writer has stopped".to_string())?;
        rx.await
            .map_err(|_| "the outbox writer has stopped".to_string())?
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

/// Lists dead letters straight from a database file (the CLI uses this without a server).
/// Deletes the dead letters matching `f` straight from the database file, without the data
/// directory's lock (SQLite serialises it with a running engine's writer): purging takes
/// nothing out of the engine's hands, unlike a replay, which needs the engine to pick the
/// messages up.
pub fn purge_dead(path: &Path, f: &DeadLetterFilter) -> Result<usize, String> {
    let c = open(path).map_err(|e| e.to_string())?;
    let (w, args) = where_clause(f);
    c.execute(
        &format!("DELETE FROM dead_letters WHERE {w}"),
        rusqlite::params_from_iter(args),
    )
    .map_err(|e| e.to_string())
}

pub fn list_dead(path: &Path, f: &DeadLetterFilter) -> Result<Vec<DeadLetter>, String> {
    let c = open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let (w, args) = where_clause(f);
    let sql = format!(
        "SELECT id, destination, rule, event_id, target, message, created_at, dead_at, attempt_log, last_error, kind FROM dead_letters WHERE {w} ORDER BY id DESC LIMIT {}",
        f.limit.unwrap_or(1000)
    );
    let mut st = c.prepare(&sql).map_err(|e| e.to_string())?;
    let rows = st
        .query_map(rusqlite::params_from_iter(args), |r| {
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
        })
        .map_err(|e| e.to_string())?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

fn writer(mut conn: Connection, rx: mpsc::Receiver<Cmd>, pending: Arc<AtomicUsize>) {
    let mut full = true; // the schema opens the connection with synchronous=FULL
                         // Registered once (the server installs the recorder before it opens the outbox).
    let commits_full = metrics::counter!("switchyard_outbox_commits_total", "sync" => "full");
    let commits_normal = metrics::counter!("switchyard_outbox_commits_total", "sync" => "normal");
    let commands = metrics::counter!("switchyard_outbox_commands_total");
    let failures = metrics::counter!("switchyard_outbox_commit_failures_total");
    // Outcomes of attempts whose commit failed (disk full, database busy past its timeout).
    // They are not dropped: a delivered message whose outcome is lost would stay queued with
    // no worker and be sent again on the next start. They are committed again, first in every
    // batch, with a growing pause, until storage takes them; their callers wait meanwhile.
    let mut held: Vec<Cmd> = Vec::new();
    let mut pause = RETRY_FIRST;
    let mut closed = false;
    let mut tries_after_close = 0;
    loop {
        let first = if held.is_empty() {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => break,
            }
        } else if closed {
            tries_after_close += 1;
            if tries_after_close > 20 {
                tracing::error!(
                    outcomes = held.len(),
                    "outbox writer stopping with delivery outcomes it could not commit; those messages are sent again on the next start"
                );
                break;
            }
            std::thread::sleep(pause);
            None
        } else {
            match rx.recv_timeout(pause) {
                Ok(c) => Some(c),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    closed = true;
                    None
                }
            }
        };
        // Group every command already waiting into one transaction ("group commit").
        let mut batch = std::mem::take(&mut held);
        batch.extend(first);
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        // The writer is the only connection that changes run trackers, so this holds for the
        // whole batch. `true` when it cannot be read: then nothing is skipped.
        let tracked = conn
            .row_c("SELECT EXISTS (SELECT 1 FROM run_trackers)", [], |r| {
                r.get::<_, bool>(0)
            })
            .unwrap_or(true);
        let need = needs_sync(&batch, tracked);
        if need != full {
            let mode = if need { "FULL" } else { "NORMAL" };
            match conn.pragma_update(None, "synchronous", mode) {
                Ok(()) => full = need,
                Err(e) => tracing::error!(error = %e, "cannot set the outbox's synchronous mode"),
            }
        }
        if need { &commits_full } else { &commits_normal }.increment(1);
        commands.increment(batch.len() as u64);
        // On failure every waiting caller of an enqueue, replay or purge gets an error, and
        // the outcomes of attempts come back to be committed again.
        match apply(&mut conn, batch, &pending, tracked) {
            Ok(()) => {
                if pause > RETRY_FIRST {
                    tracing::info!("the outbox commits again");
                }
                pause = RETRY_FIRST;
            }
            Err((e, kept)) => {
                failures.increment(1);
                if pause == RETRY_FIRST || pause >= RETRY_MAX {
                    tracing::error!(error = %e, outcomes_held = kept.len(), "outbox transaction failed; delivery outcomes are kept and committed again");
                }
                held = kept;
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }
}

/// First and longest pause between commits of held outcomes.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Does this batch need its own fsync? Accepting an event, creating a job or changing dead
/// letters does: the caller is told "durable" right after. A batch that only records attempt
/// outcomes and can create no job (no follow-ups, no open run tracker a finished job could
/// close into a report) does not: SQLite's WAL makes it durable with the next synced commit or
/// checkpoint, and a power loss before that can only make a delivered message be sent again,
/// which at-least-once delivery allows anyway. Under the bench load about 40% of commits are
/// like this (`switchyard_outbox_commits_total{sync="normal"}`).
fn needs_sync(batch: &[Cmd], tracked: bool) -> bool {
    let mut finishes = false;
    for c in batch {
        match c {
            Cmd::Finish {
                outcome: Outcome::Delivered { follow_ups, .. },
                ..
            } if !follow_ups.is_empty() => return true,
            Cmd::Finish { .. } => finishes = true,
            _ => return true,
        }
    }
    finishes && tracked
}

/// Replies sent after a successful commit.
enum Reply {
    Enqueue(
        oneshot::Sender<Result<Enqueued, EnqueueError>>,
        Result<Enqueued, EnqueueError>,
    ),
    Replay(oneshot::Sender<Result<Vec<Job>, String>>, Vec<Job>),
    Purge(oneshot::Sender<Result<usize, String>>, usize),
}

/// Applies a batch in one transaction. `tracked`: some run tracker exists as the batch starts
/// (a job's tracker is created in the transaction that creates the job, so a job finished in
/// this batch can only have one if so).
fn apply(
    conn: &mut Connection,
    batch: Vec<Cmd>,
    pending: &AtomicUsize,
    tracked: bool,
) -> Result<(), (String, Vec<Cmd>)> {
    // Outcomes are applied by reference, so that they survive a failed transaction whole;
    // the rest is consumed (its callers are answered with the error).
    let (finishes, others): (Vec<Cmd>, Vec<Cmd>) = batch
        .into_iter()
        .partition(|c| matches!(c, Cmd::Finish { .. }));
    match apply_tx(conn, others, &finishes, pending, tracked) {
        Ok(created) => {
            for (cmd, jobs) in finishes.into_iter().zip(created) {
                if let Cmd::Finish {
                    reply: Some(tx), ..
                } = cmd
                {
                    let _ = tx.send(jobs);
                }
            }
            Ok(())
        }
        Err(e) => Err((e, finishes)),
    }
}

/// One transaction over `others` and `finishes`; returns the jobs each finish created.
fn apply_tx(
    conn: &mut Connection,
    others: Vec<Cmd>,
    finishes: &[Cmd],
    pending: &AtomicUsize,
    tracked: bool,
) -> Result<Vec<Vec<Job>>, String> {
    let tx = conn.transaction().map_err(|e| e.to_string())?;
    let now = now_ms();
    let mut replies = Vec::new();
    let mut finished: Vec<Vec<Job>> = Vec::with_capacity(finishes.len());
    let mut added: isize = 0;
    for cmd in finishes {
        let Cmd::Finish { id, outcome, .. } = cmd else {
            continue;
        };
        let id = *id;
        {
            // The event id only matters to its run tracker; without any tracker (the usual
            // case) there is nothing to look up.
            let event_id: Option<String> = if tracked {
                tx.row_c("SELECT event_id FROM outbox WHERE id = ?", [id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(|e| e.to_string())?
            } else {
                None
            };
            let mut created = Vec::new();
            match outcome {
                Outcome::Delivered {
                    follow_ups,
                    message,
                } => {
                    let message = *message;
                    let n = tx
                        .exec_c("DELETE FROM outbox WHERE id = ?", [id])
                        .map_err(|e| e.to_string())?;
                    added -= n as isize;
                    let mut new_pending = 0i64;
                    for j in follow_ups.iter().cloned() {
                        match &j.error {
                            Some(e) => {
                                insert_dead(&tx, &j, e, now)?;
                                if let Some(ev) = &event_id {
                                    track(&tx, ev, 0, 0, 1, Some(e))?;
                                }
                            }
                            None => {
                                created.push(insert_job(&tx, j, now)?);
                                new_pending += 1;
                            }
                        }
                    }
                    added += created.len() as isize;
                    if let (Some(ev), 1..) = (&event_id, n) {
                        track(&tx, ev, new_pending - 1, i64::from(message), 0, None)?;
                        if let Some(r) = close_tracker(&tx, ev, now)? {
                            added += 1;
                            created.push(r);
                        }
                    }
                }
                Outcome::Retry { error } => {
                    let log = append_log(&tx, id, now, error)?;
                    tx.exec_c(
                            "UPDATE outbox SET attempts = attempts + 1, attempt_log = ?, last_error = ? WHERE id = ?",
                            params![log, error, id],
                        )
                        .map_err(|e| e.to_string())?;
                }
                Outcome::Dead { error } => {
                    let log = append_log(&tx, id, now, error)?;
                    let n = tx
                            .exec_c(
                                "INSERT INTO dead_letters (destination, rule, event_id, target, message, created_at, dead_at, attempt_log, last_error, kind)
                                 SELECT destination, rule, event_id, target, CASE WHEN secret = 1 THEN ? ELSE message END, created_at, ?, ?, ?, kind FROM outbox WHERE id = ?",
                                params![redacted_json(), now, log, error, id],
                            )
                            .map_err(|e| e.to_string())?;
                    tx.exec_c("DELETE FROM outbox WHERE id = ?", [id])
                        .map_err(|e| e.to_string())?;
                    added -= n as isize;
                    if let (Some(ev), 1..) = (&event_id, n) {
                        track(&tx, ev, -1, 0, 1, Some(error))?;
                        if let Some(r) = close_tracker(&tx, ev, now)? {
                            added += 1;
                            created.push(r);
                        }
                    }
                }
            }
            finished.push(created);
        }
    }
    for cmd in others {
        match cmd {
            Cmd::Enqueue {
                dedup,
                jobs,
                tracker,
                reply,
            } => {
                if let Some((key, expires)) = &dedup {
                    // One statement: a new key is inserted, an expired one renewed, a live one
                    // left alone (no row changed: a duplicate).
                    let changed = tx
                        .exec_c(
                            "INSERT INTO dedup (key, expires_at) VALUES (?1, ?2)
                             ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at
                             WHERE dedup.expires_at <= ?3",
                            params![key, expires, now],
                        )
                        .map_err(|e| e.to_string())?;
                    if changed == 0 {
                        replies.push(Reply::Enqueue(reply, Ok(Enqueued::Duplicate)));
                        continue;
                    }
                }
                let mut out = Vec::with_capacity(jobs.len());
                let mut throttled = 0;
                // One decision per key for this event: a throttled match drops all its sends.
                let mut decided: std::collections::HashMap<String, bool> = Default::default();
                for j in jobs {
                    if let Some((key, window)) = &j.throttle {
                        let allowed = match decided.get(key) {
                            Some(a) => *a,
                            None => {
                                let a = claim_throttle(&tx, key, *window, now)?;
                                decided.insert(key.clone(), a);
                                a
                            }
                        };
                        if !allowed {
                            throttled += 1;
                            continue;
                        }
                    }
                    match &j.error {
                        Some(e) => insert_dead(&tx, &j, e, now)?,
                        None => out.push(insert_job(&tx, j, now)?),
                    }
                }
                if let Some((event_id, t)) = tracker {
                    let errors = serde_json::to_string(&t.fail.iter().collect::<Vec<_>>())
                        .unwrap_or_default();
                    tx.exec_c(
                        "INSERT OR REPLACE INTO run_trackers (event_id, destination, run_id, pending, failed, errors, report) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        params![event_id, t.destination, t.run_id, out.len() as i64, t.fail.is_some() as i64, errors, serde_json::to_string(&t.report).unwrap_or_default()],
                    )
                    .map_err(|e| e.to_string())?;
                    if out.is_empty() {
                        if let Some(r) = close_tracker(&tx, &event_id, now)? {
                            out.push(r);
                        }
                    }
                }
                added += out.len() as isize;
                replies.push(Reply::Enqueue(
                    reply,
                    Ok(Enqueued::Committed(out, throttled)),
                ));
            }
            // Applied above, from `finishes`.
            Cmd::Finish { .. } => {}
            Cmd::Replay { ids, reply } => {
                let mut jobs = Vec::new();
                for id in ids {
                    let row: Option<(String, String, String, String, String, String)> = tx
                        .row_c(
                            "SELECT destination, rule, event_id, target, message, kind FROM dead_letters WHERE id = ?",
                            [id],
                            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
                        )
                        .optional()
                        .map_err(|e| e.to_string())?;
                    let Some((destination, rule, event_id, target, message, kind)) = row else {
                        continue;
                    };
                    if message == redacted_json() {
                        continue;
                    }
                    tx.exec_c(
                        "INSERT INTO outbox (destination, rule, event_id, target, message, secret, created_at, kind) VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
                        params![destination, rule, event_id, target, message, now, kind],
                    )
                    .map_err(|e| e.to_string())?;
                    let new_id = tx.last_insert_rowid();
                    tx.exec_c("DELETE FROM dead_letters WHERE id = ?", [id])
                        .map_err(|e| e.to_string())?;
                    jobs.push(Job {
                        id: new_id,
                        destination,
                        payload: Payload::from_stored(&kind, &message, &rule),
                        rule,
                        event_id,
                        target: serde_json::from_str(&target).unwrap_or_default(),
                        text: Bytes::from(message),
                        secret: false,
                        created_at: now,
                        attempts: 0,
                    });
                }
                added += jobs.len() as isize;
                replies.push(Reply::Replay(reply, jobs));
            }
            Cmd::Purge { filter, reply } => {
                let (w, args) = where_clause(&filter);
                let n = tx
                    .execute(
                        &format!("DELETE FROM dead_letters WHERE {w}"),
                        rusqlite::params_from_iter(args),
                    )
                    .map_err(|e| e.to_string())?;
                replies.push(Reply::Purge(reply, n));
            }
        }
    }
    // Expired dedup keys are dropped now and then, inside the same transaction; the index on
    // `expires_at` makes that a range delete of what expired, not a scan of every key.
    if now % 64 == 0 {
        tx.exec_c("DELETE FROM dedup WHERE expires_at < ?", [now])
            .map_err(|e| e.to_string())?;
    }
    match tx.commit() {
        Ok(()) => {
            if added >= 0 {
                pending.fetch_add(added as usize, Ordering::Relaxed);
            } else {
                pending.fetch_sub((-added) as usize, Ordering::Relaxed);
            }
            for r in replies {
                match r {
                    Reply::Enqueue(tx, v) => {
                        let _ = tx.send(v);
                    }
                    Reply::Replay(tx, jobs) => {
                        let _ = tx.send(Ok(jobs));
                    }
                    Reply::Purge(tx, n) => {
                        let _ = tx.send(Ok(n));
                    }
                }
            }
            Ok(finished)
        }
        Err(e) => {
            let msg = e.to_string();
            for r in replies {
                match r {
                    Reply::Enqueue(tx, _) => {
                        let _ = tx.send(Err(EnqueueError::Storage(msg.clone())));
                    }
                    Reply::Replay(tx, _) => {
                        let _ = tx.send(Err(msg.clone()));
                    }
                    Reply::Purge(tx, _) => {
                        let _ = tx.send(Err(msg.clone()));
                    }
                }
            }
            Err(msg)
        }
    }
}

fn insert_job(tx: &rusqlite::Transaction<'_>, j: NewJob, now: i64) -> Result<Job, String> {
    let text = j.payload.to_text();
    tx.exec_c(
        "INSERT INTO outbox (destination, rule, event_id, target, message, secret, created_at, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        params![j.destination, j.rule, j.event_id, serde_json::to_string(&j.target).unwrap_or_default(), text, j.secret as i64, now, j.payload.kind()],
    )
    .map_err(|e| e.to_string())?;
    Ok(Job {
        id: tx.last_insert_rowid(),
        destination: j.destination,
        rule: j.rule,
        event_id: j.event_id,
        target: j.target,
        payload: j.payload,
        text: Bytes::from(text),
        secret: j.secret,
        created_at: now,
        attempts: 0,
    })
}

fn insert_dead(
    tx: &rusqlite::Transaction<'_>,
    j: &NewJob,
    error: &str,
    now: i64,
) -> Result<(), String> {
    let log = serde_json::to_string(&[Attempt {
        at: now,
        error: error.to_string(),
    }])
    .unwrap_or_default();
    let msg = if j.secret {
        redacted_json()
    } else {
        j.payload.to_text()
    };
    tx.exec_c(
        "INSERT INTO dead_letters (destination, rule, event_id, target, message, created_at, dead_at, attempt_log, last_error, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        params![j.destination, j.rule, j.event_id, serde_json::to_string(&j.target).unwrap_or_default(), msg, now, now, log, error, j.payload.kind()],
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// Claims a throttle key for `window`; false when it is still held.
fn claim_throttle(
    tx: &rusqlite::Transaction<'_>,
    key: &str,
    window: Duration,
    now: i64,
) -> Result<bool, String> {
    let until: Option<i64> = tx
        .row_c("SELECT until FROM throttle WHERE key = ?", [key], |r| {
            r.get(0)
        })
        .optional()
        .map_err(|e| e.to_string())?;
    let allowed = until.is_none_or(|u| u <= now);
    if allowed {
        tx.exec_c(
            "INSERT OR REPLACE INTO throttle (key, until) VALUES (?, ?)",
            params![key, now + window.as_millis() as i64],
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(allowed)
}

/// Adjusts a run tracker's counts (no-op when the event has none).
fn track(
    tx: &rusqlite::Transaction<'_>,
    event_id: &str,
    pending: i64,
    delivered: i64,
    failed: i64,
    error: Option<&str>,
) -> Result<(), String> {
    let errors: Option<String> = tx
        .row_c(
            "SELECT errors FROM run_trackers WHERE event_id = ?",
            [event_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| e.to_string())?;
    let Some(errors) = errors else { return Ok(()) };
    let mut list: Vec<String> = serde_json::from_str(&errors).unwrap_or_default();
    if let Some(e) = error {
        if list.len() < 20 {
            list.push(e.to_string());
        }
    }
    tx.exec_c(
        "UPDATE run_trackers SET pending = pending + ?, delivered = delivered + ?, failed = failed + ?, errors = ? WHERE event_id = ?",
        params![pending, delivered, failed, serde_json::to_string(&list).unwrap_or_default(), event_id],
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// When a tracker has nothing pending, replaces it with the report job.
fn close_tracker(
    tx: &rusqlite::Transaction<'_>,
    event_id: &str,
    now: i64,
) -> Result<Option<Job>, String> {
    type Row = (String, String, i64, i64, i64, String, String);
    let row: Option<Row> = tx
        .row_c(
            "SELECT destination, run_id, pending, delivered, failed, errors, report FROM run_trackers WHERE event_id = ?",
            [event_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .optional()
        .map_err(|e| e.to_string())?;
    let Some((destination, run_id, pending, delivered, failed, errors, report)) = row else {
        return Ok(None);
    };
    if pending > 0 {
        return Ok(None);
    }
    tx.exec_c("DELETE FROM run_trackers WHERE event_id = ?", [event_id])
        .map_err(|e| e.to_string())?;
    // A spec that does not parse (a row of an older shape) still reports the run, with the
    // default wording and the envelope it kept.
    let spec: ReportSpec = serde_json::from_str(&report).unwrap_or_else(|_| {
        let v: Value = serde_json::from_str(&report).unwrap_or(Value::Null);
        ReportSpec {
            rule: v["rule"].as_str().unwrap_or("report").to_string(),
            context: v["context"].clone(),
            ..Default::default()
        }
    });
    let tally = Tally {
        delivered,
        failed,
        errors: serde_json::from_str(&errors).unwrap_or_default(),
    };
    let job = NewJob {
        destination,
        rule: spec.rule.clone(),
        event_id: format!("report:{event_id}"),
        target: Target::default(),
        payload: Payload::Report(Box::new(RunReport {
            run_id,
            spec,
            tally,
        })),
        secret: false,
        throttle: None,
        error: None,
    };
    insert_job(tx, job, now).map(Some)
}

fn append_log(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    now: i64,
    error: &str,
) -> Result<String, String> {
    let log: Option<String> = tx
        .row_c("SELECT attempt_log FROM outbox WHERE id = ?", [id], |r| {
            r.get(0)
        })
        .optional()
        .map_err(|e| e.to_string())?;
    let mut v: Vec<Attempt> = log
        .and_then(|l| serde_json::from_str(&l).ok())
        .unwrap_or_default();
    v.push(Attempt {
        at: now,
        error: error.to_string(),
    });
    // Keep the log bounded: the first attempts and the most recent ones.
    if v.len() > 50 {
        v.drain(10..v.len() - 40);
    }
    serde_json::to_string(&v).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let jobs = o.load_pending().unwrap();
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
        };
        assert!(ob.finish(jobs[0].id, delivered).await.is_empty());
        assert_eq!(ob.pending(), 1);
        assert_eq!(ob.load_pending().expect("pending").len(), 1);
    }
}
