//! A log writer for the tests: what a `fmt` layer writes, kept in memory.

use std::io;
use std::sync::{Arc, Mutex};

/// Shared bytes a `fmt` layer writes into (`with_writer(move || buf.clone())`).
#[derive(Clone, Default)]
pub(crate) struct Buf(Arc<Mutex<Vec<u8>>>);

impl io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("buffer").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Buf {
    /// The lines written so far.
    pub(crate) fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().expect("buffer").clone();
        String::from_utf8(bytes)
            .expect("utf-8")
            .lines()
            .map(str::to_string)
            .collect()
    }
}
