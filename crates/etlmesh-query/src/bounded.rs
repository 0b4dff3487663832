//! Functions that build what their arguments ask for — `repeat('ab', 1000000000)`,
//! `lpad('x', 2000000000)` — allocate it in one call, before any memory pool or time
//! limit can see it (also at planning time, when constant arguments are folded). Each
//! query's session has them replaced by versions that first compute what the call
//! would build, over the whole batch, and refuse past a bound tied to the query's
//! memory limit: the query fails with a clear error instead of taking the process.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Int64Type};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use datafusion::prelude::SessionContext;

/// What a bounded function's arguments say it builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Builds {
    /// `repeat(text, n)`: the text's bytes × n, per row.
    Repeat,
    /// `lpad(text, n[, fill])`, `rpad`: n characters (at most 4 bytes each), per row.
    Pad,
}

/// A function of DataFusion's, bounded.
#[derive(Debug)]
struct Bounded {
    inner: Arc<ScalarUDF>,
    builds: Builds,
    /// Bytes one call (one batch) may build.
    limit: usize,
}

impl PartialEq for Bounded {
    fn eq(&self, other: &Self) -> bool {
        self.inner == other.inner && self.builds == other.builds && self.limit == other.limit
    }
}

impl Eq for Bounded {}

impl std::hash::Hash for Bounded {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.inner.hash(state);
        self.builds.hash(state);
        self.limit.hash(state);
    }
}

/// The byte lengths of a text argument, one per row (a scalar counts for every row).
fn text_lengths(v: &ColumnarValue, rows: usize) -> Vec<u64> {
    match v {
        ColumnarValue::Scalar(s) => {
            let n = match s {
                ScalarValue::Utf8(Some(t))
                | ScalarValue::LargeUtf8(Some(t))
                | ScalarValue::Utf8View(Some(t)) => t.len() as u64,
                _ => 0,
            };
            vec![n; rows.max(1)]
        }
        ColumnarValue::Array(a) => array_text_lengths(a),
    }
}

fn array_text_lengths(a: &ArrayRef) -> Vec<u64> {
    let len = |i: usize, f: &dyn Fn(usize) -> usize| {
        if a.is_null(i) { 0 } else { f(i) as u64 }
    };
    match a.data_type() {
        DataType::Utf8 => {
            let s = a.as_string::<i32>();
            (0..a.len())
                .map(|i| len(i, &|i| s.value(i).len()))
                .collect()
        }
        DataType::LargeUtf8 => {
            let s = a.as_string::<i64>();
            (0..a.len())
                .map(|i| len(i, &|i| s.value(i).len()))
                .collect()
        }
        DataType::Utf8View => {
            let s = a.as_string_view();
            (0..a.len())
                .map(|i| len(i, &|i| s.value(i).len()))
                .collect()
        }
        _ => vec![0; a.len()],
    }
}

/// The values of a count argument, one per row (negative and null as 0).
fn counts(v: &ColumnarValue, rows: usize) -> Vec<u64> {
    match v {
        ColumnarValue::Scalar(s) => {
            let n = s
                .cast_to(&DataType::Int64)
                .ok()
                .and_then(|s| match s {
                    ScalarValue::Int64(Some(n)) => Some(n.max(0) as u64),
                    _ => None,
                })
                .unwrap_or(0);
            vec![n; rows.max(1)]
        }
        ColumnarValue::Array(a) => match arrow::compute::cast(a, &DataType::Int64) {
            Ok(a) => {
                let a = a.as_primitive::<Int64Type>();
                (0..a.len())
                    .map(|i| {
                        if a.is_null(i) {
                            0
                        } else {
                            a.value(i).max(0) as u64
                        }
                    })
                    .collect()
            }
            Err(_) => vec![0; a.len()],
        },
    }
}

impl Bounded {
    /// Bytes the call would build.
    fn would_build(&self, args: &ScalarFunctionArgs) -> u64 {
        let rows = args.number_rows;
        let (Some(text), Some(n)) = (args.args.first(), args.args.get(1)) else {
            return 0;
        };
        let n = counts(n, rows);
        match self.builds {
            Builds::Repeat => text_lengths(text, rows)
                .iter()
                .zip(&n)
                .fold(0u64, |acc, (l, n)| acc.saturating_add(l.saturating_mul(*n))),
            Builds::Pad => n
                .iter()
                .fold(0u64, |acc, n| acc.saturating_add(n.saturating_mul(4))),
        }
    }
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(
        &self,
        args: ReturnFieldArgs<'_>,
    ) -> Result<arrow::datatypes::FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let wants = self.would_build(&args);
        if wants > self.limit as u64 {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "{}() would build {wants} bytes in one call, over the {} bytes a query's function may build (a quarter of its memory_limit): ask for less",
                self.name(),
                self.limit
            )));
        }
        self.inner.invoke_with_args(args)
    }
}

/// Replaces the functions of `ctx` that build what their arguments ask for with
/// bounded ones: one call builds at most `limit` bytes.
pub(crate) fn install(ctx: &SessionContext, limit: usize) {
    let functions = ctx.state().scalar_functions().clone();
    for (name, builds) in [
        ("repeat", Builds::Repeat),
        ("lpad", Builds::Pad),
        ("rpad", Builds::Pad),
    ] {
        if let Some(inner) = functions.get(name) {
            ctx.register_udf(ScalarUDF::new_from_impl(Bounded {
                inner: inner.clone(),
                builds,
                limit,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(ctx: &SessionContext, sql: &str) -> Result<usize> {
        let batches = ctx.sql(sql).await?.collect().await?;
        Ok(batches.iter().map(|b| b.num_rows()).sum())
    }

    #[tokio::test]
    async fn builders_past_the_limit_fail_and_small_ones_run() {
        let ctx = SessionContext::new();
        install(&ctx, 1 << 20);
        for bomb in [
            "SELECT repeat('ab', 1000000000)",
            "SELECT lpad('x', 2000000000)",
            "SELECT rpad('x', 2000000000, 'y')",
            "SELECT length(repeat(CAST(v AS VARCHAR), 100000)) FROM (VALUES (1), (2), (3), (4), (5), (6), (7), (8), (9), (10), (11)) t(v)",
        ] {
            let e = run(&ctx, bomb).await.expect_err(bomb).to_string();
            assert!(e.contains("would build"), "{bomb}: {e}");
        }
        assert_eq!(
            run(&ctx, "SELECT repeat('ab', 1000), lpad('x', 10)")
                .await
                .expect("small"),
            1
        );
    }
}
