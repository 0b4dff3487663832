//! `GET /api/v1/tap/{pipeline}?stage=…&limit=N&timeout_ms=T`: live records of a
//! pipeline from every worker that serves it, merged into one NDJSON stream — the
//! control plane reaches the workers over the mesh (mTLS), so that `etlmesh tap`
//! needs no certificate. Lines are passed whole; a worker that fails adds a line
//! `{"tap_error": "…"}`. The stream ends after `limit` records, at the timeout, or
//! when the client hangs up (the workers' taps close with it).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use etlmesh_http::encode_component;
use etlmesh_proto::tap::TapQuery;
use http::{HeaderValue, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::api::ControlState;
use crate::refusal::Refusal;

/// A line longer than this from a worker is dropped (a record is at most 1 MiB).
const MAX_LINE: usize = 2 << 20;

pub(crate) async fn tap(
    State(st): State<Arc<ControlState>>,
    Path(pipeline): Path<String>,
    Query(q): Query<TapQuery>,
) -> Response {
    let serving: Vec<(String, String)> = st
        .registry
        .endpoints()
        .into_iter()
        .filter(|e| e.pipelines.iter().any(|p| p.name == pipeline))
        .map(|e| (e.id, e.address))
        .collect();
    if serving.is_empty() {
        return Refusal::NoWorker(pipeline).into_response();
    }
    let (stage, limit, timeout) = (q.stage(), q.limit(), q.wait());
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .build(etlmesh_tls::connector(Duration::from_secs(2), false));
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let ids: Vec<String> = serving.iter().map(|(id, _)| id.clone()).collect();
    for (id, address) in serving {
        let url = format!(
            "{}/v1/tap/{}?stage={}&limit={limit}&timeout_ms={}",
            address.trim_end_matches('/'),
            encode_component(&pipeline),
            encode_component(stage),
            timeout.as_millis()
        );
        tokio::spawn(relay(client.clone(), id, url, tx.clone()));
    }
    drop(tx);
    tracing::info!(%pipeline, %stage, limit, workers = %ids.join(","), "tap opened");
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = futures::stream::unfold((rx, 0usize), move |(mut rx, shown)| async move {
        if shown >= limit {
            return None;
        }
        let line = tokio::time::timeout_at(deadline, rx.recv()).await.ok()??;
        let counted = usize::from(!line.starts_with(b"{\"tap_error\""));
        Some((Ok::<_, Infallible>(line), (rx, shown + counted)))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    if let Ok(v) = HeaderValue::from_str(&ids.join(",")) {
        resp.headers_mut().insert("etlmesh-tap-workers", v);
    }
    resp
}

fn error_line(id: &str, message: &str) -> Bytes {
    let v = serde_json::json!({ "tap_error": format!("worker {id}: {message}") });
    Bytes::from(format!("{v}\n"))
}

/// One worker's tap, passed on line by line until it ends or nobody reads.
async fn relay(
    client: Client<etlmesh_tls::MeshConnector, Empty<Bytes>>,
    id: String,
    url: String,
    tx: mpsc::Sender<Bytes>,
) {
    let resp = match url.parse::<http::Uri>() {
        Ok(uri) => client
            .get(uri)
            .await
            .map_err(|e| etlmesh_http::error_chain(&e)),
        Err(e) => Err(e.to_string()),
    };
    let resp = match resp {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let _ = tx
                .send(error_line(&id, &format!("answered {}", r.status())))
                .await;
            return;
        }
        Err(e) => {
            let _ = tx.send(error_line(&id, &e)).await;
            return;
        }
    };
    let mut body = resp.into_body();
    let mut partial = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(f) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
            Err(e) => {
                let _ = tx.send(error_line(&id, &e.to_string())).await;
                return;
            }
        };
        partial.extend_from_slice(&data);
        while let Some(at) = partial.iter().position(|b| *b == b'\n') {
            let line = partial.split_to(at + 1).freeze();
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if partial.len() > MAX_LINE {
            partial.clear();
        }
    }
}
