//! Live operations end to end: hot reload, crash recovery, retries, isolation between
//! destinations, dead letters and throttles.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{dead_letters, eventually, free_addr, Engine, Fake};
use serde_json::{json, Value};

const SECRET: &str = "live-port-secret";
const HOOK: &str = "/hook";

/// A distinct changelog body per `seq`, for entity `entity`.
fn event(seq: usize, entity: &str) -> Vec<u8> {
    common::changelog(seq, entity)
}

fn rules(dests: &str, rules: &str) -> String {
    format!("sources:\n  port: {{ port: {{ client_secret: \"${{PORT_CLIENT_SECRET}}\" }} }}\ndestinations:\n{dests}\nrules:\n{rules}")
}

fn webhook_dest(name: &str, url: &str, extra: &str) -> String {
    format!("  {name}:\n    slack_webhook: {{ url: \"{url}\" }}\n    retry_initial: 50ms\n    retry_max: 200ms\n    rate_per_second: 1000\n    max_attempts: 1000\n{extra}")
}

fn rule(id: &str, to: &str, extra: &str) -> String {
    format!("  - id: {id}\n    on: port/entity.updated\n    send: [{{ to: {to}, text: \"{id} {{{{entity.identifier}}}} {{{{after.properties.seq}}}}\" }}]\n{extra}")
}

async fn start(files: &[(&str, &str)], env: &[(&str, &str)]) -> Engine {
    let (tmp, dir) = Engine::workspace(files, false);
    let mut all = vec![
        ("PORT_CLIENT_SECRET", SECRET),
        ("SWITCHYARD_ADMIN_TOKEN", "admin-token"),
    ];
    all.extend_from_slice(env);
    Engine::start(tmp, dir, &all).await
}

fn texts(f: &Fake, path: &str) -> Vec<String> {
    f.on_path(path)
        .iter()
        .map(|r| r.json()["text"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_a_rules_file_takes_effect_and_a_broken_edit_keeps_the_old_rules() {
    let slack = Fake::slack_ok().await;
    let dests = webhook_dest("alerts", &slack.url(HOOK), "");
    let e = start(
        &[("a.yaml", &rules(&dests, &rule("first", "alerts", "")))],
        &[],
    )
    .await;
    let (_, r) = e.post_port("port", SECRET, &event(1, "svc-a")).await;
    assert_eq!(r["dispatches"], 1);

    // A new rule in a second file is picked up by the watcher.
    std::fs::write(
        e.rules.join("b.yaml"),
        format!("rules:\n{}", rule("second", "alerts", "")),
    )
    .unwrap();
    let mut seq = 10;
    eventually(10, "the new rule to take effect", || {
        seq += 1;
        let e = &e;
        let body = event(seq, "svc-a");
        let r = common::block_on(async move { e.post_port("port", SECRET, &body).await.1 });
        (r["dispatches"] == 2).then_some(())
    })
    .await;

    // A broken edit: rejected whole, the old rules keep serving, /status says why.
    std::fs::write(e.rules.join("b.yaml"), "rules:\n  - id: second\n    on: port/entity.updated\n    send: [{ to: nowhere, text: x }]\n").unwrap();
    let status = eventually(10, "the failed reload on /status", || {
        let s = common::block_on(e.get_json("/status"));
        (s["reload"]["ok"] == false).then_some(s)
    })
    .await;
    let diags = status["reload"]["diagnostics"].to_string();
    assert!(
        diags.contains("b.yaml:4:18") && diags.contains("nowhere"),
        "{diags}"
    );
    let (_, r) = e.post_port("port", SECRET, &event(100, "svc-a")).await;
    assert_eq!(r["dispatches"], 2, "the previous rules still serve");
    let metrics = e.get_text("/metrics").await;
    assert!(
        metrics.contains("switchyard_reloads_total{outcome=\"error\"}"),
        "{metrics}"
    );

    // Fixing the file recovers without a restart.
    std::fs::write(
        e.rules.join("b.yaml"),
        format!("rules:\n{}", rule("second", "alerts", "")),
    )
    .unwrap();
    eventually(10, "recovery", || {
        (common::block_on(e.get_json("/status"))["reload"]["ok"] == true).then_some(())
    })
    .await;
    // The HTML view for a browser.
    let html = e.get_html("/status").await;
    assert!(html.contains("<table>") && html.contains("alerts"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_under_load_loses_nothing() {
    let slack = Fake::slack_ok().await;
    let dests = webhook_dest("alerts", &slack.url(HOOK), "");
    let e = start(&[("a.yaml", &rules(&dests, &rule("r", "alerts", "")))], &[]).await;
    let url = e.url("/hooks/port");
    let n = 300;
    let load = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut statuses = Vec::new();
        for i in 0..n {
            let body = event(i, "svc-load");
            let ts = chrono::Utc::now().timestamp().to_string();
            let sig = switchyard::sources::port::sign(SECRET, &ts, &body);
            let r = client
                .post(&url)
                .header("content-type", "application/json")
                .header("x-port-timestamp", ts)
                .header("x-port-signature", sig)
                .body(body)
                .send()
                .await
                .unwrap();
            statuses.push(r.status().as_u16());
        }
        statuses
    });
    let client = reqwest::Client::new();
    for i in 0..6 {
        if i % 2 == 0 {
            e.hup();
        } else {
            let r = client
                .post(e.url("/-/reload"))
                .bearer_auth("admin-token")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let statuses = load.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == 202),
        "every request accepted during reloads: {statuses:?}"
    );
    slack.wait_for(HOOK, n, 30).await;
    let mut got = texts(&slack, HOOK);
    got.sort();
    got.dedup();
    assert_eq!(got.len(), n, "every event delivered exactly once");
    let status = e.get_json("/status").await;
    assert!(
        status["reload"]["reloads_ok"].as_u64().unwrap() >= 6,
        "{status}"
    );
}

#[tokio::test]
async fn a_killed_engine_resumes_pending_deliveries_after_restart() {
    let slack_addr = free_addr();
    let url = format!("http://{slack_addr}{HOOK}");
    let dests = webhook_dest("alerts", &url, "    timeout: 1s\n");
    let mut e = start(&[("a.yaml", &rules(&dests, &rule("r", "alerts", "")))], &[]).await;
    for i in 0..5 {
        let (s, _) = e.post_port("port", SECRET, &event(i, "svc-kill")).await;
        assert_eq!(s, 202);
    }
    // Slack is down: deliveries fail and stay pending. Kill without warning.
    tokio::time::sleep(Duration::from_millis(300)).await;
    e.kill();
    e.spawn().await;
    let slack = Fake::start_on(slack_addr, |_, _| (200, vec![], "ok".into())).await;
    slack.wait_for(HOOK, 5, 30).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = texts(&slack, HOOK);
    got.sort();
    assert_eq!(
        got,
        (0..5)
            .map(|i| format!("r svc-kill {i}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(e.get_json("/status").await["queue_depth"], 0);
}

#[tokio::test]
async fn a_destination_failing_then_recovering_gets_every_message_once() {
    let slack = Fake::start(|_, n| {
        if n <= 6 {
            (500, vec![], "rollup_error".into())
        } else {
            (200, vec![], "ok".into())
        }
    })
    .await;
    let dests = webhook_dest("alerts", &slack.url(HOOK), "");
    let e = start(&[("a.yaml", &rules(&dests, &rule("r", "alerts", "")))], &[]).await;
    for i in 0..3 {
        e.post_port("port", SECRET, &event(i, "svc-flaky")).await;
    }
    eventually(20, "three successful deliveries", || {
        let ok: Vec<_> = slack.on_path(HOOK).into_iter().skip(6).collect();
        (ok.len() >= 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered: Vec<String> = slack
        .on_path(HOOK)
        .iter()
        .skip(6)
        .map(|r| r.json()["text"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = delivered.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        delivered.len(),
        3,
        "each message delivered once after recovery: {delivered:?}"
    );
    assert_eq!(sorted.len(), 3);
    assert!(dead_letters(&e.data).is_empty());
}

#[tokio::test]
async fn a_429_storm_is_paced_by_retry_after() {
    let slack = Fake::start(|_, n| {
        if n <= 6 {
            (
                429,
                vec![("Retry-After".into(), "1".into())],
                "rate_limited".into(),
            )
        } else {
            (200, vec![], "ok".into())
        }
    })
    .await;
    let dests = webhook_dest("alerts", &slack.url(HOOK), "");
    let e = start(&[("a.yaml", &rules(&dests, &rule("r", "alerts", "")))], &[]).await;
    for i in 0..3 {
        e.post_port("port", SECRET, &event(i, "svc-429")).await;
    }
    slack.wait_for(HOOK, 9, 20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reqs = slack.on_path(HOOK);
    // For each message, every retry came at least Retry-After after the 429 before it.
    for seq in 0..3 {
        let tries: Vec<_> = reqs
            .iter()
            .filter(|r| r.json()["text"] == format!("r svc-429 {seq}"))
            .collect();
        for w in tries.windows(2) {
            assert!(
                w[1].at.duration_since(w[0].at) >= Duration::from_millis(950),
                "retry sooner than Retry-After"
            );
        }
    }
    let ok: Vec<_> = reqs.iter().skip(6).collect();
    assert_eq!(ok.len(), 3);
}

#[tokio::test]
async fn one_destination_down_does_not_slow_another() {
    // `down` accepts connections and never answers: every attempt runs into its timeout.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down_addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let up = Fake::slack_ok().await;
    let dests = format!(
        "{}{}",
        webhook_dest(
            "down",
            &format!("http://{down_addr}{HOOK}"),
            "    timeout: 1s\n    concurrency: 2\n"
        ),
        webhook_dest("up", &up.url(HOOK), "")
    );
    let rs = format!("{}{}", rule("to-down", "down", ""), rule("to-up", "up", ""));
    let e = start(&[("a.yaml", &rules(&dests, &rs))], &[]).await;
    for i in 0..20 {
        e.post_port("port", SECRET, &event(i, "svc-iso")).await;
    }
    up.wait_for(HOOK, 20, 10).await;
    let status = e.get_json("/status").await;
    assert_eq!(status["destinations"]["up"]["delivered"], 20);
    assert_eq!(status["destinations"]["down"]["delivered"], 0);
    assert!(
        status["destinations"]["down"]["queue_depth"]
            .as_i64()
            .unwrap()
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_be_listed_and_replayed() {
    let slack = Fake::start(|_, _| (404, vec![], "channel_not_found".into())).await;
    let dests = webhook_dest("alerts", &slack.url(HOOK), "");
    let mut e = start(&[("a.yaml", &rules(&dests, &rule("r", "alerts", "")))], &[]).await;
    e.post_port("port", SECRET, &event(1, "svc-dl")).await;
    e.post_port("port", SECRET, &event(2, "svc-dl")).await;
    eventually(10, "two dead letters", || {
        (dead_letters(&e.data).len() == 2).then_some(())
    })
    .await;

    let bin = env!("CARGO_BIN_EXE_switchyard");
    let list = Command::new(bin)
        .args(["dead-letters", "list", "--data-dir"])
        .arg(&e.data)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(
        out.contains("channel_not_found") && out.contains("alerts"),
        "{out}"
    );
    let json_list = Command::new(bin)
        .args([
            "dead-letters",
            "list",
            "--format",
            "json",
            "--rule",
            "r",
            "--data-dir",
        ])
        .arg(&e.data)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&json_list.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let id = v[0]["id"].as_i64().unwrap();
    let show = Command::new(bin)
        .args(["dead-letters", "show", "--data-dir"])
        .arg(&e.data)
        .arg(id.to_string())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&show.stdout).contains("\"attempts\""));
    let none = Command::new(bin)
        .args([
            "dead-letters",
            "list",
            "--destination",
            "other",
            "--data-dir",
        ])
        .arg(&e.data)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&none.stdout).contains("no dead letters"));

    // One dead letter through the running server's admin API, and one that does not exist.
    let show_remote = Command::new(bin)
        .args(["dead-letters", "show", "--server", &e.url("")])
        .arg(id.to_string())
        .env("SWITCHYARD_ADMIN_TOKEN", "admin-token")
        .output()
        .unwrap();
    let shown: Value = serde_json::from_slice(&show_remote.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&show_remote.stderr)));
    assert_eq!(shown["id"], id);
    assert!(shown["last_error"]
        .as_str()
        .unwrap_or("")
        .contains("channel_not_found"));
    for (where_, extra) in [
        ("--data-dir", e.data.display().to_string()),
        ("--server", e.url("")),
    ] {
        let missing = Command::new(bin)
            .args(["dead-letters", "show", where_, &extra, "999999"])
            .env("SWITCHYARD_ADMIN_TOKEN", "admin-token")
            .output()
            .unwrap();
        assert!(!missing.status.success(), "{where_}");
        assert!(
            String::from_utf8_lossy(&missing.stderr).contains("no dead letter 999999"),
            "{where_}: {}",
            String::from_utf8_lossy(&missing.stderr)
        );
    }

    // Replayed while the channel is still missing: it fails for good again and is the same dead
    // letter again (same id), with the attempts of both lives.
    let again = Command::new(bin)
        .args(["dead-letters", "replay", "--server", &e.url("")])
        .arg(id.to_string())
        .arg("999999")
        .env("SWITCHYARD_ADMIN_TOKEN", "admin-token")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(
        said.contains(&format!("dead letter {id} -> job "))
            && said.contains("dead letter 999999 skipped: no dead letter 999999"),
        "{said}{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let back = eventually(10, "the replay dead again under its id", || {
        dead_letters(&e.data)
            .into_iter()
            .find(|d| d.id == id && d.attempts.len() == 2)
    })
    .await;
    assert!(back.last_error.contains("channel_not_found"));
    assert_eq!(dead_letters(&e.data).len(), 2);

    // The channel is fixed; replay one through the running server's admin API.
    slack.set_script(|_, _| (200, vec![], "ok".into()));
    let replay = Command::new(bin)
        .args(["dead-letters", "replay", "--server", &e.url("")])
        .arg(id.to_string())
        .env("SWITCHYARD_ADMIN_TOKEN", "admin-token")
        .output()
        .unwrap();
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    eventually(10, "the replayed message", || {
        (slack.on_path(HOOK).len() == 4).then_some(())
    })
    .await;
    assert_eq!(dead_letters(&e.data).len(), 1);
    eventually(10, "the replay recorded as delivered", || {
        (common::block_on(e.get_json("/status"))["queue_depth"] == 0).then_some(())
    })
    .await;

    // Replay the other one offline against the data directory; it goes out on the next start.
    e.kill();
    let offline = Command::new(bin)
        .args(["dead-letters", "replay", "--data-dir"])
        .arg(&e.data)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&offline.stdout).contains("queued 1"),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );
    e.spawn().await;
    eventually(10, "the offline replay delivered", || {
        (slack.on_path(HOOK).len() == 5).then_some(())
    })
    .await;
    assert!(dead_letters(&e.data).is_empty());
    let purge = Command::new(bin)
        .args(["dead-letters", "purge", "--data-dir"])
        .arg(&e.data)
        .output()
        .unwrap();
    assert!(purge.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_rule_sends_once_per_window_even_across_restarts() {
    let slack = Fake::slack_ok().await;
    let dests = webhook_dest("alerts", &slack.url(HOOK), "");
    let r = rule(
        "hot",
        "alerts",
        "    throttle: { key: \"{{entity.identifier}}\", window: 1h }\n",
    );
    let mut e = start(&[("a.yaml", &rules(&dests, &r))], &[]).await;
    let (_, r1) = e.post_port("port", SECRET, &event(1, "svc-t")).await;
    let (_, r2) = e.post_port("port", SECRET, &event(2, "svc-t")).await;
    let (_, r3) = e.post_port("port", SECRET, &event(3, "svc-other")).await;
    assert_eq!(
        (r1["dispatches"].clone(), r1["throttled"].clone()),
        (json!(1), json!(0))
    );
    assert_eq!(
        (r2["dispatches"].clone(), r2["throttled"].clone()),
        (json!(0), json!(1))
    );
    assert_eq!(r3["dispatches"], 1, "another key is not throttled");
    let status = e.get_json("/status").await;
    assert_eq!(status["throttle"]["suppressed_since_start"], 1);
    assert_eq!(status["throttle"]["active_keys"], 2);
    // Both sends are finished (delivered and recorded) before the kill: a kill between Slack's
    // answer and the outbox commit would resend one (at-least-once), which is not what this tests.
    slack.wait_for(HOOK, 2, 10).await;
    eventually(10, "an empty queue", || {
        (common::block_on(e.get_json("/status"))["queue_depth"] == 0).then_some(())
    })
    .await;
    e.kill();
    e.spawn().await;
    let (_, r4) = e.post_port("port", SECRET, &event(4, "svc-t")).await;
    assert_eq!(r4["throttled"], 1, "the throttle survives a restart");
    slack.wait_for(HOOK, 2, 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(slack.on_path(HOOK).len(), 2);
}

#[tokio::test]
async fn sigterm_drains_gracefully() {
    let slack = Fake::slack_ok().await;
    let dests = webhook_dest("alerts", &slack.url(HOOK), "");
    let mut e = start(&[("a.yaml", &rules(&dests, &rule("r", "alerts", "")))], &[]).await;
    e.post_port("port", SECRET, &event(1, "svc-term")).await;
    slack.wait_for(HOOK, 1, 10).await;
    let status = e.terminate().expect("exit status");
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status:?}\n{}",
        e.logs()
    );
    assert!(e.logs().contains("shutting down"));
}

/// Writes `files` into `dir` the way the kubelet updates a mounted ConfigMap (its
/// `AtomicWriter`): the files go into a fresh hidden timestamped directory, `..data_tmp` is
/// pointed at it and renamed over `..data` (one atomic step), each key is a symlink through
/// `..data` (a key with a `/` in its path, from a volume's `items`, gets a symlink for its first
/// directory), and the previous timestamped directory is deleted last.
fn kubelet_update(dir: &std::path::Path, generation: u32, files: &[(&str, &str)]) {
    use std::os::unix::fs::symlink;
    let ts = format!("..2026_12_05_06_00_00.{generation:09}");
    let old = std::fs::read_link(dir.join("..data")).ok();
    for (name, text) in files {
        let p = dir.join(&ts).join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    symlink(&ts, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    let visible: std::collections::BTreeSet<&str> = files
        .iter()
        .map(|(n, _)| n.split('/').next().unwrap())
        .collect();
    for top in &visible {
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{top}"), &link).unwrap();
        }
    }
    // Keys that are gone lose their symlink.
    for e in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("..") && !visible.contains(name.as_str()) {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// Rules mounted from a Kubernetes ConfigMap are reloaded when the ConfigMap changes: the
/// kubelet swaps the `..data` symlink instead of writing the visible files, and the engine must
/// notice that, read the new generation whole (rules and templates from the same one), and cope
/// with the old generation's directory disappearing under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_update_by_symlink_swap_is_reloaded() {
    let slack = Fake::slack_ok().await;
    let dests = webhook_dest("alerts", &slack.url(HOOK), "");
    let rules_yaml = |tpl: &str| {
        rules(
            &dests,
            &format!("  - id: r\n    on: port/entity.updated\n    send: [{{ to: alerts, template: {tpl} }}]\n"),
        )
    };
    let tpl = |word: &str| format!("{{\"text\": \"{word} {{{{entity.identifier}}}}\"}}");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rules");
    std::fs::create_dir_all(&dir).unwrap();
    let first_rules = rules_yaml("alert");
    let first_tpl = tpl("first");
    kubelet_update(
        &dir,
        1,
        &[
            ("rules.yaml", first_rules.as_str()),
            ("templates/alert.hbs", first_tpl.as_str()),
        ],
    );
    let e = Engine::start(
        tmp,
        dir.clone(),
        &[
            ("PORT_CLIENT_SECRET", SECRET),
            ("SWITCHYARD_ADMIN_TOKEN", "admin-token"),
        ],
    )
    .await;
    let (status, _) = e.post_port("port", SECRET, &event(1, "svc-before")).await;
    assert_eq!(status, 202);
    slack.wait_for(HOOK, 1, 10).await;
    assert_eq!(texts(&slack, HOOK), ["first svc-before"]);

    // A new generation: the template changes and a rule in a new key is added.
    let second_tpl = tpl("second");
    let extra = format!("rules:\n{}", rule("extra", "alerts", ""));
    kubelet_update(
        &dir,
        2,
        &[
            ("rules.yaml", first_rules.as_str()),
            ("templates/alert.hbs", second_tpl.as_str()),
            ("extra.yaml", extra.as_str()),
        ],
    );
    eventually(15, "the swapped ConfigMap to be served", || {
        let s = common::block_on(e.get_json("/status"));
        (s["rules"].as_array().map(Vec::len) == Some(2) && s["reload"]["ok"] == true).then_some(())
    })
    .await;
    let n = texts(&slack, HOOK).len();
    let (_, r) = e.post_port("port", SECRET, &event(1000, "svc-after")).await;
    assert_eq!(r["dispatches"], 2, "{r}");
    slack.wait_for(HOOK, n + 2, 10).await;
    let sent = texts(&slack, HOOK);
    assert!(
        sent[n..].iter().any(|t| t == "second svc-after"),
        "the template of the new generation: {sent:?}"
    );

    // The key is removed again: so is its rule.
    kubelet_update(
        &dir,
        3,
        &[
            ("rules.yaml", first_rules.as_str()),
            ("templates/alert.hbs", second_tpl.as_str()),
        ],
    );
    eventually(15, "the removed key's rule to go", || {
        let s = common::block_on(e.get_json("/status"));
        (s["rules"].as_array().map(Vec::len) == Some(1) && s["reload"]["ok"] == true).then_some(())
    })
    .await;
    let status = e.get_json("/status").await;
    assert!(
        !status["reload"]["diagnostics"].to_string().contains("..20"),
        "no file of a hidden generation is read or reported: {status}"
    );
}
