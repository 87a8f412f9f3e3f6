//! Rules: `on`, conditions, `with:` queries, `report:`, `throttle` and `send` steps, compiled
//! into routing's [`Rule`]s.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::diag::{did_you_mean, Diagnostic};
use super::spec::{KeyAs, SendSpec};
use super::yaml::{join_index, join_key};
use super::{parse_duration, DestinationConfig, DestinationKind, Schedule};
use crate::event::EVENT_TYPES;
use crate::job::KeyAction;
use crate::render::{TemplateOrigin, Templates};
use crate::routing::condition;
use crate::routing::{Keyed, Rule, SendStep};

use super::parsed::*;

/// Compiles one rule. `in_order` receives its conditions in `where` order (the rule itself keeps
/// them split into those before and after its `with:` queries), for the envelope checks.
#[allow(clippy::too_many_arguments)]
pub(super) fn compile_rule(
    p: &Parsed,
    r: &super::spec::RuleSpec,
    path: &str,
    dests: &BTreeMap<String, DestinationConfig>,
    schedules: &BTreeMap<String, Schedule>,
    templates: &mut Templates,
    in_order: &mut Vec<condition::Condition>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Rule> {
    let before = diags.len();
    let on = r.on.to_vec();
    if on.is_empty() {
        diags.push(
            p.at(
                Diagnostic::error(
                    "bad-rule",
                    format!("rule `{}` listens to no event type (`on: []`), so it never fires", r.id),
                )
                .hint("name one or more types, e.g. `on: port/entity.updated`, `on: [coder/notification]`, or `port/*`"),
                &join_key(path, "on"),
            ),
        );
    }
    for (i, t) in on.iter().enumerate() {
        let known = EVENT_TYPES.contains(&t.as_str())
            || t.strip_prefix("schedule/")
                .is_some_and(|n| schedules.contains_key(n) || n == "*")
            || t == "*"
            || t.strip_suffix('*')
                .is_some_and(|pre| EVENT_TYPES.iter().any(|e| e.starts_with(pre)));
        if !known {
            let tp = if matches!(r.on, super::spec::OneOrMany::One(_)) {
                join_key(path, "on")
            } else {
                join_index(&join_key(path, "on"), i)
            };
            let hint = did_you_mean(t, EVENT_TYPES.iter().copied())
                .map(|s| format!("did you mean `{s}`?"))
                .unwrap_or_else(|| format!("known types: {}", EVENT_TYPES.join(", ")));
            diags.push(
                p.at(
                    Diagnostic::error("unknown-event-type", format!("unknown event type `{t}`")),
                    &tp,
                )
                .hint(hint),
            );
        }
    }
    let mut conditions = Vec::new();
    let mut after = Vec::new();
    for (i, c) in r.conditions.iter().enumerate() {
        let cp = join_index(&join_key(path, "where"), i);
        let compiled = condition::compile(c);
        if let Ok(c) = &compiled {
            in_order.push(c.clone());
        }
        match compiled {
            Ok(c) if c.reads_member("with") => {
                if r.queries.is_empty() {
                    diags.push(p.at(
                        Diagnostic::error(
                            "bad-condition",
                            "this condition reads `$.with…` but the rule has no `with:` queries",
                        ),
                        &cp,
                    ));
                }
                after.push(c);
            }
            Ok(c) => conditions.push(c),
            Err(e) => diags.push(condition_diag(p, &cp, &e)),
        }
    }
    let mut queries = Vec::new();
    for (name, q) in &r.queries {
        let qp = join_key(&join_key(path, "with"), name);
        if !dests
            .get(&q.port)
            .is_some_and(|d| matches!(d.kind, DestinationKind::Port { .. }))
        {
            diags.push(
                p.at(
                    Diagnostic::error(
                        "unknown-destination",
                        format!("`{}` is not a `port` destination", q.port),
                    )
                    .hint("define `destinations: {name: {port: {client_id, client_secret}}}`"),
                    &join_key(&qp, "port"),
                ),
            );
            continue;
        }
        let timeout = match &q.timeout {
            None => Duration::from_secs(30),
            Some(t) => parse_duration(t).unwrap_or_else(|| {
                diags.push(p.at(
                    Diagnostic::error("bad-value", format!("`{t}` is not a duration")),
                    &join_key(&qp, "timeout"),
                ));
                Duration::from_secs(30)
            }),
        };
        queries.push(crate::routing::Query {
            name: name.clone(),
            port: q.port.clone(),
            blueprint: q.search.blueprint.clone(),
            combinator: q.search.combinator.clone().unwrap_or_else(|| "and".into()),
            rules: q.search.rules.clone(),
            include: q.include.clone(),
            max_pages: q.max_pages.unwrap_or(20).max(1),
            limit: q.limit.unwrap_or(200).clamp(1, 1000),
            timeout,
        });
    }
    let report = match &r.report {
        None => None,
        Some(rep) => {
            let rp = join_key(path, "report");
            let to = rep.to.clone().or_else(|| only_port_destination(dests));
            match to {
                Some(to)
                    if dests
                        .get(&to)
                        .is_some_and(|d| matches!(d.kind, DestinationKind::Port { .. })) =>
                {
                    let mut fields = |which: &str, c: &super::spec::ReportContent| {
                        let mut f = crate::routing::ReportFields::default();
                        for (key, v, slot) in [
                            ("statusLabel", &c.status_label, &mut f.status_label),
                            ("summary", &c.summary, &mut f.summary),
                            ("link", &c.link, &mut f.link),
                        ] {
                            if let Some(text) = v {
                                let name = format!("rule:{}:report:{which}:{key}", r.id);
                                match templates.add_plain(&name, text) {
                                    Ok(()) => *slot = Some(name),
                                    Err(e) => diags.push(p.at(
                                        Diagnostic::error(
                                            "template",
                                            format!("report {which}.{key}: {}", e.message),
                                        ),
                                        &join_key(&join_key(&rp, which), key),
                                    )),
                                }
                            }
                        }
                        f
                    };
                    let success = fields("success", &rep.success);
                    let failure = fields("failure", &rep.failure);
                    Some(crate::routing::Report {
                        to,
                        success,
                        failure,
                    })
                }
                Some(to) => {
                    diags.push(p.at(
                        Diagnostic::error(
                            "unknown-destination",
                            format!("`{to}` is not a `port` destination"),
                        ),
                        &join_key(&rp, "to"),
                    ));
                    None
                }
                None => {
                    diags.push(p.at_key(Diagnostic::error("missing-key", "`report:` needs a `port` destination").hint("add `to: <port destination>`, or define exactly one `port` destination"), &rp));
                    None
                }
            }
        }
    };
    if r.send.is_empty() {
        diags.push(
            p.at(
                Diagnostic::error("bad-rule", format!("rule `{}` has an empty `send`", r.id))
                    .hint("add at least one `- to: <destination>`"),
                &join_key(path, "send"),
            ),
        );
    }
    let names: Vec<&str> = dests.keys().map(String::as_str).collect();
    let mut sends = Vec::new();
    for (i, s) in r.send.iter().enumerate() {
        let sp = join_index(&join_key(path, "send"), i);
        if let Some(step) = compile_send(p, &r.id, s, &sp, dests, &names, templates, diags) {
            sends.push(step);
        }
    }
    let throttle = match &r.throttle {
        None => None,
        Some(t) => {
            let tp = join_key(path, "throttle");
            let window = parse_duration(&t.window);
            if window.is_none() {
                diags.push(
                    p.at(
                        Diagnostic::error("bad-value", format!("`{}` is not a duration", t.window))
                            .hint("e.g. `10m`"),
                        &join_key(&tp, "window"),
                    ),
                );
            }
            let name = format!("rule:{}:throttle", r.id);
            if let Err(e) = templates.add_plain(&name, &t.key) {
                diags.push(p.at(
                    Diagnostic::error("template", format!("throttle key: {}", e.message)),
                    &join_key(&tp, "key"),
                ));
            }
            window.map(|w| (name, w))
        }
    };
    let group = r
        .group
        .as_ref()
        .and_then(|g| compile_group(p, path, &r.id, r, g, templates, diags));
    if group.is_some() {
        // A digest that lists nothing of what it groups is almost always a template written
        // for single events.
        for (i, step) in sends.iter().enumerate() {
            let text = templates.source(&step.template).unwrap_or_default();
            if !(text.contains("items") || text.contains("count") || text.contains("{{>")) {
                diags.push(
                    p.at(
                        Diagnostic::error(
                            "bad-send",
                            format!("rule `{}` is grouped, and this step's message uses neither `items` nor `count`", r.id),
                        ),
                        &join_index(&join_key(path, "send"), i),
                    )
                    .hint("a digest renders over `items` (the grouped events), `count`, `group` and `rule`, e.g. `{{count}} changes: {{#each items}}{{entity.identifier}} {{/each}}`"),
                );
            }
        }
    }
    let window = compile_window(p, &join_key(path, "window"), r.window.as_ref(), diags);
    if diags[before..].iter().any(Diagnostic::is_error) {
        return None;
    }
    Some(Rule {
        window,
        group,
        throttle,
        queries,
        after,
        report,
        id: r.id.clone(),
        description: r.description.clone(),
        on,
        conditions,
        sends,
        stop: r.stop,
        file: p.path.clone(),
    })
}

/// Compiles a rule's `group:`. A grouped rule sends digests, so it takes neither `with:` (its
/// queries would run per match, for messages that are never sent one by one) nor `throttle` (the
/// digest is the rate limit).
fn compile_group(
    p: &Parsed,
    path: &str,
    rule_id: &str,
    r: &super::spec::RuleSpec,
    g: &super::spec::GroupSpec,
    templates: &mut Templates,
    diags: &mut Vec<Diagnostic>,
) -> Option<crate::routing::Group> {
    let gp = join_key(path, "group");
    for (field, present) in [
        ("with", !r.queries.is_empty()),
        ("throttle", r.throttle.is_some()),
    ] {
        if present {
            diags.push(
                p.at_key(
                    Diagnostic::error(
                        "bad-rule",
                        format!("a grouped rule takes no `{field}`: it sends one digest per group"),
                    ),
                    &join_key(path, field),
                )
                .hint("use `group.interval` to say how often a group's digest may go out"),
            );
        }
    }
    let mut duration = |field: &str, v: &Option<String>, default: u64| -> Option<Duration> {
        match v {
            None => Some(Duration::from_secs(default)),
            Some(t) => match parse_duration(t) {
                Some(d) if d <= Duration::from_secs(24 * 3600) => Some(d),
                _ => {
                    diags.push(
                        p.at(
                            Diagnostic::error(
                                "bad-value",
                                format!("`{t}` is not a duration of at most a day"),
                            )
                            .hint("e.g. `30s`, `5m`"),
                            &join_key(&gp, field),
                        ),
                    );
                    None
                }
            },
        }
    };
    let wait = duration("wait", &g.wait, 30);
    let interval = duration("interval", &g.interval, 300);
    let max = g.max.unwrap_or(50);
    if !(1..=1000).contains(&max) {
        diags.push(p.at(
            Diagnostic::error(
                "bad-value",
                format!("`max: {max}`: a digest lists 1 to 1000 items"),
            ),
            &join_key(&gp, "max"),
        ));
        return None;
    }
    let by = match &g.by {
        None => None,
        Some(t) => {
            let name = format!("rule:{rule_id}:group");
            if let Err(e) = templates.add_plain(&name, t) {
                diags.push(p.at(
                    Diagnostic::error("template", format!("group `by`: {}", e.message)),
                    &join_key(&gp, "by"),
                ));
                return None;
            }
            Some(name)
        }
    };
    Some(crate::routing::Group {
        by,
        wait: wait?,
        interval: interval?,
        max: max as usize,
    })
}

pub(super) fn condition_diag(p: &Parsed, cp: &str, e: &condition::ConditionError) -> Diagnostic {
    let code = if e.message.contains("JSONPath") {
        "bad-jsonpath"
    } else if e.message.contains("regular expression") {
        "bad-regex"
    } else {
        "bad-condition"
    };
    let mut d = Diagnostic::error(code, e.message.clone());
    if let Some(h) = &e.hint {
        d = d.hint(h.clone());
    }
    match e.offset {
        Some(off) => {
            let mut pos = p.spans.value(cp);
            // Quoted scalars start one character before their text.
            let quoted = p
                .text
                .as_bytes()
                .get(pos.offset)
                .is_some_and(|b| *b == b'"' || *b == b'\'');
            let shift = off + usize::from(quoted);
            pos.column += shift;
            pos.offset += shift;
            pos.len = e.len;
            d.at(&p.path, pos)
        }
        None => {
            let sub = format!("{cp}{}", e.subpath);
            if e.subpath.starts_with(".") && e.message.starts_with("unknown key") {
                p.at_key(d, &sub)
            } else {
                p.at(d, &sub)
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn compile_send(
    p: &Parsed,
    rule_id: &str,
    s: &SendSpec,
    sp: &str,
    dests: &BTreeMap<String, DestinationConfig>,
    names: &[&str],
    templates: &mut Templates,
    diags: &mut Vec<Diagnostic>,
) -> Option<SendStep> {
    let Some(dest) = dests.get(&s.to) else {
        let hint = did_you_mean(&s.to, names.iter().copied())
            .map(|x| format!("did you mean `{x}`?"))
            .unwrap_or_else(|| format!("defined destinations: {}", names.join(", ")));
        diags.push(
            p.at(
                Diagnostic::error(
                    "unknown-destination",
                    format!("destination `{}` does not exist", s.to),
                ),
                &join_key(sp, "to"),
            )
            .hint(hint),
        );
        return None;
    };
    let port = super::acts::port_step(p, s, sp, dest, dests, diags)?;
    if let Some(port) = port {
        return Some(SendStep {
            to: s.to.clone(),
            template: String::new(),
            channel: None,
            user_email: None,
            thread_ts: None,
            reply_broadcast: false,
            for_each: None,
            keyed: None,
            port: Some(port),
        });
    }
    let is_bot = matches!(dest.kind, DestinationKind::Slack { .. });
    for (key, present) in [
        ("channel", s.channel.is_some()),
        ("user_email", s.user_email.is_some()),
        ("thread_ts", s.thread_ts.is_some()),
    ] {
        if present && !is_bot {
            diags.push(
                p.at_key(
                    Diagnostic::error(
                        "bad-send",
                        format!(
                            "`{key}` only applies to `slack` (bot) destinations; `{}` is `{}`",
                            s.to,
                            dest.kind.name()
                        ),
                    ),
                    &join_key(sp, key),
                )
                .hint("an incoming webhook's channel is fixed when it is created"),
            );
        }
    }
    if is_bot && s.channel.is_none() && s.user_email.is_none() {
        diags.push(p.at(
            Diagnostic::error(
                "bad-send",
                format!(
                    "sending to Slack bot destination `{}` needs `channel` or `user_email`",
                    s.to
                ),
            ),
            sp,
        ));
    }
    let template = match (&s.template, &s.blocks) {
        (Some(_), Some(_)) => {
            diags.push(p.at_key(
                Diagnostic::error("bad-send", "give either `template` or `blocks`, not both"),
                &join_key(sp, "blocks"),
            ));
            return None;
        }
        (Some(t), None) => {
            if !templates.has(t) {
                // A template that failed to compile has its own error already.
                if !templates.is_broken(t) {
                    diags.push(missing_template(p, &join_key(sp, "template"), t, templates));
                }
                return None;
            }
            t.clone()
        }
        (None, blocks) => {
            if blocks.is_none() && s.text.is_none() {
                diags.push(p.at(
                    Diagnostic::error(
                        "bad-send",
                        "a send step needs `template`, or inline `blocks`/`text`",
                    ),
                    sp,
                ));
                return None;
            }
            let mut msg = serde_json::Map::new();
            if let Some(b) = blocks {
                msg.insert("blocks".into(), b.clone());
            }
            if let Some(t) = &s.text {
                msg.insert("text".into(), Value::String(t.clone()));
            }
            let name = format!("rule:{rule_id}:{sp}");
            let text = serde_json::to_string(&Value::Object(msg)).unwrap_or_default();
            let origin = TemplateOrigin {
                file: p.path.clone(),
                line_offset: p.spans.value(sp).line,
                inline: true,
            };
            if let Err(e) = templates.add(&name, &text, origin) {
                let at = if s.blocks.is_some() {
                    join_key(sp, "blocks")
                } else {
                    join_key(sp, "text")
                };
                diags.push(p.at(
                    Diagnostic::error("template", format!("inline template: {}", e.message)),
                    &at,
                ));
                return None;
            }
            name
        }
    };
    let mut small = |key: &str, v: &Option<String>| -> Option<String> {
        let v = v.as_ref()?;
        let name = format!("rule:{rule_id}:{sp}:{key}");
        match templates.add_plain(&name, v) {
            Ok(()) => Some(name),
            Err(e) => {
                diags.push(p.at(
                    Diagnostic::error("template", format!("`{key}`: {}", e.message)),
                    &join_key(sp, key),
                ));
                None
            }
        }
    };
    let channel = small("channel", &s.channel);
    let user_email = small("user_email", &s.user_email);
    let thread_ts = small("thread_ts", &s.thread_ts);
    let for_each = small("for_each", &s.for_each);
    let key = small("key", &s.key);
    let identity = keyed(p, s, sp, is_bot, &dest.kind, diags);
    let reply = match (&s.reply, identity.is_some()) {
        (Some(text), true) => {
            let name = format!("rule:{rule_id}:{sp}:reply");
            let body =
                serde_json::to_string(&serde_json::json!({ "text": text })).unwrap_or_default();
            let origin = TemplateOrigin {
                file: p.path.clone(),
                line_offset: p.spans.value(&join_key(sp, "reply")).line,
                inline: true,
            };
            match templates.add(&name, &body, origin) {
                Ok(()) => Some(name),
                Err(e) => {
                    diags.push(p.at(
                        Diagnostic::error("template", format!("`reply`: {}", e.message)),
                        &join_key(sp, "reply"),
                    ));
                    None
                }
            }
        }
        _ => None,
    };
    Some(SendStep {
        to: s.to.clone(),
        template,
        channel,
        user_email,
        thread_ts,
        reply_broadcast: s.reply_broadcast,
        for_each,
        keyed: match (identity, key) {
            (Some((action, ttl)), Some(key)) => Some(Keyed {
                key,
                action,
                ttl,
                reply,
                buttons: s.buttons.as_ref().and_then(|b| buttons(p, sp, b, diags)),
            }),
            _ => None,
        },
        port: None,
    })
}

/// A send step's message identity settings (`key`, `as`, `reply`, `key_ttl`), checked: a key
/// needs a `slack` bot destination (an incoming webhook returns no message `ts`, so its
/// messages can be neither updated nor threaded), and the others need a key.
fn keyed(
    p: &Parsed,
    s: &SendSpec,
    sp: &str,
    is_bot: bool,
    kind: &DestinationKind,
    diags: &mut Vec<Diagnostic>,
) -> Option<(KeyAction, Duration)> {
    if s.key.is_none() {
        for (field, present) in [
            ("as", s.key_as.is_some()),
            ("reply", s.reply.is_some()),
            ("key_ttl", s.key_ttl.is_some()),
            ("buttons", s.buttons.is_some()),
        ] {
            if present {
                diags.push(
                    p.at_key(
                        Diagnostic::error(
                            "bad-send",
                            format!(
                                "`{field}` acts on a keyed message, and this step has no `key`"
                            ),
                        ),
                        &join_key(sp, field),
                    )
                    .hint("name the message with `key: \"health:{{entity.identifier}}\"`"),
                );
            }
        }
        return None;
    }
    if !is_bot {
        diags.push(
            p.at_key(
                Diagnostic::error(
                    "bad-send",
                    format!(
                        "`key` needs a `slack` (bot) destination; `{}` is `{}`",
                        s.to,
                        kind.name()
                    ),
                ),
                &join_key(sp, "key"),
            )
            .hint("an incoming webhook does not say which message it posted, so that message can be neither updated nor threaded; send through a destination with `slack: {token: ...}`"),
        );
        return None;
    }
    let action = match s.key_as.unwrap_or(KeyAs::Update) {
        KeyAs::Post => KeyAction::Post,
        KeyAs::Update => KeyAction::Update,
        KeyAs::Reply => KeyAction::Reply,
        KeyAs::Resolve => KeyAction::Resolve,
    };
    if s.reply.is_some() && !matches!(action, KeyAction::Update | KeyAction::Resolve) {
        diags.push(
            p.at_key(
                Diagnostic::error(
                    "bad-send",
                    "`reply` follows an update (`as: update` or `as: resolve`); this step already posts or replies",
                ),
                &join_key(sp, "reply"),
            )
            .hint("write the reply as the step's message, or use `as: update` / `as: resolve`"),
        );
    }
    if s.thread_ts.is_some() {
        diags.push(
            p.at_key(
                Diagnostic::error(
                    "bad-send",
                    "`thread_ts` and `key` both say where the message goes; a keyed step threads under its key's message with `as: reply`",
                ),
                &join_key(sp, "thread_ts"),
            ),
        );
    }
    let ttl = match &s.key_ttl {
        None => DEFAULT_KEY_TTL,
        Some(t) => match parse_duration(t) {
            Some(d) if d >= Duration::from_secs(60) => d,
            _ => {
                diags.push(
                    p.at(
                        Diagnostic::error(
                            "bad-value",
                            format!("`{t}` is not a duration of a minute or more"),
                        ),
                        &join_key(sp, "key_ttl"),
                    )
                    .hint("e.g. `7d`, `12h`"),
                );
                DEFAULT_KEY_TTL
            }
        },
    };
    Some((action, ttl))
}

/// A keyed step's built-in buttons, checked.
fn buttons(
    p: &Parsed,
    sp: &str,
    b: &super::spec::ButtonsSpec,
    diags: &mut Vec<Diagnostic>,
) -> Option<crate::routing::Buttons> {
    use super::spec::ButtonKind;
    let bp = join_key(sp, "buttons");
    let snooze = if b.actions.contains(&ButtonKind::Snooze) {
        let t = b.snooze.as_deref().unwrap_or("1h");
        match parse_duration(t) {
            Some(d) if d >= Duration::from_secs(60) && d <= Duration::from_secs(7 * 24 * 3600) => {
                Some(d)
            }
            _ => {
                diags.push(p.at(
                    Diagnostic::error(
                        "bad-value",
                        format!("`{t}`: a snooze lasts from a minute to 7 days"),
                    ),
                    &join_key(&bp, "snooze"),
                ));
                return None;
            }
        }
    } else {
        None
    };
    for (i, u) in b.allow.iter().enumerate() {
        let is_id = u.len() > 1
            && (u.starts_with('U') || u.starts_with('W'))
            && u.chars().all(|c| c.is_ascii_alphanumeric());
        let is_email = u
            .split_once('@')
            .is_some_and(|(a, d)| !a.is_empty() && d.contains('.'));
        let ok = is_id || is_email;
        if !ok {
            diags.push(
                p.at(
                    Diagnostic::error("bad-value", format!("`{u}` is neither a Slack user id nor an email")),
                    &join_index(&join_key(&bp, "allow"), i),
                )
                .hint("user ids start with U or W (Slack: profile → ⋮ → Copy member ID); an email is looked up with users.lookupByEmail"),
            );
        }
    }
    if b.actions.is_empty() {
        diags.push(p.at(
            Diagnostic::error("bad-value", "`buttons.actions` is empty"),
            &join_key(&bp, "actions"),
        ));
        return None;
    }
    Some(crate::routing::Buttons {
        acknowledge: b.actions.contains(&ButtonKind::Acknowledge),
        snooze,
        allow: b.allow.clone(),
    })
}

/// How long a key is remembered after its last use, unless `key_ttl` says otherwise.
const DEFAULT_KEY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
