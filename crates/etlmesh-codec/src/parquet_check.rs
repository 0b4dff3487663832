//! The parquet crate trusts a dictionary page's value count: it allocates that many
//! values before decoding them, so a few kilobytes claiming billions of values cost
//! gigabytes (found by fuzzing: a 3.7 kB body asked for 8.6 GB). [`check`] reads each
//! column chunk's dictionary page first and refuses a count its bytes cannot hold —
//! every plain-encoded value takes at least one bit (booleans), its width (numbers,
//! fixed-length bytes) or a 4-byte length (byte arrays).

use std::sync::Arc;

use parquet::basic::Type;
use parquet::column::page::{Page, PageReader};
use parquet::file::metadata::ParquetMetaData;
use parquet::file::reader::ChunkReader;
use parquet::file::serialized_reader::SerializedPageReader;

/// Bits a plain-encoded value of `t` takes at least.
fn min_bits(t: Type, type_length: i32) -> u64 {
    match t {
        Type::BOOLEAN => 1,
        Type::INT32 | Type::FLOAT | Type::BYTE_ARRAY => 32,
        Type::INT64 | Type::DOUBLE => 64,
        Type::INT96 => 96,
        Type::FIXED_LEN_BYTE_ARRAY => 8 * u64::try_from(type_length.max(1)).unwrap_or(1),
    }
}

/// `Err` names the row group and column whose dictionary claims more values than it
/// holds, or why its pages could not be read.
pub(crate) fn check<R: ChunkReader + 'static>(
    reader: &Arc<R>,
    metadata: &ParquetMetaData,
) -> Result<(), String> {
    for (g, group) in metadata.row_groups().iter().enumerate() {
        let rows = usize::try_from(group.num_rows()).unwrap_or(0);
        for column in group.columns() {
            let at = || format!("row group {g}, column `{}`", column.column_path().string());
            let mut pages = SerializedPageReader::new(reader.clone(), column, rows, None)
                .map_err(|e| format!("{}: {e}", at()))?;
            match pages.peek_next_page() {
                Ok(Some(m)) if m.is_dict => {}
                Ok(_) => continue,
                Err(e) => return Err(format!("{}: {e}", at())),
            }
            if let Some(Page::DictionaryPage {
                buf, num_values, ..
            }) = pages
                .get_next_page()
                .map_err(|e| format!("{}: {e}", at()))?
            {
                let bits = min_bits(column.column_type(), column.column_descr().type_length());
                if u64::from(num_values).saturating_mul(bits) > 8 * buf.len() as u64 {
                    return Err(format!(
                        "{}: the dictionary page claims {num_values} values in {} bytes",
                        at(),
                        buf.len()
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use bytes::Bytes;
    use parquet::arrow::ArrowWriter;
    use parquet::file::metadata::ParquetMetaDataReader;

    fn file_with_dictionary(values: usize) -> Vec<u8> {
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, false)]));
        let col = StringArray::from_iter_values((0..values).map(|i| format!("v{i}")));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(col)]).expect("batch");
        let mut out = Vec::new();
        let mut w = ArrowWriter::try_new(&mut out, schema, None).expect("writer");
        w.write(&batch).expect("write");
        w.close().expect("close");
        out
    }

    fn check(bytes: Vec<u8>) -> Result<(), String> {
        let bytes = Bytes::from(bytes);
        let meta = ParquetMetaDataReader::new()
            .parse_and_finish(&bytes)
            .expect("footer");
        super::check(&Arc::new(bytes), &meta)
    }

    #[test]
    fn an_honest_dictionary_passes_and_an_inflated_one_is_refused() {
        let good = file_with_dictionary(20_000);
        check(good.clone()).expect("an honest file");
        // The dictionary page header's value count, 20,000 as a zigzag varint
        // (40,000 = C0 B8 02), becomes 1,048,575 (FE FF 7F): same length, 52 times
        // the values its bytes hold.
        let at = good
            .windows(3)
            .position(|w| w == [0xC0, 0xB8, 0x02])
            .expect("the value count in the page header");
        let mut bad = good;
        bad[at..at + 3].copy_from_slice(&[0xFE, 0xFF, 0x7F]);
        let e = check(bad).expect_err("inflated");
        assert!(
            e.contains("row group 0, column `s`") && e.contains("claims 1048575 values"),
            "{e}"
        );
    }
}
