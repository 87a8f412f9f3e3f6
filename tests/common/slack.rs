//! A fake Slack Web API that keeps its messages: `chat.postMessage` posts (in a thread with
//! `thread_ts`, which must be a top-level message's), `chat.update` edits (only a message it
//! posted), `users.lookupByEmail` finds `U_<local part>`, `users.info` of `UANA` gives
//! `ana@example.com`, and `/response/…` keeps what is posted to a click's `response_url`. Channel names (`#platform`) become ids
//! (`C_PLATFORM`), a DM to a user id opens `D_<id>`. Errors are Slack's: `message_not_found`,
//! `channel_not_found`, `thread_not_found`; `fail_next(method, error)` makes the next call of a
//! method fail with any other (`ratelimited` answers HTTP 429 with `Retry-After: 1`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::{Fake, Received};

/// One message as Slack holds it.
#[derive(Debug, Clone)]
pub struct Message {
    pub channel: String,
    pub ts: String,
    /// The parent's `ts` for a thread reply.
    pub thread_ts: Option<String>,
    pub reply_broadcast: bool,
    pub text: String,
    pub blocks: Value,
    /// How many times `chat.update` changed it.
    pub edits: usize,
    pub deleted: bool,
}

#[derive(Default)]
struct State {
    messages: Vec<Message>,
    next_ts: u64,
    fail: VecDeque<(String, String)>,
    /// Answers posted to click `response_url`s (`/response/…`).
    responses: Vec<Value>,
}

/// The fake Slack.
#[derive(Clone)]
pub struct FakeSlack {
    pub fake: Fake,
    state: Arc<Mutex<State>>,
}

fn channel_id(c: &str) -> String {
    if let Some(name) = c.strip_prefix('#') {
        format!("C_{}", name.to_ascii_uppercase())
    } else if c.starts_with('U') {
        format!("D_{c}")
    } else {
        c.to_string()
    }
}

fn ok(v: Value) -> (u16, Vec<(String, String)>, String) {
    let mut v = v;
    v["ok"] = json!(true);
    (200, vec![], v.to_string())
}

fn err(e: &str) -> (u16, Vec<(String, String)>, String) {
    if e == "ratelimited" {
        return (
            429,
            vec![("retry-after".into(), "1".into())],
            json!({"ok": false, "error": "ratelimited"}).to_string(),
        );
    }
    (200, vec![], json!({"ok": false, "error": e}).to_string())
}

impl FakeSlack {
    pub async fn start() -> FakeSlack {
        let state: Arc<Mutex<State>> = Arc::default();
        let s = state.clone();
        let fake = Fake::start(move |r: &Received, _| answer(&s, r)).await;
        FakeSlack { fake, state }
    }

    /// The `api_url` of a `slack` destination.
    pub fn api_url(&self) -> String {
        self.fake.url("/api/")
    }

    /// Every message, in the order they were posted.
    pub fn messages(&self) -> Vec<Message> {
        self.state.lock().unwrap().messages.clone()
    }

    /// Top-level messages (not thread replies) of `channel` (an id such as `C_PLATFORM`).
    pub fn top_level(&self, channel: &str) -> Vec<Message> {
        self.messages()
            .into_iter()
            .filter(|m| m.channel == channel && m.thread_ts.is_none())
            .collect()
    }

    /// The replies in the thread of `ts`.
    pub fn replies(&self, ts: &str) -> Vec<Message> {
        self.messages()
            .into_iter()
            .filter(|m| m.thread_ts.as_deref() == Some(ts))
            .collect()
    }

    /// Deletes a message, as a person in Slack could.
    pub fn delete(&self, ts: &str) {
        for m in self.state.lock().unwrap().messages.iter_mut() {
            if m.ts == ts {
                m.deleted = true;
            }
        }
    }

    /// The next call of `method` (e.g. `chat.update`) fails with `error`.
    pub fn fail_next(&self, method: &str, error: &str) {
        self.state
            .lock()
            .unwrap()
            .fail
            .push_back((method.to_string(), error.to_string()));
    }

    /// A click's `response_url` on this fake.
    pub fn response_url(&self, n: u32) -> String {
        self.fake.url(&format!("/response/{n}"))
    }

    /// The answers posted to `response_url`s, in order.
    pub fn responses(&self) -> Vec<Value> {
        self.state.lock().unwrap().responses.clone()
    }

    /// Calls of `method` so far.
    pub fn calls(&self, method: &str) -> usize {
        self.fake.on_path(&format!("/api/{method}")).len()
    }
}

/// A query parameter of a request, as sent (empty when absent).
fn query_param(r: &Received, name: &str) -> String {
    r.query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or("")
        .to_string()
}

/// The `block_actions` payload of a click by `user` on the button `action_id` of `m` (as this
/// fake holds it); `n` makes the click distinct (its `action_ts`), as a second click is.
pub fn click_payload(
    m: &Message,
    action_id: &str,
    user: &str,
    n: u32,
    response_url: &str,
) -> Value {
    let (block_id, mut action) = m
        .blocks
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["type"] == "actions")
        .find_map(|b| {
            let el = b["elements"]
                .as_array()?
                .iter()
                .find(|el| el["action_id"] == action_id)?;
            Some((b["block_id"].clone(), el.clone()))
        })
        .unwrap_or_else(|| panic!("no {action_id} on {m:?}"));
    action["action_ts"] = json!(format!("1790000100.{n:06}"));
    action["block_id"] = block_id;
    json!({
        "type": "block_actions",
        "user": {"id": user, "username": user.to_lowercase()},
        "team": {"id": "T1"},
        "container": {"type": "message", "channel_id": m.channel, "message_ts": m.ts},
        "channel": {"id": m.channel},
        "message": {"ts": m.ts, "text": m.text, "blocks": m.blocks},
        "actions": [action],
        "trigger_id": format!("trigger-{n}"),
        "response_url": response_url,
    })
}

/// Posts an interaction `payload` (a click) to the engine's `/hooks/slack` as Slack does: a form
/// body signed with `signing_secret`, timestamped now. Returns the HTTP status.
pub async fn post_interaction(e: &super::Engine, signing_secret: &str, payload: &Value) -> u16 {
    let form = format!(
        "payload={}",
        form_urlencoded::byte_serialize(payload.to_string().as_bytes()).collect::<String>()
    );
    let ts = chrono::Utc::now().timestamp().to_string();
    let sig = switchyard::sources::slack::sign(signing_secret, &ts, form.as_bytes());
    let (status, _) = e
        .post(
            "/hooks/slack",
            form.as_bytes(),
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("x-slack-request-timestamp", &ts),
                ("x-slack-signature", &sig),
            ],
        )
        .await;
    status
}

fn answer(state: &Mutex<State>, r: &Received) -> (u16, Vec<(String, String)>, String) {
    let method = r.path.trim_start_matches("/api/").to_string();
    let mut st = state.lock().unwrap();
    if r.path.starts_with("/response/") {
        st.responses.push(r.json());
        return (200, vec![], "ok".into());
    }
    if let Some(i) = st.fail.iter().position(|(m, _)| *m == method) {
        let (_, e) = st.fail.remove(i).unwrap();
        return err(&e);
    }
    let body = r.json();
    match method.as_str() {
        "users.lookupByEmail" => {
            let email = query_param(r, "email").replace("%40", "@");
            let local = email.split('@').next().unwrap_or("").to_ascii_uppercase();
            ok(json!({"user": {"id": format!("U_{local}")}}))
        }
        // `UANA` is ana@example.com; `UNOMAIL` has no email (the scope is missing).
        "users.info" => {
            let id = query_param(r, "user");
            if id == "UNOMAIL" {
                return ok(json!({"user": {"id": id, "profile": {}}}));
            }
            let local = id.trim_start_matches('U').to_ascii_lowercase();
            ok(json!({"user": {"id": id, "profile": {"email": format!("{local}@example.com")}}}))
        }
        "chat.postMessage" => {
            let channel = channel_id(body["channel"].as_str().unwrap_or(""));
            if channel.is_empty() || channel.contains("MISSING") {
                return err("channel_not_found");
            }
            let thread_ts = body["thread_ts"].as_str().map(str::to_string);
            if let Some(t) = &thread_ts {
                let parent_ok = st.messages.iter().any(|m| {
                    m.ts == *t && m.channel == channel && m.thread_ts.is_none() && !m.deleted
                });
                if !parent_ok {
                    return err("thread_not_found");
                }
            }
            st.next_ts += 1;
            let ts = format!("1790000000.{:06}", st.next_ts);
            st.messages.push(Message {
                channel: channel.clone(),
                ts: ts.clone(),
                thread_ts,
                reply_broadcast: body["reply_broadcast"] == true,
                text: body["text"].as_str().unwrap_or("").to_string(),
                blocks: body["blocks"].clone(),
                edits: 0,
                deleted: false,
            });
            ok(json!({"channel": channel, "ts": ts, "message": {"text": body["text"]}}))
        }
        "chat.update" => {
            let channel = body["channel"].as_str().unwrap_or("").to_string();
            let ts = body["ts"].as_str().unwrap_or("").to_string();
            let Some(m) = st
                .messages
                .iter_mut()
                .find(|m| m.ts == ts && m.channel == channel && !m.deleted)
            else {
                return err("message_not_found");
            };
            m.text = body["text"].as_str().unwrap_or("").to_string();
            m.blocks = body["blocks"].clone();
            m.edits += 1;
            ok(json!({"channel": channel, "ts": ts}))
        }
        _ => err("unknown_method"),
    }
}
