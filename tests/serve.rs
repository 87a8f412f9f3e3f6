//! `switchyard serve` end to end: the real binary, signed Port webhooks in, a fake Slack on
//! 127.0.0.1 receiving the Block Kit messages.

mod common;

use std::time::Duration;

use common::{dead_letters, delivery_rules, eventually, fixture, repo, Engine, Fake};
use serde_json::{json, Value};

const SECRET: &str = "e2e-port-secret";
const HOOK: &str = "/services/T0NXJEIPJC/B0000/XXXX";

async fn engine_with_shipped_rules(slack: &Fake) -> Engine {
    let (tmp, rules) = Engine::workspace(&[], true);
    let url = slack.url(HOOK);
    Engine::start(
        tmp,
        rules,
        &[
            ("PORT_CLIENT_SECRET", SECRET),
            ("SLACK_PLATFORM_WEBHOOK", url.as_str()),
        ],
    )
    .await
}

fn expected(name: &str) -> Value {
    serde_json::from_slice(
        &std::fs::read(repo("tests/expected").join(format!("{name}.json"))).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn changelog_and_automation_bodies_reach_slack_as_the_expected_block_kit() {
    let slack = Fake::slack_ok().await;
    // The health alert goes through the bot (it is a keyed message); the CPU alert through the
    // incoming webhook.
    let bot = common::slack::FakeSlack::start().await;
    let (tmp, rules) = Engine::workspace(&[], true);
    let url = slack.url(HOOK);
    let api = bot.api_url();
    let engine = Engine::start(
        tmp,
        rules,
        &[
            ("PORT_CLIENT_SECRET", SECRET),
            ("SLACK_PLATFORM_WEBHOOK", url.as_str()),
            ("SLACK_BOT_TOKEN", "xoxb-serve-test"),
            ("SLACK_API_URL", api.as_str()),
        ],
    )
    .await;
    let bot_message = |m: &common::slack::Message| json!({"text": m.text, "blocks": m.blocks});

    let (status, body) = engine
        .post_port(
            "port",
            SECRET,
            &fixture("port/changelog-update-cpu-spike.json"),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], true);
    assert_eq!(body["dispatches"], 2);
    assert!(body["event_id"]
        .as_str()
        .unwrap()
        .starts_with("port:sha256:"));
    let got = slack.wait_for(HOOK, 1, 15).await;
    assert_eq!(got[0].json(), expected("cpu-hot"));
    assert_eq!(
        got[0].headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    let alert = eventually(15, "the health alert from the bot", || {
        bot.top_level("C_PLATFORM").into_iter().next()
    })
    .await;
    assert_eq!(bot_message(&alert), expected("degraded"));

    let (status, body) = engine
        .post_port(
            "port",
            SECRET,
            &fixture("port/automation-entity-updated.json"),
        )
        .await;
    assert_eq!(
        (status, body["dispatches"].clone()),
        (202, Value::from(2)),
        "{body}"
    );
    let got = slack.wait_for(HOOK, 2, 15).await;
    assert_eq!(
        got[1].json(),
        expected("cpu-hot"),
        "the automation body produces the same messages"
    );
    // The same entity Degraded again: the alert is updated in place, not posted twice.
    let updated = eventually(15, "the health alert updated", || {
        bot.messages()
            .into_iter()
            .find(|m| m.ts == alert.ts && m.edits == 1)
    })
    .await;
    assert_eq!(bot_message(&updated), expected("degraded"));
    assert_eq!(bot.top_level("C_PLATFORM").len(), 1);
}

#[tokio::test]
async fn an_unmatched_event_is_accepted_and_sends_nothing() {
    let slack = Fake::slack_ok().await;
    let engine = engine_with_shipped_rules(&slack).await;
    let (status, body) = engine
        .post_port(
            "port",
            SECRET,
            &fixture("port/changelog-update-cpu-bump.json"),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(body["dispatches"], 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(slack.requests().is_empty());
}

#[tokio::test]
async fn every_bad_input_gets_its_status_and_a_reason_and_queues_nothing() {
    let slack = Fake::slack_ok().await;
    let engine = engine_with_shipped_rules(&slack).await;
    let spike = fixture("port/changelog-update-cpu-spike.json");
    let now = chrono::Utc::now().timestamp().to_string();
    let good_sig = switchyard::sources::port::sign(SECRET, &now, &spike);
    let json_ct = ("content-type", "application/json");

    // 401: wrong signature, missing headers, expired timestamp.
    let bad_sig = switchyard::sources::port::sign("wrong-secret", &now, &spike);
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a [u8], u16);
    let cases: Vec<Case> = vec![
        (
            vec![
                json_ct,
                ("x-port-timestamp", &now),
                ("x-port-signature", &bad_sig),
            ],
            &spike,
            401,
        ),
        (vec![json_ct, ("x-port-timestamp", &now)], &spike, 401),
        (vec![json_ct, ("x-port-signature", &good_sig)], &spike, 401),
        (
            vec![
                ("content-type", "text/plain"),
                ("x-port-timestamp", &now),
                ("x-port-signature", &good_sig),
            ],
            &spike,
            415,
        ),
    ];
    for (headers, body, want) in cases {
        let (status, reply) = engine.post("/hooks/port", body, &headers).await;
        assert_eq!(status, want, "{reply}");
        assert_eq!(reply["accepted"], false);
        assert!(
            reply["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{reply}"
        );
    }
    let stale = (chrono::Utc::now().timestamp() - 301).to_string();
    let (status, reply) = engine.post_port_ts("port", SECRET, &stale, &spike).await;
    assert_eq!(status, 401);
    assert!(reply["reason"].as_str().unwrap().contains("tolerance"));
    // 400: not JSON (correctly signed).
    let (status, reply) = engine.post_port("port", SECRET, b"this is not json").await;
    assert_eq!(status, 400, "{reply}");
    // 422: JSON of an unknown shape, naming what was looked for.
    let (status, reply) = engine
        .post_port("port", SECRET, br#"{"hello": "port"}"#)
        .await;
    assert_eq!(status, 422);
    assert!(reply["reason"].as_str().unwrap().contains("runId"));
    // 413: over the 1 MiB default limit.
    let big = vec![b' '; 1024 * 1024 + 1];
    let (status, _) = engine.post_port("port", SECRET, &big).await;
    assert_eq!(status, 413);
    // 404: unknown source.
    let (status, reply) = engine.post("/hooks/nope", b"{}", &[json_ct]).await;
    assert_eq!(status, 404);
    assert!(reply["reason"].as_str().unwrap().contains("nope"));
    // 503: a source whose secret is unset says which variable to set.
    let (status, reply) = engine.post("/hooks/coder/x", b"{}", &[json_ct]).await;
    assert_eq!(status, 503);
    assert!(reply["reason"]
        .as_str()
        .unwrap()
        .contains("CODER_WEBHOOK_TOKEN"));

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        slack.requests().is_empty(),
        "nothing was queued for rejected requests"
    );
    let status = engine.get_json("/status").await;
    assert_eq!(status["queue_depth"], 0);
    let text = serde_json::to_string(&status).unwrap();
    assert!(
        !text.contains(SECRET) && !text.contains(HOOK),
        "no secret in /status"
    );
    assert!(
        !engine.logs().contains(SECRET) && !engine.logs().contains("XXXX"),
        "no secret in the logs"
    );
}

#[tokio::test]
async fn signatures_in_seconds_and_milliseconds_both_pass() {
    let slack = Fake::slack_ok().await;
    let engine = engine_with_shipped_rules(&slack).await;
    let body = fixture("port/changelog-update-cpu-bump.json");
    let ms = chrono::Utc::now().timestamp_millis().to_string();
    let (status, reply) = engine.post_port_ts("port", SECRET, &ms, &body).await;
    assert_eq!(status, 202, "{reply}");
    let (status, reply) = engine
        .post_port(
            "port",
            SECRET,
            br#"{"port_context": {"runId": "r_1"}, "note": "x"}"#,
        )
        .await;
    assert_eq!(status, 202, "{reply}");
    // port-agent style: signed over the compact JSON, sent with spaces.
    let sent = br#"{"port_context": {"runId": "r_agent01"}, "note": "a, b: c", "n": [1, 2]}"#;
    let compact = switchyard::sources::port::minify_json_whitespace(sent);
    let ts = chrono::Utc::now().timestamp().to_string();
    let sig = switchyard::sources::port::sign(SECRET, &ts, &compact);
    let (status, reply) = engine
        .post(
            "/hooks/port",
            sent,
            &[
                ("content-type", "application/json"),
                ("x-port-timestamp", &ts),
                ("x-port-signature", &sig),
            ],
        )
        .await;
    assert_eq!(status, 202, "{reply}");
}

/// Rules with one slack_webhook destination and fast retries, for delivery behaviour.
async fn delivery_engine(slack: &Fake, extra: &str) -> Engine {
    let (tmp, rules) = Engine::workspace(
        &[("rules.yaml", &delivery_rules(&slack.url(HOOK), extra))],
        false,
    );
    Engine::start(tmp, rules, &[("PORT_CLIENT_SECRET", SECRET)]).await
}

#[tokio::test]
async fn a_429_with_retry_after_is_honoured_and_delivered_once() {
    let slack = Fake::start(|_, n| {
        if n == 1 {
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
    let engine = delivery_engine(&slack, "").await;
    let (status, _) = engine
        .post_port(
            "port",
            SECRET,
            &fixture("port/changelog-update-cpu-bump.json"),
        )
        .await;
    assert_eq!(status, 202);
    let got = slack.wait_for(HOOK, 2, 15).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        slack.on_path(HOOK).len(),
        2,
        "one 429, then one successful delivery"
    );
    assert!(
        got[1].at.duration_since(got[0].at) >= Duration::from_millis(950),
        "waited as Retry-After asked"
    );
    assert_eq!(got[0].body, got[1].body);
    assert!(dead_letters(&engine.data).is_empty());
}

/// Posts the CPU-bump changelog (202 expected) and waits for its dead letters.
async fn post_until_dead_letter(engine: &Engine) -> (Value, Vec<switchyard::outbox::DeadLetter>) {
    let (status, reply) = engine
        .post_port(
            "port",
            SECRET,
            &fixture("port/changelog-update-cpu-bump.json"),
        )
        .await;
    assert_eq!(status, 202, "{reply}");
    let dead = eventually(10, "a dead letter", || {
        let d = dead_letters(&engine.data);
        (!d.is_empty()).then_some(d)
    })
    .await;
    (reply, dead)
}

#[tokio::test]
async fn channel_not_found_is_a_dead_letter_after_one_try() {
    let slack = Fake::start(|_, _| (404, vec![], "channel_not_found".into())).await;
    let engine = delivery_engine(&slack, "").await;
    let (reply, dead) = post_until_dead_letter(&engine).await;
    assert_eq!(slack.on_path(HOOK).len(), 1);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].destination, "alerts");
    assert_eq!(dead[0].rule, "any-update");
    assert_eq!(dead[0].event_id, reply["event_id"].as_str().unwrap());
    assert!(
        dead[0].last_error.contains("channel_not_found"),
        "{}",
        dead[0].last_error
    );
    assert_eq!(dead[0].attempts.len(), 1);
    assert_eq!(dead[0].message["text"], "payments-deploy-prod cpu 55");
    assert!(
        engine.logs().contains("channel_not_found"),
        "the reason is logged"
    );
}

#[tokio::test]
async fn a_redirect_is_a_dead_letter_and_is_not_followed() {
    // The fake answers the webhook with 302 to another path of its own: a client that followed
    // it would send a GET there, get 200, and count the message as delivered.
    let slack = Fake::start(|r, _| {
        if r.path == HOOK {
            (
                302,
                vec![("Location".into(), "/elsewhere".into())],
                String::new(),
            )
        } else {
            (200, vec![], "ok".into())
        }
    })
    .await;
    let engine = delivery_engine(&slack, "").await;
    let (_, dead) = post_until_dead_letter(&engine).await;
    assert!(
        dead[0].last_error.contains("HTTP 302"),
        "{}",
        dead[0].last_error
    );
    assert!(
        dead[0].last_error.contains("redirect"),
        "{}",
        dead[0].last_error
    );
    assert!(
        !dead[0].last_error.contains("/elsewhere"),
        "the Location is not repeated"
    );
    assert_eq!(
        slack.on_path(HOOK).len(),
        1,
        "one try: a redirect is permanent"
    );
    assert!(
        slack.on_path("/elsewhere").is_empty(),
        "the redirect was not followed"
    );
}

#[tokio::test]
async fn texts_over_slack_limits_are_cut_not_rejected() {
    let slack = Fake::slack_ok().await;
    let long_rule = format!(
        r#"sources:
  port: {{ port: {{ client_secret: "${{PORT_CLIENT_SECRET}}" }} }}
destinations:
  alerts: {{ slack_webhook: {{ url: "{}" }} }}
rules:
  - id: long
    on: port/entity.updated
    send:
      - to: alerts
        blocks:
          - {{ type: header, text: {{ type: plain_text, text: "{}{{{{entity.title}}}}" }} }}
"#,
        slack.url(HOOK),
        "H".repeat(200)
    );
    let (tmp, rules) = Engine::workspace(&[("rules.yaml", &long_rule)], false);
    let engine = Engine::start(tmp, rules, &[("PORT_CLIENT_SECRET", SECRET)]).await;
    let (status, _) = engine
        .post_port(
            "port",
            SECRET,
            &fixture("port/changelog-update-cpu-bump.json"),
        )
        .await;
    assert_eq!(status, 202);
    let got = slack.wait_for(HOOK, 1, 10).await;
    let header = got[0].json()["blocks"][0]["text"]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(header.chars().count(), 150);
    assert!(header.ends_with('…'));
}

#[tokio::test]
async fn the_outbox_full_answers_503_with_retry_after() {
    let slack = Fake::start(|_, _| (500, vec![], "down".into())).await;
    let (tmp, rules) = Engine::workspace(
        &[("rules.yaml", &delivery_rules(&slack.url(HOOK), ""))],
        false,
    );
    let mut engine = Engine::start(tmp, rules, &[("PORT_CLIENT_SECRET", SECRET)]).await;
    engine.kill();
    // Restart with room for one pending delivery.
    let mut cmd_env = engine.env.clone();
    cmd_env.push(("SWITCHYARD_MAX_PENDING".into(), "1".into()));
    engine.env = cmd_env;
    engine.spawn().await;
    let body1 = fixture("port/changelog-update-cpu-bump.json");
    let (s1, _) = engine.post_port("port", SECRET, &body1).await;
    assert_eq!(s1, 202);
    let body2 = fixture("port/changelog-update-cpu-spike.json");
    let client = reqwest::Client::new();
    let ts = chrono::Utc::now().timestamp().to_string();
    let sig = switchyard::sources::port::sign(SECRET, &ts, &body2);
    let resp = client
        .post(engine.url("/hooks/port"))
        .header("content-type", "application/json")
        .header("x-port-timestamp", &ts)
        .header("x-port-signature", sig)
        .body(body2)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().get("retry-after").is_some());
}

#[tokio::test]
async fn a_webhook_destination_gets_its_templated_body_and_headers() {
    let hook = Fake::start(|r, _| {
        if r.headers.get("x-api-key").map(String::as_str) == Some("k-123") {
            (200, vec![], "{}".into())
        } else {
            (403, vec![], "forbidden".into())
        }
    })
    .await;
    let rules = format!(
        r#"sources:
  port: {{ port: {{ client_secret: "${{PORT_CLIENT_SECRET}}" }} }}
destinations:
  audit:
    webhook:
      url: "{}"
      method: PUT
      headers:
        X-Api-Key: "${{AUDIT_KEY}}"
        X-Rule: "{{{{rule}}}}"
      template: audit-body
rules:
  - id: audit-updates
    on: port/entity.updated
    send: [{{ to: audit, text: unused }}]
"#,
        hook.url("/audit")
    );
    let body_tpl = r#"{"entity": "{{plain entity.identifier}}", "cpu": {{json after.properties.cpuUtil}}, "by": "{{plain trigger.by.userId}}"}"#;
    let (tmp, dir) = Engine::workspace(
        &[
            ("rules.yaml", &rules),
            ("templates/audit-body.hbs", body_tpl),
        ],
        false,
    );
    let engine = Engine::start(
        tmp,
        dir,
        &[("PORT_CLIENT_SECRET", SECRET), ("AUDIT_KEY", "k-123")],
    )
    .await;
    let (status, _) = engine
        .post_port(
            "port",
            SECRET,
            &fixture("port/changelog-update-cpu-spike.json"),
        )
        .await;
    assert_eq!(status, 202);
    let got = Fake::wait_for(&hook, "/audit", 1, 10).await;
    assert_eq!(got[0].method, "PUT");
    assert_eq!(
        got[0].headers.get("x-rule").map(String::as_str),
        Some("audit-updates")
    );
    assert_eq!(
        got[0].json(),
        serde_json::json!({"entity": "payments-deploy-prod", "cpu": 91, "by": "ew5sSezKm38bJ2PGmPWB0sDITK7GPic3@clients"})
    );
    assert!(dead_letters(&engine.data).is_empty());
}
