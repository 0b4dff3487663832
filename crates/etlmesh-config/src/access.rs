//! `platform.access`: who may use the gateway. API tokens (stored as SHA-256 hashes),
//! what each may do and how often, CORS origins for browser clients, and TLS for the
//! public listener.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::diag::Diagnostic;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAccess {
    pub tokens: Option<Vec<RawToken>>,
    pub cors: Option<RawCors>,
    pub tls: Option<RawTls>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawToken {
    pub name: String,
    pub sha256: String,
    pub pipelines: Option<Vec<String>>,
    pub query: Option<bool>,
    pub jobs: Option<bool>,
    pub rate: Option<f64>,
    pub burst: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCors {
    pub origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One API token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSpec {
    /// Who holds it (in logs and metrics; never the token).
    pub name: String,
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
    /// Pipelines it may send to (and whose datasets and jobs it may use); `*` for all.
    pub pipelines: Vec<String>,
    /// It may run analytics queries (over its pipelines' datasets).
    pub query: bool,
    /// It may submit and see batch jobs (of its pipelines).
    pub jobs: bool,
    /// Requests per second on average; 0 for no limit.
    pub rate: f64,
    /// Requests at once above the rate (the bucket's size).
    pub burst: f64,
}

impl TokenSpec {
    /// Whether it may use `pipeline`.
    pub fn allows(&self, pipeline: &str) -> bool {
        self.pipelines.iter().any(|p| p == "*" || p == pipeline)
    }
}

/// TLS for the gateway's public listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSpec {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Who may use the gateway. No tokens: open (a local or trusted network).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AccessSpec {
    /// The tokens; when there are any, every API request needs one.
    pub tokens: Vec<TokenSpec>,
    /// Origins browsers may call the gateway from (`*` for any).
    pub cors_origins: Vec<String>,
    /// TLS on the public listener.
    pub tls: Option<TlsSpec>,
}

/// A token's hash as written in the file (64 hex digits).
pub fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.strip_prefix("sha256:").unwrap_or(hex);
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub(crate) fn resolve_access(
    raw: Option<RawAccess>,
    pipelines: &[String],
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> AccessSpec {
    let Some(r) = raw else {
        return AccessSpec::default();
    };
    let mut names = HashSet::new();
    let mut tokens = Vec::new();
    for (i, t) in r.tokens.unwrap_or_default().into_iter().enumerate() {
        let f = format!("platform.access.tokens[{i}]");
        if !names.insert(t.name.clone()) {
            out.push(
                Diagnostic::new(
                    file,
                    format!("{f}.name"),
                    format!("`{}` is given twice", t.name),
                )
                .with_help("give each token its own name"),
            );
        }
        let Some(sha256) = parse_sha256(&t.sha256) else {
            out.push(
                Diagnostic::new(file, format!("{f}.sha256"), "is not a SHA-256 hash (64 hex digits)")
                    .with_help("`etlmesh token new NAME` makes a token and prints its hash; never put the token itself in the file"),
            );
            continue;
        };
        let list = t.pipelines.unwrap_or_else(|| vec!["*".into()]);
        for (j, p) in list.iter().enumerate() {
            if p != "*" && !pipelines.contains(p) {
                out.push(
                    Diagnostic::new(
                        file,
                        format!("{f}.pipelines[{j}]"),
                        format!("`{p}` is not a pipeline of this file"),
                    )
                    .with_help(format!(
                        "the pipelines are: {}; `*` means all",
                        pipelines.join(", ")
                    )),
                );
            }
        }
        let rate = t.rate.unwrap_or(0.0);
        if !rate.is_finite() || rate < 0.0 {
            out.push(
                Diagnostic::new(file, format!("{f}.rate"), format!("is {rate}"))
                    .with_help("requests per second, 0 for no limit"),
            );
        }
        let burst = t.burst.unwrap_or(rate.max(1.0));
        if !burst.is_finite() || burst < 1.0 {
            out.push(
                Diagnostic::new(file, format!("{f}.burst"), format!("is {burst}"))
                    .with_help("at least 1 request"),
            );
        }
        tokens.push(TokenSpec {
            name: t.name,
            sha256,
            pipelines: list,
            query: t.query.unwrap_or(true),
            jobs: t.jobs.unwrap_or(true),
            rate,
            burst,
        });
    }
    let tls = r.tls.map(|t| {
        for (p, field) in [(&t.cert, "cert"), (&t.key, "key")] {
            if !p.is_file() {
                out.push(
                    Diagnostic::new(
                        file,
                        format!("platform.access.tls.{field}"),
                        format!("`{}` is not a file", p.display()),
                    )
                    .with_help("give a PEM file"),
                );
            }
        }
        TlsSpec {
            cert: t.cert,
            key: t.key,
        }
    });
    AccessSpec {
        tokens,
        cors_origins: r.cors.map(|c| c.origins).unwrap_or_default(),
        tls,
    }
}

#[cfg(test)]
mod tests {
    use crate::PipelineFile;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn tokens_parse_and_are_checked() {
        let f = PipelineFile::parse(
            "a.yaml",
            format!("platform:\n  access:\n    tokens:\n      - {{ name: ci, sha256: {HASH}, pipelines: [a], rate: 5 }}\n    cors: {{ origins: ['http://localhost:7070'] }}\npipelines:\n  a:\n    sinks: [{{ type: stdout }}]\n"),
        )
        .expect("valid");
        let a = &f.spec.platform.access;
        assert_eq!(a.tokens[0].name, "ci");
        assert_eq!(a.tokens[0].sha256[0], 0x9f);
        assert!(a.tokens[0].allows("a") && !a.tokens[0].allows("b"));
        assert_eq!((a.tokens[0].rate, a.tokens[0].burst), (5.0, 5.0));
        assert_eq!(a.cors_origins, vec!["http://localhost:7070".to_string()]);
        let e = PipelineFile::parse(
            "a.yaml",
            "platform:\n  access:\n    tokens:\n      - { name: ci, sha256: secret, pipelines: [b] }\npipelines:\n  a:\n    sinks: [{ type: stdout }]\n",
        )
        .expect_err("bad hash");
        assert!(
            e.to_string().contains("platform.access.tokens[0].sha256"),
            "{e}"
        );
        let e = PipelineFile::parse(
            "a.yaml",
            format!("platform:\n  access:\n    tokens:\n      - {{ name: ci, sha256: {HASH}, pipelines: [b] }}\npipelines:\n  a:\n    sinks: [{{ type: stdout }}]\n"),
        )
        .expect_err("unknown pipeline");
        assert!(e.to_string().contains("`b` is not a pipeline"), "{e}");
    }
}
