//! An engine planning error as a diagnostic on the pipeline file's line, with the SQL
//! line and a caret under the mistake.

use etlmesh_config::{Diagnostic, PipelineFile};
use etlmesh_engine::EngineError;

/// Places a SQL planning error in the file.
pub(crate) fn plan_diagnostic(
    file: &PipelineFile,
    pipeline: &str,
    err: &EngineError,
) -> Diagnostic {
    let field = format!("pipelines.{pipeline}.transform");
    match err {
        EngineError::Plan {
            message,
            position,
            help,
            ..
        } => {
            let mut d = file.diagnostic(field, format!("the SQL does not plan: {message}"));
            if let Some(pos) = position
                && let Some((line, col, text)) = file.sql_position(pipeline, pos.line, pos.column)
            {
                d.line = Some(line);
                d.column = Some(col);
                let gutter = format!("{line:>5} | ");
                let caret = format!(
                    "{}{}",
                    " ".repeat(gutter.len() + col - 1),
                    "^".repeat(pos.len)
                );
                d.snippet = Some(format!("{gutter}{text}\n{caret}"));
            }
            if let Some(h) = help {
                d.help = Some(h.clone());
            }
            d
        }
        other => file.diagnostic(field, other.to_string()),
    }
}
