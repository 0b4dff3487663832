//! One dead letter as read back from its file, and where it is stored.

use std::path::PathBuf;

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A dead letter, as `etlmesh_sink::dead_letter::DeadLetter` writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Letter {
    /// When it was written (RFC 3339).
    pub time: String,
    /// The pipeline.
    pub pipeline: String,
    /// The input: a file, `request`, `mqtt:<topic>`, `nats:<subject>`,
    /// `kafka:<topic>/<partition>@<offset>`.
    pub source: String,
    /// 1-based line, for text inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// 1-based record number, for typed inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<u64>,
    /// decode, cast, transform, limit, late, future or load.
    pub stage: String,
    /// The field at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Why.
    pub reason: String,
    /// The original bytes, when they are UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// The original bytes in base64, when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_base64: Option<String>,
    /// Whether the bytes were cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub raw_truncated: bool,
}

impl Letter {
    /// The original bytes; `None` when the letter has none or they do not decode.
    pub fn raw_bytes(&self) -> Option<Bytes> {
        if let Some(r) = &self.raw {
            return Some(Bytes::from(r.clone()));
        }
        let b = self.raw_base64.as_ref()?;
        base64::engine::general_purpose::STANDARD
            .decode(b)
            .ok()
            .map(Bytes::from)
    }

    /// `source:line`, `source#row` or `source`.
    pub fn place(&self) -> String {
        match (self.line, self.row) {
            (Some(l), _) => format!("{}:{l}", self.source),
            (None, Some(r)) => format!("{}#{r}", self.source),
            (None, None) => self.source.clone(),
        }
    }
}

/// A letter with where it is stored.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its identity: a hash of its line (stable across rotations of the file).
    pub id: String,
    /// The file it is in.
    pub file: PathBuf,
    /// Its 1-based line in that file.
    pub line: usize,
    /// The letter.
    pub letter: Letter,
}

/// The identity of a letter's line: FNV-1a, 64 bits, in hex. Stable across Rust
/// versions and machines (the ledger outlives both).
pub fn id_of(line: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in line {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_sink_writes_and_gives_back_the_bytes() {
        let l: Letter = serde_json::from_str(
            r#"{"time":"2026-12-01T10:00:00.000Z","pipeline":"p","source":"data.csv","line":3,"stage":"cast","field":"t","reason":"not a number","raw":"d1,abc"}"#,
        )
        .expect("test");
        assert_eq!(l.raw_bytes().expect("test"), Bytes::from("d1,abc"));
        assert_eq!(l.place(), "data.csv:3");
        let b: Letter = serde_json::from_str(
            r#"{"time":"t","pipeline":"p","source":"mqtt:a/b","stage":"decode","reason":"r","raw_base64":"AP8="}"#,
        )
        .expect("test");
        assert_eq!(b.raw_bytes().expect("test").as_ref(), &[0u8, 255]);
    }

    #[test]
    fn the_id_is_fnv_1a() {
        assert_eq!(id_of(b""), "cbf29ce484222325");
        assert_eq!(id_of(b"a"), "af63dc4c8601ec8c");
    }
}
