//! Closing the loop (issue 20): a Slack button on a Port alert runs a Port self-service action
//! as the clicker, and the run's progress comes back to the alert's thread. The real binary on
//! 127.0.0.1 with a fake Slack (messages, threads, `users.info`, `response_url`s) and a fake
//! Port API (runs created and served, entity patches and Workflow node runs recorded).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::slack::{FakeSlack, Message};
use common::{eventually, fixture, Engine, Fake, Received};
use serde_json::{json, Value};

const SECRET: &str = "port-loop-secret";

/// What the fake Port answers.
#[derive(Default)]
struct PortState {
    /// Statuses a run goes through, one per read (the last one stays).
    script: Vec<Value>,
    /// How many times each run was read.
    reads: HashMap<String, usize>,
    next: usize,
    /// Answer to the next run creations instead of 202 (status, body).
    reject: Option<(u16, Value)>,
}

#[derive(Clone)]
struct FakePort {
    fake: Fake,
    state: Arc<Mutex<PortState>>,
}

impl FakePort {
    async fn start(script: Vec<Value>) -> FakePort {
        let state = Arc::new(Mutex::new(PortState {
            script,
            ..Default::default()
        }));
        let st = state.clone();
        let fake = Fake::start(move |r: &Received, _| {
            let ok = |code: u16, v: Value| (code, vec![("content-type".to_string(), "application/json".to_string())], v.to_string());
            let mut s = st.lock().unwrap();
            match (r.method.as_str(), r.path.as_str()) {
                ("POST", "/v1/auth/access_token") => ok(200, json!({"ok": true, "accessToken": "tok", "expiresIn": 10800})),
                ("POST", p) if p.starts_with("/v1/actions/") && p.ends_with("/runs") => {
                    if let Some((code, body)) = s.reject.clone() {
                        return ok(code, body);
                    }
                    s.next += 1;
                    let action = p.trim_start_matches("/v1/actions/").trim_end_matches("/runs");
                    ok(202, json!({"ok": true, "run": {"id": format!("r_{}", s.next), "status": "IN_PROGRESS",
                        "action": {"identifier": action}, "entity": r.json()["entity"]}}))
                }
                ("GET", p) if p.starts_with("/v1/actions/runs/") => {
                    let id = p.trim_start_matches("/v1/actions/runs/").to_string();
                    let n = {
                        let c = s.reads.entry(id.clone()).or_default();
                        *c += 1;
                        *c
                    };
                    let mut run = s.script.get(n - 1).or(s.script.last()).cloned().unwrap_or(json!({"status": "IN_PROGRESS"}));
                    run["id"] = json!(id);
                    ok(200, json!({"ok": true, "run": run}))
                }
                ("PATCH", _) | ("POST", _) => ok(200, json!({"ok": true})),
                _ => ok(404, json!({"ok": false, "error": "not_found"})),
            }
        })
        .await;
        FakePort { fake, state }
    }

    /// How many times the run was read.
    fn reads(&self, run: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .reads
            .get(run)
            .copied()
            .unwrap_or(0)
    }

    /// The action runs created: (path with query, body).
    fn runs_created(&self) -> Vec<(String, Value)> {
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/runs"))
            .map(|r| (format!("{}?{}", r.path, r.query), r.json()))
            .collect()
    }
}

/// Rules: a Degraded alert with a "Scale up" button, and the click rule running `scale_up`.
fn rules(slack: &FakeSlack, port: &FakePort, run_extra: &str) -> String {
    let api = slack.api_url();
    let port_url = port.fake.url("");
    format!(
        r##"sources:
  port: {{ port: {{ client_secret: "${{PORT_CLIENT_SECRET}}" }} }}
  slack: {{ slack: {{ signing_secret: "slack-signing" }} }}
destinations:
  slack-bot:
    slack: {{ token: "xoxb-test-token", api_url: "{api}" }}
    rate_per_second: 1000
  port-api:
    port: {{ client_id: "id", client_secret: "s", base_url: "{port_url}" }}
    retry_initial: 100ms
rules:
  - id: degraded
    on: port/entity.updated
    where: [ '$.after.properties.healthStatus changed_to "Degraded"' ]
    send:
      - to: slack-bot
        channel: "#platform"
        key: "health:{{{{entity.identifier}}}}"
        blocks:
          - {{ type: section, text: {{ type: mrkdwn, text: ":warning: {{{{entity.identifier}}}} is Degraded" }} }}
          - type: actions
            elements:
              - type: button
                action_id: scale_up
                text: {{ type: plain_text, text: Scale up }}
                value: "{{{{entity.identifier}}}}"
                confirm:
                  title: {{ type: plain_text, text: Scale up? }}
                  text: {{ type: plain_text, text: "Run scale_up on {{{{entity.identifier}}}}" }}
                  confirm: {{ type: plain_text, text: Run it }}
                  deny: {{ type: plain_text, text: Cancel }}
  - id: scale-up-click
    on: slack/block_actions
    where: [ '$.action.action_id == "scale_up"' ]
    send:
      - to: port-api
        run:
          action: scale_up
          entity: "{{{{action.value}}}}"
          properties: {{ replicas: 6, reason: "clicked by {{{{user.id}}}}" }}
{run_extra}
      - to: port-api
        entity:
          blueprint: service
          identifier: "{{{{action.value}}}}"
          properties: {{ lastScaledBy: "{{{{user.id}}}}" }}
"##
    )
}

async fn start(slack: &FakeSlack, port: &FakePort, run_extra: &str) -> Engine {
    let text = rules(slack, port, run_extra);
    let (tmp, dir) = Engine::workspace(&[("rules.yaml", text.as_str())], false);
    Engine::start(tmp, dir, &[("PORT_CLIENT_SECRET", SECRET)]).await
}

fn change(entity: &str, from: &str, to: &str) -> Vec<u8> {
    let mut v: Value =
        serde_json::from_slice(&fixture("port/changelog-update-cpu-spike.json")).unwrap();
    v["context"]["entity"] = json!(entity);
    v["diff"]["before"]["identifier"] = json!(entity);
    v["diff"]["after"]["identifier"] = json!(entity);
    v["diff"]["before"]["properties"]["healthStatus"] = json!(from);
    v["diff"]["after"]["properties"]["healthStatus"] = json!(to);
    serde_json::to_vec(&v).unwrap()
}

/// Posts the Degraded change and waits for the alert.
async fn alert(e: &Engine, slack: &FakeSlack) -> Message {
    let (status, r) = e
        .post_port(
            "port",
            SECRET,
            &change("payments-api", "Healthy", "Degraded"),
        )
        .await;
    assert_eq!(status, 202, "{r}");
    eventually(10, "the alert with its button", || {
        slack.top_level("C_PLATFORM").into_iter().next()
    })
    .await
}

/// A signed click on the alert's Scale up button by `user`; `n` makes the click distinct (its
/// `action_ts`), as a second click is.
async fn click(e: &Engine, slack: &FakeSlack, m: &Message, user: &str, n: u32) -> u16 {
    let button = m.blocks[1]["elements"][0].clone();
    assert!(
        button["confirm"].is_object(),
        "the button asks first: {button}"
    );
    let payload = common::slack::click_payload(m, "scale_up", user, n, &slack.response_url(n));
    common::slack::post_interaction(e, "slack-signing", &payload).await
}

fn thread_texts(slack: &FakeSlack, ts: &str) -> Vec<String> {
    slack.replies(ts).into_iter().map(|m| m.text).collect()
}

/// The story of the issue: Degraded alert → Scale up clicked by Ana (twice) → one run, as
/// ana@example.com → "started by" in the thread and an ephemeral answer → the run's label
/// changes → "SUCCESS: 4 → 6 replicas" with the run's link; the entity patch is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_scales_up_and_the_run_ends_in_the_thread() {
    let slack = FakeSlack::start().await;
    let port = FakePort::start(vec![
        json!({"status": "IN_PROGRESS"}),
        json!({"status": "IN_PROGRESS", "statusLabel": "rolling out"}),
        json!({"status": "SUCCESS", "statusLabel": "4 → 6 replicas", "link": "https://ci.example.com/runs/77"}),
    ])
    .await;
    let e = start(&slack, &port, "          follow: { poll: 1s, timeout: 1m }").await;
    let m = alert(&e, &slack).await;

    assert_eq!(click(&e, &slack, &m, "UANA", 1).await, 200);
    assert_eq!(
        click(&e, &slack, &m, "UANA", 2).await,
        200,
        "a double click"
    );
    let replies = eventually(20, "the run's end in the thread", || {
        let t = thread_texts(&slack, &m.ts);
        t.iter().any(|x| x.contains("SUCCESS")).then_some(t)
    })
    .await;
    assert!(
        replies[0].contains("`scale_up` run")
            && replies[0].contains("r_1")
            && replies[0].contains("started by <@UANA>")
            && replies[0].contains("payments-api"),
        "{replies:?}"
    );
    assert!(
        replies.iter().any(|r| r.contains("rolling out")),
        "the label change is said: {replies:?}"
    );
    let end = replies.last().unwrap();
    assert!(
        end.contains("SUCCESS: 4 → 6 replicas") && end.contains("https://ci.example.com/runs/77"),
        "{end}"
    );

    // One run for two clicks, as Ana (Port applies her permissions), on the entity.
    let runs = port.runs_created();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(
        runs[0].0,
        "/v1/actions/scale_up/runs?run_as=ana%40example.com"
    );
    assert_eq!(
        runs[0].1,
        json!({"entity": "payments-api", "properties": {"replicas": 6, "reason": "clicked by UANA"}})
    );
    // The clicker was answered privately.
    let answers = slack.responses();
    assert!(
        answers.iter().any(|a| a["response_type"] == "ephemeral"
            && a["text"].as_str().unwrap_or("").contains("r_1")),
        "{answers:?}"
    );
    // The entity step patched the entity.
    let patches: Vec<Received> = port
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.starts_with("/v1/blueprints/"))
        .collect();
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert_eq!(
        patches[0].path,
        "/v1/blueprints/service/entities/payments-api"
    );
    assert_eq!(
        patches[0].json(),
        json!({"properties": {"lastScaledBy": "UANA"}})
    );
    // Nothing new at the top of the channel: all of it is in the alert's thread.
    assert_eq!(slack.top_level("C_PLATFORM").len(), 1);
}

/// A rule narrowing who may click: Bob is told privately that he may not; nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_not_allowed_gets_an_ephemeral_no_and_nothing_runs() {
    let slack = FakeSlack::start().await;
    let port = FakePort::start(vec![json!({"status": "SUCCESS"})]).await;
    let e = start(
        &slack,
        &port,
        "          allow: [ana@example.com]\n          follow: { poll: 1s, timeout: 1m }",
    )
    .await;
    let m = alert(&e, &slack).await;
    assert_eq!(click(&e, &slack, &m, "UBOB", 1).await, 200);
    let no = eventually(10, "the ephemeral refusal", || {
        slack.responses().into_iter().next()
    })
    .await;
    assert_eq!(no["response_type"], "ephemeral");
    assert!(no["text"].as_str().unwrap().contains("not allowed"), "{no}");
    // Ana may (her email is on the list).
    assert_eq!(click(&e, &slack, &m, "UANA", 2).await, 200);
    eventually(10, "Ana's run", || {
        (port.runs_created().len() == 1).then_some(())
    })
    .await;
    assert!(thread_texts(&slack, &m.ts)
        .iter()
        .all(|t| !t.contains("UBOB")));
}

/// Port refuses the inputs (422): the thread says why, with Port's message, and the act is a
/// dead letter with the same reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_rejecting_the_inputs_is_said_in_the_thread() {
    let slack = FakeSlack::start().await;
    let port = FakePort::start(vec![]).await;
    port.state.lock().unwrap().reject = Some((
        422,
        json!({"ok": false, "error": "invalid_inputs", "message": "replicas must be at most 5"}),
    ));
    let e = start(&slack, &port, "").await;
    let m = alert(&e, &slack).await;
    assert_eq!(click(&e, &slack, &m, "UANA", 1).await, 200);
    let said = eventually(10, "the refusal in the thread", || {
        thread_texts(&slack, &m.ts).into_iter().next()
    })
    .await;
    assert!(
        said.contains("Port did not start `scale_up`")
            && said.contains("<@UANA>")
            && said.contains("HTTP 422 invalid_inputs: replicas must be at most 5"),
        "{said}"
    );
    let dead = eventually(10, "the dead letter", || {
        let d = common::dead_letters(&e.data);
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert!(
        dead[0].last_error.contains("replicas must be at most 5"),
        "{dead:?}"
    );
}

/// A run that never ends: after the timeout the thread says it has not finished, and the
/// engine stops reading it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_never_finishes_gets_a_timeout_note() {
    let slack = FakeSlack::start().await;
    let port = FakePort::start(vec![
        json!({"status": "IN_PROGRESS", "statusLabel": "waiting for CI"}),
    ])
    .await;
    let e = start(&slack, &port, "          follow: { poll: 1s, timeout: 3s }").await;
    let m = alert(&e, &slack).await;
    assert_eq!(click(&e, &slack, &m, "UANA", 1).await, 200);
    let note = eventually(20, "the timeout note", || {
        thread_texts(&slack, &m.ts)
            .into_iter()
            .find(|t| t.contains("has not finished"))
    })
    .await;
    assert!(
        note.contains("after 3s") && note.contains("IN_PROGRESS: waiting for CI"),
        "{note}"
    );
    let reads = port.reads("r_1");
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(reads, port.reads("r_1"), "no reads after the timeout");
}

/// A Workflow's webhook node whose backend is switchyard: the node run (`wfnr_…`) is completed
/// on the Workflows endpoints with its output, after a log line, as Port's agent does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_node_run_is_reported() {
    let slack = FakeSlack::start().await;
    let port = FakePort::start(vec![]).await;
    let api = slack.api_url();
    let port_url = port.fake.url("");
    let text = format!(
        r##"sources:
  port: {{ port: {{ client_secret: "${{PORT_CLIENT_SECRET}}" }} }}
destinations:
  slack-bot:
    slack: {{ token: "xoxb-test-token", api_url: "{api}" }}
  port-api:
    port: {{ client_id: "id", client_secret: "s", base_url: "{port_url}" }}
rules:
  - id: announce
    on: port/run.created
    where: [ '$.run.kind == "workflow_node"' ]
    send:
      - {{ to: slack-bot, channel: "#releases", text: "Releasing {{{{properties.service}}}}" }}
    report:
      success: {{ summary: "announced {{{{properties.service}}}}" }}
"##
    );
    let (tmp, dir) = Engine::workspace(&[("rules.yaml", text.as_str())], false);
    let e = Engine::start(tmp, dir, &[("PORT_CLIENT_SECRET", SECRET)]).await;
    let body = json!({"port_context": {"nodeRunId": "wfnr_9c1"}, "service": "payments-api"});
    let (status, r) = e
        .post_port("port", SECRET, body.to_string().as_bytes())
        .await;
    assert_eq!(status, 202, "{r}");
    let patch = port
        .fake
        .wait_for("/v1/workflows/nodes/runs/wfnr_9c1", 1, 20)
        .await;
    let p = patch
        .iter()
        .find(|r| r.method == "PATCH")
        .expect("the node run PATCH");
    assert_eq!(p.json()["status"], "COMPLETED");
    assert_eq!(p.json()["result"], "SUCCESS");
    assert_eq!(p.json()["output"]["summary"], "announced payments-api");
    let logs = port.fake.on_path("/v1/workflows/nodes/runs/wfnr_9c1/logs");
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].json()["logs"][0]["level"], "INFO");
    assert_eq!(slack.top_level("C_RELEASES").len(), 1);
    // No action-run endpoint was called for a node run.
    assert!(port
        .fake
        .requests()
        .iter()
        .all(|r| !r.path.starts_with("/v1/actions/runs/")));
}
