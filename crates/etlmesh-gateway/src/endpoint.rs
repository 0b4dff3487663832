//! One worker as a tower service: a request to `POST /v1/pipelines/{pipeline}` over
//! a shared HTTP/2 client (one multiplexed connection per worker).

use parking_lot::Mutex;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, Request, Response, Uri};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use tower::{BoxError, Service};

/// A request body the gateway streams to a worker.
pub type StreamBody = UnsyncBoxBody<Bytes, BoxError>;

/// What a request carries to a worker.
pub enum Payload {
    /// Held whole: may be sent again on a retry.
    Buffered(Bytes),
    /// Streamed through once: no retry.
    Streaming(Mutex<Option<StreamBody>>),
}

/// A transform request on its way to some worker.
pub struct WorkerRequest {
    /// The pipeline.
    pub pipeline: Arc<str>,
    /// Headers passed on (content type, accept, deadline, trace context).
    pub headers: HeaderMap,
    /// The body.
    pub payload: Payload,
    /// Attempts so far.
    pub attempt: u32,
    /// When the client stops waiting; workers get the time left.
    pub deadline: tokio::time::Instant,
    /// A retriable request's answer of up to this many bytes (by its content-length)
    /// is read whole before it counts as answered: a worker dying in the middle of
    /// its answer is then retried, not a cut body for the client.
    pub hold_answer: usize,
}

impl WorkerRequest {
    /// A copy for a retry, when the body was buffered.
    pub fn try_clone(&self) -> Option<Self> {
        match &self.payload {
            Payload::Buffered(b) => Some(Self {
                pipeline: self.pipeline.clone(),
                headers: self.headers.clone(),
                payload: Payload::Buffered(b.clone()),
                attempt: self.attempt,
                deadline: self.deadline,
                hold_answer: self.hold_answer,
            }),
            Payload::Streaming(_) => None,
        }
    }

    fn body(&self) -> StreamBody {
        match &self.payload {
            Payload::Buffered(b) => http_body_util::Full::new(b.clone())
                .map_err(|e| match e {})
                .boxed_unsync(),
            Payload::Streaming(s) => s.lock().take().unwrap_or_else(|| {
                http_body_util::Empty::new()
                    .map_err(|e| match e {})
                    .boxed_unsync()
            }),
        }
    }
}

/// The HTTP/2 client shared by every endpoint.
pub type H2Client = Client<etlmesh_tls::MeshConnector, StreamBody>;

/// How often a connection to a worker is pinged, and how long the answer may take: a
/// worker whose link went silent (cut, host gone — no reset comes) is known dead
/// within their sum, and the requests on it fail then and are retried elsewhere,
/// instead of waiting out their deadline.
const PING_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
const PING_ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// A client speaking HTTP/2: over mTLS with this process's mesh identity to
/// `https://` workers, with prior knowledge (h2c) to `http://` ones.
pub fn h2_client() -> H2Client {
    let connector = etlmesh_tls::connector(std::time::Duration::from_secs(2), true);
    Client::builder(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .http2_only(true)
        .http2_keep_alive_interval(PING_EVERY)
        .http2_keep_alive_timeout(PING_ANSWER_WITHIN)
        .http2_keep_alive_while_idle(true)
        .build(connector)
}

/// One worker.
#[derive(Clone)]
pub struct Endpoint {
    /// The worker's id.
    pub id: Arc<str>,
    base: Arc<str>,
    client: H2Client,
    /// Its answers 200 for this pipeline, looked up once (not per request).
    ok: Counter,
}

impl Endpoint {
    /// The worker `id` at `address` (`http://host:port`); `ok` counts its 200 answers.
    pub fn new(id: &str, address: &str, client: H2Client, ok: Counter) -> Self {
        Self {
            id: Arc::from(id),
            base: Arc::from(address.trim_end_matches('/')),
            client,
            ok,
        }
    }
}

/// The body of a worker's answer: read whole, or streaming from the worker.
pub type AnswerBody = UnsyncBoxBody<Bytes, BoxError>;

/// A worker's answer, with the worker's id.
pub struct WorkerResponse {
    /// The response; its body was read whole or streams from the worker.
    pub response: Response<AnswerBody>,
    /// Which worker answered.
    pub worker: Arc<str>,
    /// The worker's counter of 200 answers for the pipeline.
    pub ok: Counter,
}

impl Service<WorkerRequest> for Endpoint {
    type Response = WorkerResponse;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<WorkerResponse, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: WorkerRequest) -> Self::Future {
        let uri: Result<Uri, _> = format!("{}/v1/pipelines/{}", self.base, req.pipeline).parse();
        let client = self.client.clone();
        let worker = self.id.clone();
        let ok = self.ok.clone();
        let body = req.body();
        let hold = match req.payload {
            Payload::Buffered(_) => req.hold_answer,
            Payload::Streaming(_) => 0,
        };
        let mut headers = req.headers;
        let left = req
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        headers.insert(
            etlmesh_proto::headers::DEADLINE_MS,
            (left.as_millis() as u64).into(),
        );
        Box::pin(async move {
            let mut r = Request::post(uri?).body(body)?;
            *r.headers_mut() = headers;
            let response = client.request(r).await?;
            // No `?` on a `BoxError` here: it trips "`From` is not general enough" in
            // the callers' `Send` futures.
            let response = match answer(response, hold).await {
                Ok(r) => r,
                Err(e) => return Err(e),
            };
            Ok(WorkerResponse {
                response,
                worker,
                ok,
            })
        })
    }
}

/// A named function, not a closure: keeps the futures that hold the body `Send` for
/// every lifetime (a closure here trips "`From` is not general enough").
fn boxed(e: hyper::Error) -> BoxError {
    Box::new(e)
}

/// The answer's body: read whole when its declared length is at most `hold` bytes
/// (an error reading it is then the call's error, which the retry policy sees),
/// otherwise passed on as it streams.
async fn answer(
    response: Response<Incoming>,
    hold: usize,
) -> Result<Response<AnswerBody>, BoxError> {
    let length = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let (parts, body) = response.into_parts();
    let body = match length {
        Some(n) if n <= hold => {
            let bytes = match body.collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => return Err(Box::new(e)),
            };
            http_body_util::Full::new(bytes)
                .map_err(|e| match e {})
                .boxed_unsync()
        }
        _ => body.map_err(boxed).boxed_unsync(),
    };
    Ok(Response::from_parts(parts, body))
}
