//! The dedup window: which event ids were accepted, until when.
//!
//! Keys are looked up in memory and logged durably, append-only. A `WITHOUT ROWID` table keyed
//! by the event id (used before) puts every insert on a random page of its B-tree: each
//! accepted event dirtied one page of its own, which was two thirds of the bytes the outbox
//! wrote and a third of the writer's CPU on a one-message-per-event load (docs/performance.md).
//! Here an accepted key is one row appended to `dedup_keys` (a rowid table: its pages fill in
//! order) with an index on `expires_at`, whose inserts land in one place per distinct window;
//! whether a key was seen is answered by a map that the writer thread owns.
//!
//! What it guarantees is unchanged: a key is durable in the transaction that accepts its
//! event's jobs; after a restart the map is rebuilt from the log, so a redelivery within the
//! window is still a duplicate. The map holds a 128-bit digest of each key (SHA-256,
//! truncated), not the key: about 40 bytes per key in the window (`switchyard_dedup_keys`
//! counts them; a source with a large volume and the default 24 h window is the case to watch,
//! and a shorter `dedup_window` is its remedy). Two different ids sharing a digest would have
//! a chance of about 2⁻¹²⁸ per pair. Only events that queue something have a key at all.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};

use super::Cached;

/// How often expired keys are dropped (from the map and, starting in the same batch, from the
/// log).
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Most expired rows of the log deleted in one batch; more go with the next batches.
pub(super) const SWEEP_ROWS: i64 = 2_000;

/// A key's digest.
pub(super) type KeyHash = [u8; 16];

/// The digest of a dedup key.
pub(super) fn digest(key: &str) -> KeyHash {
    crate::outbox::key_digest(key)
}

/// The writer's view of the window: committed keys, and those of the batch being applied.
pub(super) struct Dedup {
    /// Committed keys and when each expires (unix ms).
    seen: HashMap<KeyHash, i64>,
    /// Keys accepted by the transaction in progress; merged into `seen` after its commit, and
    /// forgotten if it fails (then nothing of it was stored).
    batch: HashMap<KeyHash, i64>,
    last_sweep: Instant,
    /// The last sweep of the log stopped at [`SWEEP_ROWS`]: expired rows remain.
    behind: bool,
}

impl Dedup {
    /// Loads the keys that have not expired at `now`.
    pub(super) fn load(c: &Connection, now: i64) -> rusqlite::Result<Dedup> {
        let mut seen = HashMap::new();
        let mut st = c.prepare("SELECT hash, expires_at FROM dedup_keys WHERE expires_at > ?")?;
        let rows = st.query_map([now], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))
        })?;
        for row in rows {
            let (h, expires) = row?;
            if let Ok(h) = KeyHash::try_from(h.as_slice()) {
                let e = seen.entry(h).or_insert(expires);
                *e = (*e).max(expires);
            }
        }
        Ok(Dedup {
            seen,
            batch: HashMap::new(),
            last_sweep: Instant::now(),
            behind: true,
        })
    }

    /// Claims `key` until `expires` within the transaction `tx`: `false` when it is held (by
    /// a committed event or an earlier one of this batch) and has not expired at `now`.
    pub(super) fn claim(
        &mut self,
        tx: &Connection,
        key: &str,
        expires: i64,
        now: i64,
    ) -> rusqlite::Result<bool> {
        let h = digest(key);
        let live = |m: &HashMap<KeyHash, i64>| m.get(&h).is_some_and(|e| *e > now);
        if live(&self.batch) || live(&self.seen) {
            return Ok(false);
        }
        tx.exec_c(
            "INSERT INTO dedup_keys (hash, expires_at) VALUES (?, ?)",
            params![&h[..], expires],
        )?;
        self.batch.insert(h, expires);
        Ok(true)
    }

    /// Whether this batch sweeps (every [`SWEEP_EVERY`]): expired keys leave the map after
    /// its commit, and the log's start to go.
    pub(super) fn sweep_due(&self) -> bool {
        self.last_sweep.elapsed() >= SWEEP_EVERY
    }

    /// Expired rows remain in the log from the last sweep (or since start): this batch deletes
    /// more of them.
    pub(super) fn rows_behind(&self) -> bool {
        self.behind
    }

    /// The batch committed: its keys are seen from now on. `swept`: it was a sweep (expired
    /// keys leave the map); `rows`: how many expired rows of the log it deleted, if it tried.
    pub(super) fn committed(&mut self, swept: bool, rows: Option<usize>, now: i64) {
        self.seen.extend(self.batch.drain());
        if let Some(n) = rows {
            self.behind = n as i64 >= SWEEP_ROWS;
        }
        if swept {
            self.seen.retain(|_, e| *e > now);
            self.last_sweep = Instant::now();
        }
    }

    /// Keys in the window (the `switchyard_dedup_keys` gauge).
    pub(super) fn len(&self) -> usize {
        self.seen.len()
    }

    /// The batch failed: nothing of it was stored.
    pub(super) fn rolled_back(&mut self) {
        self.batch.clear();
    }
}

/// Moves the keys of the table used before (schema version 3): each unexpired key becomes its
/// digest in `dedup_keys`, and the old table is dropped.
pub(super) fn migrate(c: &Connection, now: i64) -> rusqlite::Result<()> {
    let old: bool = c.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dedup')",
        [],
        |r| r.get(0),
    )?;
    if old {
        let tx = c.unchecked_transaction()?;
        {
            let mut read = tx.prepare("SELECT key, expires_at FROM dedup WHERE expires_at > ?")?;
            let mut write =
                tx.prepare("INSERT INTO dedup_keys (hash, expires_at) VALUES (?, ?)")?;
            let mut rows = read.query([now])?;
            while let Some(r) = rows.next()? {
                let key: String = r.get(0)?;
                let expires: i64 = r.get(1)?;
                write.execute(params![&digest(&key)[..], expires])?;
            }
        }
        tx.execute_batch("DROP TABLE dedup")?;
        tx.commit()?;
    }
    Ok(())
}
