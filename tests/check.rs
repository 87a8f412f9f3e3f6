//! `switchyard check`: every class of error is reported at the right file, line and column, and
//! the shipped rules pass.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde_json::json;
use switchyard::check;
use switchyard::config::diag::Diagnostic;
use switchyard::config::{LoadOptions, Mode};

fn opts() -> LoadOptions {
    let mut o = LoadOptions::new(Mode::Check);
    o.env = Arc::new(|name| match name {
        "SET_VAR" => Some("value".into()),
        _ => None,
    });
    o
}

const HEADER: &str = "sources:\n  port:\n    port: { client_secret: \"${SET_VAR}\" }\ndestinations:\n  console: { stdout: {} }\n";

/// Writes a rules dir with one `rules.yaml` (HEADER + `body`) and optional templates.
fn dir_with(body: &str, templates: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("rules.yaml"), format!("{HEADER}{body}")).unwrap();
    if !templates.is_empty() {
        std::fs::create_dir(d.path().join("templates")).unwrap();
        for (n, t) in templates {
            std::fs::write(d.path().join("templates").join(format!("{n}.hbs")), t).unwrap();
        }
    }
    std::fs::copy(
        fixture("port/changelog-update-cpu-spike.json"),
        d.path().join("spike.json"),
    )
    .unwrap();
    d
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn errors(dir: &Path) -> Vec<Diagnostic> {
    let (_, report) = check::run(dir, &opts());
    assert!(
        !report.valid,
        "expected errors, got {:#?}",
        report.diagnostics
    );
    report
        .diagnostics
        .into_iter()
        .filter(|d| d.is_error())
        .collect()
}

/// Asserts exactly one error of `code` at `line:column` of `file_name`.
fn assert_one(dir: &Path, code: &str, file_name: &str, line: usize, column: usize) -> Diagnostic {
    let errs = errors(dir);
    let matching: Vec<&Diagnostic> = errs.iter().filter(|d| d.code == code).collect();
    assert_eq!(
        matching.len(),
        1,
        "expected one `{code}` error, got {errs:#?}"
    );
    let d = matching[0].clone();
    assert!(d.file.as_ref().unwrap().ends_with(file_name), "{d:?}");
    assert_eq!((d.line, d.column), (Some(line), Some(column)), "{d:#?}");
    d
}

const RULE: &str = "rules:\n  - id: r\n    on: port/entity.updated\n";

#[test]
fn broken_yaml() {
    let d = dir_with("rules:\n  - id: r\n   on: x\n", &[]);
    assert_one(d.path(), "yaml", "rules.yaml", 8, 4);
}

#[test]
fn unknown_key_with_did_you_mean() {
    let d = dir_with(
        &format!("{RULE}    wher: []\n    send: [{{ to: console, text: hi }}]\n"),
        &[],
    );
    let e = assert_one(d.path(), "unknown-key", "rules.yaml", 9, 5);
    assert!(e.hint.unwrap().contains("`where`"));
}

#[test]
fn bad_jsonpath() {
    let d = dir_with(
        &format!(
            "{RULE}    where:\n      - $.after[ == 1\n    send: [{{ to: console, text: hi }}]\n"
        ),
        &[],
    );
    assert_one(d.path(), "bad-jsonpath", "rules.yaml", 10, 9);
}

/// The `condition` fuzz target found a path (`$["$\u`) that made the JSONPath parser panic;
/// every path that ends inside a quoted name is now a `bad-jsonpath` diagnostic.
#[test]
fn jsonpath_ending_inside_a_string_is_a_diagnostic() {
    for path in [r#"'$["$\u'"#, r#"'$["abc'"#, r#"'$[?@.a == "x'"#] {
        let d = dir_with(
            &format!("{RULE}    where:\n      - {path}\n    send: [{{ to: console, text: hi }}]\n"),
            &[],
        );
        // Column 10: the path itself, after the YAML quote at column 9.
        let e = assert_one(d.path(), "bad-jsonpath", "rules.yaml", 10, 10);
        assert!(e.message.contains("unterminated string"), "{path}: {e:?}");
    }
}

/// The `condition` fuzz target's second find: nested filters made the JSONPath parser's time
/// double per level (a 423-byte condition took 10 s, 24 levels a minute). Past six levels the
/// path is a `bad-jsonpath` diagnostic, found by counting, at once.
#[test]
fn filters_nested_too_deep_are_a_diagnostic() {
    let path = format!("'$[?{}@.a{} == 1]'", "@[?".repeat(23), "]".repeat(23));
    let d = dir_with(
        &format!("{RULE}    where:\n      - {path}\n    send: [{{ to: console, text: hi }}]\n"),
        &[],
    );
    let e = assert_one(d.path(), "bad-jsonpath", "rules.yaml", 10, 10);
    assert!(e.message.contains("filters nested 24 deep"), "{e:?}");
}

#[test]
fn bad_regex_points_into_the_condition() {
    let d = dir_with(&format!("{RULE}    where:\n      - \"$.blueprint matches ([a-\"\n    send: [{{ to: console, text: hi }}]\n"), &[]);
    // The value starts at column 9 with a quote; the regex is 20 characters into the text.
    assert_one(d.path(), "bad-regex", "rules.yaml", 10, 9 + 1 + 20);
}

#[test]
fn unknown_operator() {
    let d = dir_with(&format!("{RULE}    where:\n      - $.blueprint crosses 80\n    send: [{{ to: console, text: hi }}]\n"), &[]);
    let e = assert_one(d.path(), "bad-condition", "rules.yaml", 10, 21);
    assert!(e.hint.unwrap().contains("crosses_above"));
}

#[test]
fn unknown_destination() {
    let d = dir_with(
        &format!("{RULE}    send:\n      - to: consol\n        text: hi\n"),
        &[],
    );
    let e = assert_one(d.path(), "unknown-destination", "rules.yaml", 10, 13);
    assert!(e.hint.unwrap().contains("`console`"));
}

#[test]
fn missing_template() {
    let d = dir_with(
        &format!("{RULE}    send:\n      - to: console\n        template: nope\n"),
        &[],
    );
    assert_one(d.path(), "missing-template", "rules.yaml", 11, 19);
}

#[test]
fn template_syntax_error() {
    let d = dir_with(
        &format!("{RULE}    send: [{{ to: console, template: t }}]\n"),
        &[("t", "{\n  \"text\": \"{{#if x}}oops\"\n}\n")],
    );
    // At the opening tag that is never closed, not at the end of the file.
    let e = assert_one(d.path(), "template", "t.hbs", 2, 12);
    assert!(e.message.contains("template `t`"));
}

/// A template the handlebars crate would take half a minute to compile (20,000 expressions in
/// 340 KB; compiling is quadratic there) is refused before compiling, in its file, with the
/// remedy; `check` answers at once instead of after 30 s.
#[test]
fn a_template_too_large_to_compile_in_bounded_time_is_an_error_in_its_file() {
    let big = format!("{{\"text\": \"{}\"}}", "{{entity.title}} x".repeat(20_000));
    let d = dir_with(
        &format!("{RULE}    send: [{{ to: console, template: t }}]\n"),
        &[("t", &big)],
    );
    let errs = errors(d.path());
    let e = errs
        .iter()
        .find(|e| e.code == "template")
        .unwrap_or_else(|| panic!("{errs:#?}"));
    assert!(e.file.as_ref().unwrap().ends_with("t.hbs"), "{e:?}");
    assert!(e.message.contains("split it into partials"), "{e:?}");
    assert!(
        !errs.iter().any(|e| e.code == "unknown-template"),
        "reported once: {errs:#?}"
    );
}

#[test]
fn rendered_message_over_a_block_kit_limit() {
    let long = "x".repeat(160);
    let d = dir_with(
        &format!(
            "{RULE}    send: [{{ to: console, template: t }}]\ntests:\n  - name: spike\n    event: {{ source: port, file: spike.json }}\n    expect: [{{ rule: r, to: console }}]\n"
        ),
        &[("t", &format!("{{\"blocks\": [{{\"type\": \"header\", \"text\": {{\"type\": \"plain_text\", \"text\": \"{long}\"}}}}]}}"))],
    );
    let e = assert_one(d.path(), "block-kit-limit", "t.hbs", 1, 1);
    assert!(e.message.contains("/blocks/0/text/text"), "{}", e.message);
    assert!(e.message.contains("150"), "{}", e.message);
}

#[test]
fn failing_rule_test() {
    let d = dir_with(
        &format!(
            "{RULE}    where: [\"$.after.properties.cpuUtil > 95\"]\n    send: [{{ to: console, text: hi }}]\ntests:\n  - name: spike\n    event: {{ source: port, file: spike.json }}\n    expect: [{{ rule: r, to: console }}]\n"
        ),
        &[],
    );
    let e = assert_one(d.path(), "test-failed", "rules.yaml", 12, 5);
    assert!(
        e.message.contains("expected r → console, got nothing"),
        "{}",
        e.message
    );
}

#[test]
fn failing_message_expectation_points_at_the_expectation() {
    let d = dir_with(
        &format!(
            "{RULE}    send: [{{ to: console, text: \"cpu {{{{after.properties.cpuUtil}}}}\" }}]\ntests:\n  - name: spike\n    event: {{ source: port, file: spike.json }}\n    expect:\n      - {{ rule: r, to: console, message: {{ text: \"cpu 90\" }} }}\n"
        ),
        &[],
    );
    let e = assert_one(d.path(), "test-failed", "rules.yaml", 14, 9);
    assert!(e.hint.unwrap().contains("cpu 91"));
}

#[test]
fn duplicates_name_both_places() {
    let d = dir_with(
        &format!("{RULE}    send: [{{ to: console, text: hi }}]\n"),
        &[],
    );
    std::fs::write(
        d.path().join("second.yaml"),
        "destinations:\n  console: { stdout: {} }\nrules:\n  - id: r\n    on: port/entity.updated\n    send: [{ to: console, text: hi }]\n",
    )
    .unwrap();
    let errs = errors(d.path());
    let dup: Vec<_> = errs.iter().filter(|e| e.code == "duplicate").collect();
    assert_eq!(dup.len(), 2, "{errs:#?}");
    assert!(
        dup.iter().any(|e| e.message.contains("rules.yaml:5:3")),
        "{dup:#?}"
    );
    assert!(
        dup.iter().any(|e| e.message.contains("rules.yaml:7:5")),
        "{dup:#?}"
    );
}

#[test]
fn unknown_event_type() {
    let d = dir_with(
        "rules:\n  - id: r\n    on: port/entity.update\n    send: [{ to: console, text: hi }]\n",
        &[],
    );
    let e = assert_one(d.path(), "unknown-event-type", "rules.yaml", 8, 9);
    assert!(e.hint.unwrap().contains("port/entity.updated"));
}

#[test]
fn otp_to_a_channel_is_rejected() {
    let d = dir_with("", &[]);
    std::fs::write(
        d.path().join("coder.yaml"),
        "sources:\n  coder2: { coder: { token: \"${SET_VAR}\" } }\nrules:\n  - id: leak\n    on: coder/notification\n    send: [{ to: console, text: \"{{title}}\" }]\n",
    )
    .unwrap();
    let e = assert_one(d.path(), "otp-leak", "coder.yaml", 6, 12);
    assert!(e.message.contains("One-Time Passcode"));
}

#[test]
fn hostile_inputs_get_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    // An alias bomb.
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for (i, c) in ('b'..='k').enumerate() {
        let prev = (b'a' + i as u8) as char;
        bomb.push_str(&format!("{c}: &{c} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
    }
    std::fs::write(d.path().join("bomb.yaml"), bomb).unwrap();
    // A 50 MB file.
    std::fs::write(d.path().join("huge.yaml"), vec![b'#'; 50 * 1024 * 1024]).unwrap();
    // A binary file.
    std::fs::write(
        d.path().join("binary.yaml"),
        [0x7f, b'E', b'L', b'F', 0, 1, 2, 3],
    )
    .unwrap();
    // Deep nesting.
    std::fs::write(
        d.path().join("deep.yaml"),
        format!("a: {}", "[".repeat(100_000)),
    )
    .unwrap();
    // Not UTF-8.
    std::fs::write(d.path().join("latin1.yaml"), b"a: caf\xe9\n").unwrap();
    let errs = errors(d.path());
    let by_file = |n: &str| {
        errs.iter()
            .find(|e| e.file.as_ref().is_some_and(|f| f.ends_with(n)))
            .unwrap_or_else(|| panic!("no error for {n}: {errs:#?}"))
    };
    assert!(by_file("bomb.yaml").message.contains("nodes"));
    assert!(by_file("huge.yaml").message.contains("over the limit"));
    assert!(by_file("binary.yaml").message.contains("binary"));
    let deep = &by_file("deep.yaml").message;
    assert!(
        deep.contains("nesting") || deep.contains("recursion limit"),
        "{deep}"
    );
    assert!(by_file("latin1.yaml").message.contains("UTF-8"));
}

#[test]
fn the_shipped_rules_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let (_, report) = check::run(&dir, &opts());
    let errs: Vec<_> = report.diagnostics.iter().filter(|d| d.is_error()).collect();
    assert!(report.valid, "{errs:#?}");
    assert!(report.tests_run >= 10);
    assert_eq!(report.tests_run, report.tests_passed);
}

/// Routing looks rules with `<path> == "<text>"` or `changed_to "<text>"` up by the event's value
/// instead of evaluating each: for a mixed ruleset (grouped and scanned rules, numeric-looking texts, `stop`, several
/// event types and wildcards) and many events, the rules found are exactly a plain scan's.
#[test]
fn the_rule_index_finds_what_a_scan_finds() {
    use switchyard::event::Event;
    use switchyard::routing::matching;
    use switchyard::routing::Rule;
    let mut body = String::from("rules:\n");
    for i in 0..60 {
        let on = ["port/entity.updated", "port/*", "*", "port/entity.created"][i % 4];
        let cond = match i % 6 {
            0 => format!("'$.blueprint == \"bp{}\"'", i % 5),
            1 => format!("'$.after.properties.kind == \"k{}\"'", i % 3),
            2 => format!("'$.after.properties.kind == \"{}\"'", i % 2),
            3 => format!(
                "'$.blueprint == \"bp{}\"', '$.after.properties.n > {}'",
                i % 5,
                i % 7
            ),
            4 if i % 12 == 4 => format!("'$.after.properties.n crosses_above {}'", i % 9),
            4 => format!("'$.after.properties.kind changed_to \"k{}\"'", i % 4),
            _ => format!("'$.after.properties.kind != \"k{}\"'", i % 3),
        };
        let stop = if i % 17 == 16 { "    stop: true\n" } else { "" };
        body.push_str(&format!(
            "  - id: r{i}\n    on: \"{on}\"\n    where: [{cond}]\n{stop}    send: [{{ to: console, text: hi }}]\n"
        ));
    }
    let d = dir_with(&body, &[]);
    let (rs, report) = check::run(d.path(), &opts());
    let rs = rs.unwrap_or_else(|| panic!("{:#?}", report.diagnostics));
    let scan = |ev: &Event| -> Vec<String> {
        let mut out = Vec::new();
        for &i in rs.candidates(&ev.event_type).iter() {
            let r: &Rule = &rs.rules[i];
            if r.conditions.iter().all(|c| c.eval(&ev.data)) {
                out.push(r.id.clone());
                if r.stop {
                    break;
                }
            }
        }
        out
    };
    let mut matched = 0;
    for n in 0..400u64 {
        let kind = match n % 5 {
            0 => json!(format!("k{}", n % 4)),
            1 => json!(n % 2),
            2 => json!(format!("{}", n % 3)),
            3 => json!(null),
            _ => json!(["k1"]),
        };
        let data = json!({
            "blueprint": if n % 7 == 0 { json!(3) } else { json!(format!("bp{}", n % 6)) },
            "before": {"properties": {"kind": "k0", "n": n % 5}},
            "after": {"properties": {"kind": kind, "n": n % 11}},
        });
        let t = [
            "port/entity.updated",
            "port/entity.created",
            "coder/notification",
        ][(n % 3) as usize];
        let ev = Event::new("port", t, format!("e{n}"), data, false);
        let fast: Vec<String> = matching(&rs, &ev).iter().map(|r| r.id.clone()).collect();
        assert_eq!(fast, scan(&ev), "event {n}: {}", ev.data);
        matched += fast.len();
    }
    assert!(matched > 200, "the events match rules ({matched})");
}

/// The server routes with `route_in_place` (no copy of the event), `check` and `simulate` with
/// `route`: for every fixture and the shipped rules, both give the same dispatches, and the event
/// is left as it was.
#[test]
fn routing_in_place_equals_routing_a_copy() {
    use switchyard::routing::{route, route_in_place};
    use switchyard::sources::{Decoded, Request};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let (rs, _) = check::run(&dir, &opts());
    let rs = rs.expect("the shipped rules load");
    let mut routed = 0;
    for kind in ["port", "coder"] {
        let src = rs
            .sources
            .values()
            .find(|s| s.kind == kind)
            .expect("a source");
        for f in std::fs::read_dir(fixture(kind)).unwrap() {
            let body = std::fs::read(f.unwrap().path()).unwrap();
            let req = Request {
                body: &body,
                ..Default::default()
            };
            let Ok(Decoded::Event(ev)) = src.source.decode(&src.name, &req) else {
                continue;
            };
            let copy = route(&rs, &ev);
            let mut same = (*ev).clone();
            let in_place = route_in_place(&rs, &mut same);
            assert_eq!(format!("{copy:?}"), format!("{in_place:?}"));
            assert_eq!(same.data, ev.data, "the event's data is back in place");
            routed += copy.len();
        }
    }
    assert!(routed >= 5, "the fixtures produce dispatches ({routed})");
}

#[test]
fn cli_exit_codes_and_json_output() {
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let ok = Command::new(bin)
        .args(["check", "rules"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let d = dir_with(
        &format!("{RULE}    send: [{{ to: nowhere, text: hi }}]\n"),
        &[],
    );
    let bad = Command::new(bin)
        .args(["check", "--format", "json"])
        .arg(d.path())
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    let diag = v["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["code"] == "unknown-destination")
        .unwrap();
    assert_eq!(diag["line"], 9);
    assert_eq!(diag["column"], 18);
    let text = Command::new(bin)
        .arg("check")
        .arg(d.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(stderr.contains("rules.yaml:9:18"), "{stderr}");
    assert!(
        stderr.contains("send: [{ to: nowhere"),
        "the offending line is shown: {stderr}"
    );
    let usage = Command::new(bin)
        .args(["check", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

#[test]
fn schema_is_up_to_date() {
    let checked_in = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/rules.schema.json"),
    )
    .unwrap();
    assert_eq!(
        checked_in,
        switchyard::config::spec::json_schema(),
        "schemas/rules.schema.json is stale: run `cargo run -- schema > schemas/rules.schema.json`"
    );
}

#[test]
fn a_kafka_session_timeout_out_of_the_brokers_range_is_an_error_at_its_value() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("rules.yaml"),
        "sources:\n  kafka:\n    port_kafka:\n      brokers: [\"127.0.0.1:9092\"]\n      org_id: org_1\n      security_protocol: PLAINTEXT\n      session_timeout: 2s\ndestinations:\n  console: { stdout: {} }\nrules: []\n",
    )
    .unwrap();
    let e = assert_one(d.path(), "bad-value", "rules.yaml", 7, 24);
    assert!(e.message.contains("between 6s and 5m"), "{e:?}");
}

/// Keyed messages: a key needs a Slack bot destination (an incoming webhook returns no message
/// `ts`), `as`/`reply`/`key_ttl` need a key, `reply` follows only an update or a resolve, a
/// keyed step does not also take `thread_ts`, and the key's template is checked against the
/// envelope like any other.
#[test]
fn keyed_messages_are_checked() {
    let body =
        "  hook: { slack_webhook: { url: \"https://hooks.slack.com/services/T/B/${SET_VAR}\" } }
  bot: { slack: { token: \"${SET_VAR}\" } }
rules:
  - id: a
    on: port/entity.updated
    send:
      - { to: hook, key: \"k:{{entity.identifier}}\", text: hi }
      - { to: bot, channel: \"#c\", as: resolve, text: hi }
      - { to: bot, channel: \"#c\", key: \"k\", as: reply, reply: \"x\", text: hi }
      - { to: bot, channel: \"#c\", key: \"k\", key_ttl: 5s, text: hi }
      - { to: bot, channel: \"#c\", key: \"k\", thread_ts: \"1.2\", text: hi }
";
    let d = dir_with(body, &[]);
    let errs = errors(d.path());
    let at = |line: usize| -> Vec<String> {
        errs.iter()
            .filter(|e| e.line == Some(line + 5))
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect()
    };
    assert!(
        at(7)[0].contains("`key` needs a `slack` (bot) destination; `hook` is `slack_webhook`"),
        "{errs:#?}"
    );
    assert!(
        at(8)[0].contains("`as` acts on a keyed message"),
        "{errs:#?}"
    );
    assert!(at(9)[0].contains("`reply` follows an update"), "{errs:#?}");
    assert!(
        at(10)[0].contains("`5s` is not a duration of a minute or more"),
        "{errs:#?}"
    );
    assert!(
        at(11)[0].contains("`thread_ts` and `key` both say where"),
        "{errs:#?}"
    );
    assert_eq!(errs.len(), 5, "{errs:#?}");

    // A key that reads a field the envelope lacks is found before any event.
    let body = "  bot: { slack: { token: \"${SET_VAR}\" } }
rules:
  - id: a
    on: port/entity.updated
    send:
      - { to: bot, channel: \"#c\", key: \"health:{{entity.identifer}}\", as: resolve, reply: \"ok {{entity.titel}}\", text: hi }
";
    let d = dir_with(body, &[]);
    let (_, report) = check::run(d.path(), &opts());
    let text: Vec<String> = report
        .diagnostics
        .iter()
        .map(|d| {
            format!(
                "{}:{}: {}",
                d.line.unwrap_or(0),
                d.column.unwrap_or(0),
                d.message
            )
        })
        .collect();
    assert!(
        text.iter().any(|t| t.contains("`entity.identifer`")),
        "{text:#?}"
    );
    assert!(text.iter().any(|t| t.contains("titel")), "{text:#?}");
}

/// Grouped rules (digests): the settings are checked, the group key is checked against the
/// event's envelope and the send templates against the digest's (`items`, `count`, `group`,
/// `rule`), a template that lists nothing of the group is an error, and a rule test sees the
/// digest the event alone would make.
#[test]
fn grouped_rules_are_checked() {
    let bad = "rules:
  - id: g
    on: port/entity.updated
    group: { wait: 2d, max: 0 }
    throttle: { key: x, window: 1m }
    send: [{ to: console, text: \"{{count}}\" }]
  - id: h
    on: port/entity.updated
    group: { by: \"{{blueprint}}\" }
    send: [{ to: console, text: \"{{entity.identifier}} changed\" }]
";
    let d = dir_with(bad, &[]);
    let msgs: Vec<String> = errors(d.path()).iter().map(|e| e.message.clone()).collect();
    for want in [
        "a grouped rule takes no `throttle`",
        "`2d` is not a duration of at most a day",
        "`max: 0`: a digest lists 1 to 1000 items",
        "uses neither `items` nor `count`",
    ] {
        assert!(msgs.iter().any(|m| m.contains(want)), "{want}: {msgs:#?}");
    }

    let good = "rules:
  - id: bulk
    on: port/entity.updated
    group: { by: \"{{blueprnt}}\" }
    send: [{ to: console, text: \"{{count}} changes: {{#each items}}{{entity.identifier}} {{/each}}{{entity.title}}\" }]
tests:
  - name: a change joins its group's digest
    event: { source: port, file: spike.json }
    expect: [{ rule: bulk, to: console, message: { text: \"1 changes: payments-deploy-prod \" } }]
";
    let d = dir_with(good, &[]);
    let (_, report) = check::run(d.path(), &opts());
    assert!(report.valid, "{:#?}", report.diagnostics);
    let warnings: Vec<&str> = report
        .diagnostics
        .iter()
        .map(|d| d.message.as_str())
        .collect();
    assert!(
        warnings.iter().any(|w| w.contains("`blueprnt`")),
        "{warnings:#?}"
    );
    assert!(
        warnings.iter().any(|w| w.contains("`entity.title`")),
        "a digest has no `entity`: {warnings:#?}"
    );
}

/// Time windows on rules and destinations are checked where they are written.
#[test]
fn bad_time_windows_are_errors_at_their_place() {
    let body = "  quiet: { stdout: {}, window: { muted: [\"sat-sun\"], timezone: Mars/Olympus } }
rules:
  - id: w
    on: port/entity.updated
    window: { active: [\"mon-fry 09:00-18:00\"] }
    send: [{ to: console, text: hi }]
";
    let d = dir_with(body, &[]);
    let errs = errors(d.path());
    let msgs: Vec<String> = errs
        .iter()
        .map(|e| format!("{}:{} {}", e.line.unwrap_or(0), e.code, e.message))
        .collect();
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("6:bad-window")
                && m.contains("`Mars/Olympus` is not a time zone")),
        "{msgs:#?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("10:bad-window") && m.contains("`fry` is not a day")),
        "{msgs:#?}"
    );
}

/// A scenario: twelve changes within the group's wait are held, and the clock passing the wait
/// sends one digest of twelve items; a keyed digest then updates its message.
#[test]
fn a_scenario_runs_events_and_clock_steps_against_one_state() {
    let mut steps = String::new();
    for i in 0..12 {
        steps.push_str(&format!(
            "      - event: {{ source: port, body: {{ action: UPDATE, resourceType: entity, status: SUCCESS, trigger: {{ at: \"2026-09-21T14:13:{i:02}Z\" }}, context: {{ blueprint: service, entity: svc-{i} }}, diff: {{ before: {{ identifier: svc-{i} }}, after: {{ identifier: svc-{i}, team: [payments] }} }} }} }}\n        expect: [{{ rule: bulk, to: console, does: group }}]\n"
        ));
    }
    let body = format!(
        "  bot: {{ slack: {{ token: \"${{SET_VAR}}\" }} }}
rules:
  - id: bulk
    on: port/entity.updated
    group: {{ by: \"{{{{join entity.team \\\",\\\"}}}}\", wait: 30s }}
    send:
      - {{ to: console, text: \"{{{{count}}}} changes\" }}
      - {{ to: bot, channel: \"#c\", key: \"d:{{{{group}}}}\", text: \"{{{{count}}}} changes for {{{{group}}}}\" }}
scenarios:
  - name: a bulk change is one digest
    steps:
{steps}      - advance: 10s
        expect: []
      - advance: 30s
        expect:
          - {{ rule: bulk, to: console, message: {{ text: \"12 changes\" }} }}
          - {{ rule: bulk, to: bot, does: post, key: \"d:payments\" }}
"
    );
    let d = dir_with(&body, &[]);
    let (_, report) = check::run(d.path(), &opts());
    assert!(report.valid, "{:#?}", report.diagnostics);
    assert_eq!(report.tests_run, 1);

    // The same scenario expecting the digest too early fails at that step.
    let early = body.replace(
        "      - advance: 10s\n        expect: []\n",
        "      - advance: 10s\n        expect: [{ rule: bulk, to: console }]\n",
    );
    let d = dir_with(&early, &[]);
    let errs = errors(d.path());
    assert!(
        errs[0]
            .message
            .contains("failed at step 13: expected bulk → console, got nothing"),
        "{errs:#?}"
    );
}

/// `run:`/`entity:` steps (acting on Port) are checked where they are written: only on a `port`
/// destination, never with message fields, `run_as` and `notify` meaning something, templates
/// compiling; and a `port` destination takes no message.
#[test]
fn port_act_steps_are_checked() {
    let header = "sources:\n  port:\n    port: { client_secret: \"${SET_VAR}\" }\ndestinations:\n  console: { stdout: {} }\n  port-api:\n    port: { client_id: \"${SET_VAR}\", client_secret: \"${SET_VAR}\" }\n";
    let cases: &[(&str, &str, &str, usize, usize)] = &[
        // (send step, code, words in the message, line, column)
        (
            "      - to: console\n        run: { action: scale_up }\n",
            "bad-send",
            "needs a `port` destination",
            13,
            9,
        ),
        (
            "      - to: port-api\n        text: hi\n",
            "bad-send",
            "does not take messages",
            12,
            9,
        ),
        (
            "      - to: port-api\n        text: hi\n        run: { action: scale_up }\n",
            "bad-send",
            "`text` is for messages",
            13,
            9,
        ),
        (
            "      - to: port-api\n        run: { action: scale_up, run_as: somebody }\n",
            "bad-value",
            "`run_as: somebody`",
            13,
            42,
        ),
        (
            "      - to: port-api\n        run: { action: scale_up, notify: console }\n",
            "unknown-destination",
            "not a `slack` (bot) destination",
            13,
            42,
        ),
        (
            "      - to: port-api\n        run: { action: \"{{#if x}}\" }\n",
            "template",
            "action",
            13,
            24,
        ),
        (
            "      - to: port-api\n        entity: { blueprint: service, identifier: a, properties: { x: 1 } }\n        run: { action: a }\n",
            "bad-send",
            "either `run` or `entity`",
            13,
            9,
        ),
    ];
    for (step, code, words, line, column) in cases {
        let d = tempfile::tempdir().unwrap();
        let text =
            format!("{header}rules:\n  - id: r\n    on: slack/block_actions\n    send:\n{step}");
        std::fs::write(d.path().join("rules.yaml"), &text).unwrap();
        let errs = errors(d.path());
        let e = errs
            .iter()
            .find(|e| e.code == *code)
            .unwrap_or_else(|| panic!("no `{code}` for\n{step}\n{errs:#?}"));
        assert!(e.message.contains(words), "{step}: {e:#?}");
        assert_eq!(
            (e.line, e.column),
            (Some(*line), Some(*column)),
            "{step}: {e:#?}"
        );
    }
    // And a good one loads.
    let d = tempfile::tempdir().unwrap();
    let text = format!("{header}rules:\n  - id: r\n    on: slack/block_actions\n    send:\n      - to: port-api\n        run: {{ action: scale_up, entity: \"{{{{action.value}}}}\", properties: {{ n: 2 }}, follow: {{ poll: \"off\", timeout: 15m }}, allow: [U1, a@example.com] }}\n");
    std::fs::write(d.path().join("rules.yaml"), &text).unwrap();
    let (_, report) = check::run(d.path(), &opts());
    assert!(report.valid, "{:#?}", report.diagnostics);
}
