//! Sending one request through a pipeline's route: retries, the deadline, and failing
//! fast when no worker is left. Shared by the HTTP front door and Arrow Flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use etlmesh_http::ApiError;
use etlmesh_telemetry::TraceContext;
use http::{HeaderMap, HeaderValue, StatusCode};
use tower::{BoxError, ServiceExt};

use crate::Gateway;
use crate::endpoint::{Payload, WorkerRequest, WorkerResponse};
use crate::metrics::PipelineLabels;
use crate::route::{RetryPolicy, Route};

/// Why a request got no worker's answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// No worker ever served the pipeline.
    #[error("no pipeline named `{name}`; the mesh serves: {}", if known.is_empty() { "nothing yet".to_string() } else { known.join(", ") })]
    UnknownPipeline { name: String, known: Vec<String> },
    /// None of its workers is ready.
    #[error("no worker of `{0}` is ready; retry after the Retry-After delay")]
    NoWorker(String),
    /// Every worker is busy and the queue is full.
    #[error(
        "every worker of `{0}` is busy and the queue is full; retry after the Retry-After delay"
    )]
    Overloaded(String),
    /// The deadline passed.
    #[error("no answer within the deadline of {} ms; give a longer one with `etlmesh-timeout-ms`, or send fewer records", .0.as_millis())]
    Deadline(Duration),
    /// The workers could not be reached, retries included.
    #[error("the workers of `{0}` could not be reached ({1}); retry later")]
    Unreachable(String, String),
    /// Too many requests already wait for a worker to start.
    #[error(
        "`{0}` has no worker yet and {1} requests already wait for one to start; retry after the Retry-After delay"
    )]
    ActivationFull(String, usize),
}

impl ApiError for Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::UnknownPipeline { .. } => StatusCode::NOT_FOUND,
            Refusal::NoWorker(_) | Refusal::Overloaded(_) | Refusal::ActivationFull(..) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::Deadline(_) => StatusCode::GATEWAY_TIMEOUT,
            Refusal::Unreachable(..) => StatusCode::BAD_GATEWAY,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Refusal::UnknownPipeline { .. } => "unknown_pipeline",
            Refusal::NoWorker(_) => "no_ready_worker",
            Refusal::Overloaded(_) => "overloaded",
            Refusal::Deadline(_) => "deadline_exceeded",
            Refusal::ActivationFull(..) => "activation_queue_full",
            Refusal::Unreachable(..) => "worker_unreachable",
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    use crate::route::RouteOptions;
    use crate::{Bound, GatewayOptions};

    async fn gateway(tune: impl FnOnce(&mut GatewayOptions)) -> Bound {
        let mut o = GatewayOptions::new("127.0.0.1:0".parse().expect("addr"), "http://127.0.0.1:9");
        o.flight = None;
        tune(&mut o);
        crate::bind(o).await.expect("binds")
    }

    async fn send_to(gw: &Arc<Gateway>, route: Arc<Route>, timeout: Duration) -> Refusal {
        let payload = Payload::Buffered(Bytes::from_static(b"a\n1\n"));
        match gw
            .dispatch(
                route,
                HeaderMap::new(),
                payload,
                &TraceContext::new_root(),
                timeout,
            )
            .await
        {
            Ok(_) => panic!("no worker answered, yet the request got an answer"),
            Err(r) => r,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pipeline_without_workers_is_activated_and_fails_at_the_activation_wait() {
        let mut bound = gateway(|o| o.activation_wait = Duration::from_secs(2)).await;
        let route = Arc::new(Route::new("p", RouteOptions::default()));
        let started = tokio::time::Instant::now();
        let refusal = send_to(&bound.gateway, route.clone(), Duration::from_secs(10)).await;
        assert!(
            matches!(refusal, Refusal::NoWorker(ref p) if p == "p"),
            "{refusal:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(
            bound.activations.try_recv().ok().as_deref(),
            Some("p"),
            "the control plane is asked for a worker at once"
        );
        assert_eq!(route.held.load(Ordering::Relaxed), 0, "nothing stays held");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_shorter_than_the_activation_wait_is_a_deadline() {
        let bound = gateway(|o| o.activation_wait = Duration::from_secs(30)).await;
        let route = Arc::new(Route::new("p", RouteOptions::default()));
        let started = tokio::time::Instant::now();
        let refusal = send_to(&bound.gateway, route, Duration::from_millis(300)).await;
        assert!(
            matches!(refusal, Refusal::Deadline(d) if d == Duration::from_millis(300)),
            "{refusal:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn held_requests_past_the_activation_queue_are_refused_at_once() {
        let bound = gateway(|o| {
            o.activation_queue = 1;
            o.activation_wait = Duration::from_secs(5);
        })
        .await;
        let route = Arc::new(Route::new("p", RouteOptions::default()));
        let gw = bound.gateway.clone();
        let first = tokio::spawn({
            let (gw, route) = (gw.clone(), route.clone());
            async move { send_to(&gw, route, Duration::from_secs(10)).await }
        });
        let second = tokio::spawn({
            let (gw, route) = (gw.clone(), route.clone());
            async move { send_to(&gw, route, Duration::from_secs(10)).await }
        });
        // Both are held before either times out.
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        let third = send_to(&gw, route.clone(), Duration::from_secs(10)).await;
        assert!(matches!(third, Refusal::ActivationFull(_, 1)), "{third:?}");
        assert_eq!(started.elapsed(), Duration::ZERO, "refused without waiting");
        let (a, b) = (first.await.expect("first"), second.await.expect("second"));
        let full = [&a, &b]
            .iter()
            .filter(|r| matches!(r, Refusal::ActivationFull(..)))
            .count();
        assert_eq!(
            full, 1,
            "one of two is held, the other refused: {a:?} {b:?}"
        );
    }

    #[tokio::test]
    async fn a_worker_that_cannot_be_reached_is_unreachable_after_its_retries() {
        let bound = gateway(|o| o.max_retries = 2).await;
        let route = Arc::new(Route::new("p", RouteOptions::default()));
        // Nothing listens on port 9 of the loopback: every attempt is refused.
        route.insert(
            crate::endpoint::Endpoint::new(
                "w1",
                "http://127.0.0.1:9",
                crate::endpoint::h2_client(),
                Default::default(),
            ),
            Arc::new(|_, _| {}),
        );
        let refusal = send_to(&bound.gateway, route, Duration::from_secs(10)).await;
        assert!(
            matches!(refusal, Refusal::Unreachable(ref p, _) if p == "p"),
            "{refusal:?}"
        );
        assert_eq!(refusal.status(), StatusCode::BAD_GATEWAY);
    }
}
