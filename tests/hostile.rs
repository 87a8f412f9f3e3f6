//! Hostile input and faults, one test per class of defect: the real binary on 127.0.0.1, fake
//! (or deliberately broken) peers, every loop bounded in count and time.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener as StdListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{dead_letters, delivery_rules, eventually, fixture, Engine, Fake};
use serde_json::Value;

const SECRET: &str = "hostile-port-secret";
const HOOK: &str = "/services/T0/B0/X";

/// One Port source, one `slack_webhook` destination at `url` with fast retries, one rule that
/// sends every entity update.
/// The shared delivery rules, with a short timeout for the upstreams that stall on purpose.
fn rules(url: &str, extra_dest: &str) -> String {
    delivery_rules(url, &format!("    timeout: 2s\n{extra_dest}"))
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
            let v = common::block_on(e.get_json("/status"));
            (v["queue_depth"] == 0).then_some(())
        })
        .await;
        assert!(dead_letters(&e.data).is_empty(), "Retry-After: {bad}");
    }
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
        let v = common::block_on(e.get_json("/status"));
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
    // A replay straight into the data directory would not reach the running engine either.
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["dead-letters", "replay", "--data-dir"])
        .arg(&e.data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--server"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
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

/// Whether the server closed `s` within `secs` (a read returns end-of-stream or an error).
async fn closed_within(s: &mut tokio::net::TcpStream, secs: f64) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slow_and_excess_connections_are_bounded() {
    use tokio::io::AsyncWriteExt;
    let slack = Fake::slack_ok().await;
    let e = engine(
        &slack.url(HOOK),
        &[
            ("SWITCHYARD_MAX_CONNECTIONS", "40"),
            // Long enough that a connection closed for being over the cap is told apart from
            // one closed by the header timeout even on a loaded machine.
            ("SWITCHYARD_HEADER_TIMEOUT", "3s"),
            ("SWITCHYARD_BODY_TIMEOUT", "2s"),
            ("SWITCHYARD_IDLE_TIMEOUT", "30s"),
            ("SWITCHYARD_MAX_BODY_MIB_IN_FLIGHT", "1"),
        ],
    )
    .await;
    let connect = || tokio::net::TcpStream::connect(e.addr);

    // Idle and half-sent heads are closed after the header timeout.
    let mut idle = Vec::new();
    for _ in 0..30 {
        idle.push(connect().await.unwrap());
    }
    let mut partial = connect().await.unwrap();
    partial
        .write_all(b"POST /hooks/port HTTP/1.1\r\nhost: x\r\ncontent-type: appl")
        .await
        .unwrap();
    // Up to the cap of 40 (the engine keeps no other connection open): 9 more fit, the
    // rest are closed as soon as they are accepted.
    let mut more = Vec::new();
    for _ in 0..9 {
        more.push(connect().await.unwrap());
    }
    let mut over = connect().await.unwrap();
    assert!(
        closed_within(&mut over, 2.0).await.is_some(),
        "a connection over the cap is closed at once (before the 3 s header timeout)"
    );
    for s in idle.iter_mut().chain([&mut partial]) {
        assert!(
            closed_within(s, 5.0).await.is_some(),
            "a silent connection and a half-sent head are closed after the header timeout (3 s), long before the idle timeout (30 s)"
        );
    }
    drop(more);

    // A body that stalls is answered 408 after the body timeout.
    let mut slow = connect().await.unwrap();
    slow.write_all(b"POST /hooks/port HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"a\":")
        .await
        .unwrap();
    let answer = closed_within(&mut slow, 4.0)
        .await
        .expect("answered and closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"reason\""), "{answer}");

    // Body bytes in memory are bounded: one upload holding 900 KiB leaves no room for a
    // 200 KiB one (503), but a webhook of a few KiB still goes through.
    let mut hog = connect().await.unwrap();
    hog.write_all(b"POST /hooks/port HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\n\r\n")
        .await
        .unwrap();
    hog.write_all(&vec![b' '; 900 * 1024]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = reqwest::Client::new();
    let resp = client
        .post(e.url("/hooks/port"))
        .header("content-type", "application/json")
        .body(vec![b' '; 200 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    post_one(&e).await;
    slack.wait_for(HOOK, 1, 10).await;
    let health = client.get(e.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    drop(hog);
}

fn check(dir: &std::path::Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("check")
        .arg(dir)
        .env("PORT_CLIENT_SECRET", SECRET)
        .env("SECRET_TIMEOUT", "s3cr3t-not-a-duration")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// One hostile edit: what it is, the files it writes, what the diagnostic says.
type Case = (&'static str, Vec<(&'static str, String)>, &'static str);

/// Hostile rules directories: each is refused by `check` with a located diagnostic and no
/// crash, and by a running engine's reload, which keeps serving the rules it had; nothing of
/// a file outside the directory, and no `${VAR}` value, shows in the output or on `/status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_rules_are_refused_whole_and_the_engine_keeps_its_rules() {
    let slack = Fake::slack_ok().await;
    let (tmp, dir) = Engine::workspace(&[("rules.yaml", &rules(&slack.url(HOOK), ""))], false);
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = elsewhere.path().to_path_buf();
    std::fs::write(
        outside.join("creds.yaml"),
        "AWS_SECRET_ACCESS_KEY: hunter2hunter2\n",
    )
    .unwrap();
    std::fs::write(
        outside.join("event.json"),
        "{\"secret\": \"hunter3hunter3\"}",
    )
    .unwrap();
    let e = Engine::start(
        tmp,
        dir.clone(),
        &[
            ("PORT_CLIENT_SECRET", SECRET),
            ("SWITCHYARD_ADMIN_TOKEN", "adm1n-token"),
            ("SECRET_TIMEOUT", "s3cr3t-not-a-duration"),
        ],
    )
    .await;
    let big = format!(
        "big: &big \"{}\"\nmany:\n{}",
        "x".repeat(1 << 20),
        "  - *big\n".repeat(20_000)
    );
    let cycle_rule = "rules:\n  - id: loops\n    on: port/entity.updated\n    send: [{ to: alerts, template: a }]\n";
    // (what, files, what the diagnostic says, whether it is an error: a secret file that
    // cannot be read disables its source, with a warning, as an unset variable does)
    let cases: Vec<Case> = vec![
        ("an alias bomb", vec![("evil.yaml", big)], "through aliases"),
        (
            "partials that include each other",
            vec![
                ("evil.yaml", cycle_rule.to_string()),
                ("templates/a.hbs", "{\"text\": \"{{> b}}\"}".into()),
                ("templates/b.hbs", "{{#if x}}{{> a}}{{/if}}".into()),
            ],
            "a → b → a",
        ),
        (
            "a file that is not a rules file",
            vec![("evil.yaml", "GITHUB_TOKEN: ghp_abcdefgh\n".into())],
            "not a rules file",
        ),
        (
            "a secret file that never ends",
            vec![(
                "evil.yaml",
                "sources:\n  port2: { port: { client_secret_file: /dev/zero } }\n".into(),
            )],
            "not a regular file",
        ),
        (
            "a test event outside the project",
            vec![(
                "evil.yaml",
                format!(
                    "tests:\n  - name: t\n    event: {{ source: port, file: {} }}\n    expect: []\n",
                    outside.join("event.json").display()
                ),
            )],
            "leads outside",
        ),
        (
            "a variable's value in a diagnostic",
            vec![(
                "evil.yaml",
                "destinations:\n  d2: { stdout: {}, timeout: \"${SECRET_TIMEOUT}\" }\n".into(),
            )],
            "${SECRET_TIMEOUT}",
        ),
    ];
    let client = reqwest::Client::new();
    for (what, files, says) in cases {
        for (name, text) in &files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let error = !what.contains("secret file");
        // `serve` does not read rule tests at all (they are `check`'s business), so a test
        // event outside the project is `check`'s error only.
        let serve_error = error && !what.contains("test event");
        let (code, out) = check(&dir);
        assert_eq!(code, i32::from(error), "{what}: {out}");
        assert!(out.contains(says), "{what}: `{says}` not in {out}");
        for secret in ["hunter2", "hunter3", "ghp_abcdefgh", "s3cr3t-not"] {
            assert!(!out.contains(secret), "{what}: leaks {secret}: {out}");
        }
        let resp = client
            .post(e.url("/-/reload"))
            .bearer_auth("adm1n-token")
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            if serve_error { 422 } else { 200 },
            "{what}"
        );
        let status = e.get_text("/status").await;
        assert!(
            !serve_error || status.contains(says.trim_end_matches(':')),
            "{what}: {status}"
        );
        for secret in ["hunter2", "hunter3", "ghp_abcdefgh", "s3cr3t-not"] {
            assert!(!status.contains(secret), "{what}: /status leaks {secret}");
        }
        for (name, _) in &files {
            std::fs::remove_file(dir.join(name)).unwrap();
        }
    }
    // A symlink that leads outside the directory is not followed.
    std::os::unix::fs::symlink(outside.join("creds.yaml"), dir.join("linked.yaml")).unwrap();
    let (code, out) = check(&dir);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("leads outside") && !out.contains("hunter2"),
        "{out}"
    );
    std::fs::remove_file(dir.join("linked.yaml")).unwrap();
    // One inside (a Kubernetes ConfigMap's `..data` layout) is fine.
    std::fs::create_dir_all(dir.join("..data")).unwrap();
    std::fs::rename(dir.join("rules.yaml"), dir.join("..data/rules.yaml")).unwrap();
    std::os::unix::fs::symlink("..data/rules.yaml", dir.join("rules.yaml")).unwrap();
    let (code, out) = check(&dir);
    assert_eq!(code, 0, "{out}");

    // Through all of it the engine kept its rules and its deliveries.
    post_one(&e).await;
    slack.wait_for(HOOK, 1, 10).await;
    assert!(!e.logs().contains("panicked"), "{}", e.logs());
}

const CODER_TOKEN: &str = "hostile-coder-token";

/// A passcode notification whose template fails only for real codes (the sample that `check`
/// renders passes): the failure is a dead letter, and neither it, its attempts, nor the log
/// holds the code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passcode_never_reaches_an_error_a_log_or_a_dead_letter() {
    let slack = Fake::start(|r, _| match r.path.as_str() {
        "/api/users.lookupByEmail" => (
            200,
            vec![],
            r#"{"ok": true, "user": {"id": "U05LHPP95C"}}"#.into(),
        ),
        _ => (200, vec![], r#"{"ok": true, "ts": "1.2"}"#.into()),
    })
    .await;
    let rules = r#"sources:
  coder: { coder: { token: "${CODER_TOKEN}" } }
destinations:
  bot:
    slack: { token: "xoxb-test", api_url: "${SLACK_API_URL}" }
rules:
  - id: dm
    on: coder/notification
    send: [{ to: bot, user_email: "{{user.email}}", template: otp }]
"#;
    let template = r#"{{#if (eq labels.one_time_passcode "x")}}{"text": "sample"}{{else}}{"text": "code {{labels.one_time_passcode}}" oops}{{/if}}"#;
    let (tmp, dir) = Engine::workspace(
        &[("rules.yaml", rules), ("templates/otp.hbs", template)],
        false,
    );
    let api = slack.url("/api/");
    let e = Engine::start(
        tmp,
        dir,
        &[
            ("CODER_TOKEN", CODER_TOKEN),
            ("SLACK_API_URL", api.as_str()),
        ],
    )
    .await;
    let body = std::fs::read(common::repo("examples/events/coder-one-time-passcode.json")).unwrap();
    let (status, reply) = e
        .post(
            &format!("/hooks/coder/{CODER_TOKEN}"),
            &body,
            &[("content-type", "application/json")],
        )
        .await;
    assert_eq!(status, 202, "{reply}");
    let dl = eventually(10, "the dead letter", || {
        let d = dead_letters(&e.data);
        (!d.is_empty()).then_some(d)
    })
    .await;
    let code = "8f4e25fa-686f-4ecf-9af1-914d3856ebfb";
    let everything = format!("{dl:?}{}{}", e.logs(), e.get_text("/status").await);
    assert!(
        !everything.contains(code),
        "the passcode leaked: {everything}"
    );
    assert!(dl[0].last_error.contains("template `otp`"), "{:?}", dl[0]);
    assert!(slack.on_path("/api/chat.postMessage").is_empty());
}

/// The outcome of a delivery that cannot be committed (the database locked past its busy
/// timeout, as with a full disk) is kept and committed once storage is back: nothing stays
/// queued without a worker, and a restart sends nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_that_cannot_be_committed_is_kept_until_it_can() {
    let delivered = Arc::new(AtomicUsize::new(0));
    let d2 = delivered.clone();
    let url = raw_peer(move |_, s| {
        std::thread::sleep(Duration::from_millis(800));
        d2.fetch_add(1, Ordering::SeqCst);
        ok_answer(s);
    });
    let mut e = engine(&url, &[]).await;
    let n = 12;
    for i in 0..n {
        let body =
            String::from_utf8(cpu_bump())
                .unwrap()
                .replacen('{', &format!("{{\"nonce\": {i},"), 1);
        let (status, reply) = e.post_port("port", SECRET, body.as_bytes()).await;
        assert_eq!(status, 202, "{reply}");
    }
    // Lock the database the way a stuck writer or a full disk would, for longer than the
    // engine's busy timeout (5 s), while the first attempts are answered.
    let db = e.data.join("switchyard.db");
    let locker = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(db).unwrap();
        c.execute_batch("BEGIN EXCLUSIVE").unwrap();
        std::thread::sleep(Duration::from_secs(8));
        c.execute_batch("COMMIT").unwrap();
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Meanwhile new events cannot be stored, and say so.
    let (status, _) = e
        .post_port(
            "port",
            SECRET,
            &fixture("port/changelog-update-cpu-spike.json"),
        )
        .await;
    assert_eq!(status, 503);
    tokio::task::spawn_blocking(move || locker.join().unwrap())
        .await
        .unwrap();
    eventually(40, "every message delivered and recorded", || {
        let v = common::block_on(e.get_json("/status"));
        (v["queue_depth"] == 0 && delivered.load(Ordering::SeqCst) >= n).then_some(())
    })
    .await;
    assert_eq!(delivered.load(Ordering::SeqCst), n, "each message once");
    assert!(
        e.logs().contains("delivery outcomes are kept"),
        "{}",
        e.logs()
    );
    e.kill();
    e.spawn().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        delivered.load(Ordering::SeqCst),
        n,
        "nothing sent again after a restart"
    );
    assert!(dead_letters(&e.data).is_empty());
}

/// Work per event is bounded: a template that loops inside a loop stops at the output limit
/// (the event becomes a dead letter, the outbox does not grow by megabytes), and a JSONPath
/// whose cost grows faster than the event is refused when the rules load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendering_and_paths_are_bounded() {
    let slack = Fake::slack_ok().await;
    let extra = r#"
  - id: quadratic
    on: port/entity.updated
    where: ["$.after.properties.items exists"]
    send: [{ to: alerts, template: loop }]
"#;
    let text = format!("{}{extra}", rules(&slack.url(HOOK), ""));
    let (tmp, dir) = Engine::workspace(
        &[
            ("rules.yaml", &text),
            (
                "templates/loop.hbs",
                "{\"text\": \"{{#each after.properties.items}}{{#each ../after.properties.items}}0123456789{{/each}}{{/each}}\"}",
            ),
        ],
        false,
    );
    let e = Engine::start(tmp, dir.clone(), &[("PORT_CLIENT_SECRET", SECRET)]).await;
    let mut body: Value = serde_json::from_slice(&cpu_bump()).unwrap();
    body["diff"]["after"]["properties"]["items"] = (0..2000).collect::<Vec<u32>>().into();
    let (status, reply) = e
        .post_port("port", SECRET, &serde_json::to_vec(&body).unwrap())
        .await;
    assert_eq!(status, 202, "{reply}");
    let dl = eventually(10, "the dead letter", || {
        let d = dead_letters(&e.data);
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert!(dl[0].last_error.contains("KiB"), "{:?}", dl[0].last_error);
    let db = std::fs::metadata(e.data.join("switchyard.db"))
        .map(|m| m.len())
        .unwrap_or(0)
        + std::fs::metadata(e.data.join("switchyard.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    assert!(db < 8 << 20, "the outbox holds {db} bytes");
    slack.wait_for(HOOK, 1, 10).await; // the other rule's message still went out

    std::fs::write(
        dir.join("slow.yaml"),
        "rules:\n  - id: slow\n    on: port/entity.updated\n    where: [\"$..[?@..[?@..x]] exists\"]\n    send: [{ to: alerts, text: x }]\n",
    )
    .unwrap();
    let (code, out) = check(&dir);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("slow.yaml:4:") && out.contains("descendant"),
        "{out}"
    );
}
