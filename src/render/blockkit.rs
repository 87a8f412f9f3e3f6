//! Slack Block Kit limits (protocols.md §4.3): checked by `check`, enforced at send time.
//!
//! `check` reports a rendered message over a limit as an error, because a template that
//! overflows on a test event will overflow in production. At send time the same limits are
//! enforced by truncating texts with an ellipsis (and dropping blocks past 50), so Slack never
//! rejects a message for length: a cut message beats a dead letter.

use serde_json::{json, Value};

/// Blocks per message.
pub const MAX_BLOCKS: usize = 50;
/// `header` text.
pub const MAX_HEADER: usize = 150;
/// `section` text.
pub const MAX_SECTION: usize = 3000;
/// Each `section` field.
pub const MAX_FIELD: usize = 2000;
/// `section` fields.
pub const MAX_FIELDS: usize = 10;
/// `actions` elements.
pub const MAX_ACTIONS: usize = 25;
/// `context` elements.
pub const MAX_CONTEXT: usize = 10;
/// Button text.
pub const MAX_BUTTON_TEXT: usize = 75;
/// Button URL.
pub const MAX_BUTTON_URL: usize = 3000;
/// Button value.
pub const MAX_BUTTON_VALUE: usize = 2000;
/// `action_id` / `block_id`.
pub const MAX_ID: usize = 255;
/// Top-level `text`.
pub const MAX_TEXT: usize = 40_000;
/// All `markdown` blocks together.
pub const MAX_MARKDOWN_TOTAL: usize = 12_000;

/// A limit a message exceeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// JSON pointer to the offending value, e.g. `/blocks/0/text/text`.
    pub pointer: String,
    pub message: String,
}

/// Cuts `s` to at most `max` characters, ending with `…` when cut.
pub fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    if max == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

fn len(v: &Value) -> usize {
    v.as_str().map(|s| s.chars().count()).unwrap_or(0)
}

/// Every limit the message exceeds.
pub fn check(msg: &Value) -> Vec<Violation> {
    let mut out = Vec::new();
    fn push(out: &mut Vec<Violation>, pointer: String, what: &str, n: usize, max: usize) {
        out.push(Violation {
            pointer,
            message: format!("{what} is {n} long, over Slack's limit of {max}"),
        })
    }
    macro_rules! over {
        ($($a:expr),*) => { push(&mut out, $($a),*) };
    }
    let tl = len(&msg["text"]);
    if tl > MAX_TEXT {
        over!("/text".into(), "the `text` fallback", tl, MAX_TEXT);
    }
    let Some(blocks) = msg.get("blocks").and_then(Value::as_array) else {
        return out;
    };
    if blocks.len() > MAX_BLOCKS {
        over!(
            "/blocks".into(),
            "the list of blocks",
            blocks.len(),
            MAX_BLOCKS
        );
    }
    let mut block_ids = std::collections::HashSet::new();
    let mut markdown_total = 0;
    for (i, b) in blocks.iter().enumerate() {
        let p = format!("/blocks/{i}");
        if let Some(id) = b.get("block_id").and_then(Value::as_str) {
            if id.chars().count() > MAX_ID {
                over!(
                    format!("{p}/block_id"),
                    "a block_id",
                    id.chars().count(),
                    MAX_ID
                );
            }
            if !block_ids.insert(id.to_string()) {
                out.push(Violation {
                    pointer: format!("{p}/block_id"),
                    message: format!(
                        "block_id `{id}` is used twice; Slack requires unique block ids"
                    ),
                });
            }
        }
        match b["type"].as_str().unwrap_or("") {
            "header" => {
                let n = len(&b["text"]["text"]);
                if n > MAX_HEADER {
                    over!(format!("{p}/text/text"), "a header text", n, MAX_HEADER);
                }
            }
            "section" => {
                let n = len(&b["text"]["text"]);
                if n > MAX_SECTION {
                    over!(format!("{p}/text/text"), "a section text", n, MAX_SECTION);
                }
                if b.get("text").is_some() && n == 0 && b["text"]["text"].is_string() {
                    out.push(Violation {
                        pointer: format!("{p}/text/text"),
                        message: "a section text is empty; Slack rejects empty section text".into(),
                    });
                }
                if let Some(fields) = b["fields"].as_array() {
                    if fields.len() > MAX_FIELDS {
                        over!(
                            format!("{p}/fields"),
                            "a section's fields",
                            fields.len(),
                            MAX_FIELDS
                        );
                    }
                    for (j, f) in fields.iter().enumerate() {
                        let n = len(&f["text"]);
                        if n > MAX_FIELD {
                            over!(
                                format!("{p}/fields/{j}/text"),
                                "a section field",
                                n,
                                MAX_FIELD
                            );
                        }
                    }
                }
            }
            "actions" => {
                let els = b["elements"].as_array().map(Vec::len).unwrap_or(0);
                if els > MAX_ACTIONS {
                    over!(
                        format!("{p}/elements"),
                        "an actions block's elements",
                        els,
                        MAX_ACTIONS
                    );
                }
            }
            "context" => {
                let els = b["elements"].as_array().map(Vec::len).unwrap_or(0);
                if els > MAX_CONTEXT {
                    over!(
                        format!("{p}/elements"),
                        "a context block's elements",
                        els,
                        MAX_CONTEXT
                    );
                }
            }
            "markdown" => markdown_total += len(&b["text"]),
            _ => {}
        }
        for (j, el) in b["elements"].as_array().into_iter().flatten().enumerate() {
            let ep = format!("{p}/elements/{j}");
            if el["type"] == "button" {
                let n = len(&el["text"]["text"]);
                if n > MAX_BUTTON_TEXT {
                    over!(
                        format!("{ep}/text/text"),
                        "a button text",
                        n,
                        MAX_BUTTON_TEXT
                    );
                }
                let n = len(&el["url"]);
                if n > MAX_BUTTON_URL {
                    over!(format!("{ep}/url"), "a button url", n, MAX_BUTTON_URL);
                }
                let n = len(&el["value"]);
                if n > MAX_BUTTON_VALUE {
                    over!(format!("{ep}/value"), "a button value", n, MAX_BUTTON_VALUE);
                }
            }
            let n = len(&el["action_id"]);
            if n > MAX_ID {
                over!(format!("{ep}/action_id"), "an action_id", n, MAX_ID);
            }
        }
    }
    if markdown_total > MAX_MARKDOWN_TOTAL {
        over!(
            "/blocks".into(),
            "the markdown blocks together",
            markdown_total,
            MAX_MARKDOWN_TOTAL
        );
    }
    out
}

fn cut(v: Option<&mut Value>, max: usize) {
    if let Some(Value::String(s)) = v {
        if s.chars().count() > max {
            *s = truncate_chars(s, max);
        }
    }
}

/// The value at `path` below `v`, if every step exists (never inserts, unlike `v["a"]["b"]`).
fn at<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| v.get_mut(*k))
}

/// The same, read-only.
fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

/// True when [`enforce`] would leave the message as it is (the common case: the sender can
/// then send the stored message without copying it).
pub fn fits(msg: &Value) -> bool {
    // A string of at most `max` bytes has at most `max` characters: count only longer ones.
    let over = |v: Option<&Value>, max: usize| {
        v.and_then(Value::as_str)
            .is_some_and(|s| s.len() > max && s.chars().count() > max)
    };
    let many =
        |v: Option<&Value>, max: usize| v.and_then(Value::as_array).is_some_and(|a| a.len() > max);
    if over(msg.get("text"), MAX_TEXT) {
        return false;
    }
    let Some(blocks) = msg.get("blocks").and_then(Value::as_array) else {
        return true;
    };
    if blocks.len() > MAX_BLOCKS {
        return false;
    }
    blocks.iter().all(|b| {
        let own = match b.get("type").and_then(Value::as_str).unwrap_or("") {
            "header" => !over(get(b, &["text", "text"]), MAX_HEADER),
            "section" => {
                !over(get(b, &["text", "text"]), MAX_SECTION)
                    && !many(b.get("fields"), MAX_FIELDS)
                    && b.get("fields")
                        .and_then(Value::as_array)
                        .is_none_or(|fs| fs.iter().all(|f| !over(f.get("text"), MAX_FIELD)))
            }
            "actions" => !many(b.get("elements"), MAX_ACTIONS),
            "context" => !many(b.get("elements"), MAX_CONTEXT),
            _ => true,
        };
        own && b
            .get("elements")
            .and_then(Value::as_array)
            .is_none_or(|els| {
                els.iter().all(|el| {
                    el.get("type").and_then(Value::as_str) != Some("button")
                        || (!over(get(el, &["text", "text"]), MAX_BUTTON_TEXT)
                            && !over(el.get("value"), MAX_BUTTON_VALUE))
                })
            })
    })
}

/// Makes a message fit Slack's limits by cutting texts (with `…`) and surplus blocks.
pub fn enforce(msg: &mut Value) {
    cut(msg.get_mut("text"), MAX_TEXT);
    let Some(blocks) = msg.get_mut("blocks").and_then(Value::as_array_mut) else {
        return;
    };
    if blocks.len() > MAX_BLOCKS {
        let dropped = blocks.len() - (MAX_BLOCKS - 1);
        blocks.truncate(MAX_BLOCKS - 1);
        blocks.push(json!({"type": "context", "elements": [
            {"type": "mrkdwn", "text": format!("… {dropped} more blocks were cut to fit Slack's limit")}
        ]}));
    }
    for b in blocks.iter_mut() {
        match b.get("type").and_then(Value::as_str).unwrap_or("") {
            "header" => cut(at(b, &["text", "text"]), MAX_HEADER),
            "section" => {
                cut(at(b, &["text", "text"]), MAX_SECTION);
                if let Some(fields) = b.get_mut("fields").and_then(Value::as_array_mut) {
                    fields.truncate(MAX_FIELDS);
                    for f in fields {
                        cut(f.get_mut("text"), MAX_FIELD);
                    }
                }
            }
            "actions" => {
                if let Some(els) = b.get_mut("elements").and_then(Value::as_array_mut) {
                    els.truncate(MAX_ACTIONS);
                }
            }
            "context" => {
                if let Some(els) = b.get_mut("elements").and_then(Value::as_array_mut) {
                    els.truncate(MAX_CONTEXT);
                }
            }
            _ => {}
        }
        if let Some(els) = b.get_mut("elements").and_then(Value::as_array_mut) {
            for el in els {
                if el.get("type").and_then(Value::as_str) == Some("button") {
                    cut(at(el, &["text", "text"]), MAX_BUTTON_TEXT);
                    cut(el.get_mut("value"), MAX_BUTTON_VALUE);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_is_true_exactly_when_enforce_changes_nothing() {
        let x = |n: usize| "x".repeat(n);
        let el = |n: usize| vec![json!({"type": "mrkdwn", "text": "e"}); n];
        let msgs = vec![
            json!({"text": "short"}),
            json!({"text": x(MAX_TEXT)}),
            json!({"text": x(MAX_TEXT + 1)}),
            json!({"blocks": [{"type": "header"}]}),
            json!({"blocks": [{"type": "header", "text": {"type": "plain_text", "text": x(MAX_HEADER)}}]}),
            json!({"blocks": [{"type": "header", "text": {"type": "plain_text", "text": x(MAX_HEADER + 1)}}]}),
            json!({"blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": x(MAX_SECTION + 1)}}]}),
            json!({"blocks": [{"type": "section", "fields": vec![json!({"type": "mrkdwn", "text": "f"}); MAX_FIELDS]}]}),
            json!({"blocks": [{"type": "section", "fields": vec![json!({"type": "mrkdwn", "text": "f"}); MAX_FIELDS + 1]}]}),
            json!({"blocks": [{"type": "section", "fields": [{"type": "mrkdwn", "text": x(MAX_FIELD + 1)}]}]}),
            json!({"blocks": [{"type": "context", "elements": el(MAX_CONTEXT)}]}),
            json!({"blocks": [{"type": "context", "elements": el(MAX_CONTEXT + 1)}]}),
            json!({"blocks": [{"type": "actions", "elements": vec![json!({"type": "button", "text": {"type": "plain_text", "text": "b"}}); MAX_ACTIONS + 1]}]}),
            json!({"blocks": [{"type": "actions", "elements": [{"type": "button", "text": {"type": "plain_text", "text": x(MAX_BUTTON_TEXT + 1)}}]}]}),
            json!({"blocks": [{"type": "actions", "elements": [{"type": "button", "text": {"type": "plain_text", "text": "b"}, "value": x(MAX_BUTTON_VALUE + 1)}]}]}),
            json!({"blocks": vec![json!({"type": "divider"}); MAX_BLOCKS]}),
            json!({"blocks": vec![json!({"type": "divider"}); MAX_BLOCKS + 1]}),
        ];
        for m in msgs {
            let mut e = m.clone();
            enforce(&mut e);
            assert_eq!(
                fits(&m),
                e == m,
                "{}",
                crate::render::blockkit::truncate_chars(&m.to_string(), 120)
            );
        }
    }

    #[test]
    fn finds_and_fixes_overflows() {
        let long = "x".repeat(3100);
        let mut msg = json!({"text": "t", "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": "h".repeat(200)}},
            {"type": "section", "text": {"type": "mrkdwn", "text": long}},
            {"type": "actions", "elements": [{"type": "button", "text": {"type": "plain_text", "text": "b".repeat(80)}, "url": "https://x"}]}
        ]});
        let v = check(&msg);
        let pointers: Vec<&str> = v.iter().map(|v| v.pointer.as_str()).collect();
        assert_eq!(
            pointers,
            vec![
                "/blocks/0/text/text",
                "/blocks/1/text/text",
                "/blocks/2/elements/0/text/text"
            ]
        );
        assert!(!fits(&msg));
        enforce(&mut msg);
        assert!(check(&msg).is_empty());
        assert!(fits(&msg), "an enforced message fits");
        let s = msg["blocks"][1]["text"]["text"].as_str().unwrap();
        assert_eq!(s.chars().count(), 3000);
        assert!(s.ends_with('…'));
    }

    #[test]
    fn too_many_blocks_are_cut_to_fifty() {
        let blocks: Vec<Value> = (0..60)
            .map(|i| json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("{i}")}}))
            .collect();
        let mut msg = json!({"text": "t", "blocks": blocks});
        assert_eq!(check(&msg).len(), 1);
        enforce(&mut msg);
        assert_eq!(msg["blocks"].as_array().unwrap().len(), 50);
        assert!(check(&msg).is_empty());
    }
}
