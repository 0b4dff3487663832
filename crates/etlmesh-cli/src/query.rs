//! `etlmesh query "SQL"`: read-only SQL over the pipelines' datasets, through the
//! gateway's `POST /v1/query`; printed as a table, or written in a format as it comes.

use std::io::Write;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use etlmesh_config::Format;
use http::Method;

use crate::{CliError, Peer};

/// Arguments of `query`.
#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// The SQL (a SELECT over the datasets; `etlmesh query --datasets` lists them).
    #[arg(required_unless_present = "datasets")]
    pub sql: Option<String>,
    /// List the datasets instead.
    #[arg(long)]
    pub datasets: bool,
    /// The gateway's address.
    #[arg(long, env = "ETLMESH_GATEWAY", default_value = "http://127.0.0.1:8080")]
    pub gateway: String,
    /// The gateway's API token, when it asks for one.
    #[arg(long, env = "ETLMESH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// For an `https://` gateway: the PEM certificate it serves, or its CA.
    #[arg(long, env = "ETLMESH_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// `table` (aligned text), or a format written as it comes: csv, json, ndjson, parquet, arrow.
    #[arg(long, default_value = "table")]
    pub format: String,
    /// Rows at most.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Time at most (`30s`).
    #[arg(long, value_parser = crate::mesh::duration)]
    pub timeout: Option<Duration>,
}

pub(crate) fn query(args: &QueryArgs) -> Result<(), CliError> {
    let wait = args.timeout.unwrap_or(Duration::from_secs(300)) + Duration::from_secs(5);
    let client = crate::gateway_client(
        wait,
        &args.gateway,
        args.token.clone(),
        args.ca_cert.as_deref(),
    )?;
    let base = args.gateway.trim_end_matches('/').to_string();
    let rt = crate::runtime(1)?;
    if args.datasets {
        let (status, _, body) = rt
            .block_on(client.send_accepting(
                Method::GET,
                &format!("{base}/v1/datasets"),
                Default::default(),
                None,
            ))
            .map_err(|e| CliError::unreachable(Peer::Gateway, &base, e))?;
        return answer_or_error(status, &body, |b| {
            let list: Vec<serde_json::Value> = serde_json::from_slice(b).unwrap_or_default();
            for d in list {
                let place = d["path"].as_str().or(d["table"].as_str()).unwrap_or("");
                println!(
                    "{:<24} {:<9} {:<40} pipeline {}",
                    d["name"].as_str().unwrap_or(""),
                    d["kind"].as_str().unwrap_or(""),
                    place,
                    d["pipeline"].as_str().unwrap_or("")
                );
            }
            Ok(())
        });
    }
    let table = args.format == "table";
    let format = if table {
        Format::Arrow
    } else {
        Format::from_name(&args.format).ok_or_else(|| {
            CliError::argument(
                "--format",
                format!(
                    "`{}` is not a format\n  help: table, csv, json, ndjson, parquet or arrow",
                    args.format
                ),
            )
        })?
    };
    let mut request = serde_json::json!({ "sql": args.sql.clone().unwrap_or_default() });
    if let Some(n) = args.limit {
        request["limit"] = n.into();
    }
    if let Some(t) = args.timeout {
        request["timeout_ms"] = (t.as_millis() as u64).into();
    }
    let (status, headers, body) = rt
        .block_on(client.send_accepting(
            Method::POST,
            &format!("{base}/v1/query"),
            request.to_string().into(),
            Some(format.content_type()),
        ))
        .map_err(|e| CliError::unreachable(Peer::Gateway, &base, e))?;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_string()
    };
    answer_or_error(status, &body, |b| {
        if table {
            print_table(b)?;
        } else {
            std::io::stdout()
                .write_all(b)
                .map_err(CliError::io("write the answer"))?;
        }
        let truncated = if header("etlmesh-truncated") == "true" {
            " (cut at the row limit: more rows match; narrow the query or pass --limit)"
        } else {
            ""
        };
        let rows = header("etlmesh-rows");
        let noun = if rows == "1" { "row" } else { "rows" };
        eprintln!(
            "{rows} {noun} in {} ms{truncated}",
            header("etlmesh-elapsed-ms")
        );
        Ok(())
    })
}

fn answer_or_error(
    status: http::StatusCode,
    body: &[u8],
    ok: impl FnOnce(&[u8]) -> Result<(), CliError>,
) -> Result<(), CliError> {
    if status.is_success() {
        return ok(body);
    }
    Err(CliError::refused(Peer::Gateway, status, body))
}

/// An Arrow IPC stream as an aligned text table.
fn print_table(ipc: &[u8]) -> Result<(), CliError> {
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
        .map_err(|e| CliError::unreadable(Peer::Gateway, e))?;
    let schema = reader.schema();
    let batches: Vec<RecordBatch> = reader
        .collect::<Result<_, _>>()
        .map_err(|e| CliError::unreadable(Peer::Gateway, e))?;
    print!("{}", render(&schema, &batches));
    Ok(())
}

fn render(schema: &arrow::datatypes::Schema, batches: &[RecordBatch]) -> String {
    let mut rows: Vec<Vec<String>> =
        vec![schema.fields().iter().map(|f| f.name().clone()).collect()];
    let options = FormatOptions::default().with_null("NULL");
    for b in batches {
        let formatters: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).ok())
            .collect();
        for r in 0..b.num_rows() {
            rows.push(
                formatters
                    .iter()
                    .map(|f| {
                        f.as_ref()
                            .map_or_else(|| "?".into(), |f| f.value(r).to_string())
                    })
                    .collect(),
            );
        }
    }
    let widths: Vec<usize> = (0..schema.fields().len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&rule.join("  "));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    #[test]
    fn renders_an_aligned_table() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, true),
            Field::new("avg", DataType::Float64, true),
        ]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![Some("d-1"), None])),
                Arc::new(Float64Array::from(vec![1.5, 22.25])),
            ],
        )
        .expect("batch");
        assert_eq!(
            render(&schema, &[b]),
            "device_id  avg\n---------  -----\nd-1        1.5\nNULL       22.25\n"
        );
    }
}
