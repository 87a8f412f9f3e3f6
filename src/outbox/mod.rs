//! The durable outbox: accepted dispatches, delivery attempts, dead letters, the dedup window,
//! throttles and run trackers, behind the [`Store`] seam.
//!
//! [`Outbox`] is the handle every stage uses; what it guarantees holds for every store:
//!
//! - [`Outbox::enqueue`] returns only after the dispatches (and the event's dedup key) are
//!   committed; the HTTP handler answers 202 after that.
//! - A job leaves the queue only when it is delivered (deleted) or dead-lettered (moved, in the
//!   same transaction). A crash at any point leaves it pending; on start every pending job is
//!   handed to the workers again (at-least-once).
//! - An event id already seen within its dedup window is not enqueued again.
//! - When a tracked event's last job finishes, its run report is created in the same commit.
//!
//! The store is SQLite ([`sqlite`]) by default: one file under the data directory. For several
//! replicas it is PostgreSQL ([`postgres`]): every table is shared, and the replicas coordinate
//! through it ([`Fleet`]: heartbeats, job leases, fleet-wide pacing).

pub mod postgres;
pub mod sqlite;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::job::{Job, NewJob};
use crate::job::{ReportSpec, Target};
use crate::silence::{NewSilence, Silence};
pub use sqlite::{list_dead, purge_dead, read_dead};

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

/// Unix-millisecond times written as RFC 3339 text, read back from that text or from the plain
/// integers older records hold.
mod rfc3339_ms {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
        match chrono::DateTime::from_timestamp_millis(*ms) {
            Some(t) => s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            None => s.serialize_i64(*ms),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Ms(i64),
            Text(String),
        }
        match Either::deserialize(d)? {
            Either::Ms(ms) => Ok(ms),
            Either::Text(t) => chrono::DateTime::parse_from_rfc3339(&t)
                .map(|t| t.timestamp_millis())
                .map_err(serde::de::Error::custom),
        }
    }
}

/// One delivery attempt, as recorded for dead letters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    /// Unix milliseconds; RFC 3339 in JSON.
    #[serde(with = "rfc3339_ms")]
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
    /// The payload's JSON (see [`crate::job::Payload::to_json`]); a passcode notification's is withheld.
    pub message: Value,
    /// `message`, `expand` or `report`.
    #[serde(default = "message_kind")]
    pub kind: String,
    /// Unix milliseconds; RFC 3339 in JSON (`2026-09-21T14:13:17.482Z`), as every time the CLI
    /// and the admin API print.
    #[serde(with = "rfc3339_ms")]
    pub created_at: i64,
    #[serde(with = "rfc3339_ms")]
    pub dead_at: i64,
    pub attempts: Vec<Attempt>,
    pub last_error: String,
}

/// What a replay of dead letters did.
///
/// A replayed message is queued again as a new job; should it fail for good again, it becomes
/// a dead letter under its **old id**, with the attempts of both lives in its log, so the id an
/// operator noted (or a ticket quotes) keeps naming the same message.
#[derive(Debug, Default)]
pub struct Replayed {
    /// The jobs queued again, to start delivering.
    pub jobs: Vec<Job>,
    /// `(dead letter id, job id)` for each of `jobs`.
    pub requeued: Vec<(i64, i64)>,
    /// Dead letters not replayed, and why (no such id; a passcode message, which is never kept).
    pub skipped: Vec<(i64, String)>,
}

impl Replayed {
    /// The JSON the admin API answers: `{replayed, requeued: [{dead_letter, job}], skipped:
    /// [{dead_letter, reason}]}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "replayed": self.requeued.len(),
            "requeued": self.requeued.iter().map(|(d, j)| serde_json::json!({"dead_letter": d, "job": j})).collect::<Vec<_>>(),
            "skipped": self.skipped.iter().map(|(d, r)| serde_json::json!({"dead_letter": d, "reason": r})).collect::<Vec<_>>(),
        })
    }
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
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    /// Too many pending deliveries; the caller should retry later.
    #[error("{pending} deliveries are waiting")]
    Full { pending: usize },
    /// The database failed; nothing was committed.
    #[error("{0}")]
    Storage(String),
}

/// A store operation that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store's writer is gone (the engine is stopping).
    #[error("the outbox writer has stopped")]
    Stopped,
    /// The database answered with an error.
    #[error("{0}")]
    Database(String),
    /// The store cannot be opened (its directory, its lock, its schema); the reason says which.
    #[error("{0}")]
    Open(String),
}

impl From<StoreError> for String {
    fn from(e: StoreError) -> String {
        e.to_string()
    }
}

/// Counts for `/status`, read in one go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Pending jobs per destination.
    pub pending: Vec<(String, i64)>,
    /// Dead letters per destination.
    pub dead_letters: Vec<(String, i64)>,
    /// Throttle keys currently suppressing repeats.
    pub active_throttles: i64,
    /// Keys that name a message (keyed messages), not expired.
    pub open_keys: i64,
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
        /// What the delivery did to its key's message record (keyed messages), committed with
        /// the job's completion.
        key: Option<KeyChange>,
    },
    Retry {
        error: String,
    },
    Dead {
        error: String,
    },
}

/// The message a key names now (keyed messages): where it is in Slack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    /// The channel id Slack answered (a `D…` id for a DM), as `chat.update` wants it.
    pub channel: String,
    /// The message's `ts`.
    pub ts: String,
    /// Unix ms when the message was posted.
    pub opened_at: i64,
}

/// A group of a grouped rule with items waiting for its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingGroup {
    pub rule: String,
    pub group: String,
    pub items: i64,
    /// Unix ms of its oldest item.
    pub first_at: i64,
    /// Unix ms of its last digest, if one was sent.
    pub last_flush: Option<i64>,
}

/// An open key: its destination, the key, and the message it names.
pub type OpenKey = (String, String, KeyState);

/// A change to a key's record, made by a delivered keyed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    pub destination: String,
    pub key: String,
    pub change: KeyEffect,
}

/// What happened to the key's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyEffect {
    /// A new message is the key's message from now on (remembered for `ttl_ms`).
    Open {
        channel: String,
        ts: String,
        ttl_ms: i64,
    },
    /// The key's message was used (updated, replied to): remembered for `ttl_ms` from now.
    Touch { ttl_ms: i64 },
    /// The key is closed: the next send starts a new message.
    Close,
}

/// A replica of a fleet sharing one store, as its heartbeat row records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// Its id: the host name and a random suffix, new at every start.
    pub id: String,
    pub host: String,
    pub version: String,
    /// Unix ms.
    pub started_at: i64,
    /// Its last heartbeat, unix ms.
    pub seen_at: i64,
    /// Jobs it holds (delivering them, or waiting to retry them).
    pub holding: i64,
}

/// Coordination between replicas that share a store. A store that one engine owns alone
/// (SQLite, whose data directory is locked) has no fleet: its engine holds every job, and its
/// rate limits are its own.
///
/// The lease model: a replica holds the jobs it accepted (or took over) for as long as its
/// heartbeat is fresher than the lease. One heartbeat renews every job it holds. A replica whose
/// heartbeat is older than the lease is dead: the next replica to beat takes its jobs, with
/// `FOR UPDATE SKIP LOCKED` so two survivors never take the same job. A replica that is only
/// slow keeps beating, so its jobs stay its own.
pub trait Fleet: Send + Sync {
    /// This replica's id.
    fn replica(&self) -> &str;
    /// The lease: how long after its last heartbeat a replica's jobs are taken over.
    fn lease(&self) -> Duration;
    /// Records this replica alive and takes over the jobs of dead replicas (and jobs given back
    /// at a clean shutdown); returns those jobs, oldest first, to deliver.
    fn beat(&self) -> BoxFut<'_, Result<Vec<Job>, StoreError>>;
    /// Reserves the next `count` sends of a fleet-wide pace (`key`: a destination, or a
    /// destination's channel), one per `interval_us` microseconds with bursts of `burst`: the
    /// unix time (µs, this host's clock) of the first; the others follow one interval apart.
    fn reserve(
        &self,
        key: &str,
        interval_us: i64,
        burst: i64,
        count: i64,
    ) -> BoxFut<'_, Result<i64, StoreError>>;
    /// Whether a job of `destination` with message key `key` older than `id` is still queued
    /// anywhere in the fleet (keyed jobs go in the order they were accepted).
    fn older_keyed(
        &self,
        destination: &str,
        key: &str,
        id: i64,
    ) -> BoxFut<'_, Result<bool, StoreError>>;
    /// The replicas alive now.
    fn replicas(&self) -> BoxFut<'_, Result<Vec<Replica>, StoreError>>;
    /// Gives back every job this replica holds and removes its heartbeat (a clean stop), so
    /// another replica takes them at its next heartbeat rather than after the lease.
    fn release(&self) -> BoxFut<'_, Result<usize, StoreError>>;
}

/// A boxed future (stores are trait objects).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the outbox lives. Implementations keep the guarantees in the module docs; commits may
/// be grouped, but a call resolves only after its own commit.
pub trait Store: Send + Sync + 'static {
    /// Where the data is, for logs (a path; never credentials).
    fn location(&self) -> String;
    /// Jobs waiting for delivery (kept in memory; cheap).
    fn pending(&self) -> usize;
    /// Commits an event's jobs with its dedup key (`key`, expiry in unix ms) and run tracker.
    /// Jobs with `error` set are stored as dead letters; throttled ones are dropped (counted).
    fn enqueue(
        &self,
        dedup: Option<(String, i64)>,
        jobs: Vec<NewJob>,
        tracker: Option<(String, NewTracker)>,
    ) -> BoxFut<'_, Result<Enqueued, EnqueueError>>;
    /// Records an attempt's outcome; resolves after the commit with the jobs it created
    /// (follow-ups, a run report). An outcome that cannot be committed now is kept and
    /// committed later, never dropped.
    fn finish(&self, id: i64, outcome: Outcome) -> BoxFut<'_, Vec<Job>>;
    /// Every pending job, oldest first (to resume delivery at start).
    fn load_pending(&self) -> BoxFut<'_, Result<Vec<Job>, StoreError>>;
    /// Counts for `/status`.
    fn summary(&self) -> BoxFut<'_, Result<Summary, StoreError>>;
    /// The groups of grouped rules that hold items (for the digest flusher and `/status`).
    fn pending_groups(&self) -> BoxFut<'_, Result<Vec<PendingGroup>, StoreError>>;
    /// The items of one group, oldest first: (job id, event envelope).
    fn group_items(
        &self,
        rule: &str,
        group: &str,
    ) -> BoxFut<'_, Result<Vec<(i64, Value)>, StoreError>>;
    /// Replaces a group's items `ids` by its digest `jobs` in one transaction, and records the
    /// flush time; returns the jobs to deliver.
    fn flush_group(
        &self,
        rule: String,
        group: String,
        ids: Vec<i64>,
        jobs: Vec<NewJob>,
    ) -> BoxFut<'_, Result<Vec<Job>, StoreError>>;
    /// Silences: every one not over yet, or also those that ended in the last `ended_within`
    /// ms.
    fn silences(&self, ended_within: i64) -> BoxFut<'_, Result<Vec<Silence>, StoreError>>;
    /// Stores a silence (already validated: `starts`/`ends` in unix ms) and returns it.
    fn add_silence(
        &self,
        s: NewSilence,
        starts: i64,
        ends: i64,
    ) -> BoxFut<'_, Result<Silence, StoreError>>;
    /// Ends silence `id` now (if it has not ended); `None` when there is no such silence.
    fn expire_silence(&self, id: i64) -> BoxFut<'_, Result<Option<Silence>, StoreError>>;
    /// The first `limit` open keys, by destination and key.
    fn open_keys(&self, limit: usize) -> BoxFut<'_, Result<Vec<OpenKey>, StoreError>>;
    /// The message `key` names at `destination` now, unless it expired or was closed.
    fn message_key(
        &self,
        destination: &str,
        key: &str,
    ) -> BoxFut<'_, Result<Option<KeyState>, StoreError>>;
    /// Dead letters matching `f`, newest first.
    fn dead_letters(&self, f: DeadLetterFilter) -> BoxFut<'_, Result<Vec<DeadLetter>, StoreError>>;
    /// One dead letter.
    fn dead_letter(&self, id: i64) -> BoxFut<'_, Result<Option<DeadLetter>, StoreError>>;
    /// Moves dead letters back into the queue; returns the new jobs.
    fn replay(&self, ids: Vec<i64>) -> BoxFut<'_, Result<Replayed, StoreError>>;
    /// Deletes the dead letters matching `f`; returns how many.
    fn purge(&self, f: DeadLetterFilter) -> BoxFut<'_, Result<usize, StoreError>>;
    /// The store's fleet, when several replicas share it.
    fn fleet(&self) -> Option<&dyn Fleet> {
        None
    }
}

/// Handle to the outbox. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    store: Arc<dyn Store>,
    max_pending: usize,
}

impl Outbox {
    /// Opens (creating if needed) the SQLite outbox in `data_dir`, locking the directory.
    /// `max_pending` bounds the jobs waiting for delivery; past it enqueues fail with `Full`.
    pub fn open(data_dir: &Path, max_pending: usize) -> Result<Outbox, StoreError> {
        let store = sqlite::SqliteStore::open(data_dir)?;
        Ok(Outbox::new(Arc::new(store), max_pending))
    }

    /// Opens the store `store` names: a `postgres://` (or `postgresql://`) URL for PostgreSQL
    /// shared by replicas (`lease` is their lease), or `None` for SQLite in `data_dir`.
    pub async fn open_store(
        store: Option<&crate::config::secret::Secret>,
        data_dir: &Path,
        max_pending: usize,
        lease: Duration,
    ) -> Result<Outbox, StoreError> {
        match store {
            Some(url) => {
                let pg = postgres::PgStore::connect(url, lease).await?;
                Ok(Outbox::new(Arc::new(pg), max_pending))
            }
            None => Outbox::open(data_dir, max_pending),
        }
    }

    /// The outbox a command-line tool acts on while no engine is asked (`--server`): the
    /// PostgreSQL database `store` names (as a tool, not a replica), or SQLite in `data_dir`
    /// (which must not be in use).
    pub async fn open_tool(
        store: Option<&crate::config::secret::Secret>,
        data_dir: &Path,
    ) -> Result<Outbox, StoreError> {
        match store {
            Some(url) => {
                let pg = postgres::PgStore::connect_tool(url).await?;
                Ok(Outbox::new(Arc::new(pg), usize::MAX))
            }
            None => Outbox::open(data_dir, usize::MAX),
        }
    }

    /// The fleet this engine is part of (a shared store), if any.
    pub fn fleet(&self) -> Option<&dyn Fleet> {
        self.store.fleet()
    }

    /// An outbox over any store.
    pub fn new(store: Arc<dyn Store>, max_pending: usize) -> Outbox {
        Outbox { store, max_pending }
    }

    /// Where the data is, for logs.
    pub fn location(&self) -> String {
        self.store.location()
    }

    /// Jobs waiting for delivery.
    pub fn pending(&self) -> usize {
        self.store.pending()
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
        // protect nothing. Most events are like this (an entity update no rule cares about).
        if jobs.is_empty() && tracker.is_none() {
            return Ok(Enqueued::Committed(Vec::new(), 0));
        }
        let pending = self.pending();
        if !jobs.is_empty() && pending + jobs.len() > self.max_pending {
            return Err(EnqueueError::Full { pending });
        }
        let dedup = dedup.map(|(k, w)| (k, now_ms() + w.as_millis() as i64));
        self.store.enqueue(dedup, jobs, tracker).await
    }

    /// Records the outcome of an attempt; resolves once committed, with the jobs the commit
    /// created (follow-ups, and a run report when the event's last job finished).
    pub async fn finish(&self, id: i64, outcome: Outcome) -> Vec<Job> {
        self.store.finish(id, outcome).await
    }

    /// Every pending job, oldest first (used at start-up to resume delivery).
    pub async fn load_pending(&self) -> Result<Vec<Job>, StoreError> {
        self.store.load_pending().await
    }

    /// Counts for `/status`.
    pub async fn summary(&self) -> Result<Summary, StoreError> {
        self.store.summary().await
    }

    /// The groups that hold items.
    pub async fn pending_groups(&self) -> Result<Vec<PendingGroup>, StoreError> {
        self.store.pending_groups().await
    }

    /// One group's items, oldest first.
    pub async fn group_items(
        &self,
        rule: &str,
        group: &str,
    ) -> Result<Vec<(i64, Value)>, StoreError> {
        self.store.group_items(rule, group).await
    }

    /// Replaces a group's items by its digest jobs.
    pub async fn flush_group(
        &self,
        rule: String,
        group: String,
        ids: Vec<i64>,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Job>, StoreError> {
        self.store.flush_group(rule, group, ids, jobs).await
    }

    /// Silences not over yet (and those that ended within `ended_within` ms).
    pub async fn silences(&self, ended_within: i64) -> Result<Vec<Silence>, StoreError> {
        self.store.silences(ended_within).await
    }

    /// Stores a validated silence.
    pub async fn add_silence(
        &self,
        s: NewSilence,
        starts: i64,
        ends: i64,
    ) -> Result<Silence, StoreError> {
        self.store.add_silence(s, starts, ends).await
    }

    /// Ends silence `id` now.
    pub async fn expire_silence(&self, id: i64) -> Result<Option<Silence>, StoreError> {
        self.store.expire_silence(id).await
    }

    /// The first `limit` open keys, by destination and key (`/status`, `GET /-/state`).
    pub async fn open_keys(&self, limit: usize) -> Result<Vec<OpenKey>, StoreError> {
        self.store.open_keys(limit).await
    }

    /// The message `key` names at `destination` now (keyed messages).
    pub async fn message_key(
        &self,
        destination: &str,
        key: &str,
    ) -> Result<Option<KeyState>, StoreError> {
        self.store.message_key(destination, key).await
    }

    /// Lists dead letters, newest first.
    pub async fn dead_letters(&self, f: DeadLetterFilter) -> Result<Vec<DeadLetter>, StoreError> {
        self.store.dead_letters(f).await
    }

    /// One dead letter by id.
    pub async fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        self.store.dead_letter(id).await
    }

    /// Moves dead letters back into the outbox; returns the new jobs to hand to the workers.
    pub async fn replay(&self, ids: Vec<i64>) -> Result<Replayed, StoreError> {
        self.store.replay(ids).await
    }

    /// Deletes dead letters matching the filter; returns how many.
    pub async fn purge(&self, filter: DeadLetterFilter) -> Result<usize, StoreError> {
        self.store.purge(filter).await
    }
}

/// The message kept in a dead letter of a secret event (a One-Time Passcode), as stored JSON.
pub(crate) fn redacted_json() -> String {
    Value::String("[secret: One-Time Passcode notification, not kept]".into()).to_string()
}

/// An attempt log (stored JSON) with one more attempt, bounded: the first ten and the last
/// forty. A log that does not parse starts again.
pub(crate) fn append_attempt(log: Option<&str>, at: i64, error: &str) -> String {
    let mut v: Vec<Attempt> = log
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    v.push(Attempt {
        at,
        error: error.to_string(),
    });
    if v.len() > 50 {
        v.drain(10..v.len() - 40);
    }
    serde_json::to_string(&v).unwrap_or_else(|_| "[]".into())
}

/// The 128-bit digest a dedup key is stored as (SHA-256, truncated): the same for every store,
/// whatever the key's length.
pub(crate) fn key_digest(key: &str) -> [u8; 16] {
    use sha2::Digest;
    let full = sha2::Sha256::digest(key.as_bytes());
    let mut h = [0u8; 16];
    h.copy_from_slice(&full[..16]);
    h
}

/// Current unix time in milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn message_kind() -> String {
    "message".into()
}
