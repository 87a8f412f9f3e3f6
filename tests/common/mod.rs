//! Test harness: the real engine binary as a child process, and a fake Slack/Port/webhook
//! server (axum) on 127.0.0.1 that records what it receives and answers from a script.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

pub mod pg;
pub mod slack;

/// One request the fake server received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Received {
    /// The body as JSON (also decodes a form body with a `payload` field or plain fields).
    pub fn json(&self) -> Value {
        if let Ok(v) = serde_json::from_slice(&self.body) {
            return v;
        }
        let mut m = serde_json::Map::new();
        for (k, v) in form_urlencoded::parse(&self.body) {
            m.insert(k.into_owned(), Value::String(v.into_owned()));
        }
        Value::Object(m)
    }
}

/// What the fake answers: status, headers, body.
pub type Answer = (u16, Vec<(String, String)>, String);
type Script = Arc<dyn Fn(&Received, usize) -> Answer + Send + Sync>;

/// A fake HTTP peer.
#[derive(Clone)]
pub struct Fake {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<Script>>,
}

async fn record(
    State(f): State<Fake>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = Received {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or("").to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: body.to_vec(),
        at: Instant::now(),
    };
    let n = {
        let mut rec = f.received.lock().unwrap();
        rec.push(r.clone());
        rec.iter().filter(|x| x.path == r.path).count()
    };
    let script = f.script.lock().unwrap().clone();
    let (status, hdrs, body) = script(&r, n);
    let mut resp = (StatusCode::from_u16(status).unwrap(), body).into_response();
    for (k, v) in hdrs {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    resp
}

impl Fake {
    /// Starts a fake answering with `script(request, nth request on this path)`.
    pub async fn start(
        script: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static,
    ) -> Fake {
        Self::start_on("127.0.0.1:0".parse().unwrap(), script).await
    }

    /// Starts on a given address (to bring a "down" peer back on the same port).
    pub async fn start_on(
        addr: SocketAddr,
        script: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static,
    ) -> Fake {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let fake = Fake {
            addr: listener.local_addr().unwrap(),
            received: Arc::new(Mutex::new(Vec::new())),
            script: Arc::new(Mutex::new(Arc::new(script))),
        };
        let app = axum::Router::new()
            .fallback(record)
            .with_state(fake.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        fake
    }

    /// Slack incoming webhooks: always `200 ok`.
    pub async fn slack_ok() -> Fake {
        Self::start(|_, _| (200, vec![], "ok".into())).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_script(&self, script: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static) {
        *self.script.lock().unwrap() = Arc::new(script);
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn on_path(&self, path: &str) -> Vec<Received> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Waits until `n` requests arrived on `path` (or panics after `secs`).
    pub async fn wait_for(&self, path: &str, n: usize, secs: u64) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.on_path(path);
            if got.len() >= n {
                return got;
            }
            if Instant::now() > deadline {
                panic!(
                    "expected {n} requests on {path} within {secs}s, got {}: {:?}",
                    got.len(),
                    self.requests().iter().map(|r| &r.path).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs a future to completion from sync code inside a multi-threaded test runtime (the
/// closures `eventually` polls).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// A free port on 127.0.0.1.
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The engine binary running `serve`.
pub struct Engine {
    pub addr: SocketAddr,
    pub child: Option<Child>,
    pub rules: PathBuf,
    pub data: PathBuf,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    pub out: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(repo("tests/fixtures").join(rel)).unwrap()
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

impl Engine {
    /// A temp workspace holding `rules/` (a copy of the repo's `rules/` plus the given files)
    /// and `data/`.
    pub fn workspace(
        extra: &[(&str, &str)],
        with_repo_rules: bool,
    ) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let rules = tmp.path().join("rules");
        if with_repo_rules {
            copy_dir(&repo("rules"), &rules);
            copy_dir(&repo("examples"), &tmp.path().join("examples"));
        } else {
            std::fs::create_dir_all(rules.join("templates")).unwrap();
        }
        for (name, text) in extra {
            let p = rules.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        (tmp, rules)
    }

    /// Starts the engine on `rules` with `env`, waiting until it is ready.
    pub async fn start(tmp: tempfile::TempDir, rules: PathBuf, env: &[(&str, &str)]) -> Engine {
        let data = tmp.path().join("data");
        let mut e = Engine {
            addr: free_addr(),
            child: None,
            rules,
            data,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: tmp.path().join("engine.log"),
            out: tmp.path().join("engine.out"),
            _tmp: Some(tmp),
        };
        e.spawn().await;
        e
    }

    /// (Re)starts the process on the same address and data directory.
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.out)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.arg("serve")
            .arg("--rules")
            .arg(&self.rules)
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--listen")
            .arg(self.addr.to_string())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SWITCHYARD_LOG", "info,switchyard=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(log));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start the engine"));
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client
                .get(format!("http://{}/readyz", self.addr))
                .send()
                .await
            {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("engine exited with {status}: {}", self.logs());
            }
            if Instant::now() > deadline {
                panic!("engine not ready: {}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        c.wait().ok()
    }

    /// Sends SIGHUP.
    pub fn hup(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg("-HUP")
                .arg(c.id().to_string())
                .status();
        }
    }

    /// POSTs a body signed as Port does, with a fresh timestamp (seconds).
    pub async fn post_port(&self, source: &str, secret: &str, body: &[u8]) -> (u16, Value) {
        let ts = chrono::Utc::now().timestamp().to_string();
        self.post_port_ts(source, secret, &ts, body).await
    }

    pub async fn post_port_ts(
        &self,
        source: &str,
        secret: &str,
        ts: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let sig = switchyard::sources::port::sign(secret, ts, body);
        self.post(
            &format!("/hooks/{source}"),
            body,
            &[
                ("content-type", "application/json"),
                ("x-port-timestamp", ts),
                ("x-port-signature", &sig),
            ],
        )
        .await
    }

    pub async fn post(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> (u16, Value) {
        let client = reqwest::Client::new();
        let mut req = client.post(self.url(path)).body(body.to_vec());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("engine reachable");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get_text(&self, path: &str) -> String {
        reqwest::get(self.url(path))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The page a browser gets (`Accept: text/html`).
    pub async fn get_html(&self, path: &str) -> String {
        reqwest::Client::new()
            .get(self.url(path))
            .header("accept", "text/html")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        reqwest::get(self.url(path))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A distinct Port changelog body per `seq` (so dedup does not merge them), for entity
/// `entity`: the bundled CPU-spike update with `seq` among its properties.
pub fn changelog(seq: usize, entity: &str) -> Vec<u8> {
    let mut v: Value =
        serde_json::from_slice(&fixture("port/changelog-update-cpu-spike.json")).unwrap();
    v["context"]["entity"] = serde_json::json!(entity);
    v["diff"]["after"]["identifier"] = serde_json::json!(entity);
    v["diff"]["after"]["properties"]["seq"] = serde_json::json!(seq);
    serde_json::to_vec(&v).unwrap()
}

/// Polls `f` until it returns `Some`, or panics after `secs`.
pub async fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Dead letters in a data directory.
pub fn dead_letters(data: &Path) -> Vec<switchyard::outbox::DeadLetter> {
    switchyard::outbox::list_dead(&data.join("switchyard.db"), &Default::default())
        .unwrap_or_default()
}

/// The rules most delivery tests use: a Port source, a Slack webhook destination `alerts` at
/// `url` with fast retries, and one rule that sends every entity update there. `extra` is YAML
/// appended under `destinations:` (more settings of `alerts`, or other destinations).
pub fn delivery_rules(url: &str, extra: &str) -> String {
    format!(
        r#"sources:
  port: {{ port: {{ client_secret: "${{PORT_CLIENT_SECRET}}" }} }}
destinations:
  alerts:
    slack_webhook: {{ url: "{url}" }}
    retry_initial: 50ms
    retry_max: 200ms
    rate_per_second: 100
{extra}
rules:
  - id: any-update
    on: port/entity.updated
    send:
      - to: alerts
        text: "{{{{entity.identifier}}}} cpu {{{{after.properties.cpuUtil}}}}"
"#
    )
}
