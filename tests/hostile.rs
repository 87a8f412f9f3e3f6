//! Hostile input and faults, one test per class of defect: the real binary on 127.0.0.1, fake
//! (or deliberately broken) peers, every loop bounded in count and time.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener as StdListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{dead_letters, eventually, fixture, Engine, Fake};
use serde_json::Value;

const SECRET: &str = "hostile-port-secret";
const HOOK: &str = "/services/T0/B0/X";

/// One Port source, one `slack_webhook` destination at `url` with fast retries, one rule that
/// sends every entity update.
fn rules(url: &str, extra_dest: &str) -> String {
    format!(
        r#"sources:
  port: {{ port: {{ client_secret: "${{PORT_CLIENT_SECRET}}" }} }}
destinations:
  alerts:
    slack_webhook: {{ url: "{url}" }}
    retry_initial: 50ms
    retry_max: 200ms
    rate_per_second: 100
    timeout: 2s
{extra_dest}
rules:
  - id: any-update
    on: port/entity.updated
    send:
      - to: alerts
        text: "{{{{entity.identifier}}}} cpu {{{{after.properties.cpuUtil}}}}"
"#
    )
}

async fn engine(url: &str, env: &[(&str, &str)]) -> Engine {
    let (tmp, dir) = Engine::workspace(&[("rules.yaml", &rules(url, ""))], false);
    let mut all = vec![("PORT_CLIENT_SECRET", SECRET)];
    all.extend_from_slice(env);
    Engine::start(tmp, dir, &all).await
}

fn cpu_bump() -> Vec<u8> {
    fixture("port/changelog-update-cpu-bump.json")
}

/// A raw HTTP/1.1 peer on 127.0.0.1: `answer(n)` (n counts connections from 1) writes
/// whatever it likes to the n-th connection after reading the request head and body.
fn raw_peer(answer: impl Fn(usize, &mut std::net::TcpStream) + Send + Sync + 'static) -> String {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let answer = Arc::new(answer);
    let n = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for s in l.incoming().take(50) {
            let Ok(mut s) = s else { continue };
            let k = n.fetch_add(1, Ordering::SeqCst) + 1;
            let answer = answer.clone();
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read the head, then as much body as Content-Length says.
                loop {
                    let Ok(r) = s.read(&mut chunk) else { return };
                    if r == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..r]);
                    if let Some(end) = find(&buf, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        while buf.len() < end + 4 + len {
                            let Ok(r) = s.read(&mut chunk) else { return };
                            if r == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..r]);
                        }
                        break;
                    }
                }
                answer(k, &mut s);
            });
        }
    });
    format!("http://{addr}{HOOK}")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn ok_answer(s: &mut std::net::TcpStream) {
    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
}

async fn post_one(e: &Engine) {
    let (status, reply) = e.post_port("port", SECRET, &cpu_bump()).await;
    assert_eq!(status, 202, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_that_is_not_a_number_is_ignored_not_a_crash() {
    // NaN, infinity and negative values: each answered once with a 503, then Slack takes it.
    for bad in [
        "NaN",
        "inf",
        "-5",
        "1e999",
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "soon",
    ] {
        let slack = Fake::start(move |_, n| {
            if n == 1 {
                (503, vec![("Retry-After".into(), bad.into())], "busy".into())
            } else {
                (200, vec![], "ok".into())
            }
        })
        .await;
        let e = engine(&slack.url(HOOK), &[]).await;
        post_one(&e).await;
        slack.wait_for(HOOK, 2, 15).await;
        assert!(
            !e.logs().contains("panicked"),
            "Retry-After: {bad}: {}",
            e.logs()
        );
        eventually(10, "the delivery recorded", || {
            let v = futures_block(e.get_json("/status"));
            (v["queue_depth"] == 0).then_some(())
        })
        .await;
        assert!(dead_letters(&e.data).is_empty(), "Retry-After: {bad}");
    }
}

fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_that_is_not_slacks_ok_is_not_counted_as_delivered() {
    // An HTML page from a proxy: retried, then delivered when Slack answers `ok`.
    let slack = Fake::start(|_, n| {
        if n == 1 {
            (200, vec![], "<html><body>Proxy login</body></html>".into())
        } else {
            (200, vec![], "ok".into())
        }
    })
    .await;
    let e = engine(&slack.url(HOOK), &[]).await;
    post_one(&e).await;
    let got = slack.wait_for(HOOK, 2, 15).await;
    assert_eq!(got[0].body, got[1].body);
    assert!(
        e.logs().contains("not Slack's `ok`"),
        "the retry names why: {}",
        e.logs()
    );

    // Slack's error code behind a 200: a dead letter with the code, after one try.
    let slack = Fake::start(|_, _| {
        (
            200,
            vec![],
            r#"{"ok":false,"error":"invalid_blocks"}"#.into(),
        )
    })
    .await;
    let e = engine(&slack.url(HOOK), &[]).await;
    post_one(&e).await;
    let dl = eventually(15, "the dead letter", || {
        let d = dead_letters(&e.data);
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert!(dl[0].last_error.contains("invalid_blocks"), "{dl:?}");
    assert_eq!(slack.on_path(HOOK).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_never_ends_or_never_stops_is_bounded_and_retried() {
    // 1st: a 200 whose chunked body starts and then stalls past the timeout.
    // 2nd: a 200 with a 300 MB body, streamed as fast as the engine reads.
    // 3rd: Slack's `ok`.
    let url = raw_peer(|n, s| match n {
        1 => {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\no\r\n");
            std::thread::sleep(Duration::from_secs(6));
        }
        2 => {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 300000000\r\n\r\n");
            let block = vec![b'x'; 1 << 16];
            for _ in 0..(300_000_000 / block.len()) {
                if s.write_all(&block).is_err() {
                    return;
                }
            }
        }
        _ => ok_answer(s),
    });
    let e = engine(&url, &[]).await;
    post_one(&e).await;
    eventually(30, "delivered on the third answer", || {
        let v = futures_block(e.get_json("/status"));
        (v["destinations"]["alerts"]["delivered"] == 1).then_some(())
    })
    .await;
    let v = e.get_json("/status").await;
    assert_eq!(v["destinations"]["alerts"]["failed_attempts"], 2, "{v}");
    assert!(dead_letters(&e.data).is_empty());
    let rss = rss_kb(e.child.as_ref().unwrap().id());
    assert!(rss < 200_000, "RSS {rss} kB after a 300 MB answer");
}

/// Resident set size of a process, in kB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_second_engine_on_the_same_data_directory_refuses_to_start() {
    let slack = Fake::slack_ok().await;
    let e = engine(&slack.url(HOOK), &[]).await;
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("serve")
        .arg("--rules")
        .arg(&e.rules)
        .arg("--data-dir")
        .arg(&e.data)
        .arg("--listen")
        .arg(common::free_addr().to_string())
        .env("PORT_CLIENT_SECRET", SECRET)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let pid = e.child.as_ref().unwrap().id().to_string();
    assert!(
        err.contains("in use by") && err.contains(&pid),
        "names the holder's pid {pid}: {err}"
    );
    // The first one is unharmed.
    post_one(&e).await;
    slack.wait_for(HOOK, 1, 10).await;
}

/// A request body that trickles forever (1 KiB every 10 ms), for endpoints that must answer
/// before reading it.
fn endless_body() -> reqwest::Body {
    let s = futures_util::stream::unfold(0u64, |n| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Some((Ok::<_, std::io::Error>(vec![b' '; 1024]), n + 1))
    });
    reqwest::Body::wrap_stream(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_refuse_before_reading_the_body() {
    let slack = Fake::slack_ok().await;
    let client = reqwest::Client::new();
    for (env, auth, want) in [
        (vec![], None, 403),
        (vec![("SWITCHYARD_ADMIN_TOKEN", "s3cret-admin")], None, 401),
        (
            vec![("SWITCHYARD_ADMIN_TOKEN", "s3cret-admin")],
            Some("Bearer wrong"),
            401,
        ),
    ] {
        let e = engine(&slack.url(HOOK), &env).await;
        for path in [
            "/-/dead-letters/purge",
            "/-/dead-letters/replay",
            "/-/reload",
        ] {
            let mut req = client.post(e.url(path)).body(endless_body());
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = tokio::time::timeout(Duration::from_secs(5), req.send())
                .await
                .unwrap_or_else(|_| panic!("{path} read the body before answering"))
                .unwrap();
            assert_eq!(resp.status().as_u16(), want, "{path}");
            let v: Value = resp.json().await.unwrap();
            assert!(v["reason"].is_string(), "{v}");
        }
    }
    // With the token, the body is bounded and errors are JSON too.
    let e = engine(
        &slack.url(HOOK),
        &[("SWITCHYARD_ADMIN_TOKEN", "s3cret-admin")],
    )
    .await;
    let resp = client
        .post(e.url("/-/dead-letters/purge"))
        .header("authorization", "Bearer s3cret-admin")
        .body(vec![b' '; 100_000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    assert!(resp.json::<Value>().await.unwrap()["reason"].is_string());
    let resp = client
        .post(e.url("/-/dead-letters/purge"))
        .header("authorization", "Bearer s3cret-admin")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert!(resp.json::<Value>().await.unwrap()["reason"].is_string());
    let resp = client
        .post(e.url("/-/dead-letters/purge"))
        .header("authorization", "Bearer s3cret-admin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

#[tokio::test]
async fn every_refusal_has_a_json_reason_and_a_stray_path_token_is_refused() {
    let slack = Fake::slack_ok().await;
    let e = engine(&slack.url(HOOK), &[]).await;
    let client = reqwest::Client::new();
    for (method, path, want) in [
        ("GET", "/hooks/port", 405),
        ("PUT", "/status", 405),
        ("GET", "/nothing/here", 404),
    ] {
        let resp = client
            .request(method.parse().unwrap(), e.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), want, "{method} {path}");
        let v: Value = resp.json().await.unwrap();
        assert!(v["reason"].is_string(), "{method} {path}: {v}");
    }
    // Port signs its body; a token in the path means a misconfigured URL, not a credential.
    let body = cpu_bump();
    let ts = chrono::Utc::now().timestamp().to_string();
    let sig = switchyard::sources::port::sign(SECRET, &ts, &body);
    let (status, reply) = e
        .post(
            "/hooks/port/some-token",
            &body,
            &[
                ("content-type", "application/json"),
                ("x-port-timestamp", &ts),
                ("x-port-signature", &sig),
            ],
        )
        .await;
    assert_eq!(status, 404, "{reply}");
    assert!(reply["reason"].as_str().unwrap().contains("no token"));
}

#[tokio::test]
async fn extreme_timestamps_are_refused_not_overflowed() {
    let slack = Fake::slack_ok().await;
    let e = engine(&slack.url(HOOK), &[]).await;
    for ts in [
        "-9223372036854775808",
        "9223372036854775807",
        "-1",
        "0",
        "100000000001",
    ] {
        let (status, reply) = e.post_port_ts("port", SECRET, ts, &cpu_bump()).await;
        assert_eq!(status, 401, "timestamp {ts}: {reply}");
    }
    assert!(!e.logs().contains("panicked"));
}

#[tokio::test]
async fn whitespace_added_to_a_minified_signature_body_is_still_a_duplicate() {
    let slack = Fake::slack_ok().await;
    let e = engine(&slack.url(HOOK), &[]).await;
    let compact =
        serde_json::to_vec(&serde_json::from_slice::<Value>(&cpu_bump()).unwrap()).unwrap();
    let ts = chrono::Utc::now().timestamp().to_string();
    // Port's agent signs the compact JSON; the signature holds for every spacing of it.
    let sig = switchyard::sources::port::sign(SECRET, &ts, &compact);
    let v: Value = serde_json::from_slice(&compact).unwrap();
    let spaced = serde_json::to_string_pretty(&v).unwrap();
    let mut wider = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t\t  ");
    serde::Serialize::serialize(
        &v,
        &mut serde_json::Serializer::with_formatter(&mut wider, fmt),
    )
    .unwrap();
    let mut accepted = 0;
    let mut duplicates = 0;
    for body in [compact.clone(), spaced.into_bytes(), wider] {
        let (status, reply) = e
            .post(
                "/hooks/port",
                &body,
                &[
                    ("content-type", "application/json"),
                    ("x-port-timestamp", &ts),
                    ("x-port-signature", &sig),
                ],
            )
            .await;
        assert_eq!(status, 202, "{reply}");
        if reply["duplicate"] == true {
            duplicates += 1;
        } else {
            accepted += 1;
        }
    }
    assert_eq!((accepted, duplicates), (1, 2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(slack.on_path(HOOK).len(), 1, "one message, not three");
}
