//! `run:` and `entity:` send steps: a rule acting on Port (protocols.md §7.2) instead of
//! sending a message. Checked here so that `check` refuses what delivery could not do: an
//! operation on anything but a `port` destination, a message on a `port` destination, a
//! template that does not compile, a `notify` that is not a Slack bot.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::diag::Diagnostic;
use super::parsed::Parsed;
use super::spec::{PortEntitySpec, PortRunSpec, SendSpec};
use super::yaml::join_key;
use super::{parse_duration, DestinationConfig, DestinationKind};
use crate::job::FollowSpec;
use crate::routing::{PortStep, PortStepOp, RunAsStep};

/// The default time a run is followed before the thread is told it has not finished.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The default time between two reads of a followed run.
const FOLLOW_POLL: Duration = Duration::from_secs(10);

/// Compiles the step's `run:` or `entity:`. `None` with no diagnostic: the step sends a message.
pub(super) fn port_step(
    p: &Parsed,
    s: &SendSpec,
    sp: &str,
    dest: &DestinationConfig,
    dests: &BTreeMap<String, DestinationConfig>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Option<PortStep>> {
    let is_port = matches!(dest.kind, DestinationKind::Port { .. });
    let field = match (&s.run, &s.entity) {
        (Some(_), Some(_)) => {
            diags.push(p.at_key(
                Diagnostic::error("bad-send", "give either `run` or `entity`, not both"),
                &join_key(sp, "entity"),
            ));
            return None;
        }
        (Some(_), None) => "run",
        (None, Some(_)) => "entity",
        (None, None) if is_port => {
            diags.push(
                p.at(
                    Diagnostic::error(
                        "bad-send",
                        format!(
                            "`{}` is a `port` destination: it runs actions and changes entities, it does not take messages",
                            s.to
                        ),
                    ),
                    sp,
                )
                .hint("add `run: {action: scale_up, entity: \"{{action.value}}\"}` or `entity: {blueprint, identifier, properties}`"),
            );
            return None;
        }
        (None, None) => return Some(None),
    };
    if !is_port {
        diags.push(
            p.at_key(
                Diagnostic::error(
                    "bad-send",
                    format!(
                        "`{field}` acts on Port and needs a `port` destination; `{}` is `{}`",
                        s.to,
                        dest.kind.name()
                    ),
                ),
                &join_key(sp, field),
            )
            .hint("define `destinations: {port: {port: {client_id, client_secret}}}` and send `to:` it"),
        );
        return None;
    }
    let mut bad = false;
    for (key, present) in [
        ("template", s.template.is_some()),
        ("blocks", s.blocks.is_some()),
        ("text", s.text.is_some()),
        ("channel", s.channel.is_some()),
        ("user_email", s.user_email.is_some()),
        ("thread_ts", s.thread_ts.is_some()),
        ("for_each", s.for_each.is_some()),
        ("key", s.key.is_some()),
        ("buttons", s.buttons.is_some()),
    ] {
        if present {
            bad = true;
            diags.push(
                p.at_key(
                    Diagnostic::error(
                        "bad-send",
                        format!(
                            "`{key}` is for messages; this step has `{field}:` and acts on Port"
                        ),
                    ),
                    &join_key(sp, key),
                )
                .hint("send the message in a step of its own"),
            );
        }
    }
    let fp = join_key(sp, field);
    let before = diags.len();
    let op = match (&s.run, &s.entity) {
        (Some(r), _) => run_op(p, r, &fp, diags),
        (_, Some(e)) => Some(entity_op(p, e, &fp, diags)),
        _ => None,
    };
    bad |= diags[before..].iter().any(|d| d.code == "template");
    let (notify_spec, once_spec) = match &s.run {
        Some(r) => (r.notify.clone(), r.once_per.clone()),
        None => (None, None),
    };
    let notify = match notify_spec {
        Some(n) => match dests.get(&n) {
            Some(d) if matches!(d.kind, DestinationKind::Slack { .. }) => Some(n),
            _ => {
                diags.push(p.at(
                    Diagnostic::error(
                        "unknown-destination",
                        format!("`notify: {n}` is not a `slack` (bot) destination"),
                    )
                    .hint("the clicker's answer and the thread's notes go through a bot: `slack: {token: ...}`"),
                    &join_key(&fp, "notify"),
                ));
                None
            }
        },
        None => {
            super::parsed::only_destination(dests, |k| matches!(k, DestinationKind::Slack { .. }))
        }
    };
    let once_per = match once_spec {
        None => Duration::from_secs(60),
        Some(t) => parse_duration(&t).unwrap_or_else(|| {
            diags.push(p.at(
                Diagnostic::error("bad-value", format!("`{t}` is not a duration")),
                &join_key(&fp, "once_per"),
            ));
            Duration::from_secs(60)
        }),
    };
    if bad {
        return None;
    }
    Some(op.map(|op| PortStep {
        op,
        notify,
        once_per,
    }))
}

/// Checks that every template in `v` compiles.
fn templates_ok(p: &Parsed, path: &str, v: &Value, diags: &mut Vec<Diagnostic>) {
    for_each_string(v, &mut |text: &str| {
        if let Err(e) = handlebars::Template::compile(text) {
            diags.push(p.at(
                Diagnostic::error("template", format!("`{path}`: {e}")),
                path,
            ));
        }
    });
}

fn run_op(
    p: &Parsed,
    r: &PortRunSpec,
    fp: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<PortStepOp> {
    let templates_ok =
        |path: &str, v: &Value, diags: &mut Vec<Diagnostic>| templates_ok(p, path, v, diags);
    templates_ok(
        &join_key(fp, "action"),
        &Value::String(r.action.clone()),
        diags,
    );
    if let Some(e) = &r.entity {
        templates_ok(&join_key(fp, "entity"), &Value::String(e.clone()), diags);
    }
    let properties = r
        .properties
        .clone()
        .unwrap_or_else(|| Value::Object(Default::default()));
    if !properties.is_object() {
        diags.push(p.at(
            Diagnostic::error(
                "bad-value",
                "`properties` is the action's inputs: a mapping",
            ),
            &join_key(fp, "properties"),
        ));
        return None;
    }
    templates_ok(&join_key(fp, "properties"), &properties, diags);
    let run_as = match r.run_as.as_deref().map(str::trim) {
        None => None,
        Some("clicker") => Some(RunAsStep::Clicker),
        Some("engine") => Some(RunAsStep::Engine),
        Some(email) if email.contains('@') || email.contains("{{") => {
            templates_ok(
                &join_key(fp, "run_as"),
                &Value::String(email.to_string()),
                diags,
            );
            Some(RunAsStep::Email(email.to_string()))
        }
        Some(other) => {
            diags.push(
                p.at(
                    Diagnostic::error(
                        "bad-value",
                        format!("`run_as: {other}` is not `clicker`, `engine` or an email"),
                    ),
                    &join_key(fp, "run_as"),
                )
                .hint("`clicker` runs it as the person who clicked, with their Port permissions"),
            );
            return None;
        }
    };
    for (i, a) in r.allow.iter().enumerate() {
        let ok = a.contains('@') || (a.starts_with(['U', 'W']) && a.len() > 1);
        if !ok {
            diags.push(p.at(
                Diagnostic::error(
                    "bad-value",
                    format!("`{a}` is neither a Slack user id (`U…`) nor an email"),
                ),
                &super::yaml::join_index(&join_key(fp, "allow"), i),
            ));
        }
    }
    let dur =
        |key: &str, v: &Option<String>, default: Duration, diags: &mut Vec<Diagnostic>| match v
            .as_deref()
        {
            None => Some(default),
            Some("off") => None,
            Some(t) => Some(parse_duration(t).unwrap_or_else(|| {
                diags.push(p.at(
                    Diagnostic::error("bad-value", format!("`{t}` is not a duration (or `off`)")),
                    &join_key(&join_key(fp, "follow"), key),
                ));
                default
            })),
        };
    let (poll, timeout) = match &r.follow {
        None => (Some(FOLLOW_POLL), FOLLOW_TIMEOUT),
        Some(f) => (
            dur("poll", &f.poll, FOLLOW_POLL, diags),
            dur("timeout", &f.timeout, FOLLOW_TIMEOUT, diags).unwrap_or(FOLLOW_TIMEOUT),
        ),
    };
    Some(PortStepOp::Run {
        action: r.action.clone(),
        entity: r.entity.clone(),
        properties,
        run_as,
        allow: r.allow.clone(),
        follow: Some(FollowSpec {
            poll_secs: poll.map(|d| d.as_secs().max(1)),
            timeout_secs: timeout.as_secs().max(1),
        }),
    })
}

fn entity_op(p: &Parsed, e: &PortEntitySpec, fp: &str, diags: &mut Vec<Diagnostic>) -> PortStepOp {
    let mut body = serde_json::Map::new();
    if let Some(t) = &e.title {
        body.insert("title".into(), Value::String(t.clone()));
    }
    for (k, v) in [
        ("team", &e.team),
        ("properties", &e.properties),
        ("relations", &e.relations),
    ] {
        if let Some(v) = v {
            body.insert(k.into(), v.clone());
        }
    }
    let body = Value::Object(body);
    templates_ok(p, fp, &body, diags);
    for (k, v) in [("blueprint", &e.blueprint), ("identifier", &e.identifier)] {
        templates_ok(p, &join_key(fp, k), &Value::String(v.clone()), diags);
    }
    PortStepOp::Entity {
        blueprint: e.blueprint.clone(),
        identifier: e.identifier.clone(),
        body,
        upsert: e.create,
        run_id: e.run_id.clone(),
    }
}

/// Calls `f` on every string leaf holding a template.
fn for_each_string(v: &Value, f: &mut dyn FnMut(&str)) {
    match v {
        Value::String(s) if s.contains("{{") => f(s),
        Value::Array(a) => a.iter().for_each(|x| for_each_string(x, f)),
        Value::Object(m) => m.values().for_each(|x| for_each_string(x, f)),
        _ => {}
    }
}
