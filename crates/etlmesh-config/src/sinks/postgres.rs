//! The PostgreSQL sink (streams): rows into a table.

use serde::Deserialize;

use super::Place;
use crate::diag::Diagnostic;
use crate::spec::SinkSpec;
use crate::stream::PostgresSinkSpec;

/// `{ type: postgres, url, table, create, key }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPostgresSink {
    url: Option<String>,
    table: Option<String>,
    create: Option<bool>,
    key: Option<Vec<String>>,
}

/// `readings` or `iot.readings`: letters, digits and `_`, not starting with a digit.
fn valid_table(t: &str) -> bool {
    !t.is_empty()
        && t.split('.').count() <= 2
        && t.split('.').all(|p| {
            !p.is_empty()
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !p.starts_with(|c: char| c.is_ascii_digit())
        })
}

pub(crate) fn resolve(s: RawPostgresSink, at: &Place<'_>, out: &mut Vec<Diagnostic>) -> SinkSpec {
    let url = s.url.unwrap_or_else(|| {
        out.push(
            at.diag("url", "is required for a postgres sink")
                .with_help("add `url: postgres://user@127.0.0.1:5432/db`"),
        );
        String::new()
    });
    let table = s.table.unwrap_or_default();
    if !valid_table(&table) {
        out.push(
            at.diag("table", format!("`{table}` is not a table name"))
                .with_help("write `readings` or `iot.readings` (letters, digits, `_`)"),
        );
    }
    SinkSpec::Postgres(PostgresSinkSpec {
        url,
        table,
        create: s.create.unwrap_or(false),
        key: s.key.unwrap_or_default(),
    })
}
