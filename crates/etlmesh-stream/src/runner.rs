//! The loop of one stream: micro-batch, decode, transform, load, acknowledge.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, RecordBatch};
use etlmesh_codec::{DecodedBatch, Limits, Provenance, Reject, Stage, record::row_as_json};
use etlmesh_config::{MicroBatch, OnError, PipelineSpec, StreamSource};
use etlmesh_engine::{Engine, Kind, Transform};
use etlmesh_sink::dead_letter::{DeadLetterLog, DeadLetterRoute, Routed};
use etlmesh_sink::tap::TapStage;
use tokio::sync::{mpsc, watch};

use crate::decode::{LineMap, MessageDecoder};
use crate::dedup::Dedup;
use crate::sinks::{SinkFailure, StreamSink};
use crate::source::{self, Delivery, Outcome, SlotIdentity, Source};
use crate::state::{SlotState, StateFile};
use crate::window::{Shards, fmt_ms};
use crate::{StreamError, StreamMetrics};

mod frontier;

/// What a stream needs from the worker that runs it.
#[derive(Clone)]
pub struct StreamOptions {
    /// The worker's id: with the pipeline, it names the MQTT session and the
    /// JetStream connection.
    pub worker: String,
    /// The SQL engine.
    pub engine: Engine,
    /// Record size limits.
    pub limits: Limits,
    /// Where counts go.
    pub metrics: StreamMetrics,
    /// Open taps (`etlmesh tap`).
    pub taps: std::sync::Arc<etlmesh_sink::tap::TapHub>,
    /// Where each slot keeps its state between runs ([`crate::state`]); in memory only
    /// when absent.
    pub state_dir: Option<std::path::PathBuf>,
    /// Set before `shutdown` turns true when the worker leaves its pool for good (a
    /// scale-down): a shared subscription is then given up, so that the group's other
    /// members take its share. Otherwise the session keeps its subscription while the
    /// worker is away, and the broker queues for it.
    pub leaving: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The pipeline's dead-letter log, when the worker shares one with its requests;
    /// the stream opens its own otherwise.
    pub dead_letters: Option<Arc<DeadLetterLog>>,
    /// On a stop that keeps the subscription, how long the session stays connected
    /// after the stream stopped processing (the worker's drain grace): the broker
    /// keeps sending in flight — what it never drops — instead of queueing for an
    /// offline session, which it may drop past its limit.
    pub linger: Duration,
}

/// How often the loop wakes with no message, to roll files and close idle windows.
const TICK: Duration = Duration::from_millis(100);
/// Longest wait between two tries of a sink that is down.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Everything of a stream but its source.
struct Prepared {
    taps: std::sync::Arc<etlmesh_sink::tap::TapHub>,
    spec: PipelineSpec,
    batch: MicroBatch,
    decoder: MessageDecoder,
    transform: Transform,
    windows: Option<Shards>,
    dedup: Option<Dedup>,
    sinks: Vec<Box<dyn StreamSink>>,
    dead: Arc<DeadLetterLog>,
    metrics: StreamMetrics,
    shutdown: watch::Receiver<bool>,
    leaving: std::sync::Arc<std::sync::atomic::AtomicBool>,
    linger: Duration,
    shared: bool,
    time_col: Option<usize>,
    state: StateFile,
}

struct Stream<S: Source> {
    taps: std::sync::Arc<etlmesh_sink::tap::TapHub>,
    spec: PipelineSpec,
    batch: MicroBatch,
    /// Unacknowledged messages the source may hand out.
    window: usize,
    decoder: MessageDecoder,
    transform: Transform,
    windows: Option<Shards>,
    dedup: Option<Dedup>,
    sinks: Vec<Box<dyn StreamSink>>,
    dead: Arc<DeadLetterLog>,
    source: S,
    /// Received, not yet acknowledged, in order of arrival.
    held: VecDeque<(u64, S::Ack, Outcome)>,
    /// Messages of the micro-batch being processed that were rejected whole.
    dead_seqs: Vec<u64>,
    /// When held messages were last said to be in progress ([`Source::keep_alive`]).
    kept_alive: Instant,
    /// Newest message fully processed.
    processed: u64,
    metrics: StreamMetrics,
    shutdown: watch::Receiver<bool>,
    leaving: std::sync::Arc<std::sync::atomic::AtomicBool>,
    linger: Duration,
    /// Shared subscription (several workers may serve the pipeline).
    shared: bool,
    time_col: Option<usize>,
    /// The slot's state on disk: its session and the committed watermark.
    state: StateFile,
    /// Windows loaded and not yet committed by every sink, in order of loading.
    loaded: VecDeque<LoadedWindows>,
    /// Messages received and waiting in the channel, not yet processed.
    queued: usize,
    /// The id of the newest write to the sinks (one per `load`); sinks say how far they
    /// committed in these ids.
    last_write: u64,
    /// Writes not yet committed by every sink, with the newest message each covers.
    writes: VecDeque<(u64, u64)>,
    /// Every message up to this one has its rows committed by every sink.
    committed_seq: u64,
    /// Each write's transaction commits the source's offsets (a Kafka sink with
    /// `exactly_once`).
    exactly_once: bool,
}

/// Windows that closed and were written by write `at`: their messages (from
/// `min_seq`) may be acknowledged, and the watermark `watermark` kept as the slot's,
/// once every sink committed that write.
struct LoadedWindows {
    at: u64,
    /// Per shard, the oldest message its windows held.
    min_seq: HashMap<Option<Arc<str>>, u64>,
    watermark: i64,
}

/// Starts the slot clean when its source changed: what the earlier source keeps for
/// it (an MQTT session and its queue) is removed.
async fn forget_old_source(
    state: &mut StateFile,
    source: StreamSource<'_>,
    id: &SlotIdentity,
    pipeline: &str,
) {
    if state.state.client_id.is_empty() || state.state.client_id == id.client_id {
        return;
    }
    let old = state.state.clone();
    tracing::warn!(pipeline, old_client_id = %old.client_id, old_subscription = %old.subscription, old_broker = %old.broker, client_id = %id.client_id, subscription = %id.subscription, broker = %id.broker, "the pipeline's source changed: starting clean");
    if old.broker == id.broker {
        source::forget(source, &old, pipeline).await;
    }
    state.state = SlotState::default();
}

/// Runs the stream of pipeline `spec` until `shutdown` turns true; then it stops
/// reading, finishes and acknowledges what it holds (but the messages of windows that
/// have not closed: the broker sends them again and the windows are rebuilt whole),
/// and leaves the group when the worker leaves its pool.
pub async fn run(
    spec: PipelineSpec,
    opts: StreamOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StreamError> {
    let err = |message: String| StreamError::Pipeline {
        pipeline: spec.name.clone(),
        message,
    };
    let source = spec
        .stream_source()
        .ok_or_else(|| err("has no stream source".into()))?;
    let fields = spec
        .schema
        .as_ref()
        .ok_or_else(|| err("a stream needs a declared schema".into()))?;
    let declared = etlmesh_codec::schema::arrow_schema(fields);
    let decoder = MessageDecoder::new(source, &declared, &spec.source.csv, opts.limits);
    let input = decoder.input_schema().clone();
    let windows = spec
        .window
        .clone()
        .map(|w| Shards::new(w, &input))
        .transpose()
        .map_err(err)?;
    let sql_input = crate::window::sql_schema(&input, spec.window.is_some());
    let transform = opts
        .engine
        .compile(&spec.name, &spec.transform, sql_input)
        .await
        .map_err(|e| err(e.to_string()))?;
    if windows.is_none() && transform.kind() == Kind::WholeInput {
        tracing::warn!(pipeline = %spec.name, "the SQL aggregates or sorts: without a `window` it runs over each micro-batch alone");
    }
    let sinks = crate::sinks::build(&spec, transform.output_schema(), &opts.worker).map_err(err)?;
    let dl = spec
        .dead_letter
        .as_ref()
        .ok_or_else(|| err("a stream needs a dead_letter sink".into()))?;
    let dead = match opts.dead_letters.clone() {
        Some(d) => d,
        None => Arc::new(
            DeadLetterLog::open(dl, &spec.name, &opts.worker).map_err(|e| err(e.to_string()))?,
        ),
    };
    let dedup = Dedup::new(&input, &spec.dedup).map_err(err)?;
    let time_col = spec
        .window
        .as_ref()
        .map(|w| w.time.as_str())
        .or_else(|| {
            input
                .fields()
                .iter()
                .any(|f| f.name() == "ts")
                .then_some("ts")
        })
        .and_then(|c| input.index_of(c).ok());

    let shared = spec.scaling.max_replicas != 1;
    let id = source::identity(source, &spec.name, &opts.worker, shared);
    let mut state = StateFile::open(opts.state_dir.as_deref(), &spec.name, &opts.worker);
    forget_old_source(&mut state, source, &id, &spec.name).await;
    let windows = windows.map(|mut w| {
        if let Some(wm) = state.state.watermark {
            w.resume(wm);
            tracing::info!(pipeline = %spec.name, watermark = %fmt_ms(wm), "windows resume: redelivered records of windows that were loaded are skipped");
        }
        w
    });
    state.state.client_id = id.client_id.clone();
    state.state.subscription = id.subscription.clone();
    state.state.broker = id.broker.clone();
    if let Err(e) = state.save() {
        return Err(err(format!(
            "cannot write the stream's state {}: {e}; check that the worker's --state-dir is writable",
            state
                .path()
                .map_or_else(String::new, |p| p.display().to_string())
        )));
    }
    let batch = source.batch();
    let kind = source.kind();
    let source_spec = spec.source.kind.clone();
    let p = Prepared {
        taps: opts.taps,
        batch,
        spec,
        decoder,
        transform,
        windows,
        dedup,
        sinks,
        dead,
        metrics: opts.metrics,
        shutdown,
        leaving: opts.leaving,
        linger: opts.linger,
        shared,
        time_col,
        state,
    };
    // One arm per kind of stream source.
    match source_spec {
        etlmesh_config::SourceKind::Mqtt(m) => {
            let sid = source::mqtt::SessionId::new(&m, &p.spec.name, &opts.worker, shared);
            let (session, rx, task) = source::mqtt::start(&m, &sid, m.receive_maximum).await?;
            tracing::info!(pipeline = %p.spec.name, client_id = %sid.client_id, subscription = %sid.subscription, shared, "MQTT session started");
            if !m.broker_keeps_queued {
                source::mqtt::warn_if_broker_drops(&m, &p.spec.name);
            }
            drive(p, session, rx, task).await
        }
        etlmesh_config::SourceKind::Nats(n) => {
            let (consumer, rx, task) = source::nats::open(
                &n,
                &p.spec.name,
                &opts.worker,
                batch.records,
                p.metrics.clone(),
            )
            .await?;
            drive(p, consumer, rx, task).await
        }
        etlmesh_config::SourceKind::Kafka(k) => {
            let (consumer, rx, task) = source::kafka::open(
                &k,
                &p.spec.name,
                &opts.worker,
                p.metrics.clone(),
                p.spec.exactly_once(),
            )
            .await?;
            drive(p, consumer, rx, task).await
        }
        etlmesh_config::SourceKind::File { .. } | etlmesh_config::SourceKind::Stdin => {
            Err(StreamError::Pipeline {
                pipeline: p.spec.name.clone(),
                message: format!("has no stream source ({kind})"),
            })
        }
    }
}

/// Runs a prepared stream on its source until it stops, then hands back what it did
/// not acknowledge and closes the source.
async fn drive<S: Source>(
    p: Prepared,
    source: S,
    rx: mpsc::Receiver<Delivery<S::Ack>>,
    task: tokio::task::JoinHandle<()>,
) -> Result<(), StreamError> {
    let window = source.window().max(2);
    let mut batch = p.batch;
    // Acknowledgements must flow before the source's window is full.
    batch.records = batch.records.min(window / 2).max(1);
    tracing::info!(pipeline = %p.spec.name, window, micro_batch = batch.records, sinks = p.sinks.len(), windowed = p.windows.is_some(), "stream started");
    let mut s = Stream {
        exactly_once: p.spec.exactly_once(),
        taps: p.taps,
        batch,
        window,
        spec: p.spec,
        decoder: p.decoder,
        transform: p.transform,
        windows: p.windows,
        dedup: p.dedup,
        sinks: p.sinks,
        dead: p.dead,
        source,
        held: VecDeque::new(),
        dead_seqs: Vec::new(),
        kept_alive: Instant::now(),
        processed: 0,
        metrics: p.metrics,
        shutdown: p.shutdown,
        leaving: p.leaving,
        linger: p.linger,
        shared: p.shared,
        time_col: p.time_col,
        state: p.state,
        loaded: VecDeque::new(),
        queued: 0,
        last_write: 0,
        writes: VecDeque::new(),
        committed_seq: 0,
    };
    let mut rx = rx;
    let r = s.run(&mut rx).await;
    s.source.stop();
    let mut unacked: Vec<S::Ack> = s.held.drain(..).map(|(_, a, _)| a).collect();
    while let Ok(d) = rx.try_recv() {
        unacked.push(d.ack);
    }
    if !unacked.is_empty() {
        s.source.release(unacked).await;
    }
    s.source.close().await;
    task.abort();
    r
}

impl<S: Source> Stream<S> {
    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn run(&mut self, rx: &mut mpsc::Receiver<Delivery<S::Ack>>) -> Result<(), StreamError> {
        // Draining: since when, and whether messages are still read (after leaving a
        // shared group, what came is finished; otherwise reading stops at once and
        // what was not processed comes again to this slot).
        let mut draining: Option<(Instant, bool)> = None;
        let mut buf: Vec<Delivery<S::Ack>> = Vec::with_capacity(self.batch.records);
        let mut report = Instant::now();
        loop {
            if draining.is_none() && self.stopping() {
                let leave = self.shared && self.leaving.load(std::sync::atomic::Ordering::Acquire);
                if leave {
                    // The broker sends to the group's others from now on.
                    self.source.leave().await;
                }
                draining = Some((Instant::now(), leave));
                tracing::info!(pipeline = %self.spec.name, held = self.held.len(), leave, "stream draining");
            }
            let reading = draining.is_none_or(|(_, read_on)| read_on);
            // Collect a micro-batch: the first message (or a tick), then more until the
            // batch is full or its time is up.
            let first = if reading {
                tokio::select! {
                    m = rx.recv() => m,
                    () = tokio::time::sleep(TICK) => None,
                    _ = self.shutdown.changed(), if draining.is_none() => None,
                }
            } else {
                None
            };
            if let Some(m) = first {
                let deadline = tokio::time::Instant::now() + self.batch.wait;
                buf.push(m);
                while buf.len() < self.batch.records {
                    match rx.try_recv() {
                        Ok(m) => buf.push(m),
                        Err(mpsc::error::TryRecvError::Empty) => {
                            match tokio::time::timeout_at(deadline, rx.recv()).await {
                                Ok(Some(m)) => buf.push(m),
                                Ok(None) | Err(_) => break,
                            }
                        }
                        Err(mpsc::error::TryRecvError::Disconnected) => break,
                    }
                }
            }
            if !buf.is_empty() {
                let batch: Vec<Delivery<S::Ack>> = std::mem::take(&mut buf);
                if !self.process(batch).await? {
                    return Ok(());
                }
            }
            // Windows close only on their own, also when draining: one closed early
            // would be loaded again, partly, from the rest of its records.
            if !self.close_windows().await? {
                return Ok(());
            }
            let force = self.held.len() >= self.window / 2 || draining.is_some();
            if !self.flush_sinks(force).await? {
                return Ok(());
            }
            self.queued = rx.len();
            self.acknowledge().await?;
            if let Some(every) = self.source.keep_alive()
                && self.kept_alive.elapsed() >= every
            {
                self.kept_alive = Instant::now();
                if !self.held.is_empty() {
                    self.source
                        .hold(self.held.iter().map(|(_, a, _)| a).collect())
                        .await;
                }
            }
            if report.elapsed() >= Duration::from_secs(10) {
                report = Instant::now();
                tracing::info!(pipeline = %self.spec.name, held = self.held.len(), processed = self.processed, dead_letters = self.dead.count(), open_windows = self.windows.as_ref().map_or(0, |w| w.open_count()), "stream progress");
            }
            if let Some((since, read_on)) = draining {
                let done = !read_on || rx.is_empty();
                if done || since.elapsed() > Duration::from_secs(10) {
                    if !read_on {
                        // Received now is in flight: sent again to this slot, never dropped.
                        tokio::time::sleep(self.linger.saturating_sub(since.elapsed())).await;
                    }
                    let open = self.windows.as_ref().map_or(0, |w| w.open_count());
                    if open > 0 {
                        tracing::info!(pipeline = %self.spec.name, held = self.held.len(), open_windows = open, "stopping with the messages of open windows unacknowledged: the source sends them again and the windows are rebuilt whole");
                    } else if !self.held.is_empty() {
                        tracing::warn!(pipeline = %self.spec.name, held = self.held.len(), "stopping with messages unacknowledged: the source sends them again");
                    }
                    tracing::info!(pipeline = %self.spec.name, "stream stopped");
                    return Ok(());
                }
            }
        }
    }

    /// One micro-batch. Returns false when the stream must stop (shutdown while a
    /// sink is down: nothing is acknowledged, the broker keeps the messages).
    async fn process(&mut self, mut batch: Vec<Delivery<S::Ack>>) -> Result<bool, StreamError> {
        let started = Instant::now();
        let last = batch.last().map_or(self.processed, |d| d.seq);
        self.metrics
            .messages(&self.spec.name, "received", batch.len() as u64);
        let decoded = self.decoder.decode(&batch);
        self.dead_seqs.clone_from(&decoded.dead);
        for d in batch.iter_mut() {
            d.payload = bytes::Bytes::new();
        }
        let mut rejects = decoded.rejects;
        self.metrics.records(&self.spec.name, "in", decoded.records);
        let mut inputs: Vec<DecodedBatch> = decoded.batches;
        if self.taps.is_tapped() {
            for b in &inputs {
                self.taps
                    .offer_batch(&self.spec.name, TapStage::Input, &b.batch);
            }
        }
        if let Some(d) = &mut self.dedup {
            let dropped = d.drop_repeats(&mut inputs);
            self.metrics.records(&self.spec.name, "duplicate", dropped);
        }
        self.lag(&inputs);
        let mut outputs: Vec<RecordBatch> = Vec::new();
        if let Some(w) = &mut self.windows {
            // Each message's shard, by arrival number (the batch is in order of arrival).
            let shards: Vec<(u64, Option<crate::source::Shard>)> = batch
                .iter()
                .map(|d| (d.seq, self.source.shard(&d.ack)))
                .collect();
            let sharded = shards.iter().any(|(_, s)| s.is_some());
            let source = &self.source;
            let owns = |s: &crate::source::Shard| source.owns(s);
            for b in &inputs {
                let seqs = decoded.lines.row_seqs(b);
                let redelivered = decoded.lines.row_redelivered(b);
                let row_shards: Vec<Option<crate::source::Shard>> = if sharded {
                    seqs.iter()
                        .map(|q| {
                            shards
                                .binary_search_by_key(q, |(s, _)| *s)
                                .ok()
                                .and_then(|i| shards[i].1.clone())
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let now = chrono::Utc::now().timestamp_millis();
                let added = w
                    .add(&b.batch, &seqs, &redelivered, &row_shards, &owns, now)
                    .map_err(|m| StreamError::Pipeline {
                        pipeline: self.spec.name.clone(),
                        message: m,
                    })?;
                self.metrics
                    .records(&self.spec.name, "revoked", added.revoked.len() as u64);
                let time_field = self.spec.window.as_ref().map_or("", |w| w.time.as_str());
                self.metrics
                    .records(&self.spec.name, "future", added.future.len() as u64);
                self.metrics
                    .records(&self.spec.name, "replayed", added.replayed.len() as u64);
                self.metrics
                    .records(&self.spec.name, "late", added.late.len() as u64);
                rejects.extend(crate::window::refused(
                    &added,
                    b,
                    &decoded.lines,
                    time_field,
                    w.max_future(),
                    now,
                ));
            }
        } else {
            for b in &inputs {
                match self.transform.apply(b).await {
                    Ok(res) => {
                        self.metrics
                            .records(&self.spec.name, "filtered", res.filtered());
                        rejects.extend(decoded.lines.place_all(res.rejects));
                        outputs.extend(res.batches);
                    }
                    Err(e) => rejects.extend(reject_rows(
                        b,
                        Stage::Transform,
                        &e.to_string(),
                        &decoded.lines,
                    )),
                }
            }
        }
        for d in batch {
            let outcome = if self.dead_seqs.binary_search(&d.seq).is_ok() {
                Outcome::DeadLettered
            } else {
                Outcome::Done
            };
            self.held.push_back((d.seq, d.ack, outcome));
        }
        // Dead letters first: they are flushed at once and never refuse.
        self.dead_letter(&rejects)?;
        let ok = self.load(&outputs, last).await?;
        if ok {
            self.processed = last;
            self.metrics
                .batch(&self.spec.name, started.elapsed().as_secs_f64());
        }
        Ok(ok)
    }

    fn lag(&self, inputs: &[DecodedBatch]) {
        let Some(c) = self.time_col else { return };
        let newest = inputs
            .iter()
            .filter_map(|b| {
                let col = arrow::compute::cast(
                    b.batch.column(c),
                    &arrow::datatypes::DataType::Timestamp(
                        arrow::datatypes::TimeUnit::Millisecond,
                        None,
                    ),
                )
                .ok()?;
                let col = col
                    .as_any()
                    .downcast_ref::<arrow::array::TimestampMillisecondArray>()?
                    .clone();
                arrow::compute::max(&col)
            })
            .max();
        if let Some(ts) = newest {
            self.metrics.lag(
                &self.spec.name,
                chrono::Utc::now().timestamp_millis().saturating_sub(ts),
            );
        }
    }

    fn dead_letter(&mut self, rejects: &[Reject]) -> Result<(), StreamError> {
        // A stream never refuses: its messages are dead-lettered (the dead-letter sink
        // is required for streams) and the stream goes on.
        let route = DeadLetterRoute {
            pipeline: &self.spec.name,
            on_error: OnError::DeadLetter,
            sink: Some(&*self.dead),
            taps: Some(&self.taps),
        };
        let n = match route.route(rejects) {
            Ok(Routed::DeadLettered(n)) => n,
            // Not with a sink and `DeadLetter`: kept for the compiler.
            Ok(Routed::Refused(_)) => 0,
            Err(e) => {
                return Err(StreamError::Sink {
                    pipeline: self.spec.name.clone(),
                    message: format!("cannot write dead letters: {e}"),
                });
            }
        };
        self.metrics
            .records(&self.spec.name, "dead_lettered", n as u64);
        Ok(())
    }

    /// Writes rows to every sink, retrying those that are down (an outage: nothing is
    /// dead-lettered, nothing acknowledged, the loop waits with backoff). Rows a sink
    /// refuses go to the dead letters with its reason; the rest are loaded. Returns
    /// false on shutdown while a sink is still down.
    async fn load(&mut self, outputs: &[RecordBatch], seq: u64) -> Result<bool, StreamError> {
        // Each write has an id of its own: two writes may cover the same messages (a
        // micro-batch, then the windows it closed), and a sink commits them apart.
        self.last_write += 1;
        let write = self.last_write;
        self.writes.push_back((write, seq));
        let rows: u64 = outputs.iter().map(|b| b.num_rows() as u64).sum();
        if self.taps.is_tapped() {
            for b in outputs {
                self.taps.offer_batch(&self.spec.name, TapStage::Output, b);
            }
        }
        if self.exactly_once {
            // The write's transaction commits the offsets after its messages (and
            // those dead-lettered before it).
            let acks: Vec<&S::Ack> = self
                .held
                .iter()
                .take_while(|(s, _, _)| *s <= seq)
                .map(|(_, a, _)| a)
                .collect();
            match self.source.offsets_of(&acks) {
                Some(o) => {
                    let o = Arc::new(o);
                    for s in &mut self.sinks {
                        s.commit_with(o.clone());
                    }
                }
                None if !acks.is_empty() => {
                    return Err(StreamError::Pipeline {
                        pipeline: self.spec.name.clone(),
                        message: "exactly once: the source has no consumer group to commit offsets for (not in its group yet); the stream restarts".into(),
                    });
                }
                None => {}
            }
        }
        let mut rejects: Vec<Reject> = Vec::new();
        let mut refused_rows = std::collections::HashSet::new();
        for i in 0..self.sinks.len() {
            let mut backoff = Duration::from_millis(100);
            let mut down_since: Option<Instant> = None;
            let refused = loop {
                match self.sinks[i].write(outputs, write).await {
                    Ok(refused) => break refused,
                    Err(SinkFailure::Retry(m)) => {
                        let sink = self.sinks[i].describe();
                        self.metrics.sink_retry(&self.spec.name, &sink);
                        self.metrics.sink_up(&self.spec.name, &sink, false);
                        self.metrics
                            .held(&self.spec.name, self.held.len() + self.queued);
                        let since = *down_since.get_or_insert_with(Instant::now);
                        tracing::warn!(pipeline = %self.spec.name, sink, error_kind = "sink_unavailable", error = %m, down_for_ms = since.elapsed().as_millis() as u64, retry_in_ms = backoff.as_millis() as u64, held = self.held.len(), "sink unavailable: holding the batch (nothing is acknowledged or dead-lettered)");
                        self.source
                            .hold(self.held.iter().map(|(_, a, _)| a).collect())
                            .await;
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            _ = self.shutdown.changed() => {}
                        }
                        if self.stopping() {
                            tracing::warn!(pipeline = %self.spec.name, sink, "stopping while the sink is down: the source sends the unacknowledged messages again");
                            return Ok(false);
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    Err(SinkFailure::Fatal(m)) => {
                        return Err(StreamError::Sink {
                            pipeline: self.spec.name.clone(),
                            message: m,
                        });
                    }
                }
            };
            let sink = self.sinks[i].describe();
            if let Some(since) = down_since {
                tracing::info!(pipeline = %self.spec.name, sink, down_for_ms = since.elapsed().as_millis() as u64, "sink available again");
            }
            self.metrics.sink_up(&self.spec.name, &sink, true);
            if refused.is_empty() {
                continue;
            }
            let src: Arc<str> = Arc::from(sink.as_str());
            for r in refused {
                let Some(b) = outputs.get(r.batch).filter(|b| r.row < b.num_rows()) else {
                    continue;
                };
                refused_rows.insert((r.batch, r.row));
                rejects.push(Reject::new(
                    &src,
                    Stage::Load,
                    r.reason,
                    row_as_json(b, r.row),
                ));
            }
        }
        self.dead_letter(&rejects)?;
        self.metrics.records(
            &self.spec.name,
            "out",
            rows.saturating_sub(refused_rows.len() as u64),
        );
        Ok(true)
    }

    /// Runs the SQL over windows that closed and loads the results.
    async fn close_windows(&mut self) -> Result<bool, StreamError> {
        let Some(w) = &mut self.windows else {
            return Ok(true);
        };
        let source = &self.source;
        for d in w.drop_unowned(|s| source.owns(s)) {
            tracing::info!(pipeline = %self.spec.name, shard = %d.name, open_windows = d.windows, rows = d.rows, "partition given up: its open windows are dropped; its next owner rebuilds them from the records not committed");
        }
        let closed = w
            .due(Instant::now(), false, &|s| source.behind(s))
            .map_err(|m| StreamError::Pipeline {
                pipeline: self.spec.name.clone(),
                message: m,
            })?;
        self.metrics.open_windows(&self.spec.name, w.open_count());
        if closed.is_empty() {
            return Ok(true);
        }
        if let Some(c) = closed.iter().find(|c| c.on_idle) {
            let n = closed.iter().filter(|c| c.on_idle).count();
            tracing::info!(pipeline = %self.spec.name, windows = n, shard = c.shard.as_deref().unwrap_or("-"), first = %fmt_ms(c.start), "windows closed on the idle timeout: no record came for them and the source has none waiting");
        }
        let mut outputs = Vec::new();
        let mut rejects = Vec::new();
        for c in &closed {
            let src: Arc<str> = Arc::from(format!("window {}..{}", fmt_ms(c.start), fmt_ms(c.end)));
            let input = DecodedBatch {
                batch: c.batch.clone(),
                provenance: Provenance::Rows {
                    source: src.clone(),
                    first_row: 1,
                },
            };
            match self.transform.apply(&input).await {
                Ok(res) => outputs.extend(res.batches),
                Err(e) => {
                    for r in 0..c.batch.num_rows() {
                        rejects.push(Reject::new(
                            &src,
                            Stage::Transform,
                            e.to_string(),
                            row_as_json(&c.batch, r),
                        ));
                    }
                }
            }
        }
        tracing::debug!(pipeline = %self.spec.name, windows = closed.len(), rows = outputs.iter().map(|b| b.num_rows()).sum::<usize>(), "windows closed");
        let mut min_seq: HashMap<Option<Arc<str>>, u64> = HashMap::new();
        for c in &closed {
            let m = min_seq.entry(c.shard.clone()).or_insert(u64::MAX);
            *m = (*m).min(c.min_seq);
        }
        let watermark = w.watermark().unwrap_or(i64::MIN);
        self.dead_letter(&rejects)?;
        let ok = self.load(&outputs, self.processed).await?;
        if ok {
            self.loaded.push_back(LoadedWindows {
                at: self.last_write,
                min_seq,
                watermark,
            });
        }
        Ok(ok)
    }

    async fn flush_sinks(&mut self, force: bool) -> Result<bool, StreamError> {
        for i in 0..self.sinks.len() {
            match self.sinks[i].flush(force).await {
                Ok(()) => {}
                Err(SinkFailure::Fatal(m)) => {
                    return Err(StreamError::Sink {
                        pipeline: self.spec.name.clone(),
                        message: m,
                    });
                }
                Err(SinkFailure::Retry(m)) => {
                    tracing::warn!(pipeline = %self.spec.name, sink = %self.sinks[i].describe(), error = %m, "sink flush failed; trying again");
                }
            }
        }
        Ok(true)
    }

    /// Acknowledges, in order, the messages every sink committed and no window holds —
    /// open, or loaded but not yet committed by every sink. With shards (Kafka's
    /// partitions), a window holds back only the messages of its own shard: each shard
    /// is acknowledged in order, apart from the others. The watermark of windows every
    /// sink committed goes to the slot's state file first.
    async fn acknowledge(&mut self) -> Result<(), StreamError> {
        let committed = self
            .sinks
            .iter()
            .map(|s| s.committed())
            .min()
            .unwrap_or(self.last_write);
        while self.writes.front().is_some_and(|(w, _)| *w <= committed) {
            if let Some((_, seq)) = self.writes.pop_front() {
                self.committed_seq = self.committed_seq.max(seq);
            }
        }
        let upto = self.processed.min(self.committed_seq);
        // Per shard, the oldest message a window holds (open, or loaded and not
        // committed by every sink).
        let mut holding = self
            .windows
            .as_ref()
            .map(Shards::min_open_seqs)
            .unwrap_or_default();
        let mut durable = None;
        while self.loaded.front().is_some_and(|l| l.at <= committed) {
            durable = self.loaded.pop_front().map(|l| l.watermark);
        }
        for l in &self.loaded {
            for (shard, min) in &l.min_seq {
                let m = holding.entry(shard.clone()).or_insert(u64::MAX);
                *m = (*m).min(*min);
            }
        }
        let mut dirty = false;
        if let Some(w) = durable
            && w != i64::MIN
            && self.state.state.watermark != Some(w)
        {
            self.state.state.watermark = Some(w);
            dirty = true;
        }
        if dirty {
            self.state.save().map_err(|e| StreamError::Sink {
                pipeline: self.spec.name.clone(),
                message: format!("cannot write the stream's state: {e}"),
            })?;
        }
        let source = &self.source;
        let acks = frontier::take(&mut self.held, upto, &holding, |a| {
            source.shard(a).map(|s| s.name)
        });
        if !acks.is_empty() {
            let n = acks.len() as u64;
            let terminated = acks
                .iter()
                .filter(|(_, o)| *o == Outcome::DeadLettered)
                .count() as u64;
            self.source.ack(acks).await?;
            self.metrics
                .messages(&self.spec.name, "acknowledged", n - terminated);
            self.metrics
                .messages(&self.spec.name, "terminated", terminated);
        }
        self.metrics
            .held(&self.spec.name, self.held.len() + self.queued);
        Ok(())
    }
}

/// Every row of a batch as a dead letter placed at its message.
fn reject_rows<'a>(
    b: &'a DecodedBatch,
    stage: Stage,
    reason: &'a str,
    lines: &'a LineMap,
) -> impl Iterator<Item = Reject> + 'a {
    (0..b.batch.num_rows())
        .map(move |i| lines.place(b.provenance.reject(&b.batch, i, stage, reason)))
}
