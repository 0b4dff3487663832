//! Sending one request through a pipeline's route: retries, the deadline, and failing
//! fast when no worker is left. Shared by the HTTP front door and Arrow Flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use etlmesh_telemetry::TraceContext;
use http::{HeaderMap, HeaderValue, StatusCode};
use tower::{BoxError, ServiceExt};

use crate::Gateway;
use crate::endpoint::{Payload, WorkerRequest, WorkerResponse};
use crate::metrics::PipelineLabels;
use crate::route::{RetryPolicy, Route};

/// Why a request got no worker's answer.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// No worker ever served the pipeline.
    UnknownPipeline { name: String, known: Vec<String> },
    /// None of its workers is ready.
    NoWorker(String),
    /// Every worker is busy and the queue is full.
    Overloaded(String),
    /// The deadline passed.
    Deadline(Duration),
    /// The workers could not be reached, retries included.
    Unreachable(String, String),
    /// Too many requests already wait for a worker to start.
    ActivationFull(String, usize),
}

impl Refusal {
    /// HTTP status, machine-readable code, and a message that says what to do.
    pub fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            Refusal::UnknownPipeline { name, known } => (
                StatusCode::NOT_FOUND,
                "unknown_pipeline",
                format!(
                    "no pipeline named `{name}`; the mesh serves: {}",
                    if known.is_empty() {
                        "nothing yet".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ),
            Refusal::NoWorker(name) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no_ready_worker",
                format!("no worker of `{name}` is ready; retry after the Retry-After delay"),
            ),
            Refusal::Overloaded(name) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "every worker of `{name}` is busy and the queue is full; retry after the Retry-After delay"
                ),
            ),
            Refusal::Deadline(d) => (
                StatusCode::GATEWAY_TIMEOUT,
                "deadline_exceeded",
                format!(
                    "no answer within the deadline of {} ms; give a longer one with `etlmesh-timeout-ms`, or send fewer records",
                    d.as_millis()
                ),
            ),
            Refusal::ActivationFull(name, n) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "activation_queue_full",
                format!(
                    "`{name}` has no worker yet and {n} requests already wait for one to start; retry after the Retry-After delay"
                ),
            ),
            Refusal::Unreachable(name, e) => (
                StatusCode::BAD_GATEWAY,
                "worker_unreachable",
                format!("the workers of `{name}` could not be reached ({e}); retry later"),
            ),
        }
    }
}

impl Gateway {
    /// The route of a pipeline with a ready worker.
    pub(crate) fn lookup(&self, name: &str) -> Result<Arc<Route>, Refusal> {
        let Some(route) = self.routes.get(name) else {
            let known = self
                .routes
                .pipelines()
                .into_iter()
                .map(|(i, _)| i.name)
                .collect();
            return Err(Refusal::UnknownPipeline {
                name: name.to_string(),
                known,
            });
        };
        if route.ready() == 0 && !route.scalable.load(Ordering::Relaxed) {
            return Err(Refusal::NoWorker(name.to_string()));
        }
        Ok(route)
    }

    /// Sends a request through `route`; `headers` are those passed to the worker.
    pub(crate) async fn dispatch(
        self: &Arc<Self>,
        route: Arc<Route>,
        mut headers: HeaderMap,
        payload: Payload,
        trace: &TraceContext,
        timeout: Duration,
    ) -> Result<WorkerResponse, Refusal> {
        let name = route.pipeline.to_string();
        route.requests.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + timeout;
        if route.ready() == 0 {
            self.activate(&route, deadline, timeout).await?;
        }
        let _in_flight = Counted::new(&route.in_flight);
        // `trace` is this gateway's span: the worker's parent.
        if let Ok(v) = HeaderValue::from_str(&trace.header()) {
            headers.insert(etlmesh_proto::headers::TRACEPARENT, v);
        }
        let req = WorkerRequest {
            pipeline: route.pipeline.clone(),
            headers,
            payload,
            attempt: 0,
            deadline,
            hold_answer: self.options.retry_buffer_bytes,
        };
        RetryPolicy::deposit(&self.budget);
        let metrics = self.metrics.clone();
        let label = PipelineLabels {
            pipeline: name.clone(),
        };
        let policy = RetryPolicy {
            budget: self.budget.clone(),
            left: self.options.max_retries,
            on_retry: Arc::new(move |granted| {
                if granted {
                    metrics.retries.get_or_create(&label).inc();
                } else {
                    metrics.budget_exhausted.get_or_create(&label).inc();
                }
            }),
        };
        let call = send(policy, route.service.clone(), req);
        // Requests waiting for a worker fail fast once none is left for a while —
        // unless the control plane scales the pipeline and brings one back.
        let mut ready = route.watch_ready();
        let scalable = route.scalable.load(Ordering::Relaxed);
        let gone = async {
            if scalable {
                return futures::future::pending().await;
            }
            loop {
                if ready.wait_for(|n| *n == 0).await.is_err() {
                    return futures::future::pending().await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                if *ready.borrow() == 0 {
                    return;
                }
            }
        };
        let result = tokio::select! {
            r = tokio::time::timeout(timeout, call) => r,
            () = gone => return Err(Refusal::NoWorker(name)),
        };
        match result {
            Err(_) => Err(Refusal::Deadline(timeout)),
            Ok(Err(e)) if e.is::<tower::load_shed::error::Overloaded>() => {
                self.metrics
                    .shed
                    .get_or_create(&PipelineLabels {
                        pipeline: name.clone(),
                    })
                    .inc();
                Err(Refusal::Overloaded(name))
            }
            Ok(Err(e)) => Err(Refusal::Unreachable(name, e.to_string())),
            Ok(Ok(r)) => Ok(r),
        }
    }
}

impl Gateway {
    /// Holds a request while the pipeline has no ready worker: asks the control plane
    /// for one and waits, within the deadline and the bound on held requests.
    async fn activate(
        &self,
        route: &Route,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<(), Refusal> {
        let name = route.pipeline.to_string();
        let _held = Counted::new(&route.held);
        let held = route.held.load(Ordering::Relaxed) as usize;
        if held > self.options.activation_queue {
            return Err(Refusal::ActivationFull(name, self.options.activation_queue));
        }
        // The reporter tells the control plane at once.
        let _ = self.activations.try_send(name.clone());
        let mut ready = route.watch_ready();
        let started = tokio::time::Instant::now();
        let until = deadline.min(started + self.options.activation_wait);
        match tokio::time::timeout_at(until, ready.wait_for(|n| *n > 0)).await {
            Ok(Ok(_)) => {
                tracing::debug!(pipeline = %name, waited_ms = started.elapsed().as_millis() as u64, "held request released: a worker is ready");
                Ok(())
            }
            _ => Err(if started.elapsed() >= timeout {
                Refusal::Deadline(timeout)
            } else {
                Refusal::NoWorker(name)
            }),
        }
    }
}

/// Counts one in an atomic until dropped.
struct Counted<'a>(&'a AtomicU32);

impl<'a> Counted<'a> {
    fn new(c: &'a AtomicU32) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Self(c)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The request through retries and the route, as a boxed future: naming the type here
/// keeps the callers' futures provably `Send`.
fn send(
    policy: RetryPolicy,
    service: crate::route::RouteService,
    req: WorkerRequest,
) -> futures::future::BoxFuture<'static, Result<WorkerResponse, BoxError>> {
    Box::pin(tower::retry::Retry::new(policy, service).oneshot(req))
}
