//! Shared pieces of the benchmark tools: the event mix and the bench rules.
//!
//! Events are Port changelog bodies for blueprint `BenchDeployment`. `kind` decides how many
//! rules match: `none`, `one` or `three`. The [`Mix`] decides the kinds: the default mix is
//! `none` 70%, `one` 20%, `three` 10% (most changes interest no rule); the `one` and `three`
//! mixes make every event produce one or three messages (the path users care about: a change
//! that someone must hear about). Each body is unique (a sequence
//! number) and carries `sent_us`, the send time in microseconds since the epoch, which the
//! message text repeats so the sink can measure end-to-end latency on the same clock.

use serde_json::{json, Value};

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Serves `app` on `listen` and prints the bound address as the first line of stdout (the
/// harness reads it to find the port). For the floor and the sink.
pub async fn serve(listen: &str, app: axum::Router) {
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    println!("{}", listener.local_addr().expect("addr"));
    axum::serve(listener, app).await.expect("serve");
}

/// Which kinds of events a run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mix {
    /// 70% match nothing, 20% one rule, 10% three rules.
    #[default]
    Default,
    /// Every event matches one rule: one message per event.
    One,
    /// Every event matches three rules: three messages per event.
    Three,
}

/// The kind of the `seq`-th event in the 70/20/10 mix.
pub fn kind_of(seq: u64) -> &'static str {
    kind_in(Mix::Default, seq)
}

/// The kind of the `seq`-th event of `mix`.
pub fn kind_in(mix: Mix, seq: u64) -> &'static str {
    match mix {
        Mix::One => "one",
        Mix::Three => "three",
        Mix::Default => match seq % 10 {
            0 => "three",
            1 | 2 => "one",
            _ => "none",
        },
    }
}

/// The messages the rules make of an event of `kind`.
pub fn messages_of(kind: &str) -> u64 {
    match kind {
        "three" => 3,
        "one" => 1,
        _ => 0,
    }
}

/// A changelog body for the `seq`-th event.
///
/// Written with `format!` rather than built as a `serde_json::Value`: the generator shares the
/// machine with the engine it measures, so it should spend as little CPU per request as it
/// can. A test checks that the text is the JSON [`event_value`] describes.
pub fn event(seq: u64) -> Vec<u8> {
    event_in(Mix::Default, seq)
}

/// A changelog body for the `seq`-th event of `mix`.
pub fn event_in(mix: Mix, seq: u64) -> Vec<u8> {
    let kind = kind_in(mix, seq);
    let ident = seq % 5000;
    let prev = seq - seq.min(1);
    let sent = now_us();
    format!(
        concat!(
            r#"{{"action":"UPDATE","resourceType":"entity","status":"SUCCESS","#,
            r#""trigger":{{"by":{{"orgId":"org_bench","userId":"bench@clients"}},"origin":"API","at":"2026-09-21T14:13:17.482Z"}},"#,
            r#""context":{{"blueprint":"BenchDeployment","entity":"bench-{ident}"}},"#,
            r#""diff":{{"before":{{"identifier":"bench-{ident}","title":"Bench {seq}","blueprint":"BenchDeployment","team":["bench"],"#,
            r#""properties":{{"cpuUtil":42,"memoryUtil":40,"healthStatus":"Healthy","kind":"{kind}","seq":{prev}}}}},"#,
            r#""after":{{"identifier":"bench-{ident}","title":"Bench {seq}","blueprint":"BenchDeployment","team":["bench"],"#,
            r#""properties":{{"cpuUtil":91,"memoryUtil":40,"healthStatus":"Healthy","kind":"{kind}","seq":{seq},"sent_us":{sent}}}}}}}}}"#
        ),
        ident = ident,
        seq = seq,
        kind = kind,
        prev = prev,
        sent = sent
    )
    .into_bytes()
}

/// The `seq`-th event as a JSON value (what [`event`] writes), with `sent_us` given.
pub fn event_value(seq: u64, sent_us: u64) -> Value {
    let kind = kind_of(seq);
    let ident = format!("bench-{}", seq % 5000);
    json!({
        "action": "UPDATE",
        "resourceType": "entity",
        "status": "SUCCESS",
        "trigger": {"by": {"orgId": "org_bench", "userId": "bench@clients"}, "origin": "API", "at": "2026-09-21T14:13:17.482Z"},
        "context": {"blueprint": "BenchDeployment", "entity": ident},
        "diff": {
            "before": {"identifier": ident, "title": format!("Bench {seq}"), "blueprint": "BenchDeployment", "team": ["bench"],
                       "properties": {"cpuUtil": 42, "memoryUtil": 40, "healthStatus": "Healthy", "kind": kind, "seq": seq - seq.min(1)}},
            "after": {"identifier": ident, "title": format!("Bench {seq}"), "blueprint": "BenchDeployment", "team": ["bench"],
                      "properties": {"cpuUtil": 91, "memoryUtil": 40, "healthStatus": "Healthy", "kind": kind, "seq": seq, "sent_us": sent_us}}
        }
    })
}

/// A rules file with `n` rules: `n - 4` that never match the bench events (varied conditions
/// that still have to be evaluated), one that matches `kind: one`, three that match
/// `kind: three`. All send to `sink` (a webhook destination at `sink_url`).
pub fn rules(n: usize, sink_url: &str) -> String {
    let mut y = format!(
        "sources:\n  port: {{ port: {{ client_secret: \"${{PORT_CLIENT_SECRET}}\" }} }}\n\
         destinations:\n  sink:\n    slack_webhook: {{ url: \"{sink_url}\" }}\n    rate_per_second: 1000000\n    concurrency: 64\n    retry_initial: 100ms\n    retry_max: 2s\n    max_attempts: 100\n\
         rules:\n"
    );
    for i in 0..n.saturating_sub(4) {
        let cond = match i % 4 {
            0 => format!("$.blueprint == \"Blueprint{i}\""),
            1 => format!("$.after.properties.cpuUtil crosses_above {}", 95 + (i % 5)),
            2 => format!("$.after.properties.healthStatus changed_to \"State{i}\""),
            _ => format!("$.entity.identifier matches \"^svc-{i}-\""),
        };
        y.push_str(&format!("  - id: filler-{i}\n    on: port/entity.updated\n    where: ['{cond}']\n    send: [{{ to: sink, template: bench }}]\n"));
    }
    y.push_str("  - id: one\n    on: port/entity.updated\n    where: ['$.after.properties.kind == \"one\"']\n    send: [{ to: sink, template: bench-one }]\n");
    for t in ["three-a", "three-b", "three-c"] {
        y.push_str(&format!("  - id: {t}\n    on: port/entity.updated\n    where: ['$.after.properties.kind == \"three\"']\n    send: [{{ to: sink, template: bench-{t} }}]\n"));
    }
    y
}

/// The templates the bench rules use: `(file name, text)`.
pub fn templates() -> Vec<(String, String)> {
    [
        "bench",
        "bench-one",
        "bench-three-a",
        "bench-three-b",
        "bench-three-c",
    ]
    .iter()
    .map(|n| (format!("{n}.hbs"), TEMPLATE.replace("RULE", n)))
    .collect()
}

/// The bench message template: a realistic Block Kit message whose `text` starts with
/// `sent_us`.
pub const TEMPLATE: &str = r#"{
  "text": "{{after.properties.sent_us}} {{entity.title}} CPU {{after.properties.cpuUtil}}%",
  "blocks": [
    { "type": "header", "text": { "type": "plain_text", "text": "{{plain (truncate entity.title 100)}}: CPU at {{after.properties.cpuUtil}}%" } },
    { "type": "section", "fields": [
      { "type": "mrkdwn", "text": "*Entity*\n`{{entity.identifier}}` ({{blueprint}})" },
      { "type": "mrkdwn", "text": "*CPU*\n{{before.properties.cpuUtil}}% → *{{after.properties.cpuUtil}}%*" },
      { "type": "mrkdwn", "text": "*Team*\n{{join entity.team ", "}}" }
    ] },
    { "type": "context", "elements": [ { "type": "mrkdwn", "text": "RULE seq {{after.properties.seq}} · {{date trigger.at}}" } ] }
  ]
}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_event_is_the_described_json() {
        for seq in [0, 1, 2, 3, 10, 4999, 5001, 123_456_789] {
            let v: Value = serde_json::from_slice(&event(seq)).expect("valid JSON");
            let sent = v["diff"]["after"]["properties"]["sent_us"]
                .as_u64()
                .expect("sent_us");
            assert_eq!(v, event_value(seq, sent), "seq {seq}");
        }
    }
}
