//! YAML to a JSON tree, keeping where every key and value came from.
//!
//! Why not deserialize YAML straight into the config types? Because the errors users need are
//! mostly *semantic* (a JSONPath that does not compile, a destination that does not exist, a
//! template that fails to render) and they must point at `file:line:column`. So the loader turns
//! a file into a plain [`serde_json::Value`] plus a [`SpanMap`] from each node's path to its
//! position, deserializes the typed config from the value, and looks every later diagnostic up
//! in the span map.
//!
//! The parser is `saphyr-parser` (the maintained successor of yaml-rust/yaml-rust2, YAML 1.2,
//! event API with spans). `serde_yaml` is unmaintained; `serde-saphyr` deserializes directly into
//! types and so cannot give positions for values that only turn out to be wrong later. Building
//! the tree from events ourselves also lets us set hard limits: depth, node count (which is what
//! stops a "billion laughs" alias bomb: every alias expansion is counted) and input size.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};
use serde_json::{Map, Number, Value};

/// Hard limits for one rules file. A file over any of them is rejected with a clear error.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted file, in bytes.
    pub max_bytes: usize,
    /// Deepest accepted nesting of mappings and sequences.
    pub max_depth: usize,
    /// Most nodes after alias expansion.
    pub max_nodes: usize,
    /// Most bytes of scalar text after alias expansion: a few nodes can still be a bomb when
    /// one of them is a megabyte-long string aliased thousands of times.
    pub max_expanded_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 4 * 1024 * 1024,
            max_depth: 64,
            max_nodes: 200_000,
            max_expanded_bytes: 16 * 1024 * 1024,
        }
    }
}

/// A position in a source file: 1-based line, 1-based column, and byte offset/length for
/// rendering a caret under the offending text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
    /// Byte offset of the start.
    #[serde(skip)]
    pub offset: usize,
    /// Length in bytes (at least 1 when rendered).
    #[serde(skip)]
    pub len: usize,
}

/// A path into the tree: `rules[3].where[1]`, `destinations.console`.
pub type NodePath = String;

/// Where each node of a parsed file sits. Keys are [`NodePath`]s.
#[derive(Debug, Default, Clone)]
pub struct SpanMap {
    /// Span of each value.
    pub values: HashMap<NodePath, Pos>,
    /// Span of the key that introduced a mapping value.
    pub keys: HashMap<NodePath, Pos>,
}

impl SpanMap {
    /// The position of the value at `path`, or of its closest ancestor that has one.
    pub fn value(&self, path: &str) -> Pos {
        lookup(&self.values, path)
    }
    /// The position of the key at `path` (falls back to the value, then ancestors).
    pub fn key(&self, path: &str) -> Pos {
        self.keys
            .get(path)
            .copied()
            .unwrap_or_else(|| lookup(&self.values, path))
    }
}

fn lookup(map: &HashMap<NodePath, Pos>, path: &str) -> Pos {
    let mut p = path.to_string();
    loop {
        if let Some(pos) = map.get(&p) {
            return *pos;
        }
        match parent(&p) {
            Some(up) => p = up,
            None => return map.get("").copied().unwrap_or_default(),
        }
    }
}

/// The parent path of `rules[3].where` is `rules[3]`, of `rules[3]` is `rules`.
pub fn parent(path: &str) -> Option<String> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(path[..cut].to_string())
}

/// Appends a map key to a path.
pub fn join_key(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Appends a sequence index to a path.
pub fn join_index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Why a file could not be turned into a tree.
#[derive(Debug, Clone)]
pub struct YamlError {
    pub message: String,
    pub pos: Pos,
    pub hint: Option<String>,
}

enum Frame {
    Seq {
        items: Vec<Value>,
        path: NodePath,
        anchor: usize,
        start: Pos,
    },
    Map {
        map: Map<String, Value>,
        path: NodePath,
        pending_key: Option<(String, Pos)>,
        anchor: usize,
        start: Pos,
        /// Mappings merged in with `<<: *anchor` (YAML's merge key), applied at the end so
        /// that the mapping's own keys win wherever they are written.
        merges: Vec<(Map<String, Value>, Pos)>,
    },
}

fn pos_of(src: &str, span: &Span, char_to_byte: &CharIndex) -> Pos {
    let start = char_to_byte.byte(span.start.index(), src);
    let end = char_to_byte.byte(span.end.index(), src).max(start);
    Pos {
        line: span.start.line(),
        column: span.start.col() + 1,
        offset: start,
        len: (end - start).max(1),
    }
}

/// saphyr reports character indices; diagnostics need byte offsets.
struct CharIndex {
    ascii: bool,
    offsets: Vec<usize>,
}

impl CharIndex {
    fn new(src: &str) -> Self {
        if src.is_ascii() {
            CharIndex {
                ascii: true,
                offsets: Vec::new(),
            }
        } else {
            CharIndex {
                ascii: false,
                offsets: src.char_indices().map(|(b, _)| b).collect(),
            }
        }
    }
    fn byte(&self, char_idx: usize, src: &str) -> usize {
        if self.ascii {
            char_idx.min(src.len())
        } else {
            self.offsets.get(char_idx).copied().unwrap_or(src.len())
        }
    }
}

/// Parses one YAML document into a JSON tree and a span map, within `limits`.
///
/// An empty file is an empty mapping. More than one document is an error (a rules file is one
/// document). Tags are ignored except that they never change the type of a scalar.
pub fn parse(src: &str, limits: Limits) -> Result<(Value, SpanMap), YamlError> {
    if src.len() > limits.max_bytes {
        return Err(YamlError {
            message: format!(
                "file is {} bytes, over the limit of {} bytes",
                src.len(),
                limits.max_bytes
            ),
            pos: Pos {
                line: 1,
                column: 1,
                offset: 0,
                len: 1,
            },
            hint: Some(
                "split the rules into several files, or check that this is really a rules file"
                    .into(),
            ),
        });
    }
    let idx = CharIndex::new(src);
    let mut spans = SpanMap::default();
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, (Value, usize, usize)> = HashMap::new();
    // Scalar bytes of the document as expanded (aliases count as often as they are used).
    let mut expanded: usize = 0;
    let mut root: Option<Value> = None;
    let mut nodes: usize = 0;
    let mut documents = 0;

    for item in Parser::new_from_str(src) {
        let (event, span) = item.map_err(|e| {
            let m = e.marker();
            let offset = idx.byte(m.index(), src);
            YamlError {
                message: format!("invalid YAML: {}", e.info()),
                pos: Pos {
                    line: m.line(),
                    column: m.col() + 1,
                    offset,
                    len: 1,
                },
                hint: Some("check the indentation and quoting around this spot".into()),
            }
        })?;
        let pos = pos_of(src, &span, &idx);
        let err = |message: String, hint: &str| YamlError {
            message,
            pos,
            hint: Some(hint.to_string()),
        };
        // The node produced by this event, if it completes one, with its anchor and node count.
        let done: Option<(Value, usize, usize, Pos)> = match event {
            Event::StreamStart | Event::StreamEnd | Event::Nothing | Event::DocumentEnd => None,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(err(
                        "a rules file holds one YAML document, found a second `---`".into(),
                        "put each document in its own file",
                    ));
                }
                None
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some((v, count, bytes)) => {
                    expanded = expanded.saturating_add(*bytes);
                    if expanded > limits.max_expanded_bytes {
                        return Err(err(
                            format!(
                                "document expands to more than {} MiB through aliases (an alias bomb?)",
                                limits.max_expanded_bytes >> 20
                            ),
                            "alias large values fewer times, or write them out once",
                        ));
                    }
                    nodes = nodes.saturating_add(*count);
                    if nodes > limits.max_nodes {
                        return Err(err(
                            format!(
                                "document expands to more than {} nodes (an alias bomb?)",
                                limits.max_nodes
                            ),
                            "avoid nesting aliases of aliases; write the values out",
                        ));
                    }
                    Some((v.clone(), 0, *count, pos))
                }
                None => {
                    return Err(err(
                        "alias to an unknown anchor".into(),
                        "define the anchor (&name) before using it (*name)",
                    ))
                }
            },
            Event::Scalar(text, style, anchor, tag) => {
                nodes += 1;
                expanded = expanded.saturating_add(text.len());
                let plain = matches!(style, ScalarStyle::Plain) && tag.is_none();
                Some((scalar(&text, plain), anchor, 1, pos))
            }
            Event::SequenceStart(anchor, _) => {
                if stack.len() >= limits.max_depth {
                    return Err(err(
                        format!("nesting deeper than {} levels", limits.max_depth),
                        "rules files never need this much nesting; flatten the structure",
                    ));
                }
                let path = child_path(&stack);
                stack.push(Frame::Seq {
                    items: Vec::new(),
                    path,
                    anchor,
                    start: pos,
                });
                nodes += 1;
                None
            }
            Event::MappingStart(anchor, _) => {
                if stack.len() >= limits.max_depth {
                    return Err(err(
                        format!("nesting deeper than {} levels", limits.max_depth),
                        "rules files never need this much nesting; flatten the structure",
                    ));
                }
                let path = child_path(&stack);
                stack.push(Frame::Map {
                    map: Map::new(),
                    path,
                    pending_key: None,
                    anchor,
                    start: pos,
                    merges: Vec::new(),
                });
                nodes += 1;
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq {
                    items,
                    anchor,
                    start,
                    ..
                }) => {
                    let count = 1 + items.iter().map(count_nodes).sum::<usize>();
                    Some((Value::Array(items), anchor, count, start))
                }
                _ => return Err(err("unbalanced sequence".into(), "check the indentation")),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map {
                    mut map,
                    anchor,
                    start,
                    pending_key,
                    merges,
                    path,
                }) => {
                    if pending_key.is_some() {
                        return Err(err(
                            "mapping key without a value".into(),
                            "check the indentation",
                        ));
                    }
                    for (merged, mpos) in merges {
                        for (k, v) in merged {
                            if !map.contains_key(&k) {
                                spans.values.entry(join_key(&path, &k)).or_insert(mpos);
                                map.insert(k, v);
                            }
                        }
                    }
                    let count = 1 + map.values().map(count_nodes).sum::<usize>();
                    Some((Value::Object(map), anchor, count, start))
                }
                _ => return Err(err("unbalanced mapping".into(), "check the indentation")),
            },
        };
        if nodes > limits.max_nodes {
            return Err(err(
                format!("document has more than {} nodes", limits.max_nodes),
                "split the rules into several files",
            ));
        }
        let Some((value, anchor, count, vpos)) = done else {
            continue;
        };
        if anchor > 0 {
            let bytes = scalar_bytes(&value);
            anchors.insert(anchor, (value.clone(), count, bytes));
        }
        // Attach the finished node to its parent.
        match stack.last_mut() {
            None => {
                spans.values.insert(String::new(), vpos);
                root = Some(value);
            }
            Some(Frame::Seq { items, path, .. }) => {
                let p = join_index(path, items.len());
                spans.values.entry(p).or_insert(vpos);
                items.push(value);
            }
            Some(Frame::Map {
                map,
                path,
                pending_key,
                merges,
                ..
            }) => match pending_key.take() {
                None => {
                    let key = match value {
                        Value::String(s) => s,
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        Value::Null => "null".to_string(),
                        _ => {
                            return Err(YamlError {
                                message:
                                    "a mapping key must be a plain value, not a list or mapping"
                                        .into(),
                                pos: vpos,
                                hint: Some("quote the key".into()),
                            })
                        }
                    };
                    if map.contains_key(&key) {
                        return Err(YamlError {
                            message: format!("duplicate key `{key}`"),
                            pos: vpos,
                            hint: Some(
                                "each key may appear once in a mapping; remove or merge one".into(),
                            ),
                        });
                    }
                    spans.keys.insert(join_key(path, &key), vpos);
                    *pending_key = Some((key, vpos));
                }
                Some((key, _)) if key == "<<" => {
                    let maps = match value {
                        Value::Object(m) => vec![m],
                        Value::Array(items) if items.iter().all(Value::is_object) => items
                            .into_iter()
                            .filter_map(|v| match v {
                                Value::Object(m) => Some(m),
                                _ => None,
                            })
                            .collect(),
                        _ => {
                            return Err(YamlError {
                                message: "a merge key (`<<`) takes a mapping or a list of mappings"
                                    .into(),
                                pos: vpos,
                                hint: Some(
                                    "e.g. `<<: *defaults` where `defaults` anchors a mapping"
                                        .into(),
                                ),
                            })
                        }
                    };
                    merges.extend(maps.into_iter().map(|m| (m, vpos)));
                }
                Some((key, _)) => {
                    let p = join_key(path, &key);
                    spans.values.entry(p).or_insert(vpos);
                    map.insert(key, value);
                }
            },
        }
    }
    Ok((root.unwrap_or_else(|| Value::Object(Map::new())), spans))
}

/// Record the start position of a container being opened, keyed by its eventual path.
fn child_path(stack: &[Frame]) -> NodePath {
    match stack.last() {
        None => String::new(),
        Some(Frame::Seq { items, path, .. }) => join_index(path, items.len()),
        Some(Frame::Map {
            path, pending_key, ..
        }) => match pending_key {
            Some((k, _)) => join_key(path, k),
            // A container used as a key: rejected when it completes.
            None => path.clone(),
        },
    }
}

/// Bytes of scalar text in a tree (keys included), as [`Limits::max_expanded_bytes`] counts.
fn scalar_bytes(v: &Value) -> usize {
    match v {
        Value::Array(a) => a.iter().map(scalar_bytes).sum(),
        Value::Object(m) => m.iter().map(|(k, v)| k.len() + scalar_bytes(v)).sum(),
        Value::String(s) => s.len(),
        other => other.to_string().len(),
    }
}

fn count_nodes(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(count_nodes).sum::<usize>(),
        Value::Object(m) => 1 + m.values().map(count_nodes).sum::<usize>(),
        _ => 1,
    }
}

/// YAML 1.2 core schema resolution for plain scalars; quoted scalars are always strings.
fn scalar(text: &str, plain: bool) -> Value {
    if !plain {
        return Value::String(text.to_string());
    }
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let looks_numeric = text
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_digit() || b == b'-' || b == b'+' || b == b'.');
    if looks_numeric {
        let t = text.strip_prefix('+').unwrap_or(text);
        if let Ok(i) = t.parse::<i64>() {
            return Value::Number(i.into());
        }
        if let Some(hex) = t.strip_prefix("0x") {
            if let Ok(i) = i64::from_str_radix(hex, 16) {
                return Value::Number(i.into());
            }
        }
        if t.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        {
            if let Ok(f) = t.parse::<f64>() {
                if let Some(n) = Number::from_f64(f) {
                    return Value::Number(n);
                }
            }
        }
    }
    Value::String(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_point_at_values_and_keys() {
        let src = "rules:\n  - id: a\n    where:\n      - $.x == 1\n";
        let (v, spans) = parse(src, Limits::default()).unwrap();
        assert_eq!(v["rules"][0]["where"][0], "$.x == 1");
        let p = spans.value("rules[0].where[0]");
        assert_eq!((p.line, p.column), (4, 9));
        let k = spans.key("rules[0].where");
        assert_eq!((k.line, k.column), (3, 5));
    }

    #[test]
    fn alias_bomb_is_rejected() {
        let mut src = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        let mut prev = 'a';
        for c in 'b'..='j' {
            src.push_str(&format!("{c}: &{c} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
            prev = c;
        }
        let e = parse(&src, Limits::default()).unwrap_err();
        assert!(e.message.contains("nodes"), "{}", e.message);
    }

    #[test]
    fn a_large_scalar_aliased_many_times_is_rejected_by_its_bytes() {
        let mut src = format!("big: &big \"{}\"\nmany:\n", "x".repeat(1 << 20));
        for _ in 0..20_000 {
            src.push_str("  - *big\n");
        }
        let e = parse(&src, Limits::default()).unwrap_err();
        assert!(e.message.contains("MiB through aliases"), "{}", e.message);
        assert!(
            e.pos.line > 2,
            "points at the alias that went over: {:?}",
            e.pos
        );
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let src = "[".repeat(10_000);
        let e = parse(&src, Limits::default()).unwrap_err();
        assert!(
            e.message.contains("nesting") || e.message.contains("invalid"),
            "{}",
            e.message
        );
    }

    #[test]
    fn scalars_resolve_like_yaml_1_2() {
        let (v, _) = parse(
            "a: 80\nb: '80'\nc: 1.5\nd: yes\ne: ~\nf: true\n",
            Limits::default(),
        )
        .unwrap();
        assert_eq!(v["a"], 80);
        assert_eq!(v["b"], "80");
        assert_eq!(v["c"], 1.5);
        assert_eq!(v["d"], "yes");
        assert!(v["e"].is_null());
        assert_eq!(v["f"], true);
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = parse("a: 1\na: 2\n", Limits::default()).unwrap_err();
        assert_eq!(e.pos.line, 2);
    }
}
