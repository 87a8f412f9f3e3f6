//! The floor: a minimal forwarder that accepts a POST, answers 202, and makes one POST to the
//! sink. No verification, no rules, no storage: what the machine can do at best.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// The sink URL.
    #[arg(long)]
    sink: String,
    /// Forward as many messages as the engine's rules make of the event (three for a `three`
    /// event, none for `none`), for the one- and three-message mixes. Without it, one message
    /// per event, as the default mix's comparison has always been.
    #[arg(long)]
    per_kind: bool,
}

#[derive(Clone)]
struct St {
    client: reqwest::Client,
    sink: String,
    per_kind: bool,
}

async fn forward(State(st): State<St>, body: Bytes) -> StatusCode {
    // The same message the engine would send: the event's text first (for the e2e clock).
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let p = &v["diff"]["after"]["properties"];
    let n = if st.per_kind {
        switchyard_bench::messages_of(p["kind"].as_str().unwrap_or(""))
    } else {
        1
    };
    for i in 0..n {
        let msg = serde_json::json!({"text": format!("{} {}", p["sent_us"], v["context"]["entity"]), "blocks": [{"elements": [{"text": format!("floor seq {} #{i}", p["seq"])}]}]});
        let st = st.clone();
        tokio::spawn(async move {
            let _ = st.client.post(&st.sink).json(&msg).send().await;
        });
    }
    StatusCode::ACCEPTED
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let st = St {
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .build()
            .expect("client"),
        sink: a.sink,
        per_kind: a.per_kind,
    };
    let app = axum::Router::new()
        .fallback(axum::routing::post(forward))
        .with_state(st);
    switchyard_bench::serve(&a.listen, app).await;
}
