//! `platform.mesh`: mTLS inside the mesh. The control plane's trust anchor (made in
//! its state directory on first start unless given here) and how long the
//! certificates it issues live.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::access::{RawTls, TlsSpec};
use crate::diag::Diagnostic;
use crate::units::Span;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMesh {
    pub ca: Option<RawTls>,
    pub certificate_lifetime: Option<Span>,
    pub host_suffixes: Option<Vec<String>>,
}

/// mTLS settings of the mesh.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshSpec {
    /// A trust anchor to use (certificate and key, PEM) instead of one made on first
    /// start.
    pub ca: Option<TlsSpec>,
    /// How long the certificates of workers and gateways live; renewed at 70 %.
    pub certificate_lifetime: Duration,
    /// DNS names a member's certificate may carry end with one of these
    /// (`svc.cluster.local`); IP addresses and `localhost` always may, wildcards never.
    pub host_suffixes: Vec<String>,
}

impl Default for MeshSpec {
    fn default() -> Self {
        Self {
            ca: None,
            certificate_lifetime: Duration::from_secs(24 * 3600),
            host_suffixes: Vec::new(),
        }
    }
}

pub(crate) fn resolve_mesh(
    raw: Option<RawMesh>,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> MeshSpec {
    let d = MeshSpec::default();
    let Some(r) = raw else { return d };
    let lifetime = r
        .certificate_lifetime
        .map_or(d.certificate_lifetime, |s| s.0);
    if lifetime < Duration::from_secs(5) || lifetime > Duration::from_secs(366 * 86_400) {
        out.push(
            Diagnostic::new(
                file,
                "platform.mesh.certificate_lifetime",
                format!("is {lifetime:?}"),
            )
            .with_help("give between 5s and 366d; 24h is the default"),
        );
    }
    let ca = r.ca.map(|t| {
        for (p, field) in [(&t.cert, "cert"), (&t.key, "key")] {
            if !p.is_file() {
                out.push(
                    Diagnostic::new(
                        file,
                        format!("platform.mesh.ca.{field}"),
                        format!("`{}` is not a file", p.display()),
                    )
                    .with_help(
                        "give a PEM file, or leave `ca` out and the control plane makes one",
                    ),
                );
            }
        }
        TlsSpec {
            cert: t.cert,
            key: t.key,
        }
    });
    let host_suffixes = r.host_suffixes.unwrap_or_default();
    for (i, h) in host_suffixes.iter().enumerate() {
        if h.contains('*') || h.trim_start_matches('.').is_empty() {
            out.push(
                Diagnostic::new(
                    file,
                    format!("platform.mesh.host_suffixes[{i}]"),
                    format!("`{h}` is not a DNS suffix"),
                )
                .with_help("write a domain, for example svc.cluster.local; no wildcards"),
            );
        }
    }
    MeshSpec {
        ca,
        certificate_lifetime: lifetime,
        host_suffixes,
    }
}

#[cfg(test)]
mod tests {
    use crate::PipelineFile;

    const BASE: &str = "pipelines:\n  a:\n    sinks: [{ type: stdout }]\n";

    #[test]
    fn defaults_and_settings() {
        let f = PipelineFile::parse("x.yaml", BASE).expect("valid");
        assert_eq!(
            f.spec.platform.mesh.certificate_lifetime,
            std::time::Duration::from_secs(86_400)
        );
        let f = PipelineFile::parse(
            "x.yaml",
            format!("platform:\n  mesh:\n    certificate_lifetime: 1h\n{BASE}"),
        )
        .expect("valid");
        assert_eq!(
            f.spec.platform.mesh.certificate_lifetime,
            std::time::Duration::from_secs(3600)
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let e = PipelineFile::parse(
            "x.yaml",
            format!(
                "platform:\n  mesh:\n    certificate_lifetime: 1s\n    ca: {{ cert: /nonexistent/ca.pem, key: /nonexistent/ca.key }}\n{BASE}"
            ),
        )
        .expect_err("invalid")
        .to_string();
        assert!(e.contains("platform.mesh.certificate_lifetime"), "{e}");
        assert!(e.contains("platform.mesh.ca.cert"), "{e}");
        assert!(e.contains("x.yaml:"), "{e}");
    }
}
