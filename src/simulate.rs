//! `switchyard simulate`: what would happen to one event, and why.
//!
//! Decodes the event with the named source's decoder, explains every rule (matched, or which
//! condition failed on what value, or why it was skipped), and shows the rendered message of
//! each dispatch. Nothing is sent. A secret event (One-Time Passcode) is explained without any
//! of its values.

use serde::Serialize;
use serde_json::Value;

use crate::config::Ruleset;
use crate::event::Event;
use crate::job::{KeyStep, Payload};
use crate::routing::condition::Trace;
use crate::routing::{explain, route, Dispatch, DispatchError, RuleReport};
use crate::sources::{Decoded, Rejection, Request};

/// The outcome of a simulation.
#[derive(Debug, Serialize)]
pub struct Simulation {
    pub event_type: String,
    pub event_id: String,
    pub source: String,
    pub secret: bool,
    pub rules: Vec<RuleReport>,
    pub dispatches: Vec<Dispatch>,
    /// With `--state`: what each dispatch would do given that state (index by index).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub effects: Vec<String>,
    /// The envelope (never printed: a secret event's would hold the passcode).
    #[serde(skip)]
    pub data: Value,
}

/// The lifecycle state a simulation can start from: what `GET /-/state` answers.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct State {
    #[serde(default)]
    pub keys: Vec<OpenKey>,
    #[serde(default)]
    pub silences: Vec<crate::silence::Silence>,
}

/// An open message key.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct OpenKey {
    pub destination: String,
    pub key: String,
}

/// The open message keys of a simulated engine (`simulate --state`, `check`'s scenarios): what
/// a keyed send does, by [`crate::job::KeyAction::step`], and how it changes them.
#[derive(Debug, Default)]
pub struct KeySim(std::collections::BTreeSet<(String, String)>);

impl KeySim {
    /// Starting with these (destination, key) open.
    pub fn open(keys: impl IntoIterator<Item = (String, String)>) -> KeySim {
        KeySim(keys.into_iter().collect())
    }

    /// The Slack call a send of `id` to `destination` makes; the key is open after it unless
    /// the send closes it.
    pub fn send(&mut self, destination: &str, id: &crate::job::Identity) -> KeyStep {
        let k = (destination.to_string(), id.key.clone());
        let step = id.action.step(self.0.contains(&k));
        if id.action.closes() {
            self.0.remove(&k);
        } else {
            self.0.insert(k);
        }
        step
    }
}

/// Says what each dispatch of `sim` would do, starting from `state` at `now` (unix ms): which
/// are silenced, which post, update, reply or resolve (keys change as the dispatches go, in
/// order), which wait for a digest. Nothing is sent.
pub fn apply_state(rs: &Ruleset, sim: &mut Simulation, state: &State, now: i64) {
    let silences = crate::silence::SilenceSet::new(state.silences.clone(), None);
    let mut keys = KeySim::open(
        state
            .keys
            .iter()
            .map(|k| (k.destination.clone(), k.key.clone())),
    );
    let mut effects = Vec::new();
    for d in &sim.dispatches {
        let key = d.target.identity.as_ref();
        if let Some(id) = silences.silenced(&d.rule, key.map(|k| k.key.as_str()), &sim.data, now) {
            effects.push(format!("silenced (silence {id}): not sent"));
            continue;
        }
        if rs.rules.iter().any(|r| r.id == d.rule && r.group.is_some()) {
            effects.push(
                "held for its group's digest (shown as the digest of this event alone)".into(),
            );
            continue;
        }
        let Some(id) = key else {
            effects.push("posts a new message".into());
            continue;
        };
        let closing = if id.action.closes() {
            " and closes the key"
        } else {
            ""
        };
        effects.push(match keys.send(&d.destination, id) {
            KeyStep::Post => format!("posts a new message as key `{}`", id.key),
            KeyStep::Update => format!("updates the message of key `{}`{closing}", id.key),
            KeyStep::Reply => format!("replies in the thread of key `{}`{closing}", id.key),
        });
    }
    sim.effects = effects;
}

/// Why an event could not be simulated.
#[derive(Debug)]
pub enum SimulateError {
    UnknownSource(String),
    Rejected(Rejection),
    Acknowledged,
}

impl std::fmt::Display for SimulateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SimulateError::UnknownSource(s) => write!(f, "{s}"),
            SimulateError::Rejected(r) => write!(
                f,
                "the source rejects this event ({}): {}",
                r.status(),
                r.reason()
            ),
            SimulateError::Acknowledged => write!(
                f,
                "the source acknowledges this request without routing anything"
            ),
        }
    }
}

/// Finds a source by name, or else the only source of that kind.
pub fn find_source<'a>(
    rs: &'a Ruleset,
    name: &str,
) -> Result<&'a crate::config::SourceEntry, SimulateError> {
    if let Some(s) = rs.sources.get(name) {
        return Ok(s);
    }
    let of_kind: Vec<_> = rs
        .sources
        .values()
        .filter(|s| s.kind.name() == name)
        .collect();
    match of_kind.as_slice() {
        [one] => Ok(one),
        _ => Err(SimulateError::UnknownSource(format!(
            "no source `{name}`; defined: {}",
            rs.sources.keys().cloned().collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Simulates a schedule's tick at `at` (default: its next tick after now). An unknown name
/// gets a did-you-mean.
pub fn simulate_schedule(
    rs: &Ruleset,
    name: &str,
    at: Option<chrono::DateTime<chrono::Utc>>,
    with: &serde_json::Map<String, Value>,
) -> Result<Simulation, SimulateError> {
    let Some(s) = rs.schedules.get(name) else {
        let names: Vec<&str> = rs.schedules.keys().map(String::as_str).collect();
        let hint = match crate::config::diag::did_you_mean(name, names.iter().copied()) {
            Some(m) => format!("did you mean `{m}`?"),
            None if names.is_empty() => "no schedules are defined".to_string(),
            None => format!("defined: {}", names.join(", ")),
        };
        return Err(SimulateError::UnknownSource(format!(
            "no schedule `{name}`; {hint}"
        )));
    };
    let at = match at.or_else(|| s.next_after(chrono::Utc::now())) {
        Some(t) => t,
        None => {
            return Err(SimulateError::UnknownSource(format!(
                "schedule `{name}` has no tick after now; give --at"
            )))
        }
    };
    Ok(simulate_event(rs, &s.tick_event(at), with))
}

/// Decodes a raw body into its envelope with the named source's decoder (`query`).
pub fn envelope_of(rs: &Ruleset, source: &str, req: &Request) -> Result<Event, SimulateError> {
    let src = find_source(rs, source)?;
    match src.source.decode(&src.name, req) {
        Ok(Decoded::Event(ev)) => Ok(*ev),
        Ok(Decoded::Ack) => Err(SimulateError::Acknowledged),
        Err(r) => Err(SimulateError::Rejected(r)),
    }
}

/// Decodes and simulates a raw body. `with` stands in for `with:` query results (by query
/// name); rules whose queries are all given are expanded offline.
pub fn simulate(
    rs: &Ruleset,
    source: &str,
    req: &Request,
    with: &serde_json::Map<String, Value>,
) -> Result<Simulation, SimulateError> {
    let src = find_source(rs, source)?;
    let ev = match src.source.decode(&src.name, req) {
        Ok(Decoded::Event(ev)) => ev,
        Ok(Decoded::Ack) => return Err(SimulateError::Acknowledged),
        Err(r) => return Err(SimulateError::Rejected(r)),
    };
    Ok(simulate_event(rs, &ev, with))
}

/// Replaces expansion dispatches by what the rule sends, when every query has a stand-in; and
/// a grouped rule's item by the digest this event alone would make (one item), so that rule
/// tests and `simulate` show the message a group sends.
pub fn expand_offline(
    rs: &Ruleset,
    ev: &Event,
    dispatches: Vec<Dispatch>,
    with: &serde_json::Map<String, Value>,
) -> Vec<Dispatch> {
    let mut out = Vec::new();
    for d in dispatches {
        if let Ok(Payload::Group(g)) = &d.message {
            if let Some(rule) = rs.rules.iter().find(|r| r.id == d.rule) {
                out.extend(crate::routing::digest(
                    rs,
                    rule,
                    &g.group,
                    vec![g.event.clone()],
                    &d.event_id,
                ));
                continue;
            }
        }
        let is_expand = matches!(d.message, Ok(Payload::Expand(_)));
        let rule = rs.rules.iter().find(|r| r.id == d.rule);
        let all_given = rule.is_some_and(|r| {
            !r.queries.is_empty() && r.queries.iter().all(|q| with.contains_key(&q.name))
        });
        if !(is_expand && all_given) {
            out.push(d);
            continue;
        }
        let results: serde_json::Map<String, Value> = rule
            .map(|r| {
                r.queries
                    .iter()
                    .map(|q| {
                        (
                            q.name.clone(),
                            with.get(&q.name).cloned().unwrap_or(Value::Null),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        match crate::routing::expand(rs, ev, &d.rule, results) {
            Ok(v) => out.extend(v),
            Err(e) => {
                let mut d = d;
                d.message = Err(DispatchError::Render(e.to_string()));
                out.push(d);
            }
        }
    }
    out
}

/// Reads a `--with NAME=FILE.json` stand-in: a list of entities, or a search answer
/// (`{entities: [...]}`).
pub fn read_with(arg: &str) -> Result<(String, Value), String> {
    let (name, file) = arg
        .split_once('=')
        .ok_or_else(|| format!("`{arg}` is not NAME=FILE.json"))?;
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{file} is not JSON: {e}"))?;
    let v = match v.get("entities") {
        Some(e) => e.clone(),
        None => v,
    };
    Ok((name.to_string(), v))
}

/// Simulates a decoded event.
pub fn simulate_event(
    rs: &Ruleset,
    ev: &Event,
    with: &serde_json::Map<String, Value>,
) -> Simulation {
    let mut rules = explain(rs, ev);
    let mut dispatches = expand_offline(rs, ev, route(rs, ev), with);
    if ev.secret {
        for r in &mut rules {
            for t in &mut r.conditions {
                redact_trace(t);
            }
        }
        for d in &mut dispatches {
            if d.message.is_ok() {
                d.message = Ok(Payload::Message(Value::String(
                    "[secret: One-Time Passcode notification, not shown]".into(),
                )));
            }
        }
    }
    Simulation {
        event_type: ev.event_type.clone(),
        event_id: ev.id.clone(),
        source: ev.source.clone(),
        secret: ev.secret,
        rules,
        dispatches,
        effects: Vec::new(),
        data: ev.data.clone(),
    }
}

fn redact_trace(t: &mut Trace) {
    t.saw = "[secret event: values not shown]".into();
    for c in &mut t.children {
        redact_trace(c);
    }
}

/// Human-readable output.
pub fn to_text(sim: &Simulation) -> String {
    let mut s = format!(
        "event {} (id {}) from source `{}`\n",
        sim.event_type, sim.event_id, sim.source
    );
    if sim.secret {
        s.push_str("this event is secret (One-Time Passcode): values are not shown\n");
    }
    s.push_str("\nrules:\n");
    let skipped_by_type = sim
        .rules
        .iter()
        .filter(|r| r.skipped.as_deref().is_some_and(|w| w.starts_with("`on:")))
        .count();
    for r in sim
        .rules
        .iter()
        .filter(|r| !r.skipped.as_deref().is_some_and(|w| w.starts_with("`on:")))
    {
        let mark = if r.matched {
            "✓ matched"
        } else if r.skipped.is_some() {
            "- skipped"
        } else {
            "✗ not matched"
        };
        s.push_str(&format!("  {mark}  {}  ({})\n", r.rule, r.file.display()));
        if let Some(why) = &r.skipped {
            s.push_str(&format!("      {why}\n"));
        }
        for t in &r.conditions {
            trace_text(&mut s, t, 6);
        }
    }
    if skipped_by_type > 0 {
        s.push_str(&format!(
            "  ({skipped_by_type} other rules do not listen to {})\n",
            sim.event_type
        ));
    }
    s.push_str(&format!("\ndispatches: {}\n", sim.dispatches.len()));
    for (i, d) in sim.dispatches.iter().enumerate() {
        let via = if d.destination != d.to {
            format!(" (delivered by `{}`)", d.destination)
        } else {
            String::new()
        };
        s.push_str(&format!("\n→ rule `{}` to `{}`{via}\n", d.rule, d.to));
        let t = serde_json::to_value(&d.target).unwrap_or(Value::Null);
        if t.as_object().is_some_and(|m| !m.is_empty()) {
            s.push_str(&format!("  target: {t}\n"));
        }
        if let Some(e) = sim.effects.get(i) {
            s.push_str(&format!("  with this state: {e}\n"));
        }
        match &d.message {
            Ok(m) => s.push_str(&format!(
                "{}\n",
                serde_json::to_string_pretty(m).unwrap_or_default()
            )),
            Err(DispatchError::Render(e)) => s.push_str(&format!(
                "  RENDER ERROR (would become a dead letter): {e}\n"
            )),
            Err(DispatchError::Refused(e)) => s.push_str(&format!("  REFUSED (not sent): {e}\n")),
        }
    }
    s
}

fn trace_text(s: &mut String, t: &Trace, indent: usize) {
    let mark = if t.holds { "✓" } else { "✗" };
    let saw = if t.saw.is_empty() {
        String::new()
    } else {
        format!("  — {}", t.saw)
    };
    s.push_str(&format!("{:indent$}{mark} {}{saw}\n", "", t.text));
    for c in &t.children {
        trace_text(s, c, indent + 2);
    }
}
