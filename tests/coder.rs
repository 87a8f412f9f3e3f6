//! Coder notifications to Slack DMs, and Slack interactivity, end to end against a fake Slack
//! Web API on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{dead_letters, eventually, fixture, Engine, Fake, Received};
use serde_json::{json, Value};

const TOKEN: &str = "coder-e2e-token";
const BOT: &str = "xoxb-e2e-bot-token";
const SIGNING: &str = "slack-e2e-signing-secret";

/// A fake Slack Web API: priya and marco exist, everyone else is `users_not_found`.
async fn fake_web_api() -> Fake {
    Fake::start(|r: &Received, _| {
        let ok = |v: Value| (200, vec![("content-type".to_string(), "application/json".to_string())], v.to_string());
        match r.path.as_str() {
            "/api/users.lookupByEmail" => {
                let email = form_urlencoded::parse(r.query.as_bytes()).find(|(k, _)| k == "email").map(|(_, v)| v.into_owned()).unwrap_or_default();
                match email.as_str() {
                    "priya.raman@example.com" => ok(json!({"ok": true, "user": {"id": "U05LHPP95C", "team_id": "T0NXJEIPJC", "deleted": false}})),
                    "marco.bianchi@example.com" => ok(json!({"ok": true, "user": {"id": "U0MARCO001", "team_id": "T0NXJEIPJC"}})),
                    _ => ok(json!({"ok": false, "error": "users_not_found"})),
                }
            }
            "/api/chat.postMessage" => {
                let ch = r.json()["channel"].as_str().unwrap_or("").to_string();
                ok(json!({"ok": true, "channel": ch, "ts": "1789999760.000200"}))
            }
            _ => (404, vec![], "not found".into()),
        }
    })
    .await
}

async fn engine(slack: &Fake, extra: &[(&str, &str)], with_bot: bool) -> Engine {
    let (tmp, rules) = Engine::workspace(extra, true);
    let api = slack.url("/api/");
    let mut env = vec![
        ("CODER_WEBHOOK_TOKEN", TOKEN),
        ("SLACK_SIGNING_SECRET", SIGNING),
        ("SLACK_API_URL", api.as_str()),
    ];
    if with_bot {
        env.push(("SLACK_BOT_TOKEN", BOT));
    }
    Engine::start(tmp, rules, &env).await
}

async fn post_coder(e: &Engine, body: &[u8]) -> (u16, Value) {
    e.post(
        &format!("/hooks/coder/{TOKEN}"),
        body,
        &[("content-type", "application/json")],
    )
    .await
}

#[tokio::test]
async fn a_coder_notification_becomes_one_dm_with_a_button_per_action() {
    let slack = fake_web_api().await;
    let e = engine(&slack, &[], true).await;
    let (status, reply) = post_coder(&e, &fixture("coder/workspace-deleted.json")).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(reply["dispatches"], 1);
    let posts = slack.wait_for("/api/chat.postMessage", 1, 10).await;
    let lookups = slack.on_path("/api/users.lookupByEmail");
    assert_eq!(lookups.len(), 1);
    assert_eq!(
        lookups[0].headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {BOT}").as_str())
    );
    let msg = posts[0].json();
    assert_eq!(
        msg["channel"], "U05LHPP95C",
        "DM to the user id found by email"
    );
    assert_eq!(msg["text"], "Workspace \"priya-search-sandbox\" deleted");
    let blocks = msg["blocks"].as_array().unwrap();
    assert_eq!(blocks[0]["type"], "header");
    assert_eq!(
        blocks[0]["text"]["text"],
        "Workspace \"priya-search-sandbox\" deleted"
    );
    assert_eq!(
        blocks[1]["text"]["text"],
        "Your workspace *priya-search-sandbox* was deleted.\n\nThe specified reason was \"*idle &gt; 30 days &amp; disk usage &lt; 1 GiB (marco)*\"."
    );
    let buttons = blocks[2]["elements"].as_array().unwrap();
    assert_eq!(buttons.len(), 2);
    assert_eq!(buttons[0]["url"], "https://coder.example.com/workspaces");
    assert_eq!(buttons[1]["text"]["text"], "View templates");
}

#[tokio::test]
async fn ten_notifications_for_one_user_make_one_lookup() {
    let slack = fake_web_api().await;
    // The same rules with a faster per-channel pace, so the burst is quick to deliver.
    let fast = r#"
destinations:
  fast-bot:
    slack: { token: "${SLACK_BOT_TOKEN}", api_url: "${SLACK_API_URL}" }
    rate_per_second: 50
rules:
  - id: fast-dm
    on: coder/notification
    where: ['$.labels.name == "priya-payments-dev"']
    send: [{ to: fast-bot, user_email: "{{user.email}}", template: coder-notification }]
    stop: true
"#;
    let (tmp, rules) = Engine::workspace(&[], true);
    // Evaluated before the shipped files (file names sort first).
    std::fs::write(rules.join("0-fast.yaml"), fast).unwrap();
    let api = slack.url("/api/");
    let e = Engine::start(
        tmp,
        rules,
        &[
            ("CODER_WEBHOOK_TOKEN", TOKEN),
            ("SLACK_SIGNING_SECRET", SIGNING),
            ("SLACK_API_URL", api.as_str()),
            ("SLACK_BOT_TOKEN", BOT),
        ],
    )
    .await;
    let base: Value =
        serde_json::from_slice(&fixture("coder/workspace-autobuild-failed.json")).unwrap();
    // Ten concurrent requests: a real burst.
    let url = e.url(&format!("/hooks/coder/{TOKEN}"));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut b = base.clone();
        b["msg_id"] = json!(format!("00000000-0000-0000-0000-00000000000{i}"));
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .json(&b)
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 202);
    }
    slack.wait_for("/api/chat.postMessage", 10, 20).await;
    assert_eq!(
        slack.on_path("/api/users.lookupByEmail").len(),
        1,
        "one lookup for the burst"
    );
}

#[tokio::test]
async fn users_not_found_becomes_a_dead_letter_with_that_reason() {
    let slack = fake_web_api().await;
    let e = engine(&slack, &[], true).await;
    let mut b: Value = serde_json::from_slice(&fixture("coder/test-notification.json")).unwrap();
    b["payload"]["user_email"] = json!("nobody@example.com");
    let (status, _) = post_coder(&e, &serde_json::to_vec(&b).unwrap()).await;
    assert_eq!(status, 202);
    let dead = eventually(10, "a dead letter", || {
        let d = dead_letters(&e.data);
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert!(
        dead[0].last_error.contains("users_not_found"),
        "{}",
        dead[0].last_error
    );
    assert!(slack.on_path("/api/chat.postMessage").is_empty());
}

#[tokio::test]
async fn a_duplicate_msg_id_is_sent_once() {
    let slack = fake_web_api().await;
    let e = engine(&slack, &[], true).await;
    let body = fixture("coder/workspace-manually-updated.json");
    let (s1, r1) = post_coder(&e, &body).await;
    let (s2, r2) = post_coder(&e, &body).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(r1["dispatches"], 1);
    assert_eq!(r2["duplicate"], true);
    assert_eq!(r2["dispatches"], 0);
    slack.wait_for("/api/chat.postMessage", 1, 10).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(slack.on_path("/api/chat.postMessage").len(), 1);
}

/// The dedup window outlives the process: after kill -9 and a restart on the same data
/// directory (the window rebuilt from the outbox's log), Coder's retry of a notification is
/// still a duplicate, and `switchyard_dedup_keys` counts the key.
#[tokio::test]
async fn a_duplicate_msg_id_after_a_restart_is_still_sent_once() {
    let slack = fake_web_api().await;
    let mut e = engine(&slack, &[], true).await;
    let body = fixture("coder/workspace-manually-updated.json");
    let (s1, r1) = post_coder(&e, &body).await;
    assert_eq!((s1, r1["dispatches"].as_i64()), (202, Some(1)));
    slack.wait_for("/api/chat.postMessage", 1, 10).await;
    e.kill();
    e.spawn().await;
    let metrics = e.get_text("/metrics").await;
    assert!(
        metrics.lines().any(|l| l == "switchyard_dedup_keys 1"),
        "{metrics}"
    );
    let (s2, r2) = post_coder(&e, &body).await;
    assert_eq!(s2, 202);
    assert_eq!(r2["duplicate"], true, "{r2}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(slack.on_path("/api/chat.postMessage").len(), 1);
}

#[tokio::test]
async fn missing_fields_are_400_naming_the_field_and_a_bad_token_is_401() {
    let slack = fake_web_api().await;
    let e = engine(&slack, &[], true).await;
    let mut b: Value = serde_json::from_slice(&fixture("coder/test-notification.json")).unwrap();
    b["payload"].as_object_mut().unwrap().remove("user_email");
    let (status, reply) = post_coder(&e, &serde_json::to_vec(&b).unwrap()).await;
    assert_eq!(status, 400);
    assert!(reply["reason"]
        .as_str()
        .unwrap()
        .contains("payload.user_email"));
    let (status, _) = e
        .post(
            "/hooks/coder/wrong-token",
            &fixture("coder/test-notification.json"),
            &[("content-type", "application/json")],
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = e
        .post(
            "/hooks/coder",
            &fixture("coder/test-notification.json"),
            &[("content-type", "application/json")],
        )
        .await;
    assert_eq!(status, 401, "no token at all");
    let auth = format!("Bearer {TOKEN}");
    let (status, _) = e
        .post(
            "/hooks/coder",
            &fixture("coder/test-notification.json"),
            &[
                ("content-type", "application/json"),
                ("authorization", auth.as_str()),
            ],
        )
        .await;
    assert_eq!(status, 202, "bearer token works too");
    assert!(
        !e.logs().contains(TOKEN),
        "the URL token never reaches the logs"
    );
}

#[tokio::test]
async fn the_one_time_passcode_is_never_sent_to_a_channel_or_printed() {
    let slack = fake_web_api().await;
    // Without a bot token the DM destination falls back to the console: the OTP is refused.
    let e = engine(&slack, &[], false).await;
    let (status, reply) = post_coder(&e, &fixture("coder/one-time-passcode.json")).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(reply["dispatches"], 0);
    let (status, _) = post_coder(&e, &fixture("coder/test-notification.json")).await;
    assert_eq!(status, 202);
    eventually(10, "the test notification on the console", || {
        e.stdout().contains("A test notification").then_some(())
    })
    .await;
    let code = "8f4e25fa-686f-4ecf-9af1-914d3856ebfb";
    assert!(!e.stdout().contains(code), "OTP not printed");
    assert!(!e.logs().contains(code), "OTP not logged");
    assert!(e.logs().contains("refused to send a secret notification"));
    assert!(dead_letters(&e.data)
        .iter()
        .all(|d| !d.message.to_string().contains(code)));
    assert!(slack.requests().is_empty());

    // With the bot, it is DMed to its owner, and only to her.
    let slack = fake_web_api().await;
    let e = engine(&slack, &[], true).await;
    let (status, reply) = post_coder(&e, &fixture("coder/one-time-passcode.json")).await;
    assert_eq!((status, reply["dispatches"].clone()), (202, json!(1)));
    let posts = slack.wait_for("/api/chat.postMessage", 1, 10).await;
    assert_eq!(posts[0].json()["channel"], "U05LHPP95C");
    assert!(!e.logs().contains(code), "OTP not logged");
}

#[tokio::test]
async fn slack_interactivity_is_verified_acknowledged_and_routed() {
    let slack = fake_web_api().await;
    let e = engine(&slack, &[], true).await;
    let form = fixture("slack/block-actions.form");
    let ts = chrono::Utc::now().timestamp().to_string();
    let sig = switchyard::sources::slack::sign(SIGNING, &ts, &form);
    let ct = ("content-type", "application/x-www-form-urlencoded");
    let (status, body) = e
        .post(
            "/hooks/slack",
            &form,
            &[
                ct,
                ("x-slack-request-timestamp", &ts),
                ("x-slack-signature", &sig),
            ],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, Value::String(String::new()), "an empty 200");
    eventually(10, "the routed click on the console", || {
        e.stdout().contains("clicked View workspace").then_some(())
    })
    .await;
    let bad = switchyard::sources::slack::sign("wrong", &ts, &form);
    let (status, _) = e
        .post(
            "/hooks/slack",
            &form,
            &[
                ct,
                ("x-slack-request-timestamp", &ts),
                ("x-slack-signature", &bad),
            ],
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = e.post("/hooks/slack", b"ssl_check=1&token=x", &[ct]).await;
    assert_eq!(status, 200, "ssl_check is acknowledged without a signature");
}
