//! Hive-style partitioning: rows split by the values of some columns, each group
//! written under `col=value/` with the partition columns left out of the files.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions};

/// The directory name used for a null partition value (Hive's convention).
pub const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// Splits batches by partition columns.
#[derive(Debug, Clone)]
pub struct Partitioner {
    columns: Vec<usize>,
    names: Vec<String>,
    keep: Vec<usize>,
    file_schema: SchemaRef,
}

impl Partitioner {
    /// A partitioner for `names` in `schema`; `Err` names a missing column.
    pub fn new(schema: &SchemaRef, names: &[String]) -> Result<Self, String> {
        let mut columns = Vec::new();
        for n in names {
            let i = schema.index_of(n).map_err(|_| {
                let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                format!(
                    "partition_by column `{n}` is not in the transform's output; the output has: {}",
                    have.join(", ")
                )
            })?;
            columns.push(i);
        }
        let keep: Vec<usize> = (0..schema.fields().len())
            .filter(|i| !columns.contains(i))
            .collect();
        if keep.is_empty() {
            return Err(
                "every output column is a partition column; leave at least one column in the files"
                    .into(),
            );
        }
        let file_schema = Arc::new(Schema::new(
            keep.iter()
                .map(|&i| schema.field(i).clone())
                .collect::<Vec<_>>(),
        ));
        Ok(Self {
            columns,
            names: names.to_vec(),
            keep,
            file_schema,
        })
    }

    /// The schema of the files (without the partition columns).
    pub fn file_schema(&self) -> &SchemaRef {
        &self.file_schema
    }

    /// Splits a batch into (relative directory, rows) groups.
    pub fn split(
        &self,
        batch: &RecordBatch,
    ) -> Result<Vec<(String, RecordBatch)>, arrow::error::ArrowError> {
        let opts = FormatOptions::default().with_null(NULL_PARTITION);
        let formatters = self
            .columns
            .iter()
            .map(|&c| ArrayFormatter::try_new(batch.column(c).as_ref(), &opts))
            .collect::<Result<Vec<_>, _>>()?;
        let mut groups: HashMap<String, Vec<u32>> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut key = String::new();
        for row in 0..batch.num_rows() {
            key.clear();
            for (i, f) in formatters.iter().enumerate() {
                if i > 0 {
                    key.push('/');
                }
                key.push_str(&self.names[i]);
                key.push('=');
                let value = f.value(row).to_string();
                if value == NULL_PARTITION {
                    key.push_str(NULL_PARTITION);
                } else {
                    escape_into(&value, &mut key);
                }
            }
            match groups.get_mut(&key) {
                Some(rows) => rows.push(row as u32),
                None => {
                    order.push(key.clone());
                    groups.insert(key.clone(), vec![row as u32]);
                }
            }
        }
        let projected = batch.project(&self.keep)?;
        let mut out = Vec::with_capacity(order.len());
        for k in order {
            let rows = groups.remove(&k).unwrap_or_default();
            let part = if rows.len() == batch.num_rows() {
                projected.clone()
            } else {
                take_record_batch(&projected, &UInt32Array::from(rows))?
            };
            out.push((k, part));
        }
        Ok(out)
    }
}

/// Percent-encodes what may not appear in a directory name.
fn escape_into(value: &str, out: &mut String) {
    if value.is_empty() {
        out.push_str(NULL_PARTITION);
        return;
    }
    for c in value.chars() {
        if c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | ' ' | '+' | '@') {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array, StringArray};

    #[test]
    fn splits_by_value_and_escapes() {
        let b = RecordBatch::try_from_iter(vec![
            (
                "d",
                Arc::new(StringArray::from(vec![
                    Some("a/b"),
                    Some("c"),
                    None,
                    Some("c"),
                ])) as ArrayRef,
            ),
            (
                "v",
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])) as ArrayRef,
            ),
        ])
        .expect("batch");
        let p = Partitioner::new(&b.schema(), &["d".to_string()]).expect("partitioner");
        let parts = p.split(&b).expect("split");
        let keys: Vec<(&str, usize)> = parts
            .iter()
            .map(|(k, b)| (k.as_str(), b.num_rows()))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("d=a%2Fb", 1),
                ("d=c", 2),
                ("d=__HIVE_DEFAULT_PARTITION__", 1)
            ]
        );
        assert_eq!(parts[1].1.num_columns(), 1);
        assert!(Partitioner::new(&b.schema(), &["nope".to_string()]).is_err());
    }
}
