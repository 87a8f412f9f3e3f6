//! The shape of the event envelope, one typed description per event type.
//!
//! Sources build envelopes as plain JSON (fast, and what templates and JSONPath read); this
//! module says what those envelopes hold, so that `check` can tell a misspelt field
//! (`entity.identifer`) from a field that is merely absent in one event, and so that the
//! docs/rules.md's envelope tables and `schemas/envelope.schema.json` are generated from the same
//! description instead of being kept in step by hand (a test compares them).
//!
//! A shape is closed where the envelope is (`entity`, `user`, `run`: switchyard or Port defines
//! their keys) and open where upstream data is free-form (entity `properties` and `relations`,
//! Coder `labels` and `data`, the raw `body`): below an open map nothing is checked, unless a
//! Port blueprint in the rules directory says more.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde_json::{json, Map, Value};

/// What a value in the envelope is.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// Anything; paths below it are not checked.
    Any,
    Text,
    Number,
    Bool,
    /// A timestamp in RFC 3339 text.
    Time,
    /// Text that is one of these values (a Port `enum` property).
    Enum(Vec<Value>),
    /// Free-form keys, each value of the inner shape.
    Map(Box<Shape>),
    /// A list, each element of the inner shape.
    List(Box<Shape>),
    /// Known keys.
    Object(Vec<Field>),
}

/// One key of an [`Shape::Object`].
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: Cow<'static, str>,
    pub shape: Shape,
    /// One line for the docs/rules.md table.
    pub doc: &'static str,
}

impl Shape {
    /// The shape of one concrete value (a test event): every key it has, lists by their first
    /// element, `null` as [`Shape::Any`].
    pub fn of_value(v: &Value) -> Shape {
        match v {
            Value::Null => Shape::Any,
            Value::Bool(_) => Shape::Bool,
            Value::Number(_) => Shape::Number,
            Value::String(_) => Shape::Text,
            Value::Array(a) => Shape::List(Box::new(
                a.first().map(Shape::of_value).unwrap_or(Shape::Any),
            )),
            Value::Object(m) => Shape::Object(
                m.iter()
                    .map(|(k, v)| Field {
                        name: Cow::Owned(k.clone()),
                        shape: Shape::of_value(v),
                        doc: "",
                    })
                    .collect(),
            ),
        }
    }

    /// True for values a template cannot write into a JSON string sensibly (Handlebars writes
    /// `[object]` for an object, and joins a list's elements).
    pub fn is_structured(&self) -> bool {
        matches!(self, Shape::Map(_) | Shape::List(_) | Shape::Object(_))
    }

    /// A short name for messages: `text`, `an object`, `a list`.
    pub fn describe(&self) -> &'static str {
        match self {
            Shape::Any => "any value",
            Shape::Text => "text",
            Shape::Number => "a number",
            Shape::Bool => "true or false",
            Shape::Time => "a time (RFC 3339 text)",
            Shape::Enum(_) => "one of a fixed set of values",
            Shape::Map(_) => "a map",
            Shape::List(_) => "a list",
            Shape::Object(_) => "an object",
        }
    }

    /// The field of that name, for objects.
    pub fn field(&self, name: &str) -> Option<&Field> {
        match self {
            Shape::Object(fs) => fs.iter().find(|f| f.name == name),
            _ => None,
        }
    }

    /// Keys of an object (empty for other shapes).
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Shape::Object(fs) => fs.iter().map(|f| f.name.as_ref()).collect(),
            _ => Vec::new(),
        }
    }

    /// This object with one more field (replacing one of the same name).
    pub fn with_field(&self, field: Field) -> Shape {
        match self {
            Shape::Object(fs) => {
                let mut fs: Vec<Field> = fs
                    .iter()
                    .filter(|f| f.name != field.name)
                    .cloned()
                    .collect();
                fs.push(field);
                Shape::Object(fs)
            }
            other => other.clone(),
        }
    }

    /// This shape as JSON Schema (draft 2020-12 vocabulary).
    pub fn json_schema(&self) -> Value {
        match self {
            Shape::Any => json!({}),
            Shape::Text => json!({"type": ["string", "null"]}),
            Shape::Number => json!({"type": ["number", "null"]}),
            Shape::Bool => json!({"type": ["boolean", "null"]}),
            Shape::Time => json!({"type": ["string", "number", "null"]}),
            Shape::Enum(values) => json!({"enum": values}),
            Shape::Map(v) => {
                json!({"type": ["object", "null"], "additionalProperties": v.json_schema()})
            }
            Shape::List(e) => json!({"type": ["array", "null"], "items": e.json_schema()}),
            Shape::Object(fs) => {
                let mut props = Map::new();
                for f in fs {
                    let mut s = f.shape.json_schema();
                    if let Value::Object(m) = &mut s {
                        m.insert("description".into(), Value::String(f.doc.to_string()));
                    }
                    props.insert(f.name.to_string(), s);
                }
                json!({"type": ["object", "null"], "properties": props, "additionalProperties": false})
            }
        }
    }
}

/// One step of a path into the envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Name(String),
    Index,
}

/// What a path selects in a shape.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved<'a> {
    /// The path exists; this is the shape there.
    Found(&'a Shape),
    /// Step `at` names a key the object at that point does not have.
    Unknown { at: usize, keys: Vec<&'a str> },
    /// Step `at` goes into something that has no keys (text, a number) or indexes a non-list.
    Scalar { at: usize, shape: &'a Shape },
}

/// Follows `segs` from `root`.
pub fn resolve<'a>(root: &'a Shape, segs: &[Seg]) -> Resolved<'a> {
    let mut cur = root;
    for (i, s) in segs.iter().enumerate() {
        cur = match (cur, s) {
            (Shape::Any, _) => return Resolved::Found(cur),
            (Shape::Map(v), _) => v,
            (Shape::List(e), Seg::Index) => e,
            // Handlebars' `list.length`, and JSONPath's `[0]` written as a name.
            (Shape::List(_), Seg::Name(n)) if n == "length" => &Shape::Number,
            (Shape::List(e), Seg::Name(n)) if n.parse::<usize>().is_ok() => e,
            (Shape::Object(_), Seg::Name(n)) => match cur.field(n) {
                Some(f) => &f.shape,
                None => {
                    return Resolved::Unknown {
                        at: i,
                        keys: cur.keys(),
                    }
                }
            },
            (_, _) => return Resolved::Scalar { at: i, shape: cur },
        };
    }
    Resolved::Found(cur)
}

fn f(name: &'static str, shape: Shape, doc: &'static str) -> Field {
    Field::new(name, shape, doc)
}

impl Field {
    /// A field with a built-in name.
    pub fn new(name: &'static str, shape: Shape, doc: &'static str) -> Field {
        Field {
            name: Cow::Borrowed(name),
            shape,
            doc,
        }
    }
}

fn obj(fields: Vec<Field>) -> Shape {
    Shape::Object(fields)
}

fn map() -> Shape {
    Shape::Map(Box::new(Shape::Any))
}

fn list(s: Shape) -> Shape {
    Shape::List(Box::new(s))
}

/// A Port entity, as in diffs and API answers.
pub fn port_entity() -> Shape {
    obj(vec![
        f(
            "identifier",
            Shape::Text,
            "the entity's identifier (always set)",
        ),
        f(
            "title",
            Shape::Text,
            "its title (the identifier when it has none)",
        ),
        f("blueprint", Shape::Text, "its blueprint's identifier"),
        f("icon", Shape::Text, "its icon"),
        f("team", Shape::Any, "owning teams (a list, or one team)"),
        f(
            "properties",
            map(),
            "its properties (free-form unless a blueprint file describes them)",
        ),
        f("relations", map(), "its relations"),
        f(
            "scorecards",
            map(),
            "scorecard results, when Port sends them",
        ),
        f("createdAt", Shape::Time, ""),
        f("createdBy", Shape::Text, ""),
        f("updatedAt", Shape::Time, ""),
        f("updatedBy", Shape::Text, ""),
    ])
}

/// The envelope's `entity`: a Port entity with its link in Port's web app.
fn linked_entity() -> Shape {
    port_entity().with_field(f(
        "url",
        Shape::Text,
        "the entity's page in Port's web app (the source's `app_url`)",
    ))
}

fn port_run() -> Shape {
    let named = || {
        obj(vec![
            f("identifier", Shape::Text, ""),
            f("title", Shape::Text, ""),
            f("icon", Shape::Text, ""),
            f("deleted", Shape::Bool, ""),
        ])
    };
    obj(vec![
        f(
            "id",
            Shape::Text,
            "the run id (`r_…`; a Workflow node run's `wfnr_…`)",
        ),
        f(
            "kind",
            Shape::Text,
            "author-defined bodies: `action`, or `workflow_node` for a Workflow's webhook node",
        ),
        f(
            "status",
            Shape::Text,
            "`IN_PROGRESS`, `SUCCESS` or `FAILURE`",
        ),
        f("statusLabel", Shape::Text, ""),
        f("summary", Shape::Text, ""),
        f("link", Shape::Any, "links (a list of URLs)"),
        f("source", Shape::Text, "`UI`, `API` or `AUTOMATION`"),
        f("blueprint", named(), ""),
        f("entity", Shape::Any, "the entity it is tied to, if any"),
        f("action", named(), ""),
        f("properties", map(), "the user inputs"),
        f("payload", Shape::Any, "the rendered invocation"),
        f("requiredApproval", Shape::Any, ""),
        f("approval", Shape::Any, ""),
        f("response", Shape::Any, ""),
        f("createdAt", Shape::Time, ""),
        f("createdBy", Shape::Text, ""),
        f("updatedAt", Shape::Time, ""),
        f("updatedBy", Shape::Text, ""),
        f("endedAt", Shape::Time, ""),
    ])
}

fn port_user() -> Shape {
    obj(vec![
        f("email", Shape::Text, ""),
        f("name", Shape::Text, "first and last name, else the email"),
        f("first_name", Shape::Text, ""),
        f("last_name", Shape::Text, ""),
        f("id", Shape::Text, ""),
    ])
}

fn port_trigger() -> Shape {
    obj(vec![
        f(
            "by",
            map(),
            "`{orgId, userId, user}` (timers: `{byPort: true}`)",
        ),
        f("origin", Shape::Text, "`UI`, `API`, `AUTOMATION`"),
        f("at", Shape::Time, "when"),
    ])
}

/// Fields every envelope has.
fn common() -> Vec<Field> {
    vec![
        f("source", Shape::Text, "the configured source name that received it"),
        f("type", Shape::Text, "the event type (`port/entity.updated`, …; the prefix is the source *kind*)"),
        f("id", Shape::Text, "stable dedup id: Coder `msg_id`; Port run id; automation run id; SHA-256 of the raw body for changelogs"),
        f("body", map(), "the raw request body (JSON)"),
    ]
}

fn port_common() -> Vec<Field> {
    let mut v = common();
    v.extend([
        f("blueprint", Shape::Text, "blueprint identifier"),
        f("trigger", port_trigger(), "Port's trigger"),
        f("user", port_user(), "the person Port names, else `null`"),
        f(
            "family",
            Shape::Text,
            "which body shape it came in: `changelog`, `automation`, `run`, `custom`",
        ),
        f(
            "automation_run",
            obj(vec![f("id", Shape::Text, "")]),
            "for automation bodies: the automation's own run",
        ),
    ]);
    v
}

fn port_entity_event(timer: bool) -> Shape {
    let mut v = port_common();
    v.extend([
        f("entity", linked_entity(), "the entity (full object from `after`, else `before`), always with `identifier`, `title`, `blueprint`"),
        f("before", port_entity(), "the entity before the change (`null` on create and for timers)"),
        f("after", port_entity(), "the entity after the change (`null` on delete)"),
    ]);
    if timer {
        v.push(f(
            "property",
            Shape::Text,
            "the timer property that expired",
        ));
    }
    obj(v)
}

fn port_run_event() -> Shape {
    let mut v = port_common();
    v.extend([
        f("run", port_run(), "the action run (`id`, `status`, …)"),
        f(
            "action",
            map(),
            "the action (`identifier`, `title`, the full definition when sent)",
        ),
        f("properties", map(), "the user inputs"),
        f(
            "entity",
            port_entity(),
            "the entity the run is about, if any",
        ),
        f(
            "before",
            port_run(),
            "the run before the change (run changes only)",
        ),
        f("after", port_run(), "the run after the change"),
    ]);
    obj(v)
}

fn coder_event() -> Shape {
    let mut v = common();
    v.extend([
        f(
            "user",
            obj(vec![
                f("id", Shape::Text, ""),
                f("email", Shape::Text, ""),
                f("name", Shape::Text, ""),
                f("username", Shape::Text, ""),
            ]),
            "the recipient",
        ),
        f("title", Shape::Text, "plain text (Coder's `title`)"),
        f("message", Shape::Text, "plain text (Coder's `body`)"),
        f(
            "title_markdown",
            Shape::Text,
            "CommonMark, when Coder sends it",
        ),
        f(
            "message_markdown",
            Shape::Text,
            "CommonMark, when Coder sends it",
        ),
        f(
            "actions",
            list(obj(vec![
                f("label", Shape::Text, ""),
                f("url", Shape::Text, ""),
            ])),
            "buttons Coder suggests",
        ),
        f(
            "labels",
            Shape::Map(Box::new(Shape::Text)),
            "as Coder sends them",
        ),
        f("data", map(), "as Coder sends it"),
        f("targets", Shape::Any, "as Coder sends them"),
        f(
            "template",
            obj(vec![f("id", Shape::Text, ""), f("name", Shape::Text, "")]),
            "route on the id (`$.template.id == \"f517da0b-…\"`); names change between releases",
        ),
    ]);
    obj(v)
}

fn slack_event() -> Shape {
    let mut v = common();
    v.extend([
        f(
            "action",
            obj(vec![
                f("action_id", Shape::Text, ""),
                f("block_id", Shape::Text, ""),
                f("value", Shape::Text, ""),
                f("url", Shape::Text, ""),
                f("text", Shape::Text, ""),
                f("type", Shape::Text, ""),
            ]),
            "the first action",
        ),
        f("actions", list(map()), "every action, as Slack sends them"),
        f(
            "user",
            map(),
            "the clicker (`id`, `username`, `name`, `team_id`)",
        ),
        f("team", map(), "the workspace"),
        f("channel", map(), "where the message is (`id`, `name`)"),
        f(
            "message",
            obj(vec![f("ts", Shape::Text, ""), f("text", Shape::Text, "")]),
            "the message clicked",
        ),
        f(
            "response_url",
            Shape::Text,
            "answers the click (ephemeral messages, replacing it)",
        ),
        f("trigger_id", Shape::Text, "opens a modal"),
    ]);
    obj(v)
}

fn schedule_event() -> Shape {
    let mut v = common();
    v.extend([
        f(
            "schedule",
            obj(vec![
                f("name", Shape::Text, ""),
                f("cron", Shape::Text, ""),
                f("timezone", Shape::Text, ""),
            ]),
            "the schedule that fired",
        ),
        f("tick", Shape::Time, "the tick in the schedule's time zone"),
        f("tick_utc", Shape::Time, "the tick in UTC"),
    ]);
    obj(v)
}

/// One group of event types sharing a table in the docs.
pub struct Family {
    pub title: &'static str,
    pub types: &'static [&'static str],
    pub shape: fn() -> Shape,
}

/// Every event type, grouped as docs/rules.md documents them.
pub const FAMILIES: &[Family] = &[
    Family {
        title: "Port entity changes",
        types: &[
            "port/entity.created",
            "port/entity.updated",
            "port/entity.deleted",
        ],
        shape: || port_entity_event(false),
    },
    Family {
        title: "Port timers",
        types: &["port/timer.expired"],
        shape: || port_entity_event(true),
    },
    Family {
        title: "Port action runs",
        types: &["port/run.created", "port/run.updated"],
        shape: port_run_event,
    },
    Family {
        title: "Coder notifications",
        types: &["coder/notification"],
        shape: coder_event,
    },
    Family {
        title: "Slack interactivity",
        types: &["slack/block_actions"],
        shape: slack_event,
    },
    Family {
        title: "Schedule ticks",
        types: &["schedule/<name>"],
        shape: schedule_event,
    },
];

static SHAPES: LazyLock<BTreeMap<&'static str, Shape>> = LazyLock::new(|| {
    let mut m = BTreeMap::new();
    for fam in FAMILIES {
        for t in fam.types {
            m.insert(*t, (fam.shape)());
        }
    }
    m
});

/// The envelope of one event type (`schedule/<any name>` for ticks).
pub fn of_type(event_type: &str) -> Option<&'static Shape> {
    if event_type.starts_with("schedule/") {
        return SHAPES.get("schedule/<name>");
    }
    SHAPES.get(event_type)
}

/// The event types an `on:` pattern covers, as keys of [`of_type`] (`port/*` → the Port
/// types; `schedule/x` → `schedule/<name>`).
pub fn types_for(pattern: &str) -> Vec<&'static str> {
    let all = SHAPES.keys().copied();
    if pattern == "*" {
        return all.collect();
    }
    if pattern.starts_with("schedule/") {
        return vec!["schedule/<name>"];
    }
    match pattern.strip_suffix('*') {
        Some(pre) => all.filter(|t| t.starts_with(pre)).collect(),
        None => all.filter(|t| *t == pattern).collect(),
    }
}

/// The envelope tables of docs/rules.md.
pub fn markdown() -> String {
    let mut out = String::new();
    let shared: Vec<Field> = common();
    let mut tables: Vec<(String, Vec<Field>)> =
        vec![("**All events**".to_string(), shared.clone())];
    for fam in FAMILIES {
        let types: Vec<String> = fam.types.iter().map(|t| format!("`{t}`")).collect();
        let Shape::Object(fields) = (fam.shape)() else {
            continue;
        };
        let own = fields
            .into_iter()
            .filter(|f| !shared.iter().any(|c| c.name == f.name))
            .collect();
        tables.push((format!("**{}** ({})", fam.title, types.join(", ")), own));
    }
    for (title, fields) in tables {
        out.push_str(&format!("{title}\n\n| field | |\n|---|---|\n"));
        for fl in &fields {
            let keys = match &fl.shape {
                Shape::Object(sub) => format!(
                    " `{{{}}}`",
                    sub.iter()
                        .map(|s| s.name.as_ref())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Shape::List(e) if matches!(**e, Shape::Object(_)) => {
                    format!(" `[{{{}}}]`", e.keys().join(", "))
                }
                _ => String::new(),
            };
            let doc = if fl.doc.is_empty() {
                fl.shape.describe()
            } else {
                fl.doc
            };
            out.push_str(&format!("| `{}` | {doc}{keys} |\n", fl.name));
        }
        out.push('\n');
    }
    out
}

/// `schemas/envelope.schema.json`: each event type's envelope as JSON Schema.
pub fn json_schema() -> String {
    let mut defs = Map::new();
    let mut one_of = Vec::new();
    for fam in FAMILIES {
        for t in fam.types {
            let mut s = (fam.shape)().json_schema();
            if let Value::Object(m) = &mut s {
                m.insert("title".into(), Value::String((*t).to_string()));
                m.insert("type".into(), Value::String("object".into()));
            }
            let key = t.replace(['/', '.', '<', '>'], "_");
            one_of.push(json!({"$ref": format!("#/$defs/{key}")}));
            defs.insert(key, s);
        }
    }
    let doc = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/switchyard/switchyard/schemas/envelope.schema.json",
        "title": "switchyard event envelope",
        "description": "What conditions and templates read, per event type (generated by `switchyard envelope --format schema`).",
        "oneOf": one_of,
        "$defs": defs,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(p: &str) -> Vec<Seg> {
        p.split('.').map(|s| Seg::Name(s.to_string())).collect()
    }

    #[test]
    fn every_event_type_has_a_shape() {
        for t in crate::event::EVENT_TYPES {
            assert!(of_type(t).is_some(), "{t}");
        }
        assert!(of_type("schedule/daily").is_some());
        assert_eq!(types_for("port/entity.*").len(), 3);
    }

    #[test]
    fn paths_resolve_and_misses_say_where() {
        let s = of_type("port/entity.updated").unwrap();
        assert_eq!(
            resolve(s, &segs("entity.identifier")),
            Resolved::Found(&Shape::Text)
        );
        assert!(matches!(
            resolve(s, &segs("entity.properties.cpuUtil")),
            Resolved::Found(Shape::Any)
        ));
        match resolve(s, &segs("entity.identifer")) {
            Resolved::Unknown { at, keys } => {
                assert_eq!(at, 1);
                assert!(keys.contains(&"identifier"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            resolve(s, &segs("entity.title.x")),
            Resolved::Scalar { at: 2, .. }
        ));
        assert!(matches!(
            resolve(s, &segs("body.anything.at.all")),
            Resolved::Found(Shape::Any)
        ));
        assert!(matches!(
            resolve(s, &segs("run")),
            Resolved::Unknown { at: 0, .. }
        ));
    }
}
