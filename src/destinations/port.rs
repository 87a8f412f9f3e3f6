//! `port`: Port's REST API (protocols.md §2). It reports action runs (PATCH status, post log
//! lines) and answers rules' `with:` queries (entity search, following `next` page by page).
//!
//! The access token is fetched with the client credentials once, cached, refreshed a minute
//! before it expires, and refreshed once more after a 401; concurrent requests wait for the
//! same refresh instead of each fetching a token.
//!
//! Jobs for this destination are operations, not messages: `{"op": "expand", ...}` runs a
//! rule's queries, renders its messages and returns them as follow-up jobs (committed with this
//! job's completion), posting a progress log line on the run; `{"op": "report", ...}` writes
//! the final run status and a log line.

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::{classify_transport, retry_after, BoxFut, DeliveryError, Destination, TemplatesHandle};
use crate::config::secret::Secret;
use crate::event::Event;
use crate::outbox::{Job, NewJob};
use crate::routing::{DispatchError, Query};

/// The most of one Port API answer that is read (an entity search page of 100 entities with
/// their properties and scorecards stays well under it).
const PORT_ANSWER_LIMIT: usize = 8 << 20;

/// A Port API client for a `port` destination, outside the delivery pipeline (e.g. to fetch
/// Kafka credentials); `None` for other kinds.
pub fn client_for(
    cfg: &crate::config::DestinationConfig,
    client: &reqwest::Client,
    rules: std::sync::Arc<TemplatesHandle>,
) -> Option<PortApi> {
    match &cfg.kind {
        crate::config::DestinationKind::Port {
            client_id,
            client_secret,
            base_url,
        } => Some(PortApi::new(
            client_id.clone(),
            client_secret.clone(),
            base_url,
            cfg.timeout,
            client,
            rules,
        )),
        _ => None,
    }
}

/// The Port API destination.
pub struct PortApi {
    pub(super) client: reqwest::Client,
    pub(super) base_url: String,
    pub(super) client_id: Secret,
    pub(super) client_secret: Secret,
    pub(super) timeout: Duration,
    pub(super) token: tokio::sync::Mutex<Option<(String, Instant)>>,
    pub(super) rules: std::sync::Arc<TemplatesHandle>,
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

/// The run a report goes to: the automation's own run for automation bodies, else the run.
pub fn report_run_id(ev: &Value) -> Option<String> {
    ev["automation_run"]["id"]
        .as_str()
        .or_else(|| ev["run"]["id"].as_str())
        .map(str::to_string)
}

impl PortApi {
    /// A client for `base_url` with the given credentials.
    pub fn new(
        client_id: Secret,
        client_secret: Secret,
        base_url: &str,
        timeout: Duration,
        client: &reqwest::Client,
        rules: std::sync::Arc<TemplatesHandle>,
    ) -> PortApi {
        PortApi {
            client: client.clone(),
            base_url: base_url.trim_end_matches('/').to_string(),
            client_id,
            client_secret,
            timeout,
            token: tokio::sync::Mutex::new(None),
            rules,
        }
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
        let super::Answer {
            status,
            headers,
            body,
            ..
        } = super::read_answer(resp, super::ANSWER_LIMIT).await?;
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
    async fn call(
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
            let a = super::read_answer(resp, PORT_ANSWER_LIMIT).await?;
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
    /// managed Kafka.
    pub async fn kafka_credentials(&self) -> Result<(Vec<String>, String, Secret), String> {
        let v = self
            .call(
                reqwest::Method::GET,
                "/v1/kafka-credentials",
                None,
                "kafka credentials",
            )
            .await
            .map_err(|e| e.reason().to_string())?;
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
            _ => Err("kafka credentials: the answer lacks brokers, username or password".into()),
        }
    }

    async fn log(&self, run_id: &str, message: &str) -> Result<(), DeliveryError> {
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

    /// Runs one query: the entity search, page after page until `next` is absent, bounded by
    /// `max_pages` and the query's timeout.
    async fn search(
        &self,
        q: &Query,
        ctx: &handlebars::Context,
    ) -> Result<Vec<Value>, DeliveryError> {
        let templates = self.rules.templates();
        let rules: Vec<Value> = q
            .rules
            .iter()
            .map(|r| render_strings(r, &|s| templates.render_inline(s, ctx)))
            .collect::<Result<_, _>>()
            .map_err(|e| DeliveryError::Permanent(format!("query `{}`: {e}", q.name)))?;
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

    async fn expand(&self, job: &Job) -> Result<Vec<NewJob>, DeliveryError> {
        let rs = &self.rules.0;
        let rule_id = job.message["rule"].as_str().unwrap_or("");
        let data = job.message["event"].clone();
        let rule = rs.rules.iter().find(|r| r.id == rule_id).ok_or_else(|| {
            DeliveryError::Permanent(format!("rule `{rule_id}` is no longer in the rules"))
        })?;
        let ctx = handlebars::Context::from(data.clone());
        let mut results = Map::new();
        for q in &rule.queries {
            let found = self.search(q, &ctx).await?;
            results.insert(q.name.clone(), Value::Array(found));
        }
        let ev = Event {
            event_type: data["type"].as_str().unwrap_or("").to_string(),
            id: job.event_id.clone(),
            source: data["source"].as_str().unwrap_or("").to_string(),
            data: data.clone(),
            secret: job.secret,
        };
        let dispatches =
            crate::routing::expand(rs, &ev, rule_id, results).map_err(DeliveryError::Permanent)?;
        let mut jobs = Vec::new();
        let mut lines = Vec::new();
        for d in dispatches {
            let where_to = d
                .target
                .channel
                .clone()
                .or(d.target.user_email.clone())
                .map(|t| format!(" {t}"))
                .unwrap_or_default();
            lines.push(format!("{} → {}{where_to}", d.rule, d.to));
            let error = match &d.message {
                Ok(_) => None,
                Err(DispatchError::Render(e)) | Err(DispatchError::Refused(e)) => Some(e.clone()),
            };
            jobs.push(NewJob {
                destination: d.destination.clone(),
                rule: d.rule.clone(),
                event_id: d.event_id.clone(),
                target: d.target.clone(),
                message: d.message.clone().unwrap_or(Value::Null),
                secret: d.secret,
                throttle: None,
                error,
            });
        }
        if let Some(run) = report_run_id(&data) {
            let msg = if lines.is_empty() {
                format!("rule {rule_id}: nothing to send")
            } else {
                format!("sending {} message(s): {}", lines.len(), lines.join(", "))
            };
            // Progress lines are informative; a failure to post one does not fail the work.
            if let Err(e) = self.log(&run, &msg).await {
                tracing::warn!(run = %run, reason = e.reason(), "could not post a progress log line");
            }
        }
        Ok(jobs)
    }

    async fn report(&self, job: &Job) -> Result<Vec<NewJob>, DeliveryError> {
        let m = &job.message;
        let run_id = m["run_id"]
            .as_str()
            .ok_or_else(|| DeliveryError::Permanent("report without a run id".into()))?;
        let status = m["status"].as_str().unwrap_or("FAILURE");
        let ctx = handlebars::Context::from(m["context"].clone());
        let templates = self.rules.templates();
        let mut patch = json!({"status": status});
        let fields: crate::routing::ReportFields =
            serde_json::from_value(m["fields"].clone()).unwrap_or_default();
        for (key, tpl) in [
            ("statusLabel", &fields.status_label),
            ("summary", &fields.summary),
            ("link", &fields.link),
        ] {
            if let Some(t) = tpl {
                match templates.render_plain(t, &ctx) {
                    Ok(v) if !v.trim().is_empty() => patch[key] = json!(v.trim()),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(run = %run_id, field = key, reason = %e.message, "report field did not render")
                    }
                }
            }
        }
        if patch.get("summary").is_none() {
            patch["summary"] = m["default_summary"].clone();
        }
        let line = m["log"].as_str().unwrap_or("").to_string();
        if !line.is_empty() {
            self.log(run_id, &line).await?;
        }
        let path = format!("/v1/actions/runs/{}", urlencode(run_id));
        self.call(reqwest::Method::PATCH, &path, Some(&patch), "run status")
            .await?;
        tracing::info!(run = %run_id, status, "reported the action run to Port");
        Ok(Vec::new())
    }
}

/// Renders every string leaf of a JSON value as a template.
fn render_strings(v: &Value, f: &dyn Fn(&str) -> Result<String, String>) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) if s.contains("{{") => Value::String(f(s)?),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| render_strings(x, f))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), render_strings(x, f)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Destination for PortApi {
    fn deliver<'a>(&'a self, job: &'a Job) -> BoxFut<'a, Result<Vec<NewJob>, DeliveryError>> {
        Box::pin(async move {
            match job.message["op"].as_str() {
                Some("expand") => self.expand(job).await,
                Some("report") => self.report(job).await,
                _ => Err(DeliveryError::Permanent(
                    "a `port` destination reports runs and answers `with:` queries; it does not take messages".into(),
                )),
            }
        })
    }
}
