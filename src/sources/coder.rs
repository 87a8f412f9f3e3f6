//! Coder notification webhooks (protocols.md §3).
//!
//! Coder cannot sign requests and only a URL can be configured, so the endpoint is protected by
//! a token in the URL's last path segment (`/hooks/coder/<token>`) or, for proxies and tests,
//! `Authorization: Bearer <token>`; compared in constant time. Bodies are validated like the
//! Coder guide's bot: a missing `title`, `body`, `payload`, `payload.user_email` or
//! `payload.actions` is a 400 naming the field. `msg_id` is the dedup key.
//!
//! Coder's `body` text is exposed as `message` in the envelope, because `body` is the raw
//! request body in every envelope (the same for all sources).

use serde_json::{json, Value};

use super::{parse_json, secret_eq, Decoded, Rejection, Request, Source};
use crate::config::secret::Secret;
use crate::event::Event;

/// The One-Time Passcode template id: such notifications are secrets.
pub const OTP_TEMPLATE_ID: &str = "62f86a30-2330-4b61-a26d-311ff3b608cf";

/// A configured Coder source.
#[derive(Debug, Clone, Default)]
pub struct CoderSource {
    /// Accepted tokens (rotation).
    pub tokens: Vec<Secret>,
}

impl Source for CoderSource {
    fn kind(&self) -> &'static str {
        "coder"
    }

    fn takes_path_token(&self) -> bool {
        true
    }

    fn verify(&self, req: &Request, _now: i64) -> Result<Option<Vec<u8>>, Rejection> {
        let bearer = req
            .header("authorization")
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim);
        let presented = req.path_token.as_deref().or(bearer);
        let Some(presented) = presented else {
            return Err(Rejection::Unauthorized(
                "missing token: configure Coder's webhook URL as /hooks/<source>/<token>, or send Authorization: Bearer".into(),
            ));
        };
        if self.tokens.is_empty() {
            return Err(Rejection::Unauthorized(
                "this source has no token configured".into(),
            ));
        }
        let mut ok = false;
        for t in &self.tokens {
            ok |= secret_eq(t.expose().as_bytes(), presented.as_bytes());
        }
        if ok {
            Ok(None)
        } else {
            Err(Rejection::Unauthorized("wrong token".into()))
        }
    }

    fn decode(&self, name: &str, req: &Request) -> Result<Decoded, Rejection> {
        let body = parse_json(req.body)?;
        decode_value(name, body, req.header("x-message-id")).map(|e| Decoded::Event(Box::new(e)))
    }
}

fn missing(field: &str) -> Rejection {
    Rejection::BadRequest(format!("missing required field `{field}`"))
}

/// Decodes a Coder webhook body.
pub fn decode_value(
    name: &str,
    body: Value,
    header_msg_id: Option<&str>,
) -> Result<Event, Rejection> {
    if !body.is_object() {
        return Err(Rejection::BadRequest(
            "a Coder notification is a JSON object".into(),
        ));
    }
    for f in ["title", "body"] {
        if !body[f].is_string() {
            return Err(missing(f));
        }
    }
    let p = &body["payload"];
    if !p.is_object() {
        return Err(missing("payload"));
    }
    if !p["user_email"].is_string() {
        return Err(missing("payload.user_email"));
    }
    if !p["actions"].is_array() {
        return Err(missing("payload.actions"));
    }
    let msg_id = body["msg_id"]
        .as_str()
        .or(header_msg_id)
        .ok_or_else(|| missing("msg_id"))?
        .to_string();
    let template_id = p["notification_template_id"].clone();
    let secret = template_id.as_str() == Some(OTP_TEMPLATE_ID)
        || p["labels"].get("one_time_passcode").is_some()
        || p["notification_name"]
            .as_str()
            .is_some_and(|n| n.eq_ignore_ascii_case("One-Time Passcode"));
    let data = json!({
        "user": {
            "id": p["user_id"],
            "email": p["user_email"],
            "name": p["user_name"],
            "username": p["user_username"],
        },
        "title": body["title"],
        "message": body["body"],
        "title_markdown": body.get("title_markdown").cloned().unwrap_or_else(|| body["title"].clone()),
        "message_markdown": body.get("body_markdown").cloned().unwrap_or_else(|| body["body"].clone()),
        "actions": p["actions"],
        "labels": p.get("labels").cloned().unwrap_or_else(|| json!({})),
        "data": p.get("data").cloned().unwrap_or(Value::Null),
        "targets": p.get("targets").cloned().unwrap_or(Value::Null),
        "template": { "id": template_id, "name": p["notification_name"] },
        "body": body,
    });
    Ok(Event::new(
        name,
        "coder/notification",
        format!("coder:{msg_id}"),
        data,
        secret,
    ))
}
