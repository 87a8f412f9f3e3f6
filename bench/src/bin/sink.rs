//! A fake Slack incoming webhook on 127.0.0.1 that counts and timestamps what arrives.
//! `GET /stats` answers JSON (messages, unique, duplicates, rate, end-to-end latency from the
//! `sent_us` at the start of each message's text); `POST /reset` clears. Faults can be injected:
//! a share of 500s and of 429s with `Retry-After: 1`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use clap::Parser;
use hdrhistogram::Histogram;
use rand::Rng;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Share of requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Share of requests answered 429 with Retry-After: 1.
    #[arg(long, default_value_t = 0.0)]
    throttle_rate: f64,
}

struct Stats {
    messages: u64,
    seen: HashSet<String>,
    duplicates: u64,
    faults: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    e2e: Histogram<u64>,
}

#[derive(Clone)]
struct St {
    stats: Arc<Mutex<Stats>>,
    fail_rate: f64,
    throttle_rate: f64,
}

async fn hook(State(st): State<St>, body: Bytes) -> Response {
    let roll: f64 = rand::rng().random();
    if roll < st.fail_rate {
        if let Ok(mut s) = st.stats.lock() {
            s.faults += 1;
        }
        return (StatusCode::INTERNAL_SERVER_ERROR, "rollup_error").into_response();
    }
    if roll < st.fail_rate + st.throttle_rate {
        if let Ok(mut s) = st.stats.lock() {
            s.faults += 1;
        }
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "rate_limited",
        )
            .into_response();
    }
    let now_us = switchyard_bench::now_us();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let text = v["text"].as_str().unwrap_or("").to_string();
    let sent: u64 = text
        .split(' ')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(now_us);
    // The last block's first element names the rule and the sequence number.
    let last = v["blocks"]
        .as_array()
        .and_then(|b| b.last())
        .cloned()
        .unwrap_or_default();
    let key = format!(
        "{text}|{}",
        last["elements"][0]["text"].as_str().unwrap_or("")
    );
    if let Ok(mut s) = st.stats.lock() {
        let now = Instant::now();
        s.first.get_or_insert(now);
        s.last = Some(now);
        s.messages += 1;
        if !s.seen.insert(key) {
            s.duplicates += 1;
        }
        let _ = s.e2e.record(now_us.saturating_sub(sent).max(1));
    }
    (StatusCode::OK, "ok").into_response()
}

async fn stats(State(st): State<St>) -> Json<serde_json::Value> {
    let s = st.stats.lock().expect("stats");
    let secs = match (s.first, s.last) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    Json(serde_json::json!({
        "messages": s.messages,
        "unique": s.seen.len(),
        "duplicates": s.duplicates,
        "faults_injected": s.faults,
        "seconds": secs,
        "per_s": if secs > 0.0 { s.messages as f64 / secs } else { 0.0 },
        "e2e_us": {"p50": s.e2e.value_at_quantile(0.5), "p99": s.e2e.value_at_quantile(0.99), "max": s.e2e.max()},
    }))
}

async fn reset(State(st): State<St>) -> Json<serde_json::Value> {
    if let Ok(mut s) = st.stats.lock() {
        s.messages = 0;
        s.seen.clear();
        s.duplicates = 0;
        s.faults = 0;
        s.first = None;
        s.last = None;
        s.e2e.reset();
    }
    Json(serde_json::json!({"reset": true}))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = Args::parse();
    let st = St {
        stats: Arc::new(Mutex::new(Stats {
            messages: 0,
            seen: HashSet::new(),
            duplicates: 0,
            faults: 0,
            first: None,
            last: None,
            e2e: Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram"),
        })),
        fail_rate: a.fail_rate,
        throttle_rate: a.throttle_rate,
    };
    let app = axum::Router::new()
        .route("/stats", get(stats))
        .route("/reset", post(reset))
        .fallback(post(hook))
        .with_state(st);
    switchyard_bench::serve(&a.listen, app).await;
}
