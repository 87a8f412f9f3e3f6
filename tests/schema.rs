//! `schemas/rules.schema.json` agrees with `check` where JSON Schema can say it: every shipped
//! rules file validates with an independent validator (the `jsonschema` crate), and each broken
//! file below is refused by both.

use std::path::Path;

use serde_json::Value;
use switchyard::config::yaml::{parse, Limits};

fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/rules.schema.json"),
    )
    .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    jsonschema::validator_for(&v).expect("the schema compiles")
}

fn as_json(yaml: &str) -> Value {
    parse(yaml, Limits::default()).unwrap().0
}

#[test]
fn every_shipped_rules_file_validates() {
    let v = schema();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let mut n = 0;
    for f in std::fs::read_dir(dir).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            let doc = as_json(&std::fs::read_to_string(&p).unwrap());
            let errors: Vec<String> = v
                .iter_errors(&doc)
                .map(|e| format!("{} at {}", e, e.instance_path()))
                .collect();
            assert!(errors.is_empty(), "{}: {errors:#?}", p.display());
            n += 1;
        }
    }
    assert!(n >= 3);
}

#[test]
fn broken_files_are_refused_by_the_schema_and_by_check() {
    let head = "sources:\n  port: { port: { client_secret: \"${S}\" } }\ndestinations:\n  console: { stdout: {} }\n";
    let cases = [
        ("no event type", "rules:\n  - id: r\n    on: []\n    send: [{ to: console, text: hi }]\n"),
        ("a misspelt event type", "rules:\n  - id: r\n    on: port/entity.update\n    send: [{ to: console, text: hi }]\n"),
        ("nothing to send", "rules:\n  - id: r\n    on: port/entity.updated\n    send: []\n"),
        ("a step without a message", "rules:\n  - id: r\n    on: port/entity.updated\n    send: [{ to: console }]\n"),
        ("template and blocks", "rules:\n  - id: r\n    on: port/entity.updated\n    send: [{ to: console, template: x, blocks: [] }]\n"),
        ("two destination kinds", "  both: { stdout: {}, slack_webhook: { url: \"${U}\" } }\nrules: []\n"),
        ("no destination kind", "  none: { timeout: 10s }\nrules: []\n"),
        ("a duration in words", "  slow: { stdout: {}, timeout: \"ten seconds\" }\nrules: []\n"),
        ("a four-field cron", "schedules:\n  s: { cron: \"0 9 * *\" }\n"),
        ("an unknown key", "rules:\n  - id: r\n    on: port/entity.updated\n    sned: [{ to: console, text: hi }]\n"),
    ];
    let v = schema();
    for (what, body) in cases {
        let text = format!("{head}{body}");
        let doc = as_json(&text);
        assert!(!v.is_valid(&doc), "{what}: the schema accepts it");
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("r.yaml"), &text).unwrap();
        let (_, report) = switchyard::check::run(
            d.path(),
            &switchyard::config::LoadOptions::new(switchyard::config::Mode::Check),
        );
        assert!(
            !report.valid,
            "{what}: check accepts it: {:#?}",
            report.diagnostics
        );
    }
}

#[test]
fn the_schema_has_no_formats_strict_validators_reject() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/rules.schema.json"),
    )
    .unwrap();
    for bad in ["\"uint32\"", "\"double\"", "\"uint\"", "\"int64\""] {
        assert!(!text.contains(&format!("\"format\": {bad}")), "{bad}");
    }
}

/// The schemas load in ajv's strict mode (what editors and CI validators use). ajv comes from
/// npm: `.ci/run` installs it and sets `SWITCHYARD_AJV_DIR`; without it the test says it was
/// skipped. Union types (`["string", "null"]`, standard JSON Schema for optional settings) are
/// allowed explicitly, as ajv asks.
#[test]
fn the_schemas_load_in_ajv_strict_mode() {
    let Ok(modules) = std::env::var("SWITCHYARD_AJV_DIR") else {
        eprintln!("ajv test skipped: SWITCHYARD_AJV_DIR unset (`.ci/run` installs ajv)");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = "const Ajv2020 = require('ajv/dist/2020');\n\
        const ajv = new Ajv2020({strict: true, allowUnionTypes: true, allErrors: true});\n\
        for (const f of process.argv.slice(1)) { ajv.compile(require(f)); console.log('ok ' + f); }\n";
    let out = std::process::Command::new("node")
        .arg("-e")
        .arg(script)
        .arg(root.join("schemas/rules.schema.json"))
        .arg(root.join("schemas/envelope.schema.json"))
        .env("NODE_PATH", &modules)
        .output()
        .expect("node runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("ok ").count(), 2, "{text}");
}
