//! Sends Port-signed events (fresh timestamp and signature per request) to 127.0.0.1 at a fixed
//! concurrency or a fixed rate, for a bounded time, and prints a JSON summary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;

#[derive(Parser)]
struct Args {
    /// Target, e.g. http://127.0.0.1:8080/hooks/port (loopback only).
    #[arg(long)]
    url: String,
    #[arg(long, default_value = "bench-secret")]
    secret: String,
    /// Concurrent requests in flight (closed loop).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Requests per second (open loop); overrides the closed loop when set.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// First sequence number (to keep bodies unique across runs).
    #[arg(long, default_value_t = 1)]
    start_seq: u64,
    /// Sign nothing (for the floor forwarder).
    #[arg(long)]
    unsigned: bool,
    /// Which events to send: the 70/20/10 mix, or one or three messages per event.
    #[arg(long, value_enum, default_value_t = switchyard_bench::Mix::Default)]
    mix: switchyard_bench::Mix,
}

/// What every request shares: the client, the target and the counters.
struct Load {
    client: reqwest::Client,
    url: String,
    secret: String,
    unsigned: bool,
    mix: switchyard_bench::Mix,
    seq: AtomicU64,
    hist: Mutex<Histogram<u64>>,
    ok: AtomicU64,
    failed: AtomicU64,
    expected_msgs: AtomicU64,
}

impl Load {
    /// Sends the next event of the mix and records its outcome and latency.
    async fn send_one(&self) {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let body = switchyard_bench::event_in(self.mix, n);
        let mut req = self
            .client
            .post(&self.url)
            .header("content-type", "application/json");
        if !self.unsigned {
            let ts = (switchyard_bench::now_us() / 1_000_000).to_string();
            let sig = switchyard::sources::port::sign(&self.secret, &ts, &body);
            req = req
                .header("x-port-timestamp", ts)
                .header("x-port-signature", sig);
        }
        let t = Instant::now();
        let r = req.body(body).send().await;
        let us = t.elapsed().as_micros() as u64;
        match r {
            Ok(resp) if resp.status().as_u16() == 202 => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                let msgs = switchyard_bench::messages_of(switchyard_bench::kind_in(self.mix, n));
                self.expected_msgs.fetch_add(msgs, Ordering::Relaxed);
                if let Ok(mut h) = self.hist.lock() {
                    let _ = h.record(us.max(1));
                }
            }
            _ => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = Args::parse();
    let host = a
        .url
        .split("//")
        .nth(1)
        .unwrap_or("")
        .split(['/', ':'])
        .next()
        .unwrap_or("");
    if !(host == "127.0.0.1" || host == "localhost" || host == "[::1]") {
        eprintln!("refusing to send load to {host}: loopback only");
        std::process::exit(2);
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .expect("client");
    let load = Arc::new(Load {
        client,
        url: a.url.clone(),
        secret: a.secret.clone(),
        unsigned: a.unsigned,
        mix: a.mix,
        seq: AtomicU64::new(a.start_seq),
        hist: Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram")),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        expected_msgs: AtomicU64::new(0),
    });
    let deadline = Instant::now() + Duration::from_secs_f64(a.duration);
    let started = Instant::now();

    match a.rate {
        Some(rate) => {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut tasks = tokio::task::JoinSet::new();
            while Instant::now() < deadline {
                tick.tick().await;
                let load = load.clone();
                tasks.spawn(async move { load.send_one().await });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
        None => {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..a.concurrency {
                let load = load.clone();
                tasks.spawn(async move {
                    while Instant::now() < deadline {
                        load.send_one().await;
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let h = load.hist.lock().map(|h| h.clone()).expect("histogram");
    let accepted = load.ok.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "accepted": accepted,
            "failed": load.failed.load(Ordering::Relaxed),
            "expected_messages": load.expected_msgs.load(Ordering::Relaxed),
            "seconds": elapsed,
            "accepted_per_s": accepted as f64 / elapsed,
            "latency_us": {"p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99), "p999": h.value_at_quantile(0.999), "max": h.max()},
            "next_seq": load.seq.load(Ordering::Relaxed),
        })
    );
}
