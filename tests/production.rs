//! What a server deployment relies on: `--version` names the commit, completions and the man
//! page are generated, Prometheus-style probe paths answer, logs carry no terminal colours when
//! they go to a file, and a failure to start is one line.

mod common;

use std::process::{Command, Stdio};

use common::Engine;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
}

#[test]
fn version_names_the_commit_and_the_profile() {
    let out = bin().arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(v.starts_with("switchyard 0."), "{v}");
    assert!(v.contains("(commit ") && v.contains(", debug)"), "{v}");
}

#[test]
fn completions_and_the_man_page_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let out = bin().args(["completions", shell]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("switchyard") && text.contains("dead-letters"),
            "{shell}"
        );
    }
    let out = bin().arg("man").output().unwrap();
    assert!(out.status.success());
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(
        man.contains(".TH switchyard 1") && man.contains("check"),
        "{man}"
    );
}

#[tokio::test]
async fn probes_answer_and_logs_to_a_file_have_no_colours() {
    let (tmp, rules) = Engine::workspace(&[], true);
    let e = Engine::start(tmp, rules, &[("PORT_CLIENT_SECRET", "s3cret-value")]).await;
    let client = reqwest::Client::new();
    for path in ["/healthz", "/readyz", "/-/healthy", "/-/ready"] {
        let r = client.get(e.url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_follow.get(e.url("/")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(r.headers()["location"], "/status");
    let logs = e.logs();
    assert!(!logs.is_empty());
    assert!(
        !logs.contains('\u{1b}'),
        "ANSI escapes in a log file: {logs}"
    );
}

#[test]
fn a_failure_to_start_is_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let (tmp, rules) = Engine::workspace(&[], true);
    let out = bin()
        .arg("serve")
        .arg("--rules")
        .arg(&rules)
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .arg("--listen")
        .arg(addr.to_string())
        .env("PORT_CLIENT_SECRET", "s3cret-value")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let about: Vec<&str> = err
        .lines()
        .filter(|l| l.contains(&addr.port().to_string()) && l.to_lowercase().contains("error"))
        .collect();
    assert_eq!(about.len(), 1, "{err}");
}

#[tokio::test]
async fn metrics_are_described_and_present_from_start() {
    let (tmp, rules) = Engine::workspace(&[], true);
    let e = Engine::start(tmp, rules, &[("PORT_CLIENT_SECRET", "s3cret-value")]).await;
    let text = e.get_text("/metrics").await;
    for must in [
        "# HELP switchyard_events_total",
        "# TYPE switchyard_events_total counter",
        "# TYPE switchyard_build_info gauge",
        "switchyard_config_last_reload_successful 1",
        "switchyard_config_last_reload_success_timestamp_seconds ",
        "switchyard_reloads_total{outcome=\"error\"} 0",
        "switchyard_throttled_total 0",
        // Per destination, at zero before anything is queued.
        "switchyard_queue_depth{destination=\"console\"} 0",
        "switchyard_in_flight{destination=\"console\"} 0",
        // The process_* series Prometheus' own clients export.
        "# TYPE process_cpu_seconds_total counter",
        "# TYPE process_resident_memory_bytes gauge",
        "process_open_fds ",
        "process_max_fds ",
        "process_start_time_seconds ",
    ] {
        assert!(
            text.contains(must),
            "`{must}` missing from /metrics:\n{text}"
        );
    }
    let info = text
        .lines()
        .find(|l| l.starts_with("switchyard_build_info{"))
        .unwrap_or_default();
    assert!(
        info.contains("commit=\"") && info.contains("version=\"") && info.ends_with(" 1"),
        "{info}"
    );
    // Every series has HELP and TYPE.
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = l.split(['{', ' ']).next().unwrap_or_default();
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            text.contains(&format!("# HELP {base} ")) || text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
    }
    // And an independent parser (Prometheus' Python client) reads it, where installed.
    let py = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-py/bin/python");
    if py.is_file() {
        let mut child = std::process::Command::new(py)
            .arg("-c")
            .arg("import sys\nfrom prometheus_client.parser import text_string_to_metric_families as p\nn = len(list(p(sys.stdin.read())))\nprint(n)")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let n: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert!(n >= 10, "{n} families");
    } else {
        eprintln!("prometheus_client parse skipped: not installed (`.ci/run` installs it)");
    }
    // And Prometheus' own linter, where installed (Debian's `prometheus` package).
    if let Some(out) = pipe("promtool", &["check", "metrics"], &text) {
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "promtool check metrics: {said}");
        // Its advice on names (e.g. counters ending in _total) is printed even on success.
        assert!(said.trim().is_empty(), "promtool check metrics: {said}");
    } else {
        eprintln!("promtool check metrics skipped: not installed (`.ci/run` installs it)");
    }
}

/// Runs `tool args` with `input` on its stdin; `None` when the tool is not installed.
fn pipe(tool: &str, args: &[&str], input: &str) -> Option<std::process::Output> {
    let mut child = std::process::Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    use std::io::Write;
    child.stdin.take()?.write_all(input.as_bytes()).ok()?;
    child.wait_with_output().ok()
}
