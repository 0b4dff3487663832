//! Diagnostics: errors that point at a file, a line and a field, and say what to do.

use std::fmt;
use std::path::PathBuf;

/// One mistake in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file the mistake is in.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// The field, as a dotted path (`pipelines.clean.sinks[0].path`); empty for the whole file.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub help: Option<String>,
    /// Extra lines shown under the message (a SQL excerpt with a caret, for example).
    pub snippet: Option<String>,
}

impl Diagnostic {
    /// A diagnostic with no position yet.
    pub fn new(
        file: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            line: None,
            column: None,
            field: field.into(),
            message: message.into(),
            help: None,
            snippet: None,
        }
    }

    /// Sets the help line.
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Sets the position.
    pub fn at(mut self, line: usize, column: usize) -> Self {
        self.line = Some(line);
        self.column = Some(column);
        self
    }

    /// Sets the snippet.
    pub fn with_snippet(mut self, snippet: impl Into<String>) -> Self {
        self.snippet = Some(snippet.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": ")?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)?;
        if let Some(snippet) = &self.snippet {
            write!(f, "\n{snippet}")?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Every mistake found in a pipeline file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The mistakes, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl ConfigError {
    /// An error with one diagnostic.
    pub fn one(d: Diagnostic) -> Self {
        Self {
            diagnostics: vec![d],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        if self.diagnostics.len() > 1 {
            write!(f, "\n{} errors", self.diagnostics.len())?;
        }
        Ok(())
    }
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = levenshtein(word, c);
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.and_then(|(d, c)| (d <= (word.len().max(2) / 2).max(1) + 1).then_some(c))
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let keys = ["source", "schema", "transform", "sinks"];
        assert_eq!(suggest("tranform", keys), Some("transform"));
        assert_eq!(suggest("sink", keys), Some("sinks"));
        assert_eq!(suggest("zzzzzzzz", keys), None);
    }

    #[test]
    fn display_names_file_line_and_field() {
        let d = Diagnostic::new("etl.yaml", "pipelines.a.sinks[0].path", "is required")
            .at(7, 9)
            .with_help("add `path: out/dir`");
        assert_eq!(
            d.to_string(),
            "etl.yaml:7:9: pipelines.a.sinks[0].path: is required\n  help: add `path: out/dir`"
        );
    }
}
