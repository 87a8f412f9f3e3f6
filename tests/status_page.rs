//! The `/status` page as an operator sees it: opened in a real browser (headless Chromium,
//! Debian's `chromium`), with a destination failing, a schedule armed and a refused reload.
//! The test reads the rendered DOM (after the page's script has turned times into local time)
//! and keeps a screenshot in `target/status-page.png` (the one in docs/ is a copy of it).
//! Where no Chromium is installed the test says it was skipped; `.ci/run` installs it.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{eventually, Engine, Fake};

const SECRET: &str = "status-page-secret";

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {name}"))
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
}

/// Runs headless Chromium on `url` with `args` (its own profile, no network besides the page).
fn browse(chrome: &PathBuf, profile: &std::path::Path, args: &[&str], url: &str) -> String {
    let out = Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,1250",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .env("TZ", "Europe/Berlin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_in_a_browser() {
    let Some(chrome) = chromium() else {
        eprintln!(
            "browser check of /status skipped: chromium is not installed (`.ci/run` installs it)"
        );
        return;
    };
    // One destination that works and one whose upstream is down.
    let ok = Fake::slack_ok().await;
    let down = Fake::start(|_, _| {
        (
            503,
            vec![],
            "upstream connect error or disconnect/reset before headers".into(),
        )
    })
    .await;
    let rules = format!(
        r#"sources:
  port: {{ port: {{ client_secret: "${{PORT_CLIENT_SECRET}}" }} }}
  coder: {{ coder: {{ token: "${{CODER_WEBHOOK_TOKEN}}" }} }}
destinations:
  platform-alerts:
    slack_webhook: {{ url: "{ok}" }}
  incident-room:
    slack_webhook: {{ url: "{down}" }}
    retry_initial: 100ms
    retry_max: 1s
schedules:
  weekly-readiness: {{ cron: "0 9 * * MON", timezone: Europe/Berlin }}
rules:
  - id: cpu-hot
    on: port/entity.updated
    send:
      - to: platform-alerts
        text: "{{{{entity.identifier}}}} is hot"
      - to: incident-room
        text: "{{{{entity.identifier}}}} is hot"
"#,
        ok = ok.url("/hook"),
        down = down.url("/hook"),
    );
    let (tmp, dir) = Engine::workspace(&[("rules.yaml", rules.as_str())], false);
    let e = Engine::start(
        tmp,
        dir.clone(),
        &[
            ("PORT_CLIENT_SECRET", SECRET),
            ("SWITCHYARD_ADMIN_TOKEN", "admin-token"),
        ],
    )
    .await;
    let body = common::fixture("port/changelog-update-cpu-spike.json");
    for i in 0..3 {
        let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["context"]["entity"] = format!("payments-api-{i}").into();
        v["diff"]["after"]["identifier"] = format!("payments-api-{i}").into();
        let (status, _) = e
            .post_port("port", SECRET, &serde_json::to_vec(&v).unwrap())
            .await;
        assert_eq!(status, 202);
    }
    ok.wait_for("/hook", 3, 10).await;
    eventually(10, "failed attempts to incident-room", || {
        let s = common::block_on(e.get_json("/status"));
        let d = &s["destinations"]["incident-room"];
        (d["failed_attempts"].as_u64().unwrap_or(0) >= 3
            && d["retrying"].as_u64().unwrap_or(0) >= 1)
            .then_some(())
    })
    .await;
    // A refused edit, whose long diagnostic must wrap rather than widen the page.
    std::fs::write(
        dir.join("broken.yaml"),
        "rules:\n  - id: typo\n    on: port/entity.updated\n    send: [{ to: platform-alertz, text: \"a very long line of text that goes on and on to show that the diagnostics wrap inside the page instead of making it scroll sideways\" }]\n",
    )
    .unwrap();
    eventually(10, "the refused reload", || {
        let s = common::block_on(e.get_json("/status"));
        (s["reload"]["ok"] == false).then_some(())
    })
    .await;

    let profile = tempfile::tempdir().unwrap();
    let url = e.url("/status");
    let dom =
        tokio::task::block_in_place(|| browse(&chrome, profile.path(), &["--dump-dom"], &url));
    for must in [
        // Header: state, version, uptime.
        "ready",
        "version <b>0.",
        "up <b>",
        // Destinations with their counters and the failing one's last error and its time.
        "platform-alerts",
        "incident-room",
        "retrying",
        "failed attempts",
        "upstream connect error",
        // Sources, the disabled one with why.
        "POST /hooks/port",
        "CODER_WEBHOOK_TOKEN",
        "disabled",
        // The schedule and its next run, in its own zone.
        "weekly-readiness",
        "0 9 * * MON",
        "Europe/Berlin",
        // The refused reload, its diagnostic and that the old rules still serve.
        "refused: the previous rules keep serving",
        "platform-alertz",
        // Rules.
        "cpu-hot",
    ] {
        assert!(dom.contains(must), "`{must}` is not on the page:\n{dom}");
    }
    // The script ran: times are the reader's local time, with how long ago / until.
    assert!(dom.contains(" ago)"), "times were not made local:\n{dom}");
    assert!(
        dom.contains("(in "),
        "the next run is not shown as a time to come:\n{dom}"
    );
    // Nothing the engine holds as a secret reaches the page.
    assert!(!dom.contains(SECRET) && !dom.contains("admin-token"));
    // Diagnostics and errors wrap.
    assert!(dom.contains("pre.diag{white-space:pre-wrap;overflow-wrap:anywhere"));

    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    tokio::task::block_in_place(|| browse(&chrome, profile.path(), &[&arg], &url));
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    drop(e);
    tokio::time::sleep(Duration::from_millis(10)).await;
}
