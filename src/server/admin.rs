//! Operator endpoints: `/status` (JSON, or HTML for a browser), `/metrics`, and the admin API
//! under `/-/` (reload, dead letters), which needs `Authorization: Bearer <admin token>`.
//! Nothing here ever shows a secret: sources and destinations are listed by name and kind only.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{reject, AppState, St};
use crate::outbox::DeadLetterFilter;
use crate::silence::NewSilence;

/// The most an admin request's body may hold: a dead-letter filter or a list of ids.
const ADMIN_BODY_LIMIT: usize = 64 * 1024;

/// The admin API's routes. The token is checked by a layer in front of them, so a request
/// without it is answered (401, or 403 when the API is disabled) before a byte of its body is
/// read; with it, bodies are read up to [`ADMIN_BODY_LIMIT`].
pub(super) fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/-/reload", post(reload))
        .route("/-/dead-letters", get(dead_letters))
        .route("/-/dead-letters/{id}", get(dead_letter))
        .route("/-/dead-letters/replay", post(replay))
        .route("/-/dead-letters/purge", post(purge))
        .route("/-/state", get(lifecycle_state))
        .route("/-/silences", get(silences).post(add_silence))
        .route("/-/silences/{id}/expire", post(expire_silence))
        .route_layer(axum::middleware::from_fn_with_state(state, require_token))
}

async fn require_token(State(st): St, req: Request, next: Next) -> Response {
    if let Err(r) = authorized(&st, req.headers()) {
        return r;
    }
    next.run(req).await
}

/// Reads an admin request's optional JSON filter (an empty body is the empty filter).
async fn filter_body(body: Body) -> Result<DlQuery, Response> {
    let bytes = axum::body::to_bytes(body, ADMIN_BODY_LIMIT)
        .await
        .map_err(|_| {
            reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("an admin request's body is at most {ADMIN_BODY_LIMIT} bytes"),
            )
        })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(DlQuery::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        reject(
            StatusCode::BAD_REQUEST,
            format!("the body is not a dead-letter filter: {e}"),
        )
    })
}

fn authorized(st: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = &st.cfg.admin_token else {
        return Err(reject(
            StatusCode::FORBIDDEN,
            "the admin API is disabled: start with SWITCHYARD_ADMIN_TOKEN set",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if crate::sources::secret_eq(given.as_bytes(), token.expose().as_bytes()) {
        Ok(())
    } else {
        Err(reject(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token",
        ))
    }
}

pub(super) async fn status_json(st: &AppState) -> Value {
    let rs = st.rules.load_full();
    // One read for every count; a store that cannot answer shows zeros, not an error page.
    let summary = st.outbox.summary().await.unwrap_or_default();
    let pending: std::collections::HashMap<String, i64> = summary.pending.into_iter().collect();
    let dead: std::collections::HashMap<String, i64> = summary.dead_letters.into_iter().collect();
    let stats = st.deliverer.stats();
    let destinations: serde_json::Map<String, Value> = rs
        .destinations
        .iter()
        .map(|(name, d)| {
            let s = stats
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.clone())
                .unwrap_or_default();
            (
                name.clone(),
                json!({
                    "kind": d.kind.name(),
                    "falls_back_to": if d.use_fallback { d.fallback.clone() } else { None },
                    "disabled_reason": d.disabled,
                    "rate_per_second": d.rate_per_second,
                    "queue_depth": pending.get(name).copied().unwrap_or(0),
                    "in_flight": s.in_flight,
                    "retrying": s.retrying,
                    "delivered": s.delivered,
                    "failed_attempts": s.failed_attempts,
                    "dead_letters": dead.get(name).copied().unwrap_or(0),
                    "last_error": s.last_error,
                    "last_error_at": s.last_error_at,
                }),
            )
        })
        .collect();
    let sources: serde_json::Map<String, Value> = rs
        .sources
        .iter()
        .map(|(n, s)| {
            let path = if s.kafka.is_some() {
                Value::Null
            } else {
                json!(format!("/hooks/{n}"))
            };
            (
                n.clone(),
                json!({"kind": s.kind, "path": path, "enabled": s.disabled.is_none(), "disabled_reason": s.disabled}),
            )
        })
        .collect();
    let now = chrono::Utc::now();
    let schedules: serde_json::Map<String, Value> = rs
        .schedules
        .iter()
        .map(|(n, s)| {
            let next = s.next_after(now);
            (
                n.clone(),
                json!({
                    "cron": s.pattern,
                    "timezone": s.tz.name(),
                    "next_run": next.map(|t| t.timestamp_millis()),
                    "next_run_local": next.map(|t| t.with_timezone(&s.tz).format("%a %Y-%m-%d %H:%M:%S %Z").to_string()),
                }),
            )
        })
        .collect();
    let rules: Vec<Value> = rs
        .rules
        .iter()
        .map(|r| json!({"id": r.id, "on": r.on, "file": r.file, "destinations": r.sends.iter().map(|s| s.to.clone()).collect::<Vec<_>>()}))
        .collect();
    let groups: Vec<Value> = st
        .outbox
        .pending_groups()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|g| {
            let rule = rs.rules.iter().find(|r| r.id == g.rule);
            let due = crate::digest::due_at(rule, &g);
            json!({"rule": g.rule, "group": g.group, "items": g.items, "first_at": g.first_at, "last_digest_at": g.last_flush, "due_at": due})
        })
        .collect();
    let reload = st.reload.lock().map(|r| r.clone()).ok();
    let uptime = st.started.elapsed();
    let shared_queue: i64 = pending.values().sum();
    let store = match st.outbox.fleet() {
        None => json!({"kind": "sqlite", "location": st.outbox.location()}),
        Some(f) => {
            let replicas = match f.replicas().await {
                Ok(r) => json!(r),
                Err(e) => json!({"error": e.to_string()}),
            };
            json!({
                "kind": "postgres",
                "location": st.outbox.location(),
                "replica": f.replica(),
                "lease_seconds": f.lease().as_secs_f64(),
                // Every replica's pending jobs, from the shared database.
                "queue_depth": shared_queue,
                "replicas": replicas,
            })
        }
    };
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "commit": env!("SWITCHYARD_GIT_COMMIT"),
        "ready": st.ready.load(Ordering::Relaxed),
        "now": now.timestamp_millis(),
        "started_at": now.timestamp_millis() - uptime.as_millis() as i64,
        "uptime_seconds": uptime.as_secs(),
        "rules_dir": st.cfg.rules_dir,
        "rules": rules,
        "sources": sources,
        "destinations": destinations,
        "schedules": schedules,
        "queue_depth": st.outbox.pending(),
        "store": store,
        "throttle": {
            "suppressed_since_start": st.pipeline.throttled(),
            "active_keys": summary.active_throttles,
        },
        "keys": {
            "open": summary.open_keys,
            // The first hundred, by destination and key (all of them: `GET /-/state`).
            "list": st.outbox.open_keys(100).await.unwrap_or_default().into_iter()
                .map(|(d, k, s)| json!({"destination": d, "key": k, "channel": s.channel, "ts": s.ts, "opened_at": s.opened_at}))
                .collect::<Vec<_>>(),
        },
        "silences": st.pipeline.silence_status(),
        "groups": groups,
        "reload": reload,
        "kafka": kafka_status(st),
    })
}

#[cfg(feature = "kafka")]
fn kafka_status(st: &AppState) -> Value {
    st.kafka.status()
}

#[cfg(not(feature = "kafka"))]
fn kafka_status(_: &AppState) -> Value {
    Value::Null
}

/// `GET /status`: the JSON, or the page rendered from it for a browser (`Accept: text/html`);
/// `?format=json` gives the JSON to a browser too.
pub(super) async fn status(State(st): St, uri: axum::http::Uri, headers: HeaderMap) -> Response {
    let v = status_json(&st).await;
    let json_asked = uri.query().is_some_and(|q| {
        form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "format" && v == "json")
    });
    let wants_html = !json_asked
        && headers
            .get(header::ACCEPT)
            .and_then(|a| a.to_str().ok())
            .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        Html(super::status_page::render(&v)).into_response()
    } else {
        Json(v).into_response()
    }
}

pub(super) async fn metrics(State(st): St) -> Response {
    // Gauges read at scrape time rather than kept up to date on the request path.
    for (name, s) in st.deliverer.stats() {
        metrics::gauge!("switchyard_queue_depth", "destination" => name.clone())
            .set(s.queued as f64);
        metrics::gauge!("switchyard_in_flight", "destination" => name).set(s.in_flight as f64);
    }
    st.process_metrics.collect();
    match &st.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics are not available in this process",
        ),
    }
}

async fn reload(State(st): St) -> Response {
    match super::reload::reload(&st, "POST /-/reload").await {
        Ok(n) => Json(json!({"ok": true, "rules": n})).into_response(),
        Err(diags) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"ok": false, "diagnostics": diags})),
        )
            .into_response(),
    }
}

/// Filters shared by the dead-letter endpoints.
#[derive(Debug, Default, Deserialize)]
pub(super) struct DlQuery {
    destination: Option<String>,
    rule: Option<String>,
    /// Unix ms.
    since: Option<i64>,
    until: Option<i64>,
    limit: Option<usize>,
    /// Specific ids (replay).
    #[serde(default)]
    ids: Vec<i64>,
}

impl DlQuery {
    fn filter(&self) -> DeadLetterFilter {
        DeadLetterFilter {
            destination: self.destination.clone(),
            rule: self.rule.clone(),
            since: self.since,
            until: self.until,
            limit: self.limit,
        }
    }
}

async fn dead_letters(State(st): St, q: Result<Query<DlQuery>, QueryRejection>) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return reject(StatusCode::BAD_REQUEST, e.body_text()),
    };
    match st.outbox.dead_letters(q.filter()).await {
        Ok(v) => Json(json!({"dead_letters": v})).into_response(),
        Err(e) => reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn dead_letter(State(st): St, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return reject(
            StatusCode::BAD_REQUEST,
            format!(
                "`{}` is not a dead-letter id (a number)",
                crate::render::blockkit::truncate_chars(&id, 40)
            ),
        );
    };
    match st.outbox.dead_letter(id).await {
        Ok(Some(d)) => Json(json!({"dead_letter": d})).into_response(),
        Ok(None) => reject(StatusCode::NOT_FOUND, format!("no dead letter {id}")),
        Err(e) => reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn replay(State(st): St, body: Body) -> Response {
    let q = match filter_body(body).await {
        Ok(q) => q,
        Err(r) => return r,
    };
    let ids = if q.ids.is_empty() {
        match st.outbox.dead_letters(q.filter()).await {
            Ok(v) => v.into_iter().map(|d| d.id).collect(),
            Err(e) => return reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    } else {
        q.ids.clone()
    };
    match st.outbox.replay(ids).await {
        Ok(done) => {
            let answer = done.to_json();
            st.deliverer.submit(done.jobs);
            Json(answer).into_response()
        }
        Err(e) => reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn purge(State(st): St, body: Body) -> Response {
    let q = match filter_body(body).await {
        Ok(q) => q,
        Err(r) => return r,
    };
    match st.outbox.purge(q.filter()).await {
        Ok(n) => Json(json!({"purged": n})).into_response(),
        Err(e) => reject(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `GET /-/silences[?ended_within=MS]`: the silences not over yet (and recently ended ones).
async fn silences(State(st): St, uri: axum::http::Uri) -> Response {
    let within = uri
        .query()
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "ended_within")
                .and_then(|(_, v)| v.parse::<i64>().ok())
        })
        .unwrap_or(0)
        .max(0);
    match st.outbox.silences(within).await {
        Ok(v) => Json(json!({"silences": v})).into_response(),
        Err(e) => reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `POST /-/silences` with a [`NewSilence`]: checked against the rules in force, stored, and in
/// force at once.
async fn add_silence(State(st): St, body: Body) -> Response {
    let bytes = match axum::body::to_bytes(body, ADMIN_BODY_LIMIT).await {
        Ok(b) => b,
        Err(_) => {
            return reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("an admin request's body is at most {ADMIN_BODY_LIMIT} bytes"),
            )
        }
    };
    let new: NewSilence = match serde_json::from_slice(&bytes) {
        Ok(n) => n,
        Err(e) => return reject(StatusCode::BAD_REQUEST, format!("not a silence: {e}")),
    };
    let rs = st.rules.load_full();
    let (starts, ends) = match new.validate(crate::outbox::now_ms(), |r| {
        rs.rules.iter().any(|x| x.id == r)
    }) {
        Ok(t) => t,
        Err(e) => return reject(StatusCode::BAD_REQUEST, e),
    };
    match st.outbox.add_silence(new, starts, ends).await {
        Ok(s) => {
            let _ = st.pipeline.load_silences().await;
            tracing::info!(silence = s.id, rule = ?s.rule, author = %s.author, "silence added");
            (StatusCode::CREATED, Json(json!({"silence": s}))).into_response()
        }
        Err(e) => reject(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `POST /-/silences/{id}/expire`: ends a silence now.
async fn expire_silence(State(st): St, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return reject(StatusCode::BAD_REQUEST, "a silence id is a number");
    };
    match st.outbox.expire_silence(id).await {
        Ok(Some(s)) => {
            let _ = st.pipeline.load_silences().await;
            tracing::info!(silence = id, "silence expired");
            Json(json!({"silence": s})).into_response()
        }
        Ok(None) => reject(StatusCode::NOT_FOUND, format!("no silence {id}")),
        Err(e) => reject(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `GET /-/state`: the lifecycle state the engine holds (open message keys, silences not over,
/// pending digest groups), as `switchyard simulate --state` reads it.
async fn lifecycle_state(State(st): St) -> Response {
    // Bounded like every answer: a state of more keys than this is cut, not streamed.
    let keys = match st.outbox.open_keys(10_000).await {
        Ok(k) => k,
        Err(e) => return reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let silences = st.outbox.silences(0).await.unwrap_or_default();
    let groups = st.outbox.pending_groups().await.unwrap_or_default();
    Json(json!({
        "keys": keys.into_iter().map(|(d, k, s)| json!({"destination": d, "key": k, "channel": s.channel, "ts": s.ts, "opened_at": s.opened_at})).collect::<Vec<_>>(),
        "silences": silences,
        "groups": groups,
    }))
    .into_response()
}
