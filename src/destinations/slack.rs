//! `slack`: the Slack Web API with a bot token (protocols.md §4.2).
//!
//! A `user_email` target is resolved with `users.lookupByEmail` and cached, hits for an hour
//! and misses (`users_not_found`) for five minutes; concurrent deliveries for the same email
//! wait on one lookup, so a burst of notifications for one user makes one call. Then
//! `chat.postMessage` to the user id opens the app's DM. Web API failures arrive as HTTP 200
//! with `{"ok": false, "error": …}` and are classified like HTTP failures.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{classify_transport, prepare_message, retry_after, BoxFut, DeliveryError, Destination};
use crate::config::secret::Secret;
use crate::outbox::Job;
use crate::routing::Router;

/// Web API errors that retrying cannot fix.
pub(super) const PERMANENT: &[&str] = &[
    "channel_not_found",
    "not_in_channel",
    "is_archived",
    "users_not_found",
    "user_not_found",
    "msg_too_long",
    "no_text",
    "invalid_blocks",
    "invalid_blocks_format",
    "msg_blocks_too_long",
    "too_many_attachments",
    "messages_tab_disabled",
    "ekm_access_denied",
    "not_authed",
    "invalid_auth",
    "account_inactive",
    "token_revoked",
    "missing_scope",
    "invalid_arguments",
    "channel_is_archived",
];

/// Web API errors worth retrying.
const TRANSIENT: &[&str] = &[
    "ratelimited",
    "rate_limited",
    "internal_error",
    "fatal_error",
    "request_timeout",
    "service_unavailable",
];

#[derive(Clone)]
struct CacheEntry {
    user: Result<String, String>,
    until: Instant,
}

/// The Slack bot destination.
pub struct SlackBot {
    token: Secret,
    api_url: String,
    client: reqwest::Client,
    timeout: Duration,
    cache: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<CacheEntry>>>>>,
}

impl SlackBot {
    /// A bot destination calling `api_url` (ending in `/`).
    pub fn new(token: Secret, api_url: String, client: reqwest::Client, timeout: Duration) -> Self {
        SlackBot {
            token,
            api_url,
            client,
            timeout,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn web_api_result(
        status: reqwest::StatusCode,
        headers: &reqwest::header::HeaderMap,
        body: &str,
    ) -> Result<Value, DeliveryError> {
        if status.as_u16() == 429 {
            return Err(DeliveryError::Transient {
                reason: "ratelimited (HTTP 429)".into(),
                retry_after: Some(retry_after(headers).unwrap_or(Duration::from_secs(1))),
            });
        }
        if status.is_server_error() {
            return Err(DeliveryError::Transient {
                reason: format!("HTTP {}", status.as_u16()),
                retry_after: retry_after(headers),
            });
        }
        let v: Value = serde_json::from_str(body).map_err(|_| {
            let reason = format!(
                "HTTP {}: not a Web API answer: {}",
                status.as_u16(),
                crate::render::blockkit::truncate_chars(body, 200)
            );
            if status.is_success() {
                DeliveryError::Transient {
                    reason,
                    retry_after: None,
                }
            } else {
                DeliveryError::Permanent(reason)
            }
        })?;
        if v["ok"] == true {
            return Ok(v);
        }
        let err = v["error"].as_str().unwrap_or("unknown_error").to_string();
        let detail = v["response_metadata"]["messages"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .filter(|s| !s.is_empty())
            .map(|s| format!(" ({s})"))
            .unwrap_or_default();
        let reason = format!("{err}{detail}");
        if TRANSIENT.contains(&err.as_str()) {
            Err(DeliveryError::Transient {
                reason,
                retry_after: retry_after(headers),
            })
        } else if PERMANENT.contains(&err.as_str())
            || err.starts_with("restricted_action")
            || !status.is_success()
        {
            Err(DeliveryError::Permanent(reason))
        } else {
            // An error code we do not know: treat as permanent rather than hammering Slack.
            Err(DeliveryError::Permanent(reason))
        }
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> Result<Value, DeliveryError> {
        let resp = req
            .bearer_auth(self.token.expose())
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| classify_transport(&e))?;
        let a = super::read_answer(resp, super::ANSWER_LIMIT).await?;
        Self::web_api_result(a.status, &a.headers, &a.body)
    }

    async fn user_id(&self, email: &str) -> Result<String, DeliveryError> {
        let key = email.to_ascii_lowercase();
        let slot = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() > 10_000 {
                cache.retain(|_, v| Arc::strong_count(v) > 1);
            }
            cache.entry(key.clone()).or_default().clone()
        };
        let mut entry = slot.lock().await;
        if let Some(e) = entry.as_ref().filter(|e| e.until > Instant::now()) {
            return e.user.clone().map_err(DeliveryError::Permanent);
        }
        let req = self
            .client
            .get(format!("{}users.lookupByEmail", self.api_url))
            .query(&[("email", email)]);
        match self.call(req).await {
            Ok(v) => {
                let id = v["user"]["id"].as_str().unwrap_or("").to_string();
                if id.is_empty() {
                    return Err(DeliveryError::Transient {
                        reason: "users.lookupByEmail answered without a user id".into(),
                        retry_after: None,
                    });
                }
                *entry = Some(CacheEntry {
                    user: Ok(id.clone()),
                    until: Instant::now() + Duration::from_secs(3600),
                });
                Ok(id)
            }
            Err(DeliveryError::Permanent(reason)) => {
                let reason = format!("users.lookupByEmail: {reason}");
                if reason.contains("users_not_found") || reason.contains("user_not_found") {
                    *entry = Some(CacheEntry {
                        user: Err(reason.clone()),
                        until: Instant::now() + Duration::from_secs(300),
                    });
                }
                Err(DeliveryError::Permanent(reason))
            }
            Err(e) => Err(e),
        }
    }
}

impl Destination for SlackBot {
    fn deliver<'a>(
        &'a self,
        job: &'a Job,
        _rules: &'a Router,
    ) -> BoxFut<'a, Result<Vec<crate::outbox::NewJob>, DeliveryError>> {
        Box::pin(async move {
            let channel = match (&job.target.channel, &job.target.user_email) {
                (Some(c), _) => c.clone(),
                (None, Some(email)) => self.user_id(email).await?,
                (None, None) => {
                    return Err(DeliveryError::Permanent(
                        "no channel or user_email for a Slack bot message".into(),
                    ))
                }
            };
            // The bot adds `channel`, so it always works on its own copy.
            let mut msg = prepare_message(job)?.into_owned();
            if let Some(obj) = msg.as_object_mut() {
                obj.insert("channel".into(), json!(channel));
            }
            let req = self
                .client
                .post(format!("{}chat.postMessage", self.api_url))
                .json(&msg);
            self.call(req)
                .await
                .map(|_| Vec::new())
                .map_err(|e| match e {
                    DeliveryError::Permanent(r) => {
                        DeliveryError::Permanent(format!("chat.postMessage: {r}"))
                    }
                    DeliveryError::Transient {
                        reason,
                        retry_after,
                    } => DeliveryError::Transient {
                        reason: format!("chat.postMessage: {reason}"),
                        retry_after,
                    },
                })
        })
    }

    fn paced_per_target(&self) -> bool {
        true
    }

    fn pace_key(&self, job: &Job) -> Option<String> {
        job.target.channel.clone().or_else(|| {
            job.target
                .user_email
                .as_ref()
                .map(|e| format!("dm:{}", e.to_ascii_lowercase()))
        })
    }
}
