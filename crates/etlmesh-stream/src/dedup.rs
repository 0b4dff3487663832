//! Repeated keys inside a micro-batch: the first row of a key stays, the others go.

use std::collections::HashSet;

use arrow::array::BooleanArray;
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::row::{OwnedRow, RowConverter, SortField};
use etlmesh_codec::DecodedBatch;

/// The key columns of a pipeline's `dedup`.
pub struct Dedup {
    columns: Vec<usize>,
    converter: RowConverter,
}

impl Dedup {
    /// `None` when the pipeline names no key.
    pub fn new(input: &SchemaRef, key: &[String]) -> Result<Option<Self>, String> {
        if key.is_empty() {
            return Ok(None);
        }
        let columns: Vec<usize> = key
            .iter()
            .map(|c| {
                input
                    .index_of(c)
                    .map_err(|_| format!("dedup column `{c}` is not in the input"))
            })
            .collect::<Result<_, _>>()?;
        let converter = RowConverter::new(
            columns
                .iter()
                .map(|&i| SortField::new(input.field(i).data_type().clone()))
                .collect(),
        )
        .map_err(|e| e.to_string())?;
        Ok(Some(Self { columns, converter }))
    }

    /// Drops the rows whose key came earlier in `inputs`; returns how many.
    pub fn drop_repeats(&mut self, inputs: &mut [DecodedBatch]) -> u64 {
        let mut seen: HashSet<OwnedRow> = HashSet::new();
        let mut dropped = 0u64;
        for b in inputs {
            let cols: Vec<_> = self
                .columns
                .iter()
                .map(|&i| b.batch.column(i).clone())
                .collect();
            let Ok(rows) = self.converter.convert_columns(&cols) else {
                continue;
            };
            let keep: Vec<bool> = (0..rows.num_rows())
                .map(|i| seen.insert(rows.row(i).owned()))
                .collect();
            let picked: Vec<usize> = (0..keep.len()).filter(|&i| keep[i]).collect();
            if picked.len() == keep.len() {
                continue;
            }
            if let Ok(f) = filter_record_batch(&b.batch, &BooleanArray::from(keep)) {
                dropped += (b.batch.num_rows() - f.num_rows()) as u64;
                *b = DecodedBatch {
                    provenance: b.provenance.pick(&picked),
                    batch: f,
                };
            }
        }
        dropped
    }
}
