//! Loading a rules directory into a [`Ruleset`], collecting diagnostics with positions.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::diag::{did_you_mean, Diagnostic};
use super::env::{expand_tree, Unset};
use super::secret::Secret;
use super::spec::{DestinationSpec, RulesFile, SendSpec, SourceSpec};
use super::yaml::{self, join_index, join_key, Limits, Pos, SpanMap};
use super::{
    parse_duration, parse_size, DestinationConfig, DestinationKind, LoadedFile, RuleTest, Ruleset,
    Schedule, SourceEntry, SourceKind,
};
use crate::event::EVENT_TYPES;
use crate::render::{TemplateOrigin, Templates};
use crate::routing::condition;
use crate::routing::path::JsonPathExpr;
use crate::routing::{Rule, SendStep};
use crate::sources::coder::CoderSource;
use crate::sources::port::PortSource;
use crate::sources::slack::SlackSource;
use crate::sources::Source;

/// Which command is loading: it decides what an unset variable means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `check` and `simulate`: unset variables are warnings (CI has no secrets).
    Check,
    /// `serve`: a destination whose variables are unset uses its `fallback` or is an error;
    /// a source whose secret is unset is disabled (answers 503 naming the variable).
    Serve,
}

/// Reads a variable (the process environment, or a map in tests).
pub type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// How to load.
#[derive(Clone)]
pub struct LoadOptions {
    pub mode: Mode,
    /// Environment lookup (the process environment, or a map in tests).
    pub env: EnvLookup,
    pub limits: Limits,
}

impl LoadOptions {
    /// Options reading the process environment.
    pub fn new(mode: Mode) -> Self {
        LoadOptions {
            mode,
            env: Arc::new(super::env::process_env),
            limits: Limits::default(),
        }
    }
}

/// A parsed file with what is needed to place diagnostics.
struct Parsed {
    path: PathBuf,
    dir: PathBuf,
    text: Arc<str>,
    spans: SpanMap,
    raw: Value,
    unset: Vec<Unset>,
    spec: RulesFile,
    /// `(VAR, value)` for every `${VAR}` expanded in this file ([`scrub`]).
    expansions: Vec<(String, String)>,
}

impl Parsed {
    fn at(&self, d: Diagnostic, path: &str) -> Diagnostic {
        d.at(&self.path, self.spans.value(path))
    }
    fn at_key(&self, d: Diagnostic, path: &str) -> Diagnostic {
        d.at(&self.path, self.spans.key(path))
    }
    fn unset_under(&self, prefix: &str) -> Vec<&Unset> {
        self.unset
            .iter()
            .filter(|u| {
                u.path == prefix
                    || u.path.starts_with(&format!("{prefix}."))
                    || u.path.starts_with(&format!("{prefix}["))
            })
            .collect()
    }
    /// The string at `path` as written (before `${}` expansion).
    fn raw_str(&self, path: &str) -> Option<&str> {
        let mut v = &self.raw;
        for part in split_path(path) {
            v = match part {
                Part::Key(k) => v.get(k)?,
                Part::Index(i) => v.get(i)?,
            };
        }
        v.as_str()
    }
}

enum Part<'a> {
    Key(&'a str),
    Index(usize),
}

fn split_path(path: &str) -> Vec<Part<'_>> {
    let mut out = Vec::new();
    for seg in path.split('.') {
        let (key, rest) = match seg.find('[') {
            Some(i) => (&seg[..i], &seg[i..]),
            None => (seg, ""),
        };
        if !key.is_empty() {
            out.push(Part::Key(key));
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            if let Ok(i) = idx.trim_end_matches(']').parse() {
                out.push(Part::Index(i));
            }
        }
    }
    out
}

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
            if let Some(rule) =
                compile_rule(p, r, &path, &dests, &schedules, &mut templates, &mut diags)
            {
                rules.push(rule);
            }
        }
    }

    let mut tests = Vec::new();
    for p in &parsed {
        for (i, t) in p.spec.tests.iter().enumerate() {
            let path = join_index("tests", i);
            if let Some(t) = load_test(p, t, &path, &sources, &mut diags) {
                tests.push(t);
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

fn duplicate(
    seen: &mut HashMap<String, (PathBuf, Pos)>,
    name: &str,
    p: &Parsed,
    path: &str,
) -> Option<String> {
    let pos = p.spans.key(path);
    if let Some((f, at)) = seen.get(name) {
        return Some(format!("{}:{}:{}", f.display(), at.line, at.column));
    }
    seen.insert(name.to_string(), (p.path.clone(), pos));
    None
}

fn list_files(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>, Diagnostic> {
    let rd = std::fs::read_dir(dir).map_err(|e| {
        Diagnostic::error(
            "io",
            format!("cannot read the rules directory {}: {e}", dir.display()),
        )
        .hint("pass an existing directory with --rules (default: rules/)")
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| exts.contains(&e))
        })
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// `files` without those that lead outside `root`, each of those reported.
fn only_inside(root: &Path, files: Vec<PathBuf>, diags: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
    files
        .into_iter()
        .filter(|f| {
            let ok = inside(root, f);
            if !ok {
                diags.push(outside(f, root));
            }
            ok
        })
        .collect()
}

/// Reads a text file with the size and encoding checks every input gets.
pub(crate) fn read_text(path: &Path, max: usize) -> Result<String, Diagnostic> {
    let bytes = read_bounded(path, max).map_err(|e| e.in_file(path))?;
    if bytes.contains(&0) {
        return Err(Diagnostic::error(
            "binary",
            "file contains NUL bytes: it is binary, not YAML text",
        )
        .in_file(path)
        .hint("only text files belong in the rules directory"));
    }
    String::from_utf8(bytes).map_err(|e| {
        Diagnostic::error(
            "encoding",
            format!(
                "file is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
        .in_file(path)
        .hint("save the file as UTF-8")
    })
}

/// Reads at most `max` bytes of a regular file (after symlinks). Devices, pipes and
/// directories are refused before they are opened for reading (`/dev/zero` never ends), and
/// the read itself stops one byte past `max`, whatever the file's size claimed.
pub(crate) fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, Diagnostic> {
    use std::io::Read;
    let io =
        |e: std::io::Error| Diagnostic::error("io", format!("cannot read {}: {e}", path.display()));
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(Diagnostic::error(
            "not-a-file",
            format!("{} is not a regular file", path.display()),
        )
        .hint("point at a regular file (devices, pipes and directories are not read)"));
    }
    let too_large = || {
        Diagnostic::error(
            "too-large",
            format!("{} is over the limit of {max} bytes", path.display()),
        )
        .hint("is this the right file?")
    };
    if meta.len() > max as u64 {
        return Err(too_large());
    }
    let f = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::with_capacity((meta.len() as usize).min(max));
    f.take(max as u64 + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() > max {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Whether `path`, with every symlink resolved, lies inside `root`. Symlinks that stay inside
/// (Kubernetes mounts a ConfigMap as `x.yaml -> ..data/x.yaml`) are fine; one that leads out
/// of the directory is refused, so the rules directory cannot be made to read, and show, any
/// other file of the machine.
pub(crate) fn inside(root: &Path, path: &Path) -> bool {
    match (std::fs::canonicalize(root), std::fs::canonicalize(path)) {
        (Ok(r), Ok(p)) => p.starts_with(r),
        _ => false,
    }
}

/// The diagnostic for a file that resolves outside the directory it must stay in.
fn outside(path: &Path, root: &Path) -> Diagnostic {
    Diagnostic::error(
        "outside",
        format!(
            "{} leads outside {} (a symlink or `..`); it is not read",
            path.display(),
            root.display()
        ),
    )
    .in_file(path)
    .hint("keep rules, templates and test events as files inside the directory, or symlinks to files inside it")
}

fn parse_file(path: &Path, opts: &LoadOptions, diags: &mut Vec<Diagnostic>) -> Option<Parsed> {
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
    const TOP: [&str; 5] = ["sources", "destinations", "rules", "tests", "schedules"];
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
            let mut d = serde_diag(path, &spans, &e);
            scrub(&mut d, &expansions);
            diags.push(d);
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
fn scrub(d: &mut Diagnostic, expansions: &[(String, String)]) {
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
fn serde_diag(
    file: &Path,
    spans: &SpanMap,
    e: &serde_path_to_error::Error<serde_json::Error>,
) -> Diagnostic {
    let mut path = String::new();
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
fn without_values(msg: &str) -> String {
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

fn article(kind: &str) -> String {
    match kind {
        "integer" | "unit" => format!("an {kind}"),
        "map" | "sequence" | "string" | "boolean" | "floating" | "char" => format!("a {kind}"),
        "null" => "null".into(),
        _ => "a value".into(),
    }
}

fn load_templates(dir: &Path, templates: &mut Templates, diags: &mut Vec<Diagnostic>) {
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
        (Some(l), Some(c)) => {
            let offset = text
                .lines()
                .take(l.saturating_sub(1))
                .map(|x| x.len() + 1)
                .sum::<usize>()
                + c.saturating_sub(1);
            d.at(
                file,
                Pos {
                    line: l + line_offset - 1,
                    column: c,
                    offset: offset.min(text.len()),
                    len: 1,
                },
            )
        }
        _ => d.in_file(file),
    }
}

/// Collects a secret from `value` (expanded), or `file`. Reports unset variables and literal
/// secrets. Returns `(secrets, unset variable names)`.
fn secrets_of(
    p: &Parsed,
    path: &str,
    values: Option<Vec<String>>,
    file_key: &str,
    file: Option<&String>,
    diags: &mut Vec<Diagnostic>,
) -> (Vec<Secret>, Vec<String>) {
    let mut out = Vec::new();
    let mut unset = Vec::new();
    if let Some(vals) = values {
        for (i, v) in vals.iter().enumerate() {
            let one = if p.raw_str(path).is_some() {
                path.to_string()
            } else {
                join_index(path, i)
            };
            if let Some(raw) = p.raw_str(&one) {
                if !raw.contains("${") && !raw.is_empty() {
                    diags.push(
                        p.at(Diagnostic::warning("literal-secret", "a secret is written literally in the rules file"), &one)
                            .hint("use `${VAR}` (or a `*_file` path) so the secret stays out of version control"),
                    );
                }
            }
            let missing = p.unset_under(&one);
            if !missing.is_empty() {
                unset.extend(missing.iter().map(|u| u.var.clone()));
            } else if !v.is_empty() {
                out.push(Secret::new(v.clone()));
            }
        }
    }
    if let Some(f) = file {
        let fpath = p.dir.join(f);
        // Secret files live anywhere (`/run/secrets/…`), but are small regular files.
        let read = read_bounded(&fpath, 64 * 1024).and_then(|b| {
            String::from_utf8(b).map_err(|_| Diagnostic::error("encoding", "not UTF-8 text"))
        });
        match read {
            Ok(t) => out.extend(
                t.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(Secret::new),
            ),
            Err(e) => diags.push(
                p.at(
                    Diagnostic::warning(
                        "secret-file",
                        format!("cannot read `{file_key}`: {}", e.message),
                    ),
                    &join_key(&path[..path.rfind('.').unwrap_or(0)], file_key),
                )
                .hint("the path is relative to the rules file"),
            ),
        }
    }
    (out, unset)
}

fn build_source(
    p: &Parsed,
    name: &str,
    spec: &SourceSpec,
    path: &str,
    opts: &LoadOptions,
    diags: &mut Vec<Diagnostic>,
) -> Option<SourceEntry> {
    let kinds = [
        spec.port.is_some(),
        spec.coder.is_some(),
        spec.slack.is_some(),
        spec.port_kafka.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        diags.push(
            p.at_key(
                Diagnostic::error(
                    "bad-source",
                    format!("source `{name}` must have exactly one kind"),
                )
                .hint("one of `port:`, `coder:`, `slack:`, `port_kafka:`"),
                path,
            ),
        );
        return None;
    }
    let max_body = match &spec.max_body {
        None => 1024 * 1024,
        Some(s) => match parse_size(s) {
            Some(n) => n,
            None => {
                diags.push(
                    p.at(
                        Diagnostic::error("bad-value", format!("`{s}` is not a size"))
                            .hint("e.g. `1MiB`, `256KiB`"),
                        &join_key(path, "max_body"),
                    ),
                );
                return None;
            }
        },
    };
    let mut dedup_window = Duration::from_secs(24 * 3600);
    let mut kafka = None;
    let (kind, source, secrets_unset, has_secret): (
        SourceKind,
        Arc<dyn Source>,
        Vec<String>,
        bool,
    ) = if let Some(s) = &spec.port {
        let sp = join_key(path, "port");
        let (secrets, unset) = secrets_of(
            p,
            &join_key(&sp, "client_secret"),
            s.client_secret.as_ref().map(|c| c.to_vec()),
            "client_secret_file",
            s.client_secret_file.as_ref(),
            diags,
        );
        let tolerance = match &s.tolerance {
            None => 300,
            Some(t) => match parse_duration(t) {
                Some(d) => d.as_secs() as i64,
                None => {
                    diags.push(
                        p.at(
                            Diagnostic::error("bad-value", format!("`{t}` is not a duration"))
                                .hint("e.g. `5m`"),
                            &join_key(&sp, "tolerance"),
                        ),
                    );
                    300
                }
            },
        };
        let run_id_path = match &s.run_id_path {
            None => None,
            Some(rp) => match JsonPathExpr::compile(rp) {
                Ok(c) => Some(c),
                Err(e) => {
                    diags.push(p.at(
                        Diagnostic::error("bad-jsonpath", format!("invalid JSONPath `{rp}`: {e}")),
                        &join_key(&sp, "run_id_path"),
                    ));
                    None
                }
            },
        };
        if s.insecure_no_signature {
            diags.push(
                p.at(
                    Diagnostic::warning("insecure", format!("source `{name}` accepts unsigned requests (`insecure_no_signature: true`)")),
                    &join_key(&sp, "insecure_no_signature"),
                )
                .hint("anyone who can reach the engine can inject events; set `client_secret` instead"),
            );
        } else if s.client_secret.is_none() && s.client_secret_file.is_none() {
            diags.push(p.at_key(
                Diagnostic::error("missing-secret", format!("Port source `{name}` has no `client_secret`"))
                    .hint("add `client_secret: \"${PORT_CLIENT_SECRET}\"`, or `insecure_no_signature: true` for local experiments"),
                &sp,
            ));
        }
        let has = !secrets.is_empty() || s.insecure_no_signature;
        let src = PortSource {
            secrets,
            insecure_no_signature: s.insecure_no_signature,
            tolerance,
            run_id_path,
            action: s.action.clone(),
        };
        (SourceKind::Port, Arc::new(src), unset, has)
    } else if let Some(s) = &spec.coder {
        let sp = join_key(path, "coder");
        let (tokens, unset) = secrets_of(
            p,
            &join_key(&sp, "token"),
            s.token.as_ref().map(|c| c.to_vec()),
            "token_file",
            s.token_file.as_ref(),
            diags,
        );
        if s.token.is_none() && s.token_file.is_none() {
            diags.push(
                p.at_key(
                    Diagnostic::error(
                        "missing-secret",
                        format!("Coder source `{name}` has no `token`"),
                    )
                    .hint("add `token: \"${CODER_WEBHOOK_TOKEN}\"`"),
                    &sp,
                ),
            );
        }
        if let Some(w) = &s.dedup_window {
            match parse_duration(w) {
                Some(d) => dedup_window = d,
                None => diags.push(
                    p.at(
                        Diagnostic::error("bad-value", format!("`{w}` is not a duration"))
                            .hint("e.g. `24h`"),
                        &join_key(&sp, "dedup_window"),
                    ),
                ),
            }
        }
        let has = !tokens.is_empty();
        (
            SourceKind::Coder,
            Arc::new(CoderSource { tokens }),
            unset,
            has,
        )
    } else if let Some(k) = &spec.port_kafka {
        let sp = join_key(path, "port_kafka");
        kafka = kafka_source(p, name, k, &sp, diags);
        let unset: Vec<String> = p.unset_under(&sp).iter().map(|u| u.var.clone()).collect();
        let has = unset.is_empty();
        let src = PortSource {
            insecure_no_signature: true,
            action: None,
            ..PortSource::default()
        };
        (SourceKind::PortKafka, Arc::new(src), unset, has)
    } else {
        let s = spec.slack.as_ref()?;
        let sp = join_key(path, "slack");
        let (secrets, unset) = secrets_of(
            p,
            &join_key(&sp, "signing_secret"),
            s.signing_secret.as_ref().map(|c| c.to_vec()),
            "signing_secret_file",
            s.signing_secret_file.as_ref(),
            diags,
        );
        if s.signing_secret.is_none() && s.signing_secret_file.is_none() {
            diags.push(
                p.at_key(
                    Diagnostic::error(
                        "missing-secret",
                        format!("Slack source `{name}` has no `signing_secret`"),
                    )
                    .hint("add `signing_secret: \"${SLACK_SIGNING_SECRET}\"`"),
                    &sp,
                ),
            );
        }
        let has = !secrets.is_empty();
        (
            SourceKind::Slack,
            Arc::new(SlackSource { secrets }),
            unset,
            has,
        )
    };
    let mut disabled = None;
    if !secrets_unset.is_empty() {
        let vars = secrets_unset.join(", ");
        let msg = format!("source `{name}`: variable {vars} is unset");
        match opts.mode {
            Mode::Check => diags.push(
                p.at(Diagnostic::warning("unset-var", msg), &first_unset(p, path))
                    .hint("fine in CI; `serve` disables this source until it is set"),
            ),
            Mode::Serve => {
                diags.push(p.at(
                    Diagnostic::warning(
                        "unset-var",
                        format!("{msg}: the source is disabled and answers 503"),
                    ),
                    &first_unset(p, path),
                ));
            }
        }
        if !has_secret {
            disabled = Some(format!("source `{name}` is not configured: set {vars}"));
        }
    }
    Some(SourceEntry {
        name: name.to_string(),
        kind,
        source,
        disabled,
        max_body,
        dedup_window,
        report_to: spec
            .port
            .as_ref()
            .and_then(|s| s.report_to.clone())
            .or_else(|| spec.port_kafka.as_ref().and_then(|s| s.report_to.clone())),
        kafka,
        report_unmatched: spec
            .port
            .as_ref()
            .and_then(|s| s.report_unmatched)
            .unwrap_or(true),
        file: p.path.clone(),
    })
}

const PROTOCOLS: &[&str] = &["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"];
const MECHANISMS: &[&str] = &["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"];

/// Validates and resolves Kafka connection settings (offline: no broker is contacted).
#[allow(clippy::too_many_arguments)]
fn kafka_conn(
    p: &Parsed,
    sp: &str,
    brokers: &Option<super::spec::OneOrMany>,
    protocol: Option<&str>,
    default_protocol: &str,
    mechanism: Option<&str>,
    username: &Option<String>,
    password: Option<Secret>,
    ca: &Option<String>,
    from_port: bool,
    diags: &mut Vec<Diagnostic>,
) -> Option<super::KafkaConn> {
    let before = diags.len();
    let brokers: Vec<String> = brokers
        .as_ref()
        .map(|b| b.to_vec())
        .unwrap_or_default()
        .into_iter()
        .filter(|b| !b.trim().is_empty())
        .collect();
    if brokers.is_empty() && !from_port && p.unset_under(&join_key(sp, "brokers")).is_empty() {
        diags.push(p.at_key(
            Diagnostic::error(
                "missing-key",
                "Kafka settings need `brokers` (`host:port`, Port's listen on 9196)",
            ),
            sp,
        ));
    }
    for (i, b) in brokers.iter().enumerate() {
        let ok = b
            .rsplit_once(':')
            .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            diags.push(p.at(
                Diagnostic::error("bad-value", format!("broker `{b}` is not `host:port`")),
                &join_index(&join_key(sp, "brokers"), i),
            ));
        }
    }
    let protocol = protocol.unwrap_or(default_protocol).to_ascii_uppercase();
    if !PROTOCOLS.contains(&protocol.as_str()) {
        let hint = did_you_mean(&protocol, PROTOCOLS.iter().copied())
            .map(|x| format!("did you mean `{x}`?"))
            .unwrap_or_else(|| PROTOCOLS.join(", "));
        diags.push(
            p.at(
                Diagnostic::error(
                    "bad-value",
                    format!("unknown security protocol `{protocol}`"),
                )
                .hint(hint),
                &join_key(sp, "security_protocol"),
            ),
        );
    }
    let mechanism = mechanism.unwrap_or("SCRAM-SHA-512").to_ascii_uppercase();
    if !MECHANISMS.contains(&mechanism.as_str()) {
        let hint = did_you_mean(&mechanism, MECHANISMS.iter().copied())
            .map(|x| format!("did you mean `{x}`?"))
            .unwrap_or_else(|| MECHANISMS.join(", "));
        diags.push(
            p.at(
                Diagnostic::error("bad-value", format!("unknown SASL mechanism `{mechanism}`"))
                    .hint(hint),
                &join_key(sp, "sasl_mechanism"),
            ),
        );
    }
    if protocol.starts_with("SASL")
        && !from_port
        && (username.is_none() || password.is_none())
        && p.unset_under(sp).is_empty()
    {
        diags.push(p.at_key(
            Diagnostic::error("missing-key", format!("{protocol} needs `username` and `password`")).hint("Port gives them with the topics; or set `security_protocol: PLAINTEXT` for a local broker"),
            sp,
        ));
    }
    if diags[before..].iter().any(Diagnostic::is_error) {
        return None;
    }
    Some(super::KafkaConn {
        brokers,
        security_protocol: protocol,
        sasl_mechanism: mechanism,
        username: username.clone(),
        password,
        ssl_ca_location: ca.clone(),
    })
}

fn kafka_source(
    p: &Parsed,
    name: &str,
    k: &super::spec::PortKafkaSpec,
    sp: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<super::KafkaSource> {
    use super::spec::TopicSetting;
    let org = k.org_id.clone().filter(|o| !o.is_empty());
    if org.is_none() && p.unset_under(&join_key(sp, "org_id")).is_empty() {
        diags.push(
            p.at_key(
                Diagnostic::error(
                    "missing-key",
                    format!("Kafka source `{name}` needs `org_id`"),
                )
                .hint("Port's topics and groups are named after it: `org_…`"),
                sp,
            ),
        );
    }
    let org = org.unwrap_or_else(|| "org".into());
    let (pw, _) = secrets_of(
        p,
        &join_key(sp, "password"),
        k.password.clone().map(|x| vec![x]),
        "password_file",
        k.password_file.as_ref(),
        diags,
    );
    let conn = kafka_conn(
        p,
        sp,
        &k.brokers,
        k.security_protocol.as_deref(),
        "SASL_SSL",
        k.sasl_mechanism.as_deref(),
        &k.username,
        pw.into_iter().next(),
        &k.ssl_ca_location,
        k.credentials_from.is_some(),
        diags,
    )?;
    let mut topics = Vec::new();
    for (setting, default, kind) in [
        (&k.runs_topic, format!("{org}.runs"), super::PortTopic::Runs),
        (
            &k.change_log_topic,
            format!("{org}.change.log"),
            super::PortTopic::ChangeLog,
        ),
    ] {
        match setting {
            None | Some(TopicSetting::On(true)) => topics.push((default, kind)),
            Some(TopicSetting::On(false)) => {}
            Some(TopicSetting::Name(n)) => topics.push((n.clone(), kind)),
        }
    }
    if topics.is_empty() {
        diags.push(p.at_key(
            Diagnostic::error(
                "bad-source",
                format!("Kafka source `{name}` has both topics turned off"),
            ),
            sp,
        ));
        return None;
    }
    let start_from = k.start_from.clone().unwrap_or_else(|| "earliest".into());
    if !matches!(start_from.as_str(), "earliest" | "latest") {
        diags.push(p.at(
            Diagnostic::error("bad-value", "`start_from` is `earliest` or `latest`"),
            &join_key(sp, "start_from"),
        ));
    }
    Some(super::KafkaSource {
        conn,
        group: k
            .group
            .clone()
            .unwrap_or_else(|| format!("{org}.switchyard")),
        topics,
        start_from,
        instance_id: k.instance_id.clone().filter(|i| !i.is_empty()),
        credentials_from: k.credentials_from.clone(),
    })
}

/// The only `port` destination, when there is exactly one.
fn only_port_destination(dests: &BTreeMap<String, DestinationConfig>) -> Option<String> {
    let mut ports = dests
        .values()
        .filter(|d| matches!(d.kind, DestinationKind::Port { .. }));
    match (ports.next(), ports.next()) {
        (Some(d), None) => Some(d.name.clone()),
        _ => None,
    }
}

/// Resolves each Port source's `report_to` (explicit, or the only `port` destination).
fn resolve_reporting(
    parsed: &[Parsed],
    sources: &mut BTreeMap<String, SourceEntry>,
    dests: &BTreeMap<String, DestinationConfig>,
    diags: &mut Vec<Diagnostic>,
) {
    for src in sources.values().filter(|s| s.kind == SourceKind::PortKafka) {
        let Some(from) = src.kafka.as_ref().and_then(|k| k.credentials_from.clone()) else {
            continue;
        };
        if !dests
            .get(&from)
            .is_some_and(|d| matches!(d.kind, DestinationKind::Port { .. }))
        {
            if let Some(p) = parsed.iter().find(|p| p.path == src.file) {
                diags.push(p.at(
                    Diagnostic::error(
                        "unknown-destination",
                        format!("`credentials_from: {from}` is not a `port` destination"),
                    ),
                    &format!("sources.{}.port_kafka.credentials_from", src.name),
                ));
            }
        }
    }
    for src in sources
        .values_mut()
        .filter(|s| matches!(s.kind, SourceKind::Port | SourceKind::PortKafka))
    {
        match &src.report_to {
            Some(to) => {
                if !dests
                    .get(to)
                    .is_some_and(|d| matches!(d.kind, DestinationKind::Port { .. }))
                {
                    if let Some(p) = parsed.iter().find(|p| p.path == src.file) {
                        diags.push(p.at(
                            Diagnostic::error(
                                "unknown-destination",
                                format!("`report_to: {to}` is not a `port` destination"),
                            ),
                            &format!("sources.{}.port.report_to", src.name),
                        ));
                    }
                }
            }
            None => src.report_to = only_port_destination(dests),
        }
    }
}

/// Compiles the schedules of every file.
fn load_schedules(parsed: &[Parsed], diags: &mut Vec<Diagnostic>) -> BTreeMap<String, Schedule> {
    let mut out = BTreeMap::new();
    let parser = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build();
    for p in parsed {
        for (name, spec) in &p.spec.schedules {
            let path = join_key("schedules", name);
            if out.contains_key(name) {
                diags.push(p.at_key(
                    Diagnostic::error("duplicate", format!("schedule `{name}` is defined twice")),
                    &path,
                ));
                continue;
            }
            let cron = match parser.parse(&spec.cron) {
                Ok(c) => c,
                Err(e) => {
                    diags.push(
                        p.at(Diagnostic::error("bad-cron", format!("invalid cron pattern `{}`: {e}", spec.cron)), &join_key(&path, "cron"))
                            .hint("5 fields `min hour day month weekday` (e.g. `0 9 * * MON`), or 6 with seconds first"),
                    );
                    continue;
                }
            };
            let tz_name = spec.timezone.clone().unwrap_or_else(|| "UTC".into());
            let tz: chrono_tz::Tz = match tz_name.parse() {
                Ok(t) => t,
                Err(_) => {
                    diags.push(
                        p.at(
                            Diagnostic::error(
                                "bad-timezone",
                                format!("unknown time zone `{tz_name}`"),
                            ),
                            &join_key(&path, "timezone"),
                        )
                        .hint("an IANA name such as `Europe/Berlin` or `America/New_York`"),
                    );
                    continue;
                }
            };
            out.insert(
                name.clone(),
                Schedule {
                    name: name.clone(),
                    cron,
                    pattern: spec.cron.clone(),
                    tz,
                },
            );
        }
    }
    out
}

fn build_destination(
    p: &Parsed,
    name: &str,
    spec: &DestinationSpec,
    path: &str,
    opts: &LoadOptions,
    templates: &mut Templates,
    diags: &mut Vec<Diagnostic>,
) -> Option<DestinationConfig> {
    let n = [
        spec.slack_webhook.is_some(),
        spec.slack.is_some(),
        spec.webhook.is_some(),
        spec.stdout.is_some(),
        spec.port.is_some(),
        spec.kafka.is_some(),
    ]
    .iter()
    .filter(|k| **k)
    .count();
    if n != 1 {
        diags.push(
            p.at_key(
                Diagnostic::error(
                    "bad-destination",
                    format!("destination `{name}` must have exactly one kind"),
                )
                .hint(
                    "one of `slack_webhook:`, `slack:`, `webhook:`, `stdout:`, `port:`, `kafka:`",
                ),
                path,
            ),
        );
        return None;
    }
    let before = diags.len();
    let secret = |key: &str,
                  sub: &str,
                  v: &Option<String>,
                  file_key: &str,
                  file: &Option<String>,
                  diags: &mut Vec<Diagnostic>|
     -> Option<Secret> {
        let kp = join_key(&join_key(path, sub), key);
        if v.is_none() && file.is_none() {
            diags.push(p.at_key(
                Diagnostic::error("missing-key", format!("destination `{name}` needs `{key}`")),
                &join_key(path, sub),
            ));
            return None;
        }
        let (mut s, _) = secrets_of(
            p,
            &kp,
            v.clone().map(|x| vec![x]),
            file_key,
            file.as_ref(),
            diags,
        );
        Some(if s.is_empty() {
            Secret::new("")
        } else {
            s.remove(0)
        })
    };
    let kind = if let Some(s) = &spec.slack_webhook {
        let url = secret(
            "url",
            "slack_webhook",
            &s.url,
            "url_file",
            &s.url_file,
            diags,
        )?;
        DestinationKind::SlackWebhook { url }
    } else if let Some(s) = &spec.slack {
        let token = secret(
            "token",
            "slack",
            &s.token,
            "token_file",
            &s.token_file,
            diags,
        )?;
        let mut api_url = s
            .api_url
            .clone()
            .unwrap_or_else(|| "https://slack.com/api/".into());
        if !api_url.ends_with('/') {
            api_url.push('/');
        }
        DestinationKind::Slack { token, api_url }
    } else if let Some(s) = &spec.webhook {
        let url = secret("url", "webhook", &s.url, "url_file", &s.url_file, diags)?;
        let method = s
            .method
            .clone()
            .unwrap_or_else(|| "POST".into())
            .to_ascii_uppercase();
        if !matches!(method.as_str(), "POST" | "PUT" | "PATCH") {
            diags.push(
                p.at(
                    Diagnostic::error(
                        "bad-value",
                        format!("method `{method}` cannot carry a body"),
                    )
                    .hint("use POST, PUT or PATCH"),
                    &join_key(path, "webhook.method"),
                ),
            );
        }
        let mut headers = Vec::new();
        for (h, v) in &s.headers {
            let tname = format!("dest:{name}:header:{h}");
            if let Err(e) = templates.add_plain(&tname, v) {
                diags.push(p.at(
                    Diagnostic::error("template", format!("header `{h}`: {}", e.message)),
                    &join_key(path, &format!("webhook.headers.{h}")),
                ));
            }
            headers.push((h.clone(), tname));
        }
        if let Some(t) = &s.template {
            if !templates.has(t) {
                diags.push(missing_template(
                    p,
                    &join_key(path, "webhook.template"),
                    t,
                    templates,
                ));
            }
        }
        DestinationKind::Webhook {
            url,
            method,
            headers,
            template: s.template.clone(),
        }
    } else if let Some(s) = &spec.port {
        let client_id = secret(
            "client_id",
            "port",
            &s.client_id,
            "client_id_file",
            &None,
            diags,
        )?;
        let client_secret = secret(
            "client_secret",
            "port",
            &s.client_secret,
            "client_secret_file",
            &s.client_secret_file,
            diags,
        )?;
        let base_url = s
            .base_url
            .clone()
            .unwrap_or_else(|| "https://api.port.io".into())
            .trim_end_matches('/')
            .to_string();
        DestinationKind::Port {
            client_id,
            client_secret,
            base_url,
        }
    } else if let Some(k) = &spec.kafka {
        let sp = join_key(path, "kafka");
        let pw = k
            .password
            .clone()
            .filter(|x| !x.is_empty())
            .map(Secret::new);
        let conn = kafka_conn(
            p,
            &sp,
            &k.brokers,
            k.security_protocol.as_deref(),
            "PLAINTEXT",
            k.sasl_mechanism.as_deref(),
            &k.username,
            pw,
            &k.ssl_ca_location,
            false,
            diags,
        )?;
        let Some(topic) = k.topic.clone().filter(|t| !t.is_empty()) else {
            diags.push(p.at_key(
                Diagnostic::error("missing-key", format!("destination `{name}` needs `topic`")),
                &sp,
            ));
            return None;
        };
        let key = match &k.key {
            None => None,
            Some(t) => {
                let tname = format!("dest:{name}:key");
                if let Err(e) = templates.add_plain(&tname, t) {
                    diags.push(p.at(
                        Diagnostic::error("template", format!("key: {}", e.message)),
                        &join_key(&sp, "key"),
                    ));
                }
                Some(tname)
            }
        };
        DestinationKind::Kafka { conn, topic, key }
    } else {
        DestinationKind::Stdout
    };
    let mut duration = |key: &str, v: &Option<String>, default: Duration| match v {
        None => default,
        Some(t) => parse_duration(t).unwrap_or_else(|| {
            diags.push(
                p.at(
                    Diagnostic::error("bad-value", format!("`{t}` is not a duration"))
                        .hint("e.g. `10s`, `5m`"),
                    &join_key(path, key),
                ),
            );
            default
        }),
    };
    let timeout = duration("timeout", &spec.timeout, Duration::from_secs(10));
    let retry_initial = duration("retry_initial", &spec.retry_initial, Duration::from_secs(1));
    let retry_max = duration("retry_max", &spec.retry_max, Duration::from_secs(300));
    let max_age = duration("max_age", &spec.max_age, Duration::from_secs(24 * 3600));
    if let Some(r) = spec.rate_per_second {
        if !(r > 0.0 && r.is_finite()) {
            diags.push(p.at(
                Diagnostic::error("bad-value", "`rate_per_second` must be above 0"),
                &join_key(path, "rate_per_second"),
            ));
        }
    }
    let slackish = matches!(
        kind,
        DestinationKind::SlackWebhook { .. } | DestinationKind::Slack { .. }
    );
    let unset: Vec<String> = p.unset_under(path).iter().map(|u| u.var.clone()).collect();
    let mut use_fallback = false;
    let mut disabled = None;
    if !unset.is_empty() {
        let vars = unset.join(", ");
        let path = &first_unset(p, path);
        match (opts.mode, &spec.fallback) {
            (Mode::Check, _) => diags.push(
                p.at(
                    Diagnostic::warning(
                        "unset-var",
                        format!("destination `{name}`: variable {vars} is unset"),
                    ),
                    path,
                )
                .hint("fine in CI; `serve` needs it set (or a `fallback`)"),
            ),
            (Mode::Serve, Some(f)) => {
                use_fallback = true;
                diags.push(p.at(
                    Diagnostic::warning(
                        "fallback",
                        format!("destination `{name}`: {vars} unset, delivering to `{f}` instead"),
                    ),
                    path,
                ));
            }
            (Mode::Serve, None) => {
                disabled = Some(format!(
                    "destination `{name}` is not configured: set {vars}"
                ));
                diags.push(
                    p.at(Diagnostic::warning("unset-var", format!("destination `{name}`: variable {vars} is unset; its messages become dead letters until it is set")), path)
                        .hint("set it, or add `fallback: <destination>`"),
                )
            }
        }
    }
    if diags[before..].iter().any(Diagnostic::is_error) {
        return None;
    }
    Some(DestinationConfig {
        name: name.to_string(),
        kind,
        fallback: spec.fallback.clone(),
        use_fallback,
        disabled,
        timeout,
        max_attempts: spec.max_attempts.unwrap_or(u32::MAX).max(1),
        rate_per_second: spec
            .rate_per_second
            .or(if slackish { Some(1.0) } else { None }),
        concurrency: spec.concurrency.unwrap_or(4).clamp(1, 256),
        retry_initial,
        retry_max: retry_max.max(retry_initial),
        max_age,
        file: p.path.clone(),
    })
}

/// The path of the first string under `prefix` that referenced an unset variable.
fn first_unset(p: &Parsed, prefix: &str) -> String {
    p.unset_under(prefix)
        .first()
        .map(|u| u.path.clone())
        .unwrap_or_else(|| prefix.to_string())
}

fn resolve_fallbacks(
    parsed: &[Parsed],
    dests: &mut BTreeMap<String, DestinationConfig>,
    _opts: &LoadOptions,
    diags: &mut Vec<Diagnostic>,
) {
    let names: Vec<String> = dests.keys().cloned().collect();
    for p in parsed {
        for (name, spec) in &p.spec.destinations {
            let Some(f) = &spec.fallback else { continue };
            let path = join_key(&join_key("destinations", name), "fallback");
            match dests.get(f) {
                None => diags.push(
                    p.at(
                        Diagnostic::error(
                            "unknown-destination",
                            format!("fallback `{f}` is not a destination"),
                        )
                        .hint(
                            did_you_mean(f, names.iter().map(String::as_str))
                                .map(|s| format!("did you mean `{s}`?"))
                                .unwrap_or_else(|| format!("known: {}", names.join(", "))),
                        ),
                        &path,
                    ),
                ),
                Some(d) if d.fallback.is_some() || f == name => diags.push(
                    p.at(
                        Diagnostic::error(
                            "bad-fallback",
                            format!("fallback `{f}` has a fallback itself"),
                        )
                        .hint("a fallback must be a plain destination such as `stdout`"),
                        &path,
                    ),
                ),
                Some(_) => {}
            }
        }
    }
}

fn missing_template(p: &Parsed, path: &str, name: &str, templates: &Templates) -> Diagnostic {
    let hint = match did_you_mean(name, templates.names()) {
        Some(s) => format!("did you mean `{s}`? (templates live in templates/<name>.hbs)"),
        None => {
            format!("create templates/{name}.hbs next to the rules files, or use inline `blocks:`")
        }
    };
    p.at(
        Diagnostic::error(
            "missing-template",
            format!("template `{name}` does not exist"),
        ),
        path,
    )
    .hint(hint)
}

fn compile_rule(
    p: &Parsed,
    r: &super::spec::RuleSpec,
    path: &str,
    dests: &BTreeMap<String, DestinationConfig>,
    schedules: &BTreeMap<String, Schedule>,
    templates: &mut Templates,
    diags: &mut Vec<Diagnostic>,
) -> Option<Rule> {
    let before = diags.len();
    let on = r.on.to_vec();
    for (i, t) in on.iter().enumerate() {
        let known = EVENT_TYPES.contains(&t.as_str())
            || t.strip_prefix("schedule/")
                .is_some_and(|n| schedules.contains_key(n) || n == "*")
            || t == "*"
            || t.strip_suffix('*')
                .is_some_and(|pre| EVENT_TYPES.iter().any(|e| e.starts_with(pre)));
        if !known {
            let tp = if matches!(r.on, super::spec::OneOrMany::One(_)) {
                join_key(path, "on")
            } else {
                join_index(&join_key(path, "on"), i)
            };
            let hint = did_you_mean(t, EVENT_TYPES.iter().copied())
                .map(|s| format!("did you mean `{s}`?"))
                .unwrap_or_else(|| format!("known types: {}", EVENT_TYPES.join(", ")));
            diags.push(
                p.at(
                    Diagnostic::error("unknown-event-type", format!("unknown event type `{t}`")),
                    &tp,
                )
                .hint(hint),
            );
        }
    }
    let mut conditions = Vec::new();
    let mut after = Vec::new();
    for (i, c) in r.conditions.iter().enumerate() {
        let cp = join_index(&join_key(path, "where"), i);
        match condition::compile(c) {
            Ok(c) if c.reads_member("with") => {
                if r.queries.is_empty() {
                    diags.push(p.at(
                        Diagnostic::error(
                            "bad-condition",
                            "this condition reads `$.with…` but the rule has no `with:` queries",
                        ),
                        &cp,
                    ));
                }
                after.push(c);
            }
            Ok(c) => conditions.push(c),
            Err(e) => diags.push(condition_diag(p, &cp, &e)),
        }
    }
    let mut queries = Vec::new();
    for (name, q) in &r.queries {
        let qp = join_key(&join_key(path, "with"), name);
        if !dests
            .get(&q.port)
            .is_some_and(|d| matches!(d.kind, DestinationKind::Port { .. }))
        {
            diags.push(
                p.at(
                    Diagnostic::error(
                        "unknown-destination",
                        format!("`{}` is not a `port` destination", q.port),
                    )
                    .hint("define `destinations: {name: {port: {client_id, client_secret}}}`"),
                    &join_key(&qp, "port"),
                ),
            );
            continue;
        }
        let timeout = match &q.timeout {
            None => Duration::from_secs(30),
            Some(t) => parse_duration(t).unwrap_or_else(|| {
                diags.push(p.at(
                    Diagnostic::error("bad-value", format!("`{t}` is not a duration")),
                    &join_key(&qp, "timeout"),
                ));
                Duration::from_secs(30)
            }),
        };
        queries.push(crate::routing::Query {
            name: name.clone(),
            port: q.port.clone(),
            blueprint: q.search.blueprint.clone(),
            combinator: q.search.combinator.clone().unwrap_or_else(|| "and".into()),
            rules: q.search.rules.clone(),
            include: q.include.clone(),
            max_pages: q.max_pages.unwrap_or(20).max(1),
            limit: q.limit.unwrap_or(200).clamp(1, 1000),
            timeout,
        });
    }
    let report = match &r.report {
        None => None,
        Some(rep) => {
            let rp = join_key(path, "report");
            let to = rep.to.clone().or_else(|| only_port_destination(dests));
            match to {
                Some(to)
                    if dests
                        .get(&to)
                        .is_some_and(|d| matches!(d.kind, DestinationKind::Port { .. })) =>
                {
                    let mut fields = |which: &str, c: &super::spec::ReportContent| {
                        let mut f = crate::routing::ReportFields::default();
                        for (key, v, slot) in [
                            ("statusLabel", &c.status_label, &mut f.status_label),
                            ("summary", &c.summary, &mut f.summary),
                            ("link", &c.link, &mut f.link),
                        ] {
                            if let Some(text) = v {
                                let name = format!("rule:{}:report:{which}:{key}", r.id);
                                match templates.add_plain(&name, text) {
                                    Ok(()) => *slot = Some(name),
                                    Err(e) => diags.push(p.at(
                                        Diagnostic::error(
                                            "template",
                                            format!("report {which}.{key}: {}", e.message),
                                        ),
                                        &join_key(&join_key(&rp, which), key),
                                    )),
                                }
                            }
                        }
                        f
                    };
                    let success = fields("success", &rep.success);
                    let failure = fields("failure", &rep.failure);
                    Some(crate::routing::Report {
                        to,
                        success,
                        failure,
                    })
                }
                Some(to) => {
                    diags.push(p.at(
                        Diagnostic::error(
                            "unknown-destination",
                            format!("`{to}` is not a `port` destination"),
                        ),
                        &join_key(&rp, "to"),
                    ));
                    None
                }
                None => {
                    diags.push(p.at_key(Diagnostic::error("missing-key", "`report:` needs a `port` destination").hint("add `to: <port destination>`, or define exactly one `port` destination"), &rp));
                    None
                }
            }
        }
    };
    if r.send.is_empty() {
        diags.push(
            p.at(
                Diagnostic::error("bad-rule", format!("rule `{}` has an empty `send`", r.id))
                    .hint("add at least one `- to: <destination>`"),
                &join_key(path, "send"),
            ),
        );
    }
    let names: Vec<&str> = dests.keys().map(String::as_str).collect();
    let mut sends = Vec::new();
    for (i, s) in r.send.iter().enumerate() {
        let sp = join_index(&join_key(path, "send"), i);
        if let Some(step) = compile_send(p, &r.id, s, &sp, dests, &names, templates, diags) {
            sends.push(step);
        }
    }
    let throttle = match &r.throttle {
        None => None,
        Some(t) => {
            let tp = join_key(path, "throttle");
            let window = parse_duration(&t.window);
            if window.is_none() {
                diags.push(
                    p.at(
                        Diagnostic::error("bad-value", format!("`{}` is not a duration", t.window))
                            .hint("e.g. `10m`"),
                        &join_key(&tp, "window"),
                    ),
                );
            }
            let name = format!("rule:{}:throttle", r.id);
            if let Err(e) = templates.add_plain(&name, &t.key) {
                diags.push(p.at(
                    Diagnostic::error("template", format!("throttle key: {}", e.message)),
                    &join_key(&tp, "key"),
                ));
            }
            window.map(|w| (name, w))
        }
    };
    if diags[before..].iter().any(Diagnostic::is_error) {
        return None;
    }
    Some(Rule {
        throttle,
        queries,
        after,
        report,
        id: r.id.clone(),
        description: r.description.clone(),
        on,
        conditions,
        sends,
        stop: r.stop,
        file: p.path.clone(),
    })
}

fn condition_diag(p: &Parsed, cp: &str, e: &condition::ConditionError) -> Diagnostic {
    let code = if e.message.contains("JSONPath") {
        "bad-jsonpath"
    } else if e.message.contains("regular expression") {
        "bad-regex"
    } else {
        "bad-condition"
    };
    let mut d = Diagnostic::error(code, e.message.clone());
    if let Some(h) = &e.hint {
        d = d.hint(h.clone());
    }
    match e.offset {
        Some(off) => {
            let mut pos = p.spans.value(cp);
            // Quoted scalars start one character before their text.
            let quoted = p
                .text
                .as_bytes()
                .get(pos.offset)
                .is_some_and(|b| *b == b'"' || *b == b'\'');
            let shift = off + usize::from(quoted);
            pos.column += shift;
            pos.offset += shift;
            pos.len = e.len;
            d.at(&p.path, pos)
        }
        None => {
            let sub = format!("{cp}{}", e.subpath);
            if e.subpath.starts_with(".") && e.message.starts_with("unknown key") {
                p.at_key(d, &sub)
            } else {
                p.at(d, &sub)
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn compile_send(
    p: &Parsed,
    rule_id: &str,
    s: &SendSpec,
    sp: &str,
    dests: &BTreeMap<String, DestinationConfig>,
    names: &[&str],
    templates: &mut Templates,
    diags: &mut Vec<Diagnostic>,
) -> Option<SendStep> {
    let Some(dest) = dests.get(&s.to) else {
        let hint = did_you_mean(&s.to, names.iter().copied())
            .map(|x| format!("did you mean `{x}`?"))
            .unwrap_or_else(|| format!("defined destinations: {}", names.join(", ")));
        diags.push(
            p.at(
                Diagnostic::error(
                    "unknown-destination",
                    format!("destination `{}` does not exist", s.to),
                ),
                &join_key(sp, "to"),
            )
            .hint(hint),
        );
        return None;
    };
    let is_bot = matches!(dest.kind, DestinationKind::Slack { .. });
    for (key, present) in [
        ("channel", s.channel.is_some()),
        ("user_email", s.user_email.is_some()),
        ("thread_ts", s.thread_ts.is_some()),
    ] {
        if present && !is_bot {
            diags.push(
                p.at_key(
                    Diagnostic::error(
                        "bad-send",
                        format!(
                            "`{key}` only applies to `slack` (bot) destinations; `{}` is `{}`",
                            s.to,
                            dest.kind.name()
                        ),
                    ),
                    &join_key(sp, key),
                )
                .hint("an incoming webhook's channel is fixed when it is created"),
            );
        }
    }
    if is_bot && s.channel.is_none() && s.user_email.is_none() {
        diags.push(p.at(
            Diagnostic::error(
                "bad-send",
                format!(
                    "sending to Slack bot destination `{}` needs `channel` or `user_email`",
                    s.to
                ),
            ),
            sp,
        ));
    }
    let template = match (&s.template, &s.blocks) {
        (Some(_), Some(_)) => {
            diags.push(p.at_key(
                Diagnostic::error("bad-send", "give either `template` or `blocks`, not both"),
                &join_key(sp, "blocks"),
            ));
            return None;
        }
        (Some(t), None) => {
            if !templates.has(t) {
                diags.push(missing_template(p, &join_key(sp, "template"), t, templates));
                return None;
            }
            t.clone()
        }
        (None, blocks) => {
            if blocks.is_none() && s.text.is_none() {
                diags.push(p.at(
                    Diagnostic::error(
                        "bad-send",
                        "a send step needs `template`, or inline `blocks`/`text`",
                    ),
                    sp,
                ));
                return None;
            }
            let mut msg = serde_json::Map::new();
            if let Some(b) = blocks {
                msg.insert("blocks".into(), b.clone());
            }
            if let Some(t) = &s.text {
                msg.insert("text".into(), Value::String(t.clone()));
            }
            let name = format!("rule:{rule_id}:{sp}");
            let text = serde_json::to_string(&Value::Object(msg)).unwrap_or_default();
            let origin = TemplateOrigin {
                file: p.path.clone(),
                line_offset: p.spans.value(sp).line,
                inline: true,
            };
            if let Err(e) = templates.add(&name, &text, origin) {
                let at = if s.blocks.is_some() {
                    join_key(sp, "blocks")
                } else {
                    join_key(sp, "text")
                };
                diags.push(p.at(
                    Diagnostic::error("template", format!("inline template: {}", e.message)),
                    &at,
                ));
                return None;
            }
            name
        }
    };
    let mut small = |key: &str, v: &Option<String>| -> Option<String> {
        let v = v.as_ref()?;
        let name = format!("rule:{rule_id}:{sp}:{key}");
        match templates.add_plain(&name, v) {
            Ok(()) => Some(name),
            Err(e) => {
                diags.push(p.at(
                    Diagnostic::error("template", format!("`{key}`: {}", e.message)),
                    &join_key(sp, key),
                ));
                None
            }
        }
    };
    Some(SendStep {
        to: s.to.clone(),
        template,
        channel: small("channel", &s.channel),
        user_email: small("user_email", &s.user_email),
        thread_ts: small("thread_ts", &s.thread_ts),
        reply_broadcast: s.reply_broadcast,
        for_each: small("for_each", &s.for_each),
    })
}

fn load_test(
    p: &Parsed,
    t: &super::spec::TestSpec,
    path: &str,
    sources: &BTreeMap<String, SourceEntry>,
    diags: &mut Vec<Diagnostic>,
) -> Option<RuleTest> {
    let ep = join_key(path, "event");
    if !sources.contains_key(&t.event.source) {
        let names: Vec<&str> = sources.keys().map(String::as_str).collect();
        let hint = did_you_mean(&t.event.source, names.iter().copied())
            .map(|x| format!("did you mean `{x}`?"))
            .unwrap_or_else(|| format!("defined sources: {}", names.join(", ")));
        diags.push(
            p.at(
                Diagnostic::error(
                    "unknown-source",
                    format!("source `{}` does not exist", t.event.source),
                ),
                &join_key(&ep, "source"),
            )
            .hint(hint),
        );
        return None;
    }
    let body = match (&t.event.file, &t.event.body) {
        (Some(f), None) => {
            let fp = p.dir.join(f);
            // Test events sit beside the rules (`examples/` next to `rules/`, as shipped): inside
            // the rules directory's parent, never elsewhere on the machine, since `check`
            // prints what they render to.
            let root = std::fs::canonicalize(&p.dir)
                .ok()
                .and_then(|d| d.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| p.dir.clone());
            let root = root.as_path();
            if fp.exists() && !inside(root, &fp) {
                diags.push(
                    p.at(
                        Diagnostic::error(
                            "outside",
                            format!(
                                "event file {} leads outside {}; it is not read",
                                fp.display(),
                                root.display()
                            ),
                        ),
                        &join_key(&ep, "file"),
                    )
                    .hint("keep test events next to the rules (e.g. ../examples/events/)"),
                );
                return None;
            }
            match read_bounded(&fp, 4 * 1024 * 1024) {
                Ok(b) => b,
                Err(e) => {
                    diags.push(
                        p.at(
                            Diagnostic::error(
                                "missing-file",
                                format!("cannot read event file: {}", e.message),
                            ),
                            &join_key(&ep, "file"),
                        )
                        .hint("the path is relative to this rules file"),
                    );
                    return None;
                }
            }
        }
        (None, Some(b)) => serde_json::to_vec(b).unwrap_or_default(),
        _ => {
            diags.push(p.at(
                Diagnostic::error(
                    "bad-test",
                    "a test event needs exactly one of `file` or `body`",
                ),
                &ep,
            ));
            return None;
        }
    };
    let expect_pos = (0..t.expect.len())
        .map(|i| p.spans.value(&join_index(&join_key(path, "expect"), i)))
        .collect();
    Some(RuleTest {
        name: t.name.clone(),
        file: p.path.clone(),
        pos: p.spans.value(path),
        source: t.event.source.clone(),
        body,
        headers: t
            .event
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
        expect: t.expect.clone(),
        expect_pos,
    })
}

/// A rule that could send a One-Time Passcode anywhere but its owner's DM is an error.
///
/// The check evaluates each rule that covers `coder/notification` against a representative OTP
/// notification: if the rule's conditions let it through, every send step must be a Slack bot
/// DM whose `user_email` renders to the recipient. The engine enforces the same at run time.
fn check_secret_routing(rs: &Ruleset, parsed: &[Parsed], diags: &mut Vec<Diagnostic>) {
    let Ok(ev) = crate::sources::coder::decode_value("coder", sample_otp(), None) else {
        return;
    };
    // The same sample as an ordinary event: its render errors with their details (the sample's
    // code is not a secret), for rules that fail to render a passcode notification.
    let mut open = ev.clone();
    open.secret = false;
    let open_dispatches = crate::routing::route(rs, &open);
    for (i, d) in crate::routing::route(rs, &ev).into_iter().enumerate() {
        if let Err(crate::routing::DispatchError::Render(_)) = &d.message {
            let detail = open_dispatches
                .iter()
                .filter(|o| o.rule == d.rule && o.to == d.to)
                .find_map(|o| match &o.message {
                    Err(crate::routing::DispatchError::Render(e)) => Some(e.clone()),
                    _ => None,
                })
                .or_else(|| match open_dispatches.get(i).map(|o| &o.message) {
                    Some(Err(crate::routing::DispatchError::Render(e))) => Some(e.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| "rendering failed".into());
            if let Some((p, idx)) = rule_site(rs, parsed, &d.rule) {
                diags.push(
                    p.at(
                        Diagnostic::error(
                            "otp-render",
                            format!(
                                "rule `{}` fails to render a One-Time Passcode notification for `{}` (at run time it would be a dead letter): {detail}",
                                d.rule, d.to
                            ),
                        ),
                        &join_key(&join_index("rules", idx), "send"),
                    )
                    .hint("a passcode event has no `data` and few labels; guard optional fields with `{{#if}}` or `default`"),
                );
            }
            continue;
        }
        if let Err(crate::routing::DispatchError::Refused(reason)) = &d.message {
            // A destination standing in as a fallback is an operational substitution: judge the
            // rule by what it declares (the engine still refuses at run time while it falls back).
            if d.to != d.destination
                && crate::routing::secret_allowed(rs, &ev.data, &d.to, &d.target).is_ok()
            {
                continue;
            }
            let Some(rule) = rs.rules.iter().find(|r| r.id == d.rule) else {
                continue;
            };
            let Some(p) = parsed.iter().find(|p| p.path == rule.file) else {
                continue;
            };
            let idx = p
                .spec
                .rules
                .iter()
                .position(|r| r.id == d.rule)
                .unwrap_or(0);
            diags.push(
                p.at(
                    Diagnostic::error("otp-leak", format!("rule `{}` could send One-Time Passcode notifications to `{}`: {reason}", d.rule, d.to)),
                    &join_key(&join_index("rules", idx), "send"),
                )
                .hint("exclude them (`$.template.id != \"62f86a30-2330-4b61-a26d-311ff3b608cf\"`) or send only `user_email: \"{{user.email}}\"` via a `slack` destination"),
            );
        }
    }
}

/// The parsed file and index of rule `id`.
fn rule_site<'a>(rs: &Ruleset, parsed: &'a [Parsed], id: &str) -> Option<(&'a Parsed, usize)> {
    let rule = rs.rules.iter().find(|r| r.id == id)?;
    let p = parsed.iter().find(|p| p.path == rule.file)?;
    let idx = p.spec.rules.iter().position(|r| r.id == id).unwrap_or(0);
    Some((p, idx))
}

fn sample_otp() -> Value {
    serde_json::json!({
        "_version": "1.1",
        "msg_id": "00000000-0000-0000-0000-000000000000",
        "payload": {
            "_version": "1.1",
            "notification_name": "One-Time Passcode",
            "notification_template_id": crate::sources::coder::OTP_TEMPLATE_ID,
            "user_id": "00000000-0000-0000-0000-000000000001",
            "user_email": "owner@example.com",
            "user_name": "Owner",
            "user_username": "owner",
            "actions": [{"label": "Reset password", "url": "https://coder.example.com/reset-password/change?otp=x&email=owner%40example.com"}],
            "labels": {"one_time_passcode": "x"},
            "data": null,
            "targets": null
        },
        "title": "Reset your password for Coder",
        "title_markdown": "Reset your password for Coder",
        "body": "Use the link below to reset your password.",
        "body_markdown": "Use the link below to reset your password."
    })
}
