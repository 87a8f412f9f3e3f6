//! `switchyard serve`: the HTTP ingress, wired to the pipeline.
//!
//! `POST /hooks/<source>[/<token>]` runs, in order: source lookup (404), enabled (503),
//! content type (415), body size (413), verification on the raw bytes (401), decoding (400/422),
//! routing (pure), and the durable enqueue; it answers 202 only after the commit. Nothing is
//! queued for a rejected request. The handler never waits for Slack.
//!
//! The ruleset is an `ArcSwap`: a request loads the current `Arc<Ruleset>` once and finishes on
//! it, while a reload (file watcher, `SIGHUP`, `POST /-/reload`) compiles the new one off the
//! request path and swaps it in atomically. An invalid edit is rejected whole.

mod admin;
pub mod body;
mod listen;
mod reload;
mod series;
mod status_page;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::config::secret::Secret;
use crate::config::{load_dir, LoadOptions, Mode, Ruleset};
use crate::deliver::Deliverer;
use crate::ingest::{Accepted, Pipeline};
use crate::outbox::{EnqueueError, Outbox};
use crate::sources::{Decoded, Headers, Request};

pub use listen::ConnLimits;
pub use reload::ReloadStatus;

/// Settings of `serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub rules_dir: PathBuf,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// A PostgreSQL URL: the outbox is that database, shared with the other replicas, and
    /// `data_dir` is not used. `None`: SQLite in `data_dir`.
    pub store: Option<Secret>,
    /// PostgreSQL: how long after a replica's last heartbeat its jobs are taken over.
    pub lease: Duration,
    /// Most deliveries waiting before new events get 503.
    pub max_pending: usize,
    /// Token for `/-/…` admin endpoints; `None` disables them.
    pub admin_token: Option<Secret>,
    /// How long shutdown waits for attempts in progress.
    pub grace: Duration,
    /// Watch the rules directory and reload on change.
    pub watch: bool,
    /// Bounds on connections and request bodies.
    pub limits: ConnLimits,
}

/// Shared state of a running server.
pub struct AppState {
    /// The rules in force; shared with the pipeline, swapped whole by a reload.
    pub rules: Arc<ArcSwap<Ruleset>>,
    /// The ingest stage every source ends in.
    pub pipeline: Arc<Pipeline>,
    pub outbox: Outbox,
    pub deliverer: Deliverer,
    pub cfg: ServeConfig,
    pub ready: AtomicBool,
    pub reload: Mutex<ReloadStatus>,
    pub started: Instant,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Kafka consumers of `port_kafka` sources.
    #[cfg(feature = "kafka")]
    pub kafka: crate::sources::port_kafka::Consumers,
    /// Serialises reloads.
    reload_lock: tokio::sync::Mutex<()>,
    /// Metric handles of the request path.
    source_metrics: MetricHandles,
    /// Request-body bytes the engine may hold at once ([`ConnLimits::max_body_bytes_in_flight`]).
    body_budget: Arc<tokio::sync::Semaphore>,
    /// `process_*` series, read at each scrape.
    process_metrics: metrics_process::Collector,
}

type St = State<Arc<AppState>>;

fn reject(status: StatusCode, reason: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"accepted": false, "reason": reason.into()})),
    )
        .into_response()
}

fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let buckets = [
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &buckets)
        .ok()?;
    builder.install_recorder().ok()
}

/// Loads the rules, opens the outbox, resumes pending deliveries and serves until SIGTERM or
/// SIGINT. Returns an error (with diagnostics already printed) when it cannot start.
pub async fn serve(cfg: ServeConfig) -> Result<(), String> {
    let opts = LoadOptions::new(Mode::Serve);
    let dir = cfg.rules_dir.clone();
    let (rs, diags) = tokio::task::spawn_blocking(move || load_dir(&dir, &opts))
        .await
        .map_err(|e| e.to_string())?;
    for d in &diags {
        if d.is_error() {
            tracing::error!("{}", d.one_line());
        } else {
            tracing::warn!("{}", d.one_line());
        }
    }
    let Some(rs) = rs else {
        return Err(format!(
            "the rules in {} do not load ({} errors); run `switchyard check {}`",
            cfg.rules_dir.display(),
            diags.iter().filter(|d| d.is_error()).count(),
            cfg.rules_dir.display()
        ));
    };
    let rs = Arc::new(rs);
    // Before the deliverer: its workers take their metric handles when they are built.
    let metrics = install_metrics();
    series::describe();
    series::reloaded(true);
    if let Some(h) = metrics.clone() {
        // The exporter keeps every histogram observation until upkeep folds it into the
        // buckets; without this an engine nobody scrapes grows by ~60 KB/s at 5,000 events/s
        // (found by the 5-minute soak at that rate).
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                h.run_upkeep();
            }
        });
    }
    let outbox = Outbox::open_store(
        cfg.store.as_ref(),
        &cfg.data_dir,
        cfg.max_pending,
        cfg.lease,
    )
    .await?;
    let rules = Arc::new(ArcSwap::new(rs.clone()));
    let deliverer = Deliverer::new(outbox.clone(), rules.clone())?;
    deliverer.configure(&rs);
    let pending = outbox.load_pending().await?;
    if !pending.is_empty() {
        tracing::info!(count = pending.len(), "resuming pending deliveries");
    }
    deliverer.submit(pending);

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let pipeline = Arc::new(Pipeline::new(
        rules.clone(),
        outbox.clone(),
        deliverer.clone(),
    ));
    let state = Arc::new(AppState {
        rules,
        pipeline,
        outbox,
        deliverer: deliverer.clone(),
        cfg: cfg.clone(),
        ready: AtomicBool::new(true),
        reload: Mutex::new(ReloadStatus::initial(&rs, &diags)),
        started: Instant::now(),
        metrics,
        #[cfg(feature = "kafka")]
        kafka: crate::sources::port_kafka::Consumers::default(),
        reload_lock: tokio::sync::Mutex::new(()),
        source_metrics: MetricHandles::default(),
        body_budget: Arc::new(tokio::sync::Semaphore::new(
            cfg.limits
                .max_body_bytes_in_flight
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        )),
        process_metrics: series::process_collector(),
    });
    if let Err(e) = state.pipeline.load_silences().await {
        tracing::error!(error = %e, "cannot read the silences; none is in force until one is added");
    }
    for (name, s) in &rs.sources {
        // Its series exist (at zero) from start, not from the first request.
        state.source_metrics.get(name);
        match &s.disabled {
            None => tracing::info!(source = %name, kind = %s.kind, "accepting POST /hooks/{name}"),
            Some(why) => tracing::warn!(source = %name, "{why}; POST /hooks/{name} answers 503"),
        }
    }
    tracing::info!(%addr, rules = rs.rules.len(), data = %state.outbox.location(), "switchyard listening on http://{addr}");
    let beating = state.outbox.fleet().map(|f| {
        tracing::info!(replica = %f.replica(), lease_s = f.lease().as_secs_f64(), "sharing the outbox with the other replicas");
        tokio::spawn(heartbeat(state.clone()))
    });
    reload::spawn_triggers(state.clone());
    tokio::spawn(crate::sources::schedule::run(state.pipeline.clone()));
    tokio::spawn(crate::digest::run(state.pipeline.clone()));
    #[cfg(feature = "kafka")]
    state.kafka.configure(&state.pipeline);
    #[cfg(not(feature = "kafka"))]
    if rs.sources.values().any(|s| s.kafka.is_some()) {
        tracing::error!(
            "this build has no Kafka support (cargo feature `kafka`): Kafka sources do not run"
        );
    }

    let app = router(state.clone());
    let shutdown = async {
        shutdown_signal().await;
        tracing::info!("shutting down: no new requests; finishing in-flight work");
    };
    listen::serve(listener, app, &cfg.limits, shutdown, cfg.grace).await;
    state.ready.store(false, Ordering::Relaxed);
    #[cfg(feature = "kafka")]
    state.kafka.shutdown().await;
    // The heartbeat goes on while attempts finish (their jobs stay this replica's), and stops
    // before the jobs are given back: a later one would take them again.
    let clean = deliverer.shutdown(cfg.grace).await;
    if let Some(b) = beating {
        b.abort();
        let _ = b.await;
    }
    if let (true, Some(f)) = (clean, state.outbox.fleet()) {
        // Every attempt has finished and recorded its outcome: the jobs still held (waiting
        // for a retry or their pace) go back to the fleet now, not after the lease.
        match f.release().await {
            Ok(n) => tracing::info!(jobs = n, "gave this replica's jobs back to the fleet"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot give this replica's jobs back; the other replicas take them after the lease")
            }
        }
    }
    if clean {
        tracing::info!(
            "stopped; undelivered messages stay queued in {}",
            state.outbox.location()
        );
    } else {
        tracing::warn!("grace period over with attempts still running; their messages stay queued and are retried on the next start");
    }
    Ok(())
}

/// A fleet replica's heartbeat: five times per lease it renews the lease of every job it
/// holds, takes over the jobs of replicas that stopped beating and delivers them, and reads the
/// silences again (another replica, or a Snooze click it answered, may have added one).
async fn heartbeat(state: Arc<AppState>) {
    let (outbox, deliverer) = (&state.outbox, &state.deliverer);
    let Some(lease) = outbox.fleet().map(|f| f.lease()) else {
        return;
    };
    let every = (lease / 5).max(Duration::from_millis(200));
    let mut failing = false;
    loop {
        tokio::time::sleep(every).await;
        let Some(f) = outbox.fleet() else { return };
        match f.beat().await {
            Ok(jobs) => {
                if failing {
                    tracing::info!("heartbeat recorded again");
                    failing = false;
                }
                deliverer.submit(jobs);
                if let Err(e) = state.pipeline.load_silences().await {
                    tracing::warn!(error = %e, "cannot read the fleet's silences; those in force stay");
                }
            }
            Err(e) => {
                if !failing {
                    tracing::error!(error = %e, "cannot record this replica's heartbeat; past the lease the other replicas take over its jobs");
                }
                failing = true;
            }
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The HTTP routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/hooks/{source}", post(hook))
        .route("/hooks/{source}/{token}", post(hook_with_token))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        // The names Prometheus-ecosystem tools probe (Alertmanager's, Prometheus').
        .route(
            "/-/healthy",
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .route("/-/ready", get(readyz))
        .route("/status", get(admin::status))
        .route(
            "/",
            get(|| async { axum::response::Redirect::to("/status") }),
        )
        .route("/metrics", get(admin::metrics))
        .merge(admin::routes(state.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::disable())
        // A panic in a handler is a bug; it costs that request a 500 with a JSON reason, not
        // the connection without an answer.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            handler_panicked,
        ))
        .with_state(state)
}

/// The answer to a body that could not be read.
fn body_refusal(source: &str, e: body::BodyError) -> Response {
    use body::BodyError;
    match e {
        BodyError::TooLarge(max) => reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is over the {max} byte limit"),
        ),
        BodyError::TooSlow(t) => {
            tracing::warn!(source = %source, "rejected: body not complete within {}s", t.as_secs());
            reject(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {}s", t.as_secs()),
            )
        }
        BodyError::Busy => {
            tracing::warn!(source = %source, "rejected: too many request-body bytes in memory");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                Json(json!({"accepted": false, "reason": "the engine holds as many request bodies as it allows; retry shortly"})),
            )
                .into_response()
        }
        BodyError::Broken => reject(
            StatusCode::BAD_REQUEST,
            "the body broke off or is malformed",
        ),
    }
}

fn handler_panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked (a bug in switchyard); answered 500");
    reject(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error (a bug in switchyard; the log has the details); retry later",
    )
}

async fn not_found(uri: axum::http::Uri) -> Response {
    reject(
        StatusCode::NOT_FOUND,
        format!(
            "no such endpoint `{}`: webhooks go to POST /hooks/<source>",
            crate::render::blockkit::truncate_chars(uri.path(), 200)
        ),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    reject(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on `{}`",
            crate::render::blockkit::truncate_chars(uri.path(), 200)
        ),
    )
}

async fn readyz(State(st): St) -> Response {
    if st.ready.load(Ordering::Relaxed) {
        Json(json!({"status": "ready", "rules": st.rules.load().rules.len()})).into_response()
    } else {
        reject(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    }
}

async fn hook(st: St, Path(source): Path<String>, headers: HeaderMap, body: Body) -> Response {
    handle(st, source, None, headers, body).await
}

async fn hook_with_token(
    st: St,
    Path((source, token)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(st, source, Some(token), headers, body).await
}

/// What became of a request, as `switchyard_events_total{outcome}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Accepted,
    Unmatched,
    Duplicate,
    Rejected,
    Unauthorized,
    Acknowledged,
    Disabled,
    Overloaded,
    Error,
    UnknownSource,
}

impl Verdict {
    /// Every verdict a configured source can get.
    const OF_SOURCE: [Verdict; 9] = [
        Verdict::Accepted,
        Verdict::Unmatched,
        Verdict::Duplicate,
        Verdict::Rejected,
        Verdict::Unauthorized,
        Verdict::Acknowledged,
        Verdict::Disabled,
        Verdict::Overloaded,
        Verdict::Error,
    ];

    /// The metric label.
    fn label(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Unmatched => "unmatched",
            Verdict::Duplicate => "duplicate",
            Verdict::Rejected => "rejected",
            Verdict::Unauthorized => "unauthorized",
            Verdict::Acknowledged => "acknowledged",
            Verdict::Disabled => "disabled",
            Verdict::Overloaded => "overloaded",
            Verdict::Error => "error",
            Verdict::UnknownSource => "unknown_source",
        }
    }
}

fn count(source: &str, outcome: Verdict) {
    metrics::counter!("switchyard_events_total", "source" => source.to_string(), "outcome" => outcome.label()).increment(1);
}

/// The request path's metric handles for one configured source, registered once, so a request
/// never hashes a label set or reads the registry (bench/PROFILE.md).
struct SourceMetrics {
    source: String,
    /// `switchyard_events_total{source, outcome}` for each verdict, in [`Verdict::OF_SOURCE`].
    events: Vec<(Verdict, metrics::Counter)>,
    ingest: metrics::Histogram,
}

impl SourceMetrics {
    fn new(source: &str) -> SourceMetrics {
        SourceMetrics {
            source: source.to_string(),
            events: Verdict::OF_SOURCE
                .iter()
                .map(|o| {
                    let c = metrics::counter!("switchyard_events_total", "source" => source.to_string(), "outcome" => o.label());
                    (*o, c)
                })
                .collect(),
            ingest: metrics::histogram!("switchyard_ingest_duration_seconds", "source" => source.to_string()),
        }
    }

    fn count(&self, outcome: Verdict) {
        match self.events.iter().find(|(o, _)| *o == outcome) {
            Some((_, c)) => c.increment(1),
            None => count(&self.source, outcome),
        }
    }
}

/// `SourceMetrics` by configured source name. Only names found in the ruleset get an entry,
/// so a caller posting to made-up sources cannot grow it.
#[derive(Default)]
struct MetricHandles(std::sync::RwLock<std::collections::HashMap<String, Arc<SourceMetrics>>>);

impl MetricHandles {
    fn get(&self, source: &str) -> Arc<SourceMetrics> {
        let found = self
            .0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(source)
            .cloned();
        found.unwrap_or_else(|| {
            let m = Arc::new(SourceMetrics::new(source));
            self.0
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(source.to_string(), m.clone());
            m
        })
    }
}

async fn handle(
    State(st): St,
    source: String,
    token: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    // One ruleset for the whole request, even if a reload swaps in another meanwhile.
    let rs = st.rules.load_full();
    let Some(src) = rs.sources.get(&source) else {
        count("unknown", Verdict::UnknownSource);
        return reject(StatusCode::NOT_FOUND, format!("no source named `{source}`"));
    };
    let m = st.source_metrics.get(&source);
    if token.is_some() && !src.source.takes_path_token() {
        m.count(Verdict::Rejected);
        return reject(
            StatusCode::NOT_FOUND,
            format!(
                "source `{source}` is served at /hooks/{source}; it takes no token in its path"
            ),
        );
    }
    if src.kafka.is_some() {
        m.count(Verdict::Rejected);
        return reject(
            StatusCode::NOT_FOUND,
            format!("source `{source}` reads from Kafka; it takes no HTTP requests"),
        );
    }
    if let Some(why) = &src.disabled {
        m.count(Verdict::Disabled);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "60")],
            Json(json!({"accepted": false, "reason": why})),
        )
            .into_response();
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ct_base = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if !src.source.content_types().contains(&ct_base.as_str()) {
        m.count(Verdict::Rejected);
        let want = src.source.content_types().join(" or ");
        tracing::warn!(source = %source, content_type = %ct, "rejected: wrong content type");
        return reject(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type must be {want}, got `{ct}`"),
        );
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > src.max_body) {
        m.count(Verdict::Rejected);
        return reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is over the {} byte limit", src.max_body),
        );
    }
    let read = body::read(
        body,
        src.max_body,
        &st.body_budget,
        st.cfg.limits.body_timeout,
    )
    .await;
    let held = match read {
        Ok(b) => b,
        Err(e) => {
            m.count(if e == body::BodyError::Busy {
                Verdict::Overloaded
            } else {
                Verdict::Rejected
            });
            return body_refusal(&source, e);
        }
    };
    let bytes: &Bytes = &held.bytes;
    let mut req = Request {
        headers: Headers::Http(&headers),
        body: bytes,
        path_token: token,
        signed: None,
    };
    let now = chrono::Utc::now().timestamp();
    match src.source.verify(&req, now) {
        Ok(signed) => req.signed = signed,
        Err(r) => {
            m.count(Verdict::Unauthorized);
            tracing::warn!(source = %source, reason = r.reason(), "rejected: verification failed");
            return reject(StatusCode::UNAUTHORIZED, r.reason());
        }
    }
    let mut ev = match src.source.decode(&source, &req) {
        Ok(Decoded::Event(ev)) => ev,
        Ok(Decoded::Ack) => {
            m.count(Verdict::Acknowledged);
            return StatusCode::OK.into_response();
        }
        Err(r) => {
            m.count(Verdict::Rejected);
            tracing::warn!(source = %source, status = r.status(), reason = r.reason(), "rejected: cannot decode");
            let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_REQUEST);
            return reject(status, r.reason());
        }
    };
    let result = st
        .pipeline
        .accept(&rs, Some(src), &mut ev, src.dedup_window)
        .await;
    m.ingest.record(started.elapsed().as_secs_f64());
    let slack = src.kind == crate::config::SourceKind::Slack;
    match result {
        Ok(Accepted::Committed {
            dispatches: n,
            throttled,
            matched,
        }) => {
            m.count(if matched {
                Verdict::Accepted
            } else {
                Verdict::Unmatched
            });
            tracing::info!(source = %source, event_type = %ev.event_type, event_id = %ev.id, dispatches = n, throttled, "accepted");
            if slack {
                // Slack wants an empty 200 within 3 s.
                return StatusCode::OK.into_response();
            }
            // The JSON written directly: this answer goes out for every event, and building it
            // as a map first cost more than the rest of the response.
            let id = serde_json::to_string(&ev.id).unwrap_or_default();
            (
                StatusCode::ACCEPTED,
                [(header::CONTENT_TYPE, "application/json")],
                format!(r#"{{"accepted":true,"event_id":{id},"dispatches":{n},"throttled":{throttled}}}"#),
            )
                .into_response()
        }
        Ok(Accepted::Duplicate) => {
            m.count(Verdict::Duplicate);
            tracing::info!(source = %source, event_id = %ev.id, "duplicate delivery; already accepted");
            if slack {
                return StatusCode::OK.into_response();
            }
            (StatusCode::ACCEPTED, Json(json!({"accepted": true, "duplicate": true, "event_id": ev.id, "dispatches": 0}))).into_response()
        }
        Err(EnqueueError::Full { pending }) => {
            m.count(Verdict::Overloaded);
            tracing::warn!(source = %source, pending, "outbox full; asking the sender to retry");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "30")],
                Json(json!({"accepted": false, "reason": format!("{pending} deliveries are waiting; retry later")})),
            )
                .into_response()
        }
        Err(EnqueueError::Storage(e)) => {
            m.count(Verdict::Error);
            tracing::error!(source = %source, error = %e, "cannot commit to the outbox");
            // Nothing was stored, so nothing is acknowledged; the sender keeps the event and
            // retries (Port and Coder do), by when the store may be back.
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                Json(json!({"accepted": false, "reason": "the outbox cannot be written; retry later"})),
            )
                .into_response()
        }
    }
}
