//! Loading a rules directory into a [`Ruleset`], collecting diagnostics with positions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::diag::{did_you_mean, Diagnostic};
use super::env::expand_tree;
use super::spec::RulesFile;
use super::yaml::{self, join_index, join_key, Pos, SpanMap};
use super::{DestinationConfig, LoadedFile, Ruleset};
use crate::render::{TemplateOrigin, Templates};

use super::destinations::*;
use super::parsed::*;
use super::rule_tests::*;
use super::rules::*;
use super::schedules::*;
use super::sources::*;

/// Loads and compiles every `*.yaml`/`*.yml` file and `templates/*.hbs` under `dir`.
/// Returns the ruleset when there is no error, and every diagnostic found.
pub fn load_dir(dir: &Path, opts: &LoadOptions) -> (Option<Ruleset>, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let files = match list_files(dir, &["yaml", "yml"]) {
        Ok(f) => f,
        Err(d) => return (None, vec![d]),
    };
    if files.is_empty() {
        diags.push(
            Diagnostic::error(
                "no-rules",
                format!("no rules files (*.yaml) in {}", dir.display()),
            )
            .hint("point --rules at the directory holding your rules files"),
        );
        return (None, diags);
    }
    let files = only_inside(dir, files, &mut diags);
    let mut parsed = Vec::new();
    for f in &files {
        if let Some(p) = parse_file(f, opts, &mut diags) {
            parsed.push(p);
        }
    }
    let loaded: Vec<LoadedFile> = parsed
        .iter()
        .map(|p| LoadedFile {
            path: p.path.clone(),
            text: p.text.clone(),
        })
        .collect();

    let mut templates = Templates::new();
    load_templates(dir, &mut templates, &mut diags);

    // Sources and destinations first: rules refer to them.
    let mut sources = BTreeMap::new();
    let mut dests: BTreeMap<String, DestinationConfig> = BTreeMap::new();
    let mut seen_src: HashMap<String, (PathBuf, Pos)> = HashMap::new();
    let mut seen_dst: HashMap<String, (PathBuf, Pos)> = HashMap::new();
    for p in &parsed {
        for (name, spec) in &p.spec.sources {
            let path = join_key("sources", name);
            if let Some(prev) = duplicate(&mut seen_src, name, p, &path) {
                diags.push(p.at_key(
                    Diagnostic::error(
                        "duplicate",
                        format!("source `{name}` is defined twice (also at {prev})"),
                    ),
                    &path,
                ));
                continue;
            }
            if let Some(e) = build_source(p, name, spec, &path, opts, &mut diags) {
                sources.insert(name.clone(), e);
            }
        }
        for (name, spec) in &p.spec.destinations {
            let path = join_key("destinations", name);
            if let Some(prev) = duplicate(&mut seen_dst, name, p, &path) {
                diags.push(p.at_key(
                    Diagnostic::error(
                        "duplicate",
                        format!("destination `{name}` is defined twice (also at {prev})"),
                    ),
                    &path,
                ));
                continue;
            }
            if let Some(d) =
                build_destination(p, name, spec, &path, opts, &mut templates, &mut diags)
            {
                dests.insert(name.clone(), d);
            }
        }
    }
    resolve_fallbacks(&parsed, &mut dests, opts, &mut diags);
    resolve_reporting(&parsed, &mut sources, &dests, &mut diags);
    let schedules = load_schedules(&parsed, &mut diags);

    let mut rules = Vec::new();
    let mut seen_rule: HashMap<String, (PathBuf, Pos)> = HashMap::new();
    let mut seen_findings = HashSet::new();
    let mut template_files = HashMap::new();
    let mut findings_memo = HashMap::new();
    let blueprints = super::blueprints::load(dir, &mut diags);
    for p in &parsed {
        for (i, r) in p.spec.rules.iter().enumerate() {
            let path = join_index("rules", i);
            if r.id.trim().is_empty() {
                diags.push(p.at(
                    Diagnostic::error("bad-rule", "a rule needs a non-empty `id`"),
                    &join_key(&path, "id"),
                ));
                continue;
            }
            if let Some(prev) = duplicate(&mut seen_rule, &r.id, p, &join_key(&path, "id")) {
                diags.push(p.at(
                    Diagnostic::error(
                        "duplicate",
                        format!("rule id `{}` is used twice (also at {prev})", r.id),
                    ),
                    &join_key(&path, "id"),
                ));
                continue;
            }
            let mut in_order = Vec::new();
            if let Some(rule) = compile_rule(
                p,
                r,
                &path,
                &dests,
                &schedules,
                &mut templates,
                &mut in_order,
                &mut diags,
            ) {
                let mut sc = super::shapes::StepCheck {
                    p,
                    blueprints: &blueprints,
                    templates: &templates,
                    seen: &mut seen_findings,
                    memo: &mut findings_memo,
                    files: &mut template_files,
                };
                super::shapes::check_rule(p, &path, r, &rule, &in_order, &mut sc, &mut diags);
                rules.push(rule);
            }
        }
    }

    // Rule tests are `check`'s business: `serve` neither needs their files (a rules directory
    // deployed from a ConfigMap has no `examples/`) nor fails on them.
    let mut tests = Vec::new();
    let mut scenarios = Vec::new();
    if opts.mode == Mode::Check {
        for p in &parsed {
            for (i, t) in p.spec.tests.iter().enumerate() {
                let path = join_index("tests", i);
                if let Some(t) = load_test(p, t, &path, &sources, &schedules, &mut diags) {
                    tests.push(t);
                }
            }
            for (i, sc) in p.spec.scenarios.iter().enumerate() {
                let path = join_index("scenarios", i);
                if let Some(s) =
                    super::rule_tests::load_scenario(p, sc, &path, &sources, &schedules, &mut diags)
                {
                    scenarios.push(s);
                }
            }
        }
    }

    for problem in templates.partial_problems() {
        let origin = templates.origin(&problem.template).cloned();
        let mut d = Diagnostic::error(
            "partials",
            format!("template `{}`: {}", problem.template, problem.message),
        )
        .hint("a partial may include others, but never (through others) itself");
        if let Some(o) = origin {
            d = match (problem.line, problem.column) {
                (Some(l), Some(c)) if !o.inline => d.at(
                    &o.file,
                    Pos {
                        line: l + o.line_offset - 1,
                        column: c,
                        offset: 0,
                        len: 1,
                    },
                ),
                _ => d.in_file(&o.file),
            };
        }
        diags.push(d);
    }
    let mut rs = Ruleset::new(rules, sources, dests, templates, tests, loaded);
    rs.schedules = schedules;
    rs.blueprints = blueprints;
    rs.scenarios = scenarios;
    check_secret_routing(&rs, &parsed, &mut diags);
    let expansions: Vec<(String, String)> = parsed
        .iter()
        .flat_map(|p| p.expansions.iter().cloned())
        .collect();
    for d in &mut diags {
        scrub(d, &expansions);
    }
    if diags.iter().any(Diagnostic::is_error) {
        (None, diags)
    } else {
        (Some(rs), diags)
    }
}

pub(super) fn parse_file(
    path: &Path,
    opts: &LoadOptions,
    diags: &mut Vec<Diagnostic>,
) -> Option<Parsed> {
    let text = match read_text(path, opts.limits.max_bytes) {
        Ok(t) => t,
        Err(d) => {
            diags.push(d);
            return None;
        }
    };
    let (value, spans) = match yaml::parse(&text, opts.limits) {
        Ok(x) => x,
        Err(e) => {
            let mut d = Diagnostic::error("yaml", e.message).at(path, e.pos);
            if let Some(h) = e.hint {
                d = d.hint(h);
            }
            diags.push(d);
            return None;
        }
    };
    if !(value.is_object()) {
        diags.push(
            Diagnostic::error(
                "bad-file",
                "a rules file is a mapping with `sources`, `destinations`, `rules` and `tests`",
            )
            .at(path, spans.value("")),
        );
        return None;
    }
    const TOP: [&str; 6] = [
        "sources",
        "destinations",
        "rules",
        "tests",
        "schedules",
        "scenarios",
    ];
    if let Some(m) = value.as_object() {
        if !m.is_empty()
            && !m
                .keys()
                .any(|k| TOP.contains(&k.as_str()) || k.starts_with("x-"))
        {
            // Name none of its keys: a file that is not a rules file may be anything.
            diags.push(
                Diagnostic::error(
                    "bad-file",
                    "this is not a rules file: it has none of `sources`, `destinations`, `rules`, `tests`, `schedules`",
                )
                .in_file(path)
                .hint("only rules files belong in the rules directory"),
            );
            return None;
        }
    }
    // Top-level keys starting with `x-` are the file's own (a place for anchors, as in
    // Compose files): the loader ignores them.
    let mut value = value;
    if let Value::Object(m) = &mut value {
        m.retain(|k, _| !k.starts_with("x-"));
    }
    let raw = value.clone();
    let mut expanded = value;
    let env = opts.env.clone();
    // The values `${VAR}` expanded to, so that no diagnostic repeats them.
    let seen: std::cell::RefCell<Vec<(String, String)>> = Default::default();
    let unset = expand_tree(&mut expanded, &|n| {
        let v = env(n);
        if let Some(x) = &v {
            seen.borrow_mut().push((n.to_string(), x.clone()));
        }
        v
    });
    let expansions = seen.into_inner();
    let spec: RulesFile = match serde_path_to_error::deserialize(&expanded) {
        Ok(s) => s,
        Err(e) => {
            // serde stops at the first mistake; each section item on its own finds them all,
            // so that one run of `check` reports every error in the file.
            let first = serde_diag(path, &spans, &e, "");
            let mut all = item_errors(path, &spans, &expanded);
            if !all
                .iter()
                .any(|d| d.line == first.line && d.column == first.column)
            {
                all.insert(0, first);
            }
            for mut d in all {
                scrub(&mut d, &expansions);
                diags.push(d);
            }
            return None;
        }
    };
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Some(Parsed {
        path: path.to_path_buf(),
        dir,
        text: Arc::from(text),
        spans,
        raw,
        unset,
        spec,
        expansions,
    })
}

/// Replaces every value a `${VAR}` expanded to with the `${VAR}` itself in a diagnostic's
/// message and hint. Values of under four characters are left (they would match too much and
/// are not secrets anyone could use).
pub(super) fn scrub(d: &mut Diagnostic, expansions: &[(String, String)]) {
    for (name, value) in expansions {
        if value.len() < 4 {
            continue;
        }
        let var = format!("${{{name}}}");
        if d.message.contains(value.as_str()) {
            d.message = d.message.replace(value.as_str(), &var);
        }
        if let Some(h) = &mut d.hint {
            if h.contains(value.as_str()) {
                *h = h.replace(value.as_str(), &var);
            }
        }
    }
}

/// Turns a deserialization error into a positioned diagnostic with a "did you mean" hint.
/// The deserialization errors of every item of every section, each at its place.
fn item_errors(file: &Path, spans: &SpanMap, v: &Value) -> Vec<Diagnostic> {
    use super::spec::{DestinationSpec, RuleSpec, ScheduleSpec, SourceSpec, TestSpec};
    fn one<T: serde::de::DeserializeOwned>(
        file: &Path,
        spans: &SpanMap,
        v: &Value,
        at: &str,
        out: &mut Vec<Diagnostic>,
    ) {
        if let Err(e) = serde_path_to_error::deserialize::<_, T>(v) {
            out.push(serde_diag(file, spans, &e, at));
        }
    }
    let mut out = Vec::new();
    let Some(m) = v.as_object() else {
        return out;
    };
    for (section, val) in m {
        match (section.as_str(), val) {
            ("sources", Value::Object(items)) => items.iter().for_each(|(k, x)| {
                one::<SourceSpec>(file, spans, x, &join_key("sources", k), &mut out)
            }),
            ("destinations", Value::Object(items)) => items.iter().for_each(|(k, x)| {
                one::<DestinationSpec>(file, spans, x, &join_key("destinations", k), &mut out)
            }),
            ("schedules", Value::Object(items)) => items.iter().for_each(|(k, x)| {
                one::<ScheduleSpec>(file, spans, x, &join_key("schedules", k), &mut out)
            }),
            ("rules", Value::Array(items)) => items.iter().enumerate().for_each(|(i, x)| {
                one::<RuleSpec>(file, spans, x, &join_index("rules", i), &mut out)
            }),
            ("tests", Value::Array(items)) => items.iter().enumerate().for_each(|(i, x)| {
                one::<TestSpec>(file, spans, x, &join_index("tests", i), &mut out)
            }),
            ("scenarios", Value::Array(items)) => items.iter().enumerate().for_each(|(i, x)| {
                one::<super::spec::ScenarioSpec>(
                    file,
                    spans,
                    x,
                    &join_index("scenarios", i),
                    &mut out,
                )
            }),
            _ => {}
        }
    }
    out
}

pub(super) fn serde_diag(
    file: &Path,
    spans: &SpanMap,
    e: &serde_path_to_error::Error<serde_json::Error>,
    prefix: &str,
) -> Diagnostic {
    let mut path = prefix.to_string();
    for seg in e.path().iter() {
        match seg {
            serde_path_to_error::Segment::Seq { index } => path = join_index(&path, *index),
            serde_path_to_error::Segment::Map { key } => path = join_key(&path, key),
            serde_path_to_error::Segment::Enum { variant } => path = join_key(&path, variant),
            serde_path_to_error::Segment::Unknown => {}
        }
    }
    let msg = e.inner().to_string();
    // serde_json appends " at line X column Y" for text input; a Value has none, but be safe.
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or("");
        let expected: Vec<&str> = rest
            .split("expected ")
            .nth(1)
            .map(|s| s.split('`').skip(1).step_by(2).collect())
            .unwrap_or_default();
        let key_path = if path.ends_with(field) {
            path.clone()
        } else {
            join_key(&path, field)
        };
        let hint = match did_you_mean(field, expected.iter().copied()) {
            Some(s) => format!("did you mean `{s}`?"),
            None if !expected.is_empty() => format!("allowed keys here: {}", expected.join(", ")),
            None => "remove this key".into(),
        };
        return Diagnostic::error("unknown-key", format!("unknown key `{field}`"))
            .at(file, spans.key(&key_path))
            .hint(hint);
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or("");
        return Diagnostic::error("missing-key", format!("missing required key `{field}`"))
            .at(file, spans.value(&path))
            .hint(format!("add `{field}:` here"));
    }
    let place = if path.is_empty() {
        String::new()
    } else {
        format!(" at `{path}`")
    };
    Diagnostic::error(
        "bad-value",
        format!("invalid value{place}: {}", without_values(&msg)),
    )
    .at(file, spans.value(&path))
    .hint("see schemas/rules.schema.json for the expected shape")
}

/// serde's "invalid type: string \"…\", expected …" with the value left out: it may be a
/// secret from `${VAR}`, or a line of a file that was never meant to be a rules file, and
/// diagnostics reach logs and the unauthenticated `/status`.
pub(super) fn without_values(msg: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            let found = rest.split([' ', ',']).next().unwrap_or("value");
            let expected = rest.rsplit_once("expected ").map(|(_, e)| e).unwrap_or("");
            return format!("found {}, expected {expected}", article(found));
        }
    }
    if let Some(rest) = msg.strip_prefix("unknown variant `") {
        let expected = rest.split_once("expected ").map(|(_, e)| e).unwrap_or("");
        return format!("unknown variant, expected {expected}");
    }
    msg.to_string()
}

pub(super) fn article(kind: &str) -> String {
    match kind {
        "integer" | "unit" => format!("an {kind}"),
        "map" | "sequence" | "string" | "boolean" | "floating" | "char" => format!("a {kind}"),
        "null" => "null".into(),
        _ => "a value".into(),
    }
}

pub(super) fn load_templates(dir: &Path, templates: &mut Templates, diags: &mut Vec<Diagnostic>) {
    let tdir = dir.join("templates");
    if !tdir.is_dir() {
        return;
    }
    let files = match list_files(&tdir, &["hbs"]) {
        Ok(f) => f,
        Err(d) => {
            diags.push(d);
            return;
        }
    };
    for f in only_inside(dir, files, diags) {
        let name = f
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_string();
        let text = match read_text(&f, 1024 * 1024) {
            Ok(t) => t,
            Err(d) => {
                diags.push(d);
                continue;
            }
        };
        let origin = TemplateOrigin {
            file: f.clone(),
            line_offset: 1,
            inline: false,
        };
        if let Err(e) = templates.add(&name, &text, origin) {
            diags
                .push(template_diag(&f, &text, &e, 1).hint(
                    "check that every {{#block}} has its {{/block}} and braces are balanced",
                ));
        }
    }
}

/// A diagnostic at a position inside a template file.
pub(crate) fn template_diag(
    file: &Path,
    text: &str,
    e: &crate::render::TemplateError,
    line_offset: usize,
) -> Diagnostic {
    let d = Diagnostic::error(
        "template",
        format!("template `{}`: {}", e.template, e.message),
    );
    match (e.line, e.column) {
        (Some(l), Some(c)) => d.at_line(file, text, l + line_offset - 1, c),
        _ => d.in_file(file),
    }
}
