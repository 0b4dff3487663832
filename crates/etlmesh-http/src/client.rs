//! A small JSON client for the control-plane protocol: plain HTTP or mTLS, a timeout
//! per call, errors that say which URL failed and how.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error_chain;

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
