//! The one envelope every source decodes into.
//!
//! Rules and templates only ever see this shape (as JSON), whatever transport or payload family
//! brought the event: Port's legacy changelog and its automation bodies produce the same fields,
//! so one rule serves both. The field table is in docs/rules.md ("The event envelope").

use serde_json::Value;

/// A decoded event.
#[derive(Debug, Clone)]
pub struct Event {
    /// The event type rules match with `on:`, e.g. `port/entity.updated`. The prefix is the
    /// source *kind* (`port`, `coder`, `slack`), not the configured source name.
    pub event_type: String,
    /// A stable id for deduplication (same upstream delivery → same id).
    pub id: String,
    /// The configured source name that received it.
    pub source: String,
    /// The envelope as JSON: what JSONPath conditions and templates read.
    pub data: Value,
    /// True when the whole event is a secret (Coder's One-Time Passcode): it may only go to
    /// the recipient's DM and never appears in logs or `simulate` output.
    pub secret: bool,
}

impl Event {
    /// Builds an event; `data` gets `source`, `type` and `id` set to match.
    pub fn new(source: &str, event_type: &str, id: String, mut data: Value, secret: bool) -> Event {
        if let Value::Object(m) = &mut data {
            m.insert("source".into(), Value::String(source.to_string()));
            m.insert("type".into(), Value::String(event_type.to_string()));
            m.insert("id".into(), Value::String(id.clone()));
        }
        Event {
            event_type: event_type.to_string(),
            id,
            source: source.to_string(),
            data,
            secret,
        }
    }
}

/// Every event type switchyard produces; `on:` must name one of these (or a `kind/*`/`*`
/// wildcard).
pub const EVENT_TYPES: &[&str] = &[
    "port/entity.created",
    "port/entity.updated",
    "port/entity.deleted",
    "port/timer.expired",
    "port/run.created",
    "port/run.updated",
    "coder/notification",
    "slack/block_actions",
];
