//! Templates: compile any text, render it against an event, and the message it makes (when it
//! is JSON) goes through Block Kit enforcement; errors only, never a panic or a hang.
#![no_main]
use handlebars::Context;
use libfuzzer_sys::fuzz_target;
use serde_json::json;
use switchyard::render::{Templates, TemplateOrigin};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut t = Templates::new();
    let origin = TemplateOrigin {
        file: "fuzz.hbs".into(),
        line_offset: 1,
        inline: false,
    };
    if t.add("fuzz", text, origin).is_err() {
        return;
    }
    if !t.partial_problems().is_empty() {
        return; // refused at load, never rendered
    }
    let ev = json!({
        "entity": {"identifier": "payments-api", "title": "<!channel> & co", "properties": {"cpuUtil": 91}},
        "items": [1, 2, 3],
        "user": {"email": "a@example.com", "name": "A"},
        "labels": {"k": "v"},
        "body": "text *with* <mrkdwn>"
    });
    let ctx = Context::from(ev);
    if let Ok(mut m) = t.render_message("fuzz", &ctx) {
        switchyard::render::blockkit::enforce(&mut m);
    }
    let _ = t.render_text("fuzz", &ctx);
});
