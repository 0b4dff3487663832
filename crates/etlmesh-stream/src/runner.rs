//! The loop of one stream: micro-batch, decode, transform, load, acknowledge.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, RecordBatch};
use etlmesh_codec::{DecodedBatch, Limits, Provenance, Reject, Stage, record::row_as_json};
use etlmesh_config::{MicroBatch, PipelineSpec};
use etlmesh_engine::{Engine, Kind, Transform};
use etlmesh_sink::dead_letter::DeadLetterLog;
use etlmesh_sink::tap::TapStage;
use tokio::sync::{mpsc, watch};

use crate::decode::{LineMap, MessageDecoder};
use crate::dedup::Dedup;
use crate::sinks::{SinkFailure, StreamSink};
use crate::source::{self, Ack, Delivery, Session};
use crate::window::Windows;
use crate::{StreamError, StreamMetrics};

/// What a stream needs from the worker that runs it.
#[derive(Clone)]
pub struct StreamOptions {
    /// The worker's id: with the pipeline, it names the MQTT session.
    pub worker: String,
    /// The SQL engine.
    pub engine: Engine,
    /// Record size limits.
    pub limits: Limits,
    /// Where counts go.
    pub metrics: StreamMetrics,
    /// Open taps (`etlmesh tap`).
    pub taps: std::sync::Arc<etlmesh_sink::tap::TapHub>,
}

/// How often the loop wakes with no message, to roll files and close idle windows.
const TICK: Duration = Duration::from_millis(100);
/// Longest wait between two tries of a sink that is down.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

struct Stream {
    taps: std::sync::Arc<etlmesh_sink::tap::TapHub>,
    spec: PipelineSpec,
    batch: MicroBatch,
    decoder: MessageDecoder,
    transform: Transform,
    windows: Option<Windows>,
    dedup: Option<Dedup>,
    sinks: Vec<Box<dyn StreamSink>>,
    dead: DeadLetterLog,
    session: Session,
    /// Received, not yet acknowledged, in order of arrival.
    held: VecDeque<(u64, Ack)>,
    /// Newest message fully processed.
    processed: u64,
    metrics: StreamMetrics,
    shutdown: watch::Receiver<bool>,
    time_col: Option<usize>,
}

/// Runs the stream of pipeline `spec` until `shutdown` turns true; then it stops
/// reading, finishes and acknowledges what it holds, and leaves the group.
pub async fn run(
    spec: PipelineSpec,
    opts: StreamOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StreamError> {
    let err = |message: String| StreamError::Pipeline {
        pipeline: spec.name.clone(),
        message,
    };
    let mqtt = spec
        .mqtt()
        .cloned()
        .ok_or_else(|| err("has no mqtt source".into()))?;
    let fields = spec
        .schema
        .as_ref()
        .ok_or_else(|| err("a stream needs a declared schema".into()))?;
    let declared = etlmesh_codec::schema::arrow_schema(fields);
    let decoder = MessageDecoder::new(&mqtt, &declared, &spec.source.csv, opts.limits);
    let input = decoder.input_schema().clone();
    let windows = spec
        .window
        .clone()
        .map(|w| Windows::new(w, &input))
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
    let dead = DeadLetterLog::open(dl, &spec.name, &opts.worker).map_err(|e| err(e.to_string()))?;
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

    let client_id = source::client_id(&mqtt, &spec.name, &opts.worker);
    // The channel holds at least what the broker may send unacknowledged.
    let (session, rx, task) =
        source::start(&mqtt, &client_id, source::RECEIVE_MAXIMUM as usize + 1024).await?;
    tracing::info!(pipeline = %spec.name, client_id, filter = %mqtt.shared_filter(), sinks = sinks.len(), windowed = windows.is_some(), "stream started");
    let mut s = Stream {
        taps: opts.taps,
        batch: mqtt.batch,
        spec,
        decoder,
        transform,
        windows,
        dedup,
        sinks,
        dead,
        session,
        held: VecDeque::new(),
        processed: 0,
        metrics: opts.metrics,
        shutdown,
        time_col,
    };
    let r = s.run(rx).await;
    s.session.disconnect().await;
    task.abort();
    r
}

impl Stream {
    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn run(&mut self, mut rx: mpsc::Receiver<Delivery>) -> Result<(), StreamError> {
        let mut leaving: Option<Instant> = None;
        let mut buf: Vec<Delivery> = Vec::with_capacity(self.batch.records);
        let mut report = Instant::now();
        loop {
            if leaving.is_none() && self.stopping() {
                // Leave the group: the broker sends to the others from now on. What
                // already came is finished below, then acknowledged.
                self.session.leave().await;
                leaving = Some(Instant::now());
                tracing::info!(pipeline = %self.spec.name, held = self.held.len(), "stream draining");
            }
            // Collect a micro-batch: the first message (or a tick), then more until the
            // batch is full or its time is up.
            let first = tokio::select! {
                m = rx.recv() => m,
                () = tokio::time::sleep(TICK) => None,
                _ = self.shutdown.changed(), if leaving.is_none() => None,
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
                let batch: Vec<Delivery> = std::mem::take(&mut buf);
                if !self.process(batch).await? {
                    return Ok(());
                }
            }
            if !self
                .close_windows(leaving.is_some() && rx.is_empty())
                .await?
            {
                return Ok(());
            }
            let force =
                self.held.len() >= source::RECEIVE_MAXIMUM as usize / 2 || leaving.is_some();
            if !self.flush_sinks(force).await? {
                return Ok(());
            }
            self.acknowledge().await?;
            if report.elapsed() >= Duration::from_secs(10) {
                report = Instant::now();
                tracing::info!(pipeline = %self.spec.name, held = self.held.len(), processed = self.processed, dead_letters = self.dead.count(), open_windows = self.windows.as_ref().map_or(0, |w| w.open_count()), "stream progress");
            }
            if let Some(since) = leaving {
                let quiet = rx.is_empty() && self.held.is_empty();
                if quiet || since.elapsed() > Duration::from_secs(10) {
                    if !self.held.is_empty() {
                        tracing::warn!(pipeline = %self.spec.name, held = self.held.len(), "stopping with messages unacknowledged: the broker keeps them for this session");
                    }
                    tracing::info!(pipeline = %self.spec.name, "stream stopped");
                    return Ok(());
                }
            }
        }
    }

    /// One micro-batch. Returns false when the stream must stop (shutdown while a
    /// sink is down: nothing is acknowledged, the broker keeps the messages).
    async fn process(&mut self, mut batch: Vec<Delivery>) -> Result<bool, StreamError> {
        let started = Instant::now();
        let last = batch.last().map_or(self.processed, |d| d.seq);
        self.metrics
            .messages(&self.spec.name, "received", batch.len() as u64);
        let decoded = self.decoder.decode(&batch);
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
            for b in &inputs {
                let seqs = decoded.lines.row_seqs(b);
                let added = w.add(&b.batch, &seqs).map_err(|m| StreamError::Pipeline {
                    pipeline: self.spec.name.clone(),
                    message: m,
                })?;
                self.metrics
                    .records(&self.spec.name, "late", added.late.len() as u64);
                for i in &added.late {
                    let r = b.provenance.reject(
                        &b.batch,
                        *i,
                        Stage::Late,
                        format!(
                            "late: its window closed (watermark {})",
                            w.watermark().map_or("-".into(), fmt_ms)
                        ),
                    );
                    rejects.push(
                        decoded
                            .lines
                            .place(r)
                            .in_field(self.spec.window.as_ref().map_or("", |w| w.time.as_str())),
                    );
                }
                for i in &added.untimed {
                    let r =
                        b.provenance
                            .reject(&b.batch, *i, Stage::Cast, "no event time".to_string());
                    rejects.push(decoded.lines.place(r));
                }
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
            self.held.push_back((d.seq, d.ack));
        }
        // Dead letters first: they are flushed at once and never refuse.
        self.dead_letter(&rejects)?;
        let ok = self.load(&outputs, last, &inputs, &decoded.lines).await?;
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
        let Some(first) = rejects.first() else {
            return Ok(());
        };
        tracing::info!(
            pipeline = %self.spec.name,
            error_kind = %format_args!("bad_record.{}", first.stage.as_str()),
            records = rejects.len(),
            "{} records dead-lettered; first: {first}",
            rejects.len()
        );
        self.taps.offer_rejects(&self.spec.name, rejects);
        self.dead.write(rejects).map_err(|e| StreamError::Sink {
            pipeline: self.spec.name.clone(),
            message: format!("cannot write dead letters: {e}"),
        })?;
        self.metrics
            .records(&self.spec.name, "dead_lettered", rejects.len() as u64);
        Ok(())
    }

    /// Writes rows to every sink, retrying those that are down. Rows a sink refuses go
    /// to the dead letters. Returns false on shutdown while a sink is still down.
    async fn load(
        &mut self,
        outputs: &[RecordBatch],
        seq: u64,
        inputs: &[DecodedBatch],
        lines: &LineMap,
    ) -> Result<bool, StreamError> {
        let rows: u64 = outputs.iter().map(|b| b.num_rows() as u64).sum();
        if self.taps.is_tapped() {
            for b in outputs {
                self.taps.offer_batch(&self.spec.name, TapStage::Output, b);
            }
        }
        let mut refused: Option<String> = None;
        for i in 0..self.sinks.len() {
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.sinks[i].write(outputs, seq).await {
                    Ok(()) => break,
                    Err(SinkFailure::Retry(m)) => {
                        let sink = self.sinks[i].describe();
                        self.metrics.sink_retry(&self.spec.name, &sink);
                        tracing::warn!(pipeline = %self.spec.name, sink, error = %m, retry_in_ms = backoff.as_millis() as u64, held = self.held.len(), "sink unavailable: holding the batch (nothing is acknowledged)");
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            _ = self.shutdown.changed() => {}
                        }
                        if self.stopping() {
                            tracing::warn!(pipeline = %self.spec.name, sink, "stopping while the sink is down: the broker keeps the unacknowledged messages");
                            return Ok(false);
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    Err(SinkFailure::Refused(m)) => {
                        tracing::error!(pipeline = %self.spec.name, sink = %self.sinks[i].describe(), error = %m, "the sink refused a batch: its records go to the dead letters");
                        refused = Some(m);
                        // The other sinks still count this batch as handled.
                        break;
                    }
                    Err(SinkFailure::Fatal(m)) => {
                        return Err(StreamError::Sink {
                            pipeline: self.spec.name.clone(),
                            message: m,
                        });
                    }
                }
            }
        }
        if let Some(reason) = refused {
            let reason = format!("refused by a sink: {reason}");
            let mut rejects: Vec<Reject> = inputs
                .iter()
                .flat_map(|b| reject_rows(b, Stage::Transform, &reason, lines))
                .collect();
            if inputs.is_empty() {
                // Window output: no input provenance; keep the rows themselves.
                let src: Arc<str> = Arc::from("window");
                for b in outputs {
                    for r in 0..b.num_rows() {
                        rejects.push(Reject::new(
                            &src,
                            Stage::Transform,
                            format!("refused by a sink: {reason}"),
                            row_as_json(b, r),
                        ));
                    }
                }
            }
            self.dead_letter(&rejects)?;
        } else {
            self.metrics.records(&self.spec.name, "out", rows);
        }
        Ok(true)
    }

    /// Runs the SQL over windows that closed and loads the results.
    async fn close_windows(&mut self, all: bool) -> Result<bool, StreamError> {
        let Some(w) = &mut self.windows else {
            return Ok(true);
        };
        let closed = w
            .due(Instant::now(), all)
            .map_err(|m| StreamError::Pipeline {
                pipeline: self.spec.name.clone(),
                message: m,
            })?;
        self.metrics.open_windows(&self.spec.name, w.open_count());
        if closed.is_empty() {
            return Ok(true);
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
        self.dead_letter(&rejects)?;
        self.load(&outputs, self.processed, &[], &LineMap::default())
            .await
    }

    async fn flush_sinks(&mut self, force: bool) -> Result<bool, StreamError> {
        for i in 0..self.sinks.len() {
            match self.sinks[i].flush(force).await {
                Ok(()) => {}
                Err(SinkFailure::Fatal(m)) | Err(SinkFailure::Refused(m)) => {
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

    /// Acknowledges, in order, the messages every sink committed and no open window holds.
    async fn acknowledge(&mut self) -> Result<(), StreamError> {
        let mut upto = self.processed;
        for s in &self.sinks {
            upto = upto.min(s.committed());
        }
        if let Some(min) = self.windows.as_ref().and_then(|w| w.min_open_seq()) {
            upto = upto.min(min.saturating_sub(1));
        }
        let mut acks = Vec::new();
        while self.held.front().is_some_and(|(seq, _)| *seq <= upto) {
            if let Some((_, a)) = self.held.pop_front() {
                acks.push(a);
            }
        }
        if !acks.is_empty() {
            let n = acks.len() as u64;
            self.session.ack(acks).await?;
            self.metrics.messages(&self.spec.name, "acknowledged", n);
        }
        self.metrics.held(&self.spec.name, self.held.len());
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

fn fmt_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}
