//! Object storage as a file sink's destination: `path: s3://bucket/prefix`.
//!
//! The files are written to a local staging directory first, as for a local sink, and
//! uploaded when they commit; the settings here say where the bucket is and how to
//! reach it. Every setting left out is read from the environment as the AWS tools
//! read it (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, …).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A file sink's bucket and the prefix its files go under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectTarget {
    /// `s3://bucket/prefix`, as written (without a trailing `/`).
    pub url: String,
    /// The bucket.
    pub bucket: String,
    /// The key prefix, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// How to reach the bucket.
    pub s3: S3Options,
}

impl ObjectTarget {
    /// The object key of a file at `relative` (a path under the sink's directory).
    pub fn key(&self, relative: &Path) -> String {
        let rel = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        if self.prefix.is_empty() {
            rel
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }
}

/// How to reach an S3-compatible store; `None` falls back to the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Options {
    /// The endpoint of an S3-compatible server (`http://127.0.0.1:9000`); AWS without it.
    pub endpoint: Option<String>,
    /// The region (`us-east-1`).
    pub region: Option<String>,
    /// The access key id; prefer the environment for secrets.
    pub access_key_id: Option<String>,
    /// The secret access key; prefer the environment for secrets.
    pub secret_access_key: Option<String>,
    /// Plain `http://` endpoints allowed (a local server).
    pub allow_http: Option<bool>,
    /// Where files wait, locally, until they are uploaded at commit (default: the
    /// system's temporary directory, `etlmesh-staging/<bucket>/<prefix>`).
    pub staging: Option<PathBuf>,
}

/// Whether `path` names object storage rather than a local directory.
pub fn is_object_url(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.contains("://"))
}

/// Reads `s3://bucket/prefix`; the error says what is wrong with it.
pub fn parse_url(url: &str, s3: S3Options) -> Result<ObjectTarget, String> {
    let Some(rest) = url.strip_prefix("s3://") else {
        let scheme = url.split("://").next().unwrap_or_default();
        return Err(format!(
            "`{scheme}://` is not a storage etlmesh writes to; use a local directory or `s3://bucket/prefix` (S3 or an S3-compatible server)"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !valid_bucket {
        return Err(format!(
            "`{bucket}` is not a bucket name: 3 to 63 lowercase letters, digits, `-` or `.`"
        ));
    }
    let prefix = prefix.trim_matches('/');
    if prefix
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
        && !prefix.is_empty()
    {
        return Err(format!(
            "`{prefix}` is not a key prefix: no empty, `.` or `..` parts"
        ));
    }
    Ok(ObjectTarget {
        url: format!("s3://{rest}"),
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        s3,
    })
}

/// The local directory where a target's files wait for their upload.
pub fn staging_dir(target: &ObjectTarget) -> PathBuf {
    let base = target
        .s3
        .staging
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("etlmesh-staging"));
    let mut dir = base.join(&target.bucket);
    for part in target.prefix.split('/').filter(|p| !p.is_empty()) {
        dir.push(part);
    }
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_prefix() {
        let t = parse_url("s3://lake/readings/clean/", S3Options::default()).expect("valid");
        assert_eq!(
            (t.bucket.as_str(), t.prefix.as_str()),
            ("lake", "readings/clean")
        );
        assert_eq!(t.url, "s3://lake/readings/clean");
        assert_eq!(
            t.key(Path::new("day=1/part-0.parquet")),
            "readings/clean/day=1/part-0.parquet"
        );
        let bare = parse_url("s3://lake", S3Options::default()).expect("valid");
        assert_eq!(bare.key(Path::new("a.parquet")), "a.parquet");
        assert!(staging_dir(&t).ends_with("etlmesh-staging/lake/readings/clean"));
    }

    #[test]
    fn other_schemes_and_bad_names_are_refused() {
        let e = parse_url("gs://b/p", S3Options::default()).expect_err("gs");
        assert!(e.contains("`gs://` is not a storage"), "{e}");
        let e = parse_url("s3://Bad_Bucket/p", S3Options::default()).expect_err("name");
        assert!(e.contains("not a bucket name"), "{e}");
        let e = parse_url("s3://lake/a//b", S3Options::default()).expect_err("prefix");
        assert!(e.contains("not a key prefix"), "{e}");
    }
}
