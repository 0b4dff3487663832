//! Where the Kubernetes API server is and how to log in: in a pod, its service account
//! (`KUBERNETES_SERVICE_HOST`, the token, CA and namespace under
//! `/var/run/secrets/kubernetes.io/serviceaccount/`); outside, the current context of
//! the kubeconfig (`KUBECONFIG`, else `~/.kube/config`) with a token, a token file or a
//! client certificate. Exec credential plugins and auth providers are not run: give
//! the control plane a token instead.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

/// The service account's files in a pod.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// How requests prove who sends them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// None (a test server).
    None,
    /// A bearer token.
    Token(String),
    /// A bearer token read from this file at every request (service-account tokens
    /// are rotated by the kubelet).
    TokenFile(PathBuf),
    /// A client certificate and its key (PEM).
    ClientCertificate {
        /// The certificate chain.
        cert: Vec<u8>,
        /// The key.
        key: Vec<u8>,
    },
}

/// A cluster to talk to.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The API server's URL (`https://…`, or `http://` for a test server).
    pub server: String,
    /// CA certificates (PEM) the server's certificate is checked against; the
    /// system's roots when `None`.
    pub ca: Option<Vec<u8>>,
    /// Skip the check of the server's certificate (kubeconfig's
    /// `insecure-skip-tls-verify`).
    pub insecure: bool,
    /// Who is asking.
    pub credentials: Credentials,
    /// The namespace when none is given.
    pub default_namespace: String,
}

impl ClusterConfig {
    /// A server without credentials, in namespace `default`.
    pub fn new(server: &str) -> Self {
        Self {
            server: server.trim_end_matches('/').to_string(),
            ca: None,
            insecure: false,
            credentials: Credentials::None,
            default_namespace: "default".into(),
        }
    }

    /// The pod's service account when there is one, else the kubeconfig.
    pub fn infer() -> Result<Self, String> {
        if let Some(c) = in_cluster(Path::new(SERVICE_ACCOUNT))? {
            return Ok(c);
        }
        let path = match std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
            Some(v) => std::env::split_paths(&v).next().unwrap_or_default(),
            None => match std::env::var_os("HOME") {
                Some(home) => PathBuf::from(home).join(".kube").join("config"),
                None => {
                    return Err(
                        "not in a cluster, and no KUBECONFIG or HOME to find a kubeconfig".into(),
                    );
                }
            },
        };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "not in a cluster (no {SERVICE_ACCOUNT}/token), and the kubeconfig {}: {e}",
                path.display()
            )
        })?;
        from_kubeconfig(&text, &path)
    }
}

/// The pod's service account, when `dir` holds its token and the API server's address
/// is in the environment.
fn in_cluster(dir: &Path) -> Result<Option<ClusterConfig>, String> {
    let token = dir.join("token");
    let (Ok(host), Ok(port)) = (
        std::env::var("KUBERNETES_SERVICE_HOST"),
        std::env::var("KUBERNETES_SERVICE_PORT"),
    ) else {
        return Ok(None);
    };
    if !token.is_file() {
        return Ok(None);
    }
    let ca =
        std::fs::read(dir.join("ca.crt")).map_err(|e| format!("{}/ca.crt: {e}", dir.display()))?;
    let namespace = std::fs::read_to_string(dir.join("namespace"))
        .map(|n| n.trim().to_string())
        .unwrap_or_else(|_| "default".into());
    // An IPv6 address needs brackets in a URL.
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Ok(Some(ClusterConfig {
        server: format!("https://{host}:{port}"),
        ca: Some(ca),
        insecure: false,
        credentials: Credentials::TokenFile(token),
        default_namespace: namespace,
    }))
}

#[derive(Debug, Deserialize)]
struct Kubeconfig {
    #[serde(rename = "current-context")]
    current_context: Option<String>,
    #[serde(default)]
    clusters: Vec<Named<Cluster>>,
    #[serde(default)]
    users: Vec<Named<User>>,
    #[serde(default)]
    contexts: Vec<Named<Context>>,
}

#[derive(Debug, Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    value: T,
}

#[derive(Debug, Deserialize)]
struct Cluster {
    server: String,
    #[serde(rename = "certificate-authority")]
    ca_file: Option<PathBuf>,
    #[serde(rename = "certificate-authority-data")]
    ca_data: Option<String>,
    #[serde(rename = "insecure-skip-tls-verify", default)]
    insecure: bool,
}

#[derive(Debug, Default, Deserialize)]
struct User {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
    #[serde(rename = "client-certificate")]
    cert_file: Option<PathBuf>,
    #[serde(rename = "client-certificate-data")]
    cert_data: Option<String>,
    #[serde(rename = "client-key")]
    key_file: Option<PathBuf>,
    #[serde(rename = "client-key-data")]
    key_data: Option<String>,
    exec: Option<serde::de::IgnoredAny>,
    #[serde(rename = "auth-provider")]
    auth_provider: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
struct Context {
    cluster: String,
    user: Option<String>,
    namespace: Option<String>,
}

/// The current context of a kubeconfig read from `path` (relative file names in it
/// are relative to its directory).
pub fn from_kubeconfig(text: &str, path: &Path) -> Result<ClusterConfig, String> {
    let at = |m: String| format!("kubeconfig {}: {m}", path.display());
    let kc: Kubeconfig = serde_saphyr::from_str(text).map_err(|e| at(e.to_string()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let name = kc
        .current_context
        .clone()
        .or_else(|| kc.contexts.first().map(|c| c.name.clone()))
        .ok_or_else(|| at("no current-context and no context".into()))?;
    let ctx = &kc
        .contexts
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| at(format!("no context `{name}`")))?
        .value;
    let cluster = &kc
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .ok_or_else(|| {
            at(format!(
                "context `{name}` names cluster `{}`, which is not there",
                ctx.cluster
            ))
        })?
        .value;
    let empty = User::default();
    let user = match &ctx.user {
        Some(u) => {
            &kc.users
                .iter()
                .find(|x| &x.name == u)
                .ok_or_else(|| {
                    at(format!(
                        "context `{name}` names user `{u}`, which is not there"
                    ))
                })?
                .value
        }
        None => &empty,
    };
    let read = |p: &Path| {
        let p = base.join(p);
        std::fs::read(&p).map_err(|e| at(format!("{}: {e}", p.display())))
    };
    let data = |d: &str, what: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(d.trim())
            .map_err(|e| at(format!("{what} is not base64: {e}")))
    };
    let ca = match (&cluster.ca_data, &cluster.ca_file) {
        (Some(d), _) => Some(data(d, "certificate-authority-data")?),
        (None, Some(f)) => Some(read(f)?),
        (None, None) => None,
    };
    let credentials = if let Some(t) = &user.token {
        Credentials::Token(t.clone())
    } else if let Some(f) = &user.token_file {
        Credentials::TokenFile(base.join(f))
    } else if user.cert_data.is_some() || user.cert_file.is_some() {
        let cert = match (&user.cert_data, &user.cert_file) {
            (Some(d), _) => data(d, "client-certificate-data")?,
            (None, Some(f)) => read(f)?,
            _ => unreachable!("one of them is there"),
        };
        let key = match (&user.key_data, &user.key_file) {
            (Some(d), _) => data(d, "client-key-data")?,
            (None, Some(f)) => read(f)?,
            (None, None) => return Err(at("a client certificate without a client key".into())),
        };
        Credentials::ClientCertificate { cert, key }
    } else if user.exec.is_some() || user.auth_provider.is_some() {
        return Err(at(format!(
            "user `{}` logs in through an exec plugin or auth provider, which etlmesh does not run; give it a service-account token (`token` or `tokenFile`), or run the control plane in the cluster",
            ctx.user.as_deref().unwrap_or("")
        )));
    } else {
        Credentials::None
    };
    Ok(ClusterConfig {
        server: cluster.server.trim_end_matches('/').to_string(),
        ca,
        insecure: cluster.insecure,
        credentials,
        default_namespace: ctx.namespace.clone().unwrap_or_else(|| "default".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECONFIG: &str = r#"
apiVersion: v1
kind: Config
current-context: prod
clusters:
  - name: c1
    cluster: { server: "https://10.0.0.1:6443/", certificate-authority-data: "Q0E=" }
users:
  - name: bot
    user: { tokenFile: bot.token }
  - name: human
    user:
      exec: { command: aws, args: [eks, get-token] }
contexts:
  - name: prod
    context: { cluster: c1, user: bot, namespace: data }
  - name: dev
    context: { cluster: c1, user: human }
"#;

    #[test]
    fn the_current_context_gives_server_ca_token_and_namespace() {
        let c = from_kubeconfig(KUBECONFIG, Path::new("/etc/kube/config")).expect("valid");
        assert_eq!(c.server, "https://10.0.0.1:6443");
        assert_eq!(c.ca.as_deref(), Some(&b"CA"[..]));
        assert_eq!(
            c.credentials,
            Credentials::TokenFile("/etc/kube/bot.token".into())
        );
        assert_eq!(c.default_namespace, "data");
    }

    #[test]
    fn an_exec_plugin_is_refused_with_what_to_do() {
        let text = KUBECONFIG.replace("current-context: prod", "current-context: dev");
        let e = from_kubeconfig(&text, Path::new("k")).expect_err("exec");
        assert!(e.contains("exec plugin") && e.contains("token"), "{e}");
    }

    #[test]
    fn a_missing_cluster_is_named() {
        let text = KUBECONFIG.replace("cluster: c1, user: bot", "cluster: c9, user: bot");
        let e = from_kubeconfig(&text, Path::new("k")).expect_err("no such cluster");
        assert!(e.contains("`c9`"), "{e}");
    }

    #[test]
    fn a_pod_without_a_service_account_is_not_in_a_cluster() {
        let dir = tempfile::tempdir().expect("tmp");
        assert!(in_cluster(dir.path()).expect("fine").is_none());
    }
}
