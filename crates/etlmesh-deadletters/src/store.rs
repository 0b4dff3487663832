//! A pipeline's dead letters on disk: the live files in its `dead_letter` directory,
//! and the ledger of letters already replayed (`replayed/`), which hides them.
//!
//! The live files are only read here: a worker may be appending to one. A letter is
//! "moved aside" by writing it, with its outcome, to a ledger file of the replay run
//! (`replayed/replayed-<pipeline>-<run>.ndjson`, fsynced and renamed into place).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::DeadLetterError;
use crate::letter::{Letter, Stored, id_of};

/// Where replayed letters go, under the dead-letter directory.
pub const REPLAYED_DIR: &str = "replayed";

/// A pipeline's dead letters.
pub struct Store {
    dir: PathBuf,
    pipeline: String,
    live: Vec<Stored>,
    hidden: usize,
    unreadable: Vec<String>,
}

/// A line of the ledger: a letter and what its replay did.
#[derive(Debug, Serialize, Deserialize)]
pub struct Moved {
    /// The letter's identity.
    pub id: String,
    /// The replay run.
    pub replay_run: String,
    /// When (RFC 3339).
    pub replayed_at: String,
    /// `loaded`, `filtered` or `failed` (see [`crate::Outcome`]).
    pub outcome: String,
    /// Why it failed again, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_reason: Option<String>,
    /// The letter as it was.
    #[serde(flatten)]
    pub letter: Letter,
}

impl Store {
    /// Reads the dead letters of `pipeline` in `dir` (none when the directory does not
    /// exist yet).
    pub fn open(dir: &Path, pipeline: &str) -> Result<Self, DeadLetterError> {
        let mut store = Self {
            dir: dir.to_path_buf(),
            pipeline: pipeline.to_string(),
            live: Vec::new(),
            hidden: 0,
            unreadable: Vec::new(),
        };
        if !dir.exists() {
            return Ok(store);
        }
        let moved = store.ledger_ids()?;
        for file in files(dir, pipeline)? {
            store.read(&file, &moved)?;
        }
        store.live.sort_by(|a, b| a.letter.time.cmp(&b.letter.time));
        Ok(store)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The letters not replayed yet, oldest first.
    pub fn letters(&self) -> &[Stored] {
        &self.live
    }

    /// Letters in the live files that the ledger hides (replayed before).
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Lines that are not dead letters (`file:line: why`).
    pub fn unreadable(&self) -> &[String] {
        &self.unreadable
    }

    fn read(&mut self, file: &Path, moved: &HashSet<String>) -> Result<(), DeadLetterError> {
        let f = match File::open(file) {
            Ok(f) => f,
            // Rotated away or removed between the listing and now.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(file, e)),
        };
        let mut reader = BufReader::new(f);
        let mut buf = Vec::new();
        let mut n = 0usize;
        loop {
            buf.clear();
            if reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| io(file, e))?
                == 0
            {
                break;
            }
            n += 1;
            // A line still being written (no newline yet) is not a letter yet.
            if buf.last() != Some(&b'\n') {
                break;
            }
            let line = buf.trim_ascii_end();
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Letter>(line) {
                Ok(letter) if letter.pipeline == self.pipeline => {
                    let id = id_of(line);
                    if moved.contains(&id) {
                        self.hidden += 1;
                    } else {
                        self.live.push(Stored {
                            id,
                            file: file.to_path_buf(),
                            line: n,
                            letter,
                        });
                    }
                }
                Ok(_) => {}
                Err(e) => self
                    .unreadable
                    .push(format!("{}:{n}: not a dead letter: {e}", file.display())),
            }
        }
        Ok(())
    }

    /// The identities of the letters of this pipeline already moved aside.
    fn ledger_ids(&self) -> Result<HashSet<String>, DeadLetterError> {
        #[derive(Deserialize)]
        struct Id {
            id: String,
            pipeline: String,
        }
        let dir = self.dir.join(REPLAYED_DIR);
        let mut ids = HashSet::new();
        if !dir.exists() {
            return Ok(ids);
        }
        let prefix = format!("replayed-{}-", self.pipeline);
        for path in list(&dir)? {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if !name.is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".ndjson")) {
                continue;
            }
            let f = File::open(&path).map_err(|e| io(&path, e))?;
            for line in BufReader::new(f).lines() {
                let line = line.map_err(|e| io(&path, e))?;
                if let Ok(m) = serde_json::from_str::<Id>(&line)
                    && m.pipeline == self.pipeline
                {
                    ids.insert(m.id);
                }
            }
        }
        Ok(ids)
    }

    /// Moves letters aside: writes the ledger of replay run `run` (fsynced, then
    /// renamed into place). Returns its path.
    pub fn move_aside(&self, run: &str, moved: &[Moved]) -> Result<PathBuf, DeadLetterError> {
        let dir = self.dir.join(REPLAYED_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let target = dir.join(format!("replayed-{}-{run}.ndjson", self.pipeline));
        let tmp = dir.join(format!(".replayed-{}-{run}.ndjson.tmp", self.pipeline));
        let mut f = std::io::BufWriter::new(File::create(&tmp).map_err(|e| io(&tmp, e))?);
        for m in moved {
            serde_json::to_writer(&mut f, m).map_err(|e| io(&tmp, e.into()))?;
            f.write_all(b"\n").map_err(|e| io(&tmp, e))?;
        }
        let f = f.into_inner().map_err(|e| io(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &target).map_err(|e| io(&target, e))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&dir, e))?;
        Ok(target)
    }
}

/// The live dead-letter files that may hold letters of `pipeline`: `dead-<pipeline>-*`
/// (batch runs, workers, rotated files), not the ones being written (`.….tmp`).
fn files(dir: &Path, pipeline: &str) -> Result<Vec<PathBuf>, DeadLetterError> {
    let prefix = format!("dead-{pipeline}-");
    let mut out: Vec<PathBuf> = list(dir)?
        .into_iter()
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .map(|n| n.to_string_lossy())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".ndjson"))
        })
        .collect();
    out.sort();
    Ok(out)
}

fn list(dir: &Path) -> Result<Vec<PathBuf>, DeadLetterError> {
    std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| io(dir, e)))
        .collect()
}

fn io(path: &Path, e: std::io::Error) -> DeadLetterError {
    DeadLetterError::Store(format!(
        "{}: {e}\n  help: check that the dead-letter directory exists and is readable and writable",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(pipeline: &str, raw: &str) -> String {
        format!(
            r#"{{"time":"2026-12-01T10:00:00.000Z","pipeline":"{pipeline}","source":"in.csv","line":2,"stage":"cast","reason":"bad","raw":"{raw}"}}"#
        )
    }

    #[test]
    fn reads_the_pipelines_letters_and_hides_those_moved_aside() {
        let dir = tempfile::tempdir().expect("test");
        let body = format!(
            "{}\n{}\nnot json\n{}",
            letter("p", "a"),
            letter("p", "b"),
            letter("p", "partial")
        );
        std::fs::write(dir.path().join("dead-p-w1.ndjson"), body).expect("test");
        std::fs::write(
            dir.path().join("dead-p-x-w1.ndjson"),
            format!("{}\n", letter("p-x", "c")),
        )
        .expect("test");
        std::fs::write(dir.path().join(".dead-p-r.ndjson.tmp"), letter("p", "d")).expect("test");
        let s = Store::open(dir.path(), "p").expect("test");
        let raws: Vec<_> = s.letters().iter().map(|l| l.letter.raw.clone()).collect();
        assert_eq!(raws, vec![Some("a".into()), Some("b".into())]);
        assert_eq!(s.unreadable().len(), 1, "{:?}", s.unreadable());
        assert!(
            s.unreadable()[0].ends_with(
                "dead-p-w1.ndjson:3: not a dead letter: expected ident at line 1 column 2"
            ),
            "{:?}",
            s.unreadable()
        );

        let first = s.letters()[0].clone();
        s.move_aside(
            "r1",
            &[Moved {
                id: first.id.clone(),
                replay_run: "r1".into(),
                replayed_at: "now".into(),
                outcome: "loaded".into(),
                new_reason: None,
                letter: first.letter,
            }],
        )
        .expect("test");
        let again = Store::open(dir.path(), "p").expect("test");
        assert_eq!(again.letters().len(), 1);
        assert_eq!(again.letters()[0].letter.raw.as_deref(), Some("b"));
        assert_eq!(again.hidden(), 1);
        // Another pipeline's ledger hides nothing of this one's.
        assert_eq!(
            Store::open(dir.path(), "p-x")
                .expect("test")
                .letters()
                .len(),
            1
        );
    }

    #[test]
    fn no_directory_is_no_letters() {
        let s = Store::open(Path::new("/nonexistent/etlmesh-dl"), "p").expect("test");
        assert!(s.letters().is_empty());
    }
}
