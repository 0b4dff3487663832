//! Dead letters through the admin API, for the dashboard:
//! `GET /api/v1/deadletters/{pipeline}` (reasons by count, the newest letters) and
//! `POST /api/v1/deadletters/{pipeline}/replay` (the original records through the
//! pipeline as the file says now; `dry_run` to see first).
//!
//! Both run `etlmesh deadletters list|replay --json` with the control plane's pipeline
//! file, as a child process: the control plane does not link the engine, and a replay
//! gone wrong ends that process, not this one. One replay runs at a time, for at most
//! [`REPLAY_LIMIT`]. When the file declares API tokens, a replay needs one that may
//! run jobs of that pipeline (`Authorization: Bearer …`), as batch jobs do.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::response::{IntoResponse, Response};
use axum::{Json, http::HeaderMap};
use etlmesh_http::json_response;
use serde::Deserialize;

use crate::ControlState;
use crate::refusal::Refusal;

/// A replay that takes longer is stopped.
pub const REPLAY_LIMIT: Duration = Duration::from_secs(600);
/// Listing takes at most this long.
const LIST_LIMIT: Duration = Duration::from_secs(60);
/// The child's answer is read up to this size.
const MAX_ANSWER: usize = 16 << 20;

/// Which letters: as `etlmesh deadletters --since/--where/--id`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Picked {
    since: Option<String>,
    #[serde(default, rename = "where")]
    wheres: Vec<String>,
    #[serde(default)]
    ids: Vec<String>,
    limit: Option<usize>,
}

/// `GET` query: one `where` at most (the dashboard's reason filter).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    since: Option<String>,
    #[serde(rename = "where")]
    filter: Option<String>,
    limit: Option<usize>,
}

/// `POST …/replay` body.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ReplayBody {
    #[serde(flatten)]
    picked: Picked,
    #[serde(default)]
    dry_run: bool,
}

pub(crate) async fn list(
    State(st): State<Arc<ControlState>>,
    UrlPath(pipeline): UrlPath<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    let picked = Picked {
        since: q.since,
        wheres: q.filter.into_iter().collect(),
        ids: Vec::new(),
        limit: q.limit,
    };
    deadletters_command(&st, "list", &pipeline, &picked, false, LIST_LIMIT).await
}

pub(crate) async fn replay(
    State(st): State<Arc<ControlState>>,
    UrlPath(pipeline): UrlPath<String>,
    headers: HeaderMap,
    body: Option<Json<ReplayBody>>,
) -> Response {
    let body = body.map(|b| b.0).unwrap_or_default();
    if let Some(config) = st.jobs.as_ref().map(|j| j.config().to_path_buf())
        && let Some(refusal) = refusal(&config, &headers, &pipeline)
    {
        return refusal.into_response();
    }
    let Ok(_one) = st.replaying.try_lock() else {
        return Refusal::ReplayRunning.into_response();
    };
    tracing::info!(%pipeline, dry_run = body.dry_run, "dead letters: replay asked through the API");
    deadletters_command(
        &st,
        "replay",
        &pipeline,
        &body.picked,
        body.dry_run,
        REPLAY_LIMIT,
    )
    .await
}

/// Runs `etlmesh deadletters ACTION … --json` and answers with its JSON.
async fn deadletters_command(
    st: &ControlState,
    action: &str,
    pipeline: &str,
    picked: &Picked,
    dry_run: bool,
    limit: Duration,
) -> Response {
    let Some(jobs) = &st.jobs else {
        return Refusal::NoPipelineFile {
            what: "see dead letters",
        }
        .into_response();
    };
    let mut cmd = tokio::process::Command::new(jobs.exe());
    cmd.args(["deadletters", action, "--json", "-c"])
        .arg(jobs.config())
        .args(["--limit", &picked.limit.unwrap_or(50).min(1000).to_string()]);
    if let Some(s) = &picked.since {
        cmd.args(["--since", s]);
    }
    for w in &picked.wheres {
        cmd.args(["--where", w]);
    }
    for id in &picked.ids {
        cmd.args(["--id", id]);
    }
    if dry_run {
        cmd.arg("--dry-run");
    }
    // After `--`, the pipeline's name is never taken for an option.
    cmd.arg("--").arg(pipeline).kill_on_drop(true);
    let out = match tokio::time::timeout(limit, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            return Refusal::DeadLettersFailed(e).into_response();
        }
        Err(_) => {
            return Refusal::DeadLettersTimeout {
                action: action.to_string(),
                limit,
            }
            .into_response();
        }
    };
    let stdout = &out.stdout[..out.stdout.len().min(MAX_ANSWER)];
    match (
        out.status.success(),
        serde_json::from_slice::<serde_json::Value>(stdout),
    ) {
        (true, Ok(v)) => {
            if action == "replay" {
                tracing::info!(%pipeline, dry_run, replayed = %v["replayed"], failed = %v["failed"], rows = %v["rows_out"], "dead letters replayed through the API");
            }
            json_response(&v)
        }
        _ => {
            let err = String::from_utf8_lossy(&out.stderr);
            let msg = err.trim();
            Refusal::DeadLettersRefused {
                message: msg.chars().take(4000).collect(),
                not_found: msg.contains("no pipeline named") || msg.contains("no dead_letter sink"),
            }
            .into_response()
        }
    }
}

/// With tokens in the file, only one that may run jobs of `pipeline` may replay: the
/// answer to anyone else.
fn refusal(config: &Path, headers: &HeaderMap, pipeline: &str) -> Option<Refusal> {
    let file = etlmesh_config::PipelineFile::load(config).ok()?;
    let tokens = &file.spec.platform.access.tokens;
    if tokens.is_empty() {
        return None;
    }
    let Some(token) = etlmesh_http::bearer_token(headers) else {
        return Some(Refusal::Unauthorized(
            "replaying dead letters needs an API token that may run jobs of this pipeline: send `Authorization: Bearer TOKEN`",
        ));
    };
    let digest = etlmesh_tls::sha256(token.as_bytes());
    let holder = tokens.iter().find(|t| t.sha256 == digest);
    match holder {
        Some(t) if t.jobs && t.allows(pipeline) => {
            tracing::info!(token = %t.name, %pipeline, "dead-letter replay authorized");
            None
        }
        Some(t) => Some(Refusal::Forbidden(format!(
            "token `{}` may not run jobs of pipeline `{pipeline}`: give it `jobs: true` and the pipeline in platform.access.tokens",
            t.name
        ))),
        None => Some(Refusal::Unauthorized("unknown API token")),
    }
}
