//! What every part of loading shares: how a load is asked for ([`LoadOptions`]), a parsed
//! file with the positions of its keys ([`Parsed`]), bounded file reads inside the rules
//! directory, and secrets from values or files.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::diag::{did_you_mean, Diagnostic};
use super::env::Unset;
use super::secret::Secret;
use super::spec::RulesFile;
use super::yaml::{join_index, join_key, Limits, Pos, SpanMap};
use super::{DestinationConfig, DestinationKind};
use crate::render::Templates;

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
pub(super) struct Parsed {
    pub(super) path: PathBuf,
    pub(super) dir: PathBuf,
    pub(super) text: Arc<str>,
    pub(super) spans: SpanMap,
    pub(super) raw: Value,
    pub(super) unset: Vec<Unset>,
    pub(super) spec: RulesFile,
    /// `(VAR, value)` for every `${VAR}` expanded in this file ([`scrub`]).
    pub(super) expansions: Vec<(String, String)>,
}

impl Parsed {
    pub(super) fn at(&self, d: Diagnostic, path: &str) -> Diagnostic {
        d.at(&self.path, self.spans.value(path))
    }
    pub(super) fn at_key(&self, d: Diagnostic, path: &str) -> Diagnostic {
        d.at(&self.path, self.spans.key(path))
    }
    pub(super) fn unset_under(&self, prefix: &str) -> Vec<&Unset> {
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
    pub(super) fn raw_str(&self, path: &str) -> Option<&str> {
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

pub(super) enum Part<'a> {
    Key(&'a str),
    Index(usize),
}

pub(super) fn split_path(path: &str) -> Vec<Part<'_>> {
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

pub(super) fn duplicate(
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

/// Reads a text file with the size and encoding checks every input gets.
pub(super) fn read_text(path: &Path, max: usize) -> Result<String, Diagnostic> {
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
pub fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, Diagnostic> {
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
pub(super) fn inside(root: &Path, path: &Path) -> bool {
    match (std::fs::canonicalize(root), std::fs::canonicalize(path)) {
        (Ok(r), Ok(p)) => p.starts_with(r),
        _ => false,
    }
}

/// The diagnostic for a file that resolves outside the directory it must stay in.
pub(super) fn outside(path: &Path, root: &Path) -> Diagnostic {
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

/// Collects a secret from `value` (expanded), or `file`. Reports unset variables and literal
/// secrets. Returns `(secrets, unset variable names)`.
pub(super) fn secrets_of(
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

/// The path of the first string under `prefix` that referenced an unset variable.
pub(super) fn first_unset(p: &Parsed, prefix: &str) -> String {
    p.unset_under(prefix)
        .first()
        .map(|u| u.path.clone())
        .unwrap_or_else(|| prefix.to_string())
}

pub(super) fn missing_template(
    p: &Parsed,
    path: &str,
    name: &str,
    templates: &Templates,
) -> Diagnostic {
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

/// The only `port` destination, when there is exactly one.
pub(super) fn only_port_destination(dests: &BTreeMap<String, DestinationConfig>) -> Option<String> {
    only_destination(dests, |k| matches!(k, DestinationKind::Port { .. }))
}

/// The name of the one destination whose kind `is`, when there is exactly one.
pub(super) fn only_destination(
    dests: &BTreeMap<String, DestinationConfig>,
    is: impl Fn(&DestinationKind) -> bool,
) -> Option<String> {
    let mut found = dests.values().filter(|d| is(&d.kind));
    match (found.next(), found.next()) {
        (Some(d), None) => Some(d.name.clone()),
        _ => None,
    }
}

/// The files of `dir` with one of `exts`, sorted, hidden ones left out.
pub(super) fn list_files(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>, Diagnostic> {
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
pub(super) fn only_inside(
    root: &Path,
    files: Vec<PathBuf>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<PathBuf> {
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

/// Compiles a `window:` (a rule's or a destination's) at `at`, reporting what is wrong there.
pub(super) fn compile_window(
    p: &Parsed,
    at: &str,
    spec: Option<&crate::window::WindowSpec>,
    diags: &mut Vec<Diagnostic>,
) -> Option<crate::window::Window> {
    crate::window::Window::compile(spec?)
        .map_err(|e| {
            diags.push(p.at(
                Diagnostic::error("bad-window", e).hint(
                    "e.g. `window: {timezone: Europe/Berlin, active: [\"mon-fri 09:00-18:00\"]}`",
                ),
                at,
            ))
        })
        .ok()
}
