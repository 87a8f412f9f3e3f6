//! The ingest stage: what every source does with an event once it is decoded.
//!
//! HTTP webhooks, Kafka records and schedule ticks all end the same way: route the event
//! (pure), plan its follow-ups (a run tracker for an action run), commit the jobs durably in one
//! outbox transaction together with the event's dedup key, hand the committed jobs to delivery,
//! and count. [`Pipeline::accept`] is that tail, written once. The callers keep only their
//! transport's concerns (HTTP status codes, Kafka offsets, schedule clocks).
//!
//! Guarantee: when `accept` returns `Ok`, the event's jobs are committed (or the event was a
//! duplicate within its dedup window, or matched nothing); the caller may acknowledge it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{Ruleset, SourceEntry};
use crate::deliver::Deliverer;
use crate::event::Event;
use crate::job::{NewJob, Payload};
use crate::outbox::{EnqueueError, Enqueued, NewTracker, Outbox};
use crate::routing::{route_in_place, DispatchError};
use crate::runs;

/// What became of an accepted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Committed: `dispatches` jobs of this event queued, `throttled` suppressed by throttles.
    /// `matched` is false when no rule matched (nothing was queued but a possible run report).
    Committed {
        dispatches: usize,
        throttled: usize,
        matched: bool,
    },
    /// Already accepted within the dedup window; nothing was added.
    Duplicate,
}

/// The shared tail of every source. Cheap to share (`Arc`).
pub struct Pipeline {
    rules: Arc<ArcSwap<Ruleset>>,
    outbox: Outbox,
    deliverer: Deliverer,
    /// Messages suppressed by rule throttles since start.
    throttled: AtomicU64,
    /// The silences in force, held in memory.
    silences: crate::silence::Silences,
    throttled_total: metrics::Counter,
}

impl Pipeline {
    /// A pipeline over the engine's current rules, its outbox and its delivery stage.
    pub fn new(rules: Arc<ArcSwap<Ruleset>>, outbox: Outbox, deliverer: Deliverer) -> Pipeline {
        Pipeline {
            rules,
            outbox,
            deliverer,
            throttled: AtomicU64::new(0),
            silences: Default::default(),
            throttled_total: metrics::counter!("switchyard_throttled_total"),
        }
    }

    /// The rules in force now. A caller that looks a source up loads them once and passes the
    /// same ruleset to [`Pipeline::accept`], so one event is handled by one ruleset even when a
    /// reload swaps in another meanwhile.
    pub fn rules(&self) -> Arc<Ruleset> {
        self.rules.load_full()
    }

    /// Messages suppressed by throttles since start.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    /// A click on one of the engine's own buttons ([`crate::buttons`]): a snooze's silence is
    /// stored first (so the next match is already silenced), then the message update is
    /// committed with the click's dedup key and delivered.
    async fn click(
        &self,
        rs: &Ruleset,
        ev: &Event,
        c: &crate::buttons::Click,
        dedup: Duration,
    ) -> Result<Accepted, EnqueueError> {
        let now = crate::outbox::now_ms();
        let snoozed = self.silences.load().has_key(&c.rule, &c.key, now);
        let what = if c.snooze { "snooze" } else { "acknowledge" };
        let allow = crate::buttons::allowed(rs, c);
        let mut clicker_allowed = allow.contains(&c.user);
        for email in allow.iter().filter(|a| a.contains('@')) {
            if clicker_allowed {
                break;
            }
            match self.deliverer.user_id_of(&c.destination, email).await {
                Ok(id) => clicker_allowed = id == c.user,
                Err(e) => {
                    tracing::warn!(rule = %c.rule, email = %email, "cannot look up an allowed email: {e}")
                }
            }
        }
        match crate::buttons::plan(rs, ev, c, now, snoozed, clicker_allowed) {
            crate::buttons::Plan::Refused(why) => {
                metrics::counter!("switchyard_button_clicks_total", "button" => what, "outcome" => "refused").increment(1);
                tracing::warn!(rule = %c.rule, user = %c.user, button = what, "button click refused: {why}");
                Ok(Accepted::Committed {
                    dispatches: 0,
                    throttled: 0,
                    matched: false,
                })
            }
            crate::buttons::Plan::Act { silence, update } => {
                if let Some(s) = silence {
                    let (starts, ends) = (s.starts_at.unwrap_or(now), s.ends_at.unwrap_or(now));
                    self.outbox
                        .add_silence(s, starts, ends)
                        .await
                        .map_err(|e| EnqueueError::Storage(e.to_string()))?;
                    let _ = self.load_silences().await;
                }
                let result = self
                    .outbox
                    .enqueue(Some((ev.id.clone(), dedup)), vec![*update], None)
                    .await?;
                metrics::counter!("switchyard_button_clicks_total", "button" => what, "outcome" => "done").increment(1);
                tracing::info!(rule = %c.rule, key = %c.key, user = %c.user, button = what, "button click handled");
                match result {
                    Enqueued::Committed(jobs, _) => {
                        let n = jobs.len();
                        self.deliverer.submit(jobs);
                        Ok(Accepted::Committed {
                            dispatches: n,
                            throttled: 0,
                            matched: true,
                        })
                    }
                    Enqueued::Duplicate => Ok(Accepted::Duplicate),
                }
            }
        }
    }

    /// The groups of grouped rules that hold items.
    pub async fn pending_groups(
        &self,
    ) -> Result<Vec<crate::outbox::PendingGroup>, crate::outbox::StoreError> {
        self.outbox.pending_groups().await
    }

    /// One group's items, oldest first.
    pub async fn group_items(
        &self,
        rule: &str,
        group: &str,
    ) -> Result<Vec<(i64, serde_json::Value)>, crate::outbox::StoreError> {
        self.outbox.group_items(rule, group).await
    }

    /// Replaces a group's items by its digest jobs (one transaction) and starts delivering them.
    pub async fn commit_digest(
        &self,
        rule: String,
        group: String,
        ids: Vec<i64>,
        jobs: Vec<NewJob>,
    ) -> Result<usize, crate::outbox::StoreError> {
        let created = self.outbox.flush_group(rule, group, ids, jobs).await?;
        let n = created.len();
        self.deliverer.submit(created);
        Ok(n)
    }

    /// Reads the silences from the outbox again (at start, and after one is added or expired),
    /// keeping the counts of those already held.
    pub async fn load_silences(&self) -> Result<(), crate::outbox::StoreError> {
        let all = self.outbox.silences(0).await?;
        let previous = self.silences.load();
        self.silences
            .store(Arc::new(crate::silence::SilenceSet::new(
                all,
                Some(&previous),
            )));
        Ok(())
    }

    /// The silences not over yet, with their counts, for `/status`.
    pub fn silence_status(&self) -> Vec<serde_json::Value> {
        self.silences.load().status(crate::outbox::now_ms())
    }

    /// Routes `ev` with `rs`, commits its jobs (deduplicated by the event id for `dedup`), and
    /// starts their delivery. `src` is the source it came from (`None` for schedule ticks).
    pub async fn accept(
        &self,
        rs: &Ruleset,
        src: Option<&SourceEntry>,
        ev: &mut Event,
        dedup: Duration,
    ) -> Result<Accepted, EnqueueError> {
        if let Some(c) = crate::buttons::click(ev) {
            return self.click(rs, ev, &c, dedup).await;
        }
        let (jobs, tracker) = plan(rs, src, ev, &self.silences.load());
        let matched = !jobs.is_empty();
        let result = self
            .outbox
            .enqueue(Some((ev.id.clone(), dedup)), jobs, tracker)
            .await;
        match result? {
            Enqueued::Committed(committed, throttled) => {
                if throttled > 0 {
                    self.throttled_total.increment(throttled as u64);
                    self.throttled
                        .fetch_add(throttled as u64, Ordering::Relaxed);
                }
                // Dispatches of this event (a run report created at once is not one).
                let dispatches = committed.iter().filter(|j| j.event_id == ev.id).count();
                self.deliverer.submit(committed);
                Ok(Accepted::Committed {
                    dispatches,
                    throttled,
                    matched,
                })
            }
            Enqueued::Duplicate => Ok(Accepted::Duplicate),
        }
    }

    /// Commits jobs that are not an event's dispatches (a poison Kafka record kept as a dead
    /// letter), deduplicated by `key` for `dedup`.
    pub async fn keep(
        &self,
        key: String,
        jobs: Vec<NewJob>,
        dedup: Duration,
    ) -> Result<(), EnqueueError> {
        match self.outbox.enqueue(Some((key, dedup)), jobs, None).await? {
            Enqueued::Committed(committed, _) => self.deliverer.submit(committed),
            Enqueued::Duplicate => {}
        }
        Ok(())
    }
}

/// Turns an event into jobs: routes it, logs refusals and render failures (which become dead
/// letters on commit), and, for an action run, plans the tracker that reports it to Port
/// ([`runs::plan`]).
/// What the time windows of a send's rule and destination say now.
enum Gate {
    Open,
    /// Held until then (unix ms).
    Hold(i64),
    Drop,
}

/// The windows of `rule` and `destination` at `now`: dropped when a closed one says so, else
/// held until both are open (the later of their openings).
fn windows(rs: &Ruleset, rule: &str, destination: &str, now: i64) -> Gate {
    let rule_w = rs
        .rules
        .iter()
        .find(|r| r.id == rule)
        .and_then(|r| r.window.as_ref());
    let dest_w = rs
        .destinations
        .get(destination)
        .and_then(|d| d.window.as_ref());
    let t = crate::window::at_ms(now);
    let mut until = now;
    for w in [rule_w, dest_w].into_iter().flatten() {
        if w.open_at(t) {
            continue;
        }
        if w.outside == crate::window::Outside::Drop {
            return Gate::Drop;
        }
        // A window that never opens holds for a week, then the message goes (rather than never).
        let open = w
            .next_open(t)
            .map(crate::window::ms)
            .unwrap_or(now + 7 * 24 * 3600 * 1000);
        until = until.max(open);
    }
    if until > now {
        Gate::Hold(until)
    } else {
        Gate::Open
    }
}

/// The job of a dispatch: its rendered message, or a dead letter when it failed to render;
/// `None` when a safety rule refused it.
pub fn job_of(d: crate::routing::Dispatch) -> Option<NewJob> {
    let error = match &d.message {
        Ok(_) => None,
        Err(DispatchError::Render(e)) => Some(e.clone()),
        Err(DispatchError::Refused(_)) => return None,
    };
    Some(NewJob {
        destination: d.destination,
        rule: d.rule,
        event_id: d.event_id,
        target: d.target,
        payload: d
            .message
            .unwrap_or(Payload::Message(serde_json::Value::Null)),
        secret: d.secret,
        throttle: d.throttle,
        error,
    })
}

fn plan(
    rs: &Ruleset,
    src: Option<&SourceEntry>,
    ev: &mut Event,
    silences: &crate::silence::SilenceSet,
) -> (Vec<NewJob>, Option<(String, NewTracker)>) {
    let dispatches = route_in_place(rs, ev);
    let mut jobs = Vec::new();
    let mut matched: Vec<String> = Vec::new();
    let now = crate::outbox::now_ms();
    for d in dispatches {
        metrics::counter!("switchyard_rule_matches_total", "rule" => d.rule.clone()).increment(1);
        if !matched.contains(&d.rule) {
            matched.push(d.rule.clone());
        }
        if !silences.is_empty() {
            let key = d.target.identity.as_ref().map(|i| i.key.as_str());
            if let Some(id) = silences.silenced(&d.rule, key, &ev.data, now) {
                metrics::counter!("switchyard_silenced_total", "rule" => d.rule.clone())
                    .increment(1);
                tracing::info!(rule = %d.rule, destination = %d.destination, event_id = %d.event_id, silence = id, "silenced");
                continue;
            }
        }
        let mut d = d;
        if rs.any_window {
            match windows(rs, &d.rule, &d.destination, now) {
                Gate::Open => {}
                Gate::Hold(until) => d.target.hold_until = Some(until),
                Gate::Drop => {
                    metrics::counter!("switchyard_muted_total", "rule" => d.rule.clone())
                        .increment(1);
                    tracing::info!(rule = %d.rule, destination = %d.destination, event_id = %d.event_id, "outside its time window; dropped");
                    continue;
                }
            }
        }
        match &d.message {
            Ok(_) => {}
            Err(DispatchError::Render(e)) => {
                tracing::warn!(rule = %d.rule, destination = %d.destination, event_id = %d.event_id, reason = %e, "template failed for this event; kept as a dead letter");
            }
            Err(DispatchError::Refused(e)) => {
                metrics::counter!("switchyard_refused_total", "rule" => d.rule.clone())
                    .increment(1);
                tracing::warn!(rule = %d.rule, destination = %d.destination, event_id = %d.event_id, reason = %e, "refused to send a secret notification");
            }
        }
        jobs.extend(job_of(d));
    }
    (jobs, runs::plan(rs, src, ev, &matched))
}
