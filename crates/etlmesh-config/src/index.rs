//! A map from field paths (`pipelines.clean.sinks[0].path`) to their line and column,
//! built from the YAML event stream, so that checks made after parsing can still
//! point at the line of a mistake.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Where a field is in the file: its key and its value (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line of the key (or of the item, for sequence items).
    pub line: usize,
    /// Column of the key.
    pub column: usize,
    /// Line where the value starts.
    pub value_line: usize,
    /// Column where the value starts.
    pub value_column: usize,
}

/// Field path → position.
#[derive(Debug, Default, Clone)]
pub struct PositionIndex {
    positions: HashMap<String, Position>,
    duplicates: Vec<(String, Position)>,
}

impl PositionIndex {
    /// Builds the index. Returns an empty index when the text is not valid YAML
    /// (the parser's own error is reported elsewhere).
    pub fn build(text: &str) -> Self {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut builder, false).is_err() {
            return Self::default();
        }
        Self {
            positions: builder.positions,
            duplicates: builder.duplicates,
        }
    }

    /// The position of `path`, or of its nearest ancestor that is in the file.
    pub fn locate(&self, path: &str) -> Option<Position> {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// The position of exactly this path, if the file has it.
    pub fn exact(&self, path: &str) -> Option<Position> {
        self.positions.get(path).copied()
    }

    /// The deepest path whose key or value starts at `line`, `column`.
    pub fn path_at(&self, line: usize, column: usize) -> Option<&str> {
        self.positions
            .iter()
            .filter(|(_, p)| {
                (p.line == line && p.column == column)
                    || (p.value_line == line && p.value_column == column)
            })
            .map(|(k, _)| k.as_str())
            .max_by_key(|k| k.len())
    }

    /// Keys that appear twice in the same mapping.
    pub fn duplicates(&self) -> &[(String, Position)] {
        &self.duplicates
    }
}

enum Frame {
    Map {
        path: String,
        key: Option<(String, Marker)>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    positions: HashMap<String, Position>,
    duplicates: Vec<(String, Position)>,
}

impl Builder {
    /// The path of the value that starts now, consuming a pending key; `None` when the
    /// event is itself a key.
    fn value_path(&mut self, mark: Marker) -> Option<(String, Marker)> {
        match self.stack.last_mut() {
            None => Some((String::new(), mark)),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some((p, mark))
            }
            Some(Frame::Map { path, key }) => {
                let (k, key_mark) = key.take()?;
                let p = if path.is_empty() {
                    k
                } else {
                    format!("{path}.{k}")
                };
                Some((p, key_mark))
            }
        }
    }

    fn record(&mut self, path: &str, key_mark: Marker, value_mark: Marker) {
        let pos = Position {
            line: key_mark.line(),
            column: key_mark.col() + 1,
            value_line: value_mark.line(),
            value_column: value_mark.col() + 1,
        };
        if self.positions.insert(path.to_string(), pos).is_some() {
            self.duplicates.push((path.to_string(), pos));
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => {
                if let Some(Frame::Map { key, .. }) = self.stack.last_mut()
                    && key.is_none()
                {
                    *key = Some((value, mark));
                    return;
                }
                if let Some((path, key_mark)) = self.value_path(mark) {
                    self.record(&path, key_mark, mark);
                }
            }
            Event::Alias(_) => {
                if let Some((path, key_mark)) = self.value_path(mark) {
                    self.record(&path, key_mark, mark);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let is_map = matches!(ev, Event::MappingStart(..));
                let Some((path, key_mark)) = self.value_path(mark) else {
                    // A complex key: not used in pipeline files; give it a throwaway frame.
                    self.stack.push(Frame::Seq {
                        path: "?".into(),
                        next: 0,
                    });
                    return;
                };
                if !path.is_empty() {
                    self.record(&path, key_mark, mark);
                }
                self.stack.push(if is_map {
                    Frame::Map { path, key: None }
                } else {
                    Frame::Seq { path, next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "pipelines:\n  clean:\n    transform: |\n      SELECT 1\n    sinks:\n      - type: parquet\n        path: out\n";

    #[test]
    fn finds_nested_keys_and_items() {
        let idx = PositionIndex::build(TEXT);
        assert_eq!(idx.locate("pipelines.clean").map(|p| p.line), Some(2));
        assert_eq!(
            idx.locate("pipelines.clean.transform").map(|p| p.line),
            Some(3)
        );
        let path = idx
            .locate("pipelines.clean.sinks[0].path")
            .map(|p| (p.line, p.column));
        assert_eq!(path, Some((7, 9)));
        assert_eq!(
            idx.locate("pipelines.clean.sinks[0].type").map(|p| p.line),
            Some(6)
        );
    }

    #[test]
    fn missing_fields_fall_back_to_the_parent() {
        let idx = PositionIndex::build(TEXT);
        assert_eq!(
            idx.locate("pipelines.clean.sinks[0].missing")
                .map(|p| p.line),
            Some(6)
        );
        assert_eq!(
            idx.locate("pipelines.clean.schema").map(|p| p.line),
            Some(2)
        );
    }

    #[test]
    fn reports_duplicate_keys() {
        let idx = PositionIndex::build("a: 1\nb: 2\na: 3\n");
        assert_eq!(idx.duplicates().len(), 1);
        assert_eq!(idx.duplicates()[0].0, "a");
        assert_eq!(idx.duplicates()[0].1.line, 3);
    }
}
