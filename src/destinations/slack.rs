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
use crate::job::KeyStep;
use crate::outbox::{Job, KeyEffect, KeyState};
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

    /// A cached lookup of a person (`key`: a lowercased email, or `id:<user id>`): a hit is kept
    /// an hour, a permanent miss that `keep_miss` accepts five minutes, anything else not at all.
    /// Callers of the same key wait on one lookup. Past 10,000 entries, those nobody waits on
    /// are dropped.
    async fn cached(
        &self,
        key: String,
        keep_miss: impl Fn(&str) -> bool,
        fetch: impl std::future::Future<Output = Result<String, DeliveryError>>,
    ) -> Result<String, DeliveryError> {
        let slot = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() > 10_000 {
                cache.retain(|_, v| Arc::strong_count(v) > 1);
            }
            cache.entry(key).or_default().clone()
        };
        let mut entry = slot.lock().await;
        if let Some(e) = entry.as_ref().filter(|e| e.until > Instant::now()) {
            return e.user.clone().map_err(DeliveryError::Permanent);
        }
        let found = fetch.await;
        let keep = match &found {
            Ok(v) => Some((Ok(v.clone()), 3600)),
            Err(DeliveryError::Permanent(r)) if keep_miss(r) => Some((Err(r.clone()), 300)),
            Err(_) => None,
        };
        if let Some((user, secs)) = keep {
            *entry = Some(CacheEntry {
                user,
                until: Instant::now() + Duration::from_secs(secs),
            });
        }
        found
    }

    /// The user id of the person with `email` (`users.lookupByEmail`); only "no such user" is
    /// remembered as a miss.
    async fn user_id(&self, email: &str) -> Result<String, DeliveryError> {
        let fetch = async {
            let req = self
                .client
                .get(format!("{}users.lookupByEmail", self.api_url))
                .query(&[("email", email)]);
            // Permanent failures name the method; transient ones keep Slack's reason as it is.
            let v = self.call(req).await.map_err(|e| match e {
                DeliveryError::Permanent(r) => {
                    DeliveryError::Permanent(format!("users.lookupByEmail: {r}"))
                }
                e => e,
            })?;
            match v["user"]["id"].as_str() {
                Some(id) if !id.is_empty() => Ok(id.to_string()),
                _ => Err(DeliveryError::Transient {
                    reason: "users.lookupByEmail answered without a user id".into(),
                    retry_after: None,
                }),
            }
        };
        let not_found = |r: &str| r.contains("users_not_found") || r.contains("user_not_found");
        self.cached(email.to_ascii_lowercase(), not_found, fetch)
            .await
    }
}

/// Names the Web API method in an error.
fn in_method(method: &str, e: DeliveryError) -> DeliveryError {
    match e {
        DeliveryError::Permanent(r) => DeliveryError::Permanent(format!("{method}: {r}")),
        DeliveryError::Transient {
            reason,
            retry_after,
        } => DeliveryError::Transient {
            reason: format!("{method}: {reason}"),
            retry_after,
        },
    }
}

/// `chat.update` / threaded-reply errors that mean the key's message cannot be used any more
/// (deleted, not the app's, too old to edit, its channel gone): the keyed send posts anew.
const MESSAGE_GONE: &[&str] = &[
    "message_not_found",
    "cant_update_message",
    "edit_window_closed",
    "thread_not_found",
    "channel_not_found",
    "is_archived",
    "not_in_channel",
];

fn message_gone(e: &DeliveryError) -> bool {
    let DeliveryError::Permanent(r) = e else {
        return false;
    };
    // `chat.update: message_not_found (detail)`: the code follows the method.
    let code = r.split_once(": ").map_or(r.as_str(), |(_, c)| c);
    let code = code.split([' ', '(']).next().unwrap_or_default();
    MESSAGE_GONE.contains(&code)
}

impl SlackBot {
    /// The channel a job goes to: its channel, or the DM of its `user_email`.
    async fn channel_of(&self, job: &Job) -> Result<String, DeliveryError> {
        match (&job.target.channel, &job.target.user_email) {
            (Some(c), _) => Ok(c.clone()),
            (None, Some(email)) => self.user_id(email).await,
            (None, None) => Err(DeliveryError::Permanent(
                "no channel or user_email for a Slack bot message".into(),
            )),
        }
    }

    /// `chat.postMessage` of the job's message to `channel` (in `thread_ts`'s thread when
    /// given); returns the channel id and `ts` Slack answered.
    async fn post(
        &self,
        job: &Job,
        channel: &str,
        thread_ts: Option<&str>,
    ) -> Result<(String, String), DeliveryError> {
        // The bot adds `channel`, so it always works on its own copy.
        let mut msg = prepare_message(job)?.into_owned();
        if let Some(obj) = msg.as_object_mut() {
            obj.insert("channel".into(), json!(channel));
            if let Some(ts) = thread_ts {
                obj.insert("thread_ts".into(), json!(ts));
                if job.target.reply_broadcast {
                    obj.insert("reply_broadcast".into(), json!(true));
                }
            }
        }
        let req = self
            .client
            .post(format!("{}chat.postMessage", self.api_url))
            .json(&msg);
        let v = self
            .call(req)
            .await
            .map_err(|e| in_method("chat.postMessage", e))?;
        Ok((
            v["channel"].as_str().unwrap_or(channel).to_string(),
            v["ts"].as_str().unwrap_or_default().to_string(),
        ))
    }

    /// `chat.update` of the message at (`channel`, `ts`) with the job's message.
    async fn update(&self, job: &Job, channel: &str, ts: &str) -> Result<(), DeliveryError> {
        let mut msg = prepare_message(job)?.into_owned();
        if let Some(obj) = msg.as_object_mut() {
            obj.insert("channel".into(), json!(channel));
            obj.insert("ts".into(), json!(ts));
            // Without blocks in the update, Slack keeps the old ones under the new text.
            obj.entry("blocks").or_insert_with(|| json!([]));
        }
        let req = self
            .client
            .post(format!("{}chat.update", self.api_url))
            .json(&msg);
        self.call(req)
            .await
            .map(|_| ())
            .map_err(|e| in_method("chat.update", e))
    }
}

impl SlackBot {
    /// Whether `url` is a `response_url` this bot may post to: Slack's own
    /// (`https://hooks.slack.com/…`), or on the host of the configured Web API (a proxy, a test
    /// double). Anything else is refused, so a click cannot make the engine post elsewhere.
    fn response_url_ok(&self, url: &str) -> bool {
        let Ok(u) = reqwest::Url::parse(url) else {
            return false;
        };
        let slack = u.scheme() == "https" && u.host_str() == Some("hooks.slack.com");
        let ours = reqwest::Url::parse(&self.api_url).is_ok_and(|api| {
            api.scheme() == u.scheme()
                && api.host_str() == u.host_str()
                && api.port_or_known_default() == u.port_or_known_default()
        });
        slack || ours
    }

    /// Answers a click through its `response_url` (no token: the URL is the credential). Slack
    /// answers `ok` as text, or JSON; `expired_url`/`used_url` (404) are permanent.
    async fn respond(&self, job: &Job, url: &str) -> Result<(), DeliveryError> {
        if !self.response_url_ok(url) {
            return Err(DeliveryError::Permanent(
                "the click's response_url is not on hooks.slack.com nor the configured Slack API host"
                    .into(),
            ));
        }
        let msg = prepare_message(job)?;
        let resp = self
            .client
            .post(url)
            .timeout(self.timeout)
            .json(msg.as_ref())
            .send()
            .await
            .map_err(|e| classify_transport(&e))?;
        let a = super::read_answer(resp, super::ANSWER_LIMIT).await?;
        if a.status.is_success() {
            let v: Value = serde_json::from_str(&a.body).unwrap_or(Value::Null);
            if v["ok"] == false {
                return Err(DeliveryError::Permanent(format!(
                    "response_url: {}",
                    v["error"].as_str().unwrap_or("not ok")
                )));
            }
            return Ok(());
        }
        super::classify_status(a.status, &a.headers, &a.body)
            .map_err(|e| in_method("response_url", e))
    }

    /// The email of the user with `id` (`users.info`, scope `users:read.email`), cached like
    /// `users.lookupByEmail` answers; every permanent miss (no email: the scope is missing) is
    /// remembered.
    async fn email(&self, id: &str) -> Result<String, DeliveryError> {
        let fetch = async {
            let req = self
                .client
                .get(format!("{}users.info", self.api_url))
                .query(&[("user", id)]);
            let v = self
                .call(req)
                .await
                .map_err(|e| in_method("users.info", e))?;
            match v["user"]["profile"]["email"].as_str() {
                Some(e) if !e.is_empty() => Ok(e.to_string()),
                _ => Err(DeliveryError::Permanent(
                    "users.info: no email in the profile (the bot needs `users:read.email`)".into(),
                )),
            }
        };
        self.cached(format!("id:{id}"), |_| true, fetch).await
    }
}

impl Destination for SlackBot {
    fn deliver<'a>(
        &'a self,
        job: &'a Job,
        _rules: &'a Router,
    ) -> BoxFut<'a, Result<Vec<crate::outbox::NewJob>, DeliveryError>> {
        Box::pin(async move {
            if let Some(url) = &job.target.response_url {
                return self.respond(job, url).await.map(|_| Vec::new());
            }
            let channel = self.channel_of(job).await?;
            self.post(job, &channel, job.target.thread_ts.as_deref())
                .await
                .map(|_| Vec::new())
        })
    }

    fn deliver_keyed<'a>(
        &'a self,
        job: &'a Job,
        current: Option<&'a KeyState>,
    ) -> BoxFut<'a, Result<Option<KeyEffect>, DeliveryError>> {
        Box::pin(async move {
            let Some(id) = &job.target.identity else {
                return Err(DeliveryError::Permanent(
                    "a keyed delivery without a key".into(),
                ));
            };
            let ttl_ms = i64::try_from(id.ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
            let closes = id.action.closes();
            // What to do when there is no message to act on: post one, and make it the key's
            // message unless this send closes the key anyway.
            let fresh = |(channel, ts): (String, String)| {
                if closes {
                    KeyEffect::Close
                } else {
                    KeyEffect::Open {
                        channel,
                        ts,
                        ttl_ms,
                    }
                }
            };
            let step = id.action.step(current.is_some());
            // A keyed send with a thread of its own (the notes of a run started from a click)
            // replies there, and the key then names the thread's parent message.
            let own_thread = job.target.thread_ts.as_deref();
            let post_fresh = || async move {
                let channel = self.channel_of(job).await?;
                let (channel, ts) = self.post(job, &channel, own_thread).await?;
                Ok::<_, DeliveryError>(Some(fresh((
                    channel,
                    own_thread.map_or(ts, str::to_string),
                ))))
            };
            let (Some(cur), false) = (current, step == KeyStep::Post) else {
                return post_fresh().await;
            };
            let done = match step {
                KeyStep::Update => self.update(job, &cur.channel, &cur.ts).await,
                _ => self
                    .post(job, &cur.channel, Some(&cur.ts))
                    .await
                    .map(|_| ()),
            };
            match done {
                Ok(()) if closes => Ok(Some(KeyEffect::Close)),
                Ok(()) => Ok(Some(KeyEffect::Touch { ttl_ms })),
                Err(e) if message_gone(&e) => {
                    tracing::info!(key = %id.key, reason = %e.reason(), "the key's message cannot be used any more; posting a new one");
                    post_fresh().await
                }
                Err(e) => Err(e),
            }
        })
    }

    fn user_id_of<'a>(&'a self, email: &'a str) -> BoxFut<'a, Result<String, String>> {
        Box::pin(async move {
            self.user_id(email)
                .await
                .map_err(|e| e.reason().to_string())
        })
    }

    fn email_of<'a>(&'a self, user: &'a str) -> BoxFut<'a, Result<String, DeliveryError>> {
        Box::pin(self.email(user))
    }

    fn paced_per_target(&self) -> bool {
        true
    }

    fn pace_key(&self, job: &Job) -> Option<String> {
        if job.target.response_url.is_some() {
            // An answer to a click is not a channel message: Slack does not pace it per channel.
            return None;
        }
        job.target.channel.clone().or_else(|| {
            job.target
                .user_email
                .as_ref()
                .map(|e| format!("dm:{}", e.to_ascii_lowercase()))
        })
    }
}
