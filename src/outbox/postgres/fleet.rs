//! The fleet: heartbeats, job leases and fleet-wide pacing, through the shared database.
//!
//! Why leases ride on the heartbeat rather than on each job: a replica renews every job it
//! holds with one write every few seconds, whatever its backlog; a per-job expiry would cost a
//! write per held job per renewal. A job is taken over when its owner's heartbeat is older than
//! the lease, or when it has no owner (given back at a clean stop, or replayed while no engine
//! ran). Times that replicas compare (heartbeats, pace slots) are the database's clock, so a
//! replica whose clock drifts cannot declare a live one dead or overrun a pace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{job_row, pg, BoxFut, Job, PgStore, StoreError, JOB_COLUMNS};
use crate::outbox::{Fleet, Replica};

/// The database's clock, in unix ms.
const DB_NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";
/// The database's clock, in unix µs (pace slots: a fast destination's interval is under 1 ms).
const DB_NOW_US: &str = "(extract(epoch from clock_timestamp()) * 1000000)::bigint";

/// Most jobs taken over in one heartbeat; the next heartbeat takes more.
const CLAIM_BATCH: i64 = 1000;

/// Every this many heartbeats, expired dedup keys, throttles, message keys, pace rows and long
/// dead replicas are swept.
const SWEEP_EVERY_BEATS: u64 = 10;

/// Most expired rows of one table deleted in one sweep.
const SWEEP_ROWS: i64 = 5000;

/// This replica.
pub(super) struct Me {
    pub(super) id: String,
    host: String,
    lease: Duration,
    beats: AtomicU64,
    /// A command-line tool (dead letters, silences), not a replica: it holds no job, so what
    /// it queues (a replay) is taken by a running replica at its next heartbeat.
    pub(super) tool: bool,
}

impl Me {
    /// The owner of the jobs this process queues.
    pub(super) fn owner(&self) -> Option<&str> {
        (!self.tool).then_some(self.id.as_str())
    }

    pub(super) fn new(lease: Duration, tool: bool) -> Me {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "switchyard".into());
        let suffix: u32 = rand::random();
        Me {
            id: format!("{host}-{suffix:08x}"),
            host,
            lease,
            beats: AtomicU64::new(0),
            tool,
        }
    }

    fn lease_ms(&self) -> i64 {
        self.lease.as_millis().min(i64::MAX as u128) as i64
    }
}

impl PgStore {
    /// Writes this replica's heartbeat row.
    pub(super) async fn register(&self) -> Result<(), String> {
        if self.me.tool {
            return Ok(());
        }
        let c = self.client().await?;
        upsert(&c, &self.me).await
    }

    async fn beat_tx(&self) -> Result<Vec<Job>, String> {
        // A heartbeat or a takeover lost in a crash is made again by the next one.
        let c = self.lazy_client().await?;
        let lease = self.me.lease_ms();
        let previous = c
            .query_opt(
                &format!("SELECT {DB_NOW} - seen_at FROM replicas WHERE id = $1"),
                &[&self.me.id],
            )
            .await
            .map_err(pg)?;
        if let Some(age) = previous.and_then(|r| r.get::<_, Option<i64>>(0)) {
            if age > lease {
                tracing::warn!(
                    replica = %self.me.id,
                    silent_ms = age,
                    "this replica's heartbeat was older than the lease: other replicas may have taken over its jobs, and may send some of them again"
                );
            }
        }
        upsert(&c, &self.me).await?;
        let dead: Vec<String> = c
            .query(
                &format!("SELECT id FROM replicas WHERE seen_at < {DB_NOW} - $1 AND id <> $2"),
                &[&lease, &self.me.id],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let st = c
            .prepare_cached(&format!(
                "UPDATE outbox SET lease_owner = $1 WHERE id IN (
                   SELECT id FROM outbox
                   WHERE kind IS DISTINCT FROM 'group' AND (lease_owner IS NULL OR lease_owner = ANY($2))
                   ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)
                 RETURNING {JOB_COLUMNS}"
            ))
            .await
            .map_err(pg)?;
        let mut jobs: Vec<Job> = c
            .query(&st, &[&self.me.id, &dead, &CLAIM_BATCH])
            .await
            .map_err(pg)?
            .iter()
            .map(job_row)
            .collect();
        jobs.sort_by_key(|j| j.id);
        if !jobs.is_empty() {
            self.add_pending(jobs.len() as isize);
            tracing::info!(
                replica = %self.me.id,
                jobs = jobs.len(),
                from = ?dead,
                "took over jobs no live replica holds"
            );
        }
        if self
            .me
            .beats
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SWEEP_EVERY_BEATS)
        {
            self.sweep(&c).await?;
        }
        Ok(jobs)
    }

    /// Drops what expired. Bounded per table, so a day's worth of dedup keys expiring at once
    /// is spread over several sweeps.
    async fn sweep(&self, c: &deadpool_postgres::Client) -> Result<(), String> {
        for table in ["dedup", "throttle", "message_keys"] {
            let column = match table {
                "throttle" => "until",
                _ => "expires_at",
            };
            c.execute(
                &format!(
                    "DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} WHERE {column} <= {DB_NOW} LIMIT $1))"
                ),
                &[&SWEEP_ROWS],
            )
            .await
            .map_err(pg)?;
        }
        // A pace slot a minute in the past holds nothing back.
        c.execute(
            &format!("DELETE FROM pace WHERE tat < {DB_NOW_US} - 60000000"),
            &[],
        )
        .await
        .map_err(pg)?;
        // Replicas dead for an hour whose jobs were all taken over.
        c.execute(
            &format!(
                "DELETE FROM replicas r WHERE r.seen_at < {DB_NOW} - 3600000
                 AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.lease_owner = r.id)"
            ),
            &[],
        )
        .await
        .map_err(pg)?;
        Ok(())
    }
}

async fn upsert(c: &deadpool_postgres::Client, me: &Me) -> Result<(), String> {
    c.execute(
        &format!(
            "INSERT INTO replicas (id, host, started_at, seen_at, version) VALUES ($1, $2, {DB_NOW}, {DB_NOW}, $3)
             ON CONFLICT (id) DO UPDATE SET seen_at = EXCLUDED.seen_at"
        ),
        &[&me.id, &me.host, &env!("CARGO_PKG_VERSION")],
    )
    .await
    .map(|_| ())
    .map_err(pg)
}

impl Fleet for PgStore {
    fn replica(&self) -> &str {
        &self.me.id
    }

    fn lease(&self) -> Duration {
        self.me.lease
    }

    fn beat(&self) -> BoxFut<'_, Result<Vec<Job>, StoreError>> {
        Box::pin(super::bounded(self.beat_tx()))
    }

    fn reserve(
        &self,
        key: &str,
        interval_us: i64,
        burst: i64,
        count: i64,
    ) -> BoxFut<'_, Result<i64, StoreError>> {
        let key = key.to_string();
        Box::pin(super::bounded(async move {
            // GCRA: `tat` is the theoretical arrival time of the next send. A send may go at
            // `tat - (burst - 1) * interval` or now, whichever is later, and moves `tat` on by
            // one interval; `count` sends move it on by `count` intervals. One row per key,
            // updated under its row lock, so replicas reserving at once get successive slots.
            // Losing this row's latest value in a crash costs nothing but a shorter wait, so
            // it is written on the connections that do not wait for the WAL flush.
            let c = self.lazy_client().await?;
            let st = c
                .prepare_cached(&format!(
                    "INSERT INTO pace (key, tat) VALUES ($1, {DB_NOW_US} + $2::bigint * $3::bigint)
                     ON CONFLICT (key) DO UPDATE SET tat = GREATEST(pace.tat, {DB_NOW_US}) + $2::bigint * $3::bigint
                     RETURNING tat, {DB_NOW_US}"
                ))
                .await
                .map_err(pg)?;
            let count = count.max(1);
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&key, &interval_us, &count];
            let row = c.query_one(&st, &params).await.map_err(pg)?;
            let (tat, db_now): (i64, i64) = (row.get(0), row.get(1));
            let first = (tat - count * interval_us - (burst.max(1) - 1) * interval_us).max(db_now);
            let local_now = chrono::Utc::now().timestamp_micros();
            Ok(local_now + (first - db_now))
        }))
    }

    fn older_keyed(
        &self,
        destination: &str,
        key: &str,
        id: i64,
    ) -> BoxFut<'_, Result<bool, StoreError>> {
        let (destination, key) = (destination.to_string(), key.to_string());
        Box::pin(super::bounded(async move {
            let c = self.client().await?;
            let st = c
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM outbox WHERE destination = $1 AND ident_key = $2 AND id < $3)",
                )
                .await
                .map_err(pg)?;
            Ok(c.query_one(&st, &[&destination, &key, &id])
                .await
                .map_err(pg)?
                .get(0))
        }))
    }

    fn replicas(&self) -> BoxFut<'_, Result<Vec<Replica>, StoreError>> {
        Box::pin(super::bounded(async move {
            let c = self.client().await?;
            let rows = c
                .query(
                    &format!(
                        "SELECT r.id, r.host, r.version, r.started_at, r.seen_at,
                           (SELECT count(*) FROM outbox o WHERE o.lease_owner = r.id)
                         FROM replicas r WHERE r.seen_at >= {DB_NOW} - $1 ORDER BY r.started_at, r.id"
                    ),
                    &[&self.me.lease_ms()],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| Replica {
                    id: r.get(0),
                    host: r.get(1),
                    version: r.get(2),
                    started_at: r.get(3),
                    seen_at: r.get(4),
                    holding: r.get(5),
                })
                .collect())
        }))
    }

    fn release(&self) -> BoxFut<'_, Result<usize, StoreError>> {
        Box::pin(super::bounded(async move {
            let c = self.client().await?;
            let n = c
                .execute(
                    "UPDATE outbox SET lease_owner = NULL WHERE lease_owner = $1",
                    &[&self.me.id],
                )
                .await
                .map_err(pg)?;
            c.execute("DELETE FROM replicas WHERE id = $1", &[&self.me.id])
                .await
                .map_err(pg)?;
            self.pending.store(0, Ordering::Relaxed);
            Ok(n as usize)
        }))
    }
}
