//! Routing bad records: logged once with the pipeline and the first reason, offered to
//! open taps, then written to the dead-letter sink — or, with `on_error: fail` or no
//! sink, the first of them (by line, else by record number) refuses the work. Batch
//! runs, requests and streams all call [`DeadLetterRoute::route`]; what a refusal means
//! (a failed run, a 422, …) is the caller's.

use etlmesh_codec::Reject;
use etlmesh_config::OnError;

use super::{DeadLetterLog, DeadLetterSink};
use crate::SinkError;
use crate::tap::TapHub;

/// Where dead letters are written: a batch run's file or a service's log.
pub trait DeadLetterWrite: Send + Sync {
    /// Writes `rejects` durably (or as part of the run that commits them).
    fn write(&self, rejects: &[Reject]) -> Result<(), SinkError>;
}

impl DeadLetterWrite for DeadLetterSink {
    fn write(&self, rejects: &[Reject]) -> Result<(), SinkError> {
        DeadLetterSink::write(self, rejects)
    }
}

impl DeadLetterWrite for DeadLetterLog {
    fn write(&self, rejects: &[Reject]) -> Result<(), SinkError> {
        DeadLetterLog::write(self, rejects)
    }
}

/// A pipeline's way out for bad records.
#[derive(Clone, Copy)]
pub struct DeadLetterRoute<'a> {
    /// The pipeline, for the log line, the taps and the dead letters.
    pub pipeline: &'a str,
    /// Dead-letter them, or refuse the work.
    pub on_error: OnError,
    /// The dead-letter sink, when the pipeline has one.
    pub sink: Option<&'a dyn DeadLetterWrite>,
    /// Open taps (`etlmesh tap --stage dead_letter`), in services.
    pub taps: Option<&'a TapHub>,
}

/// What became of a group of bad records.
#[derive(Debug)]
pub enum Routed<'r> {
    /// Written to the dead-letter sink: this many (0 for none).
    DeadLettered(usize),
    /// Not written: the first bad record, to name in the refusal.
    Refused(&'r Reject),
}

/// The first bad record of a group: by line, else by record number.
pub fn first(rejects: &[Reject]) -> Option<&Reject> {
    rejects.iter().min_by_key(|r| r.line.or(r.row).unwrap_or(0))
}

impl DeadLetterRoute<'_> {
    /// Routes `rejects`. An error is a dead-letter sink that could not write: nothing
    /// of them is loaded, and the caller must not acknowledge or commit them.
    pub fn route<'r>(&self, rejects: &'r [Reject]) -> Result<Routed<'r>, SinkError> {
        let Some(first) = first(rejects) else {
            return Ok(Routed::DeadLettered(0));
        };
        if let Some(taps) = self.taps {
            taps.offer_rejects(self.pipeline, rejects);
        }
        let error_kind = format_args!("bad_record.{}", first.stage.as_str());
        match (self.on_error, self.sink) {
            (OnError::DeadLetter, Some(sink)) => {
                tracing::info!(
                    pipeline = %self.pipeline,
                    %error_kind,
                    records = rejects.len(),
                    "{} records dead-lettered; first: {first}",
                    rejects.len()
                );
                sink.write(rejects)?;
                Ok(Routed::DeadLettered(rejects.len()))
            }
            _ => {
                tracing::info!(
                    pipeline = %self.pipeline,
                    %error_kind,
                    records = rejects.len(),
                    "bad records refused (on_error: fail or no dead_letter sink); first: {first}"
                );
                Ok(Routed::Refused(first))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use etlmesh_codec::Stage;

    use super::*;

    #[derive(Default)]
    struct Memory(Mutex<Vec<String>>);

    impl DeadLetterWrite for Memory {
        fn write(&self, rejects: &[Reject]) -> Result<(), SinkError> {
            let mut m = self.0.lock().expect("lock");
            m.extend(rejects.iter().map(|r| r.reason.clone()));
            Ok(())
        }
    }

    fn rejects() -> Vec<Reject> {
        let source: Arc<str> = "in.csv".into();
        vec![
            Reject::new(&source, Stage::Decode, "late", Bytes::from_static(b"b")).at_line(9),
            Reject::new(&source, Stage::Decode, "early", Bytes::from_static(b"a")).at_line(3),
        ]
    }

    #[test]
    fn dead_letters_go_to_the_sink_and_are_counted() {
        let sink = Memory::default();
        let route = DeadLetterRoute {
            pipeline: "p",
            on_error: OnError::DeadLetter,
            sink: Some(&sink),
            taps: None,
        };
        let r = rejects();
        assert!(matches!(
            route.route(&r).expect("route"),
            Routed::DeadLettered(2)
        ));
        assert_eq!(*sink.0.lock().expect("lock"), ["late", "early"]);
        assert!(matches!(
            route.route(&[]).expect("route"),
            Routed::DeadLettered(0)
        ));
    }

    #[test]
    fn on_error_fail_or_no_sink_refuses_with_the_first_by_line() {
        let sink = Memory::default();
        let r = rejects();
        for route in [
            DeadLetterRoute {
                pipeline: "p",
                on_error: OnError::Fail,
                sink: Some(&sink),
                taps: None,
            },
            DeadLetterRoute {
                pipeline: "p",
                on_error: OnError::DeadLetter,
                sink: None,
                taps: None,
            },
        ] {
            match route.route(&r).expect("route") {
                Routed::Refused(first) => assert_eq!(first.reason, "early"),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        assert!(sink.0.lock().expect("lock").is_empty());
    }
}
