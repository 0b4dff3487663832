//! Broker addresses: `mqtt://[user[:password]@]host[:port]` (port 1883 by default), or
//! `mqtts://…` for TLS (port 8883 by default), and the client options they give.

use crate::MqttError;

/// Where a broker is and how to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User name and password, if the broker asks for them.
    pub credentials: Option<(String, String)>,
    /// TLS (`mqtts://`).
    pub tls: bool,
}

impl Broker {
    /// Parses `mqtt://[user[:password]@]host[:port]`.
    pub fn parse(url: &str) -> Result<Self, MqttError> {
        let bad = |message: &str| MqttError::BadBroker {
            url: url.to_string(),
            message: message.to_string(),
        };
        let mut tls = false;
        let rest = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => rest,
            Some(("mqtts" | "ssl", rest)) => {
                tls = true;
                rest
            }
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "scheme `{scheme}` is not supported; write mqtt://host:1883"
                )));
            }
            None => url,
        };
        let (credentials, hostport) = match rest.rsplit_once('@') {
            Some((cred, hp)) => {
                let (user, pass) = cred.split_once(':').unwrap_or((cred, ""));
                (Some((user.to_string(), pass.to_string())), hp)
            }
            None => (None, rest),
        };
        let hostport = hostport.trim_end_matches('/');
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad(&format!("`{p}` is not a port number")))?,
            ),
            None => (hostport, if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() {
            return Err(bad("no host; write mqtt://host:1883"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            credentials,
            tls,
        })
    }

    /// The TLS transport for `mqtts://`: the broker's certificate is checked against
    /// the CA certificates (PEM) in `ca_file`.
    pub fn transport(
        &self,
        ca_file: Option<&std::path::Path>,
    ) -> Result<rumqttc::Transport, MqttError> {
        if !self.tls {
            return Ok(rumqttc::Transport::Tcp);
        }
        let Some(path) = ca_file else {
            return Err(MqttError::Options(format!(
                "broker {}: mqtts:// needs the CA certificate that signed the broker's: set `ca_file`",
                self.address()
            )));
        };
        let ca = std::fs::read(path)
            .map_err(|e| MqttError::Options(format!("ca_file {}: {e}", path.display())))?;
        // One crypto provider for the process (ring, which the rest of etlmesh uses).
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Simple {
                ca,
                alpn: None,
                client_auth: None,
            },
        ))
    }

    /// MQTT 5 client options for this broker.
    pub fn options_v5(&self, client_id: &str) -> rumqttc::v5::MqttOptions {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, &self.host, self.port);
        if let Some((u, p)) = &self.credentials {
            o.set_credentials(u, p);
        }
        o.set_keep_alive(std::time::Duration::from_secs(15));
        o
    }

    /// `host:port`, for messages.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Client options for this broker.
    pub fn options(&self, client_id: &str) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(client_id, &self.host, self.port);
        if let Some((u, p)) = &self.credentials {
            o.set_credentials(u, p);
        }
        o.set_keep_alive(std::time::Duration::from_secs(15));
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_refuses_what_it_cannot_use() {
        assert_eq!(
            Broker::parse("mqtt://u:p@example.org:8883").expect("ok"),
            Broker {
                host: "example.org".into(),
                port: 8883,
                credentials: Some(("u".into(), "p".into())),
                tls: false,
            }
        );
        assert_eq!(Broker::parse("127.0.0.1").expect("ok").port, 1883);
        assert!(Broker::parse("http://x").is_err());
        assert!(Broker::parse("mqtt://x:notaport").is_err());
        assert!(Broker::parse("mqtt://").is_err());
    }
}
