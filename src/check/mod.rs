//! `switchyard check`: everything that can be verified without sending anything.
//!
//! Loads the directory (parse, `${VAR}`, unknown keys, JSONPaths, regexes, references,
//! templates), then runs every rule test through the real decoder and [`route`], renders each
//! message the test reaches, checks it against Slack's Block Kit limits, and compares the
//! dispatches with the test's expectations.

mod scenario;

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::config::blueprints::sample_entity;
use crate::config::diag::Diagnostic;
use crate::config::yaml::Pos;
use crate::config::{load_dir, DestinationKind, LoadOptions, RuleTest, Ruleset, TestInput};
use crate::envelope::Shape;
use crate::event::Event;
use crate::job::Payload;
use crate::render::blockkit;
use crate::render::inspect::FindingKind;
use crate::routing::{route, Dispatch, DispatchError};
use crate::sources::{Decoded, Request};

/// The outcome of `check`.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub valid: bool,
    pub rules: usize,
    pub sources: usize,
    pub destinations: usize,
    pub templates: usize,
    pub tests_run: usize,
    pub tests_passed: usize,
    pub diagnostics: Vec<Diagnostic>,
}

/// Runs `check` on a directory. The ruleset is returned when it loaded (even if tests failed).
pub fn run(dir: &Path, opts: &LoadOptions) -> (Option<Ruleset>, CheckReport) {
    let (rs, mut diags) = load_dir(dir, opts);
    let mut report = CheckReport {
        valid: false,
        rules: 0,
        sources: 0,
        destinations: 0,
        templates: 0,
        tests_run: 0,
        tests_passed: 0,
        diagnostics: Vec::new(),
    };
    if let Some(rs) = &rs {
        report.rules = rs.rules.len();
        report.sources = rs.sources.len();
        report.destinations = rs.destinations.len();
        report.templates = rs.templates.names().count();
        for t in &rs.tests {
            report.tests_run += 1;
            let before = diags.iter().filter(|d| d.is_error()).count();
            run_test(rs, t, &mut diags);
            if diags.iter().filter(|d| d.is_error()).count() == before {
                report.tests_passed += 1;
            }
        }
    }
    if let Some(rs) = &rs {
        for sc in &rs.scenarios {
            report.tests_run += 1;
            let before = diags.iter().filter(|d| d.is_error()).count();
            scenario::run(rs, sc, &mut diags);
            if diags.iter().filter(|d| d.is_error()).count() == before {
                report.tests_passed += 1;
            }
        }
    }
    report.valid = rs.is_some() && !diags.iter().any(Diagnostic::is_error);
    report.diagnostics = diags;
    (rs, report)
}

/// The event a test feeds in: a webhook through its source's real decoder, or a schedule tick.
pub(crate) fn test_event(rs: &Ruleset, t: &RuleTest, diags: &mut Vec<Diagnostic>) -> Option<Event> {
    let fail = |msg: String| {
        Diagnostic::error("test-failed", format!("test `{}` failed: {msg}", t.name))
            .at(&t.file, t.pos)
    };
    let (source, body, headers) = match &t.input {
        TestInput::Tick { schedule, at } => {
            return rs.schedules.get(schedule).map(|s| s.tick_event(*at));
        }
        TestInput::Webhook {
            source,
            body,
            headers,
        } => (source, body, headers),
    };
    let src = rs.sources.get(source)?;
    let req = Request {
        headers: headers.clone().into(),
        body,
        path_token: None,
        signed: None,
    };
    match src.source.decode(source, &req) {
        Ok(Decoded::Event(ev)) => Some(*ev),
        Ok(Decoded::Ack) => {
            if !t.expect.is_empty() {
                diags.push(fail(
                    "the source acknowledges this request without routing it".into(),
                ));
            }
            None
        }
        Err(r) => {
            diags.push(fail(format!(
                "the `{source}` source rejects the event ({}): {}",
                r.status(),
                r.reason()
            )));
            None
        }
    }
}

fn run_test(rs: &Ruleset, t: &RuleTest, diags: &mut Vec<Diagnostic>) {
    let fail = |msg: String| {
        Diagnostic::error("test-failed", format!("test `{}` failed: {msg}", t.name))
            .at(&t.file, t.pos)
    };
    let Some(ev) = test_event(rs, t, diags) else {
        return;
    };
    let routed = route(rs, &ev);
    // Rules behind `with:` queries: rendered with the test's stand-ins when it gives them all,
    // else probed with an empty result and a one-entity sample, so that their templates are
    // checked too.
    for d in &routed {
        if matches!(d.message, Ok(Payload::Expand(_))) {
            probe_queries(rs, t, &ev, &d.rule, diags);
        }
    }
    let dispatches = crate::simulate::expand_offline(rs, &ev, routed, &t.with);
    let mut shape_data = ev.data.clone();
    if let Value::Object(m) = &mut shape_data {
        m.insert("with".into(), Value::Object(t.with.clone()));
        m.insert("item".into(), Value::Null);
    }
    let event_shape = Shape::of_value(&shape_data);
    let mut actual = Vec::new();
    for d in &dispatches {
        match &d.message {
            Ok(payload) => {
                let checked = payload.message().map(blockkit::check).unwrap_or_default();
                for v in checked {
                    let mut diag = Diagnostic::error(
                        "block-kit-limit",
                        format!("template `{}` rendered for test `{}`: {} (at {})", d.template, t.name, v.message, v.pointer),
                    )
                    .hint("shorten the text or use {{truncate value N}}; at send time it would be cut with an ellipsis");
                    diag = match rs.templates.origin(&d.template) {
                        Some(o) => diag.at(
                            &o.file,
                            Pos {
                                line: o.line_offset,
                                column: 1,
                                offset: 0,
                                len: 1,
                            },
                        ),
                        None => diag.at(&t.file, t.pos),
                    };
                    diags.push(diag);
                }
                if payload.message().is_some() && !ev.secret {
                    structured_in_strings(rs, t, d, &event_shape, diags);
                }
                check_recipient(rs, t, d, diags);
                actual.push(d);
            }
            Err(DispatchError::Render(reason)) => {
                let mut diag =
                    Diagnostic::error("template", format!("test `{}`: {reason}", t.name));
                // Where in the template it failed, when the renderer says.
                let at = rs
                    .templates
                    .render_message(&d.template, &handlebars::Context::from(ev.data.clone()))
                    .err()
                    .and_then(|e| e.line.zip(e.column));
                diag = match (rs.templates.origin(&d.template), at) {
                    (Some(o), Some((line, column))) if !o.inline => diag.at_line(
                        &o.file,
                        &std::fs::read_to_string(&o.file).unwrap_or_default(),
                        line + o.line_offset - 1,
                        column,
                    ),
                    (Some(o), _) if !o.inline => diag.in_file(&o.file),
                    _ => diag.at(&t.file, t.pos),
                };
                diags.push(diag);
                actual.push(d);
            }
            Err(DispatchError::Refused(_)) => {}
        }
    }
    let mut got: Vec<(String, String)> = actual
        .iter()
        .map(|d| (d.rule.clone(), d.to.clone()))
        .collect();
    let mut want: Vec<(String, String)> = t
        .expect
        .iter()
        .map(|e| (e.rule.clone(), e.to.clone()))
        .collect();
    got.sort();
    want.sort();
    if got != want {
        let show = |v: &[(String, String)]| {
            if v.is_empty() {
                "nothing".to_string()
            } else {
                v.iter()
                    .map(|(r, d)| format!("{r} → {d}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let hint = match &t.input {
            TestInput::Webhook { source, .. } => format!(
                "run `switchyard simulate --source {source} <event>` to see which conditions held"
            ),
            TestInput::Tick { schedule, .. } => format!(
                "run `switchyard simulate --schedule {schedule}` to see which conditions held"
            ),
        };
        diags.push(fail(format!("expected {}, got {}", show(&want), show(&got))).hint(hint));
        return;
    }
    for (i, e) in t.expect.iter().enumerate() {
        let at = t.expect_pos.get(i).copied().unwrap_or(t.pos);
        let candidates: Vec<&&Dispatch> = actual
            .iter()
            .filter(|d| d.rule == e.rule && d.to == e.to)
            .collect();
        for (key, want) in [
            ("channel", &e.channel),
            ("user_email", &e.user_email),
            ("thread_ts", &e.thread_ts),
            ("key", &e.key),
        ] {
            let Some(want) = want else { continue };
            let have = |d: &Dispatch| match key {
                "channel" => d.target.channel.clone(),
                "user_email" => d.target.user_email.clone(),
                "key" => d.target.identity.as_ref().map(|i| i.key.clone()),
                _ => d.target.thread_ts.clone(),
            };
            if !candidates
                .iter()
                .any(|d| have(d).as_deref() == Some(want.as_str()))
            {
                let got = candidates
                    .first()
                    .and_then(|d| have(d))
                    .map(|g| format!("`{g}`"))
                    .unwrap_or_else(|| "nothing".into());
                diags.push(
                    Diagnostic::error(
                        "test-failed",
                        format!(
                            "test `{}` failed: the message from `{}` to `{}` goes to {key} {got}, not `{want}`",
                            t.name, e.rule, e.to
                        ),
                    )
                    .at(&t.file, at),
                );
            }
        }
        let Some(want_msg) = &e.message else { continue };
        let rendered: Vec<Value> = candidates
            .iter()
            .filter_map(|d| d.message.as_ref().ok())
            .map(|m| m.to_json())
            .collect();
        if rendered.iter().any(|m| contains(m, want_msg)) {
            continue;
        }
        let detail = rendered
            .first()
            .and_then(|m| first_difference(m, want_msg, String::new()))
            .map(|(path, have, want)| {
                let have = have
                    .map(|h| blockkit::truncate_chars(&h.to_string(), 200))
                    .unwrap_or_else(|| "nothing".into());
                format!(
                    "at `{}` the message has {have}, the test expects {}",
                    if path.is_empty() { "(top)" } else { &path },
                    blockkit::truncate_chars(&want.to_string(), 200)
                )
            })
            .unwrap_or_else(|| "it does not contain the expected part".into());
        let got = rendered.first().map(|m| m.to_string()).unwrap_or_default();
        diags.push(
            Diagnostic::error(
                "test-failed",
                format!(
                    "test `{}` failed: the message from `{}` to `{}`: {detail}",
                    t.name, e.rule, e.to
                ),
            )
            .at(&t.file, at)
            .hint(format!("rendered: {}", blockkit::truncate_chars(&got, 400))),
        );
    }
}

/// Renders a deferred rule's sends with each query given an empty result, then a one-entity
/// sample, unless the test gives every result: a template behind `with:` fails here, not
/// first in production.
fn probe_queries(
    rs: &Ruleset,
    t: &RuleTest,
    ev: &Event,
    rule_id: &str,
    diags: &mut Vec<Diagnostic>,
) {
    let Some(rule) = rs.rules.iter().find(|r| r.id == rule_id) else {
        return;
    };
    if rule.queries.iter().all(|q| t.with.contains_key(&q.name)) {
        return;
    }
    for (label, sample) in [
        ("an empty result", false),
        ("a one-entity sample result", true),
    ] {
        let results: serde_json::Map<String, Value> = rule
            .queries
            .iter()
            .map(|q| {
                let v = t.with.get(&q.name).cloned().unwrap_or_else(|| {
                    if sample {
                        serde_json::json!([sample_entity(
                            &q.blueprint,
                            rs.blueprints.get(&q.blueprint)
                        )])
                    } else {
                        Value::Array(Vec::new())
                    }
                });
                (q.name.clone(), v)
            })
            .collect();
        let Ok(out) = crate::routing::expand(rs, ev, rule_id, results) else {
            return;
        };
        for d in out {
            if let Err(DispatchError::Render(reason)) = &d.message {
                let mut diag = Diagnostic::error(
                    "template",
                    format!("test `{}`: rule `{rule_id}` with {label} for its `with:` queries: {reason}", t.name),
                )
                .hint("give the test real results (`with: {name: [..]}` or `{file: ...}`), and guard empty lists with `{{#if list}}`");
                diag = match rs.templates.origin(&d.template) {
                    Some(o) if !o.inline => diag.in_file(&o.file),
                    _ => diag.at(&t.file, t.pos),
                };
                diags.push(diag);
                return;
            }
        }
    }
}

/// An object or list written into a JSON string for this very event is an error: the message
/// would show `[object]`.
fn structured_in_strings(
    rs: &Ruleset,
    t: &RuleTest,
    d: &Dispatch,
    shape: &Shape,
    diags: &mut Vec<Diagnostic>,
) {
    for f in rs.templates.inspect(&d.template, shape) {
        if f.kind != FindingKind::StructuredInString {
            continue;
        }
        let mut diag = Diagnostic::error(
            "template",
            format!(
                "test `{}`: template `{}`: {}",
                t.name, d.template, f.message
            ),
        );
        if let Some(h) = &f.hint {
            diag = diag.hint(h.clone());
        }
        diag = match rs.templates.origin(&f.template) {
            Some(o) if !o.inline => diag.at_line(
                &o.file,
                &std::fs::read_to_string(&o.file).unwrap_or_default(),
                f.line + o.line_offset - 1,
                f.column,
            ),
            _ => diag.at(&t.file, t.pos),
        };
        diags.push(diag);
    }
}

/// A Slack bot send whose rendered recipient is empty or malformed would be a dead letter for
/// this event.
fn check_recipient(rs: &Ruleset, t: &RuleTest, d: &Dispatch, diags: &mut Vec<Diagnostic>) {
    let is_bot = rs
        .destinations
        .get(&d.to)
        .is_some_and(|c| matches!(c.kind, DestinationKind::Slack { .. }));
    if !is_bot {
        return;
    }
    let tg = &d.target;
    let mut problem = None;
    if tg.channel.is_none() && tg.user_email.is_none() {
        problem = Some("its `channel` and `user_email` render empty (at run time: a dead letter, `no channel or user_email`)".to_string());
    } else if let Some(c) = tg.channel.as_deref().filter(|c| !valid_channel(c)) {
        problem = Some(format!("its `channel` renders `{}`, which is neither a channel name (`#ops`) nor an id (`C0123ABC`)", blockkit::truncate_chars(c, 80)));
    } else if let Some(e) = tg.user_email.as_deref().filter(|e| !valid_email(e)) {
        problem = Some(format!(
            "its `user_email` renders `{}`, which is not an email address",
            blockkit::truncate_chars(e, 80)
        ));
    } else if let Some(ts) = tg.thread_ts.as_deref().filter(|ts| !valid_ts(ts)) {
        problem = Some(format!("its `thread_ts` renders `{}`, which is not a Slack message timestamp (`1712345678.123456`)", blockkit::truncate_chars(ts, 80)));
    }
    if let Some(p) = problem {
        diags.push(
            Diagnostic::error(
                "bad-recipient",
                format!("test `{}`: rule `{}` sends to `{}`, but for this event {p}", t.name, d.rule, d.to),
            )
            .at(&t.file, t.pos)
            .hint("check the template's path against the envelope (`switchyard query` or `simulate` show it); assert it with `expect: [{rule, to, user_email: ...}]`"),
        );
    }
}

fn valid_channel(c: &str) -> bool {
    let name = c.strip_prefix('#').unwrap_or(c);
    let id = !c.starts_with('#')
        && c.len() >= 9
        && c.starts_with(['C', 'G', 'D', 'U', 'W'])
        && c.chars()
            .all(|ch| ch.is_ascii_uppercase() || ch.is_ascii_digit());
    let named = !name.is_empty()
        && name.len() <= 80
        && name.chars().all(|ch| {
            ch.is_lowercase()
                || ch.is_ascii_digit()
                || matches!(ch, '-' | '_' | '.')
                || (!ch.is_ascii() && !ch.is_whitespace())
        });
    id || named
}

fn valid_email(e: &str) -> bool {
    match e.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !e.chars().any(char::is_whitespace)
                && !domain.contains('@')
        }
        None => false,
    }
}

fn valid_ts(ts: &str) -> bool {
    match ts.split_once('.') {
        Some((a, b)) => {
            !a.is_empty()
                && !b.is_empty()
                && a.chars().all(|c| c.is_ascii_digit())
                && b.chars().all(|c| c.is_ascii_digit())
        }
        None => false,
    }
}

/// The first place where `have` lacks or differs from `want` (in the sense of [`contains`]):
/// its path (`blocks[0].text.text`), what the message has there, and what the test expects.
pub fn first_difference(
    have: &Value,
    want: &Value,
    path: String,
) -> Option<(String, Option<Value>, Value)> {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => {
            for (k, wv) in w {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match h.get(k) {
                    None => return Some((p, None, wv.clone())),
                    Some(hv) => {
                        if let Some(d) = first_difference(hv, wv, p) {
                            return Some(d);
                        }
                    }
                }
            }
            None
        }
        (Value::Array(h), Value::Array(w)) => {
            for (i, wv) in w.iter().enumerate() {
                let p = format!("{path}[{i}]");
                match h.get(i) {
                    None => return Some((p, None, wv.clone())),
                    Some(hv) => {
                        if let Some(d) = first_difference(hv, wv, p) {
                            return Some(d);
                        }
                    }
                }
            }
            None
        }
        _ if have == want => None,
        _ => Some((path, Some(have.clone()), want.clone())),
    }
}

/// True when `have` contains `want`: objects key by key, lists element by element (a shorter
/// `want` list matches a prefix), scalars by equality.
pub fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| h.get(k).is_some_and(|hv| contains(hv, wv))),
        (Value::Array(h), Value::Array(w)) => {
            w.len() <= h.len() && w.iter().zip(h).all(|(wv, hv)| contains(hv, wv))
        }
        _ => have == want,
    }
}
