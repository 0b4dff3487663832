//! HTTP plumbing shared by the mesh's processes: a small JSON client ([`JsonClient`])
//! for the control-plane protocol, API errors ([`ApiError`]: status, code and JSON answer decided per variant), serving
//! ([`serve`]) and stopping in order ([`shutdown`]), and the log shipper ([`logship`]).

mod error;
pub mod logship;
pub mod serve;
pub mod shutdown;

pub use error::ApiError;
use error::error_response;
pub use etlmesh_tls::error_chain;

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Errors of [`JsonClient`].
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not valid.
    #[error("bad URL {url}: {message}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The peer could not be reached, or the exchange failed.
    #[error("{url}: {message}")]
    Transport {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The peer answered with an error status.
    #[error("{url}: {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: StatusCode,
        /// The body, as text.
        body: String,
    },
    /// The answer is not the JSON expected.
    #[error("{url}: unexpected answer: {message}")]
    Decode {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
}

impl HttpError {
    /// The status, when the peer answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A JSON-over-HTTP client with a per-request timeout. `https://` URLs are mesh hops:
/// mTLS with this process's mesh identity ([`etlmesh_tls::install`]).
#[derive(Clone, Debug)]
pub struct JsonClient {
    client: Client<etlmesh_tls::MeshConnector, Full<Bytes>>,
    timeout: Duration,
    bearer: Option<String>,
}

impl JsonClient {
    /// A client whose requests time out after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new())
                .build(etlmesh_tls::connector(timeout, false)),
            timeout,
            bearer: None,
        }
    }

    /// A client for a server outside the mesh whose `https://` certificate is in (or
    /// signed by one in) the PEM file `ca`: a gateway's public TLS listener.
    pub fn trusting(
        timeout: Duration,
        ca: &std::path::Path,
    ) -> Result<Self, etlmesh_tls::TlsError> {
        Ok(Self {
            client: Client::builder(TokioExecutor::new())
                .build(etlmesh_tls::connector_trusting(ca, timeout)?),
            timeout,
            bearer: None,
        })
    }

    /// Sends `Authorization: Bearer TOKEN` with every request (a gateway's API token).
    pub fn with_bearer(mut self, token: Option<String>) -> Self {
        self.bearer = token.filter(|t| !t.is_empty());
        self
    }

    /// Sends `body` (or nothing) and reads a JSON answer (`()` for none).
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        url: &str,
        body: Option<&B>,
    ) -> Result<T, HttpError> {
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| HttpError::Decode {
                url: url.into(),
                message: e.to_string(),
            })?,
            None => Vec::new(),
        };
        let (status, body) = self.send(method, url, Bytes::from(bytes)).await?;
        if !status.is_success() {
            return Err(HttpError::Status {
                url: url.into(),
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let body = if body.is_empty() {
            Bytes::from_static(b"null")
        } else {
            body
        };
        serde_json::from_slice(&body).map_err(|e| HttpError::Decode {
            url: url.into(),
            message: e.to_string(),
        })
    }

    /// Sends `body` as JSON and returns the status and body as they are, whatever the
    /// status (for passing answers through).
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        self.send_accepting(method, url, body, None)
            .await
            .map(|(status, _, body)| (status, body))
    }

    /// As [`JsonClient::send`], asking for an answer in `accept`; returns its headers too.
    pub async fn send_accepting(
        &self,
        method: Method,
        url: &str,
        body: Bytes,
        accept: Option<&str>,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), HttpError> {
        let mut req = Request::builder()
            .method(method)
            .uri(url)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        if let Some(t) = &self.bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(body)).map_err(|e| HttpError::Url {
            url: url.into(),
            message: e.to_string(),
        })?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Transport {
                    url: url.into(),
                    message: error_chain(&e),
                })?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| HttpError::Transport {
                    url: url.into(),
                    message: e.to_string(),
                })?
                .to_bytes();
            Ok::<_, HttpError>((status, headers, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HttpError::Transport {
                url: url.into(),
                message: format!("no answer within {:?}", self.timeout),
            })?
    }

    /// GET a JSON document.
    pub async fn get<T: DeserializeOwned>(&self, url: &str) -> Result<T, HttpError> {
        self.call::<(), T>(Method::GET, url, None).await
    }
}

/// Turns Nagle's algorithm off on an accepted connection: small writes (headers, the
/// end of a body) must not wait for the peer's delayed ACK, which costs up to 40 ms.
pub fn no_delay(stream: &mut tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
}

/// This hop's span for a request: a child of its `traceparent` (whose span id is
/// returned as the parent), or the root of a new trace when it has none or a
/// malformed one.
pub fn server_span(h: &http::HeaderMap) -> (etlmesh_telemetry::TraceContext, Option<u64>) {
    let parent = h
        .get(etlmesh_proto::headers::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(etlmesh_telemetry::TraceContext::parse);
    match parent {
        Some(p) => (p.child(), Some(p.span_id)),
        None => (etlmesh_telemetry::TraceContext::new_root(), None),
    }
}

/// The token of an `Authorization: Bearer TOKEN` header, if the request has one.
pub fn bearer_token(h: &http::HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// A JSON response.
pub fn json_response<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut resp = Response::new(Body::from(body));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
            None,
        ),
    }
}

/// A router that serves only `GET /metrics` from `registry` (for a process whose API
/// is not HTTP, such as the broker).
pub fn metrics_router(registry: etlmesh_telemetry::metrics::SharedRegistry) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || std::future::ready(metrics_response(&registry))),
    )
}

/// A Prometheus `/metrics` response: `registry` in the OpenMetrics text format.
pub fn metrics_response(registry: &etlmesh_telemetry::metrics::SharedRegistry) -> Response {
    let text = etlmesh_telemetry::metrics::render(registry);
    let mut resp = Response::new(Body::from(text));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

/// `s` percent-encoded for one path segment or query value (unreserved bytes kept).
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
