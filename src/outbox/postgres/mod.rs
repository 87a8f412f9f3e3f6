//! The PostgreSQL store: one database shared by every replica of a fleet.
//!
//! Why PostgreSQL, and through `tokio-postgres` with `deadpool-postgres`: platform teams already
//! run it (Coder requires it); its row locks, `ON CONFLICT` and `FOR UPDATE SKIP LOCKED` give
//! the shared dedup window, throttles and job leases without a second coordination service; and
//! the async client keeps the request path off blocking threads. Statements are prepared once
//! per pooled connection (`prepare_cached`).
//!
//! What each call guarantees is [`Store`]'s. In a fleet, also:
//! - Every replica accepts any webhook; its 202 follows the commit in PostgreSQL, and the dedup
//!   key is committed with the jobs, so the same event posted to two replicas is queued once.
//! - The jobs a replica commits are leased to it (`outbox.lease_owner`) and delivered by it;
//!   the jobs of a replica that died are taken over after the lease ([`Fleet`], `fleet.rs`).
//! - Throttles, run trackers, message keys, groups, silences and dead letters are rows every
//!   replica reads and changes in transactions.
//!
//! When the database cannot be reached, calls fail with [`StoreError::Database`] (the webhook is
//! answered 503 with `Retry-After`); outcomes of deliveries are retried until they commit.

mod batch;
mod fleet;
mod schema;

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Transaction};
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{
    now_ms, redacted_json, BoxFut, DeadLetter, DeadLetterFilter, EnqueueError, Enqueued, Fleet,
    Job, KeyChange, KeyEffect, KeyState, NewJob, NewTracker, OpenKey, Outcome, PendingGroup,
    Replayed, Store, StoreError, Summary,
};
use crate::config::secret::Secret;
use crate::job::{Payload, ReportSpec, RunReport, Tally, Target};
use crate::silence::{NewSilence, Silence};

/// Connections kept to the database, per replica. Every webhook's commit and every delivery's
/// outcome takes one for a few round trips; sixteen keep two cores busy without queueing.
const POOL_SIZE: usize = 16;
/// How long a call waits for a connection (or to open one) before it fails: a webhook sender
/// gets its 503 in seconds, not after its own timeout.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// The longest one call may take, end to end. Past it the call fails; an enqueue that did
/// commit meanwhile is found by the dedup window when the sender retries.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The PostgreSQL outbox of one replica.
pub struct PgStore {
    pool: Pool,
    /// Connections whose commits do not wait for the WAL flush (`synchronous_commit=off`):
    /// for what a crash may lose at no cost but a message sent again — delivery outcomes,
    /// pace slots, heartbeats — as the SQLite store commits outcomes without fsync. A lost
    /// commit is lost whole (PostgreSQL stays consistent); never used to accept an event.
    lazy: Pool,
    /// `postgres://user@host:port/db`, without the password.
    location: String,
    /// This replica.
    me: fleet::Me,
    /// Group commit of accepted events and delivered jobs.
    batches: batch::Batches,
    /// Jobs this replica holds.
    pending: Arc<AtomicUsize>,
}

/// A database error as text, with its causes (the client's own text for a server error is
/// only "db error"; the server's message is its source). These never carry the password.
fn pg(e: impl std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text = format!("{text}: {next}");
        }
        source = s.source();
    }
    text
}

/// A connection from `pool`, or why there is none (a wait past [`POOL_WAIT`] said plainly).
async fn connection(pool: &Pool) -> Result<deadpool_postgres::Object, String> {
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        deadpool_postgres::PoolError::Timeout(_) => format!(
            "no database connection within {}s (is PostgreSQL reachable?)",
            POOL_WAIT.as_secs()
        ),
        other => pg(other),
    })
}

/// Runs `f` within [`CALL_TIMEOUT`].
async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(StoreError::Database),
        Err(_) => Err(StoreError::Database(format!(
            "the database did not answer within {}s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

/// How the database's certificate is checked, from the URL's `sslmode` (libpq's meanings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    /// `disable`, `prefer` (the default), `require`: TLS when the server offers it (`require`:
    /// only then), without checking the certificate, as libpq does: it keeps the traffic from
    /// passive listeners, not from a server that impersonates the database.
    Encrypt,
    /// `verify-ca`, `verify-full`: the certificate must chain to a trusted root (Mozilla's, or
    /// `SWITCHYARD_DATABASE_CA_FILE`) and name the host. (`verify-ca` is held to the host name
    /// too: stricter than libpq, never weaker.)
    Full,
}

/// Takes `sslmode=verify-ca|verify-full` out of `url` (the client knows `disable`, `prefer`
/// and `require`), replacing it with `require` and noting that certificates are verified.
fn ssl_verify(url: &str) -> (String, Verify) {
    for mode in ["sslmode=verify-full", "sslmode=verify-ca"] {
        if url.contains(mode) {
            return (url.replace(mode, "sslmode=require"), Verify::Full);
        }
    }
    (url.to_string(), Verify::Encrypt)
}

/// Accepts any certificate, while still checking the handshake's signatures: the `prefer` and
/// `require` modes of libpq.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS to the database (rustls). Whether TLS is used at all is the URL's `sslmode`; how the
/// certificate is checked is [`Verify`].
fn tls(verify: Verify) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Open(format!("TLS: {e}")))?;
    let config = match verify {
        Verify::Encrypt => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth(),
        Verify::Full => {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            if let Some(path) =
                std::env::var_os("SWITCHYARD_DATABASE_CA_FILE").filter(|p| !p.is_empty())
            {
                let shown = std::path::Path::new(&path).display().to_string();
                let certs =
                    rustls::pki_types::CertificateDer::pem_file_iter(&path).map_err(|e| {
                        StoreError::Open(format!(
                            "cannot read SWITCHYARD_DATABASE_CA_FILE {shown}: {e}"
                        ))
                    })?;
                for c in certs {
                    let c = c.map_err(|e| {
                        StoreError::Open(format!(
                            "SWITCHYARD_DATABASE_CA_FILE {shown} holds a bad certificate: {e}"
                        ))
                    })?;
                    roots.add(c).map_err(|e| {
                        StoreError::Open(format!("SWITCHYARD_DATABASE_CA_FILE {shown}: {e}"))
                    })?;
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The URL without its password, for logs and `/status`.
fn describe(cfg: &tokio_postgres::Config) -> String {
    let user = cfg.get_user().unwrap_or("");
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_default();
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let dbname = cfg.get_dbname().unwrap_or("");
    format!("postgres://{user}@{host}:{port}/{dbname}")
}

impl PgStore {
    /// Connects to the database `url` names, runs the migrations (under an advisory lock, so
    /// replicas started together take turns), and registers this replica's heartbeat.
    pub async fn connect(url: &Secret, lease: Duration) -> Result<PgStore, StoreError> {
        PgStore::open(url, lease, false).await
    }

    /// Connects as a command-line tool (`dead-letters`, `silence` without `--server`): not a
    /// replica, so it holds no job and does not show in `/status`; jobs it queues (a replay)
    /// are taken by a running replica at its next heartbeat.
    pub async fn connect_tool(url: &Secret) -> Result<PgStore, StoreError> {
        PgStore::open(url, Duration::from_secs(15), true).await
    }

    async fn open(url: &Secret, lease: Duration, tool: bool) -> Result<PgStore, StoreError> {
        let (url, verify) = ssl_verify(url.expose());
        let mut cfg = tokio_postgres::Config::from_str(&url).map_err(|e| {
            // The parser's message names the part it refused, never the password's value.
            StoreError::Open(format!("the database URL does not parse: {e}"))
        })?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(POOL_WAIT);
        }
        cfg.keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .application_name("switchyard");
        let location = describe(&cfg);
        // One TLS configuration (the roots read once) for both pools.
        let tls = tls(verify)?;
        let pool = |cfg: tokio_postgres::Config, size: usize| {
            let mgr = Manager::from_config(
                cfg,
                tls.clone(),
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(mgr)
                .max_size(size)
                .wait_timeout(Some(POOL_WAIT))
                .create_timeout(Some(POOL_WAIT))
                .recycle_timeout(Some(POOL_WAIT))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|e| StoreError::Open(format!("cannot build the connection pool: {e}")))
        };
        let mut lazy_cfg = cfg.clone();
        let options = match cfg.get_options() {
            Some(o) => format!("{o} -c synchronous_commit=off"),
            None => "-c synchronous_commit=off".to_string(),
        };
        lazy_cfg.options(&options);
        let me = fleet::Me::new(lease, tool);
        let (durable, lazy) = (pool(cfg, POOL_SIZE)?, pool(lazy_cfg, POOL_SIZE)?);
        let store = PgStore {
            batches: batch::Batches::start(
                durable.clone(),
                lazy.clone(),
                me.owner().map(str::to_string),
            ),
            pool: durable,
            lazy,
            location: location.clone(),
            me,
            pending: Arc::new(AtomicUsize::new(0)),
        };
        bounded(store.migrate())
            .await
            .map_err(|e| StoreError::Open(format!("cannot open the database {location}: {e}")))?;
        // Registered before it holds any job: every owner of a job has a heartbeat row (until
        // its jobs are gone), which is how the others find the jobs of a replica that died.
        bounded(store.register())
            .await
            .map_err(|e| StoreError::Open(format!("cannot register in {location}: {e}")))?;
        Ok(store)
    }

    /// Creates or upgrades the schema in one transaction under the migration lock.
    async fn migrate(&self) -> Result<(), String> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&schema::MIGRATION_LOCK],
        )
        .await
        .map_err(pg)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            .await
            .map_err(pg)?;
        let version: i32 = tx
            .query_opt("SELECT max(version) FROM schema_version", &[])
            .await
            .map_err(pg)?
            .and_then(|r| r.get::<_, Option<i32>>(0))
            .unwrap_or(0);
        if version > schema::VERSION {
            return Err(format!(
                "its schema is version {version}, newer than this build's {}: run the newer switchyard, or a database of its own",
                schema::VERSION
            ));
        }
        if version < 1 {
            tx.batch_execute(schema::V1).await.map_err(pg)?;
            tx.execute("INSERT INTO schema_version (version) VALUES (1)", &[])
                .await
                .map_err(pg)?;
            tracing::info!(database = %self.location, "created the outbox schema (version 1)");
        }
        tx.commit().await.map_err(pg)
    }

    /// A connection of [`PgStore::pool`].
    async fn client(&self) -> Result<deadpool_postgres::Object, String> {
        connection(&self.pool).await
    }

    /// A connection of [`PgStore::lazy`].
    async fn lazy_client(&self) -> Result<deadpool_postgres::Object, String> {
        connection(&self.lazy).await
    }

    fn add_pending(&self, n: isize) {
        if n >= 0 {
            self.pending.fetch_add(n as usize, Ordering::Relaxed);
        } else {
            let _ = self
                .pending
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                    Some(p.saturating_sub((-n) as usize))
                });
        }
    }

    async fn enqueue_tx(
        &self,
        dedup: Option<(String, i64)>,
        jobs: Vec<NewJob>,
        tracker: Option<(String, NewTracker)>,
    ) -> Result<Enqueued, String> {
        if tracker.is_none()
            && !jobs.is_empty()
            && jobs
                .iter()
                .all(|j| j.throttle.is_none() && j.error.is_none())
        {
            // The usual event: committed with the others of the moment (`batch.rs`).
            let r = self.batches.accept(dedup, jobs).await?;
            if let Enqueued::Committed(jobs, _) = &r {
                self.add_pending(held(jobs));
            }
            return Ok(r);
        }
        let now = now_ms();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        if let Some((key, expires)) = &dedup {
            // Two replicas inserting the same key at once: the second waits for the first's
            // commit, then finds the key and updates nothing.
            let st = tx
                .prepare_cached(
                    "INSERT INTO dedup (hash, expires_at) VALUES ($1, $2)
                     ON CONFLICT (hash) DO UPDATE SET expires_at = EXCLUDED.expires_at WHERE dedup.expires_at <= $3
                     RETURNING 1",
                )
                .await
                .map_err(pg)?;
            let hash = super::key_digest(key);
            let fresh = tx
                .query_opt(&st, &[&&hash[..], expires, &now])
                .await
                .map_err(pg)?
                .is_some();
            if !fresh {
                return Ok(Enqueued::Duplicate);
            }
        }
        // Throttle keys are claimed in sorted order, so two events with the same keys cannot
        // deadlock each other.
        let mut keys: Vec<(&str, Duration)> = jobs
            .iter()
            .filter_map(|j| j.throttle.as_ref().map(|(k, w)| (k.as_str(), *w)))
            .collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        keys.dedup_by(|a, b| a.0 == b.0);
        let mut allowed = std::collections::HashMap::new();
        for (key, window) in keys {
            let st = tx
                .prepare_cached(
                    "INSERT INTO throttle (key, until) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET until = EXCLUDED.until WHERE throttle.until <= $3
                     RETURNING 1",
                )
                .await
                .map_err(pg)?;
            let until = now.saturating_add(window.as_millis() as i64);
            let ok = tx
                .query_opt(&st, &[&key, &until, &now])
                .await
                .map_err(pg)?
                .is_some();
            allowed.insert(key.to_string(), ok);
        }
        let tracked = tracker.is_some();
        let mut out = Vec::with_capacity(jobs.len());
        let mut throttled = 0;
        for j in jobs {
            if let Some((key, _)) = &j.throttle {
                if !allowed.get(key).copied().unwrap_or(true) {
                    throttled += 1;
                    continue;
                }
            }
            match &j.error {
                Some(e) => insert_dead(&tx, &j, e, now).await?,
                None => out.push(self.insert_job(&tx, j, now, tracked).await?),
            }
        }
        if let Some((event_id, t)) = tracker {
            let errors = serde_json::to_string(&t.fail.iter().collect::<Vec<_>>())
                .unwrap_or_else(|_| "[]".into());
            let report = serde_json::to_string(&t.report).unwrap_or_default();
            tx.execute(
                "INSERT INTO run_trackers (event_id, destination, run_id, pending, delivered, failed, errors, report)
                 VALUES ($1, $2, $3, $4, 0, $5, $6, $7)
                 ON CONFLICT (event_id) DO UPDATE SET destination = EXCLUDED.destination, run_id = EXCLUDED.run_id,
                   pending = EXCLUDED.pending, delivered = 0, failed = EXCLUDED.failed, errors = EXCLUDED.errors, report = EXCLUDED.report",
                &[&event_id, &t.destination, &t.run_id, &(out.len() as i64), &i64::from(t.fail.is_some()), &errors, &report],
            )
            .await
            .map_err(pg)?;
            if out.is_empty() {
                if let Some(r) = self.close_tracker(&tx, &event_id, now).await? {
                    out.push(r);
                }
            }
        }
        tx.commit().await.map_err(pg)?;
        self.add_pending(held(&out));
        Ok(Enqueued::Committed(out, throttled))
    }

    /// Inserts a job leased to this replica (a grouped item is leased to nobody: it waits for
    /// its digest, it is not delivered).
    async fn insert_job(
        &self,
        tx: &Transaction<'_>,
        j: NewJob,
        now: i64,
        tracked: bool,
    ) -> Result<Job, String> {
        let text = j.payload.to_text();
        let target = serde_json::to_string(&j.target).unwrap_or_default();
        let kind = stored_kind(&j.payload);
        let grp = match &j.payload {
            Payload::Group(g) => Some(g.group.as_str()),
            _ => None,
        };
        let ident = j.target.identity.as_ref().map(|i| i.key.as_str());
        let owner = if grp.is_none() { self.me.owner() } else { None };
        let st = tx
            .prepare_cached(
                "INSERT INTO outbox (destination, rule, event_id, target, message, secret, created_at, kind, grp, ident_key, tracked, lease_owner)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id",
            )
            .await
            .map_err(pg)?;
        let id: i64 = tx
            .query_one(
                &st,
                &[
                    &j.destination,
                    &j.rule,
                    &j.event_id,
                    &target,
                    &text,
                    &j.secret,
                    &now,
                    &kind,
                    &grp,
                    &ident,
                    &tracked,
                    &owner,
                ],
            )
            .await
            .map_err(pg)?
            .get(0);
        Ok(j.stored(id, text, now))
    }

    /// Records an outcome; `Ok(None)` when the short path does not apply.
    async fn finish_fast(&self, id: i64, outcome: &Outcome) -> Result<Option<Vec<Job>>, String> {
        // A delivered job with nothing to follow and no tracker (nearly every one): deleted
        // with the others of the moment (`batch.rs`).
        let Outcome::Delivered {
            follow_ups,
            key: None,
            ..
        } = outcome
        else {
            return Ok(None);
        };
        if !follow_ups.is_empty() {
            return Ok(None);
        }
        if self.batches.done(id).await? {
            self.add_pending(-1);
            return Ok(Some(Vec::new()));
        }
        Ok(None)
    }

    async fn finish_tx(&self, id: i64, outcome: &Outcome) -> Result<Vec<Job>, String> {
        if let Some(done) = self.finish_fast(id, outcome).await? {
            return Ok(done);
        }
        let now = now_ms();
        let mut c = self.lazy_client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let row = tx
            .query_opt(
                "SELECT event_id, tracked, attempt_log FROM outbox WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(pg)?;
        let Some(row) = row else {
            // Finished already (by a replica that took it over while this one was cut off): its
            // key change, if any, is still this delivery's to record.
            if let Outcome::Delivered { key: Some(k), .. } = outcome {
                change_key(&tx, k, now).await?;
                tx.commit().await.map_err(pg)?;
            }
            if !matches!(outcome, Outcome::Retry { .. }) {
                self.add_pending(-1);
            }
            return Ok(Vec::new());
        };
        let event_id: String = row.get(0);
        let tracked: bool = row.get(1);
        let log: String = row.get(2);
        let ev = tracked.then_some(event_id.as_str());
        let mut created = Vec::new();
        let mut added: isize = 0;
        match outcome {
            Outcome::Delivered {
                follow_ups,
                message,
                key,
            } => {
                if let Some(k) = key {
                    change_key(&tx, k, now).await?;
                }
                tx.execute("DELETE FROM outbox WHERE id = $1", &[&id])
                    .await
                    .map_err(pg)?;
                added -= 1;
                let mut new_pending = 0i64;
                for j in follow_ups.iter().cloned() {
                    match &j.error {
                        Some(e) => {
                            insert_dead(&tx, &j, e, now).await?;
                            if let Some(ev) = ev {
                                track(&tx, ev, 0, 0, 1, Some(e)).await?;
                            }
                        }
                        None => {
                            created.push(self.insert_job(&tx, j, now, tracked).await?);
                            new_pending += 1;
                        }
                    }
                }
                if let Some(ev) = ev {
                    track(&tx, ev, new_pending - 1, i64::from(*message), 0, None).await?;
                    if let Some(r) = self.close_tracker(&tx, ev, now).await? {
                        created.push(r);
                    }
                }
            }
            Outcome::Retry { error } => {
                let log = super::append_attempt(Some(&log), now, error);
                tx.execute(
                    "UPDATE outbox SET attempts = attempts + 1, attempt_log = $1, last_error = $2 WHERE id = $3",
                    &[&log, error, &id],
                )
                .await
                .map_err(pg)?;
            }
            Outcome::Dead { error } => {
                let log = super::append_attempt(Some(&log), now, error);
                // A replayed message that dies again is its dead letter again.
                tx.execute(
                    "INSERT INTO dead_letters (id, destination, rule, event_id, target, message, created_at, dead_at, attempt_log, last_error, kind)
                     SELECT COALESCE(replay_of, nextval(pg_get_serial_sequence('dead_letters', 'id'))), destination, rule, event_id, target,
                            CASE WHEN secret THEN $1 ELSE message END, created_at, $2, $3, $4, kind
                     FROM outbox WHERE id = $5",
                    &[&redacted_json(), &now, &log, error, &id],
                )
                .await
                .map_err(pg)?;
                tx.execute("DELETE FROM outbox WHERE id = $1", &[&id])
                    .await
                    .map_err(pg)?;
                added -= 1;
                if let Some(ev) = ev {
                    track(&tx, ev, -1, 0, 1, Some(error)).await?;
                    if let Some(r) = self.close_tracker(&tx, ev, now).await? {
                        created.push(r);
                    }
                }
            }
        }
        tx.commit().await.map_err(pg)?;
        self.add_pending(added + held(&created));
        Ok(created)
    }

    /// When a tracker has nothing pending, replaces it with its report job.
    async fn close_tracker(
        &self,
        tx: &Transaction<'_>,
        event_id: &str,
        now: i64,
    ) -> Result<Option<Job>, String> {
        let row = tx
            .query_opt(
                "SELECT destination, run_id, pending, delivered, failed, errors, report FROM run_trackers WHERE event_id = $1 FOR UPDATE",
                &[&event_id],
            )
            .await
            .map_err(pg)?;
        let Some(row) = row else { return Ok(None) };
        let pending: i64 = row.get(2);
        if pending > 0 {
            return Ok(None);
        }
        tx.execute("DELETE FROM run_trackers WHERE event_id = $1", &[&event_id])
            .await
            .map_err(pg)?;
        let report: String = row.get(6);
        let spec: ReportSpec = serde_json::from_str(&report).unwrap_or_else(|_| ReportSpec {
            rule: "report".into(),
            ..Default::default()
        });
        let tally = Tally {
            delivered: row.get(3),
            failed: row.get(4),
            errors: serde_json::from_str(&row.get::<_, String>(5)).unwrap_or_default(),
        };
        let job = NewJob {
            destination: row.get(0),
            rule: spec.rule.clone(),
            event_id: format!("report:{event_id}"),
            target: Target::default(),
            payload: Payload::Report(Box::new(RunReport {
                run_id: row.get(1),
                spec,
                tally,
            })),
            secret: false,
            throttle: None,
            error: None,
        };
        self.insert_job(tx, job, now, false).await.map(Some)
    }

    async fn replay_tx(&self, ids: Vec<i64>) -> Result<Replayed, String> {
        let now = now_ms();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let mut done = Replayed::default();
        for id in ids {
            let row = tx
                .query_opt(
                    "SELECT destination, rule, event_id, target, message, COALESCE(kind, 'message'), attempt_log FROM dead_letters WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await
                .map_err(pg)?;
            let Some(row) = row else {
                done.skipped.push((id, format!("no dead letter {id}")));
                continue;
            };
            let (destination, rule, event_id, target, message, kind, log): (
                String,
                String,
                String,
                String,
                String,
                String,
                String,
            ) = (
                row.get(0),
                row.get(1),
                row.get(2),
                row.get(3),
                row.get(4),
                row.get(5),
                row.get(6),
            );
            if message == redacted_json() {
                done.skipped.push((
                    id,
                    "a One-Time Passcode message is never kept, so it cannot be sent again".into(),
                ));
                continue;
            }
            let payload = Payload::from_stored(&kind, &message, &rule);
            let target_v: Target = serde_json::from_str(&target).unwrap_or_default();
            let ident = target_v.identity.as_ref().map(|i| i.key.clone());
            let stored = (kind != "message").then_some(kind.as_str());
            let new_id: i64 = tx
                .query_one(
                    "INSERT INTO outbox (destination, rule, event_id, target, message, secret, created_at, kind, attempt_log, replay_of, ident_key, lease_owner)
                     VALUES ($1, $2, $3, $4, $5, false, $6, $7, $8, $9, $10, $11) RETURNING id",
                    &[&destination, &rule, &event_id, &target, &message, &now, &stored, &log, &id, &ident, &self.me.owner()],
                )
                .await
                .map_err(pg)?
                .get(0);
            tx.execute("DELETE FROM dead_letters WHERE id = $1", &[&id])
                .await
                .map_err(pg)?;
            done.requeued.push((id, new_id));
            done.jobs.push(Job {
                id: new_id,
                destination,
                payload,
                rule,
                event_id,
                target: target_v,
                text: Bytes::from(message),
                secret: false,
                created_at: now,
                attempts: 0,
                as_stored: false,
            });
        }
        tx.commit().await.map_err(pg)?;
        if self.me.tool {
            // Nobody here delivers them: a running replica takes them at its next heartbeat.
            done.jobs.clear();
        } else {
            self.add_pending(done.jobs.len() as isize);
        }
        Ok(done)
    }

    async fn flush_tx(
        &self,
        rule: String,
        group: String,
        ids: Vec<i64>,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Job>, String> {
        let now = now_ms();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let removed = tx
            .execute(
                "DELETE FROM outbox WHERE id = ANY($1) AND kind = 'group'",
                &[&ids],
            )
            .await
            .map_err(pg)?;
        // Another replica flushed some of these items first: its digest has them. Nothing is
        // done here (the transaction rolls back), so no item is in two digests; items it did
        // not see go in the next one.
        if removed as usize != ids.len() {
            return Ok(Vec::new());
        }
        let mut created = Vec::new();
        for j in jobs {
            match &j.error {
                Some(e) => insert_dead(&tx, &j, e, now).await?,
                None => created.push(self.insert_job(&tx, j, now, false).await?),
            }
        }
        tx.execute(
            "INSERT INTO group_flushes (rule, grp, flushed_at) VALUES ($1, $2, $3)
             ON CONFLICT (rule, grp) DO UPDATE SET flushed_at = EXCLUDED.flushed_at",
            &[&rule, &group, &now],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        self.add_pending(held(&created));
        Ok(created)
    }

    async fn read<T>(
        &self,
        f: impl for<'c> FnOnce(&'c deadpool_postgres::Client) -> BoxFut<'c, Result<T, String>>,
    ) -> Result<T, StoreError> {
        bounded(async {
            let c = self.client().await?;
            f(&c).await
        })
        .await
    }
}

/// Of `jobs`, those this replica holds (every one but grouped items).
fn held(jobs: &[Job]) -> isize {
    jobs.iter()
        .filter(|j| !matches!(j.payload, Payload::Group(_)))
        .count() as isize
}

/// The kind column of a payload: NULL for a message.
fn stored_kind(p: &Payload) -> Option<&'static str> {
    match p {
        Payload::Message(_) => None,
        other => Some(other.kind()),
    }
}

async fn insert_dead(
    tx: &Transaction<'_>,
    j: &NewJob,
    error: &str,
    now: i64,
) -> Result<(), String> {
    let log = super::append_attempt(None, now, error);
    let msg = if j.secret {
        redacted_json()
    } else {
        j.payload.to_text()
    };
    tx.execute(
        "INSERT INTO dead_letters (destination, rule, event_id, target, message, created_at, dead_at, attempt_log, last_error, kind)
         VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8, $9)",
        &[
            &j.destination,
            &j.rule,
            &j.event_id,
            &serde_json::to_string(&j.target).unwrap_or_default(),
            &msg,
            &now,
            &log,
            &error,
            &stored_kind(&j.payload),
        ],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// Records what a delivered keyed job did to its key, in the job's own transaction.
async fn change_key(tx: &Transaction<'_>, k: &KeyChange, now: i64) -> Result<(), String> {
    match &k.change {
        KeyEffect::Open { channel, ts, ttl_ms } => tx.execute(
            "INSERT INTO message_keys (destination, key, channel, ts, opened_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (destination, key) DO UPDATE SET channel = EXCLUDED.channel, ts = EXCLUDED.ts, opened_at = EXCLUDED.opened_at, expires_at = EXCLUDED.expires_at",
            &[&k.destination, &k.key, channel, ts, &now, &now.saturating_add(*ttl_ms)],
        ).await,
        KeyEffect::Touch { ttl_ms } => tx.execute(
            "UPDATE message_keys SET expires_at = $1 WHERE destination = $2 AND key = $3",
            &[&now.saturating_add(*ttl_ms), &k.destination, &k.key],
        ).await,
        KeyEffect::Close => tx.execute(
            "DELETE FROM message_keys WHERE destination = $1 AND key = $2",
            &[&k.destination, &k.key],
        ).await,
    }
    .map(|_| ())
    .map_err(pg)
}

/// Adjusts a run tracker's counts (no-op when the event has none).
async fn track(
    tx: &Transaction<'_>,
    event_id: &str,
    pending: i64,
    delivered: i64,
    failed: i64,
    error: Option<&str>,
) -> Result<(), String> {
    let row = tx
        .query_opt(
            "SELECT errors FROM run_trackers WHERE event_id = $1 FOR UPDATE",
            &[&event_id],
        )
        .await
        .map_err(pg)?;
    let Some(row) = row else { return Ok(()) };
    let mut list: Vec<String> = serde_json::from_str(&row.get::<_, String>(0)).unwrap_or_default();
    if let Some(e) = error {
        if list.len() < 20 {
            list.push(e.to_string());
        }
    }
    tx.execute(
        "UPDATE run_trackers SET pending = pending + $1, delivered = delivered + $2, failed = failed + $3, errors = $4 WHERE event_id = $5",
        &[&pending, &delivered, &failed, &serde_json::to_string(&list).unwrap_or_default(), &event_id],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// The columns of a job, in [`job_row`]'s order.
const JOB_COLUMNS: &str = "id, destination, rule, event_id, target, message, secret, created_at, attempts, COALESCE(kind, 'message')";

fn job_row(r: &Row) -> Job {
    let text: String = r.get(5);
    let rule: String = r.get(2);
    let kind: String = r.get(9);
    Job {
        id: r.get(0),
        destination: r.get(1),
        payload: Payload::from_stored(&kind, &text, &rule),
        rule,
        event_id: r.get(3),
        target: serde_json::from_str(&r.get::<_, String>(4)).unwrap_or_default(),
        text: Bytes::from(text),
        secret: r.get(6),
        created_at: r.get(7),
        attempts: r.get::<_, i32>(8).max(0) as u32,
        as_stored: false,
    }
}

const SILENCE_COLUMNS: &str =
    "SELECT id, rule, matchers, starts_at, ends_at, author, comment, created_at, key FROM silences";

fn silence_row(r: &Row) -> Silence {
    Silence {
        id: r.get(0),
        rule: r.get(1),
        matchers: serde_json::from_str(&r.get::<_, String>(2)).unwrap_or_default(),
        starts_at: r.get(3),
        ends_at: r.get(4),
        author: r.get(5),
        comment: r.get(6),
        created_at: r.get(7),
        key: r.get(8),
    }
}

const DEAD_COLUMNS: &str = "SELECT id, destination, rule, event_id, target, message, created_at, dead_at, attempt_log, last_error, COALESCE(kind, 'message') FROM dead_letters";

fn dead_row(r: &Row) -> DeadLetter {
    DeadLetter {
        id: r.get(0),
        destination: r.get(1),
        rule: r.get(2),
        event_id: r.get(3),
        target: serde_json::from_str(&r.get::<_, String>(4)).unwrap_or_default(),
        message: serde_json::from_str(&r.get::<_, String>(5)).unwrap_or(Value::Null),
        created_at: r.get(6),
        dead_at: r.get(7),
        attempts: serde_json::from_str(&r.get::<_, String>(8)).unwrap_or_default(),
        last_error: r.get(9),
        kind: r.get(10),
    }
}

type Params = Vec<Box<dyn ToSql + Sync + Send>>;

fn where_clause(f: &DeadLetterFilter) -> (String, Params) {
    let mut w = vec!["true".to_string()];
    let mut args: Params = Vec::new();
    if let Some(d) = &f.destination {
        args.push(Box::new(d.clone()));
        w.push(format!("destination = ${}", args.len()));
    }
    if let Some(r) = &f.rule {
        args.push(Box::new(r.clone()));
        w.push(format!("rule = ${}", args.len()));
    }
    if let Some(s) = f.since {
        args.push(Box::new(s));
        w.push(format!("dead_at >= ${}", args.len()));
    }
    if let Some(u) = f.until {
        args.push(Box::new(u));
        w.push(format!("dead_at <= ${}", args.len()));
    }
    (w.join(" AND "), args)
}

fn refs(p: &Params) -> Vec<&(dyn ToSql + Sync)> {
    p.iter()
        .map(|b| b.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

impl Store for PgStore {
    fn location(&self) -> String {
        self.location.clone()
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
            bounded(self.enqueue_tx(dedup, jobs, tracker))
                .await
                .map_err(|e| EnqueueError::Storage(e.to_string()))
        })
    }

    fn finish(&self, id: i64, outcome: Outcome) -> BoxFut<'_, Vec<Job>> {
        Box::pin(async move {
            // Never dropped: a delivered message whose outcome is lost would be sent again.
            // The caller waits while the database is away; past the lease another replica
            // takes the job over and may send it again (the documented at-least-once window).
            let mut pause = Duration::from_millis(100);
            loop {
                match bounded(self.finish_tx(id, &outcome)).await {
                    Ok(created) => return created,
                    Err(e) => {
                        tracing::error!(job = id, error = %e, "cannot record a delivery outcome; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        })
    }

    fn load_pending(&self) -> BoxFut<'_, Result<Vec<Job>, StoreError>> {
        // At start: this replica's first heartbeat, taking over the jobs nobody alive holds.
        self.beat()
    }

    fn summary(&self) -> BoxFut<'_, Result<Summary, StoreError>> {
        Box::pin(self.read(|c| {
            Box::pin(async move {
                let now = now_ms();
                let by = |sql: &'static str| async move {
                    c.query(sql, &[])
                        .await
                        .map(|rows| {
                            rows.iter()
                                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                                .collect::<Vec<_>>()
                        })
                        .map_err(pg)
                };
                Ok(Summary {
                    pending: by("SELECT destination, count(*) FROM outbox WHERE kind IS DISTINCT FROM 'group' GROUP BY destination ORDER BY destination").await?,
                    dead_letters: by("SELECT destination, count(*) FROM dead_letters GROUP BY destination ORDER BY destination").await?,
                    active_throttles: c
                        .query_one("SELECT count(*) FROM throttle WHERE until > $1", &[&now])
                        .await
                        .map_err(pg)?
                        .get(0),
                    open_keys: c
                        .query_one("SELECT count(*) FROM message_keys WHERE expires_at > $1", &[&now])
                        .await
                        .map_err(pg)?
                        .get(0),
                })
            })
        }))
    }

    fn pending_groups(&self) -> BoxFut<'_, Result<Vec<PendingGroup>, StoreError>> {
        Box::pin(self.read(|c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT o.rule, COALESCE(o.grp, ''), count(*), min(o.created_at), f.flushed_at
                         FROM outbox o LEFT JOIN group_flushes f ON f.rule = o.rule AND f.grp = o.grp
                         WHERE o.kind = 'group' GROUP BY o.rule, o.grp, f.flushed_at ORDER BY min(o.created_at)",
                        &[],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows
                    .iter()
                    .map(|r| PendingGroup {
                        rule: r.get(0),
                        group: r.get(1),
                        items: r.get(2),
                        first_at: r.get(3),
                        last_flush: r.get(4),
                    })
                    .collect())
            })
        }))
    }

    fn group_items(
        &self,
        rule: &str,
        group: &str,
    ) -> BoxFut<'_, Result<Vec<(i64, Value)>, StoreError>> {
        let (rule, group) = (rule.to_string(), group.to_string());
        Box::pin(self.read(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT id, message FROM outbox WHERE kind = 'group' AND rule = $1 AND grp = $2 ORDER BY id",
                        &[&rule, &group],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        let v: Value =
                            serde_json::from_str(&r.get::<_, String>(1)).unwrap_or(Value::Null);
                        (r.get(0), v.get("event").cloned().unwrap_or(Value::Null))
                    })
                    .collect())
            })
        }))
    }

    fn flush_group(
        &self,
        rule: String,
        group: String,
        ids: Vec<i64>,
        jobs: Vec<NewJob>,
    ) -> BoxFut<'_, Result<Vec<Job>, StoreError>> {
        Box::pin(bounded(self.flush_tx(rule, group, ids, jobs)))
    }

    fn silences(&self, ended_within: i64) -> BoxFut<'_, Result<Vec<Silence>, StoreError>> {
        Box::pin(self.read(move |c| {
            Box::pin(async move {
                let since = now_ms().saturating_sub(ended_within);
                let rows = c
                    .query(
                        &format!("{SILENCE_COLUMNS} WHERE ends_at > $1 ORDER BY id"),
                        &[&since],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows.iter().map(silence_row).collect())
            })
        }))
    }

    fn add_silence(
        &self,
        s: NewSilence,
        starts: i64,
        ends: i64,
    ) -> BoxFut<'_, Result<Silence, StoreError>> {
        Box::pin(self.read(move |c| {
            Box::pin(async move {
                let now = now_ms();
                let matchers = serde_json::to_string(&s.matchers).unwrap_or_else(|_| "[]".into());
                let id: i64 = c
                    .query_one(
                        "INSERT INTO silences (rule, matchers, key, starts_at, ends_at, author, comment, created_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                        &[&s.rule, &matchers, &s.key, &starts, &ends, &s.author, &s.comment, &now],
                    )
                    .await
                    .map_err(pg)?
                    .get(0);
                Ok(Silence {
                    id,
                    rule: s.rule,
                    matchers: s.matchers,
                    key: s.key,
                    starts_at: starts,
                    ends_at: ends,
                    author: s.author,
                    comment: s.comment,
                    created_at: now,
                })
            })
        }))
    }

    fn expire_silence(&self, id: i64) -> BoxFut<'_, Result<Option<Silence>, StoreError>> {
        Box::pin(self.read(move |c| {
            Box::pin(async move {
                let now = now_ms();
                c.execute(
                    "UPDATE silences SET ends_at = $1 WHERE id = $2 AND ends_at > $1",
                    &[&now, &id],
                )
                .await
                .map_err(pg)?;
                let row = c
                    .query_opt(&format!("{SILENCE_COLUMNS} WHERE id = $1"), &[&id])
                    .await
                    .map_err(pg)?;
                Ok(row.as_ref().map(silence_row))
            })
        }))
    }

    fn open_keys(&self, limit: usize) -> BoxFut<'_, Result<Vec<OpenKey>, StoreError>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Box::pin(self.read(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT destination, key, channel, ts, opened_at FROM message_keys WHERE expires_at > $1 ORDER BY destination, key LIMIT $2",
                        &[&now_ms(), &limit],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        (
                            r.get(0),
                            r.get(1),
                            KeyState {
                                channel: r.get(2),
                                ts: r.get(3),
                                opened_at: r.get(4),
                            },
                        )
                    })
                    .collect())
            })
        }))
    }

    fn message_key(
        &self,
        destination: &str,
        key: &str,
    ) -> BoxFut<'_, Result<Option<KeyState>, StoreError>> {
        let (destination, key) = (destination.to_string(), key.to_string());
        Box::pin(self.read(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        "SELECT channel, ts, opened_at FROM message_keys WHERE destination = $1 AND key = $2 AND expires_at > $3",
                        &[&destination, &key, &now_ms()],
                    )
                    .await
                    .map_err(pg)?;
                Ok(row.map(|r| KeyState {
                    channel: r.get(0),
                    ts: r.get(1),
                    opened_at: r.get(2),
                }))
            })
        }))
    }

    fn dead_letters(&self, f: DeadLetterFilter) -> BoxFut<'_, Result<Vec<DeadLetter>, StoreError>> {
        Box::pin(self.read(move |c| {
            Box::pin(async move {
                let (w, args) = where_clause(&f);
                let sql = format!(
                    "{DEAD_COLUMNS} WHERE {w} ORDER BY id DESC LIMIT {}",
                    f.limit.unwrap_or(1000)
                );
                let rows = c.query(&sql, &refs(&args)).await.map_err(pg)?;
                Ok(rows.iter().map(dead_row).collect())
            })
        }))
    }

    fn dead_letter(&self, id: i64) -> BoxFut<'_, Result<Option<DeadLetter>, StoreError>> {
        Box::pin(self.read(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(&format!("{DEAD_COLUMNS} WHERE id = $1"), &[&id])
                    .await
                    .map_err(pg)?;
                Ok(row.as_ref().map(dead_row))
            })
        }))
    }

    fn replay(&self, ids: Vec<i64>) -> BoxFut<'_, Result<Replayed, StoreError>> {
        Box::pin(bounded(self.replay_tx(ids)))
    }

    fn purge(&self, f: DeadLetterFilter) -> BoxFut<'_, Result<usize, StoreError>> {
        Box::pin(self.read(move |c| {
            Box::pin(async move {
                let (w, args) = where_clause(&f);
                let n = c
                    .execute(&format!("DELETE FROM dead_letters WHERE {w}"), &refs(&args))
                    .await
                    .map_err(pg)?;
                Ok(n as usize)
            })
        }))
    }

    fn fleet(&self) -> Option<&dyn Fleet> {
        Some(self)
    }
}
