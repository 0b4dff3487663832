//! Reading an input in chunks that end on record boundaries, so that chunks can be
//! decoded in parallel. Each chunk knows its first line number; a record longer than
//! `max_record_bytes` is skipped without being held in memory, and reported.
//!
//! Framing: newline-separated lines (NDJSON), CSV (a newline inside quotes does not
//! end a record) and a JSON array (each top-level element is a record).

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;

use crate::CodecError;
use crate::record::{MAX_RAW_BYTES, RecordSpan, Reject, Stage};

/// A piece of an input holding whole records.
#[derive(Debug, Clone, Default)]
pub struct Chunk {
    /// The input's name.
    pub source: Arc<str>,
    /// Bytes: whole records.
    pub data: Bytes,
    /// 1-based line of `data[0]`.
    pub first_line: u64,
    /// For JSON arrays: where each element is. For line formats: `None`.
    pub spans: Option<Vec<RecordSpan>>,
    /// Records skipped while reading (over the size limit).
    pub skipped: Vec<Reject>,
}

/// How records are delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One record per line.
    Lines,
    /// CSV: a quote opens at a field's start; newlines inside quotes belong to the
    /// field where the quote closes as a field ends (see `newlines`).
    Csv {
        /// The quote character.
        quote: u8,
        /// The escape character inside quotes, if any.
        escape: Option<u8>,
        /// The field delimiter.
        delimiter: u8,
        /// Newlines inside quotes: `None` where the quote closes (followed by the
        /// delimiter or a line end) before `max_record_bytes`, else the quote's line
        /// is a record of its own (a bad one); `Some(true)` always; `Some(false)` never.
        newlines: Option<bool>,
    },
    /// A JSON array of records.
    JsonArray,
}

/// Scanner state carried across reads.
#[derive(Debug, Default, Clone, Copy)]
struct ScanState {
    in_quote: bool,
    escaped: bool,
    /// CSV: the first newline inside the open quote, and the lines scanned up to and
    /// including it; where the record ends if the quote turns out not to close.
    quote_newline: Option<(usize, u64)>,
    // JSON arrays
    started: bool,
    ended: bool,
    depth: u32,
    in_elem: bool,
    elem_start: usize,
    elem_line: u64,
}

/// Splits a byte stream into [`Chunk`]s.
pub struct Chunker<R> {
    reader: R,
    source: Arc<str>,
    framing: Framing,
    chunk_size: usize,
    max_record: usize,
    buf: Vec<u8>,
    /// Bytes of `buf` already scanned, and the state there.
    scanned: usize,
    state: ScanState,
    /// End of the last complete record in `buf[..scanned]`.
    boundary: usize,
    /// JSON array element spans inside `buf[..boundary]`.
    spans: Vec<RecordSpan>,
    /// Line of `buf[0]`, and newlines in `buf[..scanned]`.
    line: u64,
    lines_scanned: u64,
    lines_at_boundary: u64,
    eof: bool,
    bytes_read: u64,
    skipped: Vec<Reject>,
    /// While skipping a long record: stop scanning at the first boundary.
    stop_at_first: bool,
}

impl<R: Read> Chunker<R> {
    /// A chunker over `reader`.
    pub fn new(
        reader: R,
        source: Arc<str>,
        framing: Framing,
        chunk_size: usize,
        max_record: usize,
    ) -> Self {
        Self {
            reader,
            source,
            framing,
            chunk_size: chunk_size.max(4096),
            max_record: max_record.max(1),
            buf: Vec::new(),
            scanned: 0,
            state: ScanState::default(),
            boundary: 0,
            spans: Vec::new(),
            line: 1,
            lines_scanned: 0,
            lines_at_boundary: 0,
            eof: false,
            bytes_read: 0,
            skipped: Vec::new(),
            stop_at_first: false,
        }
    }

    /// Bytes read from the input so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    fn fill(&mut self) -> Result<(), CodecError> {
        let start = self.buf.len();
        // Read into the buffer's spare capacity: a file reads straight into it, with no
        // pass that zeroes the chunk first.
        self.buf.reserve_exact(self.chunk_size);
        let want = self.chunk_size as u64;
        let read = (&mut self.reader)
            .take(want)
            .read_to_end(&mut self.buf)
            .map_err(|error| CodecError::Io {
                input: self.source.to_string(),
                error,
            })?;
        if (read as u64) < want {
            self.eof = true;
        }
        self.bytes_read += (self.buf.len() - start) as u64;
        Ok(())
    }

    /// The next chunk, or `None` at the end of the input.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>, CodecError> {
        loop {
            if self.boundary > 0 {
                return Ok(Some(self.cut(self.boundary)));
            }
            // `buf` holds one incomplete record, or nothing.
            if self.buf.len() > self.max_record {
                // A quote still open past the limit did not close: its first line is
                // the record, and what follows is read again.
                if self.break_quote() {
                    self.scan()?;
                } else {
                    self.skip_oversized()?;
                }
                continue;
            }
            if self.eof {
                if self.break_quote() {
                    self.scan()?;
                    continue;
                }
                return self.finish_input();
            }
            self.fill()?;
            self.scan()?;
        }
    }

    fn take_skipped_only(&mut self) -> Option<Chunk> {
        if self.skipped.is_empty() {
            return None;
        }
        Some(Chunk {
            source: self.source.clone(),
            data: Bytes::new(),
            first_line: self.line,
            spans: matches!(self.framing, Framing::JsonArray).then(Vec::new),
            skipped: std::mem::take(&mut self.skipped),
        })
    }

    /// Hands out `buf[..at]` as a chunk.
    fn cut(&mut self, at: usize) -> Chunk {
        let rest = self.buf.split_off(at);
        let data = std::mem::replace(&mut self.buf, rest);
        let first_line = self.line;
        let lines = self.lines_at_boundary;
        self.line += lines;
        self.lines_scanned -= lines;
        self.lines_at_boundary = 0;
        self.scanned -= at;
        self.boundary = 0;
        if self.state.in_elem {
            self.state.elem_start -= at;
        }
        // A quote open past the cut (the end of the input) is over.
        self.state.quote_newline = self
            .state
            .quote_newline
            .filter(|(nl, _)| *nl >= at)
            .map(|(nl, l)| (nl - at, l.saturating_sub(lines)));
        let spans =
            matches!(self.framing, Framing::JsonArray).then(|| std::mem::take(&mut self.spans));
        Chunk {
            source: self.source.clone(),
            data: Bytes::from(data),
            first_line,
            spans,
            skipped: std::mem::take(&mut self.skipped),
        }
    }

    fn finish_input(&mut self) -> Result<Option<Chunk>, CodecError> {
        if self.buf.is_empty() {
            return Ok(self.take_skipped_only());
        }
        match self.framing {
            Framing::JsonArray => {
                let rest = &self.buf[self.boundary..];
                if !self.state.started && rest.iter().all(u8::is_ascii_whitespace) {
                    // An empty input.
                    self.buf.clear();
                    self.scanned = 0;
                    return Ok(self.take_skipped_only());
                }
                if !self.state.ended {
                    let line = if self.state.in_elem {
                        self.state.elem_line
                    } else {
                        self.line + self.lines_scanned
                    };
                    let raw = Bytes::copy_from_slice(&rest[..rest.len().min(MAX_RAW_BYTES)]);
                    self.skipped.push(
                        Reject::new(
                            &self.source,
                            Stage::Decode,
                            "the JSON array is not closed (a truncated file?)",
                            raw,
                        )
                        .at_line(line),
                    );
                }
                self.buf.clear();
                self.scanned = 0;
                self.boundary = 0;
                let chunk = self.take_skipped_only();
                Ok(chunk)
            }
            _ => {
                // The last record has no newline: it is a record all the same.
                self.boundary = self.buf.len();
                self.lines_at_boundary = self.lines_scanned;
                Ok(Some(self.cut(self.buf.len())))
            }
        }
    }

    /// Scans new bytes for record boundaries.
    fn scan(&mut self) -> Result<(), CodecError> {
        match self.framing {
            Framing::Lines if self.stop_at_first => {
                let new = &self.buf[self.scanned..];
                if let Some(i) = memchr::memchr(b'\n', new) {
                    self.lines_scanned += 1;
                    self.boundary = self.scanned + i + 1;
                    self.lines_at_boundary = self.lines_scanned;
                    self.scanned = self.boundary;
                } else {
                    self.scanned = self.buf.len();
                }
            }
            Framing::Lines => {
                let new = &self.buf[self.scanned..];
                if let Some(i) = memchr::memrchr(b'\n', new) {
                    let n = memchr::memchr_iter(b'\n', new).count() as u64;
                    self.lines_scanned += n;
                    self.boundary = self.scanned + i + 1;
                    self.lines_at_boundary = self.lines_scanned;
                }
                self.scanned = self.buf.len();
            }
            Framing::Csv {
                quote,
                escape,
                delimiter,
                newlines,
            } => self.scan_csv(quote, escape, delimiter, newlines),
            Framing::JsonArray => self.scan_json()?,
        }
        Ok(())
    }

    fn scan_csv(&mut self, quote: u8, escape: Option<u8>, delimiter: u8, newlines: Option<bool>) {
        let mut i = self.scanned;
        while i < self.buf.len() {
            if self.state.escaped {
                self.state.escaped = false;
                i += 1;
                continue;
            }
            let rest = &self.buf[i..];
            let next = match escape {
                Some(e) if self.state.in_quote => memchr::memchr3(quote, e, b'\n', rest),
                _ => memchr::memchr2(quote, b'\n', rest),
            };
            let Some(off) = next else {
                i = self.buf.len();
                break;
            };
            i += off;
            let c = self.buf[i];
            if c == b'\n' {
                self.lines_scanned += 1;
                if !self.state.in_quote {
                    self.boundary = i + 1;
                    self.lines_at_boundary = self.lines_scanned;
                    if self.stop_at_first {
                        self.scanned = i + 1;
                        return;
                    }
                } else if self.state.quote_newline.is_none() {
                    self.state.quote_newline = Some((i, self.lines_scanned));
                    if newlines == Some(false) && self.break_quote() {
                        i = self.scanned;
                        if self.stop_at_first {
                            return;
                        }
                        continue;
                    }
                }
            } else if self.state.in_quote && Some(c) == escape && c != quote {
                self.state.escaped = true;
            } else if !self.state.in_quote {
                // A quote opens only at the start of a field, as csv-core reads it;
                // elsewhere it is a character of the field.
                if i == 0
                    || matches!(self.buf[i - 1], b'\n' | b'\r')
                    || self.buf[i - 1] == delimiter
                {
                    self.state.in_quote = true;
                    self.state.quote_newline = None;
                }
            } else {
                // A doubled quote, or the quote that closes the field.
                let Some(&after) = self.buf.get(i + 1) else {
                    if !self.eof {
                        // Decide once the next byte is read.
                        self.scanned = i;
                        return;
                    }
                    self.state.in_quote = false;
                    self.state.quote_newline = None;
                    i += 1;
                    continue;
                };
                if after == quote {
                    i += 2;
                    continue;
                }
                let closes_field = matches!(after, b'\n' | b'\r') || after == delimiter;
                if !closes_field && newlines.is_none() && self.break_quote() {
                    // The quote spanned lines and did not close where a field ends:
                    // it never closed. Its first line is a (bad) record of its own.
                    i = self.scanned;
                    if self.stop_at_first {
                        return;
                    }
                    continue;
                }
                self.state.in_quote = false;
                self.state.quote_newline = None;
            }
            i += 1;
        }
        self.scanned = i;
    }

    /// Ends the record at the first newline of a quote that spans lines and does not
    /// close (CSV): the quote's line becomes a record of its own, and scanning goes on
    /// after it. False when no quote spanning lines is open.
    fn break_quote(&mut self) -> bool {
        let Framing::Csv { newlines, .. } = self.framing else {
            return false;
        };
        if !self.state.in_quote || newlines == Some(true) {
            return false;
        }
        let Some((nl, lines)) = self.state.quote_newline.take() else {
            return false;
        };
        self.state.in_quote = false;
        self.state.escaped = false;
        self.lines_scanned = lines;
        self.boundary = nl + 1;
        self.lines_at_boundary = lines;
        self.scanned = nl + 1;
        true
    }

    fn scan_json(&mut self) -> Result<(), CodecError> {
        let mut i = self.scanned;
        while i < self.buf.len() {
            let c = self.buf[i];
            let st = &mut self.state;
            if c == b'\n' {
                self.lines_scanned += 1;
            }
            if st.in_elem {
                if st.in_quote {
                    if st.escaped {
                        st.escaped = false;
                    } else if c == b'\\' {
                        st.escaped = true;
                    } else if c == b'"' {
                        st.in_quote = false;
                    }
                } else {
                    match c {
                        b'"' => st.in_quote = true,
                        b'{' | b'[' => st.depth += 1,
                        b'}' | b']' if st.depth > 0 => {
                            st.depth -= 1;
                            if st.depth == 0 {
                                self.end_element(i + 1);
                                if self.stop_at_first {
                                    self.scanned = i + 1;
                                    return Ok(());
                                }
                            }
                        }
                        b',' | b']' if st.depth == 0 => {
                            // A scalar element ends before its delimiter.
                            self.end_element(i);
                            if self.stop_at_first {
                                self.scanned = i;
                                return Ok(());
                            }
                            continue;
                        }
                        _ => {}
                    }
                }
            } else if !st.ended {
                match c {
                    _ if c.is_ascii_whitespace() => {}
                    b'[' if !st.started => st.started = true,
                    b',' if st.started => {}
                    b']' if st.started => {
                        st.ended = true;
                        self.boundary = i + 1;
                        self.lines_at_boundary = self.lines_scanned;
                    }
                    _ if !st.started => {
                        return Err(CodecError::Input {
                            input: self.source.to_string(),
                            message: format!(
                                "line {}: expected a JSON array (`[`), found {}",
                                self.line + self.lines_scanned,
                                crate::decode::show(&[c])
                            ),
                            help: "send one JSON array of objects, or use format ndjson for one object per line".into(),
                        });
                    }
                    _ => {
                        st.in_elem = true;
                        st.depth = 0;
                        st.elem_start = i;
                        st.elem_line = self.line + self.lines_scanned - u64::from(c == b'\n');
                        if c == b'{' || c == b'[' {
                            st.depth = 1;
                        } else if c == b'"' {
                            st.in_quote = true;
                        }
                    }
                }
            } else if !c.is_ascii_whitespace() {
                return Err(CodecError::Input {
                    input: self.source.to_string(),
                    message: format!(
                        "line {}: text after the end of the JSON array",
                        self.line + self.lines_scanned
                    ),
                    help: "send exactly one JSON array".into(),
                });
            }
            i += 1;
        }
        self.scanned = i;
        Ok(())
    }

    fn end_element(&mut self, end: usize) {
        let st = &mut self.state;
        st.in_elem = false;
        self.spans.push(RecordSpan {
            start: st.elem_start as u32,
            len: (end - st.elem_start) as u32,
            line: st.elem_line,
        });
        self.boundary = end;
        self.lines_at_boundary = self.lines_scanned;
    }

    /// The record at the start of `buf` is longer than the limit: report it, and drop
    /// bytes until it ends, never holding more than a read's worth.
    fn skip_oversized(&mut self) -> Result<(), CodecError> {
        let line = match self.framing {
            Framing::JsonArray if self.state.in_elem => self.state.elem_line,
            _ => self.line,
        };
        let raw = Bytes::copy_from_slice(&self.buf[..MAX_RAW_BYTES.min(self.buf.len())]);
        let mut skipped_bytes = 0u64;
        self.stop_at_first = true;
        loop {
            self.scan()?;
            if self.boundary > 0 {
                // The long record ends at `boundary`; the scan stopped there.
                skipped_bytes += self.boundary as u64;
                self.buf.drain(..self.boundary);
                self.line += self.lines_scanned;
                self.scanned = 0;
                self.boundary = 0;
                break;
            }
            skipped_bytes += self.buf.len() as u64;
            self.line += self.lines_scanned;
            self.buf.clear();
            self.scanned = 0;
            self.lines_scanned = 0;
            if self.eof {
                break;
            }
            self.fill()?;
            if self.buf.is_empty() {
                break;
            }
        }
        self.stop_at_first = false;
        self.lines_scanned = 0;
        self.lines_at_boundary = 0;
        self.spans.clear();
        self.state.elem_start = 0;
        let reason = format!(
            "record is over max_record_bytes = {} ({skipped_bytes} bytes or more); it was skipped unread",
            self.max_record
        );
        let mut r = Reject::new(&self.source, Stage::Limit, reason, raw).at_line(line);
        r.raw_truncated = true;
        self.skipped.push(r);
        // What follows the long record has not been scanned for boundaries yet.
        self.scan()
    }
}
