//! The YAML loader: any text is a tree with spans or an error with a position, within limits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::config::yaml::{parse, Limits};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = Limits {
        max_bytes: 64 * 1024,
        max_depth: 64,
        max_nodes: 20_000,
        max_expanded_bytes: 1 << 20,
    };
    if let Ok((value, _spans)) = parse(text, limits) {
        // The typed config over whatever came out: errors, never a panic.
        let _ = serde_json::from_value::<switchyard::config::spec::RulesFile>(value);
    }
});
