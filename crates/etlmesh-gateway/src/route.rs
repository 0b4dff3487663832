//! A pipeline's route: the workers that serve it behind a power-of-two-choices
//! balancer over peak-EWMA load, each with a concurrency limit and failure accrual,
//! in front of a bounded queue that sheds load when full; and the retry policy.

use parking_lot::Mutex;
use std::collections::HashSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tower::BoxError;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::Change;
use tower::limit::ConcurrencyLimit;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover};
use tower::load_shed::LoadShed;
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::BoxService;

use crate::accrual::{Accrual, AccrualPolicy, OnEject};
use crate::endpoint::{Endpoint, WorkerRequest, WorkerResponse};

/// Settings of every route.
#[derive(Debug, Clone, Copy)]
pub struct RouteOptions {
    /// Requests held waiting for a worker before new ones are shed (503).
    pub queue: usize,
    /// Requests in flight to one worker at most.
    pub endpoint_concurrency: usize,
    /// Failure accrual.
    pub accrual: AccrualPolicy,
    /// Peak-EWMA: the RTT assumed for a new endpoint.
    pub default_rtt: Duration,
    /// Peak-EWMA: the decay.
    pub decay: Duration,
}

impl Default for RouteOptions {
    fn default() -> Self {
        Self {
            queue: 256,
            endpoint_concurrency: 64,
            accrual: AccrualPolicy::default(),
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
        }
    }
}

type EndpointStack = ConcurrencyLimit<Accrual<Endpoint>>;

/// Endpoint changes as a [`tower::discover::Discover`] stream.
struct Changes(mpsc::Receiver<Change<String, EndpointStack>>);

impl Stream for Changes {
    type Item = Result<Change<String, EndpointStack>, Infallible>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|c| c.map(Ok))
    }
}

/// The service a request goes through: shed when the queue is full.
pub type RouteService =
    LoadShed<Buffer<WorkerRequest, BoxFuture<'static, Result<WorkerResponse, BoxError>>>>;

/// One pipeline's route.
pub struct Route {
    /// The pipeline.
    pub pipeline: Arc<str>,
    /// The balanced, queued service.
    pub service: RouteService,
    changes: mpsc::Sender<Change<String, EndpointStack>>,
    members: Mutex<HashSet<String>>,
    ready: AtomicUsize,
    ready_tx: watch::Sender<usize>,
    options: RouteOptions,
    /// The control plane scales this pipeline: with no worker, requests are held
    /// while one starts (activation) instead of refused.
    pub scalable: AtomicBool,
    /// Requests sent to a worker and not answered yet.
    pub in_flight: AtomicU32,
    /// Requests held for a worker to start.
    pub held: AtomicU32,
    /// Requests since start.
    pub requests: AtomicU64,
    /// Answers with a 5xx status since start.
    pub errors: AtomicU64,
    /// Requests by latency since start.
    pub latency: etlmesh_telemetry::metrics::BucketCounts,
    /// This pipeline's Prometheus handles, made on its first request.
    pub metrics: std::sync::OnceLock<crate::metrics::PipelineHandles>,
}

impl Route {
    /// A route with no endpoint yet. Must be called inside a Tokio runtime.
    pub fn new(pipeline: &str, options: RouteOptions) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let discover = PeakEwmaDiscover::new::<WorkerRequest>(
            Changes(rx),
            options.default_rtt,
            options.decay,
            CompleteOnResponse::default(),
        );
        let balance: Balance<_, WorkerRequest> = Balance::new(discover);
        let service = LoadShed::new(Buffer::new(BoxService::new(balance), options.queue));
        Self {
            pipeline: Arc::from(pipeline),
            service,
            changes: tx,
            members: Mutex::default(),
            ready: AtomicUsize::new(0),
            ready_tx: watch::channel(0).0,
            options,
            scalable: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            held: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Default::default(),
            metrics: std::sync::OnceLock::new(),
        }
    }

    /// This pipeline's load, for the control plane.
    pub fn load(&self) -> etlmesh_proto::PipelineLoad {
        etlmesh_proto::PipelineLoad {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            held: self.held.load(Ordering::Relaxed),
            requests_total: self.requests.load(Ordering::Relaxed),
            errors_total: self.errors.load(Ordering::Relaxed),
            latency_counts: self.latency.snapshot(),
        }
    }

    /// Ready endpoints.
    pub fn ready(&self) -> usize {
        self.ready.load(Ordering::Acquire)
    }

    /// Follows the number of ready endpoints.
    pub fn watch_ready(&self) -> watch::Receiver<usize> {
        self.ready_tx.subscribe()
    }

    fn set_ready(&self, n: usize) {
        self.ready.store(n, Ordering::Release);
        self.ready_tx.send_replace(n);
    }

    /// Whether `id` is in the route.
    pub fn contains(&self, id: &str) -> bool {
        self.members.lock().contains(id)
    }

    /// Adds an endpoint.
    pub fn insert(&self, endpoint: Endpoint, on_eject: OnEject) {
        let id = endpoint.id.to_string();
        let mut members = self.members.lock();
        if !members.insert(id.clone()) {
            return;
        }
        let stack = ConcurrencyLimit::new(
            Accrual::new(
                endpoint.clone(),
                endpoint.id.clone(),
                self.options.accrual,
                on_eject,
            ),
            self.options.endpoint_concurrency,
        );
        if self
            .changes
            .try_send(Change::Insert(id.clone(), stack))
            .is_err()
        {
            tracing::error!(pipeline = %self.pipeline, worker = %id, "endpoint change dropped: the balancer is not keeping up");
        }
        self.set_ready(members.len());
    }

    /// Removes an endpoint (requests in flight to it finish).
    pub fn remove(&self, id: &str) {
        let mut members = self.members.lock();
        if !members.remove(id) {
            return;
        }
        if self
            .changes
            .try_send(Change::Remove(id.to_string()))
            .is_err()
        {
            tracing::error!(pipeline = %self.pipeline, worker = %id, "endpoint change dropped: the balancer is not keeping up");
        }
        self.set_ready(members.len());
    }
}

/// Retries transforms (they are pure) on transport errors and on 502/503/504, under a
/// budget shared by the gateway, when the body was kept.
#[derive(Clone)]
pub struct RetryPolicy {
    /// The budget.
    pub budget: Arc<TpsBudget>,
    /// Retries left for this request.
    pub left: u32,
    /// Called on every retry (metrics), and when the budget refuses one.
    pub on_retry: Arc<dyn Fn(bool) + Send + Sync>,
}

impl RetryPolicy {
    /// A policy with the Linkerd defaults: 20 % of requests plus 10 per second, over 10 s.
    pub fn budget() -> Arc<TpsBudget> {
        Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2))
    }

    /// Counts a request into the budget.
    pub fn deposit(budget: &TpsBudget) {
        budget.deposit();
    }
}

/// Whether an outcome is worth another worker's try.
pub fn retryable(r: &Result<WorkerResponse, BoxError>) -> bool {
    match r {
        Ok(resp) => matches!(resp.response.status().as_u16(), 502..=504),
        Err(e) => !e.is::<tower::load_shed::error::Overloaded>(),
    }
}

impl tower::retry::Policy<WorkerRequest, WorkerResponse, BoxError> for RetryPolicy {
    type Future = futures::future::Ready<()>;

    fn retry(
        &mut self,
        req: &mut WorkerRequest,
        result: &mut Result<WorkerResponse, BoxError>,
    ) -> Option<Self::Future> {
        if !retryable(result) || self.left == 0 || tokio::time::Instant::now() >= req.deadline {
            return None;
        }
        if !self.budget.withdraw() {
            (self.on_retry)(false);
            return None;
        }
        self.left -= 1;
        req.attempt += 1;
        (self.on_retry)(true);
        Some(futures::future::ready(()))
    }

    fn clone_request(&mut self, req: &WorkerRequest) -> Option<WorkerRequest> {
        req.try_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tower::retry::Policy;

    use crate::endpoint::Payload;

    fn request(payload: Payload, deadline_in: Duration) -> WorkerRequest {
        WorkerRequest {
            pipeline: Arc::from("p"),
            headers: http::HeaderMap::new(),
            payload,
            attempt: 0,
            deadline: tokio::time::Instant::now() + deadline_in,
            hold_answer: 1 << 20,
        }
    }

    fn answered(status: u16) -> Result<WorkerResponse, BoxError> {
        let body = http_body_util::Empty::<Bytes>::new()
            .map_err(|e| match e {})
            .boxed_unsync();
        let mut response = http::Response::new(body);
        *response.status_mut() = http::StatusCode::from_u16(status).expect("status");
        Ok(WorkerResponse {
            response,
            worker: Arc::from("w1"),
            ok: Default::default(),
        })
    }

    /// A policy with `left` retries over `budget`, recording what it told the metrics.
    fn policy(left: u32, budget: Arc<TpsBudget>) -> (RetryPolicy, Arc<Mutex<Vec<bool>>>) {
        let said = Arc::new(Mutex::new(Vec::new()));
        let log = said.clone();
        let p = RetryPolicy {
            budget,
            left,
            on_retry: Arc::new(move |granted| log.lock().push(granted)),
        };
        (p, said)
    }

    fn buffered() -> Payload {
        Payload::Buffered(Bytes::from_static(b"a,b\n1,2\n"))
    }

    #[tokio::test]
    async fn only_gateway_errors_and_transport_failures_are_retried() {
        for (status, retried) in [
            (200, false),
            (400, false),
            (422, false),
            (500, false),
            (502, true),
            (503, true),
            (504, true),
        ] {
            let (mut p, _) = policy(2, RetryPolicy::budget());
            let mut req = request(buffered(), Duration::from_secs(5));
            let got = p.retry(&mut req, &mut answered(status)).is_some();
            assert_eq!(got, retried, "status {status}");
        }
        let transport: BoxError = "connection reset".into();
        assert!(retryable(&Err(transport)));
        let shed: BoxError = Box::new(tower::load_shed::error::Overloaded::new());
        assert!(
            !retryable(&Err(shed)),
            "a shed request is not sent again into the same full queue"
        );
    }

    #[tokio::test]
    async fn retries_stop_when_none_are_left() {
        let (mut p, said) = policy(2, RetryPolicy::budget());
        let mut req = request(buffered(), Duration::from_secs(5));
        assert!(p.retry(&mut req, &mut answered(503)).is_some());
        assert!(p.retry(&mut req, &mut answered(503)).is_some());
        assert!(p.retry(&mut req, &mut answered(503)).is_none());
        assert_eq!(req.attempt, 2);
        assert_eq!(*said.lock(), [true, true]);
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_past_the_deadline() {
        let (mut p, said) = policy(3, RetryPolicy::budget());
        let mut req = request(buffered(), Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(p.retry(&mut req, &mut answered(503)).is_none());
        assert!(said.lock().is_empty(), "not a budget refusal either");
    }

    #[tokio::test]
    async fn an_empty_budget_refuses_and_says_so() {
        // No deposits, no minimum per second, nothing to withdraw.
        let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 0, 0.0));
        let (mut p, said) = policy(3, budget);
        let mut req = request(buffered(), Duration::from_secs(5));
        assert!(p.retry(&mut req, &mut answered(503)).is_none());
        assert_eq!(*said.lock(), [false]);
        assert_eq!(req.attempt, 0);
    }

    #[tokio::test]
    async fn a_streamed_body_is_never_sent_twice() {
        let body = http_body_util::Full::new(Bytes::from_static(b"x"))
            .map_err(|e| match e {})
            .boxed_unsync();
        let (mut p, _) = policy(3, RetryPolicy::budget());
        let req = request(
            Payload::Streaming(Mutex::new(Some(body))),
            Duration::from_secs(5),
        );
        assert!(p.clone_request(&req).is_none());
        let req = request(buffered(), Duration::from_secs(5));
        assert!(p.clone_request(&req).is_some());
    }

    #[tokio::test]
    async fn membership_drives_the_ready_count_and_its_watchers() {
        let route = Route::new("p", RouteOptions::default());
        let mut ready = route.watch_ready();
        let client = crate::endpoint::h2_client();
        let endpoint =
            |id: &str| Endpoint::new(id, "http://127.0.0.1:9", client.clone(), Default::default());
        let on_eject: OnEject = Arc::new(|_, _| {});
        route.insert(endpoint("w1"), on_eject.clone());
        route.insert(endpoint("w1"), on_eject.clone());
        assert_eq!(route.ready(), 1, "a worker inserted twice counts once");
        route.insert(endpoint("w2"), on_eject);
        assert_eq!((route.ready(), *ready.borrow_and_update()), (2, 2));
        assert!(route.contains("w2"));
        route.remove("w1");
        route.remove("w1");
        assert_eq!(route.ready(), 1);
        route.remove("w2");
        assert_eq!(*ready.borrow_and_update(), 0);
        assert!(!route.contains("w2"));
    }
}
