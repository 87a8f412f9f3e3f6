//! Slack interactivity requests (protocols.md §5).
//!
//! Verification is `v0=` + hex HMAC-SHA256 of `v0:<timestamp>:<raw body>` with the app's
//! signing secret, 5-minute window, before the form is decoded. `ssl_check=1` posts carry no
//! signature: they are acknowledged and nothing is routed.

use serde_json::{json, Value};

use super::{fresh, hmac_sha256, Decoded, Rejection, Request, Source};
use crate::config::secret::Secret;
use crate::event::Event;

/// A configured Slack interactivity source.
#[derive(Debug, Clone, Default)]
pub struct SlackSource {
    /// Signing secrets (rotation).
    pub secrets: Vec<Secret>,
}

fn form_field(body: &[u8], name: &str) -> Option<String> {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn is_ssl_check(body: &[u8]) -> bool {
    form_field(body, "ssl_check").as_deref() == Some("1") && form_field(body, "payload").is_none()
}

/// The `X-Slack-Signature` value for a body (for tests and `switchyard sign`).
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    format!(
        "v0={}",
        hex::encode(hmac_sha256(
            secret.as_bytes(),
            &[b"v0:", timestamp.as_bytes(), b":", body]
        ))
    )
}

impl Source for SlackSource {
    fn kind(&self) -> &'static str {
        "slack"
    }

    fn content_types(&self) -> &'static [&'static str] {
        &["application/x-www-form-urlencoded"]
    }

    fn verify(&self, req: &Request, now: i64) -> Result<Option<Vec<u8>>, Rejection> {
        if is_ssl_check(req.body) {
            return Ok(None);
        }
        let ts = req.header("x-slack-request-timestamp").ok_or_else(|| {
            Rejection::Unauthorized("missing X-Slack-Request-Timestamp header".into())
        })?;
        let sig = req
            .header("x-slack-signature")
            .ok_or_else(|| Rejection::Unauthorized("missing X-Slack-Signature header".into()))?;
        fresh(ts, now, 300)?;
        let given = sig
            .strip_prefix("v0=")
            .and_then(|h| hex::decode(h).ok())
            .ok_or_else(|| Rejection::Unauthorized("X-Slack-Signature is not `v0=<hex>`".into()))?;
        let mut ok = false;
        for s in &self.secrets {
            let mac = hmac_sha256(
                s.expose().as_bytes(),
                &[b"v0:", ts.as_bytes(), b":", req.body],
            );
            ok |= bool::from(subtle::ConstantTimeEq::ct_eq(&mac[..], given.as_slice()));
        }
        if ok {
            Ok(None)
        } else {
            Err(Rejection::Unauthorized(
                "signature does not match the body".into(),
            ))
        }
    }

    fn decode(&self, name: &str, req: &Request) -> Result<Decoded, Rejection> {
        if is_ssl_check(req.body) {
            return Ok(Decoded::Ack);
        }
        let payload = form_field(req.body, "payload")
            .ok_or_else(|| Rejection::BadRequest("form body without a `payload` field".into()))?;
        let p: Value = serde_json::from_str(&payload)
            .map_err(|e| Rejection::BadRequest(format!("`payload` is not valid JSON: {e}")))?;
        decode_payload(name, p).map(|e| Decoded::Event(Box::new(e)))
    }
}

/// Decodes an interaction payload into `slack/<type>`.
pub fn decode_payload(name: &str, mut p: Value) -> Result<Event, Rejection> {
    // The deprecated verification token is a credential; it is not kept in the envelope.
    if let Some(m) = p.as_object_mut() {
        m.remove("token");
    }
    let kind = p["type"]
        .as_str()
        .ok_or_else(|| Rejection::Unprocessable("interaction payload without `type`".into()))?
        .to_string();
    let first = p["actions"].get(0).cloned().unwrap_or(Value::Null);
    let channel = if p["channel"].is_object() {
        p["channel"].clone()
    } else {
        json!({"id": p["container"]["channel_id"]})
    };
    let message_ts = p["container"]["message_ts"].clone();
    let action_ts = first["action_ts"].as_str().unwrap_or("").to_string();
    let user_id = p["user"]["id"].as_str().unwrap_or("").to_string();
    let data = json!({
        "user": p["user"],
        "team": p["team"],
        "channel": channel,
        "message": { "ts": message_ts, "text": p["message"]["text"] },
        "action": {
            "action_id": first["action_id"],
            "block_id": first["block_id"],
            "value": first["value"],
            "url": first["url"],
            "text": first["text"]["text"],
            "type": first["type"],
        },
        "actions": p["actions"],
        "response_url": p["response_url"],
        "trigger_id": p["trigger_id"],
        "body": p,
    });
    let id = format!(
        "slack:{kind}:{user_id}:{action_ts}:{}",
        data["action"]["action_id"].as_str().unwrap_or("")
    );
    Ok(Event::new(name, &format!("slack/{kind}"), id, data, false))
}
