//! The datasets a query may read: every Parquet file sink and PostgreSQL sink of the
//! pipeline file, by name. Nothing else is a table.

use std::collections::BTreeMap;
use std::path::PathBuf;

use etlmesh_config::{Format, ObjectTarget, SinkSpec, Spec};
use serde::Serialize;

/// Where a dataset's rows are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DatasetSource {
    /// A directory of Parquet files, with Hive partitions (`col=value/`), on the local
    /// disk or in a bucket.
    Parquet {
        /// The directory, or the `s3://` URL.
        path: PathBuf,
        /// The partition columns, outermost first (read as text).
        partition_by: Vec<String>,
        /// The bucket, when the files are in object storage.
        #[serde(skip)]
        object: Option<ObjectTarget>,
    },
    /// A PostgreSQL table, read through a read-only transaction.
    Postgres {
        /// The connection string.
        #[serde(skip)]
        url: String,
        /// The table, optionally `schema.table`.
        table: String,
    },
}

/// A table of the analytics service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dataset {
    /// Its name in SQL.
    pub name: String,
    /// The pipeline whose sink writes it.
    pub pipeline: String,
    /// Where its rows are.
    #[serde(flatten)]
    pub source: DatasetSource,
}

/// The datasets by name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    datasets: BTreeMap<String, Dataset>,
}

impl Catalog {
    /// The datasets of a pipeline file. A pipeline's Parquet sink is named after the
    /// pipeline (`clean_readings`; a second one `clean_readings_2`); a PostgreSQL sink
    /// after its table (`demo_readings`). A name taken twice keeps the first dataset.
    pub fn from_spec(spec: &Spec) -> Self {
        let mut catalog = Self::default();
        for p in &spec.pipelines {
            let mut parquet = 0;
            for sink in &p.sinks {
                let (name, source) = match sink {
                    SinkSpec::File(f) if f.format == Format::Parquet => {
                        parquet += 1;
                        let name = if parquet == 1 {
                            p.name.clone()
                        } else {
                            format!("{}_{parquet}", p.name)
                        };
                        let source = DatasetSource::Parquet {
                            path: f.location().into(),
                            partition_by: f.partition_by.clone(),
                            object: f.object.clone(),
                        };
                        (name, source)
                    }
                    SinkSpec::Postgres(pg) => {
                        let name = pg.table.rsplit('.').next().unwrap_or(&pg.table).to_string();
                        let source = DatasetSource::Postgres {
                            url: pg.url.clone(),
                            table: pg.table.clone(),
                        };
                        (name, source)
                    }
                    _ => continue,
                };
                catalog.add(Dataset {
                    name,
                    pipeline: p.name.clone(),
                    source,
                });
            }
        }
        catalog
    }

    /// Adds a dataset unless its name is taken (then it is left out, with a warning).
    pub fn add(&mut self, dataset: Dataset) {
        if self.datasets.contains_key(&dataset.name) {
            tracing::warn!(dataset = %dataset.name, pipeline = %dataset.pipeline, "a dataset of this name exists already: this one is not queryable");
            return;
        }
        self.datasets.insert(dataset.name.clone(), dataset);
    }

    /// The dataset called `name`.
    pub fn get(&self, name: &str) -> Option<&Dataset> {
        self.datasets.get(name)
    }

    /// Every dataset, by name.
    pub fn datasets(&self) -> impl Iterator<Item = &Dataset> {
        self.datasets.values()
    }

    /// The names, for error messages.
    pub fn names(&self) -> String {
        if self.datasets.is_empty() {
            return "none (no pipeline has a Parquet or PostgreSQL sink)".into();
        }
        self.datasets.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parquet_and_postgres_sinks_are_datasets() {
        let f = etlmesh_config::PipelineFile::parse(
            "c.yaml",
            r#"
pipelines:
  clean:
    sinks:
      - { type: parquet, path: out/clean, partition_by: [status] }
      - { type: parquet, path: out/clean2 }
      - { type: csv, path: out/csv }
  live:
    source: { type: mqtt, broker: "mqtt://h:1883", topic: "t/{device_id}" }
    schema: { device_id: utf8 }
    sinks:
      - { type: postgres, url: "postgres://u@h/db", table: public.readings }
    dead_letter: { type: ndjson, path: out/dead }
"#,
        )
        .expect("valid");
        let c = Catalog::from_spec(&f.spec);
        assert_eq!(c.names(), "clean, clean_2, readings");
        assert_eq!(
            c.get("clean").map(|d| &d.source),
            Some(&DatasetSource::Parquet {
                path: "out/clean".into(),
                partition_by: vec!["status".into()],
                object: None,
            })
        );
        match c.get("readings").map(|d| &d.source) {
            Some(DatasetSource::Postgres { table, .. }) => assert_eq!(table, "public.readings"),
            other => panic!("{other:?}"),
        }
        assert!(c.get("csv").is_none());
    }
}
