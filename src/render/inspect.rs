//! Templates checked before any event reaches them: helper names and arity, and every
//! `{{path}}` against the envelope's [`Shape`].
//!
//! Handlebars renders a misspelt field as nothing and fails on a misspelt helper only when an
//! event reaches that spot, so a rules change could pass every rule test and still send empty
//! or failing messages. The compiled template is a tree; walking it with the shape of the
//! context at each point (the envelope at the top, an element's shape inside `{{#each}}`, the
//! object's inside `{{#with}}`, the caller's inside a partial) finds these mistakes statically.
//!
//! What it guarantees: a reported unknown helper or wrong arity fails at render time for every
//! event that reaches it (so it is an error); a reported unknown field renders as nothing for
//! every event of that shape (a warning, since an open map upstream may still hold it). Where
//! the shape is not known (`Any`: free-form maps, block parameters, computed lookups) nothing is
//! reported. Paths are checked per event type by the caller, which keeps only what is wrong for
//! all of a rule's types.

use std::collections::{HashMap, HashSet};

use handlebars::template::{HelperTemplate, Parameter, Template, TemplateElement};

use super::helpers::{signature, Returns, HELPER_NAMES};
use crate::envelope::{resolve, Field, Resolved, Seg, Shape};

/// Deepest chain of partials followed (cycles are refused separately; see `partials`).
const MAX_DEPTH: usize = 16;

/// What kind of problem a [`Finding`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FindingKind {
    /// A path names a field its object does not have.
    UnknownField,
    /// A path goes into text or a number.
    NoFields,
    /// A helper that does not exist.
    UnknownHelper,
    /// A helper given too few or too many parameters, or a block helper used inline.
    Arity,
    /// An object or list written into a JSON string.
    StructuredInString,
}

impl Finding {
    /// Where it is and what it is about: findings from several walks (one per event type) are
    /// matched on this.
    pub fn place(&self) -> (&str, usize, usize, &str) {
        (&self.template, self.line, self.column, &self.subject)
    }
}

impl FindingKind {
    /// Errors fail at render time for every event that reaches them.
    pub fn is_error(self) -> bool {
        matches!(self, FindingKind::UnknownHelper | FindingKind::Arity)
    }
}

/// One problem found in a template.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// The template it is in (a partial's own name when found inside it).
    pub template: String,
    pub line: usize,
    pub column: usize,
    pub kind: FindingKind,
    /// Errors fail at render time; warnings render something other than meant.
    pub error: bool,
    pub message: String,
    /// The path or helper name as written (what the caller keys findings on).
    pub subject: String,
    /// A word and the names it may be a misspelling of, for a did-you-mean.
    pub unknown: Option<(String, Vec<String>)>,
    pub hint: Option<String>,
}

/// Walks `name` in `all` with `root` as its context.
pub(super) fn inspect(
    all: &HashMap<String, Template>,
    name: &str,
    root: &Shape,
    json: bool,
) -> Vec<Finding> {
    let Some(t) = all.get(name) else {
        return Vec::new();
    };
    let mut w = Walker {
        all,
        root,
        json,
        in_string: false,
        findings: Vec::new(),
        reported: HashSet::new(),
        depth: 0,
        labels: vec!["the envelope".into()],
    };
    let mut stack = vec![root.clone()];
    w.walk(name, t, &mut stack);
    w.findings
}

struct Walker<'a> {
    all: &'a HashMap<String, Template>,
    root: &'a Shape,
    /// The output is JSON: track whether an expression sits inside a JSON string.
    json: bool,
    in_string: bool,
    findings: Vec<Finding>,
    /// What `findings` holds, so that a spot reached twice is reported once without a scan.
    reported: HashSet<(String, usize, usize, String, FindingKind, String)>,
    depth: usize,
    /// What each scope of the stack is, for messages ("an element of `actions`").
    labels: Vec<String>,
}

impl Walker<'_> {
    fn walk(&mut self, tname: &str, t: &Template, stack: &mut Vec<Shape>) {
        for (i, el) in t.elements.iter().enumerate() {
            let (line, column) = t.mapping.get(i).map(|m| (m.0, m.1)).unwrap_or((1, 1));
            let at = At {
                tname,
                line,
                column,
            };
            match el {
                TemplateElement::RawString(s) if self.json => self.scan_quotes(s),
                TemplateElement::Expression(h) | TemplateElement::HtmlExpression(h) => {
                    let in_string = self.in_string;
                    if let Some(shape) = self.expression(&at, h, stack) {
                        if self.json && in_string && shape.is_structured() {
                            let subject = h.name.as_name().unwrap_or("").to_string();
                            self.push(&at, FindingKind::StructuredInString, &subject, format!(
                                "`{{{{{subject}}}}}` writes {} into a JSON string; it renders as `[object]` or a run-together list",
                                shape.describe()
                            ), None, Some("pick a field of it, or write `{{json …}}` outside the quotes for the whole value".into()));
                        }
                    }
                }
                TemplateElement::HelperBlock(h) => self.block(&at, h, stack),
                TemplateElement::PartialExpression(d) | TemplateElement::PartialBlock(d) => {
                    let name = match &d.name {
                        Parameter::Name(_) | Parameter::Path(_) => d.name.as_name(),
                        _ => None,
                    };
                    for p in d.params.iter().chain(d.hash.values()) {
                        self.param(&at, p, stack);
                    }
                    let plain = d.params.is_empty() && d.hash.is_empty();
                    if let (Some(n), true) = (name, self.depth < MAX_DEPTH) {
                        if let Some(inner) = self.all.get(n).filter(|_| !n.starts_with('@')) {
                            self.depth += 1;
                            let mut sub = if plain {
                                stack.clone()
                            } else {
                                vec![Shape::Any]
                            };
                            self.walk(n, inner, &mut sub);
                            self.depth -= 1;
                        }
                    }
                    if let Some(inner) = &d.template {
                        self.walk(tname, inner, stack);
                    }
                }
                TemplateElement::DecoratorBlock(d) => {
                    // `{{#*inline}}` bodies render wherever they are used, in a context not
                    // known here.
                    if let Some(inner) = &d.template {
                        let mut any = vec![Shape::Any];
                        let saved = self.in_string;
                        self.walk(tname, inner, &mut any);
                        self.in_string = saved;
                    }
                }
                _ => {}
            }
        }
    }

    fn scan_quotes(&mut self, s: &str) {
        let mut escaped = false;
        for c in s.chars() {
            if self.in_string {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => self.in_string = false,
                    _ => {}
                }
            } else if c == '"' {
                self.in_string = true;
            }
        }
    }

    /// `{{x}}`, `{{helper a b}}`: checks it and returns the shape it writes.
    fn expression(&mut self, at: &At, h: &HelperTemplate, stack: &[Shape]) -> Option<Shape> {
        let name = h.name.as_name();
        let lookup = h.params.is_empty() && h.hash.is_empty();
        match (&h.name, name) {
            (Parameter::Path(_), Some(n)) | (Parameter::Name(_), Some(n))
                if lookup && signature(n).is_none() =>
            {
                self.path(at, n, stack)
            }
            (Parameter::Subexpression(_), _) | (Parameter::Literal(_), _) => {
                self.param(at, &h.name, stack)
            }
            (_, Some(n)) => self.helper(at, n, &h.params, &h.hash, false, stack),
            (_, None) => None,
        }
    }

    fn helper(
        &mut self,
        at: &At,
        name: &str,
        params: &[Parameter],
        hash: &HashMap<String, Parameter>,
        block: bool,
        stack: &[Shape],
    ) -> Option<Shape> {
        let shapes = self.args(at, params, hash, stack);
        self.call(at, name, params.len(), block, &shapes)
    }

    /// Checks a helper's parameters (positional first, then hash) and returns their shapes.
    fn args(
        &mut self,
        at: &At,
        params: &[Parameter],
        hash: &HashMap<String, Parameter>,
        stack: &[Shape],
    ) -> Vec<Option<Shape>> {
        params
            .iter()
            .chain(hash.values())
            .map(|p| self.param(at, p, stack))
            .collect()
    }

    /// Checks a call of helper `name` with `n` positional parameters of `shapes`, and returns
    /// the shape it gives.
    fn call(
        &mut self,
        at: &At,
        name: &str,
        n: usize,
        block: bool,
        shapes: &[Option<Shape>],
    ) -> Option<Shape> {
        let Some(sig) = signature(name) else {
            self.push(
                at,
                FindingKind::UnknownHelper,
                name,
                format!("unknown helper `{name}`: rendering fails for every event that reaches it"),
                Some((
                    name.to_string(),
                    HELPER_NAMES.iter().map(|s| s.to_string()).collect(),
                )),
                None,
            );
            return None;
        };
        if sig.block && !block {
            self.push(
                at,
                FindingKind::Arity,
                name,
                format!("`{name}` is a block helper: write `{{{{#{name} …}}}}…{{{{/{name}}}}}`"),
                None,
                None,
            );
            return None;
        }
        if n < sig.min || n > sig.max {
            let want = match (sig.min, sig.max) {
                (a, b) if a == b => format!("{a}"),
                (a, usize::MAX) => format!("at least {a}"),
                (a, b) => format!("{a} to {b}"),
            };
            self.push(
                at,
                FindingKind::Arity,
                name,
                format!(
                    "`{name}` takes {want} parameter{}, not {n}",
                    if want == "1" { "" } else { "s" }
                ),
                None,
                None,
            );
        }
        Some(match sig.returns {
            Returns::Text => Shape::Text,
            Returns::Bool => Shape::Bool,
            Returns::Number => Shape::Number,
            Returns::First => shapes.first().cloned().flatten().unwrap_or(Shape::Any),
            Returns::Changes => Shape::List(Box::new(Shape::Object(vec![
                Field::new("name", Shape::Text, ""),
                Field::new("before", Shape::Any, ""),
                Field::new("after", Shape::Any, ""),
            ]))),
            Returns::List => Shape::List(Box::new(Shape::Any)),
            Returns::Any => Shape::Any,
        })
    }

    fn param(&mut self, at: &At, p: &Parameter, stack: &[Shape]) -> Option<Shape> {
        match p {
            Parameter::Path(_) | Parameter::Name(_) => match p.as_name() {
                Some(n) => self.path(at, n, stack),
                None => None,
            },
            Parameter::Literal(v) => Some(match v {
                serde_json::Value::String(_) => Shape::Text,
                serde_json::Value::Number(_) => Shape::Number,
                serde_json::Value::Bool(_) => Shape::Bool,
                _ => Shape::Any,
            }),
            Parameter::Subexpression(sub) => match sub.element.as_ref() {
                TemplateElement::Expression(h) => match h.name.as_name() {
                    Some(n) => self.helper(at, n, &h.params, &h.hash, false, stack),
                    None => None,
                },
                _ => None,
            },
            _ => None,
        }
    }

    fn block(&mut self, at: &At, h: &HelperTemplate, stack: &mut Vec<Shape>) {
        let name = h.name.as_name().unwrap_or("");
        let inner_ctx: Shape = match name {
            "each" | "with" => {
                let shapes = self.args(at, &h.params, &h.hash, stack);
                self.call(at, name, h.params.len(), true, &shapes);
                let arg = if h.params.is_empty() {
                    None
                } else {
                    shapes.into_iter().next().flatten()
                };
                match (name, arg) {
                    (_, None) => Shape::Any,
                    ("each", Some(Shape::List(e))) => *e,
                    ("each", Some(Shape::Map(v))) => *v,
                    ("each", Some(_)) => Shape::Any,
                    (_, Some(s)) => s,
                }
            }
            _ if signature(name).is_some() || !h.params.is_empty() || !h.hash.is_empty() => {
                self.helper(at, name, &h.params, &h.hash, true, stack);
                stack.last().cloned().unwrap_or(Shape::Any)
            }
            // `{{#section}}` with no helper of that name: Handlebars' block over a value.
            _ => match self.path(at, name, stack) {
                Some(Shape::List(e)) => *e,
                Some(s @ Shape::Object(_)) => s,
                Some(_) => stack.last().cloned().unwrap_or(Shape::Any),
                None => Shape::Any,
            },
        };
        let changes_scope = matches!(name, "each" | "with") || signature(name).is_none();
        let inner_ctx = if h.block_param.is_some() {
            Shape::Any
        } else {
            inner_ctx
        };
        let start = self.in_string;
        if let Some(t) = &h.template {
            if changes_scope {
                let arg = h.params.first().and_then(|p| p.as_name()).unwrap_or(name);
                let label = if name == "each" {
                    format!("an element of `{arg}`")
                } else {
                    format!("`{arg}`")
                };
                stack.push(inner_ctx);
                self.labels.push(label);
                self.walk(at.tname, t, stack);
                self.labels.pop();
                stack.pop();
            } else {
                self.walk(at.tname, t, stack);
            }
        }
        let after_main = self.in_string;
        if let Some(t) = &h.inverse {
            self.in_string = start;
            self.walk(at.tname, t, stack);
        }
        self.in_string = after_main;
    }

    /// Checks a path as written (`entity.title`, `../x`, `@root.entity`, `this`, `[a b].c`)
    /// and returns the shape it selects, `None` when unknown.
    fn path(&mut self, at: &At, raw: &str, stack: &[Shape]) -> Option<Shape> {
        let (base, rest) = if let Some(r) = raw.strip_prefix("@root") {
            (self.root.clone(), r.trim_start_matches(['.', '/']))
        } else if raw.starts_with('@') {
            return None; // @index, @key, @first, @last
        } else {
            let mut rest = raw;
            let mut up = 0;
            while let Some(r) = rest.strip_prefix("../") {
                up += 1;
                rest = r;
            }
            if up >= stack.len() {
                return None;
            }
            let base = stack[stack.len() - 1 - up].clone();
            let rest = rest
                .strip_prefix("this")
                .filter(|r| r.is_empty() || r.starts_with(['.', '/']))
                .map(|r| r.trim_start_matches(['.', '/']))
                .or_else(|| rest.strip_prefix("./"))
                .unwrap_or(rest);
            (base, rest)
        };
        if rest.is_empty() || rest == "." {
            return Some(base);
        }
        let segs = split_path(rest)?;
        match resolve(&base, &segs) {
            Resolved::Found(s) => Some(s.clone()),
            Resolved::Unknown { at: i, keys } => {
                let word = match &segs[i] {
                    Seg::Name(n) => n.clone(),
                    Seg::Index => String::new(),
                };
                let owner = shown(&segs[..i]);
                let message = if owner.is_empty() {
                    let here = match (
                        raw.starts_with("@root") || raw.starts_with("../"),
                        self.labels.last(),
                    ) {
                        (false, Some(l)) if stack.len() == self.labels.len() => l.clone(),
                        _ => "the envelope".to_string(),
                    };
                    format!("`{raw}`: {here} has no field `{word}`; it renders as nothing")
                } else {
                    format!("`{raw}`: `{owner}` has no field `{word}`; it renders as nothing")
                };
                let hint = (!keys.is_empty()).then(|| format!("fields there: {}", keys.join(", ")));
                self.push(
                    at,
                    FindingKind::UnknownField,
                    raw,
                    message,
                    Some((word, keys.iter().map(|k| k.to_string()).collect())),
                    hint,
                );
                None
            }
            Resolved::Scalar { at: i, shape } => {
                let owner = shown(&segs[..i]);
                self.push(
                    at,
                    FindingKind::NoFields,
                    raw,
                    format!(
                        "`{raw}`: `{owner}` is {}, it has no fields; it renders as nothing",
                        shape.describe()
                    ),
                    None,
                    None,
                );
                None
            }
        }
    }

    fn push(
        &mut self,
        at: &At,
        kind: FindingKind,
        subject: &str,
        message: String,
        unknown: Option<(String, Vec<String>)>,
        hint: Option<String>,
    ) {
        let f = Finding {
            template: at.tname.to_string(),
            line: at.line,
            column: at.column,
            kind,
            error: kind.is_error(),
            message,
            subject: subject.to_string(),
            unknown,
            hint,
        };
        let key = (
            f.template.clone(),
            f.line,
            f.column,
            f.subject.clone(),
            f.kind,
            f.message.clone(),
        );
        if self.reported.insert(key) {
            self.findings.push(f);
        }
    }
}

struct At<'a> {
    tname: &'a str,
    line: usize,
    column: usize,
}

fn shown(segs: &[Seg]) -> String {
    segs.iter()
        .map(|s| match s {
            Seg::Name(n) => n.as_str(),
            Seg::Index => "[]",
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// `a.b`, `a/b`, `a.[b c].0` into segments; `None` for what this check does not follow.
fn split_path(p: &str) -> Option<Vec<Seg>> {
    let mut segs = Vec::new();
    let mut cur = String::new();
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        match c {
            '[' => {
                for c in chars.by_ref() {
                    if c == ']' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '.' | '/' => {
                if cur.is_empty() {
                    return None;
                }
                segs.push(seg(std::mem::take(&mut cur)));
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        segs.push(seg(cur));
    }
    Some(segs)
}

fn seg(s: String) -> Seg {
    if s.parse::<usize>().is_ok() {
        Seg::Index
    } else {
        Seg::Name(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::of_type;

    fn run(src: &str, ty: &str) -> Vec<Finding> {
        let mut all = HashMap::new();
        all.insert("t".to_string(), Template::compile(src).unwrap());
        inspect(&all, "t", of_type(ty).unwrap(), true)
    }

    #[test]
    fn misspelt_fields_and_helpers_are_found() {
        let f = run(
            r#"{"text": "{{entity.identifer}} {{plian entity.title}}"}"#,
            "port/entity.updated",
        );
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(!f[0].error && f[0].message.contains("identifer"), "{f:?}");
        assert!(f[1].error && f[1].message.contains("plian"), "{f:?}");
        assert!(run(r#"{"text": "{{entity.identifier}} {{plain entity.title}} {{entity.properties.anything}}"}"#, "port/entity.updated").is_empty());
    }

    #[test]
    fn scopes_follow_each_with_and_parents() {
        let ok = r#"{"t": "{{#each actions}}{{label}} {{url}} {{@index}} {{../title}}{{/each}}{{#with user}}{{email}}{{/with}}"}"#;
        assert!(
            run(ok, "coder/notification").is_empty(),
            "{:?}",
            run(ok, "coder/notification")
        );
        let ok =
            r#"{"t": "{{#each (changed_properties before after)}}{{name}}: {{before}}{{/each}}"}"#;
        assert!(
            run(ok, "port/entity.updated").is_empty(),
            "{:?}",
            run(ok, "port/entity.updated")
        );
        let bad = r#"{"t": "{{#each actions}}{{lable}}{{/each}}{{#with user}}{{mail}}{{/with}}"}"#;
        let f = run(bad, "coder/notification");
        assert_eq!(f.len(), 2, "{f:?}");
    }

    #[test]
    fn objects_in_strings_and_arity() {
        let f = run(
            r#"{"t": "{{body}}", "u": {{json body}}}"#,
            "coder/notification",
        );
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].message.contains("JSON string"), "{f:?}");
        let f = run(r#"{"t": "{{truncate title}}"}"#, "coder/notification");
        assert!(f[0].error && f[0].message.contains("takes 2"), "{f:?}");
    }
}
