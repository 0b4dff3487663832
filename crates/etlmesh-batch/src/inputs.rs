//! Which inputs a job reads: files, directories, glob patterns (`data/*.csv`), or
//! standard input (`-`), each with its format.

use std::path::{Path, PathBuf};

use etlmesh_config::{Format, PipelineSpec, SourceKind};

use crate::JobError;

/// One input of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A file.
    File {
        /// Its path.
        path: PathBuf,
        /// Its format.
        format: Format,
        /// Its size in bytes.
        size: u64,
    },
    /// Standard input.
    Stdin {
        /// Its format.
        format: Format,
    },
}

impl Input {
    /// Its name in messages and dead letters.
    pub fn name(&self) -> String {
        match self {
            Input::File { path, .. } => path.display().to_string(),
            Input::Stdin { .. } => "stdin".into(),
        }
    }

    /// Its format.
    pub fn format(&self) -> Format {
        match self {
            Input::File { format, .. } | Input::Stdin { format } => *format,
        }
    }
}

/// Resolves the inputs of a run: those given on the command line, or the source's.
pub fn resolve(spec: &PipelineSpec, given: &[String]) -> Result<Vec<Input>, JobError> {
    let patterns: Vec<String> = if !given.is_empty() {
        given.to_vec()
    } else {
        match &spec.source.kind {
            SourceKind::Stdin => vec!["-".into()],
            SourceKind::File { path: Some(p) } => vec![p.clone()],
            SourceKind::Mqtt(_) | SourceKind::Nats(_) | SourceKind::Kafka(_) => {
                let source = spec
                    .stream_source()
                    .map(|s| s.describe())
                    .unwrap_or_default();
                return Err(JobError::Input(format!(
                    "pipeline `{}` streams from {source}: it runs in workers\n  help: start it with `etlmesh up -c FILE` (or `etlmesh worker -c FILE --pipeline {}`)",
                    spec.name, spec.name
                )));
            }
            SourceKind::File { path: None } => {
                return Err(JobError::Input(format!(
                    "pipeline `{}` has no source path and no input was given\n  help: pass files after the pipeline name (etlmesh run -c FILE --pipeline {} data.csv), or set `source: {{ type: file, path: ... }}`",
                    spec.name, spec.name
                )));
            }
        }
    };
    let mut inputs = Vec::new();
    for p in &patterns {
        if p == "-" {
            let format = spec.source.format.ok_or_else(|| {
                JobError::Input(
                    "reading standard input needs a format\n  help: set the source's `format`"
                        .into(),
                )
            })?;
            inputs.push(Input::Stdin { format });
            continue;
        }
        let paths = expand(p)?;
        if paths.is_empty() {
            return Err(JobError::Input(format!(
                "no input matches `{p}`\n  help: check the path; patterns may use * and ?"
            )));
        }
        for path in paths {
            let format = match spec.source.format {
                Some(f) => f,
                None => Format::from_path(&path).ok_or_else(|| {
                    JobError::Input(format!(
                        "{}: cannot tell the format from the file name\n  help: set the source's `format` (csv, ndjson, json, parquet or arrow)",
                        path.display()
                    ))
                })?,
            };
            let size = std::fs::metadata(&path).map(|m| m.len()).map_err(|e| {
                JobError::Input(format!(
                    "{}: {e}\n  help: check that the file exists and is readable",
                    path.display()
                ))
            })?;
            inputs.push(Input::File { path, format, size });
        }
    }
    Ok(inputs)
}

/// Checks that every input is a file under one of `dirs` once symbolic links are
/// resolved (standard input is refused): the inputs of a job submitted through the
/// gateway may be read only where its pipeline allows. No check when `dirs` is empty.
pub fn check_under(inputs: &[Input], dirs: &[PathBuf]) -> Result<(), JobError> {
    if dirs.is_empty() {
        return Ok(());
    }
    let allowed: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .collect();
    let shown = || {
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for i in inputs {
        let Input::File { path, .. } = i else {
            return Err(JobError::Input(
                "standard input cannot be read by a job".into(),
            ));
        };
        let real = std::fs::canonicalize(path)
            .map_err(|e| JobError::Input(format!("{}: {e}", path.display())))?;
        if !allowed.iter().any(|a| real.starts_with(a)) {
            return Err(JobError::Input(format!(
                "{} is not under the directories this job may read ({})\n  help: move the input there, or add its directory to the pipeline's `jobs.inputs`",
                path.display(),
                shown()
            )));
        }
    }
    Ok(())
}

/// A path, a directory (its files, sorted, hidden ones left out) or a pattern.
fn expand(p: &str) -> Result<Vec<PathBuf>, JobError> {
    let path = Path::new(p);
    if !p.contains(['*', '?']) {
        if path.is_dir() {
            return list_dir(path, "*");
        }
        return Ok(vec![path.to_path_buf()]);
    }
    let (dir, pattern) = match (path.parent(), path.file_name()) {
        (Some(d), Some(f)) if !d.as_os_str().is_empty() => {
            (d.to_path_buf(), f.to_string_lossy().into_owned())
        }
        _ => (PathBuf::from("."), p.to_string()),
    };
    if dir.to_string_lossy().contains(['*', '?']) {
        return Err(JobError::Input(format!(
            "`{p}`: patterns are supported in the file name only\n  help: write dir/*.csv"
        )));
    }
    list_dir(&dir, &pattern)
}

fn list_dir(dir: &Path, pattern: &str) -> Result<Vec<PathBuf>, JobError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| JobError::Input(format!("{}: {e}", dir.display())))?;
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            !name.starts_with('.') && wildcard(pattern.as_bytes(), name.as_bytes())
        })
        .collect();
    out.sort();
    Ok(out)
}

/// `*` and `?` matching.
fn wildcard(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard(b"*.csv", b"a.csv"));
        assert!(wildcard(b"r-??.csv", b"r-01.csv"));
        assert!(!wildcard(b"*.csv", b"a.csv.tmp"));
        assert!(wildcard(b"*", b"x"));
    }

    #[test]
    fn globs_and_directories() {
        let dir = tempfile::tempdir().expect("tmp");
        for n in ["b.csv", "a.csv", ".hidden.csv", "c.json"] {
            std::fs::write(dir.path().join(n), "x").expect("write");
        }
        let pat = dir.path().join("*.csv").display().to_string();
        let got = expand(&pat).expect("expand");
        let names: Vec<_> = got
            .iter()
            .map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(names, vec![Some("a.csv".into()), Some("b.csv".into())]);
        assert_eq!(
            expand(&dir.path().display().to_string())
                .expect("dir")
                .len(),
            3
        );
    }

    #[test]
    fn inputs_must_resolve_under_the_allowed_directories() {
        let dir = tempfile::tempdir().expect("tmp");
        let ok_dir = dir.path().join("in");
        std::fs::create_dir_all(&ok_dir).expect("mkdir");
        std::fs::write(ok_dir.join("a.csv"), "x\n1\n").expect("write");
        std::fs::write(dir.path().join("secret.csv"), "x\n1\n").expect("write");
        std::os::unix::fs::symlink(dir.path().join("secret.csv"), ok_dir.join("link.csv"))
            .expect("symlink");
        let file = |p: PathBuf| Input::File {
            path: p,
            format: Format::Csv,
            size: 4,
        };
        let allowed = vec![ok_dir.clone()];
        assert!(check_under(&[file(ok_dir.join("a.csv"))], &allowed).is_ok());
        for bad in [
            dir.path().join("secret.csv"),
            ok_dir.join("link.csv"),
            ok_dir.join("../secret.csv"),
        ] {
            let e = check_under(&[file(bad.clone())], &allowed).expect_err("refused");
            assert!(e.to_string().contains("not under"), "{bad:?}: {e}");
        }
        assert!(
            check_under(
                &[Input::Stdin {
                    format: Format::Csv
                }],
                &allowed
            )
            .is_err()
        );
        assert!(check_under(&[file(dir.path().join("secret.csv"))], &[]).is_ok());
    }
}
