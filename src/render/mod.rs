//! Handlebars templates that render Slack Block Kit JSON.
//!
//! Guarantees:
//! - A template's output must parse as JSON, whatever the event holds: `{{value}}` writes the
//!   value JSON-string-escaped (quotes, backslashes, newlines, control characters) **and**
//!   Slack-mrkdwn-escaped (`&`→`&amp;`, `<`→`&lt;`, `>`→`&gt;`), so an entity title can neither
//!   break the JSON nor ping `<!channel>`. Templates put `{{…}}` inside JSON strings.
//! - `{{plain value}}` JSON-escapes only: for `plain_text` fields, URLs and button values,
//!   where `&amp;` would show literally or break a link. `{{json value}}` writes a whole JSON
//!   value (with mrkdwn escaping inside strings); `{{raw_json value}}` without it.
//! - Every rendered message gets a plain-text `text` fallback (Slack shows it in notifications
//!   and requires it for accessibility) when the template does not set one.
//! - Rendering is pure CPU work; it is part of the routing step.

pub mod blockkit;
mod helpers;
pub mod inspect;
pub mod partials;

pub use inspect::Finding;

use std::collections::BTreeMap;
use std::path::PathBuf;

use handlebars::{Context, Handlebars};
use serde_json::{Map, Value};

/// Escapes a string for inclusion inside a JSON string literal and for Slack mrkdwn.
pub fn escape_mrkdwn_json(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            _ => push_json_char(&mut out, c),
        }
    }
    out
}

/// Escapes a string for inclusion inside a JSON string literal only.
pub fn escape_json(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        push_json_char(&mut out, c);
    }
    out
}

/// Escapes `& < >` for Slack mrkdwn (and nothing else, as Slack asks).
pub fn escape_mrkdwn(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            _ => out.push(c),
        }
    }
    out
}

fn push_json_char(out: &mut String, c: char) {
    match c {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
        c => out.push(c),
    }
}

/// Where a template came from, for diagnostics.
#[derive(Debug, Clone)]
pub struct TemplateOrigin {
    /// The file that holds the template text (`templates/x.hbs`, or the rules file for inline).
    pub file: PathBuf,
    /// Line and column offset of the template text inside `file` (1-based line of its start).
    pub line_offset: usize,
    /// True for inline `blocks:` templates (positions inside them are approximate).
    pub inline: bool,
}

/// A problem found while compiling or rendering a template.
#[derive(Debug, Clone)]
pub struct TemplateError {
    pub template: String,
    pub message: String,
    /// 1-based line and column inside the template text, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
}

/// Most text one template may have. Compiling is quadratic in the `handlebars` crate (each
/// element's line and column are found by scanning from the start of the text): a 777 KB
/// template with 20,000 expressions took 31 s to load, and `check` as long. With these bounds
/// the worst case (2,000 expressions after 128 KiB of text) compiles in about a second; real
/// messages are a few KiB, and a larger one can be split into partials, each compiled alone.
pub const MAX_TEMPLATE_BYTES: usize = 128 * 1024;
/// Most `{{…}}` expressions one template may have (see [`MAX_TEMPLATE_BYTES`]).
pub const MAX_TEMPLATE_TAGS: usize = 2_000;

/// Refuses a template too large to compile in bounded time, before compiling it.
fn bounded_template(name: &str, text: &str) -> Result<(), TemplateError> {
    let too = |message: String| TemplateError {
        template: name.to_string(),
        message,
        line: None,
        column: None,
    };
    if text.len() > MAX_TEMPLATE_BYTES {
        return Err(too(format!(
            "the template is {} KiB; at most {} KiB are compiled (compiling time grows with the square of the size): split it into partials",
            text.len().div_ceil(1024),
            MAX_TEMPLATE_BYTES >> 10
        )));
    }
    let tags = text.matches("{{").count();
    if tags > MAX_TEMPLATE_TAGS {
        return Err(too(format!(
            "the template has {tags} `{{{{…}}}}` expressions; at most {MAX_TEMPLATE_TAGS} are compiled (compiling time grows with the square of their number): split it into partials"
        )));
    }
    Ok(())
}

fn syntax_error(name: &str, text: &str, e: &handlebars::TemplateError) -> TemplateError {
    // The parser notices an unclosed block only at the end of the text and then lists every
    // token it could have taken; the opening tag is where the mistake is.
    if let Some((message, line, column)) = unbalanced_block(text) {
        return TemplateError {
            template: name.to_string(),
            message,
            line: Some(line),
            column: Some(column),
        };
    }
    let pos = e.pos();
    let reason = e.reason().to_string();
    let reason = match reason.split_once(": expected ") {
        Some((head, _)) => format!("{head} (a `{{{{` that does not start a valid tag?)"),
        None => reason,
    };
    TemplateError {
        template: name.to_string(),
        message: format!("template syntax error: {reason}"),
        line: pos.map(|p| p.0),
        column: pos.map(|p| p.1),
    }
}

/// The first block tag that is closed by the wrong name or never closed, with its 1-based line
/// and column: `{{#if x}}` without `{{/if}}`.
pub fn unbalanced_block(text: &str) -> Option<(String, usize, usize)> {
    // Byte offsets while scanning; turned into line:column only for the tag reported, so a
    // large template costs one pass.
    let at_tag = |msg: String, byte: usize| {
        let (line, column) = line_col(text, byte);
        Some((msg, line, column))
    };
    let mut open: Vec<(String, usize)> = Vec::new();
    let mut rest = text;
    let mut consumed = 0;
    while let Some(i) = rest.find("{{") {
        let at = consumed + i;
        let after = &rest[i + 2..];
        // Comments may hold anything.
        let (tag, skip) = if let Some(c) = after.strip_prefix("!--") {
            match c.find("--}}") {
                Some(j) => ("", 2 + 3 + j + 4),
                None => return None,
            }
        } else {
            match after.find("}}") {
                Some(j) => (&after[..j], 2 + j + 2),
                None => return None,
            }
        };
        let t = tag
            .trim_start_matches(['{', '~'])
            .trim_end_matches(['}', '~'])
            .trim();
        if let Some(b) = t.strip_prefix('#') {
            let b = b.trim_start_matches(['>', '*']).trim_start();
            let name = b.split_whitespace().next().unwrap_or("").to_string();
            if !name.is_empty() {
                open.push((name, at));
            }
        } else if let Some(b) = t.strip_prefix('/') {
            let name = b.trim();
            match open.pop() {
                Some((o, _)) if o == name => {}
                Some((o, opened)) => {
                    let (ol, oc) = line_col(text, opened);
                    return at_tag(
                        format!("`{{{{/{name}}}}}` closes `{{{{#{o}}}}}`, opened at line {ol}, column {oc}: close `{o}` first"),
                        at,
                    );
                }
                None => {
                    return at_tag(
                        format!("`{{{{/{name}}}}}` closes a block that was never opened"),
                        at,
                    )
                }
            }
        }
        consumed = at + skip.min(rest.len() - i);
        rest = &text[consumed.min(text.len())..];
    }
    let (name, opened) = open.pop()?;
    at_tag(
        format!("`{{{{#{name}}}}}` is never closed: add `{{{{/{name}}}}}` after its content"),
        opened,
    )
}

fn line_col(text: &str, byte: usize) -> (usize, usize) {
    let before = &text[..byte.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, column)
}

fn render_failed(name: &str, e: &handlebars::RenderError) -> TemplateError {
    TemplateError {
        template: name.to_string(),
        message: format!("rendering failed: {}", e.reason()),
        line: e.line_no,
        column: e.column_no,
    }
}

/// The most one render may write. Slack takes far less (50 blocks of 3,000 characters), and a
/// webhook body this size is already unusual; a template that loops over a large list inside
/// another loop can otherwise write tens of megabytes per event into the outbox.
pub const MAX_RENDERED: usize = 1 << 20;

/// Template output that refuses to grow past [`MAX_RENDERED`]: the render stops there.
struct CappedOutput {
    buf: String,
    over: bool,
}

impl handlebars::Output for CappedOutput {
    fn write(&mut self, seg: &str) -> std::io::Result<()> {
        if self.buf.len() + seg.len() > MAX_RENDERED {
            self.over = true;
            return Err(std::io::Error::other("rendered output over the limit"));
        }
        self.buf.push_str(seg);
        Ok(())
    }
}

/// Renders template `name` of `hb` into a [`CappedOutput`] (what `render_with_context` does,
/// with the cap).
fn capped(hb: &Handlebars<'static>, name: &str, ctx: &Context) -> Result<String, TemplateError> {
    let Some(t) = hb.get_template(name) else {
        return Err(TemplateError {
            template: name.to_string(),
            message: "rendering failed: no such template".into(),
            line: None,
            column: None,
        });
    };
    render_capped(hb, t, name, ctx)
}

fn render_capped(
    hb: &Handlebars<'static>,
    t: &handlebars::Template,
    name: &str,
    ctx: &Context,
) -> Result<String, TemplateError> {
    use handlebars::Renderable;
    let mut out = CappedOutput {
        buf: String::new(),
        over: false,
    };
    let mut rc = handlebars::RenderContext::new(t.name.as_ref());
    match t.render(hb, ctx, &mut rc, &mut out) {
        Ok(()) => Ok(out.buf),
        Err(_) if out.over => Err(TemplateError {
            template: name.to_string(),
            message: format!(
                "rendering failed: the output is over {} KiB (a loop over a large list, or one inside another?)",
                MAX_RENDERED >> 10
            ),
            line: None,
            column: None,
        }),
        Err(e) => Err(render_failed(name, &e)),
    }
}

/// All templates of a ruleset, compiled once.
pub struct Templates {
    hb: Handlebars<'static>,
    /// Small strings (channels, emails, headers, keys): rendered without any escaping.
    plain: Handlebars<'static>,
    origins: BTreeMap<String, TemplateOrigin>,
    /// Templates that failed to compile: already reported, so a rule naming one is not
    /// reported again as naming a missing template.
    broken: std::collections::BTreeSet<String>,
    /// Each message template's text, for checks that read it (a digest template uses `items`).
    sources: BTreeMap<String, String>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates")
            .field("names", &self.origins.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

impl Templates {
    /// An empty set with the escaping and helpers installed.
    pub fn new() -> Self {
        let mut hb = Handlebars::new();
        hb.register_escape_fn(escape_mrkdwn_json);
        hb.set_prevent_indent(true);
        helpers::register(&mut hb);
        let mut plain = Handlebars::new();
        plain.register_escape_fn(handlebars::no_escape);
        helpers::register(&mut plain);
        Templates {
            hb,
            plain,
            origins: BTreeMap::new(),
            broken: Default::default(),
            sources: BTreeMap::new(),
        }
    }

    /// Compiles and registers a template (also usable as a partial `{{> name}}`).
    pub fn add(
        &mut self,
        name: &str,
        text: &str,
        origin: TemplateOrigin,
    ) -> Result<(), TemplateError> {
        if let Err(e) = bounded_template(name, text) {
            self.broken.insert(name.to_string());
            return Err(e);
        }
        if let Err(e) = self.hb.register_template_string(name, text) {
            self.broken.insert(name.to_string());
            return Err(syntax_error(name, text, &e));
        }
        self.origins.insert(name.to_string(), origin);
        self.sources.insert(name.to_string(), text.to_string());
        Ok(())
    }

    /// The text of a message template added with [`Templates::add`].
    pub fn source(&self, name: &str) -> Option<&str> {
        self.sources.get(name).map(String::as_str)
    }

    /// Compiles a small unescaped template (a channel, an email, a header value).
    pub fn add_plain(&mut self, name: &str, text: &str) -> Result<(), TemplateError> {
        bounded_template(name, text)?;
        self.plain
            .register_template_string(name, text)
            .map_err(|e| syntax_error(name, text, &e))
    }

    /// Renders a template added with [`Templates::add_plain`].
    pub fn render_plain(&self, name: &str, ctx: &Context) -> Result<String, TemplateError> {
        capped(&self.plain, name, ctx)
    }

    /// True when a template of that name exists.
    pub fn has(&self, name: &str) -> bool {
        self.origins.contains_key(name)
    }

    /// True for a template that exists but failed to compile (its error is already reported).
    pub fn is_broken(&self, name: &str) -> bool {
        self.broken.contains(name)
    }

    /// Where a template came from.
    pub fn origin(&self, name: &str) -> Option<&TemplateOrigin> {
        self.origins.get(name)
    }

    /// Partial cycles, over-deep nesting and computed partial names among the message
    /// templates ([`partials`]); a ruleset with any is refused.
    pub fn partial_problems(&self) -> Vec<partials::PartialProblem> {
        let all = self.hb.get_templates();
        partials::check(all.iter().map(|(n, t)| (n.as_str(), t)))
    }

    /// Checks a message template (JSON output) before any event: helpers, arity, and every
    /// path against `root`, the shape of the context it renders with ([`inspect`]).
    pub fn inspect(&self, name: &str, root: &crate::envelope::Shape) -> Vec<Finding> {
        inspect::inspect(self.hb.get_templates(), name, root, true)
    }

    /// [`Templates::inspect`] for a small plain template (a channel, a key).
    pub fn inspect_plain(&self, name: &str, root: &crate::envelope::Shape) -> Vec<Finding> {
        inspect::inspect(self.plain.get_templates(), name, root, false)
    }

    /// Names of all templates.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.origins.keys().map(String::as_str)
    }

    /// Renders a template to text (for headers, channels and other small strings).
    pub fn render_text(&self, name: &str, ctx: &Context) -> Result<String, TemplateError> {
        capped(&self.hb, name, ctx)
    }

    /// Renders a message template to a Slack message object with a `text` fallback.
    pub fn render_message(&self, name: &str, ctx: &Context) -> Result<Value, TemplateError> {
        self.render_json(name, ctx).map(normalize_message)
    }

    /// Renders a template whose output must be JSON (any JSON: a webhook body).
    pub fn render_json(&self, name: &str, ctx: &Context) -> Result<Value, TemplateError> {
        let out = self.render_text(name, ctx)?;
        let parsed: Value = serde_json::from_str(&out).map_err(|e| {
            let line = out
                .lines()
                .nth(e.line().saturating_sub(1))
                .unwrap_or("")
                .trim();
            TemplateError {
                template: name.to_string(),
                message: format!(
                    "the rendered template is not valid JSON ({e}); the output line is `{}`",
                    crate::render::helpers::clip(line, 120)
                ),
                line: None,
                column: None,
            }
        })?;
        Ok(parsed)
    }

    /// Renders every string leaf of a JSON value that holds `{{` as an inline template.
    pub fn render_strings(&self, v: &Value, ctx: &Context) -> Result<Value, String> {
        Ok(match v {
            Value::String(s) if s.contains("{{") => Value::String(self.render_inline(s, ctx)?),
            Value::Array(a) => Value::Array(
                a.iter()
                    .map(|x| self.render_strings(x, ctx))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, x)| Ok((k.clone(), self.render_strings(x, ctx)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }

    /// Renders a small inline template string (not registered) against `ctx`.
    pub fn render_inline(&self, text: &str, ctx: &Context) -> Result<String, String> {
        bounded_template("inline", text).map_err(|e| e.message)?;
        let t = handlebars::Template::compile(text).map_err(|e| e.to_string())?;
        render_capped(&self.hb, &t, "inline", ctx).map_err(|e| e.message)
    }
}

/// Turns template output into a message object: a bare list is `blocks`, and a missing `text`
/// is derived from the blocks.
pub fn normalize_message(v: Value) -> Value {
    let mut msg = match v {
        Value::Array(blocks) => {
            let mut m = Map::new();
            m.insert("blocks".into(), Value::Array(blocks));
            m
        }
        Value::Object(m) => m,
        other => {
            let mut m = Map::new();
            m.insert(
                "text".into(),
                Value::String(
                    other
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| other.to_string()),
                ),
            );
            m
        }
    };
    let has_text = msg
        .get("text")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.trim().is_empty());
    if !has_text {
        let derived = msg.get("blocks").map(fallback_text).unwrap_or_default();
        let derived = if derived.trim().is_empty() {
            "(message)".to_string()
        } else {
            derived
        };
        msg.insert("text".into(), Value::String(derived));
    }
    Value::Object(msg)
}

/// The first header, or else the first section text, as the notification fallback.
fn fallback_text(blocks: &Value) -> String {
    let Some(list) = blocks.as_array() else {
        return String::new();
    };
    let text_of = |b: &Value| {
        b.pointer("/text/text")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let header = list
        .iter()
        .find(|b| b["type"] == "header")
        .and_then(text_of);
    let section = list
        .iter()
        .find(|b| b["type"] == "section")
        .and_then(text_of);
    let s = match (header, section) {
        (Some(h), _) => h,
        (None, Some(s)) => s,
        (None, None) => list.iter().find_map(text_of).unwrap_or_default(),
    };
    blockkit::truncate_chars(&s, 3000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn templates(name: &str, text: &str) -> Templates {
        let mut t = Templates::new();
        t.add(
            name,
            text,
            TemplateOrigin {
                file: "t.hbs".into(),
                line_offset: 1,
                inline: false,
            },
        )
        .unwrap();
        t
    }

    #[test]
    fn hostile_titles_render_to_valid_json_and_harmless_mrkdwn() {
        let t = templates(
            "m",
            r#"{"blocks":[{"type":"section","text":{"type":"mrkdwn","text":"*{{entity.title}}*"}},
               {"type":"header","text":{"type":"plain_text","text":"{{plain entity.title}}"}}]}"#,
        );
        let title = "Say \"hi\"\n<!channel> & <@U123>\\";
        let ctx = Context::from(json!({"entity": {"title": title}}));
        let msg = t.render_message("m", &ctx).unwrap();
        let text = msg["blocks"][0]["text"]["text"].as_str().unwrap();
        assert_eq!(text, "*Say \"hi\"\n&lt;!channel&gt; &amp; &lt;@U123&gt;\\*");
        assert!(!text.contains("<!channel>"));
        assert_eq!(msg["blocks"][1]["text"]["text"], title);
        // The fallback text comes from the header.
        assert_eq!(msg["text"], title);
    }

    #[test]
    fn loops_render_one_button_per_action() {
        let t = templates(
            "m",
            r#"{"blocks":[{"type":"actions","elements":[{{#each actions}}{{#unless @first}},{{/unless}}
              {"type":"button","action_id":"coder_action_{{@index}}","text":{"type":"plain_text","text":"{{plain label}}"},"url":"{{plain url}}"}{{/each}}]}]}"#,
        );
        let ctx = Context::from(json!({"actions": [
            {"label": "View", "url": "https://c.example.com/a?x=1&y=2"},
            {"label": "Templates", "url": "https://c.example.com/t"}]}));
        let msg = t.render_message("m", &ctx).unwrap();
        let els = msg["blocks"][0]["elements"].as_array().unwrap();
        assert_eq!(els.len(), 2);
        assert_eq!(els[0]["url"], "https://c.example.com/a?x=1&y=2");
        assert_eq!(els[1]["action_id"], "coder_action_1");
    }

    #[test]
    fn invalid_json_output_is_reported() {
        let t = templates("m", r#"{"text": {{entity.title}} }"#);
        let e = t
            .render_message("m", &Context::from(json!({"entity": {"title": "x"}})))
            .unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
    }

    #[test]
    fn a_render_stops_at_the_output_limit() {
        let t = templates(
            "loop",
            "{{#each items}}{{#each ../items}}0123456789{{/each}}{{/each}}",
        );
        let items: Vec<u32> = (0..1000).collect();
        let e = t
            .render_text("loop", &Context::wraps(json!({ "items": items })).unwrap())
            .unwrap_err();
        assert!(e.message.contains("KiB"), "{}", e.message);
    }

    /// Compiling is quadratic in the handlebars crate; templates past the bounds are refused
    /// before it, with the remedy, and one at the bounds compiles.
    #[test]
    fn templates_too_large_to_compile_in_bounded_time_are_refused() {
        let mut t = Templates::new();
        let origin = || TemplateOrigin {
            file: "t.hbs".into(),
            line_offset: 1,
            inline: false,
        };
        let many = "{{x}} ".repeat(MAX_TEMPLATE_TAGS + 1);
        let e = t.add("many", &many, origin()).expect_err("too many tags");
        assert!(
            e.message.contains("expressions") && e.message.contains("partials"),
            "{}",
            e.message
        );
        assert!(t.is_broken("many"));
        let big = "y".repeat(MAX_TEMPLATE_BYTES + 1);
        let e = t.add("big", &big, origin()).expect_err("too big");
        assert!(e.message.contains("KiB"), "{}", e.message);
        let ok = "{{x}}".repeat(MAX_TEMPLATE_TAGS);
        t.add("ok", &ok, origin()).expect("at the bound");
        assert!(t.add_plain("p", &many).is_err());
        let ctx = Context::wraps(serde_json::json!({"x": 1})).expect("context");
        assert!(t.render_inline(&many, &ctx).is_err());
    }

    #[test]
    fn syntax_errors_have_positions() {
        let mut t = Templates::new();
        let e = t
            .add(
                "m",
                "{\n  \"text\": \"{{#if x}}\"\n}",
                TemplateOrigin {
                    file: "t.hbs".into(),
                    line_offset: 1,
                    inline: false,
                },
            )
            .unwrap_err();
        assert!(e.line.is_some(), "{e:?}");
    }
}
