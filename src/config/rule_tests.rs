//! Rule tests (`tests:` in rules files) and the checks that need a whole ruleset (a
//! One-Time Passcode may only reach its owner's DM).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::diag::{did_you_mean, Diagnostic};
use super::yaml::{join_index, join_key};
use super::{RuleTest, Ruleset, SourceEntry};

use super::parsed::*;

pub(super) fn load_test(
    p: &Parsed,
    t: &super::spec::TestSpec,
    path: &str,
    sources: &BTreeMap<String, SourceEntry>,
    schedules: &BTreeMap<String, super::Schedule>,
    diags: &mut Vec<Diagnostic>,
) -> Option<RuleTest> {
    let ep = join_key(path, "event");
    let input = match (&t.event.source, &t.event.schedule) {
        (Some(source), None) => webhook_input(p, t, &ep, source, sources, diags)?,
        (None, Some(name)) => tick_input(p, t, &ep, name, schedules, diags)?,
        _ => {
            diags.push(
                p.at(
                    Diagnostic::error(
                        "bad-test",
                        "a test event needs exactly one of `source` (a webhook) or `schedule` (a tick)",
                    ),
                    &ep,
                )
                .hint("e.g. `event: { source: port, file: ../examples/events/x.json }` or `event: { schedule: daily, at: \"2026-01-05T09:00:00Z\" }`"),
            );
            return None;
        }
    };
    let mut with = serde_json::Map::new();
    for (name, w) in &t.with {
        let wp = join_key(&join_key(path, "with"), name);
        let v = match w {
            super::spec::WithResult::Entities(list) => Value::Array(list.clone()),
            super::spec::WithResult::File { file } => {
                let text = read_test_file(p, file, &join_key(&wp, "file"), diags)?;
                match serde_json::from_slice::<Value>(&text) {
                    Ok(v) => match v.get("entities") {
                        Some(e) => e.clone(),
                        None => v,
                    },
                    Err(e) => {
                        diags.push(p.at(
                            Diagnostic::error("bad-test", format!("{file} is not JSON: {e}")),
                            &join_key(&wp, "file"),
                        ));
                        return None;
                    }
                }
            }
        };
        with.insert(name.clone(), v);
    }
    let expect_pos = (0..t.expect.len())
        .map(|i| p.spans.value(&join_index(&join_key(path, "expect"), i)))
        .collect();
    Some(RuleTest {
        name: t.name.clone(),
        file: p.path.clone(),
        pos: p.spans.value(path),
        input,
        with,
        expect: t.expect.clone(),
        expect_pos,
    })
}

/// Loads a scenario: each event step as a rule test named after the scenario and its step.
pub(super) fn load_scenario(
    p: &Parsed,
    sc: &super::spec::ScenarioSpec,
    path: &str,
    sources: &BTreeMap<String, SourceEntry>,
    schedules: &BTreeMap<String, super::Schedule>,
    diags: &mut Vec<Diagnostic>,
) -> Option<super::Scenario> {
    let mut steps = Vec::new();
    let mut ok = true;
    for (i, st) in sc.steps.iter().enumerate() {
        let sp = join_index(&join_key(path, "steps"), i);
        match (&st.event, &st.advance) {
            (Some(ev), None) => {
                let t = super::spec::TestSpec {
                    name: format!("{}, step {}", sc.name, i + 1),
                    event: ev.clone(),
                    expect: st.expect.clone(),
                    with: st.with.clone(),
                };
                match load_test(p, &t, &sp, sources, schedules, diags) {
                    Some(rt) => steps.push(super::ScenarioStep::Event(rt)),
                    None => ok = false,
                }
            }
            (None, Some(by)) => match super::parse_duration(by) {
                Some(d) => steps.push(super::ScenarioStep::Advance {
                    by: d,
                    expect: st.expect.clone(),
                    pos: p.spans.value(&sp),
                }),
                None => {
                    diags.push(
                        p.at(
                            Diagnostic::error("bad-test", format!("`{by}` is not a duration"))
                                .hint("e.g. `advance: 30s`"),
                            &join_key(&sp, "advance"),
                        ),
                    );
                    ok = false;
                }
            },
            _ => {
                diags.push(p.at(
                    Diagnostic::error(
                        "bad-test",
                        "a scenario step is an `event` or an `advance`, not both or neither",
                    ),
                    &sp,
                ));
                ok = false;
            }
        }
    }
    ok.then(|| super::Scenario {
        name: sc.name.clone(),
        file: p.path.clone(),
        pos: p.spans.value(path),
        steps,
    })
}

fn webhook_input(
    p: &Parsed,
    t: &super::spec::TestSpec,
    ep: &str,
    source: &str,
    sources: &BTreeMap<String, SourceEntry>,
    diags: &mut Vec<Diagnostic>,
) -> Option<super::TestInput> {
    if !sources.contains_key(source) {
        let names: Vec<&str> = sources.keys().map(String::as_str).collect();
        let hint = did_you_mean(source, names.iter().copied())
            .map(|x| format!("did you mean `{x}`?"))
            .unwrap_or_else(|| format!("defined sources: {}", names.join(", ")));
        diags.push(
            p.at(
                Diagnostic::error(
                    "unknown-source",
                    format!("source `{source}` does not exist"),
                ),
                &join_key(ep, "source"),
            )
            .hint(hint),
        );
        return None;
    }
    let body = match (&t.event.file, &t.event.body) {
        (Some(f), None) => read_test_file(p, f, &join_key(ep, "file"), diags)?,
        (None, Some(b)) => serde_json::to_vec(b).unwrap_or_default(),
        _ => {
            diags.push(p.at(
                Diagnostic::error(
                    "bad-test",
                    "a test event needs exactly one of `file` or `body`",
                ),
                ep,
            ));
            return None;
        }
    };
    Some(super::TestInput::Webhook {
        source: source.to_string(),
        body,
        headers: t
            .event
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
    })
}

fn tick_input(
    p: &Parsed,
    t: &super::spec::TestSpec,
    ep: &str,
    name: &str,
    schedules: &BTreeMap<String, super::Schedule>,
    diags: &mut Vec<Diagnostic>,
) -> Option<super::TestInput> {
    let Some(s) = schedules.get(name) else {
        let names: Vec<&str> = schedules.keys().map(String::as_str).collect();
        let hint = did_you_mean(name, names.iter().copied())
            .map(|x| format!("did you mean `{x}`?"))
            .unwrap_or_else(|| {
                if names.is_empty() {
                    "no schedules are defined (`schedules:` at the top of a rules file)".to_string()
                } else {
                    format!("defined schedules: {}", names.join(", "))
                }
            });
        diags.push(
            p.at(
                Diagnostic::error(
                    "unknown-schedule",
                    format!("schedule `{name}` does not exist"),
                ),
                &join_key(ep, "schedule"),
            )
            .hint(hint),
        );
        return None;
    };
    let at = match &t.event.at {
        None => s.next_after(chrono::Utc::now()),
        Some(text) => match super::parse_time(text) {
            Some(at) => Some(at),
            None => {
                diags.push(p.at(
                    Diagnostic::error("bad-value", format!("`{text}` is not a time")).hint(
                        "RFC 3339, e.g. `2026-01-05T09:00:00Z` or `2026-01-05T09:00:00+01:00`",
                    ),
                    &join_key(ep, "at"),
                ));
                return None;
            }
        },
    };
    let at = at?;
    Some(super::TestInput::Tick {
        schedule: name.to_string(),
        at,
    })
}

/// Reads a file a test names: beside the rules (inside the rules directory's parent, as
/// `examples/` next to `rules/` is shipped), never elsewhere on the machine, since `check`
/// prints what they render to.
fn read_test_file(p: &Parsed, f: &str, at: &str, diags: &mut Vec<Diagnostic>) -> Option<Vec<u8>> {
    let fp = p.dir.join(f);
    let root = std::fs::canonicalize(&p.dir)
        .ok()
        .and_then(|d| d.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| p.dir.clone());
    let root = root.as_path();
    if fp.exists() && !inside(root, &fp) {
        diags.push(
            p.at(
                Diagnostic::error(
                    "outside",
                    format!(
                        "test file {} leads outside {}; it is not read",
                        fp.display(),
                        root.display()
                    ),
                ),
                at,
            )
            .hint("keep test events next to the rules (e.g. ../examples/events/)"),
        );
        return None;
    }
    match read_bounded(&fp, 4 * 1024 * 1024) {
        Ok(b) => Some(b),
        Err(e) => {
            diags.push(
                p.at(
                    Diagnostic::error(
                        "missing-file",
                        format!("cannot read test file: {}", e.message),
                    ),
                    at,
                )
                .hint("the path is relative to this rules file"),
            );
            None
        }
    }
}

/// A rule that could send a One-Time Passcode anywhere but its owner's DM is an error.
///
/// The check evaluates each rule that covers `coder/notification` against a representative OTP
/// notification: if the rule's conditions let it through, every send step must be a Slack bot
/// DM whose `user_email` renders to the recipient. The engine enforces the same at run time.
pub(super) fn check_secret_routing(rs: &Ruleset, parsed: &[Parsed], diags: &mut Vec<Diagnostic>) {
    let Ok(ev) = crate::sources::coder::decode_value("coder", sample_otp(), None) else {
        return;
    };
    // The same sample as an ordinary event: its render errors with their details (the sample's
    // code is not a secret), for rules that fail to render a passcode notification.
    let mut open = ev.clone();
    open.secret = false;
    let open_dispatches = crate::routing::route(rs, &open);
    for (i, d) in crate::routing::route(rs, &ev).into_iter().enumerate() {
        if let Err(crate::routing::DispatchError::Render(_)) = &d.message {
            let detail = open_dispatches
                .iter()
                .filter(|o| o.rule == d.rule && o.to == d.to)
                .find_map(|o| match &o.message {
                    Err(crate::routing::DispatchError::Render(e)) => Some(e.clone()),
                    _ => None,
                })
                .or_else(|| match open_dispatches.get(i).map(|o| &o.message) {
                    Some(Err(crate::routing::DispatchError::Render(e))) => Some(e.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| "rendering failed".into());
            if let Some((p, idx)) = rule_site(rs, parsed, &d.rule) {
                diags.push(
                    p.at(
                        Diagnostic::error(
                            "otp-render",
                            format!(
                                "rule `{}` fails to render a One-Time Passcode notification for `{}` (at run time it would be a dead letter): {detail}",
                                d.rule, d.to
                            ),
                        ),
                        &join_key(&join_index("rules", idx), "send"),
                    )
                    .hint("a passcode event has no `data` and few labels; guard optional fields with `{{#if}}` or `default`"),
                );
            }
            continue;
        }
        if let Err(crate::routing::DispatchError::Refused(reason)) = &d.message {
            // A destination standing in as a fallback is an operational substitution: judge the
            // rule by what it declares (the engine still refuses at run time while it falls back).
            if d.to != d.destination
                && crate::routing::secret_allowed(rs, &ev.data, &d.to, &d.target).is_ok()
            {
                continue;
            }
            let Some(rule) = rs.rules.iter().find(|r| r.id == d.rule) else {
                continue;
            };
            let Some(p) = parsed.iter().find(|p| p.path == rule.file) else {
                continue;
            };
            let idx = p
                .spec
                .rules
                .iter()
                .position(|r| r.id == d.rule)
                .unwrap_or(0);
            // Point at the step that would leak, not at the rule's first (perhaps safe) step.
            let step = rule
                .sends
                .iter()
                .position(|s| s.to == d.to && s.template == d.template)
                .or_else(|| rule.sends.iter().position(|s| s.to == d.to))
                .unwrap_or(0);
            diags.push(
                p.at(
                    Diagnostic::error("otp-leak", format!("rule `{}` could send One-Time Passcode notifications to `{}`: {reason}", d.rule, d.to)),
                    &join_index(&join_key(&join_index("rules", idx), "send"), step),
                )
                .hint("exclude them (`$.template.id != \"62f86a30-2330-4b61-a26d-311ff3b608cf\"`) or send only `user_email: \"{{user.email}}\"` via a `slack` destination"),
            );
        }
    }
}

/// The parsed file and index of rule `id`.
pub(super) fn rule_site<'a>(
    rs: &Ruleset,
    parsed: &'a [Parsed],
    id: &str,
) -> Option<(&'a Parsed, usize)> {
    let rule = rs.rules.iter().find(|r| r.id == id)?;
    let p = parsed.iter().find(|p| p.path == rule.file)?;
    let idx = p.spec.rules.iter().position(|r| r.id == id).unwrap_or(0);
    Some((p, idx))
}

pub(super) fn sample_otp() -> Value {
    serde_json::json!({
        "_version": "1.1",
        "msg_id": "00000000-0000-0000-0000-000000000000",
        "payload": {
            "_version": "1.1",
            "notification_name": "One-Time Passcode",
            "notification_template_id": crate::sources::coder::OTP_TEMPLATE_ID,
            "user_id": "00000000-0000-0000-0000-000000000001",
            "user_email": "owner@example.com",
            "user_name": "Owner",
            "user_username": "owner",
            "actions": [{"label": "Reset password", "url": "https://coder.example.com/reset-password/change?otp=x&email=owner%40example.com"}],
            "labels": {"one_time_passcode": "x"},
            "data": null,
            "targets": null
        },
        "title": "Reset your password for Coder",
        "title_markdown": "Reset your password for Coder",
        "body": "Use the link below to reset your password.",
        "body_markdown": "Use the link below to reset your password."
    })
}
