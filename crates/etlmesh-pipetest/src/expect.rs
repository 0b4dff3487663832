//! What came out against what the test expects: the rows (each compared on the columns
//! it names), their count, SQL conditions on every row, and the dead letters. Each
//! difference is one line of the report.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use etlmesh_codec::encode::{EncodeOptions, encode_to_vec};
use etlmesh_codec::{DecodedBatch, Provenance, Reject};
use etlmesh_config::Format;
use etlmesh_engine::Engine;
use serde_json::{Map, Value};

use crate::TestError;
use crate::execute::Outcome;
use crate::spec::{Expect, ExpectedLetter};

type Row = Map<String, Value>;

/// Rows shown of those a condition failed.
const SHOWN: usize = 3;

/// The differences between `out` and `expect`; none when the test passed.
pub async fn check(
    expect: &Expect,
    out: &Outcome,
    engine: &Engine,
) -> Result<Vec<String>, TestError> {
    let rows = as_json(&out.rows, &out.schema)?;
    let mut diff = Vec::new();
    if let Some(want) = &expect.rows {
        let columns: Vec<&str> = out
            .schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        let mut unknown: Vec<&str> = want
            .iter()
            .flat_map(|r| r.keys())
            .map(String::as_str)
            .filter(|k| !columns.contains(k))
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        for k in unknown {
            diff.push(format!(
                "column `{k}` is not in the output (its columns: {})",
                columns.join(", ")
            ));
        }
        if expect.ordered {
            ordered_rows(want, &rows, &mut diff);
        } else {
            any_order_rows(want, &rows, &mut diff);
        }
    }
    if let Some(n) = expect.row_count
        && n != rows.len()
    {
        diff.push(format!("{n} rows expected, {} came out", rows.len()));
    }
    for c in &expect.conditions {
        condition(c, out, engine, &mut diff).await?;
    }
    if let Some(want) = &expect.dead_letters {
        letters(want, &out.letters, &mut diff);
    }
    Ok(diff)
}

/// The rows as JSON objects, as an NDJSON sink or answer writes them.
fn as_json(batches: &[RecordBatch], schema: &SchemaRef) -> Result<Vec<Row>, TestError> {
    let bytes = encode_to_vec(batches, schema, &EncodeOptions::new(Format::Ndjson))
        .map_err(|e| TestError::Pipeline(format!("cannot write the rows as JSON: {e}")))?;
    let text = String::from_utf8_lossy(&bytes);
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Row>(l).ok())
        .collect())
}

/// Whether `got` has every value `want` names; numbers within a relative 1e-9.
fn matches(want: &Row, got: &Row) -> bool {
    want.iter()
        .all(|(k, v)| got.get(k).is_some_and(|g| same(v, g)))
}

fn same(want: &Value, got: &Value) -> bool {
    let number = |v: &Value| match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match (want, got) {
        (Value::Number(_), _) | (_, Value::Number(_)) => match (number(want), number(got)) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0),
            _ => false,
        },
        _ => want == got,
    }
}

fn show(r: &Row) -> String {
    Value::Object(r.clone()).to_string()
}

fn any_order_rows(want: &[Row], got: &[Row], diff: &mut Vec<String>) {
    let mut taken = vec![false; got.len()];
    for w in want {
        match (0..got.len()).find(|&i| !taken[i] && matches(w, &got[i])) {
            Some(i) => taken[i] = true,
            None => diff.push(format!("- missing row      {}", show(w))),
        }
    }
    for (g, t) in got.iter().zip(&taken) {
        if !t {
            diff.push(format!("+ unexpected row   {}", show(g)));
        }
    }
}

fn ordered_rows(want: &[Row], got: &[Row], diff: &mut Vec<String>) {
    for (i, w) in want.iter().enumerate() {
        match got.get(i) {
            Some(g) if matches(w, g) => {}
            Some(g) => diff.push(format!(
                "row {}: expected {}, got {}",
                i + 1,
                show(w),
                show(g)
            )),
            None => diff.push(format!("- missing row {}   {}", i + 1, show(w))),
        }
    }
    for (i, g) in got.iter().enumerate().skip(want.len()) {
        diff.push(format!("+ unexpected row {}   {}", i + 1, show(g)));
    }
}

/// Runs `WHERE NOT (c)` over the rows: any row it keeps fails the condition.
async fn condition(
    c: &str,
    out: &Outcome,
    engine: &Engine,
    diff: &mut Vec<String>,
) -> Result<(), TestError> {
    let sql = format!("SELECT * FROM input WHERE NOT ({c}) OR ({c}) IS NULL");
    let t = match engine.compile("condition", &sql, out.schema.clone()).await {
        Ok(t) => t,
        Err(e) => {
            diff.push(format!("condition `{c}` does not plan: {e}"));
            return Ok(());
        }
    };
    let (mut failed, mut errors) = (Vec::new(), 0usize);
    let source: Arc<str> = Arc::from("output");
    let mut first_row = 1u64;
    for b in &out.rows {
        let input = DecodedBatch {
            batch: b.clone(),
            provenance: Provenance::Rows {
                source: source.clone(),
                first_row,
            },
        };
        first_row += b.num_rows() as u64;
        let r = t
            .apply(&input)
            .await
            .map_err(|e| TestError::Pipeline(format!("condition `{c}`: {e}")))?;
        errors += r.rejects.len();
        failed.extend(r.batches);
    }
    let failed = as_json(&failed, t.output_schema())?;
    if !failed.is_empty() || errors > 0 {
        let shown: Vec<String> = failed.iter().take(SHOWN).map(show).collect();
        diff.push(format!(
            "condition `{c}` is false for {} of {} rows{}: {}",
            failed.len() + errors,
            first_row - 1,
            if errors > 0 {
                format!(" ({errors} could not be evaluated)")
            } else {
                String::new()
            },
            shown.join(" ")
        ));
    }
    Ok(())
}

/// Whether a dead letter is the one expected.
fn letter_matches(want: &ExpectedLetter, got: &Reject, message: Option<usize>) -> bool {
    want.line.is_none_or(|l| got.line.or(got.row) == Some(l))
        && want.message.is_none_or(|m| message == Some(m))
        && want
            .stage
            .as_deref()
            .is_none_or(|s| s == got.stage.as_str())
        && want
            .field
            .as_deref()
            .is_none_or(|f| got.field.as_deref() == Some(f))
        && want
            .reason
            .as_deref()
            .is_none_or(|r| got.reason.contains(r))
}

fn describe_expected(w: &ExpectedLetter) -> String {
    let mut parts = Vec::new();
    if let Some(m) = w.message {
        parts.push(format!("message {m}"));
    }
    if let Some(l) = w.line {
        parts.push(format!("line {l}"));
    }
    if let Some(s) = &w.stage {
        parts.push(format!("stage {s}"));
    }
    if let Some(f) = &w.field {
        parts.push(format!("field {f}"));
    }
    if let Some(r) = &w.reason {
        parts.push(format!("reason ~ {r:?}"));
    }
    if parts.is_empty() {
        "any".into()
    } else {
        parts.join(", ")
    }
}

/// A dead letter as the report says it.
pub fn describe_letter(r: &Reject, message: Option<usize>) -> String {
    let mut at = String::new();
    if let Some(m) = message {
        at.push_str(&format!("message {m} ({}), ", r.source));
    }
    if let Some(l) = r.line {
        at.push_str(&format!("line {l}, "));
    } else if let Some(n) = r.row {
        at.push_str(&format!("record {n}, "));
    }
    let field = r
        .field
        .as_deref()
        .map(|f| format!(" `{f}`"))
        .unwrap_or_default();
    format!("{at}{}{field}: {}", r.stage.as_str(), r.reason)
}

fn letters(want: &[ExpectedLetter], got: &[(Reject, Option<usize>)], diff: &mut Vec<String>) {
    let mut taken = vec![false; got.len()];
    for w in want {
        match (0..got.len()).find(|&i| !taken[i] && letter_matches(w, &got[i].0, got[i].1)) {
            Some(i) => taken[i] = true,
            None => diff.push(format!(
                "- missing dead letter      {}",
                describe_expected(w)
            )),
        }
    }
    for ((r, m), t) in got.iter().zip(&taken) {
        if !t {
            diff.push(format!(
                "+ unexpected dead letter   {}",
                describe_letter(r, *m)
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: Value) -> Row {
        match v {
            Value::Object(m) => m,
            _ => Row::new(),
        }
    }

    #[test]
    fn rows_match_on_the_columns_they_name_numbers_within_a_tolerance() {
        let got = row(serde_json::json!({"d": "a", "t": 68.00000000001, "n": 3}));
        assert!(matches(&row(serde_json::json!({"t": 68.0})), &got));
        assert!(matches(&row(serde_json::json!({"d": "a", "n": "3"})), &got));
        assert!(!matches(&row(serde_json::json!({"t": 68.1})), &got));
        assert!(!matches(&row(serde_json::json!({"x": 1})), &got));
    }

    #[test]
    fn a_missing_row_and_an_extra_one_are_both_said() {
        let got = vec![
            row(serde_json::json!({"d": "a"})),
            row(serde_json::json!({"d": "b"})),
        ];
        let want = vec![
            row(serde_json::json!({"d": "b"})),
            row(serde_json::json!({"d": "c"})),
        ];
        let mut diff = Vec::new();
        any_order_rows(&want, &got, &mut diff);
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert!(diff[0].starts_with("- missing row") && diff[0].contains("\"c\""));
        assert!(diff[1].starts_with("+ unexpected row") && diff[1].contains("\"a\""));
        let mut diff = Vec::new();
        ordered_rows(&want, &got, &mut diff);
        assert_eq!(diff.len(), 2, "{diff:?}");
    }
}
