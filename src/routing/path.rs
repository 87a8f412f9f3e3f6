//! Compiled JSONPath (RFC 9535).
//!
//! Paths are parsed once at load time. `serde_json_path` decides what is a valid path and
//! evaluates the general ones (wildcards, filters, slices, descendants, functions): it passes
//! the whole JSONPath Compliance Test Suite, where `jsonpath-rust` (used before) missed 8 of its
//! 703 cases (descendant order, nested filters, function well-typedness; `tests/jsonpath_cts.rs`).
//! Most rule paths are plain member/index chains (`$.after.properties.cpuUtil`); those are
//! evaluated by walking the tree directly, which gives exactly the RFC's result for such paths
//! (a property test compares the two on generated documents) without the general engine's
//! node-list machinery. `jsonpath-rust`'s parser still tells such chains apart, since its syntax
//! tree is public.
//!
//! Rules tend to read the same few paths (`$.blueprint`, `$.after.properties.status`) again and
//! again. When a ruleset is assembled, every member/index chain its conditions use gets a
//! *slot* ([`Interner`]); routing one event then resolves each slot at most once through a
//! [`Lookup`], so a hundred rules over five distinct paths walk the event five times, not a
//! hundred. The result is the same as walking each time (the walk is a pure function of the
//! event); only the number of map lookups changes.

use std::collections::HashMap;

use jsonpath_rust::parser::model::{JpQuery, Segment, Selector};
use serde_json::Value;

/// Refuses paths whose cost grows faster than the event: a descendant segment (`..`) inside a
/// filter runs a whole-subtree search for every node the outer part visits (`$..[?@..[?@..x]]`
/// took 52 s on a 1 MB event), and so, to a lesser degree, does a second `..`. One `..` outside
/// filters is linear in the event and allowed. (`..` inside a quoted name counts too: such a
/// path is refused with the same message, which errs on the safe side.)
fn bounded(text: &str) -> Result<(), String> {
    let descendants = text.matches("..").count();
    let in_filter = text.find("[?").is_some_and(|i| text[i..].contains(".."));
    if in_filter || descendants > 1 {
        return Err(
            "a descendant segment (`..`) inside a filter, or more than one, can take minutes on a large event; \
             write the path out, or use a single `..` outside filters"
                .into(),
        );
    }
    Ok(())
}

/// Parses `text` with `serde_json_path`, which must never be reached with a path that ends
/// inside a quoted name: its string parser reads `\u` escapes with a streaming combinator, and
/// running out of input there hits an `unreachable!` (`$["$\u` panicked; found by the
/// `condition` fuzz target). Such a path is refused here first ("unterminated string"), and the
/// call is wrapped in `catch_unwind` so that any other input of that kind is an error too, not
/// a panic: parsing is a pure function of `text`, so nothing is left half-changed by an unwind.
fn parse_general(text: &str) -> Result<serde_json_path::JsonPath, String> {
    let shape = scan(text);
    if shape.filter_depth > MAX_FILTER_DEPTH {
        return Err(format!(
            "filters nested {} deep; at most {MAX_FILTER_DEPTH} (the parser's time doubles with each level: 20 levels took 4 s)",
            shape.filter_depth
        ));
    }
    if let Some(at) = shape.unterminated {
        return Err(format!(
            "unterminated string starting at position {at}: a quoted name or literal needs its closing quote"
        ));
    }
    match std::panic::catch_unwind(|| serde_json_path::JsonPath::parse(text)) {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(clean_error(&e.to_string())),
        Err(_) => {
            Err("the JSONPath parser could not read this path; check its quotes and escapes".into())
        }
    }
}

/// How deeply filter selectors (`[?…]`) may nest. `serde_json_path` backtracks into every
/// level, so parsing doubles with each one: 16 levels took 0.25 s, 20 took 4 s, 24 took 66 s
/// (the `condition` fuzz target found a 423-byte condition that took 10 s). Paths in rules
/// nest filters two or three deep; six parse in well under a millisecond.
pub const MAX_FILTER_DEPTH: usize = 6;

/// What one pass over a path's text finds before it is parsed.
struct Shape {
    /// The deepest nesting of filter selectors (brackets inside quoted names do not count; one
    /// left open counts as if closed at the end).
    filter_depth: usize,
    /// The character position of a quote (`'` or `"`) that is never closed, honouring
    /// backslash escapes inside quoted text.
    unterminated: Option<usize>,
}

fn scan(text: &str) -> Shape {
    let mut stack: Vec<bool> = Vec::new();
    let (mut depth, mut max) = (0usize, 0usize);
    let mut open: Option<(char, usize)> = None;
    let mut chars = text.chars().enumerate().peekable();
    while let Some((i, c)) = chars.next() {
        match open {
            Some(_) if c == '\\' => {
                chars.next();
            }
            Some((q, _)) if c == q => open = None,
            Some(_) => {}
            None => match c {
                '\'' | '"' => open = Some((c, i)),
                '[' => {
                    while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
                        chars.next();
                    }
                    let filter = chars.peek().is_some_and(|(_, c)| *c == '?');
                    if filter {
                        depth += 1;
                        max = max.max(depth);
                    }
                    stack.push(filter);
                }
                ']' if stack.pop() == Some(true) => depth -= 1,
                _ => {}
            },
        }
    }
    Shape {
        filter_depth: max,
        unterminated: open.map(|(_, at)| at),
    }
}

/// [`scan`]'s filter depth (tests).
#[cfg(test)]
fn scan_depth(text: &str) -> usize {
    scan(text).filter_depth
}

/// A JSONPath ready to evaluate.
#[derive(Debug, Clone)]
pub struct JsonPathExpr {
    text: String,
    kind: Kind,
    /// The memo slot of a simple path inside an assembled ruleset (see [`Interner`]).
    slot: Option<u32>,
}

#[derive(Debug, Clone)]
enum Kind {
    Simple(Vec<Step>),
    /// The compiled path, and its leading member/index steps (for `members()` and
    /// `starts_with_member`).
    General(Box<serde_json_path::JsonPath>, Vec<Step>),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Step {
    Name(String),
    Index(i64),
}

impl JsonPathExpr {
    /// Parses `text`. The error is the parser's message.
    pub fn compile(text: &str) -> Result<Self, String> {
        let general = parse_general(text)?;
        bounded(text)?;
        let steps = jsonpath_rust::parser::parse_json_path(text)
            .ok()
            .map(|q| leading_steps(&q));
        let kind = match steps {
            Some((steps, true)) => Kind::Simple(steps),
            Some((prefix, false)) => Kind::General(Box::new(general), prefix),
            None => Kind::General(Box::new(general), Vec::new()),
        };
        Ok(JsonPathExpr {
            text: text.to_string(),
            kind,
            slot: None,
        })
    }

    /// The same path evaluated by the general engine only (tests compare the two).
    #[doc(hidden)]
    pub fn select_general<'a>(&self, root: &'a Value) -> Vec<&'a Value> {
        match parse_general(&self.text) {
            Ok(p) => p.query(root).all(),
            Err(_) => Vec::new(),
        }
    }

    /// The leading member and index steps (all of a simple path; of a general one, the part
    /// before its first wildcard, filter or slice): what `check` compares with the envelope.
    pub fn members(&self) -> Vec<crate::envelope::Seg> {
        use crate::envelope::Seg;
        self.steps()
            .iter()
            .map(|s| match s {
                Step::Name(n) => Seg::Name(n.clone()),
                Step::Index(_) => Seg::Index,
            })
            .collect()
    }

    /// The member/index steps: all of a simple path, the leading ones of a general path.
    fn steps(&self) -> &[Step] {
        match &self.kind {
            Kind::Simple(steps) | Kind::General(_, steps) => steps,
        }
    }

    /// The path as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// True when the path starts with `$.<name>` for the given name.
    pub fn starts_with_member(&self, name: &str) -> bool {
        matches!(self.steps().first(), Some(Step::Name(n)) if n == name)
    }

    /// The same path with its first member replaced: `$.after.x` → `$.before.x`.
    pub fn with_first_member(&self, name: &str) -> Option<Self> {
        let Some(Step::Name(first)) = self.steps().first() else {
            return None;
        };
        let text = self.text.replacen(first.as_str(), name, 1);
        JsonPathExpr::compile(&text).ok()
    }

    /// Walks a member/index chain; `None` when a step is missing.
    fn walk<'a>(steps: &[Step], root: &'a Value) -> Option<&'a Value> {
        let mut cur = root;
        for s in steps {
            cur = match (s, cur) {
                (Step::Name(n), Value::Object(m)) => m.get(n)?,
                (Step::Index(i), Value::Array(a)) => {
                    let idx = if *i < 0 { a.len() as i64 + *i } else { *i };
                    a.get(usize::try_from(idx).ok()?)?
                }
                _ => return None,
            };
        }
        Some(cur)
    }

    /// True when any selected node satisfies `f` (no allocation for simple paths).
    pub fn any(&self, root: &Value, f: impl FnMut(&Value) -> bool) -> bool {
        match &self.kind {
            Kind::Simple(steps) => Self::walk(steps, root).is_some_and(f),
            Kind::General(..) => self.select(root).into_iter().any(f),
        }
    }

    /// The nodes the path selects in `root` (the RFC's nodelist, values only).
    pub fn select<'a>(&self, root: &'a Value) -> Vec<&'a Value> {
        match &self.kind {
            Kind::Simple(steps) => Self::walk(steps, root).into_iter().collect(),
            Kind::General(p, _) => p.query(root).all(),
        }
    }

    /// The first selected node, if any.
    pub fn first<'a>(&self, root: &'a Value) -> Option<&'a Value> {
        match &self.kind {
            Kind::Simple(steps) => Self::walk(steps, root),
            Kind::General(..) => self.select(root).into_iter().next(),
        }
    }

    /// [`first`](Self::first), memoised in `lk` when the path has a slot.
    pub fn first_in<'a>(&self, lk: &mut Lookup<'a>) -> Option<&'a Value> {
        match (&self.kind, self.slot) {
            (Kind::Simple(steps), Some(slot)) => lk.resolve(slot, steps),
            _ => self.first(lk.root),
        }
    }

    /// [`any`](Self::any), memoised in `lk` when the path has a slot.
    pub fn any_in(&self, lk: &mut Lookup<'_>, f: impl FnMut(&Value) -> bool) -> bool {
        match (&self.kind, self.slot) {
            (Kind::Simple(steps), Some(slot)) => lk.resolve(slot, steps).is_some_and(f),
            _ => self.any(lk.root, f),
        }
    }

    /// True for a plain member/index chain (what the fast walk evaluates), interned or not.
    pub fn is_chain(&self) -> bool {
        matches!(self.kind, Kind::Simple(_))
    }

    /// True for a member/index chain that has its memo slot (selects at most one node).
    pub fn is_simple(&self) -> bool {
        matches!(self.kind, Kind::Simple(_)) && self.slot.is_some()
    }

    /// The memo slot, for a simple path inside an assembled ruleset.
    pub fn slot(&self) -> Option<u32> {
        self.slot
    }

    /// Gives a simple path its memo slot (general paths keep none).
    pub fn intern(&mut self, interner: &mut Interner) {
        if let Kind::Simple(steps) = &self.kind {
            self.slot = Some(interner.slot(steps));
        }
    }
}

/// Assigns one slot per distinct member/index chain of a ruleset.
#[derive(Debug, Default)]
pub struct Interner {
    slots: HashMap<Vec<Step>, u32>,
}

impl Interner {
    fn slot(&mut self, steps: &[Step]) -> u32 {
        let next = self.slots.len() as u32;
        *self.slots.entry(steps.to_vec()).or_insert(next)
    }

    /// The slot of `$.<name>` (used for the `before`/`after` test of transitions).
    pub fn member(&mut self, name: &str) -> u32 {
        self.slot(&[Step::Name(name.to_string())])
    }

    /// How many slots were handed out.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no slot was handed out.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// The paths of one event resolved so far (for one routing of one event).
pub struct Lookup<'a> {
    root: &'a Value,
    /// `None`: not resolved yet; `Some(None)`: the path selects nothing.
    memo: Vec<Option<Option<&'a Value>>>,
}

impl<'a> Lookup<'a> {
    /// An empty memo over `root`, sized for `slots` slots (it grows if needed).
    pub fn new(root: &'a Value, slots: usize) -> Self {
        Lookup {
            root,
            memo: vec![None; slots],
        }
    }

    fn memo(
        &mut self,
        slot: u32,
        walk: impl FnOnce(&'a Value) -> Option<&'a Value>,
    ) -> Option<&'a Value> {
        let i = slot as usize;
        if i >= self.memo.len() {
            self.memo.resize(i + 1, None);
        }
        if let Some(v) = self.memo[i] {
            return v;
        }
        let v = walk(self.root);
        self.memo[i] = Some(v);
        v
    }

    fn resolve(&mut self, slot: u32, steps: &[Step]) -> Option<&'a Value> {
        self.memo(slot, |root| JsonPathExpr::walk(steps, root))
    }

    /// `$.<name>` through the memo, when the interner gave it `slot`.
    pub fn member(&mut self, slot: Option<u32>, name: &str) -> Option<&'a Value> {
        match slot {
            Some(s) => self.memo(s, |root| root.get(name)),
            None => self.root.get(name),
        }
    }
}

/// The leading member/index steps of a parsed path, and whether they are all of it.
fn leading_steps(q: &JpQuery) -> (Vec<Step>, bool) {
    let mut steps = Vec::new();
    for seg in &q.segments {
        match seg {
            Segment::Selector(Selector::Name(n)) => steps.push(Step::Name(n.clone())),
            Segment::Selector(Selector::Index(i)) => steps.push(Step::Index(*i)),
            _ => return (steps, false),
        }
    }
    (steps, true)
}

fn clean_error(msg: &str) -> String {
    // pest errors are multi-line with their own arrows; keep the first informative line.
    let first = msg.lines().find(|l| !l.trim().is_empty()).unwrap_or(msg);
    let mut s = first.trim().to_string();
    if let Some(exp) = msg.lines().find(|l| l.contains("expected")) {
        if !s.contains("expected") {
            s = format!("{s}: {}", exp.trim().trim_start_matches('=').trim());
        }
    }
    s
}

#[cfg(test)]
mod tests {

    /// The `condition` fuzz target's find: a path ending inside a `\u` escape made
    /// `serde_json_path` reach `unreachable!`. Every path ending inside a quoted string is an
    /// error now, and none panics.
    #[test]
    fn paths_ending_inside_a_string_are_errors_not_panics() {
        for p in [
            "$[\"$\\u",
            "$[\"\\u",
            "$['\\u00",
            "$[\"\\uD83D\\u",
            "$[\"abc",
            "$['a\\'",
            "$[?@.a == \"x",
        ] {
            let e = JsonPathExpr::compile(p).expect_err(p);
            assert!(e.contains("unterminated string"), "{p}: {e}");
        }
        for p in ["$[\"a\\\"b\"]", "$['it\\'s']", "$[\"\\u00e9\"]"] {
            assert!(JsonPathExpr::compile(p).is_ok(), "{p}");
        }
    }

    /// The `condition` fuzz target's second find: nested filters make the parser's time double
    /// per level (a 423-byte condition took 10 s). Past `MAX_FILTER_DEPTH` they are refused
    /// before parsing; at it they parse.
    #[test]
    fn filters_nested_too_deep_are_refused_before_parsing() {
        let nested = |d: usize| format!("$[?{}@.a{}]", "@[?".repeat(d - 1), "]".repeat(d - 1));
        assert!(JsonPathExpr::compile(&nested(MAX_FILTER_DEPTH)).is_ok());
        for p in [
            nested(MAX_FILTER_DEPTH + 1),
            nested(24),
            format!("$[?{}1", "$[?(".repeat(40)),
            format!("$[?{}", "$[ ?".repeat(30)),
        ] {
            let e = JsonPathExpr::compile(&p).expect_err(&p);
            // Refused by counting (24 levels would parse for about a minute).
            assert!(e.contains("filters nested"), "{p}: {e}");
        }
        // Brackets in quoted names are names, not filters.
        assert_eq!(scan_depth("$['[?[?[?[?[?[?[?[?']"), 0);
        assert_eq!(scan_depth("$.a[?@.b[?@.c == 1]]"), 2);
    }

    #[test]
    fn paths_that_grow_faster_than_the_event_are_refused() {
        for p in ["$..[?@..x]", "$..a..b", "$[?@..x == 1]"] {
            assert!(JsonPathExpr::compile(p).is_err(), "{p}");
        }
        for p in ["$..x", "$..[?@.x == 1]", "$.a[?@.b > 2].c"] {
            assert!(JsonPathExpr::compile(p).is_ok(), "{p}");
        }
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn simple_and_general_paths_agree() {
        let v = json!({"after": {"properties": {"cpuUtil": 91, "tags": ["a", "b"]}}});
        for p in [
            "$.after.properties.cpuUtil",
            "$['after']['properties']['cpuUtil']",
            "$.after.properties.tags[1]",
            "$.after.properties.tags[-1]",
        ] {
            let e = JsonPathExpr::compile(p).unwrap();
            let general = jsonpath_rust::query::js_path_vals(p, &v).unwrap();
            assert_eq!(e.select(&v), general, "{p}");
        }
        let wild = JsonPathExpr::compile("$.after.properties.tags[*]").unwrap();
        assert_eq!(wild.select(&v).len(), 2);
        let filt = JsonPathExpr::compile("$.after.properties.tags[?@ == 'b']").unwrap();
        assert_eq!(filt.select(&v), vec![&json!("b")]);
    }

    #[test]
    fn missing_paths_select_nothing_and_bad_paths_fail() {
        let v = json!({"a": 1});
        assert!(JsonPathExpr::compile("$.b.c")
            .unwrap()
            .select(&v)
            .is_empty());
        assert!(JsonPathExpr::compile("$.a[").is_err());
        assert!(JsonPathExpr::compile("after.x").is_err());
    }

    #[test]
    fn before_path_is_derived_from_after() {
        let e = JsonPathExpr::compile("$.after.properties.x").unwrap();
        let b = e.with_first_member("before").unwrap();
        assert_eq!(b.text(), "$.before.properties.x");
        let v = json!({"before": {"properties": {"x": 1}}});
        assert_eq!(b.select(&v), vec![&json!(1)]);
    }
}
