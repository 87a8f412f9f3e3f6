//! Delivery: per-destination pacing, concurrency, retries and dead letters.
//!
//! Every job runs as its own task that: waits for the destination's rate limit (and, for the
//! Slack bot, the per-channel pace) *before* taking one of the destination's concurrency
//! permits, so a slow channel never holds a permit another channel could use; makes one attempt;
//! then records the outcome in the outbox. Transient failures are retried with exponential
//! backoff (`backon`'s schedule) and full jitter, never sooner than the upstream's
//! `Retry-After`; a job past its destination's `max_attempts` or `max_age` becomes a dead letter.
//! Destinations have separate limiters, permits and tasks, so one that is down or slow never
//! delays another.
//!
//! Shutdown: waiting tasks stop at once (their jobs stay pending in the outbox and resume on the
//! next start); a task in the middle of an attempt finishes that attempt and records it.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use futures_util::FutureExt;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::Rng;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;

use crate::config::DestinationConfig;
use crate::config::Ruleset;
use crate::destinations::{self, DeliveryError, Destination};
use crate::outbox::{now_ms, Job, KeyChange, Outbox, Outcome};

/// Counters of one destination, for `/status`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DestinationStats {
    pub kind: &'static str,
    /// Messages this process holds for the destination and has not finished: waiting for
    /// their pace, in an attempt, or waiting to retry.
    pub queued: u64,
    /// Of `queued`, those waiting for their next attempt after a failed one.
    pub retrying: u64,
    pub delivered: u64,
    pub failed_attempts: u64,
    pub dead_letters: u64,
    /// Of `queued`, those in an attempt now.
    pub in_flight: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_at: Option<i64>,
}

struct Worker {
    name: String,
    cfg: DestinationConfig,
    dest: Arc<dyn Destination>,
    limiter: Option<DefaultDirectRateLimiter>,
    keyed: Option<DefaultKeyedRateLimiter<String>>,
    permits: Semaphore,
    /// In a fleet: per pace key, the next slot reserved in the shared pace (unix µs) and how
    /// many of its block are left.
    fleet_slots: tokio::sync::Mutex<HashMap<String, (i64, i64)>>,
    stats: Mutex<DestinationStats>,
    metrics: WorkerMetrics,
}

/// This destination's metric handles, registered once (not looked up per message).
struct WorkerMetrics {
    duration: metrics::Histogram,
    /// Answer to committed outcome: the at-least-once window.
    commit: metrics::Histogram,
    delivered: metrics::Counter,
    retry: metrics::Counter,
    dead: metrics::Counter,
    dead_letters: metrics::Counter,
}

impl WorkerMetrics {
    fn new(name: &str) -> Self {
        let d = name.to_string();
        WorkerMetrics {
            duration: metrics::histogram!("switchyard_delivery_duration_seconds", "destination" => d.clone()),
            commit: metrics::histogram!("switchyard_outcome_commit_seconds", "destination" => d.clone()),
            delivered: metrics::counter!("switchyard_deliveries_total", "destination" => d.clone(), "outcome" => "delivered"),
            retry: metrics::counter!("switchyard_deliveries_total", "destination" => d.clone(), "outcome" => "retry"),
            dead: metrics::counter!("switchyard_deliveries_total", "destination" => d.clone(), "outcome" => "dead_letter"),
            dead_letters: metrics::counter!("switchyard_dead_letters_total", "destination" => d),
        }
    }
}

fn quota(rate: f64) -> Option<Quota> {
    if !(rate > 0.0 && rate.is_finite()) {
        return None;
    }
    let burst = NonZeroU32::new(rate.ceil().clamp(1.0, 10_000.0) as u32)?;
    Quota::with_period(Duration::from_secs_f64(1.0 / rate)).map(|q| q.allow_burst(burst))
}

impl Worker {
    fn new(cfg: &DestinationConfig, client: &reqwest::Client) -> Worker {
        let dest = destinations::build(cfg, client);
        // Paced per target (the Slack Web API: per channel) or as a whole.
        let per_channel = dest.paced_per_target();
        let q = cfg.rate_per_second.and_then(quota);
        Worker {
            name: cfg.name.clone(),
            cfg: cfg.clone(),
            dest,
            limiter: if per_channel {
                None
            } else {
                q.map(RateLimiter::direct)
            },
            keyed: if per_channel {
                q.map(RateLimiter::keyed)
            } else {
                None
            },
            permits: Semaphore::new(cfg.concurrency as usize),
            fleet_slots: tokio::sync::Mutex::new(HashMap::new()),
            stats: Mutex::new(DestinationStats {
                kind: cfg.kind.name(),
                ..Default::default()
            }),
            metrics: WorkerMetrics::new(&cfg.name),
        }
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, DestinationStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The delivery stage. Cheap to clone.
#[derive(Clone)]
pub struct Deliverer {
    inner: Arc<Inner>,
}

struct Inner {
    outbox: Outbox,
    client: reqwest::Client,
    workers: RwLock<HashMap<String, Arc<Worker>>>,
    /// The rules in force (the engine's, shared), read at each attempt: what destinations
    /// render with.
    rules: Arc<arc_swap::ArcSwap<Ruleset>>,
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    tracker: TaskTracker,
    /// The order of keyed jobs.
    turns: KeyTurns,
}

impl Deliverer {
    /// A deliverer writing outcomes to `outbox`, rendering with the rules `rules` holds.
    pub fn new(
        outbox: Outbox,
        rules: Arc<arc_swap::ArcSwap<Ruleset>>,
    ) -> Result<Deliverer, String> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(64)
            .connect_timeout(Duration::from_secs(5))
            // A redirect is answered, not followed: on 301/302/303 an HTTP client resends a POST
            // as a GET without its body, which the far end would answer 200 to, and the message
            // would count as delivered while nobody got it.
            .redirect(reqwest::redirect::Policy::none())
            // Retries are the delivery stage's (classified, with backoff, recorded in the
            // outbox). reqwest's own retry of refused HTTP/2 streams would copy every request
            // in case it is needed; a refused stream comes back as a transient error instead.
            .retry(reqwest::retry::never().max_retries_per_request(0))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let (stop_tx, stop_rx) = watch::channel(false);
        Ok(Deliverer {
            inner: Arc::new(Inner {
                outbox,
                client,
                workers: RwLock::new(HashMap::new()),
                rules,
                stop_tx,
                stop_rx,
                tracker: TaskTracker::new(),
                turns: KeyTurns::default(),
            }),
        })
    }

    /// Builds a worker per destination of the ruleset. Destinations whose settings did not
    /// change keep their worker (and its pacing state); removed ones are dropped, and jobs
    /// still addressed to them become dead letters when they come up.
    pub fn configure(&self, rs: &Arc<Ruleset>) {
        let mut workers = self
            .inner
            .workers
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let mut next = HashMap::new();
        for (name, cfg) in &rs.destinations {
            let same = workers.get(name).filter(|w| w.cfg == *cfg).cloned();
            let w = match same {
                Some(w) => w,
                None => Arc::new(Worker::new(cfg, &self.inner.client)),
            };
            next.insert(name.clone(), w);
        }
        *workers = next;
    }

    /// Starts delivering jobs (just committed, or pending from before a restart).
    pub fn submit(&self, jobs: Vec<Job>) {
        for job in jobs {
            // A grouped rule's item waits in the outbox for its digest; it is not delivered.
            if matches!(job.payload, crate::job::Payload::Group(_)) {
                continue;
            }
            let worker = self
                .inner
                .workers
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&job.destination)
                .cloned();
            let inner = self.inner.clone();
            let mut job = job;
            if let Some(w) = &worker {
                let queued = {
                    let mut st = w.stats();
                    st.queued += 1;
                    st.queued
                };
                if !job.text.is_empty() && w.dest.sends_stored(&job) {
                    job.keep_as_stored();
                } else if queued > COMPACT_AFTER.max(2 * u64::from(w.cfg.concurrency)) {
                    // Past what the destination can have in flight, the job will wait: it
                    // waits as its bytes, and is parsed again when its turn comes.
                    job.compact();
                }
            }
            let turn = KeyTurns::name(&job);
            if let Some(k) = &turn {
                self.inner.turns.join(k, job.id);
            }
            match worker {
                Some(w) => {
                    let id = job.id;
                    // Made and boxed here, not inside the task: an async block would keep
                    // the future it captured beside the one it awaits, and the job twice.
                    let attempt = Box::pin(
                        std::panic::AssertUnwindSafe(run(
                            inner.clone(),
                            w.clone(),
                            job,
                            turn.clone(),
                        ))
                        .catch_unwind(),
                    );
                    self.inner.tracker.spawn(async move {
                        let panicked = attempt.await.is_err();
                        w.stats().queued -= 1;
                        if panicked {
                            // A bug, not the job's fault or the destination's; the job alone
                            // pays for it, as a dead letter that can be replayed once fixed.
                            // Retrying would hit the same bug after every restart.
                            let error = "internal error while delivering this message (a bug in switchyard; the log has the panic)".to_string();
                            let destination = w.name.clone();
                            tracing::error!(destination = %destination, job = id, "{error}; kept as a dead letter");
                            metrics::counter!("switchyard_deliveries_total", "destination" => destination.clone(), "outcome" => "dead_letter").increment(1);
                            metrics::counter!("switchyard_dead_letters_total", "destination" => destination).increment(1);
                            Deliverer { inner: inner.clone() }.bury(id, error).await;
                        }
                        // Finished (its outcome committed): the next job of its key may go.
                        if let Some(k) = &turn {
                            inner.turns.leave(k, id);
                        }
                    });
                }
                None => {
                    self.inner.tracker.spawn(async move {
                        let error = format!("destination `{}` no longer exists in the rules", job.destination);
                        tracing::warn!(destination = %job.destination, rule = %job.rule, event_id = %job.event_id, "{error}; kept as a dead letter");
                        metrics::counter!("switchyard_deliveries_total", "destination" => job.destination.clone(), "outcome" => "dead_letter").increment(1);
                        metrics::counter!("switchyard_dead_letters_total", "destination" => job.destination.clone()).increment(1);
                        Deliverer { inner: inner.clone() }.bury(job.id, error).await;
                        if let Some(k) = &turn {
                            inner.turns.leave(k, job.id);
                        }
                    });
                }
            }
        }
    }

    /// Makes job `id` a dead letter without (another) attempt, and starts the jobs that
    /// creates (a run report when it was its event's last job).
    async fn bury(&self, id: i64, error: String) {
        let created = self.inner.outbox.finish(id, Outcome::Dead { error }).await;
        self.submit(created);
    }

    /// The user id of `email` as `destination` knows it (the Slack bot's cached
    /// `users.lookupByEmail`): how a button's `allow` list names people by email.
    pub async fn user_id_of(&self, destination: &str, email: &str) -> Result<String, String> {
        let w = self
            .inner
            .workers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(destination)
            .cloned()
            .ok_or_else(|| format!("no destination `{destination}`"))?;
        w.dest.user_id_of(email).await
    }

    /// Per-destination counters.
    pub fn stats(&self) -> Vec<(String, DestinationStats)> {
        let workers = self.inner.workers.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = workers
            .iter()
            .map(|(n, w)| (n.clone(), w.stats().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Stops: waiting jobs stay pending; attempts in progress finish, within `grace`.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        let _ = self.inner.stop_tx.send(true);
        self.inner.tracker.close();
        tokio::time::timeout(grace, self.inner.tracker.wait())
            .await
            .is_ok()
    }
}

/// One attempt at a keyed message: the message its key names now, read from the outbox, and
/// the destination acting on it. What became of the key is committed with the job's outcome.
async fn deliver_keyed(
    inner: &Inner,
    w: &Worker,
    job: &Job,
    id: &crate::job::Identity,
) -> Result<(Vec<crate::outbox::NewJob>, Option<KeyChange>), DeliveryError> {
    let current = inner
        .outbox
        .message_key(&w.name, &id.key)
        .await
        .map_err(|e| DeliveryError::Transient {
            reason: format!("cannot read the message of key `{}`: {e}", id.key),
            retry_after: None,
        })?;
    let effect = w.dest.deliver_keyed(job, current.as_ref()).await?;
    Ok((
        Vec::new(),
        effect.map(|change| KeyChange {
            destination: w.name.clone(),
            key: id.key.clone(),
            change,
        }),
    ))
}

/// A job that acts on Port for a Slack click, with the clicker's email filled in when the act
/// needs it (`run_as: clicker`, or emails on its `allow` list), looked up through the act's
/// `notify` Slack bot (`users.info`, cached). `None`: the job is delivered as it is. A lookup
/// that cannot succeed leaves the email unknown (the act then says so in the thread); one that
/// may succeed later is retried like any delivery.
async fn with_clicker_email(inner: &Inner, job: &Job) -> Result<Option<Job>, DeliveryError> {
    let crate::job::Payload::Act(act) = &job.payload else {
        return Ok(None);
    };
    let (crate::job::PortOp::Run(run), Some(click), Some(notify)) =
        (&act.op, &act.click, &act.notify)
    else {
        return Ok(None);
    };
    let clicker = run.run_as == crate::job::RunAs::Clicker;
    if click.email.is_some() || !crate::acts::needs_email(&run.allow, clicker) {
        return Ok(None);
    }
    let w = inner
        .workers
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(notify)
        .cloned();
    let Some(w) = w else {
        return Ok(None);
    };
    let email = match w.dest.email_of(&click.user).await {
        Ok(e) => Some(e),
        Err(DeliveryError::Permanent(reason)) => {
            tracing::warn!(user = %click.user, reason, "cannot learn the clicker's email");
            None
        }
        Err(e) => return Err(e),
    };
    let mut act = act.clone();
    if let Some(c) = act.click.as_mut() {
        c.email = email;
    }
    let mut job = job.clone();
    job.payload = crate::job::Payload::Act(act);
    Ok(Some(job))
}

/// The order of keyed jobs: the ids of the jobs this process holds for each key (destination and
/// key), so that one runs only when it is the oldest of its key. Without it a resolve retried
/// after a failed post, or two updates racing, would leave the key naming the wrong message.
#[derive(Default)]
struct KeyTurns {
    queues: Mutex<HashMap<String, std::collections::BTreeSet<i64>>>,
    turn: tokio::sync::Notify,
}

impl KeyTurns {
    fn name(job: &Job) -> Option<String> {
        job.target
            .identity
            .as_ref()
            .map(|id| format!("{}\u{1f}{}", job.destination, id.key))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, std::collections::BTreeSet<i64>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a job (in submit order, which is commit order).
    fn join(&self, key: &str, id: i64) {
        self.lock().entry(key.to_string()).or_default().insert(id);
    }

    /// Waits until `id` is the oldest job of `key`.
    async fn wait(&self, key: &str, id: i64) {
        loop {
            let notified = self.turn.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let first = self.lock().get(key).and_then(|q| q.first().copied());
            if first.is_none_or(|f| f >= id) {
                return;
            }
            notified.await;
        }
    }

    /// The job is finished (delivered, dead, or given back at shutdown): the next may go.
    fn leave(&self, key: &str, id: i64) {
        {
            let mut q = self.lock();
            if let Some(set) = q.get_mut(key) {
                set.remove(&id);
                if set.is_empty() {
                    q.remove(key);
                }
            }
        }
        self.turn.notify_waiters();
    }
}

/// A job counted in one of its destination's gauges (`in_flight`, `retrying`) until dropped,
/// also when the attempt panics and unwinds.
struct Counted<'a> {
    w: &'a Worker,
    field: fn(&mut DestinationStats) -> &mut u64,
}

impl<'a> Counted<'a> {
    fn enter(w: &'a Worker, field: fn(&mut DestinationStats) -> &mut u64) -> Counted<'a> {
        *field(&mut w.stats()) += 1;
        Counted { w, field }
    }

    /// An attempt in progress.
    fn in_flight(w: &'a Worker) -> Counted<'a> {
        Counted::enter(w, |s| &mut s.in_flight)
    }

    /// A job that has failed at least once and is not finished: waiting for its backoff, its
    /// pace or a permit, or in its next attempt.
    fn retrying(w: &'a Worker) -> Counted<'a> {
        Counted::enter(w, |s| &mut s.retrying)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        *(self.field)(&mut self.w.stats()) -= 1;
    }
}

/// Waits for `fut` unless shutdown is requested first; `None` on shutdown.
async fn or_stop<T>(
    stop: &mut watch::Receiver<bool>,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    if *stop.borrow() {
        return None;
    }
    tokio::select! {
        v = fut => Some(v),
        _ = stop.wait_for(|s| *s) => None,
    }
}

/// Waits for the destination's pace (its rate limit, per channel for the Slack bot); false on
/// shutdown. In a fleet the pace is the fleet's: each send reserves its slot in the shared
/// store, so N replicas together keep to the rate one would. Should the store not answer, the
/// replica paces on its own meanwhile (the rate then holds per replica).
async fn paced(
    inner: &Inner,
    w: &Worker,
    pace: Option<&String>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    if let (Some(fleet), Some(rate)) = (inner.outbox.fleet(), w.cfg.rate_per_second) {
        let key = match (&w.limiter, &w.keyed, pace) {
            (Some(_), _, _) => Some(w.name.clone()),
            (None, Some(_), Some(k)) => Some(format!("{}\u{1f}{k}", w.name)),
            _ => None,
        };
        if let Some(key) = key {
            // `None`: the store did not answer, and this replica paces alone meanwhile.
            if let Some(at) = fleet_slot(fleet, w, key, rate).await {
                let wait = at - chrono::Utc::now().timestamp_micros();
                if wait <= 0 {
                    return true;
                }
                return or_stop(stop, tokio::time::sleep(Duration::from_micros(wait as u64)))
                    .await
                    .is_some();
            }
        }
    }
    if let Some(l) = &w.limiter {
        if or_stop(stop, l.until_ready()).await.is_none() {
            return false;
        }
    }
    if let (Some(k), Some(l)) = (pace, &w.keyed) {
        if or_stop(stop, l.until_key_ready(k)).await.is_none() {
            return false;
        }
    }
    true
}

/// The time (unix µs) of this send's slot in the fleet's pace for `key`; `None` when the store
/// cannot reserve one now. Slots are reserved a tenth of a second's worth at a time (one at a
/// time below 20/s), so a fast destination costs the database one write per block, not one per
/// send; a block left unused is dropped once it falls behind, since its slots are the fleet's
/// past, not to be spent on top of the others' present ones.
async fn fleet_slot(
    fleet: &dyn crate::outbox::Fleet,
    w: &Worker,
    key: String,
    rate: f64,
) -> Option<i64> {
    let interval_us = (1_000_000.0 / rate).round().max(1.0) as i64;
    let burst = rate.ceil().clamp(1.0, 10_000.0) as i64;
    let block = (rate / 10.0).floor().clamp(1.0, 1_000.0) as i64;
    let mut blocks = w.fleet_slots.lock().await;
    let now_us = chrono::Utc::now().timestamp_micros();
    let b = blocks.entry(key.clone()).or_insert((0, 0));
    if b.1 > 0 && b.0 < now_us - interval_us {
        b.1 = 0;
    }
    if b.1 == 0 {
        match fleet.reserve(&key, interval_us, burst, block).await {
            Ok(first) => *b = (first, block),
            Err(e) => {
                tracing::warn!(destination = %w.name, error = %e, "cannot reserve a send in the fleet's pace; pacing this replica alone meanwhile");
                return None;
            }
        }
    }
    let at = b.0;
    b.0 += interval_us;
    b.1 -= 1;
    Some(at)
}

/// Jobs a destination holds before the next ones wait compacted (at least twice its
/// concurrency).
const COMPACT_AFTER: u64 = 256;

/// Delivers `job` to its end: delivered, dead, or left pending at shutdown. `turn` is its key's
/// name in [`KeyTurns`] (keyed jobs), as `submit` registered it.
///
/// A plain function returning an `async move` block, not an `async fn`: an `async fn` keeps its
/// arguments twice in its state (as arguments and as the locals they are bound to), and this
/// state is what every waiting job holds (960 bytes instead of 1,384).
#[allow(clippy::manual_async_fn)]
fn run(
    inner: Arc<Inner>,
    w: Arc<Worker>,
    mut job: Job,
    turn: Option<String>,
) -> impl std::future::Future<Output = ()> {
    async move {
        if let Some(reason) = &w.cfg.disabled {
            tracing::warn!(destination = %w.name, rule = %job.rule, event_id = %job.event_id, "{reason}; kept as a dead letter");
            // Every dead letter counts in both series, attempted or not, so that they agree.
            w.metrics.dead.increment(1);
            w.metrics.dead_letters.increment(1);
            w.stats().dead_letters += 1;
            let d = Deliverer { inner };
            let bury = Box::pin(d.bury(job.id, reason.clone()));
            bury.await;
            return;
        }
        let mut stop = inner.stop_rx.clone();
        let mut schedule = backon::ExponentialBuilder::default()
            .with_min_delay(w.cfg.retry_initial)
            .with_max_delay(w.cfg.retry_max)
            .with_factor(2.0)
            .without_max_times()
            .build();
        // Its turn and its window, when it has to wait for them (boxed: only such jobs carry
        // that state while they wait).
        // (`turn` is set for every keyed job, also the ones a fleet orders.)
        if turn.is_some() || job.target.hold_until.is_some() {
            let wait = Box::pin(turn_and_window(
                &inner,
                &w,
                &job,
                turn.as_deref(),
                &mut stop,
            ));
            if !wait.await {
                return;
            }
        }
        let mut attempts = job.attempts;
        // Resumed after a restart with attempts behind it: retrying from the start.
        let mut retrying = (attempts > 0).then(|| Counted::retrying(&w));
        let pace = w.dest.pace_key(&job);
        // Pacing is only waited for when there is a pace (boxed: its state is larger than the
        // rest of a waiting job's).
        let has_pace = w.limiter.is_some() || w.keyed.is_some() || inner.outbox.fleet().is_some();
        loop {
            if has_pace {
                let wait = Box::pin(paced(&inner, &w, pace.as_ref(), &mut stop));
                if !wait.await {
                    return;
                }
            }
            let Some(Ok(permit)) = or_stop(&mut stop, w.permits.acquire()).await else {
                return;
            };
            // The attempt's state (the destination's request, the outcome's commit) is boxed and
            // lives only while the attempt runs: a job waiting for its permit holds a small future.
            let one = Box::pin(attempt(&inner, &w, &mut job, permit, &mut attempts));
            let retry_after = match one.await {
                Next::Done => return,
                Next::Retry { retry_after } => retry_after,
            };
            // Full jitter over the exponential schedule, but never sooner than Retry-After.
            let step = schedule.next().unwrap_or(w.cfg.retry_max);
            let jittered =
                Duration::from_secs_f64(rand::rng().random_range(0.0..=step.as_secs_f64()));
            let delay = retry_after.map_or(jittered, |r| r.max(jittered));
            if retrying.is_none() {
                retrying = Some(Counted::retrying(&w));
            }
            let backoff = Box::pin(tokio::time::sleep(delay));
            if or_stop(&mut stop, backoff).await.is_none() {
                return;
            }
        }
    }
}

/// Waits until `job` may go: after the older jobs of its key (`turn`, and in a fleet the other
/// replicas' too), and not before its window opens. False on shutdown.
async fn turn_and_window(
    inner: &Inner,
    w: &Worker,
    job: &Job,
    turn: Option<&str>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    // A keyed job waits for the jobs of its key accepted before it.
    if let Some(k) = turn {
        if or_stop(stop, inner.turns.wait(k, job.id)).await.is_none() {
            return false;
        }
    }
    // In a fleet, also after the jobs of its key that other replicas hold.
    if let (Some(fleet), Some(id)) = (inner.outbox.fleet(), &job.target.identity) {
        loop {
            match fleet.older_keyed(&w.name, &id.key, job.id).await {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    tracing::warn!(destination = %w.name, key = %id.key, error = %e, "cannot learn whether older jobs of this key are queued; asking again");
                }
            }
            if or_stop(stop, tokio::time::sleep(Duration::from_millis(200)))
                .await
                .is_none()
            {
                return false;
            }
        }
    }
    // Sent outside its window: held until the window opens (the time is stored with the job,
    // so a restart keeps holding it).
    if let Some(until) = job.target.hold_until {
        let wait = until - now_ms();
        if wait > 0
            && or_stop(stop, tokio::time::sleep(Duration::from_millis(wait as u64)))
                .await
                .is_none()
        {
            return false;
        }
    }
    true
}

/// What follows an attempt.
enum Next {
    /// Delivered or dead (its outcome committed).
    Done,
    /// Failed and to be retried, not sooner than `retry_after` when the upstream said so.
    Retry { retry_after: Option<Duration> },
}

/// One attempt at `job` holding one of its destination's permits: the delivery, the outcome's
/// commit, and the start of the jobs it created.
async fn attempt(
    inner: &Arc<Inner>,
    w: &Arc<Worker>,
    job: &mut Job,
    permit: tokio::sync::SemaphorePermit<'_>,
    attempts: &mut u32,
) -> Next {
    // Its turn: the message as a tree again, if it waited compacted (not when it is sent as
    // its stored text).
    job.expand();
    let attempt = Counted::in_flight(w);
    let started = Instant::now();
    let mut result = match &job.target.identity {
        None => {
            let rules = inner.rules.load_full();
            match with_clicker_email(inner, job).await {
                Ok(Some(j)) => w.dest.deliver(&j, &rules).await,
                Ok(None) => w.dest.deliver(job, &rules).await,
                Err(e) => Err(e),
            }
            .map(|f| (f, None))
        }
        Some(id) => deliver_keyed(inner, w, job, id).await,
    };
    drop(permit);
    drop(attempt);
    w.metrics.duration.record(started.elapsed().as_secs_f64());
    *attempts += 1;
    let attempts = *attempts;
    let outcome = {
        let mut st = w.stats();
        match &mut result {
            Ok((follow_ups, key)) => {
                st.delivered += 1;
                Outcome::Delivered {
                    follow_ups: std::mem::take(follow_ups),
                    message: matches!(job.payload, crate::job::Payload::Message(_)),
                    key: key.take(),
                }
            }
            Err(e) => {
                st.failed_attempts += 1;
                st.last_error = Some(e.reason().to_string());
                st.last_error_at = Some(now_ms());
                // A message held for its window is as old as the time it was due.
                let due = job.target.hold_until.unwrap_or(0).max(job.created_at);
                let too_old = now_ms() - due > w.cfg.max_age.as_millis() as i64;
                match e {
                    DeliveryError::Permanent(r) => Outcome::Dead { error: r.clone() },
                    DeliveryError::Transient { reason, .. } if attempts >= w.cfg.max_attempts => {
                        Outcome::Dead {
                            error: format!("gave up after {attempts} attempts: {reason}"),
                        }
                    }
                    DeliveryError::Transient { reason, .. } if too_old => Outcome::Dead {
                        error: format!(
                            "older than max_age ({}s): {reason}",
                            w.cfg.max_age.as_secs()
                        ),
                    },
                    DeliveryError::Transient { reason, .. } => Outcome::Retry {
                        error: reason.clone(),
                    },
                }
            }
        }
    };
    match &outcome {
        Outcome::Delivered { .. } => {
            w.metrics.delivered.increment(1);
            tracing::debug!(destination = %w.name, rule = %job.rule, event_id = %job.event_id, attempts, "delivered");
        }
        Outcome::Dead { error } => {
            w.metrics.dead.increment(1);
            w.stats().dead_letters += 1;
            w.metrics.dead_letters.increment(1);
            tracing::warn!(destination = %w.name, rule = %job.rule, event_id = %job.event_id, attempts, reason = %error, "delivery failed permanently; kept as a dead letter");
        }
        Outcome::Retry { error } => {
            w.metrics.retry.increment(1);
            // Close to giving up (the last attempt, or the last tenth of `max_age`): WARN, so
            // an operator sees it coming before the dead letter.
            let age = now_ms() - job.created_at;
            let max_age = w.cfg.max_age.as_millis() as i64;
            if attempts + 1 >= w.cfg.max_attempts
                || age.saturating_mul(10) >= max_age.saturating_mul(9)
            {
                tracing::warn!(destination = %w.name, rule = %job.rule, event_id = %job.event_id, attempts, age_ms = age, reason = %error, "delivery failed; retrying, close to giving up");
            } else {
                tracing::info!(destination = %w.name, rule = %job.rule, event_id = %job.event_id, attempts, reason = %error, "delivery failed; will retry");
            }
        }
    }
    let retry_after = match &result {
        Err(DeliveryError::Transient { retry_after, .. }) => *retry_after,
        _ => None,
    };
    let again = matches!(outcome, Outcome::Retry { .. });
    let answered = Instant::now();
    let delivered = matches!(outcome, Outcome::Delivered { .. });
    let created = inner.outbox.finish(job.id, outcome).await;
    if delivered {
        w.metrics.commit.record(answered.elapsed().as_secs_f64());
    }
    if !created.is_empty() {
        Deliverer {
            inner: inner.clone(),
        }
        .submit(created);
    }
    if again {
        Next::Retry { retry_after }
    } else {
        Next::Done
    }
}
