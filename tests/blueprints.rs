//! Port blueprints in the rules directory: `switchyard blueprints pull` fetches them from a fake
//! Port API on 127.0.0.1, and `check` then types entity properties with them.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Fake, Received};
use serde_json::{json, Value};
use switchyard::check;
use switchyard::config::diag::Diagnostic;
use switchyard::config::{LoadOptions, Mode};

fn deployment_config() -> Value {
    json!({
        "identifier": "DeploymentConfig",
        "title": "Deployment config",
        "schema": {
            "properties": {
                "cpuUtil": {"type": "number", "title": "CPU %"},
                "healthStatus": {"type": "string", "enum": ["Healthy", "Degraded", "Unknown"]},
                "image": {"type": "string"}
            },
            "required": []
        },
        "relations": {"service": {"target": "service", "many": false}},
        "calculationProperties": {}
    })
}

async fn fake_port() -> Fake {
    Fake::start(|r: &Received, _| {
        let ok = |v: Value| {
            (
                200,
                vec![("content-type".to_string(), "application/json".to_string())],
                v.to_string(),
            )
        };
        match (r.method.as_str(), r.path.as_str()) {
            ("POST", "/v1/auth/access_token") => {
                ok(json!({"ok": true, "accessToken": "tok", "expiresIn": 10800}))
            }
            ("GET", "/v1/blueprints") => {
                assert_eq!(r.headers.get("authorization").map(String::as_str), Some("Bearer tok"));
                ok(json!({"ok": true, "blueprints": [deployment_config(), {"identifier": "../evil", "schema": {"properties": {}}}]}))
            }
            _ => (404, vec![], json!({"ok": false, "error": "not_found"}).to_string()),
        }
    })
    .await
}

fn rules_dir(body: &str, base_url: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("templates")).unwrap();
    std::fs::write(
        d.path().join("rules.yaml"),
        format!(
            "sources:\n  port: {{ port: {{ client_secret: \"${{PORT_SECRET}}\" }} }}\ndestinations:\n  console: {{ stdout: {{}} }}\n  port-api: {{ port: {{ client_id: \"${{PORT_ID}}\", client_secret: \"${{PORT_SECRET}}\", base_url: \"{base_url}\" }} }}\n{body}"
        ),
    )
    .unwrap();
    d
}

fn diags(dir: &Path) -> Vec<Diagnostic> {
    check::run(dir, &LoadOptions::new(Mode::Check))
        .1
        .diagnostics
}

fn one<'a>(ds: &'a [Diagnostic], code: &str, needle: &str) -> &'a Diagnostic {
    let f: Vec<_> = ds
        .iter()
        .filter(|d| d.code == code && d.message.contains(needle))
        .collect();
    assert_eq!(f.len(), 1, "one `{code}` about {needle} in {ds:#?}");
    f[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulled_blueprints_type_the_properties_check_sees() {
    let port = fake_port().await;
    let rules = "rules:
  - id: hot
    on: port/entity.updated
    where:
      - $.blueprint == \"DeploymentConfig\"
      - $.after.properties.cpuUtill crosses_above 80
      - $.after.properties.cpuUtil > \"80\"
      - $.after.properties.healthStatus changed_to \"Degradd\"
    send: [{ to: console, text: \"{{entity.properties.healthStatuss}} {{entity.properties.image}}\" }]
  - id: any-blueprint
    on: port/entity.updated
    where: ['$.after.properties.whatever exists']
    send: [{ to: console, text: \"{{entity.properties.whatever}}\" }]
";
    let d = rules_dir(rules, &port.url(""));
    let before = diags(d.path());
    assert!(
        !before.iter().any(|x| x.message.contains("cpuUtill")),
        "without blueprints the properties are open: {before:#?}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["blueprints", "pull", "--port", "port-api", "--rules"])
        .arg(d.path())
        .env("PORT_ID", "id")
        .env("PORT_SECRET", "not-a-real-secret")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("wrote 1 blueprint"), "{stdout}");
    assert!(stderr.contains("../evil"), "{stderr}");
    assert!(!stderr.contains("not-a-real-secret") && !stdout.contains("not-a-real-secret"));
    assert!(d.path().join("blueprints/DeploymentConfig.json").is_file());
    assert!(!d.path().parent().unwrap().join("evil.json").exists());

    let after = diags(d.path());
    let w = one(&after, "unknown-field", "cpuUtill");
    assert_eq!(w.hint.as_deref(), Some("did you mean `cpuUtil`?"));
    let e = one(&after, "bad-value", "is a number");
    assert!(e.is_error() && e.line.is_some(), "{e:#?}");
    let e = one(&after, "bad-value", "Degradd");
    assert!(e.message.contains("\"Degraded\""), "{e:#?}");
    assert_eq!(e.hint.as_deref(), Some("did you mean \"Degraded\"?"));
    one(&after, "unknown-field", "healthStatuss");
    assert!(
        !after.iter().any(|x| x.message.contains("image")),
        "{after:#?}"
    );
    // A rule not pinned to a blueprint keeps the properties open.
    assert!(
        !after.iter().any(|x| x.message.contains("whatever")),
        "{after:#?}"
    );
}

#[test]
fn a_broken_blueprint_file_is_an_error_at_its_place() {
    let d = rules_dir("", "http://127.0.0.1:9");
    std::fs::create_dir_all(d.path().join("blueprints")).unwrap();
    std::fs::write(
        d.path().join("blueprints/x.json"),
        "{\n  \"identifier\": \"x\",\n  oops\n}\n",
    )
    .unwrap();
    let ds = diags(d.path());
    let e = one(&ds, "bad-blueprint", "not JSON");
    assert_eq!(e.line, Some(3), "{e:#?}");
}
