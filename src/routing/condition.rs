//! Rule conditions: parsing the one-line and structured forms, and evaluating them.
//!
//! Semantics, in one place (docs/rules.md repeats them):
//! - A path may select several nodes; a comparison holds when **any** selected node satisfies it.
//! - A path that selects nothing makes the comparison **false** (so `not` of it is true), and
//!   `simulate` reports "selected nothing".
//! - Numbers compare as numbers: `80 == 80.0`, and a numeric string compares as a number when
//!   the other side is a number (Port properties sometimes arrive as strings).
//! - `exists` holds when the path selects a node that is not `null`.
//! - Transitions (`changed`, `changed_from`, `changed_to`, `crosses_above`, `crosses_below`)
//!   are written against `$.after…` and compare with the same path under `$.before`. They hold
//!   only when both `before` and `after` are objects (an update): a create or delete has no
//!   "before and after" to compare.

use regex::Regex;
use serde_json::Value;

use super::path::{Interner, JsonPathExpr, Lookup};

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    In,
    Contains,
    Matches,
    Exists,
    Changed,
    ChangedFrom,
    ChangedTo,
    CrossesAbove,
    CrossesBelow,
}

/// Every operator as written in rules.
pub const OPS: &[(&str, Op)] = &[
    ("==", Op::Eq),
    ("!=", Op::Ne),
    (">=", Op::Ge),
    ("<=", Op::Le),
    (">", Op::Gt),
    ("<", Op::Lt),
    ("in", Op::In),
    ("contains", Op::Contains),
    ("matches", Op::Matches),
    ("exists", Op::Exists),
    ("changed", Op::Changed),
    ("changed_from", Op::ChangedFrom),
    ("changed_to", Op::ChangedTo),
    ("crosses_above", Op::CrossesAbove),
    ("crosses_below", Op::CrossesBelow),
];

impl Op {
    fn parse(s: &str) -> Option<Op> {
        OPS.iter().find(|(n, _)| *n == s).map(|(_, o)| *o)
    }
    fn takes_value(self) -> bool {
        !matches!(self, Op::Exists | Op::Changed)
    }
    fn is_transition(self) -> bool {
        matches!(
            self,
            Op::Changed | Op::ChangedFrom | Op::ChangedTo | Op::CrossesAbove | Op::CrossesBelow
        )
    }
}

/// A compiled condition.
#[derive(Debug, Clone)]
pub enum Condition {
    Cmp(Box<Comparison>),
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
}

/// `<path> <op> [value]`, compiled.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The condition as the user wrote it (for `simulate`).
    pub text: String,
    path: JsonPathExpr,
    before: Option<JsonPathExpr>,
    op: Op,
    value: Value,
    number: Option<f64>,
    regex: Option<Pattern>,
    /// Memo slots of `$.before` and `$.after` (transitions only; see [`Interner`]).
    update_slots: Option<(u32, u32)>,
}

/// A compiled `matches` pattern. One without regex syntax (optionally anchored with `^`) is a
/// plain prefix or substring test: the usual `^svc-` patterns then cost a string comparison
/// instead of a regex search, which was a fifth of routing's instructions for the bench rules.
/// Matching a literal is matching its bytes, so both give the same answer (a test checks).
#[derive(Debug, Clone)]
enum Pattern {
    Prefix(String),
    Contains(String),
    Regex(Regex),
}

impl Pattern {
    fn new(re: Regex) -> Pattern {
        const META: &[char] = &[
            '\\', '.', '+', '*', '?', '(', ')', '|', '[', ']', '{', '}', '^', '$',
        ];
        let src = re.as_str();
        let (anchored, rest) = match src.strip_prefix('^') {
            Some(r) => (true, r),
            None => (false, src),
        };
        if rest.contains(META) {
            Pattern::Regex(re)
        } else if anchored {
            Pattern::Prefix(rest.to_string())
        } else {
            Pattern::Contains(rest.to_string())
        }
    }

    fn is_match(&self, t: &str) -> bool {
        match self {
            Pattern::Prefix(p) => t.starts_with(p.as_str()),
            Pattern::Contains(p) => t.contains(p.as_str()),
            Pattern::Regex(re) => re.is_match(t),
        }
    }
}

/// A problem with a condition; `offset`/`len` are within the one-line text when known.
#[derive(Debug, Clone)]
pub struct ConditionError {
    pub message: String,
    pub hint: Option<String>,
    /// Byte offset inside the condition string, when the problem is in a one-line condition.
    pub offset: Option<usize>,
    pub len: usize,
    /// A sub-path (e.g. `.value`, `.all[1]`) when the problem is in a structured condition.
    pub subpath: String,
}

impl ConditionError {
    fn new(message: impl Into<String>) -> Self {
        ConditionError {
            message: message.into(),
            hint: None,
            offset: None,
            len: 1,
            subpath: String::new(),
        }
    }
    fn hint(mut self, h: impl Into<String>) -> Self {
        self.hint = Some(h.into());
        self
    }
    fn span(mut self, offset: usize, len: usize) -> Self {
        self.offset = Some(offset);
        self.len = len.max(1);
        self
    }
    fn under(mut self, sub: &str) -> Self {
        self.subpath = format!("{sub}{}", self.subpath);
        self
    }
}

/// Compiles a `where` item (a one-line string or a structured mapping).
pub fn compile(v: &Value) -> Result<Condition, ConditionError> {
    match v {
        Value::String(s) => compile_line(s),
        Value::Object(m) => {
            if let Some(items) = m.get("all").or_else(|| m.get("any")) {
                let is_all = m.contains_key("all");
                let key = if is_all { "all" } else { "any" };
                if m.len() != 1 {
                    return Err(ConditionError::new(format!(
                        "`{key}` must be the only key of its mapping"
                    )));
                }
                let Value::Array(list) = items else {
                    return Err(
                        ConditionError::new(format!("`{key}` takes a list of conditions"))
                            .under(&format!(".{key}")),
                    );
                };
                let mut out = Vec::with_capacity(list.len());
                for (i, c) in list.iter().enumerate() {
                    out.push(compile(c).map_err(|e| e.under(&format!(".{key}[{i}]")))?);
                }
                return Ok(if is_all {
                    Condition::All(out)
                } else {
                    Condition::Any(out)
                });
            }
            if let Some(inner) = m.get("not") {
                if m.len() != 1 {
                    return Err(ConditionError::new(
                        "`not` must be the only key of its mapping",
                    ));
                }
                return Ok(Condition::Not(Box::new(
                    compile(inner).map_err(|e| e.under(".not"))?,
                )));
            }
            for k in m.keys() {
                if !matches!(k.as_str(), "path" | "op" | "value") {
                    let hint = crate::config::diag::did_you_mean(k, ["path", "op", "value", "all", "any", "not"])
                        .map(|s| format!("did you mean `{s}`?"))
                        .unwrap_or_else(|| "a structured condition has `path`, `op` and `value`, or is `all`/`any`/`not`".into());
                    return Err(
                        ConditionError::new(format!("unknown key `{k}` in a condition"))
                            .hint(hint)
                            .under(&format!(".{k}")),
                    );
                }
            }
            let path = match m.get("path") {
                Some(Value::String(p)) => p.as_str(),
                _ => {
                    return Err(ConditionError::new(
                        "a structured condition needs `path` (a JSONPath string)",
                    ))
                }
            };
            let op_text = match m.get("op") {
                Some(Value::String(o)) => o.as_str(),
                _ => {
                    return Err(ConditionError::new("a structured condition needs `op`")
                        .hint(op_list_hint()))
                }
            };
            let op = Op::parse(op_text).ok_or_else(|| unknown_op(op_text).under(".op"))?;
            let value = m.get("value").cloned();
            let text = match &value {
                Some(v) => format!("{path} {op_text} {v}"),
                None => format!("{path} {op_text}"),
            };
            build(text, path, op, value).map_err(|e| {
                if e.message.contains("JSONPath") {
                    e.under(".path")
                } else {
                    e.under(".value")
                }
            })
        }
        _ => Err(ConditionError::new(
            "a condition is a string like `$.x == 1`, or a mapping",
        )),
    }
}

fn op_list_hint() -> String {
    let names: Vec<&str> = OPS.iter().map(|(n, _)| *n).collect();
    format!("operators: {}", names.join(" "))
}

fn unknown_op(op: &str) -> ConditionError {
    let hint = crate::config::diag::did_you_mean(op, OPS.iter().map(|(n, _)| *n))
        .map(|s| format!("did you mean `{s}`? ({})", op_list_hint()))
        .unwrap_or_else(op_list_hint);
    ConditionError::new(format!("unknown operator `{op}`")).hint(hint)
}

/// Parses `<path> <op> [value]`.
fn compile_line(line: &str) -> Result<Condition, ConditionError> {
    let lead = line.len() - line.trim_start().len();
    let s = line.trim();
    if !s.starts_with('$') {
        return Err(ConditionError::new(
            "a condition starts with a JSONPath such as `$.after.properties.status`",
        )
        .hint("write `<path> <op> <value>`, e.g. `$.blueprint == \"service\"`")
        .span(lead, s.len().min(20)));
    }
    // The path ends at the first space outside brackets and quotes.
    let bytes = s.as_bytes();
    let (mut depth, mut quote, mut end) = (0i32, None::<u8>, s.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) => {
                if b == b'\\' {
                    i += 1;
                } else if b == q {
                    quote = None;
                }
            }
            None => match b {
                b'\'' | b'"' => quote = Some(b),
                b'[' | b'(' => depth += 1,
                b']' | b')' => depth -= 1,
                b' ' | b'\t' if depth <= 0 => {
                    end = i;
                    break;
                }
                _ => {}
            },
        }
        i += 1;
    }
    let path = &s[..end];
    let rest = s[end..].trim_start();
    let op_start = lead + s.len() - rest.len();
    if rest.is_empty() {
        if let Err(e) = JsonPathExpr::compile(path) {
            return Err(
                ConditionError::new(format!("invalid JSONPath `{path}`: {e}"))
                    .span(lead, path.len()),
            );
        }
        return Err(ConditionError::new("missing operator after the path")
            .hint(op_list_hint())
            .span(lead + end, 1));
    }
    let (op_text, value_text) = match rest.find([' ', '\t']) {
        Some(j) => (&rest[..j], rest[j..].trim()),
        None => (rest, ""),
    };
    let op = Op::parse(op_text).ok_or_else(|| unknown_op(op_text).span(op_start, op_text.len()))?;
    let value_start = op_start + op_text.len() + (rest.len() - op_text.len() - value_text.len());
    let value = if value_text.is_empty() {
        None
    } else {
        Some(parse_literal(value_text).map_err(|(msg, off, len)| {
            ConditionError::new(msg)
                .hint("list elements are JSON (`\"a\"`, `80`), single-quoted text (`'a b'`), or a bare word")
                .span(value_start + off, len)
        })?)
    };
    build(s.to_string(), path, op, value).map_err(|e| {
        if e.offset.is_some() {
            e
        } else if e.message.contains("JSONPath") {
            e.span(lead, path.len())
        } else {
            e.span(value_start.min(lead + s.len()), value_text.len())
        }
    })
}

/// A value in a one-line condition: JSON if it parses (`80`, `"Degraded"`, `["a","b"]`, `true`),
/// a single-quoted string, or else the bare text (`Degraded`).
/// A list that is not JSON (`["a", 'b', c]`) is read element by element, each as a scalar
/// value is; an element that cannot be read is named with its place.
fn parse_literal(t: &str) -> Result<Value, (String, usize, usize)> {
    if let Ok(v) = serde_json::from_str::<Value>(t) {
        return Ok(v);
    }
    if t.len() >= 2 && t.starts_with('[') && t.ends_with(']') {
        return parse_list(t);
    }
    Ok(scalar_literal(t))
}

fn scalar_literal(t: &str) -> Value {
    if t.len() >= 2 && t.starts_with('\'') && t.ends_with('\'') {
        return Value::String(t[1..t.len() - 1].to_string());
    }
    Value::String(t.to_string())
}

fn parse_list(t: &str) -> Result<Value, (String, usize, usize)> {
    let inner = &t[1..t.len() - 1];
    let mut items = Vec::new();
    let mut start = 0;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut pieces = Vec::new();
    for (i, c) in inner.char_indices() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == ',' => {
                pieces.push((start, &inner[start..i]));
                start = i + 1;
            }
            None => {}
        }
    }
    pieces.push((start, &inner[start..]));
    if quote.is_some() {
        return Err(("the list has an unclosed quote".into(), 0, t.len()));
    }
    for (n, (off, raw)) in pieces.iter().enumerate() {
        let el = raw.trim();
        let at = 1 + off + (raw.len() - raw.trim_start().len());
        if el.is_empty() {
            if pieces.len() == 1 {
                break; // `[]`
            }
            return Err((
                format!("element {} of the list is empty (a stray comma?)", n + 1),
                at.min(t.len() - 1),
                1,
            ));
        }
        if let Ok(v) = serde_json::from_str::<Value>(el) {
            items.push(v);
        } else if el.len() >= 2 && el.starts_with('\'') && el.ends_with('\'') {
            items.push(scalar_literal(el));
        } else if el.starts_with('"')
            || el.starts_with('\'')
            || el.chars().any(char::is_whitespace)
            || el.contains(['[', ']', '{', '}'])
        {
            return Err((
                format!("element {} of the list, `{el}`, is not a value", n + 1),
                at,
                el.len(),
            ));
        } else {
            items.push(Value::String(el.to_string()));
        }
    }
    Ok(Value::Array(items))
}

fn build(
    text: String,
    path: &str,
    op: Op,
    value: Option<Value>,
) -> Result<Condition, ConditionError> {
    let compiled = JsonPathExpr::compile(path).map_err(|e| {
        ConditionError::new(format!("invalid JSONPath `{path}`: {e}"))
            .hint("JSONPath starts at `$`, e.g. `$.after.properties.cpuUtil` or `$.labels['name']`")
    })?;
    if op.takes_value() && value.is_none() {
        return Err(ConditionError::new(format!(
            "operator `{}` needs a value",
            op_name(op)
        )));
    }
    if !op.takes_value() && value.is_some() {
        return Err(ConditionError::new(format!(
            "operator `{}` takes no value",
            op_name(op)
        )));
    }
    let value = value.unwrap_or(Value::Null);
    let mut number = None;
    let mut regex = None;
    match op {
        Op::Gt | Op::Ge | Op::Lt | Op::Le => {
            if !(value.is_number() || value.is_string()) {
                return Err(ConditionError::new(format!(
                    "`{}` compares with a number or a string",
                    op_name(op)
                )));
            }
            number = as_number(&value);
        }
        Op::CrossesAbove | Op::CrossesBelow => {
            number = Some(as_number(&value).ok_or_else(|| {
                ConditionError::new(format!("`{}` needs a number, got {value}", op_name(op)))
            })?);
        }
        Op::In if !value.is_array() => {
            return Err(ConditionError::new(
                "`in` needs a list, e.g. `[\"Degraded\", \"Unhealthy\"]`",
            ));
        }
        Op::Matches => {
            let Value::String(re) = &value else {
                return Err(ConditionError::new(
                    "`matches` needs a regular expression string",
                ));
            };
            regex = Some(Regex::new(re).map(Pattern::new).map_err(|e| {
                let msg = e.to_string();
                let first = msg.lines().last().unwrap_or(&msg).trim().to_string();
                ConditionError::new(format!("invalid regular expression `{re}`: {first}"))
                    .hint("the syntax is Rust's `regex` crate (no look-around or backreferences)")
            })?);
        }
        _ => {}
    }
    let before = if op.is_transition() {
        if !compiled.starts_with_member("after") {
            return Err(ConditionError::new(format!(
                "a transition (`{}`) is written against `$.after…` and compared with `$.before…`; `{path}` does not start with `$.after`",
                op_name(op)
            ))
            .hint(format!("write e.g. `$.after.properties.status {} …`", op_name(op))));
        }
        compiled.with_first_member("before")
    } else {
        None
    };
    Ok(Condition::Cmp(Box::new(Comparison {
        text,
        path: compiled,
        before,
        op,
        value,
        number,
        regex,
        update_slots: None,
    })))
}

fn op_name(op: Op) -> &'static str {
    OPS.iter()
        .find(|(_, o)| *o == op)
        .map(|(n, _)| *n)
        .unwrap_or("?")
}

fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

/// Equality with numbers compared as numbers.
pub fn loose_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(_), _) | (_, Value::Number(_)) => match (as_number(a), as_number(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        },
        _ => a == b,
    }
}

fn ordering(a: &Value, b: &Value, num: Option<f64>) -> Option<std::cmp::Ordering> {
    if let (Some(x), Some(y)) = (as_number(a), num.or_else(|| as_number(b))) {
        if a.is_number() || b.is_number() {
            return x.partial_cmp(&y);
        }
    }
    match (a, b) {
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn text_of(v: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match v {
        Value::String(s) => Some(std::borrow::Cow::Borrowed(s)),
        Value::Number(n) => Some(std::borrow::Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(std::borrow::Cow::Owned(b.to_string())),
        _ => None,
    }
}

impl Comparison {
    /// The path it reads.
    pub fn path(&self) -> &JsonPathExpr {
        &self.path
    }

    /// The operator.
    pub fn op(&self) -> Op {
        self.op
    }

    /// The value compared with (`null` for `exists` and `changed`).
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// Does one selected node satisfy a non-transition operator?
    fn node_holds(&self, node: &Value) -> bool {
        use std::cmp::Ordering::*;
        match self.op {
            Op::Eq => loose_eq(node, &self.value),
            Op::Ne => !loose_eq(node, &self.value),
            Op::Gt => ordering(node, &self.value, self.number) == Some(Greater),
            Op::Ge => matches!(
                ordering(node, &self.value, self.number),
                Some(Greater | Equal)
            ),
            Op::Lt => ordering(node, &self.value, self.number) == Some(Less),
            Op::Le => matches!(ordering(node, &self.value, self.number), Some(Less | Equal)),
            Op::In => self
                .value
                .as_array()
                .is_some_and(|l| l.iter().any(|x| loose_eq(node, x))),
            Op::Contains => match node {
                Value::String(s) => text_of(&self.value).is_some_and(|t| s.contains(t.as_ref())),
                Value::Array(a) => a.iter().any(|x| loose_eq(x, &self.value)),
                Value::Object(m) => self.value.as_str().is_some_and(|k| m.contains_key(k)),
                _ => false,
            },
            Op::Matches => match (&self.regex, text_of(node)) {
                (Some(re), Some(t)) => re.is_match(&t),
                _ => false,
            },
            Op::Exists => !node.is_null(),
            _ => false,
        }
    }

    /// Does the transition hold between `before` and `after` (each possibly missing)?
    fn transition_holds(&self, before: Option<&Value>, after: Option<&Value>) -> bool {
        let null = Value::Null;
        let b = before.unwrap_or(&null);
        let a = after.unwrap_or(&null);
        match self.op {
            Op::Changed => !loose_eq(a, b),
            Op::ChangedFrom => loose_eq(b, &self.value) && !loose_eq(a, &self.value),
            Op::ChangedTo => loose_eq(a, &self.value) && !loose_eq(b, &self.value),
            Op::CrossesAbove | Op::CrossesBelow => {
                let (Some(x), Some(y), Some(n)) = (as_number(b), as_number(a), self.number) else {
                    return false;
                };
                if self.op == Op::CrossesAbove {
                    x <= n && y > n
                } else {
                    x >= n && y < n
                }
            }
            _ => false,
        }
    }

    fn is_update(ev: &Value) -> bool {
        ev.get("before").is_some_and(Value::is_object)
            && ev.get("after").is_some_and(Value::is_object)
    }

    fn eval(&self, ev: &Value) -> bool {
        if let Some(bp) = &self.before {
            if !Self::is_update(ev) {
                return false;
            }
            return self.transition_holds(bp.first(ev), self.path.first(ev));
        }
        self.path.any(ev, |n| self.node_holds(n))
    }

    /// [`eval`](Self::eval) through the per-event memo; always the same answer.
    fn eval_in(&self, lk: &mut Lookup<'_>) -> bool {
        if let Some(bp) = &self.before {
            let (bs, as_) = self.update_slots.unzip();
            let (b, a) = (lk.member(bs, "before"), lk.member(as_, "after"));
            if !(b.is_some_and(Value::is_object) && a.is_some_and(Value::is_object)) {
                return false;
            }
            return self.transition_holds(bp.first_in(lk), self.path.first_in(lk));
        }
        self.path.any_in(lk, |n| self.node_holds(n))
    }

    fn intern(&mut self, interner: &mut Interner) {
        self.path.intern(interner);
        if let Some(bp) = &mut self.before {
            bp.intern(interner);
            self.update_slots = Some((interner.member("before"), interner.member("after")));
        }
    }

    fn explain(&self, ev: &Value) -> Trace {
        if let Some(bp) = &self.before {
            let (b, a) = (bp.first(ev), self.path.first(ev));
            let holds = Self::is_update(ev) && self.transition_holds(b, a);
            let saw = if !Self::is_update(ev) {
                "no before/after to compare (not an update)".to_string()
            } else {
                format!("before {} → after {}", show(b), show(a))
            };
            return Trace {
                text: self.text.clone(),
                holds,
                saw,
                children: vec![],
            };
        }
        let nodes = self.path.select(ev);
        let holds = nodes.iter().any(|n| self.node_holds(n));
        let saw = match nodes.len() {
            0 => format!("`{}` selected nothing", self.path.text()),
            1 => format!("saw {}", show(Some(nodes[0]))),
            _ => format!(
                "saw {} nodes: {}",
                nodes.len(),
                nodes
                    .iter()
                    .take(5)
                    .map(|n| show(Some(n)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        Trace {
            text: self.text.clone(),
            holds,
            saw,
            children: vec![],
        }
    }
}

fn show(v: Option<&Value>) -> String {
    match v {
        None => "nothing".into(),
        Some(v) => {
            let s = v.to_string();
            if s.chars().count() > 80 {
                format!("{}…", s.chars().take(80).collect::<String>())
            } else {
                s
            }
        }
    }
}

/// Why a condition held or not, for `simulate`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Trace {
    pub text: String,
    pub holds: bool,
    pub saw: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Trace>,
}

impl Condition {
    /// Every comparison in this condition, depth first.
    pub fn comparisons(&self) -> Vec<&Comparison> {
        match self {
            Condition::Cmp(c) => vec![c],
            Condition::All(cs) | Condition::Any(cs) => {
                cs.iter().flat_map(|c| c.comparisons()).collect()
            }
            Condition::Not(c) => c.comparisons(),
        }
    }

    /// True when any comparison's path starts at `$.<name>` (e.g. `with`).
    pub fn reads_member(&self, name: &str) -> bool {
        match self {
            Condition::Cmp(c) => c.path.starts_with_member(name),
            Condition::All(cs) | Condition::Any(cs) => cs.iter().any(|c| c.reads_member(name)),
            Condition::Not(c) => c.reads_member(name),
        }
    }

    /// Evaluates against the event envelope (as JSON).
    pub fn eval(&self, ev: &Value) -> bool {
        match self {
            Condition::Cmp(c) => c.eval(ev),
            Condition::All(cs) => cs.iter().all(|c| c.eval(ev)),
            Condition::Any(cs) => cs.iter().any(|c| c.eval(ev)),
            Condition::Not(c) => !c.eval(ev),
        }
    }

    /// Evaluates through a per-event memo of resolved paths (what routing uses); the same
    /// answer as [`eval`](Self::eval).
    /// A path and a text such that this condition can only hold when the path selects exactly
    /// that string: `<member/index path> == "<text>"`, or `<path> changed_to "<text>"`, with a
    /// text that is not a number (a non-numeric string equals no number, and a simple path
    /// selects at most one node). Routing uses it to skip, without evaluating them, the rules
    /// whose text the event does not have.
    pub fn required_text(&self) -> Option<(&JsonPathExpr, &str)> {
        let Condition::Cmp(c) = self else {
            return None;
        };
        match (&c.op, &c.value) {
            (Op::Eq | Op::ChangedTo, Value::String(s))
                if c.path.is_simple() && as_number(&c.value).is_none() =>
            {
                Some((&c.path, s.as_str()))
            }
            _ => None,
        }
    }

    pub fn eval_in(&self, lk: &mut Lookup<'_>) -> bool {
        match self {
            Condition::Cmp(c) => c.eval_in(lk),
            Condition::All(cs) => cs.iter().all(|c| c.eval_in(lk)),
            Condition::Any(cs) => cs.iter().any(|c| c.eval_in(lk)),
            Condition::Not(c) => !c.eval_in(lk),
        }
    }

    /// Gives every simple path of this condition its memo slot in `interner`.
    pub fn intern(&mut self, interner: &mut Interner) {
        match self {
            Condition::Cmp(c) => c.intern(interner),
            Condition::All(cs) | Condition::Any(cs) => {
                cs.iter_mut().for_each(|c| c.intern(interner))
            }
            Condition::Not(c) => c.intern(interner),
        }
    }

    /// Evaluates and explains; `eval` and `explain` always agree.
    pub fn explain(&self, ev: &Value) -> Trace {
        match self {
            Condition::Cmp(c) => c.explain(ev),
            Condition::All(cs) | Condition::Any(cs) => {
                let children: Vec<Trace> = cs.iter().map(|c| c.explain(ev)).collect();
                let all = matches!(self, Condition::All(_));
                let holds = if all {
                    children.iter().all(|t| t.holds)
                } else {
                    children.iter().any(|t| t.holds)
                };
                Trace {
                    text: if all { "all".into() } else { "any".into() },
                    holds,
                    saw: format!(
                        "{} of {} held",
                        children.iter().filter(|t| t.holds).count(),
                        children.len()
                    ),
                    children,
                }
            }
            Condition::Not(c) => {
                let inner = c.explain(ev);
                Trace {
                    text: "not".into(),
                    holds: !inner.holds,
                    saw: String::new(),
                    children: vec![inner],
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn literal_patterns_answer_as_the_regex_does() {
        let texts = [
            "svc-1-api",
            "my-svc-1-",
            "",
            "SVC-1-x",
            "svc-1",
            "ünï-svc-1-",
            "a.b",
            "axb",
        ];
        for src in [
            "^svc-1-",
            "svc-1-",
            "^",
            "",
            "ünï",
            "^a.b",
            "a\\.b",
            "^svc-[0-9]-",
            "x$",
            "(?i)^svc",
        ] {
            let re = Regex::new(src).unwrap();
            let p = Pattern::new(re.clone());
            let literal = !matches!(p, Pattern::Regex(_));
            assert_eq!(
                literal,
                ["^svc-1-", "svc-1-", "^", "", "ünï"].contains(&src),
                "{src}"
            );
            for t in texts {
                assert_eq!(p.is_match(t), re.is_match(t), "{src} on {t:?}");
            }
        }
    }

    fn holds(cond: &str, ev: &Value) -> bool {
        let c = compile(&Value::String(cond.into()))
            .unwrap_or_else(|e| panic!("{cond}: {}", e.message));
        let r = c.eval(ev);
        assert_eq!(
            r,
            c.explain(ev).holds,
            "eval and explain disagree on {cond}"
        );
        // The memoised evaluation routing uses gives the same answer, also when the memo
        // already holds the paths (evaluated twice with one lookup).
        let mut interned = c.clone();
        let mut interner = Interner::default();
        interned.intern(&mut interner);
        let mut lk = Lookup::new(ev, interner.len());
        assert_eq!(
            interned.eval_in(&mut lk),
            r,
            "memoised eval disagrees on {cond}"
        );
        assert_eq!(
            interned.eval_in(&mut lk),
            r,
            "memoised eval disagrees on {cond}"
        );
        r
    }

    fn update(before: Value, after: Value) -> Value {
        json!({"before": {"properties": before}, "after": {"properties": after}, "blueprint": "svc",
               "labels": {"name": "ws-1", "reason": "idle > 30 days"}, "n": "42", "tags": ["a", "b"]})
    }

    #[test]
    fn comparisons() {
        let ev = update(json!({"cpu": 42}), json!({"cpu": 91, "status": "Degraded"}));
        assert!(holds("$.blueprint == \"svc\"", &ev));
        assert!(holds("$.blueprint == svc", &ev));
        assert!(holds("$.blueprint == 'svc'", &ev));
        assert!(holds("$.blueprint != other", &ev));
        assert!(!holds("$.blueprint != svc", &ev));
        assert!(holds("$.after.properties.cpu > 80", &ev));
        assert!(holds("$.after.properties.cpu >= 91", &ev));
        assert!(!holds("$.after.properties.cpu < 91", &ev));
        assert!(holds("$.after.properties.cpu <= 91.0", &ev));
        assert!(holds("$.after.properties.cpu == 91.0", &ev));
        assert!(
            holds("$.n == 42", &ev),
            "numeric strings compare as numbers"
        );
        assert!(holds("$.n > 9", &ev), "numerically, not lexically");
        assert!(holds(
            "$.after.properties.status in [\"Degraded\", \"Down\"]",
            &ev
        ));
        assert!(!holds("$.after.properties.status in [\"Down\"]", &ev));
        assert!(holds("$.labels.reason contains \"30 days\"", &ev));
        assert!(holds("$.tags contains b", &ev));
        assert!(holds("$.labels contains name", &ev));
        assert!(holds("$.labels.name matches ^ws-\\d+$", &ev));
        assert!(holds("$.labels['name'] exists", &ev));
        assert!(!holds("$.labels.missing exists", &ev));
    }

    #[test]
    fn nothing_selected_is_false_and_explained() {
        let ev = json!({"a": 1});
        assert!(!holds("$.b == 1", &ev));
        assert!(!holds("$.b != 1", &ev));
        let c = compile(&json!("$.b == 1")).unwrap();
        assert!(c.explain(&ev).saw.contains("selected nothing"));
        let not = compile(&json!({"not": "$.b == 1"})).unwrap();
        assert!(not.eval(&ev));
    }

    #[test]
    fn transitions() {
        let ev = update(
            json!({"cpu": 42, "health": "Healthy"}),
            json!({"cpu": 91, "health": "Degraded"}),
        );
        assert!(holds("$.after.properties.cpu crosses_above 80", &ev));
        assert!(!holds("$.after.properties.cpu crosses_above 95", &ev));
        assert!(!holds("$.after.properties.cpu crosses_below 80", &ev));
        assert!(holds("$.after.properties.health changed", &ev));
        assert!(holds("$.after.properties.health changed_to Degraded", &ev));
        assert!(holds("$.after.properties.health changed_from Healthy", &ev));
        assert!(!holds(
            "$.after.properties.health changed_from Degraded",
            &ev
        ));
        let bump = update(
            json!({"cpu": 42, "health": "Healthy"}),
            json!({"cpu": 55, "health": "Healthy"}),
        );
        assert!(!holds("$.after.properties.cpu crosses_above 80", &bump));
        assert!(!holds("$.after.properties.health changed", &bump));
        let down = update(json!({"cpu": 91}), json!({"cpu": 20}));
        assert!(holds("$.after.properties.cpu crosses_below 80", &down));
        assert!(!holds("$.after.properties.cpu crosses_above 80", &down));
        // A property that appears counts as changed; a create (no before) is not a transition.
        let appeared = update(json!({}), json!({"health": "Degraded"}));
        assert!(holds(
            "$.after.properties.health changed_to Degraded",
            &appeared
        ));
        let created = json!({"before": null, "after": {"properties": {"health": "Degraded"}}});
        assert!(!holds(
            "$.after.properties.health changed_to Degraded",
            &created
        ));
    }

    #[test]
    fn structured_forms() {
        let ev = update(json!({"cpu": 42}), json!({"cpu": 91}));
        let c = compile(&json!({"any": [
            {"path": "$.after.properties.cpu", "op": ">", "value": 95},
            {"all": ["$.blueprint == svc", {"not": {"path": "$.x", "op": "exists"}}]}
        ]}))
        .unwrap();
        assert!(c.eval(&ev));
        assert!(c.explain(&ev).holds);
    }

    #[test]
    fn errors_point_at_the_problem() {
        let e = compile(&json!("$.a ~= 1")).unwrap_err();
        assert!(e.message.contains("unknown operator"));
        assert_eq!(e.offset, Some(4));
        let e = compile(&json!("$.after.x crosses_above high")).unwrap_err();
        assert!(e.message.contains("needs a number"));
        let e = compile(&json!("$.x matches ([a-")).unwrap_err();
        assert!(e.message.contains("regular expression"));
        assert_eq!(e.offset, Some(12));
        let e = compile(&json!("$.x[ == 1")).unwrap_err();
        assert!(e.message.contains("JSONPath"), "{}", e.message);
        let e = compile(&json!("$.before.x changed")).unwrap_err();
        assert!(e.message.contains("$.after"));
        let e = compile(&json!("blueprint == x")).unwrap_err();
        assert!(e.message.contains("starts with a JSONPath"));
        let e = compile(&json!({"path": "$.x", "op": "==", "valeu": 1})).unwrap_err();
        assert!(e.hint.unwrap().contains("value"));
        assert_eq!(e.subpath, ".valeu");
    }
}
