//! `switchyard check`: everything that can be verified without sending anything.
//!
//! Loads the directory (parse, `${VAR}`, unknown keys, JSONPaths, regexes, references,
//! templates), then runs every rule test through the real decoder and [`route`], renders each
//! message the test reaches, checks it against Slack's Block Kit limits, and compares the
//! dispatches with the test's expectations.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::config::diag::Diagnostic;
use crate::config::yaml::Pos;
use crate::config::{load_dir, LoadOptions, RuleTest, Ruleset};
use crate::render::blockkit;
use crate::routing::{route, DispatchError};
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
    report.valid = rs.is_some() && !diags.iter().any(Diagnostic::is_error);
    report.diagnostics = diags;
    (rs, report)
}

fn run_test(rs: &Ruleset, t: &RuleTest, diags: &mut Vec<Diagnostic>) {
    let fail = |msg: String| {
        Diagnostic::error("test-failed", format!("test `{}` failed: {msg}", t.name))
            .at(&t.file, t.pos)
    };
    let Some(src) = rs.sources.get(&t.source) else {
        return;
    };
    let req = Request {
        headers: t.headers.clone().into(),
        body: &t.body,
        path_token: None,
        signed: None,
    };
    let ev = match src.source.decode(&t.source, &req) {
        Ok(Decoded::Event(ev)) => ev,
        Ok(Decoded::Ack) => {
            if !t.expect.is_empty() {
                diags.push(fail(
                    "the source acknowledges this request without routing it".into(),
                ));
            }
            return;
        }
        Err(r) => {
            diags.push(fail(format!(
                "the `{}` source rejects the event ({}): {}",
                t.source,
                r.status(),
                r.reason()
            )));
            return;
        }
    };
    let dispatches = route(rs, &ev);
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
                actual.push(d);
            }
            Err(DispatchError::Render(reason)) => {
                let mut diag =
                    Diagnostic::error("template", format!("test `{}`: {reason}", t.name));
                diag = match rs.templates.origin(&d.template) {
                    Some(o) if !o.inline => diag.in_file(&o.file),
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
        diags.push(
            fail(format!("expected {}, got {}", show(&want), show(&got))).hint(format!(
                "run `switchyard simulate --source {} <event>` to see which conditions held",
                t.source
            )),
        );
        return;
    }
    for (i, e) in t.expect.iter().enumerate() {
        let Some(want_msg) = &e.message else { continue };
        let found = actual
            .iter()
            .filter(|d| d.rule == e.rule && d.to == e.to)
            .filter_map(|d| d.message.as_ref().ok())
            .any(|m| contains(&m.to_json(), want_msg));
        if !found {
            let got = actual
                .iter()
                .find(|d| d.rule == e.rule && d.to == e.to)
                .and_then(|d| d.message.as_ref().ok())
                .map(|m| m.to_text())
                .unwrap_or_default();
            diags.push(
                Diagnostic::error("test-failed", format!("test `{}` failed: the message from `{}` to `{}` does not contain the expected part", t.name, e.rule, e.to))
                    .at(&t.file, t.expect_pos.get(i).copied().unwrap_or(t.pos))
                    .hint(format!("rendered: {}", crate::render::blockkit::truncate_chars(&got, 400))),
            );
        }
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
