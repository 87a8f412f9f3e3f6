//! Keyed messages end to end, against a fake Slack that keeps its messages: a Degraded alert is
//! posted, the recovery updates that same message and replies in its thread, and the key then
//! starts over; a message deleted in Slack is posted anew; a rate-limited update keeps its order;
//! and a key survives `kill -9`.

mod common;

use common::slack::FakeSlack;
use common::{eventually, fixture, Engine};
use serde_json::{json, Value};

const SECRET: &str = "lifecycle-secret";

fn rules(api: &str) -> String {
    format!(
        r##"sources:
  port: {{ port: {{ client_secret: "${{PORT_CLIENT_SECRET}}" }} }}
destinations:
  slack-bot:
    slack: {{ token: "xoxb-test-token", api_url: "{api}" }}
    rate_per_second: 1000
    retry_initial: 50ms
    retry_max: 500ms
rules:
  - id: degraded
    on: port/entity.updated
    where: [ '$.after.properties.healthStatus changed_to "Degraded"' ]
    send:
      - to: slack-bot
        channel: "#platform"
        key: "health:{{{{entity.identifier}}}}"
        text: ":red_circle: {{{{entity.identifier}}}} is Degraded"
  - id: recovered
    on: port/entity.updated
    where: [ '$.after.properties.healthStatus changed_to "Healthy"' ]
    send:
      - to: slack-bot
        channel: "#platform"
        key: "health:{{{{entity.identifier}}}}"
        as: resolve
        text: ":large_green_circle: {{{{entity.identifier}}}} is Healthy"
        reply: "Recovered: {{{{entity.identifier}}}} is healthy again"
"##
    )
}

/// A changelog update of `entity` from health `from` to `to` (`seq` keeps bodies distinct).
fn change(entity: &str, from: &str, to: &str, seq: u32) -> Vec<u8> {
    let mut v: Value =
        serde_json::from_slice(&fixture("port/changelog-update-cpu-spike.json")).unwrap();
    v["context"]["entity"] = json!(entity);
    v["diff"]["before"]["identifier"] = json!(entity);
    v["diff"]["after"]["identifier"] = json!(entity);
    v["diff"]["before"]["properties"]["healthStatus"] = json!(from);
    v["diff"]["after"]["properties"]["healthStatus"] = json!(to);
    v["diff"]["after"]["properties"]["seq"] = json!(seq);
    serde_json::to_vec(&v).unwrap()
}

async fn start(slack: &FakeSlack) -> Engine {
    let text = rules(&slack.api_url());
    let (tmp, dir) = Engine::workspace(&[("rules.yaml", text.as_str())], false);
    Engine::start(tmp, dir, &[("PORT_CLIENT_SECRET", SECRET)]).await
}

async fn send(e: &Engine, body: &[u8]) {
    let (status, r) = e.post_port("port", SECRET, body).await;
    assert_eq!(status, 202, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degrade_then_recover_updates_the_alert_and_replies_in_its_thread() {
    let slack = FakeSlack::start().await;
    let e = start(&slack).await;

    send(&e, &change("payments-api", "Healthy", "Degraded", 1)).await;
    let first = eventually(10, "the Degraded alert", || {
        slack.top_level("C_PLATFORM").into_iter().next()
    })
    .await;
    assert!(first.text.contains("is Degraded"), "{first:?}");

    // Recovery: the same message turns green, and its thread says so; nothing new at the top.
    send(&e, &change("payments-api", "Degraded", "Healthy", 2)).await;
    eventually(10, "the thread reply", || {
        (!slack.replies(&first.ts).is_empty()).then_some(())
    })
    .await;
    let top = slack.top_level("C_PLATFORM");
    assert_eq!(top.len(), 1, "{top:?}");
    assert!(
        top[0].text.contains("is Healthy") && top[0].edits == 1,
        "{top:?}"
    );
    let replies = slack.replies(&first.ts);
    assert_eq!(replies.len(), 1);
    assert!(replies[0].text.contains("Recovered: payments-api"));
    // The update went out before the reply.
    let calls: Vec<String> = slack
        .fake
        .requests()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        calls,
        [
            "/api/chat.postMessage",
            "/api/chat.update",
            "/api/chat.postMessage"
        ]
    );

    // Resolved closes the key: the next Degraded is a new message.
    send(&e, &change("payments-api", "Healthy", "Degraded", 3)).await;
    eventually(10, "a second alert", || {
        (slack.top_level("C_PLATFORM").len() == 2).then_some(())
    })
    .await;
    // A different entity has its own key.
    send(&e, &change("orders-api", "Healthy", "Degraded", 4)).await;
    eventually(10, "a third alert", || {
        (slack.top_level("C_PLATFORM").len() == 3).then_some(())
    })
    .await;
    let status = e.get_json("/status").await;
    assert_eq!(status["keys"]["open"], 2, "{status}");
    assert_eq!(
        status["keys"]["list"][0]["key"], "health:orders-api",
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_deleted_in_slack_is_posted_again_and_a_rate_limit_keeps_the_order() {
    let slack = FakeSlack::start().await;
    let e = start(&slack).await;
    send(&e, &change("payments-api", "Healthy", "Degraded", 1)).await;
    let first = eventually(10, "the alert", || {
        slack.top_level("C_PLATFORM").into_iter().next()
    })
    .await;

    // Someone deletes the alert; the recovery cannot update it (message_not_found), so it posts
    // the recovered message instead, and its reply goes into the new message's thread.
    slack.delete(&first.ts);
    send(&e, &change("payments-api", "Degraded", "Healthy", 2)).await;
    eventually(10, "the recovery posted anew", || {
        let top: Vec<_> = slack
            .top_level("C_PLATFORM")
            .into_iter()
            .filter(|m| !m.deleted)
            .collect();
        (top.len() == 1 && top[0].text.contains("Healthy") && slack.replies(&top[0].ts).len() == 1)
            .then_some(())
    })
    .await;

    // A rate-limited update is retried after Retry-After, and the reply still follows it.
    send(&e, &change("billing-api", "Healthy", "Degraded", 3)).await;
    let alert = eventually(10, "the billing alert", || {
        slack
            .top_level("C_PLATFORM")
            .into_iter()
            .find(|m| m.text.contains("billing-api"))
    })
    .await;
    slack.fail_next("chat.update", "ratelimited");
    send(&e, &change("billing-api", "Degraded", "Healthy", 4)).await;
    eventually(
        15,
        "the update after the rate limit, then the reply",
        || {
            let m = slack.messages().into_iter().find(|m| m.ts == alert.ts)?;
            (m.edits == 1 && m.text.contains("Healthy") && slack.replies(&alert.ts).len() == 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        slack.calls("chat.update"),
        3,
        "one update failed, one retried, one for payments-api"
    );
    let _ = common::block_on(async { e.get_json("/status").await });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_survives_kill_9() {
    let slack = FakeSlack::start().await;
    let mut e = start(&slack).await;
    send(&e, &change("payments-api", "Healthy", "Degraded", 1)).await;
    let first = eventually(10, "the alert", || {
        slack.top_level("C_PLATFORM").into_iter().next()
    })
    .await;
    eventually(10, "the alert recorded", || {
        (common::block_on(e.get_json("/status"))["queue_depth"] == 0).then_some(())
    })
    .await;
    e.kill();
    e.spawn().await;
    send(&e, &change("payments-api", "Degraded", "Healthy", 2)).await;
    eventually(10, "the original message updated after the restart", || {
        let m = slack.messages().into_iter().find(|m| m.ts == first.ts)?;
        (m.edits == 1 && slack.replies(&first.ts).len() == 1).then_some(())
    })
    .await;
    assert_eq!(slack.top_level("C_PLATFORM").len(), 1);
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("SWITCHYARD_ADMIN_TOKEN", "admin-token")
        .output()
        .unwrap()
}

fn said(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A silence from the CLI suppresses the matching alert (counted on /status and in /metrics),
/// lets others through, survives a restart, and once expired lets the alert through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silence_suppresses_matching_sends_until_it_is_expired() {
    let slack = FakeSlack::start().await;
    let text = rules(&slack.api_url());
    let (tmp, dir) = Engine::workspace(&[("rules.yaml", text.as_str())], false);
    let mut e = Engine::start(
        tmp,
        dir,
        &[
            ("PORT_CLIENT_SECRET", SECRET),
            ("SWITCHYARD_ADMIN_TOKEN", "admin-token"),
        ],
    )
    .await;
    let server = e.url("");

    // Refused: an unknown rule, a bad matcher, no end. Each says why, exit 1.
    for (args, why) in [
        (vec!["--rule", "nope", "--for", "2h"], "no rule `nope`"),
        (
            vec!["--rule", "degraded", "--match", "$.x ===", "--for", "2h"],
            "matcher `$.x ===`",
        ),
        (vec!["--rule", "degraded"], "needs an end"),
    ] {
        let mut a = vec!["silence", "add", "--server", &server, "--author", "ana"];
        a.extend(args);
        let o = cli(&a);
        assert_eq!(o.status.code(), Some(1), "{}", said(&o));
        assert!(said(&o).contains(why), "{}", said(&o));
    }

    let o = cli(&[
        "silence",
        "add",
        "--server",
        &server,
        "--rule",
        "degraded",
        "--match",
        "$.entity.identifier == \"payments-api\"",
        "--for",
        "2h",
        "--author",
        "ana",
        "--comment",
        "maintenance window",
    ]);
    assert!(
        o.status.success() && said(&o).contains("silence 1 added"),
        "{}",
        said(&o)
    );

    send(&e, &change("payments-api", "Healthy", "Degraded", 1)).await;
    send(&e, &change("orders-api", "Healthy", "Degraded", 2)).await;
    let posted = eventually(10, "the alert that is not silenced", || {
        let top = slack.top_level("C_PLATFORM");
        (top.len() == 1).then_some(top)
    })
    .await;
    assert!(posted[0].text.contains("orders-api"), "{posted:?}");
    let status = e.get_json("/status").await;
    assert_eq!(status["silences"][0]["suppressed"], 1, "{status}");
    assert_eq!(status["silences"][0]["author"], "ana");
    assert_eq!(status["silences"][0]["active"], true);
    assert!(e
        .get_text("/metrics")
        .await
        .contains("switchyard_silenced_total{rule=\"degraded\"} 1"));
    let html = e.get_html("/status").await;
    assert!(html.contains("maintenance window") && html.contains("Silences"));

    // A running engine holds its data directory: offline commands point to --server.
    let o = cli(&["silence", "list", "--data-dir", e.data.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", said(&o));

    // It survives a restart.
    e.kill();
    e.spawn().await;
    send(&e, &change("payments-api", "Healthy", "Degraded", 3)).await;
    let o = cli(&["silence", "list", "--server", &server]);
    assert!(
        said(&o).contains("maintenance window") && said(&o).contains("degraded"),
        "{}",
        said(&o)
    );
    eventually(10, "the silence counting after the restart", || {
        (common::block_on(e.get_json("/status"))["silences"][0]["suppressed"] == 1).then_some(())
    })
    .await;
    assert_eq!(slack.top_level("C_PLATFORM").len(), 1);

    // Expired: the next alert goes out.
    let o = cli(&["silence", "expire", "--server", &server, "1"]);
    assert!(o.status.success(), "{}", said(&o));
    let o = cli(&["silence", "expire", "--server", &server, "99"]);
    assert!(
        !o.status.success() && said(&o).contains("no silence 99"),
        "{}",
        said(&o)
    );
    send(&e, &change("payments-api", "Healthy", "Degraded", 4)).await;
    eventually(10, "the alert after the silence", || {
        (slack.top_level("C_PLATFORM").len() == 2).then_some(())
    })
    .await;

    // Offline, with the engine stopped: the ended silence is listed with --all.
    e.terminate();
    let o = cli(&[
        "silence",
        "list",
        "--all",
        "--data-dir",
        e.data.to_str().unwrap(),
    ]);
    assert!(
        o.status.success() && said(&o).contains("maintenance window"),
        "{}",
        said(&o)
    );
}

fn digest_rules(api: &str) -> String {
    format!(
        r##"sources:
  port: {{ port: {{ client_secret: "${{PORT_CLIENT_SECRET}}" }} }}
destinations:
  slack-bot:
    slack: {{ token: "xoxb-test-token", api_url: "{api}" }}
    rate_per_second: 1000
rules:
  - id: bulk-changes
    on: port/entity.updated
    group: {{ by: "{{{{join entity.team \",\"}}}}", wait: 1500ms, interval: 2s, max: 5 }}
    send:
      - to: slack-bot
        channel: "#changes"
        key: "digest:{{{{group}}}}"
        text: "{{{{count}}}} changes for team {{{{group}}}}: {{{{#each items}}}}{{{{entity.identifier}}}} {{{{/each}}}}"
"##
    )
}

/// A change of `entity` owned by `team` (`seq` keeps bodies distinct).
fn team_change(entity: &str, team: &str, seq: u32) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&change(entity, "Healthy", "Healthy", seq)).unwrap();
    v["diff"]["after"]["team"] = json!([team]);
    serde_json::to_vec(&v).unwrap()
}

/// A bulk change arrives as one digest per team (listing at most `max` items, counting all),
/// a later change updates the team's digest in place (a keyed digest), and a pending group
/// survives `kill -9`: its digest is sent once after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_change_becomes_one_digest_per_team() {
    let slack = FakeSlack::start().await;
    let text = digest_rules(&slack.api_url());
    let (tmp, dir) = Engine::workspace(&[("rules.yaml", text.as_str())], false);
    let mut e = Engine::start(tmp, dir, &[("PORT_CLIENT_SECRET", SECRET)]).await;

    for i in 0..12 {
        send(&e, &team_change(&format!("svc-{i}"), "payments", i)).await;
    }
    for i in 0..3 {
        send(&e, &team_change(&format!("web-{i}"), "frontend", 100 + i)).await;
    }
    let status = e.get_json("/status").await;
    assert_eq!(
        status["groups"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    let digests = eventually(10, "one digest per team", || {
        let top = slack.top_level("C_CHANGES");
        (top.len() == 2).then_some(top)
    })
    .await;
    let payments = digests
        .iter()
        .find(|m| m.text.contains("team payments"))
        .unwrap();
    assert!(
        payments
            .text
            .starts_with("12 changes for team payments: svc-0 svc-1 svc-2 svc-3 svc-4 "),
        "{payments:?}"
    );
    assert!(
        !payments.text.contains("svc-5"),
        "at most `max` items are listed"
    );
    let frontend = digests
        .iter()
        .find(|m| m.text.contains("team frontend"))
        .unwrap();
    assert!(
        frontend.text.starts_with("3 changes for team frontend"),
        "{frontend:?}"
    );

    // More changes: the next digest of the team updates its message (after `interval`).
    send(&e, &team_change("svc-late", "payments", 50)).await;
    eventually(10, "the payments digest updated in place", || {
        let m = slack.messages().into_iter().find(|m| m.ts == payments.ts)?;
        (m.edits == 1 && m.text.starts_with("1 changes for team payments: svc-late")).then_some(())
    })
    .await;
    assert_eq!(slack.top_level("C_CHANGES").len(), 2);

    // A pending group survives kill -9, and its digest is sent once.
    send(&e, &team_change("ops-1", "ops", 60)).await;
    send(&e, &team_change("ops-2", "ops", 61)).await;
    e.kill();
    e.spawn().await;
    let ops = eventually(10, "the ops digest after the restart", || {
        slack
            .top_level("C_CHANGES")
            .into_iter()
            .find(|m| m.text.contains("team ops"))
    })
    .await;
    assert!(ops.text.starts_with("2 changes for team ops"), "{ops:?}");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        slack
            .messages()
            .iter()
            .filter(|m| m.text.contains("team ops"))
            .count(),
        1,
        "sent once"
    );
    assert_eq!(e.get_json("/status").await["groups"], json!([]));
}

/// Time windows: a send outside its rule's window is dropped (`outside: drop`, counted) or held
/// until the window opens (queued with its not-before time, kept across a restart), and a send
/// within its window goes out at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_outside_their_window_are_held_or_dropped() {
    use chrono::Datelike;
    let today = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        [chrono::Utc::now().weekday().num_days_from_monday() as usize];
    let slack = FakeSlack::start().await;
    let api = slack.api_url();
    let text = format!(
        r##"sources:
  port: {{ port: {{ client_secret: "${{PORT_CLIENT_SECRET}}" }} }}
destinations:
  slack-bot:
    slack: {{ token: "xoxb-test-token", api_url: "{api}" }}
    rate_per_second: 1000
rules:
  - id: dropped
    on: port/entity.updated
    window: {{ muted: ["{today}"], outside: drop }}
    send: [{{ to: slack-bot, channel: "#a", text: "dropped {{{{entity.identifier}}}}" }}]
  - id: held
    on: port/entity.updated
    window: {{ muted: ["{today}"] }}
    send: [{{ to: slack-bot, channel: "#b", text: "held {{{{entity.identifier}}}}" }}]
  - id: open
    on: port/entity.updated
    window: {{ active: ["{today}"], timezone: UTC }}
    send: [{{ to: slack-bot, channel: "#c", text: "open {{{{entity.identifier}}}}" }}]
"##
    );
    let (tmp, dir) = Engine::workspace(&[("rules.yaml", text.as_str())], false);
    let mut e = Engine::start(tmp, dir, &[("PORT_CLIENT_SECRET", SECRET)]).await;
    send(&e, &change("payments-api", "Healthy", "Degraded", 1)).await;
    eventually(10, "the send within its window", || {
        (slack.top_level("C_C").len() == 1).then_some(())
    })
    .await;
    assert!(slack.top_level("C_A").is_empty() && slack.top_level("C_B").is_empty());
    assert!(e
        .get_text("/metrics")
        .await
        .contains("switchyard_muted_total{rule=\"dropped\"} 1"));
    // The held one waits in the queue, also across a restart.
    assert_eq!(e.get_json("/status").await["queue_depth"], 1);
    e.kill();
    e.spawn().await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(e.get_json("/status").await["queue_depth"], 1);
    assert!(slack.top_level("C_B").is_empty());
}

/// Posts a signed Slack click on `button` of `message` (as the fake Slack holds it) by `user`.
async fn click(
    e: &Engine,
    message: &common::slack::Message,
    button: &str,
    user: &str,
    n: u32,
) -> u16 {
    let payload = common::slack::click_payload(
        message,
        button,
        user,
        n,
        "https://hooks.slack.com/actions/T1/1/x",
    );
    common::slack::post_interaction(e, "slack-signing", &payload).await
}

/// The built-in buttons: a snooze from a signed click silences the key (shown on /status, the
/// next match suppressed) and says so on the message; a double click acts once; a user the rule
/// does not allow changes nothing; acknowledge updates the message with who acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snooze_and_acknowledge_buttons_act_from_a_signed_click() {
    let slack = FakeSlack::start().await;
    let api = slack.api_url();
    let text = format!(
        r##"sources:
  port: {{ port: {{ client_secret: "${{PORT_CLIENT_SECRET}}" }} }}
  slack: {{ slack: {{ signing_secret: "slack-signing" }} }}
destinations:
  slack-bot:
    slack: {{ token: "xoxb-test-token", api_url: "{api}" }}
    rate_per_second: 1000
rules:
  - id: degraded
    on: port/entity.updated
    where: [ '$.after.properties.healthStatus == "Degraded"' ]
    send:
      - to: slack-bot
        channel: "#platform"
        key: "health:{{{{entity.identifier}}}}"
        text: ":red_circle: {{{{entity.identifier}}}} is Degraded ({{{{after.properties.seq}}}})"
        buttons: {{ snooze: 2h, allow: [UANA01, carol@example.com] }}
"##
    );
    let (tmp, dir) = Engine::workspace(&[("rules.yaml", text.as_str())], false);
    let e = Engine::start(tmp, dir, &[("PORT_CLIENT_SECRET", SECRET)]).await;
    send(&e, &change("payments-api", "Healthy", "Degraded", 1)).await;
    let alert = eventually(10, "the alert with its buttons", || {
        slack.top_level("C_PLATFORM").into_iter().next()
    })
    .await;
    assert!(alert.blocks.to_string().contains("Snooze 2h"), "{alert:?}");

    // Bob may not use them: nothing changes.
    assert_eq!(click(&e, &alert, "switchyard:ack", "UBOB01", 1).await, 200);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(slack.messages()[0].edits, 0);

    // Ana snoozes, twice (a double click).
    assert_eq!(
        click(&e, &alert, "switchyard:snooze", "UANA01", 2).await,
        200
    );
    assert_eq!(
        click(&e, &alert, "switchyard:snooze", "UANA01", 3).await,
        200
    );
    let snoozed = eventually(10, "the message says it is snoozed", || {
        slack
            .messages()
            .into_iter()
            .find(|m| m.ts == alert.ts && m.blocks.to_string().contains("Snoozed by <@UANA01>"))
    })
    .await;
    assert!(
        !snoozed.blocks.to_string().contains("switchyard:snooze"),
        "buttons gone: {snoozed:?}"
    );
    let status = e.get_json("/status").await;
    let silences = status["silences"].as_array().unwrap();
    assert_eq!(silences.len(), 1, "a double click acts once: {status}");
    assert_eq!(silences[0]["key"], "health:payments-api");
    assert_eq!(silences[0]["author"], "slack:UANA01");

    // The next match of that key is silenced; another entity's is not. Each click of the
    // double click updates the message (the second without a new silence): wait for both
    // updates, so that a late second one is not taken for the silenced match (on a loaded
    // machine it can land after the first).
    let edits = eventually(10, "both clicks' updates", || {
        let n = slack.messages()[0].edits;
        (n >= 2).then_some(n)
    })
    .await;
    send(&e, &change("payments-api", "Healthy", "Degraded", 2)).await;
    send(&e, &change("orders-api", "Healthy", "Degraded", 3)).await;
    eventually(10, "the other entity's alert", || {
        (slack.top_level("C_PLATFORM").len() == 2).then_some(())
    })
    .await;
    assert_eq!(
        slack.messages()[0].edits,
        edits,
        "the snoozed key stayed quiet"
    );
    assert_eq!(e.get_json("/status").await["silences"][0]["suppressed"], 1);

    // Acknowledge on the other alert, by Carol, allowed by her email (looked up in Slack).
    let other = slack
        .top_level("C_PLATFORM")
        .into_iter()
        .find(|m| m.text.contains("orders-api"))
        .unwrap();
    assert_eq!(click(&e, &other, "switchyard:ack", "U_CAROL", 4).await, 200);
    eventually(10, "the acknowledged message", || {
        slack.messages().into_iter().find(|m| {
            m.ts == other.ts && m.blocks.to_string().contains("Acknowledged by <@U_CAROL>")
        })
    })
    .await;
    assert!(e
        .get_text("/metrics")
        .await
        .contains("switchyard_button_clicks_total{button=\"acknowledge\",outcome=\"refused\"} 1"));
}

/// `simulate --state` says what an event would do given the engine's lifecycle state (from a
/// running server's `/-/state`, or a file), without sending anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_with_state_says_what_a_keyed_send_would_do() {
    let slack = FakeSlack::start().await;
    let text = rules(&slack.api_url());
    let (tmp, dir) = Engine::workspace(&[("rules.yaml", text.as_str())], false);
    let e = Engine::start(
        tmp,
        dir.clone(),
        &[
            ("PORT_CLIENT_SECRET", SECRET),
            ("SWITCHYARD_ADMIN_TOKEN", "admin-token"),
        ],
    )
    .await;
    send(&e, &change("payments-api", "Healthy", "Degraded", 1)).await;
    eventually(10, "the alert recorded", || {
        let s = common::block_on(e.get_json("/status"));
        (s["keys"]["open"] == 1).then_some(())
    })
    .await;
    let recovery = dir.join("recovery.json");
    std::fs::write(&recovery, change("payments-api", "Degraded", "Healthy", 2)).unwrap();
    let sim = |state: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["simulate", "--rules"])
            .arg(&dir)
            .args(["--source", "port", "--state", state])
            .arg(&recovery)
            .env("SWITCHYARD_ADMIN_TOKEN", "admin-token")
            .env("PORT_CLIENT_SECRET", SECRET)
            .output()
            .unwrap();
        said(&o)
    };
    let live = sim(&e.url(""));
    assert!(
        live.contains("with this state: updates the message of key `health:payments-api`")
            && live
                .contains("replies in the thread of key `health:payments-api` and closes the key"),
        "{live}"
    );
    let empty = dir.join("state.json");
    std::fs::write(&empty, "{}").unwrap();
    let fresh = sim(empty.to_str().unwrap());
    assert!(
        fresh.contains("posts a new message as key `health:payments-api`"),
        "{fresh}"
    );
    // Nothing was sent by simulating.
    assert_eq!(slack.messages().len(), 1);
}

/// The issue's restart story in one run: an open key and a pending group, `kill -9`, restart:
/// the digest is sent once, and the next recovery still updates the original alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_an_open_key_and_a_pending_group() {
    let slack = FakeSlack::start().await;
    let api = slack.api_url();
    let keyed = rules(&api);
    let grouped = "rules:\n  - id: bulk-changes\n    on: port/entity.updated\n    where: ['$.after.properties.healthStatus == \"Healthy\"', '$.before.properties.healthStatus == \"Healthy\"']\n    group: { by: \"{{join entity.team \\\",\\\"}}\", wait: 2s }\n    send:\n      - { to: slack-bot, channel: \"#changes\", text: \"{{count}} changes for team {{group}}\" }\n".to_string();
    let (tmp, dir) = Engine::workspace(
        &[
            ("rules.yaml", keyed.as_str()),
            ("digest.yaml", grouped.as_str()),
        ],
        false,
    );
    let mut e = Engine::start(tmp, dir, &[("PORT_CLIENT_SECRET", SECRET)]).await;
    send(&e, &change("payments-api", "Healthy", "Degraded", 1)).await;
    let alert = eventually(10, "the alert", || {
        slack.top_level("C_PLATFORM").into_iter().next()
    })
    .await;
    send(&e, &team_change("svc-1", "ops", 2)).await;
    send(&e, &team_change("svc-2", "ops", 3)).await;
    e.kill();
    e.spawn().await;
    let digest = eventually(10, "the digest after the restart", || {
        slack.top_level("C_CHANGES").into_iter().next()
    })
    .await;
    assert!(
        digest.text.starts_with("2 changes for team ops"),
        "{digest:?}"
    );
    send(&e, &change("payments-api", "Degraded", "Healthy", 4)).await;
    eventually(10, "the original alert resolved", || {
        let m = slack.messages().into_iter().find(|m| m.ts == alert.ts)?;
        (m.edits == 1 && slack.replies(&alert.ts).len() == 1).then_some(())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        slack.top_level("C_CHANGES").len(),
        1,
        "the digest went once"
    );
    assert_eq!(slack.top_level("C_PLATFORM").len(), 1);
}
