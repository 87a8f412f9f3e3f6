//! The writer thread: every change to the database, grouped into transactions.

use super::dedup::Dedup;
use super::*;
use crate::job::{ReportSpec, RunReport, Tally, Target};
use crate::outbox::{KeyChange, KeyEffect};

// One command per message passes through the channel; `Enqueue` is the usual one, so boxing
// it would cost an allocation per event to save a few bytes on the rarer ones.
#[allow(clippy::large_enum_variant)]
pub(super) enum Cmd {
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
        reply: oneshot::Sender<Result<Replayed, String>>,
    },
    Purge {
        filter: DeadLetterFilter,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    /// A group's items replaced by its digest jobs.
    FlushGroup {
        rule: String,
        group: String,
        ids: Vec<i64>,
        jobs: Vec<NewJob>,
        reply: oneshot::Sender<Result<Vec<Job>, String>>,
    },
    /// A rare change of the engine's own state (silences), made in the writer's transaction
    /// like every other change; its answer is sent after the commit.
    Admin {
        op: AdminOp,
        reply: oneshot::Sender<Result<Value, String>>,
    },
}

/// An administrative change, run inside a transaction.
pub(super) type AdminOp =
    Box<dyn FnOnce(&rusqlite::Transaction<'_>, i64) -> Result<Value, String> + Send>;

pub(super) fn writer(
    mut conn: Connection,
    rx: mpsc::Receiver<Cmd>,
    pending: Arc<AtomicUsize>,
    mut dedup: Dedup,
) {
    let mut full = true; // the schema opens the connection with synchronous=FULL
                         // Registered once (the server installs the recorder before it opens the outbox).
    let commits_full = metrics::counter!("switchyard_outbox_commits_total", "sync" => "full");
    let commits_normal = metrics::counter!("switchyard_outbox_commits_total", "sync" => "normal");
    let commands = metrics::counter!("switchyard_outbox_commands_total");
    let failures = metrics::counter!("switchyard_outbox_commit_failures_total");
    let dedup_keys = metrics::gauge!("switchyard_dedup_keys");
    dedup_keys.set(dedup.len() as f64);
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
        match apply(&mut conn, batch, &pending, tracked, &mut dedup) {
            Ok(()) => {
                dedup_keys.set(dedup.len() as f64);
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
/// which at-least-once delivery allows anyway. `switchyard_outbox_commits_total{sync}` counts
/// both kinds.
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
    Replay(oneshot::Sender<Result<Replayed, String>>, Replayed),
    Purge(oneshot::Sender<Result<usize, String>>, usize),
    Admin(oneshot::Sender<Result<Value, String>>, Value),
    Flushed(oneshot::Sender<Result<Vec<Job>, String>>, Vec<Job>),
}

/// Applies a batch in one transaction. `tracked`: some run tracker exists as the batch starts
/// (a job's tracker is created in the transaction that creates the job, so a job finished in
/// this batch can only have one if so).
fn apply(
    conn: &mut Connection,
    batch: Vec<Cmd>,
    pending: &AtomicUsize,
    tracked: bool,
    dedup: &mut Dedup,
) -> Result<(), (String, Vec<Cmd>)> {
    // Outcomes are applied by reference, so that they survive a failed transaction whole;
    // the rest is consumed (its callers are answered with the error).
    let (finishes, others): (Vec<Cmd>, Vec<Cmd>) = batch
        .into_iter()
        .partition(|c| matches!(c, Cmd::Finish { .. }));
    let applied = apply_tx(conn, others, &finishes, pending, tracked, dedup);
    if applied.is_err() {
        dedup.rolled_back();
    }
    match applied {
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
    dedup: &mut Dedup,
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
                    key,
                } => {
                    let message = *message;
                    if let Some(k) = key {
                        change_key(&tx, k, now)?;
                    }
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
                                // A replayed message that dies again is its dead letter again
                                // (NULL: a new id).
                                "INSERT INTO dead_letters (id, destination, rule, event_id, target, message, created_at, dead_at, attempt_log, last_error, kind)
                                 SELECT replay_of, destination, rule, event_id, target, CASE WHEN secret = 1 THEN ? ELSE message END, created_at, ?, ?, ?, kind FROM outbox WHERE id = ?",
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
                dedup: dedup_key,
                jobs,
                tracker,
                reply,
            } => {
                if let Some((key, expires)) = &dedup_key {
                    let fresh = dedup
                        .claim(&tx, key, *expires, now)
                        .map_err(|e| e.to_string())?;
                    if !fresh {
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
                let mut done = Replayed::default();
                for id in ids {
                    let row: Option<(String, String, String, String, String, String, String)> = tx
                        .row_c(
                            "SELECT destination, rule, event_id, target, message, COALESCE(kind, 'message'), attempt_log FROM dead_letters WHERE id = ?",
                            [id],
                            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
                        )
                        .optional()
                        .map_err(|e| e.to_string())?;
                    let Some((destination, rule, event_id, target, message, kind, log)) = row
                    else {
                        done.skipped.push((id, format!("no dead letter {id}")));
                        continue;
                    };
                    if message == redacted_json() {
                        done.skipped.push((
                            id,
                            "a One-Time Passcode message is never kept, so it cannot be sent again"
                                .into(),
                        ));
                        continue;
                    }
                    // The attempts of its first life stay in its log; `max_age` counts anew.
                    tx.exec_c(
                        "INSERT INTO outbox (destination, rule, event_id, target, message, secret, created_at, kind, attempt_log, replay_of) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
                        params![destination, rule, event_id, target, message, now, (kind != "message").then_some(kind.as_str()), log, id],
                    )
                    .map_err(|e| e.to_string())?;
                    let new_id = tx.last_insert_rowid();
                    tx.exec_c("DELETE FROM dead_letters WHERE id = ?", [id])
                        .map_err(|e| e.to_string())?;
                    done.requeued.push((id, new_id));
                    done.jobs.push(Job {
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
                        as_stored: false,
                    });
                }
                added += done.jobs.len() as isize;
                replies.push(Reply::Replay(reply, done));
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
            Cmd::FlushGroup {
                rule,
                group,
                ids,
                jobs,
                reply,
            } => {
                let mut removed = 0;
                for id in &ids {
                    removed += tx
                        .exec_c("DELETE FROM outbox WHERE id = ? AND kind = 'group'", [id])
                        .map_err(|e| e.to_string())?;
                }
                added -= removed as isize;
                // Items already flushed (a second flusher, or a retry after a lost answer) make
                // no second digest.
                let mut created = Vec::new();
                if removed > 0 {
                    for j in jobs {
                        match &j.error {
                            Some(e) => insert_dead(&tx, &j, e, now)?,
                            None => created.push(insert_job(&tx, j, now)?),
                        }
                    }
                    tx.exec_c(
                        "INSERT INTO group_flushes (rule, grp, flushed_at) VALUES (?, ?, ?) ON CONFLICT (rule, grp) DO UPDATE SET flushed_at = excluded.flushed_at",
                        params![rule, group, now],
                    )
                    .map_err(|e| e.to_string())?;
                }
                added += created.len() as isize;
                replies.push(Reply::Flushed(reply, created));
            }
            Cmd::Admin { op, reply } => {
                let v = op(&tx, now)?;
                replies.push(Reply::Admin(reply, v));
            }
        }
    }
    // Expired dedup keys and message keys are dropped now and then, inside the same
    // transaction; the indexes on `expires_at` make that a range delete of what expired, not a
    // scan of every key. Dedup rows go at most SWEEP_ROWS per batch, so that a window's worth
    // of keys expiring at once (a burst a day ago) does not hold one commit for long; the rest
    // go with the following batches.
    let sweep = dedup.sweep_due();
    let mut swept_rows = None;
    if sweep || dedup.rows_behind() {
        let n = tx
            .exec_c(
                "DELETE FROM dedup_keys WHERE id IN
                   (SELECT id FROM dedup_keys WHERE expires_at <= ? LIMIT ?)",
                params![now, super::dedup::SWEEP_ROWS],
            )
            .map_err(|e| e.to_string())?;
        swept_rows = Some(n);
    }
    if sweep {
        tx.exec_c("DELETE FROM message_keys WHERE expires_at < ?", [now])
            .map_err(|e| e.to_string())?;
    }
    match tx.commit() {
        Ok(()) => {
            dedup.committed(sweep, swept_rows, now);
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
                    Reply::Replay(tx, done) => {
                        let _ = tx.send(Ok(done));
                    }
                    Reply::Purge(tx, n) => {
                        let _ = tx.send(Ok(n));
                    }
                    Reply::Admin(tx, v) => {
                        let _ = tx.send(Ok(v));
                    }
                    Reply::Flushed(tx, jobs) => {
                        let _ = tx.send(Ok(jobs));
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
                    Reply::Admin(tx, _) => {
                        let _ = tx.send(Err(msg.clone()));
                    }
                    Reply::Flushed(tx, _) => {
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
        params![j.destination, j.rule, j.event_id, serde_json::to_string(&j.target).unwrap_or_default(), text, j.secret as i64, now, stored_kind(&j.payload)],
    )
    .map_err(|e| e.to_string())?;
    Ok(j.stored(tx.last_insert_rowid(), text, now))
}

/// Records what a delivered keyed job did to its key, in the job's own transaction: the key's
/// message and the job's completion are stored together, so after a crash a key never names a
/// message its job does not know it sent, nor the other way round.
fn change_key(tx: &rusqlite::Transaction<'_>, k: &KeyChange, now: i64) -> Result<(), String> {
    let r = match &k.change {
        KeyEffect::Open { channel, ts, ttl_ms } => tx.exec_c(
            "INSERT INTO message_keys (destination, key, channel, ts, opened_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (destination, key) DO UPDATE SET channel = excluded.channel, ts = excluded.ts, opened_at = excluded.opened_at, expires_at = excluded.expires_at",
            params![k.destination, k.key, channel, ts, now, now.saturating_add(*ttl_ms)],
        ),
        KeyEffect::Touch { ttl_ms } => tx.exec_c(
            "UPDATE message_keys SET expires_at = ? WHERE destination = ? AND key = ?",
            params![now.saturating_add(*ttl_ms), k.destination, k.key],
        ),
        KeyEffect::Close => tx.exec_c(
            "DELETE FROM message_keys WHERE destination = ? AND key = ?",
            params![k.destination, k.key],
        ),
    };
    r.map(|_| ()).map_err(|e| e.to_string())
}

fn insert_dead(
    tx: &rusqlite::Transaction<'_>,
    j: &NewJob,
    error: &str,
    now: i64,
) -> Result<(), String> {
    let log = crate::outbox::append_attempt(None, now, error);
    let msg = if j.secret {
        redacted_json()
    } else {
        j.payload.to_text()
    };
    tx.exec_c(
        "INSERT INTO dead_letters (destination, rule, event_id, target, message, created_at, dead_at, attempt_log, last_error, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        params![j.destination, j.rule, j.event_id, serde_json::to_string(&j.target).unwrap_or_default(), msg, now, now, log, error, stored_kind(&j.payload)],
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
    Ok(crate::outbox::append_attempt(log.as_deref(), now, error))
}
