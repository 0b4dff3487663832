//! `etlmesh top`: a live terminal view of the mesh (ratatui) — pipelines with their
//! rates, latency, replicas and errors, the workers with their load, a sparkline of
//! requests, and the latest scaling decisions and errors. It polls the control
//! plane's `/api/v1/overview` once a second; `q` or Esc quits. `--once` prints one
//! frame and exits (for scripts and terminals that are not terminals).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use etlmesh_http::JsonClient;
use ratatui::Terminal;
use ratatui::backend::{Backend, TestBackend};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table};
use serde::Deserialize;

use crate::CliError;
use crate::logs::ControlPlaneArg;

/// `etlmesh top`.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub cp: ControlPlaneArg,
    /// Refresh period.
    #[arg(long, default_value = "1s", value_parser = crate::mesh::duration)]
    pub interval: Duration,
    /// Print one frame to standard output and exit.
    #[arg(long)]
    pub once: bool,
    /// Frame width with --once.
    #[arg(long, default_value_t = 140)]
    pub width: u16,
    /// Frame height with --once.
    #[arg(long, default_value_t = 40)]
    pub height: u16,
}

/// The overview as `top` reads it (fields it does not show are ignored).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Overview {
    #[serde(default)]
    scaler: Option<String>,
    #[serde(default)]
    gateways: usize,
    #[serde(default)]
    pipelines: Vec<PipelineRow>,
    #[serde(default)]
    workers: Vec<WorkerRow>,
    #[serde(default)]
    series: Vec<Point>,
    #[serde(default)]
    scaling: Vec<ScaleRow>,
    #[serde(default)]
    errors_total: u64,
    #[serde(default)]
    errors: Vec<ErrorRow>,
}

#[derive(Debug, Default, Deserialize)]
struct PipelineRow {
    name: String,
    source: Option<String>,
    #[serde(default)]
    requests_per_sec: f64,
    #[serde(default)]
    records_per_sec: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    #[serde(default)]
    in_flight: u32,
    #[serde(default)]
    held: u32,
    #[serde(default)]
    ready: u32,
    desired: Option<u32>,
    #[serde(default)]
    errors_per_sec: f64,
    #[serde(default)]
    errors_total: u64,
}

#[derive(Debug, Default, Deserialize)]
struct WorkerLoad {
    #[serde(default)]
    in_flight: u32,
    #[serde(default)]
    ewma_latency_ms: f64,
    #[serde(default)]
    records_per_sec: f64,
    #[serde(default)]
    cpu_percent: f64,
    #[serde(default)]
    rss_bytes: u64,
    #[serde(default)]
    pipelines: std::collections::BTreeMap<String, WorkerPipeline>,
}

/// What a worker reports of one pipeline's source.
#[derive(Debug, Default, Deserialize)]
struct WorkerPipeline {
    source_pending: Option<u64>,
    #[serde(default)]
    partitions: Vec<PartitionRow>,
}

#[derive(Debug, Default, Deserialize)]
struct PartitionRow {
    topic: String,
    partition: i32,
    lag: u64,
}

impl WorkerLoad {
    /// `topic partition:lag …` for the Kafka partitions it owns, else its sources'
    /// pending.
    fn source_lag(&self) -> String {
        self.pipelines
            .iter()
            .filter_map(|(name, u)| {
                if u.partitions.is_empty() {
                    u.source_pending.map(|p| format!("{name} {p}"))
                } else {
                    let mut by_topic: std::collections::BTreeMap<&str, Vec<String>> =
                        Default::default();
                    for p in &u.partitions {
                        by_topic
                            .entry(&p.topic)
                            .or_default()
                            .push(format!("{}:{}", p.partition, p.lag));
                    }
                    Some(
                        by_topic
                            .into_iter()
                            .map(|(t, ps)| format!("{t} {}", ps.join(" ")))
                            .collect::<Vec<_>>()
                            .join(", "),
                    )
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[derive(Debug, Default, Deserialize)]
struct WorkerRow {
    id: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    pipelines: Vec<String>,
    #[serde(default)]
    load: WorkerLoad,
    #[serde(default)]
    uptime_secs: u64,
}

#[derive(Debug, Default, Deserialize)]
struct PointStats {
    #[serde(default)]
    requests_per_sec: f64,
}

#[derive(Debug, Default, Deserialize)]
struct Point {
    t: i64,
    #[serde(default)]
    pipelines: std::collections::BTreeMap<String, PointStats>,
}

#[derive(Debug, Default, Deserialize)]
struct ScaleRow {
    time: String,
    pipeline: String,
    from: u32,
    to: u32,
    reason: String,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorRow {
    kind: String,
    pipeline: Option<String>,
    count: u64,
    level: String,
    last_seen: String,
}

/// What the view shows: the latest overview and the requests per second over time.
#[derive(Debug, Default)]
pub(crate) struct TopState {
    overview: Overview,
    requests: VecDeque<u64>,
    last_t: i64,
    status: String,
}

const HISTORY: usize = 300;

impl TopState {
    /// Takes a new overview (its series extends the history).
    pub(crate) fn update(&mut self, o: Overview) {
        for p in &o.series {
            if p.t > self.last_t {
                let total: f64 = p.pipelines.values().map(|s| s.requests_per_sec).sum();
                if self.requests.len() == HISTORY {
                    self.requests.pop_front();
                }
                self.requests.push_back(total.round() as u64);
                self.last_t = p.t;
            }
        }
        self.overview = o;
        self.status = format!("updated {}", chrono::Local::now().format("%H:%M:%S"));
    }
}

fn num(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0}", v)
    } else {
        format!("{v:.1}")
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.2}"))
}

fn header(s: &TopState) -> Paragraph<'static> {
    let o = &s.overview;
    let rps: f64 = o.pipelines.iter().map(|p| p.requests_per_sec).sum();
    let recs: f64 = o.pipelines.iter().map(|p| p.records_per_sec).sum();
    let b = Style::default().add_modifier(Modifier::BOLD);
    Paragraph::new(Line::from(vec![
        Span::styled("etlmesh top  ", b.fg(Color::Cyan)),
        Span::raw("gateways "),
        Span::styled(o.gateways.to_string(), b),
        Span::raw("  workers "),
        Span::styled(o.workers.len().to_string(), b),
        Span::raw("  requests/s "),
        Span::styled(num(rps), b),
        Span::raw("  records/s "),
        Span::styled(num(recs), b),
        Span::raw("  errors "),
        Span::styled(
            o.errors_total.to_string(),
            if o.errors_total > 0 {
                b.fg(Color::Red)
            } else {
                b
            },
        ),
        Span::raw("  scaler "),
        Span::styled(o.scaler.clone().unwrap_or_else(|| "fixed".into()), b),
        Span::raw(format!("   {}  (q quits)", s.status)),
    ]))
}

fn pipelines(o: &Overview) -> Table<'static> {
    let head = Row::new([
        "pipeline",
        "source",
        "req/s",
        "rec/s",
        "p50 ms",
        "p99 ms",
        "in fl",
        "held",
        "ready/want",
        "5xx/s",
        "errors",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let rows = o.pipelines.iter().map(|p| {
        Row::new([
            Cell::from(p.name.clone()),
            Cell::from(p.source.clone().unwrap_or_default()),
            Cell::from(num(p.requests_per_sec)),
            Cell::from(num(p.records_per_sec)),
            Cell::from(ms(p.p50_ms)),
            Cell::from(ms(p.p99_ms)),
            Cell::from(p.in_flight.to_string()),
            Cell::from(p.held.to_string()),
            Cell::from(format!(
                "{}/{}",
                p.ready,
                p.desired.map_or("–".to_string(), |d| d.to_string())
            )),
            Cell::from(num(p.errors_per_sec)),
            Cell::from(p.errors_total.to_string()),
        ])
    });
    Table::new(
        rows,
        [
            Constraint::Min(18),
            Constraint::Min(14),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(6),
            Constraint::Length(5),
            Constraint::Length(10),
            Constraint::Length(6),
            Constraint::Length(7),
        ],
    )
    .header(head)
    .block(Block::default().borders(Borders::ALL).title(" pipelines "))
}

fn workers(o: &Overview) -> Table<'static> {
    let head = Row::new([
        "worker",
        "state",
        "pipelines",
        "in fl",
        "EWMA ms",
        "rec/s",
        "CPU %",
        "RSS MiB",
        "up s",
        "source lag",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let rows = o.workers.iter().map(|w| {
        let color = match w.state.as_str() {
            "ready" => Color::Green,
            "draining" => Color::Yellow,
            _ => Color::Gray,
        };
        Row::new([
            Cell::from(w.id.clone()),
            Cell::from(Span::styled(w.state.clone(), Style::default().fg(color))),
            Cell::from(w.pipelines.join(",")),
            Cell::from(w.load.in_flight.to_string()),
            Cell::from(format!("{:.2}", w.load.ewma_latency_ms)),
            Cell::from(num(w.load.records_per_sec)),
            Cell::from(format!("{:.1}", w.load.cpu_percent)),
            Cell::from(format!("{:.1}", w.load.rss_bytes as f64 / 1_048_576.0)),
            Cell::from(w.uptime_secs.to_string()),
            Cell::from(w.load.source_lag()),
        ])
    });
    Table::new(
        rows,
        [
            Constraint::Min(18),
            Constraint::Length(9),
            Constraint::Min(16),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(6),
            Constraint::Min(26),
        ],
    )
    .header(head)
    .block(Block::default().borders(Borders::ALL).title(" workers "))
}

fn events(o: &Overview) -> Paragraph<'static> {
    let mut lines: Vec<Line<'static>> = o
        .scaling
        .iter()
        .rev()
        .take(6)
        .map(|e| {
            Line::from(format!(
                "{} {} {}→{} {}",
                e.time.get(11..19).unwrap_or(&e.time),
                e.pipeline,
                e.from,
                e.to,
                e.reason
            ))
        })
        .collect();
    if lines.is_empty() {
        lines.push(Line::from("no scaling decision yet"));
    }
    Paragraph::new(lines).block(
        Block::default()
            .borders(Borders::ALL)
            .title(" scaling decisions "),
    )
}

fn errors(o: &Overview) -> Paragraph<'static> {
    let mut lines: Vec<Line<'static>> = o
        .errors
        .iter()
        .take(6)
        .map(|g| {
            let style = if g.level == "ERROR" || g.level == "WARN" {
                Style::default().fg(Color::Red)
            } else {
                Style::default()
            };
            Line::from(vec![
                Span::styled(format!("{:>6} ", g.count), style),
                Span::raw(format!(
                    "{} {} {}",
                    g.kind,
                    g.pipeline.as_deref().unwrap_or("-"),
                    g.last_seen.get(11..19).unwrap_or(&g.last_seen)
                )),
            ])
        })
        .collect();
    if lines.is_empty() {
        lines.push(Line::from("no errors"));
    }
    Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" errors "))
}

/// Draws the whole view into `area`.
pub(crate) fn draw(f: &mut ratatui::Frame<'_>, s: &TopState) {
    let o = &s.overview;
    let area: Rect = f.area();
    let [head, pipes, spark, work, bottom] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(o.pipelines.len() as u16 + 3),
        Constraint::Length(5),
        Constraint::Min(5),
        Constraint::Length(8),
    ])
    .areas(area);
    f.render_widget(header(s), head);
    f.render_widget(pipelines(o), pipes);
    let data: Vec<u64> = s.requests.iter().copied().collect();
    let width = spark.width.saturating_sub(2) as usize;
    let shown = &data[data.len().saturating_sub(width)..];
    f.render_widget(
        Sparkline::default()
            .block(Block::default().borders(Borders::ALL).title(format!(
                " requests/s (max {} over {} s) ",
                shown.iter().max().copied().unwrap_or(0),
                shown.len()
            )))
            .data(shown)
            .style(Style::default().fg(Color::Cyan)),
        spark,
    );
    f.render_widget(workers(o), work);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(bottom);
    f.render_widget(events(o), left);
    f.render_widget(errors(o), right);
}

/// The frame as text, one line per row (what `--once` prints).
pub(crate) fn render_text(s: &TopState, width: u16, height: u16) -> Result<String, CliError> {
    let mut term = Terminal::new(TestBackend::new(width, height))
        .map_err(|e| CliError::Draw(e.to_string()))?;
    term.draw(|f| draw(f, s))
        .map_err(|e| CliError::Draw(e.to_string()))?;
    let buf = term.backend().buffer();
    let mut out = String::new();
    for y in 0..buf.area.height {
        let mut line = String::new();
        for x in 0..buf.area.width {
            line.push_str(buf[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out)
}

async fn fetch(client: &JsonClient, base: &str, since: i64) -> Result<Overview, String> {
    client
        .get(&format!("{base}/api/v1/overview?since={since}"))
        .await
        .map_err(|e| e.to_string())
}

pub(crate) fn top(args: &TopArgs) -> Result<(), CliError> {
    let base = args.cp.base();
    let rt = crate::runtime(1)?;
    let client = JsonClient::new(Duration::from_secs(3));
    let mut state = TopState::default();
    if args.once {
        let o = rt
            .block_on(fetch(&client, &base, 0))
            .map_err(|e| crate::logs::unreachable(&base, e))?;
        state.update(o);
        print!("{}", render_text(&state, args.width, args.height)?);
        return Ok(());
    }
    let mut terminal = ratatui::init();
    let result = run(
        &rt,
        &client,
        &base,
        args.interval,
        &mut terminal,
        &mut state,
    );
    ratatui::restore();
    result
}

fn run<B: Backend>(
    rt: &tokio::runtime::Runtime,
    client: &JsonClient,
    base: &str,
    interval: Duration,
    terminal: &mut Terminal<B>,
    state: &mut TopState,
) -> Result<(), CliError> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    let draw_err = |e: B::Error| CliError::Draw(e.to_string());
    loop {
        match rt.block_on(fetch(client, base, state.last_t)) {
            Ok(o) => state.update(o),
            Err(e) => state.status = format!("control plane {base}: {e}"),
        }
        terminal.draw(|f| draw(f, state)).map_err(draw_err)?;
        let until = Instant::now() + interval;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            let ready = event::poll(left).map_err(CliError::io("read the terminal"))?;
            if !ready {
                break;
            }
            if let Ok(Event::Key(k)) = event::read() {
                let quit = matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                    || (k.code == KeyCode::Char('c')
                        && k.modifiers.contains(KeyModifiers::CONTROL));
                if quit {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVERVIEW: &str = r#"{
      "time": 1795727262469, "scaler": "process", "gateways": 1,
      "pipelines": [
        {"name": "clean_readings", "source": "http", "sinks": ["parquet:out/clean"],
         "requests_per_sec": 812.5, "errors_per_sec": 1.5, "p50_ms": 3.25, "p99_ms": 41.5,
         "in_flight": 7, "held": 0, "records_per_sec": 40250.0, "ready": 2, "desired": 3,
         "errors_total": 12},
        {"name": "live_readings", "source": "mqtt:demo/{device_id}/reading",
         "requests_per_sec": 0.0, "p50_ms": null, "p99_ms": null, "in_flight": 0, "held": 0,
         "records_per_sec": 950.0, "ready": 1, "desired": 1, "errors_total": 0}
      ],
      "workers": [
        {"id": "clean_readings-1", "address": "http://127.0.0.1:1", "state": "ready",
         "pipelines": ["clean_readings"], "pid": 1, "last_heartbeat_ms": 200, "uptime_secs": 42,
         "load": {"in_flight": 4, "ewma_latency_ms": 2.5, "records_per_sec": 20000.0,
                  "cpu_percent": 55.0, "rss_bytes": 73400320, "requests_total": 9}},
        {"id": "clean_readings-2", "address": "http://127.0.0.1:2", "state": "draining",
         "pipelines": ["clean_readings"], "pid": 2, "last_heartbeat_ms": 100, "uptime_secs": 7,
         "load": {"in_flight": 0, "ewma_latency_ms": 0.0, "records_per_sec": 0.0,
                  "cpu_percent": 1.0, "rss_bytes": 1048576, "requests_total": 0}},
        {"id": "live-1", "address": "http://127.0.0.1:3", "state": "ready",
         "pipelines": ["live_readings"], "pid": 3, "last_heartbeat_ms": 100, "uptime_secs": 9,
         "load": {"in_flight": 0, "ewma_latency_ms": 0.0, "records_per_sec": 950.0,
                  "cpu_percent": 20.0, "rss_bytes": 1048576, "requests_total": 0,
                  "pipelines": {"live_readings": {"records_total": 9, "cpu_seconds_total": 1.0,
                    "source_pending": 125, "partitions": [
                      {"topic": "readings", "partition": 0, "lag": 120},
                      {"topic": "readings", "partition": 3, "lag": 5}]}}}}
      ],
      "series": [
        {"t": 1, "pipelines": {"clean_readings": {"requests_per_sec": 100.0}}},
        {"t": 2, "pipelines": {"clean_readings": {"requests_per_sec": 812.5}}}
      ],
      "scaling": [{"time": "2026-11-26T21:00:05.000Z", "pipeline": "clean_readings",
                   "from": 2, "to": 3, "reason": "in flight 7.0 over target 2.0"}],
      "errors_total": 12,
      "errors": [{"kind": "deadline_exceeded", "pipeline": "clean_readings", "level": "WARN",
                  "count": 12, "first_seen": "2026-11-26T20:59:00.000Z",
                  "last_seen": "2026-11-26T21:00:01.000Z", "last_message": "late",
                  "trace_ids": ["abc"], "sources": ["up"]}]
    }"#;

    #[test]
    fn renders_pipelines_workers_rates_and_errors() {
        let mut s = TopState::default();
        s.update(serde_json::from_str(OVERVIEW).expect("overview"));
        assert_eq!(s.requests, [100, 813]);
        let text = render_text(&s, 140, 40).expect("render");
        for want in [
            "etlmesh top",
            "gateways 1",
            "workers 3",
            "requests/s 812.5",
            "records/s 41200",
            "clean_readings",
            "mqtt:demo/{device_id}/reading",
            "3.25",
            "41.50",
            "2/3",
            "clean_readings-2",
            "draining",
            "70.0",
            "00:05 clean_readings 2→3 in flight 7.0 over target 2.0",
            "deadline_exceeded clean_readings",
            "requests/s (max 813 over 2 s)",
            "readings 0:120 3:5",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // The sparkline drew bars.
        assert!(text.contains('█'), "{text}");
    }

    #[test]
    fn a_series_is_not_counted_twice() {
        let mut s = TopState::default();
        s.update(serde_json::from_str(OVERVIEW).expect("overview"));
        s.update(serde_json::from_str(OVERVIEW).expect("overview"));
        assert_eq!(s.requests.len(), 2);
    }
}
