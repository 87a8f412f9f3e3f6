//! `check` proves what `serve` will do: each way a rules change once passed `check` and then
//! failed in production is now reported, at a place in a file, with a hint.

use std::path::Path;
use std::sync::Arc;

use switchyard::check;
use switchyard::config::diag::Diagnostic;
use switchyard::config::{load_dir, LoadOptions, Mode};

fn opts(mode: Mode) -> LoadOptions {
    let mut o = LoadOptions::new(mode);
    o.env = Arc::new(|name| match name {
        "SET_VAR" => Some("value".into()),
        _ => None,
    });
    o
}

const HEADER: &str = "sources:
  port: { port: { client_secret: \"${SET_VAR}\" } }
  coder: { coder: { token: \"${SET_VAR}\" } }
destinations:
  console: { stdout: {} }
  bot: { slack: { token: \"${SET_VAR}\" } }
  port-api: { port: { client_id: \"${SET_VAR}\", client_secret: \"${SET_VAR}\" } }
";

fn dir_with(body: &str, templates: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let rules = d.path().join("rules");
    std::fs::create_dir_all(rules.join("templates")).unwrap();
    std::fs::write(rules.join("rules.yaml"), format!("{HEADER}{body}")).unwrap();
    for (n, t) in templates {
        std::fs::write(rules.join("templates").join(format!("{n}.hbs")), t).unwrap();
    }
    let ex = d.path().join("examples");
    std::fs::create_dir_all(&ex).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/events");
    for f in ["coder-workspace-deleted.json", "cpu-spike.json"] {
        std::fs::copy(fixtures.join(f), ex.join(f)).unwrap();
    }
    d
}

fn run(d: &tempfile::TempDir) -> (bool, Vec<Diagnostic>) {
    let (_, report) = check::run(&d.path().join("rules"), &opts(Mode::Check));
    (report.valid, report.diagnostics)
}

/// The one diagnostic with `code` whose message contains `needle`, with a location and a hint.
fn find<'a>(diags: &'a [Diagnostic], code: &str, needle: &str) -> &'a Diagnostic {
    let found: Vec<&Diagnostic> = diags
        .iter()
        .filter(|d| d.code == code && d.message.contains(needle))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one `{code}` about `{needle}` in {diags:#?}"
    );
    let d = found[0];
    assert!(d.file.is_some(), "no location: {d:#?}");
    d
}

#[test]
fn a_dm_to_a_field_that_does_not_exist_fails_check() {
    let d = dir_with(
        "rules:
  - id: dm
    on: coder/notification
    where: ['$.template.id != \"62f86a30-2330-4b61-a26d-311ff3b608cf\"']
    send:
      - to: bot
        user_email: \"{{payload.user_email}}\"
        text: \"{{title}}\"
tests:
  - name: deleted
    event: { source: coder, file: ../examples/coder-workspace-deleted.json }
    expect: [{ rule: dm, to: bot }]
",
        &[],
    );
    let (valid, diags) = run(&d);
    assert!(!valid);
    // The envelope shows it without any event: the step's only recipient is a field no Coder
    // notification has.
    let w = find(&diags, "bad-recipient", "payload.user_email");
    assert!(w.is_error() && w.message.contains("dead letter"), "{w:#?}");
    assert_eq!((w.line, w.column), (Some(14), Some(21)), "{w:#?}");
    assert!(w.hint.as_deref().unwrap().contains("user"), "{w:#?}");
}

#[test]
fn a_recipient_that_renders_empty_for_a_test_event_fails_check() {
    // `labels` is open (Coder sends what it likes), so only the event can tell.
    let d = dir_with(
        "rules:
  - id: dm
    on: coder/notification
    where: ['$.template.id != \"62f86a30-2330-4b61-a26d-311ff3b608cf\"']
    send: [{ to: bot, user_email: \"{{labels.owner_email}}\", text: \"{{title}}\" }]
tests:
  - name: deleted
    event: { source: coder, file: ../examples/coder-workspace-deleted.json }
    expect: [{ rule: dm, to: bot }]
",
        &[],
    );
    let (valid, diags) = run(&d);
    assert!(!valid);
    let e = find(&diags, "bad-recipient", "for this event");
    assert!(
        e.is_error() && e.hint.is_some() && e.line.is_some(),
        "{e:#?}"
    );
}

#[test]
fn tests_assert_the_recipient() {
    let body = |email: &str| {
        format!(
            "rules:
  - id: dm
    on: coder/notification
    where: ['$.template.id != \"62f86a30-2330-4b61-a26d-311ff3b608cf\"']
    send: [{{ to: bot, user_email: \"{{{{user.email}}}}\", text: \"{{{{title}}}}\" }}]
tests:
  - name: deleted
    event: {{ source: coder, file: ../examples/coder-workspace-deleted.json }}
    expect: [{{ rule: dm, to: bot, user_email: \"{email}\" }}]
"
        )
    };
    let ok = dir_with(&body("ana@example.com"), &[]);
    let (valid, diags) = run(&ok);
    let actual = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/events/coder-workspace-deleted.json"),
    )
    .unwrap();
    let email: serde_json::Value = serde_json::from_str(&actual).unwrap();
    let email = email["payload"]["user_email"].as_str().unwrap().to_string();
    let ok = dir_with(&body(&email), &[]);
    let (valid2, diags2) = run(&ok);
    assert!(valid2, "{diags2:#?}");
    if email != "ana@example.com" {
        assert!(!valid);
        let e = find(&diags, "test-failed", "user_email");
        assert!(e.message.contains(&email), "{e:#?}");
    }
}

#[test]
fn a_failed_message_expectation_names_the_first_difference() {
    let d = dir_with(
        "rules:
  - id: r
    on: port/entity.updated
    send: [{ to: console, blocks: [{ type: section, text: { type: mrkdwn, text: \"{{entity.title}}\" } }] }]
tests:
  - name: spike
    event: { source: port, file: ../examples/cpu-spike.json }
    expect:
      - rule: r
        to: console
        message: { blocks: [{ type: section, text: { text: \"Something else\" } }] }
",
        &[],
    );
    let (_, diags) = run(&d);
    let e = find(&diags, "test-failed", "blocks[0].text.text");
    assert!(e.message.contains("Something else"), "{e:#?}");
}

#[test]
fn a_template_behind_with_is_rendered_by_check() {
    let rules = "rules:
  - id: q
    on: port/entity.updated
    with:
      services: { port: port-api, search: { blueprint: service, rules: [] } }
    send: [{ to: console, template: list }]
tests:
  - name: spike
    event: { source: port, file: ../examples/cpu-spike.json }
    expect: [{ rule: q, to: port-api }]
";
    // A trailing comma inside the loop: broken JSON as soon as the result has an element.
    let list = r#"{"blocks": [{{#each with.services}}{"type": "section", "text": {"type": "mrkdwn", "text": "{{title}}"}},{{/each}}]}"#;
    let d = dir_with(rules, &[("list", list)]);
    let (valid, diags) = run(&d);
    assert!(!valid, "{diags:#?}");
    let e = find(&diags, "template", "one-entity sample");
    assert!(e.message.contains("not valid JSON"), "{e:#?}");

    // With results given, the test expects what the rule finally sends.
    let given = rules.replace(
        "expect: [{ rule: q, to: port-api }]",
        "with: { services: [{ identifier: a, title: A }] }\n    expect: [{ rule: q, to: console, message: { blocks: [{ text: { text: A } }] } }]",
    );
    let fixed = r#"{"blocks": [{{#each with.services}}{{#unless @first}},{{/unless}}{"type": "section", "text": {"type": "mrkdwn", "text": "{{title}}"}}{{/each}}]}"#;
    let d = dir_with(&given, &[("list", fixed)]);
    let (valid, diags) = run(&d);
    assert!(valid, "{diags:#?}");
}

#[test]
fn misspelt_helpers_fail_and_misspelt_fields_warn_without_any_event() {
    let d = dir_with(
        "rules:
  - id: r
    on: port/entity.updated
    send: [{ to: console, template: t }]
",
        &[(
            "t",
            "{\"blocks\": [\n  {\"type\": \"header\", \"text\": {\"type\": \"plain_text\", \"text\": \"{{plian entity.title}}\"}},\n  {\"type\": \"section\", \"text\": {\"type\": \"mrkdwn\", \"text\": \"{{entity.identifer}} {{truncate entity.title}}\"}}\n]}\n",
        )],
    );
    let (valid, diags) = run(&d);
    assert!(!valid);
    let e = find(&diags, "template", "plian");
    assert!(e.is_error());
    assert_eq!((e.line, e.column), (Some(2), Some(62)), "{e:#?}");
    assert_eq!(e.hint.as_deref(), Some("did you mean `plain`?"));
    let a = find(&diags, "template", "truncate");
    assert!(a.message.contains("takes 2"), "{a:#?}");
    let w = find(&diags, "unknown-field", "identifer");
    assert!(!w.is_error());
    assert_eq!(w.hint.as_deref(), Some("did you mean `identifier`?"));
    assert_eq!(w.line, Some(3));
    // `serve` refuses what fails for every event.
    let (rs, _) = load_dir(&d.path().join("rules"), &opts(Mode::Serve));
    assert!(rs.is_none());
}

#[test]
fn a_map_written_into_a_string_warns_and_fails_when_a_test_reaches_it() {
    let rules = "rules:
  - id: r
    on: coder/notification
    where: ['$.template.id != \"62f86a30-2330-4b61-a26d-311ff3b608cf\"']
    send: [{ to: console, template: t }]
";
    let t = [("t", r#"{"text": "{{body}}"}"#)];
    let d = dir_with(rules, &t);
    let (valid, diags) = run(&d);
    assert!(valid, "{diags:#?}");
    let w = find(&diags, "unknown-field", "JSON string");
    assert!(!w.is_error());
    let tested = format!(
        "{rules}tests:\n  - name: deleted\n    event: {{ source: coder, file: ../examples/coder-workspace-deleted.json }}\n    expect: [{{ rule: r, to: console }}]\n"
    );
    let d = dir_with(&tested, &t);
    let (valid, diags) = run(&d);
    assert!(!valid);
    let e = find(&diags, "template", "test `deleted`");
    assert!(e.message.contains("JSON string"), "{e:#?}");
}

#[test]
fn a_rule_listening_to_nothing_is_an_error() {
    let d = dir_with(
        "rules:\n  - id: r\n    on: []\n    send: [{ to: console, text: hi }]\n",
        &[],
    );
    let (valid, diags) = run(&d);
    assert!(!valid);
    let e = find(&diags, "bad-rule", "never fires");
    assert_eq!(e.line, Some(10));
}

#[test]
fn schedules_can_be_tested_and_misnamed_ones_get_a_did_you_mean() {
    let body = |name: &str| {
        format!(
            "schedules:
  weekly: {{ cron: \"0 9 * * MON\", timezone: Europe/Berlin }}
rules:
  - id: r
    on: schedule/weekly
    send: [{{ to: console, text: \"tick {{{{tick}}}} {{{{schedule.name}}}}\" }}]
tests:
  - name: monday
    event: {{ schedule: {name}, at: \"2026-01-05T08:00:00Z\" }}
    expect:
      - {{ rule: r, to: console, message: {{ text: \"tick 2026-01-05T09:00:00+01:00 weekly\" }} }}
"
        )
    };
    let (valid, diags) = run(&dir_with(&body("weekly"), &[]));
    assert!(valid, "{diags:#?}");
    let (valid, diags) = run(&dir_with(&body("weekyl"), &[]));
    assert!(!valid);
    let e = find(&diags, "unknown-schedule", "weekyl");
    assert_eq!(e.hint.as_deref(), Some("did you mean `weekly`?"));
}

#[test]
fn serve_does_not_need_the_test_files() {
    let d = dir_with(
        "rules:
  - id: r
    on: port/entity.updated
    send: [{ to: console, text: \"{{entity.title}}\" }]
tests:
  - name: spike
    event: { source: port, file: ../examples/cpu-spike.json }
    expect: [{ rule: r, to: console }]
",
        &[],
    );
    std::fs::remove_dir_all(d.path().join("examples")).unwrap();
    let (rs, diags) = load_dir(&d.path().join("rules"), &opts(Mode::Serve));
    assert!(rs.is_some(), "{diags:#?}");
    assert!(!diags.iter().any(Diagnostic::is_error), "{diags:#?}");
    // `check` still reports it.
    let (valid, diags) = run(&d);
    assert!(!valid);
    find(&diags, "missing-file", "cannot read");
}

#[test]
fn the_passcode_leak_points_at_the_leaking_step() {
    let d = dir_with(
        "rules:
  - id: r
    on: coder/notification
    send:
      - { to: bot, user_email: \"{{user.email}}\", text: \"{{title}}\" }
      - { to: console, text: \"{{title}}\" }
",
        &[],
    );
    let (_, diags) = run(&d);
    let e = find(&diags, "otp-leak", "console");
    assert_eq!(e.line, Some(13), "{e:#?}");
}

#[test]
fn merge_keys_and_x_anchors_work_as_people_write_them() {
    let d = dir_with(
        "x-defaults:
  send: &to-console
    - { to: console, text: \"{{entity.title}}\" }
  rule: &port-rule
    on: port/entity.updated
    send: *to-console
rules:
  - <<: *port-rule
    id: merged
  - <<: [*port-rule]
    id: overridden
    on: port/entity.created
tests:
  - name: spike
    event: { source: port, file: ../examples/cpu-spike.json }
    expect: [{ rule: merged, to: console }]
",
        &[],
    );
    let (valid, diags) = run(&d);
    assert!(valid, "{diags:#?}");
    let (rs, _) = load_dir(&d.path().join("rules"), &opts(Mode::Check));
    let rs = rs.unwrap();
    assert_eq!(rs.rules[1].on, vec!["port/entity.created".to_string()]);
    // A merge of something that is not a mapping is an error at its place.
    let d = dir_with("rules:\n  - <<: [1, 2]\n    id: r\n", &[]);
    let (valid, diags) = run(&d);
    assert!(!valid);
    let e = find(&diags, "yaml", "merge key");
    assert_eq!(e.line, Some(9), "{e:#?}");
}

#[test]
fn the_readme_and_the_envelope_schema_are_generated_from_the_envelope() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("docs/rules.md")).unwrap();
    let begin = "<!-- envelope:begin (generated by `switchyard envelope`) -->\n";
    let end = "<!-- envelope:end -->";
    let (_, rest) = readme
        .split_once(begin)
        .expect("docs/rules.md envelope markers");
    let (tables, _) = rest
        .split_once(end)
        .expect("docs/rules.md envelope end marker");
    assert_eq!(
        tables,
        switchyard::envelope::markdown(),
        "docs/rules.md's envelope tables are stale: replace them with `cargo run -- envelope`"
    );
    let schema = std::fs::read_to_string(root.join("schemas/envelope.schema.json")).unwrap();
    assert_eq!(
        schema,
        switchyard::envelope::json_schema(),
        "run `cargo run -- envelope --format schema > schemas/envelope.schema.json`"
    );
}

#[test]
fn a_closed_pipe_ends_an_offline_command_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("schema")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn diagnostics_say_what_is_accepted() {
    // A list in a condition: single quotes are fine, a broken element is named at its column.
    let d = dir_with(
        "rules:
  - id: r
    on: port/entity.updated
    where:
      - $.blueprint in [\"a\", 'b', c]
      - $.blueprint in [\"a\", b c]
    send: [{ to: console, text: hi }]
schedules:
  four: { cron: \"0 9 * *\" }
",
        &[],
    );
    let (_, diags) = run(&d);
    let e = find(&diags, "bad-condition", "element 2");
    assert_eq!((e.line, e.column), (Some(13), Some(30)), "{e:#?}");
    assert!(
        !diags.iter().any(|d| d.message.contains("element 3")),
        "{diags:#?}"
    );
    let c = find(&diags, "bad-cron", "4 fields");
    assert!(c.message.contains("5") && c.message.contains("6"), "{c:#?}");
    // An unset destination with a fallback says where messages go meanwhile.
    let d = dir_with("", &[]);
    std::fs::write(
        d.path().join("rules/alerts.yaml"),
        "destinations:\n  alerts: { slack_webhook: { url: \"${UNSET_URL}\" }, fallback: console }\nrules:\n  - id: r\n    on: port/entity.updated\n    send: [{ to: alerts, text: hi }]\n",
    )
    .unwrap();
    let (_, diags) = run(&d);
    let w = find(&diags, "unset-var", "alerts");
    assert!(
        w.hint.as_deref().unwrap().contains("delivers to `console`"),
        "{w:#?}"
    );
}

#[test]
fn an_unclosed_block_is_one_error_at_its_opening_tag() {
    let d = dir_with(
        "rules:\n  - id: r\n    on: port/entity.updated\n    send: [{ to: console, template: t }]\n",
        &[(
            "t",
            "{\n  \"blocks\": [\n    {{#if entity.title}}\n    {\"type\": \"section\", \"text\": {\"type\": \"mrkdwn\", \"text\": \"{{entity.title}}\"}}\n  ]\n}\n",
        )],
    );
    let (valid, diags) = run(&d);
    assert!(!valid);
    let errors: Vec<_> = diags.iter().filter(|d| d.is_error()).collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].message.contains("`{{#if}}` is never closed"),
        "{errors:#?}"
    );
    assert_eq!((errors[0].line, errors[0].column), (Some(3), Some(5)));
    let d = dir_with(
        "rules:\n  - id: r\n    on: port/entity.updated\n    send: [{ to: console, template: t }]\n",
        &[("t", "{{#each a}}{{#if b}}x{{/each}}{{/if}}")],
    );
    let (_, diags) = run(&d);
    let e = find(&diags, "template", "closes `{{#if}}`");
    assert_eq!(e.column, Some(22), "{e:#?}");
}

#[test]
fn a_render_error_names_the_template_line() {
    let d = dir_with(
        "rules:
  - id: r
    on: port/entity.updated
    send: [{ to: console, template: t }]
tests:
  - name: spike
    event: { source: port, file: ../examples/cpu-spike.json }
    expect: [{ rule: r, to: console }]
",
        &[("t", "{\n  \"text\": \"{{entity.title}}\",\n  \"x\": \"{{truncate entity.title \"a\"}}\"\n}\n")],
    );
    let (valid, diags) = run(&d);
    assert!(!valid);
    let e = find(&diags, "template", "test `spike`");
    assert_eq!(e.line, Some(3), "{e:#?}");
    assert!(e.message.contains("line 3"), "{e:#?}");
}

#[test]
fn every_error_in_a_file_is_reported_in_one_run() {
    let d = dir_with(
        "rules:
  - id: a
    on: port/entity.updated
    sned: []
  - id: b
    on: port/entity.updated
    send: [{ to: console, txt: hi }]
schedules:
  s: { crn: \"0 9 * * *\" }
",
        &[],
    );
    let (_, diags) = run(&d);
    let keys: Vec<&str> = diags
        .iter()
        .filter(|d| d.code == "unknown-key")
        .map(|d| d.message.as_str())
        .collect();
    assert_eq!(keys.len(), 3, "{diags:#?}");
    for k in ["sned", "txt", "crn"] {
        assert!(keys.iter().any(|m| m.contains(k)), "{k}: {keys:?}");
    }
}

#[test]
fn query_prints_what_a_path_selects_and_simulate_runs_a_schedule() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let out = std::process::Command::new(bin)
        .args(["query", "--rules"])
        .arg(root.join("rules"))
        .args(["--source", "port"])
        .arg(root.join("examples/events/cpu-spike.json"))
        .arg("$.after.properties.cpuUtil")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "91");
    let none = std::process::Command::new(bin)
        .args(["query", "--rules"])
        .arg(root.join("rules"))
        .args(["--source", "port"])
        .arg(root.join("examples/events/cpu-spike.json"))
        .arg("$.after.nope")
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("selects nothing"));
    let bad = std::process::Command::new(bin)
        .args(["query", "--rules"])
        .arg(root.join("rules"))
        .args(["--source", "port"])
        .arg(root.join("examples/events/cpu-spike.json"))
        .arg("$.after[")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));

    let sim = std::process::Command::new(bin)
        .args(["simulate", "--rules"])
        .arg(root.join("rules"))
        .args(["--schedule", "weekly-readines"])
        .output()
        .unwrap();
    assert_eq!(sim.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&sim.stderr).contains("did you mean `weekly-readiness`?"),
        "{}",
        String::from_utf8_lossy(&sim.stderr)
    );
    let sim = std::process::Command::new(bin)
        .args(["simulate", "--rules"])
        .arg(root.join("rules"))
        .args([
            "--schedule",
            "weekly-readiness",
            "--at",
            "2026-01-05T08:00:00Z",
        ])
        .output()
        .unwrap();
    assert!(
        sim.status.success(),
        "{}",
        String::from_utf8_lossy(&sim.stderr)
    );
    assert!(String::from_utf8_lossy(&sim.stdout).contains("readiness-reminder"));
}

#[test]
fn entities_link_to_ports_web_app_in_the_configured_region() {
    let body = |app: &str| {
        format!(
            "rules:
  - id: r
    on: port/entity.updated
    send: [{{ to: console, text: \"{{{{entity.url}}}}\" }}]
tests:
  - name: spike
    event: {{ source: {app}, file: ../examples/cpu-spike.json }}
    expect:
      - rule: r
        to: console
        message: {{ text: \"{}/DeploymentConfigEntity?identifier=payments-deploy-prod\" }}
",
            if app == "port" {
                "https://app.port.io"
            } else {
                "https://app.us.port.io"
            }
        )
    };
    let (valid, diags) = run(&dir_with(&body("port"), &[]));
    assert!(valid, "{diags:#?}");
    let d = dir_with(&body("us"), &[]);
    std::fs::write(
        d.path().join("rules/us.yaml"),
        "sources:\n  us: { port: { client_secret: \"${SET_VAR}\", app_url: \"https://app.us.port.io\" } }\n",
    )
    .unwrap();
    let (valid, diags) = run(&d);
    assert!(valid, "{diags:#?}");
}
