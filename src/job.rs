//! The job protocol: what routing hands the outbox, and the outbox hands delivery.
//!
//! A job is one unit of delivery work for one destination. Most jobs carry a rendered message;
//! two kinds carry an operation for the `port` destination instead: running a rule's `with:`
//! queries ([`Expand`]) and reporting an action run ([`RunReport`]). [`Payload`] says which,
//! in the type, so no stage guesses from the shape of a JSON object.
//!
//! Storage keeps a payload as a kind (`message`, `expand`, `report`) and a JSON text: the
//! message itself, sent byte for byte as stored, or the operation with an `"op"` tag. Rows
//! written before the kind existed are read by [`Payload::from_stored`] (see its notes).

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where, within a destination, a message goes (Slack bot destinations use it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub channel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user_email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub thread_ts: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub reply_broadcast: bool,
    /// Kafka destinations: the record key.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key: Option<String>,
    /// A keyed message (Slack bot destinations): which message this send acts on, and how.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub identity: Option<Identity>,
    /// Held until this time (unix ms): sent outside its rule's or destination's window.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hold_until: Option<i64>,
    /// Slack bot destinations: answer a click through its `response_url` (an ephemeral
    /// message to the clicker) instead of posting to a channel.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub response_url: Option<String>,
}

/// A message's identity: the key that names it, and what this send does to the message the key
/// names now. The engine remembers, durably, which Slack message (channel, `ts`) a key last
/// posted; jobs with the same key are delivered in the order they were accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The rendered key (e.g. `health:payments-api`), unique per destination.
    pub key: String,
    /// What to do.
    #[serde(rename = "as")]
    pub action: KeyAction,
    /// How long an opened key is remembered after its last use, in seconds.
    pub ttl_secs: u64,
}

/// What a keyed send does. Every action posts a new message (and opens the key, except the
/// closing ones) when the key names no message, or the message it named is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyAction {
    /// Post a new message and make it the key's message.
    Post,
    /// Replace the key's message (`chat.update`).
    Update,
    /// Reply in the key's message's thread.
    Reply,
    /// Replace the key's message, then close the key: the next match starts a new message.
    Resolve,
    /// Reply in the key's message's thread, then close the key (the reply of a `resolve`).
    ReplyClose,
}

impl KeyAction {
    /// Whether a successful send closes the key.
    pub fn closes(self) -> bool {
        matches!(self, KeyAction::Resolve | KeyAction::ReplyClose)
    }

    /// What the send does in Slack, given whether its key names a message now: the one rule
    /// the Slack bot delivers by, and that `check`'s scenarios and `simulate --state` predict by.
    pub fn step(self, open: bool) -> KeyStep {
        match (self, open) {
            (KeyAction::Post, _) | (_, false) => KeyStep::Post,
            (KeyAction::Update | KeyAction::Resolve, true) => KeyStep::Update,
            (KeyAction::Reply | KeyAction::ReplyClose, true) => KeyStep::Reply,
        }
    }
}

/// A keyed send's Slack call: a new message, an edit of the key's message, or a reply in its
/// thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStep {
    Post,
    Update,
    Reply,
}

/// Template names of the run fields a report writes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportFields {
    pub status_label: Option<String>,
    pub summary: Option<String>,
    pub link: Option<String>,
}

/// How the jobs of a tracked event fared, as storage counts them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub delivered: i64,
    pub failed: i64,
    /// The first errors (at most 20).
    #[serde(default)]
    pub errors: Vec<String>,
}

/// What a run's report renders: the rule's `report:` templates and the event they read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportSpec {
    /// The rule that reports (`no-rule-matched` when none handled the run).
    pub rule: String,
    #[serde(default)]
    pub success: ReportFields,
    #[serde(default)]
    pub failure: ReportFields,
    /// The event envelope the templates render over.
    pub context: Value,
}

/// A `with:` rule's deferred work: run its queries for this event, then render its sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Expand {
    pub rule: String,
    /// The event envelope.
    pub event: Value,
}

/// One match of a grouped rule, waiting in its group for the digest (`group:` on the rule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupItem {
    pub rule: String,
    /// The rendered `group.by` (e.g. the team), naming the group within the rule.
    pub group: String,
    /// The event envelope: one of the digest's `items`.
    pub event: Value,
}

/// An operation on Port's API decided by a rule (`run:` or `entity:` on a send step to a
/// `port` destination), rendered over the event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortAct {
    /// What to do.
    #[serde(flatten)]
    pub op: PortOp,
    /// The Slack click that asked for it, when a click did.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub click: Option<ClickRef>,
    /// The Slack bot destination that tells the clicker and the message's thread how it went.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub notify: Option<String>,
}

/// The Port call of a [`PortAct`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortOp {
    /// Run a self-service action (`POST /v1/actions/{action}/runs`).
    Run(RunAction),
    /// Create or update an entity (`PATCH`/`POST /v1/blueprints/{bp}/entities`).
    Entity(EntityChange),
}

/// A self-service action run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunAction {
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub entity: Option<String>,
    /// The action's inputs.
    #[serde(default)]
    pub properties: Value,
    /// Whom Port runs it as.
    pub run_as: RunAs,
    /// Slack user ids or emails who may start it from a click (empty: whomever Port lets).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub allow: Vec<String>,
    /// Follow the run until it ends, telling the thread.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub follow: Option<FollowSpec>,
}

/// Whom Port runs an action as (`run_as`, protocols.md §7.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunAs {
    /// The person who clicked, by their Slack email: Port applies that user's permissions.
    Clicker,
    /// The machine whose credentials the destination holds.
    Engine,
    /// This email.
    Email(String),
}

/// How a started run is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowSpec {
    /// How often the run is read; `None`: read only at the timeout (rules on
    /// `port/run.updated` tell the progress).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub poll_secs: Option<u64>,
    /// When to stop waiting and say so.
    pub timeout_secs: u64,
}

/// An entity to create or update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityChange {
    pub blueprint: String,
    pub identifier: String,
    /// Any of `title`, `team`, `properties`, `relations`.
    pub body: Value,
    /// `POST ?upsert=true&merge=true` (create it when missing) instead of `PATCH`.
    #[serde(default)]
    pub upsert: bool,
    /// Ties the change to an action run (`?run_id=`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub run_id: Option<String>,
}

/// The click behind an act: who, and the message clicked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClickRef {
    /// The clicker's Slack user id.
    pub user: String,
    /// Their email, once resolved (`users.info`) for `run_as` or an `allow` list of emails.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub email: Option<String>,
    /// The channel id and `ts` of the message the button is on.
    pub channel: String,
    pub message_ts: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub response_url: Option<String>,
}

/// A started action run being followed: read it (when due) and tell the thread.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunWatch {
    pub run_id: String,
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub entity: Option<String>,
    /// The Slack bot destination, channel and thread to tell.
    pub notify: String,
    pub channel: String,
    pub thread_ts: String,
    pub follow: FollowSpec,
    /// Unix ms when the run started, and when to give up.
    pub started_at: i64,
    pub deadline: i64,
    /// What the thread was last told (status and label), so only changes are said.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub told: Option<String>,
}

/// A closed run tracker: report the run to Port with what happened to its messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub run_id: String,
    #[serde(flatten)]
    pub spec: ReportSpec,
    pub tally: Tally,
}

/// What a job carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A rendered message, sent as it is.
    Message(Value),
    /// A rule's `with:` queries to run (the `port` destination). Boxed, as is `Report`: a
    /// payload is moved through every stage, and messages should not pay for the others' size.
    Expand(Box<Expand>),
    /// An action run to report (the `port` destination).
    Report(Box<RunReport>),
    /// A grouped rule's match, held until its group's digest is sent (never delivered itself).
    Group(Box<GroupItem>),
    /// An operation on Port decided by a rule (the `port` destination).
    Act(Box<PortAct>),
    /// A started action run to follow (the `port` destination).
    Watch(Box<RunWatch>),
}

/// The operations as written, tagged by `op` (borrowed: serialising copies nothing).
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op<'a> {
    Expand(&'a Expand),
    Report(&'a RunReport),
    Group(&'a GroupItem),
    Act(&'a PortAct),
    Watch(&'a RunWatch),
}

impl Payload {
    /// The storage kind: `message`, `expand`, `report`, `group`, `act` or `watch`.
    pub fn kind(&self) -> &'static str {
        match self {
            Payload::Message(_) => "message",
            Payload::Expand(_) => "expand",
            Payload::Report(_) => "report",
            Payload::Group(_) => "group",
            Payload::Act(_) => "act",
            Payload::Watch(_) => "watch",
        }
    }

    /// The message, when this is one.
    pub fn message(&self) -> Option<&Value> {
        match self {
            Payload::Message(m) => Some(m),
            _ => None,
        }
    }

    /// The JSON form: the message itself, or the operation with its `op` tag. This is what
    /// is stored, shown in dead letters and printed by `simulate`.
    pub fn to_json(&self) -> Value {
        match self {
            Payload::Message(m) => m.clone(),
            op => serde_json::to_value(op).unwrap_or(Value::Null),
        }
    }

    /// [`Payload::to_json`] as compact text, for storage.
    pub fn to_text(&self) -> String {
        match self {
            Payload::Message(m) => m.to_string(),
            op => serde_json::to_string(op).unwrap_or_default(),
        }
    }

    /// Reads a stored payload. `kind` is the row's kind column; `rule` the job's rule.
    ///
    /// Rows stored before payloads had a kind were given one by the migration from their
    /// `op` field. Report rows of that time carry their wording (`status`, `fields`, `log`)
    /// and keep their counts under `context.report`; they are read into a [`RunReport`] with
    /// the same outcome. Text that does not parse as its kind stays a message (`Null` when it
    /// is not JSON): delivery then fails it with a reason instead of guessing.
    pub fn from_stored(kind: &str, text: &str, rule: &str) -> Payload {
        let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        match kind {
            "expand" => match serde_json::from_value::<Expand>(v.clone()) {
                Ok(e) => Payload::Expand(Box::new(e)),
                Err(_) => Payload::Message(v),
            },
            "report" => match serde_json::from_value::<RunReport>(v.clone()) {
                Ok(r) => Payload::Report(Box::new(r)),
                Err(_) => legacy_report(&v, rule).unwrap_or(Payload::Message(v)),
            },
            "group" => match serde_json::from_value::<GroupItem>(v.clone()) {
                Ok(g) => Payload::Group(Box::new(g)),
                Err(_) => Payload::Message(v),
            },
            "act" => match serde_json::from_value::<PortAct>(v.clone()) {
                Ok(a) => Payload::Act(Box::new(a)),
                Err(_) => Payload::Message(v),
            },
            "watch" => match serde_json::from_value::<RunWatch>(v.clone()) {
                Ok(w) => Payload::Watch(Box::new(w)),
                Err(_) => Payload::Message(v),
            },
            _ => Payload::Message(v),
        }
    }
}

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Payload::Message(m) => m.serialize(s),
            Payload::Expand(e) => Op::Expand(e).serialize(s),
            Payload::Report(r) => Op::Report(r).serialize(s),
            Payload::Group(g) => Op::Group(g).serialize(s),
            Payload::Act(a) => Op::Act(a).serialize(s),
            Payload::Watch(w) => Op::Watch(w).serialize(s),
        }
    }
}

/// A report row written before reports carried counts (`status` and `fields` chosen at close).
fn legacy_report(v: &Value, rule: &str) -> Option<Payload> {
    let run_id = v["run_id"].as_str()?.to_string();
    let counts = &v["context"]["report"];
    let mut tally = Tally {
        delivered: counts["delivered"].as_i64().unwrap_or(0),
        failed: counts["failed"].as_i64().unwrap_or(0),
        errors: serde_json::from_value(counts["errors"].clone()).unwrap_or_default(),
    };
    if v["status"].as_str() == Some("FAILURE") && tally.failed == 0 {
        tally.failed = 1;
    }
    let fields: ReportFields = serde_json::from_value(v["fields"].clone()).unwrap_or_default();
    let mut context = v["context"].clone();
    if let Value::Object(m) = &mut context {
        m.remove("report");
    }
    Some(Payload::Report(Box::new(RunReport {
        run_id,
        spec: ReportSpec {
            rule: rule.to_string(),
            success: fields.clone(),
            failure: fields,
            context,
        },
        tally,
    })))
}

/// A dispatch to persist.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub destination: String,
    pub rule: String,
    pub event_id: String,
    pub target: Target,
    pub payload: Payload,
    pub secret: bool,
    /// Throttle claim: the key and window; the job is dropped when the key is still held.
    pub throttle: Option<(String, Duration)>,
    /// Dead on arrival (a template failed): stored as a dead letter with this reason.
    pub error: Option<String>,
}

impl NewJob {
    /// A job that `job`'s delivery hands back (same rule and event, committed with its outcome):
    /// a note to Slack, the next read of a run, a dead letter of the job's own operation.
    pub fn follow_up(job: &Job, destination: &str, target: Target, payload: Payload) -> NewJob {
        NewJob {
            destination: destination.to_string(),
            rule: job.rule.clone(),
            event_id: job.event_id.clone(),
            target,
            payload,
            secret: job.secret,
            throttle: None,
            error: None,
        }
    }
}

impl NewJob {
    /// The job as stored: its id, the payload's stored text (what a message sends as it is),
    /// and when it was accepted.
    pub fn stored(self, id: i64, text: String, created_at: i64) -> Job {
        Job {
            id,
            destination: self.destination,
            rule: self.rule,
            event_id: self.event_id,
            target: self.target,
            payload: self.payload,
            text: Bytes::from(text),
            secret: self.secret,
            created_at,
            attempts: 0,
            as_stored: false,
        }
    }
}

/// A persisted job awaiting delivery.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub destination: String,
    pub rule: String,
    pub event_id: String,
    pub target: Target,
    pub payload: Payload,
    /// The payload as stored (compact JSON): for a message, the body sent when it goes out
    /// unchanged, so it is written once rather than once per use. Read it through
    /// [`Job::body`].
    pub text: Bytes,
    pub secret: bool,
    /// Unix milliseconds when accepted.
    pub created_at: i64,
    pub attempts: u32,
    /// Its destination sends [`Job::text`] as it is (decided once, at submit, while the tree
    /// was there: see `Destination::sends_stored`), so the job waits without its tree and is
    /// never parsed again. False for a job fresh from the store.
    pub as_stored: bool,
}

impl Job {
    /// The payload as compact JSON, to send as it is.
    pub fn body(&self) -> Bytes {
        if self.text.is_empty() {
            Bytes::from(self.payload.to_text())
        } else {
            self.text.clone()
        }
    }

    /// The message, when the job carries one.
    pub fn message(&self) -> Option<&Value> {
        self.payload.message()
    }

    /// Drops a message's parsed tree while the job waits, keeping its stored text (the bytes
    /// it is sent as): a backlog of thousands of messages holds bytes, not JSON trees, which
    /// took several times the memory. [`Job::expand`] restores it before an attempt.
    pub fn compact(&mut self) {
        if let Payload::Message(v) = &mut self.payload {
            if !self.text.is_empty() {
                *v = Value::Null;
            }
        }
    }

    /// Drops the message's tree for good: its destination sends [`Job::text`] as it is
    /// ([`Job::as_stored`]), so [`Job::expand`] leaves it as it is.
    pub fn keep_as_stored(&mut self) {
        self.as_stored = true;
        self.compact();
    }

    /// Parses a compacted message again (no-op otherwise, and for a job kept as stored).
    pub fn expand(&mut self) {
        if self.as_stored {
            return;
        }
        if matches!(self.payload, Payload::Message(Value::Null)) && !self.text.is_empty() {
            self.payload =
                Payload::Message(serde_json::from_slice(&self.text).unwrap_or(Value::Null));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_compacted_message_expands_to_the_same_message() {
        let msg = json!({"text": "hi", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "*x*"}}]});
        let mut job = NewJob {
            destination: "d".into(),
            rule: "r".into(),
            event_id: "e".into(),
            target: Target::default(),
            payload: Payload::Message(msg.clone()),
            secret: false,
            throttle: None,
            error: None,
        }
        .stored(1, msg.to_string(), 0);
        job.compact();
        assert_eq!(job.message(), Some(&Value::Null));
        assert_eq!(
            job.body(),
            Bytes::from(msg.to_string()),
            "the bytes sent are kept"
        );
        job.expand();
        assert_eq!(job.message(), Some(&msg));
    }

    #[test]
    fn a_payload_survives_storage() {
        let all = [
            Payload::Message(json!({"text": "hi", "op": "expand"})),
            Payload::Expand(Box::new(Expand {
                rule: "r".into(),
                event: json!({"type": "port/entity.updated"}),
            })),
            Payload::Report(Box::new(RunReport {
                run_id: "r_1".into(),
                spec: ReportSpec {
                    rule: "r".into(),
                    success: ReportFields {
                        summary: Some("s".into()),
                        ..Default::default()
                    },
                    failure: ReportFields::default(),
                    context: json!({"run": {"id": "r_1"}}),
                },
                tally: Tally {
                    delivered: 2,
                    failed: 1,
                    errors: vec!["x".into()],
                },
            })),
        ];
        let act = Payload::Act(Box::new(PortAct {
            op: PortOp::Run(RunAction {
                action: "scale_up".into(),
                entity: Some("payments-api".into()),
                properties: json!({"replicas": 6}),
                run_as: RunAs::Email("ana@example.com".into()),
                allow: vec!["U1".into()],
                follow: Some(FollowSpec {
                    poll_secs: None,
                    timeout_secs: 60,
                }),
            }),
            click: Some(ClickRef {
                user: "U1".into(),
                email: None,
                channel: "C1".into(),
                message_ts: "1.2".into(),
                response_url: None,
            }),
            notify: Some("bot".into()),
        }));
        let entity = Payload::Act(Box::new(PortAct {
            op: PortOp::Entity(EntityChange {
                blueprint: "service".into(),
                identifier: "a".into(),
                body: json!({"properties": {"x": 1}}),
                upsert: true,
                run_id: None,
            }),
            click: None,
            notify: None,
        }));
        for p in all.into_iter().chain([act, entity]) {
            let back = Payload::from_stored(p.kind(), &p.to_text(), "r");
            assert_eq!(back, p);
        }
    }

    #[test]
    fn a_message_with_an_op_field_stays_a_message() {
        let text = r#"{"op":"report","run_id":"r_1","status":"SUCCESS"}"#;
        assert!(matches!(
            Payload::from_stored("message", text, "r"),
            Payload::Message(_)
        ));
    }

    #[test]
    fn a_report_row_of_the_old_shape_keeps_its_outcome() {
        let old = json!({
            "op": "report", "run_id": "r_9", "status": "FAILURE",
            "fields": {"summary": "sum"}, "default_summary": "1 message(s) could not be delivered",
            "log": "1 of 1 message(s) failed: boom",
            "context": {"run": {"id": "r_9"}, "report": {"delivered": 0, "failed": 1, "errors": ["boom"]}}
        });
        let Payload::Report(r) = Payload::from_stored("report", &old.to_string(), "rule-a") else {
            panic!("not a report");
        };
        assert_eq!(r.run_id, "r_9");
        assert_eq!(r.spec.rule, "rule-a");
        assert_eq!(r.tally.failed, 1);
        assert_eq!(r.tally.errors, vec!["boom".to_string()]);
        assert_eq!(r.spec.failure.summary.as_deref(), Some("sum"));
        assert_eq!(r.spec.context, json!({"run": {"id": "r_9"}}));
    }
}
