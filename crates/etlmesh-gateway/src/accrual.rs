//! Failure accrual: an endpoint that fails `threshold` times in a row is ejected (its
//! `poll_ready` stays pending, so the balancer picks others) for a backoff that starts
//! at `first` and doubles, with jitter, up to `max`, each time its probation request
//! fails. One success resets it.

use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::{Instant, Sleep};
use tower::{BoxError, Service};

use crate::endpoint::{WorkerRequest, WorkerResponse};

/// When to eject and for how long.
#[derive(Debug, Clone, Copy)]
pub struct AccrualPolicy {
    /// Consecutive failures that eject.
    pub threshold: u32,
    /// The first ejection.
    pub first: Duration,
    /// The longest ejection.
    pub max: Duration,
}

impl Default for AccrualPolicy {
    fn default() -> Self {
        Self {
            threshold: 7,
            first: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

#[derive(Debug)]
struct State {
    failures: u32,
    ejected_until: Option<Instant>,
    backoff: Duration,
    probation: bool,
}

/// Called with the endpoint's id and the ejection's length.
pub type OnEject = Arc<dyn Fn(&str, Duration) + Send + Sync>;

/// Failure accrual around an endpoint service.
pub struct Accrual<S> {
    inner: S,
    id: Arc<str>,
    policy: AccrualPolicy,
    state: Arc<Mutex<State>>,
    sleep: Option<Pin<Box<Sleep>>>,
    on_eject: OnEject,
}

impl<S> Accrual<S> {
    /// Wraps `inner`, the endpoint `id`.
    pub fn new(inner: S, id: Arc<str>, policy: AccrualPolicy, on_eject: OnEject) -> Self {
        let state = State {
            failures: 0,
            ejected_until: None,
            backoff: policy.first,
            probation: false,
        };
        Self {
            inner,
            id,
            policy,
            state: Arc::new(Mutex::new(state)),
            sleep: None,
            on_eject,
        }
    }
}

/// How an outcome counts against the endpoint.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Success,
    /// It failed, or answered that it cannot serve (502, 503, 504). A 4xx or a failed
    /// SQL is not its fault.
    Failure,
    /// Nothing listens there: it is ejected at once rather than after `threshold`
    /// failures, since a refused connection fails fast and would otherwise look like
    /// the least loaded endpoint.
    Unreachable,
}

fn verdict(r: &Result<WorkerResponse, BoxError>) -> Verdict {
    match r {
        Ok(resp) if matches!(resp.response.status().as_u16(), 502..=504) => Verdict::Failure,
        Ok(_) => Verdict::Success,
        Err(e) => match e.downcast_ref::<hyper_util::client::legacy::Error>() {
            Some(h) if h.is_connect() || connection_lost(h) => Verdict::Unreachable,
            _ => Verdict::Failure,
        },
    }
}

/// Whether the connection died under the request (the worker's process went away).
fn connection_lost(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            return h.is_closed() || h.is_incomplete_message() || h.is_canceled();
        }
        source = s.source();
    }
    false
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.85..1.15))
}

impl<S> Service<WorkerRequest> for Accrual<S>
where
    S: Service<WorkerRequest, Response = WorkerResponse, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = WorkerResponse;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<WorkerResponse, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let until = self.state.lock().ejected_until;
        if let Some(until) = until {
            if Instant::now() < until {
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                if sleep.deadline() != until {
                    sleep.as_mut().reset(until);
                }
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            // Probation: the next request decides.
            let mut st = self.state.lock();
            st.ejected_until = None;
            st.probation = true;
            self.sleep = None;
            tracing::info!(worker = %self.id, "endpoint back on probation");
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: WorkerRequest) -> Self::Future {
        let fut = self.inner.call(req);
        let state = self.state.clone();
        let policy = self.policy;
        let id = self.id.clone();
        let on_eject = self.on_eject.clone();
        Box::pin(async move {
            let r = fut.await;
            let mut st = state.lock();
            let v = verdict(&r);
            if v != Verdict::Success {
                st.failures += 1;
                if st.probation || st.failures >= policy.threshold || v == Verdict::Unreachable {
                    let d = jitter(st.backoff);
                    st.ejected_until = Some(Instant::now() + d);
                    if st.probation {
                        st.backoff = (st.backoff * 2).min(policy.max);
                    }
                    st.failures = 0;
                    st.probation = false;
                    drop(st);
                    tracing::warn!(worker = %id, ejected_ms = d.as_millis() as u64, reason = ?v, "endpoint ejected");
                    on_eject(&id, d);
                }
            } else {
                st.failures = 0;
                st.probation = false;
                st.backoff = policy.first;
            }
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    use futures::future::ready;
    use tower::ServiceExt;

    /// A service that always fails.
    #[derive(Clone)]
    struct Failing(Arc<AtomicU32>);

    impl Service<WorkerRequest> for Failing {
        type Response = WorkerResponse;
        type Error = BoxError;
        type Future = futures::future::Ready<Result<WorkerResponse, BoxError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: WorkerRequest) -> Self::Future {
            self.0.fetch_add(1, Ordering::Relaxed);
            ready(Err("down".into()))
        }
    }

    fn req() -> WorkerRequest {
        WorkerRequest {
            pipeline: Arc::from("p"),
            headers: Default::default(),
            payload: crate::endpoint::Payload::Buffered(Default::default()),
            attempt: 0,
            deadline: Instant::now() + Duration::from_secs(5),
            hold_answer: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_the_threshold_and_backs_off_on_probation() {
        let calls = Arc::new(AtomicU32::new(0));
        let ejections = Arc::new(Mutex::new(Vec::new()));
        let log = ejections.clone();
        let on_eject: OnEject = Arc::new(move |_, d| log.lock().push(d));
        let mut svc = Accrual::new(
            Failing(calls.clone()),
            Arc::from("w1"),
            AccrualPolicy::default(),
            on_eject,
        );
        for _ in 0..7 {
            let _ = svc.ready().await.expect("ready").call(req()).await;
        }
        assert_eq!(ejections.lock().len(), 1);
        // Ejected: not ready until about a second has passed.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(svc.poll_ready(&mut cx).is_pending());
        tokio::time::advance(Duration::from_millis(1200)).await;
        // Probation: one failure ejects again, for about twice as long.
        let _ = svc.ready().await.expect("ready").call(req()).await;
        let e = ejections.lock().clone();
        assert_eq!(e.len(), 2);
        assert!(
            e[0] < Duration::from_millis(1200) && e[0] > Duration::from_millis(800),
            "{e:?}"
        );
        assert_eq!(calls.load(Ordering::Relaxed), 8);
        let _ = svc.ready().await;
        let _ = svc.call(req()).await;
        let e = ejections.lock().clone();
        assert!(
            e[2] > Duration::from_millis(1600),
            "the backoff grows: {e:?}"
        );
    }
}
