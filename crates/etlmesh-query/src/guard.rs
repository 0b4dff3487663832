//! Only queries run: a statement is checked before it is planned, and the plan again
//! after (DataFusion's `SQLOptions`: no DDL, no DML, no `SET`).

use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::Statement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;

use crate::QueryError;

const ONLY: &str = "only queries run here (SELECT … or WITH … SELECT …, or EXPLAIN of one)";

/// `Ok` for a query or the EXPLAIN of one; a refusal naming the statement otherwise.
pub(crate) fn check_statement(statement: &Statement) -> Result<(), QueryError> {
    match statement {
        Statement::Statement(s) => match s.as_ref() {
            SqlStatement::Query(_) => Ok(()),
            SqlStatement::Explain { statement, .. } => {
                check_statement(&Statement::Statement(statement.clone()))
            }
            other => Err(QueryError::Refused(format!(
                "`{}` is refused: {ONLY}; the datasets are read-only",
                first_words(&other.to_string())
            ))),
        },
        Statement::Explain(e) => check_statement(&e.statement),
        Statement::CopyTo(_) => Err(QueryError::Refused(format!(
            "`COPY` is refused: it writes files; {ONLY}. Fetch the answer as Parquet or CSV with the Accept header instead"
        ))),
        Statement::CreateExternalTable(_) => Err(QueryError::Refused(format!(
            "`CREATE EXTERNAL TABLE` is refused: queries read only the pipelines' datasets; {ONLY}"
        ))),
        Statement::Reset(_) => Err(QueryError::Refused(format!("`RESET` is refused: {ONLY}"))),
    }
}

/// The planned statement reads and nothing else.
pub(crate) fn check_plan(plan: &LogicalPlan) -> Result<(), QueryError> {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(plan)
        .map_err(|e| QueryError::Refused(format!("{}; {ONLY}", crate::message(&e))))
}

fn first_words(sql: &str) -> String {
    sql.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    fn check(sql: &str) -> Result<(), QueryError> {
        let state = SessionContext::new().state();
        let s = state
            .sql_to_statement(sql, &datafusion::config::Dialect::Generic)
            .expect("parses");
        check_statement(&s)
    }

    #[test]
    fn queries_pass_and_everything_else_is_refused() {
        assert!(check("SELECT 1").is_ok());
        assert!(check("WITH a AS (SELECT 1 AS x) SELECT x FROM a").is_ok());
        assert!(check("EXPLAIN SELECT 1").is_ok());
        for (sql, says) in [
            (
                "CREATE EXTERNAL TABLE p STORED AS CSV LOCATION '/etc/passwd'",
                "CREATE EXTERNAL TABLE",
            ),
            ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY"),
            ("CREATE TABLE t AS SELECT 1", "CREATE TABLE"),
            ("DROP TABLE t", "DROP TABLE"),
            ("INSERT INTO t VALUES (1)", "INSERT INTO"),
            ("SET datafusion.execution.batch_size = 1", "SET"),
            ("EXPLAIN COPY (SELECT 1) TO '/tmp/x.csv'", "COPY"),
        ] {
            match check(sql) {
                Err(QueryError::Refused(m)) => assert!(m.contains(says), "{sql}: {m}"),
                other => panic!("{sql}: {other:?}"),
            }
        }
    }
}
