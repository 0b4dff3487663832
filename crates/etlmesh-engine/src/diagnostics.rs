//! Turning DataFusion's planning errors into messages that point into the SQL.

use arrow::datatypes::SchemaRef;
use datafusion::error::DataFusionError;

use crate::EngineError;
use crate::transform::message;

/// A place in the SQL text (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlPosition {
    /// Line in the SQL.
    pub line: usize,
    /// Column in that line.
    pub column: usize,
    /// Characters to underline.
    pub len: usize,
}

pub(crate) fn plan_error(
    pipeline: &str,
    sql: &str,
    input: &SchemaRef,
    e: DataFusionError,
) -> EngineError {
    let msg = message(&e);
    let mut position = e
        .diagnostic()
        .and_then(|d| d.span)
        .filter(|s| s.start.line > 0)
        .map(|s| SqlPosition {
            line: s.start.line as usize,
            column: s.start.column as usize,
            len: if s.end.line == s.start.line {
                (s.end.column.saturating_sub(s.start.column)) as usize
            } else {
                1
            }
            .max(1),
        });
    let columns: Vec<&str> = input.fields().iter().map(|f| f.name().as_str()).collect();
    let mut help = None;
    if let Some(name) = word_after(&msg, "No field named ") {
        let name = name.trim_matches(|c| c == '"' || c == '\'' || c == '`');
        let bare = name.rsplit('.').next().unwrap_or(name);
        if position.is_none() {
            position = find_word(sql, bare);
        }
        help = Some(format!(
            "the table `input` has the columns: {}",
            columns.join(", ")
        ));
    } else if msg.contains("table") && msg.contains("not found") {
        help = Some("the transform reads from the table `input`".into());
    } else if msg.contains("Unsupported SQL statement")
        || msg.contains("not supported") && msg.contains("DDL")
    {
        help = Some("a transform is one SELECT query over `input`".into());
    } else if position.is_none()
        && let Some((l, c)) = parse_line_col(&msg)
    {
        // Parser errors: "Expected: ..., found: X at Line: 2, Column: 5"
        position = Some(SqlPosition {
            line: l,
            column: c,
            len: 1,
        });
    }
    EngineError::Plan {
        pipeline: pipeline.to_string(),
        message: msg,
        position,
        help,
    }
}

/// The token after `marker` in `s`.
fn word_after<'a>(s: &'a str, marker: &str) -> Option<&'a str> {
    let rest = &s[s.find(marker)? + marker.len()..];
    rest.split([' ', ','])
        .next()
        .map(|w| w.trim_end_matches('.'))
}

fn parse_line_col(s: &str) -> Option<(usize, usize)> {
    let l = s.find("Line: ")?;
    let c = s.find("Column: ")?;
    let num = |t: &str| {
        t.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    };
    Some((num(&s[l + 6..])?, num(&s[c + 8..])?))
}

/// The first whole-word occurrence of `word` in `sql`, case-insensitively.
fn find_word(sql: &str, word: &str) -> Option<SqlPosition> {
    let lower = sql.to_lowercase();
    let w = word.to_lowercase();
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut from = 0;
    while let Some(i) = lower[from..].find(&w) {
        let at = from + i;
        let before = lower[..at].chars().next_back();
        let after = lower[at + w.len()..].chars().next();
        if !before.is_some_and(is_ident) && !after.is_some_and(is_ident) {
            let line = lower[..at].matches('\n').count() + 1;
            let col = at - lower[..at].rfind('\n').map_or(0, |n| n + 1) + 1;
            return Some(SqlPosition {
                line,
                column: col,
                len: word.chars().count(),
            });
        }
        from = at + w.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_whole_words() {
        let sql = "SELECT temp,\n  temperatur FROM input";
        assert_eq!(
            find_word(sql, "temperatur"),
            Some(SqlPosition {
                line: 2,
                column: 3,
                len: 10
            })
        );
        assert_eq!(
            find_word(sql, "temp"),
            Some(SqlPosition {
                line: 1,
                column: 8,
                len: 4
            })
        );
        assert_eq!(find_word(sql, "emp"), None);
    }
}
