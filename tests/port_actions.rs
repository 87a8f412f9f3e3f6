//! Port self-service actions end to end: a fake Port API (token, entity search with two pages,
//! run PATCH, run logs) and a fake Slack Web API on 127.0.0.1, the shipped `rules/`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, fixture, Engine, Fake, Received};
use serde_json::{json, Value};

const SECRET: &str = "port-actions-secret";

/// Page 2 of the search: one more service, of a team not on page 1.
fn page_two() -> Value {
    json!({"ok": true, "entities": [{
        "identifier": "data-pipeline", "title": "Data Pipeline", "blueprint": "service", "team": ["data"],
        "properties": {}, "relations": {},
        "scorecards": {"ProductionReadiness": {"level": "Basic", "rules": [
            {"identifier": "has-readme", "status": "FAILURE", "level": "Bronze"},
            {"identifier": "has-owner", "status": "SUCCESS", "level": "Bronze"}]}}
    }]})
}

/// A fake Port API. `expire_first` answers the first search with 401 (an expired token).
async fn fake_port(expire_first: bool) -> (Fake, Arc<AtomicUsize>) {
    let tokens = Arc::new(AtomicUsize::new(0));
    let t = tokens.clone();
    let expired = Arc::new(AtomicUsize::new(usize::from(expire_first)));
    let page1: Value =
        serde_json::from_slice(&fixture("port/entities-search-response.json")).unwrap();
    let fake = Fake::start(move |r: &Received, _| {
        let ok = |v: Value| (200, vec![("content-type".to_string(), "application/json".to_string())], v.to_string());
        match (r.method.as_str(), r.path.as_str()) {
            ("POST", "/v1/auth/access_token") => {
                let body = r.json();
                assert_eq!(body["clientId"], "port-client-id");
                let n = t.fetch_add(1, Ordering::SeqCst) + 1;
                ok(json!({"ok": true, "accessToken": format!("tok-{n}"), "expiresIn": 10800, "tokenType": "Bearer"}))
            }
            ("POST", "/v1/blueprints/service/entities/search") => {
                if expired.load(Ordering::SeqCst) > 0 {
                    expired.store(0, Ordering::SeqCst);
                    return (401, vec![], json!({"ok": false, "error": "token_expired", "message": "expired"}).to_string());
                }
                if r.json().get("from").is_some() {
                    ok(page_two())
                } else {
                    ok(page1.clone())
                }
            }
            ("PATCH", p) if p.starts_with("/v1/actions/runs/") => ok(json!({"ok": true, "run": {}})),
            ("POST", p) if p.ends_with("/logs") => ok(json!({"ok": true})),
            _ => (404, vec![], json!({"ok": false, "error": "not_found"}).to_string()),
        }
    })
    .await;
    (fake, tokens)
}

/// A fake Slack Web API; channels listed in `broken` answer `channel_not_found`.
async fn fake_slack(broken: &'static [&'static str]) -> Fake {
    Fake::start(move |r: &Received, _| {
        let ok = |v: Value| {
            (
                200,
                vec![("content-type".to_string(), "application/json".to_string())],
                v.to_string(),
            )
        };
        let ch = r.json()["channel"].as_str().unwrap_or("").to_string();
        if broken.contains(&ch.as_str()) {
            return ok(json!({"ok": false, "error": "channel_not_found"}));
        }
        ok(json!({"ok": true, "channel": ch, "ts": "1790000000.000100"}))
    })
    .await
}

async fn engine(port: &Fake, slack: &Fake, extra: &[(&str, &str)]) -> Engine {
    let (tmp, rules) = Engine::workspace(extra, true);
    let port_url = port.url("");
    let slack_url = slack.url("/api/");
    Engine::start(
        tmp,
        rules,
        &[
            ("PORT_CLIENT_SECRET", SECRET),
            ("PORT_CLIENT_ID", "port-client-id"),
            ("PORT_API_URL", port_url.as_str()),
            ("SLACK_BOT_TOKEN", "xoxb-test"),
            ("SLACK_API_URL", slack_url.as_str()),
        ],
    )
    .await
}

fn patches(port: &Fake) -> Vec<(String, Value)> {
    port.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| (r.path.clone(), r.json()))
        .collect()
}

fn logs(port: &Fake, run: &str) -> Vec<String> {
    port.on_path(&format!("/v1/actions/runs/{run}/logs"))
        .iter()
        .map(|r| r.json()["message"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn an_action_run_sends_one_reminder_per_team_and_reports_success() {
    let (port, tokens) = fake_port(false).await;
    let slack = fake_slack(&[]).await;
    let e = engine(&port, &slack, &[]).await;
    let (status, reply) = e
        .post_port(
            "port-actions",
            SECRET,
            &fixture("port/action-run-legacy.json"),
        )
        .await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(reply["event_id"], "port:run:r_Kkzy25Ge8YwLsTVh");

    let posts = slack.wait_for("/api/chat.postMessage", 4, 20).await;
    let mut channels: Vec<String> = posts
        .iter()
        .map(|p| p.json()["channel"].as_str().unwrap().to_string())
        .collect();
    channels.sort();
    assert_eq!(
        channels,
        ["#data", "#payments", "#platform", "#search"],
        "one message per team, page 2 included"
    );
    let platform = posts
        .iter()
        .find(|p| p.json()["channel"] == "#platform")
        .unwrap()
        .json();
    let text = platform["blocks"].to_string();
    assert!(
        text.contains("platform-auth")
            && text.contains("has-owner")
            && text.contains("platform-gateway"),
        "{text}"
    );

    let searches = port.on_path("/v1/blueprints/service/entities/search");
    assert_eq!(searches.len(), 2, "followed the cursor to page 2");
    assert_eq!(
        searches[1].json()["from"],
        "eyJzb3J0IjpbInBsYXRmb3JtLWF1dGgiXSwicGFnZSI6Mn0"
    );
    assert_eq!(
        searches[0].headers.get("authorization").map(String::as_str),
        Some("Bearer tok-1")
    );

    let patched = eventually(20, "the run PATCH", || {
        let p = patches(&port);
        (!p.is_empty()).then_some(p)
    })
    .await;
    assert_eq!(patched.len(), 1);
    assert_eq!(patched[0].0, "/v1/actions/runs/r_Kkzy25Ge8YwLsTVh");
    assert_eq!(patched[0].1["status"], "SUCCESS");
    assert_eq!(patched[0].1["statusLabel"], "Reminders sent");
    assert_eq!(
        patched[0].1["summary"],
        "Sent 4 ProductionReadiness reminder(s), one per team"
    );
    let lines = logs(&port, "r_Kkzy25Ge8YwLsTVh");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("sending 4 message(s)") && l.contains("#platform")),
        "progress line: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l == "delivered 4 message(s)"),
        "final line: {lines:?}"
    );
    assert_eq!(tokens.load(Ordering::SeqCst), 1, "one token for every call");

    // The same run id delivered again is processed once.
    let (status, reply) = e
        .post_port(
            "port-actions",
            SECRET,
            &fixture("port/action-run-legacy.json"),
        )
        .await;
    assert_eq!((status, reply["duplicate"].clone()), (202, json!(true)));
}

#[tokio::test]
async fn a_slack_failure_reports_failure_with_the_reason() {
    let (port, _) = fake_port(false).await;
    let slack = fake_slack(&["#platform"]).await;
    let e = engine(&port, &slack, &[]).await;
    let (status, _) = e
        .post(
            "/hooks/port-actions",
            &fixture("port/action-run-custom.json"),
            &[
                ("content-type", "application/json"),
                ("RUN_ID", "r_6AZQMDvVXYo5pHII"),
                (
                    "x-port-timestamp",
                    &chrono::Utc::now().timestamp().to_string(),
                ),
                (
                    "x-port-signature",
                    &switchyard::sources::port::sign(
                        SECRET,
                        &chrono::Utc::now().timestamp().to_string(),
                        &fixture("port/action-run-custom.json"),
                    ),
                ),
            ],
        )
        .await;
    assert_eq!(status, 202);
    let patched = eventually(20, "the run PATCH", || {
        let p = patches(&port);
        (!p.is_empty()).then_some(p)
    })
    .await;
    assert_eq!(patched[0].0, "/v1/actions/runs/r_6AZQMDvVXYo5pHII");
    assert_eq!(patched[0].1["status"], "FAILURE");
    assert_eq!(patched[0].1["statusLabel"], "Some reminders failed");
    let summary = patched[0].1["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("1 reminder(s) could not be delivered")
            && summary.contains("channel_not_found"),
        "{summary}"
    );
    let lines = logs(&port, "r_6AZQMDvVXYo5pHII");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("1 of 4 message(s) failed") && l.contains("channel_not_found")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| !l.contains(SECRET) && !l.contains("xoxb")),
        "no secrets in run logs"
    );
}

#[tokio::test]
async fn an_expired_token_is_refreshed_once() {
    let (port, tokens) = fake_port(true).await;
    let slack = fake_slack(&[]).await;
    let e = engine(&port, &slack, &[]).await;
    e.post_port(
        "port-actions",
        SECRET,
        &fixture("port/action-run-legacy.json"),
    )
    .await;
    eventually(20, "the run PATCH", || {
        (!patches(&port).is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        tokens.load(Ordering::SeqCst),
        2,
        "one refresh after the 401"
    );
    let searches = port.on_path("/v1/blueprints/service/entities/search");
    assert_eq!(
        searches[0].headers.get("authorization").map(String::as_str),
        Some("Bearer tok-1")
    );
    assert_eq!(
        searches[1].headers.get("authorization").map(String::as_str),
        Some("Bearer tok-2")
    );
    assert_eq!(patches(&port)[0].1["status"], "SUCCESS");
}

#[tokio::test]
async fn a_run_no_rule_handles_is_reported_as_failure() {
    let (port, _) = fake_port(false).await;
    let slack = fake_slack(&[]).await;
    let e = engine(&port, &slack, &[]).await;
    // The platform `port` source knows no action for author-defined bodies: nothing matches.
    let (status, reply) = e
        .post_port("port", SECRET, br#"{"runId": "r_nobody", "note": "x"}"#)
        .await;
    assert_eq!((status, reply["dispatches"].clone()), (202, json!(0)));
    let patched = eventually(20, "the run PATCH", || {
        let p = patches(&port);
        (!p.is_empty()).then_some(p)
    })
    .await;
    assert_eq!(patched[0].0, "/v1/actions/runs/r_nobody");
    assert_eq!(patched[0].1["status"], "FAILURE");
    assert!(logs(&port, "r_nobody")
        .iter()
        .any(|l| l.contains("no rule matched this run")));
}

#[tokio::test]
async fn a_schedule_fires_and_sends_the_reminder() {
    let (port, _) = fake_port(false).await;
    let slack = fake_slack(&[]).await;
    // A seconds-level schedule feeding the shipped reminder rule's queries and template.
    let tick = r##"
schedules:
  every-two-seconds: { cron: "*/2 * * * * *" }
rules:
  - id: tick-reminder
    on: schedule/every-two-seconds
    with:
      services: { port: port-api, search: { blueprint: service } }
    send:
      - to: slack-bot
        for_each: '{{raw_json (scorecard_teams with.services "ProductionReadiness")}}'
        channel: "#{{item.team}}"
        template: readiness-reminder
"##;
    let e = engine(&port, &slack, &[("tick.yaml", tick)]).await;
    let posts = slack.wait_for("/api/chat.postMessage", 4, 20).await;
    let context = posts[0].json()["blocks"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()["elements"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        context.contains("weekly reminder") || context.contains("Scorecard"),
        "{context}"
    );
    assert!(
        patches(&port).is_empty(),
        "a scheduled reminder has no run to report"
    );
    let status = e.get_json("/status").await;
    assert_eq!(status["reload"]["ok"], true);
    tokio::time::sleep(Duration::from_millis(100)).await;
}
