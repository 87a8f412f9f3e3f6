//! Rules checked against the envelope they will see ([`crate::envelope`]): every condition
//! path and every `{{path}}` of the templates a rule sends, for each event type its `on:`
//! covers, before any event arrives.
//!
//! A path is reported only when it is wrong for *every* type the rule listens to (a rule on
//! `port/*` may read `run.id`, which run events have), and each problem once however many rules
//! share the template. Unknown fields are warnings (they render as nothing, or make a condition
//! false), except as a step's only recipient, where every message would become a dead letter;
//! unknown helpers and wrong arity are errors (they fail at render time for every event), so
//! `serve` refuses them as `check` does. With Port blueprints in the rules directory
//! ([`super::blueprints`]), a rule pinned to blueprints sees typed entity properties, and a
//! condition value that can never match a property's type or `enum` is an error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use super::blueprints::Blueprint;
use super::diag::{did_you_mean, Diagnostic, LineStarts};
use super::parsed::Parsed;
use super::yaml::join_key;
use crate::envelope::{self, port_entity, resolve, Field, Resolved, Seg, Shape};
use crate::render::inspect::FindingKind;
use crate::render::{Finding, Templates};
use crate::routing::condition::Condition;
use crate::routing::{Query, SendStep};

/// The envelopes one rule sees: one root shape per event type.
pub(super) struct Roots {
    roots: Vec<(&'static str, Shape)>,
    /// Equal for rules that see equal envelopes (types, queries, pinned blueprints, `item`):
    /// what template findings are memoised by, since many rules share a template.
    key: String,
}

impl Roots {
    /// For a rule listening to `on`, with `with:` query results under `with`; entities of the
    /// `pinned` blueprints (when every one has a file in `blueprints/`) get typed properties.
    pub(super) fn new(
        on: &[String],
        queries: &[Query],
        blueprints: &BTreeMap<String, Blueprint>,
        pinned: Option<&[String]>,
    ) -> Roots {
        let mut types: Vec<&'static str> = on.iter().flat_map(|p| envelope::types_for(p)).collect();
        types.sort();
        types.dedup();
        let known: Option<Vec<&Blueprint>> = pinned
            .map(|ids| {
                ids.iter()
                    .map(|id| blueprints.get(id))
                    .collect::<Option<Vec<_>>>()
            })
            .unwrap_or(None)
            .filter(|v| !v.is_empty());
        let with = (!queries.is_empty()).then(|| {
            Shape::Object(
                queries
                    .iter()
                    .map(|q| {
                        let entity = match blueprints.get(&q.blueprint) {
                            Some(b) => typed(&port_entity(), &[b]),
                            None => port_entity(),
                        };
                        Field {
                            name: q.name.clone().into(),
                            shape: Shape::List(Box::new(entity)),
                            doc: "",
                        }
                    })
                    .collect(),
            )
        });
        let roots: Vec<(&'static str, Shape)> = types
            .into_iter()
            .filter_map(|t| {
                let mut s = envelope::of_type(t)?.clone();
                if let Some(bps) = &known {
                    let entity_like: &[&'static str] = if t.starts_with("port/run.") {
                        &["entity"]
                    } else if t.starts_with("port/") {
                        &["entity", "before", "after"]
                    } else {
                        &[]
                    };
                    for name in entity_like {
                        if let Some(fl) = s.field(name) {
                            let shape = typed(&fl.shape, bps);
                            let doc = fl.doc;
                            s = s.with_field(Field::new(name, shape, doc));
                        }
                    }
                }
                if let Some(w) = &with {
                    s = s.with_field(Field::new("with", w.clone(), ""));
                }
                Some((t, s))
            })
            .collect();
        let key = format!(
            "{}|{}|{}",
            roots_types(&roots),
            queries
                .iter()
                .map(|q| format!("{}:{}", q.name, q.blueprint))
                .collect::<Vec<_>>()
                .join(","),
            known
                .map(|k| k
                    .iter()
                    .map(|b| b.identifier.as_str())
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default()
        );
        Roots { roots, key }
    }

    fn with_item(&self) -> Roots {
        Roots {
            roots: self
                .roots
                .iter()
                .map(|(t, s)| (*t, s.with_field(Field::new("item", Shape::Any, ""))))
                .collect(),
            key: format!("{}|item", self.key),
        }
    }

    /// The roots of a grouped rule's digest: `items` (the grouped envelopes), `count`,
    /// `group` and `rule`.
    fn digest(&self) -> Roots {
        Roots {
            roots: self
                .roots
                .iter()
                .map(|(t, s)| {
                    (
                        *t,
                        Shape::Object(vec![
                            Field::new("items", Shape::List(Box::new(s.clone())), ""),
                            Field::new("count", Shape::Number, ""),
                            Field::new("group", Shape::Text, ""),
                            Field::new("rule", Shape::Text, ""),
                        ]),
                    )
                })
                .collect(),
            key: format!("{}|digest", self.key),
        }
    }

    fn types(&self) -> String {
        roots_types(&self.roots)
    }
}

fn roots_types(roots: &[(&'static str, Shape)]) -> String {
    roots.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", ")
}

/// An entity shape whose `properties` and `relations` are those of `bps` (a property several
/// blueprints type differently is left open).
fn typed(entity: &Shape, bps: &[&Blueprint]) -> Shape {
    let mut props: BTreeMap<String, Shape> = BTreeMap::new();
    let mut rels: Vec<String> = Vec::new();
    for b in bps {
        for (k, v) in &b.properties {
            match props.get(k) {
                Some(prev) if prev != v => {
                    props.insert(k.clone(), Shape::Any);
                }
                _ => {
                    props.insert(k.clone(), v.clone());
                }
            }
        }
        rels.extend(b.relations.iter().cloned());
    }
    let props = Shape::Object(
        props
            .into_iter()
            .map(|(k, v)| Field {
                name: k.into(),
                shape: v,
                doc: "",
            })
            .collect(),
    );
    rels.sort();
    rels.dedup();
    let rels = Shape::Object(
        rels.into_iter()
            .map(|k| Field {
                name: k.into(),
                shape: Shape::Any,
                doc: "",
            })
            .collect(),
    );
    entity
        .with_field(Field::new(
            "properties",
            props,
            "the entity's properties, as its blueprint defines them",
        ))
        .with_field(Field::new("relations", rels, "its relations"))
}

/// The blueprints a rule's top-level conditions pin it to: `$.blueprint == "X"`,
/// `$.blueprint in ["X", "Y"]` (also through `$.entity.blueprint`).
pub(super) fn pinned_blueprints(conditions: &[Condition]) -> Option<Vec<String>> {
    use crate::routing::condition::Op;
    for c in conditions {
        let Condition::Cmp(cmp) = c else { continue };
        let m = cmp.path().members();
        let on_blueprint = matches!(m.as_slice(), [Seg::Name(a)] if a == "blueprint")
            || matches!(m.as_slice(), [Seg::Name(a), Seg::Name(b)] if a == "entity" && b == "blueprint");
        if !on_blueprint || !cmp.path().is_chain() {
            continue;
        }
        match (cmp.op(), cmp.value()) {
            (Op::Eq, serde_json::Value::String(s)) => return Some(vec![s.clone()]),
            (Op::In, serde_json::Value::Array(a)) => {
                let ids: Option<Vec<String>> =
                    a.iter().map(|v| v.as_str().map(str::to_string)).collect();
                return ids;
            }
            _ => {}
        }
    }
    None
}

/// What a condition's value can never match: text against a number property, a value outside a
/// property's `enum`. `None` when it can.
fn value_problem(
    op: crate::routing::condition::Op,
    value: &serde_json::Value,
    shape: &Shape,
) -> Option<(String, String)> {
    use crate::routing::condition::Op;
    use serde_json::Value;
    match shape {
        Shape::Number => {
            let ordering = matches!(
                op,
                Op::Gt | Op::Ge | Op::Lt | Op::Le | Op::CrossesAbove | Op::CrossesBelow
            );
            let equality = matches!(op, Op::Eq | Op::Ne | Op::ChangedTo | Op::ChangedFrom);
            match value {
                Value::String(t) if ordering || (equality && t.trim().parse::<f64>().is_err()) => {
                    Some((
                        format!("the property is a number, and `{t}` is text (in quotes)"),
                        "compare with a number: drop the quotes (`> 80`)".to_string(),
                    ))
                }
                _ => None,
            }
        }
        Shape::Enum(allowed) => {
            let shown = || {
                allowed
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let outside = |v: &Value| !allowed.contains(v);
            match (op, value) {
                (Op::Eq | Op::Ne | Op::ChangedTo | Op::ChangedFrom, v @ Value::String(_))
                    if outside(v) =>
                {
                    let near = v
                        .as_str()
                        .and_then(|t| did_you_mean(t, allowed.iter().filter_map(Value::as_str)));
                    Some((
                        format!("{v} is not one of the property's values ({})", shown()),
                        near.map(|n| format!("did you mean \"{n}\"?"))
                            .unwrap_or_else(|| "use one of the blueprint's enum values".into()),
                    ))
                }
                (Op::In, Value::Array(items)) => items.iter().find(|v| outside(v)).map(|v| {
                    (
                        format!("{v} is not one of the property's values ({})", shown()),
                        "use only the blueprint's enum values".to_string(),
                    )
                }),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Checks the paths of one condition (at `cp` in the file).
pub(super) fn check_condition(
    p: &Parsed,
    cp: &str,
    c: &Condition,
    roots: &Roots,
    diags: &mut Vec<Diagnostic>,
) {
    if roots.roots.is_empty() {
        return;
    }
    for cmp in c.comparisons() {
        let segs = cmp.path().members();
        let mut first_miss = None;
        let mut found: Vec<&Shape> = Vec::new();
        for (_, root) in &roots.roots {
            match resolve(root, &segs) {
                Resolved::Found(s) => found.push(s),
                miss => {
                    first_miss.get_or_insert(miss);
                }
            }
        }
        if !found.is_empty() {
            // A value that can never match the property's type, for every event type.
            let problems: Vec<Option<(String, String)>> = if cmp.path().is_chain() {
                found
                    .iter()
                    .map(|s| value_problem(cmp.op(), cmp.value(), s))
                    .collect()
            } else {
                Vec::new()
            };
            if !problems.is_empty() && problems.iter().all(Option::is_some) {
                if let Some(Some((why, hint))) = problems.into_iter().next() {
                    diags.push(
                        p.at(
                            Diagnostic::error(
                                "bad-value",
                                format!("`{}`: {why}; the condition can never hold", cmp.text),
                            ),
                            cp,
                        )
                        .hint(hint),
                    );
                }
            }
            continue;
        }
        let text = cmp.path().text();
        let (message, hint) = match first_miss {
            Some(Resolved::Unknown { at, keys }) => {
                let word = match &segs[at] {
                    Seg::Name(n) => n.as_str(),
                    Seg::Index => "",
                };
                (
                    format!(
                        "`{text}`: no field `{word}` in the envelope of {}; the path selects nothing, so the condition is false for every such event",
                        roots.types()
                    ),
                    did_you_mean(word, keys.iter().copied()).map(|s| format!("did you mean `{s}`?")),
                )
            }
            Some(Resolved::Scalar { at, shape }) => (
                format!(
                    "`{text}`: step {} goes into {}, which has no fields; the path selects nothing",
                    at + 1,
                    shape.describe()
                ),
                None,
            ),
            _ => continue,
        };
        let mut d = p.at(Diagnostic::warning("unknown-field", message), cp);
        if let Some(h) = hint {
            d = d.hint(h);
        }
        diags.push(d);
    }
}

/// What one rule's templates are checked with; `seen` keeps one report per problem across
/// rules that share a template.
pub(super) struct StepCheck<'a> {
    pub p: &'a Parsed,
    pub blueprints: &'a BTreeMap<String, Blueprint>,
    pub templates: &'a Templates,
    pub seen: &'a mut HashSet<(String, usize, usize, String)>,
    pub memo: &'a mut HashMap<(String, bool, String), Vec<Finding>>,
    pub files: &'a mut HashMap<PathBuf, LineStarts>,
}

impl StepCheck<'_> {
    /// Checks a send step's templates (message, recipient fields, `for_each`).
    pub(super) fn step(
        &mut self,
        sp: &str,
        step: &SendStep,
        inline_key: &str,
        roots: &Roots,
        diags: &mut Vec<Diagnostic>,
    ) {
        if roots.roots.is_empty() {
            return;
        }
        let item_roots;
        let roots = if step.for_each.is_some() {
            item_roots = roots.with_item();
            &item_roots
        } else {
            roots
        };
        let found = self.memo(&step.template, false, roots);
        self.report(found, &join_key(sp, inline_key), diags);
        if let Some(reply) = step.keyed.as_ref().and_then(|k| k.reply.as_ref()) {
            let found = self.memo(reply, false, roots);
            self.report(found, &join_key(sp, "reply"), diags);
        }
        let key = step.keyed.as_ref().map(|k| k.key.clone());
        for (key, t) in [
            ("channel", &step.channel),
            ("user_email", &step.user_email),
            ("thread_ts", &step.thread_ts),
            ("for_each", &step.for_each),
            ("key", &key),
        ] {
            let Some(t) = t else { continue };
            let mut found = self.memo(t, true, roots);
            // The only recipient of the step, rendered from a field no event has: every message
            // of this step would be a dead letter (`no channel or user_email`), so it is an error.
            let sole = match key {
                "channel" => step.user_email.is_none(),
                "user_email" => step.channel.is_none(),
                _ => false,
            };
            if sole {
                for f in &mut found {
                    if matches!(f.kind, FindingKind::UnknownField | FindingKind::NoFields) {
                        f.error = true;
                        f.message = format!(
                            "`{key}`: {}, so every message of this step would be a dead letter (`no channel or user_email`)",
                            f.message.trim_end_matches("; it renders as nothing")
                        );
                    }
                }
            }
            self.report(found, &join_key(sp, key), diags);
        }
    }

    /// Checks a small template of the rule (a throttle key) at `at`.
    pub(super) fn plain(
        &mut self,
        name: &str,
        at: &str,
        roots: &Roots,
        diags: &mut Vec<Diagnostic>,
    ) {
        if roots.roots.is_empty() {
            return;
        }
        let found = self.memo(name, true, roots);
        self.report(found, at, diags);
    }

    /// The findings of one template for these roots, computed once per (template, envelope).
    fn memo(&mut self, template: &str, plain: bool, roots: &Roots) -> Vec<Finding> {
        let key = (template.to_string(), plain, roots.key.clone());
        if let Some(f) = self.memo.get(&key) {
            return f.clone();
        }
        let templates = self.templates;
        let found = keep_common(roots, |root| {
            if plain {
                templates.inspect_plain(template, root)
            } else {
                templates.inspect(template, root)
            }
        });
        self.memo.insert(key, found.clone());
        found
    }

    fn report(&mut self, found: Vec<Finding>, at: &str, diags: &mut Vec<Diagnostic>) {
        for f in found {
            let origin = self.templates.origin(&f.template).cloned();
            let key = (f.template.clone(), f.line, f.column, f.subject.clone());
            if !self.seen.insert(key) {
                continue;
            }
            let code = match (f.error, f.kind) {
                (true, FindingKind::UnknownField | FindingKind::NoFields) => "bad-recipient",
                (true, _) => "template",
                (false, _) => "unknown-field",
            };
            let mut d = if f.error {
                Diagnostic::error(code, f.message.clone())
            } else {
                Diagnostic::warning(code, f.message.clone())
            };
            let hint = f
                .unknown
                .as_ref()
                .and_then(|(w, c)| did_you_mean(w, c.iter().map(String::as_str)))
                .map(|s| format!("did you mean `{s}`?"))
                .or(f.hint.clone());
            if let Some(h) = hint {
                d = d.hint(h);
            }
            d = match origin {
                Some(o) if !o.inline => {
                    let starts = self.files.entry(o.file.clone()).or_insert_with(|| {
                        LineStarts::new(&std::fs::read_to_string(&o.file).unwrap_or_default())
                    });
                    d.at_line_in(&o.file, starts, f.line + o.line_offset - 1, f.column)
                }
                _ => self.p.at(d, at),
            };
            diags.push(d);
        }
    }
}

/// The findings present for every root (a path wrong for only some event types is fine).
fn keep_common(roots: &Roots, mut run: impl FnMut(&Shape) -> Vec<Finding>) -> Vec<Finding> {
    let mut all: Vec<Vec<Finding>> = roots.roots.iter().map(|(_, r)| run(r)).collect();
    let Some(first) = all.pop() else {
        return Vec::new();
    };
    let others: Vec<HashSet<(&str, usize, usize, &str)>> = all
        .iter()
        .map(|found| found.iter().map(Finding::place).collect())
        .collect();
    first
        .into_iter()
        .filter(|f| others.iter().all(|places| places.contains(&f.place())))
        .collect()
}

/// Checks one compiled rule: its conditions (`in_order`: as written in `where`, so that each is
/// reported at its place), its send steps' templates and its throttle key.
pub(super) fn check_rule(
    p: &Parsed,
    path: &str,
    spec: &super::spec::RuleSpec,
    rule: &crate::routing::Rule,
    in_order: &[Condition],
    sc: &mut StepCheck<'_>,
    diags: &mut Vec<Diagnostic>,
) {
    let pinned = pinned_blueprints(&rule.conditions);
    let roots = Roots::new(&rule.on, &rule.queries, sc.blueprints, pinned.as_deref());
    for (i, c) in in_order.iter().enumerate() {
        let cp = super::yaml::join_index(&join_key(path, "where"), i);
        check_condition(p, &cp, c, &roots, diags);
    }
    if let Some(by) = rule.group.as_ref().and_then(|g| g.by.as_ref()) {
        sc.plain(by, &join_key(&join_key(path, "group"), "by"), &roots, diags);
    }
    // A grouped rule's sends render once per group, over the digest.
    let digest;
    let send_roots = if rule.group.is_some() {
        digest = roots.digest();
        &digest
    } else {
        &roots
    };
    for (i, (step, s)) in rule.sends.iter().zip(&spec.send).enumerate() {
        let sp = super::yaml::join_index(&join_key(path, "send"), i);
        let inline_key = if s.blocks.is_some() {
            "blocks"
        } else if s.text.is_some() {
            "text"
        } else {
            "template"
        };
        sc.step(&sp, step, inline_key, send_roots, diags);
    }
    if let Some((key, _)) = &rule.throttle {
        sc.plain(
            key,
            &join_key(&join_key(path, "throttle"), "key"),
            &roots,
            diags,
        );
    }
}
