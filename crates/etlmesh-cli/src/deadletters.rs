//! `etlmesh deadletters list|show|replay -c FILE PIPELINE`: a pipeline's dead letters
//! by reason, in full, and replayed through the pipeline as it is now.

use std::collections::BTreeMap;

use etlmesh_config::PipelineFile;
use etlmesh_deadletters::{Outcome, Selection, Store, Stored};

use crate::{CliError, ConfigArg, runtime};

/// Arguments of `deadletters`.
#[derive(Debug, clap::Args)]
pub struct DeadLettersArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// `deadletters` actions.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Count the letters by stage, field and reason, and list the newest.
    List(Picked),
    /// Print the letters in full (NDJSON, with their id, file and line).
    Show(Picked),
    /// Send the letters' original records through the pipeline as it is now, into its
    /// sinks; replayed letters are moved aside, those that fail again are written anew
    /// with their new reason.
    Replay {
        #[command(flatten)]
        picked: Picked,
        /// Decode and run the SQL, report, and load or move nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// The pipeline and which of its letters.
#[derive(Debug, clap::Args)]
pub struct Picked {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The pipeline.
    pub pipeline: String,
    /// Only letters written since then: an RFC 3339 time, or a duration ago (30m, 2h).
    #[arg(long)]
    pub since: Option<String>,
    /// Only letters where KEY~TEXT (contains, ignoring case) or KEY=TEXT holds; KEY is
    /// reason, stage, field or source. Repeat for more.
    #[arg(long = "where", value_name = "KEY~TEXT")]
    pub wheres: Vec<String>,
    /// Only the letters with these ids (or id prefixes), as `list` prints them.
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// At most this many letters listed (list) or printed (show).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print one JSON document (list, replay): what the control plane's API and the
    /// dashboard read.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn deadletters(args: &DeadLettersArgs) -> Result<(), CliError> {
    match &args.action {
        Action::List(p) => {
            let (_, store, picked) = open(p)?;
            if p.json {
                println!("{}", list_json(p, &store, &picked));
            } else {
                list(p, &store, &picked);
            }
            Ok(())
        }
        Action::Show(p) => {
            let (_, _, picked) = open(p)?;
            for s in picked.iter().rev().take(p.limit).rev() {
                let mut v = serde_json::to_value(&s.letter).map_err(CliError::from)?;
                if let Some(o) = v.as_object_mut() {
                    o.insert("id".into(), s.id.clone().into());
                    o.insert(
                        "file".into(),
                        format!("{}:{}", s.file.display(), s.line).into(),
                    );
                }
                println!("{v}");
            }
            Ok(())
        }
        Action::Replay { picked: p, dry_run } => {
            let (file, store, picked) = open(p)?;
            if picked.is_empty() {
                if p.json {
                    println!(
                        "{}",
                        serde_json::json!({ "pipeline": p.pipeline, "letters": 0, "replayed": 0, "failed": 0, "kept": 0, "rows_out": 0, "dry_run": dry_run })
                    );
                } else {
                    println!("no dead letters of pipeline {} to replay", p.pipeline);
                }
                return Ok(());
            }
            let rt = runtime(2)?;
            let report = rt
                .block_on(etlmesh_deadletters::replay(
                    &file,
                    &p.pipeline,
                    &store,
                    picked,
                    *dry_run,
                ))
                .map_err(CliError::from)?;
            if p.json {
                println!("{}", replay_json(&p.pipeline, &report));
                return Ok(());
            }
            let (replayed, failed, kept) = report.counts();
            let verb = if report.dry_run { "would be" } else { "were" };
            println!(
                "{} letters of pipeline {}: {replayed} replayed, {failed} failed again, {kept} kept",
                report.outcomes.len(),
                p.pipeline
            );
            println!(
                "rows: {} {verb} loaded into {}, {} filtered out by the SQL, {} refused by a sink",
                report.rows_out,
                report.sinks.join(", "),
                report.rows_filtered,
                report.rows_refused
            );
            for (s, o) in &report.outcomes {
                match o {
                    Outcome::Replayed => {}
                    Outcome::Failed { stage, reason } => println!(
                        "  failed  {}  {}  {stage}: {reason}",
                        short(&s.id),
                        s.letter.place()
                    ),
                    Outcome::Kept(why) => {
                        println!("  kept    {}  {}  {why}", short(&s.id), s.letter.place())
                    }
                }
            }
            if let Some(d) = &report.dead_file {
                println!("letters that failed again: {}", d.display());
            }
            if let Some(l) = &report.ledger {
                println!("moved aside: {}", l.display());
            }
            if report.dry_run {
                println!("dry run: nothing was loaded or moved");
            }
            Ok(())
        }
    }
}

/// The pipeline file, its letters, and those selected.
fn open(p: &Picked) -> Result<(PipelineFile, Store, Vec<Stored>), CliError> {
    let file = PipelineFile::load(&p.config.config)?;
    let spec = file.pipeline(&p.pipeline)?;
    let Some(dl) = &spec.dead_letter else {
        return Err(CliError::Missing {
            file: format!("pipeline `{}`", p.pipeline),
            missing: "no dead_letter sink, so it keeps no dead letters".into(),
            help: "add `dead_letter: { type: ndjson, path: out/dead }` to it".into(),
        });
    };
    let store = Store::open(&dl.path, &p.pipeline).map_err(CliError::from)?;
    let select = Selection::parse(p.since.as_deref(), &p.wheres, &p.ids, chrono::Utc::now())
        .map_err(CliError::from)?;
    for u in store.unreadable() {
        eprintln!("warning: {u}");
    }
    let picked = store
        .letters()
        .iter()
        .filter(|s| select.matches(s))
        .cloned()
        .collect();
    Ok((file, store, picked))
}

fn list(p: &Picked, store: &Store, picked: &[Stored]) {
    println!(
        "{} dead letters of pipeline {} in {} ({} replayed before, hidden)",
        picked.len(),
        p.pipeline,
        store.dir().display(),
        store.hidden()
    );
    if picked.is_empty() {
        return;
    }
    let groups = by_reason(picked);
    println!("\n{:>7}  {:<9} {:<16} REASON", "COUNT", "STAGE", "FIELD");
    for ((stage, field, reason), n) in groups.iter().take(p.limit) {
        println!("{n:>7}  {stage:<9} {field:<16} {}", cut(reason, 100));
    }
    if groups.len() > p.limit {
        println!("  … {} more reasons", groups.len() - p.limit);
    }
    println!(
        "\n{:<12}  {:<24} {:<9} {:<40} REASON",
        "ID", "TIME", "STAGE", "FROM"
    );
    for s in picked.iter().rev().take(p.limit) {
        let l = &s.letter;
        println!(
            "{:<12}  {:<24} {:<9} {:<40} {}",
            short(&s.id),
            l.time,
            l.stage,
            cut(&l.place(), 40),
            cut(&l.reason, 80)
        );
    }
    if picked.len() > p.limit {
        println!("  … {} older letters (--limit)", picked.len() - p.limit);
    }
}

/// Reasons by count and the newest letters, as `list` prints them.
fn list_json(p: &Picked, store: &Store, picked: &[Stored]) -> serde_json::Value {
    let groups = by_reason(picked);
    let reasons: Vec<serde_json::Value> = groups
        .iter()
        .take(p.limit)
        .map(|((stage, field, reason), n)| serde_json::json!({ "count": n, "stage": stage, "field": field, "reason": reason }))
        .collect();
    let letters: Vec<serde_json::Value> = picked
        .iter()
        .rev()
        .take(p.limit)
        .map(|s| serde_json::json!({ "id": s.id, "time": s.letter.time, "stage": s.letter.stage, "from": s.letter.place(), "reason": s.letter.reason }))
        .collect();
    serde_json::json!({
        "pipeline": p.pipeline,
        "dir": store.dir().display().to_string(),
        "total": picked.len(),
        "replayed_before": store.hidden(),
        "reasons": reasons,
        "reasons_more": groups.len().saturating_sub(p.limit),
        "letters": letters,
    })
}

/// A replay's report as one JSON document.
fn replay_json(pipeline: &str, report: &etlmesh_deadletters::ReplayReport) -> serde_json::Value {
    let (replayed, failed, kept) = report.counts();
    let failures: Vec<serde_json::Value> = report
        .outcomes
        .iter()
        .filter_map(|(s, o)| match o {
            Outcome::Replayed => None,
            Outcome::Failed { stage, reason } => Some(serde_json::json!({ "id": s.id, "from": s.letter.place(), "outcome": "failed", "stage": stage, "reason": reason })),
            Outcome::Kept(why) => Some(serde_json::json!({ "id": s.id, "from": s.letter.place(), "outcome": "kept", "reason": why })),
        })
        .collect();
    serde_json::json!({
        "pipeline": pipeline,
        "letters": report.outcomes.len(),
        "replayed": replayed,
        "failed": failed,
        "kept": kept,
        "rows_out": report.rows_out,
        "rows_filtered": report.rows_filtered,
        "rows_refused": report.rows_refused,
        "sinks": report.sinks,
        "dry_run": report.dry_run,
        "failures": failures,
        "dead_file": report.dead_file.as_ref().map(|d| d.display().to_string()),
        "ledger": report.ledger.as_ref().map(|l| l.display().to_string()),
    })
}

/// (stage, field, reason) with their letters' count, most frequent first.
fn by_reason(picked: &[Stored]) -> Vec<((String, String, String), usize)> {
    let mut by: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for s in picked {
        let l = &s.letter;
        let key = (
            l.stage.clone(),
            l.field.clone().unwrap_or_default(),
            l.reason.clone(),
        );
        *by.entry(key).or_default() += 1;
    }
    let mut groups: Vec<_> = by.into_iter().collect();
    groups.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    groups
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
    out.push('…');
    out
}
