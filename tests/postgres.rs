//! Several replicas on one PostgreSQL: the real engine binary, three at a time on 127.0.0.1,
//! sharing a database made for each test (and dropped after it) on the PostgreSQL server at
//! `SWITCHYARD_TEST_PG` (default `postgres://postgres@127.0.0.1:5432/test`). Where no server
//! answers, the tests say they were skipped, except under CI, where they fail.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::{server_url, TestDb};
use common::slack::FakeSlack;
use common::{eventually, fixture, Engine, Fake, Received};
use serde_json::{json, Value};

const SECRET: &str = "fleet-port-secret";
const HOOK: &str = "/hook";
const CODER_TOKEN: &str = "fleet-coder-token";

/// A distinct changelog body per `seq`, for entity `entity`.
fn event(seq: usize, entity: &str) -> Vec<u8> {
    common::changelog(seq, entity)
}

fn sources() -> &'static str {
    "sources:\n  port: { port: { client_secret: \"${PORT_CLIENT_SECRET}\" } }\n  coder: { coder: { token: \"${CODER_WEBHOOK_TOKEN}\" } }\n"
}

/// A Slack webhook that answers `failure` while `failing` is set, and 200 once it is not.
async fn switchable_slack(failing: &Arc<AtomicBool>, failure: (u16, &'static str)) -> Fake {
    let f = failing.clone();
    Fake::start(move |_, _| {
        if f.load(Ordering::Relaxed) {
            (failure.0, vec![], failure.1.into())
        } else {
            (200, vec![], "ok".into())
        }
    })
    .await
}

/// Rules sending `m <seq>` for every entity update to the webhook destination `alerts` at
/// `url`, with `settings` (YAML lines) on the destination.
fn message_rules(url: &str, settings: &str) -> String {
    format!(
        "{}destinations:\n  alerts:\n    slack_webhook: {{ url: \"{url}\" }}\n    rate_per_second: 1000\n{settings}rules:\n  - id: any\n    on: port/entity.updated\n    send: [{{ to: alerts, text: \"m {{{{after.properties.seq}}}}\" }}]\n",
        sources()
    )
}

const FAST_RETRIES: &str =
    "    retry_initial: 50ms\n    retry_max: 300ms\n    max_attempts: 100000\n";

/// Starts `n` replicas on `rules` sharing `db`, all at once (their migrations race, under the
/// advisory lock).
async fn fleet(db: &TestDb, n: usize, rules: &str, env: &[(&str, &str)]) -> Vec<Engine> {
    let mut starting = Vec::new();
    for _ in 0..n {
        let (tmp, dir) = Engine::workspace(&[("rules.yaml", rules)], false);
        let mut all: Vec<(String, String)> = vec![
            ("PORT_CLIENT_SECRET".into(), SECRET.into()),
            ("CODER_WEBHOOK_TOKEN".into(), CODER_TOKEN.into()),
            ("SWITCHYARD_DATABASE_URL".into(), db.url.clone()),
            ("SWITCHYARD_LEASE".into(), "2s".into()),
            ("SWITCHYARD_GRACE_SECONDS".into(), "2".into()),
        ];
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        starting.push(tokio::spawn(async move {
            let env: Vec<(&str, &str)> =
                all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            Engine::start(tmp, dir, &env).await
        }));
    }
    let mut out = Vec::new();
    for s in starting {
        out.push(s.await.unwrap());
    }
    out
}

fn texts(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| r.json()["text"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Posts a Port event to the replicas in turn, starting at `first`, as a load balancer would:
/// a replica that does not answer (killed) is skipped. `Some(index)` of the replica that
/// accepted it (202), `None` when none did.
async fn post_spread(engines: &[Engine], first: usize, body: &[u8]) -> Option<usize> {
    for k in 0..engines.len() {
        let i = (first + k) % engines.len();
        let e = &engines[i];
        if e.child.is_none() {
            continue;
        }
        let sig_ts = chrono::Utc::now().timestamp_millis().to_string();
        let sig = switchyard::sources::port::sign(SECRET, &sig_ts, body);
        let r = reqwest::Client::new()
            .post(e.url("/hooks/port"))
            .header("content-type", "application/json")
            .header("x-port-timestamp", &sig_ts)
            .header("x-port-signature", &sig)
            .body(body.to_vec())
            .timeout(Duration::from_secs(15))
            .send()
            .await;
        if let Ok(r) = r {
            if r.status() == 202 {
                return Some(i);
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_deliver_every_accepted_event_after_one_is_killed_while_slack_fails() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let failing = Arc::new(AtomicBool::new(true));
    let slack = switchable_slack(&failing, (503, "unavailable")).await;
    let rules = message_rules(&slack.url(HOOK), FAST_RETRIES);
    let mut engines = fleet(&db, 3, &rules, &[]).await;
    let status = engines[0].get_json("/status").await;
    assert_eq!(status["store"]["kind"], "postgres", "{status}");
    assert_eq!(
        status["store"]["replicas"].as_array().map(Vec::len),
        Some(3),
        "every replica's heartbeat is visible: {status}"
    );
    let page = engines[0].get_html("/status").await;
    assert!(page.contains("<h2 id=store>Replicas</h2>"), "{page}");
    for r in status["store"]["replicas"].as_array().unwrap() {
        assert!(page.contains(r["id"].as_str().unwrap()), "{page}");
    }

    // A burst spread over the replicas; replica 1 is killed (-9) in the middle of it, with
    // the jobs it accepted leased to it and failing.
    let mut accepted = Vec::new();
    let mut by_replica = [0usize; 3];
    for seq in 0..240 {
        if seq == 120 {
            engines[1].kill();
        }
        if let Some(i) = post_spread(&engines, seq % 3, &event(seq, "svc")).await {
            accepted.push(seq);
            by_replica[i] += 1;
        }
    }
    assert_eq!(accepted.len(), 240, "every event found a live replica");
    assert!(
        by_replica[1] >= 30,
        "the killed replica held jobs: {by_replica:?}"
    );
    // Slack recovers: the survivors deliver their own jobs and, after the lease, the dead one's.
    failing.store(false, Ordering::Relaxed);
    let want: HashSet<String> = accepted.iter().map(|s| format!("m {s}")).collect();
    let delivered = eventually(60, "every accepted event's message", || {
        let ok: Vec<Received> = slack
            .on_path(HOOK)
            .into_iter()
            .filter(|r| !texts(std::slice::from_ref(r))[0].is_empty())
            .collect();
        let got: HashSet<String> = texts(&ok).into_iter().collect();
        want.is_subset(&got).then_some(ok)
    })
    .await;
    eprintln!(
        "fleet kill test: {} requests to Slack in all (failures included) for {} messages; accepted by replica {by_replica:?}",
        delivered.len(),
        want.len()
    );
    eventually(30, "an empty shared queue", || {
        (common::block_on(db.query_i64("SELECT count(*) FROM outbox")) == 0).then_some(())
    })
    .await;
    let log = engines[0].logs() + &engines[2].logs();
    assert!(
        log.contains("took over jobs no live replica holds"),
        "a survivor took over the killed replica's jobs"
    );
    for e in engines.iter_mut() {
        e.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_delivered_during_a_kill_is_sent_at_most_once_more() {
    // The at-least-once window: Slack answered 200, the outcome is not committed yet. A kill in
    // that window is the only way to a duplicate; each message is delivered, and duplicates
    // are at most the attempts in flight at the kill (the destination's concurrency, 4).
    let Some(db) = TestDb::new().await else {
        return;
    };
    let slack = Fake::start(|_, _| (200, vec![], "ok".into())).await;
    let rules = message_rules(
        &slack.url(HOOK),
        "    retry_initial: 50ms\n    retry_max: 300ms\n",
    );
    let mut engines = fleet(&db, 3, &rules, &[]).await;
    let mut accepted = 0;
    for seq in 0..300 {
        if seq == 150 {
            engines[2].kill();
        }
        if post_spread(&engines, seq % 3, &event(seq, "svc"))
            .await
            .is_some()
        {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 300);
    let want: HashSet<String> = (0..300).map(|s| format!("m {s}")).collect();
    eventually(60, "every message", || {
        let got: HashSet<String> = texts(&slack.on_path(HOOK)).into_iter().collect();
        want.is_subset(&got).then_some(())
    })
    .await;
    eventually(30, "an empty shared queue", || {
        (common::block_on(db.query_i64("SELECT count(*) FROM outbox")) == 0).then_some(())
    })
    .await;
    let all = texts(&slack.on_path(HOOK));
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &all {
        *counts.entry(t.as_str()).or_default() += 1;
    }
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "at-least-once window: {duplicates} duplicate(s) of 300 messages after a kill -9 mid-burst"
    );
    assert!(
        duplicates <= 4,
        "{duplicates} duplicates: more than the attempts one replica has in flight"
    );
    for e in engines.iter_mut() {
        e.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_coder_msg_id_posted_to_two_replicas_is_sent_once() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let slack = Fake::start(|r: &Received, _| {
        let ok = |v: Value| {
            (
                200,
                vec![("content-type".to_string(), "application/json".to_string())],
                v.to_string(),
            )
        };
        match r.path.as_str() {
            "/api/users.lookupByEmail" => ok(json!({"ok": true, "user": {"id": "U05LHPP95C"}})),
            "/api/chat.postMessage" => {
                ok(json!({"ok": true, "channel": "D1", "ts": "1789999760.000200"}))
            }
            _ => (404, vec![], "not found".into()),
        }
    })
    .await;
    let rules = format!(
        "{}destinations:\n  bot:\n    slack: {{ token: \"xoxb-fleet\", api_url: \"{}\" }}\nrules:\n  - id: dm\n    on: coder/notification\n    send: [{{ to: bot, user_email: \"{{{{user.email}}}}\", text: \"coder {{{{user.email}}}}\" }}]\n",
        sources(),
        slack.url("/api/")
    );
    let mut engines = fleet(&db, 2, &rules, &[]).await;
    let body = fixture("coder/workspace-deleted.json");
    let path = format!("/hooks/coder/{CODER_TOKEN}");
    let headers = [("content-type", "application/json")];
    // The same notification (Coder's retry) to both replicas at once.
    let (a, b) = tokio::join!(
        engines[0].post(&path, &body, &headers),
        engines[1].post(&path, &body, &headers)
    );
    assert_eq!((a.0, b.0), (202, 202), "{} {}", a.1, b.1);
    let dispatched =
        a.1["dispatches"].as_u64().unwrap_or(0) + b.1["dispatches"].as_u64().unwrap_or(0);
    assert_eq!(
        dispatched, 1,
        "one replica queued it, the other saw a duplicate: {} {}",
        a.1, b.1
    );
    assert!(a.1["duplicate"] == true || b.1["duplicate"] == true);
    slack.wait_for("/api/chat.postMessage", 1, 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(slack.on_path("/api/chat.postMessage").len(), 1);
    // Later, to the other replica again: still a duplicate (the window is shared).
    let (s, r) = engines[1].post(&path, &body, &headers).await;
    assert_eq!((s, r["duplicate"].clone()), (202, json!(true)), "{r}");
    for e in engines.iter_mut() {
        e.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttle_holds_across_replicas() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let slack = Fake::slack_ok().await;
    let rules = format!(
        "{}destinations:\n  alerts:\n    slack_webhook: {{ url: \"{}\" }}\n    rate_per_second: 1000\nrules:\n  - id: hot\n    on: port/entity.updated\n    throttle: {{ key: \"{{{{entity.identifier}}}}\", window: 1h }}\n    send: [{{ to: alerts, text: \"hot {{{{entity.identifier}}}}\" }}]\n",
        sources(),
        slack.url(HOOK)
    );
    let mut engines = fleet(&db, 3, &rules, &[]).await;
    let mut results = Vec::new();
    for (i, e) in engines.iter().enumerate() {
        let (_, r) = e.post_port("port", SECRET, &event(i, "svc-t")).await;
        results.push((r["dispatches"].clone(), r["throttled"].clone()));
    }
    assert_eq!(
        results,
        vec![
            (json!(1), json!(0)),
            (json!(0), json!(1)),
            (json!(0), json!(1))
        ],
        "the first replica's send holds the key for all of them"
    );
    let (_, other) = engines[2]
        .post_port("port", SECRET, &event(9, "svc-other"))
        .await;
    assert_eq!(other["dispatches"], 1, "another key is not throttled");
    slack.wait_for(HOOK, 2, 10).await;
    let status = engines[1].get_json("/status").await;
    assert_eq!(status["throttle"]["active_keys"], 2, "{status}");
    for e in engines.iter_mut() {
        e.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schedule_fires_once_per_tick_across_the_fleet() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let slack = Fake::slack_ok().await;
    let rules = format!(
        "{}schedules:\n  every-second: {{ cron: \"* * * * * *\" }}\ndestinations:\n  alerts:\n    slack_webhook: {{ url: \"{}\" }}\n    rate_per_second: 1000\nrules:\n  - id: tick\n    on: schedule/every-second\n    send: [{{ to: alerts, text: \"tick {{{{tick}}}}\" }}]\n",
        sources(),
        slack.url(HOOK)
    );
    let mut engines = fleet(&db, 3, &rules, &[]).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    for e in engines.iter_mut() {
        e.terminate();
    }
    let ticks = texts(&slack.on_path(HOOK));
    let distinct: HashSet<&String> = ticks.iter().collect();
    assert!(ticks.len() >= 3, "the schedule fired: {ticks:?}");
    assert_eq!(
        ticks.len(),
        distinct.len(),
        "each tick fired once, not once per replica: {ticks:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slack_pace_of_one_per_second_per_channel_holds_for_the_fleet() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let slack = FakeSlack::start().await;
    // The Slack bot's default pace: 1 message per second per channel.
    let rules = format!(
        "{}destinations:\n  bot:\n    slack: {{ token: \"xoxb-fleet\", api_url: \"{}\" }}\nrules:\n  - id: page\n    on: port/entity.updated\n    send: [{{ to: bot, channel: \"#ops\", text: \"p {{{{after.properties.seq}}}}\" }}]\n",
        sources(),
        slack.api_url()
    );
    let mut engines = fleet(&db, 3, &rules, &[]).await;
    let started = Instant::now();
    let bodies: Vec<Vec<u8>> = (0..6).map(|seq| event(seq, "svc")).collect();
    let mut posts = Vec::new();
    for (seq, body) in bodies.iter().enumerate() {
        posts.push(engines[seq % 3].post_port("port", SECRET, body));
    }
    for (s, r) in futures_util::future::join_all(posts).await {
        assert_eq!(s, 202, "{r}");
    }
    let sent = eventually(30, "six messages", || {
        let m = slack.fake.on_path("/api/chat.postMessage");
        (m.len() >= 6).then_some(m)
    })
    .await;
    let mut at: Vec<Instant> = sent.iter().map(|r| r.at).collect();
    at.sort();
    let gaps: Vec<u128> = at.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
    eprintln!(
        "fleet pace: gaps between sends to #ops {gaps:?} ms, all within {:?}",
        started.elapsed()
    );
    // One per second for the fleet (a burst of one): five intervals take five seconds, whichever
    // replicas sent them. Three replicas pacing alone would send three at once.
    let span = (at[5] - at[0]).as_millis();
    if span < 4_800 {
        for e in &engines {
            eprintln!(
                "{}",
                e.logs()
                    .lines()
                    .filter(|l| l.contains("pace") || l.contains("ERROR"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    assert!(span >= 4_800, "six sends spanned {span} ms: gaps {gaps:?}");
    // Slots are a second apart; a send the machine delays may land closer to the next one,
    // but three within a second would take a slot reserved twice.
    assert!(
        at.windows(3).all(|w| (w[2] - w[0]).as_millis() >= 1_000),
        "three sends within a second: gaps {gaps:?}"
    );
    for e in engines.iter_mut() {
        e.terminate();
    }
}

/// A TCP proxy between the engine and PostgreSQL that can be cut (every connection closed,
/// new ones refused at once) and restored, to take the database away from a running engine.
struct Cuttable {
    addr: std::net::SocketAddr,
    cut: Arc<AtomicBool>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Cuttable {
    async fn start(to: std::net::SocketAddr) -> Cuttable {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (c, g) = (cut.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if c.load(Ordering::Relaxed) {
                    drop(inbound);
                    continue;
                }
                let born = g.load(Ordering::Relaxed);
                let g = g.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    let watch = async {
                        while g.load(Ordering::Relaxed) == born {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! {
                        _ = copy => {},
                        _ = watch => {},
                    }
                });
            }
        });
        Cuttable {
            addr,
            cut,
            generation,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_unreachable_answers_503_with_retry_after_and_delivery_resumes() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let pg_addr: std::net::SocketAddr = {
        let u = server_url();
        let host_port = u
            .split('@')
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or("127.0.0.1:5432")
            .to_string();
        tokio::net::lookup_host(host_port)
            .await
            .unwrap()
            .next()
            .unwrap()
    };
    let proxy = Cuttable::start(pg_addr).await;
    let via_proxy = db
        .url
        .replacen(&pg_addr.to_string(), &proxy.addr.to_string(), 1)
        .replacen(
            &format!("localhost:{}", pg_addr.port()),
            &proxy.addr.to_string(),
            1,
        );
    assert_ne!(via_proxy, db.url, "the URL goes through the proxy");
    let failing = Arc::new(AtomicBool::new(true));
    let slack = switchable_slack(&failing, (503, "unavailable")).await;
    let rules = message_rules(&slack.url(HOOK), FAST_RETRIES);
    let (tmp, dir) = Engine::workspace(&[("rules.yaml", rules.as_str())], false);
    let mut e = Engine::start(
        tmp,
        dir,
        &[
            ("PORT_CLIENT_SECRET", SECRET),
            ("SWITCHYARD_DATABASE_URL", via_proxy.as_str()),
            ("SWITCHYARD_LEASE", "2s"),
        ],
    )
    .await;
    // Accepted while the database is there; Slack fails, so the job stays queued.
    let (s, r) = e.post_port("port", SECRET, &event(1, "svc")).await;
    assert_eq!(s, 202, "{r}");
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The database is gone: nothing is acknowledged.
    let started = Instant::now();
    let ts = chrono::Utc::now().timestamp_millis().to_string();
    let resp = reqwest::Client::new()
        .post(e.url("/hooks/port"))
        .header("content-type", "application/json")
        .header("x-port-timestamp", &ts)
        .header(
            "x-port-signature",
            switchyard::sources::port::sign(SECRET, &ts, &event(2, "svc")),
        )
        .body(event(2, "svc"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("5"));
    assert_eq!(body["accepted"], false, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "answered within the call bound: {:?}",
        started.elapsed()
    );
    // Slack recovers while the database is still away: the first message goes out, and its
    // outcome waits for the database.
    failing.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.restore();
    let (s, r) = e.post_port("port", SECRET, &event(3, "svc")).await;
    assert_eq!(s, 202, "accepted again once the database is back: {r}");
    eventually(30, "messages 1 and 3", || {
        let t = texts(&slack.on_path(HOOK));
        (t.contains(&"m 1".to_string()) && t.contains(&"m 3".to_string())).then_some(())
    })
    .await;
    assert!(
        !texts(&slack.on_path(HOOK)).contains(&"m 2".to_string()),
        "the refused event was not queued"
    );
    eventually(30, "an empty shared queue", || {
        (common::block_on(db.query_i64("SELECT count(*) FROM outbox")) == 0).then_some(())
    })
    .await;
    e.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_stopped_with_sigterm_gives_its_messages_back_at_once() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let failing = Arc::new(AtomicBool::new(true));
    let slack = switchable_slack(&failing, (503, "unavailable")).await;
    let rules = message_rules(
        &slack.url(HOOK),
        "    retry_initial: 50ms\n    retry_max: 300ms\n",
    );
    // A lease of a minute: only the hand-back can move the messages within the test.
    let mut engines = fleet(&db, 2, &rules, &[("SWITCHYARD_LEASE", "60s")]).await;
    for seq in 0..5 {
        let (s, r) = engines[0]
            .post_port("port", SECRET, &event(seq, "svc"))
            .await;
        assert_eq!(s, 202, "{r}");
    }
    engines[0].terminate();
    assert!(
        engines[0]
            .logs()
            .contains("gave this replica's jobs back to the fleet jobs=5"),
        "{}",
        engines[0].logs()
    );
    failing.store(false, Ordering::Relaxed);
    let started = Instant::now();
    // Taken at the other replica's next heartbeat (every fifth of the lease: 12 s here).
    eventually(20, "the five messages, from the other replica", || {
        let ok: Vec<Received> = slack
            .on_path(HOOK)
            .into_iter()
            .filter(|r| r.at >= started)
            .collect();
        let t: HashSet<String> = texts(&ok).into_iter().collect();
        (0..5).all(|s| t.contains(&format!("m {s}"))).then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "well within the lease of 60 s"
    );
    engines[1].terminate();
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env_remove("SWITCHYARD_DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_replays_a_fleets_dead_letters_and_silences_every_replica() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let broken = Arc::new(AtomicBool::new(true));
    let slack = switchable_slack(&broken, (404, "no_service")).await;
    let rules = message_rules(&slack.url(HOOK), "");
    let mut engines = fleet(&db, 2, &rules, &[]).await;
    let (s, r) = engines[0].post_port("port", SECRET, &event(1, "svc")).await;
    assert_eq!(s, 202, "{r}");
    eventually(10, "a dead letter", || {
        (common::block_on(db.query_i64("SELECT count(*) FROM dead_letters")) == 1).then_some(())
    })
    .await;
    let (ok, listed) = cli(&[
        "dead-letters",
        "list",
        "--store",
        &db.url,
        "--format",
        "json",
    ]);
    assert!(ok, "{listed}");
    assert!(
        listed.contains("no_service") || listed.contains("404"),
        "{listed}"
    );
    assert!(
        !listed.contains("postgres://"),
        "the URL is not printed: {listed}"
    );
    // Fixed: replayed from the command line, delivered by a running replica.
    broken.store(false, Ordering::Relaxed);
    let (ok, out) = cli(&["dead-letters", "replay", "--store", &db.url]);
    assert!(ok, "{out}");
    eventually(15, "the replayed message", || {
        texts(&slack.on_path(HOOK))
            .iter()
            .any(|t| t == "m 1")
            .then_some(())
    })
    .await;
    // A silence added from the command line holds on every replica within a heartbeat.
    let (ok, out) = cli(&[
        "silence",
        "add",
        "--store",
        &db.url,
        "--rule",
        "any",
        "--for",
        "1h",
        "--author",
        "ops",
        "--rules",
        engines[0].rules.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for (i, e) in engines.iter().enumerate() {
        let (s, r) = e.post_port("port", SECRET, &event(10 + i, "svc")).await;
        assert_eq!(
            (s, r["dispatches"].clone()),
            (202, json!(0)),
            "replica {i}: {r}"
        );
    }
    let (ok, out) = cli(&["silence", "list", "--store", &db.url]);
    assert!(ok && out.contains("ops"), "{out}");
    let (ok, out) = cli(&["dead-letters", "list", "--store", "mysql://x"]);
    assert!(!ok && out.contains("postgres://"), "a clear refusal: {out}");
    for e in engines.iter_mut() {
        e.terminate();
    }
}

// ---- The store itself, through the library: what the engine tests above do not reach. ----

mod store {
    use crate::common::pg::TestDb;
    use serde_json::json;
    use std::time::Duration;
    use switchyard::config::secret::Secret;
    use switchyard::job::{GroupItem, Identity, KeyAction, NewJob, Payload, ReportSpec, Target};
    use switchyard::outbox::postgres::PgStore;
    use switchyard::outbox::{
        DeadLetterFilter, Enqueued, Fleet, Job, KeyChange, KeyEffect, NewTracker, Outcome, Store,
    };

    async fn open(db: &TestDb, lease_ms: u64) -> PgStore {
        PgStore::connect(
            &Secret::new(db.url.clone()),
            Duration::from_millis(lease_ms),
        )
        .await
        .unwrap()
    }

    fn job(event: &str, text: &str) -> NewJob {
        NewJob {
            destination: "alerts".into(),
            rule: "r".into(),
            event_id: event.into(),
            target: Target::default(),
            payload: Payload::Message(json!({"text": text})),
            secret: false,
            throttle: None,
            error: None,
        }
    }

    fn committed(e: Enqueued) -> Vec<Job> {
        match e {
            Enqueued::Committed(jobs, _) => jobs,
            Enqueued::Duplicate => panic!("a duplicate"),
        }
    }

    fn delivered() -> Outcome {
        Outcome::Delivered {
            follow_ups: vec![],
            message: true,
            key: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_letters_replay_under_their_old_id_and_purge() {
        let Some(db) = TestDb::new().await else {
            return;
        };
        let s = open(&db, 5_000).await;
        let j = committed(s.enqueue(None, vec![job("e1", "a")], None).await.unwrap());
        s.finish(
            j[0].id,
            Outcome::Retry {
                error: "503".into(),
            },
        )
        .await;
        s.finish(
            j[0].id,
            Outcome::Dead {
                error: "gone".into(),
            },
        )
        .await;
        let dead = s.dead_letters(DeadLetterFilter::default()).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].attempts.len(), 2, "{:?}", dead[0].attempts);
        assert_eq!(dead[0].last_error, "gone");
        let id = dead[0].id;
        let r = s.replay(vec![id, 999]).await.unwrap();
        assert_eq!(r.requeued.len(), 1);
        assert_eq!(r.skipped.len(), 1);
        s.finish(
            r.jobs[0].id,
            Outcome::Dead {
                error: "again".into(),
            },
        )
        .await;
        let dead = s.dead_letters(DeadLetterFilter::default()).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            dead[0].id, id,
            "a replayed message that dies again keeps its id"
        );
        assert_eq!(dead[0].attempts.len(), 3, "both lives' attempts");
        assert!(s.dead_letter(id).await.unwrap().is_some());
        assert_eq!(s.purge(DeadLetterFilter::default()).await.unwrap(), 1);
        assert_eq!(s.pending(), 0);
        // A secret message's dead letter keeps no text.
        let mut secret = job("e2", "code 123456");
        secret.secret = true;
        let j = committed(s.enqueue(None, vec![secret], None).await.unwrap());
        s.finish(j[0].id, Outcome::Dead { error: "no".into() })
            .await;
        let dead = s.dead_letters(DeadLetterFilter::default()).await.unwrap();
        assert!(!dead[0].message.to_string().contains("123456"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_silences_and_run_reports_are_shared() {
        let Some(db) = TestDb::new().await else {
            return;
        };
        let (a, b) = (open(&db, 5_000).await, open(&db, 5_000).await);
        // A keyed message opened through one replica is seen by the other.
        let mut keyed = job("k1", "up");
        keyed.target.identity = Some(Identity {
            key: "health:api".into(),
            action: KeyAction::Post,
            ttl_secs: 3600,
        });
        let j = committed(a.enqueue(None, vec![keyed], None).await.unwrap());
        assert!(b
            .older_keyed("alerts", "health:api", j[0].id + 1)
            .await
            .unwrap());
        let open_key = KeyChange {
            destination: "alerts".into(),
            key: "health:api".into(),
            change: KeyEffect::Open {
                channel: "C1".into(),
                ts: "1.2".into(),
                ttl_ms: 3_600_000,
            },
        };
        a.finish(
            j[0].id,
            Outcome::Delivered {
                follow_ups: vec![],
                message: true,
                key: Some(open_key),
            },
        )
        .await;
        assert!(!b
            .older_keyed("alerts", "health:api", j[0].id + 1)
            .await
            .unwrap());
        let k = b
            .message_key("alerts", "health:api")
            .await
            .unwrap()
            .unwrap();
        assert_eq!((k.channel.as_str(), k.ts.as_str()), ("C1", "1.2"));
        assert_eq!(b.open_keys(10).await.unwrap().len(), 1);
        // Silences.
        let sil = a
            .add_silence(
                serde_json::from_value(json!({"rule": "r", "author": "ops", "comment": "deploy"}))
                    .unwrap(),
                0,
                i64::MAX / 2,
            )
            .await
            .unwrap();
        assert_eq!(b.silences(0).await.unwrap().len(), 1);
        let ended = b.expire_silence(sil.id).await.unwrap().unwrap();
        assert!(ended.ends_at < i64::MAX / 2);
        assert_eq!(a.silences(0).await.unwrap().len(), 0);
        // A run tracker: the report comes when the last of its jobs finishes, on whichever
        // replica that is.
        let tracker = NewTracker {
            destination: "port".into(),
            run_id: "run_1".into(),
            report: ReportSpec {
                rule: "r".into(),
                ..Default::default()
            },
            fail: None,
        };
        let jobs = committed(
            a.enqueue(
                None,
                vec![job("run-ev", "x"), job("run-ev", "y")],
                Some(("run-ev".into(), tracker)),
            )
            .await
            .unwrap(),
        );
        assert!(a.finish(jobs[0].id, delivered()).await.is_empty());
        let report = b.finish(jobs[1].id, delivered()).await;
        assert_eq!(report.len(), 1, "the report job");
        match &report[0].payload {
            Payload::Report(r) => {
                assert_eq!((r.run_id.as_str(), r.tally.delivered), ("run_1", 2))
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_is_flushed_by_one_replica_only() {
        let Some(db) = TestDb::new().await else {
            return;
        };
        let (a, b) = (open(&db, 5_000).await, open(&db, 5_000).await);
        let item = |n: i64| NewJob {
            payload: Payload::Group(Box::new(GroupItem {
                rule: "g".into(),
                group: "team-a".into(),
                event: json!({"n": n}),
            })),
            rule: "g".into(),
            ..job(&format!("g{n}"), "")
        };
        committed(a.enqueue(None, vec![item(1), item(2)], None).await.unwrap());
        let groups = b.pending_groups().await.unwrap();
        assert_eq!((groups.len(), groups[0].items), (1, 2));
        let items = b.group_items("g", "team-a").await.unwrap();
        assert_eq!(items[1].1, json!({"n": 2}));
        let ids: Vec<i64> = items.iter().map(|(id, _)| *id).collect();
        let (x, y) = tokio::join!(
            a.flush_group(
                "g".into(),
                "team-a".into(),
                ids.clone(),
                vec![job("d", "digest")]
            ),
            b.flush_group("g".into(), "team-a".into(), ids, vec![job("d", "digest")])
        );
        let made = x.unwrap().len() + y.unwrap().len();
        assert_eq!(made, 1, "one digest, not one per replica");
        assert!(a.pending_groups().await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_go_to_another_replica_after_the_lease_or_at_once_when_given_back() {
        let Some(db) = TestDb::new().await else {
            return;
        };
        let a = open(&db, 1_000).await;
        let b = open(&db, 1_000).await;
        let mine = committed(a.enqueue(None, vec![job("l1", "x")], None).await.unwrap());
        // A is alive (beating): B takes nothing.
        a.beat().await.unwrap();
        assert!(b.beat().await.unwrap().is_empty());
        // A stops beating: after the lease, B takes its job, with its attempts.
        a.finish(
            mine[0].id,
            Outcome::Retry {
                error: "503".into(),
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        let taken = b.beat().await.unwrap();
        assert_eq!(
            taken.iter().map(|j| j.id).collect::<Vec<_>>(),
            vec![mine[0].id]
        );
        assert_eq!(taken[0].attempts, 1);
        assert!(b.beat().await.unwrap().is_empty(), "taken once");
        // B gives its jobs back at a clean stop: a third replica takes them at once.
        let c = open(&db, 60_000).await;
        assert_eq!(b.release().await.unwrap(), 1);
        let again = c.beat().await.unwrap();
        assert_eq!(again.len(), 1);
        let alive: Vec<String> = c
            .replicas()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert!(alive.contains(&c.replica().to_string()));
        assert!(
            !alive.contains(&b.replica().to_string()),
            "a released replica is gone"
        );
        // Migrations are idempotent: a fourth replica opens the migrated database.
        open(&db, 1_000).await;
    }
}

#[test]
fn a_bad_database_url_is_refused_clearly_without_its_password() {
    let (tmp, dir) = Engine::workspace(&[], true);
    for (url, says) in [
        (
            "postgres://u:s3cretpw@127.0.0.1:badport/db",
            "does not parse",
        ),
        (
            "postgres://u:s3cretpw@127.0.0.1:1/db",
            "postgres://u@127.0.0.1:1/db",
        ),
        ("mysql://u:s3cretpw@127.0.0.1/db", "postgres://"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["serve", "--listen", "127.0.0.1:0", "--rules"])
            .arg(&dir)
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .env("SWITCHYARD_DATABASE_URL", url)
            .env("PORT_CLIENT_SECRET", SECRET)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{url}: {text}");
        assert!(text.contains(says), "{url}: {text}");
        assert!(!text.contains("s3cretpw"), "the password leaked: {text}");
    }
    // The URL from a file (a mounted Secret), and not both at once.
    let file = tmp.path().join("url");
    std::fs::write(&file, "postgres://u:s3cretpw@127.0.0.1:1/db\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--rules"])
        .arg(&dir)
        .env("SWITCHYARD_DATABASE_URL_FILE", &file)
        .env("SWITCHYARD_DATABASE_URL", "postgres://x@127.0.0.1/db")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && text.contains("not both"), "{text}");
    assert!(!text.contains("s3cretpw"), "{text}");
}
