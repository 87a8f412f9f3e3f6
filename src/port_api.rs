//! A client of Port's REST API (protocols.md §2), shared by the `port` destination (run
//! reports, `with:` queries) and the Kafka source (it fetches the managed Kafka's credentials).
//!
//! The access token is fetched with the client credentials once, cached, refreshed a minute
//! before it expires, and refreshed once more after a 401; concurrent requests wait for the
//! same refresh instead of each fetching a token. Answers are read up to 8 MiB; Port's 4xx are
//! permanent failures with Port's own message kept, 429 and 5xx transient.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config::secret::Secret;
use crate::config::{DestinationConfig, DestinationKind};
use crate::routing::Query;
use crate::upstream::{classify_transport, read_answer, retry_after, DeliveryError, ANSWER_LIMIT};

/// The most of one Port API answer that is read (an entity search page of 100 entities with
/// their properties and scorecards stays well under it).
const PORT_ANSWER_LIMIT: usize = 8 << 20;

/// The API client of a `port` destination; `None` for other kinds.
pub fn client_for(cfg: &DestinationConfig, client: &reqwest::Client) -> Option<PortApi> {
    match &cfg.kind {
        DestinationKind::Port {
            client_id,
            client_secret,
            base_url,
        } => Some(PortApi::new(
            client_id.clone(),
            client_secret.clone(),
            base_url,
            cfg.timeout,
            client,
        )),
        _ => None,
    }
}

/// A client of Port's REST API with its cached access token.
pub struct PortApi {
    client: reqwest::Client,
    base_url: String,
    client_id: Secret,
    client_secret: Secret,
    timeout: Duration,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

fn api_error(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &str,
    what: &str,
) -> DeliveryError {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let detail = match (v["error"].as_str(), v["message"].as_str()) {
        (Some(e), Some(m)) => format!("{e}: {m}"),
        (Some(e), None) => e.to_string(),
        _ => crate::render::blockkit::truncate_chars(body.trim(), 200),
    };
    let reason = format!("{what}: HTTP {} {detail}", status.as_u16());
    if status.as_u16() == 429 || status.is_server_error() {
        DeliveryError::Transient {
            reason,
            retry_after: retry_after(headers),
        }
    } else {
        DeliveryError::Permanent(reason)
    }
}

impl PortApi {
    /// A client for `base_url` with the given credentials.
    pub fn new(
        client_id: Secret,
        client_secret: Secret,
        base_url: &str,
        timeout: Duration,
        client: &reqwest::Client,
    ) -> PortApi {
        PortApi {
            client: client.clone(),
            base_url: base_url.trim_end_matches('/').to_string(),
            client_id,
            client_secret,
            timeout,
            token: tokio::sync::Mutex::new(None),
        }
    }

    /// The API's base URL (no trailing `/`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn token(&self, stale: Option<&str>) -> Result<String, DeliveryError> {
        let mut slot = self.token.lock().await;
        if let Some((t, exp)) = slot.as_ref() {
            let refresh_needed =
                Some(t.as_str()) == stale || *exp <= Instant::now() + Duration::from_secs(60);
            if !refresh_needed {
                return Ok(t.clone());
            }
        }
        let resp = self
            .client
            .post(format!("{}/v1/auth/access_token", self.base_url))
            .timeout(self.timeout)
            .json(&json!({"clientId": self.client_id.expose(), "clientSecret": self.client_secret.expose()}))
            .send()
            .await
            .map_err(|e| classify_transport(&e))?;
        let crate::upstream::Answer {
            status,
            headers,
            body,
            ..
        } = read_answer(resp, ANSWER_LIMIT).await?;
        if !status.is_success() {
            return Err(api_error(status, &headers, &body, "access token"));
        }
        let v: Value = serde_json::from_str(&body).map_err(|_| DeliveryError::Transient {
            reason: "access token: not JSON".into(),
            retry_after: None,
        })?;
        let token = v["accessToken"]
            .as_str()
            .ok_or_else(|| {
                DeliveryError::Permanent("access token: no accessToken in the answer".into())
            })?
            .to_string();
        let ttl = v["expiresIn"].as_u64().unwrap_or(10_800);
        *slot = Some((token.clone(), Instant::now() + Duration::from_secs(ttl)));
        tracing::debug!(ttl, "fetched a Port access token");
        Ok(token)
    }

    /// One API call with the cached token; on a 401 the token is refreshed once and the call
    /// repeated.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        what: &str,
    ) -> Result<Value, DeliveryError> {
        let mut token = self.token(None).await?;
        for attempt in 0..2 {
            let mut req = self
                .client
                .request(method.clone(), format!("{}{path}", self.base_url))
                .timeout(self.timeout)
                .bearer_auth(&token);
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(|e| classify_transport(&e))?;
            let status = resp.status();
            if let Some(trace) = resp
                .headers()
                .get("x-trace-id")
                .and_then(|v| v.to_str().ok())
            {
                tracing::debug!(
                    trace_id = trace,
                    what,
                    status = status.as_u16(),
                    "Port API call"
                );
            }
            let a = read_answer(resp, PORT_ANSWER_LIMIT).await?;
            if a.truncated {
                return Err(DeliveryError::Permanent(format!(
                    "{what}: Port's answer is over {} MiB",
                    PORT_ANSWER_LIMIT >> 20
                )));
            }
            let (headers, text) = (a.headers, a.body);
            if status.as_u16() == 401 && attempt == 0 {
                token = self.token(Some(&token)).await?;
                continue;
            }
            if !status.is_success() {
                return Err(api_error(status, &headers, &text, what));
            }
            return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
        }
        Err(DeliveryError::Permanent(format!(
            "{what}: still unauthorized after refreshing the token"
        )))
    }

    /// `GET /v1/kafka-credentials`: `(brokers, username, password)` of the organisation's
    /// managed Kafka. An answer without them is a permanent failure.
    pub async fn kafka_credentials(&self) -> Result<(Vec<String>, String, Secret), DeliveryError> {
        let v = self
            .call(
                reqwest::Method::GET,
                "/v1/kafka-credentials",
                None,
                "kafka credentials",
            )
            .await?;
        let c = &v["credentials"];
        let brokers: Vec<String> = c["brokers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| b.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        match (
            brokers.is_empty(),
            c["username"].as_str(),
            c["password"].as_str(),
        ) {
            (false, Some(u), Some(p)) => Ok((brokers, u.to_string(), Secret::new(p))),
            _ => Err(DeliveryError::Permanent(
                "kafka credentials: the answer lacks brokers, username or password".into(),
            )),
        }
    }

    /// Posts a line to a run's log.
    pub async fn log(&self, run_id: &str, message: &str) -> Result<(), DeliveryError> {
        let path = format!("/v1/actions/runs/{}/logs", urlencode(run_id));
        self.call(
            reqwest::Method::POST,
            &path,
            Some(&json!({"message": message})),
            "run log",
        )
        .await
        .map(|_| ())
    }

    /// Runs one query with its search `rules` (already rendered): the entity search, page
    /// after page until `next` is absent, bounded by `max_pages` and the query's timeout.
    pub async fn search(&self, q: &Query, rules: &[Value]) -> Result<Vec<Value>, DeliveryError> {
        let path = format!("/v1/blueprints/{}/entities/search", urlencode(&q.blueprint));
        let work = async {
            let mut entities = Vec::new();
            let mut from: Option<String> = None;
            for page in 0..q.max_pages {
                let mut body = json!({"query": {"combinator": q.combinator, "rules": rules}, "limit": q.limit});
                if !q.include.is_empty() {
                    body["include"] = json!(q.include);
                }
                if let Some(f) = &from {
                    body["from"] = json!(f);
                }
                let v = self
                    .call(
                        reqwest::Method::POST,
                        &path,
                        Some(&body),
                        &format!("query `{}`", q.name),
                    )
                    .await?;
                entities.extend(v["entities"].as_array().cloned().unwrap_or_default());
                match v["next"].as_str() {
                    Some(n) if !n.is_empty() => from = Some(n.to_string()),
                    _ => return Ok(entities),
                }
                if page + 1 == q.max_pages {
                    tracing::warn!(query = %q.name, pages = q.max_pages, "query stopped at max_pages; results are incomplete");
                }
            }
            Ok(entities)
        };
        tokio::time::timeout(q.timeout, work)
            .await
            .map_err(|_| DeliveryError::Transient {
                reason: format!(
                    "query `{}` took longer than {}s",
                    q.name,
                    q.timeout.as_secs()
                ),
                retry_after: None,
            })?
    }

    /// Writes a run's status (and summary, label, link): `PATCH /v1/actions/runs/{id}`.
    pub async fn patch_run(&self, run_id: &str, patch: &Value) -> Result<(), DeliveryError> {
        let path = format!("/v1/actions/runs/{}", urlencode(run_id));
        self.call(reqwest::Method::PATCH, &path, Some(patch), "run status")
            .await
            .map(|_| ())
    }
}

impl PortApi {
    /// Runs a self-service action: `POST /v1/actions/{action}/runs[?run_as=email]` with
    /// `{entity?, properties}`. Returns the run Port created (`{id, status, link?, ...}`).
    pub async fn run_action(
        &self,
        action: &str,
        entity: Option<&str>,
        properties: &Value,
        run_as: Option<&str>,
    ) -> Result<Value, DeliveryError> {
        let mut path = format!("/v1/actions/{}/runs", urlencode(action));
        if let Some(email) = run_as {
            path.push_str(&format!("?run_as={}", urlencode(email)));
        }
        let mut body = json!({"properties": properties});
        if let Some(e) = entity {
            body["entity"] = json!(e);
        }
        let v = self
            .call(
                reqwest::Method::POST,
                &path,
                Some(&body),
                &format!("run `{action}`"),
            )
            .await?;
        match v["run"]["id"].as_str() {
            Some(id) if !id.is_empty() => Ok(v["run"].clone()),
            _ => Err(DeliveryError::Permanent(format!(
                "run `{action}`: Port's answer has no run id"
            ))),
        }
    }

    /// Reads a run: `GET /v1/actions/runs/{id}` → the run.
    pub async fn get_run(&self, run_id: &str) -> Result<Value, DeliveryError> {
        let path = format!("/v1/actions/runs/{}", urlencode(run_id));
        let v = self
            .call(reqwest::Method::GET, &path, None, "read run")
            .await?;
        if v["run"].is_object() {
            Ok(v["run"].clone())
        } else {
            Err(DeliveryError::Transient {
                reason: format!("read run {run_id}: the answer has no `run`"),
                retry_after: None,
            })
        }
    }

    /// Updates an entity (`PATCH /v1/blueprints/{bp}/entities/{id}`), or creates or merges it
    /// (`POST /v1/blueprints/{bp}/entities?upsert=true&merge=true`).
    pub async fn change_entity(&self, c: &crate::job::EntityChange) -> Result<(), DeliveryError> {
        let bp = urlencode(&c.blueprint);
        let run = c
            .run_id
            .as_ref()
            .map(|r| format!("run_id={}", urlencode(r)));
        let (method, path, body) = if c.upsert {
            let mut body = c.body.clone();
            body["identifier"] = json!(c.identifier);
            let mut q = vec!["upsert=true".to_string(), "merge=true".to_string()];
            q.extend(run);
            (
                reqwest::Method::POST,
                format!("/v1/blueprints/{bp}/entities?{}", q.join("&")),
                body,
            )
        } else {
            let q = run.map(|r| format!("?{r}")).unwrap_or_default();
            (
                reqwest::Method::PATCH,
                format!(
                    "/v1/blueprints/{bp}/entities/{}{q}",
                    urlencode(&c.identifier)
                ),
                c.body.clone(),
            )
        };
        self.call(
            method,
            &path,
            Some(&body),
            &format!("entity {}/{}", c.blueprint, c.identifier),
        )
        .await
        .map(|_| ())
    }

    /// Reports a Workflow node run (`PATCH /v1/workflows/nodes/runs/{id}`) after posting its
    /// log line (`POST …/logs`), as Port's own agent does.
    pub async fn complete_node_run(
        &self,
        node_run: &str,
        success: bool,
        output: &Value,
        log: &str,
    ) -> Result<(), DeliveryError> {
        let base = format!("/v1/workflows/nodes/runs/{}", urlencode(node_run));
        let level = if success { "INFO" } else { "ERROR" };
        self.call(
            reqwest::Method::POST,
            &format!("{base}/logs"),
            Some(&json!({"logs": [{"level": level, "message": log}]})),
            "node run log",
        )
        .await?;
        self.call(
            reqwest::Method::PATCH,
            &base,
            Some(&json!({
                "status": "COMPLETED",
                "result": if success { "SUCCESS" } else { "FAILED" },
                "output": output,
            })),
            "node run status",
        )
        .await
        .map(|_| ())
    }
}

/// Percent-encodes a path segment.
pub fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
