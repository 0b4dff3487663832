//! `platform.broker`: the MQTT broker etlmesh can run in its own process (`etlmesh up`,
//! `etlmesh broker`) — for demos, the edge and tests. Where it listens, TLS, who may
//! log in, and the bounds that keep one client from holding the broker's memory.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::access::{RawTls, TlsSpec, parse_sha256};
use crate::diag::Diagnostic;
use crate::units::{ByteSize, Span};

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBroker {
    pub listen: Option<String>,
    pub tls: Option<RawTls>,
    pub users: Option<Vec<RawUser>>,
    pub max_packet: Option<ByteSize>,
    pub max_queued: Option<u64>,
    pub max_queued_bytes: Option<ByteSize>,
    pub max_inflight: Option<u16>,
    pub max_connections: Option<u64>,
    pub max_session_expiry: Option<Span>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUser {
    pub username: String,
    pub sha256: String,
}

/// One login the broker accepts: the user name and the SHA-256 of the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUser {
    /// The MQTT user name.
    pub username: String,
    /// SHA-256 of the password (`echo -n PASSWORD | sha256sum`).
    pub sha256: [u8; 32],
}

/// The embedded MQTT broker's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerSpec {
    /// The address it listens on (TLS only, when `tls` is given).
    pub listen: SocketAddr,
    /// Certificate and key (PEM): the listener speaks MQTT over TLS.
    pub tls: Option<TlsSpec>,
    /// Who may connect; anyone when empty.
    pub users: Vec<BrokerUser>,
    /// The largest packet accepted or sent; a client sending a larger one is
    /// disconnected, a message larger than a subscriber accepts is not sent to it.
    pub max_packet: u32,
    /// Messages kept per session (queued for a subscriber, offline or slow); past it
    /// new ones for that session are dropped and counted.
    pub max_queued: usize,
    /// Bytes of payload kept per session, the same way.
    pub max_queued_bytes: u64,
    /// Unacknowledged QoS 1 messages sent to one subscriber at a time (an MQTT 5
    /// client's smaller receive maximum wins).
    pub max_inflight: u16,
    /// Connections at once; past it new clients are refused ("server unavailable").
    pub max_connections: usize,
    /// The longest a disconnected persistent session is kept (MQTT 3.1.1 sessions and
    /// MQTT 5 sessions asking for longer are cut to this).
    pub max_session_expiry: Duration,
}

impl BrokerSpec {
    /// The defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            tls: None,
            users: Vec::new(),
            max_packet: 1 << 20,
            max_queued: 100_000,
            max_queued_bytes: 64 << 20,
            max_inflight: u16::MAX,
            max_connections: 10_000,
            max_session_expiry: Duration::from_secs(7 * 86_400),
        }
    }
}

pub(crate) fn resolve_broker(
    raw: Option<RawBroker>,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> Option<BrokerSpec> {
    let r = raw?;
    let f = |field: &str| format!("platform.broker.{field}");
    let text = r.listen.unwrap_or_else(|| "127.0.0.1:1883".into());
    let listen = match text.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            out.push(
                Diagnostic::new(file, f("listen"), format!("`{text}` is not an address"))
                    .with_help(
                        "write host:port, e.g. 127.0.0.1:1883 (0.0.0.0:1883 for every interface)",
                    ),
            );
            "127.0.0.1:1883".parse().ok()?
        }
    };
    let mut spec = BrokerSpec::new(listen);
    spec.tls = r.tls.map(|t| {
        for (p, field) in [(&t.cert, "cert"), (&t.key, "key")] {
            if !p.is_file() {
                out.push(
                    Diagnostic::new(
                        file,
                        f(&format!("tls.{field}")),
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
    for (i, u) in r.users.unwrap_or_default().into_iter().enumerate() {
        let Some(sha256) = parse_sha256(&u.sha256) else {
            out.push(
                Diagnostic::new(file, f(&format!("users[{i}].sha256")), "is not a SHA-256 hash (64 hex digits)")
                    .with_help("write the hash of the password (`echo -n PASSWORD | sha256sum`), never the password itself"),
            );
            continue;
        };
        if u.username.is_empty() || spec.users.iter().any(|x| x.username == u.username) {
            out.push(
                Diagnostic::new(
                    file,
                    f(&format!("users[{i}].username")),
                    format!("`{}` is empty or given twice", u.username),
                )
                .with_help("give each user once"),
            );
        }
        spec.users.push(BrokerUser {
            username: u.username,
            sha256,
        });
    }
    if let Some(b) = r.max_packet {
        if !(256..=(256 << 20)).contains(&b.0) {
            out.push(
                Diagnostic::new(file, f("max_packet"), format!("is {} bytes", b.0))
                    .with_help("give between 256B and 256MiB; 1MiB is the default"),
            );
        }
        spec.max_packet = b.0.clamp(256, 256 << 20) as u32;
    }
    if let Some(n) = r.max_queued {
        if n == 0 {
            out.push(
                Diagnostic::new(file, f("max_queued"), "is 0")
                    .with_help("give at least 1 message; 100000 is the default"),
            );
        }
        spec.max_queued = n.max(1) as usize;
    }
    if let Some(b) = r.max_queued_bytes {
        spec.max_queued_bytes = b.0.max(1);
    }
    if let Some(n) = r.max_inflight {
        if n == 0 {
            out.push(Diagnostic::new(file, f("max_inflight"), "is 0").with_help(
                "give at least 1; 65535 (the client's receive maximum decides) is the default",
            ));
        }
        spec.max_inflight = n.max(1);
    }
    if let Some(n) = r.max_connections {
        spec.max_connections = n.max(1) as usize;
    }
    if let Some(s) = r.max_session_expiry {
        spec.max_session_expiry = s.0;
    }
    Some(spec)
}

#[cfg(test)]
mod tests {
    use crate::PipelineFile;

    fn load(platform: &str) -> Result<PipelineFile, crate::ConfigError> {
        PipelineFile::parse(
            "b.yaml",
            format!("platform:\n{platform}pipelines:\n  a:\n    sinks: [{{ type: stdout }}]\n"),
        )
    }

    #[test]
    fn a_broker_with_users_and_limits() {
        let f = load(&format!(
            "  broker:\n    listen: 127.0.0.1:2883\n    users: [{{ username: dev, sha256: {} }}]\n    max_queued: 10\n    max_packet: 4KiB\n",
            "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        ))
        .expect("valid");
        let b = f.spec.platform.broker.expect("a broker");
        assert_eq!(b.listen.port(), 2883);
        assert_eq!(b.users[0].username, "dev");
        assert_eq!((b.max_queued, b.max_packet), (10, 4096));
    }

    #[test]
    fn no_broker_unless_asked() {
        assert!(
            load("  threads: 1\n")
                .expect("valid")
                .spec
                .platform
                .broker
                .is_none()
        );
    }

    #[test]
    fn a_plain_password_is_refused_with_its_field() {
        let e = load("  broker:\n    users: [{ username: dev, sha256: secret }]\n")
            .expect_err("refused")
            .to_string();
        assert!(e.contains("platform.broker.users[0].sha256"), "{e}");
    }
}
