//! The routing step: which rules match an event, and what each of their sends renders.
//!
//! [`route`] is a pure function of `(&Router, &Event)`: no I/O, no clock, no randomness. The
//! server, `check`, `simulate`, the rule tests and the benchmarks all call it, so what a test
//! shows is what production does. It selects the rules for the event's type (precomputed
//! index), skips those whose `== "text"` / `changed_to "text"` condition the event cannot meet
//! (looked up by the event's value, see `TypeIndex`), evaluates the conditions of the rest in
//! file order, stops after a matching rule with `stop: true`, and renders one message per
//! `send` step. The server calls [`route_in_place`], which renders from the event's own data
//! rather than a copy; the result is the same.

pub mod condition;
pub mod path;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use handlebars::Context;
use serde::Serialize;
use serde_json::Value;

use crate::event::Event;
use crate::job::{Expand, Payload};
pub use crate::job::{ReportFields, Target};
use crate::render::Templates;
use condition::{Condition, Trace};

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub id: String,
    pub description: Option<String>,
    pub on: Vec<String>,
    pub conditions: Vec<Condition>,
    pub sends: Vec<SendStep>,
    pub stop: bool,
    /// Throttle: the (plain) template name of the key, and the window.
    pub throttle: Option<(String, std::time::Duration)>,
    /// `with:` queries; when present, sending is deferred to an expansion job.
    pub queries: Vec<Query>,
    /// Conditions that read `$.with…`, evaluated after the queries ran.
    pub after: Vec<Condition>,
    /// What to report to Port for action runs.
    pub report: Option<Report>,
    /// Digests: matches wait in their group and the sends render once per group.
    pub group: Option<Group>,
    /// When the rule may send (applied when an event is accepted, not in routing).
    pub window: Option<crate::window::Window>,
    /// The file that defines it.
    pub file: PathBuf,
}

/// A compiled `send` step. Template fields name templates registered in [`Templates`].
#[derive(Debug, Clone)]
pub struct SendStep {
    /// The destination as written in the rule.
    pub to: String,
    /// The message template.
    pub template: String,
    pub channel: Option<String>,
    pub user_email: Option<String>,
    pub thread_ts: Option<String>,
    pub reply_broadcast: bool,
    /// A (plain) template rendering a JSON list: one message per element, as `item`.
    pub for_each: Option<String>,
    /// The message identity of a keyed step.
    pub keyed: Option<Keyed>,
    /// A step to a `port` destination that acts on Port instead of sending a message.
    pub port: Option<PortStep>,
}

/// A compiled `run:` or `entity:` step: the operation with Handlebars string leaves, rendered
/// over the event at dispatch into a [`crate::job::PortAct`].
#[derive(Debug, Clone)]
pub struct PortStep {
    pub op: PortStepOp,
    /// The Slack bot destination that tells the clicker and the thread.
    pub notify: Option<String>,
    /// Clicks on the same button of the same message act once within this time.
    pub once_per: std::time::Duration,
}

/// What a [`PortStep`] does.
#[derive(Debug, Clone)]
pub enum PortStepOp {
    Run {
        action: String,
        entity: Option<String>,
        properties: Value,
        /// `None`: the clicker on clicks, the engine otherwise; `Some(template)`: an email.
        run_as: Option<RunAsStep>,
        allow: Vec<String>,
        follow: Option<crate::job::FollowSpec>,
    },
    Entity {
        blueprint: String,
        identifier: String,
        body: Value,
        upsert: bool,
        run_id: Option<String>,
    },
}

/// `run_as` as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAsStep {
    Clicker,
    Engine,
    /// A template of an email.
    Email(String),
}

/// A grouped rule's digest settings.
#[derive(Debug, Clone)]
pub struct Group {
    /// The (plain) template naming the group; `None`: one group for the rule.
    pub by: Option<String>,
    pub wait: std::time::Duration,
    pub interval: std::time::Duration,
    /// The most items one digest lists.
    pub max: usize,
}

impl Group {
    /// When a group whose oldest item came at `first_at` (unix ms, or any clock) is due: `wait`
    /// after that item, and no sooner than `interval` after the group's last digest.
    pub fn due_at(&self, first_at: i64, last_digest: Option<i64>) -> i64 {
        let first = first_at.saturating_add(self.wait.as_millis() as i64);
        match last_digest {
            Some(last) => first.max(last.saturating_add(self.interval.as_millis() as i64)),
            None => first,
        }
    }
}

/// A keyed send step: the message it acts on and how.
#[derive(Debug, Clone)]
pub struct Keyed {
    /// The (plain) template of the key.
    pub key: String,
    pub action: crate::job::KeyAction,
    pub ttl: std::time::Duration,
    /// The message template of the thread reply that follows an update or resolve.
    pub reply: Option<String>,
    /// Built-in buttons added to the message.
    pub buttons: Option<Buttons>,
}

/// A keyed step's built-in buttons.
#[derive(Debug, Clone)]
pub struct Buttons {
    pub acknowledge: bool,
    /// How long a snooze silences the key; `None`: no snooze button.
    pub snooze: Option<std::time::Duration>,
    /// Slack user ids allowed to click; empty: anyone.
    pub allow: Vec<String>,
}

/// The `action_id` prefix of the engine's own buttons.
pub const BUTTON_PREFIX: &str = "switchyard:";

impl Buttons {
    /// The actions block for a message of `rule` keyed `key` at `destination`.
    pub fn block(&self, rule: &str, destination: &str, key: &str) -> Value {
        let value = serde_json::json!({"r": rule, "d": destination, "k": key}).to_string();
        let mut elements = Vec::new();
        if self.acknowledge {
            elements.push(serde_json::json!({
                "type": "button", "action_id": format!("{BUTTON_PREFIX}ack"),
                "text": {"type": "plain_text", "text": "Acknowledge"}, "value": value,
            }));
        }
        if let Some(d) = self.snooze {
            elements.push(serde_json::json!({
                "type": "button", "action_id": format!("{BUTTON_PREFIX}snooze"),
                "text": {"type": "plain_text", "text": format!("Snooze {}", humantime::format_duration(d))},
                "value": value,
            }));
        }
        serde_json::json!({"type": "actions", "block_id": format!("{BUTTON_PREFIX}buttons"), "elements": elements})
    }
}

/// A compiled `with:` query.
#[derive(Debug, Clone)]
pub struct Query {
    pub name: String,
    /// The `port` destination whose API and credentials answer it.
    pub port: String,
    pub blueprint: String,
    pub combinator: String,
    /// Port search rules; string leaves are rendered as templates over the event.
    pub rules: Vec<Value>,
    pub include: Vec<String>,
    pub max_pages: u32,
    pub limit: u32,
    pub timeout: std::time::Duration,
}

/// A compiled `report:`; fields are (plain) template names.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The `port` destination that reports.
    pub to: String,
    pub success: ReportFields,
    pub failure: ReportFields,
}

/// Why a matched send produced no deliverable message.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", content = "reason", rename_all = "snake_case")]
pub enum DispatchError {
    /// The template failed for this event; the dispatch becomes a dead letter.
    Render(String),
    /// A safety rule forbids it (a One-Time Passcode to anything but its owner's DM).
    Refused(String),
}

/// One message for one destination, decided by one rule.
#[derive(Debug, Clone, Serialize)]
pub struct Dispatch {
    pub rule: String,
    /// The destination as the rule names it.
    pub to: String,
    /// The destination that will deliver it (differs from `to` when `to` falls back).
    pub destination: String,
    pub event_id: String,
    /// The message template used.
    pub template: String,
    pub target: Target,
    /// The rendered message (or, for a rule with `with:` queries, the expansion to run), or
    /// why there is none (serialized as the payload's JSON, or as
    /// `{"error": {"kind", "reason"}}`).
    #[serde(serialize_with = "ser_message")]
    pub message: Result<Payload, DispatchError>,
    /// The event is secret (OTP): never log or print the message.
    pub secret: bool,
    /// The rule's throttle key for this event and its window, when the rule is throttled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle: Option<(String, std::time::Duration)>,
}

fn ser_message<S: serde::Serializer>(
    m: &Result<Payload, DispatchError>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match m {
        Ok(v) => v.serialize(s),
        Err(e) => serde_json::json!({ "error": e }).serialize(s),
    }
}

/// What routing needs to know of a destination: where its messages really go and what it
/// can do. The configuration compiles one per destination ([`crate::config`]); routing never
/// looks at destination kinds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    /// The destination that delivers for this name: a fallback when the destination's
    /// settings are missing and it has one, else the destination itself.
    pub delivers_as: Option<String>,
    /// It sends direct messages to a user (a Slack bot): the only place a secret event may go.
    pub direct_messages: bool,
    /// A (plain) template rendering each message's record key (Kafka).
    pub key: Option<String>,
    /// A template rendering the whole body instead of the step's message (a webhook's own).
    pub body: Option<String>,
}

/// The compiled rules, their templates, the destinations' [`Output`]s, and the per-type index:
/// everything [`route`] reads. Immutable; a reload compiles a new one.
#[derive(Debug)]
pub struct Router {
    pub rules: Vec<Rule>,
    pub templates: Arc<Templates>,
    /// By destination name.
    pub outputs: BTreeMap<String, Output>,
    /// The candidate rules per event type (wildcards included), see [`TypeIndex`].
    index: HashMap<String, TypeIndex>,
    /// Distinct simple paths of the rules' conditions (memo slots, see [`path::Interner`]).
    path_slots: usize,
}

impl Router {
    /// Assembles a router and builds the per-type index.
    pub fn new(
        rules: Vec<Rule>,
        templates: Arc<Templates>,
        outputs: BTreeMap<String, Output>,
    ) -> Self {
        let mut rules = rules;
        let mut interner = path::Interner::default();
        for r in &mut rules {
            r.conditions
                .iter_mut()
                .for_each(|c| c.intern(&mut interner));
        }
        let mut rs = Router {
            path_slots: interner.len(),
            rules,
            templates,
            outputs,
            index: HashMap::new(),
        };
        let types: Vec<String> = crate::event::EVENT_TYPES
            .iter()
            .map(|s| s.to_string())
            .collect();
        for t in types {
            let idx = rs.candidates_slow(&t);
            rs.index.insert(t, TypeIndex::new(&rs.rules, idx));
        }
        rs
    }

    fn candidates_slow(&self, event_type: &str) -> Vec<usize> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.on.iter().any(|p| type_matches(p, event_type)))
            .map(|(i, _)| i)
            .collect()
    }

    /// Indices of the rules whose `on` covers `event_type`, in file order.
    pub fn candidates(&self, event_type: &str) -> std::borrow::Cow<'_, [usize]> {
        match self.index.get(event_type) {
            Some(ix) => std::borrow::Cow::Borrowed(ix.all.as_slice()),
            None => std::borrow::Cow::Owned(self.candidates_slow(event_type)),
        }
    }

    /// The destination that delivers for `name` (following an active fallback).
    pub fn effective_destination<'a>(&'a self, name: &'a str) -> &'a str {
        match self
            .outputs
            .get(name)
            .and_then(|o| o.delivers_as.as_deref())
        {
            Some(d) => d,
            None => name,
        }
    }
}

/// The candidate rules of one event type, arranged so that rules which need a path to equal a
/// given text are found by looking the event's value up rather than by evaluating each.
///
/// Rules are usually told apart by a kind of thing (`$.blueprint == "service"`), so a ruleset
/// of many rules has many rules over one path. A rule with a [`Condition::required_text`] among
/// its conditions goes into the group of that path under its text, when at least two rules
/// share the path; every other rule is scanned. [`matching`] takes the scanned rules and the
/// rules under the event's values, in file order, and evaluates all conditions of each: the
/// index only skips rules whose condition could not hold, so the result is the scan's (a test
/// compares them).
#[derive(Debug, Default)]
struct TypeIndex {
    /// Every rule whose `on` covers the type, in file order.
    all: Vec<usize>,
    /// Rules evaluated for every event, in file order.
    scanned: Vec<usize>,
    /// Grouped rules: the path (with its memo slot) and the rules by text, each in file order.
    groups: Vec<(path::JsonPathExpr, HashMap<String, Vec<usize>>)>,
}

impl TypeIndex {
    fn new(rules: &[Rule], candidates: Vec<usize>) -> TypeIndex {
        let key = |i: usize| {
            rules[i]
                .conditions
                .iter()
                .find_map(Condition::required_text)
        };
        let mut per_slot: HashMap<u32, usize> = HashMap::new();
        for &i in &candidates {
            if let Some(slot) = key(i).and_then(|(p, _)| p.slot()) {
                *per_slot.entry(slot).or_default() += 1;
            }
        }
        let mut ix = TypeIndex::default();
        let mut group_of: HashMap<u32, usize> = HashMap::new();
        for &i in &candidates {
            let grouped = key(i).and_then(|(p, text)| {
                let slot = p.slot()?;
                (per_slot.get(&slot).copied().unwrap_or(0) >= 2).then_some((slot, p, text))
            });
            match grouped {
                Some((slot, p, text)) => {
                    let g = *group_of.entry(slot).or_insert_with(|| {
                        ix.groups.push((p.clone(), HashMap::new()));
                        ix.groups.len() - 1
                    });
                    ix.groups[g].1.entry(text.to_string()).or_default().push(i);
                }
                None => ix.scanned.push(i),
            }
        }
        ix.all = candidates;
        ix
    }
}

/// `port/entity.updated` matches `port/entity.updated`, `port/*`, `port/entity.*` and `*`.
pub fn type_matches(pattern: &str, event_type: &str) -> bool {
    if pattern == "*" || pattern == event_type {
        return true;
    }
    match pattern.strip_suffix('*') {
        Some(prefix) => event_type.starts_with(prefix),
        None => false,
    }
}

/// The rules that match an event, in order, honouring `stop: true`. Pure.
pub fn matching<'a>(rs: &'a Router, ev: &Event) -> Vec<&'a Rule> {
    let mut out = Vec::new();
    let mut lk = path::Lookup::new(&ev.data, rs.path_slots);
    let candidates = match rs.index.get(&ev.event_type) {
        Some(ix) if !ix.groups.is_empty() => {
            let mut c = ix.scanned.clone();
            for (p, by_text) in &ix.groups {
                if let Some(Value::String(t)) = p.first_in(&mut lk) {
                    if let Some(rules) = by_text.get(t) {
                        c.extend_from_slice(rules);
                    }
                }
            }
            c.sort_unstable();
            std::borrow::Cow::Owned(c)
        }
        Some(ix) => std::borrow::Cow::Borrowed(ix.all.as_slice()),
        None => rs.candidates(&ev.event_type),
    };
    for &i in candidates.iter() {
        let rule = &rs.rules[i];
        if !rule.conditions.iter().all(|c| c.eval_in(&mut lk)) {
            continue;
        }
        out.push(rule);
        if rule.stop {
            break;
        }
    }
    out
}

/// Routes an event: every matching rule in file order (until one with `stop: true`), one
/// dispatch per send step (per element with `for_each`), messages rendered. A rule with `with:`
/// queries yields one *expansion* dispatch to its Port destination instead: the queries are
/// I/O, so they run in the delivery stage, which then calls [`expand`] (pure) with the results.
pub fn route(rs: &Router, ev: &Event) -> Vec<Dispatch> {
    let rules = matching(rs, ev);
    if rules.is_empty() {
        return Vec::new();
    }
    dispatch_all(rs, ev, &rules, &Context::from(ev.data.clone()))
}

/// [`route`] without copying the event: the rendering context holds the event's data while the
/// matched rules render, and `ev.data` is put back before this returns. The server uses it, so
/// a matched event's envelope is never deep-copied (bench/PROFILE.md).
pub fn route_in_place(rs: &Router, ev: &mut Event) -> Vec<Dispatch> {
    let rules = matching(rs, ev);
    if rules.is_empty() {
        return Vec::new();
    }
    let mut ctx = Context::from(std::mem::take(&mut ev.data));
    let out = dispatch_all(rs, ev, &rules, &ctx);
    ev.data = std::mem::take(ctx.data_mut());
    out
}

/// The dispatches of the matched `rules`. The event's data is read from `ctx` only: under
/// [`route_in_place`] `ev.data` is empty meanwhile.
fn dispatch_all(rs: &Router, ev: &Event, rules: &[&Rule], ctx: &Context) -> Vec<Dispatch> {
    let mut out = Vec::new();
    for rule in rules {
        if let Some(q) = rule.queries.first() {
            out.push(Dispatch {
                rule: rule.id.clone(),
                to: q.port.clone(),
                destination: q.port.clone(),
                event_id: ev.id.clone(),
                template: String::new(),
                target: Target::default(),
                message: Ok(Payload::Expand(Box::new(Expand {
                    rule: rule.id.clone(),
                    event: ctx.data().clone(),
                }))),
                secret: ev.secret,
                throttle: None,
            });
            continue;
        }
        if let Some(g) = &rule.group {
            out.push(group_item(rs, ev, rule, g, ctx));
            continue;
        }
        for step in &rule.sends {
            dispatch(rs, ev, rule, step, ctx, &mut out);
        }
    }
    withhold_secret_errors(&mut out);
    out
}

/// The destination name a grouped rule's items are held under (never a real destination).
pub fn group_destination(rule: &str) -> String {
    format!("group:{rule}")
}

/// A grouped rule's match: the event joins its group (named by `group.by`) for the digest.
fn group_item(rs: &Router, ev: &Event, rule: &Rule, g: &Group, ctx: &Context) -> Dispatch {
    let destination = group_destination(&rule.id);
    let mut d = Dispatch {
        rule: rule.id.clone(),
        to: destination.clone(),
        destination,
        event_id: ev.id.clone(),
        template: String::new(),
        target: Target::default(),
        message: Err(DispatchError::Render(String::new())),
        secret: ev.secret,
        throttle: None,
    };
    if ev.secret {
        d.message = Err(DispatchError::Refused(
            "a One-Time Passcode is never grouped into a digest (it may only go to its owner's DM)"
                .into(),
        ));
        return d;
    }
    let group = match &g.by {
        None => Ok(String::new()),
        Some(t) => rs
            .templates
            .render_plain(t, ctx)
            .map(|s| s.trim().to_string())
            .map_err(|e| DispatchError::Render(format!("group `by`: {}", e.message))),
    };
    d.message = group.map(|group| {
        Payload::Group(Box::new(crate::job::GroupItem {
            rule: rule.id.clone(),
            group,
            event: ctx.data().clone(),
        }))
    });
    d
}

/// A grouped rule's digest for `group`: its sends rendered once over `items` (at most the
/// rule's `max`), `count` (all of them), `group` and `rule`. Pure: the digest flusher, `check`
/// and `simulate` call it.
pub fn digest(
    rs: &Router,
    rule: &Rule,
    group: &str,
    mut items: Vec<Value>,
    event_id: &str,
) -> Vec<Dispatch> {
    let count = items.len();
    if let Some(g) = &rule.group {
        items.truncate(g.max);
    }
    let data = serde_json::json!({
        "items": items,
        "count": count,
        "group": group,
        "rule": rule.id,
    });
    let ev = Event {
        event_type: "digest".into(),
        id: event_id.to_string(),
        source: String::new(),
        data: data.clone(),
        secret: false,
    };
    let ctx = Context::from(data);
    let mut out = Vec::new();
    for step in &rule.sends {
        dispatch(rs, &ev, rule, step, &ctx, &mut out);
    }
    out
}

/// A render error can quote what was rendered, and for a secret event that is the passcode;
/// such errors keep only which template failed. (`check` renders every rule against a sample
/// passcode event, where the details are harmless, and reports them there.)
fn withhold_secret_errors(out: &mut [Dispatch]) {
    for d in out.iter_mut().filter(|d| d.secret) {
        if let Err(DispatchError::Render(e)) = &mut d.message {
            let what = if d.template.is_empty() {
                "a template of this rule".to_string()
            } else {
                format!("template `{}`", d.template)
            };
            *e = format!(
                "{what} failed to render (details withheld: the event carries a One-Time Passcode; `switchyard check` shows them for a sample passcode event)"
            );
        }
    }
}

/// Why a deferred rule could not be finished.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    /// A reload removed the rule between routing and the queries' answers.
    #[error("rule `{0}` is no longer in the rules")]
    RuleGone(String),
}

/// Finishes a deferred rule: with the query results under `with`, evaluates the conditions
/// that read them and renders the sends. Pure; `simulate --with` and the Port destination call it.
pub fn expand(
    rs: &Router,
    ev: &Event,
    rule_id: &str,
    results: serde_json::Map<String, Value>,
) -> Result<Vec<Dispatch>, ExpandError> {
    let rule = rs
        .rules
        .iter()
        .find(|r| r.id == rule_id)
        .ok_or_else(|| ExpandError::RuleGone(rule_id.to_string()))?;
    let mut data = ev.data.clone();
    if let Value::Object(m) = &mut data {
        m.insert("with".into(), Value::Object(results));
    }
    if !rule.after.iter().all(|c| c.eval(&data)) {
        return Ok(Vec::new());
    }
    let ev2 = Event { data, ..ev.clone() };
    let ctx = Context::from(ev2.data.clone());
    let mut out = Vec::new();
    for step in &rule.sends {
        dispatch(rs, &ev2, rule, step, &ctx, &mut out);
    }
    withhold_secret_errors(&mut out);
    Ok(out)
}

fn dispatch(
    rs: &Router,
    ev: &Event,
    rule: &Rule,
    step: &SendStep,
    ctx: &Context,
    out: &mut Vec<Dispatch>,
) {
    let Some(each) = &step.for_each else {
        push_keyed(rs, step, ctx, dispatch_one(rs, ev, rule, step, ctx), out);
        return;
    };
    let items = rs
        .templates
        .render_plain(each, ctx)
        .map_err(|e| format!("for_each: {}", e.message))
        .and_then(|t| {
            serde_json::from_str::<Value>(t.trim())
                .map_err(|e| format!("for_each did not render a JSON list: {e}"))
        })
        .and_then(|v| match v {
            Value::Array(a) => Ok(a),
            Value::Null => Ok(Vec::new()),
            other => Err(format!(
                "for_each rendered {}, not a list",
                crate::render::blockkit::truncate_chars(&other.to_string(), 60)
            )),
        });
    match items {
        Ok(items) => {
            for item in items {
                let mut data = ctx.data().clone();
                if let Value::Object(m) = &mut data {
                    m.insert("item".into(), item);
                }
                let ctx = Context::from(data);
                push_keyed(rs, step, &ctx, dispatch_one(rs, ev, rule, step, &ctx), out);
            }
        }
        Err(e) => {
            let mut d = dispatch_one(rs, ev, rule, step, ctx);
            d.message = Err(DispatchError::Render(e));
            out.push(d);
        }
    }
}

/// Appends a block to a rendered message (making `blocks` when it has none).
fn add_block(m: &mut Value, block: Value) {
    if let Value::Object(o) = m {
        match o.get_mut("blocks") {
            Some(Value::Array(b)) => b.push(block),
            _ => {
                let mut blocks = Vec::new();
                if let Some(Value::String(t)) = o.get("text") {
                    blocks.push(serde_json::json!({"type": "section", "text": {"type": "mrkdwn", "text": t}}));
                }
                blocks.push(block);
                o.insert("blocks".into(), Value::Array(blocks));
            }
        }
    }
}

/// Adds `d`, and for a keyed step with a `reply`, the thread reply that follows it: the update
/// first, then the reply in its thread (which closes the key when the step resolves). Both
/// carry the key, so they are delivered in this order.
fn push_keyed(
    rs: &Router,
    step: &SendStep,
    ctx: &Context,
    mut d: Dispatch,
    out: &mut Vec<Dispatch>,
) {
    let reply = step.keyed.as_ref().and_then(|k| k.reply.as_ref());
    let (Some(reply), Some(identity), Ok(_)) = (reply, d.target.identity.clone(), &d.message)
    else {
        out.push(d);
        return;
    };
    let mut r = d.clone();
    r.template = reply.clone();
    r.message = rs
        .templates
        .render_message(reply, ctx)
        .map(Payload::Message)
        .map_err(render_error);
    r.target.identity = Some(crate::job::Identity {
        action: if identity.action.closes() {
            crate::job::KeyAction::ReplyClose
        } else {
            crate::job::KeyAction::Reply
        },
        ..identity.clone()
    });
    if let Some(id) = d.target.identity.as_mut() {
        id.action = crate::job::KeyAction::Update;
    }
    out.push(d);
    out.push(r);
}

fn dispatch_one(rs: &Router, ev: &Event, rule: &Rule, step: &SendStep, ctx: &Context) -> Dispatch {
    let destination = rs.effective_destination(&step.to).to_string();
    let mut d = Dispatch {
        rule: rule.id.clone(),
        to: step.to.clone(),
        destination: destination.clone(),
        event_id: ev.id.clone(),
        template: step.template.clone(),
        target: Target::default(),
        message: Err(DispatchError::Render(String::new())),
        secret: ev.secret,
        throttle: None,
    };
    let plain = |name: &Option<String>| -> Result<Option<String>, DispatchError> {
        match name {
            None => Ok(None),
            Some(n) => rs
                .templates
                .render_plain(n, ctx)
                .map(|s| Some(s.trim().to_string()).filter(|s| !s.is_empty()))
                .map_err(|e| DispatchError::Render(e.message)),
        }
    };
    let target = (|| -> Result<Target, DispatchError> {
        Ok(Target {
            channel: plain(&step.channel)?,
            user_email: plain(&step.user_email)?,
            thread_ts: plain(&step.thread_ts)?,
            reply_broadcast: step.reply_broadcast,
            key: match rs.outputs.get(&destination) {
                Some(o) => plain(&o.key)?,
                None => None,
            },
            // A key acts on a Slack message; while the step falls back to another kind of
            // destination (its token unset), the message is simply sent there.
            identity: match (&step.keyed, rs.outputs.get(&destination)) {
                (Some(k), Some(o)) if o.direct_messages => Some(crate::job::Identity {
                    key: plain(&Some(k.key.clone()))?
                        .ok_or_else(|| DispatchError::Render("`key` rendered empty".into()))?,
                    action: k.action,
                    ttl_secs: k.ttl.as_secs(),
                }),
                _ => None,
            },
            hold_until: None,
            response_url: None,
        })
    })();
    if let Some((key_tpl, window)) = &rule.throttle {
        match rs.templates.render_plain(key_tpl, ctx) {
            Ok(k) => d.throttle = Some((format!("{}\u{1f}{}", rule.id, k.trim()), *window)),
            Err(e) => {
                d.message = Err(DispatchError::Render(format!(
                    "throttle key: {}",
                    e.message
                )));
                return d;
            }
        }
    }
    let target = match target {
        Ok(t) => t,
        Err(e) => {
            d.message = Err(e);
            return d;
        }
    };
    d.target = target;
    if ev.secret {
        if let Err(reason) = secret_allowed(rs, ctx.data(), &destination, &d.target) {
            d.message = Err(DispatchError::Refused(reason));
            return d;
        }
    }
    if let Some(ps) = &step.port {
        match port_act(rs, ev, ps, ctx) {
            Ok((act, throttle)) => {
                d.message = Ok(Payload::Act(Box::new(act)));
                if throttle.is_some() {
                    d.throttle = throttle;
                }
            }
            Err(e) => d.message = Err(DispatchError::Render(e)),
        }
        return d;
    }
    // A webhook destination with its own body template renders that instead of the message.
    let own_body = rs.outputs.get(&destination).and_then(|o| o.body.clone());
    if let Some(t) = own_body {
        d.template = t.clone();
        d.message = rs
            .templates
            .render_json(&t, ctx)
            .map(Payload::Message)
            .map_err(render_error);
        return d;
    }
    d.message = rs
        .templates
        .render_message(&step.template, ctx)
        .map(|mut m| {
            if let (Some(b), Some(id)) = (
                step.keyed.as_ref().and_then(|k| k.buttons.as_ref()),
                &d.target.identity,
            ) {
                add_block(&mut m, b.block(&rule.id, &destination, &id.key));
            }
            m
        })
        .map(Payload::Message)
        .map_err(render_error);
    d
}

/// Renders a `run:`/`entity:` step over the event: the act, and for a click, the claim that
/// makes the same person's second click on the same button of the same message (a double
/// click, an impatient re-click) act no more within `once_per`. Slack's retries of one click
/// are the same event and deduplicated before routing. The claim is per person so that a click
/// by someone not allowed cannot block the one who is.
fn port_act(
    rs: &Router,
    ev: &Event,
    ps: &PortStep,
    ctx: &Context,
) -> Result<(crate::job::PortAct, Option<(String, std::time::Duration)>), String> {
    use crate::job::{ClickRef, EntityChange, PortAct, PortOp, RunAction, RunAs};
    let t = &rs.templates;
    let text = |what: &str, s: &str| -> Result<String, String> {
        t.render_inline(s, ctx)
            .map(|v| v.trim().to_string())
            .map_err(|e| format!("`{what}`: {e}"))
    };
    // An optional field: absent, or rendered empty, is none.
    let some_text = |what: &str, s: &Option<String>| -> Result<Option<String>, String> {
        match s {
            Some(s) => Ok(Some(text(what, s)?).filter(|v| !v.is_empty())),
            None => Ok(None),
        }
    };
    let data = ctx.data();
    let click = (ev.event_type == "slack/block_actions")
        .then(|| {
            Some(ClickRef {
                user: data["user"]["id"].as_str()?.to_string(),
                email: None,
                channel: data["channel"]["id"].as_str()?.to_string(),
                message_ts: data["message"]["ts"].as_str()?.to_string(),
                response_url: data["response_url"].as_str().map(str::to_string),
            })
        })
        .flatten();
    let op = match &ps.op {
        PortStepOp::Run {
            action,
            entity,
            properties,
            run_as,
            allow,
            follow,
        } => {
            let run_as = match run_as {
                None if click.is_some() => RunAs::Clicker,
                None | Some(RunAsStep::Engine) => RunAs::Engine,
                Some(RunAsStep::Clicker) => RunAs::Clicker,
                Some(RunAsStep::Email(e)) => RunAs::Email(text("run_as", e)?),
            };
            if run_as == RunAs::Clicker && click.is_none() {
                return Err(format!(
                    "`run_as: clicker` needs a Slack click, and this is `{}`",
                    ev.event_type
                ));
            }
            let action = text("action", action)?;
            if action.is_empty() {
                return Err("`action` rendered empty".into());
            }
            PortOp::Run(RunAction {
                action,
                entity: some_text("entity", entity)?,
                properties: t.render_strings(properties, ctx)?,
                run_as,
                allow: allow.clone(),
                follow: *follow,
            })
        }
        PortStepOp::Entity {
            blueprint,
            identifier,
            body,
            upsert,
            run_id,
        } => {
            let (blueprint, identifier) = (
                text("blueprint", blueprint)?,
                text("identifier", identifier)?,
            );
            if blueprint.is_empty() || identifier.is_empty() {
                return Err("the entity's `blueprint` or `identifier` rendered empty".into());
            }
            PortOp::Entity(EntityChange {
                blueprint,
                identifier,
                body: t.render_strings(body, ctx)?,
                upsert: *upsert,
                run_id: some_text("run_id", run_id)?,
            })
        }
    };
    let once = click.as_ref().map(|c| {
        (
            format!(
                "click\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
                c.user,
                c.channel,
                c.message_ts,
                data["action"]["action_id"].as_str().unwrap_or_default(),
                data["action"]["value"].as_str().unwrap_or_default()
            ),
            ps.once_per,
        )
    });
    Ok((
        PortAct {
            op,
            click,
            notify: ps.notify.clone(),
        },
        once,
    ))
}

fn render_error(e: crate::render::TemplateError) -> DispatchError {
    match (e.line, e.column) {
        (Some(l), Some(c)) => DispatchError::Render(format!(
            "template `{}` (line {l}, column {c}): {}",
            e.template, e.message
        )),
        _ => DispatchError::Render(format!("template `{}`: {}", e.template, e.message)),
    }
}

/// A secret event may only be a Slack DM to the user it belongs to.
pub(crate) fn secret_allowed(
    rs: &Router,
    data: &Value,
    destination: &str,
    t: &Target,
) -> Result<(), String> {
    let is_bot = rs
        .outputs
        .get(destination)
        .is_some_and(|o| o.direct_messages);
    let owner = data["user"]["email"].as_str().unwrap_or("");
    let to_owner = t.channel.is_none()
        && t.user_email
            .as_deref()
            .is_some_and(|e| !owner.is_empty() && e.eq_ignore_ascii_case(owner));
    if is_bot && to_owner {
        Ok(())
    } else {
        Err(format!(
            "a One-Time Passcode notification may only be sent as a Slack DM to its recipient; destination `{destination}` is not a DM to them"
        ))
    }
}

/// How one rule fared against an event, for `simulate`.
#[derive(Debug, Serialize)]
pub struct RuleReport {
    pub rule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub file: PathBuf,
    pub matched: bool,
    /// Why the rule was not evaluated (`on` does not cover the type, or an earlier rule stopped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    pub conditions: Vec<Trace>,
}

/// Evaluates every rule against the event and says why each matched or not. Agrees with
/// [`route`] (same conditions, same order, same `stop`).
pub fn explain(rs: &Router, ev: &Event) -> Vec<RuleReport> {
    let candidates = rs.candidates(&ev.event_type);
    let mut stopped_by: Option<String> = None;
    rs.rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let mut r = RuleReport {
                rule: rule.id.clone(),
                description: rule.description.clone(),
                file: rule.file.clone(),
                matched: false,
                skipped: None,
                conditions: vec![],
            };
            if !candidates.contains(&i) {
                r.skipped = Some(format!(
                    "`on: {}` does not cover {}",
                    rule.on.join(", "),
                    ev.event_type
                ));
                return r;
            }
            if let Some(s) = &stopped_by {
                r.skipped = Some(format!("rule `{s}` matched first and has `stop: true`"));
                return r;
            }
            r.conditions = rule
                .conditions
                .iter()
                .map(|c| c.explain(&ev.data))
                .collect();
            r.matched = r.conditions.iter().all(|t| t.holds);
            if r.matched && rule.stop {
                stopped_by = Some(rule.id.clone());
            }
            r
        })
        .collect()
}
