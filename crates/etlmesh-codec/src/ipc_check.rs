//! Arrow's IPC readers allocate what a block or message header claims before reading
//! it: a header claiming terabytes makes the allocation fail, which aborts the
//! process (found by fuzzing). [`check`] walks the headers first — the file format's
//! footer blocks, or the stream format's messages — and refuses any size that does not
//! fit in the input. It reads headers only and allocates at most one header at a time.

use std::io::{Read, Seek, SeekFrom};

/// `Err` says which size does not fit. The reader is left at its start.
pub(crate) fn check<R: Read + Seek>(r: &mut R, file: bool) -> Result<(), String> {
    let len = r.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    let result = if file {
        footer(r, len)
    } else {
        messages(r, len)
    };
    r.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    result
}

fn read_i32<R: Read>(r: &mut R) -> Result<i32, String> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)
        .map_err(|e| format!("truncated header: {e}"))?;
    Ok(i32::from_le_bytes(b))
}

fn read_vec<R: Read>(r: &mut R, n: u64) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n as usize];
    r.read_exact(&mut buf)
        .map_err(|e| format!("truncated header: {e}"))?;
    Ok(buf)
}

/// The file format: `ARROW1`, padding, a stream, the footer, its length, `ARROW1`.
fn footer<R: Read + Seek>(r: &mut R, len: u64) -> Result<(), String> {
    if len < 18 {
        return Err(format!("{len} bytes is too short for an Arrow IPC file"));
    }
    r.seek(SeekFrom::Start(len - 10))
        .map_err(|e| e.to_string())?;
    let footer_len = read_i32(r)?;
    if footer_len <= 0 || footer_len as u64 > len - 18 {
        return Err(format!(
            "the footer claims {footer_len} bytes of a {len}-byte file"
        ));
    }
    r.seek(SeekFrom::Start(len - 10 - footer_len as u64))
        .map_err(|e| e.to_string())?;
    let buf = read_vec(r, footer_len as u64)?;
    let footer =
        arrow::ipc::root_as_footer(&buf).map_err(|e| format!("the footer does not parse: {e}"))?;
    for blocks in [footer.recordBatches(), footer.dictionaries()]
        .into_iter()
        .flatten()
    {
        for b in blocks {
            let end = i128::from(b.offset())
                + i128::from(b.metaDataLength())
                + i128::from(b.bodyLength());
            if b.offset() < 0
                || b.metaDataLength() < 0
                || b.bodyLength() < 0
                || end > i128::from(len)
            {
                return Err(format!(
                    "a block claims bytes {}..{end} of a {len}-byte file",
                    b.offset()
                ));
            }
        }
    }
    Ok(())
}

/// The stream format: messages of (continuation, metadata length, metadata, body).
fn messages<R: Read + Seek>(r: &mut R, len: u64) -> Result<(), String> {
    let mut pos = 0u64;
    r.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    while pos + 4 <= len {
        let mut prefix = 4u64;
        let mut meta_len = read_i32(r)?;
        if meta_len == -1 {
            if pos + 8 > len {
                break;
            }
            meta_len = read_i32(r)?;
            prefix = 8;
        }
        if meta_len == 0 {
            return Ok(()); // end of stream
        }
        let meta_start = pos + prefix;
        if meta_len < 0 || meta_start + meta_len as u64 > len {
            return Err(format!(
                "a message at byte {pos} claims {meta_len} bytes of metadata; {} are left",
                len.saturating_sub(meta_start)
            ));
        }
        let meta = read_vec(r, meta_len as u64)?;
        let message = arrow::ipc::root_as_message(&meta)
            .map_err(|e| format!("the message at byte {pos} does not parse: {e}"))?;
        let body = message.bodyLength();
        let end = meta_start + meta_len as u64;
        if body < 0 || end.saturating_add(body as u64) > len {
            return Err(format!(
                "the message at byte {pos} claims a body of {body} bytes; {} are left",
                len - end
            ));
        }
        pos = end + body as u64;
        r.seek(SeekFrom::Start(pos)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2, 3]))])
            .expect("batch")
    }

    #[test]
    fn valid_streams_and_files_pass_and_claims_past_the_end_do_not() {
        let b = batch();
        let mut stream = Vec::new();
        {
            let mut w =
                arrow::ipc::writer::StreamWriter::try_new(&mut stream, &b.schema()).expect("w");
            w.write(&b).expect("write");
            w.finish().expect("finish");
        }
        assert_eq!(check(&mut Cursor::new(&stream), false), Ok(()));
        let mut file = Vec::new();
        {
            let mut w = arrow::ipc::writer::FileWriter::try_new(&mut file, &b.schema()).expect("w");
            w.write(&b).expect("write");
            w.finish().expect("finish");
        }
        assert_eq!(check(&mut Cursor::new(&file), true), Ok(()));
        // Cut short: the last message's body no longer fits.
        let cut = &stream[..stream.len() - 20];
        assert!(check(&mut Cursor::new(cut), false).is_err());
        // A footer length past the file.
        let mut bad = file.clone();
        let at = bad.len() - 10;
        bad[at..at + 4].copy_from_slice(&i32::MAX.to_le_bytes());
        assert!(check(&mut Cursor::new(&bad), true).is_err());
    }
}
