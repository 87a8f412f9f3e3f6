//! Template helpers. Handlebars' built-ins (`if`, `each`, `with`, `eq`, `ne`, `gt`, `gte`,
//! `lt`, `lte`, `and`, `or`, `not`, `len`) are kept; these add what message authors need.
//!
//! Value helpers return JSON values, so they compose as sub-expressions
//! (`{{#each (changed_properties before after)}}`) and their output is escaped like any value.
//! `json`, `raw_json` and `plain` write directly and do their own escaping.

use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, RenderContext, RenderError,
    RenderErrorReason, ScopedJson,
};
use serde_json::{json, Value};

use super::{escape_json, escape_mrkdwn};

type ValueFn = fn(&[Value]) -> Result<Value, String>;

struct ValueHelper {
    name: &'static str,
    f: ValueFn,
}

impl HelperDef for ValueHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, RenderError> {
        let args: Vec<Value> = h.params().iter().map(|p| p.value().clone()).collect();
        (self.f)(&args)
            .map(ScopedJson::Derived)
            .map_err(|e| RenderErrorReason::Other(format!("{}: {e}", self.name)).into())
    }
}

/// A helper that writes its own output, already escaped as it needs (no escape function on top).
struct RawHelper(fn(&Value) -> String);

impl HelperDef for RawHelper {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let v = h.param(0).map(|p| p.value().clone()).unwrap_or(Value::Null);
        out.write(&(self.0)(&v))?;
        Ok(())
    }
}

/// `{{json v}}`: a whole JSON value, with `& < >` escaped inside its strings.
fn write_json(v: &Value) -> String {
    serde_json::to_string(&map_strings(v.clone(), &|s| escape_mrkdwn(s)))
        .unwrap_or_else(|_| "null".into())
}

/// `{{raw_json v}}`: a whole JSON value as it is.
fn write_raw_json(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// `{{plain v}}`: JSON-string-escaped only.
fn write_plain(v: &Value) -> String {
    escape_json(&to_text(v))
}

/// `{{mrkdwn v}}`: CommonMark (Coder's `*_markdown`) as Slack mrkdwn: `**b**` → `*b*`,
/// `[t](u)` → `<u|t>`, backslash escapes resolved, `& < >` escaped elsewhere; JSON-escaped.
fn write_mrkdwn(v: &Value) -> String {
    escape_json(&markdown_to_mrkdwn(&to_text(v)))
}

/// Converts a small subset of CommonMark to Slack mrkdwn, escaping everything else.
pub fn markdown_to_mrkdwn(md: &str) -> String {
    let chars: Vec<char> = md.chars().collect();
    let mut out = String::with_capacity(md.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' && i + 1 < chars.len() && chars[i + 1].is_ascii_punctuation() {
            out.push_str(&escape_mrkdwn(&chars[i + 1].to_string()));
            i += 2;
            continue;
        }
        if c == '*' && chars.get(i + 1) == Some(&'*') {
            out.push('*');
            i += 2;
            continue;
        }
        if c == '[' {
            // [text](url)
            if let Some(close) = chars[i + 1..]
                .iter()
                .position(|&x| x == ']')
                .map(|p| p + i + 1)
            {
                if chars.get(close + 1) == Some(&'(') {
                    if let Some(end) = chars[close + 2..]
                        .iter()
                        .position(|&x| x == ')')
                        .map(|p| p + close + 2)
                    {
                        let text: String = chars[i + 1..close].iter().collect();
                        let url: String = chars[close + 2..end].iter().collect();
                        out.push_str(&format!(
                            "<{}|{}>",
                            escape_mrkdwn(&url),
                            escape_mrkdwn(&text.replace('|', "¦"))
                        ));
                        i = end + 1;
                        continue;
                    }
                }
            }
        }
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            _ => out.push(c),
        }
        i += 1;
    }
    out
}

fn map_strings(v: Value, f: &dyn Fn(&str) -> String) -> Value {
    match v {
        Value::String(s) => Value::String(f(&s)),
        Value::Array(a) => Value::Array(a.into_iter().map(|x| map_strings(x, f)).collect()),
        Value::Object(m) => {
            Value::Object(m.into_iter().map(|(k, x)| (k, map_strings(x, f))).collect())
        }
        other => other,
    }
}

/// How a value reads as text: strings as they are, null as empty, the rest as JSON.
pub fn to_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Cuts `s` to `max` characters, with an ellipsis when cut.
pub fn clip(s: &str, max: usize) -> String {
    super::blockkit::truncate_chars(s, max)
}

fn arg(args: &[Value], i: usize) -> &Value {
    static NULL: Value = Value::Null;
    args.get(i).unwrap_or(&NULL)
}

fn h_default(a: &[Value]) -> Result<Value, String> {
    let v = arg(a, 0);
    let empty = v.is_null() || v.as_str().is_some_and(str::is_empty);
    Ok(if empty { arg(a, 1).clone() } else { v.clone() })
}

fn h_truncate(a: &[Value]) -> Result<Value, String> {
    let n = arg(a, 1)
        .as_u64()
        .ok_or("the second argument is a length")? as usize;
    Ok(Value::String(clip(&to_text(arg(a, 0)), n)))
}

fn h_upper(a: &[Value]) -> Result<Value, String> {
    Ok(Value::String(to_text(arg(a, 0)).to_uppercase()))
}

fn h_lower(a: &[Value]) -> Result<Value, String> {
    Ok(Value::String(to_text(arg(a, 0)).to_lowercase()))
}

fn h_join(a: &[Value]) -> Result<Value, String> {
    let sep = a.get(1).map(to_text).unwrap_or_else(|| ", ".into());
    Ok(Value::String(match arg(a, 0) {
        Value::Array(items) => items.iter().map(to_text).collect::<Vec<_>>().join(&sep),
        Value::Object(m) => m.keys().cloned().collect::<Vec<_>>().join(&sep),
        other => to_text(other),
    }))
}

/// `{{date ts "%Y-%m-%d %H:%M"}}`: RFC 3339 text or epoch seconds/milliseconds, shown in UTC.
fn h_date(a: &[Value]) -> Result<Value, String> {
    use chrono::{DateTime, Utc};
    let fmt = a
        .get(1)
        .and_then(Value::as_str)
        .unwrap_or("%Y-%m-%d %H:%M UTC");
    let t: Option<DateTime<Utc>> = match arg(a, 0) {
        Value::String(s) => DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|d| d.with_timezone(&Utc))
            .or_else(|| s.parse::<i64>().ok().and_then(epoch)),
        Value::Number(n) => n.as_i64().and_then(epoch),
        Value::Null => return Ok(Value::String(String::new())),
        _ => None,
    };
    let Some(t) = t else {
        return Ok(Value::String(to_text(arg(a, 0))));
    };
    let mut out = String::new();
    use std::fmt::Write;
    if write!(out, "{}", t.format(fmt)).is_err() {
        return Err(format!("invalid date format `{fmt}`"));
    }
    Ok(Value::String(out))
}

fn epoch(n: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    if n.abs() > 100_000_000_000 {
        chrono::DateTime::from_timestamp_millis(n)
    } else {
        chrono::DateTime::from_timestamp(n, 0)
    }
}

/// `(changed_properties before after)`: `[{name, before, after}]` for every property that
/// differs between two entity objects (their `properties`, or the objects themselves).
fn h_changed_properties(a: &[Value]) -> Result<Value, String> {
    let props = |v: &Value| -> serde_json::Map<String, Value> {
        match v.get("properties") {
            Some(Value::Object(m)) => m.clone(),
            _ => v.as_object().cloned().unwrap_or_default(),
        }
    };
    let (b, af) = (props(arg(a, 0)), props(arg(a, 1)));
    let mut names: Vec<&String> = b.keys().chain(af.keys()).collect();
    names.sort();
    names.dedup();
    let out: Vec<Value> = names
        .into_iter()
        .filter_map(|n| {
            let (x, y) = (
                b.get(n).unwrap_or(&Value::Null),
                af.get(n).unwrap_or(&Value::Null),
            );
            (x != y).then(|| json!({"name": n, "before": x, "after": y}))
        })
        .collect();
    Ok(Value::Array(out))
}

/// Port's default scorecard levels, most basic first.
const DEFAULT_LEVELS: [&str; 4] = ["Basic", "Bronze", "Silver", "Gold"];

/// Level order from an optional argument: a list of names, or a scorecard (`{levels: [{title}]}`).
fn levels_of(v: &Value) -> Vec<String> {
    let list = v.get("levels").unwrap_or(v);
    match list.as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .filter_map(|l| {
                l.as_str()
                    .or_else(|| l["title"].as_str())
                    .map(str::to_string)
            })
            .collect(),
        _ => DEFAULT_LEVELS.iter().map(|s| s.to_string()).collect(),
    }
}

fn rank(levels: &[String], l: &Value) -> usize {
    l.as_str()
        .and_then(|l| levels.iter().position(|x| x == l))
        .unwrap_or(levels.len())
}

/// The rules of `entity`'s scorecard that do not pass, most basic level first.
fn failing(entity: &Value, scorecard: &str, levels: &[String]) -> Vec<Value> {
    let mut out: Vec<Value> = entity["scorecards"][scorecard]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["status"].as_str() != Some("SUCCESS"))
        .map(|r| json!({"identifier": r["identifier"], "level": r["level"]}))
        .collect();
    out.sort_by_key(|r| {
        (
            rank(levels, &r["level"]),
            r["identifier"].as_str().unwrap_or("").to_string(),
        )
    });
    out
}

/// `(failing_rules entity "ProductionReadiness" [levels])`.
fn h_failing_rules(a: &[Value]) -> Result<Value, String> {
    let sc = arg(a, 1)
        .as_str()
        .ok_or("the second argument is the scorecard identifier")?;
    Ok(Value::Array(failing(arg(a, 0), sc, &levels_of(arg(a, 2)))))
}

/// `(scorecard_teams entities "ProductionReadiness" [levels])`: the entities with failing
/// rules, grouped by owning team: `[{team, services: [{identifier, title, level, failing,
/// next}]}]`, where `next` are the failing rules of the lowest level (what to fix first).
fn h_scorecard_teams(a: &[Value]) -> Result<Value, String> {
    let sc = arg(a, 1)
        .as_str()
        .ok_or("the second argument is the scorecard identifier")?;
    let levels = levels_of(arg(a, 2));
    let mut teams: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    for e in arg(a, 0).as_array().into_iter().flatten() {
        let fails = failing(e, sc, &levels);
        if fails.is_empty() {
            continue;
        }
        let lowest = rank(&levels, &fails[0]["level"]);
        let next: Vec<Value> = fails
            .iter()
            .filter(|r| rank(&levels, &r["level"]) == lowest)
            .cloned()
            .collect();
        let service = json!({
            "identifier": e["identifier"],
            "title": if e["title"].is_null() { e["identifier"].clone() } else { e["title"].clone() },
            "level": e["scorecards"][sc]["level"],
            "failing": fails,
            "next": next,
        });
        let owners: Vec<String> = e["team"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let owners = if owners.is_empty() {
            vec!["unassigned".to_string()]
        } else {
            owners
        };
        for t in owners {
            teams.entry(t).or_default().push(service.clone());
        }
    }
    Ok(Value::Array(
        teams
            .into_iter()
            .map(|(team, mut services)| {
                services.sort_by_key(|s| {
                    (
                        rank(&levels, &s["level"]),
                        s["identifier"].as_str().unwrap_or("").to_string(),
                    )
                });
                json!({"team": team, "count": services.len(), "services": services})
            })
            .collect(),
    ))
}

/// `(by_level services [levels])`: `[{level, services}]`, most basic level first.
fn h_by_level(a: &[Value]) -> Result<Value, String> {
    let levels = levels_of(arg(a, 1));
    let mut groups: Vec<(usize, String, Vec<Value>)> = Vec::new();
    for s in arg(a, 0).as_array().into_iter().flatten() {
        let name = s["level"].as_str().unwrap_or("unknown").to_string();
        match groups.iter_mut().find(|g| g.1 == name) {
            Some(g) => g.2.push(s.clone()),
            None => groups.push((rank(&levels, &s["level"]), name, vec![s.clone()])),
        }
    }
    groups.sort_by_key(|g| g.0);
    Ok(Value::Array(
        groups
            .into_iter()
            .map(|(_, level, services)| json!({"level": level, "services": services}))
            .collect(),
    ))
}

pub(super) fn register(hb: &mut Handlebars<'static>) {
    let value_helpers: &[(&'static str, ValueFn)] = &[
        ("default", h_default),
        ("truncate", h_truncate),
        ("upper", h_upper),
        ("lower", h_lower),
        ("join", h_join),
        ("date", h_date),
        ("changed_properties", h_changed_properties),
        ("failing_rules", h_failing_rules),
        ("scorecard_teams", h_scorecard_teams),
        ("by_level", h_by_level),
    ];
    for (name, f) in value_helpers {
        hb.register_helper(name, Box::new(ValueHelper { name, f: *f }));
    }
    hb.register_helper("json", Box::new(RawHelper(write_json)));
    hb.register_helper("raw_json", Box::new(RawHelper(write_raw_json)));
    hb.register_helper("plain", Box::new(RawHelper(write_plain)));
    hb.register_helper("mrkdwn", Box::new(RawHelper(write_mrkdwn)));
}

#[cfg(test)]
mod tests {
    use crate::render::{TemplateOrigin, Templates};
    use handlebars::Context;
    use serde_json::json;

    fn render(tpl: &str, data: serde_json::Value) -> String {
        let mut t = Templates::new();
        t.add(
            "t",
            tpl,
            TemplateOrigin {
                file: "t".into(),
                line_offset: 1,
                inline: false,
            },
        )
        .unwrap();
        t.render_text("t", &Context::from(data)).unwrap()
    }

    #[test]
    fn scorecard_helpers_group_the_fixture_services() {
        let page: serde_json::Value = serde_json::from_slice(
            &std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/port/entities-search-response.json"
            ))
            .unwrap(),
        )
        .unwrap();
        let out = render(
            "{{#each (scorecard_teams entities \"ProductionReadiness\")}}{{team}}:{{#each services}}{{identifier}}({{level}};next={{#each next}}{{identifier}}{{/each}}){{/each}};{{/each}}",
            page,
        );
        // Five services not at Gold with unmet rules: two per team except payments (one).
        assert_eq!(
            out,
            "payments:payments-ledger(Bronze;next=has-slo);platform:platform-auth(Basic;next=has-ownerhas-readme)platform-gateway(Bronze;next=has-oncallhas-slo);search:search-indexer(Basic;next=has-readme)search-api(Silver;next=has-runbook);"
        );
    }

    #[test]
    fn helpers_work() {
        assert_eq!(render("{{default x \"n/a\"}}", json!({})), "n/a");
        assert_eq!(render("{{default x \"n/a\"}}", json!({"x": "v"})), "v");
        assert_eq!(
            render("{{truncate s 5}}", json!({"s": "abcdefgh"})),
            "abcd…"
        );
        assert_eq!(
            render("{{upper s}}/{{lower s}}", json!({"s": "Ab"})),
            "AB/ab"
        );
        assert_eq!(render("{{join l \", \"}}", json!({"l": ["a", 1]})), "a, 1");
        assert_eq!(
            render(
                "{{date t \"%Y-%m-%d %H:%M\"}}",
                json!({"t": "2026-09-21T17:00:03+02:00"})
            ),
            "2026-09-21 15:00"
        );
        assert_eq!(
            render("{{date t}}", json!({"t": 1790000000})),
            "2026-09-21 14:13 UTC"
        );
        assert_eq!(render("{{#if (eq a 1)}}y{{/if}}{{#if (gt a 0)}}g{{/if}}{{#if (ne a 2)}}n{{/if}}{{#if (lt a 2)}}l{{/if}}", json!({"a": 1})), "ygnl");
        assert_eq!(
            render(
                "{{#each (changed_properties before after)}}{{name}}:{{before}}->{{after}};{{/each}}",
                json!({"before": {"properties": {"cpu": 42, "h": "ok", "same": 1}}, "after": {"properties": {"cpu": 91, "h": "bad", "same": 1}}})
            ),
            "cpu:42->91;h:ok->bad;"
        );
        assert_eq!(
            render("{{json x}}", json!({"x": {"a": "<b>"}})),
            r#"{"a":"&lt;b&gt;"}"#
        );
        assert_eq!(
            render("{{raw_json x}}", json!({"x": {"a": "<b>"}})),
            r#"{"a":"<b>"}"#
        );
        assert_eq!(render("{{plain x}}", json!({"x": "a&b\"c"})), r#"a&b\"c"#);
        assert_eq!(
            render(
                "{{mrkdwn x}}",
                json!({"x": "Your **ws** was <deleted> \\< 1 [docs](https://x.io/?a=1&b=2) & more"})
            ),
            "Your *ws* was &lt;deleted&gt; &lt; 1 <https://x.io/?a=1&amp;b=2|docs> &amp; more"
        );
    }
}

/// What a helper takes and gives, for checking templates before any event: the number of
/// parameters it accepts, and the shape of what it returns (so `{{#each (changed_properties
/// before after)}}` knows its elements).
#[derive(Debug, Clone, Copy)]
pub struct Signature {
    pub min: usize,
    pub max: usize,
    pub returns: Returns,
    /// Block helpers (`{{#each}}`) and plain ones (`{{upper x}}`) alike.
    pub block: bool,
}

/// The shape a helper returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returns {
    Text,
    Bool,
    Number,
    /// The shape of its first parameter (`default`).
    First,
    /// `[{name, before, after}]`
    Changes,
    /// A list of something this check does not follow.
    List,
    Any,
}

/// The signature of a helper, Handlebars' built-ins included; `None` for an unknown name.
pub fn signature(name: &str) -> Option<Signature> {
    const MANY: usize = usize::MAX;
    let s = |min, max, returns| Signature {
        min,
        max,
        returns,
        block: false,
    };
    let b = |min, max| Signature {
        min,
        max,
        returns: Returns::Any,
        block: true,
    };
    Some(match name {
        "if" | "unless" => b(1, 1),
        "raw" => b(0, MANY),
        "each" | "with" => b(1, 1),
        "lookup" => s(2, 2, Returns::Any),
        "log" => s(0, MANY, Returns::Text),
        "eq" | "ne" | "gt" | "gte" | "lt" | "lte" => s(2, 2, Returns::Bool),
        "and" | "or" => s(1, MANY, Returns::Bool),
        "not" => s(1, 1, Returns::Bool),
        "len" => s(1, 1, Returns::Number),
        "default" => s(2, 2, Returns::First),
        "truncate" => s(2, 2, Returns::Text),
        "upper" | "lower" => s(1, 1, Returns::Text),
        "join" => s(1, 2, Returns::Text),
        "date" => s(1, 2, Returns::Text),
        "changed_properties" => s(2, 2, Returns::Changes),
        "failing_rules" | "scorecard_teams" => s(2, 3, Returns::List),
        "by_level" => s(1, 2, Returns::List),
        "json" | "raw_json" | "plain" | "mrkdwn" => s(1, 1, Returns::Text),
        _ => return None,
    })
}

/// Every helper name, for did-you-mean.
pub const HELPER_NAMES: &[&str] = &[
    "if",
    "unless",
    "raw",
    "each",
    "with",
    "lookup",
    "log",
    "eq",
    "ne",
    "gt",
    "gte",
    "lt",
    "lte",
    "and",
    "or",
    "not",
    "len",
    "default",
    "truncate",
    "upper",
    "lower",
    "join",
    "date",
    "changed_properties",
    "failing_rules",
    "scorecard_teams",
    "by_level",
    "json",
    "raw_json",
    "plain",
    "mrkdwn",
];
