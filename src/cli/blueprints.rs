//! `switchyard blueprints pull`: saves the organisation's Port blueprints into the rules
//! directory (`blueprints/<identifier>.json`), with a `port` destination's credentials, so that
//! `check` can type entity properties (see the library's `config::blueprints`).
use std::path::Path;
use std::process::ExitCode;

use switchyard::config::{load_dir, DestinationKind, LoadOptions, Mode};

/// A blueprint identifier usable as a file name (Port's own rule: letters, digits, `_`, `-`,
/// `@`, `.`; nothing that could climb out of the directory).
fn file_name(id: &str) -> Option<String> {
    let ok = !id.is_empty()
        && id.len() <= 100
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '@' | '.'));
    ok.then(|| format!("{id}.json"))
}

pub fn pull(rules: &Path, port: &str) -> ExitCode {
    let (rs, diags) = load_dir(rules, &LoadOptions::new(Mode::Serve));
    let Some(rs) = rs else {
        for d in diags.iter().filter(|d| d.is_error()) {
            eprintln!("{}", d.one_line());
        }
        eprintln!(
            "the rules do not load; fix them first (`switchyard check {}`)",
            rules.display()
        );
        return ExitCode::from(1);
    };
    let Some(cfg) = rs.destinations.get(port) else {
        let names: Vec<&str> = rs
            .destinations
            .values()
            .filter(|d| matches!(d.kind, DestinationKind::Port { .. }))
            .map(|d| d.name.as_str())
            .collect();
        eprintln!(
            "error: no destination `{port}`; `port` destinations: {}",
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    if let Some(why) = &cfg.disabled {
        eprintln!("error: destination `{port}` is not configured: {why}");
        return ExitCode::from(2);
    }
    let client = reqwest::Client::new();
    let Some(api) = switchyard::port_api::client_for(cfg, &client) else {
        eprintln!(
            "error: `{port}` is a `{}` destination, not `port`",
            cfg.kind.name()
        );
        return ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let answer = rt.block_on(api.call(
        reqwest::Method::GET,
        "/v1/blueprints",
        None,
        "list blueprints",
    ));
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {}", e.reason());
            return ExitCode::from(1);
        }
    };
    let Some(list) = answer.get("blueprints").and_then(|b| b.as_array()) else {
        eprintln!("error: Port's answer has no `blueprints` list");
        return ExitCode::from(1);
    };
    let dir = rules.join("blueprints");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("error: cannot create {}: {e}", dir.display());
        return ExitCode::from(1);
    }
    let mut written = 0;
    for b in list {
        let id = b.get("identifier").and_then(|i| i.as_str()).unwrap_or("");
        let Some(name) = file_name(id) else {
            eprintln!("skipped a blueprint whose identifier `{id}` is not a safe file name");
            continue;
        };
        let text = serde_json::to_string_pretty(b).unwrap_or_default() + "\n";
        if let Err(e) = std::fs::write(dir.join(&name), text) {
            eprintln!("error: cannot write {}: {e}", dir.join(&name).display());
            return ExitCode::from(1);
        }
        written += 1;
    }
    println!("wrote {written} blueprint(s) to {}", dir.display());
    ExitCode::SUCCESS
}
