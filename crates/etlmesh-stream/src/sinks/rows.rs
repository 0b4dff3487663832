//! Rows as messages, for the sinks that publish one message per row (JetStream,
//! Kafka): the address made from a template (`results.{device_id}`, `out-{site}`),
//! the key made of some columns, and the row as one JSON object.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use bytes::Bytes;

enum Part {
    Text(String),
    Column(usize),
}

/// One row, ready to publish.
pub(crate) struct RowMessage {
    /// The subject or topic.
    pub address: String,
    /// The key columns' values, joined by U+001F; `None` without key columns.
    pub key: Option<String>,
    /// The row as a JSON object.
    pub payload: Bytes,
}

/// How rows of one schema become messages.
pub(crate) struct RowMessages {
    address: Vec<Part>,
    key: Vec<usize>,
}

impl RowMessages {
    /// Checks the template's columns and the key columns against the schema; `sink`
    /// names the sink in the error (`nats:results.{device_id}`).
    pub fn new(
        template: &str,
        key: &[usize],
        schema: &SchemaRef,
        sink: &str,
    ) -> Result<Self, String> {
        let mut address = Vec::new();
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            let Some(len) = rest[start..].find('}') else {
                break;
            };
            if start > 0 {
                address.push(Part::Text(rest[..start].to_string()));
            }
            let col = &rest[start + 1..start + len];
            let i = schema.index_of(col).map_err(|_| {
                format!("sink {sink}: `{{{col}}}` is not a column the SQL produces")
            })?;
            address.push(Part::Column(i));
            rest = &rest[start + len + 1..];
        }
        if !rest.is_empty() {
            address.push(Part::Text(rest.to_string()));
        }
        Ok(Self {
            address,
            key: key.to_vec(),
        })
    }

    /// The indexes of `columns` in the schema, for a key; `sink` names the sink.
    pub fn key_columns(
        columns: &[String],
        schema: &SchemaRef,
        sink: &str,
    ) -> Result<Vec<usize>, String> {
        columns
            .iter()
            .map(|c| {
                schema.index_of(c).map_err(|_| {
                    format!("sink {sink}: key column `{c}` is not a column the SQL produces")
                })
            })
            .collect()
    }

    /// The messages of the rows, in order.
    pub fn messages(&self, batches: &[RecordBatch]) -> Result<Vec<RowMessage>, String> {
        let opts = FormatOptions::default();
        let mut out = Vec::new();
        for b in batches {
            let mut json = Vec::new();
            {
                let mut w = arrow::json::LineDelimitedWriter::new(&mut json);
                w.write(b).map_err(|e| e.to_string())?;
                w.finish().map_err(|e| e.to_string())?;
            }
            let formatters: Vec<Option<ArrayFormatter<'_>>> = (0..b.num_columns())
                .map(|i| {
                    let used = self.key.contains(&i)
                        || self
                            .address
                            .iter()
                            .any(|p| matches!(p, Part::Column(c) if *c == i));
                    used.then(|| ArrayFormatter::try_new(b.column(i).as_ref(), &opts).ok())
                        .flatten()
                })
                .collect();
            let value = |c: usize, r: usize| -> String {
                match formatters.get(c) {
                    Some(Some(f)) if b.column(c).is_valid(r) => f.value(r).to_string(),
                    _ => String::new(),
                }
            };
            for (r, line) in json
                .split(|&c| c == b'\n')
                .filter(|l| !l.is_empty())
                .enumerate()
            {
                let mut address = String::new();
                for p in &self.address {
                    match p {
                        Part::Text(t) => address.push_str(t),
                        Part::Column(c) => address.push_str(&value(*c, r)),
                    }
                }
                let key = (!self.key.is_empty()).then(|| {
                    let mut k = String::with_capacity(32);
                    for (i, c) in self.key.iter().enumerate() {
                        if i > 0 {
                            k.push('\u{1f}');
                        }
                        k.push_str(&value(*c, r));
                    }
                    k
                });
                out.push(RowMessage {
                    address,
                    key,
                    payload: Bytes::copy_from_slice(line),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn addresses_keys_and_payloads_come_from_the_row() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("site", DataType::Utf8, true),
            Field::new("n", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![Some("a"), None])),
                Arc::new(Int64Array::from(vec![1, 2])),
            ],
        )
        .expect("batch");
        let key =
            RowMessages::key_columns(&["site".into(), "n".into()], &schema, "t").expect("key");
        let m = RowMessages::new("out-{site}.x", &key, &schema, "t").expect("template");
        let rows = m.messages(&[batch]).expect("messages");
        assert_eq!(rows[0].address, "out-a.x");
        assert_eq!(rows[0].key.as_deref(), Some("a\u{1f}1"));
        assert_eq!(&rows[0].payload[..], br#"{"site":"a","n":1}"#);
        assert_eq!(rows[1].address, "out-.x");
        assert!(
            RowMessages::new("out-{nope}", &[], &schema, "kafka:out")
                .err()
                .is_some_and(|e| e.contains("`{nope}`"))
        );
    }
}
