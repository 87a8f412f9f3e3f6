//! Diagnostics: what `check`, `serve` and reload say about a rules directory.
//!
//! Every diagnostic names a file and a `line:column` when it has one, says what is wrong in one
//! sentence and, where we can tell, how to fix it. Rendering uses `miette`'s graphical handler
//! (the offending line with a caret under it); `--format json` prints the same data as JSON.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::yaml::Pos;

/// How bad a diagnostic is. Errors make `check` exit 1 and a reload fail; warnings do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about the rules.
#[derive(Debug, Clone, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// A stable short name of the class of problem, e.g. `unknown-key`, `bad-jsonpath`.
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(skip)]
    pub pos: Option<Pos>,
}

impl Diagnostic {
    /// An error with no location yet.
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            file: None,
            line: None,
            column: None,
            hint: None,
            pos: None,
        }
    }
    /// A warning with no location yet.
    pub fn warning(code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, message)
        }
    }
    /// Places the diagnostic at `pos` in `file`.
    pub fn at(mut self, file: &Path, pos: Pos) -> Self {
        self.file = Some(file.to_path_buf());
        if pos.line > 0 {
            self.line = Some(pos.line);
            self.column = Some(pos.column);
            self.pos = Some(pos);
        }
        self
    }
    /// Places the diagnostic at 1-based `line:column` of `file`, whose text is `text` (what
    /// the caret is drawn under); for positions a parser reports by line, such as a template's.
    pub fn at_line(self, file: &Path, text: &str, line: usize, column: usize) -> Self {
        self.at_line_in(file, &LineStarts::new(text), line, column)
    }
    /// [`Diagnostic::at_line`] with the file's line starts worked out once, for many
    /// diagnostics in one file.
    pub fn at_line_in(self, file: &Path, starts: &LineStarts, line: usize, column: usize) -> Self {
        self.at(
            file,
            Pos {
                line,
                column,
                offset: starts.offset(line, column),
                len: 1,
            },
        )
    }
    /// Names the file without a position.
    pub fn in_file(mut self, file: &Path) -> Self {
        self.file = Some(file.to_path_buf());
        self
    }
    /// Adds a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    /// True for errors.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
    /// `file:line:column`, or what part of it is known.
    pub fn location(&self) -> String {
        match (&self.file, self.line, self.column) {
            (Some(f), Some(l), Some(c)) => format!("{}:{l}:{c}", f.display()),
            (Some(f), _, _) => f.display().to_string(),
            _ => String::new(),
        }
    }
    /// One line: `file:line:column: error: message (hint: ...)`, for logs and `/status`.
    pub fn one_line(&self) -> String {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let loc = self.location();
        let mut s = if loc.is_empty() {
            format!("{sev}: {}", self.message)
        } else {
            format!("{loc}: {sev}: {}", self.message)
        };
        if let Some(h) = &self.hint {
            s.push_str(&format!(" (hint: {h})"));
        }
        s
    }
}

/// Renders a diagnostic for a terminal: the `file:line:column` line, the source line with a
/// caret, and the hint. `source` is the file's text when available.
pub fn render(d: &Diagnostic, source: Option<&Arc<str>>, color: bool) -> String {
    use miette::{
        GraphicalReportHandler, GraphicalTheme, LabeledSpan, MietteDiagnostic, NamedSource,
    };
    let sev = match d.severity {
        Severity::Error => miette::Severity::Error,
        Severity::Warning => miette::Severity::Warning,
    };
    let mut md = MietteDiagnostic::new(d.message.clone()).with_severity(sev);
    if let Some(h) = &d.hint {
        md = md.with_help(h.clone());
    }
    let header = format!("{}\n", d.one_line_header());
    let (Some(file), Some(pos), Some(src)) = (&d.file, d.pos, source) else {
        let mut s = header;
        if let Some(h) = &d.hint {
            s.push_str(&format!("  help: {h}\n"));
        }
        return s;
    };
    let mut offset = pos.offset.min(src.len());
    // A position inside a multi-byte character (possible for offsets computed within a quoted
    // scalar) moves back to the character's start.
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    // A snippet of a huge line (minified or garbage input) helps nobody.
    let line_start = src[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = src[offset..]
        .find('\n')
        .map(|i| offset + i)
        .unwrap_or(src.len());
    if line_end - line_start > 400 {
        let mut s = header;
        if let Some(h) = &d.hint {
            s.push_str(&format!("  help: {h}\n"));
        }
        return s;
    }
    // The labelled span: at least one character, inside the text, on character boundaries.
    let mut start = offset;
    if start == src.len() && start > 0 {
        start -= 1;
        while !src.is_char_boundary(start) {
            start -= 1;
        }
    }
    let mut end = (start + pos.len.max(1)).min(src.len());
    while !src.is_char_boundary(end) {
        end += 1;
    }
    md = md.with_label(LabeledSpan::at(start..end, "here"));
    let report = miette::Report::new(md).with_source_code(
        NamedSource::new(file.display().to_string(), src.to_string()).with_language("yaml"),
    );
    let theme = if color {
        GraphicalTheme::unicode()
    } else {
        GraphicalTheme::unicode_nocolor()
    };
    let mut out = String::new();
    let handler = GraphicalReportHandler::new_themed(theme).with_context_lines(1);
    if handler.render_report(&mut out, report.as_ref()).is_err() {
        return header;
    }
    format!("{header}{out}")
}

impl Diagnostic {
    fn one_line_header(&self) -> String {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let loc = self.location();
        if loc.is_empty() {
            format!("{sev}[{}]: {}", self.code, self.message)
        } else {
            format!("{loc}: {sev}[{}]: {}", self.code, self.message)
        }
    }
}

/// Where each line of a text starts (byte offsets), so that a `line:column` becomes an offset
/// without scanning the text again.
#[derive(Debug, Clone, Default)]
pub struct LineStarts {
    starts: Vec<usize>,
    len: usize,
}

impl LineStarts {
    pub fn new(text: &str) -> LineStarts {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineStarts {
            starts,
            len: text.len(),
        }
    }

    /// The byte offset of 1-based `line:column` (columns counted as bytes), within the text.
    pub fn offset(&self, line: usize, column: usize) -> usize {
        let start = self
            .starts
            .get(line.saturating_sub(1))
            .copied()
            .unwrap_or(self.len);
        (start + column.saturating_sub(1)).min(self.len)
    }
}

/// The closest candidate to `word`, for "did you mean" hints.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        let score = strsim::jaro_winkler(word, c);
        if score > 0.7 && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, c));
        }
    }
    best.map(|(_, c)| c.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_never_splits_a_character() {
        let src: Arc<str> = Arc::from("rules:\n  - id: é\n    where: ['$.x matches \"([é\"']\n");
        for offset in 0..=src.len() + 2 {
            for len in [0, 1, 2, 3, 100] {
                let d = Diagnostic::error("t", "m").at(
                    Path::new("f.yaml"),
                    Pos {
                        line: 2,
                        column: 1,
                        offset,
                        len,
                    },
                );
                let out = render(&d, Some(&src), false);
                assert!(out.contains("f.yaml:2:1"));
            }
        }
    }
}
