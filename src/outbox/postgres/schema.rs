//! The PostgreSQL schema and its migrations.
//!
//! Migrations run at start inside one transaction that holds a transaction-scoped advisory lock
//! ([`MIGRATION_LOCK`]), so replicas started together migrate one after the other: the first
//! does the work, the others find the version already current. Each step is idempotent
//! (`IF NOT EXISTS`), so a migration interrupted by a crash is simply run again.

/// The advisory lock key of migrations (`pg_advisory_xact_lock`): "switchyd" in ASCII.
pub(super) const MIGRATION_LOCK: i64 = 0x7377_6974_6368_7964;

/// The schema version this build writes.
pub(super) const VERSION: i32 = 1;

/// Version 1: every table of the outbox, shared by the replicas.
///
/// Differences from the SQLite schema, and why:
/// - `outbox.lease_owner`: the replica that holds the job (delivers it, or waits to retry it).
///   A job whose owner's heartbeat is older than the lease is taken over by another replica
///   (`fleet.rs`). The lease is renewed by the owner's one heartbeat row, not per job, so a
///   replica holding ten thousand jobs renews them with one small write.
/// - `outbox.tracked`: the job's event has a run tracker, so finishing it must update that
///   tracker; a job without one (nearly all) is finished by one `DELETE`.
/// - `outbox.grp` and `outbox.ident_key`: a grouped item's group and a keyed job's key, as
///   columns, so digests and the fleet-wide order of keyed jobs are index lookups.
/// - `dedup` keys are 16-byte digests of the event's dedup key, unique: two replicas accepting
///   the same event at once serialise on the key, and the second sees the first's.
/// - `pace`: fleet-wide rate limits (one theoretical arrival time per destination or channel).
/// - `replicas`: heartbeats.
pub(super) const V1: &str = "
CREATE TABLE IF NOT EXISTS outbox (
  id BIGSERIAL PRIMARY KEY,
  destination TEXT NOT NULL, rule TEXT NOT NULL, event_id TEXT NOT NULL,
  target TEXT NOT NULL, message TEXT NOT NULL, secret BOOLEAN NOT NULL,
  created_at BIGINT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  attempt_log TEXT NOT NULL DEFAULT '[]', last_error TEXT,
  kind TEXT, replay_of BIGINT, grp TEXT, ident_key TEXT,
  tracked BOOLEAN NOT NULL DEFAULT false,
  lease_owner TEXT
);
CREATE INDEX IF NOT EXISTS outbox_owner ON outbox (lease_owner) WHERE kind IS DISTINCT FROM 'group';
CREATE INDEX IF NOT EXISTS outbox_groups ON outbox (rule, grp) WHERE kind = 'group';
CREATE INDEX IF NOT EXISTS outbox_keyed ON outbox (destination, ident_key, id) WHERE ident_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead_letters (
  id BIGSERIAL PRIMARY KEY,
  destination TEXT NOT NULL, rule TEXT NOT NULL, event_id TEXT NOT NULL,
  target TEXT NOT NULL, message TEXT NOT NULL,
  created_at BIGINT NOT NULL, dead_at BIGINT NOT NULL,
  attempt_log TEXT NOT NULL, last_error TEXT NOT NULL,
  kind TEXT
);
CREATE INDEX IF NOT EXISTS dead_letters_dest ON dead_letters (destination, dead_at);
CREATE TABLE IF NOT EXISTS dedup (hash BYTEA PRIMARY KEY, expires_at BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS dedup_expires ON dedup (expires_at);
CREATE TABLE IF NOT EXISTS throttle (key TEXT PRIMARY KEY, until BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS group_flushes (
  rule TEXT NOT NULL, grp TEXT NOT NULL, flushed_at BIGINT NOT NULL, PRIMARY KEY (rule, grp)
);
CREATE TABLE IF NOT EXISTS silences (
  id BIGSERIAL PRIMARY KEY, rule TEXT, matchers TEXT NOT NULL, key TEXT,
  starts_at BIGINT NOT NULL, ends_at BIGINT NOT NULL, author TEXT NOT NULL,
  comment TEXT NOT NULL, created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS message_keys (
  destination TEXT NOT NULL, key TEXT NOT NULL, channel TEXT NOT NULL, ts TEXT NOT NULL,
  opened_at BIGINT NOT NULL, expires_at BIGINT NOT NULL,
  PRIMARY KEY (destination, key)
);
CREATE TABLE IF NOT EXISTS run_trackers (
  event_id TEXT PRIMARY KEY, destination TEXT NOT NULL, run_id TEXT NOT NULL,
  pending BIGINT NOT NULL, delivered BIGINT NOT NULL DEFAULT 0, failed BIGINT NOT NULL DEFAULT 0,
  errors TEXT NOT NULL DEFAULT '[]', report TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pace (key TEXT PRIMARY KEY, tat BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS replicas (
  id TEXT PRIMARY KEY, host TEXT NOT NULL, started_at BIGINT NOT NULL, seen_at BIGINT NOT NULL,
  version TEXT NOT NULL
);
";
