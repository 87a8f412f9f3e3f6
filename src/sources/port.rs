//! Port webhooks: `X-Port-Signature` verification and the four body families
//! (protocols.md §1.1–1.3).
//!
//! Verification works on the raw bytes: HMAC-SHA256 over `<timestamp header text>.<body>`,
//! base64, `v1,` prefix, any of several space-separated entries, constant-time comparison,
//! timestamps in seconds or milliseconds within the tolerance. When the raw bytes do not verify,
//! the body with JSON whitespace outside strings removed is tried once more, because Port's
//! execution agent signs the compact JSON but sends it with spaces. The minify touches only
//! whitespace between tokens, so it lets nothing else through.
//!
//! Decoding recognises, in this order: (c) the legacy action-run envelope, (b) automation bodies
//! (`event` object), (a) the legacy changelog, (d) author-defined run bodies carrying only a run
//! id. Anything else is a 422 naming what was looked for. A `resourceType: blueprint` changelog
//! is a 422 too: there is no blueprint event type yet, and accepting it silently would hide that.

use base64::Engine;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{fresh, hmac_sha256, parse_json, Decoded, Rejection, Request, Source};
use crate::config::secret::Secret;
use crate::event::Event;
use crate::routing::path::JsonPathExpr;

/// A configured Port source.
#[derive(Debug, Clone)]
pub struct PortSource {
    /// Client secrets; any may sign (rotation).
    pub secrets: Vec<Secret>,
    /// Accept unsigned requests (explicit opt-in, warned about by `check`).
    pub insecure_no_signature: bool,
    /// Allowed clock difference, seconds.
    pub tolerance: i64,
    /// Extra place to find a run id in author-defined bodies.
    pub run_id_path: Option<JsonPathExpr>,
    /// Action identifier assumed for author-defined run bodies.
    pub action: Option<String>,
    /// Port's web app, for the entity links in envelopes (`entity.url`).
    pub app_url: String,
}

/// Port's web app in the EU region (the API's default region too).
pub const DEFAULT_APP_URL: &str = "https://app.port.io";

impl Default for PortSource {
    fn default() -> Self {
        PortSource {
            secrets: Vec::new(),
            insecure_no_signature: false,
            tolerance: 300,
            run_id_path: None,
            action: None,
            app_url: DEFAULT_APP_URL.to_string(),
        }
    }
}

/// Removes JSON whitespace outside strings, byte by byte (no parsing, no reordering).
pub fn minify_json_whitespace(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let (mut in_str, mut escaped) = (false, false);
    for &b in body {
        if in_str {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
        } else {
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => {}
                b'"' => {
                    in_str = true;
                    out.push(b);
                }
                _ => out.push(b),
            }
        }
    }
    out
}

/// The header value for a body: `v1,<base64 HMAC>` (used by `switchyard sign` and tests).
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mac = hmac_sha256(secret.as_bytes(), &[timestamp.as_bytes(), b".", body]);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac)
    )
}

impl PortSource {
    fn matches(&self, ts: &str, body: &[u8], candidates: &[Vec<u8>]) -> bool {
        let mut ok = false;
        for s in &self.secrets {
            let mac = hmac_sha256(s.expose().as_bytes(), &[ts.as_bytes(), b".", body]);
            for c in candidates {
                // Compare every candidate in constant time; no early exit on a match.
                ok |= bool::from(c.as_slice().ct_eq(&mac[..]));
            }
        }
        ok
    }
}

impl Source for PortSource {
    fn kind(&self) -> &'static str {
        "port"
    }

    fn verify(&self, req: &Request, now: i64) -> Result<Option<Vec<u8>>, Rejection> {
        if self.insecure_no_signature {
            return Ok(None);
        }
        let ts = req
            .header("x-port-timestamp")
            .ok_or_else(|| Rejection::Unauthorized("missing X-Port-Timestamp header".into()))?;
        let sig = req
            .header("x-port-signature")
            .ok_or_else(|| Rejection::Unauthorized("missing X-Port-Signature header".into()))?;
        fresh(ts, now, self.tolerance)?;
        let candidates: Vec<Vec<u8>> = sig
            .split_ascii_whitespace()
            .filter_map(|e| e.strip_prefix("v1,"))
            .filter_map(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .collect();
        if candidates.is_empty() {
            return Err(Rejection::Unauthorized(
                "X-Port-Signature has no `v1,<base64>` entry".into(),
            ));
        }
        if self.secrets.is_empty() {
            return Err(Rejection::Unauthorized(
                "this source has no client secret configured".into(),
            ));
        }
        if self.matches(ts, req.body, &candidates) {
            return Ok(None);
        }
        let compact = minify_json_whitespace(req.body);
        if compact.len() != req.body.len() && self.matches(ts, &compact, &candidates) {
            // Whitespace is not signed: every spacing of these bytes verifies, so they, not
            // the body as sent, identify the event.
            return Ok(Some(compact));
        }
        Err(Rejection::Unauthorized(
            "signature does not match the body (wrong client secret, or the body was changed)"
                .into(),
        ))
    }

    fn decode(&self, name: &str, req: &Request) -> Result<Decoded, Rejection> {
        let body = parse_json(req.body)?;
        let mut d = decode_value(self, name, body, req)?;
        if let Decoded::Event(ev) = &mut d {
            link_entity(&mut ev.data, &self.app_url);
        }
        Ok(d)
    }
}

/// Gives the envelope's entity its page in Port's web app (`{app}/{blueprint}Entity?identifier=…`,
/// the form Port's own tools link with), unless the entity already has a `url`.
fn link_entity(data: &mut Value, app_url: &str) {
    let Some(Value::Object(e)) = data.get_mut("entity") else {
        return;
    };
    if e.contains_key("url") {
        return;
    }
    let (Some(id), Some(bp)) = (
        e.get("identifier").and_then(Value::as_str),
        e.get("blueprint").and_then(Value::as_str),
    ) else {
        return;
    };
    let app = app_url.trim_end_matches('/');
    let mut url = String::with_capacity(app.len() + bp.len() + id.len() + 20);
    url.push_str(app);
    url.push('/');
    url.extend(form_urlencoded::byte_serialize(bp.as_bytes()));
    url.push_str("Entity?identifier=");
    url.extend(form_urlencoded::byte_serialize(id.as_bytes()));
    e.insert("url".into(), Value::String(url));
}

fn s(v: &Value) -> Option<&str> {
    v.as_str()
}

/// `{email, name, first_name, last_name, id}` from a Port user object.
fn user_of(u: &Value) -> Value {
    if !u.is_object() {
        return Value::Null;
    }
    let first = u["firstName"].as_str().unwrap_or("");
    let last = u["lastName"].as_str().unwrap_or("");
    let name = format!("{first} {last}").trim().to_string();
    json!({
        "email": u["email"],
        "name": if name.is_empty() { u["email"].clone() } else { Value::String(name) },
        "first_name": u["firstName"],
        "last_name": u["lastName"],
        "id": u["id"],
    })
}

/// The entity summary: the full object from `after` or `before` when present, otherwise
/// `{identifier}`, always with `identifier`, `title` and `blueprint`.
fn entity_of(
    identifier: Option<&str>,
    blueprint: Option<&str>,
    before: &Value,
    after: &Value,
) -> Value {
    let mut e = match (after, before) {
        (Value::Object(m), _) | (_, Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    if !e.contains_key("identifier") {
        e.insert(
            "identifier".into(),
            identifier.map(Value::from).unwrap_or(Value::Null),
        );
    }
    if !e.contains_key("title") || e["title"].is_null() {
        let t = e["identifier"].clone();
        e.insert("title".into(), t);
    }
    if !e.contains_key("blueprint") {
        e.insert(
            "blueprint".into(),
            blueprint.map(Value::from).unwrap_or(Value::Null),
        );
    }
    if e["identifier"].is_null() && identifier.is_none() {
        return Value::Null;
    }
    Value::Object(e)
}

fn body_hash(raw: &[u8]) -> String {
    hex::encode(Sha256::digest(raw))
}

/// The envelope's fields in their documented order; `body` is a placeholder that
/// [`with_body`] fills at the end by moving the parsed body in (decoding copies only the parts
/// it lifts out, never the whole body).
fn envelope(family: &str) -> Map<String, Value> {
    // Room for every key it ends with (these, `body`, and the three `Event::new` adds), so the
    // map is never grown and rehashed on the way.
    let mut m = Map::with_capacity(20);
    for k in [
        "blueprint",
        "entity",
        "before",
        "after",
        "run",
        "action",
        "trigger",
        "user",
        "properties",
        "property",
    ] {
        m.insert(k.into(), Value::Null);
    }
    m.insert("family".into(), Value::String(family.into()));
    m.insert("body".into(), Value::Null);
    m
}

/// A `port/run.created` event for a run we are the backend of (legacy or author-defined body).
fn run_created(name: &str, run_id: &str, m: Map<String, Value>, body: Value) -> Decoded {
    let id = format!("port:run:{run_id}");
    Decoded::Event(Box::new(Event::new(
        name,
        "port/run.created",
        id,
        with_body(m, body),
        false,
    )))
}

/// The finished envelope: `m` with the original body moved into its `body` field.
fn with_body(mut m: Map<String, Value>, body: Value) -> Value {
    m.insert("body".into(), body);
    Value::Object(m)
}

fn unknown_shape() -> Rejection {
    Rejection::Unprocessable(
        "unknown Port body: looked for an action run (`resourceType: run`, `status: TRIGGERED`, `payload`), \
         an automation body (`event` object with `resourceType`), a changelog (`action`, `resourceType`, `context`), \
         or a run id (`port_context.runId`, `runId`, `context.runId` or header `RUN_ID`)"
            .into(),
    )
}

fn decode_value(
    src: &PortSource,
    name: &str,
    body: Value,
    req: &Request,
) -> Result<Decoded, Rejection> {
    let Value::Object(top) = &body else {
        return Err(Rejection::Unprocessable(
            "a Port body is a JSON object".into(),
        ));
    };
    // (c) legacy action-run envelope
    if top.get("resourceType").and_then(s) == Some("run")
        && top.get("status").and_then(s) == Some("TRIGGERED")
        && top.get("payload").is_some_and(Value::is_object)
    {
        let run_id = body["context"]["runId"]
            .as_str()
            .ok_or_else(|| {
                Rejection::Unprocessable("action run envelope without `context.runId`".into())
            })?
            .to_string();
        let payload = &body["payload"];
        let blueprint = body["context"]["blueprint"].as_str();
        let mut m = envelope("run");
        m.insert(
            "blueprint".into(),
            blueprint.map(Value::from).unwrap_or(Value::Null),
        );
        m.insert(
            "entity".into(),
            entity_of(
                body["context"]["entity"].as_str(),
                blueprint,
                &Value::Null,
                &payload["entity"],
            ),
        );
        let mut action = payload["action"].clone();
        if action.is_null() {
            action = json!({"identifier": body["action"]});
        }
        m.insert("action".into(), action);
        m.insert("properties".into(), payload["properties"].clone());
        m.insert("trigger".into(), body["trigger"].clone());
        m.insert("user".into(), user_of(&body["trigger"]["by"]["user"]));
        m.insert("run".into(), json!({"id": run_id, "status": "IN_PROGRESS"}));
        return Ok(run_created(name, &run_id, m, body));
    }
    // (b) automation body
    if let Some(ev) = top.get("event") {
        match ev {
            Value::Object(e) if e.get("resourceType").is_some() => {
                return decode_automation(name, body, req).map(|e| Decoded::Event(Box::new(e)));
            }
            Value::String(_) => {
                return Err(Rejection::Unprocessable(
                    "`event` arrived as a string: in the automation body write exactly \"{{ .event }}\" with no text around it, so Port sends the object"
                        .into(),
                ))
            }
            _ => {}
        }
    }
    // (a) legacy changelog
    let action = top.get("action").and_then(s);
    if matches!(
        action,
        Some("CREATE" | "UPDATE" | "DELETE" | "TIMER_EXPIRED")
    ) && top.get("resourceType").is_some()
        && top.get("context").is_some_and(Value::is_object)
    {
        return decode_changelog(name, body, req.signed_body())
            .map(|e| Decoded::Event(Box::new(e)));
    }
    // (d) author-defined run body
    // A Workflow's webhook node (node run `wfnr_…`) is reported like an action run, on the
    // Workflows endpoints (`crate::destinations::port`).
    let run_id = body["port_context"]["nodeRunId"]
        .as_str()
        .or_else(|| body["nodeRunId"].as_str())
        .or_else(|| body["port_context"]["runId"].as_str())
        .or_else(|| body["runId"].as_str())
        .or_else(|| body["context"]["runId"].as_str())
        .map(str::to_string)
        .or_else(|| req.header("run_id").map(str::to_string))
        .or_else(|| body["headers"]["RUN_ID"].as_str().map(str::to_string))
        .or_else(|| {
            src.run_id_path
                .as_ref()
                .and_then(|p| p.first(&body))
                .and_then(|v| v.as_str().map(str::to_string))
        });
    if let Some(run_id) = run_id {
        let mut inputs = top.clone();
        for k in ["port_context", "runId", "nodeRunId", "context", "headers"] {
            inputs.remove(k);
        }
        let mut m = envelope("custom");
        let kind = if run_id.starts_with("wfnr_") {
            "workflow_node"
        } else {
            "action"
        };
        m.insert(
            "run".into(),
            json!({"id": run_id, "status": "IN_PROGRESS", "kind": kind}),
        );
        m.insert("properties".into(), Value::Object(inputs));
        if let Some(a) = &src.action {
            m.insert("action".into(), json!({"identifier": a}));
        }
        if let Some(e) = body["port_context"]["entity"].as_str() {
            m.insert("entity".into(), json!({"identifier": e, "title": e}));
        }
        return Ok(run_created(name, &run_id, m, body));
    }
    Err(unknown_shape())
}

fn decode_automation(name: &str, body: Value, req: &Request) -> Result<Event, Rejection> {
    let ev = &body["event"];
    let rt = ev["resourceType"].as_str().unwrap_or("");
    let action = ev["action"].as_str().unwrap_or("");
    let diff = &ev["diff"];
    let (before, after) = (diff["before"].clone(), diff["after"].clone());
    let mut m = envelope("automation");
    m.insert("trigger".into(), body["trigger"].clone());
    m.insert("user".into(), user_of(&body["trigger"]["by"]["user"]));
    m.insert("automation_run".into(), body["run"].clone());
    let event_type = match rt {
        "entity" => {
            let bp = ev["context"]["blueprintIdentifier"]
                .as_str()
                .or_else(|| after["blueprint"].as_str())
                .or_else(|| before["blueprint"].as_str());
            let ent = ev["context"]["entityIdentifier"]
                .as_str()
                .or_else(|| after["identifier"].as_str())
                .or_else(|| before["identifier"].as_str());
            let prop = ev["context"]["propertyIdentifier"].as_str();
            m.insert(
                "blueprint".into(),
                bp.map(Value::from).unwrap_or(Value::Null),
            );
            m.insert("entity".into(), entity_of(ent, bp, &before, &after));
            m.insert("before".into(), before.clone());
            m.insert("after".into(), after.clone());
            if prop.is_some() || action == "TIMER_EXPIRED" {
                m.insert(
                    "property".into(),
                    prop.map(Value::from).unwrap_or(Value::Null),
                );
                "port/timer.expired"
            } else {
                match action {
                    "CREATE" => "port/entity.created",
                    "UPDATE" => "port/entity.updated",
                    "DELETE" => "port/entity.deleted",
                    other => {
                        return Err(Rejection::Unprocessable(format!(
                            "automation entity event with unknown `event.action` `{other}` (expected CREATE, UPDATE or DELETE)"
                        )))
                    }
                }
            }
        }
        "run" => {
            let run = if after.is_null() {
                before.clone()
            } else {
                after.clone()
            };
            let bp = run["blueprint"]["identifier"].as_str().map(str::to_string);
            m.insert(
                "blueprint".into(),
                bp.map(Value::from).unwrap_or(Value::Null),
            );
            m.insert("entity".into(), run["entity"].clone());
            let def = &ev["context"]["action"];
            m.insert(
                "action".into(),
                if def.is_object() {
                    def.clone()
                } else {
                    run["action"].clone()
                },
            );
            m.insert("properties".into(), run["properties"].clone());
            m.insert("before".into(), before.clone());
            m.insert("after".into(), after.clone());
            m.insert("run".into(), run);
            match action {
                "CREATE" => "port/run.created",
                "UPDATE" => "port/run.updated",
                other => {
                    return Err(Rejection::Unprocessable(format!(
                        "automation run event with unknown `event.action` `{other}` (expected CREATE or UPDATE)"
                    )))
                }
            }
        }
        other => {
            return Err(Rejection::Unprocessable(format!(
            "automation event with `resourceType` `{other}`; switchyard handles `entity` and `run`"
        )))
        }
    };
    let id = if let Some(r) = body["run"]["id"].as_str() {
        format!("port:automation-run:{r}")
    } else if let Some(e) = ev["id"].as_str() {
        format!("port:event:{e}")
    } else {
        format!("port:sha256:{}", body_hash(req.signed_body()))
    };
    Ok(Event::new(name, event_type, id, with_body(m, body), false))
}

fn decode_changelog(name: &str, body: Value, raw: &[u8]) -> Result<Event, Rejection> {
    let action = body["action"].as_str().unwrap_or("");
    let rt = body["resourceType"].as_str().unwrap_or("");
    let ctx = &body["context"];
    let (before, after) = (
        body["diff"]["before"].clone(),
        body["diff"]["after"].clone(),
    );
    let mut m = envelope("changelog");
    m.insert("trigger".into(), body["trigger"].clone());
    m.insert("user".into(), user_of(&body["trigger"]["by"]["user"]));
    let bp = ctx["blueprint"].as_str();
    m.insert(
        "blueprint".into(),
        bp.map(Value::from).unwrap_or(Value::Null),
    );
    let (event_type, id) = match (rt, action) {
        ("entity", _) => {
            if ctx["entity"].as_str().is_none() && after["identifier"].is_null() && before["identifier"].is_null() {
                return Err(Rejection::Unprocessable("changelog without `context.entity`".into()));
            }
            m.insert("entity".into(), entity_of(ctx["entity"].as_str(), bp, &before, &after));
            m.insert("before".into(), before);
            m.insert("after".into(), after);
            let t = match action {
                "CREATE" => "port/entity.created",
                "UPDATE" => "port/entity.updated",
                "DELETE" => "port/entity.deleted",
                _ => "port/timer.expired",
            };
            (t, format!("port:sha256:{}", body_hash(raw)))
        }
        ("run", "CREATE" | "UPDATE") => {
            let run = if after.is_null() { before.clone() } else { after.clone() };
            let run_id = ctx["runId"].as_str().or_else(|| run["id"].as_str()).unwrap_or("").to_string();
            if run_id.is_empty() {
                return Err(Rejection::Unprocessable("run changelog without `context.runId`".into()));
            }
            m.insert("entity".into(), run["entity"].clone());
            m.insert("action".into(), run["action"].clone());
            m.insert("properties".into(), run["properties"].clone());
            m.insert("before".into(), before);
            m.insert("after".into(), after);
            let status = run["status"].as_str().unwrap_or("").to_string();
            m.insert("run".into(), run);
            let t = if action == "CREATE" { "port/run.created" } else { "port/run.updated" };
            (t, format!("port:run:{run_id}:{status}"))
        }
        ("blueprint", _) => {
            return Err(Rejection::Unprocessable(
                "blueprint changelogs are not routed (no event type for them); remove the blueprint's changelog destination or ignore this".into(),
            ))
        }
        (other, a) => {
            return Err(Rejection::Unprocessable(format!(
                "changelog with `resourceType` `{other}` and `action` `{a}` is not a known combination"
            )))
        }
    };
    Ok(Event::new(name, event_type, id, with_body(m, body), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minify_keeps_strings() {
        let b = br#"{"port_context": {"runId": "r_agent01"}, "note": "a, b: c", "n": [1, 2], "q": "x\" y"}"#;
        assert_eq!(
            minify_json_whitespace(b),
            br#"{"port_context":{"runId":"r_agent01"},"note":"a, b: c","n":[1,2],"q":"x\" y"}"#
                .to_vec()
        );
    }

    #[test]
    fn worked_example_3() {
        assert_eq!(
            sign("port-fixture-secret", "1790000000", br#"{"hello":"port"}"#),
            "v1,J1Ja4Wj+YlYCp7BZYLInLX8+O6OYj8Ivk6y67YalT84="
        );
    }
}
