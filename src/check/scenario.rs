//! Scenario tests (`scenarios:` in rules files): events and clock steps run in order against one
//! simulated lifecycle state, each step with the dispatches it must make and what each does.
//!
//! The state is what the engine keeps between events: which message keys are open (a keyed
//! send posts, updates, replies or resolves depending on it) and which digest groups hold items
//! (an `advance` that passes a group's `wait`, or `interval` after its last digest, sends the
//! digest). Routing is the engine's own (`route`, `digest`); only delivery is simulated, and a
//! send to Slack always succeeds. Silences, throttles and time windows are not simulated: they
//! depend on state a rules file does not hold.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::config::diag::Diagnostic;
use crate::config::spec::{Does, Expectation};
use crate::config::{Ruleset, Scenario, ScenarioStep};
use crate::job::{KeyStep, Payload};
use crate::routing::{route, Dispatch};

/// A pending group: when its first item came (ms), its items, when its last digest went.
type Pending = (i64, Vec<Value>, Option<i64>);

/// The simulated state.
#[derive(Default)]
struct State {
    /// Open keys.
    keys: crate::simulate::KeySim,
    /// Pending groups: (rule, group) → its items and times.
    groups: BTreeMap<(String, String), Pending>,
    /// The clock, in ms since the scenario's start.
    now: i64,
}

/// One dispatch as the scenario sees it.
struct Seen {
    rule: String,
    to: String,
    key: Option<String>,
    does: Does,
    message: Option<Value>,
}

impl State {
    /// What a dispatch does to the state, and the record of it.
    fn deliver(&mut self, d: &Dispatch) -> Seen {
        let message = d.message.as_ref().ok().and_then(|p| p.message().cloned());
        let key = d.target.identity.as_ref().map(|i| i.key.clone());
        let does = match &d.target.identity {
            None => Does::Post,
            Some(id) => match (self.keys.send(&d.destination, id), id.action.closes()) {
                (KeyStep::Post, _) => Does::Post,
                (KeyStep::Update, true) => Does::Resolve,
                (KeyStep::Update, false) => Does::Update,
                (KeyStep::Reply, _) => Does::Reply,
            },
        };
        Seen {
            rule: d.rule.clone(),
            to: d.to.clone(),
            key,
            does,
            message,
        }
    }

    /// The digests due at `now`.
    fn flush(&mut self, rs: &Ruleset) -> Vec<Dispatch> {
        let mut out = Vec::new();
        let due: Vec<(String, String)> = self
            .groups
            .iter()
            .filter(|((rule, _), (first, _, last))| {
                rs.rules
                    .iter()
                    .find(|r| r.id == *rule)
                    .and_then(|r| r.group.as_ref())
                    .is_some_and(|g| g.due_at(*first, *last) <= self.now)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for (rule_id, group) in due {
            let Some((_, items, last)) = self.groups.get_mut(&(rule_id.clone(), group.clone()))
            else {
                continue;
            };
            let events = std::mem::take(items);
            *last = Some(self.now);
            if let Some(rule) = rs.rules.iter().find(|r| r.id == rule_id) {
                out.extend(crate::routing::digest(rs, rule, &group, events, "scenario"));
            }
        }
        // Empty groups whose interval is over are forgotten, as the engine forgets them.
        self.groups.retain(|_, (_, items, _)| !items.is_empty());
        out
    }
}

/// Runs a scenario; failures are pushed as diagnostics at the failing step.
pub fn run(rs: &Ruleset, sc: &Scenario, diags: &mut Vec<Diagnostic>) {
    let mut st = State::default();
    for (i, step) in sc.steps.iter().enumerate() {
        let (seen, expect, pos) = match step {
            ScenarioStep::Event(t) => {
                let Some(ev) = super::test_event(rs, t, diags) else {
                    return;
                };
                let mut seen = Vec::new();
                let mut others = Vec::new();
                for d in route(rs, &ev) {
                    match &d.message {
                        Ok(Payload::Group(g)) => {
                            let slot = st
                                .groups
                                .entry((g.rule.clone(), g.group.clone()))
                                .or_insert((st.now, Vec::new(), None));
                            if slot.1.is_empty() {
                                slot.0 = st.now;
                            }
                            slot.1.push(g.event.clone());
                            seen.push(Seen {
                                rule: d.rule.clone(),
                                to: d.to.clone(),
                                key: None,
                                does: Does::Group,
                                message: None,
                            });
                        }
                        _ => others.push(d),
                    }
                }
                for d in crate::simulate::expand_offline(rs, &ev, others, &t.with) {
                    if d.message.is_ok() {
                        seen.push(st.deliver(&d));
                    }
                }
                (seen, &t.expect, t.pos)
            }
            ScenarioStep::Advance { by, expect, pos } => {
                st.now += by.as_millis() as i64;
                let digests = st.flush(rs);
                let seen = digests
                    .iter()
                    .filter(|d| d.message.is_ok())
                    .map(|d| st.deliver(d))
                    .collect();
                (seen, expect, *pos)
            }
        };
        if let Err(why) = compare(&seen, expect) {
            diags.push(
                Diagnostic::error(
                    "test-failed",
                    format!("scenario `{}` failed at step {}: {why}", sc.name, i + 1),
                )
                .at(&sc.file, pos)
                .hint("`switchyard simulate` shows what one event does; a scenario adds the state between events"),
            );
            return;
        }
    }
}

fn show(rule: &str, to: &str, does: Option<Does>) -> String {
    match does {
        Some(d) => format!("{rule} → {to} ({})", format!("{d:?}").to_lowercase()),
        None => format!("{rule} → {to}"),
    }
}

/// Matches every expectation to a distinct dispatch, and every dispatch to an expectation.
fn compare(seen: &[Seen], expect: &[Expectation]) -> Result<(), String> {
    let got = || {
        if seen.is_empty() {
            "nothing".to_string()
        } else {
            seen.iter()
                .map(|s| show(&s.rule, &s.to, Some(s.does)))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let mut used = vec![false; seen.len()];
    for e in expect {
        let hit = seen.iter().enumerate().position(|(i, s)| {
            !used[i]
                && s.rule == e.rule
                // An item held for a digest has no destination yet: any `to` names it.
                && (s.to == e.to || s.does == Does::Group)
                && e.does.is_none_or(|d| d == s.does)
                && e.key.as_ref().is_none_or(|k| s.key.as_ref() == Some(k))
                && e.message.as_ref().is_none_or(|m| {
                    s.message
                        .as_ref()
                        .is_some_and(|have| super::contains(have, m))
                })
        });
        match hit {
            Some(i) => used[i] = true,
            None => {
                return Err(format!(
                    "expected {}{}, got {}",
                    show(&e.rule, &e.to, e.does),
                    if e.message.is_some() {
                        " with that message"
                    } else {
                        ""
                    },
                    got()
                ))
            }
        }
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(format!(
            "{} was not expected (got {})",
            show(&seen[i].rule, &seen[i].to, Some(seen[i].does)),
            got()
        ));
    }
    Ok(())
}
