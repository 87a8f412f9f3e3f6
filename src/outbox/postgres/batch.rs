//! Group commit for the two writes every message makes: accepting its event, and deleting its
//! job once delivered.
//!
//! Why: one commit per request made PostgreSQL spend most of its time committing, and the
//! engine most of its time on round trips. Here each write joins a batch: a lane takes every
//! request waiting, writes them in one transaction (or one statement), and answers each caller
//! after the commit, as the SQLite store's writer thread does. Two lanes per kind, so one batch
//! gathers while the other is in the database. A caller's guarantee is unchanged: its answer
//! follows its own commit.

use std::collections::HashSet;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::{connection, pg, stored_kind, Job, NewJob, Payload};
use crate::outbox::{key_digest, now_ms, Enqueued};

/// Most requests in one batch.
const MAX_BATCH: usize = 512;
/// Accept batches in the database at once.
const ACCEPT_LANES: usize = 2;
/// Delete batches in the database at once.
const DONE_LANES: usize = 2;

/// An event to accept: its dedup key (digest, expiry) and its jobs.
struct Accept {
    dedup: Option<([u8; 16], i64)>,
    jobs: Vec<NewJob>,
    reply: oneshot::Sender<Result<Enqueued, String>>,
}

/// A delivered job to delete; the answer says whether it was (false: it has a run tracker, or
/// is gone, and the caller takes the full path).
struct Done {
    id: i64,
    reply: oneshot::Sender<Result<bool, String>>,
}

/// The batching lanes of one store.
pub(super) struct Batches {
    accept: mpsc::UnboundedSender<Accept>,
    done: mpsc::UnboundedSender<Done>,
}

impl Batches {
    /// Starts the lanes: accepts on `durable` connections (their commits wait for the WAL
    /// flush), deletions on `lazy` ones. `owner` leases the accepted jobs.
    pub(super) fn start(durable: Pool, lazy: Pool, owner: Option<String>) -> Batches {
        let (accept, accept_rx) = mpsc::unbounded_channel();
        let (done, done_rx) = mpsc::unbounded_channel();
        let accept_rx = Arc::new(Mutex::new(accept_rx));
        let done_rx = Arc::new(Mutex::new(done_rx));
        let owner: Arc<Option<String>> = Arc::new(owner);
        for _ in 0..ACCEPT_LANES {
            let (rx, pool, owner) = (accept_rx.clone(), durable.clone(), owner.clone());
            tokio::spawn(async move {
                while let Some(batch) = gather(&rx).await {
                    accept_batch(&pool, owner.as_deref(), batch).await;
                }
            });
        }
        for _ in 0..DONE_LANES {
            let (rx, pool) = (done_rx.clone(), lazy.clone());
            tokio::spawn(async move {
                while let Some(batch) = gather(&rx).await {
                    done_batch(&pool, batch).await;
                }
            });
        }
        Batches { accept, done }
    }

    /// Accepts an event (no throttles, errors or run tracker: see `enqueue_tx`); resolves after
    /// the commit of the batch it joined.
    pub(super) async fn accept(
        &self,
        dedup: Option<(String, i64)>,
        jobs: Vec<NewJob>,
    ) -> Result<Enqueued, String> {
        let (reply, rx) = oneshot::channel();
        let dedup = dedup.map(|(k, e)| (key_digest(&k), e));
        self.accept
            .send(Accept { dedup, jobs, reply })
            .map_err(|_| "the store is closing".to_string())?;
        rx.await.map_err(|_| "the store is closing".to_string())?
    }

    /// Deletes a delivered job without a run tracker; `Ok(false)` when the full path is needed.
    pub(super) async fn done(&self, id: i64) -> Result<bool, String> {
        let (reply, rx) = oneshot::channel();
        self.done
            .send(Done { id, reply })
            .map_err(|_| "the store is closing".to_string())?;
        rx.await.map_err(|_| "the store is closing".to_string())?
    }
}

/// Waits for one request, then takes every other one waiting (up to [`MAX_BATCH`]).
async fn gather<T>(rx: &Mutex<mpsc::UnboundedReceiver<T>>) -> Option<Vec<T>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(x) => batch.push(x),
            Err(_) => break,
        }
    }
    Some(batch)
}

async fn done_batch(pool: &Pool, batch: Vec<Done>) {
    let ids: Vec<i64> = batch.iter().map(|d| d.id).collect();
    let result = async {
        let c = connection(pool).await?;
        let st = c
            .prepare_cached("DELETE FROM outbox WHERE id = ANY($1) AND NOT tracked RETURNING id")
            .await
            .map_err(pg)?;
        let rows = c.query(&st, &[&ids]).await.map_err(pg)?;
        Ok::<HashSet<i64>, String>(rows.iter().map(|r| r.get(0)).collect())
    }
    .await;
    for d in batch {
        let _ = d.reply.send(match &result {
            Ok(deleted) => Ok(deleted.contains(&d.id)),
            Err(e) => Err(e.clone()),
        });
    }
}

/// The columns of jobs to insert, as arrays for one `unnest` insert.
#[derive(Default)]
struct Columns<'a> {
    destination: Vec<&'a str>,
    rule: Vec<&'a str>,
    event_id: Vec<&'a str>,
    target: Vec<String>,
    message: Vec<String>,
    secret: Vec<bool>,
    kind: Vec<Option<&'static str>>,
    grp: Vec<Option<&'a str>>,
    ident: Vec<Option<&'a str>>,
    owner: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, j: &'a NewJob, owner: Option<&'a str>) {
        self.destination.push(&j.destination);
        self.rule.push(&j.rule);
        self.event_id.push(&j.event_id);
        self.target
            .push(serde_json::to_string(&j.target).unwrap_or_default());
        self.message.push(j.payload.to_text());
        self.secret.push(j.secret);
        self.kind.push(stored_kind(&j.payload));
        let g = match &j.payload {
            Payload::Group(g) => Some(g.group.as_str()),
            _ => None,
        };
        self.grp.push(g);
        self.ident
            .push(j.target.identity.as_ref().map(|i| i.key.as_str()));
        // A grouped item waits for its digest: nobody holds it.
        self.owner.push(if g.is_none() { owner } else { None });
    }
}

/// Inserts every job of the accepted events in one statement (ids in the order given).
const INSERT_JOBS: &str = "INSERT INTO outbox (destination, rule, event_id, target, message, secret, created_at, kind, grp, ident_key, lease_owner)
     SELECT t.destination, t.rule, t.event_id, t.target, t.message, t.secret, $1, t.kind, t.grp, t.ident_key, t.owner
     FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bool[], $8::text[], $9::text[], $10::text[], $11::text[])
       WITH ORDINALITY AS t(destination, rule, event_id, target, message, secret, kind, grp, ident_key, owner, n)
     ORDER BY t.n RETURNING id";

async fn accept_batch(pool: &Pool, owner: Option<&str>, batch: Vec<Accept>) {
    let now = now_ms();
    // A key twice in one batch (a sender's retry racing its first try): the first is the
    // event, the others are its duplicates.
    let mut seen = HashSet::new();
    let first: Vec<bool> = batch
        .iter()
        .map(|a| a.dedup.is_none_or(|(h, _)| seen.insert(h)))
        .collect();
    let result = write_accepts(pool, owner, &batch, &first, now).await;
    let (fresh, ids, texts) = match result {
        Ok(v) => v,
        Err(e) => {
            for a in batch {
                let _ = a.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let mut rows = ids.into_iter().zip(texts);
    for (a, first) in batch.into_iter().zip(first) {
        let accepted = first && a.dedup.is_none_or(|(h, _)| fresh.contains(&h));
        if !accepted {
            let _ = a.reply.send(Ok(Enqueued::Duplicate));
            continue;
        }
        let jobs: Vec<Job> = a
            .jobs
            .into_iter()
            .map(|j| {
                let (id, text) = rows.next().unwrap_or_default();
                j.stored(id, text, now)
            })
            .collect();
        let _ = a.reply.send(Ok(Enqueued::Committed(jobs, 0)));
    }
}

/// One transaction: the batch's dedup keys (sorted, so that batches never wait on each other in
/// a cycle), then the jobs of the events whose key was fresh. Returns the fresh keys and the
/// new ids and the stored texts, in insertion order.
async fn write_accepts(
    pool: &Pool,
    owner: Option<&str>,
    batch: &[Accept],
    first: &[bool],
    now: i64,
) -> Result<(HashSet<[u8; 16]>, Vec<i64>, Vec<String>), String> {
    let mut c = connection(pool).await?;
    let tx = c.transaction().await.map_err(pg)?;
    let mut keys: Vec<([u8; 16], i64)> = batch
        .iter()
        .zip(first)
        .filter_map(|(a, f)| if *f { a.dedup } else { None })
        .collect();
    keys.sort_unstable();
    let mut fresh = HashSet::new();
    if !keys.is_empty() {
        let hashes: Vec<&[u8]> = keys.iter().map(|(h, _)| &h[..]).collect();
        let expires: Vec<i64> = keys.iter().map(|(_, e)| *e).collect();
        let st = tx
            .prepare_cached(
                "INSERT INTO dedup (hash, expires_at) SELECT * FROM unnest($1::bytea[], $2::bigint[])
                 ON CONFLICT (hash) DO UPDATE SET expires_at = EXCLUDED.expires_at WHERE dedup.expires_at <= $3
                 RETURNING hash",
            )
            .await
            .map_err(pg)?;
        for r in tx
            .query(&st, &[&hashes, &expires, &now])
            .await
            .map_err(pg)?
        {
            let h: Vec<u8> = r.get(0);
            if let Ok(h) = <[u8; 16]>::try_from(h.as_slice()) {
                fresh.insert(h);
            }
        }
    }
    let mut cols = Columns::default();
    for (a, f) in batch.iter().zip(first) {
        if *f && a.dedup.is_none_or(|(h, _)| fresh.contains(&h)) {
            for j in &a.jobs {
                cols.push(j, owner);
            }
        }
    }
    let mut ids = Vec::new();
    if !cols.destination.is_empty() {
        let st = tx.prepare_cached(INSERT_JOBS).await.map_err(pg)?;
        let rows = tx
            .query(
                &st,
                &[
                    &now,
                    &cols.destination,
                    &cols.rule,
                    &cols.event_id,
                    &cols.target,
                    &cols.message,
                    &cols.secret,
                    &cols.kind,
                    &cols.grp,
                    &cols.ident,
                    &cols.owner,
                ],
            )
            .await
            .map_err(pg)?;
        // The sequence numbers rows in the order they were inserted (`ORDER BY t.n`).
        ids = rows.iter().map(|r| r.get(0)).collect();
        ids.sort_unstable();
    }
    tx.commit().await.map_err(pg)?;
    Ok((fresh, ids, cols.message))
}
