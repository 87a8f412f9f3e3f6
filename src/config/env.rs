//! `${VAR}` and `${VAR:-default}` in rules files.
//!
//! Expansion runs over every string of a parsed file before it is deserialized, so any setting
//! can come from the environment. `$${` writes a literal `${`. An unset variable without a
//! default expands to the empty string and is *reported* (with the path of the string), because
//! what that means depends on the command: `check` warns (CI has no secrets), `serve` refuses to
//! start a destination or source whose secret is missing.

use serde_json::Value;

use super::yaml::{join_index, join_key};

/// A variable that was referenced but not set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unset {
    /// Path of the string that referenced it.
    pub path: String,
    /// The variable name.
    pub var: String,
}

/// Expands `${…}` in every string of `v`, in place. `lookup` returns a variable's value.
pub fn expand_tree(v: &mut Value, lookup: &dyn Fn(&str) -> Option<String>) -> Vec<Unset> {
    let mut unset = Vec::new();
    walk(v, String::new(), lookup, &mut unset);
    unset
}

fn walk(
    v: &mut Value,
    path: String,
    lookup: &dyn Fn(&str) -> Option<String>,
    out: &mut Vec<Unset>,
) {
    match v {
        Value::String(s) if s.contains("${") => {
            let (expanded, missing) = expand_str(s, lookup);
            *s = expanded;
            out.extend(missing.into_iter().map(|var| Unset {
                path: path.clone(),
                var,
            }));
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                walk(item, join_index(&path, i), lookup, out);
            }
        }
        Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                walk(item, join_key(&path, k), lookup, out);
            }
        }
        _ => {}
    }
}

/// Expands one string; returns it and the names of unset variables without a default.
pub fn expand_str(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> (String, Vec<String>) {
    let mut out = String::with_capacity(s.len());
    let mut missing = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
            continue;
        }
        if let Some(body) = after.strip_prefix("${") {
            if let Some(end) = body.find('}') {
                let inner = &body[..end];
                let (name, default) = match inner.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (inner, None),
                };
                let valid = !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if valid {
                    match (lookup(name).filter(|v| !v.is_empty()), default) {
                        (Some(val), _) => out.push_str(&val),
                        (None, Some(d)) => out.push_str(d),
                        (None, None) => missing.push(name.to_string()),
                    }
                    rest = &body[end + 1..];
                    continue;
                }
            }
        }
        out.push('$');
        rest = &after[1..];
    }
    out.push_str(rest);
    (out, missing)
}

/// Reads the process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("value".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_set_unset_defaults_and_escapes() {
        assert_eq!(expand_str("a ${SET} b", &env), ("a value b".into(), vec![]));
        assert_eq!(
            expand_str("${NOPE}", &env),
            ("".into(), vec!["NOPE".into()])
        );
        assert_eq!(expand_str("${NOPE:-dflt}", &env), ("dflt".into(), vec![]));
        assert_eq!(expand_str("${EMPTY:-dflt}", &env), ("dflt".into(), vec![]));
        assert_eq!(expand_str("$${SET}", &env), ("${SET}".into(), vec![]));
        assert_eq!(
            expand_str("cost $5 {{x}}", &env),
            ("cost $5 {{x}}".into(), vec![])
        );
        assert_eq!(
            expand_str("${bad name}", &env),
            ("${bad name}".into(), vec![])
        );
    }
}
